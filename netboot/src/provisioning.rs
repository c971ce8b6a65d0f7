//! Imaging: what netboot asks of the agent, and the wire types it shares with stage2.
//!
//! The flow, per machine (the agent keeps the state, netboot only asks):
//!
//! 1. iPXE requests `/ipxe/{mac}`. [`Provisioning::boot_action`] decides: image the disk (the
//!    agent mints a fresh token and hands it back in [`ImagingOrders`]), boot the local disk, or
//!    the configured kernel as before imaging existed.
//! 2. The imaging script boots stage2 with its orders on the kernel command line
//!    ([`ImagingOrders::kernel_args`]).
//! 3. stage2 sends `POST {provisioner.url}/report/{mac}` with `Authorization: Bearer {token}`
//!    and a JSON [`ProgressReport`], which netboot passes to [`Provisioning::report`].
//! 4. stage2 writes a cloud-init NoCloud drop-in whose `seedfrom` is
//!    [`nocloud_seed_url`]`(url, token)`; after the reboot cloud-init fetches `meta-data` and
//!    `user-data` from there ([`Provisioning::cloud_init`]). The token sits in the path because
//!    NoCloud's `seedfrom` cannot send headers; `user-data` is served once per token.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;

/// Largest report body accepted; a report is a few dozen bytes.
pub const MAX_REPORT_BODY: usize = 16 * 1024;
/// Longest message kept from a report; longer ones are refused rather than cut silently.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// stage2's report, the JSON body of `POST /report/{mac}`:
///
/// ```json
/// {"phase":"imaging","progress":42,"bytes":901775360,"rate":118000000,"message":"…"}
/// {"phase":"imaged"}
/// {"phase":"failed","message":"sha256 mismatch: expected 9f86…, got 1c2e…"}
/// {"phase":"joining","message":"cloud-init is configuring the node"}
/// ```
///
/// `joining` comes from the imaged machine's cloud-init (its user-data carries the token), not
/// from stage2; so may a `failed` when `kubeadm join` fails.
///
/// `progress` is a percentage (0-100), `bytes` the decompressed bytes written so far, `rate`
/// bytes per second; every field but `phase` (and `message` for `failed`) may be left out.
/// Unknown fields are ignored, so stage2 may send more than this netboot understands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum ProgressReport {
    Imaging {
        #[serde(default)]
        progress: u8,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rate: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Imaged {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    Failed {
        message: String,
    },
    Joining {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReportParseError {
    #[error("report is not valid JSON of the expected shape: {0}")]
    Json(String),
    #[error("progress {0} is not a percentage (0-100)")]
    Progress(u8),
    #[error("message is longer than {MAX_MESSAGE_LEN} bytes")]
    MessageTooLong,
}

impl ProgressReport {
    pub fn parse(body: &[u8]) -> Result<ProgressReport, ReportParseError> {
        let report: ProgressReport =
            serde_json::from_slice(body).map_err(|e| ReportParseError::Json(e.to_string()))?;
        let message = match &report {
            ProgressReport::Imaging {
                progress, message, ..
            } => {
                if *progress > 100 {
                    return Err(ReportParseError::Progress(*progress));
                }
                message.as_deref()
            }
            ProgressReport::Imaged { message } | ProgressReport::Joining { message } => {
                message.as_deref()
            }
            ProgressReport::Failed { message } => Some(message.as_str()),
        };
        if message.is_some_and(|m| m.len() > MAX_MESSAGE_LEN) {
            return Err(ReportParseError::MessageTooLong);
        }
        Ok(report)
    }

    pub fn to_json(&self) -> String {
        // Serialising these plain fields cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The URL stage2 writes as cloud-init NoCloud's `seedfrom`: cloud-init appends `meta-data`,
/// `user-data` and `vendor-data` to it.
pub fn nocloud_seed_url(netboot_url: &str, token: &str) -> String {
    format!("{}/nocloud/{token}/", netboot_url.trim_end_matches('/'))
}

/// Disk hints for stage2; every one given must match the chosen disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskHints {
    pub path: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    /// Bytes.
    pub min_size: Option<u64>,
}

/// What stage2 is told to do, on the kernel command line of the imaging script.
#[derive(Clone, PartialEq, Eq)]
pub struct ImagingOrders {
    /// Per-provisioning secret: authenticates reports and the cloud-init fetch.
    pub token: String,
    pub image_url: String,
    /// sha256 of the decompressed image, 64 hex digits.
    pub sha256: String,
    /// Decompressed size in bytes, when known.
    pub image_size: Option<u64>,
    pub disk: DiskHints,
}

impl std::fmt::Debug for ImagingOrders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImagingOrders")
            .field("token", &"<redacted>")
            .field("image_url", &self.image_url)
            .field("sha256", &self.sha256)
            .field("image_size", &self.image_size)
            .field("disk", &self.disk)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrdersError {
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> OrdersError {
    OrdersError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// A value safe on a kernel command line written into an iPXE script: printable ASCII, no
/// quote, no `${`; blanks only where `quoted` allows them (the value is then put in quotes).
fn check_value(key: &'static str, value: &str, blanks_allowed: bool) -> Result<(), OrdersError> {
    if value.is_empty() {
        return Err(invalid(key, "is empty"));
    }
    if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(invalid(key, "must be printable ASCII"));
    }
    if value.contains('"') || value.contains("${") {
        return Err(invalid(key, "must not contain '\"' or '${'"));
    }
    if value.contains(' ') && !blanks_allowed {
        return Err(invalid(key, "must not contain blanks"));
    }
    if value.contains("  ") || value.starts_with(' ') || value.ends_with(' ') {
        // iPXE re-joins the words of a command line with single blanks.
        return Err(invalid(
            key,
            "must not have leading, trailing or double blanks",
        ));
    }
    Ok(())
}

fn check_url(key: &'static str, value: &str) -> Result<(), OrdersError> {
    check_value(key, value, false)?;
    // stage2's initrd carries no TLS: integrity comes from the sha256.
    match value.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(()),
        _ => Err(invalid(key, "must be an http:// URL with a host")),
    }
}

/// Token alphabet stage2 accepts: `A-Z a-z 0-9 . _ ~ -`, 16 to 256 characters.
pub fn valid_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-'))
}

impl ImagingOrders {
    /// The `provisioner.*` kernel parameters stage2 reads (its `orders` module documents them):
    /// `provisioner.url=… provisioner.token=… provisioner.image=… provisioner.sha256=…` and,
    /// when set, `provisioner.image_size=` and `provisioner.disk.{path,serial,model,min_size}=`.
    pub fn kernel_args(&self, netboot_url: &str) -> Result<String, OrdersError> {
        let url = netboot_url.trim_end_matches('/');
        check_url("provisioner.url", url)?;
        if !valid_token(&self.token) {
            return Err(invalid(
                "provisioner.token",
                "must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ -",
            ));
        }
        check_url("provisioner.image", &self.image_url)?;
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid("provisioner.sha256", "must be 64 hex digits"));
        }
        let mut out = format!(
            "provisioner.url={url} provisioner.token={} provisioner.image={} provisioner.sha256={}",
            self.token,
            self.image_url,
            self.sha256.to_ascii_lowercase()
        );
        // Writing to a String cannot fail.
        if let Some(size) = self.image_size {
            let _ = write!(out, " provisioner.image_size={size}");
        }
        if let Some(path) = &self.disk.path {
            check_value("provisioner.disk.path", path, false)?;
            if !path.starts_with("/dev/") {
                return Err(invalid(
                    "provisioner.disk.path",
                    "must be a path under /dev/",
                ));
            }
            let _ = write!(out, " provisioner.disk.path={path}");
        }
        for (key, value) in [
            ("provisioner.disk.serial", &self.disk.serial),
            ("provisioner.disk.model", &self.disk.model),
        ] {
            if let Some(value) = value {
                check_value(key, value, true)?;
                if value.contains(' ') {
                    let _ = write!(out, " {key}=\"{value}\"");
                } else {
                    let _ = write!(out, " {key}={value}");
                }
            }
        }
        if let Some(min) = self.disk.min_size {
            let _ = write!(out, " provisioner.disk.min_size={min}");
        }
        Ok(out)
    }
}

/// How an imaged machine's script boots its disk, so that firmware can keep the network first
/// in its boot order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LocalBoot {
    /// `exit 1` under UEFI (the firmware goes on to its next boot entry), `sanboot` of the first
    /// BIOS disk otherwise; decided by iPXE's `${platform}` when the script runs.
    #[default]
    Auto,
    /// Always `exit 1`: back to the firmware, which tries its next boot device.
    Exit,
    /// Always `sanboot --no-describe --drive 0x80` (the first BIOS disk).
    Sanboot,
}

