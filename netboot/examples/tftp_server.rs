//! Stand-alone TFTP server for manual and shell tests: `tftp_server ADDR ROOT`.
//!
//! Binds ADDR (e.g. `10.77.0.1:69`), serves ROOT read-only, stops on SIGINT or SIGTERM after
//! in-flight transfers finish. Log level from `RUST_LOG` (default `info`). `TFTP_MAX_TRANSFERS`
//! sets [`TftpSettings::max_transfers`] (benchmarks with more clients at once than the default).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Arc;

use netboot::tftp::{serve, TftpSettings};
use netboot::{MacAddr, Machine, MachineLookup};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

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
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(root)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: tftp_server ADDR ROOT");
        std::process::exit(2);
    };
    let socket = tokio::net::UdpSocket::bind(addr.as_str()).await?;
    let mut settings = TftpSettings::new(root);
    if let Ok(max) = std::env::var("TFTP_MAX_TRANSFERS") {
        settings.max_transfers = max.parse().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("TFTP_MAX_TRANSFERS={max:?}: {e}"),
            )
        })?;
    }
    let settings = Arc::new(settings);
    let machines: Arc<dyn MachineLookup> = Arc::new(HashMap::<MacAddr, Machine>::new());
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
    serve(socket, settings, machines, shutdown).await
}
