//! The folder inventory: a folder of Machine manifests, in the same YAML as the Kubernetes
//! resource, re-read whenever the folder changes. Each document is read into the CRD's own
//! types and judged by the rules the cluster's Machines are judged by ([`super::judge`]).
//!
//! One bad file never takes the others down: a manifest that does not parse, a MAC or IP used
//! twice, or an IP outside the subnet is logged with its file name, document index and machine
//! name, and that machine is simply not served. With duplicates, every machine involved is left
//! out. A document of another kind (a ConfigMap beside the Machines) is skipped, an empty one
//! ignored, and only a YAML syntax error ends the reading of a file (the parser cannot find the
//! next document after one). Each rejection is logged once, and again when its file changes,
//! not on every rescan.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{judge, AddressRules, Claim, Problem, Rejection, Snapshot, Table};
use crate::cluster::crd::MachineSpec;

/// The API group and version of the Machine resource.
pub const API_VERSION: &str = "provisioner.dev/v1alpha1";

/// One document of a manifest: a Machine as `kubectl apply` sends it. `status` is ignored, as
/// the API server ignores it when a Machine is created (its status subresource); any other key
/// it does not know is an error, as kubectl's (default) strict field validation makes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    spec: MachineSpec,
    #[allow(dead_code)]
    #[serde(default)]
    status: Option<serde_json::Value>,
}

/// Why a file or document is not a Machine at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("cannot read: {0}")]
    Unreadable(String),
    /// Not YAML: the parser cannot go on to the next document.
    #[error("YAML syntax error, the rest of the file is not read: {0}")]
    Syntax(String),
    /// YAML, but not of the Machine's types (with the field's path:
    /// `spec.reimage: invalid type: integer `2`, expected a string`).
    #[error("{0}")]
    Yaml(String),
    /// Another kind of object: skipped, not an error ([`Problem::is_error`]).
    #[error("kind {0}, skipped (only kind Machine is read)")]
    Kind(String),
    #[error("kind is missing (expected \"Machine\")")]
    NoKind,
    #[error("apiVersion is {0:?}, expected {API_VERSION:?}")]
    ApiVersion(String),
    #[error("metadata.name is missing")]
    NoName,
    /// Keys the Machine's types do not have, by path (`spec.hostnme`).
    #[error("unknown field{} {}", if .0.len() == 1 { "" } else { "s" }, .0.join(", "))]
    UnknownFields(Vec<String>),
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// One document of a file, read.
#[derive(Debug)]
enum Read {
    /// No content (`---` with nothing after it, only comments): not a Machine, not an error.
    Empty,
    Machine {
        name: String,
        spec: Box<MachineSpec>,
    },
    Rejected {
        /// `metadata.name` when the document has one.
        name: Option<String>,
        problem: Malformed,
    },
}

/// What one document holds. `json` is the document as JSON, as kubectl sends it: the YAML
/// deserializer would read `reimage: 2` into a string, the API server refuses a number where
/// the schema says string.
fn read_document(json: serde_json::Value) -> Read {
    if json.is_null() {
        return Read::Empty;
    }
    let name = json
        .pointer("/metadata/name")
        .and_then(|n| n.as_str())
        .map(str::to_owned);
    let reject = |problem| Read::Rejected {
        name: name.clone(),
        problem,
    };
    match json.get("kind").and_then(|k| k.as_str()) {
        None => return reject(Malformed::NoKind),
        Some("Machine") => {}
        Some(kind) => return reject(Malformed::Kind(kind.to_owned())),
    }
    match json.get("apiVersion").and_then(|v| v.as_str()) {
        Some(API_VERSION) => {}
        Some(other) => return reject(Malformed::ApiVersion(other.to_owned())),
        None => return reject(Malformed::ApiVersion(String::new())),
    }
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let document: Result<Document, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(json, &mut note));
    let document = match document {
        Ok(document) => document,
        Err(e) => return reject(Malformed::Yaml(e.to_string())),
    };
    if !unknown.is_empty() {
        return reject(Malformed::UnknownFields(unknown));
    }
    match document.metadata.name {
        Some(name) => Read::Machine {
            name,
            spec: Box::new(document.spec),
        },
        None => reject(Malformed::NoName),
    }
}

