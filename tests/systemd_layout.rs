//! The systemd layout as the install steps set it up, with two users: the `depwatch` service
//! user (in the `depwatch-ci` group, with the unit's umask) and a CI account in that group whose
//! `scp` writes files in place. After depwatch itself rewrote a file (an API deploy), CI must
//! still be able to write it in place.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, Env};
use common::wait_for;
use depwatch::sim::SimConfig;

const DEPWATCH_UID: u32 = 64_101;
const CI_UID: u32 = 64_102;
/// The `depwatch-ci` group.
const CI_GID: u32 = 64_100;
const TOKEN: &str = "tok-systemd-0123456789";

/// A key's value in the unit file, e.g. `UMask`.
fn unit_setting(key: &str) -> String {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/depwatch.service"),
    )
    .expect("unit");
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .to_string()
}

/// A directory's mode and group as `depwatch.tmpfiles` declares them.
fn tmpfiles_entry(dir: &str) -> (u32, String, String) {
    let tmpfiles = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/depwatch.tmpfiles"),
    )
    .expect("tmpfiles");
    let line = tmpfiles
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(dir))
        .unwrap_or_else(|| panic!("{dir} in depwatch.tmpfiles"));
    let w: Vec<&str> = line.split_whitespace().collect();
    (
        u32::from_str_radix(w[2], 8).expect("mode"),
        w[3].to_string(),
        w[4].to_string(),
    )
}

/// `sh -c script` as the CI account (its own umask, as sshd's default gives it).
fn as_ci(script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args([
            &format!("--reuid={CI_UID}"),
            &format!("--regid={CI_UID}"),
            &format!("--groups={CI_GID}"),
            "--",
            "sh",
            "-c",
            &format!("umask 0022; {script}"),
        ])
        .output()
        .expect("setpriv")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ci_can_write_in_place_after_depwatch_rewrote_a_file() {
    if !common::root_or_skip("two users (setpriv) writing the same file") {
        return;
    }
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    // The layout depwatch.tmpfiles declares, with this test's users.
    let (mode, owner, group) = tmpfiles_entry("/var/lib/depwatch/deps");
    assert_eq!(
        (owner.as_str(), group.as_str()),
        ("depwatch", "depwatch-ci")
    );
    let open = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open(env.dir.path(), 0o755);
    open(&env.kubeconfig, 0o644);
    std::os::unix::fs::chown(&env.deps, Some(DEPWATCH_UID), Some(CI_GID)).expect("chown deps");
    open(&env.deps, mode);
    let state = env.dir.path().join("state");
    std::fs::create_dir(&state).expect("state");
    std::os::unix::fs::chown(&state, Some(DEPWATCH_UID), Some(DEPWATCH_UID)).expect("chown");
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("ci:{TOKEN}\n")).expect("tokens");
    std::os::unix::fs::chown(&tokens, Some(DEPWATCH_UID), Some(DEPWATCH_UID)).expect("chown");
    let binary = env.dir.path().join("depwatch");
    std::fs::copy(env!("CARGO_BIN_EXE_depwatch"), &binary).expect("copy binary");
    open(&binary, 0o755);

    // CI's first scp (an in-place write) creates the file.
    let file = env.deps.join("web_prod.dep");
    let out = as_ci(&format!("printf '1.0\\n' > {}", file.display()));
    assert!(out.status.success(), "{out:?}");

    // depwatch as its unit runs it: its user, the depwatch-ci group, the unit's umask.
    let umask = unit_setting("UMask");
    let script = format!(
        "umask {umask}; exec {} run --deps {} --state-dir {} --kubeconfig {} --api-token-file {} --debounce 50ms",
        binary.display(),
        env.deps.display(),
        state.display(),
        env.kubeconfig.display(),
        tokens.display()
    );
    let launcher = [
        "setpriv".to_string(),
        format!("--reuid={DEPWATCH_UID}"),
        format!("--regid={DEPWATCH_UID}"),
        format!("--groups={CI_GID}"),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script,
    ];
    let program: Vec<&str> = launcher.iter().map(String::as_str).collect();
    let daemon: Daemon = env.daemon_via(&program, &[], &[], env.dir.path()).await;
    // An API deploy: depwatch rewrites the file (replacing CI's).
    let url = daemon.http_url();
    let r = reqwest::Client::new()
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"service": "web", "namespace": "prod", "version": "1.1"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    env.wait_image("prod", "web", "r.example/web:1.1").await;
    let meta = std::fs::metadata(&file).expect("stat");
    assert_eq!(meta.uid(), DEPWATCH_UID, "depwatch wrote it");
    assert_eq!(meta.gid(), CI_GID, "the setgid directory's group");
    // CI's next scp writes in place: it must be allowed to.
    let out = as_ci(&format!("printf '1.2\\n' > {}", file.display()));
    assert!(
        out.status.success(),
        "CI cannot write after depwatch did (mode {:o}): {}",
        meta.permissions().mode() & 0o7777,
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_image("prod", "web", "r.example/web:1.2").await;
    wait_for("the record", Duration::from_secs(30), || async {
        daemon.log_text().contains("rollout healthy").then_some(())
    })
    .await;
}
