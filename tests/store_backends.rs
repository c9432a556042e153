//! One store test suite, run on both record backends: the embedded SQLite (the default) and
//! PostgreSQL (`--database-url`) on a throwaway server.

mod common;

use depwatch::domain::approval::Vote;
use depwatch::domain::{DeployOutcome, Images, ServiceKey, ServiceStatus, Trigger, VoteKind};
use depwatch::store::{now, DeployRecord, RequestRecord, ServiceChange, Store};

fn deploy(ns: &str, name: &str) -> DeployRecord {
    DeployRecord {
        namespace: ns.into(),
        name: name.into(),
        trigger: Trigger::File,
        actor: "file".into(),
        from_image: "web=example.com/web:1.0".into(),
        to_image: "web=example.com/web:1.1".into(),
        started_at: now(),
        outcome: DeployOutcome::InProgress,
        ..DeployRecord::default()
    }
}

/// Everything the daemon, the API and the CLI ask of a record.
async fn suite(s: &Store) {
    let key = ServiceKey::new("web", "demo").expect("key");
    assert!(s.service(&key).await.expect("q").is_none());
    let mut changes = s.subscribe();
    let before = *changes.borrow_and_update();

    // Services: created on first update, changed in place, listed in order.
    s.change_service(
        &key,
        ServiceChange::default()
            .desired(Images::parse(
                "web=example.com/web:1.1, side=example.com/s:2",
            ))
            .status(ServiceStatus::Deploying)
            .suspended(true)
            .path("/deps/web_demo.dep"),
    )
    .await
    .expect("put");
    assert!(
        *changes.borrow_and_update() > before,
        "writes are announced"
    );
    let r = s.service(&key).await.expect("q").expect("exists");
    assert_eq!(
        r.desired.to_string(),
        "side=example.com/s:2, web=example.com/web:1.1"
    );
    assert_eq!(r.status, ServiceStatus::Deploying);
    assert!(r.suspended);
    assert!(!r.updated_at.is_empty());
    s.change_service(
        &key,
        ServiceChange::default()
            .status(ServiceStatus::Unreadable)
            .suspended(false),
    )
    .await
    .expect("update");
    let r = s.service(&key).await.expect("q").expect("exists");
    assert_eq!(r.status, ServiceStatus::Unreadable);
    assert!(!r.suspended);
    assert_eq!(r.path, "/deps/web_demo.dep", "other fields are kept");
    // An operator's word on a bake, and the bake's end, kept as written.
    let word = depwatch::domain::verify::Judgement {
        hash: "c0ffee".into(),
        ruling: depwatch::domain::verify::Ruling::Promote,
        by: "alice".into(),
        at: "2026-12-06T10:00:00Z".into(),
        reason: String::new(),
    };
    s.change_service(
        &key,
        ServiceChange::default()
            .judged(word.clone())
            .bake_ends_at("2026-12-06T10:05:00Z"),
    )
    .await
    .expect("judged");
    let r = s.service(&key).await.expect("q").expect("exists");
    assert_eq!(r.judged, Some(word));
    assert_eq!(r.bake_ends_at, "2026-12-06T10:05:00Z");
    assert_eq!(r.status, ServiceStatus::Unreadable, "other fields are kept");
    // Several rows in one read, in the order asked, an unknown service as none.
    let nobody = ServiceKey::new("nobody", "demo").expect("key");
    let rows = s
        .services_of(&[nobody.clone(), key.clone()])
        .await
        .expect("batch");
    assert_eq!(rows.len(), 2);
    assert!(rows[0].is_none());
    assert_eq!(rows[1].as_ref().map(|r| r.key()), Some(key.clone()));
    // Guarded fields: a refusal never hides a deploy under way, a path is kept once set.
    s.change_service(
        &key,
        ServiceChange::default().status(ServiceStatus::Deploying),
    )
    .await
    .expect("deploying");
    s.change_service(
        &key,
        ServiceChange::default()
            .status_unless_deploying(ServiceStatus::Invalid)
            .path_if_unset("/deps/other/web_demo.dep")
            .message("bad file"),
    )
    .await
    .expect("refused");
    let r = s.service(&key).await.expect("q").expect("exists");
    assert_eq!(
        (r.status, r.path.as_str(), r.message.as_str()),
        (ServiceStatus::Deploying, "/deps/web_demo.dep", "bad file")
    );
    let other = ServiceKey::new("api", "demo").expect("key");
    s.change_service(&other, ServiceChange::default())
        .await
        .expect("put");
    let names: Vec<String> = s
        .services()
        .await
        .expect("all")
        .iter()
        .map(|r| r.name.clone())
        .collect();
    assert_eq!(names, ["api", "web"]);

    // Deploys: started, found in progress and interrupted, finished, in history newest first.
    let first = s
        .start_deploy(&DeployRecord {
            content_hash: "h-crash".into(),
            kind: "statefulset".into(),
            ..deploy("demo", "web")
        })
        .await
        .expect("start");
    assert_eq!(
        s.in_progress(&key).await.expect("q").map(|d| d.id),
        Some(first)
    );
    s.set_restore(
        first,
        &Images::parse("web=example.com/web:1.0"),
        "CrashLoopBackOff",
    )
    .await
    .expect("restore intent");
    let open = &s.interrupted().await.expect("q")[0];
    assert_eq!(
        (open.restore.as_str(), open.message.as_str()),
        ("web=example.com/web:1.0", "CrashLoopBackOff"),
        "a rollback's intent and reason are on its row"
    );
    assert_eq!(
        (open.content_hash.as_str(), open.kind.as_str()),
        ("h-crash", "statefulset"),
        "the row keeps the content it deployed and the kind it patched"
    );
    let mut bake = depwatch::domain::verify::BakeRow {
        started_at: "2026-12-06T10:00:00Z".into(),
        baselines: depwatch::domain::verify::Baselines(vec![None, Some(0.01)]),
        results: Vec::new(),
    };
    s.set_bake(first, &bake).await.expect("bake");
    assert_eq!(
        s.interrupted().await.expect("q")[0].bake.as_ref(),
        Some(&bake),
        "a bake's start and baselines are on its row"
    );
    // Its end adds the checks' record, as fields of their own.
    bake.results = vec![depwatch::domain::verify::CheckResult {
        name: "errors".into(),
        samples: 5,
        passed: 2,
        failed: 3,
        last: "0.042".into(),
        baseline: Some(0.01),
        why: "0.042 > baseline 0.01 × 1.2".into(),
        ..Default::default()
    }];
    s.set_bake(first, &bake).await.expect("bake");
    assert_eq!(
        s.interrupted().await.expect("q")[0].bake.as_ref(),
        Some(&bake),
        "the checks' results are on its row"
    );
    // A second open row: both listed, newest first.
    let newer = s.start_deploy(&deploy("demo", "web")).await.expect("start");
    let ids: Vec<i64> = s
        .open_deploys(&key)
        .await
        .expect("q")
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(ids, [newer, first]);
    s.finish_deploy(newer, DeployOutcome::Superseded, "replaced")
        .await
        .expect("finish");
    assert_eq!(s.interrupted().await.expect("q").len(), 1);
    s.finish_deploy(first, DeployOutcome::RolledBack, "ImagePullBackOff")
        .await
        .expect("finish");
    let second = s
        .start_deploy(&DeployRecord {
            request_id: "req-1".into(),
            ..deploy("demo", "web")
        })
        .await
        .expect("start");
    assert!(second > first, "ids grow");
    s.finish_deploy(second, DeployOutcome::Succeeded, "healthy")
        .await
        .expect("finish");
    assert!(s.in_progress(&key).await.expect("q").is_none());
    assert!(s.interrupted().await.expect("q").is_empty());
    let h = s.history(Some(&key), 10).await.expect("history");
    assert_eq!(
        h.iter().map(|d| d.id).collect::<Vec<_>>(),
        [second, newer, first]
    );
    assert_eq!(h[2].outcome, DeployOutcome::RolledBack);
    assert_eq!(h[2].message, "ImagePullBackOff");
    assert_eq!(h[0].trigger, Trigger::File);
    assert!(h[0].ended_at.is_some());
    assert_eq!(s.history(None, 1).await.expect("h").len(), 1);
    assert_eq!(
        s.deploy_for_request("req-1")
            .await
            .expect("q")
            .map(|d| d.id),
        Some(second)
    );
    assert!(s.deploy_for_request("req-2").await.expect("q").is_none());

    // Requests: one per idempotency key, the first one wins.
    let req = RequestRecord {
        id: "req-1".into(),
        idempotency_key: "a\nrelease-7".into(),
        body_hash: "h1".into(),
        namespace: "demo".into(),
        name: "web".into(),
        content: "1.1\n".into(),
        actor: "a".into(),
        created_at: now(),
    };
    assert_eq!(s.put_request(&req).await.expect("put"), req);
    let again = s
        .put_request(&RequestRecord {
            id: "req-9".into(),
            body_hash: "h2".into(),
            ..req.clone()
        })
        .await
        .expect("put again");
    assert_eq!(again.id, "req-1", "the key's first request stands");
    assert_eq!(s.request("req-1").await.expect("q"), Some(req.clone()));
    assert_eq!(
        s.request_by_key("a\nrelease-7").await.expect("q"),
        Some(req)
    );
    assert!(s.request("req-9").await.expect("q").is_none());

    // Retention: the newest per service, never an unfinished one.
    for _ in 0..4 {
        let id = s.start_deploy(&deploy("demo", "api")).await.expect("start");
        s.finish_deploy(id, DeployOutcome::Succeeded, "")
            .await
            .expect("finish");
    }
    let open = s.start_deploy(&deploy("demo", "api")).await.expect("start");
    // api: the open deploy and the newest finished one stay; web keeps 2 of its 3.
    assert_eq!(s.prune(2, None).await.expect("prune"), 4);
    assert_eq!(s.history(Some(&other), 10).await.expect("h").len(), 2);
    assert_eq!(
        s.prune(2, Some(std::time::Duration::ZERO))
            .await
            .expect("prune"),
        3,
        "everything finished is older than now"
    );
    assert_eq!(
        s.interrupted()
            .await
            .expect("q")
            .iter()
            .map(|d| d.id)
            .collect::<Vec<_>>(),
        [open]
    );

    // A retry lifts only the pin it saw: a pin made on another version since stays.
    let pinned = ServiceKey::new("pinned", "demo").expect("key");
    let pin = |hash: &str| ServiceChange::default().failed_hash(hash);
    let seen_pinned = "aa11";
    s.change_service(&pinned, pin(seen_pinned))
        .await
        .expect("pin");
    s.change_service(&pinned, ServiceChange::default().unpin(seen_pinned))
        .await
        .expect("unpin");
    let row = s.service(&pinned).await.expect("q").expect("row");
    assert_eq!(row.failed_hash, "", "the pin seen is lifted");
    s.change_service(&pinned, pin("bb22"))
        .await
        .expect("pin again");
    s.change_service(&pinned, ServiceChange::default().unpin(seen_pinned))
        .await
        .expect("late unpin");
    let row = s.service(&pinned).await.expect("q").expect("row");
    assert_eq!(row.failed_hash, "bb22", "a newer pin stays");

    approvals(s).await;
}

