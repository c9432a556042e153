//! The mixed fleet: Deployments, StatefulSets and DaemonSets spread over many namespaces, to show
//! that watch connections and start-up requests follow the kinds, not the namespaces.
//! `cargo bench --bench fleet -- --mixed 200` (namespaces; 3 Deployments, 1 StatefulSet and 1
//! DaemonSet in each).

use std::path::Path;
use std::time::{Duration, Instant};

use depwatch::sim::{Sim, SimConfig};
use futures::StreamExt;
use serde_json::{json, Value};

use super::{proc_stats, Daemon};

/// What one workload of the mixed fleet is.
struct Item {
    ns: String,
    name: String,
    kind: &'static str,
}

fn fleet(namespaces: usize) -> Vec<Item> {
    let mut out = Vec::new();
    for i in 0..namespaces {
        let ns = format!("team-{i:03}");
        for (name, kind) in [
            ("api", "deployments"),
            ("web", "deployments"),
            ("worker", "deployments"),
            ("db", "statefulsets"),
            ("agent", "daemonsets"),
        ] {
            out.push(Item {
                ns: ns.clone(),
                name: name.to_string(),
                kind,
            });
        }
    }
    out
}

fn body(item: &Item) -> Value {
    let n = &item.name;
    let template = json!({"metadata": {"labels": {"app": n}},
        "spec": {"containers": [{"name": n, "image": format!("example.com/{n}:1.0.0")}]}});
    let mut spec = json!({"selector": {"matchLabels": {"app": n}}, "template": template});
    if item.kind != "daemonsets" {
        spec["replicas"] = json!(1);
    }
    if item.kind == "statefulsets" {
        spec["serviceName"] = json!(n);
    }
    json!({"metadata": {"name": n, "namespace": item.ns}, "spec": spec})
}

async fn create(client: &kube::Client, items: &[Item]) {
    let mut namespaces: Vec<&str> = items.iter().map(|i| i.ns.as_str()).collect();
    namespaces.dedup();
    for ns in namespaces {
        post(
            client,
            "/api/v1/namespaces",
            json!({"metadata": {"name": ns}}),
        )
        .await;
    }
    futures::stream::iter(items.iter().map(|item| async move {
        let url = format!("/apis/apps/v1/namespaces/{}/{}", item.ns, item.kind);
        post(client, &url, body(item)).await;
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

async fn post(client: &kube::Client, url: &str, body: Value) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).expect("json"))
        .expect("request");
    client.request::<Value>(req).await.expect("create");
}

fn image(obj: &Value) -> &str {
    obj["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

/// Whether a workload's rollout of its template is complete, as kubectl judges it.
fn done(kind: &str, obj: &Value) -> bool {
    let st = &obj["status"];
    let observed = obj["metadata"]["generation"] == st["observedGeneration"];
    observed
        && match kind {
            "deployments.apps" => {
                st["updatedReplicas"] == obj["spec"]["replicas"]
                    && st["availableReplicas"] == obj["spec"]["replicas"]
            }
            "statefulsets.apps" => {
                st["readyReplicas"] == obj["spec"]["replicas"]
                    && st["currentRevision"] == st["updateRevision"]
            }
            _ => {
                st["updatedNumberScheduled"] == st["desiredNumberScheduled"]
                    && st["numberAvailable"] == st["desiredNumberScheduled"]
            }
        }
}

/// `(patched, healthy)` over every kind and namespace.
fn progress(sim: &Sim, tag: &str) -> (usize, usize) {
    let mut out = (0, 0);
    for kind in ["deployments.apps", "statefulsets.apps", "daemonsets.apps"] {
        let healthy = std::cell::Cell::new(0);
        out.0 += sim.store().count(kind, None, |o| {
            let patched = image(o).ends_with(tag);
            if patched && done(kind, o) {
                healthy.set(healthy.get() + 1);
            }
            patched
        });
        out.1 += healthy.get();
    }
    out
}

async fn until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t0.elapsed()
}

fn write(deps: &Path, items: &[Item], version: &str) {
    for i in items {
        let file = deps.join(format!("{}_{}.dep", i.name, i.ns));
        std::fs::write(file, format!("{version}\n")).expect("write");
    }
}

/// The mixed fleet's figures, printed as a table.
pub async fn run(namespaces: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("mkdir");
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = sim.client().expect("client");
    let items = fleet(namespaces);
    let n = items.len();
    eprintln!("[mixed] creating {n} workloads in {namespaces} namespaces");
    create(&client, &items).await;
    until("the fleet", Duration::from_secs(900), || {
        progress(&sim, ":1.0.0").1 == n
    })
    .await;
    write(&deps, &items, "1.0.0");
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let daemon = Daemon::start(dir.path(), &deps, &kubeconfig);
    while !daemon.ready(&http).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = t0.elapsed();
    let store = || depwatch::store::Store::open(&dir.path().join("state")).ok();
    let mut db = None;
    let t = Instant::now();
    while !super::settled(&db, n).await {
        assert!(t.elapsed() < Duration::from_secs(600), "adoption");
        tokio::time::sleep(Duration::from_millis(100)).await;
        db = db.or_else(store);
    }
    let (startup_requests, _) = daemon.kube_requests(&http).await;
    let (cpu0, idle_rss, _) = proc_stats(daemon.child.id());

    eprintln!("[mixed] burst of {n} changed files");
    let t0 = Instant::now();
    write(&deps, &items, "1.1.0");
    let mut patched = None;
    until("the burst", Duration::from_secs(900), || {
        let (p, h) = progress(&sim, ":1.1.0");
        if p == n && patched.is_none() {
            patched = Some(t0.elapsed());
        }
        h == n
    })
    .await;
    let healthy = t0.elapsed();
    let t = Instant::now();
    while !super::settled(&db, n).await {
        assert!(t.elapsed() < Duration::from_secs(120), "the verdicts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (cpu1, _, peak) = proc_stats(daemon.child.id());
    let (_, watches) = daemon.kube_requests(&http).await;
    daemon.stop();
    let rows = [
        (
            "workloads (Deployments / StatefulSets / DaemonSets)",
            format!("{n} ({} / {namespaces} / {namespaces})", 3 * namespaces),
        ),
        ("namespaces", namespaces.to_string()),
        (
            "watch connections (whole run, 6 kinds)",
            format!("{watches:.0}"),
        ),
        (
            "start-up: Kubernetes requests besides watches",
            format!("{startup_requests:.0}"),
        ),
        (
            "start-up: time to ready (ms)",
            format!("{}", ready.as_millis()),
        ),
        (
            "burst: all patched (ms)",
            format!("{}", patched.unwrap_or_default().as_millis()),
        ),
        (
            "burst: all healthy (ms)",
            format!("{}", healthy.as_millis()),
        ),
        (
            "burst: daemon CPU per service (ms)",
            format!("{:.2}", (cpu1 - cpu0) * 1000.0 / n as f64),
        ),
        (
            "RSS idle per service (KiB)",
            format!("{:.0}", idle_rss * 1024.0 / n as f64),
        ),
        ("burst: peak RSS (MiB)", format!("{peak:.0}")),
    ];
    println!("| mixed fleet | figure |\n|---|---|");
    for (name, value) in rows {
        println!("| {name} | {value} |");
    }
}
