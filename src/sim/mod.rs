//! The simulated cluster (`depwatch sim`): a Kubernetes API server on loopback, faithful enough
//! for the real kubectl and the `kube` crate, with a deployment controller and kubelet in
//! miniature whose pods behave according to their image.
//!
//! # Layout
//! - [`store`]: versioned objects, event history and live events (the etcd of the sim).
//! - [`api`]: HTTP routing, verbs, admission, watches, fault injection and the audit log.
//! - [`patch`] and [`apply`]: the four patch types and field ownership.
//! - [`dryrun`]: `dryRun=All` (`kubectl --dry-run=server`): answered, never stored.
//! - [`controller`] and [`behaviour`]: ReplicaSets, pods and status, driven by image rules.
//! - [`workloads`]: StatefulSets and DaemonSets (ControllerRevisions, ordinals, nodes).
//! - [`discovery`], [`table`], [`protobuf`]: what kubectl needs besides the verbs.
//!
//! The daemon never uses this module directly: it meets the sim only through a kubeconfig,
//! exactly as it meets a real cluster.

pub mod api;
pub mod apply;
pub mod behaviour;
pub mod controller;
pub mod discovery;
pub mod dryrun;
pub mod meta;
pub mod patch;
pub mod protobuf;
pub mod puller;
pub mod rbac;
pub mod resources;
pub mod selector;
pub mod services;
pub mod store;
pub mod table;
pub mod workloads;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::api::{ApiState, Faults};
use self::behaviour::Behaviours;
use self::store::{ObjKey, Store};

/// How to run a simulated cluster.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free port.
    pub addr: SocketAddr,
    /// How long a healthy pod takes to become ready.
    pub ready_delay: Duration,
    /// A scenario file whose rules replace the default image rules.
    pub scenario: Option<PathBuf>,
    pub latency: Duration,
    pub error_rate: f64,
    pub conflict_rate: f64,
    /// End every watch after this long.
    pub watch_timeout: Option<Duration>,
    /// One JSON line per request.
    pub audit_log: Option<PathBuf>,
    /// Load state from here at start and save it here at stop, so a restarted sim has the same
    /// objects at the same resource versions.
    pub state_file: Option<PathBuf>,
    /// How many nodes the cluster has (`node-0` …): DaemonSets run one pod on each.
    pub nodes: usize,
    /// Pull images of registries on loopback for real (a manifest HEAD with the pod's pull
    /// secrets) instead of by the image rules.
    pub registries: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            ready_delay: Duration::from_millis(300),
            scenario: None,
            latency: Duration::ZERO,
            error_rate: 0.0,
            conflict_rate: 0.0,
            watch_timeout: None,
            audit_log: None,
            state_file: None,
            nodes: 3,
            registries: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open audit log {path}: {source}")]
    Audit {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("{0}")]
    Scenario(String),
    #[error("cannot build a client for the simulated cluster: {0}")]
    Client(String),
    #[error("cannot start the simulated cluster's controller thread: {0}")]
    Thread(std::io::Error),
}

/// A running simulated cluster. Dropping it stops the server and the controllers.
pub struct Sim {
    store: Arc<Store>,
    faults: Arc<Faults>,
    audit: Option<Arc<Mutex<std::fs::File>>>,
    addr: SocketAddr,
    config: SimConfig,
    server: Option<(CancellationToken, JoinHandle<()>)>,
    controller: CancellationToken,
}

