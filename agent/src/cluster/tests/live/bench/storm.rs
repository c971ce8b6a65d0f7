//! `tests/bench/boot-storm.sh`: N machines boot at once against `provisioner netboot` (the
//! binary given, its own process), each through the whole chain up to stage2's first reports
//! (`agent/examples/boot_storm.rs`, run in the client namespace: DHCP, iPXE script, kernel,
//! initrd, stage2's DHCP, `imaging` reports with the token of its orders). Figures, not a
//! test: it fails only when not every machine got through (after printing why).
//!
//! In one run, for `STORM_MACHINES` Machines (kernel `STORM_KERNEL_SIZE` + initrd
//! `STORM_INITRD_SIZE` bytes each):
//! - folder mode (`STORM_FOLDER=1`, the default), the reference: the same Machines as YAML;
//! - cluster mode: a real kube-apiserver + etcd on the loopback of the benchmark's namespace,
//!   the N Machines created first, netboot started, all `Served`; then the storm, and a watch
//!   of the operator's for each Machine's `.status.phase` `Imaging`.
//!
//! Printed for each: the load average at the start, the time from the first DISCOVER until all
//! N have their files, until all N reports were accepted and (cluster) until all N are
//! `Imaging` in the API; per step the failures (by error) and the times (median, p99, max);
//! the slowest machine with its step times; netboot's CPU seconds, resident memory (before,
//! peak) and threads (peak); the API server's + etcd's CPU seconds and requests.
//! `STORM_HTTP_MAX_CONNECTIONS` sets netboot's `limits.http.maxConnections`.
//! Bounded: the client stops every machine `STORM_TIMEOUT` s after its start, the watch waits
//! 60 s more at most.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use kube::api::PostParams;
use serde::Deserialize;

use super::{
    cpu_seconds, distribution, ip_of, load_average, mac_of, memory, monotonic_ns, name_of,
    print_requests, wait_all_served, watch_machines, Netboot,
};
use crate::cluster::tests::harness::new_machine;
use crate::cluster::tests::live::control_plane::ControlPlane;
use crate::cluster::tests::live::Live;

struct Settings {
    machines: usize,
    kernel_size: u64,
    initrd_size: u64,
    reports: u8,
    timeout: u64,
    folder: bool,
    pxe: bool,
    /// netboot's `limits.http.maxConnections` (its default, 512, unless set).
    http_max_connections: Option<u64>,
    work: PathBuf,
    client_ns: String,
    /// The MAC of the client namespace's `eth0`, where every machine's address is.
    client_mac: String,
    provisioner: PathBuf,
    client: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("{name} is not set: run tests/bench/boot-storm.sh"))
        };
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Settings {
            machines: number("STORM_MACHINES", 100) as usize,
            kernel_size: number("STORM_KERNEL_SIZE", 8 << 20),
            initrd_size: number("STORM_INITRD_SIZE", 32 << 20),
            reports: number("STORM_REPORTS", 2).clamp(1, 100) as u8,
            timeout: number("STORM_TIMEOUT", 300),
            folder: number("STORM_FOLDER", 1) != 0,
            pxe: number("STORM_PXE", 0) != 0,
            http_max_connections: std::env::var("STORM_HTTP_MAX_CONNECTIONS")
                .ok()
                .and_then(|v| v.parse().ok()),
            work: PathBuf::from(var("BENCH_WORK")),
            client_ns: var("BENCH_CLIENT_NS"),
            client_mac: var("BENCH_CLIENT_MAC"),
            provisioner: PathBuf::from(var("PROVISIONER")),
            client: PathBuf::from(var("STORM_CLIENT")),
        }
    }
}

/// One step of one machine, as the client prints it.
#[derive(Deserialize, Debug)]
struct StepOut {
    step: String,
    start: u64,
    end: u64,
    tries: u32,
    bytes: u64,
    error: Option<String>,
}

#[derive(Deserialize, Debug)]
struct MachineOut {
    name: String,
    steps: Vec<StepOut>,
}

