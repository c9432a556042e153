//! ECR pull secrets (`--ecr-pull-secret NAME`), the deciding half: what an ECR authorization
//! token means (the registry host, a user and password, the expiry), when the next one is
//! fetched, which registries and namespaces the Secret serves, its `kubernetes.io/dockerconfigjson`
//! body, and whether the Secret found in a namespace is created, patched, left as it is, or
//! refused (someone else's). All pure and table-tested.
//!
//! The doing is elsewhere: [`aws`] asks ECR for tokens through the official SDK, [`keeper`]
//! runs the two tasks (fetch tokens; keep the Secrets) and [`EcrPullSecrets`] is what they share
//! with the deploy path (which namespaces deploy ECR images), the pre-flight (the same token)
//! and `/readyz` (what fails). Deploys never wait on any of it.

pub mod aws;
pub mod identity;
pub mod keeper;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::Event;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::{watch, Notify};

use super::reference::{Credentials, ImageRef};

/// The label that marks a Secret as depwatch's: only such Secrets are ever overwritten.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "depwatch";
/// When the token in the Secret expires (RFC 3339), for people and for the refresh test.
pub const EXPIRES_AT: &str = "depwatch/ecr-token-expires-at";
/// The registries the Secret holds credentials for, comma-separated.
pub const REGISTRIES: &str = "depwatch/ecr-registries";
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";
/// The shortest wait before the next fetch, whatever a token's lifetime says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest wait between two tries after failures.
const MAX_RETRY: Duration = Duration::from_secs(300);
/// A token with no more than this left is stale on arrival: its refresh would fall on the
/// one-second floor, so taking it would mean a fetch and a write of every Secret each second.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(2);

/// One ECR authorization token: the registry it was issued for and what it decodes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `host[:port]` of the answer's `proxyEndpoint`, lowercase.
    pub host: String,
    pub credentials: Credentials,
    pub expires_at: Timestamp,
}

/// `https://123456789012.dkr.ecr.eu-west-1.amazonaws.com` → its `host[:port]`, lowercase.
pub fn endpoint_host(endpoint: &str) -> Result<String, String> {
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, rest)| rest);
    let host = rest.split(['/', '?']).next().unwrap_or_default();
    match host.is_empty() {
        true => Err(format!("proxyEndpoint {endpoint:?} names no host")),
        false => Ok(host.to_ascii_lowercase()),
    }
}

/// A GetAuthorizationToken answer's `authorizationToken` (base64 of `user:password`, `AWS:…`
/// from ECR), `proxyEndpoint` and `expiresAt`.
pub fn decode_token(
    authorization_token: &str,
    proxy_endpoint: &str,
    expires_at: Timestamp,
) -> Result<Token, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(authorization_token.trim())
        .map_err(|_| "the authorizationToken is not base64".to_string())?;
    let pair = String::from_utf8(bytes)
        .map_err(|_| "the authorizationToken is not user:password".to_string())?;
    let (user, password) = pair
        .split_once(':')
        .filter(|(u, p)| !u.is_empty() && !p.is_empty())
        .ok_or("the authorizationToken is not user:password")?;
    Ok(Token {
        host: endpoint_host(proxy_endpoint)?,
        credentials: Credentials {
            username: user.into(),
            password: password.into(),
        },
        expires_at,
    })
}

/// When to fetch the next token: at half of the remaining lifetime (6 h into ECR's 12 h), so
/// a failing refresh has hours of retries before the Secrets stop working.
pub fn refresh_at(fetched: Timestamp, expires_at: Timestamp) -> Timestamp {
    let left = expires_at
        .duration_since(fetched)
        .unsigned_abs()
        .checked_div(2)
        .unwrap_or_default();
    let wait = match expires_at > fetched {
        true => left.max(MIN_REFRESH),
        false => MIN_REFRESH,
    };
    fetched.checked_add(wait).unwrap_or(Timestamp::MAX)
}

/// How long to wait after `failures` failures in a row: 1 s, doubling, at most five minutes.
pub fn retry_in(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    MIN_REFRESH.saturating_mul(1 << exp).min(MAX_RETRY)
}

/// Why a fetch counts as failed: the `reason` label of
/// `depwatch_ecr_refresh_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// GetAuthorizationToken failed, or its answer made no token.
    Error,
    /// The token had expired, or would within [`REFRESH_MARGIN`], when it arrived.
    Expired,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Error => "error",
            Failure::Expired => "expired",
        }
    }
}

