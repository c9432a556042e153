//! The pre-flight: before a PATCH, each image that changes is asked of its registry. Deciding
//! (what the answers mean for the deploy, per `--registry-check`) is pure and table-tested;
//! asking (with a bounded wait for registries that do not answer) is [`Preflight::ask`].

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::client::{Answer, Registries};
use super::reference::{Credentials, ImageRef};
use crate::domain::Images;

/// `--registry-check`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A missing tag (or refused credentials) stops the deploy before the PATCH.
    #[default]
    On,
    /// Asked, but a missing tag is only a warning.
    Warn,
    /// Never asked.
    Off,
}

/// What a pre-flight's row says of an image it could not check, in place of its digest.
pub const NOT_CHECKED: &str = "not checked";

/// A warning, with the registry it is about (one warning per registry and burst is logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub registry: String,
    pub text: String,
}

/// What the answers mean for the deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on: the digests found (container → digest, or [`NOT_CHECKED`]) and warnings to log.
    Go {
        digests: Images,
        warnings: Vec<Warning>,
    },
    /// Stop before the PATCH, with the reason.
    Refuse(String),
}

/// The line for one answer that is not a plain "found".
fn describe(image: &ImageRef, answer: &Answer) -> Option<String> {
    let shown = image.repository_shown();
    let wanted = image.reference();
    Some(match answer {
        Answer::Found { .. } => return None,
        Answer::Missing { closest } if closest.is_empty() => {
            format!("tag {wanted} not found in {shown}")
        }
        Answer::Missing { closest } => format!(
            "tag {wanted} not found in {shown}; closest: {}",
            closest.join(", ")
        ),
        Answer::Denied(why) => why.clone(),
        Answer::Unavailable { why, .. } | Answer::Unchecked(why) => {
            format!("{shown}:{wanted} not checked: {why}; deploying anyway")
        }
        Answer::NeedsCredentials(why) => format!("{why}; deploying anyway"),
    })
}

/// Decide from every changed container's answer.
pub fn verdict(mode: Mode, answers: &[(String, ImageRef, Answer)]) -> Verdict {
    let mut digests = Images::new();
    let mut warnings = Vec::new();
    let mut refusals = Vec::new();
    for (container, image, answer) in answers {
        match answer {
            Answer::Found {
                digest: Some(digest),
            } => digests.insert(container.clone(), digest.clone()),
            Answer::Unavailable { .. } | Answer::Unchecked(_) | Answer::NeedsCredentials(_) => {
                digests.insert(container.clone(), NOT_CHECKED.to_string())
            }
            _ => {}
        }
        let Some(text) = describe(image, answer) else {
            continue;
        };
        // Only what the registry proved stops a deploy: a missing tag, refused credentials.
        let stops = matches!(answer, Answer::Missing { .. } | Answer::Denied(_));
        match (mode, stops) {
            (Mode::On, true) => refusals.push(text),
            _ => warnings.push(Warning {
                registry: image.registry.clone(),
                text,
            }),
        }
    }
    match refusals.is_empty() {
        true => Verdict::Go { digests, warnings },
        false => Verdict::Refuse(format!(
            "{} (nothing was patched; checked again at the next resync; --registry-check warn or off deploys without this check)",
            refusals.join("; ")
        )),
    }
}

