//! Stage 2, debouncing: per-path trailing-edge coalescing of file signals, with time passed in.
//!
//! A save that has visibly completed (close after write, rename into place) is due at once; a
//! file being written (data modified, not yet closed) is never due until it is closed, or until
//! the maximum wait passes for writers that never signal completion; anything else (create,
//! remove, unknown changes) is due after a quiet window with no further events. Hands "this
//! path may have changed" to the reader, which hashes the content and decides.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// What a file event says about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A save finished: closed after writing, or renamed into place.
    Completed,
    /// Data was written and the file is still open.
    Writing,
    /// Something else happened (created, removed, attributes, unknown).
    Touched,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    first: Instant,
    last: Instant,
    writing: bool,
    completed: bool,
}

/// The pure coalescing core.
#[derive(Debug)]
pub struct Debouncer {
    quiet: Duration,
    max_wait: Duration,
    pending: HashMap<PathBuf, Entry>,
}

impl Debouncer {
    pub fn new(quiet: Duration, max_wait: Duration) -> Self {
        Debouncer {
            quiet,
            max_wait: max_wait.max(quiet),
            pending: HashMap::new(),
        }
    }

    pub fn add(&mut self, path: PathBuf, signal: Signal, now: Instant) {
        let e = self.pending.entry(path).or_insert(Entry {
            first: now,
            last: now,
            writing: false,
            completed: false,
        });
        e.last = now;
        match signal {
            Signal::Completed => {
                e.completed = true;
                e.writing = false;
            }
            Signal::Writing => {
                e.writing = true;
                e.completed = false;
            }
            Signal::Touched => {}
        }
    }

    fn due_at(&self, e: &Entry) -> Instant {
        let cap = e.first + self.max_wait;
        if e.completed {
            e.last
        } else if e.writing {
            cap
        } else {
            (e.last + self.quiet).min(cap)
        }
    }

    /// Paths whose time has come, removed from the pending set.
    pub fn take_due(&mut self, now: Instant) -> Vec<PathBuf> {
        let due: Vec<PathBuf> = self
            .pending
            .iter()
            .filter(|(_, e)| self.due_at(e) <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in &due {
            self.pending.remove(p);
        }
        due
    }

    /// When the next path becomes due, if any is pending.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|e| self.due_at(e)).min()
    }

    /// Paths still open for writing: not to be read by anyone yet.
    pub fn writing(&self) -> std::collections::HashSet<PathBuf> {
        self.pending
            .iter()
            .filter(|(_, e)| e.writing)
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// How long a read waits for its barrier before it is judged anyway (the barrier's event lost
/// to an overflow, say): the quiet window is then all that guarded it.
pub const BARRIER_WAIT: Duration = Duration::from_secs(1);

/// What became of a read held at the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gated<T> {
    /// No event for its path came between the read and the barrier: judge it.
    Act(PathBuf, T),
    /// An event for its path came after it was read (the next save began): drop it; that
    /// event brings the path back through the debouncer, to be read once the writer is done.
    Stale(PathBuf),
}

/// Reads wait for their writer. inotify reports one instance's events in order: once the
/// event of a marker created right after a read comes out, every event that happened before
/// the read has been seen. A read whose path had an event since it was read may hold half of
/// the next save (`O_TRUNC`, then a slow write): it is stale. Pure: barriers, events and time
/// in, verdicts out.
#[derive(Debug)]
pub struct ReadGate<T> {
    held: Vec<Held<T>>,
}

#[derive(Debug)]
struct Held<T> {
    barrier: u64,
    path: PathBuf,
    read: T,
    stale: bool,
    until: Instant,
}

impl<T> Default for ReadGate<T> {
    fn default() -> Self {
        ReadGate { held: Vec::new() }
    }
}

impl<T> ReadGate<T> {
    /// Hold `read` of `path` until barrier `barrier` (raised after the read) comes out.
    pub fn hold(&mut self, barrier: u64, path: PathBuf, read: T, now: Instant) {
        self.held.push(Held {
            barrier,
            path,
            read,
            stale: false,
            until: now + BARRIER_WAIT,
        });
    }

    /// An event for `path` came out of the stream: a read of it still held is stale.
    pub fn saw(&mut self, path: &std::path::Path) {
        for h in self.held.iter_mut().filter(|h| h.path == path) {
            h.stale = true;
        }
    }

    /// Barrier `n` came out: every read held for it, or an earlier one, is decided.
    pub fn passed(&mut self, n: u64) -> Vec<Gated<T>> {
        self.release(|h| h.barrier <= n)
    }

    /// Reads whose barrier never came within [`BARRIER_WAIT`].
    pub fn overdue(&mut self, now: Instant) -> Vec<Gated<T>> {
        self.release(|h| h.until <= now)
    }

    /// When the earliest held read is overdue, if any is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.until).min()
    }

    /// Paths held at the gate: not to be read by a rescan meanwhile.
    pub fn holding(&self) -> impl Iterator<Item = &PathBuf> {
        self.held.iter().map(|h| &h.path)
    }