impl MachineOut {
    fn step_end(&self, name: &str) -> Option<u64> {
        self.steps
            .iter()
            .filter(|s| s.step == name && s.error.is_none())
            .map(|s| s.end)
            .next_back()
    }

    fn reported(&self, reports: u8) -> Option<u64> {
        let ok = self
            .steps
            .iter()
            .filter(|s| s.step == "report" && s.error.is_none())
            .count();
        (ok == usize::from(reports))
            .then(|| self.step_end("report"))
            .flatten()
    }

    fn first_start(&self) -> Option<u64> {
        self.steps.first().map(|s| s.start)
    }

    /// `step 12.3 ms (2 tries)` for each step.
    fn timeline(&self) -> String {
        self.steps
            .iter()
            .map(|s| {
                let mut t = format!(
                    "{} {:.1} ms",
                    s.step,
                    s.end.saturating_sub(s.start) as f64 / 1e6
                );
                if s.tries > 1 {
                    t.push_str(&format!(" ({} tries)", s.tries));
                }
                if let Some(e) = &s.error {
                    t.push_str(&format!(" FAILED: {e}"));
                }
                t
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

const STEPS: &[&str] = &[
    "pxe-dhcp",
    "ipxe-dhcp",
    "script",
    "kernel",
    "initrd",
    "stage2-dhcp",
    "report",
];

/// Bytes that do not compress (a kernel and an initrd are compressed already), the same in
/// every run.
fn write_asset(path: &Path, size: u64) {
    use std::io::Write as _;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let block: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("asset"));
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n]).expect("write asset");
        left -= n as u64;
    }
    file.flush().expect("flush asset");
}

/// netboot's directory for `mode`: boot files (the kernel and initrd of the set sizes) and
/// the configuration (imaging on, so every script carries orders and a token).
fn netboot_dir(s: &Settings, mode: &str, inventory: &str) -> (PathBuf, PathBuf) {
    let dir = s.work.join(mode);
    let assets = dir.join("assets");
    std::fs::create_dir_all(&assets).expect("mkdir");
    for file in ["undionly.kpxe", "snponly.efi", "ipxe.efi"] {
        std::fs::write(assets.join(file), b"stand-in").expect("boot file");
    }
    write_asset(&assets.join("vmlinuz"), s.kernel_size);
    write_asset(&assets.join("initrd.img"), s.initrd_size);
    let config = dir.join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "interface: br0\nrouterAdvertisements: false\nserverAddress: 10.80.0.1\nsubnet: 10.80.0.0/16\n\
             bootFiles: {{ipxeDir: {assets}, assetsDir: {assets}}}\n\
             boot: {{kernel: vmlinuz, initrd: initrd.img, cmdline: \"console=ttyS0\"}}\n\
             image: {{url: \"http://10.80.0.1:8080/node.raw.zst\", sha256: \"{sha}\", size: 2147483648}}\n\
             listen: {{dhcp: \"0.0.0.0:67\", tftp: \"0.0.0.0:69\", http: \"0.0.0.0:8080\"}}\n\
             stateFile: {state}\ninventory: {inventory}\n{limits}",
            assets = assets.display(),
            limits = s
                .http_max_connections
                .map(|n| format!("limits: {{http: {{maxConnections: {n}}}}}\n"))
                .unwrap_or_default(),
            sha = "ab".repeat(32),
            state = dir.join("state.yaml").display(),
        ),
    )
    .expect("config");
    (dir, config)
}

