//! Fencing that holds for requests in flight: the leader reaches the simulated cluster through
//! a proxy that can partition it and hold its requests (PostgreSQL stays reachable), the
//! standby reaches it directly. A partition longer than the Lease, healed, leaves exactly one
//! replica acting; a PATCH the old leader sent while it led, delivered 15 s later, is refused.

mod common;

use std::time::Duration;

use common::daemon::{Daemon, Env};
use common::proxy::Proxy;
use common::wait_for;
use depwatch::domain::{ServiceKey, ServiceStatus};
use depwatch::sim::SimConfig;
use depwatch::store::Store;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::time::Instant;

const WEB: &str = "/apis/apps/v1/namespaces/prod/deployments/web";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases/depwatch";

fn web() -> ServiceKey {
    ServiceKey::new("web", "prod").expect("key")
}

/// Two replicas on one record: `a` (started first, so it leads) behind the proxy, `b` not.
struct Pair {
    env: Env,
    /// `a`'s own copy of the dependency directory, when it has one (a file sync cut off with
    /// its API server).
    deps_a: Option<std::path::PathBuf>,
    proxy: Proxy,
    store: Store,
    a: Daemon,
    b: Daemon,
    _pg: common::postgres::Postgres,
}

/// `own_deps`: `a` reads its own copy of the directory, written by [`Pair::save`].
async fn pair(own_deps: bool) -> Pair {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("partition").await;
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.0\n");
    let proxy = Proxy::start(env.sim.addr()).await;
    let proxied = env.dir.path().join("kubeconfig-proxied");
    proxy.write_kubeconfig(&proxied);
    let mut args_a = env.replica_args("state-a");
    let at = args_a
        .iter()
        .position(|a| a == "--kubeconfig")
        .expect("kubeconfig arg")
        + 1;
    args_a[at] = proxied.display().to_string();
    let deps_a = own_deps.then(|| {
        let dir = env.dir.path().join("deps-a");
        std::fs::create_dir(&dir).expect("mkdir deps-a");
        std::fs::write(dir.join("web_prod.dep"), "1.0\n").expect("write");
        let at = args_a.iter().position(|a| a == "--deps").expect("deps arg") + 1;
        args_a[at] = dir.display().to_string();
        dir
    });
    let db = [("DEPWATCH_DATABASE_URL", url.clone())];
    let binary = [env!("CARGO_BIN_EXE_depwatch")];
    let a = env.daemon_via(&binary, &args_a, &db, env.dir.path()).await;
    assert!(a.log_text().contains("holds the Lease"), "{}", a.log_text());
    let b = env.spawn_via(&binary, &env.replica_args("state-b"), &db, env.dir.path());
    wait_for("b to stand by", Duration::from_secs(30), || async {
        b.log_text().contains("standby: waiting").then_some(())
    })
    .await;
    let store = Store::connect(&url).await.expect("connect");
    let p = Pair {
        env,
        deps_a,
        proxy,
        store,
        a,
        b,
        _pg: pg,
    };
    p.recorded("1.0").await;
    p
}

impl Pair {
    /// Save `version`; `a` sees it too when `to_a` (or when it reads the shared directory).
    fn save(&self, version: &str, to_a: bool) {
        self.env.write_dep("web_prod.dep", &format!("{version}\n"));
        if let Some(dir) = self.deps_a.as_ref().filter(|_| to_a) {
            std::fs::write(dir.join("web_prod.dep"), format!("{version}\n")).expect("write");
        }
    }

    /// The record says `version` succeeded and the cluster runs it.
    async fn recorded(&self, version: &str) {
        let want = format!("example.com/web:{version}");
        let what = format!("{version} deployed and recorded");
        wait_for(&what, Duration::from_secs(60), || async {
            let r = self.store.service(&web()).await.ok()??;
            let done = r.status == ServiceStatus::Succeeded
                && r.deployed.get("web") == Some(&want)
                && self.env.image("prod", "web").await == want;
            done.then_some(())
        })
        .await;
    }

    async fn b_leads(&self) {
        wait_for("b to take over", Duration::from_secs(30), || async {
            self.b.log_text().contains("holds the Lease").then_some(())
        })
        .await;
    }

