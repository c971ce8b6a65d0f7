//! The status store's tests: inventory, boot events and reports, the state file, the user-data
//! replay record, the journal message ids.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use netboot::provisioning::Refusal;
use netboot::{BootEvent, MacAddr, Machine};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::phase::summary;
use super::store::{now_usec, UnknownMachine};
use super::*;

fn machine(name: &str, last: u8) -> Machine {
    Machine {
        name: name.to_string(),
        mac: MacAddr([0x52, 0x54, 0, 0, 0, last]),
        ip: Ipv4Addr::new(10, 77, 0, last),
        hostname: None,
    }
}

fn inventory(machines: &[Machine]) -> HashMap<MacAddr, Machine> {
    machines.iter().map(|m| (m.mac, m.clone())).collect()
}

fn drain(rx: &mut broadcast::Receiver<Change>) -> Vec<Change> {
    let mut out = Vec::new();
    while let Ok(c) = rx.try_recv() {
        out.push(c);
    }
    out
}

#[test]
fn inventory_adds_and_removes_machines() {
    let store = StatusStore::open(None);
    let mut rx = store.subscribe();
    let (a, b) = (machine("a", 2), machine("b", 3));
    store.sync_inventory(&inventory(&[a.clone(), b.clone()]));
    let added = drain(&mut rx);
    assert_eq!(added.len(), 2);
    assert!(added
        .iter()
        .all(|c| matches!(c, Change::Added(s) if s.phase == Phase::Pending)));
    store.sync_inventory(&inventory(std::slice::from_ref(&b)));
    let removed = drain(&mut rx);
    assert!(
        matches!(&removed[..], [Change::Removed(s)] if s.name == "a"),
        "{removed:?}"
    );
    assert_eq!(store.snapshot().len(), 1);
    // Unchanged inventory: nothing to say.
    store.sync_inventory(&inventory(&[b]));
    assert!(drain(&mut rx).is_empty());
}

#[test]
fn boot_events_move_pending_and_failed_machines_to_pxe_booting_only() {
    let store = StatusStore::open(None);
    let a = machine("a", 2);
    store.sync_inventory(&inventory(std::slice::from_ref(&a)));
    let mut rx = store.subscribe();
    store.observe(&a, &BootEvent::DhcpReleased);
    assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Pending));
    let seen = store.get("a").map(|s| s.last_seen_usec).unwrap_or(0);
    assert!(seen > 0, "any event marks the machine seen");

    store.observe(&a, &BootEvent::DhcpOffered);
    let now = store.get("a").expect("a");
    assert_eq!(now.phase, Phase::PxeBooting);
    assert_eq!(now.message, "DHCP offer sent");
    let changes = drain(&mut rx);
    assert!(changes
        .iter()
        .any(|c| matches!(c, Change::Updated { before, after }
        if before.phase == Phase::Pending && after.phase == Phase::PxeBooting)));

    // Further PXE traffic while booting changes nothing (same second: not even last_seen).
    store.observe(&a, &BootEvent::DhcpAcked);
    store.observe(&a, &BootEvent::IpxeScriptServed);
    assert!(drain(&mut rx).is_empty());

    store
        .report(
            "a",
            Report::Imaging {
                progress: 42,
                message: "120 MB/s".into(),
            },
        )
        .expect("known");
    store.observe(&a, &BootEvent::DhcpOffered);
    assert_eq!(
        store.get("a").map(|s| s.phase),
        Some(Phase::Imaging),
        "stage2's own DHCP does not undo imaging"
    );
    store
        .report(
            "a",
            Report::Failed {
                message: "sha256 mismatch".into(),
            },
        )
        .expect("known");
    let failed = store.get("a").expect("a");
    assert_eq!(
        (failed.phase, failed.progress, failed.message.as_str()),
        (Phase::Failed, 42, "sha256 mismatch")
    );
    store.observe(&a, &BootEvent::IpxeScriptServed);
    assert_eq!(
        store.get("a").map(|s| s.phase),
        Some(Phase::PxeBooting),
        "a failed machine that boots again is retrying"
    );
    store.report("a", Report::Imaged).expect("known");
    store.observe(&a, &BootEvent::DhcpAcked);
    assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Imaged));
    assert_eq!(
        store.report("zz", Report::Ready),
        Err(UnknownMachine("zz".into()))
    );
}

