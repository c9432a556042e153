//! Stage 2, debouncing: per-path trailing-edge coalescing of file signals, with time passed in.
//!
//! A save that has visibly completed (close after write, rename into place) is due at once; a
//! file being written (data modified, not yet closed) is never due until it is closed, or until
//! the maximum wait passes for writers that never signal completion; anything else (create,
//! remove, unknown changes) is due after a quiet window with no further events. Hands "this
//! path may have changed" to the reader, which hashes the content and decides.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
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

/// What becomes of a read once its barrier came out (or never came).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No write to the file began since the close that triggered the read: judge it.
    Act,
    /// An event for the file came after it was read (the next save's `O_TRUNC`, a write, a
    /// close): the read may hold half of that save. Drop it; the event brought the path back
    /// through the debouncer, so the wait restarts (up to `--max-wait`).
    Stale,
    /// Read empty, and nothing came after: a file truncated for a rewrite is in progress.
    /// Wait for its writer as for a file still open (until it closes, or `--max-wait` after it
    /// was first read empty, when an empty file is an error).
    InProgress,
}

/// One read, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gated<T> {
    pub path: PathBuf,
    pub read: T,
    pub verdict: Verdict,
}

/// Reads wait for their writer. inotify reports one instance's events in order: once the
/// event of a marker created right after a read comes out, every event that happened before
/// the read has been seen. A read whose path had an event since it was read may hold half of
/// the next save (`O_TRUNC`, then a slow write): it is stale. A read that found the file
/// empty is a save in progress, not an empty file, until `--max-wait` has passed. Pure:
/// reads, barriers, events and time in, verdicts out.
#[derive(Debug)]
pub struct ReadGate<T> {
    max_wait: Duration,
    held: Vec<Held<T>>,
    /// Paths read empty, and when first: a file truncated for a rewrite.
    empty_since: HashMap<PathBuf, Instant>,
}

#[derive(Debug)]
struct Held<T> {
    barrier: u64,
    path: PathBuf,
    read: T,
    empty: bool,
    read_at: Instant,
    stale: bool,
}

impl<T> ReadGate<T> {
    pub fn new(max_wait: Duration) -> Self {
        ReadGate {
            max_wait,
            held: Vec::new(),
            empty_since: HashMap::new(),
        }
    }

    /// Hold `read` of `path` (made at `now`, `empty` when it found nothing) until barrier
    /// `barrier`, raised after the read, comes out.
    pub fn hold(&mut self, barrier: u64, path: PathBuf, read: T, empty: bool, now: Instant) {
        self.held.push(Held {
            barrier,
            path,
            read,
            empty,
            read_at: now,
            stale: false,
        });
    }

    /// A read for which no barrier could be raised: only the quiet window guarded it, so
    /// only its emptiness can hold it now.
    pub fn unguarded(&mut self, path: PathBuf, read: T, empty: bool, now: Instant) -> Gated<T> {
        let verdict = self.verdict(&path, false, empty, now);
        Gated {
            path,
            read,
            verdict,
        }
    }

    /// An event for `path` came out of the stream: a read of it still held is stale.
    pub fn saw(&mut self, path: &Path) {
        for h in self.held.iter_mut().filter(|h| h.path == path) {
            h.stale = true;
        }
    }

    /// Barrier `n` came out: every read held for it, or an earlier one, is decided.
    pub fn passed(&mut self, n: u64) -> Vec<Gated<T>> {
        self.release(|h| h.barrier <= n)
    }

    /// Reads whose barrier never came within [`BARRIER_WAIT`] (lost to an overflow, say):
    /// decided on the events seen so far.
    pub fn overdue(&mut self, now: Instant) -> Vec<Gated<T>> {
        self.release(|h| h.read_at + BARRIER_WAIT <= now)
    }

