//! What a team meets in its first week, through the binary: refused files that go away, file
//! names that are not quite right, and messages that say what to do.

mod common;

use serde_json::json;

use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_that_is_deleted_is_no_longer_reported() {
    let env = Env::new(SimConfig::default()).await;
    env.write_dep("web_qa.dep", "1.0\n");
    env.write_dep("api_prod.dep", "version: [\n");
    let daemon = env.daemon(&["--namespaces", "prod"]).await;
    let store = env.store();
    for (name, ns) in [("web", "qa"), ("api", "prod")] {
        let key = ServiceKey::new(name, ns).expect("key");
        wait_for(
            &format!("{key} refused"),
            Duration::from_secs(30),
            || async {
                let r = store.service(&key).await.ok()??;
                (r.status == ServiceStatus::Invalid).then_some(())
            },
        )
        .await;
    }
    std::fs::remove_file(env.deps.join("web_qa.dep")).expect("rm");
    std::fs::remove_file(env.deps.join("api_prod.dep")).expect("rm");
    for (name, ns) in [("web", "qa"), ("api", "prod")] {
        let key = ServiceKey::new(name, ns).expect("key");
        wait_for(
            &format!("{key} no longer managed"),
            Duration::from_secs(30),
            || async {
                let r = store.service(&key).await.ok()??;
                (r.status == ServiceStatus::Unmanaged).then_some(())
            },
        )
        .await;
    }
    drop(daemon);
}

