//! The HTTP API, metrics, OpenAPI document and status page, driven over real HTTP against the
//! `depwatch run` binary on the simulated cluster.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::daemon::Env;
use common::{get_metrics, sample, wait_for};
use depwatch::sim::SimConfig;
use serde_json::{json, Value};

const TOKEN: &str = "tok-0123456789abcdef";

async fn setup(env: &Env) -> (common::daemon::Daemon, String) {
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("# who may deploy\nrelease-bot:{TOKEN}\n")).expect("tokens");
    let daemon = env
        .daemon(&[
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
            "--rollout-timeout",
            "20s",
        ])
        .await;
    let url = daemon.http_url();
    (daemon, url)
}

fn dep_files(env: &Env) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(&env.deps)
        .expect("deps")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// GET a JSON document; `None` if the request or the JSON fails.
async fn get_json(http: &reqwest::Client, url: String) -> Option<Value> {
    http.get(url).send().await.ok()?.json().await.ok()
}

async fn get_status(http: &reqwest::Client, url: String) -> u16 {
    http.get(url).send().await.expect("get").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_deploys_through_the_file_with_idempotency_auth_and_clear_errors() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.wait_ready("demo", "web").await;
    let (_daemon, url) = setup(&env).await;
    let http = reqwest::Client::new();

    assert_eq!(
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200
    );
    wait_for("readyz", Duration::from_secs(10), || async {
        (http
            .get(format!("{url}/readyz"))
            .send()
            .await
            .ok()?
            .status()
            == 200)
            .then_some(())
    })
    .await;
    let metrics_before = get_metrics(&http, &url).await;

    let body = json!({"service": "web", "namespace": "demo", "version": "1.1.0"});
    // No token: 401, nothing written.
    let r = http
        .post(format!("{url}/api/v1/deploys"))
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.expect("json")["error"]
        .as_str()
        .expect("error")
        .contains("Bearer"));
    let r = http
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth("wrong-token-value")
        .json(&body)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 401);
    assert!(
        dep_files(&env).is_empty(),
        "nothing written without a valid token"
    );

    // Bad bodies: 4xx naming the field, nothing written.
    let post = |b: String| {
        http.post(format!("{url}/api/v1/deploys"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    for (raw, status, field) in [
        ("{not json".to_string(), 400, None),
        (
            json!({"service": "Web_App", "namespace": "demo", "version": "1.1.0"}).to_string(),
            422,
            Some("service"),
        ),
        (
            json!({"service": "web", "namespace": "de_mo", "version": "1.1.0"}).to_string(),
            422,
            Some("namespace"),
        ),
        (
            json!({"service": "web", "namespace": "demo", "image": "Not A/Valid:Image"})
                .to_string(),
            422,
            Some("image"),
        ),
        (
            json!({"service": "web", "namespace": "demo", "version": "1.0 beta"}).to_string(),
            422,
            Some("version"),
        ),
        (
            json!({"service": "web", "namespace": "demo"}).to_string(),
            422,
            Some("version"),
        ),
        (
            json!({"service": "web", "namespace": "demo", "version": "1", "colour": "blue"})
                .to_string(),
            422,
            Some("colour"),
        ),
        (
            // Valid Kubernetes names, but too long together for a file name.
            json!({"service": format!("{}.{}", "a".repeat(63), "b".repeat(180)), "namespace": "demo", "version": "1"})
                .to_string(),
            422,
            Some("service"),
        ),
        (
            format!("{{\"service\": \"{}\"}}", "x".repeat(100_000)),
            413,
            None,
        ),
    ] {
        let r = post(raw.clone()).await.expect("post");
        assert_eq!(r.status().as_u16(), status, "{}", &raw[..raw.len().min(80)]);
        let e: Value = r.json().await.expect("json error");
        assert!(e["error"].is_string(), "{e}");
        if let Some(f) = field {
            assert_eq!(e["field"], f, "{e}");
        }
    }
    assert!(
        dep_files(&env).is_empty(),
        "nothing written for bad requests"
    );

    // Idempotent POST: twice with the same key is one request and one deploy.
    let send = |b: &Value, key: &str| {
        http.post(format!("{url}/api/v1/deploys"))
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", key)
            .json(b)
            .send()
    };
    let first: Value = {
        let r = send(&body, "k-1").await.expect("post");
        assert_eq!(r.status(), 202);
        r.json().await.expect("json")
    };
    let second: Value = {
        let r = send(&body, "k-1").await.expect("post");
        assert_eq!(r.status(), 202);
        r.json().await.expect("json")
    };
    assert_eq!(first["id"], second["id"]);
    let other = json!({"service": "web", "namespace": "demo", "version": "9.9.9"});
    assert_eq!(
        send(&other, "k-1").await.expect("post").status(),
        409,
        "same key, different body"
    );
    let id = first["id"].as_str().expect("id").to_string();
    let done = wait_for(
        "the request to succeed",
        Duration::from_secs(30),
        || async {
            let v: Value = get_json(&http, format!("{url}/api/v1/requests/{id}")).await?;
            (v["status"] == "succeeded").then_some(v)
        },
    )
    .await;
    assert_eq!(done["actor"], "release-bot");
    assert_eq!(
        done["deploy"]["actor"], "release-bot",
        "the token's name is the actor"
    );
    assert_eq!(env.image("demo", "web").await, "example.com/web:1.1.0");
    assert_eq!(env.patches("demo", "web"), 1, "one request, one deploy");
    assert_eq!(dep_files(&env), vec!["web_demo.dep".to_string()]);
    assert_eq!(
        get_status(&http, format!("{url}/api/v1/requests/nope")).await,
        404
    );

    // Reads.
    let services: Value = get_json(&http, format!("{url}/api/v1/services"))
        .await
        .expect("json");
    assert_eq!(services[0]["name"], "web");
    assert_eq!(services[0]["status"], "succeeded");
    assert_eq!(services[0]["running"], "web=example.com/web:1.1.0");
    let one: Value = get_json(&http, format!("{url}/api/v1/services/demo/web"))
        .await
        .expect("json");
    assert_eq!(one["history"][0]["outcome"], "succeeded");
    assert_eq!(
        get_status(&http, format!("{url}/api/v1/services/demo/nope")).await,
        404
    );
    let deploys: Value = get_json(
        &http,
        format!("{url}/api/v1/deploys?service=demo/web&limit=1"),
    )
    .await
    .expect("json");
    assert_eq!(deploys.as_array().map(Vec::len), Some(1));
    assert_eq!(
        get_status(&http, format!("{url}/api/v1/deploys?service=bad")).await,
        400
    );

    // A failing version through the API ends rolled back; retry and rollback endpoints work.
    let bad = json!({"service": "web", "namespace": "demo", "version": "2.0.0-fail-pull"});
    let r: Value = send(&bad, "k-2")
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    let id2 = r["id"].as_str().expect("id").to_string();
    wait_for(
        "the bad request to be rolled back",
        Duration::from_secs(30),
        || async {
            let v: Value = get_json(&http, format!("{url}/api/v1/requests/{id2}")).await?;
            (v["status"] == "rolled_back").then_some(())
        },
    )
    .await;
    let patches = env.patches("demo", "web");
    assert_eq!(
        http.post(format!("{url}/api/v1/services/demo/web/retry"))
            .send()
            .await
            .expect("post")
            .status(),
        401
    );
    let r = http
        .post(format!("{url}/api/v1/services/demo/web/retry"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    wait_for(
        "the retried version to be patched",
        Duration::from_secs(20),
        || async { (env.patches("demo", "web") > patches).then_some(()) },
    )
    .await;
    let retried = wait_for(
        "the retry to be rolled back again",
        Duration::from_secs(30),
        || async {
            let v: Value = get_json(&http, format!("{url}/api/v1/services/demo/web")).await?;
            (v["service"]["status"] == "rolled_back").then_some(v)
        },
    )
    .await;
    assert_eq!(retried["history"][0]["trigger"], "operator", "{retried}");
    assert_eq!(
        retried["history"][0]["actor"], "release-bot",
        "the token's name is recorded for retries too"
    );
    let r = http
        .post(format!("{url}/api/v1/services/demo/web/rollback"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    let file = std::fs::read_to_string(env.deps.join("web_demo.dep")).expect("file");
    assert!(
        file.starts_with("# rolled back by release-bot at ") && file.ends_with("\n1.1.0\n"),
        "the plain version stays a plain version: {file}"
    );
    assert_eq!(
        http.post(format!("{url}/api/v1/services/demo/nope/rollback"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .expect("post")
            .status(),
        404
    );

    // A request replaced by a newer one before it was deployed ends superseded.
    let v3: Value = send(
        &json!({"service": "web", "namespace": "demo", "version": "3.0.0-hang"}),
        "k-3",
    )
    .await
    .expect("post")
    .json()
    .await
    .expect("json");
    let v4: Value = send(
        &json!({"service": "web", "namespace": "demo", "version": "1.1.0"}),
        "k-4",
    )
    .await
    .expect("post")
    .json()
    .await
    .expect("json");
    assert!(v3["id"].is_string() && v4["id"].is_string(), "{v3} {v4}");
    let (id3, id4) = (
        v3["id"].as_str().unwrap_or_default().to_string(),
        v4["id"].as_str().unwrap_or_default().to_string(),
    );
    let seen = std::sync::Mutex::new(String::new());
    common::wait_for_or(
        "the newer request to win",
        Duration::from_secs(30),
        || async {
            let a: Value = get_json(&http, format!("{url}/api/v1/requests/{id3}")).await?;
            let b: Value = get_json(&http, format!("{url}/api/v1/requests/{id4}")).await?;
            *seen.lock().expect("seen") = format!("{a}\n{b}");
            (a["status"] == "superseded" && b["status"] == "succeeded").then_some(())
        },
        || format!("the requests: {}", seen.lock().expect("seen")),
    )
    .await;

    // The CLI reads the same state through the API.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(args)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let status: Value = serde_json::from_str(&cli(&[
        "status",
        "--api",
        &url,
        "--json",
        "--state-dir",
        "/nonexistent",
    ]))
    .expect("json");
    assert_eq!(status[0]["name"], "web");
    let history = cli(&[
        "history",
        "demo/web",
        "--api",
        &url,
        "--state-dir",
        "/nonexistent",
    ]);
    assert!(
        history.contains("rolled_back") && history.contains("succeeded"),
        "{history}"
    );

    // Metrics parse and moved.
    let after = get_metrics(&http, &url).await;
    let ok = "depwatch_deploys_total{outcome=\"succeeded\"}";
    assert!(
        sample(&after, ok) >= sample(&metrics_before, ok) + 1.0,
        "deploy counter moved"
    );
    assert!(sample(&after, "depwatch_deploys_total{outcome=\"rolled_back\"}") >= 1.0);
    assert!(
        after.iter().any(
            |(s, v)| s.starts_with("depwatch_kubernetes_requests_total{")
                && s.contains("verb=\"patch\"")
                && *v >= 2.0
        ),
        "kube requests by verb and code"
    );
    assert!(after
        .iter()
        .any(|(s, _)| s.starts_with("depwatch_change_to_patch_seconds_bucket")));
    assert!(after
        .iter()
        .any(|(s, _)| s.starts_with("depwatch_services{")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_openapi_document_and_events_stream() {
    let env = Env::new(SimConfig::default()).await;
    let (_daemon, url) = setup(&env).await;
    let http = reqwest::Client::new();
    let doc: Value = get_json(&http, format!("{url}/api/v1/openapi.json"))
        .await
        .expect("json");
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(p, item)| {
            item.as_object()
                .into_iter()
                .flatten()
                .map(move |(m, _)| (m.to_uppercase(), p.clone()))
        })
        .filter(|(m, _)| ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&m.as_str()))
        .collect();
    // The routes the server answers, probed one by one.
    let served = [
        ("GET", "/"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/leaderz"),
        ("GET", "/metrics"),
        ("GET", "/api/v1/services"),
        ("GET", "/api/v1/refused-files"),
        ("GET", "/api/v1/services/{namespace}/{name}"),
        ("GET", "/api/v1/deploys"),
        ("POST", "/api/v1/deploys"),
        ("GET", "/api/v1/requests/{id}"),
        ("POST", "/api/v1/services/{namespace}/{name}/retry"),
        ("POST", "/api/v1/services/{namespace}/{name}/rollback"),
        ("POST", "/api/v1/services/{namespace}/{name}/promote"),
        ("POST", "/api/v1/services/{namespace}/{name}/deploy-now"),
        ("POST", "/api/v1/services/{namespace}/{name}/approve"),
        ("POST", "/api/v1/services/{namespace}/{name}/reject"),
        ("GET", "/api/v1/services/{namespace}/{name}/approvals"),
        ("POST", "/api/v1/services/{namespace}/{name}/suspend"),
        ("POST", "/api/v1/services/{namespace}/{name}/resume"),
        ("POST", "/api/v1/services/{namespace}/{name}/forget"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/openapi.json"),
    ];
    for (m, p) in served {
        assert!(
            documented.contains(&(m.to_string(), p.to_string())),
            "{m} {p} is served but not documented"
        );
    }
    for (m, p) in &documented {
        let concrete = p
            .replace("{namespace}", "demo")
            .replace("{name}", "web")
            .replace("{id}", "x");
        let req = http.request(m.parse().expect("method"), format!("{url}{concrete}"));
        let resp = if p.contains("events") {
            tokio::time::timeout(Duration::from_secs(5), req.send())
                .await
                .expect("headers in time")
                .expect("send")
        } else {
            req.send().await.expect("send")
        };
        let code = resp.status().as_u16();
        assert!(code != 405, "{m} {p} is documented but not routed ({code})");
        assert!(
            code != 404 || p.contains('{'),
            "{m} {p} is documented but answers 404"
        );
        if p.contains("events") {
            assert_eq!(resp.headers()["content-type"], "text/event-stream");
            // The stream announces the current state at once.
            let mut resp = resp;
            let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk())
                .await
                .expect("an event in time")
                .expect("chunk")
                .expect("data");
            assert!(String::from_utf8_lossy(&chunk).contains("event: change"));
        }
    }
    assert_eq!(served.len(), documented.len(), "documented: {documented:?}");

    // Not ready while the Kubernetes API server is unreachable.
    let mut env = env;
    env.sim.stop().await;
    let r = http
        .get(format!("{url}/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(r.status(), 503);
    let e: Value = r.json().await.expect("json");
    assert!(
        e["error"]
            .as_str()
            .expect("error")
            .contains("Kubernetes API server"),
        "{e}"
    );
    assert_eq!(
        http.get(format!("{url}/healthz"))
            .send()
            .await
            .expect("healthz")
            .status(),
        200,
        "still alive"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_the_api_is_read_only() {
    let env = Env::new(SimConfig::default()).await;
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    let r = reqwest::Client::new()
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN)
        .json(&json!({"service": "web", "namespace": "demo", "version": "1"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 403);
    assert!(r.json::<Value>().await.expect("json")["error"]
        .as_str()
        .expect("error")
        .contains("--api-token-file"));
    assert!(dep_files(&env).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_deploy_edits_the_file_in_its_own_form() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "prod",
        "payments",
        &[
            ("payments", "r.example/payments:1.42.0"),
            ("envoy", "r.example/envoy:1.30"),
        ],
        1,
    )
    .await;
    env.wait_ready("prod", "payments").await;
    let yaml = "# payments, owned by team-pay\nimages:\n  payments: r.example/payments:1.42.0  # CI\n  envoy: r.example/envoy:1.30\nrolloutTimeout: 45s\nrollback: false\n";
    env.write_dep("payments_prod.dep", yaml);
    let (daemon, url) = setup(&env).await;
    let store = env.store();
    let key = depwatch::domain::ServiceKey::new("payments", "prod").expect("key");
    wait_for("the file recorded", Duration::from_secs(30), || async {
        let r = store.service(&key).await.ok()??;
        (!r.desired.is_empty()).then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN)
        .json(&json!({"service": "payments", "namespace": "prod", "version": "1.43.0"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let text = std::fs::read_to_string(env.deps.join("payments_prod.dep")).expect("file");
    let body = text
        .split_once('\n')
        .filter(|(first, _)| first.starts_with("# depwatch request "))
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("a request header first: {text}"));
    assert_eq!(
        body,
        yaml.replace("payments:1.42.0", "payments:1.43.0"),
        "only the changed container's value moves; settings, the sidecar and comments stay"
    );
    env.wait_image("prod", "payments", "r.example/payments:1.43.0")
        .await;
    let images = env.images("prod", "payments").await;
    assert!(
        images.contains(&("envoy".to_string(), "r.example/envoy:1.30".to_string())),
        "{images:?}"
    );
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_request_for_a_workload_that_does_not_exist_is_404_and_writes_nothing() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("demo", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let (_daemon, url) = setup(&env).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN)
        .json(&json!({"service": "wbe", "namespace": "demo", "version": "1.1.0"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("json");
    let error = body["error"].as_str().expect("error");
    assert!(error.contains("did you mean web?"), "{error}");
    assert_eq!(body["field"], "service");
    assert!(
        dep_files(&env).is_empty(),
        "no file left behind: {:?}",
        dep_files(&env)
    );
    // The workload that exists is deployed as before.
    let r = http
        .post(format!("{url}/api/v1/deploys"))
        .bearer_auth(TOKEN)
        .json(&json!({"service": "web", "namespace": "demo", "version": "1.1.0"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 202);
    assert_eq!(dep_files(&env), ["web_demo.dep"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_the_server_does_not_answer_to_gets_421() {
    let env = Env::new(SimConfig::default()).await;
    let daemon = env
        .daemon(&["--http-allowed-hosts", "depwatch.depwatch.svc"])
        .await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();
    let ask = |host: &'static str, path: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(format!("{url}{path}"))
                .header("host", host)
                .send()
                .await
                .expect("get")
        }
    };
    // DNS rebinding: a page on attacker.example resolves its name to this address.
    for path in ["/", "/api/v1/services", "/metrics"] {
        let r = ask("attacker.example:8080", path).await;
        assert_eq!(r.status().as_u16(), 421, "{path}");
        let body: Value = r.json().await.expect("json");
        assert!(body["error"]
            .as_str()
            .is_some_and(|e| e.contains("--http-allowed-hosts")));
    }
    for host in ["localhost:8080", "127.0.0.1", "depwatch.depwatch.svc:8080"] {
        assert_eq!(
            ask(host, "/api/v1/services").await.status().as_u16(),
            200,
            "{host}"
        );
    }
}

/// Follow `Link: <…>; rel="next"` from `first` to the last page: every page's rows, and the
/// `X-Total-Count` of the first.
async fn walk_pages(http: &reqwest::Client, url: &str, first: &str) -> (Vec<Vec<Value>>, usize) {
    let mut pages = Vec::new();
    let mut total = None;
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        assert!(pages.len() < 100, "the pages never end");
        let r = http.get(format!("{url}{path}")).send().await.expect("page");
        assert_eq!(r.status(), 200, "{path}");
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        total = total.or_else(|| header("x-total-count").and_then(|t| t.parse().ok()));
        next = header("link").and_then(|l| depwatch::client::link_next(&l));
        pages.push(r.json::<Vec<Value>>().await.expect("json"));
    }
    (pages, total.unwrap_or_default())
}

/// 1,250 services and 120 deploys of one: the API answers them a page at a time (a default
/// of 100, at most 1000, `Link` to the next page, `X-Total-Count`), the page shows the first
/// 200 with the count and a link, and `depwatch status` and `history` still show everything,
/// locally and through the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_deploys_are_paged_and_the_cli_follows_the_pages() {
    use depwatch::domain::ServiceKey;
    use depwatch::domain::{DeployOutcome, ServiceStatus};
    use depwatch::store::{DeployRecord, ServiceChange};
    const SERVICES: usize = 1250;
    let env = Env::new(SimConfig::default()).await;
    {
        // Rows no file names, so the daemon leaves them as they are.
        let store = env.store();
        for i in 0..SERVICES {
            let key = ServiceKey::new(&format!("svc-{i:04}"), "load").expect("key");
            let change = ServiceChange::default()
                .status(ServiceStatus::Unmanaged)
                .suspended(i % 500 == 7);
            store.change_service(&key, change).await.expect("service");
        }
        for _ in 0..120 {
            let id = store
                .start_deploy(&DeployRecord {
                    namespace: "load".into(),
                    name: "svc-0000".into(),
                    ..DeployRecord::default()
                })
                .await
                .expect("deploy");
            store
                .finish_deploy(id, DeployOutcome::Succeeded, "")
                .await
                .expect("finish");
        }
    }
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    let http = reqwest::Client::new();

    let (pages, total) = walk_pages(&http, &url, "/api/v1/services").await;
    assert_eq!(total, SERVICES);
    assert_eq!(pages.len(), 13, "a default page is 100 long");
    assert!(pages.iter().all(|p| p.len() <= 100));
    let names: Vec<String> = pages
        .iter()
        .flatten()
        .map(|s| s["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let want: Vec<String> = (0..SERVICES).map(|i| format!("svc-{i:04}")).collect();
    assert_eq!(names, want, "every service once, in order");
    let (suspended, total) =
        walk_pages(&http, &url, "/api/v1/services?status=suspended&limit=2").await;
    let suspended: Vec<&str> = suspended
        .iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(
        (suspended, total),
        (vec!["svc-0007", "svc-0507", "svc-1007"], 3)
    );
    for bad in [
        "/api/v1/services?limit=0",
        "/api/v1/services?limit=1001",
        "/api/v1/services?after=no-slash",
        "/api/v1/services?status=nonsense",
        "/api/v1/refused-files?limit=5000",
    ] {
        let r = http.get(format!("{url}{bad}")).send().await.expect("get");
        assert_eq!(r.status(), 400, "{bad}");
    }

    let (deploys, _) = walk_pages(
        &http,
        &url,
        "/api/v1/deploys?service=load/svc-0000&limit=50",
    )
    .await;
    assert_eq!(
        deploys.iter().map(Vec::len).collect::<Vec<_>>(),
        [50, 50, 20]
    );
    let ids: Vec<i64> = deploys
        .iter()
        .flatten()
        .filter_map(|d| d["id"].as_i64())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "newest first, each once"
    );

    let page = http
        .get(format!("{url}/"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert_eq!(
        page.matches("<tr data-service=").count(),
        200,
        "the first 200"
    );
    assert!(
        page.contains("1050 more services")
            && page.contains("href=\"/api/v1/services?limit=1000\""),
        "the count and the link"
    );
    let suspended_page = http
        .get(format!("{url}/?status=suspended"))
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("html");
    assert_eq!(suspended_page.matches("<tr data-service=").count(), 3);

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let state = env.state.to_str().expect("utf-8");
    for target in [["--api", url.as_str()], ["--state-dir", state]] {
        let status = cli(&[&["status", "--json"][..], &target].concat());
        let status: Vec<Value> = serde_json::from_str(&status).expect("json");
        assert_eq!(status.len(), SERVICES, "{target:?}");
        let history = cli(&[
            &["history", "load/svc-0000", "--limit", "1500", "--json"][..],
            &target,
        ]
        .concat());
        let history: Vec<Value> = serde_json::from_str(&history).expect("json");
        assert_eq!(history.len(), 120, "{target:?}");
    }
    daemon.stop();
}

/// Text from outside in the record (a registry's tag, a pod's message) printed by `status` and
/// `history` through the API, in every output, and shown on the page: escape sequences, the
/// bell, C1 controls, bidirectional and zero-width characters are shown, never obeyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_outside_is_printed_escaped_through_the_api_and_on_the_page() {
    use depwatch::domain::ServiceKey;
    use depwatch::domain::{DeployOutcome, Images, ServiceStatus};
    use depwatch::store::{DeployRecord, ServiceChange};
    let hostile =
        "1.1\u{1b}[1A\u{1b}[2K \u{1b}]0;pwned\u{7} \u{9b}2J web\u{202e}ved\u{2066}x\u{200b}";
    let env = Env::new(SimConfig::default()).await;
    {
        let store = env.store();
        let key = ServiceKey::new("web", "prod").expect("key");
        let image = format!("example.com/web:{hostile}");
        let images: Images = [("web".to_string(), image.clone())].into_iter().collect();
        let change = ServiceChange::default()
            .status(ServiceStatus::Unmanaged)
            .desired(images)
            .message(format!("tag not found; closest: {hostile}"));
        store.change_service(&key, change).await.expect("service");
        let row = DeployRecord {
            namespace: "prod".into(),
            name: "web".into(),
            to_image: format!("web={image}"),
            ..DeployRecord::default()
        };
        let id = store.start_deploy(&row).await.expect("row");
        store
            .finish_deploy(id, DeployOutcome::Failed, hostile)
            .await
            .expect("finish");
    }
    let daemon = env.daemon(&[]).await;
    let url = daemon.http_url();
    let obeyed = |b: &[u8]| {
        let text = String::from_utf8_lossy(b);
        text.chars()
            .filter(|c| *c != '\n' && depwatch::safefs::hidden(*c))
            .collect::<String>()
    };
    for args in [
        vec!["status"],
        vec!["status", "-o", "wide"],
        vec!["status", "-o", "json"],
        vec!["status", "-o", "yaml"],
        vec!["history", "prod/web"],
        vec!["history", "prod/web", "-o", "json"],
        vec!["history", "prod/web", "-o", "yaml"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(&args)
            .args(["--api", &url, "--state-dir", "/nonexistent"])
            .env("NO_COLOR", "1")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(text.contains("pwned"), "{args:?} shows the text: {text}");
        assert_eq!(obeyed(&out.stdout), "", "{args:?} printed: {text:?}");
        if args.contains(&"json") {
            let v: Value = serde_json::from_str(&text).expect("json");
            assert!(
                v.to_string().contains("\\u001b"),
                "JSON keeps the text: {v}"
            );
        }
    }
    let page = reqwest::get(format!("{url}/"))
        .await
        .expect("page")
        .bytes()
        .await
        .expect("html");
    let page_text = String::from_utf8_lossy(&page);
    assert!(page_text.contains("pwned") && page_text.contains("\\u{202e}"));
    assert_eq!(obeyed(&page), "", "the page shows: {page_text:?}");
    daemon.stop();
}
