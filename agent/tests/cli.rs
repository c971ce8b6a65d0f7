//! The `provisioner` binary as an operator meets it: exit codes, config errors, sd_notify
//! datagrams, and a clean SIGTERM. Runs unprivileged: every socket is on 127.0.0.1, port 0.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_provisioner");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let machines = dir.join("machines");
    std::fs::create_dir_all(&machines).expect("mkdir machines");
    std::fs::create_dir_all(dir.join("assets")).expect("mkdir assets");
    // netboot refuses to start without the boot files the configuration names.
    for file in ["undionly.kpxe", "snponly.efi", "vmlinuz", "initrd.img"] {
        std::fs::write(dir.join("assets").join(file), b"boot file").expect("write boot file");
    }
    std::fs::write(
        machines.join("node2.yaml"),
        "apiVersion: provisioner.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: node2\nspec:\n  macAddress: \"52:54:00:00:00:02\"\n  ipAddress: 10.77.0.2\n",
    )
    .expect("write manifest");
    let config = dir.join("provisioner.yaml");
    std::fs::write(
        &config,
        format!(
            "serverAddress: 10.77.0.1\nsubnet: 10.77.0.0/24\nbootFiles:\n  ipxeDir: {assets}\n  assetsDir: {assets}\nboot:\n  kernel: vmlinuz\n  initrd: initrd.img\nlisten:\n  dhcp: 127.0.0.1:0\n  tftp: 127.0.0.1:0\n  http: 127.0.0.1:0\ninventory:\n  directory: {machines}\n{extra}",
            assets = dir.join("assets").display(),
            machines = machines.display(),
        ),
    )
    .expect("write config");
    config
}

#[test]
fn config_errors_exit_2_and_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "leaseTme: 60\n");
    let out = Command::new(BIN)
        .args(["netboot", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("leaseTme"), "error names the key: {stderr}");

    let text = std::fs::read_to_string(&config)
        .expect("read")
        .replace("leaseTme: 60\n", "")
        .replace("10.77.0.0/24", "10.77.0.0/33");
    std::fs::write(&config, text).expect("write");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("subnet"),
        "{out:?}"
    );

    let out = Command::new(BIN)
        .args(["netboot", "--no-such-flag"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
}

/// Stops the daemon when a test fails half-way, so no server outlives its test.
/// A notify socket `dir/notify.sock` for a daemon's `NOTIFY_SOCKET`, read with `timeout`.
fn notify_socket(dir: &Path, timeout: Duration) -> (std::path::PathBuf, UnixDatagram) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    (path, socket)
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn recv_until(socket: &UnixDatagram, want: &str, deadline: Instant) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == want);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("notify socket: {e}"),
        }
    }
    panic!("no {want} within the deadline; got {seen:?}");
}

