//! Stage 5's eyes: the compact state of one namespace's workloads (Deployments, StatefulSets,
//! DaemonSets, CronJobs), ReplicaSets and pods, fed by the shared watches of
//! [`super::watches`] and shared by every service. Each watch event updates one object (never
//! a rebuild of the namespace) and wakes only the rollout of the workload that object belongs
//! to; drift hears only of workloads whose images changed. Work is proportional to what changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::rollout::{
    judge, new_replicaset, stuck_pods, template_pods, FailFast, Health, PodState, ReplicaSetState,
    WorkloadState,
};
use crate::domain::{Images, WorkloadKind};

/// Compact state of one namespace, indexed by owner so a judgement touches only its
/// workload's own ReplicaSets and pods.
#[derive(Default)]
pub(super) struct Cache {
    workloads: HashMap<(WorkloadKind, String), WorkloadState>,
    /// Workload uid → name.
    names: HashMap<String, String>,
    /// ReplicaSets by their Deployment, pods by their ReplicaSet (or StatefulSet, DaemonSet).
    replicasets: Owned<ReplicaSetState>,
    pods: Owned<PodState>,
    /// Workload name → the rollouts waiting on it.
    waiters: HashMap<String, watch::Sender<u64>>,
}

/// Objects by uid, indexed by the uid of their controlling owner.
struct Owned<T> {
    items: HashMap<String, T>,
    by_owner: HashMap<String, HashSet<String>>,
}

impl<T> Default for Owned<T> {
    fn default() -> Self {
        Owned {
            items: HashMap::new(),
            by_owner: HashMap::new(),
        }
    }
}

/// A cached object's controlling owner.
trait HasOwner {
    fn owner(&self) -> Option<&String>;
}

impl HasOwner for ReplicaSetState {
    fn owner(&self) -> Option<&String> {
        self.owner.as_ref()
    }
}

impl HasOwner for PodState {
    fn owner(&self) -> Option<&String> {
        self.owner.as_ref()
    }
}

impl<T: HasOwner> Owned<T> {
    fn get(&self, uid: &str) -> Option<&T> {
        self.items.get(uid)
    }

    /// Store (or replace) an object, re-filing it if its owner changed.
    fn put(&mut self, uid: String, item: T) {
        self.remove(&uid);
        if let Some(owner) = item.owner() {
            self.by_owner
                .entry(owner.clone())
                .or_default()
                .insert(uid.clone());
        }
        self.items.insert(uid, item);
    }

    fn remove(&mut self, uid: &str) -> Option<T> {
        let old = self.items.remove(uid)?;
        if let Some(owner) = old.owner() {
            if let Some(set) = self.by_owner.get_mut(owner) {
                set.remove(uid);
                if set.is_empty() {
                    self.by_owner.remove(owner);
                }
            }
        }
        Some(old)
    }

    /// The objects `owner` controls.
    fn of(&self, owner: &str) -> impl Iterator<Item = &T> {
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter_map(|u| self.items.get(u))
    }

    /// The uids not in `keep`.
    fn missing(&self, keep: &HashSet<String>) -> Vec<String> {
        self.items
            .keys()
            .filter(|u| !keep.contains(*u))
            .cloned()
            .collect()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.items.is_empty() && self.by_owner.is_empty()
    }
}

impl Cache {
    /// The workload a pod's controller (by uid) belongs to: a StatefulSet or DaemonSet itself,
    /// or the Deployment of a ReplicaSet.
    fn workload_of(&self, owner: Option<&String>) -> Option<String> {
        let owner = owner?;
        if let Some(name) = self.names.get(owner) {
            return Some(name.clone());
        }
        let rs_owner = self.replicasets.get(owner)?.owner.as_ref()?;
        self.names.get(rs_owner).cloned()
    }

