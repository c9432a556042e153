//! How files get written in real life, end to end: in-place writes with pauses (scp, shell
//! redirection), rename-over saves (vim, sed -i, rsync), ConfigMap `..data` symlink swaps,
//! sub-directories, deletion.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::ServiceKey;
use depwatch::sim::SimConfig;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_in_place_write_is_never_read_half_written() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    // Resyncs every 100ms must not read the open file either.
    let _daemon = env.daemon(&["--resync", "100ms"]).await;
    let path = env.deps.join("web_demo.dep");
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(b"1.1").expect("write");
    f.flush().expect("flush");
    // The writer pauses ten quiet windows (50ms each) with the file still open, as scp does
    // between writes. "1.1" is itself a valid version: reading it now would deploy the wrong
    // thing. The pause is the scenario under test, not a wait for a result.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        env.all_patches(),
        0,
        "nothing read while the writer holds the file open"
    );
    f.write_all(b".0\n").expect("write rest");
    drop(f);
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    assert_eq!(env.patches("demo", "web"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_saves_subdirectories_and_deletion() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("team", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&[]).await;

    // vim-style: write a swap file, rename it over the target.
    let tmp = env.deps.join(".web_demo.dep.swp");
    std::fs::write(&tmp, "1.1.0\n").expect("write tmp");
    std::fs::rename(&tmp, env.deps.join("web_demo.dep")).expect("rename");
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    // Again, onto the same path (a per-file watch would have gone silent here).
    let tmp = env.deps.join("web_demo.dep.tmp");
    std::fs::write(&tmp, "1.2.0\n").expect("write tmp");
    std::fs::rename(&tmp, env.deps.join("web_demo.dep")).expect("rename");
    env.wait_image("demo", "web", "example.com/web:1.2.0").await;

    // A sub-directory created after start.
    let team = env.deps.join("team");
    std::fs::create_dir(&team).expect("mkdir");
    std::fs::write(team.join("api_team.dep"), "2.0.0").expect("write");
    env.wait_image("team", "api", "example.com/api:2.0.0").await;

    // Deleting a file stops management; nothing in the cluster changes.
    std::fs::remove_file(env.deps.join("web_demo.dep")).expect("rm");
    let key = ServiceKey::new("web", "demo").expect("key");
    wait_for("web to be unmanaged", Duration::from_secs(10), || async {
        (env.store().service(&key).await.ok()??.status.as_str() == "unmanaged").then_some(())
    })
    .await;
    assert_eq!(env.image("demo", "web").await, "example.com/web:1.2.0");
    assert_eq!(env.patches("demo", "web"), 2);
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_volume_swap_deploys_what_changed() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("demo", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    // The layout kubelet's AtomicWriter makes: files are links into ..data, a link to a
    // timestamped directory.
    let write_version = |stamp: &str, web: &str, api: &str| {
        let d = env.deps.join(format!("..{stamp}"));
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("web_demo.dep"), web).expect("write");
        std::fs::write(d.join("api_demo.dep"), api).expect("write");
        d
    };
    let first = write_version("2026_01_01_00_00_00.1", "1.0.0", "1.0.0");
    std::os::unix::fs::symlink(&first, env.deps.join("..data")).expect("link");
    for f in ["web_demo.dep", "api_demo.dep"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), env.deps.join(f)).expect("link");
    }
    let daemon = env.daemon(&[]).await;
    let second = write_version("2026_01_01_00_01_00.2", "1.1.0", "1.0.0");
    let tmp = env.deps.join("..data_tmp");
    std::os::unix::fs::symlink(&second, &tmp).expect("link");
    std::fs::rename(&tmp, env.deps.join("..data")).expect("swap");
    std::fs::remove_dir_all(&first).expect("old dir");
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    daemon.stop();
    assert_eq!(env.patches("demo", "web"), 1);
    assert_eq!(
        env.patches("demo", "api"),
        0,
        "unchanged content is not redeployed"
    );
}

/// Every container image the Deployment's template has had, as a watch sees it: a PATCH of a
/// half-written version shows here even when the next one follows at once.
fn templates_seen(env: &Env, ns: &str, name: &str) -> Arc<Mutex<BTreeSet<String>>> {
    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, config).default_backoff().applied_objects();
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let Ok(d) = item else { continue };
            let containers = d.spec.and_then(|s| s.template.spec).map(|s| s.containers);
            for c in containers.unwrap_or_default() {
                out.lock().expect("lock").extend(c.image);
            }
        }
    });
    seen
}

/// The writer loop: a save closes, and the next save opens the file with `O_TRUNC` at
/// once and writes it in two parts with a pause between. The first part (`14.<i>`) is itself a
/// valid version and must never be deployed, and the file read empty is no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_truncated_at_once_by_a_slow_writer_never_deploys_a_partial_version() {
    slow_writer_loop(&[]).await;
}

/// The same, with a resync every 100ms reading the file whenever it is not open for writing
/// (between a close and the next save's events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resyncs_never_read_a_save_truncated_at_once_by_a_slow_writer() {
    slow_writer_loop(&["--resync", "100ms"]).await;
}

