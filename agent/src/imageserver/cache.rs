//! The imageserver's pull-through cache: a file that a client asks for and the directory does
//! not have is fetched from the upstream imageserver (the operator's bootstrap imageserver) into
//! a hidden temporary file beside its final place, checked, and renamed into place; from then
//! on it is served from disk like any other, also after the upstream has gone away.
//!
//! Checks, strongest available first: the sha256 and size that the upstream's `manifest.json`
//! (written by `image-builder/build.sh`) lists for the file; else the upstream's
//! `Content-Length`, and its `ETag` asked again after the download (the file did not change
//! under us). A failed or short fetch removes the temporary file, so the directory never holds
//! half a file; the client gets 502. Concurrent requests for one file share one download, which
//! carries on when the client that started it goes away. Cached files are never revalidated:
//! artifacts are immutable by name (delete a file to fetch it again).
//!
//! Nothing is created for a name the upstream does not have: the name is checked (no hidden
//! or `..` segment, every existing directory on its way a real directory inside the cache
//! after symlinks) before the upstream is asked, and missing directories are only made once
//! the upstream answered 200 (and removed again, if empty, when the download fails). An
//! upstream 404 is remembered for [`NEGATIVE_TTL`], so a name asked for over and over costs
//! one upstream request per [`NEGATIVE_TTL`]; concurrent requests for one name share one
//! upstream request, and at most [`MAX_FETCHES`] fetches run at once (each holds a blocking
//! thread), the others wait their turn.
//!
//! The download is fetch-then-serve (the client waits for the whole file): streaming a file
//! that is still being written and checked would need a body that follows the temporary file
//! and holds its last bytes back until the check passed. stage2 retries a request that gets no
//! answer within its read timeout, and the retry joins the download in flight.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::site::{FillError, FillFuture, MissingFiles};

/// The artifacts' manifest, also what the checks read from the upstream.
pub const MANIFEST: &str = "manifest.json";
/// Temporary files start with this (hidden names are never served nor fetched).
const TMP_PREFIX: &str = ".fetch-";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte from the upstream for this long fails the fetch.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const COPY_CHUNK: usize = 256 * 1024;
/// How long an upstream 404 is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(10);
/// Names remembered as missing upstream at most (the oldest are forgotten first).
const NEGATIVE_CAPACITY: usize = 4096;
/// Upstream fetches at once.
pub const MAX_FETCHES: usize = 4;

/// What a path segment must escape in a URL (RFC 3986 `pchar` keeps the rest).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

type SharedFill = Shared<BoxFuture<'static, Result<(), FillError>>>;

/// Fills missing files of `dir` from `upstream`.
pub struct PullThrough {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Base URL, ending with `/`.
    upstream: String,
    agent: ureq::Agent,
    in_flight: Mutex<HashMap<String, SharedFill>>,
    /// Names the upstream answered 404 for, recently.
    misses: Mutex<Misses>,
    /// Fetches running at once.
    fetches: Arc<tokio::sync::Semaphore>,
}

/// Recent upstream misses: a name and when it was missed, oldest first.
#[derive(Default)]
struct Misses {
    at: HashMap<String, Instant>,
    order: VecDeque<(String, Instant)>,
}

impl Misses {
    fn is_fresh(&self, rel: &str) -> bool {
        self.at
            .get(rel)
            .is_some_and(|at| at.elapsed() < NEGATIVE_TTL)
    }

