//! `provisioner imageserver`: serves a directory of image artifacts (disk images, kernels,
//! initrds) over HTTP with Content-Length, Range and ETag, for stage2 and for bootstrapping the
//! first machine. Socket-activated like netboot (a socket named `http`, or the only one
//! passed), else it binds `--listen`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::systemd;

/// How long downloads in flight get after SIGTERM: images are large, but a client resumes
/// with Range when cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn listener(listen: SocketAddr) -> anyhow::Result<(std::net::TcpListener, bool)> {
    let mut passed = systemd::activated_sockets()?;
    if !passed.udp.is_empty() {
        bail!("imageserver takes one TCP socket; systemd passed UDP sockets too");
    }
    if let Some(socket) = passed.tcp.remove("http") {
        return Ok((socket, true));
    }
    let names: Vec<String> = passed.tcp.keys().cloned().collect();
    match names.as_slice() {
        [] => {
            let socket =
                std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            Ok((socket, false))
        }
        [only] => Ok((passed.tcp.remove(only).context("passed socket")?, true)),
        _ => bail!("systemd passed several sockets ({names:?}) and none is named http"),
    }
}

pub async fn run(dir: PathBuf, listen: SocketAddr) -> anyhow::Result<()> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let (socket, activated) = listener(listen)?;
    socket.set_nonblocking(true)?;
    let socket = TcpListener::from_std(socket)?;
    let local = socket.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(netboot::http::serve_files(
        socket,
        dir.clone(),
        shutdown.clone(),
        SHUTDOWN_GRACE,
    ));
    let status = format!("serving {} on {local}", dir.display());
    tracing::info!(activated, dir = %dir.display(), %local, "imageserver ready");
    systemd::notify_ready(&status);

    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = sigint.recv() => {}
    }
    systemd::notify_stopping("stopping: finishing downloads in flight");
    shutdown.cancel();
    server
        .await
        .context("file server task")?
        .context("file server")?;
    Ok(())
}
