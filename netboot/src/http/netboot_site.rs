//! netboot's routes: per-machine iPXE scripts, iPXE binaries, boot assets, stage2's progress
//! reports and the cloud-init NoCloud files of an imaging (the route table is in the
//! [module documentation](super)).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tracing::info;

use super::body::Body;
use super::files::{self, decode_path, get_or_head, not_allowed, plain};
use super::server::{loggable_path, Outcome, Site, LOG_TARGET};
use crate::ipxe::{boot_script, imaging_script, local_boot_script, ScriptSettings};
use crate::machine::{BootEvent, MacAddr, Machine, MachineLookup};
use crate::path::SYSTEM_IPXE_LOADERS;
use crate::provisioning::{
    canonical_peer, valid_token, BootAction, CloudInitFile, NoProvisioning, ProgressReport,
    Provisioning, Refusal, MAX_REPORT_BODY,
};

/// What the HTTP server serves.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Served under `/boot/`: the iPXE binaries (TFTP root too).
    pub boot_dir: PathBuf,
    /// Served under `/assets/`: kernel, initrd.
    pub assets_dir: PathBuf,
    /// What each machine's script boots.
    pub script: ScriptSettings,
    /// How machines reach this server, e.g. `http://10.77.0.1:8080` (no trailing path).
    pub base_url: String,
}

/// netboot's routes for the machines of `machines`, with imaging as `provisioning` decides.
pub struct NetbootSite {
    settings: Arc<HttpSettings>,
    machines: Arc<dyn MachineLookup>,
    provisioning: Arc<dyn Provisioning>,
}

impl NetbootSite {
    /// The routes without imaging ([`NoProvisioning`]): scripts boot the configured kernel.
    pub fn new(settings: Arc<HttpSettings>, machines: Arc<dyn MachineLookup>) -> Self {
        NetbootSite {
            settings,
            machines,
            provisioning: Arc::new(NoProvisioning),
        }
    }

    /// Scripts, reports and cloud-init files as `provisioning` decides.
    pub fn with_provisioning(mut self, provisioning: Arc<dyn Provisioning>) -> Self {
        self.provisioning = provisioning;
        self
    }
}

impl Site for NetbootSite {
    async fn handle(
        &self,
        peer: SocketAddr,
        req: Request<Incoming>,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        self.route(req, canonical_peer(peer.ip()), outcome).await
    }

    /// `/boot/` and `/assets/` are files.
    async fn static_file(
        &self,
        _peer: SocketAddr,
        req: &Request<()>,
        outcome: &mut Outcome,
    ) -> Option<Response<Body>> {
        let path = req.uri().path();
        let (kind, rest) = if let Some(rest) = path.strip_prefix("/boot/") {
            (Route::Boot, rest)
        } else if let Some(rest) = path.strip_prefix("/assets/") {
            (Route::Assets, rest)
        } else {
            return None;
        };
        Some(self.file(kind, rest, req, outcome).await)
    }

    fn announce(&self) {
        info!(target: LOG_TARGET, base_url = %self.settings.base_url, "HTTP server starting");
    }

    fn largest_file_dir(&self) -> Option<&Path> {
        Some(&self.settings.assets_dir)
    }

    /// Tokens are never logged: `/nocloud/{token}/user-data` is `/nocloud/<token>/user-data`.
    fn logged_path(&self, path: &str) -> String {
        loggable_path(path)
    }
}

/// `Retry-After` (seconds) of a 503 for a document that cannot be made now.
const UNAVAILABLE_RETRY_AFTER: &str = "5";

