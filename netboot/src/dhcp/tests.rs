//! Unit tests on hand-built requests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhcproto::v4::{
    Architecture, DhcpOption, Message, MessageType, Opcode, OptionCode, UnknownOption,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use super::*;
use crate::{BootEvent, MacAddr, Machine, MachineLookup};

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const STRANGER: MacAddr = MacAddr([0x52, 0x54, 0x00, 0xff, 0xff, 0xff]);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RESERVED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);
const UUID: [u8; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

fn settings() -> DhcpSettings {
    DhcpSettings {
        mode: DhcpMode::Standalone,
        server_ip: SERVER,
        subnet: "10.77.0.0/24".parse().expect("subnet"),
        gateway: Some(SERVER),
        dns_servers: vec![SERVER, Ipv4Addr::new(10, 77, 0, 2)],
        lease_time: Duration::from_secs(3600),
        bios_loader: "undionly.kpxe".into(),
        uefi_loader: "snponly.efi".into(),
        http_base: "http://10.77.0.1:8080".into(),
        relays: vec![],
    }
}

const RELAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);

/// [`settings`] with [`RELAY`] as a configured relay.
fn relay_settings() -> DhcpSettings {
    DhcpSettings {
        relays: vec![RELAY],
        ..settings()
    }
}

/// The source address a real client uses: its ciaddr when it has one, 0.0.0.0 otherwise;
/// a configured relay's own when relayed.
fn sender(msg: &Message) -> Ipv4Addr {
    if !msg.giaddr().is_unspecified() {
        msg.giaddr()
    } else {
        msg.ciaddr()
    }
}

fn node2() -> Machine {
    Machine {
        name: "node2".into(),
        mac: MAC,
        ip: RESERVED,
        hostname: Some("node2.lab".into()),
    }
}

fn inventory() -> HashMap<MacAddr, Machine> {
    HashMap::from([(MAC, node2())])
}

fn request(kind: MessageType, mac: MacAddr) -> Message {
    let mut msg = Message::default();
    msg.set_opcode(Opcode::BootRequest)
        .set_xid(0x1234_5678)
        .set_chaddr(&mac.0);
    msg.opts_mut().insert(DhcpOption::MessageType(kind));
    msg
}

fn with(mut msg: Message, options: impl IntoIterator<Item = DhcpOption>) -> Message {
    for o in options {
        msg.opts_mut().insert(o);
    }
    msg
}

fn pxe(arch: u16) -> Vec<DhcpOption> {
    vec![
        DhcpOption::ClientSystemArchitecture(Architecture::from(arch)),
        DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes()),
        DhcpOption::ClientMachineIdentifier(UUID.to_vec()),
    ]
}

fn ipxe(arch: u16) -> Vec<DhcpOption> {
    let mut v = pxe(arch);
    v.push(DhcpOption::UserClass(b"iPXE".to_vec()));
    v
}

fn run(msg: &Message) -> Outcome {
    handle(msg, sender(msg), &relay_settings(), &inventory())
}

/// `msg` as sent from `from`, with no relay configured.
fn run_from(msg: &Message, from: Ipv4Addr) -> Outcome {
    handle(msg, from, &settings(), &inventory())
}

/// Runs `msg` through the wire in both directions and returns the decoded reply.
fn reply_of(msg: &Message) -> (Message, Reply) {
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes))
        .expect("encode request");
    let decoded = decode_request(&bytes).expect("decode request");
    let outcome = run(&decoded);
    let reply = outcome
        .reply()
        .unwrap_or_else(|| panic!("no reply: {outcome:?}"))
        .clone();
    let wire = reply.to_bytes().expect("encode reply");
    assert!(wire.len() >= 300, "reply shorter than the BOOTP minimum");
    let back = Message::decode(&mut Decoder::new(&wire)).expect("decode reply");
    (back, reply)
}

fn opt(msg: &Message, code: u8) -> Option<&DhcpOption> {
    msg.opts().get(OptionCode::from(code))
}

fn bytes_opt(msg: &Message, code: u8) -> Option<Vec<u8>> {
    match opt(msg, code)? {
        DhcpOption::ClassIdentifier(v)
        | DhcpOption::BootfileName(v)
        | DhcpOption::TFTPServerName(v)
        | DhcpOption::ClientMachineIdentifier(v)
        | DhcpOption::ClientIdentifier(v)
        | DhcpOption::VendorExtensions(v) => Some(v.clone()),
        DhcpOption::Unknown(u) => Some(u.data().to_vec()),
        other => panic!("option {code} is not bytes: {other:?}"),
    }
}

fn file(msg: &Message) -> Option<String> {
    // The decoder keeps the terminating NUL of the `file` field.
    msg.fname_str()
        .map(|r| r.expect("utf-8 file").trim_end_matches('\0').to_string())
}

fn broadcast() -> SocketAddr {
    "255.255.255.255:68".parse().expect("addr")
}

// ---- boot decisions -------------------------------------------------------------------------

#[test]
fn classifies_clients() {
    let d = |opts: Vec<DhcpOption>| boot_client(&with(request(MessageType::Discover, MAC), opts));
    assert_eq!(d(pxe(0)), BootClient::Bios);
    assert_eq!(d(pxe(7)), BootClient::UefiX64);
    assert_eq!(d(pxe(9)), BootClient::UefiX64);
    assert_eq!(d(pxe(16)), BootClient::UefiHttp);
    assert_eq!(d(pxe(11)), BootClient::Unknown { arch: Some(11) });
    assert_eq!(d(ipxe(0)), BootClient::Ipxe { arch: Some(0) });
    assert_eq!(d(ipxe(7)), BootClient::Ipxe { arch: Some(7) });
    assert_eq!(d(vec![]), BootClient::Plain);
    // RFC 3004 user class list containing iPXE.
    assert_eq!(
        d(vec![DhcpOption::UserClass(b"\x03abc\x04iPXE".to_vec())]),
        BootClient::Ipxe { arch: None }
    );
    // A malformed RFC 3004 list is not iPXE.
    assert_eq!(
        d(vec![DhcpOption::UserClass(b"\x09iPXE".to_vec())]),
        BootClient::Plain
    );
    // HTTP Boot recognised by vendor class alone; the arch comes from the class if 93 is absent.
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(
            b"HTTPClient:Arch:00016:UNDI:003001".to_vec()
        )]),
        BootClient::UefiHttp
    );
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(b"HTTPClient".to_vec())]),
        BootClient::UefiHttp
    );
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(
            b"HTTPClient:Arch:00019:UNDI:003001".to_vec()
        )]),
        BootClient::Unknown { arch: Some(19) }
    );
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(
            b"PXEClient:Arch:00000:UNDI:002001".to_vec()
        )]),
        BootClient::Bios
    );
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(b"PXEClient".to_vec())]),
        BootClient::Unknown { arch: None }
    );
    // A vendor class that is neither PXE nor HTTP is a plain client even if it says "Arch".
    assert_eq!(
        d(vec![DhcpOption::ClassIdentifier(
            b"udhcp 1.35.0:Arch:00000".to_vec()
        )]),
        BootClient::Plain
    );
}

#[test]
fn boot_files_per_client() {
    let s = settings();
    let m = node2();
    let f = |c| boot_file(c, &m, &s);
    assert_eq!(f(BootClient::Bios).file.as_deref(), Some("undionly.kpxe"));
    assert_eq!(f(BootClient::UefiX64).file.as_deref(), Some("snponly.efi"));
    assert_eq!(
        f(BootClient::Ipxe { arch: None }).file.as_deref(),
        Some("http://10.77.0.1:8080/ipxe/52-54-00-12-34-56")
    );
    assert_eq!(
        f(BootClient::UefiHttp).file.as_deref(),
        Some("http://10.77.0.1:8080/boot/ipxe.efi")
    );
    assert_eq!(f(BootClient::Plain).file, None);
    assert_eq!(f(BootClient::Unknown { arch: Some(11) }).file, None);
    assert!(f(BootClient::Plain).options.is_empty());
    let trailing = DhcpSettings {
        http_base: "http://10.77.0.1:8080/".into(),
        ..settings()
    };
    assert_eq!(
        boot_file(BootClient::UefiHttp, &m, &trailing)
            .file
            .as_deref(),
        Some("http://10.77.0.1:8080/boot/ipxe.efi")
    );
}

// ---- DISCOVER -> OFFER ----------------------------------------------------------------------

