//! Read-only commands look without touching: a missing database is an error with a hint (never
//! an empty one created on the spot), and an unknown service exits non-zero.

use std::process::Command;

use depwatch::depfile::ServiceKey;
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

#[test]
fn status_and_history_without_a_database_fail_with_a_hint_and_create_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let state_arg = state.to_str().expect("utf-8");
    for args in [
        vec!["status", "--state-dir", state_arg],
        vec!["history", "prod/web", "--state-dir", state_arg],
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
        "a read-only command created the state directory"
    );
}

#[test]
fn history_of_an_unknown_service_exits_non_zero_and_reading_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    {
        let store = Store::open(&state).expect("open");
        store
            .update_service(&ServiceKey::new("web", "prod").expect("key"), |_| {})
            .expect("record");
    }
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