/// The documents of one file's text, in order (an empty document included, so that indices
/// are the file's own). A syntax error is the last entry.
fn read_documents(text: &str) -> Vec<Read> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        // Any YAML first (non-string keys, tags): only a syntax error fails here.
        let yaml = match serde_yaml::Value::deserialize(document) {
            Ok(yaml) => yaml,
            Err(e) => {
                // After a syntax error the document stream cannot resynchronise (the iterator
                // would repeat the error forever): give up on the rest of the file.
                documents.push(Read::Rejected {
                    name: None,
                    problem: Malformed::Syntax(e.to_string()),
                });
                break;
            }
        };
        documents.push(match serde_json::to_value(&yaml) {
            Ok(json) => read_document(json),
            // Valid YAML that JSON cannot hold (a number as a mapping key): not a manifest
            // kubectl could send, but the next document may still be one.
            Err(e) => Read::Rejected {
                name: None,
                problem: Malformed::Yaml(e.to_string()),
            },
        });
    }
    documents
}

/// A Machine of a file: its document index (from 1), name and spec.
type Found = (usize, String, MachineSpec);

/// The Machines of one file's text, and the rejections of its other documents (with `file`).
fn read_file(text: &str, file: Option<&Path>) -> (Vec<Found>, Vec<Rejection>) {
    let mut machines = Vec::new();
    let mut rejected = Vec::new();
    for (i, document) in read_documents(text).into_iter().enumerate() {
        match document {
            Read::Empty => {}
            Read::Machine { name, spec } => machines.push((i + 1, name, *spec)),
            Read::Rejected { name, problem } => rejected.push(Rejection {
                machine: name,
                file: file.map(Path::to_path_buf),
                document: Some(i + 1),
                problem: Problem::Malformed(problem),
            }),
        }
    }
    (machines, rejected)
}

/// One manifest file's text judged as [`load_dir`] judges a folder holding only that file
/// (without a file name in the rejections). The fuzz target `machine_yaml` runs it.
pub fn judge_text(text: &str, rules: &AddressRules) -> Snapshot {
    let (machines, malformed) = read_file(text, None);
    let claims = machines.iter().map(|(document, name, spec)| Claim {
        name,
        spec,
        file: None,
        document: Some(*document),
    });
    let mut snapshot = judge(claims, rules);
    snapshot.rejected.extend(malformed);
    snapshot.rejected.sort_by_key(|r| r.document);
    snapshot
}

/// Every manifest of `dir`, sorted: `*.yaml` and `*.yml` regular files.
fn manifests(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| is_manifest(p) && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The snapshot of the folder, and a fingerprint of each file's text (to log a rejection once
/// per version of its file).
fn scan(dir: &Path, rules: &AddressRules) -> std::io::Result<(Snapshot, HashMap<PathBuf, u64>)> {
    let files = manifests(dir)?;
    let mut fingerprints = HashMap::new();
    let mut malformed: Vec<Rejection> = Vec::new();
    let mut machines: Vec<(&Path, usize, String, MachineSpec)> = Vec::new();
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                malformed.push(Rejection {
                    machine: None,
                    file: Some(file.clone()),
                    document: None,
                    problem: Problem::Malformed(Malformed::Unreadable(e.to_string())),
                });
                continue;
            }
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut hasher);
        fingerprints.insert(file.clone(), hasher.finish());
        let (found, rejected) = read_file(&text, Some(file));
        machines.extend(
            found
                .into_iter()
                .map(|(document, name, spec)| (file.as_path(), document, name, spec)),
        );
        malformed.extend(rejected);
    }
    let claims = machines.iter().map(|(file, document, name, spec)| Claim {
        name,
        spec,
        file: Some(file),
        document: Some(*document),
    });
    let mut snapshot = judge(claims, rules);
    snapshot.rejected.extend(malformed);
    // In file order, then document order.
    snapshot
        .rejected
        .sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
    Ok((snapshot, fingerprints))
}

/// Reads every `*.yaml`/`*.yml` file of `dir` (each may hold several `---` documents) and
/// judges the Machines in them. Rejections come in file order, then document order.
pub fn load_dir(dir: &Path, rules: &AddressRules) -> std::io::Result<Snapshot> {
    scan(dir, rules).map(|(snapshot, _)| snapshot)
}