fn assert_common_config(reply: &Message) {
    assert_eq!(reply.opcode(), Opcode::BootReply);
    assert_eq!(reply.xid(), 0x1234_5678);
    assert_eq!(reply.chaddr(), &MAC.0);
    assert_eq!(opt(reply, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    assert_eq!(
        opt(reply, 1),
        Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(opt(reply, 3), Some(&DhcpOption::Router(vec![SERVER])));
    assert_eq!(
        opt(reply, 6),
        Some(&DhcpOption::DomainNameServer(vec![
            SERVER,
            Ipv4Addr::new(10, 77, 0, 2)
        ]))
    );
    assert_eq!(
        opt(reply, 12),
        Some(&DhcpOption::Hostname("node2.lab".into()))
    );
}

fn assert_lease(reply: &Message) {
    assert_eq!(reply.yiaddr(), RESERVED);
    assert_eq!(opt(reply, 51), Some(&DhcpOption::AddressLeaseTime(3600)));
    assert_eq!(opt(reply, 58), Some(&DhcpOption::Renewal(1800)));
    assert_eq!(opt(reply, 59), Some(&DhcpOption::Rebinding(3150)));
}

#[test]
fn bios_pxe_discover_gets_undionly_over_tftp() {
    let (offer, reply) = reply_of(&with(request(MessageType::Discover, MAC), pxe(0)));
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_common_config(&offer);
    assert_lease(&offer);
    assert_eq!(offer.siaddr(), SERVER);
    assert_eq!(file(&offer).as_deref(), Some("undionly.kpxe"));
    assert_eq!(bytes_opt(&offer, 67), Some(b"undionly.kpxe".to_vec()));
    assert_eq!(bytes_opt(&offer, 66), Some(b"10.77.0.1".to_vec()));
    assert_eq!(bytes_opt(&offer, 60), Some(b"PXEClient".to_vec()));
    assert_eq!(bytes_opt(&offer, 97), Some(UUID.to_vec()));
    assert_eq!(opt(&offer, 175), None);
    assert_eq!(reply.destination, broadcast());
}

#[test]
fn uefi_pxe_discover_gets_uefi_loader() {
    for arch in [7, 9] {
        let (offer, _) = reply_of(&with(request(MessageType::Discover, MAC), pxe(arch)));
        assert_eq!(file(&offer).as_deref(), Some("snponly.efi"), "arch {arch}");
        assert_eq!(bytes_opt(&offer, 67), Some(b"snponly.efi".to_vec()));
        assert_eq!(bytes_opt(&offer, 60), Some(b"PXEClient".to_vec()));
        assert_eq!(bytes_opt(&offer, 97), Some(UUID.to_vec()));
        assert_eq!(offer.siaddr(), SERVER);
    }
}

#[test]
fn uefi_http_boot_gets_ipxe_efi_url() {
    let mut opts = pxe(16);
    opts[1] = DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec());
    let (offer, _) = reply_of(&with(request(MessageType::Discover, MAC), opts));
    let url = "http://10.77.0.1:8080/boot/ipxe.efi";
    assert_eq!(file(&offer).as_deref(), Some(url));
    assert_eq!(bytes_opt(&offer, 67), Some(url.as_bytes().to_vec()));
    assert_eq!(bytes_opt(&offer, 60), Some(b"HTTPClient".to_vec()));
    assert_eq!(bytes_opt(&offer, 97), Some(UUID.to_vec()));
    assert_eq!(opt(&offer, 66), None, "no TFTP server for an HTTP boot");
}

#[test]
fn ipxe_gets_its_script_url_and_no_proxydhcp_wait() {
    let (offer, reply) = reply_of(&with(request(MessageType::Discover, MAC), ipxe(0)));
    let url = "http://10.77.0.1:8080/ipxe/52-54-00-12-34-56";
    assert_eq!(file(&offer).as_deref(), Some(url));
    assert_eq!(bytes_opt(&offer, 67), Some(url.as_bytes().to_vec()));
    assert_eq!(bytes_opt(&offer, 175), Some(vec![176, 1, 1]));
    assert_eq!(opt(&offer, 60), None, "iPXE is not sent PXEClient");
    assert_common_config(&offer);
    assert_lease(&offer);
    assert_eq!(reply.destination, broadcast());
}

#[test]
fn unknown_arch_and_plain_clients_get_plain_dhcp() {
    for opts in [pxe(11), vec![]] {
        let (offer, _) = reply_of(&with(request(MessageType::Discover, MAC), opts));
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_common_config(&offer);
        assert_lease(&offer);
        assert_eq!(file(&offer), None);
        for code in [60, 66, 67, 97, 175] {
            assert_eq!(opt(&offer, code), None, "option {code}");
        }
    }
}

#[test]
fn discover_reports_offered() {
    let outcome = run(&request(MessageType::Discover, MAC));
    let Outcome::Reply { machine, event, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(machine, node2());
    assert_eq!(event, Some(BootEvent::DhcpOffered));
}

#[test]
fn discover_asking_for_another_address_is_offered_the_reservation() {
    let msg = with(
        request(MessageType::Discover, MAC),
        [DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 99))],
    );
    let (offer, _) = reply_of(&msg);
    assert_eq!(offer.yiaddr(), RESERVED);
}

#[test]
fn unknown_mac_gets_nothing() {
    for kind in [
        MessageType::Discover,
        MessageType::Request,
        MessageType::Inform,
    ] {
        assert_eq!(run(&request(kind, STRANGER)), Outcome::UnknownMac(STRANGER));
    }
}

#[test]
fn optional_settings_are_omitted() {
    let s = DhcpSettings {
        gateway: None,
        dns_servers: vec![],
        ..settings()
    };
    let outcome = handle(
        &request(MessageType::Discover, MAC),
        Ipv4Addr::UNSPECIFIED,
        &s,
        &inventory(),
    );
    let reply = outcome.reply().expect("offer");
    assert_eq!(opt(&reply.message, 3), None);
    assert_eq!(opt(&reply.message, 6), None);
    assert!(opt(&reply.message, 1).is_some());
}

#[test]
fn hostname_defaults_to_machine_name() {
    let mut m = node2();
    m.hostname = None;
    let inv = HashMap::from([(MAC, m)]);
    let outcome = handle(
        &request(MessageType::Discover, MAC),
        Ipv4Addr::UNSPECIFIED,
        &settings(),
        &inv,
    );
    let reply = outcome.reply().expect("offer");
    assert_eq!(
        opt(&reply.message, 12),
        Some(&DhcpOption::Hostname("node2".into()))
    );
}

#[test]
fn reservation_outside_subnet_is_not_served() {
    let mut m = node2();
    m.ip = Ipv4Addr::new(192, 168, 1, 5);
    let inv = HashMap::from([(MAC, m)]);
    let outcome = handle(
        &request(MessageType::Discover, MAC),
        Ipv4Addr::UNSPECIFIED,
        &settings(),
        &inv,
    );
    assert_eq!(
        outcome,
        Outcome::Ignored(Ignored::OutsideSubnet(Ipv4Addr::new(192, 168, 1, 5)))
    );
}

#[test]
fn client_identifier_is_echoed() {
    let id = vec![1, 0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let msg = with(
        request(MessageType::Discover, MAC),
        [DhcpOption::ClientIdentifier(id.clone())],
    );
    let (offer, _) = reply_of(&msg);
    assert_eq!(bytes_opt(&offer, 61), Some(id));
}

// ---- REQUEST -> ACK / NAK / silence ---------------------------------------------------------

#[test]
fn selecting_request_is_acked() {
    let msg = with(
        request(MessageType::Request, MAC),
        [
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(RESERVED),
        ]
        .into_iter()
        .chain(pxe(7)),
    );
    let (ack, reply) = reply_of(&msg);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_common_config(&ack);
    assert_lease(&ack);
    assert_eq!(file(&ack).as_deref(), Some("snponly.efi"));
    assert_eq!(reply.destination, broadcast());
    let Outcome::Reply { event, .. } = run(&msg) else {
        panic!("no reply")
    };
    assert_eq!(event, Some(BootEvent::DhcpAcked));
}

#[test]
fn init_reboot_request_is_acked() {
    let msg = with(
        request(MessageType::Request, MAC),
        [DhcpOption::RequestedIpAddress(RESERVED)],
    );
    let (ack, _) = reply_of(&msg);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), RESERVED);
}

