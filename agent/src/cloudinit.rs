//! cloud-init documents rendered from the templates in `cloud-init/` (embedded in the binary):
//!
//! | template | what |
//! |---|---|
//! | `node-user-data.yaml` | a node netboot imaged: host name, SSH keys, a `joining` report to netboot, extra hooks, and with [`JoinParams`] a kubeadm `JoinConfiguration` + `kubeadm join` |
//! | `laptop-user-data.yaml` | the first machine: host name, SSH keys, `provisioner.yaml`, `kubeadm init` (InitConfiguration + ClusterConfiguration), the image's CNI manifest, `netboot.path` |
//! | `laptop-network-config.yaml` | the first machine's static address (NoCloud network-config v2) |
//! | `meta-data.yaml` | NoCloud meta-data: instance-id, local-hostname |
//!
//! Every value a template prints is written as a JSON string (see `write_yaml_scalar`): one
//! YAML scalar whatever it holds (quotes, `#`, `: `, newlines), also inside the kubeadm files,
//! which are YAML block scalars of the cloud-config. Inputs are validated first (host names
//! RFC 1123, keys on one line, `host:port` endpoints, kubeadm token and CA hash formats), and
//! every rendered document is parsed back as YAML before it is returned. The node's kubeadm file
//! uses `kubeadm.k8s.io/v1beta3`, which kubeadm reads from 1.22 on (deprecated in favour of
//! v1beta4 since 1.31, still read by it); the laptop's uses v1beta4 for Kubernetes 1.31 and
//! later, whose kubeadm takes its control-plane timeout from there only. Tokens never appear in
//! errors or `Debug` output.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::LazyLock;

use ipnet::Ipv4Net;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

use crate::validate::{self, Invalid};

/// The kubeadm configuration API version the node template writes, and the laptop's before
/// Kubernetes 1.31.
pub const KUBEADM_API_VERSION: &str = "kubeadm.k8s.io/v1beta3";
/// The laptop's kubeadm configuration from Kubernetes 1.31 on.
pub const KUBEADM_API_VERSION_V1BETA4: &str = "kubeadm.k8s.io/v1beta4";
/// Where a node's kubeadm JoinConfiguration is written (mode 0600).
pub const JOIN_CONFIG_PATH: &str = "/etc/kubernetes/kubeadm-join.yaml";
/// Where the laptop's kubeadm InitConfiguration + ClusterConfiguration is written (mode 0600).
pub const INIT_CONFIG_PATH: &str = "/etc/kubernetes/kubeadm-init.yaml";

const NODE_USER_DATA: &str = include_str!("../../cloud-init/node-user-data.yaml");
const LAPTOP_USER_DATA: &str = include_str!("../../cloud-init/laptop-user-data.yaml");
const LAPTOP_NETWORK_CONFIG: &str = include_str!("../../cloud-init/laptop-network-config.yaml");
const META_DATA: &str = include_str!("../../cloud-init/meta-data.yaml");

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// An input that cannot go into a cloud-config. The reason never quotes a token.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("template {template}: {source}")]
    Template {
        template: &'static str,
        source: minijinja::Error,
    },
    /// The rendered text is not what it must be (a template defect, caught before serving).
    #[error("rendered {template} is not valid: {reason}")]
    Output {
        template: &'static str,
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> RenderError {
    RenderError::Invalid(validate::invalid(field, reason))
}

/// What a node needs to join the cluster with kubeadm. Filled from a bootstrap token Secret and
/// the cluster's CA.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct JoinParams {
    /// The API server, `host:port` (`10.77.0.1:6443`, `[fd00::1]:6443`, `api.example:6443`).
    pub api_endpoint: String,
    /// A kubeadm bootstrap token, `abcdef.0123456789abcdef` (`[a-z0-9]{6}\.[a-z0-9]{16}`).
    pub token: String,
    /// `sha256:` and 64 hex digits of the CA's public key (at least one).
    pub ca_cert_hashes: Vec<String>,
}

impl fmt::Debug for JoinParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinParams")
            .field("api_endpoint", &self.api_endpoint)
            .field("token", &"<redacted>")
            .field("ca_cert_hashes", &self.ca_cert_hashes)
            .finish()
    }
}

impl JoinParams {
    pub fn validate(&self) -> Result<(), RenderError> {
        validate::endpoint("join.apiEndpoint", &self.api_endpoint)?;
        if !valid_bootstrap_token(&self.token) {
            return Err(invalid(
                "join.token",
                "is not a kubeadm bootstrap token (6 and 16 characters of a-z 0-9, joined by a dot)",
            ));
        }
        if self.ca_cert_hashes.is_empty() {
            return Err(invalid("join.caCertHashes", "at least one hash is needed"));
        }
        for hash in &self.ca_cert_hashes {
            let ok = hash
                .strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
            if !ok {
                return Err(invalid(
                    "join.caCertHashes",
                    format!("{hash:?} is not sha256: and 64 hex digits"),
                ));
            }
        }
        Ok(())
    }
}

/// `[a-z0-9]{6}\.[a-z0-9]{16}`, the format kube-apiserver accepts for bootstrap tokens.
fn valid_bootstrap_token(token: &str) -> bool {
    let part = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    token
        .split_once('.')
        .is_some_and(|(id, secret)| part(id, 6) && part(secret, 16))
}

/// A file added to `write_files` by the configuration (`cloudInit.extraWriteFiles`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExtraFile {
    /// Absolute path on the machine.
    pub path: String,
    pub content: String,
    /// Octal mode as cloud-init takes it, e.g. `"0644"` (the default).
    #[serde(default = "default_permissions")]
    pub permissions: String,
}

fn default_permissions() -> String {
    "0644".to_string()
}

