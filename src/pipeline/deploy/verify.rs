//! Stage 5, doing: the bake of a healthy rollout. Each interval, one round of samples
//! (`checks::probe`) is judged by [`Bake`] (pure); between rounds, a newer version, an
//! outside change of the images or the workload's removal ends the bake.

use tokio::sync::watch;
use tokio::time::Instant;

use super::Deployer;
use crate::checks::probe::{Prober, Target};
use crate::domain::verify::{Bake, BakeVerdict, CheckResult, Sample, VerifyOutcome};
use crate::domain::{Desired, ImageSpec, Images, ServiceKey, WorkloadKind};

/// The version a file deploys, as a `/version` page would say it: the tag of its first
/// image (a digest as written).
pub fn version_of(desired: &Desired) -> String {
    match desired.spec.images.first().map(|(_, s)| s) {
        Some(ImageSpec::Tag(t) | ImageSpec::Digest(t)) => t.clone(),
        Some(ImageSpec::Reference(r)) => {
            if let Some((_, digest)) = r.split_once('@') {
                return digest.to_string();
            }
            let last = r.rsplit('/').next().unwrap_or(r);
            last.split_once(':')
                .map_or("latest".to_string(), |(_, t)| t.to_string())
        }
        None => String::new(),
    }
}

/// What a bake needs from the deploy.
pub struct Baking<'a> {
    pub key: &'a ServiceKey,
    pub kind: WorkloadKind,
    pub desired: &'a Desired,
    pub applied: &'a Images,
    pub baselines: &'a [Option<f64>],
    /// Baked before a stop: the bake goes on for the time left.
    pub baked: std::time::Duration,
    pub metrics: &'a crate::metrics::Metrics,
    /// Where an operator's word on the bake is recorded (`depwatch promote`, `rollback`).
    pub store: &'a crate::store::Store,
}

/// How often a bake looks for an operator's word between its rounds.
const JUDGEMENT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// How the bake ends by an operator's word for this version, if one is recorded.
async fn judged(
    b: &Baking<'_>,
    results: &[crate::domain::verify::CheckResult],
) -> Option<VerifyOutcome> {
    let row = b.store.service(b.key).await.ok().flatten()?;
    row.judged?.outcome(&b.desired.hash, results.to_vec())
}

/// A newer version arrived: an operator's `rollback` (recorded before it wrote the file)
/// fails the bake; anything else supersedes it.
async fn newer(b: &Baking<'_>, results: &[crate::domain::verify::CheckResult]) -> VerifyOutcome {
    match judged(b, results).await {
        Some(failed @ VerifyOutcome::Failed { .. }) => failed,
        _ => VerifyOutcome::Superseded,
    }
}

/// Bake the file's checks; `None` when the daemon stops meanwhile (the row stays open and
/// the next start finishes it).
pub async fn bake(
    deployer: &Deployer,
    prober: &Prober,
    b: Baking<'_>,
    superseded: &mut watch::Receiver<u64>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<VerifyOutcome> {
    let Some(v) = &b.desired.spec.verify else {
        return Some(VerifyOutcome::Passed {
            results: Vec::new(),
        });
    };
    let version = version_of(b.desired);
    let target = Target {
        namespace: &b.key.namespace,
        workload: &b.key.name,
        version: &version,
    };
    let mut tally = Bake::new(v, b.baselines);
    let now = Instant::now();
    let start = now.checked_sub(b.baked).unwrap_or(now);
    loop {
        if let Some(end) = outside(deployer, &b).await {
            return Some(end);
        }
        if let Some(end) = judged(&b, &tally.results).await {
            return Some(end);
        }
        let samples = tokio::select! {
            s = prober.round(v, &target, b.baselines) => s,
            _ = superseded.changed() => return Some(newer(&b, &tally.results).await),
            _ = shutdown.cancelled() => return None,
        };
        count(b.metrics, &samples);
        let verdict = tally.round(samples, start.elapsed());
        if verdict != BakeVerdict::Continue {
            b.metrics.bake.observe(start.elapsed().as_secs_f64());
        }
        match verdict {
            BakeVerdict::Passed => {
                return Some(VerifyOutcome::Passed {
                    results: tally.results,
                })
            }
            BakeVerdict::Failed(reason) => {
                return Some(VerifyOutcome::Failed {
                    reason,
                    results: tally.results,
                })
            }
            BakeVerdict::Continue => {}
        }
        let next = Instant::now() + v.interval;
        if let Some(end) = until_next_round(&b, &tally.results, next, superseded, shutdown).await {
            return end;
        }
    }
}

/// Each sample in the metrics, by its result.
fn count(metrics: &crate::metrics::Metrics, samples: &[Sample]) {
    for s in samples {
        let label = crate::metrics::ResultLabel {
            result: s.result().to_string(),
        };
        metrics.verify_checks.get_or_create(&label).inc();
    }
}

/// Until the next round, an operator's word is looked for every second. `Some` ends the
/// bake: with its outcome, or with `None` when the daemon stops.
async fn until_next_round(
    b: &Baking<'_>,
    results: &[CheckResult],
    next: Instant,
    superseded: &mut watch::Receiver<u64>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<Option<VerifyOutcome>> {
    while Instant::now() < next {
        let step = next
            .saturating_duration_since(Instant::now())
            .min(JUDGEMENT_POLL);
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = superseded.changed() => return Some(Some(newer(b, results).await)),
            _ = shutdown.cancelled() => return Some(None),
        }
        if let Some(end) = judged(b, results).await {
            return Some(Some(end));
        }
    }
    None
}

/// The workload is gone or runs other images than the bake's: the bake is not its to judge.
async fn outside(deployer: &Deployer, b: &Baking<'_>) -> Option<VerifyOutcome> {
    match deployer.observe(b.key, Some(b.kind)).await {
        Ok(None) => Some(VerifyOutcome::Disappeared),
        Ok(Some(p)) if !b.applied.iter().all(|(c, i)| p.after.get(c) == Some(i)) => {
            Some(VerifyOutcome::ChangedOutside { running: p.after })
        }
        // Running what was applied, or not readable now (the checks still say how it is).
        _ => None,
    }
}
