//! Approvals end to end through the binary: a save the policy says needs approvers waits as
//! `awaiting_approval` (nothing patched) until enough distinct people approve it, through the
//! API (the token's name) or locally (the Unix user); the requester cannot approve it; a newer
//! save voids the approvals of the one it replaces; the wait and the words survive a restart;
//! a rejection, or the end of the wait, rejects it with one history row; an approval binds to
//! the digests the registry named; an approved deploy that fails is rolled back without
//! asking anyone.

mod common;

use std::path::Path;
use std::time::Duration;

use common::daemon::{Daemon, Env};
use common::key;
use depwatch::domain::{DeployOutcome, ServiceStatus, VoteKind};
use depwatch::sim::SimConfig;
use serde_json::{json, Value};

const CI: &str = "ci-token-0123456789";
const ALICE: &str = "alice-token-0123456789";
const BOB: &str = "bob-token-0123456789";

/// Tokens named `ci`, `alice` and `bob`.
fn tokens(env: &Env) -> std::path::PathBuf {
    let path = env.dir.path().join("tokens");
    std::fs::write(&path, format!("ci:{CI}\nalice:{ALICE}\nbob:{BOB}\n")).expect("tokens");
    path
}

async fn daemon(env: &Env, tokens: &Path) -> Daemon {
    env.daemon(&[
        "--http-addr",
        "127.0.0.1:0",
        "--api-token-file",
        tokens.to_str().expect("utf-8"),
        "--rollout-timeout",
        "20s",
    ])
    .await
}

/// A simulated cluster with Deployment prod/web at `example.com/web:1.0`, the policy file
/// `policy`, and the daemon with the three tokens; the environment, the daemon and the tokens.
async fn started(policy: &str) -> (Env, Daemon, std::path::PathBuf) {
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    env.write_dep("depwatch-policy.yaml", policy);
    let tokens = tokens(&env);
    let d = daemon(&env, &tokens).await;
    (env, d, tokens)
}

