//! `provisioner.yaml`: the agent's configuration, every key documented in
//! `provisioner.yaml.example`. Parsing is strict (unknown keys are errors) and every error names
//! the key it is about, because an operator reads it in `systemctl status` with no other context.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::Ipv4Net;
pub use netboot::dhcp::DhcpMode;
use serde::Deserialize;

use crate::validate;

mod limits;
pub use limits::Limits;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
}

/// Which iPXE build UEFI firmware gets over TFTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UefiLoader {
    /// Full iPXE with its own NIC drivers.
    #[serde(rename = "ipxe.efi")]
    IpxeEfi,
    /// iPXE on top of the firmware's network stack (SNP): starts faster, works on any NIC.
    #[serde(rename = "snponly.efi")]
    SnpOnly,
}

impl UefiLoader {
    pub fn file_name(self) -> &'static str {
        match self {
            UefiLoader::IpxeEfi => "ipxe.efi",
            UefiLoader::SnpOnly => "snponly.efi",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootFiles {
    pub ipxe_dir: PathBuf,
    #[serde(default = "default_uefi_loader")]
    pub uefi_loader: UefiLoader,
    #[serde(default = "default_bios_loader")]
    pub bios_loader: String,
    pub assets_dir: PathBuf,
}

fn default_uefi_loader() -> UefiLoader {
    UefiLoader::SnpOnly
}
fn default_bios_loader() -> String {
    "undionly.kpxe".to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Boot {
    pub kernel: String,
    pub initrd: String,
    #[serde(default)]
    pub cmdline: String,
    /// How an imaged machine's script boots its disk.
    #[serde(default)]
    pub local_boot: netboot::provisioning::LocalBoot,
}

/// `image:` as written: the [`Image`] and how long its tokens may be handed out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawImage {
    url: String,
    sha256: String,
    size: Option<u64>,
    /// Seconds after a machine's DHCP ACK during which its imaging script (with the token)
    /// may be fetched.
    token_window: Option<u64>,
}

/// The disk image stage2 writes (`image:`); without it netboot does not image machines.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Image {
    /// `http://` URL of the image (zstd, xz, gzip or raw), e.g. from `provisioner imageserver`.
    pub url: String,
    /// sha256 of the decompressed image, 64 hex digits.
    pub sha256: String,
    /// Decompressed size in bytes, when known.
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Listen {
    #[serde(default = "default_dhcp")]
    pub dhcp: SocketAddr,
    /// The PXE boot-server port (UDP 4011), bound in proxy mode only.
    #[serde(default = "default_pxe")]
    pub pxe: SocketAddr,
    #[serde(default = "default_tftp")]
    pub tftp: SocketAddr,
    #[serde(default = "default_http")]
    pub http: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            dhcp: default_dhcp(),
            pxe: default_pxe(),
            tftp: default_tftp(),
            http: default_http(),
        }
    }
}

fn default_dhcp() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 67))
}
fn default_pxe() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], netboot::dhcp::BOOT_SERVER_PORT))
}
fn default_tftp() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 69))
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 80))
}

/// `inventory:` as written: exactly one of the keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawInventory {
    directory: Option<PathBuf>,
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    kubernetes: bool,
}

/// Where the machines come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inventory {
    /// Folder of Machine manifests (the embedded inventory, used when no cluster is configured).
    Directory(PathBuf),
    /// Machine resources of a cluster: the kubeconfig given, or (`None`) the in-cluster or
    /// default configuration.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The file as written; [`Config::load`] validates it into a [`Config`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    interface: Option<String>,
    #[serde(default)]
    dhcp_mode: DhcpMode,
    #[serde(default = "default_true")]
    router_advertisements: bool,
    server_address: String,
    subnet: String,
    gateway: Option<String>,
    #[serde(default)]
    dns_servers: Vec<String>,
    #[serde(default = "default_lease")]
    lease_time: u32,
    #[serde(default)]
    dhcp_relays: Vec<String>,
    boot_files: BootFiles,
    boot: Boot,
    #[serde(default)]
    listen: Listen,
    inventory: RawInventory,
    #[serde(default)]
    cloud_init: crate::cloudinit::Hooks,
    laptop: Option<RawLaptop>,
    state_file: Option<PathBuf>,
    image: Option<RawImage>,
    #[serde(default)]
    cluster: RawCluster,
    #[serde(default)]
    limits: limits::RawLimits,
}

