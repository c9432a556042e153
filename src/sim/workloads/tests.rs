//! The controllers' decisions, case by case, after the behaviour of the real controllers
//! (stateful_set_control.go, the DaemonSet controller's update.go).

use super::*;

fn sts(replicas: u64, extra: Value) -> Value {
    let mut s = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "web", "namespace": "prod", "uid": "sts-uid", "generation": 1},
        "spec": {
            "replicas": replicas,
            "serviceName": "web",
            "podManagementPolicy": "OrderedReady",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "web:1"}]}},
        },
        "status": {}
    });
    json_patch::merge(&mut s, &extra);
    s
}

fn with_image(owner: &Value, image: &str) -> Value {
    let mut o = owner.clone();
    o["spec"]["template"]["spec"]["containers"][0]["image"] = json!(image);
    o
}

fn revision(owner: &Value, number: i64) -> Arc<Value> {
    let kind = if owner["kind"] == "DaemonSet" {
        Kind::DaemonSet
    } else {
        Kind::StatefulSet
    };
    Arc::new(new_revision(kind, owner, number, 0))
}

fn pod(name: &str, revision: &str, ready: bool) -> Arc<Value> {
    let status = if ready { "True" } else { "False" };
    Arc::new(json!({
        "metadata": {"name": name, "uid": format!("uid-{name}"),
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "labels": {REVISION_LABEL: revision}},
        "spec": {},
        "status": {"phase": if ready { "Running" } else { "Pending" },
                   "conditions": [{"type": "Ready", "status": status}]}
    }))
}

fn names(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::Create(o) => format!("+{}", meta::name(o)),
            Step::Delete(o) => format!("-{}", meta::name(o)),
        })
        .collect()
}

fn no_name(_: &str) -> Option<Arc<Value>> {
    None
}

