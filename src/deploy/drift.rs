//! Drift: the shared watches notice when a managed Deployment's images change behind
//! depwatch's back (`kubectl set image`, another tool). Drift is recorded and reported once per
//! drifted state; with `--self-heal` the desired images are deployed again.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alert::{Notifier, Outcome, Report};
use crate::depfile::ServiceKey;
use crate::deploy::{show, Deployer, Images};
use crate::queue::Scheduler;
use crate::store::{self, DeployRecord, Store};

/// Services whose recorded state can drift: settled, managed, not suspended.
fn watched_status(status: &str) -> bool {
    matches!(
        status,
        "succeeded" | "unchanged" | "rolled_back" | "failed" | "timed_out" | "drifted"
    )
}

pub async fn run(
    deployer: Deployer,
    store: Store,
    notifier: Notifier,
    scheduler: Scheduler,
    self_heal: bool,
    cancel: CancellationToken,
) {
    let watches = deployer.watches().clone();
    // Watch every namespace that has managed services, not only those deployed to since start.
    if let Ok(records) = store.services() {
        let mut namespaces: Vec<String> = records
            .into_iter()
            .filter(|r| r.status != "unmanaged")
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
    let mut changed = watches.any_change();
    let mut reported: HashMap<ServiceKey, String> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
        }
        // Coalesce bursts of events (a rollout is dozens) into one comparison.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        changed.borrow_and_update();
        let Ok(records) = store.services() else {
            continue;
        };
        let watched = watches.watched();
        for r in records {
            if !watched_status(&r.status) || r.suspended || r.deployed.is_empty() {
                continue;
            }
            let Some((_, ns)) = watched.iter().find(|(n, _)| *n == r.namespace) else {
                continue;
            };
            let key = r.key();
            let Some(live) = ns.images(&key.name) else {
                continue;
            };
            let recorded = store::parse_images(&r.deployed);
            let drifted: Images = recorded
                .iter()
                .filter(|(c, img)| live.get(*c).is_some_and(|l| l != *img))
                .map(|(c, _)| (c.clone(), live.get(c).cloned().unwrap_or_default()))
                .collect();
            if drifted.is_empty() {
                reported.remove(&key);
                continue;
            }
            let now_running = show(&live);
            if reported.get(&key) == Some(&now_running) {
                continue;
            }
            reported.insert(key.clone(), now_running.clone());
            let message = format!(
                "images changed outside depwatch: {} → {}",
                r.deployed,
                show(&drifted)
            );
            tracing::warn!(service = %key, %message, self_heal, "drift");
            if let Ok(id) = store.start_deploy(&DeployRecord {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                trigger: "drift".into(),
                actor: "cluster".into(),
                from_image: r.deployed.clone(),
                to_image: now_running.clone(),
                started_at: store::now(),
                outcome: "in_progress".into(),
                ..DeployRecord::default()
            }) {
                let _ = store.finish_deploy(id, "drift", "", &message);
            }
            let _ = store.update_service(&key, |s| {
                s.status = "drifted".into();
                s.message = message.clone();
            });
            notifier.report(Report {
                outcome: Outcome::Drift,
                service: key.name.clone(),
                namespace: key.namespace.clone(),
                from: r.deployed.clone(),
                to: now_running,
                duration: Duration::ZERO,
                reason: if self_heal {
                    "changed outside depwatch; restoring the desired images (--self-heal)".into()
                } else {
                    "changed outside depwatch; the file still asks for the recorded images".into()
                },
            });
            if self_heal {
                if let Some(mut desired) = scheduler.desired(&key) {
                    desired.trigger = "self-heal".into();
                    desired.actor = "depwatch".into();
                    scheduler.submit(key, desired).await;
                }
            }
        }
    }
}
