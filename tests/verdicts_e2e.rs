//! The verdicts depwatch gives, end to end through the binary against the simulated cluster:
//! rollbacks judged on the restored template, API outages retried and never pinned, 0 replicas
//! unverified, paused Deployments failing at once, Events that `kubectl describe` lists, and one
//! history row per deploy.

mod common;

use std::time::Duration;

use common::daemon::{colour, text, Env};
use common::key;
use common::{wait_for, Kubectl};
use depwatch::domain::{DeployOutcome, ServiceStatus};
use depwatch::sim::SimConfig;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The demo's four kinds of service, many copies each, several rounds: every verdict must be
/// the right one (a working rollback is never reported as failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_gives_the_right_verdict_every_time() {
    const COPIES: usize = 5;
    const ROUNDS: usize = 3;
    let env = Env::new(SimConfig::default()).await;
    let kinds = [
        ("web", "", ServiceStatus::Succeeded),
        ("api", "-fail-pull", ServiceStatus::RolledBack),
        ("worker", "-crash", ServiceStatus::RolledBack),
        ("reports", "-hang", ServiceStatus::RolledBack),
    ];
    let mut services = Vec::new();
    for (kind, _, _) in kinds {
        for n in 0..COPIES {
            let name = format!("{kind}{n}");
            let image = format!("example.com/{name}:1.0.0");
            env.deployment("demo", &name, &[(name.as_str(), image.as_str())], 2)
                .await;
            services.push(name);
        }
    }
    for name in &services {
        env.wait_ready("demo", name).await;
    }
    let daemon = env.daemon(&["--rollout-timeout", "4s"]).await;
    let store = env.store();
    for round in 1..=ROUNDS {
        for (kind, suffix, _) in kinds {
            for n in 0..COPIES {
                env.write_dep(
                    &format!("{kind}{n}_demo.dep"),
                    &format!("1.{round}.0{suffix}\n"),
                );
            }
        }
        // Every service has a finished deploy of this round's version.
        let want = services.len();
        wait_for(
            &format!("round {round}'s verdicts"),
            Duration::from_secs(90),
            || async {
                let mut done = 0;
                for name in &services {
                    let finished = store
                        .history(Some(&key(name, "demo")), 1)
                        .await
                        .ok()
                        .and_then(|h| h.into_iter().next())
                        .is_some_and(|d| {
                            d.to_image.contains(&format!(":1.{round}.0"))
                                && d.outcome != DeployOutcome::InProgress
                        });
                    done += usize::from(finished);
                }
                (done == want).then_some(())
            },
        )
        .await;
        for (kind, _, verdict) in kinds {
            for n in 0..COPIES {
                let name = format!("{kind}{n}");
                let k = key(&name, "demo");
                let record = store.service(&k).await.expect("query").expect("record");
                let last = &store.history(Some(&k), 1).await.expect("history")[0];
                assert_eq!(
                    record.status,
                    verdict,
                    "round {round}, {k}: {} ({})\n{}",
                    last.outcome,
                    last.message,
                    daemon.log_text()
                );
                // A good version becomes last good; a rollback restores it.
                let good = if kind == "web" {
                    format!("example.com/{name}:1.{round}.0")
                } else {
                    format!("example.com/{name}:1.0.0")
                };
                assert_eq!(env.image("demo", &name).await, good, "round {round}, {k}");
                assert!(
                    !last.message.contains('{'),
                    "no debug text: {}",
                    last.message
                );
            }
        }
    }
}

