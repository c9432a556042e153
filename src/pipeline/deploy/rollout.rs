//! Rollout health, judged as `kubectl rollout status` judges it (observedGeneration first), plus
//! failing fast from the new ReplicaSet's pods with the pod's own reason. The judgement is a
//! pure function over compact states of the Deployment, its ReplicaSets and pods: only what
//! judging and drift need, kept per object by [`super::cache`] as watch events arrive.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use tokio::time::Instant;

pub use super::workload::WorkloadState;
use super::workload::{template_images, Progress, REVISION};
use crate::domain::Images;

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Still going; the text says what it waits for.
    Progressing(String),
    Healthy,
    /// Applied, but nothing proved the images healthy (0 replicas or nodes, OnDelete); the
    /// text says why.
    Unverified(String),
    /// A CronJob's images written: they run at its next schedule, nothing to judge now.
    Applied(String),
    /// Failed: a reason (`ImagePullBackOff`, `ProgressDeadlineExceeded`, …) and the message
    /// the cluster gave.
    Failed {
        reason: String,
        message: String,
    },
    /// The workload is gone: no verdict on the version.
    Disappeared,
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

/// Waiting reasons that are failures once they persist for the pull grace.
const GRACED: &str = "ErrImagePull";

/// What judging needs of a ReplicaSet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaSetState {
    pub uid: String,
    /// The controlling Deployment's uid.
    pub owner: Option<String>,
    pub revision: Option<String>,
    pub images: Images,
}

/// What judging needs of a pod: its controller and its containers that are waiting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodState {
    pub name: String,
    /// The controlling ReplicaSet's (or StatefulSet's, DaemonSet's) uid.
    pub owner: Option<String>,
    /// Its containers' images: which template it runs.
    pub images: Images,
    /// The Ready condition is true.
    pub ready: bool,
    pub waiting: Vec<Waiting>,
}

/// One container waiting, with the kubelet's reason and message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Waiting {
    pub container: String,
    pub reason: String,
    pub message: String,
    pub restarts: i32,
}

pub fn controller_uid(refs: &[OwnerReference]) -> Option<String> {
    refs.iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

impl From<&ReplicaSet> for ReplicaSetState {
    fn from(rs: &ReplicaSet) -> Self {
        ReplicaSetState {
            uid: rs.metadata.uid.clone().unwrap_or_default(),
            owner: controller_uid(rs.owner_references()),
            revision: rs.annotations().get(REVISION).cloned(),
            images: template_images(rs.spec.as_ref().and_then(|s| s.template.as_ref())),
        }
    }
}

impl From<&Pod> for PodState {
    fn from(pod: &Pod) -> Self {
        let waiting = pod
            .status
            .iter()
            .flat_map(|s| {
                let init = s.init_container_statuses.iter().flatten();
                init.chain(s.container_statuses.iter().flatten())
            })
            .filter_map(|cs| {
                let w = cs.state.as_ref()?.waiting.as_ref()?;
                let reason = w.reason.clone().unwrap_or_default();
                Some(Waiting {
                    container: cs.name.clone(),
                    message: w.message.clone().unwrap_or_else(|| reason.clone()),
                    reason,
                    restarts: cs.restart_count,
                })
            })
            .collect();
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        PodState {
            name: pod.name_any(),
            owner: controller_uid(pod.owner_references()),
            images: pod
                .spec
                .iter()
                .flat_map(|s| &s.containers)
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect(),
            ready,
            waiting,
        }
    }
}

/// The Deployment's current ReplicaSet: owned by it, carrying the Deployment's revision, and
/// running the template's own images. The last check matters while caches trail each other: a
/// Deployment just rolled back may still name the failed ReplicaSet's revision, and a verdict
/// must only ever be made on the pods of the template being judged.
pub fn new_replicaset<'a>(
    dep: &WorkloadState,
    rss: impl IntoIterator<Item = &'a ReplicaSetState>,
) -> Option<&'a ReplicaSetState> {
    let Progress::Deployment {
        revision: Some(revision),
        ..
    } = &dep.progress
    else {
        return None;
    };
    rss.into_iter().find(|rs| {
        rs.owner.as_deref() == Some(dep.uid.as_str())
            && rs.revision.as_ref() == Some(revision)
            && rs.images == dep.images
    })
}

/// The pods a StatefulSet or DaemonSet runs its current template in: owned by it and running
/// the template's own images (never the pods of a template being replaced).
pub fn template_pods<'a>(
    workload: &WorkloadState,
    pods: impl IntoIterator<Item = &'a PodState>,
) -> Vec<&'a PodState> {
    pods.into_iter()
        .filter(|p| {
            p.owner.as_deref() == Some(workload.uid.as_str()) && p.images == workload.images
        })
        .collect()
}

