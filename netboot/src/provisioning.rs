//! Imaging: what netboot asks of the agent. The types it shares with stage2 come from `wire`.
//!
//! The flow, per machine (the agent keeps the state, netboot only asks):
//!
//! 1. iPXE requests `/ipxe/{mac}`. [`Provisioning::boot_action`] decides: image the disk (the
//!    agent mints a fresh token and hands it back in [`ImagingOrders`]), boot the local disk, or
//!    the configured kernel as before imaging existed.
//! 2. The imaging script boots stage2 with its orders on the kernel command line
//!    ([`ImagingOrders::kernel_args`], from `wire`).
//! 3. stage2 sends `POST {provisioner.url}/report/{mac}` with `Authorization: Bearer {token}`
//!    and a JSON [`ProgressReport`], which netboot passes to [`Provisioning::report`].
//! 4. stage2 writes a cloud-init NoCloud drop-in whose `seedfrom` is
//!    [`nocloud_seed_url`]`(url, token)`; after the reboot cloud-init fetches `meta-data` and
//!    `user-data` from there ([`Provisioning::cloud_init`]). The token sits in the path because
//!    NoCloud's `seedfrom` cannot send headers; `user-data` is served once per token.

use std::future::Future;
use std::pin::Pin;

use serde::Deserialize;

use crate::machine::Machine;

// The contract with stage2 lives in the `wire` crate (stage2 takes it without netboot's HTTP
// stack); re-exported here because the Provisioning trait speaks it.
pub use wire::orders::{valid_token, DiskHints, ImagingOrders, OrdersError, Token};
pub use wire::report::{ProgressReport, ReportParseError, MAX_MESSAGE_LEN, MAX_REPORT_BODY};
pub use wire::seed::nocloud_seed_url;

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

    #[test]
    fn debug_hides_the_token() {
        let orders = ImagingOrders {
            token: Token::parse("0123456789abcdef0123").unwrap_or_else(|| panic!("token")),
            image_url: "http://10.77.0.1:8080/node.raw.zst".into(),
            sha256: [0x9f; 32],
            image_size: None,
            disk: DiskHints::default(),
        };
        assert!(!format!("{:?}", BootAction::Image(orders)).contains("0123456789abcdef0123"));
    }
}
