//! The controller against a real kube-apiserver + etcd (and kube-controller-manager where a
//! test needs it), each test on a throwaway control plane of its own that it starts, restarts
//! and stops ([`control_plane`]). The agent runs as it does in a cluster: as the ServiceAccount
//! of `agent/deploy/rbac.yaml` with a token from the TokenRequest API, the kubeconfig read by
//! `cluster::connect`; the test itself acts as the operator with an admin token.
//!
//! ```sh
//! tests/kube-live.sh     # unpacks the binaries (tests/lib-kube.sh), then runs these tests
//! KUBERNETES_BIN=DIR cargo test -p agent --lib --locked -- --ignored cluster::tests::live \
//!     --skip cluster::tests::live::bench --test-threads=1 --nocapture
//! ```
//!
//! - `flow`: the CRD by the agent's start step, Machines, Conflict, the phases, the bootstrap
//!   token Secret (signed into `cluster-info` by kube-controller-manager's bootstrapsigner),
//!   the user-data replay, the deletion (finalizer), the Events.
//! - `real_server`: a resourceVersion conflict on a status write, the watch across an API server
//!   restart, the CRD re-applied while Machines exist, the printer columns as kubectl shows them.
//! - `scale`: 1000 Machines at start-up with no failed request.
//! - `bench`: `tests/bench/status-apiserver.sh`, the `provisioner netboot` process against a
//!   real API server (not a test: figures).
//!   `bench::storm`: `tests/bench/boot-storm.sh`, N machines booting at once through the whole
//!   chain against that process (figures too).

mod bench;
mod control_plane;
mod flow;
mod real_server;
mod scale;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde::Deserialize as _;
use tokio_util::sync::CancellationToken;

use crate::cluster::controller::AddressRules;
use crate::cluster::crd::Machine;
use crate::cluster::install::CrdState;
use crate::cluster::join::{self, BootstrapTokens, JoinSettings};
use crate::cluster::ApiState;
use crate::machines::Table;
use crate::status::{Phase, StatusStore};
use control_plane::ControlPlane;

const CRD_NAME: &str = "machines.provisioner.dev";
const RBAC: &str = include_str!("../../../../deploy/rbac.yaml");
const TOKEN_TTL: Duration = Duration::from_secs(600);

/// A control plane, the operator's client and the agent's.
struct Live {
    plane: ControlPlane,
    admin: Client,
    agent: Client,
    /// The agent's ServiceAccount token (for a kubeconfig of its own).
    agent_token: String,
    facts: join::ClusterFacts,
}

impl Live {
    /// Starts the control plane, applies `agent/deploy/rbac.yaml` and gets the agent's
    /// ServiceAccount a token.
    async fn start() -> Live {
        Self::on(ControlPlane::start().await).await
    }

    async fn on(plane: ControlPlane) -> Live {
        let admin = plane.admin_client().await;
        apply_rbac(&admin).await;
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "kube-system");
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let token = accounts
            .create_token_request("provisioner", &PostParams::default(), &request)
            .await
            .expect("TokenRequest for kube-system/provisioner")
            .status
            .expect("token in the TokenRequest status")
            .token;
        let (agent, facts) = plane.connect("agent", &token).await;
        Live {
            plane,
            admin,
            agent,
            agent_token: token,
            facts,
        }
    }

    /// The agent's CRD step (`install::ensure_crd`), then waits until the CRD is Established.
    async fn install_crd(&self) {
        assert_eq!(
            crate::cluster::install::ensure_crd(self.agent.clone(), true)
                .await
                .expect("CRD step"),
            CrdState::Applied
        );
        let crds: Api<CustomResourceDefinition> = Api::all(self.admin.clone());
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(crds, CRD_NAME, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established within 30 s")
        .expect("watching the CRD");
    }

    fn machines(&self) -> Api<Machine> {
        Api::all(self.admin.clone())
    }
}

/// Applies every object of `agent/deploy/rbac.yaml` (server-side apply, as `kubectl apply
/// --server-side` would). kube-system appears shortly after the API server is ready: retried.
async fn apply_rbac(admin: &Client) {
    let docs: Vec<DynamicObject> = serde_yaml::Deserializer::from_str(RBAC)
        .map(DynamicObject::deserialize)
        .collect::<Result<_, _>>()
        .expect("rbac.yaml parses");
    for doc in docs {
        let types = doc.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("apiVersion");
        let (resource, _) = kube::discovery::pinned_kind(admin, &gvk)
            .await
            .expect("kind served");
        let api: Api<DynamicObject> = match doc.metadata.namespace.as_deref() {
            Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
            None => Api::all_with(admin.clone(), &resource),
        };
        let name = doc.metadata.name.clone().expect("name");
        let mut tries = 0;
        loop {
            match api
                .patch(&name, &PatchParams::apply("live-test"), &Patch::Apply(&doc))
                .await
            {
                Ok(_) => break,
                Err(kube::Error::Api(e)) if e.code == 404 && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("applying {} {name}: {e}", types.kind),
            }
        }
    }
}

/// The agent's cluster side as `daemon.rs` runs it: the controller with the CRD step and the
/// bootstrap tokens, over a status store and netboot's table.
struct Agent {
    status: Arc<StatusStore>,
    table: Arc<Table>,
    api_state: Arc<ApiState>,
    tokens: Arc<BootstrapTokens>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Agent {
    fn start(live: &Live, status: Arc<StatusStore>, subnet: &str) -> Agent {
        let table = Arc::new(Table::with_status(status.clone()));
        let tokens = Arc::new(BootstrapTokens::new(
            live.agent.clone(),
            status.clone(),
            JoinSettings {
                token_ttl: TOKEN_TTL,
                api_endpoint: None,
            },
            live.facts.clone(),
        ));
        let subnet: ipnet::Ipv4Net = subnet.parse().expect("cidr");
        let rules = AddressRules {
            subnet,
            reserved: vec![subnet.hosts().next().unwrap_or(Ipv4Addr::new(10, 77, 0, 1))],
        };
        let api_state = Arc::new(ApiState::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(crate::cluster::run(
            live.agent.clone(),
            table.clone(),
            status.clone(),
            rules,
            api_state.clone(),
            crate::cluster::Options {
                install_crd: true,
                tokens: Some(tokens.clone()),
            },
            shutdown.clone(),
        ));
        Agent {
            status,
            table,
            api_state,
            tokens,
            shutdown,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

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
