//! Stage 5, deploying with the kube crate: ensure the namespace, read the Deployment, work out
//! the new images, patch only those images (strategic merge keyed by container name, field
//! manager `depwatch`, a `kubernetes.io/change-cause`), then judge the rollout from shared
//! watches, and roll back to the captured images when it fails.

pub mod drift;
pub mod rollout;

use std::collections::BTreeMap;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::depfile::{self, DepSpec, ServiceKey};
use rollout::{FailFast, Health, Watches};

pub const FIELD_MANAGER: &str = "depwatch";

/// Images by container name.
pub type Images = BTreeMap<String, String>;

/// `web=example.com/web:1.1, sidecar=…`
pub fn show(images: &Images) -> String {
    images
        .iter()
        .map(|(c, i)| format!("{c}={i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Settings of the deploy stage.
#[derive(Debug, Clone)]
pub struct DeployConfig {
    pub create_namespace: bool,
    /// `--image-repo` / `ECR_REPO`.
    pub image_repo: Option<String>,
    pub rollout_timeout: Duration,
    pub fail_fast: FailFast,
}

/// A per-deploy failure before or while writing to the cluster.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("no Deployment {name} in {namespace}")]
    MissingDeployment { name: String, namespace: String },
    #[error("namespace {0} does not exist and namespace creation is off (--no-create-namespace)")]
    MissingNamespace(String),
    #[error("{0}")]
    Resolve(#[from] depfile::ResolveError),
    #[error("Kubernetes API error during {action}: {source}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
}

/// What a deploy will change.
#[derive(Debug, Clone)]
pub struct Plan {
    pub key: ServiceKey,
    /// Every container's image before the deploy: what a rollback restores.
    pub before: Images,
    /// The containers whose image changes, with the new image.
    pub changes: Images,
    /// All containers' images after the deploy.
    pub after: Images,
    /// The Deployment's generation when read: what an interrupted rollout must reach.
    pub generation: i64,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }
}

/// How the wait for a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    Healthy,
    Failed {
        reason: String,
        message: String,
    },
    TimedOut {
        last: String,
    },
    /// A newer desired version arrived; this wait was abandoned.
    Superseded,
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => s.code >= 500 || s.code == 429 || s.code == 409,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(6)
        .with_jitter()
}

#[derive(Clone)]
pub struct Deployer {
    client: Client,
    watches: Watches,
    config: DeployConfig,
    /// Namespaces known to exist, so a deploy costs no namespace read after the first.
    known_namespaces: std::sync::Arc<dashmap::DashSet<String>>,
}

impl Deployer {
    pub fn new(client: Client, config: DeployConfig) -> Self {
        Deployer {
            watches: Watches::new(client.clone()),
            client,
            config,
            known_namespaces: Default::default(),
        }
    }

    pub fn config(&self) -> &DeployConfig {
        &self.config
    }

    /// The shared watches, for drift detection.
    pub fn watches(&self) -> &Watches {
        &self.watches
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
        let found = (|| api.get_opt(ns))
            .retry(backoff())
            .when(transient)
            .await
            .map_err(|source| DeployError::Kube {
                action: "reading the namespace",
                source,
            })?;
        if found.is_some() {
            return Ok(());
        }
        if !self.config.create_namespace {
            return Err(DeployError::MissingNamespace(ns.to_string()));
        }
        let obj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).map_err(|e| {
                DeployError::Kube {
                    action: "building the namespace",
                    source: kube::Error::SerdeError(e),
                }
            })?;
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PostParams::default()
        };
        match (|| api.create(&pp, &obj))
            .retry(backoff())
            .when(|e| transient(e) && !matches!(e, kube::Error::Api(s) if s.code == 409))
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = ns, "created namespace");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(source) => Err(DeployError::Kube {
                action: "creating the namespace",
                source,
            }),
        }
    }

    /// Read the Deployment and work out the new images.
    pub async fn plan(&self, key: &ServiceKey, spec: &DepSpec) -> Result<Plan, DeployError> {
        self.ensure_namespace(&key.namespace).await?;
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &key.namespace);
        let dep = (|| api.get_opt(&key.name))
            .retry(backoff())
            .when(transient)
            .await
            .map_err(|source| DeployError::Kube {
                action: "reading the Deployment",
                source,
            })?
            .ok_or_else(|| {
                // The namespace may have gone too: look again next time.
                self.known_namespaces.remove(&key.namespace);
                DeployError::MissingDeployment {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                }
            })?;
        let before = rollout::container_images(&dep);
        let current: Vec<(String, String)> = dep
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|s| {
                s.containers
                    .iter()
                    .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let wanted = depfile::resolve(spec, key, &current, self.config.image_repo.as_deref())?;
        let changes: Images = wanted
            .into_iter()
            .filter(|(c, img)| before.get(c) != Some(img))
            .collect();
        let mut after = before.clone();
        after.extend(changes.clone());
        Ok(Plan {
            key: key.clone(),
            before,
            changes,
            after,
            generation: dep.metadata.generation.unwrap_or(0),
        })
    }

    /// Patch the images; returns the Deployment generation the rollout must reach.
    pub async fn patch(
        &self,
        key: &ServiceKey,
        images: &Images,
        cause: &str,
    ) -> Result<i64, DeployError> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &key.namespace);
        let containers: Vec<_> = images
            .iter()
            .map(|(name, image)| json!({"name": name, "image": image}))
            .collect();
        let body = json!({
            "metadata": {"annotations": {"kubernetes.io/change-cause": cause}},
            "spec": {"template": {"spec": {"containers": containers}}}
        });
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        let patch = Patch::Strategic(&body);
        let dep = (|| api.patch(&key.name, &pp, &patch))
            .retry(backoff())
            .when(transient)
            .await
            .map_err(|e| match e {
                kube::Error::Api(s) if s.code == 404 => DeployError::MissingDeployment {
                    name: key.name.clone(),
                    namespace: key.namespace.clone(),
                },
                source => DeployError::Kube {
                    action: "patching the Deployment",
                    source,
                },
            })?;
        Ok(dep.metadata.generation.unwrap_or(0))
    }

    /// Wait for the rollout that reaches `generation`, until healthy, failed, timed out, or a
    /// newer version supersedes it (`superseded` changes).
    pub async fn wait(
        &self,
        key: &ServiceKey,
        generation: i64,
        timeout: Duration,
        mut superseded: Option<watch::Receiver<u64>>,
    ) -> WaitOutcome {
        // Bounded (files cap the timeout at 24h); the deadline counts from the start of the wait.
        let deadline = Instant::now() + timeout.min(Duration::from_secs(7 * 24 * 3600));
        let ns =
            match tokio::time::timeout_at(deadline, self.watches.namespace(&key.namespace)).await {
                Ok(ns) => ns,
                Err(_) => {
                    return WaitOutcome::TimedOut {
                        last: "the namespace's watches never synced".into(),
                    }
                }
            };
        let mut changed = ns.changed.clone();
        let mut first_seen = Default::default();
        let mut last;
        loop {
            match ns.judge(
                &key.name,
                generation,
                self.config.fail_fast,
                &mut first_seen,
            ) {
                Health::Healthy => return WaitOutcome::Healthy,
                Health::Failed { reason, message } => {
                    return WaitOutcome::Failed { reason, message }
                }
                Health::Progressing(m) => last = m,
            }
            let supersede = async {
                match superseded.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return WaitOutcome::TimedOut { last },
                _ = supersede => return WaitOutcome::Superseded,
                // Grace periods end without any event; look again now and then.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// Whether the rollout at `generation` is healthy right now (one judgement from the shared
    /// watch, no waiting).
    pub async fn healthy_now(&self, key: &ServiceKey, generation: i64) -> bool {
        let ns = self.watches.namespace(&key.namespace).await;
        let mut first_seen = Default::default();
        // The watch may trail the read that produced `generation` by a moment.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut changed = ns.changed.clone();
        loop {
            match ns.judge(
                &key.name,
                generation,
                self.config.fail_fast,
                &mut first_seen,
            ) {
                Health::Healthy => return true,
                Health::Progressing(m) if m.contains("observe") && Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
                }
                _ => return false,
            }
        }
    }

    /// Record a Kubernetes Event on the Deployment (`kubectl describe` shows it). Best effort:
    /// sent in the background, never delaying or failing a deploy.
    pub fn event(&self, key: &ServiceKey, reason: &str, message: &str, warning: bool) {
        let api: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), &key.namespace);
        let now = jiff::Timestamp::now()
            .round(jiff::Unit::Second)
            .unwrap_or_else(|_| jiff::Timestamp::now())
            .to_string();
        let body = json!({
            "metadata": {"generateName": format!("{}.", key.name), "namespace": key.namespace},
            "involvedObject": {"apiVersion": "apps/v1", "kind": "Deployment", "name": key.name, "namespace": key.namespace},
            "reason": reason,
            "message": message.chars().take(1000).collect::<String>(),
            "type": if warning { "Warning" } else { "Normal" },
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1
        });
        let key = key.clone();
        tokio::spawn(async move {
            let event: k8s_openapi::api::core::v1::Event = match serde_json::from_value(body) {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(error = %e, "could not build a Kubernetes Event");
                    return;
                }
            };
            if let Err(e) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(service = %key, error = %e, "could not record a Kubernetes Event");
            }
        });
    }

    /// The images a Deployment runs now, per the shared watch.
    pub async fn live_images(&self, key: &ServiceKey) -> Option<Images> {
        self.watches
            .namespace(&key.namespace)
            .await
            .images(&key.name)
    }
}
