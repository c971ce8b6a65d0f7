//! `provisioner imageserver`: serves a directory of image artifacts (disk images, kernels,
//! initrds) over HTTP with Content-Length, Range and ETag, for stage2 and for bootstrapping the
//! first machine. Socket-activated like netboot (a socket named `http`, or the only one
//! passed), else it binds `--listen`.
//!
//! On the operator's host (`--bootstrap SEED_DIR`) it also serves the first machine's NoCloud
//! seed: `/nocloud/{name}/meta-data` and `user-data` from `SEED_DIR/{name}/`. On the first
//! machine (`--upstream URL`) it is a pull-through cache of the bootstrap imageserver
//! ([`cache`]).

mod cache;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::systemd;

pub use cache::PullThrough;

/// What `provisioner imageserver` serves, from its flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The artifacts (and the cache, with `upstream`).
    pub dir: PathBuf,
    /// Bound when systemd passed no socket.
    pub listen: SocketAddr,
    /// The NoCloud seed directory (`{name}/meta-data`, `{name}/user-data`).
    pub bootstrap: Option<PathBuf>,
    /// The imageserver to fetch missing files from.
    pub upstream: Option<String>,
}

/// The file server for `options` (without sockets and signals): shared with the tests.
pub fn file_server(options: &Options) -> anyhow::Result<netboot::http::FileServer> {
    if !options.dir.is_dir() {
        bail!("{} is not a directory", options.dir.display());
    }
    if let Some(seed) = &options.bootstrap {
        if !seed.is_dir() {
            bail!("--bootstrap {} is not a directory", seed.display());
        }
    }
    let missing = match &options.upstream {
        Some(url) => Some(Arc::new(PullThrough::new(options.dir.clone(), url)?)
            as Arc<dyn netboot::http::MissingFiles>),
        None => None,
    };
    Ok(netboot::http::FileServer {
        dir: options.dir.clone(),
        seed_dir: options.bootstrap.clone(),
        missing,
    })
}

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

pub async fn run(options: Options) -> anyhow::Result<()> {
    let server = file_server(&options)?;
    let dir = options.dir;
    let (socket, activated) = listener(options.listen)?;
    socket.set_nonblocking(true)?;
    let socket = TcpListener::from_std(socket)?;
    let local = socket.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(netboot::http::serve_file_server(
        socket,
        server,
        shutdown.clone(),
        SHUTDOWN_GRACE,
    ));
    let mut status = format!("serving {} on {local}", dir.display());
    if let Some(seed) = &options.bootstrap {
        status.push_str(&format!("; NoCloud seed from {}", seed.display()));
    }
    if let Some(upstream) = &options.upstream {
        status.push_str(&format!("; caching {upstream}"));
    }
    tracing::info!(
        activated,
        dir = %dir.display(),
        %local,
        bootstrap = options.bootstrap.as_ref().map(|d| tracing::field::display(d.display())),
        upstream = options.upstream.as_deref(),
        "imageserver ready"
    );
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
