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
use crate::domain::{DeployOutcome, Trigger};
use crate::fence::Fence;
use crate::pipeline::deploy::attempt::{Engine, Permits};
use crate::pipeline::deploy::recorder::{ApiWaits, Recorder};
use crate::pipeline::deploy::{rollout::FailFast, DeployConfig, Deployer};
use crate::pipeline::ingest::{self, Ingest, IngestConfig};
use crate::pipeline::queue::Scheduler;
use crate::pipeline::watch;
use crate::store::{Store, StoreError};

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
    /// Chat webhooks: Microsoft Teams (Workflows), Google Chat, Discord.
    pub teams_webhook: Option<String>,
    pub google_chat_webhook: Option<String>,
    pub discord_webhook: Option<String>,
    /// NATS server(s) on which every outcome is published.
    pub nats_url: Option<String>,
    /// Prometheus, for the `prometheus` checks of a `verify:` block.
    pub prometheus_url: Option<reqwest::Url>,
    pub fail_fast: FailFast,
    /// How long shutdown waits for in-flight deploys before leaving them to the next start.
    pub shutdown_grace: Duration,
    /// Deploy history kept per service.
    pub history_keep: usize,
    /// Deploy history older than this is removed.
    pub history_max_age: Option<Duration>,
    /// Restore the desired images when they are changed behind depwatch's back.
    pub self_heal: bool,
    /// Patch workloads another engine (Argo CD, Flux, Helm) manages anyway.
    pub allow_owned: bool,
    /// `--registry-check`, `--registry-wait`, `--registry-credentials`.
    pub registry_check: crate::registry::Mode,
    pub registry_wait: Duration,
    pub registry_credentials: Option<PathBuf>,
    /// `--ecr-pull-secret`: the name of the ECR pull secret kept in each namespace deployed to.
    pub ecr_pull_secret: Option<String>,
    /// Where the status page and API listen; `None` turns them off.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Named bearer tokens allowed to make changes through the API.
    pub api_token_file: Option<PathBuf>,
    /// Open HTTP connections served at once.
    pub http_max_connections: usize,
    /// `--http-allowed-hosts`: names the HTTP server answers to besides IPs and localhost.
    pub http_allowed_hosts: Vec<String>,
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
            teams_webhook: None,
            google_chat_webhook: None,
            discord_webhook: None,
            nats_url: None,
            prometheus_url: None,
            fail_fast: FailFast::default(),
            shutdown_grace: Duration::from_secs(30),
            history_keep: 200,
            history_max_age: None,
            self_heal: false,
            allow_owned: false,
            registry_check: crate::registry::Mode::On,
            registry_wait: Duration::from_secs(10),
            registry_credentials: None,
            ecr_pull_secret: None,
            http_addr: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 8080))),
            api_token_file: None,
            http_max_connections: crate::http::MAX_CONNECTIONS,
            http_allowed_hosts: Vec::new(),
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
    #[error("{0}")]
    KubeConfig(String),
    #[error(transparent)]
    Watch(#[from] watch::WatchError),
    #[error(transparent)]
    Http(#[from] crate::http::HttpError),
    #[error(transparent)]
    Leader(#[from] crate::leader::LeaderError),
    #[error("the Lease was lost; this replica stopped so that only one acts")]
    LostLease,
    #[error("--registry-credentials {path}: {why}; expected a docker config.json such as {{\"auths\": {{\"registry.example.com\": {{\"auth\": \"<base64 user:password>\"}}}}}}")]
    RegistryCredentials { path: PathBuf, why: String },
}

/// The registry pre-flight `--registry-check` asks for, with `--registry-credentials` read.
fn preflight(config: &DaemonConfig) -> Result<Option<crate::registry::Preflight>, DaemonError> {
    if config.registry_check == crate::registry::Mode::Off {
        return Ok(None);
    }
    let own = match &config.registry_credentials {
        None => Default::default(),
        Some(path) => {
            let fail = |why: String| DaemonError::RegistryCredentials {
                path: path.clone(),
                why,
            };
            let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
            crate::registry::reference::parse_docker_config(&text).map_err(fail)?
        }
    };
    Ok(Some(crate::registry::Preflight {
        mode: config.registry_check,
        wait: config.registry_wait,
        own,
        registries: crate::registry::Registries::new(),
        warned: Default::default(),
    }))
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
            if !path.is_file() {
                return Err(DaemonError::KubeConfig(format!(
                    "no kubeconfig at {}; pass --kubeconfig (or DEPWATCH_KUBECONFIG) with the path of an existing kubeconfig file",
                    path.display()
                )));
            }
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| kube_config_error(Some(path), &e))?;
            kube::Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|e| kube_config_error(Some(path), &e))?
        }
        None if context.is_some() => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| kube_config_error(None, &e))?,
        None => {
            if let Some(why) = nothing_to_infer().or_else(named_kubeconfig_missing) {
                return Err(DaemonError::KubeConfig(why));
            }
            kube::Config::infer()
                .await
                .map_err(|e| kube_config_error(None, &e))?
        }
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

