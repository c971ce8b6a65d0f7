//! The protocol core: one request in, at most one reply out. Pure: no I/O, no clock.
//!
//! Where replies go, and which packets are believed, follows RFC 2131 with the sender's
//! address checked where it can be:
//!
//! * A relayed packet (`giaddr` set) is answered only when `giaddr` and the address it came
//!   from are both configured relays ([`DhcpSettings::relays`], none by default); otherwise
//!   anyone could have replies sent to any address.
//! * A reply is unicast to `ciaddr` only where the client says it has that address: a REQUEST
//!   in RENEWING or REBINDING (`ciaddr` set, no server identifier) and an INFORM, and only when
//!   `ciaddr` is the client's reservation and the packet came from it. Everything else is
//!   broadcast (or silence).
//! * RELEASE and DECLINE change nothing unless they match the client: our server identifier
//!   (which RFC 2131 requires in both), the reservation as `ciaddr` (RELEASE, sent from it) or
//!   as the requested address (DECLINE). The chaddr is the only proof of the MAC a UDP socket
//!   sees; the link-layer source is not visible here.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};

use super::boot::{boot_client, boot_file, BootClient, BootFile};
use super::packet::{encode_ordered, max_payload, PacketError};
use super::DhcpSettings;
use crate::{BootEvent, MacAddr, Machine, MachineLookup};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;

/// A reply and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub message: Message,
    pub destination: SocketAddr,
    /// Order of options on the wire: 53 and 54 first, then the client's parameter request list.
    pub option_order: Vec<OptionCode>,
    /// `message` encoded in `option_order`, already checked against the client's size limit.
    wire: Vec<u8>,
}

impl Reply {
    /// The datagram to send.
    pub fn to_bytes(&self) -> Result<Vec<u8>, PacketError> {
        Ok(self.wire.clone())
    }

    /// The datagram to send, without copying.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    pub fn message_type(&self) -> Option<MessageType> {
        self.message.opts().msg_type()
    }
}

/// Why a request got no reply (besides an unknown MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// A BOOTREPLY, or not Ethernet.
    NotEthernetRequest,
    /// No option 53: a BOOTP client, which we do not serve.
    Bootp,
    /// A message type a server never receives (OFFER, ACK, …).
    UnexpectedType(MessageType),
    /// REQUEST, RELEASE or DECLINE addressed to another server (option 54): RFC 2131 §4.3.2.
    OtherServer(Ipv4Addr),
    /// REQUEST naming no address at all (no option 50, no ciaddr).
    NoAddress,
    /// The reservation is outside the served subnet (inventory error).
    OutsideSubnet(Ipv4Addr),
    /// Proxy mode: not a network-boot client we have a boot file for (an ordinary DHCP client,
    /// or firmware of an architecture without a loader): the LAN's DHCP server answers it.
    NotBootClient,
    /// Proxy mode: a message only the LAN's DHCP server answers (a REQUEST without our server
    /// identifier, RELEASE, DECLINE, INFORM).
    LanServer(MessageType),
    /// A boot-server request (UDP 4011) from a sender without an address, or not from the
    /// address it names as `ciaddr`: the answer is unicast to the sender.
    NoClientAddress { ciaddr: Ipv4Addr, from: Ipv4Addr },
    /// Relayed (`giaddr` set) but `giaddr` or the sender is not a configured relay.
    UntrustedRelay { giaddr: Ipv4Addr, from: Ipv4Addr },
    /// Claims an address (`ciaddr` of a RENEWING REQUEST or an INFORM) that is not the
    /// client's reservation, or was not sent from it.
    NotFromClient { ciaddr: Ipv4Addr, from: Ipv4Addr },
    /// A RELEASE or DECLINE that does not match the client (wrong or missing server
    /// identifier, address or sender).
    NotTheClient {
        kind: MessageType,
        reason: &'static str,
    },
}

impl Ignored {
    /// Whether this is a packet someone may have forged (logged as a refusal), rather than
    /// ordinary noise.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Ignored::UntrustedRelay { .. }
                | Ignored::NotFromClient { .. }
                | Ignored::NoClientAddress { .. }
                | Ignored::NotTheClient { .. }
        )
    }
}

/// What [`handle`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send `reply`; report `event`, if any, for `machine`.
    Reply {
        reply: Box<Reply>,
        machine: Machine,
        event: Option<BootEvent>,
        client: BootClient,
        /// Proxy mode: an address the client says it has or asks for (ciaddr, option 50, the
        /// sender) that is not its reservation. Always `None` in stand-alone mode, where such
        /// requests are NAKed.
        foreign_address: Option<Ipv4Addr>,
    },
    /// Nothing to send, something to report (RELEASE, DECLINE).
    Report {
        machine: Machine,
        event: BootEvent,
    },
    /// Proxy mode: nothing to send, but the machine names an address that is not its
    /// reservation (`address`: what the LAN's DHCP server gave it or offers it).
    ForeignAddress {
        machine: Machine,
        address: Ipv4Addr,
        ignored: Ignored,
    },
    /// Not a reserved MAC: stay silent.
    UnknownMac(MacAddr),
    Ignored(Ignored),
}

