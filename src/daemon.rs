//! `depwatch run`: wires the stages into one set of tasks and owns their start-up and shutdown.
//!
//! ```text
//! files ─notify─▶ watch ─▶ debounce ─▶ ingest (read, hash, parse) ─▶ scheduler table
//!                                                                      │ bounded queue
//!                                                                      ▼
//!                                   workers (N permits) ─▶ deploy: ensure ns ▶ patch ▶ await rollout
//!                                                                      │             │ failed
//!                                                                      ▼             ▼
//!                                                              store + alert   roll back + store + alert
//! ```

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert::Notifier;
use crate::deploy::attempt::{Engine, Permits};
use crate::deploy::recorder::{ApiWaits, Recorder};
use crate::deploy::{rollout::FailFast, DeployConfig, Deployer};
use crate::domain::{DeployOutcome, Trigger};
use crate::ingest::{self, Ingest, IngestConfig};
use crate::queue::Scheduler;
use crate::store::{Store, StoreError};
use crate::watch;

/// Everything `depwatch run` needs, validated.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub deps_dir: PathBuf,
    pub state_dir: PathBuf,
    /// PostgreSQL instead of SQLite in the state directory.
    pub database_url: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    pub workers: usize,
    pub queue_capacity: usize,
    pub quiet: Duration,
    pub max_wait: Duration,
    pub resync: Duration,
    pub rollout_timeout: Duration,
    /// `--namespaces` and `--allowed-images`.
    pub bounds: crate::bounds::Bounds,
    /// `--max-file-size`: larger dependency files are refused unread.
    pub max_file_size: u64,
    /// `--leader-elect`: act only while holding the Lease.
    pub leader: Option<crate::leader::LeaderConfig>,
    pub image_repo: Option<String>,
    pub rollback: bool,
    pub slack_webhook: Option<String>,
    /// A generic JSON webhook that receives every outcome.
    pub webhook_url: Option<String>,
    /// NATS server(s) on which every outcome is published.
    pub nats_url: Option<String>,
    pub fail_fast: FailFast,
    /// How long shutdown waits for in-flight deploys before leaving them to the next start.
    pub shutdown_grace: Duration,
    /// Deploy history kept per service.
    pub history_keep: usize,
    /// Deploy history older than this is removed.
    pub history_max_age: Option<Duration>,
    /// Restore the desired images when they are changed behind depwatch's back.
    pub self_heal: bool,
    /// Where the status page and API listen; `None` turns them off.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Named bearer tokens allowed to make changes through the API.
    pub api_token_file: Option<PathBuf>,
    /// Open HTTP connections served at once.
    pub http_max_connections: usize,
}

impl DaemonConfig {
    /// The defaults `depwatch run` uses, for a directory, a state directory and a kubeconfig.
    pub fn new(deps_dir: PathBuf, state_dir: PathBuf, kubeconfig: Option<PathBuf>) -> Self {
        DaemonConfig {
            deps_dir,
            state_dir,
            database_url: None,
            kubeconfig,
            context: None,
            workers: 100,
            queue_capacity: 1024,
            quiet: Duration::from_millis(100),
            max_wait: Duration::from_secs(10),
            resync: Duration::from_secs(300),
            rollout_timeout: Duration::from_secs(300),
            bounds: crate::bounds::Bounds::default(),
            max_file_size: crate::safefs::DEFAULT_MAX_FILE_SIZE,
            leader: None,
            image_repo: None,
            rollback: true,
            slack_webhook: None,
            webhook_url: None,
            nats_url: None,
            fail_fast: FailFast::default(),
            shutdown_grace: Duration::from_secs(30),
            history_keep: 200,
            history_max_age: None,
            self_heal: false,
            http_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_token_file: None,
            http_max_connections: crate::http::MAX_CONNECTIONS,
        }
    }
}

