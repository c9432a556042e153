//! Fleet benchmark: the real `depwatch run` binary (a child process, so its CPU and memory are
//! its own) against the simulated cluster (in this process), one namespace, 1 replica per
//! service, ready delay 300 ms. For each fleet size it measures:
//! - RSS idle over N up-to-date files, and a restart over them: time to ready, PATCHes (0);
//! - a burst of N changed files: time to all patched and all healthy, PATCHes (= N), API
//!   requests per deploy, watch connections, daemon CPU per deploy, peak RSS;
//! - save → PATCH latency of single changes (p50, p99);
//! - the same burst (on at most `--baseline` files) and single changes driven by
//!   `inotifywait -m` piped to `kubectl set image`, and the ratios.
//!
//! With `--mixed N`, a mixed fleet over N namespaces instead (see [`mixed`]); with
//! `--preflight N`, the registry pre-flight's cost over a burst of N (see [`preflight`]).
//!
//! Run: `cargo bench --bench fleet -- [--services 1000,10000] [--baseline 100] [--json]
//! [--mixed 200] [--preflight 1000]`

#[path = "fleet/mixed.rs"]
mod mixed;
#[path = "fleet/preflight.rs"]
mod preflight;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use depwatch::sim::store::ObjKey;
use depwatch::sim::{Sim, SimConfig};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

const NS: &str = "fleet";

struct Options {
    services: Vec<usize>,
    baseline: usize,
    json: bool,
    /// Namespaces of the mixed fleet, when asked for.
    mixed: Option<usize>,
    /// Services of the pre-flight burst, when asked for.
    preflight: Option<usize>,
}

fn options() -> Options {
    let mut o = Options {
        services: vec![1000, 10_000],
        baseline: 100,
        json: false,
        mixed: None,
        preflight: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--json" => o.json = true,
            "--services" => {
                i += 1;
                o.services = args[i]
                    .split(',')
                    .map(|n| n.trim().parse().expect("--services takes numbers"))
                    .collect();
            }
            "--preflight" => {
                i += 1;
                o.preflight = Some(args[i].parse().expect("--preflight takes a number"));
            }
            "--mixed" => {
                i += 1;
                o.mixed = Some(args[i].parse().expect("--mixed takes a number"));
            }
            "--baseline" => {
                i += 1;
                o.baseline = args[i].parse().expect("--baseline takes a number");
            }
            _ => {} // cargo bench passes --bench
        }
        i += 1;
    }
    o
}

fn image_of(obj: &Value) -> &str {
    obj["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

fn rollout_done(obj: &Value) -> bool {
    let st = &obj["status"];
    obj["metadata"]["generation"] == st["observedGeneration"]
        && st["updatedReplicas"] == obj["spec"]["replicas"]
        && st["availableReplicas"] == obj["spec"]["replicas"]
        && st["replicas"] == obj["spec"]["replicas"]
}

/// `(patched, healthy)` counts of Deployments running `tag`, counted in place in one pass (the
/// count holds the simulated cluster's store lock, so it is kept short and infrequent).
fn progress(sim: &Sim, tag: &str) -> (usize, usize) {
    let healthy = std::cell::Cell::new(0);
    let patched = sim.store().count("deployments.apps", Some(NS), |d| {
        let patched = image_of(d).ends_with(tag);
        if patched && rollout_done(d) {
            healthy.set(healthy.get() + 1);
        }
        patched
    });
    (patched, healthy.get())
}

/// One process's CPU seconds and resident memory (now and peak), from /proc.
fn proc_stats(pid: u32) -> (f64, f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the command name), in 1/100 s.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (cpu, kib("VmRSS:"), kib("VmHWM:"))
}

fn audit_patches(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"PATCH\"") && l.contains("/deployments/"))
        .count()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len().saturating_sub(1))]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// One Deployment per name in `NS`, running `<repository>:1.0.0` (`repository(name)`).
