//! Command-line arguments. Every flag can also be set from an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Where the record is unless `--state-dir` says otherwise.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/depwatch/state";
#[derive(Debug, Parser)]
#[command(
    name = "depwatch",
    version,
    about = "Turns a directory of dependency files into healthy Kubernetes deployments"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,

    /// Log format: human-readable text, or one JSON object per line for log collectors.
    #[arg(long, env = "DEPWATCH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the dependency directory and deploy every change.
    Run(Box<RunArgs>),
    /// Validate dependency files; exits non-zero and lists every problem if any file is bad.
    Check(CheckArgs),
    /// Show each managed service: status, desired images, pinned version, suspended, reason.
    Status(StatusArgs),
    /// Show a service's deploy history, newest first.
    History(HistoryArgs),
    /// Deploy a version that failed again (lifts the pin on it).
    Retry(ServiceArgs),
    /// Undo: write the previous healthy deploy's images (or deploy --to's) into the service's
    /// file, changing only the containers that differ.
    Rollback(RollbackArgs),
    /// Cut a verifying version's bake short: it becomes last good without the time left.
    Promote(ServiceArgs),
    /// Break-glass: deploy the save a deploy window or a FREEZE holds, now
    /// (`deploy NS/NAME --now --reason "…"`), recorded with who and why.
    Deploy(DeployNowArgs),
    /// Approve the save awaiting approval (not your own): it deploys once enough distinct
    /// approvers have. Locally, the approver is the Unix user; with --api, the token's name.
    Approve(VoteArgs),
    /// Reject the save awaiting approval: nothing of it deploys (a newer save asks again).
    Reject(VoteArgs),
    /// Stop deploying a service's file changes until it is resumed.
    Suspend(ServiceArgs),
    /// Deploy a suspended service's file changes again.
    Resume(ServiceArgs),
    /// Remove a service whose dependency file is gone from the record (its history stays).
    Forget(ServiceArgs),
    /// The daemon on an embedded simulated cluster with example files: see it work with no
    /// cluster at all.
    Demo(DemoArgs),
    /// Serve a simulated Kubernetes API server on loopback, for tests and demos.
    #[command(after_long_help = SIM_RULES)]
    Sim(SimArgs),
    /// Print a shell completion script: `source <(depwatch completions bash)`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff): `depwatch man | man -l -`.
    Man,
}

#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// The manual page (roff): the command, then each subcommand with its synopsis and options.
pub fn man_page() -> std::io::Result<Vec<u8>> {
    let mut cmd = <Args as clap::CommandFactory>::command();
    cmd.build();
    let mut main = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut main)?;
    // clap_mangen names each subcommand as a page of its own (depwatch-run(1)); here they are
    // sections of this one page.
    let mut out = Vec::new();
    for line in String::from_utf8_lossy(&main).lines() {
        let sub = line
            .strip_prefix("depwatch\\-")
            .and_then(|rest| rest.strip_suffix("(1)"));
        let line = match sub {
            Some(name) => format!(
                "\\fBdepwatch {name}\\fR (section DEPWATCH {} below)",
                name.to_uppercase()
            ),
            None => line.to_string(),
        };
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let man = clap_mangen::Man::new(sub.clone());
        let mut part = Vec::new();
        man.render_synopsis_section(&mut part)?;
        man.render_description_section(&mut part)?;
        man.render_options_section(&mut part)?;
        let text = String::from_utf8_lossy(&part);
        // One section per subcommand; its own sections become subsections.
        out.extend_from_slice(
            format!(".SH \"DEPWATCH {}\"\n", sub.get_name().to_uppercase()).as_bytes(),
        );
        for line in text.lines() {
            let line = match line.strip_prefix(".SH ") {
                Some("SYNOPSIS") => continue,
                Some(heading) => format!(".SS {heading}"),
                None => line.to_string(),
            };
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
    }
    out.extend_from_slice(environment_section(&cmd).as_bytes());
    Ok(out)
}

