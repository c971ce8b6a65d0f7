//! `tests/bench/status-apiserver.sh`: the status pipeline of `provisioner netboot` (the binary
//! given, as its own process) against a real kube-apiserver + etcd on the loopback of the
//! benchmark's network namespace, with DHCP from another namespace. Figures, not a test: it
//! fails only when something does not work at all (Machines never served, no DHCP answer).
//!
//! For N Machines (`BENCH_MACHINES`), in one run:
//! - folder mode (the same Machines as YAML), the reference: READY, resident memory, a burst of
//!   one DISCOVER per Machine for the first `BENCH_BURST` Machines (DISCOVER → OFFER); then,
//!   in a fresh process (all Pending again), perfdhcp at `BENCH_RATE` for `BENCH_PERIOD` s over
//!   the same Machines;
//! - cluster mode: READY, all N `Served` (seen by a watch of the operator's), the API server's
//!   request counts (its `/metrics`), resident memory, CPU of netboot and of the API server +
//!   etcd; the same burst: DISCOVER → OFFER and DISCOVER → `.status.phase` PXEBooting; then the
//!   operator asks to reimage those Machines (all Pending again) and perfdhcp runs as in folder
//!   mode, while every first exchange of a Machine is a phase change the status pipeline
//!   writes.
//!
//! Environment (set by the script): `KUBERNETES_BIN`, `PROVISIONER`, `BENCH_WORK`,
//! `BENCH_CLIENT_NS` (the namespace with `eth0` on the bridge), `BENCH_CLIENT_IP` (its
//! address), `BENCH_BURST_SCRIPT`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::ResourceExt as _;

use super::super::harness::new_machine;
use super::control_plane::ControlPlane;
use super::{has_condition, Live};
use crate::cluster::crd::Machine;

mod storm;

struct Settings {
    machines: usize,
    burst: usize,
    rate: u32,
    period: u32,
    work: PathBuf,
    client_ns: String,
    /// The client namespace's address: perfdhcp sends as a relay agent (`giaddr` is this
    /// address), so netboot is told to trust it (`dhcpRelays`).
    client_ip: String,
    provisioner: PathBuf,
    burst_script: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name} is not set: run tests/bench/status-apiserver.sh")
            })
        };
        let number = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let machines = number("BENCH_MACHINES", 1000);
        Settings {
            machines,
            burst: number("BENCH_BURST", 1000).min(machines),
            rate: number("BENCH_RATE", 4000) as u32,
            period: number("BENCH_PERIOD", 5) as u32,
            work: PathBuf::from(var("BENCH_WORK")),
            client_ns: var("BENCH_CLIENT_NS"),
            client_ip: var("BENCH_CLIENT_IP"),
            provisioner: PathBuf::from(var("PROVISIONER")),
            burst_script: PathBuf::from(var("BENCH_BURST_SCRIPT")),
        }
    }
}

fn mac_of(i: usize) -> String {
    format!(
        "52:54:10:{:02x}:{:02x}:{:02x}",
        (i >> 16) & 0xff,
        (i >> 8) & 0xff,
        i & 0xff
    )
}

fn ip_of(i: usize) -> String {
    format!("10.80.{}.{}", i / 250, i % 250 + 2)
}

fn name_of(i: usize) -> String {
    format!("m{i:05}")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock the burst script's times are in.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Resident memory and its peak, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) the process has used; /proc counts in USER_HZ (100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// `median X ms, p99 Y ms, max Z ms` of `values` (milliseconds).
fn distribution(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(values, 0.5),
        percentile(values, 0.99),
        percentile(values, 1.0)
    )
}

/// `provisioner netboot` as its own process, with a notify socket of ours; SIGTERM on drop.
struct Netboot {
    child: Child,
    notify: UnixDatagram,
    started: Instant,
    log: PathBuf,
}

