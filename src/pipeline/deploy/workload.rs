//! What judging, drift and planning need of a workload of any kind, read from the API's own
//! objects: the template's images, the generations, and the status fields `kubectl rollout
//! status` reads for that kind. One compact state per workload, kept by [`super::cache`].

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::domain::{Images, WorkloadKind};

pub(crate) const REVISION: &str = "deployment.kubernetes.io/revision";

/// A workload kind's API type, as the deploy path uses any kind: read, patch, list and watch
/// through kube's typed API, and the state judging needs. The kinds are listed once, in
/// [`visit`]: adding one is its [`WorkloadKind`] variant, a `From` for its state and an arm
/// there (its rollout rules live in `judge`).
pub(super) trait Kind: super::cache::Cached {
    const KIND: WorkloadKind;
    fn state(&self) -> WorkloadState;
}

impl Kind for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn state(&self) -> WorkloadState {
        WorkloadState::from(self)
    }
}

impl Kind for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn state(&self) -> WorkloadState {
        WorkloadState::from(self)
    }
}

impl Kind for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn state(&self) -> WorkloadState {
        WorkloadState::from(self)
    }
}

impl Kind for CronJob {
    const KIND: WorkloadKind = WorkloadKind::CronJob;
    fn state(&self) -> WorkloadState {
        WorkloadState::from(self)
    }
}

/// Something done with a kind's API type, whichever kind it is.
pub(super) trait KindVisitor {
    type Out;
    fn visit<K: Kind>(self) -> Self::Out;
}

/// Do `visitor` with the API type of `kind`: the one place the kinds meet their types.
pub(super) fn visit<V: KindVisitor>(kind: WorkloadKind, visitor: V) -> V::Out {
    match kind {
        WorkloadKind::Deployment => visitor.visit::<Deployment>(),
        WorkloadKind::StatefulSet => visitor.visit::<StatefulSet>(),
        WorkloadKind::DaemonSet => visitor.visit::<DaemonSet>(),
        WorkloadKind::CronJob => visitor.visit::<CronJob>(),
    }
}

/// The API group and resource of a kind, as RBAC names them.
pub(super) fn resource(kind: WorkloadKind) -> (String, String) {
    struct Names;
    impl KindVisitor for Names {
        type Out = (String, String);
        fn visit<K: Kind>(self) -> Self::Out {
            (K::group(&()).into_owned(), K::plural(&()).into_owned())
        }
    }
    visit(kind, Names)
}

/// What judging and drift need of one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadState {
    pub kind: WorkloadKind,
    pub uid: String,
    /// The version of the object this state was read at: a PATCH decided on it carries it,
    /// so the API server refuses the PATCH when anything was written since.
    pub resource_version: String,
    pub generation: i64,
    pub observed_generation: i64,
    /// The template's images: what is deployed.
    pub images: Images,
    /// Argo CD, Flux or Helm, when one of them manages it.
    pub owner: Option<super::owner::Owner>,
    /// What the kubelet pulls its images with: the template's `imagePullSecrets` and
    /// ServiceAccount (`default` when unset).
    pub pull: Pull,
    pub progress: Progress,
}

/// The pull credentials a pod template names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pull {
    pub secrets: Vec<String>,
    pub service_account: String,
}

/// The status fields of each kind's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Deployment {
        /// `spec.replicas` (1 when unset, as the API server defaults it).
        desired: i32,
        paused: bool,
        revision: Option<String>,
        replicas: i32,
        updated: i32,
        available: i32,
        /// The Progressing condition's message when its reason is ProgressDeadlineExceeded.
        deadline_exceeded: Option<String>,
    },
    StatefulSet {
        desired: i32,
        /// `updateStrategy.rollingUpdate.partition`: ordinals below it keep the old revision.
        partition: i32,
        /// `updateStrategy: OnDelete`: pods change only when deleted.
        on_delete: bool,
        /// `podManagementPolicy: OrderedReady` (the default): a pod that never gets ready
        /// holds the rollout, and a rollback, until it is deleted.
        ordered: bool,
        ready: i32,
        updated: i32,
        current_revision: Option<String>,
        update_revision: Option<String>,
    },
    DaemonSet {
        /// `desiredNumberScheduled`: one pod per node the DaemonSet runs on.
        desired: i32,
        on_delete: bool,
        updated: i32,
        available: i32,
    },
    CronJob {
        suspended: bool,
    },
}

