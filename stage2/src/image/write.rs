//! The write procedure: a pipeline of threads (fetch, decode, hash, then a few writers)
//! joined by bounded channels of recycled buffers, and the ordering that keeps a half-written
//! image unbootable.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use sha2::{Digest, Sha256};

use super::format::{buffered_decoder, Format};
use super::limit::{is_size_limit_error, SizeLimitReader};

/// The region written last (and zeroed first): it holds the MBR, the primary GPT header and
/// its partition entries, which is what firmware looks at to decide a disk is bootable.
pub const HEAD_LEN: u64 = 1 << 20;

/// What the image must be.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub expected_sha256: [u8; 32],
    /// Size of the decompressed image, if known: checked up front against the target and
    /// enforced while streaming.
    pub expected_size: Option<u64>,
    /// Size of each buffer of decoded image handed between threads (the size of each write);
    /// rounded up to a multiple of 4 KiB.
    pub chunk_size: usize,
    /// Buffers each channel may hold; memory in flight is about `(queue_depth +
    /// writes_in_flight + 1) * chunk_size` of decoded image, `(queue_depth + 1)` MiB of
    /// compressed stream and the decoder's window.
    pub queue_depth: usize,
    /// Writes issued to the target at the same time, each by its own thread. A disk (and the
    /// block layer in front of it) completes several queued writes faster than one at a time.
    pub writes_in_flight: usize,
    /// Minimum time between two progress callbacks (a last one always follows the write).
    pub progress_interval: Duration,
}

impl WriteOptions {
    pub fn new(expected_sha256: [u8; 32]) -> Self {
        Self {
            expected_sha256,
            expected_size: None,
            chunk_size: 4 << 20,
            queue_depth: 4,
            writes_in_flight: 3,
            progress_interval: Duration::from_secs(1),
        }
    }
}

/// A progress sample.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Decompressed bytes received by the writer (the first MiB is held back, but counts).
    pub bytes_written: u64,
    /// Decompressed size, if known.
    pub total: Option<u64>,
    /// Bytes read from the source (compressed).
    pub source_bytes: u64,
    pub bytes_per_second: u64,
    pub elapsed: Duration,
}

impl Progress {
    pub fn percent(&self) -> Option<u8> {
        self.total
            .filter(|&t| t > 0)
            .map(|t| (self.bytes_written.min(t) * 100 / t) as u8)
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub format: Format,
    pub bytes: u64,
    pub source_bytes: u64,
    pub sha256: [u8; 32],
    pub elapsed: Duration,
}

/// Why an image was not written. After any of these the target's partition-table regions
/// are zeroed (unless [`WriteError::WipeFailed`] says otherwise). Each message carries its
/// cause, so `to_string()` is the whole reason in one line (for the `Failed` report); the
/// causes are therefore not also chained as `source()`, which would print them twice.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("cannot open target {path}: {cause}")]
    OpenTarget { path: PathBuf, cause: io::Error },
    #[error("image needs {needed} bytes but the target holds only {capacity}")]
    TargetTooSmall { needed: u64, capacity: u64 },
    #[error("reading the image source failed: {0}")]
    Source(io::Error),
    #[error("{format} image stream is corrupt or truncated: {cause}")]
    Decode { format: Format, cause: io::Error },
    #[error("image is larger than the expected {expected} bytes")]
    TooLarge { expected: u64 },
    #[error("image is {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("image sha256 is {actual}, expected {expected}")]
    HashMismatch { expected: String, actual: String },
    #[error("writing the target at byte {offset} failed: {cause}")]
    Write { offset: u64, cause: io::Error },
    #[error("flushing the target to stable storage failed: {0}")]
    Sync(io::Error),
    #[error("{error}; wiping the partition-table regions afterwards also failed: {wipe}")]
    WipeFailed {
        error: Box<WriteError>,
        wipe: io::Error,
    },
    #[error("internal error: the {0} thread panicked")]
    ThreadPanicked(&'static str),
}

/// Opens `target` (a block device, or a regular file, created if missing) and writes the image
/// read from `source` to it. See [`write_image_to`].
pub fn write_image<S: Read + Send>(
    source: S,
    target: &Path,
    options: &WriteOptions,
    progress: impl FnMut(&Progress),
) -> Result<WriteReport, WriteError> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
        .map_err(|cause| WriteError::OpenTarget {
            path: target.to_owned(),
            cause,
        })?;
    write_image_to(source, &file, options, progress)
}

