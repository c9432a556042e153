//! SelfSubjectAccessReview, answered as Kubernetes' RBAC authorizer answers it, for the RBAC a
//! test sets. Every caller of the simulated cluster is the user [`USER`] (its kubeconfig's
//! user). While no RoleBinding or ClusterRoleBinding names that user, everything is allowed
//! (the cluster's admin); once one does, only what the bound roles grant is: a ClusterRoleBinding
//! in every namespace, a RoleBinding in its own. The review answers; requests themselves are
//! not refused.

use serde_json::Value;

use super::store::Store;

/// The user every caller of the simulated cluster is.
pub const USER: &str = "depwatch-sim";

const CLUSTER_BINDINGS: &str = "clusterrolebindings.rbac.authorization.k8s.io";
const BINDINGS: &str = "rolebindings.rbac.authorization.k8s.io";
const CLUSTER_ROLES: &str = "clusterroles.rbac.authorization.k8s.io";
const ROLES: &str = "roles.rbac.authorization.k8s.io";

/// What a review asks: may the user do `verb` on `group/resource` (named `name`) in
/// `namespace` (empty: cluster-wide)?
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    pub namespace: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub name: String,
}

impl Attributes {
    pub fn from_review(review: &Value) -> Attributes {
        let a = &review["spec"]["resourceAttributes"];
        let text = |f: &str| a[f].as_str().unwrap_or_default().to_string();
        Attributes {
            namespace: text("namespace"),
            verb: text("verb"),
            group: text("group"),
            resource: text("resource"),
            name: text("name"),
        }
    }
}

fn names_user(binding: &Value) -> bool {
    binding["subjects"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|s| s["kind"] == "User" && s["name"] == USER)
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array()
        .into_iter()
        .flatten()
        .any(|v| v == "*" || v == want)
}

/// Whether one role's rules grant `a`.
pub fn grants(role: &Value, a: &Attributes) -> bool {
    role["rules"].as_array().into_iter().flatten().any(|rule| {
        let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
        has(&rule["apiGroups"], &a.group)
            && has(&rule["resources"], &a.resource)
            && has(&rule["verbs"], &a.verb)
            && names.is_none_or(|n| n.iter().any(|v| v == a.name.as_str()))
    })
}

/// The role a binding refers to (a Role in the binding's namespace, or a ClusterRole).
fn role_of(store: &Store, binding: &Value) -> Option<Value> {
    let r = &binding["roleRef"];
    let name = r["name"].as_str()?;
    let (resource, ns) = match r["kind"].as_str()? {
        "ClusterRole" => (CLUSTER_ROLES, None),
        _ => (ROLES, binding["metadata"]["namespace"].as_str()),
    };
    let (items, _) = store.list(resource, ns);
    items.into_iter().find(|o| o["metadata"]["name"] == name)
}

/// The review's answer: allowed, and why.
pub fn review(store: &Store, a: &Attributes) -> (bool, String) {
    let (cluster, _) = store.list(CLUSTER_BINDINGS, None);
    let (local, _) = store.list(BINDINGS, None);
    let cluster: Vec<&Value> = cluster.iter().filter(|b| names_user(b)).collect();
    let local: Vec<&Value> = local.iter().filter(|b| names_user(b)).collect();
    if cluster.is_empty() && local.is_empty() {
        return (
            true,
            format!("no RBAC binding names {USER}: the simulated cluster allows every request"),
        );
    }
    let in_scope = |b: &&Value| {
        b["metadata"]["namespace"]
            .as_str()
            .is_some_and(|ns| ns == a.namespace)
    };
    for b in cluster
        .into_iter()
        .chain(local.into_iter().filter(in_scope))
    {
        if role_of(store, b).is_some_and(|role| grants(&role, a)) {
            let name = b["metadata"]["name"].as_str().unwrap_or_default();
            return (true, format!("RBAC: allowed by binding {name}"));
        }
    }
    (false, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ask(verb: &str, resource: &str, name: &str) -> Attributes {
        Attributes {
            namespace: "prod".into(),
            verb: verb.into(),
            group: "apps".into(),
            resource: resource.into(),
            name: name.into(),
        }
    }

    #[test]
    fn rules_grant_by_group_resource_verb_and_name() {
        let role = json!({"rules": [
            {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]},
            {"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["*"], "resourceNames": ["db"]}
        ]});
        assert!(grants(&role, &ask("patch", "deployments", "web")));
        assert!(!grants(&role, &ask("delete", "deployments", "web")));
        assert!(!grants(&role, &ask("patch", "daemonsets", "agent")));
        assert!(grants(&role, &ask("patch", "statefulsets", "db")));
        assert!(!grants(&role, &ask("patch", "statefulsets", "cache")));
    }
}
