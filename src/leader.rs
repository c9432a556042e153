//! High availability (`--leader-elect`): replicas compete for a Kubernetes Lease, every
//! write of it conditional on the version read ([`crate::lease`]). Only the holder deploys
//! and writes; the others serve the read API and wait. A standby that takes over starts as a
//! restarted daemon would: it scans the directory against the shared record and finishes the
//! deploys the old leader left in progress. A leader that loses the Lease stops at once (its
//! supervisor restarts it as a standby), so two replicas never act together.
//!
//! Stopping is not enough for a replica that was frozen (SIGSTOP, a paused VM) past its Lease:
//! when it wakes, its tasks run before it learns the news. So the leader keeps the Lease's
//! expiry in a [`Fence`] (from each renewal, as the Lease object says it), and every PATCH and
//! record write checks it against the clock first.
//!
//! Clock fencing cannot stop a request already in flight, so no write depends on it alone: a
//! Lease write held up by a partition and delivered after another replica took over is
//! refused by its version, and so is a PATCH of a workload (see [`crate::pipeline::deploy`]). The Lease
//! is never left without a holder by depwatch: a replica releases it only while it holds it,
//! and a leader that finds it released takes it again and goes on; it stops only when another
//! replica holds it (and so can act).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use tokio_util::sync::CancellationToken;

use crate::fence::Fence;
use crate::lease::{self, Holder, LeaseClient, LeaseError, Step};

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
        source: LeaseError,
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
    watches: crate::pipeline::deploy::watches::Watches,
    record: crate::store::Store,
    standby: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
) {
    let mut warm = std::collections::BTreeSet::new();
    while standby.load(std::sync::atomic::Ordering::SeqCst) && !stop.is_cancelled() {
        let namespaces = record
            .services()
            .await
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

/// Leadership held: renewed by a task until [`Leadership::step_down`] or the Lease is lost.
pub struct Leadership {
    pub identity: String,
    client: LeaseClient,
    fence: Fence,
    /// Stops the renewals.
    renewing: CancellationToken,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.renewing.cancel();
    }
}

impl Leadership {
    /// Stop renewing and stop writing, then give the Lease up only if this replica still
    /// holds it (a write conditional on the Lease as just read): a replica that lost it, or
    /// finds it gone, releases nothing.
    pub async fn step_down(self) {
        self.renewing.cancel();
        self.fence.lose();
        match self.client.release_if_held().await {
            Ok(true) => tracing::info!("released the Lease: a standby takes over at once"),
            Ok(false) => tracing::info!("the Lease is not this replica's: nothing to release"),
            Err(e) => {
                tracing::warn!(error = %e, "could not release the Lease; it expires by itself")
            }
        }
    }
}

/// The Lease's expiry as this replica may trust it: the renew time plus the duration, less a
/// margin for the write in flight; `None` when the Lease is not this replica's.
pub fn valid_until_ms(lease: &Lease, identity: &str, margin_ms: i64) -> Option<i64> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    Some(lease::expiry_ms(spec)? - margin_ms)
}

/// What one round of holding found.
enum Kept {
    /// Renewed (or taken again): the Lease as written.
    Held(Box<Lease>),
    /// Another replica holds it and may act: this one stops.
    Gone(String),
    /// No answer, or a write that met another: the expiry known stands.
    Unsure,
}

/// One write that keeps (or takes) the Lease, after a read that decided it.
async fn take(client: &LeaseClient, current: Option<&Lease>, step: Step) -> Kept {
    let written = match step {
        Step::Renew => match current {
            Some(l) => client.renew(l).await,
            None => return Kept::Unsure,
        },
        Step::Acquire => client.acquire(current).await,
        Step::Wait => return Kept::Unsure,
    };
    match written {
        Ok(l) => Kept::Held(Box::new(l)),
        Err(e) => {
            tracing::debug!(error = %e, "the Lease write did not land");
            Kept::Unsure
        }
    }
}