/// Adds (`add`) or deletes (`del`) every machine's address on the client namespace's `eth0`
/// (each machine fetches from its own reserved address) and, in this namespace, a permanent
/// neighbour entry for each on `br0`: the kernel's ARP table limit (`gc_thresh3`, 1024 by
/// default) is shared by every namespace of the host, and permanent entries do not count
/// against it, so the storm's 1000 addresses cannot fail for want of room there.
fn client_addresses(s: &Settings, verb: &str) {
    let batch = |name: &str, lines: String| {
        let path = s.work.join(format!("{name}-{verb}.batch"));
        std::fs::write(&path, lines).expect("batch");
        path
    };
    let addresses = batch(
        "addresses",
        (0..s.machines)
            .map(|i| format!("addr {verb} {}/16 dev eth0\n", ip_of(i)))
            .collect(),
    );
    let neighbours = batch(
        "neighbours",
        (0..s.machines)
            .map(|i| match verb {
                "add" => format!(
                    "neigh replace {} lladdr {} dev br0 nud permanent\n",
                    ip_of(i),
                    s.client_mac
                ),
                _ => format!("neigh del {} dev br0\n", ip_of(i)),
            })
            .collect(),
    );
    for (what, args, path) in [
        (
            "addresses",
            vec!["-force", "-n", s.client_ns.as_str(), "-batch"],
            addresses,
        ),
        ("neighbour entries", vec!["-force", "-batch"], neighbours),
    ] {
        let status = Command::new("ip")
            .args(args)
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .expect("ip -batch");
        if verb == "add" {
            assert!(status.success(), "adding the machines' {what}");
        }
    }
}

fn threads(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// What netboot used while the client ran: peak threads, sampled.
struct Usage {
    cpu: f64,
    rss_before: f64,
    peak_rss: f64,
    peak_threads: u64,
}

/// Runs the client in the client namespace while sampling netboot's threads; the machines'
/// lines and what netboot used meanwhile.
async fn storm(s: &Settings, mode: &str, netboot: &Netboot) -> (Vec<MachineOut>, Usage) {
    let list = s.work.join("machines.txt");
    std::fs::write(
        &list,
        (0..s.machines)
            .map(|i| format!("{} {} {}\n", name_of(i), mac_of(i), ip_of(i)))
            .collect::<String>(),
    )
    .expect("machine list");
    let pid = netboot.pid();
    let cpu = cpu_seconds(pid);
    let (rss_before, _) = memory(pid);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &s.client_ns, "timeout"])
        .arg((s.timeout + 30).to_string())
        .arg(&s.client)
        .args(["--iface", "eth0", "--machines"])
        .arg(&list)
        .args(["--deadline", &s.timeout.to_string()])
        .args(["--reports", &s.reports.to_string()])
        .stdout(Stdio::piped())
        .stderr(
            std::fs::File::create(s.work.join(format!("client-{mode}.log"))).expect("client log"),
        );
    if s.pxe {
        cmd.arg("--pxe");
    }
    let client = tokio::task::spawn_blocking(move || cmd.output().expect("boot_storm client"));
    let mut client = std::pin::pin!(client);
    let mut peak_threads = 0;
    let out = loop {
        peak_threads = peak_threads.max(threads(pid));
        tokio::select! {
            out = &mut client => break out.expect("client task"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    };
    assert!(out.status.success(), "boot_storm client: {:?}", out.status);
    let machines: Vec<MachineOut> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("client line"))
        .collect();
    let (_, peak_rss) = memory(pid);
    (
        machines,
        Usage {
            cpu: cpu_seconds(pid) - cpu,
            rss_before,
            peak_rss,
            peak_threads,
        },
    )
}

fn seconds_since(t0: u64, t: u64) -> f64 {
    t.saturating_sub(t0) as f64 / 1e9
}

