//! The imaging step on the host: orders from a command line, the image over HTTP onto a file,
//! progress on the "console" and as reports to a stand-in netboot on 127.0.0.1 that records
//! each report with its Authorization header.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use stage2::provision::{provision, write_ordered_image, Pacing, Reporter};
use wire::orders::Orders;
use wire::report::ProgressReport;

const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xee, 0x00, 0x07];

type Reports = Arc<Mutex<Vec<(String, String, ProgressReport)>>>;

/// Serves `image` on GET /node.raw.zst (slowly, so progress shows) and records POSTs.
fn stand_in_netboot(image: Vec<u8>) -> (String, Reports) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let reports: Reports = Arc::default();
    let recorded = reports.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let image = image.clone();
            let recorded = recorded.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    return;
                }
                let mut length = 0usize;
                let mut authorization = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if lower.starts_with("authorization:") {
                        authorization = line["authorization:".len()..].trim().to_owned();
                    }
                }
                let mut parts = request_line.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                if method == "POST" {
                    let mut body = vec![0u8; length];
                    let _ = reader.read_exact(&mut body);
                    let report = ProgressReport::parse(&body).expect("valid report JSON");
                    recorded
                        .lock()
                        .expect("lock")
                        .push((path.to_owned(), authorization, report));
                    let _ =
                        stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                } else if path == "/node.raw.zst" {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        image.len()
                    );
                    for chunk in image.chunks(64 * 1024) {
                        if stream.write_all(chunk).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                } else {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            });
        }
    });
    (base, reports)
}

fn test_image() -> Vec<u8> {
    // Incompressible enough that the download takes a while at the served pace.
    let mut state = 0x1234_5678u32;
    (0..12 << 20)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            if i % 4 == 0 {
                state as u8
            } else {
                0
            }
        })
        .collect()
}

fn orders(base: &str, image: &[u8], sha256: &str) -> Orders {
    let cmdline = format!(
        "console=ttyS0 provisioner.url={base} provisioner.token={TOKEN} \
         provisioner.image={base}/node.raw.zst provisioner.sha256={sha256} provisioner.image_size={}",
        image.len()
    );
    Orders::from_cmdline(&cmdline).expect("orders parse")
}

#[test]
fn image_is_written_with_progress_on_the_console_and_reported_to_netboot() {
    let image = test_image();
    let compressed = zstd::encode_all(&image[..], 3).expect("zstd");
    let (base, reports) = stand_in_netboot(compressed);
    let orders = orders(&base, &image, &hex::encode(Sha256::digest(&image)));
    let reporter = Reporter::new(&orders.netboot_url, MAC, orders.imaging.token.clone());
    let dir = tempfile::tempdir().expect("dir");
    let target = dir.path().join("disk.raw");
    let mut console = Vec::new();
    let pacing = Pacing {
        console_every: Duration::from_millis(100),
        report_every: Duration::from_millis(200),
    };
    let report =
        write_ordered_image(&orders, &target, &reporter, pacing, &mut console).expect("written");
    assert_eq!(report.bytes, image.len() as u64);
    assert_eq!(std::fs::read(&target).expect("read"), image);

    let console = String::from_utf8(console).expect("utf8");
    let progress_lines = console.lines().filter(|l| l.contains("MiB/s")).count();
    assert!(progress_lines >= 3, "console:\n{console}");
    assert!(console.contains("%), "), "percent missing:\n{console}");
    assert!(console.contains("sha256 verified"), "console:\n{console}");

    let reports = reports.lock().expect("lock").clone();
    assert!(reports.len() >= 3, "{reports:?}");
    for (path, authorization, _) in &reports {
        assert_eq!(path, "/report/52-54-00-ee-00-07");
        assert_eq!(authorization, &format!("Bearer {TOKEN}"));
    }
    let percents: Vec<u8> = reports
        .iter()
        .map(|(_, _, r)| match r {
            ProgressReport::Imaging { progress, .. } => *progress,
            other => panic!("unexpected report {other:?}"),
        })
        .collect();
    assert_eq!(percents.first(), Some(&0));
    assert_eq!(percents.last(), Some(&100));
    assert!(percents.windows(2).all(|w| w[0] <= w[1]), "{percents:?}");
    assert!(
        reports.iter().any(|(_, _, r)| matches!(r,
            ProgressReport::Imaging { progress, rate: Some(rate), .. } if *progress > 0 && *progress < 100 && *rate > 0)),
        "no intermediate report with a rate: {reports:?}"
    );
}

#[test]
fn wrong_sha256_leaves_the_target_unbootable_and_no_imaged_report() {
    let image = test_image();
    let compressed = zstd::encode_all(&image[..], 3).expect("zstd");
    let (base, reports) = stand_in_netboot(compressed);
    let orders = orders(&base, &image, &"ab".repeat(32));
    let reporter = Reporter::new(&orders.netboot_url, MAC, orders.imaging.token.clone());
    let dir = tempfile::tempdir().expect("dir");
    let target = dir.path().join("disk.raw");
    std::fs::write(&target, vec![0xffu8; 4 << 20]).expect("old disk");
    let error = write_ordered_image(
        &orders,
        &target,
        &reporter,
        Pacing::default(),
        &mut Vec::new(),
    )
    .expect_err("hash mismatch");
    assert!(error.to_string().contains("sha256"), "{error}");
    let disk = std::fs::read(&target).expect("read");
    assert!(
        disk[..1 << 20].iter().all(|&b| b == 0),
        "first MiB not wiped"
    );
    assert!(!reports
        .lock()
        .expect("lock")
        .iter()
        .any(|(_, _, r)| matches!(r, ProgressReport::Imaged { .. })));
}

#[test]
fn no_disk_reports_failed_with_the_reason_and_writes_nothing() {
    let image = test_image();
    let (base, reports) = stand_in_netboot(Vec::new());
    let orders = orders(&base, &image, &"ab".repeat(32));
    let reporter = Reporter::new(&orders.netboot_url, MAC, orders.imaging.token.clone());
    let sys_block = tempfile::tempdir().expect("dir");
    let mut console = Vec::new();
    let error = provision(
        &orders,
        &reporter,
        Path::new(sys_block.path()),
        Pacing::default(),
        &mut console,
    )
    .expect_err("no disk");
    let reports = reports.lock().expect("lock").clone();
    assert_eq!(reports.len(), 1, "{reports:?}");
    match &reports[0].2 {
        ProgressReport::Failed { message } => {
            assert_eq!(message, &error.to_string());
            assert!(!message.is_empty());
        }
        other => panic!("expected failed, got {other:?}"),
    }
    let console = String::from_utf8(console).expect("utf8");
    assert!(console.contains("imaging failed:"), "{console}");
}
