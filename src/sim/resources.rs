//! The resource kinds the simulated cluster serves: one table drives discovery, the OpenAPI
//! documents, URL routing and storage, so adding a kind is one line here.

/// One served resource kind.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core (`/api/v1`) group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Kinds with a `/status` subresource ignore status on main-resource writes and spec on
    /// status writes, as the real API server does.
    pub status_subresource: bool,
    /// Whether spec changes bump `metadata.generation` (kinds with a spec/status split).
    pub tracks_generation: bool,
}

impl ResourceType {
    /// `apps/v1` or `v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `deployments.apps` or `pods`: the qualified resource name used in Status messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

macro_rules! rt {
    ($group:expr, $version:expr, $kind:expr, $plural:expr, $singular:expr, $namespaced:expr, $short:expr, $status:expr, $gen:expr) => {
        ResourceType {
            group: $group,
            version: $version,
            kind: $kind,
            plural: $plural,
            singular: $singular,
            namespaced: $namespaced,
            short_names: $short,
            status_subresource: $status,
            tracks_generation: $gen,
        }
    };
}

/// Every kind served. Kinds beyond those depwatch uses are stored generically so that ordinary
/// manifests (`kubectl apply -k` of an application) work.
pub static RESOURCES: &[ResourceType] = &[
    rt!(
        "",
        "v1",
        "Namespace",
        "namespaces",
        "namespace",
        false,
        &["ns"],
        true,
        false
    ),
    rt!("", "v1", "Pod", "pods", "pod", true, &["po"], true, true),
    rt!(
        "",
        "v1",
        "Secret",
        "secrets",
        "secret",
        true,
        &[],
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "ConfigMap",
        "configmaps",
        "configmap",
        true,
        &["cm"],
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "ServiceAccount",
        "serviceaccounts",
        "serviceaccount",
        true,
        &["sa"],
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "Service",
        "services",
        "service",
        true,
        &["svc"],
        true,
        false
    ),
    rt!(
        "",
        "v1",
        "Node",
        "nodes",
        "node",
        false,
        &["no"],
        true,
        false
    ),
    rt!(
        "",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        false,
        false
    ),
    rt!(
        "",
        "v1",
        "PersistentVolumeClaim",
        "persistentvolumeclaims",
        "persistentvolumeclaim",
        true,
        &["pvc"],
        true,
        false
    ),
    rt!(
        "apps",
        "v1",
        "Deployment",
        "deployments",
        "deployment",
        true,
        &["deploy"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "ReplicaSet",
        "replicasets",
        "replicaset",
        true,
        &["rs"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "StatefulSet",
        "statefulsets",
        "statefulset",
        true,
        &["sts"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "DaemonSet",
        "daemonsets",
        "daemonset",
        true,
        &["ds"],
        true,
        true
    ),
    rt!(
        "apps",
        "v1",
        "ControllerRevision",
        "controllerrevisions",
        "controllerrevision",
        true,
        &[],
        false,
        false
    ),
    rt!("batch", "v1", "Job", "jobs", "job", true, &[], true, true),
    rt!(
        "batch",
        "v1",
        "CronJob",
        "cronjobs",
        "cronjob",
        true,
        &["cj"],
        true,
        true
    ),
    rt!(
        "coordination.k8s.io",
        "v1",
        "Lease",
        "leases",
        "lease",
        true,
        &[],
        false,
        false
    ),
    // Answered, never stored: `kubectl auth can-i` and depwatch's own permission checks.
    rt!(
        "authorization.k8s.io",
        "v1",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreviews",
        "selfsubjectaccessreview",
        false,
        &[],
        false,
        false
    ),
    rt!(
        "events.k8s.io",
        "v1",
        "Event",
        "events",
        "event",
        true,
        &["ev"],
        false,
        false
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "Role",
        "roles",
        "role",
        true,
        &[],
        false,
        false
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "RoleBinding",
        "rolebindings",
        "rolebinding",
        true,
        &[],
        false,
        false
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        "clusterrole",
        false,
        &[],
        false,
        false
    ),
    rt!(
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        "clusterrolebinding",
        false,
        &[],
        false,
        false
    ),
    rt!(
        "networking.k8s.io",
        "v1",
        "Ingress",
        "ingresses",
        "ingress",
        true,
        &["ing"],
        true,
        true
    ),
    rt!(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        "networkpolicy",
        true,
        &["netpol"],
        false,
        true
    ),
    rt!(
        "policy",
        "v1",
        "PodDisruptionBudget",
        "poddisruptionbudgets",
        "poddisruptionbudget",
        true,
        &["pdb"],
        true,
        true
    ),
    rt!(
        "autoscaling",
        "v2",
        "HorizontalPodAutoscaler",
        "horizontalpodautoscalers",
        "horizontalpodautoscaler",
        true,
        &["hpa"],
        true,
        true
    ),
];

/// The kind served under `group/version/plural`.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn namespaces() -> &'static ResourceType {
    by_plural("", "namespaces")
}
pub fn deployments() -> &'static ResourceType {
    by_plural("apps", "deployments")
}
pub fn replicasets() -> &'static ResourceType {
    by_plural("apps", "replicasets")
}
pub fn secrets() -> &'static ResourceType {
    by_plural("", "secrets")
}
pub fn pods() -> &'static ResourceType {
    by_plural("", "pods")
}
pub fn statefulsets() -> &'static ResourceType {
    by_plural("apps", "statefulsets")
}
pub fn daemonsets() -> &'static ResourceType {
    by_plural("apps", "daemonsets")
}
pub fn controllerrevisions() -> &'static ResourceType {
    by_plural("apps", "controllerrevisions")
}
pub fn nodes() -> &'static ResourceType {
    by_plural("", "nodes")
}
pub fn persistentvolumeclaims() -> &'static ResourceType {
    by_plural("", "persistentvolumeclaims")
}

fn by_plural(group: &str, plural: &str) -> &'static ResourceType {
    // The table above is static and these names are in it; a miss is a programming error
    // caught by the unit test below.
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
        .unwrap_or(&RESOURCES[0])
}

/// Group versions in discovery order, each with its kinds.
pub fn group_versions() -> Vec<(&'static str, &'static str, Vec<&'static ResourceType>)> {
    let mut out: Vec<(&'static str, &'static str, Vec<&'static ResourceType>)> = Vec::new();
    for r in RESOURCES {
        match out
            .iter_mut()
            .find(|(g, v, _)| *g == r.group && *v == r.version)
        {
            Some((_, _, kinds)) => kinds.push(r),
            None => out.push((r.group, r.version, vec![r])),
        }
    }
    out
}

/// Kinds with a `scale` subresource (`kubectl scale`, autoscalers).
pub fn has_scale(rt: &ResourceType) -> bool {
    rt.group == "apps" && matches!(rt.plural, "deployments" | "statefulsets" | "replicasets")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_kinds_resolve() {
        assert_eq!(namespaces().kind, "Namespace");
        assert_eq!(deployments().kind, "Deployment");
        assert_eq!(replicasets().kind, "ReplicaSet");
        assert_eq!(pods().kind, "Pod");
        assert_eq!(deployments().qualified(), "deployments.apps");
        assert_eq!(statefulsets().kind, "StatefulSet");
        assert_eq!(daemonsets().kind, "DaemonSet");
        assert_eq!(controllerrevisions().kind, "ControllerRevision");
        assert!(!controllerrevisions().status_subresource);
        assert_eq!(nodes().kind, "Node");
        assert!(!nodes().namespaced);
        assert_eq!(persistentvolumeclaims().kind, "PersistentVolumeClaim");
    }
}
