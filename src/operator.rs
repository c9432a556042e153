//! Operator commands (`depwatch retry|rollback|promote|suspend|resume SERVICE`). They act through the
//! record and the dependency file, never on the cluster directly: the file stays the source of
//! truth and the running daemon picks the change up like any other save.

use std::path::Path;

use crate::domain::approval::{self, Vote};
use crate::domain::verify::{Judgement, Ruling};
use crate::domain::{Asker, DeployOutcome, Images, ServiceKey, ServiceStatus, VoteKind};
use crate::pipeline::deploy::recorder::verdict;
use crate::store::{self, ServiceChange, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("service {0} is not in the record (is depwatch managing it? see `depwatch status`)")]
    Unknown(ServiceKey),
    /// The command would do nothing, or nothing sensible: the message says why and what to do.
    #[error("{0}")]
    Refused(String),
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

async fn record(store: &Store, key: &ServiceKey) -> Result<store::ServiceRecord, OperatorError> {
    store
        .service(key)
        .await?
        .ok_or_else(|| OperatorError::Unknown(key.clone()))
}

/// Make the daemon read the file again (same content, new save).
fn resave(root: Option<&Path>, path: &str) -> Result<(), OperatorError> {
    let p = Path::new(path);
    let content = crate::safefs::read_capped(root_of(root, p), p, READ_CAP)?;
    crate::safefs::write_atomic(root_of(root, p), p, &content)?;
    Ok(())
}

/// Who runs a command and where it may write.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// Recorded as the change's actor: the local user, or the API token's name.
    pub actor: &'a str,
    /// The dependency root when known (the daemon's API); a local command writes in the
    /// file's own directory.
    pub root: Option<&'a Path>,
}

/// Who runs a CLI command: the local user.
pub fn local_actor() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "operator".into())
}

/// Why a retry would do nothing, if it would. A retry deploys a failed or pinned version
/// again; a healthy, busy or broken-file service has nothing to retry.
pub fn retry_refusal(r: &store::ServiceRecord) -> Option<String> {
    let key = r.key();
    if r.suspended {
        return Some(format!(
            "{key} is suspended: nothing is deployed until `depwatch resume {key}`, which reads its file again"
        ));
    }
    if r.pinned().is_some() {
        return None;
    }
    let why = match r.status {
        ServiceStatus::Failed
        | ServiceStatus::TimedOut
        | ServiceStatus::RolledBack
        | ServiceStatus::RollbackFailed
        | ServiceStatus::Paused
        | ServiceStatus::Drifted => return None,
        ServiceStatus::Invalid | ServiceStatus::Unreadable => {
            "fix the file first; depwatch reads it again on the next save"
        }
        ServiceStatus::WaitingForApi => "depwatch is already retrying until the API server answers",
        ServiceStatus::Pending
        | ServiceStatus::Deploying
        | ServiceStatus::Verifying
        | ServiceStatus::Retry => "a deploy is already due or under way",
        ServiceStatus::Succeeded | ServiceStatus::Unverified | ServiceStatus::Applied => {
            "nothing is pinned and nothing failed"
        }
        ServiceStatus::Missing => {
            "its workload was deleted; recreate it and depwatch deploys to it by itself"
        }
        ServiceStatus::Unmanaged => "its file was removed",
        ServiceStatus::Held => "a save waits for its deploy window or a freeze to end",
        ServiceStatus::AwaitingApproval => "a save waits for its approvers (`depwatch approve`)",
        ServiceStatus::Rejected => "its save was rejected; save a newer version to ask again",
    };
    Some(format!(
        "nothing to retry for {key}: it is {} ({why})",
        r.status.label()
    ))
}

/// Lift the pin on a failed version (or retry a deploy that failed before changing anything)
/// and deploy it again.
pub async fn retry(
    store: &Store,
    key: &ServiceKey,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    if let Some(why) = retry_refusal(&r) {
        return Err(OperatorError::Refused(why));
    }
    let what = match r.pinned() {
        Some(images) => format!("the pin on {images} is lifted and it is deployed again"),
        None => format!("{} is read and deployed again", r.path),
    };
    store
        .change_service(
            key,
            verdict::retry_requested(&r.failed_hash, Asker::retry_note(caller.actor)),
        )
        .await?;
    resave(caller.root, &r.path)?;
    Ok(format!("retrying {key}: {what}"))
}

