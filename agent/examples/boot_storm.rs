//! boot_storm: N simulated machines booting at once against netboot, each doing what a real
//! machine does on the way to stage2's first report (`tests/bench/boot-storm.sh` runs it in a
//! client namespace):
//!
//! 1. `pxe-dhcp` (with `--pxe`): the firmware's DHCP DORA (BIOS PXE: arch 0, vendor class
//!    `PXEClient`), answered with the iPXE loader (not fetched: the TFTP step is left out);
//! 2. `ipxe-dhcp`: iPXE's DORA (user class `iPXE`), answered with the URL of the machine's
//!    script (from the ACK's boot file), and the reserved address, checked;
//! 3. `script`: GET of that URL from the reserved address; the kernel line's orders parsed as
//!    stage2 parses its command line ([`wire::orders::Orders::from_cmdline`]);
//! 4. `kernel`, `initrd`: GET of both URLs of the script, every byte read (and counted against
//!    `Content-Length`);
//! 5. `stage2-dhcp`: stage2's DORA (vendor class `provisioner-stage2`);
//! 6. `report`: `--reports` progress reports (`imaging`, [`wire::report::ProgressReport`]) to
//!    `POST {provisioner.url}/report/{mac}` with the token of the orders, as stage2 sends
//!    them (three tries on a transport error, none on a refusal).
//!
//! Each machine has its own MAC (`chaddr`, client identifier) and its own source address for
//! HTTP (its reservation, which must be an address of the interface); DHCP goes out of one
//! socket on port 68 for all, replies matched by `xid`. A DORA waits 1, 2, 4, 8 s for each
//! answer before sending again, as iPXE does; an HTTP step is tried once, as iPXE does.
//!
//! Output: one JSON line per machine on stdout (`name`, `mac`, `steps`: each with `step`,
//! `start` and `end` in CLOCK_MONOTONIC nanoseconds, `tries`, `bytes`, `error` when it
//! failed; a machine stops at its first failed step), a summary on stderr. Bounded: every
//! machine stops at `--deadline` seconds after the start.
//!
//! The HTTP client is hyper's connection-level client over a socket bound to the machine's
//! address (a pooled client picks its own source address).
//!
//! ```text
//! boot_storm --iface eth0 --machines FILE [--deadline 300] [--step-timeout 120] [--reports 2] [--pxe]
//! ```
//! FILE: one machine per line, `NAME MAC IP`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use dhcproto::v4::{
    Architecture, DhcpOption, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use http_body_util::{BodyExt as _, Full};
use hyper::header;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use wire::orders::Orders;
use wire::report::ProgressReport;

#[derive(Parser, Debug)]
struct Args {
    /// Interface the DHCP socket is bound to.
    #[arg(long, default_value = "eth0")]
    iface: String,
    /// One machine per line: NAME MAC IP.
    #[arg(long)]
    machines: PathBuf,
    /// Seconds after the start when every machine stops.
    #[arg(long, default_value_t = 300)]
    deadline: u64,
    /// Seconds one step may take.
    #[arg(long, default_value_t = 120)]
    step_timeout: u64,
    /// Progress reports per machine.
    #[arg(long, default_value_t = 2)]
    reports: u8,
    /// Do the firmware's PXE DORA before iPXE's.
    #[arg(long)]
    pxe: bool,
}

struct Machine {
    name: String,
    mac: [u8; 6],
    ip: Ipv4Addr,
}

/// CLOCK_MONOTONIC in nanoseconds: comparable with the times of other processes.
fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

fn mac_text(mac: &[u8; 6], sep: &str) -> String {
    mac.map(|b| format!("{b:02x}")).join(sep)
}