    /// The Lease's holder.
    async fn holder(&self) -> Option<String> {
        let leases: kube::Api<Lease> = kube::Api::namespaced(self.env.client.clone(), "default");
        leases
            .get_opt("depwatch")
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec?.holder_identity)
    }

    /// Record and cluster agree on `version`, and no row blames an outside change.
    async fn agree(&self, version: &str) {
        let r = self
            .store
            .service(&web())
            .await
            .expect("read")
            .expect("row");
        assert_eq!(r.status, ServiceStatus::Succeeded, "{r:?}");
        assert_eq!(
            r.deployed.get("web").map(String::as_str),
            Some(format!("example.com/web:{version}").as_str())
        );
        let h = self.store.history(Some(&web()), 50).await.expect("history");
        assert!(
            !h.iter().any(|d| {
                let o = d.outcome.as_str();
                o == "drift" || o == "changed_outside"
            }),
            "depwatch's own writes are never drift: {h:?}"
        );
    }

    fn logs(&self) -> String {
        format!("== a\n{}\n== b\n{}", self.a.log_text(), self.b.log_text())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healed_partition_of_the_leader_leaves_exactly_one_replica_acting() {
    let p = pair(true).await;
    // Cut off with a renewal of its Lease on the wire, for longer than the Lease (3 s): b
    // takes over and deploys two versions meanwhile, which `a` (its file sync cut off too)
    // never sees: it still thinks it leads when the partition heals.
    p.proxy.hold_next("PATCH", LEASE);
    let renewal = wait_for("a renewal on the wire", Duration::from_secs(30), || async {
        p.proxy.held()
    })
    .await;
    p.proxy.partition();
    p.b_leads().await;
    p.save("1.2", false);
    p.recorded("1.2").await;
    p.save("1.3", false);
    p.recorded("1.3").await;
    wait_for(
        "a cut off for longer than the Lease",
        Duration::from_secs(10),
        || async { (renewal.read_at.elapsed() > Duration::from_secs(4)).then_some(()) },
    )
    .await;
    let healed_at = Instant::now();
    p.proxy.heal();
    p.proxy.release();
    let landed = wait_for(
        "the held renewal answered",
        Duration::from_secs(30),
        || async { p.proxy.held().filter(|e| e.status.is_some()) },
    )
    .await;
    assert_eq!(
        landed.status,
        Some(409),
        "a renewal of a Lease another replica took since is refused: {renewal:?}\n{}",
        p.logs()
    );
    // Whatever else `a` sent while cut off lands now, refused by the version it carries.
    for e in p.proxy.exchanges() {
        if e.method == "PATCH" && e.path.contains("/leases/") && e.read_at < healed_at {
            if let Some(status) = e
                .status
                .filter(|_| e.delivered_at.is_some_and(|d| d >= healed_at))
            {
                assert_eq!(
                    status, 409,
                    "a Lease write held by the partition is refused: {e:?}"
                );
            }
        }
    }
    // The old leader learns it lost and stops; the new one goes on.
    let a_log = p.a.log.clone();
    wait_for("a to stop acting", Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&a_log).unwrap_or_default();
        log.contains("the Lease is lost").then_some(())
    })
    .await;
    // Two Lease durations and more: the Lease stays held by the new leader.
    let settle = Instant::now() + Duration::from_secs(7);
    wait_for(
        "the Lease to stay held",
        Duration::from_secs(15),
        || async {
            let holder = p.holder().await;
            assert!(
                holder.as_deref().is_some_and(|h| !h.is_empty()),
                "the Lease is never left without a holder: {holder:?}\n{}",
                p.logs()
            );
            (Instant::now() >= settle).then_some(())
        },
    )
    .await;
    assert!(
        !p.b.log_text().contains("the Lease is lost"),
        "the new leader never stops: {}",
        p.logs()
    );
    // Exactly one replica acts: the next save is deployed, once.
    let before = p.env.patches("prod", "web");
    p.save("1.4", true);
    p.recorded("1.4").await;
    let applied = common::audit_count(&p.env.audit, |l| {
        l["method"] == "PATCH" && l["path"] == WEB && l["code"] == 200
    });
    assert_eq!(
        p.env.patches("prod", "web") - before,
        1,
        "one PATCH for 1.4"
    );
    assert!(applied >= 3, "1.2, 1.3 and 1.4 were patched: {applied}");
    p.agree("1.4").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_held_fifteen_seconds_then_delivered_is_refused() {
    let p = pair(false).await;
    p.proxy.hold_next("PATCH", WEB);
    p.env.write_dep("web_prod.dep", "1.2\n");
    let held = wait_for("a's PATCH to be held", Duration::from_secs(30), || async {
        p.proxy.held()
    })
    .await;
    // a is cut off with its PATCH on the wire: b takes over, deploys 1.2 again and then 1.3.
    p.proxy.partition();
    p.b_leads().await;
    p.recorded("1.2").await;
    p.env.write_dep("web_prod.dep", "1.3\n");
    p.recorded("1.3").await;
    wait_for(
        "15 s since the PATCH was sent",
        Duration::from_secs(60),
        || async { (held.read_at.elapsed() >= Duration::from_secs(15)).then_some(()) },
    )
    .await;
    p.proxy.heal();
    p.proxy.release();
    let delivered = wait_for(
        "the held PATCH answered",
        Duration::from_secs(30),
        || async { p.proxy.held().filter(|e| e.status.is_some()) },
    )
    .await;
    assert_eq!(
        delivered.status,
        Some(409),
        "a PATCH decided on an older version is refused: {delivered:?}\n{}",
        p.logs()
    );
    assert!(
        delivered
            .delivered_at
            .is_some_and(|d| d.duration_since(held.read_at) >= Duration::from_secs(15)),
        "{delivered:?}"
    );
    assert_eq!(p.env.image("prod", "web").await, "example.com/web:1.3");
    // The new leader stays on 1.3 and blames nobody.
    p.recorded("1.3").await;
    p.agree("1.3").await;
    assert!(
        !p.b.log_text().contains("the Lease is lost"),
        "{}",
        p.logs()
    );
}

