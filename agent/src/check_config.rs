//! `provisioner check-config`: everything that can be checked without a machine booting, and
//! what the configuration means. Offline: no socket is bound, no server is contacted.
//!
//! Checked: the configuration itself ([`Config::load`]), the folders and files it names
//! ([`preflight::check`]: the loaders, the kernel and initrd, the inventory folder), and, with a
//! folder inventory, every document of every manifest (each rejection with its file, document
//! index and Machine name), and the iPXE script of every machine, rendered by the code that
//! serves it. Any error: exit 2. Warnings (a UEFI HTTP Boot loader missing, a document of
//! another kind skipped) do not change the exit code.
//!
//! Printed (stdout) when valid: the server and its listeners, the image, then per machine what
//! each kind of firmware is answered: BIOS PXE and UEFI PXE a loader over TFTP, UEFI HTTP Boot a
//! loader over HTTP, iPXE the machine's script, shown as served on its first boot (the token a
//! placeholder) and what it becomes once the disk is imaged.

use std::fmt::Write as _;
use std::path::Path;

use netboot::dhcp::{boot_file, BootClient};
use netboot::ipxe::{boot_script, imaging_script, local_boot_script};
use netboot::provisioning::{ImagingOrders, LocalBoot, Token};
use netboot::Machine;

use crate::config::{Config, DhcpMode, Image, Inventory};
use crate::daemon::ServerSettings;
use crate::machines::{folder, ImagingSpec, Snapshot};
use crate::preflight;

/// What check-config found: the errors and warnings (one line each) and, without errors, what
/// the configuration means.
#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub meaning: String,
}

/// Stands for the per-provisioning token in the scripts shown (a valid token shape, replaced
/// by `<token>` when printed).
const TOKEN_PLACEHOLDER: &str = "TOKENPLACEHOLDERTOKENPLACEHOLDER";

pub fn check(path: &Path) -> Report {
    let mut report = Report::default();
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            report.errors.push(e.to_string());
            return report;
        }
    };
    for finding in preflight::check(&config) {
        let line = finding.to_config_error(path).to_string();
        if finding.error {
            report.errors.push(line);
        } else {
            report.warnings.push(line);
        }
    }
    let settings = ServerSettings::new(&config, config.listen.http.port());
    let snapshot = match &config.inventory {
        Inventory::Directory(dir) if dir.is_dir() => {
            match folder::load_dir(dir, &config.address_rules()) {
                Ok(snapshot) => Some(snapshot),
                Err(e) => {
                    report.errors.push(format!(
                        "{}: inventory.directory: cannot read {}: {e}",
                        path.display(),
                        dir.display()
                    ));
                    None
                }
            }
        }
        _ => None,
    };
    if let Some(snapshot) = &snapshot {
        for rejection in &snapshot.rejected {
            if rejection.problem.is_error() {
                report.errors.push(rejection.to_string());
            } else {
                report.warnings.push(rejection.to_string());
            }
        }
    }
    report.meaning = meaning(
        path,
        &config,
        &settings,
        snapshot.as_ref(),
        &mut report.errors,
    );
    report
}

fn image_line(image: &Image) -> String {
    let size = image
        .size
        .map(|s| format!(", {s} bytes"))
        .unwrap_or_default();
    format!(
        "{} (sha256 {}{size})",
        image.url,
        image.sha256.to_lowercase()
    )
}

fn local_boot_words(method: LocalBoot) -> &'static str {
    match method {
        LocalBoot::Auto => "`exit 1` to the firmware's next boot entry under UEFI, sanboot of the first BIOS disk otherwise",
        LocalBoot::Exit => "`exit 1` to the firmware's next boot entry",
        LocalBoot::Sanboot => "sanboot of the first BIOS disk",
    }
}

