//! What the imageserver answers: the files of its directory as netboot's [`DirSite`] serves
//! them, plus the first machine's NoCloud seed under `/nocloud/{name}/{file}` (from a
//! directory) and, with a [`MissingFiles`] hook, a file the directory does not have filled in
//! before it is served (the pull-through cache, [`super::cache`]).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use netboot::http::{
    is_missing, plain, serve_file, Body, DirSite, FileRequest, Incoming, Outcome, Site, LOG_TARGET,
};

/// The file names served under `/nocloud/{name}/`.
pub const SEED_FILES: [&str; 4] = ["meta-data", "user-data", "vendor-data", "network-config"];

/// Why a [`MissingFiles`] hook could not provide a file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FillError {
    /// The source does not have it either: 404.
    #[error("not found upstream")]
    NotFound,
    /// The path cannot be a file of the directory (e.g. a hidden name): 404.
    #[error("{0}")]
    Refused(String),
    /// Fetching or checking it failed: 502.
    #[error("{0}")]
    Failed(String),
}

/// The future a [`MissingFiles`] hook returns.
pub type FillFuture<'a> = Pin<Box<dyn Future<Output = Result<(), FillError>> + Send + 'a>>;

/// Fills a file that a request names and the served directory does not have.
pub trait MissingFiles: Send + Sync {
    /// Makes the regular file `rel` (percent-decoded, relative, without `..` or control
    /// characters) exist under the served directory, or says why it cannot. The file is then
    /// served from the directory as any other.
    fn fill<'a>(&'a self, rel: &'a str) -> FillFuture<'a>;
}

/// The imageserver's site.
#[derive(Clone)]
pub struct ImageSite {
    /// Every path but the seed's is a regular file under this directory.
    pub files: DirSite,
    /// `/nocloud/{name}/{file}` is `{seed_dir}/{name}/{file}`, for `file` one of the names
    /// cloud-init's NoCloud asks for ([`SEED_FILES`]). A missing `vendor-data` is answered
    /// empty (200) rather than 404: cloud-init 22.4 retries a 404 ten times, one second apart,
    /// before going on without it. The others are 404 when missing.
    pub seed_dir: Option<PathBuf>,
    /// Asked to put a file into the directory when a request names one that is not there.
    /// Hidden names (a segment starting with `.`, the cache's downloads in progress) are then
    /// never served nor filled: 404.
    pub missing: Option<Arc<dyn MissingFiles>>,
}

impl Site for ImageSite {
    async fn handle(
        &self,
        _peer: SocketAddr,
        req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let file = match FileRequest::from_request(&req, outcome) {
            Ok(file) => file,
            Err(response) => return *response,
        };
        if let (Some(seed_dir), Some(seed_rel)) =
            (&self.seed_dir, file.rel.strip_prefix("nocloud/"))
        {
            return seed_file(seed_dir, seed_rel, file.head, req.headers(), outcome).await;
        }
        if let Some(missing) = &self.missing {
            if file.rel.split('/').any(|segment| segment.starts_with('.')) {
                // Hidden names are the cache's files being downloaded: never served or fetched.
                outcome.note = Some("hidden name".into());
                return plain(StatusCode::NOT_FOUND, "not found");
            }
            if is_missing(self.files.dir(), &file.rel).await {
                match missing.fill(&file.rel).await {
                    Ok(()) => {}
                    Err(e @ (FillError::NotFound | FillError::Refused(_))) => {
                        outcome.note = Some(e.to_string());
                        return plain(StatusCode::NOT_FOUND, "not found");
                    }
                    Err(FillError::Failed(why)) => {
                        outcome.note = Some(why);
                        return plain(StatusCode::BAD_GATEWAY, "cannot fetch the file upstream");
                    }
                }
            }
        }
        self.files.serve(&file, req.headers(), outcome).await
    }

    /// A file the directory has, by `sendfile(2)`; the seed, hidden names and files to fill
    /// from upstream go to [`Site::handle`].
    async fn static_file(
        &self,
        _peer: SocketAddr,
        req: &Request<()>,
        outcome: &mut Outcome,
    ) -> Option<Response<Body>> {
        let file = match FileRequest::from_request(req, outcome) {
            Ok(file) => file,
            Err(response) => return Some(*response),
        };
        if self.seed_dir.is_some() && file.rel.starts_with("nocloud/") {
            return None;
        }
        if self.missing.is_some()
            && (file.rel.split('/').any(|segment| segment.starts_with('.'))
                || is_missing(self.files.dir(), &file.rel).await)
        {
            return None;
        }
        Some(self.files.serve(&file, req.headers(), outcome).await)
    }

    fn announce(&self) {
        // Under the server's target, with the server's other start-up lines.
        tracing::info!(
            target: LOG_TARGET,
            dir = %self.files.dir().display(),
            seed_dir = self.seed_dir.as_ref().map(|d| tracing::field::display(d.display())),
            fills_missing = self.missing.is_some(),
            "file server starting"
        );
    }

    fn largest_file_dir(&self) -> Option<&Path> {
        Some(self.files.dir())
    }
}

/// `/nocloud/{name}/{file}` of the bootstrap seed (`{name}` is a machine name, not a token:
/// logged as it is).
async fn seed_file(
    seed_dir: &Path,
    seed_rel: &str,
    head: bool,
    headers: &HeaderMap,
    outcome: &mut Outcome,
) -> Response<Body> {
    let Some((name, file)) = seed_rel.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "not found");
    };
    if name.is_empty() || name.starts_with('.') || !SEED_FILES.contains(&file) {
        outcome.note = Some("not a NoCloud seed file".into());
        return plain(StatusCode::NOT_FOUND, "not found");
    }
    outcome.machine = Some(name.to_string());
    outcome.note = Some(format!("NoCloud seed {file}"));
    if file == "vendor-data" && is_missing(seed_dir, seed_rel).await {
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, 0)
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::Empty)
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"));
    }
    let mut response = serve_file(seed_dir, seed_rel, head, headers, outcome).await;
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