/// Where an undo goes: words for it (`deploy 41`, `the images before deploy 42`) and the
/// images, laid over what the file asks for now. Pure: decided from the service's history
/// (newest first).
///
/// Without `to`, the candidates are, newest first, what each healthy deploy left running and,
/// for a deploy that changed images, what ran before it (so undoing the very first deploy goes
/// back to what the cluster ran before depwatch). The first that differs from the file wins.
pub fn undo_target(
    key: &ServiceKey,
    history: &[store::DeployRecord],
    desired: &Images,
    to: Option<i64>,
) -> Result<(String, Images), String> {
    let healthy = |d: &store::DeployRecord| {
        matches!(
            d.outcome,
            DeployOutcome::Succeeded | DeployOutcome::Unchanged
        )
    };
    // Only the containers the file sets are the file's to change.
    let over_desired = |text: &str| {
        let images: Images = Images::parse(text)
            .into_iter()
            .filter(|(c, _)| desired.get(c).is_some())
            .collect();
        desired.with(&images)
    };
    let (what, target) = match to {
        Some(id) => {
            let d = history.iter().find(|d| d.id == id).ok_or_else(|| {
                format!("deploy {id} is not in the history of {key} (see `depwatch history {key}`)")
            })?;
            if !healthy(d) {
                return Err(format!(
                    "deploy {id} of {key} ended {}: its images never ran healthy; pick a deploy that succeeded (see `depwatch history {key}`)",
                    d.outcome.label()
                ));
            }
            (format!("deploy {id}"), over_desired(&d.to_image))
        }
        None => history
            .iter()
            .filter(|d| healthy(d))
            .flat_map(|d| {
                let before = (d.outcome == DeployOutcome::Succeeded && !d.from_image.is_empty())
                    .then(|| (format!("the images before deploy {}", d.id), over_desired(&d.from_image)));
                std::iter::once((format!("deploy {}", d.id), over_desired(&d.to_image))).chain(before)
            })
            .find(|(_, t)| !desired.changed_in(t).is_empty())
            .ok_or_else(|| {
                format!("{key} has no earlier healthy images to go back to (see `depwatch history {key}`)")
            })?,
    };
    if desired.changed_in(&target).is_empty() {
        return Err(format!(
            "{key} already asks for {desired}: rolling back to {what} would change nothing"
        ));
    }
    Ok((what, target))
}

/// Undo: write the images of the previous healthy deploy (or of deploy `to`) into the
/// service's file, changing only the containers that differ and keeping the file's form and
/// comments. The daemon deploys it like any save.
pub async fn rollback(
    store: &Store,
    key: &ServiceKey,
    to: Option<i64>,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    if r.path.is_empty() {
        return Err(OperatorError::Refused(format!(
            "{key} has no dependency file to write"
        )));
    }
    let history = store.history(Some(key), 100_000).await?;
    let (what, target) =
        undo_target(key, &history, &r.desired, to).map_err(OperatorError::Refused)?;
    let path = Path::new(&r.path);
    let bytes = crate::safefs::read_capped(root_of(caller.root, path), path, READ_CAP)?;
    let text = String::from_utf8(bytes).map_err(|_| {
        OperatorError::Refused(format!("{}: not UTF-8 text; edit it by hand", r.path))
    })?;
    let header = Asker::Rollback {
        actor: caller.actor.to_string(),
        at: store::now(),
    }
    .header();
    let file = crate::safefs::shown(path);
    let edited = crate::depedit::set_images(&file, &text, key, &r.desired, &target, &header)
        .map_err(|e| OperatorError::Refused(e.to_string()))?;
    // A version verifying is failed by this undo, not merely replaced: the word is recorded
    // before the file is written, so the bake finds it when the new version reaches it.
    let word = match r.status {
        ServiceStatus::Verifying => judgement(store, key, Ruling::Fail, caller).await?,
        _ => None,
    };
    let verifying = word.is_some();
    if let Some(word) = word {
        store
            .change_service(key, ServiceChange::default().judged(word))
            .await?;
    }
    write_atomically(caller.root, path, &edited)?;
    let changes = r.desired.changed_in(&target);
    let suspended = if r.suspended {
        format!("; {key} is suspended, so it is deployed after `depwatch resume {key}`")
    } else {
        String::new()
    };
    let failed = match verifying {
        true => format!(
            "; {} was verifying: its bake fails, as a failed check would",
            r.desired
        ),
        false => String::new(),
    };
    Ok(format!(
        "rolling back {key} to {what}: {changes} written to {}{failed}{suspended}",
        r.path
    ))
}

