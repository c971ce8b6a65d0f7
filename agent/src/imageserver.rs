//! `provisioner imageserver`: serves a directory of image artifacts (disk images, kernels,
//! initrds) over HTTP with Content-Length, Range and ETag, for stage2 and for bootstrapping the
//! first machine. Socket-activated like netboot (a socket named `http`, or the only one
//! passed), else it binds `--listen`.
//!
//! On the operator's host it also serves the first machine's NoCloud seed,
//! `/nocloud/{name}/meta-data` and `user-data` (and `network-config`): rendered at start from
//! the `laptop:` section of a configuration file (`--bootstrap --config FILE`, `{name}` is the
//! laptop's host name), or pre-rendered files in `SEED_DIR/{name}/` (`--bootstrap SEED_DIR`).
//! On the first machine (`--upstream URL`) it is a pull-through cache of the bootstrap
//! imageserver (`cache`). What each request is answered with is [`ImageSite`].

mod cache;
mod site;
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
pub use site::{FillError, FillFuture, ImageSite, MissingFiles, SEED_FILES};

/// What `provisioner imageserver` serves, from its flags.
#[derive(Debug, Clone)]
pub struct Options {
    /// The artifacts (and the cache, with `upstream`).
    pub dir: PathBuf,
    /// Bound when systemd passed no socket.
    pub listen: SocketAddr,
    /// The first machine's NoCloud seed, served under `/nocloud/`.
    pub seed: Option<Seed>,
    /// The imageserver to fetch missing files from.
    pub upstream: Option<String>,
    /// Connection limits and deadlines.
    pub limits: netboot::http::HttpLimits,
}

/// The HTTP limits as flags (defaults as netboot's, see [`netboot::http::limits`]).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Connections at once (lowered to fit the file descriptor limit).
    #[arg(long, default_value_t = netboot::http::limits::DEFAULT_MAX_CONNECTIONS as u32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Connections at once from one client address.
    #[arg(long, default_value_t = netboot::http::limits::DEFAULT_MAX_CONNECTIONS_PER_PEER as u32,
        value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_peer: u32,
    /// Seconds a client has to send its request headers (also closes idle connections).
    #[arg(long, value_name = "SECS", default_value_t = netboot::http::limits::DEFAULT_HEADER_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout: u64,
    /// Seconds a response may go without writing a byte before it is cut.
    #[arg(long, value_name = "SECS", default_value_t = netboot::http::limits::DEFAULT_WRITE_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..))]
    pub write_timeout: u64,
    /// Slowest average rate (bytes/s) a response may be sent at: each must be done within
    /// 60 s + its length / this rate.
    #[arg(long, value_name = "BYTES", default_value_t = netboot::http::limits::DEFAULT_MIN_RATE,
        value_parser = clap::value_parser!(u64).range(1..))]
    pub min_rate: u64,
}

impl From<LimitArgs> for netboot::http::HttpLimits {
    fn from(a: LimitArgs) -> Self {
        netboot::http::HttpLimits {
            max_connections: a.max_connections as usize,
            max_connections_per_peer: a.max_connections_per_peer.min(a.max_connections) as usize,
            header_timeout: Duration::from_secs(a.header_timeout),
            write_timeout: Duration::from_secs(a.write_timeout),
            min_rate: a.min_rate,
            ..netboot::http::HttpLimits::default()
        }
    }
}

impl Options {
    /// What can be checked before serving: the folders exist, the upstream is an http:// URL
    /// with a host, the configuration has a `laptop:` section. The same messages as at start.
    pub fn check(&self) -> anyhow::Result<()> {
        if !self.dir.is_dir() {
            bail!("--dir {}: not a directory", self.dir.display());
        }
        match &self.seed {
            None => {}
            Some(Seed::Dir(dir)) if !dir.is_dir() => {
                bail!("--bootstrap {}: not a directory", dir.display());
            }
            Some(Seed::Dir(_)) => {}
            Some(Seed::Config(config)) => {
                let parsed = crate::config::Config::load(config)?;
                if parsed.laptop.is_none() {
                    bail!(
                        "--config {}: no laptop: section to render the seed from",
                        config.display()
                    );
                }
            }
        }
        if let Some(url) = &self.upstream {
            crate::validate::http_url("--upstream", url)?;
        }
        Ok(())
    }
}