/// `cluster:` as written: what the agent does in the cluster (with a Kubernetes inventory).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCluster {
    #[serde(default = "default_true")]
    install_crd: bool,
    api_endpoint: Option<String>,
    #[serde(default = "default_token_ttl")]
    bootstrap_token_ttl: u64,
}

impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            install_crd: true,
            api_endpoint: None,
            bootstrap_token_ttl: default_token_ttl(),
        }
    }
}

fn default_token_ttl() -> u64 {
    crate::cluster::join::DEFAULT_TOKEN_TTL.as_secs()
}

/// What the agent does in the cluster (`cluster:`); unused with the folder inventory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Install or update the Machine CRD on start (server-side apply).
    pub install_crd: bool,
    /// `host:port` nodes join; `None`: from the cluster-info ConfigMap.
    pub api_endpoint: Option<String>,
    /// Lifetime of each kubeadm bootstrap token.
    pub bootstrap_token_ttl: Duration,
}

/// `laptop:` as written: the first machine, which runs `kubeadm init` and then netboot.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLaptop {
    hostname: String,
    mac_address: Option<String>,
    kubernetes_version: String,
    #[serde(default = "default_pod_subnet")]
    pod_subnet: String,
    #[serde(default = "default_service_subnet")]
    service_subnet: String,
    control_plane_endpoint: Option<String>,
    /// A CNI manifest inside the image, applied after `kubeadm init`; without it the image's
    /// own bridge pod network (`provisioner pod-network`) is used.
    cni_manifest: Option<PathBuf>,
    /// The operator's imageserver (`provisioner imageserver --bootstrap`) the laptop's own
    /// imageserver fetches the node image from (pull-through cache).
    image_upstream: Option<String>,
    /// Seconds the control plane may take to come up; default kubeadm's.
    control_plane_timeout: Option<u64>,
}

fn default_pod_subnet() -> String {
    "10.244.0.0/16".to_string()
}
fn default_service_subnet() -> String {
    "10.96.0.0/12".to_string()
}

/// The first machine (`laptop:`): what `provisioner cloud-config laptop` renders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Laptop {
    pub hostname: String,
    /// Matches the provisioning interface in the network-config (renamed to `interface`).
    pub mac_address: Option<netboot::MacAddr>,
    pub init: crate::cloudinit::InitSettings,
    /// `http://HOST:PORT/`: where the laptop's imageserver fetches what it does not have.
    pub image_upstream: Option<String>,
}

impl RawLaptop {
    fn validate(self, subnet: Ipv4Net) -> Result<Laptop, validate::Invalid> {
        use crate::cloudinit;
        use validate::invalid;
        validate::hostname("laptop.hostname", &self.hostname)?;
        let mac_address = match &self.mac_address {
            None => None,
            Some(mac) => Some(mac.parse::<netboot::MacAddr>().map_err(|_| {
                invalid("laptop.macAddress", format!("{mac:?} is not a MAC address"))
            })?),
        };
        validate::kubernetes_version("laptop.kubernetesVersion", &self.kubernetes_version)?;
        let cidr = |key: &'static str, value: &str| {
            value.parse::<ipnet::IpNet>().map_err(|_| {
                invalid(
                    key,
                    format!("{value:?} is not a CIDR such as 10.244.0.0/16"),
                )
            })
        };
        let pod_subnet = cidr("laptop.podSubnet", &self.pod_subnet)?;
        let service_subnet = cidr("laptop.serviceSubnet", &self.service_subnet)?;
        let provisioning = ipnet::IpNet::V4(subnet);
        for (key, net) in [
            ("laptop.podSubnet", pod_subnet),
            ("laptop.serviceSubnet", service_subnet),
        ] {
            if net.contains(&provisioning.network()) || provisioning.contains(&net.network()) {
                return Err(invalid(
                    key,
                    format!("{net} overlaps the provisioning subnet {subnet}"),
                ));
            }
        }
        if pod_subnet.contains(&service_subnet.network())
            || service_subnet.contains(&pod_subnet.network())
        {
            return Err(invalid(
                "laptop.serviceSubnet",
                format!("{service_subnet} overlaps podSubnet {pod_subnet}"),
            ));
        }
        if let Some(endpoint) = &self.control_plane_endpoint {
            validate::endpoint("laptop.controlPlaneEndpoint", endpoint)?;
        }
        if let Some(manifest) = &self.cni_manifest {
            if !manifest.is_absolute() || manifest.to_str().is_none() {
                return Err(invalid(
                    "laptop.cniManifest",
                    format!("{manifest:?} must be an absolute path inside the image"),
                ));
            }
        }
        // kubeadm's own 4 minutes at least; two hours covers any machine that works at all.
        if let Some(t) = self.control_plane_timeout {
            if !(240..=7200).contains(&t) {
                return Err(invalid(
                    "laptop.controlPlaneTimeout",
                    format!("{t} is not between 240 and 7200 seconds"),
                ));
            }
        }
        if let Some(url) = &self.image_upstream {
            validate::http_url("laptop.imageUpstream", url)?;
        }
        Ok(Laptop {
            hostname: self.hostname,
            mac_address,
            init: cloudinit::InitSettings {
                kubernetes_version: self.kubernetes_version,
                pod_subnet,
                service_subnet,
                control_plane_endpoint: self.control_plane_endpoint,
                cni_manifest: self.cni_manifest,
                control_plane_timeout: self
                    .control_plane_timeout
                    .map(std::time::Duration::from_secs),
            },
            image_upstream: self.image_upstream,
        })
    }
}

