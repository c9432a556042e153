//! Stage 4, scheduling: the desired-state table, at most one queued and one running deploy per
//! service, a bounded queue, and a worker pool that bounds concurrent API writes.
//!
//! Each service has a slot: its latest desired state, a generation counter that moves on every
//! change (an in-flight rollout wait watches it and is abandoned as *superseded*), an async lock
//! that serialises its deploys, and a queued flag so a burst of changes is one queue entry
//! (latest wins). A worker permit is held only while talking to the API; waiting for a rollout
//! holds none, so a hundred slow rollouts never stall the hundred-and-first service.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::alert::{Notifier, Outcome, Report};
use crate::depfile::{DepSpec, ServiceKey};
use crate::deploy::{self, Deployer, Images, WaitOutcome};
use crate::store::{self, DeployRecord, Store};

/// What a service's file asks for now.
#[derive(Debug, Clone)]
pub struct Desired {
    pub spec: DepSpec,
    /// SHA-256 of the file content.
    pub hash: String,
    pub path: PathBuf,
    /// file, startup, resync, api, operator
    pub trigger: String,
    pub actor: String,
    /// The API request that wrote this content, if any.
    pub request_id: String,
    /// When the change was seen, for the change→patch and change→healthy metrics.
    pub seen_at: tokio::time::Instant,
}

struct Slot {
    desired: Mutex<Option<Desired>>,
    generation: watch::Sender<u64>,
    running: tokio::sync::Mutex<()>,
    queued: AtomicBool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            desired: Mutex::new(None),
            generation: watch::channel(0).0,
            running: tokio::sync::Mutex::new(()),
            queued: AtomicBool::new(false),
        }
    }
    fn desired(&self) -> Option<Desired> {
        self.desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Settings of the scheduling stage.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// How many services may talk to the API server at once.
    pub workers: usize,
    /// Bound of the queue between the reader and the dispatcher.
    pub capacity: usize,
    /// Roll back automatically when a rollout fails or times out.
    pub rollback: bool,
    /// Deploy history kept per service.
    pub history_keep: usize,
    /// Deploy history older than this is removed.
    pub history_max_age: Option<Duration>,
}

/// Gauges read by metrics and status.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
}

/// The shared scheduling state. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    slots: Arc<DashMap<ServiceKey, Arc<Slot>>>,
    tx: mpsc::Sender<ServiceKey>,
    pub stats: Arc<QueueStats>,
}

/// Everything a worker needs.
#[derive(Clone)]
pub struct Workers {
    pub deployer: Deployer,
    pub store: Store,
    pub notifier: Notifier,
    pub config: QueueConfig,
    pub metrics: crate::metrics::Metrics,
    permits: Arc<Semaphore>,
}

impl Scheduler {
    pub fn new(capacity: usize) -> (Scheduler, mpsc::Receiver<ServiceKey>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Scheduler {
                slots: Arc::default(),
                tx,
                stats: Arc::default(),
            },
            rx,
        )
    }

    fn slot(&self, key: &ServiceKey) -> Arc<Slot> {
        // Clone the Arc out so no map guard is held across an await.
        self.slots
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Slot::new()))
            .clone()
    }

    /// Services in the bounded queue, waiting for the dispatcher.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Record a new desired state and queue the service unless it is queued already.
    pub async fn submit(&self, key: ServiceKey, desired: Desired) {
        let slot = self.slot(&key);
        {
            let mut d = slot.desired.lock().unwrap_or_else(|e| e.into_inner());
            *d = Some(desired);
        }
        slot.generation.send_modify(|g| *g += 1);
        if !slot.queued.swap(true, Ordering::SeqCst) {
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            // Waits when the queue is full: back-pressure on the reader, never a lost change,
            // because the table above already holds the latest state.
            if self.tx.send(key).await.is_err() {
                tracing::debug!("scheduler stopped; change kept in the table");
            }
        }
    }

    /// Know a service's desired state without deploying it (it already runs).
    pub fn remember(&self, key: ServiceKey, desired: Desired) {
        let slot = self.slot(&key);
        *slot.desired.lock().unwrap_or_else(|e| e.into_inner()) = Some(desired);
    }

    /// The file is gone: stop managing the service (nothing in the cluster is deleted).
    pub fn forget(&self, key: &ServiceKey) {
        if let Some(slot) = self.slots.get(key).map(|s| s.clone()) {
            *slot.desired.lock().unwrap_or_else(|e| e.into_inner()) = None;
            slot.generation.send_modify(|g| *g += 1);
        }
    }

    /// The desired state of a service, if managed.
    pub fn desired(&self, key: &ServiceKey) -> Option<Desired> {
        self.slots.get(key).and_then(|s| s.desired())
    }
}

