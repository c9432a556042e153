//! The registry pre-flight through the real binary, against a real registry (Debian's
//! `docker-registry`) on loopback: a missing tag is refused before any PATCH with the closest
//! tags named; a pushed tag deploys with its digest in history; a private repository deploys
//! with the namespace's pull secret and fails clearly without; a dead registry and a 429 storm
//! never hold a deploy past the bounded wait.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::registry::Registry;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use depwatch::store::ServiceRecord;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn web() -> ServiceKey {
    ServiceKey::new("web", "shop").expect("key")
}

async fn record_where(
    env: &Env,
    what: &str,
    done: impl Fn(&ServiceRecord) -> bool,
) -> ServiceRecord {
    let store = env.store();
    wait_for(what, Duration::from_secs(60), || async {
        store
            .service(&web())
            .await
            .ok()
            .flatten()
            .filter(|r| done(r))
    })
    .await
}

/// `--registry-check on` with a short bounded wait, plus `extra`.
async fn daemon(env: &Env, extra: &[&str]) -> common::daemon::Daemon {
    let mut args = vec!["--registry-check", "on", "--registry-wait", "2s"];
    args.extend_from_slice(extra);
    env.daemon(&args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_tag_is_refused_before_any_patch_and_a_pushed_one_deploys_with_its_digest() {
    let registry = Registry::start(false).await;
    registry.push("team/web", "1.4.1").await;
    let digest = registry.push("team/web", "1.4.2").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("1.4.1"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.4.3\n");
    let _daemon = daemon(&env, &[]).await;
    let r = record_where(&env, "the typo refused", |r| {
        r.status == ServiceStatus::Failed
    })
    .await;
    assert!(
        r.message.contains(&format!(
            "tag 1.4.3 not found in {}/team/web; closest: 1.4.2, 1.4.1",
            registry.addr()
        )),
        "{}",
        r.message
    );
    assert_eq!(env.all_patches(), 0, "nothing patched");
    assert!(
        r.pinned().is_none(),
        "a missing tag is not a failed rollout"
    );
    assert_eq!(env.image("shop", "web").await, image("1.4.1"));

    env.write_dep("web_shop.dep", "1.4.2\n");
    let r = record_where(&env, "the pushed tag deployed", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.deployed.get("web"), Some(&image("1.4.2")));
    let history = env.store().history(Some(&web()), 5).await.expect("history");
    assert_eq!(
        history[0].digests,
        format!("web={digest}"),
        "what ran, exactly"
    );
}

/// A `kubernetes.io/dockerconfigjson` Secret named `name` in `ns`.
async fn pull_secret(env: &Env, ns: &str, name: &str, config: &str) {
    use base64::Engine;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
}

/// shop/web's pods name a pull secret `regcred` holding the registry's credentials, as the
/// kubelet needs them to.
async fn web_pulls_with(env: &Env, registry: &Registry) {
    pull_secret(env, "shop", "regcred", &registry.docker_config_json()).await;
    Api::<Deployment>::namespaced(env.client.clone(), "shop")
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {
                "imagePullSecrets": [{"name": "regcred"}]}}}})),
        )
        .await
        .expect("patch");
    env.wait_ready("shop", "web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_deploys_with_the_pull_secret_goes_on_unchecked_without_and_refuses_wrong_credentials(
) {
    let registry = Registry::start(true).await;
    registry.push("private/web", "2.0").await;
    let digest = registry.push("private/web", "2.1").await;
    let image = |tag: &str| format!("{}/private/web:{tag}", registry.addr());
    let env = Env::new(SimConfig::default()).await;
    // web's pods name the pull secret; api's name none (its nodes may pull with their own
    // identity, as on EKS); bad's name a secret with a wrong password.
    for name in ["web", "api", "bad"] {
        env.deployment("shop", name, &[(name, &image("2.0"))], 1)
            .await;
        env.write_dep(&format!("{name}_shop.dep"), "2.1\n");
    }
    web_pulls_with(&env, &registry).await;
    let wrong = json!({"auths": {registry.addr(): {"username": common::registry::USER, "password": "wrong"}}})
        .to_string();
    pull_secret(&env, "shop", "wrongcred", &wrong).await;
    Api::<Deployment>::namespaced(env.client.clone(), "shop")
        .patch(
            "bad",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {
                "imagePullSecrets": [{"name": "wrongcred"}]}}}})),
        )
        .await
        .expect("patch");
    env.wait_ready("shop", "bad").await;
    let daemon = daemon(&env, &[]).await;
    let r = record_where(&env, "deployed with the pull secret", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.deployed.get("web"), Some(&image("2.1")));
    let history = env.store().history(Some(&web()), 5).await.expect("history");
    assert_eq!(history[0].digests, format!("web={digest}"));
    let store = env.store();
    let service = |name: &'static str, status: ServiceStatus| {
        let key = ServiceKey::new(name, "shop").expect("key");
        let store = store.clone();
        async move {
            wait_for(
                &format!("{name} {status:?}"),
                Duration::from_secs(60),
                || async {
                    store
                        .service(&key)
                        .await
                        .ok()
                        .flatten()
                        .filter(|r| r.status == status)
                },
            )
            .await
        }
    };
    // No credentials: not a refusal; deployed, the row says the image was not checked.
    service("api", ServiceStatus::Succeeded).await;
    let api = ServiceKey::new("api", "shop").expect("key");
    let history = env.store().history(Some(&api), 5).await.expect("history");
    assert_eq!(history[0].digests, "api=not checked");
    let log = daemon.log_text();
    assert!(
        log.contains("depwatch has none")
            && log.contains("the nodes may pull with their own identity"),
        "{log}"
    );
    // Credentials the registry refused: proved, so refused, and the message says how to go on.
    let r = service("bad", ServiceStatus::Failed).await;
    assert!(
        r.message.contains("refused the credentials")
            && r.message.contains("--registry-check warn or off"),
        "{}",
        r.message
    );
    // Its only PATCH is the test's own (the pull secret).
    assert_eq!(env.patches("shop", "bad"), 1, "nothing patched by depwatch");
    assert_eq!(env.image("shop", "bad").await, image("2.0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_fails_fast_or_is_not_a_registry_is_a_warning_not_a_wait() {
    // A web server that answers 404 to everything, as a site that is not a registry does.
    let site = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let app = axum::Router::new()
            .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "<html>nothing</html>") });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    };
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "shop",
        "web",
        &[("web", &format!("{site}/team/web:1.0"))],
        1,
    )
    .await;
    env.deployment(
        "shop",
        "api",
        &[("api", "no-such-host.invalid/team/api:1.0")],
        1,
    )
    .await;
    // A wait far longer than the test's deadline: neither deploy may spend it.
    let daemon = env
        .daemon(&["--registry-check", "on", "--registry-wait", "120s"])
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    env.write_dep("api_shop.dep", "1.1\n");
    for name in ["web", "api"] {
        let key = ServiceKey::new(name, "shop").expect("key");
        let store = env.store();
        wait_for(
            &format!("{name} deployed unchecked"),
            Duration::from_secs(30),
            || async {
                store
                    .service(&key)
                    .await
                    .ok()
                    .flatten()
                    .filter(|r| r.status == ServiceStatus::Succeeded)
            },
        )
        .await;
    }
    let log = daemon.log_text();
    assert!(log.contains("is not a registry"), "{log}");
    assert!(log.contains("cannot reach no-such-host.invalid"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_registry_never_holds_a_deploy_past_the_bounded_wait() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").to_string()
    };
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &format!("{dead}/web:1.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let daemon = daemon(&env, &[]).await;
    let r = record_where(&env, "deployed anyway", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.deployed.get("web"), Some(&format!("{dead}/web:1.1")));
    assert!(
        daemon.log_text().contains("not checked") && daemon.log_text().contains("deploying anyway"),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_is_honoured_then_the_deploy_goes_on() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // A registry that answers every request 429 with Retry-After: 1.
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", "1")],
                "slow down",
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = Env::new(SimConfig::default()).await;
    for name in ["web", "api", "worker"] {
        env.deployment(
            "shop",
            name,
            &[(name, &format!("{addr}/team/{name}:1.0"))],
            1,
        )
        .await;
        env.write_dep(&format!("{name}_shop.dep"), "1.1\n");
    }
    let _daemon = daemon(&env, &[]).await;
    let store = env.store();
    wait_for(
        "all three deployed anyway",
        Duration::from_secs(60),
        || async {
            let mut done = true;
            for n in ["web", "api", "worker"] {
                let key = ServiceKey::new(n, "shop").expect("key");
                done &= store
                    .service(&key)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == ServiceStatus::Succeeded);
            }
            done.then_some(())
        },
    )
    .await;
    // Retry-After is honoured per registry: within the 2 s wait, a handful of requests, not a
    // storm of them.
    let n = hits.load(Ordering::SeqCst);
    assert!((1..=9).contains(&n), "{n} requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sim_with_registries_pulls_for_real_a_404_is_image_pull_back_off() {
    use k8s_openapi::api::core::v1::Pod;
    let registry = Registry::start(true).await;
    registry.push("team/web", "1.0").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    let env = Env::new(SimConfig {
        registries: true,
        ..SimConfig::default()
    })
    .await;
    // web's pods pull with the secret; api's have none, and the registry refuses them.
    for name in ["web", "api"] {
        env.deployment("shop", name, &[(name, &image("1.0"))], 1)
            .await;
    }
    web_pulls_with(&env, &registry).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), "shop");
    let waiting = |app: &'static str| {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?;
            list.items.iter().find_map(|p| {
                let w = p.status.as_ref()?.container_statuses.as_ref()?[0]
                    .state
                    .as_ref()?
                    .waiting
                    .clone()?;
                (w.reason.as_deref() == Some("ImagePullBackOff")
                    || w.reason.as_deref() == Some("ErrImagePull"))
                .then(|| w.message.unwrap_or_default())
            })
        }
    };
    let refused = wait_for("api's pull refused", Duration::from_secs(30), || {
        waiting("api")
    })
    .await;
    assert!(refused.contains("unauthorized"), "{refused}");

    // A tag nobody pushed, with the pre-flight off: the sim's kubelet gets the registry's 404,
    // and depwatch rolls back with the pod's own reason.
    env.write_dep("web_shop.dep", "1.1\n");
    let _daemon = env.daemon(&[]).await;
    let r = record_where(&env, "rolled back", |r| {
        r.status == ServiceStatus::RolledBack
    })
    .await;
    assert!(
        r.message.contains("ImagePullBackOff") || r.message.contains("ErrImagePull"),
        "{}",
        r.message
    );
    assert!(
        r.message.contains("not found"),
        "the registry's answer: {}",
        r.message
    );
    assert_eq!(env.image("shop", "web").await, image("1.0"));

    // Pushed afterwards: the kubelet pulls again after its back-off, and finds it.
    registry.push("team/web", "1.1").await;
    env.deployment("shop", "late", &[("late", &image("1.1"))], 1)
        .await;
    Api::<Deployment>::namespaced(env.client.clone(), "shop")
        .patch(
            "late",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {
                "imagePullSecrets": [{"name": "regcred"}]}}}})),
        )
        .await
        .expect("patch");
    env.wait_ready("shop", "late").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depwatch_s_own_credentials_serve_when_the_pods_name_none_and_a_bad_file_is_named() {
    let registry = Registry::start(true).await;
    let digest = registry.push("private/web", "3.1").await;
    let image = |tag: &str| format!("{}/private/web:{tag}", registry.addr());
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("3.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "3.1\n");
    // A file that is not a docker config: the daemon refuses to start, naming it.
    let bad = env.dir.path().join("bad-config.json");
    std::fs::write(&bad, "{\"auths\": [1, 2]}").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(env.run_args())
        .args(["--http-addr", "127.0.0.1:0", "--registry-credentials"])
        .arg(&bad)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--registry-credentials") && stderr.contains("bad-config.json"),
        "{stderr}"
    );
    assert_eq!(env.all_patches(), 0);
    let good = env.dir.path().join("config.json");
    std::fs::write(&good, registry.docker_config_json()).expect("write");
    let good = good.to_str().expect("utf-8").to_string();
    let _daemon = daemon(&env, &["--registry-credentials", &good]).await;
    let r = record_where(&env, "deployed with depwatch's own credentials", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert_eq!(r.deployed.get("web"), Some(&image("3.1")));
    let history = env.store().history(Some(&web()), 5).await.expect("history");
    assert_eq!(history[0].digests, format!("web={digest}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_down_for_a_whole_wait_is_not_waited_for_again_by_the_next_deploys() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // A registry that answers every request 503.
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let env = Env::new(SimConfig::default()).await;
    for name in ["web", "api", "worker"] {
        env.deployment(
            "shop",
            name,
            &[(name, &format!("{addr}/team/{name}:1.0"))],
            1,
        )
        .await;
    }
    env.write_dep("web_shop.dep", "1.1\n");
    let daemon = daemon(&env, &[]).await;
    record_where(&env, "web deployed anyway", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    let asked = hits.load(Ordering::SeqCst);
    assert!(asked >= 1, "the registry was asked");
    // The next deploys go on at once: the registry is taken for down, and not asked again.
    env.write_dep("api_shop.dep", "1.1\n");
    env.write_dep("worker_shop.dep", "1.1\n");
    let store = env.store();
    wait_for(
        "api and worker deployed",
        Duration::from_secs(60),
        || async {
            let mut done = true;
            for n in ["api", "worker"] {
                let key = ServiceKey::new(n, "shop").expect("key");
                done &= store
                    .service(&key)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.status == ServiceStatus::Succeeded);
            }
            done.then_some(())
        },
    )
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), asked, "no request while down");
    assert!(
        daemon.log_text().contains("lately"),
        "{}",
        daemon.log_text()
    );
}