/// What the refresher does after a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Take the token (the Secrets follow) and fetch again after `wait`.
    Take { token: Token, wait: Duration },
    /// Keep the current token, count the failure (`failures` in a row now) and try again
    /// after `wait`. `stale`: the registry and expiry of a token refused as stale.
    Fail {
        reason: Failure,
        why: String,
        failures: u32,
        wait: Duration,
        stale: Option<(String, Timestamp)>,
    },
}

/// After a fetch at `now`, with `failures` failures in a row before it: take the token and
/// refresh it at half its remaining lifetime, or back off (1 s, 2 s, 4 s, … five minutes) when
/// the fetch failed or the token is stale on arrival (expired, or within [`REFRESH_MARGIN`]).
pub fn after_fetch(now: Timestamp, fetched: Result<Token, String>, failures: u32) -> Next {
    let failures = failures.saturating_add(1);
    let wait = retry_in(failures);
    let token = match fetched {
        Ok(token) => token,
        Err(why) => {
            let (reason, stale) = (Failure::Error, None);
            return Next::Fail {
                reason,
                why,
                failures,
                wait,
                stale,
            };
        }
    };
    let left = token.expires_at.duration_since(now);
    if left.is_negative() || left.unsigned_abs() <= REFRESH_MARGIN {
        let at = token.expires_at;
        let shown = at.round(jiff::Unit::Second).unwrap_or(at);
        let why = match left.is_negative() {
            true => format!("ECR answered a token that had already expired (at {shown})"),
            false => format!(
                "ECR answered a token that expires at {shown}, within {}: too late to use",
                crate::domain::human_duration(REFRESH_MARGIN)
            ),
        };
        return Next::Fail {
            reason: Failure::Expired,
            why,
            failures,
            wait,
            stale: Some((token.host, at)),
        };
    }
    let next = refresh_at(now, token.expires_at);
    let wait = next.duration_since(now).unsigned_abs();
    Next::Take { token, wait }
}

/// Whether a token is still good at `now` (a Secret is never written with one that is not).
pub fn usable(token: &Token, now: Timestamp) -> bool {
    token.expires_at > now
}

/// The region of an ECR registry host (`<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]`).
pub fn ecr_region(host: &str) -> Option<&str> {
    let host = host.strip_suffix(".cn").unwrap_or(host);
    let rest = host.strip_suffix(".amazonaws.com")?;
    let (account, rest) = rest.split_once('.')?;
    let region = rest
        .strip_prefix("dkr.ecr.")
        .or_else(|| rest.strip_prefix("dkr.ecr-fips."))?;
    let account_ok = account.len() == 12 && account.bytes().all(|b| b.is_ascii_digit());
    (account_ok && !region.is_empty() && !region.contains('.')).then_some(region)
}

/// The registries one token opens: its own, and the ECR registries of the same region seen in
/// deploys (an ECR token opens every registry of its region the identity may pull from:
/// cross-account pulls).
pub fn hosts_served<'a>(
    token_host: &str,
    seen: impl IntoIterator<Item = &'a str>,
) -> BTreeSet<String> {
    let region = ecr_region(token_host);
    let mut out = BTreeSet::from([token_host.to_string()]);
    out.extend(
        seen.into_iter()
            .filter(|h| region.is_some() && ecr_region(h) == region)
            .map(str::to_string),
    );
    out
}

/// The namespaces that get the Secret: those depwatch deployed an image of a served registry
/// to, and those where its own Secret already is (kept fresh across restarts).
pub fn namespaces_wanted(
    deployed: &HashMap<String, BTreeSet<String>>,
    adopted: &BTreeSet<String>,
    served: &BTreeSet<String>,
) -> BTreeSet<String> {
    let mut out = adopted.clone();
    out.extend(
        deployed
            .iter()
            .filter(|(_, hosts)| !hosts.is_disjoint(served))
            .map(|(ns, _)| ns.clone()),
    );
    out
}

/// What the Secret should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The `.dockerconfigjson`, as `kubectl create secret docker-registry` writes it.
    pub config: String,
    pub expires_at: String,
    pub registries: String,
}

