//! The D-Bus export against a private `dbus-daemon` (skipped, with a message, where none is
//! installed): objects appear and disappear with the inventory, properties read back, and a
//! phase change arrives as one `PropertiesChanged` signal.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use netboot::{BootEvent, MacAddr, Machine};
use zbus::fdo::{ObjectManagerProxy, PropertiesProxy};
use zbus::names::InterfaceName;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, OwnedValue};

use super::*;

struct Bus {
    child: Child,
    address: String,
    _dir: tempfile::TempDir,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_bus() -> Option<Bus> {
    private_bus_with_activation(None)
}

/// A private bus; with `activation_exec`, `BUS_NAME` is activatable and the bus runs that
/// command to "start" it (messages to the name wait in the bus until someone owns it).
fn private_bus_with_activation(activation_exec: Option<&str>) -> Option<Bus> {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bus");
    let config = dir.path().join("bus.conf");
    let services = dir.path().join("services");
    std::fs::create_dir(&services).expect("mkdir services");
    if let Some(exec) = activation_exec {
        std::fs::write(
            services.join(format!("{BUS_NAME}.service")),
            format!("[D-BUS Service]\nName={BUS_NAME}\nExec={exec}\n"),
        )
        .expect("write activation file");
    }
    std::fs::write(
        &config,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <servicedir>{}</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
            socket.display(),
            services.display()
        ),
    )
    .expect("write bus config");
    let child = match Command::new("dbus-daemon")
        .arg("--nofork")
        .arg(format!("--config-file={}", config.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "skipping: cannot start dbus-daemon ({e}); tests/install-deps.sh installs it"
            );
            return None;
        }
    };
    // The socket file appears at bind(), before listen(): a connection between the two is
    // refused, so wait until one is accepted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "dbus-daemon did not accept connections on its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Some(Bus {
        child,
        address: format!("unix:path={}", socket.display()),
        _dir: dir,
    })
}

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

async fn client(address: &str) -> Connection {
    zbus::connection::Builder::address(address)
        .expect("address")
        .build()
        .await
        .expect("client connects")
}

async fn managed(conn: &Connection) -> zbus::fdo::ManagedObjects {
    let proxy = ObjectManagerProxy::builder(conn)
        .destination(BUS_NAME)
        .expect("name")
        .path("/")
        .expect("path")
        .build()
        .await
        .expect("proxy");
    proxy
        .get_managed_objects()
        .await
        .expect("GetManagedObjects")
}

/// Polls until `check` holds for the managed objects (the exporter works asynchronously).
async fn wait_for_objects(
    conn: &Connection,
    what: &str,
    check: impl Fn(&zbus::fdo::ManagedObjects) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let proxy = zbus::fdo::DBusProxy::new(conn).await.expect("dbus proxy");
        let owned = proxy
            .name_has_owner(BUS_NAME.try_into().expect("name"))
            .await
            .unwrap_or(false);
        if owned && check(&managed(conn).await) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn property(objects: &zbus::fdo::ManagedObjects, path: &str, name: &str) -> Option<OwnedValue> {
    let path = ObjectPath::try_from(path).ok()?;
    objects
        .get(&OwnedObjectPath::from(path))?
        .get(&zbus::names::OwnedInterfaceName::from(
            InterfaceName::from_static_str_unchecked(MACHINE_INTERFACE),
        ))?
        .get(name)
        .and_then(|v| v.try_clone().ok())
}

#[test]
fn machine_paths_are_escaped_like_systemd() {
    assert_eq!(
        machine_path("node2"),
        "/dev/provisioner/Netboot1/machine/node2"
    );
    assert_eq!(
        machine_path("node-2.lab"),
        "/dev/provisioner/Netboot1/machine/node_2d2_2elab"
    );
    assert_eq!(
        machine_path("2node"),
        "/dev/provisioner/Netboot1/machine/_32node"
    );
    for name in ["node-2.lab", "2node", "", "a_b"] {
        assert!(ObjectPath::try_from(machine_path(name)).is_ok(), "{name}");
    }
}

#[tokio::test]
async fn machines_on_a_private_bus_follow_the_store() {
    let Some(bus) = private_bus() else { return };
    let store = StatusStore::open(None);
    let (a, b) = (machine("node-a", 2), machine("node-b", 3));
    store.sync_inventory(&inventory(&[a.clone(), b.clone()]));
    let shutdown = CancellationToken::new();
    let exporter = tokio::spawn(serve_at(
        store.clone(),
        Some(bus.address.clone()),
        shutdown.clone(),
    ));

    let conn = client(&bus.address).await;
    let path_a = machine_path("node-a");
    wait_for_objects(&conn, "both machines", |o| {
        property(o, &path_a, "Phase").is_some()
            && property(o, &machine_path("node-b"), "Phase").is_some()
    })
    .await;
    let objects = managed(&conn).await;
    let text = |name: &str| {
        property(&objects, &path_a, name)
            .and_then(|v| String::try_from(v).ok())
            .unwrap_or_default()
    };
    assert_eq!(text("Name"), "node-a");
    assert_eq!(text("MacAddress"), "52:54:00:00:00:02");
    assert_eq!(text("IpAddress"), "10.77.0.2");
    assert_eq!(text("Phase"), "Pending");

    let props = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .expect("name")
        .path(path_a.as_str())
        .expect("path")
        .build()
        .await
        .expect("proxy");
    let mut signals = props.receive_properties_changed().await.expect("subscribe");
    let manager = PropertiesProxy::builder(&conn)
        .destination(BUS_NAME)
        .expect("name")
        .path(MANAGER_PATH)
        .expect("path")
        .build()
        .await
        .expect("proxy");
    let manager_iface = InterfaceName::from_static_str_unchecked(MANAGER_INTERFACE);
    let count = |name: &'static str| {
        let manager = &manager;
        let iface = manager_iface.clone();
        async move { u32::try_from(manager.get(iface, name).await.expect("Get")).expect("u32") }
    };
    assert_eq!((count("Total").await, count("Pending").await), (2, 2));

    store.observe(&a, &BootEvent::DhcpOffered);
    let signal = tokio::time::timeout(Duration::from_secs(10), signals.next())
        .await
        .expect("PropertiesChanged within 10 s")
        .expect("stream open");
    let args = signal.args().expect("args");
    assert_eq!(args.interface_name().as_str(), MACHINE_INTERFACE);
    let changed = args.changed_properties();
    assert_eq!(
        changed
            .get("Phase")
            .and_then(|v| v.downcast_ref::<&str>().ok()),
        Some("PXEBooting"),
        "{changed:?}"
    );
    assert!(changed.contains_key("LastSeen") && changed.contains_key("Message"));
    assert!(!changed.contains_key("Name"), "only what changed is sent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while count("PXEBooting").await != 1 {
        assert!(Instant::now() < deadline, "manager counts did not follow");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count("Pending").await, 1);

    // A machine leaving the inventory leaves the bus.
    store.sync_inventory(&inventory(&[a]));
    wait_for_objects(&conn, "node-b to go", |o| {
        property(o, &machine_path("node-b"), "Phase").is_none()
    })
    .await;
    assert_eq!(count("Total").await, 1);

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), exporter)
        .await
        .expect("exporter stops on shutdown")
        .expect("exporter task");
}

