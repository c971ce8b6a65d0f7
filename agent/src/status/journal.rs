//! The journald records of the status store, one per event of a machine, each with its
//! `MACHINE=`, `MAC=` and `IP=` fields (`journalctl MACHINE=node2`). Phase changes also carry a
//! fixed `MESSAGE_ID=` per phase.

use std::sync::LazyLock;

use netboot::lograte::LogLimit;
use netboot::Machine;

use super::phase::{MachineStatus, Phase};

/// Budget of the per-request warnings about refused user-data fetches (the phase records are
/// never limited).
static REPLAY_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("user-data replay", 1, 20));

/// One record per phase change, found by `journalctl MESSAGE_ID=…` or `MACHINE=…`. `before` is
/// `None` for a machine new to the table (restored mid-provisioning, or Pending).
pub(super) fn phase_changed(before: Option<Phase>, status: &MachineStatus) {
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

pub(super) fn left_inventory(status: &MachineStatus) {
    tracing::info!(machine = %status.name, mac = %status.mac, ip = %status.ip, phase = %status.phase, "machine left the inventory");
}

pub(super) fn token_issued(machine: &Machine) {
    tracing::info!(machine = %machine.name, mac = %machine.mac, ip = %machine.ip, "provisioning token issued");
}

/// A spent token asked for user-data again: rate-limited, since anyone holding an old token can
/// repeat the request.
pub(super) fn user_data_replayed(status: &MachineStatus) {
    if REPLAY_LOG.allow() {
        tracing::warn!(machine = %status.name, mac = %status.mac, ip = %status.ip, phase = %status.phase, "user-data requested again with an already used token: refused");
    }
}
