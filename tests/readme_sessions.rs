//! The documentation's console sessions run as written: every `$ kubectl …` line of the
//! simulated cluster session (docs/simulated-cluster.md) is run against a simulated cluster,
//! from the repository's root, and must succeed or fail as the transcript shows and print what
//! it shows first.

mod common;

use std::path::Path;

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
