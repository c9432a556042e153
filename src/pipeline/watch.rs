//! Stage 1, watching: notify events on the dependency directory become [`FileEvent`]s.
//!
//! The directory is watched recursively (never single files: a rename-save replaces the inode).
//! The watcher never blocks and never drops an event: when its bounded channel is full it
//! raises an overflow flag, and the consumer turns that into a full rescan, as it does for
//! inotify's own overflow (`Rescan`). Reads (`Access(Open)`, close after reading) are ignored, so
//! the daemon's own reads never cause work. A rename of a symlink or directory (ConfigMap
//! `..data`, git-sync worktree swaps) means every file behind it may have changed: rescan.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::depfile;
use crate::pipeline::debounce::Signal;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    Path(PathBuf, Signal),
    /// Anything may have changed: compare the whole directory.
    Rescan,
    /// A directory (or a link) appeared: compare the whole directory now and once more a
    /// moment later. notify hands over a new directory's event before it watches the
    /// directory, so a file written into it in between has no event of its own.
    NewFolder,
    /// The dependency directory itself was deleted, created, replaced or (a symlink) swapped:
    /// watch it again, then rescan.
    Root,
    /// Read barrier `n` came out of the stream: every event before it has been seen.
    Barrier(u64),
}

/// A barrier marker's name: `barrier-<n>`.
const BARRIER: &str = "barrier-";

/// Barrier markers' creations, as events; anything else in the barrier directory is nothing.
fn barrier_events(event: &notify::Event) -> Vec<FileEvent> {
    if !matches!(event.kind, EventKind::Create(_)) {
        return Vec::new();
    }
    event
        .paths
        .iter()
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix(BARRIER)?.parse().ok())
        .map(FileEvent::Barrier)
        .collect()
}

/// Raises read barriers: a marker created (and removed at once) in a private directory that
/// the dependency directory's own inotify instance watches, so its event comes out after
/// every event that happened before it.
#[derive(Debug)]
pub struct Barriers {
    dir: Option<PathBuf>,
    next: u64,
}

impl Barriers {
    /// Barriers in `dir` (created, private); without one, reads fall back to the quiet window.
    pub fn new(dir: PathBuf) -> Barriers {
        use std::os::unix::fs::DirBuilderExt;
        let made = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir);
        match made {
            Ok(()) => Barriers {
                dir: Some(dir),
                next: 0,
            },
            Err(e) => {
                tracing::warn!(dir = %crate::safefs::shown(&dir), error = %e, "cannot make the read-barrier directory; a read waits only for the quiet window");
                Barriers::none()
            }
        }
    }

    pub fn none() -> Barriers {
        Barriers { dir: None, next: 0 }
    }

    /// Where markers go, for the watch.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Raise the next barrier; `None` when none can be (the caller judges at once).
    pub fn raise(&mut self) -> Option<u64> {
        let dir = self.dir.as_ref()?;
        self.next += 1;
        let marker = dir.join(format!("{BARRIER}{}", self.next));
        match std::fs::File::create(&marker) {
            Ok(_) => {
                let _ = std::fs::remove_file(&marker);
                Some(self.next)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot raise a read barrier");
                None
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot watch dependency directory {dir}: {source}")]
    Watch { dir: PathBuf, source: notify::Error },
}

/// A running directory watch; dropping it stops watching.
pub struct DirWatch {
    _watcher: RecommendedWatcher,
}

/// Whether `path` lies inside a dot directory under `root` (ConfigMap's timestamped
/// `..2026_…` directories, git-sync's `.worktrees`): those are reached through their links.
fn in_dot_dir(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let mut parts: Vec<_> = rel.components().collect();
    parts.pop();
    parts
        .iter()
        .any(|c| c.as_os_str().to_string_lossy().starts_with('.'))
}

/// A path that may be a dependency file: a name not ignored, in no dot directory.
fn relevant(root: &Path, p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| !depfile::is_ignored_name(n))
        && !in_dot_dir(root, p)
}

fn link_or_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.file_type().is_symlink() || m.is_dir())
        .unwrap_or(false)
}

