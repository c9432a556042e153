//! `depwatch demo` as a new user runs it: a deploy, a failure, a timeout and a version that
//! fails its own checks, no cluster.

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
    // With --once the demo exits by itself: no "Try" lines for a cluster that is gone.
    assert!(!stdout.contains("Try"), "{stdout}");
    assert!(stdout.contains("--once"), "{stdout}");
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
        line("checkout").contains("verification failed: GET /healthz: HTTP 500"),
        "{}",
        line("checkout")
    );
    assert!(
        stderr.contains("rollout healthy"),
        "a live log a person can follow"
    );
}

#[test]
fn the_demos_try_lines_run_as_printed() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_depwatch"))
        .args(["demo"])
        .env("NO_COLOR", "1")
        .env("DEPWATCH_HTTP_ADDR", "127.0.0.1:0")
        .env("PATH", "/usr/bin:/bin")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("demo runs");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut tries = Vec::new();
    let mut in_try = false;
    for line in lines.by_ref() {
        let line = line.expect("line");
        if line.starts_with("Try") {
            in_try = true;
            continue;
        }
        if in_try && line.trim().is_empty() {
            break;
        }
        if in_try {
            tries.push(line.trim().to_string());
        }
    }
    let history = tries
        .iter()
        .find(|l| l.contains(" history demo/web "))
        .unwrap_or_else(|| panic!("a history line: {tries:?}"))
        .clone();
    // depwatch is not on this PATH: the line names the binary itself.
    assert!(history.starts_with('/'), "{history}");
    // Once the demo has recorded web, the line works as printed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let out = loop {
        let out = Command::new("sh")
            .arg("-c")
            .arg(&history)
            .output()
            .expect("sh");
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // SIGTERM: the demo cleans up its temporary directory.
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    assert!(
        out.status.success(),
        "{history}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