/// What the CLI needs besides its defaults to read this daemon's record: its state directory
/// when it is not the default (the demo's, a test's), unless the record is in PostgreSQL.
fn cli_flags(config: &DaemonConfig) -> String {
    let default = std::path::Path::new(crate::cli::DEFAULT_STATE_DIR);
    match (&config.database_url, config.state_dir.as_path() == default) {
        (None, false) => format!(" --state-dir {}", config.state_dir.display()),
        _ => String::new(),
    }
}

/// Why `KUBECONFIG` cannot serve, if it names only files that do not exist: as clear as the
/// same mistake with `--kubeconfig`.
fn named_kubeconfig_missing() -> Option<String> {
    let named = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty())?;
    let paths: Vec<PathBuf> = std::env::split_paths(&named)
        .filter(|p| !p.as_os_str().is_empty())
        .collect();
    (!paths.is_empty() && paths.iter().all(|p| !p.is_file())).then(|| {
        let shown: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        format!(
            "KUBECONFIG names {}, which does not exist; set KUBECONFIG to an existing kubeconfig file, or pass --kubeconfig FILE",
            shown.join(", ")
        )
    })
}

/// Why no Kubernetes configuration can be found without a `--kubeconfig`, if none can: not in a
/// cluster, no `KUBECONFIG`, no `~/.kube/config`.
fn nothing_to_infer() -> Option<String> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let named = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty());
    let home = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".kube/config"))
        .filter(|p| p.is_file());
    (!in_cluster && named.is_none() && home.is_none()).then(|| {
        "no Kubernetes configuration found: not running in a cluster, KUBECONFIG is not set and there is no ~/.kube/config; pass --kubeconfig FILE (or set DEPWATCH_KUBECONFIG)".to_string()
    })
}

/// A kube-rs configuration error said once, without its doubled quotes, with what to do.
fn kube_config_error(path: Option<&std::path::Path>, e: &dyn std::error::Error) -> DaemonError {
    let text = crate::domain::error_chain(e)
        .replace("'\"", "'")
        .replace("\"'", "'");
    let what = match path {
        Some(p) => format!("kubeconfig {}", p.display()),
        None => "the Kubernetes configuration".to_string(),
    };
    DaemonError::KubeConfig(format!(
        "{what} cannot be used: {text}; check the file (kubectl --kubeconfig FILE config view) or pass another with --kubeconfig"
    ))
}

/// Run the daemon until `cancel` fires, then drain in-flight deploys within the grace period.
pub async fn run(config: DaemonConfig, cancel: CancellationToken) -> Result<(), DaemonError> {
    run_with(config, cancel, None).await
}

/// [`run`], telling `on_listen` where the status page and API listen. The stages, in order:
/// start (record, cluster, HTTP), take over (the Lease, with `--leader-elect`), finish the
/// unfinished rows and scan, serve until stopped, and drain.
pub async fn run_with(
    config: DaemonConfig,
    cancel: CancellationToken,
    on_listen: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), DaemonError> {
    let mut daemon = start(config, on_listen).await?;
    if !daemon.take_over(&cancel).await? {
        tracing::info!("stopped while standing by");
        daemon.drain().await;
        return Ok(());
    }
    daemon.keep_ecr_pull_secrets();
    daemon.finish_unfinished_and_scan().await?;
    daemon.serve();
    let lost = daemon.fence.lost();
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = lost.cancelled() => {}
    }
    // Stepping down at the end of the drain gives the Lease up: only a loss before counts.
    let lost = lost.is_cancelled();
    daemon.drain().await;
    if lost {
        return Err(DaemonError::LostLease);
    }
    Ok(())
}