    fn insert(&mut self, rel: &str) {
        let now = Instant::now();
        // Expired entries leave from the front; a full table forgets its oldest name.
        while let Some((name, at)) = self.order.front() {
            if at.elapsed() < NEGATIVE_TTL && self.order.len() < NEGATIVE_CAPACITY {
                break;
            }
            if self.at.get(name) == Some(at) {
                self.at.remove(name);
            }
            self.order.pop_front();
        }
        self.at.insert(rel.to_string(), now);
        self.order.push_back((rel.to_string(), now));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// What the upstream promised about a file, checked after the download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

impl PullThrough {
    /// `upstream` is the base URL of another imageserver (`http://host:port/`, a path prefix
    /// allowed); only `http://` (the client is built without TLS).
    pub fn new(dir: PathBuf, upstream: &str) -> anyhow::Result<Self> {
        if !upstream.starts_with("http://") {
            anyhow::bail!("--upstream must be an http:// URL, got {upstream:?}");
        }
        let mut upstream = upstream.to_string();
        if !upstream.ends_with('/') {
            upstream.push('/');
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .build();
        Ok(PullThrough {
            inner: Arc::new(Inner {
                dir,
                upstream,
                agent,
                in_flight: Mutex::new(HashMap::new()),
                misses: Mutex::new(Misses::default()),
                fetches: Arc::new(tokio::sync::Semaphore::new(MAX_FETCHES)),
            }),
        })
    }
}

impl MissingFiles for PullThrough {
    fn fill<'a>(&'a self, rel: &'a str) -> FillFuture<'a> {
        if lock(&self.inner.misses).is_fresh(rel) {
            return Box::pin(async { Err(FillError::NotFound) });
        }
        let shared = {
            let mut in_flight = lock(&self.inner.in_flight);
            if let Some(download) = in_flight.get(rel) {
                download.clone()
            } else {
                // Checked under the lock: a download that finished between the caller's look
                // and now has renamed its file into place before leaving the table.
                if self.inner.dir.join(rel).is_file() {
                    return Box::pin(async { Ok(()) });
                }
                let inner = self.inner.clone();
                let rel_owned = rel.to_string();
                // Spawned, so the download goes on when the client that asked goes away.
                let task = tokio::spawn(async move {
                    let fetch_inner = inner.clone();
                    let fetch_rel = rel_owned.clone();
                    let result = match inner.fetches.clone().acquire_owned().await {
                        Ok(turn) => tokio::task::spawn_blocking(move || {
                            let _turn = turn;
                            fetch_inner.fetch(&fetch_rel)
                        })
                        .await
                        .unwrap_or_else(|e| {
                            Err(FillError::Failed(format!("fetch task failed: {e}")))
                        }),
                        Err(_) => Err(FillError::Failed("fetches closed".into())),
                    };
                    lock(&inner.in_flight).remove(&rel_owned);
                    result
                });
                let download: SharedFill = task
                    .map(|joined| {
                        joined.unwrap_or_else(|e| {
                            Err(FillError::Failed(format!("fetch task failed: {e}")))
                        })
                    })
                    .boxed()
                    .shared();
                in_flight.insert(rel.to_string(), download.clone());
                download
            }
        };
        Box::pin(shared)
    }
}

impl Inner {
    fn url(&self, rel: &str) -> String {
        let path: Vec<String> = rel
            .split('/')
            .map(|segment| utf8_percent_encode(segment, SEGMENT).to_string())
            .collect();
        format!("{}{}", self.upstream, path.join("/"))
    }

    /// The blocking download of one file; logs its outcome.
    fn fetch(&self, rel: &str) -> Result<(), FillError> {
        let started = Instant::now();
        let url = self.url(rel);
        let result = self.fetch_into_place(rel, &url);
        match &result {
            Ok(fetched) => {
                let secs = started.elapsed().as_secs_f64();
                info!(
                    path = rel,
                    %url,
                    bytes = fetched.bytes,
                    sha256 = %fetched.sha256,
                    checked = fetched.checked,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    rate_mb_s = format!("{:.1}", fetched.bytes as f64 / secs.max(1e-3) / 1e6),
                    "fetched from upstream into the cache"
                );
            }
            Err(FillError::NotFound) => info!(path = rel, %url, "not found upstream"),
            Err(e) => warn!(path = rel, %url, error = %e, "upstream fetch failed; nothing kept"),
        }
        result.map(|_| ())
    }

    fn fetch_into_place(&self, rel: &str, url: &str) -> Result<Fetched, FillError> {
        // Nothing on disk changes before the upstream has the file.
        let plan = confined_target(&self.dir, rel)?;
        let response = match self.agent.get(url).call() {
            Ok(response) => response,
            Err(ureq::Error::Status(404 | 410, _)) => {
                lock(&self.misses).insert(rel);
                return Err(FillError::NotFound);
            }
            Err(ureq::Error::Status(code, _)) => {
                return Err(FillError::Failed(format!("upstream answered {code}")))
            }
            Err(e) => return Err(FillError::Failed(format!("upstream unreachable: {e}"))),
        };
        let expected = if rel == MANIFEST {
            None
        } else {
            self.expected_from_manifest(rel)?
        };
        let (parent, created) = plan.create_parents()?;
        let result = self.download(response, &parent, &plan.target(&parent), url, expected);
        if result.is_err() {
            // Leave no empty directory behind for a download that failed.
            for dir in created.iter().rev() {
                if std::fs::remove_dir(dir).is_err() {
                    break;
                }
            }
        }
        result
    }

    fn download(
        &self,
        response: ureq::Response,
        parent: &Path,
        target: &Path,
        url: &str,
        expected: Option<Expected>,
    ) -> Result<Fetched, FillError> {
        let length: Option<u64> = response
            .header("content-length")
            .and_then(|v| v.trim().parse().ok());
        let etag = response.header("etag").map(str::to_string);

        // Beside the target, so the rename is atomic; removed on drop unless persisted.
        let mut tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempfile_in(parent)
            .map_err(|e| FillError::Failed(format!("creating a temporary file: {e}")))?;
        let mut body = response.into_reader();
        let mut hasher = Sha256::new();
        let mut bytes: u64 = 0;
        let mut buf = vec![0u8; COPY_CHUNK];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(FillError::Failed(format!(
                        "upstream body failed after {bytes} bytes: {e}"
                    )))
                }
            };
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n])
                .map_err(|e| FillError::Failed(format!("writing the cached copy: {e}")))?;
            bytes += n as u64;
        }
        let sha256 = hex::encode(hasher.finalize());

        if let Some(length) = length {
            if bytes != length {
                return Err(FillError::Failed(format!(
                    "upstream sent {bytes} of {length} bytes"
                )));
            }
        }
        let checked = match &expected {
            Some(expected) => {
                if let Some(size) = expected.size {
                    if size != bytes {
                        return Err(FillError::Failed(format!(
                            "size mismatch: {MANIFEST} says {size}, got {bytes}"
                        )));
                    }
                }
                match &expected.sha256 {
                    Some(want) if !want.eq_ignore_ascii_case(&sha256) => {
                        return Err(FillError::Failed(format!(
                            "sha256 mismatch: {MANIFEST} says {want}, got {sha256}"
                        )));
                    }
                    Some(_) => "manifest sha256",
                    None => "manifest size",
                }
            }
            None => {
                // No digest to compare with: at least the file must not have changed upstream
                // while we read it.
                if let Some(before) = &etag {
                    let after = match self.agent.head(url).call() {
                        Ok(r) => r.header("etag").map(str::to_string),
                        Err(e) => {
                            return Err(FillError::Failed(format!(
                                "upstream unreachable for the ETag check: {e}"
                            )))
                        }
                    };
                    if after.as_deref() != Some(before.as_str()) {
                        return Err(FillError::Failed(format!(
                            "upstream ETag changed during the download ({before} → {})",
                            after.as_deref().unwrap_or("none")
                        )));
                    }
                    "content-length and etag"
                } else if length.is_some() {
                    "content-length"
                } else {
                    "none"
                }
            }
        };

        tmp.as_file()
            .sync_all()
            .map_err(|e| FillError::Failed(format!("fsync of the cached copy: {e}")))?;
        set_readable(tmp.as_file());
        match tmp.persist_noclobber(target) {
            Ok(_) => {}
            // Someone put it there meanwhile (the operator, by hand): keep theirs.
            Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(FillError::Failed(format!(
                    "renaming into {}: {}",
                    target.display(),
                    e.error
                )))
            }
        }
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
        Ok(Fetched {
            bytes,
            sha256,
            checked,
        })
    }

    /// What the upstream's manifest says about `rel`; `None` when it has no manifest or the
    /// manifest does not list the file. An unreadable manifest is an error: the upstream
    /// promised a digest and we could not read it.
    fn expected_from_manifest(&self, rel: &str) -> Result<Option<Expected>, FillError> {
        let url = self.url(MANIFEST);
        let text = match self.agent.get(&url).call() {
            Ok(response) => response
                .into_string()
                .map_err(|e| FillError::Failed(format!("reading the upstream {MANIFEST}: {e}")))?,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(ureq::Error::Status(code, _)) => {
                return Err(FillError::Failed(format!(
                    "upstream answered {code} for {MANIFEST}"
                )))
            }
            Err(e) => return Err(FillError::Failed(format!("upstream unreachable: {e}"))),
        };
        let manifest: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| FillError::Failed(format!("upstream {MANIFEST} is not JSON: {e}")))?;
        Ok(manifest_entry(&manifest, rel))
    }
}

