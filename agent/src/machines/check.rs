//! The one validation of a Machine, for both sources: what the CRD's schema checks (so that the
//! folder takes what the API server takes) and what needs the provisioning subnet.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netboot::provisioning::DiskHints;
use netboot::{MacAddr, Machine};

use super::AddressRules;
use crate::cluster::crd::MachineSpec;
use crate::validate::is_hostname;

/// Why a Machine's name or spec cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The API server's rule for object names (a lower-case RFC 1123 name), with labels short
    /// enough for a host name, since the name is the default host name.
    #[error("metadata.name {0:?} is not a valid DNS name (lower-case RFC 1123)")]
    Name(String),
    /// `cluster::crd::MAC_PATTERN`.
    #[error("spec.macAddress: {0:?} is not six colon-separated pairs of hex digits")]
    MacFormat(String),
    #[error("spec.macAddress: {0} is a multicast address")]
    Multicast(MacAddr),
    /// The schema's `format: ipv4`.
    #[error("spec.ipAddress: {0:?} is not an IPv4 address")]
    IpFormat(String),
    #[error("spec.ipAddress: {ip} is not a host address of subnet {subnet}")]
    OutsideSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error("spec.ipAddress: {0} belongs to the server or gateway")]
    Reserved(Ipv4Addr),
    /// `cluster::crd::HOSTNAME_PATTERN`, 253 characters at most.
    #[error("spec.hostname {0:?} is not a valid host name")]
    Hostname(String),
    /// The schema's `format: uri` (RFC 3986, with a scheme) and
    /// `cluster::crd::IMAGE_URL_PATTERN`.
    #[error("spec.image.url: {0:?} is not an http:// URL without blanks, '\"' or '$' (stage2 has no TLS; the sha256 guards the image)")]
    ImageUrl(String),
    /// `cluster::crd::SHA256_PATTERN`.
    #[error("spec.image.sha256: {0:?} is not 64 lower-case hex digits")]
    ImageSha256(String),
    #[error("spec.image.size must be at least 1")]
    ImageSize,
    /// `cluster::crd::DEVICE_PATH_PATTERN`.
    #[error("spec.rootDevice.path: {0:?} is not a path under /dev/ without blanks, '\"' or '$'")]
    DevicePath(String),
    /// `cluster::crd::DISK_WORDS_PATTERN`.
    #[error("spec.rootDevice.{field}: {value:?} must be printable ASCII words separated by single blanks, without '\"' or '$', no word starting with '#', '&', ';' or '|'")]
    DiskWords { field: &'static str, value: String },
    #[error("spec.rootDevice.minSizeBytes must be at least 1")]
    MinSizeBytes,
}

/// `cluster::crd::IMAGE_URL_PATTERN`: `http://`, then no `/` first, and nothing blank, `"` or
/// `$` anywhere.
fn image_url_format(url: &str) -> bool {
    let bad = |c: char| c.is_whitespace() || c == '"' || c == '$';
    url.strip_prefix("http://")
        .is_some_and(|rest| rest.chars().next().is_some_and(|c| c != '/') && !rest.chars().any(bad))
}

/// `cluster::crd::DEVICE_PATH_PATTERN`: `/dev/` and `[!#%-~]+`.
fn device_path_format(path: &str) -> bool {
    path.strip_prefix("/dev/")
        .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(path_byte))
}

/// `[!#%-~]`: printable ASCII but blank, `"` and `$`.
fn path_byte(b: u8) -> bool {
    b == b'!' || b == b'#' || (b'%'..=b'~').contains(&b)
}

/// `cluster::crd::DISK_WORDS_PATTERN`: words of [`path_byte`]s separated by single blanks,
/// none starting with `#`, `&`, `;` or `|`.
fn disk_words_format(text: &str) -> bool {
    text.split(' ').all(|word| {
        word.bytes().all(path_byte)
            && word
                .bytes()
                .next()
                .is_some_and(|b| !matches!(b, b'#' | b'&' | b';' | b'|'))
    })
}

/// `^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$`, the CRD's MAC pattern (netboot's parser also takes
/// hyphens, the API server does not).
fn mac_format(mac: &str) -> bool {
    mac.len() == 17
        && mac.bytes().enumerate().all(|(i, b)| {
            if i % 3 == 2 {
                b == b':'
            } else {
                b.is_ascii_hexdigit()
            }
        })
}

/// What a valid Machine asks of its imaging beyond the configuration: its own image, and the
/// hints stage2 picks its disk by (`spec.image`, `spec.rootDevice`; [`check`] has checked both).
pub fn imaging(spec: &MachineSpec) -> ImagingSpec {
    ImagingSpec {
        image: spec.image.as_ref().map(|i| crate::config::Image {
            url: i.url.clone(),
            sha256: i.sha256.clone(),
            size: i.size,
        }),
        disk: spec
            .root_device
            .as_ref()
            .map(|h| DiskHints {
                path: h.path.clone(),
                serial: h.serial.clone(),
                model: h.model.clone(),
                min_size: h.min_size_bytes,
            })
            .unwrap_or_default(),
    }
}