/// An operator's word on the version verifying now: for the content its open deploy row
/// deployed (the service row names its content only once the deploy ends). `None` when no
/// open row bakes.
async fn judgement(
    store: &Store,
    key: &ServiceKey,
    ruling: Ruling,
    caller: Caller<'_>,
) -> Result<Option<Judgement>, OperatorError> {
    let open = store.open_deploys(key).await?;
    let baking = open.into_iter().find(|d| d.bake.is_some());
    Ok(baking.map(|d| Judgement {
        hash: d.content_hash,
        ruling,
        by: caller.actor.to_string(),
        at: store::now(),
        reason: String::new(),
    }))
}

/// Cut a bake short: the version verifying now is good without the time left (the bake
/// looks for the word every second). Refused unless a version is verifying.
pub async fn promote(
    store: &Store,
    key: &ServiceKey,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    let word = match r.status {
        ServiceStatus::Verifying => judgement(store, key, Ruling::Promote, caller).await?,
        _ => None,
    };
    let Some(word) = word else {
        return Err(OperatorError::Refused(format!(
            "nothing to promote for {key}: it is {} (only a version verifying after a healthy rollout can be promoted)",
            r.status.label()
        )));
    };
    store
        .change_service(key, ServiceChange::default().judged(word))
        .await?;
    Ok(format!(
        "{key} promoted: {} becomes last good without the rest of its bake",
        r.desired
    ))
}

/// The longest reason a break-glass release keeps.
const MAX_REASON: usize = 500;

/// Break-glass: deploy the save a deploy window or a freeze holds, now (approvals still
/// apply). Recorded with who and why before the file is read again.
pub async fn deploy_now(
    store: &Store,
    key: &ServiceKey,
    reason: &str,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(OperatorError::Refused(
            "a break-glass deploy needs --reason: it is recorded with who asked".into(),
        ));
    }
    let r = record(store, key).await?;
    if r.status != ServiceStatus::Held || r.requested_hash.is_empty() {
        return Err(OperatorError::Refused(format!(
            "nothing is held for {key}: it is {} (--now deploys a save a deploy window or a FREEZE holds)",
            r.status.label()
        )));
    }
    let reason: String = crate::safefs::escape(reason)
        .chars()
        .take(MAX_REASON)
        .collect();
    let word = Judgement {
        hash: r.requested_hash.clone(),
        ruling: Ruling::Release,
        by: caller.actor.to_string(),
        at: store::now(),
        reason: reason.clone(),
    };
    store
        .change_service(key, ServiceChange::default().judged(word))
        .await?;
    resave(caller.root, &r.path)?;
    tracing::warn!(service = %key, actor = caller.actor, %reason, "break-glass: a held save is deployed now");
    Ok(format!(
        "break-glass: {key} deploys {} now, past its window or freeze (recorded: {} — {reason})",
        or_words(&r.requested),
        caller.actor
    ))
}