/// Every environment variable a flag reads, with the flag and the commands that take it.
fn environment_section(cmd: &clap::Command) -> String {
    let mut vars: std::collections::BTreeMap<String, (String, Vec<String>)> = Default::default();
    for sub in std::iter::once(cmd).chain(cmd.get_subcommands().filter(|s| !s.is_hide_set())) {
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() || sub.get_name() == cmd.get_name())
        {
            let (Some(env), Some(long)) = (arg.get_env().and_then(|e| e.to_str()), arg.get_long())
            else {
                continue;
            };
            let entry = vars
                .entry(env.to_string())
                .or_insert_with(|| (format!("--{long}"), Vec::new()));
            entry.1.push(if sub.get_name() == cmd.get_name() {
                "every command".to_string()
            } else {
                sub.get_name().to_string()
            });
        }
    }
    let mut out = String::from(".SH ENVIRONMENT\nEach variable sets the flag named beside it; the flag on the command line wins. A .env file in the working directory is read too.\n");
    for (var, (flag, commands)) in vars {
        out.push_str(&format!(
            ".TP\n\\fB{var}\\fR\nas \\fB{}\\fR ({})\n",
            flag.replace('-', "\\-"),
            commands.join(", ")
        ));
    }
    out.push_str(".TP\n\\fBNO_COLOR\\fR\nno colour in logs, even on a terminal\n.TP\n\\fBRUST_LOG\\fR\nlog filter, e.g. \\fBinfo,depwatch=debug\\fR; the AWS SDK's, hyper's, h2's and rustls's events stay at info whatever it says\n.TP\n\\fBDEPWATCH_LOG_AWS_WIRE\\fR\n1 lets those through (they carry tokens: for debugging the SDK only)\n");
    out
}

/// A listen address: `host:port`, `[v6]:port`, `localhost:port`, or `:port` for every interface
/// (as Go servers and kubectl write it).
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let expected = "expected host:port, e.g. 127.0.0.1:8080, localhost:8080 or :8080";
    if let Some(port) = s.strip_prefix(':') {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port; {expected}"))?;
        return Ok(SocketAddr::from(([0, 0, 0, 0], port)));
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("{s:?} has no valid port; {expected}"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not an address; {expected}"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("{s:?} must be longer than zero"));
    }
    Ok(d)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); expected e.g. 100ms, 30s, 5m"))
}

fn parse_prometheus_url(s: &str) -> Result<reqwest::Url, String> {
    let mut u = reqwest::Url::parse(s)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
        .ok_or_else(|| {
            format!("{s:?} is not an http:// or https:// URL; expected e.g. http://prometheus:9090")
        })?;
    // A base without a trailing slash would lose its last segment when joined.
    if !u.path().ends_with('/') {
        let path = format!("{}/", u.path());
        u.set_path(&path);
    }
    Ok(u)
}

fn parse_nats_url(s: &str) -> Result<String, String> {
    crate::alert::nats::servers(s).map(|_| s.to_string())
}

fn parse_lease_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err(format!(
            "{s:?} is too short for a Lease; expected at least 2s"
        ));
    }
    Ok(d)
}

/// A Secret's name: a DNS subdomain (lowercase letters, digits, `-` and `.`, at most 253).
fn parse_secret_name(s: &str) -> Result<String, String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    match s.len() <= 253 && s.split('.').all(label_ok) {
        true => Ok(s.to_string()),
        false => Err(format!(
            "{s:?} is not a Secret name; expected lowercase letters, digits, '-' and '.', e.g. ecr-pull"
        )),
    }
}

fn parse_glob(s: &str) -> Result<crate::bounds::Glob, String> {
    crate::bounds::Glob::new(s)
}

/// A size in bytes: `65536`, `64KiB`, `1MiB` (also `KB`/`MB`/`k`/`m`, all powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size; expected e.g. 65536, 64KiB, 1MiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => {
            return Err(format!(
                "{s:?} has an unknown unit; expected e.g. 65536, 64KiB, 1MiB"
            ))
        }
    };
    match n.checked_mul(scale) {
        Some(v) if v > 0 && v <= 16 * 1024 * 1024 => Ok(v),
        _ => Err(format!("{s:?} must be between 1 byte and 16MiB")),
    }
}

/// On or off, spelt as a flag (`on`/`off`) or as YAML (`true`/`false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    #[value(alias = "true", alias = "yes")]
    On,
    #[value(alias = "false", alias = "no")]
    Off,
}