impl Workers {
    pub fn new(
        deployer: Deployer,
        store: Store,
        notifier: Notifier,
        config: QueueConfig,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Workers {
            metrics,
            permits: Arc::new(Semaphore::new(config.workers.max(1))),
            deployer,
            store,
            notifier,
            config,
        }
    }

    /// Take queued services and deploy each in its own task until cancelled; in-flight work is
    /// tracked by `tracker` so shutdown can drain it.
    pub async fn run(
        self,
        scheduler: Scheduler,
        mut rx: mpsc::Receiver<ServiceKey>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) {
        loop {
            let key = tokio::select! {
                _ = cancel.cancelled() => return,
                k = rx.recv() => match k { Some(k) => k, None => return },
            };
            let slot = scheduler.slot(&key);
            let me = self.clone();
            let stats = scheduler.stats.clone();
            let span = tracing::info_span!("deploy", service = %key);
            let cancel = cancel.clone();
            tracker.spawn(
                async move {
                    let _running = slot.running.lock().await;
                    slot.queued.store(false, Ordering::SeqCst);
                    stats.queued.fetch_sub(1, Ordering::Relaxed);
                    stats.running.fetch_add(1, Ordering::Relaxed);
                    me.process(&key, &slot, cancel).await;
                    stats.running.fetch_sub(1, Ordering::Relaxed);
                }
                .instrument(span),
            );
        }
    }