fn run_without(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("DEPWATCH_KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("RUST_BACKTRACE", "0")
        .env("NO_COLOR", "1")
        .envs(envs.iter().copied())
        .output()
        .expect("depwatch runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn configuration_errors_say_what_to_do_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("deps");
    let home = dir.path().to_str().expect("utf-8");
    let state = dir.path().join("state");
    let base = [
        "run",
        "--deps",
        deps.to_str().expect("utf-8"),
        "--state-dir",
        state.to_str().expect("utf-8"),
    ];
    // No kubeconfig anywhere: say so, and what to pass.
    let (ok, err) = run_without(&base, &[("HOME", home)]);
    assert!(!ok);
    assert!(err.contains("no Kubernetes configuration found"), "{err}");
    assert!(err.contains("--kubeconfig"), "{err}");
    assert!(!err.contains("'\""), "no doubled quotes: {err}");
    // A hidden flag kept for old unit files is never the subject of an error.
    let (ok, err) = run_without(
        &["run", "--deps", "/nonexistent"],
        &[("DEPWATCH_NO_CREATE_NAMESPACE", "maybe")],
    );
    assert!(
        !ok && !err.contains("create-namespace") && !err.contains("CREATE_NAMESPACE"),
        "{err}"
    );
    // A kubeconfig that is not there.
    let mut args = base.to_vec();
    args.extend(["--kubeconfig", "/nonexistent/kubeconfig"]);
    let (ok, err) = run_without(&args, &[("HOME", home)]);
    assert!(
        !ok && err.contains("no kubeconfig at /nonexistent/kubeconfig"),
        "{err}"
    );
    // KUBECONFIG naming a file that is not there: as clear as the flag.
    let (ok, err) = run_without(&base, &[("HOME", home), ("KUBECONFIG", "/nope")]);
    assert!(
        !ok && err.contains("KUBECONFIG names /nope, which does not exist")
            && err.contains("--kubeconfig"),
        "{err}"
    );
    // A taken port: the reason once.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let kubeconfig = dir.path().join("kc");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\ncurrent-context: c\n",
    )
    .expect("kubeconfig");
    let addr = format!("127.0.0.1:{port}");
    let mut args = base.to_vec();
    args.extend([
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--http-addr",
        addr.as_str(),
    ]);
    let (ok, err) = run_without(&args, &[("HOME", home)]);
    assert!(!ok);
    assert_eq!(err.matches("Address already in use").count(), 1, "{err}");
    // An API server that does not answer is not "connected".
    assert!(!err.contains("connected to the Kubernetes API"), "{err}");
    assert!(err.contains("does not answer yet"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_the_grace_for_a_deploy_that_only_waits_for_the_api_server() {
    let mut env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    env.sim.stop().await;
    let daemon = env.daemon(&["--shutdown-grace", "10m"]).await;
    env.write_dep("web_prod.dep", "1.1\n");
    wait_for(
        "the deploy to wait for the API server",
        Duration::from_secs(30),
        || async {
            daemon
                .log_text()
                .contains("retrying with backoff")
                .then_some(())
        },
    )
    .await;
    daemon.signal("TERM");
    let log = daemon.log.clone();
    // Nothing was patched: the daemon stops at once, not after the 10-minute grace.
    let status = daemon.exit_status(Duration::from_secs(60)).await;
    let text = common::daemon::read(&log);
    assert!(status.success(), "{text}");
    assert!(text.contains("taken up at the next start"), "{text}");
    assert!(!text.contains("did not finish in time"), "{text}");
}

async fn refused(url: &str) -> Vec<String> {
    let v: serde_json::Value = reqwest::get(format!("{url}/api/v1/refused-files"))
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    v.as_array()
        .into_iter()
        .flatten()
        .map(|f| f["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_with_bad_names_are_listed_until_they_are_renamed_or_removed() {
    let env = Env::new(SimConfig::default()).await;
    for name in ["web-prod.dep", "Web_prod.dep", "web_prod.dep.txt"] {
        env.write_dep(name, "1.0\n");
    }
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    let reasons = wait_for("three refused names", Duration::from_secs(30), || async {
        let r = refused(&url).await;
        (r.len() == 3).then_some(r)
    })
    .await;
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("web_prod.dep.txt") && r.contains("rename it to \"web_prod.dep\"")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("web-prod.dep")),
        "{reasons:?}"
    );
    // The CLI and the page list them too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["status", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Refused file names"), "{text}");
    assert_eq!(text.matches("/deps/").count(), 3, "{text}");
    assert!(
        text.contains("rename it to \"web_prod.dep\""),
        "upper case is named: {text}"
    );
    let page = reqwest::get(format!("{url}/?status=refused"))
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert_eq!(page.matches("data-status=\"refused\"").count(), 3, "{page}");
    // Removed: gone from the list at once.
    std::fs::remove_file(env.deps.join("web-prod.dep")).expect("rm");
    wait_for("two refused names", Duration::from_secs(30), || async {
        (refused(&url).await.len() == 2).then_some(())
    })
    .await;
    // Removed while stopped: gone at the next start.
    daemon.stop();
    std::fs::remove_file(env.deps.join("Web_prod.dep")).expect("rm");
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    wait_for("one refused name", Duration::from_secs(30), || async {
        (refused(&url).await.len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_up_says_where_depwatch_may_patch() {
    let env = Env::new(SimConfig::default()).await;
    let daemon = env.daemon(&["--namespaces", "prod,staging"]).await;
    let log = daemon.log_text();
    assert!(
        log.contains("may patch deployments, statefulsets, daemonsets, cronjobs in prod, staging"),
        "{log}"
    );
    drop(daemon);
    let daemon = env.daemon(&[]).await;
    assert!(
        daemon.log_text().contains(
            "may patch deployments, statefulsets, daemonsets, cronjobs in every namespace"
        ),
        "{}",
        daemon.log_text()
    );
    drop(daemon);
    // A token bound to Deployments in prod only: said at start, kind by kind.
    let role = json!({"metadata": {"name": "deployer", "namespace": "prod"},
        "rules": [{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}]});
    let binding = json!({"metadata": {"name": "deployer", "namespace": "prod"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "deployer"},
        "subjects": [{"kind": "User", "name": depwatch::sim::rbac::USER}]});
    env.deployment("prod", "web", &[("web", "example.com/web:1")], 1)
        .await;
    for (plural, body) in [("roles", role), ("rolebindings", binding)] {
        let req = http::Request::post(format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/prod/{plural}"
        ))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("json"))
        .expect("request");
        env.client
            .request::<serde_json::Value>(req)
            .await
            .expect("create");
    }
    let daemon = env.daemon(&["--namespaces", "prod,staging"]).await;
    let log = daemon.log_text();
    assert!(
        log.contains("may patch deployments in prod; may NOT patch statefulsets, daemonsets, cronjobs in prod; may NOT patch deployments, statefulsets, daemonsets, cronjobs in staging"),
        "{log}"
    );
    assert!(log.contains("WARN"), "a warning: {log}");
}

/// A `.env` in the working directory is read, and the log says so with its path and the seed
/// names it set; an empty seed value sets nothing.
#[test]
fn a_dot_env_file_is_read_and_said() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps-from-env");
    std::fs::create_dir(&deps).expect("deps");
    std::fs::write(
        dir.path().join(".env"),
        format!("DEPS={}\nECR_REPO=\n", deps.display()),
    )
    .expect(".env");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "run",
            "--state-dir",
            "state",
            "--kubeconfig",
            "/nonexistent/kc",
        ])
        .current_dir(dir.path())
        .env_remove("DEPWATCH_DEPS")
        .env_remove("DEPS")
        .env_remove("ECR_REPO")
        .env_remove("DEPWATCH_IMAGE_REPO")
        .env("NO_COLOR", "1")
        .output()
        .expect("depwatch runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read settings from a .env file"), "{err}");
    assert!(err.contains(".env"), "{err}");
    assert!(
        err.contains("from=\"DEPS\"") || err.contains("from=DEPS"),
        "{err}"
    );
    assert!(
        !err.contains("ECR_REPO"),
        "an empty seed value sets nothing: {err}"
    );
}
