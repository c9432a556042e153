//! Versioned object storage for the simulated cluster: every write bumps one global
//! `resourceVersion` (as etcd's revision does), is kept in a bounded event history for watches
//! that resume, and is broadcast to live watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::dryrun::Commit;
use super::resources::ResourceType;

/// How many past events a watch can resume from before it gets 410 Expired.
const HISTORY: usize = 20_000;

/// An API error rendered as a `kind: Status` body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{}\" not found", rt.qualified(), name),
        )
        .with_details(rt, name)
    }

    pub fn already_exists(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", rt.qualified(), name),
        )
        .with_details(rt, name)
    }

    pub fn conflict(rt: &ResourceType, name: &str) -> Self {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": the object has been modified; please apply your changes to the latest version and try again",
                rt.qualified(),
                name
            ),
        )
        .with_details(rt, name)
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn invalid(rt: &ResourceType, name: &str, causes: Vec<(String, String)>) -> Self {
        let message = format!(
            "{}.{} \"{}\" is invalid: {}",
            rt.kind,
            rt.group,
            name,
            causes
                .iter()
                .map(|(f, m)| format!("{f}: {m}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let message = message.replacen(&format!("{}. ", rt.kind), &format!("{} ", rt.kind), 1);
        let mut e = ApiError::new(422, "Invalid", message).with_details(rt, name);
        if let Some(d) = e.details.as_mut() {
            // NewInvalid names the kind (`StatefulSet`), where NotFound names the resource.
            d["kind"] = json!(rt.kind);
            d["causes"] = Value::Array(
                causes
                    .into_iter()
                    .map(|(field, message)| {
                        json!({"reason": "FieldValueInvalid", "message": message, "field": field})
                    })
                    .collect(),
            );
        }
        e
    }

    pub fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        let mut d = json!({"name": name, "kind": rt.plural});
        if !rt.group.is_empty() {
            d["group"] = json!(rt.group);
        }
        self.details = Some(d);
        self
    }

    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }
}

/// Identity of a stored object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjKey {
    /// `ResourceType::qualified()`, e.g. `deployments.apps`.
    pub resource: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
}

impl ObjKey {
    pub fn new(rt: &ResourceType, namespace: &str, name: &str) -> Self {
        ObjKey {
            resource: rt.qualified(),
            namespace: if rt.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug)]
pub struct StoredEvent {
    pub rv: u64,
    pub kind: EventType,
    pub key: ObjKey,
    /// Shared with the store's own copy: an event costs no copy of the object.
    pub object: Arc<Value>,
}

struct Inner {
    rv: u64,
    /// Shared, copied only on write: reads and events hold the same object.
    objects: BTreeMap<ObjKey, Arc<Value>>,
    history: VecDeque<Arc<StoredEvent>>,
    /// Events at or below this revision are gone; resuming from below it is 410 Expired.
    compacted: u64,
    /// The controller's own feed of every change: unbounded, so it never misses one.
    feed: Option<std::sync::mpsc::Sender<Arc<StoredEvent>>>,
}

/// The cluster's state. Cheap to share; all access is short and synchronous.
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// Bumped by each compaction; open watches end with 410 Expired when it moves.
    compactions: tokio::sync::watch::Sender<u64>,
}

/// What a watch starts from.
pub enum WatchStart {
    /// Events after the requested revision, then live ones.
    Replay(Vec<Arc<StoredEvent>>, broadcast::Receiver<Arc<StoredEvent>>),
    /// The requested revision is older than the retained history.
    Expired,
}

