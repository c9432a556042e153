//! Stage 5's eyes: one set of watches per namespace (Deployments, ReplicaSets, pods) shared by
//! every service, so watch connections do not grow with the number of services. Each watch
//! event updates the compact state of one object (never a rebuild of the namespace) and wakes
//! only the rollout of the Deployment that object belongs to; drift hears only of Deployments
//! whose images changed. Work is proportional to what changed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::rollout::{
    judge, new_replicaset, DeploymentState, FailFast, Health, PodState, ReplicaSetState,
};
use crate::depfile::ServiceKey;
use crate::domain::Images;

/// Compact state of one namespace, indexed by owner so a judgement touches only its
/// Deployment's own ReplicaSets and pods.
#[derive(Default)]
struct Cache {
    deployments: HashMap<String, DeploymentState>,
    /// Deployment uid → name.
    names: HashMap<String, String>,
    /// ReplicaSets by their Deployment, pods by their ReplicaSet.
    replicasets: Owned<ReplicaSetState>,
    pods: Owned<PodState>,
    /// Deployment name → the rollouts waiting on it.
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
    /// The Deployment a ReplicaSet (by uid) belongs to.
    fn deployment_of_rs(&self, rs_uid: Option<&String>) -> Option<String> {
        let owner = self.replicasets.get(rs_uid?)?.owner.as_ref()?;
        self.names.get(owner).cloned()
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
}

/// One kind of object kept in the cache.
trait Cached:
    kube::Resource<DynamicType = ()>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
    + Send
    + Sync
    + 'static
{
    /// Store the object; returns whether a Deployment's images changed (for drift).
    fn apply(&self, cache: &mut Cache) -> bool;
    fn delete(&self, cache: &mut Cache);
    /// Drop every object of this kind whose key is not in `keep` (after a re-list).
    fn retain(cache: &mut Cache, keep: &HashSet<String>);
    fn key(&self) -> String;
}

impl Cached for Deployment {
    fn apply(&self, cache: &mut Cache) -> bool {
        let name = self.name_any();
        let state = DeploymentState::from(self);
        cache.names.insert(state.uid.clone(), name.clone());
        let changed = cache
            .deployments
            .get(&name)
            .is_none_or(|old| old.images != state.images);
        cache.deployments.insert(name.clone(), state);
        cache.wake(Some(name));
        changed
    }

    fn delete(&self, cache: &mut Cache) {
        let name = self.name_any();
        if let Some(old) = cache.deployments.remove(&name) {
            cache.names.remove(&old.uid);
        }
        cache.wake(Some(name));
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) {
        let gone: Vec<String> = cache
            .deployments
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(old) = cache.deployments.remove(&name) {
                cache.names.remove(&old.uid);
            }
            cache.wake(Some(name));
        }
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

    fn delete(&self, cache: &mut Cache) {
        remove_rs(cache, &self.key());
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) {
        for uid in cache.replicasets.missing(keep) {
            remove_rs(cache, &uid);
        }
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
        let dep = cache.deployment_of_rs(state.owner.as_ref());
        cache.pods.put(self.key(), state);
        cache.wake(dep);
        false
    }

    fn delete(&self, cache: &mut Cache) {
        remove_pod(cache, &self.key());
    }

    fn retain(cache: &mut Cache, keep: &HashSet<String>) {
        for uid in cache.pods.missing(keep) {
            remove_pod(cache, &uid);
        }
    }

    fn key(&self) -> String {
        self.metadata.uid.clone().unwrap_or_default()
    }
}

fn remove_pod(cache: &mut Cache, uid: &str) {
    if let Some(old) = cache.pods.remove(uid) {
        let dep = cache.deployment_of_rs(old.owner.as_ref());
        cache.wake(dep);
    }
}

/// Deployments whose images changed since drift last looked.
#[derive(Default)]
pub struct Changed {
    keys: Mutex<HashSet<ServiceKey>>,
    notify: Notify,
}

impl Changed {
    /// Look at `key` again (after each deploy, to compare what runs with what was applied).
    pub fn add(&self, key: ServiceKey) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key);
        self.notify.notify_one();
    }

    /// Everything that changed, without waiting.
    pub fn take_now(&self) -> HashSet<ServiceKey> {
        std::mem::take(&mut *self.keys.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Wait until something changed, then take everything that did.
    pub async fn take(&self) -> HashSet<ServiceKey> {
        loop {
            {
                let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
                if !keys.is_empty() {
                    return std::mem::take(&mut *keys);
                }
            }
            self.notify.notified().await;
        }
    }
}

/// The shared watches of one namespace.
#[derive(Clone)]
pub struct NamespaceWatch {
    cache: Arc<Mutex<Cache>>,
}

/// All namespace watches, started on first use and shared by every service.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    by_namespace: Arc<DashMap<String, NamespaceWatch>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    changed: Arc<Changed>,
    /// The watch tasks, ended by [`Watches::stop`].
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
}

