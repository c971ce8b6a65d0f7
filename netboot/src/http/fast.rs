//! The server's own side of a connection: it reads each request head itself (httparse, the
//! parser hyper uses), answers a `GET`/`HEAD` of a static file with its response head and a
//! `sendfile(2)` of the file (no copy through user space, no blocking thread per chunk), and
//! hands any other request to hyper, replaying the bytes already read ([`Replay`]).
//!
//! Why by hand: hyper writes a body only from buffers it is given (`Bytes`), so a file would
//! be read into memory and copied out again, and `tokio::fs` does each read on a blocking
//! thread. No maintained crate puts `sendfile` under hyper 1's HTTP/1 server; what is written
//! here is the response head of a file (status line and headers, as hyper writes them) and the
//! write loop with the connection's deadlines, nothing of HTTP's request side but the choice
//! of which requests take this path.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, BufMut, BytesMut};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::{Body, FileStream};
use super::limits::{ConnState, Registry};
use super::server::MAX_BUF;

/// Most header fields in a request head (hyper's own limit); more go to hyper, which refuses
/// them (431).
const MAX_HEADERS: usize = 100;
/// How much is read from the socket at once while a head is incomplete.
const READ_CHUNK: usize = 8 * 1024;
/// Most bytes one `sendfile` call is asked for: the task yields to the others on its worker
/// between calls (tokio's cooperative budget), so a fast client cannot hog a thread.
const SENDFILE_CHUNK: usize = 1 << 20;

/// The body a request announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestBody {
    /// None, or `Content-Length` bytes.
    Length(u64),
    /// Chunked, or a length we cannot read: only hyper can tell where the request ends.
    Unknown,
}

/// A complete request head.
#[derive(Debug)]
pub(crate) struct Head {
    /// Method, target, version and header fields; no body.
    pub request: Request<()>,
    /// Bytes of the head (the body or the next request follows).
    pub len: usize,
    /// The body that follows the head.
    pub body: RequestBody,
    /// The connection may serve another request after this one (HTTP/1.1 without
    /// `Connection: close`; HTTP/1.0 never, as hyper answers it).
    pub keep_alive: bool,
}

impl Head {
    /// Whether the request may take the fast path: `GET` or `HEAD` without a body and without
    /// `Expect` (hyper answers `100-continue`).
    pub fn is_plain_read(&self) -> bool {
        matches!(*self.request.method(), Method::GET | Method::HEAD)
            && self.body == RequestBody::Length(0)
            && !self.request.headers().contains_key(header::EXPECT)
    }

    /// Bytes of the request on the wire, head and body, when known.
    pub fn wire_len(&self) -> Option<u64> {
        match self.body {
            RequestBody::Length(n) => Some(self.len as u64 + n),
            RequestBody::Unknown => None,
        }
    }
}

/// What the bytes at the start of a buffer are.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// Not a whole head yet.
    Partial,
    Head(Box<Head>),
    /// Something hyper must answer (a malformed or oversized head): it gets the connection.
    Hyper,
}

/// Parses the request head at the start of `buf`.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::Hyper;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Hyper;
    };
    let Ok(uri) = target.parse::<Uri>() else {
        return Parsed::Hyper;
    };
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    let mut body = RequestBody::Length(0);
    let mut length: Option<u64> = None;
    let mut close = version == Version::HTTP_10;
    let headers = request.headers_mut();
    for field in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(field.name.as_bytes()),
            HeaderValue::from_bytes(field.value),
        ) else {
            return Parsed::Hyper;
        };
        if name == header::TRANSFER_ENCODING {
            body = RequestBody::Unknown;
        } else if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(field.value)
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => body = RequestBody::Unknown,
            }
        } else if name == header::CONNECTION
            && field
                .value
                .split(|&b| b == b',')
                .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
        {
            close = true;
        }
        headers.append(name, value);
    }
    if body != RequestBody::Unknown {
        body = RequestBody::Length(length.unwrap_or(0));
    }
    Parsed::Head(Box::new(Head {
        request,
        len,
        body,
        keep_alive: !close,
    }))
}

/// What waiting for the next request gave.
#[derive(Debug)]
pub(crate) enum Next {
    Request(Box<Head>),
    /// hyper must take the connection from here (see [`Parsed::Hyper`]), or the head grew past
    /// [`MAX_BUF`] (hyper answers 431).
    Hyper,
    /// The client closed the connection (before or within a head).
    Closed,
    /// No complete head within the header deadline.
    TimedOut,
    Failed(io::Error),
}