fn read_machines(path: &PathBuf) -> anyhow::Result<Vec<Machine>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        let [name, mac, ip] = f[..] else {
            bail!("{path:?} line {}: expected NAME MAC IP", n + 1);
        };
        let bytes: Vec<u8> = mac
            .split(':')
            .map(|b| u8::from_str_radix(b, 16))
            .collect::<Result<_, _>>()
            .with_context(|| format!("line {}: MAC {mac}", n + 1))?;
        let mac: [u8; 6] = bytes
            .try_into()
            .map_err(|_| anyhow!("line {}: MAC {mac} is not 6 bytes", n + 1))?;
        out.push(Machine {
            name: name.to_string(),
            mac,
            ip: ip
                .parse()
                .with_context(|| format!("line {}: IP {ip}", n + 1))?,
        });
    }
    Ok(out)
}

/// Which client a DORA speaks as.
#[derive(Clone, Copy)]
enum Client {
    Pxe,
    Ipxe,
    Stage2,
}

/// One DHCP socket for every machine; replies go to the DORA waiting on their `xid`.
struct Dhcp {
    socket: UdpSocket,
    waiting: Mutex<HashMap<u32, mpsc::UnboundedSender<Message>>>,
}

impl Dhcp {
    fn open(iface: &str) -> anyhow::Result<Arc<Dhcp>> {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        s.set_reuse_address(true)?;
        s.set_broadcast(true)?;
        s.set_recv_buffer_size(8 << 20)?;
        s.set_send_buffer_size(4 << 20)?;
        s.bind_device(Some(iface.as_bytes()))
            .with_context(|| format!("binding to {iface}"))?;
        s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into())
            .context("binding port 68")?;
        s.set_nonblocking(true)?;
        Ok(Arc::new(Dhcp {
            socket: UdpSocket::from_std(s.into())?,
            waiting: Mutex::new(HashMap::new()),
        }))
    }

    async fn receive(self: Arc<Self>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, _)) = self.socket.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(msg) = Message::decode(&mut Decoder::new(&buf[..n])) else {
                continue;
            };
            if msg.opcode() != Opcode::BootReply {
                continue;
            }
            let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = waiting.get(&msg.xid()) {
                let _ = tx.send(msg);
            }
        }
    }

    fn packet(m: &Machine, xid: u32, kind: MessageType, client: Client) -> Message {
        let mut msg = Message::default();
        msg.set_opcode(Opcode::BootRequest)
            .set_htype(HType::Eth)
            .set_xid(xid)
            .set_flags(Flags::default().set_broadcast())
            .set_chaddr(&m.mac);
        let opts = msg.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        let mut client_id = vec![1u8];
        client_id.extend_from_slice(&m.mac);
        opts.insert(DhcpOption::ClientIdentifier(client_id));
        opts.insert(DhcpOption::MaxMessageSize(1472));
        opts.insert(DhcpOption::ParameterRequestList(vec![
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::DomainNameServer,
            OptionCode::Hostname,
            OptionCode::ServerIdentifier,
            OptionCode::BootfileName,
            OptionCode::TFTPServerName,
        ]));
        match client {
            Client::Pxe | Client::Ipxe => {
                opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
                    0u16,
                )));
                opts.insert(DhcpOption::ClassIdentifier(
                    b"PXEClient:Arch:00000:UNDI:002001".to_vec(),
                ));
                if matches!(client, Client::Ipxe) {
                    opts.insert(DhcpOption::UserClass(b"iPXE".to_vec()));
                }
            }
            Client::Stage2 => {
                opts.insert(DhcpOption::ClassIdentifier(b"provisioner-stage2".to_vec()));
            }
        }
        msg
    }

    async fn send(&self, msg: &Message) -> anyhow::Result<()> {
        let mut buf = Vec::with_capacity(400);
        msg.encode(&mut Encoder::new(&mut buf))?;
        self.socket
            .send_to(&buf, (Ipv4Addr::BROADCAST, 67))
            .await
            .context("sending")?;
        Ok(())
    }

    /// DISCOVER → OFFER → REQUEST → ACK; the ACK and how many DISCOVERs it took. Each answer
    /// is waited for 1, 2, 4, 8 s (then again 8 s…) before the DISCOVER is sent again.
    async fn dora(
        &self,
        m: &Machine,
        xid: u32,
        client: Client,
        until: Instant,
    ) -> anyhow::Result<(Message, u32)> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(xid, tx);
        let result = async {
            let mut tries = 0u32;
            loop {
                tries += 1;
                let wait = Duration::from_secs(1 << (tries - 1).min(3));
                self.send(&Self::packet(m, xid, MessageType::Discover, client))
                    .await?;
                let Some(offer) = Self::reply(&mut rx, MessageType::Offer, wait, until).await?
                else {
                    continue;
                };
                let mut req = Self::packet(m, xid, MessageType::Request, client);
                req.opts_mut()
                    .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
                if let Some(DhcpOption::ServerIdentifier(s)) =
                    offer.opts().get(OptionCode::ServerIdentifier)
                {
                    req.opts_mut().insert(DhcpOption::ServerIdentifier(*s));
                }
                self.send(&req).await?;
                if let Some(ack) = Self::reply(&mut rx, MessageType::Ack, wait, until).await? {
                    return Ok((ack, tries));
                }
            }
        }
        .await;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&xid);
        result
    }

    /// The next reply of type `kind` within `wait`; `None` when none came (send again); an
    /// error on a NAK or past `until`.
    async fn reply(
        rx: &mut mpsc::UnboundedReceiver<Message>,
        kind: MessageType,
        wait: Duration,
        until: Instant,
    ) -> anyhow::Result<Option<Message>> {
        let give_up = (Instant::now() + wait).min(until);
        loop {
            match tokio::time::timeout_at(give_up, rx.recv()).await {
                Ok(Some(msg)) => match msg.opts().msg_type() {
                    Some(t) if t == kind => return Ok(Some(msg)),
                    Some(MessageType::Nak) => bail!("NAK"),
                    _ => continue,
                },
                Ok(None) => bail!("reply channel closed"),
                Err(_) if Instant::now() >= until => bail!("no {kind:?} in time"),
                Err(_) => return Ok(None),
            }
        }
    }
}

