//! The StatefulSet and DaemonSet controllers in miniature, after Kubernetes'
//! `stateful_set_control.go` and the DaemonSet controller's `daemon_controller.go` and
//! `update.go`, and the nodes DaemonSets run on.
//!
//! Both keep the history of their pod templates in ControllerRevisions named `<owner>-<hash>`,
//! whose `data` is the patch `{"spec":{"template":{…,"$patch":"replace"}}}` that `kubectl
//! rollout undo` sends back as a strategic merge patch. A template equal to an older revision
//! reuses that revision with a new revision number, as the real controllers do on a rollback.
//!
//! - StatefulSet pods are `<sts>-<ordinal>`, labelled `controller-revision-hash: <revision
//!   name>`, `statefulset.kubernetes.io/pod-name` and `apps.kubernetes.io/pod-index`. With
//!   `OrderedReady` any pod that is not Running and Ready halts all progress, so a crash-looping
//!   pod of a bad revision stays after the template is reverted, until someone deletes it (the
//!   "forced rollback" of the Kubernetes documentation).
//! - DaemonSet pods are `<ds>-<random>`, one on each node whose labels match, labelled
//!   `controller-revision-hash: <hash>` (the hash alone, the revision being `<ds>-<hash>`).
//!
//! The decisions are pure functions of the objects (`choose_revision`, `statefulset_steps`,
//! `daemonset_manage`, `daemonset_rolling`, the `*_status` functions); the [`Controller`]
//! methods at the end read the store, call them and write what they decide.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde_json::{json, Value};

use super::controller::{int_or_percent, template_hash, Controller};
use super::discovery::KUBE_VERSION;
use super::meta;
use super::resources::{self, ResourceType};
use super::selector::Selector;
use super::store::ObjKey;

/// The pod label naming the revision a pod was made from (and a DaemonSet revision's hash).
pub const REVISION_LABEL: &str = "controller-revision-hash";
/// The pod label naming a StatefulSet pod.
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
/// The pod label holding a StatefulSet pod's ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The label a StatefulSet's ControllerRevision carries its hash in.
pub const HISTORY_HASH_LABEL: &str = "controller.kubernetes.io/hash";
/// The DaemonSet pod label holding its template generation.
pub const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";
/// The DaemonSet annotation the API server keeps its template generation in.
pub const TEMPLATE_GENERATION: &str = "deprecated.daemonset.template.generation";

/// Which controller a revision or pod belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    StatefulSet,
    DaemonSet,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
        }
    }

    fn hash_label(self) -> &'static str {
        match self {
            Kind::StatefulSet => HISTORY_HASH_LABEL,
            Kind::DaemonSet => REVISION_LABEL,
        }
    }
}

/// One write a controller decided on.
#[derive(Debug, Clone)]
pub enum Step {
    /// A pod or PersistentVolumeClaim to create (left alone if one of that name exists).
    Create(Value),
    /// A pod to delete.
    Delete(Arc<Value>),
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn owner_ref(kind: Kind, owner: &Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": kind.name(), "name": meta::name(owner),
           "uid": meta::uid_of(owner), "controller": true, "blockOwnerDeletion": true})
}

