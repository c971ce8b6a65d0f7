//! The whole controller (`cluster::run`: watch, verdicts, reconciles, status writes) against a
//! mock API server that keeps its objects as kube-apiserver does: every write gets a new
//! resourceVersion and a watch event, a status apply that changes nothing gets neither. Time is
//! paused: a sleep returns once every task is idle, and the 300 s resync passes in an instant.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use netboot::provisioning::ProgressReport;
use netboot::{BootEvent, MachineLookup};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::harness::*;
use crate::cluster::controller::{AddressRules, FINALIZER};
use crate::cluster::crd::Machine;
use crate::machines::Table;
use crate::status::{Phase, StatusStore};

/// What the mock server saw.
#[derive(Default)]
struct Writes {
    /// Status applies per Machine, changed or not.
    status: BTreeMap<String, usize>,
    /// Finalizer patches per Machine.
    finalizer: BTreeMap<String, usize>,
    /// Anything else that is not a read or an Event.
    other: Vec<String>,
}

struct MockState {
    objects: BTreeMap<String, Value>,
    version: u64,
    /// Every change: its resourceVersion and watch event line.
    log: Vec<(u64, String)>,
    /// Machine watches waiting for an event after their resourceVersion.
    held: Vec<(u64, tower_test::mock::SendResponse<Response<Body>>)>,
}

impl MockState {
    fn change(&mut self, name: &str, object: Value) -> Value {
        self.version += 1;
        let mut object = object;
        object["metadata"]["resourceVersion"] = self.version.to_string().into();
        self.objects.insert(name.to_string(), object.clone());
        let line = json!({"type": "MODIFIED", "object": object}).to_string();
        self.log.push((self.version, line));
        self.release();
        object
    }

    /// Answers every held watch that has events now (the watch then ends, and the client
    /// watches again from its last resourceVersion, as after a server-side timeout).
    fn release(&mut self) {
        let held = std::mem::take(&mut self.held);
        for (from, send) in held {
            let lines: Vec<&str> = self
                .log
                .iter()
                .filter(|(v, _)| *v > from)
                .map(|(_, l)| l.as_str())
                .collect();
            if lines.is_empty() {
                self.held.push((from, send));
            } else {
                let body = lines.join("\n") + "\n";
                send.send_response(Response::new(Body::from(body.into_bytes())));
            }
        }
    }
}

