//! DHCP: a datagram is decoded (with the pre-filter) and, when it decodes, handled as from a
//! machine whose MAC is known (every MAC is, here), so the whole decision path runs. Each
//! packet is handled as sent from each kind of sender (no address yet, the reservation, a
//! configured relay, another host), so the relay and RELEASE/DECLINE checks run too; a reply
//! carries at least the fixed BOOTP header. In proxy mode too, on the DHCP port and on the PXE
//! boot-server port, where a reply never carries an address and is never a NAK.
#![no_main]

use std::net::Ipv4Addr;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddrV4;

use dhcproto::v4::MessageType;
use netboot::dhcp::{decode_request, handle, handle_boot_server, DhcpMode, DhcpSettings};
use netboot::{BootEvent, MacAddr, Machine, MachineLookup};

/// The configured relay agent.
const RELAY: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// The senders each packet is handled as coming from: a client without an address, the
/// reservation itself, the relay, another host on the LAN.
const SENDERS: [Ipv4Addr; 4] = [
    Ipv4Addr::UNSPECIFIED,
    Ipv4Addr::new(10, 77, 0, 20),
    RELAY,
    Ipv4Addr::new(10, 77, 0, 50),
];

struct Everyone;

impl MachineLookup for Everyone {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        Some(Machine {
            name: "node2".into(),
            mac: *mac,
            ip: Ipv4Addr::new(10, 77, 0, 20),
            hostname: Some("node2".into()),
        })
    }
    fn observe(&self, _: &Machine, _: BootEvent) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode_request(data) else {
        return;
    };
    let settings = DhcpSettings {
        mode: DhcpMode::Standalone,
        server_ip: Ipv4Addr::new(10, 77, 0, 1),
        subnet: "10.77.0.0/24".parse().expect("subnet"),
        gateway: Some(Ipv4Addr::new(10, 77, 0, 1)),
        dns_servers: vec![Ipv4Addr::new(10, 77, 0, 1)],
        lease_time: Duration::from_secs(3600),
        bios_loader: "undionly.kpxe".into(),
        uefi_loader: "snponly.efi".into(),
        http_base: "http://10.77.0.1".into(),
        relays: vec![RELAY],
    };
    let proxy = DhcpSettings {
        mode: DhcpMode::Proxy,
        ..settings.clone()
    };
    for from in SENDERS {
        let outcome = handle(&request, from, &settings, &Everyone);
        if let Some(reply) = outcome.reply() {
            assert!(
                reply.wire().len() >= 240,
                "reply shorter than a BOOTP header"
            );
        }
        let proxied = [
            handle(&request, from, &proxy, &Everyone),
            handle_boot_server(&request, SocketAddrV4::new(from, 4011), &proxy, &Everyone),
        ];
        for outcome in proxied {
            if let Some(reply) = outcome.reply() {
                assert!(
                    reply.wire().len() >= 240,
                    "reply shorter than a BOOTP header"
                );
                assert!(
                    reply.message.yiaddr().is_unspecified(),
                    "an address in proxy mode"
                );
                assert_ne!(
                    reply.message_type(),
                    Some(MessageType::Nak),
                    "a NAK in proxy mode"
                );
            }
        }
    }
});
