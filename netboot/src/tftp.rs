//! Read-only TFTP server (RFC 1350) with option negotiation (RFC 2347): `blksize` (RFC 2348),
//! `tsize` and `timeout` (RFC 2349) and `windowsize` (RFC 7440).
//!
//! * The listening socket (usually :69, possibly passed in by systemd) only takes requests.
//!   Every transfer runs on its own thread, with blocking I/O, on its own ephemeral UDP socket,
//!   a new TID as RFC 1350 asks (why a thread: see [`run`]). That socket is bound to the
//!   listening socket's address when it is a specific one; when the listener is bound to the
//!   wildcard address, the transfer socket is bound to the wildcard and `connect`ed to the
//!   client, so the kernel picks the source address by route
//!   (on a provisioning network with one address per interface this is the address the client
//!   talked to). Being connected, the socket only sees packets from the client's TID; strays
//!   from other ports are dropped by the kernel instead of being answered with error 5.
//! * Only reads: a write request gets error 2 (access violation). `netascii` is served byte
//!   for byte like `octet` (boot files are binary; no PXE client asks for netascii).
//! * Files are opened with [`crate::path::open_confined_allowing`]: absolute names are taken relative to
//!   the root, `..`, symlinks leaving the root and non-regular files get error 1 or 2 with the
//!   reason in the message.
//! * Lost packets are retransmitted after the per-packet timeout, at most `max_retries` times in
//!   a row. Duplicate ACKs never trigger a retransmission by themselves (no Sorcerer's
//!   Apprentice); with a window larger than one, the first duplicate of a window's base ACK
//!   starts that window again once (RFC 7440 loss signal). Block numbers roll over from 65535
//!   to 0, so files of any size can be sent.
//! * An ERROR from the client ends its transfer at once. UEFI firmware does this right after
//!   the OACK when it only wanted `tsize`, then asks again.
//! * Limits that keep one client from holding the server ([`TftpSettings`]): a client's
//!   `timeout` option above [`TftpSettings::max_timeout`] is not acknowledged (RFC 2349 lets
//!   the server only accept the value or leave the option out; the server's own timeout then
//!   applies); every transfer ends by its total deadline, `transfer_slack + size / min_rate`;
//!   one client address holds at most [`TftpSettings::max_transfers_per_peer`] of the
//!   [`TftpSettings::max_transfers`] places; when all are taken, the transfer left waiting
//!   for an ACK the longest (for at least [`TftpSettings::timeout`]) is stopped to make room,
//!   so never-acknowledged requests from many addresses churn through their own places; the
//!   blocks one transfer keeps in flight
//!   (window × blksize) stay within [`TftpSettings::window_budget`], and those of all transfers
//!   within [`TftpSettings::memory_budget`]: the window is made smaller to fit, and a transfer
//!   that cannot have even one block is refused as busy. What the limits did is logged as
//!   counters every 10 s, not once per packet.
//!
//! TFTP carries no MAC address, so a transfer cannot be tied to a [`crate::Machine`]; logs carry
//! `ip` and `file` fields and no [`crate::BootEvent`] is reported.

mod admission;
pub mod packet;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use std::io::{BufReader, Read};
use tokio::net::UdpSocket;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use admission::{Busy, Place, Transfers};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::lograte::LogLimit;
use crate::path::{open_confined_allowing, PathError};
use crate::MachineLookup;
use packet::{ErrorCode, Packet, Request};

/// Budgets of the lines logged per request ([`crate::lograte`]): refusals on the listening
/// socket (busy, write requests, malformed requests) and the end of each transfer.
static REFUSED_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("tftp refused", 5, 50));
static TRANSFER_LOG: LazyLock<LogLimit> = LazyLock::new(|| LogLimit::new("tftp transfer", 20, 200));

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Largest window RFC 7440 transfers are allowed here (the RFC itself allows 65535).
pub const MAX_WINDOWSIZE: u16 = 64;
const DEFAULT_BLKSIZE: usize = 512;
/// The file is read through a buffer of this size (blocks larger than it are read directly).
const READ_BUFFER: usize = 64 * 1024;
/// A transfer socket only receives ACKs and ERRORs: anything longer is cut, which is harmless.
const RECV_BUFFER: usize = 2048;
/// The memory budget is counted in units of this many bytes.
const BUDGET_UNIT: usize = 1024;
/// How often the counters of what the limits did are logged (when they changed).
const LIMITS_REPORT_EVERY: Duration = Duration::from_secs(10);

