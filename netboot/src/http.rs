//! The HTTP server: per-machine iPXE scripts, iPXE binaries and boot assets.
//!
//! | route | answer |
//! |---|---|
//! | `GET /ipxe/{mac}` | the machine's iPXE script (`52-54-00-12-34-56` or `52:54:00:12:34:56`); 400 for a malformed MAC, 404 for a machine we do not know |
//! | `GET /boot/{file}` | a file from [`HttpSettings::boot_dir`] (iPXE binaries, for UEFI HTTP Boot) |
//! | `GET /assets/{path}` | a file from [`HttpSettings::assets_dir`] (kernel, initrd) |
//!
//! `HEAD` is answered like `GET` without a body; any other method gets 405 with `Allow`.
//! Static files carry `Content-Length`, `Last-Modified`, `ETag` and `Accept-Ranges`, honour
//! `If-None-Match`/`If-Modified-Since` (304) and a single `Range` (206, or 416 when no byte of
//! it is in the file, with `If-Range`). A `Range` naming several ranges gets the whole file with
//! 200 rather than a multipart body, which RFC 9110 allows. Files are streamed in 64 KiB chunks.
//! Directories are never listed (404). Request paths are percent-decoded once; a bad escape,
//! a NUL or control byte, a backslash or a `..` segment is a 400.
//!
//! Completed asset downloads are not reported as [`BootEvent::FileServed`]: a request for
//! `/assets/vmlinuz` carries nothing that names the machine (the lookup is by MAC only, and the
//! peer's address is not a reliable key), so only the script request is attributed.

mod body;
mod files;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::ipxe::{boot_script, ScriptSettings};
use crate::machine::{BootEvent, MacAddr, MachineLookup};

use body::Body;

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
/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; further clients wait in the listen backlog.
const MAX_CONNECTIONS: usize = 512;

/// Serves HTTP on `listener` until `shutdown` is cancelled, then stops accepting, lets in-flight
/// requests finish for up to [`DEFAULT_SHUTDOWN_GRACE`], and returns `Ok`.
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
    let local = listener.local_addr()?;
    info!(%local, base_url = %settings.base_url, "HTTP server listening");
    let ctx = Arc::new(Ctx { settings, machines });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();

    loop {
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let _ = stream.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            connection(stream, peer, ctx, shutdown).await;
            drop(permit);
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

struct Ctx {
    settings: Arc<HttpSettings>,
    machines: Arc<dyn MachineLookup>,
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, peer, req).await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.cancelled() => {
            // Finish the request in flight (if any), then close; idle connections close now.
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
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
}

async fn handle(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let mut outcome = Outcome::default();
    let method = req.method().clone();
    let raw_path = req.uri().path().to_string();
    let response = route(ctx, &req, &mut outcome).await;
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
    if status >= 500 {
        warn!(%peer, %method, path = %raw_path, status, bytes, machine, mac, error = note, "HTTP request");
    } else {
        info!(%peer, %method, path = %raw_path, status, bytes, machine, mac, reason = note, "HTTP request");
    }
    response
}

async fn route(ctx: &Ctx, req: &Request<Incoming>, outcome: &mut Outcome) -> Response<Body> {
    let path = req.uri().path();
    let (kind, rest) = if let Some(rest) = path.strip_prefix("/ipxe/") {
        (Route::Script, rest)
    } else if let Some(rest) = path.strip_prefix("/boot/") {
        (Route::Boot, rest)
    } else if let Some(rest) = path.strip_prefix("/assets/") {
        (Route::Assets, rest)
    } else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };

    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
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
        Route::Script => script(ctx, &rel, head, outcome),
        Route::Boot => {
            files::serve_file(&ctx.settings.boot_dir, &rel, head, req.headers(), outcome).await
        }
        Route::Assets => {
            files::serve_file(&ctx.settings.assets_dir, &rel, head, req.headers(), outcome).await
        }
    }
}

#[derive(PartialEq, Eq)]
enum Route {
    Script,
    Boot,
    Assets,
}

fn script(ctx: &Ctx, rel: &str, head: bool, outcome: &mut Outcome) -> Response<Body> {
    let mac: MacAddr = match rel.parse() {
        Ok(mac) => mac,
        Err(e) => {
            outcome.note = Some(e.to_string());
            return plain(StatusCode::BAD_REQUEST, "invalid MAC address");
        }
    };
    outcome.mac = Some(mac.to_string());
    let Some(machine) = ctx.machines.by_mac(&mac) else {
        outcome.note = Some("unknown machine".into());
        return plain(StatusCode::NOT_FOUND, "unknown machine");
    };
    outcome.machine = Some(machine.name.clone());
    let text = match boot_script(&machine, &ctx.settings.base_url, &ctx.settings.script) {
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
        ctx.machines.observe(&machine, BootEvent::IpxeScriptServed);
    }
    let len = text.len();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, len)
        .header(header::CACHE_CONTROL, "no-store")
        .body(if head { Body::Empty } else { Body::text(text) })
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
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
fn decode_path(raw: &str) -> Result<String, &'static str> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or("bad percent-encoding")?;
            let hex = std::str::from_utf8(hex).map_err(|_| "bad percent-encoding")?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("bad percent-encoding");
            }
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad percent-encoding")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| "path is not UTF-8")?;
    if s.chars().any(char::is_control) {
        return Err("control character in path");
    }
    if s.contains('\\') {
        return Err("backslash in path");
    }
    if s.split('/').any(|seg| seg == "..") {
        return Err("'..' in path");
    }
    Ok(s)
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
}