struct Fetched {
    bytes: u64,
    sha256: String,
    checked: &'static str,
}

/// The entry for `rel` in a manifest: any object (at any depth) with `"file": rel` and a
/// `sha256` and/or `size` (build.sh writes `{"image": {"file", "size", "sha256", …},
/// "kernel": {…}, "initrd": {…}}`).
pub fn manifest_entry(manifest: &serde_json::Value, rel: &str) -> Option<Expected> {
    match manifest {
        serde_json::Value::Object(map) => {
            if map.get("file").and_then(|f| f.as_str()) == Some(rel) {
                let sha256 = map
                    .get("sha256")
                    .and_then(|v| v.as_str())
                    .map(str::to_string);
                let size = map.get("size").and_then(serde_json::Value::as_u64);
                if sha256.is_some() || size.is_some() {
                    return Some(Expected { sha256, size });
                }
            }
            map.values().find_map(|v| manifest_entry(v, rel))
        }
        serde_json::Value::Array(items) => items.iter().find_map(|v| manifest_entry(v, rel)),
        _ => None,
    }
}

/// Where a fetched file goes: checked before anything is created.
#[derive(Debug)]
struct Plan {
    /// The cache's real path.
    root: PathBuf,
    /// The deepest directory on the way that exists (real path, inside `root`).
    existing: PathBuf,
    /// The directories below `existing` still to be made.
    missing: Vec<OsString>,
    name: OsString,
}