/// How the TFTP server behaves.
#[derive(Debug, Clone)]
pub struct TftpSettings {
    /// Directory served; nothing outside it is ever read, but for what `outside_root` lists.
    pub root: PathBuf,
    /// Files and folders outside `root` that a symlink in it may resolve to (see
    /// [`crate::path::open_confined_allowing`]); none by default. netboot, whose TFTP root is
    /// the iPXE folder, lists [`crate::path::SYSTEM_IPXE_LOADERS`].
    pub outside_root: &'static [&'static str],
    /// Per-packet retransmission timeout when the client does not negotiate `timeout`.
    pub timeout: Duration,
    /// Retransmissions of the same packet or window before a transfer is given up.
    pub max_retries: u32,
    /// Transfers at once; beyond this a transfer left waiting for an ACK for `timeout` is
    /// stopped to make room, else the request gets an error reply.
    pub max_transfers: usize,
    /// Upper bound for a negotiated `blksize` (at most [`MAX_BLKSIZE`]).
    pub max_blksize: u16,
    /// On shutdown, how long in-flight transfers may go on before they are cut.
    pub shutdown_grace: Duration,
    /// Transfers at once from one client address (its share of `max_transfers`).
    pub max_transfers_per_peer: usize,
    /// Largest client `timeout` option acknowledged; a larger one is left out of the OACK.
    pub max_timeout: Duration,
    /// Slowest average rate a transfer may run at, in bytes per second (with the slack).
    pub min_rate: u64,
    /// Added to every transfer's total deadline.
    pub transfer_slack: Duration,
    /// Bytes of blocks one transfer may keep in flight (window × blksize).
    pub window_budget: usize,
    /// Bytes of blocks all transfers together may keep in flight.
    pub memory_budget: usize,
}

impl TftpSettings {
    /// Settings with the defaults: 1 s timeout, 5 retries, 64 transfers (8 per client
    /// address), blksize up to 65464, client timeouts up to 10 s, a total deadline of
    /// 30 s + size / 64 KiB/s, 1 MiB in flight per transfer and 16 MiB in all, 10 s shutdown
    /// grace.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TftpSettings {
            root: root.into(),
            outside_root: &[],
            timeout: Duration::from_secs(1),
            max_retries: 5,
            max_transfers: 64,
            max_blksize: MAX_BLKSIZE,
            shutdown_grace: Duration::from_secs(10),
            max_transfers_per_peer: 8,
            max_timeout: Duration::from_secs(10),
            min_rate: 64 * 1024,
            transfer_slack: Duration::from_secs(30),
            window_budget: 1 << 20,
            memory_budget: 16 << 20,
        }
    }

    /// How long a transfer of `size` bytes may take in all.
    pub fn transfer_deadline(&self, size: u64) -> Duration {
        self.transfer_slack + Duration::from_secs_f64(size as f64 / self.min_rate.max(1) as f64)
    }
}

/// What the limits did, logged as one line every [`LIMITS_REPORT_EVERY`] when it changed.
#[derive(Default)]
struct Counters {
    refused_per_peer: std::sync::atomic::AtomicU64,
    stopped_for_room: std::sync::atomic::AtomicU64,
    refused_memory: std::sync::atomic::AtomicU64,
    window_reduced: std::sync::atomic::AtomicU64,
    timeout_refused: std::sync::atomic::AtomicU64,
    deadline_exceeded: std::sync::atomic::AtomicU64,
}

impl Counters {
    fn add(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; 6] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.refused_per_peer.load(Relaxed),
            self.stopped_for_room.load(Relaxed),
            self.refused_memory.load(Relaxed),
            self.window_reduced.load(Relaxed),
            self.timeout_refused.load(Relaxed),
            self.deadline_exceeded.load(Relaxed),
        ]
    }
}

/// What every transfer shares with the server loop.
struct Shared {
    settings: Arc<TftpSettings>,
    memory: Arc<Semaphore>,
    counters: Counters,
}