/// How long a client may take to send a report body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl NetbootSite {
    async fn route(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let path = req.uri().path().to_string();
        if let Some(rest) = path.strip_prefix("/report/") {
            return self.report(rest, req, peer, outcome).await;
        }
        if let Some(rest) = path.strip_prefix("/nocloud/") {
            return self.cloud_init(rest, &req, peer, outcome).await;
        }
        let (kind, rest) = if let Some(rest) = path.strip_prefix("/ipxe/") {
            (Route::Script, rest)
        } else if let Some(rest) = path.strip_prefix("/boot/") {
            (Route::Boot, rest)
        } else if let Some(rest) = path.strip_prefix("/assets/") {
            (Route::Assets, rest)
        } else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };

        if kind != Route::Script {
            return self.file(kind, rest, &req, outcome).await;
        }
        let Some(head) = get_or_head(req.method()) else {
            return not_allowed("GET, HEAD");
        };
        match decode_path(rest) {
            Ok(rel) => self.script(&rel, peer, head, outcome),
            Err(why) => {
                outcome.note = Some(why.to_string());
                plain(StatusCode::BAD_REQUEST, why)
            }
        }
    }

    /// `/boot/{rest}` or `/assets/{rest}`: a file of its folder.
    async fn file<B>(
        &self,
        kind: Route,
        rest: &str,
        req: &Request<B>,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let Some(head) = get_or_head(req.method()) else {
            return not_allowed("GET, HEAD");
        };
        let rel = match decode_path(rest) {
            Ok(rel) => rel,
            Err(why) => {
                outcome.note = Some(why.to_string());
                return plain(StatusCode::BAD_REQUEST, why);
            }
        };
        if rel.is_empty() || rel.ends_with('/') {
            // A directory: never listed.
            return plain(StatusCode::NOT_FOUND, "not found");
        }
        match kind {
            // The iPXE folder may be the distribution's own, whose loaders can be symlinks.
            Route::Boot => {
                files::serve_file_allowing(
                    &self.settings.boot_dir,
                    SYSTEM_IPXE_LOADERS,
                    &rel,
                    head,
                    req.headers(),
                    outcome,
                )
                .await
            }
            Route::Assets | Route::Script => {
                files::serve_file(
                    &self.settings.assets_dir,
                    &rel,
                    head,
                    req.headers(),
                    outcome,
                )
                .await
            }
        }
    }

    /// The machine named by the MAC in a (decoded) path, or the error response.
    fn machine(&self, rel: &str, outcome: &mut Outcome) -> Result<Machine, Box<Response<Body>>> {
        let mac: MacAddr = match rel.parse() {
            Ok(mac) => mac,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return Err(Box::new(plain(
                    StatusCode::BAD_REQUEST,
                    "invalid MAC address",
                )));
            }
        };
        outcome.mac = Some(mac.to_string());
        let Some(machine) = self.machines.by_mac(&mac) else {
            outcome.note = Some("unknown machine".into());
            return Err(Box::new(plain(StatusCode::NOT_FOUND, "unknown machine")));
        };
        outcome.machine = Some(machine.name.clone());
        Ok(machine)
    }

    fn script(&self, rel: &str, peer: IpAddr, head: bool, outcome: &mut Outcome) -> Response<Body> {
        let machine = match self.machine(rel, outcome) {
            Ok(m) => m,
            Err(r) => return *r,
        };
        let settings = &self.settings;
        let action = match self.provisioning.boot_action(&machine, peer, head) {
            Ok(action) => action,
            Err(refusal) => return refused(refusal, outcome),
        };
        let rendered = match &action {
            BootAction::Configured => boot_script(&machine, &settings.base_url, &settings.script),
            BootAction::Image(orders) => {
                imaging_script(&machine, &settings.base_url, &settings.script, orders)
            }
            BootAction::LocalDisk(method) => local_boot_script(&machine, *method),
        };
        let text = match rendered {
            Ok(text) => text,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot render boot script",
                );
            }
        };
        if !head {
            self.machines.observe(&machine, BootEvent::IpxeScriptServed);
        }
        outcome.note = Some(
            match action {
                BootAction::Configured => "boot script",
                BootAction::Image(_) => "imaging script",
                BootAction::LocalDisk(_) => "local boot script",
            }
            .to_string(),
        );
        let len = text.len();
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONTENT_LENGTH, len)
            .header(header::CACHE_CONTROL, "no-store")
            .body(if head { Body::Empty } else { Body::text(text) })
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
    }

    async fn report(
        &self,
        rel: &str,
        req: Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        if req.method() != Method::POST {
            return not_allowed("POST");
        }
        let rel = match decode_path(rel) {
            Ok(rel) => rel,
            Err(why) => {
                outcome.note = Some(why.to_string());
                return plain(StatusCode::BAD_REQUEST, why);
            }
        };
        let machine = match self.machine(&rel, outcome) {
            Ok(m) => m,
            Err(r) => return *r,
        };
        let Some(token) = bearer_token(req.headers()) else {
            outcome.note = Some("no bearer token".into());
            outcome.refused = true;
            let mut r = plain(StatusCode::UNAUTHORIZED, "bearer token required");
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        };
        let declared: Option<u64> = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        if declared.is_some_and(|len| len > MAX_REPORT_BODY as u64) {
            outcome.note = Some("report body too large".into());
            return plain(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
        }
        let limited = http_body_util::Limited::new(req.into_body(), MAX_REPORT_BODY);
        let body = match tokio::time::timeout(BODY_READ_TIMEOUT, limited.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                outcome.note = Some("report body too large".into());
                return plain(StatusCode::PAYLOAD_TOO_LARGE, "report too large");
            }
            Ok(Err(e)) => {
                outcome.note = Some(format!("cannot read the report body: {e}"));
                return plain(StatusCode::BAD_REQUEST, "cannot read the report body");
            }
            Err(_) => {
                outcome.note = Some("report body not sent in time".into());
                return plain(StatusCode::REQUEST_TIMEOUT, "report body not sent in time");
            }
        };
        let report = match ProgressReport::parse(&body) {
            Ok(report) => report,
            Err(e) => {
                outcome.note = Some(e.to_string());
                return plain(StatusCode::BAD_REQUEST, "malformed report");
            }
        };
        match self.provisioning.report(&machine, peer, &token, report) {
            Ok(()) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::Empty)
                .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error")),
            Err(refusal) => refused(refusal, outcome),
        }
    }

    async fn cloud_init(
        &self,
        rest: &str,
        req: &Request<Incoming>,
        peer: IpAddr,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        if req.method() != Method::GET {
            // Not even HEAD: a HEAD of user-data must not count as its one fetch, nor answer
            // differently from the GET that follows.
            return not_allowed("GET");
        }
        let Some((token, name)) = rest.split_once('/') else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        let Some(file) = CloudInitFile::from_name(name) else {
            return plain(StatusCode::NOT_FOUND, "not found");
        };
        if !valid_token(token) {
            outcome.note = Some("malformed token".into());
            outcome.refused = true;
            return plain(StatusCode::FORBIDDEN, "forbidden");
        }
        match self.provisioning.cloud_init(peer, token, file).await {
            Ok(doc) => {
                outcome.machine = Some(doc.machine);
                outcome.note = Some(format!("cloud-init {}", file.name()));
                let len = doc.text.len();
                Response::builder()
                    .status(StatusCode::OK)
                    .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                    .header(header::CONTENT_LENGTH, len)
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(Body::text(doc.text))
                    .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
            }
            Err(refusal) => refused(refusal, outcome),
        }
    }
}

