//! The end-to-end scenarios that hold on any cluster. With `DEPWATCH_E2E_KUBECONFIG` set they
//! run against that cluster (kind, k3s, a test cluster); otherwise against `depwatch sim`
//! started as a separate process, reached only through its kubeconfig, exactly as a real
//! cluster is. Images are real (`registry.k8s.io/pause`), and the failing one is a tag that
//! does not exist (the simulated cluster fails it by its name, a real one by pulling it).
//! Each test works in a namespace of its own and deletes it at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::wait_for;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const GOOD: &str = "registry.k8s.io/pause:3.10";
const NEWER: &str = "registry.k8s.io/pause:3.9";
const MISSING: &str = "registry.k8s.io/pause:0.0-fail-pull-does-not-exist";

/// The cluster under test: the one named by `DEPWATCH_E2E_KUBECONFIG`, or a `depwatch sim`
/// process.
struct Cluster {
    kubeconfig: PathBuf,
    sim: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(path) = std::env::var_os("DEPWATCH_E2E_KUBECONFIG").filter(|p| !p.is_empty()) {
            return Cluster {
                kubeconfig: PathBuf::from(path),
                sim: None,
                _dir: dir,
            };
        }
        let kubeconfig = dir.path().join("kubeconfig");
        let sim = Command::new(env!("CARGO_BIN_EXE_depwatch"))
            .args(["sim", "--kubeconfig-out"])
            .arg(&kubeconfig)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("depwatch sim starts");
        let k = kubeconfig.clone();
        wait_for(
            "the simulated cluster's kubeconfig",
            Duration::from_secs(20),
            || async {
                std::fs::metadata(&k)
                    .ok()
                    .filter(|m| m.len() > 0)
                    .map(|_| ())
            },
        )
        .await;
        Cluster {
            kubeconfig,
            sim: Some(sim),
            _dir: dir,
        }
    }

    async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("config");
        kube::Client::try_from(config).expect("client")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut c) = self.sim.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A namespace of the test's own, with Deployments in it; deleted on `cleanup`.
struct Space {
    client: kube::Client,
    ns: String,
}

impl Space {
    async fn new(client: kube::Client, tag: &str) -> Space {
        let ns = format!(
            "depwatch-e2e-{tag}-{:06x}",
            rand::random::<u32>() & 0xff_ffff
        );
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .expect("create namespace");
        Space { client, ns }
    }

    async fn deployment(&self, name: &str, image: &str) {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"replicas": 1, "progressDeadlineSeconds": 120,
                     "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": name, "image": image}]}}}
        }))
        .expect("deployment");
        Api::<Deployment>::namespaced(self.client.clone(), &self.ns)
            .create(&PostParams::default(), &d)
            .await
            .expect("create deployment");
    }

    /// A StatefulSet (2 replicas, OrderedReady) or a DaemonSet running `image`.
    async fn workload(&self, kind: &str, name: &str, image: &str) {
        let template = json!({"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": image}]}});
        let mut spec = json!({"selector": {"matchLabels": {"app": name}}, "template": template});
        if kind == "statefulset" {
            spec["replicas"] = json!(2);
            spec["serviceName"] = json!(name);
        }
        let (prefix, plural) = common::daemon::workload_path(kind);
        let body = json!({"metadata": {"name": name}, "spec": spec});
        let req = http::Request::post(format!("{prefix}/namespaces/{}/{plural}", self.ns))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).expect("json"))
            .expect("request");
        self.client
            .request::<serde_json::Value>(req)
            .await
            .unwrap_or_else(|e| panic!("create {kind} {name}: {e}"));
    }

    /// A workload's status, as JSON.
    async fn workload_status(&self, kind: &str, name: &str) -> serde_json::Value {
        let (prefix, plural) = common::daemon::workload_path(kind);
        let req = http::Request::get(format!("{prefix}/namespaces/{}/{plural}/{name}", self.ns))
            .body(Vec::new())
            .expect("request");
        let w: serde_json::Value = self.client.request(req).await.expect("get workload");
        w["status"].clone()
    }

    async fn image(&self, name: &str) -> String {
        let d = Api::<Deployment>::namespaced(self.client.clone(), &self.ns)
            .get(name)
            .await
            .expect("get deployment");
        d.spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers.into_iter().next())
            .and_then(|c| c.image)
            .unwrap_or_default()
    }

    async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client)
            .delete(&self.ns, &DeleteParams::default())
            .await;
    }
}

