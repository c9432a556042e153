//! The registry pre-flight's cost: a burst of N services whose images share one repository on a
//! registry in this process (it answers every manifest HEAD and counts them), with
//! `--registry-check on`. `cargo bench --bench fleet -- --preflight 1000`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{proc_stats, Daemon, NS};
use depwatch::sim::{Sim, SimConfig};

/// A registry that knows every tag: each HEAD answers 200 with a digest, and is counted.
async fn registry(heads: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let heads = heads.clone();
        async move {
            if req.method() == axum::http::Method::HEAD {
                heads.fetch_add(1, Ordering::SeqCst);
            }
            (
                axum::http::StatusCode::OK,
                [("docker-content-digest", "sha256:0123456789abcdef")],
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The pre-flight's figures for a burst of `n`, printed as a table.
pub async fn run(n: usize) {
    let heads = Arc::new(AtomicUsize::new(0));
    let image = format!("{}/fleet/app", registry(heads.clone()).await);
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("mkdir");
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i:05}")).collect();
    eprintln!("[preflight] creating {n} Deployments on one repository");
    super::create_fleet(&sim.client().expect("client"), &names, |_| image.clone()).await;
    let write = |version: &str| {
        for name in &names {
            let file = deps.join(format!("{name}_{NS}.dep"));
            std::fs::write(file, format!("{version}\n")).expect("write");
        }
    };
    write("1.0.0");
    let http = reqwest::Client::new();
    let daemon = Daemon::start_with(
        dir.path(),
        &deps,
        &kubeconfig,
        &[("DEPWATCH_REGISTRY_CHECK", "on")],
    );
    while !daemon.ready(&http).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let store = || depwatch::store::Store::open(&dir.path().join("state")).ok();
    let done = async |version: &str| {
        let Some(s) = store() else {
            return false;
        };
        s.services().await.is_ok_and(|v| {
            v.len() == n
                && v.iter().all(|r| {
                    !r.status.in_flight() && r.deployed.values().all(|i| i.ends_with(version))
                })
        })
    };
    let t = Instant::now();
    while !done("1.0.0").await {
        assert!(t.elapsed() < Duration::from_secs(600), "adoption");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("[preflight] burst of {n} changed files, one new tag");
    let (cpu0, _, _) = proc_stats(daemon.child.id());
    let heads0 = heads.load(Ordering::SeqCst);
    let t0 = Instant::now();
    write("1.1.0");
    while !done("1.1.0").await {
        assert!(t0.elapsed() < Duration::from_secs(900), "the burst");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let burst = t0.elapsed();
    let (cpu1, _, _) = proc_stats(daemon.child.id());
    let asked = heads.load(Ordering::SeqCst) - heads0;
    daemon.stop();
    let rows = [
        ("services (one repository, one new tag)", n.to_string()),
        ("registry requests for the burst", asked.to_string()),
        (
            "registry requests per changed image",
            format!("{:.3}", asked as f64 / n as f64),
        ),
        (
            "burst: all deployed and judged (ms)",
            burst.as_millis().to_string(),
        ),
        (
            "burst: daemon CPU per deploy (ms)",
            format!("{:.2}", (cpu1 - cpu0) * 1000.0 / n as f64),
        ),
    ];
    println!("| registry pre-flight | figure |\n|---|---|");
    for (name, value) in rows {
        println!("| {name} | {value} |");
    }
}
