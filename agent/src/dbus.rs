//! Machine status on the system bus: the name `dev.provisioner.Netboot1`, an
//! `org.freedesktop.DBus.ObjectManager` at `/`, one object per machine under
//! `/dev/provisioner/Netboot1/machine/` with read-only properties that emit `PropertiesChanged`
//! on every change, and a manager object with the number of machines in each phase.
//!
//! D-Bus is a window on the status store, never a reason to stop serving: without a bus (or
//! when the policy does not let us own the name) netboot logs a warning, keeps serving, and
//! tries again later.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use zbus::names::InterfaceName;
use zbus::zvariant::{OwnedObjectPath, Value};
use zbus::{Connection, SignalContext};

use crate::status::{Change, MachineStatus, Phase, PhaseCounts, StatusStore};

pub const BUS_NAME: &str = "dev.provisioner.Netboot1";
pub const MANAGER_PATH: &str = "/dev/provisioner/Netboot1";
pub const MACHINE_INTERFACE: &str = "dev.provisioner.Netboot1.Machine";
pub const MANAGER_INTERFACE: &str = "dev.provisioner.Netboot1.Manager";

const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Object path of a machine: `/dev/provisioner/Netboot1/machine/<name>` with the name escaped as
/// systemd's `sd_bus_path_encode` does (every byte other than `[A-Za-z0-9]`, and a leading digit,
/// becomes `_xx`), so `node-2` is `node_2d2`. Written here because zbus has no such helper; the
/// systemd form is what `busctl` users already know.
pub fn machine_path(name: &str) -> String {
    let mut path = format!("{MANAGER_PATH}/machine/");
    if name.is_empty() {
        path.push('_');
    }
    for (i, b) in name.bytes().enumerate() {
        if b.is_ascii_alphanumeric() && !(i == 0 && b.is_ascii_digit()) {
            path.push(char::from(b));
        } else {
            let _ = write!(path, "_{b:02x}");
        }
    }
    path
}

/// `dev.provisioner.Netboot1.Machine`: one machine of the inventory.
struct MachineObject {
    status: MachineStatus,
}

#[zbus::interface(name = "dev.provisioner.Netboot1.Machine")]
impl MachineObject {
    /// `metadata.name` of the Machine.
    #[zbus(property)]
    fn name(&self) -> String {
        self.status.name.clone()
    }

    #[zbus(property)]
    fn mac_address(&self) -> String {
        self.status.mac.to_string()
    }

    #[zbus(property)]
    fn ip_address(&self) -> String {
        self.status.ip.to_string()
    }

    /// Pending, PXEBooting, Imaging, Imaged, Joining, Ready or Failed.
    #[zbus(property)]
    fn phase(&self) -> String {
        self.status.phase.as_str().to_string()
    }

    /// Percent of the image written, 0-100.
    #[zbus(property)]
    fn progress(&self) -> u32 {
        u32::from(self.status.progress)
    }

    /// What happened last; the reason when Failed.
    #[zbus(property)]
    fn message(&self) -> String {
        self.status.message.clone()
    }

    /// When netboot last heard from the machine, in microseconds since the Unix epoch (0: never).
    #[zbus(property)]
    fn last_seen(&self) -> u64 {
        self.status.last_seen_usec
    }
}

/// The properties of `after` that differ from `before`, as `PropertiesChanged` carries them.
fn changed_machine_properties(
    before: &MachineStatus,
    after: &MachineStatus,
) -> Vec<(&'static str, Value<'static>)> {
    let mut changed = Vec::new();
    if before.name != after.name {
        changed.push(("Name", Value::from(after.name.clone())));
    }
    if before.mac != after.mac {
        changed.push(("MacAddress", Value::from(after.mac.to_string())));
    }
    if before.ip != after.ip {
        changed.push(("IpAddress", Value::from(after.ip.to_string())));
    }
    if before.phase != after.phase {
        changed.push(("Phase", Value::from(after.phase.as_str())));
    }
    if before.progress != after.progress {
        changed.push(("Progress", Value::from(u32::from(after.progress))));
    }
    if before.message != after.message {
        changed.push(("Message", Value::from(after.message.clone())));
    }
    if before.last_seen_usec != after.last_seen_usec {
        changed.push(("LastSeen", Value::from(after.last_seen_usec)));
    }
    changed
}

/// `dev.provisioner.Netboot1.Manager`: how many machines are in each phase.
#[derive(Default)]
struct ManagerObject {
    counts: PhaseCounts,
    summary: String,
}