#[test]
fn a_new_template_gets_a_revision_named_by_its_hash_holding_the_replace_patch() {
    let s = sts(3, json!({}));
    let choice = choose_revision(Kind::StatefulSet, &s, &[], no_name);
    let Some(RevisionWrite::Create(rev)) = &choice.write else {
        panic!("creates a revision: {choice:?}");
    };
    let name = meta::name(rev);
    let hash = name.strip_prefix("web-").expect("named <sts>-<hash>");
    assert_eq!(rev["metadata"]["labels"][HISTORY_HASH_LABEL], hash);
    assert_eq!(rev["metadata"]["labels"]["app"], "web");
    assert_eq!(rev["metadata"]["ownerReferences"][0]["kind"], "StatefulSet");
    assert_eq!(rev["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(rev["revision"], 1);
    assert_eq!(rev["data"]["spec"]["template"]["$patch"], "replace");
    assert_eq!(revision_template(rev), s["spec"]["template"]);
    // Go's encoder sorts keys: `$patch` comes first.
    let text = rev["data"].to_string();
    assert!(
        text.starts_with(r#"{"spec":{"template":{"$patch":"replace","metadata""#),
        "{text}"
    );
}

#[test]
fn the_newest_equal_revision_is_kept_and_an_older_one_is_renumbered() {
    let v1 = sts(3, json!({}));
    let v2 = with_image(&v1, "web:2");
    let (r1, r2) = (revision(&v1, 1), revision(&v2, 2));
    let same = choose_revision(Kind::StatefulSet, &v2, &[r1.clone(), r2.clone()], no_name);
    assert!(same.write.is_none());
    assert_eq!(meta::name(&same.update), meta::name(&r2));
    // Back to v1: the real controller bumps r1 to revision 3 rather than making a new one.
    let back = choose_revision(Kind::StatefulSet, &v1, &[r1.clone(), r2], no_name);
    match &back.write {
        Some(RevisionWrite::Renumber(r, 3)) => assert_eq!(meta::name(r), meta::name(&r1)),
        other => panic!("renumbers r1: {other:?}"),
    }
    assert_eq!(back.update["revision"], 3);
}

#[test]
fn a_taken_name_counts_a_collision_and_hashes_again() {
    let s = sts(1, json!({}));
    let taken = meta::name(&revision(&s, 1)).to_string();
    let choice = choose_revision(Kind::StatefulSet, &s, &[], |n| {
        (n == taken).then(|| Arc::new(json!({})))
    });
    assert_eq!(choice.collision_count, 1);
    assert_ne!(meta::name(&choice.update), taken);
}

#[test]
fn ordered_ready_creates_one_pod_at_a_time_after_its_predecessors_are_ready() {
    let s = sts(3, json!({}));
    let r = revision(&s, 1);
    let nodes = vec!["node-0".to_string(), "node-1".to_string()];
    let steps = statefulset_steps(&s, &[], &r, &r, &nodes);
    assert_eq!(names(&steps), ["+web-0"]);
    let Step::Create(p) = &steps[0] else {
        panic!("create")
    };
    let labels = &p["metadata"]["labels"];
    assert_eq!(labels[REVISION_LABEL], meta::name(&r));
    assert_eq!(labels[POD_NAME_LABEL], "web-0");
    assert_eq!(labels[POD_INDEX_LABEL], "0");
    assert_eq!(labels["app"], "web");
    assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "sts-uid");
    assert_eq!(p["spec"]["hostname"], "web-0");
    assert_eq!(p["spec"]["subdomain"], "web");
    assert_eq!(p["spec"]["nodeName"], "node-0");
    let rn = meta::name(&r);
    let not_ready = [pod("web-0", rn, false)];
    assert!(statefulset_steps(&s, &not_ready, &r, &r, &nodes).is_empty());
    let ready = [pod("web-0", rn, true)];
    assert_eq!(
        names(&statefulset_steps(&s, &ready, &r, &r, &nodes)),
        ["+web-1"]
    );
}

#[test]
fn parallel_creates_every_missing_pod_at_once() {
    let s = sts(3, json!({"spec": {"podManagementPolicy": "Parallel"}}));
    let r = revision(&s, 1);
    let pods = [pod("web-1", meta::name(&r), false)];
    assert_eq!(
        names(&statefulset_steps(&s, &pods, &r, &r, &[])),
        ["+web-0", "+web-2"]
    );
}

#[test]
fn a_rolling_update_replaces_the_highest_ordinal_first_one_at_a_time() {
    let v1 = sts(3, json!({}));
    let v2 = with_image(&v1, "web:2");
    let (r1, r2) = (revision(&v1, 1), revision(&v2, 2));
    let (n1, n2) = (meta::name(&r1), meta::name(&r2));
    let all_old = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n1, true),
    ];
    assert_eq!(
        names(&statefulset_steps(&v2, &all_old, &r1, &r2, &[])),
        ["-web-2"]
    );
    // web-2 is being recreated: nothing else moves until it is back.
    let recreating = [pod("web-0", n1, true), pod("web-1", n1, true)];
    assert_eq!(
        names(&statefulset_steps(&v2, &recreating, &r1, &r2, &[])),
        ["+web-2"]
    );
    let unready_new = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n2, false),
    ];
    assert!(statefulset_steps(&v2, &unready_new, &r1, &r2, &[]).is_empty());
    let ready_new = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n2, true),
    ];
    assert_eq!(
        names(&statefulset_steps(&v2, &ready_new, &r1, &r2, &[])),
        ["-web-1"]
    );
}

#[test]
fn a_broken_pod_blocks_ordered_ready_even_after_the_template_is_reverted() {
    // The revert made r1 the update revision again, but web-2 of the bad revision never gets
    // Ready, and OrderedReady waits for it forever: the "forced rollback" case.
    let v1 = sts(3, json!({}));
    let v2 = with_image(&v1, "web:crash");
    let (r1, r2) = (revision(&v1, 3), revision(&v2, 2));
    let (n1, n2) = (meta::name(&r1), meta::name(&r2));
    let stuck = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n2, false),
    ];
    assert!(statefulset_steps(&v1, &stuck, &r1, &r1, &[]).is_empty());
    // Parallel management does replace it.
    let par = sts(3, json!({"spec": {"podManagementPolicy": "Parallel"}}));
    assert_eq!(
        names(&statefulset_steps(&par, &stuck, &r1, &r1, &[])),
        ["-web-2"]
    );
    // Once deleted, it comes back at the update revision.
    let steps = statefulset_steps(&v1, &stuck[..2], &r1, &r1, &[]);
    let Some(Step::Create(p)) = steps.first() else {
        panic!("recreates web-2: {steps:?}")
    };
    assert_eq!(p["metadata"]["labels"][REVISION_LABEL], n1);
}

