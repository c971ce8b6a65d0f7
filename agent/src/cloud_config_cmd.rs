//! `provisioner cloud-config`: renders the cloud-init documents netboot serves (node) or the
//! operator gives the first machine (laptop), for inspection and for the laptop's NoCloud seed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};

use crate::cloudinit::{self, LaptopNetwork, LaptopUserData, NodeUserData};
use crate::config::{Config, Inventory};

/// The NoCloud file to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NoCloudFile {
    UserData,
    MetaData,
    NetworkConfig,
}

/// A node's NoCloud files: no network-config, nodes get their address by DHCP from netboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeFile {
    UserData,
    MetaData,
}

#[derive(Debug, Subcommand)]
pub enum CloudConfig {
    /// A node's user-data (or meta-data) as netboot serves it once the node is imaged. The
    /// report token is a placeholder: the real one is minted per provisioning.
    Node {
        /// Configuration file (see provisioner.yaml.example); its inventory must be a folder.
        #[arg(long, short, default_value = "/etc/provisioner/provisioner.yaml")]
        config: PathBuf,
        /// The Machine's name in the inventory folder.
        #[arg(long)]
        machine: String,
        /// Add example kubeadm join parameters (a JoinConfiguration with a made-up token and
        /// CA hash), to see what a node of the cluster inventory gets.
        #[arg(long)]
        example_join: bool,
        /// The NoCloud file (nodes have no network-config: netboot's DHCP gives the address).
        #[arg(long, value_enum, default_value = "user-data")]
        file: NodeFile,
    },
    /// The first machine's NoCloud seed (`laptop:` of the configuration): user-data with
    /// `kubeadm init`, meta-data, or network-config.
    Laptop {
        /// Configuration file (see provisioner.yaml.example) with a `laptop:` section.
        #[arg(long, short, default_value = "/etc/provisioner/provisioner.yaml")]
        config: PathBuf,
        /// The NoCloud file.
        #[arg(long, value_enum, default_value = "user-data")]
        file: NoCloudFile,
    },
}

/// Placeholder for the per-provisioning token in inspected documents (valid token alphabet).
const EXAMPLE_TOKEN: &str = "example-provisioning-token";

pub fn render(command: CloudConfig) -> anyhow::Result<String> {
    match command {
        CloudConfig::Node {
            config,
            machine,
            example_join,
            file,
        } => node(&config, &machine, example_join, file),
        CloudConfig::Laptop { config, file } => laptop(&config, file),
    }
}

fn base_url(config: &Config) -> String {
    match config.listen.http.port() {
        80 => format!("http://{}", config.server_address),
        port => format!("http://{}:{port}", config.server_address),
    }
}

fn node(path: &Path, name: &str, example_join: bool, file: NodeFile) -> anyhow::Result<String> {
    let config = Config::load(path)?;
    let Inventory::Directory(dir) = &config.inventory else {
        bail!("inventory is a cluster: only a folder inventory can be rendered offline");
    };
    let snapshot = crate::machines::folder::load_dir(dir, &config.address_rules())
        .with_context(|| format!("inventory.directory: cannot read {}", dir.display()))?;
    let Some(machine) = snapshot.served.values().find(|m| m.name == name) else {
        bail!("{}", not_served(name, dir, &snapshot));
    };
    match file {
        NodeFile::MetaData => Ok(cloudinit::render_meta_data(
            &format!("{}-example", machine.name),
            machine.hostname(),
        )?),
        NodeFile::UserData => {
            let endpoint = config
                .laptop
                .as_ref()
                .and_then(|l| l.init.control_plane_endpoint.clone())
                .unwrap_or_else(|| format!("{}:6443", config.server_address));
            let join = example_join.then(|| cloudinit::example_join(endpoint));
            let report_url = format!(
                "{}/report/{}",
                base_url(&config),
                machine.mac.to_hyphenated()
            );
            Ok(cloudinit::render_node_user_data(&NodeUserData {
                machine: &machine.name,
                hostname: machine.hostname(),
                node_ip: machine.ip,
                report_url: &report_url,
                report_token: EXAMPLE_TOKEN,
                hooks: &config.cloud_init,
                join: join.as_ref(),
                external_cni: config
                    .laptop
                    .as_ref()
                    .is_some_and(|l| l.init.cni_manifest.is_some()),
            })?)
        }
    }
}

