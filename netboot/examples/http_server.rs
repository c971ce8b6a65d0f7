//! Stand-alone HTTP server for manual and shell tests:
//!
//! ```text
//! http_server ADDR BOOT_DIR ASSETS_DIR BASE_URL KERNEL INITRD CMDLINE [NAME,MAC,IP[,HOSTNAME]]...
//! ```
//!
//! Binds ADDR (e.g. `10.77.0.1:8080`), serves `/ipxe/{mac}` for the machines given on the
//! command line, `/boot/` from BOOT_DIR and `/assets/` from ASSETS_DIR, and stops on SIGINT or
//! SIGTERM after in-flight requests finish. Log level from `RUST_LOG` (default `info`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;

use netboot::http::{serve, HttpSettings, NetbootSite, ServeOptions};
use netboot::ipxe::ScriptSettings;
use netboot::machine::InvalidMac;
use netboot::{MacAddr, Machine, MachineLookup};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

const USAGE: &str =
    "usage: http_server ADDR BOOT_DIR ASSETS_DIR BASE_URL KERNEL INITRD CMDLINE [NAME,MAC,IP[,HOSTNAME]]...";

/// Why a `NAME,MAC,IP[,HOSTNAME]` argument is not a machine.
#[derive(Debug, thiserror::Error)]
enum MachineSpecError {
    #[error("machine {0:?}: expected NAME,MAC,IP[,HOSTNAME]")]
    Shape(String),
    #[error(transparent)]
    Mac(#[from] InvalidMac),
    #[error("machine {spec:?}: {source}")]
    Ip {
        spec: String,
        source: std::net::AddrParseError,
    },
}

fn parse_machine(spec: &str) -> Result<Machine, MachineSpecError> {
    let parts: Vec<&str> = spec.split(',').collect();
    let (name, mac, ip, hostname) = match parts.as_slice() {
        [name, mac, ip] => (name, mac, ip, None),
        [name, mac, ip, hostname] => (name, mac, ip, Some(hostname.to_string())),
        _ => return Err(MachineSpecError::Shape(spec.to_string())),
    };
    Ok(Machine {
        name: name.to_string(),
        mac: mac.parse()?,
        ip: ip.parse().map_err(|source| MachineSpecError::Ip {
            spec: spec.to_string(),
            source,
        })?,
        hostname,
    })
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 7 {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    let mut machines = HashMap::<MacAddr, Machine>::new();
    for spec in &args[7..] {
        match parse_machine(spec) {
            Ok(m) => {
                machines.insert(m.mac, m);
            }
            Err(e) => {
                eprintln!("{e}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(args[0].as_str()).await?;
    let settings = Arc::new(HttpSettings {
        boot_dir: args[1].clone().into(),
        assets_dir: args[2].clone().into(),
        base_url: args[3].clone(),
        script: ScriptSettings {
            kernel: args[4].clone(),
            initrd: args[5].clone(),
            cmdline: args[6].clone(),
        },
    });
    let machines: Arc<dyn MachineLookup> = Arc::new(machines);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.cancel();
    });
    serve(
        listener,
        NetbootSite::new(settings, machines),
        ServeOptions::default(),
        shutdown,
    )
    .await
}