/// `cloudInit:` of the configuration: what every rendered cloud-config (nodes and laptop) gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Hooks {
    /// authorized_keys lines for the default user (one key per entry, options allowed).
    #[serde(default)]
    pub ssh_authorized_keys: Vec<String>,
    /// Shell commands run (by `sh -c`) before `kubeadm join` / `kubeadm init`.
    #[serde(default)]
    pub extra_run_cmd: Vec<String>,
    /// Files written before any command runs.
    #[serde(default)]
    pub extra_write_files: Vec<ExtraFile>,
}

impl Hooks {
    pub fn validate(&self) -> Result<(), RenderError> {
        for key in &self.ssh_authorized_keys {
            validate::ssh_key(key)?;
        }
        for command in &self.extra_run_cmd {
            if command.trim().is_empty() {
                return Err(invalid("cloudInit.extraRunCmd", "a command is empty"));
            }
            no_nul("cloudInit.extraRunCmd", command)?;
        }
        for file in &self.extra_write_files {
            if !file.path.starts_with('/')
                || file.path.split('/').any(|c| c == "..")
                || file.path.chars().any(char::is_control)
            {
                return Err(invalid(
                    "cloudInit.extraWriteFiles.path",
                    format!("{:?} must be an absolute path without '..'", file.path),
                ));
            }
            validate_permissions("cloudInit.extraWriteFiles.permissions", &file.permissions)?;
            no_nul("cloudInit.extraWriteFiles.content", &file.content)?;
        }
        Ok(())
    }
}

fn no_nul(field: &'static str, value: &str) -> Result<(), RenderError> {
    if value.contains('\0') {
        return Err(invalid(field, "contains a NUL byte"));
    }
    Ok(())
}

fn validate_permissions(field: &'static str, mode: &str) -> Result<(), RenderError> {
    let digits = mode.strip_prefix('0').unwrap_or(mode);
    if !(3..=4).contains(&mode.len()) || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return Err(invalid(
            field,
            format!("{mode:?} is not an octal mode such as \"0644\""),
        ));
    }
    Ok(())
}

/// `31` of `v1.31.2` (a version [`validate::kubernetes_version`] accepted).
fn kubernetes_minor(version: &str) -> Option<u32> {
    version
        .strip_prefix('v')
        .unwrap_or(version)
        .split('.')
        .nth(1)?
        .parse()
        .ok()
}

/// Everything a node's user-data holds.
#[derive(Debug, Clone)]
pub struct NodeUserData<'a> {
    /// The Machine's name (a comment in the output).
    pub machine: &'a str,
    pub hostname: &'a str,
    pub node_ip: Ipv4Addr,
    /// Where the node posts its reports: netboot's `/report/{mac}`.
    pub report_url: &'a str,
    /// The provisioning token the reports carry (`Authorization: Bearer`).
    pub report_token: &'a str,
    pub hooks: &'a Hooks,
    /// `None`: no cluster to join (YAML-folder inventory); the document says so.
    pub join: Option<&'a JoinParams>,
    /// The pod network comes from a CNI manifest: mask the image's bridge pod network.
    pub external_cni: bool,
}

#[derive(Serialize)]
struct NodeContext<'a> {
    machine: &'a str,
    hostname: &'a str,
    fqdn: Option<&'a str>,
    node_name: String,
    node_ip: String,
    report_url: &'a str,
    report_token: &'a str,
    ssh_authorized_keys: &'a [String],
    extra_run_cmd: &'a [String],
    extra_write_files: &'a [ExtraFile],
    join: Option<&'a JoinParams>,
    external_cni: bool,
}

/// `hostname` and `fqdn` for cloud-init: the first label, and the whole name when it has dots.
fn host_and_fqdn(name: &str) -> (&str, Option<&str>) {
    match name.split_once('.') {
        Some((short, _)) => (short, Some(name)),
        None => (name, None),
    }
}

fn validate_report(url: &str, token: &str) -> Result<(), RenderError> {
    let url_ok = url
        .strip_prefix("http://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && url.bytes().all(|b| b.is_ascii_graphic());
    if !url_ok {
        return Err(invalid(
            "reportUrl",
            format!("{url:?} is not an http:// URL"),
        ));
    }
    if !netboot::provisioning::valid_token(token) {
        return Err(invalid(
            "reportToken",
            "must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ -",
        ));
    }
    Ok(())
}

/// The user-data of an imaged node. Never logs the tokens it carries.
pub fn render_node_user_data(data: &NodeUserData<'_>) -> Result<String, RenderError> {
    validate::hostname("hostname", data.hostname)?;
    validate_report(data.report_url, data.report_token)?;
    data.hooks.validate()?;
    if let Some(join) = data.join {
        join.validate()?;
    }
    let (hostname, fqdn) = host_and_fqdn(data.hostname);
    let context = NodeContext {
        machine: data.machine,
        hostname,
        fqdn,
        node_name: data.hostname.to_ascii_lowercase(),
        node_ip: data.node_ip.to_string(),
        report_url: data.report_url,
        report_token: data.report_token,
        ssh_authorized_keys: &data.hooks.ssh_authorized_keys,
        extra_run_cmd: &data.hooks.extra_run_cmd,
        extra_write_files: &data.hooks.extra_write_files,
        join: data.join,
        external_cni: data.external_cni,
    };
    let text = render("node-user-data.yaml", &context)?;
    let document = check_cloud_config("node-user-data.yaml", &text)?;
    if data.join.is_some() {
        embedded_documents(
            &document,
            JOIN_CONFIG_PATH,
            "node-user-data.yaml",
            KUBEADM_API_VERSION,
            1,
        )?;
    }
    Ok(text)
}

/// The cluster the laptop creates with `kubeadm init` (`laptop:` of the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSettings {
    /// `v1.30.2`: the control-plane images the image carries.
    pub kubernetes_version: String,
    pub pod_subnet: ipnet::IpNet,
    pub service_subnet: ipnet::IpNet,
    /// `host:port` for a load-balanced or DNS API endpoint; `None`: the laptop's address.
    pub control_plane_endpoint: Option<String>,
    /// A CNI manifest inside the image, applied with kubectl after `kubeadm init`; `None`: the
    /// image's bridge pod network (`provisioner pod-network` on every node).
    pub cni_manifest: Option<PathBuf>,
    /// How long the control plane may take to come up (kubeadm's wait, and the kubelet's
    /// startup and liveness probes of the control-plane Pods); `None`: kubeadm's defaults
    /// (4 minutes, probes of 240 s and 80 s).
    pub control_plane_timeout: Option<std::time::Duration>,
}