/// A rename: the name it left is read again (gone, or replaced), the name it took is
/// complete. A renamed symlink or directory (`..data`, a git-sync worktree) may change
/// every file behind it: a rescan.
fn renamed(event: &notify::Event, mode: RenameMode, root: &Path) -> Vec<FileEvent> {
    let to = match mode {
        RenameMode::Both => event.paths.get(1),
        RenameMode::To | RenameMode::Any | RenameMode::Other => event.paths.first(),
        RenameMode::From => None,
    };
    if to.is_some_and(|p| link_or_dir(p)) {
        return vec![FileEvent::Rescan];
    }
    let mut out = Vec::new();
    if let (RenameMode::Both, Some(from)) = (mode, event.paths.first()) {
        if relevant(root, from) {
            out.push(FileEvent::Path(from.clone(), Signal::Touched));
        }
    }
    match mode {
        RenameMode::From => out.extend(
            event
                .paths
                .iter()
                .filter(|p| relevant(root, p))
                .map(|p| FileEvent::Path(p.clone(), Signal::Touched)),
        ),
        _ => {
            if let Some(to) = to.filter(|p| relevant(root, p)) {
                out.push(FileEvent::Path(to.clone(), Signal::Completed));
            }
        }
    }
    out
}

/// Map one notify event under `root` to what it means for dependency files.
pub fn classify(event: &notify::Event, root: &Path) -> Vec<FileEvent> {
    if event.need_rescan() {
        return vec![FileEvent::Rescan];
    }
    // The root itself, or a directory above it, changed.
    if event.paths.iter().any(|p| root.starts_with(p)) {
        return vec![FileEvent::Root];
    }
    let relevant = |p: &Path| relevant(root, p);
    let signal = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Signal::Completed,
        // Our own reads, and anyone else's.
        EventKind::Access(_) => return Vec::new(),
        EventKind::Modify(ModifyKind::Name(mode)) => return renamed(event, mode, root),
        EventKind::Modify(ModifyKind::Data(_)) => Signal::Writing,
        // Attribute changes (chmod, chown, touch's timestamps) change no content, but may make
        // an unreadable file readable (or the reverse): read it again; the hash judges.
        EventKind::Modify(ModifyKind::Metadata(_)) => Signal::Touched,
        EventKind::Create(CreateKind::Folder) => return vec![FileEvent::NewFolder],
        EventKind::Create(_) => {
            if event.paths.iter().any(|p| link_or_dir(p)) {
                return vec![FileEvent::NewFolder];
            }
            Signal::Touched
        }
        _ => Signal::Touched,
    };
    event
        .paths
        .iter()
        .filter(|p| relevant(p))
        .map(|p| FileEvent::Path(p.clone(), signal))
        .collect()
}

