//! Rollout health, judged as `kubectl rollout status` judges it (observedGeneration first), plus
//! failing fast from the new ReplicaSet's pods with the pod's own reason. The judgement is a
//! pure function over the Deployment, its ReplicaSets and pods; the waiting is driven by watches
//! shared by every service in a namespace (reflectors), never by polling.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, reflector, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::domain::Images;

const REVISION: &str = "deployment.kubernetes.io/revision";

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Still going; the text says what it waits for.
    Progressing(String),
    Healthy,
    /// Complete with 0 desired replicas: no pod ran the images, so nothing is verified.
    NoReplicas,
    /// Failed: a reason (`ImagePullBackOff`, `ProgressDeadlineExceeded`, …) and the message
    /// the cluster gave.
    Failed {
        reason: String,
        message: String,
    },
}

/// How quickly transient pod failures count as failures.
#[derive(Debug, Clone, Copy)]
pub struct FailFast {
    /// How long `ErrImagePull` may persist before it is a failure.
    pub pull_grace: Duration,
    /// How many restarts in `CrashLoopBackOff` make a failure.
    pub crash_restarts: i32,
}

impl Default for FailFast {
    fn default() -> Self {
        FailFast {
            pull_grace: Duration::from_secs(3),
            crash_restarts: 2,
        }
    }
}

/// Waiting reasons that will not fix themselves.
const DETERMINISTIC: &[&str] = &[
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// The Deployment's current ReplicaSet: owned by it, carrying the Deployment's revision, and
/// running the template's own images. The last check matters while caches trail each other: a
/// Deployment just rolled back may still name the failed ReplicaSet's revision, and a verdict
/// must only ever be made on the pods of the template being judged.
pub fn new_replicaset<'a>(dep: &Deployment, rss: &'a [Arc<ReplicaSet>]) -> Option<&'a ReplicaSet> {
    let uid = dep.metadata.uid.as_deref()?;
    let revision = dep.annotations().get(REVISION)?;
    let images = container_images(dep);
    rss.iter().map(|r| r.as_ref()).find(|rs| {
        rs.owner_references()
            .iter()
            .any(|o| o.controller == Some(true) && o.uid == uid)
            && rs.annotations().get(REVISION) == Some(revision)
            && replicaset_images(rs) == images
    })
}

fn replicaset_images(rs: &ReplicaSet) -> Images {
    template_images(rs.spec.as_ref().and_then(|s| s.template.as_ref()))
}

fn selector_matches(dep: &Deployment, pod: &Pod) -> bool {
    let Some(sel) = dep.spec.as_ref().map(|s| &s.selector) else {
        return false;
    };
    let labels = pod.labels();
    let ok_labels = sel
        .match_labels
        .as_ref()
        .is_none_or(|m| m.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let ok_exprs = sel.match_expressions.as_ref().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let v = labels.get(&e.key);
            let vals = e.values.clone().unwrap_or_default();
            match e.operator.as_str() {
                "In" => v.is_some_and(|v| vals.contains(v)),
                "NotIn" => v.is_none_or(|v| !vals.contains(v)),
                "Exists" => v.is_some(),
                "DoesNotExist" => v.is_none(),
                _ => false,
            }
        })
    });
    ok_labels && ok_exprs
}

/// The pods of the new ReplicaSet: matched by the Deployment's selector and owned by it.
pub fn new_pods<'a>(dep: &Deployment, rs: &ReplicaSet, pods: &'a [Arc<Pod>]) -> Vec<&'a Pod> {
    let Some(uid) = rs.metadata.uid.as_deref() else {
        return Vec::new();
    };
    pods.iter()
        .map(|p| p.as_ref())
        .filter(|p| selector_matches(dep, p) && p.owner_references().iter().any(|o| o.uid == uid))
        .collect()
}

