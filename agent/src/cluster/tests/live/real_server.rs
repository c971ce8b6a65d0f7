//! What only a real API server shows: optimistic concurrency on the status subresource, the
//! Machine watch across an API server restart, and the CRD re-applied under existing Machines.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, CustomResourceExt as _, ResourceExt as _};
use netboot::provisioning::ProgressReport;
use netboot::MachineLookup as _;
use serde_json::json;

use super::super::harness::new_machine;
use super::{has_condition, phase_is, wait_for, watch_machine, Agent, Live, CRD_NAME};
use crate::cluster::controller::FIELD_MANAGER;
use crate::cluster::crd::Machine;
use crate::cluster::install::CrdState;
use crate::status::{Phase, StatusStore};

fn served_pending(m: &Machine) -> bool {
    phase_is(Phase::Pending)(m) && has_condition(m, "Served", "True")
}

fn progress(m: &Machine) -> Option<u8> {
    m.status.as_ref().and_then(|s| s.progress)
}

/// Another writer of `.status` (an operator's `kubectl edit --subresource=status`, another
/// controller) holding an old resourceVersion gets 409; once it writes with the current one,
/// it overwrites the agent's phase, and the agent puts its status back. While a third party
/// keeps changing the Machine (each change a new resourceVersion), every status write of the
/// agent still succeeds (server-side apply carries no resourceVersion) and the last progress
/// wins.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: tests/kube-live.sh"]
async fn status_conflict_on_a_stale_resource_version() {
    let live = Live::start().await;
    live.install_crd().await;
    let agent = Agent::start(&live, StatusStore::open(None), "10.77.0.0/24");
    let api = live.machines();
    api.create(
        &PostParams::default(),
        &new_machine("live-a", "52:54:00:77:00:0a", "10.77.0.10"),
    )
    .await
    .expect("create");
    let before = watch_machine(&api, "live-a", "Served and Pending", served_pending).await;

    // The machine PXE-boots: the agent's status write gives the Machine a new resourceVersion.
    let served = agent
        .table
        .by_mac(&"52:54:00:77:00:0a".parse().expect("mac"))
        .expect("served");
    let token = agent.status.start_imaging(&served).expect("token");
    let now = watch_machine(&api, "live-a", "PXEBooting", phase_is(Phase::PxeBooting)).await;
    assert_ne!(
        before.resource_version(),
        now.resource_version(),
        "the status write made a new version"
    );

    // A writer still holding the version from before: refused with 409, nothing changes.
    let mut stale = before.clone();
    if let Some(s) = stale.status.as_mut() {
        s.phase = Some("Ready".into());
        s.message = Some("set by hand".into());
    }
    let refused = api
        .replace_status("live-a", &PostParams::default(), &stale)
        .await;
    match refused {
        Err(kube::Error::Api(e)) => {
            assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"), "{e:?}")
        }
        other => panic!("a stale resourceVersion must be refused, got {other:?}"),
    }
    let unchanged = api.get_status("live-a").await.expect("get");
    assert!(phase_is(Phase::PxeBooting)(&unchanged));

    // The same writer with the current version: accepted, and the agent puts its status back.
    let mut fresh = unchanged.clone();
    if let Some(s) = fresh.status.as_mut() {
        s.phase = Some("Ready".into());
        s.message = Some("set by hand".into());
    }
    api.replace_status("live-a", &PostParams::default(), &fresh)
        .await
        .expect("write with the current resourceVersion");
    let restored = watch_machine(&api, "live-a", "the agent's status back", |m| {
        phase_is(Phase::PxeBooting)(m)
            && m.status.as_ref().and_then(|s| s.message.as_deref()) != Some("set by hand")
    })
    .await;
    assert!(has_condition(&restored, "Served", "True"));

    // Progress reports while someone keeps relabelling the Machine: every label change and
    // every status write is a new resourceVersion of the same object.
    let relabel = {
        let api = api.clone();
        tokio::spawn(async move {
            for i in 0..40 {
                api.patch(
                    "live-a",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"touched": i.to_string()}}})),
                )
                .await
                .expect("label patch");
            }
        })
    };
    for p in 1..=40u8 {
        agent
            .status
            .imaging_report(
                "live-a",
                served.ip.into(),
                &token,
                ProgressReport::Imaging {
                    progress: p,
                    bytes: None,
                    rate: None,
                    message: None,
                },
            )
            .expect("imaging report");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    relabel.await.expect("relabelled");
    let last = watch_machine(&api, "live-a", "Imaging 40%", |m| {
        phase_is(Phase::Imaging)(m) && progress(m) == Some(40)
    })
    .await;
    assert_eq!(last.labels().get("touched").map(String::as_str), Some("39"));
    let requests = live.plane.agent_requests();
    let status_writes = requests
        .iter()
        .filter(|r| r.resource == "machines/status" && r.verb == "patch")
        .count();
    let failed: Vec<_> = requests.iter().filter(|r| r.failed()).collect();
    println!(
        "status writes of the agent: {status_writes}; failed requests: {}",
        failed.len()
    );
    assert!(status_writes >= 3, "{requests:?}");
    assert!(
        failed.is_empty(),
        "failed requests of the agent: {failed:?}"
    );
    agent.stop().await;
}