/// `POST …/prod/web/{verb}?comment=…` as the token's owner: the status and the answer.
async fn vote(url: &str, token: &str, verb: &str, comment: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{url}/api/v1/services/prod/web/{verb}"))
        .query(&[("comment", comment)])
        .bearer_auth(token)
        .send()
        .await
        .expect("post");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

async fn message(env: &Env) -> String {
    let row = env
        .store()
        .service(&key("web", "prod"))
        .await
        .expect("read");
    row.map(|r| r.message).unwrap_or_default()
}

async fn wait_message(env: &Env, words: &str) -> String {
    env.wait_or_show(words, Duration::from_secs(20), || async {
        let m = message(env).await;
        m.contains(words).then_some(m)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_distinct_approvers_let_a_save_go_and_a_newer_save_voids_earlier_approvals() {
    let (env, d, _) = started("rules:\n  - namespaces: [prod]\n    approvals: 2\n").await;
    env.deployment("staging", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let url = d.http_url();
    let web = key("web", "prod");
    let http = reqwest::Client::new();
    let deploy = |version: &str| {
        http.post(format!("{url}/api/v1/deploys"))
            .bearer_auth(CI)
            .json(&json!({"service": "web", "namespace": "prod", "version": version}))
            .send()
    };

    // Staging has no rule: deployed at once.
    env.write_dep("web_staging.dep", "1.1\n");
    env.wait_status(
        &key("web", "staging"),
        ServiceStatus::Succeeded,
        Duration::from_secs(20),
    )
    .await;
    // Through the API as `ci`: the save waits, asked by the token's name.
    assert_eq!(deploy("1.1").await.expect("deploy").status(), 202);
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    let m = message(&env).await;
    assert!(
        m.starts_with("awaiting approval (0 of 2), asked by ci")
            && m.contains("`depwatch approve prod/web`")
            && m.contains("POST /api/v1/services/prod/web/approve"),
        "{m}"
    );
    // The team is told once, with the command and the API call that approve.
    let asked = env
        .wait_or_show("the approval message", Duration::from_secs(20), || async {
            env.messages()
                .into_iter()
                .find(|m| common::daemon::text(m).contains("needs approval to deploy web (prod)"))
        })
        .await;
    let text = common::daemon::text(&asked);
    assert!(
        text.contains("depwatch approve prod/web")
            && text.contains("/api/v1/services/prod/web/approve"),
        "{text}"
    );
    assert_eq!(common::daemon::colour(&asked), "#daa038");
    // The status word on the CLI, the API, the page and the metrics.
    let out = env.cli(&["status", "-n", "prod"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("awaiting_approval"), "{text}");
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{url}{path}");
        async move {
            http.get(url)
                .send()
                .await
                .expect("get")
                .text()
                .await
                .expect("body")
        }
    };
    let api: Value = serde_json::from_str(&get("/api/v1/services/prod/web").await).expect("json");
    assert_eq!(api["service"]["status"], "awaiting_approval", "{api}");
    assert!(get("/").await.contains("awaiting_approval"));
    assert!(get("/metrics")
        .await
        .contains("depwatch_services{status=\"awaiting_approval\",kind=\"deployment\"} 1"));

    // The requester cannot approve; an approver approves once.
    let (status, body) = vote(&url, CI, "approve", "").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("ci asked for this save of prod/web, so cannot approve it"),
        "{body}"
    );
    let (status, body) = vote(&url, ALICE, "approve", "looks good").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("alice approved 1.1"), "{body}");
    wait_message(&env, "awaiting approval (1 of 2: alice)").await;
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("already approved"), "{body}");
    assert_eq!(
        env.patches("prod", "web"),
        0,
        "nothing patched while awaiting"
    );

    // A newer save replaces it: alice's approval was for 1.1 and no longer counts.
    assert_eq!(deploy("1.2").await.expect("deploy").status(), 202);
    wait_message(&env, "awaiting approval (0 of 2)").await;
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains("alice approved 1.2"), "{body}");
    wait_message(&env, "awaiting approval (1 of 2: alice)").await;
    let (status, body) = vote(&url, BOB, "approve", "ship it").await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(&web, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.2");
    assert_eq!(
        env.patches("prod", "web"),
        1,
        "one deploy: the approved save"
    );
    let h = env.store().history(Some(&web), 5).await.expect("history");
    assert_eq!(h[0].actor, "ci (approved by alice, bob)", "{h:?}");
    assert_eq!(h.len(), 1, "{h:?}");

    // The record holds every word, with its actor, content and comment.
    let words: Vec<Value> = http
        .get(format!("{url}/api/v1/services/prod/web/approvals"))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    let said: Vec<(String, String, String)> = words
        .iter()
        .map(|w| {
            let s = |f: &str| w[f].as_str().unwrap_or_default().to_string();
            (s("kind"), s("actor"), s("images"))
        })
        .collect();
    let want = [
        ("request", "ci", "1.1"),
        ("approve", "alice", "1.1"),
        ("request", "ci", "1.2"),
        ("approve", "alice", "1.2"),
        ("approve", "bob", "1.2"),
    ];
    assert_eq!(
        said,
        want.map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())),
        "{words:?}"
    );
    assert_eq!(words[1]["comment"], "looks good");
    // `history` shows them.
    let out = env.cli(&["history", "prod/web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Approvals, newest first") && text.contains("ship it"),
        "{text}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_awaiting_approval_keeps_its_wait_and_words_across_a_restart() {
    let (env, d, tokens) =
        started("rules:\n  - namespaces: [\"prod*\"]\n    approvals: 1\n    approvalTimeout: 2h\n")
            .await;
    // The file's own YAML asks for a second approver on top of the policy's one.
    let url = d.http_url();
    let web = key("web", "prod");
    // Saved by CI as a file: the requester is the file's owner, the Unix user running this.
    let me = depwatch::safefs::current_user();
    env.write_dep("web_prod.dep", "version: \"1.1\"\napprovals: 2\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    let before = wait_message(&env, &format!("(0 of 2), asked by {me}")).await;
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 202, "{body}");
    wait_message(&env, "(1 of 2: alice)").await;

    // A restart: still waiting, with the same deadline and alice's approval.
    d.stop();
    let d = daemon(&env, &tokens).await;
    let url = d.http_url();
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    let after = wait_message(&env, "(1 of 2: alice)").await;
    let deadline = |m: &str| {
        m.split("rejected if not approved by ")
            .nth(1)
            .map(|r| r[..23].to_string())
    };
    assert_eq!(deadline(&before), deadline(&after), "{before}\n{after}");
    assert_eq!(env.patches("prod", "web"), 0);

    // Locally the approver is the Unix user, who saved the file: refused.
    let out = env.cli(&["approve", "prod/web"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("{me} asked for this save")), "{err}");
    // The second approver.
    let (status, body) = vote(&url, BOB, "approve", "").await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(&web, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.1");
    let h = env.store().history(Some(&web), 5).await.expect("history");
    assert_eq!(h[0].actor, "file (approved by alice, bob)", "{h:?}");
    // Nothing awaits any more: approving again is refused.
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("nothing awaits approval for prod/web"),
        "{body}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_not_approved_in_time_or_rejected_gets_one_history_row_and_never_deploys() {
    let (env, d, tokens) =
        started("rules:\n  - namespaces: [prod]\n    approvals: 1\n    approvalTimeout: 6s\n")
            .await;
    let web = key("web", "prod");
    let store = env.store();
    let rejected = || async {
        store
            .history(Some(&web), 10)
            .await
            .expect("history")
            .into_iter()
            .filter(|h| h.outcome == DeployOutcome::Rejected)
            .collect::<Vec<_>>()
    };

    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    // The wait runs out: rejected by itself, with one history row.
    env.wait_status(&web, ServiceStatus::Rejected, Duration::from_secs(30))
        .await;
    let rows = rejected().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert!(
        rows[0]
            .message
            .contains("not approved within 6s (0 of 1 approvals: none)"),
        "{rows:?}"
    );
    assert_eq!(rows[0].to_image, "1.1");
    // A restart finds it rejected, and writes no second row.
    d.stop();
    let d = daemon(&env, &tokens).await;
    let url = d.http_url();
    // (The daemon watches only once its start-up scan has judged every file.)
    assert_eq!(rejected().await.len(), 1);
    assert_eq!(
        store
            .service(&web)
            .await
            .expect("read")
            .expect("row")
            .status,
        ServiceStatus::Rejected
    );
    // Nothing awaits: approving is refused.
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 409, "{body}");
    let out = env.cli(&["status", "-n", "prod"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("rejected"));
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("depwatch_services{status=\"rejected\",kind=\"deployment\"} 1"),
        "{metrics}"
    );

    // A newer save asks again; an approver rejects it, with a comment.
    env.write_dep("web_prod.dep", "1.2\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    let (status, body) = vote(&url, ALICE, "reject", "not during the sale").await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(&web, ServiceStatus::Rejected, Duration::from_secs(20))
        .await;
    assert!(message(&env)
        .await
        .starts_with("rejected by alice: not during the sale"));
    let rows = env
        .wait_or_show("two rejected rows", Duration::from_secs(20), || async {
            let r = rejected().await;
            (r.len() == 2).then_some(r)
        })
        .await;
    assert_eq!(rows[0].message, "rejected by alice: not during the sale");
    assert_eq!(env.patches("prod", "web"), 0, "nothing ever deployed");
    // Each rejection was told once, in red.
    let told = env
        .wait_or_show(
            "two rejection messages",
            Duration::from_secs(20),
            || async {
                let r: Vec<_> = env
                    .messages()
                    .into_iter()
                    .filter(|m| common::daemon::text(m).contains("rejected a save of web (prod)"))
                    .collect();
                (r.len() == 2).then_some(r)
            },
        )
        .await;
    assert_eq!(common::daemon::colour(&told[0]), "#d40e0d");
    let votes = store.votes(&web).await.expect("votes");
    assert_eq!(
        votes
            .iter()
            .filter(|v| v.kind == VoteKind::Recorded)
            .count(),
        2,
        "{votes:?}"
    );
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_binds_to_the_digest_the_registry_named_and_a_moved_tag_is_not_deployed() {
    let registry = common::registry::Registry::start(false).await;
    registry.push("team/web", "1.0").await;
    let approved = registry.push("team/web", "1.1").await;
    let image = |tag: &str| format!("{}/team/web:{tag}", registry.addr());
    let env = Env::new(SimConfig::default()).await;
    env.deployment("prod", "web", &[("web", &image("1.0"))], 1)
        .await;
    env.write_dep(
        "depwatch-policy.yaml",
        "rules:\n  - namespaces: [prod]\n    approvals: 1\n",
    );
    let tokens = tokens(&env);
    let d = env
        .daemon(&[
            "--http-addr",
            "127.0.0.1:0",
            "--api-token-file",
            tokens.to_str().expect("utf-8"),
            "--registry-check",
            "on",
            "--registry-wait",
            "2s",
        ])
        .await;
    let url = d.http_url();
    let web = key("web", "prod");
    let store = env.store();
    let resolved = |hash_of_digest: String| {
        let store = &store;
        let web = &web;
        async move {
            store
                .votes(web)
                .await
                .ok()?
                .into_iter()
                .rev()
                .find(|v| v.kind == VoteKind::Resolved)
                .filter(|v| v.digests == format!("web={hash_of_digest}"))
        }
    };

    // Requested: the pre-flight's digest of 1.1 is recorded beside the request.
    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    env.wait_or_show("the digest of 1.1", Duration::from_secs(20), || {
        resolved(approved.clone())
    })
    .await;
    // The tag moves before the approval: the approval names what was requested…
    let moved = registry.push_build("team/web", "1.1", "rebuilt").await;
    assert_ne!(moved, approved);
    let (status, body) = vote(&url, ALICE, "approve", "").await;
    assert_eq!(status, 202, "{body}");
    assert!(body.contains(&format!("images web={approved}")), "{body}");
    // …and the deploy, finding another digest, stops before its PATCH.
    env.wait_status(&web, ServiceStatus::Failed, Duration::from_secs(30))
        .await;
    let m = message(&env).await;
    assert!(
        m.contains(&format!(
            "web was {approved} when approved, the registry now says {moved}"
        )) && m.contains("nothing patched"),
        "{m}"
    );
    assert_eq!(env.patches("prod", "web"), 0);

    // Changing the file asks again, for what the tag names now.
    env.write_dep("web_prod.dep", "1.1  # rebuilt\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    env.wait_or_show(
        "the digest of the rebuilt 1.1",
        Duration::from_secs(20),
        || resolved(moved.clone()),
    )
    .await;
    let (status, body) = vote(&url, BOB, "approve", "").await;
    assert_eq!(status, 202, "{body}");
    env.wait_status(&web, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    assert_eq!(env.image("prod", "web").await, image("1.1"));
    let h = store.history(Some(&web), 1).await.expect("history");
    assert!(h[0].digests.contains(&moved), "{h:?}");
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_needing_approval_during_an_older_deploy_says_so_once_that_deploy_ends() {
    let env = Env::new(SimConfig {
        ready_delay: Duration::from_secs(3),
        ..SimConfig::default()
    })
    .await;
    env.deployment("prod", "web", &[("web", "example.com/web:1.0")], 1)
        .await;
    let tokens = tokens(&env);
    let d = daemon(&env, &tokens).await;
    let web = key("web", "prod");
    // 1.1 needs no approval and rolls out slowly; 1.2 asks for one meanwhile.
    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(&web, ServiceStatus::Deploying, Duration::from_secs(20))
        .await;
    env.write_dep("web_prod.dep", "version: \"1.2\"\napprovals: 1\n");
    // The older deploy is not superseded by a save that may not go: it finishes…
    env.wait_image("prod", "web", "example.com/web:1.1").await;
    // …and then the row says the newer save waits, without another save or a resync.
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    let h = env.store().history(Some(&web), 5).await.expect("history");
    assert_eq!(h[0].outcome, DeployOutcome::Succeeded, "{h:?}");
    assert_eq!(env.patches("prod", "web"), 1);
    d.stop();
}

/// `depwatch VERB prod/web --api URL --token-file FILE` as the token's owner.
fn remote_cli(env: &Env, url: &str, token: &str, verb: &str) -> std::process::Output {
    let file = env.dir.path().join(format!("token-{verb}-{}", &token[..3]));
    std::fs::write(&file, format!("{token}\n")).expect("token file");
    std::process::Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args([verb, "prod/web", "--api", url, "--token-file"])
        .arg(&file)
        .env("NO_COLOR", "1")
        .output()
        .expect("the command runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_deploy_that_fails_is_rolled_back_at_once_without_asking_again() {
    let (env, d, _) = started("rules:\n  - namespaces: [prod]\n    approvals: 1\n").await;
    let url = d.http_url();
    let web = key("web", "prod");
    let approve = || {
        let out = remote_cli(&env, &url, ALICE, "approve");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    env.write_dep("web_prod.dep", "1.1\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    // `depwatch approve --api`: the token's name approves.
    assert!(approve().contains("alice approved 1.1"));
    env.wait_status(&web, ServiceStatus::Succeeded, Duration::from_secs(30))
        .await;
    env.write_dep("web_prod.dep", "1.2-crash\n");
    env.wait_status(
        &web,
        ServiceStatus::AwaitingApproval,
        Duration::from_secs(20),
    )
    .await;
    approve();
    // The approved version crashes: rolled back to 1.1 at once, nothing asked of anyone.
    env.wait_status(&web, ServiceStatus::RolledBack, Duration::from_secs(60))
        .await;
    assert_eq!(env.image("prod", "web").await, "example.com/web:1.1");
    let votes = env.store().votes(&web).await.expect("votes");
    let requests: Vec<&str> = votes
        .iter()
        .filter(|v| v.kind == VoteKind::Request)
        .map(|v| v.images.as_str())
        .collect();
    assert_eq!(requests, ["1.1", "1.2-crash"], "{votes:?}");
    // `depwatch reject --api` when nothing awaits: refused, naming the status.
    let out = remote_cli(&env, &url, BOB, "reject");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing awaits approval for prod/web"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    d.stop();
}
