//! Random interleavings through the real binary: file changes (healthy and crashing versions),
//! operator commands, API faults and kill -9 at any moment, in a seeded order. After each step
//! settles, the record, the cluster and the history must agree.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, Env};
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;

/// A small xorshift generator: the same order every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn web() -> ServiceKey {
    ServiceKey::new("web", "prod").expect("key")
}

/// One operator command against the local record and directory.
fn operator(env: &Env, verb: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([verb, "prod/web", "--state-dir"])
        .arg(&env.state)
        .output()
        .expect("operator command runs");
    assert!(
        out.status.success(),
        "depwatch {verb}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Wait until the daemon has acted on `content` and nothing is in progress; then check that
/// the record, the cluster and the history agree.
async fn settled_and_agreeing(env: &Env, daemon: &Daemon, content: &str, step: usize) {
    let hash = depwatch::pipeline::ingest::content_hash(content.as_bytes());
    let store = env.store();
    let r = wait_for(
        &format!("step {step} to settle on {content:?}"),
        Duration::from_secs(90),
        || async {
            let r = store.service(&web()).await.ok()??;
            let terminal = !r.status.in_flight() && r.status != ServiceStatus::WaitingForApi;
            let open = store.interrupted().await.ok()?;
            (r.content_hash == hash && terminal && open.is_empty()).then_some(r)
        },
    )
    .await;
    // The faults were the daemon's to bear; the test reads the cluster without them.
    env.sim.faults().set_error_rate(0.0);
    let live = env.image("prod", "web").await;
    let history = store.history(Some(&web()), 200).await.expect("history");
    let context = || {
        format!(
            "step {step} {content:?}: {r:?}\nlive {live}\n{}",
            daemon.log_text()
        )
    };
    assert!(
        !history.iter().any(|d| d.message.contains("internal error")),
        "{}",
        context()
    );
    let wants_crash = content.contains("crash");
    if wants_crash {
        assert!(
            r.pinned().is_some(),
            "a crashing version is pinned: {}",
            context()
        );
        assert_eq!(r.status, ServiceStatus::RolledBack, "{}", context());
        assert!(!live.contains("crash"), "never left running: {}", context());
    } else {
        assert_eq!(r.status, ServiceStatus::Succeeded, "{}", context());
        assert_eq!(
            live,
            format!("r.example/web:{}", content.trim()),
            "{}",
            context()
        );
    }
    assert_eq!(
        r.deployed.get("web").map(String::as_str),
        Some(live.as_str()),
        "the record says what runs: {}",
        context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_leave_the_record_the_cluster_and_the_history_agreeing() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let mut daemon = env.daemon(&[]).await;
    settled_and_agreeing(&env, &daemon, "1.0\n", 0).await;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for step in 1..=12 {
        let content = if rng.below(3) == 0 {
            format!("crash-{step}.0\n")
        } else {
            format!("{step}.0\n")
        };
        // Transient API faults for this step, or none.
        let faults = rng.below(3) == 0;
        env.sim
            .faults()
            .set_error_rate(if faults { 0.2 } else { 0.0 });
        match rng.below(3) {
            // A plain save.
            0 => env.write_dep("web_prod.dep", &content),
            // Suspended while the file changes, then resumed: deployed only after the resume.
            1 => {
                operator(&env, "suspend");
                env.write_dep("web_prod.dep", &content);
                let patches = env.all_patches();
                operator(&env, "resume");
                assert!(env.all_patches() >= patches);
            }
            // kill -9 once the change is under way (after its patch, or at once), then restart.
            _ => {
                let seen = daemon.log_text().matches("patched;").count();
                env.write_dep("web_prod.dep", &content);
                if rng.below(2) == 0 {
                    wait_for("a patch", Duration::from_secs(30), || async {
                        (daemon.log_text().matches("patched;").count() > seen).then_some(())
                    })
                    .await;
                }
                daemon.kill();
                daemon = env.daemon(&[]).await;
            }
        }
        settled_and_agreeing(&env, &daemon, &content, step).await;
    }
    daemon.stop();
}

/// One save a chaos burst may make: healthy, crashing, hanging (a short timeout), or refused at
/// plan (a StatefulSet there is none of). Each names its step, so each has rows of its own.
fn chaos_content(rng: &mut Rng, n: u64) -> String {
    match rng.below(5) {
        0 => format!("crash-{n}\n"),
        1 => format!("version: hang-{n}\nrolloutTimeout: 4s\n"),
        2 => format!("kind: statefulset\nversion: refused-{n}\n"),
        _ => format!("{n}.0\n"),
    }
}

/// A writer that truncates the file in place and writes it in two parts, slowly.
async fn slow_write(env: &Env, content: &str) {
    use std::io::Write;
    let path = env.deps.join("web_prod.dep");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .create(true)
        .open(&path)
        .expect("open for writing");
    let half = content.len() / 2;
    f.write_all(&content.as_bytes()[..half])
        .expect("first part");
    tokio::time::sleep(Duration::from_millis(120)).await;
    f.write_all(&content.as_bytes()[half..])
        .expect("second part");
}

/// Wait until the daemon has acted on `content`, nothing is in progress, and check the
/// invariant: the workload never runs a crashing or hanging template, and no save has two
/// rows.
async fn chaos_settled(env: &Env, daemon: &Daemon, content: &str, burst: u64) {
    let hash = depwatch::pipeline::ingest::content_hash(content.as_bytes());
    let store = env.store();
    let r = wait_for(
        &format!("burst {burst} to settle on {content:?}"),
        Duration::from_secs(120),
        || async {
            let r = store.service(&web()).await.ok()??;
            let open = store.interrupted().await.ok()?;
            (r.content_hash == hash && !r.status.in_flight() && open.is_empty()).then_some(r)
        },
    )
    .await;
    let live = env.image("prod", "web").await;
    let history = store.history(Some(&web()), 500).await.expect("history");
    let context = || format!("burst {burst} {content:?}: {r:?}\nlive {live}\n{history:#?}");
    assert!(
        !live.contains("crash") && !live.contains("hang"),
        "a failing rollout was left running: {}\n{}",
        context(),
        daemon.log_text()
    );
    assert!(
        !history
            .iter()
            .any(|d| d.outcome == depwatch::domain::DeployOutcome::Drift),
        "depwatch's own patches are never drift: {}",
        context()
    );
    let mut per_save = std::collections::HashMap::<&str, usize>::new();
    for d in &history {
        *per_save.entry(d.to_image.as_str()).or_default() += 1;
    }
    assert!(
        per_save.values().all(|n| *n == 1),
        "one row per save: {}",
        context()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_bursts_with_kills_never_leave_a_failing_rollout_running() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "r.example/web:1.0")], 2)
        .await;
    env.wait_ready("prod", "web").await;
    env.write_dep("web_prod.dep", "1.0\n");
    let args = ["--crash-restarts", "3"];
    let mut daemon = env.daemon(&args).await;
    chaos_settled(&env, &daemon, "1.0\n", 0).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut n = 1;
    for burst in 1..=6 {
        let saves = 2 + rng.below(3);
        let kill_at = rng.below(saves + 1);
        let mut content = String::new();
        for save in 0..saves {
            n += 1;
            content = chaos_content(&mut rng, n);
            if rng.below(2) == 0 {
                slow_write(&env, &content).await;
            } else {
                env.write_dep("web_prod.dep", &content);
            }
            tokio::time::sleep(Duration::from_millis(rng.below(1500))).await;
            if save == kill_at {
                daemon.kill();
                daemon = env.daemon(&args).await;
            }
        }
        chaos_settled(&env, &daemon, &content, burst).await;
    }
    daemon.stop();
}
