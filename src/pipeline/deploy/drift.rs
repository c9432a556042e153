//! Drift: the shared watches notice when a managed Deployment's images change behind
//! depwatch's back (`kubectl set image`, another tool); only Deployments whose images changed
//! are looked at, never the whole fleet. Each drifted state is recorded once,
//! through the recorder like any deploy outcome; with `--self-heal` the service is handed back
//! to the scheduler to deploy its desired images again.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cache;
use super::recorder::{Drift, Recorder};
use super::Deployer;
use crate::domain::{DeployOutcome, Images, ServiceKey, ServiceStatus};
use crate::store::DeployRecord;

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

/// Whether a drift seen now is worth a row: not when the live images are an unfinished
/// rollout's (depwatch's own PATCH, its deploy not yet over), and not when the last row of
/// the service already records this very drift (a restart sees it again).
pub fn worth_a_row(
    live: &Images,
    open_rollouts: &[Images],
    last_row: Option<(DeployOutcome, &str)>,
) -> bool {
    let own = open_rollouts
        .iter()
        .any(|to| !to.is_empty() && drifted(to, live).is_empty());
    let told = last_row
        .is_some_and(|(outcome, to)| outcome == DeployOutcome::Drift && Images::parse(to) == *live);
    !own && !told
}

/// What the record says of the service beside its row: the unfinished rollouts' images, and
/// the last row.
async fn record_around(
    store: &crate::store::Store,
    key: &ServiceKey,
) -> (Vec<Images>, Option<DeployRecord>) {
    let open = store
        .open_deploys(key)
        .await
        .unwrap_or_default()
        .iter()
        .map(|d| Images::parse(&d.to_image))
        .collect();
    let last = store
        .history(Some(key), 1)
        .await
        .ok()
        .and_then(|mut h| h.pop());
    (open, last)
}

/// What drift does with a service whose workload the watches show (or no longer show).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Gone, and the record did not know: record it missing.
    Gone,
    /// Back after it was missing: deploy the file's version to it.
    Back,
    /// There: compare its images.
    There,
    /// Nothing to do.
    Nothing,
}

/// Pure: from whether the workload is there and whether the record has it missing.
fn seen(present: bool, recorded_missing: bool) -> Seen {
    match (present, recorded_missing) {
        (false, false) => Seen::Gone,
        (true, true) => Seen::Back,
        (true, false) => Seen::There,
        (false, true) => Seen::Nothing,
    }
}

/// Where drift sends a service to deploy again: `SelfHeal` for drift with `--self-heal`,
/// `Drift` for a workload recreated after it went missing.
pub type Resubmit = mpsc::Sender<(ServiceKey, crate::domain::Trigger)>;

pub async fn run(
    deployer: Deployer,
    recorder: Recorder,
    resubmit: Resubmit,
    self_heal: bool,
    cancel: CancellationToken,
) {
    let watches = deployer.watches().clone();
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = watch_managed_namespaces(&watches, &recorder.store) => {}
    }
    let changed = watches.changed();
    let mut looks = Looks {
        watches: &watches,
        recorder: &recorder,
        resubmit: &resubmit,
        self_heal,
        reported: HashMap::new(),
    };
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
            looks.look(key).await;
        }
    }
}

/// Watch every namespace that has managed services, not only those deployed to since start.
async fn watch_managed_namespaces(watches: &super::watches::Watches, store: &crate::store::Store) {
    let records = match store.services().await {
        Ok(records) => records,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the record to watch its namespaces for drift; each is watched from its next deploy");
            return;
        }
    };
    let mut namespaces: Vec<String> = records
        .into_iter()
        .filter(|r| r.status != ServiceStatus::Unmanaged)
        .map(|r| r.namespace)
        .collect();
    namespaces.sort();
    namespaces.dedup();
    for ns in namespaces {
        watches.namespace(&ns).await;
    }
}