/// Start watching `dir` recursively. Events go to `tx`; if it is full, `overflow` is raised and
/// the event is dropped in favour of a rescan the consumer must perform. Symlinked directories
/// are not descended (a link to `/` must not put the whole file system under watch); the files
/// behind ConfigMap and git-sync links are watched in their real, in-root directories.
pub fn watch_dir(
    dir: &Path,
    tx: mpsc::Sender<FileEvent>,
    overflow: Arc<AtomicBool>,
    barriers: Option<&Path>,
) -> Result<DirWatch, WatchError> {
    let root = dir.to_path_buf();
    let barrier_dir = barriers.map(Path::to_path_buf);
    // A root that is itself a symlink (git-sync) is watched where it leads now; events are
    // reported under the root's own spelling, as the scanner names the files.
    let real = std::fs::canonicalize(dir).map_err(|e| WatchError::Watch {
        dir: dir.to_path_buf(),
        source: notify::Error::io(e),
    })?;
    let from = real.clone();
    let watcher = watcher(tx, overflow, move |ev| {
        if let (Some(b), Some(p)) = (&barrier_dir, ev.paths.first()) {
            if p.parent() == Some(b.as_path()) {
                return barrier_events(ev);
            }
        }
        if from == root {
            return classify(ev, &root);
        }
        let mut ev = ev.clone();
        for p in ev.paths.iter_mut() {
            if let Ok(rel) = p.strip_prefix(&from) {
                *p = root.join(rel);
            }
        }
        classify(&ev, &root)
    })
    .map_err(|source| WatchError::Watch {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut watcher = watcher;
    watcher
        .watch(&real, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Watch {
            dir: dir.to_path_buf(),
            source,
        })?;
    if let Some(b) = barriers {
        // In the same inotify instance as the directory: that is what orders them.
        if let Err(e) = watcher.watch(b, RecursiveMode::NonRecursive) {
            tracing::warn!(error = %e, "cannot watch the read-barrier directory; a read waits only for the quiet window");
        }
    }
    Ok(DirWatch { _watcher: watcher })
}

/// A notify watcher that never follows symlinks and forwards `map`ped events without blocking.
fn watcher(
    tx: mpsc::Sender<FileEvent>,
    overflow: Arc<AtomicBool>,
    map: impl Fn(&notify::Event) -> Vec<FileEvent> + Send + 'static,
) -> notify::Result<RecommendedWatcher> {
    let handler = move |res: notify::Result<notify::Event>| {
        let events = match res {
            Ok(ev) => map(&ev),
            Err(e) => {
                tracing::warn!(error = %e, "file watch error; rescanning");
                vec![FileEvent::Rescan]
            }
        };
        for ev in events {
            if tx.try_send(ev).is_err() {
                overflow.store(true, Ordering::SeqCst);
                // Make sure the consumer wakes up to notice the flag even if it was idle.
                let _ = tx.try_send(FileEvent::Rescan);
            }
        }
    };
    RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )
}

/// Identity of what a path resolves to (device and inode), following symlinks.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.is_dir())
        .map(|m| (m.dev(), m.ino()))
}

/// What [`RootWatch::refresh`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootState {
    /// The same directory as before, watched.
    Same,
    /// A new directory is at the root's path (recreated, replaced, a swapped symlink); it is
    /// watched now and must be rescanned.
    Rewatched,
    /// Nothing (or no directory) is at the root's path.
    Missing,
}

/// The dependency root's watch, kept pointing at whatever directory is at the root's path:
/// a non-recursive watch on the parent notices the root being deleted, recreated, renamed or
/// swapped (git-sync's root symlink), and [`Self::refresh`] then re-watches it.
pub struct RootWatch {
    root: PathBuf,
    tx: mpsc::Sender<FileEvent>,
    overflow: Arc<AtomicBool>,
    barriers: Option<PathBuf>,
    dir: Option<DirWatch>,
    watched: Option<(u64, u64)>,
    _parent: Option<RecommendedWatcher>,
    /// Why the root is not usable, for `/readyz`; `None` when it is watched.
    pub problem: Arc<std::sync::Mutex<Option<String>>>,
}

