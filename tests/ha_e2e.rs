//! High availability: two daemons on one PostgreSQL record compete for a Lease; the leader is
//! killed with SIGKILL in the middle of a burst; the standby takes over and every change is
//! deployed exactly once.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::ServiceKey;
use depwatch::sim::SimConfig;
use depwatch::store::Store;

const SERVICES: usize = 20;

fn name(i: usize) -> String {
    format!("svc-{i:02}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_a_killed_leader_and_each_change_deploys_once() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("ha").await;
    let env = Env::new(SimConfig::default()).await;
    for i in 0..SERVICES {
        let n = name(i);
        env.deployment("prod", &n, &[(&n, &format!("example.com/{n}:1.0.0"))], 1)
            .await;
        env.write_dep(&format!("{n}_prod.dep"), "1.0.0\n");
    }
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, "ci:tok-ha-0123456789\n").expect("tokens");
    let replica = |state: &str| {
        let mut args = env.replica_args(state);
        args.extend(["--api-token-file".to_string(), tokens.display().to_string()]);
        args
    };
    let db = [("DEPWATCH_DATABASE_URL", url.clone())];
    let binary = [env!("CARGO_BIN_EXE_depwatch")];
    let leader = env
        .daemon_via(&binary, &replica("state-a"), &db, env.dir.path())
        .await;
    assert!(leader.log_text().contains("holds the Lease"));
    let standby = env.spawn_via(&binary, &replica("state-b"), &db, env.dir.path());
    wait_for(
        "the second replica to stand by",
        Duration::from_secs(30),
        || async {
            standby
                .log_text()
                .contains("standby: waiting")
                .then_some(())
        },
    )
    .await;
    let store = {
        let url = url.clone();
        Store::connect(&url).await.expect("connect")
    };
    let all_at = |version: &'static str| {
        let store = store.clone();
        async move {
            for i in 0..SERVICES {
                let key = ServiceKey::new(&name(i), "prod").expect("key");
                let done = store.service(&key).await.ok().flatten().is_some_and(|r| {
                    r.status.as_str() == "succeeded" && r.deployed.to_string().contains(version)
                });
                if !done {
                    return None;
                }
            }
            Some(())
        }
    };
    wait_for(
        "the fleet adopted at 1.0.0",
        Duration::from_secs(30),
        || all_at("1.0.0"),
    )
    .await;
    assert_eq!(env.all_patches(), 0, "adoption patches nothing");
    assert!(
        !standby.log_text().contains("holds the Lease"),
        "the standby does not act while the leader lives"
    );
    // The standby serves reads (ready), says it does not lead, and its watches are warm.
    let http = reqwest::Client::new();
    let standby_url = standby.http_url();
    wait_for(
        "the standby's watches to run",
        Duration::from_secs(30),
        || async {
            let m = common::get_metrics(&http, &standby_url).await;
            (common::sample(
                &m,
                "depwatch_kubernetes_requests_total{verb=\"watch\",code=\"200\"}",
            ) > 0.0)
                .then_some(())
        },
    )
    .await;
    // The probes a rolling update of two replicas depends on: each replica is ready (so a
    // new pod, a standby, becomes ready and the update goes on); only one leads.
    for (url, leads) in [(&standby_url, false), (&leader.http_url(), true)] {
        let ready = http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .expect("readyz");
        assert_eq!(ready.status().as_u16(), 200, "{url}");
        let leader_probe = http
            .get(format!("{url}/leaderz"))
            .send()
            .await
            .expect("leaderz");
        assert_eq!(leader_probe.status().is_success(), leads, "{url}");
        if !leads {
            assert!(leader_probe.text().await.expect("body").contains("standby"));
        }
    }
    // Changes sent to a standby are refused with where to send them; nothing is written.
    let r = http
        .post(format!(
            "{standby_url}/api/v1/services/prod/{}/suspend",
            name(0)
        ))
        .bearer_auth("tok-ha-0123456789")
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.text().await.expect("body").contains("/leaderz"));
    let services: serde_json::Value = http
        .get(format!("{standby_url}/api/v1/services"))
        .send()
        .await
        .expect("services")
        .json()
        .await
        .expect("json");
    assert_eq!(
        services.as_array().map(Vec::len),
        Some(SERVICES),
        "the standby reads the shared record"
    );

    // A burst; the leader dies in the middle of it.
    for i in 0..SERVICES {
        env.write_dep(&format!("{}_prod.dep", name(i)), "1.1.0\n");
    }
    wait_for(
        "the burst to be under way",
        Duration::from_secs(30),
        || async { (env.all_patches() >= 3).then_some(()) },
    )
    .await;
    leader.kill();
    wait_for(
        "the standby to take over",
        Duration::from_secs(30),
        || async { standby.log_text().contains("holds the Lease").then_some(()) },
    )
    .await;
    wait_for("every change deployed", Duration::from_secs(60), || {
        all_at("1.1.0")
    })
    .await;
    for i in 0..SERVICES {
        let n = name(i);
        assert_eq!(
            env.image("prod", &n).await,
            format!("example.com/{n}:1.1.0")
        );
        assert_eq!(env.patches("prod", &n), 1, "{n} patched exactly once");
        // One row for one save, whichever replica finished it (no `unchanged` row beside the
        // `succeeded` one when the standby finds the save already deployed).
        let key = ServiceKey::new(&n, "prod").expect("key");
        let rows = store.history(Some(&key), 50).await.expect("history");
        let burst: Vec<_> = rows
            .iter()
            .filter(|r| r.to_image.contains("1.1.0"))
            .map(|r| r.outcome.as_str())
            .collect();
        assert_eq!(burst, ["succeeded"], "{n}: one row for one save");
    }
    standby.stop();
}
