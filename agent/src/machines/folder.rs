//! The folder inventory: a folder of Machine manifests, in the same YAML as the Kubernetes
//! resource, re-read whenever the folder changes. Each document is read into the CRD's own
//! types and judged by the rules the cluster's Machines are judged by ([`super::judge`]).
//!
//! One bad file never takes the others down: a manifest that does not parse, a MAC or IP used
//! twice, or an IP outside the subnet is logged with its file name and that machine is simply not
//! served. With duplicates, every machine involved is left out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{judge, AddressRules, Claim, Problem, Rejection, Snapshot, Table};
use crate::cluster::crd::MachineSpec;

/// The API group and version of the Machine resource.
pub const API_VERSION: &str = "provisioner.dev/v1alpha1";

/// One document of a manifest: a Machine as `kubectl apply` sends it. `status` is ignored, as
/// the API server ignores it when a Machine is created (its status subresource).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: MachineSpec,
}

/// Why a file or document is not a Machine at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("cannot read: {0}")]
    Unreadable(String),
    /// Not YAML, or not of the Machine's types (with the field's path:
    /// `spec.reimage: invalid type: integer `2`, expected a string`).
    #[error("{0}")]
    Yaml(String),
    #[error("kind is {0:?}, expected \"Machine\"")]
    Kind(String),
    #[error("apiVersion is {0:?}, expected {API_VERSION:?}")]
    ApiVersion(String),
    #[error("metadata.name is missing")]
    NoName,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// The Machine a document holds: its name and spec.
fn machine_of(document: Document) -> Result<(String, MachineSpec), Malformed> {
    if document.kind != "Machine" {
        return Err(Malformed::Kind(document.kind));
    }
    if document.api_version != API_VERSION {
        return Err(Malformed::ApiVersion(document.api_version));
    }
    let name = document.metadata.name.ok_or(Malformed::NoName)?;
    Ok((name, document.spec))
}

/// The Machines of one file's text, or why the rest of it cannot be read.
fn read_documents(text: &str) -> Vec<Result<(String, MachineSpec), Malformed>> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        // As JSON first, as kubectl sends it: the YAML deserializer would read `reimage: 2` into
        // a string, the API server refuses a number where the schema says string.
        let json = match serde_json::Value::deserialize(document) {
            Ok(json) => json,
            Err(e) => {
                // After a syntax error the document stream cannot resynchronise (the iterator
                // would repeat the error forever): give up on the rest of the file.
                documents.push(Err(Malformed::Yaml(e.to_string())));
                break;
            }
        };
        documents.push(
            serde_path_to_error::deserialize(json)
                .map_err(|e| Malformed::Yaml(e.to_string()))
                .and_then(machine_of),
        );
    }
    documents
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (each may hold several `---` documents) and
/// judges the Machines in them. Rejections come in file order.
pub fn load_dir(dir: &Path, rules: &AddressRules) -> std::io::Result<Snapshot> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p) && p.is_file())
        .collect();
    files.sort();

    let mut malformed: Vec<Rejection> = Vec::new();
    let mut machines: Vec<(&Path, String, MachineSpec)> = Vec::new();
    for file in &files {
        let reject = |problem: Malformed| Rejection {
            machine: None,
            file: Some(file.clone()),
            problem: Problem::Malformed(problem),
        };
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                malformed.push(reject(Malformed::Unreadable(e.to_string())));
                continue;
            }
        };
        for document in read_documents(&text) {
            match document {
                Ok((name, spec)) => machines.push((file, name, spec)),
                Err(problem) => malformed.push(reject(problem)),
            }
        }
    }
    let claims = machines.iter().map(|(file, name, spec)| Claim {
        name,
        spec,
        file: Some(file),
    });
    let mut snapshot = judge(claims, rules);
    snapshot.rejected.extend(malformed);
    // Stable: a file's rejections keep their order.
    snapshot.rejected.sort_by(|a, b| a.file.cmp(&b.file));
    Ok(snapshot)
}

