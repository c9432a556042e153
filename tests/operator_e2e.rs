//! The operator's surfaces through the binary: status that tells the truth, rollback as undo,
//! every command locally and through the API, kubectl-style conventions, completions and the
//! man page, and the status page in headless Chromium at a narrow and a wide width.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::chromium::{artifacts, Browser};
use common::daemon::Env;
use common::key;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use serde_json::Value;

const TOKEN: &str = "ops-0123456789abcdef";

/// What one CLI run printed.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run the binary with these arguments and extra environment.
fn depwatch(args: &[&str], envs: &[(&str, &str)]) -> Ran {
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(args)
        .envs(envs.iter().copied())
        .env("NO_COLOR", "1")
        .env_remove("DEPWATCH_STATE_DIR")
        .env_remove("DEPWATCH_API")
        .output()
        .expect("depwatch runs");
    Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// Run a command that must succeed; its stdout.
fn ok(args: &[&str]) -> String {
    let r = depwatch(args, &[]);
    assert!(r.ok, "{args:?} failed: {}{}", r.stdout, r.stderr);
    r.stdout
}

/// Run a command that must fail; its stderr.
fn refused(args: &[&str]) -> String {
    let r = depwatch(args, &[]);
    assert!(!r.ok, "{args:?} should fail: {}", r.stdout);
    r.stderr
}

async fn wait_status(env: &Env, k: &ServiceKey, status: ServiceStatus) {
    let waited = tokio::time::timeout(
        Duration::from_secs(40),
        wait_for(
            &format!("{k} to be {status}"),
            Duration::from_secs(60),
            || async { (env.store().service(k).await.ok()??.status == status).then_some(()) },
        ),
    )
    .await;
    if waited.is_err() {
        panic!(
            "timed out waiting for {k} to be {status}; record: {:?}\ndaemon logs:\n{}",
            env.store().service(k).await,
            env.daemon_logs()
        );
    }
}

fn status_json(target: &[&str]) -> Vec<Value> {
    let mut args = vec!["status", "-o", "json"];
    args.extend(target);
    serde_json::from_str(&ok(&args)).expect("status -o json is JSON")
}

fn service<'a>(all: &'a [Value], name: &str) -> &'a Value {
    all.iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {all:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_operator_command_works_locally_and_through_the_api() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let tokens = env.dir.path().join("tokens");
    std::fs::write(&tokens, format!("ops:{TOKEN}\n")).expect("tokens");
    let client_token = env.dir.path().join("client-token");
    std::fs::write(&client_token, format!("{TOKEN}\n")).expect("client token");
    // `:0` is every interface, as Go servers write it; the CLI reaches it as `:PORT`.
    let daemon = env
        .daemon(&[
            "--http-addr",
            ":0",
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
        ])
        .await;
    let url = daemon.http_url();
    assert!(url.starts_with("http://0.0.0.0:"), "{url}");
    let port = url.rsplit(':').next().expect("port").to_string();
    let api = format!(":{port}");
    let state = env.state.to_str().expect("utf-8").to_string();
    let local = ["--state-dir", state.as_str()];
    let remote = [
        "--api",
        api.as_str(),
        "--token-file",
        client_token.to_str().expect("utf-8"),
    ];
    let k = key("web", "prod");
    let file = env.deps.join("web_prod.dep");

    env.write_dep("web_prod.dep", "# written by CI\n1.1.0  # pipeline 7\n");
    wait_status(&env, &k, ServiceStatus::Succeeded).await;
    env.write_dep("web_prod.dep", "# written by CI\n1.2.0  # pipeline 8\n");
    env.wait_image("prod", "web", "example.com/web:1.2.0").await;
    wait_status(&env, &k, ServiceStatus::Succeeded).await;

    // Status, locally and through the API, in every format.
    for target in [&local[..], &remote[..2]] {
        let all = status_json(target);
        let web = service(&all, "web");
        assert_eq!(web["status"], "succeeded", "{web}");
        assert_eq!(web["desired"], "web=example.com/web:1.2.0", "{web}");
        assert_eq!(web["pinned"], "", "{web}");
        assert_eq!(web["suspended"], false, "{web}");
        let mut args = vec!["status", "-o", "yaml"];
        args.extend(target);
        assert!(ok(&args).contains("status: succeeded"));
        let mut args = vec!["status", "-o", "wide", "-n", "prod"];
        args.extend(target);
        let wide = ok(&args);
        for column in ["PINNED", "SUSPENDED", "REASON", "NEXT STEP", "prod/web"] {
            assert!(wide.contains(column), "{column}: {wide}");
        }
        let mut args = vec!["status", "-n", "dev"];
        args.extend(target);
        let r = depwatch(&args, &[]);
        assert!(r.ok && r.stdout.is_empty(), "{}", r.stdout);
        assert!(
            r.stderr.contains("No services in namespace dev"),
            "{}",
            r.stderr
        );
    }
    let mut history_args = vec!["history", "web", "-n", "prod", "-o", "json"];
    history_args.extend(local);
    let history: Vec<Value> = serde_json::from_str(&ok(&history_args)).expect("history json");
    assert_eq!(history.len(), 2, "{history:?}");
    let latest_id = history[0]["id"].as_i64().expect("id").to_string();
    let first_id = history[1]["id"].as_i64().expect("id").to_string();

    // Retry with nothing failed is refused, locally and through the API (409), naming why.
    let mut args = vec!["retry", "prod/web"];
    args.extend(local);
    assert!(refused(&args).contains("nothing to retry for prod/web"));
    let mut args = vec!["retry", "prod/web"];
    args.extend(remote);
    let e = refused(&args);
    assert!(e.contains("409") && e.contains("nothing to retry"), "{e}");
    // A change without a token says what is missing.
    let e = refused(&["retry", "prod/web", "--api", &api]);
    assert!(e.contains("401") && e.contains("--token-file"), "{e}");

    // Rollback to the deploy it already runs: nothing would change.
    let mut args = vec!["rollback", "prod/web", "--to", latest_id.as_str()];
    args.extend(local);
    assert!(refused(&args).contains("would change nothing"));

    // Rollback through the API is undo: the previous version, in the file's own form.
    let mut args = vec!["rollback", "prod/web"];
    args.extend(remote);
    let said = ok(&args);
    assert!(said.contains("example.com/web:1.1.0"), "{said}");
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(
        text.starts_with("# rolled back by ops at ")
            && text.ends_with("# written by CI\n1.1.0  # pipeline 8\n"),
        "only the version changed: {text}"
    );
    env.wait_image("prod", "web", "example.com/web:1.1.0").await;
    wait_status(&env, &k, ServiceStatus::Succeeded).await;
    let h = env.store().history(Some(&k), 1).await.expect("history");
    assert_eq!(h[0].actor, "ops", "the token's name is the actor: {h:?}");

    // Undo again, locally: back to 1.2.0. Then `--to` the first deploy: 1.1.0 again.
    let mut args = vec!["rollback", "web", "-n", "prod"];
    args.extend(local);
    ok(&args);
    env.wait_image("prod", "web", "example.com/web:1.2.0").await;
    wait_status(&env, &k, ServiceStatus::Succeeded).await;
    let mut args = vec!["rollback", "prod/web", "--to", first_id.as_str()];
    args.extend(remote);
    ok(&args);
    env.wait_image("prod", "web", "example.com/web:1.1.0").await;
    wait_status(&env, &k, ServiceStatus::Succeeded).await;

    // Suspend through the API: the status says so, a new version waits.
    let mut args = vec!["suspend", "prod/web"];
    args.extend(remote);
    assert!(ok(&args).contains("suspended"));
    let mut args = vec!["suspend", "prod/web"];
    args.extend(remote);
    assert!(refused(&args).contains("already suspended"));
    let web = status_json(&local)
        .into_iter()
        .find(|s| s["name"] == "web")
        .expect("web");
    assert_eq!(web["suspended"], true, "{web}");
    assert!(
        web["next_step"]
            .as_str()
            .expect("next step")
            .contains("depwatch resume prod/web"),
        "{web}"
    );
    let patches = env.patches("prod", "web");
    env.write_dep("web_prod.dep", "1.3.0\n");
    wait_for(
        "the suspended change to be logged",
        Duration::from_secs(15),
        || async {
            daemon
                .log_text()
                .contains("service is suspended")
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        env.patches("prod", "web"),
        patches,
        "suspended: not deployed"
    );
    let mut args = vec!["resume", "prod/web"];
    args.extend(remote);
    assert!(ok(&args).contains("resumed"));
    env.wait_image("prod", "web", "example.com/web:1.3.0").await;

    // Forget: refused while the file exists; once it is deleted, the row goes (history stays).
    for target in [&local[..], &remote[..]] {
        let mut args = vec!["forget", "prod/web"];
        args.extend(target);
        let e = refused(&args);
        assert!(e.contains("delete its dependency file first"), "{e}");
    }
    let history_before = env
        .store()
        .history(Some(&k), 100)
        .await
        .expect("history")
        .len();
    std::fs::remove_file(&file).expect("rm");
    wait_status(&env, &k, ServiceStatus::Unmanaged).await;
    let mut args = vec!["forget", "prod/web"];
    args.extend(remote);
    assert!(ok(&args).contains("forgotten"));
    assert!(env.store().service(&k).await.expect("q").is_none());
    assert!(!status_json(&local).iter().any(|s| s["name"] == "web"));
    assert_eq!(
        env.store()
            .history(Some(&k), 100)
            .await
            .expect("history")
            .len(),
        history_before,
        "history is kept"
    );
    // And `history` shows it, locally and through the API.
    for target in [&local[..], &remote[..]] {
        let mut args = vec!["history", "prod/web"];
        args.extend(target);
        let out = ok(&args);
        assert!(
            out.contains("deployment/web in prod") || out.contains("web in prod"),
            "{out}"
        );
        assert!(out.contains("1.3.0"), "{out}");
    }

    // Unknown services are errors, locally and through the API.
    for target in [&local[..], &remote[..]] {
        for cmd in [
            "history", "retry", "rollback", "suspend", "resume", "forget",
        ] {
            let mut args = vec![cmd, "prod/nope"];
            args.extend(target);
            let e = refused(&args);
            assert!(e.contains("prod/nope") || e.contains("404"), "{cmd}: {e}");
        }
    }
}

/// Patch a Deployment's `spec.paused`.
async fn pause(env: &Env, ns: &str, name: &str) {
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
    )
    .await
    .expect("pause");
}