/// The API server is unreachable when depwatch starts and when the file changes. The change
/// waits (status, `/readyz`), nothing is pinned, and it is deployed once the server answers:
/// at once while within its deadline, or at the next resync once the deadline has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_outage_is_retried_and_never_pins() {
    let mut env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    env.wait_ready("prod", "api").await;
    env.sim.stop().await;
    let daemon = env
        .daemon(&["--rollout-timeout", "3s", "--resync", "1s"])
        .await;
    // web uses the 3s default deadline; api's file gives itself a minute.
    env.write_dep("web_prod.dep", "1.1.0\n");
    env.write_dep("api_prod.dep", "version: 1.1.0\nrolloutTimeout: 60s\n");
    let (web, api) = (key("web", "prod"), key("api", "prod"));
    env.wait_status(&api, ServiceStatus::WaitingForApi, Duration::from_secs(20))
        .await;
    let http = reqwest::Client::new();
    let url = daemon.http_url();
    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 503);
    let body = ready.text().await.expect("body");
    assert!(
        body.contains("waiting for the Kubernetes API server"),
        "{body}"
    );
    let record = env.store().service(&api).await.expect("q").expect("record");
    assert!(
        record.message.contains(&env.sim.url()),
        "the message names the server: {}",
        record.message
    );
    // web's deadline passes: one failed row, not pinned. (The record's own message may already
    // be the next resync's "waiting" by the time it is read: the failed row keeps the verdict.)
    let failed = env
        .wait_or_show("web to give up", Duration::from_secs(20), || async {
            let h = env.store().history(Some(&web), 5).await.ok()?;
            (h.len() == 1 && h[0].outcome == DeployOutcome::Failed).then(|| h[0].clone())
        })
        .await;
    let record = env.store().service(&web).await.expect("q").expect("record");
    assert!(
        record.failed_hash.is_empty(),
        "a transient error never pins"
    );
    assert!(failed.message.contains("next resync"), "{}", failed.message);

    env.sim.restart().await.expect("the API server is back");
    env.wait_status(&api, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    env.wait_status(&web, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.image("prod", "api").await, "example.com/api:1.1.0");
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.1.0");
    assert_eq!(env.patches("prod", "api"), 1);
    assert_eq!(env.patches("prod", "web"), 1);
    let api_rows = env.store().history(Some(&api), 10).await.expect("history");
    assert_eq!(api_rows.len(), 1, "one row for one deploy: {api_rows:?}");
    assert_eq!(api_rows[0].outcome, DeployOutcome::Succeeded);
    let ready = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let logs = daemon.log_text();
    assert!(
        logs.contains("the Kubernetes API server answers again"),
        "{logs}"
    );
}

/// At 0 replicas no pod proves an image healthy: the deploy is recorded as unverified and the
/// image never becomes last good, so a later rollback restores a version that was verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_replicas_deploy_unverified_and_never_become_last_good() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    let daemon = env.daemon(&[]).await;
    let k = key("web", "prod");
    env.write_dep("web_prod.dep", "1.1.0\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;

    let api: Api<Deployment> = Api::namespaced(env.client.clone(), "prod");
    let scale = |n: i32| {
        let api = api.clone();
        async move {
            api.patch(
                "web",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("scale");
        }
    };
    scale(0).await;
    env.write_dep("web_prod.dep", "1.2.0-crash\n");
    env.wait_status(&k, ServiceStatus::Unverified, Duration::from_secs(30))
        .await;
    let record = env.store().service(&k).await.expect("q").expect("record");
    assert_eq!(record.last_good.to_string(), "web=example.com/web:1.1.0");
    assert_eq!(
        record.deployed.to_string(),
        "web=example.com/web:1.2.0-crash"
    );
    let h = env.store().history(Some(&k), 1).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::Unverified);
    assert!(h[0].message.contains("0 replicas"), "{}", h[0].message);
    let m = env.wait_messages(2).await;
    assert_eq!(colour(&m[1]), "#daa038", "unverified is not green");

    scale(1).await;
    env.write_dep("web_prod.dep", "1.3.0-fail-pull\n");
    env.wait_status(&k, ServiceStatus::RolledBack, Duration::from_secs(30))
        .await;
    assert_eq!(
        env.image("prod", "web").await,
        "example.com/web:1.1.0",
        "the rollback restores the last verified image, not the unverified crash\n{}",
        daemon.log_text()
    );
}