/// Judge a rollout. `generation` is the Deployment generation our patch produced;
/// `first_seen` remembers when each (pod, reason) was first seen, for grace periods.
pub fn judge(
    dep: &Deployment,
    generation: i64,
    new_pods: &[&Pod],
    fail_fast: FailFast,
    first_seen: &mut HashMap<(String, String), Instant>,
    now: Instant,
) -> Health {
    let observed = dep
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .unwrap_or(0);
    let current = dep.metadata.generation.unwrap_or(0);
    if current < generation || observed < current {
        return Health::Progressing(
            "waiting for the deployment controller to observe the update".into(),
        );
    }
    if dep.spec.as_ref().and_then(|s| s.paused) == Some(true) {
        return Health::Failed {
            reason: "DeploymentPaused".into(),
            message: "Deployment is paused".into(),
        };
    }
    let status = dep.status.clone().unwrap_or_default();
    if let Some(c) = status
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
    {
        if c.reason.as_deref() == Some("ProgressDeadlineExceeded") {
            return Health::Failed {
                reason: "ProgressDeadlineExceeded".into(),
                message: c
                    .message
                    .clone()
                    .unwrap_or_else(|| "the rollout exceeded its progress deadline".into()),
            };
        }
    }
    // Fail fast from the new pods' own container states.
    for pod in new_pods {
        let statuses = pod
            .status
            .as_ref()
            .map(|s| {
                let mut all = s.init_container_statuses.clone().unwrap_or_default();
                all.extend(s.container_statuses.clone().unwrap_or_default());
                all
            })
            .unwrap_or_default();
        for cs in statuses {
            let Some(waiting) = cs.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = waiting.reason.clone().unwrap_or_default();
            let message = format!(
                "pod {} container {}: {}",
                pod.name_any(),
                cs.name,
                waiting.message.clone().unwrap_or_else(|| reason.clone())
            );
            let since = *first_seen
                .entry((pod.name_any(), reason.clone()))
                .or_insert(now);
            let failed = DETERMINISTIC.contains(&reason.as_str())
                || reason == "ImagePullBackOff"
                || (reason == "ErrImagePull" && now.duration_since(since) >= fail_fast.pull_grace)
                || (reason == "CrashLoopBackOff" && cs.restart_count >= fail_fast.crash_restarts);
            if failed {
                return Health::Failed { reason, message };
            }
        }
    }
    let desired = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    if desired == 0 {
        return Health::NoReplicas;
    }
    let updated = status.updated_replicas.unwrap_or(0);
    let replicas = status.replicas.unwrap_or(0);
    let available = status.available_replicas.unwrap_or(0);
    if updated < desired {
        return Health::Progressing(format!("{updated} of {desired} new replicas updated"));
    }
    if replicas > updated {
        return Health::Progressing(format!(
            "{} old replicas pending termination",
            replicas - updated
        ));
    }
    if available < updated {
        return Health::Progressing(format!(
            "{available} of {updated} updated replicas available"
        ));
    }
    Health::Healthy
}

/// Shared watches of one namespace: Deployments, ReplicaSets and Pods, with a change counter
/// that wakes every waiter in the namespace.
#[derive(Clone)]
pub struct NamespaceWatch {
    pub deployments: Store<Deployment>,
    pub replicasets: Store<ReplicaSet>,
    pub pods: Store<Pod>,
    pub changed: watch::Receiver<u64>,
    /// Lookups by name and owner, rebuilt once per change and shared by every waiter, so a
    /// burst of events costs one pass over the namespace rather than one per waiting service.
    index: Arc<std::sync::Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    version: Option<u64>,
    deployments: HashMap<String, Arc<Deployment>>,
    replicasets_by_owner: HashMap<String, Vec<Arc<ReplicaSet>>>,
    pods_by_owner: HashMap<String, Vec<Arc<Pod>>>,
}

fn controller_uid(
    refs: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
) -> Option<String> {
    refs.iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// All namespace watches, started on first use and shared by every service.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    by_namespace: Arc<DashMap<String, NamespaceWatch>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Moves on any change in any watched namespace.
    any_change: Arc<watch::Sender<u64>>,
}

fn spawn_reflector<K>(api: Api<K>, tx: watch::Sender<u64>, any: Arc<watch::Sender<u64>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                tracing::debug!(error = %e, "watch interrupted; it resumes with backoff");
            }
            tx.send_modify(|n| *n += 1);
            any.send_modify(|n| *n += 1);
        }
    });
    reader
}

impl Watches {
    pub fn new(client: Client) -> Self {
        Watches {
            client,
            by_namespace: Arc::default(),
            lock: Arc::default(),
            any_change: Arc::new(watch::channel(0).0),
        }
    }

    /// Notified on any change in any watched namespace.
    pub fn any_change(&self) -> watch::Receiver<u64> {
        self.any_change.subscribe()
    }