/// The approvals table: rows appended per service, read back oldest first with every field,
/// the latest 200 at most; another service's rows apart; kept when the service is forgotten.
async fn approvals(s: &Store) {
    let web = ServiceKey::new("approved", "demo").expect("key");
    let other = ServiceKey::new("other", "demo").expect("key");
    assert!(s.votes(&web).await.expect("votes").is_empty());
    let word = |kind: VoteKind, actor: &str, i: usize| Vote {
        hash: format!("h{i}"),
        images: "1.4.2".into(),
        kind,
        actor: actor.into(),
        comment: format!("comment {i} — ü"),
        at: now(),
        digests: format!("web=sha256:{i:064}"),
    };
    let written = vec![
        word(VoteKind::Request, "ci", 1),
        word(VoteKind::Approve, "alice", 1),
        word(VoteKind::Reject, "bob", 1),
        word(VoteKind::Recorded, "depwatch", 1),
    ];
    for v in &written {
        s.add_vote(&web, v).await.expect("add");
    }
    s.add_vote(&other, &word(VoteKind::Request, "ci", 9))
        .await
        .expect("add other");
    assert_eq!(s.votes(&web).await.expect("votes"), written);
    s.forget_service(&web).await.expect("forget");
    assert_eq!(s.votes(&web).await.expect("votes").len(), 4, "kept");
    for i in 0..205 {
        s.add_vote(&other, &word(VoteKind::Approve, "alice", i))
            .await
            .expect("add");
    }
    let latest = s.votes(&other).await.expect("votes");
    assert_eq!(latest.len(), 200);
    assert_eq!(
        (latest[0].hash.as_str(), latest[199].hash.as_str()),
        ("h5", "h204"),
        "the latest 200, oldest first"
    );
}