/// Where the bootstrap seed comes from.
#[derive(Debug, Clone)]
pub enum Seed {
    /// Pre-rendered files: `{name}/meta-data`, `{name}/user-data`.
    Dir(PathBuf),
    /// Rendered at start from this configuration's `laptop:` section.
    Config(PathBuf),
}

/// The site for `options` (without sockets and signals), and the directory holding a rendered
/// seed, which must live as long as the server: shared with the tests.
pub fn file_server(options: &Options) -> anyhow::Result<(ImageSite, Option<tempfile::TempDir>)> {
    if !options.dir.is_dir() {
        bail!("{} is not a directory", options.dir.display());
    }
    let mut rendered = None;
    let seed_dir = match &options.seed {
        None => None,
        Some(Seed::Dir(dir)) => {
            if !dir.is_dir() {
                bail!("--bootstrap {} is not a directory", dir.display());
            }
            Some(dir.clone())
        }
        Some(Seed::Config(config)) => {
            let seed = render_seed(config)?;
            let path = seed.path().to_path_buf();
            rendered = Some(seed);
            Some(path)
        }
    };
    let missing = match &options.upstream {
        Some(url) => {
            Some(Arc::new(PullThrough::new(options.dir.clone(), url)?) as Arc<dyn MissingFiles>)
        }
        None => None,
    };
    Ok((
        ImageSite {
            files: netboot::http::DirSite::new(options.dir.clone()),
            seed_dir,
            missing,
        },
        rendered,
    ))
}

/// Renders the first machine's seed from `config` (as `provisioner cloud-config laptop` does)
/// into a private temporary directory: `{hostname}/user-data`, `meta-data` and, when the
/// configuration names the interface, `network-config`.
fn render_seed(config: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    use crate::cloud_config_cmd::{render, CloudConfig, NoCloudFile};
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let parsed = crate::config::Config::parse(config, &text)?;
    let Some(laptop) = &parsed.laptop else {
        bail!(
            "{}: no laptop: section to render the seed from",
            config.display()
        );
    };
    let name = laptop.hostname.clone();
    let seed = tempfile::Builder::new()
        .prefix("provisioner-seed-")
        .tempdir()
        .context("creating the seed directory")?;
    let dir = seed.path().join(&name);
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let one = |file: NoCloudFile| {
        render(CloudConfig::Laptop {
            config: config.to_path_buf(),
            file,
        })
    };
    for (file, name) in [
        (NoCloudFile::UserData, "user-data"),
        (NoCloudFile::MetaData, "meta-data"),
    ] {
        let text = one(file).with_context(|| format!("rendering the laptop's {name}"))?;
        std::fs::write(dir.join(name), text)
            .with_context(|| format!("writing the seed's {name}"))?;
    }
    match one(NoCloudFile::NetworkConfig) {
        Ok(text) => std::fs::write(dir.join("network-config"), text)
            .context("writing the seed's network-config")?,
        Err(e) => tracing::info!(error = %format!("{e:#}"), "no network-config in the seed"),
    }
    tracing::info!(
        machine = %name,
        config = %config.display(),
        path = %format!("/nocloud/{name}/"),
        "NoCloud seed rendered"
    );
    Ok(seed)
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
    let (site, _rendered_seed) = file_server(&options)?;
    let dir = options.dir;
    let (socket, activated) = listener(options.listen)?;
    socket.set_nonblocking(true)?;
    let socket = TcpListener::from_std(socket)?;
    let local = socket.local_addr()?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(netboot::http::serve(
        socket,
        site,
        netboot::http::ServeOptions {
            grace: SHUTDOWN_GRACE,
            limits: options.limits.clone(),
        },
        shutdown.clone(),
    ));
    let mut status = format!("serving {} on {local}", dir.display());
    if let Some(Seed::Dir(path) | Seed::Config(path)) = &options.seed {
        status.push_str(&format!("; NoCloud seed from {}", path.display()));
    }
    if let Some(upstream) = &options.upstream {
        status.push_str(&format!("; caching {upstream}"));
    }
    tracing::info!(
        activated,
        dir = %dir.display(),
        %local,
        seed = options.seed.as_ref().map(tracing::field::debug),
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