/// Prints the storm's figures; the time of the first DISCOVER.
fn figures(s: &Settings, machines: &[MachineOut], usage: &Usage) -> u64 {
    let n = machines.len();
    let t0 = machines
        .iter()
        .filter_map(MachineOut::first_start)
        .min()
        .unwrap_or(0);
    let files: Vec<u64> = machines
        .iter()
        .filter_map(|m| m.step_end("initrd"))
        .collect();
    let bytes: u64 = machines
        .iter()
        .flat_map(|m| &m.steps)
        .filter(|st| st.error.is_none() && (st.step == "kernel" || st.step == "initrd"))
        .map(|st| st.bytes)
        .sum();
    let last_file = files.iter().max().copied().unwrap_or(t0);
    println!(
        "  {} of {n} have their files {:.2} s after the first DISCOVER ({:.0} MiB, {:.0} MB/s over that time)",
        files.len(),
        seconds_since(t0, last_file),
        bytes as f64 / (1 << 20) as f64,
        bytes as f64 / 1e6 / seconds_since(t0, last_file).max(1e-3)
    );
    let reported: Vec<u64> = machines
        .iter()
        .filter_map(|m| m.reported(s.reports))
        .collect();
    println!(
        "  {} of {n} had their {} reports accepted {:.2} s after the first DISCOVER",
        reported.len(),
        s.reports,
        seconds_since(t0, reported.iter().max().copied().unwrap_or(t0))
    );
    println!("  per step: done/failed, time from its start to its end");
    for step in STEPS {
        let all: Vec<&StepOut> = machines
            .iter()
            .flat_map(|m| &m.steps)
            .filter(|st| st.step == *step)
            .collect();
        if all.is_empty() {
            continue;
        }
        let mut ok: Vec<f64> = all
            .iter()
            .filter(|st| st.error.is_none())
            .map(|st| st.end.saturating_sub(st.start) as f64 / 1e6)
            .collect();
        let retried = all.iter().filter(|st| st.tries > 1).count();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for st in all.iter().filter(|st| st.error.is_some()) {
            let e = st.error.clone().unwrap_or_default();
            *errors.entry(e.chars().take(100).collect()).or_default() += 1;
        }
        let failed = all.len() - ok.len();
        println!(
            "    {step:12} {:5} done, {failed:4} failed, {retried:4} needed more than one try; {}",
            ok.len(),
            distribution(&mut ok)
        );
        let mut errors: Vec<_> = errors.into_iter().collect();
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        for (e, count) in errors.iter().take(4) {
            println!("      {count:5} x {e}");
        }
    }
    println!(
        "  netboot: CPU {:.2} s during the storm, resident memory {:.1} MiB before, peak {:.1} MiB, threads peak {}",
        usage.cpu, usage.rss_before, usage.peak_rss, usage.peak_threads
    );
    t0
}

