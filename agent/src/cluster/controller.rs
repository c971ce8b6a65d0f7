//! The Machine controller: keeps the netboot table equal to the valid Machines of the cluster
//! and writes each Machine's `.status` from the status store.
//!
//! Validity is a property of the whole set (a MAC or IP claimed twice disqualifies every
//! claimant, as in the YAML folder). The verdicts follow the Machine watch, one event at a
//! time ([`Context::observe`], [`super::verdicts::Judge`]), and update the table when they
//! change; a reconcile reads its Machine's verdict and writes that Machine's status. When a
//! conflict appears or goes away, the other party is reconciled too, so it gets its condition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, watch};

use super::crd::{Machine, MachineStatus};
use super::join::{BootstrapTokens, JoinError};
use super::verdicts::{Judge, Outcome};
use crate::machines::Table;
use crate::status::{self, Phase, Report, StatusStore};

/// Removed only once what the machine owned is cleaned up.
pub const FINALIZER: &str = "provisioner.dev/cleanup";
/// Server-side apply field manager of `.status`.
pub const FIELD_MANAGER: &str = "provisioner";
/// Safety-net resync of every Machine (missed events, clock-driven conditions).
const RESYNC: Duration = Duration::from_secs(300);
/// Reconciles at once, at most. Unbounded, a start with 1000 Machines sent ~1000 requests at
/// once and kube-apiserver's priority and fairness refused some with 429 (no retry in the
/// client): a real API server measured 0 refusals at this bound, and every Machine served
/// in the same time.
pub const CONCURRENCY: u16 = 16;
/// After a failed reconcile (API error): try again after this long.
const RETRY: Duration = Duration::from_secs(15);
/// `.status.lastSeen` moving by less than this, with nothing else changed, is not written: a
/// machine doing DHCP every second would cost a write per second (D-Bus and the state file
/// keep it to the second). It goes out with the next other change.
pub const LAST_SEEN_WRITE: Duration = Duration::from_secs(60);
/// Events are posted on lanes of their own, after the status writes: with the API server as
/// the bottleneck, a status write does not wait behind the Events of the Machines before it.
/// A Machine's Events always take the same lane, so they are posted in order.
const EVENT_LANES: usize = 4;
/// Events waiting per lane, at most; beyond that a reconcile waits for room.
const EVENT_BACKLOG: usize = 1024;
/// An Event waits while status writes are in flight, so that in a burst (a rack powering on)
/// the API server spends its CPU on the statuses first; but no longer than this.
pub(crate) const EVENT_YIELD_MAX: Duration = Duration::from_secs(10);

pub const CONDITION_SERVED: &str = "Served";
pub const CONDITION_CONFLICT: &str = "Conflict";
pub const CONDITION_NODE_READY: &str = "NodeReady";
/// True once a spent provisioning token asked for user-data again; present until the next
/// provisioning (imaging) starts.
pub const CONDITION_USER_DATA_REPLAYED: &str = "UserDataReplayed";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the Machine store is gone (controller stopping)")]
    StoreGone,
    #[error("bootstrap tokens: {0}")]
    Join(#[from] super::join::JoinError),
}

/// What the controller needs to know that the API server does not: the provisioning subnet
/// and the addresses no machine may take.
pub use crate::machines::AddressRules;
/// Why a Machine is not served.
pub use crate::machines::Problem;

pub struct Context {
    pub client: Client,
    /// Every Node (for NodeReady and the Ready phase).
    pub nodes: Store<Node>,
    pub table: Arc<Table>,
    pub status: Arc<StatusStore>,
    pub rules: AddressRules,
    pub recorder: Recorder,
    /// Where Events go (posted in the background); `None`: posted by the reconcile itself.
    event_lanes: Option<EventLanes>,
    /// The verdicts, kept up to date by [`Context::observe`] from the Machine watch.
    judge: Mutex<JudgeState>,
    /// True once the first full list of Machines is judged and in the table.
    loaded: watch::Sender<bool>,
    /// Asks the controller to reconcile a Machine (the other party of a conflict that
    /// appeared or went away).
    reconcile: mpsc::UnboundedSender<ObjectRef<Machine>>,
    /// Bootstrap token Secrets, deleted when a machine joins or its Machine is deleted.
    pub tokens: Option<Arc<BootstrapTokens>>,
    /// Machines this controller added the finalizer to, by name, with the resourceVersion the
    /// patch was made against: until the reflector has the patched version, that version is
    /// known to carry the finalizer.
    finalizer_added: Mutex<HashMap<String, String>>,
    /// The last status this controller wrote, by Machine name, until the reflector has it.
    status_written: Mutex<HashMap<String, WrittenStatus>>,
}

