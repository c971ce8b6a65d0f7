//! The folder inventory: a folder of Machine manifests, in the same YAML as the Kubernetes
//! resource, re-read whenever the folder changes.
//!
//! One bad file never takes the others down: a manifest that does not parse, a MAC or IP used
//! twice, or an IP outside the subnet is logged with its file name and that machine is simply not
//! served. With duplicates, every machine involved is left out, because serving either one would
//! hand out an address or boot file that another machine also claims.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::Ipv4Net;
use netboot::{MacAddr, Machine};
use serde::Deserialize;

use super::Table;

/// The API group and version of the Machine resource.
pub const API_VERSION: &str = "provisioner.dev/v1alpha1";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
}

/// Only the fields netboot needs; the rest of the Machine spec (image, disk hints, role…) is
/// accepted and ignored here.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    mac_address: String,
    ip_address: String,
    hostname: Option<String>,
    /// A reimage request: any change of this value images the machine again.
    reimage: Option<serde_yaml::Value>,
}

/// `spec.reimage` as text: a string or a number (a counter), so `reimage: 2` and
/// `reimage: "2"` are the same request.
fn reimage_value(value: &serde_yaml::Value) -> Option<String> {
    match value {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Why a manifest (or a machine in it) is not served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub file: PathBuf,
    pub machine: Option<String>,
    pub reason: String,
}

/// The result of reading the folder once.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub machines: HashMap<MacAddr, Machine>,
    pub rejections: Vec<Rejection>,
    /// `spec.reimage` by machine name, for the machines that set it.
    pub reimage: HashMap<String, String>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

fn parse_document(
    doc: Manifest,
    subnet: Ipv4Net,
    reserved: &[Ipv4Addr],
) -> Result<Machine, String> {
    if doc.kind != "Machine" {
        return Err(format!("kind is {:?}, expected \"Machine\"", doc.kind));
    }
    if doc.api_version != API_VERSION {
        return Err(format!(
            "apiVersion is {:?}, expected {API_VERSION:?}",
            doc.api_version
        ));
    }
    check_machine(
        doc.metadata.name,
        &doc.spec.mac_address,
        &doc.spec.ip_address,
        doc.spec.hostname,
        subnet,
        reserved,
    )
}

/// The checks every Machine passes before it is served, whether it comes from the folder or from
/// the cluster: a DNS name, a unicast MAC, a host address of the subnet that is not the server's
/// or the gateway's, a valid host name.
pub fn check_machine(
    name: String,
    mac_address: &str,
    ip_address: &str,
    hostname: Option<String>,
    subnet: Ipv4Net,
    reserved: &[Ipv4Addr],
) -> Result<Machine, String> {
    if !crate::validate::is_hostname(&name) {
        return Err(format!("metadata.name {name:?} is not a valid DNS name"));
    }
    let mac: MacAddr = mac_address
        .parse()
        .map_err(|e| format!("spec.macAddress: {e}"))?;
    if mac.0[0] & 1 == 1 {
        return Err(format!("spec.macAddress: {mac} is a multicast address"));
    }
    let ip: Ipv4Addr = ip_address
        .parse()
        .map_err(|_| format!("spec.ipAddress: {:?} is not an IPv4 address", ip_address))?;
    if !subnet.contains(&ip) || ip == subnet.network() || ip == subnet.broadcast() {
        return Err(format!(
            "spec.ipAddress: {ip} is not a host address of subnet {subnet}"
        ));
    }
    if reserved.contains(&ip) {
        return Err(format!(
            "spec.ipAddress: {ip} belongs to the server or gateway"
        ));
    }
    if let Some(hostname) = &hostname {
        if !crate::validate::is_hostname(hostname) {
            return Err(format!(
                "spec.hostname {hostname:?} is not a valid host name"
            ));
        }
    }
    Ok(Machine {
        name,
        mac,
        ip,
        hostname,
    })
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (each may hold several `---` documents).
/// `reserved` are addresses no machine may take (the server's own, the gateway).
pub fn load_dir(dir: &Path, subnet: Ipv4Net, reserved: &[Ipv4Addr]) -> std::io::Result<Snapshot> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p) && p.is_file())
        .collect();
    files.sort();

    let mut snapshot = Snapshot::default();
    let mut candidates: Vec<(PathBuf, Machine)> = Vec::new();
    for file in files {
        let reject = |machine: Option<String>, reason: String| Rejection {
            file: file.clone(),
            machine,
            reason,
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) => {
                snapshot
                    .rejections
                    .push(reject(None, format!("cannot read: {e}")));
                continue;
            }
        };
        for document in serde_yaml::Deserializer::from_str(&text) {
            let manifest = match Manifest::deserialize(document) {
                Ok(manifest) => manifest,
                Err(e) => {
                    // After a syntax error the document stream cannot resynchronise (the
                    // iterator would repeat the error forever): give up on the rest of the file.
                    snapshot.rejections.push(reject(None, e.to_string()));
                    break;
                }
            };
            let reimage = manifest.spec.reimage.as_ref().map(reimage_value);
            match parse_document(manifest, subnet, reserved) {
                Ok(machine) => {
                    match reimage {
                        Some(Some(value)) => {
                            snapshot.reimage.insert(machine.name.clone(), value);
                        }
                        Some(None) => tracing::warn!(
                            file = %file.display(),
                            machine = %machine.name,
                            "spec.reimage must be a string or a number; ignored"
                        ),
                        None => {}
                    }
                    candidates.push((file.clone(), machine));
                }
                Err(reason) => snapshot.rejections.push(reject(None, reason)),
            }
        }
    }

    // Any key claimed twice disqualifies every claimant.
    let mut by_mac: BTreeMap<MacAddr, Vec<usize>> = BTreeMap::new();
    let mut by_ip: BTreeMap<Ipv4Addr, Vec<usize>> = BTreeMap::new();
    let mut by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (_, m)) in candidates.iter().enumerate() {
        by_mac.entry(m.mac).or_default().push(i);
        by_ip.entry(m.ip).or_default().push(i);
        by_name.entry(m.name.as_str()).or_default().push(i);
    }
    let mut conflicts: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    let mut flag = |what: String, owners: &[usize]| {
        if owners.len() > 1 {
            let files: Vec<String> = owners
                .iter()
                .map(|&i| format!("{} ({})", candidates[i].1.name, candidates[i].0.display()))
                .collect();
            for &i in owners {
                conflicts
                    .entry(i)
                    .or_default()
                    .push(format!("{what} is also claimed by: {}", files.join(", ")));
            }
        }
    };
    for (mac, owners) in &by_mac {
        flag(format!("duplicate macAddress {mac}"), owners);
    }
    for (ip, owners) in &by_ip {
        flag(format!("duplicate ipAddress {ip}"), owners);
    }
    for (name, owners) in &by_name {
        flag(format!("duplicate name {name}"), owners);
    }
    for (i, (file, machine)) in candidates.iter().enumerate() {
        match conflicts.get(&i) {
            Some(reasons) => snapshot.rejections.push(Rejection {
                file: file.clone(),
                machine: Some(machine.name.clone()),
                reason: reasons.join("; "),
            }),
            None => {
                snapshot.machines.insert(machine.mac, machine.clone());
            }
        }
    }
    Ok(snapshot)
}

