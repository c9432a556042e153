//! The documentation's console sessions run as written: every `$ kubectl …` line of the
//! simulated cluster session (docs/simulated-cluster.md) is run against a simulated cluster,
//! from the repository's root, and must succeed or fail as the transcript shows and print what
//! it shows first.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Kubectl;
use depwatch::sim::{Sim, SimConfig};

/// The console block after `marker`: each command with the lines it printed.
fn session(readme: &str, marker: &str) -> Vec<(String, Vec<String>)> {
    let at = readme
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} in the README"));
    let block = readme[at..]
        .split("```console")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a console block");
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines() {
        if let Some(cmd) = line.strip_prefix("$ ") {
            out.push((cmd.to_string(), Vec::new()));
        } else if let Some((_, printed)) = out.last_mut() {
            if !line.trim().is_empty() {
                printed.push(line.to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_cluster_session_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("docs/simulated-cluster.md"))
        .expect("docs/simulated-cluster.md");
    let steps = session(&readme, "A short session with the real kubectl");
    assert!(steps.len() >= 6, "{steps:?}");
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let kubectl = Kubectl::new(dir.path(), &sim.kubeconfig());
    let mut ran = 0;
    for (cmd, printed) in steps {
        let words: Vec<&str> = cmd
            .split('#')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        // The sim is this test's own; the environment is the helper's.
        if words.first() != Some(&"kubectl") {
            assert!(
                words.first() == Some(&"depwatch") || words.first() == Some(&"export"),
                "an unexpected command in the session: {cmd}"
            );
            continue;
        }
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubectl.kubeconfig)
            .args(&words[1..])
            .current_dir(root)
            .env("KUBECACHEDIR", &kubectl.cache)
            .env("HOME", dir.path())
            .output()
            .await
            .expect("kubectl runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        let fails = printed.iter().any(|l| l.starts_with("error:"));
        assert_eq!(
            !out.status.success(),
            fails,
            "{cmd}\nstdout: {stdout}\nstderr: {stderr}"
        );
        // The first line it shows (a result, or a table's header) is what it prints first.
        if let Some(first) = printed.first() {
            let head: Vec<&str> = first.split_whitespace().take(2).collect();
            let all = format!("{stdout}{stderr}");
            assert!(
                head.iter().all(|w| all.contains(w)),
                "{cmd}: expected {first:?} first\n{all}"
            );
        }
        ran += 1;
    }
    assert!(ran >= 6, "every kubectl line ran");
}

/// The `sh` blocks after `heading`, line by line, comments kept.
fn sh_lines(readme: &str, heading: &str) -> Vec<String> {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("{heading} in the README"));
    let section = readme[at + heading.len()..]
        .split("\n## ")
        .next()
        .unwrap_or_default();
    section
        .split("```sh")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .flat_map(|b| b.lines().map(str::to_string))
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// Children started with `&`, stopped when the test ends however it ends.
struct Background(Vec<std::process::Child>);

impl Drop for Background {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The README's five minutes, run as written against their own simulated cluster: each line
/// in order through `sh`, `&` lines in the background, with this test's own directory and
/// ports. After each save, the outcome its comment names (`succeeded`, `rolled back`) must
/// come for that version before the next line runs, as a reader would wait to see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_five_minutes_run_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let lines = sh_lines(&readme, "## Five minutes with the simulated cluster");
    assert!(lines.len() >= 10, "{lines:?}");
    let dir = tempfile::tempdir().expect("tempdir");
    let tmp = format!("{}/", dir.path().display());
    let (sim_port, http_port) = (free_port(), free_port());
    let bin = Path::new(env!("CARGO_BIN_EXE_depwatch"))
        .parent()
        .expect("bin dir")
        .display()
        .to_string();
    let mut envs: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            format!("{bin}:{}", std::env::var("PATH").unwrap_or_default()),
        ),
        ("HOME".into(), dir.path().display().to_string()),
        ("NO_COLOR".into(), "1".into()),
    ];
    let mut background = Background(Vec::new());
    let mut state_dir = None;
    for line in &lines {
        let (cmd, comment) = line.split_once(" #").unwrap_or((line.as_str(), ""));
        let cmd = cmd
            .trim()
            .replace("/tmp/", &tmp)
            .replace("127.0.0.1:8443", &format!("127.0.0.1:{sim_port}"))
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{http_port}"));
        if cmd.starts_with("cargo build --release") {
            continue; // this test's binary is built already
        }
        if let Some((name, value)) = cmd.strip_prefix("export ").and_then(|e| e.split_once('=')) {
            envs.push((name.to_string(), value.trim_matches('"').to_string()));
            continue;
        }
        let shell = |c: &str| {
            let mut sh = std::process::Command::new("sh");
            sh.args(["-c", c])
                .current_dir(root)
                .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env_remove("DEPWATCH_STATE_DIR")
                .env_remove("DEPWATCH_API");
            sh
        };
        if let Some(c) = cmd.strip_suffix('&') {
            let log =
                std::fs::File::create(dir.path().join(format!("bg{}.log", background.0.len())))
                    .expect("log");
            // `exec`: the child is the command itself, so stopping it stops the command.
            let child = shell(&format!("exec {}", c.trim()))
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("starts");
            background.0.push(child);
            ready(&cmd, dir.path()).await;
            if let Some(s) = cmd.split("--state-dir ").nth(1) {
                state_dir = s.split_whitespace().next().map(str::to_string);
            }
            continue;
        }
        let out = shell(&cmd).output().expect("runs");
        assert!(
            out.status.success(),
            "{cmd}\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs(dir.path())
        );
        if cmd.starts_with("depwatch status") {
            // What the README's sample output shows of the last save.
            let shown = String::from_utf8_lossy(&out.stdout);
            assert!(
                shown.contains("rolled_back")
                    && shown.contains("example.com/web:1.0.3-fail-pull (pinned)")
                    && shown.contains("ImagePullBackOff"),
                "{shown}"
            );
        }
        let expect = match comment {
            c if c.contains("succeeded") => Some("succeeded"),
            c if c.contains("rolled back") => Some("rolled_back"),
            _ => None,
        };
        if let Some(status) = expect {
            let version = cmd
                .strip_prefix("echo ")
                .and_then(|c| c.split_whitespace().next())
                .expect("a save names its version");
            let state = state_dir
                .clone()
                .expect("the daemon runs before files are saved");
            outcome(&shell, &state, status, version, dir.path()).await;
        }
    }
}

