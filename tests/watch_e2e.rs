//! How files get written in real life, end to end: in-place writes with pauses (scp, shell
//! redirection), rename-over saves (vim, sed -i, rsync), ConfigMap `..data` symlink swaps,
//! sub-directories, deletion.

mod common;

use std::io::Write;
use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::depfile::ServiceKey;
use depwatch::sim::SimConfig;

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
        (env.store().service(&key).ok()??.status.as_str() == "unmanaged").then_some(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_truncated_at_once_by_a_slow_writer_never_deploys_a_partial_version() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&[]).await;
    let path = env.deps.join("web_demo.dep");
    // Each save closes, and the next opens the file with O_TRUNC at once and writes it in two
    // parts with a pause between: "14.<i>" is itself a valid version, and must never be read.
    let mut last = String::new();
    for i in 0..30 {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open");
        f.write_all(format!("14.{i}").as_bytes())
            .expect("first part");
        f.flush().expect("flush");
        // The writer's own pause (part of the scenario, not a wait for a result).
        tokio::time::sleep(Duration::from_millis(150)).await;
        f.write_all(b"7\n").expect("rest");
        drop(f);
        last = format!("example.com/web:14.{i}7");
    }
    env.wait_image("demo", "web", &last).await;
    let store = env.store();
    let key = ServiceKey::new("web", "demo").expect("key");
    let partial: Vec<_> = store
        .history(Some(&key), 500)
        .expect("history")
        .into_iter()
        .filter(|d| !d.to_image.ends_with('7'))
        .collect();
    assert!(
        partial.is_empty(),
        "half-written versions deployed: {partial:#?}"
    );
    let log = daemon.log_text();
    assert!(!log.contains("the file is empty"), "{log}");
}
