//! The HTTP server: per-machine iPXE scripts, iPXE binaries and boot assets.
//!
//! | route | answer |
//! |---|---|
//! | `GET /ipxe/{mac}` | the machine's iPXE script (`52-54-00-12-34-56` or `52:54:00:12:34:56`); 400 for a malformed MAC, 404 for a machine we do not know; an imaging script only to the machine's reserved address shortly after its DHCP ACK, else 403 with the reason |
//! | `GET /boot/{file}` | a file from [`HttpSettings::boot_dir`] (iPXE binaries, for UEFI HTTP Boot) |
//! | `GET /assets/{path}` | a file from [`HttpSettings::assets_dir`] (kernel, initrd) |
//! | `POST /report/{mac}` | stage2's [`ProgressReport`] (JSON, at most [`MAX_REPORT_BODY`] bytes) with `Authorization: Bearer {token}`: 204; 400 bad JSON, 401 no token, 403 wrong token or not from the machine's reserved address, 404 unknown machine, 409 wrong phase, 413 too large |
//! | `GET /nocloud/{token}/{meta-data,user-data,vendor-data}` | cloud-init NoCloud files for the holder of the token (NoCloud's `seedfrom` cannot send headers, so the token is in the path); `user-data` is served once per token, a second fetch gets 403, and so does a fetch from another address than the machine's reserved one |
//!
//! The script route asks [`Provisioning::boot_action`] what the machine should boot: stage2
//! with its imaging orders, its local disk, or the configured kernel. Tokens are never logged:
//! `/nocloud/` paths appear in the log as `/nocloud/<token>/user-data`.
//!
//! [`serve_files`] is the same server for a plain directory (`provisioner imageserver`): every
//! path is a file under it, with the same validators, ranges and confinement.
//! [`serve_file_server`] adds, per [`FileServer`], a NoCloud seed under
//! `/nocloud/{name}/{meta-data,user-data,vendor-data,network-config}` (the first machine's
//! cloud-init configuration, from a directory) and a [`MissingFiles`] hook that fills a file
//! not found in the directory before it is served (the imageserver's pull-through cache).
//!
//! `HEAD` is answered like `GET` without a body; any other method gets 405 with `Allow`.
//! Static files carry `Content-Length`, `Last-Modified`, `ETag` and `Accept-Ranges`, honour
//! `If-None-Match`/`If-Modified-Since` (304) and a single `Range` (206, or 416 when no byte of
//! it is in the file, with `If-Range`). A `Range` naming several ranges gets the whole file with
//! 200 rather than a multipart body, which RFC 9110 allows. Files are streamed in 64 KiB chunks.
//! Directories are never listed (404). Request paths are percent-decoded once; a bad escape,
//! a NUL or control byte, a backslash or a `..` segment is a 400.
//!
//! Connections are bounded by [`HttpLimits`] (see [`limits`]): header, write and total
//! response deadlines, a per-peer and a global connection cap below the file descriptor limit,
//! and small write buffers (hyper's `max_buf_size` of [`MAX_BUF`]), so a slow reader holds
//! about 200 KiB of memory (hyper's queue, a file chunk, the file's read buffer) and never more.
//!
//! Completed asset downloads are not reported as [`BootEvent::FileServed`]: a request for
//! `/assets/vmlinuz` carries nothing that names the machine (the lookup is by MAC only, and the
//! peer's address is not a reliable key), so only the script request is attributed.

mod body;
mod files;
pub mod limits;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ipxe::{boot_script, imaging_script, local_boot_script, ScriptSettings};
use crate::lograte::LogLimit;
use crate::machine::{BootEvent, MacAddr, Machine, MachineLookup};
use crate::provisioning::{
    canonical_peer, valid_token, BootAction, CloudInitFile, NoProvisioning, ProgressReport,
    Provisioning, Refusal, MAX_REPORT_BODY,
};

use body::Body;
pub use files::{parse_range, RangeRequest};
pub use limits::HttpLimits;
use limits::{Admitted, GuardedIo, Registry, Tracked};

/// What the HTTP server serves.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Served under `/boot/`: the iPXE binaries (TFTP root too).
    pub boot_dir: PathBuf,
    /// Served under `/assets/`: kernel, initrd.
    pub assets_dir: PathBuf,
    /// What each machine's script boots.
    pub script: ScriptSettings,
    /// How machines reach this server, e.g. `http://10.77.0.1:8080` (no trailing path).
    pub base_url: String,
}

