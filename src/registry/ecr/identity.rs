//! The pre-flight's own AWS identity for ECR, without `--ecr-pull-secret`: when an image's
//! registry is ECR's and neither the workload's pull secrets nor `--registry-credentials` name
//! it, depwatch asks ECR for a token with the default credential chain (as the Secret keeper
//! does) and checks the image with it. Nothing is written to the cluster.
//!
//! A token is fetched on demand, one region at a time, and kept until shortly before it
//! expires. A fetch that fails (no identity on this host, no network to ECR) is remembered for
//! [`FAILED_FOR`]: the images are then "not checked", as with no credentials at all, and the
//! deploy goes on. The AWS configuration is loaded only once an ECR image appears.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio::sync::OnceCell;

use super::aws::TokenSource;
use super::{hosts_served, Token, REFRESH_MARGIN};
use crate::registry::ecr::ecr_region;
use crate::registry::reference::{Credentials, ImageRef};

/// How long a failed fetch is remembered before the next deploy tries again.
pub const FAILED_FOR: Duration = Duration::from_secs(300);

/// Which token serves a registry host: an ECR host's region, or, with the ECR endpoint
/// pointed elsewhere (`AWS_ENDPOINT_URL_ECR`), the chain's own region for any host (the token's
/// endpoint then says which host it opens). `None`: not an ECR registry.
pub fn region_for(host: &str, endpoint_override: bool) -> Option<Region> {
    match ecr_region(host) {
        Some(r) if !endpoint_override => Some(Region::Named(r.to_string())),
        _ if endpoint_override => Some(Region::Configured),
        _ => None,
    }
}

/// The region a token is asked in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Region {
    Named(String),
    /// The default chain's (`AWS_REGION`, the config file).
    Configured,
}

/// A kept answer: a token until it is close to expiry, a failure for [`FAILED_FOR`].
#[derive(Debug, Clone)]
enum Kept {
    Token(Token),
    Failed(Instant),
}

/// Whether a kept answer still stands at `now`.
fn fresh(kept: &Kept, now: Timestamp, clock: Instant) -> bool {
    match kept {
        Kept::Token(t) => {
            t.expires_at.duration_since(now).unsigned_abs() > REFRESH_MARGIN && t.expires_at > now
        }
        Kept::Failed(at) => clock.duration_since(*at) < FAILED_FOR,
    }
}

/// The pre-flight's ECR identity: cheap to clone.
#[derive(Clone, Default)]
pub struct EcrIdentity {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    endpoint_override: bool,
    source: OnceCell<TokenSource>,
    /// One single-flight slot per region: a burst of deploys makes one fetch.
    slots: Mutex<HashMap<Region, Arc<tokio::sync::Mutex<Option<Kept>>>>>,
}

impl std::fmt::Debug for EcrIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcrIdentity")
            .field("endpoint_override", &self.inner.endpoint_override)
            .finish()
    }
}

impl EcrIdentity {
    /// With the ECR endpoint as the environment sets it. Only the ECR-specific variable counts:
    /// a general `AWS_ENDPOINT_URL` (set for another service) must not make every registry an
    /// ECR candidate.
    pub fn from_env() -> Self {
        let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
        EcrIdentity {
            inner: Arc::new(Inner {
                endpoint_override: set("AWS_ENDPOINT_URL_ECR"),
                ..Inner::default()
            }),
        }
    }

