//! The deployment controller, replica-set controller, kubelet and garbage collector in
//! miniature. Like the real controllers they react to changes: every store event marks the
//! objects it concerns (and their owners) dirty, timers mark pods whose state moves with time
//! and Deployments nearing their progress deadline, and each tick works only on those, so ten
//! thousand idle Deployments cost nothing. Each step writes only what changed,
//! so Deployment status evolves as the real controllers make it evolve: a new ReplicaSet per
//! template (named by `pod-template-hash`), rolling scale-up and scale-down within
//! maxSurge/maxUnavailable, pods whose fate follows their image, and the Progressing/Available
//! conditions with the real reasons, including ProgressDeadlineExceeded. StatefulSets and
//! DaemonSets ride the same dirty-tracking and are synced by [`super::workloads`].

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::behaviour::{valid_image_reference, Behaviours, Fate};
use super::meta;
use super::resources::{self, ResourceType};
use super::store::{EventType, ObjKey, Store, StoredEvent};

const TICK: Duration = Duration::from_millis(50);
const REVISION: &str = "deployment.kubernetes.io/revision";
const HASH_LABEL: &str = "pod-template-hash";
/// How long an image pull takes to fail, and a crashing container runs, in simulated time.
const PULL_FAIL_AFTER: Duration = Duration::from_millis(150);
const BACKOFF_AFTER: Duration = Duration::from_millis(1200);
const CRASH_CYCLE: Duration = Duration::from_millis(1000);

pub struct Controller {
    pub(super) store: Arc<Store>,
    behaviours: Behaviours,
    /// When each pod (by UID) was created, at sub-second precision for the kubelet's clock.
    pod_born: HashMap<String, Instant>,
    /// Real pulls from loopback registries (`depwatch sim --registries`).
    puller: Option<super::puller::Puller>,
    /// Reconcile passes so far.
    ticks: u64,
    /// When each Deployment (by UID) last made progress, for its progress deadline.
    last_progress: HashMap<String, Instant>,
    /// Deployments (by UID) whose new ReplicaSet was created in this tick.
    created: HashSet<String>,
    /// The generation of each Deployment (by UID) the sync phase last acted on: status reports
    /// it as observedGeneration, never a generation written after the sync read the object
    /// (as the real controller reports the generation of the object it synced).
    synced: HashMap<String, Value>,
    /// Every change in the store, in order.
    feed: Receiver<Arc<StoredEvent>>,
    /// Objects by controlling owner, kept from the feed: resource → owner UID → keys.
    owners: HashMap<String, HashMap<String, HashSet<ObjKey>>>,
    /// The owner each indexed object was filed under.
    owner_of: HashMap<ObjKey, String>,
    /// Keys of Deployments, ReplicaSets, StatefulSets and DaemonSets by UID, to reach an owner
    /// from what it owns.
    keys: HashMap<String, ObjKey>,
    /// What the next tick must look at.
    dirty_deployments: BTreeSet<ObjKey>,
    dirty_replicasets: BTreeSet<ObjKey>,
    dirty_pods: BTreeSet<ObjKey>,
    pub(super) dirty_statefulsets: BTreeSet<ObjKey>,
    pub(super) dirty_daemonsets: BTreeSet<ObjKey>,
    /// Every DaemonSet, to look at them all again when the nodes change.
    pub(super) daemonsets: BTreeSet<ObjKey>,
    /// When an object must be looked at again without any event (pod fates, deadlines).
    timers: BinaryHeap<Reverse<(Instant, ObjKey)>>,
    scheduled: HashMap<ObjKey, Instant>,
    /// Look at everything (start-up, restored state).
    full: bool,
    /// A namespace was deleted (or at start-up): collect every orphan.
    gc: bool,
    /// Deleted owners whose ReplicaSets or pods are now orphans.
    orphaned: Vec<String>,
}

/// What the kubelet reports for one pod this tick.
#[derive(Clone, Copy, Default)]
struct PodHealth {
    ready: bool,
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// Resolve an int-or-percent (`25%`, `1`) against a replica count.
pub(super) fn int_or_percent(v: &Value, total: i64, round_up: bool, default: &str) -> i64 {
    let v = if v.is_null() {
        json!(default)
    } else {
        v.clone()
    };
    match v {
        Value::Number(n) => n.as_i64().unwrap_or(0),
        Value::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let raw = pct * total as f64 / 100.0;
            if round_up {
                raw.ceil() as i64
            } else {
                raw.floor() as i64
            }
        }
        _ => 0,
    }
}

/// A short, stable hash of a pod template, as the `pod-template-hash` label.
pub fn template_hash(template: &Value) -> String {
    let digest = Sha256::digest(meta::canonical(template).as_bytes());
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    digest
        .iter()
        .take(10)
        .map(|b| ALPHABET[(*b as usize) % ALPHABET.len()] as char)
        .collect()
}

/// Pod template without the hash label, to compare a ReplicaSet's template with a Deployment's.
fn strip_hash(template: &Value) -> Value {
    let mut t = template.clone();
    if let Some(labels) = t["metadata"]["labels"].as_object_mut() {
        labels.remove(HASH_LABEL);
    }
    t
}