/// Options shared by the daemon and the demo.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Directory of dependency files (`<deployment>_<namespace>.dep`). Seed name: DEPS.
    #[arg(
        long,
        env = "DEPWATCH_DEPS",
        default_value = "/var/lib/depwatch/deps",
        help_heading = "Files"
    )]
    pub deps: PathBuf,

    /// Directory for the state database.
    #[arg(
        long,
        env = "DEPWATCH_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        help_heading = "Files"
    )]
    pub state_dir: PathBuf,

    /// A PostgreSQL record shared by replicas (`postgres://user:password@host/db`) instead of
    /// SQLite in the state directory. Never logged.
    #[arg(long, env = "DEPWATCH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Quiet window for writers that give no completion signal, and for coalescing bursts.
    #[arg(long, env = "DEPWATCH_DEBOUNCE", default_value = "100ms", value_parser = parse_duration, help_heading = "Files")]
    pub debounce: Duration,

    /// Longest wait for a file still being written before it is read anyway.
    #[arg(long, env = "DEPWATCH_MAX_WAIT", default_value = "10s", value_parser = parse_duration, help_heading = "Files")]
    pub max_wait: Duration,

    /// How often the whole directory is compared with the record.
    #[arg(long, env = "DEPWATCH_RESYNC", default_value = "5m", value_parser = parse_positive_duration, help_heading = "Files")]
    pub resync: Duration,

    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long, env = "DEPWATCH_KUBECONFIG", help_heading = "Kubernetes")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use.
    #[arg(long, env = "DEPWATCH_CONTEXT", help_heading = "Kubernetes")]
    pub context: Option<String>,

    /// Accepted for old unit files, with any value or none: depwatch never creates namespaces,
    /// so it is ignored and never the subject of an error.
    #[arg(long, env = "DEPWATCH_NO_CREATE_NAMESPACE", hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub no_create_namespace: Option<String>,

    /// Run as one of several replicas: only the holder of a Kubernetes Lease deploys and
    /// writes; the others serve the read API and take over when the holder goes. Needs a shared
    /// record (--database-url).
    #[arg(
        long,
        env = "DEPWATCH_LEADER_ELECT",
        help_heading = "High availability"
    )]
    pub leader_elect: bool,

    /// The Lease's name.
    #[arg(
        long,
        env = "DEPWATCH_LEASE_NAME",
        default_value = "depwatch",
        help_heading = "High availability"
    )]
    pub lease_name: String,

    /// The Lease's namespace (default: the pod's own namespace in a cluster, else `default`).
    #[arg(
        long,
        env = "DEPWATCH_LEASE_NAMESPACE",
        help_heading = "High availability"
    )]
    pub lease_namespace: Option<String>,

    /// How long a Lease lasts without renewal: the longest a standby waits after the leader dies.
    #[arg(long, env = "DEPWATCH_LEASE_DURATION", default_value = "15s", value_parser = parse_lease_duration, help_heading = "High availability")]
    pub lease_duration: Duration,

    #[command(flatten)]
    pub bounds: FileBounds,

    /// Repository for versions and digests (default: the repository the container runs).
    /// Seed name: ECR_REPO.
    #[arg(long, env = "DEPWATCH_IMAGE_REPO", help_heading = "Kubernetes")]
    pub image_repo: Option<String>,

    /// How many services may talk to the API server at once.
    #[arg(long, env = "DEPWATCH_WORKERS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000), help_heading = "Deploys")]
    pub workers: u32,

    /// Bound of the queue of services waiting for a worker.
    #[arg(long, env = "DEPWATCH_QUEUE_CAPACITY", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Deploys")]
    pub queue_capacity: u32,

    /// How long a rollout may take before it counts as failed.
    #[arg(long, env = "DEPWATCH_ROLLOUT_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration, help_heading = "Deploys")]
    pub rollout_timeout: Duration,

    /// Roll back to the previous images when a rollout fails or times out.
    #[arg(long, env = "DEPWATCH_ROLLBACK", value_enum, default_value_t = Toggle::On, help_heading = "Deploys")]
    pub rollback: Toggle,

    /// How long ErrImagePull may persist before the rollout counts as failed.
    #[arg(long, env = "DEPWATCH_PULL_GRACE", default_value = "3s", value_parser = parse_duration, help_heading = "Deploys")]
    pub pull_grace: Duration,

    /// Restarts in CrashLoopBackOff that make a rollout fail.
    #[arg(
        long,
        env = "DEPWATCH_CRASH_RESTARTS",
        default_value_t = 2,
        help_heading = "Deploys"
    )]
    pub crash_restarts: i32,

    /// How long shutdown waits for in-flight deploys.
    #[arg(long, env = "DEPWATCH_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_positive_duration, help_heading = "Deploys")]
    pub shutdown_grace: Duration,

    /// Restore the desired images when they are changed behind depwatch's back (drift is
    /// always recorded and reported).
    #[arg(long, env = "DEPWATCH_SELF_HEAL", help_heading = "Deploys")]
    pub self_heal: bool,

    /// Patch workloads that Argo CD, Flux or Helm manage anyway (their next sync reverts the
    /// image; a warning is logged for each deploy). Default: such files fail, naming the owner.
    #[arg(long, env = "DEPWATCH_ALLOW_OWNED", help_heading = "Deploys")]
    pub allow_owned: bool,

    /// Before each PATCH, ask the registry whether every changed image exists: `on` refuses
    /// a missing tag (nothing patched, not pinned), `warn` only warns, `off` never asks. A
    /// registry that does not answer within --registry-wait never holds a deploy: it goes on
    /// with a warning.
    #[arg(
        long,
        env = "DEPWATCH_REGISTRY_CHECK",
        value_enum,
        default_value = "on",
        help_heading = "Registries"
    )]
    pub registry_check: crate::registry::Mode,

    /// How long a registry that does not answer (unreachable, 5xx, 429) may hold a deploy.
    #[arg(long, env = "DEPWATCH_REGISTRY_WAIT", default_value = "10s", value_parser = parse_positive_duration, help_heading = "Registries")]
    pub registry_wait: Duration,

    /// depwatch's own registry credentials, a docker config.json (after the workload's
    /// imagePullSecrets and its ServiceAccount's).
    #[arg(
        long,
        env = "DEPWATCH_REGISTRY_CREDENTIALS",
        value_name = "FILE",
        help_heading = "Registries"
    )]
    pub registry_credentials: Option<PathBuf>,

    /// Keep a `kubernetes.io/dockerconfigjson` Secret of this name, for the ECR registry of
    /// depwatch's AWS identity (GetAuthorizationToken through the AWS SDK's default credential
    /// chain), in every namespace depwatch deploys its images to; refreshed at half of each
    /// token's lifetime and at once when deleted. The pre-flight uses the same token. Needs
    /// the RBAC of deploy/kubernetes/components/ecr.
    #[arg(
        long,
        env = "DEPWATCH_ECR_PULL_SECRET",
        value_name = "NAME",
        value_parser = parse_secret_name,
        help_heading = "Registries"
    )]
    pub ecr_pull_secret: Option<String>,

    /// Deploys kept in the history per service.
    #[arg(
        long,
        env = "DEPWATCH_HISTORY_KEEP",
        default_value_t = 200,
        help_heading = "Files"
    )]
    pub history_keep: usize,

    /// Deploys older than this are removed from the history (e.g. 90d); kept forever if unset.
    #[arg(long, env = "DEPWATCH_HISTORY_MAX_AGE", value_parser = parse_duration, help_heading = "Files")]
    pub history_max_age: Option<Duration>,

    /// Address of the status page, JSON API and metrics.
    #[arg(
        long,
        env = "DEPWATCH_HTTP_ADDR",
        default_value = "127.0.0.1:8080",
        value_parser = parse_addr,
        help_heading = "HTTP"
    )]
    pub http_addr: std::net::SocketAddr,

    /// Do not serve the status page, API and metrics.
    #[arg(long, env = "DEPWATCH_NO_HTTP", help_heading = "HTTP")]
    pub no_http: bool,

    /// File of `name:token` lines: the bearer tokens allowed to make changes through the API
    /// (without it the API is read-only).
    #[arg(long, env = "DEPWATCH_API_TOKEN_FILE", help_heading = "HTTP")]
    pub api_token_file: Option<PathBuf>,

    /// Open HTTP connections served at once; more are closed at accept. Idle and slow clients
    /// are cut off after 10s without complete headers.
    #[arg(long, env = "DEPWATCH_HTTP_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=65_536), help_heading = "HTTP")]
    pub http_max_connections: u32,

    /// Host names the HTTP server answers to besides IP addresses and `localhost` (a Service
    /// name, an ingress host), comma-separated; any other `Host` gets 421, so a page on another
    /// origin cannot read the API through DNS rebinding.
    #[arg(
        long,
        env = "DEPWATCH_HTTP_ALLOWED_HOSTS",
        value_delimiter = ',',
        help_heading = "HTTP"
    )]
    pub http_allowed_hosts: Vec<String>,

    /// Slack incoming-webhook URL for deploy outcomes. Seed name: WEBHOOK_FOR_SLACK.
    #[arg(
        long,
        env = "DEPWATCH_SLACK_WEBHOOK",
        hide_env_values = true,
        help_heading = "Notifications"
    )]
    pub slack_webhook: Option<String>,

    /// Microsoft Teams Workflows webhook URL ("Post to a channel when a webhook request is
    /// received"): each deploy outcome as an Adaptive Card.
    #[arg(
        long,
        env = "DEPWATCH_TEAMS_WEBHOOK",
        hide_env_values = true,
        help_heading = "Notifications"
    )]
    pub teams_webhook: Option<String>,

    /// Google Chat incoming-webhook URL: each deploy outcome as a card.
    #[arg(
        long,
        env = "DEPWATCH_GOOGLE_CHAT_WEBHOOK",
        hide_env_values = true,
        help_heading = "Notifications"
    )]
    pub google_chat_webhook: Option<String>,

    /// Discord webhook URL: each deploy outcome as an embed.
    #[arg(
        long,
        env = "DEPWATCH_DISCORD_WEBHOOK",
        hide_env_values = true,
        help_heading = "Notifications"
    )]
    pub discord_webhook: Option<String>,

    /// A URL that receives every deploy outcome as a JSON document (POST).
    #[arg(
        long,
        env = "DEPWATCH_WEBHOOK_URL",
        hide_env_values = true,
        help_heading = "Notifications"
    )]
    pub webhook_url: Option<String>,

    /// NATS server URL(s), comma-separated (`nats://host:4222`): every deploy outcome (the
    /// webhook's JSON document) is published on `depwatch.deploys.<namespace>.<name>`, through
    /// JetStream when a stream captures the subject.
    #[arg(long, env = "DEPWATCH_NATS_URL", hide_env_values = true, value_parser = parse_nats_url, help_heading = "Notifications")]
    pub nats_url: Option<String>,

    /// Prometheus to ask for the `prometheus` checks of a file's `verify:` block
    /// (`http://prometheus:9090`; its `/api/v1/query` is used).
    #[arg(long, env = "DEPWATCH_PROMETHEUS_URL", value_parser = parse_prometheus_url, help_heading = "Verification")]
    pub prometheus_url: Option<reqwest::Url>,
}

