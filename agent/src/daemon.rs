//! `provisioner netboot`: serves DHCP, TFTP and HTTP for the machines of the inventory, on
//! sockets passed by systemd or bound from the configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

use crate::cluster;
use crate::config::{Config, DhcpMode, Inventory};
use crate::machines::{folder, AddressRules, Table};
use crate::provisioning::{Imaging, NodeCloudInit};
use crate::status::{self, StatusStore};
use crate::{dbus, systemd};

/// How long in-flight transfers get to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Safety-net rescan of the inventory folder besides inotify.
const INVENTORY_RESCAN: Duration = Duration::from_secs(30);
/// How long READY=1 waits for the cluster's Machines (systemd's start timeout is 90 s).
const INVENTORY_WAIT: Duration = Duration::from_secs(60);

struct Sockets {
    dhcp: UdpSocket,
    /// The PXE boot-server port, in proxy mode only.
    pxe: Option<UdpSocket>,
    tftp: UdpSocket,
    http: TcpListener,
    activated: bool,
}

/// A UDP socket for DHCP (`what`: DHCP, or the PXE boot server): broadcast allowed, bound to
/// the provisioning interface so replies to 255.255.255.255 leave through it and requests from
/// other links are never seen.
fn bind_dhcp(
    what: &str,
    addr: SocketAddr,
    interface: Option<&str>,
) -> anyhow::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    if let Some(interface) = interface {
        socket
            .bind_device(Some(interface.as_bytes()))
            .with_context(|| format!("binding the {what} socket to interface {interface}"))?;
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("binding {what} to {addr}"))?;
    Ok(socket.into())
}

fn sockets(config: &Config) -> anyhow::Result<Sockets> {
    let mut passed = systemd::activated_sockets()?;
    let activated = !(passed.udp.is_empty() && passed.tcp.is_empty());
    let dhcp = match passed.udp.remove("dhcp") {
        Some(s) => s,
        None => bind_dhcp("DHCP", config.listen.dhcp, config.interface.as_deref())?,
    };
    // The boot-server port only matters beside another DHCP server: in stand-alone mode every
    // offer names the boot file, and a socket systemd passes for it is closed.
    let pxe = match (config.dhcp_mode, passed.udp.remove("pxe")) {
        (DhcpMode::Proxy, Some(s)) => Some(s),
        (DhcpMode::Proxy, None) => Some(bind_dhcp(
            "PXE boot server",
            config.listen.pxe,
            config.interface.as_deref(),
        )?),
        (DhcpMode::Standalone, passed) => {
            if passed.is_some() {
                tracing::debug!(
                    "closing the PXE boot-server socket systemd passed: stand-alone mode does not use it"
                );
            }
            None
        }
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
            "ignoring socket {name:?} passed by systemd: expected names dhcp, pxe, tftp, http"
        );
    }
    for s in [&dhcp, &tftp].into_iter().chain(pxe.as_ref()) {
        s.set_nonblocking(true)?;
    }
    http.set_nonblocking(true)?;
    Ok(Sockets {
        dhcp: UdpSocket::from_std(dhcp)?,
        pxe: pxe.map(UdpSocket::from_std).transpose()?,
        tftp: UdpSocket::from_std(tftp)?,
        http: TcpListener::from_std(http)?,
        activated,
    })
}

/// `serving 3 machines: 1 imaging 42%, 2 ready; DHCP 0.0.0.0:67, …; DHCP: proxy beside the
/// LAN's server`
fn status_line(summary: &str, sockets: &[(&str, String)], mode: netboot::dhcp::DhcpMode) -> String {
    let listening: Vec<String> = sockets
        .iter()
        .map(|(proto, addr)| format!("{proto} {addr}"))
        .collect();
    format!(
        "serving {summary}; {}; DHCP: {}",
        listening.join(", "),
        mode.describe()
    )
}

/// READY=1 with the cluster inventory means its Machines are served: waits for the first list
/// of Machines in the table, at most [`INVENTORY_WAIT`] (then READY=1 all the same, with the
/// API server's state in `STATUS=`, rather than systemd failing the start).
async fn wait_for_inventory(
    api_state: &cluster::ApiState,
    endpoints: &[(&str, String)],
    mode: netboot::dhcp::DhcpMode,
) {
    systemd::notify_status(&status_line(
        "no machine yet: waiting for the cluster's Machines",
        endpoints,
        mode,
    ));
    let watchdog = systemd::watchdog_interval();
    let mut tick = tokio::time::interval(watchdog.unwrap_or(INVENTORY_WAIT));
    let deadline = tokio::time::sleep(INVENTORY_WAIT);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = api_state.inventory_loaded() => return,
            () = &mut deadline => {
                tracing::warn!(
                    "the cluster's Machines are not loaded after {} s: serving none until the API server answers",
                    INVENTORY_WAIT.as_secs()
                );
                return;
            }
            _ = tick.tick() => {
                if watchdog.is_some() {
                    systemd::notify_watchdog();
                }
            }
        }
    }
}