/// Serves TFTP read requests arriving on `socket` until `shutdown` is cancelled, then waits for
/// in-flight transfers (at most `shutdown_grace`) and returns.
///
/// `machines` is unused: TFTP requests carry no MAC address to look a machine up by.
pub async fn serve(
    socket: UdpSocket,
    settings: Arc<TftpSettings>,
    machines: Arc<dyn MachineLookup>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    drop(machines);
    let local = socket.local_addr()?;
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let transfers = Transfers::new(
        settings.max_transfers,
        settings.max_transfers_per_peer,
        settings.timeout,
    );
    let shared = Arc::new(Shared {
        settings: settings.clone(),
        memory: Arc::new(Semaphore::new(
            (settings.memory_budget / BUDGET_UNIT).min(Semaphore::MAX_PERMITS),
        )),
        counters: Counters::default(),
    });
    let mut reported = ([0u64; 6], Instant::now());
    let mut buf = vec![0u8; 65536];
    info!(
        addr = %local,
        root = %settings.root.display(),
        max_transfers = settings.max_transfers,
        max_transfers_per_peer = settings.max_transfers_per_peer,
        max_timeout_s = settings.max_timeout.as_secs(),
        min_rate = settings.min_rate,
        window_budget = settings.window_budget,
        memory_budget = settings.memory_budget,
        "TFTP server listening"
    );

    let result = loop {
        let (len, peer) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) if is_transient(&e) => {
                    debug!(error = %e, "TFTP receive error, ignored");
                    continue;
                }
                Err(e) => break Err(e),
            },
        };
        if peer.port() == 0 {
            continue;
        }
        report_limits(&shared.counters, &mut reported);
        let ip = peer.ip();
        let reply = match Packet::parse(&buf[..len]) {
            Ok(Packet::Rrq(req)) => match transfers.admit(ip) {
                Err(Busy::PerPeer) => {
                    Counters::add(&shared.counters.refused_per_peer);
                    debug!(%ip, file = %req.filename, "TFTP request refused: this client's share of transfers is in use");
                    Some(packet::error(
                        ErrorCode::NotDefined,
                        "server busy: too many transfers from this address, try again later",
                    ))
                }
                Ok((place, stopped)) => {
                    if stopped {
                        Counters::add(&shared.counters.stopped_for_room);
                    }
                    tracker.spawn(transfer(
                        peer,
                        local.ip(),
                        req,
                        shared.clone(),
                        abort.clone(),
                        place,
                    ));
                    None
                }
                Err(Busy::Full) => {
                    if REFUSED_LOG.allow() {
                        warn!(%ip, file = %req.filename, max_transfers = settings.max_transfers,
                            "TFTP request refused: too many transfers in progress");
                    }
                    Some(packet::error(
                        ErrorCode::NotDefined,
                        "server busy: too many transfers in progress, try again later",
                    ))
                }
            },
            Ok(Packet::Wrq(req)) => {
                if REFUSED_LOG.allow() {
                    warn!(%ip, file = %req.filename, "TFTP write request refused");
                }
                Some(packet::error(
                    ErrorCode::AccessViolation,
                    "read-only server: uploads are not accepted",
                ))
            }
            // Never answer an error with an error; other packets belong to no transfer here.
            Ok(other) => {
                debug!(%ip, packet = ?other, "TFTP packet outside a transfer ignored");
                None
            }
            Err(e @ (packet::ParseError::TooShort | packet::ParseError::UnknownOpcode(_))) => {
                debug!(%ip, error = %e, "malformed TFTP packet ignored");
                None
            }
            Err(e) => {
                if REFUSED_LOG.allow() {
                    info!(%ip, error = %e, "malformed TFTP request");
                }
                Some(packet::error(e.code(), &format!("malformed request: {e}")))
            }
        };
        if let Some(reply) = reply {
            if let Err(e) = socket.send_to(&reply, peer).await {
                debug!(%ip, error = %e, "could not send TFTP error reply");
            }
        }
    };

    tracker.close();
    if !tracker.is_empty() {
        info!(
            transfers = tracker.len(),
            "TFTP server stopping: waiting for transfers in progress"
        );
    }
    if tokio::time::timeout(settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        warn!(
            transfers = tracker.len(),
            "TFTP shutdown grace elapsed: cutting transfers"
        );
        abort.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), tracker.wait()).await;
    }
    info!(addr = %local, "TFTP server stopped");
    result
}

/// Logs the counters' changes since the last report, at most every [`LIMITS_REPORT_EVERY`].
fn report_limits(counters: &Counters, reported: &mut ([u64; 6], Instant)) {
    if reported.1.elapsed() < LIMITS_REPORT_EVERY {
        return;
    }
    let now = counters.snapshot();
    if now != reported.0 {
        let d: Vec<u64> = now.iter().zip(reported.0).map(|(a, b)| a - b).collect();
        warn!(
            refused_per_peer_share = d[0],
            stopped_for_room = d[1],
            refused_memory_budget = d[2],
            window_reduced = d[3],
            timeout_option_refused = d[4],
            deadline_exceeded = d[5],
            "TFTP limits applied"
        );
    }
    *reported = (now, Instant::now());
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    ) || e.raw_os_error().is_some_and(
        |c| c == 113 /* EHOSTUNREACH */ || c == 101, /* ENETUNREACH */
    )
}

/// How a transfer ended, when it did not end with the whole file acknowledged.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("{1}")]
    Refused(ErrorCode, String),
    #[error("client sent error {code}: {message:?}")]
    ClientError { code: u16, message: String },
    #[error("client stopped answering after {0} retransmissions")]
    TimedOut(u32),
    #[error("transfer not done within its total deadline of {0:?}")]
    DeadlineExceeded(Duration),
    #[error("stopped to make room: the client left it waiting for an ACK")]
    Stopped,
    #[error("client went away (ICMP unreachable)")]
    ClientGone,
    #[error("cut by server shutdown")]
    Aborted,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Options accepted for one transfer.
#[derive(Debug)]
pub struct Negotiated {
    pub blksize: usize,
    pub windowsize: usize,
    pub timeout: Duration,
    /// The OACK's options, in the order the client sent them.
    pub oack: Vec<(&'static str, String)>,
    /// The client asked for a `timeout` above [`TftpSettings::max_timeout`].
    pub timeout_refused: bool,
}

impl Negotiated {
    /// Lowers the window to `windowsize` blocks (and the OACK's value with it).
    fn set_window(&mut self, windowsize: usize) {
        self.windowsize = windowsize;
        for (name, value) in &mut self.oack {
            if *name == "windowsize" {
                *value = windowsize.to_string();
            }
        }
    }

