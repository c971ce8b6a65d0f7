//! Per-machine provisioning status: phase, progress, message and when the machine was last seen.
//!
//! The store is the one place phases change. Boot events from the servers and reports from
//! stage2 go through it; every change is sent to subscribers (D-Bus, `STATUS=`), every phase
//! change is one journald record with a fixed `MESSAGE_ID`, and the whole table is written to a
//! state file so that a restart in the middle of provisioning resumes where it was.
//!
//! It also keeps each machine's provisioning token bound to the machine (DESIGN.md, Security):
//!
//! * A token is handed out ([`StatusStore::imaging_token`]) only to a request from the
//!   machine's reserved address, within a window after netboot acknowledged the machine's DHCP
//!   lease (a *DHCP cycle*: each ACK starts a new one).
//! * A live token is never replaced by another request of the same cycle: a repeated script
//!   request (iPXE retrying) gets the same token. Only a new cycle (the machine booted from the
//!   network again) or a new provisioning (reimage) mints a new one. To give the same token
//!   again without storing it, its plain text is kept in memory for its cycle only (wiped when
//!   the next ACK comes, the window passes, or the machine leaves); the state file holds its
//!   sha256 only. Deriving it from a long-lived key instead would keep a key in memory that
//!   makes every token; this keeps at most one live secret per machine, for a few minutes.
//! * Reports and cloud-init fetches with the token must come from the reserved address too.
//!
//! DHCP cycles are not written to the state file: after a restart a machine must do DHCP again
//! before it is given a token (a token already given keeps working).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use netboot::lograte::LogLimit;
use netboot::provisioning::{canonical_peer, ProgressReport, Refusal};
use netboot::{BootEvent, MacAddr, Machine};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

/// Budget of the per-request warnings about refused user-data fetches (the phase records are
/// never limited).
static REPLAY_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("user-data replay", 1, 20));

/// Where a machine is in its provisioning (DESIGN.md: Pending → PXEBooting → Imaging → Imaged →
/// Joining → Ready, or Failed with a reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Phase {
    Pending,
    #[serde(rename = "PXEBooting")]
    PxeBooting,
    Imaging,
    Imaged,
    Joining,
    Ready,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Pending,
        Phase::PxeBooting,
        Phase::Imaging,
        Phase::Imaged,
        Phase::Joining,
        Phase::Ready,
        Phase::Failed,
    ];

    /// The name used on D-Bus, in the state file, in journald's `PHASE=` and in Kubernetes.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::PxeBooting => "PXEBooting",
            Phase::Imaging => "Imaging",
            Phase::Imaged => "Imaged",
            Phase::Joining => "Joining",
            Phase::Ready => "Ready",
            Phase::Failed => "Failed",
        }
    }

    /// journald `MESSAGE_ID` of the record written when a machine enters this phase. Fixed for
    /// good (listed in the README): `journalctl MESSAGE_ID=…` finds every such transition.
    pub fn message_id(self) -> &'static str {
        match self {
            Phase::Pending => "56e526c4bf4349ab849858e5d06d5831",
            Phase::PxeBooting => "826dbd54d3004b2b81ecf7e0233863f1",
            Phase::Imaging => "cf1806acef0c4efe9281dc71f7075c63",
            Phase::Imaged => "0caafb0aa69743209fe440c2d1d2bbef",
            Phase::Joining => "5d57d97220d24ee1b35b1a90f8a0ef41",
            Phase::Ready => "7ae138237d614af8a28f965c82f77b57",
            Phase::Failed => "318422420f4e48b59b196d60fe5a3ab1",
        }
    }

    /// Lower-case words for the `STATUS=` summary.
    fn summary_word(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::PxeBooting => "PXE booting",
            Phase::Imaging => "imaging",
            Phase::Imaged => "imaged",
            Phase::Joining => "joining",
            Phase::Ready => "ready",
            Phase::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of one machine of the inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineStatus {
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub phase: Phase,
    /// Percent of the image written (0-100); 100 once imaged.
    pub progress: u8,
    /// What happened last, in words: the failure reason when `Failed`.
    pub message: String,
    /// Microseconds since the Unix epoch (systemd's timestamp convention); 0 = never seen.
    pub last_seen_usec: u64,
    /// When user-data was last refused because its token was already spent (same clock as
    /// `last_seen_usec`); 0 = no replay since the current provisioning started. The cluster
    /// controller raises it as the Machine's `UserDataReplayed` condition.
    pub user_data_replayed_usec: u64,
}

impl MachineStatus {
    fn pending(machine: &Machine) -> Self {
        MachineStatus {
            name: machine.name.clone(),
            mac: machine.mac,
            ip: machine.ip,
            phase: Phase::Pending,
            progress: 0,
            message: String::new(),
            last_seen_usec: 0,
            user_data_replayed_usec: 0,
        }
    }
}

/// One change of the table, as sent to subscribers.
#[derive(Debug, Clone)]
pub enum Change {
    Added(MachineStatus),
    Updated {
        before: MachineStatus,
        after: MachineStatus,
    },
    Removed(MachineStatus),
}

/// A report about a machine from outside the boot servers (stage2, the cluster).
// Joining and Ready come from the cluster controller, which lands separately.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// stage2 is writing the image: percent done and e.g. the rate.
    Imaging { progress: u8, message: String },
    /// The image is on the disk and verified.
    Imaged,
    /// The installed system is joining the cluster.
    Joining,
    /// The node is Ready in the cluster.
    Ready,
    /// Provisioning failed; the reason is kept as the message.
    Failed { message: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no machine named {0:?} in the inventory")]
pub struct UnknownMachine(pub String);

/// How many machines are in each phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    pub by_phase: BTreeMap<Phase, u32>,
    pub total: u32,
}

impl PhaseCounts {
    pub fn of<'a>(machines: impl IntoIterator<Item = &'a MachineStatus>) -> Self {
        let mut counts = PhaseCounts::default();
        for m in machines {
            *counts.by_phase.entry(m.phase).or_default() += 1;
            counts.total += 1;
        }
        counts
    }

    pub fn get(&self, phase: Phase) -> u32 {
        self.by_phase.get(&phase).copied().unwrap_or(0)
    }
}