/// Waiting reasons a pod does not recover from by itself: its container will not start until
/// the pod is replaced.
const CANNOT_RECOVER: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "ErrImageNeverPull",
    "RunContainerError",
];

impl PodState {
    /// A container waits for a reason it does not recover from by itself.
    pub fn cannot_recover(&self) -> bool {
        self.waiting
            .iter()
            .any(|w| CANNOT_RECOVER.contains(&w.reason.as_str()))
    }
}

/// The pods a forced rollback deletes: a StatefulSet's pods that are not ready, run another
/// template than its own, and will not recover by themselves — pods of `replaced` (the
/// template a rollback replaces, whatever their state: a hung pod never gets ready) or pods in
/// a state they do not leave ([`PodState::cannot_recover`]). With `OrderedReady`, the
/// controller waits for them forever; deleting them lets it recreate them from the template
/// now written (Kubernetes' documented forced rollback). A pod that is only starting (of the
/// previous version, say, replaying its log) is waited for, as the controller does. Empty for
/// every other kind and policy.
pub fn stuck_pods<'a>(
    workload: &WorkloadState,
    replaced: Option<&Images>,
    pods: impl IntoIterator<Item = &'a PodState>,
) -> Vec<&'a PodState> {
    if !workload.holds_stuck_pods() {
        return Vec::new();
    }
    pods.into_iter()
        .filter(|p| {
            p.owner.as_deref() == Some(workload.uid.as_str())
                && !p.ready
                && p.images != workload.images
                && (replaced == Some(&p.images) || p.cannot_recover())
        })
        .collect()
}

/// The images someone else wrote after depwatch's write at `generation`, if any: the
/// workload moved past that generation and a container depwatch set runs another image.
/// (A later change that kept depwatch's images, such as an added annotation, is still
/// depwatch's rollout.)
pub fn changed_outside(dep: &WorkloadState, generation: i64, applied: &Images) -> Option<Images> {
    let moved = dep.generation > generation;
    let differs = applied
        .iter()
        .any(|(c, img)| dep.images.get(c).is_some_and(|live| live != img));
    (moved && differs).then(|| dep.images.clone())
}

/// Judge a rollout. `generation` is the generation our patch produced; `pods` are the pods of
/// the template being judged; `first_seen` remembers when each pod's `ErrImagePull` was first
/// seen, for its grace.
pub fn judge(
    w: &WorkloadState,
    generation: i64,
    pods: &[&PodState],
    fail_fast: FailFast,
    first_seen: &mut HashMap<String, Instant>,
    now: Instant,
) -> Health {
    if let Progress::CronJob { suspended } = w.progress {
        return Health::Applied(match suspended {
            false => "applied; the image runs at the CronJob's next schedule".into(),
            true => "applied; the CronJob is suspended, so nothing runs the image".into(),
        });
    }
    if w.generation < generation || w.observed_generation < w.generation {
        return Health::Progressing(format!(
            "waiting for the {} controller to observe the update",
            w.kind
        ));
    }
    if let Some(stop) = before_pods(&w.progress) {
        return stop;
    }
    if let Some(failed) = pod_failure(pods, fail_fast, first_seen, now) {
        return failed;
    }
    counts(&w.progress)
}

/// What a kind's status says before any pod is looked at: paused, past its deadline, or
/// updating only when pods are deleted.
fn before_pods(progress: &Progress) -> Option<Health> {
    match progress {
        Progress::Deployment { paused: true, .. } => Some(Health::Failed {
            reason: "DeploymentPaused".into(),
            message: "Deployment is paused".into(),
        }),
        Progress::Deployment {
            deadline_exceeded: Some(message),
            ..
        } => Some(Health::Failed {
            reason: "ProgressDeadlineExceeded".into(),
            message: message.clone(),
        }),
        Progress::StatefulSet {
            on_delete: true, ..
        }
        | Progress::DaemonSet {
            on_delete: true, ..
        } => Some(Health::Unverified(
            "patched; pods update when deleted (updateStrategy OnDelete)".into(),
        )),
        _ => None,
    }
}