async fn create_fleet(
    client: &kube::Client,
    names: &[String],
    repository: impl Fn(&str) -> String,
) {
    let nss: Api<Namespace> = Api::all(client.clone());
    let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns");
    nss.create(&PostParams::default(), &obj)
        .await
        .expect("create ns");
    let api: Api<Deployment> = Api::namespaced(client.clone(), NS);
    futures::stream::iter(names.iter().map(|n| {
        let api = api.clone();
        let image = format!("{}:1.0.0", repository(n));
        async move {
            let d: Deployment = serde_json::from_value(json!({
                "metadata": {"name": n},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": n}},
                         "template": {"metadata": {"labels": {"app": n}},
                                      "spec": {"containers": [{"name": n, "image": image}]}}}
            }))
            .expect("deployment");
            api.create(&PostParams::default(), &d)
                .await
                .expect("create");
        }
    }))
    .buffer_unordered(32)
    .collect::<Vec<()>>()
    .await;
}

/// Whether the record (once open) holds `n` services, none of them in flight.
async fn settled(db: &Option<depwatch::store::Store>, n: usize) -> bool {
    let Some(s) = db else {
        return false;
    };
    s.services()
        .await
        .map(|v| v.len() == n && v.iter().all(|r| !r.status.in_flight()))
        .unwrap_or(false)
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !check() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t0.elapsed()
}

struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    fn start(dir: &Path, deps: &Path, kubeconfig: &Path) -> Daemon {
        Self::start_with(dir, deps, kubeconfig, &[])
    }

    /// [`Daemon::start`] with more environment (which wins over the defaults).
    fn start_with(dir: &Path, deps: &Path, kubeconfig: &Path, envs: &[(&str, &str)]) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
        // DEPWATCH_BENCH_BIN measures another build of the daemon (an earlier commit's, for a
        // comparison on the same machine in the same hour).
        let bin = std::env::var_os("DEPWATCH_BENCH_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_depwatch").into());
        let child = Command::new(bin)
            .args(["run", "--deps"])
            .arg(deps)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--resync", "1h", "--rollout-timeout", "5m"])
            .env("RUST_LOG", "warn")
            // The fleet's images live in no registry; the pre-flight's cost is measured apart.
            .env("DEPWATCH_REGISTRY_CHECK", "off")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("depwatch run");
        Daemon {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn ready(&self, http: &reqwest::Client) -> bool {
        match http.get(format!("{}/readyz", self.url)).send().await {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        }
    }

    /// Kubernetes requests so far: `(all but watches, watches)`.
    async fn kube_requests(&self, http: &reqwest::Client) -> (f64, f64) {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let mut out = (0.0, 0.0);
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("depwatch_kubernetes_requests_total{") else {
                continue;
            };
            let value: f64 = rest
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0.0);
            if rest.contains("verb=\"watch\"") {
                out.1 += value;
            } else {
                out.0 += value;
            }
        }
        out
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn write_all(deps: &Path, names: &[String], version: &str) {
    for n in names {
        std::fs::write(deps.join(format!("{n}_{NS}.dep")), format!("{version}\n")).expect("write");
    }
}

