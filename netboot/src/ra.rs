//! Minimal IPv6 router advertisements on the provisioning link.
//!
//! iPXE configures IPv4 (DHCP) and IPv6 (SLAAC) in parallel and waits for both before it boots:
//! on a link where no router advertises, that wait costs about 16 s per boot (measured with
//! QEMU's iPXE ROM and snponly.efi). Answering its router solicitation with an advertisement
//! that says "I am not a router" (router lifetime 0, no prefix, no flags) ends the wait at once
//! without configuring anything on the clients.
//!
//! Needs a raw ICMPv6 socket, hence CAP_NET_RAW; without it netboot still works and only logs
//! that iPXE clients will be slower.

use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const ROUTER_SOLICITATION: u8 = 133;
const ROUTER_ADVERTISEMENT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// One multicast advertisement answers every client that is waiting; don't send more often.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The advertisement: ICMPv6 type 134 with router lifetime 0 and, if known, our link-layer
/// address (option 1). The kernel fills in the checksum of raw ICMPv6 sockets.
pub fn advertisement(mac: Option<[u8; 6]>) -> Vec<u8> {
    let mut ra = vec![
        ROUTER_ADVERTISEMENT,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    if let Some(mac) = mac {
        ra.extend_from_slice(&[1, 1]);
        ra.extend_from_slice(&mac);
    }
    ra
}

/// A raw ICMPv6 socket bound to `interface`, member of all-routers.
pub struct RaSocket {
    /// A raw ICMPv6 socket driven through tokio's UdpSocket: both are plain datagram sockets
    /// to the kernel (sendto/recvfrom), and this avoids unsafe fd registration.
    socket: UdpSocket,
    ifindex: u32,
    interface: String,
    advertisement: Vec<u8>,
}

fn interface_mac(interface: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address")).ok()?;
    text.trim().parse::<crate::MacAddr>().ok().map(|m| m.0)
}

impl RaSocket {
    /// Opens the socket; fails with `PermissionDenied` without CAP_NET_RAW.
    pub fn open(interface: &str) -> io::Result<RaSocket> {
        let ifindex = nix::net::if_::if_nametoindex(interface).map_err(io::Error::from)?;
        let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
        socket.bind_device(Some(interface.as_bytes()))?;
        // RFC 4861 §6.1.2: receivers drop advertisements whose hop limit is not 255.
        socket.set_multicast_hops_v6(255)?;
        socket.set_unicast_hops_v6(255)?;
        socket.set_multicast_if_v6(ifindex)?;
        socket.join_multicast_v6(&ALL_ROUTERS, ifindex)?;
        socket.set_nonblocking(true)?;
        Ok(RaSocket {
            socket: UdpSocket::from_std(std::net::UdpSocket::from(socket))?,
            ifindex,
            interface: interface.to_string(),
            advertisement: advertisement(interface_mac(interface)),
        })
    }

    async fn send(&self) -> io::Result<()> {
        let to = SocketAddrV6::new(ALL_NODES, 0, 0, self.ifindex);
        self.socket
            .send_to(&self.advertisement, to)
            .await
            .map(|_| ())
    }

    async fn recv_type(&self, buf: &mut [u8]) -> io::Result<Option<u8>> {
        let (n, _from) = self.socket.recv_from(buf).await?;
        Ok(buf.get(..n).and_then(|b| b.first().copied()))
    }
}

/// Sends one advertisement at start, then answers router solicitations until `shutdown`.
pub async fn serve(socket: RaSocket, shutdown: CancellationToken) -> io::Result<()> {
    tracing::info!(interface = %socket.interface, "answering IPv6 router solicitations (lifetime 0: not a router)");
    if let Err(e) = socket.send().await {
        tracing::warn!(interface = %socket.interface, error = %e, "cannot send router advertisement");
    }
    let mut last_sent = Instant::now();
    let mut buf = [0u8; 1500];
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            r = socket.recv_type(&mut buf) => r,
        };
        match received {
            Ok(Some(ROUTER_SOLICITATION)) if last_sent.elapsed() >= MIN_INTERVAL => {
                last_sent = Instant::now();
                if let Err(e) = socket.send().await {
                    tracing::warn!(interface = %socket.interface, error = %e, "cannot send router advertisement");
                } else {
                    tracing::debug!(interface = %socket.interface, "router solicitation answered");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(interface = %socket.interface, error = %e, "ICMPv6 receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertisement_says_not_a_router() {
        let ra = advertisement(Some([0x52, 0x54, 0, 1, 2, 3]));
        assert_eq!(ra[0], ROUTER_ADVERTISEMENT);
        assert_eq!(ra[5], 0, "no managed/other flags");
        assert_eq!(&ra[6..8], &[0, 0], "router lifetime 0");
        assert_eq!(
            &ra[16..],
            &[1, 1, 0x52, 0x54, 0, 1, 2, 3],
            "source link-layer address option"
        );
        assert_eq!(advertisement(None).len(), 16);
    }
}
