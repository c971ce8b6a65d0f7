//! Controller scenarios against a mock API server (tower-test): each test runs `reconcile` while a
//! scenario task checks every request's method, path and body and answers it.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use netboot::{BootEvent, MacAddr, MachineLookup};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::controller::{self, AddressRules, Context};
use super::crd::{Machine, MachineSpec};
use crate::inventory::Table;
use crate::status::{Phase, StatusStore};

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const MACHINES: &str = "/apis/provisioner.dev/v1alpha1/machines";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn machine(name: &str, mac: &str, ip: &str) -> Machine {
    let mut m = Machine::new(
        name,
        MachineSpec {
            mac_address: mac.to_string(),
            ip_address: ip.to_string(),
            hostname: None,
            image: None,
            root_device: None,
            role: None,
            reimage: None,
        },
    );
    m.meta_mut().generation = Some(1);
    m.meta_mut().uid = Some(format!("uid-{name}"));
    m.meta_mut().resource_version = Some("1".to_string());
    m
}

fn with_finalizer(mut m: Machine) -> Machine {
    m.meta_mut().finalizers = Some(vec![controller::FINALIZER.to_string()]);
    m
}

struct Harness {
    ctx: Arc<Context>,
    table: Arc<Table>,
    status: Arc<StatusStore>,
    reconcile_all: mpsc::UnboundedReceiver<()>,
    _machines: Writer<Machine>,
    _nodes: Writer<Node>,
}

fn ready_store<K>(objects: Vec<K>) -> (Store<K>, Writer<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    (store, writer)
}

fn harness(machines: Vec<Machine>, nodes: Vec<Node>) -> (Harness, ApiServerHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (machine_store, machine_writer) = ready_store(machines);
    let (node_store, node_writer) = ready_store(nodes);
    let status = StatusStore::open(None);
    let table = Arc::new(Table::with_status(status.clone()));
    let (all_tx, all_rx) = mpsc::unbounded_channel();
    let rules = AddressRules {
        subnet: "10.77.0.0/24".parse().expect("cidr"),
        reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
    };
    let ctx = Arc::new(Context::new(
        client,
        machine_store,
        node_store,
        table.clone(),
        status.clone(),
        rules,
        all_tx,
    ));
    (
        Harness {
            ctx,
            table,
            status,
            reconcile_all: all_rx,
            _machines: machine_writer,
            _nodes: node_writer,
        },
        handle,
    )
}

/// Takes the next request, checks method and path (query included), returns its JSON body.
async fn expect_request(
    handle: &mut ApiServerHandle,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!(request.method(), method, "method of {}", request.uri());
    assert_eq!(request.uri().to_string(), path);
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = serde_json::from_slice(&bytes).expect("JSON body");
    (body, send)
}

fn respond(send: tower_test::mock::SendResponse<Response<Body>>, body: &impl serde::Serialize) {
    let bytes = serde_json::to_vec(body).expect("response JSON");
    send.send_response(
        Response::builder()
            .body(Body::from(bytes))
            .expect("response"),
    );
}

fn status_path(name: &str) -> String {
    format!("{MACHINES}/{name}/status?&force=true&fieldManager=provisioner")
}

/// Drops every `lastTransitionTime` after checking it is there (it is "now").
fn strip_transition_times(body: &mut Value) {
    if let Some(conditions) = body["status"]["conditions"].as_array_mut() {
        for c in conditions {
            let time = c
                .as_object_mut()
                .and_then(|c| c.remove("lastTransitionTime"));
            assert!(
                time.as_ref().and_then(Value::as_str).is_some(),
                "condition without lastTransitionTime: {c}"
            );
        }
    }
}

/// Answers a status apply with the machine carrying the patched status; returns the body
/// without transition times.
async fn expect_status_patch(handle: &mut ApiServerHandle, object: &Machine) -> Value {
    expect_status_patch_raw(handle, object).await.0
}

/// Also returns the status as sent (what the API server then stores).
async fn expect_status_patch_raw(handle: &mut ApiServerHandle, object: &Machine) -> (Value, Value) {
    let name = object.meta().name.clone().unwrap_or_default();
    let (body, send) = expect_request(handle, Method::PATCH, &status_path(&name)).await;
    let mut patched = serde_json::to_value(object).expect("machine JSON");
    patched["status"] = body["status"].clone();
    respond(send, &patched);
    let raw = body["status"].clone();
    let mut body = body;
    strip_transition_times(&mut body);
    (body, raw)
}

