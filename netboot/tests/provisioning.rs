//! The imaging routes of the HTTP server on 127.0.0.1 with a scripted [`Provisioning`]: what
//! reaches the agent, and which status each refusal gets. The token logic itself (minting,
//! single use, phases) is the agent's and is tested there.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use netboot::http::{serve, DirSite, HttpSettings, NetbootSite, ServeOptions};
use netboot::ipxe::ScriptSettings;
use netboot::provisioning::{
    BootAction, BoxFuture, CloudInitDocument, CloudInitFile, DiskHints, ImagingOrders, LocalBoot,
    ProgressReport, Provisioning, Refusal, Token,
};
use netboot::{MacAddr, Machine, MachineLookup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const MAC: MacAddr = MacAddr([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
const TOKEN: &str = "0123456789abcdef0123456789abcdef";
const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Answers as an agent would for one machine, and records what it was asked.
struct Fake {
    action: Mutex<BootAction>,
    heads: Mutex<u32>,
    reports: Mutex<Vec<ProgressReport>>,
    user_data_served: Mutex<bool>,
    /// user-data cannot be made now (the cluster does not answer).
    unavailable: Mutex<bool>,
    /// The machine's reserved address as far as this agent is concerned: requests from
    /// elsewhere are refused.
    reserved: Mutex<IpAddr>,
    /// No DHCP lease acknowledged lately: no imaging script.
    no_lease: Mutex<bool>,
    /// The peer address of every request the agent was asked about.
    peers: Mutex<Vec<IpAddr>>,
}

impl Fake {
    fn check_peer(&self, peer: IpAddr) -> Result<(), Refusal> {
        self.peers.lock().expect("lock").push(peer);
        if peer != *self.reserved.lock().expect("lock") {
            return Err(Refusal::WrongPeer {
                machine: "node2".into(),
                peer,
            });
        }
        Ok(())
    }

    fn document(
        &self,
        peer: IpAddr,
        token: &str,
        file: CloudInitFile,
    ) -> Result<CloudInitDocument, Refusal> {
        if token != TOKEN {
            return Err(Refusal::WrongToken { machine: None });
        }
        self.check_peer(peer)?;
        let machine = "node2".to_string();
        match file {
            CloudInitFile::UserData => {
                if *self.unavailable.lock().expect("lock") {
                    return Err(Refusal::Unavailable {
                        machine,
                        reason: "no join parameters: API server unreachable".into(),
                    });
                }
                let mut served = self.user_data_served.lock().expect("lock");
                if *served {
                    return Err(Refusal::Replayed { machine });
                }
                *served = true;
                Ok(CloudInitDocument {
                    machine,
                    text: "#cloud-config\nhostname: node2\n".into(),
                })
            }
            CloudInitFile::MetaData => Ok(CloudInitDocument {
                machine,
                text: "instance-id: i-1\n".into(),
            }),
            CloudInitFile::VendorData => Err(Refusal::NoDocument { machine }),
        }
    }
}

impl Provisioning for Fake {
    fn boot_action(
        &self,
        machine: &Machine,
        peer: IpAddr,
        head: bool,
    ) -> Result<BootAction, Refusal> {
        if head {
            *self.heads.lock().expect("lock") += 1;
        }
        self.check_peer(peer)?;
        if *self.no_lease.lock().expect("lock") {
            return Err(Refusal::NoRecentLease {
                machine: machine.name.clone(),
                window_secs: 300,
            });
        }
        Ok(self.action.lock().expect("lock").clone())
    }

    fn report(
        &self,
        machine: &Machine,
        peer: IpAddr,
        token: &str,
        report: ProgressReport,
    ) -> Result<(), Refusal> {
        self.check_peer(peer)?;
        if token != TOKEN {
            return Err(Refusal::WrongToken {
                machine: Some(machine.name.clone()),
            });
        }
        self.reports.lock().expect("lock").push(report);
        Ok(())
    }

    fn cloud_init<'a>(
        &'a self,
        peer: IpAddr,
        token: &'a str,
        file: CloudInitFile,
    ) -> BoxFuture<'a, Result<CloudInitDocument, Refusal>> {
        Box::pin(std::future::ready(self.document(peer, token, file)))
    }
}

fn orders() -> ImagingOrders {
    ImagingOrders {
        token: Token::parse(TOKEN).expect("token"),
        image_url: "http://10.77.0.1:8080/node.raw".into(),
        sha256: wire::orders::parse_sha256(HASH).expect("sha256"),
        image_size: Some(4096),
        disk: DiskHints {
            serial: Some("S1".into()),
            ..DiskHints::default()
        },
    }
}

struct Server {
    addr: SocketAddr,
    fake: Arc<Fake>,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(action: BootAction) -> Server {
    start_on("127.0.0.1:0", action).await
}

async fn start_on(bind: &str, action: BootAction) -> Server {
    let mut machines = HashMap::new();
    machines.insert(
        MAC,
        Machine {
            name: "node2".into(),
            mac: MAC,
            ip: Ipv4Addr::new(10, 77, 0, 20),
            hostname: None,
        },
    );
    let fake = Arc::new(Fake {
        action: Mutex::new(action),
        heads: Mutex::new(0),
        reports: Mutex::new(Vec::new()),
        user_data_served: Mutex::new(false),
        unavailable: Mutex::new(false),
        reserved: Mutex::new(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        no_lease: Mutex::new(false),
        peers: Mutex::new(Vec::new()),
    });
    let listener = TcpListener::bind(bind).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = Arc::new(HttpSettings {
        boot_dir: std::env::temp_dir(),
        assets_dir: std::env::temp_dir(),
        script: ScriptSettings {
            kernel: "vmlinuz".into(),
            initrd: "stage2.img".into(),
            cmdline: "console=ttyS0".into(),
        },
        base_url: "http://10.77.0.1:8080".into(),
    });
    let shutdown = CancellationToken::new();
    let lookup: Arc<dyn MachineLookup> = Arc::new(machines);
    tokio::spawn(serve(
        listener,
        NetbootSite::new(settings, lookup).with_provisioning(fake.clone()),
        ServeOptions {
            grace: Duration::from_secs(1),
            ..ServeOptions::default()
        },
        shutdown.clone(),
    ));
    Server {
        addr,
        fake,
        shutdown,
    }
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Resp {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    let run = async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(&bytes).await.expect("write");
        let mut raw = Vec::new();
        // The server may answer (413) and close before reading everything we sent.
        let _ = s.read_to_end(&mut raw).await;
        raw
    };
    let raw = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("answer in time");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Resp {
        status: head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}")),
        head: head.to_ascii_lowercase(),
        body: body.to_string(),
    }
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

#[tokio::test]
async fn imaging_script_carries_the_orders() {
    let srv = start(BootAction::Image(orders())).await;
    let r = request(srv.addr, "GET", "/ipxe/52-54-00-12-34-56", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        format!(
            "#!ipxe\n# node2 52:54:00:12:34:56\n\
             kernel http://10.77.0.1:8080/assets/vmlinuz initrd=stage2.img console=ttyS0 \
             provisioner.url=http://10.77.0.1:8080 provisioner.token={TOKEN} \
             provisioner.image=http://10.77.0.1:8080/node.raw provisioner.sha256={HASH} \
             provisioner.image_size=4096 provisioner.disk.serial=S1\n\
             initrd http://10.77.0.1:8080/assets/stage2.img\nboot\n"
        )
    );
    let head = request(srv.addr, "HEAD", "/ipxe/52-54-00-12-34-56", &[], b"").await;
    assert_eq!(head.status, 200);
    assert_eq!(
        *srv.fake.heads.lock().expect("lock"),
        1,
        "HEAD asked as HEAD"
    );
}

#[tokio::test]
async fn local_boot_scripts() {
    let srv = start(BootAction::LocalDisk(LocalBoot::Auto)).await;
    let r = request(srv.addr, "GET", "/ipxe/52:54:00:12:34:56", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .contains("iseq ${platform} efi && goto uefi || goto bios\n:uefi\nexit 1\n:bios\nsanboot --no-describe --drive 0x80 || exit 1\n"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("kernel"), "{}", r.body);
    *srv.fake.action.lock().expect("lock") = BootAction::LocalDisk(LocalBoot::Exit);
    let r = request(srv.addr, "GET", "/ipxe/52:54:00:12:34:56", &[], b"").await;
    assert!(
        r.body.ends_with("booting the local disk\nexit 1\n"),
        "{}",
        r.body
    );
    *srv.fake.action.lock().expect("lock") = BootAction::LocalDisk(LocalBoot::Sanboot);
    let r = request(srv.addr, "GET", "/ipxe/52:54:00:12:34:56", &[], b"").await;
    assert!(
        r.body
            .ends_with("booting the local disk\nsanboot --no-describe --drive 0x80 || exit 1\n"),
        "{}",
        r.body
    );
}

#[tokio::test]
async fn reports_reach_the_agent_only_with_the_token() {
    let srv = start(BootAction::Image(orders())).await;
    let path = "/report/52-54-00-12-34-56";
    let good = bearer(TOKEN);
    let ok = request(
        srv.addr,
        "POST",
        path,
        &[&good, "Content-Type: application/json"],
        br#"{"phase":"imaging","progress":10,"rate":1000}"#,
    )
    .await;
    assert_eq!(ok.status, 204, "{}", ok.head);
    let ok = request(srv.addr, "POST", path, &[&good], br#"{"phase":"imaged"}"#).await;
    assert_eq!(ok.status, 204);
    assert_eq!(
        *srv.fake.reports.lock().expect("lock"),
        vec![
            ProgressReport::Imaging {
                progress: 10,
                bytes: None,
                rate: Some(1000),
                message: None
            },
            ProgressReport::Imaged { message: None }
        ]
    );

    let body = br#"{"phase":"imaging","progress":20}"#;
    let none = request(srv.addr, "POST", path, &[], body).await;
    assert_eq!(none.status, 401);
    assert!(
        none.head.contains("www-authenticate: bearer"),
        "{}",
        none.head
    );
    let basic = request(srv.addr, "POST", path, &["Authorization: Basic eDp5"], body).await;
    assert_eq!(basic.status, 401);
    let wrong = bearer("fedcba9876543210fedcba9876543210");
    assert_eq!(
        request(srv.addr, "POST", path, &[&wrong], body)
            .await
            .status,
        403
    );
    for bad in [
        &b"{"[..],
        b"",
        br#"{"phase":"imaging","progress":101}"#,
        br#"{"phase":"rebooting"}"#,
    ] {
        let r = request(srv.addr, "POST", path, &[&good], bad).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    let huge = vec![b' '; 20_000];
    assert_eq!(
        request(srv.addr, "POST", path, &[&good], &huge)
            .await
            .status,
        413
    );
    assert_eq!(
        request(srv.addr, "GET", path, &[&good], b"").await.status,
        405
    );
    let unknown = request(
        srv.addr,
        "POST",
        "/report/52-54-00-00-00-01",
        &[&good],
        body,
    )
    .await;
    assert_eq!(unknown.status, 404);
    let bad_mac = request(srv.addr, "POST", "/report/52-54", &[&good], body).await;
    assert_eq!(bad_mac.status, 400);
    assert_eq!(
        srv.fake.reports.lock().expect("lock").len(),
        2,
        "nothing else got through"
    );
}

#[tokio::test]
async fn nocloud_user_data_is_served_once() {
    let srv = start(BootAction::Image(orders())).await;
    let base = format!("/nocloud/{TOKEN}");
    let meta = request(srv.addr, "GET", &format!("{base}/meta-data"), &[], b"").await;
    assert_eq!(
        (meta.status, meta.body.as_str()),
        (200, "instance-id: i-1\n")
    );
    // The agent cannot make it now: 503 with a retry hint, and the token stays unspent.
    *srv.fake.unavailable.lock().expect("lock") = true;
    let busy = request(srv.addr, "GET", &format!("{base}/user-data"), &[], b"").await;
    assert_eq!(busy.status, 503);
    assert!(busy.head.contains("retry-after: 5"), "{}", busy.head);
    assert!(
        !busy.body.contains("API server"),
        "no internals in the answer"
    );
    *srv.fake.unavailable.lock().expect("lock") = false;
    let first = request(srv.addr, "GET", &format!("{base}/user-data"), &[], b"").await;
    assert_eq!(first.status, 200);
    assert!(first.body.starts_with("#cloud-config\n"), "{}", first.body);
    assert!(first.head.contains("cache-control: no-store"));
    let again = request(srv.addr, "GET", &format!("{base}/user-data"), &[], b"").await;
    assert_eq!(again.status, 403);
    assert_eq!(
        request(srv.addr, "GET", &format!("{base}/vendor-data"), &[], b"")
            .await
            .status,
        404
    );
    assert_eq!(
        request(srv.addr, "GET", &format!("{base}/network-config"), &[], b"")
            .await
            .status,
        404
    );
    assert_eq!(
        request(srv.addr, "HEAD", &format!("{base}/user-data"), &[], b"")
            .await
            .status,
        405
    );
    let wrong = "/nocloud/fedcba9876543210fedcba9876543210/user-data";
    assert_eq!(request(srv.addr, "GET", wrong, &[], b"").await.status, 403);
    assert_eq!(
        request(srv.addr, "GET", "/nocloud/x%2F/user-data", &[], b"")
            .await
            .status,
        403,
        "malformed token"
    );
}

/// Requests from another address than the machine's, or without a recent DHCP lease, are
/// refused with 403 and a reason; the agent sees the client's address.
#[tokio::test]
async fn binding_refusals_are_403_with_a_reason() {
    let srv = start(BootAction::Image(orders())).await;
    // The machine is reserved elsewhere: everything from 127.0.0.1 is someone else.
    *srv.fake.reserved.lock().expect("lock") = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 20));
    let script = request(srv.addr, "GET", "/ipxe/52-54-00-12-34-56", &[], b"").await;
    assert_eq!(script.status, 403);
    assert!(
        script
            .body
            .contains("not come from the machine's reserved address"),
        "{}",
        script.body
    );
    assert!(!script.body.contains(TOKEN));
    assert!(
        !script.body.contains("10.77.0.20"),
        "the answer does not tell the reserved address"
    );
    let report = request(
        srv.addr,
        "POST",
        "/report/52-54-00-12-34-56",
        &[&bearer(TOKEN)],
        br#"{"phase":"imaged"}"#,
    )
    .await;
    assert_eq!(report.status, 403);
    assert!(srv.fake.reports.lock().expect("lock").is_empty());
    let user_data = request(
        srv.addr,
        "GET",
        &format!("/nocloud/{TOKEN}/user-data"),
        &[],
        b"",
    )
    .await;
    assert_eq!(user_data.status, 403);
    assert!(!*srv.fake.user_data_served.lock().expect("lock"));

    // From the right address but with no recent lease: 403, saying so.
    *srv.fake.reserved.lock().expect("lock") = IpAddr::V4(Ipv4Addr::LOCALHOST);
    *srv.fake.no_lease.lock().expect("lock") = true;
    let script = request(srv.addr, "GET", "/ipxe/52-54-00-12-34-56", &[], b"").await;
    assert_eq!(script.status, 403);
    assert!(
        script.body.contains("no recent DHCP lease"),
        "{}",
        script.body
    );
    let peers = srv.fake.peers.lock().expect("lock").clone();
    assert!(
        peers.iter().all(|p| *p == IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "{peers:?}"
    );
    assert_eq!(peers.len(), 4);
}

/// A dual-stack listener (what a `ListenStream=80` socket unit gives) sees IPv4 clients as
/// IPv4-mapped IPv6 addresses; the agent is given the IPv4 address.
#[tokio::test]
async fn ipv4_clients_of_a_dual_stack_listener_are_ipv4_peers() {
    let Ok(probe) = std::net::TcpListener::bind("[::]:0") else {
        eprintln!("no IPv6 on this host: dual-stack listener not tested");
        return;
    };
    drop(probe);
    let srv = start_on("[::]:0", BootAction::Image(orders())).await;
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, srv.addr.port()));
    let r = request(v4, "GET", "/ipxe/52-54-00-12-34-56", &[], b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        *srv.fake.peers.lock().expect("lock"),
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    );
}

#[tokio::test]
async fn dir_site_serves_a_directory() {
    let dir = std::env::temp_dir().join(format!("netboot-files-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
    let image: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(dir.join("sub/node.raw"), &image).expect("write");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(serve(
        listener,
        DirSite::new(dir.clone()),
        ServeOptions {
            grace: Duration::from_secs(1),
            ..ServeOptions::default()
        },
        shutdown.clone(),
    ));
    let whole = request(addr, "GET", "/sub/node.raw", &[], b"").await;
    assert_eq!(whole.status, 200);
    assert!(
        whole.head.contains("content-length: 100000"),
        "{}",
        whole.head
    );
    assert!(whole.head.contains("etag: \""), "{}", whole.head);
    let part = request(addr, "GET", "/sub/node.raw", &["Range: bytes=99990-"], b"").await;
    assert_eq!(part.status, 206);
    assert!(
        part.head
            .contains("content-range: bytes 99990-99999/100000"),
        "{}",
        part.head
    );
    assert_eq!(part.body.as_bytes(), &image[99_990..]);
    assert_eq!(request(addr, "GET", "/", &[], b"").await.status, 404);
    assert_eq!(request(addr, "GET", "/sub/", &[], b"").await.status, 404);
    assert_eq!(
        request(addr, "GET", "/../etc/passwd", &[], b"")
            .await
            .status,
        400
    );
    assert_eq!(
        request(addr, "GET", "/ipxe/52-54-00-12-34-56", &[], b"")
            .await
            .status,
        404
    );
    assert_eq!(
        request(addr, "POST", "/sub/node.raw", &[], b"")
            .await
            .status,
        405
    );
    shutdown.cancel();
    task.await.expect("join").expect("clean stop");
    let _ = std::fs::remove_dir_all(&dir);
}