/// The counts `kubectl rollout status` compares, per kind.
fn counts(progress: &Progress) -> Health {
    match *progress {
        Progress::Deployment {
            desired,
            replicas,
            updated,
            available,
            ..
        } => deployment_counts(desired, replicas, updated, available),
        Progress::StatefulSet {
            desired,
            partition,
            ready,
            updated,
            ref current_revision,
            ref update_revision,
            ..
        } => statefulset_counts(
            desired,
            partition,
            ready,
            updated,
            current_revision != update_revision && update_revision.is_some(),
        ),
        Progress::DaemonSet {
            desired,
            updated,
            available,
            ..
        } => daemonset_counts(desired, updated, available),
        Progress::CronJob { .. } => Health::Applied("applied".into()),
    }
}

/// `kubectl rollout status statefulset`: every replica ready, then the partition's share
/// updated (partitioned), or every pod at the update revision (`revisions_differ`: not yet).
fn statefulset_counts(
    desired: i32,
    partition: i32,
    ready: i32,
    updated: i32,
    revisions_differ: bool,
) -> Health {
    if desired == 0 {
        return Health::Unverified("0 replicas: no pod ran the images".into());
    }
    if ready < desired {
        return Health::Progressing(format!("{ready} of {desired} pods ready"));
    }
    if partition > 0 {
        let due = desired - partition;
        if due <= 0 {
            return Health::Unverified(format!(
                "partition {partition} leaves none of {desired} pods to update"
            ));
        }
        return match updated < due {
            true => Health::Progressing(format!(
                "{updated} of {due} pods updated (partition {partition})"
            )),
            false => Health::Healthy,
        };
    }
    match revisions_differ {
        true => Health::Progressing(format!("{updated} of {desired} pods at the new revision")),
        false => Health::Healthy,
    }
}

/// `kubectl rollout status daemonset`: every scheduled pod updated, then available.
fn daemonset_counts(desired: i32, updated: i32, available: i32) -> Health {
    if desired == 0 {
        return Health::Unverified("0 nodes scheduled: no pod ran the images".into());
    }
    if updated < desired {
        return Health::Progressing(format!("{updated} of {desired} updated pods scheduled"));
    }
    if available < desired {
        return Health::Progressing(format!("{available} of {desired} pods available"));
    }
    Health::Healthy
}

