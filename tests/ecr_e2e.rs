//! `--ecr-pull-secret` through the real binary: a minimal ECR endpoint on loopback answers
//! GetAuthorizationToken (JSON 1.1, reached through the AWS SDK's `AWS_ENDPOINT_URL_ECR`) with a
//! token for a real registry (Debian's `docker-registry`, with an htpasswd realm). The Secret
//! appears in each namespace that deploys that registry's images and works against it, comes
//! back when deleted, is refreshed before its token expires, and a user's own Secret of the
//! name is left alone. A failing endpoint never stalls a deploy and shows in `/readyz` and
//! `/metrics`; an endpoint that answers expired tokens is asked with backoff, its tokens are
//! never written, and the token never reaches the log, even at `RUST_LOG=trace`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine as _;
use common::daemon::{Daemon, Env};
use common::ecr::Endpoint;
use common::key;
use common::registry::Registry;
use common::{audit_count, get_metrics, sample, wait_for};
use depwatch::domain::ServiceStatus;
use depwatch::sim::SimConfig;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{json, Value};

const SECRET: &str = "ecr-pull";
const TOKEN_ERRORS: &str = "depwatch_ecr_refresh_failures_total{step=\"token\",reason=\"error\"}";
const TOKEN_EXPIRED: &str =
    "depwatch_ecr_refresh_failures_total{step=\"token\",reason=\"expired\"}";
/// The daemon with the pre-flight and the ECR pull secret, its AWS environment reaching only
/// `endpoint`.
async fn daemon(env: &Env, endpoint: &Endpoint) -> Daemon {
    daemon_in(env, endpoint, None).await
}

/// [`daemon`], confined to `--namespaces` when given (then the Secrets are watched in each of
/// them, not cluster-wide).
async fn daemon_in(env: &Env, endpoint: &Endpoint, namespaces: Option<&str>) -> Daemon {
    let mut args = env.run_args();
    if let Some(list) = namespaces {
        args.extend(["--namespaces".to_string(), list.to_string()]);
    }
    args.extend(
        [
            "--debounce",
            "50ms",
            "--registry-check",
            "on",
            "--registry-wait",
            "2s",
            "--ecr-pull-secret",
            SECRET,
        ]
        .map(String::from),
    );
    let envs = endpoint.aws_env(env.dir.path());
    env.daemon_with(&args, &envs, env.dir.path()).await
}

async fn status_is(env: &Env, name: &str, ns: &str, status: ServiceStatus) {
    let store = env.store();
    wait_for(
        &format!("{ns}/{name} {}", status.as_str()),
        Duration::from_secs(60),
        || async {
            store
                .service(&key(name, ns))
                .await
                .ok()
                .flatten()
                .filter(|r| r.status == status)
        },
    )
    .await;
}

async fn secret(env: &Env, ns: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(env.client.clone(), ns)
        .get_opt(SECRET)
        .await
        .expect("get secret")
}

/// The Secret in `ns` once depwatch wrote it (labelled as its own) and `more` holds.
async fn written(env: &Env, ns: &str, more: impl Fn(&Secret) -> bool) -> Secret {
    wait_for(
        &format!("Secret {SECRET} in {ns}"),
        Duration::from_secs(30),
        || async {
            secret(env, ns).await.filter(|s| {
                let labels = s.metadata.labels.clone().unwrap_or_default();
                labels
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str)
                    == Some("depwatch")
                    && more(s)
            })
        },
    )
    .await
}

fn expires_at(s: &Secret) -> String {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("depwatch/ecr-token-expires-at"))
        .cloned()
        .unwrap_or_default()
}

/// The user name and password the Secret holds for `host`.
fn credentials(s: &Secret, host: &str) -> (String, String) {
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let data = s.data.as_ref().expect("data");
    let config: Value = serde_json::from_slice(&data[".dockerconfigjson"].0).expect("json");
    let entry = &config["auths"][host];
    let auth = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str().expect("auth"))
        .expect("base64");
    let (user, password) = std::str::from_utf8(&auth)
        .expect("utf-8")
        .split_once(':')
        .map(|(u, p)| (u.to_string(), p.to_string()))
        .expect("user:password");
    assert_eq!(entry["username"], user.as_str());
    (user, password)
}

