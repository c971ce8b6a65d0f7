//! `tests/bench/status-patch.sh`: 1000 Machines against an in-process mock API server; the time
//! from a phase change in the status store to that Machine's status patch reaching the server.
//! `cargo test -p agent --lib -- --ignored --exact cluster::tests::bench::status_patch_latency_1000_machines --nocapture`

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::{Client, Resource};
use netboot::{BootEvent, MachineLookup};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::harness::*;
use crate::cluster::controller::AddressRules;
use crate::cluster::crd::Machine;
use crate::machines::Table;
use crate::status::StatusStore;

const MACHINE_COUNT: usize = 1000;
const SEQUENTIAL_SAMPLES: usize = 200;

fn mac_of(i: usize) -> String {
    format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

fn ip_of(i: usize) -> String {
    format!("10.80.{}.{}", i / 250, i % 250 + 2)
}

/// Serves what the controller asks: lists (Machines, Nodes), watches (held open, never
/// answered), the CRD, Events; reports each status patch (machine, phase, arrival).
async fn mock_api_server(
    mut handle: ApiServerHandle,
    machines: Vec<Machine>,
    patches: mpsc::UnboundedSender<(String, String, Instant)>,
) {
    let mut held_watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let uri = request.uri().to_string();
        let method = request.method().clone();
        if method == Method::GET && uri.contains("watch=true") {
            held_watches.push(send);
            continue;
        }
        if method == Method::PATCH && uri.contains("/status?") {
            let arrived = Instant::now();
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            let name = uri
                .trim_start_matches(MACHINES)
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or_default()
                .to_string();
            let phase = body["status"]["phase"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let mut object = machines
                .iter()
                .find(|m| m.meta().name.as_deref() == Some(name.as_str()))
                .map(|m| serde_json::to_value(m).unwrap_or_default())
                .unwrap_or_default();
            object["status"] = body["status"].clone();
            respond(send, &object);
            let _ = patches.send((name, phase, arrived));
            continue;
        }
        if method == Method::GET && uri.starts_with(MACHINES) {
            respond(
                send,
                &json!({"apiVersion": "provisioner.dev/v1alpha1", "kind": "MachineList",
                        "metadata": {"resourceVersion": "1"}, "items": machines}),
            );
        } else if method == Method::GET && uri.starts_with("/api/v1/nodes") {
            respond(
                send,
                &json!({"apiVersion": "v1", "kind": "NodeList",
                        "metadata": {"resourceVersion": "1"}, "items": []}),
            );
        } else if method == Method::POST && uri.starts_with(EVENTS) {
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or_default();
            respond(send, &body);
        } else if uri.contains("customresourcedefinitions") {
            use kube::CustomResourceExt as _;
            respond(send, &Machine::crd());
        } else {
            respond_error(send, 404, "NotFound");
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: tests/bench/status-patch.sh"]
async fn status_patch_latency_1000_machines() {
    let rss_before = rss_kib();
    let machines: Vec<Machine> = (0..MACHINE_COUNT)
        .map(|i| with_finalizer(machine(&format!("m{i:04}"), &mac_of(i), &ip_of(i))))
        .collect();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (patch_tx, mut patch_rx) = mpsc::unbounded_channel();
    tokio::spawn(mock_api_server(handle, machines.clone(), patch_tx));

    let status = StatusStore::open(None);
    let table = Arc::new(Table::with_status(status.clone()));
    let shutdown = CancellationToken::new();
    let rules = AddressRules {
        subnet: "10.80.0.0/16".parse().expect("cidr"),
        reserved: vec![Ipv4Addr::new(10, 80, 0, 1)],
    };
    let started = Instant::now();
    let controller = tokio::spawn(crate::cluster::run(
        client,
        table.clone(),
        status.clone(),
        rules,
        Arc::new(crate::cluster::ApiState::default()),
        crate::cluster::Options::default(),
        shutdown.clone(),
    ));

    // Every Machine gets its first status (Pending) once.
    let mut first = std::collections::HashSet::new();
    while first.len() < MACHINE_COUNT {
        let (name, phase, _) = tokio::time::timeout(Duration::from_secs(120), patch_rx.recv())
            .await
            .expect("initial status patches within 120 s")
            .expect("mock server running");
        assert_eq!(phase, "Pending");
        first.insert(name);
    }
    let initial = started.elapsed();
    assert_eq!(table.len(), MACHINE_COUNT);
    // The start queues more reconciles (status store additions, the first list): wait
    // until no patch has come for a second, so samples do not queue behind them.
    let mut settled_after = 0usize;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), patch_rx.recv()).await {
        settled_after += 1;
    }
    let settled = started.elapsed();

    // One phase change at a time: the latency of a single change.
    let mut latencies = Vec::new();
    for i in 0..SEQUENTIAL_SAMPLES {
        let name = format!("m{i:04}");
        let served = table
            .by_mac(&mac_of(i).parse().expect("mac"))
            .expect("served");
        let changed = Instant::now();
        table.observe(&served, BootEvent::DhcpOffered);
        loop {
            let (patched, phase, arrived) =
                tokio::time::timeout(Duration::from_secs(10), patch_rx.recv())
                    .await
                    .expect("status patch within 10 s")
                    .expect("mock server running");
            if patched == name && phase == "PXEBooting" {
                latencies.push(arrived - changed);
                break;
            }
        }
    }
    latencies.sort();

    // All other machines change at once: time until every patch has arrived.
    while patch_rx.try_recv().is_ok() {}
    let burst_start = Instant::now();
    let mut pending: std::collections::HashSet<String> = (SEQUENTIAL_SAMPLES..MACHINE_COUNT)
        .map(|i| format!("m{i:04}"))
        .collect();
    let burst = pending.len();
    for i in SEQUENTIAL_SAMPLES..MACHINE_COUNT {
        let served = table
            .by_mac(&mac_of(i).parse().expect("mac"))
            .expect("served");
        table.observe(&served, BootEvent::DhcpOffered);
    }
    let mut burst_latencies = Vec::new();
    while !pending.is_empty() {
        let (name, phase, arrived) = tokio::time::timeout(Duration::from_secs(60), patch_rx.recv())
            .await
            .expect("burst patches within 60 s")
            .expect("mock server running");
        if phase == "PXEBooting" && pending.remove(&name) {
            burst_latencies.push(arrived - burst_start);
        }
    }
    burst_latencies.sort();
    let burst_total = burst_start.elapsed();
    let rss = rss_kib();
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("machines: {MACHINE_COUNT} (mock API server in process, tower-test)");
    println!(
        "first status of every Machine written in {:.0} ms; start-up reconciles done after {:.0} ms ({settled_after} more patches)",
        ms(initial),
        ms(settled)
    );
    println!(
        "phase change -> status patch, one at a time ({} samples): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        ms(percentile(&latencies, 1.0)),
    );
    println!(
        "phase change -> status patch, {burst} at once: median {:.1} ms, p99 {:.1} ms, all in {:.1} ms",
        ms(percentile(&burst_latencies, 0.5)),
        ms(percentile(&burst_latencies, 0.99)),
        ms(burst_total),
    );
    if let (Some(before), Some(after)) = (rss_before, rss) {
        println!(
            "resident memory of the process (controller + mock server + {MACHINE_COUNT} Machines): {:.1} MiB (test harness alone {:.1} MiB)",
            after as f64 / 1024.0,
            before as f64 / 1024.0
        );
    }
}
