//! Boot decisions and replies for DHCP requests captured from real firmware
//! (`tests/fixtures/dhcp/README.md` says which).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};
use netboot::dhcp::{
    boot_client, decode_request, handle, BootClient, DhcpMode, DhcpSettings, Outcome,
};
use netboot::{BootEvent, MacAddr, Machine};

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The address dnsmasq offered during the capture, so the REQUESTs name it.
const CAPTURED_OFFER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 157);
const SCRIPT_URL: &str = "http://10.77.0.1:8080/ipxe/52-54-00-12-34-56";

fn settings() -> DhcpSettings {
    DhcpSettings {
        mode: DhcpMode::Standalone,
        server_ip: SERVER,
        subnet: "10.77.0.0/24".parse().expect("subnet"),
        gateway: Some(SERVER),
        dns_servers: vec![SERVER],
        lease_time: Duration::from_secs(3600),
        bios_loader: "undionly.kpxe".into(),
        uefi_loader: "snponly.efi".into(),
        http_base: "http://10.77.0.1:8080".into(),
        relays: vec![],
    }
}

fn inventory(ip: Ipv4Addr) -> HashMap<MacAddr, Machine> {
    let mac: MacAddr = "52:54:00:12:34:56".parse().expect("mac");
    HashMap::from([(
        mac,
        Machine {
            name: "node2".into(),
            mac,
            ip,
            hostname: None,
        },
    )])
}

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dhcp")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Answer {
    client: BootClient,
    reply: Message,
    wire_len: usize,
    destination: SocketAddr,
    event: Option<BootEvent>,
}

fn answer(name: &str, reserved: Ipv4Addr) -> Answer {
    let request = decode_request(&fixture(name)).expect("fixture decodes");
    let client = boot_client(&request);
    let outcome = handle(
        &request,
        Ipv4Addr::UNSPECIFIED,
        &settings(),
        &inventory(reserved),
    );
    let Outcome::Reply {
        reply,
        event,
        client: decided,
        ..
    } = outcome
    else {
        panic!("{name}: no reply: {outcome:?}")
    };
    assert_eq!(decided, client);
    let bytes = reply.to_bytes().expect("encodes");
    let back = Message::decode(&mut Decoder::new(&bytes)).expect("reply decodes");
    assert_eq!(back.xid(), request.xid(), "{name}: xid echoed");
    assert_eq!(back.chaddr(), request.chaddr(), "{name}: chaddr echoed");
    Answer {
        client,
        reply: back,
        wire_len: bytes.len(),
        destination: reply.destination,
        event,
    }
}

fn bytes(msg: &Message, code: u8) -> Option<Vec<u8>> {
    match msg.opts().get(OptionCode::from(code))? {
        DhcpOption::ClassIdentifier(v)
        | DhcpOption::BootfileName(v)
        | DhcpOption::TFTPServerName(v)
        | DhcpOption::ClientMachineIdentifier(v) => Some(v.clone()),
        DhcpOption::Unknown(u) => Some(u.data().to_vec()),
        other => panic!("option {code}: {other:?}"),
    }
}

fn file(msg: &Message) -> String {
    let f = msg.fname_str().expect("file field").expect("utf-8");
    f.trim_end_matches('\0').to_string()
}

fn broadcast() -> SocketAddr {
    "255.255.255.255:68".parse().expect("addr")
}

/// The DISCOVER and the REQUEST of one client get OFFER and ACK with the same boot file.
fn offer_and_ack(prefix: &str, want: BootClient, boot: &str) -> (Message, Message) {
    let offer = answer(&format!("{prefix}-discover.bin"), CAPTURED_OFFER);
    assert_eq!(offer.client, want, "{prefix}");
    assert_eq!(offer.reply.opts().msg_type(), Some(MessageType::Offer));
    assert_eq!(offer.event, Some(BootEvent::DhcpOffered));
    let ack = answer(&format!("{prefix}-request.bin"), CAPTURED_OFFER);
    assert_eq!(ack.client, want, "{prefix}");
    assert_eq!(ack.reply.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.event, Some(BootEvent::DhcpAcked));
    for a in [&offer, &ack] {
        let r = &a.reply;
        assert_eq!(r.yiaddr(), CAPTURED_OFFER);
        assert_eq!(r.siaddr(), SERVER);
        assert_eq!(file(r), boot, "{prefix}");
        assert_eq!(bytes(r, 67), Some(boot.as_bytes().to_vec()), "{prefix}");
        assert_eq!(
            r.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            r.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("node2".into()))
        );
        assert_eq!(
            a.destination,
            broadcast(),
            "{prefix}: the client has no address yet"
        );
        assert!(a.wire_len <= 576 - 28, "{prefix}: {} bytes", a.wire_len);
    }
    (offer.reply, ack.reply)
}