/// The running daemon's parts, handed from stage to stage.
struct Running {
    config: DaemonConfig,
    /// One daemon per state directory, for as long as this lives.
    _lock: crate::lock::StateLock,
    /// The record, fenced: without a valid Lease nothing is written.
    store: Store,
    deployer: Deployer,
    recorder: Recorder,
    engine: Engine,
    scheduler: Scheduler,
    queue_rx: Option<mpsc::Receiver<crate::domain::ServiceKey>>,
    root_watch: Option<watch::RootWatch>,
    /// Read barriers for the file watch (reads wait for their writer).
    barriers: Option<watch::Barriers>,
    event_rx: Option<mpsc::Receiver<watch::FileEvent>>,
    overflow: Arc<AtomicBool>,
    ingest: Option<Ingest>,
    client: kube::Client,
    /// Deploys in flight, drained at shutdown within the grace.
    tracker: TaskTracker,
    /// Notification senders, given a moment at exit to deliver what is queued.
    senders: TaskTracker,
    /// Cancelled to stop the stages (not the deploys in flight).
    stages: CancellationToken,
    set: tokio::task::JoinSet<()>,
    scanned: Arc<AtomicBool>,
    standby: Arc<AtomicBool>,
    /// Writes allowed only while the Lease is held (always, without `--leader-elect`).
    fence: Fence,
    /// Held for as long as this replica leads; dropping it gives the Lease up.
    leadership: Option<crate::leader::Leadership>,
    /// `--ecr-pull-secret`: the token and the namespaces, shared with its two tasks.
    ecr: Option<crate::registry::ecr::EcrPullSecrets>,
}