#[test]
fn request_for_another_server_is_ignored() {
    let other = Ipv4Addr::new(10, 77, 0, 254);
    let msg = with(
        request(MessageType::Request, MAC),
        [
            DhcpOption::ServerIdentifier(other),
            DhcpOption::RequestedIpAddress(RESERVED),
        ],
    );
    assert_eq!(run(&msg), Outcome::Ignored(Ignored::OtherServer(other)));
}

fn assert_nak(msg: &Message) -> (Message, Reply) {
    let (nak, reply) = reply_of(msg);
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(nak.ciaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(nak.siaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(file(&nak), None);
    assert_eq!(opt(&nak, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    for code in [1, 3, 6, 12, 51, 67] {
        assert_eq!(opt(&nak, code), None, "option {code} in a NAK");
    }
    let Some(DhcpOption::Message(text)) = opt(&nak, 56) else {
        panic!("NAK without message")
    };
    assert!(text.contains("10.77.0.20"), "{text}");
    let Outcome::Reply { event, .. } = run(msg) else {
        panic!("no reply")
    };
    assert_eq!(event, None);
    (nak, reply)
}

#[test]
fn request_for_wrong_address_is_naked() {
    let wrong = Ipv4Addr::new(10, 77, 0, 99);
    // SELECTING with our server id, INIT-REBOOT without.
    for with_sid in [true, false] {
        let mut opts = vec![DhcpOption::RequestedIpAddress(wrong)];
        if with_sid {
            opts.push(DhcpOption::ServerIdentifier(SERVER));
        }
        let (_, reply) = assert_nak(&with(request(MessageType::Request, MAC), opts));
        assert_eq!(reply.destination, broadcast());
    }
}

#[test]
fn renewing_request_is_unicast_to_ciaddr() {
    let mut msg = request(MessageType::Request, MAC);
    msg.set_ciaddr(RESERVED);
    let (ack, reply) = reply_of(&msg);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.ciaddr(), RESERVED);
    assert_eq!(ack.yiaddr(), RESERVED);
    assert_eq!(
        reply.destination,
        "10.77.0.20:68".parse::<SocketAddr>().expect("addr")
    );
}

#[test]
fn renewing_with_wrong_ciaddr_is_naked_by_broadcast() {
    let mut msg = request(MessageType::Request, MAC);
    msg.set_ciaddr(Ipv4Addr::new(10, 77, 0, 99));
    let (_, reply) = assert_nak(&msg);
    assert_eq!(reply.destination, broadcast());
}

#[test]
fn request_naming_no_address_is_ignored() {
    assert_eq!(
        run(&request(MessageType::Request, MAC)),
        Outcome::Ignored(Ignored::NoAddress)
    );
}

#[test]
fn relayed_requests_are_answered_to_the_relay() {
    let relay = Ipv4Addr::new(10, 77, 0, 254);
    let mut msg = request(MessageType::Discover, MAC);
    msg.set_giaddr(relay);
    let (offer, reply) = reply_of(&msg);
    assert_eq!(offer.giaddr(), relay);
    assert_eq!(reply.destination, SocketAddr::from((relay, 67)));

    let mut msg = with(
        request(MessageType::Request, MAC),
        [DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 99))],
    );
    msg.set_giaddr(relay);
    let (nak, reply) = assert_nak(&msg);
    assert!(
        nak.flags().broadcast(),
        "relayed NAK must set the broadcast bit"
    );
    assert_eq!(reply.destination, SocketAddr::from((relay, 67)));
}

// ---- INFORM, RELEASE, DECLINE ---------------------------------------------------------------

#[test]
fn inform_is_acked_without_lease() {
    let mut msg = request(MessageType::Inform, MAC);
    msg.set_ciaddr(RESERVED);
    let (ack, reply) = reply_of(&msg);
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    for code in [51, 58, 59] {
        assert_eq!(opt(&ack, code), None, "option {code} in an INFORM ACK");
    }
    assert_common_config(&ack);
    assert_eq!(
        reply.destination,
        "10.77.0.20:68".parse::<SocketAddr>().expect("addr")
    );
    let Outcome::Reply { event, .. } = run(&msg) else {
        panic!("no reply")
    };
    assert_eq!(event, None);
}

/// A RELEASE as a bound client sends it: our server id, its address as ciaddr, from it.
fn release() -> Message {
    let mut msg = with(
        request(MessageType::Release, MAC),
        [DhcpOption::ServerIdentifier(SERVER)],
    );
    msg.set_ciaddr(RESERVED);
    msg
}

/// A DECLINE as a client sends it after finding its offered address in use.
fn decline() -> Message {
    with(
        request(MessageType::Decline, MAC),
        [
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(RESERVED),
        ],
    )
}

fn not_the_client(outcome: Outcome, kind: MessageType) -> bool {
    matches!(outcome, Outcome::Ignored(Ignored::NotTheClient { kind: k, .. }) if k == kind)
}

#[test]
fn release_and_decline_are_reported_not_answered() {
    for (msg, event) in [
        (release(), BootEvent::DhcpReleased),
        (decline(), BootEvent::DhcpDeclined),
    ] {
        assert_eq!(
            run(&msg),
            Outcome::Report {
                machine: node2(),
                event
            }
        );
        let other = Ipv4Addr::new(10, 77, 0, 253);
        let mut msg = msg.clone();
        msg.opts_mut().insert(DhcpOption::ServerIdentifier(other));
        assert_eq!(run(&msg), Outcome::Ignored(Ignored::OtherServer(other)));
    }
}

#[test]
fn release_only_from_the_client_at_its_reservation() {
    let kind = MessageType::Release;
    assert!(matches!(
        run_from(&release(), RESERVED),
        Outcome::Report { .. }
    ));
    // Another host on the LAN sends it (the datagram's source is not ciaddr).
    let spoofed = Ipv4Addr::new(10, 77, 0, 50);
    assert!(not_the_client(run_from(&release(), spoofed), kind));
    // Names another address than the reservation.
    let mut msg = release();
    msg.set_ciaddr(spoofed);
    assert!(not_the_client(run_from(&msg, spoofed), kind));
    // No ciaddr, or no server identifier (RFC 2131 requires both).
    let mut msg = release();
    msg.set_ciaddr(Ipv4Addr::UNSPECIFIED);
    assert!(not_the_client(run_from(&msg, Ipv4Addr::UNSPECIFIED), kind));
    let mut msg = release();
    msg.opts_mut().remove(OptionCode::ServerIdentifier);
    assert!(not_the_client(run_from(&msg, RESERVED), kind));
    // Another MAC's RELEASE for this address is not this machine's.
    let mut msg = release();
    msg.set_chaddr(&STRANGER.0);
    assert_eq!(run_from(&msg, RESERVED), Outcome::UnknownMac(STRANGER));
}

#[test]
fn decline_only_for_the_reservation_with_our_server_id() {
    let kind = MessageType::Decline;
    assert!(matches!(
        run_from(&decline(), Ipv4Addr::UNSPECIFIED),
        Outcome::Report { .. }
    ));
    let mut msg = decline();
    msg.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 77, 0, 99)));
    assert!(not_the_client(run_from(&msg, Ipv4Addr::UNSPECIFIED), kind));
    let mut msg = decline();
    msg.opts_mut().remove(OptionCode::RequestedIpAddress);
    assert!(not_the_client(run_from(&msg, Ipv4Addr::UNSPECIFIED), kind));
    let mut msg = decline();
    msg.opts_mut().remove(OptionCode::ServerIdentifier);
    assert!(not_the_client(run_from(&msg, Ipv4Addr::UNSPECIFIED), kind));
}

// ---- relays and ciaddr: where replies may go -------------------------------------------------