/// Reads until `buf` starts with a complete request head, for at most the header deadline
/// (which also closes idle keep-alive connections, as hyper's `header_read_timeout` does).
pub(crate) async fn next_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    registry: &Registry,
) -> Next {
    let deadline = Instant::now() + registry.limits().header_timeout;
    // Bytes already known to hold no line end: a head can only end in a new one, so a client
    // trickling a long head costs one parse per line, not one per read.
    let mut scanned = 0;
    loop {
        let new_line = buf[scanned..].contains(&b'\n');
        scanned = buf.len();
        if new_line {
            match parse(buf) {
                Parsed::Head(head) => return Next::Request(head),
                Parsed::Hyper => return Next::Hyper,
                Parsed::Partial => {}
            }
        }
        if buf.len() >= MAX_BUF {
            return Next::Hyper;
        }
        buf.reserve(READ_CHUNK);
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => return Next::TimedOut,
            Ok(Ok(0)) => return Next::Closed,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Next::Failed(e),
        }
    }
}

/// Writes `response` to a request of `version` (`head_only` for `HEAD`): its head as hyper
/// writes it (status line, the response's fields, `content-length` when missing, `date`,
/// `connection: close` when the connection ends after it), then its body; a file with
/// `sendfile(2)`. Every write is bounded by the connection's write and total deadlines.
pub(crate) async fn write_response(
    stream: &TcpStream,
    response: Response<Body>,
    version: Version,
    keep_alive: bool,
    head_only: bool,
    registry: &Registry,
    state: &ConnState,
) -> io::Result<()> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let mut out = BytesMut::with_capacity(256);
    out.put_slice(if version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in &parts.headers {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    let body_len = match &body {
        Body::Empty => 0,
        Body::Full(data) => data.as_ref().map_or(0, |d| d.len() as u64),
        Body::File(file) => file.remaining(),
    };
    let no_body_status = matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED);
    // hyper's rule: an implicit `content-length` for what may have one (not 204/304, and not a
    // HEAD without one); never a body for a HEAD, a 204 or a 304.
    if !parts.headers.contains_key(header::CONTENT_LENGTH)
        && !no_body_status
        && (!head_only || body_len > 0)
    {
        out.put_slice(format!("content-length: {body_len}\r\n").as_bytes());
    }
    if !parts.headers.contains_key(header::DATE) {
        out.put_slice(b"date: ");
        out.put_slice(httpdate::fmt_http_date(SystemTime::now()).as_bytes());
        out.put_slice(b"\r\n");
    }
    if !keep_alive && version == Version::HTTP_11 && !parts.headers.contains_key(header::CONNECTION)
    {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
    let send_body = !head_only && !no_body_status;

    let mut writer = Writer::new(stream, registry, state);
    match &mut body {
        Body::Full(Some(data)) if send_body => {
            out.put_slice(data);
            writer.write_all(&out, false).await
        }
        Body::File(file) if send_body && body_len > 0 => {
            // Corked while the file goes out (nginx's `tcp_nopush`): whole segments only, the
            // head in the first; uncorking sends the tail at once.
            let sock = socket2::SockRef::from(stream);
            let corked = sock.set_cork(true).is_ok();
            writer.write_all(&out, !corked).await?;
            let sent = writer.send_file(file).await;
            if corked {
                let _ = sock.set_cork(false);
            }
            sent
        }
        _ => writer.write_all(&out, false).await,
    }
}

/// Writes to the connection's socket with its deadlines: a write that cannot make progress for
/// the write timeout, or that would end after the response's total deadline, fails with
/// `TimedOut` and marks the connection timed out. What [`super::limits::GuardedIo`] does for
/// hyper's writes.
struct Writer<'a> {
    stream: &'a TcpStream,
    registry: &'a Registry,
    state: &'a ConnState,
    /// When the current wait for the client to read began.
    blocked_since: Option<Instant>,
}

impl<'a> Writer<'a> {
    fn new(stream: &'a TcpStream, registry: &'a Registry, state: &'a ConnState) -> Self {
        Writer {
            stream,
            registry,
            state,
            blocked_since: None,
        }
    }

