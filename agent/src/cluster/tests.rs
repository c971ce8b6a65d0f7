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
use super::install::CrdState;
use super::join::{BootstrapToken, BootstrapTokens, ClusterFacts, JoinSettings, JoinSource as _};
use crate::cloudinit::JoinParams;
use crate::inventory::Table;
use crate::status::{Phase, StatusStore};
use netboot::provisioning::Refusal;

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
    assert!(
        super::rbac::covered(method.as_str(), path),
        "{method} {path} is not in cluster::rbac::PERMISSIONS"
    );
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
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

/// An API error answer (`Status` object), as kube-apiserver sends it.
fn respond_error(send: tower_test::mock::SendResponse<Response<Body>>, code: u16, reason: &str) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (mock)"), "reason": reason, "code": code,
    });
    let bytes = serde_json::to_vec(&body).expect("status JSON");
    send.send_response(
        Response::builder()
            .status(code)
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

const SECRETS: &str = "/api/v1/namespaces/kube-system/secrets";
const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";
const RSA_CA: &str = include_str!("../../tests/fixtures/ca/rsa-ca.crt");
/// `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum` of RSA_CA.
const RSA_PIN: &str = "sha256:c8db4b1e216949657508fa485788e5a38a23c4babce0a9d5b313742b8309b03c";

fn tokens_for(h: &Harness, api_endpoint: Option<&str>) -> Arc<BootstrapTokens> {
    let tokens = Arc::new(BootstrapTokens::new(
        h.ctx.client.clone(),
        h.status.clone(),
        JoinSettings {
            token_ttl: Duration::from_secs(3600),
            api_endpoint: api_endpoint.map(str::to_string),
        },
        ClusterFacts::default(),
    ));
    tokens.attach(h.ctx.machines.clone());
    tokens
}

/// node2 served, its imaging started (a provisioning token issued), the disk imaged.
fn imaged_node2() -> (Harness, ApiServerHandle, Machine) {
    let (h, api, m, _) = imaged_node2_with_token();
    (h, api, m)
}

/// [`imaged_node2`] and node2's provisioning token.
fn imaged_node2_with_token() -> (Harness, ApiServerHandle, Machine, String) {
    let m = with_finalizer(machine("node2", "52:54:00:00:00:02", "10.77.0.2"));
    let (h, api) = harness(vec![m.clone()], vec![]);
    let verdicts = controller::judge(&[Arc::new(m.clone())], &h.ctx.rules, None);
    h.table.replace(verdicts.served);
    let served = h
        .table
        .by_mac(&"52:54:00:00:00:02".parse().expect("mac"))
        .expect("served");
    let token = h.status.start_imaging(&served).expect("provisioning token");
    h.status
        .report("node2", crate::status::Report::Imaged)
        .expect("known");
    (h, api, m, token)
}

async fn answer_cluster_info(api: &mut ApiServerHandle) {
    use base64::Engine as _;
    let (_, send) = expect_request(api, Method::GET, CLUSTER_INFO_PATH).await;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    server: https://10.77.0.1:6443\n    certificate-authority-data: {}\ncontexts: []\nusers: []\n",
        base64::engine::general_purpose::STANDARD.encode(RSA_CA)
    );
    respond(
        send,
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "cluster-info", "namespace": "kube-public"},
                "data": {"kubeconfig": kubeconfig}}),
    );
}

fn secret_list_path(machine: &str) -> String {
    format!("{SECRETS}?&labelSelector=provisioner.dev%2Fmachine%3D{machine}%2Capp.kubernetes.io%2Fmanaged-by%3Dprovisioner")
}

/// A Secret as the API server returns it: `stringData` folded into base64 `data`.
fn as_stored(mut secret: Value) -> Value {
    use base64::Engine as _;
    let mut data = serde_json::Map::new();
    if let Some(fields) = secret["stringData"].as_object() {
        for (k, v) in fields {
            let text = v.as_str().unwrap_or_default();
            data.insert(
                k.clone(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
    }
    if let Some(o) = secret.as_object_mut() {
        o.remove("stringData");
        o.insert("data".into(), Value::Object(data));
    }
    secret
}

fn secret_list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "SecretList", "metadata": {"resourceVersion": "5"}, "items": items})
}

async fn no_more_requests(api: &mut ApiServerHandle) {
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_millis(200), api.next_request()).await
    {
        panic!("unexpected request {} {}", request.method(), request.uri());
    }
}