impl Outcome {
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Outcome::Reply { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

pub(super) fn server_id(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

pub(super) fn requested_ip(msg: &Message) -> Option<Ipv4Addr> {
    match msg.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

pub(super) fn nonzero(ip: Ipv4Addr) -> Option<Ipv4Addr> {
    (!ip.is_unspecified()).then_some(ip)
}

/// Where a reply goes. Relayed (by a configured relay): to the relay's server port. A client
/// that has its address (`unicast`: RENEWING, REBINDING, INFORM, checked by [`handle`]):
/// unicast to it. Otherwise broadcast: the client has no address yet, and a unicast to
/// `yiaddr` would need a static ARP entry, i.e. CAP_NET_ADMIN, which we do not have. NAKs are
/// always broadcast unless relayed (RFC 2131 §4.3.2).
pub(super) fn destination(
    request: &Message,
    kind: MessageType,
    unicast: Option<Ipv4Addr>,
) -> SocketAddr {
    let to = |ip: Ipv4Addr, port| SocketAddr::V4(SocketAddrV4::new(ip, port));
    if let Some(giaddr) = nonzero(request.giaddr()) {
        return to(giaddr, SERVER_PORT);
    }
    match unicast {
        Some(ciaddr) if kind != MessageType::Nak => to(ciaddr, CLIENT_PORT),
        _ => to(Ipv4Addr::BROADCAST, CLIENT_PORT),
    }
}

/// The reply skeleton: BOOTREPLY echoing xid, flags, giaddr and chaddr.
fn skeleton(request: &Message, kind: MessageType, settings: &DhcpSettings) -> Message {
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootReply)
        .set_htype(HType::Eth)
        .set_xid(request.xid())
        .set_chaddr(request.chaddr())
        .set_giaddr(request.giaddr());
    let mut flags = request.flags();
    if kind == MessageType::Nak && !request.giaddr().is_unspecified() {
        flags = flags.set_broadcast();
    }
    msg.set_flags(flags);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ServerIdentifier(settings.server_ip));
    if let Some(id) = request.opts().get(OptionCode::ClientIdentifier) {
        // RFC 6842: echo the client identifier.
        opts.insert(id.clone());
    }
    msg
}

/// Option order on the wire: 53, 54, then the parameter request list, then the rest.
fn option_order(request: &Message) -> Vec<OptionCode> {
    let mut order = vec![OptionCode::MessageType, OptionCode::ServerIdentifier];
    if let Some(DhcpOption::ParameterRequestList(prl)) =
        request.opts().get(OptionCode::ParameterRequestList)
    {
        for code in prl {
            if !order.contains(code) {
                order.push(*code);
            }
        }
    }
    order
}

/// Options that are never dropped to respect the client's maximum message size.
const ESSENTIAL: [OptionCode; 4] = [
    OptionCode::MessageType,
    OptionCode::ServerIdentifier,
    OptionCode::AddressLeaseTime,
    OptionCode::Message,
];

/// Builds the reply, dropping the least wanted options (last in wire order) until it fits the
/// client's maximum message size.
pub(super) fn finish(
    request: &Message,
    mut message: Message,
    kind: MessageType,
    unicast: Option<Ipv4Addr>,
) -> Reply {
    let option_order = option_order(request);
    let limit = max_payload(request);
    // Encoding only fails on overflowing lengths, which the options built here cannot reach;
    // should it happen, the wire form is empty and `serve` sends nothing.
    let wire = loop {
        let encoded = encode_ordered(&message, &option_order).unwrap_or_default();
        if !encoded.is_empty() && encoded.len() <= limit {
            break encoded;
        }
        let mut wire_order: Vec<OptionCode> = option_order.clone();
        let mut rest: Vec<OptionCode> = message
            .opts()
            .iter()
            .map(|(c, _)| *c)
            .filter(|c| !wire_order.contains(c))
            .collect();
        rest.sort_by_key(|c| u8::from(*c));
        wire_order.extend(rest);
        let victim = wire_order
            .iter()
            .rev()
            .find(|c| !ESSENTIAL.contains(c) && message.opts().get(**c).is_some())
            .copied();
        match victim {
            Some(code) => {
                message.opts_mut().remove(code);
            }
            None => break encoded,
        }
    };
    Reply {
        message,
        destination: destination(request, kind, unicast),
        option_order,
        wire,
    }
}

fn nak(request: &Message, settings: &DhcpSettings, text: &str) -> Reply {
    let mut msg = skeleton(request, MessageType::Nak, settings);
    msg.opts_mut().insert(DhcpOption::Message(text.to_string()));
    finish(request, msg, MessageType::Nak, None)
}

fn lease_secs(settings: &DhcpSettings) -> u32 {
    u32::try_from(settings.lease_time.as_secs())
        .unwrap_or(u32::MAX - 1)
        .max(1)
}

/// What every reply that boots `client` starts with, stand-alone or proxy: the skeleton, the
/// boot file's `siaddr` and, in an ACK, the client's `ciaddr`; and the boot file, whose name and
/// options the caller adds.
pub(super) fn boot_reply(
    request: &Message,
    kind: MessageType,
    machine: &Machine,
    client: BootClient,
    settings: &DhcpSettings,
) -> (Message, BootFile) {
    let mut msg = skeleton(request, kind, settings);
    let boot = boot_file(client, machine, settings);
    msg.set_siaddr(boot.next_server);
    if kind == MessageType::Ack {
        msg.set_ciaddr(request.ciaddr());
    }
    (msg, boot)
}

/// OFFER, ACK, or ACK to an INFORM (no `yiaddr`, no lease); `unicast`: the client's own
/// address, when the reply may go there.
fn configure(
    request: &Message,
    kind: MessageType,
    inform: bool,
    unicast: Option<Ipv4Addr>,
    machine: &Machine,
    client: BootClient,
    settings: &DhcpSettings,
) -> Reply {
    let (mut msg, boot) = boot_reply(request, kind, machine, client, settings);
    if !inform {
        msg.set_yiaddr(machine.ip);
    }
    let opts = msg.opts_mut();
    if !inform {
        let lease = lease_secs(settings);
        opts.insert(DhcpOption::AddressLeaseTime(lease));
        opts.insert(DhcpOption::Renewal(lease / 2));
        opts.insert(DhcpOption::Rebinding((u64::from(lease) * 7 / 8) as u32));
    }
    opts.insert(DhcpOption::SubnetMask(settings.subnet.netmask()));
    if let Some(gateway) = settings.gateway {
        opts.insert(DhcpOption::Router(vec![gateway]));
    }
    if !settings.dns_servers.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(settings.dns_servers.clone()));
    }
    opts.insert(DhcpOption::Hostname(machine.hostname().to_string()));
    if let Some(file) = &boot.file {
        opts.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
    }
    for option in boot.options {
        opts.insert(option);
    }
    if matches!(
        client,
        BootClient::Bios | BootClient::UefiX64 | BootClient::UefiHttp
    ) {
        // PXE (RFC 4578) and EDK2 expect their client UUID back.
        if let Some(uuid) = request.opts().get(OptionCode::ClientMachineIdentifier) {
            opts.insert(uuid.clone());
        }
    }
    if let Some(file) = &boot.file {
        // The BOOTP `file` field holds 127 bytes and a NUL; longer names go in option 67 only.
        if file.len() < 128 {
            msg.set_fname_str(file);
        }
    }
    finish(request, msg, kind, unicast)
}

