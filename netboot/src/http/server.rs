//! The connection server: the accept loop with its limits, graceful shutdown, and one log line
//! per request. What a request is answered with is the [`Site`]'s business.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};

use hyper::body::Incoming;
use hyper::header;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::body::Body;
use super::fast::{self, Replay};
use super::limits::{self, Admitted, GuardedIo, HttpLimits, Registry, Tracked};
use crate::lograte::LogLimit;

/// The target of the server's log lines (`RUST_LOG=netboot::http=debug` selects them), also
/// for a site's own lines that belong with them, such as its start-up line.
pub const LOG_TARGET: &str = "netboot::http";

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

/// What the server answers requests with: netboot's routes
/// ([`NetbootSite`](super::NetbootSite)), a plain directory ([`DirSite`](super::DirSite)), or a
/// site of another crate built from the same pieces.
///
/// `handle` returns `impl Future + Send` so that implementations are plain `async fn`s (no
/// boxing, no lifetimes to spell); the price is that the trait is not object-safe and
/// [`serve`](super::serve) is generic over the site, which costs nothing here: a listener
/// serves one site, known where `serve` is called.
pub trait Site: Send + Sync + 'static {
    /// Answers one request from `peer`, noting in `outcome` what its log line should say.
    fn handle(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = Response<Body>> + Send;

    /// Answers a `GET` or `HEAD` without a body before hyper sees it, when it asks for a static
    /// file: the server then writes the response itself and sends a file body with
    /// `sendfile(2)`. `None` (the default) leaves the request to [`Site::handle`] through hyper.
    /// An answer must be what `handle` would give; a site answers here the routes that are
    /// files (their errors too), and leaves everything else to `handle`.
    fn static_file(
        &self,
        peer: SocketAddr,
        req: &Request<()>,
        outcome: &mut Outcome,
    ) -> impl Future<Output = Option<Response<Body>>> + Send {
        let _ = (peer, req, outcome);
        async { None }
    }

    /// Logs what the site serves, once, before the server listens.
    fn announce(&self);

    /// A directory whose largest file (not recursive) is logged at start against the total
    /// response deadline: what the limits mean for the biggest download served.
    fn largest_file_dir(&self) -> Option<&Path> {
        None
    }

    /// The request path as its log line shows it; as sent, unless the site hides or cuts
    /// something.
    fn logged_path(&self, path: &str) -> String {
        path.to_string()
    }
}

/// How [`serve`](super::serve) runs: the shutdown grace and the connection limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// How long requests in flight may run after shutdown was requested.
    pub grace: Duration,
    /// Connection caps and deadlines.
    pub limits: HttpLimits,
}

impl Default for ServeOptions {
    /// [`DEFAULT_SHUTDOWN_GRACE`] and the default [`HttpLimits`].
    fn default() -> Self {
        ServeOptions {
            grace: DEFAULT_SHUTDOWN_GRACE,
            limits: HttpLimits::default(),
        }
    }
}

/// Facts about one request, gathered by the site for the request's log line.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The machine the request is about.
    pub machine: Option<String>,
    /// The MAC address the request named.
    pub mac: Option<String>,
    /// Body bytes the response carries (when 0, the response's `Content-Length`).
    pub bytes: u64,
    /// Why an error status was chosen, or what was served.
    pub note: Option<String>,
    /// A refused credential: logged as a warning.
    pub refused: bool,
}

/// Logs the total deadline of the largest file under `dir` (not recursive): what the limits
/// mean for the biggest download served.
pub(crate) async fn log_largest_file(dir: &Path, limits: &HttpLimits) {
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
            target: LOG_TARGET,
            file = %name,
            bytes = len,
            deadline_s = limits.response_deadline(len).as_secs(),
            min_rate = limits.min_rate,
            "largest file: its download must finish within the deadline"
        );
    }
}