/// Loads the folder into `table`, logging every rejection with its file name.
/// Returns the number of machines served.
pub fn reload(
    table: &Table,
    dir: &Path,
    subnet: Ipv4Net,
    reserved: &[Ipv4Addr],
) -> std::io::Result<usize> {
    let snapshot = load_dir(dir, subnet, reserved)?;
    for r in &snapshot.rejections {
        tracing::warn!(
            file = %r.file.display(),
            machine = r.machine.as_deref().unwrap_or(""),
            "machine not served: {}",
            r.reason
        );
    }
    let count = snapshot.machines.len();
    let previous = table.all();
    let changed = previous.len() != count
        || snapshot
            .machines
            .iter()
            .any(|(mac, m)| previous.get(mac) != Some(m));
    table.replace(snapshot.machines);
    if let Some(status) = &table.status {
        status.sync_reimage(&snapshot.reimage);
    }
    if changed {
        tracing::info!(machines = count, rejected = snapshot.rejections.len(), dir = %dir.display(), "inventory loaded");
    }
    Ok(count)
}

/// An inotify watch on the inventory folder. Set up before the first load, so that no change
/// made between loading and watching can be missed.
pub struct FolderWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    changes: tokio::sync::mpsc::Receiver<()>,
}

impl FolderWatch {
    pub fn start(dir: &Path) -> FolderWatch {
        use notify::Watcher;
        let (tx, changes) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                // A full channel already means "reload pending".
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            w.watch(dir, notify::RecursiveMode::NonRecursive)
                .map(|()| w)
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "cannot watch the inventory folder, relying on periodic rescans: {e}");
                None
            }
        };
        FolderWatch {
            _watcher: watcher,
            changes,
        }
    }
}

