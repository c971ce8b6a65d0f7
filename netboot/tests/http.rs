//! The HTTP server on 127.0.0.1, driven with raw HTTP/1.1 so every byte on the wire is checked.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use netboot::http::{serve, HttpSettings, NetbootSite, ServeOptions};
use netboot::ipxe::ScriptSettings;
use netboot::{BootEvent, MacAddr, Machine, MachineLookup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NODE2_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const BROKEN_MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x00, 0x00, 0x99]);

/// A machine map that records what the server reports.
struct Recorder {
    machines: HashMap<MacAddr, Machine>,
    events: Mutex<Vec<(String, BootEvent)>>,
}

impl MachineLookup for Recorder {
    fn by_mac(&self, mac: &MacAddr) -> Option<Machine> {
        self.machines.get(mac).cloned()
    }
    fn observe(&self, machine: &Machine, event: BootEvent) {
        if let Ok(mut events) = self.events.lock() {
            events.push((machine.name.clone(), event));
        }
    }
}

struct Server {
    addr: SocketAddr,
    dir: PathBuf,
    recorder: Arc<Recorder>,
    shutdown: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    fn events(&self) -> Vec<(String, BootEvent)> {
        self.recorder
            .events
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default()
    }
    fn asset(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join("assets").join(name)).expect("read asset")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Deterministic, non-repeating-looking test data.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn fixture(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("netboot-http-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("assets/sub")).expect("mkdir");
    std::fs::create_dir_all(dir.join("boot")).expect("mkdir");
    std::fs::write(dir.join("assets/vmlinuz"), pattern(300_000, 1)).expect("write");
    std::fs::write(dir.join("assets/initrd.img"), pattern(70_001, 2)).expect("write");
    std::fs::write(dir.join("assets/sub/file name.txt"), b"spaced\n").expect("write");
    std::fs::write(dir.join("assets/empty"), b"").expect("write");
    std::fs::write(dir.join("boot/ipxe.efi"), pattern(4096, 3)).expect("write");
    std::fs::write(dir.join("secret"), b"outside").expect("write");
    std::os::unix::fs::symlink(dir.join("secret"), dir.join("assets/escape")).expect("symlink");
    // 32 MiB without using 32 MiB of disk.
    let big = std::fs::File::create(dir.join("assets/big.img")).expect("create");
    big.set_len(32 << 20).expect("set_len");
    dir
}

async fn start(name: &str, grace: Option<Duration>) -> Server {
    let dir = fixture(name);
    let mut machines = HashMap::new();
    machines.insert(
        NODE2_MAC,
        Machine {
            name: "node2".into(),
            mac: NODE2_MAC,
            ip: Ipv4Addr::new(10, 77, 0, 20),
            hostname: None,
        },
    );
    machines.insert(
        BROKEN_MAC,
        Machine {
            name: "bad\nname".into(),
            mac: BROKEN_MAC,
            ip: Ipv4Addr::new(10, 77, 0, 21),
            hostname: None,
        },
    );
    let recorder = Arc::new(Recorder {
        machines,
        events: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = Arc::new(HttpSettings {
        boot_dir: dir.join("boot"),
        assets_dir: dir.join("assets"),
        script: ScriptSettings {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: "console=ttyS0 hostname={hostname} ip={ip}".into(),
        },
        base_url: format!("http://{addr}"),
    });
    let shutdown = CancellationToken::new();
    let lookup: Arc<dyn MachineLookup> = recorder.clone();
    let options = match grace {
        Some(grace) => ServeOptions {
            grace,
            ..ServeOptions::default()
        },
        None => ServeOptions::default(),
    };
    let task = tokio::spawn(serve(
        listener,
        NetbootSite::new(settings, lookup),
        options,
        shutdown.clone(),
    ));
    Server {
        addr,
        dir,
        recorder,
        shutdown,
        task,
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn parse_head(head: &[u8]) -> (u16, Vec<(String, String)>) {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    assert!(
        status_line.starts_with("HTTP/1.1 "),
        "status line {status_line:?}"
    );
    let status = status_line[9..12].parse().expect("status code");
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("header line");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    (status, headers)
}

fn split_response(raw: &[u8]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let (status, headers) = parse_head(&raw[..end]);
    (status, headers, raw[end + 4..].to_vec())
}

/// Sends one request on a fresh connection that the server must close after the response, and
/// checks the framing: the body read up to EOF has exactly `Content-Length` bytes (none for
/// HEAD and 304), and no chunked encoding is used.
async fn exchange(addr: SocketAddr, method: &str, path: &str, extra: &[(&str, &str)]) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let raw = raw_exchange(addr, req.as_bytes()).await;
    let (status, headers, body) = split_response(&raw);
    let resp = Resp {
        status,
        headers,
        body,
    };
    assert_eq!(
        resp.header("transfer-encoding"),
        None,
        "{method} {path}: chunked"
    );
    if method == "HEAD" || status == 304 {
        assert!(resp.body.is_empty(), "{method} {path}: body on {status}");
    } else {
        let len: usize = resp
            .header("content-length")
            .unwrap_or_else(|| panic!("{method} {path}: no Content-Length"))
            .parse()
            .expect("numeric Content-Length");
        assert_eq!(resp.body.len(), len, "{method} {path}: body length");
    }
    resp
}

async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let run = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.expect("read");
        raw
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("response in time")
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    exchange(addr, "GET", path, &[]).await
}

fn expected_script(addr: SocketAddr) -> String {
    format!(
        "#!ipxe\n# node2 52:54:00:12:34:56\n\
         kernel http://{addr}/assets/vmlinuz initrd=initrd.img console=ttyS0 hostname=node2 ip=10.77.0.20\n\
         initrd http://{addr}/assets/initrd.img\nboot\n"
    )
}

#[tokio::test]
async fn serves_the_script_of_a_known_machine() {
    let srv = start("script", None).await;
    for path in [
        "/ipxe/52-54-00-12-34-56",
        "/ipxe/52:54:00:12:34:56",
        "/ipxe/52-54-00-12-34-56?x=1",
        "/ipxe/52%3A54%3A00%3A12%3A34%3A56",
        "/ipxe/52-54-00-12-34-56"
            .to_uppercase()
            .replace("IPXE", "ipxe")
            .as_str(),
    ] {
        let r = get(srv.addr, path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.text(), expected_script(srv.addr), "{path}");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    let events = srv.events();
    assert_eq!(events.len(), 5, "{events:?}");
    assert!(events
        .iter()
        .all(|e| *e == ("node2".to_string(), BootEvent::IpxeScriptServed)));

    let r = exchange(srv.addr, "HEAD", "/ipxe/52-54-00-12-34-56", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(expected_script(srv.addr).len().to_string().as_str())
    );
    assert_eq!(srv.events().len(), 5, "HEAD is not a boot step");
}

#[tokio::test]
async fn rejects_bad_and_unknown_macs() {
    let srv = start("macs", None).await;
    assert_eq!(get(srv.addr, "/ipxe/52-54-00-12-34-57").await.status, 404);
    for bad in [
        "/ipxe/nonsense",
        "/ipxe/52-54-00-12-34",
        "/ipxe/52-54-00-12-34-56-78",
        "/ipxe/52-54-00-12-34-zz",
        "/ipxe/",
        "/ipxe/52-54-00-12-34-56/x",
        "/ipxe/%zz",
    ] {
        assert_eq!(get(srv.addr, bad).await.status, 400, "{bad}");
    }
    assert!(srv.events().is_empty());
}

#[tokio::test]
async fn unrenderable_script_is_a_server_error() {
    let srv = start("broken", None).await;
    let r = get(srv.addr, "/ipxe/52-54-00-00-00-99").await;
    assert_eq!(r.status, 500);
    assert!(!r.text().contains("#!ipxe"));
    assert!(srv.events().is_empty());
}

#[tokio::test]
async fn serves_whole_files_with_validators() {
    let srv = start("whole", None).await;
    let kernel = srv.asset("vmlinuz");
    let r = get(srv.addr, "/assets/vmlinuz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, kernel);
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    let etag = r.header("etag").expect("etag");
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 4,
        "{etag}"
    );
    let lm = r.header("last-modified").expect("last-modified");
    let modified = std::fs::metadata(srv.dir.join("assets/vmlinuz"))
        .and_then(|m| m.modified())
        .expect("mtime");
    assert_eq!(lm, httpdate::fmt_http_date(modified));

    let r = get(srv.addr, "/boot/ipxe.efi").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, pattern(4096, 3));

    let r = get(srv.addr, "/assets/sub/file%20name.txt").await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"spaced\n"[..]));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));

