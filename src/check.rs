//! `depwatch check`: validate every dependency file in a directory and report every problem.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::depfile::{self, ServiceKey};

/// One problem, already phrased for a person.
pub type Problem = String;

/// Validate the directory; returns the number of good files and every problem found.
pub fn check_dir(dir: &Path) -> (usize, Vec<Problem>) {
    let paths = match crate::watch::scan(dir) {
        Ok(p) => p,
        Err(e) => {
            return (
                0,
                vec![format!("{}: cannot read the directory: {e}", dir.display())],
            )
        }
    };
    let mut problems = Vec::new();
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
        seen.insert(key, path.clone());
        let bytes =
            match crate::safefs::read_capped(dir, &path, crate::safefs::DEFAULT_MAX_FILE_SIZE) {
                Ok(b) => b,
                Err(e) => {
                    problems.push(e.to_string());
                    continue;
                }
            };
        match depfile::parse(&crate::safefs::shown(&path), &bytes) {
            Ok(_) => good += 1,
            Err(e) => problems.push(e.to_string()),
        }
    }
    (good, problems)
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
        let (good, problems) = check_dir(dir.path());
        assert_eq!(good, 1, "{problems:?}");
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("api_prod.dep:1:")));
        assert!(problems.iter().any(|p| p.contains("Bad_prod.dep")));
        assert!(problems
            .iter()
            .any(|p| p.contains("empty_prod.dep") && p.contains("empty")));
        assert!(problems.iter().any(|p| p.contains("already defined")));
    }
}
