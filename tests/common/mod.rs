//! Helpers shared by the integration tests: waiting with deadlines and running kubectl.
#![allow(dead_code)]

pub mod blackhole;
pub mod chromium;
pub mod daemon;
pub mod ecr;
pub mod postgres;
pub mod prometheus;
pub mod proxy;
pub mod registry;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// A service by its workload name and namespace, in [`ServiceKey::new`]'s order.
pub fn key(name: &str, ns: &str) -> depwatch::domain::ServiceKey {
    depwatch::domain::ServiceKey::new(name, ns).expect("a valid service key")
}

/// Whether this test process runs as root. A test that needs root and does not have it says
/// SKIPPED on stderr (`./scripts/test` says so up front too, and CI runs the suite as root).
pub fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("SKIPPED (needs root): {what}; run ./scripts/test as root, as CI does");
    false
}

/// CPU seconds (user and system) a process has used so far, from `/proc/PID/stat`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // After the command's closing parenthesis: state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a stat line")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second
}

/// The body of a GET to `url`, failing the test when there is none.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// Poll `check` until it returns `Some`, failing the test with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_or(what, timeout, check, String::new).await
}

/// [`wait_for`], saying what `explain` gives (the state last seen) when it times out.
pub async fn wait_for_or<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
    explain: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}; {}",
                explain()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The result of one kubectl invocation.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// kubectl pointed at one cluster, with its discovery cache in the test's own directory.
pub struct Kubectl {
    pub kubeconfig: PathBuf,
    pub cache: PathBuf,
}

impl Kubectl {
    pub fn new(dir: &Path, kubeconfig_text: &str) -> Kubectl {
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text).expect("write kubeconfig");
        Kubectl {
            kubeconfig,
            cache: dir.join("kube-cache"),
        }
    }

    pub async fn run(&self, args: &[&str]) -> Output {
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env("KUBECACHEDIR", &self.cache)
            .env("HOME", self.cache.parent().unwrap_or(Path::new("/tmp")))
            .output()
            .await
            .expect("kubectl runs (is it installed?)");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Run and require success.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert_eq!(out.code, 0, "kubectl {args:?} failed: {out:?}");
        out.stdout
    }
}

/// Count the audit-log lines matching a predicate on the parsed JSON.
pub fn audit_count(path: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| pred(v))
        .count()
}

/// Fetch and parse `/metrics`.
pub async fn get_metrics(http: &reqwest::Client, url: &str) -> Vec<(String, f64)> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    parse_prometheus(&text)
}

/// Parse Prometheus text exposition: every line is a comment or `name{labels} value`.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "unterminated labels in {line}");
        }
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        out.push((series.to_string(), v));
    }
    out
}

/// The value of one series (`name{labels}`), summed if repeated; 0 when absent.
pub fn sample(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .filter(|(s, _)| s == series)
        .map(|(_, v)| *v)
        .sum()
}

/// Peak resident memory of a process (`VmHWM`), in MiB; fails the test when it cannot be read,
/// so a memory bound is never passed by a missing figure.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .expect("VmHWM")
}