/// An approver's word on the save awaiting approval: `Approve` or `Reject`, with a comment.
/// Bound to that save's content (a newer save asks afresh); the requester cannot approve
/// their own save (they may withdraw it with a rejection). Recorded before the file is read
/// again, which lets the daemon act on it at once.
pub async fn vote(
    store: &Store,
    key: &ServiceKey,
    kind: VoteKind,
    comment: &str,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    let verb = match kind {
        VoteKind::Reject => "reject",
        _ => "approve",
    };
    let votes = store.votes(key).await?;
    let requester = approval::requester(&r.requested_hash, &votes);
    let (ServiceStatus::AwaitingApproval, Some(requester)) = (r.status, requester) else {
        return Err(OperatorError::Refused(format!(
            "nothing awaits approval for {key}: it is {} (only a save waiting for its approvers can be approved or rejected)",
            r.status.label()
        )));
    };
    if kind == VoteKind::Approve && requester == caller.actor {
        return Err(OperatorError::Refused(format!(
            "{} asked for this save of {key}, so cannot approve it: another approver must (`depwatch reject {key}` withdraws it)",
            caller.actor
        )));
    }
    if approval::said(&r.requested_hash, &votes, caller.actor, kind) {
        return Err(OperatorError::Refused(format!(
            "{} already {verb}d this save of {key}; approvals count distinct people",
            caller.actor
        )));
    }
    let comment: String = crate::safefs::escape(comment.trim())
        .chars()
        .take(MAX_REASON)
        .collect();
    // The word binds to the content, and to the digests the pre-flight found for it when
    // it was requested (the deploy must find the same).
    let digests = approval::resolved(&r.requested_hash, &votes)
        .unwrap_or_default()
        .to_string();
    let word = Vote {
        hash: r.requested_hash.clone(),
        images: r.requested.clone(),
        kind,
        actor: caller.actor.to_string(),
        comment,
        at: store::now(),
        digests: digests.clone(),
    };
    store.add_vote(key, &word).await?;
    resave(caller.root, &r.path)?;
    tracing::info!(service = %key, actor = caller.actor, "{verb}d a save awaiting approval");
    let short = r.requested_hash.get(..12).unwrap_or(&r.requested_hash);
    let short = match digests.is_empty() {
        true => short.to_string(),
        false => format!("{short}, images {digests}"),
    };
    Ok(match kind {
        VoteKind::Reject => format!(
            "{key}: {} rejected {} (content {short}); nothing of it is deployed",
            caller.actor,
            or_words(&r.requested)
        ),
        _ => format!(
            "{key}: {} approved {} (content {short}); it deploys once enough approvers have",
            caller.actor,
            or_words(&r.requested)
        ),
    })
}

fn or_words(s: &str) -> &str {
    match s.is_empty() {
        true => "what its file asks",
        false => s,
    }
}

/// Remove a service whose file is gone (a deleted typo, a retired service) from the record;
/// its deploy history stays. Refused while its file exists: delete the file first.
pub async fn forget(
    store: &Store,
    key: &ServiceKey,
    _caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    let file_there = !r.path.is_empty() && Path::new(&r.path).exists();
    if file_there || r.status != ServiceStatus::Unmanaged {
        let why = if file_there {
            format!("its file {} still exists", r.path)
        } else {
            format!("it is {}", r.status.label())
        };
        return Err(OperatorError::Refused(format!(
            "{key} is still managed ({why}): delete its dependency file first; depwatch then stops managing it and it can be forgotten"
        )));
    }
    store.forget_service(key).await?;
    Ok(format!(
        "{key} forgotten: it no longer shows in status; its deploy history is kept"
    ))
}

