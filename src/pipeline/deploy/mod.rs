//! Stage 5, deploying with the kube crate: ensure the namespace, read the Deployment, work out
//! the new images, patch only those images (strategic merge keyed by container name, field
//! manager `depwatch`, a `kubernetes.io/change-cause`), then judge the rollout from shared
//! watches, and roll back to the captured images when it fails.

pub mod access;
pub mod attempt;
pub mod cache;
pub mod drift;
pub mod lifecycle;
pub mod owner;
pub mod pull;
pub mod recorder;
pub mod rollout;
pub mod verify;
pub mod watches;
pub mod workload;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::depfile;
pub use crate::domain::Images;
use crate::domain::{DepSpec, Plan, ServiceKey, Shown, WaitOutcome, WorkloadKind};
use cache::Found;
use rollout::{FailFast, Health, WorkloadState};
use watches::Watches;

pub const FIELD_MANAGER: &str = "depwatch";

/// Settings of the deploy stage.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    /// `--namespaces` and `--allowed-images`: checked on the final images of every deploy.
    pub bounds: std::sync::Arc<crate::bounds::Bounds>,
    /// `--image-repo` / `ECR_REPO`.
    pub image_repo: Option<String>,
    pub rollout_timeout: Duration,
    pub fail_fast: FailFast,
    /// `--allow-owned`: patch workloads Argo CD, Flux or Helm manage anyway.
    pub allow_owned: bool,
    /// The registry pre-flight, unless `--registry-check off`.
    pub preflight: Option<crate::registry::Preflight>,
    /// `--ecr-pull-secret`: told which namespaces run which registries' images (never
    /// waited on), and the pre-flight's credentials for ECR.
    pub ecr: Option<crate::registry::ecr::EcrPullSecrets>,
    /// Without `--ecr-pull-secret`: the pre-flight's own AWS identity for ECR images.
    pub ecr_identity: Option<crate::registry::ecr::identity::EcrIdentity>,
    /// The API server's URL, for messages.
    pub server: String,
}

/// A per-deploy failure before or while writing to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(
        "no {} {name} in namespace {namespace}{}",
        kind.map_or("Deployment, StatefulSet, DaemonSet or CronJob named", WorkloadKind::api_kind),
        did_you_mean(suggestion)
    )]
    MissingWorkload {
        name: String,
        namespace: String,
        /// The kind the file asked for, if it did.
        kind: Option<WorkloadKind>,
        suggestion: Option<String>,
    },
    #[error("{} names {} in namespace {}: say which in the file, e.g. `kind: {}` with `version: …` (YAML form)", key.name, ambiguous(kinds), key.namespace, kinds.last().map_or("statefulset", |k| k.as_str()))]
    Ambiguous {
        key: ServiceKey,
        kinds: Vec<WorkloadKind>,
    },
    #[error("namespace {namespace} does not exist{}; depwatch never creates namespaces (the workload would not be there either)", did_you_mean(suggestion))]
    MissingNamespace {
        namespace: String,
        suggestion: Option<String>,
    },
    #[error(transparent)]
    Bounds(#[from] crate::bounds::BoundsError),
    #[error(transparent)]
    Fenced(#[from] crate::fence::Fenced),
    #[error("{} {key} is owned by {owner}: its next sync would undo depwatch's patch; change the image there (or start depwatch with --allow-owned to patch anyway)", kind.api_kind())]
    Owned {
        key: ServiceKey,
        kind: WorkloadKind,
        owner: owner::Owner,
    },
    #[error("{0}")]
    Resolve(#[from] depfile::ResolveError),
    /// The registry says an image is not there (or refuses the credentials): nothing patched.
    #[error("{0}")]
    Registry(String),
    /// The PATCH met a write made after what it was decided on (409 Conflict, or a template
    /// that no longer runs what depwatch expects): nothing was written over it.
    #[error("{} {key} was written after depwatch read it ({why}): nothing was written over it", kind.api_kind())]
    Conflict {
        key: ServiceKey,
        kind: WorkloadKind,
        why: String,
    },
    #[error("{}", describe_kube(action, server, source))]
    Kube {
        action: String,
        server: String,
        source: kube::Error,
    },
}

impl DeployError {
    /// Connection failures, timeouts, 5xx, 429 and 409 pass: they are retried, never pinned.
    pub fn is_transient(&self) -> bool {
        match self {
            DeployError::Kube { source, .. } => transient(source),
            DeployError::Conflict { .. } => true,
            _ => false,
        }
    }
}

/// What a wait looks at: the workload, and the write depwatch made.
struct Look<'a> {
    key: &'a ServiceKey,
    kind: WorkloadKind,
    generation: i64,
    applied: &'a Images,
}

/// Resolves when a newer version arrives (never without a receiver, or once it is closed).
async fn newer(superseded: Option<&mut watch::Receiver<u64>>) {
    if let Some(rx) = superseded {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// GET one object; `None` when it is not there.
/// One workload of a kind, if it is there.
struct Get<'a> {
    client: Client,
    namespace: &'a str,
    name: &'a str,
}

impl<'a> workload::KindVisitor for Get<'a> {
    type Out = futures::future::BoxFuture<'a, Result<Option<WorkloadState>, kube::Error>>;
    fn visit<K: workload::Kind>(self) -> Self::Out {
        Box::pin(async move {
            let api: Api<K> = Api::namespaced(self.client, self.namespace);
            Ok(api.get_opt(self.name).await?.as_ref().map(K::state))
        })
    }
}

/// PATCH one object's images (strategic merge keyed by container name), as depwatch.
struct PatchImages<'a> {
    client: Client,
    namespace: &'a str,
    name: &'a str,
    body: &'a serde_json::Value,
}

impl<'a> workload::KindVisitor for PatchImages<'a> {
    type Out = futures::future::BoxFuture<'a, Result<WorkloadState, kube::Error>>;
    fn visit<K: workload::Kind>(self) -> Self::Out {
        Box::pin(async move {
            let api: Api<K> = Api::namespaced(self.client, self.namespace);
            let pp = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            let patched = api
                .patch(self.name, &pp, &Patch::Strategic(self.body))
                .await?;
            Ok(patched.state())
        })
    }
}

/// The names of a kind's workloads in a namespace (none when they cannot be listed).
struct Names<'a> {
    client: Client,
    namespace: &'a str,
}

