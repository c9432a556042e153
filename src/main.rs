//! The depwatch binary: parse the command line, set up logging, run, map errors to exit codes.

use anyhow::Context;
use clap::Parser;
use depwatch::cli::{Args, Command, LogFormat};

fn init_logging(format: LogFormat) {
    // kube's client logs every failed request itself; depwatch logs each failure once, with the
    // server and what it was doing.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client::client=off"));
    // Colour only for a person at a terminal: never into the journal, a file or a pipe.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Print a line for the person or program that started us; a closed stdout is not an error
/// worth stopping a server for.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Accept the seed's environment names as aliases of ours.
fn seed_env_aliases() {
    for (ours, seed) in [
        ("DEPWATCH_DEPS", "DEPS"),
        ("DEPWATCH_IMAGE_REPO", "ECR_REPO"),
        ("DEPWATCH_SLACK_WEBHOOK", "WEBHOOK_FOR_SLACK"),
    ] {
        if std::env::var_os(ours).is_none() {
            if let Some(v) = std::env::var_os(seed) {
                std::env::set_var(ours, v);
            }
        }
    }
}

/// GET a JSON document from a running daemon's API.
async fn api_get<T: serde::de::DeserializeOwned>(base: &str, path: &str) -> anyhow::Result<T> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let resp = reqwest::get(&url)
        .await
        .with_context(|| format!("cannot reach the depwatch API at {base}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        anyhow::bail!("the depwatch API answered {status} for {path}: {body}");
    }
    resp.json()
        .await
        .with_context(|| format!("the depwatch API sent unexpected JSON for {path}"))
}

fn service_key(s: &str) -> anyhow::Result<depwatch::depfile::ServiceKey> {
    depwatch::depfile::ServiceKey::parse_slash(s).map_err(anyhow::Error::msg)
}

/// A cancellation token fired by SIGINT or SIGTERM: the one owner of signal handling.
fn shutdown_token() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        t.cancel();
        // The first signal drains gracefully; a second one means "now".
        shutdown_signal().await;
        tracing::warn!("a second signal: exiting now; deploys in flight stay in progress in the record and are judged again at the next start");
        std::process::exit(130);
    });
    token
}

fn print_table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows.first().map(Vec::len).unwrap_or(0))
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        say(line.join("  ").trim_end());
    }
}