async fn expect_event(handle: &mut ApiServerHandle, name: &str) -> Value {
    let (body, send) = expect_request(handle, Method::POST, &format!("{EVENTS}?")).await;
    assert_eq!(body["regarding"]["name"], name, "{body}");
    assert_eq!(body["regarding"]["kind"], "Machine");
    assert_eq!(body["reportingController"], "provisioner");
    respond(send, &body);
    body
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn conditions(body: &Value) -> HashMap<String, (String, String)> {
    body["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().to_string(),
                (
                    c["status"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn new_machine_gets_the_finalizer_then_its_status_and_is_served() {
    let fresh = machine("node2", "52:54:00:00:00:02", "10.77.0.2");
    let (h, mut api) = harness(vec![fresh.clone()], vec![]);

    // First pass: only the finalizer is added (JSON patch guarded by a test op).
    let ctx = h.ctx.clone();
    let object = Arc::new(fresh.clone());
    let reconcile = tokio::spawn(controller::reconcile(object, ctx));
    within("finalizer patch", async {
        let (body, send) =
            expect_request(&mut api, Method::PATCH, &format!("{MACHINES}/node2?")).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["provisioner.dev/cleanup"]},
            ])
        );
        respond(send, &with_finalizer(fresh.clone()));
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");

    // Second pass (the patch's watch event): status by server-side apply.
    let object = with_finalizer(fresh.clone());
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(object.clone()),
        h.ctx.clone(),
    ));
    let (body, stored) = within("status patch", expect_status_patch_raw(&mut api, &object)).await;
    reconcile.await.expect("joined").expect("reconciled");
    assert_eq!(
        body,
        json!({
            "apiVersion": "provisioner.dev/v1alpha1",
            "kind": "Machine",
            "status": {
                "phase": "Pending",
                "progress": 0,
                "observedGeneration": 1,
                "conditions": [
                    {"type": "Served", "status": "True", "reason": "InInventory",
                     "message": "netboot answers this machine", "observedGeneration": 1},
                    {"type": "Conflict", "status": "False", "reason": "NoConflict",
                     "message": "", "observedGeneration": 1},
                ],
            },
        })
    );
    let mac: MacAddr = "52:54:00:00:00:02".parse().expect("mac");
    assert_eq!(
        h.table.by_mac(&mac).map(|m| m.ip),
        Some(Ipv4Addr::new(10, 77, 0, 2))
    );
    assert_eq!(h.status.get("node2").map(|s| s.phase), Some(Phase::Pending));

    // A boot event moves it to PXEBooting: the status follows and a Normal Event is posted.
    let served = h.table.by_mac(&mac).expect("served");
    h.table.observe(&served, BootEvent::DhcpOffered);
    let mut object = object;
    object.status = Some(serde_json::from_value(stored).expect("status as stored"));
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(object.clone()),
        h.ctx.clone(),
    ));
    within("phase change", async {
        let body = expect_status_patch(&mut api, &object).await;
        assert_eq!(body["status"]["phase"], "PXEBooting");
        assert_eq!(body["status"]["message"], "DHCP offer sent");
        assert!(body["status"]["lastSeen"].is_string(), "{body}");
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["reason"], "PXEBooting");
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["note"], "Pending -> PXEBooting: DHCP offer sent");
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
}

#[tokio::test]
async fn duplicate_mac_flags_both_machines_and_serves_neither() {
    let a = with_finalizer(machine("a", "52:54:00:00:00:0a", "10.77.0.10"));
    let b = with_finalizer(machine("b", "52:54:00:00:00:0a", "10.77.0.11"));
    let c = with_finalizer(machine("c", "52:54:00:00:00:0c", "10.77.0.12"));
    let (mut h, mut api) = harness(vec![a.clone(), b.clone(), c.clone()], vec![]);
    for (object, other) in [(&a, "b"), (&b, "a")] {
        let name = object.meta().name.clone().unwrap_or_default();
        let reconcile = tokio::spawn(controller::reconcile(
            Arc::new(object.clone()),
            h.ctx.clone(),
        ));
        within("conflict status and event", async {
            let body = expect_status_patch(&mut api, object).await;
            let conds = conditions(&body);
            assert_eq!(
                conds.get("Conflict"),
                Some(&("True".to_string(), "DuplicateAddress".to_string())),
                "{body}"
            );
            assert_eq!(
                conds.get("Served"),
                Some(&("False".to_string(), "Conflict".to_string()))
            );
            let message = body["status"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("macAddress 52:54:00:00:00:0a")
                    && message.contains(&format!("Machine {other}")),
                "{message}"
            );
            let event = expect_event(&mut api, &name).await;
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["reason"], "Conflict");
        })
        .await;
        reconcile.await.expect("joined").expect("reconciled");
    }
    let all = h.table.all();
    let served: Vec<&str> = all.values().map(|m| m.name.as_str()).collect();
    assert_eq!(served, ["c"], "neither claimant is served");
    assert!(h.status.get("a").is_none() && h.status.get("b").is_none());
    assert!(
        h.reconcile_all.try_recv().is_ok(),
        "a new conflict has every Machine reconciled again"
    );
}

