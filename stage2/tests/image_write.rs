//! The image writer against regular files and a loopback HTTP server that misbehaves on
//! purpose (drops connections mid-stream, ignores ranges).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};
use stage2::image::{
    write_image, Format, HttpError, HttpSource, RetryPolicy, WriteError, WriteOptions, HEAD_LEN,
};

const MIB: usize = 1 << 20;

/// A 3 MiB + odd-sized image with a GPT signature at LBA 1 and its backup at the end, filled
/// with data that compresses a bit (like a real disk image).
fn image() -> Vec<u8> {
    let len = 3 * MIB + 12_345;
    let mut state = 0x2545_f491_u32;
    let mut data: Vec<u8> = (0..len)
        .map(|i| {
            if i % 4096 < 1024 {
                0
            } else {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 16) as u8
            }
        })
        .collect();
    data[512..520].copy_from_slice(b"EFI PART");
    data[len - 512..len - 504].copy_from_slice(b"EFI PART");
    data
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("ok")
}

fn xz(data: &[u8]) -> Vec<u8> {
    let mut encoder = liblzma::write::XzEncoder::new(Vec::new(), 1);
    encoder.write_all(data).expect("ok");
    encoder.finish().expect("ok")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("ok");
    encoder.finish().expect("ok")
}

/// A target that already holds a bootable-looking disk (primary and backup GPT signatures),
/// larger than the image.
fn old_disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    let mut old = vec![0x55u8; 6 * MIB];
    old[512..520].copy_from_slice(b"EFI PART");
    let end = old.len();
    old[end - 512..end - 504].copy_from_slice(b"EFI PART");
    std::fs::write(&path, &old).expect("ok");
    path
}

fn options(image: &[u8]) -> WriteOptions {
    let mut options = WriteOptions::new(sha256(image));
    options.expected_size = Some(image.len() as u64);
    options.chunk_size = 64 * 1024;
    options
}

fn assert_written(target: &Path, image: &[u8]) {
    let disk = std::fs::read(target).expect("ok");
    assert!(disk.len() >= image.len());
    assert!(
        disk[..image.len()] == *image,
        "target differs from the image"
    );
}

/// After a failure nothing may look like a partition table: the first MiB is zero (no MBR, no
/// primary GPT), and neither the old disk's backup GPT (at its end) nor the image's (at
/// `image_len`) is left.
fn assert_not_bootable(target: &Path, image_len: usize) {
    let disk = std::fs::read(target).expect("ok");
    assert!(
        disk[..HEAD_LEN as usize].iter().all(|&b| b == 0),
        "first MiB is not zeroed"
    );
    assert_ne!(&disk[512..520], b"EFI PART");
    assert_ne!(&disk[510..512], &[0x55, 0xaa], "MBR signature left");
    for end in [disk.len(), image_len] {
        if end > HEAD_LEN as usize && end <= disk.len() {
            assert_ne!(
                &disk[end - 512..end - 504],
                b"EFI PART",
                "backup GPT left at {end}"
            );
        }
    }
}

#[test]
fn good_images_in_every_format_are_written_exactly() {
    let image = image();
    for (encoded, format) in [
        (image.clone(), Format::Raw),
        (zstd(&image), Format::Zstd),
        (xz(&image), Format::Xz),
        (gzip(&image), Format::Gzip),
    ] {
        let dir = tempfile::tempdir().expect("ok");
        let target = old_disk(dir.path());
        let mut samples = Vec::new();
        let report = write_image(&encoded[..], &target, &options(&image), |p| {
            samples.push(*p)
        })
        .unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(report.format, format);
        assert_eq!(report.bytes, image.len() as u64);
        assert_eq!(report.source_bytes, encoded.len() as u64);
        assert_eq!(report.sha256, sha256(&image));
        assert_written(&target, &image);
        let last = samples.last().expect("a final progress sample");
        assert_eq!(last.bytes_written, image.len() as u64);
        assert_eq!(last.percent(), Some(100));
    }
}

#[test]
fn size_is_optional() {
    let image = image();
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    let mut options = options(&image);
    options.expected_size = None;
    write_image(&zstd(&image)[..], &target, &options, |_| {}).expect("ok");
    assert_written(&target, &image);
}

fn expect_failure(encoded: &[u8], options: &WriteOptions, image_len: usize) -> WriteError {
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    let error = write_image(encoded, &target, options, |_| {}).expect_err("write must fail");
    assert_not_bootable(&target, image_len);
    error
}

#[test]
fn truncated_compressed_images_fail_and_leave_no_partition_table() {
    let image = image();
    for encoded in [zstd(&image), xz(&image), gzip(&image)] {
        let cut = &encoded[..encoded.len() * 2 / 3];
        let error = expect_failure(cut, &options(&image), image.len());
        assert!(
            matches!(error, WriteError::Decode { .. }),
            "unexpected error: {error}"
        );
    }
}

