//! The state file: the table and the credentials' hashes, written atomically after changes and
//! read back on start, so that a restart in the middle of provisioning resumes where it was.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use netboot::{MacAddr, Machine};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::credentials::Credentials;
use super::phase::{MachineStatus, Phase};
use super::store::StatusStore;

/// Minimum time between two state file writes caused by `last_seen` alone; a phase change is
/// written at once.
const PERSIST_COALESCE: Duration = Duration::from_secs(2);

/// One machine in the state file. The address comes from the inventory; the MAC is kept so
/// that a name given to different hardware starts over instead of inheriting a phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StoredMachine {
    mac_address: String,
    phase: Phase,
    #[serde(default)]
    progress: u8,
    #[serde(default)]
    message: String,
    #[serde(default)]
    last_seen_usec: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    user_data_replayed_usec: u64,
    /// sha256 of the current provisioning token (hex); the token itself is never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    user_data_served: bool,
    /// The last `spec.reimage` value seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reimage: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateFile {
    machines: BTreeMap<String, StoredMachine>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl StatusStore {
    /// Asks the persister to write the state file at once (credentials changed, which is not
    /// a phase change).
    pub(super) fn persist_now(&self) {
        self.persist_urgent.store(true, Ordering::Release);
        self.persist_wake.notify_one();
    }

    /// Writes the state file after changes until `shutdown`, then once more. Phase changes are
    /// written at once; `last_seen` updates at most every few seconds.
    pub async fn persist(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(path) = self.state_file.clone() else {
            return;
        };
        let mut warned = false;
        loop {
            let stopping = tokio::select! {
                _ = shutdown.cancelled() => true,
                _ = self.persist_wake.notified() => false,
            };
            if !stopping && !self.persist_urgent.swap(false, Ordering::AcqRel) {
                // Only last_seen moved: let more changes gather, unless a phase change comes.
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(PERSIST_COALESCE) => {}
                    _ = async {
                        while !self.persist_urgent.load(Ordering::Acquire) {
                            self.persist_wake.notified().await;
                        }
                    } => {}
                }
                self.persist_urgent.store(false, Ordering::Release);
            }
            let state = self.state_file_contents();
            let target = path.clone();
            let written = tokio::task::spawn_blocking(move || write_state(&target, &state)).await;
            match written {
                Ok(Ok(())) => warned = false,
                Ok(Err(e)) if !warned => {
                    tracing::warn!(file = %path.display(), "cannot write the state file, status will not survive a restart: {e:#}");
                    warned = true;
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::warn!("state file writer failed: {e}"),
            }
            if stopping || shutdown.is_cancelled() {
                return;
            }
        }
    }

    fn state_file_contents(&self) -> StateFile {
        let inner = self.lock();
        StateFile {
            machines: inner
                .machines
                .values()
                .map(|m| {
                    (
                        m.name.clone(),
                        StoredMachine {
                            mac_address: m.mac.to_string(),
                            phase: m.phase,
                            progress: m.progress,
                            message: m.message.clone(),
                            last_seen_usec: m.last_seen_usec,
                            user_data_replayed_usec: m.user_data_replayed_usec,
                            token_sha256: inner
                                .credentials
                                .get(&m.name)
                                .and_then(|c| c.token_sha256)
                                .map(hex::encode),
                            user_data_served: inner
                                .credentials
                                .get(&m.name)
                                .is_some_and(|c| c.user_data_served),
                            reimage: inner
                                .credentials
                                .get(&m.name)
                                .and_then(|c| c.reimage.clone()),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// The state file to use when the configuration names none: in systemd's `StateDirectory=`
/// (`$STATE_DIRECTORY`), else in `/var/lib/provisioner` if it exists. `None` (status kept in
/// memory only) rather than creating directories on a host that did not ask for them.
pub fn default_state_file() -> Option<PathBuf> {
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
        // systemd passes a colon-separated list when several directories are configured.
        let first = dirs
            .to_string_lossy()
            .split(':')
            .next()
            .map(PathBuf::from)?;
        return Some(first.join("state.yaml"));
    }
    let dir = Path::new("/var/lib/provisioner");
    dir.is_dir().then(|| dir.join("state.yaml"))
}

/// What an earlier run wrote to `path`, by machine name. A missing file is a first start; an
/// unreadable one is logged and ignored (statuses start over at Pending rather than the daemon
/// refusing to serve).
pub(super) fn restore(path: &Path) -> HashMap<String, StoredMachine> {
    match read_state(path) {
        Ok(Some(state)) => {
            tracing::info!(file = %path.display(), machines = state.machines.len(), "restored machine status");
            state.machines.into_iter().collect()
        }
        Ok(None) => HashMap::new(),
        Err(e) => {
            tracing::warn!(file = %path.display(), "ignoring the state file: {e:#}");
            HashMap::new()
        }
    }
}

impl StoredMachine {
    /// The status and credentials `machine` resumes with. A name given to other hardware starts
    /// over at Pending with no token; only its last `spec.reimage` value is kept.
    pub(super) fn restore(self, machine: &Machine) -> (MachineStatus, Credentials) {
        let mut status = MachineStatus::pending(machine);
        let same_hardware = self.mac_address.parse::<MacAddr>() == Ok(machine.mac);
        if same_hardware {
            status.phase = self.phase;
            status.progress = self.progress.min(100);
            status.message = self.message;
            status.last_seen_usec = self.last_seen_usec;
            status.user_data_replayed_usec = self.user_data_replayed_usec;
        }
        let token_sha256 = self
            .token_sha256
            .as_deref()
            .and_then(|h| hex::decode(h).ok())
            .and_then(|h| <[u8; 32]>::try_from(h).ok())
            .filter(|_| same_hardware);
        let credentials = Credentials {
            token_sha256,
            user_data_served: same_hardware && self.user_data_served,
            reimage: self.reimage,
        };
        (status, credentials)
    }
}

fn read_state(path: &Path) -> anyhow::Result<Option<StateFile>> {
    use anyhow::Context;
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("cannot read"),
    };
    let state: StateFile = serde_yaml::from_str(&text).context("cannot parse")?;
    Ok(Some(state))
}

/// Atomic replace: a crash leaves the old file or the new one, never half of one.
fn write_state(path: &Path, state: &StateFile) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let text = serde_yaml::to_string(state).context("cannot encode")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(b"# Machine status written by provisioner netboot; read back on start.\n")?;
    tmp.write_all(text.as_bytes())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename into {}", path.display()))?;
    Ok(())
}
