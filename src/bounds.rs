//! What depwatch may deploy at all: `--namespaces` (names and globs) and `--allowed-images`
//! (repository globs). Files and API requests are checked alike; a change outside the bounds
//! is refused with a clear error and never reaches the cluster. Image bounds are checked on the
//! final images, after a plain version has been given its repository, so a repository slipped in
//! once cannot be kept by later plain versions.

use std::fmt;

/// A shell-style pattern: `*` matches any run of characters (including `/`), `?` one
/// character; everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, String> {
        let p = pattern.trim();
        if p.is_empty() {
            return Err("an empty pattern".into());
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "pattern {p:?} contains spaces or control characters"
            ));
        }
        Ok(Glob(p.to_string()))
    }

    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Iterative wildcard match with one backtrack point: linear in practice, never exponential.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Why a change is outside the bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    #[error("namespace {namespace} is not one depwatch may deploy to (--namespaces {allowed})")]
    Namespace { namespace: String, allowed: String },
    #[error("image {image} is not allowed: its repository {repository} matches none of --allowed-images {allowed}")]
    Image {
        image: String,
        repository: String,
        allowed: String,
    },
}

/// The configured bounds; empty lists allow everything (the README recommends setting both).
#[derive(Debug, Clone, Default)]
pub struct Bounds {
    namespaces: Vec<Glob>,
    images: Vec<Glob>,
}

fn list(globs: &[Glob]) -> String {
    globs
        .iter()
        .map(Glob::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Bounds {
    /// From the flags' comma-separated values (each entry may itself hold commas).
    pub fn new(namespaces: &[String], images: &[String]) -> Result<Bounds, String> {
        let parse = |flag: &str, values: &[String]| -> Result<Vec<Glob>, String> {
            values
                .iter()
                .flat_map(|v| v.split(','))
                .filter(|v| !v.trim().is_empty())
                .map(|v| Glob::new(v).map_err(|e| format!("{flag}: {e}")))
                .collect()
        };
        Ok(Bounds {
            namespaces: parse("--namespaces", namespaces)?,
            images: parse("--allowed-images", images)?,
        })
    }

    pub fn from_globs(namespaces: Vec<Glob>, images: Vec<Glob>) -> Bounds {
        Bounds { namespaces, images }
    }

    /// The namespaces `--namespaces` names exactly (no `*` or `?`), or `None` when any
    /// pattern (or no bound) lets in namespaces that cannot be listed up front.
    pub fn exact_namespaces(&self) -> Option<Vec<String>> {
        if self.namespaces.is_empty() {
            return None;
        }
        self.namespaces
            .iter()
            .map(|g| (!g.0.contains(['*', '?'])).then(|| g.0.clone()))
            .collect()
    }

    pub fn is_unbounded(&self) -> bool {
        self.namespaces.is_empty() && self.images.is_empty()
    }

    /// A one-line description for the start-up log.
    pub fn describe(&self) -> String {
        let or_any = |g: &[Glob]| {
            if g.is_empty() {
                "any".to_string()
            } else {
                list(g)
            }
        };
        format!(
            "namespaces {}; images {}",
            or_any(&self.namespaces),
            or_any(&self.images)
        )
    }

    pub fn check_namespace(&self, namespace: &str) -> Result<(), BoundsError> {
        if self.namespaces.is_empty() || self.namespaces.iter().any(|g| g.matches(namespace)) {
            return Ok(());
        }
        Err(BoundsError::Namespace {
            namespace: namespace.to_string(),
            allowed: list(&self.namespaces),
        })
    }

    /// Check one full image reference by its repository.
    pub fn check_image(&self, image: &str) -> Result<(), BoundsError> {
        if self.images.is_empty() {
            return Ok(());
        }
        let repository = crate::depfile::repository_of(image);
        if self.images.iter().any(|g| g.matches(repository)) {
            return Ok(());
        }
        Err(BoundsError::Image {
            image: image.to_string(),
            repository: repository.to_string(),
            allowed: list(&self.images),
        })
    }

    /// Check every image of a deploy.
    pub fn check_images<'a>(
        &self,
        images: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), BoundsError> {
        images.into_iter().try_for_each(|i| self.check_image(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_a_shell_across_slashes() {
        for (pattern, text, want) in [
            ("prod", "prod", true),
            ("prod", "prod2", false),
            ("team-*", "team-a", true),
            ("team-*", "team-", true),
            ("team-*", "kube-system", false),
            ("*-staging", "web-staging", true),
            ("?a", "ba", true),
            ("?a", "a", false),
            (
                "registry.example.com/team/*",
                "registry.example.com/team/api",
                true,
            ),
            (
                "registry.example.com/team/*",
                "registry.example.com/team/sub/api",
                true,
            ),
            (
                "registry.example.com/team/*",
                "evil.example.net/team/api",
                false,
            ),
            ("*", "anything/at/all", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("*a*a*a*a*a*b", &"a".repeat(200), false),
        ] {
            let g = Glob::new(pattern).expect("pattern");
            assert_eq!(g.matches(text), want, "{pattern} vs {text}");
        }
    }

    #[test]
    fn bounds_check_namespaces_and_image_repositories() {
        let b = Bounds::new(
            &["prod,team-*".into()],
            &[
                "registry.example.com/*".into(),
                "docker.io/library/nginx".into(),
            ],
        )
        .expect("bounds");
        assert!(b.check_namespace("prod").is_ok());
        assert!(b.check_namespace("team-a").is_ok());
        let e = b.check_namespace("kube-system").expect_err("outside");
        assert_eq!(
            e.to_string(),
            "namespace kube-system is not one depwatch may deploy to (--namespaces prod,team-*)"
        );
        assert!(b.check_image("registry.example.com/web:1.2").is_ok());
        assert!(b.check_image("registry.example.com/web@sha256:abc").is_ok());
        assert!(b.check_image("docker.io/library/nginx:1.27").is_ok());
        let e = b.check_image("evil.example.net/x:1").expect_err("outside");
        assert!(
            e.to_string().contains("repository evil.example.net/x"),
            "{e}"
        );
        // A registry with a port is part of the repository, not a tag.
        assert!(b.check_image("registry.example.com:5000/web:1").is_err());
        assert!(Bounds::default().check_image("anything:1").is_ok());
        assert!(Bounds::default().check_namespace("kube-system").is_ok());
        assert!(Bounds::new(&["a b".into()], &[]).is_err());
    }
}