/// Feed one kind's watch events into the cache until the watches stop. Counts `synced` up
/// once the first complete listing is in.
fn spawn_watch<K: Cached>(
    watches: &Watches,
    api: Api<K>,
    namespace: String,
    ns: NamespaceWatch,
    synced: watch::Sender<u8>,
) {
    let (changed, stop) = (watches.changed.clone(), watches.stop.clone());
    watches.tasks.spawn(async move {
        let stream = watcher(api, watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut relisting: Option<HashSet<String>> = None;
        let mut first = true;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = stream.next() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::debug!(namespace, error = %e, "watch interrupted; it resumes with backoff");
                    continue;
                }
            };
            let mut cache = ns.lock();
            let touched = match event {
                Event::Init => {
                    relisting = Some(HashSet::new());
                    None
                }
                Event::InitApply(obj) => {
                    if let Some(seen) = relisting.as_mut() {
                        seen.insert(obj.key());
                    }
                    obj.apply(&mut cache).then(|| obj.name_any())
                }
                Event::InitDone => {
                    if let Some(keep) = relisting.take() {
                        K::retain(&mut cache, &keep);
                    }
                    if std::mem::take(&mut first) {
                        synced.send_modify(|n| *n += 1);
                    }
                    None
                }
                Event::Apply(obj) => obj.apply(&mut cache).then(|| obj.name_any()),
                Event::Delete(obj) => {
                    obj.delete(&mut cache);
                    None
                }
            };
            drop(cache);
            if let Some(name) = touched {
                changed.add(ServiceKey {
                    name,
                    namespace: namespace.clone(),
                });
            }
        }
    });
}

impl Watches {
    pub fn new(client: Client) -> Self {
        Watches {
            client,
            by_namespace: Arc::default(),
            lock: Arc::default(),
            changed: Arc::default(),
            tasks: tokio_util::task::TaskTracker::new(),
            stop: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// End every watch (at shutdown).
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Deployments whose images changed, for drift.
    pub fn changed(&self) -> Arc<Changed> {
        self.changed.clone()
    }

    /// The watch of `namespace` if it is running; never starts one.
    pub fn cached(&self, namespace: &str) -> Option<NamespaceWatch> {
        self.by_namespace.get(namespace).map(|w| w.clone())
    }

    /// The watch of `namespace`, started (and synced) if it is not running yet.
    pub async fn namespace(&self, namespace: &str) -> NamespaceWatch {
        if let Some(w) = self.cached(namespace) {
            return w;
        }
        let _guard = self.lock.lock().await;
        if let Some(w) = self.cached(namespace) {
            return w;
        }
        let w = NamespaceWatch {
            cache: Arc::default(),
        };
        let (synced, mut ready) = watch::channel(0u8);
        let c = &self.client;
        let ns = namespace.to_string();
        spawn_watch::<Deployment>(
            self,
            Api::namespaced(c.clone(), namespace),
            ns.clone(),
            w.clone(),
            synced.clone(),
        );
        spawn_watch::<ReplicaSet>(
            self,
            Api::namespaced(c.clone(), namespace),
            ns.clone(),
            w.clone(),
            synced.clone(),
        );
        spawn_watch::<Pod>(
            self,
            Api::namespaced(c.clone(), namespace),
            ns,
            w.clone(),
            synced,
        );
        // A namespace depwatch may not list (RBAC) never syncs: do not hold every other
        // namespace behind it. Waiters then judge from what arrives, under their own deadline.
        let synced =
            tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|n| *n >= 3)).await;
        if !matches!(synced, Ok(Ok(_))) {
            tracing::warn!(namespace, "the shared watches of this namespace have not synced (is depwatch allowed to list deployments, replicasets and pods there?)");
        }
        self.by_namespace.insert(namespace.to_string(), w.clone());
        w
    }
}

impl NamespaceWatch {
    fn lock(&self) -> MutexGuard<'_, Cache> {
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

    /// Judge `name`'s rollout from the cached state: its own ReplicaSets and pods only.
    pub fn judge(
        &self,
        name: &str,
        generation: i64,
        fail_fast: FailFast,
        first_seen: &mut HashMap<String, Instant>,
    ) -> Health {
        let cache = self.lock();
        let Some(dep) = cache.deployments.get(name) else {
            return Health::Failed {
                reason: "DeploymentDeleted".into(),
                message: format!("Deployment {name} disappeared during the rollout"),
            };
        };
        let pods: Vec<&PodState> = match new_replicaset(dep, cache.replicasets.of(&dep.uid)) {
            Some(rs) => cache.pods.of(&rs.uid).collect(),
            None => Vec::new(),
        };
        judge(
            dep,
            generation,
            &pods,
            fail_fast,
            first_seen,
            Instant::now(),
        )
    }

    /// A Deployment's compact state, from the cache.
    pub fn deployment(&self, name: &str) -> Option<DeploymentState> {
        self.lock().deployments.get(name).cloned()
    }

    /// The images a Deployment runs now, from the cache.
    pub fn images(&self, name: &str) -> Option<Images> {
        self.lock().deployments.get(name).map(|d| d.images.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let w = NamespaceWatch {
            cache: Arc::default(),
        };
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
        let health = w.judge("web", 1, FailFast::default(), &mut HashMap::new());
        assert!(matches!(health, Health::Failed { reason, .. } if reason == "ImagePullBackOff"));
        assert!(matches!(
            w.judge("api", 1, FailFast::default(), &mut HashMap::new()),
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
        let w = NamespaceWatch {
            cache: Arc::default(),
        };
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
        assert!(cache.deployments.is_empty() && cache.names.is_empty());
    }
}