    /// When the earliest held read is overdue, if any is held.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.iter().map(|h| h.read_at + BARRIER_WAIT).min()
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
            .map(|h| Gated {
                verdict: self.verdict(&h.path, h.stale, h.empty, h.read_at),
                path: h.path,
                read: h.read,
            })
            .collect()
    }

    /// The rule: a write since the read makes it stale; an empty file is in progress until
    /// it has been read empty for `--max-wait`; anything else is acted on.
    fn verdict(&mut self, path: &Path, stale: bool, empty: bool, read_at: Instant) -> Verdict {
        let waited = match empty {
            true => {
                let since = *self
                    .empty_since
                    .entry(path.to_path_buf())
                    .or_insert(read_at);
                read_at.duration_since(since) >= self.max_wait
            }
            // Something was written: whatever emptied the file is over.
            false => {
                self.empty_since.remove(path);
                true
            }
        };
        match (stale, waited) {
            (true, _) => Verdict::Stale,
            (false, false) => Verdict::InProgress,
            (false, true) => {
                self.empty_since.remove(path);
                Verdict::Act
            }
        }
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

    /// One read of `/d/a.dep` ("14.37") held for barrier 1: (case, read empty, read at (after
    /// an earlier read at `t0` found the file empty, unless zero), paths whose events came out
    /// after the read, barrier that came out, overdue reads asked for this long after the
    /// read, verdict (none: still held)).
    type GateRow = (
        &'static str,
        bool,
        Duration,
        &'static [&'static str],
        Option<u64>,
        Duration,
        Option<Verdict>,
    );

    fn gate_row((name, empty, at, events, barrier, after, want): GateRow) {
        let t0 = Instant::now();
        let mut gate = ReadGate::new(MAX);
        if at > Duration::ZERO {
            let first = gate.unguarded(p("/d/a.dep"), "", true, t0);
            assert_eq!(first.verdict, Verdict::InProgress, "{name}");
        }
        gate.hold(1, p("/d/a.dep"), "14.37", empty, t0 + at);
        for e in events {
            gate.saw(&p(e));
        }
        let mut out = barrier.map(|n| gate.passed(n)).unwrap_or_default();
        out.extend(gate.overdue(t0 + at + after));
        let got: Vec<Verdict> = out.iter().map(|g| g.verdict).collect();
        assert_eq!(got, Vec::from_iter(want), "{name}");
        let same = |g: &Gated<&str>| g.path == p("/d/a.dep") && g.read == "14.37";
        assert!(out.iter().all(same), "{name}");
        let held = gate.holding().count();
        assert_eq!(held, usize::from(want.is_none()), "{name}");
    }

    const A: &[&str] = &["/d/a.dep"];
    const B: &[&str] = &["/d/b.dep"];
    const NO: &[&str] = &[];
    const SOON: Duration = Duration::from_millis(5);

    #[test]
    fn a_read_written_since_is_stale() {
        use Verdict::*;
        let z = Duration::ZERO;
        let table: [GateRow; 5] = [
            (
                "nothing happened to the file",
                false,
                z,
                NO,
                Some(1),
                SOON,
                Some(Act),
            ),
            (
                "the next save's O_TRUNC came",
                false,
                z,
                A,
                Some(1),
                SOON,
                Some(Stale),
            ),
            (
                "another file's event is nothing",
                false,
                z,
                B,
                Some(1),
                SOON,
                Some(Act),
            ),
            (
                "a later barrier passes this one",
                false,
                z,
                NO,
                Some(2),
                SOON,
                Some(Act),
            ),
            ("no barrier yet: held", false, z, NO, None, SOON, None),
        ];
        table.into_iter().for_each(gate_row);
    }

    #[test]
    fn a_lost_barrier_and_an_empty_read() {
        use Verdict::*;
        let (z, w) = (Duration::ZERO, BARRIER_WAIT);
        let just_before = MAX - Duration::from_millis(1);
        let table: [GateRow; 6] = [
            (
                "no barrier within its wait",
                false,
                z,
                NO,
                None,
                w,
                Some(Act),
            ),
            (
                "no barrier, written since",
                false,
                z,
                A,
                None,
                w,
                Some(Stale),
            ),
            ("read empty", true, z, NO, Some(1), SOON, Some(InProgress)),
            (
                "read empty, then written",
                true,
                z,
                A,
                Some(1),
                SOON,
                Some(Stale),
            ),
            (
                "empty, not yet --max-wait",
                true,
                just_before,
                NO,
                Some(1),
                SOON,
                Some(InProgress),
            ),
            (
                "empty for --max-wait: refused",
                true,
                MAX,
                NO,
                Some(1),
                SOON,
                Some(Act),
            ),
        ];
        table.into_iter().for_each(gate_row);
    }

    #[test]
    fn the_gate_holds_each_read_for_its_own_barrier() {
        let t0 = Instant::now();
        let mut gate = ReadGate::new(MAX);
        gate.hold(1, p("/d/a.dep"), 1, false, t0);
        gate.hold(2, p("/d/b.dep"), 2, false, t0);
        assert_eq!(gate.next_deadline(), Some(t0 + BARRIER_WAIT));
        let first = gate.passed(1);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].read, first[0].verdict), (1, Verdict::Act));
        assert_eq!(gate.holding().collect::<Vec<_>>(), vec![&p("/d/b.dep")]);
        gate.saw(&p("/d/b.dep"));
        let second = gate.passed(2);
        assert_eq!((second[0].read, second[0].verdict), (2, Verdict::Stale));
        assert_eq!(gate.next_deadline(), None);
    }

    #[test]
    fn a_whole_read_ends_the_empty_wait() {
        let t0 = Instant::now();
        let mut gate = ReadGate::new(MAX);
        let verdict = |g: Gated<&str>| g.verdict;
        // Truncated and read empty, then the writer's save: read whole, acted on.
        assert_eq!(
            verdict(gate.unguarded(p("/d/a.dep"), "", true, t0)),
            Verdict::InProgress
        );
        assert_eq!(
            verdict(gate.unguarded(p("/d/a.dep"), "1.2", false, t0 + QUIET)),
            Verdict::Act
        );
        // A read that found content, even one dropped as stale, ends the wait as well.
        assert_eq!(
            verdict(gate.unguarded(p("/d/c.dep"), "", true, t0)),
            Verdict::InProgress
        );
        gate.hold(1, p("/d/c.dep"), "14.3", false, t0 + QUIET);
        gate.saw(&p("/d/c.dep"));
        assert_eq!(gate.passed(1)[0].verdict, Verdict::Stale);
        assert_eq!(
            verdict(gate.unguarded(p("/d/c.dep"), "", true, t0 + MAX)),
            Verdict::InProgress
        );
        // The next rewrite's empty read, long after the first one, waits afresh.
        let later = t0 + MAX * 2;
        assert_eq!(
            verdict(gate.unguarded(p("/d/a.dep"), "", true, later)),
            Verdict::InProgress
        );
        // Each file waits on its own.
        assert_eq!(
            verdict(gate.unguarded(p("/d/b.dep"), "", true, later + MAX)),
            Verdict::InProgress
        );
        assert_eq!(
            verdict(gate.unguarded(p("/d/a.dep"), "", true, later + MAX)),
            Verdict::Act
        );
    }
}