#[zbus::interface(name = "dev.provisioner.Netboot1.Manager")]
impl ManagerObject {
    /// Number of machines in the inventory.
    #[zbus(property)]
    fn total(&self) -> u32 {
        self.counts.total
    }
    #[zbus(property)]
    fn pending(&self) -> u32 {
        self.counts.get(Phase::Pending)
    }
    #[zbus(property, name = "PXEBooting")]
    fn pxe_booting(&self) -> u32 {
        self.counts.get(Phase::PxeBooting)
    }
    #[zbus(property)]
    fn imaging(&self) -> u32 {
        self.counts.get(Phase::Imaging)
    }
    #[zbus(property)]
    fn imaged(&self) -> u32 {
        self.counts.get(Phase::Imaged)
    }
    #[zbus(property)]
    fn joining(&self) -> u32 {
        self.counts.get(Phase::Joining)
    }
    #[zbus(property)]
    fn ready(&self) -> u32 {
        self.counts.get(Phase::Ready)
    }
    #[zbus(property)]
    fn failed(&self) -> u32 {
        self.counts.get(Phase::Failed)
    }
    /// The one-line summary also sent as systemd `STATUS=`.
    #[zbus(property)]
    fn summary(&self) -> String {
        self.summary.clone()
    }
}

async fn emit_changed(
    ctxt: &SignalContext<'_>,
    interface: &'static str,
    changed: &[(&'static str, Value<'static>)],
) -> zbus::Result<()> {
    if changed.is_empty() {
        return Ok(());
    }
    let map: HashMap<&str, &Value<'_>> = changed.iter().map(|(k, v)| (*k, v)).collect();
    zbus::fdo::Properties::properties_changed(
        ctxt,
        InterfaceName::from_static_str_unchecked(interface),
        &map,
        &[],
    )
    .await
}

/// Connects to the bus at `address` (the system bus, honouring `DBUS_SYSTEM_BUS_ADDRESS`, when
/// `None`), without the well-known name yet (see [`connect_and_publish`]).
async fn connect(address: Option<&str>) -> zbus::Result<Connection> {
    let builder = match address {
        Some(address) => zbus::connection::Builder::address(address)?,
        None => zbus::connection::Builder::system()?,
    };
    builder
        .serve_at("/", zbus::fdo::ObjectManager)?
        .serve_at(MANAGER_PATH, ManagerObject::default())?
        .build()
        .await
}

/// Connects, exports the store's machines and counts, and only then owns the well-known name:
/// under D-Bus activation the caller's message is delivered as soon as the name has an owner,
/// and must not find an empty manager or missing machines.
async fn connect_and_publish(address: Option<&str>, store: &StatusStore) -> zbus::Result<Exporter> {
    let mut exporter = Exporter {
        conn: connect(address).await?,
        exported: HashMap::new(),
        published: None,
    };
    exporter.reconcile(store.snapshot()).await?;
    exporter.update_manager(store).await?;
    exporter.conn.request_name(BUS_NAME).await?;
    Ok(exporter)
}

/// Publishes the store on the system bus until `shutdown`, reconnecting with a back-off when
/// there is no bus or the connection is lost.
pub async fn serve(store: Arc<StatusStore>, shutdown: CancellationToken) {
    serve_at(store, None, shutdown).await
}