pub fn desired(token: &Token, hosts: &BTreeSet<String>) -> Desired {
    let Credentials { username, password } = &token.credentials;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    let auths: serde_json::Map<String, serde_json::Value> = hosts
        .iter()
        .map(|h| {
            let entry = json!({"username": username, "password": password, "auth": auth});
            (h.clone(), entry)
        })
        .collect();
    Desired {
        config: json!({ "auths": auths }).to_string(),
        expires_at: token.expires_at.to_string(),
        registries: hosts.iter().cloned().collect::<Vec<_>>().join(","),
    }
}

/// The Secret as JSON: the body of a create, or of a merge patch that fails with 409 when the
/// Secret changed since `resource_version` was read.
pub fn secret_json(
    name: &str,
    want: &Desired,
    resource_version: Option<&str>,
) -> serde_json::Value {
    let config = base64::engine::general_purpose::STANDARD.encode(&want.config);
    let mut metadata = json!({
        "name": name,
        "labels": {MANAGED_BY: MANAGER},
        "annotations": {EXPIRES_AT: want.expires_at, REGISTRIES: want.registries},
    });
    if let Some(rv) = resource_version {
        metadata["resourceVersion"] = json!(rv);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": DOCKER_CONFIG_JSON,
        "data": {".dockerconfigjson": config},
    })
}

/// A Secret of the name, as the watch shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Labelled as depwatch's.
    pub managed: bool,
    pub resource_version: Option<String>,
    pub kind: Option<String>,
    pub config: Option<Vec<u8>>,
    pub expires_at: Option<String>,
}

impl Seen {
    pub fn of(secret: &Secret) -> Seen {
        Seen {
            managed: secret.labels().get(MANAGED_BY).map(String::as_str) == Some(MANAGER),
            resource_version: secret.resource_version(),
            kind: secret.type_.clone(),
            config: secret
                .data
                .as_ref()
                .and_then(|d| d.get(".dockerconfigjson"))
                .map(|b| b.0.clone()),
            expires_at: secret.annotations().get(EXPIRES_AT).cloned(),
        }
    }
}

/// What to do about one namespace's Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Create,
    /// Depwatch's own, out of date.
    Patch {
        resource_version: Option<String>,
    },
    Current,
    /// Not labelled as depwatch's: never overwritten.
    Foreign,
}

pub fn decide(seen: Option<&Seen>, want: &Desired) -> Write {
    let Some(seen) = seen else {
        return Write::Create;
    };
    if !seen.managed {
        return Write::Foreign;
    }
    let current = seen.kind.as_deref() == Some(DOCKER_CONFIG_JSON)
        && seen.config.as_deref() == Some(want.config.as_bytes())
        && seen.expires_at.as_deref() == Some(want.expires_at.as_str());
    match current {
        true => Write::Current,
        false => Write::Patch {
            resource_version: seen.resource_version.clone(),
        },
    }
}

/// The Secrets of the name by namespace, as the watches (cluster-wide, or one per namespace)
/// report them.
#[derive(Debug, Default)]
pub struct View {
    seen: HashMap<String, Seen>,
    /// During a (re-)listing of a scope (`None`: cluster-wide): the namespaces listed so far.
    relisting: HashMap<Option<String>, HashSet<String>>,
}

impl View {
    /// One watch event of `scope`.
    pub fn apply(&mut self, scope: Option<&str>, event: Event<Secret>) {
        let scope = scope.map(str::to_string);
        match event {
            Event::Init => {
                self.relisting.insert(scope, HashSet::new());
            }
            Event::InitApply(s) => {
                let ns = s.namespace().unwrap_or_default();
                self.relisting.entry(scope).or_default().insert(ns.clone());
                self.seen.insert(ns, Seen::of(&s));
            }
            Event::InitDone => {
                let listed = self.relisting.remove(&scope).unwrap_or_default();
                self.seen.retain(|ns, _| {
                    listed.contains(ns) || scope.as_ref().is_some_and(|only| only != ns)
                });
            }
            Event::Apply(s) => self.record(&s),
            Event::Delete(s) => self.forget(&s.namespace().unwrap_or_default()),
        }
    }

    /// What a write (or a read) returned.
    pub fn record(&mut self, secret: &Secret) {
        self.seen
            .insert(secret.namespace().unwrap_or_default(), Seen::of(secret));
    }

    pub fn forget(&mut self, namespace: &str) {
        self.seen.remove(namespace);
    }

    /// A listing is under way: the view does not hold the whole truth yet.
    pub fn listing(&self) -> bool {
        !self.relisting.is_empty()
    }