/// A status write, remembered until its watch event arrives.
struct WrittenStatus {
    /// The resourceVersion of the copy the status was computed from, and the one the write
    /// produced.
    from: Option<String>,
    to: Option<String>,
    status: MachineStatus,
}

/// Whether `version` is older than `written`. kube-apiserver's resourceVersions are etcd
/// revisions, increasing along a watch; were they not numbers, only the version the write was
/// computed from counts as older.
fn older(version: Option<&String>, written: &WrittenStatus) -> bool {
    let number = |v: Option<&String>| v.and_then(|v| v.parse::<u64>().ok());
    match (number(version), number(written.to.as_ref())) {
        (Some(version), Some(to)) => version < to,
        _ => version == written.from.as_ref(),
    }
}

#[derive(Default)]
struct JudgeState {
    /// The verdicts the table was made from; `None` until the first full list.
    current: Option<Judge>,
    /// A (re)list in progress: its Machines so far.
    listing: Option<Vec<Arc<Machine>>>,
}

impl Context {
    /// The Machine as it is after this controller's finalizer patch, while the reflector
    /// still holds the version the patch was made against. Another trigger (a status store
    /// change, every Machine reconciled again) can run the Machine before the patch's watch
    /// event arrives; from that stale copy the finalizer helper would send its JSON patch
    /// again, and its `test` of the finalizer list fails with 422 (a failed request and a
    /// retry 15 s later, for nearly every Machine at start-up).
    fn with_known_finalizer(&self, machine: Arc<Machine>) -> Arc<Machine> {
        let mut added = self
            .finalizer_added
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let name = machine.name_any();
        let Some(patched_from) = added.get(&name) else {
            return machine;
        };
        if machine.resource_version().as_ref() != Some(patched_from) {
            // The reflector has moved past that version: it knows the truth (the finalizer,
            // or its removal by someone else, which the helper then adds again).
            added.remove(&name);
            return machine;
        }
        if machine.finalizers().iter().any(|f| f == FINALIZER) {
            return machine;
        }
        let mut known = (*machine).clone();
        known
            .meta_mut()
            .finalizers
            .get_or_insert_with(Vec::new)
            .push(FINALIZER.to_string());
        Arc::new(known)
    }

    /// The Machine with the status this controller last wrote, while the reflector still
    /// holds an older version: a reconcile from that copy (a status store change, the write's
    /// own watch event still on its way) would find the status different and write it again.
    fn with_known_status(&self, machine: Arc<Machine>) -> Arc<Machine> {
        let mut written = self
            .status_written
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let name = machine.name_any();
        let Some(last) = written.get(&name) else {
            return machine;
        };
        if older(machine.resource_version().as_ref(), last) {
            let mut known = (*machine).clone();
            known.status = Some(last.status.clone());
            return Arc::new(known);
        }
        // The reflector has the write, or a newer version: it knows the truth.
        written.remove(&name);
        machine
    }