#[test]
fn relayed_packets_only_from_configured_relays() {
    let mut msg = request(MessageType::Discover, MAC);
    msg.set_giaddr(RELAY);
    // No relay configured (the default): ignored, whoever sends it.
    for from in [RELAY, Ipv4Addr::new(10, 77, 0, 50)] {
        assert_eq!(
            run_from(&msg, from),
            Outcome::Ignored(Ignored::UntrustedRelay {
                giaddr: RELAY,
                from
            })
        );
    }
    // Configured: answered to the relay only when the relay sent it.
    let s = relay_settings();
    let inv = inventory();
    let reply = handle(&msg, RELAY, &s, &inv);
    assert_eq!(
        reply.reply().map(|r| r.destination),
        Some(SocketAddr::from((RELAY, 67)))
    );
    let forged_sender = Ipv4Addr::new(10, 77, 0, 50);
    assert!(matches!(
        handle(&msg, forged_sender, &s, &inv),
        Outcome::Ignored(Ignored::UntrustedRelay { .. })
    ));
    // A giaddr that is not a configured relay, even from one: no reply to an arbitrary address.
    let mut elsewhere = msg.clone();
    elsewhere.set_giaddr(Ipv4Addr::new(192, 0, 2, 1));
    assert!(matches!(
        handle(&elsewhere, RELAY, &s, &inv),
        Outcome::Ignored(Ignored::UntrustedRelay { .. })
    ));
    // Unknown MACs relayed by a stranger are refused before the lookup (not even counted).
    let mut stranger = request(MessageType::Discover, STRANGER);
    stranger.set_giaddr(RELAY);
    assert!(matches!(
        run_from(&stranger, RELAY),
        Outcome::Ignored(Ignored::UntrustedRelay { .. })
    ));
}

#[test]
fn discover_ciaddr_is_never_a_destination() {
    let mut msg = request(MessageType::Discover, MAC);
    msg.set_ciaddr(Ipv4Addr::new(192, 0, 2, 7));
    let outcome = run_from(&msg, Ipv4Addr::new(10, 77, 0, 50));
    assert_eq!(
        outcome.reply().map(|r| r.destination),
        Some(broadcast()),
        "the offer is broadcast, not sent to the named address"
    );
}

#[test]
fn renewing_is_unicast_only_from_the_client_at_its_reservation() {
    let mut msg = request(MessageType::Request, MAC);
    msg.set_ciaddr(RESERVED);
    // From the reservation itself: unicast.
    assert_eq!(
        run_from(&msg, RESERVED).reply().map(|r| r.destination),
        Some(SocketAddr::from((RESERVED, 68)))
    );
    // The same packet from another host: neither answered nor counted as an ACK.
    let other = Ipv4Addr::new(10, 77, 0, 50);
    assert_eq!(
        run_from(&msg, other),
        Outcome::Ignored(Ignored::NotFromClient {
            ciaddr: RESERVED,
            from: other
        })
    );
    // SELECTING (server id present) with a ciaddr: the client has no address yet, broadcast.
    let selecting = with(msg, [DhcpOption::ServerIdentifier(SERVER)]);
    assert_eq!(
        run_from(&selecting, other).reply().map(|r| r.destination),
        Some(broadcast())
    );
}

#[test]
fn inform_is_answered_only_for_the_reservation_from_it() {
    let mut msg = request(MessageType::Inform, MAC);
    msg.set_ciaddr(RESERVED);
    assert_eq!(
        run_from(&msg, RESERVED).reply().map(|r| r.destination),
        Some(SocketAddr::from((RESERVED, 68)))
    );
    // Another address as ciaddr: no ACK unicast to it (reflection), no NAK either (RFC 2131).
    let victim = Ipv4Addr::new(10, 77, 0, 99);
    let mut foreign = msg.clone();
    foreign.set_ciaddr(victim);
    assert_eq!(
        run_from(&foreign, victim),
        Outcome::Ignored(Ignored::NotFromClient {
            ciaddr: victim,
            from: victim
        })
    );
    // The reservation named by someone else.
    let other = Ipv4Addr::new(10, 77, 0, 50);
    assert!(matches!(
        run_from(&msg, other),
        Outcome::Ignored(Ignored::NotFromClient { .. })
    ));
    // No ciaddr at all.
    assert_eq!(
        run_from(&request(MessageType::Inform, MAC), other),
        Outcome::Ignored(Ignored::NoAddress)
    );
}

#[test]
fn server_only_message_types_are_ignored() {
    assert_eq!(
        run(&request(MessageType::Offer, MAC)),
        Outcome::Ignored(Ignored::UnexpectedType(MessageType::Offer))
    );
    let mut bootp = request(MessageType::Discover, MAC);
    bootp.opts_mut().remove(OptionCode::MessageType);
    assert_eq!(run(&bootp), Outcome::Ignored(Ignored::Bootp));
}

// ---- wire format ----------------------------------------------------------------------------

fn encode(msg: &Message) -> Vec<u8> {
    let mut bytes = Vec::new();
    msg.encode(&mut Encoder::new(&mut bytes)).expect("encode");
    bytes
}

/// Option codes of an encoded message, in wire order.
fn wire_codes(bytes: &[u8]) -> Vec<u8> {
    let mut codes = Vec::new();
    let mut i = 240;
    while i < bytes.len() && bytes[i] != 255 {
        if bytes[i] == 0 {
            i += 1;
            continue;
        }
        codes.push(bytes[i]);
        i += 2 + usize::from(bytes[i + 1]);
    }
    codes
}

#[test]
fn options_follow_the_parameter_request_list() {
    let prl = [67, 12, 3, 1, 66, 6].map(OptionCode::from).to_vec();
    let msg = with(
        request(MessageType::Discover, MAC),
        pxe(0)
            .into_iter()
            .chain([DhcpOption::ParameterRequestList(prl)]),
    );
    let outcome = run(&msg);
    let bytes = outcome.reply().expect("offer").to_bytes().expect("encode");
    let codes = wire_codes(&bytes);
    assert_eq!(&codes[..8], &[53, 54, 67, 12, 3, 1, 66, 6], "{codes:?}");
    let mut rest = codes[8..].to_vec();
    rest.sort_unstable();
    assert_eq!(codes[8..], rest[..], "unrequested options in numeric order");
}

#[test]
fn replies_fit_the_client_maximum_message_size() {
    let big = DhcpSettings {
        dns_servers: (1..=60).map(|i| Ipv4Addr::new(10, 77, 1, i)).collect(),
        http_base: format!("http://10.77.0.1:8080/{}", "x".repeat(150)),
        ..settings()
    };
    let mut m = node2();
    m.hostname = Some("h".repeat(200));
    let inv = HashMap::from([(MAC, m)]);
    let prl = [1, 3, 6, 12, 67].map(OptionCode::from).to_vec();
    let base = with(
        request(MessageType::Discover, MAC),
        ipxe(0)
            .into_iter()
            .chain([DhcpOption::ParameterRequestList(prl)]),
    );
    // No option 57: the RFC 2131 minimum, 576 bytes with IP and UDP headers.
    let small = handle(&base, Ipv4Addr::UNSPECIFIED, &big, &inv);
    let bytes = small.reply().expect("offer").to_bytes().expect("encode");
    assert!(bytes.len() <= 548, "{} bytes", bytes.len());
    let codes = wire_codes(&bytes);
    for essential in [53, 54, 51, 1] {
        assert!(codes.contains(&essential), "dropped {essential}: {codes:?}");
    }
    // With option 57 = 1500 everything fits.
    let roomy = with(base, [DhcpOption::MaxMessageSize(1500)]);
    let outcome = handle(&roomy, Ipv4Addr::UNSPECIFIED, &big, &inv);
    let bytes = outcome.reply().expect("offer").to_bytes().expect("encode");
    assert!(
        bytes.len() > 548 && bytes.len() <= 1472,
        "{} bytes",
        bytes.len()
    );
    let codes = wire_codes(&bytes);
    for code in [1, 3, 6, 12, 67, 175] {
        assert!(codes.contains(&code), "missing {code}: {codes:?}");
    }
    let back = Message::decode(&mut Decoder::new(&bytes)).expect("decode");
    assert_eq!(
        file(&back),
        None,
        "a URL over 127 bytes goes only in option 67"
    );
}

#[test]
fn rejects_what_is_not_an_ethernet_bootrequest() {
    let good = encode(&request(MessageType::Discover, MAC));
    assert!(decode_request(&good).is_ok());
    assert!(matches!(
        decode_request(&good[..239]),
        Err(PacketError::TooShort(239))
    ));
    let mut reply = good.clone();
    reply[0] = 2;
    assert!(matches!(
        decode_request(&reply),
        Err(PacketError::NotRequest(2))
    ));
    let mut long_hw = good.clone();
    long_hw[2] = 200;
    assert!(matches!(
        decode_request(&long_hw),
        Err(PacketError::NotEthernet { .. })
    ));
    let mut no_magic = good.clone();
    no_magic[236] = 0;
    assert!(matches!(
        decode_request(&no_magic),
        Err(PacketError::NoMagic)
    ));
}

/// A DISCOVER with hand-written options after the cookie.
fn raw_discover(options: &[u8]) -> Vec<u8> {
    let mut bytes = encode(&request(MessageType::Discover, MAC));
    bytes.truncate(240);
    bytes.extend_from_slice(options);
    bytes
}