/// The checks every request passes first: an Ethernet BOOTREQUEST with a DHCP message type,
/// relayed only by a configured relay, from a reserved MAC inside the subnet. Gives the message
/// type and the machine, or the outcome to stop at.
pub(super) fn admit(
    request: &Message,
    from: Ipv4Addr,
    settings: &DhcpSettings,
    machines: &dyn MachineLookup,
) -> Result<(MessageType, Machine), Outcome> {
    if request.opcode() != Opcode::BootRequest || request.htype() != HType::Eth {
        return Err(Outcome::Ignored(Ignored::NotEthernetRequest));
    }
    let Some(mac) = MacAddr::from_slice(request.chaddr()).filter(|_| request.hlen() == 6) else {
        return Err(Outcome::Ignored(Ignored::NotEthernetRequest));
    };
    let Some(kind) = request.opts().msg_type() else {
        return Err(Outcome::Ignored(Ignored::Bootp));
    };
    if let Some(giaddr) = nonzero(request.giaddr()) {
        if !settings.relays.contains(&giaddr) || !settings.relays.contains(&from) {
            return Err(Outcome::Ignored(Ignored::UntrustedRelay { giaddr, from }));
        }
    }
    let Some(machine) = machines.by_mac(&mac) else {
        return Err(Outcome::UnknownMac(mac));
    };
    if !settings.subnet.contains(&machine.ip) {
        return Err(Outcome::Ignored(Ignored::OutsideSubnet(machine.ip)));
    }
    Ok((kind, machine))
}

