//! Deploy windows and freezes end to end through the binary: a save that arrives in a deny
//! window is held and deployed by itself when the window ends, also when the daemon was
//! stopped meanwhile; a `FREEZE` file holds everything below it until it is removed; an
//! operator's rollback goes through a freeze. Windows are placed relative to now.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::key;
use depwatch::domain::ServiceStatus;
use depwatch::sim::SimConfig;

/// A policy whose deny window for `prod` began on the last whole minute (UTC) and lasts
/// `left` from now; returns it and when the window ends.
fn deny_now(left: Duration) -> (String, jiff::Timestamp) {
    let now = jiff::Timestamp::now();
    let minute = now.as_second() - now.as_second().rem_euclid(60);
    let start = jiff::Timestamp::from_second(minute).expect("start");
    let end = now + jiff::SignedDuration::try_from(left).expect("span");
    let secs = end.as_second() - minute + 1;
    let utc = start.to_zoned(jiff::tz::TimeZone::UTC);
    let policy = format!(
        "rules:\n  - namespaces: prod\n    windows:\n      - deny: \"{} {} * * *\"\n        duration: {secs}s\n        timeZone: UTC\n",
        utc.minute(),
        utc.hour()
    );
    (policy, end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_in_a_deny_window_is_held_then_deployed_when_it_ends() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.deployment("staging", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.deployment("staging", "api", &[("api", "example.com/api:1.0")], 1)
        .await;
    let (policy, end) = deny_now(Duration::from_secs(6));
    // The same window, written by one staging file for itself: a file can add windows.
    let own = policy
        .split_once("    windows:\n")
        .map(|(_, w)| w.lines().map(|l| &l[4..]).collect::<Vec<_>>().join("\n"))
        .expect("the window");
    env.write_dep(
        "api_staging.dep",
        &format!("version: \"1.1\"\nwindows:\n{own}\n"),
    );
    env.write_dep("depwatch-policy.yaml", &policy);
    let _daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let (prod, staging) = (key("web", "prod"), key("web", "staging"));
    let store = env.store();

    env.write_dep("web_prod.dep", "1.1\n");
    env.write_dep("web_staging.dep", "1.1\n");
    // Staging has no window: deployed at once.
    env.wait_status(&staging, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    env.wait_status(&prod, ServiceStatus::Held, Duration::from_secs(20))
        .await;
    env.wait_status(
        &key("api", "staging"),
        ServiceStatus::Held,
        Duration::from_secs(20),
    )
    .await;
    let row = store.service(&prod).await.expect("read").expect("row");
    assert!(
        row.message.starts_with("held until ")
            && row.message.contains("UTC: in the deny window deny"),
        "{}",
        row.message
    );
    assert_eq!(env.patches("prod", "web"), 0, "nothing patched while held");
    // The newest save wins while held.
    env.write_dep("web_prod.dep", "1.2\n");
    // Released by itself when the window ends.
    env.wait_status(&prod, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert!(
        jiff::Timestamp::now() >= end - jiff::SignedDuration::from_secs(1),
        "not before the window ended"
    );
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.2");
    assert_eq!(env.patches("prod", "web"), 1, "one deploy: the newest save");
    env.wait_status(
        &key("api", "staging"),
        ServiceStatus::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    // The team was told, once, that the save was held, and when it was released.
    let told = |words: &str| {
        env.messages()
            .into_iter()
            .filter(|m| m.body["text"].as_str().is_some_and(|t| t.contains(words)))
            .collect::<Vec<_>>()
    };
    let held = told("held a save of web (prod)");
    assert_eq!(
        held.len(),
        1,
        "one message per hold, not one per save or resync"
    );
    assert_eq!(common::daemon::colour(&held[0]), "#daa038");
    assert!(common::daemon::text(&held[0]).contains("in the deny window"));
    let released = common::wait_for("the release message", Duration::from_secs(20), || async {
        let r = told("released the held save of web (prod)");
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(common::daemon::colour(&released[0]), "#2eb886");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_held_when_the_daemon_stops_goes_at_the_next_start_once_the_window_ended() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0")], 1)
        .await;
    let (policy, end) = deny_now(Duration::from_secs(3));
    env.write_dep("depwatch-policy.yaml", &policy);
    let daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let k = key("api", "prod");
    env.write_dep("api_prod.dep", "2.0\n");
    env.wait_status(&k, ServiceStatus::Held, Duration::from_secs(20))
        .await;
    daemon.stop();
    // The window ends while nothing runs.
    common::wait_for("the window to end", Duration::from_secs(30), || async {
        (jiff::Timestamp::now() > end + jiff::SignedDuration::from_secs(1)).then_some(())
    })
    .await;
    assert_eq!(env.patches("prod", "api"), 0);
    let _daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    env.wait_status(&k, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.image("prod", "api").await, "example.com/api:2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_file_holds_what_is_below_it_until_it_is_removed() {
    let env = Env::new(SimConfig::default()).await;
    for ns in ["shop", "blog"] {
        env.deployment(ns, "web", &[("web", "example.com/web:1.0")], 1)
            .await;
    }
    std::fs::create_dir_all(env.deps.join("shop")).expect("mkdir");
    std::fs::create_dir_all(env.deps.join("blog")).expect("mkdir");
    env.write_dep("shop/web_shop.dep", "1.0\n");
    env.write_dep("blog/web_blog.dep", "1.0\n");
    let _daemon = env.daemon(&["--rollout-timeout", "20s"]).await;
    let (shop, blog) = (key("web", "shop"), key("web", "blog"));
    env.wait_status(&shop, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;

    // Frozen for the sale, in shop's folder only.
    env.write_dep("shop/FREEZE", "Black Friday sale \u{1b}[2J until Monday\n");
    env.write_dep("shop/web_shop.dep", "1.1\n");
    env.write_dep("blog/web_blog.dep", "1.1\n");
    env.wait_status(&blog, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    env.wait_status(&shop, ServiceStatus::Held, Duration::from_secs(20))
        .await;
    let store = env.store();
    let row = store.service(&shop).await.expect("read").expect("row");
    assert!(
        row.message
            .contains("shop/FREEZE: Black Friday sale \\u{1b}[2J until Monday"),
        "the reason is shown, escaped: {}",
        row.message
    );
    assert_eq!(env.image("shop", "web").await, "example.com/web:1.0");

    // `depwatch status` says held.
    let out = env.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.contains("shop/web") && l.contains("held")),
        "{table}"
    );

    // Lifted: the held save goes by itself.
    std::fs::remove_file(env.deps.join("shop/FREEZE")).expect("unfreeze");
    env.wait_status(&shop, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    assert_eq!(env.image("shop", "web").await, "example.com/web:1.1");

    // Frozen again, from the root: an operator's rollback still goes.
    env.write_dep("FREEZE", "incident 42\n");
    let out = env.cli(&["rollback", "shop/web"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_image("shop", "web", "example.com/web:1.0").await;
    env.wait_status(&shop, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;

    // Break-glass: refused while nothing is held; a held save goes now, recorded with who
    // and why.
    let out = env.cli(&["deploy", "shop/web", "--now", "--reason", "hotfix"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing is held for shop/web"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.write_dep("shop/web_shop.dep", "1.3\n");
    env.wait_status(&shop, ServiceStatus::Held, Duration::from_secs(20))
        .await;
    let out = env.cli(&[
        "deploy",
        "shop/web",
        "--now",
        "--reason",
        "hotfix for incident 42",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_image("shop", "web", "example.com/web:1.3").await;
    env.wait_status(&shop, ServiceStatus::Succeeded, Duration::from_secs(20))
        .await;
    let h = store.history(Some(&shop), 1).await.expect("history");
    assert_eq!(
        h[0].actor, "alice (break-glass: hotfix for incident 42)",
        "{h:?}"
    );
    assert!(
        env.deps.join("FREEZE").exists(),
        "the freeze stays for everything else"
    );
}