/// Stop (or restart) deploying a service's file changes.
pub async fn suspend(
    store: &Store,
    key: &ServiceKey,
    suspended: bool,
    caller: Caller<'_>,
) -> Result<String, OperatorError> {
    let r = record(store, key).await?;
    if r.suspended == suspended {
        return Err(OperatorError::Refused(if suspended {
            format!("{key} is already suspended (`depwatch resume {key}` deploys again)")
        } else {
            format!("{key} is not suspended")
        }));
    }
    let actor = caller.actor;
    let message = if suspended {
        format!("suspended by {actor}")
    } else {
        format!("resumed by {actor}")
    };
    store
        .change_service(key, verdict::noted(message).suspended(suspended))
        .await?;
    if suspended {
        Ok(format!(
            "{key} suspended: file changes are not deployed until `depwatch resume {key}`"
        ))
    } else {
        resave(caller.root, &r.path)?;
        Ok(format!(
            "{key} resumed: its file is read and deployed again"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeployRecord, ServiceChange};

    fn key() -> ServiceKey {
        ServiceKey::new("web", "prod").expect("key")
    }

    fn deploy(id: i64, to: &str, outcome: DeployOutcome) -> DeployRecord {
        DeployRecord {
            id,
            namespace: "prod".into(),
            name: "web".into(),
            to_image: to.into(),
            outcome,
            ..DeployRecord::default()
        }
    }

    fn from(mut d: DeployRecord, before: &str) -> DeployRecord {
        d.from_image = before.into();
        d
    }

    #[test]
    fn undo_goes_to_the_previous_healthy_images_or_the_named_deploy() {
        use DeployOutcome as O;
        // Newest first: 4 failed and was rolled back; 3 is what the file asks for now.
        let history = vec![
            from(deploy(4, "web=r/web:3", O::RolledBack), "web=r/web:2"),
            from(deploy(3, "web=r/web:2", O::Succeeded), "web=r/web:1"),
            deploy(2, "web=r/web:1", O::Unchanged),
            deploy(1, "web=r/web:0", O::Unverified),
        ];
        let now = Images::parse("web=r/web:2");
        let pick = |to| undo_target(&key(), &history, &now, to);
        let target = |what: &str, images: &str| Ok((what.to_string(), Images::parse(images)));
        assert_eq!(
            pick(None),
            target("the images before deploy 3", "web=r/web:1")
        );
        assert_eq!(pick(Some(2)), target("deploy 2", "web=r/web:1"));
        assert!(pick(Some(3))
            .expect_err("no-op")
            .contains("would change nothing"));
        assert!(pick(Some(4))
            .expect_err("failed")
            .contains("never ran healthy"));
        assert!(pick(Some(1))
            .expect_err("unverified")
            .contains("never ran healthy"));
        assert!(pick(Some(99))
            .expect_err("unknown")
            .contains("not in the history"));
        // The file asks for the failed version (pinned): undo goes to the last healthy one.
        let pinned = Images::parse("web=r/web:3");
        assert_eq!(
            undo_target(&key(), &history, &pinned, None),
            target("deploy 3", "web=r/web:2")
        );
        // The very first deploy is undone to what ran before depwatch.
        let first = vec![from(deploy(1, "web=r/web:2", O::Succeeded), "web=r/web:1")];
        assert_eq!(
            undo_target(&key(), &first, &now, None),
            target("the images before deploy 1", "web=r/web:1")
        );
        // An adoption has no before: nothing to go back to.
        let adopted = vec![deploy(1, "web=r/web:2", O::Unchanged)];
        assert!(undo_target(&key(), &adopted, &now, None)
            .expect_err("nothing earlier")
            .contains("no earlier healthy images"));
        // Containers the file does not set are left alone.
        let two = vec![
            deploy(2, "web=r/web:2, envoy=r/envoy:9", O::Succeeded),
            deploy(1, "web=r/web:1, envoy=r/envoy:8", O::Succeeded),
        ];
        assert_eq!(
            undo_target(&key(), &two, &now, None),
            target("deploy 1", "web=r/web:1")
        );
    }

    #[test]
    fn retry_refuses_when_nothing_failed() {
        let mut r = store::ServiceRecord {
            namespace: "prod".into(),
            name: "web".into(),
            status: ServiceStatus::Succeeded,
            ..Default::default()
        };
        let why = retry_refusal(&r).expect("healthy");
        assert!(why.contains("nothing is pinned"), "{why}");
        for status in [
            ServiceStatus::Failed,
            ServiceStatus::RolledBack,
            ServiceStatus::Paused,
        ] {
            r.status = status;
            assert_eq!(retry_refusal(&r), None, "{status}");
        }
        r.status = ServiceStatus::Succeeded;
        r.content_hash = "h".into();
        r.failed_hash = "h".into();
        assert_eq!(retry_refusal(&r), None, "pinned");
        r.suspended = true;
        let why = retry_refusal(&r).expect("suspended");
        assert!(why.contains("depwatch resume prod/web"), "{why}");
    }

    #[tokio::test]
    async fn rollback_edits_the_file_in_its_own_form() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state")).expect("store");
        let path = dir.path().join("web_prod.dep");
        std::fs::write(&path, "# from CI\n2.0\n").expect("write");
        let caller = Caller {
            actor: "alice",
            root: None,
        };
        assert!(matches!(
            rollback(&store, &key(), None, caller).await,
            Err(OperatorError::Unknown(_))
        ));
        store
            .change_service(
                &key(),
                ServiceChange::default()
                    .path(path.display().to_string())
                    .desired(Images::parse("web=r.example/web:2.0"))
                    .status(ServiceStatus::Succeeded),
            )
            .await
            .expect("record");
        for to in ["web=r.example/web:1.0", "web=r.example/web:2.0"] {
            let id = store
                .start_deploy(&deploy(0, to, DeployOutcome::InProgress))
                .await
                .expect("deploy");
            store
                .finish_deploy(id, DeployOutcome::Succeeded, "")
                .await
                .expect("finish");
        }
        let said = rollback(&store, &key(), None, caller)
            .await
            .expect("rollback");
        assert!(said.contains("web=r.example/web:1.0"), "{said}");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("# rolled back by alice at "), "{text}");
        assert!(text.ends_with("# from CI\n1.0\n"), "{text}");
    }
}
