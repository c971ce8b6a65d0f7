//! DHCP server for reserved machines only.
//!
//! Answers DISCOVER, REQUEST and INFORM from MACs that [`MachineLookup::by_mac`] knows, with the
//! reserved address and a boot file chosen from the client's options (see [`boot_client`] and
//! [`boot_file`]); stays silent for everyone else. The protocol core ([`handle`]) is pure; the
//! [`serve`] loop only decodes, calls it, sends, logs and reports [`BootEvent`]s.
//!
//! In proxy mode ([`DhcpMode::Proxy`]) the LAN's own DHCP server gives the addresses and this
//! one only answers network-boot clients of reserved machines with ProxyDHCP offers (boot
//! information, no address; see [`proxy`]), and [`serve_boot_server`] answers the PXE
//! boot-server port (UDP 4011).
//!
//! The socket should be bound to the provisioning interface (`SO_BINDTODEVICE`, or
//! `BindToDevice=` in the socket unit): replies to clients without an address are broadcast to
//! 255.255.255.255, which otherwise leaves by whatever interface the routing table picks.
//! Relayed packets are only answered from the relays in [`DhcpSettings::relays`]; see
//! [`handle`] for which addresses replies may be unicast to. Every line logged per packet is
//! rate-limited ([`crate::lograte`]).

mod boot;
mod handle;
mod packet;
pub mod proxy;
mod socket;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use boot::{
    boot_client, boot_file, ipxe_script_url, BootClient, BootFile, HTTP_CLIENT, PXE_CLIENT,
};
pub use handle::{handle, Ignored, Outcome, Reply, CLIENT_PORT, SERVER_PORT};
pub use packet::{decode_request, PacketError};
pub use proxy::{handle_boot_server, BOOT_SERVER_PORT};

use crate::lograte::{KeyedLogLimit, LogLimit};
use crate::{BootEvent, MacAddr, MachineLookup};

/// Lines about a reserved machine's packets (replies, lease events): a budget per MAC, so a
/// flood with one machine's MAC leaves the others' lines, and one for the server.
static MACHINE_LOG: LazyLock<KeyedLogLimit<MacAddr>> =
    LazyLock::new(|| KeyedLogLimit::new("dhcp machine", 1, 20, 20, 200));
/// Refused packets (untrusted relays, forged addresses, mismatched RELEASE/DECLINE) and
/// inventory errors seen per packet.
static REFUSED_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("dhcp refused", 5, 50));
/// Receive errors (ICMP feedback arrives per datagram).
static SOCKET_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("dhcp socket", 1, 10));

/// Who gives the machines their addresses (`dhcpMode:` in the agent's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DhcpMode {
    /// netboot is the DHCP server of the provisioning network: each reserved machine gets its
    /// reserved address, a lease, the mask, router and DNS servers, and its boot file.
    #[default]
    Standalone,
    /// ProxyDHCP beside the LAN's DHCP server, which gives the addresses: netboot answers only
    /// network-boot clients of reserved machines, with their boot file and no address, and
    /// never NAKs (see [`proxy`]).
    Proxy,
}

impl DhcpMode {
    /// How the mode reads in logs and status lines.
    pub fn describe(self) -> &'static str {
        match self {
            DhcpMode::Standalone => "stand-alone server",
            DhcpMode::Proxy => "proxy beside the LAN's server",
        }
    }
}

impl std::fmt::Display for DhcpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DhcpMode::Standalone => "standalone",
            DhcpMode::Proxy => "proxy",
        })
    }
}

