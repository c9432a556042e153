//! Rollout safety end to end: rollback and pin, supersede, crash recovery, drift.

mod common;

use std::process::Command;
use std::time::Duration;

use common::daemon::{colour, text, Env};
use common::key;
use common::{get_metrics, sample, wait_for, Kubectl};
use depwatch::domain::ServiceKey;
use depwatch::sim::SimConfig;

async fn wait_status(env: &Env, k: &ServiceKey, status: &str) {
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        wait_for(
            &format!("{k} to be {status}"),
            Duration::from_secs(60),
            || async {
                (env.store().service(k).await.ok()??.status.as_str() == status).then_some(())
            },
        ),
    )
    .await;
    if waited.is_err() {
        panic!(
            "timed out waiting for {k} to be {status}; record: {:?}\ndaemon logs:\n{}",
            env.store().service(k).await,
            env.daemon_logs()
        );
    }
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_version_is_rolled_back_pinned_and_never_retried_until_it_changes() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "prod",
        "payments",
        &[("payments", "example.com/payments:1.0.0")],
        2,
    )
    .await;
    env.wait_ready("prod", "payments").await;
    env.write_dep("payments_prod.dep", "1.0.0\n");
    let daemon = env.daemon(&[]).await;
    let k = key("payments", "prod");
    wait_status(&env, &k, "succeeded").await;

    env.write_dep("payments_prod.dep", "1.1.0-fail-pull\n");
    wait_status(&env, &k, "rolled_back").await;
    assert_eq!(
        env.image("prod", "payments").await,
        "example.com/payments:1.0.0"
    );
    assert_eq!(
        env.patches("prod", "payments"),
        2,
        "the bad version and the rollback"
    );
    let messages = env.wait_messages(2).await;
    assert_eq!(colour(&messages[0]), "#d40e0d");
    assert!(
        text(&messages[0]).contains("ImagePullBackOff"),
        "{}",
        text(&messages[0])
    );
    assert_eq!(colour(&messages[1]), "#daa038");
    let t = text(&messages[1]);
    assert!(
        t.starts_with("rolled back the deploy of payments (prod) from payments=example.com/payments:1.0.0 to payments=example.com/payments:1.1.0-fail-pull: rolled back to payments=example.com/payments:1.0.0: ImagePullBackOff"),
        "{t}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "history",
            "prod/payments",
            "--json",
            "--state-dir",
            env.state.to_str().expect("utf-8"),
        ])
        .output()
        .expect("history runs");
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(history[0]["outcome"], "rolled_back");
    assert!(history[0]["message"]
        .as_str()
        .expect("message")
        .contains("ImagePullBackOff"));

    // Same bytes again, a touch, a restart: the pinned version is not retried.
    let pinned = |d: &common::daemon::Daemon| count(&d.log_text(), "pinned until it changes");
    let before = pinned(&daemon);
    env.write_dep("payments_prod.dep", "1.1.0-fail-pull\n");
    wait_for(
        "the rewrite to be judged pinned",
        Duration::from_secs(10),
        || async { (pinned(&daemon) > before).then_some(()) },
    )
    .await;
    let before = pinned(&daemon);
    std::fs::OpenOptions::new()
        .append(true)
        .open(env.deps.join("payments_prod.dep"))
        .expect("touch");
    wait_for(
        "the touch to be judged pinned",
        Duration::from_secs(10),
        || async { (pinned(&daemon) > before).then_some(()) },
    )
    .await;
    daemon.stop();
    let daemon = env.daemon(&[]).await;
    assert!(pinned(&daemon) >= 1, "the start-up scan sees the pin");
    assert_eq!(env.patches("prod", "payments"), 2, "no further patches");

    // A new version deploys.
    env.write_dep("payments_prod.dep", "1.2.0\n");
    wait_for("1.2.0 to be healthy", Duration::from_secs(30), || async {
        let s = env.store().service(&k).await.ok()??;
        (s.status.as_str() == "succeeded" && s.deployed.to_string().contains("1.2.0")).then_some(())
    })
    .await;
    assert_eq!(env.patches("prod", "payments"), 3);

    // An operator can retry the pinned version: the CLI lifts the pin and re-saves the file.
    env.write_dep("payments_prod.dep", "1.3.0-fail-pull\n");
    wait_status(&env, &k, "rolled_back").await;
    let patches = env.patches("prod", "payments");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "retry",
            "prod/payments",
            "--state-dir",
            env.state.to_str().expect("utf-8"),
        ])
        .output()
        .expect("retry runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the retried version to be patched again",
        Duration::from_secs(20),
        || async { (env.patches("prod", "payments") > patches).then_some(()) },
    )
    .await;
    wait_status(&env, &k, "rolled_back").await;
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_arriving_mid_rollout_supersede_it_without_rollback() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_secs(2),
        ..SimConfig::default()
    })
    .await;
    env.deployment("prod", "api", &[("api", "example.com/api:1")], 1)
        .await;
    env.wait_ready("prod", "api").await;
    let _daemon = env.daemon(&[]).await;
    for v in ["2", "3", "4"] {
        env.write_dep("api_prod.dep", &format!("{v}\n"));
        // Each version is saved once the one before is patched, while it takes 2 s to become
        // ready: each arrives in the middle of the previous rollout.
        env.wait_image("prod", "api", &format!("example.com/api:{v}"))
            .await;
    }
    let k = key("api", "prod");
    wait_for(
        "version 4 to be healthy",
        Duration::from_secs(30),
        || async {
            let s = env.store().service(&k).await.ok()??;
            (s.status.as_str() == "succeeded" && s.deployed.to_string() == "api=example.com/api:4")
                .then_some(())
        },
    )
    .await;
    let history = env.store().history(Some(&k), 10).await.expect("history");
    let outcomes: Vec<(String, String)> = history
        .iter()
        .map(|d| (d.to_image.clone(), d.outcome.to_string()))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("api=example.com/api:4".into(), "succeeded".into()),
            ("api=example.com/api:3".into(), "superseded".into()),
            ("api=example.com/api:2".into(), "superseded".into()),
        ]
    );
    assert_eq!(env.patches("prod", "api"), 3, "no rollback patch");
    assert_eq!(env.image("prod", "api").await, "example.com/api:4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_interrupted_by_kill_9_is_judged_and_rolled_back_after_restart() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "prod",
        "worker",
        &[("worker", "example.com/worker:1.0.0")],
        1,
    )
    .await;
    env.wait_ready("prod", "worker").await;
    env.write_dep("worker_prod.dep", "1.0.0");
    let daemon = env.daemon(&[]).await;
    let k = key("worker", "prod");
    wait_status(&env, &k, "succeeded").await;
    env.write_dep("worker_prod.dep", "2.0.0-crash");
    wait_for(
        "the crash version to be patched",
        Duration::from_secs(20),
        || async { (env.patches("prod", "worker") == 1).then_some(()) },
    )
    .await;
    daemon.kill();
    assert_eq!(
        env.store()
            .service(&k)
            .await
            .expect("q")
            .expect("rec")
            .status
            .as_str(),
        "deploying"
    );

    let daemon = env.daemon(&[]).await;
    if tokio::time::timeout(
        Duration::from_secs(20),
        wait_status(&env, &k, "rolled_back"),
    )
    .await
    .is_err()
    {
        panic!("not rolled back; daemon log:\n{}", daemon.log_text());
    }
    assert_eq!(
        env.image("prod", "worker").await,
        "example.com/worker:1.0.0"
    );
    assert_eq!(
        env.patches("prod", "worker"),
        2,
        "the crash version once, then the rollback"
    );
    let history = env.store().history(Some(&k), 10).await.expect("history");
    assert_eq!(history.len(), 1, "recorded once: {history:?}");
    assert_eq!(history[0].outcome.as_str(), "rolled_back");
    assert!(
        history[0].message.contains("CrashLoopBackOff"),
        "{}",
        history[0].message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_recorded_and_reported_and_self_heal_restores() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.1.0");
    let daemon = env.daemon(&["--resync", "200ms"]).await;
    let k = key("web", "prod");
    wait_status(&env, &k, "succeeded").await;
    let kubectl = Kubectl::new(env.dir.path(), &env.sim.kubeconfig());
    kubectl
        .ok(&[
            "-n",
            "prod",
            "set",
            "image",
            "deploy/web",
            "web=example.com/web:hotfix",
        ])
        .await;
    let messages = env.wait_messages(2).await;
    let drift = messages
        .iter()
        .find(|m| text(m).contains("drifted"))
        .expect("a drift message");
    assert_eq!(colour(drift), "#daa038");
    assert!(
        text(drift).contains("example.com/web:hotfix"),
        "{}",
        text(drift)
    );
    wait_status(&env, &k, "drifted").await;
    let history = env.store().history(Some(&k), 5).await.expect("history");
    assert_eq!(history[0].outcome.as_str(), "drift");
    let metrics = get_metrics(&reqwest::Client::new(), &daemon.http_url()).await;
    assert_eq!(
        sample(&metrics, "depwatch_deploys_total{outcome=\"drift\"}"),
        1.0,
        "drift is counted like every other outcome"
    );
    assert_eq!(
        env.image("prod", "web").await,
        "example.com/web:hotfix",
        "without --self-heal nothing is changed"
    );
    daemon.stop();
    // Neither resyncs nor a restart undo the drift without --self-heal. A change to another
    // service, deployed after the restart's scan, shows the pipeline has run.
    let patches = env.patches("prod", "web");
    let daemon = env.daemon(&["--resync", "200ms"]).await;
    env.write_dep("api_prod.dep", "1.1.0");
    env.wait_image("prod", "api", "example.com/api:1.1.0").await;
    // Three resync periods pass: the scenario under test, not a wait for a result.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        env.patches("prod", "web"),
        patches,
        "drift is not undone without --self-heal"
    );
    assert_eq!(env.image("prod", "web").await, "example.com/web:hotfix");
    daemon.stop();

    let _daemon = env.daemon(&["--self-heal"]).await;
    kubectl
        .ok(&[
            "-n",
            "prod",
            "set",
            "image",
            "deploy/web",
            "web=example.com/web:hotfix2",
        ])
        .await;
    env.wait_image("prod", "web", "example.com/web:1.1.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_rollback_suspend_and_resume_act_through_the_file() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.1.0");
    let _daemon = env.daemon(&[]).await;
    let k = key("web", "prod");
    wait_status(&env, &k, "succeeded").await;
    let cli = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        let state = env.state.to_str().expect("utf-8").to_string();
        all.extend(["--state-dir", Box::leak(state.into_boxed_str())]);
        let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(&all)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    cli(&["suspend", "prod/web"]);
    env.write_dep("web_prod.dep", "1.2.0");
    let before = env.patches("prod", "web");
    wait_for(
        "the suspended change to be logged",
        Duration::from_secs(10),
        || async {
            std::fs::read_dir(env.dir.path())
                .ok()?
                .flatten()
                .any(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .contains("service is suspended")
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        env.patches("prod", "web"),
        before,
        "suspended: not deployed"
    );
    cli(&["resume", "prod/web"]);
    env.wait_image("prod", "web", "example.com/web:1.2.0").await;
    wait_status(&env, &k, "succeeded").await;
    // Rolling back writes the last good version into the file.
    env.write_dep("web_prod.dep", "1.3.0-hang\n");
    wait_for(
        "1.3.0-hang to be patched",
        Duration::from_secs(10),
        || async { (env.image("prod", "web").await == "example.com/web:1.3.0-hang").then_some(()) },
    )
    .await;
    let out = cli(&["rollback", "prod/web"]);
    assert!(out.contains("example.com/web:1.2.0"), "{out}");
    let file = std::fs::read_to_string(env.deps.join("web_prod.dep")).expect("file");
    assert!(
        file.starts_with("# rolled back by ") && file.ends_with("\n1.2.0\n"),
        "the file stays the source of truth, in its own form: {file}"
    );
    env.wait_image("prod", "web", "example.com/web:1.2.0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_can_turn_rollback_off_for_its_service_and_status_reads_the_record() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    let _daemon = env.daemon(&[]).await;
    env.write_dep(
        "api_prod.dep",
        "version: 2.0.0-fail-pull\nrollback: false\n",
    );
    let k = key("api", "prod");
    wait_status(&env, &k, "failed").await;
    assert_eq!(
        env.image("prod", "api").await,
        "example.com/api:2.0.0-fail-pull",
        "not rolled back"
    );
    assert_eq!(env.patches("prod", "api"), 1);
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "status",
            "--json",
            "--state-dir",
            env.state.to_str().expect("utf-8"),
        ])
        .output()
        .expect("status runs");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(status[0]["name"], "api");
    assert_eq!(status[0]["status"], "failed");
    assert!(status[0]["message"]
        .as_str()
        .expect("message")
        .contains("ImagePullBackOff"));
}
