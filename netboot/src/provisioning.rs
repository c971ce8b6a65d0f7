//! Imaging: what netboot asks of the agent. The types it shares with stage2 come from `wire`.
//!
//! The flow, per machine (the agent keeps the state, netboot only asks):
//!
//! 1. iPXE requests `/ipxe/{mac}`. [`Provisioning::boot_action`] decides: image the disk (the
//!    agent hands back the provisioning token in [`ImagingOrders`]), boot the local disk, or
//!    the configured kernel as before imaging existed. A token is bound to its machine: it is
//!    only given to a request from the machine's reserved address shortly after netboot
//!    acknowledged the machine's DHCP lease (in proxy mode, where the LAN's DHCP server gives
//!    the lease: shortly after netboot's ProxyDHCP answer to the machine's iPXE), and the
//!    reports and cloud-init fetches made with it must come from that address too
//!    ([`Refusal::WrongPeer`], [`Refusal::NoRecentLease`]).
//! 2. The imaging script boots stage2 with its orders on the kernel command line
//!    ([`ImagingOrders::kernel_args`], from `wire`).
//! 3. stage2 sends `POST {provisioner.url}/report/{mac}` with `Authorization: Bearer {token}`
//!    and a JSON [`ProgressReport`], which netboot passes to [`Provisioning::report`].
//! 4. stage2 writes a cloud-init NoCloud drop-in whose `seedfrom` is
//!    [`nocloud_seed_url`]`(url, token)`; after the reboot cloud-init fetches `meta-data` and
//!    `user-data` from there ([`Provisioning::cloud_init`]). The token sits in the path because
//!    NoCloud's `seedfrom` cannot send headers; `user-data` is served once per token.

use std::future::Future;
use std::net::IpAddr;
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
    /// The request does not come from the machine's reserved address: a token is bound to it.
    #[error("request from {peer}, not from the machine's reserved address")]
    WrongPeer { machine: String, peer: IpAddr },
    /// No DHCP lease of the machine was acknowledged recently (in proxy mode: no ProxyDHCP
    /// answer went to its iPXE): its imaging script (and token) is only given out within
    /// `window_secs` after that.
    #[error(
        "no DHCP lease acknowledged for the machine (in proxy mode: no ProxyDHCP answer to its iPXE) in the last {window_secs} s"
    )]
    NoRecentLease { machine: String, window_secs: u64 },
}

impl Refusal {
    /// The body of the 403 answer to a binding refusal: why, without the machine's address.
    pub fn public_reason(&self) -> Option<&'static str> {
        match self {
            Refusal::WrongPeer { .. } => {
                Some("forbidden: the request does not come from the machine's reserved address")
            }
            Refusal::NoRecentLease { .. } => Some(
                "forbidden: no recent DHCP lease for this machine; its imaging script is only \
                 served to it shortly after it booted from the network",
            ),
            _ => None,
        }
    }
}

/// `peer` as IPv4 when it is an IPv4-mapped IPv6 address (a dual-stack listener's view of an
/// IPv4 client), else as it is.
pub fn canonical_peer(peer: IpAddr) -> IpAddr {
    peer.to_canonical()
}

/// A boxed future, what [`Provisioning`]'s asynchronous methods return (a trait object's
/// methods cannot be `async fn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What netboot asks the agent for imaging. Implementations must be cheap (they run per
/// request) and must never log tokens. `peer` is the address the request came from (IPv4 for
/// IPv4 clients, see [`canonical_peer`]): a token is only handed to, and only accepted from,
/// its machine's reserved address.
pub trait Provisioning: Send + Sync + 'static {
    /// What `machine`'s iPXE script does now, for a request from `peer`. `head`: a HEAD
    /// request, which must not change any state (no token is minted; the answer is only used
    /// for its headers). A refusal is answered 403.
    fn boot_action(
        &self,
        machine: &Machine,
        peer: IpAddr,
        head: bool,
    ) -> Result<BootAction, Refusal>;

    /// A report from stage2 on `machine`, sent from `peer`, authenticated by `token`.
    fn report(
        &self,
        machine: &Machine,
        peer: IpAddr,
        token: &str,
        report: ProgressReport,
    ) -> Result<(), Refusal>;

    /// A cloud-init NoCloud file for the holder of `token`, asked for from `peer`.
    /// Asynchronous: user-data may need the cluster (a kubeadm bootstrap token) before it can
    /// be rendered.
    fn cloud_init<'a>(
        &'a self,
        peer: IpAddr,
        token: &'a str,
        file: CloudInitFile,
    ) -> BoxFuture<'a, Result<CloudInitDocument, Refusal>>;
}

/// No imaging: every script is the configured one, reports and cloud-init are refused.
pub struct NoProvisioning;

impl Provisioning for NoProvisioning {
    fn boot_action(&self, _: &Machine, _: IpAddr, _: bool) -> Result<BootAction, Refusal> {
        Ok(BootAction::Configured)
    }
    fn report(&self, _: &Machine, _: IpAddr, _: &str, _: ProgressReport) -> Result<(), Refusal> {
        Err(Refusal::NotEnabled)
    }
    fn cloud_init<'a>(
        &'a self,
        _: IpAddr,
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