/// kube-apiserver killed under a running agent: `ApiState` says unreachable, netboot keeps
/// serving from its table, a phase change made while it is down and a Machine created right
/// after it is back (same port, same etcd) both reach the cluster, and `ApiState` says
/// reachable again.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: tests/kube-live.sh"]
async fn the_watch_survives_an_api_server_restart() {
    let mut live = Live::start().await;
    live.install_crd().await;
    let agent = Agent::start(&live, StatusStore::open(None), "10.77.0.0/24");
    let api = live.machines();
    api.create(
        &PostParams::default(),
        &new_machine("live-a", "52:54:00:77:00:0a", "10.77.0.10"),
    )
    .await
    .expect("create a");
    watch_machine(&api, "live-a", "Served and Pending", served_pending).await;
    assert!(agent.api_state.reachable());

    let stopped = Instant::now();
    live.plane.kill_apiserver();
    let api_state = agent.api_state.clone();
    wait_for("ApiState unreachable", move || {
        let api_state = api_state.clone();
        Box::pin(async move { (!api_state.reachable()).then_some(()) })
    })
    .await;
    println!(
        "agent saw the API server gone after {:.2} s",
        stopped.elapsed().as_secs_f64()
    );

    // Down: netboot still answers the machine, and its phase moves on in the status store.
    let served = agent
        .table
        .by_mac(&"52:54:00:77:00:0a".parse().expect("mac"))
        .expect("still served while the API server is down");
    agent.status.start_imaging(&served).expect("token");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let took = live.plane.start_apiserver().await;
    println!(
        "kube-apiserver restarted on port {}: ready in {:.2} s",
        live.plane.api_port,
        took.as_secs_f64()
    );
    let back = Instant::now();
    api.create(
        &PostParams::default(),
        &new_machine("live-b", "52:54:00:77:00:0b", "10.77.0.11"),
    )
    .await
    .expect("create b after the restart");

    let a = tokio::time::timeout(
        Duration::from_secs(60),
        wait_machine(&api, "live-a", phase_is(Phase::PxeBooting)),
    )
    .await
    .expect("live-a's PXEBooting reaches the cluster within 60 s of the restart");
    let b = tokio::time::timeout(
        Duration::from_secs(60),
        wait_machine(&api, "live-b", served_pending),
    )
    .await
    .expect("live-b served within 60 s of the restart");
    println!(
        "caught up {:.2} s after the API server was back",
        back.elapsed().as_secs_f64()
    );
    assert!(b
        .finalizers()
        .iter()
        .any(|f| f == crate::cluster::controller::FINALIZER));
    assert!(has_condition(&a, "Served", "True"));
    assert_eq!(agent.table.len(), 2);
    let api_state = agent.api_state.clone();
    wait_for("ApiState reachable again", move || {
        let api_state = api_state.clone();
        Box::pin(async move { api_state.reachable().then_some(()) })
    })
    .await;
    agent.stop().await;
}

