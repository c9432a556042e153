//! Stage 5, doing: the bake of a healthy rollout. Each interval, one round of samples
//! (`checks::probe`) is judged by [`Bake`] (pure); between rounds, a newer version, an
//! outside change of the images or the workload's removal ends the bake.

use tokio::sync::watch;
use tokio::time::Instant;

use super::Deployer;
use crate::checks::probe::{Prober, Target};
use crate::domain::verify::{Bake, BakeVerdict, VerifyOutcome};
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
        let samples = tokio::select! {
            s = prober.round(v, &target, b.baselines) => s,
            _ = superseded.changed() => return Some(VerifyOutcome::Superseded),
            _ = shutdown.cancelled() => return None,
        };
        for s in &samples {
            let label = crate::metrics::ResultLabel {
                result: s.result().to_string(),
            };
            b.metrics.verify_checks.get_or_create(&label).inc();
        }
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
        tokio::select! {
            _ = tokio::time::sleep(v.interval) => {}
            _ = superseded.changed() => return Some(VerifyOutcome::Superseded),
            _ = shutdown.cancelled() => return None,
        }
    }
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