    /// Bytes of blocks in flight.
    pub fn in_flight(&self) -> usize {
        self.windowsize * self.blksize
    }
}

/// The options of `req` for a file of `size` bytes as the server accepts them: what the
/// transfer uses and the OACK that says so. The window fits [`TftpSettings::window_budget`].
pub fn negotiate(req: &Request, size: u64, settings: &TftpSettings) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: settings.timeout,
        oack: Vec::new(),
        timeout_refused: false,
    };
    let max_timeout = settings.max_timeout.as_secs().clamp(1, 255);
    for (name, value) in &req.options {
        let name = name.as_str();
        if n.oack.iter().any(|(seen, _)| *seen == name) {
            continue; // a repeated option: the first one counts
        }
        let value: Option<u64> = value.trim().parse().ok();
        match (name, value) {
            ("blksize", Some(v)) if v >= 8 => {
                let max = u64::from(settings.max_blksize.clamp(8, MAX_BLKSIZE));
                let v = v.min(max);
                n.blksize = v as usize;
                n.oack.push(("blksize", v.to_string()));
            }
            ("tsize", Some(_)) => n.oack.push(("tsize", size.to_string())),
            ("timeout", Some(v)) if (1..=max_timeout).contains(&v) => {
                n.timeout = Duration::from_secs(v);
                n.oack.push(("timeout", v.to_string()));
            }
            ("timeout", Some(v)) if v > max_timeout => n.timeout_refused = true,
            ("windowsize", Some(v)) if v >= 1 => {
                let v = v.min(u64::from(MAX_WINDOWSIZE));
                n.windowsize = v as usize;
                n.oack.push(("windowsize", v.to_string()));
            }
            _ => {} // unknown or out-of-range options are left out of the OACK
        }
    }
    let fits = (settings.window_budget / n.blksize).max(1);
    if n.windowsize > fits {
        n.set_window(fits);
    }
    n
}

/// A transfer's share of [`TftpSettings::memory_budget`].
struct MemoryShare {
    _permit: OwnedSemaphorePermit,
}

/// Reserves memory for `n`'s blocks in flight, with a smaller window when the whole one does
/// not fit, and none (busy) when even one block does not.
fn reserve_memory(shared: &Shared, n: &mut Negotiated) -> Option<MemoryShare> {
    let units = |bytes: usize| u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX);
    if let Ok(permit) = shared
        .memory
        .clone()
        .try_acquire_many_owned(units(n.in_flight()))
    {
        return Some(MemoryShare { _permit: permit });
    }
    // Half the window at a time: a transfer still gets what is left.
    let mut window = n.windowsize / 2;
    while window >= 1 {
        let bytes = window * n.blksize;
        if let Ok(permit) = shared.memory.clone().try_acquire_many_owned(units(bytes)) {
            n.set_window(window);
            Counters::add(&shared.counters.window_reduced);
            return Some(MemoryShare { _permit: permit });
        }
        window /= 2;
    }
    Counters::add(&shared.counters.refused_memory);
    None
}

fn refusal(e: PathError) -> TransferError {
    let code = match &e {
        PathError::NotFound(_) => ErrorCode::FileNotFound,
        PathError::NotAllowed(_) | PathError::NotAFile(_) | PathError::Escapes(_) => {
            ErrorCode::AccessViolation
        }
        PathError::Io(_, io) if io.kind() == io::ErrorKind::PermissionDenied => {
            ErrorCode::AccessViolation
        }
        PathError::Io(..) => ErrorCode::NotDefined,
    };
    TransferError::Refused(code, e.to_string())
}

/// How often a transfer waiting for its client looks at its stop and shutdown tokens: the
/// longest a transfer stopped for room or cut by shutdown keeps its thread and socket.
const CANCEL_CHECK: Duration = Duration::from_millis(100);
/// Stack of a transfer's thread: its buffers are on the heap.
const TRANSFER_STACK: usize = 256 * 1024;

