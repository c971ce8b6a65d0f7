//! PID 1 of the initrd: mounts the API file systems, loads the drivers the hardware asks for,
//! brings the network up by DHCP, then hands over to imaging. It never exits: on a fatal error
//! it says why on the console, waits, and reboots (so the machine network-boots again).

pub mod cmdline;
pub mod dhcp;
pub mod net;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::modules::{LoadOutcome, LoadReport, ModuleDb, ModuleLoader, ModulesError, ALWAYS_LOAD};
use cmdline::BootOptions;
use dhcp::{DhcpError, Lease, Retry};
use net::{NetError, Netlink};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {target}: {source}")]
    Mount {
        target: &'static str,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("kernel modules: {0}")]
    Modules(#[from] ModulesError),
    #[error("no network interface appeared (no driver for the NIC?); modaliases seen: {0}")]
    NoInterface(String),
    #[error("no link has carrier after {0:?} (cable, switch port?) on: {1}")]
    NoCarrier(Duration, String),
    #[error("network: {0}")]
    Net(#[from] NetError),
    #[error("DHCP: {0}")]
    Dhcp(#[from] DhcpError),
    #[error("{0}")]
    Other(String),
}

/// What booting established, handed to the imaging step.
#[derive(Debug, Clone)]
pub struct Booted {
    pub options: BootOptions,
    pub cmdline: String,
    pub interface: String,
    pub mac: [u8; 6],
    pub lease: Lease,
    pub disks: Vec<Disk>,
}

/// A block device seen in `/sys/block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    pub name: String,
    pub bytes: u64,
    pub removable: bool,
}

/// Entry point when running as PID 1. Never returns.
/// An error from `after_network` is the reason printed before the reboot (its message alone:
/// stage2's errors name their causes in their messages).
pub fn run_pid1(after_network: impl FnOnce(&Booted) -> anyhow::Result<()>) -> ! {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .init();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "stage2 starting");
    let mut reboot_delay = BootOptions::default().reboot_delay;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let booted = boot(&mut reboot_delay)?;
        after_network(&booted)
    }));
    let reason = match outcome {
        Ok(Ok(())) => "stage2 finished".to_string(),
        Ok(Err(error)) => error.to_string(),
        Err(_) => "stage2 crashed (see the panic message above)".to_string(),
    };
    fatal(&reason, reboot_delay)
}

/// Says why, waits, reboots. Never returns (if reboot fails, sleeps forever: PID 1 must not
/// exit, or the kernel panics).
pub fn fatal(reason: &str, delay: Duration) -> ! {
    tracing::error!(reason, "stage2 stops; rebooting in {}s", delay.as_secs());
    eprintln!("stage2: {reason}");
    std::thread::sleep(delay);
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    eprintln!("stage2: reboot failed: {e}; halting here");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn boot(reboot_delay: &mut Duration) -> Result<Booted, InitError> {
    mount_api_filesystems()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (options, problems) = BootOptions::from_cmdline(&cmdline);
    *reboot_delay = options.reboot_delay;
    for problem in problems {
        tracing::warn!(problem, "ignored a command line option");
    }

    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .map_err(|e| InitError::Other(format!("uname: {e}")))?;
    let modules_dir = PathBuf::from("/lib/modules").join(&release);
    let db = ModuleDb::load(&modules_dir)?;
    tracing::info!(
        kernel = release,
        modules = db.module_count(),
        builtin = db.builtin_count(),
        "module index loaded"
    );
    let mut loader = ModuleLoader::new(db, modules_dir);
    let started = Instant::now();
    // Each outcome is logged as it happens; the list is for tests.
    load_hardware_modules(
        &mut loader,
        &options.extra_modules,
        Path::new("/sys/devices"),
    );
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "drivers loaded"
    );

    let disks = wait_for_disks(Path::new("/sys/block"), Duration::from_secs(3));
    for disk in &disks {
        tracing::info!(
            disk = disk.name,
            bytes = disk.bytes,
            removable = disk.removable,
            "disk found"
        );
    }
    if disks.is_empty() {
        tracing::warn!("no disk found (yet): no driver for the disk controller?");
    }

    let (interface, mac, lease) = bring_up_network(&options)?;
    Ok(Booted {
        options,
        cmdline,
        interface,
        mac,
        lease,
        disks,
    })
}

