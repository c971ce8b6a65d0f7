//! What a machine needs to run `kubeadm join`: one bootstrap token per provisioning (a Secret
//! `bootstrap-token-<id>` in kube-system), the API server endpoint and the pin of the cluster's
//! CA (`--discovery-token-ca-cert-hash`).
//!
//! Token lifecycle: the first request for a provisioning creates the Secret (labelled with the
//! Machine and the provisioning), later requests for the same provisioning reuse it (in memory,
//! or found by label after a restart); it is deleted when the Machine becomes Ready, when the
//! Machine is deleted (finalizer), and by a periodic sweep when it expired, its Machine is gone
//! or Ready, or it belongs to an earlier provisioning. The token secret is never logged.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::{Timestamp, ToSpan as _, Unit};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};

use super::crd::Machine;
use crate::cloudinit::JoinParams;
use crate::status::{Phase, StatusStore};

/// Where kubeadm looks for bootstrap tokens.
pub const NAMESPACE: &str = "kube-system";
pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
/// The Machine a token Secret was made for (the name, or `sha256-…` when longer than a label
/// value may be; the full name is in [`ANNOTATION_MACHINE`]).
pub const LABEL_MACHINE: &str = "provisioner.dev/machine";
pub const ANNOTATION_MACHINE: &str = "provisioner.dev/machine-name";
/// The provisioning ([`StatusStore::provisioning_id`]) a token Secret was made for.
pub const LABEL_PROVISIONING: &str = "provisioner.dev/provisioning";
/// Only Secrets carrying this label are ever deleted by the agent.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "provisioner";
/// The group kubeadm's node bootstrap RBAC (CSR creation and approval) is bound to.
pub const EXTRA_GROUPS: &str = "system:bootstrappers:kubeadm:default-node-token";
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(2 * 3600);
/// The ConfigMap kubeadm publishes for discovery: a kubeconfig with the server and the CA.
pub const CLUSTER_INFO_NAMESPACE: &str = "kube-public";
pub const CLUSTER_INFO: &str = "cluster-info";
/// How often expired and orphaned token Secrets are looked for.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("machine {0} has no provisioning in progress")]
    NoProvisioning(String),
    #[error(
        "no API server endpoint: set cluster.apiEndpoint or publish the cluster-info ConfigMap"
    )]
    NoEndpoint,
    #[error("no CA certificate: neither cluster-info nor the kubeconfig has one")]
    NoCaCertificate,
    #[error("CA certificate: {0}")]
    BadCertificate(String),
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
}

/// Where the user-data path gets a machine's join parameters.
pub trait JoinSource: Send + Sync {
    /// `None` when machines do not join a cluster (the YAML folder inventory).
    fn join_params<'a>(
        &'a self,
        machine: &'a str,
    ) -> BoxFuture<'a, Result<Option<JoinParams>, JoinError>>;
}

/// The folder inventory: no cluster, nothing to join.
pub struct NoJoin;

impl JoinSource for NoJoin {
    fn join_params<'a>(
        &'a self,
        _machine: &'a str,
    ) -> BoxFuture<'a, Result<Option<JoinParams>, JoinError>> {
        Box::pin(async { Ok(None) })
    }
}

