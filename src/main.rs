//! The depwatch binary: parse the command line, set up logging, run, map errors to exit codes.

use anyhow::Context;
use clap::Parser;
use depwatch::cli::{Args, Command, LogFormat, Output};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn init_logging(format: LogFormat) {
    // kube's client logs every failed request itself; depwatch logs each failure once, with the
    // server and what it was doing.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client::client=off"));
    // Colour only for a person at a terminal: never into the journal, a file or a pipe.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    // The SDK's and the HTTP stack's wire logs carry tokens: held at info whatever RUST_LOG
    // says, unless DEPWATCH_LOG_AWS_WIRE=1.
    let wanted = depwatch::logging::aws_wire_wanted(
        std::env::var_os(depwatch::logging::AWS_WIRE_VAR).as_deref(),
    );
    let cap = depwatch::logging::wire_cap(wanted);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.finish().with(cap).init(),
        LogFormat::Json => builder.json().finish().with(cap).init(),
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
/// The seed daemon's variable names, set as depwatch's own when those are unset and the seed's
/// are not empty; the pairs it set.
fn seed_env_aliases() -> Vec<(&'static str, &'static str)> {
    let mut set = Vec::new();
    for (ours, seed) in [
        ("DEPWATCH_DEPS", "DEPS"),
        ("DEPWATCH_IMAGE_REPO", "ECR_REPO"),
        ("DEPWATCH_SLACK_WEBHOOK", "WEBHOOK_FOR_SLACK"),
    ] {
        if std::env::var_os(ours).is_none() {
            if let Some(v) = std::env::var_os(seed).filter(|v| !v.is_empty()) {
                std::env::set_var(ours, v);
                set.push((seed, ours));
            }
        }
    }
    set
}

/// Say where settings came from besides the command line: a `.env` file read (its path) and
/// the seed names it or the environment gave.
fn log_settings_sources(dotenv: Option<&std::path::Path>, aliases: &[(&str, &str)]) {
    if let Some(path) = dotenv {
        tracing::info!(path = %path.display(), "read settings from a .env file in the working directory (the real environment wins)");
    }
    for (seed, ours) in aliases {
        tracing::info!(
            from = seed,
            to = ours,
            "took the seed daemon's variable as depwatch's"
        );
    }
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
        tracing::warn!("a second signal: exiting now; deploys in flight stay in progress in the record and are finished at the next start");
        std::process::exit(130);
    });
    token
}

/// A clap error about a value that came from an environment variable names the variable, not
/// the flag the person never typed.
fn name_the_variable(err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return err;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let Some(long) = arg
        .split_whitespace()
        .next()
        .and_then(|a| a.strip_prefix("--"))
    else {
        return err;
    };
    let typed =
        std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if typed {
        return err;
    }
    let cmd = <Args as clap::CommandFactory>::command();
    let env = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .and_then(|e| e.to_str())
        .filter(|e| std::env::var_os(e).is_some())
        .map(String::from);
    match env {
        Some(var) => {
            let text = err.to_string().replace(
                &format!("'{arg}'"),
                &format!("environment variable {var} (--{long})"),
            );
            clap::Error::raw(
                ErrorKind::ValueValidation,
                text.trim_start_matches("error: "),
            )
        }
        None => err,
    }
}

fn fail(e: depwatch::client::ClientError) -> anyhow::Error {
    anyhow::Error::msg(e.0)
}

