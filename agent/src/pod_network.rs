//! `provisioner pod-network`: the pod network of a kubeadm node that needs no container image
//! and downloads nothing. kube-controller-manager gives every Node a pod range
//! (`--allocate-node-cidrs`, from kubeadm's `networking.podSubnet`); this writes the CNI
//! configuration for this node's range (Debian's `bridge` + `host-local` plugins) and keeps a
//! route to every other node's range via that node's InternalIP, which works because every
//! node sits on the one provisioning network. It reads Nodes with the kubelet's own
//! credentials (a node may read Nodes) and runs on every node
//! (`provisioner-pod-network.service`, started by its path unit once the kubelet has a
//! kubeconfig).
//!
//! The routes it owns carry the route protocol [`ROUTE_PROTOCOL`] (`ip route show proto 112`),
//! so routes anyone else made are never touched.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures_util::{StreamExt, TryStreamExt};
use ipnet::Ipv4Net;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::Node;
use kube::api::PostParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;
use tokio_util::sync::CancellationToken;

use crate::systemd;

/// Route protocol of the routes this agent owns (`ip route show proto 112`). Not one of the
/// numbers in iproute2's rt_protos; any fixed number outside them works.
pub const ROUTE_PROTOCOL: u8 = 112;

/// Name of the CNI network and stem of its file.
const NETWORK_NAME: &str = "provisioner";

/// What `provisioner pod-network` was told.
#[derive(Debug, Clone)]
pub struct Options {
    pub kubeconfig: PathBuf,
    /// This node's Node name; `None`: the name the kubeconfig's credentials belong to
    /// (`system:node:NAME`), else the host name.
    pub node_name: Option<String>,
    /// Where the CNI configuration is written (containerd's `conf_dir`).
    pub cni_dir: PathBuf,
    /// Linux bridge the pods are attached to.
    pub bridge: String,
    /// Routes are checked again this often, even without a Node change (someone may have
    /// deleted one).
    pub resync: Duration,
}

/// This node's pod range: the first IPv4 range of `spec.podCIDRs`, else `spec.podCIDR`.
pub fn pod_range(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    let ranges = spec.pod_cidrs.iter().flatten().chain(spec.pod_cidr.iter());
    ranges.filter_map(|r| r.parse::<Ipv4Net>().ok()).next()
}

/// The node's first IPv4 InternalIP.
pub fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The routes this node needs: every other node's pod range via its InternalIP. A range
/// claimed by two nodes, or overlapping this node's own, gets no route (and a warning).
pub fn wanted_routes<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    me: &str,
    own_range: Option<Ipv4Net>,
) -> BTreeMap<Ipv4Net, Ipv4Addr> {
    let mut routes: BTreeMap<Ipv4Net, (Ipv4Addr, String)> = BTreeMap::new();
    let mut conflicting = Vec::new();
    for node in nodes {
        let name = node.name_any();
        if name == me {
            continue;
        }
        let (Some(range), Some(via)) = (pod_range(node), internal_ip(node)) else {
            continue;
        };
        if own_range.is_some_and(|own| own.contains(&range) || range.contains(&own)) {
            tracing::warn!(node = %name, range = %range, "pod range overlaps this node's own: no route");
            continue;
        }
        if let Some((_, other)) = routes.get(&range) {
            tracing::warn!(node = %name, other = %other, range = %range, "two nodes claim one pod range: no route");
            conflicting.push(range);
            continue;
        }
        routes.insert(range, (via, name));
    }
    for range in conflicting {
        routes.remove(&range);
    }
    routes
        .into_iter()
        .map(|(range, (via, _))| (range, via))
        .collect()
}

/// The CNI configuration list for this node's range: a Linux bridge that is the pods' gateway
/// (`isGateway`), addresses from `host-local`, traffic leaving the range masqueraded to the
/// node's address (`ipMasq`, so pods reach beyond the cluster), and `portmap` for hostPort.
pub fn cni_config(range: Ipv4Net, bridge: &str) -> String {
    let config = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": true,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": range.trunc().to_string() }]],
                    "routes": [{ "dst": "0.0.0.0/0" }]
                }
            },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    // serde_json cannot fail on a json! value.
    let mut text = serde_json::to_string_pretty(&config).unwrap_or_default();
    text.push('\n');
    text
}

