//! Read-only TFTP server (RFC 1350) with option negotiation (RFC 2347): `blksize` (RFC 2348),
//! `tsize` and `timeout` (RFC 2349) and `windowsize` (RFC 7440).
//!
//! * The listening socket (usually :69, possibly passed in by systemd) only takes requests.
//!   Every transfer runs in its own task on its own ephemeral UDP socket, a new TID as RFC 1350
//!   asks. That socket is bound to the listening socket's address when it is a specific one;
//!   when the listener is bound to the wildcard address, the transfer socket is bound to the
//!   wildcard and `connect`ed to the client, so the kernel picks the source address by route
//!   (on a provisioning network with one address per interface this is the address the client
//!   talked to). Being connected, the socket only sees packets from the client's TID; strays
//!   from other ports are dropped by the kernel instead of being answered with error 5.
//! * Only reads: a write request gets error 2 (access violation). `netascii` is served byte
//!   for byte like `octet` (boot files are binary; no PXE client asks for netascii).
//! * Files are opened with [`crate::path::open_confined`]: absolute names are taken relative to
//!   the root, `..`, symlinks leaving the root and non-regular files get error 1 or 2 with the
//!   reason in the message.
//! * Lost packets are retransmitted after the per-packet timeout, at most `max_retries` times in
//!   a row. Duplicate ACKs never trigger a retransmission by themselves (no Sorcerer's
//!   Apprentice); with a window larger than one, the first duplicate of a window's base ACK
//!   starts that window again once (RFC 7440 loss signal). Block numbers roll over from 65535
//!   to 0, so files of any size can be sent.
//! * An ERROR from the client ends its transfer at once. UEFI firmware does this right after
//!   the OACK when it only wanted `tsize`, then asks again.
//!
//! TFTP carries no MAC address, so a transfer cannot be tied to a [`crate::Machine`]; logs carry
//! `ip` and `file` fields and no [`crate::BootEvent`] is reported.

mod packet;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::lograte::LogLimit;
use crate::path::{open_confined, PathError};
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

/// How the TFTP server behaves.
#[derive(Debug, Clone)]
pub struct TftpSettings {
    /// Directory served; nothing outside it is ever read.
    pub root: PathBuf,
    /// Per-packet retransmission timeout when the client does not negotiate `timeout`.
    pub timeout: Duration,
    /// Retransmissions of the same packet or window before a transfer is given up.
    pub max_retries: u32,
    /// Transfers at once; requests beyond this get an error reply.
    pub max_transfers: usize,
    /// Upper bound for a negotiated `blksize` (at most [`MAX_BLKSIZE`]).
    pub max_blksize: u16,
    /// On shutdown, how long in-flight transfers may go on before they are cut.
    pub shutdown_grace: Duration,
}