fn default_true() -> bool {
    true
}

fn default_lease() -> u32 {
    3600
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Provisioning interface: the DHCP socket is bound to it in stand-alone mode.
    pub interface: Option<String>,
    /// Answer IPv6 router solicitations on `interface` so iPXE does not wait for IPv6.
    pub router_advertisements: bool,
    /// Stand-alone DHCP server or ProxyDHCP beside the LAN's (`dhcpMode`). In proxy mode
    /// `gateway`, `dnsServers` and `leaseTime` are not used, and `subnet` only bounds the
    /// Machines' addresses.
    pub dhcp_mode: DhcpMode,
    pub server_address: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    pub lease_time: Duration,
    /// DHCP relay agents whose relayed packets are answered (`dhcpRelays`); empty: none.
    pub dhcp_relays: Vec<Ipv4Addr>,
    pub boot_files: BootFiles,
    pub boot: Boot,
    pub listen: Listen,
    pub inventory: Inventory,
    /// Machine status kept across restarts; `None`: `$STATE_DIRECTORY/state.yaml` (systemd's
    /// `StateDirectory=`), else `/var/lib/provisioner/state.yaml` if that directory exists.
    pub state_file: Option<PathBuf>,
    /// What stage2 writes; `None`: machines boot `boot` without imaging orders.
    pub image: Option<Image>,
    /// How long after a machine's DHCP ACK its imaging script (and token) may be fetched
    /// (`image.tokenWindow`).
    pub token_window: Duration,
    /// SSH keys and extra hooks of every rendered cloud-config (`cloudInit:`).
    pub cloud_init: crate::cloudinit::Hooks,
    /// The first machine's cloud-config settings; `None`: not described here.
    pub laptop: Option<Laptop>,
    pub cluster: ClusterSettings,
    /// HTTP connection and TFTP transfer limits (`limits:`).
    pub limits: Limits,
}

