//! Command-line arguments. Every flag can also be set from an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

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
    /// Serve a simulated Kubernetes API server on loopback, for tests and demos.
    Sim(SimArgs),
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "DEPWATCH_SIM_ADDR", default_value = "127.0.0.1:0")]
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
    fn fractions_are_checked() {
        assert_eq!(parse_fraction("0.2"), Ok(0.2));
        assert!(parse_fraction("1.5").is_err());
        assert!(parse_fraction("lots").is_err());
    }
}