/// `depwatch run` on `deps` against the cluster, bounded to the test's namespace.
fn daemon(cluster: &Cluster, deps: &Path, state: &Path, ns: &str) -> common::daemon::Daemon {
    let log = state.with_extension("log");
    let child = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["run", "--deps"])
        .arg(deps)
        .arg("--state-dir")
        .arg(state)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args([
            "--namespaces",
            ns,
            "--http-addr",
            "127.0.0.1:0",
            "--rollout-timeout",
            "4m",
        ])
        .env("NO_COLOR", "1")
        // registry.k8s.io may be out of reach of the machine running the tests (the cluster
        // pulls, not depwatch); the pre-flight has its own suite.
        .env("DEPWATCH_REGISTRY_CHECK", "off")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("depwatch run starts");
    common::daemon::Daemon::from_child(child, log)
}

async fn outcome(state: &Path, ns: &str, name: &str, want: &str, within: Duration) -> String {
    let key = depwatch::domain::ServiceKey::new(name, ns).expect("key");
    let state = state.to_path_buf();
    wait_for(&format!("{ns}/{name} to be {want}"), within, || {
        let state = state.clone();
        let key = key.clone();
        async move {
            // Read-only: the test never creates or migrates the daemon's record.
            let r = depwatch::store::Store::open_read_only(&state)
                .ok()?
                .service(&key)
                .await
                .ok()??;
            (r.status.as_str() == want).then_some(r.message)
        }
    })
    .await
}

