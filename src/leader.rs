//! High availability (`--leader-elect`): replicas compete for a Kubernetes Lease through
//! `kube-lease-manager`. Only the holder deploys and writes; the others serve the read API and
//! wait. A standby that takes over starts as a restarted daemon would: it scans the directory
//! against the shared record and judges again the deploys the old leader left in progress. A
//! leader that loses the Lease stops at once (its supervisor restarts it as a standby), so two
//! replicas never act together.

use std::time::Duration;

use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    watches: crate::deploy::cache::Watches,
    record: crate::store::Store,
    standby: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut warm = std::collections::BTreeSet::new();
    while standby.load(std::sync::atomic::Ordering::SeqCst) {
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
                watches.namespace(&ns).await;
            }
        }
        tokio::time::sleep(WARM_EVERY).await;
    }
}

/// Leadership held: `lost` fires if the Lease is lost.
pub struct Leadership {
    pub identity: String,
    _state: watch::Receiver<bool>,
}

/// Wait until this replica holds the Lease (or `cancel`). Returns `None` when cancelled first.
/// Once held, `lost` is cancelled the moment the Lease is lost.
pub async fn acquire(
    client: kube::Client,
    config: &LeaderConfig,
    cancel: &CancellationToken,
    lost: CancellationToken,
) -> Result<Option<Leadership>, LeaderError> {
    let namespace = config
        .lease_namespace
        .clone()
        .or_else(own_namespace)
        .unwrap_or_else(|| "default".into());
    let identity = identity();
    let duration = config.lease_duration.as_secs().max(2);
    let grace = (duration / 3).max(1);
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
    let mut watching = state.clone();
    tokio::spawn(async move {
        loop {
            if watching.changed().await.is_err() || !*watching.borrow_and_update() {
                tracing::error!("the Lease was lost; stopping so that only one replica acts (a supervisor restarts this one as a standby)");
                lost.cancel();
                return;
            }
        }
    });
    Ok(Some(Leadership {
        identity,
        _state: state,
    }))
}
