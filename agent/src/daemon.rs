//! `provisioner netboot`: serves DHCP, TFTP and HTTP for the machines of the inventory, on
//! sockets passed by systemd or bound from the configuration.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::cluster;
use crate::config::{Config, Inventory};
use crate::inventory::{self, Table};
use crate::provisioning::{Imaging, NodeCloudInit};
use crate::status::{self, StatusStore};
use crate::{dbus, systemd};

/// How long in-flight transfers get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Safety-net rescan of the inventory folder besides inotify.
const INVENTORY_RESCAN: Duration = Duration::from_secs(30);

struct Sockets {
    dhcp: UdpSocket,
    tftp: UdpSocket,
    http: TcpListener,
    activated: bool,
}

/// A UDP socket for DHCP: broadcast allowed, bound to the provisioning interface so replies to
/// 255.255.255.255 leave through it and requests from other links are never seen.
fn bind_dhcp(addr: SocketAddr, interface: Option<&str>) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    if let Some(interface) = interface {
        socket
            .bind_device(Some(interface.as_bytes()))
            .with_context(|| format!("binding the DHCP socket to interface {interface}"))?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding DHCP to {addr}"))?;
    Ok(socket.into())
}

fn sockets(config: &Config) -> anyhow::Result<Sockets> {
    let mut passed = systemd::activated_sockets()?;
    let activated = !(passed.udp.is_empty() && passed.tcp.is_empty());
    let dhcp = match passed.udp.remove("dhcp") {
        Some(s) => s,
        None => bind_dhcp(config.listen.dhcp, config.interface.as_deref())?,
    };
    let tftp = match passed.udp.remove("tftp") {
        Some(s) => s,
        None => std::net::UdpSocket::bind(config.listen.tftp)
            .with_context(|| format!("binding TFTP to {}", config.listen.tftp))?,
    };
    let http = match passed.tcp.remove("http") {
        Some(s) => s,
        None => std::net::TcpListener::bind(config.listen.http)
            .with_context(|| format!("binding HTTP to {}", config.listen.http))?,
    };
    for name in passed.udp.keys().chain(passed.tcp.keys()) {
        tracing::warn!(
            "ignoring socket {name:?} passed by systemd: expected names dhcp, tftp, http"
        );
    }
    for s in [&dhcp, &tftp] {
        s.set_nonblocking(true)?;
    }
    http.set_nonblocking(true)?;
    Ok(Sockets {
        dhcp: UdpSocket::from_std(dhcp)?,
        tftp: UdpSocket::from_std(tftp)?,
        http: TcpListener::from_std(http)?,
        activated,
    })
}