    pub fn get(&self, namespace: &str) -> Option<&Seen> {
        self.seen.get(namespace)
    }

    /// Namespaces where depwatch's own Secret is.
    pub fn managed_namespaces(&self) -> impl Iterator<Item = &str> {
        self.seen
            .iter()
            .filter(|(_, s)| s.managed)
            .map(|(ns, _)| ns.as_str())
    }
}

/// What fails, for `/readyz` and the page: empty when all is well.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Token fetches failed in a row, the last reason, and since when.
    pub token_failures: u32,
    pub token_error: Option<String>,
    pub failing_since: Option<Timestamp>,
    /// Namespaces whose Secret could not be written, with why.
    pub secret_errors: BTreeMap<String, String>,
    /// Namespaces with a Secret of the name that is not depwatch's.
    pub foreign: BTreeSet<String>,
    /// The registry and expiry of the last token refused as stale (for `/metrics` while no
    /// token is held).
    pub stale_answer: Option<(String, Timestamp)>,
}

impl Health {
    /// A token was taken: the fetches are well again (the Secrets' own state stays).
    pub fn token_fetched(&mut self) {
        self.token_failures = 0;
        self.token_error = None;
        self.failing_since = None;
        self.stale_answer = None;
    }

    /// The `failures`-th fetch in a row failed at `now`.
    pub fn token_failed(
        &mut self,
        failures: u32,
        why: String,
        now: Timestamp,
        stale: Option<(String, Timestamp)>,
    ) {
        self.token_failures = failures;
        self.token_error = Some(why);
        self.failing_since.get_or_insert(now);
        if stale.is_some() {
            self.stale_answer = stale;
        }
    }
}

/// The `/readyz` detail: what fails, and how long the current token still serves.
pub fn detail(
    name: &str,
    health: &Health,
    token: Option<&Token>,
    now: Timestamp,
) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(why) = &health.token_error {
        let since = health
            .failing_since
            .map(|t| format!(" since {}", t.round(jiff::Unit::Second).unwrap_or(t)))
            .unwrap_or_default();
        let left = match token {
            Some(t) if t.expires_at > now => format!(
                "the current token expires in {}",
                crate::domain::human_duration(t.expires_at.duration_since(now).unsigned_abs())
            ),
            Some(_) => "the current token has expired: the pull secrets are stale".into(),
            None => "no token yet".into(),
        };
        parts.push(format!(
            "fetching an ECR token failed {} time(s){since}: {why} ({left})",
            health.token_failures
        ));
    }
    for (ns, why) in &health.secret_errors {
        parts.push(format!(
            "cannot write Secret {name} in namespace {ns}: {why}"
        ));
    }
    if !health.foreign.is_empty() {
        let list = health
            .foreign
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        parts.push(format!("Secret {name} in namespace(s) {list} is not depwatch's (no label {MANAGED_BY}={MANAGER}): left alone"));
    }
    (!parts.is_empty()).then(|| format!("ECR pull secret {name}: {}", parts.join("; ")))
}

/// What the deploy path, the pre-flight, `/readyz` and the two tasks of [`keeper`] share.
/// Cheap to clone.
#[derive(Clone)]
pub struct EcrPullSecrets {
    inner: Arc<Shared>,
}

struct Shared {
    name: String,
    token: watch::Sender<Option<Token>>,
    /// Set once the first fetch has ended, either way: the pre-flight waits (bounded) for it.
    first_fetch: watch::Sender<bool>,
    /// Registry hosts of the images deployed since start, by namespace.
    deployed: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Wakes the Secret keeper when a namespace or host is new.
    wake: Notify,
    health: Mutex<Health>,
}

impl std::fmt::Debug for EcrPullSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EcrPullSecrets")
            .field("name", &self.inner.name)
            .finish()
    }
}

impl EcrPullSecrets {
    pub fn new(name: &str) -> Self {
        EcrPullSecrets {
            inner: Arc::new(Shared {
                name: name.to_string(),
                token: watch::channel(None).0,
                first_fetch: watch::channel(false).0,
                deployed: Mutex::default(),
                wake: Notify::new(),
                health: Mutex::default(),
            }),
        }
    }

