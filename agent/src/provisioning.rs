//! Imaging decisions for netboot's HTTP server: which script a machine gets, stage2's reports
//! and the cloud-init NoCloud files, all keyed on the machine's phase and its current token in
//! the [`StatusStore`].
//!
//! | phase | iPXE script |
//! |---|---|
//! | Pending, PXEBooting, Imaging, Failed | stage2 with imaging orders and the token of this DHCP cycle (a machine that boots again mid-imaging, or after a failure, starts over with a fresh one) |
//! | Imaged, Joining, Ready | the local disk (`boot.localBoot`) |
//!
//! The imaging script, and with it the token, is given only to a request from the machine's
//! reserved address within `image.tokenWindow` after netboot acknowledged its DHCP lease (in
//! proxy mode: after netboot's ProxyDHCP answer to its iPXE);
//! reports and cloud-init fetches are accepted only from that address ([`StatusStore`] keeps
//! these rules). Anything else is refused (403) with the reason.
//!
//! A Machine's own `spec.image` replaces the configured `image:` for it, and its
//! `spec.rootDevice` becomes stage2's disk hints. Without either image a machine gets the
//! configured kernel as before imaging existed.
//!
//! User-data is the node cloud-config of [`crate::cloudinit`]: host name, SSH keys and hooks
//! from `cloudInit:`, a `joining` report back to `POST /report/{mac}` with the machine's token,
//! and, with the cluster inventory, the kubeadm join: its parameters come from the
//! [`JoinSource`] (a bootstrap token Secret per provisioning) before the one fetch is spent.
//! When they cannot be had (API server down, 403) the answer is 503, the token stays unspent
//! and cloud-init retries. With the folder inventory ([`NoJoin`]) the document says the node
//! joins no cluster.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use netboot::provisioning::{
    BootAction, BoxFuture, CloudInitDocument, CloudInitFile, DiskHints, ImagingOrders, LocalBoot,
    ProgressReport, Provisioning, Refusal, Token,
};
use netboot::{Machine, MachineLookup};

use crate::cloudinit::{self, Hooks, NodeUserData};
use crate::cluster::join::{JoinSource, NoJoin};
use crate::config::Image;
use crate::machines::Table;
use crate::status::{MachineStatus, Phase, Report, StatusStore};

/// What every node's user-data gets besides its own name and address.
#[derive(Debug, Clone)]
pub struct NodeCloudInit {
    /// `cloudInit:` of the configuration.
    pub hooks: Hooks,
    /// netboot's base URL as machines reach it (`http://10.77.0.1`): reports go to
    /// `{base_url}/report/{mac}`.
    pub base_url: String,
}

pub struct Imaging {
    store: Arc<StatusStore>,
    table: Arc<Table>,
    image: Option<Image>,
    local_boot: LocalBoot,
    /// `None` until [`Imaging::with_cloud_init`]: user-data is then refused.
    cloud_init: Option<NodeCloudInit>,
    /// See [`Imaging::with_external_cni`].
    external_cni: bool,
    /// Where user-data's kubeadm join parameters come from ([`NoJoin`] until
    /// [`Imaging::with_join`]).
    join: Arc<dyn JoinSource>,
    /// How long after a machine's DHCP ACK its imaging script (and token) may be fetched.
    token_window: Duration,
}

/// `image.tokenWindow` when not configured: iPXE asks for its script seconds after its DHCP
/// ACK, even under emulation; minutes leave room for slow firmware without leaving the window
/// open for long.
pub const DEFAULT_TOKEN_WINDOW: Duration = Duration::from_secs(300);

/// How long user-data waits for the join parameters before answering 503: cloud-init then
/// retries rather than hanging on a request the API server does not answer.
const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

impl Imaging {
    pub fn new(
        store: Arc<StatusStore>,
        table: Arc<Table>,
        image: Option<Image>,
        local_boot: LocalBoot,
    ) -> Imaging {
        Imaging {
            store,
            table,
            image,
            local_boot,
            cloud_init: None,
            external_cni: false,
            join: Arc::new(NoJoin),
            token_window: DEFAULT_TOKEN_WINDOW,
        }
    }

    /// Sets how long after a machine's DHCP ACK its imaging script may be fetched.
    pub fn with_token_window(mut self, window: Duration) -> Imaging {
        self.token_window = window;
        self
    }

