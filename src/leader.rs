//! High availability (`--leader-elect`): replicas compete for a Kubernetes Lease through
//! `kube-lease-manager`. Only the holder deploys and writes; the others serve the read API and
//! wait. A standby that takes over starts as a restarted daemon would: it scans the directory
//! against the shared record and finishes the deploys the old leader left in progress. A
//! leader that loses the Lease stops at once (its supervisor restarts it as a standby), so two
//! replicas never act together.
//!
//! Stopping is not enough for a replica that was frozen (SIGSTOP, a paused VM) past its Lease:
//! when it wakes, its tasks run before it learns the news. So the leader keeps the Lease's
//! expiry in a [`Fence`] (read from the Lease object itself, every second), and every PATCH and
//! record write checks it against the clock first.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::fence::Fence;

/// `--lease-name`, `--lease-namespace`, `--lease-duration`.
#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub lease_namespace: Option<String>,
    pub lease_duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("cannot take part in leader election (Lease {namespace}/{name}): {source}")]
    Lease {
        namespace: String,
        name: String,
        source: kube_lease_manager::LeaseManagerError,
    },
}

/// The namespace of the pod this runs in, when in a cluster.
fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// This replica's name in the Lease: the pod (host) name and the process.
fn identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| "depwatch".into());
    format!("{host}-{}", std::process::id())
}

/// How often a standby looks for namespaces to keep warm.
const WARM_EVERY: Duration = Duration::from_secs(2);

/// While `standby` holds, start the watches of every namespace in the record, so a takeover
/// judges from warm caches. The record grows while the leader works, so it is read again every
/// [`WARM_EVERY`].
pub async fn keep_warm(
    watches: crate::deploy::watches::Watches,
    record: crate::store::Store,
    standby: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) {
    let mut warm = std::collections::BTreeSet::new();
    while standby.load(std::sync::atomic::Ordering::SeqCst) && !stop.is_cancelled() {
        let record = record.clone();
        let namespaces = tokio::task::spawn_blocking(move || record.services())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.namespace);
        for ns in namespaces {
            if warm.insert(ns.clone()) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = watches.namespace(&ns) => {}
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(WARM_EVERY) => {}
        }
    }
}

/// Leadership held: `lost` fires if the Lease is lost.
pub struct Leadership {
    pub identity: String,
    _state: watch::Receiver<bool>,
}

/// The Lease's expiry as this replica may trust it: the renew time plus the duration, less a
/// margin for the write in flight; `None` when the Lease is not this replica's.
pub fn valid_until_ms(lease: &Lease, identity: &str, margin_ms: i64) -> Option<i64> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref()?.0.as_millisecond();
    let duration = i64::from(spec.lease_duration_seconds?) * 1000;
    Some(renewed + duration - margin_ms)
}

/// Keep `fence` at the Lease's expiry while this replica holds it; lose it the moment the
/// Lease names someone else. A read that fails leaves the expiry as it was, so the fence closes
/// by itself when the Lease can no longer be confirmed.
async fn keep_fence(
    api: kube::Api<Lease>,
    name: String,
    identity: String,
    margin_ms: i64,
    fence: Fence,
    stop: CancellationToken,
) {
    let lost = fence.lost();
    let every = Duration::from_millis(500);
    loop {
        match api.get_opt(&name).await {
            Ok(Some(lease)) => match valid_until_ms(&lease, &identity, margin_ms) {
                Some(until) => fence.renewed_until(until),
                None => {
                    tracing::error!("the Lease names another holder; this replica stops acting");
                    fence.lose();
                    return;
                }
            },
            Ok(None) => {
                fence.lose();
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the Lease; its expiry stands"),
        }
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Wait until this replica holds the Lease (or `cancel`). Returns `None` when cancelled first.
/// Once held, `fence` is kept at the Lease's expiry, and lost the moment the Lease is, by
/// tasks of `tasks` that end at `stop`.
pub async fn acquire(
    client: kube::Client,
    config: &LeaderConfig,
    cancel: &CancellationToken,
    fence: Fence,
    tasks: (&tokio_util::task::TaskTracker, CancellationToken),
) -> Result<Option<Leadership>, LeaderError> {
    let (tasks, stop) = tasks;
    let namespace = config
        .lease_namespace
        .clone()
        .or_else(own_namespace)
        .unwrap_or_else(|| "default".into());
    let identity = identity();
    let duration = config.lease_duration.as_secs().max(2);
    let grace = (duration / 3).max(1);
    let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &namespace);
    let manager = LeaseManagerBuilder::new(client, &config.lease_name)
        .with_namespace(&namespace)
        .with_identity(&identity)
        .with_duration(duration)
        .with_grace(grace)
        .build()
        .await
        .map_err(|source| LeaderError::Lease {
            namespace: namespace.clone(),
            name: config.lease_name.clone(),
            source,
        })?;
    let (mut state, _task) = manager.watch().await;
    tracing::info!(lease = %format!("{namespace}/{}", config.lease_name), %identity, "standby: waiting to hold the Lease before acting");
    loop {
        if *state.borrow_and_update() {
            break;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            changed = state.changed() => {
                if changed.is_err() {
                    // The manager stopped; without it nobody can be sure to lead.
                    return Ok(None);
                }
            }
        }
    }
    tracing::info!(%identity, "leader: this replica holds the Lease and acts");
    // Just acquired (or renewed): valid for a duration less the margin, until the keeper
    // reads the Lease itself.
    let grace_ms = i64::try_from(grace).unwrap_or(1) * 1000;
    let duration_ms = i64::try_from(duration).unwrap_or(2) * 1000;
    fence.renewed_until(jiff::Timestamp::now().as_millisecond() + duration_ms - grace_ms);
    // The holder renews a grace before expiry, and another replica may take the Lease only
    // once it expires: the fence closes half a grace before expiry, after the renewal is due
    // (a renewal slowed by the API server does not close it) and before anyone else may act.
    let margin_ms = grace_ms / 2;
    tasks.spawn(keep_fence(
        leases,
        config.lease_name.clone(),
        identity.clone(),
        margin_ms,
        fence.clone(),
        stop.clone(),
    ));
    let mut watching = state.clone();
    let lost = fence.lost();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = lost.cancelled() => break,
                changed = watching.changed() => {
                    if changed.is_err() || !*watching.borrow_and_update() {
                        break;
                    }
                }
            }
        }
        tracing::error!("the Lease was lost; stopping at once so that only one replica acts (a supervisor restarts this one as a standby)");
        fence.lose();
    });
    Ok(Some(Leadership {
        identity,
        _state: state,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_ms: i64, seconds: i32) -> Lease {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "depwatch"},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": seconds,
                "renewTime": jiff::Timestamp::from_millisecond(renewed_ms)
                    .expect("time")
                    .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                    .to_string(),
            }
        }))
        .expect("lease")
    }

    #[test]
    fn the_fence_trusts_only_this_replicas_lease_until_its_expiry_less_the_margin() {
        let at = 1_700_000_000_000;
        assert_eq!(
            valid_until_ms(&lease("a-1", at, 15), "a-1", 5_000),
            Some(at + 10_000)
        );
        assert_eq!(valid_until_ms(&lease("b-2", at, 15), "a-1", 5_000), None);
        assert_eq!(valid_until_ms(&Lease::default(), "a-1", 5_000), None);
    }
}