    /// The namespaces being watched now.
    pub fn watched(&self) -> Vec<(String, NamespaceWatch)> {
        self.by_namespace
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// The watch of `namespace`, started (and synced) if it is not running yet.
    pub async fn namespace(&self, namespace: &str) -> NamespaceWatch {
        if let Some(w) = self.by_namespace.get(namespace) {
            return w.clone();
        }
        let _guard = self.lock.lock().await;
        if let Some(w) = self.by_namespace.get(namespace) {
            return w.clone();
        }
        let (tx, rx) = watch::channel(0u64);
        let w = NamespaceWatch {
            deployments: spawn_reflector(
                Api::namespaced(self.client.clone(), namespace),
                tx.clone(),
                self.any_change.clone(),
            ),
            replicasets: spawn_reflector(
                Api::namespaced(self.client.clone(), namespace),
                tx.clone(),
                self.any_change.clone(),
            ),
            pods: spawn_reflector(
                Api::namespaced(self.client.clone(), namespace),
                tx,
                self.any_change.clone(),
            ),
            changed: rx,
            index: Arc::default(),
        };
        // A namespace depwatch may not list (RBAC) never syncs: do not hold every other
        // namespace behind it. Waiters then judge from what arrives, under their own deadline.
        let synced = tokio::time::timeout(Duration::from_secs(10), async {
            w.deployments.wait_until_ready().await.is_ok()
                && w.replicasets.wait_until_ready().await.is_ok()
                && w.pods.wait_until_ready().await.is_ok()
        })
        .await;
        if synced != Ok(true) {
            tracing::warn!(namespace, "the shared watches of this namespace have not synced (is depwatch allowed to list deployments, replicasets and pods there?)");
        }
        self.by_namespace.insert(namespace.to_string(), w.clone());
        w
    }
}

impl NamespaceWatch {
    /// The index for the current change count, rebuilt if anything changed since.
    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        // Read the count before the stores: the index is never older than its label.
        let version = *self.changed.borrow();
        let mut index = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if index.version != Some(version) {
            let mut fresh = Index {
                version: Some(version),
                ..Index::default()
            };
            for d in self.deployments.state() {
                fresh.deployments.insert(d.name_any(), d);
            }
            for rs in self.replicasets.state() {
                if let Some(owner) = controller_uid(rs.owner_references()) {
                    fresh
                        .replicasets_by_owner
                        .entry(owner)
                        .or_default()
                        .push(rs);
                }
            }
            for p in self.pods.state() {
                if let Some(owner) = controller_uid(p.owner_references()) {
                    fresh.pods_by_owner.entry(owner).or_default().push(p);
                }
            }
            *index = fresh;
        }
        index
    }

    /// Judge `name`'s rollout from the cached state.
    pub fn judge(
        &self,
        name: &str,
        generation: i64,
        fail_fast: FailFast,
        first_seen: &mut HashMap<(String, String), Instant>,
    ) -> Health {
        let index = self.index();
        let Some(dep) = index.deployments.get(name).cloned() else {
            return Health::Failed {
                reason: "DeploymentDeleted".into(),
                message: format!("Deployment {name} disappeared during the rollout"),
            };
        };
        let no_rs = Vec::new();
        let no_pods = Vec::new();
        let rss = dep
            .metadata
            .uid
            .as_ref()
            .and_then(|u| index.replicasets_by_owner.get(u))
            .unwrap_or(&no_rs);
        let new_pods = match new_replicaset(&dep, rss) {
            Some(rs) => {
                let pods = rs
                    .metadata
                    .uid
                    .as_ref()
                    .and_then(|u| index.pods_by_owner.get(u))
                    .unwrap_or(&no_pods);
                new_pods(&dep, rs, pods)
            }
            None => Vec::new(),
        };
        judge(
            &dep,
            generation,
            &new_pods,
            fail_fast,
            first_seen,
            Instant::now(),
        )
    }

    /// The images a Deployment runs now, per container, from the cache.
    pub fn images(&self, name: &str) -> Option<Images> {
        self.images_and_uid(name).map(|(images, _)| images)
    }

    /// The images a Deployment runs now and its uid, from the cache.
    pub fn images_and_uid(&self, name: &str) -> Option<(Images, String)> {
        let dep = self.index().deployments.get(name).cloned()?;
        Some((
            container_images(&dep),
            dep.metadata.uid.clone().unwrap_or_default(),
        ))
    }
}