    /// Sets where user-data's kubeadm join parameters come from.
    pub fn with_join(mut self, join: Arc<dyn JoinSource>) -> Imaging {
        self.join = join;
        self
    }

    /// Sets what node user-data is rendered with.
    pub fn with_cloud_init(mut self, cloud_init: NodeCloudInit) -> Imaging {
        self.cloud_init = Some(cloud_init);
        self
    }

    /// The cluster's pod network comes from a CNI manifest (`laptop.cniManifest`): node
    /// user-data turns the image's own bridge pod network off.
    pub fn with_external_cni(mut self, external_cni: bool) -> Imaging {
        self.external_cni = external_cni;
        self
    }

    /// The image `name` is imaged with: its Machine's own, else the configured one.
    fn image_for(&self, name: &str) -> Option<Image> {
        self.table
            .imaging_of(name)
            .and_then(|i| i.image)
            .or_else(|| self.image.clone())
    }

    /// Whether any machine may be imaged (reports and cloud-init are refused otherwise).
    fn enabled(&self) -> bool {
        self.image.is_some() || self.table.any_own_image()
    }

    /// The orders for `token`; `None` (logged) if the token or the sha256 does not have the
    /// shape stage2 takes, which the store's tokens and a checked config or Machine always have.
    fn orders(image: &Image, disk: DiskHints, token: &str) -> Option<ImagingOrders> {
        let (Some(token), Some(sha256)) = (
            Token::parse(token),
            wire::orders::parse_sha256(&image.sha256),
        ) else {
            tracing::error!("no imaging orders: malformed token or image sha256");
            return None;
        };
        Some(ImagingOrders {
            token,
            image_url: image.url.clone(),
            sha256,
            image_size: image.size,
            disk,
        })
    }

    fn hostname(&self, status: &MachineStatus) -> String {
        self.table
            .by_mac(&status.mac)
            .map(|m| m.hostname().to_string())
            .unwrap_or_else(|| status.name.clone())
    }
}

/// A stable cloud-init instance id per provisioning: a new token (a new imaging) makes a new
/// instance, so cloud-init runs again on a reimaged disk. Derived from the token's hash, not
/// the token.
fn instance_id(name: &str, token: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("instance-id:{token}").as_bytes());
    format!("{name}-{}", &hex::encode(digest)[..16])
}

impl Imaging {
    /// The node cloud-config for the holder of `token`, rendered before the token's one
    /// user-data fetch is spent, so that a rendering failure leaves it unspent. The join
    /// parameters are asked for only once the fetch is allowed (imaged, not yet served); when
    /// they cannot be had the answer is [`Refusal::Unavailable`] (503, retried by cloud-init).
    async fn user_data(&self, peer: IpAddr, token: &str) -> Result<CloudInitDocument, Refusal> {
        let status = self.store.check_user_data(token, peer)?;
        let Some(settings) = &self.cloud_init else {
            return Err(self.render_failed(&status, "no cloud-init settings".to_string()));
        };
        let join =
            match tokio::time::timeout(JOIN_TIMEOUT, self.join.join_params(&status.name)).await {
                Ok(Ok(join)) => join,
                Ok(Err(e)) => return Err(self.join_unavailable(&status, e.to_string())),
                Err(_) => {
                    return Err(self.join_unavailable(
                        &status,
                        format!("no answer within {} s", JOIN_TIMEOUT.as_secs()),
                    ))
                }
            };
        let hostname = self.hostname(&status);
        let report_url = format!(
            "{}/report/{}",
            settings.base_url.trim_end_matches('/'),
            status.mac.to_hyphenated()
        );
        let text = cloudinit::render_node_user_data(&NodeUserData {
            machine: &status.name,
            hostname: &hostname,
            node_ip: status.ip,
            report_url: &report_url,
            report_token: token,
            hooks: &settings.hooks,
            join: join.as_ref(),
            external_cni: self.external_cni,
        })
        .map_err(|e| self.render_failed(&status, e.to_string()))?;
        let status = self.store.take_user_data(token, peer)?;
        if let Some(join) = &join {
            // The token id names the Secret; the token secret is never logged.
            let token_id = join.token.split('.').next().unwrap_or_default();
            tracing::info!(machine = %status.name, mac = %status.mac, ip = %status.ip, api_endpoint = %join.api_endpoint, token_id, "user-data with kubeadm join served");
        }
        Ok(CloudInitDocument {
            machine: status.name,
            text,
        })
    }