    fn wrote_status(
        &self,
        name: &str,
        from: Option<String>,
        to: Option<String>,
        status: MachineStatus,
    ) {
        self.status_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), WrittenStatus { from, to, status });
    }

    pub fn new(
        client: Client,
        nodes: Store<Node>,
        table: Arc<Table>,
        status: Arc<StatusStore>,
        rules: AddressRules,
        reconcile: mpsc::UnboundedSender<ObjectRef<Machine>>,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "provisioner".to_string(),
                instance: None,
            },
        );
        Context {
            client,
            nodes,
            table,
            status,
            rules,
            recorder,
            event_lanes: None,
            judge: Mutex::new(JudgeState::default()),
            loaded: watch::Sender::new(false),
            reconcile,
            tokens: None,
            finalizer_added: Mutex::new(HashMap::new()),
            status_written: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_tokens(mut self, tokens: Option<Arc<BootstrapTokens>>) -> Context {
        self.tokens = tokens;
        self
    }

    /// Events posted in the background ([`EventLanes`]) instead of by the reconcile.
    pub fn with_event_lanes(mut self) -> Context {
        self.event_lanes = Some(EventLanes::start(self.recorder.clone()));
        self
    }

    /// Becomes true once the first full list of Machines is judged and in the table.
    pub fn loaded(&self) -> watch::Receiver<bool> {
        self.loaded.subscribe()
    }

    /// Follows the Machine watch (called for every event, right after the reflector's store
    /// took it, before the controller sees it): keeps the verdicts current, and updates the
    /// table and the reimage requests when they change. A status write (most events) costs a
    /// lookup. A list (at start, after a lost watch) is judged in full once it is complete.
    pub fn observe(&self, event: &watcher::Event<Machine>) {
        let mut state = self.judge.lock().unwrap_or_else(|p| p.into_inner());
        let (outcome, first) = match event {
            watcher::Event::Init => {
                state.listing = Some(Vec::new());
                return;
            }
            watcher::Event::InitApply(machine) => {
                if let Some(listing) = state.listing.as_mut() {
                    listing.push(Arc::new(machine.clone()));
                }
                return;
            }
            watcher::Event::InitDone => {
                let listed = state.listing.take().unwrap_or_default();
                let judged = Judge::of(self.rules.clone(), listed);
                let first = state.current.is_none();
                let outcome = match &state.current {
                    Some(before) => Judge::compare(before, &judged),
                    None => Outcome {
                        served_changed: true,
                        reimage_changed: true,
                        imaging_changed: true,
                        problems_changed: judged.verdicts().problems.keys().cloned().collect(),
                    },
                };
                state.current = Some(judged);
                (outcome, first)
            }
            watcher::Event::Apply(machine) => match state.current.as_mut() {
                Some(judge) => (judge.update(machine), false),
                None => return,
            },
            watcher::Event::Delete(machine) => match state.current.as_mut() {
                Some(judge) => (judge.remove(&machine.name_any()), false),
                None => return,
            },
        };
        if let Some(judge) = &state.current {
            self.act_on(judge, &outcome, first);
        }
        drop(state);
        if first {
            self.loaded.send_replace(true);
        }
    }

    /// The Machine is being deleted: stop serving it now, whatever the watch has shown yet.
    fn leave(&self, name: &str) {
        let mut state = self.judge.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(judge) = state.current.as_mut() {
            let outcome = judge.leave(name);
            if let Some(judge) = &state.current {
                self.act_on(judge, &outcome, false);
            }
        }
    }

    /// Applies what changed: the table (which adds and removes status store entries), the
    /// reimage requests, and a reconcile of every Machine whose problem changed other than
    /// by its own event (the other party of a conflict).
    fn act_on(&self, judge: &Judge, outcome: &Outcome, first: bool) {
        if outcome.is_empty() {
            return;
        }
        let verdicts = judge.verdicts();
        for name in &outcome.problems_changed {
            if let Some(problem) = verdicts.problems.get(name) {
                tracing::warn!(machine = %name, "machine not served: {}", problem.message());
            }
        }
        if outcome.imaging_changed {
            self.table.set_imaging(verdicts.imaging.clone());
        }
        if outcome.served_changed {
            tracing::info!(
                machines = verdicts.served.len(),
                rejected = verdicts.problems.len(),
                "inventory loaded from the cluster"
            );
            self.table.replace(verdicts.served.clone());
        }
        if outcome.reimage_changed {
            self.status.sync_reimage(&verdicts.reimage);
        }
        if !first {
            for name in &outcome.problems_changed {
                // Nobody listening means the controller is stopping.
                let _ = self.reconcile.send(ObjectRef::new(name));
            }
        }
    }

    fn problem(&self, name: &str) -> Option<Problem> {
        let state = self.judge.lock().unwrap_or_else(|p| p.into_inner());
        state
            .current
            .as_ref()
            .and_then(|j| j.problem(name).cloned())
    }

    fn node_of(&self, machine: &Machine) -> Option<Arc<Node>> {
        let hostname = host_name(machine);
        self.nodes.get(&ObjectRef::new(&hostname))
    }
}

/// The name the machine's Node will have.
pub fn host_name(machine: &Machine) -> String {
    machine
        .spec
        .hostname
        .clone()
        .unwrap_or_else(|| machine.name_any())
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
}

/// 0 is the status store's "never seen". Whole seconds: a `Time` goes over the wire without
/// its fraction, so a finer one would never equal the stored status and every change would be
/// written twice (and every resync write again).
fn usec_to_time(usec: u64) -> Option<Time> {
    if usec == 0 {
        return None;
    }
    let seconds = i64::try_from(usec / 1_000_000).ok()?;
    Timestamp::from_second(seconds).ok().map(Time)
}

