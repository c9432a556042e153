//! The shared watches that feed [`super::cache`]: one watch per kind depwatch needs
//! (Deployments, StatefulSets, DaemonSets, CronJobs, ReplicaSets, pods), so connections grow
//! neither with services nor with namespaces.
//! - Without `--namespaces`, or with patterns: one cluster-wide watch per kind, started at
//!   first use; events of namespaces the bounds refuse are dropped as they arrive.
//! - With `--namespaces` naming exact namespaces: watches of those namespaces only (a token
//!   confined to them cannot watch cluster-wide), started when a namespace is first used.
//!
//! Start-up reads lists (each watch's first listing), never one GET per service.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher::Event;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};

use super::cache::{Cached, NamespaceWatch};
use crate::bounds::Bounds;
use crate::domain::{ServiceKey, WorkloadKind};

/// How many kinds each scope watches.
const KINDS: u8 = 6;

/// Workloads whose images changed since drift last looked.
#[derive(Default)]
pub struct Changed {
    keys: std::sync::Mutex<HashSet<ServiceKey>>,
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

/// Where a watch's events go.
#[derive(Clone)]
enum Route {
    /// One namespace's watch: everything goes to its cache.
    One(String, NamespaceWatch),
    /// A cluster-wide watch: each object to its namespace's cache, if the bounds admit it.
    Cluster,
}

impl Route {
    fn describe(&self) -> String {
        match self {
            Route::One(ns, _) => format!("namespace {ns}"),
            Route::Cluster => "the cluster".to_string(),
        }
    }
}

/// How a scope's first listing goes: kinds listed, and whether a watch failed before.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    listed: u8,
    failed: bool,
}

/// The watches' retry pacing: exponential from 500 ms, with jitter, at most 5 s apart. depwatch
/// holds six watches, so it can afford to come back quickly after an API server outage (a
/// rollout judged meanwhile waits on them).
struct Pacing {
    next: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            next: Duration::from_millis(500),
        }
    }
}

impl Iterator for Pacing {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        Some(now.mul_f64(rand::random_range(0.8..1.2)))
    }
}

impl kube::runtime::utils::Backoff for Pacing {
    fn reset(&mut self) {
        *self = Pacing::default();
    }
}

/// All shared watches, started on first use and shared by every service.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    bounds: Arc<Bounds>,
    /// Exact `--namespaces`: per-namespace watches; `None`: cluster-wide.
    exact: Option<Arc<HashSet<String>>>,
    by_namespace: Arc<DashMap<String, NamespaceWatch>>,
    /// Namespaces whose watches completed their first listing (cluster-wide: all of them, once
    /// `cluster_synced`), and those whose watches were started.
    synced: Arc<DashMap<String, ()>>,
    started: Arc<DashMap<String, ()>>,
    cluster_synced: Arc<AtomicBool>,
    cluster_started: Arc<AtomicBool>,
    lock: Arc<tokio::sync::Mutex<()>>,
    changed: Arc<Changed>,
    /// The watch tasks, ended by [`Watches::stop`].
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
}

impl Watches {
    pub fn new(client: Client, bounds: Arc<Bounds>) -> Self {
        let exact = bounds
            .exact_namespaces()
            .map(|names| Arc::new(names.into_iter().collect()));
        Watches {
            client,
            bounds,
            exact,
            by_namespace: Arc::default(),
            synced: Arc::default(),
            started: Arc::default(),
            cluster_synced: Arc::default(),
            cluster_started: Arc::default(),
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

    /// Workloads whose images changed, for drift.
    pub fn changed(&self) -> Arc<Changed> {
        self.changed.clone()
    }

    /// Whether the watches are cluster-wide (no exact `--namespaces`).
    pub fn cluster_wide(&self) -> bool {
        self.exact.is_none()
    }

    /// The state of `namespace` if its watches have synced; never starts one.
    pub fn cached(&self, namespace: &str) -> Option<NamespaceWatch> {
        let synced = match self.exact {
            None => self.cluster_synced.load(Ordering::Acquire),
            Some(_) => self.synced.contains_key(namespace),
        };
        synced.then(|| self.entry(namespace))
    }

    fn entry(&self, namespace: &str) -> NamespaceWatch {
        self.by_namespace
            .entry(namespace.to_string())
            .or_default()
            .clone()
    }

    /// The state of `namespace`: its watches started if they are not running yet, and given
    /// up to 10 s to list (less when a watch fails first: the API server may be down). Use
    /// [`Self::cached`] to know whether it has listed.
    pub async fn namespace(&self, namespace: &str) -> NamespaceWatch {
        if let Some(w) = self.cached(namespace) {
            return w;
        }
        let _guard = self.lock.lock().await;
        let fresh = match self.exact {
            None => !self.cluster_started.swap(true, Ordering::AcqRel),
            Some(_) => self.started.insert(namespace.to_string(), ()).is_none(),
        };
        if !fresh {
            return self.entry(namespace);
        }
        let route = match self.exact {
            None => Route::Cluster,
            Some(_) => Route::One(namespace.to_string(), self.entry(namespace)),
        };
        let (progress, mut seen) = watch::channel(Progress::default());
        self.spawn_all(&route, &progress);
        self.mark_synced_when_listed(&route, seen.clone());
        // A scope depwatch may not list (RBAC), or an API server that does not answer, must not
        // hold deploys: they read the API server until the watches have listed.
        let settled = |p: &Progress| p.listed >= KINDS || p.failed;
        let waited = tokio::time::timeout(Duration::from_secs(10), seen.wait_for(settled)).await;
        if matches!(waited, Ok(Ok(ref p)) if p.listed >= KINDS) {
            // Trusted before the lock is let go: the deploys waiting on it read the lists,
            // not the API server (the task below may not have run yet).
            self.mark_synced(&route);
        } else {
            tracing::warn!(scope = %route.describe(), "the shared watches have not listed yet (is the API server up, and is depwatch allowed to list deployments, statefulsets, daemonsets, cronjobs, replicasets and pods there?); deploys read the API server meanwhile");
        }
        self.entry(namespace)
    }

    /// Once every kind of `route` has listed, its caches are trusted.
    fn mark_synced_when_listed(&self, route: &Route, mut seen: watch::Receiver<Progress>) {
        let (this, route) = (self.clone(), route.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                _ = this.stop.cancelled() => {}
                r = seen.wait_for(|p| p.listed >= KINDS) => if r.is_ok() {
                    this.mark_synced(&route);
                }
            }
        });
    }