    let r = get(srv.addr, "/assets/empty").await;
    assert_eq!((r.status, r.header("content-length")), (200, Some("0")));

    // No event: an asset request does not say which machine asked.
    assert!(srv.events().is_empty());
}

#[tokio::test]
async fn head_has_the_get_headers_and_no_body() {
    let srv = start("head", None).await;
    let g = get(srv.addr, "/assets/initrd.img").await;
    let h = exchange(srv.addr, "HEAD", "/assets/initrd.img", &[]).await;
    assert_eq!(h.status, 200);
    for name in [
        "content-length",
        "etag",
        "last-modified",
        "content-type",
        "accept-ranges",
    ] {
        assert!(h.header(name).is_some(), "HEAD lacks {name}");
        assert_eq!(h.header(name), g.header(name), "{name}");
    }
    assert_eq!(h.header("content-length"), Some("70001"));
    let h = exchange(
        srv.addr,
        "HEAD",
        "/assets/initrd.img",
        &[("Range", "bytes=0-9")],
    )
    .await;
    assert_eq!(h.status, 206);
    assert_eq!(h.header("content-length"), Some("10"));
    assert_eq!(h.header("content-range"), Some("bytes 0-9/70001"));
}

#[tokio::test]
async fn serves_single_ranges() {
    let srv = start("range", None).await;
    let kernel = srv.asset("vmlinuz");
    let len = kernel.len();
    for (spec, start, end) in [
        ("bytes=0-0", 0, 0),
        ("bytes=100-65635", 100, 65635),
        ("bytes=299990-", 299_990, len - 1),
        ("bytes=-7", len - 7, len - 1),
        ("bytes=-999999", 0, len - 1),
        ("bytes=299000-999999", 299_000, len - 1),
    ] {
        let r = exchange(srv.addr, "GET", "/assets/vmlinuz", &[("Range", spec)]).await;
        assert_eq!(r.status, 206, "{spec}");
        assert_eq!(
            r.header("content-range"),
            Some(format!("bytes {start}-{end}/{len}").as_str()),
            "{spec}"
        );
        assert_eq!(r.body, &kernel[start..=end], "{spec}");
    }
    for spec in ["bytes=300000-", "bytes=400000-400010", "bytes=-0"] {
        let r = exchange(srv.addr, "GET", "/assets/vmlinuz", &[("Range", spec)]).await;
        assert_eq!(r.status, 416, "{spec}");
        assert_eq!(r.header("content-range"), Some("bytes */300000"), "{spec}");
    }
    let r = exchange(srv.addr, "GET", "/assets/empty", &[("Range", "bytes=0-")]).await;
    assert_eq!(
        (r.status, r.header("content-range")),
        (416, Some("bytes */0"))
    );
    // Several ranges, or syntax we do not take: the whole file.
    for spec in ["bytes=0-1,5-6", "bytes=9-3", "lines=1-2", "bytes=x-"] {
        let r = exchange(srv.addr, "GET", "/assets/vmlinuz", &[("Range", spec)]).await;
        assert_eq!(r.status, 200, "{spec}");
        assert_eq!(r.header("content-range"), None);
        assert_eq!(r.body, kernel, "{spec}");
    }
}