/// The response to a refused report or cloud-init request; credential failures are logged as
/// warnings (without the token).
fn refused(refusal: Refusal, outcome: &mut Outcome) -> Response<Body> {
    outcome.note = Some(refusal.to_string());
    let status = match &refusal {
        Refusal::NotEnabled | Refusal::UnknownMachine => StatusCode::NOT_FOUND,
        Refusal::NoDocument { machine } => {
            outcome.machine = Some(machine.clone());
            StatusCode::NOT_FOUND
        }
        Refusal::WrongToken { machine } => {
            if let Some(m) = machine {
                outcome.machine = Some(m.clone());
            }
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
        Refusal::Replayed { machine } => {
            outcome.machine = Some(machine.clone());
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
        Refusal::WrongPhase { machine, .. } => {
            outcome.machine = Some(machine.clone());
            StatusCode::CONFLICT
        }
        Refusal::Unavailable { machine, .. } => {
            outcome.machine = Some(machine.clone());
            StatusCode::SERVICE_UNAVAILABLE
        }
        Refusal::WrongPeer { machine, .. } | Refusal::NoRecentLease { machine, .. } => {
            outcome.machine = Some(machine.clone());
            outcome.refused = true;
            StatusCode::FORBIDDEN
        }
    };
    let text = refusal
        .public_reason()
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("refused"));
    let mut response = plain(status, text);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        // cloud-init retries a failed fetch of its seed; a short hint for other clients.
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_static(UNAVAILABLE_RETRY_AFTER),
        );
    }
    response
}

/// The token of `Authorization: Bearer {token}` (scheme case-insensitive, RFC 9110 §11.1).
fn bearer_token(headers: &hyper::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Script,
    Boot,
    Assets,
}