#[test]
fn malformed_options_are_dropped_not_fatal() {
    // Options the generic decoder would choke on (client FQDN too short, bulk lease-query status
    // empty, network interface id of the wrong length, overlong arch) come before the ones we
    // need: the request must still be understood.
    let bytes = raw_discover(&[
        81, 0, // client FQDN, empty
        151, 0, // status code, empty
        94, 1, 1, // client NDI, 1 byte
        93, 3, 0, 0, 7, // arch, odd length: dropped
        53, 1, 1, // DISCOVER
        60, 9, b'P', b'X', b'E', b'C', b'l', b'i', b'e', b'n', b't', //
        93, 2, 0, 7, // arch 7
        50, 3, 1, 2, 3, // requested IP, 3 bytes: dropped
        255,
    ]);
    let msg = decode_request(&bytes).expect("decodes");
    assert_eq!(msg.opts().msg_type(), Some(MessageType::Discover));
    assert_eq!(boot_client(&msg), BootClient::UefiX64);
    assert_eq!(msg.opts().get(OptionCode::RequestedIpAddress), None);
    // Truncated option at the end, and no END.
    let bytes = raw_discover(&[53, 1, 1, 60, 40, b'P']);
    let msg = decode_request(&bytes).expect("decodes");
    assert_eq!(msg.opts().msg_type(), Some(MessageType::Discover));
}

#[test]
fn garbage_never_panics() {
    // Deterministic mutations of real-looking requests: decode and handle must not panic.
    let seeds = [
        encode(&with(request(MessageType::Discover, MAC), ipxe(0))),
        encode(&with(request(MessageType::Request, MAC), pxe(16))),
        raw_discover(&[
            53, 1, 3, 81, 3, 0, 0, 0, 82, 2, 1, 0, 121, 5, 33, 1, 2, 3, 4, 255,
        ]),
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let s = settings();
    let inv = inventory();
    for round in 0..20_000 {
        let mut bytes = seeds[round % seeds.len()].clone();
        for _ in 0..(next() % 8 + 1) {
            let len = bytes.len();
            let at = 236 + (next() as usize) % (len - 236);
            bytes[at] = next() as u8;
        }
        bytes.truncate(240 + (next() as usize) % (bytes.len() - 239));
        if let Ok(msg) = decode_request(&bytes) {
            if let Outcome::Reply { reply, .. } = handle(&msg, sender(&msg), &s, &inv) {
                reply.to_bytes().expect("replies always encode");
            }
        }
    }
}

#[test]
fn encodes_unknown_options_verbatim() {
    let mut msg = request(MessageType::Offer, MAC);
    msg.opts_mut()
        .insert(DhcpOption::Unknown(UnknownOption::new(
            OptionCode::from(175),
            vec![176, 1, 1],
        )));
    let bytes = packet::encode_ordered(&msg, &[OptionCode::MessageType]).expect("encode");
    let at = bytes.windows(5).position(|w| w == [175, 3, 176, 1, 1]);
    assert!(at.is_some_and(|i| i > 240));
}

// ---- log limiter ----------------------------------------------------------------------------

#[test]
fn unknown_macs_are_logged_once_a_minute_with_bounded_memory() {
    let mut limiter = LogLimiter::new(2, Duration::from_secs(60));
    let t0 = Instant::now();
    let mac = |i: u8| MacAddr([2, 0, 0, 0, 0, i]);
    assert!(limiter.allow(mac(1), t0));
    assert!(!limiter.allow(mac(1), t0 + Duration::from_secs(59)));
    assert!(limiter.allow(mac(1), t0 + Duration::from_secs(61)));
    assert!(limiter.allow(mac(2), t0 + Duration::from_secs(61)));
    // Full of fresh entries: a third MAC is only counted.
    assert!(!limiter.allow(mac(3), t0 + Duration::from_secs(62)));
    assert_eq!(limiter.seen.len(), 2);
    assert_eq!(limiter.take_suppressed(), 1);
    assert_eq!(limiter.take_suppressed(), 0);
    // Once entries age out, room is made.
    assert!(limiter.allow(mac(3), t0 + Duration::from_secs(130)));
    assert!(limiter.seen.len() <= 2);
}

// ---- proxy mode ------------------------------------------------------------------------------

/// The address the LAN's DHCP server gives the machine, when it is not the reservation.
const LAN_GIVEN: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 157);
/// The LAN's DHCP server.
const LAN_SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);

fn proxy_settings() -> DhcpSettings {
    DhcpSettings {
        mode: DhcpMode::Proxy,
        relays: vec![RELAY],
        ..settings()
    }
}

/// `msg` to the DHCP port in proxy mode, as sent from `from`.
fn run_proxy(msg: &Message, from: Ipv4Addr) -> Outcome {
    handle(msg, from, &proxy_settings(), &inventory())
}

/// `msg` to the boot-server port (4011) in proxy mode, as sent from `from`.
fn run_boot_server(msg: &Message, from: SocketAddrV4) -> Outcome {
    handle_boot_server(msg, from, &proxy_settings(), &inventory())
}

/// The proxy reply to `msg` through the wire both ways, with its outcome's event and foreign
/// address.
fn proxy_reply_of(outcome: &Outcome) -> (Message, Reply, Option<BootEvent>, Option<Ipv4Addr>) {
    let Outcome::Reply {
        reply,
        event,
        foreign_address,
        ..
    } = outcome
    else {
        panic!("no reply: {outcome:?}")
    };
    let wire = reply.to_bytes().expect("encode reply");
    assert!(wire.len() >= 300, "reply shorter than the BOOTP minimum");
    let back = Message::decode(&mut Decoder::new(&wire)).expect("decode reply");
    (back, (**reply).clone(), event.clone(), *foreign_address)
}

/// Through the wire: encoded by the test, decoded by the server's own decoder.
fn decoded(msg: &Message) -> Message {
    decode_request(&encode(msg)).expect("decode request")
}

/// What every ProxyDHCP answer is: boot information from us, no address, no lease, none of
/// the LAN server's options.
fn assert_proxy_shape(reply: &Message, kind: MessageType) {
    assert_eq!(reply.opts().msg_type(), Some(kind));
    assert_eq!(reply.opcode(), Opcode::BootReply);
    assert_eq!(reply.xid(), 0x1234_5678);
    assert_eq!(reply.chaddr(), &MAC.0);
    assert_eq!(reply.yiaddr(), Ipv4Addr::UNSPECIFIED, "never an address");
    assert_eq!(reply.siaddr(), SERVER);
    assert_eq!(opt(reply, 54), Some(&DhcpOption::ServerIdentifier(SERVER)));
    for code in [1, 3, 6, 12, 51, 58, 59, 175] {
        assert_eq!(opt(reply, code), None, "option {code} is the LAN server's");
    }
}

fn assert_pxe_proxy(reply: &Message, boot_file: &str) {
    assert_eq!(bytes_opt(reply, 60), Some(b"PXEClient".to_vec()));
    assert_eq!(
        bytes_opt(reply, 43),
        Some(vec![6, 1, 8, 255]),
        "discovery control 8: boot the file in this offer"
    );
    assert_eq!(bytes_opt(reply, 97), Some(UUID.to_vec()));
    assert_eq!(file(reply).as_deref(), Some(boot_file));
    assert_eq!(bytes_opt(reply, 67), Some(boot_file.as_bytes().to_vec()));
}

#[test]
fn proxy_offer_to_bios_pxe() {
    let outcome = run_proxy(
        &decoded(&with(request(MessageType::Discover, MAC), pxe(0))),
        Ipv4Addr::UNSPECIFIED,
    );
    let (offer, reply, event, foreign) = proxy_reply_of(&outcome);
    assert_proxy_shape(&offer, MessageType::Offer);
    assert_pxe_proxy(&offer, "undionly.kpxe");
    assert_eq!(bytes_opt(&offer, 66), Some(b"10.77.0.1".to_vec()));
    assert_eq!(reply.destination, broadcast());
    assert_eq!(event, Some(BootEvent::ProxyOffered));
    assert_eq!(foreign, None);
}