/// What the background commands printed, for a failure's message.
fn logs(dir: &Path) -> String {
    (0..4)
        .filter_map(|i| std::fs::read_to_string(dir.join(format!("bg{i}.log"))).ok())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// Wait for a background command to be ready for the next line: the sim's kubeconfig written,
/// the daemon's health endpoint answering.
async fn ready(cmd: &str, dir: &Path) {
    let arg = |flag: &str| {
        cmd.split(flag)
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string)
    };
    if let Some(kubeconfig) = arg("--kubeconfig-out ") {
        common::wait_for("the sim's kubeconfig", Duration::from_secs(30), || async {
            std::fs::metadata(&kubeconfig)
                .is_ok_and(|m| m.len() > 0)
                .then_some(())
        })
        .await;
    }
    if let Some(addr) = arg("--http-addr ") {
        let http = reqwest::Client::new();
        let url = format!("http://{addr}/healthz");
        let waited = tokio::time::timeout(
            Duration::from_secs(60),
            common::wait_for("the daemon's /healthz", Duration::from_secs(60), || async {
                let ok = http
                    .get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                ok.then_some(())
            }),
        )
        .await;
        assert!(waited.is_ok(), "the daemon did not start:\n{}", logs(dir));
    }
}

/// Wait for prod/web's latest deploy to be of `version` and the service to be `status`.
async fn outcome(
    shell: &dyn Fn(&str) -> std::process::Command,
    state: &str,
    status: &str,
    version: &str,
    dir: &Path,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let out = shell(&format!(
            "depwatch status -n prod -o json --state-dir {state}"
        ))
        .output()
        .expect("status runs");
        let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let web = all
            .into_iter()
            .find(|s| s["name"] == "web")
            .unwrap_or_default();
        let to = web["last_deploy"]["to_image"].as_str().unwrap_or_default();
        if web["status"] == status && to.contains(version) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "prod/web never {status} with {version}: {web}\n{}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
