//! The seams between two steps, through the real binary: a crash between the pin and the
//! rollback's patch, an outside change during depwatch's own rollout, and a leader frozen past
//! its Lease. After each, the record, the cluster and the history agree.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::{DeployOutcome, ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use depwatch::store::Store;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

fn web() -> ServiceKey {
    ServiceKey::new("web", "prod").expect("key")
}

/// `kubectl set image` as another client would send it.
async fn set_image_outside(env: &Env, image: &str) {
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), "prod");
    let body =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "web", "image": image}]}}}});
    api.patch(
        "web",
        &PatchParams {
            field_manager: Some("kubectl-set".into()),
            ..PatchParams::default()
        },
        &Patch::Strategic(&body),
    )
    .await
    .expect("outside patch");
}

/// A status of `key` in the SQLite record at `state`, as a fresh reader sees it.
async fn status(env: &Env) -> Option<(ServiceStatus, String)> {
    let store = Store::open_read_only(&env.state).ok()?;
    let r = store.service(&web()).await.ok()??;
    Some((r.status, r.failed_hash.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_pin_and_the_rollback_is_finished_at_the_next_start() {
    let env = Env::new(SimConfig {
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&[]).await;
    wait_for(
        "the first version recorded",
        Duration::from_secs(30),
        || async {
            status(&env)
                .await
                .filter(|(s, _)| *s == ServiceStatus::Succeeded)
                .map(|_| ())
        },
    )
    .await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    // Killed once the rollback's intent is in the record: it is written before the rollback's
    // PATCH, which the simulated API server's latency keeps from landing for 300 ms. (The log
    // line alone comes a moment before the intent is written: a kill right after it could
    // land before the write, which is no crash between the pin and the rollback.)
    wait_for(
        "the rollout to fail and the rollback's intent recorded (then kill -9 at once)",
        Duration::from_secs(60),
        || async {
            if !daemon.log_text().contains("rollout failed") {
                return None;
            }
            let store = Store::open_read_only(&env.state).ok()?;
            let open = store.interrupted().await.ok()?;
            open.iter().any(|d| !d.restore.is_empty()).then_some(())
        },
    )
    .await;
    daemon.kill();
    // The crash left the crashing image running, pinned, with the deploy in progress.
    let store = env.store();
    let unfinished = store.interrupted().await.expect("q");
    assert_eq!(unfinished.len(), 1, "{unfinished:?}");
    assert_eq!(
        unfinished[0].restore, "web=r.example/web:1.0",
        "the rollback's intent was recorded before its patch"
    );
    drop(store);

    let daemon = env.daemon(&[]).await;
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let store = env.store();
    wait_for(
        "the interrupted rollback's row finished",
        Duration::from_secs(60),
        || async { store.interrupted().await.ok()?.is_empty().then_some(()) },
    )
    .await;
    let r = store.service(&web()).await.expect("q").expect("row");
    assert_eq!(r.status, ServiceStatus::RolledBack, "{}", daemon.log_text());
    assert!(r.pinned().is_some(), "the failed version stays pinned");
    let h = store.history(Some(&web()), 10).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::RolledBack, "{h:?}");
    assert_eq!(h[0].to_image, "web=r.example/web:crash-2.0");
    assert_eq!(
        h.iter()
            .filter(|d| d.to_image.contains("crash-2.0"))
            .count(),
        1,
        "one row for one save: {h:?}"
    );
    assert!(daemon
        .log_text()
        .contains("a rollback was interrupted by a stop"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_change_during_a_rollout_is_drift_never_a_verdict_and_is_healed() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&["--self-heal"]).await;
    wait_for(
        "the first version recorded",
        Duration::from_secs(30),
        || async {
            status(&env)
                .await
                .filter(|(s, _)| *s == ServiceStatus::Succeeded)
                .map(|_| ())
        },
    )
    .await;
    env.write_dep("web_prod.dep", "2.0\n");
    wait_for("depwatch's patch", Duration::from_secs(30), || async {
        (env.patches("prod", "web") >= 1).then_some(())
    })
    .await;
    // Someone else sets a crashing image while depwatch's rollout is under way.
    set_image_outside(&env, "r.example/web:crash-evil").await;
    let store = env.store();
    let row = wait_for(
        "the rollout ended as changed outside depwatch",
        Duration::from_secs(30),
        || async {
            store
                .history(Some(&web()), 20)
                .await
                .ok()?
                .into_iter()
                .find(|d| d.to_image == "web=r.example/web:2.0" && d.ended_at.is_some())
        },
    )
    .await;
    assert_eq!(
        row.outcome,
        DeployOutcome::ChangedOutside,
        "{row:?}\n{}",
        daemon.log_text()
    );
    assert!(row.message.contains("crash-evil"), "{}", row.message);
    // Never blamed: depwatch's own version is not pinned for the outside image's crash.
    let r = store.service(&web()).await.expect("q").expect("row");
    assert!(r.pinned().is_none(), "{r:?}");
    // Drift recorded, and healed back to what the file asks for.
    env.wait_image("prod", "web", "r.example/web:2.0").await;
    wait_for("the healed deploy", Duration::from_secs(60), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Succeeded && r.deployed.to_string() == "web=r.example/web:2.0")
            .then_some(())
    })
    .await;
    let h = store.history(Some(&web()), 20).await.expect("history");
    assert!(
        h.iter()
            .any(|d| d.outcome == DeployOutcome::Drift && d.to_image.contains("crash-evil")),
        "a drift row names the outside image: {h:?}"
    );
    assert!(
        !h.iter().any(|d| d.outcome == DeployOutcome::Succeeded
            && d.to_image == "web=r.example/web:2.0"
            && d.id == row.id),
        "no healthy verdict on a template depwatch did not write"
    );
}

/// The shared record, opened off the async workers.
async fn shared_record(url: &str) -> Store {
    let url = url.to_string();
    Store::connect(&url).await.expect("connect")
}

/// web's row, when its status is `want`.
async fn service_is(store: &Store, want: ServiceStatus) -> Option<depwatch::store::ServiceRecord> {
    let r = store.service(&web()).await.ok()??;
    (r.status == want).then_some(r)
}

fn replica(env: &Env, state: &str) -> Vec<String> {
    let mut args = env.replica_args(state);
    args.extend(["--debounce", "50ms"].map(String::from));
    args
}

/// web at 1.0 deployed by a leader (state-a) with a standby (state-b) waiting, both on the
/// shared record at `url`.
async fn leader_and_standby(
    env: &Env,
    url: &str,
) -> (common::daemon::Daemon, common::daemon::Daemon, Store) {
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let db = [("DEPWATCH_DATABASE_URL", url.to_string())];
    let binary = [env!("CARGO_BIN_EXE_depwatch")];
    let old = env
        .daemon_via(&binary, &replica(env, "state-a"), &db, env.dir.path())
        .await;
    let new = env.spawn_via(&binary, &replica(env, "state-b"), &db, env.dir.path());
    wait_for("a standby", Duration::from_secs(30), || async {
        new.log_text().contains("standby: waiting").then_some(())
    })
    .await;
    let store = shared_record(url).await;
    wait_for("the first version", Duration::from_secs(30), || {
        service_is(&store, ServiceStatus::Succeeded)
    })
    .await;
    (old, new, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_writes_nothing_when_it_wakes() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("fence").await;
    let env = Env::new(SimConfig::default()).await;
    let (old, new, store) = leader_and_standby(&env, &url).await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for("the leader's patch", Duration::from_secs(30), || async {
        old.log_text()
            .contains("patched; waiting for the rollout")
            .then_some(())
    })
    .await;
    old.signal("STOP");
    // The standby takes over, finishes the frozen leader's deploy, then deploys a new version.
    wait_for("the takeover", Duration::from_secs(30), || async {
        new.log_text().contains("holds the Lease").then_some(())
    })
    .await;
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    wait_for("the crash rolled back", Duration::from_secs(60), || {
        service_is(&store, ServiceStatus::RolledBack)
    })
    .await;
    env.write_dep("web_prod.dep", "9.0.0\n");
    env.wait_image("prod", "web", "r.example/web:9.0.0").await;
    wait_for("9.0.0 healthy", Duration::from_secs(60), || {
        service_is(&store, ServiceStatus::Succeeded)
    })
    .await;
    let patches = env.patches("prod", "web");
    let rows = store
        .history(Some(&web()), 50)
        .await
        .expect("history")
        .len();

    old.signal("CONT");
    let log = old.log.clone();
    let exit = old.exit_status(Duration::from_secs(30)).await;
    let text = common::daemon::read(&log);
    assert!(
        !exit.success(),
        "a replica that lost its Lease exits non-zero\n{text}"
    );
    assert!(text.contains("Lease"), "{text}");
    // Not one write after the Lease was lost: no PATCH, no history row, no pin.
    assert_eq!(env.patches("prod", "web"), patches, "{text}");
    assert_eq!(env.image("prod", "web").await, "r.example/web:9.0.0");
    let r = store.service(&web()).await.expect("q").expect("row");
    assert_eq!(r.status, ServiceStatus::Succeeded, "{r:?}\n{text}");
    assert!(r.pinned().is_none(), "{r:?}");
    assert_eq!(
        store
            .history(Some(&web()), 50)
            .await
            .expect("history")
            .len(),
        rows,
        "{text}"
    );
    drop(new);
}

/// Wait until `/readyz` is 503 naming the record and the writes it keeps in memory.
async fn readyz_names_the_record(http: &str) {
    let ready = wait_for(
        "/readyz to name the record",
        Duration::from_secs(30),
        || async {
            let resp = reqwest::get(format!("{http}/readyz")).await.ok()?;
            let code = resp.status().as_u16();
            let body = resp.text().await.ok()?;
            (code == 503 && body.contains("record")).then_some(body)
        },
    )
    .await;
    assert!(ready.contains("kept in memory"), "{ready}");
}

/// After a record outage is replayed, a resync sees the pin: the failed version is not
/// deployed again (the deploy and its rollback are the only PATCHes).
async fn pin_holds_after_the_replay(env: &Env, daemon: &common::daemon::Daemon) {
    let seen = daemon.log_text().len();
    wait_for(
        "a resync after the replay",
        Duration::from_secs(30),
        || async {
            daemon.log_text()[seen..]
                .contains("pinned until it changes")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        env.patches("prod", "web"),
        2,
        "the deploy and its rollback only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_outage_keeps_every_write_and_replays_it_in_order() {
    let mut pg = common::postgres::Postgres::start().await;
    let url = pg.database("outage").await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let mut args = env.run_args();
    args.extend(
        [
            "--slack-webhook",
            &env.slack_url,
            "--debounce",
            "50ms",
            "--resync",
            "1s",
        ]
        .map(String::from),
    );
    let db = [("DEPWATCH_DATABASE_URL", url.clone())];
    let daemon = env.daemon_with(&args, &db, env.dir.path()).await;
    let store = shared_record(&url).await;
    wait_for("the first version", Duration::from_secs(30), || {
        service_is(&store, ServiceStatus::Succeeded)
    })
    .await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for("the patch", Duration::from_secs(30), || async {
        daemon
            .log_text()
            .contains("patched; waiting for the rollout")
            .then_some(())
    })
    .await;
    // The record goes away while the rollout fails: pin, rollback and verdict are kept.
    pg.stop();
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let http = daemon.http_url();
    readyz_names_the_record(&http).await;
    let metrics = common::get_text(&format!("{http}/metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("depwatch_record_pending_writes ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    // The page says the record cannot be read, not that there are no services.
    let page = common::get_text(&format!("{http}/")).await;
    assert!(page.contains("The record cannot be read"), "{page}");
    assert!(!page.contains("No services yet"), "{page}");

    pg.restart().await;
    let r = wait_for("the kept writes replayed", Duration::from_secs(60), || {
        service_is(&store, ServiceStatus::RolledBack)
    })
    .await;
    assert!(r.pinned().is_some(), "the pin survived the outage: {r:?}");
    wait_for("/readyz ok again", Duration::from_secs(30), || async {
        let resp = reqwest::get(format!("{http}/readyz")).await.ok()?;
        (resp.status().as_u16() == 200).then_some(())
    })
    .await;
    let h = store.history(Some(&web()), 10).await.expect("history");
    if h[0].outcome != DeployOutcome::RolledBack {
        eprintln!("LOG {}", daemon.log_text());
    }
    assert_eq!(h[0].outcome, DeployOutcome::RolledBack, "{h:?}");
    assert_eq!(h[0].restore, "web=r.example/web:1.0");
    assert!(store.interrupted().await.expect("q").is_empty());
    pin_holds_after_the_replay(&env, &daemon).await;
    // depwatch's own rollback was never reported as drift.
    assert!(
        !env.messages()
            .iter()
            .any(|m| common::daemon::text(m).contains("drift")),
        "{:?}",
        env.messages()
    );
    assert!(!store
        .history(Some(&web()), 10)
        .await
        .expect("history")
        .iter()
        .any(|d| d.outcome == DeployOutcome::Drift));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_file_during_a_retried_rollback_waits_for_the_rollback_then_deploys() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&[]).await;
    let store = env.store();
    wait_for("the first version", Duration::from_secs(30), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Succeeded).then_some(())
    })
    .await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for("the patch", Duration::from_secs(60), || async {
        daemon
            .log_text()
            .contains("patched; waiting for the rollout")
            .then_some(())
    })
    .await;
    // From now every write conflicts: the rollback's patch is retried; meanwhile a newer
    // version arrives.
    env.sim.faults().set_conflict_rate(1.0);
    wait_for("the rollout to fail", Duration::from_secs(60), || async {
        daemon.log_text().contains("rollout failed").then_some(())
    })
    .await;
    wait_for("the rollback retried", Duration::from_secs(30), || async {
        daemon
            .log_text()
            .contains("retrying with backoff")
            .then_some(())
    })
    .await;
    let seen = daemon.log_text().matches("new desired version").count();
    env.write_dep("web_prod.dep", "2.3.0\n");
    wait_for(
        "the newer version seen",
        Duration::from_secs(30),
        || async {
            (daemon.log_text().matches("new desired version").count() > seen).then_some(())
        },
    )
    .await;
    env.sim.faults().set_conflict_rate(0.0);
    env.wait_image("prod", "web", "r.example/web:2.3.0").await;
    wait_for(
        "2.3.0 healthy in the record",
        Duration::from_secs(60),
        || async {
            let r = store.service(&web()).await.ok()??;
            (r.status == ServiceStatus::Succeeded
                && r.deployed.to_string() == "web=r.example/web:2.3.0")
                .then_some(())
        },
    )
    .await;
    let h = store.history(Some(&web()), 20).await.expect("history");
    assert!(
        !h.iter().any(|d| d.message.contains("internal error")),
        "{h:?}"
    );
    let crash: Vec<_> = h
        .iter()
        .filter(|d| d.to_image.contains("crash-2.0"))
        .collect();
    assert_eq!(crash.len(), 1, "one row for one save: {h:?}");
    assert_eq!(crash[0].outcome, DeployOutcome::RolledBack, "{h:?}");
    assert!(store.interrupted().await.expect("q").is_empty());
}

/// A tmpfs of `size` mounted at `at`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` when this process may not mount (not root, or no CAP_SYS_ADMIN).
    fn mount(at: &std::path::Path, size: &str) -> Option<Tmpfs> {
        if !common::root_or_skip("mounting a small tmpfs as the state directory") {
            return None;
        }
        std::fs::create_dir_all(at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fill the file system holding `dir` with one file, to the last byte it takes.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    for chunk in [65_536usize, 4_096, 512, 1] {
        let block = vec![0u8; chunk];
        while f.write_all(&block).is_ok() {}
    }
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_disk_keeps_every_write_and_replays_it_when_there_is_room() {
    let env = Env::new(SimConfig::default()).await;
    let Some(_disk) = Tmpfs::mount(&env.state, "4m") else {
        // Said by Tmpfs::mount; the PostgreSQL outage test above covers the outbox everywhere.
        return;
    };
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&["--resync", "1s"]).await;
    wait_for("the first version", Duration::from_secs(30), || async {
        status(&env)
            .await
            .filter(|(s, _)| *s == ServiceStatus::Succeeded)
            .map(|_| ())
    })
    .await;
    let filler = fill(&env.state);
    env.write_dep("web_prod.dep", "crash-2.0\n");
    env.wait_image("prod", "web", "r.example/web:crash-2.0")
        .await;
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let http = daemon.http_url();
    readyz_names_the_record(&http).await;
    // Room again: everything kept is written, in order.
    std::fs::remove_file(&filler).expect("free the disk");
    wait_for(
        "the kept writes replayed",
        Duration::from_secs(30),
        || async {
            let resp = reqwest::get(format!("{http}/readyz")).await.ok()?;
            (resp.status().as_u16() == 200).then_some(())
        },
    )
    .await;
    let store = Store::open_read_only(&env.state).expect("record");
    let r = store.service(&web()).await.expect("q").expect("row");
    assert_eq!(r.status, ServiceStatus::RolledBack, "{r:?}");
    assert!(r.pinned().is_some(), "the pin survived: {r:?}");
    let h = store.history(Some(&web()), 10).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::RolledBack, "{h:?}");
    assert!(store.interrupted().await.expect("q").is_empty());
    pin_holds_after_the_replay(&env, &daemon).await;
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_finishes_the_rollback_a_killed_leader_left_half_done() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("takeover").await;
    let env = Env::new(SimConfig {
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let (old, new, store) = leader_and_standby(&env, &url).await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for(
        "the rollout to fail (then kill -9 the leader at once)",
        Duration::from_secs(60),
        || async { old.log_text().contains("rollout failed").then_some(()) },
    )
    .await;
    old.kill();
    wait_for("the takeover", Duration::from_secs(30), || async {
        new.log_text().contains("holds the Lease").then_some(())
    })
    .await;
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let r = wait_for("the rollback finished", Duration::from_secs(60), || {
        service_is(&store, ServiceStatus::RolledBack)
    })
    .await;
    assert!(r.pinned().is_some(), "{r:?}");
    wait_for(
        "no row left in progress",
        Duration::from_secs(30),
        || async { store.interrupted().await.ok()?.is_empty().then_some(()) },
    )
    .await;
    let h = store.history(Some(&web()), 20).await.expect("history");
    let crash: Vec<_> = h
        .iter()
        .filter(|d| d.to_image.contains("crash-2.0"))
        .collect();
    assert_eq!(crash.len(), 1, "one row for one save: {h:?}");
    assert_eq!(crash[0].outcome, DeployOutcome::RolledBack, "{h:?}");
    drop(new);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_queued_at_shutdown_is_still_delivered() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 1)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&[]).await;
    wait_for("the first version", Duration::from_secs(30), || async {
        status(&env)
            .await
            .filter(|(s, _)| *s == ServiceStatus::Succeeded)
            .map(|_| ())
    })
    .await;
    let before = env.messages().len();
    env.write_dep("web_prod.dep", "2.0\n");
    wait_for("the healthy verdict", Duration::from_secs(30), || async {
        daemon.log_text().contains("rollout healthy").then_some(())
    })
    .await;
    // Stopped the moment the report is queued: it still goes out before the process ends.
    daemon.stop();
    let got = env.messages();
    assert!(
        got[before..]
            .iter()
            .any(|m| common::daemon::text(m).contains("2.0")),
        "{got:?}"
    );
}

// A rollout depwatch started is finished by depwatch, whatever comes after it: a newer
// version that is never patched (refused at plan, pinned, its file deleted, its workload now
// another kind) leaves the failing rollout to be judged, rolled back and pinned on its own row.

/// depwatch on web 1.0, healthy and recorded. Crash verdicts are slow (6 restarts), so a newer
/// save always lands while the crash rollout is still being judged.
async fn on_1_0(env: &Env, extra: &[&str]) -> (common::daemon::Daemon, Store) {
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let mut args = vec!["--crash-restarts", "6"];
    args.extend_from_slice(extra);
    let daemon = env.daemon(&args).await;
    let store = env.store();
    wait_for("the first version", Duration::from_secs(30), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Succeeded).then_some(())
    })
    .await;
    (daemon, store)
}

/// Save `crash-3.0` and wait for depwatch's patch of it.
async fn crash_patched(env: &Env, daemon: &common::daemon::Daemon) {
    let before = daemon
        .log_text()
        .matches("patched; waiting for the rollout")
        .count();
    env.write_dep("web_prod.dep", "crash-3.0\n");
    wait_for(
        "the crash version patched",
        Duration::from_secs(30),
        || async {
            let now = daemon
                .log_text()
                .matches("patched; waiting for the rollout")
                .count();
            (now > before).then_some(())
        },
    )
    .await;
}

/// The crash-3.0 rollout's row, once it has ended.
async fn crash_row_finished(store: &Store) -> depwatch::store::DeployRecord {
    wait_for(
        "the crash row finished",
        Duration::from_secs(90),
        || async {
            store
                .history(Some(&web()), 20)
                .await
                .ok()?
                .into_iter()
                .find(|d| d.to_image.contains("crash-3.0") && d.ended_at.is_some())
        },
    )
    .await
}

/// Every case ends so: the cluster back on 1.0, the crash rollout's one row rolled back, a pin
/// on `pinned` (the crash's own content, or the file's when that is pinned already), no row
/// left open, and no drift row blaming depwatch's own patch.
async fn crash_finished(
    env: &Env,
    store: &Store,
    daemon: &common::daemon::Daemon,
    handed_over: bool,
    pinned: &[u8],
) -> Vec<depwatch::store::DeployRecord> {
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let crash = |h: &[depwatch::store::DeployRecord]| -> Vec<depwatch::store::DeployRecord> {
        h.iter()
            .filter(|d| d.to_image.contains("crash-3.0"))
            .cloned()
            .collect()
    };
    wait_for(
        "the crash rollout's row finished",
        Duration::from_secs(90),
        || async {
            let h = store.history(Some(&web()), 50).await.ok()?;
            let rows = crash(&h);
            (rows.len() == 1
                && rows[0].ended_at.is_some()
                && store.interrupted().await.ok()?.is_empty())
            .then_some(())
        },
    )
    .await;
    let h = store.history(Some(&web()), 50).await.expect("history");
    let log = daemon.log_text();
    assert_eq!(
        crash(&h)[0].outcome,
        DeployOutcome::RolledBack,
        "{h:?}\n{log}"
    );
    assert!(
        !h.iter().any(|d| d.outcome == DeployOutcome::Drift),
        "depwatch's own patch is never drift: {h:?}"
    );
    let r = store.service(&web()).await.expect("q").expect("row");
    assert_eq!(
        r.failed_hash,
        depwatch::pipeline::ingest::content_hash(pinned),
        "the crash version is pinned by its own content, unless the file's is: {r:?}"
    );
    assert_eq!(r.deployed.to_string(), "web=r.example/web:1.0", "{r:?}");
    assert!(
        !handed_over || log.contains("its deploy takes this rollout over"),
        "the crash rollout was handed over, not judged before the newer save: {log}"
    );
    assert!(
        log.contains("finishing the rollout it was to replace"),
        "the newer version's deploy finished it: {log}"
    );
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_superseded_by_a_version_refused_at_plan_is_still_rolled_back() {
    let env = Env::new(SimConfig::default()).await;
    let (daemon, store) = on_1_0(&env, &[]).await;
    crash_patched(&env, &daemon).await;
    // The newer version names a StatefulSet there is none of: refused at plan.
    env.write_dep("web_prod.dep", "kind: statefulset\nversion: 3.1\n");
    let h = crash_finished(&env, &store, &daemon, true, b"crash-3.0\n").await;
    assert!(
        h.iter()
            .any(|d| d.to_image == "3.1" && d.outcome == DeployOutcome::Failed),
        "the refused version has its own failed row: {h:?}"
    );
    assert!(!env
        .images("prod", "web")
        .await
        .iter()
        .any(|(_, i)| i.contains("3.1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_left_by_kill_9_is_rolled_back_when_the_file_returns_to_a_pinned_version()
{
    let env = Env::new(SimConfig::default()).await;
    let (daemon, store) = on_1_0(&env, &[]).await;
    // crash-2.0 fails and is pinned.
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for("crash-2.0 rolled back", Duration::from_secs(90), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::RolledBack).then_some(())
    })
    .await;
    drop(store);
    crash_patched(&env, &daemon).await;
    daemon.kill();
    // While depwatch is down, back to the pinned version: skipped, never patched.
    env.write_dep("web_prod.dep", "crash-2.0\n");
    let daemon = env.daemon(&["--crash-restarts", "6"]).await;
    let store = env.store();
    let h = crash_finished(&env, &store, &daemon, false, b"crash-2.0\n").await;
    assert_eq!(
        h.iter()
            .filter(|d| d.to_image.contains("crash-2.0"))
            .count(),
        1,
        "{h:?}"
    );
    assert_eq!(env.image("prod", "web").await, "r.example/web:1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_whose_file_is_deleted_is_still_rolled_back() {
    let env = Env::new(SimConfig::default()).await;
    let (daemon, store) = on_1_0(&env, &[]).await;
    crash_patched(&env, &daemon).await;
    std::fs::remove_file(env.deps.join("web_prod.dep")).expect("rm");
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let row = crash_row_finished(&store).await;
    assert_eq!(row.outcome, DeployOutcome::RolledBack, "{row:?}");
    wait_for("the service let go", Duration::from_secs(30), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Unmanaged).then_some(())
    })
    .await;
    assert!(store.interrupted().await.expect("q").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_left_by_kill_9_is_rolled_back_when_the_file_now_cannot_deploy() {
    let env = Env::new(SimConfig::default()).await;
    let (daemon, store) = on_1_0(&env, &[]).await;
    drop(store);
    crash_patched(&env, &daemon).await;
    daemon.kill();
    // While depwatch is down the file changes to a version refused at plan.
    env.write_dep("web_prod.dep", "kind: statefulset\nversion: 3.1\n");
    let daemon = env.daemon(&["--crash-restarts", "6"]).await;
    let store = env.store();
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let row = crash_row_finished(&store).await;
    assert_eq!(
        row.outcome,
        DeployOutcome::RolledBack,
        "{row:?}\n{}",
        daemon.log_text()
    );
    wait_for("no row open", Duration::from_secs(30), || async {
        store.interrupted().await.ok()?.is_empty().then_some(())
    })
    .await;
    // Started again: nothing new is recorded, and never a drift row.
    daemon.stop();
    let rows = store.history(Some(&web()), 50).await.expect("h").len();
    let daemon = env.daemon(&["--crash-restarts", "6"]).await;
    wait_for("the start-up scan", Duration::from_secs(30), || async {
        daemon
            .log_text()
            .contains("watching for dependency file changes")
            .then_some(())
    })
    .await;
    let h = store.history(Some(&web()), 50).await.expect("h");
    assert!(
        !h.iter().any(|d| d.outcome == DeployOutcome::Drift),
        "{h:?}"
    );
    assert!(
        h.len() <= rows + 1,
        "at most the refused version again: {h:?}"
    );
    assert_eq!(env.image("prod", "web").await, "r.example/web:1.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rollout_on_a_deployment_is_rolled_back_when_the_file_switches_kind() {
    let env = Env::new(SimConfig::default()).await;
    env.workload(
        "statefulset",
        "prod",
        "web",
        &[("web", "r.example/web:1.0")],
        json!({"replicas": 1}),
    )
    .await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    // The file names the Deployment; then the StatefulSet of the same name.
    env.write_dep("web_prod.dep", "kind: deployment\nversion: 1.0\n");
    let daemon = env.daemon(&["--crash-restarts", "6"]).await;
    let store = env.store();
    wait_for("the first version", Duration::from_secs(30), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Succeeded).then_some(())
    })
    .await;
    let before = daemon.log_text().matches("patched; waiting").count();
    env.write_dep("web_prod.dep", "kind: deployment\nversion: crash-3.0\n");
    wait_for("the crash patched", Duration::from_secs(30), || async {
        (daemon.log_text().matches("patched; waiting").count() > before).then_some(())
    })
    .await;
    env.write_dep("web_prod.dep", "kind: statefulset\nversion: 3.1\n");
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    wait_for(
        "the StatefulSet on 3.1",
        Duration::from_secs(60),
        || async {
            let image = env.workload_image("statefulset", "prod", "web").await;
            (image == "r.example/web:3.1").then_some(())
        },
    )
    .await;
    let row = crash_row_finished(&store).await;
    assert_eq!(
        row.outcome,
        DeployOutcome::RolledBack,
        "{row:?}\n{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_recreated_as_another_kind_mid_rollout_is_no_verdict_and_is_deployed_afresh() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let daemon = env.daemon(&["--resync", "2s"]).await;
    let store = env.store();
    wait_for("the first version", Duration::from_secs(30), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::Succeeded).then_some(())
    })
    .await;
    env.write_dep("web_prod.dep", "1.5\n");
    wait_for("1.5 patched", Duration::from_secs(30), || async {
        daemon
            .log_text()
            .contains("patched; waiting for the rollout")
            .then_some(())
    })
    .await;
    // Mid-rollout the Deployment goes, and a StatefulSet of the same name takes its place.
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), "prod");
    api.delete("web", &Default::default())
        .await
        .expect("delete");
    env.workload(
        "statefulset",
        "prod",
        "web",
        &[("web", "r.example/web:1.0")],
        json!({"replicas": 1}),
    )
    .await;
    let row = wait_for("the 1.5 row finished", Duration::from_secs(60), || async {
        store
            .history(Some(&web()), 20)
            .await
            .ok()?
            .into_iter()
            .find(|d| d.to_image == "web=r.example/web:1.5" && d.ended_at.is_some())
    })
    .await;
    assert_eq!(row.outcome, DeployOutcome::Interrupted, "{row:?}");
    assert!(row.message.contains("disappeared"), "{row:?}");
    let r = store.service(&web()).await.expect("q").expect("row");
    assert!(r.failed_hash.is_empty(), "nothing pinned: {r:?}");
    // The resync plans afresh and finds the StatefulSet.
    wait_for(
        "1.5 on the StatefulSet",
        Duration::from_secs(60),
        || async {
            let image = env.workload_image("statefulset", "prod", "web").await;
            (image == "r.example/web:1.5").then_some(())
        },
    )
    .await;
    wait_for(
        "recorded as a StatefulSet",
        Duration::from_secs(60),
        || async {
            let r = store.service(&web()).await.ok()??;
            (r.kind == depwatch::domain::WorkloadKind::StatefulSet
                && r.status == ServiceStatus::Succeeded)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_back_to_a_pinned_version_mid_rollout_is_recorded_at_once() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    let (daemon, store) = on_1_0(&env, &["--resync", "1h"]).await;
    env.write_dep("web_prod.dep", "crash-2.0\n");
    wait_for("crash-2.0 rolled back", Duration::from_secs(90), || async {
        let r = store.service(&web()).await.ok()??;
        (r.status == ServiceStatus::RolledBack).then_some(())
    })
    .await;
    let seen = daemon
        .log_text()
        .matches("patched; waiting for the rollout")
        .count();
    env.write_dep("web_prod.dep", "3.0\n");
    wait_for("3.0 patched", Duration::from_secs(30), || async {
        (daemon
            .log_text()
            .matches("patched; waiting for the rollout")
            .count()
            > seen)
            .then_some(())
    })
    .await;
    // Back to the pinned version while 3.0 rolls out: a row says it was not deployed, at once
    // (not at the next resync, an hour away), and 3.0's rollout is still judged.
    env.write_dep("web_prod.dep", "crash-2.0\n");
    let row = wait_for("the pinned save's row", Duration::from_secs(30), || async {
        store
            .history(Some(&web()), 20)
            .await
            .ok()?
            .into_iter()
            .find(|d| d.to_image == "crash-2.0" && d.outcome == DeployOutcome::Failed)
    })
    .await;
    assert!(row.message.contains("failed before"), "{row:?}");
    let judged = wait_for("3.0 judged", Duration::from_secs(60), || async {
        store
            .history(Some(&web()), 20)
            .await
            .ok()?
            .into_iter()
            .find(|d| d.to_image == "web=r.example/web:3.0" && d.ended_at.is_some())
    })
    .await;
    assert_eq!(judged.outcome, DeployOutcome::Succeeded, "{judged:?}");
    assert_eq!(env.image("prod", "web").await, "r.example/web:3.0");
    let r = store.service(&web()).await.expect("q").expect("row");
    assert!(r.pinned().is_some(), "crash-2.0 stays pinned: {r:?}");
    assert!(store.interrupted().await.expect("q").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_deploy_whose_row_a_full_disk_lost_gets_one_and_the_hang_row_is_not_judged_on_it() {
    let env = Env::new(SimConfig::default()).await;
    let Some(_disk) = Tmpfs::mount(&env.state, "4m") else {
        return; // said by Tmpfs::mount
    };
    let (daemon, store) = on_1_0(&env, &[]).await;
    drop(store);
    // A hang save (its row written), then a full disk, then a crash save (its row only in
    // memory), then kill -9: the crash deploy's row is lost with the process.
    env.write_dep("web_prod.dep", "version: hang-2.0\nrolloutTimeout: 60s\n");
    env.wait_image("prod", "web", "r.example/web:hang-2.0")
        .await;
    let filler = fill(&env.state);
    env.write_dep("web_prod.dep", "crash-3.0\n");
    env.wait_image("prod", "web", "r.example/web:crash-3.0")
        .await;
    daemon.kill();
    std::fs::remove_file(&filler).expect("free the disk");
    let daemon = env.daemon(&["--crash-restarts", "6"]).await;
    env.wait_image("prod", "web", "r.example/web:1.0").await;
    let store = env.store();
    wait_for("no row open", Duration::from_secs(90), || async {
        store.interrupted().await.ok()?.is_empty().then_some(())
    })
    .await;
    let h = store.history(Some(&web()), 20).await.expect("history");
    let log = daemon.log_text();
    let hang = h
        .iter()
        .find(|d| d.to_image.contains("hang-2.0"))
        .expect("the hang row");
    assert_eq!(hang.outcome, DeployOutcome::Superseded, "{h:#?}\n{log}");
    let crash = h
        .iter()
        .find(|d| d.to_image.contains("crash-3.0"))
        .unwrap_or_else(|| panic!("the crash deploy has a row: {h:#?}\n{log}"));
    assert_eq!(crash.outcome, DeployOutcome::RolledBack, "{h:#?}");
    assert!(crash.message.contains("CrashLoopBackOff"), "{crash:?}");
}

/// A TCP path to the record that a test can cut: while cut, bytes sent either way wait (a
/// partition: nothing is refused, nothing answers), and are delivered when it heals.
struct RecordPath {
    addr: std::net::SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RecordPath {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RecordPath {
    async fn start(upstream: std::net::SocketAddr) -> RecordPath {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let open = tokio::sync::watch::channel(true).0;
        let gate = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let gate = gate.subscribe();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (a_read, a_write) = inbound.into_split();
                    let (b_read, b_write) = outbound.into_split();
                    tokio::join!(
                        pump(a_read, b_write, gate.clone()),
                        pump(b_read, a_write, gate)
                    );
                });
            }
        });
        RecordPath { addr, open, task }
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn heal(&self) {
        self.open.send_replace(true);
    }
}

/// Copy `from` to `to`, holding what was read while the path is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if open.wait_for(|o| *o).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// With the record cut off (a partition: it answers nothing), saves are read and handed on
/// without waiting for it: 200 services saved at once are all taken in within a minute (each
/// waiting on the record would take its 5 s timeout: over 16 minutes). Their deploys wait for
/// the record (a pin it may hold is never deployed over), and once it is back every save is
/// deployed and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cut_off_delays_no_save_and_every_write_lands_when_it_is_back() {
    const SERVICES: usize = 200;
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("partition").await;
    let port = url
        .split("@127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("port");
    let path = RecordPath::start(format!("127.0.0.1:{port}").parse().expect("addr")).await;
    let through = url.replace(&format!(":{port}/"), &format!(":{}/", path.addr.port()));
    let env = Env::new(SimConfig::default()).await;
    let name = |i: usize| format!("svc-{i:03}");
    for i in 0..SERVICES {
        let image = format!("r.example/{}:1.0", name(i));
        env.deployment("prod", &name(i), &[(&name(i), &image)], 1)
            .await;
    }
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 1)
        .await;
    let db = [("DEPWATCH_DATABASE_URL", through)];
    let daemon = env.daemon_with(&env.run_args(), &db, env.dir.path()).await;
    // Warm: the namespace's watches listed, the record written through the path.
    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_image("prod", "web", "r.example/web:1.1").await;

    path.cut();
    let http = daemon.http_url();
    wait_for(
        "/readyz to say the record does not answer",
        Duration::from_secs(60),
        || async {
            let resp = reqwest::get(format!("{http}/readyz")).await.ok()?;
            let body = resp.text().await.ok()?;
            body.contains("no answer within").then_some(())
        },
    )
    .await;
    let seen = daemon.log_text().len();
    for i in 0..SERVICES {
        env.write_dep(&format!("{}_prod.dep", name(i)), "1.1\n");
    }
    wait_for(
        "every save taken in while the record is away",
        Duration::from_secs(60),
        || async {
            let log = daemon.log_text();
            let taken = log[seen..]
                .lines()
                .filter(|l| l.contains("new desired version") && l.contains("service=prod/svc-"))
                .count();
            (taken >= SERVICES).then_some(())
        },
    )
    .await;

    path.heal();
    for i in 0..SERVICES {
        let image = format!("r.example/{}:1.1", name(i));
        env.wait_image("prod", &name(i), &image).await;
    }
    let store = shared_record(&url).await;
    wait_for("every deploy recorded", Duration::from_secs(60), || async {
        let mut done = 0;
        for i in 0..SERVICES {
            let key = ServiceKey::new(&name(i), "prod").expect("key");
            if store.history(Some(&key), 1).await.ok().is_some_and(|h| {
                h.first()
                    .is_some_and(|d| d.outcome == DeployOutcome::Succeeded)
            }) {
                done += 1;
            }
        }
        (done == SERVICES).then_some(())
    })
    .await;
    assert!(store.interrupted().await.expect("q").is_empty());
}