    /// The Secret's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The deploy path's hook: `namespace` runs `images`. Never waits; the keeper writes the
    /// Secret there in the background when a registry is ECR's.
    pub fn note<'a>(&self, namespace: &str, images: impl IntoIterator<Item = &'a str>) {
        let hosts = images
            .into_iter()
            .filter_map(|i| ImageRef::parse(i).ok())
            .map(|i| i.registry.to_ascii_lowercase());
        let mut deployed = self
            .inner
            .deployed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let known = deployed.entry(namespace.to_string()).or_default();
        let mut new = false;
        for host in hosts {
            new |= known.insert(host);
        }
        drop(deployed);
        if new {
            self.inner.wake.notify_one();
        }
    }

    /// The token's credentials for `host`, when it serves that registry.
    pub fn credentials(&self, host: &str) -> Option<Credentials> {
        let token = self.inner.token.borrow();
        let token = token.as_ref()?;
        hosts_served(&token.host, [host])
            .contains(host)
            .then(|| token.credentials.clone())
    }

    /// The token's credentials for the registries of `images` it serves: the pre-flight's,
    /// after the workload's own pull secrets and before `--registry-credentials`.
    pub fn credentials_for<'a>(
        &self,
        images: impl IntoIterator<Item = &'a str>,
    ) -> HashMap<String, Credentials> {
        images
            .into_iter()
            .filter_map(|i| ImageRef::parse(i).ok())
            .map(|i| i.registry.to_ascii_lowercase())
            .filter_map(|host| Some((host.clone(), self.credentials(&host)?)))
            .collect()
    }

    /// Wait, at most `within`, for the first fetch to have ended (only ever at start).
    pub async fn first_fetch(&self, within: Duration) {
        let mut rx = self.inner.first_fetch.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|done| *done)).await;
    }

    /// What fails, for `/readyz`.
    pub fn detail(&self) -> Option<String> {
        let health = self.health();
        detail(
            &self.inner.name,
            &health,
            self.token().as_ref(),
            Timestamp::now(),
        )
    }

    /// The registry and the seconds until the current token expires (below zero once it has),
    /// for `/metrics`; with no token yet, those of the last token refused as stale.
    pub fn expires_in(&self, now: Timestamp) -> Option<(String, i64)> {
        let (host, at) = match self.token() {
            Some(token) => (token.host, token.expires_at),
            None => self.health().stale_answer?,
        };
        Some((host, at.duration_since(now).as_secs()))
    }

    pub fn token(&self) -> Option<Token> {
        self.inner.token.borrow().clone()
    }

    pub(crate) fn set_token(&self, token: Token) {
        self.inner.token.send_replace(Some(token));
    }

    pub(crate) fn fetched_once(&self) {
        self.inner.first_fetch.send_replace(true);
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Token>> {
        self.inner.token.subscribe()
    }

    pub(crate) async fn woken(&self) {
        self.inner.wake.notified().await
    }

    pub(crate) fn deployed(&self) -> HashMap<String, BTreeSet<String>> {
        self.inner
            .deployed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A namespace that is gone.
    pub(crate) fn forget(&self, namespace: &str) {
        self.inner
            .deployed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(namespace);
    }

    pub(crate) fn health(&self) -> Health {
        self.inner
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn update_health(&self, change: impl FnOnce(&mut Health)) {
        change(&mut self.inner.health.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn token(host: &str, expires: &str) -> Token {
        let t = base64::engine::general_purpose::STANDARD.encode("AWS:pw1");
        decode_token(&t, &format!("https://{host}"), at(expires)).expect("token")
    }

    #[test]
    fn a_token_decodes_to_its_registry_user_and_password() {
        let t = base64::engine::general_purpose::STANDARD.encode("AWS:eyJwYXlsb2FkIjoi");
        let token = decode_token(
            &t,
            "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com",
            at("2026-01-01T12:00:00Z"),
        )
        .expect("decodes");
        assert_eq!(token.host, "123456789012.dkr.ecr.eu-west-1.amazonaws.com");
        assert_eq!(token.credentials.username, "AWS");
        assert_eq!(token.credentials.password, "eyJwYXlsb2FkIjoi");
        let loopback = decode_token(&t, "http://127.0.0.1:5000/", at("2026-01-01T12:00:00Z"));
        assert_eq!(loopback.expect("decodes").host, "127.0.0.1:5000");
        for bad in ["%%%", "QVdT" /* "AWS" */, ""] {
            assert!(decode_token(bad, "https://x", at("2026-01-01T12:00:00Z")).is_err());
        }
        assert!(decode_token(&t, "https://", at("2026-01-01T12:00:00Z")).is_err());
    }

    #[test]
    fn the_next_fetch_is_at_half_the_remaining_lifetime() {
        let now = at("2026-01-01T00:00:00Z");
        for (expires, want) in [
            ("2026-01-01T12:00:00Z", "2026-01-01T06:00:00Z"),
            ("2026-01-01T00:00:06Z", "2026-01-01T00:00:03Z"),
            // Expired or about to: never a busy loop.
            ("2026-01-01T00:00:01Z", "2026-01-01T00:00:01Z"),
            ("2025-12-31T00:00:00Z", "2026-01-01T00:00:01Z"),
        ] {
            assert_eq!(refresh_at(now, at(expires)), at(want), "{expires}");
        }
        let waits: Vec<u64> = [1, 2, 3, 7, 9, 10, 11, 100, u32::MAX]
            .map(|f| retry_in(f).as_secs())
            .to_vec();
        assert_eq!(waits, [1, 2, 4, 64, 256, 300, 300, 300, 300]);
    }

    /// What a decision comes to: why it failed (`None`: the token is taken), the failures in
    /// a row now, and the wait in seconds.
    fn summary(next: &Next) -> (Option<Failure>, u32, u64) {
        match next {
            Next::Take { wait, .. } => (None, 0, wait.as_secs()),
            Next::Fail {
                reason,
                failures,
                wait,
                ..
            } => (Some(*reason), *failures, wait.as_secs()),
        }
    }

    #[test]
    fn a_stale_or_failed_fetch_backs_off_and_a_fresh_token_is_taken() {
        let now = at("2026-01-01T00:00:00Z");
        let (taken, expired, error) = (None, Some(Failure::Expired), Some(Failure::Error));
        // (the answer's expiry, or an error; failures before; what it comes to)
        let table = [
            (Ok("2026-01-01T12:00:00Z"), 0, (taken, 0, 6 * 3600)),
            (Ok("2026-01-01T12:00:00Z"), 7, (taken, 0, 6 * 3600)),
            (Ok("2026-01-01T00:00:06Z"), 3, (taken, 0, 3)),
            (Ok("2026-01-01T00:00:03Z"), 0, (taken, 0, 1)),
            // Expired, or within the margin: 1 s, 2 s, 4 s, … five minutes, never each second.
            (Ok("2025-12-31T23:00:00Z"), 0, (expired, 1, 1)),
            (Ok("2025-12-31T23:00:00Z"), 1, (expired, 2, 2)),
            (Ok("2025-12-31T23:00:00Z"), 2, (expired, 3, 4)),
            (Ok("2026-01-01T00:00:00Z"), 5, (expired, 6, 32)),
            (Ok("2026-01-01T00:00:02Z"), 8, (expired, 9, 256)),
            (Ok("2026-01-01T00:00:01Z"), 9, (expired, 10, 300)),
            (
                Ok("1970-01-01T00:00:00Z"),
                u32::MAX,
                (expired, u32::MAX, 300),
            ),
            (Err("500 Internal Server Error"), 0, (error, 1, 1)),
            (Err("500 Internal Server Error"), 3, (error, 4, 8)),
            (Err("500 Internal Server Error"), 20, (error, 21, 300)),
        ];
        for (answer, before, want) in table {
            let fetched = answer
                .map(|expires| token("r:5000", expires))
                .map_err(str::to_string);
            let next = after_fetch(now, fetched, before);
            assert_eq!(summary(&next), want, "{answer:?} after {before} failure(s)");
        }
        // A stale token says why and names its registry and expiry; an error is kept as is.
        let old = at("2025-12-31T23:00:00Z");
        let Next::Fail { why, stale, .. } =
            after_fetch(now, Ok(token("r:5000", "2025-12-31T23:00:00Z")), 0)
        else {
            panic!("an expired token is taken");
        };
        assert_eq!(stale, Some(("r:5000".to_string(), old)));
        assert_eq!(
            why,
            "ECR answered a token that had already expired (at 2025-12-31T23:00:00Z)"
        );
        let Next::Fail { why, .. } =
            after_fetch(now, Ok(token("r:5000", "2026-01-01T00:00:01Z")), 0)
        else {
            panic!("a token within the margin is taken");
        };
        assert!(why.contains("within 2s"), "{why}");
        let Next::Fail { why, stale, .. } = after_fetch(now, Err("denied".into()), 0) else {
            panic!("an error is taken");
        };
        assert_eq!((why.as_str(), stale), ("denied", None));
    }

    #[test]
    fn the_expiry_shown_is_the_real_one_and_an_expired_token_is_unusable() {
        let now = at("2026-01-01T00:00:00Z");
        let ecr = EcrPullSecrets::new("ecr-pull");
        assert_eq!(ecr.expires_in(now), None);
        let old = at("2025-12-31T23:00:00Z");
        ecr.update_health(|h| h.token_failed(1, "stale".into(), now, Some(("r:5000".into(), old))));
        assert_eq!(ecr.expires_in(now), Some(("r:5000".into(), -3600)));
        ecr.set_token(token("r:5000", "2026-01-01T01:00:00Z"));
        assert_eq!(ecr.expires_in(now), Some(("r:5000".into(), 3600)));
        assert_eq!(
            ecr.expires_in(at("2026-01-01T02:00:00Z")),
            Some(("r:5000".into(), -3600))
        );
        let t = ecr.token().expect("token");
        assert!(usable(&t, now));
        assert!(!usable(&t, t.expires_at));
        ecr.update_health(Health::token_fetched);
        assert_eq!(ecr.health(), Health::default());
    }

    #[test]
    fn a_token_serves_its_registry_and_the_same_regions_other_accounts() {
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
            Some("eu-west-1")
        );
        assert_eq!(
            ecr_region("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn"),
            Some("cn-north-1")
        );
        for not in [
            "docker.io",
            "127.0.0.1:5000",
            "x.dkr.ecr.eu-west-1.amazonaws.com",
        ] {
            assert_eq!(ecr_region(not), None, "{not}");
        }
        let own = "111111111111.dkr.ecr.eu-west-1.amazonaws.com";
        let other = "222222222222.dkr.ecr.eu-west-1.amazonaws.com";
        let elsewhere = "222222222222.dkr.ecr.us-east-1.amazonaws.com";
        let served = hosts_served(own, [other, elsewhere, "docker.io"]);
        assert_eq!(served, BTreeSet::from([own.to_string(), other.to_string()]));
        // A loopback registry (the tests' endpoint) serves only itself.
        assert_eq!(
            hosts_served("127.0.0.1:5000", ["127.0.0.1:6000"]),
            BTreeSet::from(["127.0.0.1:5000".to_string()])
        );
    }

    #[test]
    fn the_secret_goes_where_served_images_were_deployed_and_where_it_already_is() {
        let served = BTreeSet::from(["r:5000".to_string()]);
        let deployed = HashMap::from([
            ("shop".to_string(), BTreeSet::from(["r:5000".to_string()])),
            (
                "blog".to_string(),
                BTreeSet::from(["docker.io".to_string()]),
            ),
        ]);
        let adopted = BTreeSet::from(["old".to_string()]);
        let got: Vec<String> = namespaces_wanted(&deployed, &adopted, &served)
            .into_iter()
            .collect();
        assert_eq!(got, ["old", "shop"]);
    }

    fn secret(managed: bool, config: &str, expires: &str, kind: &str) -> Secret {
        let mut s = serde_json::json!({
            "metadata": {"name": "ecr-pull", "namespace": "shop", "resourceVersion": "7",
                         "annotations": {EXPIRES_AT: expires}},
            "type": kind,
            "data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(config)},
        });
        if managed {
            s["metadata"]["labels"] = json!({MANAGED_BY: MANAGER});
        }
        serde_json::from_value(s).expect("secret")
    }

    #[test]
    fn only_depwatchs_own_out_of_date_secret_is_patched() {
        let t = token("r:5000", "2026-01-01T12:00:00Z");
        let want = desired(&t, &BTreeSet::from(["r:5000".to_string()]));
        let config: serde_json::Value = serde_json::from_str(&want.config).expect("json");
        assert_eq!(config["auths"]["r:5000"]["username"], "AWS");
        assert_eq!(config["auths"]["r:5000"]["auth"], "QVdTOnB3MQ==");
        let (ok, old) = (want.expires_at.as_str(), "2026-01-01T00:00:00Z");
        let table = [
            (None, Write::Create),
            (
                Some(secret(true, &want.config, ok, DOCKER_CONFIG_JSON)),
                Write::Current,
            ),
            (
                Some(secret(false, &want.config, ok, DOCKER_CONFIG_JSON)),
                Write::Foreign,
            ),
            (Some(secret(false, "{}", old, "Opaque")), Write::Foreign),
            (
                Some(secret(true, &want.config, old, DOCKER_CONFIG_JSON)),
                Write::Patch {
                    resource_version: Some("7".into()),
                },
            ),
            (
                Some(secret(true, "{}", ok, DOCKER_CONFIG_JSON)),
                Write::Patch {
                    resource_version: Some("7".into()),
                },
            ),
        ];
        for (found, write) in table {
            let seen = found.as_ref().map(Seen::of);
            assert_eq!(decide(seen.as_ref(), &want), write, "{seen:?}");
        }
        let body = secret_json("ecr-pull", &want, Some("7"));
        assert_eq!(body["metadata"]["labels"][MANAGED_BY], MANAGER);
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        assert_eq!(body["type"], DOCKER_CONFIG_JSON);
        let written: Secret = serde_json::from_value(body).expect("a Secret");
        let back = super::super::reference::parse_docker_config(
            std::str::from_utf8(&written.data.expect("data")[".dockerconfigjson"].0)
                .expect("utf-8"),
        )
        .expect("a docker config");
        assert_eq!(back["r:5000"].password, "pw1");
    }

    #[test]
    fn the_view_follows_listings_and_deletions() {
        let mut view = View::default();
        let s = |ns: &str| {
            let mut s = secret(true, "{}", "x", DOCKER_CONFIG_JSON);
            s.metadata.namespace = Some(ns.into());
            s
        };
        view.apply(None, Event::Init);
        view.apply(None, Event::InitApply(s("a")));
        view.apply(None, Event::InitApply(s("b")));
        view.apply(None, Event::InitDone);
        view.apply(None, Event::Delete(s("a")));
        let mut managed: Vec<&str> = view.managed_namespaces().collect();
        managed.sort();
        assert_eq!(managed, ["b"]);
        // A relisting drops what it no longer holds, in its own scope only.
        view.apply(Some("c"), Event::Apply(s("c")));
        view.apply(None, Event::Init);
        view.apply(None, Event::InitDone);
        assert!(view.get("b").is_none());
        view.apply(Some("c"), Event::Init);
        view.apply(Some("c"), Event::InitDone);
        assert!(view.get("c").is_none());
    }

    #[test]
    fn the_readiness_detail_says_what_fails() {
        let now = at("2026-01-01T00:00:00Z");
        assert_eq!(detail("ecr-pull", &Health::default(), None, now), None);
        let health = Health {
            token_failures: 2,
            token_error: Some("500 Internal Server Error".into()),
            failing_since: Some(now),
            secret_errors: BTreeMap::from([("shop".into(), "403 Forbidden".into())]),
            foreign: BTreeSet::from(["blog".into()]),
            stale_answer: None,
        };
        let t = token("r:5000", "2026-01-01T01:00:00Z");
        let d = detail("ecr-pull", &health, Some(&t), now).expect("detail");
        assert!(d.starts_with("ECR pull secret ecr-pull: fetching an ECR token failed 2 time(s) since 2026-01-01T00:00:00Z: 500 Internal Server Error (the current token expires in 1h)"), "{d}");
        assert!(
            d.contains("cannot write Secret ecr-pull in namespace shop: 403 Forbidden"),
            "{d}"
        );
        assert!(d.contains("namespace(s) blog is not depwatch's"), "{d}");
        let later = at("2026-01-01T02:00:00Z");
        let d = detail("ecr-pull", &health, Some(&t), later).expect("detail");
        assert!(
            d.contains("(the current token has expired: the pull secrets are stale)"),
            "{d}"
        );
    }

    #[test]
    fn a_deploy_notes_its_registries_and_the_token_serves_the_preflight() {
        let ecr = EcrPullSecrets::new("ecr-pull");
        ecr.note("shop", ["r:5000/team/web:1.0", "docker.io/library/nginx"]);
        assert!(ecr.deployed()["shop"].contains("r:5000"));
        assert!(ecr.credentials("r:5000").is_none(), "no token yet");
        ecr.set_token(token("r:5000", "2026-01-01T01:00:00Z"));
        assert_eq!(ecr.credentials("r:5000").expect("creds").username, "AWS");
        assert!(ecr.credentials("docker.io").is_none());
    }
}