/// Everything the laptop's user-data holds.
#[derive(Debug, Clone)]
pub struct LaptopUserData<'a> {
    pub hostname: &'a str,
    /// The laptop's address (netboot's `serverAddress`): API server and kubelet address.
    pub node_ip: Ipv4Addr,
    pub hooks: &'a Hooks,
    pub init: &'a InitSettings,
    /// The text of `provisioner.yaml`, written to `/etc/provisioner/provisioner.yaml`.
    pub provisioner_yaml: &'a str,
    /// The static address to configure (also written as the seed's network-config).
    pub network: Option<&'a LaptopNetwork>,
    /// `http://HOST:PORT/` the laptop's imageserver fetches missing files from.
    pub image_upstream: Option<&'a str>,
}

#[derive(Serialize)]
struct LaptopContext<'a> {
    hostname: &'a str,
    fqdn: Option<&'a str>,
    node_name: String,
    node_ip: String,
    ssh_authorized_keys: &'a [String],
    extra_run_cmd: &'a [String],
    extra_write_files: &'a [ExtraFile],
    provisioner_yaml: &'a str,
    kubernetes_version: &'a str,
    pod_subnet: String,
    service_subnet: String,
    control_plane_endpoint: Option<&'a str>,
    cni_manifest: Option<String>,
    /// `kubeadm.k8s.io/v1beta4` from Kubernetes 1.31 on (kubeadm 1.31 deprecated v1beta3 and
    /// no longer honours v1beta3's timeoutForControlPlane), else v1beta3.
    kubeadm_api_version: &'static str,
    kubeadm_v1beta4: bool,
    /// `1200s`: kubeadm's wait for the control plane.
    control_plane_timeout: Option<String>,
    /// The probes' failureThreshold (period 10 s) that spans control_plane_timeout.
    probe_failure_threshold: Option<u64>,
    networkd_file: Option<String>,
    imageserver_dropin: Option<String>,
}

pub fn render_laptop_user_data(data: &LaptopUserData<'_>) -> Result<String, RenderError> {
    validate::hostname("laptop.hostname", data.hostname)?;
    data.hooks.validate()?;
    let cluster = data.init;
    validate::kubernetes_version("laptop.kubernetesVersion", &cluster.kubernetes_version)?;
    if let Some(endpoint) = &cluster.control_plane_endpoint {
        validate::endpoint("laptop.controlPlaneEndpoint", endpoint)?;
    }
    let manifest = match &cluster.cni_manifest {
        None => None,
        Some(path) => {
            let text = path.to_str().unwrap_or_default();
            if !path.is_absolute() || text.is_empty() || text.chars().any(char::is_control) {
                return Err(invalid(
                    "laptop.cniManifest",
                    format!("{path:?} must be an absolute path inside the image"),
                ));
            }
            Some(text.to_string())
        }
    };
    no_nul("provisionerYaml", data.provisioner_yaml)?;
    let networkd_file = data.network.map(networkd_file).transpose()?;
    let v1beta4 = kubernetes_minor(&cluster.kubernetes_version).is_some_and(|minor| minor >= 31);
    let imageserver_dropin = match data.image_upstream {
        None => None,
        Some(url) => {
            validate::http_url("laptop.imageUpstream", url)?;
            Some(format!(
                "[Service]\nExecStart=\nExecStart=/usr/bin/provisioner imageserver --dir /var/lib/provisioner-images --upstream {url}\n"
            ))
        }
    };
    let (hostname, fqdn) = host_and_fqdn(data.hostname);
    let context = LaptopContext {
        hostname,
        fqdn,
        node_name: data.hostname.to_ascii_lowercase(),
        node_ip: data.node_ip.to_string(),
        ssh_authorized_keys: &data.hooks.ssh_authorized_keys,
        extra_run_cmd: &data.hooks.extra_run_cmd,
        extra_write_files: &data.hooks.extra_write_files,
        provisioner_yaml: data.provisioner_yaml,
        kubernetes_version: &cluster.kubernetes_version,
        pod_subnet: cluster.pod_subnet.to_string(),
        service_subnet: cluster.service_subnet.to_string(),
        control_plane_endpoint: cluster.control_plane_endpoint.as_deref(),
        cni_manifest: manifest,
        kubeadm_api_version: if v1beta4 {
            KUBEADM_API_VERSION_V1BETA4
        } else {
            KUBEADM_API_VERSION
        },
        kubeadm_v1beta4: v1beta4,
        control_plane_timeout: cluster
            .control_plane_timeout
            .map(|t| format!("{}s", t.as_secs())),
        probe_failure_threshold: cluster
            .control_plane_timeout
            .map(|t| t.as_secs().div_ceil(10)),
        networkd_file,
        imageserver_dropin,
    };
    let text = render("laptop-user-data.yaml", &context)?;
    let document = check_cloud_config("laptop-user-data.yaml", &text)?;
    embedded_documents(
        &document,
        INIT_CONFIG_PATH,
        "laptop-user-data.yaml",
        context.kubeadm_api_version,
        2,
    )?;
    Ok(text)
}

/// The laptop's static address on the provisioning network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaptopNetwork {
    /// Interface name (`interface` of the configuration); with a MAC it is renamed to it.
    pub interface: String,
    pub mac_address: Option<netboot::MacAddr>,
    /// `serverAddress` with the subnet's prefix length.
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub nameservers: Vec<Ipv4Addr>,
}