    async fn process(&self, key: &ServiceKey, slot: &Slot, cancel: CancellationToken) {
        // Subscribe before reading the desired state: a change that lands in between must count
        // as superseding this deploy.
        let mut superseded = slot.generation.subscribe();
        superseded.borrow_and_update();
        let Some(desired) = slot.desired() else {
            return;
        };
        if cancel.is_cancelled() {
            return;
        }
        let started = tokio::time::Instant::now();
        let record = self.store.service(key).ok().flatten().unwrap_or_default();
        if record.suspended {
            tracing::info!("service is suspended; change recorded, not deployed");
            return;
        }
        if record.failed_hash == desired.hash && desired.trigger != "operator" {
            tracing::info!("version failed before; not retried until the file changes");
            return;
        }
        let interrupted = self.store.in_progress(key).ok().flatten();

        // Plan and patch while holding a worker permit.
        let permit = match self.permits.acquire().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let plan = match self.deployer.plan(key, &desired.spec).await {
            Ok(p) => p,
            Err(e) => {
                drop(permit);
                self.fail_before_patch(key, &desired, &e.to_string(), started.elapsed());
                return;
            }
        };
        if let (true, Some(row)) = (plan.is_noop(), &interrupted) {
            // A stop interrupted this very deploy after its patch: judge it now, never patch
            // it again, and finish the same record.
            drop(permit);
            tracing::warn!(
                deploy = row.id,
                "resuming a deploy interrupted by a stop; judging its rollout"
            );
            let plan = deploy::Plan {
                before: store::parse_images(&record.last_good),
                ..plan
            };
            self.finish_rollout(
                key,
                &desired,
                &plan,
                Some(row.id),
                plan.generation,
                superseded,
                started,
            )
            .await;
            return;
        }
        if let Some(row) = &interrupted {
            let _ = self.store.finish_deploy(
                row.id,
                "interrupted",
                "",
                "depwatch stopped during this deploy and the file changed since",
            );
        }
        if plan.is_noop() && !self.deployer.healthy_now(key, plan.generation).await {
            // The desired images are there but their rollout is not healthy (yet): judge it
            // like a deploy in flight, and roll back to the last good images if it fails.
            drop(permit);
            tracing::info!(images = %deploy::show(&plan.after), "already patched to the desired images; judging their rollout");
            let deploy_id = self.start_record(
                key,
                &desired,
                record.last_good.clone(),
                deploy::show(&plan.after),
            );
            let _ = self.store.update_service(key, |r| {
                r.path = desired.path.display().to_string();
                r.desired = deploy::show(&plan.after);
                r.status = "deploying".into();
            });
            let before = store::parse_images(&record.last_good);
            let plan = deploy::Plan {
                before: if before.is_empty() {
                    plan.before.clone()
                } else {
                    before
                },
                ..plan
            };
            self.finish_rollout(
                key,
                &desired,
                &plan,
                deploy_id,
                plan.generation,
                superseded,
                started,
            )
            .await;
            return;
        }
        if plan.is_noop() {
            drop(permit);
            tracing::info!(images = %deploy::show(&plan.after), "already running the desired images, healthy; no patch");
            let _ = self.store.update_service(key, |r| {
                r.path = desired.path.display().to_string();
                r.content_hash = desired.hash.clone();
                r.desired = deploy::show(&plan.after);
                r.deployed = deploy::show(&plan.after);
                r.last_good = deploy::show(&plan.after);
                r.status = "succeeded".into();
                r.failed_hash.clear();
                r.message = "already running the desired images".into();
            });
            if desired.trigger != "startup" && desired.trigger != "resync" {
                self.record_instant(
                    key,
                    &desired,
                    &plan.before,
                    &plan.after,
                    "unchanged",
                    "already running the desired images",
                );
            }
            return;
        }
        let deploy_id = self.start_record(
            key,
            &desired,
            deploy::show(&plan.before),
            deploy::show(&plan.after),
        );
        let _ = self.store.update_service(key, |r| {
            r.path = desired.path.display().to_string();
            r.desired = deploy::show(&plan.after);
            if r.last_good.is_empty() {
                r.last_good = deploy::show(&plan.before);
            }
            r.status = "deploying".into();
            r.message.clear();
        });
        let file = desired
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        let cause = format!(
            "depwatch: {file} ({}) set {}",
            desired.trigger,
            deploy::show(&plan.changes)
        );
        let generation = match self.deployer.patch(key, &plan.changes, &cause).await {
            Ok(g) => g,
            Err(e) => {
                drop(permit);
                if let Some(id) = deploy_id {
                    let _ = self.store.finish_deploy(id, "failed", "", &e.to_string());
                }
                self.fail_before_patch(key, &desired, &e.to_string(), started.elapsed());
                return;
            }
        };
        drop(permit);
        self.metrics
            .change_to_patch
            .observe(desired.seen_at.elapsed().as_secs_f64());
        tracing::info!(from = %deploy::show(&plan.before), to = %deploy::show(&plan.after), generation, "patched; waiting for the rollout");
        self.finish_rollout(
            key, &desired, &plan, deploy_id, generation, superseded, started,
        )
        .await;
    }