/// How long in-flight requests may run after shutdown is requested before they are cut.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// hyper's read and write buffer limit per connection: request headers fit easily, and a
/// response keeps at most this much queued besides one file chunk.
pub const MAX_BUF: usize = 64 * 1024;
/// How often the counters of refused, shed and timed-out connections are logged (when they
/// changed): one line instead of one per connection under a flood.
const LIMITS_REPORT_EVERY: Duration = Duration::from_secs(10);
/// What a refused connection is told before it is closed.
const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 5\r\nConnection: close\r\n\r\n";

/// Serves HTTP on `listener` until `shutdown` is cancelled, then stops accepting, lets in-flight
/// requests finish for up to [`DEFAULT_SHUTDOWN_GRACE`], and returns `Ok`. Default
/// [`HttpLimits`].
pub async fn serve(
    listener: TcpListener,
    settings: Arc<HttpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    serve_with_grace(
        listener,
        settings,
        machines,
        shutdown,
        DEFAULT_SHUTDOWN_GRACE,
    )
    .await
}

/// [`serve`] with an explicit shutdown grace period.
pub async fn serve_with_grace(
    listener: TcpListener,
    settings: Arc<HttpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    serve_provisioning(
        listener,
        settings,
        machines,
        Arc::new(NoProvisioning),
        shutdown,
        grace,
        HttpLimits::default(),
    )
    .await
}

/// [`serve_with_grace`] with imaging: scripts, reports and cloud-init files as `provisioning`
/// decides, and the given limits.
pub async fn serve_provisioning(
    listener: TcpListener,
    settings: Arc<HttpSettings>,
    machines: Arc<dyn MachineLookup>,
    provisioning: Arc<dyn Provisioning>,
    shutdown: CancellationToken,
    grace: Duration,
    limits: HttpLimits,
) -> io::Result<()> {
    info!(base_url = %settings.base_url, "HTTP server starting");
    log_largest_file(&settings.assets_dir, &limits).await;
    let site = Site::Netboot {
        settings,
        machines,
        provisioning,
    };
    run(listener, Arc::new(Ctx { site }), shutdown, grace, limits).await
}

/// Logs the total deadline of the largest file under `dir` (not recursive): what the limits
/// mean for the biggest download served.
async fn log_largest_file(dir: &std::path::Path, limits: &HttpLimits) {
    let dir = dir.to_path_buf();
    let largest = tokio::task::spawn_blocking(move || {
        std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let meta = e.metadata().ok()?;
                    meta.is_file()
                        .then(|| (meta.len(), e.file_name().to_string_lossy().into_owned()))
                })
                .max()
        })
    })
    .await
    .ok()
    .flatten();
    if let Some((len, name)) = largest {
        info!(
            file = %name,
            bytes = len,
            deadline_s = limits.response_deadline(len).as_secs(),
            min_rate = limits.min_rate,
            "largest file: its download must finish within the deadline"
        );
    }
}

/// Serves the regular files under `dir` (`GET`/`HEAD /{path}`) until `shutdown`, with the same
/// headers, ranges, confinement and shutdown behaviour as `/assets/`, and default limits.
pub async fn serve_files(
    listener: TcpListener,
    dir: PathBuf,
    shutdown: CancellationToken,
    grace: Duration,
) -> io::Result<()> {
    serve_file_server(
        listener,
        FileServer {
            dir,
            seed_dir: None,
            missing: None,
        },
        shutdown,
        grace,
        HttpLimits::default(),
    )
    .await
}

/// What [`serve_file_server`] serves.
#[derive(Clone)]
pub struct FileServer {
    /// Every other path is a regular file under this directory.
    pub dir: PathBuf,
    /// `/nocloud/{name}/{file}` is `{seed_dir}/{name}/{file}`, for `file` one of the names
    /// cloud-init's NoCloud asks for ([`SEED_FILES`]). A missing `vendor-data` is answered
    /// empty (200) rather than 404: cloud-init 22.4 retries a 404 ten times, one second apart,
    /// before going on without it. The others are 404 when missing.
    pub seed_dir: Option<PathBuf>,
    /// Asked to put a file into `dir` when a request names one that is not there.
    pub missing: Option<Arc<dyn MissingFiles>>,
}

/// The file names served under `/nocloud/{name}/`.
pub const SEED_FILES: [&str; 4] = ["meta-data", "user-data", "vendor-data", "network-config"];

