//! One writer per state directory: `depwatch run` holds an exclusive `flock` on
//! `depwatch.lock` for its whole life, with its PID written inside. A second daemon on the same
//! directory exits at once naming the holder. The kernel drops the lock when the holder exits,
//! however it exits (a `kill -9` included), so a stale lock file never blocks a restart.
//! Read-only commands (`status`, `history`) and operator commands do not take it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The held lock; dropping it (or exiting) releases it.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another depwatch{} already runs on the state directory {dir}; stop it, or give this one its own --state-dir", holder.map(|p| format!(" (PID {p})")).unwrap_or_default())]
    Held { dir: PathBuf, holder: Option<u32> },
    #[error("cannot lock the state directory {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
}

impl StateLock {
    /// Take the state directory's lock, or say who has it.
    pub fn acquire(state_dir: &Path) -> Result<StateLock, LockError> {
        let io = |source| LockError::Io {
            dir: state_dir.to_path_buf(),
            source,
        };
        let path = state_dir.join("depwatch.lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io)?;
        // SAFETY: flock on a file descriptor we own, for the life of `file`.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: state_dir.to_path_buf(),
                    holder: text.trim().parse().ok(),
                });
            }
            return Err(io(e));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(StateLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateLock::acquire(dir.path()).expect("first");
        let err = StateLock::acquire(dir.path()).expect_err("second");
        let text = err.to_string();
        assert!(
            text.contains(&format!("(PID {})", std::process::id())),
            "{text}"
        );
        assert!(text.contains("--state-dir"), "{text}");
        drop(first);
        StateLock::acquire(dir.path()).expect("free again");
    }
}