    fn release(&mut self, done: impl Fn(&Held<T>) -> bool) -> Vec<Gated<T>> {
        let (out, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| done(h));
        self.held = keep;
        out.into_iter()
            .map(|h| match h.stale {
                true => Gated::Stale(h.path),
                false => Gated::Act(h.path, h.read),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUIET: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    /// Table-driven: a sequence of (offset ms, path, signal), then which paths are due at which
    /// offsets.
    #[test]
    fn coalescing_cases() {
        type Case = (
            &'static str,
            Vec<(u64, &'static str, Signal)>,
            Vec<(u64, Vec<&'static str>)>,
        );
        let cases: Vec<Case> = vec![
            (
                "a completed save is due at once",
                vec![(0, "a", Signal::Completed)],
                vec![(0, vec!["a"])],
            ),
            (
                "truncate-then-write: writes, then close",
                vec![
                    (0, "a", Signal::Writing),
                    (10, "a", Signal::Writing),
                    (20, "a", Signal::Completed),
                ],
                vec![(15, vec![]), (20, vec!["a"])],
            ),
            (
                "a writer pausing longer than the quiet window is not read mid-write",
                vec![(0, "a", Signal::Writing), (1000, "a", Signal::Writing)],
                vec![(500, vec![]), (1500, vec![]), (4999, vec![])],
            ),
            (
                "a writer that never closes is read at the maximum wait",
                vec![(0, "a", Signal::Writing)],
                vec![(4999, vec![]), (5000, vec!["a"])],
            ),
            (
                "a create or remove waits for the quiet window, trailing edge",
                vec![(0, "a", Signal::Touched), (50, "a", Signal::Touched)],
                vec![(100, vec![]), (150, vec!["a"])],
            ),
            (
                "a burst ending in a rename onto the path is one read",
                vec![
                    (0, "a", Signal::Touched),
                    (1, "a", Signal::Writing),
                    (2, "a", Signal::Completed),
                ],
                vec![(2, vec!["a"]), (500, vec![])],
            ),
            (
                "paths are independent",
                vec![(0, "a", Signal::Writing), (0, "b", Signal::Completed)],
                vec![(0, vec!["b"]), (5000, vec!["a"])],
            ),
            (
                "writing again after a completion waits for the next close",
                vec![(0, "a", Signal::Completed), (1, "a", Signal::Writing)],
                vec![(1, vec![]), (3000, vec![]), (3001, vec![])],
            ),
            (
                "endless touches are capped by the maximum wait",
                (0..100).map(|i| (i * 60, "a", Signal::Touched)).collect(),
                vec![(4999, vec![]), (5000, vec!["a"])],
            ),
        ];
        for (name, events, checks) in cases {
            let start = Instant::now();
            let mut d = Debouncer::new(QUIET, MAX);
            let mut events = events.into_iter().peekable();
            for (at, want) in checks {
                while let Some((t, _, _)) = events.peek() {
                    if *t > at {
                        break;
                    }
                    let (t, path, sig) = events.next().expect("peeked");
                    d.add(p(path), sig, start + Duration::from_millis(t));
                }
                let mut got: Vec<String> = d
                    .take_due(start + Duration::from_millis(at))
                    .into_iter()
                    .map(|p| p.display().to_string())
                    .collect();
                got.sort();
                assert_eq!(got, want, "{name} at {at}ms");
            }
        }
    }

    #[test]
    fn next_deadline_points_at_the_earliest_path() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(QUIET, MAX);
        assert_eq!(d.next_deadline(), None);
        d.add(p("a"), Signal::Writing, t0);
        d.add(p("b"), Signal::Touched, t0);
        assert_eq!(d.next_deadline(), Some(t0 + QUIET));
        assert_eq!(d.writing().into_iter().collect::<Vec<_>>(), vec![p("a")]);
        assert_eq!(d.take_due(t0 + QUIET), vec![p("b")]);
        assert_eq!(d.next_deadline(), Some(t0 + MAX));
    }

    #[test]
    fn read_gate_cases() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // (events for the path after the read, barrier that came out, at, verdict)
        type Case<'a> = (&'a [&'a str], Option<u64>, Duration, Option<bool>);
        let table: [Case; 6] = [
            // The barrier came and nothing happened to the file: act.
            (&[], Some(1), ms(5), Some(true)),
            // The next save began (O_TRUNC, a write) before the barrier: stale.
            (&["/d/a.dep"], Some(1), ms(5), Some(false)),
            // Another file's event does not stale this read.
            (&["/d/b.dep"], Some(1), ms(5), Some(true)),
            // A later barrier passes earlier ones too.
            (&[], Some(2), ms(5), Some(true)),
            // No barrier yet: still held.
            (&[], None, ms(5), None),
            // The barrier never came: judged anyway after BARRIER_WAIT.
            (&[], None, BARRIER_WAIT, Some(true)),
        ];
        for (i, (events, barrier, at, want)) in table.into_iter().enumerate() {
            let mut gate = ReadGate::default();
            gate.hold(1, p("/d/a.dep"), "14.37", t0);
            for e in events {
                gate.saw(&p(e));
            }
            let mut out = barrier.map(|n| gate.passed(n)).unwrap_or_default();
            out.extend(gate.overdue(t0 + at));
            let got = out.first().map(|g| matches!(g, Gated::Act(_, "14.37")));
            assert_eq!(got, want, "case {i}: {out:?}");
            assert_eq!(out.len(), usize::from(want.is_some()), "case {i}");
        }
    }

    #[test]
    fn the_gate_holds_each_read_for_its_own_barrier() {
        let t0 = Instant::now();
        let mut gate = ReadGate::default();
        gate.hold(1, p("/d/a.dep"), 1, t0);
        gate.hold(2, p("/d/b.dep"), 2, t0);
        assert_eq!(gate.next_deadline(), Some(t0 + BARRIER_WAIT));
        assert_eq!(gate.passed(1), vec![Gated::Act(p("/d/a.dep"), 1)]);
        assert_eq!(gate.holding().count(), 1);
        gate.saw(&p("/d/b.dep"));
        assert_eq!(gate.passed(2), vec![Gated::Stale(p("/d/b.dep"))]);
        assert_eq!(gate.next_deadline(), None);
    }
}