fn query_value(uri: &str, key: &str) -> Option<String> {
    uri.split(['?', '&'])
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

async fn mock_api_server(
    mut handle: ApiServerHandle,
    machines: Vec<Machine>,
    writes: Arc<Mutex<Writes>>,
) {
    let mut state = MockState {
        objects: BTreeMap::new(),
        version: 1,
        log: Vec::new(),
        held: Vec::new(),
    };
    for m in machines {
        let mut object = serde_json::to_value(&m).expect("machine JSON");
        object["metadata"]["resourceVersion"] = "1".into();
        state
            .objects
            .insert(m.metadata.name.clone().unwrap_or_default(), object);
    }
    let mut node_watches = Vec::new();
    while let Some((request, send)) = handle.next_request().await {
        let uri = request.uri().to_string();
        let method = request.method().clone();
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let watch = query_value(&uri, "watch").as_deref() == Some("true");
        if method == Method::GET && uri.starts_with("/api/v1/nodes") {
            if watch {
                node_watches.push(send);
            } else {
                respond(
                    send,
                    &json!({"apiVersion": "v1", "kind": "NodeList",
                            "metadata": {"resourceVersion": "1"}, "items": []}),
                );
            }
        } else if method == Method::GET && uri.starts_with(&format!("{MACHINES}?")) {
            if watch {
                let from = query_value(&uri, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                state.held.push((from, send));
                state.release();
            } else {
                let items: Vec<&Value> = state.objects.values().collect();
                respond(
                    send,
                    &json!({"apiVersion": "provisioner.dev/v1alpha1", "kind": "MachineList",
                            "metadata": {"resourceVersion": state.version.to_string()},
                            "items": items}),
                );
            }
        } else if method == Method::PATCH && uri.starts_with(&format!("{MACHINES}/")) {
            let path = uri.trim_start_matches(MACHINES).trim_start_matches('/');
            let name = path
                .split(['/', '?'])
                .next()
                .unwrap_or_default()
                .to_string();
            let Some(mut object) = state.objects.get(&name).cloned() else {
                respond_error(send, 404, "NotFound");
                continue;
            };
            if path.contains("/status?") {
                *writes
                    .lock()
                    .expect("writes")
                    .status
                    .entry(name.clone())
                    .or_default() += 1;
                // Server-side apply of the whole status: an unchanged status is a no-op (no
                // new resourceVersion, no watch event), as on kube-apiserver.
                if object["status"] == body["status"] {
                    respond(send, &object);
                } else {
                    object["status"] = body["status"].clone();
                    let stored = state.change(&name, object);
                    respond(send, &stored);
                }
            } else {
                *writes
                    .lock()
                    .expect("writes")
                    .finalizer
                    .entry(name.clone())
                    .or_default() += 1;
                object["metadata"]["finalizers"] = json!([FINALIZER]);
                let stored = state.change(&name, object);
                respond(send, &stored);
            }
        } else if method == Method::POST && uri.starts_with(EVENTS) {
            respond(send, &body);
        } else if method == Method::GET && uri.contains("customresourcedefinitions") {
            use kube::CustomResourceExt as _;
            respond(send, &Machine::crd());
        } else {
            writes
                .lock()
                .expect("writes")
                .other
                .push(format!("{method} {uri}"));
            respond_error(send, 404, "NotFound");
        }
    }
}

/// Every status change is written once; nothing is written again when nothing changed: not
/// after the write's own watch event, not on the 300 s resync.
#[tokio::test(start_paused = true)]
async fn one_status_write_per_change_and_none_on_resync() {
    let names = ["a", "b", "c"];
    let machines: Vec<Machine> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            new_machine(
                n,
                &format!("52:54:00:00:01:{i:02x}"),
                &format!("10.77.0.{}", 10 + i),
            )
        })
        .collect();
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let writes = Arc::new(Mutex::new(Writes::default()));
    tokio::spawn(mock_api_server(handle, machines, writes.clone()));

    let status = StatusStore::open(None);
    let table = Arc::new(Table::with_status(status.clone()));
    let shutdown = CancellationToken::new();
    let controller = tokio::spawn(crate::cluster::run(
        Client::new(service, "default"),
        table.clone(),
        status.clone(),
        AddressRules {
            subnet: "10.77.0.0/24".parse().expect("cidr"),
            reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
        },
        Arc::new(crate::cluster::ApiState::default()),
        crate::cluster::Options::default(),
        shutdown.clone(),
    ));
    let counts = || {
        let w = writes.lock().expect("writes");
        assert!(w.other.is_empty(), "unexpected requests: {:?}", w.other);
        names
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    (
                        w.finalizer.get(*n).copied().unwrap_or(0),
                        w.status.get(*n).copied().unwrap_or(0),
                    ),
                )
            })
            .collect::<HashMap<String, (usize, usize)>>()
    };
    // Returns once every task is idle (time is paused and only advances then).
    let settle = || tokio::time::sleep(Duration::from_secs(1));

    settle().await;
    assert_eq!(table.len(), 3);
    for n in names {
        assert_eq!(
            counts()[n],
            (1, 1),
            "{n}: one finalizer patch, one status write"
        );
    }

    // A DHCP offer (phase and lastSeen change) and stage2's progress: one write each.
    let a = table
        .by_mac(&"52:54:00:00:01:00".parse().expect("mac"))
        .expect("a served");
    table.observe(&a, BootEvent::DhcpOffered);
    settle().await;
    assert_eq!(counts()["a"], (1, 2), "PXEBooting written once");
    let b = table
        .by_mac(&"52:54:00:00:01:01".parse().expect("mac"))
        .expect("b served");
    let token = status.start_imaging(&b).expect("token");
    settle().await;
    for progress in [10, 20] {
        status
            .imaging_report(
                "b",
                b.ip.into(),
                &token,
                ProgressReport::Imaging {
                    progress,
                    bytes: None,
                    rate: None,
                    message: None,
                },
            )
            .expect("report");
        settle().await;
    }
    assert_eq!(status.get("b").map(|s| s.phase), Some(Phase::Imaging));
    assert_eq!(
        counts()["b"],
        (1, 4),
        "PXEBooting, 10 %, 20 %: three writes after the first"
    );
    let before_resync = counts();

    // The resync reconciles every Machine again: nothing changed, nothing is written.
    tokio::time::sleep(Duration::from_secs(301)).await;
    settle().await;
    assert_eq!(counts(), before_resync, "no write on resync");

    shutdown.cancel();
    let _ = controller.await;
}