/// The first stage: the state directory, the record, the cluster, the HTTP server and the
/// watch on the dependency directory. Nothing is deployed or written yet.
async fn start(
    config: DaemonConfig,
    on_listen: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<Running, DaemonError> {
    let (config, lock, fence, store) = open_record(config).await?;
    let tokens = match &config.api_token_file {
        Some(path) => crate::http::read_tokens(path)?,
        None => Vec::new(),
    };
    let metrics = crate::metrics::Metrics::new();
    let (client, server) = connect(&config, &store, &metrics).await?;
    let senders = TaskTracker::new();
    let stages = CancellationToken::new();
    let ecr = config
        .ecr_pull_secret
        .as_deref()
        .map(crate::registry::ecr::EcrPullSecrets::new);
    let deployer = Deployer::new(client.clone(), deploy_config(&config, server, &ecr)?)
        .fenced(fence.clone(), senders.clone());
    let recorder = Recorder {
        store: store.clone(),
        metrics: metrics.clone(),
        notifier: notifier(&config, &metrics, &senders),
        deployer: deployer.clone(),
        api_waits: Arc::new(ApiWaits::default()),
    };
    let engine = Engine {
        deployer: deployer.clone(),
        recorder: recorder.clone(),
        permits: Permits::new(config.workers),
        rollback: config.rollback,
        shutdown: stages.clone(),
        prober: crate::checks::probe::Prober::new(client.clone(), config.prometheus_url.clone()),
    };
    let (scheduler, queue_rx) = Scheduler::new(config.queue_capacity);
    // Watch before the first scan, so nothing written in between is missed.
    // Room for a burst of 10,000 saves (two events each) without falling back to a rescan.
    let (event_tx, event_rx) = mpsc::channel(32_768);
    let overflow = Arc::new(AtomicBool::new(false));
    let barriers = watch::Barriers::new(config.state_dir.join("watch-barrier"));
    let root_watch =
        watch::RootWatch::start(&config.deps_dir, event_tx, overflow.clone(), barriers.dir())?;
    let mut daemon = Running {
        _lock: lock,
        store,
        deployer,
        recorder,
        engine,
        scheduler,
        queue_rx: Some(queue_rx),
        root_watch: Some(root_watch),
        barriers: Some(barriers),
        event_rx: Some(event_rx),
        overflow,
        ingest: None,
        client,
        tracker: TaskTracker::new(),
        senders,
        stages,
        set: tokio::task::JoinSet::new(),
        scanned: Arc::new(AtomicBool::new(false)),
        standby: Arc::new(AtomicBool::new(config.leader.is_some())),
        fence,
        leadership: None,
        ecr,
        config,
    };
    daemon.keep_ecr_tokens(&metrics);
    daemon.serve_http(tokens, metrics, on_listen).await?;
    Ok(daemon)
}

/// What the deployer is told of the daemon's settings.
fn deploy_config(
    config: &DaemonConfig,
    server: String,
    ecr: &Option<crate::registry::ecr::EcrPullSecrets>,
) -> Result<DeployConfig, DaemonError> {
    Ok(DeployConfig {
        bounds: Arc::new(config.bounds.clone()),
        image_repo: config.image_repo.clone(),
        rollout_timeout: config.rollout_timeout,
        fail_fast: config.fail_fast,
        allow_owned: config.allow_owned,
        preflight: preflight(config)?,
        ecr_identity: ecr
            .is_none()
            .then(crate::registry::ecr::identity::EcrIdentity::from_env),
        ecr: ecr.clone(),
        server,
    })
}

/// The dependency directory checked and spelled absolutely, the state directory's lock taken,
/// and the record opened behind the fence (a Lease's, with `--leader-elect`).
async fn open_record(
    mut config: DaemonConfig,
) -> Result<(DaemonConfig, crate::lock::StateLock, Fence, Store), DaemonError> {
    if !config.deps_dir.is_dir() {
        return Err(DaemonError::DepsDir(config.deps_dir.clone()));
    }
    // One spelling of every path: the watcher reports paths under the directory as given, and
    // the scanner must name the same files the same way. Absolute, but symlinks are kept: a
    // git-sync root is a symlink swapped to each new checkout, and must be followed anew.
    config.deps_dir = std::path::absolute(&config.deps_dir)
        .map_err(|_| DaemonError::DepsDir(config.deps_dir.clone()))?;
    // One writer per state directory, before anything is read or written there.
    std::fs::create_dir_all(&config.state_dir).map_err(|source| crate::lock::LockError::Io {
        dir: config.state_dir.clone(),
        source,
    })?;
    let lock = crate::lock::StateLock::acquire(&config.state_dir)?;
    let fence = match config.leader {
        Some(_) => Fence::leased(),
        None => Fence::open(),
    };
    let store = Store::open_or_connect(&config.state_dir, config.database_url.as_deref())
        .await?
        .fenced(fence.clone())
        .with_writer()?;
    if config.leader.is_some() && config.database_url.is_none() {
        tracing::warn!("--leader-elect without --database-url: each replica keeps its own record, so a standby that takes over does not know what the leader did");
    }
    Ok((config, lock, fence, store))
}

/// A client for the cluster, and whether its API server answers now (said in the start-up
/// line, never fatal: deploys wait for it).
async fn connect(
    config: &DaemonConfig,
    store: &Store,
    metrics: &crate::metrics::Metrics,
) -> Result<(kube::Client, String), DaemonError> {
    let (client, server) = kube_client(
        config.kubeconfig.as_deref(),
        config.context.as_deref(),
        Some(metrics),
    )
    .await?;
    let answers = tokio::time::timeout(Duration::from_secs(3), client.apiserver_version()).await;
    let reachable = match answers {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(crate::domain::error_chain(&e)),
        Err(_) => Err("no answer within 3s".to_string()),
    };
    let answers = reachable.is_ok();
    log_start(config, &server, store, reachable);
    if answers {
        log_access(&client, &config.bounds).await;
    }
    Ok((client, server))
}

/// Which workload kinds this identity may patch where, asked once at start (a namespace it may not
/// patch is a warning now, not a failure at the first deploy there).
async fn log_access(client: &kube::Client, bounds: &crate::bounds::Bounds) {
    let asked = tokio::time::timeout(
        Duration::from_secs(5),
        crate::pipeline::deploy::access::may_patch(client.clone(), bounds.exact_namespaces()),
    )
    .await;
    match asked {
        Ok(Ok(all)) => {
            let line = crate::pipeline::deploy::access::describe(&all);
            if all.iter().all(|a| a.allowed) {
                tracing::info!(permissions = %line, "RBAC checked (SelfSubjectAccessReview)");
            } else {
                tracing::warn!(permissions = %line, "RBAC checked (SelfSubjectAccessReview): deploys of what it may not patch will fail; grant depwatch's ClusterRole there");
            }
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot ask what depwatch may do (SelfSubjectAccessReview)")
        }
        Err(_) => tracing::debug!("no answer to SelfSubjectAccessReview within 5s"),
    }
}

/// Which cluster, as whom, within which bounds: the first thing to check at 3 a.m. Says
/// "connected" only when the API server answered.
fn log_start(config: &DaemonConfig, server: &str, store: &Store, reachable: Result<(), String>) {
    let context = config.context.clone().or_else(|| {
        let path = config
            .kubeconfig
            .clone()
            .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from))?;
        kube::config::Kubeconfig::read_from(path)
            .ok()?
            .current_context
    });
    let context = context.as_deref().unwrap_or("(in-cluster or default)");
    let (bounds, record) = (config.bounds.describe(), store.describe());
    match reachable {
        Ok(()) => tracing::info!(
            cluster = %server, context, %bounds, %record,
            "connected to the Kubernetes API"
        ),
        Err(why) => tracing::warn!(
            cluster = %server, context, %bounds, %record, error = %why,
            "the Kubernetes API server does not answer yet; depwatch starts anyway and deploys wait for it (check the kubeconfig's server and the network)"
        ),
    }
    if config.bounds.is_unbounded() {
        tracing::warn!("no --namespaces or --allowed-images: any file writer or token holder can deploy any image to any namespace depwatch's RBAC reaches");
    }
}