/// Accepts connections on `listener` and serves `site` on them until `shutdown` is cancelled,
/// then stops accepting, lets in-flight requests finish for up to the options' grace, and
/// returns `Ok`.
pub(crate) async fn run<S: Site>(
    listener: TcpListener,
    site: Arc<S>,
    options: ServeOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let ServeOptions { grace, limits } = options;
    let local = listener.local_addr()?;
    let nofile = limits::nofile_limit();
    let cap = limits.connection_cap(nofile);
    if cap < limits.max_connections {
        warn!(
            target: LOG_TARGET,
            max_connections = limits.max_connections,
            nofile, cap, "HTTP connection cap lowered to fit the file descriptor limit"
        );
    }
    info!(
        target: LOG_TARGET,
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
                warn!(target: LOG_TARGET, error = %e, "HTTP accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        // While the table is full of connections that may not be closed yet, this holds the
        // accept loop: the next clients wait in the listen backlog, in order.
        let admitted = match registry.wait_for_place(peer.ip(), &shutdown).await {
            Ok(admitted) => admitted,
            Err(why) => {
                debug!(target: LOG_TARGET, %peer, reason = ?why, "HTTP connection refused");
                // Best effort, never waits: the socket's send buffer is empty.
                let _ = stream.try_write(BUSY_RESPONSE);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let site = site.clone();
        let shutdown = shutdown.clone();
        let registry = registry.clone();
        conns.spawn(async move {
            connection(stream, peer, site, shutdown, registry, admitted).await;
        });
    }
    drop(listener);

    while conns.try_join_next().is_some() {}
    if !conns.is_empty() {
        info!(
            target: LOG_TARGET,
            connections = conns.len(),
            "HTTP server draining connections"
        );
    }
    let drained =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(
            target: LOG_TARGET,
            connections = conns.len(),
            grace_ms = grace.as_millis() as u64,
            "HTTP connections still busy after the grace period; closing them"
        );
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    info!(target: LOG_TARGET, %local, "HTTP server stopped");
    Ok(())
}

/// Logs what the limits did since the last report (refused, shed and timed-out connections),
/// at most every [`LIMITS_REPORT_EVERY`].
fn report_limits(registry: &Registry) {
    if let Some([per_peer, full, shed, timed_out]) = registry.report_due(LIMITS_REPORT_EVERY) {
        warn!(
            target: LOG_TARGET,
            refused_per_peer_cap = per_peer,
            refused_server_full = full,
            shed_idle_or_stalled = shed,
            timed_out,
            "HTTP connection limits applied"
        );
    }
}

/// One connection: each request head is read here ([`fast::next_request`]); a static file
/// ([`Site::static_file`]) is answered here with `sendfile(2)`, any other request is handed to
/// hyper with the bytes already read, and the connection comes back after its response.
async fn connection<S: Site>(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    site: Arc<S>,
    shutdown: CancellationToken,
    registry: Arc<Registry>,
    admitted: Admitted,
) {
    let state = admitted.state.clone();
    let mut stream = stream;
    let mut buf = BytesMut::new();
    loop {
        // Waiting for a request: idle, so it may be shed; shutdown closes it now.
        let next = tokio::select! {
            biased;
            _ = admitted.shed.cancelled() => {
                debug!(target: LOG_TARGET, %peer, "HTTP connection closed to make room");
                return;
            }
            _ = shutdown.cancelled() => return,
            next = fast::next_request(&mut stream, &mut buf, &registry) => next,
        };
        let head = match next {
            fast::Next::Request(head) => head,
            fast::Next::Hyper => {
                let replay = Replay {
                    stream,
                    buf,
                    limit: None,
                };
                by_hyper(replay, peer, &site, &shutdown, &registry, &admitted).await;
                return;
            }
            fast::Next::Closed => return,
            fast::Next::TimedOut => {
                state.mark_timed_out();
                registry.count_timeout(&state);
                debug!(target: LOG_TARGET, %peer, "HTTP connection closed: no request within the header deadline");
                return;
            }
            fast::Next::Failed(e) => {
                debug!(target: LOG_TARGET, %peer, error = %e, "HTTP connection ended with an error");
                return;
            }
        };
        if head.is_plain_read() {
            let served = tokio::select! {
                biased;
                _ = admitted.shed.cancelled() => {
                    debug!(target: LOG_TARGET, %peer, "HTTP connection closed to make room");
                    return;
                }
                served = static_file(&stream, &head, peer, site.as_ref(), &shutdown, &registry, &state) => served,
            };
            match served {
                Some(Ok(keep_alive)) => {
                    buf.advance(head.len);
                    if keep_alive {
                        continue;
                    }
                    return;
                }
                Some(Err(e)) => {
                    registry.count_timeout(&state);
                    debug!(target: LOG_TARGET, %peer, error = %e, "HTTP connection ended with an error");
                    return;
                }
                None => {}
            }
        }
        // Not a static file: hyper answers this request, and only this one when its length
        // is known; a request whose end only hyper can find takes the connection with it.
        let limit = head.wire_len();
        let keep_alive = head.keep_alive;
        let replay = Replay { stream, buf, limit };
        match by_hyper(replay, peer, &site, &shutdown, &registry, &admitted).await {
            Some(replay) if limit.is_some() && keep_alive && replay.request_read() => {
                stream = replay.stream;
                buf = replay.buf;
            }
            _ => return,
        }
    }
}

/// Answers `head` with the site's static file, if it is one: `Some(Ok(keep_alive))` once
/// the response is written, `Some(Err)` when writing it failed (the connection ends), `None`
/// when the site leaves the request to hyper.
async fn static_file<S: Site>(
    stream: &tokio::net::TcpStream,
    head: &fast::Head,
    peer: SocketAddr,
    site: &S,
    shutdown: &CancellationToken,
    registry: &Registry,
    state: &Arc<limits::ConnState>,
) -> Option<io::Result<bool>> {
    let req = &head.request;
    registry.request_started(state);
    let mut outcome = Outcome::default();
    let response = site.static_file(peer, req, &mut outcome).await?;
    let raw_path = site.logged_path(req.uri().path());
    let response = log_request(peer, req.method(), &raw_path, response, outcome);
    let len = hyper::body::Body::size_hint(response.body())
        .upper()
        .unwrap_or(0);
    registry.response_started(state, len);
    // Shutdown requested: this response is the connection's last (hyper's graceful shutdown).
    let keep_alive = head.keep_alive && !shutdown.is_cancelled();
    let head_only = req.method() == Method::HEAD;
    let written = fast::write_response(
        stream,
        response,
        req.version(),
        keep_alive,
        head_only,
        registry,
        state,
    )
    .await;
    registry.request_finished(state);
    Some(written.map(|()| keep_alive))
}

/// What [`by_hyper`]'s wait for hyper ended with.
enum HyperEnd {
    Done(hyper::Result<()>),
    Shed,
}

/// Serves requests from `replay` with hyper: one request when `replay` has a limit (the
/// connection is given back after its response), else to the connection's end. `None` when the
/// connection is finished.
async fn by_hyper<S: Site>(
    replay: Replay,
    peer: SocketAddr,
    site: &Arc<S>,
    shutdown: &CancellationToken,
    registry: &Arc<Registry>,
    admitted: &Admitted,
) -> Option<Replay> {
    let state = admitted.state.clone();
    let one_request = replay.limit.is_some();
    let finished_before = state.finished();
    let svc = {
        let registry = registry.clone();
        let state = state.clone();
        let site = site.clone();
        service_fn(move |req| {
            let site = site.clone();
            let registry = registry.clone();
            let state = state.clone();
            let answer: ResponseFuture = Box::pin(async move {
                registry.request_started(&state);
                let response = handle(site.as_ref(), peer, req).await;
                let len = hyper::body::Body::size_hint(response.body())
                    .upper()
                    .unwrap_or(0);
                registry.response_started(&state, len);
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, state)))
            });
            answer
        })
    };
    let limits = registry.limits();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_BUF);
    let io = GuardedIo::new(replay, registry.clone(), state.clone());
    let mut conn = builder.serve_connection(TokioIo::new(io), svc);
    let mut stopping = false;
    let mut shed = std::pin::pin!(admitted.shed.cancelled());
    let mut shutting_down = std::pin::pin!(shutdown.cancelled());
    let end = std::future::poll_fn(|cx| loop {
        if shed.as_mut().poll(cx).is_ready() {
            return Poll::Ready(HyperEnd::Shed);
        }
        if let Poll::Ready(r) = conn.poll_without_shutdown(cx) {
            return Poll::Ready(HyperEnd::Done(r));
        }
        if stopping {
            return Poll::Pending;
        }
        // The one request answered (hyper now waits for a next one it will never be given),
        // or shutdown requested (the request in flight, if any, is finished, then hyper
        // stops): either way hyper finishes without closing the socket.
        let answered = one_request && state.finished() > finished_before;
        if answered || shutting_down.as_mut().poll(cx).is_ready() {
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            stopping = true;
            continue;
        }
        return Poll::Pending;
    })
    .await;
    match end {
        HyperEnd::Shed => {
            debug!(target: LOG_TARGET, %peer, "HTTP connection closed to make room");
            None
        }
        HyperEnd::Done(Err(e)) => {
            if e.is_timeout() {
                state.mark_timed_out();
            }
            registry.count_timeout(&state);
            debug!(target: LOG_TARGET, %peer, error = %e, "HTTP connection ended with an error");
            None
        }
        HyperEnd::Done(Ok(())) => {
            if shutdown.is_cancelled() || !one_request {
                return None;
            }
            let parts = conn.into_parts();
            // hyper holds bytes it read but did not use: the rest of a body the site did not
            // read. The request's end is then unknown here: the connection ends.
            if !parts.read_buf.is_empty() {
                return None;
            }
            Some(parts.io.into_inner().into_inner())
        }
    }
}

