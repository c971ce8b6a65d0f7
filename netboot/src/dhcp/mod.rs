//! DHCP server for reserved machines only.
//!
//! Answers DISCOVER, REQUEST and INFORM from MACs that [`MachineLookup::by_mac`] knows, with the
//! reserved address and a boot file chosen from the client's options (see [`boot_client`] and
//! [`boot_file`]); stays silent for everyone else. The protocol core ([`handle`]) is pure; the
//! [`serve`] loop only decodes, calls it, sends, logs and reports [`BootEvent`]s.
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
mod socket;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use boot::{
    boot_client, boot_file, ipxe_script_url, BootClient, BootFile, HTTP_CLIENT, PXE_CLIENT,
};
pub use handle::{handle, Ignored, Outcome, Reply, CLIENT_PORT, SERVER_PORT};
pub use packet::{decode_request, PacketError};

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

/// What the DHCP server hands out besides each machine's reserved address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpSettings {
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

/// Serves DHCP on an already-bound socket (usually `0.0.0.0:67` on the provisioning interface,
/// possibly passed by systemd) until `shutdown` is cancelled. Sets `SO_BROADCAST` itself.
pub async fn serve(
    socket: UdpSocket,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    run(socket, settings, machines, shutdown, Ports::STANDARD).await
}

/// [`serve`] on a thread of its own, with a single-threaded runtime that polls this socket
/// alone: an answer never waits for other work of the process (a cluster controller writing
/// a burst of status changes, TLS, JSON) to yield a shared runtime's worker or to poll its I/O
/// driver. The future ends when that server does (shutdown, or a fatal socket error).
pub fn serve_on_own_thread(
    socket: std::net::UdpSocket,
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
                        serve(UdpSocket::from_std(socket)?, settings, machines, shutdown).await
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

async fn run(
    socket: UdpSocket,
    settings: Arc<DhcpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
    ports: Ports,
) -> io::Result<()> {
    let socket = socket::PktInfoSocket::new(socket)?;
    // Absorb bursts (a rack powering on): best effort, capped by net.core.rmem_max.
    if let Err(e) = socket2::SockRef::from(socket.inner()).set_recv_buffer_size(1 << 20) {
        tracing::debug!(error = %e, "cannot enlarge the DHCP receive buffer");
    }
    tracing::info!(local = %socket.local_addr()?, server_ip = %settings.server_ip, "DHCP server ready");
    let mut unknown = LogLimiter::new(4096, Duration::from_secs(60));
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
        match handle(&request, from, &settings, machines.as_ref()) {
            Outcome::Reply {
                reply,
                machine,
                event,
                client,
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
                let file = reply.message.fname_str().and_then(Result::ok).unwrap_or("");
                if let BootClient::Unknown { arch } = client {
                    if log {
                        tracing::warn!(machine = %machine.name, mac = %machine.mac, arch = ?arch, "unsupported network-boot architecture: plain DHCP, no boot file");
                    }
                }
                let destination = ports.map(reply.destination);
                match socket.send(bytes, destination, ifindex).await {
                    Ok(_) if log => tracing::info!(
                        machine = %machine.name, mac = %machine.mac, ip = %machine.ip,
                        reply = ?kind.unwrap_or(dhcproto::v4::MessageType::Unknown(0)),
                        client = ?client, file, to = %destination, "DHCP reply sent"
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
    tracing::info!("DHCP server stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