pub async fn serve_at(
    store: Arc<StatusStore>,
    address: Option<String>,
    shutdown: CancellationToken,
) {
    let mut retry = RETRY_FIRST;
    let mut warned = false;
    loop {
        // Subscribed before the snapshot is read, so no change falls between the two.
        let mut changes = store.subscribe();
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = connect_and_publish(address.as_deref(), &store) => c,
        };
        match connected {
            Ok(mut exporter) => {
                tracing::info!(name = BUS_NAME, "publishing machine status on D-Bus");
                warned = false;
                retry = RETRY_FIRST;
                match exporter.run(&store, &mut changes, &shutdown).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!("D-Bus connection failed, reconnecting: {e}");
                    }
                }
            }
            Err(e) => {
                if warned {
                    tracing::debug!("D-Bus still unavailable: {e}");
                } else {
                    match no_bus(&e, address.as_deref()) {
                        Some(bus) => tracing::info!(
                            name = BUS_NAME,
                            "no system bus at {bus} (a run outside systemd?): machine status is not on D-Bus; harmless, netboot serves as usual and connects when a bus appears"
                        ),
                        None => tracing::warn!(
                            name = BUS_NAME,
                            "machine status is not on D-Bus (netboot keeps serving; retrying): {e}"
                        ),
                    }
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// The bus's address when `e` says there is no bus there at all (its socket is missing or
/// nobody listens), rather than a bus that refused us.
fn no_bus(e: &zbus::Error, address: Option<&str>) -> Option<String> {
    let zbus::Error::InputOutput(io) = e else {
        return None;
    };
    if !matches!(
        io.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    ) {
        return None;
    }
    Some(match address {
        Some(address) => address.to_string(),
        None => std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
            .unwrap_or_else(|_| "unix:path=/run/dbus/system_bus_socket".to_string()),
    })
}

struct Exporter {
    conn: Connection,
    /// What the bus currently shows, by machine name.
    exported: HashMap<String, MachineStatus>,
    /// What the manager object shows.
    published: Option<(PhaseCounts, String)>,
}

impl Exporter {
    async fn run(
        &mut self,
        store: &StatusStore,
        changes: &mut broadcast::Receiver<Change>,
        shutdown: &CancellationToken,
    ) -> zbus::Result<()> {
        self.reconcile(store.snapshot()).await?;
        self.update_manager(store).await?;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                c = changes.recv() => c,
            };
            let mut batch = Vec::new();
            let mut resync = false;
            match first {
                Ok(change) => batch.push(change),
                Err(broadcast::error::RecvError::Lagged(_)) => resync = true,
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
            // Take whatever else is queued, so a burst updates the manager object once.
            loop {
                match changes.try_recv() {
                    Ok(change) => batch.push(change),
                    Err(broadcast::error::TryRecvError::Lagged(_)) => resync = true,
                    Err(_) => break,
                }
            }
            if resync {
                // We missed changes: compare the whole table instead.
                self.reconcile(store.snapshot()).await?;
            } else {
                for change in batch {
                    match change {
                        Change::Added(status) | Change::Updated { after: status, .. } => {
                            self.set(status).await?
                        }
                        Change::Removed(status) => self.remove(&status.name).await?,
                    }
                }
            }
            self.update_manager(store).await?;
        }
    }

    async fn reconcile(&mut self, snapshot: Vec<MachineStatus>) -> zbus::Result<()> {
        let current: Vec<String> = self.exported.keys().cloned().collect();
        for name in current {
            if !snapshot.iter().any(|s| s.name == name) {
                self.remove(&name).await?;
            }
        }
        for status in snapshot {
            self.set(status).await?;
        }
        Ok(())
    }

    async fn set(&mut self, status: MachineStatus) -> zbus::Result<()> {
        let path = OwnedObjectPath::try_from(machine_path(&status.name))?;
        let server = self.conn.object_server();
        match self.exported.get(&status.name) {
            None => {
                server
                    .at(
                        &path,
                        MachineObject {
                            status: status.clone(),
                        },
                    )
                    .await?;
            }
            Some(before) if *before == status => return Ok(()),
            Some(before) => {
                let changed = changed_machine_properties(before, &status);
                let iface = server.interface::<_, MachineObject>(&path).await?;
                iface.get_mut().await.status = status.clone();
                emit_changed(iface.signal_context(), MACHINE_INTERFACE, &changed).await?;
            }
        }
        self.exported.insert(status.name.clone(), status);
        Ok(())
    }

    async fn remove(&mut self, name: &str) -> zbus::Result<()> {
        if self.exported.remove(name).is_some() {
            let path = OwnedObjectPath::try_from(machine_path(name))?;
            self.conn
                .object_server()
                .remove::<MachineObject, _>(&path)
                .await?;
        }
        Ok(())
    }

    async fn update_manager(&mut self, store: &StatusStore) -> zbus::Result<()> {
        let counts = PhaseCounts::of(self.exported.values());
        let summary = store.summary();
        if self.published.as_ref() == Some(&(counts.clone(), summary.clone())) {
            return Ok(());
        }
        let (before, before_summary) = self.published.take().unwrap_or_default();
        let mut changed: Vec<(&'static str, Value<'static>)> = Vec::new();
        if before.total != counts.total {
            changed.push(("Total", Value::from(counts.total)));
        }
        for phase in Phase::ALL {
            if before.get(phase) != counts.get(phase) {
                changed.push((phase.as_str(), Value::from(counts.get(phase))));
            }
        }
        if before_summary != summary {
            changed.push(("Summary", Value::from(summary.clone())));
        }
        let iface = self
            .conn
            .object_server()
            .interface::<_, ManagerObject>(MANAGER_PATH)
            .await?;
        {
            let mut manager = iface.get_mut().await;
            manager.counts = counts.clone();
            manager.summary = summary.clone();
        }
        emit_changed(iface.signal_context(), MANAGER_INTERFACE, &changed).await?;
        self.published = Some((counts, summary));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
