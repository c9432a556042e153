//! Registries and token services that a file writer chooses, played by small hostile servers on
//! loopback, against the real binary: each attack costs a bounded amount and leaks nothing.
//! A 15 MiB tag list (streamed and with a declared length) leaves the daemon alive under a
//! memory bound; a token fetched with one namespace's credentials never serves another; a
//! token realm on plain HTTP on another host never gets the credentials, and a token service
//! that redirects to another host is not followed; tags and digests that are not of their
//! grammar are never stored or printed; a hung registry holds no worker; an image whose
//! registry port is not a port fails at plan.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use common::daemon::Env;
use common::key;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use depwatch::store::ServiceRecord;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// What a registry's answers carry.
const REGISTRY_HEADER: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// A valid digest of the grammar.
const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

/// Serve `app` on `ip`, port 0; its `host:port`.
async fn serve(ip: &str, app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn record_where(
    env: &Env,
    service: &ServiceKey,
    what: &str,
    done: impl Fn(&ServiceRecord) -> bool,
) -> ServiceRecord {
    let store = env.store();
    wait_for(what, Duration::from_secs(60), || async {
        store
            .service(service)
            .await
            .ok()
            .flatten()
            .filter(|r| done(r))
    })
    .await
}

/// The pre-flight on, with a short bounded wait, plus `extra`.
async fn daemon(env: &Env, extra: &[&str]) -> common::daemon::Daemon {
    let mut args = vec!["--registry-check", "on", "--registry-wait", "3s"];
    args.extend_from_slice(extra);
    env.daemon(&args).await
}

/// `16 MiB` of tags as one JSON answer, streamed in chunks (no declared length).
fn endless_tags() -> Body {
    let head = futures::stream::once(async {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"{\"name\":\"x\",\"tags\":["))
    });
    let chunk = bytes::Bytes::from("\"1.0.0-aaaaaaaaaaaaaaaaaaaa\",".repeat(2048));
    let body =
        futures::stream::iter((0..16 * 1024 * 1024 / chunk.len()).map(move |_| Ok(chunk.clone())));
    Body::from_stream(head.chain(body))
}

use futures::StreamExt as _;

/// A registry whose `tags/list` answers are huge: streamed for `team/web`, 50 MiB declared
/// for `team/api`; tags `1.0` and `2.0` exist.
async fn flooding_registry() -> String {
    let app = axum::Router::new().fallback(|req: Request| async move {
        let path = req.uri().path().to_string();
        if path.ends_with("/tags/list") && path.contains("team/web") {
            return Response::new(endless_tags());
        }
        if path.ends_with("/tags/list") {
            let mut res = Response::new(Body::from_stream(futures::stream::iter(
                (0..50)
                    .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 1024 * 1024]))),
            )));
            res.headers_mut()
                .insert("content-length", (50 * 1024 * 1024).into());
            return res;
        }
        match path.ends_with("/manifests/1.0") || path.ends_with("/manifests/2.0") {
            true => (StatusCode::OK, [("docker-content-digest", DIGEST)]).into_response(),
            false => (StatusCode::NOT_FOUND, [REGISTRY_HEADER]).into_response(),
        }
    });
    serve("127.0.0.1", app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_tag_list_is_read_to_its_cap_and_the_daemon_lives() {
    let registry = flooding_registry().await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "shop",
        "web",
        &[("web", &format!("{registry}/team/web:1.0"))],
        1,
    )
    .await;
    env.deployment(
        "shop",
        "api",
        &[("api", &format!("{registry}/team/api:1.0"))],
        1,
    )
    .await;
    env.write_dep("web_shop.dep", "1.1\n");
    env.write_dep("api_shop.dep", "1.1\n");
    let daemon = daemon(&env, &[]).await;
    for name in ["web", "api"] {
        let r = record_where(&env, &key(name, "shop"), "the missing tag refused", |r| {
            r.status == ServiceStatus::Failed
        })
        .await;
        assert!(
            r.message
                .contains(&format!("tag 1.1 not found in {registry}/team/{name}"))
                && !r.message.contains("closest"),
            "{}",
            r.message
        );
    }
    assert!(
        daemon.log_text().contains("registry answer too large"),
        "{}",
        daemon.log_text()
    );
    // Still deploying: a tag that exists goes through.
    env.write_dep("web_shop.dep", "2.0\n");
    env.wait_image("shop", "web", &format!("{registry}/team/web:2.0"))
        .await;
    let peak = common::peak_rss_mib(daemon.pid());
    assert!(
        peak < 150.0,
        "peak RSS {peak:.0} MiB after 66 MiB of tag lists"
    );
    assert_eq!(env.patches("shop", "api"), 0);
}