const TOKEN_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A kubeadm bootstrap token (`[a-z0-9]{6}.[a-z0-9]{16}`). `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: String,
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BootstrapToken({}.<redacted>)", self.id)
    }
}

impl BootstrapToken {
    /// A new token from the OS CSPRNG (getrandom), each character uniform over `[a-z0-9]`.
    /// Rejection sampling by hand: rand's `OsRng` sampling panics when the OS has no
    /// randomness, this returns the error.
    pub fn generate() -> Result<BootstrapToken, JoinError> {
        // 252 = 7 × 36: bytes from 252 up are drawn again, so no character is favoured.
        const LIMIT: u8 = 252;
        let mut chars = String::with_capacity(22);
        let mut buf = [0u8; 32];
        while chars.len() < 22 {
            getrandom::getrandom(&mut buf).map_err(|e| JoinError::Random(e.to_string()))?;
            for &b in buf.iter().filter(|&&b| b < LIMIT) {
                if chars.len() == 22 {
                    break;
                }
                chars.push(char::from(TOKEN_ALPHABET[usize::from(b % 36)]));
            }
        }
        let (id, secret) = chars.split_at(6);
        Ok(BootstrapToken {
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn secret_name(&self) -> String {
        format!("bootstrap-token-{}", self.id)
    }

    /// `id.secret`, what `kubeadm join --token` takes.
    pub fn join_string(&self) -> String {
        format!("{}.{}", self.id, self.secret)
    }

    fn valid_part(s: &str, len: usize) -> bool {
        s.len() == len && s.bytes().all(|b| TOKEN_ALPHABET.contains(&b))
    }

    fn from_parts(id: String, secret: String) -> Option<BootstrapToken> {
        (Self::valid_part(&id, 6) && Self::valid_part(&secret, 16))
            .then_some(BootstrapToken { id, secret })
    }
}

/// `sha256:<hex>` of a DER certificate's SubjectPublicKeyInfo: kubeadm's CA pin.
pub fn ca_cert_hash(der: &[u8]) -> Result<String, JoinError> {
    use sha2::Digest;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| JoinError::BadCertificate(e.to_string()))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!(
        "sha256:{}",
        hex::encode(sha2::Sha256::digest(spki))
    ))
}

/// The DER certificates of a PEM bundle.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<Vec<u8>>, JoinError> {
    let mut certs = Vec::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let block = block.map_err(|e| JoinError::BadCertificate(e.to_string()))?;
        if block.label == "CERTIFICATE" {
            certs.push(block.contents);
        }
    }
    Ok(certs)
}

/// One pin per certificate, in order, without repeats.
pub fn ca_cert_hashes(ders: &[Vec<u8>]) -> Result<Vec<String>, JoinError> {
    let mut hashes: Vec<String> = Vec::new();
    for der in ders {
        let hash = ca_cert_hash(der)?;
        if !hashes.contains(&hash) {
            hashes.push(hash);
        }
    }
    Ok(hashes)
}

/// `host:port` of an `https://host:port/…` URL (port 443 when not given).
pub fn endpoint_of(url: &str) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    let port = uri.port_u16().unwrap_or(443);
    Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// The server and CA certificates of cluster-info's kubeconfig.
pub fn parse_cluster_info(kubeconfig: &str) -> Result<(Option<String>, Vec<Vec<u8>>), JoinError> {
    let config = kube::config::Kubeconfig::from_yaml(kubeconfig)
        .map_err(|e| JoinError::BadCertificate(format!("cluster-info kubeconfig: {e}")))?;
    let Some(cluster) = config.clusters.into_iter().find_map(|c| c.cluster) else {
        return Ok((None, Vec::new()));
    };
    let endpoint = cluster.server.as_deref().and_then(endpoint_of);
    let certs = match cluster.certificate_authority_data {
        Some(data) => {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .map_err(|e| {
                    JoinError::BadCertificate(format!(
                        "cluster-info certificate-authority-data: {e}"
                    ))
                })?;
            pem_certificates(&pem)?
        }
        None => Vec::new(),
    };
    Ok((endpoint, certs))
}

/// A label value for a Machine name (label values are at most 63 characters).
pub fn machine_label(name: &str) -> String {
    use sha2::Digest;
    if name.len() <= 63 {
        name.to_string()
    } else {
        let digest = hex::encode(sha2::Sha256::digest(name.as_bytes()));
        format!("sha256-{}", &digest[..40])
    }
}