/// Polls the Machine until `check` holds (the watch helper's 30 s is too short right after a
/// restart, when the first requests may still be refused).
async fn wait_machine(api: &Api<Machine>, name: &str, check: impl Fn(&Machine) -> bool) -> Machine {
    loop {
        if let Ok(Some(m)) = api.get_opt(name).await {
            if check(&m) {
                return m;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An operator's older CRD (applied by `kubectl apply --server-side --force-conflicts`, without
/// the Progress column), then the agent restarting: its start step applies the CRD again while
/// Machines exist. The CRD is the agent's again; the Machines keep their uid, finalizer and
/// status, and the agent does not need to rewrite any of them; phases still flow afterwards.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: tests/kube-live.sh"]
async fn the_crd_reapplied_keeps_machines_and_status() {
    let live = Live::start().await;
    live.install_crd().await;
    let status = StatusStore::open(None);
    let agent = Agent::start(&live, status.clone(), "10.77.0.0/24");
    let api = live.machines();
    for (name, mac, ip) in [
        ("live-a", "52:54:00:77:00:0a", "10.77.0.10"),
        ("live-b", "52:54:00:77:00:0b", "10.77.0.11"),
    ] {
        api.create(&PostParams::default(), &new_machine(name, mac, ip))
            .await
            .expect("create");
    }
    watch_machine(&api, "live-b", "Served and Pending", served_pending).await;
    let served = agent
        .table
        .by_mac(&"52:54:00:77:00:0a".parse().expect("mac"))
        .expect("served");
    let token = status.start_imaging(&served).expect("token");
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
        .expect("report");
    watch_machine(&api, "live-a", "Imaging 42%", |m| {
        phase_is(Phase::Imaging)(m) && progress(m) == Some(42)
    })
    .await;
    // Let the agent finish the writes the watch events of its own writes cause.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_a = api.get("live-a").await.expect("a");
    let before_b = api.get("live-b").await.expect("b");
    agent.stop().await;

    // The operator's CRD: the same schema without the Progress column.
    let crds: Api<CustomResourceDefinition> = Api::all(live.admin.clone());
    let mut older = Machine::crd();
    for version in &mut older.spec.versions {
        if let Some(columns) = version.additional_printer_columns.as_mut() {
            columns.retain(|c| c.name != "Progress");
        }
    }
    older.metadata.managed_fields = None;
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("kubectl").force(),
        &Patch::Apply(&older),
    )
    .await
    .expect("operator's apply");
    let columns = |crd: &CustomResourceDefinition| -> Vec<String> {
        crd.spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect()
    };
    let applied = crds.get(CRD_NAME).await.expect("CRD");
    assert!(!columns(&applied).contains(&"Progress".to_string()));

    // The agent starts again (same status store, as with its state file): its CRD step first.
    let restarted = Instant::now();
    assert_eq!(
        crate::cluster::install::ensure_crd(live.agent.clone(), true)
            .await
            .expect("CRD step"),
        CrdState::Applied
    );
    let crd = crds.get(CRD_NAME).await.expect("CRD");
    assert!(
        columns(&crd).contains(&"Progress".to_string()),
        "{:?}",
        columns(&crd)
    );
    assert!(crd
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|f| f.manager.as_deref() == Some(FIELD_MANAGER)));
    let writes_before = status_writes_of(&live, "live-b");
    let agent = Agent::start(&live, status.clone(), "10.77.0.0/24");

    for before in [&before_a, &before_b] {
        let name = before.name_any();
        let after = api.get(&name).await.expect("Machine kept");
        assert_eq!(after.uid(), before.uid(), "{name}: same object");
        assert_eq!(after.finalizers(), before.finalizers(), "{name}");
        assert_eq!(after.status, before.status, "{name}: status kept");
    }
    // The restarted agent serves both again and finds nothing to rewrite for b.
    let table = agent.table.clone();
    wait_for("both served after the restart", move || {
        let table = table.clone();
        Box::pin(async move { (table.len() == 2).then_some(()) })
    })
    .await;
    status
        .imaging_report(
            "live-a",
            served.ip.into(),
            &token,
            ProgressReport::Imaged { message: None },
        )
        .expect("report");
    watch_machine(&api, "live-a", "Imaged", phase_is(Phase::Imaged)).await;
    println!(
        "CRD re-applied and agent restarted; Imaged written {:.2} s later",
        restarted.elapsed().as_secs_f64()
    );
    let after_b = api.get("live-b").await.expect("b");
    assert_eq!(after_b.status, before_b.status);
    assert_eq!(
        status_writes_of(&live, "live-b"),
        writes_before,
        "b's status was kept: the restarted agent had nothing to write"
    );
    let failed: Vec<_> = live
        .plane
        .agent_requests()
        .into_iter()
        .filter(|r| r.failed())
        .collect();
    assert!(
        failed.is_empty(),
        "failed requests of the agent: {failed:?}"
    );
    agent.stop().await;
}

fn status_writes_of(live: &Live, name: &str) -> usize {
    let path = format!("/machines/{name}/status");
    live.plane
        .agent_requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.uri.contains(&path))
        .count()
}

/// What `kubectl get machines` shows, as the API server renders the CRD's printer columns (the
/// Table the server sends kubectl) and as kubectl prints them: Phase, IP, MAC, Node, Progress,
/// Age; Message with `-o wide` only.
#[tokio::test]
#[ignore = "needs kube-apiserver and etcd: tests/kube-live.sh"]
async fn kubectl_get_machines_shows_mac_and_node() {
    use k8s_openapi::api::core::v1::Node;

    let live = Live::start().await;
    live.install_crd().await;
    let agent = Agent::start(&live, StatusStore::open(None), "10.77.0.0/24");
    let api = live.machines();
    api.create(
        &PostParams::default(),
        &new_machine("live-p", "52:54:00:77:00:0c", "10.77.0.12"),
    )
    .await
    .expect("create");
    // A Node of the machine's name (not Ready: the phase stays): the status names it.
    let nodes: Api<Node> = Api::all(live.admin.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "live-p"}})).expect("node"),
        )
        .await
        .expect("create Node");
    watch_machine(&api, "live-p", "nodeName", |m| {
        served_pending(m)
            && m.status.as_ref().and_then(|s| s.node_name.as_deref()) == Some("live-p")
    })
    .await;

    let request = http::Request::get("/apis/provisioner.dev/v1alpha1/machines")
        .header(
            "Accept",
            "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
        )
        .body(Vec::new())
        .expect("request");
    let table: serde_json::Value = serde_json::from_str(
        &live
            .admin
            .request_text(request)
            .await
            .expect("Table of Machines"),
    )
    .expect("Table JSON");
    let columns: Vec<(&str, i64)> = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or_default(),
                c["priority"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        columns,
        [
            ("Name", 0),
            ("Phase", 0),
            ("IP", 0),
            ("MAC", 0),
            ("Node", 0),
            ("Progress", 0),
            ("Age", 0),
            ("Message", 1)
        ]
    );
    let cells = &table["rows"][0]["cells"];
    assert_eq!(
        cells.as_array().map(|c| c[..6].to_vec()),
        Some(vec![
            json!("live-p"),
            json!("Pending"),
            json!("10.77.0.12"),
            json!("52:54:00:77:00:0c"),
            json!("live-p"),
            json!(0)
        ]),
        "{table}"
    );

    // kubectl itself, from the same bundle.
    let bin = std::path::PathBuf::from(std::env::var_os("KUBERNETES_BIN").expect("KUBERNETES_BIN"));
    let kubeconfig = live.plane.write_admin_kubeconfig();
    for wide in [false, true] {
        let mut command = std::process::Command::new(bin.join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "machines"]);
        if wide {
            command.args(["-o", "wide"]);
        }
        let out = command.output().expect("kubectl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "kubectl: {out:?}");
        println!(
            "kubectl get machines{}:\n{text}",
            if wide { " -o wide" } else { "" }
        );
        let header: Vec<&str> = text
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let mut expected = vec!["NAME", "PHASE", "IP", "MAC", "NODE", "PROGRESS", "AGE"];
        if wide {
            expected.push("MESSAGE");
        }
        assert_eq!(header, expected);
        let row: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        assert_eq!(
            row.get(..6),
            Some(
                &[
                    "live-p",
                    "Pending",
                    "10.77.0.12",
                    "52:54:00:77:00:0c",
                    "live-p",
                    "0"
                ][..]
            )
        );
    }
    agent.stop().await;
}