    fn wake(&mut self, name: Option<String>) {
        let Some(name) = name else { return };
        if let Some(tx) = self.waiters.get(&name) {
            if tx.receiver_count() == 0 {
                self.waiters.remove(&name);
            } else {
                tx.send_modify(|n| *n += 1);
            }
        }
    }

    /// Store a workload; returns whether its images changed (for drift).
    fn put_workload(&mut self, name: String, state: WorkloadState) -> bool {
        self.names.insert(state.uid.clone(), name.clone());
        let key = (state.kind, name.clone());
        let changed = self
            .workloads
            .get(&key)
            .is_none_or(|old| old.images != state.images);
        self.workloads.insert(key, state);
        self.wake(Some(name));
        changed
    }

    fn remove_workload(&mut self, kind: WorkloadKind, name: &str) {
        if let Some(old) = self.workloads.remove(&(kind, name.to_string())) {
            self.names.remove(&old.uid);
        }
        self.wake(Some(name.to_string()));
    }

    fn retain_workloads(&mut self, kind: WorkloadKind, keep: &HashSet<String>) -> Vec<String> {
        let gone: Vec<String> = self
            .workloads
            .keys()
            .filter(|(k, n)| *k == kind && !keep.contains(n))
            .map(|(_, n)| n.clone())
            .collect();
        for name in &gone {
            self.remove_workload(kind, name);
        }
        gone
    }
}

/// One kind of object kept in the cache.
pub(super) trait Cached:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Store the object; returns whether a workload's images changed (for drift).
    fn apply(&self, cache: &mut Cache) -> bool;
    /// Forget the object; returns whether it was a workload (drift looks at it: gone).
    fn delete(&self, cache: &mut Cache) -> bool;
    /// Drop every object of this kind whose key is not in `keep` (after a re-list); the
    /// names of the workloads dropped.
    fn retain(cache: &mut Cache, keep: &HashSet<String>) -> Vec<String>;
    fn key(&self) -> String;
}

/// Every workload kind, cached by name.
impl<K: super::workload::Kind> Cached for K {
    fn apply(&self, cache: &mut Cache) -> bool {
        cache.put_workload(self.name_any(), self.state())
    }

    fn delete(&self, cache: &mut Cache) -> bool {
        cache.remove_workload(K::KIND, &self.name_any());
        true
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) -> Vec<String> {
        cache.retain_workloads(K::KIND, keep)
    }

    fn key(&self) -> String {
        self.name_any()
    }
}

impl Cached for ReplicaSet {
    fn apply(&self, cache: &mut Cache) -> bool {
        let state = ReplicaSetState::from(self);
        let owner = state
            .owner
            .as_ref()
            .and_then(|o| cache.names.get(o))
            .cloned();
        cache.replicasets.put(state.uid.clone(), state);
        cache.wake(owner);
        false
    }

    fn delete(&self, cache: &mut Cache) -> bool {
        remove_rs(cache, &self.key());
        false
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) -> Vec<String> {
        for uid in cache.replicasets.missing(keep) {
            remove_rs(cache, &uid);
        }
        Vec::new()
    }

    fn key(&self) -> String {
        self.metadata.uid.clone().unwrap_or_default()
    }
}

fn remove_rs(cache: &mut Cache, uid: &str) {
    if let Some(old) = cache.replicasets.remove(uid) {
        let owner = old.owner.as_ref().and_then(|o| cache.names.get(o)).cloned();
        cache.wake(owner);
    }
}

impl Cached for Pod {
    fn apply(&self, cache: &mut Cache) -> bool {
        let state = PodState::from(self);
        let workload = cache.workload_of(state.owner.as_ref());
        cache.pods.put(self.key(), state);
        cache.wake(workload);
        false
    }

    fn delete(&self, cache: &mut Cache) -> bool {
        remove_pod(cache, &self.key());
        false
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) -> Vec<String> {
        for uid in cache.pods.missing(keep) {
            remove_pod(cache, &uid);
        }
        Vec::new()
    }

