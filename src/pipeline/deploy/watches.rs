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

/// How a scope's first listing goes: kinds listed, and whether a watch failed before.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    listed: u8,
    failed: bool,
}

/// The watches' retry pacing: kube-runtime's exponential backoff from 500 ms, doubling, with
/// jitter, at most 5 s apart, starting over once a watch has run for a minute. Faster than
/// kube's default (800 ms to 30 s): depwatch holds six watches, so it can afford to come back
/// quickly after an API server outage (a rollout judged meanwhile waits on them).
fn pacing() -> impl kube::runtime::utils::Backoff {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    kube::runtime::utils::ResetTimerBackoff::new(
        kube::runtime::watcher::ExponentialBackoff::from(builder),
        Duration::from_secs(60),
    )
}

/// How long a deploy waits for a scope's first listing before it reads the API server.
const FIRST_LISTING: Duration = Duration::from_secs(10);

/// Where one scope's watches are.
enum Scope {
    /// Started at `since`, listing: how far they have got.
    Starting {
        since: tokio::time::Instant,
        progress: watch::Receiver<Progress>,
    },
    /// Every kind has listed: its caches are trusted.
    Synced,
}

/// All shared watches, started on first use and shared by every service.
#[derive(Clone)]
pub struct Watches {
    client: Client,
    bounds: Arc<Bounds>,
    /// Exact `--namespaces`: per-namespace watches; `None`: cluster-wide.
    exact: Option<Arc<HashSet<String>>>,
    by_namespace: Arc<DashMap<String, NamespaceWatch>>,
    /// Each scope's watches (a namespace's, or the cluster's under the key `None`), from the
    /// moment they are started.
    scopes: Arc<DashMap<Option<String>, Scope>>,
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
            scopes: Arc::default(),
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
        let synced = self
            .scopes
            .get(&self.scope_of(namespace))
            .is_some_and(|s| matches!(*s, Scope::Synced));
        synced.then(|| self.entry(namespace))
    }

    /// The scope whose watches cover `namespace`.
    fn scope_of(&self, namespace: &str) -> Option<String> {
        self.exact.as_ref().map(|_| namespace.to_string())
    }

    fn entry(&self, namespace: &str) -> NamespaceWatch {
        self.by_namespace
            .entry(namespace.to_string())
            .or_default()
            .clone()
    }

    /// The state of `namespace`: its watches started if they are not running yet, and given
    /// up to [`FIRST_LISTING`] from their start to list (less when a watch fails first: the
    /// API server may be down). Use [`Self::cached`] to know whether it has listed.
    pub async fn namespace(&self, namespace: &str) -> NamespaceWatch {
        let scope = self.scope_of(namespace);
        let (since, mut seen) = match self.scopes.entry(scope.clone()) {
            dashmap::Entry::Occupied(e) => match e.get() {
                Scope::Synced => return self.entry(namespace),
                Scope::Starting { since, progress } => (*since, progress.clone()),
            },
            dashmap::Entry::Vacant(e) => {
                let route = match scope {
                    None => Route::Cluster,
                    Some(_) => Route::One(namespace.to_string(), self.entry(namespace)),
                };
                let (progress, seen) = watch::channel(Progress::default());
                let since = tokio::time::Instant::now();
                e.insert(Scope::Starting {
                    since,
                    progress: seen.clone(),
                });
                self.spawn_all(&route, &progress);
                self.mark_synced_when_listed(scope.clone(), seen.clone());
                (since, seen)
            }
        };
        // A scope depwatch may not list (RBAC), or an API server that does not answer, must not
        // hold deploys: they read the API server until the watches have listed.
        let settled = |p: &Progress| p.listed >= KINDS || p.failed;
        let waited = tokio::time::timeout_at(since + FIRST_LISTING, seen.wait_for(settled)).await;
        if matches!(waited, Ok(Ok(ref p)) if p.listed >= KINDS) {
            // Trusted at once: the deploys waiting on it read the lists, not the API server
            // (the task marking it may not have run yet).
            self.scopes.insert(scope, Scope::Synced);
        } else if !matches!(self.scopes.get(&scope).as_deref(), Some(Scope::Synced)) {
            let shown = scope.map_or_else(|| "the cluster".into(), |ns| format!("namespace {ns}"));
            tracing::warn!(scope = %shown, "the shared watches have not listed yet (is the API server up, and is depwatch allowed to list deployments, statefulsets, daemonsets, cronjobs, replicasets and pods there?); deploys read the API server meanwhile");
        }
        self.entry(namespace)
    }

    /// Once every kind of `scope` has listed, its caches are trusted.
    fn mark_synced_when_listed(&self, scope: Option<String>, mut seen: watch::Receiver<Progress>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = this.stop.cancelled() => {}
                r = seen.wait_for(|p| p.listed >= KINDS) => if r.is_ok() {
                    this.scopes.insert(scope, Scope::Synced);
                }
            }
        });
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

/// Objects per page of a watch's listing. Each page is read whole before it is reduced to
/// what the caches keep: kube's 500 full objects (with their managed fields) made the
/// daemon's start-up peak, and the heap it leaves behind (measured at 1,000 services).
const LIST_PAGE: u32 = 100;

impl Feed {
    /// Feed one kind's watch events into the caches until the watches stop. Counts `synced`
    /// up once the first complete listing is in.
    async fn run<K: Cached>(
        mut self,
        api: Api<K>,
        synced: watch::Sender<Progress>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let stream =
            watcher(api, watcher::Config::default().page_size(LIST_PAGE)).backoff(pacing());
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
