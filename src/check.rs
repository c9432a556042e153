//! `depwatch check`: validate every dependency file in a directory and report every problem,
//! with the same rules as `depwatch run` (the bounds and the size cap), so a file check calls
//! valid is one the daemon takes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::depfile;
use crate::domain::ServiceKey;

/// One problem, already phrased for a person.
pub type Problem = String;

/// The daemon's rules for files: `--namespaces`, `--allowed-images`, `--max-file-size`.
#[derive(Debug, Clone)]
pub struct Rules {
    pub bounds: crate::bounds::Bounds,
    pub max_file_size: u64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            bounds: crate::bounds::Bounds::default(),
            max_file_size: crate::safefs::DEFAULT_MAX_FILE_SIZE,
        }
    }
}

/// Validate the directory; returns the number of good files and every problem found.
pub fn check_dir(dir: &Path, rules: &Rules) -> (usize, Vec<Problem>) {
    let paths = match crate::pipeline::watch::scan(dir) {
        Ok(p) => p,
        Err(e) => {
            return (
                0,
                vec![format!("{}: cannot read the directory: {e}", dir.display())],
            )
        }
    };
    let mut problems = Vec::new();
    let policy = read_policy(dir, &mut problems);
    let mut good = 0;
    let mut seen: HashMap<ServiceKey, PathBuf> = HashMap::new();
    for path in paths {
        let key = match depfile::service_for_path(&path) {
            Ok(Some(k)) => k,
            Ok(None) => continue,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        if let Some(first) = seen.get(&key) {
            problems.push(format!(
                "{}: service {key} is already defined by {}; each service must have one file",
                path.display(),
                first.display()
            ));
            continue;
        }
        seen.insert(key.clone(), path.clone());
        if let Err(e) = rules.bounds.check_namespace(&key.namespace) {
            problems.push(format!("{}: {e}", crate::safefs::shown(&path)));
            continue;
        }
        let bytes = match crate::safefs::read_capped(dir, &path, rules.max_file_size) {
            Ok(b) => b,
            Err(e) => {
                problems.push(e.to_string());
                continue;
            }
        };
        let file = crate::safefs::shown(&path);
        let checked = depfile::parse_all(&file, &bytes).and_then(|spec| {
            crate::pipeline::ingest::within_bounds(&rules.bounds, &file, spec).map_err(|e| vec![e])
        });
        let under_policy = checked.map_err(|all| all.iter().map(ToString::to_string).collect());
        let under_policy = under_policy.and_then(|spec| match &policy {
            Some(p) => p
                .verification(&key, &file, spec.verify)
                .map_err(|c| vec![c.0]),
            None => Ok(None),
        });
        match under_policy {
            Ok(_) => good += 1,
            Err(all) => problems.extend(all),
        }
    }
    (good, problems)
}

/// The directory's policy file, when it has one: its problems are listed, and the files are
/// checked under it only when it is valid.
fn read_policy(dir: &Path, problems: &mut Vec<Problem>) -> Option<crate::policy::Policy> {
    let path = dir.join(crate::policy::FILE_NAME);
    let bytes = match crate::safefs::read_capped(dir, &path, crate::policy::MAX_SIZE) {
        Ok(b) => b,
        Err(e) if e.is_missing() => return None,
        Err(e) => {
            problems.push(e.to_string());
            return None;
        }
    };
    match crate::policy::parse(&bytes) {
        Ok(p) => Some(p),
        Err(list) => {
            let shown = crate::safefs::shown(&path);
            problems.extend(list.iter().map(|p| p.at(&shown)));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_listed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w =
            |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        w("web_prod.dep", "1.2.3\n");
        w("api_prod.dep", "not a version\n");
        w("Bad_prod.dep", "1.0\n");
        w("empty_prod.dep", "");
        w(".web_prod.dep.swp", "garbage");
        std::fs::create_dir(dir.path().join("team")).expect("mkdir");
        std::fs::write(dir.path().join("team/web_prod.dep"), "1.2.4").expect("write");
        let (good, problems) = check_dir(dir.path(), &Rules::default());
        assert_eq!(good, 1, "{problems:?}");
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("api_prod.dep:1:")));
        assert!(problems.iter().any(|p| p.contains("Bad_prod.dep")));
        assert!(problems
            .iter()
            .any(|p| p.contains("empty_prod.dep") && p.contains("empty")));
        assert!(problems.iter().any(|p| p.contains("already defined")));
    }

    #[test]
    fn the_policy_file_is_checked_and_the_files_are_checked_under_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w =
            |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        w("web_prod.dep", "1.2.3\n");
        w(
            "api_prod.dep",
            "version: 1.2\nverify:\n  checks:\n    - name: healthz\n      http: /ok\n",
        );
        w(
            "api_staging.dep",
            "version: 1.2\nverify:\n  checks:\n    - name: healthz\n      http: /ok\n",
        );
        w(crate::policy::FILE_NAME, "rules:\n  - namespaces: prod\n    verify:\n      checks:\n        - name: healthz\n          http: /healthz\n");
        let (good, problems) = check_dir(dir.path(), &Rules::default());
        assert_eq!(good, 2, "{problems:#?}");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("api_prod.dep: the check `healthz` is also declared by depwatch-policy.yaml rules[0]"),
            "{problems:#?}"
        );
        // A policy with a problem is named with its line; the files are still checked.
        w(crate::policy::FILE_NAME, "rules:\n  - namespaces: prod\n    verify:\n      bake: often\n      checks: [{http: /h}]\n");
        let (good, problems) = check_dir(dir.path(), &Rules::default());
        assert_eq!(good, 3, "{problems:#?}");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].contains("depwatch-policy.yaml:4: rules[0].verify.bake: not a duration"),
            "{problems:#?}"
        );
    }

    #[test]
    fn every_problem_of_one_file_is_listed_with_its_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = "versoin: 1.2\nkind: deploymnet\nrollback: maybe\nrolloutTimeout: 0s\nhunter2secret: x\nimages:\n  web: 'not a tag'\n";
        std::fs::write(dir.path().join("web_prod.dep"), text).expect("write");
        let (good, problems) = check_dir(dir.path(), &Rules::default());
        assert_eq!(good, 0);
        let want = [
            (
                "web_prod.dep:1:",
                "unknown field `versoin` (did you mean version?",
            ),
            ("web_prod.dep:2:", "kind: did you mean deployment?"),
            ("web_prod.dep:3:", "rollback: expected on, off"),
            ("web_prod.dep:4:", "rolloutTimeout: out of range"),
            ("web_prod.dep:5:", "an unknown field (expected"),
            ("web_prod.dep:7:", "images.web:"),
        ];
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
        for (at, says) in want {
            assert!(
                problems.iter().any(|p| p.contains(at) && p.contains(says)),
                "no {at} {says} in {problems:#?}"
            );
        }
        assert!(
            problems.iter().all(|p| !p.contains("hunter2")),
            "a field far from every known one is never echoed: {problems:#?}"
        );
    }

    #[test]
    fn the_daemons_bounds_and_size_cap_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let w =
            |name: &str, text: &str| std::fs::write(dir.path().join(name), text).expect("write");
        w("web_prod.dep", "1.2.3\n");
        w("web_qa.dep", "1.2.3\n");
        w("api_prod.dep", "evil.example/api:1\n");
        w("big_prod.dep", &format!("# {}\n1.0\n", "x".repeat(2000)));
        let rules = Rules {
            bounds: crate::bounds::Bounds::new(
                &["prod".into()],
                &["registry.example.com/*".into()],
            )
            .expect("bounds"),
            max_file_size: 1024,
        };
        let (good, problems) = check_dir(dir.path(), &rules);
        assert_eq!(good, 1, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("web_qa.dep") && p.contains("qa")),
            "{problems:#?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("api_prod.dep") && p.contains("evil.example")),
            "{problems:#?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("big_prod.dep")),
            "{problems:#?}"
        );
    }
}
