//! Every API permission the agent uses, in one place: `agent/deploy/rbac.yaml` must grant each
//! (a test checks it), and the mock API server scenarios check every request they see is one
//! of them.

/// One (API group, resource, verb) the agent uses, where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// `""` is the core group.
    pub group: &'static str,
    /// `machines`, `machines/status`, …
    pub resource: &'static str,
    pub verb: &'static str,
    /// `None`: cluster-scoped, or in any namespace.
    pub namespace: Option<&'static str>,
    /// `None`: any object.
    pub name: Option<&'static str>,
}

const fn p(
    group: &'static str,
    resource: &'static str,
    verb: &'static str,
    namespace: Option<&'static str>,
    name: Option<&'static str>,
) -> Permission {
    Permission {
        group,
        resource,
        verb,
        namespace,
        name,
    }
}

pub const PERMISSIONS: &[Permission] = &[
    // The controller's watch, the finalizer (JSON patch) and `.status` (server-side apply).
    p("provisioner.dev", "machines", "list", None, None),
    p("provisioner.dev", "machines", "watch", None, None),
    p("provisioner.dev", "machines", "patch", None, None),
    p("provisioner.dev", "machines/status", "patch", None, None),
    // Ready when the Node of the machine's host name is.
    p("", "nodes", "list", None, None),
    p("", "nodes", "watch", None, None),
    // Events (kube-runtime's Recorder creates, then patches a series).
    p("events.k8s.io", "events", "create", None, None),
    p("events.k8s.io", "events", "patch", None, None),
    // The CRD on start: server-side apply (create when missing), read when not allowed to.
    p(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "get",
        None,
        None,
    ),
    p(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "create",
        None,
        None,
    ),
    p(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "patch",
        None,
        None,
    ),
    // Bootstrap token Secrets.
    p("", "secrets", "create", Some("kube-system"), None),
    p("", "secrets", "list", Some("kube-system"), None),
    p("", "secrets", "delete", Some("kube-system"), None),
    // The API endpoint and CA for kubeadm join.
    p(
        "",
        "configmaps",
        "get",
        Some("kube-public"),
        Some("cluster-info"),
    ),
];

/// What one API request asks of the authorizer.
#[derive(Debug, PartialEq, Eq)]
pub struct Needed {
    pub group: String,
    pub resource: String,
    pub verb: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// The permission an API request needs (method and path with query), for the mock scenarios.
pub fn needed_for(method: &str, path_and_query: &str) -> Option<Needed> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [resource] => (*resource, None, None),
        [resource, name] => (*resource, Some(name.to_string()), None),
        [resource, name, sub] => (*resource, Some(name.to_string()), Some(*sub)),
        _ => return None,
    };
    let watch = query.split('&').any(|kv| kv == "watch=true");
    let verb = match (method, name.is_some()) {
        ("GET", true) => "get",
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => return None,
    };
    let resource = match sub {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_string(),
    };
    Some(Needed {
        group: group.to_string(),
        resource,
        verb: verb.to_string(),
        namespace,
        name,
    })
}