/// Services, deploys and refused files read one page at a time: every row once, in order,
/// with the filter and the count, whatever the page length.
async fn pages(s: &Store) {
    use depwatch::store::{ServiceFilter, ServicesQuery};
    // Names whose order differs between "namespace/name" text and (namespace, name).
    let keys = [
        ("demo", "ab"),
        ("demo", "a-b"),
        ("demo", "a"),
        ("demo-2", "z"),
        ("demo2", "b"),
        ("x", "web"),
        ("x", "web.v2"),
    ];
    for (i, (ns, name)) in keys.iter().enumerate() {
        let status = match i % 2 {
            0 => ServiceStatus::Failed,
            _ => ServiceStatus::Succeeded,
        };
        s.change_service(
            &ServiceKey::new(name, ns).expect("key"),
            ServiceChange::default().status(status).suspended(i == 3),
        )
        .await
        .expect("put");
    }
    let all: Vec<ServiceKey> = s
        .services()
        .await
        .expect("all")
        .iter()
        .map(|r| r.key())
        .collect();
    assert_eq!(all.len(), keys.len());
    let walk = async |filter: ServiceFilter, limit: usize| {
        let mut q = ServicesQuery {
            after: None,
            filter,
            limit,
        };
        let mut out = Vec::new();
        loop {
            let page = s.services_page(&q).await.expect("page");
            assert!(page.rows.len() <= limit, "{} > {limit}", page.rows.len());
            out.extend(page.rows.iter().map(|r| r.key()));
            match page.next {
                Some(next) => q.after = Some(next),
                None => return (out, page.total),
            }
        }
    };
    for limit in [1, 2, 3, 7, 100] {
        assert_eq!(
            walk(ServiceFilter::All, limit).await,
            (all.clone(), keys.len()),
            "{limit}"
        );
    }
    let (failed, total) = walk(ServiceFilter::Status(ServiceStatus::Failed), 2).await;
    assert_eq!((failed.len(), total), (4, 4));
    for k in &failed {
        assert_eq!(
            s.service(k).await.expect("q").expect("row").status,
            ServiceStatus::Failed
        );
    }
    let (suspended, total) = walk(ServiceFilter::Suspended, 1).await;
    assert_eq!(
        (suspended, total),
        (vec![ServiceKey::new("z", "demo-2").expect("key")], 1)
    );

    // Deploys: newest first, each page older than the last row of the one before.
    let key = ServiceKey::new("paged", "demo").expect("key");
    let mut ids: Vec<i64> = Vec::new();
    for _ in 0..5 {
        ids.push(
            s.start_deploy(&deploy("demo", "paged"))
                .await
                .expect("start"),
        );
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = s.history_page(Some(&key), after, 2).await.expect("page");
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|d| d.id));
        match page.last() {
            Some(last) if page.len() == 2 => after = Some(last.id),
            _ => break,
        }
    }
    assert_eq!(seen, ids.iter().rev().copied().collect::<Vec<_>>());
    let older = s
        .history_page(None, Some(ids[1]), 10)
        .await
        .expect("all services");
    assert!(older.iter().all(|d| d.id < ids[1]), "{older:?}");

    // Refused file names: by path, with the count.
    for i in 0..5 {
        s.refuse_file(&format!("/deps/bad-{i}.dep"), "bad name")
            .await
            .expect("refuse");
    }
    let (first, total) = s.refused_page("", 3).await.expect("page");
    let (rest, _) = s.refused_page(&first[2].path, 3).await.expect("page");
    let paths: Vec<String> = first.iter().chain(&rest).map(|f| f.path.clone()).collect();
    let want: Vec<String> = (0..5).map(|i| format!("/deps/bad-{i}.dep")).collect();
    assert_eq!((paths, total), (want, 5));
}

