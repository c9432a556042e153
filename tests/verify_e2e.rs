//! Verification end to end through the binary against the simulated cluster: a version is
//! good when its service says so. The simulated pods answer `/healthz` (500 when the tag says
//! `unhealthy`) and `/version` (their tag) through the API server's service proxy.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::{key, wait_for};
use depwatch::domain::{DeployOutcome, ServiceStatus};
use depwatch::sim::SimConfig;

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
    env.wait_status(&k, ServiceStatus::Verifying, Duration::from_secs(20))
        .await;
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
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
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
    env.wait_status(&k, ServiceStatus::RolledBack, Duration::from_secs(30))
        .await;
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

    // Slack carries the checks' record next to the reason.
    let told = wait_for(
        "Slack told of the rollback",
        Duration::from_secs(20),
        || async {
            env.messages().into_iter().find(|m| {
                m.body["text"].as_str().is_some_and(|t| {
                    t.contains("web:1.2-unhealthy") && t.contains("verification failed")
                })
            })
        },
    )
    .await;
    let fields = told.body["attachments"][0]["fields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let checks = fields
        .iter()
        .find(|f| f["title"] == "Checks")
        .unwrap_or_else(|| panic!("a Checks field: {}", told.body));
    assert_eq!(checks["value"], "GET /healthz 0/1 passed, last HTTP 500");

    // Every sample is counted by result, and each bake's length observed.
    let metrics = common::get_metrics(&reqwest::Client::new(), &daemon.http_url()).await;
    let passed = common::sample(&metrics, "depwatch_verify_checks_total{result=\"pass\"}");
    let failed = common::sample(&metrics, "depwatch_verify_checks_total{result=\"fail\"}");
    assert!(
        passed >= 2.0 && failed >= 1.0,
        "pass {passed}, fail {failed}"
    );
    assert_eq!(
        common::sample(&metrics, "depwatch_verify_bake_seconds_count"),
        2.0,
        "two bakes ended"
    );

    // `depwatch retry` lifts the pin, and the version is verified again (and fails again).
    let out = env.cli(&["retry", "prod/web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the retry's verdict", Duration::from_secs(30), || async {
        let h = env.store().history(Some(&k), 10).await.ok()?;
        let retried = h
            .iter()
            .filter(|d| d.to_image.contains("web:1.2-unhealthy"))
            .count();
        (retried == 2
            && h[0].outcome == DeployOutcome::RolledBack
            && h[0].message.contains("verification failed"))
        .then_some(())
    })
    .await;

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
    env.wait_status(&k, ServiceStatus::Verifying, Duration::from_secs(20))
        .await;
    env.write_dep("api_prod.dep", "1.2\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
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

/// A service's error ratio over the last 5 s, from the simulated pods' counters.
fn error_ratio(name: &str) -> String {
    format!(
        "sum(rate(sim_http_requests_total{{namespace=\"prod\",workload=\"{name}\",code=\"500\"}}[5s])) / sum(rate(sim_http_requests_total{{namespace=\"prod\",workload=\"{name}\"}}[5s]))"
    )
}

fn prometheus_file(version: &str, query: &str, condition: &str, no_data: &str) -> String {
    format!(
        "version: \"{version}\"\nverify:\n  bake: 4s\n  interval: 1s\n  failureLimit: 2\n  checks:\n    - name: errors\n      noData: {no_data}\n      prometheus:\n        query: '{query}'\n        condition: \"{condition}\"\n"
    )
}

/// Against a real Prometheus scraping the simulated pods: an error-rate regression against
/// the baseline measured before the PATCH is rolled back with the values; a version without
/// errors passes; a query with no data follows its check's `noData`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_checks_judge_against_the_baseline_and_state_what_no_data_means() {
    let env = Env::new(SimConfig::default()).await;
    for name in ["web", "quiet", "strict"] {
        let image = format!("example.com/{name}:1.0");
        env.deployment("prod", name, &[(name, image.as_str())], 2)
            .await;
    }
    let prom = common::prometheus::Prometheus::scraping(env.sim.addr()).await;
    // The old version's traffic is in Prometheus before anything is deployed.
    let ratio = error_ratio("web");
    wait_for(
        "web's error ratio in Prometheus",
        Duration::from_secs(60),
        || async { prom.value(&ratio).await.map(|_| ()) },
    )
    .await;
    let daemon = env
        .daemon(&["--rollout-timeout", "30s", "--prometheus-url", &prom.url])
        .await;
    let store = env.store();
    let web = key("web", "prod");

    // 30% of its requests fail: more than the baseline (0) allows.
    env.write_dep(
        "web_prod.dep",
        &prometheus_file("1.1-errors-30", &ratio, "<= baseline * 1.2", "wait"),
    );
    env.wait_status(&web, ServiceStatus::RolledBack, Duration::from_secs(60))
        .await;
    env.wait_image("prod", "web", "example.com/web:1.0").await;
    let h = store.history(Some(&web), 10).await.expect("history");
    let m = &h[0].message;
    assert!(m.contains("verification failed: errors: 0."), "{m}");
    assert!(m.contains(" > baseline 0 × 1.2 for 2 of "), "{m}");

    // No errors: the same check passes, and the version becomes last good. Its baseline is
    // measured before its PATCH: once the failed version's errors have left the query's
    // window, so that the baseline is 1.0's own.
    wait_for(
        "the failed version's errors to leave the window",
        Duration::from_secs(60),
        || async { (prom.value(&ratio).await == Some(0.0)).then_some(()) },
    )
    .await;
    env.write_dep(
        "web_prod.dep",
        &prometheus_file("1.2", &ratio, "<= baseline * 1.2", "wait"),
    );
    let h = wait_for("1.2's verdict", Duration::from_secs(60), || async {
        let h = env.store().history(Some(&web), 10).await.ok()?;
        (h[0].to_image.contains("web:1.2") && h[0].outcome != DeployOutcome::InProgress)
            .then_some(h)
    })
    .await;
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded, "{}", h[0].message);
    let row = store.service(&web).await.expect("read").expect("row");
    assert_eq!(row.last_good.to_string(), "web=example.com/web:1.2");

    // A query that finds nothing: `pass` passes, `fail` fails, each saying so.
    let nothing = "sum(rate(no_such_metric_total[5s]))";
    env.write_dep(
        "quiet_prod.dep",
        &prometheus_file("1.1", nothing, "< 1", "pass"),
    );
    env.write_dep(
        "strict_prod.dep",
        &prometheus_file("1.1", nothing, "< 1", "fail"),
    );
    let quiet = key("quiet", "prod");
    let strict = key("strict", "prod");
    env.wait_status(&quiet, ServiceStatus::Succeeded, Duration::from_secs(60))
        .await;
    env.wait_status(&strict, ServiceStatus::RolledBack, Duration::from_secs(60))
        .await;
    let h = store.history(Some(&quiet), 1).await.expect("history");
    let m = &h[0].message;
    assert!(
        m.contains("verified: errors ") && m.contains("last no data"),
        "{m}"
    );
    let h = store.history(Some(&strict), 1).await.expect("history");
    assert!(
        h[0].message
            .contains("errors: the query returned no series for 2 of 2 samples"),
        "{}",
        h[0].message
    );
    daemon.stop();
}

/// A kill -9 during the bake: the next start takes the rollout up on its own row and bakes it
/// for the time it had left (its end unchanged), before the version counts as good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_during_the_bake_resumes_it_for_the_time_left() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let k = key("web", "prod");
    let store = env.store();
    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    env.write_dep(
        "web_prod.dep",
        "version: \"1.1\"\nverify:\n  bake: 8s\n  interval: 200ms\n  checks:\n    - http: /healthz\n",
    );
    env.wait_status(&k, ServiceStatus::Verifying, Duration::from_secs(20))
        .await;
    let until = |message: &str| -> jiff::Timestamp {
        let at = message.find("until ").expect("until") + 6;
        message[at..at + 20].parse().expect("a time")
    };
    let first = until(&store.service(&k).await.expect("read").expect("row").message);
    daemon.kill();
    let row = store.service(&k).await.expect("read").expect("row");
    assert_ne!(row.last_good.to_string(), "web=example.com/web:1.1");

    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let message = wait_for("the bake resumed", Duration::from_secs(20), || async {
        let r = env.store().service(&k).await.ok()??;
        r.message.contains("resumed after").then_some(r.message)
    })
    .await;
    let again = until(&message);
    let moved = again.duration_since(first).abs();
    assert!(
        moved <= jiff::SignedDuration::from_secs(2),
        "the bake ends when it would have: {first} then {again} ({message})"
    );
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    let h = store.history(Some(&k), 10).await.expect("history");
    assert_eq!(h.len(), 1, "the deploy keeps its one row: {h:?}");
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
    assert!(
        h[0].message.contains("verified: GET /healthz"),
        "{}",
        h[0].message
    );
    daemon.stop();
}