/// The Secret kubeadm's bootstrap token authenticator and signer read.
pub fn token_secret(
    token: &BootstrapToken,
    machine: &str,
    provisioning: &str,
    expires: Timestamp,
) -> Secret {
    let labels = BTreeMap::from([
        (LABEL_MACHINE.to_string(), machine_label(machine)),
        (LABEL_PROVISIONING.to_string(), provisioning.to_string()),
        (LABEL_MANAGED_BY.to_string(), MANAGED_BY.to_string()),
    ]);
    let string_data = BTreeMap::from([
        (
            "description".to_string(),
            format!("kubeadm join token for Machine {machine}, made by provisioner"),
        ),
        ("token-id".to_string(), token.id.clone()),
        ("token-secret".to_string(), token.secret.clone()),
        ("expiration".to_string(), expires.to_string()),
        (
            "usage-bootstrap-authentication".to_string(),
            "true".to_string(),
        ),
        ("usage-bootstrap-signing".to_string(), "true".to_string()),
        ("auth-extra-groups".to_string(), EXTRA_GROUPS.to_string()),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(token.secret_name()),
            namespace: Some(NAMESPACE.to_string()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_MACHINE.to_string(),
                machine.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some(SECRET_TYPE.to_string()),
        string_data: Some(string_data),
        ..Secret::default()
    }
}

/// What the agent reads back from one of its token Secrets.
#[derive(Debug)]
struct IssuedToken {
    name: String,
    machine: Option<String>,
    provisioning: Option<String>,
    expires: Option<Timestamp>,
    token: Option<BootstrapToken>,
}

fn field(secret: &Secret, key: &str) -> Option<String> {
    if let Some(value) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(value.0.clone()).ok();
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
}

fn read_secret(secret: &Secret) -> IssuedToken {
    let meta = &secret.metadata;
    let label = |key: &str| meta.labels.as_ref().and_then(|l| l.get(key)).cloned();
    let machine = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_MACHINE))
        .cloned()
        .or_else(|| label(LABEL_MACHINE));
    let token = match (field(secret, "token-id"), field(secret, "token-secret")) {
        (Some(id), Some(s)) => BootstrapToken::from_parts(id, s),
        _ => None,
    };
    IssuedToken {
        name: meta.name.clone().unwrap_or_default(),
        machine,
        provisioning: label(LABEL_PROVISIONING),
        expires: field(secret, "expiration").and_then(|e| e.parse().ok()),
        token,
    }
}

/// Configuration of the join parameters (`cluster:` in provisioner.yaml).
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// Lifetime of each bootstrap token.
    pub token_ttl: Duration,
    /// `host:port` given to nodes; `None`: from cluster-info, else the agent's own API URL.
    pub api_endpoint: Option<String>,
}

impl Default for JoinSettings {
    fn default() -> Self {
        JoinSettings {
            token_ttl: DEFAULT_TOKEN_TTL,
            api_endpoint: None,
        }
    }
}

/// What the agent's own kubeconfig says about the cluster (used when cluster-info is not
/// readable).
#[derive(Debug, Clone, Default)]
pub struct ClusterFacts {
    /// The API server URL the agent uses.
    pub server: Option<String>,
    /// The CA certificates the agent trusts (DER), from certificate-authority(-data).
    pub ca_certificates: Vec<Vec<u8>>,
}

struct Current {
    provisioning: String,
    token: BootstrapToken,
    expires: Timestamp,
}

/// Bootstrap tokens in the cluster, one per provisioning.
pub struct BootstrapTokens {
    client: Client,
    status: Arc<StatusStore>,
    settings: JoinSettings,
    facts: ClusterFacts,
    recorder: Recorder,
    /// The controller's Machines, for the Events' object references.
    machines: OnceLock<Store<Machine>>,
    /// The token of each machine's current provisioning. An async mutex: held across the
    /// API calls so that concurrent requests never make two Secrets for one provisioning.
    current: tokio::sync::Mutex<HashMap<String, Current>>,
}