/// Fatal errors: the daemon cannot start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("dependency directory {0} does not exist or is not a directory")]
    DepsDir(PathBuf),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lock(#[from] crate::lock::LockError),
    #[error("cannot load Kubernetes configuration: {0}")]
    KubeConfig(String),
    #[error(transparent)]
    Watch(#[from] watch::WatchError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    #[error("the Lease was lost; this replica stopped so that only one acts")]
    LostLease,
}

/// Build a kube client from a kubeconfig file (and context), or infer one (KUBECONFIG,
/// ~/.kube/config, in-cluster service account). Also returns the API server's URL.
pub async fn kube_client(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
    metrics: Option<&crate::metrics::Metrics>,
) -> Result<(kube::Client, String), DaemonError> {
    let options = kube::config::KubeConfigOptions {
        context: context.map(String::from),
        ..Default::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| DaemonError::KubeConfig(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| DaemonError::KubeConfig(format!("{}: {e}", path.display())))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| DaemonError::KubeConfig(e.to_string()))?,
        None => kube::Config::infer()
            .await
            .map_err(|e| DaemonError::KubeConfig(e.to_string()))?,
    };
    let server = config.cluster_url.to_string();
    let mut config = config;
    // API servers' audit logs name depwatch, and RBAC checks can tell its requests apart.
    config.headers.push((
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("depwatch/", env!("CARGO_PKG_VERSION"))),
    ));
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|e| DaemonError::KubeConfig(e.to_string()))?;
    let client = match metrics {
        Some(m) => builder
            .with_layer(&crate::metrics::KubeRequestsLayer(m.clone()))
            .build(),
        None => builder.build(),
    };
    Ok((client, server))
}

/// Run the daemon until `cancel` fires, then drain in-flight deploys within the grace period.
pub async fn run(config: DaemonConfig, cancel: CancellationToken) -> Result<(), DaemonError> {
    run_with(config, cancel, None).await
}