/// Serve the daemon's page from our own loopback server with a script that measures its
/// layout once loaded, so the browser's own numbers can be read from the dumped DOM.
async fn measuring_proxy(daemon: String) -> String {
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move |q: axum::extract::RawQuery| {
            let daemon = daemon.clone();
            async move {
                let query = q.0.map(|q| format!("?{q}")).unwrap_or_default();
                let page = reqwest::get(format!("{daemon}/{query}"))
                    .await
                    .expect("page")
                    .text()
                    .await
                    .expect("html");
                let probe = "<script>var d=document.documentElement;document.body.setAttribute('data-measured',d.scrollWidth+'x'+window.innerWidth);</script>";
                axum::response::Html(page.replace("</body>", &format!("{probe}</body>")))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// The page's width and the window's, as the browser measured them.
fn measured(dom: &str) -> (u32, u32) {
    let at = dom.find("data-measured=\"").expect("the probe ran") + "data-measured=\"".len();
    let value = &dom[at..at + dom[at..].find('"').expect("end")];
    let (content, window) = value.split_once('x').expect("WxW");
    (
        content.parse().expect("width"),
        window.parse().expect("window"),
    )
}

fn row<'a>(dom: &'a str, service: &str) -> &'a str {
    let start = dom
        .find(&format!("data-service=\"{service}\""))
        .unwrap_or_else(|| panic!("row {service} in {dom}"));
    let end = dom[start..]
        .find("</tr>")
        .map(|e| start + e)
        .unwrap_or(dom.len());
    &dom[start..end]
}

const NARROW: u32 = 375;
const WIDE: u32 = 1280;

/// Screenshots of the page filtered to one state, at both widths.
async fn shoot(browser: &Browser, url: &str, state: &str, dir: &Path) {
    for (label, width) in [("narrow", NARROW), ("wide", WIDE)] {
        let to = dir.join(format!("status-page-{state}-{label}.png"));
        browser
            .screenshot(width, 900, &format!("{url}/?status={state}"), &to)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_the_page_show_every_state_with_what_to_do() {
    let mut env = Env::new(SimConfig::default()).await;
    for name in ["web", "api", "reports", "paused", "quiet"] {
        env.deployment(
            "demo",
            name,
            &[(name, &format!("example.com/{name}:1.0.0"))],
            1,
        )
        .await;
    }
    pause(&env, "demo", "paused").await;
    let daemon = env.daemon(&["--rollout-timeout", "10m"]).await;
    let url = daemon.http_url();
    let state = env.state.to_str().expect("utf-8").to_string();
    env.write_dep("web_demo.dep", "1.1.0");
    env.write_dep("quiet_demo.dep", "1.1.0");
    env.write_dep("api_demo.dep", "2.0.0-fail-pull");
    env.write_dep("reports_demo.dep", "3.0.0-hang");
    env.write_dep("paused_demo.dep", "1.1.0");
    env.write_dep("missing_demo.dep", "1.1.0");
    env.write_dep("broken_demo.dep", "version: [\n");
    let fifo = env.deps.join("pipe_demo.dep");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let d = |n: &str| key(n, "demo");
    wait_status(&env, &d("web"), ServiceStatus::Succeeded).await;
    wait_status(&env, &d("quiet"), ServiceStatus::Succeeded).await;
    wait_status(&env, &d("api"), ServiceStatus::RolledBack).await;
    wait_status(&env, &d("reports"), ServiceStatus::Deploying).await;
    wait_status(&env, &d("paused"), ServiceStatus::Paused).await;
    wait_status(&env, &d("missing"), ServiceStatus::Failed).await;
    wait_status(&env, &d("broken"), ServiceStatus::Invalid).await;
    wait_status(&env, &d("pipe"), ServiceStatus::Unreadable).await;
    ok(&["suspend", "demo/quiet", "--state-dir", &state]);
    env.write_dep("quiet_demo.dep", "1.2.0");
    wait_for(
        "the suspended service's new version to be shown as waiting",
        Duration::from_secs(15),
        || async {
            let all = status_json(&["--state-dir", &state]);
            (service(&all, "quiet")["asks"] == "1.2.0").then_some(())
        },
    )
    .await;
    // The one PATCH is the test's own pause.
    assert_eq!(
        env.patches("demo", "paused"),
        1,
        "a paused Deployment is not patched by depwatch"
    );

    // The CLI's columns: status, pinned version, suspended, reason, next step.
    let wide = ok(&["status", "-o", "wide", "--state-dir", &state]);
    let line = |svc: &str| {
        wide.lines()
            .find(|l| l.starts_with(&format!("demo/{svc} ")))
            .unwrap_or_else(|| panic!("{svc} in {wide}"))
            .to_string()
    };
    assert!(
        line("api").contains("rolled_back")
            && line("api").contains("example.com/api:2.0.0-fail-pull  "),
        "the pinned version: {}",
        line("api")
    );
    assert!(line("api").contains("ImagePullBackOff"), "{}", line("api"));
    assert!(
        line("paused").contains("paused")
            && line("paused").contains("kubectl rollout resume deployment/paused -n demo"),
        "{}",
        line("paused")
    );
    assert!(
        line("quiet").contains(" yes "),
        "suspended: {}",
        line("quiet")
    );
    assert!(
        line("missing").contains("create the Deployment"),
        "{}",
        line("missing")
    );
    assert!(
        line("broken").contains("depwatch check"),
        "{}",
        line("broken")
    );
    assert!(line("pipe").contains("unreadable"), "{}", line("pipe"));
    // DESIRED is what each file asks, and says why it is not running.
    for (svc, desired) in [
        ("web", "example.com/web:1.1.0  "),
        ("quiet", "1.2.0 (waiting: suspended)"),
        ("api", "example.com/api:2.0.0-fail-pull (pinned)"),
        ("missing", "1.1.0 (refused)"),
        ("broken", "- (refused)"),
        ("paused", "example.com/paused:1.1.0  "),
    ] {
        let columns = line(svc);
        let after_status = columns.split_once("  ").map_or("", |(_, rest)| rest);
        assert!(
            after_status.contains(&format!(" {desired}")),
            "DESIRED of {svc}: {columns}"
        );
    }
    let all = status_json(&["--state-dir", &state]);
    assert_eq!(service(&all, "quiet")["not_running"], "waiting: suspended");
    assert_eq!(service(&all, "missing")["not_running"], "refused");
    assert_eq!(
        service(&all, "api")["pinned"],
        "api=example.com/api:2.0.0-fail-pull"
    );
    assert_eq!(service(&all, "web")["next_step"], "");

    // The page: each non-healthy row says what to do; the healthy one does not.
    let browser = Browser::new(env.dir.path());
    let dom = wait_for("every row in Chromium", Duration::from_secs(60), || async {
        let dom = browser.dom(WIDE, &format!("{url}/")).await;
        dom.contains("data-service=\"demo/pipe\"").then_some(dom)
    })
    .await;
    assert!(
        row(&dom, "demo/web").contains("badge ok") && !row(&dom, "demo/web").contains("What to do")
    );
    for (svc, badge, todo) in [
        ("demo/api", "badge warn", "the version is pinned"),
        ("demo/paused", "badge warn", "kubectl rollout resume"),
        ("demo/missing", "badge bad", "create the Deployment"),
        ("demo/broken", "badge bad", "depwatch check"),
        ("demo/pipe", "badge bad", "readable file"),
        ("demo/quiet", "badge ok", "depwatch resume demo/quiet"),
    ] {
        let r = row(&dom, svc);
        assert!(
            r.contains(badge) && r.contains("What to do:") && r.contains(todo),
            "{svc}: {r}"
        );
    }
    assert!(
        row(&dom, "demo/api").contains("pinned: failed"),
        "{}",
        row(&dom, "demo/api")
    );
    assert!(row(&dom, "demo/quiet").contains("(suspended)"));
    assert!(row(&dom, "demo/reports").contains("badge busy"));

    // Narrow: the rows become cards and nothing runs off the side.
    let proxy = measuring_proxy(url.clone()).await;
    for width in [NARROW, WIDE] {
        let dom = browser.dom(width, &format!("{proxy}/")).await;
        let (content, window) = measured(&dom);
        assert!(
            content <= window,
            "at {width}px the page is {content}px wide in a {window}px window"
        );
    }
    // The filter shows one state.
    let filtered = browser.dom(WIDE, &format!("{url}/?status=paused")).await;
    assert!(filtered.contains("demo/paused") && !filtered.contains("data-service=\"demo/web\""));

    let dir = artifacts();
    for state in [
        "succeeded",
        "rolled_back",
        "deploying",
        "paused",
        "failed",
        "invalid",
        "unreadable",
        "suspended",
    ] {
        shoot(&browser, &url, state, &dir).await;
    }

    // The API server goes away: a new version waits, and the page says so.
    env.sim.stop().await;
    env.write_dep("web_demo.dep", "1.2.0");
    wait_status(&env, &d("web"), ServiceStatus::WaitingForApi).await;
    let dom = browser
        .dom(WIDE, &format!("{url}/?status=waiting_for_api"))
        .await;
    let r = row(&dom, "demo/web");
    assert!(
        r.contains("waiting for the API server") && r.contains("/readyz"),
        "{r}"
    );
    assert!(
        r.contains(&env.sim.url()),
        "the reason names the server: {r}"
    );
    shoot(&browser, &url, "waiting_for_api", &dir).await;
    // One concise warning line for the outage, naming the server.
    let log = daemon.log_text();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("WARN") && l.contains("service=demo/web") && l.contains("cannot reach")
        })
        .collect();
    assert_eq!(warnings.len(), 1, "one line per failure: {warnings:#?}");
    assert!(warnings[0].contains(&env.sim.url()), "{}", warnings[0]);
    // Durations are rounded for people: no field carries a long fraction.
    for line in log.lines() {
        let fields = line.split_once(' ').map_or("", |(_, rest)| rest);
        let long_fraction = fields
            .split('.')
            .skip(1)
            .any(|after| after.len() >= 4 && after.chars().take(4).all(|c| c.is_ascii_digit()));
        assert!(!long_fraction, "an unrounded number: {line}");
    }
    let paused = service(&status_json(&["--state-dir", &state]), "paused").clone();
    assert_eq!(
        paused["desired"], "paused=example.com/paused:1.1.0",
        "{paused}"
    );
    env.sim.restart().await.expect("the API server is back");
    wait_status(&env, &d("web"), ServiceStatus::Succeeded).await;
}

#[test]
fn kubernetes_style_conventions_completions_and_a_man_page() {
    let dir = tempfile::tempdir().expect("tempdir");

    // An environment variable's bad value is blamed on the variable.
    for (var, value) in [
        ("DEPWATCH_ROLLBACK", "maybe"),
        ("DEPWATCH_HTTP_ADDR", "eight-thousand"),
        ("DEPWATCH_RESYNC", "soon"),
    ] {
        let r = depwatch(&["run"], &[(var, value)]);
        assert!(!r.ok);
        assert!(
            r.stderr.contains(&format!("environment variable {var}")),
            "{var}: {}",
            r.stderr
        );
        assert!(!r.stderr.contains("<"), "no flag placeholder: {}", r.stderr);
    }
    // The same value typed as a flag is blamed on the flag.
    let r = depwatch(&["run", "--rollback", "maybe"], &[]);
    assert!(
        !r.ok && r.stderr.contains("--rollback") && !r.stderr.contains("DEPWATCH_ROLLBACK"),
        "{}",
        r.stderr
    );

    // A short token has its own error; a malformed line its own.
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ci:short\n").expect("tokens");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("deps");
    std::fs::write(deps.join("web_prod.dep"), "version: 1.0\nrollback: on\n").expect("dep");
    let r = depwatch(
        &[
            "check",
            deps.to_str().expect("utf-8"),
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(!r.ok);
    assert!(
        r.stderr.contains("shorter than 8 characters")
            && !r.stderr.contains("expected `name:token`"),
        "{}",
        r.stderr
    );
    std::fs::write(&tokens, "no colon here\n").expect("tokens");
    let r = depwatch(
        &[
            "check",
            deps.to_str().expect("utf-8"),
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
        ],
        &[],
    );
    assert!(r.stderr.contains("expected `name:token`"), "{}", r.stderr);
    // `rollback: on` is as good as `rollback: true`.
    let r = depwatch(&["check", deps.to_str().expect("utf-8")], &[]);
    assert!(r.ok, "{}", r.stderr);
    // check refuses what run would, from the same flags and environment.
    let r = depwatch(
        &["check", deps.to_str().expect("utf-8")],
        &[("DEPWATCH_NAMESPACES", "staging")],
    );
    assert!(
        !r.ok && r.stderr.contains("web_prod.dep") && r.stderr.contains("prod"),
        "{}",
        r.stderr
    );
    std::fs::write(deps.join("api_staging.dep"), "evil.example/api:1\n").expect("dep");
    let r = depwatch(
        &[
            "check",
            deps.to_str().expect("utf-8"),
            "--namespaces",
            "prod,staging",
            "--allowed-images",
            "registry.example.com/*",
        ],
        &[],
    );
    assert!(
        !r.ok && r.stderr.contains("api_staging.dep") && r.stderr.contains("evil.example"),
        "{}",
        r.stderr
    );
    std::fs::remove_file(deps.join("api_staging.dep")).expect("rm");

    // Completions: bash completes subcommands for real; zsh and fish scripts name them.
    let script = dir.path().join("depwatch.bash");
    std::fs::write(&script, ok(&["completions", "bash"])).expect("script");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && COMP_WORDS=(depwatch sta) && COMP_CWORD=1 && _depwatch depwatch sta depwatch && echo \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash");
    let completed = String::from_utf8_lossy(&out.stdout);
    assert!(
        completed.split_whitespace().any(|w| w == "status"),
        "{completed} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for shell in ["zsh", "fish"] {
        let text = ok(&["completions", shell]);
        assert!(
            text.contains("rollback") && text.contains("token-file"),
            "{shell}: {text}"
        );
    }
    assert!(!depwatch(&["completions", "tcsh"], &[]).ok);

    // The man page is roff that man renders, with every command.
    let page = ok(&["man"]);
    assert!(
        page.starts_with(".ie") || page.contains(".TH depwatch"),
        "{}",
        &page[..200.min(page.len())]
    );
    let man = dir.path().join("depwatch.1");
    std::fs::write(&man, &page).expect("man");
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-P", "-cbou"])
        .arg(&man)
        .output()
        .expect("groff");
    let rendered = String::from_utf8_lossy(&out.stdout);
    for word in [
        "NAME",
        "SYNOPSIS",
        "DEPWATCH STATUS",
        "DEPWATCH ROLLBACK",
        "--token-file",
        "--to <DEPLOY_ID>",
        "DEPWATCH_ROLLBACK",
        "DEPWATCH COMPLETIONS",
    ] {
        assert!(rendered.contains(word), "{word} in the man page");
    }
    // No references to pages that do not exist: the subcommands are sections of this one.
    assert!(!rendered.contains("depwatch-run(1)"), "{rendered}");
    assert!(
        rendered.contains("DEPWATCH FORGET"),
        "every command has its section"
    );
}

/// `resume` reads the file once more: a file that fails at plan gets one new history row, not
/// two, and a file whose version is already running gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_resume_writes_at_most_one_history_row() {
    let env = Env::new(SimConfig::default()).await;
    for name in ["web", "api"] {
        env.deployment(
            "demo",
            name,
            &[(name, &format!("example.com/{name}:1.0.0"))],
            1,
        )
        .await;
    }
    let _daemon = env.daemon(&[]).await;
    let state = env.state.to_str().expect("utf-8").to_string();
    env.write_dep("nowhere_demo.dep", "1.1.0");
    env.write_dep("web_demo.dep", "1.1.0");
    let (nowhere, web) = (key("nowhere", "demo"), key("web", "demo"));
    wait_status(&env, &nowhere, ServiceStatus::Failed).await;
    wait_status(&env, &web, ServiceStatus::Succeeded).await;
    let rows = async |k: &ServiceKey| {
        env.store()
            .history(Some(k), 100)
            .await
            .expect("history")
            .len()
    };
    let before = (rows(&nowhere).await, rows(&web).await);
    for k in ["demo/nowhere", "demo/web"] {
        ok(&["suspend", k, "--state-dir", &state]);
    }
    // A change waits while suspended; the resume deploys it.
    env.write_dep("nowhere_demo.dep", "1.2.0");
    wait_for(
        "the waiting change to be read",
        Duration::from_secs(20),
        || async {
            let r = env.store().service(&nowhere).await.ok()??;
            (r.requested == "1.2.0").then_some(())
        },
    )
    .await;
    for k in ["demo/nowhere", "demo/web"] {
        ok(&["resume", k, "--state-dir", &state]);
    }
    wait_for(
        "the resumed file that fails at plan to be tried again",
        Duration::from_secs(20),
        || async { (rows(&nowhere).await > before.0).then_some(()) },
    )
    .await;
    // A later save is read after every event of the resumes: once it is done, so are they.
    env.write_dep("api_demo.dep", "1.1.0");
    wait_status(&env, &key("api", "demo"), ServiceStatus::Succeeded).await;
    assert_eq!(
        (rows(&nowhere).await, rows(&web).await),
        (before.0 + 1, before.1),
        "one row for the resume of a file that fails, none for one already running:\n{}",
        env.daemon_logs()
    );
}
