//! A test environment for the daemon: a simulated cluster in-process, a temp dependency
//! directory, a local Slack receiver, and the real `depwatch run` binary between them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use depwatch::sim::{Sim, SimConfig};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

use super::{audit_count, wait_for};

/// One message received by the local Slack receiver, with what the cluster said at that moment.
#[derive(Debug, Clone)]
pub struct Received {
    pub body: Value,
    /// `updated/available/desired` of the message's Deployment when the message arrived.
    pub rollout_at_receipt: Option<(i32, i32, i32)>,
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub deps: PathBuf,
    pub state: PathBuf,
    pub kubeconfig: PathBuf,
    pub audit: PathBuf,
    pub sim: Sim,
    pub client: kube::Client,
    pub slack_url: String,
    pub slack: Arc<Mutex<Vec<Received>>>,
}

impl Env {
    pub async fn new(config: SimConfig) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = dir.path().join("audit.jsonl");
        let sim = Sim::start(SimConfig {
            audit_log: Some(audit.clone()),
            ..config
        })
        .await
        .expect("sim starts");
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let deps = dir.path().join("deps");
        std::fs::create_dir(&deps).expect("mkdir deps");
        let client = sim.client().expect("client");
        let slack: Arc<Mutex<Vec<Received>>> = Arc::default();
        let slack_url = start_slack(slack.clone(), client.clone()).await;
        Env {
            state: dir.path().join("state"),
            dir,
            deps,
            kubeconfig,
            audit,
            sim,
            client,
            slack_url,
            slack,
        }
    }

    /// Create a namespace (if needed) and a Deployment, and wait until it is healthy.
    pub async fn deployment(
        &self,
        ns: &str,
        name: &str,
        containers: &[(&str, &str)],
        replicas: i32,
    ) {
        let nss: Api<Namespace> = Api::all(self.client.clone());
        if nss.get_opt(ns).await.expect("get ns").is_none() {
            let obj: Namespace =
                serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
            nss.create(&PostParams::default(), &obj)
                .await
                .expect("create ns");
        }
        let cs: Vec<Value> = containers
            .iter()
            .map(|(n, i)| json!({"name": n, "image": i}))
            .collect();
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": cs}}}
        }))
        .expect("deployment");
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        api.create(&PostParams::default(), &d)
            .await
            .expect("create deployment");
    }

    /// Create a workload of `kind` (`statefulset`, `daemonset`, `cronjob`; `spec` is merged into
    /// its spec, e.g. `{"updateStrategy": {"type": "OnDelete"}}`).
    pub async fn workload(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        containers: &[(&str, &str)],
        spec: Value,
    ) {
        self.deployment_namespace(ns).await;
        let cs: Vec<Value> = containers
            .iter()
            .map(|(n, i)| json!({"name": n, "image": i}))
            .collect();
        let template = json!({"metadata": {"labels": {"app": name}}, "spec": {"containers": cs}});
        let mut body = match kind {
            "cronjob" => {
                json!({"schedule": "0 3 * * *", "jobTemplate": {"spec": {"template": template}}})
            }
            _ => json!({"selector": {"matchLabels": {"app": name}}, "template": template}),
        };
        if kind == "statefulset" {
            body["serviceName"] = json!(name);
            body["replicas"] = json!(3);
        }
        if let (Some(b), Some(extra)) = (body.as_object_mut(), spec.as_object()) {
            for (k, v) in extra {
                b.insert(k.clone(), v.clone());
            }
        }
        let (group, plural) = workload_path(kind);
        let obj = json!({"metadata": {"name": name, "namespace": ns}, "spec": body});
        let url = format!("{group}/namespaces/{ns}/{plural}");
        let req = http::Request::post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&obj).expect("json"))
            .expect("request");
        self.client
            .request::<Value>(req)
            .await
            .unwrap_or_else(|e| panic!("create {kind} {ns}/{name}: {e}"));
    }

    /// A workload of `kind` as JSON, from the API server.
    pub async fn get_workload(&self, kind: &str, ns: &str, name: &str) -> Value {
        let (group, plural) = workload_path(kind);
        let req = http::Request::get(format!("{group}/namespaces/{ns}/{plural}/{name}"))
            .body(Vec::new())
            .expect("request");
        self.client
            .request::<Value>(req)
            .await
            .unwrap_or_else(|e| panic!("get {kind} {ns}/{name}: {e}"))
    }

    /// The first container's image in a workload's pod template.
    pub async fn workload_image(&self, kind: &str, ns: &str, name: &str) -> String {
        let w = self.get_workload(kind, ns, name).await;
        let spec = match kind {
            "cronjob" => &w["spec"]["jobTemplate"]["spec"]["template"]["spec"],
            _ => &w["spec"]["template"]["spec"],
        };
        spec["containers"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// PATCHes of one workload of `kind` that took effect, from the audit log.
    pub fn workload_patches(&self, kind: &str, ns: &str, name: &str) -> usize {
        let (group, plural) = workload_path(kind);
        let path = format!("{group}/namespaces/{ns}/{plural}/{name}");
        audit_count(&self.audit, |l| applied_patch(l) && l["path"] == path)
    }

    async fn deployment_namespace(&self, ns: &str) {
        let nss: Api<Namespace> = Api::all(self.client.clone());
        if nss.get_opt(ns).await.expect("get ns").is_none() {
            let obj: Namespace =
                serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
            nss.create(&PostParams::default(), &obj)
                .await
                .expect("create ns");
        }
    }

    pub async fn wait_ready(&self, ns: &str, name: &str) {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        wait_for(
            &format!("{ns}/{name} ready"),
            Duration::from_secs(30),
            || async {
                let d = api.get(name).await.ok()?;
                let st = d.status?;
                (st.available_replicas == d.spec?.replicas && st.updated_replicas == st.replicas)
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn images(&self, ns: &str, name: &str) -> Vec<(String, String)> {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
        let d = api.get(name).await.expect("get deployment");
        d.spec
            .and_then(|s| s.template.spec)
            .map(|s| {
                s.containers
                    .into_iter()
                    .map(|c| (c.name, c.image.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn image(&self, ns: &str, name: &str) -> String {
        self.images(ns, name)
            .await
            .into_iter()
            .next()
            .map(|(_, i)| i)
            .unwrap_or_default()
    }

    pub async fn wait_image(&self, ns: &str, name: &str, want: &str) {
        wait_for(
            &format!("{ns}/{name} to run {want}"),
            Duration::from_secs(30),
            || async { (self.image(ns, name).await == want).then_some(()) },
        )
        .await;
    }

    /// Write a dependency file the way a shell redirection does (truncate, write, close).
    pub fn write_dep(&self, file: &str, content: &str) {
        std::fs::write(self.deps.join(file), content).expect("write dep file");
    }

    /// PATCHes of one Deployment that took effect, from the audit log.
    pub fn patches(&self, ns: &str, name: &str) -> usize {
        let path = format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}");
        audit_count(&self.audit, |l| applied_patch(l) && l["path"] == path)
    }

    /// All PATCHes of Deployments that took effect.
    pub fn all_patches(&self) -> usize {
        audit_count(&self.audit, |l| {
            applied_patch(l)
                && l["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("/deployments/"))
        })
    }

    pub fn messages(&self) -> Vec<Received> {
        self.slack.lock().expect("lock").clone()
    }

    pub async fn wait_messages(&self, n: usize) -> Vec<Received> {
        wait_for(
            &format!("{n} Slack message(s)"),
            Duration::from_secs(30),
            || async {
                let m = self.messages();
                (m.len() >= n).then_some(m)
            },
        )
        .await
    }

    /// `run` with this environment's directories and kubeconfig, and nothing else.
    pub fn run_args(&self) -> Vec<String> {
        [
            "run",
            "--deps",
            self.deps.to_str().expect("utf-8"),
            "--state-dir",
            self.state.to_str().expect("utf-8"),
            "--kubeconfig",
            self.kubeconfig.to_str().expect("utf-8"),
        ]
        .map(String::from)
        .to_vec()
    }

    /// `run` for one of several replicas electing a leader (a 3 s Lease in `default`), with
    /// its own state directory `state` under this environment's.
    pub fn replica_args(&self, state: &str) -> Vec<String> {
        let mut args = self.run_args();
        let at = args
            .iter()
            .position(|a| a == "--state-dir")
            .expect("state arg")
            + 1;
        args[at] = self.dir.path().join(state).display().to_string();
        args.extend(
            [
                "--leader-elect",
                "--lease-duration",
                "3s",
                "--lease-namespace",
                "default",
            ]
            .map(String::from),
        );
        args
    }

    /// Start `depwatch run` against this environment.
    pub async fn daemon(&self, extra: &[&str]) -> Daemon {
        let mut args: Vec<String> = vec![
            "run".into(),
            "--deps".into(),
            self.deps.display().to_string(),
            "--state-dir".into(),
            self.state.display().to_string(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--slack-webhook".into(),
            self.slack_url.clone(),
            "--debounce".into(),
            "50ms".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        self.daemon_with(&args, &[], self.dir.path()).await
    }

    /// Start the binary with exactly these arguments and extra environment, in `cwd`.
    pub async fn daemon_with(
        &self,
        args: &[String],
        envs: &[(&str, String)],
        cwd: &Path,
    ) -> Daemon {
        self.daemon_via(&[env!("CARGO_BIN_EXE_depwatch")], args, envs, cwd)
            .await
    }

    /// [`Self::daemon_with`], run through a launcher: `program[0]` with the rest of `program`,
    /// then `args` (e.g. `setpriv … /path/to/depwatch`).
    pub async fn daemon_via(
        &self,
        program: &[&str],
        args: &[String],
        envs: &[(&str, String)],
        cwd: &Path,
    ) -> Daemon {
        let d = self.spawn_via(program, args, envs, cwd);
        let log = d.log.clone();
        let started = tokio::time::timeout(
            Duration::from_secs(30),
            wait_for(
                "the daemon to watch the directory",
                Duration::from_secs(60),
                || async {
                    std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains("watching for dependency file changes")
                        .then_some(())
                },
            ),
        )
        .await;
        assert!(
            started.is_ok(),
            "the daemon did not start watching within 30s; its log:\n{}",
            d.log_text()
        );
        d
    }

    /// Start the daemon without waiting for it to watch (a standby never does until it leads).
    pub fn spawn_via(
        &self,
        program: &[&str],
        args: &[String],
        envs: &[(&str, String)],
        cwd: &Path,
    ) -> Daemon {
        let log = self
            .dir
            .path()
            .join(format!("daemon-{}.log", rand_suffix()));
        let child = Command::new(program[0])
            .args(&program[1..])
            .args(args)
            .current_dir(cwd)
            .env("DEPWATCH_HTTP_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info,depwatch=debug")
            .env("NO_COLOR", "1")
            // The simulated cluster's images live in no registry; the registry tests ask for
            // the pre-flight (`--registry-check on`, which the flag's value overrides).
            .env("DEPWATCH_REGISTRY_CHECK", "off")
            .envs(envs.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("depwatch run starts");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Every daemon log of this environment, oldest first, for failure messages.
    /// [`wait_for`], showing the daemon's logs if the condition never holds within `within`.
    pub async fn wait_or_show<T, F, Fut>(&self, what: &str, within: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        match tokio::time::timeout(within, wait_for(what, within * 2, check)).await {
            Ok(v) => v,
            Err(_) => panic!("timed out waiting for {what}\n{}", self.daemon_logs()),
        }
    }

    /// Wait until the service's recorded status is `want`, showing the daemon's logs if not.
    pub async fn wait_status(
        &self,
        k: &depwatch::domain::ServiceKey,
        want: depwatch::domain::ServiceStatus,
        within: Duration,
    ) {
        let what = format!("{k} to be {want}");
        self.wait_or_show(&what, within, || async {
            (self.store().service(k).await.ok()??.status == want).then_some(())
        })
        .await
    }

    pub fn daemon_logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().contains("daemon-"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        logs.iter()
            .map(|p| format!("== {}\n{}", p.display(), read(p)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `depwatch ARGS --state-dir STATE` on this environment's record, as the local user
    /// `alice` runs it (never through an API the caller's environment names).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .env("NO_COLOR", "1")
            .env("USER", "alice")
            .env_remove("DEPWATCH_API")
            .output()
            .expect("the command runs")
    }

    pub fn store(&self) -> depwatch::store::Store {
        depwatch::store::Store::open(&self.state).expect("state db")
    }
}

/// A PATCH the API server applied. One refused (a 409 for the resourceVersion it carries, met
/// by a controller's status write or another replica's patch; an injected fault) wrote
/// nothing: depwatch sends it again, and it is not a second patch. A dry run (`dryRun=All`)
/// writes nothing either.
pub fn applied_patch(line: &Value) -> bool {
    line["method"] == "PATCH"
        && line["code"].as_u64().is_some_and(|c| c < 300)
        && line["dryRun"] != true
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A running daemon; killed on drop, stopped gracefully by `stop`.
pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// A daemon started elsewhere, logging to `log`.
    pub fn from_child(child: Child, log: PathBuf) -> Daemon {
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// `http://127.0.0.1:PORT` of the status page and API, from the daemon's log.
    pub fn http_url(&self) -> String {
        let log = self.log_text();
        let at = log
            .find("url=http://")
            .expect("the daemon logs its HTTP address");
        let rest = &log[at + 4..];
        let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
        rest[..end].trim_end_matches('/').to_string()
    }

    /// The daemon's process id (for /proc figures such as peak memory).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send a signal (`TERM`, `INT`, …) without waiting.
    pub fn signal(&self, name: &str) {
        if let Some(child) = &self.child {
            let status = Command::new("kill")
                .args([&format!("-{name}"), &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(status.success());
        }
    }

    /// Wait for the process to exit on its own, up to `within`.
    pub async fn exit_status(mut self, within: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_for("the daemon to exit", within, || {
            let done = child.try_wait().ok().flatten();
            async move { done }
        })
        .await
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .expect("kill");
            let status = child.wait().expect("wait");
            assert!(
                status.success(),
                "daemon exits cleanly: {status:?}\n{}",
                self.log_text()
            );
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A local Slack incoming-webhook receiver on a free loopback port.
async fn start_slack(store: Arc<Mutex<Vec<Received>>>, client: kube::Client) -> String {
    use axum::routing::post;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(body): axum::Json<Value>| {
            let store = store.clone();
            let client = client.clone();
            async move {
                let fields = body["attachments"][0]["fields"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let field = |t: &str| {
                    fields
                        .iter()
                        .find(|f| f["title"] == t)
                        .and_then(|f| f["value"].as_str().map(String::from))
                };
                let mut rollout = None;
                if let (Some(ns), Some(name)) = (field("Namespace"), field("Service")) {
                    let api: Api<Deployment> = Api::namespaced(client, &ns);
                    if let Ok(d) = api.get(&name).await {
                        let st = d.status.unwrap_or_default();
                        rollout = Some((
                            st.updated_replicas.unwrap_or(0),
                            st.available_replicas.unwrap_or(0),
                            d.spec.and_then(|s| s.replicas).unwrap_or(1),
                        ));
                    }
                }
                store.lock().expect("lock").push(Received {
                    body,
                    rollout_at_receipt: rollout,
                });
                "ok"
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/hook")
}

/// The API path prefix and plural of a workload kind.
pub fn workload_path(kind: &str) -> (&'static str, &'static str) {
    match kind {
        "deployment" => ("/apis/apps/v1", "deployments"),
        "statefulset" => ("/apis/apps/v1", "statefulsets"),
        "daemonset" => ("/apis/apps/v1", "daemonsets"),
        "cronjob" => ("/apis/batch/v1", "cronjobs"),
        other => panic!("not a workload kind: {other}"),
    }
}

pub fn colour(m: &Received) -> String {
    m.body["attachments"][0]["color"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub fn text(m: &Received) -> String {
    m.body["text"].as_str().unwrap_or_default().to_string()
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