fn main() -> std::process::ExitCode {
    // The environment is changed only here, before any thread exists: a .env file beside the
    // daemon is read when present (the real environment wins), then the seed's aliases.
    let dotenv = dotenvy::dotenv().ok();
    let aliases = seed_env_aliases();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(dotenv, aliases)));
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: what failed, then why, never the same words twice.
            eprintln!("Error: {}", depwatch::domain::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(
    dotenv: Option<std::path::PathBuf>,
    aliases: Vec<(&'static str, &'static str)>,
) -> anyhow::Result<()> {
    let args = Args::try_parse().unwrap_or_else(|e| name_the_variable(e).exit());
    init_logging(args.log_format);
    use depwatch::client::{self, Action};
    use depwatch::domain::VoteKind;
    match args.command {
        Command::Run(run) => {
            log_settings_sources(dotenv.as_deref(), &aliases);
            let cancel = shutdown_token();
            depwatch::daemon::run(run.daemon.to_config(), cancel).await?;
        }
        Command::Retry(a) => say(&client::act(&a, Action::Retry).await.map_err(fail)?),
        Command::Rollback(r) => say(&client::act(&r.service, Action::Rollback { to: r.to })
            .await
            .map_err(fail)?),
        Command::Promote(a) => say(&client::act(&a, Action::Promote).await.map_err(fail)?),
        Command::Approve(v) => say(&client::act(
            &v.service,
            Action::Vote(VoteKind::Approve, v.comment),
        )
        .await
        .map_err(fail)?),
        Command::Reject(v) => say(&client::act(
            &v.service,
            Action::Vote(VoteKind::Reject, v.comment),
        )
        .await
        .map_err(fail)?),
        Command::Deploy(d) => say(&client::act(&d.service, Action::DeployNow(d.reason))
            .await
            .map_err(fail)?),
        Command::Suspend(a) => say(&client::act(&a, Action::Suspend).await.map_err(fail)?),
        Command::Forget(a) => say(&client::act(&a, Action::Forget).await.map_err(fail)?),
        Command::Resume(a) => say(&client::act(&a, Action::Resume).await.map_err(fail)?),
        Command::Completions(c) => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(c.shell, &mut cmd, "depwatch", &mut std::io::stdout());
        }
        Command::Man => {
            std::io::Write::write_all(&mut std::io::stdout(), &depwatch::cli::man_page()?)?;
        }
        Command::Demo(demo) => {
            let cancel = shutdown_token();
            depwatch::demo::run(demo.once, demo.rollout_timeout, demo.http_addr, cancel).await?;
        }
        Command::Check(check) => check_files(check).await,
        Command::Status(st) => status(st).await?,
        Command::History(h) => history(h).await?,
        Command::Sim(sim_args) => sim(sim_args).await?,
    }
    Ok(())
}

/// `depwatch check`: every problem on stderr, the exit code 1 when there is one.
async fn check_files(check: depwatch::cli::CheckArgs) {
    let dir = check
        .dir
        .clone()
        .or(check.deps.clone())
        .unwrap_or_else(|| std::path::PathBuf::from("/var/lib/depwatch/deps"));
    let (good, mut problems) = depwatch::check::check_dir(&dir, &check.rules());
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

/// `depwatch status`: the services, and the refused file names in a table.
async fn status(st: depwatch::cli::StatusArgs) -> anyhow::Result<()> {
    use depwatch::client;
    let mut services = client::services(&st.target).await.map_err(fail)?;
    if let Some(ns) = &st.namespace {
        services.retain(|s| &s.namespace == ns);
    }
    let output = if st.json { Output::Json } else { st.output };
    let table = matches!(output, Output::Table | Output::Wide);
    let refused = if table {
        client::refused_files(&st.target).await.unwrap_or_default()
    } else {
        Vec::new()
    };
    if services.is_empty() && refused.is_empty() && table {
        match &st.namespace {
            Some(ns) => eprintln!("No services in namespace {ns}."),
            None => eprintln!("No services yet: write a dependency file to start."),
        }
        return Ok(());
    }
    if !services.is_empty() || !table {
        print!(
            "{}",
            client::render_services(&services, output).map_err(fail)?
        );
    }
    print!("{}", client::render_refused(&refused));
    Ok(())
}

/// `depwatch history`: a service's deploys, newest first, then who asked and approved.
async fn history(h: depwatch::cli::HistoryArgs) -> anyhow::Result<()> {
    use depwatch::client;
    let key = h.service.key().map_err(anyhow::Error::msg)?;
    let (kind, history) = client::history(&h.service.target, &key, h.limit)
        .await
        .map_err(fail)?;
    let output = if h.json { Output::Json } else { h.output };
    let table = matches!(output, Output::Table | Output::Wide);
    if table {
        print!("{}", client::history_heading(&key, kind));
    }
    print!(
        "{}",
        client::render_history(&history, output).map_err(fail)?
    );
    if table {
        // Who asked, approved and rejected (a server without approvals answers 404:
        // nothing to add).
        if let Ok(votes) = client::approvals(&h.service.target, &key).await {
            print!("{}", client::render_approvals(&votes, h.limit));
        }
    }
    Ok(())
}

/// `depwatch sim`: the simulated cluster, until a signal.
async fn sim(sim_args: depwatch::cli::SimArgs) -> anyhow::Result<()> {
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
        .context("stopping the simulated cluster")
}