/// The folder inventory: where it is, the rules its Machines are judged by, and what has been
/// logged about it.
pub struct Folder {
    dir: PathBuf,
    rules: AddressRules,
    /// The rejections last logged, each with its file's fingerprint: a rescan that finds the
    /// same rejection in the same file says nothing.
    logged: Mutex<HashSet<String>>,
}

impl Folder {
    pub fn new(dir: PathBuf, rules: AddressRules) -> Folder {
        Folder {
            dir,
            rules,
            logged: Mutex::new(HashSet::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Loads the folder into `table`, logging each new rejection with its file name, document
    /// index and machine name. Returns the number of machines served.
    pub fn reload(&self, table: &Table) -> std::io::Result<usize> {
        let (snapshot, fingerprints) = scan(&self.dir, &self.rules)?;
        let mut seen = HashSet::new();
        {
            let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
            for r in &snapshot.rejected {
                let fingerprint = r.file.as_ref().and_then(|f| fingerprints.get(f));
                let key = format!("{r}\0{fingerprint:?}");
                if !logged.contains(&key) {
                    let file = r.file.as_deref().unwrap_or(&self.dir).display().to_string();
                    let machine = r.machine.as_deref().unwrap_or("");
                    let document = r.document.unwrap_or(0);
                    if r.problem.is_error() {
                        tracing::warn!(file, document, machine, "machine not served: {r}");
                    } else {
                        tracing::info!(file, document, machine, "document skipped: {r}");
                    }
                }
                seen.insert(key);
            }
            *logged = seen;
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
            let rejected = snapshot
                .rejected
                .iter()
                .filter(|r| r.problem.is_error())
                .count();
            tracing::info!(machines = count, rejected, dir = %self.dir.display(), "inventory loaded");
        }
        Ok(count)
    }
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
    inventory: Arc<Folder>,
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
        if let Err(e) = inventory.reload(&table) {
            tracing::error!(dir = %inventory.dir().display(), "cannot read inventory folder, keeping the last good table: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use std::sync::{Arc, Mutex};

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
        assert_eq!(
            snap.rejected[0].to_string(),
            format!(
                "{}, document 1 (Machine badmac): spec.macAddress: \"52:54:00:00:04\" is not six colon-separated pairs of hex digits",
                d.join("badmac.yaml").display()
            )
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
        let folder = Folder::new(d.to_path_buf(), rules(&[]));
        write(
            d,
            "a.yaml",
            &manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
        );
        assert_eq!(folder.reload(&table).expect("reload"), 1);
        let mac: MacAddr = "52:54:00:00:00:0a".parse().expect("mac");
        assert_eq!(
            table.by_mac(&mac).map(|m| m.ip),
            Some(Ipv4Addr::new(10, 77, 0, 10))
        );
        std::fs::remove_file(d.join("a.yaml")).expect("rm");
        assert_eq!(folder.reload(&table).expect("reload"), 0);
        assert!(table.by_mac(&mac).is_none());
    }

    /// A rejection as the tests compare it: `(document, machine, message, is_error)`.
    type Verdict = (Option<usize>, Option<String>, String, bool);

    /// The machines served from one file, and the verdicts on its other documents. The text
    /// alone ([`judge_text`], the fuzz target's entry) is judged the same.
    fn verdicts(text: &str) -> (Vec<String>, Vec<Verdict>) {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "m.yaml", text);
        let snap = load_dir(dir.path(), &rules(&[])).expect("load");
        let alone = judge_text(text, &rules(&[]));
        assert_eq!(alone.served, snap.served);
        assert_eq!(alone.reimage, snap.reimage);
        assert_eq!(alone.imaging, snap.imaging);
        let outline = |s: &Snapshot| -> Vec<(Option<usize>, Option<String>, bool)> {
            s.rejected
                .iter()
                .map(|r| (r.document, r.machine.clone(), r.problem.is_error()))
                .collect()
        };
        assert_eq!(outline(&alone), outline(&snap));
        let mut served: Vec<String> = snap.served.values().map(|m| m.name.clone()).collect();
        served.sort();
        let rejected = snap
            .rejected
            .iter()
            .map(|r| {
                (
                    r.document,
                    r.machine.clone(),
                    r.problem.message(),
                    r.problem.is_error(),
                )
            })
            .collect();
        (served, rejected)
    }

    /// A ConfigMap, an empty document, a document JSON cannot hold: none hides the Machines
    /// after it in the same file; the ConfigMap is skipped (not an error), the empty document
    /// is nothing at all.
    #[test]
    fn a_machine_after_another_document_is_read() {
        let text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\ndata: {{a: b}}\n---\n{}---\n---\n# only a comment\n---\nkind: Machine\n1: numeric key\n---\n{}",
            manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
            manifest("b", "52:54:00:00:00:0b", "10.77.0.11")
        );
        let (served, rejected) = verdicts(&text);
        assert_eq!(served, ["a", "b"]);
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(
            rejected[0],
            (
                Some(1),
                Some("cm".into()),
                "kind ConfigMap, skipped (only kind Machine is read)".into(),
                false
            )
        );
        assert_eq!(rejected[1].0, Some(5), "{rejected:?}");
        assert!(rejected[1].3, "a document JSON cannot hold is an error");
    }

    /// Only a syntax error ends the file: the Machines before it are served.
    #[test]
    fn a_syntax_error_ends_the_file_with_its_index() {
        let text = format!(
            "{}---\nkind: [unclosed\n---\n{}",
            manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
            manifest("b", "52:54:00:00:00:0b", "10.77.0.11")
        );
        let (served, rejected) = verdicts(&text);
        assert_eq!(served, ["a"]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].0, Some(2));
        assert!(
            rejected[0]
                .2
                .starts_with("YAML syntax error, the rest of the file is not read"),
            "{rejected:?}"
        );
    }

    /// A misspelt key is an error naming it, with the machine's name and document index.
    #[test]
    fn unknown_keys_are_errors_with_name_and_index() {
        let text = format!(
            "{}---\n{}  hostnme: b\n  rack: r1\nstatus: {{phase: Ready}}\n",
            manifest("a", "52:54:00:00:00:0a", "10.77.0.10"),
            manifest("b", "52:54:00:00:00:0b", "10.77.0.11")
        );
        let (served, rejected) = verdicts(&text);
        assert_eq!(served, ["a"]);
        assert_eq!(
            rejected,
            [(
                Some(2),
                Some("b".into()),
                "unknown fields spec.hostnme, spec.rack".into(),
                true
            )]
        );
        let (_, rejected) = verdicts(&format!(
            "{}metadata2: x\n",
            manifest("c", "52:54:00:00:00:0c", "10.77.0.12")
        ));
        assert_eq!(rejected[0].2, "unknown field metadata2");
        // A Machine whose spec fails: its name is known even so.
        let (_, rejected) = verdicts(&format!(
            "apiVersion: {API_VERSION}\nkind: Machine\nmetadata: {{name: d}}\nspec: {{ipAddress: 10.77.0.13}}\n"
        ));
        assert_eq!(
            rejected,
            [(
                Some(1),
                Some("d".into()),
                "spec: missing field `macAddress`".into(),
                true
            )]
        );
    }

    /// Captures what `f` logs.
    fn logs(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// A rejection is logged once, not on every rescan, and again when its file changes.
    #[test]
    fn a_rejection_is_logged_once_per_version_of_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let table = Table::default();
        let folder = Folder::new(d.to_path_buf(), rules(&[]));
        let bad = manifest("far", "52:54:00:00:00:04", "10.78.0.4");
        write(d, "far.yaml", &bad);
        let first = logs(|| {
            folder.reload(&table).expect("reload");
        });
        assert_eq!(first.matches("machine not served").count(), 1, "{first}");
        assert!(first.contains("document 1 (Machine far)"), "{first}");
        let rescan = logs(|| {
            folder.reload(&table).expect("reload");
            folder.reload(&table).expect("reload");
        });
        assert!(!rescan.contains("machine not served"), "{rescan}");
        write(d, "far.yaml", &format!("# edited, still wrong\n{bad}"));
        let edited = logs(|| {
            folder.reload(&table).expect("reload");
        });
        assert_eq!(edited.matches("machine not served").count(), 1, "{edited}");
    }
}