fn mount_api_filesystems() -> Result<(), InitError> {
    use nix::mount::{mount, MsFlags};
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let table: [(&str, &'static str, MsFlags, Option<&str>); 4] = [
        ("proc", "/proc", common, None),
        ("sysfs", "/sys", common, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755")),
        (
            "tmpfs",
            "/run",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (fstype, target, flags, data) in table {
        let _ = std::fs::create_dir_all(target);
        match mount(Some(fstype), target, Some(fstype), flags, data) {
            Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
            Err(source) => return Err(InitError::Mount { target, source }),
        }
    }
    Ok(())
}

/// Every device modalias under `sys_devices` (sysfs is walked without following symlinks,
/// which would loop).
pub fn modaliases(sys_devices: &Path) -> BTreeSet<String> {
    walkdir::WalkDir::new(sys_devices)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter(|entry| entry.file_name() == "modalias" && entry.file_type().is_file())
        .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
        .map(|text| text.trim().to_string())
        .filter(|alias| !alias.is_empty())
        .collect()
}

/// Loads the modules the devices' modaliases match, plus [`ALWAYS_LOAD`] and `extra`, in
/// rounds: loading a bus driver (virtio_pci) makes new devices (virtio net, block) appear,
/// whose drivers the next round loads. Stops when a round finds nothing new. Returns what
/// happened to each module, in order (built-in ones are reported, never loaded).
pub fn load_hardware_modules(
    loader: &mut ModuleLoader,
    extra: &[String],
    sys_devices: &Path,
) -> Vec<LoadReport> {
    let mut all_reports = Vec::new();
    let mut attempted: BTreeSet<String> = BTreeSet::new();
    let mut wanted: BTreeSet<String> = ALWAYS_LOAD.iter().map(|m| m.to_string()).collect();
    wanted.extend(extra.iter().cloned());
    let mut quiet_rounds = 0;
    for _round in 0..10 {
        for alias in modaliases(sys_devices) {
            for module in loader.db().match_modalias(&alias) {
                if !attempted.contains(&module) && !wanted.contains(&module) {
                    tracing::debug!(module, modalias = alias, "device wants a module");
                    wanted.insert(module);
                }
            }
        }
        let new: Vec<String> = wanted.difference(&attempted).cloned().collect();
        if new.is_empty() {
            // Drivers may register devices a little after their init returns: look twice.
            quiet_rounds += 1;
            if quiet_rounds > 1 {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        quiet_rounds = 0;
        for module in new {
            attempted.insert(module.clone());
            match loader.load(std::slice::from_ref(&module)) {
                Ok(reports) => {
                    for report in &reports {
                        let name = &report.module;
                        match &report.outcome {
                            Ok(LoadOutcome::Loaded) => {
                                tracing::info!(module = name, "module loaded")
                            }
                            Ok(LoadOutcome::AlreadyPresent) => {
                                tracing::debug!(module = name, "module already present")
                            }
                            Ok(LoadOutcome::BuiltIn) => {
                                tracing::debug!(module = name, "module built into the kernel")
                            }
                            Err(e) if report.optional => tracing::info!(
                                module = name,
                                error = %e,
                                "optional module not loaded (normal without its hardware)"
                            ),
                            Err(e) => {
                                tracing::warn!(module = name, error = %e, "module not loaded")
                            }
                        }
                    }
                    all_reports.extend(reports);
                }
                Err(e) => tracing::warn!(module, error = %e, "module not carried in this initrd"),
            }
        }
    }
    all_reports
}

/// Block devices of `/sys/block` that can hold an image (not loop, ram, zram or optical).
pub fn disks(sys_block: &Path) -> Vec<Disk> {
    let Ok(dir) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let read = |path: PathBuf| std::fs::read_to_string(path).unwrap_or_default();
    let mut disks: Vec<Disk> = dir
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| {
            !["loop", "ram", "zram", "sr", "fd"]
                .iter()
                .any(|p| name.starts_with(p))
        })
        .map(|name| {
            let sectors: u64 = read(sys_block.join(&name).join("size"))
                .trim()
                .parse()
                .unwrap_or(0);
            let removable = read(sys_block.join(&name).join("removable")).trim() == "1";
            Disk {
                bytes: sectors.saturating_mul(512),
                removable,
                name,
            }
        })
        .collect();
    disks.sort_by(|a, b| a.name.cmp(&b.name));
    disks
}

fn wait_for_disks(sys_block: &Path, timeout: Duration) -> Vec<Disk> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = disks(sys_block);
        if !found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Brings every Ethernet link up, waits for carrier, and runs DHCP on those with carrier
/// (in name order) until one gets a lease, which is then configured. Retries whole rounds a
/// few times before giving up.
fn bring_up_network(options: &BootOptions) -> Result<(String, [u8; 6], Lease), InitError> {
    let sys_class_net = Path::new("/sys/class/net");
    let netlink = Netlink::open()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let links = loop {
        let mut links = net::links(sys_class_net);
        if let Some(only) = &options.interface {
            links.retain(|l| &l.name == only);
        }
        if !links.is_empty() {
            break links;
        }
        if Instant::now() >= deadline {
            let seen: Vec<String> = modaliases(Path::new("/sys/devices")).into_iter().collect();
            return Err(InitError::NoInterface(seen.join(" ")));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for link in &links {
        if let Err(e) = netlink.set_up(&link.name) {
            tracing::warn!(interface = link.name, error = %e, "cannot bring link up");
        }
    }
    let names: Vec<String> = links.iter().map(|l| l.name.clone()).collect();
    let started = Instant::now();
    let retry = Retry {
        attempts: options.dhcp_attempts,
        ..Retry::default()
    };
    let mut last_error = None;
    for round in 1..=3 {
        let with_carrier = net::wait_for_carrier(sys_class_net, &names, options.carrier_timeout);
        if with_carrier.is_empty() {
            last_error = Some(InitError::NoCarrier(
                options.carrier_timeout,
                names.join(", "),
            ));
            continue;
        }
        for link in links.iter().filter(|l| with_carrier.contains(&l.name)) {
            let mac = netboot_style_mac(&link.mac);
            tracing::info!(interface = link.name, mac, round, "DHCP");
            match dhcp::obtain_lease(&link.name, link.mac, retry) {
                Ok(lease) => {
                    netlink.configure(&link.name, &lease)?;
                    tracing::info!(
                        interface = link.name,
                        mac,
                        ip = %format_args!("{}/{}", lease.address, lease.prefix_len),
                        router = ?lease.router,
                        server = %lease.server,
                        hostname = ?lease.hostname,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "DHCP bound"
                    );
                    return Ok((link.name.clone(), link.mac, lease));
                }
                Err(e) => {
                    tracing::warn!(interface = link.name, error = %e, "no lease");
                    last_error = Some(e.into());
                }
            }
        }
    }
    Err(last_error.unwrap_or_else(|| InitError::Other("no usable link".into())))
}

fn netboot_style_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The kernel runs `/sbin/modprobe -q -- NAME` (a symlink to `/init`) when it wants a module
/// (request_module(): crypto algorithms, code pages…). Loads NAME and its dependencies from the
/// initrd; exit code 0 when everything loaded.
pub fn modprobe_main(args: &[String]) -> std::process::ExitCode {
    let names: Vec<String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .cloned()
        .collect();
    let Ok(uts) = nix::sys::utsname::uname() else {
        return std::process::ExitCode::FAILURE;
    };
    let dir = PathBuf::from("/lib/modules").join(uts.release());
    let Ok(db) = ModuleDb::load(&dir) else {
        return std::process::ExitCode::FAILURE;
    };
    let mut loader = ModuleLoader::new(db, dir);
    match loader.load(&names) {
        Ok(reports) if reports.iter().all(|r| r.outcome.is_ok() || r.optional) => {
            std::process::ExitCode::SUCCESS
        }
        _ => std::process::ExitCode::FAILURE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modaliases_are_collected_from_a_sysfs_like_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let write = |rel: &str, text: &str| {
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{e}"));
            }
            std::fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
        };
        write(
            "pci0000:00/0000:00:03.0/modalias",
            "pci:v00001AF4d00001000sv\n",
        );
        write(
            "pci0000:00/0000:00:03.0/virtio0/modalias",
            "virtio:d00000001v00001AF4\n",
        );
        write("platform/serial8250/modalias", "\n");
        write("pci0000:00/0000:00:04.0/vendor", "0x1af4\n");
        let found: Vec<String> = modaliases(dir.path()).into_iter().collect();
        assert_eq!(
            found,
            vec!["pci:v00001AF4d00001000sv", "virtio:d00000001v00001AF4"]
        );
    }

    #[test]
    fn disks_skip_loop_ram_and_optical() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        for (name, sectors, removable) in [
            ("vda", "4096", "0"),
            ("loop0", "8", "0"),
            ("sr0", "2", "1"),
            ("sda", "10", "1"),
        ] {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(path.join("size"), sectors).unwrap_or_else(|e| panic!("{e}"));
            std::fs::write(path.join("removable"), removable).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            disks(dir.path()),
            vec![
                Disk {
                    name: "sda".into(),
                    bytes: 5120,
                    removable: true
                },
                Disk {
                    name: "vda".into(),
                    bytes: 4096 * 512,
                    removable: false
                },
            ]
        );
    }
}