/// The registry's answer to a manifest HEAD with these credentials (or none).
async fn head(registry: &Registry, path: &str, creds: Option<&(String, String)>) -> u16 {
    let req = reqwest::Client::new()
        .head(registry.url(path))
        .header("Accept", common::registry::OCI_MANIFEST);
    let req = match creds {
        Some((u, p)) => req.basic_auth(u, Some(p)),
        None => req,
    };
    req.send().await.expect("head").status().as_u16()
}

async fn readyz(url: &str) -> (u16, String) {
    let r = reqwest::get(format!("{url}/readyz")).await.expect("readyz");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

async fn create_secret(env: &Env, ns: &str, body: Value) {
    let s: Secret = serde_json::from_value(body).expect("secret");
    Api::<Secret>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create secret");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_secret_follows_ecr_deploys_comes_back_when_deleted_and_spares_a_users_own() {
    follows_deploys_comes_back_and_spares_a_users_own(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_exact_namespaces_the_pull_secrets_are_watched_per_namespace() {
    follows_deploys_comes_back_and_spares_a_users_own(Some("shop,blog,misc,own")).await;
}

async fn follows_deploys_comes_back_and_spares_a_users_own(namespaces: Option<&str>) {
    let registry = Registry::start(true).await;
    let mut digests = Vec::new();
    for repo in ["team/web", "team/api", "team/app"] {
        registry.push(repo, "1.0").await;
        digests.push(registry.push(repo, "1.1").await);
    }
    let image = |repo: &str, tag: &str| format!("{}/{repo}:{tag}", registry.addr());
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let endpoint = Endpoint::for_registry(&registry, Duration::from_secs(12 * 3600), false).await;
    let env = Env::new(SimConfig::default()).await;
    // Two namespaces deploy the ECR registry's images; one deploys elsewhere; one holds a
    // Secret of the name that its owner made.
    env.deployment("shop", "web", &[("web", &image("team/web", "1.0"))], 1)
        .await;
    env.deployment("blog", "api", &[("api", &image("team/api", "1.0"))], 1)
        .await;
    env.deployment("misc", "tool", &[("tool", &format!("{dead}/tool:1.0"))], 1)
        .await;
    env.deployment("own", "app", &[("app", &image("team/app", "1.0"))], 1)
        .await;
    let theirs =
        json!({"metadata": {"name": SECRET}, "type": "Opaque", "data": {"note": "bWluZQ=="}});
    create_secret(&env, "own", theirs).await;
    for (name, ns) in [
        ("web", "shop"),
        ("api", "blog"),
        ("tool", "misc"),
        ("app", "own"),
    ] {
        env.write_dep(&format!("{name}_{ns}.dep"), "1.1\n");
    }
    let daemon = daemon_in(&env, &endpoint, namespaces).await;
    for (name, ns) in [
        ("web", "shop"),
        ("api", "blog"),
        ("tool", "misc"),
        ("app", "own"),
    ] {
        status_is(&env, name, ns, ServiceStatus::Succeeded).await;
    }
    // The pre-flight asked the private registry with the ECR token: the digests are recorded.
    for ((name, ns), digest) in [("web", "shop"), ("api", "blog"), ("app", "own")]
        .iter()
        .zip(&digests)
    {
        let history = env
            .store()
            .history(Some(&key(name, ns)), 5)
            .await
            .expect("history");
        assert_eq!(
            history[0].digests,
            format!("{name}={digest}"),
            "{ns}/{name}"
        );
    }

    // The Secret in each namespace that deploys the registry's images, and it works there.
    let mut uids = Vec::new();
    for ns in ["shop", "blog"] {
        let s = written(&env, ns, |_| true).await;
        let creds = credentials(&s, &registry.addr());
        assert_eq!(creds, registry.credentials());
        assert_eq!(
            head(&registry, "/v2/team/web/manifests/1.1", Some(&creds)).await,
            200
        );
        assert!(!expires_at(&s).is_empty(), "{:?}", s.metadata.annotations);
        uids.push(s.metadata.uid.clone());
    }
    assert_eq!(
        head(&registry, "/v2/team/web/manifests/1.1", None).await,
        401
    );
    assert!(
        secret(&env, "misc").await.is_none(),
        "no ECR image deployed in misc"
    );
    let kept = secret(&env, "own").await.expect("their Secret");
    assert_eq!(
        kept.type_.as_deref(),
        Some("Opaque"),
        "left alone: {kept:?}"
    );
    assert!(kept.metadata.labels.is_none(), "left alone: {kept:?}");
    let url = daemon.http_url();
    let (code, body) = readyz(&url).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok; ECR pull secret ecr-pull:")
            && body.contains("namespace(s) own is not depwatch's"),
        "{body}"
    );

    // Deleted: back at once (a new object).
    Api::<Secret>::namespaced(env.client.clone(), "shop")
        .delete(SECRET, &DeleteParams::default())
        .await
        .expect("delete");
    let back = written(&env, "shop", |s| s.metadata.uid != uids[0]).await;
    assert_eq!(credentials(&back, &registry.addr()), registry.credentials());
    assert_eq!(
        endpoint.calls.load(Ordering::SeqCst),
        1,
        "one token for 12 hours"
    );

    let m = get_metrics(&reqwest::Client::new(), &url).await;
    let left = sample(
        &m,
        &format!(
            "depwatch_ecr_token_expiry_seconds{{registry=\"{}\"}}",
            registry.addr()
        ),
    );
    assert!((11.0 * 3600.0..=12.0 * 3600.0).contains(&left), "{left}");
    assert_eq!(sample(&m, TOKEN_ERRORS) + sample(&m, TOKEN_EXPIRED), 0.0);
    assert!(
        daemon.log_text().contains("is left alone"),
        "{}",
        daemon.log_text()
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_secret_is_refreshed_before_its_token_expires() {
    let registry = Registry::start(true).await;
    registry.push("team/web", "1.0").await;
    registry.push("team/web", "1.1").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    // Six-second tokens: the next one is fetched three seconds in.
    let endpoint = Endpoint::for_registry(&registry, Duration::from_secs(6), false).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("1.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let _daemon = daemon(&env, &endpoint).await;
    status_is(&env, "web", "shop", ServiceStatus::Succeeded).await;
    let first = written(&env, "shop", |_| true).await;
    let first_expiry: jiff::Timestamp = expires_at(&first).parse().expect("an RFC 3339 expiry");
    let next = written(&env, "shop", |s| expires_at(s) != expires_at(&first)).await;
    assert!(
        jiff::Timestamp::now() < first_expiry,
        "refreshed before {first_expiry}, not at {}",
        jiff::Timestamp::now()
    );
    assert!(endpoint.calls.load(Ordering::SeqCst) >= 2);
    assert!(
        expires_at(&next)
            .parse::<jiff::Timestamp>()
            .expect("expiry")
            > first_expiry
    );
    assert_eq!(credentials(&next, &registry.addr()), registry.credentials());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_ecr_endpoint_never_stalls_a_deploy_and_is_told() {
    let registry = Registry::start(false).await;
    for tag in ["1.0", "1.1", "1.2"] {
        registry.push("team/web", tag).await;
    }
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    let endpoint = Endpoint::for_registry(&registry, Duration::from_secs(12 * 3600), true).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("1.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let daemon = daemon(&env, &endpoint).await;
    status_is(&env, "web", "shop", ServiceStatus::Succeeded).await;
    // Once running, a deploy does not wait on the refresher at all.
    let started = std::time::Instant::now();
    env.write_dep("web_shop.dep", "1.2\n");
    env.wait_image("shop", "web", &image("1.2")).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let url = daemon.http_url();
    let (code, body) = readyz(&url).await;
    assert_eq!(code, 200, "ready all the same: {body}");
    assert!(
        body.contains("fetching an ECR token failed") && body.contains("no token yet"),
        "{body}"
    );
    let m = get_metrics(&reqwest::Client::new(), &url).await;
    assert!(sample(&m, TOKEN_ERRORS) >= 1.0);
    assert!(
        daemon.log_text().contains("fetching an ECR token failed"),
        "{}",
        daemon.log_text()
    );
    assert!(secret(&env, "shop").await.is_none(), "no token, no Secret");

    // The endpoint recovers: the token comes, the Secret follows, the detail goes.
    endpoint.failing.store(false, Ordering::SeqCst);
    written(&env, "shop", |_| true).await;
    wait_for(
        "/readyz without the detail",
        Duration::from_secs(30),
        || async { (readyz(&url).await == (200, "ok".to_string())).then_some(()) },
    )
    .await;
}

/// Writes of the Secret in `ns` that took effect (creates and patches), from the audit log.
fn secret_writes(env: &Env, ns: &str) -> usize {
    let (create, patch) = (
        format!("/api/v1/namespaces/{ns}/secrets"),
        format!("/api/v1/namespaces/{ns}/secrets/{SECRET}"),
    );
    audit_count(&env.audit, |l| {
        let ok = l["code"].as_u64().is_some_and(|c| c < 300);
        let write = (l["method"] == "POST" && l["path"] == create.as_str())
            || (l["method"] == "PATCH" && l["path"] == patch.as_str());
        ok && write
    })
}

/// An hour ago: every token the endpoint hands out has expired.
const EXPIRED: i64 = -3600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ecr_tokens_are_asked_for_with_backoff_and_never_written() {
    let registry = Registry::start(true).await;
    registry.push("team/web", "1.0").await;
    registry.push("team/web", "1.1").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    // A six-second token first, which the Secret gets; then only expired ones.
    let endpoint = Endpoint::for_registry(&registry, Duration::from_secs(6), false).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("1.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let daemon = daemon(&env, &endpoint).await;
    written(&env, "shop", |_| true).await;
    endpoint.lifetime.store(EXPIRED, Ordering::SeqCst);

    // Asked again after 1 s, 2 s, 4 s: not each second.
    let stale = wait_for(
        "four expired tokens handed out",
        Duration::from_secs(40),
        || async {
            let at = endpoint.handed_with(EXPIRED);
            (at.len() >= 4).then_some(at)
        },
    )
    .await;
    let gaps: Vec<f64> = stale
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).as_secs_f64())
        .collect();
    for (gap, least) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(*gap >= least * 0.9, "backoff between asks: {gaps:?}");
    }
    let within_8s = stale
        .iter()
        .filter(|at| at.duration_since(stale[0]) <= Duration::from_secs(8))
        .count();
    assert!(within_8s <= 4, "{within_8s} asks in 8 s: {gaps:?}");

    // Counted, told by /readyz (still ready), and the expiry shown is the real one.
    let url = daemon.http_url();
    let http = reqwest::Client::new();
    let m = wait_for(
        "the expired current token in /metrics",
        Duration::from_secs(30),
        || async {
            let m = get_metrics(&http, &url).await;
            let left = sample(
                &m,
                &format!(
                    "depwatch_ecr_token_expiry_seconds{{registry=\"{}\"}}",
                    registry.addr()
                ),
            );
            (left < 0.0).then_some(m)
        },
    )
    .await;
    assert!(sample(&m, TOKEN_EXPIRED) >= 4.0, "{m:?}");
    assert_eq!(sample(&m, TOKEN_ERRORS), 0.0);
    let (code, body) = readyz(&url).await;
    assert_eq!(code, 200, "ready all the same: {body}");
    assert!(
        body.starts_with("ok; ECR pull secret ecr-pull: fetching an ECR token failed")
            && body.contains("ECR answered a token that had already expired")
            && body.contains("the pull secrets are stale"),
        "{body}"
    );

    // No expired token was ever written: at most one write per good token, and the Secret
    // still holds the last good one.
    let good = endpoint.handed_with(6).len();
    let writes = secret_writes(&env, "shop");
    assert!(writes <= good, "{writes} writes for {good} good tokens");
    let held: jiff::Timestamp = expires_at(&secret(&env, "shop").await.expect("the Secret"))
        .parse()
        .expect("an RFC 3339 expiry");
    assert!(
        held > jiff::Timestamp::now() - jiff::SignedDuration::from_secs(600),
        "the Secret holds an expired token: {held}"
    );

    // Fresh tokens again: taken at the next try, and the detail goes.
    endpoint.lifetime.store(12 * 3600, Ordering::SeqCst);
    let renewed = written(&env, "shop", |s| {
        expires_at(s)
            .parse::<jiff::Timestamp>()
            .is_ok_and(|at| at > jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600))
    });
    tokio::time::timeout(Duration::from_secs(40), renewed)
        .await
        .expect("the Secret renewed once ECR answers a fresh token");
    wait_for(
        "/readyz without the detail",
        Duration::from_secs(30),
        || async { (readyz(&url).await == (200, "ok".to_string())).then_some(()) },
    )
    .await;
    daemon.stop();
}

/// The daemon at `RUST_LOG=trace` (and `wire` for `DEPWATCH_LOG_AWS_WIRE=1`) until it fetched
/// a token from an endpoint whose password is `password`; its log.
async fn trace_log(password: &str, wire: bool) -> String {
    // The token's registry is a loopback port nobody listens on: only the fetch matters here.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let endpoint = Endpoint::start(
        &format!("http://{nobody}"),
        "AWS",
        password,
        Duration::from_secs(12 * 3600),
        false,
    )
    .await;
    let env = Env::new(SimConfig::default()).await;
    let mut args = env.run_args();
    args.extend(["--ecr-pull-secret", SECRET].map(String::from));
    let mut envs = endpoint.aws_env(env.dir.path());
    envs.push(("RUST_LOG", "trace".to_string()));
    if wire {
        envs.push(("DEPWATCH_LOG_AWS_WIRE", "1".to_string()));
    }
    let daemon = env.daemon_with(&args, &envs, env.dir.path()).await;
    wait_for("a token fetched", Duration::from_secs(30), || async {
        daemon
            .log_text()
            .contains("ECR token fetched")
            .then_some(())
    })
    .await;
    let log = daemon.log_text();
    daemon.stop();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecr_token_never_reaches_the_log_even_at_trace() {
    let password = "pw-ecr-wire-6f1d2c";
    let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
    let log = trace_log(password, false).await;
    assert!(
        log.contains("TRACE") && log.lines().count() > 100,
        "traced: {} lines",
        log.lines().count()
    );
    for secret in [password, token.as_str()] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
    // The same run with the SDK's wire logs asked for: they show the token, so the first run
    // proves that they were held back.
    let log = trace_log(password, true).await;
    assert!(log.contains(token.as_str()), "the wire logs are on");
}

/// Without `--ecr-pull-secret`, the pre-flight checks ECR images with depwatch's own AWS
/// identity (the default chain, here the endpoint's dummy keys): a pushed tag is deployed with
/// its digest recorded, a missing one is refused before any PATCH, one token serves the burst,
/// and nothing is written to the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pull_secret_ecr_images_are_checked_with_depwatchs_own_identity() {
    let registry = Registry::start(true).await;
    registry.push("team/web", "1.0").await;
    let digest = registry.push("team/web", "1.1").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    let endpoint = Endpoint::for_registry(&registry, Duration::from_secs(12 * 3600), false).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", &image("1.0"))], 1)
        .await;
    env.write_dep("web_shop.dep", "1.1\n");
    let mut args = env.run_args();
    args.extend(["--registry-check", "on", "--registry-wait", "5s"].map(String::from));
    let envs = endpoint.aws_env(env.dir.path());
    let daemon = env.daemon_with(&args, &envs, env.dir.path()).await;
    status_is(&env, "web", "shop", ServiceStatus::Succeeded).await;
    let history = env
        .store()
        .history(Some(&key("web", "shop")), 5)
        .await
        .expect("history");
    assert_eq!(history[0].digests, format!("web={digest}"), "checked");

    // A tag nobody pushed: refused, as proved by the registry with the identity's token.
    let patches = env.patches("shop", "web");
    env.write_dep("web_shop.dep", "9.9\n");
    let store = env.store();
    let refused = wait_for("9.9 refused", Duration::from_secs(30), || async {
        let r = store.service(&key("web", "shop")).await.ok()??;
        (r.status == ServiceStatus::Failed && r.requested == "9.9").then_some(r)
    })
    .await;
    assert!(
        refused.message.contains("9.9") && refused.message.contains("--registry-check"),
        "{}",
        refused.message
    );
    assert_eq!(env.patches("shop", "web"), patches, "nothing patched");
    assert_eq!(env.image("shop", "web").await, image("1.1"));
    assert!(
        daemon
            .log_text()
            .contains("with depwatch's own AWS identity"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        endpoint.handed_with(12 * 3600).len(),
        1,
        "one token served both checks"
    );
    assert!(secret(&env, "shop").await.is_none(), "no Secret written");
}
