//! The packaging under `deploy/`: every Kubernetes overlay applies with real kubectl, passes the
//! "restricted" Pod Security level, and grants exactly the (verb, resource) pairs depwatch uses
//! in an end-to-end run, nothing beyond.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::Env;
use common::{wait_for, Kubectl};
use depwatch::sim::{Sim, SimConfig};
use serde_json::{json, Value};

const OVERLAYS: [&str; 5] = ["single", "configmap", "git-sync", "ha-postgres", "ecr"];

/// The overlay whose replicas elect a leader through a Lease and share a PostgreSQL record.
const HA: &str = "ha-postgres";

/// The overlay that keeps ECR pull secrets (`--ecr-pull-secret`): the base's ClusterRole plus
/// its own, checked by `the_ecr_overlay_grows_rbac_by_exactly_the_secret_verbs_it_uses`.
const ECR: &str = "ecr";

fn overlay(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("deploy/kubernetes/overlays/{name}"))
}

/// Why a pod spec fails the restricted Pod Security level, if it does (the checks of
/// https://kubernetes.io/docs/concepts/security/pod-security-standards/#restricted).
fn restricted_violations(pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let pod_sc = &pod["securityContext"];
    for v in pod["volumes"].as_array().into_iter().flatten() {
        let allowed = [
            "configMap",
            "emptyDir",
            "persistentVolumeClaim",
            "secret",
            "projected",
            "downwardAPI",
        ];
        let kinds: Vec<&String> = v
            .as_object()
            .map(|o| o.keys().filter(|k| *k != "name").collect())
            .unwrap_or_default();
        if kinds.iter().any(|k| !allowed.contains(&k.as_str())) {
            out.push(format!("volume type {kinds:?}"));
        }
    }
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if pod[key] == true {
            out.push(key.into());
        }
    }
    let containers = pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["initContainers"].as_array().into_iter().flatten());
    for c in containers {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            out.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            out.push(format!("{name}: allowPrivilegeEscalation must be false"));
        }
        let drops: Vec<&str> = sc["capabilities"]["drop"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if !drops.contains(&"ALL") {
            out.push(format!("{name}: capabilities must drop ALL"));
        }
        if sc["capabilities"]["add"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x != "NET_BIND_SERVICE"))
        {
            out.push(format!("{name}: adds capabilities"));
        }
        if sc["runAsNonRoot"] != true && pod_sc["runAsNonRoot"] != true {
            out.push(format!("{name}: runAsNonRoot"));
        }
        if sc["runAsUser"] == 0 || pod_sc["runAsUser"] == 0 {
            out.push(format!("{name}: runs as UID 0"));
        }
        let seccomp = |v: &Value| {
            matches!(
                v["seccompProfile"]["type"].as_str(),
                Some("RuntimeDefault" | "Localhost")
            )
        };
        if !seccomp(sc) && !seccomp(pod_sc) {
            out.push(format!("{name}: seccompProfile RuntimeDefault"));
        }
        if c["resources"]["limits"]["memory"].is_null() {
            out.push(format!("{name}: no memory limit"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_overlay_applies_and_passes_the_restricted_pod_security_level() {
    for name in OVERLAYS {
        let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let k = Kubectl::new(dir.path(), &sim.kubeconfig());
        let out = k
            .ok(&["apply", "-k", overlay(name).to_str().expect("utf-8")])
            .await;
        let mut kinds = vec![
            "namespace/depwatch",
            "serviceaccount/depwatch",
            "clusterrole.rbac.authorization.k8s.io/depwatch",
            "clusterrolebinding.rbac.authorization.k8s.io/depwatch",
            "service/depwatch",
            "deployment.apps/depwatch",
        ];
        if name == HA {
            kinds.push("role.rbac.authorization.k8s.io/depwatch-leader-election");
            kinds.push("rolebinding.rbac.authorization.k8s.io/depwatch-leader-election");
        } else {
            kinds.push("persistentvolumeclaim/depwatch-state");
        }
        if name == ECR {
            kinds.push("clusterrole.rbac.authorization.k8s.io/depwatch-ecr");
            kinds.push("clusterrolebinding.rbac.authorization.k8s.io/depwatch-ecr");
        }
        for kind in kinds {
            assert!(
                out.contains(&format!("{kind} created")),
                "{name}: {kind} in {out}"
            );
        }
        let dep: Value = serde_json::from_str(
            &k.ok(&["-n", "depwatch", "get", "deploy", "depwatch", "-o", "json"])
                .await,
        )
        .expect("json");
        let pod = &dep["spec"]["template"]["spec"];
        let violations = restricted_violations(pod);
        assert!(violations.is_empty(), "{name}: {violations:?}");
        assert_eq!(pod["serviceAccountName"], "depwatch");
        let c = &pod["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert!(
            !c["resources"]["requests"]["cpu"].is_null(),
            "{name}: requests"
        );
        let volume = |v: &str| {
            pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|x| x["name"] == v)
                .cloned()
                .unwrap_or(Value::Null)
        };
        // The record outlives the pod in every layout: on a volume claim, or in PostgreSQL.
        if name == HA {
            assert_eq!(dep["spec"]["replicas"], 2);
            let env = |var: &str| {
                c["env"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|e| e["name"] == var)
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            assert_eq!(env("DEPWATCH_LEADER_ELECT")["value"], "true");
            assert_eq!(
                env("DEPWATCH_DATABASE_URL")["valueFrom"]["secretKeyRef"]["name"],
                "depwatch-postgres"
            );
        } else {
            assert_eq!(
                volume("state")["persistentVolumeClaim"]["claimName"],
                "depwatch-state",
                "{name}"
            );
        }
        if name == "single" {
            // The write path: the API, with tokens from a mounted Secret.
            let tokens = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|e| e["name"] == "DEPWATCH_API_TOKEN_FILE")
                .and_then(|e| e["value"].as_str())
                .unwrap_or_else(|| panic!("single: no DEPWATCH_API_TOKEN_FILE"));
            let mounted = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| tokens.starts_with(m["mountPath"].as_str().unwrap_or("-")))
                .unwrap_or_else(|| panic!("single: {tokens} is not on a mounted volume"));
            let source = volume(mounted["name"].as_str().expect("name"));
            assert_eq!(source["secret"]["secretName"], "depwatch-api-tokens");
        }
        let deps = volume("deps");
        let keys: Vec<&String> = deps.as_object().expect("deps volume").keys().collect();
        assert_eq!(keys.len(), 2, "{name}: one source for deps: {deps}");
        let ns: Value = serde_json::from_str(&k.ok(&["get", "ns", "depwatch", "-o", "json"]).await)
            .expect("json");
        assert_eq!(
            ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
            "restricted"
        );
    }
    // The ConfigMap overlay's files are valid dependency files.
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["check", overlay("configmap").to_str().expect("utf-8")])
        .output()
        .expect("check runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// `(verb, group/resource)` of one audit entry, or `None` for non-resource paths.
fn permission(entry: &Value) -> Option<(String, String)> {
    let path = entry["path"].as_str()?;
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (resource, named) = match rest {
        // The service proxy is a subresource of its own (`services/proxy`).
        ["namespaces", _ns, "services", _name, "proxy", ..] => ("services/proxy", true),
        ["namespaces", _ns, resource, name @ ..] => (*resource, !name.is_empty()),
        [resource, name @ ..] => (*resource, !name.is_empty()),
        [] => return None,
    };
    let verb = match entry["verb"].as_str()? {
        "get" if !named => "list",
        v => v,
    };
    Some((verb.to_string(), format!("{group}/{resource}")))
}

/// One field of an RBAC rule (`apiGroups`, `resources`, `verbs`, `resourceNames`).
fn rule_list(rule: &Value, field: &str) -> Vec<String> {
    rule[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

/// The `(verb, group/resource)` pairs `rules` grant.
fn granted(rules: &[Value]) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for rule in rules {
        for g in rule_list(rule, "apiGroups") {
            for r in rule_list(rule, "resources") {
                for v in rule_list(rule, "verbs") {
                    out.insert((v, format!("{g}/{r}")));
                }
            }
        }
    }
    out
}

/// `(verb, group/resource)` of every request depwatch made, from the audit log.
fn used_by_depwatch(audit: &Path) -> BTreeSet<(String, String)> {
    std::fs::read_to_string(audit)
        .expect("audit")
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["userAgent"]
                .as_str()
                .is_some_and(|a| a.starts_with("depwatch/"))
        })
        .filter_map(|e| permission(&e))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_what_depwatch_uses() {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.deployment("prod", "api", &[("api", "example.com/api:1.0.0")], 1)
        .await;
    // Every kind: a StatefulSet whose crashing version is rolled back by force (deleting its
    // stuck pod; its pods name a pull secret, which the pre-flight reads), a DaemonSet, a CronJob.
    env.workload(
        "statefulset",
        "prod",
        "db",
        &[("db", "example.com/db:1.0.0")],
        json!({"replicas": 2, "template": {"metadata": {"labels": {"app": "db"}}, "spec": {
            "imagePullSecrets": [{"name": "regcred"}],
            "containers": [{"name": "db", "image": "example.com/db:1.0.0"}]}}}),
    )
    .await;
    env.workload(
        "daemonset",
        "prod",
        "agent",
        &[("agent", "example.com/agent:1.0.0")],
        json!({}),
    )
    .await;
    env.workload(
        "cronjob",
        "prod",
        "report",
        &[("report", "example.com/report:1.0.0")],
        json!({}),
    )
    .await;
    env.write_dep("web_prod.dep", "1.0.0\n");
    env.write_dep("api_prod.dep", "1.0.0\n");
    // With leader election, so the Lease's verbs are used too, and the registry pre-flight
    // (its registries are out of reach: each deploy goes on after the bounded wait), so the
    // pull credentials are read.
    let daemon = env
        .daemon(&[
            "--leader-elect",
            "--lease-namespace",
            "default",
            "--registry-check",
            "on",
            "--registry-wait",
            "1s",
        ])
        .await;
    // A healthy deploy, a failed one rolled back, a missing Deployment, a missing namespace.
    env.write_dep("web_prod.dep", "1.1.0\n");
    env.write_dep("api_prod.dep", "1.1.0-fail-pull\n");
    env.write_dep("wbe_prod.dep", "1.0.0\n");
    env.write_dep("web_prdo.dep", "1.0.0\n");
    env.write_dep("db_prod.dep", "1.1.0-crash\n");
    // Verified by its /healthz, through the API server's service proxy.
    env.write_dep(
        "agent_prod.dep",
        // A short bake that a transient answer (a pod between ready and serving) cannot fail.
        "version: 1.1.0\nverify:\n  bake: 1s\n  interval: 200ms\n  failureLimit: 3\n  checks:\n    - http: /healthz\n",
    );
    env.write_dep("report_prod.dep", "1.1.0\n");
    let store = env.store();
    let status = async |name: &str, ns: &str| {
        store
            .service(&depwatch::domain::ServiceKey::new(name, ns).expect("key"))
            .await
            .ok()
            .flatten()
            .map(|r| r.status.as_str().to_string())
    };
    wait_for("every outcome", Duration::from_secs(60), || async {
        (status("web", "prod").await.as_deref() == Some("succeeded")
            && status("api", "prod").await.as_deref() == Some("rolled_back")
            && status("wbe", "prod").await.as_deref() == Some("failed")
            && status("web", "prdo").await.as_deref() == Some("failed")
            && status("db", "prod").await.as_deref() == Some("rolled_back")
            && status("agent", "prod").await.as_deref() == Some("succeeded")
            && status("report", "prod").await.as_deref() == Some("applied"))
        .then_some(())
    })
    .await;
    // The same outcome again (1.1.0 deployed a second time) is sent as a series of the first
    // Kubernetes Event: a PATCH of it.
    let deployed = async |tag: &str| {
        let image = format!("example.com/web:{tag}");
        let k = depwatch::domain::ServiceKey::new("web", "prod").expect("key");
        store.history(Some(&k), 1).await.ok().is_some_and(|h| {
            h.first()
                .is_some_and(|d| d.outcome.as_str() == "succeeded" && d.to_image.contains(&image))
        })
    };
    for tag in ["1.2.0", "1.1.0"] {
        env.write_dep("web_prod.dep", &format!("{tag}\n"));
        wait_for("web deployed", Duration::from_secs(30), || async {
            deployed(tag).await.then_some(())
        })
        .await;
    }
    let patched_event = ("patch".to_string(), "events.k8s.io/events".to_string());
    wait_for(
        "the repeated Event patched",
        Duration::from_secs(20),
        || async {
            used_by_depwatch(&env.audit)
                .contains(&patched_event)
                .then_some(())
        },
    )
    .await;
    daemon.stop();

    let used = used_by_depwatch(&env.audit);
    // Asking what it may do needs no grant: Kubernetes lets every authenticated user create
    // SelfSubjectAccessReviews (the system:basic-user ClusterRole).
    let review = (
        "create".to_string(),
        "authorization.k8s.io/selfsubjectaccessreviews".to_string(),
    );
    assert!(
        used.contains(&review),
        "depwatch asks what it may do: {used:?}"
    );
    let used: BTreeSet<(String, String)> = used.into_iter().filter(|p| *p != review).collect();
    for used_by_kinds in [
        ("patch", "apps/deployments"),
        ("patch", "apps/statefulsets"),
        ("patch", "apps/daemonsets"),
        ("patch", "batch/cronjobs"),
        ("delete", "/pods"),
        ("get", "/secrets"),
        ("get", "/services/proxy"),
    ] {
        let p = (used_by_kinds.0.to_string(), used_by_kinds.1.to_string());
        assert!(used.contains(&p), "{p:?} in {used:?}");
    }
    assert!(
        used.iter().any(|(_, r)| r == "coordination.k8s.io/leases"),
        "the Lease was used: {used:?}"
    );

    // The base's ClusterRole, as every overlay applies it.
    for name in OVERLAYS {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = Kubectl::new(dir.path(), &env.sim.kubeconfig());
        k.ok(&["apply", "-k", overlay(name).to_str().expect("utf-8")])
            .await;
        let role: Value = serde_json::from_str(
            &k.ok(&["get", "clusterrole", "depwatch", "-o", "json"])
                .await,
        )
        .expect("json");
        let mut rules: Vec<Value> = role["rules"].as_array().cloned().unwrap_or_default();
        if name == HA {
            let lease: Value = serde_json::from_str(
                &k.ok(&[
                    "-n",
                    "depwatch",
                    "get",
                    "role",
                    "depwatch-leader-election",
                    "-o",
                    "json",
                ])
                .await,
            )
            .expect("json");
            rules.extend(lease["rules"].as_array().cloned().unwrap_or_default());
        }
        // Only the HA overlay elects a leader; the others must not grant the Lease.
        let used: BTreeSet<(String, String)> = used
            .iter()
            .filter(|(_, r)| name == HA || r != "coordination.k8s.io/leases")
            .cloned()
            .collect();
        let granted = granted(&rules);
        let missing: Vec<_> = used.difference(&granted).collect();
        let beyond: Vec<_> = granted.difference(&used).collect();
        assert!(
            missing.is_empty(),
            "{name}: used but not granted: {missing:?}"
        );
        assert!(
            beyond.is_empty(),
            "{name}: granted but never used: {beyond:?}"
        );
        let binding: Value = serde_json::from_str(
            &k.ok(&["get", "clusterrolebinding", "depwatch", "-o", "json"])
                .await,
        )
        .expect("json");
        assert_eq!(binding["subjects"][0]["name"], "depwatch");
        assert_eq!(binding["subjects"][0]["namespace"], "depwatch");
    }
}

/// A cluster-scoped object as JSON, through kubectl.
async fn get_json(k: &Kubectl, kind: &str, name: &str) -> Value {
    serde_json::from_str(&k.ok(&["get", kind, name, "-o", "json"]).await).expect("json")
}

/// `--ecr-pull-secret` creates the Secret, refreshes it (four-second tokens) and creates it
/// again once deleted; the ECR overlay's own ClusterRole grants exactly what that run used
/// beyond the base's ClusterRole, and confines what it can to the flag's Secret name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ecr_overlay_grows_rbac_by_exactly_the_secret_verbs_it_uses() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, DeleteParams};
    // The token is for a registry on a loopback port nobody listens on: no pre-flight here.
    let registry = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port");
    let proxy = format!("http://{registry}");
    let endpoint =
        common::ecr::Endpoint::start(&proxy, "AWS", "pw", Duration::from_secs(4), false).await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", &format!("{registry}/web:1.0"))], 1)
        .await;
    env.write_dep("web_prod.dep", "1.1\n");
    let mut args = env.run_args();
    args.extend(["--debounce", "50ms", "--ecr-pull-secret", "ecr-pull"].map(String::from));
    let daemon = env
        .daemon_with(&args, &endpoint.aws_env(env.dir.path()), env.dir.path())
        .await;
    let api: Api<Secret> = Api::namespaced(env.client.clone(), "prod");
    let expiry = |s: &Secret| s.metadata.annotations.clone().unwrap_or_default();
    let first = wait_for("the Secret", Duration::from_secs(30), || async {
        api.get_opt("ecr-pull").await.ok().flatten()
    })
    .await;
    wait_for("the Secret refreshed", Duration::from_secs(30), || async {
        let s = api.get_opt("ecr-pull").await.ok().flatten()?;
        (expiry(&s) != expiry(&first)).then_some(())
    })
    .await;
    api.delete("ecr-pull", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the Secret created again",
        Duration::from_secs(30),
        || async {
            let s = api.get_opt("ecr-pull").await.ok().flatten()?;
            (s.metadata.uid != first.metadata.uid).then_some(())
        },
    )
    .await;
    daemon.stop();

    let used: BTreeSet<(String, String)> = used_by_depwatch(&env.audit)
        .into_iter()
        .filter(|(_, r)| r == "/secrets")
        .collect();
    for verb in ["list", "watch", "create", "patch"] {
        assert!(
            used.contains(&(verb.into(), "/secrets".into())),
            "{verb} in {used:?}"
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let k = Kubectl::new(dir.path(), &env.sim.kubeconfig());
    k.ok(&["apply", "-k", overlay(ECR).to_str().expect("utf-8")])
        .await;
    let rules = |role: &Value| role["rules"].as_array().cloned().unwrap_or_default();
    let base = granted(&rules(&get_json(&k, "clusterrole", "depwatch").await));
    let ecr_rules = rules(&get_json(&k, "clusterrole", "depwatch-ecr").await);
    let beyond_base: BTreeSet<_> = used.difference(&base).cloned().collect();
    assert_eq!(
        granted(&ecr_rules),
        beyond_base,
        "the ECR role grows the base's by exactly this"
    );
    // Everything but create (which cannot be confined by name) is confined to the flag's name.
    let dep = k
        .ok(&["-n", "depwatch", "get", "deploy", "depwatch", "-o", "json"])
        .await;
    let dep: Value = serde_json::from_str(&dep).expect("json");
    let flag = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "DEPWATCH_ECR_PULL_SECRET")
        .and_then(|e| e["value"].as_str())
        .expect("the flag in the Deployment")
        .to_string();
    for rule in &ecr_rules {
        let names = rule_list(rule, "resourceNames");
        match rule_list(rule, "verbs") == ["create"] {
            true => assert!(names.is_empty(), "{rule}"),
            false => assert_eq!(names, std::slice::from_ref(&flag), "{rule}"),
        }
    }
    let binding = get_json(&k, "clusterrolebinding", "depwatch-ecr").await;
    assert_eq!(binding["roleRef"]["name"], "depwatch-ecr");
    assert_eq!(binding["subjects"][0]["name"], "depwatch");
    assert_eq!(binding["subjects"][0]["namespace"], "depwatch");
}

/// The `single` overlay's steps in docs/install.md, run as written (each line through `sh`,
/// from the repository's root) against a simulated cluster: every step succeeds in the order
/// given, and the Deployment mounts the Secret the steps made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_single_overlay_steps_work_in_the_order_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/install.md")).expect("docs/install.md");
    let at = doc
        .find("The steps, in this order")
        .expect("the single overlay's steps");
    let block = doc[at..]
        .split("```sh")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    let steps: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(steps.len(), 3, "{steps:?}");
    let sim = Sim::start(SimConfig::default()).await.expect("sim starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.kubeconfig()).expect("kubeconfig");
    for step in steps {
        let out = tokio::process::Command::new("sh")
            .args(["-c", step])
            .current_dir(root)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .await
            .expect("sh");
        assert!(
            out.status.success(),
            "{step}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let k = Kubectl::new(dir.path(), &sim.kubeconfig());
    let get = |what: &'static str| {
        let k = &k;
        async move {
            let text = k.ok(&["-n", "depwatch", "get", what, "-o", "json"]).await;
            serde_json::from_str::<Value>(&text).expect("json")
        }
    };
    let secret = get("secret/depwatch-api-tokens").await;
    assert!(secret["data"]["tokens"].is_string(), "{secret}");
    let deployment = get("deployment/depwatch").await;
    assert!(
        deployment.to_string().contains("depwatch-api-tokens"),
        "the Deployment mounts the Secret"
    );
}