/// The proxy does what the tests above rely on: passes, delays, holds one request until
/// released, hangs everything while partitioned (delivering it on heal), refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_passes_delays_holds_partitions_and_refuses() {
    use k8s_openapi::api::core::v1::Namespace;
    let sim = depwatch::sim::Sim::start(SimConfig::default())
        .await
        .expect("sim");
    let proxy = Proxy::start(sim.addr()).await;
    let config = kube::Config::new(proxy.url().parse().expect("url"));
    let client = kube::Client::try_from(config).expect("client");
    let nss: kube::Api<Namespace> = kube::Api::all(client);
    let get = || {
        let nss = nss.clone();
        tokio::spawn(async move { nss.get("default").await.is_ok() })
    };
    assert!(get().await.expect("join"), "passes");
    let last = proxy.exchanges().pop().expect("logged");
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.status),
        ("GET", "/api/v1/namespaces/default", Some(200))
    );

    proxy.set_delay(Duration::from_millis(300));
    let t = Instant::now();
    assert!(get().await.expect("join"));
    assert!(t.elapsed() >= Duration::from_millis(300), "delayed");
    proxy.set_delay(Duration::ZERO);

    proxy.hold_next("GET", "/api/v1/namespaces/default");
    let held = get();
    let caught = wait_for("the request held", Duration::from_secs(10), || async {
        proxy.held()
    })
    .await;
    assert!(caught.delivered_at.is_none() && !held.is_finished());
    proxy.release();
    assert!(held.await.expect("join"), "delivered once released");
    let delivered = proxy.held().expect("held");
    assert_eq!(delivered.status, Some(200));
    assert!(delivered.delivered_at.is_some());

    proxy.partition();
    let cut = get();
    let waited = tokio::time::timeout(Duration::from_millis(500), async {
        while !cut.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_err(), "nothing passes a partition");
    proxy.heal();
    assert!(cut.await.expect("join"), "delivered on heal");

    proxy.set_mode(common::proxy::Mode::Refuse);
    assert!(!get().await.expect("join"), "refused");
}

