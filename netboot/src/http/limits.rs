//! What keeps the HTTP server serving legitimate clients under slowloris, slow readers and
//! connection floods: a connection table with a global and a per-peer cap, and deadlines on
//! every connection.
//!
//! * **Header deadline** ([`HttpLimits::header_timeout`]): a request's headers must be complete
//!   this long after the connection became idle (hyper's `header_read_timeout`, which also runs
//!   while a keep-alive connection waits for its next request): idle connections are closed.
//! * **Write deadline** ([`HttpLimits::write_timeout`]): a response that cannot write a byte
//!   for this long (a client that stopped reading, or reads through a tiny window) is cut.
//! * **Total deadline**: each response must be written within
//!   `response_slack + body length / min_rate`, so a client reading just fast enough to dodge
//!   the write deadline still lets go in bounded time.
//! * **Caps**: at most [`HttpLimits::max_connections_per_peer`] connections per client
//!   address, and [`HttpLimits::max_connections`] in all, clamped below the file descriptor
//!   limit (each connection may hold a socket and a file). When the table is full, a
//!   connection that has waited at least [`SHED_AFTER`] is closed to make room: first the one
//!   idle the longest (no request in flight: its headers not yet read, or kept alive after a
//!   response; bytes trickling in do not count), else the response that has waited longest
//!   for its client to read. When none has, the newcomer waits for a place
//!   ([`Registry::wait_for_place`]; the accept loop holds the next clients in the listen
//!   backlog, in order) and is refused (503) only if none comes within the header deadline.
//!   The grace is for boot storms: a thousand clients arriving at once are accepted faster
//!   than their requests are read, and each download waits on its client now and then as
//!   they share the link. Closing at the first wait cut most of a 1000-machine storm.
//!   A flood from many addresses, however fast, still churns through its own connections
//!   instead of holding out the next legitimate client: its connections age past the grace
//!   while the newcomers queue behind them, and the legitimate client's turn comes in order.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// How the HTTP server bounds its connections; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections at once (before the file descriptor clamp).
    pub max_connections: usize,
    /// Connections at once from one client address.
    pub max_connections_per_peer: usize,
    /// Request headers must be complete within this; also closes idle keep-alive connections.
    pub header_timeout: Duration,
    /// A response that writes nothing for this long is cut.
    pub write_timeout: Duration,
    /// Slowest average rate a response may be sent at, in bytes per second (with the slack).
    pub min_rate: u64,
    /// Added to every response's total deadline.
    pub response_slack: Duration,
    /// File descriptors kept for everything else (TFTP, files being opened, logging, the
    /// state file) when clamping `max_connections` to the process's limit.
    pub reserved_fds: u64,
}

/// Default [`HttpLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// Default [`HttpLimits::max_connections_per_peer`]: a PXE client uses one or two, stage2 one,
/// cloud-init a few; a host fetching many files in parallel still fits.
pub const DEFAULT_MAX_CONNECTIONS_PER_PEER: usize = 32;
/// Default [`HttpLimits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`HttpLimits::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`HttpLimits::min_rate`]: 256 KiB/s (2 Mbit/s). A 100 MiB initrd then has 460 s,
/// a 2 GiB image 8252 s; stage2 resumes a cut download with Range.
pub const DEFAULT_MIN_RATE: u64 = 256 * 1024;
/// Default [`HttpLimits::response_slack`].
pub const DEFAULT_RESPONSE_SLACK: Duration = Duration::from_secs(60);
/// Default [`HttpLimits::reserved_fds`]: TFTP's 64 transfers take up to 128.
pub const DEFAULT_RESERVED_FDS: u64 = 256;

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_peer: DEFAULT_MAX_CONNECTIONS_PER_PEER,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            min_rate: DEFAULT_MIN_RATE,
            response_slack: DEFAULT_RESPONSE_SLACK,
            reserved_fds: DEFAULT_RESERVED_FDS,
        }
    }
}

impl HttpLimits {
    /// How long a response with a body of `len` bytes may take to be written.
    pub fn response_deadline(&self, len: u64) -> Duration {
        self.response_slack + Duration::from_secs_f64(len as f64 / self.min_rate.max(1) as f64)
    }