    /// Wait for the rollout and act on its outcome.
    #[allow(clippy::too_many_arguments)]
    async fn finish_rollout(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        plan: &deploy::Plan,
        deploy_id: Option<i64>,
        generation: i64,
        superseded: watch::Receiver<u64>,
        started: tokio::time::Instant,
    ) {
        let timeout = desired
            .spec
            .rollout_timeout
            .unwrap_or(self.deployer.config().rollout_timeout);
        let outcome = self
            .deployer
            .wait(key, generation, timeout, Some(superseded))
            .await;
        let elapsed = started.elapsed();
        let report = |outcome: Outcome, reason: String| Report {
            outcome,
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            from: deploy::show(&plan.before),
            to: deploy::show(&plan.after),
            duration: elapsed,
            reason,
        };
        let finish = |outcome: &str, message: &str| {
            self.metrics.deploy(outcome);
            if let Some(id) = deploy_id {
                let _ = self.store.finish_deploy(id, outcome, "", message);
            }
        };
        match outcome {
            WaitOutcome::Healthy => {
                tracing::info!(seconds = elapsed.as_secs_f64(), "rollout healthy");
                finish("succeeded", "rollout healthy");
                self.metrics
                    .change_to_healthy
                    .observe(desired.seen_at.elapsed().as_secs_f64());
                let _ = self.store.update_service(key, |r| {
                    r.content_hash = desired.hash.clone();
                    r.deployed = deploy::show(&plan.after);
                    r.last_good = deploy::show(&plan.after);
                    r.status = "succeeded".into();
                    r.failed_hash.clear();
                    r.message.clear();
                });
                self.notifier
                    .report(report(Outcome::Succeeded, String::new()));
                self.deployer.event(
                    key,
                    "DeploySucceeded",
                    &format!(
                        "depwatch deployed {} (rollout healthy)",
                        deploy::show(&plan.after)
                    ),
                    false,
                );
            }
            WaitOutcome::Superseded => {
                tracing::info!("a newer version arrived; this rollout wait is superseded");
                finish("superseded", "a newer version arrived during the rollout");
            }
            WaitOutcome::Failed { reason, message } => {
                let why = format!("{reason}: {message}");
                tracing::warn!(%reason, %message, "rollout failed");
                self.after_failure(
                    key,
                    desired,
                    plan,
                    deploy_id,
                    "failed",
                    &why,
                    Outcome::Failed,
                    elapsed,
                )
                .await;
            }
            WaitOutcome::TimedOut { last } => {
                let why = format!(
                    "rollout not healthy after {}: {last}",
                    humantime::format_duration(timeout)
                );
                tracing::warn!(%why, "rollout timed out");
                self.after_failure(
                    key,
                    desired,
                    plan,
                    deploy_id,
                    "timed_out",
                    &why,
                    Outcome::TimedOut,
                    elapsed,
                )
                .await;
            }
        }
    }

    /// A failed or timed-out rollout: pin the version, roll back if configured, record, notify.
    #[allow(clippy::too_many_arguments)]
    async fn after_failure(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        plan: &deploy::Plan,
        deploy_id: Option<i64>,
        outcome: &str,
        why: &str,
        notify_as: Outcome,
        elapsed: Duration,
    ) {
        let rollback = desired.spec.rollback.unwrap_or(self.config.rollback);
        // Pin the failed version first, so a stop during the rollback never redeploys it.
        let _ = self.store.update_service(key, |r| {
            r.content_hash = desired.hash.clone();
            r.failed_hash = desired.hash.clone();
        });
        // People hear about the failure at once, with the pod's reason; the rollback's outcome
        // follows in its own message.
        self.notifier.report(Report {
            outcome: notify_as,
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            from: deploy::show(&plan.before),
            to: deploy::show(&plan.after),
            duration: elapsed,
            reason: why.to_string(),
        });
        let mut final_outcome = outcome.to_string();
        let mut message = why.to_string();
        let mut report_outcome = None;
        let mut deployed = deploy::show(&plan.after);
        if rollback {
            // Restore the last images known to be healthy: the ones captured before the patch,
            // unless those were themselves an unfinished (superseded) rollout.
            let last_good = self
                .store
                .service(key)
                .ok()
                .flatten()
                .map(|r| store::parse_images(&r.last_good))
                .unwrap_or_default();
            let restore: Images = plan
                .after
                .keys()
                .filter(|c| {
                    plan.before.get(*c) != plan.after.get(*c)
                        || last_good
                            .get(*c)
                            .is_some_and(|g| plan.after.get(*c) != Some(g))
                })
                .filter_map(|c| {
                    last_good
                        .get(c)
                        .or_else(|| plan.before.get(c))
                        .map(|i| (c.clone(), i.clone()))
                })
                .collect();
            let cause = format!("depwatch: rollback after {outcome} ({why})");
            let result = if restore.is_empty() {
                Err(deploy::DeployError::Resolve(crate::depfile::ResolveError(
                    "no earlier images are known to restore".into(),
                )))
            } else {
                match self.permits.acquire().await {
                    Ok(_permit) => self.deployer.patch(key, &restore, &cause).await,
                    Err(_) => return,
                }
            };
            match result {
                Ok(generation) => {
                    let timeout = self.deployer.config().rollout_timeout;
                    match self.deployer.wait(key, generation, timeout, None).await {
                        WaitOutcome::Healthy => {
                            let mut now_running = plan.after.clone();
                            now_running.extend(restore.clone());
                            final_outcome = "rolled_back".into();
                            message =
                                format!("rolled back to {}: {why}", deploy::show(&now_running));
                            report_outcome = Some(Outcome::RolledBack);
                            deployed = deploy::show(&now_running);
                        }
                        other => {
                            final_outcome = "rollback_failed".into();
                            message =
                                format!("{why}; the rollback did not become healthy: {other:?}");
                            report_outcome = Some(Outcome::RollbackFailed);
                        }
                    }
                }
                Err(e) => {
                    final_outcome = "rollback_failed".into();
                    message = format!("{why}; the rollback patch failed: {e}");
                    report_outcome = Some(Outcome::RollbackFailed);
                }
            }
            tracing::warn!(outcome = %final_outcome, "{message}");
        }
        self.metrics.deploy(&final_outcome);
        if let Some(id) = deploy_id {
            let _ = self.store.finish_deploy(id, &final_outcome, "", &message);
        }
        let _ = self.store.update_service(key, |r| {
            r.content_hash = desired.hash.clone();
            r.failed_hash = desired.hash.clone();
            r.deployed = deployed.clone();
            r.status = final_outcome.clone();
            r.message = message.clone();
        });
        self.deployer.event(
            key,
            match final_outcome.as_str() {
                "rolled_back" => "DeployRolledBack",
                "rollback_failed" => "DeployRollbackFailed",
                "timed_out" => "DeployTimedOut",
                _ => "DeployFailed",
            },
            &format!(
                "depwatch: {} ({final_outcome}): {message}",
                deploy::show(&plan.after)
            ),
            true,
        );
        if let Some(outcome) = report_outcome {
            // The rollback message reads "rolled back web (prod) from <failed> to <restored>".
            self.notifier.report(Report {
                outcome,
                service: key.name.clone(),
                namespace: key.namespace.clone(),
                from: deploy::show(&plan.after),
                to: deployed.clone(),
                duration: elapsed,
                reason: why.to_string(),
            });
        }
    }