/// Why `name` is not served from `dir`: its rejection (file, document, reason), or that no
/// manifest names it (with the names that are served).
fn not_served(name: &str, dir: &Path, snapshot: &crate::machines::Snapshot) -> String {
    let rejected: Vec<String> = snapshot
        .rejected
        .iter()
        .filter(|r| r.machine.as_deref() == Some(name) && r.problem.is_error())
        .map(|r| r.to_string())
        .collect();
    if !rejected.is_empty() {
        return format!("machine {name:?} is not served: {}", rejected.join("; "));
    }
    let mut served: Vec<&str> = snapshot.served.values().map(|m| m.name.as_str()).collect();
    served.sort_unstable();
    let served = if served.is_empty() {
        "none".to_string()
    } else {
        served.join(", ")
    };
    let unnamed = snapshot
        .rejected
        .iter()
        .filter(|r| r.machine.is_none() && r.problem.is_error())
        .count();
    let mut message = format!(
        "no Machine named {name:?} in the manifests of {} (served: {served})",
        dir.display()
    );
    if unnamed > 0 {
        message.push_str(&format!(
            "; {unnamed} document(s) could not be read far enough to know their name: provisioner check-config lists them"
        ));
    }
    message
}

fn laptop(path: &Path, file: NoCloudFile) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let config = Config::parse(path, &text)?;
    let Some(laptop) = &config.laptop else {
        bail!("{}: no laptop: section", path.display());
    };
    let network = laptop_network(&config, laptop)?;
    let user_data = || {
        cloudinit::render_laptop_user_data(&LaptopUserData {
            hostname: &laptop.hostname,
            node_ip: config.server_address,
            hooks: &config.cloud_init,
            init: &laptop.init,
            provisioner_yaml: &text,
            network: network.as_ref(),
            image_upstream: laptop.image_upstream.as_deref(),
        })
    };
    match file {
        NoCloudFile::UserData => Ok(user_data()?),
        NoCloudFile::MetaData => {
            // A new instance-id whenever the user-data changes: cloud-init then runs again.
            use sha2::Digest;
            let digest = sha2::Sha256::digest(user_data()?.as_bytes());
            let id = format!("{}-{}", laptop.hostname, &hex::encode(digest)[..16]);
            Ok(cloudinit::render_meta_data(&id, &laptop.hostname)?)
        }
        NoCloudFile::NetworkConfig => {
            let Some(network) = &network else {
                bail!(
                    "{}: interface: the laptop's provisioning interface name is needed for its network-config",
                    path.display()
                );
            };
            Ok(cloudinit::render_laptop_network_config(network)?)
        }
    }
}

/// The laptop's static address on `interface`, when the configuration names the interface.
fn laptop_network(
    config: &Config,
    laptop: &crate::config::Laptop,
) -> anyhow::Result<Option<LaptopNetwork>> {
    let Some(interface) = config.interface.clone() else {
        return Ok(None);
    };
    let address = ipnet::Ipv4Net::new(config.server_address, config.subnet.prefix_len())
        .context("serverAddress with the subnet's prefix")?;
    Ok(Some(LaptopNetwork {
        interface,
        mac_address: laptop.mac_address,
        address,
        // The laptop is often the gateway it hands out: no route to itself.
        gateway: config.gateway.filter(|g| *g != config.server_address),
        nameservers: config
            .dns_servers
            .iter()
            .copied()
            .filter(|d| *d != config.server_address)
            .collect(),
    }))
}