/// The record the operator commands use: PostgreSQL when `--database-url` is given, else SQLite
/// in the state directory.
fn open_store(
    state_dir: &std::path::Path,
    database_url: Option<&str>,
) -> Result<depwatch::store::Store, depwatch::store::StoreError> {
    depwatch::store::Store::open_or_connect(state_dir, database_url)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A .env file beside the daemon is read when present; the real environment wins.
    let _ = dotenvy::dotenv();
    seed_env_aliases();
    let args = Args::parse();
    init_logging(args.log_format);
    match args.command {
        Command::Run(run) => {
            let cancel = shutdown_token();
            depwatch::daemon::run(run.daemon.to_config(), cancel).await?;
        }
        Command::Retry(a) => {
            let key = service_key(&a.service)?;
            say(&depwatch::operator::retry(
                &open_store(&a.state_dir, a.database_url.as_deref())?,
                &key,
            )?);
        }
        Command::Rollback(a) => {
            let key = service_key(&a.service)?;
            say(&depwatch::operator::rollback(
                &open_store(&a.state_dir, a.database_url.as_deref())?,
                &key,
            )?);
        }
        Command::Suspend(a) => {
            let key = service_key(&a.service)?;
            say(&depwatch::operator::suspend(
                &open_store(&a.state_dir, a.database_url.as_deref())?,
                &key,
                true,
            )?);
        }
        Command::Resume(a) => {
            let key = service_key(&a.service)?;
            say(&depwatch::operator::suspend(
                &open_store(&a.state_dir, a.database_url.as_deref())?,
                &key,
                false,
            )?);
        }
        Command::Demo(demo) => {
            let cancel = shutdown_token();
            depwatch::demo::run(demo.once, demo.rollout_timeout, demo.http_addr, cancel).await?;
        }
        Command::Check(check) => {
            let dir = check
                .dir
                .or(check.deps)
                .unwrap_or_else(|| std::path::PathBuf::from("/var/lib/depwatch/deps"));
            let (good, mut problems) = depwatch::check::check_dir(&dir);
            if let Some(path) = &check.api_token_file {
                if let Err(e) = depwatch::http::read_tokens(path) {
                    problems.push(e.to_string());
                }
            }
            if let Some(path) = &check.kubeconfig {
                if let Err(e) = depwatch::daemon::kube_client(Some(path), None, None).await {
                    problems.push(e.to_string());
                }
            }
            for p in &problems {
                eprintln!("error: {p}");
            }
            say(&format!(
                "{good} valid dependency file(s), {} problem(s) in {}",
                problems.len(),
                dir.display()
            ));
            if !problems.is_empty() {
                std::process::exit(1);
            }
        }
        Command::Status(state) => {
            let services: Vec<depwatch::store::ServiceRecord> = match &state.api {
                // A service view is a record with more fields; the record's are read from it.
                Some(api) => api_get(api, "/api/v1/services").await?,
                None => depwatch::store::Store::open_for_reading(
                    &state.state_dir,
                    state.database_url.as_deref(),
                )?
                .services()?,
            };
            if state.json {
                say(&serde_json::to_string_pretty(&services)?);
            } else {
                let mut rows = vec![vec![
                    "SERVICE".into(),
                    "STATUS".into(),
                    "DESIRED".into(),
                    "DEPLOYED".into(),
                    "LAST GOOD".into(),
                    "MESSAGE".into(),
                ]];
                for s in services {
                    rows.push(vec![
                        format!("{}/{}", s.namespace, s.name),
                        s.status.to_string(),
                        s.desired.to_string(),
                        s.deployed.to_string(),
                        s.last_good.to_string(),
                        s.message,
                    ]);
                }
                print_table(rows);
            }
        }
        Command::History(h) => {
            let key = service_key(&h.service)?;
            let history: Vec<depwatch::store::DeployRecord> = match &h.state.api {
                Some(api) => {
                    // An unknown service is an error (404), not an empty history.
                    let _: serde_json::Value = api_get(
                        api,
                        &format!("/api/v1/services/{}/{}", key.namespace, key.name),
                    )
                    .await?;
                    let path = format!(
                        "/api/v1/deploys?service={}/{}&limit={}",
                        key.namespace, key.name, h.limit
                    );
                    api_get(api, &path).await?
                }
                None => {
                    let store = depwatch::store::Store::open_for_reading(
                        &h.state.state_dir,
                        h.state.database_url.as_deref(),
                    )?;
                    if store.service(&key)?.is_none() {
                        anyhow::bail!(
                            "service {key} is not in the record (see `depwatch status` for the services depwatch manages)"
                        );
                    }
                    store.history(Some(&key), h.limit)?
                }
            };
            if h.state.json {
                say(&serde_json::to_string_pretty(&history)?);
            } else {
                let mut rows = vec![vec![
                    "ID".into(),
                    "STARTED".into(),
                    "OUTCOME".into(),
                    "TRIGGER".into(),
                    "FROM".into(),
                    "TO".into(),
                    "MESSAGE".into(),
                ]];
                for d in history {
                    rows.push(vec![
                        d.id.to_string(),
                        d.started_at,
                        d.outcome.to_string(),
                        d.trigger.to_string(),
                        d.from_image,
                        d.to_image,
                        d.message,
                    ]);
                }
                print_table(rows);
            }
        }
        Command::Sim(sim_args) => {
            let sim = depwatch::sim::Sim::start(sim_args.to_config())
                .await
                .context("starting the simulated cluster")?;
            if let Some(path) = &sim_args.kubeconfig_out {
                sim.write_kubeconfig(path)
                    .with_context(|| format!("writing kubeconfig to {}", path.display()))?;
            }
            say(&format!("simulated cluster listening on {}", sim.url()));
            if let Some(path) = &sim_args.kubeconfig_out {
                say(&format!("kubeconfig written to {}", path.display()));
            }
            shutdown_signal().await;
            sim.shutdown()
                .await
                .context("stopping the simulated cluster")?;
        }
    }
    Ok(())
}