/// A Machine's own imaging orders: `spec.image` (instead of the configured image) and
/// `spec.rootDevice`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImagingSpec {
    pub image: Option<crate::config::Image>,
    pub disk: DiskHints,
}

impl ImagingSpec {
    pub fn is_empty(&self) -> bool {
        self.image.is_none() && self.disk == DiskHints::default()
    }
}

/// Checks the Machine called `name`: what the CRD's schema checks, then the name, a unicast
/// MAC, and a host address of the subnet that is not the server's or the gateway's. The
/// machine netboot serves, or why not.
pub fn check(name: &str, spec: &MachineSpec, rules: &AddressRules) -> Result<Machine, Invalid> {
    if !is_hostname(name) || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(Invalid::Name(name.to_string()));
    }
    if !mac_format(&spec.mac_address) {
        return Err(Invalid::MacFormat(spec.mac_address.clone()));
    }
    let mac: MacAddr = spec
        .mac_address
        .parse()
        .map_err(|_| Invalid::MacFormat(spec.mac_address.clone()))?;
    if mac.0[0] & 1 == 1 {
        return Err(Invalid::Multicast(mac));
    }
    let ip: Ipv4Addr = spec
        .ip_address
        .parse()
        .map_err(|_| Invalid::IpFormat(spec.ip_address.clone()))?;
    let subnet = rules.subnet;
    if !subnet.contains(&ip) || ip == subnet.network() || ip == subnet.broadcast() {
        return Err(Invalid::OutsideSubnet { ip, subnet });
    }
    if rules.reserved.contains(&ip) {
        return Err(Invalid::Reserved(ip));
    }
    if let Some(hostname) = &spec.hostname {
        if !is_hostname(hostname) {
            return Err(Invalid::Hostname(hostname.clone()));
        }
    }
    if let Some(image) = &spec.image {
        if fluent_uri::Uri::parse(image.url.as_str()).is_err() || !image_url_format(&image.url) {
            return Err(Invalid::ImageUrl(image.url.clone()));
        }
        let sha256_ok = image.sha256.len() == 64
            && image
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !sha256_ok {
            return Err(Invalid::ImageSha256(image.sha256.clone()));
        }
        if image.size == Some(0) {
            return Err(Invalid::ImageSize);
        }
    }
    if let Some(hints) = &spec.root_device {
        if let Some(path) = hints.path.as_ref().filter(|p| !device_path_format(p)) {
            return Err(Invalid::DevicePath(path.clone()));
        }
        for (field, value) in [("serial", &hints.serial), ("model", &hints.model)] {
            if let Some(value) = value.as_ref().filter(|v| !disk_words_format(v)) {
                return Err(Invalid::DiskWords {
                    field,
                    value: value.clone(),
                });
            }
        }
        if hints.min_size_bytes == Some(0) {
            return Err(Invalid::MinSizeBytes);
        }
    }
    Ok(Machine {
        name: name.to_string(),
        mac,
        ip,
        hostname: spec.hostname.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> AddressRules {
        AddressRules {
            subnet: "10.77.0.0/24".parse().expect("cidr"),
            reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
        }
    }

    fn spec(mac: &str, ip: &str) -> MachineSpec {
        MachineSpec {
            mac_address: mac.into(),
            ip_address: ip.into(),
            hostname: None,
            image: None,
            root_device: None,
            reimage: None,
        }
    }

    #[test]
    fn every_rule_has_its_error() {
        let ok = spec("52:54:00:AA:bb:02", "10.77.0.2");
        let m = check("node2", &ok, &rules()).expect("valid");
        assert_eq!((m.name.as_str(), m.mac.0[3]), ("node2", 0xaa));
        let cases: [(&str, MachineSpec, Invalid); 6] = [
            ("Node2", ok.clone(), Invalid::Name("Node2".into())),
            (
                "n",
                spec("52-54-00-00-00-02", "10.77.0.2"),
                Invalid::MacFormat("52-54-00-00-00-02".into()),
            ),
            (
                "n",
                spec("01:00:5e:00:00:01", "10.77.0.2"),
                Invalid::Multicast(MacAddr([1, 0, 0x5e, 0, 0, 1])),
            ),
            (
                "n",
                spec("52:54:00:00:00:02", "10.77.0.256"),
                Invalid::IpFormat("10.77.0.256".into()),
            ),
            (
                "n",
                spec("52:54:00:00:00:02", "10.77.0.255"),
                Invalid::OutsideSubnet {
                    ip: Ipv4Addr::new(10, 77, 0, 255),
                    subnet: rules().subnet,
                },
            ),
            (
                "n",
                spec("52:54:00:00:00:02", "10.77.0.1"),
                Invalid::Reserved(Ipv4Addr::new(10, 77, 0, 1)),
            ),
        ];
        for (name, spec, expected) in cases {
            assert_eq!(check(name, &spec, &rules()), Err(expected));
        }
    }
}