fn labels_of(template: &Value) -> Value {
    match &template["metadata"]["labels"] {
        Value::Object(m) => Value::Object(m.clone()),
        _ => json!({}),
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// Node `node-{i}`: Ready, labelled as a kubelet labels its node.
pub fn node(i: usize) -> Value {
    let name = format!("node-{i}");
    let now = meta::now();
    let cond = |t: &str, status: &str, reason: &str, message: &str| {
        json!({"type": t, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let resources =
        json!({"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi"});
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "uid": meta::uid(), "creationTimestamp": now,
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                       "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                       "beta.kubernetes.io/arch": "amd64"}},
        "spec": {"podCIDR": format!("10.244.{i}.0/24"), "podCIDRs": [format!("10.244.{i}.0/24")]},
        "status": {
            "capacity": resources, "allocatable": resources,
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": node_ip(i)},
                          {"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.1.0",
                "osImage": "depwatch simulated node", "containerRuntimeVersion": "containerd://1.7.0",
                "kubeletVersion": KUBE_VERSION, "kubeProxyVersion": KUBE_VERSION,
                "operatingSystem": "linux", "architecture": "amd64"},
        }
    })
}

fn node_ip(i: usize) -> String {
    format!("10.0.{}.{}", i / 250, i % 250 + 1)
}

/// The address of the node a pod runs on (`node-N`), as the pod's `hostIP`.
pub fn host_ip(pod: &Value) -> String {
    pod["spec"]["nodeName"]
        .as_str()
        .and_then(|n| n.strip_prefix("node-"))
        .and_then(|i| i.parse().ok())
        .map(node_ip)
        .unwrap_or_else(|| "10.0.0.1".into())
}

// ---------------------------------------------------------------------------------------------
// ControllerRevisions

/// A revision's `data`: the patch restoring `template`, keys sorted as Go's encoder writes them.
pub fn revision_data(template: &Value) -> Value {
    let mut t = template.clone();
    t["$patch"] = json!("replace");
    let data = json!({"spec": {"template": t}});
    serde_json::from_str(&meta::canonical(&data)).unwrap_or(data)
}

/// The pod template a revision records.
pub fn revision_template(revision: &Value) -> Value {
    let mut t = revision["data"]["spec"]["template"].clone();
    if let Some(m) = t.as_object_mut() {
        m.remove("$patch");
    }
    t
}

pub fn revision_number(revision: &Value) -> i64 {
    int(&revision["revision"])
}

/// Oldest first, as `history.SortControllerRevisions` orders them.
fn sort_revisions(revisions: &mut [Arc<Value>]) {
    revisions.sort_by(|a, b| {
        let key = |r: &Value| {
            (
                revision_number(r),
                r["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                meta::name(r).to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
}

/// A new revision of `owner`'s template, as `history.NewControllerRevision` builds it.
fn new_revision(kind: Kind, owner: &Value, number: i64, collisions: i64) -> Value {
    let template = &owner["spec"]["template"];
    let hash = template_hash(&json!({"template": template, "collisionCount": collisions}));
    let prefix: String = meta::name(owner).chars().take(223).collect();
    let mut labels = labels_of(template);
    labels[kind.hash_label()] = json!(hash);
    let mut metadata = json!({
        "name": format!("{prefix}-{hash}"),
        "namespace": meta::namespace(owner),
        "uid": meta::uid(),
        "creationTimestamp": meta::now(),
        "labels": labels,
        "ownerReferences": [owner_ref(kind, owner)],
    });
    if let Some(a) = owner["metadata"]["annotations"]
        .as_object()
        .filter(|a| !a.is_empty())
    {
        metadata["annotations"] = Value::Object(a.clone());
    }
    json!({"apiVersion": "apps/v1", "kind": "ControllerRevision", "metadata": metadata,
           "data": revision_data(template), "revision": number})
}

/// A revision write [`choose_revision`] decided on.
#[derive(Debug, Clone)]
pub enum RevisionWrite {
    Create(Value),
    /// An older revision equal to the template gets this revision number (a rollback).
    Renumber(Value, i64),
}

/// The revision matching an owner's template now, and what to write to get it.
#[derive(Debug, Clone)]
pub struct RevisionChoice {
    pub update: Value,
    pub write: Option<RevisionWrite>,
    pub collision_count: i64,
}

/// The revision of `owner`'s current template among its `revisions` (getStatefulSetRevisions,
/// the DaemonSet's constructHistory): the newest one if equal, an older equal one renumbered,
/// or a new one, whose name skips names `existing` already holds (counting collisions).
pub fn choose_revision(
    kind: Kind,
    owner: &Value,
    revisions: &[Arc<Value>],
    existing: impl Fn(&str) -> Option<Arc<Value>>,
) -> RevisionChoice {
    let template = &owner["spec"]["template"];
    let mut collisions = int(&owner["status"]["collisionCount"]);
    let mut sorted = revisions.to_vec();
    sort_revisions(&mut sorted);
    let next = sorted.last().map(|r| revision_number(r)).unwrap_or(0) + 1;
    let equal = sorted
        .iter()
        .rev()
        .find(|r| revision_template(r) == *template);
    if let Some(eq) = equal {
        let newest = sorted.last().map(|r| meta::name(r)) == Some(meta::name(eq));
        if newest {
            return RevisionChoice {
                update: (**eq).clone(),
                write: None,
                collision_count: collisions,
            };
        }
        let mut renumbered = (**eq).clone();
        renumbered["revision"] = json!(next);
        return RevisionChoice {
            update: renumbered,
            write: Some(RevisionWrite::Renumber((**eq).clone(), next)),
            collision_count: collisions,
        };
    }
    loop {
        let rev = new_revision(kind, owner, next, collisions);
        match existing(meta::name(&rev)) {
            Some(_) if collisions < 1000 => collisions += 1,
            _ => {
                return RevisionChoice {
                    update: rev.clone(),
                    write: Some(RevisionWrite::Create(rev)),
                    collision_count: collisions,
                }
            }
        }
    }
}

/// Revisions to delete so that at most `spec.revisionHistoryLimit` (default 10) revisions that
/// are not `live` remain, oldest first (truncateHistory, cleanupHistory).
pub fn surplus_revisions(
    owner: &Value,
    revisions: &[Arc<Value>],
    live: &HashSet<String>,
) -> Vec<Arc<Value>> {
    let limit = owner["spec"]["revisionHistoryLimit"].as_i64().unwrap_or(10);
    let mut history: Vec<Arc<Value>> = revisions
        .iter()
        .filter(|r| !live.contains(meta::name(r)))
        .cloned()
        .collect();
    if limit < 0 || history.len() as i64 <= limit {
        return Vec::new();
    }
    sort_revisions(&mut history);
    history.truncate(history.len() - limit as usize);
    history
}

// ---------------------------------------------------------------------------------------------
// Pods

fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or_default()
}

/// Failed or Succeeded: a pod the controllers replace.
fn finished(pod: &Value) -> bool {
    matches!(phase(pod), "Failed" | "Succeeded")
}

/// What the StatefulSet controller waits for (isRunningAndReady).
pub fn running_and_ready(pod: &Value) -> bool {
    phase(pod) == "Running" && Controller::pod_ready(pod)
}

fn pod_revision(pod: &Value) -> &str {
    pod["metadata"]["labels"][REVISION_LABEL]
        .as_str()
        .unwrap_or_default()
}

/// The ordinal of a StatefulSet's pod (`web-2` → 2).
pub fn ordinal(sts_name: &str, pod: &Value) -> Option<usize> {
    meta::name(pod)
        .strip_prefix(sts_name)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

/// Oldest first (podByCreationTimestampAndPhase, less the scheduling order).
fn sort_pods(pods: &mut [Arc<Value>]) {
    pods.sort_by(|a, b| {
        let key = |p: &Value| {
            (
                p["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                meta::name(p).to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
}

fn pod_object(owner: &Value, kind: Kind, name: &str, labels: Value, spec: Value) -> Value {
    let template = &owner["spec"]["template"];
    let mut metadata = json!({
        "name": name,
        "generateName": format!("{}-", meta::name(owner)),
        "namespace": meta::namespace(owner),
        "uid": meta::uid(),
        "creationTimestamp": meta::now(),
        "labels": labels,
        "ownerReferences": [owner_ref(kind, owner)],
    });
    if template["metadata"]["annotations"].is_object() {
        metadata["annotations"] = template["metadata"]["annotations"].clone();
    }
    let mut spec = spec;
    if spec["restartPolicy"].is_null() {
        spec["restartPolicy"] = json!("Always");
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec,
           "status": {"phase": "Pending", "qosClass": "BestEffort"}})
}

// ---------------------------------------------------------------------------------------------
// StatefulSets

/// The parts of a StatefulSet's spec its controller acts on.
#[derive(Debug, Clone, Copy)]
struct StsSpec {
    replicas: usize,
    /// OrderedReady: one pod at a time, each after its predecessors are Running and Ready.
    monotonic: bool,
    rolling: bool,
    /// `rollingUpdate.partition`, when `rollingUpdate` is set.
    partition: Option<usize>,
}

fn sts_spec(sts: &Value) -> StsSpec {
    let strategy = &sts["spec"]["updateStrategy"];
    let rolling = strategy["type"].as_str().unwrap_or("RollingUpdate") == "RollingUpdate";
    StsSpec {
        replicas: sts["spec"]["replicas"].as_u64().unwrap_or(1) as usize,
        monotonic: sts["spec"]["podManagementPolicy"] != "Parallel",
        rolling,
        partition: strategy["rollingUpdate"]
            .is_object()
            .then(|| strategy["rollingUpdate"]["partition"].as_u64().unwrap_or(0) as usize),
    }
}

/// The claim of volume claim template `claim` for pod ordinal `ord`: `<claim>-<sts>-<ord>`.
fn claim_name(claim: &Value, sts: &Value, ord: usize) -> String {
    format!(
        "{}-{}-{ord}",
        claim["metadata"]["name"].as_str().unwrap_or_default(),
        meta::name(sts)
    )
}

/// The PersistentVolumeClaims a pod ordinal needs, bound at once (retained when the pod goes).
fn claims(sts: &Value, ord: usize) -> Vec<Value> {
    let templates = sts["spec"]["volumeClaimTemplates"].as_array();
    templates
        .into_iter()
        .flatten()
        .map(|claim| {
            let mut labels = labels_of(claim);
            if let Some(m) = sts["spec"]["selector"]["matchLabels"].as_object() {
                for (k, v) in m {
                    labels[k] = v.clone();
                }
            }
            let mut spec = claim["spec"].clone();
            if spec["volumeMode"].is_null() {
                spec["volumeMode"] = json!("Filesystem");
            }
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim_name(claim, sts, ord), "namespace": meta::namespace(sts),
                             "uid": meta::uid(), "creationTimestamp": meta::now(), "labels": labels},
                "spec": spec,
                "status": {"phase": "Bound", "accessModes": claim["spec"]["accessModes"].clone(),
                           "capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"].clone()}}})
        })
        .collect()
}

/// Pod `ordinal` of a StatefulSet at `revision` (newStatefulSetPod and setPodRevision).
pub fn statefulset_pod(sts: &Value, revision: &Value, ord: usize, nodes: &[String]) -> Value {
    let mut template = revision_template(revision);
    if !template.is_object() {
        template = sts["spec"]["template"].clone();
    }
    let name = format!("{}-{ord}", meta::name(sts));
    let mut labels = labels_of(&template);
    labels[POD_NAME_LABEL] = json!(name);
    labels[POD_INDEX_LABEL] = json!(ord.to_string());
    labels[REVISION_LABEL] = json!(meta::name(revision));
    let mut spec = template["spec"].clone();
    spec["hostname"] = json!(name);
    if let Some(service) = sts["spec"]["serviceName"]
        .as_str()
        .filter(|s| !s.is_empty())
    {
        spec["subdomain"] = json!(service);
    }
    if !nodes.is_empty() {
        spec["nodeName"] = json!(nodes[ord % nodes.len()]);
    }
    for claim in sts["spec"]["volumeClaimTemplates"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let vname = claim["metadata"]["name"].clone();
        let volume = json!({"name": vname, "persistentVolumeClaim": {"claimName": claim_name(claim, sts, ord)}});
        let mut volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        volumes.retain(|v| v["name"] != vname);
        volumes.push(volume);
        spec["volumes"] = Value::Array(volumes);
    }
    let mut template_owner = sts.clone();
    template_owner["spec"]["template"] = template;
    pod_object(&template_owner, Kind::StatefulSet, &name, labels, spec)
}

/// Pods by ordinal: the replicas `0..replicas` (a slot each, empty when missing) and the
/// condemned ones beyond, highest ordinal first.
fn by_ordinal(
    sts: &Value,
    pods: &[Arc<Value>],
    replicas: usize,
) -> (Vec<Option<Arc<Value>>>, Vec<Arc<Value>>) {
    let mut slots = vec![None; replicas];
    let mut condemned = Vec::new();
    for p in pods {
        match ordinal(meta::name(sts), p) {
            Some(o) if o < replicas => slots[o] = Some(p.clone()),
            Some(_) => condemned.push(p.clone()),
            None => {}
        }
    }
    condemned.sort_by_key(|p| std::cmp::Reverse(ordinal(meta::name(sts), p)));
    (slots, condemned)
}

/// The pods a StatefulSet needs created or deleted now (updateStatefulSet): missing or failed
/// replicas in ordinal order, condemned pods from the highest ordinal, then the rolling update,
/// which deletes the highest pod at or above the partition that is not at `update`, once every
/// pod above it is healthy. With OrderedReady, a pod that is not Running and Ready stops it all.
pub fn statefulset_steps(
    sts: &Value,
    pods: &[Arc<Value>],
    current: &Value,
    update: &Value,
    nodes: &[String],
) -> Vec<Step> {
    let spec = sts_spec(sts);
    let (slots, condemned) = by_ordinal(sts, pods, spec.replicas);
    // The first pod that is not healthy; "" for a replica not created yet.
    let first_unhealthy = slots
        .iter()
        .find_map(|s| match s {
            None => Some(""),
            Some(p) => (!running_and_ready(p)).then(|| meta::uid_of(p)),
        })
        .or_else(|| {
            condemned
                .iter()
                .rev()
                .find(|p| !running_and_ready(p))
                .map(|p| meta::uid_of(p))
        });
    let mut steps = Vec::new();
    if replica_steps(sts, spec, &slots, current, update, nodes, &mut steps)
        || condemned_steps(spec, &condemned, first_unhealthy, &mut steps)
        || !spec.rolling
    {
        return steps;
    }
    let min = spec.partition.unwrap_or(0);
    for slot in slots.iter().skip(min).rev() {
        let Some(p) = slot else { break };
        if pod_revision(p) != meta::name(update) {
            steps.push(Step::Delete(p.clone()));
            break;
        }
        if !running_and_ready(p) {
            break;
        }
    }
    steps
}

/// processReplica for each slot; true when OrderedReady must stop here.
fn replica_steps(
    sts: &Value,
    spec: StsSpec,
    slots: &[Option<Arc<Value>>],
    current: &Value,
    update: &Value,
    nodes: &[String],
    steps: &mut Vec<Step>,
) -> bool {
    for (ord, slot) in slots.iter().enumerate() {
        match slot {
            Some(p) if finished(p) => {
                steps.push(Step::Delete(p.clone()));
                if spec.monotonic {
                    return true;
                }
            }
            Some(p) => {
                if spec.monotonic && !running_and_ready(p) {
                    return true;
                }
            }
            None => {
                // newVersionedStatefulSetPod: below the partition, pods stay at the current revision.
                let at_current = spec.rolling
                    && match spec.partition {
                        Some(partition) => ord < partition,
                        None => (ord as i64) < int(&sts["status"]["currentReplicas"]),
                    };
                let revision = if at_current { current } else { update };
                steps.extend(claims(sts, ord).into_iter().map(Step::Create));
                steps.push(Step::Create(statefulset_pod(sts, revision, ord, nodes)));
                if spec.monotonic {
                    return true;
                }
            }
        }
    }
    false
}

/// processCondemned, highest ordinal first; true when OrderedReady must stop here.
fn condemned_steps(
    spec: StsSpec,
    condemned: &[Arc<Value>],
    first_unhealthy: Option<&str>,
    steps: &mut Vec<Step>,
) -> bool {
    for p in condemned {
        if spec.monotonic && !running_and_ready(p) && first_unhealthy != Some(meta::uid_of(p)) {
            return true;
        }
        steps.push(Step::Delete(p.clone()));
        if spec.monotonic {
            return true;
        }
    }
    false
}

/// A StatefulSet's status from its pods (updateStatus, completeRollingUpdate): once every
/// replica is at the update revision and ready, a RollingUpdate's current revision becomes the
/// update revision. Zero counts are left out where the API's JSON leaves them out.
pub fn statefulset_status(
    sts: &Value,
    pods: &[Arc<Value>],
    current: &str,
    update: &str,
    collision_count: i64,
) -> Value {
    let spec = sts_spec(sts);
    let (mut replicas, mut ready, mut at_current, mut at_update) = (0i64, 0i64, 0i64, 0i64);
    for p in pods
        .iter()
        .filter(|p| ordinal(meta::name(sts), p).is_some())
    {
        replicas += 1;
        ready += i64::from(running_and_ready(p));
        at_current += i64::from(pod_revision(p) == current);
        at_update += i64::from(pod_revision(p) == update);
    }
    let desired = spec.replicas as i64;
    let mut current = current;
    if spec.rolling && at_update == desired && ready == desired && replicas == desired {
        at_current = at_update;
        current = update;
    }
    let mut status = json!({
        "observedGeneration": sts["metadata"]["generation"].clone(),
        "replicas": replicas,
        "readyReplicas": ready,
        "currentReplicas": at_current,
        "updatedReplicas": at_update,
        "currentRevision": current,
        "updateRevision": update,
        "collisionCount": collision_count,
        "availableReplicas": ready,
    });
    omit_zeros(
        &mut status,
        &[
            "observedGeneration",
            "readyReplicas",
            "currentReplicas",
            "updatedReplicas",
        ],
    );
    if sts["status"]["conditions"].is_array() {
        status["conditions"] = sts["status"]["conditions"].clone();
    }
    status
}

/// Drop fields whose Go type says `omitempty` when they are zero.
fn omit_zeros(status: &mut Value, fields: &[&str]) {
    if let Some(m) = status.as_object_mut() {
        for f in fields {
            if m.get(*f)
                .is_none_or(|v| v.as_i64() == Some(0) || v.is_null())
            {
                m.remove(*f);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DaemonSets

/// Whether a DaemonSet's pods belong on `node`: its template's nodeSelector and required node
/// affinity match the node (NodeShouldRunDaemonPod; simulated nodes have no taints).
pub fn node_should_run(ds: &Value, node: &Value) -> bool {
    let spec = &ds["spec"]["template"]["spec"];
    let labels = &node["metadata"]["labels"];
    let selector_ok = spec["nodeSelector"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array();
    selector_ok && terms.is_none_or(|ts| ts.iter().any(|t| term_matches(t, node)))
}

/// One node selector term: its label expressions and `metadata.name` fields all match.
fn term_matches(term: &Value, node: &Value) -> bool {
    let exprs = term["matchExpressions"].as_array();
    let fields = term["matchFields"].as_array();
    if exprs.is_none_or(Vec::is_empty) && fields.is_none_or(Vec::is_empty) {
        return false;
    }
    let labels_ok =
        Selector::from_label_selector(&json!({"matchExpressions": term["matchExpressions"]}))
            .matches_labels(node);
    let fields_ok = fields.into_iter().flatten().all(|f| {
        let values = f["values"].as_array().cloned().unwrap_or_default();
        let has = values.iter().any(|v| v.as_str() == Some(meta::name(node)));
        f["key"] == "metadata.name"
            && match f["operator"].as_str() {
                Some("In") => has,
                Some("NotIn") => !has,
                _ => false,
            }
    });
    labels_ok && fields_ok
}

/// A DaemonSet's pods by the node they run on, oldest first.
pub fn pods_by_node(pods: &[Arc<Value>]) -> BTreeMap<String, Vec<Arc<Value>>> {
    let mut out: BTreeMap<String, Vec<Arc<Value>>> = BTreeMap::new();
    for p in pods {
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        out.entry(node.to_string()).or_default().push(p.clone());
    }
    for pods in out.values_mut() {
        sort_pods(pods);
    }
    out
}

/// The tolerations the DaemonSet controller gives every daemon pod.
fn daemon_tolerations(spec: &mut Value) {
    let mut wanted = vec![
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ("node.kubernetes.io/memory-pressure", "NoSchedule"),
        ("node.kubernetes.io/pid-pressure", "NoSchedule"),
        ("node.kubernetes.io/unschedulable", "NoSchedule"),
    ];
    if spec["hostNetwork"] == true {
        wanted.push(("node.kubernetes.io/network-unavailable", "NoSchedule"));
    }
    let mut tolerations = spec["tolerations"].as_array().cloned().unwrap_or_default();
    for (key, effect) in wanted {
        if !tolerations
            .iter()
            .any(|t| t["key"] == key && t["effect"] == effect)
        {
            tolerations.push(json!({"key": key, "operator": "Exists", "effect": effect}));
        }
    }
    spec["tolerations"] = Value::Array(tolerations);
}

/// A DaemonSet's pod for `node` at revision `hash`: pinned to the node by node affinity (the
/// scheduler then sets `nodeName`), with the daemon tolerations.
pub fn daemonset_pod(ds: &Value, node: &str, hash: &str) -> Value {
    let template = &ds["spec"]["template"];
    let generation = ds["metadata"]["annotations"][TEMPLATE_GENERATION]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| int(&ds["metadata"]["generation"]).to_string());
    let mut labels = labels_of(template);
    labels[REVISION_LABEL] = json!(hash);
    labels[TEMPLATE_GENERATION_LABEL] = json!(generation);
    let mut spec = template["spec"].clone();
    spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] = json!({
        "nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]});
    daemon_tolerations(&mut spec);
    spec["nodeName"] = json!(node);
    let name = format!("{}-{}", meta::name(ds), meta::suffix(5));
    pod_object(ds, Kind::DaemonSet, &name, labels, spec)
}

/// maxSurge and maxUnavailable for `desired` nodes (rounded up, as updatedDesiredNodeCounts does).
fn daemonset_budget(ds: &Value, desired: i64) -> (i64, i64) {
    let ru = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    let surge = int_or_percent(&ru["maxSurge"], desired, true, "0");
    let unavailable = if ru["maxUnavailable"].is_null() {
        1
    } else {
        int_or_percent(&ru["maxUnavailable"], desired, true, "0")
    };
    if desired > 0 && surge == 0 && unavailable == 0 {
        return (0, 1);
    }
    (surge, unavailable)
}

/// The pods the DaemonSet controller's manage loop creates and deletes: a pod on each node that
/// should run one and has none, failed pods and surplus pods deleted, pods on nodes that should
/// not run one (or no longer exist) deleted.
pub fn daemonset_manage(
    ds: &Value,
    nodes: &[Value],
    by_node: &BTreeMap<String, Vec<Arc<Value>>>,
    hash: &str,
) -> Vec<Step> {
    let desired = nodes.iter().filter(|n| node_should_run(ds, n)).count() as i64;
    let surge = daemonset_budget(ds, desired).0 > 0;
    let mut steps = Vec::new();
    for node in nodes {
        let name = meta::name(node);
        let pods = by_node.get(name).map(Vec::as_slice).unwrap_or_default();
        if !node_should_run(ds, node) {
            steps.extend(pods.iter().cloned().map(Step::Delete));
        } else if pods.is_empty() {
            steps.push(Step::Create(daemonset_pod(ds, name, hash)));
        } else {
            let (done, running): (Vec<_>, Vec<_>) = pods.iter().cloned().partition(|p| finished(p));
            steps.extend(done.into_iter().map(Step::Delete));
            steps.extend(
                surplus_on_node(&running, hash, surge)
                    .into_iter()
                    .map(Step::Delete),
            );
        }
    }
    let known: HashSet<&str> = nodes.iter().map(meta::name).collect();
    for (node, pods) in by_node {
        if !known.contains(node.as_str()) {
            steps.extend(pods.iter().cloned().map(Step::Delete));
        }
    }
    steps
}

/// The running pods on one node beyond what may stay: without surge all but the oldest; with
/// surge the oldest new and oldest old pod may both stay until the new one is ready.
fn surplus_on_node(running: &[Arc<Value>], hash: &str, surge: bool) -> Vec<Arc<Value>> {
    if !surge {
        return running.iter().skip(1).cloned().collect();
    }
    let (mut newest, mut oldest, mut out) = (None, None, Vec::new());
    for p in running {
        let slot = if pod_revision(p) == hash {
            &mut newest
        } else {
            &mut oldest
        };
        match slot {
            None => *slot = Some(p.clone()),
            Some(_) => out.push(p.clone()),
        }
    }
    if let (Some(new), Some(old)) = (newest, oldest) {
        if !Controller::pod_ready(&old) || Controller::pod_ready(&new) {
            out.push(old);
        }
    }
    out
}

/// The pod at the current revision and the pod at an older one, on one node.
type NewAndOld = (Option<Arc<Value>>, Option<Arc<Value>>);

/// The new pod and the old pod on a node; None when there are two of either
/// (findUpdatedPodsOnNode).
fn updated_on_node(pods: &[Arc<Value>], hash: &str) -> Option<NewAndOld> {
    let (mut new, mut old) = (None, None);
    for p in pods {
        let slot = if pod_revision(p) == hash {
            &mut new
        } else {
            &mut old
        };
        if slot.is_some() {
            return None;
        }
        *slot = Some(p.clone());
    }
    Some((new, old))
}

/// The rolling update of a DaemonSet (rollingUpdate in update.go), once the manage loop has
/// nothing left to do. Without surge: old pods that are not available are replaced at once,
/// available ones only while fewer than maxUnavailable pods are unavailable.
pub fn daemonset_rolling(
    ds: &Value,
    nodes: &[Value],
    by_node: &BTreeMap<String, Vec<Arc<Value>>>,
    hash: &str,
) -> Vec<Step> {
    let desired = nodes.iter().filter(|n| node_should_run(ds, n)).count() as i64;
    let (surge, max_unavailable) = daemonset_budget(ds, desired);
    if surge > 0 {
        return daemonset_surge(ds, nodes, by_node, hash, surge);
    }
    let (mut unavailable, mut replace, mut candidates) = (0i64, Vec::new(), Vec::new());
    for pods in by_node.values() {
        match updated_on_node(pods, hash) {
            None | Some((None, None)) | Some((Some(_), Some(_))) => unavailable += 1,
            Some((Some(new), None)) => unavailable += i64::from(!Controller::pod_ready(&new)),
            Some((None, Some(old))) if !Controller::pod_ready(&old) => replace.push(old),
            Some((None, Some(old))) => candidates.push(old),
        }
    }
    let room = (max_unavailable - unavailable).clamp(0, candidates.len() as i64) as usize;
    replace
        .into_iter()
        .chain(candidates.into_iter().take(room))
        .map(Step::Delete)
        .collect()
}

/// The surging rolling update: a new pod beside each old one that is not available at once,
/// beside available ones up to maxSurge at a time; an old pod goes once its new one is ready.
fn daemonset_surge(
    ds: &Value,
    nodes: &[Value],
    by_node: &BTreeMap<String, Vec<Arc<Value>>>,
    hash: &str,
    max_surge: i64,
) -> Vec<Step> {
    let (mut surging, mut steps, mut candidates) = (0i64, Vec::new(), Vec::new());
    for node in nodes.iter().filter(|n| node_should_run(ds, n)) {
        let name = meta::name(node);
        let pods = by_node.get(name).map(Vec::as_slice).unwrap_or_default();
        match updated_on_node(pods, hash) {
            None => surging += 1,
            Some((_, None)) => {}
            Some((None, Some(old))) if !Controller::pod_ready(&old) => {
                steps.push(Step::Create(daemonset_pod(ds, name, hash)))
            }
            Some((None, Some(_))) => candidates.push(name),
            Some((Some(new), Some(_))) if !Controller::pod_ready(&new) => surging += 1,
            Some((Some(_), Some(old))) => steps.push(Step::Delete(old)),
        }
    }
    let room = (max_surge - surging).clamp(0, candidates.len() as i64) as usize;
    for name in candidates.into_iter().take(room) {
        steps.push(Step::Create(daemonset_pod(ds, name, hash)));
    }
    steps
}

/// A DaemonSet's status (updateDaemonSetStatus): per node that should run a pod, its oldest pod
/// counts as scheduled, ready, available and updated (at `hash`); pods on other nodes are
/// misscheduled.
pub fn daemonset_status(
    ds: &Value,
    nodes: &[Value],
    by_node: &BTreeMap<String, Vec<Arc<Value>>>,
    hash: &str,
    collision_count: i64,
) -> Value {
    let (mut desired, mut current, mut misscheduled) = (0i64, 0i64, 0i64);
    let (mut ready, mut updated) = (0i64, 0i64);
    for node in nodes {
        let pods = by_node
            .get(meta::name(node))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if !node_should_run(ds, node) {
            misscheduled += i64::from(!pods.is_empty());
            continue;
        }
        desired += 1;
        let Some(oldest) = pods.first() else { continue };
        current += 1;
        ready += i64::from(Controller::pod_ready(oldest));
        updated += i64::from(pod_revision(oldest) == hash);
    }
    let mut status = json!({
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "desiredNumberScheduled": desired,
        "numberReady": ready,
        "observedGeneration": ds["metadata"]["generation"].clone(),
        "updatedNumberScheduled": updated,
        "numberAvailable": ready,
        "numberUnavailable": desired - ready,
        "collisionCount": collision_count,
    });
    omit_zeros(
        &mut status,
        &[
            "observedGeneration",
            "updatedNumberScheduled",
            "numberAvailable",
            "numberUnavailable",
            "collisionCount",
        ],
    );
    if ds["status"]["conditions"].is_array() {
        status["conditions"] = ds["status"]["conditions"].clone();
    }
    status
}

// ---------------------------------------------------------------------------------------------
// The controllers: read the store, decide, write.

impl Controller {
    /// Mark a StatefulSet or DaemonSet for the next tick; true when `key` is one (its UID then
    /// leads from what it owns back to it). A node change marks every DaemonSet.
    pub(super) fn note_workload(&mut self, key: &ObjKey, deleted: bool) -> bool {
        if key.resource == resources::nodes().qualified() {
            let all: Vec<ObjKey> = self.daemonsets.iter().cloned().collect();
            self.dirty_daemonsets.extend(all);
            false
        } else if key.resource == resources::daemonsets().qualified() {
            match deleted {
                true => self.daemonsets.remove(key),
                false => self.daemonsets.insert(key.clone()),
            };
            self.dirty_daemonsets.insert(key.clone());
            true
        } else if key.resource == resources::statefulsets().qualified() {
            self.dirty_statefulsets.insert(key.clone());
            true
        } else {
            false
        }
    }

    /// A pod or ControllerRevision of this owner changed.
    pub(super) fn workload_changed(&mut self, owner: ObjKey) {
        if owner.resource == resources::statefulsets().qualified() {
            self.dirty_statefulsets.insert(owner);
        } else if owner.resource == resources::daemonsets().qualified() {
            self.dirty_daemonsets.insert(owner);
        }
    }

    /// Sync every StatefulSet and DaemonSet something happened to, each with its status.
    pub(super) fn sync_workloads(&mut self) {
        for key in std::mem::take(&mut self.dirty_statefulsets) {
            if let Some(sts) = self.store.get(&key) {
                self.sync_statefulset(&sts);
            }
        }
        for key in std::mem::take(&mut self.dirty_daemonsets) {
            if let Some(ds) = self.store.get(&key) {
                self.sync_daemonset(&ds);
            }
        }
    }

    fn sync_statefulset(&mut self, sts: &Value) {
        let (ns, uid) = (meta::namespace(sts), meta::uid_of(sts));
        let revisions = self.owned(resources::controllerrevisions(), ns, uid);
        let choice = self.revision_for(Kind::StatefulSet, sts, &revisions);
        let current_name = sts["status"]["currentRevision"]
            .as_str()
            .unwrap_or_default();
        let current = revisions
            .iter()
            .find(|r| meta::name(r) == current_name)
            .map(|r| (**r).clone())
            .unwrap_or_else(|| choice.update.clone());
        let pods = self.owned(resources::pods(), ns, uid);
        let nodes: Vec<String> = self
            .nodes()
            .iter()
            .map(|n| meta::name(n).to_string())
            .collect();
        self.apply(statefulset_steps(
            sts,
            &pods,
            &current,
            &choice.update,
            &nodes,
        ));
        let mut live: HashSet<String> = pods.iter().map(|p| pod_revision(p).to_string()).collect();
        live.insert(meta::name(&current).to_string());
        live.insert(meta::name(&choice.update).to_string());
        for r in surplus_revisions(sts, &revisions, &live) {
            self.delete(resources::controllerrevisions(), &r);
        }
        self.absorb();
        let pods = self.owned(resources::pods(), ns, uid);
        let status = statefulset_status(
            sts,
            &pods,
            meta::name(&current),
            meta::name(&choice.update),
            choice.collision_count,
        );
        if status != sts["status"] {
            self.update(resources::statefulsets(), sts, |o| o["status"] = status);
        }
    }

    fn sync_daemonset(&mut self, ds: &Value) {
        let (ns, uid) = (meta::namespace(ds), meta::uid_of(ds));
        let revisions = self.owned(resources::controllerrevisions(), ns, uid);
        let choice = self.revision_for(Kind::DaemonSet, ds, &revisions);
        let hash = choice.update["metadata"]["labels"][REVISION_LABEL]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let nodes = self.nodes();
        let pods = self.owned(resources::pods(), ns, uid);
        let by_node = pods_by_node(&pods);
        let mut steps = daemonset_manage(ds, &nodes, &by_node, &hash);
        // Like the real controller's expectations: the rolling update waits for the manage
        // loop's creations and deletions to be seen.
        if steps.is_empty() && ds["spec"]["updateStrategy"]["type"] != "OnDelete" {
            steps = daemonset_rolling(ds, &nodes, &by_node, &hash);
        }
        self.apply(steps);
        let mut live: HashSet<String> = revisions
            .iter()
            .filter(|r| {
                pods.iter()
                    .any(|p| r["metadata"]["labels"][REVISION_LABEL] == pod_revision(p))
            })
            .map(|r| meta::name(r).to_string())
            .collect();
        live.insert(meta::name(&choice.update).to_string());
        for r in surplus_revisions(ds, &revisions, &live) {
            self.delete(resources::controllerrevisions(), &r);
        }
        self.absorb();
        let by_node = pods_by_node(&self.owned(resources::pods(), ns, uid));
        let status = daemonset_status(ds, &nodes, &by_node, &hash, choice.collision_count);
        if status != ds["status"] {
            self.update(resources::daemonsets(), ds, |o| o["status"] = status);
        }
    }

    /// The revision of an owner's template, created or renumbered if need be.
    fn revision_for(&self, kind: Kind, owner: &Value, revisions: &[Arc<Value>]) -> RevisionChoice {
        let rt = resources::controllerrevisions();
        let ns = meta::namespace(owner);
        let choice = choose_revision(kind, owner, revisions, |name| {
            self.store.get(&ObjKey::new(rt, ns, name))
        });
        match &choice.write {
            Some(RevisionWrite::Create(r)) => self.create(rt, r.clone()),
            Some(RevisionWrite::Renumber(r, n)) => {
                let n = *n;
                self.update(rt, r, |o| o["revision"] = json!(n));
            }
            None => {}
        }
        choice
    }

    /// The node a new ReplicaSet pod is scheduled on: spread over the nodes by its name
    /// (`sim-node` in a cluster without nodes).
    pub(super) fn node_for(&self, pod_name: &str) -> String {
        let nodes = self.nodes();
        let h = pod_name.bytes().fold(0usize, |a, b| {
            a.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        nodes
            .get(h % nodes.len().max(1))
            .map(|n| meta::name(n).to_string())
            .unwrap_or_else(|| "sim-node".into())
    }

    /// Every node, by name.
    fn nodes(&self) -> Vec<Value> {
        self.store.list(&resources::nodes().qualified(), None).0
    }

    fn apply(&mut self, steps: Vec<Step>) {
        let rt_of = |obj: &Value| -> &'static ResourceType {
            match obj["kind"].as_str() {
                Some("PersistentVolumeClaim") => resources::persistentvolumeclaims(),
                _ => resources::pods(),
            }
        };
        for step in steps {
            match step {
                Step::Create(obj) => self.create(rt_of(&obj), obj),
                Step::Delete(obj) => self.delete(rt_of(&obj), &obj),
            }
        }
    }
}

#[cfg(test)]
mod tests;