#[tokio::test]
async fn honours_conditional_requests() {
    let srv = start("cond", None).await;
    let g = get(srv.addr, "/assets/vmlinuz").await;
    let etag = g.header("etag").expect("etag").to_string();
    let lm = g.header("last-modified").expect("lm").to_string();

    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("If-None-Match", &etag)],
    )
    .await;
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let list = format!("\"nope\", W/{etag}");
    assert_eq!(
        exchange(
            srv.addr,
            "GET",
            "/assets/vmlinuz",
            &[("If-None-Match", &list)]
        )
        .await
        .status,
        304
    );
    assert_eq!(
        exchange(
            srv.addr,
            "HEAD",
            "/assets/vmlinuz",
            &[("If-None-Match", &etag)]
        )
        .await
        .status,
        304
    );
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("If-None-Match", "\"other\"")],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (200, 300_000));

    assert_eq!(
        exchange(
            srv.addr,
            "GET",
            "/assets/vmlinuz",
            &[("If-Modified-Since", &lm)]
        )
        .await
        .status,
        304
    );
    let old = "Mon, 01 Jan 2001 00:00:00 GMT";
    assert_eq!(
        exchange(
            srv.addr,
            "GET",
            "/assets/vmlinuz",
            &[("If-Modified-Since", old)]
        )
        .await
        .status,
        200
    );
    // If-None-Match wins over If-Modified-Since.
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("If-None-Match", "\"other\""), ("If-Modified-Since", &lm)],
    )
    .await;
    assert_eq!(r.status, 200);

    // If-Range: the range only while the file is unchanged.
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("Range", "bytes=0-9"), ("If-Range", &etag)],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (206, 10));
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("Range", "bytes=0-9"), ("If-Range", &lm)],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (206, 10));
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/vmlinuz",
        &[("Range", "bytes=0-9"), ("If-Range", "\"old\"")],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (200, 300_000));

    // The tag changes when the file does.
    std::fs::write(srv.dir.join("assets/vmlinuz"), b"new kernel").expect("rewrite");
    let r = get(srv.addr, "/assets/vmlinuz").await;
    assert_ne!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(
        exchange(
            srv.addr,
            "GET",
            "/assets/vmlinuz",
            &[("If-None-Match", &etag)]
        )
        .await
        .status,
        200
    );
}

