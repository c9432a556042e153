//! The real `depwatch run` binary against the simulated cluster, end to end.

mod common;

use std::time::Duration;

use common::daemon::{colour, text, Env};
use common::wait_for;
use depwatch::sim::SimConfig;

const GREEN: &str = "#2eb886";
const RED: &str = "#d40e0d";
const AMBER: &str = "#daa038";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_is_patched_once_and_reported_green_after_it_is_healthy() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 3)
        .await;
    env.wait_ready("demo", "web").await;
    let daemon = env.daemon(&[]).await;

    env.write_dep("web_demo.dep", "1.1.0\n");
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    let messages = env.wait_messages(1).await;
    assert_eq!(colour(&messages[0]), GREEN, "{:?}", messages[0]);
    assert!(
        text(&messages[0]).contains("example.com/web:1.1.0"),
        "{}",
        text(&messages[0])
    );
    let (updated, available, desired) = messages[0]
        .rollout_at_receipt
        .expect("deployment read at receipt");
    assert_eq!(
        (updated, available),
        (desired, desired),
        "the message came after the rollout was healthy"
    );
    assert_eq!(env.patches("demo", "web"), 1, "exactly one PATCH");
    // The patch changes only the image, under depwatch's field manager, with a change-cause
    // that `kubectl rollout history` shows.
    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.client.clone(), "demo");
    let dep = api.get("web").await.expect("get");
    let cause = dep
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .get("kubernetes.io/change-cause")
        .cloned()
        .unwrap_or_default();
    assert!(cause.starts_with("depwatch: web_demo.dep"), "{cause}");
    let kubectl = common::Kubectl::new(env.dir.path(), &env.sim.kubeconfig());
    let history = wait_for(
        "kubectl rollout history to show depwatch's change-cause",
        Duration::from_secs(10),
        || async {
            let out = kubectl
                .ok(&["-n", "demo", "rollout", "history", "deploy/web"])
                .await;
            out.contains("depwatch: web_demo.dep").then_some(out)
        },
    )
    .await;
    assert!(history.contains("2 "), "{history}");
    let managers: Vec<String> = dep
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"depwatch".to_string()), "{managers:?}");
    assert_eq!(
        dep.spec.and_then(|s| s.replicas),
        Some(3),
        "fields depwatch does not own are untouched"
    );
    let events: kube::Api<k8s_openapi::api::core::v1::Event> =
        kube::Api::namespaced(env.client.clone(), "demo");
    wait_for(
        "a Kubernetes Event on the Deployment",
        Duration::from_secs(10),
        || async {
            let list = events.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some("DeploySucceeded")
                        && e.involved_object.name.as_deref() == Some("web")
                })
                .then_some(())
        },
    )
    .await;

    // `touch` and rewriting the same bytes change nothing.
    env.write_dep("web_demo.dep", "1.1.0\n");
    let history = env.store().history(None, 10).await.expect("history");
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0].outcome.as_str(), "succeeded");
    assert_eq!(history[0].from_image, "web=example.com/web:1.0.0");
    daemon.stop();
    assert_eq!(env.patches("demo", "web"), 1);
    assert_eq!(env.messages().len(), 1, "one message only");
    let dep = env.images("demo", "web").await;
    assert_eq!(
        dep,
        vec![("web".to_string(), "example.com/web:1.1.0".to_string())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_image_fails_fast_red_with_the_pods_reason() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "api", &[("api", "example.com/api:1.0.0")], 2)
        .await;
    env.wait_ready("demo", "api").await;
    let _daemon = env.daemon(&["--rollback", "off"]).await;

    env.write_dep("api_demo.dep", "2.0.0-fail-pull\n");
    let messages = env.wait_messages(1).await;
    let m = &messages[0];
    assert_eq!(colour(m), RED, "{m:?}");
    let t = text(m);
    assert!(
        t.contains("ImagePullBackOff") || t.contains("ErrImagePull"),
        "{t}"
    );
    assert!(
        t.contains("example.com/api:2.0.0-fail-pull"),
        "the pod's own message: {t}"
    );
    assert!(
        !t.contains("ProgressDeadlineExceeded"),
        "failed from the pods, long before the deadline: {t}"
    );
    let svc = env
        .store()
        .service(&depwatch::domain::ServiceKey::new("api", "demo").expect("key"))
        .await
        .expect("q")
        .expect("recorded");
    assert_eq!(svc.status.as_str(), "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_that_never_gets_ready_times_out_amber() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "demo",
        "reports",
        &[("reports", "example.com/reports:1.0.0")],
        1,
    )
    .await;
    env.wait_ready("demo", "reports").await;
    let _daemon = env
        .daemon(&["--rollout-timeout", "2s", "--rollback", "off"])
        .await;
    env.write_dep("reports_demo.dep", "1.1.0-hang\n");
    let messages = env.wait_messages(1).await;
    assert_eq!(colour(&messages[0]), AMBER, "{:?}", messages[0]);
    assert!(
        text(&messages[0]).contains("not healthy after 2s"),
        "{}",
        text(&messages[0])
    );
    let h = env.store().history(None, 5).await.expect("history");
    assert_eq!(h[0].outcome.as_str(), "timed_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_redeploys_nothing_and_catches_up_on_changes_made_while_down() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("demo", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    env.write_dep("web_demo.dep", "1.1.0");
    env.write_dep("api_demo.dep", "1.0.0");
    let daemon = env.daemon(&[]).await;
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    env.wait_messages(1).await;
    wait_for(
        "api to be recorded as current",
        Duration::from_secs(20),
        || async {
            let s = env
                .store()
                .service(&depwatch::domain::ServiceKey::new("api", "demo").ok()?)
                .await
                .ok()??;
            (s.status.as_str() == "succeeded").then_some(())
        },
    )
    .await;
    assert_eq!(
        env.patches("demo", "api"),
        0,
        "api already ran 1.0.0: no patch"
    );
    daemon.stop();
    let patches_before = env.all_patches();

    // Unchanged files: a restart patches nothing. A third service deployed after the
    // restart's scan shows the pipeline ran before we count.
    env.deployment(
        "demo",
        "worker",
        &[("worker", "example.com/worker:1.0.0")],
        1,
    )
    .await;
    let daemon = env.daemon(&[]).await;
    env.write_dep("worker_demo.dep", "1.1.0");
    env.wait_image("demo", "worker", "example.com/worker:1.1.0")
        .await;
    daemon.stop();
    assert_eq!(
        env.all_patches(),
        patches_before + 1,
        "only the worker was patched"
    );

    // A change made while stopped is deployed at start; a file deleted while stopped ends
    // management of its service.
    env.write_dep("api_demo.dep", "1.2.0");
    std::fs::remove_file(env.deps.join("worker_demo.dep")).expect("rm");
    let _daemon = env.daemon(&[]).await;
    env.wait_image("demo", "api", "example.com/api:1.2.0").await;
    assert_eq!(env.patches("demo", "web"), 1, "web is not redeployed");
    assert_eq!(env.patches("demo", "api"), 1);
    let worker = env
        .store()
        .service(&depwatch::domain::ServiceKey::new("worker", "demo").expect("key"))
        .await
        .expect("q")
        .expect("recorded");
    assert_eq!(worker.status.as_str(), "unmanaged");
    assert_eq!(
        env.image("demo", "worker").await,
        "example.com/worker:1.1.0",
        "nothing deleted in the cluster"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_services_deploy_once_each_and_latest_wins() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await;
    let names: Vec<String> = (0..200).map(|i| format!("svc-{i:03}")).collect();
    for n in &names {
        env.deployment(
            "bulk",
            n,
            &[(n.as_str(), &format!("example.com/{n}:1.0.0"))],
            1,
        )
        .await;
    }
    let _daemon = env.daemon(&["--workers", "20"]).await;
    for n in &names {
        env.write_dep(&format!("{n}_bulk.dep"), "2.0.0\n");
    }
    // Three quick changes to one service end on the last.
    env.write_dep("svc-000_bulk.dep", "2.1.0\n");
    env.write_dep("svc-000_bulk.dep", "2.2.0\n");
    env.write_dep("svc-000_bulk.dep", "2.3.0\n");

    let api: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.client.clone(), "bulk");
    wait_for(
        "all 200 services to run their new version",
        Duration::from_secs(120),
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            let done = list
                .items
                .iter()
                .filter(|d| {
                    let img = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|s| s.containers[0].image.clone())
                        .unwrap_or_default();
                    img.ends_with(":2.0.0") || img.ends_with(":2.3.0")
                })
                .count();
            (done == 200).then_some(())
        },
    )
    .await;
    env.wait_image("bulk", "svc-000", "example.com/svc-000:2.3.0")
        .await;
    wait_for(
        "every deploy to settle",
        Duration::from_secs(60),
        || async {
            let services = env.store().services().await.ok()?;
            (services.len() == 200 && services.iter().all(|s| s.status.as_str() == "succeeded"))
                .then_some(())
        },
    )
    .await;
    for n in &names[1..] {
        assert_eq!(env.patches("bulk", n), 1, "{n} patched once");
    }
    assert!(
        env.patches("bulk", "svc-000") <= 4,
        "at most one patch per change"
    );
    assert_eq!(
        env.image("bulk", "svc-000").await,
        "example.com/svc-000:2.3.0"
    );
    // Rollouts are judged from watches shared by the namespace, not one watch per deploy.
    let watches = common::audit_count(&env.audit, |l| {
        l["verb"] == "watch"
            && l["path"]
                .as_str()
                .is_some_and(|p| p.contains("/namespaces/bulk/"))
    });
    assert!(watches <= 12, "{watches} watch requests for 200 deploys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_keep_their_image_and_multi_container_files_set_exactly_the_named_ones() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "demo",
        "web",
        &[
            ("web", "example.com/web:1.0.0"),
            ("envoy", "example.com/envoy:1.29"),
        ],
        1,
    )
    .await;
    env.deployment(
        "demo",
        "api",
        &[
            ("api", "example.com/api:1.0.0"),
            ("envoy", "example.com/envoy:1.29"),
            ("log", "example.com/log:3"),
        ],
        1,
    )
    .await;
    let _daemon = env.daemon(&[]).await;
    env.write_dep("web_demo.dep", "1.1.0");
    env.write_dep(
        "api_demo.dep",
        "images:\n  api: example.com/api:2.0.0\n  envoy: example.com/envoy:1.30\n",
    );
    env.wait_image("demo", "web", "example.com/web:1.1.0").await;
    env.wait_image("demo", "api", "example.com/api:2.0.0").await;
    assert_eq!(
        env.images("demo", "web").await,
        vec![
            ("web".into(), "example.com/web:1.1.0".into()),
            ("envoy".into(), "example.com/envoy:1.29".into())
        ]
    );
    assert_eq!(
        env.images("demo", "api").await,
        vec![
            ("api".into(), "example.com/api:2.0.0".into()),
            ("envoy".into(), "example.com/envoy:1.30".into()),
            ("log".into(), "example.com/log:3".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_are_reported_and_nothing_is_deployed() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("demo", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    let daemon = env.daemon(&[]).await;
    env.write_dep("web.dep", "1.1.0");
    env.write_dep("Web_demo.dep", "1.1.0");
    env.write_dep("web_demo.dep", "not a version");
    env.write_dep("api_demo.dep", "");
    std::fs::write(env.deps.join("garbage_demo.dep"), [0xff, 0x00, 0xfe]).expect("write");
    let key = |n: &str| depwatch::domain::ServiceKey::new(n, "demo").expect("key");
    wait_for(
        "the invalid files to be recorded",
        Duration::from_secs(20),
        || async {
            let s = env.store();
            let web = s.service(&key("web")).await.ok()??;
            let api = s.service(&key("api")).await.ok()??;
            (web.status.as_str() == "invalid" && api.status.as_str() == "invalid")
                .then_some((web, api))
        },
    )
    .await;
    let web = env
        .store()
        .service(&key("web"))
        .await
        .expect("q")
        .expect("web");
    assert!(
        web.message.contains("web_demo.dep:1:"),
        "names the file and line: {}",
        web.message
    );
    let log = daemon.log_text();
    assert!(
        log.contains("web.dep") && log.contains("Web_demo.dep"),
        "bad names are logged"
    );
    assert_eq!(env.all_patches(), 0, "nothing deployed");

    // The daemon keeps running: a valid version deploys.
    env.write_dep("web_demo.dep", "1.2.0");
    env.wait_image("demo", "web", "example.com/web:1.2.0").await;
    assert_eq!(env.image("demo", "api").await, "example.com/api:1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_waiting_to_become_healthy_hold_no_worker() {
    let env = Env::new(SimConfig::default()).await;
    for n in ["a", "b", "c", "d"] {
        env.deployment("slow", n, &[(n, &format!("example.com/{n}:1"))], 1)
            .await;
    }
    // Two workers; three rollouts that never become healthy.
    let _daemon = env
        .daemon(&["--workers", "2", "--rollout-timeout", "10m"])
        .await;
    for n in ["a", "b", "c"] {
        env.write_dep(&format!("{n}_slow.dep"), "2-hang");
    }
    wait_for(
        "three hanging rollouts in flight",
        Duration::from_secs(20),
        || async {
            let s = env.store().services().await.ok()?;
            (s.iter()
                .filter(|r| r.status.as_str() == "deploying")
                .count()
                == 3)
                .then_some(())
        },
    )
    .await;
    env.write_dep("d_slow.dep", "2");
    let key = depwatch::domain::ServiceKey::new("d", "slow").expect("key");
    wait_for(
        "the fourth service to deploy past them",
        Duration::from_secs(20),
        || async {
            (env.store().service(&key).await.ok()??.status.as_str() == "succeeded").then_some(())
        },
    )
    .await;
    let still = env.store().services().await.expect("services");
    assert_eq!(
        still
            .iter()
            .filter(|r| r.status.as_str() == "deploying")
            .count(),
        3,
        "{still:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_complete_through_api_server_errors_conflicts_and_short_watches() {
    let env = Env::new(SimConfig::default()).await;
    let names: Vec<String> = (0..20).map(|i| format!("svc-{i:02}")).collect();
    for n in &names {
        env.deployment(
            "flaky",
            n,
            &[(n.as_str(), &format!("example.com/{n}:1"))],
            1,
        )
        .await;
    }
    // From now on a fifth of requests fail, three writes in ten conflict (with a fifth, 20 PATCHes
    // passed without one conflict about once in 30 runs), watches end every second.
    env.sim.faults().set_error_rate(0.2);
    env.sim.faults().set_conflict_rate(0.3);
    env.sim.faults().set_watch_timeout(Duration::from_secs(1));
    let _daemon = env.daemon(&[]).await;
    for n in &names {
        env.write_dep(&format!("{n}_flaky.dep"), "2\n");
    }
    wait_for(
        "every service to be deployed despite the faults",
        Duration::from_secs(90),
        || async {
            let s = env.store().services().await.ok()?;
            (s.len() == names.len() && s.iter().all(|r| r.status.as_str() == "succeeded"))
                .then_some(())
        },
    )
    .await;
    env.sim.faults().set_error_rate(0.0);
    env.sim.faults().set_conflict_rate(0.0);
    let failed = common::audit_count(&env.audit, |l| l["code"] == 500);
    let conflicts = common::audit_count(&env.audit, |l| l["code"] == 409 && l["method"] == "PATCH");
    assert!(
        failed > 0 && conflicts > 0,
        "the faults were exercised: {failed} errors, {conflicts} conflicts"
    );
    for n in &names {
        assert_eq!(env.image("flaky", n).await, format!("example.com/{n}:2"));
        let path = format!("/apis/apps/v1/namespaces/flaky/deployments/{n}");
        let applied = common::audit_count(&env.audit, |l| {
            l["method"] == "PATCH" && l["path"] == path && l["code"] == 200
        });
        assert_eq!(applied, 1, "{n}: one patch took effect");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_webhook_receives_every_outcome_as_json() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let _daemon = env.daemon(&["--webhook-url", &env.slack_url.clone()]).await;
    env.write_dep("web_demo.dep", "1.1.0");
    let messages = env.wait_messages(2).await;
    let json = messages
        .iter()
        .find(|m| m.body["event"] == "depwatch.deploy")
        .expect("a JSON webhook document");
    assert_eq!(json.body["outcome"], "succeeded");
    assert_eq!(json.body["service"], "web");
    assert_eq!(json.body["namespace"], "demo");
    assert_eq!(json.body["to"], "web=example.com/web:1.1.0");
    assert!(json.body["duration_seconds"].as_f64().is_some());
    assert!(
        messages.iter().any(|m| m.body["attachments"].is_array()),
        "Slack still gets its message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_exits_at_once_naming_the_first() {
    let env = Env::new(SimConfig::default()).await;
    let first = env.daemon(&[]).await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(env.run_args())
            .args(["--http-addr", "127.0.0.1:0"])
            .env("NO_COLOR", "1")
            .output(),
    )
    .await
    .expect("the second daemon exits at once")
    .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("another depwatch (PID {})", first.pid())),
        "{stderr}"
    );
    // The lock dies with its holder, however it dies.
    first.kill();
    let again = env.daemon(&[]).await;
    again.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_colour_codes_when_not_on_a_terminal() {
    let env = Env::new(SimConfig::default()).await;
    let args = env.run_args();
    // NO_COLOR unset (empty): only the missing terminal keeps colour out.
    let daemon = env
        .daemon_with(&args, &[("NO_COLOR", String::new())], env.dir.path())
        .await;
    let log = daemon.log_text();
    assert!(log.contains("watching for dependency file changes"));
    assert!(!log.contains('\u{1b}'), "ANSI codes in a log file: {log}");
    // Start-up says which cluster, which context, and which bounds.
    let line = log
        .lines()
        .find(|l| l.contains("connected to the Kubernetes API"))
        .unwrap_or_else(|| panic!("no start-up line: {log}"));
    assert!(line.contains("cluster=http://127.0.0.1:"), "{line}");
    assert!(line.contains("context="), "{line}");
    assert!(line.contains("namespaces any; images any"), "{line}");
    assert!(log.contains("no --namespaces or --allowed-images"), "{log}");
    daemon.stop();
}

/// `Type=notify` under systemd: READY once the start-up scan is done, watchdog pings while
/// running, STOPPING on SIGTERM, spoken on the socket systemd names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let env = Env::new(SimConfig::default()).await;
    let socket_path = env.dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let args = env.run_args();
    // systemd names the main PID in WATCHDOG_PID; `exec` keeps the shell's.
    let program = [
        "sh",
        "-c",
        "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
        env!("CARGO_BIN_EXE_depwatch"),
    ];
    let daemon = env
        .daemon_via(
            &program,
            &args,
            &[
                ("NOTIFY_SOCKET", socket_path.display().to_string()),
                ("WATCHDOG_USEC", "200000".into()),
            ],
            env.dir.path(),
        )
        .await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let recv_until = |want: &'static str| {
        let socket = &socket;
        async move {
            let mut got = Vec::new();
            loop {
                let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("no {want} from the daemon; got {got:?}"))
                    .expect("recv");
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = msg.lines().any(|l| l == want);
                got.push(msg);
                if done {
                    return got;
                }
            }
        }
    };
    seen.extend(recv_until("READY=1").await);
    assert!(
        daemon
            .log_text()
            .contains("watching for dependency file changes"),
        "READY comes after the start-up scan"
    );
    assert!(
        seen.iter().any(|m| m.contains("STATUS=watching ")),
        "{seen:?}"
    );
    seen.extend(recv_until("WATCHDOG=1").await);
    seen.extend(recv_until("WATCHDOG=1").await);
    let pid = daemon.pid();
    let stop = std::thread::spawn(move || daemon.stop());
    seen.extend(recv_until("STOPPING=1").await);
    stop.join().expect("stopped cleanly");
    assert!(pid > 0);
}

/// The first signal drains in-flight deploys for the grace period; a second one exits at once,
/// saying what it abandoned, and the next start judges that deploy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_and_the_next_start_resumes() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.0.0\n");
    let daemon = env.daemon(&["--shutdown-grace", "5m"]).await;
    let key = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
    wait_for("adopted", Duration::from_secs(20), || async {
        let r = env.store().service(&key).await.ok()??;
        (r.status.as_str() == "succeeded").then_some(())
    })
    .await;
    // A rollout that never becomes ready keeps a deploy in flight.
    env.write_dep("web_prod.dep", "1.1.0-hang\n");
    wait_for("the deploy in flight", Duration::from_secs(20), || async {
        env.store().in_progress(&key).await.ok()?.map(|_| ())
    })
    .await;
    daemon.signal("TERM");
    wait_for(
        "the graceful drain to begin",
        Duration::from_secs(10),
        || async { daemon.log_text().contains("shutting down").then_some(()) },
    )
    .await;
    let log = daemon.log.clone();
    daemon.signal("INT");
    let status = daemon.exit_status(Duration::from_secs(10)).await;
    assert_eq!(
        status.code(),
        Some(130),
        "exits at once on the second signal"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("a second signal: exiting now"), "{text}");
    assert!(
        env.store().in_progress(&key).await.expect("q").is_some(),
        "the abandoned deploy stays in progress in the record"
    );
    let again = env.daemon(&[]).await;
    assert!(again
        .log_text()
        .contains("a deploy was interrupted by a stop; it is judged again now"));
    again.kill();
}

/// A single object's GET by depwatch (`…/namespaces/<ns>/<kind>/<name>`, or a namespace by
/// name): what the shared lists already answer at start-up.
fn per_object_get(line: &serde_json::Value) -> bool {
    let path = line["path"].as_str().unwrap_or_default();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let at = parts
        .iter()
        .position(|p| *p == "namespaces")
        .unwrap_or(usize::MAX - 4);
    let named_workload = parts.len() == at + 4
        && ["deployments", "statefulsets", "daemonsets", "cronjobs"].contains(&parts[at + 2]);
    let named_namespace = parts.len() == 4 && parts[..3] == ["api", "v1", "namespaces"];
    let by_depwatch = line["userAgent"]
        .as_str()
        .is_some_and(|a| a.starts_with("depwatch"));
    line["method"] == "GET" && by_depwatch && (named_workload || named_namespace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_over_many_new_services_reads_the_lists_not_each_service() {
    let env = Env::new(SimConfig::default()).await;
    let services = 40;
    for i in 0..services {
        let ns = format!("team{i}");
        env.deployment(&ns, "web", &[("web", "r.example/web:1.0")], 1)
            .await;
        // Most already run what their file asks for; every third is a new version.
        let version = if i % 3 == 0 { "1.1" } else { "1.0" };
        env.write_dep(&format!("web_{ns}.dep"), &format!("{version}\n"));
    }
    let before = common::audit_count(&env.audit, per_object_get);
    let daemon = env.daemon(&[]).await;
    let store = env.store();
    wait_for("every service settled", Duration::from_secs(90), || async {
        let all = store.services().await.ok()?;
        let done = all
            .iter()
            .filter(|r| r.status == depwatch::domain::ServiceStatus::Succeeded)
            .count();
        (done == services).then_some(())
    })
    .await;
    let gets = common::audit_count(&env.audit, per_object_get) - before;
    assert_eq!(
        gets,
        0,
        "per-service GETs at start-up, where the lists answer: {}",
        daemon.log_text()
    );
}