#[test]
fn proxy_offer_to_uefi_pxe() {
    for arch in [7, 9] {
        let outcome = run_proxy(
            &decoded(&with(request(MessageType::Discover, MAC), pxe(arch))),
            Ipv4Addr::UNSPECIFIED,
        );
        let (offer, reply, event, _) = proxy_reply_of(&outcome);
        assert_proxy_shape(&offer, MessageType::Offer);
        assert_pxe_proxy(&offer, "snponly.efi");
        assert_eq!(reply.destination, broadcast());
        assert_eq!(event, Some(BootEvent::ProxyOffered), "arch {arch}");
    }
}

#[test]
fn proxy_offer_to_ipxe_names_its_script_and_opens_the_window() {
    let outcome = run_proxy(
        &decoded(&with(request(MessageType::Discover, MAC), ipxe(0))),
        Ipv4Addr::UNSPECIFIED,
    );
    let (offer, reply, event, _) = proxy_reply_of(&outcome);
    assert_proxy_shape(&offer, MessageType::Offer);
    // iPXE takes an offer with PXEClient, siaddr and a file name as ProxyDHCP with PXE options
    // present: no ProxyDHCPREQUEST, and the script URL is its filename.
    assert_pxe_proxy(&offer, "http://10.77.0.1:8080/ipxe/52-54-00-12-34-56");
    assert_eq!(reply.destination, broadcast());
    assert_eq!(event, Some(BootEvent::ProxyScriptOffered));
}

#[test]
fn proxy_offer_to_uefi_http_boot() {
    let mut opts = pxe(16);
    opts[1] = DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec());
    let outcome = run_proxy(
        &decoded(&with(request(MessageType::Discover, MAC), opts)),
        Ipv4Addr::UNSPECIFIED,
    );
    let (offer, _, event, _) = proxy_reply_of(&outcome);
    assert_proxy_shape(&offer, MessageType::Offer);
    let url = "http://10.77.0.1:8080/boot/ipxe.efi";
    assert_eq!(bytes_opt(&offer, 60), Some(b"HTTPClient".to_vec()));
    assert_eq!(bytes_opt(&offer, 67), Some(url.as_bytes().to_vec()));
    assert_eq!(file(&offer).as_deref(), Some(url));
    assert_eq!(bytes_opt(&offer, 97), Some(UUID.to_vec()));
    assert_eq!(
        opt(&offer, 43),
        None,
        "PXE vendor options are for PXE clients"
    );
    assert_eq!(event, Some(BootEvent::ProxyOffered));
}

#[test]
fn proxy_mode_answers_no_stranger_and_no_ordinary_client() {
    for kind in [MessageType::Discover, MessageType::Request] {
        assert_eq!(
            run_proxy(
                &with(request(kind, STRANGER), pxe(0)),
                Ipv4Addr::UNSPECIFIED
            ),
            Outcome::UnknownMac(STRANGER)
        );
    }
    // An ordinary DHCP client of a reserved machine (its installed OS, stage2, udhcpc), and
    // firmware of an architecture without a loader: the LAN's server answers them, we do not.
    let udhcpc = vec![
        DhcpOption::ClassIdentifier(b"udhcp 1.35.0".to_vec()),
        DhcpOption::ParameterRequestList(vec![OptionCode::SubnetMask, OptionCode::Router]),
    ];
    for opts in [vec![], udhcpc, pxe(11)] {
        let discover = with(request(MessageType::Discover, MAC), opts.clone());
        assert_eq!(
            run_proxy(&discover, Ipv4Addr::UNSPECIFIED),
            Outcome::Ignored(Ignored::NotBootClient),
            "{opts:?}"
        );
        let ours = with(
            request(MessageType::Request, MAC),
            opts.iter()
                .cloned()
                .chain([DhcpOption::ServerIdentifier(SERVER)]),
        );
        assert_eq!(
            run_proxy(&ours, Ipv4Addr::UNSPECIFIED),
            Outcome::Ignored(Ignored::NotBootClient)
        );
    }
}

#[test]
fn proxy_request_with_our_server_id_is_acked_without_an_address() {
    // PXE firmware that REQUESTs from the proxy (server id ours, broadcast, no address yet):
    // an ACK of the offer's shape, as dnsmasq's proxy answers it.
    let msg = with(
        request(MessageType::Request, MAC),
        pxe(7)
            .into_iter()
            .chain([DhcpOption::ServerIdentifier(SERVER)]),
    );
    let outcome = run_proxy(&decoded(&msg), Ipv4Addr::UNSPECIFIED);
    let (ack, reply, event, foreign) = proxy_reply_of(&outcome);
    assert_proxy_shape(&ack, MessageType::Ack);
    assert_pxe_proxy(&ack, "snponly.efi");
    assert_eq!(reply.destination, broadcast());
    assert_eq!(event, Some(BootEvent::ProxyOffered));
    assert_eq!(foreign, None);

    // From a client with an address (sent from it): unicast there, and an address that is not
    // the reservation is flagged.
    let mut bound = msg.clone();
    bound.set_ciaddr(LAN_GIVEN);
    let outcome = run_proxy(&decoded(&bound), LAN_GIVEN);
    let (ack, reply, _, foreign) = proxy_reply_of(&outcome);
    assert_proxy_shape(&ack, MessageType::Ack);
    assert_eq!(ack.ciaddr(), LAN_GIVEN);
    assert_eq!(
        reply.destination,
        SocketAddr::from((LAN_GIVEN, CLIENT_PORT))
    );
    assert_eq!(foreign, Some(LAN_GIVEN));
    // A ciaddr the packet was not sent from is not a destination.
    let outcome = run_proxy(&decoded(&bound), Ipv4Addr::UNSPECIFIED);
    assert_eq!(proxy_reply_of(&outcome).1.destination, broadcast());
}

#[test]
fn proxy_leaves_the_lan_servers_messages_alone_and_flags_foreign_addresses() {
    // The REQUEST to the LAN's server names the address it offered: not the reservation.
    let to_lan = with(
        request(MessageType::Request, MAC),
        ipxe(0).into_iter().chain([
            DhcpOption::ServerIdentifier(LAN_SERVER),
            DhcpOption::RequestedIpAddress(LAN_GIVEN),
        ]),
    );
    assert_eq!(
        run_proxy(&to_lan, Ipv4Addr::UNSPECIFIED),
        Outcome::ForeignAddress {
            machine: node2(),
            address: LAN_GIVEN,
            ignored: Ignored::OtherServer(LAN_SERVER),
        }
    );
    // The same with the reserved address: nothing to say.
    let fine = with(
        request(MessageType::Request, MAC),
        ipxe(0).into_iter().chain([
            DhcpOption::ServerIdentifier(LAN_SERVER),
            DhcpOption::RequestedIpAddress(RESERVED),
        ]),
    );
    assert_eq!(
        run_proxy(&fine, Ipv4Addr::UNSPECIFIED),
        Outcome::Ignored(Ignored::OtherServer(LAN_SERVER))
    );
    // Renewing (ciaddr, no server id), INIT-REBOOT (option 50, no server id), INFORM,
    // RELEASE and DECLINE, even with our server id: the LAN server's; nothing is reported.
    let mut renewing = request(MessageType::Request, MAC);
    renewing.set_ciaddr(LAN_GIVEN);
    assert!(matches!(
        run_proxy(&renewing, LAN_GIVEN),
        Outcome::ForeignAddress {
            address: LAN_GIVEN,
            ignored: Ignored::LanServer(MessageType::Request),
            ..
        }
    ));
    let reboot = with(
        request(MessageType::Request, MAC),
        [DhcpOption::RequestedIpAddress(RESERVED)],
    );
    assert_eq!(
        run_proxy(&reboot, Ipv4Addr::UNSPECIFIED),
        Outcome::Ignored(Ignored::LanServer(MessageType::Request))
    );
    for kind in [
        MessageType::Inform,
        MessageType::Release,
        MessageType::Decline,
    ] {
        let mut msg = with(
            request(kind, MAC),
            [
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(RESERVED),
            ],
        );
        msg.set_ciaddr(RESERVED);
        assert_eq!(
            run_proxy(&msg, RESERVED),
            Outcome::Ignored(Ignored::LanServer(kind)),
            "{kind:?}"
        );
    }
    // A DISCOVER asking for another address is still answered (with no address), and flagged.
    let asking = with(
        request(MessageType::Discover, MAC),
        ipxe(0)
            .into_iter()
            .chain([DhcpOption::RequestedIpAddress(LAN_GIVEN)]),
    );
    let (offer, _, _, foreign) = proxy_reply_of(&run_proxy(&asking, Ipv4Addr::UNSPECIFIED));
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(foreign, Some(LAN_GIVEN));
}