/// Renew the Lease as last seen; when it changed since, read it and decide: still ours →
/// renew; nobody holds it (a replica that lost it released it) → take it again; another
/// live holder → gone.
async fn keep(client: &LeaseClient, seen: &Lease) -> Kept {
    match client.renew(seen).await {
        Ok(l) => return Kept::Held(Box::new(l)),
        Err(LeaseError::Conflict) => {}
        Err(e) => {
            tracing::debug!(error = %e, "cannot renew the Lease; its expiry stands");
            return Kept::Unsure;
        }
    }
    let current = match client.get().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the Lease; its expiry stands");
            return Kept::Unsure;
        }
    };
    let now = jiff::Timestamp::now().as_millisecond();
    match lease::holder(current.as_ref(), &client.identity, now) {
        Holder::Other {
            identity,
            expired: false,
        } => Kept::Gone(identity),
        who => {
            if who == Holder::Nobody {
                tracing::warn!("the Lease has no holder (released by a replica that no longer held it); this replica takes it again and goes on acting");
            }
            take(client, current.as_ref(), lease::next_step(&who)).await
        }
    }
}

/// Keep the Lease every `every` and `fence` at its expiry (less `margin_ms`) while this
/// replica holds it; lose the fence the moment another replica holds it. A round that cannot
/// confirm it leaves the expiry as it was, so the fence closes by itself.
async fn hold(client: LeaseClient, mut seen: Lease, fence: Fence, timing: (Duration, i64)) {
    let (every, margin_ms) = timing;
    let lost = fence.lost();
    loop {
        tokio::select! {
            _ = lost.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match keep(&client, &seen).await {
            Kept::Held(l) => {
                if let Some(until) = valid_until_ms(&l, &client.identity, margin_ms) {
                    fence.renewed_until(until);
                }
                seen = *l;
            }
            Kept::Gone(other) => {
                tracing::error!(holder = %other, "the Lease names another holder; this replica stops acting (a supervisor restarts it as a standby)");
                fence.lose();
                return;
            }
            Kept::Unsure => {}
        }
    }
}

/// Refused for good: the credentials or RBAC do not allow Leases.
fn refused(e: &LeaseError) -> bool {
    matches!(e, LeaseError::Kube(kube::Error::Api(s)) if s.code == 401 || s.code == 403)
}

/// One look at the Lease by a replica that does not hold it: taken when free or expired.
/// An error only when Leases are refused for good.
async fn try_acquire(client: &LeaseClient) -> Result<Option<Lease>, LeaseError> {
    let current = match client.get().await {
        Ok(c) => c,
        Err(e) if refused(&e) => return Err(e),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the Lease");
            return Ok(None);
        }
    };
    let now = jiff::Timestamp::now().as_millisecond();
    let step = lease::next_step(&lease::holder(current.as_ref(), &client.identity, now));
    match take(client, current.as_ref(), step).await {
        Kept::Held(l) => Ok(Some(*l)),
        _ => Ok(None),
    }
}