impl RootWatch {
    pub fn start(
        root: &Path,
        tx: mpsc::Sender<FileEvent>,
        overflow: Arc<AtomicBool>,
        barriers: Option<&Path>,
    ) -> Result<RootWatch, WatchError> {
        let parent = match root.parent() {
            Some(parent) => {
                let r = root.to_path_buf();
                let mut w = watcher(tx.clone(), overflow.clone(), move |ev| {
                    // Only the root's own entry matters here: the parent may be busy with
                    // other files (logs, state) that must cost nothing.
                    if ev.need_rescan() || ev.paths.contains(&r) {
                        vec![FileEvent::Root]
                    } else {
                        Vec::new()
                    }
                })
                .map_err(|source| WatchError::Watch {
                    dir: parent.to_path_buf(),
                    source,
                })?;
                // Without it the periodic refresh still notices, only later.
                if let Err(e) = w.watch(parent, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %crate::safefs::shown(parent), error = %e, "cannot watch the dependency directory's parent; a replaced directory is noticed at the next check");
                }
                Some(w)
            }
            None => None,
        };
        let watched = identity(root);
        let dir = Some(watch_dir(root, tx.clone(), overflow.clone(), barriers)?);
        Ok(RootWatch {
            root: root.to_path_buf(),
            tx,
            overflow,
            barriers: barriers.map(Path::to_path_buf),
            dir,
            watched,
            _parent: parent,
            problem: Arc::default(),
        })
    }

    fn set_problem(&self, problem: Option<String>) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// Check what is at the root's path now, and watch it again if it changed.
    pub fn refresh(&mut self) -> RootState {
        let now = identity(&self.root);
        if now.is_some() && now == self.watched && self.dir.is_some() {
            return RootState::Same;
        }
        let Some(id) = now else {
            if self.dir.take().is_some() || self.watched.take().is_some() {
                tracing::error!(dir = %crate::safefs::shown(&self.root), "the dependency directory is missing; nothing is deployed or forgotten until it is back");
            }
            self.set_problem(Some(format!(
                "the dependency directory {} is missing (deleted, or a symlink to nowhere)",
                crate::safefs::shown(&self.root)
            )));
            return RootState::Missing;
        };
        // Drop the old watch first: its inotify watches belong to the old directory.
        self.dir = None;
        let barriers = self.barriers.as_deref();
        match watch_dir(&self.root, self.tx.clone(), self.overflow.clone(), barriers) {
            Ok(w) => {
                self.dir = Some(w);
                self.watched = Some(id);
                self.set_problem(None);
                tracing::info!(dir = %crate::safefs::shown(&self.root), "the dependency directory was replaced; watching it again and rescanning");
                RootState::Rewatched
            }
            Err(e) => {
                self.set_problem(Some(e.to_string()));
                tracing::error!(error = %e, "cannot watch the dependency directory again");
                RootState::Missing
            }
        }
    }
}