/// Writes the image read from `source` (any supported compression) to `target`:
///
/// 1. zero the first MiB (and the last MiB of a block device: the backup GPT) and sync, so
///    that from now on the disk boots nothing;
/// 2. stream the decoded image, hashing it, writing everything from 1 MiB on in place and
///    keeping the first MiB in memory;
/// 3. check size and sha256; only if both match, write the first MiB and fsync.
///
/// On any failure after step 1 the first and last MiB of the target and of the written range
/// are zeroed again, so a corrupt or partial image is never bootable.
pub fn write_image_to<S: Read + Send>(
    source: S,
    target: &File,
    options: &WriteOptions,
    progress: impl FnMut(&Progress),
) -> Result<WriteReport, WriteError> {
    let capacity = block_device_capacity(target).map_err(|cause| WriteError::OpenTarget {
        path: PathBuf::from("(target)"),
        cause,
    })?;
    if let (Some(needed), Some(capacity)) = (options.expected_size, capacity) {
        if needed > capacity {
            return Err(WriteError::TargetTooSmall { needed, capacity });
        }
    }
    // Where a backup GPT of the old contents would be: the end of the device, or of a regular
    // file used as a disk image.
    let disk_end = match capacity {
        Some(capacity) => Some(capacity),
        None => target.metadata().ok().map(|m| m.len()),
    };
    // Nothing bootable may remain while the image is being written.
    wipe_signatures(target, disk_end, 0).map_err(|cause| WriteError::Write { offset: 0, cause })?;

    let started = Instant::now();
    let outcome = run_pipeline(source, target, capacity, options, progress, started);
    match outcome {
        Ok(mut report) => {
            report.elapsed = started.elapsed();
            tracing::info!(
                bytes = report.bytes,
                format = %report.format,
                sha256 = %hex::encode(report.sha256),
                seconds = report.elapsed.as_secs_f64(),
                "image written and verified"
            );
            Ok(report)
        }
        Err((error, written_end)) => {
            tracing::error!(%error, "image write failed; wiping partition-table regions");
            match wipe_signatures(target, disk_end, written_end) {
                Ok(()) => Err(error),
                Err(wipe) => Err(WriteError::WipeFailed {
                    error: Box::new(error),
                    wipe,
                }),
            }
        }
    }
}

/// Size of `file` if it is a block device; regular files grow as needed.
fn block_device_capacity(mut file: &File) -> io::Result<Option<u64>> {
    if file.metadata()?.file_type().is_block_device() {
        Ok(Some(file.seek(SeekFrom::End(0))?))
    } else {
        Ok(None)
    }
}

/// Zeroes the partition-table regions of `target` (first MiB: MBR and primary GPT; last MiB:
/// backup GPT) and syncs, for callers that fail before [`write_image_to`] could start (e.g. no
/// disk image at all) and must still leave the disk unbootable.
pub fn wipe_partition_tables(target: &File) -> io::Result<()> {
    let disk_end = match block_device_capacity(target)? {
        Some(capacity) => capacity,
        None => target.metadata()?.len(),
    };
    wipe_signatures(target, Some(disk_end), 0)
}

/// Zeroes the first MiB, the last MiB before `disk_end` (the old backup GPT) and the last MiB
/// below `written_end` (the image's own backup GPT, if it got that far), then syncs.
fn wipe_signatures(target: &File, disk_end: Option<u64>, written_end: u64) -> io::Result<()> {
    let zeros = vec![0u8; HEAD_LEN as usize];
    let mut regions = vec![(0, HEAD_LEN)];
    for end in [disk_end, Some(written_end)].into_iter().flatten() {
        let start = end.saturating_sub(HEAD_LEN).max(HEAD_LEN);
        if end > start {
            regions.push((start, end));
        }
    }
    for (start, end) in regions {
        target.write_all_at(&zeros[..(end - start) as usize], start)?;
    }
    target.sync_all()
}

/// What the decode thread found, or why it stopped.
enum DecodeFailure {
    Io(io::Error),
    Decode(Format, io::Error),
    /// The writer hung up: its error is the one to report.
    WriterGone,
}

type Failed = (WriteError, u64);

/// Compressed bytes per buffer between the fetch and decode threads.
const SOURCE_CHUNK: usize = 1 << 20;
/// Address, offset and length alignment that direct I/O needs: the largest logical block size
/// of common disks (4Kn), which also satisfies 512-byte ones.
const DIRECT_IO_ALIGN: usize = 4096;