/// Decides the answer to one decoded request, which came from `from` (the datagram's source
/// address: 0.0.0.0 for a client without one) to the DHCP server port. Replies only for
/// reserved MACs. In proxy mode ([`DhcpMode::Proxy`](super::DhcpMode)) see
/// [`super::proxy`]: boot information only, never an address.
pub fn handle(
    request: &Message,
    from: Ipv4Addr,
    settings: &DhcpSettings,
    machines: &dyn MachineLookup,
) -> Outcome {
    if settings.mode == super::DhcpMode::Proxy {
        return super::proxy::handle_dhcp_port(request, from, settings, machines);
    }
    let (kind, machine) = match admit(request, from, settings, machines) {
        Ok(admitted) => admitted,
        Err(outcome) => return outcome,
    };
    let relayed = nonzero(request.giaddr());
    let client = boot_client(request);
    let sid = server_id(request);
    let other_server = sid.filter(|id| *id != settings.server_ip);
    let ciaddr = nonzero(request.ciaddr());
    // The client's own address, where it says it has one (RENEWING/REBINDING, INFORM) and
    // the packet came from it (or from a configured relay, which sends from its own).
    let own_address = |ciaddr: Ipv4Addr| -> Result<Ipv4Addr, Outcome> {
        if ciaddr == machine.ip && (relayed.is_some() || from == ciaddr) {
            Ok(ciaddr)
        } else {
            Err(Outcome::Ignored(Ignored::NotFromClient { ciaddr, from }))
        }
    };
    let not_the_client = |reason| Outcome::Ignored(Ignored::NotTheClient { kind, reason });
    let reply = |reply, event| Outcome::Reply {
        reply: Box::new(reply),
        machine: machine.clone(),
        event,
        client,
        foreign_address: None,
    };
    match kind {
        MessageType::Discover => {
            // A DISCOVER's ciaddr is meaningless (RFC 2131 Table 5): the offer is broadcast.
            let offer = configure(
                request,
                MessageType::Offer,
                false,
                None,
                &machine,
                client,
                settings,
            );
            reply(offer, Some(BootEvent::DhcpOffered))
        }
        MessageType::Request => {
            if let Some(other) = other_server {
                return Outcome::Ignored(Ignored::OtherServer(other));
            }
            let named: Vec<Ipv4Addr> = requested_ip(request).into_iter().chain(ciaddr).collect();
            if named.is_empty() {
                return Outcome::Ignored(Ignored::NoAddress);
            }
            if named.iter().any(|ip| *ip != machine.ip) {
                let text = format!(
                    "address not reserved for this client (reserved: {})",
                    machine.ip
                );
                return reply(nak(request, settings, &text), None);
            }
            // RENEWING or REBINDING: ciaddr set and no server identifier (RFC 2131 §4.3.2).
            // SELECTING and INIT-REBOOT clients have no address yet: broadcast.
            let unicast = match ciaddr {
                Some(ciaddr) if sid.is_none() => match own_address(ciaddr) {
                    Ok(ip) => Some(ip),
                    Err(ignored) => return ignored,
                },
                _ => None,
            };
            let ack = configure(
                request,
                MessageType::Ack,
                false,
                unicast,
                &machine,
                client,
                settings,
            );
            reply(ack, Some(BootEvent::DhcpAcked))
        }
        MessageType::Inform => {
            // The client configured its address itself; it must be the reservation, or the
            // ACK would be unicast to whatever address the packet names.
            let Some(ciaddr) = ciaddr else {
                return Outcome::Ignored(Ignored::NoAddress);
            };
            let unicast = match own_address(ciaddr) {
                Ok(ip) => ip,
                Err(ignored) => return ignored,
            };
            reply(
                configure(
                    request,
                    MessageType::Ack,
                    true,
                    Some(unicast),
                    &machine,
                    client,
                    settings,
                ),
                None,
            )
        }
        MessageType::Release | MessageType::Decline => {
            if let Some(other) = other_server {
                return Outcome::Ignored(Ignored::OtherServer(other));
            }
            if sid.is_none() {
                return not_the_client("no server identifier");
            }
            let event = if kind == MessageType::Release {
                // Sent by a bound client from its address, which it names in ciaddr.
                match ciaddr {
                    Some(ciaddr) if own_address(ciaddr).is_ok() => {}
                    Some(_) => {
                        return not_the_client("ciaddr is not the reservation or not the sender")
                    }
                    None => return not_the_client("no ciaddr"),
                }
                BootEvent::DhcpReleased
            } else {
                // Sent before the client uses the address, which it names in option 50.
                if requested_ip(request) != Some(machine.ip) {
                    return not_the_client("requested address is not the reservation");
                }
                BootEvent::DhcpDeclined
            };
            Outcome::Report { machine, event }
        }
        other => Outcome::Ignored(Ignored::UnexpectedType(other)),
    }
}