/// A serialisable copy of the whole state, used to restart a sim with the same state.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub rv: u64,
    pub objects: Vec<(String, String, String, Value)>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(8192);
        let (compactions, _) = tokio::sync::watch::channel(0);
        Store {
            compactions,
            inner: Mutex::new(Inner {
                rv: 1,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 1,
                feed: None,
            }),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, key: &ObjKey) -> Option<Arc<Value>> {
        self.lock().objects.get(key).cloned()
    }

    /// All objects of one resource, optionally in one namespace, and the revision they are at.
    pub fn list(&self, resource: &str, namespace: Option<&str>) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let items = Self::of(&inner, resource, namespace)
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv)
    }

    /// Read one object in place, without copying it.
    pub fn read<T>(&self, key: &ObjKey, f: impl FnOnce(&Value) -> T) -> Option<T> {
        self.lock().objects.get(key).map(|v| f(v))
    }

    /// How many objects of one resource (and namespace) match `pred`, without copying any.
    pub fn count(
        &self,
        resource: &str,
        namespace: Option<&str>,
        pred: impl Fn(&Value) -> bool,
    ) -> usize {
        let inner = self.lock();
        Self::of(&inner, resource, namespace)
            .filter(|(_, v)| pred(v))
            .count()
    }

    /// One page of a list: up to `limit` objects matching `keep`, after `after` (a continue
    /// token's last key), and whether more follow.
    pub fn list_page(
        &self,
        resource: &str,
        namespace: Option<&str>,
        after: Option<&ObjKey>,
        limit: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> (Vec<(ObjKey, Value)>, u64, bool) {
        let inner = self.lock();
        let mut matching = Self::of_from(&inner, resource, namespace, after)
            .filter(|(k, _)| after.is_none_or(|a| *k > a))
            .filter(|(_, v)| keep(v));
        let page: Vec<(ObjKey, Value)> = matching
            .by_ref()
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let more = matching.next().is_some();
        (page, inner.rv, more)
    }

    /// The objects of one resource (and namespace): a range of the ordered map, not a scan.
    fn of<'a>(
        inner: &'a Inner,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        Self::of_from(inner, resource, namespace, None)
    }

    /// [`Self::of`], starting at `start` (a page's last key) when given.
    fn of_from<'a>(
        inner: &'a Inner,
        resource: &'a str,
        namespace: Option<&'a str>,
        start: Option<&ObjKey>,
    ) -> impl Iterator<Item = (&'a ObjKey, &'a Value)> + 'a {
        let from = match start {
            Some(k) => k.clone(),
            None => ObjKey {
                resource: resource.to_string(),
                namespace: namespace.unwrap_or_default().to_string(),
                name: String::new(),
            },
        };
        inner
            .objects
            .range(from..)
            .map(|(k, v)| (k, v.as_ref()))
            .take_while(move |(k, _)| {
                k.resource == resource && namespace.is_none_or(|ns| k.namespace == ns)
            })
    }

    /// Every change from now on, in order, for the controller.
    pub fn feed(&self) -> std::sync::mpsc::Receiver<Arc<StoredEvent>> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.lock().feed = Some(tx);
        rx
    }

    /// Atomically read, change and write one object. `f` sees the current object (if any) and
    /// returns the new one, `None` to delete it, or an error to leave it unchanged. The store
    /// sets `metadata.resourceVersion` on what is written and returns it.
    pub fn mutate<F>(&self, key: &ObjKey, f: F) -> Result<Option<Value>, ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Option<Value>, ApiError>,
    {
        self.change(key, f, true)
    }

    /// [`Self::mutate`] for a request that may be a dry run: [`Commit::DryRun`] runs `f` on the
    /// current object just the same and returns what would be stored (an object keeps its
    /// resourceVersion, a new one has none; a deletion returns the object as it is), but stores
    /// nothing, takes no resourceVersion and sends no event.
    pub fn mutate_as<F>(
        &self,
        key: &ObjKey,
        commit: Commit,
        f: F,
    ) -> Result<Option<Value>, ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Option<Value>, ApiError>,
    {
        match commit {
            Commit::Store => self.change(key, f, true),
            Commit::DryRun => {
                let inner = self.lock();
                let current = inner.objects.get(key).map(|v| v.as_ref());
                Ok(f(current)?.or_else(|| current.cloned()))
            }
        }
    }

    /// [`Self::mutate`] for writers that do not need the result (the controllers): one copy of
    /// the object fewer per write.
    pub fn write<F>(&self, key: &ObjKey, f: F) -> Result<(), ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Option<Value>, ApiError>,
    {
        self.change(key, f, false).map(|_| ())
    }

    fn change<F>(&self, key: &ObjKey, f: F, want: bool) -> Result<Option<Value>, ApiError>
    where
        F: FnOnce(Option<&Value>) -> Result<Option<Value>, ApiError>,
    {
        let mut inner = self.lock();
        let current = inner.objects.get(key).map(|v| v.as_ref());
        let existed = current.is_some();
        let next = f(current)?;
        match next {
            Some(mut obj) => {
                if existed && inner.objects.get(key).map(|v| v.as_ref()) == Some(&obj) {
                    return Ok(want.then_some(obj));
                }
                inner.rv += 1;
                let rv = inner.rv;
                obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                let kind = if existed {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                let result = want.then(|| obj.clone());
                let obj = Arc::new(obj);
                inner.objects.insert(key.clone(), obj.clone());
                self.record(&mut inner, kind, key, obj);
                Ok(result)
            }
            None => {
                if let Some(old) = inner.objects.remove(key) {
                    inner.rv += 1;
                    let rv = inner.rv;
                    let mut old = Arc::unwrap_or_clone(old);
                    old["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                    let result = want.then(|| old.clone());
                    self.record(&mut inner, EventType::Deleted, key, Arc::new(old));
                    return Ok(result);
                }
                Ok(None)
            }
        }
    }

    fn record(&self, inner: &mut Inner, kind: EventType, key: &ObjKey, object: Arc<Value>) {
        let ev = Arc::new(StoredEvent {
            rv: inner.rv,
            kind,
            key: key.clone(),
            object,
        });
        inner.history.push_back(ev.clone());
        while inner.history.len() > HISTORY {
            if let Some(old) = inner.history.pop_front() {
                inner.compacted = old.rv;
            }
        }
        if let Some(feed) = &inner.feed {
            let _ = feed.send(ev.clone());
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(ev);
    }

    /// Start a watch after revision `from`.
    pub fn watch_from(&self, from: u64) -> WatchStart {
        let inner = self.lock();
        if from < inner.compacted {
            return WatchStart::Expired;
        }
        let rx = self.events.subscribe();
        let replay = inner
            .history
            .iter()
            .filter(|e| e.rv > from)
            .cloned()
            .collect();
        WatchStart::Replay(replay, rx)
    }

    /// A consistent snapshot of one resource plus a live receiver for what follows it.
    pub fn list_and_watch(
        &self,
        resource: &str,
        namespace: Option<&str>,
    ) -> (Vec<Value>, u64, broadcast::Receiver<Arc<StoredEvent>>) {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let items = Self::of(&inner, resource, namespace)
            .map(|(_, v)| v.clone())
            .collect();
        (items, inner.rv, rx)
    }

    /// Every change from now on, as it is committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StoredEvent>> {
        self.events.subscribe()
    }

    /// Forget all event history, as an etcd compaction does: every watch that resumes from an
    /// older revision gets 410 Expired and must list again.
    pub fn compact(&self) {
        let mut inner = self.lock();
        inner.history.clear();
        // The compaction takes a revision of its own, so even a watch that is fully up to date
        // must list again when it resumes.
        inner.rv += 1;
        inner.compacted = inner.rv;
        self.compactions.send_modify(|n| *n += 1);
    }

    /// Notified on every compaction.
    pub fn compactions(&self) -> tokio::sync::watch::Receiver<u64> {
        self.compactions.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.lock();
        Snapshot {
            rv: inner.rv,
            objects: inner
                .objects
                .iter()
                .map(|(k, v)| {
                    (
                        k.resource.clone(),
                        k.namespace.clone(),
                        k.name.clone(),
                        v.as_ref().clone(),
                    )
                })
                .collect(),
        }
    }

    pub fn restore(&self, snap: Snapshot) {
        let mut inner = self.lock();
        inner.rv = snap.rv;
        inner.compacted = snap.rv;
        inner.history.clear();
        inner.objects = snap
            .objects
            .into_iter()
            .map(|(resource, namespace, name, v)| {
                (
                    ObjKey {
                        resource,
                        namespace,
                        name,
                    },
                    Arc::new(v),
                )
            })
            .collect();
    }
}