/// What the DHCP server hands out besides each machine's reserved address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
    /// Stand-alone DHCP server, or ProxyDHCP beside the LAN's server. In proxy mode `subnet`
    /// only bounds the reservations, and `gateway`, `dns_servers` and `lease_time` are unused.
    pub mode: DhcpMode,
    /// Our address: server identifier (54), `siaddr` and TFTP server (66).
    pub server_ip: Ipv4Addr,
    /// The provisioning subnet: its mask is option 1; reservations outside it are not served.
    pub subnet: ipnet::Ipv4Net,
    /// Option 3, if set.
    pub gateway: Option<Ipv4Addr>,
    /// Option 6 (omitted when empty).
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 51; T1 and T2 are half and seven eighths of it.
    pub lease_time: Duration,
    /// TFTP file for BIOS PXE, e.g. `undionly.kpxe`.
    pub bios_loader: String,
    /// TFTP file for UEFI x86-64 PXE, e.g. `snponly.efi` or `ipxe.efi`.
    pub uefi_loader: String,
    /// Base URL of our HTTP server, e.g. `http://10.77.0.1:8080` (no trailing slash needed).
    pub http_base: String,
    /// DHCP relay agents whose packets are answered: a relayed packet is served only when its
    /// `giaddr` and the address it was sent from are both listed. Empty: relayed packets are
    /// ignored.
    pub relays: Vec<Ipv4Addr>,
}

/// Remembers which unknown MACs were logged recently, so a chatty stranger is logged once per
/// period. Memory is bounded: beyond `capacity` recent MACs, further ones are counted only.
struct LogLimiter {
    seen: HashMap<MacAddr, Instant>,
    capacity: usize,
    period: Duration,
    suppressed: u64,
}

impl LogLimiter {
    fn new(capacity: usize, period: Duration) -> Self {
        LogLimiter {
            seen: HashMap::new(),
            capacity,
            period,
            suppressed: 0,
        }
    }

    /// True if `mac` should be logged now.
    fn allow(&mut self, mac: MacAddr, now: Instant) -> bool {
        let period = self.period;
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < period;
        if self.seen.get(&mac).is_some_and(fresh) {
            return false;
        }
        if !self.seen.contains_key(&mac) && self.seen.len() >= self.capacity {
            self.seen.retain(|_, at| fresh(at));
            if self.seen.len() >= self.capacity {
                self.suppressed += 1;
                return false;
            }
        }
        self.seen.insert(mac, now);
        true
    }

    /// Number of log lines skipped because the table was full; resets the count.
    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// Reply ports; tests on loopback use unprivileged ones.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    relay: u16,
}

impl Ports {
    const STANDARD: Ports = Ports {
        client: CLIENT_PORT,
        relay: SERVER_PORT,
    };

    fn map(self, destination: SocketAddr) -> SocketAddr {
        let port = if destination.port() == SERVER_PORT {
            self.relay
        } else {
            self.client
        };
        SocketAddr::new(destination.ip(), port)
    }
}

/// Which port a serve loop answers.
#[derive(Debug, Clone, Copy)]
enum Listener {
    /// The DHCP server port ([`handle`]); replies go to [`Ports`].
    Dhcp(Ports),
    /// The PXE boot-server port ([`handle_boot_server`]); replies go back to the sender.
    BootServer,
}

/// Serves DHCP on an already-bound socket (usually `0.0.0.0:67` on the provisioning interface,
/// possibly passed by systemd) until `shutdown` is cancelled. Sets `SO_BROADCAST` itself.
pub async fn serve(
    socket: UdpSocket,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run(
        socket,
        settings,
        machines,
        shutdown,
        Listener::Dhcp(Ports::STANDARD),
    )
    .await
}

/// Serves the PXE boot-server port (usually `0.0.0.0:4011`) until `shutdown` is cancelled:
/// proxy mode's answer to firmware that asks there for its boot file ([`handle_boot_server`]).
pub async fn serve_boot_server(
    socket: UdpSocket,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run(socket, settings, machines, shutdown, Listener::BootServer).await
}

/// [`serve`] (and [`serve_boot_server`] on `boot_server`, when given) on a thread of its own,
/// with a single-threaded runtime that polls these sockets alone: an answer never waits for
/// other work of the process (a cluster controller writing a burst of status changes, TLS,
/// JSON) to yield a shared runtime's worker or to poll its I/O driver. The future ends when
/// the servers do (shutdown, or a fatal socket error of either).
pub fn serve_on_own_thread(
    socket: std::net::UdpSocket,
    boot_server: Option<std::net::UdpSocket>,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = io::Result<()>> + Send + 'static {
    let (done, finished) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    runtime.block_on(async move {
                        let dhcp = serve(
                            UdpSocket::from_std(socket)?,
                            settings.clone(),
                            machines.clone(),
                            shutdown.clone(),
                        );
                        match boot_server {
                            Some(boot_server) => {
                                let boot_server = serve_boot_server(
                                    UdpSocket::from_std(boot_server)?,
                                    settings,
                                    machines,
                                    shutdown,
                                );
                                tokio::try_join!(dhcp, boot_server).map(|_| ())
                            }
                            None => dhcp.await,
                        }
                    })
                });
            let _ = done.send(result);
        });
    async move {
        spawned?;
        finished
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the DHCP thread ended without a result")))
    }
}