/// Slack, the webhook and NATS, as configured; their senders belong to `senders`.
fn notifier(
    config: &DaemonConfig,
    metrics: &crate::metrics::Metrics,
    senders: &TaskTracker,
) -> Notifier {
    let mut notifier = Notifier::new(metrics.clone()).tracked(senders.clone());
    if let Some(url) = config.slack_webhook.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_slack(url, Duration::from_secs(10));
    }
    if let Some(url) = config.teams_webhook.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_teams(url, Duration::from_secs(10));
    }
    if let Some(url) = config.google_chat_webhook.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_google_chat(url, Duration::from_secs(10));
    }
    if let Some(url) = config.discord_webhook.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_discord(url, Duration::from_secs(10));
    }
    if let Some(url) = config.webhook_url.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_webhook(url, Duration::from_secs(10));
    }
    if let Some(url) = config.nats_url.clone().filter(|u| !u.is_empty()) {
        notifier = notifier.with_nats(url);
    }
    notifier
}

impl Running {
    /// ECR tokens kept fresh from the start (a standby's pre-flight never runs, but its
    /// /readyz tells).
    fn keep_ecr_tokens(&mut self, metrics: &crate::metrics::Metrics) {
        if let Some(ecr) = self.ecr.clone() {
            let keeper = crate::registry::ecr::keeper::refresh_tokens(
                ecr,
                metrics.clone(),
                self.stages.clone(),
            );
            self.set.spawn(keeper);
        }
    }

