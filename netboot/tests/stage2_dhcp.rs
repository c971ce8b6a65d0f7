//! netboot's DHCP server and stage2's DHCP client (PID 1 of the imaging initrd) agree: the
//! client's DISCOVER and REQUEST get the machine's reservation, and the client reads the
//! server's replies, including after both ends' option filters.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder};
use netboot::dhcp::{handle, DhcpMode, DhcpSettings, Outcome};
use netboot::{MacAddr, Machine};
use stage2::init::dhcp::{discover, lease_from_ack, parse_reply, request, Lease};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x5e, 0x00, 0x01];
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RESERVED: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);

fn settings() -> DhcpSettings {
    DhcpSettings {
        mode: DhcpMode::Standalone,
        server_ip: SERVER,
        subnet: "10.77.0.0/24".parse().unwrap_or_else(|e| panic!("{e}")),
        gateway: Some(SERVER),
        dns_servers: vec![SERVER],
        lease_time: Duration::from_secs(3600),
        bios_loader: "undionly.kpxe".into(),
        uefi_loader: "snponly.efi".into(),
        http_base: "http://10.77.0.1:8080".into(),
        relays: vec![],
    }
}

fn inventory() -> HashMap<MacAddr, Machine> {
    let machine = Machine {
        name: "node2".into(),
        mac: MacAddr(MAC),
        ip: RESERVED,
        hostname: Some("node2".into()),
    };
    HashMap::from([(MacAddr(MAC), machine)])
}

/// Runs one of our datagrams through netboot's DHCP decisions; returns the reply bytes.
fn serve(datagram: &[u8]) -> Vec<u8> {
    let request = match netboot::dhcp::decode_request(datagram) {
        Ok(r) => r,
        Err(e) => panic!("netboot cannot read our request: {e}"),
    };
    // stage2 has no address yet: its datagrams come from 0.0.0.0.
    match handle(&request, Ipv4Addr::UNSPECIFIED, &settings(), &inventory()) {
        Outcome::Reply { reply, .. } => match reply.to_bytes() {
            Ok(b) => b,
            Err(e) => panic!("{e}"),
        },
        other => panic!("no reply: {other:?}"),
    }
}

#[test]
fn full_exchange_with_netboot_yields_the_reserved_lease() {
    let xid = 0x0bad_cafe;
    let discover = discover(MAC, xid, 0).unwrap_or_else(|e| panic!("{e}"));
    let offer = parse_reply(&serve(&discover), xid, MAC).unwrap_or_else(|| panic!("no offer"));
    assert_eq!(offer.kind, MessageType::Offer);
    assert_eq!(offer.message.yiaddr(), RESERVED);
    let request = request(MAC, xid, 1, &offer.message).unwrap_or_else(|e| panic!("{e}"));
    let ack = parse_reply(&serve(&request), xid, MAC).unwrap_or_else(|| panic!("no ack"));
    assert_eq!(ack.kind, MessageType::Ack);
    let lease = lease_from_ack(&ack.message).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        lease,
        Lease {
            address: RESERVED,
            prefix_len: 24,
            router: Some(SERVER),
            dns: vec![SERVER],
            server: SERVER,
            lease_secs: Some(3600),
            hostname: Some("node2".into()),
        }
    );
}

#[test]
fn requests_ask_for_broadcast_replies_and_name_the_offer() {
    let offer_bytes = {
        let discover = discover(MAC, 7, 0).unwrap_or_else(|e| panic!("{e}"));
        serve(&discover)
    };
    let offer = parse_reply(&offer_bytes, 7, MAC).unwrap_or_else(|| panic!("no offer"));
    let bytes = request(MAC, 7, 0, &offer.message).unwrap_or_else(|e| panic!("{e}"));
    let msg = Message::decode(&mut Decoder::new(&bytes)).unwrap_or_else(|e| panic!("{e}"));
    assert!(msg.flags().broadcast());
    assert_eq!(
        msg.opts().get(OptionCode::RequestedIpAddress),
        Some(&DhcpOption::RequestedIpAddress(RESERVED))
    );
    assert_eq!(
        msg.opts().get(OptionCode::ServerIdentifier),
        Some(&DhcpOption::ServerIdentifier(SERVER))
    );
}

#[test]
fn replies_for_someone_else_or_malformed_are_ignored() {
    let discover = discover(MAC, 42, 0).unwrap_or_else(|e| panic!("{e}"));
    let offer = serve(&discover);
    assert!(parse_reply(&offer, 43, MAC).is_none(), "other xid");
    let mut other_mac = MAC;
    other_mac[5] ^= 1;
    assert!(parse_reply(&offer, 42, other_mac).is_none(), "other MAC");
    assert!(
        parse_reply(&offer[..100], 42, MAC).is_none(),
        "truncated header"
    );
    // An option whose length runs past the end, and a router option of 3 bytes: the first
    // makes the packet unreadable, the second is dropped.
    let mut bad = offer.clone();
    let end = bad.iter().rposition(|b| *b == 255).unwrap_or(bad.len());
    bad.truncate(end);
    bad.extend_from_slice(&[3, 3, 1, 2, 3, 255]);
    let reply = parse_reply(&bad, 42, MAC).unwrap_or_else(|| panic!("dropped whole reply"));
    assert!(
        reply.message.opts().get(OptionCode::Router).is_some(),
        "first router kept"
    );
    bad.truncate(end);
    bad.extend_from_slice(&[12, 200, b'x']);
    assert!(parse_reply(&bad, 42, MAC).is_none());
    for len in 0..offer.len() {
        let _ = parse_reply(&offer[..len], 42, MAC); // must not panic
    }
}