    fn meta_data(&self, peer: IpAddr, token: &str) -> Result<CloudInitDocument, Refusal> {
        let status = self.store.token_holder(token, peer)?;
        let text = cloudinit::render_meta_data(&instance_id(&status.name, token), &self.hostname(&status))
            .map_err(|e| {
                tracing::error!(machine = %status.name, mac = %status.mac, ip = %status.ip, error = %e, "cannot render meta-data");
                Refusal::NoDocument {
                    machine: status.name.clone(),
                }
            })?;
        Ok(CloudInitDocument {
            machine: status.name,
            text,
        })
    }

    /// A document that cannot be rendered: the machine fails (its configuration must change).
    fn render_failed(&self, status: &MachineStatus, reason: String) -> Refusal {
        tracing::error!(machine = %status.name, mac = %status.mac, ip = %status.ip, error = %reason, "cannot render user-data");
        let _ = self.store.report(
            &status.name,
            Report::Failed {
                message: format!("cannot render user-data: {reason}"),
            },
        );
        Refusal::NoDocument {
            machine: status.name.clone(),
        }
    }

    /// No join parameters now: the machine keeps its phase and its unspent token, and says
    /// why in its message until cloud-init's retry succeeds.
    fn join_unavailable(&self, status: &MachineStatus, reason: String) -> Refusal {
        tracing::error!(machine = %status.name, mac = %status.mac, ip = %status.ip, phase = %status.phase, error = %reason, "no kubeadm join parameters for user-data: answering 503, cloud-init retries");
        self.store.set_message(
            &status.name,
            format!("user-data delayed, no kubeadm join parameters: {reason}"),
        );
        Refusal::Unavailable {
            machine: status.name.clone(),
            reason: format!("no kubeadm join parameters: {reason}"),
        }
    }
}

impl Provisioning for Imaging {
    fn boot_action(
        &self,
        machine: &Machine,
        peer: IpAddr,
        head: bool,
    ) -> Result<BootAction, Refusal> {
        let Some(image) = self.image_for(&machine.name) else {
            return Ok(BootAction::Configured);
        };
        let disk = self
            .table
            .imaging_of(&machine.name)
            .map(|i| i.disk)
            .unwrap_or_default();
        let Some(status) = self.store.get(&machine.name) else {
            // Not in the store yet (the inventory is being reloaded): no token to give.
            return Ok(BootAction::Configured);
        };
        match status.phase {
            Phase::Imaged | Phase::Joining | Phase::Ready => {
                Ok(BootAction::LocalDisk(self.local_boot))
            }
            Phase::Pending | Phase::PxeBooting | Phase::Imaging | Phase::Failed => {
                if head {
                    // Same checks as a GET; same length as a real token, so HEAD's
                    // Content-Length matches a GET's; nothing is minted and nothing changes.
                    self.store
                        .check_imaging_script(machine, peer, self.token_window)?;
                    return Ok(Self::orders(&image, disk, &"0".repeat(64))
                        .map_or(BootAction::Configured, BootAction::Image));
                }
                let token = self.store.imaging_token(machine, peer, self.token_window)?;
                Ok(Self::orders(&image, disk, &token)
                    .map_or(BootAction::Configured, BootAction::Image))
            }
        }
    }

    fn report(
        &self,
        machine: &Machine,
        peer: IpAddr,
        token: &str,
        report: ProgressReport,
    ) -> Result<(), Refusal> {
        if self.image_for(&machine.name).is_none() {
            return Err(Refusal::NotEnabled);
        }
        self.store
            .imaging_report(&machine.name, peer, token, report)
    }

