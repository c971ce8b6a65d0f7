//! 1000 Machines exist when the agent starts: every one must get its finalizer and its first
//! status (Served, Pending) without a single failed request. The agent's requests are counted
//! from the API server's audit log (its ServiceAccount only), by verb, resource and code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::{stream, StreamExt as _, TryStreamExt as _};
use kube::api::{ListParams, PostParams};
use kube::{Resource as _, ResourceExt as _};

use super::super::harness::new_machine;
use super::{has_condition, phase_is, Agent, Live};
use crate::cluster::controller::FINALIZER;
use crate::cluster::crd::Machine;
use crate::status::{Phase, StatusStore};

const COUNT: usize = 1000;

fn mac_of(i: usize) -> String {
    format!("52:54:00:10:{:02x}:{:02x}", i / 256, i % 256)
}

fn ip_of(i: usize) -> String {
    format!("10.80.{}.{}", i / 250, i % 250 + 2)
}

/// What every Machine must show once the agent has taken it in.
fn taken_in(m: &Machine) -> bool {
    phase_is(Phase::Pending)(m)
        && has_condition(m, "Served", "True")
        && has_condition(m, "Conflict", "False")
        && m.finalizers().iter().any(|f| f == FINALIZER)
        && m.status.as_ref().and_then(|s| s.observed_generation) == m.meta().generation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs kube-apiserver and etcd: tests/kube-live.sh"]
async fn a_thousand_machines_start_up_without_failed_requests() {
    let live = Live::start().await;
    live.install_crd().await;
    let api = live.machines();
    let created = Instant::now();
    stream::iter(0..COUNT)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(
                    &PostParams::default(),
                    &new_machine(&format!("m{i:04}"), &mac_of(i), &ip_of(i)),
                )
                .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("create 1000 Machines");
    println!(
        "{COUNT} Machines created in {:.2} s",
        created.elapsed().as_secs_f64()
    );
    let requests_before = live.plane.agent_requests().len();

    let started = Instant::now();
    let agent = Agent::start(&live, StatusStore::open(None), "10.80.0.0/16");
    let deadline = started + Duration::from_secs(180);
    let mut done = 0;
    while done < COUNT {
        assert!(
            Instant::now() < deadline,
            "only {done} of {COUNT} Machines taken in after 180 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        let list = api.list(&ListParams::default()).await.expect("list");
        assert_eq!(list.items.len(), COUNT);
        done = list.items.iter().filter(|m| taken_in(m)).count();
    }
    let served_after = started.elapsed();
    assert_eq!(agent.table.len(), COUNT, "netboot serves every Machine");

    // The work the start-up queued may still be finishing: count once the agent is quiet.
    let mut seen = live.plane.agent_requests().len();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = live.plane.agent_requests().len();
        if now == seen {
            break;
        }
        seen = now;
    }
    agent.stop().await;
    let requests = live.plane.agent_requests().split_off(requests_before);
    let mut by_kind: BTreeMap<(String, String, u16), usize> = BTreeMap::new();
    for r in &requests {
        *by_kind
            .entry((r.verb.clone(), r.resource.clone(), r.code))
            .or_default() += 1;
    }
    println!(
        "{COUNT} Machines Served and Pending {:.2} s after the agent started; {} requests by the agent:",
        served_after.as_secs_f64(),
        requests.len()
    );
    for ((verb, resource, code), n) in &by_kind {
        println!("  {n:5} {verb} {resource} {code}");
    }
    let failed: Vec<_> = requests.iter().filter(|r| r.failed()).collect();
    assert!(
        failed.is_empty(),
        "{} failed requests, first: {:?}",
        failed.len(),
        failed.first()
    );
    let finalizer_patches = requests
        .iter()
        .filter(|r| r.verb == "patch" && r.resource == "machines")
        .count();
    assert_eq!(finalizer_patches, COUNT, "one finalizer patch per Machine");
}