/// A registry with a Bearer realm of its own: Basic `ci:s3cret` gets the private token, anyone
/// else an anonymous one, which the private repository refuses.
async fn token_registry(realm_requests: Arc<AtomicUsize>) -> String {
    let addr = Arc::new(Mutex::new(String::new()));
    let shared = addr.clone();
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::get(move |headers: HeaderMap| {
                realm_requests.fetch_add(1, Ordering::SeqCst);
                async move {
                    use base64::Engine;
                    let basic = format!(
                        "Basic {}",
                        base64::engine::general_purpose::STANDARD.encode("ci:s3cret")
                    );
                    let private = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some(basic.as_str());
                    let token = if private {
                        "private-token"
                    } else {
                        "anon-token"
                    };
                    axum::Json(json!({"token": token, "expires_in": 300}))
                }
            }),
        )
        .fallback(move |req: Request| {
            let realm = format!("http://{}/token", shared.lock().expect("addr"));
            async move {
                let authed = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    == Some("Bearer private-token");
                if !authed {
                    let mut h = HeaderMap::new();
                    let challenge = format!("Bearer realm=\"{realm}\",service=\"fake\"");
                    h.insert("www-authenticate", challenge.parse().expect("header"));
                    return (StatusCode::UNAUTHORIZED, h).into_response();
                }
                let path = req.uri().path();
                if path.ends_with("/tags/list") {
                    let tags =
                        json!({"name": "team/private", "tags": ["1.0", "1.1", "secret-2.0"]});
                    return axum::Json(tags).into_response();
                }
                match path.ends_with("/manifests/1.1") {
                    true => (StatusCode::OK, [("docker-content-digest", DIGEST)]).into_response(),
                    false => (StatusCode::NOT_FOUND, [REGISTRY_HEADER]).into_response(),
                }
            }
        });
    let served = serve("127.0.0.1", app).await;
    *addr.lock().expect("addr") = served.clone();
    served
}