    fn cloud_init<'a>(
        &'a self,
        peer: IpAddr,
        token: &'a str,
        file: CloudInitFile,
    ) -> BoxFuture<'a, Result<CloudInitDocument, Refusal>> {
        Box::pin(async move {
            if !self.enabled() {
                return Err(Refusal::NotEnabled);
            }
            match file {
                CloudInitFile::MetaData => self.meta_data(peer, token),
                CloudInitFile::UserData => self.user_data(peer, token).await,
                CloudInitFile::VendorData => {
                    let status = self.store.token_holder(token, peer)?;
                    Err(Refusal::NoDocument {
                        machine: status.name,
                    })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    use netboot::{BootEvent, MacAddr};

    /// node2's reserved address, where its requests come from.
    const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2));
    /// Another host on the provisioning LAN.
    const INTRUDER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 50));

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn node2() -> Machine {
        Machine {
            name: "node2".into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 2]),
            ip: Ipv4Addr::new(10, 77, 0, 2),
            hostname: Some("n2".into()),
        }
    }

    fn setup(state_file: Option<std::path::PathBuf>) -> (Arc<StatusStore>, Imaging) {
        let store = StatusStore::open(state_file);
        let table = Arc::new(Table::with_status(store.clone()));
        let m = node2();
        table.replace(HashMap::from([(m.mac, m)]));
        let image = Image {
            url: "http://10.77.0.1:8080/node.raw".into(),
            sha256: HASH.to_uppercase(),
            size: Some(4096),
        };
        let imaging = Imaging::new(store.clone(), table, Some(image), LocalBoot::Auto)
            .with_cloud_init(NodeCloudInit {
                hooks: Hooks::default(),
                base_url: "http://10.77.0.1/".into(),
            });
        (store, imaging)
    }

    fn phase(store: &StatusStore) -> Phase {
        store.get("node2").map(|s| s.phase).expect("node2")
    }

    /// The machine boots from the network: a DHCP ACK (a new cycle), then its script request
    /// from its reserved address.
    fn pxe_boot(store: &StatusStore, p: &Imaging, m: &Machine) -> BootAction {
        store.observe(m, &BootEvent::DhcpAcked);
        p.boot_action(m, PEER, false).expect("script served")
    }

    fn token_of(action: BootAction) -> String {
        match action {
            BootAction::Image(orders) => {
                assert_eq!(hex::encode(orders.sha256), HASH);
                assert_eq!(orders.image_size, Some(4096));
                orders.token.expose().to_owned()
            }
            other => panic!("expected imaging, got {other:?}"),
        }
    }

    fn imaging(progress: u8) -> ProgressReport {
        ProgressReport::Imaging {
            progress,
            bytes: None,
            rate: Some(100 << 20),
            message: None,
        }
    }

    #[test]
    fn phases_follow_script_and_reports() {
        let (store, p) = setup(None);
        let m = node2();
        assert_eq!(phase(&store), Phase::Pending);
        store.observe(&m, &BootEvent::DhcpAcked);
        // HEAD mints nothing and changes nothing.
        let head = p.boot_action(&m, PEER, true);
        assert!(matches!(head, Ok(BootAction::Image(_))));
        assert_eq!(
            phase(&store),
            Phase::PxeBooting,
            "the ACK moved it, not the HEAD"
        );

        let token = token_of(p.boot_action(&m, PEER, false).expect("script"));
        assert_eq!(token.len(), 64);
        assert_eq!(phase(&store), Phase::PxeBooting);

        let mut seen = vec![phase(&store)];
        for progress in [10, 55, 100] {
            p.report(&m, PEER, &token, imaging(progress))
                .expect("accepted");
            let s = store.get("node2").expect("node2");
            assert_eq!((s.phase, s.progress), (Phase::Imaging, progress));
            assert_eq!(s.message, "writing the image, 100.0 MiB/s");
            seen.push(s.phase);
        }
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("accepted");
        seen.push(phase(&store));
        seen.dedup();
        assert_eq!(seen, [Phase::PxeBooting, Phase::Imaging, Phase::Imaged]);
        // A repeated imaged is fine (stage2 retrying a lost answer), going back is not.
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("idempotent");
        assert!(matches!(
            p.report(&m, PEER, &token, imaging(5)),
            Err(Refusal::WrongPhase { .. })
        ));

        // Imaged: the next PXE boot gets the local disk, and no new token.
        assert_eq!(
            pxe_boot(&store, &p, &m),
            BootAction::LocalDisk(LocalBoot::Auto)
        );
        assert_eq!(phase(&store), Phase::Imaged);
    }

    #[tokio::test]
    async fn wrong_and_old_tokens_are_refused() {
        let (store, p) = setup(None);
        let m = node2();
        let first = token_of(pxe_boot(&store, &p, &m));
        let wrong = "f".repeat(64);
        assert_eq!(
            p.report(&m, PEER, &wrong, imaging(1)),
            Err(Refusal::WrongToken {
                machine: Some("node2".into())
            })
        );
        // The machine boots again: a new token, the old one stops working.
        let second = token_of(pxe_boot(&store, &p, &m));
        assert_ne!(first, second);
        assert!(p.report(&m, PEER, &first, imaging(1)).is_err());
        p.report(&m, PEER, &second, imaging(1))
            .expect("current token");
        assert_eq!(phase(&store), Phase::Imaging);
        assert_eq!(
            p.cloud_init(PEER, &first, CloudInitFile::MetaData).await,
            Err(Refusal::WrongToken { machine: None })
        );
    }

    #[tokio::test]
    async fn user_data_is_served_once_after_imaging() {
        let (store, p) = setup(None);
        let m = node2();
        let token = token_of(pxe_boot(&store, &p, &m));
        assert!(
            matches!(
                p.cloud_init(PEER, &token, CloudInitFile::UserData).await,
                Err(Refusal::WrongPhase { .. })
            ),
            "not before the disk is imaged"
        );
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("accepted");
        let meta = p
            .cloud_init(PEER, &token, CloudInitFile::MetaData)
            .await
            .expect("meta-data");
        assert!(
            meta.text.starts_with("instance-id: \"node2-"),
            "{}",
            meta.text
        );
        assert!(
            meta.text.contains("local-hostname: \"n2\"\n"),
            "{}",
            meta.text
        );
        assert!(!meta.text.contains(&token));
        let doc = p
            .cloud_init(PEER, &token, CloudInitFile::UserData)
            .await
            .expect("first fetch");
        assert_eq!(doc.machine, "node2");
        assert!(doc.text.starts_with("#cloud-config\n"), "{}", doc.text);
        assert!(doc.text.contains("\nhostname: \"n2\"\n"), "{}", doc.text);
        assert!(
            doc.text
                .contains("content: \"http://10.77.0.1/report/52-54-00-00-00-02\"\n"),
            "{}",
            doc.text
        );
        assert!(doc.text.contains(&format!("content: \"{token}\"\n")));
        assert_eq!(
            p.cloud_init(PEER, &token, CloudInitFile::UserData).await,
            Err(Refusal::Replayed {
                machine: "node2".into()
            })
        );
        let status = store.get("node2").expect("node2");
        assert_eq!(status.phase, Phase::Imaged);
        assert!(status.message.contains("refused"), "{}", status.message);
        assert!(matches!(
            p.cloud_init(PEER, &token, CloudInitFile::VendorData).await,
            Err(Refusal::NoDocument { .. })
        ));
    }

    #[test]
    fn failed_machines_are_imaged_again() {
        let (store, p) = setup(None);
        let m = node2();
        let token = token_of(pxe_boot(&store, &p, &m));
        p.report(
            &m,
            PEER,
            &token,
            ProgressReport::Failed {
                message: "sha256 mismatch".into(),
            },
        )
        .expect("accepted");
        let s = store.get("node2").expect("node2");
        assert_eq!(
            (s.phase, s.message.as_str()),
            (Phase::Failed, "sha256 mismatch")
        );
        let retry = token_of(pxe_boot(&store, &p, &m));
        assert_ne!(retry, token);
        assert_eq!(phase(&store), Phase::PxeBooting);
    }

    #[tokio::test]
    async fn reimage_requests_start_over() {
        let (store, p) = setup(None);
        let m = node2();
        let requests = |v: &str| HashMap::from([("node2".to_string(), v.to_string())]);
        // Seen first on a pending machine: recorded, nothing to undo.
        store.sync_reimage(&requests("1"));
        assert_eq!(phase(&store), Phase::Pending);
        let token = token_of(pxe_boot(&store, &p, &m));
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("accepted");
        store.sync_reimage(&requests("1"));
        assert_eq!(phase(&store), Phase::Imaged, "same value: nothing to do");
        store.sync_reimage(&HashMap::new());
        assert_eq!(phase(&store), Phase::Imaged, "value gone: nothing to do");

        store.sync_reimage(&requests("2"));
        let s = store.get("node2").expect("node2");
        assert_eq!(s.phase, Phase::Pending);
        assert!(s.message.contains("reimage"), "{}", s.message);
        assert!(
            p.cloud_init(PEER, &token, CloudInitFile::MetaData)
                .await
                .is_err(),
            "the old token is dead"
        );
        let again = token_of(pxe_boot(&store, &p, &m));
        assert_ne!(again, token);
        assert_eq!(phase(&store), Phase::PxeBooting);
    }

    #[tokio::test]
    async fn a_restart_keeps_accepting_the_current_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.yaml");
        let m = node2();
        let token = {
            let (store, p) = setup(Some(path.clone()));
            let shutdown = tokio_util::sync::CancellationToken::new();
            let writer = tokio::spawn(store.clone().persist(shutdown.clone()));
            store.sync_reimage(&HashMap::from([("node2".to_string(), "7".to_string())]));
            let token = token_of(pxe_boot(&store, &p, &m));
            p.report(&m, PEER, &token, imaging(30)).expect("accepted");
            shutdown.cancel();
            writer.await.expect("writer");
            token
        };
        let text = std::fs::read_to_string(&path).expect("state file");
        assert!(!text.contains(&token), "the token itself is never stored");
        assert!(text.contains("tokenSha256:"), "{text}");

        let (store, p) = setup(Some(path));
        assert_eq!(phase(&store), Phase::Imaging);
        assert!(
            matches!(
                p.boot_action(&m, PEER, false),
                Err(Refusal::NoRecentLease { .. })
            ),
            "DHCP cycles are not restored: the machine must boot from the network again"
        );
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("token accepted after the restart");
        store.sync_reimage(&HashMap::from([("node2".to_string(), "7".to_string())]));
        assert_eq!(
            phase(&store),
            Phase::Imaged,
            "reimage value restored: no reimage"
        );
    }

    #[test]
    fn without_an_image_nothing_is_imaged() {
        let store = StatusStore::open(None);
        let table = Arc::new(Table::with_status(store.clone()));
        let m = node2();
        table.replace(HashMap::from([(m.mac, m.clone())]));
        let p = Imaging::new(store.clone(), table, None, LocalBoot::Auto);
        assert_eq!(
            p.boot_action(&m, INTRUDER, false),
            Ok(BootAction::Configured)
        );
        assert_eq!(
            p.report(&m, PEER, &"0".repeat(64), imaging(1)),
            Err(Refusal::NotEnabled)
        );
        assert_eq!(phase(&store), Phase::Pending);
    }

    #[test]
    fn a_token_only_for_the_reservation_after_a_recent_dhcp_ack() {
        let (store, p) = setup(None);
        let m = node2();
        // No DHCP ACK yet: nothing, from anywhere, and no phase change.
        assert_eq!(
            p.boot_action(&m, PEER, false),
            Err(Refusal::NoRecentLease {
                machine: "node2".into(),
                window_secs: DEFAULT_TOKEN_WINDOW.as_secs()
            })
        );
        store.observe(&m, &BootEvent::DhcpAcked);
        // After the ACK, another host on the LAN still gets nothing (GET or HEAD).
        for head in [false, true] {
            assert_eq!(
                p.boot_action(&m, INTRUDER, head),
                Err(Refusal::WrongPeer {
                    machine: "node2".into(),
                    peer: INTRUDER
                })
            );
        }
        assert_eq!(store.provisioning_id("node2"), None, "nothing minted");
        // The machine itself does; an IPv4-mapped IPv6 peer is the same address.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 77, 0, 2).to_ipv6_mapped());
        let token = token_of(p.boot_action(&m, mapped, false).expect("script"));
        assert_eq!(phase(&store), Phase::PxeBooting);
        // Once the window after the ACK is over, not even the machine gets its script.
        let later = Instant::now() + DEFAULT_TOKEN_WINDOW + Duration::from_secs(1);
        assert!(matches!(
            store.imaging_token_at(&m, PEER, DEFAULT_TOKEN_WINDOW, later),
            Err(Refusal::NoRecentLease { .. })
        ));
        // The token given keeps working.
        p.report(&m, PEER, &token, imaging(5)).expect("accepted");
        // A window of its own: configurable.
        let short = Imaging::new(
            store.clone(),
            Arc::new(Table::with_status(store.clone())),
            p.image.clone(),
            LocalBoot::Auto,
        )
        .with_token_window(Duration::from_secs(0));
        std::thread::sleep(Duration::from_millis(20));
        assert!(matches!(
            short.boot_action(&m, PEER, false),
            Err(Refusal::NoRecentLease { window_secs: 0, .. })
        ));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(matches!(
            p.boot_action(&m, v6, false),
            Err(Refusal::WrongPeer { .. })
        ));
    }

    #[test]
    fn in_proxy_mode_the_answer_to_ipxe_opens_the_window() {
        let (store, p) = setup(None);
        let m = node2();
        // The proxy offer to the firmware (PXE, HTTP Boot) names a loader, not the script: it
        // marks the machine as booting and opens nothing.
        store.observe(&m, &BootEvent::ProxyOffered);
        assert_eq!(phase(&store), Phase::PxeBooting);
        assert!(matches!(
            p.boot_action(&m, PEER, false),
            Err(Refusal::NoRecentLease { .. })
        ));
        // The proxy answer to its iPXE, which names the script URL, opens it as an ACK does;
        // the address rule stays: only the reservation gets the script.
        store.observe(&m, &BootEvent::ProxyScriptOffered);
        assert!(matches!(
            p.boot_action(&m, INTRUDER, false),
            Err(Refusal::WrongPeer { .. })
        ));
        let token = token_of(p.boot_action(&m, PEER, false).expect("script"));
        let later = Instant::now() + DEFAULT_TOKEN_WINDOW + Duration::from_secs(1);
        assert!(matches!(
            store.imaging_token_at(&m, PEER, DEFAULT_TOKEN_WINDOW, later),
            Err(Refusal::NoRecentLease { .. })
        ));
        p.report(&m, PEER, &token, imaging(5)).expect("accepted");
        // The next network boot's answer to iPXE is a new cycle: a new token.
        store.observe(&m, &BootEvent::ProxyScriptOffered);
        let next = token_of(p.boot_action(&m, PEER, false).expect("script"));
        assert_ne!(next, token);
    }

    #[test]
    fn a_live_token_is_only_replaced_by_a_new_dhcp_cycle() {
        let (store, p) = setup(None);
        let m = node2();
        let token = token_of(pxe_boot(&store, &p, &m));
        // iPXE asks again in the same cycle: the same token, nothing changes.
        let again = token_of(p.boot_action(&m, PEER, false).expect("script"));
        assert_eq!(again, token);
        p.report(&m, PEER, &token, imaging(10))
            .expect("stage2's token works");
        // Another host asks: refused, the live token untouched.
        assert!(p.boot_action(&m, INTRUDER, false).is_err());
        // stage2's own DHCP is a new cycle: the token keeps working until a script is
        // requested in that cycle.
        store.observe(&m, &BootEvent::DhcpAcked);
        p.report(&m, PEER, &token, imaging(20))
            .expect("still accepted");
        assert_eq!(phase(&store), Phase::Imaging);
        // The machine boots from the network again: a new token, the old one is dead.
        let next = token_of(p.boot_action(&m, PEER, false).expect("script"));
        assert_ne!(next, token);
        assert!(matches!(
            p.report(&m, PEER, &token, imaging(30)),
            Err(Refusal::WrongToken { .. })
        ));
        assert_eq!(phase(&store), Phase::PxeBooting, "starts over");
        // And in that cycle it is the one given again.
        assert_eq!(
            token_of(p.boot_action(&m, PEER, false).expect("script")),
            next
        );
    }

    #[test]
    fn a_reimage_replaces_the_token_within_a_cycle() {
        let (store, p) = setup(None);
        let m = node2();
        let token = token_of(pxe_boot(&store, &p, &m));
        store.sync_reimage(&HashMap::from([("node2".to_string(), "2".to_string())]));
        assert_eq!(phase(&store), Phase::Pending);
        let fresh = token_of(p.boot_action(&m, PEER, false).expect("script"));
        assert_ne!(
            fresh, token,
            "the reimage's new provisioning, not the old token"
        );
        assert!(p.report(&m, PEER, &token, imaging(1)).is_err());
        p.report(&m, PEER, &fresh, imaging(1)).expect("new token");
    }

    #[tokio::test]
    async fn reports_and_cloud_init_only_from_the_reservation() {
        let (store, p) = setup(None);
        let m = node2();
        let token = token_of(pxe_boot(&store, &p, &m));
        // A stolen token used from another host: refused, nothing recorded.
        let wrong_peer = Err(Refusal::WrongPeer {
            machine: "node2".into(),
            peer: INTRUDER,
        });
        assert_eq!(
            p.report(
                &m,
                INTRUDER,
                &token,
                ProgressReport::Imaged { message: None }
            ),
            wrong_peer
        );
        assert_eq!(phase(&store), Phase::PxeBooting);
        p.report(&m, PEER, &token, ProgressReport::Imaged { message: None })
            .expect("from the machine");
        for file in [
            CloudInitFile::MetaData,
            CloudInitFile::UserData,
            CloudInitFile::VendorData,
        ] {
            let refused = p.cloud_init(INTRUDER, &token, file).await;
            assert_eq!(
                refused.map(|d| d.text),
                wrong_peer.clone().map(|()| String::new())
            );
        }
        let status = store.get("node2").expect("node2");
        assert_eq!(status.user_data_replayed_usec, 0, "not counted as a replay");
        // The machine still gets its one user-data.
        p.cloud_init(PEER, &token, CloudInitFile::UserData)
            .await
            .expect("served to the machine");
        assert!(matches!(
            p.cloud_init(PEER, &token, CloudInitFile::UserData).await,
            Err(Refusal::Replayed { .. })
        ));
    }

    /// A Machine's own spec.image replaces the configured image for it, and its rootDevice
    /// hints reach stage2's orders; another machine keeps the configured image.
    #[test]
    fn a_machines_own_image_and_disk_hints_reach_its_orders() {
        use crate::machines::ImagingSpec;
        let store = StatusStore::open(None);
        let table = Arc::new(Table::with_status(store.clone()));
        let n2 = node2();
        let n3 = Machine {
            name: "node3".into(),
            mac: MacAddr([0x52, 0x54, 0, 0, 0, 3]),
            ip: Ipv4Addr::new(10, 77, 0, 3),
            hostname: None,
        };
        table.replace(HashMap::from([(n2.mac, n2.clone()), (n3.mac, n3.clone())]));
        let own = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let hints = DiskHints {
            serial: Some("DISK-B".into()),
            min_size: Some(1 << 30),
            ..DiskHints::default()
        };
        table.set_imaging(HashMap::from([(
            "node3".to_string(),
            ImagingSpec {
                image: Some(Image {
                    url: "http://10.77.0.1:8080/own.raw.zst".into(),
                    sha256: own.into(),
                    size: Some(8192),
                }),
                disk: hints.clone(),
            },
        )]));
        let global = Image {
            url: "http://10.77.0.1:8080/node.raw".into(),
            sha256: HASH.into(),
            size: Some(4096),
        };
        let p = Imaging::new(store.clone(), table.clone(), Some(global), LocalBoot::Auto);
        let n3_peer = IpAddr::V4(n3.ip);
        store.observe(&n3, &BootEvent::DhcpAcked);
        match p.boot_action(&n3, n3_peer, false).expect("script") {
            BootAction::Image(orders) => {
                assert_eq!(orders.image_url, "http://10.77.0.1:8080/own.raw.zst");
                assert_eq!(hex::encode(orders.sha256), own);
                assert_eq!(orders.image_size, Some(8192));
                assert_eq!(orders.disk, hints);
                let args = orders.kernel_args("http://10.77.0.1").expect("args");
                assert!(args.contains("provisioner.disk.serial=DISK-B"), "{args}");
            }
            other => panic!("expected imaging, got {other:?}"),
        }
        store.observe(&n2, &BootEvent::DhcpAcked);
        match p.boot_action(&n2, PEER, false).expect("script") {
            BootAction::Image(orders) => {
                assert_eq!(orders.image_url, "http://10.77.0.1:8080/node.raw");
                assert_eq!(orders.disk, DiskHints::default());
            }
            other => panic!("expected imaging, got {other:?}"),
        }

        // Without a configured image, only the machine with its own is imaged.
        let p = Imaging::new(store.clone(), table, None, LocalBoot::Auto);
        assert!(matches!(
            p.boot_action(&n3, n3_peer, false),
            Ok(BootAction::Image(_))
        ));
        assert_eq!(p.boot_action(&n2, PEER, false), Ok(BootAction::Configured));
        assert_eq!(
            p.report(&n2, PEER, "x", imaging(5)),
            Err(Refusal::NotEnabled)
        );
    }
}