impl Netboot {
    fn start(settings: &Settings, name: &str, inventory: &str) -> Netboot {
        let dir = settings.work.join(name);
        std::fs::create_dir_all(dir.join("assets")).expect("mkdir");
        // netboot refuses to start without the boot files its configuration names; the
        // benchmark's clients fetch none of them.
        for file in [
            "undionly.kpxe",
            "snponly.efi",
            "ipxe.efi",
            "vmlinuz",
            "initrd.img",
        ] {
            std::fs::write(dir.join("assets").join(file), b"stand-in").expect("boot file");
        }
        let config = dir.join("provisioner.yaml");
        std::fs::write(
            &config,
            format!(
                "interface: br0\nrouterAdvertisements: false\nserverAddress: 10.80.0.1\nsubnet: 10.80.0.0/16\n\
                 bootFiles: {{ipxeDir: {assets}, assetsDir: {assets}}}\nboot: {{kernel: vmlinuz, initrd: initrd.img}}\n\
                 listen: {{dhcp: \"0.0.0.0:67\", tftp: \"0.0.0.0:69\", http: \"0.0.0.0:8080\"}}\n\
                 dhcpRelays: [{relay}]\nstateFile: {state}\ninventory: {inventory}\n",
                assets = dir.join("assets").display(),
                relay = settings.client_ip,
                state = dir.join("state.yaml").display(),
            ),
        )
        .expect("config");
        Self::spawn(&settings.provisioner, &dir, &config)
    }