/// The future of hyper's service: boxed, so the connection can be polled in place.
type ResponseFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<Tracked<Body>>, Infallible>> + Send>>;

/// The request path as netboot's routes log it: the token of a `/nocloud/` path is replaced,
/// and a path longer than [`LOGGED_PATH_MAX`] is cut there (its length is said).
pub(crate) fn loggable_path(path: &str) -> String {
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

/// One request: the site's answer, and its log line.
async fn handle<S: Site>(site: &S, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let mut outcome = Outcome::default();
    let method = req.method().clone();
    let raw_path = site.logged_path(req.uri().path());
    let response = site.handle(peer, req, &mut outcome).await;
    log_request(peer, &method, &raw_path, response, outcome)
}

/// Writes the log line of one request (within its budget), whichever path answered it.
fn log_request(
    peer: SocketAddr,
    method: &Method,
    raw_path: &str,
    response: Response<Body>,
    mut outcome: Outcome,
) -> Response<Body> {
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
            warn!(target: LOG_TARGET, %peer, %method, path = %raw_path, status, machine, mac, reason = note, "HTTP request refused");
        }
    } else if status >= 500 {
        if ERROR_LOG.allow() {
            warn!(target: LOG_TARGET, %peer, %method, path = %raw_path, status, bytes, machine, mac, error = note, "HTTP request");
        }
    } else if REQUEST_LOG.allow() {
        info!(target: LOG_TARGET, %peer, %method, path = %raw_path, status, bytes, machine, mac, reason = note, "HTTP request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn serve_options_default_to_the_documented_values() {
        let options = ServeOptions::default();
        assert_eq!(options.grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(options.limits, HttpLimits::default());
    }
}