fn run_pipeline<S: Read + Send>(
    mut source: S,
    target: &File,
    capacity: Option<u64>,
    options: &WriteOptions,
    mut progress: impl FnMut(&Progress),
    started: Instant,
) -> Result<WriteReport, Failed> {
    // Whole blocks, so that every write but the image's last one can be direct.
    let chunk_size = options
        .chunk_size
        .max(DIRECT_IO_ALIGN)
        .next_multiple_of(DIRECT_IO_ALIGN);
    let depth = options.queue_depth.max(1);
    let writers = options.writes_in_flight.max(1);
    let source_bytes = Arc::new(AtomicU64::new(0));
    let expected_size = options.expected_size;
    // Every buffer is allocated once, here, and goes round its loop (fetch → decode → fetch,
    // decode → hash → write → decode) until the end: memory in flight is fixed.
    let (raw_free_tx, raw_free_rx) = buffer_pool(depth + 1, SOURCE_CHUNK.min(chunk_size));
    let (decoded_free_tx, decoded_free_rx) = buffer_pool(depth + writers + 1, chunk_size);

    thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Chunk>(depth);
        let (decoded_tx, decoded_rx) = sync_channel::<Chunk>(depth);
        let (hashed_tx, hashed_rx) = sync_channel::<Chunk>(depth);

        let fetched = Arc::clone(&source_bytes);
        let fetch = thread::Builder::new()
            .name("image-fetch".into())
            .spawn_scoped(scope, move || -> io::Result<()> {
                // The decoder hanging up (closed channel) ends the loop; its result says why.
                while let Ok(mut chunk) = raw_free_rx.recv() {
                    let n = read_full(&mut source, chunk.space())?;
                    if n == 0 {
                        break;
                    }
                    chunk.len = n;
                    fetched.fetch_add(n as u64, Ordering::Relaxed);
                    if raw_tx.send(chunk).is_err() {
                        break;
                    }
                }
                Ok(())
            });

        let decode = thread::Builder::new()
            .name("image-decode".into())
            .spawn_scoped(scope, move || {
                decode_stream(
                    ChannelReader::new(raw_rx, raw_free_tx),
                    decoded_free_rx,
                    decoded_tx,
                    expected_size,
                )
            });

        // Hashing has a thread of its own so that it runs next to decompression, not after it.
        let hash = thread::Builder::new()
            .name("image-hash".into())
            .spawn_scoped(scope, move || hash_stream(decoded_rx, hashed_tx));

        let written = write_stream(
            scope,
            target,
            hashed_rx,
            decoded_free_tx,
            capacity,
            options,
            &source_bytes,
            &mut progress,
            started,
        );

        let fetch_result = join(fetch, "fetch");
        let decode_result = join(decode, "decode");
        let hash_result = join(hash, "hash");

        // Precedence: a write error explains everything upstream stopping; a source error
        // explains a decoder seeing a truncated stream.
        let (head, written_end) = written?;
        let fetch_result = fetch_result.map_err(|e| (e, written_end))?;
        fetch_result.map_err(|e| (WriteError::Source(e), written_end))?;
        let format = match decode_result.map_err(|e| (e, written_end))? {
            Ok(format) => format,
            Err(DecodeFailure::Io(e)) => return Err((WriteError::Source(e), written_end)),
            Err(DecodeFailure::Decode(format, e)) => {
                let error = match (is_size_limit_error(&e), expected_size) {
                    (Some(_), Some(expected)) => WriteError::TooLarge { expected },
                    _ => WriteError::Decode { format, cause: e },
                };
                return Err((error, written_end));
            }
            Err(DecodeFailure::WriterGone) => {
                return Err((WriteError::ThreadPanicked("write"), written_end))
            }
        };
        let Some((sha256, bytes)) = hash_result.map_err(|e| (e, written_end))? else {
            return Err((WriteError::ThreadPanicked("write"), written_end));
        };
        if let Some(expected) = expected_size {
            if bytes != expected {
                let error = WriteError::SizeMismatch {
                    expected,
                    actual: bytes,
                };
                return Err((error, written_end));
            }
        }
        if sha256 != options.expected_sha256 {
            let error = WriteError::HashMismatch {
                expected: hex::encode(options.expected_sha256),
                actual: hex::encode(sha256),
            };
            return Err((error, written_end));
        }

        // Verified: the rest of the image goes to stable storage first, then, and only then,
        // the first MiB that makes the disk bootable.
        target
            .sync_all()
            .map_err(|e| (WriteError::Sync(e), written_end))?;
        target
            .write_all_at(&head, 0)
            .map_err(|cause| (WriteError::Write { offset: 0, cause }, written_end))?;
        target
            .sync_all()
            .map_err(|e| (WriteError::Sync(e), written_end))?;
        Ok(WriteReport {
            format,
            bytes,
            source_bytes: source_bytes.load(Ordering::Relaxed),
            sha256,
            elapsed: started.elapsed(),
        })
    })
}