#[tokio::test]
async fn ip_outside_the_subnet_is_invalid_and_not_served() {
    let far = with_finalizer(machine("far", "52:54:00:00:00:04", "10.78.0.4"));
    let (h, mut api) = harness(vec![far.clone()], vec![]);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(far.clone()), h.ctx.clone()));
    within("invalid status and event", async {
        let body = expect_status_patch(&mut api, &far).await;
        assert_eq!(
            conditions(&body).get("Served"),
            Some(&("False".to_string(), "InvalidSpec".to_string()))
        );
        assert_eq!(
            body["status"]["message"],
            "spec.ipAddress: 10.78.0.4 is not a host address of subnet 10.77.0.0/24"
        );
        assert_eq!(body["status"]["phase"], "Pending");
        let event = expect_event(&mut api, "far").await;
        assert_eq!(event["reason"], "InvalidSpec");
        assert_eq!(event["type"], "Warning");
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    assert_eq!(h.table.len(), 0);
}

#[tokio::test]
async fn deletion_stops_serving_and_removes_the_finalizer() {
    let mut gone = with_finalizer(machine("node2", "52:54:00:00:00:02", "10.77.0.2"));
    let live = gone.clone();
    gone.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let (h, mut api) = harness(vec![gone.clone()], vec![]);
    // It was served before the deletion.
    let verdicts = controller::judge(&[Arc::new(live)], &h.ctx.rules, None);
    h.table.replace(verdicts.served);
    assert_eq!(h.table.len(), 1);
    assert!(h.status.get("node2").is_some());

    let reconcile = tokio::spawn(controller::reconcile(Arc::new(gone.clone()), h.ctx.clone()));
    within("finalizer removal", async {
        let (body, send) = expect_request(&mut api, Method::PATCH, &format!("{MACHINES}/node2?")).await;
        assert_eq!(
            body,
            json!([
                {"op": "test", "path": "/metadata/finalizers/0", "value": "provisioner.dev/cleanup"},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ])
        );
        let mut done = gone.clone();
        done.meta_mut().finalizers = None;
        respond(send, &done);
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    assert_eq!(h.table.len(), 0, "a deleted machine is not served");
    assert!(h.status.get("node2").is_none(), "its status entry is gone");
}

#[tokio::test]
async fn ready_node_marks_a_joining_machine_ready() {
    let m = with_finalizer(machine("node2", "52:54:00:00:00:02", "10.77.0.2"));
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node2"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("node");
    let (h, mut api) = harness(vec![m.clone()], vec![node]);
    let verdicts = controller::judge(&[Arc::new(m.clone())], &h.ctx.rules, None);
    h.table.replace(verdicts.served);
    h.status
        .report("node2", crate::status::Report::Joining)
        .expect("known");
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(m.clone()), h.ctx.clone()));
    within("ready status", async {
        let body = expect_status_patch(&mut api, &m).await;
        assert_eq!(body["status"]["phase"], "Ready");
        assert_eq!(body["status"]["nodeName"], "node2");
        assert_eq!(
            conditions(&body).get("NodeReady"),
            Some(&("True".to_string(), "NodeReady".to_string()))
        );
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    assert_eq!(h.status.get("node2").map(|s| s.phase), Some(Phase::Ready));
}

#[test]
fn judge_matches_the_folder_rules() {
    let rules = AddressRules {
        subnet: "10.77.0.0/24".parse().expect("cidr"),
        reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
    };
    let machines: Vec<Arc<Machine>> = [
        machine("a", "52:54:00:00:00:0a", "10.77.0.10"),
        machine("b", "52:54:00:00:00:0b", "10.77.0.10"),
        machine("c", "52:54:00:00:00:0c", "10.77.0.1"),
        machine("d", "01:00:5e:00:00:01", "10.77.0.13"),
        machine("e", "52:54:00:00:00:0e", "10.77.0.14"),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let v = controller::judge(&machines, &rules, None);
    let served: Vec<&str> = v.served.values().map(|m| m.name.as_str()).collect();
    assert_eq!(served, ["e"]);
    let problems: Vec<&str> = v.problems.keys().map(String::as_str).collect();
    assert_eq!(problems, ["a", "b", "c", "d"]);
    assert!(v.problems["a"]
        .message()
        .contains("ipAddress 10.77.0.10 is also claimed by Machine b"));
    assert!(v.problems["c"].message().contains("server or gateway"));
    assert!(v.problems["d"].message().contains("multicast"));
    // Leaving machines claim nothing: without b, a is served.
    let v = controller::judge(&machines, &rules, Some("b"));
    assert!(v.served.values().any(|m| m.name == "a"));
}

/// Against a real cluster (`KUBECONFIG`): run with
/// `cargo test -p agent -- --ignored cluster::tests::live` (see README). Installs the CRD by
/// server-side apply, runs the controller, creates Machines and watches their status.
mod live {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DeleteParams, PatchParams, PostParams};
    use kube::{Api, CustomResourceExt};
    use tokio_util::sync::CancellationToken;

    async fn wait_for<T>(
        what: &str,
        mut check: impl FnMut() -> futures_util::future::BoxFuture<'static, Option<T>>,
    ) -> T {
        for _ in 0..60 {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    #[ignore = "needs the cluster named by KUBECONFIG"]
    async fn live_machines_get_status_conflicts_and_finalizers() {
        let client = crate::cluster::client(None)
            .await
            .expect("KUBECONFIG client");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        crds.patch(
            "machines.provisioner.dev",
            &PatchParams::apply("provisioner-test").force(),
            &kube::api::Patch::Apply(Machine::crd()),
        )
        .await
        .expect("CRD applied");
        tokio::time::sleep(Duration::from_secs(2)).await;

        let api: Api<Machine> = Api::all(client.clone());
        for name in ["live-a", "live-b", "live-c"] {
            let _ = api.delete(name, &DeleteParams::default()).await;
        }
        let status = StatusStore::open(None);
        let table = Arc::new(Table::with_status(status.clone()));
        let shutdown = CancellationToken::new();
        let rules = AddressRules {
            subnet: "10.77.0.0/24".parse().expect("cidr"),
            reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
        };
        let controller = tokio::spawn(crate::cluster::run(
            client.clone(),
            table.clone(),
            status.clone(),
            rules,
            Arc::new(crate::cluster::ApiState::default()),
            shutdown.clone(),
        ));

        let pp = PostParams::default();
        api.create(&pp, &machine("live-a", "52:54:00:77:00:0a", "10.77.0.10"))
            .await
            .expect("create a");
        let a_api = api.clone();
        let a = wait_for("live-a Served", move || {
            let api = a_api.clone();
            Box::pin(async move {
                let m = api.get("live-a").await.ok()?;
                let s = m.status.clone()?;
                (s.phase.as_deref() == Some("Pending")
                    && s.conditions
                        .iter()
                        .any(|c| c.type_ == "Served" && c.status == "True"))
                .then_some(m)
            })
        })
        .await;
        assert!(a
            .meta()
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == controller::FINALIZER));
        assert_eq!(table.len(), 1);

        // Same MAC: both flagged, neither served.
        api.create(&pp, &machine("live-b", "52:54:00:77:00:0a", "10.77.0.11"))
            .await
            .expect("create b");
        for name in ["live-a", "live-b"] {
            let api = api.clone();
            wait_for("Conflict", move || {
                let api = api.clone();
                Box::pin(async move {
                    let s = api.get(name).await.ok()?.status?;
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Conflict" && c.status == "True")
                        .then_some(())
                })
            })
            .await;
        }
        assert_eq!(table.len(), 0);

        // Deleting b resolves the conflict; b's finalizer is removed and it goes away.
        api.delete("live-b", &DeleteParams::default())
            .await
            .expect("delete b");
        let gone_api = api.clone();
        wait_for("live-b gone", move || {
            let api = gone_api.clone();
            Box::pin(async move { api.get_opt("live-b").await.ok()?.is_none().then_some(()) })
        })
        .await;
        let t = table.clone();
        wait_for("live-a served again", move || {
            let n = t.len();
            Box::pin(async move { (n == 1).then_some(()) })
        })
        .await;
        api.delete("live-a", &DeleteParams::default())
            .await
            .expect("delete a");
        shutdown.cancel();
        let _ = controller.await;
    }
}