#[tokio::test]
async fn confines_and_rejects_bad_paths() {
    let srv = start("paths", None).await;
    for (path, want) in [
        ("/assets/../../etc/passwd", 400),
        ("/assets/../secret", 400),
        ("/assets/%2e%2e/secret", 400),
        ("/assets/sub/%2E%2E/%2E%2E/secret", 400),
        ("/assets/a%00b", 400),
        ("/assets/%zz", 400),
        ("/assets/%e9", 400),
        ("/assets/a%5c..%5csecret", 400),
        ("/boot/..", 400),
        ("/boot/../../../etc/passwd", 400),
        ("/assets/escape", 404),
        ("/assets/missing", 404),
        ("/assets/sub", 404),
        ("/assets/sub/", 404),
        ("/assets/", 404),
        ("/boot/", 404),
        ("/assets//etc/passwd", 404),
        ("/", 404),
        ("/etc/passwd", 404),
        ("/assetsvmlinuz", 404),
        ("/boot/vmlinuz", 404),
    ] {
        let r = get(srv.addr, path).await;
        assert_eq!(r.status, want, "{path}");
        assert!(!r.text().contains("outside"), "{path} leaked the secret");
        assert!(!r.text().contains("root:"), "{path} leaked /etc/passwd");
    }
}

#[tokio::test]
async fn other_methods_get_405() {
    let srv = start("methods", None).await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
        for path in [
            "/ipxe/52-54-00-12-34-56",
            "/assets/vmlinuz",
            "/boot/ipxe.efi",
        ] {
            let r = exchange(srv.addr, method, path, &[("Content-Length", "0")]).await;
            assert_eq!(r.status, 405, "{method} {path}");
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}");
        }
    }
    assert!(srv.events().is_empty());
}

