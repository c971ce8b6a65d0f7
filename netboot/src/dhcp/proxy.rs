//! ProxyDHCP (PXE 2.1 §2.2.3, as Pixiecore and dnsmasq's `dhcp-range=…,proxy` do it): the
//! LAN's DHCP server gives every machine its address, netboot only tells network-boot clients
//! of reserved machines what to boot. Pure, like [`super::handle`].
//!
//! On the DHCP port (67), in proxy mode:
//!
//! * A DISCOVER from a PXE, iPXE or UEFI HTTP Boot client of a reserved MAC gets a ProxyDHCP
//!   OFFER: `yiaddr` 0.0.0.0, our server identifier (54), vendor class (60) `PXEClient` (or
//!   `HTTPClient`), the client's UUID (97) echoed, `siaddr` and the boot file (`file` field and
//!   option 67, the same choice as in stand-alone mode), and for PXE and iPXE the PXE vendor
//!   option (43) with discovery control (sub-option 6) = 8: boot the file named here, no
//!   boot-server discovery. No lease time, mask, router or DNS server: those are the LAN
//!   server's.
//! * A REQUEST naming our server identifier (firmware that took the proxy offer for the one to
//!   request from) gets an ACK of the same shape, still without `yiaddr`, as dnsmasq answers
//!   it. Every other REQUEST, and RELEASE, DECLINE and INFORM, are the LAN server's business:
//!   no answer, never a NAK.
//! * Ordinary DHCP clients, unknown MACs and architectures without a loader get nothing.
//!
//! On the PXE boot-server port (4011), [`handle_boot_server`]: a REQUEST (or INFORM) from a
//! client that already has its address, as EDK2 sends one for a ProxyDHCP offer it classifies
//! as "BINL" (`PXEClient` without discovery options), gets a DHCPACK with the boot file,
//! unicast back to the address and port it came from.
//!
//! Whenever a reserved machine names an address that is not its reservation (option 50,
//! `ciaddr`, or the address it sends from), the outcome says so: the LAN's DHCP server gave it
//! another address, and its imaging script, which is only served to the reserved address, will
//! be refused.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};

use super::boot::{boot_client, BootClient, HTTP_CLIENT, PXE_CLIENT};
use super::handle::{
    admit, boot_reply, destination, finish, nonzero, requested_ip, server_id, Ignored, Outcome,
    Reply,
};
use super::DhcpSettings;
use crate::{BootEvent, Machine, MachineLookup};

/// The PXE boot-server port: boot-server discovery and EDK2's request for a BINL offer's file.
pub const BOOT_SERVER_PORT: u16 = 4011;

/// PXE vendor options (43): discovery control (sub-option 6) = 8, "boot the file named in this
/// offer, no boot-server discovery", then END.
const PXE_DISCOVERY_CONTROL_SKIP: [u8; 4] = [6, 1, 8, 255];

/// The first address among those the request names (option 50, `ciaddr`, then `from` unless
/// relayed) that is not the machine's reservation.
fn foreign_address(request: &Message, from: Ipv4Addr, machine: &Machine) -> Option<Ipv4Addr> {
    let sender = nonzero(request.giaddr()).is_none().then_some(from);
    requested_ip(request)
        .into_iter()
        .chain(nonzero(request.ciaddr()))
        .chain(sender.and_then(nonzero))
        .find(|ip| *ip != machine.ip)
}

/// Whether proxy mode answers this kind of client at all.
fn is_boot_client(client: BootClient) -> bool {
    matches!(
        client,
        BootClient::Ipxe { .. } | BootClient::Bios | BootClient::UefiX64 | BootClient::UefiHttp
    )
}

/// The ProxyDHCP answer (`kind` OFFER or ACK) for `client`: boot information, no address.
fn proxy_reply(
    request: &Message,
    kind: MessageType,
    to: SocketAddr,
    machine: &Machine,
    client: BootClient,
    settings: &DhcpSettings,
) -> Reply {
    let (mut msg, boot) = boot_reply(request, kind, machine, client, settings);
    let opts = msg.opts_mut();
    if let Some(file) = &boot.file {
        opts.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
    }
    // The stand-alone options of this client, less iPXE's 175 (no-pxedhcp: about waiting for
    // offers like this one, and only read from the offer that carries an address).
    for option in boot.options {
        if !matches!(option, DhcpOption::Unknown(_)) {
            opts.insert(option);
        }
    }
    if client == BootClient::UefiHttp {
        opts.insert(DhcpOption::ClassIdentifier(HTTP_CLIENT.to_vec()));
    } else {
        // `PXEClient` makes it a ProxyDHCP offer for PXE firmware and for iPXE; discovery
        // control 8 sends both to the file named here.
        opts.insert(DhcpOption::ClassIdentifier(PXE_CLIENT.to_vec()));
        opts.insert(DhcpOption::VendorExtensions(
            PXE_DISCOVERY_CONTROL_SKIP.to_vec(),
        ));
    }
    if let Some(uuid) = request.opts().get(OptionCode::ClientMachineIdentifier) {
        opts.insert(uuid.clone());
    }
    if let Some(file) = &boot.file {
        // The BOOTP `file` field holds 127 bytes and a NUL; longer names go in option 67 only.
        if file.len() < 128 {
            msg.set_fname_str(file);
        }
    }
    let mut reply = finish(request, msg, kind, None);
    reply.destination = to;
    reply
}