/// Path of the configuration file in `dir`. containerd takes the first file in name order:
/// the `10-` prefix puts it before anything a later CNI add-on would write (`20-`…).
pub fn cni_path(dir: &Path) -> PathBuf {
    dir.join(format!("10-{NETWORK_NAME}.conflist"))
}

/// Writes `text` to `path` if it differs, atomically. Returns whether it was written.
fn write_if_changed(path: &Path, text: &str) -> anyhow::Result<bool> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(false);
    }
    let dir = path.parent().context("CNI file without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".provisioner-")
        .tempfile_in(dir)
        .with_context(|| format!("writing in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

/// The main routing table's IPv4 routes with our protocol, over rtnetlink.
struct RouteTable {
    handle: rtnetlink::Handle,
}

impl RouteTable {
    fn open() -> anyhow::Result<Self> {
        let (connection, handle, _) =
            rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(connection);
        Ok(RouteTable { handle })
    }

    fn message(range: Ipv4Net, via: Option<Ipv4Addr>) -> RouteMessage {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(range.network(), range.prefix_len())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL));
        if let Some(via) = via {
            builder = builder.gateway(via);
        }
        builder.build()
    }

    async fn ours(&self) -> anyhow::Result<BTreeMap<Ipv4Net, Ipv4Addr>> {
        let all = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect::<Vec<_>>()
            .await
            .context("listing routes")?;
        Ok(all.iter().filter_map(owned_route).collect())
    }

    async fn replace(&self, range: Ipv4Net, via: Ipv4Addr) -> anyhow::Result<()> {
        self.handle
            .route()
            .add(Self::message(range, Some(via)))
            .replace()
            .execute()
            .await
            .with_context(|| format!("route {range} via {via}"))
    }

    async fn delete(&self, range: Ipv4Net) -> anyhow::Result<()> {
        self.handle
            .route()
            .del(Self::message(range, None))
            .execute()
            .await
            .with_context(|| format!("deleting route {range}"))
    }
}

/// `(range, gateway)` of a route this agent made: main table, unicast, our protocol.
fn owned_route(route: &RouteMessage) -> Option<(Ipv4Net, Ipv4Addr)> {
    let header = &route.header;
    if header.address_family != AddressFamily::Inet
        || header.table != RouteHeader::RT_TABLE_MAIN
        || header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
        || header.kind != RouteType::Unicast
    {
        return None;
    }
    let mut destination = None;
    let mut gateway = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = Some(*a),
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => gateway = Some(*a),
            _ => {}
        }
    }
    let range = Ipv4Net::new(destination?, header.destination_prefix_length).ok()?;
    Some((range, gateway?))
}

/// The Node name the client's credentials belong to (`system:node:NAME`), by SelfSubjectReview.
async fn own_node_name(client: &Client) -> anyhow::Result<String> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .context("asking the API server who these credentials are (SelfSubjectReview)")?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    match user.strip_prefix("system:node:") {
        Some(name) if !name.is_empty() => Ok(name.to_string()),
        _ => {
            bail!("the credentials are {user:?}, not a node's (system:node:NAME): give --node-name")
        }
    }
}

/// Where the last sync left things, for `STATUS=` and logs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    own_range: Option<Ipv4Net>,
    routes: usize,
}

impl Outcome {
    fn status(&self, node: &str, bridge: &str) -> String {
        match self.own_range {
            Some(range) => format!(
                "node {node}: pods in {range} on {bridge}; routes to {} other node range(s)",
                self.routes
            ),
            None => format!("node {node}: waiting for the Node's pod range (spec.podCIDR)"),
        }
    }
}

async fn sync(
    store: &Store<Node>,
    node_name: &str,
    options: &Options,
    table: &RouteTable,
) -> anyhow::Result<Outcome> {
    let me = store.get(&ObjectRef::new(node_name));
    let own_range = me.as_deref().and_then(pod_range);
    if let Some(range) = own_range {
        let path = cni_path(&options.cni_dir);
        if write_if_changed(&path, &cni_config(range, &options.bridge))? {
            tracing::info!(node = node_name, range = %range, path = %path.display(), "CNI configuration written");
        }
    }
    let nodes = store.state();
    let wanted = wanted_routes(nodes.iter().map(|n| &**n), node_name, own_range);
    let current = table.ours().await?;
    for (range, via) in &wanted {
        if current.get(range) != Some(via) {
            table.replace(*range, *via).await?;
            tracing::info!(range = %range, via = %via, "route to a node's pods set");
        }
    }
    for range in current.keys().filter(|r| !wanted.contains_key(r)) {
        table.delete(*range).await?;
        tracing::info!(range = %range, "route to a node that is gone (or lost its range) removed");
    }
    Ok(Outcome {
        own_range,
        routes: wanted.len(),
    })
}

