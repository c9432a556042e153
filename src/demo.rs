//! `depwatch demo`: the one place that starts both the simulated cluster and the daemon, which
//! still meet only through a kubeconfig. A new user sees a deploy, a failure with the pod's own
//! reason and rollback, a timeout, and a version ready but failing its own checks, with no
//! cluster at all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::daemon::{self, DaemonConfig};
use crate::sim::{Sim, SimConfig};
use crate::store::Store;

/// The example files, embedded so an installed binary can run the demo.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "web_demo.dep",
        include_str!("../examples/deps/web_demo.dep"),
    ),
    (
        "api_demo.dep",
        include_str!("../examples/deps/api_demo.dep"),
    ),
    (
        "worker_demo.dep",
        include_str!("../examples/deps/worker_demo.dep"),
    ),
    (
        "reports_demo.dep",
        include_str!("../examples/deps/reports_demo.dep"),
    ),
    (
        "checkout_demo.dep",
        include_str!("../examples/deps/checkout_demo.dep"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("simulated cluster: {0}")]
    Sim(#[from] crate::sim::SimError),
    #[error("setting up the example deployments: {0}")]
    Kube(#[from] kube::Error),
    #[error("preparing the demo directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Daemon(#[from] daemon::DaemonError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

async fn seed_cluster(client: kube::Client) -> Result<(), DemoError> {
    let ns: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": "demo"}}))
        .map_err(kube::Error::SerdeError)?;
    ns.create(&PostParams::default(), &obj).await?;
    let deps: Api<Deployment> = Api::namespaced(client, "demo");
    for (file, _) in EXAMPLES {
        let name = file.split('_').next().unwrap_or("web");
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}},
                             "spec": {"containers": [{"name": name, "image": format!("example.com/{name}:1.0.0")}]}}
            }
        }))
        .map_err(kube::Error::SerdeError)?;
        deps.create(&PostParams::default(), &d).await?;
    }
    Ok(())
}

/// Where `program` is on PATH, if it is.
fn on_path(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// How to run this binary again from a shell: `depwatch` when that is what PATH finds, else its
/// full path (`./target/release/depwatch demo` is how most people meet it).
fn this_binary() -> String {
    let me = std::env::current_exe().ok();
    let found = on_path("depwatch").and_then(|p| p.canonicalize().ok());
    match (me, found) {
        (Some(me), Some(found)) if me.canonicalize().ok().as_ref() == Some(&found) => {
            "depwatch".into()
        }
        (Some(me), _) => me.display().to_string(),
        (None, _) => "depwatch".into(),
    }
}

/// Run the demo until `cancel` fires (or, with `once`, until every example has an outcome).
pub async fn run(
    once: bool,
    rollout_timeout: Duration,
    http_addr: std::net::SocketAddr,
    cancel: CancellationToken,
) -> Result<(), DemoError> {
    let sim = Sim::start(SimConfig {
        ready_delay: Duration::from_millis(800),
        ..SimConfig::default()
    })
    .await?;
    seed_cluster(sim.client()?).await?;
    let dirs = Dirs::write(&sim)?;
    introduce(once, &dirs);
    let config = DaemonConfig {
        rollout_timeout,
        shutdown_grace: Duration::from_secs(5),
        http_addr: Some(free_or_any(http_addr)),
        // The examples' images live in no registry.
        registry_check: crate::registry::Mode::Off,
        ..DaemonConfig::new(
            dirs.deps.clone(),
            dirs.state.clone(),
            Some(dirs.kubeconfig.clone()),
        )
    };
    let daemon_cancel = cancel.child_token();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let daemon = tokio::spawn(daemon::run_with(config, daemon_cancel.clone(), Some(tx)));
    if let Ok(addr) = rx.await {
        say(&format!("status page: http://{addr}/   (API: http://{addr}/api/v1/services, metrics: http://{addr}/metrics)"));
        say("");
    }
    if once {
        summarise_when_done(&dirs.state, &cancel).await?;
        daemon_cancel.cancel();
    }
    match daemon.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "the daemon task failed"),
    }
    drop(sim);
    let _ = std::fs::remove_dir_all(&dirs.root);
    Ok(())
}

/// The demo's own directories under the temporary directory, with the example files.
struct Dirs {
    root: PathBuf,
    deps: PathBuf,
    state: PathBuf,
    kubeconfig: PathBuf,
}

impl Dirs {
    fn write(sim: &Sim) -> Result<Dirs, DemoError> {
        let root = std::env::temp_dir().join(format!("depwatch-demo-{}", std::process::id()));
        let io = |source| DemoError::Dir {
            path: root.clone(),
            source,
        };
        let deps = root.join("deps");
        std::fs::create_dir_all(&deps).map_err(io)?;
        let kubeconfig = root.join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).map_err(io)?;
        for (name, text) in EXAMPLES {
            std::fs::write(deps.join(name), text).map_err(io)?;
        }
        Ok(Dirs {
            state: root.join("state"),
            deps,
            kubeconfig,
            root,
        })
    }
}

/// What the demo shows, and commands to try that work as printed.
fn introduce(once: bool, dirs: &Dirs) {
    say("depwatch demo: a simulated cluster with 5 Deployments in namespace demo, each running 1.0.0");
    say(&format!("  dependency files: {}", dirs.deps.display()));
    say(&format!(
        "  kubeconfig:       {}",
        dirs.kubeconfig.display()
    ));
    say("  web_demo.dep asks for a good version, api_demo.dep one that cannot be pulled,");
    say("  worker_demo.dep one that crashes, reports_demo.dep one that never becomes ready,");
    say("  checkout_demo.dep one that becomes ready but fails its own /healthz check.");
    if once {
        say("  --once: the demo stops when every example has an outcome, and prints them.");
    } else {
        // Commands that work as printed: this very binary, whether or not it is on PATH.
        say("Try, while it runs:");
        say(&format!(
            "  echo 1.2.0 > {}/web_demo.dep",
            dirs.deps.display()
        ));
        if on_path("kubectl").is_some() {
            say(&format!(
                "  kubectl --kubeconfig {} -n demo get deploy,pods",
                dirs.kubeconfig.display()
            ));
        }
        say(&format!(
            "  {} history demo/web --state-dir {}",
            this_binary(),
            dirs.state.display()
        ));
    }
    say("");
}

/// A busy default port is no reason for a demo to fail: take any free one instead.
fn free_or_any(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match std::net::TcpListener::bind(addr) {
        Ok(l) => {
            drop(l);
            addr
        }
        Err(_) => std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
    }
}

/// `--once`: wait until every example has an outcome, then print each.
async fn summarise_when_done(state: &Path, cancel: &CancellationToken) -> Result<(), DemoError> {
    let store = loop {
        if let Ok(s) = Store::open(state) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let services = store.services().await?;
        if services.len() == EXAMPLES.len() && services.iter().all(|s| !s.status.in_flight()) {
            say("summary:");
            for s in services {
                let last = store.history(Some(&s.key()), 1).await?.into_iter().next();
                let message = last.map(|d| d.message).unwrap_or_default();
                say(&format!(
                    "  {}/{}: {} — {}",
                    s.namespace, s.name, s.status, message
                ));
            }
            return Ok(());
        }
    }
}
