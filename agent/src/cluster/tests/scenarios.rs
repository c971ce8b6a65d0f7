//! Controller scenarios against the mock API server: each test runs `reconcile` (or a token,
//! CRD or user-data step) while the scenario checks every request it makes and answers it.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::Node;
use kube::client::Body;
use kube::runtime::watcher;
use kube::{Client, Resource};
use netboot::provisioning::Refusal;
use netboot::{BootEvent, MacAddr, MachineLookup};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::harness::*;
use crate::cloudinit::JoinParams;
use crate::cluster::controller::{self, AddressRules, Context};
use crate::cluster::crd::Machine;
use crate::cluster::install::CrdState;
use crate::cluster::join::{
    BootstrapToken, BootstrapTokens, ClusterFacts, JoinSettings, JoinSource as _,
};
use crate::status::Phase;

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

/// A second trigger for a Machine before the finalizer patch's watch event has reached the
/// reflector (a status store change, every Machine reconciled again) runs it from the same
/// stale copy: the finalizer is not patched again (its JSON patch test would fail with 422 on a
/// real server), the status is written.
#[tokio::test]
async fn a_stale_copy_after_the_finalizer_patch_does_not_patch_it_again() {
    let fresh = machine("node2", "52:54:00:00:00:02", "10.77.0.2");
    let (h, mut api) = harness(vec![fresh.clone()], vec![]);
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(fresh.clone()),
        h.ctx.clone(),
    ));
    within("finalizer patch", async {
        let (_, send) =
            expect_request(&mut api, Method::PATCH, &format!("{MACHINES}/node2?")).await;
        let mut patched = with_finalizer(fresh.clone());
        patched.meta_mut().resource_version = Some("2".into());
        respond(send, &patched);
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");

    // The same stale copy again (resourceVersion 1, no finalizer).
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(fresh.clone()),
        h.ctx.clone(),
    ));
    let body = within("status patch, no second finalizer patch", async {
        expect_status_patch(&mut api, &with_finalizer(fresh.clone())).await
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
    assert_eq!(body["status"]["phase"], "Pending");

    // Once the reflector has a newer version without the finalizer (someone removed it), it
    // is added again.
    let mut removed = fresh.clone();
    removed.meta_mut().resource_version = Some("3".into());
    let reconcile = tokio::spawn(controller::reconcile(
        Arc::new(removed.clone()),
        h.ctx.clone(),
    ));
    within("finalizer added again", async {
        let (body, send) =
            expect_request(&mut api, Method::PATCH, &format!("{MACHINES}/node2?")).await;
        assert_eq!(body[1]["op"], "add", "{body}");
        respond(send, &with_finalizer(removed.clone()));
    })
    .await;
    reconcile.await.expect("joined").expect("reconciled");
}

#[tokio::test]
async fn duplicate_mac_flags_both_machines_and_serves_neither() {
    let a = with_finalizer(machine("a", "52:54:00:00:00:0a", "10.77.0.10"));
    let b = with_finalizer(machine("b", "52:54:00:00:00:0a", "10.77.0.11"));
    let c = with_finalizer(machine("c", "52:54:00:00:00:0c", "10.77.0.12"));
    let (mut h, mut api) = harness(vec![a.clone(), c.clone()], vec![]);
    assert_eq!(h.table.len(), 2);
    // b arrives with a's MAC: a gets reconciled again, not only b (its own event).
    h.watch_event(watcher::Event::Apply(b.clone()));
    assert_eq!(reconcile_requests(&mut h), ["a", "b"]);
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
    assert_eq!(reconcile_requests(&mut h), Vec::<String>::new());

    // b is deleted: a is served again and reconciled; c, untouched, is not.
    h.watch_event(watcher::Event::Delete(b.clone()));
    assert_eq!(reconcile_requests(&mut h), ["a", "b"]);
    assert_eq!(h.table.len(), 2);
    assert!(h.status.get("a").is_some());
}

/// The Machines the controller was asked to reconcile besides their own events, by name.
fn reconcile_requests(h: &mut Harness) -> Vec<String> {
    let mut names = Vec::new();
    while let Ok(r) = h.reconcile.try_recv() {
        names.push(r.name);
    }
    names.sort();
    names
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
    let (mut h, mut api) = harness(vec![live], vec![]);
    // It was served before the deletion.
    assert_eq!(h.table.len(), 1);
    assert!(h.status.get("node2").is_some());
    // The deletion's watch event: no longer served, before any reconcile.
    h.watch_event(watcher::Event::Apply(gone.clone()));
    assert_eq!(h.table.len(), 0, "a deleted machine is not served");
    assert!(h.status.get("node2").is_none(), "its status entry is gone");

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
    let v = crate::cluster::verdicts::judge(&machines, &rules, None);
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
    let v = crate::cluster::verdicts::judge(&machines, &rules, Some("b"));
    assert!(v.served.values().any(|m| m.name == "a"));
}

const SECRETS: &str = "/api/v1/namespaces/kube-system/secrets";
const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";
const RSA_CA: &str = include_str!("../../../tests/fixtures/ca/rsa-ca.crt");
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
    tokens.attach(h.machines.clone());
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
    let old = crate::cluster::join::token_secret(
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
    let secret = crate::cluster::join::token_secret(
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
    let ctx = listed(
        Context::new(
            h.ctx.client.clone(),
            node_writer.as_reader(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens)),
        &h.machines,
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
    let ctx = listed(
        Context::new(
            h.ctx.client.clone(),
            h.ctx.nodes.clone(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens)),
        &h.machines,
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
    let ctx = listed(
        Context::new(
            h.ctx.client.clone(),
            h.ctx.nodes.clone(),
            h.table.clone(),
            h.status.clone(),
            h.ctx.rules.clone(),
            mpsc::unbounded_channel().0,
        )
        .with_tokens(Some(tokens_for(&h, None))),
        &h.machines,
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
        assert!(crate::cluster::rbac::covered("PATCH", &path), "{path}");
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
    use crate::cluster::join::JoinSource as _;
    assert_eq!(
        crate::cluster::join::NoJoin
            .join_params("node2")
            .await
            .expect("ok"),
        None
    );
}

/// netboot's imaging side for the harness's machines, with join parameters from `tokens`.
fn imaging_with(h: &Harness, tokens: Arc<BootstrapTokens>) -> Arc<crate::provisioning::Imaging> {
    imaging_for(&h.status, &h.table, tokens)
}

fn fetch_user_data(
    imaging: &Arc<crate::provisioning::Imaging>,
    token: &str,
) -> tokio::task::JoinHandle<Result<netboot::provisioning::CloudInitDocument, Refusal>> {
    use netboot::provisioning::{CloudInitFile, Provisioning as _};
    let (imaging, token) = (imaging.clone(), token.to_string());
    // From node2's reserved address, as cloud-init on the imaged node asks.
    let peer = std::net::IpAddr::from([10, 77, 0, 2]);
    tokio::spawn(async move {
        imaging
            .cloud_init(peer, &token, CloudInitFile::UserData)
            .await
    })
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
    let node2_ip = std::net::IpAddr::from([10, 77, 0, 2]);
    h.status
        .take_user_data(&token, node2_ip)
        .expect("first fetch served");
    assert_eq!(
        h.status.take_user_data(&token, node2_ip),
        Err(Refusal::Replayed {
            machine: "node2".into()
        })
    );
    let replayed_usec = h
        .status
        .get("node2")
        .expect("node2")
        .user_data_replayed_usec;
    // In whole seconds, as every time in the status (a `Time` has no fraction on the wire).
    let replayed = k8s_openapi::jiff::Timestamp::from_second(
        i64::try_from(replayed_usec / 1_000_000).expect("seconds"),
    )
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
    let task = tokio::spawn(crate::cluster::install::ensure_crd(client, true));
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

/// `kubeadm init` writes admin.conf (which starts netboot) minutes before it binds that user to
/// cluster-admin: a start step refused both the apply and the read tries again, and applies the
/// CRD once it may.
#[tokio::test(start_paused = true)]
async fn a_crd_step_refused_at_first_applies_the_crd_once_allowed() {
    use kube::CustomResourceExt as _;
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let state = Arc::new(crate::cluster::ApiState::default());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(crate::cluster::crd_step(
        client,
        true,
        state.clone(),
        shutdown.clone(),
    ));
    let apply = format!("{CRD_PATH}?&force=true&fieldManager=provisioner");
    let (_, send) = expect_request(&mut api, Method::PATCH, &apply).await;
    respond_error(send, 403, "Forbidden");
    let (_, send) = expect_request(&mut api, Method::GET, CRD_PATH).await;
    respond_error(send, 403, "Forbidden");
    // Paused time: the step's 30 s wait passes as soon as nothing else is left to do.
    let (body, send) = expect_request(&mut api, Method::PATCH, &apply).await;
    assert_eq!(body["kind"], "CustomResourceDefinition");
    respond(send, &Machine::crd());
    task.await.expect("the step ends once the CRD is applied");
    assert_eq!(state.problem(), None);
}

#[tokio::test]
async fn a_forbidden_crd_apply_uses_the_installed_crd() {
    use kube::CustomResourceExt as _;
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let task = tokio::spawn(crate::cluster::install::ensure_crd(client.clone(), true));
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
    let task = tokio::spawn(crate::cluster::install::ensure_crd(client, true));
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

/// `lastSeen` alone moving by less than a minute is not written (a machine doing DHCP every
/// second would cost a write per second); with any other change, or a minute later, it is.
#[test]
fn last_seen_alone_is_written_at_most_once_a_minute() {
    use crate::cluster::crd::MachineStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let at = |second: i64| {
        Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(second).expect("time"),
        ))
    };
    let current = MachineStatus {
        phase: Some("PXEBooting".into()),
        last_seen: at(1_000),
        ..MachineStatus::default()
    };
    let seen = |second: i64, phase: &str| MachineStatus {
        phase: Some(phase.into()),
        last_seen: at(second),
        ..MachineStatus::default()
    };
    assert_eq!(
        controller::hold_last_seen(seen(1_059, "PXEBooting"), &current),
        current,
        "59 s later, nothing else changed: nothing to write"
    );
    assert_eq!(
        controller::hold_last_seen(seen(1_060, "PXEBooting"), &current),
        seen(1_060, "PXEBooting"),
        "a minute later: written"
    );
    assert_eq!(
        controller::hold_last_seen(seen(1_005, "Imaging"), &current),
        seen(1_005, "Imaging"),
        "with a phase change: the new lastSeen goes along"
    );
    let never = MachineStatus {
        phase: Some("Pending".into()),
        ..MachineStatus::default()
    };
    assert_eq!(
        controller::hold_last_seen(seen(1_005, "Pending"), &never),
        seen(1_005, "Pending"),
        "the first lastSeen: written"
    );
}

/// In a burst (a rack powering on) the API server's CPU goes to the statuses first: an Event
/// waits while a status write is in flight, and no longer than `EVENT_YIELD_MAX`.
#[tokio::test(start_paused = true)]
async fn events_wait_for_the_status_writes_in_flight() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let reporter = Reporter {
        controller: "provisioner".to_string(),
        instance: None,
    };
    let lanes = controller::EventLanes::start(Recorder::new(client, reporter));
    let reference = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Machine".to_string()),
        name: Some("node2".to_string()),
        ..Default::default()
    };
    let event = |reason: &str| Event {
        type_: EventType::Normal,
        reason: reason.to_string(),
        note: None,
        action: "Provision".to_string(),
        secondary: None,
    };

    let writing = lanes.writing();
    lanes
        .post("node2", event("PXEBooting"), reference.clone())
        .await;
    let early = tokio::time::timeout(Duration::from_secs(5), api.next_request()).await;
    assert!(early.is_err(), "an Event was posted during a status write");
    drop(writing);
    let (request, send) = within("the Event once the write is done", api.next_request())
        .await
        .expect("a request");
    assert_eq!(request.method(), Method::POST);
    assert!(
        request.uri().path().ends_with("/events"),
        "{}",
        request.uri()
    );
    respond(send, &json!({}));

    // A write that never ends holds Events back for EVENT_YIELD_MAX, no longer.
    let _stuck = lanes.writing();
    let asked = tokio::time::Instant::now();
    lanes
        .post("node2", event("Imaging"), reference.clone())
        .await;
    let (request, _send) = tokio::time::timeout(
        controller::EVENT_YIELD_MAX + Duration::from_secs(1),
        api.next_request(),
    )
    .await
    .expect("the Event within EVENT_YIELD_MAX")
    .expect("a request");
    assert!(asked.elapsed() >= controller::EVENT_YIELD_MAX);
    assert!(
        request.uri().path().ends_with("/events"),
        "{}",
        request.uri()
    );
}
