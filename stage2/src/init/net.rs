//! Network links: which exist (sysfs), bringing them up and configuring a lease (rtnetlink).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::dhcp::Lease;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("no interface named {0}")]
    NoSuchInterface(String),
    #[error("async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// An Ethernet-like interface found in `/sys/class/net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: [u8; 6],
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Interfaces with a 6-byte hardware address (so not `lo`, tunnels…), sorted by name.
pub fn links(sys_class_net: &Path) -> Vec<Link> {
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut links: Vec<Link> = dir
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let address = std::fs::read_to_string(entry.path().join("address")).ok()?;
            let mac = parse_mac(&address).filter(|m| m.iter().any(|b| *b != 0))?;
            Some(Link { name, mac })
        })
        .collect();
    links.sort_by(|a, b| a.name.cmp(&b.name));
    links
}

/// Whether the link reports carrier (`/sys/class/net/NAME/carrier` is `1`; reading it fails
/// while the link is down).
pub fn has_carrier(sys_class_net: &Path, name: &str) -> bool {
    std::fs::read_to_string(sys_class_net.join(name).join("carrier"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false)
}

/// Waits up to `timeout` until at least one of `names` has carrier; returns those that do.
pub fn wait_for_carrier(sys_class_net: &Path, names: &[String], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let up: Vec<String> = names
            .iter()
            .filter(|n| has_carrier(sys_class_net, n))
            .cloned()
            .collect();
        if !up.is_empty() || Instant::now() >= deadline {
            return up;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A netlink connection driven by a small single-threaded runtime (rtnetlink is async).
pub struct Netlink {
    runtime: tokio::runtime::Runtime,
    handle: rtnetlink::Handle,
}

impl Netlink {
    pub fn open() -> Result<Self, NetError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(NetError::Runtime)?;
        let handle = runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(NetError::Socket)?;
            tokio::spawn(connection);
            Ok::<_, NetError>(handle)
        })?;
        Ok(Netlink { runtime, handle })
    }

    fn index(name: &str) -> Result<u32, NetError> {
        nix::net::if_::if_nametoindex(name).map_err(|_| NetError::NoSuchInterface(name.into()))
    }

    pub fn set_up(&self, name: &str) -> Result<(), NetError> {
        let index = Self::index(name)?;
        self.runtime.block_on(
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute(),
        )?;
        Ok(())
    }

    /// Adds the lease's address to `name` and, if the lease names a router, a default route.
    pub fn configure(&self, name: &str, lease: &Lease) -> Result<(), NetError> {
        let index = Self::index(name)?;
        self.runtime.block_on(async {
            self.handle
                .address()
                .add(index, IpAddr::V4(lease.address), lease.prefix_len)
                .execute()
                .await?;
            if let Some(router) = lease.router {
                let route = RouteMessageBuilder::<Ipv4Addr>::new()
                    .gateway(router)
                    .output_interface(index)
                    .build();
                self.handle.route().add(route).execute().await?;
            }
            Ok::<_, NetError>(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56\n"),
            Some([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
        assert_eq!(parse_mac("zz:54:00:12:34:56"), None);
    }

    #[test]
    fn links_skip_interfaces_without_a_mac() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (name, address) in [
            ("lo", "00:00:00:00:00:00"),
            ("eth1", "52:54:00:00:00:02"),
            ("eth0", "52:54:00:00:00:01"),
            ("sit0", "00:00:00:00"),
        ] {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(path.join("address"), format!("{address}\n"))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        std::fs::write(dir.path().join("eth1/carrier"), "1\n").unwrap_or_else(|e| panic!("{e}"));
        let found: Vec<String> = links(dir.path()).into_iter().map(|l| l.name).collect();
        assert_eq!(found, vec!["eth0".to_string(), "eth1".to_string()]);
        let names = vec!["eth0".to_string(), "eth1".to_string()];
        assert_eq!(
            wait_for_carrier(dir.path(), &names, Duration::from_millis(50)),
            vec!["eth1".to_string()]
        );
    }
}