/// Save → PATCH for single changes to one service, from the store's own event stream.
async fn latencies(sim: &Sim, deps: &Path, name: &str, rounds: usize, tag: &str) -> Vec<Duration> {
    let mut events = sim.store().subscribe();
    let mut out = Vec::new();
    for i in 0..rounds {
        let version = format!("{tag}.{i}");
        let want = format!("example.com/{name}:{version}");
        let t0 = Instant::now();
        std::fs::write(
            deps.join(format!("{name}_{NS}.dep")),
            format!("{version}\n"),
        )
        .expect("write");
        loop {
            let ev = tokio::time::timeout(Duration::from_secs(60), events.recv())
                .await
                .expect("a PATCH within 60s")
                .expect("events");
            if ev.key.name == name && image_of(&ev.object) == want {
                out.push(t0.elapsed());
                break;
            }
        }
        // Let the rollout settle: single changes on a quiet machine.
        let deadline = Instant::now() + Duration::from_secs(30);
        let key = ObjKey::new(depwatch::sim::resources::deployments(), NS, name);
        while Instant::now() < deadline {
            let d = sim.store().get(&key).unwrap_or_default();
            if rollout_done(&d) && image_of(&d) == want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    out.sort();
    out
}

/// `inotifywait -m` piped to `kubectl set image`, one event at a time: the loop a team would
/// write in a shell instead (`inotifywait -m … | while read f; do kubectl set image …; done`).
fn baseline(deps: &Path, kubeconfig: &Path, cache: &Path) -> Child {
    let mut watch = Command::new("inotifywait")
        .args([
            "-m",
            "-q",
            "-e",
            "close_write",
            "-e",
            "moved_to",
            "--format",
            "%f",
        ])
        .arg(deps)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("inotifywait runs (install inotify-tools)");
    let out = watch.stdout.take().expect("piped stdout");
    let (deps, kubeconfig, cache) = (
        deps.to_path_buf(),
        kubeconfig.to_path_buf(),
        cache.to_path_buf(),
    );
    std::thread::spawn(move || {
        use std::io::BufRead;
        for file in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let name = file.split('_').next().unwrap_or_default().to_string();
            let version = std::fs::read_to_string(deps.join(&file)).unwrap_or_default();
            let _ = Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["-n", NS, "set", "image", &format!("deploy/{name}")])
                .arg(format!("{name}=example.com/{name}:{}", version.trim()))
                .env("KUBECACHEDIR", &cache)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    });
    watch
}

#[derive(Default, serde::Serialize)]
struct Figures {
    services: usize,
    idle_rss_mib: f64,
    restart_ready_ms: f64,
    restart_patches: usize,
    burst_all_patched_ms: f64,
    burst_all_healthy_ms: f64,
    burst_patches: usize,
    api_requests_per_deploy: f64,
    watch_connections: f64,
    daemon_cpu_ms_per_deploy: f64,
    peak_rss_mib: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    baseline_burst_files: usize,
    baseline_ms_per_deploy: f64,
    baseline_latency_p50_ms: f64,
    burst_speedup: f64,
    latency_speedup: f64,
}

async fn scenario(n: usize, baseline_n: usize) -> Figures {
    let dir = tempfile::tempdir().expect("tempdir");
    let deps = dir.path().join("deps");
    std::fs::create_dir(&deps).expect("mkdir");
    let audit = dir.path().join("audit.jsonl");
    let sim = Sim::start(SimConfig {
        audit_log: Some(audit.clone()),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let client = sim.client().expect("client");
    let names: Vec<String> = (0..n).map(|i| format!("svc-{i:05}")).collect();
    eprintln!("[{n}] creating {n} Deployments");
    create_fleet(&client, &names, |n| format!("example.com/{n}")).await;
    wait_until("the fleet to be ready", Duration::from_secs(600), || {
        progress(&sim, ":1.0.0").1 == n
    })
    .await;
    write_all(&deps, &names, "1.0.0");
    let http = reqwest::Client::new();
    let mut f = Figures {
        services: n,
        ..Figures::default()
    };

    eprintln!("[{n}] adopting {n} up-to-date services");
    let daemon = Daemon::start(dir.path(), &deps, &kubeconfig);
    let store = || depwatch::store::Store::open(&dir.path().join("state")).ok();
    let mut db = None;
    let t = Instant::now();
    while !settled(&db, n).await {
        assert!(t.elapsed() < Duration::from_secs(600), "adoption");
        tokio::time::sleep(Duration::from_millis(100)).await;
        db = db.or_else(store);
    }
    daemon.stop();

    eprintln!("[{n}] restarting over {n} up-to-date files");
    let patches_before = audit_patches(&audit);
    let t0 = Instant::now();
    let daemon = Daemon::start(dir.path(), &deps, &kubeconfig);
    while !daemon.ready(&http).await {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.restart_ready_ms = ms(t0.elapsed());
    // Idle: the watches have synced and nothing happens.
    tokio::time::sleep(Duration::from_secs(5)).await;
    f.restart_patches = audit_patches(&audit) - patches_before;
    f.idle_rss_mib = proc_stats(daemon.child.id()).1;
    // DEPWATCH_BENCH_SMAPS: where the idle resident set is (anonymous or file-backed).
    if std::env::var_os("DEPWATCH_BENCH_SMAPS").is_some() {
        let smaps = format!("/proc/{}/smaps_rollup", daemon.child.id());
        eprintln!(
            "[{n}] idle {smaps}:\n{}",
            std::fs::read_to_string(&smaps).unwrap_or_default()
        );
    }
    // DEPWATCH_BENCH_SMAPS_TO=FILE: every mapping of the idle daemon, for a closer look.
    if let Some(to) = std::env::var_os("DEPWATCH_BENCH_SMAPS_TO") {
        let smaps = format!("/proc/{}/smaps", daemon.child.id());
        if let Err(e) = std::fs::copy(&smaps, &to) {
            eprintln!("[{n}] cannot copy {smaps}: {e}");
        }
    }
    // DEPWATCH_BENCH_STOP_IDLE: end the run here, killing the idle daemon, so that a heap
    // profiler wrapping it (DEPWATCH_BENCH_BIN) reports what the idle daemon held.
    if std::env::var_os("DEPWATCH_BENCH_STOP_IDLE").is_some() {
        let mut child = daemon.child;
        let _ = child.kill();
        let _ = child.wait();
        return f;
    }

    eprintln!("[{n}] burst of {n} changed files");
    let (cpu0, _, _) = proc_stats(daemon.child.id());
    let (requests0, _) = daemon.kube_requests(&http).await;
    let patches0 = audit_patches(&audit);
    let t0 = Instant::now();
    write_all(&deps, &names, "1.1.0");
    let mut all_patched = None;
    loop {
        let (patched, healthy) = progress(&sim, ":1.1.0");
        if patched == n && all_patched.is_none() {
            all_patched = Some(t0.elapsed());
        }
        if healthy == n {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(900), "the burst");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    f.burst_all_healthy_ms = ms(t0.elapsed());
    f.burst_all_patched_ms = ms(all_patched.unwrap_or_default());
    // Let the daemon record every verdict (and send its Events) before counting.
    let t = Instant::now();
    while !settled(&db, n).await && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cpu1, _, peak) = proc_stats(daemon.child.id());
    let (requests1, watches) = daemon.kube_requests(&http).await;
    f.burst_patches = audit_patches(&audit) - patches0;
    f.api_requests_per_deploy = ((requests1 - requests0) / n as f64 * 100.0).round() / 100.0;
    f.watch_connections = watches;
    f.daemon_cpu_ms_per_deploy = ((cpu1 - cpu0) * 1000.0 / n as f64 * 100.0).round() / 100.0;
    f.peak_rss_mib = peak;

    eprintln!("[{n}] single-change latency");
    let lat = latencies(&sim, &deps, &names[0], 50, "2").await;
    f.latency_p50_ms = ms(percentile(&lat, 0.5));
    f.latency_p99_ms = ms(percentile(&lat, 0.99));
    daemon.stop();

    let b = baseline_n.min(n);
    eprintln!("[{n}] baseline: inotifywait | kubectl set image, burst of {b}");
    let cache = dir.path().join("kube-cache");
    let mut script = baseline(&deps, &kubeconfig, &cache);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    write_all(&deps, &names[..b], "3.0.0");
    wait_until("the baseline burst", Duration::from_secs(1800), || {
        progress(&sim, ":3.0.0").0 == b
    })
    .await;
    f.baseline_burst_files = b;
    f.baseline_ms_per_deploy = ms(t0.elapsed()) / b as f64;
    let lat = latencies(&sim, &deps, &names[n - 1], 5, "4").await;
    f.baseline_latency_p50_ms = ms(percentile(&lat, 0.5));
    let _ = script.kill();
    let _ = script.wait();
    let per_deploy = f.burst_all_patched_ms / n as f64;
    f.burst_speedup = (f.baseline_ms_per_deploy / per_deploy).round();
    f.latency_speedup = (f.baseline_latency_p50_ms / f.latency_p50_ms).round();
    f
}

/// How one row of the table shows a figure.
type Column = Box<dyn Fn(&Figures) -> String>;

fn table(all: &[Figures]) {
    let rows: Vec<(&str, Column)> = vec![
        (
            "RSS idle over N up-to-date files (MiB)",
            Box::new(|f| format!("{:.0}", f.idle_rss_mib)),
        ),
        (
            "restart: time to ready (ms)",
            Box::new(|f| format!("{:.0}", f.restart_ready_ms)),
        ),
        (
            "restart: PATCHes",
            Box::new(|f| f.restart_patches.to_string()),
        ),
        (
            "burst: all patched (ms)",
            Box::new(|f| format!("{:.0}", f.burst_all_patched_ms)),
        ),
        (
            "burst: all healthy (ms)",
            Box::new(|f| format!("{:.0}", f.burst_all_healthy_ms)),
        ),
        ("burst: PATCHes", Box::new(|f| f.burst_patches.to_string())),
        (
            "burst: API requests per deploy",
            Box::new(|f| format!("{:.2}", f.api_requests_per_deploy)),
        ),
        (
            "watch connections (whole run)",
            Box::new(|f| format!("{:.0}", f.watch_connections)),
        ),
        (
            "burst: daemon CPU per deploy (ms)",
            Box::new(|f| format!("{:.2}", f.daemon_cpu_ms_per_deploy)),
        ),
        (
            "burst: peak RSS (MiB)",
            Box::new(|f| format!("{:.0}", f.peak_rss_mib)),
        ),
        (
            "save → PATCH p50 / p99 (ms)",
            Box::new(|f| format!("{:.1} / {:.1}", f.latency_p50_ms, f.latency_p99_ms)),
        ),
        (
            "baseline: ms per deploy in a burst",
            Box::new(|f| {
                format!(
                    "{:.0} (of {})",
                    f.baseline_ms_per_deploy, f.baseline_burst_files
                )
            }),
        ),
        (
            "baseline: save → PATCH p50 (ms)",
            Box::new(|f| format!("{:.0}", f.baseline_latency_p50_ms)),
        ),
        (
            "burst speed-up over baseline",
            Box::new(|f| format!("{:.0}×", f.burst_speedup)),
        ),
        (
            "latency speed-up over baseline",
            Box::new(|f| format!("{:.0}×", f.latency_speedup)),
        ),
    ];
    print!("| measure |");
    for f in all {
        print!(" {} services |", f.services);
    }
    println!();
    print!("|---|");
    for _ in all {
        print!("---|");
    }
    println!();
    for (name, value) in rows {
        print!("| {name} |");
        for f in all {
            print!(" {} |", value(f));
        }
        println!();
    }
}

#[tokio::main]
async fn main() {
    let o = options();
    if let Some(namespaces) = o.mixed {
        mixed::run(namespaces).await;
        return;
    }
    if let Some(n) = o.preflight {
        preflight::run(n).await;
        return;
    }
    let mut all = Vec::new();
    for n in &o.services {
        all.push(scenario(*n, o.baseline).await);
    }
    if o.json {
        let map: HashMap<String, &Figures> =
            all.iter().map(|f| (f.services.to_string(), f)).collect();
        println!("{}", serde_json::to_string_pretty(&map).unwrap_or_default());
    } else {
        table(&all);
    }
}