/// What a machine's iPXE script does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootAction {
    /// The configured kernel, initrd and command line, without imaging orders (imaging not
    /// configured).
    Configured,
    /// Boot stage2 (the configured kernel and initrd) with these orders.
    Image(ImagingOrders),
    /// The disk is imaged: boot it.
    LocalDisk(LocalBoot),
}

/// The cloud-init NoCloud files served under `/nocloud/{token}/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudInitFile {
    MetaData,
    UserData,
    VendorData,
}

impl CloudInitFile {
    pub fn from_name(name: &str) -> Option<CloudInitFile> {
        match name {
            "meta-data" => Some(CloudInitFile::MetaData),
            "user-data" => Some(CloudInitFile::UserData),
            "vendor-data" => Some(CloudInitFile::VendorData),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CloudInitFile::MetaData => "meta-data",
            CloudInitFile::UserData => "user-data",
            CloudInitFile::VendorData => "vendor-data",
        }
    }
}

/// A cloud-init document and the machine it belongs to (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInitDocument {
    pub machine: String,
    pub text: String,
}

/// Why a report or cloud-init request was refused. None of them carries the token.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("imaging is not configured")]
    NotEnabled,
    #[error("unknown machine")]
    UnknownMachine,
    /// A token that no machine holds now (cloud-init) or not this machine's (reports).
    #[error("wrong or expired token")]
    WrongToken { machine: Option<String> },
    /// The token's user-data was already served once.
    #[error("user-data already served for this token")]
    Replayed { machine: String },
    /// Right token, but the machine is not in a phase where this makes sense.
    #[error("machine {machine} is {phase}: {what} not accepted")]
    WrongPhase {
        machine: String,
        phase: String,
        what: &'static str,
    },
    /// The file does not exist for this datasource (e.g. `vendor-data`).
    #[error("no such document")]
    NoDocument { machine: String },
    /// The document cannot be made now (the cluster's API server does not answer); the token
    /// is not spent and the client may retry. `reason` never carries a token.
    #[error("{reason}")]
    Unavailable { machine: String, reason: String },
}