impl DaemonArgs {
    pub fn to_config(&self) -> crate::daemon::DaemonConfig {
        crate::daemon::DaemonConfig {
            deps_dir: self.deps.clone(),
            state_dir: self.state_dir.clone(),
            database_url: self.database_url.clone(),
            kubeconfig: self.kubeconfig.clone(),
            context: self.context.clone(),
            workers: self.workers as usize,
            queue_capacity: self.queue_capacity as usize,
            quiet: self.debounce,
            max_wait: self.max_wait,
            resync: self.resync,
            rollout_timeout: self.rollout_timeout,
            bounds: self.bounds.bounds(),
            max_file_size: self.bounds.max_file_size,
            leader: self.leader_elect.then(|| crate::leader::LeaderConfig {
                lease_name: self.lease_name.clone(),
                lease_namespace: self.lease_namespace.clone(),
                lease_duration: self.lease_duration,
            }),
            image_repo: self.image_repo.clone(),
            rollback: self.rollback == Toggle::On,
            slack_webhook: self.slack_webhook.clone(),
            webhook_url: self.webhook_url.clone(),
            teams_webhook: self.teams_webhook.clone(),
            google_chat_webhook: self.google_chat_webhook.clone(),
            discord_webhook: self.discord_webhook.clone(),
            nats_url: self.nats_url.clone(),
            prometheus_url: self.prometheus_url.clone(),
            fail_fast: crate::pipeline::deploy::rollout::FailFast {
                pull_grace: self.pull_grace,
                crash_restarts: self.crash_restarts,
            },
            shutdown_grace: self.shutdown_grace,
            history_keep: self.history_keep,
            history_max_age: self.history_max_age,
            self_heal: self.self_heal,
            allow_owned: self.allow_owned,
            registry_check: self.registry_check,
            registry_wait: self.registry_wait,
            registry_credentials: self.registry_credentials.clone(),
            ecr_pull_secret: self.ecr_pull_secret.clone(),
            http_addr: (!self.no_http).then_some(self.http_addr),
            api_token_file: self.api_token_file.clone(),
            http_max_connections: self.http_max_connections as usize,
            http_allowed_hosts: self
                .http_allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Directory to check (default: --deps / DEPWATCH_DEPS / DEPS).
    pub dir: Option<PathBuf>,
    #[arg(long, env = "DEPWATCH_DEPS", hide = true)]
    pub deps: Option<PathBuf>,
    /// Also check this kubeconfig file parses and names a usable context.
    #[arg(long, env = "DEPWATCH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Also check this API token file (`name:token` lines).
    #[arg(long, env = "DEPWATCH_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// The same bounds as `run`, from the same flags and environment.
    #[command(flatten)]
    pub bounds: FileBounds,
}

impl CheckArgs {
    /// The daemon's file rules, from the same flags and environment as `run`.
    pub fn rules(&self) -> crate::check::Rules {
        crate::check::Rules {
            bounds: self.bounds.bounds(),
            max_file_size: self.bounds.max_file_size,
        }
    }
}

/// What files may deploy at all: the same flags and environment for `run` and `check`, so
/// `check` refuses what `run` would.
#[derive(Debug, Clone, clap::Args)]
pub struct FileBounds {
    /// Namespaces depwatch may deploy to: names and globs, comma-separated (e.g.
    /// `prod,team-*`). Files and API requests for any other namespace are refused. Default: any.
    #[arg(long, env = "DEPWATCH_NAMESPACES", value_delimiter = ',', value_parser = parse_glob, help_heading = "Bounds")]
    pub namespaces: Vec<crate::bounds::Glob>,

    /// Image repositories depwatch may deploy: globs, comma-separated (e.g.
    /// `registry.example.com/team/*`). Checked on the final image, after a plain version is
    /// given its repository. Default: any.
    #[arg(long, env = "DEPWATCH_ALLOWED_IMAGES", value_delimiter = ',', value_parser = parse_glob, help_heading = "Bounds")]
    pub allowed_images: Vec<crate::bounds::Glob>,

    /// Largest dependency file read; larger files are refused unread.
    #[arg(long, env = "DEPWATCH_MAX_FILE_SIZE", default_value = "64KiB", value_parser = parse_size, help_heading = "Bounds")]
    pub max_file_size: u64,
}

impl FileBounds {
    /// `--namespaces` and `--allowed-images`.
    pub fn bounds(&self) -> crate::bounds::Bounds {
        crate::bounds::Bounds::from_globs(self.namespaces.clone(), self.allowed_images.clone())
    }
}

/// Where an operator command finds the record: the local database, or a running daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Directory of the state database.
    #[arg(
        long,
        env = "DEPWATCH_STATE_DIR",
        default_value = DEFAULT_STATE_DIR,
        help_heading = "Where"
    )]
    pub state_dir: PathBuf,

    /// A PostgreSQL record shared by replicas (`postgres://user:password@host/db`) instead of
    /// SQLite in the state directory. Never logged.
    #[arg(
        long,
        env = "DEPWATCH_DATABASE_URL",
        hide_env_values = true,
        help_heading = "Where"
    )]
    pub database_url: Option<String>,

    /// Ask a running daemon's API (e.g. http://127.0.0.1:8080 or :8080) instead of the
    /// database.
    #[arg(long, env = "DEPWATCH_API", help_heading = "Where")]
    pub api: Option<String>,

    /// File holding the bearer token for --api (the token alone, or one `name:token` line);
    /// needed for changes, not for reads.
    #[arg(long, env = "DEPWATCH_TOKEN_FILE", help_heading = "Where")]
    pub token_file: Option<PathBuf>,
}