#[test]
fn the_partition_keeps_lower_ordinals_and_on_delete_waits_for_deletions() {
    let v1 = sts(
        3,
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 2}}}}),
    );
    let v2 = with_image(&v1, "web:2");
    let (r1, r2) = (revision(&v1, 1), revision(&v2, 2));
    let (n1, n2) = (meta::name(&r1), meta::name(&r2));
    let done = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n2, true),
    ];
    assert!(statefulset_steps(&v2, &done, &r1, &r2, &[]).is_empty());
    // A pod below the partition is recreated at the current revision.
    let steps = statefulset_steps(&v2, &done[1..], &r1, &r2, &[]);
    let Some(Step::Create(p)) = steps.first() else {
        panic!("recreates web-0")
    };
    assert_eq!(p["metadata"]["labels"][REVISION_LABEL], n1);

    let od = with_image(
        &sts(
            3,
            json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null}}}),
        ),
        "web:2",
    );
    let old = [
        pod("web-0", n1, true),
        pod("web-1", n1, true),
        pod("web-2", n1, true),
    ];
    assert!(statefulset_steps(&od, &old, &r1, &r2, &[]).is_empty());
    let steps = statefulset_steps(&od, &[old[0].clone(), old[2].clone()], &r1, &r2, &[]);
    let Some(Step::Create(p)) = steps.first() else {
        panic!("recreates web-1")
    };
    assert_eq!(p["metadata"]["labels"][REVISION_LABEL], n2);
}

#[test]
fn failed_pods_are_deleted_and_scale_down_goes_from_the_top() {
    let s = sts(2, json!({}));
    let r = revision(&s, 1);
    let n = meta::name(&r);
    let mut failed = (*pod("web-0", n, false)).clone();
    failed["status"]["phase"] = json!("Failed");
    let pods = [Arc::new(failed), pod("web-1", n, true)];
    assert_eq!(
        names(&statefulset_steps(&s, &pods, &r, &r, &[])),
        ["-web-0"]
    );
    let three = [
        pod("web-0", n, true),
        pod("web-1", n, true),
        pod("web-2", n, true),
    ];
    assert_eq!(
        names(&statefulset_steps(&s, &three, &r, &r, &[])),
        ["-web-2"]
    );
}

#[test]
fn status_counts_pods_and_completes_a_rolling_update() {
    let v1 = sts(2, json!({}));
    let v2 = with_image(&v1, "web:2");
    let (n1, n2) = ("web-a", "web-b");
    let mid = [pod("web-0", n1, true), pod("web-1", n2, false)];
    let st = statefulset_status(&v2, &mid, n1, n2, 0);
    assert_eq!(st["replicas"], 2);
    assert_eq!(st["readyReplicas"], 1);
    assert_eq!(st["currentReplicas"], 1);
    assert_eq!(st["updatedReplicas"], 1);
    assert_eq!(st["currentRevision"], n1);
    assert_eq!(st["updateRevision"], n2);
    assert_eq!(st["availableReplicas"], 1);
    assert_eq!(st["observedGeneration"], 1);
    assert_eq!(st["collisionCount"], 0);
    let done = [pod("web-0", n2, true), pod("web-1", n2, true)];
    let st = statefulset_status(&v2, &done, n1, n2, 0);
    assert_eq!(st["currentRevision"], n2);
    assert_eq!(st["currentReplicas"], 2);
    // Zero counts are left out, as the API's JSON leaves them out.
    let st = statefulset_status(&sts(0, json!({})), &[], n1, n1, 0);
    assert_eq!(st.get("readyReplicas"), None);
    assert_eq!(st["replicas"], 0);
    assert_eq!(st["availableReplicas"], 0);
}

fn ds(extra: Value) -> Value {
    let mut d = json!({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": "prod", "uid": "ds-uid", "generation": 1,
                     "annotations": {TEMPLATE_GENERATION: "1"}},
        "spec": {
            "updateStrategy": {"type": "RollingUpdate",
                               "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {"metadata": {"labels": {"app": "agent"}},
                         "spec": {"containers": [{"name": "agent", "image": "agent:1"}]}},
        },
        "status": {}
    });
    json_patch::merge(&mut d, &extra);
    d
}

fn nodes(n: usize) -> Vec<Value> {
    (0..n).map(node).collect()
}

fn on_node(p: Arc<Value>, node: &str) -> Arc<Value> {
    let mut p = (*p).clone();
    p["spec"]["nodeName"] = json!(node);
    Arc::new(p)
}

fn ds_pods(hash: &str, ready: &[bool]) -> BTreeMap<String, Vec<Arc<Value>>> {
    let pods: Vec<Arc<Value>> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| on_node(pod(&format!("agent-{i}"), hash, *r), &format!("node-{i}")))
        .collect();
    pods_by_node(&pods)
}

