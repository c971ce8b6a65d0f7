//! Static files: confinement, validators, conditional requests and single byte ranges; a plain
//! directory as a [`Site`] ([`DirSite`]); and the pieces a site of its own is built from:
//! request paths ([`decode_path`], [`FileRequest`]), methods ([`get_or_head`],
//! [`not_allowed`]), short answers ([`plain`]) and files ([`serve_file`], [`is_missing`]).

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::info;

use super::body::{Body, FileStream};
use super::server::{Outcome, Site, LOG_TARGET};
use crate::path::{open_confined, open_confined_allowing, PathError};

/// A plain directory: `GET`/`HEAD /{path}` is the regular file `{dir}/{path}`, with the
/// validators, ranges and confinement of [`serve_file`]; directories are never listed (404).
#[derive(Debug, Clone)]
pub struct DirSite {
    dir: PathBuf,
}

impl DirSite {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirSite { dir: dir.into() }
    }

    /// The directory served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Answers a request for `file` from the directory.
    pub async fn serve(
        &self,
        file: &FileRequest,
        headers: &HeaderMap,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        serve_file(&self.dir, &file.rel, file.head, headers, outcome).await
    }
}

impl Site for DirSite {
    async fn handle(
        &self,
        _peer: SocketAddr,
        req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        match FileRequest::from_request(&req, outcome) {
            Ok(file) => self.serve(&file, req.headers(), outcome).await,
            Err(response) => *response,
        }
    }

    /// Every request is for a file.
    async fn static_file(
        &self,
        _peer: SocketAddr,
        req: &Request<()>,
        outcome: &mut Outcome,
    ) -> Option<Response<Body>> {
        Some(match FileRequest::from_request(req, outcome) {
            Ok(file) => self.serve(&file, req.headers(), outcome).await,
            Err(response) => *response,
        })
    }

    fn announce(&self) {
        info!(target: LOG_TARGET, dir = %self.dir.display(), "file server starting");
    }

    fn largest_file_dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

/// A request for a file of a directory: `GET` or `HEAD /{rel}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRequest {
    /// The path without its leading `/`, percent-decoded and checked by [`decode_path`]; not
    /// empty, and not ending with `/`.
    pub rel: String,
    /// A `HEAD`: answered without a body.
    pub head: bool,
}

impl FileRequest {
    /// The file `req` asks for, or the answer to a request that cannot name one: 405 (with
    /// `Allow: GET, HEAD`) for another method, 400 for a path [`decode_path`] refuses (the
    /// reason goes to `outcome`), 404 for a directory.
    pub fn from_request<B>(
        req: &Request<B>,
        outcome: &mut Outcome,
    ) -> Result<FileRequest, Box<Response<Body>>> {
        let Some(head) = get_or_head(req.method()) else {
            return Err(Box::new(not_allowed("GET, HEAD")));
        };
        let rest = req.uri().path().trim_start_matches('/');
        let rel = match decode_path(rest) {
            Ok(rel) => rel,
            Err(why) => {
                outcome.note = Some(why.to_string());
                return Err(Box::new(plain(StatusCode::BAD_REQUEST, why)));
            }
        };
        if rel.is_empty() || rel.ends_with('/') {
            // A directory: never listed.
            return Err(Box::new(plain(StatusCode::NOT_FOUND, "not found")));
        }
        Ok(FileRequest { rel, head })
    }
}

/// A short `text/plain` response with an explicit length.
pub fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
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

/// `GET`/`HEAD` only: `Some(head)`, `None` for other methods (405).
pub fn get_or_head(method: &Method) -> Option<bool> {
    match *method {
        Method::GET => Some(false),
        Method::HEAD => Some(true),
        _ => None,
    }
}

/// 405 with `Allow: {allow}`.
pub fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
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

/// What the client asked for, by `Range`.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable `Range` header: the whole file. This includes several ranges in one header,
    /// which we answer with the whole file (allowed by RFC 9110 §14.2) instead of multipart.
    Whole,
    /// Bytes `start..=end`, already clamped to the file.
    Part { start: u64, end: u64 },
    /// No byte of the range is in the file: 416.
    Unsatisfiable,
}

/// Parses one `Range` header value against a file of `len` bytes (RFC 9110 §14.1.2).
/// Syntax we do not understand is ignored, as the RFC asks.
pub fn parse_range(value: &str, len: u64) -> RangeRequest {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Whole;
    };
    if spec.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // Longer than u64: treat as "beyond any file".
        Some(s.parse().unwrap_or(u64::MAX))
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // "-n": the last n bytes.
        (true, false) => match number(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if len == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Part {
                start: len - n.min(len),
                end: len - 1,
            },
            None => RangeRequest::Whole,
        },
        // "a-": from a to the end.
        (false, true) => match number(first) {
            Some(a) if a >= len => RangeRequest::Unsatisfiable,
            Some(a) => RangeRequest::Part {
                start: a,
                end: len - 1,
            },
            None => RangeRequest::Whole,
        },
        (false, false) => match (number(first), number(last)) {
            (Some(a), Some(b)) if a > b => RangeRequest::Whole,
            (Some(a), Some(_)) if a >= len => RangeRequest::Unsatisfiable,
            (Some(a), Some(b)) => RangeRequest::Part {
                start: a,
                end: b.min(len - 1),
            },
            _ => RangeRequest::Whole,
        },
        (true, true) => RangeRequest::Whole,
    }
}