/// One transfer, from its request to its log line. The transfer itself runs on a thread of
/// its own (see [`run`]); this task waits for it so that shutdown can track it.
async fn transfer(
    peer: SocketAddr,
    local_ip: IpAddr,
    req: Request,
    shared: Arc<Shared>,
    abort: CancellationToken,
    place: Place,
) {
    let ip = peer.ip();
    let file = req.filename.clone();
    let started = Instant::now();
    debug!(%ip, %file, mode = %req.mode, options = ?req.options, "TFTP read request");
    let (done, result) = tokio::sync::oneshot::channel();
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("tftp-transfer".into())
        .stack_size(TRANSFER_STACK)
        .spawn(move || {
            let _ = done.send(run(peer, local_ip, req, &thread_shared, &abort, place));
        });
    let result = match spawned {
        Ok(_) => result.await.unwrap_or_else(|_| {
            Err(TransferError::Io(io::Error::other(
                "transfer thread ended early",
            )))
        }),
        Err(e) => Err(TransferError::Io(io::Error::other(format!(
            "cannot start a transfer thread: {e}"
        )))),
    };
    if !TRANSFER_LOG.allow() {
        return;
    }
    match result {
        Ok((bytes, n)) => {
            let secs = started.elapsed().as_secs_f64();
            info!(%ip, %file, bytes, blksize = n.blksize, windowsize = n.windowsize,
                ms = (secs * 1000.0) as u64, "TFTP file served");
        }
        Err(TransferError::Refused(code, message)) => match code {
            ErrorCode::FileNotFound => info!(%ip, %file, "TFTP request refused: {message}"),
            _ => warn!(%ip, %file, "TFTP request refused: {message}"),
        },
        Err(e @ TransferError::ClientError { .. }) => {
            info!(%ip, %file, "TFTP transfer ended by the client: {e}")
        }
        // Counted; one line per stopped transfer would flood the log under attack.
        Err(e @ TransferError::Stopped) => debug!(%ip, %file, "TFTP transfer ended: {e}"),
        Err(e @ TransferError::DeadlineExceeded(_)) => {
            Counters::add(&shared.counters.deadline_exceeded);
            warn!(%ip, %file, "TFTP transfer failed: {e}")
        }
        Err(e) => warn!(%ip, %file, "TFTP transfer failed: {e}"),
    }
}