    /// Credentials for the ECR registries of `images` that `have` does not cover, each fetch
    /// bounded by `within`. Hosts it cannot serve are left out (then "not checked").
    pub async fn credentials_for<'a>(
        &self,
        images: impl IntoIterator<Item = &'a str>,
        have: &HashMap<String, Credentials>,
        within: Duration,
    ) -> HashMap<String, Credentials> {
        let mut wanted: HashMap<Region, Vec<String>> = HashMap::new();
        for image in images {
            let Ok(reference) = ImageRef::parse(image) else {
                continue;
            };
            let host = reference.registry.to_ascii_lowercase();
            if have.contains_key(&host) {
                continue;
            }
            if let Some(region) = region_for(&host, self.inner.endpoint_override) {
                wanted.entry(region).or_default().push(host);
            }
        }
        let mut out = HashMap::new();
        for (region, hosts) in wanted {
            let Some(token) = self.token(&region, within).await else {
                continue;
            };
            let served = hosts_served(&token.host, hosts.iter().map(String::as_str));
            for host in hosts.into_iter().filter(|h| served.contains(h)) {
                out.insert(host, token.credentials.clone());
            }
        }
        out
    }

    /// The region's token: kept, or fetched now (one fetch per region at a time; the slot's
    /// lock is the single flight, and nothing else waits on it).
    async fn token(&self, region: &Region, within: Duration) -> Option<Token> {
        let slot = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.entry(region.clone()).or_default().clone()
        };
        let mut kept = slot.lock().await;
        if let Some(k) = kept
            .as_ref()
            .filter(|k| fresh(k, Timestamp::now(), Instant::now()))
        {
            return match k {
                Kept::Token(t) => Some(t.clone()),
                Kept::Failed(_) => None,
            };
        }
        let fetched = tokio::time::timeout(within, self.fetch(region)).await;
        let answer = match fetched {
            Ok(Ok(token))
                if fresh(
                    &Kept::Token(token.clone()),
                    Timestamp::now(),
                    Instant::now(),
                ) =>
            {
                tracing::info!(registry = %token.host, "registry pre-flight: checking ECR images with depwatch's own AWS identity");
                Kept::Token(token)
            }
            Ok(Ok(token)) => {
                tracing::warn!(registry = %token.host, "registry pre-flight: ECR answered a token that has expired; ECR images are not checked");
                Kept::Failed(Instant::now())
            }
            Ok(Err(why)) => {
                tracing::warn!(%why, "registry pre-flight: no ECR token with depwatch's own AWS identity; ECR images are not checked (give depwatch an AWS identity, or credentials, to check them)");
                Kept::Failed(Instant::now())
            }
            Err(_) => {
                tracing::warn!(within = %crate::domain::human_duration(within), "registry pre-flight: ECR gave no token in time; ECR images are not checked");
                Kept::Failed(Instant::now())
            }
        };
        *kept = Some(answer.clone());
        match answer {
            Kept::Token(t) => Some(t),
            Kept::Failed(_) => None,
        }
    }

    async fn fetch(&self, region: &Region) -> Result<Token, String> {
        let source = self.inner.source.get_or_init(TokenSource::load).await;
        match region {
            Region::Named(r) => source.fetch_in(Some(r)).await,
            Region::Configured => source.fetch_in(None).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_hosts_are_asked_in_their_region_and_others_only_with_the_endpoint_pointed_elsewhere() {
        let ecr = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
        let named = |r: &str| Some(Region::Named(r.into()));
        for (host, endpoint_override, want) in [
            (ecr, false, named("eu-west-1")),
            (
                "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                false,
                named("us-east-1"),
            ),
            ("registry.example.com", false, None),
            ("ghcr.io", false, None),
            ("127.0.0.1:5000", true, Some(Region::Configured)),
            (ecr, true, Some(Region::Configured)),
        ] {
            assert_eq!(
                region_for(host, endpoint_override),
                want,
                "{host} {endpoint_override}"
            );
        }
    }

    #[test]
    fn a_token_is_kept_until_close_to_expiry_and_a_failure_for_a_while() {
        let now = Timestamp::now();
        let clock = Instant::now();
        let token = |left: i64| {
            Kept::Token(Token {
                host: "h".into(),
                credentials: Credentials {
                    username: "AWS".into(),
                    password: "p".into(),
                },
                expires_at: now + jiff::SignedDuration::from_secs(left),
            })
        };
        assert!(fresh(&token(3600), now, clock));
        assert!(!fresh(&token(1), now, clock));
        assert!(!fresh(&token(-60), now, clock));
        assert!(fresh(&Kept::Failed(clock), now, clock));
        assert!(!fresh(&Kept::Failed(clock), now, clock + FAILED_FOR));
    }
}