/// How a listing is printed, as kubectl does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Output {
    /// A table of the main columns.
    #[default]
    Table,
    /// A table with every column, the next step included.
    Wide,
    Json,
    Yaml,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
    /// Only the services of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as `-o json`.
    #[arg(long, hide = true)]
    pub json: bool,
}

/// A service named as NAMESPACE/DEPLOYMENT, or DEPLOYMENT with `-n NAMESPACE`.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// The service: NAMESPACE/DEPLOYMENT (e.g. prod/payments), or DEPLOYMENT with -n.
    pub service: String,
    /// The service's namespace, when SERVICE is only the Deployment's name.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub target: Target,
}

impl ServiceArgs {
    /// The service key, from `ns/name` or `name` with `-n`.
    pub fn key(&self) -> Result<crate::domain::ServiceKey, String> {
        match (self.service.split_once('/'), &self.namespace) {
            (Some(_), None) => crate::domain::ServiceKey::parse_slash(&self.service),
            (Some((ns, name)), Some(n)) if ns == n => crate::domain::ServiceKey::new(name, ns),
            (Some((ns, _)), Some(n)) => Err(format!(
                "{:?} names namespace {ns:?} but -n says {n:?}; give one",
                self.service
            )),
            (None, Some(n)) => crate::domain::ServiceKey::new(&self.service, n),
            (None, None) => Err(format!(
                "{:?}: which namespace? Write NAMESPACE/DEPLOYMENT (e.g. prod/{}) or add -n NAMESPACE",
                self.service, self.service
            )),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// How many deploys to show, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as `-o json`.
    #[arg(long, hide = true)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct VoteArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Why, recorded with the word.
    #[arg(long, default_value = "")]
    pub comment: String,
}

#[derive(Debug, clap::Args)]
pub struct DeployNowArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Deploy now, past a deploy window or a freeze (required: a save otherwise deploys by
    /// writing its file).
    #[arg(long, required = true)]
    pub now: bool,
    /// Why, recorded with who asked.
    #[arg(long, required = true)]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    /// Restore the images of this deploy (an ID from `depwatch history`) instead of the
    /// previous healthy deploy's.
    #[arg(long, value_name = "DEPLOY_ID")]
    pub to: Option<i64>,
}

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Exit once every example service has an outcome, printing a summary (for scripts).
    #[arg(long)]
    pub once: bool,
    /// How long the example that hangs may take before it counts as timed out.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub rollout_timeout: Duration,
    /// Address of the demo's status page (port 0 picks a free port).
    #[arg(long, env = "DEPWATCH_HTTP_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_addr)]
    pub http_addr: std::net::SocketAddr,
}

/// What simulated pods do, by their image (the first matching rule wins).
const SIM_RULES: &str = "\
Image rules (a substring of the image; a --scenario file replaces the first four):
  fail-pull      ErrImagePull, then ImagePullBackOff
  crash          starts, exits, CrashLoopBackOff
  hang           running, never ready
  config-error   CreateContainerConfigError
  otherwise      ready after --ready-delay

What a ready pod serves, by its main image's tag, through the service proxy
(/api/v1/namespaces/NS/services/WORKLOAD[:PORT]/proxy/PATH; every workload has a
Service of its own name, the port is ignored, one ready pod answers, 503 when none is):
  /healthz       200 ok; 500 when the tag contains `unhealthy`
  /version       {\"version\": \"<tag>\"}
  /metrics       the pod's request counters
Every pod's counters are one Prometheus scrape target at /sim/metrics:
  sim_http_requests_total{namespace, workload, pod, version, code} grows by 10 a second
  from the pod's start; a tag with `errors-N` makes N% of them code 500.";

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "DEPWATCH_SIM_ADDR", default_value = "127.0.0.1:0", value_parser = parse_addr)]
    pub addr: SocketAddr,

    /// Write a kubeconfig for the simulated cluster here.
    #[arg(long, env = "DEPWATCH_SIM_KUBECONFIG_OUT")]
    pub kubeconfig_out: Option<PathBuf>,

    /// How long a healthy pod takes to become ready.
    #[arg(long, env = "DEPWATCH_SIM_READY_DELAY", default_value = "300ms", value_parser = humantime::parse_duration)]
    pub ready_delay: Duration,

    /// A YAML scenario file whose rules replace the default image rules.
    #[arg(long, env = "DEPWATCH_SIM_SCENARIO")]
    pub scenario: Option<PathBuf>,

    /// Added latency per request, in milliseconds.
    #[arg(long, env = "DEPWATCH_SIM_LATENCY", default_value_t = 0)]
    pub latency: u64,

    /// Fraction of requests (0.0 to 1.0) answered with HTTP 500.
    #[arg(long, env = "DEPWATCH_SIM_ERROR_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub error_rate: f64,

    /// Fraction of writes (0.0 to 1.0) answered with HTTP 409 Conflict.
    #[arg(long, env = "DEPWATCH_SIM_CONFLICT_RATE", default_value_t = 0.0, value_parser = parse_fraction)]
    pub conflict_rate: f64,

    /// End every watch after this many seconds.
    #[arg(long, env = "DEPWATCH_SIM_WATCH_TIMEOUT")]
    pub watch_timeout: Option<u64>,

    /// Append one JSON line per request to this file.
    #[arg(long, env = "DEPWATCH_SIM_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Load the cluster state from this file at start and save it at exit, so a restarted sim
    /// (same --addr) has the same objects.
    #[arg(long, env = "DEPWATCH_SIM_STATE_FILE")]
    pub state_file: Option<PathBuf>,

    /// How many simulated nodes (node-0, node-1, …) the cluster has; DaemonSets run a pod on
    /// each.
    #[arg(long, env = "DEPWATCH_SIM_NODES", default_value_t = 3)]
    pub nodes: usize,

    /// Pull images of registries on loopback for real: a manifest HEAD with the pod's pull
    /// secrets, a 404 or a refusal becoming ErrImagePull then ImagePullBackOff with the
    /// registry's answer. Other images follow the image rules.
    #[arg(long, env = "DEPWATCH_SIM_REGISTRIES")]
    pub registries: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number; expected a fraction such as 0.2"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is out of range; expected a fraction from 0.0 to 1.0"
        ))
    }
}

