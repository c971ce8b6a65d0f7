//! The machines netboot serves and how servers look them up.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An Ethernet hardware address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex octets separated by ':' or '-'")]
pub struct InvalidMac(pub String);

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidMac(s.to_string());
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut octets = [0u8; 6];
        for (octet, part) in octets.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(octets))
    }
}

impl MacAddr {
    /// Takes the first six bytes of a DHCP `chaddr`; `None` if it is shorter.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let octets: [u8; 6] = bytes.get(..6)?.try_into().ok()?;
        Some(MacAddr(octets))
    }

    /// Lower-case, hyphen-separated form used in URLs (`/ipxe/52-54-00-12-34-56`).
    pub fn to_hyphenated(&self) -> String {
        self.to_string().replace(':', "-")
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One machine that netboot will answer for: a reservation plus its identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// `metadata.name` of the Machine resource.
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// Host name handed out in DHCP option 12; defaults to `name` when unset.
    pub hostname: Option<String>,
}

impl Machine {
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.name)
    }
}

/// What happened to a machine on the wire, reported so the agent can track phases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEvent {
    DhcpOffered,
    DhcpAcked,
    DhcpReleased,
    DhcpDeclined,
    /// Proxy mode: a ProxyDHCP answer gave the machine's firmware (PXE or UEFI HTTP Boot) its
    /// boot file. Its address comes from the LAN's DHCP server.
    ProxyOffered,
    /// Proxy mode: a ProxyDHCP answer gave the machine's iPXE the URL of its script. Opens the
    /// window for its imaging script as a DHCP ACK does in stand-alone mode: iPXE asks for the
    /// script right after this exchange, from the address the LAN's DHCP server gave it.
    ProxyScriptOffered,
    /// A boot file was sent completely over TFTP or HTTP.
    FileServed {
        path: String,
    },
    IpxeScriptServed,
}

/// How the servers find machines. Implemented by the agent's inventory (a YAML folder or
/// Kubernetes) and by simple maps in tests. Lookups must be cheap: they run per packet.
pub trait MachineLookup: Send + Sync + 'static {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine>;

    /// Called after a server did something for a known machine. Default: nothing.
    fn observe(&self, _machine: &Machine, _event: BootEvent) {}
}

impl MachineLookup for std::collections::HashMap<MacAddr, Machine> {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        self.get(mac).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_mac() {
        let mac: MacAddr = "52:54:00:AB:cd:01".parse().expect("valid");
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:01");
        assert_eq!(mac.to_hyphenated(), "52-54-00-ab-cd-01");
        assert_eq!("52-54-00-ab-cd-01".parse::<MacAddr>(), Ok(mac));
    }

    #[test]
    fn rejects_bad_macs() {
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "5:54:00:ab:cd:01",
            "zz:54:00:ab:cd:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} accepted");
        }
    }
}
