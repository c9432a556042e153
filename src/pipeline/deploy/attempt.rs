//! Stage 5, doing: carries out one deploy. Each [`Action`] the lifecycle asks for becomes one
//! call to the cluster (API writes hold a worker permit), its result goes back as an
//! [`Input`], and each [`Event`](super::lifecycle::Event) goes to the recorder.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;

use super::lifecycle::{Action, Failure, Input, Known, Lifecycle, Settings, Unfinished};
use super::recorder::{Attempt, Recorder};
use super::{DeployError, Deployer};
use crate::domain::verify::{BakeRow, ResumedBake};
use crate::domain::{Desired, Images, Plan, ServiceKey};
use crate::store::OrLog;
use crate::store::{DeployRecord, StoreError};

/// Bounds how many deploys talk to the API server at once. Waiting for a rollout holds no
/// permit, so slow rollouts never stall other services.
#[derive(Clone)]
pub struct Permits(Arc<Semaphore>);

impl Permits {
    pub fn new(n: usize) -> Self {
        Permits(Arc::new(Semaphore::new(n.max(1))))
    }

    /// Run `work` holding one permit; the permit is released when `work` ends.
    pub async fn hold<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        let _permit = self.0.acquire().await.ok()?;
        Some(work.await)
    }
}

/// Everything a deploy needs. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub deployer: Deployer,
    pub recorder: Recorder,
    pub permits: Permits,
    /// Roll back automatically when a rollout fails or times out (a file may override it).
    pub rollback: bool,
    /// Shutdown: a deploy that is only waiting to try the API server again stops at once (what
    /// it already wrote is finished at the next start).
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Takes the samples of a file's `verify:` checks.
    pub prober: crate::checks::probe::Prober,
}

/// The workload one deploy acts on: its service, and its kind once the plan found it.
struct Target<'a> {
    key: &'a ServiceKey,
    kind: &'a mut crate::domain::WorkloadKind,
    /// The plan (or observation) the deploy last made: what its PATCH is conditional on.
    basis: &'a mut Option<Plan>,
}

/// An open deploy row, as the lifecycle needs it.
fn unfinished(d: &DeployRecord) -> Unfinished {
    let ran_for = d
        .started_at
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|at| {
            std::time::Duration::try_from(jiff::Timestamp::now().duration_since(at)).ok()
        })
        .unwrap_or_default();
    Unfinished {
        id: d.id,
        from: Images::parse(&d.from_image),
        to: Images::parse(&d.to_image),
        restore: Images::parse(&d.restore),
        why: if d.restore.is_empty() {
            String::new()
        } else {
            d.message.clone()
        },
        ran_for,
        kind: d.kind.parse().ok(),
        hash: d.content_hash.clone(),
        bake: d.bake.as_ref().and_then(resumed_bake),
    }
}

/// A bake recorded on a deploy row: how long it has baked since it began.
fn resumed_bake(row: &BakeRow) -> Option<ResumedBake> {
    let began = row.started_at.parse::<jiff::Timestamp>().ok()?;
    let baked = std::time::Duration::try_from(jiff::Timestamp::now().duration_since(began))
        .unwrap_or_default();
    Some(ResumedBake {
        baked,
        baselines: row.baselines.clone(),
    })
}

fn failure(e: DeployError) -> Failure {
    Failure {
        conflict: matches!(e, DeployError::Conflict { .. }),
        transient: e.is_transient(),
        again_at_resync: matches!(e, DeployError::Registry(_)),
        message: e.to_string(),
    }
}

impl Engine {
    /// What the record knows of the service as a deploy begins.
    async fn known(&self, key: &ServiceKey, desired: &Desired) -> Result<Known, StoreError> {
        let (record, open) = self.recorder.store.deploy_basis(key).await?;
        let record = record.unwrap_or_default();
        let mut open = open.iter().map(unfinished);
        Ok(Known {
            pinned: !record.failed_hash.is_empty() && record.failed_hash == desired.hash,
            settled: record.content_hash,
            last_good: record.last_good,
            suspended: record.suspended,
            interrupted: open.next(),
            older: open.collect(),
        })
    }