/// Where the machines come from, chosen once from `inventory:`.
enum InventorySource {
    /// A folder of Machine manifests, loaded before READY=1 and watched from then on.
    Folder {
        folder: Arc<folder::Folder>,
        watch: folder::FolderWatch,
    },
    /// The cluster's Machines: the client (the API server is not contacted yet) and the
    /// bootstrap tokens that user-data's kubeadm join parameters come from.
    Cluster {
        client: kube::Client,
        tokens: Arc<cluster::join::BootstrapTokens>,
    },
}

impl InventorySource {
    /// Loads the folder into `table`, or makes the cluster's client. The cluster's Machines
    /// arrive once the API server answers, and READY=1 waits for them ([`wait_for_inventory`]).
    async fn open(
        config: &Config,
        settings: &ServerSettings,
        table: &Table,
        store: &Arc<StatusStore>,
    ) -> anyhow::Result<InventorySource> {
        match &config.inventory {
            Inventory::Directory(dir) => {
                // Watching starts before the first load: no change in between can be missed.
                let watch = folder::FolderWatch::start(dir);
                let folder = Arc::new(folder::Folder::new(dir.clone(), settings.rules.clone()));
                folder.reload(table).with_context(|| {
                    format!("inventory.directory: cannot read {}", dir.display())
                })?;
                Ok(InventorySource::Folder { folder, watch })
            }
            Inventory::Kubernetes { kubeconfig } => {
                let kubeconfig = kubeconfig.clone().or_else(kubeconfig_credential);
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
                Ok(InventorySource::Cluster { client, tokens })
            }
        }
    }

    /// Where user-data's kubeadm join parameters come from: none without a cluster.
    fn join(&self) -> Arc<dyn cluster::join::JoinSource> {
        match self {
            InventorySource::Cluster { tokens, .. } => tokens.clone(),
            InventorySource::Folder { .. } => Arc::new(cluster::join::NoJoin),
        }
    }

    /// The folder SIGHUP re-reads (the cluster inventory is always current).
    fn folder(&self) -> Option<Arc<folder::Folder>> {
        match self {
            InventorySource::Folder { folder, .. } => Some(folder.clone()),
            InventorySource::Cluster { .. } => None,
        }
    }

    /// Keeps `table` in step with the source until `shutdown`: the folder watch, or the Machine
    /// controller.
    fn spawn(
        self,
        config: &Config,
        settings: &ServerSettings,
        table: Arc<Table>,
        store: Arc<StatusStore>,
        api_state: Arc<cluster::ApiState>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            InventorySource::Folder { folder, watch } => tokio::spawn(folder::watch(
                watch,
                table,
                folder,
                INVENTORY_RESCAN,
                shutdown,
            )),
            InventorySource::Cluster { client, tokens } => {
                let options = cluster::Options {
                    install_crd: config.cluster.install_crd,
                    tokens: Some(tokens),
                };
                tokio::spawn(cluster::run(
                    client,
                    table,
                    store,
                    settings.rules.clone(),
                    api_state,
                    options,
                    shutdown,
                ))
            }
        }
    }
}

/// `kubernetes: true` under netboot.service: the kubeconfig systemd passed as the credential
/// `kubeconfig` (LoadCredential=), which the service user may read while the file it comes from
/// is root's; else (`None`) the in-cluster or default configuration.
fn kubeconfig_credential() -> Option<PathBuf> {
    let credential = systemd::credential("kubeconfig");
    if let Some(path) = &credential {
        tracing::info!(kubeconfig = %path.display(), "using the kubeconfig credential");
    }
    credential
}

/// What the servers are told, built once from the configuration (`check-config` shows what
/// the same settings answer).
pub(crate) struct ServerSettings {
    /// `http://server[:port]`: where iPXE, stage2 and cloud-init reach the HTTP server.
    pub(crate) base_url: String,
    /// The subnet, and the addresses no machine may take (the server's own, the gateway).
    pub(crate) rules: AddressRules,
    pub(crate) dhcp: Arc<netboot::dhcp::DhcpSettings>,
    tftp: Arc<netboot::tftp::TftpSettings>,
    pub(crate) http: Arc<netboot::http::HttpSettings>,
}