/// Under D-Bus activation the caller's message waits in the bus and is delivered the moment
/// the name gets an owner: by then every machine and the manager's counts must be exported.
#[tokio::test]
async fn the_name_is_owned_only_once_the_machines_are_exported() {
    // The bus "starts" the service by running sleep; the exporter below takes the name.
    let Some(bus) = private_bus_with_activation(Some("/bin/sleep 10")) else {
        return;
    };
    let store = StatusStore::open(None);
    let machines: Vec<Machine> = (2..=101)
        .map(|last| machine(&format!("node{last}"), last))
        .collect();
    store.sync_inventory(&inventory(&machines));

    let conn = client(&bus.address).await;
    let summary_call = {
        let conn = conn.clone();
        tokio::spawn(async move {
            let manager = PropertiesProxy::builder(&conn)
                .destination(BUS_NAME)
                .expect("name")
                .path(MANAGER_PATH)
                .expect("path")
                .build()
                .await
                .expect("proxy");
            manager
                .get(
                    InterfaceName::from_static_str_unchecked(MANAGER_INTERFACE),
                    "Summary",
                )
                .await
        })
    };
    let objects_call = {
        let conn = conn.clone();
        tokio::spawn(async move { managed(&conn).await })
    };
    // Both calls are queued in the bus, waiting for the activated name.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!summary_call.is_finished() && !objects_call.is_finished());

    let shutdown = CancellationToken::new();
    let exporter = tokio::spawn(serve_at(
        store.clone(),
        Some(bus.address.clone()),
        shutdown.clone(),
    ));
    let summary = tokio::time::timeout(Duration::from_secs(10), summary_call)
        .await
        .expect("answered within 10 s")
        .expect("task")
        .expect("Get Summary");
    assert_eq!(
        String::try_from(summary).expect("string"),
        store.summary(),
        "the first answer carries the summary"
    );
    let objects = tokio::time::timeout(Duration::from_secs(10), objects_call)
        .await
        .expect("answered within 10 s")
        .expect("task");
    for m in &machines {
        assert!(
            property(&objects, &machine_path(&m.name), "Phase").is_some(),
            "{} exported before the name was taken",
            m.name
        );
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), exporter)
        .await
        .expect("exporter stops on shutdown")
        .expect("exporter task");
}

#[tokio::test]
async fn no_bus_is_not_fatal() {
    let store = StatusStore::open(None);
    let shutdown = CancellationToken::new();
    let exporter = tokio::spawn(serve_at(
        store,
        Some("unix:path=/nonexistent/bus".to_string()),
        shutdown.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!exporter.is_finished(), "keeps retrying");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), exporter)
        .await
        .expect("stops on shutdown")
        .expect("task");
}