    /// Runs `op` (a non-blocking write of some bytes) until it writes something; waits for the
    /// socket to be writable in between, within the deadlines.
    async fn write_some(
        &mut self,
        mut op: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> io::Result<usize> {
        loop {
            if self.registry.until_deadline(self.state) == Some(std::time::Duration::ZERO) {
                return Err(self.timed_out("response not sent within its total deadline"));
            }
            let stream = self.stream;
            match stream.try_io(Interest::WRITABLE, || op(stream)) {
                Ok(n) => {
                    if n > 0 {
                        self.blocked_since = None;
                        self.registry.wrote(self.state);
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let since = *self.blocked_since.get_or_insert_with(|| {
                self.registry.write_blocked(self.state);
                Instant::now()
            });
            let mut wait = self.registry.limits().write_timeout;
            if let Some(left) = self.registry.until_deadline(self.state) {
                wait = wait.min(left);
            }
            if tokio::time::timeout_at(since + wait, self.stream.writable())
                .await
                .is_err()
            {
                return Err(self.timed_out("no write progress within the deadline"));
            }
        }
    }

    /// Writes all of `bytes`; `more`: a body follows at once (`MSG_MORE`, so that a small file
    /// leaves in the head's segment).
    async fn write_all(&mut self, mut bytes: &[u8], more: bool) -> io::Result<()> {
        use nix::sys::socket::{send, MsgFlags};
        let flags = if more {
            // nix 0.29 names no MSG_MORE.
            MsgFlags::from_bits_retain(nix::libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL
        } else {
            MsgFlags::MSG_NOSIGNAL
        };
        while !bytes.is_empty() {
            let chunk = bytes;
            let n = self
                .write_some(|s| send(s.as_raw_fd(), chunk, flags).map_err(io::Error::from))
                .await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Sends the rest of `file` with `sendfile(2)`, from its offset.
    async fn send_file(&mut self, file: &mut FileStream) -> io::Result<()> {
        while file.remaining() > 0 {
            let n = {
                let Some((fd, offset, remaining)) = file.sendfile_source() else {
                    return Err(io::Error::other("file already read by hyper"));
                };
                let count =
                    usize::try_from(remaining).map_or(SENDFILE_CHUNK, |r| r.min(SENDFILE_CHUNK));
                let mut off =
                    i64::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
                self.write_some(|s| {
                    nix::sys::sendfile::sendfile(s.as_fd(), fd, Some(&mut off), count)
                        .map_err(io::Error::from)
                })
                .await?
            };
            if n == 0 {
                // The file shrank under us: end the connection rather than send a response
                // shorter than its Content-Length.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file ended before its length",
                ));
            }
            file.advance(n as u64);
            tokio::task::coop::consume_budget().await;
        }
        Ok(())
    }

    fn timed_out(&self, what: &'static str) -> io::Error {
        self.state.mark_timed_out();
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

/// The connection's socket for hyper, serving first the bytes already read (`buf`), and no more
/// of the stream than `limit` bytes in all: one request, head and body, so that hyper never
/// reads the next request and the connection comes back to [`next_request`] after it. Without a
/// limit hyper gets the connection to its end.
pub(crate) struct Replay {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Bytes hyper may still read; `None`: all.
    pub limit: Option<u64>,
}

impl Replay {
    /// Whether hyper read the whole request it was given (and nothing beyond: it cannot).
    pub fn request_read(&self) -> bool {
        self.limit.is_none_or(|left| left == 0)
    }
}

impl AsyncRead for Replay {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut room = out.remaining();
        if let Some(left) = this.limit {
            if left == 0 {
                // The rest belongs to the next request, which is ours: hyper waits until it is
                // told to stop.
                return Poll::Pending;
            }
            room = room.min(usize::try_from(left).unwrap_or(usize::MAX));
        }
        if !this.buf.is_empty() {
            let n = room.min(this.buf.len());
            out.put_slice(&this.buf[..n]);
            this.buf.advance(n);
            if let Some(left) = this.limit.as_mut() {
                *left -= n as u64;
            }
            return Poll::Ready(Ok(()));
        }
        if room >= out.remaining() {
            let before = out.filled().len();
            let result = Pin::new(&mut this.stream).poll_read(cx, out);
            if let Some(left) = this.limit.as_mut() {
                *left -= (out.filled().len() - before) as u64;
            }
            return result;
        }
        // Less than hyper asks for (the end of a request body): through a small buffer, as a
        // `ReadBuf::take` view would need `unsafe` to hand its bytes back.
        let mut tmp = vec![0u8; room.min(READ_CHUNK)];
        let mut limited = ReadBuf::new(&mut tmp);
        let result = Pin::new(&mut this.stream).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        out.put_slice(limited.filled());
        if let Some(left) = this.limit.as_mut() {
            *left -= n as u64;
        }
        result
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