#[test]
fn progress_is_clamped_and_summarised() {
    let store = StatusStore::open(None);
    let ms = [machine("a", 2), machine("b", 3), machine("c", 4)];
    store.sync_inventory(&inventory(&ms));
    assert_eq!(store.summary(), "3 machines: 3 pending");
    store
        .report(
            "a",
            Report::Imaging {
                progress: 200,
                message: String::new(),
            },
        )
        .expect("known");
    assert_eq!(store.get("a").map(|s| s.progress), Some(100));
    store
        .report(
            "a",
            Report::Imaging {
                progress: 42,
                message: String::new(),
            },
        )
        .expect("known");
    store.report("b", Report::Ready).expect("known");
    store.report("c", Report::Ready).expect("known");
    assert_eq!(store.summary(), "3 machines: 1 imaging 42%, 2 ready");
    store
        .report(
            "b",
            Report::Imaging {
                progress: 10,
                message: String::new(),
            },
        )
        .expect("known");
    assert_eq!(store.summary(), "3 machines: 2 imaging 26%, 1 ready");
    let counts = PhaseCounts::of(&store.snapshot());
    assert_eq!(
        (
            counts.total,
            counts.get(Phase::Imaging),
            counts.get(Phase::Ready)
        ),
        (3, 2, 1)
    );
    assert_eq!(summary(&[]), "0 machines");
    assert_eq!(
        summary(&[MachineStatus::pending(&machine("x", 9))]),
        "1 machine: 1 pending"
    );
}

#[tokio::test]
async fn a_restart_resumes_from_the_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.yaml");
    let (a, b) = (machine("a", 2), machine("b", 3));
    let shutdown = CancellationToken::new();
    let store = StatusStore::open(Some(path.clone()));
    let writer = tokio::spawn(store.clone().persist(shutdown.clone()));
    store.sync_inventory(&inventory(&[a.clone(), b.clone()]));
    store
        .report(
            "a",
            Report::Imaging {
                progress: 42,
                message: "writing".into(),
            },
        )
        .expect("known");
    store
        .report(
            "b",
            Report::Failed {
                message: "no disk".into(),
            },
        )
        .expect("known");
    // Phase changes reach the disk without waiting for shutdown.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("no disk") && text.contains("Imaging") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "state file not written: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    writer.await.expect("writer");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files left: {leftovers:?}");

    // b got new hardware while we were down: it starts over.
    let b_new = Machine {
        mac: MacAddr([0x52, 0x54, 0, 0, 1, 3]),
        ..b
    };
    let again = StatusStore::open(Some(path.clone()));
    again.sync_inventory(&inventory(&[a, b_new]));
    let a = again.get("a").expect("a");
    assert_eq!(
        (a.phase, a.progress, a.message.as_str()),
        (Phase::Imaging, 42, "writing")
    );
    assert!(a.last_seen_usec > 0);
    assert_eq!(again.get("b").map(|s| s.phase), Some(Phase::Pending));
}

/// A replayed user-data fetch is kept (state file included) until the next provisioning.
#[tokio::test]
async fn a_user_data_replay_is_recorded_until_the_next_provisioning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.yaml");
    let a = machine("a", 2);
    let shutdown = CancellationToken::new();
    let store = StatusStore::open(Some(path.clone()));
    let writer = tokio::spawn(store.clone().persist(shutdown.clone()));
    store.sync_inventory(&inventory(std::slice::from_ref(&a)));
    let token = store.start_imaging(&a).expect("token");
    store.report("a", Report::Imaged).expect("known");
    let peer = IpAddr::V4(a.ip);
    store
        .take_user_data(&token, peer)
        .expect("first fetch served");
    assert_eq!(store.get("a").map(|s| s.user_data_replayed_usec), Some(0));
    let before = now_usec();
    assert_eq!(
        store.check_user_data(&token, peer),
        Err(Refusal::Replayed {
            machine: "a".into()
        })
    );
    let replayed = store.get("a").expect("a").user_data_replayed_usec;
    assert!(replayed >= before, "{replayed} < {before}");
    shutdown.cancel();
    writer.await.expect("writer");
    let text = std::fs::read_to_string(&path).expect("state file");
    assert!(
        text.contains(&format!("userDataReplayedUsec: {replayed}")),
        "{text}"
    );

    let again = StatusStore::open(Some(path));
    again.sync_inventory(&inventory(std::slice::from_ref(&a)));
    assert_eq!(
        again.get("a").map(|s| s.user_data_replayed_usec),
        Some(replayed)
    );
    again.start_imaging(&a).expect("new provisioning");
    assert_eq!(again.get("a").map(|s| s.user_data_replayed_usec), Some(0));
}

#[test]
fn a_corrupt_state_file_is_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.yaml");
    std::fs::write(&path, "machines: [not, a, map").expect("write");
    let store = StatusStore::open(Some(path));
    store.sync_inventory(&inventory(&[machine("a", 2)]));
    assert_eq!(store.get("a").map(|s| s.phase), Some(Phase::Pending));
}

#[test]
fn message_ids_are_distinct_128_bit_hex() {
    let mut ids: Vec<&str> = Phase::ALL.iter().map(|p| p.message_id()).collect();
    assert!(ids
        .iter()
        .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), Phase::ALL.len());
}
