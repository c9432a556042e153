//! Benchmarks of the pipeline against the simulated cluster, in one process:
//! - latency from a completed save (the file closed after writing) to the PATCH reaching the API
//!   server, on a quiet machine;
//! - 200 services changed at once: time until every one is patched and every rollout healthy;
//! - resident memory at the end (daemon and simulated cluster together).
//!
//! Run: `cargo bench --bench latency`

use std::path::Path;
use std::time::{Duration, Instant};

use depwatch::daemon::{self, DaemonConfig};
use depwatch::sim::{Sim, SimConfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn image_of(obj: &serde_json::Value) -> &str {
    obj["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

fn rollout_done(obj: &serde_json::Value) -> bool {
    let st = &obj["status"];
    obj["metadata"]["generation"] == st["observedGeneration"]
        && st["updatedReplicas"] == obj["spec"]["replicas"]
        && st["availableReplicas"] == obj["spec"]["replicas"]
        && st["replicas"] == obj["spec"]["replicas"]
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|k| k.parse::<f64>().ok())
            })
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn create(client: &kube::Client, ns: &str, names: &[String]) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
    nss.create(&PostParams::default(), &obj)
        .await
        .expect("create ns");
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for n in names {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": n},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"app": n}},
                     "template": {"metadata": {"labels": {"app": n}},
                                  "spec": {"containers": [{"name": n, "image": format!("example.com/{n}:0")}]}}}
        }))
        .expect("deployment");
        api.create(&PostParams::default(), &d)
            .await
            .expect("create");
    }
}

fn config(deps: &Path, state: &Path, kubeconfig: &Path) -> DaemonConfig {
    DaemonConfig {
        rollout_timeout: Duration::from_secs(60),
        shutdown_grace: Duration::from_secs(5),
        http_addr: None,
        ..DaemonConfig::new(
            deps.to_path_buf(),
            state.to_path_buf(),
            Some(kubeconfig.to_path_buf()),
        )
    }
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("mkdir");
    let sim = Sim::start(SimConfig {
        ready_delay: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = sim.client().expect("client");
    let bulk: Vec<String> = (0..200).map(|i| format!("svc-{i:03}")).collect();
    create(&client, "lat", &["web".to_string()]).await;
    create(&client, "bulk", &bulk).await;

    let cancel = CancellationToken::new();
    let daemon = tokio::spawn(daemon::run(
        config(&deps, &dir.path().join("state"), &kubeconfig),
        cancel.clone(),
    ));
    let mut events = sim.store().subscribe();

    // Latency: completed save → PATCH committed by the API server.
    let rounds = 200;
    let mut latencies = Vec::with_capacity(rounds);
    for i in 1..=rounds {
        let want = format!("example.com/web:{i}");
        let t0 = Instant::now();
        std::fs::write(deps.join("web_lat.dep"), format!("{i}\n")).expect("write");
        let mut patched = None;
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(30), events.recv())
                .await
                .expect("a change within 30s")
                .expect("events");
            if ev.key.resource != "deployments.apps" || ev.key.name != "web" {
                continue;
            }
            if patched.is_none() && image_of(&ev.object) == want {
                patched = Some(t0.elapsed());
            }
            if patched.is_some() && image_of(&ev.object) == want && rollout_done(&ev.object) {
                break;
            }
        }
        latencies.push(patched.expect("patched"));
        // Let the daemon record the healthy rollout before the next save: a quiet machine.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies.sort();
    println!("save → PATCH latency over {rounds} saves (quiet machine, one service):");
    println!(
        "  p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.9).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );

    // 200 services changed at once.
    let t0 = Instant::now();
    for n in &bulk {
        std::fs::write(deps.join(format!("{n}_bulk.dep")), "1\n").expect("write");
    }
    let written = t0.elapsed();
    let mut patched = std::collections::HashSet::new();
    let mut healthy = std::collections::HashSet::new();
    let mut all_patched = None;
    while healthy.len() < bulk.len() {
        let ev = tokio::time::timeout(Duration::from_secs(120), events.recv())
            .await
            .expect("progress within 120s")
            .expect("events");
        if ev.key.resource != "deployments.apps" || ev.key.namespace != "bulk" {
            continue;
        }
        if image_of(&ev.object).ends_with(":1") {
            patched.insert(ev.key.name.clone());
            if patched.len() == bulk.len() && all_patched.is_none() {
                all_patched = Some(t0.elapsed());
            }
            if rollout_done(&ev.object) {
                healthy.insert(ev.key.name.clone());
            }
        }
    }
    println!(
        "200 services changed at once (files written in {:.1} ms):",
        written.as_secs_f64() * 1e3
    );
    println!(
        "  all patched after {:.0} ms, all rollouts healthy after {:.0} ms (simulated ready delay 50 ms)",
        all_patched.unwrap_or_default().as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "resident memory (daemon + simulated cluster, 201 services): {:.1} MiB",
        rss_mib()
    );
    cancel.cancel();
    let _ = daemon.await;
}