impl BootstrapTokens {
    pub fn new(
        client: Client,
        status: Arc<StatusStore>,
        settings: JoinSettings,
        facts: ClusterFacts,
    ) -> BootstrapTokens {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "provisioner".to_string(),
                instance: None,
            },
        );
        BootstrapTokens {
            client,
            status,
            settings,
            facts,
            recorder,
            machines: OnceLock::new(),
            current: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Gives the Machine store, for Events on the Machines.
    pub fn attach(&self, machines: Store<Machine>) {
        let _ = self.machines.set(machines);
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    async fn event(&self, machine: &str, reason: &str, note: String) {
        let Some(object) = self
            .machines
            .get()
            .and_then(|store| store.get(&ObjectRef::new(machine)))
        else {
            return;
        };
        let event = Event {
            type_: EventType::Normal,
            reason: reason.to_string(),
            note: Some(note),
            action: "Join".to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(machine = %machine, reason, "cannot post Event: {e}");
        }
    }

    /// How long a token must still be valid to be handed out again: kubeadm join needs a few
    /// minutes, and cloud-init may retry.
    fn min_remaining(&self) -> Duration {
        (self.settings.token_ttl / 2).min(Duration::from_secs(600))
    }

    fn fresh(&self, expires: Timestamp, now: Timestamp) -> bool {
        let margin = i64::try_from(self.min_remaining().as_secs()).unwrap_or(i64::MAX);
        now.checked_add(margin.seconds())
            .is_ok_and(|limit| expires > limit)
    }

    /// The token of `machine`'s current provisioning, creating its Secret the first time.
    pub async fn token_for(&self, machine: &str) -> Result<BootstrapToken, JoinError> {
        let provisioning = self
            .status
            .provisioning_id(machine)
            .ok_or_else(|| JoinError::NoProvisioning(machine.to_string()))?;
        let mut current = self.current.lock().await;
        let now = Timestamp::now();
        if let Some(c) = current.get(machine) {
            if c.provisioning == provisioning && self.fresh(c.expires, now) {
                return Ok(c.token.clone());
            }
        }
        // Not known in memory (a restart) or stale: look at what the cluster holds.
        let api = self.secrets();
        let listed = api
            .list(&ListParams::default().labels(&format!(
                "{LABEL_MACHINE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
                machine_label(machine)
            )))
            .await?;
        let mut reuse = None;
        for secret in &listed.items {
            let issued = read_secret(secret);
            let usable = reuse.is_none()
                && issued.machine.as_deref() == Some(machine)
                && issued.provisioning.as_deref() == Some(provisioning.as_str())
                && issued.expires.is_some_and(|e| self.fresh(e, now));
            match (usable, issued.token, issued.expires) {
                (true, Some(token), Some(expires)) => reuse = Some((token, expires)),
                _ => {
                    // Another provisioning's, expired or unreadable: it can only do harm.
                    self.delete_secret(machine, &issued.name, "superseded")
                        .await?;
                }
            }
        }
        let (token, expires) = match reuse {
            Some((token, expires)) => {
                tracing::info!(machine = %machine, token_id = token.id(), "reusing the bootstrap token of this provisioning");
                (token, expires)
            }
            None => self.create(machine, &provisioning, now).await?,
        };
        current.insert(
            machine.to_string(),
            Current {
                provisioning,
                token: token.clone(),
                expires,
            },
        );
        Ok(token)
    }

    async fn create(
        &self,
        machine: &str,
        provisioning: &str,
        now: Timestamp,
    ) -> Result<(BootstrapToken, Timestamp), JoinError> {
        let ttl = i64::try_from(self.settings.token_ttl.as_secs()).unwrap_or(i64::MAX);
        let expires = now
            .checked_add(ttl.seconds())
            .and_then(|t| t.round(Unit::Second))
            .map_err(|e| JoinError::BadCertificate(format!("token expiry: {e}")))?;
        let api = self.secrets();
        // A 6-character id can collide with another token's: draw again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = BootstrapToken::generate()?;
            let secret = token_secret(&token, machine, provisioning, expires);
            match api.create(&PostParams::default(), &secret).await {
                Ok(_) => {
                    tracing::info!(machine = %machine, token_id = token.id(), expires = %expires, "bootstrap token Secret created");
                    self.event(
                        machine,
                        "BootstrapTokenCreated",
                        format!(
                            "Secret {NAMESPACE}/{} for kubeadm join, expires {expires}",
                            token.secret_name()
                        ),
                    )
                    .await;
                    return Ok((token, expires));
                }
                Err(kube::Error::Api(e)) if e.code == 409 && attempt < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn delete_secret(&self, machine: &str, name: &str, why: &str) -> Result<(), JoinError> {
        match self.secrets().delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(machine = %machine, secret = %name, why, "bootstrap token Secret deleted");
                self.event(
                    machine,
                    "BootstrapTokenDeleted",
                    format!("Secret {NAMESPACE}/{name} deleted: {why}"),
                )
                .await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every token Secret of `machine` (it joined, or it is being deleted).
    pub async fn release(&self, machine: &str, why: &str) -> Result<usize, JoinError> {
        let mut current = self.current.lock().await;
        let listed = self
            .secrets()
            .list(&ListParams::default().labels(&format!(
                "{LABEL_MACHINE}={},{LABEL_MANAGED_BY}={MANAGED_BY}",
                machine_label(machine)
            )))
            .await?;
        let mut deleted = 0;
        for secret in &listed.items {
            let issued = read_secret(secret);
            if issued.machine.as_deref() != Some(machine) {
                continue;
            }
            self.delete_secret(machine, &issued.name, why).await?;
            deleted += 1;
        }
        current.remove(machine);
        Ok(deleted)
    }

    /// Deletes the agent's token Secrets that can no longer serve: expired, of a Machine the
    /// agent does not serve or that is Ready, or of an earlier provisioning. Returns how many.
    pub async fn sweep(&self) -> Result<usize, JoinError> {
        let mut current = self.current.lock().await;
        let listed = self
            .secrets()
            .list(
                &ListParams::default()
                    .labels(&format!("{LABEL_MACHINE},{LABEL_MANAGED_BY}={MANAGED_BY}")),
            )
            .await?;
        let now = Timestamp::now();
        let mut deleted = 0;
        for secret in &listed.items {
            let issued = read_secret(secret);
            let machine = issued.machine.clone().unwrap_or_default();
            let why = match self.status.get(&machine) {
                _ if issued.expires.is_none_or(|e| e <= now) => Some("expired"),
                None => Some("its Machine is not served"),
                Some(s) if s.phase == Phase::Ready => Some("the node has joined"),
                Some(_)
                    if issued.provisioning.is_none()
                        || issued.provisioning != self.status.provisioning_id(&machine) =>
                {
                    Some("an earlier provisioning's")
                }
                Some(_) => None,
            };
            if let Some(why) = why {
                self.delete_secret(&machine, &issued.name, why).await?;
                current.remove(&machine);
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Runs [`Self::sweep`] every [`SWEEP_INTERVAL`] until `shutdown`.
    pub async fn sweep_periodically(
        self: Arc<Self>,
        first_after: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut wait = first_after;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "removed stale bootstrap token Secrets"),
                Err(e) => tracing::warn!("cannot clean up bootstrap token Secrets: {e}"),
            }
            wait = SWEEP_INTERVAL;
        }
    }

    /// The API endpoint and CA pins: cluster-info first (what kubeadm join itself reads and
    /// checks the pin against), else the agent's kubeconfig.
    pub async fn discovery(&self) -> Result<(String, Vec<String>), JoinError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), CLUSTER_INFO_NAMESPACE);
        let (info_endpoint, info_certs) = match api.get_opt(CLUSTER_INFO).await {
            Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get("kubeconfig")) {
                Some(text) => parse_cluster_info(text)?,
                None => (None, Vec::new()),
            },
            Ok(None) => (None, Vec::new()),
            Err(e) => {
                tracing::debug!("cannot read {CLUSTER_INFO_NAMESPACE}/{CLUSTER_INFO}: {e}");
                (None, Vec::new())
            }
        };
        let endpoint = self
            .settings
            .api_endpoint
            .clone()
            .or(info_endpoint)
            .or_else(|| self.facts.server.as_deref().and_then(endpoint_of))
            .ok_or(JoinError::NoEndpoint)?;
        let certs = if info_certs.is_empty() {
            &self.facts.ca_certificates
        } else {
            &info_certs
        };
        let hashes = ca_cert_hashes(certs)?;
        if hashes.is_empty() {
            return Err(JoinError::NoCaCertificate);
        }
        Ok((endpoint, hashes))
    }
}