impl SimArgs {
    pub fn to_config(&self) -> crate::sim::SimConfig {
        crate::sim::SimConfig {
            addr: self.addr,
            ready_delay: self.ready_delay,
            scenario: self.scenario.clone(),
            latency: Duration::from_millis(self.latency),
            error_rate: self.error_rate,
            conflict_rate: self.conflict_rate,
            watch_timeout: self.watch_timeout.map(Duration::from_secs),
            audit_log: self.audit_log.clone(),
            state_file: self.state_file.clone(),
            nodes: self.nodes,
            registries: self.registries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Args::command().debug_assert();
    }

    #[test]
    fn zero_intervals_are_refused() {
        let err = Args::try_parse_from(["depwatch", "run", "--resync", "0s"]).expect_err("zero");
        assert!(err.to_string().contains("longer than zero"), "{err}");
    }

    #[test]
    fn addresses_are_written_as_servers_write_them() {
        assert_eq!(
            parse_addr(":8080"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 8080)))
        );
        assert_eq!(
            parse_addr("localhost:9000"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 9000)))
        );
        assert_eq!(
            parse_addr("127.0.0.1:0"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 0)))
        );
        assert!(parse_addr("[::1]:80").is_ok());
        for bad in [":", ":http", "8080", "localhost", "host:99999"] {
            let e = parse_addr(bad).expect_err(bad);
            assert!(e.contains("expected host:port"), "{e}");
        }
    }

    #[test]
    fn rollback_toggle_takes_yaml_words_too() {
        for (word, on) in [
            ("on", true),
            ("true", true),
            ("off", false),
            ("false", false),
        ] {
            let a = Args::try_parse_from(["depwatch", "run", "--rollback", word]).expect(word);
            let Command::Run(run) = a.command else {
                panic!("run")
            };
            assert_eq!(run.daemon.rollback == Toggle::On, on, "{word}");
        }
        assert!(Args::try_parse_from(["depwatch", "run", "--rollback", "maybe"]).is_err());
    }

    #[test]
    fn a_service_is_named_with_a_slash_or_with_n() {
        let key = |argv: &[&str]| {
            let a = Args::try_parse_from(argv).expect("parse");
            let Command::Retry(s) = a.command else {
                panic!("retry")
            };
            s.key()
        };
        let want = crate::domain::ServiceKey::new("web", "prod").expect("key");
        assert_eq!(key(&["depwatch", "retry", "prod/web"]), Ok(want.clone()));
        assert_eq!(
            key(&["depwatch", "retry", "web", "-n", "prod"]),
            Ok(want.clone())
        );
        assert_eq!(
            key(&["depwatch", "retry", "prod/web", "-n", "prod"]),
            Ok(want)
        );
        assert!(key(&["depwatch", "retry", "prod/web", "-n", "dev"])
            .expect_err("two namespaces")
            .contains("-n says"));
        assert!(key(&["depwatch", "retry", "web"])
            .expect_err("no namespace")
            .contains("-n NAMESPACE"));
    }

    #[test]
    fn fractions_are_checked() {
        assert_eq!(parse_fraction("0.2"), Ok(0.2));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("lots").is_err());
    }
}