/// The slowest machine (the last to be done by `done`, or one that never was) and its steps.
fn slowest(machines: &[MachineOut], t0: u64, done: impl Fn(&MachineOut) -> Option<u64>) {
    if let Some(m) = machines.iter().find(|m| done(m).is_none()) {
        println!(
            "  not done: {} machines, e.g. {}: {}",
            machines.iter().filter(|m| done(m).is_none()).count(),
            m.name,
            m.timeline()
        );
    }
    if let Some((m, at)) = machines
        .iter()
        .filter_map(|m| Some((m, done(m)?)))
        .max_by_key(|(_, at)| *at)
    {
        println!(
            "  slowest done: {} at {:.2} s (first DISCOVER at {:.2} s): {}",
            m.name,
            seconds_since(t0, at),
            seconds_since(t0, m.first_start().unwrap_or(t0)),
            m.timeline()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: tests/bench/boot-storm.sh"]
async fn boot_storm_against_kube_apiserver() {
    let s = Settings::from_env();
    let n = s.machines;
    println!(
        "== boot storm of {n} machines: kernel {:.2} MiB + initrd {:.2} MiB each ({:.2} GiB in all), {} reports each, HTTP maxConnections {}; load average at start {}",
        s.kernel_size as f64 / (1 << 20) as f64,
        s.initrd_size as f64 / (1 << 20) as f64,
        (s.kernel_size + s.initrd_size) as f64 * n as f64 / (1u64 << 30) as f64,
        s.reports,
        s.http_max_connections
            .map_or("512 (default)".to_string(), |n| n.to_string()),
        load_average()
    );
    let live = Live::on(ControlPlane::start_without_audit().await).await;
    live.install_crd().await;
    let api = live.machines();
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
    std::fs::create_dir_all(s.work.join("machines")).expect("mkdir");
    let manifests: String = (0..n)
        .map(|i| {
            format!(
                "---\napiVersion: provisioner.dev/v1alpha1\nkind: Machine\nmetadata: {{name: {}}}\nspec: {{macAddress: \"{}\", ipAddress: {}}}\n",
                name_of(i), mac_of(i), ip_of(i)
            )
        })
        .collect();
    std::fs::write(s.work.join("machines/all.yaml"), manifests).expect("manifests");
    client_addresses(&s, "add");

    let mut folder_done = true;
    if s.folder {
        println!(
            "-- folder mode, the reference (load average {})",
            load_average()
        );
        let inventory = format!("{{directory: {}}}", s.work.join("machines").display());
        let (dir, config) = netboot_dir(&s, "folder", &inventory);
        let mut netboot = Netboot::spawn(&s.provisioner, &dir, &config);
        let (ready, status) = netboot.ready();
        println!("  READY after {:.2} s: {status}", ready.as_secs_f64());
        let (machines, usage) = storm(&s, "folder", &netboot).await;
        let t0 = figures(&s, &machines, &usage);
        slowest(&machines, t0, |m| m.reported(s.reports));
        folder_done = machines.iter().all(|m| m.reported(s.reports).is_some());
        drop(netboot);
        // The folder-mode files are not needed any more: keep the disk use to one set.
        let _ = std::fs::remove_dir_all(dir.join("assets"));
    }

    println!("-- cluster mode (load average {})", load_average());
    let (seen, recorder) = watch_machines(api.clone()).await;
    let kubeconfig = s.work.join("agent.kubeconfig");
    std::fs::write(&kubeconfig, live.plane.kubeconfig(&live.agent_token)).expect("kubeconfig");
    let (dir, config) = netboot_dir(
        &s,
        "cluster",
        &format!("{{kubeconfig: {}}}", kubeconfig.display()),
    );
    let started = monotonic_ns();
    let mut netboot = Netboot::spawn(&s.provisioner, &dir, &config);
    let (ready, status) = netboot.ready();
    println!("  READY after {:.2} s: {status}", ready.as_secs_f64());
    wait_all_served(&seen, n, started).await;
    let (apiserver_pid, etcd_pid) = live.plane.pids();
    let apiserver_pid = apiserver_pid.expect("kube-apiserver runs");
    let server_cpu = || cpu_seconds(apiserver_pid) + cpu_seconds(etcd_pid);
    let requests_before = live.plane.request_counts().await;
    let server_cpu_before = server_cpu();
    println!("  storm starts (load average {})", load_average());
    let (machines, usage) = storm(&s, "cluster", &netboot).await;
    let t0 = figures(&s, &machines, &usage);
    // The reports are in netboot; their phase reaches the API through the status pipeline.
    let settle = Instant::now() + Duration::from_secs(60);
    let imaging = loop {
        let imaging = seen.lock().expect("seen").first_in("Imaging");
        if imaging.len() >= n || Instant::now() > settle {
            break imaging;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match imaging.values().max() {
        Some(last) if imaging.len() >= n => println!(
            "  all {n} Imaging in the API (watch) {:.2} s after the first DISCOVER",
            seconds_since(t0, *last)
        ),
        _ => println!(
            "  TIMEOUT: {} of {n} Imaging in the API (watch) 60 s after the client ended",
            imaging.len()
        ),
    }
    slowest(&machines, t0, |m| imaging.get(&m.name).copied());
    println!(
        "  kube-apiserver + etcd: CPU {:.2} s from the storm's start until all Imaging (or the timeout)",
        server_cpu() - server_cpu_before
    );
    print_requests(
        "during the storm",
        &requests_before,
        &live.plane.request_counts().await,
    );
    let (rss, peak) = memory(netboot.pid());
    println!("  netboot at the end: resident {rss:.1} MiB (peak {peak:.1} MiB since its start)");
    drop(netboot);
    recorder.abort();
    client_addresses(&s, "del");
    assert!(
        folder_done,
        "every machine got through the chain in folder mode"
    );
    assert_eq!(
        imaging.len(),
        n,
        "every Machine reached Imaging in the API (cluster mode)"
    );
}