    /// Serve the status page and API (also on a standby: reads, and its readiness).
    async fn serve_http(
        &mut self,
        tokens: Vec<crate::http::Token>,
        metrics: crate::metrics::Metrics,
        on_listen: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
    ) -> Result<(), DaemonError> {
        let Some(addr) = self.config.http_addr else {
            return Ok(());
        };
        let root_problem = match &self.root_watch {
            Some(w) => w.problem.clone(),
            None => Arc::default(),
        };
        let state = Arc::new(crate::http::HttpState {
            store: self.store.clone(),
            deps_dir: self.config.deps_dir.clone(),
            tokens,
            metrics,
            queue: self.scheduler.stats.clone(),
            scheduler: self.scheduler.clone(),
            scanned: self.scanned.clone(),
            standby: self.standby.clone(),
            api_probe: self.deployer.api_probe(),
            live: self.deployer.live_images(),
            api_waits: self.recorder.api_waits.clone(),
            shutdown: self.stages.clone(),
            post_lock: tokio::sync::Mutex::new(()),
            event_streams: Arc::new(tokio::sync::Semaphore::new(crate::http::MAX_EVENT_STREAMS)),
            bounds: Arc::new(self.config.bounds.clone()),
            max_file_size: self.config.max_file_size,
            root_problem,
            ecr: self.ecr.clone(),
            allowed_hosts: Arc::new(self.config.http_allowed_hosts.clone()),
            cli_flags: cli_flags(&self.config),
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
        self.set.spawn(crate::http::serve(
            listener,
            state,
            self.config.http_max_connections,
            self.stages.clone(),
        ));
        Ok(())
    }

    /// With `--leader-elect`, wait to hold the Lease, keeping the watches a takeover needs
    /// warm meanwhile. `false` when stopped first.
    async fn take_over(&mut self, cancel: &CancellationToken) -> Result<bool, DaemonError> {
        let Some(leader) = self.config.leader.clone() else {
            return Ok(true);
        };
        let warm = CancellationToken::new();
        self.set.spawn(crate::leader::keep_warm(
            self.deployer.watches().clone(),
            self.store.clone(),
            self.standby.clone(),
            warm.clone(),
        ));
        let held =
            crate::leader::acquire(self.client.clone(), &leader, cancel, self.fence.clone()).await;
        warm.cancel();
        self.leadership = held?;
        if self.leadership.is_none() {
            return Ok(false);
        }
        self.standby
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // A standby writes nothing: retention waited for the Lease.
        Ok(true)
    }

    /// With `--ecr-pull-secret`, keep the Secrets (writes: only once this replica acts).
    fn keep_ecr_pull_secrets(&mut self) {
        let Some(ecr) = self.ecr.clone() else {
            return;
        };
        let keeper = crate::registry::ecr::keeper::Keeper {
            ecr,
            client: self.client.clone(),
            bounds: Arc::new(self.config.bounds.clone()),
            fence: self.fence.clone(),
            metrics: self.recorder.metrics.clone(),
        };
        self.set.spawn(crate::registry::ecr::keeper::keep_secrets(
            keeper,
            self.stages.clone(),
        ));
    }

    /// Start the workers, then finish what a stop (or a dead leader) left unfinished: every
    /// service with a deploy still in progress in the record is deployed again from the
    /// cluster's state, even when its version is pinned (a rollback may be half done); rows
    /// nobody can finish (the file is gone) are closed. Then the whole directory is compared
    /// with the record.
    async fn finish_unfinished_and_scan(&mut self) -> Result<(), DaemonError> {
        let pruned = self
            .store
            .prune(self.config.history_keep, self.config.history_max_age)
            .await?;
        if pruned > 0 {
            tracing::info!(pruned, "old deploy history removed (retention)");
        }
        let unfinished = self.store.interrupted().await?;
        for d in &unfinished {
            let what = if d.restore.is_empty() {
                "a deploy was interrupted by a stop; it is judged again now"
            } else {
                "a rollback was interrupted by a stop; it is finished now"
            };
            tracing::warn!(service = %format!("{}/{}", d.namespace, d.name), deploy = d.id, "{what}");
        }
        if let Some(rx) = self.queue_rx.take() {
            self.set.spawn(crate::pipeline::queue::run(
                self.engine.clone(),
                self.scheduler.clone(),
                rx,
                self.tracker.clone(),
                self.stages.clone(),
                self.fence.lost(),
            ));
            self.set.spawn(crate::memory::while_quiet(
                self.scheduler.stats.clone(),
                self.stages.clone(),
            ));
        }
        let mut ingest = Ingest::new(
            self.config.deps_dir.clone(),
            self.store.clone(),
            self.scheduler.clone(),
            crate::pipeline::ingest::FileRules {
                max_file_size: self.config.max_file_size,
                bounds: Arc::new(self.config.bounds.clone()),
            },
        );
        ingest.notify(self.recorder.notifier.clone());
        ingest.resolve_with(self.deployer.clone());
        ingest.unfinished(unfinished.iter().map(|d| d.key()));
        ingest.rescan(Trigger::Startup).await;
        for d in self.store.interrupted().await? {
            if self.scheduler.wanted(&d.key()).is_none() {
                self.store.finish_deploy(
                    d.id,
                    DeployOutcome::Interrupted,
                    "depwatch stopped during this deploy, and its file is gone: nobody finishes it",
                ).await?;
            }
        }
        self.ingest = Some(ingest);
        self.scanned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let dir = crate::safefs::shown(&self.config.deps_dir);
        tracing::info!(dir = %dir, "watching for dependency file changes");
        crate::sdnotify::ready(&format!("watching {dir}"));
        crate::sdnotify::spawn_watchdog(self.stages.clone());
        Ok(())
    }

    /// The stages that run until shutdown: file events, drift (and self-heal), retention.
    fn serve(&mut self) {
        if let (Some(ingest), Some(root_watch), Some(event_rx)) = (
            self.ingest.take(),
            self.root_watch.take(),
            self.event_rx.take(),
        ) {
            self.set.spawn(ingest::run(
                IngestConfig {
                    quiet: self.config.quiet,
                    max_wait: self.config.max_wait,
                    resync: self.config.resync,
                },
                ingest,
                root_watch,
                self.barriers.take().unwrap_or_else(watch::Barriers::none),
                event_rx,
                self.overflow.clone(),
                self.stages.clone(),
            ));
        }
        // Drift hands services back to the scheduler: with --self-heal after drift, and
        // always for a workload recreated after it went missing.
        let (resubmit, mut rx) = mpsc::channel::<(crate::domain::ServiceKey, Trigger)>(1024);
        let scheduler = self.scheduler.clone();
        self.set.spawn(async move {
            while let Some((key, trigger)) = rx.recv().await {
                if let Some(mut desired) = scheduler.wanted(&key) {
                    desired.trigger = trigger;
                    desired.actor = "depwatch".into();
                    scheduler.submit(key, desired).await;
                }
            }
        });
        self.set.spawn(crate::pipeline::deploy::drift::run(
            self.deployer.clone(),
            self.recorder.clone(),
            resubmit,
            self.config.self_heal,
            self.stages.clone(),
        ));
        let retention = self.store.clone();
        let (keep, max_age, every) = (
            self.config.history_keep,
            self.config.history_max_age,
            self.config.resync,
        );
        let stop = self.stages.clone();
        self.set.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = retention.prune(keep, max_age).await {
                            tracing::warn!(error = %e, "history retention failed");
                        }
                    }
                }
            }
        });
    }

    /// Stop the stages, wait for in-flight deploys (within the grace; at once when the Lease
    /// is lost, since they were cancelled), then give queued notifications a moment.
    async fn drain(mut self) {
        let lost = self.fence.lost().is_cancelled();
        if lost {
            tracing::warn!("the Lease is lost: in-flight deploys were stopped at once; the new leader finishes them");
        } else {
            tracing::info!("shutting down: no new work is taken; waiting for in-flight deploys");
        }
        crate::sdnotify::stopping("waiting for in-flight deploys");
        self.stages.cancel();
        while self.set.join_next().await.is_some() {}
        self.tracker.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                grace = %humantime::format_duration(self.config.shutdown_grace),
                "in-flight deploys did not finish in time; they stay in progress in the record and are finished at the next start"
            );
        }
        if let Some(leadership) = self.leadership.take() {
            leadership.step_down().await;
        }
        let Running {
            recorder,
            engine,
            senders,
            deployer,
            store,
            ..
        } = self;
        let notifier = recorder.notifier.clone();
        deployer.watches().stop().await;
        drop((recorder, engine, deployer));
        notifier.close(senders, NOTIFY_GRACE).await;
        // The record's last writes, in order (a last try when it is away).
        store.close().await;
    }
}

/// How long queued notifications may take to go out at exit.
const NOTIFY_GRACE: Duration = Duration::from_secs(5);
