//! The `kube` crate against the simulated cluster: watches through timeouts and expiry, the
//! four patch types, server-side-apply conflicts, leader election, fault injection, restarts.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{audit_count, wait_for};
use depwatch::sim::{Sim, SimConfig};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::ResourceExt;
use serde_json::json;

fn deployment(name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [{"name": "patch-demo-ctr", "image": "nginx:1.25"}],
                    "tolerations": [{"effect": "NoSchedule", "key": "dedicated", "value": "test-team"}]
                }
            }
        }
    }))
    .expect("valid deployment")
}

fn images(d: &Deployment) -> Vec<(String, String)> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .map(|s| {
            s.containers
                .iter()
                .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_every_change_through_watch_timeouts_and_410() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let sim = Sim::start(SimConfig {
        watch_timeout: Some(Duration::from_secs(1)),
        audit_log: Some(audit.clone()),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let client = sim.client().expect("client");
    let api: Api<Deployment> = Api::namespaced(client, "default");
    api.create(&PostParams::default(), &deployment("watched"))
        .await
        .expect("create");

    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    for streaming in [false, true] {
        let seen = seen.clone();
        let mut config = watcher::Config::default().fields("metadata.name=watched");
        if streaming {
            config = config.streaming_lists();
        }
        let stream = watcher(api.clone(), config)
            .default_backoff()
            .applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                if let Ok(d) = item {
                    if let Some(step) = d.metadata.annotations.and_then(|a| a.get("step").cloned())
                    {
                        let tag = if streaming { "s" } else { "l" };
                        seen.lock().expect("lock").insert(format!("{tag}{step}"));
                    }
                }
            }
        });
    }

    let watches = |a: &std::path::Path| audit_count(a, |l| l["verb"] == "watch");
    let lists = |a: &std::path::Path| {
        audit_count(a, |l| {
            l["verb"] == "get" && l["path"] == "/apis/apps/v1/namespaces/default/deployments"
        })
    };
    for step in 1..=5 {
        if step == 3 {
            // Force 410 Expired on the next resume: both watchers must relist.
            let streamed = |a: &std::path::Path| {
                audit_count(a, |l| {
                    l["verb"] == "watch"
                        && l["query"]
                            .as_str()
                            .is_some_and(|q| q.contains("sendInitialEvents=true"))
                })
            };
            let (lists_before, streamed_before) = (lists(&audit), streamed(&audit));
            sim.compact();
            wait_for(
                "both watchers to start over after 410 Expired",
                Duration::from_secs(15),
                || async {
                    (lists(&audit) > lists_before && streamed(&audit) > streamed_before)
                        .then_some(())
                },
            )
            .await;
        } else {
            // Let at least one watch end at --watch-timeout and be resumed.
            let before = watches(&audit);
            wait_for("watches to be resumed", Duration::from_secs(15), || async {
                (watches(&audit) >= before + 2).then_some(())
            })
            .await;
        }
        api.patch(
            "watched",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"step": step.to_string()}}})),
        )
        .await
        .expect("patch");
        wait_for(
            &format!("both watchers to see step {step}"),
            Duration::from_secs(15),
            || async {
                let s = seen.lock().expect("lock");
                (s.contains(&format!("l{step}")) && s.contains(&format!("s{step}"))).then_some(())
            },
        )
        .await;
    }
    let expired = std::fs::read_to_string(&audit).expect("audit");
    assert!(
        expired.contains("\"verb\":\"watch\""),
        "watches are audited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_types_behave_like_the_api_server() {
    // Cases from the Kubernetes task "Update API Objects in Place Using kubectl patch".
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let api: Api<Deployment> = Api::namespaced(sim.client().expect("client"), "default");
    api.create(&PostParams::default(), &deployment("patch-demo"))
        .await
        .expect("create");
    let pp = PatchParams::default();

    // Strategic merge: containers merge by name, so the Deployment has two containers.
    let d = api
        .patch(
            "patch-demo",
            &pp,
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "patch-demo-ctr-2", "image": "redis"}]}}}})),
        )
        .await
        .expect("strategic");
    assert_eq!(
        images(&d),
        vec![
            ("patch-demo-ctr".into(), "nginx:1.25".into()),
            ("patch-demo-ctr-2".into(), "redis".into())
        ]
    );
    let gen_after_first = d.metadata.generation;

    // Strategic merge: tolerations have no merge key, so the list is replaced.
    let d = api
        .patch(
            "patch-demo",
            &pp,
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"tolerations": [
            {"effect": "NoSchedule", "key": "disktype", "value": "ssd"}]}}}})),
        )
        .await
        .expect("strategic tolerations");
    let tol = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.tolerations.clone())
        .expect("tolerations");
    assert_eq!(tol.len(), 1);
    assert_eq!(tol[0].key.as_deref(), Some("disktype"));
    assert!(
        d.metadata.generation > gen_after_first,
        "spec changes bump the generation"
    );

    // JSON merge patch: lists are replaced whole.
    let d = api
        .patch(
            "patch-demo",
            &pp,
            &Patch::Merge(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "patch-demo-ctr-3", "image": "gcr.io/google-samples/hello-app:2.0"}]}}}})),
        )
        .await
        .expect("merge");
    assert_eq!(
        images(&d),
        vec![(
            "patch-demo-ctr-3".into(),
            "gcr.io/google-samples/hello-app:2.0".into()
        )]
    );

    // JSON patch.
    let p: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]))
            .expect("patch");
    let d = api
        .patch("patch-demo", &pp, &Patch::Json::<()>(p))
        .await
        .expect("json patch");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));

    // Strategic merge with $retainKeys: switching to Recreate drops rollingUpdate.
    let d = api
        .patch(
            "patch-demo",
            &pp,
            &Patch::Strategic(
                json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
            ),
        )
        .await
        .expect("retainKeys");
    let strategy = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.clone())
        .expect("strategy");
    assert_eq!(strategy.type_.as_deref(), Some("Recreate"));
    assert!(strategy.rolling_update.is_none());

    // Server-side apply: only the applied fields change; the manager is recorded.
    let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "patch-demo"},
        "spec": {"template": {"spec": {"containers": [{"name": "patch-demo-ctr-3", "image": "hello-app:3.0"}]}}}});
    let d = api
        .patch(
            "patch-demo",
            &PatchParams::apply("ci").force(),
            &Patch::Apply(&cfg),
        )
        .await
        .expect("apply");
    assert_eq!(
        images(&d),
        vec![("patch-demo-ctr-3".into(), "hello-app:3.0".into())]
    );
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    let managers: Vec<String> = d
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(managers.contains(&"ci".to_string()), "{managers:?}");

    // Precondition: a stale resourceVersion is a 409 Conflict.
    let mut stale = api.get("patch-demo").await.expect("get");
    api.patch(
        "patch-demo",
        &pp,
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .expect("label");
    stale.metadata.labels = Some([("y".to_string(), "2".to_string())].into());
    let err = api
        .replace("patch-demo", &PostParams::default(), &stale)
        .await
        .expect_err("stale update");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );

    // Missing object and invalid object give real Status errors.
    let err = api.get("nope").await.expect_err("missing");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 404 && s.reason == "NotFound"),
        "{err:?}"
    );
    let mut bad = deployment("bad");
    bad.spec.as_mut().expect("spec").selector.match_labels =
        Some([("app".to_string(), "other".to_string())].into());
    let err = api
        .create(&PostParams::default(), &bad)
        .await
        .expect_err("invalid");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 422 && s.reason == "Invalid"),
        "{err:?}"
    );
    let err = api
        .create(&PostParams::default(), &deployment("patch-demo"))
        .await
        .expect_err("exists");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "AlreadyExists"),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_apply_conflict_is_a_409_field_manager_conflict() {
    use http_body_util::BodyExt;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let client = sim.client().expect("client");
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let cfg = |replicas: i32| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "ssa"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "ssa"}},
                 "template": {"metadata": {"labels": {"app": "ssa"}}, "spec": {"containers": [{"name": "a", "image": "a:1"}]}}}})
    };
    api.patch("ssa", &PatchParams::apply("alpha"), &Patch::Apply(cfg(2)))
        .await
        .expect("alpha creates");
    // Same value from another manager: shared ownership, no conflict.
    api.patch("ssa", &PatchParams::apply("beta"), &Patch::Apply(cfg(2)))
        .await
        .expect("shared");

    let req = http::Request::builder()
        .method("PATCH")
        .uri("/apis/apps/v1/namespaces/default/deployments/ssa?fieldManager=gamma")
        .header("content-type", "application/apply-patch+yaml")
        .body(cfg(5).to_string().into_bytes())
        .expect("request");
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 409);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let status: serde_json::Value = serde_json::from_slice(&body).expect("status json");
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["reason"], "Conflict");
    let causes = status["details"]["causes"].as_array().expect("causes");
    assert!(
        causes
            .iter()
            .all(|c| c["reason"] == "FieldManagerConflict" && c["field"] == ".spec.replicas"),
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .expect("message")
            .contains("conflict with \"alpha\""),
        "{status}"
    );

    let d = api
        .patch(
            "ssa",
            &PatchParams::apply("gamma").force(),
            &Patch::Apply(cfg(5)),
        )
        .await
        .expect("forced");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_acquired_and_handed_over_by_a_leader_election_crate() {
    use kube_lease_manager::LeaseManagerBuilder;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let client = sim.client().expect("client");
    let manager = |id: &str| {
        LeaseManagerBuilder::new(client.clone(), "depwatch-leader")
            .with_namespace("default")
            .with_identity(id)
            .with_duration(3)
            .with_grace(1)
            .build()
    };
    let first = manager("replica-a").await.expect("manager a");
    let second = manager("replica-b").await.expect("manager b");
    let a = tokio::time::timeout(Duration::from_secs(10), first.changed())
        .await
        .expect("a decides")
        .expect("a ok");
    assert!(a, "the first replica becomes leader");
    // While a holds the lease, b cannot get it.
    let b_try = tokio::time::timeout(Duration::from_millis(1500), second.changed()).await;
    assert!(
        b_try.is_err() || b_try.is_ok_and(|r| r.is_ok_and(|held| !held)),
        "b must not lead while a does"
    );
    first.release().await.expect("a releases");
    let b = wait_for("b to take the lease", Duration::from_secs(15), || async {
        match tokio::time::timeout(Duration::from_secs(2), second.changed()).await {
            Ok(Ok(true)) => Some(true),
            _ => None,
        }
    })
    .await;
    assert!(b);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "default");
    let lease = leases.get("depwatch-leader").await.expect("lease exists");
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("replica-b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_fails_about_that_fraction_with_500_status() {
    let sim = Sim::start(SimConfig {
        error_rate: 0.2,
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let api: Api<Namespace> = Api::all(sim.client().expect("client"));
    let (mut ok, mut failed) = (0u32, 0u32);
    for _ in 0..500 {
        match api.get("default").await {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) if s.code == 500 && s.reason == "InternalError" => failed += 1,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    let rate = f64::from(failed) / 500.0;
    // 3.5 standard deviations either side of 0.2 for 500 draws.
    assert!(
        (0.13..=0.27).contains(&rate),
        "failure rate {rate} (ok {ok}, failed {failed})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_the_same_port_keeps_the_state() {
    let mut sim = Sim::start(SimConfig::default()).await.expect("sim");
    let addr = sim.addr();
    let api: Api<Namespace> = Api::all(sim.client().expect("client"));
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "kept"}})).expect("ns");
    let created = api
        .create(&PostParams::default(), &ns)
        .await
        .expect("create");
    sim.stop().await;
    assert!(
        api.get("kept").await.is_err(),
        "a stopped sim refuses requests"
    );
    sim.restart().await.expect("restart");
    assert_eq!(sim.addr(), addr);
    let again = api.get("kept").await.expect("state kept");
    assert_eq!(again.metadata.uid, created.metadata.uid);
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_rate_fails_writes_with_409_and_leaves_reads_alone() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let api: Api<Namespace> = Api::all(sim.client().expect("client"));
    sim.faults().set_conflict_rate(1.0);
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "never"}})).expect("ns");
    let err = api
        .create(&PostParams::default(), &ns)
        .await
        .expect_err("conflict");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err:?}"
    );
    api.get("default").await.expect("reads are unaffected");
    sim.faults().set_conflict_rate(0.0);
    assert!(
        api.get("never").await.is_err(),
        "the refused write did not happen"
    );
    api.create(&PostParams::default(), &ns)
        .await
        .expect("writes work again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_status_moves_through_the_real_reasons() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let mut events = sim.store().subscribe();
    let api: Api<Deployment> = Api::namespaced(sim.client().expect("client"), "default");
    api.create(&PostParams::default(), &deployment("reasons"))
        .await
        .expect("create");
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            if ev.key.name != "reasons" || ev.key.resource != "deployments.apps" {
                continue;
            }
            for c in ev.object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let pair = (
                    c["type"].as_str().unwrap_or_default().to_string(),
                    c["reason"].as_str().unwrap_or_default().to_string(),
                );
                let mut v = s.lock().expect("lock");
                if v.last() != Some(&pair) && !v.contains(&pair) {
                    v.push(pair);
                }
            }
        }
    });
    let has = |t: &str, r: &str| {
        seen.lock()
            .expect("lock")
            .contains(&(t.to_string(), r.to_string()))
    };
    wait_for(
        "the first rollout to complete",
        Duration::from_secs(15),
        || async { has("Progressing", "NewReplicaSetAvailable").then_some(()) },
    )
    .await;
    assert!(
        has("Progressing", "NewReplicaSetCreated"),
        "{:?}",
        seen.lock().expect("lock")
    );
    assert!(
        has("Available", "MinimumReplicasAvailable")
            || has("Available", "MinimumReplicasUnavailable")
    );
    seen.lock().expect("lock").clear();
    api.patch(
        "reasons",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "patch-demo-ctr", "image": "nginx:1.26"}]}}}})),
    )
    .await
    .expect("patch");
    wait_for(
        "the rolling update to complete",
        Duration::from_secs(15),
        || async {
            let d = api.get("reasons").await.ok()?;
            let st = d.status?;
            (st.observed_generation == d.metadata.generation
                && st.updated_replicas == Some(2)
                && st.replicas == Some(2))
            .then_some(())
        },
    )
    .await;
    assert!(
        has("Progressing", "ReplicaSetUpdated"),
        "{:?}",
        seen.lock().expect("lock")
    );
    let d = api.get("reasons").await.expect("get");
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("2")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_every_request() {
    let sim = Sim::start(SimConfig {
        latency: Duration::from_millis(150),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let api: Api<Namespace> = Api::all(sim.client().expect("client"));
    let t0 = std::time::Instant::now();
    api.get("default").await.expect("get");
    // A lower bound: the injected delay happened (no claim about how fast anything is).
    assert!(t0.elapsed() >= Duration::from_millis(150));
}

/// Lists are paged as the API server pages them: `limit` and a `continue` token, every page
/// at the first page's revision, nothing missed or repeated; a bad token is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paged_with_limit_and_continue() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let client = sim.client().expect("client");
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client, "default");
    for i in 0..7 {
        let cm = serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}}))
            .expect("configmap");
        cms.create(&PostParams::default(), &cm)
            .await
            .expect("create");
    }
    let mut names = Vec::new();
    let mut params = kube::api::ListParams::default().limit(3);
    let mut pages = 0;
    let mut revisions = BTreeSet::new();
    loop {
        let page = cms.list(&params).await.expect("page");
        pages += 1;
        assert!(page.items.len() <= 3);
        revisions.insert(page.metadata.resource_version.clone());
        names.extend(page.items.iter().map(|c| c.name_any()));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        revisions.len(),
        1,
        "every page at the first page's revision"
    );
    let want: Vec<String> = (0..7).map(|i| format!("cm-{i}")).collect();
    assert_eq!(names, want);
    let bad = cms
        .list(&kube::api::ListParams::default().continue_token("not-a-token"))
        .await
        .expect_err("refused");
    assert!(matches!(bad, kube::Error::Api(s) if s.code == 400));
}