/// Whether [`PERMISSIONS`] covers a request.
pub fn covered(method: &str, path_and_query: &str) -> bool {
    let Some(needed) = needed_for(method, path_and_query) else {
        return false;
    };
    PERMISSIONS.iter().any(|p| {
        p.group == needed.group
            && p.resource == needed.resource
            && p.verb == needed.verb
            && p.namespace
                .is_none_or(|ns| needed.namespace.as_deref() == Some(ns))
            && p.name.is_none_or(|n| needed.name.as_deref() == Some(n))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const MANIFEST: &str = include_str!("../../deploy/rbac.yaml");

    fn strings(v: &Value) -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    }

    /// Whether one RBAC rule grants `perm`.
    fn grants(rule: &Value, perm: &Permission) -> bool {
        let has = |key: &str, value: &str| {
            let list = strings(&rule[key]);
            list.iter().any(|s| s == value || s == "*")
        };
        let names = strings(&rule["resourceNames"]);
        has("apiGroups", perm.group)
            && has("resources", perm.resource)
            && has("verbs", perm.verb)
            && (names.is_empty() || perm.name.is_some_and(|n| names.iter().any(|s| s == n)))
    }

    #[test]
    fn the_manifest_grants_every_permission_the_agent_uses() {
        use serde::Deserialize as _;
        let docs: Vec<Value> = serde_yaml::Deserializer::from_str(MANIFEST)
            .map(Value::deserialize)
            .collect::<Result<_, _>>()
            .expect("rbac.yaml parses");
        let of_kind =
            |kind: &str| -> Vec<&Value> { docs.iter().filter(|d| d["kind"] == kind).collect() };
        let sa = of_kind("ServiceAccount");
        assert_eq!(sa.len(), 1);
        let (sa_name, sa_ns) = (&sa[0]["metadata"]["name"], &sa[0]["metadata"]["namespace"]);
        let bound_to_sa = |binding: &Value| {
            binding["subjects"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["kind"] == "ServiceAccount"
                        && &s["name"] == sa_name
                        && &s["namespace"] == sa_ns
                })
        };
        // Roles actually granted to the ServiceAccount: (rules, namespace or None).
        let mut granted: Vec<(&Value, Option<String>)> = Vec::new();
        for binding in of_kind("ClusterRoleBinding") {
            assert!(bound_to_sa(binding), "{binding}");
            let role = &binding["roleRef"]["name"];
            for r in of_kind("ClusterRole")
                .into_iter()
                .filter(|r| &r["metadata"]["name"] == role)
            {
                granted.push((&r["rules"], None));
            }
        }
        for binding in of_kind("RoleBinding") {
            assert!(bound_to_sa(binding), "{binding}");
            let ns = binding["metadata"]["namespace"]
                .as_str()
                .map(str::to_string);
            let role = &binding["roleRef"]["name"];
            for r in of_kind("Role").into_iter().filter(|r| {
                &r["metadata"]["name"] == role
                    && r["metadata"]["namespace"].as_str() == ns.as_deref()
            }) {
                granted.push((&r["rules"], ns.clone()));
            }
        }
        for perm in PERMISSIONS {
            let ok = granted.iter().any(|(rules, ns)| {
                let scope_ok = match (ns, perm.namespace) {
                    (None, _) => true,
                    (Some(ns), Some(want)) => ns == want,
                    (Some(_), None) => false,
                };
                scope_ok
                    && rules
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|rule| grants(rule, perm))
            });
            assert!(ok, "agent/deploy/rbac.yaml does not grant {perm:?}");
        }
        // Secrets are not granted cluster-wide.
        let secret_delete = Permission {
            namespace: Some("default"),
            ..p("", "secrets", "delete", None, None)
        };
        assert!(!granted.iter().any(|(rules, ns)| ns.is_none()
            && rules
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| grants(r, &secret_delete))));
    }

    #[test]
    fn requests_map_to_permissions() {
        assert!(covered("PATCH", "/apis/provisioner.dev/v1alpha1/machines/node2/status?&force=true&fieldManager=provisioner"));
        assert!(covered(
            "GET",
            "/apis/provisioner.dev/v1alpha1/machines?&watch=true&resourceVersion=1"
        ));
        assert!(covered("POST", "/api/v1/namespaces/kube-system/secrets?"));
        assert!(covered(
            "DELETE",
            "/api/v1/namespaces/kube-system/secrets/bootstrap-token-abcdef?"
        ));
        assert!(!covered("DELETE", "/api/v1/namespaces/default/secrets/x?"));
        assert!(!covered(
            "DELETE",
            "/api/v1/namespaces/kube-system/secrets?labelSelector=a"
        ));
        assert!(covered(
            "GET",
            "/api/v1/namespaces/kube-public/configmaps/cluster-info"
        ));
        assert!(!covered(
            "GET",
            "/api/v1/namespaces/kube-public/configmaps/other"
        ));
        assert!(!covered(
            "PUT",
            "/apis/provisioner.dev/v1alpha1/machines/node2"
        ));
    }
}