/// A paused Deployment would take the patch and roll nothing out: it fails at once, with that
/// reason, and nothing is patched or pinned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_deployment_is_reported_paused_at_once_without_a_patch() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), "prod");
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"paused": true}})),
    )
    .await
    .expect("pause");
    let patches = env.patches("prod", "web");
    let _daemon = env.daemon(&["--rollout-timeout", "10m"]).await;
    let k = key("web", "prod");
    env.write_dep("web_prod.dep", "1.1.0\n");
    // Well inside the rollout timeout: the verdict does not wait for it.
    env.wait_status(&k, ServiceStatus::Paused, Duration::from_secs(15))
        .await;
    let m = env.wait_messages(1).await;
    assert_eq!(colour(&m[0]), "#d40e0d");
    assert!(
        text(&m[0]).contains("Deployment is paused"),
        "{}",
        text(&m[0])
    );
    assert_eq!(
        env.patches("prod", "web"),
        patches,
        "depwatch patched nothing"
    );
    let record = env.store().service(&k).await.expect("q").expect("record");
    assert!(
        record.failed_hash.is_empty(),
        "not a rollout verdict: not pinned"
    );
    let h = env.store().history(Some(&k), 10).await.expect("history");
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(
        h[0].message.starts_with("Deployment is paused"),
        "{}",
        h[0].message
    );
}

/// `kubectl describe deploy` lists Events by the object's uid: depwatch's carry it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_describe_lists_depwatchs_events() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    let _daemon = env.daemon(&[]).await;
    let k = key("web", "prod");
    env.write_dep("web_prod.dep", "1.1.0\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    env.write_dep("web_prod.dep", "1.2.0-fail-pull\n");
    env.wait_status(&k, ServiceStatus::RolledBack, Duration::from_secs(30))
        .await;
    let kubectl = Kubectl::new(env.dir.path(), &env.sim.kubeconfig());
    let out = wait_for(
        "the Events in kubectl describe",
        Duration::from_secs(20),
        || async {
            let out = kubectl
                .ok(&["-n", "prod", "describe", "deploy", "web"])
                .await;
            (out.contains("DeploySucceeded") && out.contains("DeployRolledBack")).then_some(out)
        },
    )
    .await;
    assert!(out.contains("depwatch"), "{out}");
    assert!(!out.contains("Events:  <none>"), "{out}");
    // Sent through kube's event recorder: events.k8s.io/v1, reported by depwatch, about the
    // Deployment.
    let listed = kubectl
        .ok(&["-n", "prod", "get", "events.v1.events.k8s.io", "-o", "json"])
        .await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("event list");
    let ours: Vec<&serde_json::Value> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["reportingController"] == "depwatch")
        .collect();
    for reason in ["DeploySucceeded", "DeployRolledBack"] {
        let e = ours
            .iter()
            .find(|e| e["reason"] == reason)
            .unwrap_or_else(|| panic!("no {reason} event in {listed}"));
        assert_eq!(e["regarding"]["kind"], "Deployment", "{e}");
        assert_eq!(e["regarding"]["name"], "web", "{e}");
        assert!(
            e["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("depwatch: ")),
            "{e}"
        );
    }
    assert_eq!(
        ours.iter()
            .find(|e| e["reason"] == "DeployRolledBack")
            .expect("rollback")["type"],
        "Warning"
    );
}

/// A deploy that fails before any change is one history row, one red message, and the
/// Deployment is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_fails_before_any_change_is_one_row() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let _daemon = env.daemon(&[]).await;
    let k = key("web", "prod");
    // The file names a container the Deployment does not have.
    env.write_dep("web_prod.dep", "images:\n  sidecar: example.com/side:2\n");
    env.wait_status(&k, ServiceStatus::Failed, Duration::from_secs(30))
        .await;
    let h = env.store().history(Some(&k), 10).await.expect("history");
    assert_eq!(h.len(), 1, "{h:?}");
    assert!(
        h[0].message.contains("no container \"sidecar\""),
        "{}",
        h[0].message
    );
    assert_eq!(env.wait_messages(1).await.len(), 1);
    assert_eq!(env.patches("prod", "web"), 0);
}

/// depwatch's view of the cluster lags (its watch events arrive seconds late) while the rollout
/// itself is quick: the deadline measures the rollout, so before calling it timed out depwatch
/// asks the API server, and nothing is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_view_of_the_cluster_never_causes_a_rollback() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    env.sim.faults().set_watch_delay(Duration::from_secs(3));
    let _daemon = env.daemon(&["--rollout-timeout", "2s"]).await;
    let k = key("web", "prod");
    env.write_dep("web_prod.dep", "1.1.0\n");
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.patches("prod", "web"), 1, "no rollback");
    let h = env.store().history(Some(&k), 5).await.expect("history");
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.1.0");
}