impl<'a> workload::KindVisitor for Names<'a> {
    type Out = futures::future::BoxFuture<'a, Vec<String>>;
    fn visit<K: workload::Kind>(self) -> Self::Out {
        Box::pin(
            async move { listed_names(Api::<K>::namespaced(self.client, self.namespace)).await },
        )
    }
}

/// The names of the objects `api` lists (none when they cannot be listed).
async fn listed_names<K>(api: Api<K>) -> Vec<String>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.list_metadata(&kube::api::ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|o| o.metadata.name)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// What a PATCH is conditional on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The version the plan read: the forward PATCH of exactly the changes it decided.
    Version(String),
    /// A later PATCH (a rollback): the newest version of a template that still runs these
    /// images (what depwatch wrote, or what it observed running).
    Running(Images),
}

/// The precondition of a PATCH of `images`, given the plan (or observation) the deploy last
/// made.
pub fn precondition(images: &Images, basis: Option<&Plan>) -> Precondition {
    match basis {
        Some(p)
            if !p.changes.is_empty() && p.changes == *images && !p.resource_version.is_empty() =>
        {
            Precondition::Version(p.resource_version.clone())
        }
        Some(p) => Precondition::Running(p.after.clone()),
        None => Precondition::Running(Images::new()),
    }
}

/// How many times a PATCH refused by writes that change nothing it decided on is sent again.
const PATCH_TRIES: usize = 5;

/// How long a refused PATCH waits for the shared watch to show the write that refused it.
const CATCH_UP: Duration = Duration::from_secs(1);

/// A PATCH of `images` decided on `basis` is still right for the workload as `w` shows it:
/// the forward PATCH when nothing its plan read changed but status or metadata (the same
/// object, spec generation, images and pause), a later one (a rollback) while the template
/// runs what it expects.
fn still_decided(w: &WorkloadState, images: &Images, basis: Option<&Plan>) -> bool {
    match (precondition(images, basis), basis) {
        (Precondition::Version(_), Some(p)) => {
            w.uid == p.uid
                && w.generation == p.generation
                && w.images == p.before
                && w.paused() == p.paused
        }
        (Precondition::Version(_), None) => false,
        (Precondition::Running(expect), _) => runs(&w.images, &expect),
    }
}

/// `a` is a later resourceVersion than `b`. Versions are opaque to clients; the API server's
/// (etcd's revisions) are numbers, and only numbers are compared.
fn later_version(a: &str, b: &str) -> bool {
    matches!((a.parse::<u64>(), b.parse::<u64>()), (Ok(a), Ok(b)) if a > b)
}

/// The template runs every image of `expect`.
fn runs(live: &Images, expect: &Images) -> bool {
    expect.iter().all(|(c, i)| live.get(c) == Some(i))
}

/// The strategic merge patch of `images` (keyed by container name), conditional on `version`.
fn patch_body(
    kind: WorkloadKind,
    images: &Images,
    cause: &str,
    version: &str,
) -> serde_json::Value {
    let containers: Vec<_> = images
        .iter()
        .map(|(name, image)| json!({"name": name, "image": image}))
        .collect();
    let template = json!({"spec": {"containers": containers}});
    let spec = match kind {
        WorkloadKind::CronJob => json!({"jobTemplate": {"spec": {"template": template}}}),
        _ => json!({"template": template}),
    };
    let mut metadata = json!({"annotations": {"kubernetes.io/change-cause": cause}});
    if !version.is_empty() {
        metadata["resourceVersion"] = json!(version);
    }
    json!({"metadata": metadata, "spec": spec})
}

fn reading(kind: WorkloadKind) -> String {
    format!("reading the {}", kind.api_kind())
}

fn patching(kind: WorkloadKind) -> String {
    format!("patching the {}", kind.api_kind())
}

/// "a Deployment and a StatefulSet".
fn ambiguous(kinds: &[WorkloadKind]) -> String {
    let named: Vec<String> = kinds
        .iter()
        .map(|k| format!("a {}", k.api_kind()))
        .collect();
    match named.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => named.join(""),
    }
}

fn did_you_mean(suggestion: &Option<String>) -> String {
    suggestion
        .as_deref()
        .map(|s| format!(" (did you mean {s}?)"))
        .unwrap_or_default()
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429 || s.code == 409,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// One line a person can act on: what failed, where, and the API server's own words.
fn describe_kube(action: &str, server: &str, e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!(
            "the Kubernetes API server at {server} refused {action}: {} {} ({})",
            s.code, s.reason, s.message
        ),
        other if transient(other) => format!(
            "cannot reach the Kubernetes API server at {server} while {action}: {}",
            crate::domain::error_chain(other)
        ),
        other => format!("{action} failed: {}", crate::domain::error_chain(other)),
    }
}