#[test]
fn bios_ipxe_rom_gets_its_script() {
    let (offer, ack) = offer_and_ack(
        "bios-ipxe-rom",
        BootClient::Ipxe { arch: Some(0) },
        SCRIPT_URL,
    );
    for r in [&offer, &ack] {
        assert_eq!(bytes(r, 175), Some(vec![176, 1, 1]));
        assert_eq!(bytes(r, 60), None);
    }
}

#[test]
fn undionly_gets_its_script_not_itself_again() {
    // Serving undionly.kpxe to undionly would loop: it is iPXE and gets the script.
    offer_and_ack(
        "bios-undionly",
        BootClient::Ipxe { arch: Some(0) },
        SCRIPT_URL,
    );
}

#[test]
fn ovmf_pxe_gets_snponly_over_tftp() {
    let (offer, ack) = offer_and_ack("ovmf-pxe", BootClient::UefiX64, "snponly.efi");
    for r in [&offer, &ack] {
        assert_eq!(bytes(r, 60), Some(b"PXEClient".to_vec()));
        assert_eq!(bytes(r, 66), Some(b"10.77.0.1".to_vec()));
        assert_eq!(bytes(r, 97), Some(vec![0; 17]), "client UUID echoed");
    }
}

#[test]
fn snponly_gets_its_script() {
    let (offer, _) = offer_and_ack(
        "ovmf-snponly",
        BootClient::Ipxe { arch: Some(7) },
        SCRIPT_URL,
    );
    assert_eq!(bytes(&offer, 175), Some(vec![176, 1, 1]));
}

#[test]
fn ovmf_http_boot_gets_ipxe_efi_url() {
    let (offer, ack) = offer_and_ack(
        "ovmf-httpboot",
        BootClient::UefiHttp,
        "http://10.77.0.1:8080/boot/ipxe.efi",
    );
    for r in [&offer, &ack] {
        assert_eq!(
            bytes(r, 60),
            Some(b"HTTPClient".to_vec()),
            "EDK2 needs HTTPClient echoed"
        );
    }
}

#[test]
fn captured_requests_for_another_address_are_naked() {
    // The REQUESTs name dnsmasq's 10.77.0.157 with server id 10.77.0.1 (ours): a machine reserved
    // at .20 must be told no.
    for prefix in [
        "bios-ipxe-rom",
        "bios-undionly",
        "ovmf-pxe",
        "ovmf-snponly",
        "ovmf-httpboot",
    ] {
        let nak = answer(
            &format!("{prefix}-request.bin"),
            Ipv4Addr::new(10, 77, 0, 20),
        );
        assert_eq!(
            nak.reply.opts().msg_type(),
            Some(MessageType::Nak),
            "{prefix}"
        );
        assert_eq!(nak.reply.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(nak.destination, broadcast());
        assert_eq!(nak.event, None);
    }
}

#[test]
fn captured_requests_for_another_server_get_silence() {
    let other = DhcpSettings {
        server_ip: Ipv4Addr::new(10, 77, 0, 2),
        ..settings()
    };
    for prefix in ["bios-ipxe-rom", "ovmf-pxe", "ovmf-httpboot"] {
        let request = decode_request(&fixture(&format!("{prefix}-request.bin"))).expect("decodes");
        let outcome = handle(
            &request,
            Ipv4Addr::UNSPECIFIED,
            &other,
            &inventory(CAPTURED_OFFER),
        );
        assert!(
            matches!(
                outcome,
                Outcome::Ignored(netboot::dhcp::Ignored::OtherServer(SERVER))
            ),
            "{prefix}: {outcome:?}"
        );
    }
}

#[test]
fn unknown_machines_get_nothing() {
    let empty: HashMap<MacAddr, Machine> = HashMap::new();
    for name in [
        "bios-ipxe-rom-discover.bin",
        "ovmf-pxe-discover.bin",
        "ovmf-httpboot-discover.bin",
    ] {
        let request = decode_request(&fixture(name)).expect("decodes");
        assert!(
            matches!(
                handle(&request, Ipv4Addr::UNSPECIFIED, &settings(), &empty),
                Outcome::UnknownMac(_)
            ),
            "{name}"
        );
    }
}
