//! systemd integration: sockets passed by socket activation, `sd_notify` state, and the watchdog.
//! Everything degrades to a no-op when the process was not started by systemd.

use std::collections::HashMap;
use std::net::{TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use libsystemd::activation::IsType;
use libsystemd::daemon::{self, NotifyState};
use nix::sys::socket::{getsockopt, sockopt, SockType};

/// Sockets received from systemd, by `FileDescriptorName=`.
#[derive(Default)]
pub struct ActivatedSockets {
    pub udp: HashMap<String, UdpSocket>,
    pub tcp: HashMap<String, TcpListener>,
}

/// Takes the sockets systemd passed (`LISTEN_FDS`/`LISTEN_FDNAMES`), if any, and clears the
/// environment so children do not inherit them.
pub fn activated_sockets() -> anyhow::Result<ActivatedSockets> {
    let mut sockets = ActivatedSockets::default();
    if std::env::var_os("LISTEN_FDS").is_none() {
        return Ok(sockets);
    }
    let descriptors = libsystemd::activation::receive_descriptors_with_names(true)
        .context("reading sockets passed by systemd (LISTEN_FDS)")?;
    for (fd, name) in descriptors {
        if !fd.is_inet() {
            bail!("socket {name:?} passed by systemd is not an IP socket");
        }
        // SAFETY: systemd passed us ownership of this descriptor, libsystemd checked that it is
        // open, and into_raw_fd gave up libsystemd's claim; nothing else in the process holds it.
        #[allow(unsafe_code)]
        let owned = unsafe { OwnedFd::from_raw_fd(fd.into_raw_fd()) };
        match getsockopt(&owned, sockopt::SockType).with_context(|| format!("socket {name:?}"))? {
            SockType::Datagram => {
                let socket = UdpSocket::from(owned);
                let name = datagram_name(name, &socket);
                sockets.udp.insert(name, socket);
            }
            SockType::Stream => {
                sockets.tcp.insert(name, TcpListener::from(owned));
            }
            other => bail!("socket {name:?} passed by systemd has unsupported type {other:?}"),
        }
    }
    Ok(sockets)
}

/// netboot-dhcp.socket listens on the DHCP port and on the PXE boot-server port (UDP 4011),
/// so both sockets carry its `FileDescriptorName=dhcp`: the one bound to port 4011 is filed
/// as `pxe` (the name a socket unit of its own would give it).
fn datagram_name(name: String, socket: &UdpSocket) -> String {
    let port = socket.local_addr().map(|a| a.port()).ok();
    if name == "dhcp" && port == Some(netboot::dhcp::BOOT_SERVER_PORT) {
        "pxe".to_string()
    } else {
        name
    }
}

fn send(states: &[NotifyState]) {
    // Not running under systemd (no NOTIFY_SOCKET) is fine; a failure to send is only logged.
    if let Err(e) = daemon::notify(false, states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

pub fn notify_ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status.to_string())]);
}

pub fn notify_status(status: &str) {
    send(&[NotifyState::Status(status.to_string())]);
}

pub fn notify_stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(status.to_string()),
    ]);
}

pub fn notify_watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// Half the `WatchdogSec=` interval, if systemd asked for keep-alives.
pub fn watchdog_interval() -> Option<Duration> {
    daemon::watchdog_enabled(false).map(|d| d / 2)
}

/// The file of the credential `name` systemd passed (`LoadCredential=`):
/// `$CREDENTIALS_DIRECTORY/<name>`, when the service has one and the file exists.
pub fn credential(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    credential_in(dir.as_deref(), name)
}

fn credential_in(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    let path = dir?.join(name);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dhcp_units_boot_server_socket_is_filed_as_pxe() {
        let any = UdpSocket::bind("127.0.0.1:0").expect("bind");
        assert_eq!(datagram_name("dhcp".into(), &any), "dhcp");
        assert_eq!(datagram_name("tftp".into(), &any), "tftp");
        // Port 4011 itself may be taken on a busy host: then only the other half is checked.
        if let Ok(pxe) = UdpSocket::bind(("127.0.0.1", netboot::dhcp::BOOT_SERVER_PORT)) {
            assert_eq!(datagram_name("dhcp".into(), &pxe), "pxe");
            assert_eq!(datagram_name("pxe".into(), &pxe), "pxe");
            assert_eq!(datagram_name("other".into(), &pxe), "other");
        }
    }

    #[test]
    fn credential_is_the_named_file_of_the_credentials_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(credential_in(None, "kubeconfig"), None);
        assert_eq!(credential_in(Some(dir.path()), "kubeconfig"), None);
        std::fs::write(dir.path().join("kubeconfig"), "apiVersion: v1\n").expect("write");
        assert_eq!(
            credential_in(Some(dir.path()), "kubeconfig"),
            Some(dir.path().join("kubeconfig"))
        );
    }
}