#[derive(Serialize)]
struct NetworkContext {
    interface: String,
    mac_address: Option<String>,
    address: String,
    gateway: Option<String>,
    nameservers: Vec<String>,
}

fn validate_interface(name: &str) -> Result<(), RenderError> {
    let name_ok = !name.is_empty()
        && name.len() <= 15
        && !name.contains(|c: char| c == '/' || c.is_whitespace() || c.is_control());
    if !name_ok {
        return Err(invalid(
            "interface",
            format!("{name:?} is not an interface name"),
        ));
    }
    Ok(())
}

/// The same address as the network-config, as a systemd-networkd file.
fn networkd_file(network: &LaptopNetwork) -> Result<String, RenderError> {
    use std::fmt::Write as _;
    validate_interface(&network.interface)?;
    let mut text = String::from("[Match]\n");
    match network.mac_address {
        Some(mac) => {
            let _ = writeln!(text, "MACAddress={mac}");
        }
        None => {
            let _ = writeln!(text, "Name={}", network.interface);
        }
    }
    let _ = write!(text, "\n[Network]\nDHCP=no\nAddress={}\n", network.address);
    if let Some(gateway) = network.gateway {
        let _ = writeln!(text, "Gateway={gateway}");
    }
    for dns in &network.nameservers {
        let _ = writeln!(text, "DNS={dns}");
    }
    Ok(text)
}

pub fn render_laptop_network_config(network: &LaptopNetwork) -> Result<String, RenderError> {
    validate_interface(&network.interface)?;
    let context = NetworkContext {
        interface: network.interface.clone(),
        mac_address: network.mac_address.map(|m| m.to_string()),
        address: network.address.to_string(),
        gateway: network.gateway.map(|g| g.to_string()),
        nameservers: network.nameservers.iter().map(|n| n.to_string()).collect(),
    };
    let text = render("laptop-network-config.yaml", &context)?;
    parse_mapping("laptop-network-config.yaml", &text)?;
    Ok(text)
}

/// NoCloud meta-data.
pub fn render_meta_data(instance_id: &str, hostname: &str) -> Result<String, RenderError> {
    validate::hostname("local-hostname", hostname)?;
    if instance_id.is_empty() || !instance_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "instance-id",
            "must be printable ASCII without blanks",
        ));
    }
    #[derive(Serialize)]
    struct Context<'a> {
        instance_id: &'a str,
        hostname: &'a str,
    }
    let text = render(
        "meta-data.yaml",
        &Context {
            instance_id,
            hostname,
        },
    )?;
    parse_mapping("meta-data.yaml", &text)?;
    Ok(text)
}

/// Writes a value the way the templates print it: as JSON, which YAML reads as the same
/// scalar (or flow collection), with the characters YAML 1.1 does not allow raw, or reads as
/// line breaks, escaped too. serde_json escapes only what JSON requires (below U+0020, `"`,
/// `\`), so this is minijinja's JSON escaping plus that last step.
fn write_yaml_scalar(out: &mut String, json: &str) {
    for c in json.chars() {
        match c {
            '\u{7f}'..='\u{9f}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{feff}'
            | '\u{fffe}'
            | '\u{ffff}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
}

static TEMPLATES: LazyLock<Result<Environment<'static>, minijinja::Error>> = LazyLock::new(|| {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| AutoEscape::Json);
    env.set_formatter(|out, _state, value| {
        let json = serde_json::to_string(value).map_err(|e| {
            minijinja::Error::new(
                minijinja::ErrorKind::BadSerialization,
                "value cannot be written as JSON",
            )
            .with_source(e)
        })?;
        let mut escaped = String::with_capacity(json.len());
        write_yaml_scalar(&mut escaped, &json);
        out.write_str(&escaped).map_err(minijinja::Error::from)
    });
    env.add_template("node-user-data.yaml", NODE_USER_DATA)?;
    env.add_template("laptop-user-data.yaml", LAPTOP_USER_DATA)?;
    env.add_template("laptop-network-config.yaml", LAPTOP_NETWORK_CONFIG)?;
    env.add_template("meta-data.yaml", META_DATA)?;
    Ok(env)
});

fn render(template: &'static str, context: &impl Serialize) -> Result<String, RenderError> {
    let env = TEMPLATES.as_ref().map_err(|e| RenderError::Output {
        template,
        reason: format!("the embedded templates do not load: {e}"),
    })?;
    env.get_template(template)
        .and_then(|t| t.render(context))
        .map_err(|source| RenderError::Template { template, source })
}

fn parse_mapping(template: &'static str, text: &str) -> Result<serde_yaml::Mapping, RenderError> {
    match serde_yaml::from_str::<serde_yaml::Value>(text) {
        Ok(serde_yaml::Value::Mapping(m)) => Ok(m),
        Ok(_) => Err(RenderError::Output {
            template,
            reason: "not a YAML mapping".to_string(),
        }),
        Err(e) => Err(RenderError::Output {
            template,
            reason: format!("not YAML: {e}"),
        }),
    }
}

/// A cloud-config: `#cloud-config` on the first line and a YAML mapping.
fn check_cloud_config(
    template: &'static str,
    text: &str,
) -> Result<serde_yaml::Mapping, RenderError> {
    if !text.starts_with("#cloud-config\n") {
        return Err(RenderError::Output {
            template,
            reason: "the first line is not #cloud-config".to_string(),
        });
    }
    parse_mapping(template, text)
}