struct Validators {
    etag: String,
    modified: SystemTime,
    last_modified: String,
}

fn validators(meta: &std::fs::Metadata) -> Validators {
    let modified = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(meta.mtime()).unwrap_or(0))
        + Duration::from_nanos(u64::try_from(meta.mtime_nsec()).unwrap_or(0));
    Validators {
        etag: format!(
            "\"{:x}-{:x}-{:x}.{:x}\"",
            meta.ino(),
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ),
        modified,
        last_modified: httpdate::fmt_http_date(modified),
    }
}

/// `If-None-Match` (weak comparison): true when one of the listed tags, or `*`, matches.
fn none_match_hits(value: &str, etag: &str) -> bool {
    let ours = etag.trim_start_matches("W/");
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == ours)
}

/// `If-Modified-Since`: true when the file has not changed since the given date (1 s
/// resolution, as HTTP dates have).
fn not_modified_since(value: &str, modified: SystemTime) -> bool {
    let Ok(since) = httpdate::parse_http_date(value) else {
        return false;
    };
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    secs(modified) <= secs(since)
}

/// `If-Range`: the range applies only if the entity tag matches strongly or the date equals
/// Last-Modified.
fn if_range_holds(value: &str, v: &Validators) -> bool {
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return !value.starts_with("W/") && value == v.etag;
    }
    value == v.last_modified
}

/// Files being opened (and looked up) at once, each on a blocking thread: a storm of requests
/// waits here instead of growing the blocking pool by one thread per request. An open is
/// `O_NONBLOCK` after an `lstat`, so a turn is short.
static OPENS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// Runs `f` (a file lookup or open) on a blocking thread, at most [`OPENS`] at once.
async fn blocking_open<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    // Never closed: acquiring cannot fail; if it did, the open runs without a turn.
    let _turn = OPENS.acquire().await.ok();
    tokio::task::spawn_blocking(f).await
}

/// Whether `rel` is absent from `root` (anything else, a file or a path [`serve_file`] refuses,
/// is not "missing").
pub async fn is_missing(root: &Path, rel: &str) -> bool {
    let root = root.to_path_buf();
    let rel = rel.to_string();
    blocking_open(move || matches!(open_confined(&root, &rel), Err(PathError::NotFound(_))))
        .await
        .unwrap_or(false)
}

/// Opens `rel` under `root` and answers per the request headers. `rel` has already been
/// percent-decoded and checked for `..` and NUL by the router ([`decode_path`]).
pub async fn serve_file(
    root: &Path,
    rel: &str,
    head: bool,
    headers: &HeaderMap,
    outcome: &mut Outcome,
) -> Response<Body> {
    serve_file_allowing(root, &[], rel, head, headers, outcome).await
}