#[test]
fn a_daemon_set_runs_one_pod_on_each_matching_node() {
    let d = ds(json!({}));
    let steps = daemonset_manage(&d, &nodes(4), &BTreeMap::new(), "h1");
    assert_eq!(steps.len(), 4);
    let Step::Create(p) = &steps[1] else {
        panic!("create")
    };
    assert_eq!(p["spec"]["nodeName"], "node-1");
    assert!(meta::name(p).starts_with("agent-"));
    assert_eq!(meta::name(p).len(), "agent-".len() + 5);
    assert_eq!(p["metadata"]["labels"][REVISION_LABEL], "h1");
    assert_eq!(p["metadata"]["labels"][TEMPLATE_GENERATION_LABEL], "1");
    assert_eq!(
        p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchFields"][0]["values"][0],
        "node-1"
    );
    let st = daemonset_status(&d, &nodes(4), &BTreeMap::new(), "h1", 0);
    assert_eq!(st["desiredNumberScheduled"], 4);
    assert_eq!(st["currentNumberScheduled"], 0);
    assert_eq!(st["numberUnavailable"], 4);

    let picky = ds(json!({"spec": {"template": {"spec": {"nodeSelector": {"disk": "ssd"}}}}}));
    assert!(daemonset_manage(&picky, &nodes(4), &BTreeMap::new(), "h1").is_empty());
    let st = daemonset_status(&picky, &nodes(4), &BTreeMap::new(), "h1", 0);
    assert_eq!(st["desiredNumberScheduled"], 0);
    assert_eq!(st["numberMisscheduled"], 0);
    let linux = ds(
        json!({"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "linux"}}}}}),
    );
    assert_eq!(
        daemonset_manage(&linux, &nodes(2), &BTreeMap::new(), "h1").len(),
        2
    );
}

#[test]
fn a_daemon_set_rolls_within_max_unavailable_and_replaces_broken_pods_at_once() {
    let d = ds(json!({}));
    let old = ds_pods("h1", &[true, true, true, true]);
    assert!(daemonset_manage(&d, &nodes(4), &old, "h2").is_empty());
    assert_eq!(daemonset_rolling(&d, &nodes(4), &old, "h2").len(), 1);
    let st = daemonset_status(&d, &nodes(4), &old, "h2", 0);
    assert_eq!(st["numberReady"], 4);
    assert_eq!(st.get("updatedNumberScheduled"), None, "zero is left out");
    // Unhealthy old pods go at once, outside the budget (update.go does not count them as
    // unavailable), and the budget still takes one healthy pod.
    let broken = ds_pods("h1", &[false, false, true, true]);
    assert_eq!(daemonset_rolling(&d, &nodes(4), &broken, "h2").len(), 3);
    // An unavailable new pod uses up the budget.
    let mut mid = ds_pods("h1", &[true, true, true]);
    mid.insert(
        "node-3".into(),
        vec![on_node(pod("agent-n", "h2", false), "node-3")],
    );
    assert!(daemonset_rolling(&d, &nodes(4), &mid, "h2").is_empty());
    let half =
        ds(json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": "50%"}}}}));
    assert_eq!(daemonset_rolling(&half, &nodes(4), &old, "h2").len(), 2);
}

#[test]
fn a_daemon_set_deletes_failed_and_extra_pods_and_surges_when_asked() {
    let d = ds(json!({}));
    let mut failed = (*on_node(pod("agent-x", "h1", false), "node-0")).clone();
    failed["status"]["phase"] = json!("Failed");
    let by_node = pods_by_node(&[
        Arc::new(failed),
        on_node(pod("agent-y", "h1", true), "node-1"),
        on_node(pod("agent-z", "h1", true), "node-1"),
        on_node(pod("agent-w", "h1", true), "node-9"),
    ]);
    let steps = daemonset_manage(&d, &nodes(2), &by_node, "h1");
    assert_eq!(names(&steps), ["-agent-x", "-agent-z", "-agent-w"]);

    let surge = ds(
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}}}),
    );
    let old = ds_pods("h1", &[true, true]);
    let steps = daemonset_rolling(&surge, &nodes(2), &old, "h2");
    assert_eq!(steps.len(), 1);
    assert!(
        matches!(&steps[0], Step::Create(p) if p["metadata"]["labels"][REVISION_LABEL] == "h2")
    );
}