/// Now, in whole seconds (see [`usec_to_time`]).
fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A condition, keeping the previous transition time when its status did not change.
fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// The status the Machine should have: phase, progress, message and last-seen from the status
/// store when the machine is served (else the last known phase, and the reason as message),
/// conditions from the verdict and the Node.
pub fn desired_status(
    machine: &Machine,
    problem: Option<&Problem>,
    stored: Option<&status::MachineStatus>,
    node: Option<&Node>,
    now: &Time,
) -> MachineStatus {
    let current = machine.status.clone().unwrap_or_default();
    let generation = machine.meta().generation;
    let mut desired = MachineStatus {
        observed_generation: generation,
        node_name: node.map(|n| n.name_any()),
        ..MachineStatus::default()
    };
    match (stored, problem) {
        (Some(s), None) => {
            desired.phase = Some(s.phase.as_str().to_string());
            desired.progress = Some(s.progress);
            desired.message = (!s.message.is_empty()).then(|| s.message.clone());
            desired.last_seen = usec_to_time(s.last_seen_usec);
        }
        _ => {
            desired.phase = Some(
                current
                    .phase
                    .clone()
                    .unwrap_or_else(|| Phase::Pending.as_str().to_string()),
            );
            desired.progress = current.progress;
            desired.message = problem.map(Problem::message);
            desired.last_seen = current.last_seen.clone();
        }
    }
    let old = &current.conditions;
    let served = match problem {
        None if stored.is_some() => condition(
            old,
            CONDITION_SERVED,
            true,
            "InInventory",
            "netboot answers this machine".to_string(),
            generation,
            now,
        ),
        None => condition(
            old,
            CONDITION_SERVED,
            false,
            "NotYetLoaded",
            "not in the netboot table yet".to_string(),
            generation,
            now,
        ),
        Some(p @ (Problem::Invalid(_) | Problem::Malformed(_))) => condition(
            old,
            CONDITION_SERVED,
            false,
            "InvalidSpec",
            p.message(),
            generation,
            now,
        ),
        Some(p @ Problem::Conflict(_)) => condition(
            old,
            CONDITION_SERVED,
            false,
            "Conflict",
            p.message(),
            generation,
            now,
        ),
    };
    let conflict = match problem {
        Some(p @ Problem::Conflict(_)) => condition(
            old,
            CONDITION_CONFLICT,
            true,
            "DuplicateAddress",
            p.message(),
            generation,
            now,
        ),
        _ => condition(
            old,
            CONDITION_CONFLICT,
            false,
            "NoConflict",
            String::new(),
            generation,
            now,
        ),
    };
    desired.conditions = vec![served, conflict];
    if let Some(replayed) = stored
        .filter(|_| problem.is_none())
        .and_then(|s| usec_to_time(s.user_data_replayed_usec))
    {
        // The message carries the time of the last refused fetch (lastTransitionTime stays
        // at the first one), so every replay changes the status and posts an Event.
        desired.conditions.push(condition(
            old,
            CONDITION_USER_DATA_REPLAYED,
            true,
            "TokenReused",
            format!(
                "user-data requested again with an already used provisioning token: refused (last at {})",
                replayed.0
            ),
            generation,
            now,
        ));
    }
    if let Some(node) = node {
        let ready = node_ready(node);
        desired.conditions.push(condition(
            old,
            CONDITION_NODE_READY,
            ready,
            if ready { "NodeReady" } else { "NodeNotReady" },
            format!("Node {}", node.name_any()),
            generation,
            now,
        ));
    }
    desired
}

fn condition_true(status: &MachineStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

fn condition_message<'a>(status: &'a MachineStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| c.message.as_str())
}

fn condition_reason<'a>(status: &'a MachineStatus, type_: &str) -> Option<&'a str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

/// `desired`, with the current `lastSeen` kept when nothing else changed and it moved by less
/// than [`LAST_SEEN_WRITE`].
pub fn hold_last_seen(mut desired: MachineStatus, current: &MachineStatus) -> MachineStatus {
    let (Some(new), Some(old)) = (&desired.last_seen, &current.last_seen) else {
        return desired;
    };
    let moved = new.0.as_second() - old.0.as_second();
    let window = i64::try_from(LAST_SEEN_WRITE.as_secs()).unwrap_or(i64::MAX);
    if (0..window).contains(&moved) {
        let previous = std::mem::replace(&mut desired.last_seen, current.last_seen.clone());
        if &desired != current {
            desired.last_seen = previous;
        }
    }
    desired
}