/// `serving 3 machines: 1 imaging 42%, 2 ready; DHCP 0.0.0.0:67, …`
fn status_line(summary: &str, sockets: &[(&str, String)]) -> String {
    let listening: Vec<String> = sockets
        .iter()
        .map(|(proto, addr)| format!("{proto} {addr}"))
        .collect();
    format!("serving {summary}; {}", listening.join(", "))
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let sockets = sockets(&config)?;
    let http_port = sockets.http.local_addr()?.port();
    let endpoints = vec![
        ("DHCP", sockets.dhcp.local_addr()?.to_string()),
        ("TFTP", sockets.tftp.local_addr()?.to_string()),
        ("HTTP", sockets.http.local_addr()?.to_string()),
    ];

    let mut reserved: Vec<Ipv4Addr> = vec![config.server_address];
    reserved.extend(config.gateway);
    let store = StatusStore::open(
        config
            .state_file
            .clone()
            .or_else(status::default_state_file),
    );
    let table = Arc::new(Table::with_status(store.clone()));
    // The folder is loaded before READY=1; the cluster's Machines arrive once the API server
    // answers (until then nothing is served, and the controller says so in the log).
    let folder = match &config.inventory {
        Inventory::Directory(dir) => {
            let watch = inventory::FolderWatch::start(dir);
            inventory::reload(&table, dir, config.subnet, &reserved)
                .with_context(|| format!("inventory.directory: cannot read {}", dir.display()))?;
            Some((dir.clone(), watch))
        }
        Inventory::Kubernetes { .. } => None,
    };
    let api_state = Arc::new(cluster::ApiState::default());

    let shutdown = CancellationToken::new();
    let base_url = match http_port {
        80 => format!("http://{}", config.server_address),
        port => format!("http://{}:{port}", config.server_address),
    };
    let dhcp_settings = Arc::new(netboot::dhcp::DhcpSettings {
        server_ip: config.server_address,
        subnet: config.subnet,
        gateway: config.gateway,
        dns_servers: config.dns_servers.clone(),
        lease_time: config.lease_time,
        bios_loader: config.boot_files.bios_loader.clone(),
        uefi_loader: config.boot_files.uefi_loader.file_name().to_string(),
        http_base: base_url.clone(),
        relays: config.dhcp_relays.clone(),
    });
    let tftp_settings = Arc::new(netboot::tftp::TftpSettings::new(
        config.boot_files.ipxe_dir.clone(),
    ));
    let http_settings = Arc::new(netboot::http::HttpSettings {
        boot_dir: config.boot_files.ipxe_dir.clone(),
        assets_dir: config.boot_files.assets_dir.clone(),
        script: netboot::ipxe::ScriptSettings {
            kernel: config.boot.kernel.clone(),
            initrd: config.boot.initrd.clone(),
            cmdline: config.boot.cmdline.clone(),
        },
        base_url: base_url.clone(),
    });

    let machines: Arc<dyn netboot::MachineLookup> = table.clone();
    if let Some(image) = &config.image {
        tracing::info!(image = %image.url, local_boot = ?config.boot.local_boot, "imaging machines");
    }
    let kubeconfig = match &config.inventory {
        Inventory::Kubernetes {
            kubeconfig: Some(path),
        } => Some(path.clone()),
        // `kubernetes: true` under netboot.service: the kubeconfig systemd passed as the
        // credential `kubeconfig` (LoadCredential=), which the service user may read while the
        // file it comes from is root's; else the in-cluster or default configuration.
        Inventory::Kubernetes { kubeconfig: None } => {
            let credential = systemd::credential("kubeconfig");
            if let Some(path) = &credential {
                tracing::info!(kubeconfig = %path.display(), "using the kubeconfig credential");
            }
            credential
        }
        Inventory::Directory(_) => None,
    };
    // The cluster's client (files only, the API server is not contacted yet) and the bootstrap
    // tokens that user-data's kubeadm join parameters come from.
    let cluster = match &config.inventory {
        Inventory::Kubernetes { .. } => {
            let (client, facts) = cluster::connect(kubeconfig.as_deref())
                .await
                .context("inventory")?;
            let tokens = Arc::new(cluster::join::BootstrapTokens::new(
                client.clone(),
                store.clone(),
                cluster::join::JoinSettings {
                    token_ttl: config.cluster.bootstrap_token_ttl,
                    api_endpoint: config.cluster.api_endpoint.clone(),
                },
                facts,
            ));
            Some((client, tokens))
        }
        Inventory::Directory(_) => None,
    };
    let join: Arc<dyn cluster::join::JoinSource> = match &cluster {
        Some((_, tokens)) => tokens.clone(),
        None => Arc::new(cluster::join::NoJoin),
    };
    let provisioning: Arc<dyn netboot::Provisioning> = Arc::new(
        Imaging::new(
            store.clone(),
            table.clone(),
            config.image.clone(),
            config.boot.local_boot,
        )
        .with_cloud_init(NodeCloudInit {
            hooks: config.cloud_init.clone(),
            base_url: base_url.clone(),
        })
        .with_external_cni(
            config
                .laptop
                .as_ref()
                .is_some_and(|l| l.init.cni_manifest.is_some()),
        )
        .with_join(join)
        .with_token_window(config.token_window),
    );
    let mut servers = tokio::task::JoinSet::new();
    servers.spawn(netboot::dhcp::serve(
        sockets.dhcp,
        dhcp_settings,
        machines.clone(),
        shutdown.clone(),
    ));
    servers.spawn(netboot::tftp::serve(
        sockets.tftp,
        tftp_settings,
        machines.clone(),
        shutdown.clone(),
    ));
    servers.spawn(netboot::http::serve_provisioning(
        sockets.http,
        http_settings,
        machines.clone(),
        provisioning,
        shutdown.clone(),
        netboot::http::DEFAULT_SHUTDOWN_GRACE,
    ));
    match (&config.interface, config.router_advertisements) {
        (Some(interface), true) => match netboot::ra::RaSocket::open(interface) {
            Ok(socket) => {
                let token = shutdown.clone();
                // Not in `servers`: failing to advertise must not stop netboot.
                tokio::spawn(async move {
                    if let Err(e) = netboot::ra::serve(socket, token).await {
                        tracing::warn!("router advertisements stopped: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!(
                interface = %interface,
                "cannot answer IPv6 router solicitations ({e}; needs CAP_NET_RAW): iPXE clients will wait about 16 s for IPv6 before booting"
            ),
        },
        (None, true) => tracing::warn!(
            "no provisioning interface configured: not answering IPv6 router solicitations, iPXE clients will wait about 16 s for IPv6"
        ),
        (_, false) => {}
    }
    let dir = folder.as_ref().map(|(dir, _)| dir.clone());
    let watcher = match folder {
        Some((dir, watch)) => tokio::spawn(inventory::watch(
            watch,
            table.clone(),
            dir,
            config.subnet,
            reserved.clone(),
            INVENTORY_RESCAN,
            shutdown.clone(),
        )),
        None => {
            let rules = cluster::AddressRules {
                subnet: config.subnet,
                reserved: reserved.clone(),
            };
            let Some((client, tokens)) = cluster else {
                anyhow::bail!("inventory: neither a folder nor a cluster");
            };
            let options = cluster::Options {
                install_crd: config.cluster.install_crd,
                tokens: Some(tokens),
            };
            tokio::spawn(cluster::run(
                client,
                table.clone(),
                store.clone(),
                rules,
                api_state.clone(),
                options,
                shutdown.clone(),
            ))
        }
    };

    let persister = tokio::spawn(store.clone().persist(shutdown.clone()));
    // Not in `servers`: netboot keeps serving without a bus.
    tokio::spawn(dbus::serve(store.clone(), shutdown.clone()));
    let mut status_changes = store.subscribe();
    let current_status = || {
        let mut line = status_line(&store.summary(), &endpoints);
        if !api_state.reachable() {
            line.push_str("; Kubernetes API unreachable, serving the last known machines");
        }
        if let Some(problem) = api_state.problem() {
            line.push_str("; ");
            line.push_str(&problem);
        }
        line
    };
    let mut status = current_status();
    tracing::info!(
        activated = sockets.activated,
        machines = table.len(),
        base_url = %base_url,
        interface = config.interface.as_deref().unwrap_or(""),
        "netboot ready: {status}"
    );
    systemd::notify_ready(&status);

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick =
        tokio::time::interval(systemd::watchdog_interval().unwrap_or(Duration::from_secs(5)));
    let watchdog = systemd::watchdog_interval().is_some();

    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = sigterm.recv() => break Ok(()),
            _ = sigint.recv() => break Ok(()),
            _ = sighup.recv() => {
                // The cluster inventory is always current: only a folder is re-read.
                if let Some(dir) = &dir {
                    tracing::info!("SIGHUP: reloading inventory");
                    if let Err(e) = inventory::reload(&table, dir, config.subnet, &reserved) {
                        tracing::error!("cannot reload inventory: {e}");
                    }
                }
            }
            _ = tick.tick() => {
                if watchdog {
                    systemd::notify_watchdog();
                }
                // Reachability of the API server is not a status store change: look each tick.
                let now = current_status();
                if now != status {
                    status = now;
                    systemd::notify_status(&status);
                }
            }
            _ = status_changes.recv() => {
                let now = current_status();
                if now != status {
                    status = now;
                    systemd::notify_status(&status);
                }
            }
            Some(finished) = servers.join_next() => {
                // A server only returns early on a fatal socket error.
                break match finished {
                    Ok(Ok(())) => Err(anyhow::anyhow!("a server stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("server failed")),
                    Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
                };
            }
        }
    };

    systemd::notify_stopping("stopping: finishing in-flight transfers");
    tracing::info!("shutting down");
    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(2), async {
        while servers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!("servers did not stop within the grace period");
    }
    let _ = watcher.await;
    let _ = persister.await;
    outcome
}