/// The boot file of a reply: option 67, else the `file` field.
fn boot_file(msg: &Message) -> Option<String> {
    if let Some(DhcpOption::BootfileName(name)) = msg.opts().get(OptionCode::BootfileName) {
        return Some(
            String::from_utf8_lossy(name)
                .trim_end_matches('\0')
                .to_string(),
        );
    }
    let file = msg.fname()?;
    let file = String::from_utf8_lossy(file)
        .trim_end_matches('\0')
        .to_string();
    (!file.is_empty()).then_some(file)
}

/// One HTTP request on a connection of its own from `local`; the status, and the body (kept
/// when `keep` is set, else only counted).
async fn http(
    local: Ipv4Addr,
    method: hyper::Method,
    url: &str,
    auth: Option<&str>,
    body: Bytes,
    keep: bool,
) -> anyhow::Result<(hyper::StatusCode, u64, Vec<u8>)> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("URL {url}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("not an http:// URL: {url}");
    }
    let host: Ipv4Addr = uri
        .host()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("host of {url} is not an IPv4 address"))?;
    let addr = SocketAddrV4::new(host, uri.port_u16().unwrap_or(80));
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((local, 0)))?;
    let stream = socket.connect(addr.into()).await.context("connect")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("handshake")?;
    let conn = tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, addr.to_string())
        .header(header::USER_AGENT, "iPXE/1.21.1 (boot-storm)");
    if let Some(token) = auth {
        req = req
            .header(header::AUTHORIZATION, format!("Bearer {token}"))
            .header(header::CONTENT_TYPE, "application/json");
    }
    let response = sender
        .send_request(req.body(Full::new(body))?)
        .await
        .context("request")?;
    let status = response.status();
    let declared: Option<u64> = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let mut body = response.into_body();
    let mut count = 0u64;
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.with_context(|| format!("body cut after {count} bytes"))?;
        if let Some(data) = frame.data_ref() {
            count += data.len() as u64;
            if keep {
                kept.extend_from_slice(data);
            }
        }
    }
    if let Some(len) = declared {
        if len != count {
            bail!("body of {count} bytes, Content-Length {len}");
        }
    }
    drop(sender);
    conn.abort();
    Ok((status, count, kept))
}

