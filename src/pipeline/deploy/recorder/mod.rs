//! Stage 6, recording: the one place where what happened to a deploy is written down. Each
//! lifecycle [`Event`] (and each drift) is applied to every sink: the record (service row and
//! history row), metrics, notifications, Kubernetes Events, and one log line. Nothing here
//! decides what happened; it only says so everywhere.

pub mod verdict;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::lifecycle::{Event, Finish};
use super::Deployer;
use crate::alert::{Notifier, Report};
use crate::domain::ServiceKey;
use crate::domain::{
    human_duration, DeployOutcome, Desired, Images, ServiceStatus, Tone, WorkloadKind,
};
use crate::metrics::Metrics;
use crate::store::OrLog;
use crate::store::{self, DeployRecord, ServiceChange, Store};

/// Deploys waiting for the API server right now, and its last error: `/readyz` reports them.
#[derive(Debug, Default)]
pub struct ApiWaits {
    waiting: AtomicUsize,
    last_error: Mutex<String>,
}

impl ApiWaits {
    /// How many deploys wait, and the last error seen.
    pub fn now(&self) -> (usize, String) {
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (self.waiting.load(Ordering::SeqCst), error)
    }

    fn enter(&self, error: &str) {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.note(error);
    }

    fn note(&self, error: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error.to_string();
    }

    fn leave(&self) {
        self.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Applies events to every sink. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    pub store: Store,
    pub metrics: Metrics,
    pub notifier: Notifier,
    pub deployer: Deployer,
    pub api_waits: Arc<ApiWaits>,
}

/// One deploy as it is being recorded: its history row and what people are told about it.
pub struct Attempt<'a> {
    recorder: &'a Recorder,
    key: &'a ServiceKey,
    desired: &'a Desired,
    row: Option<i64>,
    from: Images,
    to: Images,
    uid: String,
    /// The workload's kind, once the plan found it.
    kind: Option<WorkloadKind>,
    began: Instant,
    waiting: bool,
    /// Why the rollout failed, for the rollback's message.
    failure: String,
    /// The row is an unfinished rollout this deploy took up, not its own.
    adopted: bool,
    /// What a failure of the adopted rollout pins (its own content), if anything.
    adopted_pin: Option<String>,
    /// The verification checks' record, once the bake is over.
    checks: Vec<crate::domain::verify::CheckResult>,
    /// The bake as its row holds it, once it began.
    bake: Option<crate::domain::verify::BakeRow>,
}

/// What a change outside depwatch makes of the record.
struct Outside {
    outcome: DeployOutcome,
    status: ServiceStatus,
    from: String,
    to: String,
    message: String,
}

/// A drift of a service's images, as seen by the shared watch.
#[derive(Debug, Clone)]
pub struct Drift {
    pub recorded: Images,
    pub running: Images,
    /// The containers that differ, with what they run now.
    pub drifted: Images,
    pub uid: String,
    pub kind: WorkloadKind,
    pub self_heal: bool,
}

