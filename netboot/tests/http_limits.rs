//! The HTTP server's limits on 127.0.0.1 with small values: slowloris from one address and
//! from many (the whole of 127.0.0.0/8 is local, so each client picks its own source
//! address), readers that stop or trickle, idle keep-alive connections, and a FIFO in the
//! served directory. Every check also fetches a file as a legitimate client while the abuse
//! goes on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use netboot::http::{serve, HttpLimits, HttpSettings, NetbootSite, ServeOptions, SHED_AFTER};
use netboot::ipxe::ScriptSettings;
use netboot::{MacAddr, Machine, MachineLookup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;

const BIG: u64 = 32 << 20;

struct Server {
    addr: SocketAddr,
    dir: PathBuf,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start(name: &str, limits: HttpLimits) -> Server {
    let dir = std::env::temp_dir().join(format!("netboot-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("assets")).expect("mkdir");
    std::fs::create_dir_all(dir.join("boot")).expect("mkdir");
    std::fs::write(dir.join("assets/small"), b"legitimate\n").expect("write");
    let big = std::fs::File::create(dir.join("assets/big.img")).expect("create");
    big.set_len(BIG).expect("set_len");
    nix::unistd::mkfifo(&dir.join("assets/fifo"), nix::sys::stat::Mode::S_IRUSR).expect("fifo");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let settings = Arc::new(HttpSettings {
        boot_dir: dir.join("boot"),
        assets_dir: dir.join("assets"),
        script: ScriptSettings {
            kernel: "vmlinuz".into(),
            initrd: "initrd.img".into(),
            cmdline: String::new(),
        },
        base_url: format!("http://{addr}"),
    });
    let machines: Arc<dyn MachineLookup> = Arc::new(HashMap::<MacAddr, Machine>::new());
    let shutdown = CancellationToken::new();
    tokio::spawn(serve(
        listener,
        NetbootSite::new(settings, machines),
        ServeOptions {
            grace: Duration::from_secs(1),
            limits,
        },
        shutdown.clone(),
    ));
    Server {
        addr,
        dir,
        shutdown,
    }
}

/// A connection from `source` (an address of 127.0.0.0/8), with a small receive buffer when
/// `rcvbuf` is given (set before connecting, so the window the server sees is small).
async fn connect_from(source: &str, addr: SocketAddr, rcvbuf: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    let source: IpAddr = source.parse().expect("source address");
    socket.bind(SocketAddr::new(source, 0)).expect("bind");
    socket.connect(addr).await.expect("connect")
}

/// A legitimate client from `source`: GET /assets/small, the status (0: no answer) and how
/// long it took.
async fn legitimate(source: &str, addr: SocketAddr) -> (u16, Duration) {
    let started = Instant::now();
    let run = async {
        let mut s = connect_from(source, addr, None).await;
        s.write_all(b"GET /assets/small HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.ok()?;
        let text = String::from_utf8_lossy(&raw).to_string();
        text.ends_with("legitimate\n")
            .then(|| text.get(9..12)?.parse().ok())
            .flatten()
    };
    let status = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .ok()
        .flatten()
        .unwrap_or(0);
    (status, started.elapsed())
}

/// Whether the server has closed `s` (EOF or reset) within `wait`; data sent before the close
/// (a 503) is read and ignored.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// One slowloris connection: a request line and then one header line every `every`, never
/// the blank line that ends the headers. Returns when the server closed it, with how long it
/// stayed open, or after `max`.
async fn slowloris(source: String, addr: SocketAddr, every: Duration, max: Duration) -> Duration {
    let started = Instant::now();
    let mut s = connect_from(&source, addr, None).await;
    if s.write_all(b"GET /assets/small HTTP/1.1\r\nHost: x\r\n")
        .await
        .is_err()
    {
        return started.elapsed();
    }
    let mut n = 0;
    while started.elapsed() < max {
        if closed_within(&mut s, every).await {
            return started.elapsed();
        }
        n += 1;
        if s.write_all(format!("X-Slow-{n}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            return started.elapsed();
        }
    }
    started.elapsed()
}

#[tokio::test]
async fn slowloris_from_one_address_is_capped_and_timed_out() {
    let srv = start(
        "slowloris",
        HttpLimits {
            max_connections: 64,
            max_connections_per_peer: 4,
            header_timeout: Duration::from_millis(800),
            ..HttpLimits::default()
        },
    )
    .await;
    let addr = srv.addr;
    let attack: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(slowloris(
                "127.0.0.1".into(),
                addr,
                Duration::from_millis(200),
                Duration::from_secs(8),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, took) = legitimate("127.0.0.2", addr).await;
    assert_eq!(status, 200, "legitimate client served during the attack");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let mut held = Vec::new();
    for a in attack {
        held.push(a.await.expect("attacker"));
    }
    held.sort();
    // Beyond the per-address cap a connection is closed at once; the 4 admitted are closed by
    // the header deadline although they keep sending header lines.
    let refused = held
        .iter()
        .filter(|d| **d < Duration::from_millis(500))
        .count();
    assert!(refused >= 96, "{refused} of 100 closed at once: {held:?}");
    assert!(
        held.iter().all(|d| *d < Duration::from_secs(4)),
        "every connection closed by the header deadline: {held:?}"
    );
}

#[tokio::test]
async fn slowloris_from_many_addresses_sheds_idle_connections() {
    let srv = start(
        "shedding",
        HttpLimits {
            max_connections: 8,
            max_connections_per_peer: 2,
            header_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        },
    )
    .await;
    let addr = srv.addr;
    // 40 connections from 20 addresses: five times the cap, each under the per-address cap.
    let hold = Duration::from_secs(12);
    let attack: Vec<_> = (0..40)
        .map(|i| {
            tokio::spawn(slowloris(
                format!("127.0.1.{}", 1 + i / 2),
                addr,
                Duration::from_millis(300),
                hold,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A connection keeps its place for SHED_AFTER, and newcomers are admitted in the order
    // they came: the 32 attackers queued before the first legitimate client take the table
    // four times over, each time once the last ones have waited SHED_AFTER. Far below the
    // header deadline (30 s): only shedding lets them in.
    let bound = SHED_AFTER * 5;
    for source in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let (status, took) = legitimate(source, addr).await;
        assert_eq!(status, 200, "{source} served while the table is full");
        assert!(took < bound, "{source} took {took:?}, more than {bound:?}");
    }
    let mut closed_early = 0;
    for a in attack {
        if a.await.expect("attacker") < hold {
            closed_early += 1;
        }
    }
    // The header deadline (30 s) closed none: only shedding did.
    assert!(closed_early >= 32, "{closed_early} of 40 shed");
}

#[tokio::test]
async fn reader_that_stops_is_cut_by_the_write_deadline() {
    let srv = start(
        "stalled",
        HttpLimits {
            write_timeout: Duration::from_millis(700),
            ..HttpLimits::default()
        },
    )
    .await;
    let addr = srv.addr;
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut s = connect_from("127.0.0.1", addr, Some(4096)).await;
        s.write_all(b"GET /assets/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        stalled.push(s);
    }
    let (status, _) = legitimate("127.0.0.2", addr).await;
    assert_eq!(status, 200);
    // Nobody reads for 2 s: the server gave up on every response by then.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for mut s in stalled {
        let mut got = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n as u64,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "connection closed by the server");
        assert!(got < BIG, "cut before the end: {got} bytes");
    }
}

#[tokio::test]
async fn readers_that_stop_from_many_addresses_make_room() {
    // A full table of responses nobody reads, from eight addresses; the write deadline (30 s)
    // is far: only making room lets the next client in.
    let srv = start(
        "stalled-many",
        HttpLimits {
            max_connections: 8,
            max_connections_per_peer: 1,
            write_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        },
    )
    .await;
    let addr = srv.addr;
    let mut stalled = Vec::new();
    for i in 10..18 {
        let mut s = connect_from(&format!("127.0.0.{i}"), addr, Some(4096)).await;
        s.write_all(b"GET /assets/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("request");
        stalled.push(s);
    }
    // Once their writes block (how soon depends on how fast the server fills the socket
    // buffers), a newcomer takes the place of one of them, long before the write deadline
    // would have freed any.
    let started = Instant::now();
    for source in ["127.0.0.2", "127.0.0.3"] {
        loop {
            let (status, _) = legitimate(source, addr).await;
            if status == 200 {
                break;
            }
            assert_eq!(status, 0, "refused (503) until then");
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{source} served while the table is full"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(stalled);
}

#[tokio::test]
async fn trickling_reader_is_cut_by_the_total_deadline() {
    // 32 MiB at 16 MiB/s with 1 s of slack: 3 s in all.
    let srv = start(
        "trickle",
        HttpLimits {
            min_rate: 16 << 20,
            response_slack: Duration::from_secs(1),
            write_timeout: Duration::from_secs(30),
            ..HttpLimits::default()
        },
    )
    .await;
    let mut s = connect_from("127.0.0.1", srv.addr, Some(4096)).await;
    s.write_all(b"GET /assets/big.img HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let started = Instant::now();
    let mut got = 0u64;
    let mut buf = vec![0u8; 8192];
    // 8 KiB every 50 ms (160 KiB/s): never stalled for the write deadline, far too slow for
    // the total one.
    while started.elapsed() < Duration::from_secs(4) {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n as u64,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then drain what the kernel still holds: the response must end short.
    let mut big = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut big).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "connection closed by the server");
    assert!(got < BIG, "cut before the end: {got} bytes");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let srv = start(
        "idle",
        HttpLimits {
            header_timeout: Duration::from_millis(500),
            ..HttpLimits::default()
        },
    )
    .await;
    let mut s = connect_from("127.0.0.1", srv.addr, None).await;
    s.write_all(b"GET /assets/small HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("request");
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.expect("response");
    assert_eq!(&first, b"HTTP/1.1 200");
    let started = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(started.elapsed() < Duration::from_secs(3));
    // A connection that never sends anything goes the same way.
    let mut silent = connect_from("127.0.0.1", srv.addr, None).await;
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

/// The server runs on a runtime with 4 blocking threads: a blocking open of the FIFO would
/// take one each, and the fifth request (and every file after it) would hang.
#[test]
fn a_fifo_is_refused_at_once_and_blocks_nothing() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    // Assertions after the runtime is let go of: a blocked thread would otherwise hold up the
    // runtime's drop, and the test would hang instead of failing.
    let (statuses, took, legit) = runtime.block_on(async {
        let srv = start("fifo", HttpLimits::default()).await;
        let addr = srv.addr;
        let started = Instant::now();
        let requests: Vec<_> = (0..100)
            .map(|i| {
                tokio::spawn(async move {
                    let source = format!("127.0.2.{}", 1 + i % 50);
                    let mut s = connect_from(&source, addr, None).await;
                    s.write_all(
                        b"GET /assets/fifo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .ok()?;
                    let mut raw = Vec::new();
                    let _ = s.read_to_end(&mut raw).await;
                    String::from_utf8_lossy(&raw).get(9..12).map(str::to_string)
                })
            })
            .collect();
        let mut statuses = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for r in requests {
            let status = tokio::time::timeout_at(deadline, r)
                .await
                .ok()
                .and_then(Result::ok)
                .flatten();
            statuses.push(status);
        }
        let took = started.elapsed();
        let (legit, _) = legitimate("127.0.0.2", addr).await;
        (statuses, took, legit)
    });
    runtime.shutdown_background();
    assert!(
        statuses.iter().all(|s| s.as_deref() == Some("404")),
        "{statuses:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(legit, 200, "files still served");
}
