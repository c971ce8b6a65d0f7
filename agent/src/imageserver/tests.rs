//! The imageserver on 127.0.0.1: bootstrap seed, pull-through cache against a real upstream
//! imageserver and against a scripted one that counts requests, truncates or stalls.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::cache::{manifest_entry, Expected};
use super::{file_server, Options, Seed};

fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("imageserver-{tag}-"))
        .tempdir()
        .expect("temp dir")
}

/// Pseudo-random bytes (an image stand-in that compresses badly).
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A manifest shaped like image-builder/build.sh's.
fn manifest(files: &[(&str, &[u8])]) -> String {
    let mut m = serde_json::Map::new();
    m.insert("profile".into(), "debian-test".into());
    for (i, (name, data)) in files.iter().enumerate() {
        m.insert(
            format!("artifact{i}"),
            serde_json::json!({"file": name, "size": data.len(), "sha256": sha256_hex(data)}),
        );
    }
    serde_json::Value::Object(m).to_string()
}

/// Every directory under `dir` (relative names, sorted; symlinks not followed).
fn directories(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() && !path.is_symlink() {
                    if let Ok(rel) = path.strip_prefix(base) {
                        out.push(rel.display().to_string());
                    }
                    walk(base, &path, out);
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Every file under `dir`, hidden ones included (relative names, sorted).
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() && !path.is_symlink() {
                    walk(base, &path, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.display().to_string());
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.task.await;
    }
}

async fn start(options: Options) -> Server {
    let (site, rendered) = file_server(&options).expect("file server");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let shutdown_token = shutdown.clone();
    let task = tokio::spawn(async move {
        let served = netboot::http::serve(
            listener,
            site,
            netboot::http::ServeOptions {
                grace: Duration::from_secs(1),
                ..netboot::http::ServeOptions::default()
            },
            shutdown_token,
        )
        .await;
        drop(rendered);
        served
    });
    Server {
        addr,
        shutdown,
        task,
    }
}

fn options(dir: &Path) -> Options {
    Options {
        dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("addr"),
        seed: None,
        upstream: None,
        limits: netboot::http::HttpLimits::default(),
    }
}

/// A GET (with optional Range) through ureq: status, body, headers of interest.
struct Got {
    status: u16,
    body: Vec<u8>,
    content_range: Option<String>,
    etag: Option<String>,
}

async fn get(url: String, range: Option<&'static str>) -> Got {
    tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url).timeout(Duration::from_secs(20));
        if let Some(range) = range {
            request = request.set("Range", range);
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {url}: {e}"),
        };
        let status = response.status();
        let content_range = response.header("content-range").map(str::to_string);
        let etag = response.header("etag").map(str::to_string);
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut response.into_reader(), &mut body).expect("body");
        Got {
            status,
            body,
            content_range,
            etag,
        }
    })
    .await
    .expect("client task")
}