/// Why a [`MissingFiles`] hook could not provide a file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The source does not have it either: 404.
    #[error("not found upstream")]
    NotFound,
    /// The path cannot be a file of the directory (e.g. a hidden name): 404.
    #[error("{0}")]
    Refused(String),
    /// Fetching or checking it failed: 502.
    #[error("{0}")]
    Failed(String),
}

/// The future a [`MissingFiles`] hook returns.
pub type FillFuture<'a> = Pin<Box<dyn Future<Output = Result<(), FillError>> + Send + 'a>>;

/// Fills a file that a request names and the served directory does not have.
pub trait MissingFiles: Send + Sync {
    /// Makes the regular file `rel` (percent-decoded, relative, without `..` or control
    /// characters) exist under the served directory, or says why it cannot. The file is then
    /// served from the directory as any other.
    fn fill<'a>(&'a self, rel: &'a str) -> FillFuture<'a>;
}

/// [`serve_files`] with a NoCloud seed, a hook for missing files and the given limits.
pub async fn serve_file_server(
    listener: TcpListener,
    server: FileServer,
    shutdown: CancellationToken,
    grace: Duration,
    limits: HttpLimits,
) -> io::Result<()> {
    info!(
        dir = %server.dir.display(),
        seed_dir = server.seed_dir.as_ref().map(|d| tracing::field::display(d.display())),
        fills_missing = server.missing.is_some(),
        "file server starting"
    );
    log_largest_file(&server.dir, &limits).await;
    let site = Site::Files(server);
    run(listener, Arc::new(Ctx { site }), shutdown, grace, limits).await
}

async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    grace: Duration,
    limits: HttpLimits,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let nofile = limits::nofile_limit();
    let cap = limits.connection_cap(nofile);
    if cap < limits.max_connections {
        warn!(
            max_connections = limits.max_connections,
            nofile, cap, "HTTP connection cap lowered to fit the file descriptor limit"
        );
    }
    info!(
        %local,
        max_connections = cap,
        max_connections_per_peer = limits.max_connections_per_peer,
        header_timeout_s = limits.header_timeout.as_secs_f64(),
        write_timeout_s = limits.write_timeout.as_secs_f64(),
        min_rate = limits.min_rate,
        response_slack_s = limits.response_slack.as_secs_f64(),
        "HTTP server listening"
    );
    let registry = Registry::new(limits, cap);
    let mut conns = JoinSet::new();

    loop {
        while conns.try_join_next().is_some() {}
        report_limits(&registry);
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the listener stays usable.
                warn!(error = %e, "HTTP accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let admitted = match registry.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(why) => {
                debug!(%peer, reason = ?why, "HTTP connection refused");
                // Best effort, never waits: the socket's send buffer is empty.
                let _ = stream.try_write(BUSY_RESPONSE);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let registry = registry.clone();
        conns.spawn(async move {
            connection(stream, peer, ctx, shutdown, registry, admitted).await;
        });
    }
    drop(listener);

    while conns.try_join_next().is_some() {}
    if !conns.is_empty() {
        info!(
            connections = conns.len(),
            "HTTP server draining connections"
        );
    }
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            connections = conns.len(),
            grace_ms = grace.as_millis() as u64,
            "HTTP connections still busy after the grace period; closing them"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    info!(%local, "HTTP server stopped");
    Ok(())
}

/// Logs what the limits did since the last report (refused, shed and timed-out connections),
/// at most every [`LIMITS_REPORT_EVERY`].
fn report_limits(registry: &Registry) {
    if let Some([per_peer, full, shed, timed_out]) = registry.report_due(LIMITS_REPORT_EVERY) {
        warn!(
            refused_per_peer_cap = per_peer,
            refused_server_full = full,
            shed_idle_or_stalled = shed,
            timed_out,
            "HTTP connection limits applied"
        );
    }
}

struct Ctx {
    site: Site,
}

