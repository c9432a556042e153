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

use crate::debounce::Signal;
use crate::depfile;

/// What the watcher reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileEvent {
    Path(PathBuf, Signal),
    /// Anything may have changed: compare the whole directory.
    Rescan,
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

/// Map one notify event to what it means for dependency files.
pub fn classify(event: &notify::Event) -> Vec<FileEvent> {
    if event.need_rescan() {
        return vec![FileEvent::Rescan];
    }
    let link_or_dir = |p: &Path| {
        std::fs::symlink_metadata(p)
            .map(|m| m.file_type().is_symlink() || m.is_dir())
            .unwrap_or(false)
    };
    let relevant = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !depfile::is_ignored_name(n))
    };
    let signal = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Signal::Completed,
        // Our own reads, and anyone else's.
        EventKind::Access(_) => return Vec::new(),
        EventKind::Modify(ModifyKind::Name(mode)) => {
            // A renamed symlink or directory (`..data`, a git-sync worktree) may change every
            // file behind it.
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
                if relevant(from) {
                    out.push(FileEvent::Path(from.clone(), Signal::Touched));
                }
            }
            match mode {
                RenameMode::From => out.extend(
                    event
                        .paths
                        .iter()
                        .filter(|p| relevant(p))
                        .map(|p| FileEvent::Path(p.clone(), Signal::Touched)),
                ),
                _ => {
                    if let Some(to) = to.filter(|p| relevant(p)) {
                        out.push(FileEvent::Path(to.clone(), Signal::Completed));
                    }
                }
            }
            return out;
        }
        EventKind::Modify(ModifyKind::Data(_)) => Signal::Writing,
        // Attribute changes alone (chmod, touch's timestamps) change no content; touch also
        // closes after writing, which the content hash then judges.
        EventKind::Modify(ModifyKind::Metadata(_)) => return Vec::new(),
        EventKind::Create(CreateKind::Folder) => return vec![FileEvent::Rescan],
        EventKind::Create(_) => {
            if event.paths.iter().any(|p| link_or_dir(p)) {
                return vec![FileEvent::Rescan];
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
/// the event is dropped in favour of a rescan the consumer must perform.
pub fn watch_dir(
    dir: &Path,
    tx: mpsc::Sender<FileEvent>,
    overflow: Arc<AtomicBool>,
) -> Result<DirWatch, WatchError> {
    let handler = move |res: notify::Result<notify::Event>| {
        let events = match res {
            Ok(ev) => classify(&ev),
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
    let mut watcher = notify::recommended_watcher(handler).map_err(|source| WatchError::Watch {
        dir: dir.to_path_buf(),
        source,
    })?;
    watcher
        .watch(dir, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Watch {
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok(DirWatch { _watcher: watcher })
}

/// Every dependency-file path under `dir` (following symlinks to files, skipping dot
/// directories such as ConfigMap's timestamped `..2026_…` directories).
pub fn scan(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Symlinked directories are followed once each: a link back up the tree is no loop.
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        if let Ok(real) = std::fs::canonicalize(&d) {
            if !seen.insert(real) {
                continue;
            }
        }
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if d == dir => return Err(e),
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "cannot read sub-directory");
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
            match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => stack.push(path),
                Ok(m) if m.is_file() && name.ends_with(&format!(".{}", depfile::EXTENSION)) => {
                    out.push(path)
                }
                _ => {}
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
            classify(&close),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Completed)]
        );
        let open = ev(
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            &["/d/a_b.dep"],
        );
        assert!(classify(&open).is_empty(), "our own reads are ignored");
        let read_close = ev(
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
            &["/d/a_b.dep"],
        );
        assert!(classify(&read_close).is_empty());
        let write = ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &["/d/a_b.dep"],
        );
        assert_eq!(
            classify(&write),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Writing)]
        );
        let rename = ev(
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
            &["/d/.a_b.dep.swp", "/d/a_b.dep"],
        );
        assert_eq!(
            classify(&rename),
            vec![FileEvent::Path("/d/a_b.dep".into(), Signal::Completed)]
        );
        let tmp = ev(
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            &["/d/4913", "/d/a_b.dep~"],
        );
        assert!(classify(&tmp).is_empty(), "editor files are ignored");
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(classify(&overflow), vec![FileEvent::Rescan]);
        let mkdir = ev(EventKind::Create(CreateKind::Folder), &["/d/team"]);
        assert_eq!(classify(&mkdir), vec![FileEvent::Rescan]);
    }

    #[tokio::test]
    async fn a_full_channel_raises_the_overflow_flag_instead_of_dropping_silently() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tx, mut rx) = mpsc::channel(1);
        let overflow = Arc::new(AtomicBool::new(false));
        let _watch = watch_dir(dir.path(), tx, overflow.clone()).expect("watch");
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
        assert_eq!(classify(&rename), vec![FileEvent::Rescan]);
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
}