#[tokio::test]
async fn malformed_http_does_not_hang_or_crash() {
    let srv = start("garbage", None).await;
    let raw = raw_exchange(srv.addr, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    let raw = raw_exchange(
        srv.addr,
        b"GET /assets/vm linuz HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        raw.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );
    // Still serving.
    assert_eq!(get(srv.addr, "/assets/empty").await.status, 200);
}

#[tokio::test]
async fn keep_alive_serves_several_requests_per_connection() {
    let srv = start("keepalive", None).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let req = "GET /assets/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n\
               HEAD /assets/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n\
               GET /ipxe/52-54-00-12-34-56 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("in time")
        .expect("read");
    let (status, headers, rest) = split_response(&raw);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), "70001".into())),
        "{headers:?}"
    );
    assert_eq!(&rest[..70001], pattern(70_001, 2).as_slice());
    let (status, headers, rest) = split_response(&rest[70001..]);
    assert_eq!(status, 200);
    assert!(
        headers.contains(&("content-length".into(), "300000".into())),
        "{headers:?}"
    );
    let (status, _, rest) = split_response(&rest);
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&rest), expected_script(srv.addr));
}

#[tokio::test]
async fn streams_large_files() {
    let srv = start("large", None).await;
    let r = get(srv.addr, "/assets/big.img").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 32 << 20);
    assert!(r.body.iter().all(|&b| b == 0));
    let r = exchange(
        srv.addr,
        "GET",
        "/assets/big.img",
        &[("Range", "bytes=33554000-")],
    )
    .await;
    assert_eq!((r.status, r.body.len()), (206, 432));
}

/// Starts a 32 MiB download and reads only its headers; returns the stream.
async fn start_download(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /assets/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.expect("read status");
    assert_eq!(&first, b"HTTP/1.1 200");
    s
}

#[tokio::test]
async fn shutdown_lets_in_flight_downloads_finish() {
    let mut srv = start("graceful", Some(Duration::from_secs(60))).await;
    let mut s = start_download(srv.addr).await;
    // An idle keep-alive connection must not hold shutdown up.
    let mut idle = TcpStream::connect(srv.addr).await.expect("connect");
    idle.write_all(b"GET /assets/empty HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 12];
    idle.read_exact(&mut buf).await.expect("read");

    srv.shutdown.cancel();
    let refused = async {
        while TcpStream::connect(srv.addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("new connections refused after shutdown");

    // EOF must come well before the 60 s grace: the server closes the connection right
    // after the response in flight instead of keeping it alive.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest))
        .await
        .expect("download finishes and the connection closes")
        .expect("read");
    let end = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    assert_eq!(
        rest.len() - end - 4,
        32 << 20,
        "whole file after shutdown was requested"
    );

    // Nothing in flight any more: serve returns long before the grace is over.
    let started = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), &mut srv.task)
        .await
        .expect("serve returns");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The idle connection was closed, not left open.
    let mut tail = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut tail)).await;
    assert!(closed.is_ok(), "idle connection still open");
}