fn workload(kind: &str, name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut obj = json!({
        "apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": name, "image": format!("example.com/{name}:1.0.0")}]}
            }
        }
    });
    json_patch::merge(&mut obj, &extra);
    obj
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulsets_daemonsets_revisions_and_nodes_read_as_typed_objects() {
    use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, StatefulSet};
    use k8s_openapi::api::core::v1::{Node, Pod};
    use kube::api::{DeleteParams, ListParams};

    let sim = Sim::start(SimConfig {
        nodes: 2,
        ready_delay: Duration::from_millis(100),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let client = sim.client().expect("client");
    let nodes: Api<Node> = Api::all(client.clone());
    let list = nodes.list(&ListParams::default()).await.expect("nodes");
    let names: Vec<String> = list.items.iter().map(|n| n.name_any()).collect();
    assert_eq!(names, ["node-0", "node-1"]);
    for n in &list.items {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        assert!(ready, "{n:?}");
        assert_eq!(
            n.labels().get("kubernetes.io/os").map(String::as_str),
            Some("linux")
        );
    }

    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let db: StatefulSet = serde_json::from_value(workload(
        "StatefulSet",
        "db",
        json!({"spec": {"replicas": 2, "serviceName": "db"}}),
    ))
    .expect("statefulset");
    let created = sts
        .create(&PostParams::default(), &db)
        .await
        .expect("create");
    let spec = created.spec.expect("spec");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("OrderedReady"));
    let strategy = spec.update_strategy.expect("defaulted strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(strategy.rolling_update.and_then(|r| r.partition), Some(0));
    let ready = |api: Api<StatefulSet>, n: i32| async move {
        let s = api.get("db").await.ok()?;
        let st = s.status?;
        (st.observed_generation == s.metadata.generation
            && st.ready_replicas == Some(n)
            && st.current_revision.is_some()
            && st.current_revision == st.update_revision)
            .then_some(st)
    };
    let st = wait_for("db ready", Duration::from_secs(20), || {
        ready(sts.clone(), 2)
    })
    .await;
    let rev = st.current_revision.expect("revision");
    assert_eq!(st.collision_count, Some(0));

    let revisions: Api<ControllerRevision> = Api::namespaced(client.clone(), "default");
    let list = revisions
        .list(&ListParams::default().labels("app=db"))
        .await
        .expect("revisions");
    assert_eq!(list.items.len(), 1);
    let cr = &list.items[0];
    assert_eq!(cr.name_any(), rev);
    assert_eq!(cr.revision, 1);
    assert_eq!(
        cr.owner_references()[0].controller,
        Some(true),
        "controlled by the StatefulSet"
    );
    let data = cr.data.as_ref().expect("data");
    assert_eq!(data.0["spec"]["template"]["$patch"], "replace");

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels(&format!("controller-revision-hash={rev}")))
        .await
        .expect("pods");
    let mut names: Vec<String> = list.items.iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["db-0", "db-1"]);
    assert_eq!(
        list.items[0]
            .labels()
            .get("statefulset.kubernetes.io/pod-name")
            .map(String::as_str),
        Some(list.items[0].name_any().as_str())
    );

    // A pod that fails is replaced by a new one of the same name.
    let old_uid = pods.get("db-1").await.expect("db-1").uid();
    pods.patch_status(
        "db-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Failed"}})),
    )
    .await
    .expect("fail db-1");
    wait_for("db-1 replaced", Duration::from_secs(20), || async {
        let p = pods.get("db-1").await.ok()?;
        let ready = p
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        (p.uid() != old_uid && ready).then_some(())
    })
    .await;

    // The scale subresource, as an autoscaler uses it.
    sts.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale");
    wait_for("db at 3", Duration::from_secs(20), || ready(sts.clone(), 3)).await;

    let dss: Api<DaemonSet> = Api::namespaced(client.clone(), "default");
    let agent: DaemonSet =
        serde_json::from_value(workload("DaemonSet", "agent", json!({}))).expect("daemonset");
    dss.create(&PostParams::default(), &agent)
        .await
        .expect("create");
    let st = wait_for("agent on both nodes", Duration::from_secs(20), || async {
        let d = dss.get("agent").await.ok()?;
        let st = d.status?;
        (st.observed_generation == d.metadata.generation
            && st.number_available == Some(2)
            && st.updated_number_scheduled == Some(2))
        .then_some(st)
    })
    .await;
    assert_eq!(st.desired_number_scheduled, 2);
    assert_eq!(st.current_number_scheduled, 2);
    assert_eq!(st.number_ready, 2);
    assert_eq!(st.number_misscheduled, 0);
    assert_eq!(
        st.number_unavailable, None,
        "zero is left out as the API leaves it out"
    );

    // Deleting an owner collects its pods and revisions.
    sts.delete("db", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "db's pods and revisions collected",
        Duration::from_secs(20),
        || async {
            let p = pods
                .list(&ListParams::default().labels("app=db"))
                .await
                .ok()?;
            let r = revisions
                .list(&ListParams::default().labels("app=db"))
                .await
                .ok()?;
            (p.items.is_empty() && r.items.is_empty()).then_some(())
        },
    )
    .await;
}