impl Sim {
    /// Start a simulated cluster on `config.addr`.
    pub async fn start(config: SimConfig) -> Result<Sim, SimError> {
        let behaviours = match &config.scenario {
            Some(p) => Behaviours::from_file(p, config.ready_delay).map_err(SimError::Scenario)?,
            None => Behaviours::defaults(config.ready_delay),
        };
        let store = Arc::new(Store::new());
        match config.state_file.as_deref().filter(|p| p.exists()) {
            Some(p) => load_state(&store, p)?,
            None => seed(&store),
        }
        seed_nodes(&store, config.nodes);
        let faults = Arc::new(Faults::default());
        faults.set_latency(config.latency);
        faults.set_error_rate(config.error_rate);
        faults.set_conflict_rate(config.conflict_rate);
        faults.set_watch_timeout(config.watch_timeout.unwrap_or_default());
        let audit = match &config.audit_log {
            Some(path) => Some(Arc::new(Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| SimError::Audit {
                        path: path.clone(),
                        source,
                    })?,
            ))),
            None => None,
        };
        let mut sim = Sim {
            store,
            faults,
            audit,
            addr: config.addr,
            config,
            server: None,
            controller: CancellationToken::new(),
        };
        sim.serve().await?;
        let mut controller = controller::Controller::new(sim.store.clone(), behaviours);
        if sim.config.registries {
            let runtime = tokio::runtime::Handle::current();
            controller = controller.with_puller(puller::Puller::new(sim.store.clone(), runtime));
        }
        controller
            .spawn(sim.controller.clone())
            .map_err(SimError::Thread)?;
        Ok(sim)
    }

    async fn serve(&mut self) -> Result<(), SimError> {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(|source| SimError::Bind {
                addr: self.addr,
                source,
            })?;
        self.addr = listener.local_addr().map_err(|source| SimError::Bind {
            addr: self.addr,
            source,
        })?;
        let shutdown = CancellationToken::new();
        let state = Arc::new(ApiState {
            store: self.store.clone(),
            faults: self.faults.clone(),
            audit: self.audit.clone(),
            server_addr: self.addr.to_string(),
            shutdown: shutdown.clone(),
        });
        let app = axum::Router::new().fallback(api::handle).with_state(state);
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(token.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "simulated cluster server failed");
            }
        });
        self.server = Some((shutdown, task));
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this cluster, usable by kubectl and `depwatch run`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: depwatch-sim\n  cluster:\n    server: {url}\ncontexts:\n- name: depwatch-sim\n  context:\n    cluster: depwatch-sim\n    user: depwatch-sim\n    namespace: default\ncurrent-context: depwatch-sim\nusers:\n- name: depwatch-sim\n  user: {{}}\npreferences: {{}}\n",
            url = self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// A `kube::Client` for this cluster.
    pub fn client(&self) -> Result<kube::Client, SimError> {
        let uri: http::Uri = self
            .url()
            .parse()
            .map_err(|e: http::uri::InvalidUri| SimError::Client(e.to_string()))?;
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        kube::Client::try_from(config).map_err(|e| SimError::Client(e.to_string()))
    }

    /// The cluster's storage, for tests that inspect or seed state directly.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Drop the watch history, as an etcd compaction does: resuming watches get 410 Expired.
    pub fn compact(&self) {
        self.store.compact();
    }

    /// Stop serving (open watches end, connections are refused) but keep the state.
    pub async fn stop(&mut self) {
        if let Some((token, task)) = self.server.take() {
            token.cancel();
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serve again on the same address with the same state.
    pub async fn restart(&mut self) -> Result<(), SimError> {
        self.stop().await;
        self.serve().await
    }

    /// Stop everything and write the state file if one is configured.
    pub async fn shutdown(mut self) -> Result<(), SimError> {
        self.stop().await;
        self.controller.cancel();
        if let Some(path) = self.config.state_file.clone() {
            save_state(&self.store, &path)?;
        }
        Ok(())
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.controller.cancel();
        if let Some((token, task)) = self.server.take() {
            token.cancel();
            task.abort();
        }
    }
}

/// The namespaces every cluster starts with.
fn seed(store: &Store) {
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "uid": meta::uid(), "creationTimestamp": meta::now(),
                         "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        });
        let key = ObjKey::new(resources::namespaces(), "", ns);
        let _ = store.mutate(&key, |_| Ok(Some(obj)));
    }
}

/// The nodes `node-0` … `node-{n-1}`, Ready; nodes already in a restored state are kept.
fn seed_nodes(store: &Store, n: usize) {
    for i in 0..n {
        let node = workloads::node(i);
        let key = ObjKey::new(resources::nodes(), "", meta::name(&node));
        let _ = store.mutate(&key, |cur| Ok(Some(cur.cloned().unwrap_or(node))));
    }
}

fn load_state(store: &Store, path: &Path) -> Result<(), SimError> {
    let err = |message: String| SimError::State {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let snap: store::Snapshot =
        serde_json::from_str(&text).map_err(|e| err(format!("not a saved sim state: {e}")))?;
    store.restore(snap);
    Ok(())
}

fn save_state(store: &Store, path: &Path) -> Result<(), SimError> {
    let text = serde_json::to_string(&store.snapshot()).map_err(|e| SimError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| SimError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}