impl Config {
    /// What judging a Machine needs from here: the subnet, and the server's and gateway's
    /// addresses, which no machine may take.
    pub fn address_rules(&self) -> crate::machines::AddressRules {
        let mut reserved = vec![self.server_address];
        reserved.extend(self.gateway);
        crate::machines::AddressRules {
            subnet: self.subnet,
            reserved,
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        let ipv4 = |key: &'static str, value: &str| {
            value
                .parse::<Ipv4Addr>()
                .map_err(|_| invalid(key, format!("{value:?} is not an IPv4 address")))
        };

        let subnet: Ipv4Net = raw.subnet.parse().map_err(|_| {
            invalid(
                "subnet",
                format!("{:?} is not an IPv4 CIDR such as 10.0.0.0/24", raw.subnet),
            )
        })?;
        if subnet.addr() != subnet.network() {
            return Err(invalid(
                "subnet",
                format!(
                    "{subnet} has host bits set: write the network, {}/{}",
                    subnet.network(),
                    subnet.prefix_len()
                ),
            ));
        }
        if subnet.prefix_len() > 30 {
            return Err(invalid(
                "subnet",
                format!("{subnet} leaves no room for machines (use /30 or larger)"),
            ));
        }
        let server_address = ipv4("serverAddress", &raw.server_address)?;
        if !subnet.contains(&server_address) {
            return Err(invalid(
                "serverAddress",
                format!("{server_address} is outside subnet {subnet}"),
            ));
        }
        if server_address == subnet.network() || server_address == subnet.broadcast() {
            return Err(invalid(
                "serverAddress",
                format!("{server_address} is the network or broadcast address of {subnet}"),
            ));
        }
        let gateway = match raw.gateway.as_deref() {
            None => None,
            Some(g) => {
                let g = ipv4("gateway", g)?;
                if !subnet.contains(&g) {
                    return Err(invalid(
                        "gateway",
                        format!("{g} is outside subnet {subnet}"),
                    ));
                }
                Some(g)
            }
        };
        let dns_servers = raw
            .dns_servers
            .iter()
            .map(|d| ipv4("dnsServers", d))
            .collect::<Result<Vec<_>, _>>()?;
        let dhcp_relays = raw
            .dhcp_relays
            .iter()
            .map(|r| {
                let ip = ipv4("dhcpRelays", r)?;
                if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
                    return Err(invalid(
                        "dhcpRelays",
                        format!("{ip} cannot be a relay agent's address"),
                    ));
                }
                Ok(ip)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if raw.lease_time < 60 {
            return Err(invalid(
                "leaseTime",
                format!("{} seconds is too short (minimum 60)", raw.lease_time),
            ));
        }
        if let Some(iface) = &raw.interface {
            if iface.is_empty() || iface.len() > 15 || iface.contains(['/', ' ', '\0']) {
                return Err(invalid(
                    "interface",
                    format!("{iface:?} is not a valid interface name"),
                ));
            }
        }
        for (key, file) in [
            ("boot.kernel", &raw.boot.kernel),
            ("boot.initrd", &raw.boot.initrd),
        ] {
            if file.is_empty() || file.starts_with('/') || file.split('/').any(|c| c == "..") {
                return Err(invalid(
                    key,
                    format!("{file:?} must be a relative path under bootFiles.assetsDir"),
                ));
            }
        }
        if raw.boot.cmdline.contains(['\n', '\r']) {
            return Err(invalid("boot.cmdline", "must be a single line".to_string()));
        }
        let token_window = raw
            .image
            .as_ref()
            .and_then(|i| i.token_window)
            .unwrap_or(crate::provisioning::DEFAULT_TOKEN_WINDOW.as_secs());
        if !(10..=3600).contains(&token_window) {
            return Err(invalid(
                "image.tokenWindow",
                format!("{token_window} seconds: give between 10 and 3600"),
            ));
        }
        if let Some(image) = &raw.image {
            // stage2 refuses unknown or repeated provisioner.* parameters; netboot writes them.
            if let Some(word) = raw
                .boot
                .cmdline
                .split_whitespace()
                .find(|w| w.starts_with("provisioner."))
            {
                return Err(invalid(
                    "boot.cmdline",
                    format!("{word:?}: provisioner.* parameters are written by netboot when image is set"),
                ));
            }
            let url_ok = image
                .url
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
                && image.url.bytes().all(|b| b.is_ascii_graphic() && b != b'"')
                && !image.url.contains("${");
            if !url_ok {
                return Err(invalid(
                    "image.url",
                    format!(
                        "{:?} must be an http:// URL without blanks (stage2 has no TLS; the sha256 guards the image)",
                        image.url
                    ),
                ));
            }
            if image.sha256.len() != 64 || !image.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    "image.sha256",
                    format!("{:?} is not 64 hex digits", image.sha256),
                ));
            }
        }
        if let Err(e) = raw.cloud_init.validate() {
            return Err(match e {
                crate::cloudinit::RenderError::Invalid(e) => invalid(e.field, e.reason),
                other => invalid("cloudInit", other.to_string()),
            });
        }
        let laptop = match raw.laptop {
            None => None,
            Some(l) => Some(l.validate(subnet).map_err(|e| invalid(e.field, e.reason))?),
        };
        // 10 minutes: kubeadm join must fit; 7 days: what kubeadm allows for bootstrap tokens
        // is unbounded, but a join token living longer than a week is a forgotten credential.
        if !(600..=7 * 24 * 3600).contains(&raw.cluster.bootstrap_token_ttl) {
            return Err(invalid(
                "cluster.bootstrapTokenTtl",
                format!(
                    "{} seconds: give between 600 (10 minutes) and 604800 (7 days)",
                    raw.cluster.bootstrap_token_ttl
                ),
            ));
        }
        if let Some(endpoint) = &raw.cluster.api_endpoint {
            let ok = endpoint.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            }) && !endpoint.contains(['/', ' ']);
            if !ok {
                return Err(invalid(
                    "cluster.apiEndpoint",
                    format!("{endpoint:?} is not host:port (e.g. 10.77.0.1:6443)"),
                ));
            }
        }
        let cluster = ClusterSettings {
            install_crd: raw.cluster.install_crd,
            api_endpoint: raw.cluster.api_endpoint,
            bootstrap_token_ttl: Duration::from_secs(raw.cluster.bootstrap_token_ttl),
        };
        let inventory = match (
            raw.inventory.directory,
            raw.inventory.kubeconfig,
            raw.inventory.kubernetes,
        ) {
            (Some(dir), None, false) => Inventory::Directory(dir),
            (None, kubeconfig @ Some(_), _) => Inventory::Kubernetes { kubeconfig },
            (None, None, true) => Inventory::Kubernetes { kubeconfig: None },
            _ => {
                return Err(invalid(
                    "inventory",
                    "give exactly one of directory, kubeconfig or kubernetes: true".to_string(),
                ))
            }
        };
        let limits = raw
            .limits
            .validate()
            .map_err(|(key, message)| invalid(key, message))?;
        Ok(Config {
            interface: raw.interface,
            router_advertisements: raw.router_advertisements,
            dhcp_mode: raw.dhcp_mode,
            server_address,
            subnet,
            gateway,
            dns_servers,
            lease_time: Duration::from_secs(u64::from(raw.lease_time)),
            dhcp_relays,
            boot_files: raw.boot_files,
            boot: raw.boot,
            listen: raw.listen,
            inventory,
            state_file: raw.state_file,
            image: raw.image.map(|i| Image {
                url: i.url,
                sha256: i.sha256,
                size: i.size,
            }),
            token_window: Duration::from_secs(token_window),
            cluster,
            cloud_init: raw.cloud_init,
            laptop,
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
interface: br0
serverAddress: 10.77.0.1
subnet: 10.77.0.0/24
gateway: 10.77.0.1
dnsServers: [10.77.0.1, 10.77.0.2]
leaseTime: 600
bootFiles:
  ipxeDir: /usr/lib/ipxe
  uefiLoader: ipxe.efi
  assetsDir: /srv/assets
boot:
  kernel: vmlinuz
  initrd: initrd.img
  cmdline: console=ttyS0
listen:
  http: 0.0.0.0:8080
inventory:
  directory: /etc/provisioner/machines
";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("provisioner.yaml"), text)
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_a_full_config() {
        let config = parse(GOOD).expect("valid config");
        assert_eq!(config.server_address, Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(config.subnet.prefix_len(), 24);
        assert_eq!(config.dns_servers.len(), 2);
        assert_eq!(config.lease_time, Duration::from_secs(600));
        assert_eq!(config.boot_files.uefi_loader, UefiLoader::IpxeEfi);
        assert_eq!(config.boot_files.bios_loader, "undionly.kpxe");
        assert_eq!(config.listen.http.port(), 8080);
        assert_eq!(
            config.listen.dhcp.port(),
            67,
            "defaults fill what is not given"
        );
    }

    #[test]
    fn relays_and_the_token_window() {
        let config = parse(GOOD).expect("valid");
        assert!(config.dhcp_relays.is_empty(), "no relay unless configured");
        assert_eq!(
            config.token_window,
            crate::provisioning::DEFAULT_TOKEN_WINDOW
        );
        let image = "image: {url: \"http://10.77.0.1:8080/n.raw\", sha256: \"".to_string()
            + &"a".repeat(64)
            + "\"";
        let set = parse(&format!(
            "{GOOD}dhcpRelays: [10.77.1.1, 10.77.2.1]\n{image}, tokenWindow: 120}}\n"
        ))
        .expect("valid");
        assert_eq!(
            set.dhcp_relays,
            [Ipv4Addr::new(10, 77, 1, 1), Ipv4Addr::new(10, 77, 2, 1)]
        );
        assert_eq!(set.token_window, Duration::from_secs(120));
        assert!(set.image.is_some());
        for (bad, key) in [
            ("dhcpRelays: [nope]\n".to_string(), "dhcpRelays"),
            ("dhcpRelays: [0.0.0.0]\n".to_string(), "dhcpRelays"),
            (format!("{image}, tokenWindow: 5}}\n"), "image.tokenWindow"),
            (
                format!("{image}, tokenWindow: 7200}}\n"),
                "image.tokenWindow",
            ),
        ] {
            let e = error(&format!("{GOOD}{bad}"));
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn dhcp_mode_and_the_boot_server_port() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.dhcp_mode, DhcpMode::Standalone, "the default");
        assert_eq!(config.listen.pxe, SocketAddr::from(([0, 0, 0, 0], 4011)));
        let proxy = parse(&format!("{GOOD}dhcpMode: proxy\n").replace(
            "  http: 0.0.0.0:8080",
            "  http: 0.0.0.0:8080\n  pxe: 10.77.0.1:4011",
        ))
        .expect("valid");
        assert_eq!(proxy.dhcp_mode, DhcpMode::Proxy);
        assert_eq!(proxy.listen.pxe, SocketAddr::from(([10, 77, 0, 1], 4011)));
        let standalone = parse(&format!("{GOOD}dhcpMode: standalone\n")).expect("valid");
        assert_eq!(standalone.dhcp_mode, DhcpMode::Standalone);
        let bad = error(&format!("{GOOD}dhcpMode: relay\n"));
        assert!(bad.contains("relay") && bad.contains("proxy"), "{bad}");
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../provisioner.yaml.example");
        Config::load(&path).expect("provisioner.yaml.example must parse");
    }

    #[test]
    fn inventory_is_a_folder_or_a_cluster() {
        let folder = parse(GOOD).expect("valid");
        assert_eq!(
            folder.inventory,
            Inventory::Directory(PathBuf::from("/etc/provisioner/machines"))
        );
        let kubeconfig = parse(&GOOD.replace(
            "  directory: /etc/provisioner/machines",
            "  kubeconfig: /etc/kubernetes/admin.conf",
        ))
        .expect("valid");
        assert_eq!(
            kubeconfig.inventory,
            Inventory::Kubernetes {
                kubeconfig: Some(PathBuf::from("/etc/kubernetes/admin.conf"))
            }
        );
        let in_cluster = parse(&GOOD.replace(
            "  directory: /etc/provisioner/machines",
            "  kubernetes: true",
        ))
        .expect("valid");
        assert_eq!(
            in_cluster.inventory,
            Inventory::Kubernetes { kubeconfig: None }
        );
        let both = error(
            &GOOD
                .replace(
                    "  directory: /etc/provisioner/machines",
                    "  directory: /m\n  kubernetes: true",
                )
                .replace("\\n", "\n"),
        );
        assert!(both.contains("inventory: give exactly one"), "{both}");
        let neither = error(&GOOD.replace(
            "  directory: /etc/provisioner/machines",
            "  kubernetes: false",
        ));
        assert!(neither.contains("inventory"), "{neither}");
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = error(&GOOD.replace("leaseTime: 600", "leaseTim: 600"));
        assert!(unknown.contains("leaseTim"), "{unknown}");
        let nested = error(&GOOD.replace("  cmdline:", "  cmdlin:"));
        assert!(nested.contains("cmdlin"), "{nested}");
        let cidr = error(&GOOD.replace("10.77.0.0/24", "10.77.0/24"));
        assert!(
            cidr.contains("subnet") && cidr.contains("10.77.0/24"),
            "{cidr}"
        );
        let outside = error(&GOOD.replace("serverAddress: 10.77.0.1", "serverAddress: 10.78.0.1"));
        assert!(
            outside.contains("serverAddress") && outside.contains("outside"),
            "{outside}"
        );
        let gateway = error(&GOOD.replace("gateway: 10.77.0.1", "gateway: 192.168.1.1"));
        assert!(
            gateway.starts_with("provisioner.yaml: gateway:"),
            "{gateway}"
        );
        let dns = error(&GOOD.replace("10.77.0.2]", "nameserver]"));
        assert!(dns.contains("dnsServers"), "{dns}");
        let loader = error(&GOOD.replace("uefiLoader: ipxe.efi", "uefiLoader: grub.efi"));
        assert!(loader.contains("grub.efi"), "{loader}");
        let kernel = error(&GOOD.replace("kernel: vmlinuz", "kernel: ../vmlinuz"));
        assert!(kernel.contains("boot.kernel"), "{kernel}");
        let host_bits = error(&GOOD.replace("subnet: 10.77.0.0/24", "subnet: 10.77.0.5/24"));
        assert_eq!(
            host_bits,
            "provisioner.yaml: subnet: 10.77.0.5/24 has host bits set: write the network, 10.77.0.0/24"
        );
        let missing = error(&GOOD.replace("subnet: 10.77.0.0/24\n", ""));
        assert!(missing.contains("subnet"), "{missing}");
    }

    #[test]
    fn limits_default_and_are_checked() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.limits.http.max_connections_per_peer, 32);
        assert_eq!(config.limits.tftp.max_timeout, Duration::from_secs(10));
        let some = parse(&format!(
            "{GOOD}limits:\n  http:\n    maxConnectionsPerPeer: 4\n    writeTimeout: 5\n  tftp:\n    maxTransfersPerPeer: 2\n"
        ))
        .expect("valid");
        assert_eq!(some.limits.http.max_connections_per_peer, 4);
        assert_eq!(some.limits.http.write_timeout, Duration::from_secs(5));
        assert_eq!(some.limits.http.max_connections, 512, "the rest default");
        assert_eq!(some.limits.tftp.max_transfers_per_peer, 2);
        for (yaml, key) in [
            ("http:\n    headerTimeout: 0", "limits.http.headerTimeout"),
            (
                "http:\n    maxConnectionsPerPeer: 600",
                "limits.http.maxConnectionsPerPeer",
            ),
            ("tftp:\n    maxTimeout: 256", "limits.tftp.maxTimeout"),
            ("tftp:\n    memoryBudget: 1000", "limits.tftp.memoryBudget"),
            (
                "tftp:\n    maxTransfersPerPeer: 65",
                "limits.tftp.maxTransfersPerPeer",
            ),
            ("tftp:\n    windowSize: 1", "windowSize"),
        ] {
            let e = error(&format!("{GOOD}limits:\n  {yaml}\n"));
            assert!(e.contains(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn cloud_init_and_laptop() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.cloud_init, crate::cloudinit::Hooks::default());
        assert_eq!(config.laptop, None);
        let with = format!(
            "{GOOD}cloudInit:\n  sshAuthorizedKeys: ['ssh-ed25519 AAAA a@b']\n  extraRunCmd: [modprobe br_netfilter]\n  extraWriteFiles:\n    - {{path: /etc/x, content: y}}\nlaptop:\n  hostname: laptop\n  macAddress: 52:54:00:00:00:01\n  kubernetesVersion: v1.30.2\n"
        );
        let config = parse(&with).expect("valid");
        assert_eq!(
            config.cloud_init.ssh_authorized_keys,
            ["ssh-ed25519 AAAA a@b"]
        );
        assert_eq!(config.cloud_init.extra_write_files[0].permissions, "0644");
        let laptop = config.laptop.expect("laptop");
        assert_eq!(laptop.init.pod_subnet.to_string(), "10.244.0.0/16");
        assert_eq!(laptop.init.service_subnet.to_string(), "10.96.0.0/12");
        let cases = [
            (
                "ssh-ed25519 AAAA a@b",
                "AAAA a@b",
                "cloudInit.sshAuthorizedKeys",
            ),
            ("[modprobe br_netfilter]", "['']", "cloudInit.extraRunCmd"),
            (
                "path: /etc/x",
                "path: etc/x",
                "cloudInit.extraWriteFiles.path",
            ),
            ("hostname: laptop", "hostname: lap_top", "laptop.hostname"),
            (
                "macAddress: 52:54:00:00:00:01",
                "macAddress: 52:54",
                "laptop.macAddress",
            ),
            ("v1.30.2", "stable", "laptop.kubernetesVersion"),
            (
                "v1.30.2\n",
                "v1.30.2\n  podSubnet: 10.77.0.0/16\n",
                "laptop.podSubnet",
            ),
            (
                "v1.30.2\n",
                "v1.30.2\n  serviceSubnet: 10.244.1.0/24\n",
                "laptop.serviceSubnet",
            ),
            (
                "v1.30.2\n",
                "v1.30.2\n  controlPlaneEndpoint: api\n",
                "laptop.controlPlaneEndpoint",
            ),
            (
                "v1.30.2\n",
                "v1.30.2\n  cniManifest: cni.yaml\n",
                "laptop.cniManifest",
            ),
            ("v1.30.2\n", "v1.30.2\n  podCidr: 10.1.0.0/16\n", "podCidr"),
        ];
        for (from, to, key) in cases {
            let e = error(&with.replace(from, to));
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn cluster_settings() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(
            config.cluster,
            ClusterSettings {
                install_crd: true,
                api_endpoint: None,
                bootstrap_token_ttl: Duration::from_secs(7200),
            }
        );
        let set = parse(&format!(
            "{GOOD}cluster:\n  installCrd: false\n  apiEndpoint: 10.77.0.1:6443\n  bootstrapTokenTtl: 3600\n"
        ))
        .expect("valid");
        assert!(!set.cluster.install_crd);
        assert_eq!(set.cluster.api_endpoint.as_deref(), Some("10.77.0.1:6443"));
        assert_eq!(set.cluster.bootstrap_token_ttl, Duration::from_secs(3600));
        let short = error(&format!("{GOOD}cluster:\n  bootstrapTokenTtl: 60\n"));
        assert!(short.contains("cluster.bootstrapTokenTtl"), "{short}");
        let url = error(&format!(
            "{GOOD}cluster:\n  apiEndpoint: https://10.77.0.1:6443\n"
        ));
        assert!(url.contains("cluster.apiEndpoint"), "{url}");
        let unknown = error(&format!("{GOOD}cluster:\n  installCRD: true\n"));
        assert!(unknown.contains("installCRD"), "{unknown}");
    }

    const IMAGE: &str = "image:\n  url: http://10.77.0.1:8080/node.raw.zst\n  sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n";

    #[test]
    fn image_and_local_boot() {
        let config = parse(GOOD).expect("valid");
        assert_eq!(config.image, None);
        assert_eq!(
            config.boot.local_boot,
            netboot::provisioning::LocalBoot::Auto
        );
        let with_image = format!("{GOOD}{IMAGE}  size: 4096\n").replace(
            "  cmdline: console=ttyS0",
            "  cmdline: console=ttyS0\n  localBoot: exit",
        );
        let config = parse(&with_image).expect("valid");
        let image = config.image.expect("image");
        assert_eq!(image.url, "http://10.77.0.1:8080/node.raw.zst");
        assert_eq!(image.size, Some(4096));
        assert_eq!(
            config.boot.local_boot,
            netboot::provisioning::LocalBoot::Exit
        );

        let with_image = format!("{GOOD}{IMAGE}");
        let https = error(&with_image.replace("url: http://", "url: https://"));
        assert!(https.contains("image.url"), "{https}");
        let sha = error(&with_image.replace("sha256: 9f86", "sha256: zz86"));
        assert!(sha.contains("image.sha256"), "{sha}");
        let local = error(&GOOD.replace(
            "  cmdline: console=ttyS0",
            "  cmdline: x\n  localBoot: grub",
        ));
        assert!(local.contains("grub"), "{local}");
        let ours =
            error(&with_image.replace("cmdline: console=ttyS0", "cmdline: provisioner.url=x"));
        assert!(ours.contains("boot.cmdline"), "{ours}");
    }
}