    fn fail_before_patch(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        message: &str,
        elapsed: Duration,
    ) {
        tracing::error!(%message, "deploy failed before any change");
        // The content counts as acted on: a resync or restart does not retry (and re-report) it;
        // re-saving the file or `depwatch retry` does.
        let _ = self.store.update_service(key, |r| {
            r.path = desired.path.display().to_string();
            r.content_hash = desired.hash.clone();
            r.status = "failed".into();
            r.message =
                format!("{message} (fix it, then re-save the file or run `depwatch retry`)");
        });
        self.record_instant(
            key,
            desired,
            &Images::new(),
            &Images::new(),
            "failed",
            message,
        );
        self.notifier.report(Report {
            outcome: Outcome::Failed,
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            from: "-".into(),
            to: desired
                .spec
                .images
                .iter()
                .map(|(_, i)| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            duration: elapsed,
            reason: message.to_string(),
        });
    }

    /// Record a deploy as started, on behalf of `desired`.
    fn start_record(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        from: String,
        to: String,
    ) -> Option<i64> {
        self.store
            .start_deploy(&DeployRecord {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                trigger: desired.trigger.clone(),
                actor: desired.actor.clone(),
                request_id: desired.request_id.clone(),
                from_image: from,
                to_image: to,
                started_at: store::now(),
                outcome: "in_progress".into(),
                ..DeployRecord::default()
            })
            .ok()
    }

    fn record_instant(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        from: &Images,
        to: &Images,
        outcome: &str,
        message: &str,
    ) {
        self.metrics.deploy(outcome);
        if let Ok(id) = self.store.start_deploy(&DeployRecord {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            trigger: desired.trigger.clone(),
            actor: desired.actor.clone(),
            request_id: desired.request_id.clone(),
            from_image: deploy::show(from),
            to_image: deploy::show(to),
            started_at: store::now(),
            outcome: "in_progress".into(),
            ..DeployRecord::default()
        }) {
            let _ = self.store.finish_deploy(id, outcome, "", message);
        }
    }
}