/// A StatefulSet is verified the same way: ready but unhealthy by its checks, rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_is_verified_the_same_way() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "statefulset",
        "prod",
        "db",
        &[("db", "example.com/db:1.0")],
        serde_json::json!({"replicas": 2}),
    )
    .await;
    let daemon = env.daemon(&["--rollout-timeout", "30s"]).await;
    let k = key("db", "prod");
    env.write_dep(
        "db_prod.dep",
        &verify_file("1.1-unhealthy", "    - http: /healthz\n"),
    );
    env.wait_status(&k, ServiceStatus::RolledBack, Duration::from_secs(60))
        .await;
    assert_eq!(
        env.workload_image("statefulset", "prod", "db").await,
        "example.com/db:1.0"
    );
    let h = env.store().history(Some(&k), 1).await.expect("history");
    assert!(
        h[0].message
            .contains("verification failed: GET /healthz: HTTP 500"),
        "{}",
        h[0].message
    );
    daemon.stop();
}

/// A platform team's checks for a namespace glob, from the policy file: plain version files
/// are verified by them; a namespace no rule covers is not; an invalid policy deploys nothing
/// until it is fixed, and then the save waiting is taken by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_file_verifies_every_service_of_its_namespaces() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 2)
        .await;
    env.deployment("staging", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let policy = "# production services must answer /healthz for a second\nrules:\n  - namespaces: [\"prod*\"]\n    verify:\n      bake: 1s\n      interval: 300ms\n      checks:\n        - name: healthz\n          http: /healthz\n";
    env.write_dep("depwatch-policy.yaml", policy);
    let _daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let (prod, staging) = (key("web", "prod"), key("web", "staging"));
    let store = env.store();

    // A plain version in prod is verified by the policy's check.
    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(&prod, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    let h = store.history(Some(&prod), 10).await.expect("history");
    assert!(
        h[0].message.contains("verified: healthz"),
        "{}",
        h[0].message
    );
    env.write_dep("web_prod.dep", "1.2-unhealthy\n");
    env.wait_status(&prod, ServiceStatus::RolledBack, Duration::from_secs(30))
        .await;
    env.wait_image("prod", "web", "example.com/web:1.1").await;
    let h = store.history(Some(&prod), 10).await.expect("history");
    assert!(
        h[0].message
            .contains("verification failed: healthz: HTTP 500"),
        "{}",
        h[0].message
    );
    // No rule covers staging: readiness alone judges it.
    env.write_dep("web_staging.dep", "1.2-unhealthy\n");
    env.wait_status(&staging, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;

    // A file cannot drop the policy's check by declaring its own under the same name.
    env.write_dep(
        "web_prod.dep",
        &verify_file("1.3", "    - name: healthz\n      http: /version\n"),
    );
    env.wait_or_show("the conflict refused", Duration::from_secs(20), || async {
        let row = store.service(&prod).await.ok()??;
        (row.status == ServiceStatus::Invalid
            && row
                .message
                .contains("the check `healthz` is also declared by depwatch-policy.yaml rules[0]"))
        .then_some(())
    })
    .await;

    // An invalid policy: the save is refused naming it, nothing is patched, the policy is
    // listed among the refused files.
    let patches = env.patches("prod", "web");
    env.write_dep(
        "depwatch-policy.yaml",
        &policy.replace("bake: 1s", "bake: a while"),
    );
    env.write_dep("web_prod.dep", "1.4\n");
    env.wait_or_show(
        "the save refused under the invalid policy",
        Duration::from_secs(20),
        || async {
            let row = store.service(&prod).await.ok()??;
            (row.status == ServiceStatus::Invalid
                && row
                    .message
                    .contains("not deployed while the policy file is invalid")
                && row
                    .message
                    .contains("depwatch-policy.yaml:5: rules[0].verify.bake: not a duration"))
            .then_some(())
        },
    )
    .await;
    let refused = store.refused_files().await.expect("refused files");
    assert!(
        refused.iter().any(
            |f| f.path.ends_with("depwatch-policy.yaml") && f.reason.contains("not a duration")
        ),
        "{refused:?}"
    );
    assert_eq!(env.patches("prod", "web"), patches, "nothing patched");
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.1");

    // Fixed: the waiting save is taken by itself, and verified.
    env.write_dep("depwatch-policy.yaml", policy);
    env.wait_status(&prod, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    env.wait_image("prod", "web", "example.com/web:1.4").await;
    let h = store.history(Some(&prod), 10).await.expect("history");
    assert!(
        h[0].message.contains("verified: healthz"),
        "{}",
        h[0].message
    );
    let refused = store.refused_files().await.expect("refused files");
    assert!(
        refused
            .iter()
            .all(|f| !f.path.ends_with("depwatch-policy.yaml")),
        "{refused:?}"
    );
}

/// An operator cuts an hour's bake short with `depwatch promote`, recorded with their name;
/// `depwatch rollback` during a bake fails it (its row says rolled back, by whom), not merely
/// replaces it. Both say what they did, and are refused when nothing is verifying. The time left shows
/// on `depwatch status`, the API and the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_promotes_a_bake_or_fails_it_with_a_rollback() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0")], 1)
        .await;
    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let k = key("api", "prod");
    let store = env.store();
    let hour = |v: &str| {
        format!("version: \"{v}\"\nverify:\n  bake: 1h\n  interval: 30s\n  checks:\n    - http: /healthz\n")
    };

    // Nothing verifying: refused, saying why.
    env.write_dep("api_prod.dep", "1.1\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    let out = env.cli(&["promote", "prod/api"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("nothing to promote for prod/api: it is healthy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An hour's bake, with its time left shown everywhere.
    env.write_dep("api_prod.dep", &hour("1.2"));
    env.wait_status(&k, ServiceStatus::Verifying, Duration::from_secs(20))
        .await;
    let out = env.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.contains("prod/api") && l.contains("verifying (59m")),
        "{table}"
    );
    let api: serde_json::Value =
        reqwest::get(format!("{}/api/v1/services/prod/api", daemon.http_url()))
            .await
            .expect("get")
            .json()
            .await
            .expect("json");
    let view = &api["service"];
    let left = view["bake_left_seconds"]
        .as_u64()
        .expect("time left in the API");
    assert!((3500..=3600).contains(&left), "{api}");
    assert!(
        view["bake_ends_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{api}"
    );
    let page = reqwest::get(format!("{}/", daemon.http_url()))
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(
        page.contains("verifying (59m"),
        "the page shows the time left"
    );

    // Promoted: good at once (within a second, not after the interval), with who said so.
    let out = env.cli(&["promote", "prod/api"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("prod/api promoted: api=example.com/api:1.2 becomes last good"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(10))
        .await;
    let row = store.service(&k).await.expect("read").expect("row");
    assert_eq!(row.last_good.to_string(), "api=example.com/api:1.2");
    let h = store.history(Some(&k), 10).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
    assert!(
        h[0].message
            .contains("promoted by alice before its bake ended"),
        "{}",
        h[0].message
    );
    // The checks' record is on the row as fields of its own, in the API too.
    let deploys: serde_json::Value = reqwest::get(format!(
        "{}/api/v1/deploys?service=prod/api&limit=1",
        daemon.http_url()
    ))
    .await
    .expect("deploys")
    .json()
    .await
    .expect("json");
    let row = deploys
        .as_array()
        .and_then(|a| a.first())
        .or_else(|| deploys["items"].as_array().and_then(|a| a.first()))
        .cloned()
        .unwrap_or_else(|| panic!("a row: {deploys}"));
    let result = &row["bake"]["results"][0];
    assert_eq!(result["name"], "GET /healthz", "{row}");
    assert!(result["passed"].as_u64() >= Some(1), "{row}");
    assert!(row["bake"]["startedAt"].as_str().is_some(), "{row}");

    // A rollback during the next bake fails it: rolled back to 1.2.
    env.write_dep("api_prod.dep", &hour("1.3"));
    env.wait_status(&k, ServiceStatus::Verifying, Duration::from_secs(20))
        .await;
    let out = env.cli(&["rollback", "prod/api"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(
            "api=example.com/api:1.3 was verifying: its bake fails, as a failed check would"
        ),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let h = env
        .wait_or_show(
            "1.3 failed by the rollback",
            Duration::from_secs(20),
            || async {
                let h = store.history(Some(&k), 10).await.ok()?;
                let row = h.iter().find(|d| d.to_image.contains("api:1.3"))?;
                (row.outcome == DeployOutcome::RolledBack).then_some(row.clone())
            },
        )
        .await;
    assert!(
        h.message
            .contains("failed by alice during the bake (depwatch rollback)"),
        "{}",
        h.message
    );
    env.wait_image("prod", "api", "example.com/api:1.2").await;
    env.wait_or_show("settled on 1.2", Duration::from_secs(20), || async {
        let row = store.service(&k).await.ok()??;
        (row.status.settled() && row.last_good.to_string() == "api=example.com/api:1.2")
            .then_some(())
    })
    .await;
    assert_eq!(env.image("prod", "api").await, "example.com/api:1.2");
    daemon.stop();
}