/// [`serve_file`], where a symlink under `root` may also resolve to `outside` (see
/// [`crate::path::open_confined_allowing`]).
pub async fn serve_file_allowing(
    root: &Path,
    outside: &'static [&'static str],
    rel: &str,
    head: bool,
    headers: &HeaderMap,
    outcome: &mut Outcome,
) -> Response<Body> {
    let root: PathBuf = root.to_path_buf();
    let rel_owned = rel.to_string();
    let opened = blocking_open(move || {
        let (file, _len, real) = open_confined_allowing(&root, &rel_owned, outside)?;
        let meta = file
            .metadata()
            .map_err(|e| PathError::Io(real.display().to_string(), e))?;
        Ok::<_, PathError>((file, meta))
    })
    .await;
    let (file, meta) = match opened {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => {
            let status = match &e {
                PathError::NotAllowed(_) => StatusCode::BAD_REQUEST,
                PathError::NotFound(_) | PathError::NotAFile(_) | PathError::Escapes(_) => {
                    StatusCode::NOT_FOUND
                }
                PathError::Io(_, io) if io.kind() == io::ErrorKind::PermissionDenied => {
                    StatusCode::FORBIDDEN
                }
                PathError::Io(..) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            outcome.note = Some(refusal_reason(&e));
            return plain(status, status.canonical_reason().unwrap_or("error"));
        }
        Err(e) => {
            outcome.note = Some(format!("file open task failed: {e}"));
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
        }
    };
    let len = meta.len();
    let v = validators(&meta);

    let mut builder = Response::builder()
        .header(header::ETAG, &v.etag)
        .header(header::LAST_MODIFIED, &v.last_modified)
        .header(header::ACCEPT_RANGES, "bytes");

    let header_str = |name: header::HeaderName| -> Option<&str> {
        headers
            .get(name)
            .and_then(|h: &HeaderValue| h.to_str().ok())
    };

    // RFC 9110 §13.2.2: If-None-Match, else If-Modified-Since; then Range (with If-Range).
    let not_modified = match header_str(header::IF_NONE_MATCH) {
        Some(inm) => none_match_hits(inm, &v.etag),
        None => header_str(header::IF_MODIFIED_SINCE)
            .is_some_and(|ims| not_modified_since(ims, v.modified)),
    };
    if not_modified {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::Empty)
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"));
    }

    let mut range = RangeRequest::Whole;
    let ranges: Vec<_> = headers.get_all(header::RANGE).iter().collect();
    if ranges.len() == 1 {
        let applies = match header_str(header::IF_RANGE) {
            Some(ir) => if_range_holds(ir, &v),
            None => true,
        };
        if applies {
            if let Ok(value) = ranges[0].to_str() {
                range = parse_range(value, len);
            }
        }
    }

    let (status, start, count) = match range {
        RangeRequest::Whole => (StatusCode::OK, 0, len),
        RangeRequest::Part { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes */{len}"));
            let body = "range not satisfiable";
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .header(header::CONTENT_LENGTH, body.len())
                .body(if head { Body::Empty } else { Body::text(body) })
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"));
        }
    };
    builder = builder
        .status(status)
        .header(header::CONTENT_TYPE, content_type(rel))
        .header(header::CONTENT_LENGTH, count);

    let body = if head {
        Body::Empty
    } else {
        outcome.bytes = count;
        let path = rel.to_string();
        let full = status == StatusCode::OK;
        Body::File(
            FileStream::new(file, start, count, rel.to_string()).on_complete(move || {
                tracing::debug!(path = %path, bytes = count, full, "file transfer complete");
            }),
        )
    };
    builder
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

/// Why a file was refused, without its name: the request's log line carries the path once.
fn refusal_reason(e: &PathError) -> String {
    match e {
        PathError::NotAllowed(_) => "path not allowed (absolute, '..', or not UTF-8 safe)".into(),
        PathError::NotFound(_) => "not found".into(),
        PathError::NotAFile(_) => "not a regular file".into(),
        PathError::Escapes(_) => "resolves outside the served directory".into(),
        PathError::Io(_, io) => io.to_string(),
    }
}

fn content_type(rel: &str) -> &'static str {
    let ext = rel.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("ipxe" | "txt" | "cfg") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        Some("yaml" | "yml") => "application/yaml",
        _ => "application/octet-stream",
    }
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
    fn parses_single_ranges() {
        use RangeRequest::*;
        let len = 1000;
        assert_eq!(parse_range("bytes=0-99", len), Part { start: 0, end: 99 });
        assert_eq!(
            parse_range("bytes=100-", len),
            Part {
                start: 100,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-10", len),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(parse_range("bytes=-5000", len), Part { start: 0, end: 999 });
        assert_eq!(
            parse_range("bytes=990-5000", len),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(parse_range("bytes= 5 - 6 ", len), Part { start: 5, end: 6 });
        assert_eq!(
            parse_range("bytes=999-999", len),
            Part {
                start: 999,
                end: 999
            }
        );
    }

    #[test]
    fn detects_unsatisfiable_ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=1000-2000", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-1", 0), Unsatisfiable);
        assert_eq!(
            parse_range("bytes=99999999999999999999999-", 1000),
            Unsatisfiable
        );
    }

    #[test]
    fn ignores_other_ranges() {
        use RangeRequest::*;
        for v in [
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=5-4",
            "bytes=a-b",
            "bytes=-",
            "bytes=",
            "bytes=1",
            "0-1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(v, 1000), Whole, "{v}");
        }
    }

    #[test]
    fn conditional_helpers() {
        assert!(none_match_hits("\"a\"", "\"a\""));
        assert!(none_match_hits("\"x\", W/\"a\"", "\"a\""));
        assert!(none_match_hits("*", "\"a\""));
        assert!(!none_match_hits("\"b\"", "\"a\""));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(300);
        assert!(not_modified_since(&httpdate::fmt_http_date(t), t));
        assert!(!not_modified_since(
            &httpdate::fmt_http_date(t - Duration::from_secs(1)),
            t
        ));
        assert!(!not_modified_since("garbage", t));
        let v = Validators {
            etag: "\"e\"".into(),
            modified: t,
            last_modified: httpdate::fmt_http_date(t),
        };
        assert!(if_range_holds("\"e\"", &v));
        assert!(!if_range_holds("W/\"e\"", &v));
        assert!(!if_range_holds("\"f\"", &v));
        assert!(if_range_holds(&httpdate::fmt_http_date(t), &v));
        assert!(!if_range_holds("Mon, 01 Jan 2001 00:00:00 GMT", &v));
    }
}