/// The text of what `config` means; a script that cannot be rendered is an error.
fn meaning(
    path: &Path,
    config: &Config,
    settings: &ServerSettings,
    snapshot: Option<&Snapshot>,
    errors: &mut Vec<String>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "server {} on subnet {}{}{}",
        config.server_address,
        config.subnet,
        config
            .interface
            .as_deref()
            .map(|i| format!(", interface {i}"))
            .unwrap_or_default(),
        config
            .gateway
            .map(|g| format!(", gateway {g}"))
            .unwrap_or_default(),
    );
    match config.dhcp_mode {
        DhcpMode::Standalone => {
            let _ = writeln!(
                out,
                "DHCP: stand-alone server: each Machine gets its spec.ipAddress with the mask of {}, a {} s lease{}{}; other MACs get nothing",
                config.subnet,
                config.lease_time.as_secs(),
                config
                    .gateway
                    .map(|g| format!(", router {g}"))
                    .unwrap_or_default(),
                if config.dns_servers.is_empty() {
                    String::new()
                } else {
                    let dns: Vec<String> =
                        config.dns_servers.iter().map(|d| d.to_string()).collect();
                    format!(", DNS {}", dns.join(" "))
                },
            );
        }
        DhcpMode::Proxy => {
            let _ = writeln!(
                out,
                "DHCP: proxy beside the LAN's server: netboot gives no addresses, only ProxyDHCP answers (boot file, no address) to the PXE, iPXE and UEFI HTTP Boot clients of the Machines below; the LAN's DHCP server must give each Machine its spec.ipAddress (a reservation for its MAC), or its imaging script is refused; gateway, dnsServers and leaseTime are not sent"
            );
        }
    }
    let pxe = match config.dhcp_mode {
        DhcpMode::Proxy => format!(", PXE boot server {}", config.listen.pxe),
        DhcpMode::Standalone => String::new(),
    };
    let _ = writeln!(
        out,
        "listens (without systemd's sockets): DHCP {}{pxe}, TFTP {}, HTTP {} (machines reach it as {})",
        config.listen.dhcp, config.listen.tftp, config.listen.http, settings.base_url
    );
    match &config.image {
        Some(image) => {
            let _ = writeln!(out, "image: {}", image_line(image));
        }
        None => {
            let _ = writeln!(
                out,
                "image: none configured (only Machines with spec.image are imaged)"
            );
        }
    }
    match &config.inventory {
        Inventory::Directory(dir) => {
            let served = snapshot.map_or(0, |s| s.served.len());
            let _ = writeln!(
                out,
                "inventory: folder {}, {served} machine(s) served",
                dir.display()
            );
        }
        Inventory::Kubernetes { kubeconfig } => {
            let _ = writeln!(
                out,
                "inventory: the cluster's Machine resources ({}); not read offline",
                kubeconfig
                    .as_deref()
                    .map(|k| k.display().to_string())
                    .unwrap_or_else(|| "kubeconfig credential, in-cluster or default".into())
            );
        }
    }
    let Some(snapshot) = snapshot else {
        return out;
    };
    let mut machines: Vec<&Machine> = snapshot.served.values().collect();
    machines.sort_by(|a, b| a.name.cmp(&b.name));
    for machine in machines {
        let own = snapshot.imaging.get(&machine.name);
        if let Err(e) = describe(&mut out, config, settings, machine, own) {
            errors.push(format!(
                "{}: Machine {}: its iPXE script cannot be written: {e}",
                path.display(),
                machine.name
            ));
        }
    }
    out
}

/// What `machine` is answered, firmware by firmware.
fn describe(
    out: &mut String,
    config: &Config,
    settings: &ServerSettings,
    machine: &Machine,
    own: Option<&ImagingSpec>,
) -> Result<(), netboot::ipxe::ScriptError> {
    let _ = writeln!(
        out,
        "\nmachine {}: MAC {}, IP {}, host name {}",
        machine.name,
        machine.mac,
        machine.ip,
        machine.hostname()
    );
    let files = &config.boot_files;
    let file_of = |client: BootClient| {
        boot_file(client, machine, &settings.dhcp)
            .file
            .unwrap_or_default()
    };
    let _ = writeln!(
        out,
        "  BIOS PXE        -> TFTP {}  ({})",
        file_of(BootClient::Bios),
        preflight::served_path(&files.ipxe_dir, &file_of(BootClient::Bios)).display()
    );
    let _ = writeln!(
        out,
        "  UEFI PXE        -> TFTP {}  ({})",
        file_of(BootClient::UefiX64),
        preflight::served_path(&files.ipxe_dir, &file_of(BootClient::UefiX64)).display()
    );
    let _ = writeln!(
        out,
        "  UEFI HTTP Boot  -> {}  ({})",
        file_of(BootClient::UefiHttp),
        preflight::served_path(&files.ipxe_dir, preflight::HTTP_BOOT_LOADER).display()
    );
    let _ = writeln!(
        out,
        "  iPXE            -> {}",
        file_of(BootClient::Ipxe { arch: None })
    );
    let image = own
        .and_then(|o| o.image.clone())
        .or_else(|| config.image.clone());
    let disk = own.map(|o| o.disk.clone()).unwrap_or_default();
    let script = match &image {
        Some(image) => {
            let whose = if own.is_some_and(|o| o.image.is_some()) {
                "its own spec.image"
            } else {
                "the configured image"
            };
            let _ = writeln!(
                out,
                "    imaged with {whose}: {}; disk: {}",
                image_line(image),
                if disk == Default::default() {
                    "stage2's choice (the only plain disk)".to_string()
                } else {
                    format!("the one matching {disk}")
                }
            );
            let orders = ImagingOrders {
                token: Token::parse(TOKEN_PLACEHOLDER)
                    .ok_or_else(|| netboot::ipxe::ScriptError::Orders("placeholder".into()))?,
                image_url: image.url.clone(),
                sha256: wire::orders::parse_sha256(&image.sha256)
                    .ok_or_else(|| netboot::ipxe::ScriptError::Orders("malformed sha256".into()))?,
                image_size: image.size,
                disk,
            };
            imaging_script(machine, &settings.base_url, &settings.http.script, &orders)?
        }
        None => boot_script(machine, &settings.base_url, &settings.http.script)?,
    };
    let _ = writeln!(out, "    first boot (Pending), its script:");
    for line in script.lines() {
        let _ = writeln!(out, "      {}", line.replace(TOKEN_PLACEHOLDER, "<token>"));
    }
    if image.is_some() {
        // Rendered to check it, described in words.
        local_boot_script(machine, config.boot.local_boot)?;
        let _ = writeln!(
            out,
            "    once imaged: the local disk ({})",
            local_boot_words(config.boot.local_boot)
        );
    }
    Ok(())
}
