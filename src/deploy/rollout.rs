//! Rollout health, judged as `kubectl rollout status` judges it (observedGeneration first), plus
//! failing fast from the new ReplicaSet's pods with the pod's own reason. The judgement is a
//! pure function over compact states of the Deployment, its ReplicaSets and pods: only what
//! judging and drift need, kept per object by [`super::cache`] as watch events arrive.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
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

/// Waiting reasons that are failures once they persist for the pull grace.
const GRACED: &str = "ErrImagePull";

/// What judging and drift need of a Deployment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentState {
    pub uid: String,
    pub generation: i64,
    pub observed_generation: i64,
    /// `spec.replicas` (1 when unset, as the API server defaults it).
    pub desired: i32,
    pub paused: bool,
    pub revision: Option<String>,
    /// The template's images: what is deployed.
    pub images: Images,
    pub replicas: i32,
    pub updated: i32,
    pub available: i32,
    /// The Progressing condition's message when its reason is ProgressDeadlineExceeded.
    pub deadline_exceeded: Option<String>,
    /// Argo CD, Flux or Helm, when one of them manages it.
    pub owner: Option<super::owner::Owner>,
}

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
    /// The controlling ReplicaSet's uid.
    pub owner: Option<String>,
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

fn template_images(t: Option<&PodTemplateSpec>) -> Images {
    t.and_then(|t| t.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn container_images(dep: &Deployment) -> Images {
    template_images(dep.spec.as_ref().map(|s| &s.template))
}

impl From<&Deployment> for DeploymentState {
    fn from(dep: &Deployment) -> Self {
        let spec = dep.spec.as_ref();
        let status = dep.status.as_ref();
        let deadline_exceeded = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
            .filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            .map(|c| {
                c.message
                    .clone()
                    .unwrap_or_else(|| "the rollout exceeded its progress deadline".into())
            });
        DeploymentState {
            uid: dep.metadata.uid.clone().unwrap_or_default(),
            generation: dep.metadata.generation.unwrap_or(0),
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            paused: spec.and_then(|s| s.paused).unwrap_or(false),
            revision: dep.annotations().get(REVISION).cloned(),
            images: container_images(dep),
            replicas: status.and_then(|s| s.replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            deadline_exceeded,
            owner: super::owner::owner_of(
                dep.labels(),
                dep.annotations(),
                &dep.metadata
                    .managed_fields
                    .iter()
                    .flatten()
                    .filter_map(|m| m.manager.clone())
                    .collect::<Vec<_>>(),
            ),
        }
    }
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
        PodState {
            name: pod.name_any(),
            owner: controller_uid(pod.owner_references()),
            waiting,
        }
    }
}

/// The Deployment's current ReplicaSet: owned by it, carrying the Deployment's revision, and
/// running the template's own images. The last check matters while caches trail each other: a
/// Deployment just rolled back may still name the failed ReplicaSet's revision, and a verdict
/// must only ever be made on the pods of the template being judged.
pub fn new_replicaset<'a>(
    dep: &DeploymentState,
    rss: impl IntoIterator<Item = &'a ReplicaSetState>,
) -> Option<&'a ReplicaSetState> {
    let revision = dep.revision.as_ref()?;
    rss.into_iter().find(|rs| {
        rs.owner.as_deref() == Some(dep.uid.as_str())
            && rs.revision.as_ref() == Some(revision)
            && rs.images == dep.images
    })
}

/// The images someone else wrote after depwatch's write at `generation`, if any: the
/// Deployment moved past that generation and a container depwatch set runs another image.
/// (A later change that kept depwatch's images, such as an added annotation, is still
/// depwatch's rollout.)
pub fn changed_outside(dep: &DeploymentState, generation: i64, applied: &Images) -> Option<Images> {
    let moved = dep.generation > generation;
    let differs = applied
        .iter()
        .any(|(c, img)| dep.images.get(c).is_some_and(|live| live != img));
    (moved && differs).then(|| dep.images.clone())
}

/// Judge a rollout. `generation` is the Deployment generation our patch produced;
/// `first_seen` remembers when each pod's `ErrImagePull` was first seen, for its grace.
pub fn judge(
    dep: &DeploymentState,
    generation: i64,
    new_pods: &[&PodState],
    fail_fast: FailFast,
    first_seen: &mut HashMap<String, Instant>,
    now: Instant,
) -> Health {
    if dep.generation < generation || dep.observed_generation < dep.generation {
        return Health::Progressing(
            "waiting for the deployment controller to observe the update".into(),
        );
    }
    if dep.paused {
        return Health::Failed {
            reason: "DeploymentPaused".into(),
            message: "Deployment is paused".into(),
        };
    }
    if let Some(message) = &dep.deadline_exceeded {
        return Health::Failed {
            reason: "ProgressDeadlineExceeded".into(),
            message: message.clone(),
        };
    }
    if let Some(failed) = pod_failure(new_pods, fail_fast, first_seen, now) {
        return failed;
    }
    if dep.desired == 0 {
        return Health::NoReplicas;
    }
    let (desired, updated) = (dep.desired, dep.updated);
    if updated < desired {
        return Health::Progressing(format!("{updated} of {desired} new replicas updated"));
    }
    if dep.replicas > updated {
        return Health::Progressing(format!(
            "{} old replicas pending termination",
            dep.replicas - updated
        ));
    }
    if dep.available < updated {
        return Health::Progressing(format!(
            "{} of {updated} updated replicas available",
            dep.available
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
            &DeploymentState::from(dep),
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
        let dep = DeploymentState::from(&dep);
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
        let dep = DeploymentState::from(&yaml::<Deployment>(DEP));
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
        let dep = DeploymentState::from(&dep);
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
        assert_eq!(run(&dep, 2, &[]), Health::NoReplicas);
        // Not before the controller observed the patch.
        assert!(matches!(run(&dep, 3, &[]), Health::Progressing(_)));
    }
}