/// A raw request line (paths a URL library would normalise), returning the status code.
async fn raw_status(addr: SocketAddr, path: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

/// How the scripted upstream answers one path.
#[derive(Clone)]
struct Scripted {
    body: Vec<u8>,
    /// Close the connection after this many body bytes (Content-Length still the whole).
    cut_after: Option<usize>,
    /// Wait before answering a GET.
    delay: Duration,
}

/// An upstream that answers from a table and counts GETs per path (of files it has), and
/// every request per path (misses and HEADs included).
struct FakeUpstream {
    addr: SocketAddr,
    gets: Arc<Mutex<HashMap<String, usize>>>,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeUpstream {
    async fn start(files: HashMap<String, Scripted>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let gets: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let requests: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let files = Arc::new(files);
        let counter = gets.clone();
        let all = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let files = files.clone();
                let counter = counter.clone();
                let all = all.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).to_string();
                    let mut words = text.split_whitespace();
                    let method = words.next().unwrap_or_default().to_string();
                    let path = words.next().unwrap_or_default().to_string();
                    if let Ok(mut all) = all.lock() {
                        *all.entry(path.clone()).or_default() += 1;
                    }
                    let Some(file) = files.get(&path) else {
                        let _ = stream
                            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    if method == "GET" {
                        if let Ok(mut gets) = counter.lock() {
                            *gets.entry(path.clone()).or_default() += 1;
                        }
                        tokio::time::sleep(file.delay).await;
                    }
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: \"fixed\"\r\nConnection: close\r\n\r\n",
                        file.body.len()
                    );
                    let _ = stream.write_all(header.as_bytes()).await;
                    if method == "GET" {
                        let end = file.cut_after.unwrap_or(file.body.len());
                        let _ = stream.write_all(&file.body[..end]).await;
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        FakeUpstream {
            addr,
            gets,
            requests,
            task,
        }
    }

    fn requests(&self, path: &str) -> usize {
        self.requests
            .lock()
            .map(|g| g.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn gets(&self, path: &str) -> usize {
        self.gets
            .lock()
            .map(|g| g.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn scripted(body: &[u8]) -> Scripted {
    Scripted {
        body: body.to_vec(),
        cut_after: None,
        delay: Duration::ZERO,
    }
}

#[test]
fn manifest_entries_are_found_at_any_depth() {
    let m: serde_json::Value = serde_json::json!({
        "profile": "debian-test",
        "image": {"file": "image.raw.zst", "size": 10, "sha256": "ab", "rawSize": 99},
        "kernel": {"file": "vmlinuz", "size": 3, "sha256": "cd"},
        "extra": [{"file": "a/b.img", "size": 1}],
    });
    assert_eq!(
        manifest_entry(&m, "image.raw.zst"),
        Some(Expected {
            sha256: Some("ab".into()),
            size: Some(10)
        })
    );
    assert_eq!(
        manifest_entry(&m, "a/b.img"),
        Some(Expected {
            sha256: None,
            size: Some(1)
        })
    );
    assert_eq!(manifest_entry(&m, "stage2.img"), None);
}

/// Miss → fetch (checked against the real upstream's manifest) → hit; then the upstream goes
/// away and the cached files are still served, ranges included.
#[tokio::test]
async fn caches_from_a_real_upstream_and_survives_its_loss() {
    let upstream_dir = temp_dir("upstream");
    let cache_dir = temp_dir("cache");
    let image = payload(3 * 1024 * 1024 + 17, 7);
    let kernel = payload(100_000, 9);
    std::fs::write(upstream_dir.path().join("image.raw.zst"), &image).expect("write");
    std::fs::write(upstream_dir.path().join("vmlinuz"), &kernel).expect("write");
    std::fs::write(
        upstream_dir.path().join("manifest.json"),
        manifest(&[("image.raw.zst", &image), ("vmlinuz", &kernel)]),
    )
    .expect("write");
    let upstream = start(options(upstream_dir.path())).await;

    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(format!("http://{}", upstream.addr));
    let cache = start(cache_options).await;
    let base = format!("http://{}", cache.addr);

    let first = get(format!("{base}/image.raw.zst"), None).await;
    assert_eq!(first.status, 200);
    assert!(first.body == image, "first (fetched) copy differs");
    assert_eq!(
        listing(cache_dir.path()),
        vec!["image.raw.zst".to_string()],
        "only the finished file is in the cache"
    );
    let on_disk = std::fs::read(cache_dir.path().join("image.raw.zst")).expect("cached");
    assert!(on_disk == image);
    let second = get(format!("{base}/image.raw.zst"), None).await;
    assert_eq!(second.status, 200);
    assert!(second.body == image);
    assert!(second.etag.is_some());

    let manifest_copy = get(format!("{base}/manifest.json"), None).await;
    assert_eq!(manifest_copy.status, 200);
    let missing = get(format!("{base}/no-such-file"), None).await;
    assert_eq!(missing.status, 404, "upstream 404 is our 404");

    upstream.stop().await;

    let third = get(format!("{base}/image.raw.zst"), None).await;
    assert_eq!(
        third.status, 200,
        "served from the cache with the upstream gone"
    );
    assert!(third.body == image);
    let part = get(
        format!("{base}/image.raw.zst"),
        Some("bytes=1000000-1000999"),
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(
        part.content_range.as_deref(),
        Some(format!("bytes 1000000-1000999/{}", image.len()).as_str())
    );
    assert!(part.body == image[1_000_000..1_001_000]);
    let never_fetched = get(format!("{base}/vmlinuz"), None).await;
    assert_eq!(never_fetched.status, 502, "not cached and upstream gone");
    assert_eq!(
        listing(cache_dir.path()),
        vec!["image.raw.zst".to_string(), "manifest.json".to_string()]
    );
    cache.stop().await;
}

#[tokio::test]
async fn truncated_upstream_body_is_a_502_and_leaves_nothing() {
    let image = payload(200_000, 3);
    let mut files = HashMap::new();
    files.insert(
        "/image.raw.zst".to_string(),
        Scripted {
            cut_after: Some(50_000),
            ..scripted(&image)
        },
    );
    let upstream = FakeUpstream::start(files).await;
    let cache_dir = temp_dir("cache");
    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(upstream.url());
    let cache = start(cache_options).await;

    let got = get(format!("http://{}/image.raw.zst", cache.addr), None).await;
    assert_eq!(got.status, 502);
    assert_eq!(listing(cache_dir.path()), Vec::<String>::new());
    cache.stop().await;
}

#[tokio::test]
async fn wrong_sha256_or_size_is_a_502_and_leaves_nothing() {
    let image = payload(100_000, 5);
    let other = payload(100_000, 6);
    let mut files = HashMap::new();
    files.insert("/image.raw.zst".to_string(), scripted(&image));
    files.insert("/vmlinuz".to_string(), scripted(&image[..99_999]));
    // The manifest describes other bytes for the image, and a longer kernel.
    let listed = manifest(&[("image.raw.zst", &other), ("vmlinuz", &image)]);
    files.insert("/manifest.json".to_string(), scripted(listed.as_bytes()));
    let upstream = FakeUpstream::start(files).await;
    let cache_dir = temp_dir("cache");
    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(upstream.url());
    let cache = start(cache_options).await;

    let got = get(format!("http://{}/image.raw.zst", cache.addr), None).await;
    assert_eq!(got.status, 502, "sha256 mismatch");
    let got = get(format!("http://{}/vmlinuz", cache.addr), None).await;
    assert_eq!(got.status, 502, "size mismatch");
    assert_eq!(listing(cache_dir.path()), Vec::<String>::new());
    assert_eq!(upstream.gets("/image.raw.zst"), 1);
    cache.stop().await;
}

#[tokio::test]
async fn concurrent_requests_share_one_download() {
    let image = payload(1024 * 1024, 11);
    let mut files = HashMap::new();
    files.insert(
        "/image.raw.zst".to_string(),
        Scripted {
            delay: Duration::from_millis(400),
            ..scripted(&image)
        },
    );
    let upstream = FakeUpstream::start(files).await;
    let cache_dir = temp_dir("cache");
    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(upstream.url());
    let cache = start(cache_options).await;

    let url = format!("http://{}/image.raw.zst", cache.addr);
    let clients: Vec<_> = (0..8)
        .map(|_| tokio::spawn(get(url.clone(), None)))
        .collect();
    for client in clients {
        let got = client.await.expect("client");
        assert_eq!(got.status, 200);
        assert!(got.body == image);
    }
    assert_eq!(upstream.gets("/image.raw.zst"), 1, "one upstream download");
    // No manifest upstream (404), so the ETag was checked again with a HEAD (not counted).
    assert_eq!(listing(cache_dir.path()), vec!["image.raw.zst".to_string()]);
    let again = get(url, None).await;
    assert_eq!(again.status, 200);
    assert_eq!(upstream.gets("/image.raw.zst"), 1, "hit: no new download");
    cache.stop().await;
}

#[tokio::test]
async fn traversal_and_hidden_names_are_refused_without_asking_upstream() {
    let secret = b"outside".to_vec();
    let mut files = HashMap::new();
    files.insert("/out/secret".to_string(), scripted(&secret));
    files.insert("/.fetch-abc".to_string(), scripted(&secret));
    files.insert("/etc/passwd".to_string(), scripted(&secret));
    let upstream = FakeUpstream::start(files).await;
    let cache_dir = temp_dir("cache");
    let outside = temp_dir("outside");
    std::os::unix::fs::symlink(outside.path(), cache_dir.path().join("out")).expect("symlink");
    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(upstream.url());
    let cache = start(cache_options).await;

    assert_eq!(raw_status(cache.addr, "/../etc/passwd").await, 400);
    assert_eq!(raw_status(cache.addr, "/%2e%2e/etc/passwd").await, 400);
    assert_eq!(raw_status(cache.addr, "/a/..%2F..%2Fetc/passwd").await, 400);
    assert_eq!(raw_status(cache.addr, "/.fetch-abc").await, 404);
    assert_eq!(
        raw_status(cache.addr, "/out/secret").await,
        404,
        "a symlinked directory leading outside is not written through"
    );
    assert_eq!(
        raw_status(cache.addr, "/out/new/deeper/secret").await,
        404,
        "nor are directories made through it"
    );
    std::os::unix::fs::symlink(
        outside.path().join("gone"),
        cache_dir.path().join("dangling"),
    )
    .expect("symlink");
    assert_eq!(raw_status(cache.addr, "/dangling/a/secret").await, 404);
    assert_eq!(
        std::fs::read_dir(outside.path()).expect("outside").count(),
        0,
        "nothing at all was created outside"
    );
    assert_eq!(upstream.requests("/out/new/deeper/secret"), 0);
    assert_eq!(upstream.requests("/dangling/a/secret"), 0);
    assert_eq!(upstream.gets("/out/secret"), 0);
    assert_eq!(upstream.gets("/.fetch-abc"), 0);
    assert_eq!(upstream.gets("/etc/passwd"), 0);
    cache.stop().await;
}

#[tokio::test]
async fn bootstrap_serves_the_nocloud_seed_as_cloud_init_asks() {
    let dir = temp_dir("artifacts");
    let seed_tmp = temp_dir("seed");
    let seed: PathBuf = seed_tmp.path().to_path_buf();
    std::fs::create_dir_all(seed.join("laptop")).expect("mkdir");
    let meta = "instance-id: laptop-1\nlocal-hostname: laptop\n";
    let user = "#cloud-config\nhostname: laptop\n";
    std::fs::write(seed.join("laptop/meta-data"), meta).expect("write");
    std::fs::write(seed.join("laptop/user-data"), user).expect("write");
    std::fs::write(dir.path().join("vmlinuz"), b"kernel").expect("write");
    let mut bootstrap = options(dir.path());
    bootstrap.seed = Some(Seed::Dir(seed.clone()));
    let server = start(bootstrap).await;
    // cloud-init 22.4's NoCloud with s=http://HOST/nocloud/laptop/ asks for these three.
    let base = format!("http://{}/nocloud/laptop/", server.addr);
    let got = get(format!("{base}meta-data"), None).await;
    assert_eq!((got.status, got.body.as_slice()), (200, meta.as_bytes()));
    let got = get(format!("{base}user-data"), None).await;
    assert_eq!((got.status, got.body.as_slice()), (200, user.as_bytes()));
    let got = get(format!("{base}vendor-data"), None).await;
    assert_eq!(
        (got.status, got.body.len()),
        (200, 0),
        "vendor-data: empty, not a 404 that cloud-init retries"
    );
    assert_eq!(get(format!("{base}network-config"), None).await.status, 404);
    assert_eq!(get(format!("{base}secrets"), None).await.status, 404);
    let other = format!("http://{}/nocloud/node9/user-data", server.addr);
    assert_eq!(get(other, None).await.status, 404);
    assert_eq!(
        raw_status(server.addr, "/nocloud/../laptop/user-data").await,
        400
    );
    let got = get(format!("http://{}/vmlinuz", server.addr), None).await;
    assert_eq!((got.status, got.body.as_slice()), (200, &b"kernel"[..]));
    server.stop().await;
}

/// `--bootstrap --config FILE`: the seed rendered from the example configuration's `laptop:`.
#[tokio::test]
async fn bootstrap_renders_the_seed_from_the_configuration() {
    let dir = temp_dir("artifacts");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../provisioner.yaml.example");
    let mut bootstrap = options(dir.path());
    bootstrap.seed = Some(Seed::Config(config.clone()));
    let server = start(bootstrap).await;
    let base = format!("http://{}/nocloud/seed/", server.addr);
    let user = get(format!("{base}user-data"), None).await;
    assert_eq!(user.status, 200);
    let user = String::from_utf8(user.body).expect("utf-8");
    assert!(user.starts_with("#cloud-config\n"), "{user}");
    assert!(
        user.contains("kubeadm"),
        "the laptop's user-data runs kubeadm init"
    );
    let meta = get(format!("{base}meta-data"), None).await;
    assert_eq!(meta.status, 200);
    let meta = String::from_utf8(meta.body).expect("utf-8");
    assert!(meta.contains("seed"), "{meta}");
    assert_eq!(get(format!("{base}vendor-data"), None).await.status, 200);
    let other = format!("http://{}/nocloud/laptop/user-data", server.addr);
    assert_eq!(get(other, None).await.status, 404, "only the laptop's name");
    server.stop().await;

    let mut no_laptop = options(dir.path());
    let plain = dir.path().join("plain.yaml");
    let text = std::fs::read_to_string(&config).expect("example");
    let cut = text.find("\nlaptop:").expect("laptop: section");
    let rest = &text[cut + 1..];
    let end = rest.find("\n\n").map_or(rest.len(), |i| i + 1);
    std::fs::write(&plain, format!("{}{}", &text[..cut + 1], &rest[end..])).expect("write");
    no_laptop.seed = Some(Seed::Config(plain));
    let error = file_server(&no_laptop)
        .err()
        .expect("no laptop: section is an error");
    assert!(format!("{error:#}").contains("laptop"), "{error:#}");
}

/// Anonymous requests for names the upstream lacks: no directory is made, and each name
/// costs one upstream request per negative-cache period, however often and however
/// concurrently it is asked for.
#[tokio::test]
async fn misses_create_nothing_and_ask_upstream_once() {
    let kernel = payload(50_000, 4);
    let mut files = HashMap::new();
    files.insert("/deep/dir/vmlinuz".to_string(), scripted(&kernel));
    files.insert("/bad/dir/image.raw.zst".to_string(), scripted(&kernel));
    let listed = manifest(&[("bad/dir/image.raw.zst", &kernel[..10])]);
    files.insert("/manifest.json".to_string(), scripted(listed.as_bytes()));
    let upstream = FakeUpstream::start(files).await;
    let cache_dir = temp_dir("cache");
    let mut cache_options = options(cache_dir.path());
    cache_options.upstream = Some(upstream.url());
    let cache = start(cache_options).await;
    let base = format!("http://{}", cache.addr);

    for i in 0..50 {
        let path = format!("/a{}/b/c/missing.img", i % 5);
        assert_eq!(raw_status(cache.addr, &path).await, 404);
    }
    let clients: Vec<_> = (0..16)
        .map(|_| tokio::spawn(get(format!("{base}/x/y/z.img"), None)))
        .collect();
    for client in clients {
        assert_eq!(client.await.expect("client").status, 404);
    }
    assert_eq!(directories(cache_dir.path()), Vec::<String>::new());
    assert_eq!(listing(cache_dir.path()), Vec::<String>::new());
    for i in 0..5 {
        assert_eq!(
            upstream.requests(&format!("/a{i}/b/c/missing.img")),
            1,
            "one upstream request for ten misses of a{i}"
        );
    }
    assert_eq!(upstream.requests("/x/y/z.img"), 1);
    assert_eq!(
        upstream.requests("/manifest.json"),
        0,
        "a miss asks for nothing else"
    );

    // A file the upstream has gets its directories.
    let got = get(format!("{base}/deep/dir/vmlinuz"), None).await;
    assert_eq!(got.status, 200);
    assert!(got.body == kernel);
    assert_eq!(directories(cache_dir.path()), vec!["deep", "deep/dir"]);
    // A failed download (wrong size per the manifest) takes its new directories with it.
    let got = get(format!("{base}/bad/dir/image.raw.zst"), None).await;
    assert_eq!(got.status, 502);
    assert_eq!(directories(cache_dir.path()), vec!["deep", "deep/dir"]);
    assert_eq!(listing(cache_dir.path()), vec!["deep/dir/vmlinuz"]);
    cache.stop().await;
}