/// Wait until this replica holds the Lease (or `cancel`). Returns `None` when cancelled first.
/// Once held, the Lease is renewed and `fence` kept at its expiry by a task that ends at
/// [`Leadership::step_down`] (or when the [`Leadership`] is dropped) or when the Lease is
/// lost: renewals go on while in-flight deploys drain at a stop.
pub async fn acquire(
    client: kube::Client,
    config: &LeaderConfig,
    cancel: &CancellationToken,
    fence: Fence,
) -> Result<Option<Leadership>, LeaderError> {
    let namespace = config
        .lease_namespace
        .clone()
        .or_else(own_namespace)
        .unwrap_or_else(|| "default".into());
    let identity = identity();
    let duration = config.lease_duration.max(Duration::from_secs(2));
    // Renewed a third of the duration apart; a standby looks as often.
    let every = (duration / 3).max(Duration::from_secs(1));
    let leases: kube::Api<Lease> = kube::Api::namespaced(client, &namespace);
    // A request held up longer than a renewal period gives way to the next try (on another
    // connection).
    let client = LeaseClient::new(leases, &config.lease_name, &identity, duration, every);
    tracing::info!(lease = %format!("{namespace}/{}", config.lease_name), %identity, "standby: waiting to hold the Lease before acting");
    let held = loop {
        let tried = try_acquire(&client)
            .await
            .map_err(|source| LeaderError::Lease {
                namespace: namespace.clone(),
                name: config.lease_name.clone(),
                source,
            })?;
        if let Some(l) = tried {
            break l;
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(every) => {}
        }
    };
    tracing::info!(%identity, "leader: this replica holds the Lease and acts");
    // The holder renews every third of the duration, and another replica may take the Lease
    // only once it expires: the fence closes half a renewal period before expiry, after the
    // next renewal is due (a renewal slowed by the API server does not close it) and before
    // anyone else may act.
    let margin_ms = i64::try_from(every.as_millis() / 2).unwrap_or(500);
    if let Some(until) = valid_until_ms(&held, &identity, margin_ms) {
        fence.renewed_until(until);
    }
    let renewing = CancellationToken::new();
    let holding = hold(client.clone(), held, fence.clone(), (every, margin_ms));
    let until_stopped = renewing.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = until_stopped.cancelled() => {}
            _ = holding => {}
        }
    });
    Ok(Some(Leadership {
        identity,
        client,
        fence,
        renewing,
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

    /// Poll `check` every 50 ms until it holds, failing after 10 s.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_takes_a_released_lease_again_and_stops_only_for_another_holder() {
        use kube::api::{Patch, PatchParams};
        let sim = crate::sim::Sim::start(crate::sim::SimConfig::default())
            .await
            .expect("sim");
        let client = sim.client().expect("client");
        let config = LeaderConfig {
            lease_name: "l".into(),
            lease_namespace: Some("default".into()),
            lease_duration: Duration::from_secs(3),
        };
        let fence = Fence::leased();
        let held = acquire(
            client.clone(),
            &config,
            &CancellationToken::new(),
            fence.clone(),
        )
        .await
        .expect("no error")
        .expect("held");
        assert!(fence.check("a write").is_ok());
        let leases: kube::Api<Lease> = kube::Api::namespaced(client, "default");
        let read = || async { leases.get("l").await.expect("lease") };
        let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity);
        let first = read().await;
        // Released by a replica that did not hold it (an older depwatch): taken again, and
        // this replica goes on acting.
        let pp = PatchParams::default();
        let release = Patch::Merge(serde_json::json!({"spec": {"holderIdentity": null}}));
        leases.patch("l", &pp, &release).await.expect("release");
        eventually("the Lease taken again", || async {
            holder(read().await).as_deref() == Some(held.identity.as_str())
        })
        .await;
        assert!(!fence.lost().is_cancelled(), "still acting");
        // A write on the version read before is refused, whoever sends it.
        let stale = LeaseClient::new(
            leases.clone(),
            "l",
            &held.identity,
            Duration::from_secs(3),
            Duration::from_secs(3),
        );
        assert!(matches!(
            stale.renew(&first).await,
            Err(LeaseError::Conflict)
        ));
        // Another live holder: this replica stops, and releases nothing at its step-down.
        let now = jiff::Timestamp::now();
        let taken = Patch::Merge(serde_json::json!({"spec": {
            "holderIdentity": "other",
            "renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(now),
            "leaseDurationSeconds": 30,
        }}));
        leases.patch("l", &pp, &taken).await.expect("taken");
        let lost = fence.lost();
        eventually("this replica to stop", || {
            let lost = lost.clone();
            async move { lost.is_cancelled() }
        })
        .await;
        held.step_down().await;
        assert_eq!(holder(read().await).as_deref(), Some("other"));
    }
}