/// The drift loop's state: what it reported last for each service.
struct Looks<'a> {
    watches: &'a super::watches::Watches,
    recorder: &'a Recorder,
    resubmit: &'a Resubmit,
    self_heal: bool,
    reported: HashMap<ServiceKey, Images>,
}

impl Looks<'_> {
    /// Compare what runs for one service with what was deployed, and record what differs.
    async fn look(&mut self, key: ServiceKey) {
        let store = &self.recorder.store;
        let r = match store.service(&key).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(service = %key, error = %e, "cannot read the record to compare with what runs; looked at again at the next change");
                return;
            }
        };
        if !r.status.watch_drift() || r.suspended || r.deployed.is_empty() {
            return;
        }
        let Some(ns) = self.watches.cached(&key.namespace) else {
            return;
        };
        let present = !matches!(ns.find(&key.name, None), cache::Found::None);
        match seen(present, r.status == ServiceStatus::Missing) {
            Seen::Gone => {
                self.reported.remove(&key);
                self.recorder.missing(&key, r.kind, &r.deployed).await;
                return;
            }
            Seen::Back => return self.send(key, crate::domain::Trigger::Drift).await,
            Seen::Nothing => return,
            Seen::There => {}
        }
        let Some(dep) = ns.workload(r.kind, &key.name) else {
            return;
        };
        let live = dep.images.clone();
        let drift = drifted(&r.deployed, &live);
        if drift.is_empty() {
            self.reported.remove(&key);
            return;
        }
        if self.reported.get(&key) == Some(&live) {
            return;
        }
        let (open, last) = record_around(store, &key).await;
        let last = last.as_ref().map(|d| (d.outcome, d.to_image.as_str()));
        if !worth_a_row(&live, &open, last) {
            return;
        }
        self.reported.insert(key.clone(), live.clone());
        let drift = Drift {
            recorded: r.deployed.clone(),
            running: live,
            drifted: drift,
            uid: dep.uid,
            kind: r.kind,
            self_heal: self.self_heal,
        };
        self.recorder.drift(&key, &drift).await;
        if self.self_heal {
            self.send(key, crate::domain::Trigger::SelfHeal).await;
        }
    }

    /// Ask for a deploy again (the queue is gone only when the daemon stops).
    async fn send(&self, key: ServiceKey, trigger: crate::domain::Trigger) {
        if self.resubmit.send((key, trigger)).await.is_err() {
            tracing::debug!("the queue is closed: the daemon is stopping");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_patches_and_drifts_already_recorded_are_not_rows() {
        let i = Images::parse;
        let drift = Some((DeployOutcome::Drift, "web=w:9"));
        let other = Some((DeployOutcome::Succeeded, "web=w:9"));
        // (live, unfinished rollouts' images, last row) → a row
        type Case<'a> = (&'a str, Vec<Images>, Option<(DeployOutcome, &'a str)>, bool);
        let table: [Case; 6] = [
            ("web=w:9", vec![], None, true),
            // depwatch's own PATCH of a rollout still open (handed over, or resumed).
            ("web=w:2", vec![i("web=w:2")], None, false),
            ("web=w:2, side=s:1", vec![i("web=w:2")], None, false),
            ("web=w:9", vec![i("web=w:2")], None, true),
            // Recorded already (a restart sees the same drift again).
            ("web=w:9", vec![], drift, false),
            ("web=w:9", vec![], other, true),
        ];
        for (live, open, last, want) in table {
            assert_eq!(
                worth_a_row(&i(live), &open, last),
                want,
                "{live} {open:?} {last:?}"
            );
        }
    }

    #[test]
    fn a_workload_gone_is_recorded_once_and_deployed_to_when_back() {
        assert_eq!(seen(false, false), Seen::Gone);
        assert_eq!(seen(false, true), Seen::Nothing, "recorded once");
        assert_eq!(seen(true, true), Seen::Back);
        assert_eq!(seen(true, false), Seen::There);
    }

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
