//! The store: the table of machine statuses, the one place phases change, and the broadcast of
//! every change to subscribers (D-Bus, `STATUS=`, the cluster controller).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use netboot::{BootEvent, MacAddr, Machine};
use tokio::sync::{broadcast, Notify};

use super::credentials::{Credentials, Lease};
use super::journal;
use super::phase::{summary, MachineStatus, Phase};
use super::state_file::{restore, StoredMachine};

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

/// `last_seen` only counts as a change (signal, state file write) when it moved this much, so a
/// DHCP exchange's four packets are one update, not four.
const LAST_SEEN_RESOLUTION_USEC: u64 = 1_000_000;
/// Enough for a burst of changes to all 1000 machines of a large inventory between two polls.
const CHANGE_CHANNEL: usize = 4096;

pub(super) fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Default)]
pub(super) struct Inner {
    pub(super) machines: BTreeMap<String, MachineStatus>,
    /// Read from the state file at start, used when the inventory names the machine.
    pub(super) restored: HashMap<String, StoredMachine>,
    /// Per machine name: the current provisioning's credentials.
    pub(super) credentials: HashMap<String, Credentials>,
    /// Per machine name: its DHCP cycles (memory only).
    pub(super) leases: HashMap<String, Lease>,
}

pub struct StatusStore {
    pub(super) inner: Mutex<Inner>,
    pub(super) changes: broadcast::Sender<Change>,
    pub(super) state_file: Option<PathBuf>,
    pub(super) persist_wake: Notify,
    pub(super) persist_urgent: AtomicBool,
}

impl StatusStore {
    /// A store persisted to `state_file` (when given), restoring what an earlier run wrote there.
    /// A missing file is a first start; an unreadable one is logged and ignored (statuses start
    /// over at Pending rather than the daemon refusing to serve).
    pub fn open(state_file: Option<PathBuf>) -> Arc<StatusStore> {
        let inner = Inner {
            restored: state_file.as_deref().map(restore).unwrap_or_default(),
            ..Inner::default()
        };
        let (changes, _) = broadcast::channel(CHANGE_CHANNEL);
        Arc::new(StatusStore {
            inner: Mutex::new(inner),
            changes,
            state_file,
            persist_wake: Notify::new(),
            persist_urgent: AtomicBool::new(false),
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
                        let status = match inner.restored.remove(&machine.name) {
                            Some(stored) => {
                                let (status, credentials) = stored.restore(machine);
                                inner.credentials.insert(machine.name.clone(), credentials);
                                status
                            }
                            None => MachineStatus::pending(machine),
                        };
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
        // A DHCP ACK, or in proxy mode the answer to the machine's iPXE (the ACK is the LAN
        // server's), starts the window in which its imaging script may be fetched.
        if matches!(event, BootEvent::DhcpAcked | BootEvent::ProxyScriptOffered) {
            self.lease_acked(&machine.name, Instant::now());
        }
        let now = now_usec();
        let entering = match event {
            BootEvent::DhcpOffered => Some("DHCP offer sent"),
            BootEvent::DhcpAcked => Some("DHCP lease acknowledged"),
            BootEvent::ProxyOffered => Some("ProxyDHCP boot offer sent"),
            BootEvent::ProxyScriptOffered => Some("ProxyDHCP offer sent to iPXE"),
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

    /// Applies `change` to the machine called `name`; false if there is none.
    pub(super) fn update(&self, name: &str, change: impl FnOnce(&mut MachineStatus)) -> bool {
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

    pub(super) fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let mut urgent = false;
        for change in changes {
            match &change {
                Change::Updated { before, after } if before.phase != after.phase => {
                    urgent = true;
                    journal::phase_changed(Some(before.phase), after);
                }
                Change::Updated { .. } => {}
                Change::Added(status) => {
                    urgent = true;
                    // A machine restored mid-provisioning says so; a new one is Pending.
                    journal::phase_changed(None, status);
                }
                Change::Removed(status) => {
                    urgent = true;
                    journal::left_inventory(status);
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
}