async fn slow_writer_loop(args: &[&str]) {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let seen = templates_seen(&env, "demo", "web");
    wait_for(
        "the watch to see the template",
        Duration::from_secs(10),
        || {
            let seen = seen.clone();
            async move { (!seen.lock().expect("lock").is_empty()).then_some(()) }
        },
    )
    .await;
    let daemon = env.daemon(args).await;
    let path = env.deps.join("web_demo.dep");
    let mut whole = BTreeSet::from(["example.com/web:1.0.0".to_string()]);
    for i in 0..30 {
        // A whole save, closed.
        std::fs::write(&path, format!("2.{i}.0\n")).expect("save");
        // The next save at once: truncated, the first part, the writer's own pause (the
        // scenario, not a wait for a result), the rest.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        f.write_all(format!("14.{i}").as_bytes())
            .expect("first part");
        f.flush().expect("flush");
        tokio::time::sleep(Duration::from_millis(150)).await;
        f.write_all(b"7\n").expect("rest");
        drop(f);
        whole.insert(format!("example.com/web:2.{i}.0"));
        whole.insert(format!("example.com/web:14.{i}7"));
        env.wait_image("demo", "web", &format!("example.com/web:14.{i}7"))
            .await;
    }
    let partial: Vec<String> = seen
        .lock()
        .expect("lock")
        .difference(&whole)
        .cloned()
        .collect();
    assert!(
        partial.is_empty(),
        "half-written versions PATCHed: {partial:?}"
    );
    let key = ServiceKey::new("web", "demo").expect("key");
    let recorded: Vec<String> = env
        .store()
        .history(Some(&key), 500)
        .await
        .expect("history")
        .into_iter()
        .map(|d| d.to_image)
        // Recorded as `<container>=<image>`.
        .filter(|i| !i.strip_prefix("web=").is_some_and(|i| whole.contains(i)))
        .collect();
    assert!(
        recorded.is_empty(),
        "half-written versions recorded: {recorded:?}"
    );
    // At most one PATCH per whole save; every slow save was deployed.
    let patches = env.patches("demo", "web");
    assert!((30..=60).contains(&patches), "{patches} PATCHes");
    let log = daemon.log_text();
    assert!(!log.contains("the file is empty"), "{log}");
    daemon.stop();
}

/// A file emptied by one open (`: > file`) and written by the next (`echo 1.1.0 >> file`) is
/// a save in progress, not an empty file; a file left empty is refused once `--max-wait` has
/// passed since it was first read empty, and the last good version stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_read_empty_after_a_truncate_waits_for_its_writer() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&["--max-wait", "2s"]).await;
    let path = env.deps.join("web_demo.dep");
    let truncate = || {
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .expect("truncate")
    };
    env.write_dep("web_demo.dep", "1.0.1\n");
    env.wait_image("demo", "web", "example.com/web:1.0.1").await;

    drop(truncate());
    // The writer's own pause between its two opens (the scenario, not a wait for a result).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("append");
    f.write_all(b"1.1.0\n").expect("write");
    drop(f);
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    assert!(
        !daemon.log_text().contains("the file is empty"),
        "{}",
        daemon.log_text()
    );

    let emptied = std::time::Instant::now();
    drop(truncate());
    let key = ServiceKey::new("web", "demo").expect("key");
    wait_for(
        "the empty file refused",
        Duration::from_secs(20),
        || async {
            let r = env.store().service(&key).await.ok()??;
            (r.status.as_str() == "invalid" && r.message.contains("the file is empty"))
                .then_some(())
        },
    )
    .await;
    assert!(
        emptied.elapsed() >= Duration::from_secs(2),
        "refused after {:?}, before --max-wait",
        emptied.elapsed()
    );
    assert_eq!(env.image("demo", "web").await, "example.com/web:1.1.0");
    daemon.stop();
}

/// The dependency directory deleted with a deployed service's file in it: the daemon waits for
/// it without spinning (it used to wake at once, forever, for the file the directory took with
/// it), forgets nothing, and deploys again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dependency_directory_is_waited_for_without_spinning() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&[]).await;
    env.write_dep("web_prod.dep", "1.0.1\n");
    env.wait_image("prod", "web", "example.com/web:1.0.1").await;
    std::fs::remove_dir_all(&env.deps).expect("rm -r deps");
    wait_for(
        "the missing directory to be noticed",
        Duration::from_secs(20),
        || async {
            daemon
                .log_text()
                .contains("the dependency directory is missing")
                .then_some(())
        },
    )
    .await;
    // A window of idle waiting: an idle daemon uses a few milliseconds of it.
    let before = common::cpu_seconds(daemon.pid());
    let window = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = common::cpu_seconds(daemon.pid()) - before;
    let share = used / window.elapsed().as_secs_f64();
    assert!(
        share < 0.25,
        "{used:.2} s of CPU in {:?} while the directory is away",
        window.elapsed()
    );
    let web = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
    let r = env
        .store()
        .service(&web)
        .await
        .expect("store")
        .expect("record");
    assert_eq!(r.status.as_str(), "succeeded", "nothing forgotten");

    std::fs::create_dir(&env.deps).expect("mkdir deps");
    env.write_dep("web_prod.dep", "1.0.2\n");
    env.wait_image("prod", "web", "example.com/web:1.0.2").await;
}