/// The result of a pipeline thread, or why there is none.
fn join<T>(
    handle: io::Result<thread::ScopedJoinHandle<'_, T>>,
    name: &'static str,
) -> Result<T, WriteError> {
    match handle {
        Ok(handle) => handle.join().map_err(|_| WriteError::ThreadPanicked(name)),
        Err(e) => Err(WriteError::Source(e)),
    }
}

/// Decodes the stream into buffers of the decoded pool, enforcing the expected size.
fn decode_stream(
    raw: ChannelReader,
    free: Receiver<Chunk>,
    decoded_tx: SyncSender<Chunk>,
    expected_size: Option<u64>,
) -> Result<Format, DecodeFailure> {
    let (format, decoded) = buffered_decoder(raw).map_err(DecodeFailure::Io)?;
    tracing::debug!(%format, "image format detected");
    let mut decoded: Box<dyn Read + Send> = match expected_size {
        Some(limit) => Box::new(SizeLimitReader::new(decoded, limit)),
        None => decoded,
    };
    let mut offset = 0u64;
    // No free buffer means the writers are gone (they hold the only way back to this pool).
    while let Ok(mut chunk) = free.recv() {
        let n =
            read_full(&mut decoded, chunk.space()).map_err(|e| DecodeFailure::Decode(format, e))?;
        if n == 0 {
            return Ok(format);
        }
        chunk.len = n;
        chunk.offset = offset;
        offset += n as u64;
        if decoded_tx.send(chunk).is_err() {
            break;
        }
    }
    Err(DecodeFailure::WriterGone)
}

/// SHA-256 and length of everything that passes; `None` if the writer hung up before the end.
fn hash_stream(
    decoded_rx: Receiver<Chunk>,
    hashed_tx: SyncSender<Chunk>,
) -> Option<([u8; 32], u64)> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    for chunk in decoded_rx {
        hasher.update(chunk.data());
        bytes += chunk.data().len() as u64;
        hashed_tx.send(chunk).ok()?;
    }
    Some((hasher.finalize().into(), bytes))
}

/// Receives decoded chunks and writes them with `options.writes_in_flight` threads, each
/// handing its buffer back to the decoder; calls `progress` every `progress_interval` while
/// they work. Returns the held-back first MiB and the end offset of what reached the target
/// (for the wipe on failure).
#[allow(clippy::too_many_arguments)]
fn write_stream<'scope, 'env>(
    scope: &'scope thread::Scope<'scope, 'env>,
    target: &'env File,
    hashed_rx: Receiver<Chunk>,
    free: SyncSender<Chunk>,
    capacity: Option<u64>,
    options: &WriteOptions,
    source_bytes: &AtomicU64,
    progress: &mut impl FnMut(&Progress),
    started: Instant,
) -> Result<(Vec<u8>, u64), Failed> {
    let shared = Arc::new(Writers {
        target,
        capacity,
        // Block devices are written with O_DIRECT: one copy fewer than through the page cache,
        // the image does not push everything else out of memory (stage2 runs from RAM), and
        // the disk is written while the image streams instead of in one flush at the end.
        direct: capacity
            .is_some()
            .then(|| DirectIo::enable(target))
            .flatten(),
        next: Mutex::new(Some(hashed_rx)),
        head: Mutex::new(vec![0u8; HEAD_LEN as usize]),
        received: AtomicU64::new(0),
        written_end: AtomicU64::new(0),
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
    });
    // Each writer holds a sender; when the last one is gone, the progress loop ends.
    let (alive_tx, alive_rx) = channel::<()>();
    let mut handles = Vec::new();
    for index in 0..options.writes_in_flight.max(1) {
        let writer = Arc::clone(&shared);
        let free = free.clone();
        let alive = alive_tx.clone();
        let handle = thread::Builder::new()
            .name(format!("image-write-{index}"))
            .spawn_scoped(scope, move || {
                writer.run(&free);
                drop(alive);
            });
        match handle {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                shared.fail(WriteError::Source(e));
                break;
            }
        }
    }
    drop((free, alive_tx));

    let sample = || {
        let elapsed = started.elapsed();
        let bytes = shared.received.load(Ordering::Relaxed);
        Progress {
            bytes_written: bytes,
            total: options.expected_size,
            source_bytes: source_bytes.load(Ordering::Relaxed),
            bytes_per_second: (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64,
            elapsed,
        }
    };
    let interval = options.progress_interval.max(Duration::from_millis(10));
    while let Err(RecvTimeoutError::Timeout) = alive_rx.recv_timeout(interval) {
        progress(&sample());
    }
    for handle in handles {
        if handle.join().is_err() {
            shared.fail(WriteError::ThreadPanicked("write"));
        }
    }
    // Nobody receives any more: an upstream thread blocked on sending must see that and stop.
    drop(
        shared
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(),
    );
    progress(&sample());

    let written_end = shared.written_end.load(Ordering::Relaxed);
    let failure = shared
        .failure
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some(error) = failure {
        return Err((error, written_end));
    }
    // Every chunk arrived: the head is the image's first MiB, or all of a smaller image.
    let head_len = shared.received.load(Ordering::Relaxed).min(HEAD_LEN) as usize;
    let mut head = std::mem::take(&mut *shared.head.lock().unwrap_or_else(PoisonError::into_inner));
    head.truncate(head_len);
    Ok((head, written_end))
}