enum Site {
    Netboot {
        settings: Arc<HttpSettings>,
        machines: Arc<dyn MachineLookup>,
        provisioning: Arc<dyn Provisioning>,
    },
    Files(FileServer),
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
    registry: Arc<Registry>,
    admitted: Admitted,
) {
    let state = admitted.state.clone();
    let svc = {
        let registry = registry.clone();
        let state = state.clone();
        service_fn(move |req| {
            let ctx = ctx.clone();
            let registry = registry.clone();
            let state = state.clone();
            async move {
                registry.request_started(&state);
                let response = handle(&ctx, peer, req).await;
                let len = hyper::body::Body::size_hint(response.body())
                    .upper()
                    .unwrap_or(0);
                registry.response_started(&state, len);
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, state)))
            }
        })
    };
    let limits = registry.limits();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF);
    let io = GuardedIo::new(stream, registry.clone(), state.clone());
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = admitted.shed.cancelled() => {
            debug!(%peer, "HTTP connection closed to make room");
            return;
        }
        _ = shutdown.cancelled() => {
            // Finish the request in flight (if any), then close; idle connections close now.
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn => r,
                _ = admitted.shed.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            state.mark_timed_out();
        }
        registry.count_timeout(&state);
        debug!(%peer, error = %e, "HTTP connection ended with an error");
    }
}

/// Facts about one request, gathered for its log line.
#[derive(Default)]
pub(crate) struct Outcome {
    machine: Option<String>,
    mac: Option<String>,
    /// Body bytes the response carries.
    bytes: u64,
    /// Why an error status was chosen.
    note: Option<String>,
    /// A refused credential: logged as a warning.
    refused: bool,
}

/// The request path as logged: the token of a `/nocloud/` path is replaced, and a path
/// longer than [`LOGGED_PATH_MAX`] is cut there (its length is said).
fn loggable_path(path: &str) -> String {
    let path = match path.strip_prefix("/nocloud/") {
        Some(rest) => match rest.split_once('/') {
            Some((_, file)) => format!("/nocloud/<token>/{file}"),
            None => "/nocloud/<token>".to_string(),
        },
        None => path.to_string(),
    };
    if path.len() <= LOGGED_PATH_MAX {
        return path;
    }
    let mut end = LOGGED_PATH_MAX;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &path[..end], path.len())
}

/// Longest request path written to the log as is.
const LOGGED_PATH_MAX: usize = 256;

/// Budgets of the per-request log lines (see [`crate::lograte`]): refused credentials, server
/// errors and the rest.
static REFUSED_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("http refused", 5, 50));
static ERROR_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("http error", 5, 50));
static REQUEST_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("http request", 20, 200));

