//! The live table of machines the servers read from, fed by either inventory source.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use netboot::{BootEvent, MacAddr, Machine, MachineLookup};

use super::{ImagingSpec, Snapshot};
use crate::status::StatusStore;

/// The live table the servers read from; swapped whole on every reload.
#[derive(Default)]
pub struct Table {
    machines: RwLock<Arc<HashMap<MacAddr, Machine>>>,
    /// The served Machines' own image and disk hints, by name ([`Snapshot::imaging`]).
    imaging: RwLock<Arc<HashMap<String, ImagingSpec>>>,
    /// Follows the table (machines added and removed) and the boot events of its machines.
    status: Option<Arc<StatusStore>>,
}

impl Table {
    pub fn with_status(status: Arc<StatusStore>) -> Table {
        Table {
            machines: RwLock::default(),
            imaging: RwLock::default(),
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

    /// Sets the served Machines' own image and disk hints.
    pub fn set_imaging(&self, imaging: HashMap<String, ImagingSpec>) {
        let mut guard = self
            .imaging
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *guard = Arc::new(imaging);
    }

    /// `name`'s own image and disk hints, if its Machine gives any.
    pub fn imaging_of(&self, name: &str) -> Option<ImagingSpec> {
        self.imaging
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(name)
            .cloned()
    }

    /// Whether any served Machine has an image of its own.
    pub fn any_own_image(&self) -> bool {
        self.imaging
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .any(|i| i.image.is_some())
    }

    /// Serves `snapshot`'s machines, and follows its reimage requests.
    pub fn load(&self, snapshot: &Snapshot) {
        self.set_imaging(snapshot.imaging.clone());
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

    pub fn is_empty(&self) -> bool {
        self.all().is_empty()
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