#[test]
fn notifies_ready_with_status_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let (notify_path, socket) = notify_socket(dir.path(), Duration::from_millis(200));

    let mut guard = KillOnDrop(
        Command::new(BIN)
            .args(["netboot", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let child = &mut guard.0;
    let ready = recv_until(&socket, "READY=1", Instant::now() + Duration::from_secs(20));
    let status = ready
        .iter()
        .flat_map(|m| m.lines())
        .find(|l| l.starts_with("STATUS="))
        .map(str::to_string);
    let status = status.expect("READY comes with a STATUS line");
    assert!(status.contains("serving 1 machine"), "{status}");
    assert!(
        status.contains("DHCP 127.0.0.1:")
            && status.contains("TFTP 127.0.0.1:")
            && status.contains("HTTP 127.0.0.1:"),
        "{status}"
    );
    assert!(status.contains("DHCP: stand-alone server"), "{status}");
    assert!(
        !status.contains("PXE "),
        "no boot-server port in stand-alone mode: {status}"
    );

    // A new manifest is picked up without a restart, and STATUS follows.
    std::fs::write(
        dir.path().join("machines/node3.yaml"),
        "apiVersion: provisioner.dev/v1alpha1\nkind: Machine\nmetadata:\n  name: node3\nspec:\n  macAddress: \"52:54:00:00:00:03\"\n  ipAddress: 10.77.0.3\n",
    )
    .expect("write manifest");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut updated = false;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !updated {
        if let Ok(n) = socket.recv(&mut buf) {
            updated = String::from_utf8_lossy(&buf[..n]).contains("serving 2 machine");
        }
    }
    if !updated {
        let _ = child.kill();
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        panic!("STATUS= did not report the second machine; stderr:\n{stderr}");
    }

    // A boot file that disappears shows in STATUS= (looked at again on SIGHUP, and every 30 s).
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::fs::remove_file(dir.path().join("assets/vmlinuz")).expect("rm kernel");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    let missing = format!(
        "boot files missing: boot.kernel: \"vmlinuz\" not found in {}",
        dir.path().join("assets").display()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut shown = false;
    while Instant::now() < deadline && !shown {
        if let Ok(n) = socket.recv(&mut buf) {
            shown = String::from_utf8_lossy(&buf[..n]).contains(&missing);
        }
    }
    assert!(shown, "STATUS= did not say: {missing}");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let stopping = recv_until(
        &socket,
        "STOPPING=1",
        Instant::now() + Duration::from_secs(15),
    );
    assert!(!stopping.is_empty());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}

/// A PXE boot-server request (UDP 4011) as EDK2 sends it for a BINL offer: DHCPREQUEST from
/// the client's address (`ciaddr`), PXEClient, architecture 7.
fn boot_server_request(mac: [u8; 6], ciaddr: [u8; 4]) -> Vec<u8> {
    let mut packet = vec![0u8; 236];
    packet[0] = 1; // BOOTREQUEST
    packet[1] = 1; // Ethernet
    packet[2] = 6;
    packet[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    packet[12..16].copy_from_slice(&ciaddr);
    packet[28..34].copy_from_slice(&mac);
    packet.extend_from_slice(&[99, 130, 83, 99]);
    packet.extend_from_slice(&[53, 1, 3]);
    packet.extend_from_slice(&[93, 2, 0, 7]);
    let class = b"PXEClient:Arch:00007:UNDI:003000";
    packet.extend_from_slice(&[60, class.len() as u8]);
    packet.extend_from_slice(class);
    packet.push(255);
    packet
}

#[test]
fn proxy_mode_says_so_and_answers_the_boot_server_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "dhcpMode: proxy\n");
    let text = std::fs::read_to_string(&config).expect("read").replace(
        "  http: 127.0.0.1:0\n",
        "  http: 127.0.0.1:0\n  pxe: 127.0.0.1:0\n",
    );
    std::fs::write(&config, text).expect("write");
    let (notify_path, socket) = notify_socket(dir.path(), Duration::from_millis(200));
    let mut guard = KillOnDrop(
        Command::new(BIN)
            .args(["netboot", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let ready = recv_until(&socket, "READY=1", Instant::now() + Duration::from_secs(20));
    let status = ready
        .iter()
        .flat_map(|m| m.lines())
        .find(|l| l.starts_with("STATUS="))
        .map(str::to_string)
        .expect("READY comes with a STATUS line");
    assert!(
        status.contains("DHCP: proxy beside the LAN's server"),
        "{status}"
    );
    let port: u16 = status
        .split("PXE 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no PXE boot-server socket in {status}"));

    let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind client");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    client
        .send_to(
            &boot_server_request([0x52, 0x54, 0, 0, 0, 2], [127, 0, 0, 1]),
            ("127.0.0.1", port),
        )
        .expect("send");
    let mut buf = [0u8; 1500];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("an ACK from the boot server");
    let ack = &buf[..n];
    assert!(n > 240, "{n} bytes");
    assert_eq!(ack[0], 2, "BOOTREPLY");
    assert_eq!(
        &ack[16..20],
        &[0, 0, 0, 0],
        "yiaddr: no address in proxy mode"
    );
    assert_eq!(&ack[20..24], &[10, 77, 0, 1], "siaddr: the TFTP server");
    assert!(
        ack[108..236].starts_with(b"snponly.efi\0"),
        "file: {:?}",
        String::from_utf8_lossy(&ack[108..236])
    );
    assert!(ack[240..].windows(3).any(|w| w == [53, 1, 5]), "a DHCPACK");

    let pid = nix::unistd::Pid::from_raw(guard.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = guard.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "clean exit after SIGTERM: {status:?}");
}

/// `inventory: {kubernetes: true}` under netboot.service takes the kubeconfig systemd passes as
/// the credential `kubeconfig` (`LoadCredential=`): the daemon talks to the API server named in
/// that file (a listener of this test), and without the credential it has no configuration.
#[test]
fn kubernetes_true_uses_the_kubeconfig_credential() {
    use std::io::Read;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).expect("read config");
    let machines_line = format!("  directory: {}\n", dir.path().join("machines").display());
    assert!(text.contains(&machines_line), "{text}");
    std::fs::write(
        &config,
        text.replace(&machines_line, "  kubernetes: true\n"),
    )
    .expect("write config");

    let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind API listener");
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).expect("mkdir credentials");
    std::fs::write(
        credentials.join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: test-token\n",
            api.local_addr().expect("addr")
        ),
    )
    .expect("write kubeconfig");
    let home = dir.path().join("home");
    std::fs::create_dir(&home).expect("mkdir home");
    let netboot = |credentials_dir: Option<&Path>| {
        let mut command = Command::new(BIN);
        command
            .args(["netboot", "--config"])
            .arg(&config)
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env_remove("NOTIFY_SOCKET")
            .env("HOME", &home)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(credentials_dir) = credentials_dir {
            command.env("CREDENTIALS_DIRECTORY", credentials_dir);
        }
        command
    };

    // No credential: no kubeconfig anywhere, the daemon gives up before serving.
    let out = netboot(None).output().expect("run");
    assert!(!out.status.success(), "{out:?}");

    let _guard = KillOnDrop(netboot(Some(&credentials)).spawn().expect("spawn"));
    let (mut accepted, _) = {
        let (tx, rx) = std::sync::mpsc::channel();
        let listener = api.try_clone().expect("clone listener");
        std::thread::spawn(move || {
            let _ = tx.send(listener.accept());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("netboot connected to the API server of the credential")
            .expect("accept")
    };
    accepted
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut request = [0u8; 2048];
    let n = accepted.read(&mut request).expect("read request");
    let request = String::from_utf8_lossy(&request[..n]);
    assert!(
        request.contains("Bearer test-token"),
        "request carries the credential's token: {request}"
    );
}

/// Collects `WATCHDOG=1` datagrams (their arrival times) for `window`.
fn keep_alives(socket: &UnixDatagram, window: Duration) -> Vec<Instant> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + window;
    while Instant::now() < end {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
            {
                seen.push(Instant::now());
            }
        }
    }
    seen
}

/// With `WatchdogSec=` systemd sets `WATCHDOG_USEC` and `WATCHDOG_PID`: netboot must send
/// `WATCHDOG=1` at least every WATCHDOG_USEC/2; with another process's `WATCHDOG_PID` it must
/// send none (the variables were meant for someone else).
#[test]
fn feeds_the_watchdog() {
    const WATCHDOG_USEC: u64 = 1_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let (notify_path, socket) = notify_socket(dir.path(), Duration::from_millis(100));
    // `exec` keeps the shell's PID, so WATCHDOG_PID=$$ is the daemon's own PID, as systemd
    // sets it.
    let netboot = |watchdog_pid: &str| {
        KillOnDrop(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "WATCHDOG_PID={watchdog_pid} exec \"$0\" netboot --config \"$1\""
                ))
                .arg(BIN)
                .arg(&config)
                .env("NOTIFY_SOCKET", &notify_path)
                .env("WATCHDOG_USEC", WATCHDOG_USEC.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn"),
        )
    };

    let daemon = netboot("$$");
    recv_until(&socket, "READY=1", Instant::now() + Duration::from_secs(20));
    let window = Duration::from_secs(3);
    let seen = keep_alives(&socket, window);
    drop(daemon);
    assert!(
        seen.len() >= 3,
        "{} WATCHDOG=1 in {window:?} with WATCHDOG_USEC={WATCHDOG_USEC}",
        seen.len()
    );
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or_default();
    // Sent every WATCHDOG_USEC/2; systemd's deadline is WATCHDOG_USEC: a gap that long would
    // have the service killed.
    assert!(
        longest < Duration::from_micros(WATCHDOG_USEC),
        "longest gap between keep-alives {longest:?} (all: {gaps:?})"
    );

    // Not our PID: no keep-alives, but the daemon still runs and says READY=1.
    let _other = netboot("1");
    recv_until(&socket, "READY=1", Instant::now() + Duration::from_secs(20));
    let seen = keep_alives(&socket, Duration::from_millis(1500));
    assert!(seen.is_empty(), "{} WATCHDOG=1 for another PID", seen.len());
}