async fn handle(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let mut outcome = Outcome::default();
    let method = req.method().clone();
    let raw_path = match &ctx.site {
        Site::Netboot { .. } => loggable_path(req.uri().path()),
        // The bootstrap seed's `/nocloud/{name}/` is a machine name, not a token.
        Site::Files(_) => req.uri().path().to_string(),
    };
    let response = match &ctx.site {
        Site::Netboot {
            settings,
            machines,
            provisioning,
        } => {
            let site = NetbootSite {
                settings,
                machines: machines.as_ref(),
                provisioning: provisioning.as_ref(),
            };
            site.route(req, canonical_peer(peer.ip()), &mut outcome)
                .await
        }
        Site::Files(server) => files_route(server, &req, &mut outcome).await,
    };
    let status = response.status();
    if outcome.bytes == 0 && method != Method::HEAD {
        outcome.bytes = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    let bytes = if method == Method::HEAD {
        0
    } else {
        outcome.bytes
    };
    let note = outcome.note.as_deref();
    // Display, not Debug: `machine=node2` like the agent's own records.
    let machine = outcome.machine.as_deref().map(tracing::field::display);
    let mac = outcome.mac.as_deref().map(tracing::field::display);
    let status = status.as_u16();
    if outcome.refused {
        if REFUSED_LOG.allow() {
            warn!(%peer, %method, path = %raw_path, status, machine, mac, reason = note, "HTTP request refused");
        }
    } else if status >= 500 {
        if ERROR_LOG.allow() {
            warn!(%peer, %method, path = %raw_path, status, bytes, machine, mac, error = note, "HTTP request");
        }
    } else if REQUEST_LOG.allow() {
        info!(%peer, %method, path = %raw_path, status, bytes, machine, mac, reason = note, "HTTP request");
    }
    response
}

/// `GET`/`HEAD` only: `Some(head)`, `None` for other methods (405).
fn get_or_head(method: &Method) -> Option<bool> {
    match *method {
        Method::GET => Some(false),
        Method::HEAD => Some(true),
        _ => None,
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// A plain directory (`serve_files`), its seed and its missing-file hook.
async fn files_route(
    server: &FileServer,
    req: &Request<Incoming>,
    outcome: &mut Outcome,
) -> Response<Body> {
    let Some(head) = get_or_head(req.method()) else {
        return not_allowed("GET, HEAD");
    };
    let rest = req.uri().path().trim_start_matches('/');
    let rel = match decode_path(rest) {
        Ok(rel) => rel,
        Err(why) => {
            outcome.note = Some(why.to_string());
            return plain(StatusCode::BAD_REQUEST, why);
        }
    };
    if rel.is_empty() || rel.ends_with('/') {
        // A directory: never listed.
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    if let (Some(seed_dir), Some(seed_rel)) = (&server.seed_dir, rel.strip_prefix("nocloud/")) {
        return seed_file(seed_dir, seed_rel, head, req.headers(), outcome).await;
    }
    if let Some(missing) = &server.missing {
        if rel.split('/').any(|segment| segment.starts_with('.')) {
            // Hidden names are the cache's files being downloaded: never served or fetched.
            outcome.note = Some("hidden name".into());
            return plain(StatusCode::NOT_FOUND, "not found");
        }
        if files::is_missing(&server.dir, &rel).await {
            match missing.fill(&rel).await {
                Ok(()) => {}
                Err(e @ (FillError::NotFound | FillError::Refused(_))) => {
                    outcome.note = Some(e.to_string());
                    return plain(StatusCode::NOT_FOUND, "not found");
                }
                Err(FillError::Failed(why)) => {
                    outcome.note = Some(why);
                    return plain(StatusCode::BAD_GATEWAY, "cannot fetch the file upstream");
                }
            }
        }
    }
    files::serve_file(&server.dir, &rel, head, req.headers(), outcome).await
}

/// `/nocloud/{name}/{file}` of the bootstrap seed.
async fn seed_file(
    seed_dir: &std::path::Path,
    seed_rel: &str,
    head: bool,
    headers: &hyper::HeaderMap,
    outcome: &mut Outcome,
) -> Response<Body> {
    let Some((name, file)) = seed_rel.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if name.is_empty() || name.starts_with('.') || !SEED_FILES.contains(&file) {
        outcome.note = Some("not a NoCloud seed file".into());
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    outcome.machine = Some(name.to_string());
    outcome.note = Some(format!("NoCloud seed {file}"));
    if file == "vendor-data" && files::is_missing(seed_dir, seed_rel).await {
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, 0)
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::Empty)
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"));
    }
    let mut response = files::serve_file(seed_dir, seed_rel, head, headers, outcome).await;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

struct NetbootSite<'a> {
    settings: &'a HttpSettings,
    machines: &'a dyn MachineLookup,
    provisioning: &'a dyn Provisioning,
}

/// `Retry-After` (seconds) of a 503 for a document that cannot be made now.
const UNAVAILABLE_RETRY_AFTER: &str = "5";

/// How long a client may take to send a report body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl NetbootSite<'_> {
    async fn route(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        if let Some(rest) = path.strip_prefix("/report/") {
            return self.report(rest, req, peer, outcome).await;
        }
        if let Some(rest) = path.strip_prefix("/nocloud/") {
            return self.cloud_init(rest, &req, peer, outcome).await;
        }
        let (kind, rest) = if let Some(rest) = path.strip_prefix("/ipxe/") {
            (Route::Script, rest)
        } else if let Some(rest) = path.strip_prefix("/boot/") {
            (Route::Boot, rest)
        } else if let Some(rest) = path.strip_prefix("/assets/") {
            (Route::Assets, rest)
        } else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };

        let Some(head) = get_or_head(req.method()) else {
            return not_allowed("GET, HEAD");
        };

        let rel = match decode_path(rest) {
            Ok(rel) => rel,
            Err(why) => {
                outcome.note = Some(why.to_string());
                return plain(StatusCode::BAD_REQUEST, why);
            }
        };

        if kind != Route::Script && (rel.is_empty() || rel.ends_with('/')) {
            // A directory: never listed.
            return plain(StatusCode::NOT_FOUND, "not found");
        }

        match kind {
            Route::Script => self.script(&rel, peer, head, outcome),
            Route::Boot => {
                files::serve_file(&self.settings.boot_dir, &rel, head, req.headers(), outcome).await
            }
            Route::Assets => {
                files::serve_file(
                    &self.settings.assets_dir,
                    &rel,
                    head,
                    req.headers(),
                    outcome,
                )
                .await
            }
        }
    }

    /// The machine named by the MAC in a (decoded) path, or the error response.
    fn machine(&self, rel: &str, outcome: &mut Outcome) -> Result<Machine, Box<Response<Body>>> {
        let mac: MacAddr = match rel.parse() {
            Ok(mac) => mac,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return Err(Box::new(plain(
                    StatusCode::BAD_REQUEST,
                    "invalid MAC address",
                )));
            }
        };
        outcome.mac = Some(mac.to_string());
        let Some(machine) = self.machines.by_mac(&mac) else {
            outcome.note = Some("unknown machine".into());
            return Err(Box::new(plain(StatusCode::NOT_FOUND, "unknown machine")));
        };
        outcome.machine = Some(machine.name.clone());
        Ok(machine)
    }

    fn script(&self, rel: &str, peer: IpAddr, head: bool, outcome: &mut Outcome) -> Response<Body> {
        let machine = match self.machine(rel, outcome) {
            Ok(m) => m,
            Err(r) => return *r,
        };
        let settings = self.settings;
        let action = match self.provisioning.boot_action(&machine, peer, head) {
            Ok(action) => action,
            Err(refusal) => return refused(refusal, outcome),
        };
        let rendered = match &action {
            BootAction::Configured => boot_script(&machine, &settings.base_url, &settings.script),
            BootAction::Image(orders) => {
                imaging_script(&machine, &settings.base_url, &settings.script, orders)
            }
            BootAction::LocalDisk(method) => local_boot_script(&machine, *method),
        };
        let text = match rendered {
            Ok(text) => text,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot render boot script",
                );
            }
        };
        if !head {
            self.machines.observe(&machine, BootEvent::IpxeScriptServed);
        }
        outcome.note = Some(
            match action {
                BootAction::Configured => "boot script",
                BootAction::Image(_) => "imaging script",
                BootAction::LocalDisk(_) => "local boot script",
            }
            .to_string(),
        );
        let len = text.len();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, len)
            .header(header::CACHE_CONTROL, "no-store")
            .body(if head { Body::Empty } else { Body::text(text) })
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
    }

    async fn report(
        &self,
        rel: &str,
        req: Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        if req.method() != Method::POST {
            return not_allowed("POST");
        }
        let rel = match decode_path(rel) {
            Ok(rel) => rel,
            Err(why) => {
                outcome.note = Some(why.to_string());
                return plain(StatusCode::BAD_REQUEST, why);
            }
        };
        let machine = match self.machine(&rel, outcome) {
            Ok(m) => m,
            Err(r) => return *r,
        };
        let Some(token) = bearer_token(req.headers()) else {
            outcome.note = Some("no bearer token".into());
            outcome.refused = true;
            let mut r = plain(StatusCode::UNAUTHORIZED, "bearer token required");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        };
        let declared: Option<u64> = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if declared.is_some_and(|len| len > MAX_REPORT_BODY as u64) {
            outcome.note = Some("report body too large".into());
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
        }
        let limited = http_body_util::Limited::new(req.into_body(), MAX_REPORT_BODY);
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                outcome.note = Some("report body too large".into());
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
            }
            Ok(Err(e)) => {
                outcome.note = Some(format!("cannot read the report body: {e}"));
                return plain(StatusCode::BAD_REQUEST, "cannot read the report body");
            }
            Err(_) => {
                outcome.note = Some("report body not sent in time".into());
                return plain(StatusCode::REQUEST_TIMEOUT, "report body not sent in time");
            }
        };
        let report = match ProgressReport::parse(&body) {
            Ok(report) => report,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return plain(StatusCode::BAD_REQUEST, "malformed report");
            }
        };
        match self.provisioning.report(&machine, peer, &token, report) {
            Ok(()) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::Empty)
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error")),
            Err(refusal) => refused(refusal, outcome),
        }
    }

    async fn cloud_init(
        &self,
        rest: &str,
        req: &Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        if req.method() != Method::GET {
            // Not even HEAD: a HEAD of user-data must not count as its one fetch, nor answer
            // differently from the GET that follows.
            return not_allowed("GET");
        }
        let Some((token, name)) = rest.split_once('/') else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        let Some(file) = CloudInitFile::from_name(name) else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        if !valid_token(token) {
            outcome.note = Some("malformed token".into());
            outcome.refused = true;
            return plain(StatusCode::FORBIDDEN, "forbidden");
        }
        match self.provisioning.cloud_init(peer, token, file).await {
            Ok(doc) => {
                outcome.machine = Some(doc.machine);
                outcome.note = Some(format!("cloud-init {}", file.name()));
                let len = doc.text.len();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .header(header::CONTENT_LENGTH, len)
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(Body::text(doc.text))
                    .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
            }
            Err(refusal) => refused(refusal, outcome),
        }
    }
}