fn deployment_counts(desired: i32, replicas: i32, updated: i32, available: i32) -> Health {
    if desired == 0 {
        return Health::Unverified("the Deployment has 0 replicas".into());
    }
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

/// Fail fast from the new pods' own container states.
fn pod_failure(
    pods: &[&PodState],
    fail_fast: FailFast,
    first_seen: &mut HashMap<String, Instant>,
    now: Instant,
) -> Option<Health> {
    for pod in pods {
        for w in &pod.waiting {
            let graced = w.reason == GRACED && {
                let since = *first_seen.entry(pod.name.clone()).or_insert(now);
                now.duration_since(since) >= fail_fast.pull_grace
            };
            let failed = DETERMINISTIC.contains(&w.reason.as_str())
                || w.reason == "ImagePullBackOff"
                || graced
                || (w.reason == "CrashLoopBackOff" && w.restarts >= fail_fast.crash_restarts);
            if failed {
                return Some(Health::Failed {
                    reason: w.reason.clone(),
                    message: format!("pod {} container {}: {}", pod.name, w.container, w.message),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

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
        let pods: Vec<PodState> = pods.iter().map(|p| PodState::from(*p)).collect();
        let pods: Vec<&PodState> = pods.iter().collect();
        judge(
            &WorkloadState::from(dep),
            generation,
            &pods,
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
        let dep = WorkloadState::from(&dep);
        let p = PodState::from(&pod("ErrImagePull", 0));
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

    fn replicaset(
        name: &str,
        uid: &str,
        owner: &str,
        revision: &str,
        image: &str,
    ) -> ReplicaSetState {
        ReplicaSetState::from(&yaml::<ReplicaSet>(&format!(
            "metadata: {{name: {name}, uid: {uid}, annotations: {{deployment.kubernetes.io/revision: '{revision}'}}, ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: x, uid: {owner}, controller: true}}]}}\nspec: {{selector: {{}}, template: {{spec: {{containers: [{{name: web, image: '{image}'}}]}}}}}}"
        )))
    }

    #[test]
    fn the_new_replicaset_is_found_by_owner_revision_and_template() {
        let dep = WorkloadState::from(&yaml::<Deployment>(DEP));
        let old = replicaset("web-old", "rs1", "d1", "1", "web:1");
        let new = replicaset("web-abc", "rs2", "d1", "2", "web:2");
        let foreign = replicaset("other", "rs3", "d9", "2", "web:2");
        let rss = [foreign, old, new];
        let rs = new_replicaset(&dep, &rss).expect("found");
        assert_eq!(rs.uid, "rs2");
        let p = PodState::from(&pod("ContainerCreating", 0));
        assert_eq!(p.owner.as_deref(), Some("rs2"));
        assert_eq!(p.waiting[0].reason, "ContainerCreating");
    }

    #[test]
    fn a_rollback_is_never_judged_on_the_failed_replicaset() {
        // Just rolled back to web:1: the Deployment's template is web:1 while its revision
        // annotation (or a trailing ReplicaSet cache) still names the failed web:2 revision.
        let mut dep: Deployment = yaml(DEP);
        dep.spec.as_mut().expect("spec").template = yaml(
            "{metadata: {labels: {app: web}}, spec: {containers: [{name: web, image: 'web:1'}]}}",
        );
        let dep = WorkloadState::from(&dep);
        let failed = replicaset("web-abc", "rs2", "d1", "2", "web:2");
        let restored = replicaset("web-old", "rs1", "d1", "1", "web:1");
        assert!(new_replicaset(&dep, &[failed, restored]).is_none());
        // Once the restored ReplicaSet carries the new revision, it is the one judged.
        let restored = replicaset("web-old", "rs1", "d1", "2", "web:1");
        assert_eq!(
            new_replicaset(&dep, &[restored]).map(|r| r.uid.as_str()),
            Some("rs1")
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
        assert_eq!(
            run(&dep, 2, &[]),
            Health::Unverified("the Deployment has 0 replicas".into())
        );
        // Not before the controller observed the patch.
        assert!(matches!(run(&dep, 3, &[]), Health::Progressing(_)));
    }

    fn sts(spec: &str, status: &str) -> WorkloadState {
        WorkloadState::from(&yaml::<StatefulSet>(&format!(
            "metadata: {{name: db, uid: s1, generation: 2}}\nspec: {{replicas: 3, serviceName: db, selector: {{}}, template: {{spec: {{containers: [{{name: db, image: 'db:2'}}]}}}}, {spec}}}\nstatus: {{replicas: 3, observedGeneration: 2, {status}}}"
        )))
    }

    fn judge_now(w: &WorkloadState, pods: &[&PodState]) -> Health {
        judge(
            w,
            2,
            pods,
            FailFast::default(),
            &mut HashMap::new(),
            Instant::now(),
        )
    }

    #[test]
    fn statefulsets_are_judged_as_kubectl_judges_them() {
        let rev = "currentRevision: db-1, updateRevision: db-2";
        let cases: &[(&str, &str, Health)] = &[
            (
                "podManagementPolicy: OrderedReady",
                "readyReplicas: 2, updatedReplicas: 2, currentRevision: db-1, updateRevision: db-2",
                Health::Progressing("2 of 3 pods ready".into()),
            ),
            (
                "podManagementPolicy: OrderedReady",
                &format!("readyReplicas: 3, updatedReplicas: 2, {rev}"),
                Health::Progressing("2 of 3 pods at the new revision".into()),
            ),
            (
                "podManagementPolicy: OrderedReady",
                "readyReplicas: 3, updatedReplicas: 3, currentRevision: db-2, updateRevision: db-2",
                Health::Healthy,
            ),
            (
                "updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 2}}",
                &format!("readyReplicas: 3, updatedReplicas: 0, {rev}"),
                Health::Progressing("0 of 1 pods updated (partition 2)".into()),
            ),
            (
                "updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 2}}",
                &format!("readyReplicas: 3, updatedReplicas: 1, {rev}"),
                Health::Healthy,
            ),
            (
                "updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 3}}",
                &format!("readyReplicas: 3, {rev}"),
                Health::Unverified("partition 3 leaves none of 3 pods to update".into()),
            ),
            (
                "updateStrategy: {type: OnDelete}",
                &format!("readyReplicas: 3, {rev}"),
                Health::Unverified(
                    "patched; pods update when deleted (updateStrategy OnDelete)".into(),
                ),
            ),
        ];
        for (spec, status, want) in cases {
            assert_eq!(
                &judge_now(&sts(spec, status), &[]),
                want,
                "{spec} / {status}"
            );
        }
        let lagging = WorkloadState {
            observed_generation: 1,
            ..sts("podManagementPolicy: Parallel", "readyReplicas: 3")
        };
        assert_eq!(
            judge_now(&lagging, &[]),
            Health::Progressing(
                "waiting for the statefulset controller to observe the update".into()
            )
        );
    }

    fn ds(status: &str) -> WorkloadState {
        WorkloadState::from(&yaml::<DaemonSet>(&format!(
            "metadata: {{name: agent, uid: d1, generation: 2}}\nspec: {{selector: {{}}, template: {{spec: {{containers: [{{name: agent, image: 'agent:2'}}]}}}}}}\nstatus: {{currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 0, observedGeneration: 2, {status}}}"
        )))
    }

    #[test]
    fn daemonsets_are_judged_as_kubectl_judges_them() {
        let cases: &[(&str, Health)] = &[
            (
                "desiredNumberScheduled: 3, updatedNumberScheduled: 1, numberAvailable: 3",
                Health::Progressing("1 of 3 updated pods scheduled".into()),
            ),
            (
                "desiredNumberScheduled: 3, updatedNumberScheduled: 3, numberAvailable: 2",
                Health::Progressing("2 of 3 pods available".into()),
            ),
            (
                "desiredNumberScheduled: 3, updatedNumberScheduled: 3, numberAvailable: 3",
                Health::Healthy,
            ),
            (
                "desiredNumberScheduled: 0",
                Health::Unverified("0 nodes scheduled: no pod ran the images".into()),
            ),
        ];
        for (status, want) in cases {
            assert_eq!(&judge_now(&ds(status), &[]), want, "{status}");
        }
    }

    fn owned_pod(owner: &str, image: &str, ready: bool, waiting: &str) -> PodState {
        let ready = if ready { "True" } else { "False" };
        PodState::from(&yaml::<Pod>(&format!(
            "metadata: {{name: p-{image}, ownerReferences: [{{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: {owner}, controller: true}}]}}\nspec: {{containers: [{{name: db, image: '{image}'}}]}}\nstatus: {{conditions: [{{type: Ready, status: '{ready}'}}], containerStatuses: [{{name: db, image: '{image}', imageID: '', ready: false, restartCount: 3, state: {{waiting: {{reason: {waiting}, message: back-off}}}}}}]}}"
        )))
    }

    #[test]
    fn a_statefulset_fails_fast_on_its_template_pods_and_deletes_only_stuck_old_ones() {
        let w = sts(
            "podManagementPolicy: OrderedReady",
            "readyReplicas: 2, updatedReplicas: 1, currentRevision: db-1, updateRevision: db-2",
        );
        let new_crashing = owned_pod("s1", "db:2", false, "CrashLoopBackOff");
        let old_ready = owned_pod("s1", "db:1", true, "None");
        let foreign = owned_pod("s9", "db:2", false, "CrashLoopBackOff");
        let all = [new_crashing.clone(), old_ready.clone(), foreign];
        let pods = template_pods(&w, &all);
        assert_eq!(pods.len(), 1);
        assert!(
            matches!(judge_now(&w, &pods), Health::Failed { reason, .. } if reason == "CrashLoopBackOff")
        );
        // Rolled back to db:1: the crashing db:2 pod holds an OrderedReady StatefulSet.
        let restored = WorkloadState {
            images: [("db".to_string(), "db:1".to_string())]
                .into_iter()
                .collect(),
            ..w.clone()
        };
        let failed: Images = [("db".to_string(), "db:2".to_string())]
            .into_iter()
            .collect();
        let stuck = |replaced: Option<&Images>, pods: &[PodState]| -> Vec<String> {
            stuck_pods(&restored, replaced, pods)
                .iter()
                .map(|p| p.name.clone())
                .collect()
        };
        assert_eq!(stuck(Some(&failed), &all), vec!["p-db:2"]);
        assert_eq!(stuck(None, &all), vec!["p-db:2"], "crash-looping: deleted");
        // Pods that are only starting: one of the replaced template goes (a rollback), one of
        // any other template is waited for.
        let starting_failed = owned_pod("s1", "db:2", false, "ContainerCreating");
        let starting_other = owned_pod("s1", "db:0", false, "ContainerCreating");
        let hung = owned_pod("s1", "db:2", false, "None");
        let pods = [starting_failed, starting_other.clone(), hung];
        assert_eq!(stuck(Some(&failed), &pods), vec!["p-db:2", "p-db:2"]);
        assert!(
            stuck(None, &pods).is_empty(),
            "a forward deploy deletes no starting pod"
        );
        let pulling = owned_pod("s1", "db:0", false, "ImagePullBackOff");
        assert_eq!(stuck(None, &[starting_other, pulling]), vec!["p-db:0"]);
        let parallel = WorkloadState {
            progress: sts("podManagementPolicy: Parallel", "readyReplicas: 2").progress,
            ..restored.clone()
        };
        assert!(stuck_pods(&parallel, Some(&failed), &all).is_empty());
    }
}
