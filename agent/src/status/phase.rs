//! The phase model: where a machine is in its provisioning, its published status, and the
//! `STATUS=` summary of all machines.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use netboot::{MacAddr, Machine};
use serde::{Deserialize, Serialize};

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
    pub(super) fn pending(machine: &Machine) -> Self {
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