/// A boxed future, what [`Provisioning`]'s asynchronous methods return (a trait object's
/// methods cannot be `async fn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What netboot asks the agent for imaging. Implementations must be cheap (they run per
/// request) and must never log tokens.
pub trait Provisioning: Send + Sync + 'static {
    /// What `machine`'s iPXE script does now. `head`: a HEAD request, which must not change
    /// any state (no token is minted; the answer is only used for its headers).
    fn boot_action(&self, machine: &Machine, head: bool) -> BootAction;

    /// A report from stage2 on `machine`, authenticated by `token`.
    fn report(&self, machine: &Machine, token: &str, report: ProgressReport)
        -> Result<(), Refusal>;

    /// A cloud-init NoCloud file for the holder of `token`. Asynchronous: user-data may need
    /// the cluster (a kubeadm bootstrap token) before it can be rendered.
    fn cloud_init<'a>(
        &'a self,
        token: &'a str,
        file: CloudInitFile,
    ) -> BoxFuture<'a, Result<CloudInitDocument, Refusal>>;
}

/// No imaging: every script is the configured one, reports and cloud-init are refused.
pub struct NoProvisioning;

impl Provisioning for NoProvisioning {
    fn boot_action(&self, _machine: &Machine, _head: bool) -> BootAction {
        BootAction::Configured
    }
    fn report(&self, _: &Machine, _: &str, _: ProgressReport) -> Result<(), Refusal> {
        Err(Refusal::NotEnabled)
    }
    fn cloud_init<'a>(
        &'a self,
        _: &'a str,
        _: CloudInitFile,
    ) -> BoxFuture<'a, Result<CloudInitDocument, Refusal>> {
        Box::pin(std::future::ready(Err(Refusal::NotEnabled)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn orders() -> ImagingOrders {
        ImagingOrders {
            token: "0123456789abcdef0123".into(),
            image_url: "http://10.77.0.1:8080/node.raw.zst".into(),
            sha256: HASH.into(),
            image_size: None,
            disk: DiskHints::default(),
        }
    }

    #[test]
    fn parses_reports() {
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaging","progress":42,"rate":1000,"extra":1}"#),
            Ok(ProgressReport::Imaging {
                progress: 42,
                bytes: None,
                rate: Some(1000),
                message: None
            })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaged"}"#),
            Ok(ProgressReport::Imaged { message: None })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"failed","message":"no disk"}"#),
            Ok(ProgressReport::Failed {
                message: "no disk".into()
            })
        );
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"joining","message":"cloud-init"}"#),
            Ok(ProgressReport::Joining {
                message: Some("cloud-init".into())
            })
        );
        for bad in [
            &br#"{"phase":"failed"}"#[..],
            br#"{"phase":"done"}"#,
            br#"{"progress":5}"#,
            br#"{"phase":"imaging","progress":-1}"#,
            br#"{"phase":"imaging","progress":"5"}"#,
            b"not json",
            b"",
        ] {
            assert!(
                matches!(ProgressReport::parse(bad), Err(ReportParseError::Json(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            ProgressReport::parse(br#"{"phase":"imaging","progress":101}"#),
            Err(ReportParseError::Progress(101))
        );
        let long = format!(r#"{{"phase":"failed","message":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            ProgressReport::parse(long.as_bytes()),
            Err(ReportParseError::MessageTooLong)
        );
    }

    #[test]
    fn reports_round_trip() {
        let report = ProgressReport::Imaging {
            progress: 7,
            bytes: Some(1 << 20),
            rate: None,
            message: Some("writing".into()),
        };
        let json = report.to_json();
        assert_eq!(
            json,
            r#"{"phase":"imaging","progress":7,"bytes":1048576,"message":"writing"}"#
        );
        assert_eq!(ProgressReport::parse(json.as_bytes()), Ok(report));
    }

    #[test]
    fn kernel_args_carry_the_orders() {
        assert_eq!(
            orders().kernel_args("http://10.77.0.1/").as_deref(),
            Ok(format!(
                "provisioner.url=http://10.77.0.1 provisioner.token=0123456789abcdef0123 \
                 provisioner.image=http://10.77.0.1:8080/node.raw.zst provisioner.sha256={HASH}"
            )
            .as_str())
        );
        let mut o = orders();
        o.image_size = Some(2 << 30);
        o.disk = DiskHints {
            path: Some("/dev/disk/by-id/virtio-S1".into()),
            serial: Some("S1".into()),
            model: Some("QEMU HARDDISK".into()),
            min_size: Some(100 << 30),
        };
        let args = o.kernel_args("http://h").expect("valid");
        assert!(
            args.ends_with(
                " provisioner.image_size=2147483648 provisioner.disk.path=/dev/disk/by-id/virtio-S1 \
                 provisioner.disk.serial=S1 provisioner.disk.model=\"QEMU HARDDISK\" \
                 provisioner.disk.min_size=107374182400"
            ),
            "{args}"
        );
    }

    #[test]
    fn kernel_args_refuse_what_stage2_or_ipxe_cannot_take() {
        let cases: Vec<(ImagingOrders, &str)> = vec![
            (
                ImagingOrders {
                    token: "short".into(),
                    ..orders()
                },
                "provisioner.token",
            ),
            (
                ImagingOrders {
                    token: "has/slash/0123456789".into(),
                    ..orders()
                },
                "provisioner.token",
            ),
            (
                ImagingOrders {
                    image_url: "https://x/y".into(),
                    ..orders()
                },
                "provisioner.image",
            ),
            (
                ImagingOrders {
                    image_url: "http://x/${y}".into(),
                    ..orders()
                },
                "provisioner.image",
            ),
            (
                ImagingOrders {
                    sha256: "abc".into(),
                    ..orders()
                },
                "provisioner.sha256",
            ),
            (
                ImagingOrders {
                    disk: DiskHints {
                        path: Some("vda".into()),
                        ..DiskHints::default()
                    },
                    ..orders()
                },
                "provisioner.disk.path",
            ),
            (
                ImagingOrders {
                    disk: DiskHints {
                        model: Some("a\"b".into()),
                        ..DiskHints::default()
                    },
                    ..orders()
                },
                "provisioner.disk.model",
            ),
        ];
        for (o, key) in cases {
            let err = o.kernel_args("http://h").expect_err(key);
            assert!(
                matches!(&err, OrdersError::Invalid { key: k, .. } if *k == key),
                "{err}"
            );
        }
        assert!(orders().kernel_args("https://h").is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        assert!(!format!("{:?}", orders()).contains("0123456789abcdef0123"));
        assert!(!format!("{:?}", BootAction::Image(orders())).contains("0123456789abcdef0123"));
    }

    #[test]
    fn seed_url() {
        assert_eq!(
            nocloud_seed_url("http://10.77.0.1/", "tok"),
            "http://10.77.0.1/nocloud/tok/"
        );
    }
}