pub fn container_images(dep: &Deployment) -> Images {
    template_images(dep.spec.as_ref().map(|s| &s.template))
}

fn template_images(t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>) -> Images {
    t.and_then(|t| t.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_saphyr::from_str(s).expect("fixture parses")
    }

    const DEP: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: demo, uid: d1, generation: 2, annotations: {deployment.kubernetes.io/revision: "2"}}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template: {metadata: {labels: {app: web}}, spec: {containers: [{name: web, image: "web:2"}]}}
status:
  observedGeneration: 2
  replicas: 3
  updatedReplicas: 3
  readyReplicas: 3
  availableReplicas: 3
  conditions:
  - {type: Progressing, status: "True", reason: NewReplicaSetAvailable}
"#;

    fn pod(waiting_reason: &str, restarts: i32) -> Pod {
        yaml(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: web-abc-1, labels: {{app: web}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: web-abc, uid: rs2, controller: true}}]}}
spec: {{containers: [{{name: web, image: "web:2"}}]}}
status:
  containerStatuses:
  - name: web
    image: "web:2"
    imageID: ""
    ready: false
    restartCount: {restarts}
    state: {{waiting: {{reason: {waiting_reason}, message: "the pod's own words"}}}}
"#
        ))
    }

    fn run(dep: &Deployment, generation: i64, pods: &[&Pod]) -> Health {
        judge(
            dep,
            generation,
            pods,
            FailFast::default(),
            &mut HashMap::new(),
            Instant::now(),
        )
    }

    #[test]
    fn a_complete_rollout_is_healthy_only_once_observed() {
        let dep: Deployment = yaml(DEP);
        assert_eq!(run(&dep, 2, &[]), Health::Healthy);
        // Right after our patch the cache may still show the previous, complete rollout:
        // that must not count (kube-runtime's is_deployment_completed gets this wrong).
        assert!(matches!(run(&dep, 3, &[]), Health::Progressing(_)));
        let mut lagging = dep.clone();
        lagging.metadata.generation = Some(3);
        assert!(matches!(run(&lagging, 3, &[]), Health::Progressing(_)));
    }

    #[test]
    fn partial_rollouts_progress() {
        let mut dep: Deployment = yaml(DEP);
        let st = dep.status.as_mut().expect("status");
        st.updated_replicas = Some(1);
        assert_eq!(
            run(&dep, 2, &[]),
            Health::Progressing("1 of 3 new replicas updated".into())
        );
        let st = dep.status.as_mut().expect("status");
        st.updated_replicas = Some(3);
        st.replicas = Some(4);
        assert!(matches!(run(&dep, 2, &[]), Health::Progressing(m) if m.contains("old replicas")));
        let st = dep.status.as_mut().expect("status");
        st.replicas = Some(3);
        st.available_replicas = Some(2);
        assert!(matches!(run(&dep, 2, &[]), Health::Progressing(m) if m.contains("available")));
    }

    #[test]
    fn deadline_and_pod_failures_fail_with_the_pods_reason() {
        let mut dep: Deployment = yaml(DEP);
        dep.status.as_mut().expect("status").conditions = Some(vec![yaml(
            "{type: Progressing, status: \"False\", reason: ProgressDeadlineExceeded, message: 'ReplicaSet \"web-abc\" has timed out progressing.'}",
        )]);
        assert!(
            matches!(run(&dep, 2, &[]), Health::Failed { reason, .. } if reason == "ProgressDeadlineExceeded")
        );

        let mut dep: Deployment = yaml(DEP);
        dep.status.as_mut().expect("status").updated_replicas = Some(1);
        for reason in [
            "ImagePullBackOff",
            "InvalidImageName",
            "CreateContainerConfigError",
        ] {
            let p = pod(reason, 0);
            match run(&dep, 2, &[&p]) {
                Health::Failed { reason: r, message } => {
                    assert_eq!(r, reason);
                    assert!(message.contains("the pod's own words"), "{message}");
                }
                other => panic!("{reason}: {other:?}"),
            }
        }
        let creating = pod("ContainerCreating", 0);
        assert!(matches!(run(&dep, 2, &[&creating]), Health::Progressing(_)));
        let one_crash = pod("CrashLoopBackOff", 1);
        assert!(matches!(
            run(&dep, 2, &[&one_crash]),
            Health::Progressing(_)
        ));
        let crashing = pod("CrashLoopBackOff", 2);
        assert!(
            matches!(run(&dep, 2, &[&crashing]), Health::Failed { reason, .. } if reason == "CrashLoopBackOff")
        );
    }

    #[test]
    fn err_image_pull_fails_after_its_grace() {
        let mut dep: Deployment = yaml(DEP);
        dep.status.as_mut().expect("status").updated_replicas = Some(1);
        let p = pod("ErrImagePull", 0);
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let ff = FailFast::default();
        assert!(matches!(
            judge(&dep, 2, &[&p], ff, &mut seen, t0),
            Health::Progressing(_)
        ));
        assert!(matches!(
            judge(&dep, 2, &[&p], ff, &mut seen, t0 + ff.pull_grace),
            Health::Failed { .. }
        ));
    }

    fn replicaset(name: &str, uid: &str, owner: &str, revision: &str, image: &str) -> ReplicaSet {
        yaml(&format!(
            "metadata: {{name: {name}, uid: {uid}, annotations: {{deployment.kubernetes.io/revision: '{revision}'}}, ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: x, uid: {owner}, controller: true}}]}}\nspec: {{selector: {{}}, template: {{spec: {{containers: [{{name: web, image: '{image}'}}]}}}}}}"
        ))
    }

    #[test]
    fn the_new_replicaset_is_found_by_owner_revision_and_template() {
        let dep: Deployment = yaml(DEP);
        let old = replicaset("web-old", "rs1", "d1", "1", "web:1");
        let new = replicaset("web-abc", "rs2", "d1", "2", "web:2");
        let foreign = replicaset("other", "rs3", "d9", "2", "web:2");
        let rss = vec![Arc::new(foreign), Arc::new(old), Arc::new(new)];
        let rs = new_replicaset(&dep, &rss).expect("found");
        assert_eq!(rs.name_any(), "web-abc");
        let mine = Arc::new(pod("ContainerCreating", 0));
        let mut stranger = pod("ContainerCreating", 0);
        stranger.metadata.labels = Some([("app".to_string(), "other".to_string())].into());
        let pods = vec![mine, Arc::new(stranger)];
        assert_eq!(new_pods(&dep, rs, &pods).len(), 1);
    }

    #[test]
    fn a_rollback_is_never_judged_on_the_failed_replicaset() {
        // Just rolled back to web:1: the Deployment's template is web:1 while its revision
        // annotation (or a trailing ReplicaSet cache) still names the failed web:2 revision.
        let mut dep: Deployment = yaml(DEP);
        dep.spec.as_mut().expect("spec").template = yaml(
            "{metadata: {labels: {app: web}}, spec: {containers: [{name: web, image: 'web:1'}]}}",
        );
        let failed = replicaset("web-abc", "rs2", "d1", "2", "web:2");
        let restored = replicaset("web-old", "rs1", "d1", "1", "web:1");
        let rss = vec![Arc::new(failed), Arc::new(restored)];
        assert!(new_replicaset(&dep, &rss).is_none());
        // Once the restored ReplicaSet carries the new revision, it is the one judged.
        let restored = replicaset("web-old", "rs1", "d1", "2", "web:1");
        let rss = vec![Arc::new(restored)];
        assert_eq!(
            new_replicaset(&dep, &rss).map(|r| r.name_any()).as_deref(),
            Some("web-old")
        );
    }

    #[test]
    fn paused_and_empty_deployments_are_told_apart_from_healthy_ones() {
        let mut dep: Deployment = yaml(DEP);
        dep.spec.as_mut().expect("spec").paused = Some(true);
        assert_eq!(
            run(&dep, 2, &[]),
            Health::Failed {
                reason: "DeploymentPaused".into(),
                message: "Deployment is paused".into()
            }
        );
        let mut dep: Deployment = yaml(DEP);
        dep.spec.as_mut().expect("spec").replicas = Some(0);
        let st = dep.status.as_mut().expect("status");
        st.replicas = Some(0);
        st.updated_replicas = Some(0);
        st.available_replicas = Some(0);
        assert_eq!(run(&dep, 2, &[]), Health::NoReplicas);
        // Not before the controller observed the patch.
        assert!(matches!(run(&dep, 3, &[]), Health::Progressing(_)));
    }
}
