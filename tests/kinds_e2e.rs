//! Every workload kind through the real binary against the simulated cluster: StatefulSets
//! (healthy, crashing and recovered by the forced rollback, OnDelete), DaemonSets (healthy,
//! failing to pull, no node), CronJobs (applied at the next schedule), names more than one kind
//! has, and drift with self-heal.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::key;
use common::wait_for;
use depwatch::domain::{DeployOutcome, ServiceKey, ServiceStatus, WorkloadKind};
use depwatch::sim::SimConfig;
use depwatch::store::ServiceRecord;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;

/// Wait until the service's record satisfies `done`.
async fn wait_record(
    env: &Env,
    what: &str,
    k: &ServiceKey,
    done: impl Fn(&ServiceRecord) -> bool,
) -> ServiceRecord {
    let store = env.store();
    wait_for(what, Duration::from_secs(60), || async {
        store.service(k).await.ok().flatten().filter(|r| done(r))
    })
    .await
}

async fn status_of(env: &Env, kind: &str, ns: &str, name: &str) -> serde_json::Value {
    env.get_workload(kind, ns, name).await["status"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_deploys_and_a_crashing_version_is_recovered_by_the_forced_rollback() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "statefulset",
        "data",
        "db",
        &[("db", "example.com/db:16.0")],
        json!({}),
    )
    .await;
    env.write_dep("db_data.dep", "16.1\n");
    let _daemon = env.daemon(&[]).await;
    let db = key("db", "data");
    let r = wait_record(&env, "db deployed", &db, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.kind, WorkloadKind::StatefulSet);
    assert_eq!(r.last_good.to_string(), "db=example.com/db:16.1");
    let st = status_of(&env, "statefulset", "data", "db").await;
    assert_eq!(st["readyReplicas"], 3, "{st}");
    assert_eq!(st["currentRevision"], st["updateRevision"], "{st}");

    // A crashing version: the highest ordinal crash-loops and holds the OrderedReady
    // StatefulSet; depwatch fails fast with the pod's reason, restores 16.1 and deletes the
    // stuck pod so the restored template runs.
    env.write_dep("db_data.dep", "16.2-crash\n");
    let r = wait_record(&env, "db rolled back", &db, |r| {
        r.status == ServiceStatus::RolledBack
    })
    .await;
    assert!(r.message.contains("CrashLoopBackOff"), "{}", r.message);
    assert!(
        r.message.contains("db-2"),
        "the pod is named: {}",
        r.message
    );
    assert_eq!(
        r.pinned().map(|p| p.to_string()).as_deref(),
        Some("db=example.com/db:16.2-crash")
    );
    assert_eq!(
        env.workload_image("statefulset", "data", "db").await,
        "example.com/db:16.1"
    );
    wait_for(
        "every pod back on 16.1 and ready",
        Duration::from_secs(30),
        || async {
            let st = status_of(&env, "statefulset", "data", "db").await;
            (st["readyReplicas"] == 3 && st["currentRevision"] == st["updateRevision"])
                .then_some(())
        },
    )
    .await;
    let history = env.store().history(Some(&db), 5).await.expect("history");
    assert_eq!(history[0].outcome, DeployOutcome::RolledBack);
    assert!(
        env.daemon_logs().contains("forced rollback"),
        "the deleted pod is logged"
    );
    // Slack names the kind, and its from and to are the history row's.
    let messages = env.wait_messages(2).await;
    let rolled_back = messages
        .iter()
        .map(common::daemon::text)
        .find(|t| t.starts_with("rolled back the deploy of"))
        .expect("a rolled back message");
    assert!(
        rolled_back.contains(&format!(
            "from {} to {}",
            history[0].from_image, history[0].to_image
        )),
        "{rolled_back} vs {} → {}",
        history[0].from_image,
        history[0].to_image
    );
    assert!(
        messages
            .iter()
            .any(|m| common::daemon::text(m).contains("statefulset/db")),
        "{messages:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_delete_statefulsets_and_daemonsets_on_no_node_are_unverified() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "statefulset",
        "data",
        "cache",
        &[("cache", "example.com/cache:1.0")],
        json!({"updateStrategy": {"type": "OnDelete"}}),
    )
    .await;
    env.workload(
        "daemonset",
        "data",
        "gpu-agent",
        &[("gpu-agent", "example.com/gpu-agent:1.0")],
        json!({"template": {"metadata": {"labels": {"app": "gpu-agent"}}, "spec": {
            "nodeSelector": {"gpu": "true"},
            "containers": [{"name": "gpu-agent", "image": "example.com/gpu-agent:1.0"}]}}}),
    )
    .await;
    env.write_dep("cache_data.dep", "1.1\n");
    env.write_dep("gpu-agent_data.dep", "1.1\n");
    let _daemon = env.daemon(&[]).await;
    let cache = wait_record(&env, "cache unverified", &key("cache", "data"), |r| {
        r.status == ServiceStatus::Unverified
    })
    .await;
    assert!(cache.message.contains("OnDelete"), "{}", cache.message);
    assert_eq!(
        cache.last_good.get("cache").map(String::as_str),
        Some("example.com/cache:1.0"),
        "the unverified images never become last good"
    );
    assert!(cache
        .next_step()
        .is_some_and(|s| s.contains("delete statefulset/cache's pods")));
    let agent = wait_record(&env, "agent unverified", &key("gpu-agent", "data"), |r| {
        r.status == ServiceStatus::Unverified
    })
    .await;
    assert!(agent.message.contains("0 nodes"), "{}", agent.message);
    assert_eq!(
        env.workload_image("daemonset", "data", "gpu-agent").await,
        "example.com/gpu-agent:1.1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemonset_deploys_and_a_version_that_cannot_be_pulled_is_rolled_back() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "daemonset",
        "infra",
        "log-agent",
        &[("log-agent", "example.com/log-agent:2.0")],
        json!({}),
    )
    .await;
    env.write_dep("log-agent_infra.dep", "2.1\n");
    let _daemon = env.daemon(&[]).await;
    let agent = key("log-agent", "infra");
    let r = wait_record(&env, "agent deployed", &agent, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.kind, WorkloadKind::DaemonSet);
    let st = status_of(&env, "daemonset", "infra", "log-agent").await;
    assert_eq!(
        st["desiredNumberScheduled"], 3,
        "one pod per simulated node: {st}"
    );
    assert_eq!(st["updatedNumberScheduled"], 3, "{st}");

    env.write_dep("log-agent_infra.dep", "2.2-fail-pull\n");
    let r = wait_record(&env, "agent rolled back", &agent, |r| {
        r.status == ServiceStatus::RolledBack
    })
    .await;
    assert!(
        r.message.contains("ImagePullBackOff") || r.message.contains("ErrImagePull"),
        "{}",
        r.message
    );
    assert_eq!(
        env.workload_image("daemonset", "infra", "log-agent").await,
        "example.com/log-agent:2.1"
    );
    wait_for(
        "every node back on 2.1",
        Duration::from_secs(30),
        || async {
            let st = status_of(&env, "daemonset", "infra", "log-agent").await;
            (st["updatedNumberScheduled"] == 3 && st["numberAvailable"] == 3).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cronjob_is_applied_for_its_next_schedule_and_never_pinned() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "cronjob",
        "jobs",
        "report",
        &[("report", "example.com/report:3.0")],
        json!({}),
    )
    .await;
    env.write_dep("report_jobs.dep", "3.1-crash\n");
    let _daemon = env.daemon(&[]).await;
    let report = key("report", "jobs");
    let r = wait_record(&env, "report applied", &report, |r| {
        r.status == ServiceStatus::Applied
    })
    .await;
    assert_eq!(r.kind, WorkloadKind::CronJob);
    assert!(r.pinned().is_none(), "no rollout verdict pins a CronJob");
    assert_eq!(
        r.last_good.to_string(),
        "report=example.com/report:3.1-crash",
        "a CronJob's last good is what was applied"
    );
    let history = env
        .store()
        .history(Some(&report), 5)
        .await
        .expect("history");
    assert_eq!(history[0].outcome, DeployOutcome::Applied);
    assert!(
        history[0].message.contains("next schedule"),
        "{}",
        history[0].message
    );
    assert_eq!(
        env.workload_image("cronjob", "jobs", "report").await,
        "example.com/report:3.1-crash"
    );
    let logs = env.daemon_logs();
    assert!(
        !logs
            .lines()
            .any(|l| l.contains(" WARN ") && l.contains("report")),
        "an applied CronJob is not a warning: {logs}"
    );
    assert_eq!(env.workload_patches("cronjob", "jobs", "report"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_two_kinds_share_needs_kind_in_the_file() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.workload(
        "statefulset",
        "shop",
        "web",
        &[("web", "example.com/web-sts:1.0")],
        json!({"replicas": 1}),
    )
    .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let _daemon = env.daemon(&[]).await;
    let web = key("web", "shop");
    let r = wait_record(&env, "refused as ambiguous", &web, |r| {
        r.status == ServiceStatus::Failed
    })
    .await;
    assert!(
        r.message.contains("names a Deployment and a StatefulSet")
            && r.message.contains("kind: statefulset"),
        "{}",
        r.message
    );
    assert_eq!(env.all_patches(), 0, "nothing patched");

    env.write_dep("web_shop.dep", "kind: statefulset\nversion: 1.1\n");
    let r = wait_record(&env, "the StatefulSet deployed", &web, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.kind, WorkloadKind::StatefulSet);
    assert_eq!(
        env.workload_image("statefulset", "shop", "web").await,
        "example.com/web-sts:1.1"
    );
    assert_eq!(env.image("shop", "web").await, "example.com/web:1.0");
    assert_eq!(env.patches("shop", "web"), 0, "the Deployment is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_of_a_daemonset_is_recorded_and_healed() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "daemonset",
        "infra",
        "node-exporter",
        &[("node-exporter", "example.com/node-exporter:1.0")],
        json!({}),
    )
    .await;
    env.write_dep("node-exporter_infra.dep", "1.1\n");
    let _daemon = env.daemon(&["--self-heal"]).await;
    let k = key("node-exporter", "infra");
    wait_record(&env, "deployed", &k, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    // Someone patches the DaemonSet by hand.
    let req = http::Request::patch("/apis/apps/v1/namespaces/infra/daemonsets/node-exporter")
        .header("content-type", "application/strategic-merge-patch+json")
        .body(
            serde_json::to_vec(&json!({"spec": {"template": {"spec": {"containers": [
                {"name": "node-exporter", "image": "example.com/node-exporter:0.9"}]}}}}))
            .expect("json"),
        )
        .expect("request");
    env.client
        .request::<serde_json::Value>(req)
        .await
        .expect("patch by hand");
    let store = env.store();
    wait_for("a drift row", Duration::from_secs(30), || async {
        let h = store.history(Some(&k), 10).await.ok()?;
        h.iter()
            .any(|d| d.outcome == DeployOutcome::Drift)
            .then_some(())
    })
    .await;
    wait_for("healed", Duration::from_secs(30), || async {
        (env.workload_image("daemonset", "infra", "node-exporter")
            .await
            == "example.com/node-exporter:1.1")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_as_undo_works_for_a_statefulset() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "statefulset",
        "data",
        "queue",
        &[("queue", "example.com/queue:3.0")],
        json!({"replicas": 2}),
    )
    .await;
    env.write_dep("queue_data.dep", "3.1\n");
    let _daemon = env.daemon(&[]).await;
    let k = key("queue", "data");
    wait_record(&env, "3.1 deployed", &k, |r| {
        r.status == ServiceStatus::Succeeded && r.deployed.to_string().ends_with(":3.1")
    })
    .await;
    env.write_dep("queue_data.dep", "3.2\n");
    wait_record(&env, "3.2 deployed", &k, |r| {
        r.status == ServiceStatus::Succeeded && r.deployed.to_string().ends_with(":3.2")
    })
    .await;
    // Undo: the file goes back to the previous version, and the StatefulSet follows.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["rollback", "data/queue", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("rollback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_record(&env, "3.1 again", &k, |r| {
        r.status == ServiceStatus::Succeeded && r.deployed.to_string().ends_with(":3.1")
    })
    .await;
    assert_eq!(
        env.workload_image("statefulset", "data", "queue").await,
        "example.com/queue:3.1"
    );
    let file = std::fs::read_to_string(env.deps.join("queue_data.dep")).expect("file");
    assert!(file.trim_end().ends_with("3.1"), "{file}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_after_a_statefulset_s_rollback_patch_still_frees_the_stuck_pod() {
    let env = Env::new(SimConfig {
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    env.workload(
        "statefulset",
        "data",
        "db",
        &[("db", "example.com/db:16.0")],
        json!({}),
    )
    .await;
    env.write_dep("db_data.dep", "16.0\n");
    let daemon = env.daemon(&[]).await;
    let db = key("db", "data");
    wait_record(&env, "adopted", &db, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    env.write_dep("db_data.dep", "16.1-crash\n");
    wait_for(
        "the rollout to fail (then kill -9 at once)",
        Duration::from_secs(60),
        || async { daemon.log_text().contains("rollout failed").then_some(()) },
    )
    .await;
    daemon.kill();
    // The rollback's patch landed just before the stop (written here when it had not yet): the
    // next start only has to await the rollback, and the crash-looping pod still holds it.
    let restored = "example.com/db:16.0";
    if env.workload_image("statefulset", "data", "db").await != restored {
        let req = http::Request::patch("/apis/apps/v1/namespaces/data/statefulsets/db")
            .header("content-type", "application/strategic-merge-patch+json")
            .body(
                serde_json::to_vec(&json!({"spec": {"template": {"spec": {"containers": [
                    {"name": "db", "image": restored}]}}}}))
                .expect("json"),
            )
            .expect("request");
        env.client
            .request::<serde_json::Value>(req)
            .await
            .expect("the rollback's patch");
    }
    let daemon = env.daemon(&[]).await;
    let r = wait_record(&env, "the interrupted rollback finished", &db, |r| {
        r.status == ServiceStatus::RolledBack
    })
    .await;
    assert!(r.pinned().is_some(), "the failed version stays pinned");
    wait_for(
        "every pod back on 16.0 and ready",
        Duration::from_secs(30),
        || async {
            let st = status_of(&env, "statefulset", "data", "db").await;
            (st["readyReplicas"] == 3 && st["currentRevision"] == st["updateRevision"])
                .then_some(())
        },
    )
    .await;
    assert!(
        daemon.log_text().contains("forced rollback"),
        "the restarted daemon freed the stuck pod: {}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_starting_pod_of_the_previous_version_survives_a_newer_deploy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let scenario = dir.path().join("scenario.yaml");
    // `slow` pods take 4 s to get ready, as a database replaying its log does.
    std::fs::write(
        &scenario,
        "rules:\n- {match: slow, behaviour: ready, readyDelay: 4s}\n- {match: crash, behaviour: crash}\n",
    )
    .expect("scenario");
    let env = Env::new(SimConfig {
        scenario: Some(scenario),
        ..SimConfig::default()
    })
    .await;
    env.workload(
        "statefulset",
        "data",
        "db",
        &[("db", "example.com/db:16.0")],
        json!({}),
    )
    .await;
    let _daemon = env.daemon(&[]).await;
    env.write_dep("db_data.dep", "16.1-slow\n");
    // The highest ordinal is recreated on 16.1-slow and is starting: a newer version arrives.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "data");
    wait_for(
        "a 16.1-slow pod starting",
        Duration::from_secs(30),
        || async {
            let list = pods.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|p| {
                    let image = p.spec.as_ref().map(|s| s.containers[0].image.clone());
                    let ready = p
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| {
                            c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        });
                    image == Some(Some("example.com/db:16.1-slow".into())) && !ready
                })
                .then_some(())
        },
    )
    .await;
    env.write_dep("db_data.dep", "16.2\n");
    let db = key("db", "data");
    wait_record(&env, "16.2 deployed", &db, |r| {
        r.status == ServiceStatus::Succeeded && r.deployed.to_string().contains("16.2")
    })
    .await;
    let deleted = common::audit_count(&env.audit, |l| {
        l["method"] == "DELETE" && l["path"].as_str().is_some_and(|p| p.contains("/pods/"))
    });
    assert_eq!(
        deleted, 0,
        "no starting pod was deleted by a forward deploy"
    );
    let st = status_of(&env, "statefulset", "data", "db").await;
    assert_eq!(st["readyReplicas"], 3, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_deleted_outside_depwatch_is_missing_and_deployed_to_when_recreated() {
    use k8s_openapi::api::apps::v1::Deployment;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let _daemon = env.daemon(&[]).await;
    let web = key("web", "shop");
    wait_record(&env, "1.1 deployed", &web, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    let told = env.wait_messages(1).await.len();
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), "shop");
    deployments
        .delete("web", &Default::default())
        .await
        .expect("delete");
    let r = wait_record(&env, "web missing", &web, |r| {
        r.status == ServiceStatus::Missing
    })
    .await;
    assert!(
        r.message.contains("deleted outside depwatch"),
        "{}",
        r.message
    );
    let history = env.store().history(Some(&web), 5).await.expect("history");
    assert_eq!(history[0].outcome, DeployOutcome::Missing);
    let messages = env.wait_messages(told + 1).await;
    assert!(
        common::daemon::text(&messages[told]).contains("missing"),
        "{messages:?}"
    );
    // Recreated (on its old image, as a re-install would): the file's version goes back on.
    env.deployment("shop", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let r = wait_record(&env, "web back on 1.1", &web, |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.deployed.to_string(), "web=example.com/web:1.1");
    env.wait_image("shop", "web", "example.com/web:1.1").await;
    let rows = env.store().history(Some(&web), 10).await.expect("history");
    assert_eq!(
        rows.iter()
            .filter(|h| h.outcome == DeployOutcome::Missing)
            .count(),
        1,
        "one row for one deletion"
    );
}