/// A whole transfer, on its own thread with blocking I/O, as tftpd-hpa runs each in a
/// process of its own: the kernel wakes the one thread whose client answered, straight from
/// the socket, and each transfer is scheduled on its own. Multiplexed on the runtime's few
/// workers instead, every DATA sent woke a local client that preempted the worker serving all
/// the other transfers: with 100 clients on the same 2 cores that made us 0.72x tftpd-hpa
/// although we spent less CPU per block (tests/bench/tftp.sh). Not the runtime's blocking
/// pool: it is bounded and shared with the HTTP server's file reads, and a transfer holds its
/// thread for its whole life. Transfers are bounded by `max_transfers`.
fn run(
    peer: SocketAddr,
    local_ip: IpAddr,
    req: Request,
    shared: &Shared,
    abort: &CancellationToken,
    place: Place,
) -> Result<(u64, Negotiated), TransferError> {
    let settings = shared.settings.as_ref();
    let started = Instant::now();
    let bind_ip = match (local_ip, peer) {
        (ip, _) if !ip.is_unspecified() && ip.is_ipv4() == peer.is_ipv4() => ip,
        (_, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (_, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = std::net::UdpSocket::bind((bind_ip, 0))?;
    sock.connect(peer)?;
    sock.set_read_timeout(Some(CANCEL_CHECK))?;

    let opened = open_confined_allowing(&settings.root, &req.filename, settings.outside_root);
    let (file, size) = match opened.map_err(refusal) {
        Ok((file, size, _)) => (file, size),
        Err(e) => {
            if let TransferError::Refused(code, message) = &e {
                // Best effort: the client learns why; a lost error packet is not retried.
                let _ = sock.send(&packet::error(*code, message));
            }
            return Err(e);
        }
    };

    let mut n = negotiate(&req, size, settings);
    if n.timeout_refused {
        Counters::add(&shared.counters.timeout_refused);
    }
    let Some(_memory) = reserve_memory(shared, &mut n) else {
        let _ = sock.send(&packet::error(
            ErrorCode::NotDefined,
            "server busy: out of transfer memory, try again later",
        ));
        return Err(TransferError::Refused(
            ErrorCode::NotDefined,
            "memory budget exhausted".into(),
        ));
    };
    let total = settings.transfer_deadline(size);
    let mut sender = Sender {
        sock,
        reader: BufReader::with_capacity(READ_BUFFER, file),
        blksize: n.blksize,
        windowsize: n.windowsize,
        timeout: n.timeout,
        max_retries: settings.max_retries,
        abort,
        place: &place,
        deadline: started + total,
        total,
        base: 1,
        pending: VecDeque::new(),
        spare: Vec::new(),
        last_block: None,
        bytes: 0,
        buf: vec![0u8; RECV_BUFFER],
        read_timeout: CANCEL_CHECK,
    };
    let sent = (|| {
        if !n.oack.is_empty() {
            sender.send_oack(&packet::oack(&n.oack))?;
        }
        sender.send_file()
    })();
    if let Err(e @ (TransferError::DeadlineExceeded(_) | TransferError::Stopped)) = &sent {
        // Best effort: the client learns why instead of timing out.
        let _ = sender
            .sock
            .send(&packet::error(ErrorCode::NotDefined, &e.to_string()));
    }
    Ok((sent?, n))
}

/// Sends one file over a connected, blocking socket in lock-step windows.
struct Sender<'a, R> {
    sock: std::net::UdpSocket,
    reader: R,
    blksize: usize,
    windowsize: usize,
    timeout: Duration,
    max_retries: u32,
    abort: &'a CancellationToken,
    /// Its place in the transfer table: told of every ACK that moves the transfer on, and
    /// cancelled when the transfer is stopped to make room for another.
    place: &'a Place,
    /// When the whole transfer must be done, and how long that was.
    deadline: Instant,
    total: Duration,
    /// Absolute number of the first unacknowledged block (block 1 is the first of the file).
    base: u64,
    /// DATA packets for blocks `base..`, ready to (re)send.
    pending: VecDeque<Vec<u8>>,
    /// Buffers of acknowledged packets, reused for the next blocks.
    spare: Vec<Vec<u8>>,
    /// Absolute number of the final (short) block, once read.
    last_block: Option<u64>,
    bytes: u64,
    buf: Vec<u8>,
    /// The socket's receive timeout as last set.
    read_timeout: Duration,
}

/// Block number on the wire: counts on from 65535 to 0.
fn wire(block: u64) -> u16 {
    (block & 0xffff) as u16
}

enum Received {
    Packet(usize),
    Timeout,
}

impl<R: Read> Sender<'_, R> {
    /// The next packet from the client, or `Timeout` at `deadline`. Waits in slices of at
    /// most [`CANCEL_CHECK`] so that a stop or a shutdown is seen while the client is silent.
    fn recv(&mut self, deadline: Instant) -> Result<Received, TransferError> {
        let end = deadline.min(self.deadline);
        loop {
            if self.abort.is_cancelled() {
                return Err(TransferError::Aborted);
            }
            if self.place.stop.is_cancelled() {
                return Err(TransferError::Stopped);
            }
            let now = Instant::now();
            if now >= end {
                return if end == self.deadline {
                    Err(TransferError::DeadlineExceeded(self.total))
                } else {
                    Ok(Received::Timeout)
                };
            }
            let wait = (end - now).clamp(Duration::from_millis(1), CANCEL_CHECK);
            if wait != self.read_timeout {
                self.sock.set_read_timeout(Some(wait))?;
                self.read_timeout = wait;
            }
            match self.sock.recv(&mut self.buf) {
                Ok(n) => return Ok(Received::Packet(n)),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    return Err(TransferError::ClientGone)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&self, packet: &[u8]) -> Result<(), TransferError> {
        loop {
            return match self.sock.send(packet) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    Err(TransferError::ClientGone)
                }
                Err(e) => Err(e.into()),
            };
        }
    }

    /// Sends the OACK until the client acknowledges it with ACK 0.
    fn send_oack(&mut self, oack: &[u8]) -> Result<(), TransferError> {
        let mut retries = 0;
        loop {
            self.send(oack)?;
            let deadline = Instant::now() + self.timeout;
            loop {
                match self.recv(deadline)? {
                    Received::Timeout => break,
                    Received::Packet(len) => match Packet::parse(&self.buf[..len]) {
                        Ok(Packet::Ack { block: 0 }) => {
                            self.place.acked();
                            return Ok(());
                        }
                        Ok(Packet::Error { code, message }) => {
                            // UEFI's tsize probe ends so: the client is there and answers.
                            self.place.acked();
                            return Err(TransferError::ClientError { code, message });
                        }
                        _ => {}
                    },
                }
            }
            retries += 1;
            if retries > self.max_retries {
                return Err(TransferError::TimedOut(self.max_retries));
            }
        }
    }

    /// Reads blocks until the window is full or the last block has been read.
    fn fill(&mut self) -> Result<(), TransferError> {
        while self.pending.len() < self.windowsize && self.last_block.is_none() {
            let block = self.base + self.pending.len() as u64;
            let mut packet = self.spare.pop().unwrap_or_default();
            packet.clear();
            packet.extend_from_slice(&packet::OP_DATA.to_be_bytes());
            packet.extend_from_slice(&wire(block).to_be_bytes());
            packet.resize(4 + self.blksize, 0);
            let mut filled = 0;
            while filled < self.blksize {
                match self.reader.read(&mut packet[4 + filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            packet.truncate(4 + filled);
            self.bytes += filled as u64;
            if filled < self.blksize {
                self.last_block = Some(block);
            }
            self.pending.push_back(packet);
        }
        Ok(())
    }

    /// Sends the whole file; returns the number of bytes sent once the last block is acked.
    fn send_file(&mut self) -> Result<u64, TransferError> {
        let mut retries = 0;
        // Base for which a duplicate ACK already restarted the window (windowsize > 1 only).
        let mut dup_restart: Option<u64> = None;
        loop {
            self.fill()?;
            if self.pending.is_empty() {
                return Ok(self.bytes);
            }
            for packet in &self.pending {
                self.send(packet)?;
            }
            let deadline = Instant::now() + self.timeout;
            let progressed = loop {
                let len = match self.recv(deadline)? {
                    Received::Timeout => break false,
                    Received::Packet(len) => len,
                };
                match Packet::parse(&self.buf[..len]) {
                    Ok(Packet::Ack { block }) => {
                        let acked =
                            (0..self.pending.len() as u64).find(|i| wire(self.base + i) == block);
                        if let Some(i) = acked {
                            self.place.acked();
                            let done = self.pending.drain(..=i as usize);
                            self.spare.extend(done);
                            self.base += i + 1;
                            retries = 0;
                            break true;
                        }
                        if self.windowsize > 1
                            && block == wire(self.base.wrapping_sub(1))
                            && dup_restart != Some(self.base)
                        {
                            dup_restart = Some(self.base);
                            break true;
                        }
                        // An old or duplicate ACK: ignored.
                    }
                    Ok(Packet::Error { code, message }) => {
                        return Err(TransferError::ClientError { code, message })
                    }
                    _ => {} // garbage on the transfer socket is ignored
                }
            };
            if !progressed {
                retries += 1;
                if retries > self.max_retries {
                    return Err(TransferError::TimedOut(self.max_retries));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(options: &[(&str, &str)]) -> Request {
        Request {
            filename: "f".into(),
            mode: packet::Mode::Octet,
            options: options
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    #[test]
    fn negotiates_options() {
        let s = TftpSettings::new("/nonexistent");
        let n = negotiate(
            &req(&[
                ("blksize", "70000"),
                ("tsize", "0"),
                ("timeout", "3"),
                ("windowsize", "100"),
                ("x", "1"),
            ]),
            1234,
            &s,
        );
        assert_eq!(n.blksize, 65464);
        // 64 blocks of 65464 bytes would be 4 MiB in flight: the 1 MiB budget allows 16.
        assert_eq!(n.windowsize, 16);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            vec![
                ("blksize", "65464".to_string()),
                ("tsize", "1234".to_string()),
                ("timeout", "3".to_string()),
                ("windowsize", "16".to_string())
            ]
        );
        let n = negotiate(&req(&[("blksize", "1468"), ("windowsize", "100")]), 1, &s);
        assert_eq!((n.blksize, n.windowsize), (1468, 64));
        let n = negotiate(
            &req(&[
                ("blksize", "7"),
                ("timeout", "0"),
                ("timeout", "256"),
                ("windowsize", "0"),
                ("tsize", "x"),
            ]),
            1,
            &s,
        );
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 1, s.timeout));
        assert!(n.oack.is_empty(), "{:?}", n.oack);
        let n = negotiate(&req(&[("blksize", "1468"), ("blksize", "8")]), 1, &s);
        assert_eq!(n.blksize, 1468, "the first of repeated options counts");
        // A timeout above max_timeout (10 s) is left out: the server's own applies.
        for (asked, kept) in [("10", true), ("11", false), ("255", false)] {
            let n = negotiate(&req(&[("timeout", asked), ("tsize", "0")]), 5, &s);
            assert_eq!(n.timeout_refused, !kept, "{asked}");
            assert_eq!(
                n.timeout,
                if kept {
                    Duration::from_secs(10)
                } else {
                    s.timeout
                },
                "{asked}"
            );
            assert_eq!(n.oack.iter().any(|(k, _)| *k == "timeout"), kept, "{asked}");
        }
        let small = TftpSettings {
            max_blksize: 1024,
            ..TftpSettings::new("/x")
        };
        assert_eq!(
            negotiate(&req(&[("blksize", "1468")]), 1, &small).blksize,
            1024
        );
    }

    #[test]
    fn memory_budget_shrinks_windows_then_refuses() {
        let settings = Arc::new(TftpSettings {
            memory_budget: 100 * 1024,
            ..TftpSettings::new("/x")
        });
        let shared = Shared {
            settings: settings.clone(),
            memory: Arc::new(Semaphore::new(100)),
            counters: Counters::default(),
        };
        let ask = |window: &str| {
            negotiate(
                &req(&[("blksize", "8192"), ("windowsize", window)]),
                1,
                &settings,
            )
        };
        // 8 × 8 KiB fits the 100 KiB budget.
        let mut a = ask("8");
        let held_a = reserve_memory(&shared, &mut a).expect("fits");
        assert_eq!(a.windowsize, 8);
        // 36 KiB left: 8 blocks do not fit, 4 do (the OACK says so).
        let mut b = ask("8");
        let held_b = reserve_memory(&shared, &mut b).expect("smaller window");
        assert_eq!(b.windowsize, 4);
        assert_eq!(b.oack[1], ("windowsize", "4".to_string()));
        // 4 KiB left: not even one 8 KiB block.
        let mut c = ask("1");
        assert!(reserve_memory(&shared, &mut c).is_none());
        drop((held_a, held_b));
        assert!(reserve_memory(&shared, &mut c).is_some(), "freed");
        let counts = shared.counters.snapshot();
        assert_eq!(
            (counts[2], counts[3]),
            (1, 1),
            "one refused, one window reduced"
        );
    }

    #[test]
    fn total_deadline_grows_with_the_file() {
        let s = TftpSettings::new("/x");
        assert_eq!(s.transfer_deadline(0), Duration::from_secs(30));
        // ipxe.efi is about 1 MiB: 16 s at 64 KiB/s, plus the slack.
        assert_eq!(s.transfer_deadline(1 << 20), Duration::from_secs(46));
        assert_eq!(
            s.transfer_deadline(96 * 1024),
            Duration::from_millis(31_500)
        );
    }

    /// A sender over loopback for `data` with this blksize and window, from a fresh place.
    fn sender_for<'a>(
        data: &[u8],
        blksize: usize,
        windowsize: usize,
        abort: &'a CancellationToken,
        place: &'a Place,
    ) -> (Sender<'a, std::io::Cursor<Vec<u8>>>, std::net::UdpSocket) {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind client");
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind server");
        sock.connect(client.local_addr().expect("addr"))
            .expect("connect");
        sock.set_read_timeout(Some(CANCEL_CHECK)).expect("timeout");
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let sender = Sender {
            sock,
            reader: std::io::Cursor::new(data.to_vec()),
            blksize,
            windowsize,
            timeout: Duration::from_secs(5),
            max_retries: 2,
            abort,
            place,
            deadline: Instant::now() + Duration::from_secs(60),
            total: Duration::from_secs(60),
            base: 1,
            pending: VecDeque::new(),
            spare: Vec::new(),
            last_block: None,
            bytes: 0,
            buf: vec![0u8; RECV_BUFFER],
            read_timeout: CANCEL_CHECK,
        };
        (sender, client)
    }

    /// Receives a whole file as a client that acknowledges every `windowsize`-th block and
    /// the last one; returns the bytes.
    fn receive(client: &std::net::UdpSocket, blksize: usize, windowsize: usize) -> Vec<u8> {
        let mut data = Vec::new();
        let mut buf = vec![0u8; blksize + 4];
        let mut expected = 1u16;
        loop {
            let (n, from) = client.recv_from(&mut buf).expect("a DATA packet");
            assert_eq!(&buf[..2], &packet::OP_DATA.to_be_bytes(), "DATA");
            let block = u16::from_be_bytes([buf[2], buf[3]]);
            assert_eq!(block, expected, "blocks in order");
            data.extend_from_slice(&buf[4..n]);
            let last = n - 4 < blksize;
            if last || usize::from(block) % windowsize == 0 {
                let mut ack = packet::OP_ACK.to_be_bytes().to_vec();
                ack.extend_from_slice(&block.to_be_bytes());
                client.send_to(&ack, from).expect("ack");
            }
            if last {
                return data;
            }
            expected = expected.wrapping_add(1);
        }
    }

    #[test]
    fn sends_every_byte_at_every_block_boundary() {
        let transfers = Transfers::new(4, 4, Duration::from_secs(1));
        let abort = CancellationToken::new();
        for (blksize, windowsize) in [(512, 1), (8, 3), (1468, 4)] {
            for len in [
                0,
                1,
                blksize - 1,
                blksize,
                blksize + 1,
                3 * blksize,
                5 * blksize + 7,
            ] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
                let (place, _) = transfers
                    .admit("127.0.0.1".parse().expect("ip"))
                    .expect("a place");
                let (mut sender, client) = sender_for(&data, blksize, windowsize, &abort, &place);
                let got = std::thread::scope(|scope| {
                    let got = scope.spawn(|| receive(&client, blksize, windowsize));
                    assert_eq!(sender.send_file().expect("sent"), len as u64);
                    got.join().expect("client")
                });
                assert_eq!(got, data, "blksize {blksize} window {windowsize} len {len}");
                // Acknowledged packets' buffers are reused, not one allocation per block.
                assert!(sender.spare.len() <= windowsize);
            }
        }
    }

    #[test]
    fn a_silent_transfer_sees_its_stop_and_the_shutdown() {
        let transfers = Transfers::new(1, 2, Duration::from_secs(1));
        let abort = CancellationToken::new();
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let (place, _) = transfers.admit(ip).expect("a place");
        let data = vec![1u8; 4096];
        let (mut sender, _client) = sender_for(&data, 512, 1, &abort, &place);
        // The client never acknowledges; another request takes the place (full, never
        // answered): the transfer ends as stopped, not after its retries of 5 s (timed out).
        let result = std::thread::scope(|scope| {
            let ended = scope.spawn(|| sender.send_file());
            let (_newer, stopped) = transfers.admit(ip).expect("room made");
            assert!(stopped);
            ended.join().expect("sender")
        });
        assert!(matches!(result, Err(TransferError::Stopped)), "{result:?}");

        let other = Transfers::new(1, 1, Duration::from_secs(1));
        let (place, _) = other.admit(ip).expect("a place");
        let (mut sender, _client) = sender_for(&data, 512, 1, &abort, &place);
        let result = std::thread::scope(|scope| {
            let ended = scope.spawn(|| sender.send_file());
            abort.cancel();
            ended.join().expect("sender")
        });
        assert!(matches!(result, Err(TransferError::Aborted)), "{result:?}");
    }

    #[test]
    fn block_numbers_roll_over() {
        assert_eq!(wire(65535), 65535);
        assert_eq!(wire(65536), 0);
        assert_eq!(wire(65537), 1);
    }
}
