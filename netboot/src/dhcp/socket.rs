//! The DHCP socket with `IP_PKTINFO`: we learn which interface each request came in on and send
//! the reply out of that same interface.
//!
//! Replies to clients without an address go to 255.255.255.255, which the kernel would otherwise
//! route by the default route: out of the wrong link on a host with an uplink, or nowhere
//! ("network unreachable") on an isolated provisioning network. dnsmasq does the same.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

pub(crate) struct PktInfoSocket {
    socket: UdpSocket,
}

/// A received datagram's length, sender and incoming interface index (0 if unknown).
pub(crate) struct Received {
    pub len: usize,
    pub peer: SocketAddr,
    pub ifindex: u32,
}

impl PktInfoSocket {
    pub fn new(socket: UdpSocket) -> io::Result<Self> {
        socket.set_broadcast(true)?;
        setsockopt(&socket, sockopt::Ipv4PacketInfo, &true).map_err(io::Error::from)?;
        Ok(PktInfoSocket { socket })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub fn inner(&self) -> &UdpSocket {
        &self.socket
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        let fd = self.socket.as_raw_fd();
        self.socket
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(buf)];
                let mut cmsg = nix::cmsg_space!(nix::libc::in_pktinfo);
                let msg =
                    recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)
                        .map_err(io::Error::from)?;
                let mut ifindex = 0;
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                        ifindex = u32::try_from(info.ipi_ifindex).unwrap_or(0);
                    }
                }
                let peer = msg
                    .address
                    .map(|a| SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())))
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            "datagram without a sender address",
                        )
                    })?;
                Ok(Received {
                    len: msg.bytes,
                    peer,
                    ifindex,
                })
            })
            .await
    }

    /// Sends `bytes` to `to`, out of interface `ifindex` (0: let the routing table decide). The
    /// kernel picks that interface's own address as the source.
    pub async fn send(&self, bytes: &[u8], to: SocketAddr, ifindex: u32) -> io::Result<usize> {
        let SocketAddr::V4(to) = to else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "DHCPv4 reply to a non-IPv4 address",
            ));
        };
        let fd = self.socket.as_raw_fd();
        let dest = SockaddrIn::from(to);
        let info = nix::libc::in_pktinfo {
            ipi_ifindex: i32::try_from(ifindex).unwrap_or(0),
            ipi_spec_dst: nix::libc::in_addr { s_addr: 0 },
            ipi_addr: nix::libc::in_addr { s_addr: 0 },
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                let iov = [IoSlice::new(bytes)];
                let cmsgs: &[ControlMessage] = if ifindex == 0 {
                    &[]
                } else {
                    &[ControlMessage::Ipv4PacketInfo(&info)]
                };
                sendmsg(fd, &iov, cmsgs, MsgFlags::MSG_DONTWAIT, Some(&dest))
                    .map_err(io::Error::from)
            })
            .await
    }
}
