//! `deploy/Dockerfile` builds as shipped, checked without a container engine: the build stage's
//! context is exactly what its `COPY` lines copy, and everything the crate needs to compile
//! (its manifest's targets, every `include_str!`, `include_bytes!` and `#[path]`) is in it.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The build stage's `COPY` sources (from the build context, not `--from` another stage).
fn copied(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in dockerfile.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        // COPY src... dest: every word but the first and the last is a source.
        out.extend(words[1..words.len() - 1].iter().map(|w| w.to_string()));
    }
    out
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("mkdir");
        for e in std::fs::read_dir(from).expect("read dir").flatten() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Files a Rust source names by a relative path: `include_str!("…")`, `include_bytes!("…")`,
/// `#[path = "…"]`.
fn named_files(source: &str) -> Vec<String> {
    let mut out = Vec::new();
    for marker in ["include_str!(\"", "include_bytes!(\"", "#[path = \""] {
        let mut rest = source;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
            }
        }
    }
    out
}

#[test]
fn the_dockerfiles_build_context_holds_everything_the_build_needs() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    let sources = copied(&dockerfile);
    assert!(sources.contains(&"Cargo.lock".to_string()), "{sources:?}");
    let context = tempfile::tempdir().expect("tempdir");
    for s in &sources {
        copy_tree(&root().join(s), &context.path().join(s));
    }
    // Every file a source includes is in the context.
    let mut files = Vec::new();
    rust_files(context.path(), &mut files);
    assert!(!files.is_empty());
    let mut missing = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read");
        for named in named_files(&text) {
            let at = f.parent().expect("dir").join(&named);
            if !at.exists() {
                missing.push(format!("{} names {named}", f.display()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in the Dockerfile's context: {missing:?}"
    );
    // The manifest's targets are all there: cargo reads them as the build would.
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
            "--manifest-path",
        ])
        .arg(context.path().join("Cargo.toml"))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "cargo cannot read the copied manifest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    for target in meta["packages"][0]["targets"].as_array().expect("targets") {
        let path = PathBuf::from(target["src_path"].as_str().expect("src_path"));
        assert!(
            path.exists(),
            "target {} is not in the context",
            path.display()
        );
    }
}

#[test]
fn the_include_scan_finds_what_it_must() {
    let named = named_files(
        "const A: &str = include_str!(\"../examples/a.dep\");\n#[path = \"x.rs\"]\nmod y;\nlet b = include_bytes!(\"b.bin\");",
    );
    assert_eq!(named, ["../examples/a.dep", "b.bin", "x.rs"]);
    assert_eq!(
        copied("FROM x AS build\nCOPY Cargo.toml Cargo.lock ./\nCOPY --from=build /a /b\nCOPY src ./src\n"),
        ["Cargo.toml", "Cargo.lock", "src"]
    );
}
