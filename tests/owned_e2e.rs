//! Workloads another engine owns (Argo CD, Flux, Helm): a file for one fails at plan with the
//! owner named and nothing patched, unless `--allow-owned` says to patch anyway.

mod common;

use std::time::Duration;

use common::daemon::Env;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

async fn owned_deployment(
    env: &Env,
    name: &str,
    labels: serde_json::Value,
    annotations: serde_json::Value,
) {
    let api: Api<Deployment> = Api::namespaced(env.client.clone(), "prod");
    let mut labels = labels;
    labels["app"] = json!(name);
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "annotations": annotations},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": name, "image": format!("r.example/{name}:1.0")}]}}}
    }))
    .expect("deployment");
    api.create(&PostParams::default(), &d)
        .await
        .expect("create");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_another_engine_owns_is_not_patched_unless_allowed() {
    let env = Env::new(SimConfig::default()).await;
    // The namespace, through the helper; then two Deployments with an owner's marks.
    env.deployment("prod", "plain", &[("plain", "r.example/plain:1.0")], 1)
        .await;
    owned_deployment(
        &env,
        "shop",
        json!({}),
        json!({"argocd.argoproj.io/tracking-id": "shop-prod:apps/Deployment:prod/shop"}),
    )
    .await;
    owned_deployment(
        &env,
        "cart",
        json!({"app.kubernetes.io/managed-by": "Helm"}),
        json!({"meta.helm.sh/release-name": "cart"}),
    )
    .await;
    // A tracking id copied from another object: Argo CD ignores it, and so does depwatch.
    owned_deployment(
        &env,
        "copy",
        json!({}),
        json!({"argocd.argoproj.io/tracking-id": "shop-prod:apps/Deployment:prod/shop"}),
    )
    .await;
    // A StatefulSet Flux owns: refused, and recorded as the StatefulSet it is.
    env.workload(
        "statefulset",
        "prod",
        "db",
        &[("db", "r.example/db:1.0")],
        json!({"replicas": 1}),
    )
    .await;
    let sts: Api<k8s_openapi::api::apps::v1::StatefulSet> =
        Api::namespaced(env.client.clone(), "prod");
    let marks = json!({"metadata": {"labels": {"kustomize.toolkit.fluxcd.io/name": "apps"}}});
    sts.patch("db", &PatchParams::default(), &Patch::Merge(&marks))
        .await
        .expect("label");
    env.wait_ready("prod", "shop").await;
    env.write_dep("shop_prod.dep", "1.1\n");
    env.write_dep("cart_prod.dep", "1.1\n");
    env.write_dep("copy_prod.dep", "1.1\n");
    env.write_dep("db_prod.dep", "1.1\n");
    let daemon = env.daemon(&[]).await;
    let store = env.store();
    env.wait_image("prod", "copy", "r.example/copy:1.1").await;
    let db = ServiceKey::new("db", "prod").expect("key");
    let r = wait_for("db refused", Duration::from_secs(30), || async {
        let r = store.service(&db).await.ok()??;
        (r.status == ServiceStatus::Failed).then_some(r)
    })
    .await;
    assert!(r.message.contains("Flux Kustomization apps"), "{r:?}");
    assert_eq!(
        r.kind,
        depwatch::domain::WorkloadKind::StatefulSet,
        "a refused StatefulSet is recorded as one: {r:?}"
    );
    for (name, owner) in [
        ("shop", "Argo CD application shop-prod"),
        ("cart", "Helm release cart"),
    ] {
        let key = ServiceKey::new(name, "prod").expect("key");
        let r = wait_for(
            &format!("{key} refused"),
            Duration::from_secs(30),
            || async {
                let r = store.service(&key).await.ok()??;
                (r.status == ServiceStatus::Failed).then_some(r)
            },
        )
        .await;
        assert!(r.message.contains(owner), "{r:?}");
        assert!(r.message.contains("--allow-owned"), "{r:?}");
        assert_eq!(env.patches("prod", name), 0, "nothing patched");
    }
    daemon.stop();
    // Allowed: patched, with a warning naming the owner.
    env.write_dep("shop_prod.dep", "1.2\n");
    let daemon = env.daemon(&["--allow-owned"]).await;
    env.wait_image("prod", "shop", "r.example/shop:1.2").await;
    assert!(
        daemon.log_text().contains("Argo CD application shop-prod"),
        "{}",
        daemon.log_text()
    );
}
