//! `depwatch sim` as a process: kubeconfig, audit log, state file and restart on the same port.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{audit_count, Kubectl};

fn start(args: &[&str]) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .arg("sim")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("depwatch sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .expect("address printed")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    (child, url)
}

fn stop(mut child: Child) {
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("exits");
    assert!(exit.success(), "sim exits cleanly on SIGTERM: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_process_keeps_state_across_a_restart_on_the_same_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kc = dir.path().join("kubeconfig");
    let audit = dir.path().join("audit.jsonl");
    let state = dir.path().join("state.json");
    let arg = |p: &std::path::Path| p.to_str().expect("utf-8").to_string();
    let (child, url) = start(&[
        "--addr",
        "127.0.0.1:0",
        "--kubeconfig-out",
        &arg(&kc),
        "--audit-log",
        &arg(&audit),
        "--state-file",
        &arg(&state),
    ]);
    let k = Kubectl::new(
        dir.path(),
        &std::fs::read_to_string(&kc).expect("kubeconfig written"),
    );
    k.ok(&["create", "ns", "kept"]).await;
    stop(child);
    assert!(state.exists(), "state saved at exit");
    assert!(
        audit_count(&audit, |l| l["method"] == "POST"
            && l["path"] == "/api/v1/namespaces"
            && l["code"] == 201)
            == 1,
        "the create is audited with its response code"
    );

    let addr = url.trim_start_matches("http://").to_string();
    let (child, url2) = start(&["--addr", &addr, "--state-file", &arg(&state)]);
    assert_eq!(url, url2, "same port");
    let out = k.ok(&["get", "ns", "kept", "-o", "name"]).await;
    assert_eq!(out.trim(), "namespace/kept");
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_scenarios_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["sim", "--error-rate", "2"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--error-rate"));
    let scenario = dir.path().join("bad.yaml");
    std::fs::write(&scenario, "rules: [{match: a, behaviour: explode}]").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["sim", "--scenario", scenario.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml"), "{err}");
}