/// A PATCH refused because the workload was written since its plan is sent again over a
/// write that changed nothing it decided on (here a label; a controller's status write does
/// the same), and planned again from the workload as it is over one that did (another image):
/// either way patched once more, one history row, succeeded, and the newer write kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_met_by_a_newer_write_is_sent_again_or_planned_again_on_one_row() {
    // (the newer write, what the workload then runs apart from web)
    let label = serde_json::json!({"metadata": {"labels": {"team": "web"}}});
    let image = serde_json::json!({"spec": {"template": {"spec": {"containers": [
        {"name": "side", "image": "example.com/side:2"}]}}}});
    for (case, write) in [("a label", label), ("another image", image)] {
        met_by_a_newer_write(case, write).await;
    }
}

async fn met_by_a_newer_write(case: &str, write: serde_json::Value) {
    use kube::api::{Patch, PatchParams};
    let env = Env::new(SimConfig::default()).await;
    env.deployment(
        "prod",
        "web",
        &[
            ("web", "example.com/web:1.0"),
            ("side", "example.com/side:1"),
        ],
        1,
    )
    .await;
    env.write_dep("web_prod.dep", "1.0\n");
    let proxy = Proxy::start(env.sim.addr()).await;
    let proxied = env.dir.path().join("kubeconfig-proxied");
    proxy.write_kubeconfig(&proxied);
    let mut args = env.run_args();
    let at = args
        .iter()
        .position(|a| a == "--kubeconfig")
        .expect("kubeconfig arg")
        + 1;
    args[at] = proxied.display().to_string();
    args.extend(["--debounce".to_string(), "50ms".to_string()]);
    let daemon = env.daemon_with(&args, &[], env.dir.path()).await;
    let store = env.store();
    proxy.hold_next("PATCH", WEB);
    env.write_dep("web_prod.dep", "1.1\n");
    wait_for("the PATCH held", Duration::from_secs(30), || async {
        proxy.held()
    })
    .await;
    let deployments: kube::Api<k8s_openapi::api::apps::v1::Deployment> =
        kube::Api::namespaced(env.client.clone(), "prod");
    deployments
        .patch("web", &PatchParams::default(), &Patch::Strategic(write))
        .await
        .expect("the newer write");
    proxy.release();
    wait_for(
        "1.1 deployed and recorded",
        Duration::from_secs(60),
        || async {
            let r = store.service(&web()).await.ok()??;
            (r.status == ServiceStatus::Succeeded
                && r.deployed.get("web").map(String::as_str) == Some("example.com/web:1.1"))
            .then_some(())
        },
    )
    .await;
    let log = daemon.log_text();
    assert_eq!(
        proxy.held().and_then(|e| e.status),
        Some(409),
        "{case}: {log}"
    );
    let patches: Vec<_> = proxy
        .exchanges()
        .into_iter()
        .filter(|e| e.method == "PATCH" && e.path == WEB)
        .map(|e| e.status)
        .collect();
    // Refused until sent at the newest version (the controller's status writes may refuse it
    // again meanwhile), then applied once.
    let (last, refused) = patches.split_last().expect("patches");
    assert_eq!(*last, Some(200), "{case}: {patches:?}");
    assert!(
        !refused.is_empty() && refused.iter().all(|s| *s == Some(409)),
        "{case}: {patches:?}"
    );
    let h = store.history(Some(&web()), 10).await.expect("history");
    let rows: Vec<_> = h.iter().filter(|d| d.to_image.contains("1.1")).collect();
    assert_eq!(rows.len(), 1, "{case}: one row for one save: {h:?}");
    let now = deployments.get("web").await.expect("get");
    let running: Vec<String> = now
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers.into_iter().filter_map(|c| c.image).collect())
        .unwrap_or_default();
    assert!(
        running.contains(&"example.com/web:1.1".to_string()),
        "{case}: {running:?}"
    );
    if case == "a label" {
        let labels = now.metadata.labels.unwrap_or_default();
        assert_eq!(
            labels.get("team").map(String::as_str),
            Some("web"),
            "{case}"
        );
    } else {
        assert!(
            running.contains(&"example.com/side:2".to_string()),
            "{case}: {running:?}"
        );
    }
}
