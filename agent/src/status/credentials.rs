//! The provisioning credentials: each machine's token, bound to the machine (see the module
//! documentation of `status`), its DHCP cycles, and the user-data gate.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use netboot::provisioning::{canonical_peer, ProgressReport, Refusal};
use netboot::Machine;
use zeroize::Zeroizing;

use super::journal;
use super::phase::{MachineStatus, Phase};
use super::store::{now_usec, Inner, Report, StatusStore};

/// A machine's DHCP cycles, kept in memory only.
#[derive(Default)]
pub(super) struct Lease {
    /// ACKs sent to the machine since netboot started: the number of the current cycle.
    pub(super) cycle: u64,
    /// When the current cycle's ACK was sent.
    pub(super) acked_at: Option<Instant>,
    /// The token minted in cycle `.0`, to give it again to a repeated script request of that
    /// cycle. Wiped when dropped.
    pub(super) minted: Option<(u64, Zeroizing<String>)>,
}

/// Whether `peer` is the reserved address `ip` (an IPv4-mapped IPv6 peer counts as IPv4).
fn from_reservation(ip: Ipv4Addr, peer: IpAddr) -> bool {
    canonical_peer(peer) == IpAddr::V4(ip)
}

/// What authenticates the current provisioning of a machine. Kept apart from
/// [`MachineStatus`], which is published (D-Bus, journald) and must not carry them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Credentials {
    /// sha256 of the token: enough to check one, useless to forge one.
    pub(super) token_sha256: Option<[u8; 32]>,
    pub(super) user_data_served: bool,
    pub(super) reimage: Option<String>,
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

impl StatusStore {
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
        journal::token_issued(machine);
    }

    /// netboot acknowledged the DHCP lease of the machine called `name` at `at` (in proxy
    /// mode: answered its iPXE by ProxyDHCP): a new DHCP cycle, in which its next script
    /// request may be given a token. The previous cycle's token text is forgotten (the token
    /// itself keeps working until another one is minted).
    pub(super) fn lease_acked(&self, name: &str, at: Instant) {
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
    /// fresh token, as `start_imaging`); a repeated request of the same cycle gets the
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
            if let Some(status) = self.get(&name) {
                journal::user_data_replayed(&status);
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
