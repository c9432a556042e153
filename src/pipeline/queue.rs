//! Stage 4, scheduling: the desired-state table, at most one queued and one running deploy per
//! service, a bounded queue, and a worker pool that bounds concurrent API writes.
//!
//! Each service has a slot: its latest desired state, a generation counter that moves on every
//! change (an in-flight rollout wait watches it and is abandoned as *superseded*), an async lock
//! that serialises its deploys, and a queued flag so a burst of changes is one queue entry
//! (latest wins). What a deploy does is [`crate::pipeline::deploy::attempt`]'s business; a worker permit is
//! held only while talking to the API, so a hundred slow rollouts never stall the
//! hundred-and-first service.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use crate::domain::Desired;
use crate::domain::ServiceKey;
use crate::pipeline::deploy::attempt::Engine;

struct Slot {
    desired: Mutex<Option<Desired>>,
    generation: watch::Sender<u64>,
    running: tokio::sync::Mutex<()>,
    queued: AtomicBool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            desired: Mutex::new(None),
            generation: watch::channel(0).0,
            running: tokio::sync::Mutex::new(()),
            queued: AtomicBool::new(false),
        }
    }
    fn desired(&self) -> Option<Desired> {
        self.desired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Gauges read by metrics and status.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    /// Deploys finished since start (work done between two looks counts as work).
    pub finished: AtomicUsize,
}

/// The shared scheduling state. Cheap to clone.
#[derive(Clone)]
pub struct Scheduler {
    slots: Arc<DashMap<ServiceKey, Arc<Slot>>>,
    tx: mpsc::Sender<ServiceKey>,
    pub stats: Arc<QueueStats>,
}

impl Scheduler {
    pub fn new(capacity: usize) -> (Scheduler, mpsc::Receiver<ServiceKey>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Scheduler {
                slots: Arc::default(),
                tx,
                stats: Arc::default(),
            },
            rx,
        )
    }

    fn slot(&self, key: &ServiceKey) -> Arc<Slot> {
        // Clone the Arc out so no map guard is held across an await.
        self.slots
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Slot::new()))
            .clone()
    }

    /// Services in the bounded queue, waiting for the dispatcher.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Record a new desired state and queue the service unless it is queued already.
    pub async fn submit(&self, key: ServiceKey, desired: Desired) {
        let slot = self.slot(&key);
        {
            let mut d = slot.desired.lock().unwrap_or_else(|e| e.into_inner());
            *d = Some(desired);
        }
        slot.generation.send_modify(|g| *g += 1);
        if !slot.queued.swap(true, Ordering::SeqCst) {
            self.stats.queued.fetch_add(1, Ordering::Relaxed);
            // Waits when the queue is full: back-pressure on the reader, never a lost change,
            // because the table above already holds the latest state.
            if self.tx.send(key).await.is_err() {
                tracing::debug!("scheduler stopped; change kept in the table");
            }
        }
    }

    /// Know a service's desired state without deploying it (it already runs).
    pub fn remember(&self, key: ServiceKey, desired: Desired) {
        let slot = self.slot(&key);
        *slot.desired.lock().unwrap_or_else(|e| e.into_inner()) = Some(desired);
    }

    /// The file is gone: stop managing the service (nothing in the cluster is deleted). A
    /// rollout under way is not abandoned: depwatch started it, so it is judged (and rolled
    /// back if it fails) before the service is let go.
    pub fn forget(&self, key: &ServiceKey) {
        if let Some(slot) = self.slots.get(key).map(|s| s.clone()) {
            *slot.desired.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// A deploy of exactly this content is queued or running: a rescan must not supersede it
    /// (it may be retrying through an API outage).
    pub fn busy_with(&self, key: &ServiceKey, hash: &str) -> bool {
        let Some(slot) = self.slots.get(key).map(|s| s.clone()) else {
            return false;
        };
        let same = slot.desired().is_some_and(|d| d.hash == hash);
        same && (slot.queued.load(Ordering::SeqCst) || slot.running.try_lock().is_err())
    }

    /// The desired state of a service, if managed.
    pub fn wanted(&self, key: &ServiceKey) -> Option<Desired> {
        self.slots.get(key).and_then(|s| s.desired())
    }
}

/// Take queued services and deploy each in its own task until cancelled; in-flight work is
/// tracked by `tracker` so shutdown can drain it.
pub async fn run(
    engine: Engine,
    scheduler: Scheduler,
    mut rx: mpsc::Receiver<ServiceKey>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    lost: CancellationToken,
) {
    loop {
        let key = tokio::select! {
            _ = cancel.cancelled() => return,
            k = rx.recv() => match k { Some(k) => k, None => return },
        };
        let slot = scheduler.slot(&key);
        let engine = engine.clone();
        let stats = scheduler.stats.clone();
        let span = tracing::info_span!("deploy", service = %key);
        let cancel = cancel.clone();
        let lost = lost.clone();
        tracker.spawn(
            async move {
                let _running = slot.running.lock().await;
                slot.queued.store(false, Ordering::SeqCst);
                stats.queued.fetch_sub(1, Ordering::Relaxed);
                let _counted = Running::new(&stats);
                // Subscribe before reading the desired state: a change that lands in between
                // must count as superseding this deploy.
                let mut superseded = slot.generation.subscribe();
                superseded.borrow_and_update();
                let Some(desired) = slot.desired() else {
                    return;
                };
                if cancel.is_cancelled() {
                    return;
                }
                // A lost Lease stops the deploy where it stands: not one more write.
                tokio::select! {
                    _ = engine.deploy_and_compare(&key, &desired, superseded) => {
                        // The file went away during the deploy: let the service go now.
                        if slot.desired().is_none() {
                            engine.let_go(&key).await;
                        }
                    }
                    _ = lost.cancelled() => {
                        tracing::warn!("deploy stopped: the Lease is lost; the new leader finishes it");
                    }
                }
            }
            .instrument(span),
        );
    }
}

/// Counts a running deploy for as long as it lives.
struct Running<'a>(&'a QueueStats);

impl<'a> Running<'a> {
    fn new(stats: &'a QueueStats) -> Self {
        stats.running.fetch_add(1, Ordering::Relaxed);
        Running(stats)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
        self.0.finished.fetch_add(1, Ordering::Relaxed);
    }
}
