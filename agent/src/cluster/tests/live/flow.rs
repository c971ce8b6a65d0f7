//! The whole path of one Machine against the real API server, with the agent as its
//! ServiceAccount: the CRD by the agent's start step, the finalizer and `.status`, a duplicate
//! MAC (Conflict on both), the phases driven through the status store as netboot and stage2
//! drive them, the bootstrap token Secret a user-data request creates (and
//! kube-controller-manager's bootstrapsigner signs into `cluster-info`, as `kubeadm join`
//! needs), the replayed user-data, the deletion (finalizer: Secret deleted first), the Events.

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Resource};
use netboot::provisioning::{CloudInitFile, ProgressReport, Provisioning as _, Refusal};
use netboot::{MacAddr, MachineLookup};

use super::super::harness::{imaging_for, join_configuration, new_machine};
use super::{has_condition, phase_is, wait_for, watch_machine, Agent, Live, CRD_NAME, TOKEN_TTL};
use crate::cluster::controller;
use crate::cluster::crd::Machine;
use crate::cluster::join;
use crate::status::{Phase, StatusStore};

/// The namespace kube's Recorder posts the Events of cluster-scoped objects to.
const EVENT_NAMESPACE: &str = "default";

#[tokio::test]
#[ignore = "needs kube-apiserver, etcd and kube-controller-manager: tests/kube-live.sh"]
async fn crd_machines_phases_tokens_and_events() {
    let mut live = Live::start().await;
    let client = live.admin.clone();
    // cluster-info as `kubeadm init` publishes it, and the controller that signs it with each
    // bootstrap token (what `kubeadm join` checks before it trusts the API server).
    let cluster_info: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-public");
    cluster_info
        .create(&PostParams::default(), &live.plane.cluster_info())
        .await
        .expect("create cluster-info");
    live.plane
        .start_controller_manager("bootstrapsigner,tokencleaner");

    // The CRD, by the agent's own start step.
    live.install_crd().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
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

    let agent = Agent::start(&live, StatusStore::open(None), "10.77.0.0/24");
    let (status, table, tokens) = (
        agent.status.clone(),
        agent.table.clone(),
        agent.tokens.clone(),
    );

    let api: Api<Machine> = Api::all(client.clone());
    let pp = PostParams::default();
    let mac_a: MacAddr = "52:54:00:77:00:0a".parse().expect("mac");
    api.create(
        &pp,
        &new_machine("live-a", "52:54:00:77:00:0a", "10.77.0.10"),
    )
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
    api.create(
        &pp,
        &new_machine("live-b", "52:54:00:77:00:0a", "10.77.0.11"),
    )
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
            served.ip.into(),
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
        .imaging_report(
            "live-a",
            served.ip.into(),
            &token,
            ProgressReport::Imaged { message: None },
        )
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
        .cloud_init(served.ip.into(), &token, CloudInitFile::UserData)
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

    // The join's endpoint and CA pin come from cluster-info, and kube-controller-manager's
    // bootstrapsigner accepts the Secret: cluster-info gets signed with the token, which is what
    // `kubeadm join` verifies before it trusts the API server.
    let discovery = &join_configuration(&doc.text)["discovery"]["bootstrapToken"];
    assert_eq!(
        discovery["apiServerEndpoint"].as_str(),
        Some(format!("127.0.0.1:{}", live.plane.api_port).as_str())
    );
    assert_eq!(
        discovery["caCertHashes"][0].as_str(),
        Some(live.plane.ca_pin().as_str())
    );
    let jws_key = format!("jws-kubeconfig-{}", field("token-id"));
    let signed = |present: bool| {
        let (api, key) = (cluster_info.clone(), jws_key.clone());
        move || {
            let (api, key) = (api.clone(), key.clone());
            Box::pin(async move {
                let map = api.get("cluster-info").await.ok()?;
                let has = map.data.unwrap_or_default().contains_key(&key);
                (has == present).then_some(())
            }) as futures_util::future::BoxFuture<'static, Option<()>>
        }
    };
    wait_for("cluster-info signed with the token", signed(true)).await;

    // A second fetch: refused, and raised on the Machine.
    let replay = imaging
        .cloud_init(served.ip.into(), &token, CloudInitFile::UserData)
        .await;
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
    wait_for("the signature of the deleted token gone", signed(false)).await;

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

    agent.stop().await;
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