/// `3 machines: 1 imaging 42%, 2 ready` (the mean progress of the machines being imaged).
pub fn summary<'a>(machines: impl IntoIterator<Item = &'a MachineStatus>) -> String {
    let machines: Vec<&MachineStatus> = machines.into_iter().collect();
    let total = machines.len();
    let noun = if total == 1 { "machine" } else { "machines" };
    if total == 0 {
        return format!("0 {noun}");
    }
    let counts = PhaseCounts::of(machines.iter().copied());
    let parts: Vec<String> = Phase::ALL
        .iter()
        .filter(|p| counts.get(**p) > 0)
        .map(|&phase| {
            let n = counts.get(phase);
            if phase == Phase::Imaging {
                let sum: u32 = machines
                    .iter()
                    .filter(|m| m.phase == Phase::Imaging)
                    .map(|m| u32::from(m.progress))
                    .sum();
                format!("{n} imaging {}%", sum / n)
            } else {
                format!("{n} {}", phase.summary_word())
            }
        })
        .collect();
    format!("{total} {noun}: {}", parts.join(", "))
}

/// `last_seen` only counts as a change (signal, state file write) when it moved this much, so a
/// DHCP exchange's four packets are one update, not four.
const LAST_SEEN_RESOLUTION_USEC: u64 = 1_000_000;
/// Minimum time between two state file writes caused by `last_seen` alone; a phase change is
/// written at once.
const PERSIST_COALESCE: Duration = Duration::from_secs(2);
/// Enough for a burst of changes to all 1000 machines of a large inventory between two polls.
const CHANGE_CHANNEL: usize = 4096;

fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One machine in the state file. The address comes from the inventory; the MAC is kept so
/// that a name given to different hardware starts over instead of inheriting a phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredMachine {
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

#[derive(Default)]
struct Inner {
    machines: BTreeMap<String, MachineStatus>,
    /// Read from the state file at start, used when the inventory names the machine.
    restored: HashMap<String, StoredMachine>,
    /// Per machine name: the current provisioning's credentials.
    credentials: HashMap<String, Credentials>,
    /// Per machine name: its DHCP cycles (memory only).
    leases: HashMap<String, Lease>,
}

/// A machine's DHCP cycles, kept in memory only.
#[derive(Default)]
struct Lease {
    /// ACKs sent to the machine since netboot started: the number of the current cycle.
    cycle: u64,
    /// When the current cycle's ACK was sent.
    acked_at: Option<Instant>,
    /// The token minted in cycle `.0`, to give it again to a repeated script request of that
    /// cycle. Wiped when dropped.
    minted: Option<(u64, Zeroizing<String>)>,
}

/// Whether `peer` is the reserved address `ip` (an IPv4-mapped IPv6 peer counts as IPv4).
fn from_reservation(ip: Ipv4Addr, peer: IpAddr) -> bool {
    canonical_peer(peer) == IpAddr::V4(ip)
}

/// What authenticates the current provisioning of a machine. Kept apart from
/// [`MachineStatus`], which is published (D-Bus, journald) and must not carry them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Credentials {
    /// sha256 of the token: enough to check one, useless to forge one.
    token_sha256: Option<[u8; 32]>,
    user_data_served: bool,
    reimage: Option<String>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn token_hash(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// A new provisioning token: 32 bytes from the kernel's CSPRNG, hex (64 characters, an
/// alphabet stage2 and URLs take as is).
fn new_token() -> Option<String> {
    let mut bytes = [0u8; 32];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => Some(hex::encode(bytes)),
        Err(e) => {
            tracing::error!("cannot get random bytes for a provisioning token: {e}");
            None
        }
    }
}

pub struct StatusStore {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    state_file: Option<PathBuf>,
    persist_wake: Notify,
    persist_urgent: AtomicBool,
}