impl std::fmt::Debug for Preflight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials' hosts only.
        f.debug_struct("Preflight")
            .field("mode", &self.mode)
            .field("wait", &self.wait)
            .field("own", &self.own.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The pre-flight's settings and the registries it asks.
#[derive(Clone)]
pub struct Preflight {
    pub mode: Mode,
    /// How long a registry that does not answer may hold a deploy.
    pub wait: Duration,
    /// `--registry-credentials`: depwatch's own, by registry host.
    pub own: HashMap<String, Credentials>,
    pub registries: Registries,
    /// When each registry's last warning was logged: one per registry and burst.
    pub warned: std::sync::Arc<dashmap::DashMap<String, Instant>>,
}

/// How long after a registry's warning the next one is only counted, not logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

impl Preflight {
    /// Whether `warning` is the first about its registry in this burst (and so worth a log
    /// line); the rest are logged at debug level.
    pub fn first_warning(&self, warning: &Warning) -> bool {
        let now = Instant::now();
        let mut first = false;
        self.warned
            .entry(warning.registry.to_ascii_lowercase())
            .and_modify(|at| {
                if now.duration_since(*at) >= WARN_EVERY {
                    (*at, first) = (now, true);
                }
            })
            .or_insert_with(|| {
                first = true;
                now
            });
        first
    }

    /// Ask about each changed container's image, the credentials of `creds` first and then
    /// depwatch's own. A registry that does not answer is asked again (after its
    /// `Retry-After`, or a short backoff) until the wait is over.
    pub async fn ask(
        &self,
        changes: &Images,
        creds: &HashMap<String, Credentials>,
        fresh: bool,
    ) -> Vec<(String, ImageRef, Answer)> {
        let deadline = Instant::now() + self.wait;
        let asks = changes.iter().filter_map(|(container, image)| {
            let image = ImageRef::parse(image).ok()?;
            let host = image.registry.to_ascii_lowercase();
            let c = creds.get(&host).or_else(|| self.own.get(&host)).cloned();
            Some(async move {
                let answer = self
                    .until_answered(&image, c.as_ref(), deadline, fresh)
                    .await;
                (container.clone(), image, answer)
            })
        });
        futures::future::join_all(asks).await
    }

    async fn until_answered(
        &self,
        image: &ImageRef,
        creds: Option<&Credentials>,
        deadline: Instant,
        fresh: bool,
    ) -> Answer {
        if self.registries.is_down(image) {
            return Answer::Unavailable {
                why: format!(
                    "{} gave no answer within {} lately",
                    image.registry,
                    crate::domain::human_duration(self.wait)
                ),
                retry_after: None,
            };
        }
        let mut backoff = Duration::from_millis(250);
        loop {
            let answer = match tokio::time::timeout_at(deadline, async {
                match fresh {
                    true => self.registries.check_fresh(image, creds).await,
                    false => self.registries.check(image, creds).await,
                }
            })
            .await
            {
                Ok(a) => a,
                Err(_) => Answer::Unavailable {
                    why: format!(
                        "no answer within {}",
                        crate::domain::human_duration(self.wait)
                    ),
                    retry_after: None,
                },
            };
            let Answer::Unavailable { retry_after, .. } = &answer else {
                return answer;
            };
            let pause = retry_after.unwrap_or(backoff);
            if Instant::now() + pause >= deadline {
                // Down for as long again: the deploys behind this one do not wait again.
                self.registries.mark_down(image, self.wait);
                return answer;
            }
            tokio::time::sleep(pause).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(image: &str, a: Answer) -> (String, ImageRef, Answer) {
        ("web".into(), ImageRef::parse(image).expect("image"), a)
    }

    #[test]
    fn each_mode_decides_from_the_answers() {
        let found = answer(
            "r.example/team/web:1.4.2",
            Answer::Found {
                digest: Some("sha256:aa".into()),
            },
        );
        let missing = answer(
            "r.example/team/web:1.4.3",
            Answer::Missing {
                closest: vec!["1.4.2".into(), "1.4.1".into()],
            },
        );
        let down = answer(
            "r.example/team/web:1.4.2",
            Answer::Unavailable {
                why: "r.example answered 503 Service Unavailable".into(),
                retry_after: None,
            },
        );
        let denied = answer(
            "r.example/team/web:1.4.2",
            Answer::Denied("unauthorized: no".into()),
        );
        match verdict(Mode::On, std::slice::from_ref(&found)) {
            Verdict::Go { digests, warnings } => {
                assert_eq!(digests.to_string(), "web=sha256:aa");
                assert!(warnings.is_empty());
            }
            other => panic!("{other:?}"),
        }
        match verdict(Mode::On, std::slice::from_ref(&missing)) {
            Verdict::Refuse(m) => assert!(
                m.starts_with("tag 1.4.3 not found in r.example/team/web; closest: 1.4.2, 1.4.1")
                    && m.contains("--registry-check warn or off"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(verdict(Mode::On, std::slice::from_ref(&denied)), Verdict::Refuse(m) if m.contains("unauthorized"))
        );
        for mode in [Mode::On, Mode::Warn] {
            match verdict(mode, std::slice::from_ref(&down)) {
                Verdict::Go { warnings, digests } => {
                    assert!(warnings[0].text.contains("deploying anyway"));
                    assert_eq!(digests.to_string(), format!("web={NOT_CHECKED}"));
                }
                other => panic!("{mode:?}: {other:?}"),
            }
        }
        match verdict(Mode::Warn, &[missing, denied]) {
            Verdict::Go { warnings, .. } => assert_eq!(warnings.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