/// The first user-data request of a provisioning creates the token Secret; the second reuses
/// it; an agent restarted mid-provisioning finds it by label instead of making another.
#[tokio::test]
async fn one_token_secret_per_provisioning() {
    let (h, mut api, _) = imaged_node2();
    let tokens = tokens_for(&h, None);
    let before = k8s_openapi::jiff::Timestamp::now();

    let first = tokio::spawn({
        let tokens = tokens.clone();
        async move { tokens.join_params("node2").await }
    });
    let created = within("token Secret creation", async {
        answer_cluster_info(&mut api).await;
        let (list, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        assert_eq!(list, Value::Null);
        respond(send, &secret_list(vec![]));
        let (body, send) = expect_request(&mut api, Method::POST, &format!("{SECRETS}?")).await;
        respond(send, &as_stored(body.clone()));
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["reason"], "BootstrapTokenCreated");
        assert_eq!(event["type"], "Normal");
        let name = body["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            event["note"].as_str().unwrap_or_default().contains(name),
            "{event}"
        );
        assert!(
            !event
                .to_string()
                .contains(body["stringData"]["token-secret"].as_str().unwrap_or("-")),
            "the Event does not carry the token secret"
        );
        body
    })
    .await;
    let params = first
        .await
        .expect("joined")
        .expect("join params")
        .expect("some");

    // The Secret kubeadm's authenticator reads.
    assert_eq!(created["type"], "bootstrap.kubernetes.io/token");
    assert_eq!(created["metadata"]["namespace"], "kube-system");
    let data = &created["stringData"];
    let id = data["token-id"].as_str().expect("token-id");
    let secret = data["token-secret"].as_str().expect("token-secret");
    assert_eq!(created["metadata"]["name"], format!("bootstrap-token-{id}"));
    let alnum = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    assert!(alnum(id, 6) && alnum(secret, 16), "{id}.<secret>");
    assert_eq!(data["usage-bootstrap-authentication"], "true");
    assert_eq!(data["usage-bootstrap-signing"], "true");
    assert_eq!(
        data["auth-extra-groups"],
        "system:bootstrappers:kubeadm:default-node-token"
    );
    assert!(data["description"]
        .as_str()
        .unwrap_or_default()
        .contains("node2"));
    let mut keys: Vec<&str> = data
        .as_object()
        .expect("stringData")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "auth-extra-groups",
            "description",
            "expiration",
            "token-id",
            "token-secret",
            "usage-bootstrap-authentication",
            "usage-bootstrap-signing"
        ]
    );
    let expires: k8s_openapi::jiff::Timestamp = data["expiration"]
        .as_str()
        .expect("expiration")
        .parse()
        .expect("RFC 3339");
    let ttl = expires.duration_since(before).as_secs();
    assert!(
        (3598..=3601).contains(&ttl),
        "expires in {ttl} s, configured 3600"
    );
    let provisioning = h.status.provisioning_id("node2").expect("provisioning");
    assert_eq!(
        created["metadata"]["labels"],
        json!({"provisioner.dev/machine": "node2",
               "provisioner.dev/provisioning": provisioning,
               "app.kubernetes.io/managed-by": "provisioner"})
    );
    assert_eq!(
        params,
        JoinParams {
            api_endpoint: "10.77.0.1:6443".into(),
            token: format!("{id}.{secret}"),
            ca_cert_hashes: vec![RSA_PIN.into()],
        }
    );

    // A second request of the same provisioning: same token, no new Secret.
    let second = tokio::spawn({
        let tokens = tokens.clone();
        async move { tokens.join_params("node2").await }
    });
    within("second request", answer_cluster_info(&mut api)).await;
    let again = second
        .await
        .expect("joined")
        .expect("join params")
        .expect("some");
    assert_eq!(again.token, params.token);
    no_more_requests(&mut api).await;

    // Restarted agent (empty memory): the Secret is found by its labels and reused.
    let restarted = tokens_for(&h, Some("cp.example:6443"));
    let third = tokio::spawn(async move { restarted.join_params("node2").await });
    within("after a restart", async {
        answer_cluster_info(&mut api).await;
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        let mut stored = as_stored(created.clone());
        stored["metadata"]["resourceVersion"] = json!("7");
        respond(send, &secret_list(vec![stored]));
    })
    .await;
    let third = third
        .await
        .expect("joined")
        .expect("join params")
        .expect("some");
    assert_eq!(third.token, params.token);
    assert_eq!(
        third.api_endpoint, "cp.example:6443",
        "the configured endpoint wins"
    );
    no_more_requests(&mut api).await;
}

/// A new provisioning (reimage) replaces the old provisioning's Secret.
#[tokio::test]
async fn a_new_provisioning_replaces_the_old_token_secret() {
    let (h, mut api, _) = imaged_node2();
    let tokens = tokens_for(&h, Some("10.77.0.1:6443"));
    let old = super::join::token_secret(
        &BootstrapToken::generate().expect("token"),
        "node2",
        "00000000deadbeef",
        k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1),
    );
    let old = as_stored(serde_json::to_value(&old).expect("secret JSON"));
    let old_name = old["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let task = tokio::spawn(async move { tokens.join_params("node2").await });
    within("replacement", async {
        answer_cluster_info(&mut api).await;
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond(send, &secret_list(vec![old.clone()]));
        let (_, send) =
            expect_request(&mut api, Method::DELETE, &format!("{SECRETS}/{old_name}?")).await;
        respond(send, &old);
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["reason"], "BootstrapTokenDeleted");
        let (body, send) = expect_request(&mut api, Method::POST, &format!("{SECRETS}?")).await;
        assert_ne!(body["metadata"]["name"], old_name.as_str());
        respond(send, &as_stored(body));
        assert_eq!(
            expect_event(&mut api, "node2").await["reason"],
            "BootstrapTokenCreated"
        );
    })
    .await;
    task.await.expect("joined").expect("join params");
}

fn stored_token_secret(machine: &str, provisioning: &str, expires_in_hours: i64) -> Value {
    let secret = super::join::token_secret(
        &BootstrapToken::generate().expect("token"),
        machine,
        provisioning,
        k8s_openapi::jiff::Timestamp::now()
            + k8s_openapi::jiff::SignedDuration::from_hours(expires_in_hours),
    );
    as_stored(serde_json::to_value(&secret).expect("secret JSON"))
}

async fn expect_token_deleted(api: &mut ApiServerHandle, secret: &Value, why: &str) {
    let name = secret["metadata"]["name"].as_str().unwrap_or_default();
    let (_, send) = expect_request(api, Method::DELETE, &format!("{SECRETS}/{name}?")).await;
    respond(send, secret);
    let event = expect_event(api, "node2").await;
    assert_eq!(event["reason"], "BootstrapTokenDeleted");
    assert!(
        event["note"].as_str().unwrap_or_default().contains(why),
        "{event}"
    );
}

