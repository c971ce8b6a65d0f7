//! The mock API server (tower-test) the scenarios and the benchmark talk to: a controller
//! [`Context`] over ready reflector stores, and helpers that take each request, check its
//! method, path and body, and answer it as kube-apiserver would.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer, ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::cluster::controller::{self, AddressRules, Context};
use crate::cluster::crd::{Machine, MachineSpec};
use crate::cluster::join::BootstrapTokens;
use crate::machines::Table;
use crate::status::StatusStore;

pub(super) type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub(super) const MACHINES: &str = "/apis/provisioner.dev/v1alpha1/machines";
pub(super) const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// A Machine as a client creates it: name and spec, nothing the API server sets.
pub(super) fn new_machine(name: &str, mac: &str, ip: &str) -> Machine {
    Machine::new(
        name,
        MachineSpec {
            mac_address: mac.to_string(),
            ip_address: ip.to_string(),
            hostname: None,
            image: None,
            root_device: None,
            reimage: None,
        },
    )
}

/// A Machine as the API server returns it after the create: with uid, generation and
/// resourceVersion (a create body must not carry them: a real server refuses it).
pub(super) fn machine(name: &str, mac: &str, ip: &str) -> Machine {
    let mut m = new_machine(name, mac, ip);
    m.meta_mut().generation = Some(1);
    m.meta_mut().uid = Some(format!("uid-{name}"));
    m.meta_mut().resource_version = Some("1".to_string());
    m
}

pub(super) fn with_finalizer(mut m: Machine) -> Machine {
    m.meta_mut().finalizers = Some(vec![controller::FINALIZER.to_string()]);
    m
}

pub(super) struct Harness {
    pub(super) ctx: Arc<Context>,
    pub(super) table: Arc<Table>,
    pub(super) status: Arc<StatusStore>,
    /// The Machines the controller is asked to reconcile besides their own events.
    pub(super) reconcile: mpsc::UnboundedReceiver<ObjectRef<Machine>>,
    /// The reflector's store of Machines.
    pub(super) machines: Store<Machine>,
    pub(super) machine_writer: Writer<Machine>,
    pub(super) _nodes: Writer<Node>,
}

impl Harness {
    /// A watch event, as the controller's pipeline takes it: the store first, then the
    /// verdicts.
    pub(super) fn watch_event(&mut self, event: watcher::Event<Machine>) {
        self.machine_writer.apply_watcher_event(&event);
        self.ctx.observe(&event);
    }
}

pub(super) fn ready_store<K>(objects: Vec<K>) -> (Store<K>, Writer<K>)
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

/// The controller's context over a mock API server, with `machines` listed (in the store,
/// judged, the valid ones in the table) and `nodes` in theirs.
pub(super) fn harness(machines: Vec<Machine>, nodes: Vec<Node>) -> (Harness, ApiServerHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let (machine_store, machine_writer) = reflector::store::<Machine>();
    let (node_store, node_writer) = ready_store(nodes);
    let status = StatusStore::open(None);
    let table = Arc::new(Table::with_status(status.clone()));
    let (reconcile_tx, reconcile_rx) = mpsc::unbounded_channel();
    let rules = AddressRules {
        subnet: "10.77.0.0/24".parse().expect("cidr"),
        reserved: vec![Ipv4Addr::new(10, 77, 0, 1)],
    };
    let ctx = Arc::new(Context::new(
        client,
        node_store,
        table.clone(),
        status.clone(),
        rules,
        reconcile_tx,
    ));
    let mut h = Harness {
        ctx,
        table,
        status,
        reconcile: reconcile_rx,
        machines: machine_store,
        machine_writer,
        _nodes: node_writer,
    };
    h.watch_event(watcher::Event::Init);
    for m in machines {
        h.watch_event(watcher::Event::InitApply(m));
    }
    h.watch_event(watcher::Event::InitDone);
    (h, handle)
}

/// `ctx` after the first list of the Machines in `machines` (judged, the valid ones served).
pub(super) fn listed(ctx: Context, machines: &Store<Machine>) -> Arc<Context> {
    ctx.observe(&watcher::Event::Init);
    for m in machines.state() {
        ctx.observe(&watcher::Event::InitApply((*m).clone()));
    }
    ctx.observe(&watcher::Event::InitDone);
    Arc::new(ctx)
}

/// Takes the next request, checks method and path (query included), returns its JSON body.
pub(super) async fn expect_request(
    handle: &mut ApiServerHandle,
    method: Method,
    path: &str,
) -> (Value, tower_test::mock::SendResponse<Response<Body>>) {
    let (request, send) = handle.next_request().await.expect("a request");
    assert_eq!(request.method(), method, "method of {}", request.uri());
    assert_eq!(request.uri().to_string(), path);
    assert!(
        crate::cluster::rbac::covered(method.as_str(), path),
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

pub(super) fn respond(
    send: tower_test::mock::SendResponse<Response<Body>>,
    body: &impl serde::Serialize,
) {
    let bytes = serde_json::to_vec(body).expect("response JSON");
    send.send_response(
        Response::builder()
            .body(Body::from(bytes))
            .expect("response"),
    );
}

/// An API error answer (`Status` object), as kube-apiserver sends it.
pub(super) fn respond_error(
    send: tower_test::mock::SendResponse<Response<Body>>,
    code: u16,
    reason: &str,
) {
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

pub(super) fn status_path(name: &str) -> String {
    format!("{MACHINES}/{name}/status?&force=true&fieldManager=provisioner")
}

/// Drops every `lastTransitionTime` after checking it is there (it is "now").
pub(super) fn strip_transition_times(body: &mut Value) {
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
pub(super) async fn expect_status_patch(handle: &mut ApiServerHandle, object: &Machine) -> Value {
    expect_status_patch_raw(handle, object).await.0
}

/// Also returns the status as sent (what the API server then stores).
pub(super) async fn expect_status_patch_raw(
    handle: &mut ApiServerHandle,
    object: &Machine,
) -> (Value, Value) {
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

pub(super) async fn expect_event(handle: &mut ApiServerHandle, name: &str) -> Value {
    let (body, send) = expect_request(handle, Method::POST, &format!("{EVENTS}?")).await;
    assert_eq!(body["regarding"]["name"], name, "{body}");
    assert_eq!(body["regarding"]["kind"], "Machine");
    assert_eq!(body["reportingController"], "provisioner");
    respond(send, &body);
    body
}

pub(super) async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub(super) fn conditions(body: &Value) -> HashMap<String, (String, String)> {
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

pub(super) fn imaging_for(
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

/// The kubeadm JoinConfiguration of a node's user-data.
pub(super) fn join_configuration(user_data: &str) -> serde_yaml::Value {
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