/// A read-only view of what the cluster runs, for the HTTP layer: the images of a managed
/// Deployment from the shared watches, nothing else.
#[derive(Clone)]
pub struct LiveImages(Watches);

impl LiveImages {
    /// The images `key` (a workload of `kind`) runs now, when its namespace is watched.
    pub fn of(&self, key: &ServiceKey, kind: WorkloadKind) -> Option<Images> {
        self.0.cached(&key.namespace)?.images(kind, &key.name)
    }

    /// Whether `key` names a workload of any kind: `Err` with the closest existing name (if
    /// any is close) when the watches list its namespace and it is not there; `Ok` when it is,
    /// or when the namespace is not listed within a moment (the deploy then says).
    pub async fn exists(&self, key: &ServiceKey) -> Result<(), Option<String>> {
        let listed =
            tokio::time::timeout(Duration::from_secs(2), self.0.namespace(&key.namespace)).await;
        let Some(ns) = listed.ok().and(self.0.cached(&key.namespace)) else {
            return Ok(());
        };
        match ns.find(&key.name, None) {
            Found::None => {
                let names = ns.names();
                let closest = crate::domain::closest(&key.name, names.iter().map(String::as_str));
                Err(closest.map(String::from))
            }
            _ => Ok(()),
        }
    }
}

/// Whether the Kubernetes API server answers, for `/readyz`: one question, nothing else.
#[derive(Clone)]
pub struct ApiProbe(Client);

impl ApiProbe {
    /// Ask the API server for its version within `within`; the reason when it does not answer.
    pub async fn answers(&self, within: Duration) -> Result<(), String> {
        match tokio::time::timeout(within, self.0.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "the Kubernetes API server is not reachable: {}",
                crate::domain::error_chain(&e)
            )),
            Err(_) => Err(format!(
                "the Kubernetes API server did not answer within {}",
                crate::domain::human_duration(within)
            )),
        }
    }
}

/// What a wait waits for: the generation depwatch's write produced, the images it wrote, and
/// for a rollback the template it replaces.
#[derive(Debug, Clone, Copy)]
pub struct WaitFor<'a> {
    pub generation: i64,
    pub applied: &'a Images,
    pub replaced: Option<&'a Images>,
}

/// A plan whose images the registries have not been asked about yet, with what the kubelet
/// would pull them with.
#[derive(Debug)]
pub struct Unchecked {
    pub plan: Plan,
    pull: workload::Pull,
}

impl Plan {
    /// The workload as it is: a plan that changes nothing.
    fn observed(key: &ServiceKey, w: WorkloadState) -> Plan {
        Plan {
            key: key.clone(),
            kind: w.kind,
            paused: w.paused(),
            before: w.images.clone(),
            after: w.images,
            changes: Images::new(),
            generation: w.generation,
            uid: w.uid,
            digests: Images::new(),
            resource_version: w.resource_version,
        }
    }
}

#[derive(Clone)]
pub struct Deployer {
    client: Client,
    watches: Watches,
    config: DeployConfig,
    /// Every write to the cluster first checks it (leader election).
    fence: crate::fence::Fence,
    /// Owns the Kubernetes Events being sent.
    background: tokio_util::task::TaskTracker,
    /// Sends Kubernetes Events (events.k8s.io/v1), a repeat as a series of the first.
    events: kube::runtime::events::Recorder,
    /// Namespaces known to exist, so a deploy costs no namespace read after the first.
    known_namespaces: std::sync::Arc<dashmap::DashSet<String>>,
    /// Pull credentials for the registry pre-flight.
    pull: pull::PullSecrets,
    /// Workloads whose PATCH met a newer write: their next plan and PATCH read the API
    /// server, not the shared watch (which may not have seen that write yet).
    conflicted: std::sync::Arc<dashmap::DashSet<ServiceKey>>,
}

impl Deployer {
    pub fn new(client: Client, config: DeployConfig) -> Self {
        let events_client = client.clone();
        Deployer {
            watches: Watches::new(client.clone(), config.bounds.clone()),
            pull: pull::PullSecrets::new(client.clone()),
            client,
            config,
            fence: crate::fence::Fence::open(),
            background: tokio_util::task::TaskTracker::new(),
            events: kube::runtime::events::Recorder::new(
                events_client,
                kube::runtime::events::Reporter {
                    controller: FIELD_MANAGER.into(),
                    // The pod's name in a cluster, the host's on a landing host.
                    instance: std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
                },
            ),
            known_namespaces: Default::default(),
            conflicted: Default::default(),
        }
    }

    /// Writes only while `fence` allows; Kubernetes Events are sent by tasks of `background`.
    pub fn fenced(
        mut self,
        fence: crate::fence::Fence,
        background: tokio_util::task::TaskTracker,
    ) -> Self {
        self.fence = fence;
        self.background = background;
        self
    }

    pub fn config(&self) -> &DeployConfig {
        &self.config
    }

    /// The shared watches, for drift detection.
    pub fn watches(&self) -> &Watches {
        &self.watches
    }

    /// What the cluster runs, read-only, for the HTTP layer.
    pub fn live_images(&self) -> LiveImages {
        LiveImages(self.watches.clone())
    }

    /// Whether the API server answers, for `/readyz`.
    pub fn api_probe(&self) -> ApiProbe {
        ApiProbe(self.client.clone())
    }