/// The warning about a reserved machine that uses or asks for another address than its
/// reservation (proxy mode: the LAN's DHCP server gave it that address).
fn warn_foreign_address(machine: &crate::Machine, address: Ipv4Addr) {
    tracing::warn!(
        machine = %machine.name, mac = %machine.mac, ip = %address, reserved = %machine.ip,
        "the machine uses or asks for {address}, not its reserved address {}: reserve it for this MAC in the LAN's DHCP server (its imaging script is only served to the reserved address; logged once a minute per MAC)",
        machine.ip
    );
}

async fn run(
    socket: UdpSocket,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
    listener: Listener,
) -> io::Result<()> {
    let socket = socket::PktInfoSocket::new(socket)?;
    // Absorb bursts (a rack powering on): best effort, capped by net.core.rmem_max.
    if let Err(e) = socket2::SockRef::from(socket.inner()).set_recv_buffer_size(1 << 20) {
        tracing::debug!(error = %e, "cannot enlarge the DHCP receive buffer");
    }
    let local = socket.local_addr()?;
    match (listener, settings.mode) {
        (Listener::Dhcp(_), DhcpMode::Standalone) => tracing::info!(
            %local, server_ip = %settings.server_ip, mode = %settings.mode,
            "DHCP server ready: {}", settings.mode.describe()
        ),
        (Listener::Dhcp(_), DhcpMode::Proxy) => tracing::info!(
            %local, server_ip = %settings.server_ip, mode = %settings.mode,
            "DHCP server ready: {}, boot information only (the LAN's DHCP server gives the addresses)",
            settings.mode.describe()
        ),
        (Listener::BootServer, _) => tracing::info!(
            %local, server_ip = %settings.server_ip, mode = %settings.mode,
            "PXE boot server ready"
        ),
    }
    let mut unknown = LogLimiter::new(4096, Duration::from_secs(60));
    let mut foreign = LogLimiter::new(4096, Duration::from_secs(60));
    let mut buf = vec![0u8; 2048];
    loop {
        let received = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            r = socket.recv(&mut buf) => r,
        };
        let socket::Received { len, peer, ifindex } = match received {
            Ok(r) => r,
            Err(e) => {
                // UDP receive errors are per-datagram (e.g. ICMP feedback): keep serving.
                if SOCKET_LOG.allow() {
                    tracing::warn!(error = %e, "DHCP receive failed");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(datagram) = buf.get(..len) else {
            continue;
        };
        let request = match decode_request(datagram) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "ignoring datagram");
                continue;
            }
        };
        let from = match peer.ip() {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
                Some(ip) => ip,
                None => continue,
            },
        };
        let outcome = match listener {
            Listener::Dhcp(_) => handle(&request, from, &settings, machines.as_ref()),
            Listener::BootServer => handle_boot_server(
                &request,
                SocketAddrV4::new(from, peer.port()),
                &settings,
                machines.as_ref(),
            ),
        };
        match outcome {
            Outcome::Reply {
                reply,
                machine,
                event,
                client,
                foreign_address,
            } => {
                let kind = reply.message_type();
                let bytes = reply.wire();
                // One budget check per packet: its lines are written together or not at all.
                let log = MACHINE_LOG.allow(&machine.mac);
                if bytes.is_empty() {
                    if log {
                        tracing::error!(machine = %machine.name, mac = %machine.mac, "cannot encode DHCP reply");
                    }
                    continue;
                }
                if let Some(address) = foreign_address {
                    if log && foreign.allow(machine.mac, Instant::now()) {
                        warn_foreign_address(&machine, address);
                    }
                }
                let file = reply.message.fname_str().and_then(Result::ok).unwrap_or("");
                if let BootClient::Unknown { arch } = client {
                    if log {
                        tracing::warn!(machine = %machine.name, mac = %machine.mac, arch = ?arch, "unsupported network-boot architecture: plain DHCP, no boot file");
                    }
                }
                let destination = match listener {
                    Listener::Dhcp(ports) => ports.map(reply.destination),
                    Listener::BootServer => reply.destination,
                };
                let what = match (listener, settings.mode) {
                    (Listener::Dhcp(_), DhcpMode::Standalone) => "DHCP reply sent",
                    (Listener::Dhcp(_), DhcpMode::Proxy) => "ProxyDHCP reply sent",
                    (Listener::BootServer, _) => "PXE boot server reply sent",
                };
                // What opens the machine's window for its imaging script (an ACK; in proxy
                // mode the answer to its iPXE) is recorded before the reply leaves: iPXE asks
                // for the script as soon as it has the reply, and a request that overtook the
                // record would be refused (seen in a boot storm: 403 "no recent DHCP lease").
                // Should the send fail, the client asks again and starts a new cycle anyway.
                let event = match event {
                    Some(event @ (BootEvent::DhcpAcked | BootEvent::ProxyScriptOffered)) => {
                        machines.observe(&machine, event);
                        None
                    }
                    other => other,
                };
                match socket.send(bytes, destination, ifindex).await {
                    Ok(_) if log => tracing::info!(
                        machine = %machine.name, mac = %machine.mac, ip = %machine.ip,
                        reply = ?kind.unwrap_or(dhcproto::v4::MessageType::Unknown(0)),
                        client = ?client, file, to = %destination, mode = %settings.mode, "{what}"
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        if log {
                            tracing::warn!(machine = %machine.name, mac = %machine.mac, to = %destination, error = %e, "DHCP send failed");
                        }
                        continue;
                    }
                }
                if let Some(event) = event {
                    machines.observe(&machine, event);
                }
            }
            Outcome::Report { machine, event } => {
                if MACHINE_LOG.allow(&machine.mac) {
                    match event {
                        BootEvent::DhcpDeclined => {
                            tracing::warn!(machine = %machine.name, mac = %machine.mac, ip = %machine.ip, "client declined its reserved address: is it in use by another host?")
                        }
                        _ => {
                            tracing::info!(machine = %machine.name, mac = %machine.mac, ip = %machine.ip, event = ?event, "DHCP lease event")
                        }
                    }
                }
                machines.observe(&machine, event);
            }
            Outcome::ForeignAddress {
                machine,
                address,
                ignored,
            } => {
                if foreign.allow(machine.mac, Instant::now()) && MACHINE_LOG.allow(&machine.mac) {
                    warn_foreign_address(&machine, address);
                }
                tracing::debug!(%peer, mac = %machine.mac, reason = ?ignored, "DHCP request left to the LAN's server");
            }
            Outcome::UnknownMac(mac) => {
                if unknown.allow(mac, Instant::now()) {
                    let skipped = unknown.take_suppressed();
                    tracing::info!(mac = %mac, %peer, skipped, "no reservation for this MAC: not answering (logged once a minute per MAC)");
                }
            }
            Outcome::Ignored(why) => {
                if let Ignored::OutsideSubnet(ip) = why {
                    if REFUSED_LOG.allow() {
                        tracing::warn!(ip = %ip, subnet = %settings.subnet, "reservation outside the served subnet: not answering");
                    }
                } else if why.is_refusal() {
                    if REFUSED_LOG.allow() {
                        let mac = MacAddr::from_slice(request.chaddr());
                        let mac = mac.as_ref().map(tracing::field::display);
                        tracing::warn!(%peer, mac, reason = ?why, "DHCP packet refused: not answered, nothing recorded");
                    }
                } else {
                    tracing::debug!(%peer, reason = ?why, "DHCP request ignored");
                }
            }
        }
    }
    match listener {
        Listener::Dhcp(_) => tracing::info!("DHCP server stopped"),
        Listener::BootServer => tracing::info!("PXE boot server stopped"),
    }
    Ok(())
}

#[cfg(test)]
mod tests;