#[test]
fn proxy_replies_go_to_configured_relays_only() {
    let mut relayed = with(request(MessageType::Discover, MAC), pxe(0));
    relayed.set_giaddr(RELAY);
    let (offer, reply, _, foreign) = proxy_reply_of(&run_proxy(&relayed, RELAY));
    assert_proxy_shape(&offer, MessageType::Offer);
    assert_eq!(reply.destination, SocketAddr::from((RELAY, SERVER_PORT)));
    assert_eq!(foreign, None, "a relay's address is not the client's");
    let from = Ipv4Addr::new(10, 77, 0, 99);
    relayed.set_giaddr(from);
    assert_eq!(
        run_proxy(&relayed, from),
        Outcome::Ignored(Ignored::UntrustedRelay { giaddr: from, from })
    );
}

/// A boot-server request as EDK2 sends it for a BINL offer: REQUEST from its new address
/// (`ciaddr`), from port 4011 to our port 4011.
fn boot_server_request(client: Vec<DhcpOption>, ciaddr: Ipv4Addr) -> Message {
    let mut msg = with(request(MessageType::Request, MAC), client);
    msg.set_ciaddr(ciaddr);
    msg
}

#[test]
fn boot_server_request_gets_the_boot_file_unicast_to_the_sender() {
    let peer = SocketAddrV4::new(RESERVED, BOOT_SERVER_PORT);
    let outcome = run_boot_server(&decoded(&boot_server_request(pxe(7), RESERVED)), peer);
    let (ack, reply, event, foreign) = proxy_reply_of(&outcome);
    assert_proxy_shape(&ack, MessageType::Ack);
    assert_pxe_proxy(&ack, "snponly.efi");
    assert_eq!(ack.ciaddr(), RESERVED);
    assert_eq!(
        reply.destination,
        SocketAddr::V4(peer),
        "back to address:port"
    );
    assert_eq!(event, Some(BootEvent::ProxyOffered));
    assert_eq!(foreign, None);

    // BIOS PXE, iPXE (its script: the window opens) and from another port.
    let peer = SocketAddrV4::new(RESERVED, 68);
    let (ack, reply, _, _) = proxy_reply_of(&run_boot_server(
        &decoded(&boot_server_request(pxe(0), RESERVED)),
        peer,
    ));
    assert_pxe_proxy(&ack, "undionly.kpxe");
    assert_eq!(reply.destination, SocketAddr::V4(peer));
    let (ack, _, event, _) = proxy_reply_of(&run_boot_server(
        &decoded(&boot_server_request(ipxe(7), RESERVED)),
        peer,
    ));
    assert_pxe_proxy(&ack, "http://10.77.0.1:8080/ipxe/52-54-00-12-34-56");
    assert_eq!(event, Some(BootEvent::ProxyScriptOffered));

    // From the address the LAN's server gave instead of the reservation: answered (the boot
    // file is no secret), and flagged.
    let elsewhere = SocketAddrV4::new(LAN_GIVEN, BOOT_SERVER_PORT);
    let (ack, reply, _, foreign) = proxy_reply_of(&run_boot_server(
        &decoded(&boot_server_request(pxe(7), LAN_GIVEN)),
        elsewhere,
    ));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(reply.destination, SocketAddr::V4(elsewhere));
    assert_eq!(foreign, Some(LAN_GIVEN));
}

#[test]
fn boot_server_answers_only_clients_with_an_address() {
    let msg = boot_server_request(pxe(7), RESERVED);
    // No sender address, or a ciaddr that is not the sender: nowhere to unicast to.
    for (from, ciaddr) in [
        (Ipv4Addr::UNSPECIFIED, RESERVED),
        (Ipv4Addr::BROADCAST, RESERVED),
        (LAN_GIVEN, RESERVED),
    ] {
        let mut m = msg.clone();
        m.set_ciaddr(ciaddr);
        assert_eq!(
            run_boot_server(&m, SocketAddrV4::new(from, BOOT_SERVER_PORT)),
            Outcome::Ignored(Ignored::NoClientAddress { ciaddr, from }),
            "{from} {ciaddr}"
        );
    }
    let peer = SocketAddrV4::new(RESERVED, BOOT_SERVER_PORT);
    assert_eq!(
        run_boot_server(&with(request(MessageType::Request, STRANGER), pxe(7)), peer),
        Outcome::UnknownMac(STRANGER)
    );
    assert_eq!(
        run_boot_server(&boot_server_request(vec![], RESERVED), peer),
        Outcome::Ignored(Ignored::NotBootClient)
    );
    for kind in [
        MessageType::Discover,
        MessageType::Release,
        MessageType::Decline,
    ] {
        let mut m = with(request(kind, MAC), pxe(7));
        m.set_ciaddr(RESERVED);
        assert_eq!(
            run_boot_server(&m, peer),
            Outcome::Ignored(Ignored::UnexpectedType(kind))
        );
    }
    // giaddr plays no part: still unicast to the sender.
    let mut relayed = msg.clone();
    relayed.set_giaddr(Ipv4Addr::new(10, 77, 9, 9));
    let (_, reply, _, _) = proxy_reply_of(&run_boot_server(&relayed, peer));
    assert_eq!(reply.destination, SocketAddr::V4(peer));
}

