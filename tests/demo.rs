//! `depwatch demo` as a new user runs it: a deploy, a failure and a timeout, no cluster.

use std::process::Command;

#[test]
fn the_demo_shows_a_deploy_a_failure_and_a_timeout() {
    let out = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["demo", "--once"])
        .env("NO_COLOR", "1")
        .env("DEPWATCH_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .expect("demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("Try:"),
        "explains how to change a file: {stdout}"
    );
    let line = |svc: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("demo/{svc}:")))
            .unwrap_or_else(|| panic!("no summary line for {svc}: {stdout}"))
            .to_string()
    };
    assert!(line("web").contains("succeeded"), "{}", line("web"));
    assert!(line("api").contains("ImagePullBackOff"), "{}", line("api"));
    assert!(
        line("worker").contains("CrashLoopBackOff"),
        "{}",
        line("worker")
    );
    assert!(
        line("reports").contains("not healthy after"),
        "{}",
        line("reports")
    );
    assert!(
        stderr.contains("rollout healthy"),
        "a live log a person can follow"
    );
}
