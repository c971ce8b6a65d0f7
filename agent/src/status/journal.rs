//! The journald records of the status store.

use super::phase::{MachineStatus, Phase};

/// One journald record per phase change, found by `journalctl MESSAGE_ID=…` or `MACHINE=…`.
pub(super) fn log_phase_change(before: Option<Phase>, status: &MachineStatus) {
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
