//! The write procedure: a pipeline of three threads (fetch, decode + hash, write) joined by
//! bounded channels of buffers, and the ordering that keeps a half-written image unbootable.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::format::{decoder, Format};
use super::hash::HashingReader;
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
    /// Size of each buffer handed between threads.
    pub chunk_size: usize,
    /// Buffers each channel may hold; memory in flight is about `2 * queue_depth * chunk_size`
    /// plus the decoder's window.
    pub queue_depth: usize,
    /// Minimum time between two progress callbacks (a last one always follows the write).
    pub progress_interval: Duration,
}

impl WriteOptions {
    pub fn new(expected_sha256: [u8; 32]) -> Self {
        Self {
            expected_sha256,
            expected_size: None,
            chunk_size: 1 << 20,
            queue_depth: 4,
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

fn run_pipeline<S: Read + Send>(
    mut source: S,
    target: &File,
    capacity: Option<u64>,
    options: &WriteOptions,
    mut progress: impl FnMut(&Progress),
    started: Instant,
) -> Result<WriteReport, Failed> {
    let chunk_size = options.chunk_size.max(4096);
    let depth = options.queue_depth.max(1);
    let source_bytes = Arc::new(AtomicU64::new(0));
    let expected_size = options.expected_size;

    thread::scope(|scope| {
        let (raw_tx, raw_rx) = sync_channel::<Vec<u8>>(depth);
        let (decoded_tx, decoded_rx) = sync_channel::<Vec<u8>>(depth);

        let fetched = Arc::clone(&source_bytes);
        let fetch = thread::Builder::new()
            .name("image-fetch".into())
            .spawn_scoped(scope, move || -> io::Result<()> {
                loop {
                    let mut buf = vec![0u8; chunk_size];
                    let n = read_full(&mut source, &mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.truncate(n);
                    fetched.fetch_add(n as u64, Ordering::Relaxed);
                    if raw_tx.send(buf).is_err() {
                        return Ok(()); // the decoder stopped; its result says why
                    }
                }
            });

        let decode = thread::Builder::new()
            .name("image-decode".into())
            .spawn_scoped(scope, move || {
                decode_and_hash(
                    ChannelReader::new(raw_rx),
                    decoded_tx,
                    chunk_size,
                    expected_size,
                )
            });

        let written = write_stream(
            target,
            decoded_rx,
            capacity,
            options,
            &source_bytes,
            &mut progress,
            started,
        );

        let fetch_result = match fetch {
            Ok(handle) => handle
                .join()
                .map_err(|_| WriteError::ThreadPanicked("fetch")),
            Err(e) => Err(WriteError::Source(e)),
        };
        let decode_result = match decode {
            Ok(handle) => handle
                .join()
                .map_err(|_| WriteError::ThreadPanicked("decode")),
            Err(e) => Err(WriteError::Source(e)),
        };

        // Precedence: a write error explains everything upstream stopping; a source error
        // explains a decoder seeing a truncated stream.
        let (head, written_end) = written?;
        let fetch_result = fetch_result.map_err(|e| (e, written_end))?;
        fetch_result.map_err(|e| (WriteError::Source(e), written_end))?;
        let (format, sha256, bytes) = match decode_result.map_err(|e| (e, written_end))? {
            Ok(done) => done,
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

        // Verified: now, and only now, make the disk bootable.
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

fn decode_and_hash(
    raw: ChannelReader,
    decoded_tx: SyncSender<Vec<u8>>,
    chunk_size: usize,
    expected_size: Option<u64>,
) -> Result<(Format, [u8; 32], u64), DecodeFailure> {
    let (format, decoded) = decoder(raw).map_err(DecodeFailure::Io)?;
    tracing::debug!(%format, "image format detected");
    let limited: Box<dyn Read + Send> = match expected_size {
        Some(limit) => Box::new(SizeLimitReader::new(decoded, limit)),
        None => decoded,
    };
    let mut hashing = HashingReader::new(limited);
    loop {
        let mut buf = vec![0u8; chunk_size];
        let n = read_full(&mut hashing, &mut buf).map_err(|e| DecodeFailure::Decode(format, e))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if decoded_tx.send(buf).is_err() {
            return Err(DecodeFailure::WriterGone);
        }
    }
    let (sha256, bytes) = hashing.finish();
    Ok((format, sha256, bytes))
}

/// Receives decoded chunks and writes them; returns the held-back first MiB and the end
/// offset of what reached the target (for the wipe on failure).
fn write_stream(
    target: &File,
    decoded_rx: Receiver<Vec<u8>>,
    capacity: Option<u64>,
    options: &WriteOptions,
    source_bytes: &AtomicU64,
    progress: &mut impl FnMut(&Progress),
    started: Instant,
) -> Result<(Vec<u8>, u64), Failed> {
    let mut head = Vec::with_capacity(HEAD_LEN as usize);
    let mut offset = 0u64;
    let mut last_progress = started;
    let sample = |offset: u64| {
        let elapsed = started.elapsed();
        Progress {
            bytes_written: offset,
            total: options.expected_size,
            source_bytes: source_bytes.load(Ordering::Relaxed),
            bytes_per_second: (offset as f64 / elapsed.as_secs_f64().max(1e-6)) as u64,
            elapsed,
        }
    };
    for chunk in decoded_rx {
        let mut data = &chunk[..];
        if offset < HEAD_LEN {
            let take = data.len().min((HEAD_LEN - offset) as usize);
            head.extend_from_slice(&data[..take]);
            data = &data[take..];
            offset += take as u64;
        }
        if !data.is_empty() {
            let end = offset + data.len() as u64;
            if let Some(capacity) = capacity.filter(|&c| end > c) {
                let error = WriteError::TargetTooSmall {
                    needed: end,
                    capacity,
                };
                return Err((error, offset));
            }
            target
                .write_all_at(data, offset)
                .map_err(|cause| (WriteError::Write { offset, cause }, offset))?;
            offset = end;
        }
        if last_progress.elapsed() >= options.progress_interval {
            last_progress = Instant::now();
            progress(&sample(offset));
        }
    }
    progress(&sample(offset));
    Ok((head, offset))
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

/// `Read` over the chunks of a channel; ends when the sender is dropped.
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    fn new(rx: Receiver<Vec<u8>>) -> Self {
        Self {
            rx,
            current: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