    fn mark_synced(&self, route: &Route) {
        match route {
            Route::One(ns, _) => {
                self.synced.insert(ns.clone(), ());
            }
            Route::Cluster => self.cluster_synced.store(true, Ordering::Release),
        }
    }

    fn spawn_all(&self, route: &Route, synced: &watch::Sender<Progress>) {
        struct Spawn<'a>(&'a Watches, &'a Route, &'a watch::Sender<Progress>);
        impl super::workload::KindVisitor for Spawn<'_> {
            type Out = ();
            fn visit<K: super::workload::Kind>(self) {
                self.0.spawn::<K>(self.1, self.2)
            }
        }
        for &kind in WorkloadKind::ALL {
            super::workload::visit(kind, Spawn(self, route, synced));
        }
        self.spawn::<ReplicaSet>(route, synced);
        self.spawn::<Pod>(route, synced);
    }

    fn spawn<K: Cached>(&self, route: &Route, synced: &watch::Sender<Progress>) {
        let api: Api<K> = match route {
            Route::One(ns, _) => Api::namespaced(self.client.clone(), ns),
            Route::Cluster => Api::all(self.client.clone()),
        };
        let feed = Feed {
            watches: self.clone(),
            route: route.clone(),
            relisting: None,
        };
        let (synced, stop) = (synced.clone(), self.stop.clone());
        self.tasks.spawn(feed.run(api, synced, stop));
    }

    /// Where an object of `namespace` goes; `None` when the bounds refuse its namespace.
    fn target(&self, route: &Route, namespace: &str) -> Option<NamespaceWatch> {
        match route {
            Route::One(_, w) => Some(w.clone()),
            Route::Cluster => self
                .bounds
                .check_namespace(namespace)
                .is_ok()
                .then(|| self.entry(namespace)),
        }
    }
}

/// One watch's events, fed into the caches.
struct Feed {
    watches: Watches,
    route: Route,
    /// During a (re-)listing: the keys seen so far, by namespace.
    relisting: Option<HashMap<String, HashSet<String>>>,
}

impl Feed {
    /// Feed one kind's watch events into the caches until the watches stop. Counts `synced`
    /// up once the first complete listing is in.
    async fn run<K: Cached>(
        mut self,
        api: Api<K>,
        synced: watch::Sender<Progress>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let stream = watcher(api, watcher::Config::default()).backoff(Pacing::default());
        let mut stream = std::pin::pin!(stream);
        let mut first = true;
        loop {
            let event = tokio::select! {
                _ = stop.cancelled() => return,
                e = stream.next() => match e {
                    Some(e) => e,
                    None => return,
                },
            };
            match event {
                Ok(Event::InitDone) => {
                    self.relisted::<K>();
                    if std::mem::take(&mut first) {
                        synced.send_modify(|p| p.listed += 1);
                    }
                }
                Ok(event) => self.handle(event),
                Err(e) => {
                    if first {
                        synced.send_modify(|p| p.failed = true);
                    }
                    tracing::debug!(error = %e, "watch interrupted; it resumes with backoff");
                }
            }
        }
    }

    fn handle<K: Cached>(&mut self, event: Event<K>) {
        let (obj, init) = match event {
            Event::Init => {
                self.relisting = Some(HashMap::new());
                return;
            }
            Event::InitApply(obj) => (obj, true),
            Event::Apply(obj) => (obj, false),
            Event::Delete(obj) => {
                let ns = obj.namespace().unwrap_or_default();
                if let Some(w) = self.watches.target(&self.route, &ns) {
                    if obj.delete(&mut w.lock()) {
                        self.watches.changed.add(ServiceKey {
                            name: obj.name_any(),
                            namespace: ns,
                        });
                    }
                }
                return;
            }
            Event::InitDone => return,
        };
        let ns = obj.namespace().unwrap_or_default();
        let Some(w) = self.watches.target(&self.route, &ns) else {
            return;
        };
        if init {
            if let Some(seen) = self.relisting.as_mut() {
                seen.entry(ns.clone()).or_default().insert(obj.key());
            }
        }
        let images_changed = obj.apply(&mut w.lock());
        if images_changed {
            self.watches.changed.add(ServiceKey {
                name: obj.name_any(),
                namespace: ns,
            });
        }
    }

    /// A listing ended: drop what it no longer holds.
    fn relisted<K: Cached>(&mut self) {
        let Some(mut keep) = self.relisting.take() else {
            return;
        };
        let caches: Vec<(String, NamespaceWatch)> = match &self.route {
            Route::One(ns, w) => vec![(ns.clone(), w.clone())],
            Route::Cluster => self
                .watches
                .by_namespace
                .iter()
                .map(|e| (e.key().clone(), e.value().clone()))
                .collect(),
        };
        for (namespace, w) in caches {
            let gone = K::retain(&mut w.lock(), &keep.remove(&namespace).unwrap_or_default());
            for name in gone {
                let namespace = namespace.clone();
                self.watches.changed.add(ServiceKey { name, namespace });
            }
        }
    }
}
