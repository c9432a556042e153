//! Read-only commands look without touching: a missing database is an error with a hint (never
//! an empty one created on the spot), and an unknown service exits non-zero.

use std::process::Command;

use depwatch::domain::ServiceKey;
use depwatch::store::Store;

fn depwatch(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("DEPWATCH_STATE_DIR")
        .env_remove("DEPWATCH_DATABASE_URL")
        .output()
        .expect("depwatch runs")
}

/// A state directory under `dir` whose record holds prod/web.
async fn record_with_one_service(dir: &std::path::Path) -> std::path::PathBuf {
    let state = dir.join("state");
    Store::open(&state)
        .expect("open")
        .change_service(
            &ServiceKey::new("web", "prod").expect("key"),
            depwatch::store::ServiceChange::default(),
        )
        .await
        .expect("record");
    state
}

#[test]
fn status_and_history_without_a_database_fail_with_a_hint_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let state_arg = state.to_str().expect("utf-8");
    for args in [
        vec!["status", "--state-dir", state_arg],
        vec!["history", "prod/web", "--state-dir", state_arg],
        vec!["retry", "prod/web", "--state-dir", state_arg],
        vec!["rollback", "prod/web", "--state-dir", state_arg],
        vec!["suspend", "prod/web", "--state-dir", state_arg],
        vec!["resume", "prod/web", "--state-dir", state_arg],
    ] {
        let out = depwatch(&args);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("no database at"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("use --state-dir, --database-url or --api"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        !state.exists(),
        "an operator command created the state directory"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Another user's record: reading it says whose it is and how to get at it, and changing it
/// locally is refused, so SQLite's journal files never end up owned by the wrong user.
#[tokio::test]
async fn another_users_record_is_refused_with_a_hint() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = record_with_one_service(dir.path()).await;
    let db = state.join("depwatch.db");
    let state_arg = state.to_str().expect("utf-8").to_string();
    if is_root() {
        // The record belongs to `nobody`, as it would to the daemon's user.
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown dir");
        std::os::unix::fs::chown(&db, Some(65534), Some(65534)).expect("chown db");
        let out = depwatch(&["retry", "prod/web", "--state-dir", &state_arg]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("belongs to user 65534") && stderr.contains("--api"),
            "{stderr}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&state)
            .expect("state")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no journal files: {leftovers:?}");
        // Reading as another user, with the directory closed to others.
        let out = Command::new("setpriv")
            .args(["--reuid=1234", "--regid=1234", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_depwatch"))
            .args(["status", "--state-dir", &state_arg])
            .env("NO_COLOR", "1")
            .output()
            .expect("setpriv runs");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot read")
                && stderr.contains("Permission denied")
                && stderr.contains("sudo -u depwatch"),
            "{stderr}"
        );
    } else {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        let out = depwatch(&["status", "--state-dir", &state_arg]);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("cannot read") && stderr.contains("sudo -u depwatch"),
            "{stderr}"
        );
    }
}

#[tokio::test]
async fn history_of_an_unknown_service_exits_non_zero_and_reading_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = record_with_one_service(dir.path()).await;
    let db = state.join("depwatch.db");
    let before = std::fs::read(&db).expect("db");
    let state_arg = state.to_str().expect("utf-8");
    let out = depwatch(&["history", "prod/nope", "--state-dir", state_arg]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("prod/nope is not in the record"),
        "{stderr}"
    );
    let out = depwatch(&["history", "prod/web", "--state-dir", state_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("deployment/web in prod\n"),
        "the table says which workload: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = depwatch(&["status", "--state-dir", state_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("prod/web"));
    assert_eq!(
        std::fs::read(&db).expect("db"),
        before,
        "reading wrote to the database"
    );
}

/// Text from outside in the record (a registry's tag, a pod's message) printed by `status` and
/// `history`: escape sequences, the bell and bidirectional controls are shown, never obeyed.
#[tokio::test]
async fn status_and_history_never_print_control_characters_from_the_record() {
    use depwatch::domain::{DeployOutcome, Images, ServiceStatus};
    use depwatch::store::{DeployRecord, ServiceChange, Store};
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let hostile = "1.1\u{1b}[1A\u{1b}[2K \u{1b}]0;pwned\u{7} web\u{202e}ved";
    {
        let store = Store::open(&state).expect("store");
        let key = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
        let image = format!("example.com/web:{hostile}");
        let images: Images = [("web".to_string(), image.clone())].into_iter().collect();
        store
            .change_service(
                &key,
                ServiceChange::default()
                    .status(ServiceStatus::Failed)
                    .desired(images)
                    .message(format!("tag not found; closest: {hostile}")),
            )
            .await
            .expect("service");
        let id = store
            .start_deploy(&DeployRecord {
                namespace: "prod".into(),
                name: "web".into(),
                to_image: format!("web={image}"),
                message: hostile.into(),
                ..DeployRecord::default()
            })
            .await
            .expect("row");
        store
            .finish_deploy(id, DeployOutcome::Failed, hostile)
            .await
            .expect("finish");
    }
    let state_arg = state.to_str().expect("utf-8");
    for args in [
        vec!["status", "--state-dir", state_arg],
        vec!["status", "-o", "wide", "--state-dir", state_arg],
        vec!["history", "prod/web", "--state-dir", state_arg],
    ] {
        let out = depwatch(&args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(
            text.contains("\\u{1b}"),
            "{args:?} shows the escape: {text}"
        );
        assert!(
            !out.stdout.iter().any(|b| *b == 0x1b || *b == 0x07),
            "{args:?} printed a control byte: {text}"
        );
        assert!(!text.contains('\u{202e}'), "{args:?}: {text}");
    }
}