/// Keeps `table` in step with the folder until `shutdown`: reloads on inotify events (debounced,
/// so an editor's write-rename-chmod burst is one reload) and every `rescan` as a safety net for
/// changes inotify cannot see (the folder itself replaced, network file systems).
pub async fn watch(
    mut folder: FolderWatch,
    table: Arc<Table>,
    dir: PathBuf,
    subnet: Ipv4Net,
    reserved: Vec<Ipv4Addr>,
    rescan: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut ticker = tokio::time::interval(rescan);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(()) = folder.changes.recv() => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                while folder.changes.try_recv().is_ok() {}
            }
            _ = ticker.tick() => {}
        }
        if let Err(e) = reload(&table, &dir, subnet, &reserved) {
            tracing::error!(dir = %dir.display(), "cannot read inventory folder, keeping the last good table: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netboot::MachineLookup;

    fn subnet() -> Ipv4Net {
        "10.77.0.0/24".parse().expect("cidr")
    }

    fn manifest(name: &str, mac: &str, ip: &str) -> String {
        format!(
            "apiVersion: {API_VERSION}\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n  macAddress: \"{mac}\"\n  ipAddress: {ip}\n"
        )
    }

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).expect("write manifest");
    }

    #[test]
    fn loads_good_machines_and_rejects_bad_ones_by_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(
            d,
            "node2.yaml",
            &manifest("node2", "52:54:00:00:00:02", "10.77.0.2"),
        );
        write(
            d,
            "node3.yml",
            &format!(
                "{}  hostname: n3\n",
                manifest("node3", "52:54:00:00:00:03", "10.77.0.3")
            ),
        );
        write(d, "broken.yaml", "apiVersion: [unclosed\n");
        write(
            d,
            "outside.yaml",
            &manifest("far", "52:54:00:00:00:04", "10.78.0.4"),
        );
        write(
            d,
            "badmac.yaml",
            &manifest("badmac", "52:54:00:00:04", "10.77.0.5"),
        );
        write(
            d,
            "server.yaml",
            &manifest("thief", "52:54:00:00:00:06", "10.77.0.1"),
        );
        write(d, "notes.txt", "not a manifest");
        let snap = load_dir(d, subnet(), &[Ipv4Addr::new(10, 77, 0, 1)]).expect("load");
        let names: Vec<&str> = {
            let mut v: Vec<&str> = snap.machines.values().map(|m| m.name.as_str()).collect();
            v.sort();
            v
        };
        assert_eq!(names, ["node2", "node3"]);
        let n3 = snap
            .machines
            .values()
            .find(|m| m.name == "node3")
            .expect("node3");
        assert_eq!(n3.hostname(), "n3");
        let rejected: Vec<String> = snap
            .rejections
            .iter()
            .map(|r| {
                r.file
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            rejected,
            ["badmac.yaml", "broken.yaml", "outside.yaml", "server.yaml"]
        );
        assert!(snap.rejections[0].reason.contains("macAddress"));
        assert!(snap.rejections[2].reason.contains("10.78.0.4"));
    }

    #[test]
    fn duplicates_disqualify_every_claimant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(
            d,
            "a.yaml",
            &manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
        );
        write(
            d,
            "b.yaml",
            &manifest("b", "52:54:00:00:00:0a", "10.77.0.11"),
        );
        write(
            d,
            "c.yaml",
            &manifest("c", "52:54:00:00:00:0c", "10.77.0.11"),
        );
        write(
            d,
            "d.yaml",
            &format!(
                "{}---\n{}",
                manifest("d", "52:54:00:00:00:0d", "10.77.0.13"),
                manifest("e", "52:54:00:00:00:0e", "10.77.0.14")
            ),
        );
        let snap = load_dir(d, subnet(), &[]).expect("load");
        let mut served: Vec<&str> = snap.machines.values().map(|m| m.name.as_str()).collect();
        served.sort();
        assert_eq!(served, ["d", "e"], "a/b share a MAC, b/c share an IP");
        let b = snap
            .rejections
            .iter()
            .find(|r| r.machine.as_deref() == Some("b"))
            .expect("b rejected");
        assert!(
            b.reason.contains("duplicate macAddress") && b.reason.contains("duplicate ipAddress"),
            "{}",
            b.reason
        );
        assert!(
            b.reason.contains("a.yaml"),
            "names the other file: {}",
            b.reason
        );
    }

    #[test]
    fn reload_replaces_the_table() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let table = Table::default();
        write(
            d,
            "a.yaml",
            &manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
        );
        assert_eq!(reload(&table, d, subnet(), &[]).expect("reload"), 1);
        let mac: MacAddr = "52:54:00:00:00:0a".parse().expect("mac");
        assert_eq!(
            table.by_mac(&mac).map(|m| m.ip),
            Some(Ipv4Addr::new(10, 77, 0, 10))
        );
        std::fs::remove_file(d.join("a.yaml")).expect("rm");
        assert_eq!(reload(&table, d, subnet(), &[]).expect("reload"), 0);
        assert!(table.by_mac(&mac).is_none());
    }
}