#[test]
fn truncated_raw_image_is_a_size_mismatch() {
    let image = image();
    let cut = &image[..image.len() - 4096];
    let error = expect_failure(cut, &options(&image), image.len());
    assert!(
        matches!(error, WriteError::SizeMismatch { expected, actual }
            if expected == image.len() as u64 && actual == cut.len() as u64),
        "unexpected error: {error}"
    );
    // Without an expected size, the hash catches it.
    let mut options = options(&image);
    options.expected_size = None;
    let error = expect_failure(cut, &options, image.len());
    assert!(matches!(error, WriteError::HashMismatch { .. }), "{error}");
}

#[test]
fn corrupt_images_fail() {
    let image = image();
    let mut raw = image.clone();
    raw[2 * MIB + 7] ^= 0x01;
    let error = expect_failure(&raw, &options(&image), image.len());
    assert!(matches!(error, WriteError::HashMismatch { .. }), "{error}");

    let mut compressed = zstd(&image);
    let middle = compressed.len() / 2;
    compressed[middle] ^= 0x40;
    let error = expect_failure(&compressed, &options(&image), image.len());
    assert!(
        matches!(
            error,
            WriteError::Decode { .. } | WriteError::HashMismatch { .. }
        ),
        "unexpected error: {error}"
    );
}

#[test]
fn wrong_hash_fails_and_names_both_digests() {
    let image = image();
    let mut options = options(&image);
    options.expected_sha256 = [0xab; 32];
    let error = expect_failure(&zstd(&image), &options, image.len());
    let WriteError::HashMismatch { expected, actual } = &error else {
        panic!("unexpected error: {error}");
    };
    assert_eq!(*expected, "ab".repeat(32));
    assert_eq!(*actual, hex::encode(sha256(&image)));
}

#[test]
fn wrong_size_fails() {
    let image = image();
    let mut options = options(&image);
    options.expected_size = Some(image.len() as u64 - 1);
    let error = expect_failure(&zstd(&image), &options, image.len());
    assert!(
        matches!(error, WriteError::TooLarge { expected } if expected == image.len() as u64 - 1),
        "unexpected error: {error}"
    );
    options.expected_size = Some(image.len() as u64 + 1);
    let error = expect_failure(&zstd(&image), &options, image.len());
    assert!(
        matches!(error, WriteError::SizeMismatch { .. }),
        "unexpected error: {error}"
    );
}

/// Chunks finish out of order when several writes are in flight (the first MiB is assembled
/// from many of them): the bytes on the target and the progress must not depend on that.
#[test]
fn any_number_of_writes_in_flight_and_any_chunk_size_write_the_same_bytes() {
    let image = image();
    let encoded = zstd(&image);
    for writes_in_flight in [1, 2, 8] {
        // 5000 is rounded up to whole 4 KiB blocks; 64 KiB puts the first MiB in 16 chunks.
        for chunk_size in [5000, 64 * 1024, 4 * MIB] {
            let dir = tempfile::tempdir().expect("ok");
            let target = old_disk(dir.path());
            let mut options = options(&image);
            options.writes_in_flight = writes_in_flight;
            options.chunk_size = chunk_size;
            options.progress_interval = std::time::Duration::ZERO;
            let mut samples = Vec::new();
            write_image(&encoded[..], &target, &options, |p| samples.push(*p)).unwrap_or_else(
                |e| panic!("{writes_in_flight} writers, chunks of {chunk_size}: {e}"),
            );
            assert_written(&target, &image);
            assert!(
                samples
                    .windows(2)
                    .all(|w| w[0].bytes_written <= w[1].bytes_written),
                "progress went backwards"
            );
            let last = samples.last().expect("a final progress sample");
            assert_eq!(last.bytes_written, image.len() as u64);
        }
    }
}

#[test]
fn images_smaller_than_the_head_are_written() {
    let image = b"tiny image".repeat(100);
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    write_image(&image[..], &target, &options(&image), |_| {}).expect("ok");
    let disk = std::fs::read(&target).expect("ok");
    assert_eq!(&disk[..image.len()], &image[..]);
    assert!(disk[image.len()..HEAD_LEN as usize].iter().all(|&b| b == 0));
}

/// How the test server misbehaves.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Close the first `times` responses after `after` body bytes.
    DropAfter { after: usize, times: usize },
    /// Cut the first response after `after` bytes, then send no body byte at all.
    StallAt { after: usize },
    /// Drop the first response, then answer range requests with the whole file (200).
    IgnoreRange { after: usize },
}

/// Records what the server was asked: the start offset of each request.
type RequestLog = Arc<Mutex<Vec<u64>>>;

