//! stage2: PID 1 of the imaging initrd, and the tool that builds that initrd.
//!
//! - run by the kernel as `/init` (PID 1): boots, gets an address by DHCP, images the disk;
//! - run as `modprobe` (the kernel's request_module() helper, a symlink in the initrd): loads a
//!   module and its dependencies;
//! - otherwise a command line tool: `stage2 build-initrd …`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stage2::initrd::{Compression, InitrdSpec};
use stage2::modules::DEFAULT_MODULES;
use stage2::provision::{self, Pacing, Reporter};
use wire::orders::{keys, split_cmdline, Orders, Token};
use wire::report::ProgressReport;

#[derive(Parser)]
#[command(
    name = "stage2",
    version,
    about = "PID 1 of the imaging initrd, and its builder"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Builds the initrd: this binary (or --init) as /init plus the kernel modules it needs.
    BuildInitrd {
        /// Kernel release (`uname -r` of the target kernel), e.g. 6.1.0-56-amd64.
        #[arg(long)]
        kernel_release: String,
        /// The kernel's module tree [default: /lib/modules/RELEASE].
        #[arg(long)]
        modules_dir: Option<PathBuf>,
        /// The static stage2 binary to store as /init [default: this executable].
        #[arg(long)]
        init: Option<PathBuf>,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Extra modules (names or aliases) besides the default set; repeatable.
        #[arg(long = "module")]
        modules: Vec<String>,
        #[arg(long, value_enum, default_value_t = CompressionArg::Zstd)]
        compression: CompressionArg,
        /// zstd level (1-22): higher is smaller and slower.
        #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd_level: i32,
    },
    /// Runs the PID 1 boot sequence (for debugging in a VM; refuses unless PID 1 or --force).
    Init {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    Gzip,
    None,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let program = args
        .first()
        .and_then(|a| a.rsplit('/').next())
        .unwrap_or_default();
    if program == "modprobe" {
        return stage2::init::modprobe_main(&args);
    }
    if std::process::id() == 1 {
        stage2::init::run_pid1(after_network);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stage2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What PID 1 does once the network is up: read the orders, image the disk, report. Any error
/// is returned as the reason; `run_pid1` prints it, backs off and reboots, so the machine
/// network-boots again (and netboot, told `failed`, decides what it gets next).
fn after_network(booted: &stage2::init::Booted) -> anyhow::Result<()> {
    tracing::info!(
        interface = booted.interface,
        ip = %booted.lease.address,
        disks = booted.disks.len(),
        "network ready"
    );
    let orders = match Orders::from_cmdline(&booted.cmdline) {
        Ok(orders) => orders,
        Err(e) => {
            let reason = format!("cannot image: {e}; nothing was written");
            eprintln!("stage2: {reason}");
            // Report if the orders at least say where and with which token.
            if let Some(reporter) = reporter_from_partial_orders(&booted.cmdline, booted.mac) {
                reporter.send(
                    &ProgressReport::Failed {
                        message: reason.clone(),
                    },
                    3,
                );
            }
            anyhow::bail!(reason);
        }
    };
    let reporter = Reporter::new(
        &orders.netboot_url,
        booted.mac,
        orders.imaging.token.clone(),
    );
    let mut console = std::io::stderr();
    provision::provision(
        &orders,
        &reporter,
        Path::new("/sys/block"),
        Pacing::default(),
        &mut console,
    )
    .map_err(|e| anyhow::anyhow!("imaging failed: {e}"))?;
    eprintln!("stage2: imaged; rebooting into the new system");
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    anyhow::bail!("imaged, but reboot failed: {e}")
}

/// A reporter from `provisioner.url` and `provisioner.token` alone, for reporting orders that
/// are otherwise unusable; `None` unless both are present and plausible.
fn reporter_from_partial_orders(cmdline: &str, mac: [u8; 6]) -> Option<Reporter> {
    let params = split_cmdline(cmdline).ok()?;
    let value = |key: &str| {
        params
            .iter()
            .find_map(|p| p.strip_prefix(key)?.strip_prefix('='))
    };
    let url = value(keys::URL).filter(|u| u.starts_with("http://"))?;
    let token = Token::parse(value(keys::TOKEN)?)?;
    Some(Reporter::new(url, mac, token))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::BuildInitrd {
            kernel_release,
            modules_dir,
            init,
            out,
            modules,
            compression,
            zstd_level,
        } => {
            let init = match init {
                Some(path) => path,
                None => std::env::current_exe().context("locating this executable")?,
            };
            let mut all_modules: Vec<String> =
                DEFAULT_MODULES.iter().map(|m| m.to_string()).collect();
            all_modules.extend(modules);
            let spec = InitrdSpec {
                modules_dir: modules_dir
                    .unwrap_or_else(|| PathBuf::from("/lib/modules").join(&kernel_release)),
                kernel_release,
                init,
                modules: all_modules,
                compression: match compression {
                    CompressionArg::Zstd => Compression::Zstd { level: zstd_level },
                    CompressionArg::Gzip => Compression::Gzip,
                    CompressionArg::None => Compression::None,
                },
            };
            // Write to a temporary file beside the output, then rename: a half-written initrd
            // is never served.
            let tmp = out.with_extension("partial");
            let file = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            let mut writer = std::io::BufWriter::new(file);
            let summary = stage2::initrd::build(&spec, &mut writer)
                .with_context(|| format!("building the initrd for {}", spec.kernel_release))?;
            let file = writer.into_inner().context("flushing the initrd")?;
            file.sync_all().context("syncing the initrd")?;
            std::fs::rename(&tmp, &out)
                .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
            println!(
                "initrd {}: {} bytes ({:.1} MiB) compressed, {} bytes cpio, {} entries, {} modules ({} bytes)",
                out.display(),
                summary.compressed_bytes,
                summary.compressed_bytes as f64 / (1024.0 * 1024.0),
                summary.cpio_bytes,
                summary.entries,
                summary.modules.len(),
                summary.module_bytes,
            );
            println!("modules: {}", summary.modules.join(" "));
            if !summary.builtin.is_empty() {
                println!("built into the kernel: {}", summary.builtin.join(" "));
            }
            Ok(())
        }
        Command::Init { force } => {
            if !force {
                anyhow::bail!("init runs as PID 1 in the initrd; pass --force to run it anyway");
            }
            stage2::init::run_pid1(after_network)
        }
    }
}
