//! stage2: PID 1 of the imaging initrd, and the tool that builds that initrd.
//!
//! - run by the kernel as `/init` (PID 1): boots, gets an address by DHCP, images the disk;
//! - run as `modprobe` (the kernel's request_module() helper, a symlink in the initrd): loads a
//!   module and its dependencies;
//! - otherwise a command line tool: `stage2 build-initrd …`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use stage2::initrd::{Compression, InitrdSpec};
use stage2::modules::DEFAULT_MODULES;

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

/// What PID 1 does once the network is up. The image writer is a library of its own
/// (`stage2::image`); until orders are read and passed to it, say plainly that nothing was
/// written, so the machine reboots instead of pretending.
fn after_network(booted: &stage2::init::Booted) -> Result<(), String> {
    tracing::info!(
        interface = booted.interface,
        ip = %booted.lease.address,
        disks = booted.disks.len(),
        "network ready"
    );
    Err("no imaging step wired into this build: nothing was written".into())
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
