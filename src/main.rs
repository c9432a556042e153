//! The depwatch binary: parse the command line, set up logging, run, map errors to exit codes.

use anyhow::Context;
use clap::Parser;
use depwatch::cli::{Args, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    match args.command {
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