#[test]
fn proxy_mode_never_gives_an_address_and_never_naks() {
    let kinds = [
        MessageType::Discover,
        MessageType::Request,
        MessageType::Inform,
        MessageType::Release,
        MessageType::Decline,
    ];
    let clients = [pxe(0), pxe(7), pxe(11), ipxe(0), ipxe(7), vec![], {
        let mut http = pxe(16);
        http[1] = DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec());
        http
    }];
    let server_ids = [None, Some(SERVER), Some(LAN_SERVER)];
    let asked = [
        None,
        Some(RESERVED),
        Some(LAN_GIVEN),
        Some(Ipv4Addr::new(192, 168, 1, 9)),
    ];
    let senders = [Ipv4Addr::UNSPECIFIED, RESERVED, LAN_GIVEN];
    let mut replies = 0;
    for kind in kinds {
        for client in &clients {
            for sid in server_ids {
                for ask in asked {
                    for ciaddr in [Ipv4Addr::UNSPECIFIED, RESERVED, LAN_GIVEN] {
                        for from in senders {
                            let mut msg = with(request(kind, MAC), client.clone());
                            if let Some(sid) = sid {
                                msg.opts_mut().insert(DhcpOption::ServerIdentifier(sid));
                            }
                            if let Some(ask) = ask {
                                msg.opts_mut().insert(DhcpOption::RequestedIpAddress(ask));
                            }
                            msg.set_ciaddr(ciaddr);
                            let outcomes = [
                                run_proxy(&msg, from),
                                run_boot_server(&msg, SocketAddrV4::new(from, BOOT_SERVER_PORT)),
                            ];
                            for outcome in outcomes {
                                assert!(
                                    !matches!(outcome, Outcome::Report { .. }),
                                    "lease event in proxy mode: {outcome:?}"
                                );
                                let Some(reply) = outcome.reply() else {
                                    continue;
                                };
                                replies += 1;
                                let wire = reply.to_bytes().expect("encode");
                                let back =
                                    Message::decode(&mut Decoder::new(&wire)).expect("decode");
                                assert_eq!(back.yiaddr(), Ipv4Addr::UNSPECIFIED, "{msg:?}");
                                assert!(
                                    matches!(
                                        back.opts().msg_type(),
                                        Some(MessageType::Offer | MessageType::Ack)
                                    ),
                                    "{back:?}"
                                );
                                assert_eq!(opt(&back, 51), None);
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(
        replies > 100,
        "only {replies} replies: the sweep answers nothing"
    );
}

#[test]
fn proxy_and_boot_server_decode_captured_firmware() {
    // The EDK2 DISCOVER of the fixtures, as real firmware sends it, gets a proxy offer.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dhcp/ovmf-pxe-discover.bin");
    let bytes = std::fs::read(&path).expect("fixture");
    let msg = decode_request(&bytes).expect("fixture decodes");
    let outcome = run_proxy(&msg, Ipv4Addr::UNSPECIFIED);
    let (offer, _, _, _) = proxy_reply_of(&outcome);
    assert_eq!(offer.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(file(&offer).as_deref(), Some("snponly.efi"));
}

// ---- the serve loop, on loopback ------------------------------------------------------------

#[derive(Default)]
struct Recorder {
    inner: HashMap<MacAddr, Machine>,
    events: Mutex<Vec<(String, BootEvent)>>,
}

impl MachineLookup for Recorder {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        self.inner.get(mac).cloned()
    }
    fn observe(&self, machine: &Machine, event: BootEvent) {
        self.events
            .lock()
            .expect("lock")
            .push((machine.name.clone(), event));
    }
}

#[tokio::test]
async fn serves_relayed_requests_on_loopback_and_stops() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind server");
    let server_addr = server.local_addr().expect("addr");
    // The test plays a relay agent (giaddr = 127.0.0.1), so replies come to its port.
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let relay_port = relay.local_addr().expect("addr").port();
    let recorder = Arc::new(Recorder {
        inner: inventory(),
        ..Recorder::default()
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(super::run(
        server,
        Arc::new(DhcpSettings {
            relays: vec![Ipv4Addr::LOCALHOST],
            ..settings()
        }),
        recorder.clone(),
        shutdown.clone(),
        Listener::Dhcp(Ports {
            client: relay_port,
            relay: relay_port,
        }),
    ));

    let relayed = |kind, mac: MacAddr, opts: Vec<DhcpOption>| {
        let mut msg = with(request(kind, mac), opts);
        msg.set_giaddr(Ipv4Addr::LOCALHOST);
        if kind == MessageType::Release {
            msg.set_ciaddr(RESERVED);
        }
        encode(&msg)
    };
    let mut buf = [0u8; 1500];

    // Garbage, a stranger and a BOOTREPLY first: no answer, no crash.
    relay.send_to(b"hello", server_addr).await.expect("send");
    relay
        .send_to(
            &relayed(MessageType::Discover, STRANGER, vec![]),
            server_addr,
        )
        .await
        .expect("send");
    relay
        .send_to(&relayed(MessageType::Discover, MAC, ipxe(0)), server_addr)
        .await
        .expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), relay.recv_from(&mut buf))
        .await
        .expect("offer in time")
        .expect("recv");
    let offer = Message::decode(&mut Decoder::new(&buf[..n])).expect("decode");
    assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.yiaddr(), RESERVED);
    assert_eq!(offer.xid(), 0x1234_5678);
    assert_eq!(offer.chaddr(), &MAC.0);

    let req = vec![
        DhcpOption::ServerIdentifier(SERVER),
        DhcpOption::RequestedIpAddress(RESERVED),
    ];
    relay
        .send_to(&relayed(MessageType::Request, MAC, req), server_addr)
        .await
        .expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), relay.recv_from(&mut buf))
        .await
        .expect("ack in time")
        .expect("recv");
    let ack = Message::decode(&mut Decoder::new(&buf[..n])).expect("decode");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));

    // Relayed with a giaddr that is not a configured relay: no ACK, no event.
    let mut untrusted = with(
        request(MessageType::Request, MAC),
        [
            DhcpOption::ServerIdentifier(SERVER),
            DhcpOption::RequestedIpAddress(RESERVED),
        ],
    );
    untrusted.set_giaddr(Ipv4Addr::new(127, 0, 0, 2));
    relay
        .send_to(&encode(&untrusted), server_addr)
        .await
        .expect("send");
    let rel = vec![DhcpOption::ServerIdentifier(SERVER)];
    relay
        .send_to(&relayed(MessageType::Release, MAC, rel), server_addr)
        .await
        .expect("send");
    // Neither the stranger's DISCOVER nor the RELEASE is answered: the server reads its socket
    // in order, so the next datagram is the answer to a DISCOVER sent after them.
    relay
        .send_to(&relayed(MessageType::Discover, MAC, ipxe(0)), server_addr)
        .await
        .expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(10), relay.recv_from(&mut buf))
        .await
        .expect("offer in time")
        .expect("recv");
    let next = Message::decode(&mut Decoder::new(&buf[..n])).expect("decode");
    assert_eq!(next.opts().msg_type(), Some(MessageType::Offer), "{next:?}");

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops in time");
    result.expect("no panic").expect("returns Ok");
    let events = recorder.events.lock().expect("lock").clone();
    assert_eq!(
        events,
        vec![
            ("node2".to_string(), BootEvent::DhcpOffered),
            ("node2".to_string(), BootEvent::DhcpAcked),
            ("node2".to_string(), BootEvent::DhcpReleased),
            ("node2".to_string(), BootEvent::DhcpOffered),
        ]
    );
}

/// A [`Recorder`] that takes its time to record (a loaded machine).
struct SlowRecorder(Recorder);

impl MachineLookup for SlowRecorder {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        self.0.by_mac(mac)
    }
    fn observe(&self, machine: &Machine, event: BootEvent) {
        std::thread::sleep(Duration::from_millis(300));
        self.0.observe(machine, event);
    }
}

/// iPXE asks for its script as soon as it has the ACK, and the script's token is given only
/// within the window the ACK opens: the ACK must be recorded before it is sent, however long
/// recording takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_is_recorded_before_the_client_has_it() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind server");
    let server_addr = server.local_addr().expect("addr");
    let relay = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind relay");
    let relay_port = relay.local_addr().expect("addr").port();
    let recorder = Arc::new(SlowRecorder(Recorder {
        inner: inventory(),
        ..Recorder::default()
    }));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(super::run(
        server,
        Arc::new(DhcpSettings {
            relays: vec![Ipv4Addr::LOCALHOST],
            ..settings()
        }),
        recorder.clone(),
        shutdown.clone(),
        Listener::Dhcp(Ports {
            client: relay_port,
            relay: relay_port,
        }),
    ));
    let relayed = |kind, opts: Vec<DhcpOption>| {
        let mut msg = with(request(kind, MAC), opts);
        msg.set_giaddr(Ipv4Addr::LOCALHOST);
        encode(&msg)
    };
    let mut buf = [0u8; 1500];
    for (kind, opts, answer) in [
        (MessageType::Discover, ipxe(0), MessageType::Offer),
        (
            MessageType::Request,
            vec![
                DhcpOption::ServerIdentifier(SERVER),
                DhcpOption::RequestedIpAddress(RESERVED),
            ],
            MessageType::Ack,
        ),
    ] {
        relay
            .send_to(&relayed(kind, opts), server_addr)
            .await
            .expect("send");
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), relay.recv_from(&mut buf))
            .await
            .expect("answer in time")
            .expect("recv");
        let reply = Message::decode(&mut Decoder::new(&buf[..n])).expect("decode");
        assert_eq!(reply.opts().msg_type(), Some(answer));
    }
    let events = recorder.0.events.lock().expect("lock").clone();
    assert!(
        events.contains(&("node2".to_string(), BootEvent::DhcpAcked)),
        "the ACK arrived before it was recorded: {events:?}"
    );
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops in time");
    result.expect("no panic").expect("returns Ok");
}

#[tokio::test]
async fn boot_server_answers_on_loopback_to_the_sender_and_stops() {
    let server = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind server");
    let server_addr = server.local_addr().expect("addr");
    let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client");
    let recorder = Arc::new(Recorder {
        inner: inventory(),
        ..Recorder::default()
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(super::serve_boot_server(
        server,
        Arc::new(DhcpSettings {
            mode: DhcpMode::Proxy,
            ..settings()
        }),
        recorder.clone(),
        shutdown.clone(),
    ));
    let mut buf = [0u8; 1500];
    // A stranger and a DISCOVER first: no answer, so the next datagram answers the REQUEST.
    for (kind, mac) in [
        (MessageType::Request, STRANGER),
        (MessageType::Discover, MAC),
        (MessageType::Request, MAC),
    ] {
        let mut msg = with(request(kind, mac), pxe(7));
        msg.set_ciaddr(Ipv4Addr::LOCALHOST);
        client
            .send_to(&encode(&msg), server_addr)
            .await
            .expect("send");
    }
    let (n, from) = tokio::time::timeout(Duration::from_secs(10), client.recv_from(&mut buf))
        .await
        .expect("ack in time")
        .expect("recv");
    assert_eq!(from, server_addr);
    let ack = Message::decode(&mut Decoder::new(&buf[..n])).expect("decode");
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(file(&ack).as_deref(), Some("snponly.efi"));

    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops in time");
    result.expect("no panic").expect("returns Ok");
    let events = recorder.events.lock().expect("lock").clone();
    assert_eq!(events, vec![("node2".to_string(), BootEvent::ProxyOffered)]);
}