/// A stand-in for kube-apiserver over plain HTTP: answers the Machine list (two Machines) only
/// once `release` is set, holds every watch open, and answers everything else with an empty
/// 200 (the agent logs and retries what it cannot use). Sets `listed` when the Machine list is
/// asked for.
fn fake_api_server(
    listener: std::net::TcpListener,
    listed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;

    const MACHINES: &str = r#"{"apiVersion":"provisioner.dev/v1alpha1","kind":"MachineList","metadata":{"resourceVersion":"7"},"items":[
{"apiVersion":"provisioner.dev/v1alpha1","kind":"Machine","metadata":{"name":"node2","uid":"u2","resourceVersion":"5","generation":1,"finalizers":["provisioner.dev/cleanup"]},"spec":{"macAddress":"52:54:00:00:00:02","ipAddress":"10.77.0.2"}},
{"apiVersion":"provisioner.dev/v1alpha1","kind":"Machine","metadata":{"name":"node3","uid":"u3","resourceVersion":"6","generation":1,"finalizers":["provisioner.dev/cleanup"]},"spec":{"macAddress":"52:54:00:00:00:03","ipAddress":"10.77.0.3"}}]}"#;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { return };
        let (listed, release) = (listed.clone(), release.clone());
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            let mut writer = stream;
            loop {
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                    return;
                }
                let mut length = 0usize;
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 {
                        return;
                    }
                    if header == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = header.split_once(':') {
                        if name.eq_ignore_ascii_case("content-length") {
                            length = value.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0u8; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let target = request_line.split(' ').nth(1).unwrap_or("").to_string();
                if target.contains("watch=true") {
                    // Held open until the test ends (the process is killed).
                    std::thread::sleep(Duration::from_secs(120));
                    return;
                }
                let answer = if request_line
                    .starts_with("GET /apis/provisioner.dev/v1alpha1/machines?")
                {
                    listed.store(true, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    MACHINES.to_string()
                } else if request_line.starts_with("GET /api/v1/nodes?") {
                    r#"{"apiVersion":"v1","kind":"NodeList","metadata":{"resourceVersion":"1"},"items":[]}"#.to_string()
                } else {
                    "{}".to_string()
                };
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                    answer.len()
                );
                if writer.write_all(response.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }
}

/// With the cluster inventory, READY=1 waits for the cluster's Machines: while the API server
/// holds back the Machine list, netboot says it is waiting and is not ready; once the list is
/// answered, READY=1 comes with both Machines served.
#[test]
fn ready_waits_for_the_cluster_inventory() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "cluster:\n  installCrd: false\n");
    let api = std::net::TcpListener::bind("127.0.0.1:0").expect("bind API listener");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://{}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: test-token\n",
            api.local_addr().expect("addr")
        ),
    )
    .expect("write kubeconfig");
    let text = std::fs::read_to_string(&config).expect("read config");
    let machines_line = format!("  directory: {}\n", dir.path().join("machines").display());
    std::fs::write(
        &config,
        text.replace(
            &machines_line,
            &format!("  kubeconfig: {}\n", kubeconfig.display()),
        ),
    )
    .expect("write config");
    let (listed, release) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (listed, release) = (listed.clone(), release.clone());
        std::thread::spawn(move || fake_api_server(api, listed, release));
    }
    let (notify_path, socket) = notify_socket(dir.path(), Duration::from_millis(100));
    let _daemon = KillOnDrop(
        Command::new(BIN)
            .args(["netboot", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );

    // Everything netboot says until it has asked for the Machines, and a little after.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !listed.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "netboot never listed the Machines"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut before = Vec::new();
    let mut buf = [0u8; 4096];
    let quiet_until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < quiet_until {
        if let Ok(n) = socket.recv(&mut buf) {
            before.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        !before
            .iter()
            .flat_map(|m| m.lines())
            .any(|l| l == "READY=1"),
        "READY=1 before the Machines were listed: {before:?}"
    );
    assert!(
        before
            .iter()
            .any(|m| m.contains("waiting for the cluster's Machines")),
        "STATUS= says what netboot waits for: {before:?}"
    );

    release.store(true, Ordering::SeqCst);
    let ready = recv_until(&socket, "READY=1", Instant::now() + Duration::from_secs(20));
    let status = ready
        .iter()
        .flat_map(|m| m.lines())
        .rfind(|l| l.starts_with("STATUS="))
        .map(str::to_string)
        .expect("READY comes with a STATUS line");
    assert!(status.contains("serving 2 machines"), "{status}");
}