/// Wait until the record says the service is healthy running `image`.
async fn healthy_with(state: &Path, ns: &str, name: &str, image: &str) {
    let key = depwatch::domain::ServiceKey::new(name, ns).expect("key");
    wait_for(
        &format!("{ns}/{name} healthy with {image}"),
        Duration::from_secs(240),
        || async {
            // Read-only: the test never creates or migrates the daemon's record.
            let r = depwatch::store::Store::open_read_only(state)
                .ok()?
                .service(&key)
                .await
                .ok()??;
            (r.status.as_str() == "succeeded" && r.deployed.to_string().contains(image))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_deploys_a_missing_tag_rolls_back_and_a_restart_redeploys_nothing() {
    let cluster = Cluster::start().await;
    let space = Space::new(cluster.client().await, "life").await;
    let ns = space.ns.clone();
    space.deployment("web", GOOD).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (deps, state) = (dir.path().join("deps"), dir.path().join("state"));
    std::fs::create_dir(&deps).expect("deps");
    let file = deps.join(format!("web_{ns}.dep"));
    std::fs::write(&file, format!("{GOOD}\n")).expect("write");
    let d = daemon(&cluster, &deps, &state, &ns);
    outcome(&state, &ns, "web", "succeeded", Duration::from_secs(240)).await;

    // A new version: patched and healthy.
    std::fs::write(&file, format!("{NEWER}\n")).expect("write");
    healthy_with(&state, &ns, "web", NEWER).await;
    assert_eq!(space.image("web").await, NEWER);

    // A tag that does not exist: failed with the pod's own reason, rolled back.
    std::fs::write(&file, format!("{MISSING}\n")).expect("write");
    let message = outcome(&state, &ns, "web", "rolled_back", Duration::from_secs(240)).await;
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "{message}"
    );
    assert_eq!(space.image("web").await, NEWER);
    d.stop();

    // A restart over the same files deploys nothing new.
    let before = depwatch::store::Store::open(&state)
        .expect("store")
        .history(None, 100)
        .await
        .expect("history")
        .len();
    let d = daemon(&cluster, &deps, &state, &ns);
    wait_for("the daemon to watch", Duration::from_secs(60), || async {
        let log = std::fs::read_to_string(state.with_extension("log")).ok()?;
        log.contains("watching for dependency file changes")
            .then_some(())
    })
    .await;
    // Ready (the start-up scan is done) with nothing queued or running: nothing was resubmitted.
    let http = reqwest::Client::new();
    let url = d.http_url();
    wait_for("ready and idle", Duration::from_secs(60), || async {
        let ready = http.get(format!("{url}/readyz")).send().await.ok()?;
        if !ready.status().is_success() {
            return None;
        }
        let m = common::get_metrics(&http, &url).await;
        (common::sample(&m, "depwatch_pending_deploys") == 0.0
            && common::sample(&m, "depwatch_running_deploys") == 0.0)
            .then_some(())
    })
    .await;
    // The pinned failed version is not retried; the history does not grow.
    let after = depwatch::store::Store::open(&state)
        .expect("store")
        .history(None, 100)
        .await
        .expect("history")
        .len();
    assert_eq!(after, before);
    assert_eq!(space.image("web").await, NEWER);
    d.stop();
    space.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_deployment_fails_with_the_closest_name_and_nothing_is_created() {
    let cluster = Cluster::start().await;
    let space = Space::new(cluster.client().await, "typo").await;
    let ns = space.ns.clone();
    space.deployment("payments", GOOD).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (deps, state) = (dir.path().join("deps"), dir.path().join("state"));
    std::fs::create_dir(&deps).expect("deps");
    std::fs::write(
        deps.join(format!("paymnets_{ns}.dep")),
        format!("{NEWER}\n"),
    )
    .expect("write");
    let d = daemon(&cluster, &deps, &state, &ns);
    let message = outcome(&state, &ns, "paymnets", "failed", Duration::from_secs(120)).await;
    assert!(message.contains("did you mean payments?"), "{message}");
    assert_eq!(space.image("payments").await, GOOD);
    d.stop();
    space.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_undo_and_a_paused_deployment_is_left_alone() {
    let cluster = Cluster::start().await;
    let space = Space::new(cluster.client().await, "undo").await;
    let ns = space.ns.clone();
    space.deployment("web", GOOD).await;
    space.deployment("held", GOOD).await;
    Api::<Deployment>::namespaced(space.client.clone(), &ns)
        .patch(
            "held",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .expect("pause");
    let dir = tempfile::tempdir().expect("tempdir");
    let (deps, state) = (dir.path().join("deps"), dir.path().join("state"));
    std::fs::create_dir(&deps).expect("deps");
    let file = deps.join(format!("web_{ns}.dep"));
    std::fs::write(&file, format!("# from CI\n{NEWER}\n")).expect("write");
    std::fs::write(deps.join(format!("held_{ns}.dep")), format!("{NEWER}\n")).expect("write");
    let d = daemon(&cluster, &deps, &state, &ns);
    outcome(&state, &ns, "web", "succeeded", Duration::from_secs(240)).await;
    let message = outcome(&state, &ns, "held", "paused", Duration::from_secs(120)).await;
    assert!(message.contains("kubectl rollout resume"), "{message}");
    assert_eq!(
        space.image("held").await,
        GOOD,
        "a paused Deployment is not patched"
    );

    // Undo: back to the images the cluster ran before, written in the file's own form.
    let service = format!("{ns}/web");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["rollback", &service, "--state-dir"])
        .arg(&state)
        .output()
        .expect("rollback runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).expect("file");
    assert!(text.ends_with(&format!("# from CI\n{GOOD}\n")), "{text}");
    healthy_with(&state, &ns, "web", GOOD).await;
    assert_eq!(space.image("web").await, GOOD);
    d.stop();
    space.cleanup().await;
}

/// A StatefulSet or DaemonSet: a new version deploys; a missing tag fails with the pod's reason
/// and is rolled back, and every pod runs the restored version again (for the StatefulSet, after
/// depwatch deleted the pod of the failed revision that held it).
async fn workload_lifecycle(kind: &str, tag: &str) {
    let cluster = Cluster::start().await;
    let space = Space::new(cluster.client().await, tag).await;
    let ns = space.ns.clone();
    space.workload(kind, "store", GOOD).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (deps, state) = (dir.path().join("deps"), dir.path().join("state"));
    std::fs::create_dir(&deps).expect("deps");
    let file = deps.join(format!("store_{ns}.dep"));
    std::fs::write(&file, format!("{NEWER}\n")).expect("write");
    let d = daemon(&cluster, &deps, &state, &ns);
    healthy_with(&state, &ns, "store", NEWER).await;

    std::fs::write(&file, format!("{MISSING}\n")).expect("write");
    let message = outcome(
        &state,
        &ns,
        "store",
        "rolled_back",
        Duration::from_secs(240),
    )
    .await;
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "{message}"
    );
    wait_for(
        &format!("every pod of {kind}/store back on {NEWER}"),
        Duration::from_secs(240),
        || async {
            let st = space.workload_status(kind, "store").await;
            let done = match kind {
                "statefulset" => {
                    st["readyReplicas"] == 2 && st["currentRevision"] == st["updateRevision"]
                }
                _ => {
                    st["updatedNumberScheduled"] == st["desiredNumberScheduled"]
                        && st["numberAvailable"] == st["desiredNumberScheduled"]
                }
            };
            done.then_some(())
        },
    )
    .await;
    let key = depwatch::domain::ServiceKey::new("store", &ns).expect("key");
    let record = depwatch::store::Store::open(&state)
        .expect("store")
        .service(&key)
        .await
        .expect("read")
        .expect("row");
    assert_eq!(record.kind.as_str(), kind);
    d.stop();
    space.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statefulset_deploys_and_a_missing_tag_is_rolled_back_by_force() {
    workload_lifecycle("statefulset", "sts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemonset_deploys_and_a_missing_tag_is_rolled_back() {
    workload_lifecycle("daemonset", "ds").await;
}