    /// `provisioner` (`netboot --config CONFIG`) with its notify socket and log in `dir`.
    fn spawn(provisioner: &Path, dir: &Path, config: &Path) -> Netboot {
        let notify_path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let log_path = dir.join("netboot.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let started = Instant::now();
        let child = Command::new(provisioner)
            .args(["netboot", "--config"])
            .arg(config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("DBUS_SYSTEM_BUS_ADDRESS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start provisioner netboot");
        Netboot {
            child,
            notify,
            started,
            log: log_path,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for READY=1; returns the time since the start and the STATUS= that came with it.
    /// Fails at once, with its log, when netboot exits first.
    fn ready(&mut self) -> (Duration, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 4096];
        let mut status = String::new();
        while Instant::now() < deadline {
            if let Ok(Some(exit)) = self.child.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("netboot exited before READY=1 ({exit}):\n{log}");
            }
            if let Ok(n) = self.notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if let Some(s) = message.lines().find_map(|l| l.strip_prefix("STATUS=")) {
                    status = s.to_string();
                }
                if message.lines().any(|l| l == "READY=1") {
                    return (self.started.elapsed(), status);
                }
            }
        }
        panic!("no READY=1 within 120 s (last STATUS: {status})");
    }
}

impl Drop for Netboot {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One DISCOVER per MAC of `macfile` from the client namespace: per MAC, when its first
/// DISCOVER left and when its OFFER came (monotonic ns).
fn burst(settings: &Settings, macfile: &Path) -> Vec<(String, u64, Option<u64>)> {
    let out = Command::new("ip")
        .args(["netns", "exec", &settings.client_ns, "python3"])
        .arg(&settings.burst_script)
        .arg("eth0")
        .arg(macfile)
        .output()
        .expect("dhcp-burst.py");
    assert!(out.status.success(), "dhcp-burst.py: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let mac = f.next()?.to_string();
            let sent = f.next()?.parse().ok()?;
            let offer = f.next()?.parse().ok();
            Some((mac, sent, offer))
        })
        .collect()
}

/// DISCOVER → OFFER of a burst, and how long the burst took to be answered.
fn offer_figures(sent: &[(String, u64, Option<u64>)]) -> String {
    let mut latencies: Vec<f64> = sent
        .iter()
        .filter_map(|(_, s, o)| o.map(|o| (o.saturating_sub(*s)) as f64 / 1e6))
        .collect();
    let first = sent.iter().map(|(_, s, _)| *s).min().unwrap_or(0);
    let last = sent
        .iter()
        .filter_map(|(_, _, o)| *o)
        .max()
        .unwrap_or(first);
    format!(
        "{} of {} offered, all within {:.0} ms of the first DISCOVER; DISCOVER -> OFFER {}",
        latencies.len(),
        sent.len(),
        (last.saturating_sub(first)) as f64 / 1e6,
        distribution(&mut latencies)
    )
}

struct Perf {
    rate: f64,
    drops: u64,
    sent: u64,
    received: u64,
}

fn perfdhcp(settings: &Settings, macfile: &Path, rate: u32) -> Perf {
    let out = Command::new("ip")
        .args(["netns", "exec", &settings.client_ns, "timeout"])
        .arg((settings.period + 15).to_string())
        .args(["perfdhcp", "-4", "-l", "eth0", "-M"])
        .arg(macfile)
        .args(["-R", &settings.burst.to_string()])
        .args(["-r", &rate.to_string()])
        .args(["-p", &settings.period.to_string()])
        .args(["-W", "1000000"])
        .output()
        .expect("perfdhcp");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|v| v.trim().split([',', ' ']).next()?.parse::<u64>().ok())
            .sum()
    };
    Perf {
        rate: text
            .lines()
            .find_map(|l| l.strip_prefix("Rate:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0),
        drops: sum("drops:"),
        sent: sum("sent packets:"),
        received: sum("received packets:"),
    }
}

/// When each Machine was first seen `Served` and first seen in each phase (monotonic ns), and
/// the phase it was last seen in, from a watch of the operator's ([`watch_machines`]).
#[derive(Default)]
pub(super) struct Seen {
    pub served: HashMap<String, u64>,
    /// Phase -> Machine -> first seen in it.
    pub first_in: HashMap<String, HashMap<String, u64>>,
    /// The phase each Machine was last seen in.
    pub phase: HashMap<String, String>,
}

impl Seen {
    /// When each Machine was first seen in `phase`.
    pub fn first_in(&self, phase: &str) -> HashMap<String, u64> {
        self.first_in.get(phase).cloned().unwrap_or_default()
    }
}

fn record(seen: &Mutex<Seen>, m: &Machine) {
    let now = monotonic_ns();
    let mut seen = seen.lock().expect("seen");
    let name = m.name_any();
    if has_condition(m, "Served", "True") {
        seen.served.entry(name.clone()).or_insert(now);
    }
    let phase = m
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    seen.first_in
        .entry(phase.clone())
        .or_default()
        .entry(name.clone())
        .or_insert(now);
    seen.phase.insert(name, phase);
}

/// Starts a watch of every Machine that records what it sees; returns once its first list is
/// in. Abort the task to stop it.
pub(super) async fn watch_machines(
    api: kube::Api<Machine>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (listed_tx, mut listed) = tokio::sync::watch::channel(false);
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let events = watcher(api, watcher::Config::default().any_semantic());
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::Apply(m) | watcher::Event::InitApply(m)) => {
                        record(&seen, &m)
                    }
                    Ok(watcher::Event::InitDone) => {
                        let _ = listed_tx.send(true);
                    }
                    Ok(_) => {}
                    Err(e) => eprintln!("benchmark watch: {e}"),
                }
            }
        })
    };
    listed.wait_for(|w| *w).await.expect("recorder watch");
    (seen, recorder)
}

/// Waits (at most 300 s) until all `n` Machines have been seen `Served`, prints how long after
/// `started_ns` the last one was, and returns that time (monotonic ns).
pub(super) async fn wait_all_served(seen: &Mutex<Seen>, n: usize, started_ns: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let served = seen.lock().expect("seen").served.len();
        if served >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {served} of {n} Machines Served after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_served = seen
        .lock()
        .expect("seen")
        .served
        .values()
        .max()
        .copied()
        .unwrap_or(started_ns);
    println!(
        "  all {n} Machines Served {:.2} s after netboot started",
        all_served.saturating_sub(started_ns) as f64 / 1e9
    );
    all_served
}