#[tokio::test]
async fn shutdown_grace_is_bounded() {
    let mut srv = start("bounded", Some(Duration::from_millis(300))).await;
    // A client that never reads: its download cannot finish.
    let _stalled = start_download(srv.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    srv.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(30), &mut srv.task)
        .await
        .expect("serve returns");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
    // At the grace, not before; the bound leaves room for a loaded machine (the stalled
    // download alone would never end).
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[tokio::test]
async fn serves_concurrent_clients() {
    let srv = start("concurrent", None).await;
    let kernel = srv.asset("vmlinuz");
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..32u64 {
        let addr = srv.addr;
        clients.spawn(async move {
            let start = i * 1000;
            let range = format!("bytes={start}-");
            let r = exchange(addr, "GET", "/assets/vmlinuz", &[("Range", &range)]).await;
            (start, r)
        });
    }
    let mut n = 0;
    while let Some(joined) = clients.join_next().await {
        let (start, r) = joined.expect("client task");
        assert_eq!(r.status, 206);
        assert_eq!(r.body, &kernel[start as usize..]);
        n += 1;
    }
    assert_eq!(n, 32);
}

/// Reads one response from a kept-alive connection: its head, then exactly `Content-Length`
/// body bytes (none for a HEAD or a 304). Bytes read past it are left in `pending`.
async fn read_response(
    s: &mut TcpStream,
    pending: &mut Vec<u8>,
    head_only: bool,
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let run = async {
        let end = loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 8192];
            let n = s.read(&mut chunk).await.expect("read head");
            assert!(n > 0, "closed before a response head");
            pending.extend_from_slice(&chunk[..n]);
        };
        let (status, headers) = parse_head(&pending[..end]);
        pending.drain(..end + 4);
        let len: usize = if head_only || status == 304 {
            0
        } else {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.parse().expect("numeric Content-Length"))
                .expect("Content-Length")
        };
        while pending.len() < len {
            let mut chunk = vec![0u8; 64 * 1024];
            let n = s.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "closed within a body");
            pending.extend_from_slice(&chunk[..n]);
        }
        let body = pending.drain(..len).collect();
        (status, headers, body)
    };
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("response in time")
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// One keep-alive connection, one request at a time: files (sent by the server's own path),
/// the script and a report with a body (hyper's), a range, a HEAD, a 404 and a 304, in turns.
#[tokio::test]
async fn keep_alive_mixes_file_and_other_requests() {
    let srv = start("mix", None).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    let mut pending = Vec::new();
    let vmlinuz = srv.asset("vmlinuz");
    let mut etag = String::new();
    for round in 0..2 {
        s.write_all(b"GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, headers, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 200);
        assert_eq!(body, vmlinuz, "round {round}");
        assert_eq!(header_of(&headers, "accept-ranges"), Some("bytes"));
        assert_eq!(
            header_of(&headers, "content-type"),
            Some("application/octet-stream")
        );
        assert!(header_of(&headers, "last-modified").is_some());
        assert!(header_of(&headers, "date").is_some());
        assert_eq!(header_of(&headers, "connection"), None);
        etag = header_of(&headers, "etag").expect("etag").to_string();

        s.write_all(b"GET /ipxe/52-54-00-12-34-56 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, _, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 200);
        assert_eq!(String::from_utf8_lossy(&body), expected_script(srv.addr));

        // A body hyper reads: the connection comes back after it.
        let report = b"{\"phase\":\"imaged\"}";
        s.write_all(
            format!(
                "POST /report/52-54-00-12-34-56 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                report.len()
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        s.write_all(report).await.expect("write body");
        let (status, _, _) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 404, "no provisioning: reports are not enabled");

        s.write_all(b"GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-1999\r\n\r\n")
            .await
            .expect("write");
        let (status, headers, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 206);
        assert_eq!(
            header_of(&headers, "content-range"),
            Some("bytes 1000-1999/300000")
        );
        assert_eq!(body, &vmlinuz[1000..2000]);

        s.write_all(b"HEAD /boot/ipxe.efi HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, headers, _) = read_response(&mut s, &mut pending, true).await;
        assert_eq!(status, 200);
        assert_eq!(header_of(&headers, "content-length"), Some("4096"));

        s.write_all(b"GET /assets/missing HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let (status, _, body) = read_response(&mut s, &mut pending, false).await;
        assert_eq!((status, body.as_slice()), (404, b"Not Found\n".as_slice()));

        s.write_all(
            format!("GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let (status, headers, _) = read_response(&mut s, &mut pending, false).await;
        assert_eq!(status, 304);
        assert_eq!(header_of(&headers, "content-length"), None);
    }
    assert!(pending.is_empty());
    assert!(!etag.is_empty());
}

/// Every request at once on one connection, files and others mixed: answered in order.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let srv = start("pipelined", None).await;
    let report = "{\"phase\":\"imaged\"}";
    let request = format!(
        "GET /assets/initrd.img HTTP/1.1\r\nHost: x\r\n\r\n\
         GET /ipxe/52-54-00-12-34-56 HTTP/1.1\r\nHost: x\r\n\r\n\
         HEAD /assets/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /report/52-54-00-12-34-56 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: {}\r\n\r\n{report}\
         GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\nRange: bytes=-10\r\n\r\n\
         GET /assets/sub/file%20name.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        report.len()
    );
    let raw = raw_exchange(srv.addr, request.as_bytes()).await;
    let mut s = std::io::Cursor::new(raw);
    let mut next = |head_only: bool| {
        let rest = &s.get_ref()[s.position() as usize..];
        let end = rest
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let (status, headers) = parse_head(&rest[..end]);
        let len: usize = if head_only {
            0
        } else {
            header_of(&headers, "content-length")
                .expect("Content-Length")
                .parse()
                .expect("number")
        };
        let body = rest[end + 4..end + 4 + len].to_vec();
        s.set_position(s.position() + (end + 4 + len) as u64);
        (status, headers, body)
    };
    let (status, _, body) = next(false);
    assert_eq!((status, body), (200, pattern(70_001, 2)));
    let (status, _, body) = next(false);
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&body), expected_script(srv.addr));
    let (status, headers, _) = next(true);
    assert_eq!(status, 200);
    assert_eq!(header_of(&headers, "content-length"), Some("300000"));
    let (status, _, _) = next(false);
    assert_eq!(status, 404);
    let (status, _, body) = next(false);
    assert_eq!(status, 206);
    assert_eq!(body, &pattern(300_000, 1)[299_990..]);
    let (status, headers, body) = next(false);
    assert_eq!((status, body.as_slice()), (200, b"spaced\n".as_slice()));
    assert_eq!(header_of(&headers, "connection"), Some("close"));
    assert_eq!(
        s.position() as usize,
        s.get_ref().len(),
        "nothing after the last"
    );
}

/// A request head that arrives in pieces is answered once whole.
#[tokio::test]
async fn a_request_head_split_across_reads_is_answered() {
    let srv = start("split", None).await;
    let mut s = TcpStream::connect(srv.addr).await.expect("connect");
    for piece in [
        &b"GET /assets/init"[..],
        b"rd.img HTTP/1.1\r\nHo",
        b"st: x\r\nRange: bytes=0-9\r",
        b"\n\r\n",
    ] {
        s.write_all(piece).await.expect("write");
        s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let mut pending = Vec::new();
    let (status, _, body) = read_response(&mut s, &mut pending, false).await;
    assert_eq!((status, body), (206, pattern(70_001, 2)[..10].to_vec()));
}

/// A head larger than the server's buffer is refused as hyper refuses it (431), and the
/// connection is closed.
#[tokio::test]
async fn a_too_large_request_head_is_refused() {
    let srv = start("largehead", None).await;
    let request = format!(
        "GET /assets/vmlinuz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    let run = async {
        let mut s = TcpStream::connect(srv.addr).await.expect("connect");
        // The server may answer and close before it read all of it.
        let _ = s.write_all(request.as_bytes()).await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("answered in time");
    assert!(
        raw.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&raw[..raw.len().min(200)])
    );
    assert_eq!(get(srv.addr, "/assets/empty").await.status, 200);
}

/// HTTP/1.0 gets an HTTP/1.0 answer and the connection closes after it, as hyper does.
#[tokio::test]
async fn http_1_0_file_requests_close_after_the_response() {
    let srv = start("http10", None).await;
    let raw = raw_exchange(srv.addr, b"GET /assets/initrd.img HTTP/1.0\r\n\r\n").await;
    assert!(raw.starts_with(b"HTTP/1.0 200 OK\r\n"), "{:?}", &raw[..20]);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head");
    assert_eq!(&raw[end + 4..], pattern(70_001, 2).as_slice());
}