impl Recorder {
    pub fn begin<'a>(&'a self, key: &'a ServiceKey, desired: &'a Desired) -> Attempt<'a> {
        Attempt {
            recorder: self,
            key,
            desired,
            row: None,
            from: Images::new(),
            to: Images::new(),
            uid: String::new(),
            kind: None,
            began: Instant::now(),
            waiting: false,
            failure: String::new(),
            adopted: false,
            adopted_pin: None,
            checks: Vec::new(),
            bake: None,
        }
    }

    async fn change(&self, key: &ServiceKey, change: ServiceChange) {
        // Errors are logged by the store; a deploy goes on without its record.
        self.store
            .change_service(key, change)
            .await
            .or_log("change service");
    }

    /// Write a complete history row; counted in `depwatch_deploys_total`.
    async fn row(&self, key: &ServiceKey, row: RowText) {
        let record = DeployRecord {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            trigger: row.trigger,
            actor: row.actor,
            request_id: row.request_id,
            from_image: row.from,
            to_image: row.to,
            started_at: store::now(),
            outcome: row.outcome,
            message: row.message,
            ..DeployRecord::default()
        };
        if let Ok(id) = self.store.start_deploy(&record).await {
            self.store
                .finish_deploy(id, row.outcome, &record.message)
                .await
                .or_log("finish deploy");
        }
        self.metrics.deploy(row.outcome);
    }

    fn kube_event(
        &self,
        key: &ServiceKey,
        kind: WorkloadKind,
        uid: &str,
        outcome: DeployOutcome,
        message: &str,
    ) {
        if uid.is_empty() {
            return;
        }
        let reason = match outcome {
            DeployOutcome::Succeeded => "DeploySucceeded",
            DeployOutcome::Unverified => "DeployUnverified",
            DeployOutcome::Applied => "DeployApplied",
            DeployOutcome::RolledBack => "DeployRolledBack",
            DeployOutcome::RollbackFailed => "DeployRollbackFailed",
            DeployOutcome::TimedOut => "DeployTimedOut",
            DeployOutcome::Drift => "ImagesDrifted",
            DeployOutcome::ChangedOutside => "RolloutChangedOutside",
            DeployOutcome::Failed => "DeployFailed",
            DeployOutcome::Rejected => "DeployRejected",
            DeployOutcome::InProgress
            | DeployOutcome::Missing
            | DeployOutcome::Unchanged
            | DeployOutcome::Superseded
            | DeployOutcome::Interrupted => return,
        };
        let warning = !matches!(outcome.tone(), Tone::Good | Tone::Neutral);
        self.deployer.event(
            key,
            kind,
            uid,
            reason,
            &format!("depwatch: {message}"),
            warning,
        );
    }

    /// A change made outside depwatch: one history row, the service's status and message, and
    /// one report, all with the same from and to.
    async fn outside(&self, key: &ServiceKey, kind: WorkloadKind, seen: Outside, reason: String) {
        self.row(
            key,
            RowText {
                trigger: crate::domain::Trigger::Drift,
                actor: "cluster".into(),
                request_id: String::new(),
                from: seen.from.clone(),
                to: seen.to.clone(),
                outcome: seen.outcome,
                message: seen.message.clone(),
            },
        )
        .await;
        self.change(
            key,
            ServiceChange::default()
                .status(seen.status)
                .message(seen.message),
        )
        .await;
        self.notifier.report(Report {
            notice: crate::alert::Notice::Deploy,
            outcome: seen.outcome,
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            kind,
            from: seen.from,
            to: seen.to,
            duration: Duration::ZERO,
            reason,
            checks: Vec::new(),
        });
    }

    /// The workload was deleted outside depwatch: one history row, the service marked
    /// missing, people told. It comes back by itself when the workload is recreated.
    pub async fn missing(&self, key: &ServiceKey, kind: WorkloadKind, recorded: &Images) {
        let message = format!(
            "the {} was deleted outside depwatch; the file's version is deployed to it again when it is recreated",
            kind.api_kind()
        );
        tracing::warn!(service = %key, "{message}");
        let seen = Outside {
            outcome: DeployOutcome::Missing,
            status: ServiceStatus::Missing,
            from: recorded.to_string(),
            to: "-".into(),
            message: message.clone(),
        };
        self.outside(key, kind, seen, message).await;
    }

    /// Images changed outside depwatch: one history row, the service marked drifted, people
    /// told, and an Event on the Deployment.
    pub async fn drift(&self, key: &ServiceKey, d: &Drift) {
        let message = format!(
            "images changed outside depwatch: {} → {}",
            d.recorded, d.drifted
        );
        tracing::warn!(service = %key, self_heal = d.self_heal, "drift: {message}");
        let reason = if d.self_heal {
            "changed outside depwatch; restoring the desired images (--self-heal)"
        } else {
            "changed outside depwatch; the file still asks for the recorded images"
        };
        let seen = Outside {
            outcome: DeployOutcome::Drift,
            status: ServiceStatus::Drifted,
            from: d.recorded.to_string(),
            to: d.running.to_string(),
            message: message.clone(),
        };
        self.outside(key, d.kind, seen, reason.into()).await;
        self.kube_event(key, d.kind, &d.uid, DeployOutcome::Drift, &message);
    }
}