/// Runs until `shutdown`.
pub async fn run(options: Options, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (client, _) = crate::cluster::connect(Some(&options.kubeconfig)).await?;
    // Ready as soon as it runs: on a new node the API server may take minutes to come up (the
    // path unit starts this when kubeadm writes the kubeconfig), and STATUS= says what it waits
    // for. A start job pending that long would time out and be restarted for nothing.
    systemd::notify_ready("waiting for the API server");
    if let Some(interval) = systemd::watchdog_interval() {
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => systemd::notify_watchdog(),
                }
            }
        });
    }
    let node_name = match options.node_name.clone() {
        Some(name) => name,
        None => {
            let mut last_said = None::<tokio::time::Instant>;
            loop {
                match own_node_name(&client).await {
                    Ok(name) => break name,
                    Err(e) => {
                        let Some(why) = not_ready_yet(&e) else {
                            return Err(e);
                        };
                        systemd::notify_status(&format!("waiting for the API server: {why}"));
                        // Once a minute is enough: a first control plane takes minutes.
                        if last_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            tracing::info!(
                                "API server not ready yet ({why}), retrying every 5 s: {e:#}"
                            );
                            last_said = Some(tokio::time::Instant::now());
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        }
                    }
                }
            }
        }
    };
    let table = RouteTable::open()?;
    tracing::info!(node = %node_name, bridge = %options.bridge, cni = %cni_path(&options.cni_dir).display(), "pod network starting");
    systemd::notify_status(&format!("node {node_name}: reading Nodes"));

    let (store, writer) = reflector::store::<Node>();
    let nodes: Api<Node> = Api::all(client);
    let events = reflector::reflector(
        writer,
        watcher(nodes, watcher::Config::default()).default_backoff(),
    );
    let mut events = std::pin::pin!(events);
    let mut resync = tokio::time::interval(options.resync);
    let mut listed = false;
    let mut last = None;
    loop {
        let due = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = resync.tick() => listed,
            event = events.next() => match event {
                None => bail!("the Node watch ended"),
                Some(Ok(watcher::Event::InitDone)) => { listed = true; true }
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))) => listed,
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => false,
                Some(Err(e)) => {
                    tracing::warn!("watching Nodes: {e}");
                    false
                }
            },
        };
        if !due {
            continue;
        }
        match sync(&store, &node_name, &options, &table).await {
            Ok(outcome) => {
                if last.as_ref() != Some(&outcome) {
                    let status = outcome.status(&node_name, &options.bridge);
                    systemd::notify_status(&status);
                    tracing::info!(node = %node_name, "{status}");
                }
                last = Some(outcome);
            }
            Err(e) => {
                tracing::warn!(node = %node_name, "pod network sync failed (retried on the next change or in {}s): {e:#}", options.resync.as_secs())
            }
        }
    }
    systemd::notify_stopping("stopping");
    Ok(())
}