/// [`run`], telling `on_listen` where the status page and API listen.
pub async fn run_with(
    config: DaemonConfig,
    cancel: CancellationToken,
    on_listen: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), DaemonError> {
    if !config.deps_dir.is_dir() {
        return Err(DaemonError::DepsDir(config.deps_dir.clone()));
    }
    // One spelling of every path: the watcher reports paths under the directory as given, and
    // the scanner must name the same files the same way. Absolute, but symlinks are kept: a
    // git-sync root is a symlink swapped to each new checkout, and must be followed anew.
    let mut config = config;
    config.deps_dir = std::path::absolute(&config.deps_dir)
        .map_err(|_| DaemonError::DepsDir(config.deps_dir.clone()))?;
    // One writer per state directory, before anything is read or written there.
    std::fs::create_dir_all(&config.state_dir).map_err(|source| crate::lock::LockError::Io {
        dir: config.state_dir.clone(),
        source,
    })?;
    let _lock = crate::lock::StateLock::acquire(&config.state_dir)?;
    let store = Store::open_or_connect(&config.state_dir, config.database_url.as_deref())?;
    if config.leader.is_some() && config.database_url.is_none() {
        tracing::warn!("--leader-elect without --database-url: each replica keeps its own record, so a standby that takes over does not know what the leader did");
    }
    // A standby writes nothing: retention waits for the Lease (the periodic task prunes then).
    if config.leader.is_none() {
        let pruned = store.prune(config.history_keep, config.history_max_age)?;
        if pruned > 0 {
            tracing::info!(pruned, "old deploy history removed (retention)");
        }
    }
    for d in store.interrupted()? {
        tracing::warn!(service = %format!("{}/{}", d.namespace, d.name), deploy = d.id, "a deploy was interrupted by a stop; it is judged again now");
    }
    let tokens = match &config.api_token_file {
        Some(path) => crate::http::read_tokens(path)?,
        None => Vec::new(),
    };
    let metrics = crate::metrics::Metrics::new();
    let (client, server) = kube_client(
        config.kubeconfig.as_deref(),
        config.context.as_deref(),
        Some(&metrics),
    )
    .await?;
    // Which cluster, as whom, within which bounds: the first thing to check at 3 a.m.
    let context = config.context.clone().or_else(|| {
        let path = config
            .kubeconfig
            .clone()
            .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))?;
        kube::config::Kubeconfig::read_from(path)
            .ok()?
            .current_context
    });
    tracing::info!(
        cluster = %server,
        context = context.as_deref().unwrap_or("(in-cluster or default)"),
        bounds = %config.bounds.describe(),
        record = %store.describe(),
        "connected to the Kubernetes API"
    );
    if config.bounds.is_unbounded() {
        tracing::warn!("no --namespaces or --allowed-images: any file writer or token holder can deploy any image to any namespace depwatch's RBAC reaches");
    }
    let mut notifier = Notifier::new(metrics.clone());
    if let Some(url) = config.slack_webhook.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_slack(url, Duration::from_secs(10));
    }
    if let Some(url) = config.webhook_url.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_webhook(url, Duration::from_secs(10));
    }
    if let Some(url) = config.nats_url.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_nats(url);
    }
    let deployer = Deployer::new(
        client.clone(),
        DeployConfig {
            bounds: Arc::new(config.bounds.clone()),
            image_repo: config.image_repo.clone(),
            rollout_timeout: config.rollout_timeout,
            fail_fast: config.fail_fast,
            server,
        },
    );
    let api_waits = Arc::new(ApiWaits::default());
    let recorder = Recorder {
        store: store.clone(),
        metrics: metrics.clone(),
        notifier,
        deployer: deployer.clone(),
        api_waits: api_waits.clone(),
    };
    let engine = Engine {
        deployer: deployer.clone(),
        recorder: recorder.clone(),
        permits: Permits::new(config.workers),
        rollback: config.rollback,
    };
    let (scheduler, queue_rx) = Scheduler::new(config.queue_capacity);

    // Watch before the first scan, so nothing written in between is missed.
    // Room for a burst of 10,000 saves (two events each) without falling back to a rescan.
    let (event_tx, event_rx) = mpsc::channel(32_768);
    let overflow = Arc::new(AtomicBool::new(false));
    let root_watch = watch::RootWatch::start(&config.deps_dir, event_tx, overflow.clone())?;

    let tracker = TaskTracker::new();
    let stages = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    let scanned = Arc::new(AtomicBool::new(false));
    let standby = Arc::new(AtomicBool::new(config.leader.is_some()));
    if let Some(addr) = config.http_addr {
        let state = Arc::new(crate::http::HttpState {
            store: store.clone(),
            deps_dir: config.deps_dir.clone(),
            tokens,
            metrics: metrics.clone(),
            queue: scheduler.stats.clone(),
            scheduler: scheduler.clone(),
            scanned: scanned.clone(),
            standby: standby.clone(),
            client: client.clone(),
            watches: Some(deployer.watches().clone()),
            api_waits: api_waits.clone(),
            shutdown: stages.clone(),
            post_lock: tokio::sync::Mutex::new(()),
            event_streams: Arc::new(tokio::sync::Semaphore::new(crate::http::MAX_EVENT_STREAMS)),
            bounds: Arc::new(config.bounds.clone()),
            max_file_size: config.max_file_size,
            root_problem: root_watch.problem.clone(),
        });
        // Bound before anything else runs, so a taken port is a clear start-up error.
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| crate::http::HttpError::Bind { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| crate::http::HttpError::Bind { addr, source })?;
        tracing::info!(url = %format!("http://{bound}/"), "status page and API listening");
        if let Some(tx) = on_listen {
            let _ = tx.send(bound);
        }
        set.spawn(crate::http::serve(
            listener,
            state,
            config.http_max_connections,
            stages.clone(),
        ));
    }
    // With --leader-elect, nothing below runs until this replica holds the Lease; meanwhile the
    // watches a takeover needs are kept warm.
    if config.leader.is_some() {
        tokio::spawn(crate::leader::keep_warm(
            deployer.watches().clone(),
            store.clone(),
            standby.clone(),
        ));
    }
    let lost_lease = CancellationToken::new();
    let _leadership = match &config.leader {
        Some(leader) => {
            match crate::leader::acquire(client.clone(), leader, &cancel, lost_lease.clone())
                .await?
            {
                Some(held) => Some(held),
                None => {
                    tracing::info!("stopped while standing by");
                    stages.cancel();
                    while set.join_next().await.is_some() {}
                    return Ok(());
                }
            }
        }
        None => None,
    };
    standby.store(false, std::sync::atomic::Ordering::SeqCst);
    set.spawn(crate::queue::run(
        engine,
        scheduler.clone(),
        queue_rx,
        tracker.clone(),
        stages.clone(),
    ));

    let mut ingest = Ingest::new(
        config.deps_dir.clone(),
        store.clone(),
        scheduler.clone(),
        crate::ingest::FileRules {
            max_file_size: config.max_file_size,
            bounds: Arc::new(config.bounds.clone()),
        },
    );
    ingest.rescan(Trigger::Startup).await;
    // Deploys a stop interrupted are resumed by their service's worker; those whose file is
    // gone are closed here so the record never shows work in progress that nobody does.
    for d in store.interrupted()? {
        let key = crate::depfile::ServiceKey {
            name: d.name.clone(),
            namespace: d.namespace.clone(),
        };
        if scheduler.desired(&key).is_none() {
            store.finish_deploy(
                d.id,
                DeployOutcome::Interrupted,
                "depwatch stopped during this deploy",
            )?;
        }
    }
    scanned.store(true, std::sync::atomic::Ordering::SeqCst);
    tracing::info!(dir = %crate::safefs::shown(&config.deps_dir), "watching for dependency file changes");
    crate::sdnotify::ready(&format!(
        "watching {}",
        crate::safefs::shown(&config.deps_dir)
    ));
    crate::sdnotify::spawn_watchdog(stages.clone());
    set.spawn(ingest::run(
        IngestConfig {
            quiet: config.quiet,
            max_wait: config.max_wait,
            resync: config.resync,
        },
        ingest,
        root_watch,
        event_rx,
        overflow,
        stages.clone(),
    ));

    let heal = config.self_heal.then(|| {
        let (tx, mut rx) = mpsc::channel::<crate::depfile::ServiceKey>(1024);
        let scheduler = scheduler.clone();
        set.spawn(async move {
            while let Some(key) = rx.recv().await {
                if let Some(mut desired) = scheduler.desired(&key) {
                    desired.trigger = Trigger::SelfHeal;
                    desired.actor = "depwatch".into();
                    scheduler.submit(key, desired).await;
                }
            }
        });
        tx
    });
    set.spawn(crate::deploy::drift::run(
        deployer,
        recorder,
        heal,
        stages.clone(),
    ));
    let retention = store.clone();
    let (keep, max_age, every) = (config.history_keep, config.history_max_age, config.resync);
    let stop = stages.clone();
    set.spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Err(e) = retention.prune(keep, max_age) {
                        tracing::warn!(error = %e, "history retention failed");
                    }
                }
            }
        }
    });

    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = lost_lease.cancelled() => {}
    }
    tracing::info!("shutting down: no new work is taken; waiting for in-flight deploys");
    crate::sdnotify::stopping("waiting for in-flight deploys");
    stages.cancel();
    while set.join_next().await.is_some() {}
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            grace = %humantime::format_duration(config.shutdown_grace),
            "in-flight deploys did not finish in time; they stay in progress in the record and are judged at the next start"
        );
    }
    if lost_lease.is_cancelled() {
        return Err(DaemonError::LostLease);
    }
    Ok(())
}