#[tokio::test]
async fn the_token_secret_is_deleted_when_the_node_is_ready() {
    let (h, mut api, mut m) = imaged_node2();
    let tokens = tokens_for(&h, None);
    h.status
        .report("node2", crate::status::Report::Joining)
        .expect("known");
    m.status = Some(crate::cluster::crd::MachineStatus {
        phase: Some("Joining".into()),
        ..Default::default()
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node2"},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }))
    .expect("node");
    let (_, node_writer) = ready_store(vec![node]);
    let ctx = Arc::new(
        Context::new(
            h.ctx.client.clone(),
            h.ctx.machines.clone(),
            node_writer.as_reader(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens)),
    );
    let secret = stored_token_secret("node2", &h.status.provisioning_id("node2").expect("id"), 1);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(m.clone()), ctx));
    within("Ready, then the token Secret deleted", async {
        let body = expect_status_patch(&mut api, &m).await;
        assert_eq!(body["status"]["phase"], "Ready");
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["reason"], "Ready");
        assert_eq!(event["note"], "Joining -> Ready: node is Ready");
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond(send, &secret_list(vec![secret.clone()]));
        expect_token_deleted(&mut api, &secret, "the node has joined").await;
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    no_more_requests(&mut api).await;
}

#[tokio::test]
async fn the_token_secret_is_deleted_with_the_machine() {
    let (h, mut api, m) = imaged_node2();
    let tokens = tokens_for(&h, None);
    let mut gone = m.clone();
    gone.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let ctx = Arc::new(
        Context::new(
            h.ctx.client.clone(),
            h.ctx.machines.clone(),
            h.ctx.nodes.clone(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens)),
    );
    let secret = stored_token_secret("node2", "0123456789abcdef", 1);
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(gone.clone()), ctx));
    within("token Secret deleted, then the finalizer removed", async {
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond(send, &secret_list(vec![secret.clone()]));
        expect_token_deleted(&mut api, &secret, "the Machine is deleted").await;
        let (body, send) =
            expect_request(&mut api, Method::PATCH, &format!("{MACHINES}/node2?")).await;
        assert_eq!(
            body[1],
            json!({"op": "remove", "path": "/metadata/finalizers/0"})
        );
        let mut done = gone.clone();
        done.meta_mut().finalizers = None;
        respond(send, &done);
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
}

/// The API server failing the Secret cleanup keeps the finalizer (retried), so the token
/// does not outlive its Machine unnoticed.
#[tokio::test]
async fn a_failed_token_cleanup_keeps_the_finalizer() {
    let (h, mut api, m) = imaged_node2();
    let mut gone = m.clone();
    gone.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let ctx = Arc::new(
        Context::new(
            h.ctx.client.clone(),
            h.ctx.machines.clone(),
            h.ctx.nodes.clone(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens_for(&h, None))),
    );
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(gone), ctx));
    within("list fails", async {
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond_error(send, 500, "InternalError");
    })
    .await;
    assert!(
        reconcile.await.expect("joined").is_err(),
        "reconcile fails and is retried"
    );
    no_more_requests(&mut api).await;
}

/// The sweep deletes what can no longer serve: expired, orphaned, earlier provisioning.
#[tokio::test]
async fn the_sweep_deletes_expired_and_orphaned_token_secrets() {
    let (h, mut api, _) = imaged_node2();
    let tokens = tokens_for(&h, None);
    let current = h.status.provisioning_id("node2").expect("id");
    let keep = stored_token_secret("node2", &current, 1);
    let expired = stored_token_secret("node2", &current, -1);
    let earlier = stored_token_secret("node2", "00000000deadbeef", 1);
    let orphan = stored_token_secret("gone", "0123456789abcdef", 1);
    let task = tokio::spawn(async move { tokens.sweep().await });
    within("sweep", async {
        let (_, send) = expect_request(
            &mut api,
            Method::GET,
            &format!("{SECRETS}?&labelSelector=provisioner.dev%2Fmachine%2Capp.kubernetes.io%2Fmanaged-by%3Dprovisioner"),
        )
        .await;
        respond(send, &secret_list(vec![keep.clone(), expired.clone(), earlier.clone(), orphan.clone()]));
        expect_token_deleted(&mut api, &expired, "expired").await;
        // Same Event again for the same Machine: kube's Recorder patches it into a series.
        let name = earlier["metadata"]["name"].as_str().unwrap_or_default();
        let (_, send) = expect_request(&mut api, Method::DELETE, &format!("{SECRETS}/{name}?")).await;
        respond(send, &earlier);
        let (request, send) = api.next_request().await.expect("a request");
        let path = request.uri().to_string();
        assert_eq!(request.method(), Method::PATCH, "{path}");
        assert!(path.starts_with(&format!("{EVENTS}/node2.")), "{path}");
        assert!(super::rbac::covered("PATCH", &path), "{path}");
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let patch: Value = serde_json::from_slice(&bytes).expect("JSON");
        assert_eq!(patch["series"]["count"], 2, "{patch}");
        respond(send, &patch);
        // No Machine "gone" in the store: deleted without an Event.
        let name = orphan["metadata"]["name"].as_str().unwrap_or_default();
        let (_, send) = expect_request(&mut api, Method::DELETE, &format!("{SECRETS}/{name}?")).await;
        respond(send, &orphan);
    })
    .await;
    assert_eq!(task.await.expect("joined").expect("swept"), 3);
    no_more_requests(&mut api).await;
}