impl StatusStore {
    /// A store persisted to `state_file` (when given), restoring what an earlier run wrote there.
    /// A missing file is a first start; an unreadable one is logged and ignored (statuses start
    /// over at Pending rather than the daemon refusing to serve).
    pub fn open(state_file: Option<PathBuf>) -> Arc<StatusStore> {
        let mut inner = Inner::default();
        if let Some(path) = &state_file {
            match read_state(path) {
                Ok(Some(state)) => {
                    tracing::info!(file = %path.display(), machines = state.machines.len(), "restored machine status");
                    inner.restored = state.machines.into_iter().collect();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(file = %path.display(), "ignoring the state file: {e:#}"),
            }
        }
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL);
        Arc::new(StatusStore {
            inner: Mutex::new(inner),
            changes,
            state_file,
            persist_wake: Notify::new(),
            persist_urgent: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Receives every change made after this call.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Every machine, by name.
    pub fn snapshot(&self) -> Vec<MachineStatus> {
        self.lock().machines.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<MachineStatus> {
        self.lock().machines.get(name).cloned()
    }

    /// `3 machines: 1 imaging 42%, 2 ready`.
    pub fn summary(&self) -> String {
        summary(self.lock().machines.values())
    }

    /// Makes the table follow the inventory: new machines are added (with the phase restored
    /// from the state file, else Pending), removed ones are dropped, changed addresses updated.
    pub fn sync_inventory(&self, inventory: &HashMap<MacAddr, Machine>) {
        let mut changes = Vec::new();
        {
            let mut guard = self.lock();
            // Through a plain reference, so that machines and credentials borrow separately.
            let inner = &mut *guard;
            let wanted: HashMap<&str, &Machine> =
                inventory.values().map(|m| (m.name.as_str(), m)).collect();
            let gone: Vec<String> = inner
                .machines
                .keys()
                .filter(|name| !wanted.contains_key(name.as_str()))
                .cloned()
                .collect();
            for name in gone {
                inner.credentials.remove(&name);
                inner.leases.remove(&name);
                if let Some(status) = inner.machines.remove(&name) {
                    changes.push(Change::Removed(status));
                }
            }
            for machine in inventory.values() {
                match inner.machines.get_mut(&machine.name) {
                    Some(status) if status.mac == machine.mac => {
                        if status.ip != machine.ip {
                            let before = status.clone();
                            status.ip = machine.ip;
                            changes.push(Change::Updated {
                                before,
                                after: status.clone(),
                            });
                        }
                    }
                    Some(status) => {
                        // Same name, other hardware: a new machine as far as provisioning goes.
                        let before = status.clone();
                        *status = MachineStatus::pending(machine);
                        inner.leases.remove(&machine.name);
                        let reimage = inner
                            .credentials
                            .remove(&machine.name)
                            .and_then(|c| c.reimage);
                        inner.credentials.insert(
                            machine.name.clone(),
                            Credentials {
                                reimage,
                                ..Credentials::default()
                            },
                        );
                        changes.push(Change::Updated {
                            before,
                            after: status.clone(),
                        });
                    }
                    None => {
                        let mut status = MachineStatus::pending(machine);
                        if let Some(stored) = inner.restored.remove(&machine.name) {
                            let same_hardware =
                                stored.mac_address.parse::<MacAddr>() == Ok(machine.mac);
                            if same_hardware {
                                status.phase = stored.phase;
                                status.progress = stored.progress.min(100);
                                status.message = stored.message;
                                status.last_seen_usec = stored.last_seen_usec;
                                status.user_data_replayed_usec = stored.user_data_replayed_usec;
                            }
                            let token_sha256 = stored
                                .token_sha256
                                .as_deref()
                                .and_then(|h| hex::decode(h).ok())
                                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                                .filter(|_| same_hardware);
                            inner.credentials.insert(
                                machine.name.clone(),
                                Credentials {
                                    token_sha256,
                                    user_data_served: same_hardware && stored.user_data_served,
                                    reimage: stored.reimage,
                                },
                            );
                        }
                        inner.machines.insert(machine.name.clone(), status.clone());
                        changes.push(Change::Added(status));
                    }
                }
            }
        }
        self.publish(changes);
    }

    /// A boot server did something for `machine`: it was seen, and DHCP or an iPXE script means
    /// it is PXE booting unless it is further along (an imaged machine's own OS also does DHCP,
    /// stage2 does DHCP while imaging). A failed machine that boots again is retrying.
    pub fn observe(&self, machine: &Machine, event: &BootEvent) {
        if *event == BootEvent::DhcpAcked {
            self.lease_acked(&machine.name, Instant::now());
        }
        let now = now_usec();
        let entering = match event {
            BootEvent::DhcpOffered => Some("DHCP offer sent"),
            BootEvent::DhcpAcked => Some("DHCP lease acknowledged"),
            BootEvent::IpxeScriptServed => Some("iPXE script served"),
            _ => None,
        };
        self.update(&machine.name, |status| {
            if now >= status.last_seen_usec + LAST_SEEN_RESOLUTION_USEC {
                status.last_seen_usec = now;
            }
            if let Some(message) = entering {
                if matches!(status.phase, Phase::Pending | Phase::Failed) {
                    status.phase = Phase::PxeBooting;
                    status.progress = 0;
                    status.message = message.to_string();
                }
            }
        });
    }

    /// Records a report about the machine called `name` (stage2's progress, the cluster).
    pub fn report(&self, name: &str, report: Report) -> Result<(), UnknownMachine> {
        let now = now_usec();
        let found = self.update(name, |status| {
            status.last_seen_usec = now;
            match report {
                Report::Imaging { progress, message } => {
                    status.phase = Phase::Imaging;
                    status.progress = progress.min(100);
                    status.message = message;
                }
                Report::Imaged => {
                    status.phase = Phase::Imaged;
                    status.progress = 100;
                    status.message = "image written and verified".to_string();
                }
                Report::Joining => {
                    status.phase = Phase::Joining;
                    status.message = "joining the cluster".to_string();
                }
                Report::Ready => {
                    status.phase = Phase::Ready;
                    status.message = "node is Ready".to_string();
                }
                Report::Failed { message } => {
                    status.phase = Phase::Failed;
                    status.message = message;
                }
            }
        });
        if found {
            Ok(())
        } else {
            Err(UnknownMachine(name.to_string()))
        }
    }

    /// Sets the status message of the machine called `name`, its phase unchanged (a problem
    /// the machine's next retry may not meet).
    pub fn set_message(&self, name: &str, message: String) {
        self.update(name, |status| status.message = message);
    }

    /// Starts a new provisioning of `machine` (its imaging script is being served): a fresh
    /// token, whose sha256 replaces the previous one (which stops working), user-data not yet
    /// served, phase PXEBooting. Returns the token; only its hash is kept. `None` for a machine
    /// the store does not know, or without randomness. Tests only: netboot goes through
    /// [`Self::imaging_token`], which binds the token to the machine's address and DHCP cycle.
    #[cfg(test)]
    pub fn start_imaging(&self, machine: &Machine) -> Option<String> {
        let token = new_token()?;
        {
            let mut inner = self.lock();
            if !inner.machines.contains_key(&machine.name) {
                return None;
            }
            let credentials = inner.credentials.entry(machine.name.clone()).or_default();
            credentials.token_sha256 = Some(token_hash(&token));
            credentials.user_data_served = false;
            if let Some(lease) = inner.leases.get_mut(&machine.name) {
                lease.minted = None;
            }
        }
        self.provisioning_started(machine);
        Some(token)
    }

    /// A new token was minted for `machine`: phase PXEBooting, the state file written at once.
    fn provisioning_started(&self, machine: &Machine) {
        let now = now_usec();
        self.update(&machine.name, |status| {
            status.last_seen_usec = now;
            status.phase = Phase::PxeBooting;
            status.progress = 0;
            status.message = "imaging script served: booting stage2".to_string();
            // A new token: the old one's replays are history.
            status.user_data_replayed_usec = 0;
        });
        self.persist_now();
        tracing::info!(machine = %machine.name, mac = %machine.mac, ip = %machine.ip, "provisioning token issued");
    }

    /// netboot acknowledged the DHCP lease of the machine called `name` at `at`: a new DHCP
    /// cycle, in which its next script request may be given a token. The previous cycle's
    /// token text is forgotten (the token itself keeps working until another one is minted).
    fn lease_acked(&self, name: &str, at: Instant) {
        let mut inner = self.lock();
        if !inner.machines.contains_key(name) {
            return;
        }
        let lease = inner.leases.entry(name.to_string()).or_default();
        lease.cycle += 1;
        lease.acked_at = Some(at);
        lease.minted = None;
    }

    /// Whether a request from `peer` may be given `name`'s imaging script now: it comes from
    /// the machine's reserved address, within `window` after the DHCP ACK of its current cycle.
    fn check_script(
        inner: &mut Inner,
        name: &str,
        peer: IpAddr,
        window: Duration,
        now: Instant,
    ) -> Result<(), Refusal> {
        let Some(status) = inner.machines.get(name) else {
            return Err(Refusal::UnknownMachine);
        };
        if !from_reservation(status.ip, peer) {
            return Err(Refusal::WrongPeer {
                machine: name.to_string(),
                peer: canonical_peer(peer),
            });
        }
        let lease = inner.leases.entry(name.to_string()).or_default();
        let recent = lease
            .acked_at
            .is_some_and(|at| now.saturating_duration_since(at) <= window);
        if !recent {
            // The cycle's window is over: its token text is no longer needed.
            lease.minted = None;
            return Err(Refusal::NoRecentLease {
                machine: name.to_string(),
                window_secs: window.as_secs(),
            });
        }
        Ok(())
    }

    /// Whether `machine`'s imaging script may be served to `peer` now, without minting or
    /// changing anything (a HEAD request).
    pub fn check_imaging_script(
        &self,
        machine: &Machine,
        peer: IpAddr,
        window: Duration,
    ) -> Result<(), Refusal> {
        Self::check_script(
            &mut self.lock(),
            &machine.name,
            peer,
            window,
            Instant::now(),
        )
    }

    /// The provisioning token for `machine`'s imaging script, asked for by `peer`: only from
    /// the machine's reserved address and within `window` after its last DHCP ACK (see the
    /// module documentation). The first request of a DHCP cycle starts a new provisioning (a
    /// fresh token, as [`Self::start_imaging`]); a repeated request of the same cycle gets the
    /// same token and changes nothing.
    pub fn imaging_token(
        &self,
        machine: &Machine,
        peer: IpAddr,
        window: Duration,
    ) -> Result<String, Refusal> {
        self.imaging_token_at(machine, peer, window, Instant::now())
    }

    /// [`Self::imaging_token`] at `now`.
    pub(crate) fn imaging_token_at(
        &self,
        machine: &Machine,
        peer: IpAddr,
        window: Duration,
        now: Instant,
    ) -> Result<String, Refusal> {
        let name = machine.name.as_str();
        let fresh = new_token();
        let token = {
            let mut guard = self.lock();
            Self::check_script(&mut guard, name, peer, window, now)?;
            let inner = &mut *guard;
            let credentials = inner.credentials.entry(name.to_string()).or_default();
            let lease = inner.leases.entry(name.to_string()).or_default();
            if let Some((cycle, token)) = &lease.minted {
                // Same cycle and still the live token (no reimage since): give it again.
                if *cycle == lease.cycle && credentials.token_sha256 == Some(token_hash(token)) {
                    return Ok(token.to_string());
                }
            }
            let Some(token) = fresh else {
                return Err(Refusal::Unavailable {
                    machine: name.to_string(),
                    reason: "no random bytes for a provisioning token".to_string(),
                });
            };
            credentials.token_sha256 = Some(token_hash(&token));
            credentials.user_data_served = false;
            lease.minted = Some((lease.cycle, Zeroizing::new(token.clone())));
            token
        };
        self.provisioning_started(machine);
        Ok(token)
    }

    /// A name for the current provisioning of the machine called `name` (16 hex digits), stable
    /// until its next imaging: what resources made for one provisioning (the kubeadm bootstrap
    /// token Secret) are labelled with. Derived from the token's hash, so it tells nothing
    /// about the token. `None` while no provisioning token has been issued.
    pub fn provisioning_id(&self, name: &str) -> Option<String> {
        use sha2::Digest;
        let hash = self.lock().credentials.get(name)?.token_sha256?;
        let mut digest = sha2::Sha256::new();
        digest.update(b"provisioning:");
        digest.update(hash);
        Some(hex::encode(&digest.finalize()[..8]))
    }

    /// Whether `token` is the current token of the machine called `name`.
    fn holds(inner: &Inner, name: &str, token: &str) -> bool {
        // Comparing digests, not the secret itself: timing reveals nothing about the token.
        inner.credentials.get(name).and_then(|c| c.token_sha256) == Some(token_hash(token))
    }

    /// The name of the machine whose current token is `token`.
    fn holder(inner: &Inner, token: &str) -> Option<String> {
        let hash = token_hash(token);
        inner
            .credentials
            .iter()
            .find(|(_, c)| c.token_sha256 == Some(hash))
            .map(|(name, _)| name.clone())
    }

    /// stage2's report on the machine called `name`, accepted only from its reserved address,
    /// with its current token and in a phase where it makes sense: while PXE booting, imaging or failed (stage2 retries),
    /// and a repeated `imaged` once imaged. The installed system's cloud-init reports
    /// `joining` (and `failed` when the join fails) once imaged or joining.
    pub fn imaging_report(
        &self,
        name: &str,
        peer: IpAddr,
        token: &str,
        report: ProgressReport,
    ) -> Result<(), Refusal> {
        {
            let inner = self.lock();
            let Some(status) = inner.machines.get(name) else {
                return Err(Refusal::UnknownMachine);
            };
            if !from_reservation(status.ip, peer) {
                return Err(Refusal::WrongPeer {
                    machine: name.to_string(),
                    peer: canonical_peer(peer),
                });
            }
            if !Self::holds(&inner, name, token) {
                return Err(Refusal::WrongToken {
                    machine: Some(name.to_string()),
                });
            }
            let accepted = matches!(
                (&report, status.phase),
                (
                    ProgressReport::Imaging { .. }
                        | ProgressReport::Imaged { .. }
                        | ProgressReport::Failed { .. },
                    Phase::PxeBooting | Phase::Imaging | Phase::Failed
                ) | (ProgressReport::Imaged { .. }, Phase::Imaged)
                    | (
                        ProgressReport::Joining { .. } | ProgressReport::Failed { .. },
                        Phase::Imaged | Phase::Joining
                    )
            );
            if !accepted {
                return Err(Refusal::WrongPhase {
                    machine: name.to_string(),
                    phase: status.phase.to_string(),
                    what: "report",
                });
            }
        }
        let report = match report {
            ProgressReport::Imaging {
                progress,
                bytes,
                rate,
                message,
            } => Report::Imaging {
                progress,
                message: imaging_message(bytes, rate, message),
            },
            ProgressReport::Imaged { .. } => Report::Imaged,
            ProgressReport::Failed { message } => Report::Failed { message },
            ProgressReport::Joining { .. } => Report::Joining,
        };
        self.report(name, report)
            .map_err(|_| Refusal::UnknownMachine)
    }

    /// The machine holding `token` (for cloud-init's meta-data), asked for from `peer`: only
    /// from the machine's reserved address.
    pub fn token_holder(&self, token: &str, peer: IpAddr) -> Result<MachineStatus, Refusal> {
        let inner = self.lock();
        let status = Self::holder(&inner, token)
            .and_then(|name| inner.machines.get(&name).cloned())
            .ok_or(Refusal::WrongToken { machine: None })?;
        Self::peer_is_holder(&status, peer)?;
        Ok(status)
    }

    fn peer_is_holder(status: &MachineStatus, peer: IpAddr) -> Result<(), Refusal> {
        if from_reservation(status.ip, peer) {
            Ok(())
        } else {
            Err(Refusal::WrongPeer {
                machine: status.name.clone(),
                peer: canonical_peer(peer),
            })
        }
    }

    /// Whether the holder of `token` may fetch its user-data now from `peer` (its reserved
    /// address; imaged, not yet served), without spending the fetch: checked before anything
    /// is asked of the cluster. A replay is refused, logged and recorded as
    /// [`Self::take_user_data`] does.
    pub fn check_user_data(&self, token: &str, peer: IpAddr) -> Result<MachineStatus, Refusal> {
        self.user_data_gate(token, peer, false)
    }

    /// cloud-init's user-data fetch: allowed once per token, from the machine's reserved
    /// address, once the machine is imaged. A second fetch is refused, logged and recorded as
    /// the machine's message and [`MachineStatus::user_data_replayed_usec`] (until the next
    /// provisioning). A fetch from another address is refused and spends nothing.
    pub fn take_user_data(&self, token: &str, peer: IpAddr) -> Result<MachineStatus, Refusal> {
        self.user_data_gate(token, peer, true)
    }

    fn user_data_gate(
        &self,
        token: &str,
        peer: IpAddr,
        spend: bool,
    ) -> Result<MachineStatus, Refusal> {
        let (name, replay) = {
            let mut inner = self.lock();
            let Some(name) = Self::holder(&inner, token) else {
                return Err(Refusal::WrongToken { machine: None });
            };
            let Some(status) = inner.machines.get(&name).cloned() else {
                return Err(Refusal::WrongToken { machine: None });
            };
            Self::peer_is_holder(&status, peer)?;
            let credentials = inner.credentials.entry(name.clone()).or_default();
            if credentials.user_data_served {
                (name, true)
            } else if !matches!(status.phase, Phase::Imaged | Phase::Joining) {
                return Err(Refusal::WrongPhase {
                    machine: name,
                    phase: status.phase.to_string(),
                    what: "user-data",
                });
            } else if !spend {
                return Ok(status);
            } else {
                credentials.user_data_served = true;
                (name, false)
            }
        };
        let now = now_usec();
        let message = if replay {
            "user-data requested again with a used token: refused"
        } else {
            "cloud-init user-data served"
        };
        self.update(&name, |status| {
            status.last_seen_usec = now;
            status.message = message.to_string();
            if replay {
                status.user_data_replayed_usec = now;
            }
        });
        self.persist_now();
        if replay {
            if let Some(status) = self.get(&name).filter(|_| REPLAY_LOG.allow()) {
                tracing::warn!(machine = %status.name, mac = %status.mac, ip = %status.ip, phase = %status.phase, "user-data requested again with an already used token: refused");
            }
            return Err(Refusal::Replayed { machine: name });
        }
        self.get(&name).ok_or(Refusal::WrongToken { machine: None })
    }

    /// Follows `spec.reimage` (machine name → value): a value other than the last one seen is
    /// a reimage request. The machine goes back to Pending (its next PXE boot images it again)
    /// and its token stops working. A machine still Pending has nothing to undo: the value is
    /// only recorded. A value that disappears changes nothing.
    pub fn sync_reimage(&self, requests: &HashMap<String, String>) {
        let mut reset = Vec::new();
        let mut recorded = false;
        {
            let mut inner = self.lock();
            for (name, value) in requests {
                let Some(phase) = inner.machines.get(name).map(|s| s.phase) else {
                    continue;
                };
                let credentials = inner.credentials.entry(name.clone()).or_default();
                if credentials.reimage.as_deref() == Some(value.as_str()) {
                    continue;
                }
                recorded = true;
                if phase == Phase::Pending {
                    credentials.reimage = Some(value.clone());
                } else {
                    *credentials = Credentials {
                        reimage: Some(value.clone()),
                        ..Credentials::default()
                    };
                    if let Some(lease) = inner.leases.get_mut(name) {
                        lease.minted = None;
                    }
                    reset.push((name.clone(), value.clone()));
                }
            }
        }
        for (name, value) in reset {
            self.update(&name, |status| {
                status.phase = Phase::Pending;
                status.progress = 0;
                status.message = format!("reimage requested (spec.reimage {value:?})");
                status.user_data_replayed_usec = 0;
            });
        }
        if recorded {
            self.persist_now();
        }
    }

    /// Asks the persister to write the state file at once (credentials changed, which is not
    /// a phase change).
    fn persist_now(&self) {
        self.persist_urgent.store(true, Ordering::Release);
        self.persist_wake.notify_one();
    }

    /// Applies `change` to the machine called `name`; false if there is none.
    fn update(&self, name: &str, change: impl FnOnce(&mut MachineStatus)) -> bool {
        let published = {
            let mut inner = self.lock();
            let Some(status) = inner.machines.get_mut(name) else {
                return false;
            };
            let before = status.clone();
            change(status);
            if *status == before {
                return true;
            }
            Change::Updated {
                before,
                after: status.clone(),
            }
        };
        self.publish(vec![published]);
        true
    }

    fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut urgent = false;
        for change in changes {
            match &change {
                Change::Updated { before, after } if before.phase != after.phase => {
                    urgent = true;
                    log_phase_change(Some(before.phase), after);
                }
                Change::Updated { .. } => {}
                Change::Added(status) => {
                    urgent = true;
                    // A machine restored mid-provisioning says so; a new one is Pending.
                    log_phase_change(None, status);
                }
                Change::Removed(status) => {
                    urgent = true;
                    tracing::info!(machine = %status.name, mac = %status.mac, ip = %status.ip, phase = %status.phase, "machine left the inventory");
                }
            }
            // No subscriber (yet) is fine: they read a snapshot when they start.
            let _ = self.changes.send(change);
        }
        if urgent {
            self.persist_urgent.store(true, Ordering::Release);
        }
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

/// The status message of an imaging report: stage2's own words, else its rate and bytes.
fn imaging_message(bytes: Option<u64>, rate: Option<u64>, message: Option<String>) -> String {
    if let Some(message) = message.filter(|m| !m.is_empty()) {
        return message;
    }
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    match (bytes, rate) {
        (Some(b), Some(r)) => format!("{:.0} MiB written, {:.1} MiB/s", mib(b), mib(r)),
        (Some(b), None) => format!("{:.0} MiB written", mib(b)),
        (None, Some(r)) => format!("writing the image, {:.1} MiB/s", mib(r)),
        (None, None) => "writing the image".to_string(),
    }
}

/// One journald record per phase change, found by `journalctl MESSAGE_ID=…` or `MACHINE=…`.
fn log_phase_change(before: Option<Phase>, status: &MachineStatus) {
    let from = before.map_or("new", Phase::as_str);
    let detail = if status.message.is_empty() {
        String::new()
    } else {
        format!(": {}", status.message)
    };
    tracing::info!(
        message_id = status.phase.message_id(),
        machine = %status.name,
        mac = %status.mac,
        ip = %status.ip,
        phase = status.phase.as_str(),
        previous_phase = from,
        progress = status.progress,
        "{} {from} -> {}{detail}",
        status.name,
        status.phase
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(name: &str, last: u8) -> Machine {
        Machine {
            name: name.to_string(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, last]),
            ip: Ipv4Addr::new(10, 77, 0, last),
            hostname: None,
        }
    }

    fn inventory(machines: &[Machine]) -> HashMap<MacAddr, Machine> {
        machines.iter().map(|m| (m.mac, m.clone())).collect()
    }

    fn drain(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
        let mut out = Vec::new();
        while let Ok(c) = rx.try_recv() {
            out.push(c);
        }
        out
    }

    #[test]
    fn inventory_adds_and_removes_machines() {
        let store = StatusStore::open(None);
        let mut rx = store.subscribe();
        let (a, b) = (machine("a", 2), machine("b", 3));
        store.sync_inventory(&inventory(&[a.clone(), b.clone()]));
        let added = drain(&mut rx);
        assert_eq!(added.len(), 2);
        assert!(added
            .iter()
            .all(|c| matches!(c, Change::Added(s) if s.phase == Phase::Pending)));
        store.sync_inventory(&inventory(std::slice::from_ref(&b)));
        let removed = drain(&mut rx);
        assert!(
            matches!(&removed[..], [Change::Removed(s)] if s.name == "a"),
            "{removed:?}"
        );
        assert_eq!(store.snapshot().len(), 1);
        // Unchanged inventory: nothing to say.
        store.sync_inventory(&inventory(&[b]));
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn boot_events_move_pending_and_failed_machines_to_pxe_booting_only() {
        let store = StatusStore::open(None);
        let a = machine("a", 2);
        store.sync_inventory(&inventory(std::slice::from_ref(&a)));
        let mut rx = store.subscribe();
        store.observe(&a, &BootEvent::DhcpReleased);
        assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Pending));
        let seen = store.get("a").map(|s| s.last_seen_usec).unwrap_or(0);
        assert!(seen > 0, "any event marks the machine seen");

        store.observe(&a, &BootEvent::DhcpOffered);
        let now = store.get("a").expect("a");
        assert_eq!(now.phase, Phase::PxeBooting);
        assert_eq!(now.message, "DHCP offer sent");
        let changes = drain(&mut rx);
        assert!(changes
            .iter()
            .any(|c| matches!(c, Change::Updated { before, after }
            if before.phase == Phase::Pending && after.phase == Phase::PxeBooting)));

        // Further PXE traffic while booting changes nothing (same second: not even last_seen).
        store.observe(&a, &BootEvent::DhcpAcked);
        store.observe(&a, &BootEvent::IpxeScriptServed);
        assert!(drain(&mut rx).is_empty());

        store
            .report(
                "a",
                Report::Imaging {
                    progress: 42,
                    message: "120 MB/s".into(),
                },
            )
            .expect("known");
        store.observe(&a, &BootEvent::DhcpOffered);
        assert_eq!(
            store.get("a").map(|s| s.phase),
            Some(Phase::Imaging),
            "stage2's own DHCP does not undo imaging"
        );
        store
            .report(
                "a",
                Report::Failed {
                    message: "sha256 mismatch".into(),
                },
            )
            .expect("known");
        let failed = store.get("a").expect("a");
        assert_eq!(
            (failed.phase, failed.progress, failed.message.as_str()),
            (Phase::Failed, 42, "sha256 mismatch")
        );
        store.observe(&a, &BootEvent::IpxeScriptServed);
        assert_eq!(
            store.get("a").map(|s| s.phase),
            Some(Phase::PxeBooting),
            "a failed machine that boots again is retrying"
        );
        store.report("a", Report::Imaged).expect("known");
        store.observe(&a, &BootEvent::DhcpAcked);
        assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Imaged));
        assert_eq!(
            store.report("zz", Report::Ready),
            Err(UnknownMachine("zz".into()))
        );
    }

    #[test]
    fn progress_is_clamped_and_summarised() {
        let store = StatusStore::open(None);
        let ms = [machine("a", 2), machine("b", 3), machine("c", 4)];
        store.sync_inventory(&inventory(&ms));
        assert_eq!(store.summary(), "3 machines: 3 pending");
        store
            .report(
                "a",
                Report::Imaging {
                    progress: 200,
                    message: String::new(),
                },
            )
            .expect("known");
        assert_eq!(store.get("a").map(|s| s.progress), Some(100));
        store
            .report(
                "a",
                Report::Imaging {
                    progress: 42,
                    message: String::new(),
                },
            )
            .expect("known");
        store.report("b", Report::Ready).expect("known");
        store.report("c", Report::Ready).expect("known");
        assert_eq!(store.summary(), "3 machines: 1 imaging 42%, 2 ready");
        store
            .report(
                "b",
                Report::Imaging {
                    progress: 10,
                    message: String::new(),
                },
            )
            .expect("known");
        assert_eq!(store.summary(), "3 machines: 2 imaging 26%, 1 ready");
        let counts = PhaseCounts::of(&store.snapshot());
        assert_eq!(
            (
                counts.total,
                counts.get(Phase::Imaging),
                counts.get(Phase::Ready)
            ),
            (3, 2, 1)
        );
        assert_eq!(summary(&[]), "0 machines");
        assert_eq!(
            summary(&[MachineStatus::pending(&machine("x", 9))]),
            "1 machine: 1 pending"
        );
    }

    #[tokio::test]
    async fn a_restart_resumes_from_the_state_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.yaml");
        let (a, b) = (machine("a", 2), machine("b", 3));
        let shutdown = CancellationToken::new();
        let store = StatusStore::open(Some(path.clone()));
        let writer = tokio::spawn(store.clone().persist(shutdown.clone()));
        store.sync_inventory(&inventory(&[a.clone(), b.clone()]));
        store
            .report(
                "a",
                Report::Imaging {
                    progress: 42,
                    message: "writing".into(),
                },
            )
            .expect("known");
        store
            .report(
                "b",
                Report::Failed {
                    message: "no disk".into(),
                },
            )
            .expect("known");
        // Phase changes reach the disk without waiting for shutdown.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.contains("no disk") && text.contains("Imaging") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "state file not written: {text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        writer.await.expect("writer");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");

        // b got new hardware while we were down: it starts over.
        let b_new = Machine {
            mac: MacAddr([0x52, 0x54, 0, 0, 1, 3]),
            ..b
        };
        let again = StatusStore::open(Some(path.clone()));
        again.sync_inventory(&inventory(&[a, b_new]));
        let a = again.get("a").expect("a");
        assert_eq!(
            (a.phase, a.progress, a.message.as_str()),
            (Phase::Imaging, 42, "writing")
        );
        assert!(a.last_seen_usec > 0);
        assert_eq!(again.get("b").map(|s| s.phase), Some(Phase::Pending));
    }

    /// A replayed user-data fetch is kept (state file included) until the next provisioning.
    #[tokio::test]
    async fn a_user_data_replay_is_recorded_until_the_next_provisioning() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.yaml");
        let a = machine("a", 2);
        let shutdown = CancellationToken::new();
        let store = StatusStore::open(Some(path.clone()));
        let writer = tokio::spawn(store.clone().persist(shutdown.clone()));
        store.sync_inventory(&inventory(std::slice::from_ref(&a)));
        let token = store.start_imaging(&a).expect("token");
        store.report("a", Report::Imaged).expect("known");
        let peer = IpAddr::V4(a.ip);
        store
            .take_user_data(&token, peer)
            .expect("first fetch served");
        assert_eq!(store.get("a").map(|s| s.user_data_replayed_usec), Some(0));
        let before = now_usec();
        assert_eq!(
            store.check_user_data(&token, peer),
            Err(Refusal::Replayed {
                machine: "a".into()
            })
        );
        let replayed = store.get("a").expect("a").user_data_replayed_usec;
        assert!(replayed >= before, "{replayed} < {before}");
        shutdown.cancel();
        writer.await.expect("writer");
        let text = std::fs::read_to_string(&path).expect("state file");
        assert!(
            text.contains(&format!("userDataReplayedUsec: {replayed}")),
            "{text}"
        );

        let again = StatusStore::open(Some(path));
        again.sync_inventory(&inventory(std::slice::from_ref(&a)));
        assert_eq!(
            again.get("a").map(|s| s.user_data_replayed_usec),
            Some(replayed)
        );
        again.start_imaging(&a).expect("new provisioning");
        assert_eq!(again.get("a").map(|s| s.user_data_replayed_usec), Some(0));
    }

    #[test]
    fn a_corrupt_state_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, "machines: [not, a, map").expect("write");
        let store = StatusStore::open(Some(path));
        store.sync_inventory(&inventory(&[machine("a", 2)]));
        assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Pending));
    }

    #[test]
    fn message_ids_are_distinct_128_bit_hex() {
        let mut ids: Vec<&str> = Phase::ALL.iter().map(|p| p.message_id()).collect();
        assert!(ids
            .iter()
            .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), Phase::ALL.len());
    }
}