/// What the imaging script says: kernel URL, its command line, initrd URL.
fn parse_script(text: &str) -> anyhow::Result<(String, String, String)> {
    let mut kernel = None;
    let mut initrd = None;
    for line in text.lines() {
        let mut words = line.splitn(3, ' ');
        match (words.next(), words.next()) {
            (Some("kernel"), Some(url)) => {
                kernel = Some((url.to_string(), words.next().unwrap_or("").to_string()))
            }
            (Some("initrd"), Some(url)) => initrd = Some(url.to_string()),
            _ => {}
        }
    }
    let (kernel, cmdline) = kernel.ok_or_else(|| anyhow!("no kernel line in the script"))?;
    let initrd = initrd.ok_or_else(|| anyhow!("no initrd line in the script"))?;
    Ok((kernel, cmdline, initrd))
}

struct Step {
    name: &'static str,
    start: u64,
    end: u64,
    tries: u32,
    bytes: u64,
    error: Option<String>,
}

/// One machine's boot; its steps up to the first failure.
async fn boot(
    dhcp: Arc<Dhcp>,
    m: Arc<Machine>,
    xid: u32,
    args: Arc<Args>,
    deadline: Instant,
) -> Vec<Step> {
    let mut steps = Vec::new();
    let step_timeout = Duration::from_secs(args.step_timeout);
    // Runs one step; false when it failed (the machine stops).
    macro_rules! step {
        ($name:expr, $body:expr) => {{
            let start = monotonic_ns();
            let until = (Instant::now() + step_timeout).min(deadline);
            let r: anyhow::Result<(u32, u64)> =
                match tokio::time::timeout_at(until, async { $body }).await {
                    Ok(r) => r,
                    Err(_) => Err(anyhow!("timed out")),
                };
            let end = monotonic_ns();
            let ok = r.is_ok();
            let (tries, bytes, error) = match r {
                Ok((t, b)) => (t, b, None),
                Err(e) => (1, 0, Some(format!("{e:#}"))),
            };
            steps.push(Step {
                name: $name,
                start,
                end,
                tries,
                bytes,
                error,
            });
            ok
        }};
    }
    let until_of = || (Instant::now() + step_timeout).min(deadline);

    if args.pxe
        && !step!("pxe-dhcp", {
            let (_, tries) = dhcp.dora(&m, xid, Client::Pxe, until_of()).await?;
            Ok((tries, 0))
        })
    {
        return steps;
    }
    let mut script_url = String::new();
    if !step!("ipxe-dhcp", {
        let (ack, tries) = dhcp
            .dora(&m, xid.wrapping_add(1), Client::Ipxe, until_of())
            .await?;
        if ack.yiaddr() != m.ip {
            bail!("leased {} instead of {}", ack.yiaddr(), m.ip);
        }
        script_url = boot_file(&ack).ok_or_else(|| anyhow!("no boot file in the ACK"))?;
        Ok((tries, 0))
    }) {
        return steps;
    }
    let mut files = (String::new(), String::new());
    let mut orders: Option<Orders> = None;
    if !step!("script", {
        let (status, n, body) = http(
            m.ip,
            hyper::Method::GET,
            &script_url,
            None,
            Bytes::new(),
            true,
        )
        .await?;
        let text = String::from_utf8_lossy(&body);
        if status != hyper::StatusCode::OK {
            bail!("HTTP {status}: {}", text.trim());
        }
        let (kernel, cmdline, initrd) = parse_script(&text)?;
        orders = Some(Orders::from_cmdline(&cmdline)?);
        files = (kernel, initrd);
        Ok((1, n))
    }) {
        return steps;
    }
    for (name, url) in [("kernel", files.0.clone()), ("initrd", files.1.clone())] {
        if !step!(name, {
            let (status, n, _) =
                http(m.ip, hyper::Method::GET, &url, None, Bytes::new(), false).await?;
            if status != hyper::StatusCode::OK {
                bail!("HTTP {status}");
            }
            Ok((1, n))
        }) {
            return steps;
        }
    }
    if !step!("stage2-dhcp", {
        let (ack, tries) = dhcp
            .dora(&m, xid.wrapping_add(2), Client::Stage2, until_of())
            .await?;
        if ack.yiaddr() != m.ip {
            bail!("leased {} instead of {}", ack.yiaddr(), m.ip);
        }
        Ok((tries, 0))
    }) {
        return steps;
    }
    let Some(orders) = orders else {
        return steps;
    };
    let url = format!(
        "{}/report/{}",
        orders.netboot_url.trim_end_matches('/'),
        mac_text(&m.mac, "-")
    );
    let reports = args.reports.max(1);
    for i in 0..reports {
        let progress = (u32::from(i) * 100 / u32::from(reports)) as u8;
        let report = ProgressReport::Imaging {
            progress,
            bytes: Some(0),
            rate: None,
            message: Some("writing /dev/vda".to_string()),
        };
        let body = Bytes::from(report.to_json());
        if !step!("report", {
            // As stage2's reporter: a transport error is tried again (3 tries, 0.5 s, 1 s
            // apart); an answer is final.
            let mut tries = 0u32;
            loop {
                tries += 1;
                let sent = tokio::time::timeout(
                    Duration::from_secs(5),
                    http(
                        m.ip,
                        hyper::Method::POST,
                        &url,
                        Some(orders.imaging.token.expose()),
                        body.clone(),
                        true,
                    ),
                )
                .await
                .map_err(|_| anyhow!("no answer within 5 s"))
                .and_then(|r| r);
                match sent {
                    Ok((status, _, _)) if status == hyper::StatusCode::NO_CONTENT => {
                        break Ok((tries, 0))
                    }
                    Ok((status, _, text)) => {
                        bail!("HTTP {status}: {}", String::from_utf8_lossy(&text).trim())
                    }
                    Err(e) if tries >= 3 => break Err(e),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await
                    }
                }
            }
        }) {
            return steps;
        }
    }
    steps
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    // One socket per machine at a time, plus the runtime's.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let machines = read_machines(&args.machines)?;
    let dhcp = Dhcp::open(&args.iface)?;
    tokio::spawn(dhcp.clone().receive());
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    // Three xids per machine (one per DORA), unlike any other client's.
    let base: u32 = 0x6000_0000;
    let mut tasks = Vec::with_capacity(machines.len());
    for (i, m) in machines.into_iter().enumerate() {
        let m = Arc::new(m);
        let xid = base.wrapping_add(i as u32 * 4);
        tasks.push((
            m.clone(),
            tokio::spawn(boot(dhcp.clone(), m, xid, args.clone(), deadline)),
        ));
    }
    let mut done = 0usize;
    let total = tasks.len();
    for (m, task) in tasks {
        let steps = task.await.unwrap_or_default();
        let complete = steps
            .last()
            .is_some_and(|s| s.name == "report" && s.error.is_none())
            && steps.iter().filter(|s| s.name == "report").count()
                == usize::from(args.reports.max(1));
        done += usize::from(complete);
        let steps: Vec<_> = steps
            .iter()
            .map(|s| {
                json!({"step": s.name, "start": s.start, "end": s.end, "tries": s.tries,
                       "bytes": s.bytes, "error": s.error})
            })
            .collect();
        println!(
            "{}",
            json!({"name": m.name, "mac": mac_text(&m.mac, ":"), "steps": steps})
        );
    }
    eprintln!("boot_storm: {done} of {total} machines reported imaging");
    Ok(())
}
