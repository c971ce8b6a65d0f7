//! Machines from Kubernetes: the `Machine` custom resource and its controller. Used instead of
//! the YAML folder when `inventory.kubeconfig` or `inventory.kubernetes` is configured.

pub mod controller;
pub mod crd;
pub mod install;
pub mod join;
#[cfg(test)]
mod rbac;
#[cfg(test)]
mod tests;
pub mod verdicts;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::machines::Table;
use crate::status::{Change, StatusStore};
pub use controller::AddressRules;
pub use crd::Machine;

/// A client from `kubeconfig`, or else the usual places (in-cluster service account,
/// `$KUBECONFIG`, `~/.kube/config`), and what its configuration says about the cluster (server
/// URL, CA certificates) for kubeadm join when cluster-info is not readable. Reads files only:
/// the API server is not contacted yet.
pub async fn connect(kubeconfig: Option<&Path>) -> anyhow::Result<(Client, join::ClusterFacts)> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no in-cluster configuration and no usable kubeconfig")?,
    };
    let facts = join::ClusterFacts {
        server: Some(config.cluster_url.to_string()),
        ca_certificates: config.root_cert.clone().unwrap_or_default(),
    };
    let client = Client::try_from(config).context("cannot build the Kubernetes client")?;
    Ok((client, facts))
}

/// What the agent does in the cluster besides watching Machines.
#[derive(Default)]
pub struct Options {
    /// Apply the Machine CRD on start.
    pub install_crd: bool,
    /// Bootstrap tokens to release when a machine joins or its Machine is deleted, and to
    /// sweep.
    pub tokens: Option<Arc<join::BootstrapTokens>>,
}

/// Whether the last contact with the API server worked (for `STATUS=`).
#[derive(Debug)]
pub struct ApiState {
    reachable: AtomicBool,
    /// What stops the agent from working with the cluster (a missing CRD), for `STATUS=`.
    problem: std::sync::Mutex<Option<String>>,
    /// True once the first list of Machines is in the table.
    loaded: tokio::sync::watch::Sender<bool>,
}