/// The YAML documents of the `write_files` entry at `path`, each with the kubeadm apiVersion.
fn embedded_documents(
    document: &serde_yaml::Mapping,
    path: &str,
    template: &'static str,
    api_version: &str,
    expected: usize,
) -> Result<Vec<serde_yaml::Value>, RenderError> {
    let output = |reason: String| RenderError::Output { template, reason };
    let content = document
        .get("write_files")
        .and_then(|f| f.as_sequence())
        .and_then(|files| {
            files
                .iter()
                .find(|f| f.get("path").and_then(|p| p.as_str()) == Some(path))
        })
        .and_then(|f| f.get("content"))
        .and_then(|c| c.as_str())
        .ok_or_else(|| output(format!("no write_files entry for {path}")))?;
    let mut documents = Vec::new();
    for part in serde_yaml::Deserializer::from_str(content) {
        let value = serde_yaml::Value::deserialize(part)
            .map_err(|e| output(format!("{path} is not YAML: {e}")))?;
        if value.get("apiVersion").and_then(|v| v.as_str()) != Some(api_version) {
            return Err(output(format!("{path}: a document lacks {api_version}")));
        }
        documents.push(value);
    }
    if documents.len() != expected {
        return Err(output(format!(
            "{path} has {} documents, not {expected}",
            documents.len()
        )));
    }
    Ok(documents)
}

