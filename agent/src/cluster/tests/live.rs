//! Against a real cluster: a throwaway one (the test installs the CRD, runs the controller and
//! its bootstrap token sweep, and deletes what it made). A plain kube-apiserver + etcd with no
//! other controller is enough; the kubeconfig must carry the API server's CA
//! (`certificate-authority(-data)`, the CA pin of the join) and allow what
//! `units/provisioner-rbac.yaml` grants plus CRD delete. Run it with
//!
//! ```sh
//! KUBECONFIG=/path/to/kubeconfig cargo test -p agent -- --ignored cluster::tests::live --nocapture
//! ```
//!
//! It covers, in order: the CRD applied by the agent's start step (`install::ensure_crd`) and
//! Established; Machines created, the finalizer added, `.status` watched (Served, Pending); a
//! duplicate MAC flagging both Machines (Conflict) until one is deleted; phases driven through
//! the status store as netboot and stage2 drive them (PXEBooting, Imaging 42 %, Imaged), each
//! seen in `.status`; the user-data request creating the bootstrap token Secret (type, labels,
//! expiry, the token the user-data carries); a second fetch refused and raised as the
//! `UserDataReplayed` condition; the Machine's deletion deleting the Secret (finalizer); the
//! Events posted along the way. Cleanup: the Machines `live-*` (finalizers removed), their
//! token Secrets and Events, and the CRD when it was not installed before the test.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::Api;
use kube::{Client, Resource};
use netboot::provisioning::Refusal;
use netboot::provisioning::{CloudInitFile, ProgressReport, Provisioning as _};
use netboot::{MacAddr, MachineLookup};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::harness::*;
use crate::cluster::controller::{self, AddressRules};
use crate::cluster::crd::Machine;
use crate::cluster::install::CrdState;
use crate::cluster::join;
use crate::cluster::join::{BootstrapTokens, JoinSettings};
use crate::inventory::Table;
use crate::status::{Phase, StatusStore};

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
        crate::cluster::install::ensure_crd(client.clone(), true)
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