impl ApiState {
    /// Returns once the first list of Machines from the API server is in the table (what
    /// READY=1 waits for: until then netboot serves no machine).
    pub async fn inventory_loaded(&self) {
        // The sender lives in `self`: the wait can only end with the value.
        let _ = self.loaded.subscribe().wait_for(|loaded| *loaded).await;
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub fn problem(&self) -> Option<String> {
        self.problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    fn set(&self, reachable: bool, table: &Table) {
        let was = self.reachable.swap(reachable, Ordering::Relaxed);
        if was && !reachable {
            tracing::warn!(
                machines = table.len(),
                "Kubernetes API unreachable: serving the last known machines, retrying with back-off"
            );
        } else if !was && reachable {
            tracing::info!("Kubernetes API reachable again");
        }
    }
}

impl Default for ApiState {
    fn default() -> Self {
        ApiState {
            reachable: AtomicBool::new(true),
            problem: std::sync::Mutex::new(None),
            loaded: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// Runs the Machine controller until `shutdown`: the table follows the cluster's Machines and
/// every Machine's `.status` follows the status store.
pub async fn run(
    client: Client,
    table: Arc<Table>,
    store: Arc<StatusStore>,
    rules: AddressRules,
    api_state: Arc<ApiState>,
    options: Options,
    shutdown: CancellationToken,
) {
    tokio::spawn(crd_step(
        client.clone(),
        options.install_crd,
        api_state.clone(),
        shutdown.clone(),
    ));
    let machines_api: Api<Machine> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());
    let (machines, machine_writer) = reflector::store::<Machine>();
    if let Some(tokens) = &options.tokens {
        tokens.attach(machines.clone());
        tokio::spawn(
            tokens
                .clone()
                .sweep_periodically(Duration::from_secs(60), shutdown.clone()),
        );
    }
    let (nodes, node_writer) = reflector::store::<Node>();
    let (one_tx, one_rx) = mpsc::unbounded_channel::<ObjectRef<Machine>>();
    let (all_tx, all_rx) = mpsc::unbounded_channel::<()>();
    let context = Arc::new(
        controller::Context::new(
            client,
            nodes,
            table.clone(),
            store.clone(),
            rules,
            one_tx.clone(),
        )
        .with_tokens(options.tokens)
        .with_event_lanes(),
    );
    let mut loaded = context.loaded();
    let loaded_state = api_state.clone();
    tokio::spawn(async move {
        if loaded.wait_for(|loaded| *loaded).await.is_ok() {
            loaded_state.loaded.send_replace(true);
        }
    });

    // A status store change (boot event, stage2 report) → write that Machine's status.
    let mut changes = store.subscribe();
    let status_one = one_tx.clone();
    let token = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                _ = token.cancelled() => return,
                change = changes.recv() => change,
            };
            let name = match change {
                Ok(Change::Added(s) | Change::Removed(s)) => s.name,
                Ok(Change::Updated { after, .. }) => after.name,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = all_tx.send(());
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if status_one.send(ObjectRef::new(&name)).is_err() {
                return;
            }
        }
    });

    // A Node change → reconcile the Machines of that host name (NodeReady, the Ready phase).
    let node_machines = machines.clone();
    let token = shutdown.clone();
    let node_events = reflector::reflector(
        node_writer,
        watcher(nodes_api, watcher::Config::default().any_semantic())
            .modify(keep_node_readiness)
            .default_backoff(),
    )
    .touched_objects();
    tokio::spawn(async move {
        let mut node_events = std::pin::pin!(node_events);
        loop {
            let event = tokio::select! {
                _ = token.cancelled() => return,
                event = node_events.next() => event,
            };
            match event {
                None => return,
                Some(Ok(node)) => {
                    let name = node.name_any();
                    for machine in node_machines.state() {
                        if controller::host_name(&machine) == name {
                            let _ = one_tx.send(ObjectRef::from_obj(&*machine));
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!("watching Nodes failed (no Ready marking until it works): {e}")
                }
            }
        }
    });

    // The Machine watch: the reflector's store takes each event, then the verdicts follow it
    // (before the controller runs a reconcile for it, so a reconcile never reads a verdict
    // older than its Machine).
    let judge = context.clone();
    let machine_events = watcher(machines_api, watcher::Config::default().any_semantic())
        .modify(drop_bookkeeping)
        .reflect(machine_writer)
        .map_ok(move |event| {
            judge.observe(&event);
            event
        })
        .applied_objects();
    let controller = Controller::for_stream(machine_events, machines).with_config(
        kube::runtime::controller::Config::default().concurrency(controller::CONCURRENCY),
    );
    let one = stream::unfold(
        one_rx,
        |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
    );
    let all = stream::unfold(
        all_rx,
        |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
    );
    let token = shutdown.clone();
    controller
        .reconcile_on(one)
        .reconcile_all_on(all)
        .graceful_shutdown_on(async move { token.cancelled().await })
        .run(controller::reconcile, controller::error_policy, context)
        .for_each(|result| {
            match result {
                Ok(_) => api_state.set(true, &table),
                Err(kube::runtime::controller::Error::QueueError(e)) => {
                    api_state.set(false, &table);
                    tracing::debug!("watching Machines: {e}");
                }
                Err(kube::runtime::controller::Error::ReconcilerFailed(e, _)) => {
                    // error_policy logged it; an API error means the server is not answering.
                    if matches!(
                        &e,
                        controller::Error::Kube(
                            kube::Error::HyperError(_) | kube::Error::Service(_)
                        )
                    ) {
                        api_state.set(false, &table);
                    }
                }
                Err(e) => tracing::debug!("controller: {e}"),
            }
            futures_util::future::ready(())
        })
        .await;
}

/// What the reflector keeps of a Machine: no managed fields and no client-side apply copy of
/// the object (nothing here reads them; with server-side apply they are most of a Machine's
/// size, and the store holds every Machine).
fn drop_bookkeeping(machine: &mut Machine) {
    let meta = &mut machine.metadata;
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// What the reflector keeps of a Node: its name and conditions (a Node's status also lists
/// its images, addresses, capacity…, kilobytes each).
fn keep_node_readiness(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.metadata.labels = None;
    node.spec = None;
    if let Some(status) = node.status.as_mut() {
        *status = k8s_openapi::api::core::v1::NodeStatus {
            conditions: status.conditions.take(),
            ..Default::default()
        };
    }
}

/// The CRD step on start: apply it (when allowed), else check one is installed. A missing CRD
/// is reported in `STATUS=` and checked again every 30 s; an unreachable API server is retried
/// with back-off.
pub(crate) async fn crd_step(
    client: Client,
    install: bool,
    api_state: Arc<ApiState>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match install::ensure_crd(client.clone(), install).await {
            Ok(install::CrdState::Missing(problem)) => {
                tracing::error!("{problem}");
                api_state.set_problem(Some(problem));
                Duration::from_secs(30)
            }
            // Asked to install it, but neither installing nor reading it was allowed: the
            // permissions may not be in place yet. `kubeadm init` writes admin.conf (which
            // starts netboot) minutes before it binds that user to cluster-admin, so try again
            // instead of serving without a CRD for good.
            Ok(install::CrdState::Unverified) if install => {
                tracing::info!(
                    "not allowed to install or read the Machine CRD yet: trying again in 30 s"
                );
                Duration::from_secs(30)
            }
            Ok(_) => {
                api_state.set_problem(None);
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "Machine CRD step failed, retrying in {}s: {e}",
                    backoff.as_secs()
                );
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
