//! Verification end to end through the binary against the simulated cluster: a version is
//! good when its service says so. The simulated pods answer `/healthz` (500 when the tag says
//! `unhealthy`) and `/version` (their tag) through the API server's service proxy.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::{key, wait_for};
use depwatch::domain::{DeployOutcome, ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;

async fn wait_status(env: &Env, k: &ServiceKey, want: ServiceStatus, within: Duration) {
    let what = format!("{k} to be {want}");
    let got = tokio::time::timeout(
        within,
        wait_for(&what, within * 2, || async {
            (env.store().service(k).await.ok()??.status == want).then_some(())
        }),
    )
    .await;
    if got.is_err() {
        panic!("timed out waiting for {what}\n{}", env.daemon_logs());
    }
}

fn verify_file(version: &str, checks: &str) -> String {
    format!("version: {version}\nverify:\n  bake: 1s\n  interval: 300ms\n  checks:\n{checks}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_ready_but_unhealthy_by_its_checks_is_rolled_back_and_pinned() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 2)
        .await;
    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let k = key("web", "prod");
    let store = env.store();

    // A healthy version whose /version says what was deployed: good after its bake.
    env.write_dep(
        "web_prod.dep",
        &verify_file(
            "\"1.1\"",
            "    - http: /healthz\n    - http: {path: /version, versionField: version}\n",
        ),
    );
    wait_status(&env, &k, ServiceStatus::Verifying, Duration::from_secs(20)).await;
    let row = store.service(&k).await.expect("read").expect("row");
    assert!(
        row.message.contains("verifying 2 checks for 1s"),
        "{}",
        row.message
    );
    assert_ne!(
        row.last_good.to_string(),
        "web=example.com/web:1.1",
        "not last good while verifying"
    );
    wait_status(&env, &k, ServiceStatus::Succeeded, Duration::from_secs(20)).await;
    let row = store.service(&k).await.expect("read").expect("row");
    assert_eq!(row.last_good.to_string(), "web=example.com/web:1.1");
    let h = store.history(Some(&k), 10).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
    assert!(
        h[0].message.contains("verified: GET /healthz") && h[0].message.contains("GET /version"),
        "{}",
        h[0].message
    );

    // Ready, but /healthz answers 500: rolled back to 1.1, and 1.2-unhealthy pinned.
    env.write_dep(
        "web_prod.dep",
        &verify_file("1.2-unhealthy", "    - http: /healthz\n"),
    );
    wait_status(&env, &k, ServiceStatus::RolledBack, Duration::from_secs(30)).await;
    env.wait_image("prod", "web", "example.com/web:1.1").await;
    let row = store.service(&k).await.expect("read").expect("row");
    assert!(!row.failed_hash.is_empty(), "the version is pinned");
    assert_eq!(row.last_good.to_string(), "web=example.com/web:1.1");
    let h = store.history(Some(&k), 10).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::RolledBack);
    assert!(
        h[0].message
            .contains("verification failed: GET /healthz: HTTP 500, expected 2xx: unhealthy for 1 of 1 samples"),
        "{}",
        h[0].message
    );

    // /version says another version than the one deployed: rolled back too.
    env.write_dep(
        "web_prod.dep",
        &verify_file(
            "\"1.3\"",
            "    - http: {path: /version, versionField: build}\n",
        ),
    );
    let h = wait_for("1.3's verdict", Duration::from_secs(30), || async {
        let h = env.store().history(Some(&k), 10).await.ok()?;
        (h[0].to_image.contains("web:1.3") && h[0].outcome == DeployOutcome::RolledBack)
            .then_some(h)
    })
    .await;
    assert!(
        h[0].message
            .contains("the answer has no text field `build`"),
        "{}",
        h[0].message
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_version_during_the_bake_supersedes_it_and_it_never_becomes_last_good() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0")], 1)
        .await;
    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let k = key("api", "prod");
    let store = env.store();
    env.write_dep(
        "api_prod.dep",
        "version: \"1.1\"\nverify:\n  bake: 1h\n  interval: 200ms\n  checks:\n    - http: /healthz\n",
    );
    wait_status(&env, &k, ServiceStatus::Verifying, Duration::from_secs(20)).await;
    env.write_dep("api_prod.dep", "1.2\n");
    wait_status(&env, &k, ServiceStatus::Succeeded, Duration::from_secs(20)).await;
    let row = store.service(&k).await.expect("read").expect("row");
    assert_eq!(row.last_good.to_string(), "api=example.com/api:1.2");
    let h = store.history(Some(&k), 10).await.expect("history");
    let baked = h
        .iter()
        .find(|d| d.to_image.contains("api:1.1"))
        .expect("1.1's row");
    assert_eq!(baked.outcome, DeployOutcome::Superseded, "{baked:?}");
    daemon.stop();
}