impl TftpSettings {
    /// Settings with the defaults: 1 s timeout, 5 retries, 64 transfers, blksize up to 65464,
    /// 10 s shutdown grace.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        TftpSettings {
            root: root.into(),
            timeout: Duration::from_secs(1),
            max_retries: 5,
            max_transfers: 64,
            max_blksize: MAX_BLKSIZE,
            shutdown_grace: Duration::from_secs(10),
        }
    }
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
    let permits = Arc::new(Semaphore::new(settings.max_transfers));
    let mut buf = vec![0u8; 65536];
    info!(addr = %local, root = %settings.root.display(), "TFTP server listening");

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
        let ip = peer.ip();
        let reply = match Packet::parse(&buf[..len]) {
            Ok(Packet::Rrq(req)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let settings = settings.clone();
                    let abort = abort.clone();
                    tracker.spawn(async move {
                        let _permit = permit;
                        transfer(peer, local.ip(), req, &settings, &abort).await;
                    });
                    None
                }
                Err(_) => {
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
    #[error("client went away (ICMP unreachable)")]
    ClientGone,
    #[error("cut by server shutdown")]
    Aborted,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Options accepted for one transfer.
struct Negotiated {
    blksize: usize,
    windowsize: usize,
    timeout: Duration,
    oack: Vec<(&'static str, String)>,
}

fn negotiate(req: &Request, size: u64, settings: &TftpSettings) -> Negotiated {
    let mut n = Negotiated {
        blksize: DEFAULT_BLKSIZE,
        windowsize: 1,
        timeout: settings.timeout,
        oack: Vec::new(),
    };
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
            ("timeout", Some(v)) if (1..=255).contains(&v) => {
                n.timeout = Duration::from_secs(v);
                n.oack.push(("timeout", v.to_string()));
            }
            ("windowsize", Some(v)) if v >= 1 => {
                let v = v.min(u64::from(MAX_WINDOWSIZE));
                n.windowsize = v as usize;
                n.oack.push(("windowsize", v.to_string()));
            }
            _ => {} // unknown or out-of-range options are left out of the OACK
        }
    }
    n
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

async fn transfer(
    peer: SocketAddr,
    local_ip: IpAddr,
    req: Request,
    settings: &TftpSettings,
    abort: &CancellationToken,
) {
    let ip = peer.ip();
    let file = req.filename.clone();
    let started = Instant::now();
    debug!(%ip, %file, mode = %req.mode, options = ?req.options, "TFTP read request");
    let result = run(peer, local_ip, req, settings, abort).await;
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
        Err(e) => warn!(%ip, %file, "TFTP transfer failed: {e}"),
    }
}

async fn run(
    peer: SocketAddr,
    local_ip: IpAddr,
    req: Request,
    settings: &TftpSettings,
    abort: &CancellationToken,
) -> Result<(u64, Negotiated), TransferError> {
    let bind_ip = match (local_ip, peer) {
        (ip, _) if !ip.is_unspecified() && ip.is_ipv4() == peer.is_ipv4() => ip,
        (_, SocketAddr::V4(_)) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (_, SocketAddr::V6(_)) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let sock = UdpSocket::bind((bind_ip, 0)).await?;
    sock.connect(peer).await?;

    let root = settings.root.clone();
    let name = req.filename.clone();
    let opened = tokio::task::spawn_blocking(move || open_confined(&root, &name))
        .await
        .map_err(|e| io::Error::other(format!("file open task failed: {e}")))?;
    let (file, size) = match opened.map_err(refusal) {
        Ok((file, size, _)) => (file, size),
        Err(e) => {
            if let TransferError::Refused(code, message) = &e {
                // Best effort: the client learns why; a lost error packet is not retried.
                let _ = sock.send(&packet::error(*code, message)).await;
            }
            return Err(e);
        }
    };

    let n = negotiate(&req, size, settings);
    let mut sender = Sender {
        sock,
        reader: BufReader::with_capacity(
            (n.blksize * n.windowsize).clamp(64 * 1024, 1024 * 1024),
            tokio::fs::File::from_std(file),
        ),
        blksize: n.blksize,
        windowsize: n.windowsize,
        timeout: n.timeout,
        max_retries: settings.max_retries,
        abort,
        base: 1,
        pending: VecDeque::new(),
        last_block: None,
        bytes: 0,
        buf: vec![0u8; 65536],
    };
    if !n.oack.is_empty() {
        sender.send_oack(&packet::oack(&n.oack)).await?;
    }
    let bytes = sender.send_file().await?;
    Ok((bytes, n))
}

/// Sends one file over a connected socket in lock-step windows.
struct Sender<'a, R> {
    sock: UdpSocket,
    reader: R,
    blksize: usize,
    windowsize: usize,
    timeout: Duration,
    max_retries: u32,
    abort: &'a CancellationToken,
    /// Absolute number of the first unacknowledged block (block 1 is the first of the file).
    base: u64,
    /// DATA packets for blocks `base..`, ready to (re)send.
    pending: VecDeque<Vec<u8>>,
    /// Absolute number of the final (short) block, once read.
    last_block: Option<u64>,
    bytes: u64,
    buf: Vec<u8>,
}

/// Block number on the wire: counts on from 65535 to 0.
fn wire(block: u64) -> u16 {
    (block & 0xffff) as u16
}

enum Received {
    Packet(usize),
    Timeout,
}

impl<R: AsyncRead + Unpin> Sender<'_, R> {
    async fn recv(&mut self, deadline: tokio::time::Instant) -> Result<Received, TransferError> {
        tokio::select! {
            _ = self.abort.cancelled() => Err(TransferError::Aborted),
            r = tokio::time::timeout_at(deadline, self.sock.recv(&mut self.buf)) => match r {
                Err(_) => Ok(Received::Timeout),
                Ok(Ok(n)) => Ok(Received::Packet(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    Err(TransferError::ClientGone)
                }
                Ok(Err(e)) => Err(e.into()),
            },
        }
    }

    async fn send(&self, packet: &[u8]) -> Result<(), TransferError> {
        match self.sock.send(packet).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Err(TransferError::ClientGone)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends the OACK until the client acknowledges it with ACK 0.
    async fn send_oack(&mut self, oack: &[u8]) -> Result<(), TransferError> {
        let mut retries = 0;
        loop {
            self.send(oack).await?;
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                match self.recv(deadline).await? {
                    Received::Timeout => break,
                    Received::Packet(len) => match Packet::parse(&self.buf[..len]) {
                        Ok(Packet::Ack { block: 0 }) => return Ok(()),
                        Ok(Packet::Error { code, message }) => {
                            return Err(TransferError::ClientError { code, message })
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
    async fn fill(&mut self) -> Result<(), TransferError> {
        while self.pending.len() < self.windowsize && self.last_block.is_none() {
            let block = self.base + self.pending.len() as u64;
            let mut packet = packet::data_header(wire(block), self.blksize);
            packet.resize(4 + self.blksize, 0);
            let mut filled = 0;
            while filled < self.blksize {
                let n = self.reader.read(&mut packet[4 + filled..]).await?;
                if n == 0 {
                    break;
                }
                filled += n;
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
    async fn send_file(&mut self) -> Result<u64, TransferError> {
        let mut retries = 0;
        // Base for which a duplicate ACK already restarted the window (windowsize > 1 only).
        let mut dup_restart: Option<u64> = None;
        loop {
            self.fill().await?;
            if self.pending.is_empty() {
                return Ok(self.bytes);
            }
            for packet in &self.pending {
                self.send(packet).await?;
            }
            let deadline = tokio::time::Instant::now() + self.timeout;
            let progressed = loop {
                let len = match self.recv(deadline).await? {
                    Received::Timeout => break false,
                    Received::Packet(len) => len,
                };
                match Packet::parse(&self.buf[..len]) {
                    Ok(Packet::Ack { block }) => {
                        let acked =
                            (0..self.pending.len() as u64).find(|i| wire(self.base + i) == block);
                        if let Some(i) = acked {
                            self.pending.drain(..=i as usize);
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
        assert_eq!(n.windowsize, 64);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            vec![
                ("blksize", "65464".to_string()),
                ("tsize", "1234".to_string()),
                ("timeout", "3".to_string()),
                ("windowsize", "64".to_string())
            ]
        );
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
    fn block_numbers_roll_over() {
        assert_eq!(wire(65535), 65535);
        assert_eq!(wire(65536), 0);
        assert_eq!(wire(65537), 1);
    }
}
