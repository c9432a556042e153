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