#[tokio::test]
async fn the_sqlite_record_reads_one_page_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    pages(&Store::open(dir.path()).expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgresql_record_reads_one_page_at_a_time() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("pages").await;
    pages(&Store::connect(&url).await.expect("connect")).await;
}

#[tokio::test]
async fn the_sqlite_record_passes_the_store_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    suite(&Store::open(dir.path()).expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgresql_record_passes_the_store_suite_and_survives_reconnecting() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("suite").await;
    let store = Store::connect(&url).await.expect("connect");
    suite(&store).await;
    // Called from an async worker too, as the daemon does.
    let key = ServiceKey::new("web", "demo").expect("key");
    assert_eq!(
        store
            .service(&key)
            .await
            .expect("q")
            .expect("exists")
            .status,
        ServiceStatus::Deploying
    );
    drop(store);
    // A second connection (another replica, a restart) sees the same record; migrations run
    // once.
    let again = Store::connect(&url).await.expect("reconnect");
    assert_eq!(again.services().await.expect("all").len(), 3);
    // A bad URL is refused without echoing it (it may hold a password).
    let err = Store::connect("postgres://u:hunter2@[::1")
        .await
        .err()
        .expect("bad url");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

/// The daemon keeps its record in PostgreSQL with `--database-url`, and the CLI reads it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_the_cli_share_a_postgresql_record() {
    use std::time::Duration;
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("daemon").await;
    let env = common::daemon::Env::new(depwatch::sim::SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0.0")], 1)
        .await;
    env.write_dep("web_prod.dep", "1.0.1\n");
    let daemon = env
        .daemon_with(
            &env.run_args(),
            &[("DEPWATCH_DATABASE_URL", url.clone())],
            env.dir.path(),
        )
        .await;
    env.wait_image("prod", "web", "example.com/web:1.0.1").await;
    let key = ServiceKey::new("web", "prod").expect("key");
    let record = {
        let url = url.clone();
        Store::connect(&url).await.expect("connect")
    };
    common::wait_for(
        "the outcome in PostgreSQL",
        Duration::from_secs(30),
        || async {
            let r = record.service(&key).await.ok()??;
            (r.status == ServiceStatus::Succeeded).then_some(())
        },
    )
    .await;
    assert!(
        !env.state.join("depwatch.db").exists(),
        "no SQLite record beside the PostgreSQL one"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["history", "prod/web", "--json", "--state-dir"])
        .arg(env.dir.path().join("elsewhere"))
        .env("DEPWATCH_DATABASE_URL", &url)
        .output()
        .expect("history runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let history: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(history[0]["outcome"], "succeeded");
    assert!(
        !daemon.log_text().contains(&url),
        "the database URL is never logged"
    );
    daemon.stop();
}

/// Two writers of one row, each setting only its own fields, never undo each other: an
/// operator's suspend and the recorder's pin land together and both stay.
async fn concurrent_writers(s: &Store) {
    let key = ServiceKey::new("race", "demo").expect("key");
    for round in 0..50 {
        let hash = format!("h{round}");
        s.change_service(&key, ServiceChange::default().suspended(false))
            .await
            .expect("reset");
        let (a, b, k) = (s.clone(), s.clone(), key.clone());
        let suspend = tokio::spawn(async move {
            a.change_service(&k, ServiceChange::default().suspended(true))
                .await
                .expect("suspend")
        });
        let change = ServiceChange::default()
            .content_hash(hash.clone())
            .failed_hash(hash.clone());
        let k = key.clone();
        let pin = tokio::spawn(async move { b.change_service(&k, change).await.expect("pin") });
        suspend.await.expect("joined");
        pin.await.expect("joined");
        let r = s.service(&key).await.expect("q").expect("exists");
        assert!(r.suspended, "round {round}: the suspend was lost");
        assert_eq!(r.failed_hash, hash, "round {round}: the pin was lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_row_never_undo_each_other_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    concurrent_writers(&Store::open(dir.path()).expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_of_one_row_never_undo_each_other_on_postgresql() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("race").await;
    concurrent_writers(&Store::connect(&url).await.expect("connect")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_only_read_never_migrate_a_shared_record() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("untouched").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([
            "status",
            "--database-url",
            &url,
            "--state-dir",
            "/nonexistent",
        ])
        .output()
        .expect("status runs");
    assert!(
        !out.status.success(),
        "an empty database is not a record: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Still empty: the read-only command created no table.
    let reader =
        Store::open_for_reading(std::path::Path::new("/nonexistent"), Some(&url)).expect("connect");
    let tables = reader.services().await.err().map(|e| e.to_string());
    assert!(
        tables.as_deref().is_some_and(|e| e.contains("services")),
        "{tables:?}"
    );
    // The daemon's own connection migrates it.
    let s = Store::connect(&url).await.expect("connect");
    assert!(s.services().await.expect("migrated").is_empty());
}

/// With the daemon's writer, reads racing a stream of writes see each write exactly once: in
/// the backend or in the queue, never in both (an open deploy shown twice) nor in neither (a
/// row going back in time, a deploy closed then open again).
async fn reads_race_the_writer(s: Store) {
    let s = s.with_writer().expect("writer");
    let key = ServiceKey::new("raced", "demo").expect("key");
    let writes = 4990; // the last deploy started (4900) is finished (4950)
    let writer = {
        let (s, key) = (s.clone(), key.clone());
        tokio::spawn(async move {
            let mut open = None;
            for i in 1..=writes {
                s.change_service(&key, ServiceChange::default().path(format!("{i:06}")))
                    .await
                    .expect("change");
                match (i % 100, open) {
                    (0, None) => {
                        open = Some(
                            s.start_deploy(&deploy("demo", "raced"))
                                .await
                                .expect("start"),
                        );
                    }
                    (50, Some(id)) => {
                        s.finish_deploy(id, DeployOutcome::Succeeded, "done")
                            .await
                            .expect("finish");
                        open = None;
                    }
                    _ => {}
                }
                tokio::task::yield_now().await;
            }
        })
    };
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (s, key) = (s.clone(), key.clone());
            tokio::spawn(async move {
                let (mut last, mut reads, mut lengths) =
                    (String::new(), 0, std::collections::HashSet::new());
                while s.health().pending > 0 || last != format!("{writes:06}") {
                    lengths.insert(s.health().pending);
                    let (row, open) = s.deploy_basis(&key).await.expect("read");
                    let path = row.map(|r| r.path).unwrap_or_default();
                    assert!(
                        path >= last,
                        "read {reads}: {path} after {last}: a write seen, then not"
                    );
                    assert!(
                        open.len() <= 1,
                        "read {reads}: one deploy open at most: {open:?}"
                    );
                    last = path;
                    reads += 1;
                    assert!(
                        reads < 1_000_000,
                        "the writes never all showed: last {last}"
                    );
                }
                (reads, lengths.len())
            })
        })
        .collect();
    writer.await.expect("joined");
    let mut seen = (0, 0);
    for r in readers {
        let (reads, lengths) = r.await.expect("reader");
        seen = (seen.0 + reads, seen.1.max(lengths));
    }
    assert!(seen.0 > 20, "the reads raced the writes: {seen:?}");
    assert!(seen.1 > 5, "the queue was seen at many lengths: {seen:?}");
    s.settled().await;
    assert!(s.open_deploys(&key).await.expect("open").is_empty());
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_the_writer_see_each_write_once_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    reads_race_the_writer(Store::open(dir.path()).expect("open")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_the_writer_see_each_write_once_on_postgresql() {
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("raced").await;
    reads_race_the_writer(Store::connect(&url).await.expect("connect")).await;
}

/// A PostgreSQL record that stops answering (a partition: connections hang, no error comes
/// back) delays no writer: 200 saves' changes and deploy rows are queued while it hangs
/// (one enqueue each: a writer that waited on the record would still be waiting), and are
/// written, each once and the newest last, when it answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_postgresql_delays_no_writer_and_gets_every_write_once_it_answers() {
    use std::time::Duration;
    let pg = common::postgres::Postgres::start().await;
    let url = pg.database("hang").await;
    let real = std::net::SocketAddr::from(([127, 0, 0, 1], pg.port));
    let hole = common::blackhole::Blackhole::start(real).await;
    let through = url.replace(
        &format!(":{}/", pg.port),
        &format!(":{}/", hole.addr.port()),
    );
    let store = Store::connect(&through)
        .await
        .expect("connect")
        .with_writer()
        .expect("writer");
    let key = |i: usize| ServiceKey::new(&format!("svc-{i:03}"), "prod").expect("key");
    let version = |i: usize, v: &str| ServiceChange::default().path(format!("/deps/{i}/{v}"));
    store
        .change_service(&key(0), version(0, "before"))
        .await
        .expect("before the outage");
    store.settled().await;

    hole.hang();
    // Every call returns while nothing can reach the record; the deadline only turns a
    // writer stuck behind the record into a failure instead of a hang.
    let saves = async {
        let mut ids = Vec::new();
        for i in 0..200 {
            store
                .change_service(&key(i), version(i, "first"))
                .await
                .expect("queued");
            ids.push(
                store
                    .start_deploy(&deploy("prod", &format!("svc-{i:03}")))
                    .await
                    .expect("started"),
            );
            store
                .change_service(&key(i), version(i, "last"))
                .await
                .expect("queued");
        }
        ids
    };
    let ids = tokio::time::timeout(Duration::from_secs(20), saves)
        .await
        .expect("200 saves queued while the record hangs");
    assert!(store.health().pending >= 600, "{:?}", store.health());

    hole.heal();
    common::wait_for(
        "every write to reach the record",
        Duration::from_secs(60),
        || async { (store.health().pending == 0).then_some(()) },
    )
    .await;
    // Deploys started during the outage finish after it on their own rows.
    for id in &ids {
        store
            .finish_deploy(*id, DeployOutcome::Succeeded, "healthy")
            .await
            .expect("finish");
    }
    store.close().await;
    // Read back through a connection of its own, straight to the server.
    let direct = Store::connect(&url).await.expect("direct");
    let rows = direct.services().await.expect("services");
    assert_eq!(rows.len(), 200);
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.path, format!("/deps/{i}/last"), "{r:?}");
    }
    let history = direct.history(None, 1000).await.expect("history");
    assert_eq!(history.len(), 200, "one row per deploy, none twice");
    assert!(
        history
            .iter()
            .all(|d| d.outcome == DeployOutcome::Succeeded),
        "each finished on its own row"
    );
}