/// What the writer threads share.
struct Writers<'a> {
    target: &'a File,
    capacity: Option<u64>,
    direct: Option<DirectIo<'a>>,
    /// Where the next chunk comes from; taken by one writer at a time, and taken out (dropped)
    /// once the writers are done.
    next: Mutex<Option<Receiver<Chunk>>>,
    /// The first MiB of the image, held back until the image is verified.
    head: Mutex<Vec<u8>>,
    /// Decoded bytes handled (the held-back first MiB counts).
    received: AtomicU64,
    /// Highest end offset a write was issued for.
    written_end: AtomicU64,
    /// The first error; `failed` tells the other writers to stop.
    failure: Mutex<Option<WriteError>>,
    failed: AtomicBool,
}

impl Writers<'_> {
    /// One writer thread: takes chunks until the stream ends or a writer fails.
    fn run(&self, free: &SyncSender<Chunk>) {
        while !self.failed.load(Ordering::Relaxed) {
            // The lock is held only to take the next chunk, not while writing it.
            let next = match self.next.lock() {
                Ok(receiver) => receiver.as_ref().and_then(|r| r.recv().ok()),
                Err(_) => break,
            };
            let Some(chunk) = next else { break };
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            if let Err(error) = self.write_chunk(&chunk) {
                self.fail(error);
                break;
            }
            // The decoder may be gone already (end of stream): then the buffer is simply freed.
            let _ = free.send(chunk);
        }
    }

    fn write_chunk(&self, chunk: &Chunk) -> Result<(), WriteError> {
        let mut data = chunk.data();
        let mut offset = chunk.offset;
        if offset < HEAD_LEN {
            let take = data.len().min((HEAD_LEN - offset) as usize);
            let at = offset as usize;
            self.head.lock().unwrap_or_else(PoisonError::into_inner)[at..at + take]
                .copy_from_slice(&data[..take]);
            data = &data[take..];
            offset += take as u64;
        }
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            if let Some(capacity) = self.capacity.filter(|&c| end > c) {
                return Err(WriteError::TargetTooSmall {
                    needed: end,
                    capacity,
                });
            }
            self.written_end.fetch_max(end, Ordering::Relaxed);
            self.write_at(data, offset)
                .map_err(|cause| WriteError::Write { offset, cause })?;
        }
        self.received
            .fetch_add(chunk.data().len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Writes with O_DIRECT while that is on and the write is aligned; otherwise (the image's
    /// last, partial block, or a device that refuses) through the page cache from then on.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct {
            let aligned = offset.is_multiple_of(DIRECT_IO_ALIGN as u64)
                && data.len().is_multiple_of(DIRECT_IO_ALIGN)
                && data.as_ptr().align_offset(DIRECT_IO_ALIGN) == 0;
            if aligned {
                match direct.write_all_at(data, offset) {
                    Some(Err(e)) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                        tracing::debug!(error = %e, "direct write refused; writing through the page cache");
                        direct.turn_off();
                    }
                    Some(result) => return result,
                    None => {}
                }
            } else {
                direct.turn_off();
            }
        }
        self.target.write_all_at(data, offset)
    }

    /// Records the first error and stops the other writers.
    fn fail(&self, error: WriteError) {
        let mut failure = self.failure.lock().unwrap_or_else(PoisonError::into_inner);
        if failure.is_none() {
            *failure = Some(error);
        }
        self.failed.store(true, Ordering::Relaxed);
    }
}