/// The response to a refused report or cloud-init request; credential failures are logged as
/// warnings (without the token).
fn refused(refusal: Refusal, outcome: &mut Outcome) -> Response<Body> {
    outcome.note = Some(refusal.to_string());
    let status = match &refusal {
        Refusal::NotEnabled | Refusal::UnknownMachine => StatusCode::NOT_FOUND,
        Refusal::NoDocument { machine } => {
            outcome.machine = Some(machine.clone());
            StatusCode::NOT_FOUND
        }
        Refusal::WrongToken { machine } => {
            if let Some(m) = machine {
                outcome.machine = Some(m.clone());
            }
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
        Refusal::Replayed { machine } => {
            outcome.machine = Some(machine.clone());
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
        Refusal::WrongPhase { machine, .. } => {
            outcome.machine = Some(machine.clone());
            StatusCode::CONFLICT
        }
        Refusal::Unavailable { machine, .. } => {
            outcome.machine = Some(machine.clone());
            StatusCode::SERVICE_UNAVAILABLE
        }
        Refusal::WrongPeer { machine, .. } | Refusal::NoRecentLease { machine, .. } => {
            outcome.machine = Some(machine.clone());
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
    };
    let text = refusal
        .public_reason()
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("refused"));
    let mut response = plain(status, text);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // cloud-init retries a failed fetch of its seed; a short hint for other clients.
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(UNAVAILABLE_RETRY_AFTER),
        );
    }
    response
}

