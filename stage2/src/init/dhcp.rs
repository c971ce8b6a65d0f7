//! A DHCPv4 client for one interface (dhcproto messages): DISCOVER → OFFER → REQUEST → ACK,
//! with retries and exponential back-off. The exchange runs over a UDP socket bound to the
//! interface (`SO_BINDTODEVICE`) with `SO_BROADCAST`; requests set the broadcast flag so the
//! server's replies reach an interface that has no address yet.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use wire::dhcp::{filter_options, MAGIC_COOKIE, OPTIONS_OFFSET};

pub const CLIENT_PORT: u16 = 68;
pub const SERVER_PORT: u16 = 67;

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("socket on {interface}: {source}")]
    Socket {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding a DHCP message: {0}")]
    Encode(#[from] dhcproto::error::EncodeError),
    #[error("no DHCP lease on {interface} after {attempts} attempts ({last})")]
    NoLease {
        interface: String,
        attempts: u32,
        last: String,
    },
    #[error("DHCP server {server} refused the request (NAK)")]
    Nak { server: Ipv4Addr },
    #[error("the ACK carries no usable address")]
    NoAddress,
}

/// What the server gave us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub lease_secs: Option<u32>,
    pub hostname: Option<String>,
}

/// A reply we can use, from the options we read.
#[derive(Debug, Clone)]
pub struct Reply {
    pub kind: MessageType,
    pub message: Message,
}

fn request_base(mac: [u8; 6], xid: u32, kind: MessageType, secs: u16) -> Message {
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootRequest)
        .set_htype(HType::Eth)
        .set_xid(xid)
        .set_secs(secs)
        .set_flags(Flags::default().set_broadcast())
        .set_chaddr(&mac);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8]; // hardware type Ethernet, then the MAC (RFC 2132 §9.14)
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::AddressLeaseTime,
        OptionCode::ServerIdentifier,
    ]));
    opts.insert(DhcpOption::ClassIdentifier(b"provisioner-stage2".to_vec()));
    msg
}

fn encode(msg: &Message) -> Result<Vec<u8>, DhcpError> {
    let mut buf = Vec::with_capacity(300);
    msg.encode(&mut Encoder::new(&mut buf))?;
    Ok(buf)
}

pub fn discover(mac: [u8; 6], xid: u32, secs: u16) -> Result<Vec<u8>, DhcpError> {
    encode(&request_base(mac, xid, MessageType::Discover, secs))
}

/// REQUEST for the address an OFFER made (SELECTING state: requested address and server id).
pub fn request(mac: [u8; 6], xid: u32, secs: u16, offer: &Message) -> Result<Vec<u8>, DhcpError> {
    let mut msg = request_base(mac, xid, MessageType::Request, secs);
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    if let Some(server) = server_id(offer) {
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(server));
    }
    encode(&msg)
}

fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

/// Whether option `code` with `len` value bytes is one the client reads and well formed.
fn keep_option(code: u8, len: usize) -> bool {
    match code {
        1 | 50 | 54 => len == 4,           // mask, requested address, server id
        3 | 6 => len >= 4 && len & 3 == 0, // routers, DNS servers
        51 | 58 | 59 => len == 4,          // lease, T1, T2
        53 => len == 1,                    // message type
        12 => len >= 1,                    // host name
        _ => false,
    }
}

/// Decodes a server's datagram if it is a reply to us (`xid`, `mac`). Options the client does
/// not read, and malformed ones, are dropped first ([`wire::dhcp`]: a PID 1 must not die of a
/// stray packet on the LAN); a reply with an option cut short is ignored whole. Never panics.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: [u8; 6]) -> Option<Reply> {
    if bytes.len() < OPTIONS_OFFSET
        || bytes[0] != 2
        || bytes[1] != 1
        || bytes[2] != 6
        || bytes[4..8] != xid.to_be_bytes()
        || bytes[28..34] != mac
        || bytes[OPTIONS_OFFSET - 4..OPTIONS_OFFSET] != MAGIC_COOKIE
    {
        return None;
    }
    let filtered = filter_options(bytes, keep_option);
    if filtered.truncated {
        return None;
    }
    let message = Message::decode(&mut Decoder::new(&filtered.packet)).ok()?;
    let kind = message.opts().msg_type()?;
    Some(Reply { kind, message })
}

/// The lease an ACK describes.
pub fn lease_from_ack(ack: &Message) -> Result<Lease, DhcpError> {
    let address = ack.yiaddr();
    if address.is_unspecified() || address.is_broadcast() {
        return Err(DhcpError::NoAddress);
    }
    let opts = ack.opts();
    let prefix_len = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => u32::from(*mask).leading_ones() as u8,
        // RFC 2131 leaves the mask to the client: assume the classful default is wrong more
        // often than a /24 on a provisioning LAN.
        _ => 24,
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(routers)) => routers.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(servers)) => servers.clone(),
        _ => Vec::new(),
    };
    let lease_secs = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(secs)) => Some(*secs),
        _ => None,
    };
    let hostname = match opts.get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(name)) => Some(name.clone()),
        _ => None,
    };
    Ok(Lease {
        address,
        prefix_len,
        router,
        dns,
        server: server_id(ack).unwrap_or(ack.siaddr()),
        lease_secs,
        hostname,
    })
}

