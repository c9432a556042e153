//! Operator commands (`depwatch retry|rollback|suspend|resume SERVICE`). They act through the
//! record and the dependency file, never on the cluster directly: the file stays the source of
//! truth and the running daemon picks the change up like any other save.

use std::path::Path;

use crate::depfile::ServiceKey;
use crate::domain::{Asker, ServiceStatus};
use crate::store::{self, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {0} is not in the record (is depwatch managing it? see `depwatch status`)")]
    Unknown(ServiceKey),
    #[error("service {0} has no known good images to roll back to")]
    NoLastGood(ServiceKey),
    #[error(transparent)]
    Write(#[from] crate::safefs::WriteError),
    #[error(transparent)]
    Read(#[from] crate::safefs::ReadError),
}

/// Largest file an operator command reads back (the daemon's own cap is usually smaller and
/// refuses anything bigger anyway).
const READ_CAP: u64 = 16 * 1024 * 1024;

/// The directory a command may write in: the dependency root when known (the daemon's API),
/// else the file's own directory (a local command names the file through the record).
fn root_of<'a>(root: Option<&'a Path>, path: &'a Path) -> &'a Path {
    root.unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")))
}

/// Replace a file atomically through [`crate::safefs::write_atomic`]: a random, exclusively
/// created temporary beside it, fsynced and renamed over it (the watcher sees one completed
/// save).
pub fn write_atomically(
    root: Option<&Path>,
    path: &Path,
    content: &str,
) -> Result<(), OperatorError> {
    crate::safefs::write_atomic(root_of(root, path), path, content.as_bytes())?;
    Ok(())
}

fn record(store: &Store, key: &ServiceKey) -> Result<store::ServiceRecord, OperatorError> {
    store
        .service(key)?
        .ok_or_else(|| OperatorError::Unknown(key.clone()))
}

/// Make the daemon read the file again (same content, new save).
fn resave(root: Option<&Path>, path: &str) -> Result<(), OperatorError> {
    let p = Path::new(path);
    let content = crate::safefs::read_capped(root_of(root, p), p, READ_CAP)?;
    crate::safefs::write_atomic(root_of(root, p), p, &content)?;
    Ok(())
}

/// Lift the pin on a failed version and deploy it again.
pub fn retry(store: &Store, key: &ServiceKey) -> Result<String, OperatorError> {
    retry_with(store, key, &local_actor(), None)
}

/// Who runs a CLI command: the local user.
pub fn local_actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into())
}

pub fn retry_with(
    store: &Store,
    key: &ServiceKey,
    actor: &str,
    root: Option<&Path>,
) -> Result<String, OperatorError> {
    let r = record(store, key)?;
    store.update_service(key, |s| {
        s.failed_hash.clear();
        s.status = ServiceStatus::Retry;
        s.message = Asker::retry_note(actor);
    })?;
    resave(root, &r.path)?;
    Ok(format!("retrying {key}: {} will be deployed again", r.path))
}

/// Write the last good images into the service's file.
pub fn rollback(store: &Store, key: &ServiceKey) -> Result<String, OperatorError> {
    rollback_with(store, key, &local_actor(), None)
}

pub fn rollback_with(
    store: &Store,
    key: &ServiceKey,
    actor: &str,
    root: Option<&Path>,
) -> Result<String, OperatorError> {
    let r = record(store, key)?;
    let images = r.last_good.clone();
    if images.is_empty() || r.path.is_empty() {
        return Err(OperatorError::NoLastGood(key.clone()));
    }
    let mut content = Asker::Rollback {
        actor: actor.to_string(),
        at: store::now(),
    }
    .header();
    // Per-service settings in the current file survive the rollback.
    let path = Path::new(&r.path);
    let settings = crate::safefs::read_capped(root_of(root, path), path, READ_CAP)
        .ok()
        .and_then(|b| crate::depfile::parse(&r.path, &b).ok())
        .map(|spec| {
            let mut extra = String::new();
            if let Some(t) = spec.rollout_timeout {
                extra.push_str(&format!(
                    "rolloutTimeout: {}\n",
                    humantime::format_duration(t)
                ));
            }
            if let Some(b) = spec.rollback {
                extra.push_str(&format!("rollback: {b}\n"));
            }
            extra
        })
        .unwrap_or_default();
    if images.len() == 1 && settings.is_empty() {
        content.push_str(
            images
                .values()
                .next()
                .map(String::as_str)
                .unwrap_or_default(),
        );
        content.push('\n');
    } else {
        content.push_str("images:\n");
        for (c, i) in images.iter() {
            content.push_str(&format!("  {c}: {i}\n"));
        }
        content.push_str(&settings);
    }
    write_atomically(root, path, &content)?;
    Ok(format!("{key}: wrote {} to {}", r.last_good, r.path))
}

/// Stop (or restart) deploying a service's file changes.
pub fn suspend(store: &Store, key: &ServiceKey, suspended: bool) -> Result<String, OperatorError> {
    let r = record(store, key)?;
    store.update_service(key, |s| {
        s.suspended = suspended;
        s.message = if suspended {
            "suspended by an operator".into()
        } else {
            "resumed by an operator".into()
        };
    })?;
    if suspended {
        Ok(format!(
            "{key} suspended: file changes are not deployed until `depwatch resume {key}`"
        ))
    } else {
        resave(None, &r.path)?;
        Ok(format!("{key} resumed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollback_writes_the_last_good_images_and_keeps_settings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state")).expect("store");
        let key = ServiceKey::new("web", "prod").expect("key");
        let path = dir.path().join("web_prod.dep");
        std::fs::write(
            &path,
            "version: 2.0-bad\nrolloutTimeout: 90s\nrollback: false\n",
        )
        .expect("write");
        assert!(matches!(
            rollback_with(&store, &key, "alice", None),
            Err(OperatorError::Unknown(_))
        ));
        store
            .update_service(&key, |r| {
                r.path = path.display().to_string();
                r.last_good = crate::domain::Images::parse("web=example.com/web:1.0");
            })
            .expect("record");
        rollback_with(&store, &key, "alice", None).expect("rollback");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# rolled back by alice at "), "{text}");
        let spec =
            crate::depfile::parse("web_prod.dep", text.as_bytes()).expect("the result parses");
        assert_eq!(
            spec.rollout_timeout,
            Some(std::time::Duration::from_secs(90))
        );
        assert_eq!(spec.rollback, Some(false));
        assert_eq!(spec.images.len(), 1);
        assert_eq!(spec.images[0].1.to_string(), "example.com/web:1.0");
    }
}