async fn post_event(recorder: &Recorder, name: &str, event: &Event, reference: &ObjectReference) {
    if let Err(e) = recorder.publish(event, reference).await {
        // The status already says it; a lost Event is not worth a retry loop.
        tracing::warn!(machine = %name, reason = %event.reason, "cannot post Event: {e}");
    }
}

/// Posts Events in the background, `EVENT_LANES` at once, each Machine's in order, after the
/// status writes in flight (for at most [`EVENT_YIELD_MAX`]).
pub struct EventLanes {
    lanes: Vec<mpsc::Sender<(String, Event, ObjectReference)>>,
    /// Status writes in flight.
    writing: Arc<watch::Sender<usize>>,
}

/// A status write in flight; Events wait for none to be.
pub struct StatusWriting(Arc<watch::Sender<usize>>);

impl Drop for StatusWriting {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl EventLanes {
    /// The lanes' tasks end when the lanes are dropped, after posting what they hold.
    pub fn start(recorder: Recorder) -> EventLanes {
        let writing = Arc::new(watch::Sender::new(0usize));
        let lanes = (0..EVENT_LANES)
            .map(|_| {
                let (tx, mut rx) = mpsc::channel::<(String, Event, ObjectReference)>(EVENT_BACKLOG);
                let recorder = recorder.clone();
                let mut writes = writing.subscribe();
                tokio::spawn(async move {
                    while let Some((name, event, reference)) = rx.recv().await {
                        let _ = tokio::time::timeout(
                            EVENT_YIELD_MAX,
                            writes.wait_for(|in_flight| *in_flight == 0),
                        )
                        .await;
                        post_event(&recorder, &name, &event, &reference).await;
                    }
                });
                tx
            })
            .collect();
        EventLanes { lanes, writing }
    }

    /// Marks a status write in flight until the guard is dropped.
    pub fn writing(&self) -> StatusWriting {
        self.writing.send_modify(|n| *n += 1);
        StatusWriting(self.writing.clone())
    }

    pub(crate) async fn post(&self, name: &str, event: Event, reference: ObjectReference) {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut hasher);
        let lane = (hasher.finish() % self.lanes.len() as u64) as usize;
        // Closed only when the controller stops.
        let _ = self.lanes[lane]
            .send((name.to_string(), event, reference))
            .await;
    }
}