impl Default for WorkloadState {
    fn default() -> Self {
        WorkloadState {
            kind: WorkloadKind::Deployment,
            uid: String::new(),
            resource_version: String::new(),
            generation: 0,
            observed_generation: 0,
            images: Images::default(),
            owner: None,
            pull: Pull::default(),
            progress: Progress::Deployment {
                desired: 1,
                paused: false,
                revision: None,
                replicas: 0,
                updated: 0,
                available: 0,
                deadline_exceeded: None,
            },
        }
    }
}

impl WorkloadState {
    /// A paused Deployment: a patch would roll nothing out.
    pub fn paused(&self) -> bool {
        matches!(self.progress, Progress::Deployment { paused: true, .. })
    }

    /// A StatefulSet whose stuck pods only a deletion replaces.
    pub fn holds_stuck_pods(&self) -> bool {
        matches!(
            self.progress,
            Progress::StatefulSet {
                ordered: true,
                on_delete: false,
                ..
            }
        )
    }
}

fn template_pull(t: Option<&PodTemplateSpec>) -> Pull {
    let spec = t.and_then(|t| t.spec.as_ref());
    Pull {
        secrets: spec
            .and_then(|s| s.image_pull_secrets.as_ref())
            .into_iter()
            .flatten()
            .map(|r| r.name.clone())
            .filter(|n| !n.is_empty())
            .collect(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
    }
}

pub fn template_images(t: Option<&PodTemplateSpec>) -> Images {
    t.and_then(|t| t.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// The fields every kind shares.
fn common(
    kind: WorkloadKind,
    meta: &ObjectMeta,
    observed: Option<i64>,
    template: Option<&PodTemplateSpec>,
    progress: Progress,
) -> WorkloadState {
    let managers: Vec<String> = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    let empty = Default::default();
    WorkloadState {
        kind,
        uid: meta.uid.clone().unwrap_or_default(),
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        generation: meta.generation.unwrap_or(0),
        observed_generation: observed.unwrap_or(0),
        images: template_images(template),
        pull: template_pull(template),
        owner: super::owner::owner_of(
            &super::owner::tracked_as(
                kind.api_version(),
                kind.api_kind(),
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default(),
            ),
            meta.labels.as_ref().unwrap_or(&empty),
            meta.annotations.as_ref().unwrap_or(&empty),
            &managers,
        ),
        progress,
    }
}

impl From<&Deployment> for WorkloadState {
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
        let progress = Progress::Deployment {
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            paused: spec.and_then(|s| s.paused).unwrap_or(false),
            revision: dep.annotations().get(REVISION).cloned(),
            replicas: status.and_then(|s| s.replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            available: status.and_then(|s| s.available_replicas).unwrap_or(0),
            deadline_exceeded,
        };
        let observed = status.and_then(|s| s.observed_generation);
        let template = spec.map(|s| &s.template);
        common(
            WorkloadKind::Deployment,
            &dep.metadata,
            observed,
            template,
            progress,
        )
    }
}

impl From<&StatefulSet> for WorkloadState {
    fn from(sts: &StatefulSet) -> Self {
        let spec = sts.spec.as_ref();
        let status = sts.status.as_ref();
        let strategy = spec.and_then(|s| s.update_strategy.as_ref());
        let progress = Progress::StatefulSet {
            desired: spec.and_then(|s| s.replicas).unwrap_or(1),
            partition: strategy
                .and_then(|u| u.rolling_update.as_ref())
                .and_then(|r| r.partition)
                .unwrap_or(0),
            on_delete: strategy.and_then(|u| u.type_.as_deref()) == Some("OnDelete"),
            ordered: spec.and_then(|s| s.pod_management_policy.as_deref()) != Some("Parallel"),
            ready: status.and_then(|s| s.ready_replicas).unwrap_or(0),
            updated: status.and_then(|s| s.updated_replicas).unwrap_or(0),
            current_revision: status.and_then(|s| s.current_revision.clone()),
            update_revision: status.and_then(|s| s.update_revision.clone()),
        };
        let observed = status.and_then(|s| s.observed_generation);
        let template = spec.map(|s| &s.template);
        common(
            WorkloadKind::StatefulSet,
            &sts.metadata,
            observed,
            template,
            progress,
        )
    }
}

impl From<&DaemonSet> for WorkloadState {
    fn from(ds: &DaemonSet) -> Self {
        let spec = ds.spec.as_ref();
        let status = ds.status.as_ref();
        let strategy = spec.and_then(|s| s.update_strategy.as_ref());
        let progress = Progress::DaemonSet {
            desired: status.map(|s| s.desired_number_scheduled).unwrap_or(0),
            on_delete: strategy.and_then(|u| u.type_.as_deref()) == Some("OnDelete"),
            updated: status.and_then(|s| s.updated_number_scheduled).unwrap_or(0),
            available: status.and_then(|s| s.number_available).unwrap_or(0),
        };
        let observed = status.and_then(|s| s.observed_generation);
        let template = spec.map(|s| &s.template);
        common(
            WorkloadKind::DaemonSet,
            &ds.metadata,
            observed,
            template,
            progress,
        )
    }
}

impl From<&CronJob> for WorkloadState {
    fn from(cj: &CronJob) -> Self {
        let spec = cj.spec.as_ref();
        let template = spec
            .and_then(|s| s.job_template.spec.as_ref())
            .map(|j| &j.template);
        let progress = Progress::CronJob {
            suspended: spec.and_then(|s| s.suspend).unwrap_or(false),
        };
        // A CronJob has no controller that reports a generation: its spec is what runs next.
        let generation = cj.metadata.generation;
        common(
            WorkloadKind::CronJob,
            &cj.metadata,
            generation,
            template,
            progress,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_saphyr::from_str(s).expect("fixture parses")
    }

    #[test]
    fn each_kind_reads_its_own_template_and_status() {
        let sts: StatefulSet = yaml(
            "metadata: {name: db, uid: s1, generation: 3}\nspec: {replicas: 3, serviceName: db, selector: {}, updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 1}}, template: {spec: {serviceAccountName: db, imagePullSecrets: [{name: regcred}], containers: [{name: db, image: 'pg:16'}]}}}\nstatus: {replicas: 3, observedGeneration: 3, readyReplicas: 2, updatedReplicas: 1, currentRevision: db-a, updateRevision: db-b}",
        );
        let s = WorkloadState::from(&sts);
        assert_eq!(s.kind, WorkloadKind::StatefulSet);
        assert_eq!(s.images.to_string(), "db=pg:16");
        assert_eq!(
            s.progress,
            Progress::StatefulSet {
                desired: 3,
                partition: 1,
                on_delete: false,
                ordered: true,
                ready: 2,
                updated: 1,
                current_revision: Some("db-a".into()),
                update_revision: Some("db-b".into()),
            }
        );
        assert!(s.holds_stuck_pods());
        assert_eq!(
            s.pull,
            Pull {
                secrets: vec!["regcred".into()],
                service_account: "db".into()
            }
        );
        let ds: DaemonSet = yaml(
            "metadata: {name: agent, uid: d1, generation: 2}\nspec: {selector: {}, updateStrategy: {type: OnDelete}, template: {spec: {containers: [{name: agent, image: 'agent:1'}]}}}\nstatus: {currentNumberScheduled: 3, desiredNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, numberAvailable: 3, updatedNumberScheduled: 2, observedGeneration: 2}",
        );
        let d = WorkloadState::from(&ds);
        assert_eq!(
            d.progress,
            Progress::DaemonSet {
                desired: 3,
                on_delete: true,
                updated: 2,
                available: 3
            }
        );
        let cj: CronJob = yaml(
            "metadata: {name: report, uid: c1, generation: 4}\nspec: {schedule: '0 * * * *', jobTemplate: {spec: {template: {spec: {containers: [{name: report, image: 'report:2'}]}}}}}",
        );
        let c = WorkloadState::from(&cj);
        assert_eq!(c.images.to_string(), "report=report:2");
        assert_eq!(c.pull.service_account, "default");
        assert_eq!(c.observed_generation, 4);
        assert!(!c.paused() && !c.holds_stuck_pods());
    }
}