/// Why a failed request is worth repeating while a control plane comes up, or `None` when it
/// is not. A starting kube-apiserver is unreachable first, then answers 403 to everyone
/// (admin included) until its RBAC bootstrap roles are in place, then 5xx or 429 while its
/// post-start hooks finish.
fn not_ready_yet(e: &anyhow::Error) -> Option<&'static str> {
    e.chain()
        .find_map(|c| match c.downcast_ref::<kube::Error>()? {
            kube::Error::HyperError(_) | kube::Error::Service(_) => Some("not reachable"),
            kube::Error::Api(status) => match status.code {
                403 => Some("403: its authorization is not in place yet"),
                429 => Some("429: too busy"),
                code if code >= 500 => Some("5xx: still starting"),
                _ => None,
            },
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use kube::api::ObjectMeta;

    /// A first control plane answers 403 to everyone until its RBAC roles exist: wait it out.
    /// A 404 or a 401 will not go away by waiting.
    #[test]
    fn waits_out_a_starting_api_server_only() {
        let api = |code| {
            anyhow::Error::new(kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            ))
            .context("asking the API server who these credentials are (SelfSubjectReview)")
        };
        for code in [403, 429, 500, 503] {
            assert!(not_ready_yet(&api(code)).is_some(), "{code}");
        }
        for code in [400, 401, 404, 422] {
            assert_eq!(not_ready_yet(&api(code)), None, "{code}");
        }
        assert_eq!(not_ready_yet(&anyhow::anyhow!("bad kubeconfig")), None);
    }

    fn node(name: &str, range: Option<&str>, ip: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: range.map(String::from),
                pod_cidrs: range.map(|r| vec![r.to_string()]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: ip.map(|ip| {
                    vec![
                        NodeAddress {
                            type_: "Hostname".into(),
                            address: name.into(),
                        },
                        NodeAddress {
                            type_: "InternalIP".into(),
                            address: ip.into(),
                        },
                    ]
                }),
                ..Default::default()
            }),
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn pod_range_prefers_the_ipv4_entry_of_pod_cidrs() {
        let mut n = node("a", None, None);
        assert_eq!(pod_range(&n), None);
        if let Some(spec) = n.spec.as_mut() {
            spec.pod_cidrs = Some(vec!["fd00::/64".into(), "10.244.3.0/24".into()]);
            spec.pod_cidr = Some("fd00::/64".into());
        }
        assert_eq!(pod_range(&n), Some(net("10.244.3.0/24")));
        assert_eq!(
            pod_range(&node("b", Some("10.244.1.0/24"), None)),
            Some(net("10.244.1.0/24"))
        );
    }

    #[test]
    fn routes_go_to_every_other_node_with_a_range_and_an_address() {
        let nodes = [
            node("laptop", Some("10.244.0.0/24"), Some("10.77.0.2")),
            node("node2", Some("10.244.1.0/24"), Some("10.77.0.20")),
            node("node3", Some("10.244.2.0/24"), None),
            node("node4", None, Some("10.77.0.22")),
        ];
        let routes = wanted_routes(&nodes, "node2", Some(net("10.244.1.0/24")));
        assert_eq!(
            routes.into_iter().collect::<Vec<_>>(),
            vec![(net("10.244.0.0/24"), Ipv4Addr::new(10, 77, 0, 2))]
        );
    }

    #[test]
    fn a_range_claimed_twice_or_overlapping_ours_gets_no_route() {
        let nodes = [
            node("a", Some("10.244.5.0/24"), Some("10.77.0.5")),
            node("b", Some("10.244.5.0/24"), Some("10.77.0.6")),
            node("c", Some("10.244.1.0/25"), Some("10.77.0.7")),
            node("d", Some("10.244.6.0/24"), Some("10.77.0.8")),
        ];
        let routes = wanted_routes(&nodes, "me", Some(net("10.244.1.0/24")));
        assert_eq!(
            routes.into_iter().collect::<Vec<_>>(),
            vec![(net("10.244.6.0/24"), Ipv4Addr::new(10, 77, 0, 8))]
        );
    }

    #[test]
    fn cni_config_is_a_bridge_with_host_local_addresses_of_the_range() {
        let text = cni_config(net("10.244.1.0/24"), "cni0");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v["cniVersion"], "1.0.0");
        let bridge = &v["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], "cni0");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(v["plugins"][1]["type"], "portmap");
    }

    #[test]
    fn the_cni_file_is_rewritten_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = cni_path(&dir.path().join("net.d"));
        let a = cni_config(net("10.244.1.0/24"), "cni0");
        assert!(write_if_changed(&path, &a).unwrap_or_else(|e| panic!("{e}")));
        assert!(!write_if_changed(&path, &a).unwrap_or_else(|e| panic!("{e}")));
        let b = cni_config(net("10.244.2.0/24"), "cni0");
        assert!(write_if_changed(&path, &b).unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(std::fs::read_to_string(&path).ok(), Some(b));
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap_or(dir.path()))
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["10-provisioner.conflist".to_string()]);
    }

    #[test]
    fn only_our_routes_are_ours() {
        let ours = RouteTable::message(net("10.244.0.0/24"), Some(Ipv4Addr::new(10, 77, 0, 2)));
        assert_eq!(
            owned_route(&ours),
            Some((net("10.244.0.0/24"), Ipv4Addr::new(10, 77, 0, 2)))
        );
        let mut static_route = ours.clone();
        static_route.header.protocol = RouteProtocol::Static;
        assert_eq!(owned_route(&static_route), None);
    }
}
