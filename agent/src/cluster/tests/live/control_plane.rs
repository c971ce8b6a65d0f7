//! A throwaway control plane for the live tests: etcd and kube-apiserver on 127.0.0.1 (and
//! kube-controller-manager when a test asks), from the unpacked binaries in `$KUBERNETES_BIN`
//! (`tests/kube-live.sh` sets it from `tests/lib-kube.sh`'s `kube_unpack`).
//!
//! Everything lives in a temporary directory: a CA and the API server's serving certificate
//! (openssl), the service-account key pair, a static admin token, an audit policy that records
//! every request of the agent's ServiceAccount, etcd's data. The processes are the test's own
//! children: each is stopped (SIGTERM, then SIGKILL) when its guard is dropped, also when the
//! test panics, and gets SIGKILL from the kernel should the test process die first
//! (`PR_SET_PDEATHSIG`: start them from the test's own future, not a spawned task, whose
//! worker thread may end earlier).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufRead as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::Client;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The user the agent's ServiceAccount token authenticates as (what `agent/deploy/rbac.yaml`
/// binds).
pub(super) const AGENT_USER: &str = "system:serviceaccount:kube-system:provisioner";

/// One child process; stopped when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn spawn(bin: &Path, name: &'static str, args: &[String], log: &Path) -> Process {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out.try_clone().expect("log file handle");
        let mut command = Command::new(bin.join(name));
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (KUBERNETES_BIN must hold the unpacked bundle)",
                bin.join(name).display()
            )
        });
        Process { name, child }
    }

    /// SIGTERM, up to 10 s to exit, then SIGKILL. Only this child's PID is signalled.
    fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within 10 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl (tests/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).expect("random bytes");
    hex::encode(buf)
}

pub(super) struct ControlPlane {
    // Dropped in this order: the controller manager, the API server, etcd, then the files.
    controller_manager: Option<Process>,
    apiserver: Option<Process>,
    etcd: Process,
    bin: PathBuf,
    dir: tempfile::TempDir,
    etcd_url: String,
    pub(super) api_port: u16,
    admin_token: String,
    /// From etcd's start to the API server's first `/readyz` 200.
    pub(super) ready_after: Duration,
    /// Whether kube-apiserver writes the audit log ([`ControlPlane::agent_requests`]).
    audit: bool,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until the API server is ready.
    pub(super) async fn start() -> ControlPlane {
        Self::start_with(true).await
    }

    /// Without the audit log (the benchmark counts requests from `/metrics` instead: the log
    /// costs the API server CPU per request).
    pub(super) async fn start_without_audit() -> ControlPlane {
        Self::start_with(false).await
    }