fn print_requests(
    what: &str,
    before: &BTreeMap<(String, String, u16), u64>,
    after: &BTreeMap<(String, String, u16), u64>,
) {
    let mut total = 0;
    let mut failed = 0;
    let mut lines = Vec::new();
    for (key, n) in after {
        let delta = n - before.get(key).copied().unwrap_or(0);
        if delta == 0 || key.0 == "WATCH" || key.0 == "LIST" && key.1 == "machines" {
            continue;
        }
        total += delta;
        if key.2 >= 400 {
            failed += delta;
        }
        lines.push(format!("    {delta:6} {} {} {}", key.0, key.1, key.2));
    }
    println!(
        "  API requests {what} (kube-apiserver /metrics): {total}, failed (4xx/5xx): {failed}"
    );
    for l in lines {
        println!("{l}");
    }
}

/// Requests and the seconds they took inside kube-apiserver (its duration histogram's count
/// and sum), by verb and resource, for the writes the agent makes.
async fn server_durations(plane: &ControlPlane) -> BTreeMap<(String, String), (f64, f64)> {
    let counts = plane
        .apiserver_metric("apiserver_request_duration_seconds_count")
        .await;
    let sums = plane
        .apiserver_metric("apiserver_request_duration_seconds_sum")
        .await;
    let mut out = BTreeMap::new();
    for ((verb, resource, _), count) in counts {
        if !matches!(verb.as_str(), "APPLY" | "PATCH" | "POST") {
            continue;
        }
        let sum = sums
            .get(&(verb.clone(), resource.clone(), 0))
            .copied()
            .unwrap_or(0.0);
        out.insert((verb, resource), (count, sum));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: tests/bench/status-apiserver.sh"]
async fn status_pipeline_against_kube_apiserver() {
    let s = Settings::from_env();
    let n = s.machines;
    println!(
        "== {n} Machines, burst {}, load average at start {}",
        s.burst,
        load_average()
    );
    let live = Live::on(ControlPlane::start_without_audit().await).await;
    live.install_crd().await;
    let api = live.machines();
    let created = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &new_machine(&name_of(i), &mac_of(i), &ip_of(i)),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .expect("create the Machines");
    println!(
        "{n} Machines created in {:.1} s (operator, 32 at once)",
        created.elapsed().as_secs_f64()
    );

    std::fs::create_dir_all(s.work.join("machines")).expect("mkdir");
    let mut manifests = String::new();
    for i in 0..n {
        manifests.push_str(&format!(
            "---\napiVersion: provisioner.dev/v1alpha1\nkind: Machine\nmetadata: {{name: {}}}\nspec: {{macAddress: \"{}\", ipAddress: {}}}\n",
            name_of(i), mac_of(i), ip_of(i)
        ));
    }
    std::fs::write(s.work.join("machines/all.yaml"), manifests).expect("manifests");
    let all_macs = s.work.join("macs.txt");
    std::fs::write(
        &all_macs,
        (0..n).map(|i| mac_of(i) + "\n").collect::<String>(),
    )
    .expect("macs");
    let burst_macs = s.work.join("burst-macs.txt");
    std::fs::write(
        &burst_macs,
        (0..s.burst).map(|i| mac_of(i) + "\n").collect::<String>(),
    )
    .expect("burst macs");

    // Folder mode: the reference.
    println!("-- folder mode (load average {})", load_average());
    let folder = format!("{{directory: {}}}", s.work.join("machines").display());
    {
        let mut netboot = Netboot::start(&s, "folder", &folder);
        let (ready, status) = netboot.ready();
        println!("  READY after {:.2} s: {status}", ready.as_secs_f64());
        let (rss, _) = memory(netboot.pid());
        println!("  resident memory at READY: {rss:.1} MiB");
        let cpu = cpu_seconds(netboot.pid());
        let sent = burst(&s, &burst_macs);
        println!(
            "  burst of {}: {}; netboot CPU {:.2} s",
            s.burst,
            offer_figures(&sent),
            cpu_seconds(netboot.pid()) - cpu
        );
        let (rss, peak) = memory(netboot.pid());
        println!("  resident memory after the burst: {rss:.1} MiB (peak {peak:.1} MiB)");
    }
    let folder_rate = {
        // A fresh process and state file: every Machine Pending again.
        let mut netboot = Netboot::start(&s, "folder-perfdhcp", &folder);
        netboot.ready();
        let cpu = cpu_seconds(netboot.pid());
        let p = perfdhcp(&s, &burst_macs, s.rate);
        println!(
            "  perfdhcp at {}/s for {} s over {} Machines: {:.0} exchanges/s, drops {}, sent {}, received {}; netboot CPU {:.2} s",
            s.rate, s.period, s.burst, p.rate, p.drops, p.sent, p.received, cpu_seconds(netboot.pid()) - cpu
        );
        p.rate
    };

    // Cluster mode.
    println!("-- cluster mode (load average {})", load_average());
    let (seen, recorder) = watch_machines(api.clone()).await;
    let kubeconfig = s.work.join("agent.kubeconfig");
    std::fs::write(&kubeconfig, live.plane.kubeconfig(&live.agent_token)).expect("kubeconfig");
    let (apiserver_pid, etcd_pid) = live.plane.pids();
    let apiserver_pid = apiserver_pid.expect("kube-apiserver runs");
    let server_cpu = || cpu_seconds(apiserver_pid) + cpu_seconds(etcd_pid);
    let requests_before = live.plane.request_counts().await;
    let server_cpu_before = server_cpu();
    let start_ns = monotonic_ns();
    let mut netboot = Netboot::start(
        &s,
        "cluster",
        &format!("{{kubeconfig: {}}}", kubeconfig.display()),
    );
    let (ready, status) = netboot.ready();
    println!("  READY after {:.2} s: {status}", ready.as_secs_f64());
    wait_all_served(&seen, n, start_ns).await;
    // Quiet: nothing more written for two seconds.
    let mut last = live.plane.request_counts().await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = live.plane.request_counts().await;
        let writes = |c: &BTreeMap<(String, String, u16), u64>| -> u64 {
            c.iter()
                .filter(|(k, _)| k.0 == "PATCH" || k.0 == "POST")
                .map(|(_, v)| v)
                .sum()
        };
        if writes(&now) == writes(&last) {
            break;
        }
        last = now;
    }
    print_requests("from the start until quiet", &requests_before, &last);
    let (rss, peak) = memory(netboot.pid());
    println!(
        "  resident memory when quiet: {rss:.1} MiB (peak {peak:.1} MiB); CPU so far: netboot {:.2} s, kube-apiserver + etcd {:.2} s",
        cpu_seconds(netboot.pid()),
        server_cpu() - server_cpu_before
    );

    // The burst: each Machine's DISCOVER until its .status.phase says PXEBooting.
    let before = live.plane.request_counts().await;
    let durations_before = server_durations(&live.plane).await;
    let (netboot_cpu, apiserver_cpu) = (cpu_seconds(netboot.pid()), server_cpu());
    let sent = burst(&s, &burst_macs);
    println!("  burst of {}: {}", s.burst, offer_figures(&sent));
    let names: HashMap<String, String> = (0..s.burst).map(|i| (mac_of(i), name_of(i))).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let latencies: Vec<f64> = loop {
        let done: Vec<f64> = {
            let seen = seen.lock().expect("seen");
            sent.iter()
                .filter_map(|(mac, sent, _)| {
                    let at = seen.first_in.get("PXEBooting")?.get(names.get(mac)?)?;
                    Some(at.saturating_sub(*sent) as f64 / 1e6)
                })
                .collect()
        };
        if done.len() == sent.len() || Instant::now() > deadline {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut latencies = latencies;
    let complete = latencies.len();
    println!(
        "  DISCOVER -> .status.phase PXEBooting seen by a watch, {complete} of {}: {}",
        sent.len(),
        distribution(&mut latencies)
    );
    let server_cpu_burst = server_cpu() - apiserver_cpu;
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "  CPU during the burst (+2 s): netboot {:.2} s, kube-apiserver + etcd {:.2} s",
        cpu_seconds(netboot.pid()) - netboot_cpu,
        server_cpu() - apiserver_cpu
    );
    // What the API server alone needs: its CPU until the burst was all seen, spread over every
    // CPU of the machine, is the least time its last write could have taken.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let span = match (
        sent.iter().map(|s| s.1).min(),
        sent.iter().map(|s| s.1).max(),
    ) {
        (Some(first), Some(last)) => last.saturating_sub(first) as f64 / 1e9,
        _ => 0.0,
    };
    println!(
        "  API server's floor: kube-apiserver + etcd used {server_cpu_burst:.2} CPU s until the burst was all seen; on {cpus} CPUs that is at least {:.2} s for the last write (the DISCOVERs went out over {span:.2} s)",
        server_cpu_burst / cpus as f64
    );
    print_requests("for the burst", &before, &live.plane.request_counts().await);
    let durations = server_durations(&live.plane).await;
    for (key, (count, seconds)) in &durations {
        let (count_before, seconds_before) = durations_before.get(key).copied().unwrap_or_default();
        if count - count_before > 0.0 {
            println!(
                "  in kube-apiserver: {} {} took {:.1} ms on average ({} requests)",
                key.0,
                key.1,
                (seconds - seconds_before) / (count - count_before) * 1000.0,
                count - count_before
            );
        }
    }

    // Reimage the burst's Machines (the operator's spec change): Pending again, then perfdhcp.
    let reimaged = Instant::now();
    stream::iter(0..s.burst)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch(
                    &name_of(i),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(serde_json::json!({"spec": {"reimage": "bench"}})),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .expect("reimage");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pending = {
            let seen = seen.lock().expect("seen");
            (0..s.burst)
                .filter(|&i| seen.phase.get(&name_of(i)).map(String::as_str) == Some("Pending"))
                .count()
        };
        if pending == s.burst {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {pending} of {} Pending after the reimage",
            s.burst
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "  reimage of {} Machines asked: all Pending in .status {:.2} s later",
        s.burst,
        reimaged.elapsed().as_secs_f64()
    );
    let before = live.plane.request_counts().await;
    let (netboot_cpu, apiserver_cpu) = (cpu_seconds(netboot.pid()), server_cpu());
    let p = perfdhcp(&s, &burst_macs, s.rate);
    let status_writes: u64 = live
        .plane
        .request_counts()
        .await
        .iter()
        .filter(|(key, _)| key.1 == "machines/status")
        .map(|(key, v)| v - before.get(key).copied().unwrap_or(0))
        .sum();
    println!(
        "  perfdhcp at {}/s for {} s over {} Machines: {:.0} exchanges/s ({:.2}x folder mode), drops {}, sent {}, received {}; {status_writes} status writes meanwhile; CPU netboot {:.2} s, kube-apiserver + etcd {:.2} s",
        s.rate,
        s.period,
        s.burst,
        p.rate,
        p.rate / folder_rate,
        p.drops,
        p.sent,
        p.received,
        cpu_seconds(netboot.pid()) - netboot_cpu,
        server_cpu() - apiserver_cpu
    );
    let (rss, peak) = memory(netboot.pid());
    println!("  resident memory at the end: {rss:.1} MiB (peak {peak:.1} MiB)");
    drop(netboot);
    recorder.abort();
    assert_eq!(
        complete, s.burst,
        "every Machine of the burst reached PXEBooting"
    );
}