/// A `kubernetes.io/dockerconfigjson` Secret `regcred` in `ns` for `registry`, named by the
/// Deployment `name`'s pods.
async fn pulls_with_secret(env: &Env, ns: &str, name: &str, registry: &str) {
    use base64::Engine;
    let config = json!({"auths": {registry: {"username": "ci", "password": "s3cret"}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "regcred"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config.to_string())}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(env.client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .expect("create secret");
    Api::<Deployment>::namespaced(env.client.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"template": {"spec": {
                "imagePullSecrets": [{"name": "regcred"}]}}}})),
        )
        .await
        .expect("patch");
    env.wait_ready(ns, name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_fetched_with_one_namespace_s_credentials_never_serves_another() {
    let realm_requests = Arc::new(AtomicUsize::new(0));
    let registry = token_registry(realm_requests.clone()).await;
    let image = |tag: &str| format!("{registry}/team/private:{tag}");
    let env = Env::new(SimConfig::default()).await;
    for ns in ["a", "b"] {
        env.deployment(ns, "web", &[("web", &image("1.0"))], 1)
            .await;
    }
    pulls_with_secret(&env, "a", "web", &registry).await;
    let _daemon = daemon(&env, &[]).await;
    env.write_dep("web_a.dep", "1.1\n");
    let a = record_where(&env, &key("web", "a"), "a deployed with its secret", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert!(
        a.message.is_empty() || !a.message.contains("unauthorized"),
        "{}",
        a.message
    );
    // Namespace b has no secret: the private token a fetched is not b's to use. Its anonymous
    // token is refused, which proves nothing (its nodes may pull with their own identity): b
    // deploys unchecked, and never with the private answer (its digest).
    env.write_dep("web_b.dep", "1.1\n");
    let b = record_where(&env, &key("web", "b"), "b deployed unchecked", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    assert!(!b.message.contains("secret-2.0"), "{}", b.message);
    let rows = env
        .store()
        .history(Some(&key("web", "b")), 5)
        .await
        .expect("history");
    assert_eq!(rows[0].digests, "web=not checked", "b never got a's answer");
    let rows = env
        .store()
        .history(Some(&key("web", "a")), 5)
        .await
        .expect("history");
    assert_eq!(rows[0].digests, format!("web={DIGEST}"));
    assert!(
        realm_requests.load(Ordering::SeqCst) >= 2,
        "each identity asked for its own token"
    );
}

/// A registry on 127.0.0.1 whose challenge names `realm`.
async fn registry_with_realm(realm: String) -> String {
    let app = axum::Router::new().fallback(move |req: Request| {
        let realm = realm.clone();
        async move {
            if req.headers().get("authorization").is_none() {
                let mut h = HeaderMap::new();
                let challenge = format!("Bearer realm=\"{realm}\"");
                h.insert("www-authenticate", challenge.parse().expect("header"));
                return (StatusCode::UNAUTHORIZED, h).into_response();
            }
            (StatusCode::OK, [("docker-content-digest", DIGEST)]).into_response()
        }
    });
    serve("127.0.0.1", app).await
}

/// A server on `ip` that counts its requests (and, asked, redirects them to `to`).
async fn counting(ip: &str, count: Arc<AtomicUsize>, to: Option<String>) -> String {
    let app = axum::Router::new().fallback(move |_req: Request| {
        count.fetch_add(1, Ordering::SeqCst);
        let to = to.clone();
        async move {
            match to {
                Some(to) => (StatusCode::FOUND, [("location", to)]).into_response(),
                None => axum::Json(json!({"token": "stolen"})).into_response(),
            }
        }
    });
    serve(ip, app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_token_realm_gets_no_credentials_and_no_redirect_is_followed_off_host() {
    // The realm is plain HTTP on another host than the registry: the credentials stay home.
    let elsewhere = Arc::new(AtomicUsize::new(0));
    let other = counting("127.0.0.2", elsewhere.clone(), None).await;
    let registry = registry_with_realm(format!("http://{other}/internal/creds")).await;
    // A second registry whose own token service redirects to that other host.
    let redirected = Arc::new(AtomicUsize::new(0));
    let hop = counting(
        "127.0.0.1",
        redirected.clone(),
        Some(format!("http://{other}/internal/creds")),
    )
    .await;
    let second = registry_with_realm(format!("http://{hop}/token")).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "shop",
        "web",
        &[("web", &format!("{registry}/team/web:1.0"))],
        1,
    )
    .await;
    env.deployment(
        "shop",
        "api",
        &[("api", &format!("{second}/team/api:1.0"))],
        1,
    )
    .await;
    pulls_with_secret(&env, "shop", "web", &registry).await;
    let daemon = daemon(&env, &[]).await;
    env.write_dep("web_shop.dep", "1.1\n");
    env.write_dep("api_shop.dep", "1.1\n");
    for name in ["web", "api"] {
        record_where(&env, &key(name, "shop"), "deployed unchecked", |r| {
            r.status == ServiceStatus::Succeeded
        })
        .await;
    }
    let log = daemon.log_text();
    assert!(log.contains("the credentials were not sent"), "{log}");
    assert!(log.contains("redirected to another host"), "{log}");
    assert!(log.contains("not checked"), "{log}");
    assert_eq!(
        elsewhere.load(Ordering::SeqCst),
        0,
        "the other host was never asked"
    );
    assert!(redirected.load(Ordering::SeqCst) >= 1);
    assert!(!log.contains("s3cret") && !log.contains("stolen"), "{log}");
}

/// A registry whose tags are escape sequences and whose digest header is 100 KB.
async fn lying_registry() -> String {
    let app = axum::Router::new().fallback(|req: Request| async move {
        let path = req.uri().path().to_string();
        if path.ends_with("/tags/list") {
            let tags = json!({"tags": ["1.0", "1.1\u{1b}[1A\u{1b}[2K", "\u{1b}]0;pwned\u{7}", "2.0", "1.9"]});
            return axum::Json(tags).into_response();
        }
        let huge = format!("sha256:{}", "a".repeat(100_000));
        match path.ends_with("/manifests/2.0") || path.ends_with("/manifests/1.0") {
            true => (StatusCode::OK, [("docker-content-digest", huge)]).into_response(),
            false => (StatusCode::NOT_FOUND, [REGISTRY_HEADER]).into_response(),
        }
    });
    serve("127.0.0.1", app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_and_digests_off_their_grammar_are_never_stored_or_printed() {
    let registry = lying_registry().await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "shop",
        "web",
        &[("web", &format!("{registry}/team/web:1.0"))],
        1,
    )
    .await;
    let _daemon = daemon(&env, &[]).await;
    env.write_dep("web_shop.dep", "2.0\n");
    record_where(&env, &key("web", "shop"), "2.0 deployed", |r| {
        r.status == ServiceStatus::Succeeded
    })
    .await;
    let history = env
        .store()
        .history(Some(&key("web", "shop")), 10)
        .await
        .expect("history");
    assert!(
        history.iter().all(|h| h.digests.len() < 200),
        "no 100 KB digest stored: {:?}",
        history.iter().map(|h| h.digests.len()).collect::<Vec<_>>()
    );
    env.write_dep("web_shop.dep", "1.1\n");
    let r = record_where(&env, &key("web", "shop"), "1.1 refused", |r| {
        r.status == ServiceStatus::Failed
    })
    .await;
    assert!(
        r.message.contains("closest: 1.9, 1.0, 2.0 ("),
        "{}",
        r.message
    );
    let state = env.state.display().to_string();
    for args in [vec!["status"], vec!["history", "shop/web"]] {
        let mut full = args.clone();
        full.extend(["--state-dir", &state]);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(&full)
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.stdout.iter().any(|b| *b == 0x1b || *b == 0x07),
            "{args:?} printed a control byte: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_registry_holds_no_worker_from_another_service() {
    // Accepts connections and never answers.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hung_addr = hung.local_addr().expect("addr").to_string();
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(socket);
        }
    });
    let healthy = flooding_registry().await;
    let env = Env::new(SimConfig::default()).await;
    let services = 150;
    for i in 0..services {
        env.deployment(
            "hung",
            &format!("s{i}"),
            &[("app", &format!("{hung_addr}/team/s:1.0"))],
            1,
        )
        .await;
    }
    env.deployment(
        "shop",
        "web",
        &[("web", &format!("{healthy}/team/web:1.0"))],
        1,
    )
    .await;
    // A minute of bounded wait: the hung deploys wait all of it, on no worker.
    let _daemon = env
        .daemon(&[
            "--registry-check",
            "on",
            "--registry-wait",
            "60s",
            "--workers",
            "8",
        ])
        .await;
    for i in 0..services {
        env.write_dep(&format!("s{i}_hung.dep"), "1.1\n");
    }
    wait_for("the hung registry asked", Duration::from_secs(30), || {
        let n = accepted.load(Ordering::SeqCst);
        async move { (n >= 4).then_some(()) }
    })
    .await;
    env.write_dep("web_shop.dep", "2.0\n");
    // Well inside the hung deploys' minute: the unrelated service was never behind them.
    let deadline = Duration::from_secs(30);
    wait_for(
        "web patched while the hung registry holds its deploys",
        deadline,
        || async {
            (env.image("shop", "web").await == format!("{healthy}/team/web:2.0")).then_some(())
        },
    )
    .await;
    assert_eq!(
        env.patches("hung", "s0"),
        0,
        "the hung deploys are still waiting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_registry_cannot_be_asked_fails_at_plan() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("shop", "web", &[("web", "127.0.0.1:99999/team/web:1.0")], 1)
        .await;
    env.deployment(
        "shop",
        "api",
        &[("api", "registry.example/team/api:1.0")],
        1,
    )
    .await;
    let daemon = env.daemon(&["--registry-check", "off"]).await;
    // The version takes the running repository, whose port is not a port.
    env.write_dep("web_shop.dep", "1.1\n");
    let r = record_where(&env, &key("web", "shop"), "web refused at plan", |r| {
        r.status == ServiceStatus::Failed
    })
    .await;
    assert!(r.message.contains("port 99999"), "{}", r.message);
    // A full image in the file: the file itself is refused, named.
    env.write_dep("api_shop.dep", "registry.example:0/team/api:1.1\n");
    wait_for("the file refused", Duration::from_secs(30), || {
        let log = daemon.log_text();
        async move { (log.contains("api_shop.dep") && log.contains("port 0")).then_some(()) }
    })
    .await;
    assert_eq!(env.all_patches(), 0);
}
