//! Dependencies point one way, checked on the source: the daemon's modules never import the
//! simulated cluster; the domain vocabulary imports nothing of the crate; the lifecycle
//! decides from domain types alone; the record imports nothing of the deploy path; nothing
//! blocks the runtime or builds a second one. Test code
//! (after `#[cfg(test)]`) is not looked at.

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src readable") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each source file under `src/` (relative path) with its code before any test module.
fn code() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    sources(&root, &mut paths);
    assert!(paths.len() > 20, "found the sources: {paths:?}");
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable");
            let code = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .to_string();
            let rel = p
                .strip_prefix(&root)
                .expect("under src")
                .display()
                .to_string();
            (rel, code)
        })
        .collect()
}

/// The `crate::module` paths a file's code names, other than its own.
fn crate_paths(code: &str) -> Vec<String> {
    code.match_indices("crate::")
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect()
}

#[test]
fn only_the_command_line_and_the_demo_reach_the_simulated_cluster() {
    let allowed = ["main.rs", "lib.rs", "cli.rs", "demo.rs"];
    let offenders: Vec<String> = code()
        .into_iter()
        .filter(|(rel, _)| !rel.starts_with("sim/") && !allowed.contains(&rel.as_str()))
        .filter(|(_, code)| crate_paths(code).iter().any(|m| m == "sim"))
        .map(|(rel, _)| rel)
        .collect();
    assert!(
        offenders.is_empty(),
        "daemon modules import sim: {offenders:?}"
    );
}

#[test]
fn the_domain_imports_nothing_and_the_lifecycle_only_the_domain() {
    for (rel, code) in code() {
        let paths = crate_paths(&code);
        match rel.as_str() {
            r if r == "domain.rs" || r.starts_with("domain/") => assert!(
                paths.iter().all(|m| m == "domain"),
                "{rel} imports {paths:?}"
            ),
            "pipeline/deploy/lifecycle.rs" => assert!(
                paths.iter().all(|m| m == "domain"),
                "lifecycle imports {paths:?}"
            ),
            r if r == "store.rs" || r.starts_with("store/") => assert!(
                !paths
                    .iter()
                    .any(|m| m == "deploy" || m == "ingest" || m == "http"),
                "{rel} imports {paths:?}"
            ),
            _ => {}
        }
    }
}

/// Each field of a service row has one owner, and only the owner's module builds a change
/// that sets it (`store/change.rs` defines the setters; the record's own code carries changes
/// out). ARCHITECTURE.md and the table above the schema in `store.rs` say the same.
#[test]
fn each_service_field_is_set_only_by_its_owner() {
    const RECORDER: &[&str] = &[
        "pipeline/deploy/recorder/mod.rs",
        "pipeline/deploy/recorder/verdict.rs",
    ];
    const INGEST: &[&str] = &["pipeline/ingest/mod.rs"];
    const OPERATOR: &[&str] = &["operator.rs"];
    let owners: &[(&str, &[&str])] = &[
        ("status", RECORDER),
        ("status_unless_deploying", RECORDER),
        ("message", RECORDER),
        ("desired", RECORDER),
        ("deployed", RECORDER),
        ("last_good", RECORDER),
        ("last_good_if_unset", RECORDER),
        ("kind", RECORDER),
        ("content_hash", RECORDER),
        ("failed_hash", RECORDER),
        ("bake_ends_at", RECORDER),
        ("unpin", RECORDER),
        ("requested", INGEST),
        ("path", INGEST),
        ("path_if_unset", INGEST),
        ("suspended", OPERATOR),
        ("judged", OPERATOR),
    ];
    let mut builders = Vec::new();
    for (rel, code) in code() {
        if rel == "store.rs" || rel.starts_with("store/") {
            continue;
        }
        // Only code that builds or extends a change can set its fields.
        if !code.contains("ServiceChange") && !code.contains("verdict::") {
            continue;
        }
        builders.push(rel.clone());
        for (setter, allowed) in owners {
            // A setter takes a value: `.path()` (a getter) is not one.
            let call = format!(".{setter}(");
            let sets = code
                .match_indices(&call)
                .any(|(i, _)| !code[i + call.len()..].starts_with(')'));
            if sets {
                assert!(
                    allowed.contains(&rel.as_str()),
                    "{rel} sets `{setter}`, which belongs to {allowed:?}"
                );
            }
        }
        if code.contains("ServiceChange::default()") {
            let owner = [RECORDER, INGEST, OPERATOR]
                .iter()
                .any(|o| o.contains(&rel.as_str()));
            assert!(owner, "{rel} builds a ServiceChange of its own");
        }
    }
    for owner in [
        "pipeline/deploy/recorder/verdict.rs",
        "pipeline/ingest/mod.rs",
        "operator.rs",
    ] {
        assert!(
            builders.iter().any(|b| b == owner),
            "{owner} was looked at: {builders:?}"
        );
    }
}

/// The record never blocks the runtime: no `block_in_place`, no `block_on` and no runtime of
/// its own anywhere in the daemon (the one runtime is built in `main.rs`).
#[test]
fn nothing_blocks_the_runtime_or_builds_a_second_one() {
    let forbidden = [
        "block_in_place",
        "block_on(",
        "runtime::Builder",
        "Runtime::new",
    ];
    let offenders: Vec<(String, &str)> = code()
        .into_iter()
        .filter(|(rel, _)| rel != "main.rs")
        .flat_map(|(rel, code)| {
            forbidden
                .iter()
                .filter(move |f| code.contains(**f))
                .map(move |f| (rel.clone(), *f))
        })
        .collect();
    assert!(offenders.is_empty(), "{offenders:?}");
}