#[tokio::test]
async fn no_join_without_a_cluster() {
    use super::join::JoinSource as _;
    assert_eq!(
        super::join::NoJoin.join_params("node2").await.expect("ok"),
        None
    );
}

/// netboot's imaging side for the harness's machines, with join parameters from `tokens`.
fn imaging_with(h: &Harness, tokens: Arc<BootstrapTokens>) -> Arc<crate::provisioning::Imaging> {
    imaging_for(&h.status, &h.table, tokens)
}

fn imaging_for(
    status: &Arc<StatusStore>,
    table: &Arc<Table>,
    tokens: Arc<BootstrapTokens>,
) -> Arc<crate::provisioning::Imaging> {
    use crate::provisioning::{Imaging, NodeCloudInit};
    let image = crate::config::Image {
        url: "http://10.77.0.1:8080/node.raw".into(),
        sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
        size: None,
    };
    Arc::new(
        Imaging::new(
            status.clone(),
            table.clone(),
            Some(image),
            netboot::provisioning::LocalBoot::Auto,
        )
        .with_cloud_init(NodeCloudInit {
            hooks: crate::cloudinit::Hooks::default(),
            base_url: "http://10.77.0.1".into(),
        })
        .with_join(tokens),
    )
}

fn fetch_user_data(
    imaging: &Arc<crate::provisioning::Imaging>,
    token: &str,
) -> tokio::task::JoinHandle<Result<netboot::provisioning::CloudInitDocument, Refusal>> {
    use netboot::provisioning::{CloudInitFile, Provisioning as _};
    let (imaging, token) = (imaging.clone(), token.to_string());
    tokio::spawn(async move { imaging.cloud_init(&token, CloudInitFile::UserData).await })
}

/// Answers a first token request: cluster-info, no Secret yet, the created Secret, its Event.
/// Returns the Secret as created.
async fn answer_token_creation(api: &mut ApiServerHandle) -> Value {
    answer_cluster_info(api).await;
    let (_, send) = expect_request(api, Method::GET, &secret_list_path("node2")).await;
    respond(send, &secret_list(vec![]));
    let (body, send) = expect_request(api, Method::POST, &format!("{SECRETS}?")).await;
    respond(send, &as_stored(body.clone()));
    assert_eq!(
        expect_event(api, "node2").await["reason"],
        "BootstrapTokenCreated"
    );
    body
}

/// The kubeadm JoinConfiguration of a node's user-data.
fn join_configuration(user_data: &str) -> serde_yaml::Value {
    let doc: serde_yaml::Value = serde_yaml::from_str(user_data).expect("user-data YAML");
    let content = doc["write_files"]
        .as_sequence()
        .and_then(|files| {
            files
                .iter()
                .find(|f| f["path"].as_str() == Some(crate::cloudinit::JOIN_CONFIG_PATH))
        })
        .and_then(|f| f["content"].as_str())
        .unwrap_or_else(|| panic!("no JoinConfiguration in {user_data}"));
    serde_yaml::from_str(content).expect("JoinConfiguration YAML")
}

/// A user-data request for an imaged Machine makes its bootstrap token Secret and serves a
/// JoinConfiguration with that token, the CA pin and the endpoint; the token's second fetch is
/// refused without a new Secret.
#[tokio::test]
async fn user_data_carries_the_join_of_a_new_token_secret() {
    let (h, mut api, _, token) = imaged_node2_with_token();
    let imaging = imaging_with(&h, tokens_for(&h, None));

    let first = fetch_user_data(&imaging, &token);
    let created = within(
        "token Secret for user-data",
        answer_token_creation(&mut api),
    )
    .await;
    let doc = first.await.expect("joined").expect("user-data served");
    assert_eq!(doc.machine, "node2");
    let id = created["stringData"]["token-id"]
        .as_str()
        .expect("token-id");
    let secret = created["stringData"]["token-secret"]
        .as_str()
        .expect("token-secret");
    let config = join_configuration(&doc.text);
    assert_eq!(config["kind"].as_str(), Some("JoinConfiguration"));
    let bootstrap = &config["discovery"]["bootstrapToken"];
    assert_eq!(
        bootstrap["token"].as_str(),
        Some(format!("{id}.{secret}").as_str())
    );
    assert_eq!(
        bootstrap["apiServerEndpoint"].as_str(),
        Some("10.77.0.1:6443")
    );
    assert_eq!(bootstrap["caCertHashes"][0].as_str(), Some(RSA_PIN));
    assert_eq!(
        bootstrap["caCertHashes"].as_sequence().map(Vec::len),
        Some(1)
    );
    assert_eq!(config["nodeRegistration"]["name"].as_str(), Some("node2"));
    let status = h.status.get("node2").expect("node2");
    assert_eq!(status.phase, Phase::Imaged);
    assert_eq!(status.message, "cloud-init user-data served");

    // Single use: refused before the cluster is asked anything.
    let again = fetch_user_data(&imaging, &token).await.expect("joined");
    assert_eq!(
        again,
        Err(Refusal::Replayed {
            machine: "node2".into()
        })
    );
    no_more_requests(&mut api).await;
    assert!(h
        .status
        .get("node2")
        .expect("node2")
        .message
        .contains("refused"));
}