impl JoinSource for BootstrapTokens {
    fn join_params<'a>(
        &'a self,
        machine: &'a str,
    ) -> BoxFuture<'a, Result<Option<JoinParams>, JoinError>> {
        Box::pin(async move {
            let (api_endpoint, ca_cert_hashes) = self.discovery().await?;
            let token = self.token_for(machine).await?;
            Ok(Some(JoinParams {
                api_endpoint,
                token: token.join_string(),
                ca_cert_hashes,
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSA_CA: &str = include_str!("../../tests/fixtures/ca/rsa-ca.crt");
    const ECDSA_CA: &str = include_str!("../../tests/fixtures/ca/ecdsa-ca.crt");
    /// From `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`
    /// (tests/fixtures/ca/README.md).
    const RSA_PIN: &str = "sha256:c8db4b1e216949657508fa485788e5a38a23c4babce0a9d5b313742b8309b03c";
    const ECDSA_PIN: &str =
        "sha256:c6d2e6f2faef0ca89e5cfa6bb0aca83097718902f68caa8766e7951a52fdfdfc";

    fn pin_of(pem: &str) -> String {
        let certs = pem_certificates(pem.as_bytes()).expect("PEM");
        assert_eq!(certs.len(), 1);
        ca_cert_hash(&certs[0]).expect("certificate")
    }

    #[test]
    fn ca_pins_of_rsa_and_ecdsa_certificates() {
        assert_eq!(pin_of(RSA_CA), RSA_PIN);
        assert_eq!(pin_of(ECDSA_CA), ECDSA_PIN);
        let bundle = format!("{RSA_CA}{ECDSA_CA}{RSA_CA}");
        let certs = pem_certificates(bundle.as_bytes()).expect("bundle");
        assert_eq!(
            ca_cert_hashes(&certs).expect("pins"),
            [RSA_PIN, ECDSA_PIN],
            "one pin per distinct certificate, in order"
        );
        assert!(ca_cert_hash(b"not DER").is_err());
    }

    /// The same pipeline kubeadm's documentation gives, when openssl is installed.
    #[test]
    fn ca_pins_match_openssl() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        for pem in [RSA_CA, ECDSA_CA] {
            let run = |args: &[&str], input: &[u8]| -> Option<Vec<u8>> {
                let mut child = Command::new("openssl")
                    .args(args)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .ok()?;
                child.stdin.take()?.write_all(input).ok()?;
                let out = child.wait_with_output().ok()?;
                out.status.success().then_some(out.stdout)
            };
            let Some(public_key) = run(&["x509", "-pubkey", "-noout"], pem.as_bytes()) else {
                eprintln!("openssl not installed: cross-check skipped");
                return;
            };
            let der =
                run(&["pkey", "-pubin", "-outform", "der"], &public_key).expect("openssl pkey");
            use sha2::Digest;
            let expected = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&der)));
            assert_eq!(pin_of(pem), expected);
        }
    }

    #[test]
    fn tokens_have_kubeadms_format_and_differ() {
        let a = BootstrapToken::generate().expect("token");
        let b = BootstrapToken::generate().expect("token");
        let joined = a.join_string();
        let (id, secret) = joined.split_once('.').expect("id.secret");
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert!(joined
            .bytes()
            .all(|c| c == b'.' || c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, b);
        assert_eq!(a.secret_name(), format!("bootstrap-token-{id}"));
        assert!(!format!("{a:?}").contains(secret), "Debug hides the secret");
        let params = JoinParams {
            api_endpoint: "10.0.0.1:6443".into(),
            token: joined.clone(),
            ca_cert_hashes: vec![],
        };
        assert!(!format!("{params:?}").contains(secret));
        // Every character of the alphabet shows up over many draws (no modulo gaps).
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.extend(
                BootstrapToken::generate()
                    .expect("token")
                    .join_string()
                    .bytes(),
            );
        }
        assert_eq!(seen.len(), TOKEN_ALPHABET.len() + 1);
    }

    #[test]
    fn cluster_info_gives_endpoint_and_ca() {
        let data = base64::engine::general_purpose::STANDARD.encode(ECDSA_CA);
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: https://10.77.0.1:6443\n    certificate-authority-data: {data}\ncontexts: []\nusers: []\n"
        );
        let (endpoint, certs) = parse_cluster_info(&kubeconfig).expect("parsed");
        assert_eq!(endpoint.as_deref(), Some("10.77.0.1:6443"));
        assert_eq!(ca_cert_hashes(&certs).expect("pins"), [ECDSA_PIN]);
        assert_eq!(
            endpoint_of("https://cp.example:443").as_deref(),
            Some("cp.example:443")
        );
        assert_eq!(
            endpoint_of("https://cp.example").as_deref(),
            Some("cp.example:443")
        );
        assert_eq!(
            endpoint_of("https://[fd00::1]:6443").as_deref(),
            Some("[fd00::1]:6443")
        );
    }

    #[test]
    fn secret_reads_back() {
        let token = BootstrapToken::generate().expect("token");
        let expires: Timestamp = "2030-01-01T00:00:00Z".parse().expect("time");
        let secret = token_secret(&token, "node2", "0123456789abcdef", expires);
        let issued = read_secret(&secret);
        assert_eq!(issued.token.as_ref(), Some(&token));
        assert_eq!(issued.expires, Some(expires));
        assert_eq!(issued.machine.as_deref(), Some("node2"));
        assert_eq!(issued.provisioning.as_deref(), Some("0123456789abcdef"));
        let long = "m".repeat(80);
        assert!(machine_label(&long).len() <= 63);
        assert_eq!(machine_label("node2"), "node2");
    }
}