    fn key(&self) -> String {
        self.metadata.uid.clone().unwrap_or_default()
    }
}

fn remove_pod(cache: &mut Cache, uid: &str) {
    if let Some(old) = cache.pods.remove(uid) {
        let workload = cache.workload_of(old.owner.as_ref());
        cache.wake(workload);
    }
}

/// What a name finds among a namespace's workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    One(Box<WorkloadState>),
    None,
    /// More than one kind has the name, and none was asked for.
    Several(Vec<WorkloadKind>),
}

/// The shared state of one namespace.
#[derive(Clone, Default)]
pub struct NamespaceWatch {
    cache: Arc<Mutex<Cache>>,
}

impl NamespaceWatch {
    pub(super) fn lock(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Woken whenever `name`, one of its ReplicaSets or one of their pods changes.
    pub fn subscribe(&self, name: &str) -> watch::Receiver<u64> {
        self.lock()
            .waiters
            .entry(name.to_string())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Judge the rollout of `kind`/`name` from the cached state: its own ReplicaSets and
    /// pods only.
    pub fn judge(
        &self,
        kind: WorkloadKind,
        name: &str,
        generation: i64,
        fail_fast: FailFast,
        first_seen: &mut HashMap<String, Instant>,
    ) -> Health {
        let cache = self.lock();
        let Some(w) = cache.workloads.get(&(kind, name.to_string())) else {
            return Health::Disappeared;
        };
        let pods: Vec<&PodState> = match kind {
            WorkloadKind::Deployment => match new_replicaset(w, cache.replicasets.of(&w.uid)) {
                Some(rs) => cache.pods.of(&rs.uid).collect(),
                None => Vec::new(),
            },
            _ => template_pods(w, cache.pods.of(&w.uid)),
        };
        judge(w, generation, &pods, fail_fast, first_seen, Instant::now())
    }

    /// The names of the pods a forced rollback to `patched` (the state a PATCH returned, whose
    /// template the watch may not show yet) must delete.
    pub fn stuck_pods_for(
        &self,
        patched: &WorkloadState,
        replaced: Option<&Images>,
    ) -> Vec<String> {
        let cache = self.lock();
        stuck_pods(patched, replaced, cache.pods.of(&patched.uid))
            .into_iter()
            .map(|p| p.name.clone())
            .collect()
    }

    /// A workload's compact state, from the cache.
    pub fn workload(&self, kind: WorkloadKind, name: &str) -> Option<WorkloadState> {
        self.lock()
            .workloads
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// The workload `name` names: of `kind` when given, else of whichever kind has it.
    pub fn find(&self, name: &str, kind: Option<WorkloadKind>) -> Found {
        if let Some(kind) = kind {
            return self
                .workload(kind, name)
                .map_or(Found::None, |w| Found::One(Box::new(w)));
        }
        let cache = self.lock();
        let mut hits: Vec<&WorkloadState> = WorkloadKind::ALL
            .iter()
            .filter_map(|k| cache.workloads.get(&(*k, name.to_string())))
            .collect();
        match hits.len() {
            0 => Found::None,
            1 => Found::One(Box::new(hits.remove(0).clone())),
            _ => Found::Several(hits.iter().map(|w| w.kind).collect()),
        }
    }

    /// The images a workload runs now, from the cache.
    pub fn images(&self, kind: WorkloadKind, name: &str) -> Option<Images> {
        self.workload(kind, name).map(|w| w.images)
    }

    /// The names of every cached workload, of any kind.
    pub fn names(&self) -> Vec<String> {
        self.lock()
            .workloads
            .keys()
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// How many workloads, ReplicaSets and pods are cached (for tests and benchmarks).
    pub fn len(&self) -> usize {
        let c = self.lock();
        c.workloads.len() + c.replicasets.items.len() + c.pods.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;

    fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
        serde_saphyr::from_str(s).expect("fixture parses")
    }

    fn dep(name: &str, uid: &str, image: &str) -> Deployment {
        yaml(&format!(
            "metadata: {{name: {name}, uid: {uid}, generation: 1, annotations: {{deployment.kubernetes.io/revision: '1'}}}}\nspec: {{selector: {{}}, template: {{spec: {{containers: [{{name: c, image: '{image}'}}]}}}}}}\nstatus: {{observedGeneration: 1}}"
        ))
    }

    fn rs(uid: &str, owner: &str, image: &str) -> ReplicaSet {
        yaml(&format!(
            "metadata: {{name: rs-{uid}, uid: {uid}, annotations: {{deployment.kubernetes.io/revision: '1'}}, ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: x, uid: {owner}, controller: true}}]}}\nspec: {{selector: {{}}, template: {{spec: {{containers: [{{name: c, image: '{image}'}}]}}}}}}"
        ))
    }

    fn pod(uid: &str, owner: &str, reason: &str) -> Pod {
        yaml(&format!(
            "metadata: {{name: pod-{uid}, uid: {uid}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: x, uid: {owner}, controller: true}}]}}\nstatus: {{containerStatuses: [{{name: c, image: x, imageID: '', ready: false, restartCount: 0, state: {{waiting: {{reason: {reason}}}}}}}]}}"
        ))
    }

    #[test]
    fn an_event_wakes_only_the_rollout_it_belongs_to() {
        let w = NamespaceWatch::default();
        let mut cache = w.lock();
        assert!(dep("web", "d1", "w:1").apply(&mut cache));
        assert!(dep("api", "d2", "a:1").apply(&mut cache));
        rs("r1", "d1", "w:1").apply(&mut cache);
        rs("r2", "d2", "a:1").apply(&mut cache);
        drop(cache);
        let mut web = w.subscribe("web");
        let api = w.subscribe("api");
        // A pod of web's ReplicaSet: web wakes, api does not.
        pod("p1", "r1", "ImagePullBackOff").apply(&mut w.lock());
        assert!(web.has_changed().expect("open"));
        assert!(!api.has_changed().expect("open"));
        web.borrow_and_update();
        // The judgement sees only web's own pods.
        let health = w.judge(
            WorkloadKind::Deployment,
            "web",
            1,
            FailFast::default(),
            &mut HashMap::new(),
        );
        assert!(matches!(health, Health::Failed { reason, .. } if reason == "ImagePullBackOff"));
        assert!(matches!(
            w.judge(
                WorkloadKind::Deployment,
                "api",
                1,
                FailFast::default(),
                &mut HashMap::new()
            ),
            Health::Progressing(_)
        ));
        // Deleting the pod wakes web again and clears the failure.
        pod("p1", "r1", "ImagePullBackOff").delete(&mut w.lock());
        assert!(web.has_changed().expect("open"));
        assert!(!api.has_changed().expect("open"));
        assert!(w.lock().pods.is_empty(), "indexes shrink with the objects");
    }

    #[test]
    fn only_image_changes_count_as_changed_and_relists_drop_what_is_gone() {
        let w = NamespaceWatch::default();
        let mut cache = w.lock();
        assert!(dep("web", "d1", "w:1").apply(&mut cache));
        let mut status_only = dep("web", "d1", "w:1");
        status_only.metadata.generation = Some(2);
        assert!(!status_only.apply(&mut cache), "not an image change");
        assert!(dep("web", "d1", "w:2").apply(&mut cache));
        rs("r1", "d1", "w:2").apply(&mut cache);
        pod("p1", "r1", "ContainerCreating").apply(&mut cache);
        Pod::retain(&mut cache, &HashSet::new());
        ReplicaSet::retain(&mut cache, &HashSet::new());
        Deployment::retain(&mut cache, &HashSet::new());
        assert!(cache.pods.is_empty() && cache.replicasets.is_empty());
        assert!(cache.workloads.is_empty() && cache.names.is_empty());
    }
}