/// The token of `Authorization: Bearer {token}` (scheme case-insensitive, RFC 9110 §11.1).
fn bearer_token(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

#[derive(PartialEq, Eq)]
enum Route {
    Script,
    Boot,
    Assets,
}

/// A short `text/plain` response with an explicit length.
pub(crate) fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let body = format!("{text}\n");
    let mut r = Response::new(Body::Empty);
    *r.status_mut() = status;
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    *r.body_mut() = Body::text(body);
    r
}

/// Percent-decodes a request path (after the route prefix) and rejects what no served file can
/// be called: bad escapes, non-UTF-8, NUL and control bytes, backslashes and `..` segments.
pub fn decode_path(raw: &str) -> Result<String, &'static str> {
    // percent_decode_str leaves a `%` without two hex digits as it is: such a path is refused.
    let bytes = raw.as_bytes();
    let bad_escape = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return Err("bad percent-encoding");
    }
    let s = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "path is not UTF-8")?;
    if s.chars().any(char::is_control) {
        return Err("control character in path");
    }
    if s.contains('\\') {
        return Err("backslash in path");
    }
    if s.split('/').any(|seg| seg == "..") {
        return Err("'..' in path");
    }
    Ok(s.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_paths() {
        assert_eq!(decode_path("vmlinuz"), Ok("vmlinuz".into()));
        assert_eq!(decode_path("a%20b/c%2Fd"), Ok("a b/c/d".into()));
        assert_eq!(decode_path("52%3A54"), Ok("52:54".into()));
        assert_eq!(decode_path("caf%C3%A9"), Ok("caf\u{e9}".into()));
        for bad in [
            "%", "%2", "%zz", "%+1", "a%00b", "%0a", "%ff", "..", "a/../b", "%2e%2e/x", "a\\b",
            "a%5Cb",
        ] {
            assert!(decode_path(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(decode_path("a..b/..c"), Ok("a..b/..c".into()));
    }

    #[test]
    fn logged_paths_hide_tokens_and_are_cut() {
        assert_eq!(
            loggable_path("/nocloud/0123456789abcdef0123/user-data"),
            "/nocloud/<token>/user-data"
        );
        assert_eq!(loggable_path("/assets/vmlinuz"), "/assets/vmlinuz");
        let long = format!("/assets/{}", "é".repeat(3000));
        let logged = loggable_path(&long);
        assert!(logged.len() < LOGGED_PATH_MAX + 32, "{}", logged.len());
        assert!(
            logged.ends_with(&format!("… ({} bytes)", long.len())),
            "{logged}"
        );
        assert!(long.starts_with(logged.trim_end_matches(|c| c != '…').trim_end_matches('…')));
    }
}
