//! Drift: the shared watches notice when a managed Deployment's images change behind
//! depwatch's back (`kubectl set image`, another tool); only Deployments whose images changed
//! are looked at, never the whole fleet. Each drifted state is recorded once,
//! through the recorder like any deploy outcome; with `--self-heal` the service is handed back
//! to the scheduler to deploy its desired images again.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::recorder::{Drift, Recorder};
use super::Deployer;
use crate::depfile::ServiceKey;
use crate::domain::{Images, ServiceStatus};

/// The containers whose live image differs from the recorded one, with the live image.
/// Containers the record does not name, or the cache does not show, are not drift.
pub fn drifted(recorded: &Images, live: &Images) -> Images {
    recorded
        .iter()
        .filter_map(|(c, img)| {
            let now = live.get(c)?;
            (now != img).then(|| (c.clone(), now.clone()))
        })
        .collect()
}

pub async fn run(
    deployer: Deployer,
    recorder: Recorder,
    heal: Option<mpsc::Sender<ServiceKey>>,
    cancel: CancellationToken,
) {
    let watches = deployer.watches().clone();
    let store = recorder.store.clone();
    // Watch every namespace that has managed services, not only those deployed to since start.
    if let Ok(records) = store.services() {
        let mut namespaces: Vec<String> = records
            .into_iter()
            .filter(|r| r.status != ServiceStatus::Unmanaged)
            .map(|r| r.namespace)
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for ns in namespaces {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = watches.namespace(&ns) => {}
            }
        }
    }
    let changed = watches.changed();
    let mut reported: HashMap<ServiceKey, Images> = HashMap::new();
    loop {
        // Coalesce bursts (a rollout is several events) into one look per Deployment.
        let mut keys = tokio::select! {
            _ = cancel.cancelled() => return,
            keys = changed.take() => keys,
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        keys.extend(changed.take_now());
        for key in keys {
            let Ok(Some(r)) = store.service(&key) else {
                continue;
            };
            if !r.status.watch_drift() || r.suspended || r.deployed.is_empty() {
                continue;
            }
            let Some(ns) = watches.cached(&key.namespace) else {
                continue;
            };
            let Some(dep) = ns.workload(r.kind, &key.name) else {
                continue;
            };
            let live = dep.images.clone();
            let drift = drifted(&r.deployed, &live);
            if drift.is_empty() {
                reported.remove(&key);
                continue;
            }
            if reported.get(&key) == Some(&live) {
                continue;
            }
            reported.insert(key.clone(), live.clone());
            recorder.drift(
                &key,
                &Drift {
                    recorded: r.deployed.clone(),
                    running: live,
                    drifted: drift,
                    uid: dep.uid,
                    kind: r.kind,
                    self_heal: heal.is_some(),
                },
            );
            if let Some(tx) = &heal {
                let _ = tx.send(key).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recorded_containers_running_other_images_drift() {
        let table = [
            ("web=w:1", "web=w:1", ""),
            ("web=w:1", "web=w:2", "web=w:2"),
            ("web=w:1, side=s:1", "web=w:1, side=s:2", "side=s:2"),
            // A container added outside depwatch is not in the record: not drift.
            ("web=w:1", "web=w:1, debug=d:1", ""),
            // A container the cache does not show (yet) is not drift either.
            ("web=w:1, side=s:1", "web=w:1", ""),
        ];
        for (recorded, live, want) in table {
            assert_eq!(
                drifted(&Images::parse(recorded), &Images::parse(live)),
                Images::parse(want),
                "{recorded} vs {live}"
            );
        }
    }
}