/// What a stale `metadata.resourceVersion` gets from the API server: a 409 Conflict Status.
fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict" && s.is_failure())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_version_in_any_patch_is_a_precondition_on_workloads_and_leases() {
    use k8s_openapi::api::coordination::v1::Lease;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let client = sim.client().expect("client");
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d = api
        .create(&PostParams::default(), &deployment("web"))
        .await
        .expect("create");
    let leases: Api<Lease> = Api::namespaced(client, "default");
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "l"}, "spec": {}})).expect("lease");
    let l = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");
    let pp = PatchParams::apply("t");
    // (rv, body): the version read at creation, written over since by the first patch.
    let stale_d = d.resource_version().expect("rv");
    let stale_l = l.resource_version().expect("rv");
    // The current version passes. The deployment controller writes the status as it likes,
    // so "current" is read again when its write came in between.
    let mut ok = None;
    for _ in 0..20 {
        let current = api.get("web").await.expect("get").resource_version();
        let r = api
            .patch(
                "web",
                &pp,
                &Patch::Merge(
                    json!({"metadata": {"resourceVersion": current, "labels": {"a": "1"}}}),
                ),
            )
            .await;
        match r {
            Ok(d) => {
                ok = Some(d);
                break;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => panic!("the current version passes: {e}"),
        }
    }
    let ok = ok.expect("the current version passes");
    assert_ne!(
        ok.resource_version().as_deref(),
        Some(stale_d.as_str()),
        "every write bumps it"
    );
    let ok_l = leases
        .patch(
            "l",
            &pp,
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": stale_l}, "spec": {"holderIdentity": "a"}}),
            ),
        )
        .await
        .expect("the current version passes");
    assert_ne!(ok_l.resource_version(), Some(stale_l.clone()));
    let body = |rv: &str| json!({"metadata": {"resourceVersion": rv}, "spec": {"replicas": 4}});
    for patch in [
        Patch::Merge(body(&stale_d)),
        Patch::Strategic(body(&stale_d)),
        Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "resourceVersion": stale_d}, "spec": {"replicas": 4}})),
    ] {
        let err = api.patch("web", &pp, &patch).await.expect_err("stale");
        assert!(is_conflict(&err), "{patch:?}: {err:?}");
    }
    let lease_body =
        json!({"metadata": {"resourceVersion": stale_l}, "spec": {"holderIdentity": null}});
    for patch in [
        Patch::Merge(lease_body.clone()),
        Patch::Strategic(lease_body),
        Patch::Apply(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "resourceVersion": stale_l}, "spec": {"holderIdentity": "b"}}),
        ),
    ] {
        let err = leases.patch("l", &pp, &patch).await.expect_err("stale");
        assert!(is_conflict(&err), "{patch:?}: {err:?}");
    }
    let now = api.get("web").await.expect("get");
    assert_eq!(
        now.spec.and_then(|s| s.replicas),
        Some(2),
        "nothing stale landed"
    );
    let now_l = leases.get("l").await.expect("get");
    assert_eq!(
        now_l.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("a")
    );
}

