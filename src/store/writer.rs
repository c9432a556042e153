//! The record's writer, in the daemon: one thread of its own that alone carries out writes,
//! in the order they were kept. Callers only queue (a push under a lock held for no I/O) and
//! go on; a deploy that must know its intent is written before it patches waits for
//! [`super::Store::settled`], which returns at once while the record is away. The thread also
//! notices when the record goes away and comes back (a write or a check fails, a check
//! answers), so reads stop waiting on a record that does not answer.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// How often the writer checks the record while it is idle (an outage is noticed without a
/// write), and while it is away (its return is noticed without a write).
const IDLE_CHECK: Duration = Duration::from_secs(2);
const AWAY_RETRY: Duration = Duration::from_millis(500);

/// What callers share with the thread.
pub struct Writer {
    wake: Mutex<Wake>,
    cv: Condvar,
    /// Moves after every round of writing or checking: [`super::Store::settled`] waits on it.
    pub progress: tokio::sync::watch::Sender<u64>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct Wake {
    pending: bool,
    stop: bool,
}

impl Writer {
    /// Start the thread; `round` carries out what waits (and checks the record when nothing
    /// does), returning whether the record answered. The last round runs when stopped.
    pub fn start(round: impl Fn(bool) -> bool + Send + 'static) -> std::io::Result<Arc<Writer>> {
        let writer = Arc::new(Writer {
            wake: Mutex::new(Wake::default()),
            cv: Condvar::new(),
            progress: tokio::sync::watch::channel(0).0,
            thread: Mutex::new(None),
        });
        let shared = writer.clone();
        let thread = std::thread::Builder::new()
            .name("depwatch-record".into())
            .spawn(move || shared.run(round))?;
        *writer.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(thread);
        Ok(writer)
    }

    fn run(&self, round: impl Fn(bool) -> bool) {
        let mut answering = true;
        loop {
            let (woken, stop) = {
                let wait = if answering { IDLE_CHECK } else { AWAY_RETRY };
                let guard = self.wake.lock().unwrap_or_else(|e| e.into_inner());
                let (mut w, _) = self
                    .cv
                    .wait_timeout_while(guard, wait, |w| !w.pending && !w.stop)
                    .unwrap_or_else(|e| e.into_inner());
                (std::mem::take(&mut w.pending), w.stop)
            };
            // Woken by a write: carry it out. Timed out: check the record (or retry).
            answering = round(!woken);
            self.progress.send_modify(|n| *n += 1);
            if stop {
                return;
            }
        }
    }

    /// Something was queued.
    pub fn wake(&self) {
        self.wake.lock().unwrap_or_else(|e| e.into_inner()).pending = true;
        self.cv.notify_one();
    }

    /// Carry out what waits one last time, then end the thread.
    pub fn stop(&self) {
        self.wake.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.cv.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}