    /// [`Self::known`], waiting for a record that cannot be read (a pin it holds must not be
    /// deployed over) for at most `patience`; `None` when it never answered.
    async fn known_when_readable(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        patience: std::time::Duration,
    ) -> Option<Known> {
        let give_up = Instant::now() + patience;
        let mut said = false;
        loop {
            match self.known(key, desired).await {
                Ok(k) => return Some(k),
                Err(e) if Instant::now() >= give_up => {
                    tracing::error!(error = %e, "the record cannot be read; the deploy is not started (tried again at the next resync or file change)");
                    return None;
                }
                Err(e) => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::warn!(error = %e, "the record cannot be read; the deploy waits for it");
                    }
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Deploy `desired` to the service, from plan to verdict. `superseded` moves when a newer
    /// version arrives.
    pub async fn deploy(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        mut superseded: watch::Receiver<u64>,
    ) {
        let settings = Settings {
            rollout_timeout: desired
                .spec
                .rollout_timeout
                .unwrap_or(self.deployer.config().rollout_timeout),
            rollback: self.rollback,
        };
        let Some(known) =
            Box::pin(self.known_when_readable(key, desired, settings.rollout_timeout)).await
        else {
            return;
        };
        let mut machine = Lifecycle::new(desired.clone(), known, settings, Instant::now());
        let mut attempt = self.recorder.begin(key, desired);
        let (mut events, mut action) = machine.start();
        // The file's kind until the plan finds the workload.
        let mut kind = desired.spec.kind.unwrap_or_default();
        let mut basis = None;
        // Each deploy in flight keeps this future for as long as its rollout is waited on,
        // and an inline future is as large as its largest step: the steps are boxed, so one
        // in flight holds about 7 KB instead of 17 KB (a burst of 10,000 holds them all).
        loop {
            for e in &events {
                Box::pin(attempt.apply(e)).await;
            }
            let target = Target {
                key,
                kind: &mut kind,
                basis: &mut basis,
            };
            let act = Box::pin(self.act(target, desired, action, &mut superseded, &mut attempt));
            let Some(input) = act.await else {
                return;
            };
            (events, action) = machine.step(input, Instant::now());
        }
    }

    /// [`Self::deploy`], then a look at what runs against what was applied: anything else
    /// is drift (an outside change the deploy's own watch could not attribute).
    pub async fn deploy_and_compare(
        &self,
        key: &ServiceKey,
        desired: &Desired,
        superseded: watch::Receiver<u64>,
    ) {
        self.deploy(key, desired, superseded).await;
        self.deployer.watches().changed().add(key.clone());
    }

    /// The service's file was removed while its deploy ran: once that deploy is over, the
    /// service is no longer managed.
    pub async fn let_go(&self, key: &ServiceKey) {
        let change = super::recorder::verdict::unmanaged(
            "the dependency file was removed; the rollout under way was finished first",
        );
        self.recorder
            .store
            .change_service(key, change)
            .await
            .or_log("change service");
    }

    /// Carry out one action; `None` when the deploy is over (or the permits are closed).
    async fn act(
        &self,
        target: Target<'_>,
        desired: &Desired,
        action: Action,
        superseded: &mut watch::Receiver<u64>,
        attempt: &mut Attempt<'_>,
    ) -> Option<Input> {
        let Target { key, kind, basis } = target;
        Some(match action {
            Action::Done => return None,
            Action::Plan => {
                let target = Target { key, kind, basis };
                Box::pin(self.plan(target, desired, attempt)).await?
            }
            Action::Observe { kind: wanted } => {
                let target = Target { key, kind, basis };
                Box::pin(self.observe(target, wanted, attempt)).await?
            }
            Action::CheckHealth { generation } => {
                Input::Health(Box::pin(self.deployer.health_now(key, *kind, generation)).await)
            }
            Action::Patch { images, cause } => {
                // What the deploy is about to do is in the record first (kept in memory while
                // the record is away), so a stop right after the PATCH is finished at the next
                // start.
                self.recorder.store.settled().await;
                let patch = self
                    .deployer
                    .patch(key, *kind, &images, &cause, basis.as_ref());
                Input::Patched(Box::pin(self.permits.hold(patch)).await?.map_err(failure))
            }
            Action::Wait {
                generation,
                applied,
                replaced,
                deadline,
                supersedable,
            } => {
                let rx = supersedable.then(|| superseded.clone());
                let target = crate::pipeline::deploy::WaitFor {
                    generation,
                    applied: &applied,
                    replaced: replaced.as_ref(),
                };
                let wait = self.deployer.wait(key, *kind, target, deadline, rx);
                Input::Waited(wait.await)
            }
            Action::Measure => Box::pin(self.measure(desired, attempt)).await,
            Action::Verify {
                applied,
                baselines,
                baked,
            } => {
                let b = self.baking(key, *kind, desired, &applied, &baselines.0, baked);
                let bake = super::verify::bake(
                    &self.deployer,
                    &self.prober,
                    b,
                    superseded,
                    &self.shutdown,
                );
                Input::Verified(Box::pin(bake).await?)
            }
            Action::Sleep {
                delay,
                supersedable,
            } => Box::pin(self.sleep(delay, supersedable, superseded)).await?,
        })
    }

    /// Read the workload and check its images with the registries; the plan or why not.
    async fn plan(
        &self,
        Target { key, kind, basis }: Target<'_>,
        desired: &Desired,
        attempt: &mut Attempt<'_>,
    ) -> Option<Input> {
        let read = Box::pin(self.permits.hold(self.deployer.plan(key, &desired.spec))).await?;
        // The registries are asked holding no worker: a deploy waiting on a hung registry
        // never holds up another service's.
        let result = match read {
            Ok(unchecked) => {
                let approved = desired.spec.approved_digests.as_ref();
                Box::pin(self.deployer.check_registries(unchecked, approved)).await
            }
            Err(e) => Err(e),
        };
        let found = match &result {
            Ok(p) => Some((p.uid.clone(), p.kind)),
            // Refused after the workload was found (owned, bounds, registry): the record
            // names its kind all the same.
            Err(_) => self.deployer.seen(key, desired.spec.kind),
        };
        if let Some((uid, found)) = found {
            attempt.set_workload(&uid, found);
            *kind = found;
        }
        if let Ok(p) = &result {
            *basis = Some(p.clone());
        }
        Some(Input::Planned(result.map_err(failure)))
    }

    /// Find the workload a deploy left unfinished runs, by its kind.
    async fn observe(
        &self,
        Target { key, kind, basis }: Target<'_>,
        wanted: Option<crate::domain::WorkloadKind>,
        attempt: &mut Attempt<'_>,
    ) -> Option<Input> {
        let seen = Box::pin(self.permits.hold(self.deployer.observe(key, wanted))).await?;
        if let Ok(Some(p)) = &seen {
            attempt.set_workload(&p.uid, p.kind);
            *kind = p.kind;
            *basis = Some(p.clone());
        }
        Some(Input::Observed(seen.map_err(failure)))
    }

    /// The checks' values before the rollout, recorded with the attempt.
    async fn measure(&self, desired: &Desired, attempt: &mut Attempt<'_>) -> Input {
        let measured = match desired.spec.verify.as_ref() {
            Some(v) => Box::pin(self.prober.baselines(v)).await,
            None => Vec::new(),
        };
        attempt.baselines(&measured);
        Input::Measured(measured)
    }

    /// What a bake needs to know of this deploy.
    fn baking<'a>(
        &'a self,
        key: &'a ServiceKey,
        kind: crate::domain::WorkloadKind,
        desired: &'a Desired,
        applied: &'a Images,
        baselines: &'a [Option<f64>],
        baked: std::time::Duration,
    ) -> super::verify::Baking<'a> {
        super::verify::Baking {
            key,
            kind,
            desired,
            applied,
            baselines,
            baked,
            metrics: &self.recorder.metrics,
            store: &self.recorder.store,
        }
    }

    /// Wait before trying the API server again, unless a newer version comes first; `None`
    /// when the daemon stops meanwhile.
    async fn sleep(
        &self,
        delay: std::time::Duration,
        supersedable: bool,
        superseded: &mut watch::Receiver<u64>,
    ) -> Option<Input> {
        let newer = async {
            match supersedable {
                true if superseded.changed().await.is_ok() => {}
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => Some(Input::Slept),
            _ = newer => Some(Input::Superseded),
            _ = self.shutdown.cancelled() => {
                tracing::info!("stopping while waiting to try the API server again; the deploy is taken up at the next start");
                None
            }
        }
    }
}