/// A Deployment's first container image, as the store holds it.
async fn stored_image(api: &Api<Deployment>, name: &str) -> (String, String) {
    let d = api.get(name).await.expect("get");
    let image = images(&d)
        .first()
        .map(|(_, i)| i.clone())
        .unwrap_or_default();
    (image, d.resource_version().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_answer_as_if_done_but_store_nothing_and_send_no_watch_event() {
    use kube::api::{DeleteParams, WatchEvent, WatchParams};
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let sim = Sim::start(SimConfig {
        audit_log: Some(audit.clone()),
        ..SimConfig::default()
    })
    .await
    .expect("sim");
    let client = sim.client().expect("client");
    let api: Api<Deployment> = Api::namespaced(client.clone(), "default");
    api.create(&PostParams::default(), &deployment("kept"))
        .await
        .expect("create");
    // Let the controllers finish with it: from then on nothing but the test writes.
    wait_for("kept rolled out", Duration::from_secs(20), || async {
        let d = api.get("kept").await.ok()?;
        let st = d.status?;
        (st.available_replicas == Some(2)
            && st.updated_replicas == Some(2)
            && st.replicas == Some(2)
            && st.observed_generation == d.metadata.generation)
            .then_some(())
    })
    .await;
    let (image, kept_rv) = stored_image(&api, "kept").await;
    assert_eq!(image, "nginx:1.25");
    let rv_before = sim.store().current_rv();
    let mut events = std::pin::pin!(api
        .watch(&WatchParams::default(), &rv_before.to_string())
        .await
        .expect("watch"));

    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let ghost = api
        .create(&dry, &deployment("ghost"))
        .await
        .expect("dry-run create");
    assert_eq!(ghost.name_any(), "ghost");
    assert!(
        ghost.metadata.uid.is_some(),
        "answered as created: {ghost:?}"
    );
    assert_eq!(ghost.resource_version(), None, "a dry run takes no version");
    assert!(api.get_opt("ghost").await.expect("get").is_none());

    let set_image = |image: &str| {
        json!({"spec": {"template": {"spec": {"containers": [
            {"name": "patch-demo-ctr", "image": image}]}}}})
    };
    let json_patch: json_patch::Patch = serde_json::from_value(json!([{"op": "replace",
        "path": "/spec/template/spec/containers/0/image", "value": "nginx:dry-json"}]))
    .expect("patch");
    let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "kept"},
        "spec": {"template": {"spec": {"containers": [{"name": "patch-demo-ctr", "image": "nginx:dry-apply"}]}}}});
    let patches: Vec<(PatchParams, Patch<serde_json::Value>, &str)> = vec![
        (
            PatchParams::default().dry_run(),
            Patch::Strategic(set_image("nginx:dry-smp")),
            "nginx:dry-smp",
        ),
        (
            PatchParams::default().dry_run(),
            Patch::Merge(set_image("nginx:dry-merge")),
            "nginx:dry-merge",
        ),
        (
            PatchParams::default().dry_run(),
            Patch::Json(json_patch),
            "nginx:dry-json",
        ),
        (
            PatchParams::apply("ci").force().dry_run(),
            Patch::Apply(cfg),
            "nginx:dry-apply",
        ),
    ];
    for (params, patch, want) in &patches {
        let answer = api
            .patch("kept", params, patch)
            .await
            .expect("dry-run patch");
        assert_eq!(images(&answer)[0].1, *want, "answered as patched");
        assert_eq!(answer.resource_version().as_deref(), Some(kept_rv.as_str()));
    }
    let mut replaced = api.get("kept").await.expect("get");
    if let Some(spec) = replaced
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
    {
        spec.containers[0].image = Some("nginx:dry-put".into());
    }
    let answer = api
        .replace("kept", &dry, &replaced)
        .await
        .expect("dry-run update");
    assert_eq!(images(&answer)[0].1, "nginx:dry-put");
    api.delete("kept", &DeleteParams::default().dry_run())
        .await
        .expect("dry-run delete");

    assert_eq!(
        sim.store().current_rv(),
        rv_before,
        "no resourceVersion taken"
    );
    assert_eq!(stored_image(&api, "kept").await, (image, kept_rv));

    // A real write after the dry runs: it must be the first event the watch sees.
    api.patch(
        "kept",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"marker": "real"}}})),
    )
    .await
    .expect("real patch");
    let first = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("an event within 10 s")
        .expect("stream open")
        .expect("event");
    match first {
        WatchEvent::Modified(d) => assert_eq!(
            d.annotations().get("marker").map(String::as_str),
            Some("real"),
            "the first event after the dry runs is the real write: {d:?}"
        ),
        other => panic!("the first event after the dry runs is the real write, got {other:?}"),
    }

    // The audit log marks every dry run, so counting applied PATCHes leaves them out.
    let dry_patches = audit_count(&audit, |l| l["method"] == "PATCH" && l["dryRun"] == true);
    assert_eq!(dry_patches, patches.len());
    let applied = audit_count(&audit, |l| {
        common::daemon::applied_patch(l)
            && l["path"] == "/apis/apps/v1/namespaces/default/deployments/kept"
    });
    assert_eq!(applied, 1, "only the real patch counts");
    for method in ["POST", "PUT", "DELETE"] {
        assert!(
            audit_count(&audit, |l| l["method"] == method && l["dryRun"] == true) >= 1,
            "the dry-run {method} is audited as one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_value_other_than_all_is_refused_as_the_api_server_refuses_it() {
    use http_body_util::BodyExt;
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let client = sim.client().expect("client");
    let cases = [
        (
            "POST",
            "/apis/apps/v1/namespaces/default/deployments?dryRun=server",
            "CreateOptions",
        ),
        (
            "PATCH",
            "/apis/apps/v1/namespaces/default/deployments/web?dryRun=true",
            "PatchOptions",
        ),
    ];
    for (method, uri, options) in cases {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/merge-patch+json")
            .body(serde_json::to_vec(&deployment("web")).expect("body"))
            .expect("request");
        let resp = client
            .send(req.map(kube::client::Body::from))
            .await
            .expect("sent");
        assert_eq!(resp.status().as_u16(), 422, "{method} {uri}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&body).expect("status json");
        assert_eq!(status["reason"], "Invalid", "{status}");
        let message = status["message"].as_str().expect("message");
        assert!(
            message.starts_with(&format!(
                "{options}.meta.k8s.io \"\" is invalid: dryRun: Unsupported value"
            )) && message.ends_with("supported values: \"All\""),
            "{message}"
        );
    }
    let api: Api<Deployment> = Api::namespaced(client, "default");
    assert!(
        api.get_opt("web").await.expect("get").is_none(),
        "nothing was created"
    );
}
