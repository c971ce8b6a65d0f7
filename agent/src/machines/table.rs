//! The live table of machines the servers read from, fed by either inventory source.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use netboot::{BootEvent, MacAddr, Machine, MachineLookup};

use super::Snapshot;
use crate::status::StatusStore;

/// The live table the servers read from; swapped whole on every reload.
#[derive(Default)]
pub struct Table {
    machines: RwLock<Arc<HashMap<MacAddr, Machine>>>,
    /// Follows the table (machines added and removed) and the boot events of its machines.
    status: Option<Arc<StatusStore>>,
}

impl Table {
    pub fn with_status(status: Arc<StatusStore>) -> Table {
        Table {
            machines: RwLock::default(),
            status: Some(status),
        }
    }

    pub fn replace(&self, machines: HashMap<MacAddr, Machine>) {
        if let Some(status) = &self.status {
            status.sync_inventory(&machines);
        }
        let mut guard = self
            .machines
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Arc::new(machines);
    }

    /// Serves `snapshot`'s machines, and follows its reimage requests.
    pub fn load(&self, snapshot: &Snapshot) {
        self.replace(snapshot.served.clone());
        if let Some(status) = &self.status {
            status.sync_reimage(&snapshot.reimage);
        }
    }

    pub fn all(&self) -> Arc<HashMap<MacAddr, Machine>> {
        self.machines
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn len(&self) -> usize {
        self.all().len()
    }
}

impl MachineLookup for Table {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        self.all().get(mac).cloned()
    }

    fn observe(&self, machine: &Machine, event: BootEvent) {
        // Debug: the server that saw the event logs it (rate-limited); this would be a second,
        // unlimited line per packet.
        tracing::debug!(machine = %machine.name, mac = %machine.mac, ip = %machine.ip, event = ?event, "boot event");
        if let Some(status) = &self.status {
            status.observe(machine, &event);
        }
    }
}