/// Every dependency-file path under `dir`, skipping dot directories (ConfigMap's timestamped
/// `..2026_…` directories: their files are reached through the links). Symlinked directories
/// are followed only when they resolve inside `dir` (each real directory once, so a link back
/// up the tree is no loop); a link that leaves it is never walked. A `.dep` entry that is not a
/// regular file inside `dir` (a FIFO, a link to `/dev/zero` or `/`) is still listed, so the
/// reader can refuse it with a clear error.
pub fn scan(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let root_real = std::fs::canonicalize(dir)?;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Directories reached through links wait until every real one is walked, so a directory
    // with an alias is always listed under its real path.
    let mut linked = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let is_dep = depfile::looks_like_dep;
    while let Some(d) = stack.pop().or_else(|| linked.pop()) {
        if let Ok(real) = std::fs::canonicalize(&d) {
            if !seen.insert(real) {
                continue;
            }
        }
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if d == dir => return Err(e),
            Err(e) => {
                tracing::warn!(dir = %crate::safefs::shown(&d), error = %e, "cannot read sub-directory");
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if depfile::is_ignored_name(name) {
                continue;
            }
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
                continue;
            }
            let linked_dir = kind.is_symlink()
                && std::fs::canonicalize(&path)
                    // Leaves the root, or leads nowhere: never walked.
                    .is_ok_and(|real| real.starts_with(&root_real) && real.is_dir());
            if linked_dir {
                linked.push(path);
            } else if is_dep(name) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{DataChange, Event};

    fn ev(kind: EventKind, paths: &[&str]) -> Event {
        let mut e = Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn events_map_to_signals() {
        let close = ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/d/a_b.dep"],
        );
        assert_eq!(
            classify(&close, Path::new("/d")),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Completed)]
        );
        let open = ev(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &["/d/a_b.dep"],
        );
        assert!(
            classify(&open, Path::new("/d")).is_empty(),
            "our own reads are ignored"
        );
        let read_close = ev(
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            &["/d/a_b.dep"],
        );
        assert!(classify(&read_close, Path::new("/d")).is_empty());
        let write = ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &["/d/a_b.dep"],
        );
        assert_eq!(
            classify(&write, Path::new("/d")),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Writing)]
        );
        let rename = ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/d/.a_b.dep.swp", "/d/a_b.dep"],
        );
        assert_eq!(
            classify(&rename, Path::new("/d")),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Completed)]
        );
        let tmp = ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &["/d/4913", "/d/a_b.dep~"],
        );
        assert!(
            classify(&tmp, Path::new("/d")).is_empty(),
            "editor files are ignored"
        );
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(
            classify(&overflow, Path::new("/d")),
            vec![FileEvent::Rescan]
        );
        let mkdir = ev(EventKind::Create(CreateKind::Folder), &["/d/team"]);
        assert_eq!(
            classify(&mkdir, Path::new("/d")),
            vec![FileEvent::NewFolder]
        );
        let chmod = ev(
            EventKind::Modify(ModifyKind::Metadata(notify::event::MetadataKind::Any)),
            &["/d/a_b.dep"],
        );
        assert_eq!(
            classify(&chmod, Path::new("/d")),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Touched)],
            "a permission change re-reads the file"
        );
        let in_dot_dir = ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/d/..2026_01_01/a_b.dep", "/d/.worktrees/abc/c_d.dep"],
        );
        assert!(classify(&in_dot_dir, Path::new("/d")).is_empty());
        let dot_root = ev(
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
            &["/home/u/.deps/a_b.dep"],
        );
        assert_eq!(classify(&dot_root, Path::new("/home/u/.deps")).len(), 1);
        for kind in [
            EventKind::Remove(notify::event::RemoveKind::Folder),
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        ] {
            let root_event = ev(kind, &["/d"]);
            assert_eq!(
                classify(&root_event, Path::new("/d")),
                vec![FileEvent::Root]
            );
        }
    }

    #[test]
    fn scan_never_walks_links_that_leave_the_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("foreign_prod.dep"), "1").expect("write");
        let root = dir.path();
        std::os::unix::fs::symlink("/", root.join("slash_x.dep")).expect("link");
        std::os::unix::fs::symlink(outside.path(), root.join("elsewhere")).expect("link");
        std::os::unix::fs::symlink("/dev/zero", root.join("zero_x.dep")).expect("link");
        std::fs::create_dir(root.join("sub")).expect("mkdir");
        std::fs::write(root.join("sub/inner_x.dep"), "1").expect("write");
        std::os::unix::fs::symlink(root.join("sub"), root.join("alias")).expect("link");
        let found = scan(root).expect("scan");
        assert_eq!(
            found,
            vec![
                root.join("slash_x.dep"),
                root.join("sub/inner_x.dep"),
                root.join("zero_x.dep"),
            ],
            "the links are listed for the reader to refuse; nothing outside is walked"
        );
    }

    #[tokio::test]
    async fn a_full_channel_raises_the_overflow_flag_instead_of_dropping_silently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::channel(1);
        let overflow = Arc::new(AtomicBool::new(false));
        let _watch = watch_dir(dir.path(), tx, overflow.clone(), None).expect("watch");
        for i in 0..20 {
            std::fs::write(dir.path().join(format!("s{i}_ns.dep")), "1").expect("write");
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !overflow.load(Ordering::SeqCst) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "overflow was never flagged"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The consumer still has something to wake it up.
        assert!(rx.recv().await.is_some());
    }

    #[tokio::test]
    async fn a_barrier_comes_out_after_every_earlier_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = tempfile::tempdir().expect("state");
        let mut barriers = Barriers::new(state.path().join("watch-barrier"));
        let (tx, mut rx) = mpsc::channel(1024);
        let overflow = Arc::new(AtomicBool::new(false));
        let _watch = watch_dir(dir.path(), tx, overflow, barriers.dir()).expect("watch");
        let file = dir.path().join("web_prod.dep");
        for round in 1..=3u64 {
            // A save, then (as the next writer) a truncate and a partial write.
            std::fs::write(&file, "14.37\n").expect("save");
            std::fs::write(&file, "14.3").expect("partial");
            assert_eq!(barriers.raise(), Some(round));
            let mut writes = 0;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let ev = tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .expect("the barrier's event comes")
                    .expect("open");
                match ev {
                    FileEvent::Barrier(n) => {
                        assert_eq!(n, round);
                        break;
                    }
                    FileEvent::Path(p, _) if p == file => writes += 1,
                    _ => {}
                }
            }
            assert!(
                writes >= 2,
                "the writes came out before the barrier: {writes}"
            );
            assert!(rx.try_recv().is_err(), "nothing after the barrier yet");
        }
        // The markers leave nothing behind.
        let left = std::fs::read_dir(state.path().join("watch-barrier"))
            .expect("dir")
            .count();
        assert_eq!(left, 0);
    }

    #[test]
    fn a_renamed_symlink_means_rescan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("..2026_01_01");
        std::fs::create_dir(&target).expect("mkdir");
        let link = dir.path().join("..data");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let rename = ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &[
                dir.path().join("..data_tmp").to_str().expect("utf-8"),
                link.to_str().expect("utf-8"),
            ],
        );
        assert_eq!(classify(&rename, dir.path()), vec![FileEvent::Rescan]);
    }

    #[test]
    fn scan_follows_configmap_links_and_skips_dot_dirs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("..2026_01_01");
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join("web_demo.dep"), "1.0").expect("write");
        std::os::unix::fs::symlink(&data, dir.path().join("..data")).expect("link");
        std::os::unix::fs::symlink(
            dir.path().join("..data/web_demo.dep"),
            dir.path().join("web_demo.dep"),
        )
        .expect("link");
        std::fs::create_dir(dir.path().join("team")).expect("mkdir");
        std::fs::write(dir.path().join("team/api_demo.dep"), "2.0").expect("write");
        std::fs::write(dir.path().join("team/notes.txt"), "x").expect("write");
        std::os::unix::fs::symlink(dir.path(), dir.path().join("team/loop")).expect("loop link");
        let found = scan(dir.path()).expect("scan");
        assert_eq!(
            found,
            vec![
                dir.path().join("team/api_demo.dep"),
                dir.path().join("web_demo.dep")
            ]
        );
    }

    #[tokio::test]
    async fn a_busy_parent_costs_nothing_and_a_change_to_the_root_is_reported() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("deps");
        std::fs::create_dir(&root).expect("mkdir");
        let (tx, mut rx) = mpsc::channel(4096);
        let overflow = Arc::new(AtomicBool::new(false));
        let _watch = RootWatch::start(&root, tx, overflow, None).expect("watch");
        // A log beside the root, written often, and the parent listed (events on the parent
        // itself).
        for i in 0..200 {
            std::fs::write(parent.path().join("daemon.log"), format!("{i}")).expect("log");
            let _ = std::fs::read_dir(parent.path()).map(|d| d.count());
        }
        // Then a change to the root's own entry.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let first = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("an event");
        assert_eq!(first, Some(FileEvent::Root));
        let mut roots = 1;
        while let Ok(ev) = rx.try_recv() {
            roots += usize::from(ev == FileEvent::Root);
        }
        // The chmod is seen by the parent's watch and by the root's own (a few events); the 400
        // events beside it produce none.
        assert!(roots <= 4, "{roots} root events for one change");
    }
}