/// The Events a status change deserves: a phase change, a conflict or an invalid spec appearing,
/// a refused user-data replay (each one).
fn events_for(before: &MachineStatus, after: &MachineStatus) -> Vec<Event> {
    let mut events = Vec::new();
    if let (Some(from), Some(to)) = (&before.phase, &after.phase) {
        if from != to {
            let detail = after
                .message
                .as_deref()
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            events.push(Event {
                type_: if to == Phase::Failed.as_str() {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: to.clone(),
                note: Some(format!("{from} -> {to}{detail}")),
                action: "Provision".to_string(),
                secondary: None,
            });
        }
    }
    if condition_true(after, CONDITION_CONFLICT) && !condition_true(before, CONDITION_CONFLICT) {
        events.push(Event {
            type_: EventType::Warning,
            reason: "Conflict".to_string(),
            note: after.message.clone(),
            action: "Serve".to_string(),
            secondary: None,
        });
    }
    if condition_reason(after, CONDITION_SERVED) == Some("InvalidSpec")
        && condition_reason(before, CONDITION_SERVED) != Some("InvalidSpec")
    {
        events.push(Event {
            type_: EventType::Warning,
            reason: "InvalidSpec".to_string(),
            note: after.message.clone(),
            action: "Serve".to_string(),
            secondary: None,
        });
    }
    let replay = condition_message(after, CONDITION_USER_DATA_REPLAYED);
    if replay.is_some() && replay != condition_message(before, CONDITION_USER_DATA_REPLAYED) {
        events.push(Event {
            type_: EventType::Warning,
            reason: "UserDataReplayed".to_string(),
            note: replay.map(str::to_string),
            action: "ServeUserData".to_string(),
            secondary: None,
        });
    }
    events
}

/// The controller's reconcile function: finalizer first, then `apply` or `cleanup`.
pub async fn reconcile(machine: Arc<Machine>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Machine> = Api::all(ctx.client.clone());
    let machine = ctx.with_known_finalizer(machine);
    let adds_finalizer = machine.meta().deletion_timestamp.is_none()
        && !machine.finalizers().iter().any(|f| f == FINALIZER);
    let (name, version) = (machine.name_any(), machine.resource_version());
    let result = finalizer(&api, FINALIZER, machine, |event| async {
        match event {
            FinalizerEvent::Apply(machine) => apply(machine, &ctx).await,
            FinalizerEvent::Cleanup(machine) => cleanup(machine, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    if let (true, Ok(_), Some(version)) = (adds_finalizer, &result, version) {
        ctx.finalizer_added
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name, version);
    }
    result
}

async fn apply(machine: Arc<Machine>, ctx: &Context) -> Result<Action, Error> {
    // Before the first full list is judged, the verdict and the table mean nothing yet.
    ctx.loaded()
        .wait_for(|loaded| *loaded)
        .await
        .map_err(|_| Error::StoreGone)?;
    let machine = ctx.with_known_status(machine);
    let name = machine.name_any();
    let problem = ctx.problem(&name);
    let node = ctx.node_of(&machine);
    if let Some(node) = &node {
        let phase = ctx.status.get(&name).map(|s| s.phase);
        // A Ready Node of this name means the machine is in the cluster, unless it is being
        // (re)imaged: then the Node is the old installation's and will go NotReady.
        if node_ready(node)
            && matches!(phase, Some(Phase::Pending | Phase::Imaged | Phase::Joining))
        {
            let _ = ctx.status.report(&name, Report::Ready);
        }
    }
    let stored = ctx.status.get(&name);
    let now = now();
    let current = machine.status.clone().unwrap_or_default();
    let desired = hold_last_seen(
        desired_status(
            &machine,
            problem.as_ref(),
            stored.as_ref(),
            node.as_deref(),
            &now,
        ),
        &current,
    );
    if machine.status.as_ref() != Some(&desired) {
        let api: Api<Machine> = Api::all(ctx.client.clone());
        let writing = ctx.event_lanes.as_ref().map(EventLanes::writing);
        let patch = serde_json::json!({
            "apiVersion": "provisioner.dev/v1alpha1",
            "kind": "Machine",
            "status": desired,
        });
        let written = api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.wrote_status(
            &name,
            machine.resource_version(),
            written.resource_version(),
            desired.clone(),
        );
        drop(writing);
        let reference = machine.object_ref(&());
        for event in events_for(&current, &desired) {
            match &ctx.event_lanes {
                Some(lanes) => lanes.post(&name, event, reference.clone()).await,
                None => post_event(&ctx.recorder, &name, &event, &reference).await,
            }
        }
        let ready = Some(Phase::Ready.as_str());
        if desired.phase.as_deref() == ready && current.phase.as_deref() != ready {
            if let Some(tokens) = &ctx.tokens {
                // The node has joined: its bootstrap token has done its job. A failure here is
                // left to the periodic sweep (the phase is written, this will not run again).
                if let Err(e) = tokens.release(&name, "the node has joined").await {
                    tracing::warn!(machine = %name, "cannot delete the bootstrap token Secret: {e}");
                }
            }
        }
    }
    Ok(Action::requeue(RESYNC))
}

/// The Machine is being deleted: stop serving it and drop its status (the table update removes
/// its status store entry); the finalizer is removed after this returns.
async fn cleanup(machine: Arc<Machine>, ctx: &Context) -> Result<Action, Error> {
    let name = machine.name_any();
    ctx.finalizer_added
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    ctx.leave(&name);
    tracing::info!(machine = %name, mac = %machine.spec.mac_address, ip = %machine.spec.ip_address, "Machine deleted: no longer served");
    if let Some(tokens) = &ctx.tokens {
        match tokens.release(&name, "the Machine is deleted").await {
            Ok(_) => {}
            // Not allowed: retrying cannot help, and holding the Machine forever is worse than
            // a token that expires on its own.
            Err(JoinError::Kube(kube::Error::Api(e))) if e.code == 403 => {
                tracing::error!(machine = %name, "may not delete the bootstrap token Secret ({}); it stays until it expires", e.message);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

pub fn error_policy(machine: Arc<Machine>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(machine = %machine.name_any(), "reconcile failed, retrying in {}s: {error}", RETRY.as_secs());
    Action::requeue(RETRY)
}