    /// `max_connections`, lowered so that every connection may hold two descriptors (socket and
    /// file) within `nofile` while `reserved_fds` stay free.
    pub fn connection_cap(&self, nofile: Option<u64>) -> usize {
        let by_fds = nofile
            .map(|n| usize::try_from(n.saturating_sub(self.reserved_fds) / 2).unwrap_or(usize::MAX))
            .unwrap_or(usize::MAX);
        self.max_connections.min(by_fds).max(1)
    }
}

/// The soft `RLIMIT_NOFILE` of this process, if it can be read and is finite.
pub(crate) fn nofile_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft != RLIM_INFINITY => Some(soft),
        _ => None,
    }
}

/// How long a connection must have been idle, or its response waiting for its client to read,
/// before it may be closed to make room for a newcomer (see the module documentation).
pub const SHED_AFTER: Duration = Duration::from_secs(2);

/// How often a newcomer waiting for a place looks again when no connection closes (a stalled
/// one becomes eligible with time).
const PLACE_POLL: Duration = Duration::from_millis(100);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Stored times count from here, so that 0 ("none") is never a time and a time minus a few
/// seconds stays one.
const TIME_BASE: u64 = 1 << 32;

/// What one connection shares with the table, its I/O wrapper and its service.
#[derive(Default)]
pub(crate) struct ConnState {
    /// A request is in flight: from its headers until its response body is dropped.
    busy: AtomicBool,
    /// Milliseconds since the registry's epoch of the admission or the last byte written: for
    /// an idle connection, about when it became idle. Bytes read do not count, so that a client
    /// trickling its headers (slowloris) does not look fresh.
    idle_from: AtomicU64,
    /// Milliseconds since the epoch from which a write has been waiting for the client to
    /// read; 0: no write is waiting.
    write_blocked: AtomicU64,
    /// Milliseconds since the epoch by which the current response must be written; 0: none.
    deadline: AtomicU64,
    /// The connection was closed by a deadline (for the counters).
    timed_out: AtomicBool,
    /// Responses finished (their bodies dropped) on this connection.
    finished: AtomicU64,
}

impl ConnState {
    /// The connection was closed by a deadline hyper enforces (the header timeout).
    pub fn mark_timed_out(&self) {
        self.timed_out.store(true, Ordering::Relaxed);
    }

    /// Responses finished on this connection so far.
    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }
}

/// Counters of what the limits did, reported now and then in one log line.
#[derive(Default)]
pub(crate) struct Counters {
    pub refused_per_peer: AtomicU64,
    pub refused_full: AtomicU64,
    pub shed: AtomicU64,
    pub timed_out: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> [u64; 4] {
        [
            self.refused_per_peer.load(Ordering::Relaxed),
            self.refused_full.load(Ordering::Relaxed),
            self.shed.load(Ordering::Relaxed),
            self.timed_out.load(Ordering::Relaxed),
        ]
    }
}

struct Entry {
    peer: IpAddr,
    state: Arc<ConnState>,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    per_peer: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.conns.remove(&id)?;
        if let Some(n) = self.per_peer.get_mut(&entry.peer) {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&entry.peer);
            }
        }
        Some(entry)
    }
}

/// The connection table.
pub(crate) struct Registry {
    limits: HttpLimits,
    cap: usize,
    epoch: Instant,
    table: Mutex<Table>,
    /// Signalled when a connection leaves the table.
    freed: tokio::sync::Notify,
    pub counters: Counters,
    reported: Mutex<([u64; 4], Instant)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    PerPeer,
    Full,
}

/// A connection's place in the table; removes it when dropped.
pub(crate) struct Admitted {
    registry: Arc<Registry>,
    id: u64,
    pub state: Arc<ConnState>,
    /// Cancelled when the connection is closed to make room for another.
    pub shed: CancellationToken,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut table = self.registry.lock();
        if table.remove(self.id).is_some() {
            self.registry.freed.notify_one();
        }
    }
}

impl Registry {
    pub fn new(limits: HttpLimits, cap: usize) -> Arc<Registry> {
        let now = Instant::now();
        Arc::new(Registry {
            limits,
            cap,
            epoch: now,
            table: Mutex::new(Table::default()),
            freed: tokio::sync::Notify::new(),
            counters: Counters::default(),
            reported: Mutex::new(([0; 4], now)),
        })
    }