/// The text of one history row.
struct RowText {
    trigger: crate::domain::Trigger,
    actor: String,
    request_id: String,
    from: String,
    to: String,
    outcome: DeployOutcome,
    message: String,
}

impl Attempt<'_> {
    /// Apply one event to every sink.
    pub async fn apply(&mut self, event: &Event) {
        match event {
            Event::Skipped(why) => tracing::info!("{why}"),
            Event::CloseInterrupted {
                id,
                outcome,
                message,
            } => self.close_unfinished(*id, *outcome, message).await,
            Event::HandedOver => self.handed_over(),
            Event::Adopted { id, from, to, pin } => self.adopted(*id, from, to, pin),
            Event::RollingBack { restore, why } => self.rolling_back(restore, why).await,
            Event::Repin => self.pin().await,
            Event::ApiUnreachable { error, retry_in } => self.unreachable(error, *retry_in).await,
            Event::ApiBack => self.api_back().await,
            Event::NotStarted {
                from,
                requested,
                message,
                settled,
                status,
            } => {
                self.not_started(from, requested, message, *settled, *status)
                    .await
            }
            Event::AlreadyRunning {
                images,
                verified,
                record,
            } => self.already_running(images, *verified, *record).await,
            Event::Started {
                from,
                to,
                resumed,
                baseline,
                digests,
            } => {
                self.started(from, to, *resumed, baseline.as_ref(), digests)
                    .await
            }
            Event::Patched {
                generation,
                rollback,
            } => self.patched(*generation, *rollback),
            Event::RolloutFailed { outcome, reason } => self.rollout_failed(*outcome, reason).await,
            Event::Verifying {
                bake,
                checks,
                baked,
                baselines,
            } => self.verifying(*bake, *checks, *baked, baselines).await,
            Event::Verified { results } => self.verified(results).await,
            Event::Finished(f) => self.finished(f).await,
        }
    }

    /// The workload the plan found: its uid (for Kubernetes Events) and kind, recorded on
    /// the service's row.
    pub fn set_workload(&mut self, uid: &str, kind: WorkloadKind) {
        self.uid = uid.to_string();
        self.kind = Some(kind);
    }

    /// A change to the service's row, carrying the workload's kind once the plan found it.
    fn service_change(&self) -> ServiceChange {
        let change = ServiceChange::default();
        match self.kind {
            Some(kind) => change.kind(kind),
            None => change,
        }
    }

    fn kind(&self) -> WorkloadKind {
        self.kind.unwrap_or_default()
    }

    fn report(&self, outcome: DeployOutcome, from: String, to: String, reason: &str) -> Report {
        Report {
            notice: crate::alert::Notice::Deploy,
            outcome,
            service: self.key.name.clone(),
            namespace: self.key.namespace.clone(),
            kind: self.kind(),
            from,
            to,
            duration: self.began.elapsed(),
            reason: reason.to_string(),
            checks: self.checks.clone(),
        }
    }

    /// A history row for a deploy that ended as it began.
    async fn complete_row(&self, from: String, to: String, outcome: DeployOutcome, message: &str) {
        let d = self.desired;
        self.recorder
            .row(
                self.key,
                RowText {
                    trigger: d.trigger,
                    actor: d.actor.clone(),
                    request_id: d.request_id.clone(),
                    from,
                    to,
                    outcome,
                    message: message.to_string(),
                },
            )
            .await;
    }

    /// An unfinished deploy's row ends without a verdict on its version.
    async fn close_unfinished(&self, id: i64, outcome: DeployOutcome, message: &str) {
        let r = self.recorder;
        tracing::info!(deploy = id, %outcome, "{message}");
        r.store
            .finish_deploy(id, outcome, message)
            .await
            .or_log("finish deploy");
        r.metrics.deploy(outcome);
    }

    /// A newer version takes the workload over: this row stays open until its deploy
    /// patches over it or finishes it.
    fn handed_over(&mut self) {
        self.stop_waiting();
        tracing::info!(to = %self.to, "a newer version arrived during the rollout; its deploy takes this rollout over");
    }

    /// What follows is the unfinished rollout `id`'s, on its own row.
    fn adopted(&mut self, id: i64, from: &Images, to: &Images, pin: &Option<String>) {
        tracing::warn!(deploy = id, %to, "the newer version was not patched: finishing the rollout it was to replace");
        self.row = Some(id);
        self.from = from.clone();
        self.to = to.clone();
        self.adopted = true;
        self.adopted_pin = pin.clone();
        self.failure.clear();
    }

    /// Before the rollback's patch: its restore images on the deploy's row.
    async fn rolling_back(&mut self, restore: &Images, why: &str) {
        if self.failure.is_empty() {
            self.failure = why.to_string();
        }
        if let Some(id) = self.row {
            self.recorder
                .store
                .set_restore(id, restore, why)
                .await
                .or_log("set restore");
        }
    }

    /// The desired version failed: not deployed again until the file changes. An adopted
    /// rollout pins its own content, and leaves what the file holds as it was.
    async fn pin(&self) {
        if self.adopted {
            if let Some(hash) = &self.adopted_pin {
                let change = self.service_change().failed_hash(hash.clone());
                self.recorder.change(self.key, change).await;
            }
            return;
        }
        let hash = self.desired.hash.clone();
        self.recorder
            .change(
                self.key,
                self.service_change()
                    .content_hash(hash.clone())
                    .failed_hash(hash),
            )
            .await;
    }

    async fn unreachable(&mut self, error: &str, retry_in: Duration) {
        let r = self.recorder;
        if self.waiting {
            r.api_waits.note(error);
            tracing::debug!(%error, retry_in = %human_duration(retry_in), "still waiting for the API server");
            return;
        }
        self.waiting = true;
        r.api_waits.enter(error);
        tracing::warn!("{error}; retrying with backoff");
        let message = format!("waiting for the Kubernetes API server: {error}");
        r.change(
            self.key,
            self.service_change()
                .status(ServiceStatus::WaitingForApi)
                .message(message),
        )
        .await;
    }

    /// No longer waiting for the API server, because the deploy ended.
    fn stop_waiting(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.recorder.api_waits.leave();
        }
    }

    async fn api_back(&mut self) {
        if !std::mem::take(&mut self.waiting) {
            return;
        }
        let r = self.recorder;
        r.api_waits.leave();
        tracing::info!("the Kubernetes API server answers again");
        r.change(
            self.key,
            self.service_change()
                .status(ServiceStatus::Deploying)
                .message(""),
        )
        .await;
    }

    async fn not_started(
        &mut self,
        from: &Images,
        requested: &str,
        message: &str,
        settled: bool,
        status: ServiceStatus,
    ) {
        let r = self.recorder;
        let d = self.desired;
        self.stop_waiting();
        tracing::error!("deploy failed, nothing was changed in the cluster: {message}");
        self.complete_row(
            from.to_string(),
            requested.to_string(),
            DeployOutcome::Failed,
            message,
        )
        .await;
        let mut change = self.service_change().status(status).message(message);
        if settled {
            // What this content asks, resolved when the plan got that far (a paused
            // workload, a refused tag) and otherwise none: the views then show the file's
            // own words, never the images of an older version.
            change = change
                .content_hash(d.hash.clone())
                .desired(Images::parse(requested));
        }
        r.change(self.key, change).await;
        let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        r.notifier.report(self.report(
            DeployOutcome::Failed,
            or_dash(from.to_string()),
            or_dash(requested.to_string()),
            message,
        ));
    }

    async fn already_running(&mut self, images: &Images, verified: bool, record: bool) {
        let r = self.recorder;
        let d = self.desired;
        let message = if verified {
            "already running the desired images"
        } else {
            "already running the desired images, with 0 replicas (unverified)"
        };
        tracing::info!(images = %images, "{message}; no patch");
        let mut change = self
            .service_change()
            .content_hash(d.hash.clone())
            .desired(images.clone())
            .deployed(images.clone())
            .status(match (verified, self.kind) {
                (true, Some(crate::domain::WorkloadKind::CronJob)) => ServiceStatus::Applied,
                (true, _) => ServiceStatus::Succeeded,
                (false, _) => ServiceStatus::Unverified,
            })
            .failed_hash("")
            .message(message);
        if verified {
            change = change.last_good(images.clone());
        }
        r.change(self.key, change).await;
        if record {
            let text = images.to_string();
            self.complete_row(text.clone(), text, DeployOutcome::Unchanged, message)
                .await;
        }
    }

    async fn started(
        &mut self,
        from: &Images,
        to: &Images,
        resumed: Option<i64>,
        base: Option<&Images>,
        digests: &Images,
    ) {
        let r = self.recorder;
        let d = self.desired;
        self.from = from.clone();
        self.to = to.clone();
        self.row = match resumed {
            Some(id) => {
                tracing::warn!(
                    deploy = id,
                    "resuming a deploy interrupted by a stop; judging its rollout"
                );
                Some(id)
            }
            None => r
                .store
                .start_deploy(&DeployRecord {
                    namespace: self.key.namespace.clone(),
                    name: self.key.name.clone(),
                    trigger: d.trigger,
                    actor: d.actor.clone(),
                    request_id: d.request_id.clone(),
                    from_image: from.to_string(),
                    to_image: to.to_string(),
                    digests: digests.to_string(),
                    content_hash: d.hash.clone(),
                    kind: self
                        .kind
                        .map(|k| k.as_str().to_string())
                        .unwrap_or_default(),
                    started_at: store::now(),
                    outcome: DeployOutcome::InProgress,
                    ..DeployRecord::default()
                })
                .await
                .ok(),
        };
        let mut change = self
            .service_change()
            .desired(to.clone())
            .status(ServiceStatus::Deploying)
            .message("");
        if let Some(base) = base {
            change = change.last_good_if_unset(base.clone());
        }
        r.change(self.key, change).await;
    }

    /// The checks' baselines, measured before the PATCH.
    pub fn baselines(&self, values: &[Option<f64>]) {
        let shown: Vec<String> = values
            .iter()
            .flatten()
            .map(|v| crate::domain::verify::fmt_value(*v))
            .collect();
        tracing::info!(baselines = %shown.join(", "), "verification baselines measured before the patch");
    }

    /// The rollout is healthy and its checks bake: the service is `verifying`, its images
    /// not last good yet.
    async fn verifying(
        &mut self,
        bake: std::time::Duration,
        checks: usize,
        baked: std::time::Duration,
        baselines: &crate::domain::verify::Baselines,
    ) {
        let now = jiff::Timestamp::now();
        let span = |d: std::time::Duration| jiff::SignedDuration::try_from(d).unwrap_or_default();
        let began = now.checked_sub(span(baked)).unwrap_or(now);
        let until = began.checked_add(span(bake)).unwrap_or(now);
        let resumed = match baked.is_zero() {
            true => String::new(),
            false => format!(", resumed after {} baked", human_duration(baked)),
        };
        let message = format!(
            "rollout healthy; verifying {checks} check{} for {} (until {}{resumed})",
            if checks == 1 { "" } else { "s" },
            human_duration(bake),
            until.strftime("%Y-%m-%dT%H:%M:%SZ")
        );
        tracing::info!("{message}");
        let row = crate::domain::verify::BakeRow {
            started_at: began.to_string(),
            baselines: baselines.clone(),
            results: Vec::new(),
        };
        if let Some(id) = self.row {
            self.recorder
                .store
                .set_bake(id, &row)
                .await
                .or_log("record the bake");
        }
        self.bake = Some(row);
        let change = self
            .service_change()
            .status(ServiceStatus::Verifying)
            .bake_ends_at(until.to_string())
            .message(message);
        self.recorder.change(self.key, change).await;
    }

    /// The bake is over: its checks' record goes on the deploy's row, as fields of their own.
    async fn verified(&mut self, results: &[crate::domain::verify::CheckResult]) {
        tracing::info!(checks = %crate::domain::verify::summary(results), "verification over");
        self.checks = results.to_vec();
        if let (Some(id), Some(bake)) = (self.row, self.bake.as_mut()) {
            bake.results = results.to_vec();
            self.recorder
                .store
                .set_bake(id, bake)
                .await
                .or_log("record the checks");
        }
    }

    fn patched(&self, generation: i64, rollback: bool) {
        if rollback {
            tracing::info!(generation, "rollback patched; waiting for its rollout");
            return;
        }
        self.recorder
            .metrics
            .change_to_patch
            .observe(self.desired.seen_at.elapsed().as_secs_f64());
        tracing::info!(from = %self.from, to = %self.to, generation, "patched; waiting for the rollout");
    }

    async fn rollout_failed(&mut self, outcome: DeployOutcome, reason: &str) {
        let r = self.recorder;
        self.failure = reason.to_string();
        tracing::warn!(%outcome, %reason, "rollout failed; the version is pinned");
        // Pinned first, so a stop during the rollback never redeploys it.
        self.pin().await;
        // People hear at once, with the pod's reason; the rollback's outcome follows.
        r.notifier
            .report(self.report(outcome, self.from.to_string(), self.to.to_string(), reason));
    }

    async fn finished(&mut self, f: &Finish) {
        let r = self.recorder;
        let d = self.desired;
        self.stop_waiting();
        let elapsed = human_duration(self.began.elapsed());
        match f.outcome.tone() {
            Tone::Good | Tone::Neutral => {
                tracing::info!(outcome = %f.outcome, %elapsed, "{}", f.message)
            }
            _ => tracing::warn!(outcome = %f.outcome, %elapsed, "{}", f.message),
        }
        if let Some(id) = self.row {
            r.store
                .finish_deploy(id, f.outcome, &f.message)
                .await
                .or_log("finish deploy");
            r.metrics.deploy(f.outcome);
        }
        if f.outcome == DeployOutcome::Succeeded {
            r.metrics
                .change_to_healthy
                .observe(d.seen_at.elapsed().as_secs_f64());
        }
        let mut change = self.service_change();
        if f.settled {
            change = change.content_hash(d.hash.clone());
        }
        if let Some(running) = &f.running {
            change = change.deployed(running.clone());
            if f.good {
                change = change.last_good(running.clone());
            }
        }
        // An adopted rollout that did not fail changes neither the pin nor the status: those
        // speak of what the file holds now.
        let quiet = f.adopted
            && !matches!(
                f.outcome,
                DeployOutcome::RolledBack
                    | DeployOutcome::RollbackFailed
                    | DeployOutcome::Failed
                    | DeployOutcome::TimedOut
            );
        if (f.good || f.outcome == DeployOutcome::Unverified) && !f.adopted {
            change = change.failed_hash("");
        }
        if let Some(status) = f.outcome.service_status().filter(|_| !quiet) {
            change = change.status(status).message(if f.good {
                String::new()
            } else {
                f.message.clone()
            });
        }
        r.change(self.key, change).await;
        r.kube_event(
            self.key,
            self.kind(),
            &self.uid,
            f.outcome,
            &self.event_text(f),
        );
        if f.announce {
            r.notifier.report(self.finish_report(f));
        }
    }

    fn event_text(&self, f: &Finish) -> String {
        match f.outcome {
            DeployOutcome::Succeeded => format!("deployed {} (rollout healthy)", self.to),
            _ => format!("{} ({}): {}", self.to, f.outcome.label(), f.message),
        }
    }

    fn finish_report(&self, f: &Finish) -> Report {
        let reason = if f.good { "" } else { f.message.as_str() };
        match (f.outcome, &f.running) {
            // From and to as on the history row (what ran, what was tried); the reason says
            // what runs now and why: "rolled back to <restored>: <why it failed>".
            (DeployOutcome::RolledBack | DeployOutcome::RollbackFailed, Some(_)) => self.report(
                f.outcome,
                self.from.to_string(),
                self.to.to_string(),
                &f.message,
            ),
            _ => self.report(
                f.outcome,
                self.from.to_string(),
                self.to.to_string(),
                reason,
            ),
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        // A deploy abandoned mid-wait (shutdown) no longer waits for the API server.
        if self.waiting {
            self.recorder.api_waits.leave();
        }
    }
}