/// A minimal HTTP/1.1 file server on 127.0.0.1, written here because it has to break
/// connections at chosen byte offsets, which a real server does not offer.
fn serve(body: Vec<u8>, misbehaviour: Misbehaviour) -> (String, RequestLog) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("ok");
    let url = format!("http://{}/image", listener.local_addr().expect("ok"));
    let log: RequestLog = Arc::default();
    let requests = Arc::clone(&log);
    thread::spawn(move || {
        for (count, stream) in listener.incoming().enumerate() {
            let Ok(stream) = stream else { return };
            let _ = answer(stream, &body, misbehaviour, count, &requests);
        }
    });
    (url, log)
}

fn answer(
    stream: TcpStream,
    body: &[u8],
    misbehaviour: Misbehaviour,
    count: usize,
    log: &RequestLog,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut start = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(range) = lower.strip_prefix("range: bytes=") {
            start = range.trim_end_matches('-').parse().unwrap_or(0);
        }
    }
    log.lock().expect("ok").push(start as u64);
    let (limit, honour_range) = match misbehaviour {
        Misbehaviour::DropAfter { after, times } if count < times => (Some(after), true),
        Misbehaviour::DropAfter { .. } => (None, true),
        Misbehaviour::StallAt { after } if count == 0 => (Some(after), true),
        Misbehaviour::StallAt { .. } => (Some(0), true),
        Misbehaviour::IgnoreRange { after } if count == 0 => (Some(after), false),
        Misbehaviour::IgnoreRange { .. } => (None, false),
    };
    let mut stream = stream;
    let etag = "\"image-v1\"";
    let part = if start > 0 && honour_range {
        write!(
            stream,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {}-{}/{}\r\nETag: {etag}\r\nConnection: close\r\n\r\n",
            body.len() - start,
            start,
            body.len() - 1,
            body.len()
        )?;
        &body[start..]
    } else {
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        body
    };
    let part = match limit {
        Some(after) => &part[..after.min(part.len())],
        None => part,
    };
    stream.write_all(part)?;
    stream.flush()?;
    // Dropping the stream closes the connection, mid-body when `limit` cut it.
    Ok(())
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy {
        attempts: 4,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(5),
    }
}

#[test]
fn http_download_resumes_exactly_where_the_connection_dropped() {
    let image = image();
    let compressed = zstd(&image);
    assert!(
        compressed.len() > 300_000,
        "need a body longer than the drops"
    );
    let (url, log) = serve(
        compressed.clone(),
        Misbehaviour::DropAfter {
            after: 100_000,
            times: 2,
        },
    );
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    let source = HttpSource::open(&url, quick_retries()).expect("ok");
    assert_eq!(source.total_len(), Some(compressed.len() as u64));
    let report = write_image(source, &target, &options(&image), |_| {}).expect("ok");
    assert_eq!(report.sha256, sha256(&image));
    assert_eq!(report.source_bytes, compressed.len() as u64);
    assert_written(&target, &image);
    // One full request, then resumes at exactly the bytes already received.
    assert_eq!(*log.lock().expect("ok"), vec![0, 100_000, 200_000]);
}

#[test]
fn http_source_gives_up_after_bounded_attempts_and_the_disk_is_wiped() {
    let image = image();
    let compressed = zstd(&image);
    let (url, log) = serve(compressed, Misbehaviour::StallAt { after: 50_000 });
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    let source = HttpSource::open(&url, quick_retries()).expect("ok");
    let error = write_image(source, &target, &options(&image), |_| {}).expect_err("must fail");
    let WriteError::Source(io) = &error else {
        panic!("unexpected error: {error}");
    };
    let http = io
        .get_ref()
        .and_then(|e| e.downcast_ref::<HttpError>())
        .expect("an HttpError inside");
    assert!(
        matches!(http, HttpError::GaveUp { attempts: 4, .. }),
        "{http}"
    );
    // The first request, then three resumes at the same byte, none bringing anything.
    assert_eq!(*log.lock().expect("ok"), vec![0, 50_000, 50_000, 50_000]);
    assert_not_bootable(&target, image.len());
}

#[test]
fn http_server_ignoring_range_is_refused_not_restarted_silently() {
    let image = image();
    let (url, _log) = serve(zstd(&image), Misbehaviour::IgnoreRange { after: 100_000 });
    let dir = tempfile::tempdir().expect("ok");
    let target = old_disk(dir.path());
    let source = HttpSource::open(&url, quick_retries()).expect("ok");
    let error = write_image(source, &target, &options(&image), |_| {}).expect_err("must fail");
    assert!(
        error.to_string().contains("206"),
        "error should say why: {error}"
    );
    assert_not_bootable(&target, image.len());
}

#[test]
fn http_404_is_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("ok");
    let url = format!("http://{}/missing", listener.local_addr().expect("ok"));
    thread::spawn(move || {
        if let Ok((mut stream, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let Err(error) = HttpSource::open(&url, quick_retries()) else {
        panic!("a 404 must fail");
    };
    assert!(
        matches!(error, HttpError::Status { status: 404, .. }),
        "{error}"
    );
}