    async fn start_with(audit: bool) -> ControlPlane {
        let bin = std::env::var_os("KUBERNETES_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                "KUBERNETES_BIN is not set: it names the directory of the unpacked kube-apiserver, \
                 etcd and kube-controller-manager; tests/kube-live.sh sets it (or: \
                 KUBERNETES_BIN=$(bash -c '. tests/lib-kube.sh && kube_unpack'))"
            )
            });
        let dir = tempfile::Builder::new()
            .prefix("pv-kube-live.")
            .tempdir()
            .expect("temporary directory");
        let path = dir.path();
        make_credentials(path);
        let admin_token = random_hex(16);
        std::fs::write(
            path.join("tokens.csv"),
            format!("{admin_token},admin,admin,system:masters\n"),
        )
        .expect("token file");
        std::fs::write(
            path.join("audit-policy.yaml"),
            format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\nrules:\n- level: Metadata\n  users: [\"{AGENT_USER}\"]\n- level: None\n"
            ),
        )
        .expect("audit policy");

        let started = Instant::now();
        let (etcd_port, peer_port) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Process::spawn(
            &bin,
            "etcd",
            &[
                "--name=test".into(),
                format!("--data-dir={}", path.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=test={peer_url}"),
                // A throwaway store on a machine shared with other builds: no fsync per write.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &path.join("etcd.log"),
        );
        let mut plane = ControlPlane {
            controller_manager: None,
            apiserver: None,
            etcd,
            bin,
            etcd_url,
            api_port: free_port(),
            admin_token,
            ready_after: Duration::ZERO,
            audit,
            dir,
        };
        plane.start_apiserver().await;
        plane.ready_after = started.elapsed();
        println!(
            "control plane: etcd + kube-apiserver on 127.0.0.1:{} ready in {:.2} s",
            plane.api_port,
            plane.ready_after.as_secs_f64()
        );
        plane
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Starts kube-apiserver (on the same port each time) and waits for `/readyz`; returns how
    /// long that took.
    pub(super) async fn start_apiserver(&mut self) -> Duration {
        assert!(self.apiserver.is_none(), "kube-apiserver already runs");
        let mut args = vec![
            format!("--etcd-servers={}", self.etcd_url),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.api_port),
            format!("--tls-cert-file={}", self.path("apiserver.crt")),
            format!("--tls-private-key-file={}", self.path("apiserver.key")),
            format!("--client-ca-file={}", self.path("ca.crt")),
            format!("--token-auth-file={}", self.path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", self.path("sa.pub")),
            format!("--service-account-signing-key-file={}", self.path("sa.key")),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--enable-bootstrap-token-auth=true".into(),
            format!("--cert-dir={}", self.path("apiserver-certs")),
            "--profiling=false".into(),
        ];
        if self.audit {
            args.push(format!(
                "--audit-policy-file={}",
                self.path("audit-policy.yaml")
            ));
            args.push(format!("--audit-log-path={}", self.path("audit.log")));
        }
        let started = Instant::now();
        let mut process = Process::spawn(
            &self.bin,
            "kube-apiserver",
            &args,
            &self.dir.path().join("kube-apiserver.log"),
        );
        let client = self.admin_client().await;
        let deadline = started + Duration::from_secs(90);
        loop {
            let request = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            if let Ok(text) = client.request_text(request).await {
                if text.trim() == "ok" {
                    break;
                }
            }
            if let Some(status) = self.etcd.exited() {
                panic!("etcd exited ({status}):\n{}", self.log_tail("etcd.log"));
            }
            if let Some(status) = process.exited() {
                panic!(
                    "kube-apiserver exited ({status}) before it was ready:\n{}",
                    self.log_tail("kube-apiserver.log")
                );
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready within 90 s:\n{}",
                self.log_tail("kube-apiserver.log")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.apiserver = Some(process);
        started.elapsed()
    }

    /// Kills kube-apiserver (SIGKILL: a crash, connections reset at once) and waits until it
    /// is gone; etcd keeps running. A SIGTERM would do, but kube-apiserver then keeps the
    /// agent's open watches for over 10 s before it exits.
    pub(super) fn kill_apiserver(&mut self) {
        let mut process = self.apiserver.take().expect("kube-apiserver runs");
        let _ = process.child.kill();
        let _ = process.child.wait();
    }

    /// Starts kube-controller-manager with the given controllers (`--controllers=`), as the
    /// admin, without leader election or a serving port.
    pub(super) fn start_controller_manager(&mut self, controllers: &str) {
        assert!(self.controller_manager.is_none());
        let kubeconfig = self.write_admin_kubeconfig();
        let args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--controllers={controllers}"),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            format!("--service-account-private-key-file={}", self.path("sa.key")),
            format!("--root-ca-file={}", self.path("ca.crt")),
            format!("--cluster-signing-cert-file={}", self.path("ca.crt")),
            format!("--cluster-signing-key-file={}", self.path("ca.key")),
            "--use-service-account-credentials=false".into(),
        ];
        self.controller_manager = Some(Process::spawn(
            &self.bin,
            "kube-controller-manager",
            &args,
            &self.dir.path().join("kube-controller-manager.log"),
        ));
    }

    /// A kubeconfig for this API server with a bearer token and the CA (what the join's CA pin
    /// is taken from).
    pub(super) fn kubeconfig(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: live\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: live\n  context: {{cluster: live, user: user}}\ncurrent-context: live\n",
            self.api_port,
            self.path("ca.crt"),
        )
    }

    /// The `kube-public/cluster-info` ConfigMap `kubeadm init` publishes: the API server's
    /// address and CA, no user.
    pub(super) fn cluster_info(&self) -> k8s_openapi::api::core::v1::ConfigMap {
        use base64::Engine as _;
        let ca = std::fs::read(self.dir.path().join("ca.crt")).expect("ca.crt");
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority-data: {}\ncontexts: []\nusers: []\n",
            self.api_port,
            base64::engine::general_purpose::STANDARD.encode(ca)
        );
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "cluster-info", "namespace": "kube-public"},
            "data": {"kubeconfig": kubeconfig},
        }))
        .expect("ConfigMap")
    }

    /// `sha256:` of the CA's DER SubjectPublicKeyInfo, computed by openssl (kubeadm's
    /// `--discovery-token-ca-cert-hash`).
    pub(super) fn ca_pin(&self) -> String {
        use sha2::Digest as _;
        let pubkey = Command::new("openssl")
            .args(["x509", "-pubkey", "-noout", "-in", &self.path("ca.crt")])
            .output()
            .expect("openssl x509");
        let mut der = Command::new("openssl")
            .args(["pkey", "-pubin", "-outform", "der"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("openssl pkey");
        std::io::Write::write_all(&mut der.stdin.take().expect("stdin"), &pubkey.stdout)
            .expect("to openssl");
        let der = der.wait_with_output().expect("openssl pkey output");
        assert!(der.status.success() && !der.stdout.is_empty());
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&der.stdout)))
    }

    /// Writes a kubeconfig for `token` and connects with it the way the agent does.
    pub(super) async fn connect(
        &self,
        name: &str,
        token: &str,
    ) -> (Client, crate::cluster::join::ClusterFacts) {
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, self.kubeconfig(token)).expect("kubeconfig");
        crate::cluster::connect(Some(&path))
            .await
            .expect("client from kubeconfig")
    }

    /// The admin's kubeconfig as a file (for kubectl); returns its path.
    pub(super) fn write_admin_kubeconfig(&self) -> PathBuf {
        let path = self.dir.path().join("admin.kubeconfig");
        std::fs::write(&path, self.kubeconfig(&self.admin_token)).expect("kubeconfig");
        path
    }

    pub(super) async fn admin_client(&self) -> Client {
        self.connect("admin", &self.admin_token).await.0
    }

    /// The agent's requests so far, from the audit log (one record per finished request).
    pub(super) fn agent_requests(&self) -> Vec<AuditRecord> {
        let Ok(file) = File::open(self.dir.path().join("audit.log")) else {
            return Vec::new();
        };
        std::io::BufReader::new(file)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| serde_json::from_str::<Value>(&line).ok())
            .filter(|e| e["user"]["username"] == AGENT_USER && e["stage"] == "ResponseComplete")
            .map(|e| AuditRecord {
                verb: e["verb"].as_str().unwrap_or_default().to_string(),
                uri: e["requestURI"].as_str().unwrap_or_default().to_string(),
                resource: match (
                    e["objectRef"]["resource"].as_str(),
                    e["objectRef"]["subresource"].as_str(),
                ) {
                    (Some(r), Some(s)) => format!("{r}/{s}"),
                    (Some(r), None) => r.to_string(),
                    _ => String::new(),
                },
                code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
            })
            .collect()
    }

    /// The process IDs of kube-apiserver (when running) and etcd.
    pub(super) fn pids(&self) -> (Option<u32>, u32) {
        (
            self.apiserver.as_ref().map(|p| p.child.id()),
            self.etcd.child.id(),
        )
    }

    /// The API server's request counters (`apiserver_request_total` of `/metrics`) for the
    /// groups the agent uses, by verb, resource (with `/subresource`) and code.
    pub(super) async fn request_counts(&self) -> BTreeMap<(String, String, u16), u64> {
        self.apiserver_metric("apiserver_request_total")
            .await
            .into_iter()
            .map(|(k, v)| (k, v as u64))
            .collect()
    }

    /// One of the API server's request metrics (`/metrics`) for the groups the agent uses, by
    /// verb, resource (with `/subresource`) and code (0 where the metric has none), summed
    /// over its other labels.
    pub(super) async fn apiserver_metric(
        &self,
        metric: &str,
    ) -> BTreeMap<(String, String, u16), f64> {
        let client = self.admin_client().await;
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("request");
        let text = client.request_text(request).await.expect("/metrics");
        let prefix = format!("{metric}{{");
        let mut values = BTreeMap::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let Some((labels, value)) = rest.split_once("} ") else {
                continue;
            };
            let label = |key: &str| {
                labels
                    .split("\",")
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches('"').to_string())
                    .unwrap_or_default()
            };
            if !matches!(
                label("group").as_str(),
                "provisioner.dev" | "events.k8s.io" | "apiextensions.k8s.io"
            ) {
                continue;
            }
            let resource = match label("subresource").as_str() {
                "" => label("resource"),
                sub => format!("{}/{sub}", label("resource")),
            };
            let code = label("code").parse().unwrap_or(0);
            let value: f64 = value.trim().parse().unwrap_or(0.0);
            *values.entry((label("verb"), resource, code)).or_insert(0.0) += value;
        }
        values
    }

    pub(super) fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// One finished request of the agent, as the API server's audit log has it.
#[derive(Debug, Clone)]
pub(super) struct AuditRecord {
    pub(super) verb: String,
    pub(super) uri: String,
    /// `machines`, `machines/status`, `events`, …
    pub(super) resource: String,
    pub(super) code: u16,
}

impl AuditRecord {
    /// A request that failed. Not a watch answered 429: kube-apiserver refuses watches so
    /// ("storage is (re)initializing", with a Retry-After) while the watch cache of a resource it
    /// has just (re)created fills, whenever the agent happens to start watching then, and the
    /// watcher retries it. Any other answer from 400 on is a failure.
    pub(super) fn failed(&self) -> bool {
        self.code >= 400 && !(self.verb == "watch" && self.code == 429)
    }
}

/// A CA, the API server's serving certificate (127.0.0.1, localhost) signed by it, and the
/// service-account signing key pair; P-256 keys, valid for two days.
fn make_credentials(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "2",
        "-subj",
        "/CN=provisioner-live-ca",
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-subj", "/CN=kube-apiserver"];
    csr.extend(ec);
    csr.extend(["-keyout", "apiserver.key", "-out", "apiserver.csr"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("apiserver.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "sa.key",
        ],
    );
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}