/// Checks that `rel` can be a file of the cache `dir` without creating anything: plain,
/// non-hidden segments, and every directory on its way that exists is a directory inside
/// `dir` after symlinks (the rule netboot's `open_confined` applies for reading). A symlink
/// leading out, or a dangling one, is refused before the upstream is asked.
fn confined_target(dir: &Path, rel: &str) -> Result<Plan, FillError> {
    let refused = || FillError::Refused(format!("{rel:?} cannot be cached"));
    let rel_path = Path::new(rel);
    let plain = rel_path.components().all(|c| match c {
        Component::Normal(name) => !name.to_string_lossy().starts_with('.'),
        _ => false,
    });
    if rel.is_empty() || !plain {
        return Err(refused());
    }
    let root = dir
        .canonicalize()
        .map_err(|e| FillError::Failed(format!("{}: {e}", dir.display())))?;
    let mut segments: Vec<OsString> = rel_path
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let name = segments.pop().ok_or_else(refused)?;
    let mut existing = root.clone();
    let mut missing = Vec::new();
    for (i, segment) in segments.iter().enumerate() {
        let next = existing.join(segment);
        match next.canonicalize() {
            Ok(real) if !real.starts_with(&root) => {
                return Err(FillError::Refused(format!(
                    "{rel:?} resolves outside the served directory"
                )))
            }
            Ok(real) if !real.is_dir() => {
                return Err(FillError::Refused(format!(
                    "{rel:?}: {} is not a directory",
                    next.display()
                )))
            }
            Ok(real) => existing = real,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(&next).is_ok() {
                    // A dangling symlink: where it points is not ours to create.
                    return Err(FillError::Refused(format!(
                        "{rel:?}: {} is a dangling symlink",
                        next.display()
                    )));
                }
                missing = segments[i..].to_vec();
                break;
            }
            Err(e) => return Err(FillError::Failed(format!("{}: {e}", next.display()))),
        }
    }
    Ok(Plan {
        root,
        existing,
        missing,
        name,
    })
}

impl Plan {
    /// Makes the missing directories, one at a time, each checked to be a real directory (not
    /// a symlink put there meanwhile); returns the parent directory and what was created.
    fn create_parents(&self) -> Result<(PathBuf, Vec<PathBuf>), FillError> {
        let mut dir = self.existing.clone();
        let mut created = Vec::new();
        for segment in &self.missing {
            dir.push(segment);
            match std::fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(FillError::Failed(format!(
                        "creating {}: {e}",
                        dir.display()
                    )))
                }
            }
            let is_dir = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir());
            if !is_dir {
                return Err(FillError::Refused(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
        }
        let real = dir
            .canonicalize()
            .map_err(|e| FillError::Failed(format!("{}: {e}", dir.display())))?;
        if !real.starts_with(&self.root) {
            return Err(FillError::Refused(format!(
                "{} resolves outside the served directory",
                dir.display()
            )));
        }
        Ok((real, created))
    }

    fn target(&self, parent: &Path) -> PathBuf {
        parent.join(&self.name)
    }
}

/// Cached files are artifacts anyone on the host may read (the service's UMask is 0077).
fn set_readable(file: &std::fs::File) {
    use std::os::unix::fs::PermissionsExt;
    let _ = file.set_permissions(std::fs::Permissions::from_mode(0o644));
}