/// What a ProxyDHCP answer to `client` reports: iPXE's opens its imaging-script window.
fn event_for(client: BootClient) -> BootEvent {
    match client {
        BootClient::Ipxe { .. } => BootEvent::ProxyScriptOffered,
        _ => BootEvent::ProxyOffered,
    }
}

/// Proxy mode, the DHCP server port: see the module documentation.
pub(super) fn handle_dhcp_port(
    request: &Message,
    from: Ipv4Addr,
    settings: &DhcpSettings,
    machines: &dyn MachineLookup,
) -> Outcome {
    let (kind, machine) = match admit(request, from, settings, machines) {
        Ok(admitted) => admitted,
        Err(outcome) => return outcome,
    };
    let client = boot_client(request);
    let foreign = foreign_address(request, from, &machine);
    let silent = |ignored: Ignored| match foreign {
        Some(address) => Outcome::ForeignAddress {
            machine: machine.clone(),
            address,
            ignored,
        },
        None => Outcome::Ignored(ignored),
    };
    match kind {
        MessageType::Discover => {}
        MessageType::Request => match server_id(request) {
            Some(id) if id == settings.server_ip => {}
            Some(other) => return silent(Ignored::OtherServer(other)),
            None => return silent(Ignored::LanServer(kind)),
        },
        MessageType::Release | MessageType::Decline | MessageType::Inform => {
            return silent(Ignored::LanServer(kind))
        }
        other => return Outcome::Ignored(Ignored::UnexpectedType(other)),
    }
    if !is_boot_client(client) {
        return silent(Ignored::NotBootClient);
    }
    let (reply_kind, unicast) = if kind == MessageType::Discover {
        (MessageType::Offer, None)
    } else {
        // A REQUEST to us from a client that has its address (and sends from it) is answered
        // there; one without is broadcast, as every offer is.
        let ciaddr = nonzero(request.ciaddr()).filter(|c| *c == from);
        (MessageType::Ack, ciaddr)
    };
    let to = destination(request, reply_kind, unicast);
    Outcome::Reply {
        reply: Box::new(proxy_reply(
            request, reply_kind, to, &machine, client, settings,
        )),
        machine,
        event: Some(event_for(client)),
        client,
        foreign_address: foreign,
    }
}

/// A request to the PXE boot-server port (UDP 4011) from `peer`, in proxy mode: a REQUEST or
/// INFORM from a PXE, iPXE or HTTP Boot client of a reserved MAC that has an address (the
/// sender, and `ciaddr` when set) gets a DHCPACK with its boot file, unicast to `peer`.
/// Relay agents play no part here (the client sends from its own address); `giaddr` is not
/// read.
pub fn handle_boot_server(
    request: &Message,
    peer: SocketAddrV4,
    settings: &DhcpSettings,
    machines: &dyn MachineLookup,
) -> Outcome {
    let from = *peer.ip();
    let mut direct = request.clone();
    direct.set_giaddr(Ipv4Addr::UNSPECIFIED);
    let (kind, machine) = match admit(&direct, from, settings, machines) {
        Ok(admitted) => admitted,
        Err(outcome) => return outcome,
    };
    if !matches!(kind, MessageType::Request | MessageType::Inform) {
        return Outcome::Ignored(Ignored::UnexpectedType(kind));
    }
    let ciaddr = request.ciaddr();
    let addressed = nonzero(from).is_some()
        && !from.is_broadcast()
        && !from.is_multicast()
        && (ciaddr.is_unspecified() || ciaddr == from);
    if !addressed {
        return Outcome::Ignored(Ignored::NoClientAddress { ciaddr, from });
    }
    let client = boot_client(request);
    let foreign = foreign_address(&direct, from, &machine);
    if !is_boot_client(client) {
        return match foreign {
            Some(address) => Outcome::ForeignAddress {
                machine,
                address,
                ignored: Ignored::NotBootClient,
            },
            None => Outcome::Ignored(Ignored::NotBootClient),
        };
    }
    let reply = proxy_reply(
        &direct,
        MessageType::Ack,
        SocketAddr::V4(peer),
        &machine,
        client,
        settings,
    );
    Outcome::Reply {
        reply: Box::new(reply),
        machine,
        event: Some(event_for(client)),
        client,
        foreign_address: foreign,
    }
}