/// O_DIRECT set on a file while this lives (or until [`DirectIo::turn_off`]); the file's flags
/// are restored then. The flag belongs to the open file, which all writers share: a write
/// holds the read lock, so the flag cannot change under it.
struct DirectIo<'a> {
    file: &'a File,
    flags: OFlag,
    on: RwLock<bool>,
}

impl<'a> DirectIo<'a> {
    /// `None` if the file cannot do direct I/O (it is then written through the page cache).
    fn enable(file: &'a File) -> Option<Self> {
        let fd = file.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).ok()?);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)).ok()?;
        Some(Self {
            file,
            flags,
            on: RwLock::new(true),
        })
    }

    /// The write's result if it went out with O_DIRECT, `None` if direct I/O is off by now.
    fn write_all_at(&self, data: &[u8], offset: u64) -> Option<io::Result<()>> {
        let on = self.on.read().unwrap_or_else(PoisonError::into_inner);
        on.then(|| self.file.write_all_at(data, offset))
    }

    fn turn_off(&self) {
        let mut on = self.on.write().unwrap_or_else(PoisonError::into_inner);
        if *on {
            *on = false;
            if let Err(error) = fcntl(self.file.as_raw_fd(), FcntlArg::F_SETFL(self.flags)) {
                tracing::warn!(%error, "cannot clear O_DIRECT on the target");
            }
        }
    }
}

impl Drop for DirectIo<'_> {
    fn drop(&mut self) {
        self.turn_off();
    }
}

/// Reads until `buf` is full or the stream ends, so chunks are full-sized however small the
/// underlying reads are.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A buffer of fixed capacity whose contents start at an address aligned for direct I/O.
struct Chunk {
    storage: Vec<u8>,
    start: usize,
    capacity: usize,
    /// Where the data goes in the image (set by the decoder).
    offset: u64,
    /// Bytes of data from `start`.
    len: usize,
}

impl Chunk {
    fn new(capacity: usize) -> Self {
        let storage = vec![0u8; capacity + DIRECT_IO_ALIGN];
        // align_offset may in theory give up (usize::MAX): the chunk is then unaligned and is
        // written through the page cache.
        let start = match storage.as_ptr().align_offset(DIRECT_IO_ALIGN) {
            start if start < DIRECT_IO_ALIGN => start,
            _ => 0,
        };
        Self {
            storage,
            start,
            capacity,
            offset: 0,
            len: 0,
        }
    }

    fn data(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    /// The whole buffer, to be filled (then set `len`).
    fn space(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.capacity]
    }
}

/// `count` buffers of `capacity` bytes in a channel: take one from the receiver, give it back
/// through the sender.
fn buffer_pool(count: usize, capacity: usize) -> (SyncSender<Chunk>, Receiver<Chunk>) {
    let (tx, rx) = sync_channel(count);
    for _ in 0..count {
        // Cannot fail: the channel holds `count` and the receiver is alive.
        let _ = tx.send(Chunk::new(capacity));
    }
    (tx, rx)
}

/// `BufRead` over the chunks of a channel, so the decompressor reads them in place; each
/// chunk goes back to the fetch thread's pool once consumed. Ends when the sender is dropped.
struct ChannelReader {
    rx: Receiver<Chunk>,
    free: SyncSender<Chunk>,
    current: Option<Chunk>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: Receiver<Chunk>, free: SyncSender<Chunk>) -> Self {
        Self {
            rx,
            free,
            current: None,
            pos: 0,
        }
    }
}

impl BufRead for ChannelReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.current.as_ref().is_none_or(|c| self.pos == c.len) {
            if let Some(spent) = self.current.take() {
                // The fetch thread may be gone already (end of stream): then it is freed.
                let _ = self.free.send(spent);
            }
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = Some(chunk);
                    self.pos = 0;
                }
                Err(_) => return Ok(&[]),
            }
        }
        Ok(self.current.as_ref().map_or(&[], |c| &c.data()[self.pos..]))
    }

    fn consume(&mut self, amount: usize) {
        let len = self.current.as_ref().map_or(0, |c| c.len);
        self.pos = (self.pos + amount).min(len);
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = buf.len().min(available.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}