/// Loads the folder into `table`, logging every rejection with its file name.
/// Returns the number of machines served.
pub fn reload(table: &Table, dir: &Path, rules: &AddressRules) -> std::io::Result<usize> {
    let snapshot = load_dir(dir, rules)?;
    for r in &snapshot.rejected {
        tracing::warn!(
            file = %r.file.as_deref().unwrap_or(dir).display(),
            machine = r.machine.as_deref().unwrap_or(""),
            "machine not served: {}",
            r.problem
        );
    }
    let count = snapshot.served.len();
    let previous = table.all();
    let changed = previous.len() != count
        || snapshot
            .served
            .iter()
            .any(|(mac, m)| previous.get(mac) != Some(m));
    table.load(&snapshot);
    if changed {
        tracing::info!(machines = count, rejected = snapshot.rejected.len(), dir = %dir.display(), "inventory loaded");
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
    rules: AddressRules,
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
        if let Err(e) = reload(&table, &dir, &rules) {
            tracing::error!(dir = %dir.display(), "cannot read inventory folder, keeping the last good table: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netboot::{MacAddr, MachineLookup};

    use super::*;

    fn rules(reserved: &[Ipv4Addr]) -> AddressRules {
        AddressRules {
            subnet: "10.77.0.0/24".parse().expect("cidr"),
            reserved: reserved.to_vec(),
        }
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
        let snap = load_dir(d, &rules(&[Ipv4Addr::new(10, 77, 0, 1)])).expect("load");
        let names: Vec<&str> = {
            let mut v: Vec<&str> = snap.served.values().map(|m| m.name.as_str()).collect();
            v.sort();
            v
        };
        assert_eq!(names, ["node2", "node3"]);
        let n3 = snap
            .served
            .values()
            .find(|m| m.name == "node3")
            .expect("node3");
        assert_eq!(n3.hostname(), "n3");
        let rejected: Vec<String> = snap
            .rejected
            .iter()
            .map(|r| {
                r.file
                    .as_ref()
                    .and_then(|f| f.file_name())
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            rejected,
            ["badmac.yaml", "broken.yaml", "outside.yaml", "server.yaml"]
        );
        assert!(snap.rejected[0].problem.message().contains("macAddress"));
        assert!(snap.rejected[2].problem.message().contains("10.78.0.4"));
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
        let snap = load_dir(d, &rules(&[])).expect("load");
        let mut served: Vec<&str> = snap.served.values().map(|m| m.name.as_str()).collect();
        served.sort();
        assert_eq!(served, ["d", "e"], "a/b share a MAC, b/c share an IP");
        let b = snap
            .rejected
            .iter()
            .find(|r| r.machine.as_deref() == Some("b"))
            .expect("b rejected");
        let reason = b.problem.message();
        let a = d.join("a.yaml");
        let c = d.join("c.yaml");
        assert_eq!(
            reason,
            format!(
                "macAddress 52:54:00:00:00:0a is also claimed by Machine a ({}); \
                 ipAddress 10.77.0.11 is also claimed by Machine c ({})",
                a.display(),
                c.display()
            ),
            "one sentence per clash, naming the other files"
        );
    }

    /// Two files naming the same Machine: neither is served.
    #[test]
    fn a_name_claimed_twice_disqualifies_both() {
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
            &manifest("a", "52:54:00:00:00:0b", "10.77.0.11"),
        );
        let snap = load_dir(d, &rules(&[])).expect("load");
        assert!(snap.served.is_empty());
        let reasons: Vec<String> = snap.rejected.iter().map(|r| r.problem.message()).collect();
        assert_eq!(reasons.len(), 2);
        assert!(
            reasons[0].starts_with("name a is also claimed by Machine a ("),
            "{reasons:?}"
        );
    }

    /// What `kubectl apply` refuses, the folder refuses, saying where.
    #[test]
    fn a_number_where_the_crd_says_string_is_refused_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(
            d,
            "a.yaml",
            &format!(
                "{}  reimage: 2\n",
                manifest("a", "52:54:00:00:00:0a", "10.77.0.10")
            ),
        );
        let snap = load_dir(d, &rules(&[])).expect("load");
        assert!(snap.served.is_empty());
        assert_eq!(
            snap.rejected[0].problem.message(),
            "spec.reimage: invalid type: integer `2`, expected a string"
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
        assert_eq!(reload(&table, d, &rules(&[])).expect("reload"), 1);
        let mac: MacAddr = "52:54:00:00:00:0a".parse().expect("mac");
        assert_eq!(
            table.by_mac(&mac).map(|m| m.ip),
            Some(Ipv4Addr::new(10, 77, 0, 10))
        );
        std::fs::remove_file(d.join("a.yaml")).expect("rm");
        assert_eq!(reload(&table, d, &rules(&[])).expect("reload"), 0);
        assert!(table.by_mac(&mac).is_none());
    }
}
