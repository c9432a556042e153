//! Migration from the seed daemon and operational edges: seed environment names, `.env`,
//! `.last` files, a missing Deployment or namespace, a slow or failing Slack, `depwatch check`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{colour, Env};
use common::wait_for;
use depwatch::domain::ServiceKey;
use depwatch::sim::SimConfig;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_environment_names_dotenv_and_last_files_are_honoured() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "prod",
        "payments",
        &[("payments", "registry.example/payments:1.41.0")],
        1,
    )
    .await;
    env.deployment(
        "prod",
        "ledger",
        &[("ledger", "registry.example/ledger:2.0.0")],
        1,
    )
    .await;
    // The seed deps directory: a .dep and its .last for each service.
    env.write_dep("payments_prod.dep", "1.42.0\n");
    std::fs::write(env.deps.join("payments_prod.last"), "1.41.0\n").expect("write");
    env.write_dep("ledger_prod.dep", "2.0.0\n");
    std::fs::write(env.deps.join("ledger_prod.last"), "2.0.0\n").expect("write");
    // Seed names: DEPS and ECR_REPO and WEBHOOK_FOR_SLACK from the environment; the state
    // directory and kubeconfig from a .env file in the working directory.
    let cwd = env.dir.path().join("cwd");
    std::fs::create_dir(&cwd).expect("mkdir");
    std::fs::write(
        cwd.join(".env"),
        format!(
            "DEPWATCH_STATE_DIR={}\nDEPWATCH_KUBECONFIG={}\n",
            env.state.display(),
            env.kubeconfig.display()
        ),
    )
    .expect("write .env");
    let daemon = env
        .daemon_with(
            &["run".to_string()],
            &[
                ("DEPS", env.deps.display().to_string()),
                ("ECR_REPO", "ecr.example/payments-team".to_string()),
                ("WEBHOOK_FOR_SLACK", env.slack_url.clone()),
            ],
            &cwd,
        )
        .await;
    env.wait_image("prod", "payments", "ecr.example/payments-team:1.42.0")
        .await;
    let messages = env.wait_messages(1).await;
    assert_eq!(colour(&messages[0]), "#2eb886");
    let ledger = env
        .store()
        .service(&ServiceKey::new("ledger", "prod").expect("key"))
        .await
        .expect("q")
        .expect("imported");
    assert!(
        ledger.message.contains("ledger_prod.last"),
        "{}",
        ledger.message
    );
    assert_eq!(
        env.patches("prod", "ledger"),
        0,
        "the .last file says 2.0.0 is deployed: no redeploy"
    );
    assert!(
        !daemon.log_text().contains(&env.slack_url),
        "the webhook URL is never logged"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_deployments_and_namespaces_are_clear_failures() {
    let env = Env::new(SimConfig::default()).await;
    let _daemon = env.daemon(&["--no-create-namespace"]).await;
    env.write_dep("ghost_default.dep", "1.0.0");
    env.write_dep("web_nowhere.dep", "1.0.0");
    let messages = env.wait_messages(2).await;
    let texts: Vec<String> = messages.iter().map(common::daemon::text).collect();
    assert!(
        texts.iter().any(|t| t.contains(
            "no Deployment, StatefulSet, DaemonSet or CronJob named ghost in namespace default"
        )),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("namespace nowhere does not exist")),
        "{texts:?}"
    );
    assert_eq!(env.all_patches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_slack_never_delays_a_deploy_and_429_is_retried_after_retry_after() {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("demo", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;

    // A receiver that answers 429 with Retry-After: 1 to the first request.
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (h, b) = (hits.clone(), bodies.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let (h, b) = (h.clone(), b.clone());
            async move {
                if h.fetch_add(1, Ordering::SeqCst) == 0 {
                    return (
                        StatusCode::TOO_MANY_REQUESTS,
                        [("retry-after", "1")],
                        "slow down",
                    )
                        .into_response();
                }
                b.lock().expect("lock").push(body);
                "ok".into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    // A dead receiver: a port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/hook", l.local_addr().expect("addr"))
    };

    let args = |hook: &str| {
        vec![
            "run".to_string(),
            "--deps".into(),
            env.deps.display().to_string(),
            "--state-dir".into(),
            env.state.display().to_string(),
            "--kubeconfig".into(),
            env.kubeconfig.display().to_string(),
            "--slack-webhook".into(),
            hook.to_string(),
        ]
    };
    let daemon = env.daemon_with(&args(&dead), &[], env.dir.path()).await;
    env.write_dep("web_demo.dep", "1.1.0");
    let key = ServiceKey::new("web", "demo").expect("key");
    wait_for(
        "web to be recorded healthy despite a dead Slack",
        Duration::from_secs(20),
        || async {
            (env.store().service(&key).await.ok()??.status.as_str() == "succeeded").then_some(())
        },
    )
    .await;
    daemon.stop();

    let _daemon = env.daemon_with(&args(&url), &[], env.dir.path()).await;
    env.write_dep("api_demo.dep", "1.1.0");
    let delivered = wait_for(
        "the message to arrive after the 429",
        Duration::from_secs(30),
        || async { bodies.lock().ok()?.first().cloned() },
    )
    .await;
    assert!(delivered.contains("api"), "{delivered}");
    assert!(hits.load(Ordering::SeqCst) >= 2, "retried after 429");
}

#[test]
fn check_lists_every_problem_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("web_prod.dep"), "1.0.0").expect("write");
    std::fs::write(dir.path().join("api_prod.dep"), "two words").expect("write");
    std::fs::write(dir.path().join("Bad_prod.dep"), "1.0").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["check", dir.path().to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("api_prod.dep:1:") && err.contains("Bad_prod.dep"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("api_prod.dep")).expect("rm");
    std::fs::remove_file(dir.path().join("Bad_prod.dep")).expect("rm");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["check", dir.path().to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 valid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&["--log-format", "json"]).await;
    env.write_dep("web_demo.dep", "1.1.0");
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    let key = ServiceKey::new("web", "demo").expect("key");
    wait_for(
        "the deploy to be recorded",
        Duration::from_secs(20),
        || async {
            (env.store().service(&key).await.ok()??.status.as_str() == "succeeded").then_some(())
        },
    )
    .await;
    daemon.stop();
    let log = env.daemon_logs();
    let lines: Vec<&str> = log.lines().filter(|l| !l.starts_with("== ")).collect();
    assert!(lines.len() > 3, "{log}");
    for l in &lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    assert!(lines
        .iter()
        .any(|l| l.contains("rollout healthy") && l.contains("demo/web")));
}

#[test]
fn check_also_validates_the_token_file_and_kubeconfig() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("web_prod.dep"), "1.0.0").expect("write");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "release-bot:long-enough-token\nbroken line\n").expect("write");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "this: [is not a kubeconfig").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["check", dir.path().to_str().expect("utf-8")])
        .arg("--api-token-file")
        .arg(&tokens)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens:2"), "names the token file line: {err}");
    assert!(err.contains("kubeconfig"), "names the kubeconfig: {err}");
}