    pub fn limits(&self) -> &HttpLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Milliseconds since the epoch, counted from [`TIME_BASE`].
    fn now_ms(&self) -> u64 {
        TIME_BASE.saturating_add(millis(self.epoch.elapsed()))
    }

    /// Connections in the table.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// Takes a place for a connection from `peer`, closing an idle connection or a response
    /// stalled on its client when the table is full (see the module documentation). A full
    /// table is counted as a refusal only by [`Registry::wait_for_place`], which gives up.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, Refused> {
        let now = self.now_ms();
        let mut table = self.lock();
        if table.per_peer.get(&peer).copied().unwrap_or(0) >= self.limits.max_connections_per_peer {
            self.counters
                .refused_per_peer
                .fetch_add(1, Ordering::Relaxed);
            return Err(Refused::PerPeer);
        }
        if table.conns.len() >= self.cap {
            let waited_from = now.saturating_sub(millis(SHED_AFTER));
            // Idle ones first, then responses stalled on their client; the longest wait first;
            // none that has waited less than SHED_AFTER.
            let victim = table
                .conns
                .iter()
                .filter_map(|(id, e)| {
                    let (kind, since) = if e.state.busy.load(Ordering::Relaxed) {
                        (1, e.state.write_blocked.load(Ordering::Relaxed))
                    } else {
                        (0, e.state.idle_from.load(Ordering::Relaxed))
                    };
                    (since != 0 && since <= waited_from).then_some((kind, since, *id))
                })
                .min()
                .map(|(_, _, id)| id);
            match victim.and_then(|id| table.remove(id)) {
                Some(entry) => {
                    entry.cancel.cancel();
                    self.counters.shed.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    return Err(Refused::Full);
                }
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let state = Arc::new(ConnState::default());
        state.idle_from.store(now, Ordering::Relaxed);
        let shed = CancellationToken::new();
        table.conns.insert(
            id,
            Entry {
                peer,
                state: state.clone(),
                cancel: shed.clone(),
            },
        );
        *table.per_peer.entry(peer).or_default() += 1;
        Ok(Admitted {
            registry: self.clone(),
            id,
            state,
            shed,
        })
    }

    /// [`Registry::admit`], but when the table is full and no connection may be closed yet,
    /// waits for a place: until one frees or a stalled response has waited long enough, for
    /// at most the header deadline (a client that has waited that long would have been closed
    /// for slowness once admitted). Refused at once from a peer at its cap, and on `shutdown`.
    pub async fn wait_for_place(
        self: &Arc<Self>,
        peer: IpAddr,
        shutdown: &CancellationToken,
    ) -> Result<Admitted, Refused> {
        let give_up = tokio::time::Instant::now() + self.limits.header_timeout;
        loop {
            // Registered before looking, so that a place freed in between is not missed.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            match self.admit(peer) {
                Err(Refused::Full) if tokio::time::Instant::now() < give_up => {}
                Err(Refused::Full) => {
                    self.counters.refused_full.fetch_add(1, Ordering::Relaxed);
                    return Err(Refused::Full);
                }
                admitted => return admitted,
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Refused::Full),
                _ = freed => {}
                _ = tokio::time::sleep(PLACE_POLL) => {}
            }
        }
    }

    /// The counters' changes since the last report, at most every `every`; `None` when nothing
    /// changed or it is too early.
    pub fn report_due(&self, every: Duration) -> Option<[u64; 4]> {
        let mut reported = match self.reported.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if reported.1.elapsed() < every {
            return None;
        }
        let now = self.counters.snapshot();
        if now == reported.0 {
            return None;
        }
        let delta = [
            now[0] - reported.0[0],
            now[1] - reported.0[1],
            now[2] - reported.0[2],
            now[3] - reported.0[3],
        ];
        *reported = (now, Instant::now());
        Some(delta)
    }

    /// Marks the start of a request on `state`.
    pub fn request_started(&self, state: &ConnState) {
        state.busy.store(true, Ordering::Relaxed);
    }

    /// Sets the deadline of the response about to be written: its body is `len` bytes.
    pub fn response_started(&self, state: &ConnState, len: u64) {
        let deadline = self.limits.response_deadline(len);
        let at = self.now_ms().saturating_add(millis(deadline));
        state.deadline.store(at.max(1), Ordering::Relaxed);
    }

    /// Marks the end of the request in flight on `state` (its response written or given up).
    pub fn request_finished(&self, state: &ConnState) {
        state.busy.store(false, Ordering::Relaxed);
        state.finished.fetch_add(1, Ordering::Release);
    }

    /// Bytes were written: the connection is no longer waiting for its client to read.
    pub fn wrote(&self, state: &ConnState) {
        state.idle_from.store(self.now_ms(), Ordering::Relaxed);
        state.write_blocked.store(0, Ordering::Relaxed);
    }

    /// A write has started waiting for the client to read.
    pub fn write_blocked(&self, state: &ConnState) {
        state.write_blocked.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Time left until the response's total deadline on `state`, if one is set.
    pub fn until_deadline(&self, state: &ConnState) -> Option<Duration> {
        match state.deadline.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(at.saturating_sub(self.now_ms()))),
        }
    }

    /// Counts a connection closed by one of its deadlines.
    pub fn count_timeout(&self, state: &ConnState) {
        if state.timed_out.load(Ordering::Relaxed) {
            self.counters.timed_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A response body that marks its connection idle again once hyper is done with it.
pub(crate) struct Tracked<B> {
    body: B,
    state: Arc<ConnState>,
}

impl<B> Tracked<B> {
    pub fn new(body: B, state: Arc<ConnState>) -> Self {
        Tracked { body, state }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.state.busy.store(false, Ordering::Relaxed);
        self.state.finished.fetch_add(1, Ordering::Release);
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, with progress tracking, the write deadline and the response's
/// total deadline.
pub(crate) struct GuardedIo<T> {
    inner: T,
    registry: Arc<Registry>,
    state: Arc<ConnState>,
    /// Armed when a write could not proceed; disarmed by any written byte.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> GuardedIo<T> {
    pub fn new(inner: T, registry: Arc<Registry>, state: Arc<ConnState>) -> Self {
        GuardedIo {
            inner,
            registry,
            state,
            stall: None,
        }
    }

    /// The wrapped socket.
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn wrote(&mut self) {
        self.registry.wrote(&self.state);
        self.stall = None;
    }

    fn timed_out(&self, what: &'static str) -> io::Error {
        self.state.timed_out.store(true, Ordering::Relaxed);
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    /// Milliseconds left until the response's total deadline, if one is set.
    fn until_deadline(&self) -> Option<u64> {
        match self.state.deadline.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at.saturating_sub(self.registry.now_ms())),
        }
    }

    /// Common to `poll_write` and `poll_write_vectored`.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match result {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.wrote();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.stall.is_none() {
                    self.state
                        .write_blocked
                        .store(self.registry.now_ms(), Ordering::Relaxed);
                    let mut wait = self.registry.limits.write_timeout;
                    if let Some(left) = self.until_deadline() {
                        wait = wait.min(Duration::from_millis(left));
                    }
                    self.stall = Some(Box::pin(tokio::time::sleep(wait)));
                }
                match self.stall.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => {
                        Poll::Ready(Err(self.timed_out("no write progress within the deadline")))
                    }
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn check_deadline(&self) -> io::Result<()> {
        if self.until_deadline() == Some(0) {
            return Err(self.timed_out("response not sent within its total deadline"));
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline()?;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check_deadline()?;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cap: usize, per_peer: usize) -> HttpLimits {
        HttpLimits {
            max_connections: cap,
            max_connections_per_peer: per_peer,
            ..HttpLimits::default()
        }
    }

    #[test]
    fn deadlines_and_caps_follow_the_limits() {
        let l = HttpLimits::default();
        // A 100 MiB initrd at 256 KiB/s: 400 s, plus 60 s of slack.
        assert_eq!(l.response_deadline(100 << 20), Duration::from_secs(460));
        assert_eq!(l.response_deadline(0), Duration::from_secs(60));
        assert_eq!(l.connection_cap(None), 512);
        assert_eq!(l.connection_cap(Some(4096)), 512);
        // 1024 descriptors, 256 kept: 384 connections of two descriptors each.
        assert_eq!(l.connection_cap(Some(1024)), 384);
        assert_eq!(l.connection_cap(Some(10)), 1);
    }

    #[test]
    fn per_peer_and_global_caps_with_shedding() {
        let registry = Registry::new(limits(3, 2), 3);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let c: IpAddr = "10.0.0.3".parse().expect("ip");
        let a1 = registry.admit(a).expect("first");
        let a2 = registry.admit(a).expect("second");
        assert_eq!(registry.admit(a).err(), Some(Refused::PerPeer));
        // b's connection is busy and moving (or waiting on the server): never shed.
        let b1 = registry.admit(b).expect("b");
        registry.request_started(&b1.state);
        // Full, but nobody has waited long: nothing goes.
        assert_eq!(registry.admit(c).err(), Some(Refused::Full));
        // Idle for longer than SHED_AFTER: the one idle the longest goes (a1).
        let old = registry.now_ms() - millis(SHED_AFTER);
        a1.state.idle_from.store(old - 20, Ordering::Relaxed);
        a2.state.idle_from.store(old - 10, Ordering::Relaxed);
        let c1 = registry.admit(c).expect("c takes a1's place");
        assert!(a1.shed.is_cancelled());
        assert!(!a2.shed.is_cancelled());
        assert_eq!(registry.len(), 3);
        // The shed connection's guard dropping later does not free a second place.
        drop(a1);
        assert_eq!(registry.len(), 3);
        // Every connection busy and moving: refused.
        registry.request_started(&a2.state);
        registry.request_started(&c1.state);
        assert_eq!(registry.admit(c).err(), Some(Refused::Full));
        // A response that has waited a moment for its client to read is a download in a
        // crowd: it keeps its place.
        c1.state
            .write_blocked
            .store(registry.now_ms() - 10, Ordering::Relaxed);
        assert_eq!(registry.admit(c).err(), Some(Refused::Full));
        // One that has waited longer than SHED_AFTER goes.
        c1.state.write_blocked.store(
            registry.now_ms() - millis(SHED_AFTER) - 10,
            Ordering::Relaxed,
        );
        let c2 = registry.admit(c).expect("c2 takes c1's place");
        assert!(c1.shed.is_cancelled());
        // A place freed: admitted.
        drop(c2);
        let _c3 = registry.admit(c).expect("room again");
        assert_eq!(registry.counters.shed.load(Ordering::Relaxed), 2);
        assert_eq!(
            registry.counters.refused_per_peer.load(Ordering::Relaxed),
            1
        );
        drop(b1);
    }

    #[test]
    fn idle_connections_go_before_stalled_responses() {
        let registry = Registry::new(limits(2, 2), 2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let stalled = registry.admit(a).expect("first");
        registry.request_started(&stalled.state);
        stalled.state.write_blocked.store(
            registry.now_ms() - millis(SHED_AFTER) - 1000,
            Ordering::Relaxed,
        );
        let idle = registry.admit(a).expect("second");
        idle.state.idle_from.store(
            registry.now_ms() - millis(SHED_AFTER) - 10,
            Ordering::Relaxed,
        );
        let _new = registry
            .admit("10.0.0.2".parse().expect("ip"))
            .expect("third");
        assert!(idle.shed.is_cancelled());
        assert!(!stalled.shed.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn a_newcomer_waits_for_a_place_then_is_refused() {
        let registry = Registry::new(limits(1, 1), 1);
        let shutdown = CancellationToken::new();
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let busy = registry.admit(a).expect("first");
        registry.request_started(&busy.state);
        // At its per-peer cap: refused at once, not held.
        assert_eq!(
            registry.wait_for_place(a, &shutdown).await.err(),
            Some(Refused::PerPeer)
        );
        // Full of a moving download: b waits, and gets the place when it frees.
        let waiting = tokio::spawn({
            let registry = registry.clone();
            let shutdown = shutdown.clone();
            async move { registry.wait_for_place(b, &shutdown).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiting.is_finished());
        drop(busy);
        assert!(waiting.await.expect("task"));
        assert_eq!(registry.counters.refused_full.load(Ordering::Relaxed), 0);
        // Nothing frees within the header deadline: refused, and counted.
        let busy = registry.admit(a).expect("again");
        registry.request_started(&busy.state);
        let started = tokio::time::Instant::now();
        assert_eq!(
            registry.wait_for_place(b, &shutdown).await.err(),
            Some(Refused::Full)
        );
        assert!(started.elapsed() >= HttpLimits::default().header_timeout);
        assert_eq!(registry.counters.refused_full.load(Ordering::Relaxed), 1);
    }
}