/// Retry policy: `attempts` DISCOVERs per call, waiting `first_wait` for an answer, doubling up
/// to `max_wait`.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub attempts: u32,
    pub first_wait: Duration,
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 6,
            first_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(8),
        }
    }
}

impl Retry {
    /// How long attempt `n` (0-based) waits for a reply.
    pub fn wait(&self, n: u32) -> Duration {
        let wait = self.first_wait.saturating_mul(1u32 << n.min(16));
        wait.min(self.max_wait)
    }
}

fn open_socket(interface: &str) -> Result<UdpSocket, DhcpError> {
    let socket_error = |source| DhcpError::Socket {
        interface: interface.to_string(),
        source,
    };
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(socket_error)?;
    socket.set_reuse_address(true).map_err(socket_error)?;
    socket.set_broadcast(true).map_err(socket_error)?;
    socket
        .bind_device(Some(interface.as_bytes()))
        .map_err(socket_error)?;
    socket
        .bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT).into())
        .map_err(socket_error)?;
    Ok(socket.into())
}

/// Waits until `deadline` for a reply of one of `kinds` to `xid`.
fn receive(
    socket: &UdpSocket,
    xid: u32,
    mac: [u8; 6],
    kinds: &[MessageType],
    deadline: Instant,
) -> Option<Reply> {
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        let Ok((len, from)) = socket.recv_from(&mut buf) else {
            return None; // timeout (or a socket error: the caller retries)
        };
        let Some(reply) = parse_reply(&buf[..len], xid, mac) else {
            tracing::debug!(%from, len, "ignored a datagram that is not a reply to us");
            continue;
        };
        if kinds.contains(&reply.kind) || reply.kind == MessageType::Nak {
            return Some(reply);
        }
    }
}

/// Gets a lease on `interface` (up, no address yet). Does not configure anything.
pub fn obtain_lease(interface: &str, mac: [u8; 6], retry: Retry) -> Result<Lease, DhcpError> {
    let socket = open_socket(interface)?;
    let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
    let started = Instant::now();
    let mut last = String::from("no reply");
    for attempt in 0..retry.attempts {
        let xid: u32 = rand_xid(mac, attempt);
        let secs = started.elapsed().as_secs().min(u16::MAX as u64) as u16;
        let wait = retry.wait(attempt);
        tracing::info!(
            interface,
            attempt = attempt + 1,
            xid = format_args!("{xid:08x}"),
            "DHCP discover"
        );
        if let Err(e) = socket.send_to(&discover(mac, xid, secs)?, broadcast) {
            last = format!("sending DISCOVER: {e}");
            std::thread::sleep(wait);
            continue;
        }
        let deadline = Instant::now() + wait;
        let Some(offer) = receive(&socket, xid, mac, &[MessageType::Offer], deadline) else {
            last = "no OFFER".into();
            continue;
        };
        if offer.kind != MessageType::Offer {
            last = format!("{:?} instead of an OFFER", offer.kind);
            continue;
        }
        let server = server_id(&offer.message);
        tracing::info!(interface, offered = %offer.message.yiaddr(), server = ?server, "DHCP offer");
        if let Err(e) = socket.send_to(&request(mac, xid, secs, &offer.message)?, broadcast) {
            last = format!("sending REQUEST: {e}");
            continue;
        }
        let deadline = Instant::now() + wait;
        match receive(&socket, xid, mac, &[MessageType::Ack], deadline) {
            Some(ack) if ack.kind == MessageType::Ack => return lease_from_ack(&ack.message),
            Some(nak) => {
                last = DhcpError::Nak {
                    server: server_id(&nak.message).unwrap_or(Ipv4Addr::UNSPECIFIED),
                }
                .to_string();
            }
            None => last = "no ACK".into(),
        }
    }
    Err(DhcpError::NoLease {
        interface: interface.to_string(),
        attempts: retry.attempts,
        last,
    })
}

/// A transaction id that differs per machine, boot and attempt. Not security relevant (DHCP
/// has none), only there to tell our replies from other clients'.
fn rand_xid(mac: [u8; 6], attempt: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mac_bits = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    nanos ^ mac_bits.rotate_left(13) ^ attempt.wrapping_mul(0x9e37_79b9)
}

// The exchange with netboot's DHCP server is tested in netboot/tests/stage2_dhcp.rs (netboot's
// server against this client), which keeps stage2 free of netboot and its HTTP stack.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_waits_double_up_to_the_cap() {
        let retry = Retry::default();
        let waits: Vec<u64> = (0..6).map(|n| retry.wait(n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 8, 8]);
        assert_eq!(retry.wait(40), Duration::from_secs(8));
    }
}
