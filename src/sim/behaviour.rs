//! What a simulated pod does, decided by its image: the default rules (`fail-pull`, `crash`,
//! `hang`, otherwise ready after a delay) or the rules of a scenario file.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The fate of a container whose image matched a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// Running and ready after the ready delay.
    Ready,
    /// `ErrImagePull`, then `ImagePullBackOff`.
    FailPull,
    /// Starts, exits with an error, then `CrashLoopBackOff` with a growing restart count.
    Crash,
    /// Running but never ready.
    Hang,
    /// `CreateContainerConfigError` (a missing Secret or ConfigMap key, in a real cluster).
    ConfigError,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A substring of the image reference.
    #[serde(rename = "match")]
    pub pattern: String,
    #[serde(rename = "behaviour", alias = "behavior")]
    pub fate: Fate,
    /// Overrides the global ready delay for pods this rule matches.
    #[serde(default, rename = "readyDelay", with = "humantime_serde_opt")]
    pub ready_delay: Option<Duration>,
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The rules in force; the first matching rule wins, and an image no rule matches is ready.
#[derive(Debug, Clone)]
pub struct Behaviours {
    pub rules: Vec<Rule>,
    pub ready_delay: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    #[serde(default, rename = "readyDelay", with = "humantime_serde_opt")]
    ready_delay: Option<Duration>,
    rules: Vec<Rule>,
}

impl Behaviours {
    pub fn defaults(ready_delay: Duration) -> Self {
        let rule = |p: &str, fate| Rule {
            pattern: p.into(),
            fate,
            ready_delay: None,
        };
        Behaviours {
            rules: vec![
                rule("fail-pull", Fate::FailPull),
                rule("crash", Fate::Crash),
                rule("hang", Fate::Hang),
                rule("config-error", Fate::ConfigError),
            ],
            ready_delay,
        }
    }

    /// Load a scenario file; its rules replace the defaults.
    pub fn from_file(path: &Path, ready_delay: Duration) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read scenario file {}: {e}", path.display()))?;
        let file: ScenarioFile = serde_saphyr::from_str(&text).map_err(|e| {
            format!(
                "scenario file {}: {e}; expected `rules: [{{match: <image substring>, behaviour: ready|fail-pull|crash|hang|config-error, readyDelay: 1s}}]`",
                path.display()
            )
        })?;
        Ok(Behaviours {
            rules: file.rules,
            ready_delay: file.ready_delay.unwrap_or(ready_delay),
        })
    }

    /// The fate of an image and how long its container takes to start.
    pub fn fate(&self, image: &str) -> (Fate, Duration) {
        match self.rules.iter().find(|r| image.contains(&r.pattern)) {
            Some(r) => (r.fate, r.ready_delay.unwrap_or(self.ready_delay)),
            None => (Fate::Ready, self.ready_delay),
        }
    }
}

/// Whether the container runtime could parse this reference at all; a bad one is
/// `InvalidImageName` whatever the rules say.
pub fn valid_image_reference(image: &str) -> bool {
    if image.is_empty() || image.chars().any(|c| c.is_whitespace()) {
        return false;
    }
    let (name, _digest) = match image.split_once('@') {
        Some((n, d)) => {
            if !d.contains(':') {
                return false;
            }
            (n, Some(d))
        }
        None => (image, None),
    };
    // The repository path (after a registry host, which may hold upper case and a port)
    // must be lower case.
    let path = match name.split_once('/') {
        Some((host, rest)) if host.contains('.') || host.contains(':') || host == "localhost" => {
            rest
        }
        _ => name,
    };
    let repo = match path.rsplit_once(':') {
        Some((repo, tag)) => {
            if tag.is_empty() || tag.len() > 128 || tag.contains('/') {
                return false;
            }
            repo
        }
        None => path,
    };
    !repo.is_empty()
        && repo
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rules_follow_the_image() {
        let b = Behaviours::defaults(Duration::from_millis(300));
        assert_eq!(b.fate("example.com/web:1.0-fail-pull").0, Fate::FailPull);
        assert_eq!(b.fate("web:crash").0, Fate::Crash);
        assert_eq!(b.fate("web:hang").0, Fate::Hang);
        assert_eq!(b.fate("web:1.0").0, Fate::Ready);
        assert!(valid_image_reference("example.com:5000/team/web:1.0"));
        assert!(valid_image_reference("web@sha256:abc"));
        assert!(!valid_image_reference("Web:1.0"));
        assert!(!valid_image_reference("web:"));
    }

    #[test]
    fn scenario_files_replace_the_rules_and_name_bad_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("s.yaml");
        std::fs::write(
            &p,
            "rules:\n  - match: slow\n    behaviour: ready\n    readyDelay: 2s\n  - match: x\n    behaviour: crash\n",
        )
        .expect("write");
        let b = Behaviours::from_file(&p, Duration::from_millis(300)).expect("loads");
        assert_eq!(b.fate("web:slow"), (Fate::Ready, Duration::from_secs(2)));
        assert_eq!(b.fate("web:x").0, Fate::Crash);
        assert_eq!(b.fate("web:fail-pull").0, Fate::Ready, "defaults replaced");
        std::fs::write(&p, "rules:\n  - match: a\n    behaviour: explode\n").expect("write");
        let err = Behaviours::from_file(&p, Duration::from_millis(300)).expect_err("bad");
        assert!(err.contains("s.yaml"), "{err}");
    }
}