/// Example values for `provisioner cloud-config node --example-join`: the shape of real join
/// parameters, usable by nothing.
pub fn example_join(api_endpoint: String) -> JoinParams {
    JoinParams {
        api_endpoint,
        token: "abcdef.0123456789abcdef".to_string(),
        ca_cert_hashes: vec![format!("sha256:{}", "0".repeat(64))],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0b3Vk user@host";
    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn hooks() -> Hooks {
        Hooks {
            ssh_authorized_keys: vec![KEY.to_string()],
            ..Hooks::default()
        }
    }

    fn join() -> JoinParams {
        JoinParams {
            api_endpoint: "10.77.0.1:6443".into(),
            token: "abcdef.0123456789abcdef".into(),
            ca_cert_hashes: vec![format!("sha256:{}", "ab".repeat(32))],
        }
    }

    fn node<'a>(hooks: &'a Hooks, join: Option<&'a JoinParams>) -> NodeUserData<'a> {
        NodeUserData {
            machine: "node2",
            hostname: "node2",
            node_ip: Ipv4Addr::new(10, 77, 0, 20),
            report_url: "http://10.77.0.1/report/52-54-00-00-00-02",
            report_token: TOKEN,
            hooks,
            join,
            external_cni: false,
        }
    }

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).expect("YAML")
    }

    fn file<'v>(doc: &'v serde_yaml::Value, path: &str) -> &'v serde_yaml::Value {
        doc["write_files"]
            .as_sequence()
            .and_then(|files| files.iter().find(|f| f["path"].as_str() == Some(path)))
            .unwrap_or_else(|| panic!("no {path}"))
    }

    #[test]
    fn node_without_join_says_so() {
        let h = hooks();
        let text = render_node_user_data(&node(&h, None)).expect("renders");
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(
            text.contains("# No join parameters (no cluster inventory)"),
            "{text}"
        );
        assert!(!text.contains("kubeadm join"), "{text}");
        assert!(text.contains("provisioner: cloud-init user-data applied on"));
        let doc = yaml(&text);
        assert_eq!(doc["hostname"].as_str(), Some("node2"));
        assert_eq!(doc["ssh_authorized_keys"][0].as_str(), Some(KEY));
        assert_eq!(
            file(&doc, "/var/lib/provisioner/report-token")["content"].as_str(),
            Some(TOKEN)
        );
        assert_eq!(
            file(&doc, "/var/lib/provisioner/report-token")["permissions"].as_str(),
            Some("0600")
        );
        assert_eq!(
            doc["runcmd"][0][1].as_str(),
            Some("joining"),
            "the first command reports reaching cloud-init"
        );
    }

    #[test]
    fn node_with_join_has_a_join_configuration() {
        let h = hooks();
        let j = join();
        let text = render_node_user_data(&NodeUserData {
            hostname: "Node2.lab.example",
            ..node(&h, Some(&j))
        })
        .expect("renders");
        let doc = yaml(&text);
        assert_eq!(doc["hostname"].as_str(), Some("Node2"));
        assert_eq!(doc["fqdn"].as_str(), Some("Node2.lab.example"));
        let entry = file(&doc, JOIN_CONFIG_PATH);
        assert_eq!(entry["permissions"].as_str(), Some("0600"));
        let config = yaml(entry["content"].as_str().expect("content"));
        assert_eq!(config["kind"].as_str(), Some("JoinConfiguration"));
        let bootstrap = &config["discovery"]["bootstrapToken"];
        assert_eq!(
            bootstrap["apiServerEndpoint"].as_str(),
            Some("10.77.0.1:6443")
        );
        assert_eq!(bootstrap["token"].as_str(), Some("abcdef.0123456789abcdef"));
        assert_eq!(
            bootstrap["caCertHashes"][0].as_str(),
            Some(j.ca_cert_hashes[0].as_str())
        );
        assert_eq!(
            config["nodeRegistration"]["name"].as_str(),
            Some("node2.lab.example"),
            "Kubernetes node names are lower case"
        );
        assert_eq!(
            config["nodeRegistration"]["kubeletExtraArgs"]["node-ip"].as_str(),
            Some("10.77.0.20")
        );
        let runcmd = format!("{:?}", doc["runcmd"]);
        assert!(
            runcmd.contains("kubeadm join --config /etc/kubernetes/kubeadm-join.yaml"),
            "{runcmd}"
        );
    }

    #[test]
    fn odd_values_stay_one_scalar() {
        let tricky = [
            r#"from="10.0.0.0/8",command="echo 'hi' # there" ssh-ed25519 AAAA key: with "quotes""#,
            "ssh-rsa AAAAB3 comment with ünïcödé and \u{2028} and \u{feff}",
            "ssh-ed25519 AAAA {{ not.a.template }} {% raw %} - [a, b] &anchor *alias !!tag",
        ];
        let h = Hooks {
            ssh_authorized_keys: tricky.iter().map(|k| k.to_string()).collect(),
            extra_run_cmd: vec![
                "echo \"a: b\" # c; printf '%s\\n' \"$HOME\"\nnext line".to_string(),
                "- not a list \u{85} \u{7f} \u{9b}".to_string(),
            ],
            extra_write_files: vec![ExtraFile {
                path: "/etc/odd: name #1".into(),
                content: "line 1\n  indented: yes\n---\n\"quoted\"\ttab\n".into(),
                permissions: "0640".into(),
            }],
        };
        let j = join();
        let text = render_node_user_data(&node(&h, Some(&j))).expect("renders");
        let doc = yaml(&text);
        for (i, key) in tricky.iter().enumerate() {
            assert_eq!(doc["ssh_authorized_keys"][i].as_str(), Some(*key), "{text}");
        }
        assert_eq!(doc["runcmd"][1].as_str(), Some(h.extra_run_cmd[0].as_str()));
        assert_eq!(doc["runcmd"][2].as_str(), Some(h.extra_run_cmd[1].as_str()));
        let extra = file(&doc, "/etc/odd: name #1");
        assert_eq!(
            extra["content"].as_str(),
            Some(h.extra_write_files[0].content.as_str())
        );
        assert_eq!(extra["permissions"].as_str(), Some("0640"));
        // The characters YAML 1.1 readers refuse raw are escaped in the text.
        assert!(!text.contains('\u{7f}') && !text.contains('\u{85}') && !text.contains('\u{2028}'));
        assert!(text.contains("\\u0085"), "{text}");
    }

    #[test]
    fn inputs_are_validated() {
        let h = hooks();
        let err = |data: NodeUserData<'_>| match render_node_user_data(&data) {
            Ok(text) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        };
        for bad in ["", "-node", "node_2", "a..b", "n\node", &"a".repeat(64)] {
            let e = err(NodeUserData {
                hostname: bad,
                ..node(&h, None)
            });
            assert!(e.starts_with("hostname:"), "{bad:?}: {e}");
        }
        let two_lines = Hooks {
            ssh_authorized_keys: vec![format!("{KEY}\nssh-rsa AAAA evil")],
            ..Hooks::default()
        };
        assert!(err(node(&two_lines, None)).contains("single line"));
        let no_type = Hooks {
            ssh_authorized_keys: vec!["AAAAC3Nza user@host".into()],
            ..Hooks::default()
        };
        assert!(err(node(&no_type, None)).contains("no key type"));
        let mode = Hooks {
            extra_write_files: vec![ExtraFile {
                path: "/etc/x".into(),
                content: String::new(),
                permissions: "rw-r--r--".into(),
            }],
            ..Hooks::default()
        };
        assert!(err(node(&mode, None)).contains("permissions"));
        let relative = Hooks {
            extra_write_files: vec![ExtraFile {
                path: "etc/x".into(),
                content: String::new(),
                permissions: "0644".into(),
            }],
            ..Hooks::default()
        };
        assert!(err(node(&relative, None)).contains("extraWriteFiles.path"));

        for endpoint in [
            "10.77.0.1",
            "10.77.0.1:0",
            "10.77.0.1:65536",
            "a b:6443",
            "[::1:6443",
            "http://x:6443",
        ] {
            let j = JoinParams {
                api_endpoint: endpoint.into(),
                ..join()
            };
            assert!(
                err(node(&h, Some(&j))).starts_with("join.apiEndpoint"),
                "{endpoint}"
            );
        }
        let secret = "abcdef.0123456789ABCDEF";
        let j = JoinParams {
            token: secret.into(),
            ..join()
        };
        let e = err(node(&h, Some(&j)));
        assert!(e.starts_with("join.token"), "{e}");
        assert!(!e.contains("0123456789"), "the token is never quoted: {e}");
        assert!(!format!("{j:?}").contains("0123456789"), "nor in Debug");
        let j = JoinParams {
            ca_cert_hashes: vec!["sha1:abcd".into()],
            ..join()
        };
        assert!(err(node(&h, Some(&j))).starts_with("join.caCertHashes"));
        let j = JoinParams {
            ca_cert_hashes: vec![],
            ..join()
        };
        assert!(err(node(&h, Some(&j))).starts_with("join.caCertHashes"));
        let e = err(NodeUserData {
            report_token: "short",
            ..node(&h, None)
        });
        assert!(e.starts_with("reportToken") && !e.contains("short"), "{e}");
    }

    fn settings() -> InitSettings {
        InitSettings {
            kubernetes_version: "v1.30.2".into(),
            pod_subnet: "10.244.0.0/16".parse().expect("cidr"),
            service_subnet: "10.96.0.0/12".parse().expect("cidr"),
            control_plane_endpoint: None,
            cni_manifest: Some("/usr/share/provisioner/cni/cni.yaml".into()),
            control_plane_timeout: None,
        }
    }

    #[test]
    fn laptop_runs_kubeadm_init_and_starts_netboot() {
        let h = hooks();
        let c = InitSettings {
            control_plane_endpoint: Some("api.lab.example:6443".into()),
            ..settings()
        };
        let config_text = "serverAddress: 10.77.0.1\n# a comment: with \"quotes\"\n";
        let text = render_laptop_user_data(&LaptopUserData {
            hostname: "laptop",
            node_ip: Ipv4Addr::new(10, 77, 0, 1),
            hooks: &h,
            init: &c,
            provisioner_yaml: config_text,
            network: None,
            image_upstream: None,
        })
        .expect("renders");
        let doc = yaml(&text);
        assert_eq!(doc["hostname"].as_str(), Some("laptop"));
        assert_eq!(
            file(&doc, "/etc/provisioner/provisioner.yaml")["content"].as_str(),
            Some(config_text)
        );
        let init = file(&doc, INIT_CONFIG_PATH);
        assert_eq!(init["permissions"].as_str(), Some("0600"));
        let docs: Vec<serde_yaml::Value> =
            serde_yaml::Deserializer::from_str(init["content"].as_str().expect("content"))
                .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
                .collect();
        assert_eq!(docs[0]["kind"].as_str(), Some("InitConfiguration"));
        assert_eq!(
            docs[0]["localAPIEndpoint"]["advertiseAddress"].as_str(),
            Some("10.77.0.1")
        );
        assert_eq!(docs[1]["kind"].as_str(), Some("ClusterConfiguration"));
        assert_eq!(docs[1]["kubernetesVersion"].as_str(), Some("v1.30.2"));
        assert_eq!(
            docs[1]["networking"]["podSubnet"].as_str(),
            Some("10.244.0.0/16")
        );
        assert_eq!(
            docs[1]["controlPlaneEndpoint"].as_str(),
            Some("api.lab.example:6443")
        );
        // v1beta3's extraArgs is a map.
        assert_eq!(
            docs[1]["controllerManager"]["extraArgs"]["leader-elect-renew-deadline"].as_str(),
            Some("40s")
        );
        assert_eq!(
            docs[1]["scheduler"]["extraArgs"]["leader-elect-lease-duration"].as_str(),
            Some("60s")
        );
        let runcmd = doc["runcmd"].as_sequence().expect("runcmd");
        let words = |i: usize| -> Vec<&str> {
            runcmd[i]
                .as_sequence()
                .map(|s| s.iter().filter_map(|w| w.as_str()).collect())
                .unwrap_or_default()
        };
        // kubeadm init (CoreDNS's addon skipped when the image lacks its image), then the CNI
        // manifest with the bridge pod network masked, then netboot.path.
        assert_eq!(words(0)[..2], ["sh", "-c"]);
        assert!(words(0)[2].contains("exec kubeadm init"), "{:?}", words(0));
        assert!(words(0)[2].contains("--config /etc/kubernetes/kubeadm-init.yaml"));
        assert!(words(0)[2].contains("--skip-phases=addon/coredns"));
        assert_eq!(words(2)[..2], ["systemctl", "mask"]);
        assert_eq!(
            words(3).last().copied(),
            Some("/usr/share/provisioner/cni/cni.yaml")
        );
        assert_eq!(words(4), ["systemctl", "enable", "--now", "netboot.path"]);
        assert!(doc["write_files"]
            .as_sequence()
            .expect("write_files")
            .iter()
            .all(|f| f["path"].as_str() != Some("/etc/systemd/network/05-provisioning.network")));

        let relative = InitSettings {
            cni_manifest: Some("cni.yaml".into()),
            ..settings()
        };
        let e = render_laptop_user_data(&LaptopUserData {
            hostname: "laptop",
            node_ip: Ipv4Addr::new(10, 77, 0, 1),
            hooks: &h,
            init: &relative,
            provisioner_yaml: "",
            network: None,
            image_upstream: None,
        })
        .expect_err("relative manifest");
        assert!(e.to_string().starts_with("laptop.cniManifest"), "{e}");
    }

    const POD_NETWORK_RBAC_PATH: &str = "/etc/kubernetes/provisioner-pod-network.yaml";

    #[test]
    fn laptop_with_the_bridge_pod_network_a_static_address_and_an_upstream() {
        let h = hooks();
        let c = InitSettings {
            kubernetes_version: "v1.32.0".into(),
            cni_manifest: None,
            control_plane_timeout: Some(std::time::Duration::from_secs(1200)),
            ..settings()
        };
        let network = LaptopNetwork {
            interface: "ens3".into(),
            mac_address: Some(netboot::MacAddr([0x52, 0x54, 0, 0, 0, 1])),
            address: "10.77.0.2/24".parse().expect("net"),
            gateway: None,
            nameservers: vec![Ipv4Addr::new(10, 77, 0, 53)],
        };
        let data = LaptopUserData {
            hostname: "laptop",
            node_ip: Ipv4Addr::new(10, 77, 0, 2),
            hooks: &h,
            init: &c,
            provisioner_yaml: "serverAddress: 10.77.0.2\n",
            network: Some(&network),
            image_upstream: Some("http://10.77.0.1:8000/"),
        };
        let text = render_laptop_user_data(&data).expect("renders");
        let doc = yaml(&text);
        assert_eq!(
            file(&doc, "/etc/systemd/network/05-provisioning.network")["content"].as_str(),
            Some("[Match]\nMACAddress=52:54:00:00:00:01\n\n[Network]\nDHCP=no\nAddress=10.77.0.2/24\nDNS=10.77.0.53\n")
        );
        assert_eq!(
            file(&doc, "/etc/systemd/system/imageserver.service.d/upstream.conf")["content"]
                .as_str(),
            Some("[Service]\nExecStart=\nExecStart=/usr/bin/provisioner imageserver --dir /var/lib/provisioner-images --upstream http://10.77.0.1:8000/\n")
        );
        let commands: Vec<String> = doc["runcmd"]
            .as_sequence()
            .expect("runcmd")
            .iter()
            .map(|c| {
                c.as_sequence()
                    .map(|s| {
                        s.iter()
                            .filter_map(|w| w.as_str())
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_default()
            })
            .collect();
        // A slow machine: kubeadm waits 1200 s, and the kubelet's probes of every control-plane
        // Pod span as much (120 × 10 s) through kubeadm's patches.
        let init: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(
            file(&doc, INIT_CONFIG_PATH)["content"]
                .as_str()
                .expect("content"),
        )
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .collect();
        // Kubernetes 1.32: v1beta4, whose kubeletExtraArgs is a list and whose wait is
        // timeouts.controlPlaneComponentHealthCheck (1.32 ignores v1beta3's timeoutForControlPlane).
        for document in &init {
            assert_eq!(
                document["apiVersion"].as_str(),
                Some("kubeadm.k8s.io/v1beta4")
            );
        }
        assert_eq!(
            init[0]["nodeRegistration"]["kubeletExtraArgs"][0]["name"].as_str(),
            Some("node-ip")
        );
        assert_eq!(
            init[0]["nodeRegistration"]["kubeletExtraArgs"][0]["value"].as_str(),
            Some("10.77.0.2")
        );
        assert_eq!(
            init[0]["patches"]["directory"].as_str(),
            Some("/etc/kubernetes/patches")
        );
        assert_eq!(
            init[0]["timeouts"]["controlPlaneComponentHealthCheck"].as_str(),
            Some("1200s")
        );
        assert!(init[1]["apiServer"].is_null(), "{:?}", init[1]);
        // One control plane: leases that a loaded machine can keep (10 s was lost under load,
        // and the controller-manager that signs join tokens restarted over and over).
        for component in ["controllerManager", "scheduler"] {
            let args: Vec<(&str, &str)> = init[1][component]["extraArgs"]
                .as_sequence()
                .expect("extraArgs, a list in v1beta4")
                .iter()
                .map(|a| {
                    (
                        a["name"].as_str().unwrap_or_default(),
                        a["value"].as_str().unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(
                args,
                [
                    ("leader-elect-lease-duration", "60s"),
                    ("leader-elect-renew-deadline", "40s"),
                    ("leader-elect-retry-period", "5s")
                ],
                "{component}"
            );
        }
        for component in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            let patch = file(
                &doc,
                &format!("/etc/kubernetes/patches/{component}+strategic.yaml"),
            );
            let patch = yaml(patch["content"].as_str().expect("content"));
            let container = &patch["spec"]["containers"][0];
            assert_eq!(container["name"].as_str(), Some(component));
            assert_eq!(
                container["startupProbe"]["failureThreshold"].as_u64(),
                Some(120)
            );
            assert_eq!(
                container["livenessProbe"]["failureThreshold"].as_u64(),
                Some(120)
            );
        }
        // No manifest: the pod network service is left to its path unit, not masked; the one
        // thing applied is its RBAC (Kubernetes 1.32's Node authorizer lets a node read its own
        // Node only, and the pod network needs every Node's range).
        assert!(commands.iter().all(|c| !c.contains("mask")), "{commands:?}");
        let applied: Vec<&String> = commands.iter().filter(|c| c.contains("kubectl")).collect();
        assert_eq!(
            applied,
            [&format!(
                "kubectl --kubeconfig /etc/kubernetes/admin.conf apply -f {POD_NETWORK_RBAC_PATH}"
            )],
            "{commands:?}"
        );
        let rbac: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(
            file(&doc, POD_NETWORK_RBAC_PATH)["content"]
                .as_str()
                .expect("content"),
        )
        .map(|d| serde_yaml::Value::deserialize(d).expect("YAML"))
        .collect();
        assert_eq!(rbac[0]["kind"].as_str(), Some("ClusterRole"));
        assert_eq!(
            rbac[0]["rules"][0]["verbs"],
            serde_yaml::from_str::<serde_yaml::Value>("[get, list, watch]").expect("YAML")
        );
        assert_eq!(rbac[0]["rules"][0]["resources"][0].as_str(), Some("nodes"));
        assert_eq!(rbac[1]["kind"].as_str(), Some("ClusterRoleBinding"));
        assert_eq!(rbac[1]["subjects"][0]["kind"].as_str(), Some("Group"));
        assert_eq!(
            rbac[1]["subjects"][0]["name"].as_str(),
            Some("system:nodes")
        );
        let position = |needle: &str| {
            commands
                .iter()
                .position(|c| c.contains(needle))
                .unwrap_or_else(|| panic!("no {needle:?} in {commands:?}"))
        };
        assert!(position("kubeadm init") < position("provisioner-pod-network.yaml"));
        assert!(position("networkctl reload") < position("kubeadm init"));
        assert!(position("try-restart imageserver.service") < position("kubeadm init"));
        assert!(position("kubeadm init") < position("netboot.path"));

        for bad in [
            "ftp://x/",
            "http://",
            "http://a b/",
            "http://x/\"q",
            "http://x/$(id)",
        ] {
            let e = render_laptop_user_data(&LaptopUserData {
                image_upstream: Some(bad),
                ..data.clone()
            })
            .expect_err(bad);
            assert!(
                e.to_string().starts_with("laptop.imageUpstream"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn network_config_and_meta_data() {
        let text = render_laptop_network_config(&LaptopNetwork {
            interface: "enp1s0".into(),
            mac_address: Some(netboot::MacAddr([0x52, 0x54, 0, 0, 0, 1])),
            address: "10.77.0.1/24".parse().expect("net"),
            gateway: Some(Ipv4Addr::new(10, 77, 0, 254)),
            nameservers: vec![Ipv4Addr::new(10, 77, 0, 53)],
        })
        .expect("renders");
        let doc = yaml(&text);
        let eth = &doc["ethernets"]["enp1s0"];
        assert_eq!(doc["version"].as_u64(), Some(2));
        assert_eq!(
            eth["match"]["macaddress"].as_str(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(eth["set-name"].as_str(), Some("enp1s0"));
        assert_eq!(eth["addresses"][0].as_str(), Some("10.77.0.1/24"));
        assert_eq!(eth["routes"][0]["via"].as_str(), Some("10.77.0.254"));
        assert_eq!(
            eth["nameservers"]["addresses"][0].as_str(),
            Some("10.77.0.53")
        );

        let meta = render_meta_data("node2-0123", "node2").expect("renders");
        assert_eq!(
            meta,
            "instance-id: \"node2-0123\"\nlocal-hostname: \"node2\"\n"
        );
        assert!(render_meta_data("a b", "node2").is_err());
    }
}