impl ServerSettings {
    pub(crate) fn new(config: &Config, http_port: u16) -> ServerSettings {
        let base_url = match http_port {
            80 => format!("http://{}", config.server_address),
            port => format!("http://{}:{port}", config.server_address),
        };
        let dhcp = Arc::new(netboot::dhcp::DhcpSettings {
            mode: config.dhcp_mode,
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
        let mut tftp = netboot::tftp::TftpSettings::new(config.boot_files.ipxe_dir.clone());
        // The iPXE folder may be the distribution's own, whose loaders can be symlinks.
        tftp.outside_root = netboot::path::SYSTEM_IPXE_LOADERS;
        config.limits.tftp.apply(&mut tftp);
        let tftp = Arc::new(tftp);
        let http = Arc::new(netboot::http::HttpSettings {
            boot_dir: config.boot_files.ipxe_dir.clone(),
            assets_dir: config.boot_files.assets_dir.clone(),
            script: netboot::ipxe::ScriptSettings {
                kernel: config.boot.kernel.clone(),
                initrd: config.boot.initrd.clone(),
                cmdline: config.boot.cmdline.clone(),
            },
            base_url: base_url.clone(),
        });
        ServerSettings {
            base_url,
            rules: config.address_rules(),
            dhcp,
            tftp,
            http,
        }
    }
}

/// What user-data and the imaging script are made from.
fn provisioning(
    config: &Config,
    settings: &ServerSettings,
    store: Arc<StatusStore>,
    table: Arc<Table>,
    join: Arc<dyn cluster::join::JoinSource>,
) -> Arc<dyn netboot::Provisioning> {
    let external_cni = config
        .laptop
        .as_ref()
        .is_some_and(|l| l.init.cni_manifest.is_some());
    Arc::new(
        Imaging::new(store, table, config.image.clone(), config.boot.local_boot)
            .with_cloud_init(NodeCloudInit {
                hooks: config.cloud_init.clone(),
                base_url: settings.base_url.clone(),
            })
            .with_external_cni(external_cni)
            .with_join(join)
            .with_token_window(config.token_window),
    )
}

type Servers = tokio::task::JoinSet<std::io::Result<()>>;

/// DHCP, TFTP and HTTP on their sockets until `shutdown`; a server that returns early ends
/// netboot ([`supervise`]). Router advertisements are not among them: failing to advertise must
/// not stop netboot. With `dhcp_gate` (the cluster inventory), DHCP reads nothing until the
/// Machines are in the table: requests meanwhile wait in the socket and are answered then,
/// instead of being dropped as unknown MACs.
fn spawn_servers(
    sockets: Sockets,
    settings: &ServerSettings,
    config: &Config,
    machines: Arc<dyn netboot::MachineLookup>,
    provisioning: Arc<dyn netboot::Provisioning>,
    dhcp_gate: Option<Arc<cluster::ApiState>>,
    shutdown: &CancellationToken,
) -> Servers {
    let mut servers = Servers::new();
    // DHCP on a thread of its own: status writes never delay an answer.
    let dhcp_socket = sockets.dhcp.into_std();
    let pxe_socket = sockets.pxe.map(UdpSocket::into_std).transpose();
    let (dhcp_settings, dhcp_machines) = (settings.dhcp.clone(), machines.clone());
    let dhcp_shutdown = shutdown.clone();
    servers.spawn(async move {
        if let Some(api_state) = dhcp_gate {
            tokio::select! {
                () = api_state.inventory_loaded() => {}
                () = dhcp_shutdown.cancelled() => return Ok(()),
            }
        }
        netboot::dhcp::serve_on_own_thread(
            dhcp_socket?,
            pxe_socket?,
            dhcp_settings,
            dhcp_machines,
            dhcp_shutdown,
        )
        .await
    });
    servers.spawn(netboot::tftp::serve(
        sockets.tftp,
        settings.tftp.clone(),
        machines.clone(),
        shutdown.clone(),
    ));
    servers.spawn(netboot::http::serve(
        sockets.http,
        netboot::http::NetbootSite::new(settings.http.clone(), machines)
            .with_provisioning(provisioning),
        netboot::http::ServeOptions {
            grace: netboot::http::DEFAULT_SHUTDOWN_GRACE,
            limits: config.limits.http.clone(),
        },
        shutdown.clone(),
    ));
    match (&config.interface, config.router_advertisements) {
        (Some(interface), true) => match netboot::ra::RaSocket::open(interface) {
            Ok(socket) => {
                let token = shutdown.clone();
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
    servers
}

/// The `STATUS=` line: the store's summary, the sockets, the API server's state, and boot
/// files gone missing.
struct StatusLine {
    store: Arc<StatusStore>,
    api_state: Arc<cluster::ApiState>,
    endpoints: Vec<(&'static str, String)>,
    mode: netboot::dhcp::DhcpMode,
    boot_files: Arc<crate::preflight::BootFilesState>,
}

impl StatusLine {
    fn current(&self) -> String {
        let mut line = status_line(&self.store.summary(), &self.endpoints, self.mode);
        if !self.api_state.reachable() {
            line.push_str("; Kubernetes API unreachable, serving the last known machines");
        }
        if let Some(problem) = self.api_state.problem() {
            line.push_str("; ");
            line.push_str(&problem);
        }
        if let Some(missing) = self.boot_files.status() {
            line.push_str("; ");
            line.push_str(&missing);
        }
        line
    }
}

/// Until SIGTERM or SIGINT (`Ok`), or a server failing (`Err`): re-reads the folder on SIGHUP,
/// keeps the watchdog fed and `STATUS=` current (`status` is the line last sent).
async fn supervise(
    servers: &mut Servers,
    status_line: &StatusLine,
    mut status: String,
    table: &Table,
    folder: Option<Arc<folder::Folder>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick =
        tokio::time::interval(systemd::watchdog_interval().unwrap_or(Duration::from_secs(5)));
    let watchdog = systemd::watchdog_interval().is_some();
    let mut status_changes = status_line.store.subscribe();
    let refresh = |status: &mut String| {
        let now = status_line.current();
        if now != *status {
            *status = now;
            systemd::notify_status(status);
        }
    };

    loop {
        tokio::select! {
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
            _ = sighup.recv() => {
                status_line.boot_files.recheck();
                // The cluster inventory is always current: only a folder is re-read.
                if let Some(folder) = &folder {
                    tracing::info!("SIGHUP: reloading inventory");
                    if let Err(e) = folder.reload(table) {
                        tracing::error!("cannot reload inventory: {e}");
                    }
                }
            }
            _ = tick.tick() => {
                if watchdog {
                    systemd::notify_watchdog();
                }
                // Reachability of the API server is not a status store change: look each tick.
                refresh(&mut status);
            }
            _ = status_changes.recv() => refresh(&mut status),
            Some(finished) = servers.join_next() => {
                // A server only returns early on a fatal socket error.
                return match finished {
                    Ok(Ok(())) => Err(anyhow::anyhow!("a server stopped unexpectedly")),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("server failed")),
                    Err(e) => Err(anyhow::anyhow!("server task failed: {e}")),
                };
            }
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let sockets = sockets(&config)?;
    let settings = ServerSettings::new(&config, sockets.http.local_addr()?.port());
    let mut endpoints = vec![("DHCP", sockets.dhcp.local_addr()?.to_string())];
    if let Some(pxe) = &sockets.pxe {
        endpoints.push(("PXE", pxe.local_addr()?.to_string()));
    }
    endpoints.push(("TFTP", sockets.tftp.local_addr()?.to_string()));
    endpoints.push(("HTTP", sockets.http.local_addr()?.to_string()));
    let activated = sockets.activated;

    let store = StatusStore::open(
        config
            .state_file
            .clone()
            .or_else(status::default_state_file),
    );
    let table = Arc::new(Table::with_status(store.clone()));
    let source = InventorySource::open(&config, &settings, &table, &store).await?;
    let api_state = Arc::new(cluster::ApiState::default());
    let shutdown = CancellationToken::new();

    if let Some(image) = &config.image {
        tracing::info!(image = %image.url, local_boot = ?config.boot.local_boot, "imaging machines");
    }
    let provisioning = provisioning(
        &config,
        &settings,
        store.clone(),
        table.clone(),
        source.join(),
    );
    let mut servers = spawn_servers(
        sockets,
        &settings,
        &config,
        table.clone(),
        provisioning,
        source.folder().is_none().then(|| api_state.clone()),
        &shutdown,
    );
    let folder = source.folder();
    let watcher = source.spawn(
        &config,
        &settings,
        table.clone(),
        store.clone(),
        api_state.clone(),
        shutdown.clone(),
    );

    let persister = tokio::spawn(store.clone().persist(shutdown.clone()));
    // Not in `servers`: netboot keeps serving without a bus.
    tokio::spawn(dbus::serve(store.clone(), shutdown.clone()));
    // Checked at start (main refuses to start without them); a file that goes away later shows
    // in STATUS= and the journal.
    let boot_files = Arc::new(crate::preflight::BootFilesState::default());
    tokio::spawn(crate::preflight::watch_boot_files(
        Arc::new(config.clone()),
        boot_files.clone(),
        crate::preflight::BOOT_FILES_RECHECK,
        shutdown.clone(),
    ));
    let status_line = StatusLine {
        store: store.clone(),
        api_state: api_state.clone(),
        endpoints,
        mode: settings.dhcp.mode,
        boot_files,
    };
    if folder.is_none() {
        wait_for_inventory(&api_state, &status_line.endpoints, status_line.mode).await;
    }
    let status = status_line.current();
    tracing::info!(
        activated,
        machines = table.len(),
        base_url = %settings.base_url,
        interface = config.interface.as_deref().unwrap_or(""),
        dhcp_mode = %settings.dhcp.mode,
        "netboot ready: {status}"
    );
    systemd::notify_ready(&status);

    let outcome = supervise(&mut servers, &status_line, status, &table, folder).await;

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