    fn kube_error(
        &self,
        action: impl Into<String>,
    ) -> impl FnOnce(kube::Error) -> DeployError + '_ {
        let action = action.into();
        move |source| DeployError::Kube {
            action,
            server: self.config.server.clone(),
            source,
        }
    }

    async fn ensure_namespace(&self, ns: &str) -> Result<(), DeployError> {
        if self.known_namespaces.contains(ns) {
            return Ok(());
        }
        self.ensure_namespace_uncached(ns).await?;
        self.known_namespaces.insert(ns.to_string());
        Ok(())
    }

    async fn ensure_namespace_uncached(&self, ns: &str) -> Result<(), DeployError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let found = api
            .get_opt(ns)
            .await
            .map_err(self.kube_error("reading the namespace"))?;
        if found.is_some() {
            return Ok(());
        }
        // Creating it could never help: the Deployment would not be there either.
        let names = listed_names(api).await;
        Err(DeployError::MissingNamespace {
            namespace: ns.to_string(),
            suggestion: crate::domain::closest(ns, names.iter().map(String::as_str))
                .map(String::from),
        })
    }

    /// The error for a workload that is not there, with the closest existing name of the
    /// kinds it could be.
    async fn missing(&self, key: &ServiceKey, kind: Option<WorkloadKind>) -> DeployError {
        let mut names = Vec::new();
        for k in kind.map_or(WorkloadKind::ALL.to_vec(), |k| vec![k]) {
            let names_of = Names {
                client: self.client.clone(),
                namespace: &key.namespace,
            };
            names.extend(workload::visit(k, names_of).await);
        }
        DeployError::MissingWorkload {
            name: key.name.clone(),
            namespace: key.namespace.clone(),
            kind,
            suggestion: crate::domain::closest(&key.name, names.iter().map(String::as_str))
                .map(String::from),
        }
    }

    /// The shared watch of the workload's namespace, unless its last PATCH met a newer write:
    /// then the API server is asked (the watch may not have seen that write yet).
    fn trusted_watch(&self, key: &ServiceKey) -> Option<cache::NamespaceWatch> {
        let live = self.conflicted.remove(key).is_some();
        self.watches.cached(&key.namespace).filter(|_| !live)
    }

    /// Read the workload and work out the new images. One try: the lifecycle decides
    /// whether and when an error is worth another. The registries are not asked yet: that is
    /// [`Deployer::check_registries`], which the caller runs holding no worker. The shared watches answer (their first
    /// listing is the start-up's only read of the fleet), so a deploy costs no read; the API
    /// server is asked only about a workload the watches do not show (yet).
    pub async fn plan(&self, key: &ServiceKey, spec: &DepSpec) -> Result<Unchecked, DeployError> {
        self.config.bounds.check_namespace(&key.namespace)?;
        // Start (or wait briefly for) the watches; ask the API server while they have not
        // listed.
        self.watches.namespace(&key.namespace).await;
        let found = match self.trusted_watch(key) {
            Some(w) => w.find(&key.name, spec.kind),
            None => Found::None,
        };
        let w = match found {
            Found::One(w) => *w,
            Found::Several(kinds) => {
                return Err(DeployError::Ambiguous {
                    key: key.clone(),
                    kinds,
                })
            }
            Found::None => self.read(key, spec.kind).await?,
        };
        if let Some(owner) = &w.owner {
            if !self.config.allow_owned {
                return Err(DeployError::Owned {
                    key: key.clone(),
                    kind: w.kind,
                    owner: owner.clone(),
                });
            }
            tracing::warn!(workload = %Shown(w.kind, &key.name), namespace = %key.namespace, %owner, "patching a workload another engine owns (--allow-owned): its next sync may undo this deploy");
        }
        // Sorted by name: the order only shows in messages that list the containers.
        let current: Vec<(String, String)> = w
            .images
            .iter()
            .map(|(c, i)| (c.clone(), i.clone()))
            .collect();
        let wanted: Images =
            depfile::resolve(spec, key, &current, self.config.image_repo.as_deref())?
                .into_iter()
                .collect();
        // On the final images: a plain version takes the running repository, which must
        // itself be allowed.
        self.config
            .bounds
            .check_images(wanted.values().map(String::as_str))?;
        if let Some(ecr) = &self.config.ecr {
            ecr.note(&key.namespace, wanted.values().map(String::as_str));
        }
        let changes = w.images.changed_in(&wanted);
        let plan = Plan {
            digests: Images::new(),
            key: key.clone(),
            kind: w.kind,
            after: w.images.with(&changes),
            paused: w.paused(),
            before: w.images,
            changes,
            generation: w.generation,
            uid: w.uid,
            resource_version: w.resource_version,
        };
        Ok(Unchecked { plan, pull: w.pull })
    }

    /// The pre-flight of a plan: every changed image asked of its registry (within the
    /// bounded wait), the digests found kept on the plan. An approved save's images must still
    /// be the digests its approvers approved.
    pub async fn check_registries(
        &self,
        unchecked: Unchecked,
        approved: Option<&Images>,
    ) -> Result<Plan, DeployError> {
        let Unchecked { mut plan, pull } = unchecked;
        // Approved digests are compared with the registry's answer now, not one kept from
        // before the approval.
        let fresh = approved.is_some();
        plan.digests = self
            .preflight(&plan.key, &pull, &plan.changes, fresh)
            .await?;
        if let Some(why) = approved.and_then(|a| crate::domain::approval::moved(a, &plan.digests)) {
            return Err(DeployError::Registry(why));
        }
        Ok(plan)
    }

    /// The digests the pre-flight finds for what `spec` asks of the service now (empty when
    /// the pre-flight is off, the workload cannot be read or nothing could be checked): what
    /// approvers of a save awaiting approval approve.
    pub async fn digests_for(&self, key: &ServiceKey, spec: &DepSpec) -> Images {
        let plan = match self.plan(key, spec).await {
            Ok(u) => self.check_registries(u, None).await,
            Err(e) => Err(e),
        };
        match plan {
            Ok(p) => p
                .digests
                .iter()
                .filter(|(_, d)| d.starts_with("sha"))
                .map(|(c, d)| (c.clone(), d.clone()))
                .collect(),
            Err(e) => {
                tracing::debug!(service = %key, error = %e, "no digests for the save awaiting approval");
                Images::new()
            }
        }
    }

    /// Ask the registries whether every changed image exists, with the credentials the
    /// kubelet would use; the digests found, or why the deploy stops before its PATCH.
    async fn preflight(
        &self,
        key: &ServiceKey,
        pull: &workload::Pull,
        changes: &Images,
        fresh: bool,
    ) -> Result<Images, DeployError> {
        let Some(p) = self
            .config
            .preflight
            .as_ref()
            .filter(|_| !changes.is_empty())
        else {
            return Ok(Images::new());
        };
        let mut creds = self.pull.for_pods(&key.namespace, pull).await;
        if let Some(ecr) = &self.config.ecr {
            // Only at start, until the first token fetch has ended (within the bounded wait).
            ecr.first_fetch(p.wait).await;
            for (host, c) in ecr.credentials_for(changes.values().map(String::as_str)) {
                creds.entry(host).or_insert(c);
            }
        } else if let Some(identity) = &self.config.ecr_identity {
            let images = changes.values().map(String::as_str);
            let own = identity.credentials_for(images, &creds, p.wait).await;
            creds.extend(own);
        }
        let answers = p.ask(changes, &creds, fresh).await;
        match crate::registry::preflight::verdict(p.mode, &answers) {
            crate::registry::Verdict::Refuse(why) => Err(DeployError::Registry(why)),
            crate::registry::Verdict::Go { digests, warnings } => {
                for warning in warnings {
                    match p.first_warning(&warning) {
                        true => {
                            tracing::warn!(service = %key, "registry pre-flight: {} (further warnings about this registry in the next minute are logged at debug level)", warning.text)
                        }
                        false => {
                            tracing::debug!(service = %key, "registry pre-flight: {}", warning.text)
                        }
                    }
                }
                Ok(digests)
            }
        }
    }

    /// The workload the shared watch shows for a file naming `kind` (or none): its uid and
    /// kind, so a deploy refused after it was found is recorded against the right kind.
    pub fn seen(
        &self,
        key: &ServiceKey,
        kind: Option<WorkloadKind>,
    ) -> Option<(String, WorkloadKind)> {
        match self.watches.cached(&key.namespace)?.find(&key.name, kind) {
            Found::One(w) => Some((w.uid.clone(), w.kind)),
            _ => None,
        }
    }

    /// The workload as it is now, of `kind` or of whichever kind has the name; `None` when
    /// there is none. Finishing a rollout another deploy left starts here.
    pub async fn observe(
        &self,
        key: &ServiceKey,
        kind: Option<WorkloadKind>,
    ) -> Result<Option<Plan>, DeployError> {
        let mut found = self.get_kinds(key, kind).await?;
        match found.len() {
            0 => Ok(None),
            1 => Ok(Some(Plan::observed(key, found.remove(0)))),
            _ => Err(DeployError::Ambiguous {
                key: key.clone(),
                kinds: found.iter().map(|w| w.kind).collect(),
            }),
        }
    }

    /// The workloads named like `key`, of `kind` or of every kind: all kinds at once, one
    /// round trip rather than four.
    async fn get_kinds(
        &self,
        key: &ServiceKey,
        kind: Option<WorkloadKind>,
    ) -> Result<Vec<WorkloadState>, DeployError> {
        let kinds = kind.map_or(WorkloadKind::ALL.to_vec(), |k| vec![k]);
        Ok(
            futures::future::try_join_all(kinds.into_iter().map(|k| self.get(k, key)))
                .await?
                .into_iter()
                .flatten()
                .collect(),
        )
    }

    /// The workload from the API server: of `kind`, or of whichever kind has the name.
    async fn read(
        &self,
        key: &ServiceKey,
        kind: Option<WorkloadKind>,
    ) -> Result<WorkloadState, DeployError> {
        self.ensure_namespace(&key.namespace).await?;
        let mut found = self.get_kinds(key, kind).await?;
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => {
                // The namespace may have gone too: look again next time.
                self.known_namespaces.remove(&key.namespace);
                Err(self.missing(key, kind).await)
            }
            _ => Err(DeployError::Ambiguous {
                key: key.clone(),
                kinds: found.iter().map(|w| w.kind).collect(),
            }),
        }
    }

    /// One workload of one kind, if it is there.
    async fn get(
        &self,
        kind: WorkloadKind,
        key: &ServiceKey,
    ) -> Result<Option<WorkloadState>, DeployError> {
        let get = Get {
            client: self.client.clone(),
            namespace: &key.namespace,
            name: &key.name,
        };
        let found = workload::visit(kind, get).await;
        found.map_err(|source| DeployError::Kube {
            action: reading(kind),
            server: self.config.server.clone(),
            source,
        })
    }

    /// Patch the images; returns the generation the rollout must reach. The PATCH carries the
    /// resourceVersion depwatch decided on (see [`precondition`]; `basis` is the plan, or the
    /// observation, the deploy last made), so a write made since refuses it with 409, even
    /// when it is delivered long after it was sent. Refused by a write that changed nothing
    /// the decision rests on (a controller's status, all the time during a rollout), it is
    /// sent again at the version the shared watch then shows; otherwise
    /// [`DeployError::Conflict`], and the deploy plans again.
    pub async fn patch(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        images: &Images,
        cause: &str,
        basis: Option<&Plan>,
    ) -> Result<i64, DeployError> {
        let what = format!("a PATCH of {} in {}", Shown(kind, &key.name), key.namespace);
        self.fence.check(&what)?;
        let mut version = match precondition(images, basis) {
            Precondition::Version(v) => v,
            Precondition::Running(expect) => self.version_running(key, kind, &expect).await?,
        };
        for _ in 0..PATCH_TRIES {
            // A read may have taken a while.
            self.fence.check(&what)?;
            let body = patch_body(kind, images, cause, &version);
            let refusal = match self.send_patch(key, kind, &body).await {
                Ok(w) => return Ok(w.generation),
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(self.missing(key, Some(kind)).await)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => s.message,
                Err(source) => return Err(self.kube_error(patching(kind))(source)),
            };
            match self.seen_after(key, kind, &version).await {
                Some(w) if still_decided(&w, images, basis) => version = w.resource_version,
                seen => return Err(self.conflict(key, kind, seen.is_none(), &refusal)),
            }
        }
        Err(self.conflict(key, kind, false, "refused again and again"))
    }

    /// A PATCH met a write that changes the decision: nothing was written; the next plan (or
    /// PATCH) reads the API server when the shared watch has not shown that write yet.
    fn conflict(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        unseen: bool,
        why: &str,
    ) -> DeployError {
        tracing::warn!(workload = %Shown(kind, &key.name), namespace = %key.namespace, "the API server refused the PATCH: the workload was written after depwatch read it (409 Conflict); nothing was written over it, retrying with backoff from its newest version");
        if unseen {
            self.conflicted.insert(key.clone());
        }
        DeployError::Conflict {
            key: key.clone(),
            kind,
            why: format!("409 Conflict: {why}"),
        }
    }

    /// One PATCH request.
    async fn send_patch(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        body: &serde_json::Value,
    ) -> Result<WorkloadState, kube::Error> {
        let patch = PatchImages {
            client: self.client.clone(),
            namespace: &key.namespace,
            name: &key.name,
            body,
        };
        workload::visit(kind, patch).await
    }

    /// The workload as the shared watch shows it once it has seen a version later than
    /// `refused` (the write that refused a PATCH), within [`CATCH_UP`]; `None` when it has not.
    async fn seen_after(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        refused: &str,
    ) -> Option<WorkloadState> {
        let ns = self.watches.cached(&key.namespace)?;
        let mut woken = ns.subscribe(&key.name);
        let until = tokio::time::Instant::now() + CATCH_UP;
        loop {
            if let Some(w) = ns
                .workload(kind, &key.name)
                .filter(|w| later_version(&w.resource_version, refused))
            {
                return Some(w);
            }
            match tokio::time::timeout_at(until, woken.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// The resourceVersion of the workload while its template runs `expect`: the shared
    /// watch's newest when it shows that, else the API server's. A template that runs
    /// anything else was written by someone else: nothing is patched over it.
    async fn version_running(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        expect: &Images,
    ) -> Result<String, DeployError> {
        let cached = self
            .trusted_watch(key)
            .and_then(|ns| ns.workload(kind, &key.name))
            .filter(|w| runs(&w.images, expect) && !w.resource_version.is_empty());
        if let Some(w) = cached {
            return Ok(w.resource_version);
        }
        match self.get(kind, key).await? {
            None => Err(self.missing(key, Some(kind)).await),
            Some(w) if runs(&w.images, expect) => Ok(w.resource_version),
            Some(w) => Err(DeployError::Conflict {
                key: key.clone(),
                kind,
                why: format!("it runs {}, not {expect}", w.images),
            }),
        }
    }

    /// Kubernetes' forced rollback: an `OrderedReady` StatefulSet waits forever on a pod that
    /// never gets ready, even once its template is fixed or restored. Delete such pods (not
    /// ready, running another template than `applied`, the one depwatch wrote, and either of
    /// the template a rollback `replaced` or in a state they do not leave by themselves) so
    /// the controller recreates them from it; a pod that is only starting is waited for. Done as each wait begins, so a wait resumed after a
    /// stop (its patch already landed) does it too. Best effort: a pod that cannot be deleted
    /// leaves the rollout to its verdict.
    async fn force_rollback(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        applied: &Images,
        replaced: Option<&Images>,
    ) {
        let Some(ns) = self.watches.cached(&key.namespace) else {
            return;
        };
        // The template just written, whatever the watch shows of it yet.
        let Some(written) = ns.workload(kind, &key.name).map(|w| WorkloadState {
            images: applied.clone(),
            ..w
        }) else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        for pod in ns.stuck_pods_for(&written, replaced) {
            if self.fence.check(&format!("deleting pod {pod}")).is_err() {
                return;
            }
            match api.delete(&pod, &Default::default()).await {
                Ok(_) => {
                    tracing::info!(workload = %Shown(kind, &key.name), namespace = %key.namespace, %pod, "deleted a pod that is not ready and runs the replaced template: the StatefulSet would wait on it forever (forced rollback)")
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(workload = %Shown(kind, &key.name), namespace = %key.namespace, %pod, error = %e, "could not delete a stuck pod; the StatefulSet may wait on it")
                }
            }
        }
    }

    /// Wait for the rollout that reaches `generation`, until healthy, failed, the deadline,
    /// or a newer version supersedes it (`superseded` changes). Woken only by changes to this
    /// Deployment, its ReplicaSets and their pods.
    pub async fn wait(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        target: WaitFor<'_>,
        deadline: Instant,
        mut superseded: Option<watch::Receiver<u64>>,
    ) -> WaitOutcome {
        let WaitFor {
            generation,
            applied,
            replaced,
        } = target;
        let ns =
            match tokio::time::timeout_at(deadline, self.watches.namespace(&key.namespace)).await {
                Ok(ns) => ns,
                Err(_) => {
                    return WaitOutcome::TimedOut {
                        last: "the namespace's watches never synced".into(),
                    }
                }
            };
        self.force_rollback(key, kind, applied, replaced).await;
        let mut changed = ns.subscribe(&key.name);
        let mut first_seen = Default::default();
        loop {
            let look = Look {
                key,
                kind,
                generation,
                applied,
            };
            let last = match self.look(&ns, &look, &mut first_seen) {
                Ok(last) => last,
                Err(outcome) => return outcome,
            };
            // Look again soon while a pull error's grace runs (it ends without any event), or
            // while the watches have not listed.
            let listed = self.watches.cached(&key.namespace).is_some();
            let poll = async {
                match first_seen.is_empty() && listed {
                    true => std::future::pending::<()>().await,
                    false => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            };
            tokio::select! {
                r = changed.changed() => if r.is_err() { changed = ns.subscribe(&key.name) },
                _ = tokio::time::sleep_until(deadline) => return self.at_deadline(key, kind, generation, applied, last).await,
                _ = newer(superseded.as_mut()) => return WaitOutcome::Superseded,
                _ = poll => {}
            }
        }
    }

    /// One look at a rollout from the shared watches: its outcome, or what it waits for.
    fn look(
        &self,
        ns: &cache::NamespaceWatch,
        l: &Look<'_>,
        first_seen: &mut std::collections::HashMap<String, Instant>,
    ) -> Result<String, WaitOutcome> {
        // A cache that has not listed yet knows nothing (the deadline asks the API server).
        if self.watches.cached(&l.key.namespace).is_none() {
            return Ok("the shared watches have not listed yet".into());
        }
        // Never a verdict on a template depwatch did not write.
        if let Some(running) = ns
            .workload(l.kind, &l.key.name)
            .and_then(|d| rollout::changed_outside(&d, l.generation, l.applied))
        {
            return Err(WaitOutcome::ChangedOutside { running });
        }
        let ff = self.config.fail_fast;
        match ns.judge(l.kind, &l.key.name, l.generation, ff, first_seen) {
            Health::Healthy => Err(WaitOutcome::Healthy),
            Health::Unverified(why) => Err(WaitOutcome::Unverified(why)),
            Health::Applied(why) => Err(WaitOutcome::Applied(why)),
            Health::Failed { reason, message } => Err(WaitOutcome::Failed { reason, message }),
            Health::Disappeared => Err(WaitOutcome::Disappeared),
            Health::Progressing(m) => Ok(m),
        }
    }

    /// The deadline passed. A rollout is judged by the cluster's time, not depwatch's backlog:
    /// before calling it timed out, ask the API server whether it completed meanwhile.
    async fn at_deadline(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        generation: i64,
        applied: &Images,
        last: String,
    ) -> WaitOutcome {
        let timed_out = WaitOutcome::TimedOut { last };
        let dep = match self.get(kind, key).await {
            Ok(Some(dep)) => dep,
            Ok(None) => return WaitOutcome::Disappeared,
            Err(_) => return timed_out,
        };
        if let Some(running) = rollout::changed_outside(&dep, generation, applied) {
            return WaitOutcome::ChangedOutside { running };
        }
        let mut first_seen = Default::default();
        let now = Instant::now();
        match rollout::judge(
            &dep,
            generation,
            &[],
            self.config.fail_fast,
            &mut first_seen,
            now,
        ) {
            Health::Healthy => WaitOutcome::Healthy,
            Health::Unverified(why) => WaitOutcome::Unverified(why),
            Health::Applied(why) => WaitOutcome::Applied(why),
            _ => timed_out,
        }
    }

    /// The rollout at `generation` judged once from the shared watch, no waiting (but for the
    /// watch to catch up with the read that produced `generation`).
    pub async fn health_now(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        generation: i64,
    ) -> lifecycle::HealthNow {
        use lifecycle::HealthNow;
        let ns = self.watches.namespace(&key.namespace).await;
        if self.watches.cached(&key.namespace).is_none() {
            // Not listed yet: the API server's word on the workload (its pods unseen).
            let Ok(w) = self.read(key, Some(kind)).await else {
                return HealthNow::NotHealthy;
            };
            let now = Instant::now();
            let ff = self.config.fail_fast;
            return match rollout::judge(&w, generation, &[], ff, &mut Default::default(), now) {
                Health::Healthy => HealthNow::Healthy,
                Health::Unverified(_) => HealthNow::Unverified,
                Health::Applied(_) => HealthNow::Applied,
                _ => HealthNow::NotHealthy,
            };
        }
        let mut changed = ns.subscribe(&key.name);
        let mut first_seen = Default::default();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match ns.judge(
                kind,
                &key.name,
                generation,
                self.config.fail_fast,
                &mut first_seen,
            ) {
                Health::Healthy => return HealthNow::Healthy,
                Health::Unverified(_) => return HealthNow::Unverified,
                Health::Applied(_) => return HealthNow::Applied,
                Health::Progressing(m) if m.contains("observe") && Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
                }
                _ => return HealthNow::NotHealthy,
            }
        }
    }

    /// Record a Kubernetes Event on the workload `uid` (`kubectl describe` lists Events by
    /// the object's uid), through kube's event recorder. Best effort: sent in the
    /// background, never delaying a deploy.
    pub fn event(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        uid: &str,
        reason: &str,
        message: &str,
        warning: bool,
    ) {
        if self.fence.check("a Kubernetes Event").is_err() {
            return;
        }
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(kind.api_version().into()),
            kind: Some(kind.api_kind().into()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            uid: Some(uid.into()),
            ..Default::default()
        };
        let event = kube::runtime::events::Event {
            type_: match warning {
                true => kube::runtime::events::EventType::Warning,
                false => kube::runtime::events::EventType::Normal,
            },
            reason: reason.into(),
            // The API server refuses a note over 1 kB.
            note: Some(truncated(message, 1000)),
            action: "Deploy".into(),
            secondary: None,
        };
        let (events, key) = (self.events.clone(), key.clone());
        self.background.spawn(async move {
            if let Err(e) = events.publish(&event, &regarding).await {
                tracing::debug!(service = %key, error = %e, "could not record a Kubernetes Event");
            }
        });
    }
}

/// At most `max` bytes of `text`, cut at a character boundary.
fn truncated(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(before: &str, after: &str, rv: &str) -> Plan {
        let (before, after) = (Images::parse(before), Images::parse(after));
        Plan {
            key: ServiceKey::new("web", "prod").expect("key"),
            kind: WorkloadKind::Deployment,
            changes: before.changed_in(&after),
            before,
            after,
            generation: 3,
            uid: "u".into(),
            paused: false,
            digests: Images::new(),
            resource_version: rv.into(),
        }
    }

    #[test]
    fn a_forward_patch_carries_its_plans_version_a_later_one_the_template_it_expects() {
        let forward = planned("web=w:1, side=s:1", "web=w:2, side=s:1", "41");
        let observed = planned("web=w:2", "web=w:2", "50");
        // (case, images patched, basis, precondition)
        let table = [
            (
                "the plan's own changes: the version it read",
                "web=w:2",
                Some(&forward),
                Precondition::Version("41".into()),
            ),
            (
                "a rollback after it: a template still running what depwatch wrote",
                "web=w:1",
                Some(&forward),
                Precondition::Running(Images::parse("web=w:2, side=s:1")),
            ),
            (
                "a rollback resumed from an observation",
                "web=w:1",
                Some(&observed),
                Precondition::Running(Images::parse("web=w:2")),
            ),
            (
                "nothing known",
                "web=w:1",
                None,
                Precondition::Running(Images::new()),
            ),
        ];
        for (case, images, basis, want) in table {
            assert_eq!(precondition(&Images::parse(images), basis), want, "{case}");
        }
        let unread = planned("web=w:1", "web=w:2", "");
        assert!(
            matches!(
                precondition(&Images::parse("web=w:2"), Some(&unread)),
                Precondition::Running(_)
            ),
            "a plan without a version never sends an unconditional PATCH of its own"
        );
    }

    #[test]
    fn a_refused_patch_is_sent_again_only_over_what_it_decided_on() {
        let forward = planned("web=w:1", "web=w:2", "41");
        let state = |images: &str, generation: i64| WorkloadState {
            uid: "u".into(),
            images: Images::parse(images),
            generation,
            resource_version: "45".into(),
            ..WorkloadState::default()
        };
        let two = Images::parse("web=w:2");
        let one = Images::parse("web=w:1");
        // (case, the workload now, images patched, still decided)
        let table = [
            ("a status write", state("web=w:1", 3), &two, true),
            ("another replica's patch", state("web=w:3", 4), &two, false),
            (
                "a spec change keeping the images",
                state("web=w:1", 4),
                &two,
                false,
            ),
            (
                "a rollback over what depwatch wrote",
                state("web=w:2", 4),
                &one,
                true,
            ),
            (
                "a rollback over another write",
                state("web=w:3", 5),
                &one,
                false,
            ),
        ];
        for (case, now, images, want) in table {
            assert_eq!(still_decided(&now, images, Some(&forward)), want, "{case}");
        }
        let other = WorkloadState {
            uid: "another".into(),
            ..state("web=w:1", 3)
        };
        assert!(!still_decided(&other, &two, Some(&forward)), "recreated");
    }

    #[test]
    fn only_numeric_versions_are_compared() {
        for (a, b, want) in [
            ("42", "41", true),
            ("41", "41", false),
            ("9", "10", false),
            ("x", "1", false),
            ("2", "", false),
        ] {
            assert_eq!(later_version(a, b), want, "{a} > {b}");
        }
    }

    #[test]
    fn the_patch_body_names_the_version_and_the_containers() {
        let body = patch_body(
            WorkloadKind::CronJob,
            &Images::parse("web=w:2"),
            "why",
            "41",
        );
        assert_eq!(body["metadata"]["resourceVersion"], "41");
        assert_eq!(
            body["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0],
            json!({"name": "web", "image": "w:2"})
        );
        let body = patch_body(
            WorkloadKind::Deployment,
            &Images::parse("web=w:2"),
            "why",
            "",
        );
        assert!(body["metadata"].get("resourceVersion").is_none());
    }
}