/// The `UserDataReplayed` condition of a status patch body.
fn replay_condition(body: &Value) -> Option<Value> {
    body["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == controller::CONDITION_USER_DATA_REPLAYED)
        .cloned()
}

/// A refused user-data replay is raised on the Machine: a `UserDataReplayed` condition with the
/// time of the refused fetch in the status patch and a Warning Event; the next provisioning
/// (a new token) clears the condition.
#[tokio::test]
async fn a_user_data_replay_is_raised_as_a_condition_and_an_event() {
    let (h, mut api, m, token) = imaged_node2_with_token();
    h.status.take_user_data(&token).expect("first fetch served");
    assert_eq!(
        h.status.take_user_data(&token),
        Err(Refusal::Replayed {
            machine: "node2".into()
        })
    );
    let replayed_usec = h
        .status
        .get("node2")
        .expect("node2")
        .user_data_replayed_usec;
    let replayed =
        k8s_openapi::jiff::Timestamp::from_microsecond(i64::try_from(replayed_usec).expect("usec"))
            .expect("time");

    let reconcile = tokio::spawn(controller::reconcile(Arc::new(m.clone()), h.ctx.clone()));
    let stored = within("status patch with the condition, then its Event", async {
        let (body, raw) = expect_status_patch_raw(&mut api, &m).await;
        assert_eq!(
            conditions(&body).get(controller::CONDITION_USER_DATA_REPLAYED),
            Some(&("True".to_string(), "TokenReused".to_string())),
            "{body}"
        );
        let condition = replay_condition(&body).expect("condition");
        let message = condition["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("last at {replayed}")),
            "the time of the refused fetch: {message}"
        );
        assert_eq!(condition["observedGeneration"], 1);
        assert_eq!(
            body["status"]["message"],
            "user-data requested again with a used token: refused"
        );
        // Served and Conflict as usual: the replay does not stop netboot serving the machine.
        assert_eq!(
            conditions(&body).get("Served"),
            Some(&("True".to_string(), "InInventory".to_string()))
        );
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "UserDataReplayed");
        assert_eq!(event["action"], "ServeUserData");
        assert_eq!(event["note"], message);
        assert!(
            !event.to_string().contains(&token),
            "the Event does not carry the token"
        );
        raw
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    no_more_requests(&mut api).await;

    // The next provisioning: a new token, the condition is gone from the applied status.
    let mut m = m;
    m.status = Some(serde_json::from_value(stored).expect("stored status"));
    let served = h
        .table
        .by_mac(&"52:54:00:00:00:02".parse().expect("mac"))
        .expect("served");
    h.status.start_imaging(&served).expect("new token");
    let reconcile = tokio::spawn(controller::reconcile(Arc::new(m.clone()), h.ctx.clone()));
    within("status patch without the condition", async {
        let body = expect_status_patch(&mut api, &m).await;
        assert_eq!(replay_condition(&body), None, "{body}");
        let event = expect_event(&mut api, "node2").await;
        assert_eq!(event["type"], "Normal");
        assert_eq!(event["reason"], body["status"]["phase"]);
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    no_more_requests(&mut api).await;
}

/// The API server refusing (403) or failing: 503 for cloud-init to retry, a status message,
/// and the token unspent: the retry gets its user-data.
#[tokio::test]
async fn user_data_waits_for_the_api_server() {
    let (h, mut api, _, token) = imaged_node2_with_token();
    let imaging = imaging_with(&h, tokens_for(&h, None));

    let refused = fetch_user_data(&imaging, &token);
    within("forbidden Secret list", async {
        answer_cluster_info(&mut api).await;
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond_error(send, 403, "Forbidden");
    })
    .await;
    let refusal = refused.await.expect("joined").expect_err("no user-data");
    let Refusal::Unavailable { machine, reason } = &refusal else {
        panic!("expected Unavailable, got {refusal:?}");
    };
    assert_eq!(machine, "node2");
    assert!(reason.contains("Forbidden"), "{reason}");
    let status = h.status.get("node2").expect("node2");
    assert_eq!(status.phase, Phase::Imaged, "the phase stays");
    assert!(
        status.message.contains("no kubeadm join parameters")
            && status.message.contains("Forbidden"),
        "{}",
        status.message
    );

    // The API server failing on the create: the same.
    let failed = fetch_user_data(&imaging, &token);
    within("failed Secret create", async {
        answer_cluster_info(&mut api).await;
        let (_, send) = expect_request(&mut api, Method::GET, &secret_list_path("node2")).await;
        respond(send, &secret_list(vec![]));
        let (_, send) = expect_request(&mut api, Method::POST, &format!("{SECRETS}?")).await;
        respond_error(send, 500, "InternalError");
    })
    .await;
    assert!(matches!(
        failed.await.expect("joined"),
        Err(Refusal::Unavailable { .. })
    ));

    // The token still works once the API server answers.
    let retry = fetch_user_data(&imaging, &token);
    let created = within("retry", answer_token_creation(&mut api)).await;
    let doc = retry.await.expect("joined").expect("user-data served");
    let id = created["stringData"]["token-id"]
        .as_str()
        .expect("token-id");
    assert!(
        join_configuration(&doc.text)["discovery"]["bootstrapToken"]["token"]
            .as_str()
            .is_some_and(|t| t.starts_with(&format!("{id}."))),
        "{}",
        doc.text
    );
    assert_eq!(
        h.status.get("node2").expect("node2").message,
        "cloud-init user-data served"
    );
}

const CRD_PATH: &str =
    "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/machines.provisioner.dev";

#[tokio::test]
async fn the_crd_is_applied_on_start() {
    use kube::CustomResourceExt as _;
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let task = tokio::spawn(super::install::ensure_crd(client, true));
    within("CRD apply", async {
        let (body, send) = expect_request(
            &mut api,
            Method::PATCH,
            &format!("{CRD_PATH}?&force=true&fieldManager=provisioner"),
        )
        .await;
        let expected = serde_json::to_value(Machine::crd()).expect("CRD JSON");
        assert_eq!(body, expected);
        assert_eq!(body["apiVersion"], "apiextensions.k8s.io/v1");
        assert_eq!(body["kind"], "CustomResourceDefinition");
        assert_eq!(body["spec"]["scope"], "Cluster");
        respond(send, &body);
    })
    .await;
    assert_eq!(task.await.expect("joined").expect("ok"), CrdState::Applied);
}

#[tokio::test]
async fn a_forbidden_crd_apply_uses_the_installed_crd() {
    use kube::CustomResourceExt as _;
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let task = tokio::spawn(super::install::ensure_crd(client.clone(), true));
    within("403, then the CRD is read", async {
        let (_, send) = expect_request(
            &mut api,
            Method::PATCH,
            &format!("{CRD_PATH}?&force=true&fieldManager=provisioner"),
        )
        .await;
        respond_error(send, 403, "Forbidden");
        let (_, send) = expect_request(&mut api, Method::GET, CRD_PATH).await;
        respond(send, &Machine::crd());
    })
    .await;
    assert_eq!(task.await.expect("joined").expect("ok"), CrdState::Existing);

    // Forbidden and not installed: a clear error naming the fix.
    let task = tokio::spawn(super::install::ensure_crd(client, true));
    within("403, then 404", async {
        let (_, send) = expect_request(
            &mut api,
            Method::PATCH,
            &format!("{CRD_PATH}?&force=true&fieldManager=provisioner"),
        )
        .await;
        respond_error(send, 403, "Forbidden");
        let (_, send) = expect_request(&mut api, Method::GET, CRD_PATH).await;
        respond_error(send, 404, "NotFound");
    })
    .await;
    match task.await.expect("joined").expect("ok") {
        CrdState::Missing(message) => {
            assert!(message.contains("machines.provisioner.dev"), "{message}");
            assert!(message.contains("may not install it"), "{message}");
            assert!(
                message.contains("provisioner crd | kubectl apply --server-side -f -"),
                "{message}"
            );
        }
        other => panic!("expected Missing, got {other:?}"),
    }
}

/// `tests/bench/status-patch.sh`: 1000 Machines against an in-process mock API server; the time
/// from a phase change in the status store to that Machine's status patch reaching the server.
/// `cargo test -p agent --bins -- --ignored --exact cluster::tests::bench::status_patch_latency_1000_machines --nocapture`
mod bench {
    use super::*;
    use std::time::Instant;
    use tokio_util::sync::CancellationToken;

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
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), patch_rx.recv()).await
        {
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
            let (name, phase, arrived) =
                tokio::time::timeout(Duration::from_secs(60), patch_rx.recv())
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
}

/// Against a real cluster: a throwaway one (the test installs the CRD, runs the controller and
/// its bootstrap token sweep, and deletes what it made). A plain kube-apiserver + etcd with no
/// other controller is enough; the kubeconfig must carry the API server's CA
/// (`certificate-authority(-data)`, the CA pin of the join) and allow what
/// `units/provisioner-rbac.yaml` grants plus CRD delete. Run it with
///
/// ```sh
/// KUBECONFIG=/path/to/kubeconfig cargo test -p agent -- --ignored cluster::tests::live --nocapture
/// ```
///
/// It covers, in order: the CRD applied by the agent's start step (`install::ensure_crd`) and
/// Established; Machines created, the finalizer added, `.status` watched (Served, Pending); a
/// duplicate MAC flagging both Machines (Conflict) until one is deleted; phases driven through
/// the status store as netboot and stage2 drive them (PXEBooting, Imaging 42 %, Imaged), each
/// seen in `.status`; the user-data request creating the bootstrap token Secret (type, labels,
/// expiry, the token the user-data carries); a second fetch refused and raised as the
/// `UserDataReplayed` condition; the Machine's deletion deleting the Secret (finalizer); the
/// Events posted along the way. Cleanup: the Machines `live-*` (finalizers removed), their
/// token Secrets and Events, and the CRD when it was not installed before the test.
mod live {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::events::v1::Event as KubeEvent;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
    use kube::runtime::wait::{await_condition, conditions};
    use kube::Api;
    use netboot::provisioning::{CloudInitFile, ProgressReport, Provisioning as _};
    use tokio_util::sync::CancellationToken;

    use crate::cluster::join;

    const CRD_NAME: &str = "machines.provisioner.dev";
    const NAMES: [&str; 2] = ["live-a", "live-b"];
    const TOKEN_TTL: Duration = Duration::from_secs(600);
    /// The namespace kube's Recorder posts the Events of cluster-scoped objects to.
    const EVENT_NAMESPACE: &str = "default";

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

    /// Watches the Machine `name` until `check` holds (30 s at most).
    async fn watch_machine(
        api: &Api<Machine>,
        name: &str,
        what: &str,
        check: impl Fn(&Machine) -> bool,
    ) -> Machine {
        let found = tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), name, move |m: Option<&Machine>| {
                m.is_some_and(&check)
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("timed out watching {name} for {what}"))
        .unwrap_or_else(|e| panic!("watching {name}: {e}"));
        found.unwrap_or_else(|| panic!("{name} is gone while waiting for {what}"))
    }

    fn phase_is(phase: Phase) -> impl Fn(&Machine) -> bool {
        move |m| m.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase.as_str())
    }

    fn has_condition(m: &Machine, type_: &str, status: &str) -> bool {
        m.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == type_ && c.status == status)
        })
    }

    fn token_secret_selector(name: &str) -> ListParams {
        ListParams::default().labels(&format!(
            "{}={}",
            join::LABEL_MACHINE,
            join::machine_label(name)
        ))
    }

    /// The reasons of the Events the agent posted about the Machine `name`, with their types.
    async fn events_of(client: &Client, name: &str) -> Vec<(String, String)> {
        let api: Api<KubeEvent> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
        let events = api.list(&ListParams::default()).await.expect("list Events");
        events
            .items
            .into_iter()
            .filter(|e| {
                e.reporting_controller.as_deref() == Some("provisioner")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .map(|e| (e.reason.unwrap_or_default(), e.type_.unwrap_or_default()))
            .collect()
    }

    /// Removes what the test makes, also after a failed run: the Machines (their finalizers
    /// too, in case no controller runs any more), their token Secrets and Events, and the CRD
    /// when `remove_crd`.
    async fn clean(client: &Client, remove_crd: bool) {
        let machines: Api<Machine> = Api::all(client.clone());
        let secrets: Api<Secret> = Api::namespaced(client.clone(), join::NAMESPACE);
        let events: Api<KubeEvent> = Api::namespaced(client.clone(), EVENT_NAMESPACE);
        for name in NAMES {
            // Deleting first: a controller still running then never adds the finalizer back.
            let _ = machines.delete(name, &DeleteParams::default()).await;
            let _ = machines
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
            if let Ok(list) = secrets.list(&token_secret_selector(name)).await {
                for secret in list.items {
                    let secret_name = secret.metadata.name.unwrap_or_default();
                    let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
                }
            }
        }
        if let Ok(list) = events.list(&ListParams::default()).await {
            for event in list.items {
                let regarding = event.regarding.as_ref().and_then(|r| r.name.as_deref());
                let ours = event.reporting_controller.as_deref() == Some("provisioner")
                    && regarding.is_some_and(|n| NAMES.contains(&n));
                if ours {
                    let event_name = event.metadata.name.unwrap_or_default();
                    let _ = events.delete(&event_name, &DeleteParams::default()).await;
                }
            }
        }
        if remove_crd {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            let _ = crds.delete(CRD_NAME, &DeleteParams::default()).await;
        }
    }

    #[tokio::test]
    #[ignore = "needs the cluster named by KUBECONFIG"]
    async fn live_crd_machines_phases_tokens_and_events() {
        let (client, facts) = crate::cluster::connect(None)
            .await
            .expect("KUBECONFIG client");
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let crd_existed = crds
            .get_opt(CRD_NAME)
            .await
            .expect("API server reachable")
            .is_some();
        if crd_existed {
            // Leftovers of an earlier run that could not clean up.
            clean(&client, false).await;
        }
        let shutdown = CancellationToken::new();
        let outcome = tokio::spawn(scenario(client.clone(), facts, shutdown.clone())).await;
        shutdown.cancel();
        clean(&client, !crd_existed).await;
        if let Err(e) = outcome {
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("scenario: {e}"),
            }
        }
    }

    async fn scenario(client: Client, facts: join::ClusterFacts, shutdown: CancellationToken) {
        // The CRD, by the agent's own start step.
        assert_eq!(
            super::super::install::ensure_crd(client.clone(), true)
                .await
                .expect("CRD step"),
            CrdState::Applied
        );
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds.clone(), CRD_NAME, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established within 30 s")
        .expect("watching the CRD");
        let crd = crds.get(CRD_NAME).await.expect("CRD");
        assert_eq!(crd.spec.scope, "Cluster");
        assert!(
            crd.metadata
                .managed_fields
                .iter()
                .flatten()
                .any(|f| f.manager.as_deref() == Some(controller::FIELD_MANAGER)),
            "applied by the agent's field manager"
        );

        let status = StatusStore::open(None);
        let table = Arc::new(Table::with_status(status.clone()));
        let tokens = Arc::new(BootstrapTokens::new(
            client.clone(),
            status.clone(),
            JoinSettings {
                token_ttl: TOKEN_TTL,
                api_endpoint: None,
            },
            facts,
        ));
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
            crate::cluster::Options {
                install_crd: true,
                tokens: Some(tokens.clone()),
            },
            shutdown.clone(),
        ));

        let api: Api<Machine> = Api::all(client.clone());
        let pp = PostParams::default();
        let mac_a: MacAddr = "52:54:00:77:00:0a".parse().expect("mac");
        api.create(&pp, &machine("live-a", "52:54:00:77:00:0a", "10.77.0.10"))
            .await
            .expect("create a");
        let a = watch_machine(&api, "live-a", "Served and Pending", |m| {
            phase_is(Phase::Pending)(m) && has_condition(m, "Served", "True")
        })
        .await;
        assert!(a
            .meta()
            .finalizers
            .iter()
            .flatten()
            .any(|f| f == controller::FINALIZER));
        assert_eq!(
            a.status.as_ref().and_then(|s| s.observed_generation),
            a.meta().generation
        );
        assert_eq!(table.len(), 1);

        // Same MAC: both flagged, neither served.
        api.create(&pp, &machine("live-b", "52:54:00:77:00:0a", "10.77.0.11"))
            .await
            .expect("create b");
        for name in ["live-a", "live-b"] {
            watch_machine(&api, name, "Conflict", |m| {
                has_condition(m, "Conflict", "True") && has_condition(m, "Served", "False")
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
        watch_machine(&api, "live-a", "served again", |m| {
            has_condition(m, "Served", "True") && has_condition(m, "Conflict", "False")
        })
        .await;
        assert_eq!(table.len(), 1);

        // Phases, driven as netboot (imaging script served) and stage2 (reports) drive them.
        let served = table.by_mac(&mac_a).expect("live-a served");
        let token = status.start_imaging(&served).expect("provisioning token");
        watch_machine(&api, "live-a", "PXEBooting", phase_is(Phase::PxeBooting)).await;
        status
            .imaging_report(
                "live-a",
                &token,
                ProgressReport::Imaging {
                    progress: 42,
                    bytes: None,
                    rate: None,
                    message: Some("writing the image".into()),
                },
            )
            .expect("imaging report");
        watch_machine(&api, "live-a", "Imaging 42%", |m| {
            phase_is(Phase::Imaging)(m)
                && m.status.as_ref().and_then(|s| s.progress) == Some(42)
                && m.status.as_ref().and_then(|s| s.message.as_deref()) == Some("writing the image")
        })
        .await;
        status
            .imaging_report("live-a", &token, ProgressReport::Imaged { message: None })
            .expect("imaged report");
        let imaged = watch_machine(&api, "live-a", "Imaged", |m| {
            phase_is(Phase::Imaged)(m) && m.status.as_ref().and_then(|s| s.progress) == Some(100)
        })
        .await;
        assert!(imaged
            .status
            .as_ref()
            .and_then(|s| s.last_seen.as_ref())
            .is_some());

        // The user-data request makes the provisioning's bootstrap token Secret.
        let imaging = imaging_for(&status, &table, tokens.clone());
        let requested = k8s_openapi::jiff::Timestamp::now();
        let doc = imaging
            .cloud_init(&token, CloudInitFile::UserData)
            .await
            .expect("user-data served");
        let join_token = join_configuration(&doc.text)["discovery"]["bootstrapToken"]["token"]
            .as_str()
            .expect("bootstrap token in the JoinConfiguration")
            .to_string();
        let secrets: Api<Secret> = Api::namespaced(client.clone(), join::NAMESPACE);
        let listed = secrets
            .list(&token_secret_selector("live-a"))
            .await
            .expect("list token Secrets");
        assert_eq!(listed.items.len(), 1, "one Secret per provisioning");
        let secret = &listed.items[0];
        assert_eq!(secret.type_.as_deref(), Some(join::SECRET_TYPE));
        let labels = secret.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(join::LABEL_PROVISIONING),
            status.provisioning_id("live-a").as_ref()
        );
        assert_eq!(
            labels.get(join::LABEL_MANAGED_BY).map(String::as_str),
            Some(join::MANAGED_BY)
        );
        let field = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .unwrap_or_else(|| panic!("Secret field {key}"))
        };
        assert_eq!(
            format!("{}.{}", field("token-id"), field("token-secret")),
            join_token,
            "the user-data carries the Secret's token"
        );
        assert_eq!(
            secret.metadata.name.as_deref(),
            Some(format!("bootstrap-token-{}", field("token-id")).as_str())
        );
        let expires: k8s_openapi::jiff::Timestamp =
            field("expiration").parse().expect("RFC 3339 expiration");
        let ttl = expires.duration_since(requested).as_secs();
        assert!(
            (TOKEN_TTL.as_secs() as i64 - 5..=TOKEN_TTL.as_secs() as i64 + 1).contains(&ttl),
            "expires in {ttl} s, configured {}",
            TOKEN_TTL.as_secs()
        );

        // A second fetch: refused, and raised on the Machine.
        let replay = imaging.cloud_init(&token, CloudInitFile::UserData).await;
        assert_eq!(
            replay.err(),
            Some(Refusal::Replayed {
                machine: "live-a".into()
            })
        );
        watch_machine(&api, "live-a", "UserDataReplayed", |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == controller::CONDITION_USER_DATA_REPLAYED
                        && c.status == "True"
                        && c.reason == "TokenReused"
                })
            })
        })
        .await;

        // Deleting the Machine deletes its Secret before the finalizer goes.
        api.delete("live-a", &DeleteParams::default())
            .await
            .expect("delete a");
        let gone_api = api.clone();
        wait_for("live-a gone", move || {
            let api = gone_api.clone();
            Box::pin(async move { api.get_opt("live-a").await.ok()?.is_none().then_some(()) })
        })
        .await;
        let left = secrets
            .list(&token_secret_selector("live-a"))
            .await
            .expect("list token Secrets");
        assert!(
            left.items.is_empty(),
            "the token Secret is deleted with its Machine"
        );
        assert_eq!(table.len(), 0);

        // The Events posted along the way.
        let expected_a = [
            ("Conflict", "Warning"),
            ("PXEBooting", "Normal"),
            ("Imaging", "Normal"),
            ("Imaged", "Normal"),
            ("BootstrapTokenCreated", "Normal"),
            ("UserDataReplayed", "Warning"),
            ("BootstrapTokenDeleted", "Normal"),
        ];
        let events_client = client.clone();
        let seen = wait_for("live-a's Events", move || {
            let client = events_client.clone();
            Box::pin(async move {
                let seen = events_of(&client, "live-a").await;
                expected_a
                    .iter()
                    .all(|(reason, type_)| seen.iter().any(|(r, t)| r == reason && t == type_))
                    .then_some(seen)
            })
        })
        .await;
        println!("Events of live-a: {seen:?}");
        let b_events = events_of(&client, "live-b").await;
        assert!(
            b_events
                .iter()
                .any(|(r, t)| r == "Conflict" && t == "Warning"),
            "{b_events:?}"
        );

        shutdown.cancel();
        let _ = controller.await;
    }
}
