//! The record's writer, in the daemon: one task of its own that alone carries out writes, in
//! the order they were kept. Callers only queue (a push under a lock held for no I/O) and go
//! on; a deploy that must know its intent is written before it patches waits for
//! [`super::Store::settled`], which returns at once while the record is away. The task also
//! notices when the record goes away and comes back (a write or a check fails, a check
//! answers), so reads stop waiting on a record that does not answer.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// How often the writer checks the record while it is idle (an outage is noticed without a
/// write), and while it is away (its return is noticed without a write).
const IDLE_CHECK: Duration = Duration::from_secs(2);
const AWAY_RETRY: Duration = Duration::from_millis(500);

/// What callers share with the task.
pub struct Writer {
    /// Something was queued (a permit is kept when the task is busy: no wake is lost).
    wake: Notify,
    stop: tokio_util::sync::CancellationToken,
    /// Moves after every round of writing or checking: [`super::Store::settled`] waits on it.
    pub progress: tokio::sync::watch::Sender<u64>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Writer {
    /// Start the task on the current runtime; `round` carries out what waits (and checks the
    /// record when nothing does), returning whether the record answered. The last round runs
    /// when stopped.
    pub fn start<F, Fut>(round: F) -> Arc<Writer>
    where
        F: Fn(bool) -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send,
    {
        let writer = Arc::new(Writer {
            wake: Notify::new(),
            stop: tokio_util::sync::CancellationToken::new(),
            progress: tokio::sync::watch::channel(0).0,
            task: Mutex::new(None),
        });
        let shared = writer.clone();
        let task = tokio::spawn(async move { shared.run(round).await });
        *writer.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        writer
    }

    async fn run<F, Fut>(&self, round: F)
    where
        F: Fn(bool) -> Fut,
        Fut: Future<Output = bool>,
    {
        let mut answering = true;
        loop {
            let wait = if answering { IDLE_CHECK } else { AWAY_RETRY };
            // Woken by a write: carry it out. Timed out: check the record (or retry).
            let (woken, stop) = tokio::select! {
                _ = self.wake.notified() => (true, false),
                _ = self.stop.cancelled() => (true, true),
                _ = tokio::time::sleep(wait) => (false, false),
            };
            answering = round(!woken).await;
            self.progress.send_modify(|n| *n += 1);
            if stop {
                return;
            }
        }
    }

    /// Something was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Carry out what waits one last time, then end the task.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = task {
            // A task that panicked has nothing left to write; the caller says what waits.
            let _ = t.await;
        }
    }
}