fn revision(obj: &Value) -> i64 {
    obj["metadata"]["annotations"][REVISION]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Controller {
    pub fn new(store: Arc<Store>, behaviours: Behaviours) -> Self {
        Controller {
            puller: None,
            feed: store.feed(),
            owners: HashMap::new(),
            owner_of: HashMap::new(),
            keys: HashMap::new(),
            dirty_deployments: BTreeSet::new(),
            dirty_replicasets: BTreeSet::new(),
            dirty_pods: BTreeSet::new(),
            dirty_statefulsets: BTreeSet::new(),
            dirty_daemonsets: BTreeSet::new(),
            daemonsets: BTreeSet::new(),
            timers: BinaryHeap::new(),
            scheduled: HashMap::new(),
            full: true,
            gc: true,
            orphaned: Vec::new(),
            store,
            behaviours,
            pod_born: HashMap::new(),
            ticks: 0,
            last_progress: HashMap::new(),
            created: HashSet::new(),
            synced: HashMap::new(),
        }
    }

    /// Pull images of loopback registries for real (`depwatch sim --registries`).
    pub fn with_puller(mut self, puller: super::puller::Puller) -> Self {
        self.puller = Some(puller);
        self
    }

    /// Run on a thread of its own until cancelled: reconciling is synchronous CPU work that
    /// must not hold up the API server's request handling.
    pub fn spawn(
        mut self,
        cancel: CancellationToken,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("sim-controller".into())
            .spawn(move || {
                while !cancel.is_cancelled() {
                    let started = Instant::now();
                    self.reconcile();
                    std::thread::sleep(
                        TICK.saturating_sub(started.elapsed())
                            .max(Duration::from_millis(5)),
                    );
                }
            })
    }

    /// One step of every controller, on what changed since the last.
    pub fn reconcile(&mut self) {
        self.ticks = self.ticks.wrapping_add(1);
        self.absorb();
        if std::mem::take(&mut self.full) {
            self.everything_dirty();
        }
        if std::mem::take(&mut self.gc) {
            self.collect_garbage();
            self.absorb();
        }
        self.collect_orphans();
        self.due_timers();
        let deployments = std::mem::take(&mut self.dirty_deployments);
        for key in &deployments {
            if let Some(dep) = self.store.get(key) {
                if !dep["metadata"]["deletionTimestamp"].is_string() {
                    self.sync_deployment(&dep);
                }
            }
        }
        self.absorb();
        let replicasets = std::mem::take(&mut self.dirty_replicasets);
        for key in &replicasets {
            if let Some(rs) = self.store.get(key) {
                self.scale_replicaset(&rs);
            }
        }
        self.absorb();
        self.sync_workloads();
        self.absorb();
        for key in std::mem::take(&mut self.dirty_pods) {
            if let Some(pod) = self.store.get(&key) {
                self.kubelet(&key, &pod);
            }
        }
        self.absorb();
        let mut replicasets2 = std::mem::take(&mut self.dirty_replicasets);
        replicasets2.extend(replicasets);
        for key in &replicasets2 {
            if let Some(rs) = self.store.get(key) {
                self.replicaset_status(&rs);
            }
        }
        self.absorb();
        let mut deployments2 = std::mem::take(&mut self.dirty_deployments);
        deployments2.extend(deployments);
        for key in &deployments2 {
            if let Some(dep) = self.store.get(key) {
                self.deployment_status_one(key, &dep);
            }
        }
    }

    /// Take in every change since the last look: index it and mark what it concerns.
    pub(super) fn absorb(&mut self) {
        while let Ok(ev) = self.feed.try_recv() {
            self.note(&ev.key, &ev.object, ev.kind == EventType::Deleted);
        }
    }

    /// Index one object and mark it and its owners dirty.
    fn note(&mut self, key: &ObjKey, obj: &Value, deleted: bool) {
        let uid = meta::uid_of(obj).to_string();
        let owner = meta::controller_uid(obj).map(String::from);
        if let Some(old) = self.owner_of.remove(key) {
            if let Some(set) = self
                .owners
                .get_mut(&key.resource)
                .and_then(|m| m.get_mut(&old))
            {
                set.remove(key);
            }
        }
        if !deleted {
            if let Some(owner) = &owner {
                self.owners
                    .entry(key.resource.clone())
                    .or_default()
                    .entry(owner.clone())
                    .or_default()
                    .insert(key.clone());
                self.owner_of.insert(key.clone(), owner.clone());
            }
        }
        let deps = resources::deployments().qualified();
        let rss = resources::replicasets().qualified();
        let pods = resources::pods().qualified();
        let owner_key = owner.as_ref().and_then(|o| self.keys.get(o)).cloned();
        let owner_kind = self.note_workload(key, deleted);
        if key.resource == deps || key.resource == rss || owner_kind {
            match deleted {
                true => self.keys.remove(&uid),
                false => self.keys.insert(uid.clone(), key.clone()),
            };
        }
        if deleted {
            self.pod_born.remove(&uid);
            if key.resource == deps || key.resource == rss || owner_kind {
                self.orphaned.push(uid.clone());
            } else if key.resource == resources::namespaces().qualified() {
                self.gc = true;
            }
        }
        if key.resource == deps {
            self.dirty_deployments.insert(key.clone());
        } else if key.resource == rss {
            self.dirty_replicasets.insert(key.clone());
            if let Some(dep) = owner_key {
                self.dirty_deployments.insert(dep);
            }
        } else if key.resource == pods {
            if !deleted {
                self.dirty_pods.insert(key.clone());
            }
            if let Some(owner) = owner_key {
                self.owner_changed(owner);
            }
        } else if let Some(owner) = owner_key {
            // ControllerRevisions (and anything else a workload controls).
            self.owner_changed(owner);
        }
    }

    /// Something an owner controls changed: look at the owner (and a ReplicaSet's Deployment).
    fn owner_changed(&mut self, owner: ObjKey) {
        if owner.resource == resources::replicasets().qualified() {
            let dep = self
                .owner_of
                .get(&owner)
                .and_then(|d| self.keys.get(d))
                .cloned();
            self.dirty_replicasets.insert(owner);
            if let Some(dep) = dep {
                self.dirty_deployments.insert(dep);
            }
        } else if owner.resource == resources::deployments().qualified() {
            self.dirty_deployments.insert(owner);
        } else {
            self.workload_changed(owner);
        }
    }

    /// Delete what deleted owners controlled (background cascading deletion), one level per
    /// pass: a Deployment's ReplicaSets now, their pods when those deletions come back.
    fn collect_orphans(&mut self) {
        while let Some(owner) = self.orphaned.pop() {
            for rt in [
                resources::replicasets(),
                resources::pods(),
                resources::controllerrevisions(),
            ] {
                for obj in self.owned(rt, "", &owner) {
                    self.delete(rt, &obj);
                }
            }
        }
        self.absorb();
    }

    /// Index and mark every object (start-up, or a restored state).
    fn everything_dirty(&mut self) {
        for rt in [
            resources::deployments(),
            resources::replicasets(),
            resources::statefulsets(),
            resources::daemonsets(),
            resources::controllerrevisions(),
            resources::nodes(),
            resources::pods(),
        ] {
            let (items, _) = self.store.list(&rt.qualified(), None);
            for obj in &items {
                let key = ObjKey::new(rt, meta::namespace(obj), meta::name(obj));
                self.note(&key, obj, false);
            }
        }
        // Owners listed after what they own: mark again now every key is known.
        let (pods, _) = self.store.list(&resources::pods().qualified(), None);
        for obj in &pods {
            let key = ObjKey::new(resources::pods(), meta::namespace(obj), meta::name(obj));
            self.note(&key, obj, false);
        }
    }

    /// Look at `key` again at `at` (the earliest of its requests wins).
    fn schedule(&mut self, key: &ObjKey, at: Instant) {
        if self.scheduled.get(key).is_some_and(|t| *t <= at) {
            return;
        }
        self.scheduled.insert(key.clone(), at);
        self.timers.push(Reverse((at, key.clone())));
    }

    fn due_timers(&mut self) {
        let now = Instant::now();
        let pods = resources::pods().qualified();
        while let Some(Reverse((at, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, key))) = self.timers.pop() else {
                break;
            };
            if self.scheduled.get(&key) != Some(&at) {
                continue;
            }
            self.scheduled.remove(&key);
            if key.resource == pods {
                self.dirty_pods.insert(key);
            } else {
                self.dirty_deployments.insert(key);
            }
        }
    }

    /// Change one object in place; spec changes bump `metadata.generation`.
    pub(super) fn update(&self, rt: &ResourceType, obj: &Value, f: impl FnOnce(&mut Value)) {
        let key = ObjKey::new(rt, meta::namespace(obj), meta::name(obj));
        let uid = meta::uid_of(obj).to_string();
        let track = rt.tracks_generation;
        let _ = self.store.write(&key, |cur| {
            // The object may have been replaced or deleted since this tick read it.
            let Some(cur) = cur.filter(|c| meta::uid_of(c) == uid) else {
                return Ok(cur.cloned());
            };
            let mut next = cur.clone();
            f(&mut next);
            if track && next.get("spec") != cur.get("spec") {
                let g = int(&cur["metadata"]["generation"]) + 1;
                next["metadata"]["generation"] = json!(g);
            }
            Ok(Some(next))
        });
    }

    pub(super) fn create(&self, rt: &ResourceType, obj: Value) {
        let key = ObjKey::new(rt, meta::namespace(&obj), meta::name(&obj));
        let _ = self.store.write(&key, |cur| match cur {
            Some(c) => Ok(Some(c.clone())),
            None => Ok(Some(obj)),
        });
    }

    pub(super) fn delete(&self, rt: &ResourceType, obj: &Value) {
        let key = ObjKey::new(rt, meta::namespace(obj), meta::name(obj));
        let uid = meta::uid_of(obj).to_string();
        let _ = self.store.write(&key, |cur| match cur {
            Some(c) if meta::uid_of(c) == uid => Ok(None),
            other => Ok(other.cloned()),
        });
    }

    /// Delete objects whose controlling owner is gone (background cascading deletion) and
    /// objects in namespaces that no longer exist.
    fn collect_garbage(&mut self) {
        let (namespaces, _) = self.store.list(&resources::namespaces().qualified(), None);
        let live_ns: HashSet<&str> = namespaces.iter().map(meta::name).collect();
        let mut uids: HashSet<String> = HashSet::new();
        let mut all = Vec::new();
        for rt in resources::RESOURCES {
            let (items, _) = self.store.list(&rt.qualified(), None);
            for i in &items {
                uids.insert(meta::uid_of(i).to_string());
            }
            all.push((rt, items));
        }
        for (rt, items) in &all {
            for obj in items {
                let orphan = meta::controller_uid(obj).is_some_and(|u| !uids.contains(u));
                let homeless = rt.namespaced && !live_ns.contains(meta::namespace(obj));
                if orphan || homeless {
                    self.delete(rt, obj);
                }
            }
        }
        self.pod_born.retain(|uid, _| uids.contains(uid));
        self.synced.retain(|uid, _| uids.contains(uid));
        self.last_progress.retain(|uid, _| uids.contains(uid));
    }

    /// Objects of a kind controlled by `owner_uid`, from the index kept from the feed.
    pub(super) fn owned(
        &self,
        rt: &ResourceType,
        _namespace: &str,
        owner_uid: &str,
    ) -> Vec<Arc<Value>> {
        self.owners
            .get(&rt.qualified())
            .and_then(|m| m.get(owner_uid))
            .into_iter()
            .flatten()
            .filter_map(|k| self.store.get(k))
            .collect()
    }

    pub(super) fn pod_ready(pod: &Value) -> bool {
        pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
    }

    /// The readiness of a ReplicaSet's pods, read in place (no copy of each pod).
    fn health_by_rs(&self, _namespace: &str, rs_uid: &str) -> Vec<PodHealth> {
        self.owners
            .get(&resources::pods().qualified())
            .and_then(|m| m.get(rs_uid))
            .into_iter()
            .flatten()
            .filter_map(|k| {
                self.store.read(k, |p| PodHealth {
                    ready: Self::pod_ready(p),
                })
            })
            .collect()
    }

    fn sync_deployment(&mut self, dep: &Value) {
        let ns = meta::namespace(dep).to_string();
        let name = meta::name(dep).to_string();
        let uid = meta::uid_of(dep).to_string();
        let template = dep["spec"]["template"].clone();
        let hash = template_hash(&template);
        let rss = self.owned(resources::replicasets(), &ns, &uid);
        let max_rev = rss.iter().map(|rs| revision(rs)).max().unwrap_or(0);
        let desired = dep["spec"]["replicas"].as_i64().unwrap_or(1);

        let new_rs = rss
            .iter()
            .find(|rs| strip_hash(&rs["spec"]["template"]) == template)
            .cloned();
        let mut new_rev = max_rev + 1;
        let new_rs = match new_rs {
            Some(rs) => {
                if revision(&rs) >= max_rev {
                    new_rev = revision(&rs);
                } else {
                    // A rollback to an older template reuses its ReplicaSet with a new revision.
                    let next = (max_rev + 1).to_string();
                    let old = revision(&rs).to_string();
                    self.update(resources::replicasets(), &rs, |o| {
                        o["metadata"]["annotations"][REVISION] = json!(next);
                        o["metadata"]["annotations"]["deployment.kubernetes.io/revision-history"] =
                            json!(old);
                    });
                    self.last_progress.insert(uid.clone(), Instant::now());
                }
                rs
            }
            None => {
                let rs_name = format!("{name}-{hash}");
                let mut rs_template = template.clone();
                rs_template["metadata"]["labels"][HASH_LABEL] = json!(hash);
                let mut selector = dep["spec"]["selector"].clone();
                selector["matchLabels"][HASH_LABEL] = json!(hash);
                let mut labels = template["metadata"]["labels"].clone();
                labels[HASH_LABEL] = json!(hash);
                let rs = json!({
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "metadata": {
                        "name": rs_name,
                        "namespace": ns,
                        "uid": meta::uid(),
                        "generation": 1,
                        "creationTimestamp": meta::now(),
                        "labels": labels,
                        "annotations": {
                            REVISION: (max_rev + 1).to_string(),
                            "deployment.kubernetes.io/desired-replicas": desired.to_string(),
                        },
                        "ownerReferences": [{
                            "apiVersion": "apps/v1", "kind": "Deployment", "name": name,
                            "uid": uid, "controller": true, "blockOwnerDeletion": true
                        }]
                    },
                    "spec": {"replicas": 0, "selector": selector, "template": rs_template},
                    "status": {"replicas": 0, "observedGeneration": 1}
                });
                self.create(resources::replicasets(), rs.clone());
                self.created.insert(uid.clone());
                self.last_progress.insert(uid.clone(), Instant::now());
                Arc::new(rs)
            }
        };

        // Like the real controller, the new ReplicaSet carries the Deployment's own annotations
        // (so `kubectl rollout history` shows each revision's change-cause).
        let mut wanted = new_rs["metadata"]["annotations"].clone();
        if let Some(own) = dep["metadata"]["annotations"].as_object() {
            for (k, v) in own {
                if k != REVISION && k != "kubectl.kubernetes.io/last-applied-configuration" {
                    wanted[k] = v.clone();
                }
            }
        }
        if wanted != new_rs["metadata"]["annotations"] {
            self.update(resources::replicasets(), &new_rs, |o| {
                if let (Some(target), Some(src)) = (
                    o["metadata"]["annotations"].as_object_mut(),
                    wanted.as_object(),
                ) {
                    for (k, v) in src {
                        if k != REVISION && k != "deployment.kubernetes.io/revision-history" {
                            target.insert(k.clone(), v.clone());
                        }
                    }
                }
            });
        }
        self.synced
            .insert(uid.clone(), dep["metadata"]["generation"].clone());
        // The Deployment carries its newest revision.
        if dep["metadata"]["annotations"][REVISION].as_str() != Some(&new_rev.to_string()) {
            let r = new_rev.to_string();
            self.update(resources::deployments(), dep, |o| {
                o["metadata"]["annotations"][REVISION] = json!(r);
            });
        }
        if dep["spec"]["paused"].as_bool() == Some(true) {
            return;
        }

        let new_uid = meta::uid_of(&new_rs).to_string();
        let olds: Vec<Arc<Value>> = rss
            .into_iter()
            .filter(|rs| meta::uid_of(rs) != new_uid)
            .collect();
        let spec_of = |rs: &Arc<Value>| int(&rs["spec"]["replicas"]);
        let new_spec = spec_of(&new_rs);
        let strategy = &dep["spec"]["strategy"];
        if strategy["type"] == "Recreate" {
            let old_pods: usize = olds
                .iter()
                .map(|rs| self.owned(resources::pods(), &ns, meta::uid_of(rs)).len())
                .sum();
            for rs in &olds {
                if spec_of(rs) > 0 {
                    self.update(resources::replicasets(), rs, |o| {
                        o["spec"]["replicas"] = json!(0)
                    });
                }
            }
            if old_pods == 0 && new_spec != desired {
                self.update(resources::replicasets(), &new_rs, |o| {
                    o["spec"]["replicas"] = json!(desired)
                });
            }
            return;
        }

        let ru = &strategy["rollingUpdate"];
        let surge = int_or_percent(&ru["maxSurge"], desired, true, "25%");
        let mut unavail = int_or_percent(&ru["maxUnavailable"], desired, false, "25%");
        if surge == 0 && unavail == 0 {
            unavail = 1;
        }
        let total_spec: i64 = spec_of(&new_rs) + olds.iter().map(spec_of).sum::<i64>();
        // Scale the new ReplicaSet up within the surge allowance, or down to the desired count.
        let mut target_new = new_spec;
        if new_spec < desired {
            let allowed = (desired + surge - total_spec).max(0);
            target_new = new_spec + allowed.min(desired - new_spec);
        } else if new_spec > desired {
            target_new = desired;
        }
        if target_new != new_spec {
            self.update(resources::replicasets(), &new_rs, |o| {
                o["spec"]["replicas"] = json!(target_new);
                o["metadata"]["annotations"]["deployment.kubernetes.io/desired-replicas"] =
                    json!(desired.to_string());
            });
        }

        // Scale old ReplicaSets down without going under the minimum availability.
        let new_health = self.health_by_rs(&ns, &new_uid);
        let new_available = new_health.iter().filter(|h| h.ready).count() as i64;
        let mut old_avail = Vec::new();
        for rs in &olds {
            let h = self.health_by_rs(&ns, meta::uid_of(rs));
            old_avail.push(h.iter().filter(|h| h.ready).count() as i64);
        }
        let all_available = new_available + old_avail.iter().sum::<i64>();
        let all_spec = target_new + olds.iter().map(spec_of).sum::<i64>();
        let min_available = desired - unavail;
        let new_unavailable = (target_new - new_available).max(0);
        let mut budget = (all_spec - min_available - new_unavailable).max(0);
        let mut targets: Vec<i64> = olds.iter().map(spec_of).collect();
        // First the old pods that are not available anyway.
        for (i, t) in targets.iter_mut().enumerate() {
            let unhealthy = (*t - old_avail[i]).max(0);
            let cut = unhealthy.min(budget);
            *t -= cut;
            budget -= cut;
        }
        let mut can_remove = (all_available - min_available).max(0).min(budget);
        for t in targets.iter_mut() {
            let cut = (*t).min(can_remove);
            *t -= cut;
            can_remove -= cut;
        }
        for (rs, t) in olds.iter().zip(targets) {
            if t != spec_of(rs) {
                self.update(resources::replicasets(), rs, |o| {
                    o["spec"]["replicas"] = json!(t)
                });
            }
        }
    }

    fn scale_replicaset(&mut self, rs: &Value) {
        {
            let rs = rs.clone();
            let ns = meta::namespace(&rs).to_string();
            let want = int(&rs["spec"]["replicas"]);
            let mut pods = self.owned(resources::pods(), &ns, meta::uid_of(&rs));
            let have = pods.len() as i64;
            if have < want {
                for _ in have..want {
                    self.create(resources::pods(), self.new_pod(&rs));
                }
            } else if have > want {
                // Remove pods that are not ready first, then the youngest.
                pods.sort_by_key(|p| {
                    (
                        Self::pod_ready(p),
                        std::cmp::Reverse(
                            self.pod_born
                                .get(meta::uid_of(p))
                                .copied()
                                .unwrap_or_else(Instant::now),
                        ),
                    )
                });
                for p in pods.iter().take((have - want) as usize) {
                    self.delete(resources::pods(), p);
                }
            }
        }
    }

    fn new_pod(&self, rs: &Value) -> Value {
        let template = &rs["spec"]["template"];
        let rs_name = meta::name(rs);
        let mut spec = template["spec"].clone();
        let name = format!("{rs_name}-{}", meta::suffix(5));
        spec["nodeName"] = json!(self.node_for(&name));
        if spec["restartPolicy"].is_null() {
            spec["restartPolicy"] = json!("Always");
        }
        let mut metadata = json!({
            "name": name,
            "generateName": format!("{rs_name}-"),
            "namespace": meta::namespace(rs),
            "uid": meta::uid(),
            "creationTimestamp": meta::now(),
            "labels": template["metadata"]["labels"].clone(),
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs_name,
                "uid": meta::uid_of(rs), "controller": true, "blockOwnerDeletion": true
            }]
        });
        if !template["metadata"]["annotations"].is_null() {
            metadata["annotations"] = template["metadata"]["annotations"].clone();
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"}
        })
    }

    /// The kubelet: move a pod's status along according to its images' fates, and come back
    /// when that status is next due to change.
    fn kubelet(&mut self, key: &ObjKey, pod: &Value) {
        // Failed and Succeeded are terminal: a kubelet never moves a pod out of them (the
        // workload controllers replace such pods).
        if matches!(
            pod["status"]["phase"].as_str(),
            Some("Failed" | "Succeeded")
        ) {
            return;
        }
        let now = Instant::now();
        let uid = meta::uid_of(pod).to_string();
        let born = *self.pod_born.entry(uid).or_insert(now);
        let age = now.saturating_duration_since(born);
        let status = self.pod_status(pod, age);
        if !same_status(&pod["status"], &status) {
            self.update(resources::pods(), pod, |o| o["status"] = status);
        }
        if let Some(next) = self.next_change(pod, age) {
            self.schedule(key, born + next);
        }
    }

    /// What `image` does in `pod`: with `--registries`, a real pull from a loopback registry
    /// first (its failure, with the registry's words; while it is under way the container is
    /// being created, looked at again shortly), then the image rules.
    fn fate(&self, pod: &Value, image: &str, age: Duration) -> (Fate, Duration, Option<String>) {
        use super::puller::Pull;
        match self.puller.as_ref().and_then(|p| p.pull(pod, image)) {
            Some(Pull::Pending) => (Fate::Ready, age + TICK, None),
            Some(Pull::Failed(why)) => (Fate::FailPull, Duration::ZERO, Some(why)),
            Some(Pull::Pulled) | None => {
                let (fate, delay) = self.behaviours.fate(image);
                (fate, delay, None)
            }
        }
    }

    /// The pod's age at which its status next changes by itself, if it ever does.
    fn next_change(&self, pod: &Value, age: Duration) -> Option<Duration> {
        let containers = pod["spec"]["containers"].as_array()?;
        containers
            .iter()
            .filter_map(|c| {
                let image = c["image"].as_str().unwrap_or_default();
                if !valid_image_reference(image) {
                    return None;
                }
                let (fate, delay, pulled) = self.fate(pod, image, age);
                let steps: Vec<Duration> = match fate {
                    // A real pull that failed is tried again: look again each second.
                    Fate::FailPull if pulled.is_some() => {
                        vec![PULL_FAIL_AFTER, BACKOFF_AFTER, age + Duration::from_secs(1)]
                    }
                    Fate::FailPull => vec![PULL_FAIL_AFTER, BACKOFF_AFTER],
                    Fate::ConfigError => vec![PULL_FAIL_AFTER],
                    Fate::Crash => {
                        let since = age.saturating_sub(delay);
                        let cycles = since.as_millis() / CRASH_CYCLE.as_millis();
                        let next = CRASH_CYCLE * (cycles as u32 + 1);
                        vec![delay, delay + Duration::from_millis(300), delay + next]
                    }
                    _ => vec![delay],
                };
                steps.into_iter().find(|t| *t > age)
            })
            .min()
    }

    fn pod_status(&self, pod: &Value, age: Duration) -> Value {
        let started = pod["status"]["startTime"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(meta::now);
        let mut statuses = Vec::new();
        let mut all_created = true;
        let mut all_ready = true;
        let pod_name = meta::name(pod);
        for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
            let cname = c["name"].as_str().unwrap_or_default();
            let image = c["image"].as_str().unwrap_or_default();
            let (fate, delay, pull_error) = if valid_image_reference(image) {
                self.fate(pod, image, age)
            } else {
                (Fate::Ready, Duration::ZERO, None)
            };
            let waiting = |reason: &str, message: String| json!({"waiting": {"reason": reason, "message": message}});
            let mut restarts = 0u64;
            let mut last_state = json!({});
            let (state, running, ready) = if !valid_image_reference(image) {
                (
                    waiting(
                        "InvalidImageName",
                        format!("Failed to apply default image tag \"{image}\": couldn't parse image name \"{image}\": invalid reference format"),
                    ),
                    false,
                    false,
                )
            } else {
                match fate {
                    Fate::FailPull if age < PULL_FAIL_AFTER => (
                        json!({"waiting": {"reason": "ContainerCreating"}}),
                        false,
                        false,
                    ),
                    Fate::FailPull if age < BACKOFF_AFTER => (
                        waiting("ErrImagePull", pull_failure(image, &pull_error)),
                        false,
                        false,
                    ),
                    // As kubelets since 1.30 say it: the back-off carries the pull's own error.
                    Fate::FailPull => (
                        waiting(
                            "ImagePullBackOff",
                            format!(
                                "Back-off pulling image \"{image}\": ErrImagePull: {}",
                                pull_failure(image, &pull_error)
                            ),
                        ),
                        false,
                        false,
                    ),
                    Fate::ConfigError if age >= PULL_FAIL_AFTER => (
                        waiting(
                            "CreateContainerConfigError",
                            format!(
                                "couldn't find key password in Secret {}/db",
                                meta::namespace(pod)
                            ),
                        ),
                        false,
                        false,
                    ),
                    _ if age < delay => (
                        json!({"waiting": {"reason": "ContainerCreating"}}),
                        false,
                        false,
                    ),
                    Fate::Crash => {
                        let since = age - delay;
                        restarts = (since.as_millis() / CRASH_CYCLE.as_millis()) as u64;
                        let in_cycle = since.as_millis() % CRASH_CYCLE.as_millis();
                        if restarts > 0 {
                            last_state = json!({"terminated": {"exitCode": 1, "reason": "Error",
                                "message": "panic: cannot connect to database"}});
                        }
                        if in_cycle < 300 && restarts == 0 {
                            (json!({"running": {"startedAt": started}}), true, false)
                        } else {
                            (
                                waiting(
                                    "CrashLoopBackOff",
                                    format!("back-off {}s restarting failed container={cname} pod={pod_name}", 10u64 << restarts.min(5)),
                                ),
                                false,
                                false,
                            )
                        }
                    }
                    Fate::Hang => (json!({"running": {"startedAt": started}}), true, false),
                    _ => (json!({"running": {"startedAt": started}}), true, true),
                }
            };
            // A container that has started once (a crash loop restarts it) makes the pod Running,
            // as a kubelet reports it; one never created keeps it Pending.
            let created = running || (fate == Fate::Crash && age >= delay);
            all_created &= created;
            all_ready &= ready;
            statuses.push(json!({
                "name": cname,
                "image": image,
                "imageID": if running { format!("{image}@sha256:{}", "0".repeat(64)) } else { String::new() },
                "ready": ready,
                "started": running,
                "restartCount": restarts,
                "state": state,
                "lastState": last_state,
            }));
        }
        let cond =
            |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        json!({
            "phase": if all_created { "Running" } else { "Pending" },
            "hostIP": super::workloads::host_ip(pod),
            "podIP": "10.1.0.1",
            "startTime": started,
            "qosClass": "BestEffort",
            "conditions": [
                cond("PodScheduled", true),
                cond("Initialized", true),
                cond("ContainersReady", all_ready),
                cond("Ready", all_ready),
            ],
            "containerStatuses": statuses,
        })
    }

    fn replicaset_status(&mut self, rs: &Value) {
        let health = self.health_by_rs(meta::namespace(rs), meta::uid_of(rs));
        let ready = health.iter().filter(|h| h.ready).count();
        let status = json!({
            "replicas": health.len(),
            "fullyLabeledReplicas": health.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "observedGeneration": rs["metadata"]["generation"].clone(),
        });
        if rs["status"] != status {
            self.update(resources::replicasets(), rs, |o| o["status"] = status);
        }
    }

    fn deployment_status_one(&mut self, key: &ObjKey, dep: &Value) {
        let ns = meta::namespace(dep);
        let uid = meta::uid_of(dep).to_string();
        let desired = dep["spec"]["replicas"].as_i64().unwrap_or(1);
        let template = &dep["spec"]["template"];
        let observed = self
            .synced
            .get(&uid)
            .cloned()
            .unwrap_or_else(|| dep["status"]["observedGeneration"].clone());
        let rss = self.owned(resources::replicasets(), ns, &uid);
        let new_rs = rss
            .iter()
            .find(|rs| strip_hash(&rs["spec"]["template"]) == *template);
        let (mut replicas, mut ready, mut updated) = (0i64, 0i64, 0i64);
        for rs in &rss {
            let h = self.health_by_rs(ns, meta::uid_of(rs));
            replicas += h.len() as i64;
            ready += h.iter().filter(|h| h.ready).count() as i64;
            if Some(rs) == new_rs {
                updated = h.len() as i64;
            }
        }
        let available = ready;
        let ru = &dep["spec"]["strategy"]["rollingUpdate"];
        let unavail_allowed = if dep["spec"]["strategy"]["type"] == "Recreate" {
            0
        } else {
            int_or_percent(&ru["maxUnavailable"], desired, false, "25%")
        };
        let old = &dep["status"];
        let now = meta::now();
        let rs_name = new_rs
            .map(|rs| meta::name(rs))
            .unwrap_or_default()
            .to_string();

        let progressed = int(&old["updatedReplicas"]) < updated
            || int(&old["readyReplicas"]) < ready
            || int(&old["availableReplicas"]) < available
            || int(&old["replicas"]) > replicas
            || old["observedGeneration"] != observed;
        if progressed {
            self.last_progress.insert(uid.clone(), Instant::now());
        }
        let complete = updated == desired && replicas == desired && available == desired;
        let old_progressing = old["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
            .cloned();
        let old_reason = old_progressing
            .as_ref()
            .and_then(|c| c["reason"].as_str())
            .unwrap_or_default()
            .to_string();
        let deadline = dep["spec"]["progressDeadlineSeconds"]
            .as_u64()
            .unwrap_or(600);
        let stalled = self
            .last_progress
            .get(&uid)
            .is_some_and(|t| t.elapsed() > Duration::from_secs(deadline));
        if !complete {
            // Come back when the progress deadline passes, if nothing happens before.
            if let Some(t) = self.last_progress.get(&uid).copied() {
                self.schedule(key, t + Duration::from_secs(deadline) + TICK);
            }
        }
        // The sync that created the new ReplicaSet reports NewReplicaSetCreated once.
        let created_now = self.created.remove(&uid);
        let (status, reason, message) = if complete {
            (
                "True",
                "NewReplicaSetAvailable",
                format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
            )
        } else if stalled && !progressed {
            (
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            )
        } else if created_now && old_reason != "ReplicaSetUpdated" {
            (
                "True",
                "NewReplicaSetCreated",
                format!("Created new replica set \"{rs_name}\""),
            )
        } else if old_reason == "ProgressDeadlineExceeded" && !progressed {
            (
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            )
        } else {
            (
                "True",
                "ReplicaSetUpdated",
                format!("ReplicaSet \"{rs_name}\" is progressing."),
            )
        };
        let same_progressing = old_progressing.as_ref().is_some_and(|c| {
            c["status"] == status && c["reason"] == reason && c["message"] == message
        });
        let progressing = if same_progressing {
            old_progressing.clone().unwrap_or_default()
        } else {
            let transition = match &old_progressing {
                Some(c) if c["status"] == status => c["lastTransitionTime"].clone(),
                _ => json!(now),
            };
            json!({"type": "Progressing", "status": status, "reason": reason, "message": message,
                   "lastUpdateTime": now, "lastTransitionTime": transition})
        };
        let is_available = available >= desired - unavail_allowed;
        let old_available = old["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Available"))
            .cloned();
        let (a_status, a_reason, a_message) = if is_available {
            (
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        } else {
            (
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )
        };
        let available_cond = match old_available {
            Some(c) if c["status"] == a_status && c["reason"] == a_reason => c,
            _ => json!({"type": "Available", "status": a_status, "reason": a_reason,
                        "message": a_message, "lastUpdateTime": now, "lastTransitionTime": now}),
        };
        let mut status = json!({
            "observedGeneration": observed,
            "replicas": replicas,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "conditions": [available_cond, progressing],
        });
        let unavailable = (desired - available).max(0);
        if unavailable > 0 {
            status["unavailableReplicas"] = json!(unavailable);
        }
        if status != *old {
            self.update(resources::deployments(), dep, |o| o["status"] = status);
        }
    }
}

/// Pod statuses compare equal when nothing but the clock moved.
/// Why a pull failed: the registry's own words, or the image rules' "not found".
fn pull_failure(image: &str, from_registry: &Option<String>) -> String {
    from_registry.clone().unwrap_or_else(|| {
        format!("failed to pull and unpack image \"{image}\": failed to resolve reference \"{image}\": not found")
    })
}

fn same_status(a: &Value, b: &Value) -> bool {
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_like_the_controller() {
        assert_eq!(int_or_percent(&Value::Null, 3, true, "25%"), 1);
        assert_eq!(int_or_percent(&Value::Null, 3, false, "25%"), 0);
        assert_eq!(int_or_percent(&json!(2), 3, false, "25%"), 2);
        assert_eq!(int_or_percent(&json!("50%"), 4, false, "25%"), 2);
    }

    #[test]
    fn template_hash_ignores_key_order() {
        let a = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {}});
        let b = json!({"spec": {}, "metadata": {"labels": {"b": "2", "a": "1"}}});
        assert_eq!(template_hash(&a), template_hash(&b));
        assert_ne!(template_hash(&a), template_hash(&json!({})));
    }
}
