//! Real kubectl against the simulated cluster.

mod common;

use std::time::Duration;

use common::{wait_for, Kubectl};
use depwatch::sim::{Sim, SimConfig};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: prod
spec:
  replicas: 3
  progressDeadlineSeconds: 5
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: example.com/web:1.0.0
"#;

/// A simulated cluster and kubectl pointed at it (the directory holds its kubeconfig).
async fn sim_and_kubectl() -> (Sim, tempfile::TempDir, Kubectl) {
    let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());
    (sim, dir, k)
}

/// [`sim_and_kubectl`] with namespace prod and the web Deployment applied.
async fn sim_with_web() -> (Sim, tempfile::TempDir, Kubectl) {
    let (sim, dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "ns", "prod"]).await;
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, DEPLOYMENT).expect("write manifest");
    k.ok(&["apply", "-f", manifest.to_str().expect("utf-8 path")])
        .await;
    (sim, dir, k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_a_deployment_through_rollout_failure_and_undo() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());

    // `create ns` is a typed create: kubectl sends it as protobuf.
    k.ok(&["create", "ns", "prod"]).await;
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, DEPLOYMENT).expect("write manifest");
    k.ok(&["apply", "-f", manifest.to_str().expect("utf-8 path")])
        .await;

    let table = wait_for(
        "READY 3/3 in kubectl get deploy",
        Duration::from_secs(20),
        || async {
            let out = k.ok(&["-n", "prod", "get", "deploy"]).await;
            out.lines()
                .any(|l| l.starts_with("web ") && l.contains(" 3/3 "))
                .then_some(out)
        },
    )
    .await;
    assert!(
        table.contains("UP-TO-DATE"),
        "server-side table columns: {table}"
    );

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "deploy/web",
        "web=example.com/web:1.1.0",
    ])
    .await;
    let out = k
        .run(&[
            "-n",
            "prod",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ])
        .await;
    assert_eq!(out.code, 0, "good image rolls out: {out:?}");
    assert!(out.stdout.contains("successfully rolled out"), "{out:?}");

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "deploy/web",
        "web=example.com/web:fail-pull",
    ])
    .await;
    let out = k
        .run(&[
            "-n",
            "prod",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ])
        .await;
    assert_eq!(out.code, 1, "bad image fails the rollout: {out:?}");
    assert!(
        out.stderr.contains("exceeded its progress deadline"),
        "{out:?}"
    );
    let pods = k.ok(&["-n", "prod", "get", "pods"]).await;
    assert!(
        pods.contains("ImagePullBackOff") || pods.contains("ErrImagePull"),
        "{pods}"
    );

    k.ok(&["-n", "prod", "rollout", "undo", "deploy/web"]).await;
    let out = k
        .run(&[
            "-n",
            "prod",
            "rollout",
            "status",
            "deploy/web",
            "--timeout=60s",
        ])
        .await;
    assert_eq!(out.code, 0, "undo rolls back to a healthy version: {out:?}");

    let json = k
        .ok(&["-n", "prod", "get", "deploy", "web", "-o", "json"])
        .await;
    let dep: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "example.com/web:1.1.0"
    );
    assert_eq!(dep["status"]["readyReplicas"], 3);

    k.ok(&["-n", "prod", "delete", "deploy", "web"]).await;
    let out = k.run(&["-n", "prod", "get", "deploy", "web"]).await;
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("NotFound") || out.stderr.contains("not found"),
        "{out:?}"
    );
    // Background cascading deletion removes the ReplicaSets and their pods.
    wait_for(
        "owned pods to be collected",
        Duration::from_secs(10),
        || async {
            let out = k.ok(&["-n", "prod", "get", "pods", "-o", "name"]).await;
            out.trim().is_empty().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_k_of_an_ordinary_application() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());
    let app = dir.path().join("app");
    std::fs::create_dir(&app).expect("mkdir");
    let files = [
        ("kustomization.yaml", "namespace: default\nresources:\n- sa.yaml\n- role.yaml\n- binding.yaml\n- cm.yaml\n- deploy.yaml\n"),
        ("sa.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: depwatch\n"),
        ("role.yaml", "apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata:\n  name: depwatch\nrules:\n- apiGroups: [apps]\n  resources: [deployments]\n  verbs: [get, list, watch, patch]\n"),
        ("binding.yaml", "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: depwatch\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: depwatch\nsubjects:\n- kind: ServiceAccount\n  name: depwatch\n"),
        ("cm.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: deps\ndata:\n  web_default.dep: \"1.0.0\"\n"),
        ("deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: depwatch\nspec:\n  selector:\n    matchLabels: {app: depwatch}\n  template:\n    metadata:\n      labels: {app: depwatch}\n    spec:\n      serviceAccountName: depwatch\n      containers:\n      - name: depwatch\n        image: example.com/depwatch:0.1.0\n"),
    ];
    for (name, text) in files {
        std::fs::write(app.join(name), text).expect("write");
    }
    let out = k.ok(&["apply", "-k", app.to_str().expect("utf-8")]).await;
    for kind in [
        "serviceaccount/depwatch",
        "role.rbac.authorization.k8s.io/depwatch",
        "rolebinding.rbac.authorization.k8s.io/depwatch",
        "configmap/deps",
        "deployment.apps/depwatch",
    ] {
        assert!(out.contains(&format!("{kind} created")), "{kind} in {out}");
    }
    // A second apply is a no-op patch of each object.
    let out = k.ok(&["apply", "-k", app.to_str().expect("utf-8")]).await;
    assert!(out.contains("configmap/deps unchanged"), "{out}");
    let cm = k
        .ok(&[
            "get",
            "cm",
            "deps",
            "-o",
            "jsonpath={.data.web_default\\.dep}",
        ])
        .await;
    assert_eq!(cm, "1.0.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_get_pages_through_a_long_list() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());
    k.ok(&["create", "ns", "paged"]).await;
    for i in 0..7 {
        k.ok(&["-n", "paged", "create", "configmap", &format!("cm{i}")])
            .await;
    }
    // kubectl asks for server-side Tables in pages; every page but the last carries `continue`.
    for args in [
        ["-n", "paged", "get", "cm", "--chunk-size=2", "--no-headers"],
        ["-n", "paged", "get", "cm", "--chunk-size=2", "-o=name"],
    ] {
        let out = k.ok(&args).await;
        let names: Vec<&str> = out.lines().filter(|l| l.contains("cm")).collect();
        assert_eq!(names.len(), 7, "{args:?} lists every ConfigMap: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_goes_through_the_scale_subresource() {
    let (_sim, _dir, k) = sim_with_web().await;
    // depwatch's advice for a Deployment at 0 replicas, followed as written.
    let out = k
        .ok(&["-n", "prod", "scale", "deployment/web", "--replicas=0"])
        .await;
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    wait_for("0/0", Duration::from_secs(20), || async {
        let out = k.ok(&["-n", "prod", "get", "deploy", "web"]).await;
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 0/0 "))
            .then_some(())
    })
    .await;
    k.ok(&["-n", "prod", "scale", "deployment/web", "--replicas=2"])
        .await;
    wait_for("2/2", Duration::from_secs(20), || async {
        let out = k.ok(&["-n", "prod", "get", "deploy", "web"]).await;
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 2/2 "))
            .then_some(())
    })
    .await;
    // The subresource itself, as autoscalers read it.
    let scale = k
        .ok(&[
            "get",
            "--raw",
            "/apis/apps/v1/namespaces/prod/deployments/web/scale",
        ])
        .await;
    let scale: serde_json::Value = serde_json::from_str(&scale).expect("json");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=web");
    // A negative count is refused as the API server refuses it.
    let bad = k
        .run(&["-n", "prod", "scale", "deployment/web", "--replicas=-1"])
        .await;
    assert_ne!(bad.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_is_answered() {
    let (_sim, _dir, k) = sim_and_kubectl().await;
    for args in [
        &["auth", "can-i", "patch", "deployments", "-n", "prod"][..],
        &["auth", "can-i", "get", "pods"][..],
        &["auth", "can-i", "get", "/healthz"][..],
    ] {
        let out = k.run(args).await;
        assert_eq!(out.code, 0, "{args:?}: {out:?}");
        assert_eq!(out.stdout.trim(), "yes", "{args:?}: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_auth_can_i_follows_the_rbac_a_test_binds_to_the_sims_user() {
    let (_sim, dir, k) = sim_and_kubectl().await;
    let rbac = dir.path().join("rbac.yaml");
    std::fs::write(
        &rbac,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\nmetadata: {name: deployer, namespace: prod}\n\
         rules: [{apiGroups: [apps], resources: [deployments], verbs: [get, patch]}]\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata: {name: deployer, namespace: prod}\n\
         roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: deployer}\n\
         subjects: [{kind: User, name: depwatch-sim}]\n",
    )
    .expect("write");
    k.ok(&["apply", "-f", rbac.to_str().expect("utf-8")]).await;
    for (args, want) in [
        (
            &["auth", "can-i", "patch", "deployments", "-n", "prod"][..],
            "yes",
        ),
        (
            &["auth", "can-i", "patch", "statefulsets", "-n", "prod"][..],
            "no",
        ),
        (
            &["auth", "can-i", "patch", "deployments", "-n", "qa"][..],
            "no",
        ),
    ] {
        let out = k.run(args).await;
        assert_eq!(out.stdout.trim(), want, "{args:?}: {out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_deployment_sends_protobuf_and_it_rolls_out() {
    let (_sim, _dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "ns", "prod"]).await;
    let out = k
        .ok(&[
            "-n",
            "prod",
            "create",
            "deployment",
            "web",
            "--image=example.com/web:1.0.0",
            "--replicas=2",
            "--port=8080",
        ])
        .await;
    assert!(out.contains("deployment.apps/web created"), "{out}");
    wait_for("2/2", Duration::from_secs(20), || async {
        let out = k.ok(&["-n", "prod", "get", "deploy", "web"]).await;
        out.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 2/2 "))
            .then_some(())
    })
    .await;
    let d: serde_json::Value = serde_json::from_str(
        &k.ok(&["-n", "prod", "get", "deploy", "web", "-o", "json"])
            .await,
    )
    .expect("json");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "example.com/web:1.0.0");
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(d["spec"]["selector"]["matchLabels"]["app"], "web");
}

// ---------------------------------------------------------------------------------------------
// Server-side dry runs (`--dry-run=server`, `dryRun=All`)

/// Assert that `kubectl get` of `what` in prod answers NotFound.
async fn assert_not_found(k: &Kubectl, what: &str) {
    let out = k.run(&["-n", "prod", "get", what]).await;
    assert_eq!(out.code, 1, "{what} must not exist: {out:?}");
    assert!(out.stderr.contains("NotFound"), "{what}: {out:?}");
}

/// The web Deployment's image and generation, as stored (only a write of the spec moves them).
async fn web_as_stored(k: &Kubectl) -> String {
    k.ok(&[
        "-n",
        "prod",
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image} {.metadata.generation}",
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_dry_run_server_of_a_new_deployment_creates_nothing() {
    let (_sim, dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "ns", "prod"]).await;
    let manifest = dir.path().join("web.yaml");
    std::fs::write(&manifest, DEPLOYMENT).expect("write manifest");
    let path = manifest.to_str().expect("utf-8 path");
    let out = k.ok(&["apply", "--dry-run=server", "-f", path]).await;
    assert!(
        out.contains("deployment.apps/web created (server dry run)"),
        "{out}"
    );
    assert_not_found(&k, "deploy/web").await;
    // Server-side apply's dry run creates nothing either.
    let out = k
        .ok(&["apply", "--server-side", "--dry-run=server", "-f", path])
        .await;
    assert!(out.contains("(server dry run)"), "{out}");
    assert_not_found(&k, "deploy/web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_dry_run_server_of_a_kustomization_creates_neither_object() {
    let (_sim, dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "ns", "prod"]).await;
    let app = dir.path().join("app");
    std::fs::create_dir(&app).expect("mkdir");
    let files = [
        (
            "kustomization.yaml",
            "namespace: prod\nresources:\n- cm.yaml\n- web.yaml\n",
        ),
        (
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\ndata:\n  level: info\n",
        ),
        ("web.yaml", DEPLOYMENT),
    ];
    for (name, text) in files {
        std::fs::write(app.join(name), text).expect("write");
    }
    let out = k
        .ok(&[
            "apply",
            "--dry-run=server",
            "-k",
            app.to_str().expect("utf-8"),
        ])
        .await;
    for what in ["configmap/settings", "deployment.apps/web"] {
        assert!(
            out.contains(&format!("{what} created (server dry run)")),
            "{what} in {out}"
        );
    }
    assert_not_found(&k, "configmap/settings").await;
    assert_not_found(&k, "deploy/web").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_set_image_and_apply_dry_run_server_leave_the_image_unchanged() {
    let (_sim, dir, k) = sim_with_web().await;
    assert_eq!(web_as_stored(&k).await, "example.com/web:1.0.0 1");
    let out = k
        .ok(&[
            "-n",
            "prod",
            "set",
            "image",
            "deploy/web",
            "web=example.com/web:2.0.0",
            "--dry-run=server",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .await;
    assert_eq!(out, "example.com/web:2.0.0", "answered as changed");
    let changed = dir.path().join("web-2.yaml");
    std::fs::write(&changed, DEPLOYMENT.replace("web:1.0.0", "web:2.0.0")).expect("write");
    let path = changed.to_str().expect("utf-8 path");
    let out = k.ok(&["apply", "--dry-run=server", "-f", path]).await;
    assert!(
        out.contains("deployment.apps/web configured (server dry run)"),
        "{out}"
    );
    k.ok(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        path,
    ])
    .await;
    k.ok(&[
        "-n",
        "prod",
        "scale",
        "deploy/web",
        "--replicas=5",
        "--dry-run=server",
    ])
    .await;
    assert_eq!(web_as_stored(&k).await, "example.com/web:1.0.0 1");
    let replicas = k
        .ok(&[
            "-n",
            "prod",
            "get",
            "deploy",
            "web",
            "-o",
            "jsonpath={.spec.replicas}",
        ])
        .await;
    assert_eq!(replicas, "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_dry_run_server_deletes_nothing() {
    let (_sim, _dir, k) = sim_with_web().await;
    let out = k
        .ok(&["-n", "prod", "delete", "deploy", "web", "--dry-run=server"])
        .await;
    assert!(
        out.contains("deployment.apps \"web\" deleted (server dry run)"),
        "{out}"
    );
    k.ok(&["-n", "prod", "get", "deploy", "web"]).await;
    let out = k.ok(&["delete", "ns", "prod", "--dry-run=server"]).await;
    assert!(out.contains("(server dry run)"), "{out}");
    k.ok(&["get", "ns", "prod"]).await;
    k.ok(&["-n", "prod", "get", "deploy", "web"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_dry_run_server_prints_the_object_and_stores_nothing() {
    let (_sim, _dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "ns", "prod"]).await;
    // A typed create: kubectl sends it as protobuf, with dryRun=All.
    let out = k
        .ok(&[
            "-n",
            "prod",
            "create",
            "deployment",
            "web",
            "--image=example.com/web:1.0.0",
            "--dry-run=server",
            "-o",
            "json",
        ])
        .await;
    let d: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(d["metadata"]["name"], "web");
    assert!(d["metadata"]["uid"].is_string(), "answered as created: {d}");
    assert_eq!(d["spec"]["replicas"], 1, "defaulted as created: {d}");
    assert_eq!(
        d["spec"]["template"]["spec"]["containers"][0]["image"],
        "example.com/web:1.0.0"
    );
    assert_not_found(&k, "deploy/web").await;
    let out = k.ok(&["create", "ns", "staging", "--dry-run=server"]).await;
    assert!(
        out.contains("namespace/staging created (server dry run)"),
        "{out}"
    );
    let out = k.run(&["get", "ns", "staging"]).await;
    assert_eq!(out.code, 1, "{out:?}");
}

// ---------------------------------------------------------------------------------------------
// StatefulSets and DaemonSets

const STATEFULSET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: prod
spec:
  serviceName: db
  replicas: 3
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        image: example.com/db:1.0.0
"#;

const DAEMONSET: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
  namespace: prod
spec:
  selector:
    matchLabels: {app: agent}
  template:
    metadata:
      labels: {app: agent}
    spec:
      containers:
      - name: agent
        image: example.com/agent:1.0.0
"#;

/// A sim with `nodes` nodes, namespace prod and kubectl; pods are ready after 100 ms.
async fn sim_with_prod(nodes: usize) -> (Sim, tempfile::TempDir, Kubectl) {
    let sim = Sim::start(SimConfig {
        ready_delay: Duration::from_millis(100),
        nodes,
        ..SimConfig::default()
    })
    .await
    .expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());
    k.ok(&["create", "ns", "prod"]).await;
    (sim, dir, k)
}

/// `kubectl apply -f` of a manifest, with `edits` (from, to) made to its text first.
async fn apply(k: &Kubectl, dir: &std::path::Path, manifest: &str, edits: &[(&str, &str)]) {
    let mut text = manifest.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "{from} in the manifest");
        text = text.replacen(from, to, 1);
    }
    let path = dir.join(format!("m{}.yaml", rand_suffix()));
    std::fs::write(&path, text).expect("write manifest");
    k.ok(&["apply", "-f", path.to_str().expect("utf-8 path")])
        .await;
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// `kubectl get … -o json`, parsed.
async fn get_json(k: &Kubectl, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&k.ok(&all).await).expect("kubectl prints JSON")
}

/// The pods of namespace prod matching `selector`, by name: (name, image, revision label,
/// ready, waiting reason).
async fn pods(k: &Kubectl, selector: &str) -> Vec<(String, String, String, bool, String)> {
    let list = get_json(k, &["-n", "prod", "get", "pods", "-l", selector]).await;
    let mut out: Vec<_> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| {
            let cs = &p["status"]["containerStatuses"][0];
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["labels"]["controller-revision-hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                cs["ready"] == true,
                cs["state"]["waiting"]["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

async fn rollout_status(k: &Kubectl, what: &str, timeout: &str) -> common::Output {
    k.run(&[
        "-n",
        "prod",
        "rollout",
        "status",
        what,
        &format!("--timeout={timeout}"),
    ])
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rolls_out_undoes_restarts_and_scales_a_statefulset() {
    let (sim, dir, k) = sim_with_prod(3).await;
    apply(&k, dir.path(), STATEFULSET, &[]).await;
    let out = rollout_status(&k, "statefulset/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    // The API server defaults rollingUpdate.partition to 0, so kubectl reports a partitioned
    // roll out, as it does against a real cluster.
    assert!(
        out.stdout
            .contains("partitioned roll out complete: 3 new pods have been updated"),
        "{out:?}"
    );
    let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
    let rev1 = sts["status"]["currentRevision"]
        .as_str()
        .expect("currentRevision")
        .to_string();
    assert!(rev1.starts_with("db-"), "{sts}");
    assert_eq!(sts["status"]["updateRevision"], rev1.as_str());
    assert_eq!(sts["status"]["readyReplicas"], 3);
    assert_eq!(sts["status"]["availableReplicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "OrderedReady");
    let ps = pods(&k, "app=db").await;
    let names: Vec<&str> = ps.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["db-0", "db-1", "db-2"]);
    assert!(ps.iter().all(|p| p.2 == rev1 && p.3), "{ps:?}");
    let table = k.ok(&["-n", "prod", "get", "sts"]).await;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("db ") && l.contains(" 3/3 ")),
        "{table}"
    );

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "sts/db",
        "db=example.com/db:1.1.0",
    ])
    .await;
    let out = rollout_status(&k, "statefulset/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=db").await;
    assert!(ps.iter().all(|p| p.1 == "example.com/db:1.1.0"), "{ps:?}");
    let history = k
        .ok(&["-n", "prod", "rollout", "history", "statefulset/db"])
        .await;
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    assert_eq!(revisions, ["1", "2"], "{history}");
    let one = k
        .ok(&[
            "-n",
            "prod",
            "rollout",
            "history",
            "statefulset/db",
            "--revision=1",
        ])
        .await;
    assert!(one.contains("example.com/db:1.0.0"), "{one}");

    // kubectl reads the ControllerRevisions and sends revision 1's data back as a strategic
    // merge patch; the controller reuses revision 1's ControllerRevision as revision 3.
    let out = k
        .ok(&["-n", "prod", "rollout", "undo", "statefulset/db"])
        .await;
    assert!(out.contains("rolled back"), "{out}");
    let out = rollout_status(&k, "statefulset/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=db").await;
    assert!(
        ps.iter()
            .all(|p| p.1 == "example.com/db:1.0.0" && p.2 == rev1),
        "{ps:?}"
    );
    let crs = get_json(
        &k,
        &["-n", "prod", "get", "controllerrevisions", "-l", "app=db"],
    )
    .await;
    let mut numbers: Vec<(String, i64)> = crs["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| {
            (
                r["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                r["revision"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    numbers.sort_by_key(|(_, n)| *n);
    assert_eq!(numbers.len(), 2, "{crs}");
    assert_eq!(numbers[1], (rev1.clone(), 3));

    k.ok(&["-n", "prod", "rollout", "restart", "statefulset/db"])
        .await;
    let out = rollout_status(&k, "statefulset/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
    assert!(sts["spec"]["template"]["metadata"]["annotations"]
        ["kubectl.kubernetes.io/restartedAt"]
        .is_string());
    assert_ne!(sts["status"]["currentRevision"], rev1.as_str());

    let out = k
        .ok(&["-n", "prod", "scale", "statefulset/db", "--replicas=1"])
        .await;
    assert!(out.contains("statefulset.apps/db scaled"), "{out}");
    wait_for("scaled down to db-0", Duration::from_secs(20), || async {
        let ps = pods(&k, "app=db").await;
        (ps.len() == 1 && ps[0].0 == "db-0").then_some(())
    })
    .await;
    k.ok(&["-n", "prod", "scale", "statefulset/db", "--replicas=2"])
        .await;
    let out = rollout_status(&k, "statefulset/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let scale = k
        .ok(&[
            "get",
            "--raw",
            "/apis/apps/v1/namespaces/prod/statefulsets/db/scale",
        ])
        .await;
    let scale: serde_json::Value = serde_json::from_str(&scale).expect("json");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["replicas"], 2);

    // Deleting the StatefulSet collects its pods and ControllerRevisions.
    k.ok(&["-n", "prod", "delete", "sts", "db"]).await;
    wait_for(
        "pods and revisions collected",
        Duration::from_secs(20),
        || async {
            let pods = k.ok(&["-n", "prod", "get", "pods", "-o", "name"]).await;
            let crs = k
                .ok(&["-n", "prod", "get", "controllerrevisions", "-o", "name"])
                .await;
            (pods.trim().is_empty() && crs.trim().is_empty()).then_some(())
        },
    )
    .await;
    drop(sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordered_ready_statefulset_stays_stuck_on_a_crashing_pod_until_it_is_deleted() {
    let (_sim, dir, k) = sim_with_prod(3).await;
    apply(&k, dir.path(), STATEFULSET, &[]).await;
    assert_eq!(rollout_status(&k, "sts/db", "60s").await.code, 0);
    let good = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await["status"]["currentRevision"]
        .as_str()
        .expect("revision")
        .to_string();

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "sts/db",
        "db=example.com/db:crash",
    ])
    .await;
    // The highest ordinal goes first, and crash-loops.
    wait_for("db-2 to crash-loop", Duration::from_secs(20), || async {
        let ps = pods(&k, "app=db").await;
        (ps.len() == 3 && ps[2].1 == "example.com/db:crash" && ps[2].4 == "CrashLoopBackOff")
            .then_some(())
    })
    .await;
    let ps = pods(&k, "app=db").await;
    assert!(
        ps[..2].iter().all(|p| p.2 == good && p.3),
        "the update stops at db-2: {ps:?}"
    );
    // Its container started once, so the pod is Running, as a kubelet reports a crash loop.
    let db2 = get_json(&k, &["-n", "prod", "get", "pod", "db-2"]).await;
    assert_eq!(db2["status"]["phase"], "Running", "{db2}");

    // Revert the template. The controller sees it (the update revision is the good one again)
    // but OrderedReady waits for db-2 to be Running and Ready, which it never will be.
    k.ok(&["-n", "prod", "rollout", "undo", "sts/db"]).await;
    wait_for(
        "the revert to be observed",
        Duration::from_secs(20),
        || async {
            let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
            (sts["status"]["observedGeneration"] == sts["metadata"]["generation"]
                && sts["status"]["updateRevision"] == good.as_str())
            .then_some(sts)
        },
    )
    .await;
    let out = rollout_status(&k, "sts/db", "3s").await;
    assert_ne!(out.code, 0, "still stuck: {out:?}");
    assert!(
        out.stdout.contains("Waiting for 1 pods to be ready"),
        "{out:?}"
    );
    let ps = pods(&k, "app=db").await;
    assert_eq!(
        ps[2].1, "example.com/db:crash",
        "db-2 is left as it is: {ps:?}"
    );
    let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
    assert_eq!(sts["status"]["readyReplicas"], 2);
    assert_eq!(sts["status"]["updatedReplicas"], 2);

    // The forced rollback: delete the broken pod; it comes back at the good revision.
    k.ok(&["-n", "prod", "delete", "pod", "db-2"]).await;
    let out = rollout_status(&k, "sts/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=db").await;
    assert!(
        ps.iter()
            .all(|p| p.1 == "example.com/db:1.0.0" && p.2 == good && p.3),
        "{ps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parallel_statefulset_starts_every_pod_at_once() {
    let (_sim, dir, k) = sim_with_prod(3).await;
    // Pods that never get ready: OrderedReady would stop at db-0.
    apply(
        &k,
        dir.path(),
        STATEFULSET,
        &[
            (
                "  serviceName: db",
                "  serviceName: db\n  podManagementPolicy: Parallel",
            ),
            ("db:1.0.0", "db:hang"),
        ],
    )
    .await;
    wait_for(
        "three pods running, none ready",
        Duration::from_secs(20),
        || async {
            let ps = pods(&k, "app=db").await;
            (ps.len() == 3 && ps.iter().all(|p| !p.3)).then_some(())
        },
    )
    .await;
    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "sts/db",
        "db=example.com/db:1.0.1",
    ])
    .await;
    let out = rollout_status(&k, "sts/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=db").await;
    assert!(
        ps.iter().all(|p| p.1 == "example.com/db:1.0.1" && p.3),
        "{ps:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_updates_only_the_ordinals_at_or_above_it() {
    let (_sim, dir, k) = sim_with_prod(3).await;
    apply(&k, dir.path(), STATEFULSET, &[]).await;
    assert_eq!(rollout_status(&k, "sts/db", "60s").await.code, 0);
    k.ok(&[
        "-n",
        "prod",
        "patch",
        "sts",
        "db",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":2}}}}"#,
    ])
    .await;
    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "sts/db",
        "db=example.com/db:1.1.0",
    ])
    .await;
    let out = rollout_status(&k, "sts/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("partitioned roll out complete: 1 new pods have been updated"),
        "{out:?}"
    );
    let ps = pods(&k, "app=db").await;
    let images: Vec<&str> = ps.iter().map(|p| p.1.as_str()).collect();
    assert_eq!(
        images,
        [
            "example.com/db:1.0.0",
            "example.com/db:1.0.0",
            "example.com/db:1.1.0"
        ]
    );
    let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
    assert_ne!(
        sts["status"]["currentRevision"],
        sts["status"]["updateRevision"]
    );
    assert_eq!(sts["status"]["currentReplicas"], 2);
    assert_eq!(sts["status"]["updatedReplicas"], 1);

    // Lowering the partition lets the rest follow; then the update revision becomes current.
    k.ok(&[
        "-n",
        "prod",
        "patch",
        "sts",
        "db",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ])
    .await;
    let out = rollout_status(&k, "sts/db", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    wait_for(
        "current revision = update revision",
        Duration::from_secs(20),
        || async {
            let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
            (sts["status"]["currentRevision"] == sts["status"]["updateRevision"]
                && sts["status"]["currentReplicas"] == 3)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_delete_statefulset_updates_a_pod_only_when_it_is_deleted() {
    let (_sim, dir, k) = sim_with_prod(3).await;
    apply(
        &k,
        dir.path(),
        STATEFULSET,
        &[(
            "  serviceName: db",
            "  serviceName: db\n  updateStrategy: {type: OnDelete}",
        )],
    )
    .await;
    wait_for("three ready pods", Duration::from_secs(20), || async {
        let ps = pods(&k, "app=db").await;
        (ps.len() == 3 && ps.iter().all(|p| p.3)).then_some(())
    })
    .await;
    // kubectl refuses to follow anything but RollingUpdate, as against a real cluster.
    let out = rollout_status(&k, "sts/db", "5s").await;
    assert_ne!(out.code, 0);
    assert!(
        out.stderr
            .contains("rollout status is only available for RollingUpdate strategy type"),
        "{out:?}"
    );

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "sts/db",
        "db=example.com/db:1.1.0",
    ])
    .await;
    let sts = wait_for(
        "the new revision to be observed",
        Duration::from_secs(20),
        || async {
            let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
            (sts["status"]["observedGeneration"] == sts["metadata"]["generation"]
                && sts["status"]["updateRevision"] != sts["status"]["currentRevision"])
                .then_some(sts)
        },
    )
    .await;
    let new_rev = sts["status"]["updateRevision"]
        .as_str()
        .expect("rev")
        .to_string();
    let ps = pods(&k, "app=db").await;
    assert!(ps.iter().all(|p| p.1 == "example.com/db:1.0.0"), "{ps:?}");

    k.ok(&["-n", "prod", "delete", "pod", "db-1"]).await;
    wait_for(
        "db-1 back at the new revision",
        Duration::from_secs(20),
        || async {
            let ps = pods(&k, "app=db").await;
            (ps.len() == 3 && ps[1].1 == "example.com/db:1.1.0" && ps[1].2 == new_rev && ps[1].3)
                .then_some(())
        },
    )
    .await;
    let ps = pods(&k, "app=db").await;
    assert_eq!(ps[0].1, "example.com/db:1.0.0");
    assert_eq!(ps[2].1, "example.com/db:1.0.0");
    wait_for("updatedReplicas 1", Duration::from_secs(20), || async {
        let sts = get_json(&k, &["-n", "prod", "get", "sts", "db"]).await;
        (sts["status"]["updatedReplicas"] == 1 && sts["status"]["readyReplicas"] == 3).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_rolls_out_undoes_and_restarts_a_daemonset_over_the_nodes() {
    let (_sim, dir, k) = sim_with_prod(4).await;
    let nodes = k.ok(&["get", "nodes"]).await;
    let ready: Vec<&str> = nodes
        .lines()
        .filter(|l| l.contains(" Ready "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ready, ["node-0", "node-1", "node-2", "node-3"], "{nodes}");

    apply(&k, dir.path(), DAEMONSET, &[]).await;
    let out = rollout_status(&k, "daemonset/agent", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("daemon set \"agent\" successfully rolled out"),
        "{out:?}"
    );
    let list = get_json(&k, &["-n", "prod", "get", "pods", "-l", "app=agent"]).await;
    let mut on: Vec<&str> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap_or_default())
        .collect();
    on.sort();
    assert_eq!(
        on,
        ["node-0", "node-1", "node-2", "node-3"],
        "one pod per node"
    );
    let ds = get_json(&k, &["-n", "prod", "get", "ds", "agent"]).await;
    for (field, want) in [
        ("desiredNumberScheduled", 4),
        ("currentNumberScheduled", 4),
        ("numberReady", 4),
        ("numberAvailable", 4),
        ("updatedNumberScheduled", 4),
        ("numberMisscheduled", 0),
    ] {
        assert_eq!(ds["status"][field], want, "{field}: {ds}");
    }
    let table = k.ok(&["-n", "prod", "get", "ds"]).await;
    assert!(table.contains("UP-TO-DATE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(6).collect::<Vec<_>>()
                == ["agent", "4", "4", "4", "4", "4"]),
        "{table}"
    );

    k.ok(&[
        "-n",
        "prod",
        "set",
        "image",
        "ds/agent",
        "agent=example.com/agent:1.1.0",
    ])
    .await;
    let out = rollout_status(&k, "ds/agent", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=agent").await;
    assert_eq!(ps.len(), 4);
    assert!(
        ps.iter().all(|p| p.1 == "example.com/agent:1.1.0" && p.3),
        "{ps:?}"
    );
    let history = k
        .ok(&["-n", "prod", "rollout", "history", "ds/agent"])
        .await;
    assert!(
        history.lines().any(|l| l.starts_with('1')) && history.lines().any(|l| l.starts_with('2')),
        "{history}"
    );

    let out = k.ok(&["-n", "prod", "rollout", "undo", "ds/agent"]).await;
    assert!(out.contains("rolled back"), "{out}");
    let out = rollout_status(&k, "ds/agent", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ps = pods(&k, "app=agent").await;
    assert!(
        ps.iter().all(|p| p.1 == "example.com/agent:1.0.0"),
        "{ps:?}"
    );

    k.ok(&["-n", "prod", "rollout", "restart", "ds/agent"])
        .await;
    let out = rollout_status(&k, "ds/agent", "60s").await;
    assert_eq!(out.code, 0, "{out:?}");
    let ds = get_json(&k, &["-n", "prod", "get", "ds", "agent"]).await;
    assert_eq!(
        ds["metadata"]["annotations"]["deprecated.daemonset.template.generation"],
        "4"
    );

    k.ok(&["-n", "prod", "delete", "ds", "agent"]).await;
    wait_for("daemon pods collected", Duration::from_secs(20), || async {
        pods(&k, "app=agent").await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_pull_failures_show_in_pod_status_and_a_selector_matching_no_node_runs_nothing() {
    let (_sim, dir, k) = sim_with_prod(2).await;
    apply(
        &k,
        dir.path(),
        DAEMONSET,
        &[("agent:1.0.0", "agent:fail-pull")],
    )
    .await;
    wait_for(
        "ImagePullBackOff on both nodes",
        Duration::from_secs(20),
        || async {
            let ps = pods(&k, "app=agent").await;
            (ps.len() == 2 && ps.iter().all(|p| p.4 == "ImagePullBackOff")).then_some(())
        },
    )
    .await;
    let table = k.ok(&["-n", "prod", "get", "pods", "-o", "wide"]).await;
    assert!(table.contains("ImagePullBackOff"), "{table}");
    assert!(
        table.contains("node-0") && table.contains("node-1"),
        "{table}"
    );
    let ds = get_json(&k, &["-n", "prod", "get", "ds", "agent"]).await;
    assert_eq!(ds["status"]["numberUnavailable"], 2, "{ds}");
    assert_eq!(ds["status"]["numberReady"], 0, "{ds}");
    let out = rollout_status(&k, "ds/agent", "2s").await;
    assert_ne!(out.code, 0, "{out:?}");

    apply(
        &k,
        dir.path(),
        DAEMONSET,
        &[
            ("name: agent\n  namespace", "name: ssd\n  namespace"),
            (
                "    spec:\n",
                "    spec:\n      nodeSelector: {disktype: ssd}\n",
            ),
        ],
    )
    .await;
    let ds = wait_for("ssd observed", Duration::from_secs(20), || async {
        let ds = get_json(&k, &["-n", "prod", "get", "ds", "ssd"]).await;
        (ds["status"]["observedGeneration"] == 1).then_some(ds)
    })
    .await;
    assert_eq!(ds["status"]["desiredNumberScheduled"], 0, "{ds}");
    assert_eq!(ds["status"]["currentNumberScheduled"], 0, "{ds}");
    let out = rollout_status(&k, "ds/ssd", "20s").await;
    assert_eq!(out.code, 0, "nothing to roll out: {out:?}");

    // A node gaining the label gets a pod.
    k.ok(&["label", "node", "node-1", "disktype=ssd"]).await;
    wait_for("a pod on node-1", Duration::from_secs(20), || async {
        let list = get_json(&k, &["-n", "prod", "get", "pods", "-l", "app=agent"]).await;
        list["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|p| {
                p["metadata"]["ownerReferences"][0]["name"] == "ssd"
                    && p["spec"]["nodeName"] == "node-1"
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn depwatch_sim_nodes_sets_the_number_of_nodes() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "sim",
            "--addr",
            "127.0.0.1:0",
            "--nodes",
            "2",
            "--kubeconfig-out",
        ])
        .arg(&kc)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("depwatch sim starts");
    // Kept open until the sim is stopped, so its later lines never meet a closed pipe.
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("address printed");
    let k = Kubectl::new(
        dir.path(),
        &std::fs::read_to_string(&kc).expect("kubeconfig written"),
    );
    let out = k.ok(&["get", "nodes", "-o", "name"]).await;
    child.kill().expect("stop the sim");
    let _ = child.wait();
    drop(stdout);
    assert_eq!(out.trim(), "node/node-0\nnode/node-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_create_cronjob_and_job_send_protobuf_and_are_stored() {
    let (_sim, _dir, k) = sim_and_kubectl().await;
    k.ok(&["create", "namespace", "jobs"]).await;
    k.ok(&[
        "-n",
        "jobs",
        "create",
        "cronjob",
        "report",
        "--image=example.com/report:1.0",
        "--schedule=*/5 * * * *",
    ])
    .await;
    k.ok(&[
        "-n",
        "jobs",
        "create",
        "job",
        "once",
        "--image=example.com/once:1.0",
    ])
    .await;
    let cj: serde_json::Value = serde_json::from_str(
        &k.ok(&["-n", "jobs", "get", "cronjob", "report", "-o", "json"])
            .await,
    )
    .expect("json");
    assert_eq!(cj["spec"]["schedule"], "*/5 * * * *");
    let pod = &cj["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "example.com/report:1.0");
    assert_eq!(pod["restartPolicy"], "OnFailure");
    let job: serde_json::Value = serde_json::from_str(
        &k.ok(&["-n", "jobs", "get", "job", "once", "-o", "json"])
            .await,
    )
    .expect("json");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["image"],
        "example.com/once:1.0"
    );
    let listed = k.ok(&["-n", "jobs", "get", "cronjobs"]).await;
    assert!(listed.contains("report"), "{listed}");
}
