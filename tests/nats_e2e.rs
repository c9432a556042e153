//! Deploy outcomes on a real `nats-server` (started here; `./scripts/test` installs it): core
//! publish, JetStream when a stream captures the subject, and a dead server that never delays a
//! deploy.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::sim::SimConfig;
use futures::StreamExt;

/// A `nats-server` with JetStream on a loopback port, stopped on drop.
struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: std::path::PathBuf,
}

impl NatsServer {
    fn start(store: &Path, port: u16) -> NatsServer {
        let port = if port == 0 {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        } else {
            port
        };
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (./scripts/test installs Debian's nats-server)");
        NatsServer {
            child: Some(child),
            port,
            store: store.to_path_buf(),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn client(&self) -> async_nats::Client {
        wait_for(
            "nats-server to accept clients",
            Duration::from_secs(20),
            || async { async_nats::connect(self.url()).await.ok() },
        )
        .await
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn next_json(sub: &mut async_nats::Subscriber) -> (String, serde_json::Value) {
    let msg = tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .expect("a message within 30s")
        .expect("subscription open");
    (
        msg.subject.to_string(),
        serde_json::from_slice(&msg.payload).expect("JSON payload"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_published_on_nats_and_a_dead_server_delays_nothing() {
    let env = Env::new(SimConfig::default()).await;
    let store = env.dir.path().join("nats");
    let mut nats = NatsServer::start(&store, 0);
    let client = nats.client().await;
    let mut sub = client
        .subscribe("depwatch.deploys.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.0.0\n");
    let daemon = env.daemon(&["--nats-url", &nats.url()]).await;

    // Core publish: the webhook's document on the service's subject.
    env.write_dep("web_prod.dep", "1.0.1\n");
    let (subject, doc) = loop {
        let (s, d) = next_json(&mut sub).await;
        if d["to"].as_str().is_some_and(|t| t.contains("1.0.1")) {
            break (s, d);
        }
    };
    assert_eq!(subject, "depwatch.deploys.prod.web");
    assert_eq!(doc["outcome"], "succeeded");
    assert_eq!(doc["event"], "depwatch.deploy");
    assert_eq!(doc["namespace"], "prod");

    // A stream that captures the subjects: outcomes are stored and acknowledged.
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "DEPLOYS".into(),
        subjects: vec!["depwatch.deploys.>".into()],
        ..Default::default()
    })
    .await
    .expect("stream");
    // The daemon trusts its "no stream" answer for a minute; a new service asks afresh.
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    env.write_dep("api_prod.dep", "1.0.1\n");
    let stored = wait_for(
        "the outcome stored in the stream",
        Duration::from_secs(30),
        || async {
            let mut stream = js.get_stream("DEPLOYS").await.ok()?;
            let info = stream.info().await.ok()?;
            (info.state.messages >= 1).then_some(info.state.messages)
        },
    )
    .await;
    assert!(stored >= 1);
    let msg = js
        .get_stream("DEPLOYS")
        .await
        .expect("stream")
        .get_last_raw_message_by_subject("depwatch.deploys.prod.api")
        .await
        .expect("stored message");
    let doc: serde_json::Value = serde_json::from_slice(&msg.payload).expect("json");
    assert_eq!(doc["outcome"], "succeeded");

    // NATS dies: deploys go on at their own pace; failures to publish are counted.
    nats.stop();
    let web = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
    env.write_dep("web_prod.dep", "1.0.2\n");
    wait_for(
        "1.0.2 healthy with NATS down",
        Duration::from_secs(20),
        || async {
            let r = env.store().service(&web).await.ok()??;
            (r.status.as_str() == "succeeded" && r.deployed.to_string().contains("1.0.2"))
                .then_some(())
        },
    )
    .await;

    // NATS returns on the same port: the client reconnects and publishing resumes.
    let back = NatsServer::start(&nats.store, nats.port);
    let client = back.client().await;
    let mut sub = client
        .subscribe("depwatch.deploys.prod.web")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    env.write_dep("web_prod.dep", "1.0.3\n");
    loop {
        let (_, d) = next_json(&mut sub).await;
        if d["to"].as_str().is_some_and(|t| t.contains("1.0.3")) {
            break;
        }
    }
    let log = daemon.log_text();
    assert!(!log.contains(&nats.url()), "the NATS URL is never logged");
    daemon.stop();
}

/// Every outcome's `from` and `to` are the history row's, on the webhook, on NATS and in Slack
/// (`-` where the row has none): a healthy deploy, a rollback, and a deploy refused at plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_webhook_nats_and_slack_agree_on_from_and_to() {
    let env = Env::new(SimConfig::default()).await;
    let nats = NatsServer::start(&env.dir.path().join("nats"), 0);
    let client = nats.client().await;
    let mut sub = client
        .subscribe("depwatch.deploys.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    let hook = env.slack_url.clone();
    let _daemon = env
        .daemon(&["--nats-url", &nats.url(), "--webhook-url", &hook])
        .await;
    let status_of = |name: &str, want: &'static str| {
        let k = depwatch::domain::ServiceKey::new(name, "prod").expect("key");
        let store = env.store();
        async move {
            wait_for(&format!("{k} {want}"), Duration::from_secs(60), || async {
                let r = store.service(&k).await.ok()??;
                (r.status.as_str() == want && r.deployed.to_string() != "-").then_some(())
            })
            .await
        }
    };
    env.write_dep("web_prod.dep", "1.0.1\n");
    status_of("web", "succeeded").await;
    env.write_dep("web_prod.dep", "1.0.2-crash\n");
    status_of("web", "rolled_back").await;
    env.write_dep("nowhere_prod.dep", "1.0\n");
    status_of("nowhere", "failed").await;

    let rows: Vec<_> = env
        .store()
        .history(None, 10)
        .await
        .expect("history")
        .into_iter()
        .filter(|r| r.outcome.as_str() != "in_progress")
        .collect();
    assert_eq!(rows.len(), 3, "{rows:#?}");
    // Each row's outcome, as published and as posted (a rollback is told twice: failed, then
    // rolled back; the row's own outcome is the one compared).
    let told = |docs: &[serde_json::Value]| {
        rows.iter().all(|r| {
            docs.iter()
                .any(|d| d["service"] == r.name && d["outcome"] == r.outcome.as_str())
        })
    };
    let mut published = Vec::new();
    while !told(&published) {
        published.push(next_json(&mut sub).await.1);
    }
    let webhook: Vec<serde_json::Value> =
        wait_for("every outcome posted", Duration::from_secs(30), || async {
            let all: Vec<_> = env.messages().into_iter().map(|m| m.body).collect();
            told(&all).then_some(all)
        })
        .await;
    // Slack's messages too, which arrive beside the webhook's.
    let webhook: Vec<serde_json::Value> = wait_for(
        "every outcome in Slack",
        Duration::from_secs(30),
        || async {
            let all: Vec<_> = env.messages().into_iter().map(|m| m.body).collect();
            let slack = all.iter().filter(|m| m["attachments"].is_array()).count();
            (slack
                >= webhook
                    .iter()
                    .filter(|m| m["event"] == "depwatch.deploy")
                    .count())
            .then_some(all)
        },
    )
    .await;
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    for row in &rows {
        let (from, to) = (dash(&row.from_image), dash(&row.to_image));
        let outcome = row.outcome.as_str();
        let same = |d: &&serde_json::Value| d["service"] == row.name && d["outcome"] == outcome;
        for (surface, docs) in [("NATS", &published), ("webhook", &webhook)] {
            let doc = docs
                .iter()
                .find(|d| d["event"] == "depwatch.deploy" && same(d))
                .unwrap_or_else(|| panic!("{surface}: no {outcome} of {} in {docs:#?}", row.name));
            assert_eq!(
                (doc["from"].as_str(), doc["to"].as_str()),
                (Some(from.as_str()), Some(to.as_str())),
                "{surface}, {outcome} of {}",
                row.name
            );
        }
        let slack = webhook
            .iter()
            .filter_map(|m| m["text"].as_str())
            .find(|t| {
                t.contains(&format!("{} (prod)", row.name)) && t.contains(&format!("to {to}"))
            })
            .unwrap_or_else(|| panic!("Slack: no message to {to} in {webhook:#?}"));
        assert!(
            slack.contains(&format!("from {from} to {to}")),
            "Slack, {outcome}: {slack}"
        );
    }
}
