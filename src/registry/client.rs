//! Asking a registry whether a tag exists, with the OCI distribution API: one HEAD of the
//! manifest (after the token dance a registry asks for), the repository's tags when it does
//! not, and nothing else. Answers are cached briefly and shared by every deploy asking at the
//! same time, so a burst of one repository costs one request; each registry gets a few requests
//! at once and is left alone for as long as its `Retry-After` says.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, LINK, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, StatusCode, Url};
use sha2::Digest as _;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use super::reference::{closest_tags, Credentials, ImageRef};
use super::trust::{self, Hop};

/// What the manifest HEAD accepts: indexes and manifests, OCI and Docker.
const MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Requests one registry gets at once.
const PER_REGISTRY: usize = 4;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a registry said about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It exists; the digest the registry reports, when it does (and it is a digest).
    Found { digest: Option<String> },
    /// It does not; the closest existing tags, when the registry lists them.
    Missing { closest: Vec<String> },
    /// The registry refused the credentials (or asked for some and none were found).
    Denied(String),
    /// No answer: unreachable, 5xx, 429. `retry_after` when the registry said.
    Unavailable {
        why: String,
        retry_after: Option<Duration>,
    },
    /// Not checked, and not worth waiting for: no credentials for a registry that asks for
    /// some (the nodes may pull with their own identity), no such host, connection refused,
    /// a server that is not a registry, or an answer depwatch will not use (too large, a token
    /// realm or redirect it does not trust). The deploy goes on with a warning.
    Unchecked(String),
    /// The registry asks for credentials and none were given: not checked (the nodes may pull
    /// with their own identity), a deploy goes on with a warning.
    NeedsCredentials(String),
}

impl Answer {
    /// How long the answer may be reused.
    fn lifetime(&self) -> Duration {
        match self {
            Answer::Found { .. } => Duration::from_secs(60),
            Answer::Missing { .. }
            | Answer::Denied(_)
            | Answer::Unchecked(_)
            | Answer::NeedsCredentials(_) => Duration::from_secs(5),
            Answer::Unavailable { .. } => Duration::ZERO,
        }
    }
}

/// Whether an address is internal; [`trust::internal_ip`] but for tests.
type Classifier = fn(IpAddr) -> bool;

/// One registry's share of requests, when it asked to be left alone until, and until when it is
/// taken for down (it gave no answer for a whole bounded wait).
#[derive(Default)]
struct Host {
    permits: Option<Semaphore>,
    quiet_until: std::sync::Mutex<Option<Instant>>,
    down_until: std::sync::Mutex<Option<Instant>>,
}

type Cached = (Instant, Arc<OnceCell<Answer>>);
/// `(host, repository, identity)`: a token is reused only by whoever presents the same
/// credentials.
type TokenKey = (String, String, String);

/// Why a request got no response depwatch uses.
enum Failed {
    /// Not reached at once: no such host, connection refused, TLS refused.
    Down(String),
    /// No answer in time, or the connection broke: worth the bounded wait.
    Unreachable(String),
    /// A redirect depwatch does not follow.
    Refused(String),
}

/// Why a body was not read.
enum BodyError {
    TooLarge,
    Failed(String),
}

/// Resolves names to public addresses only: token realms of a registry that is not itself
/// internal cannot be steered at the host's neighbours by DNS.
struct PublicOnly(Classifier);

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let internal = self.0;
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| !internal(a.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to internal addresses only").into());
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The registries depwatch asks. Cheap to clone.
#[derive(Clone)]
pub struct Registries {
    /// Registries themselves, wherever the image says (`--allowed-images` bounds that).
    http: reqwest::Client,
    /// Token realms of registries that are not internal: public addresses only.
    public: reqwest::Client,
    internal: Classifier,
    /// Bearer tokens by host, repository and credentials, with their expiry.
    tokens: Arc<DashMap<TokenKey, (String, Instant)>>,
    hosts: Arc<DashMap<String, Arc<Host>>>,
    answers: Arc<DashMap<String, Cached>>,
    requests: Arc<AtomicU64>,
}

impl Default for Registries {
    fn default() -> Self {
        Self::new()
    }
}

/// Who asks: `anonymous`, or a digest of the credentials (never the credentials).
fn identity(creds: Option<&Credentials>) -> String {
    let Some(c) = creds else {
        return "anonymous".into();
    };
    let mut h = sha2::Sha256::new();
    h.update(c.username.as_bytes());
    h.update([0]);
    h.update(c.password.as_bytes());
    crate::domain::hex(&h.finalize()[..12])
}

impl Registries {
    pub fn new() -> Self {
        Self::classified(trust::internal_ip)
    }

    fn classified(internal: Classifier) -> Self {
        let builder = || {
            reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("depwatch/", env!("CARGO_PKG_VERSION")))
        };
        let public = builder()
            .dns_resolver(Arc::new(PublicOnly(internal)))
            .build()
            .unwrap_or_default();
        Registries {
            http: builder().build().unwrap_or_default(),
            public,
            internal,
            tokens: Arc::default(),
            hosts: Arc::default(),
            answers: Arc::default(),
            requests: Arc::default(),
        }
    }

    /// HTTP requests sent to registries so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether `image` exists, asked at most once per answer's lifetime by the same
    /// credentials (callers asking at the same time share one request).
    pub async fn check(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        self.answer(image, creds, false).await
    }

    /// [`Self::check`], never from an answer kept from before (askers at the same moment
    /// still share it): what comparing with digests approved earlier needs.
    pub async fn check_fresh(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        self.answer(image, creds, true).await
    }

    async fn answer(&self, image: &ImageRef, creds: Option<&Credentials>, fresh: bool) -> Answer {
        let key = format!(
            "{}/{}:{}#{}",
            image.registry,
            image.repository,
            image.reference(),
            identity(creds)
        );
        let cell = {
            let now = Instant::now();
            let mut entry = self
                .answers
                .entry(key)
                .or_insert_with(|| (now, Arc::new(OnceCell::new())));
            let stale = entry
                .1
                .get()
                .is_some_and(|a| now.duration_since(entry.0) >= a.lifetime());
            let answered = entry.1.get().is_some();
            if stale || (fresh && answered) {
                *entry = (now, Arc::new(OnceCell::new()));
            }
            entry.1.clone()
        };
        cell.get_or_init(|| self.ask(image, creds)).await.clone()
    }

    fn host(&self, image: &ImageRef) -> Arc<Host> {
        self.hosts
            .entry(image.api_host().to_string())
            .or_insert_with(|| {
                Arc::new(Host {
                    permits: Some(Semaphore::new(PER_REGISTRY)),
                    ..Host::default()
                })
            })
            .clone()
    }

    /// Whether `image`'s registry gave no answer for a whole bounded wait lately: deploys then
    /// go on at once instead of each waiting again (a burst of 10,000 waits once, not 10,000
    /// times).
    pub fn is_down(&self, image: &ImageRef) -> bool {
        let host = self.host(image);
        let until = *host.down_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|u| u > Instant::now())
    }

    /// Take `image`'s registry for down for `period` (it answers again: no longer).
    pub fn mark_down(&self, image: &ImageRef, period: Duration) {
        let host = self.host(image);
        *host.down_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now() + period);
    }

    /// One registry's answer, within its share of requests.
    async fn ask(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        let host = self.host(image);
        let quiet = *host.quiet_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = quiet.filter(|u| *u > Instant::now()) {
            return Answer::Unavailable {
                why: format!("{} asked to be left alone (429)", image.registry),
                retry_after: Some(until - Instant::now()),
            };
        }
        let _permit = match &host.permits {
            Some(p) => p.acquire().await.ok(),
            None => None,
        };
        let answer = self.head(image, creds).await;
        match &answer {
            Answer::Unavailable {
                retry_after: Some(after),
                ..
            } => {
                *host.quiet_until.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(Instant::now() + *after);
            }
            Answer::Unavailable { .. } => {}
            _ => *host.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None,
        }
        answer
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Failed> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        req.send().await.map_err(|e| {
            let mut out = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                out = format!("{out}: {s}");
                source = s.source();
            }
            match e.is_connect() && !e.is_timeout() {
                true => Failed::Down(out),
                false => Failed::Unreachable(out),
            }
        })
    }

    /// One request, following redirects by [`trust::judge_redirect`]'s rules: never down to
    /// HTTP, never to another host for a token (`same_host_only`), and `auth` only to the same
    /// origin.
    async fn fetch(
        &self,
        client: &reqwest::Client,
        method: Method,
        mut url: Url,
        mut auth: Option<String>,
        same_host_only: bool,
    ) -> Result<reqwest::Response, Failed> {
        for _ in 0..=trust::MAX_REDIRECTS {
            let mut req = client.request(method.clone(), url.clone());
            if method == Method::HEAD {
                req = req.header(ACCEPT, MANIFESTS);
            }
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let res = self.send(req).await?;
            let location = res.headers().get(LOCATION).and_then(|v| v.to_str().ok());
            let (true, Some(location)) = (res.status().is_redirection(), location) else {
                return Ok(res);
            };
            match trust::judge_redirect(&url, location, same_host_only) {
                Hop::Follow { to, keep_auth } => {
                    auth = auth.filter(|_| keep_auth);
                    url = to;
                }
                Hop::Refuse(why) => return Err(Failed::Refused(why)),
            }
        }
        Err(Failed::Refused(format!(
            "more than {} redirects",
            trust::MAX_REDIRECTS
        )))
    }

    /// HEAD the manifest, answering the registry's challenge once.
    async fn head(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        let path = format!("/v2/{}/manifests/{}", image.repository, image.reference());
        let Some(url) = Url::parse(&image.api_base())
            .ok()
            .and_then(|b| b.join(&path).ok())
        else {
            return Answer::Unchecked(format!("{} is not a registry address", image.registry));
        };
        let id = identity(creds);
        let mut auth = self.cached_token(image, &id);
        for attempt in 0..2 {
            let res = match self
                .fetch(&self.http, Method::HEAD, url.clone(), auth.clone(), false)
                .await
            {
                Ok(r) => r,
                Err(failed) => return not_answered(image, failed),
            };
            match res.status() {
                s if s.is_success() => return found(image, res.headers()),
                StatusCode::NOT_FOUND if !self.speaks_registry(&url, res.headers()).await => {
                    return Answer::Unchecked(format!(
                        "{} answered 404 but is not a registry (no Docker-Distribution-Api-Version, no /v2/ challenge)",
                        image.registry
                    ))
                }
                StatusCode::NOT_FOUND => return self.missing(image, &url, auth).await,
                StatusCode::UNAUTHORIZED if attempt == 0 => {
                    match self
                        .answer_challenge(image, &url, res.headers(), creds)
                        .await
                    {
                        Ok(a) => auth = Some(a),
                        Err(answer) => return answer,
                    }
                }
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if creds.is_none() => {
                    return no_credentials(image)
                }
                s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                    return Answer::Denied(format!(
                        "{} refused the credentials for {} ({s})",
                        image.registry, image.repository
                    ))
                }
                s => return unavailable(image, s, res.headers()),
            }
        }
        Answer::Denied(format!("{} kept asking for credentials", image.registry))
    }

    fn cached_token(&self, image: &ImageRef, id: &str) -> Option<String> {
        let key = (
            image.api_host().to_string(),
            image.repository.clone(),
            id.to_string(),
        );
        self.tokens
            .get(&key)
            .filter(|t| t.1 > Instant::now())
            .map(|t| t.0.clone())
    }

    /// The Authorization value a `WWW-Authenticate` challenge asks for: Basic with the
    /// credentials, or a Bearer token from the realm (anonymous when there are none).
    async fn answer_challenge(
        &self,
        image: &ImageRef,
        registry: &Url,
        headers: &HeaderMap,
        creds: Option<&Credentials>,
    ) -> Result<String, Answer> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let need = || no_credentials(image);
        match super::challenge::parse(challenge) {
            Some(super::challenge::Challenge::Basic) => creds.map(basic).ok_or_else(need),
            Some(super::challenge::Challenge::Bearer { realm, service }) => {
                let asked = Realm {
                    registry,
                    realm: &realm,
                    service: service.as_deref(),
                };
                self.token(image, asked, creds).await
            }
            None => Err(need()),
        }
    }

    /// Whether a 404 came from a registry: it says so in `Docker-Distribution-Api-Version`, or
    /// its `/v2/` answers as a registry's does (that header, or a 401 challenge).
    async fn speaks_registry(&self, manifest: &Url, headers: &HeaderMap) -> bool {
        const VERSION: &str = "docker-distribution-api-version";
        if headers.contains_key(VERSION) {
            return true;
        }
        let Ok(base) = manifest.join("/v2/") else {
            return false;
        };
        match self.fetch(&self.http, Method::GET, base, None, false).await {
            Ok(res) => {
                res.headers().contains_key(VERSION)
                    || (res.status() == StatusCode::UNAUTHORIZED
                        && res.headers().contains_key(WWW_AUTHENTICATE))
            }
            Err(_) => false,
        }
    }

    /// Whether the registry's host is internal: by name or literal, or by what it resolves to.
    async fn registry_internal(&self, registry: &Url) -> bool {
        if trust::internal_host(registry, self.internal) {
            return true;
        }
        let host = registry.host_str().unwrap_or_default().to_string();
        let resolved = tokio::net::lookup_host((host.as_str(), 0)).await;
        resolved.is_ok_and(|mut addrs| addrs.any(|a| (self.internal)(a.ip())))
    }

    /// A pull token for the repository from the registry's token realm, when the realm is one
    /// depwatch trusts (see [`trust::judge_realm`]).
    async fn token(
        &self,
        image: &ImageRef,
        asked: Realm<'_>,
        creds: Option<&Credentials>,
    ) -> Result<String, Answer> {
        let internal = self.registry_internal(asked.registry).await;
        let unusable = |why: String| Answer::Unchecked(format!("{}: {why}", image.registry));
        let mut url = trust::judge_realm(
            asked.registry,
            internal,
            asked.realm,
            creds.is_some(),
            self.internal,
        )
        .map_err(unusable)?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("scope", &format!("repository:{}:pull", image.repository));
            if let Some(s) = asked.service {
                query.append_pair("service", s);
            }
        }
        let client = if internal { &self.http } else { &self.public };
        let res = self
            .fetch(client, Method::GET, url, creds.map(basic), true)
            .await
            .map_err(|failed| not_answered(image, failed))?;
        match res.status() {
            s if s.is_success() => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(Answer::Denied(format!(
                    "unauthorized: {} refused a token for {} ({s})",
                    image.registry, image.repository
                )))
            }
            s => return Err(unavailable(image, s, res.headers())),
        }
        let body = read_capped(res, trust::TOKEN_CAP)
            .await
            .map_err(|e| body_failed(image, "token answer", trust::TOKEN_CAP, e))?;
        let (value, lifetime) = bearer(&body).map_err(unusable)?;
        let key = (
            image.api_host().to_string(),
            image.repository.clone(),
            identity(creds),
        );
        let expiry = Instant::now() + lifetime;
        self.tokens.insert(key, (value.clone(), expiry));
        Ok(value)
    }

    /// The tag is missing: name the closest ones the registry lists (none when it will not).
    /// At most [`trust::TAGS_PAGES`] pages of at most [`trust::TAGS_PAGE_CAP`] each are read.
    async fn missing(&self, image: &ImageRef, manifest: &Url, auth: Option<String>) -> Answer {
        let wanted = match &image.reference {
            super::reference::Reference::Tag(t) => t.clone(),
            super::reference::Reference::Digest(_) => {
                return Answer::Missing {
                    closest: Vec::new(),
                }
            }
        };
        let Ok(mut url) = manifest.join(&format!("/v2/{}/tags/list?n=1000", image.repository))
        else {
            return Answer::Missing {
                closest: Vec::new(),
            };
        };
        let mut tags = Vec::new();
        for _ in 0..trust::TAGS_PAGES {
            let res = match self
                .fetch(&self.http, Method::GET, url.clone(), auth.clone(), false)
                .await
            {
                Ok(r) if r.status().is_success() => r,
                _ => break,
            };
            let next = res
                .headers()
                .get(LINK)
                .and_then(|v| v.to_str().ok())
                .and_then(|l| trust::next_page(&url, l));
            let page = match read_capped(res, trust::TAGS_PAGE_CAP).await {
                Ok(body) => serde_json::from_slice::<TagList>(&body).ok(),
                Err(e) => {
                    let why = body_failed(image, "tag list", trust::TAGS_PAGE_CAP, e);
                    tracing::warn!("registry pre-flight: {why:?}; the closest tags are not named");
                    None
                }
            };
            let Some(page) = page else { break };
            tags.extend(page.tags.unwrap_or_default());
            match next {
                Some(n) if tags.len() < trust::TAGS_KEPT => url = n,
                _ => break,
            }
        }
        let (tags, dropped) = trust::keep_tags(tags);
        if dropped > 0 {
            tracing::warn!(registry = %crate::safefs::escape(&image.registry), dropped, "registry pre-flight: tags that are not tags (or past the first {}) were dropped", trust::TAGS_KEPT);
        }
        Answer::Missing {
            closest: closest_tags(&wanted, &tags, 3),
        }
    }
}

/// A token realm as a challenge names it.
struct Realm<'a> {
    registry: &'a Url,
    realm: &'a str,
    service: Option<&'a str>,
}

/// One page of `tags/list`; only the tags are read.
#[derive(serde::Deserialize)]
struct TagList {
    #[serde(default)]
    tags: Option<Vec<String>>,
}

/// A token service's answer; only these fields are read.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// The `Authorization` value and lifetime a token answer gives: a token of visible ASCII.
fn bearer(body: &[u8]) -> Result<(String, Duration), String> {
    let answer: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| format!("the token answer is not JSON ({e})"))?;
    let token = answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token)
        .unwrap_or_default();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token answer holds no usable token".into());
    }
    let lifetime = answer.expires_in.unwrap_or(60).clamp(10, 3600);
    Ok((
        format!("Bearer {token}"),
        Duration::from_secs(lifetime.saturating_sub(5)),
    ))
}

/// The manifest is there; its digest when the registry gave one of the digest grammar.
fn found(image: &ImageRef, headers: &HeaderMap) -> Answer {
    let raw = headers
        .get("docker-content-digest")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let digest = raw.as_deref().and_then(trust::keep_digest);
    if raw.is_some() && digest.is_none() {
        tracing::warn!(registry = %crate::safefs::escape(&image.registry), "registry pre-flight: the Docker-Content-Digest answered is not a digest; not kept");
    }
    Answer::Found { digest }
}

/// Read a body of at most `cap` bytes, as it streams in.
async fn read_capped(mut res: reqwest::Response, cap: usize) -> Result<Vec<u8>, BodyError> {
    if res.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut out = Vec::new();
    while let Some(chunk) = res
        .chunk()
        .await
        .map_err(|e| BodyError::Failed(e.to_string()))?
    {
        if out.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn body_failed(image: &ImageRef, what: &str, cap: usize, e: BodyError) -> Answer {
    match e {
        BodyError::TooLarge => Answer::Unchecked(format!(
            "registry answer too large: {}'s {what} is more than {} KiB",
            image.registry,
            cap / 1024
        )),
        BodyError::Failed(why) => unreachable(image, why),
    }
}

fn not_answered(image: &ImageRef, failed: Failed) -> Answer {
    match failed {
        Failed::Down(why) => Answer::Unchecked(format!("cannot reach {}: {why}", image.registry)),
        Failed::Unreachable(why) => unreachable(image, why),
        Failed::Refused(why) => Answer::Unchecked(format!("{}: {why}", image.registry)),
    }
}

/// A registry that asks for credentials depwatch does not hold: not a refusal, since the
/// nodes may pull with their own identity (EKS node roles, kubelet credential providers).
fn no_credentials(image: &ImageRef) -> Answer {
    Answer::NeedsCredentials(format!(
        "cannot check {}/{}: the registry asks for credentials and depwatch has none (imagePullSecrets, the ServiceAccount's, --registry-credentials); the nodes may pull with their own identity; give depwatch credentials to check",
        image.registry, image.repository
    ))
}

fn basic(c: &Credentials) -> String {
    use base64::Engine;
    let pair = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

fn unreachable(image: &ImageRef, why: String) -> Answer {
    Answer::Unavailable {
        why: format!("cannot reach {}: {why}", image.registry),
        retry_after: None,
    }
}

/// 429 and 5xx: unavailable, for as long as `Retry-After` says (seconds or an HTTP date).
fn unavailable(image: &ImageRef, status: StatusCode, headers: &HeaderMap) -> Answer {
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(super::challenge::retry_after);
    Answer::Unavailable {
        why: format!("{} answered {status}", image.registry),
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const DIGEST: &str = "sha256:abababababababababababababababababababababababababababababababab";

    /// A registry on loopback that asks for a Bearer token from its own realm (anonymous, as
    /// Docker Hub and GHCR do for public images), knows tag `1.0` only, and lists its tags.
    async fn bearer_registry(heads: Arc<AtomicUsize>) -> String {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let realm = format!("http://{addr}/token");
        let app = axum::Router::new()
            .route(
                "/token",
                axum::routing::get(|| async {
                    axum::Json(serde_json::json!({"token": "t0k", "expires_in": 300}))
                }),
            )
            .fallback(move |req: axum::extract::Request| {
                let (heads, realm) = (heads.clone(), realm.clone());
                async move {
                    let authed = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        == Some("Bearer t0k");
                    if !authed {
                        let mut h = HeaderMap::new();
                        let challenge = format!("Bearer realm=\"{realm}\",service=\"test\"");
                        h.insert("www-authenticate", challenge.parse().expect("header"));
                        return (StatusCode::UNAUTHORIZED, h, String::new()).into_response();
                    }
                    let path = req.uri().path().to_string();
                    if path.ends_with("/tags/list") {
                        let tags = serde_json::json!({"name": "lib/app", "tags": ["1.0", "0.9"]});
                        return axum::Json(tags).into_response();
                    }
                    heads.fetch_add(1, Ordering::SeqCst);
                    match path.ends_with("/manifests/1.0") {
                        true => (StatusCode::OK, [("docker-content-digest", DIGEST)], "")
                            .into_response(),
                        false => StatusCode::NOT_FOUND.into_response(),
                    }
                }
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn an_anonymous_bearer_token_is_fetched_once_and_answers_are_shared() {
        let heads = Arc::new(AtomicUsize::new(0));
        let addr = bearer_registry(heads.clone()).await;
        let registries = Registries::new();
        let found = ImageRef::parse(&format!("{addr}/lib/app:1.0")).expect("image");
        let answers =
            futures::future::join_all((0..20).map(|_| registries.check(&found, None))).await;
        assert!(
            answers.iter().all(|a| *a
                == Answer::Found {
                    digest: Some(DIGEST.into())
                }),
            "{answers:?}"
        );
        assert_eq!(
            heads.load(Ordering::SeqCst),
            1,
            "twenty askers, one authorised HEAD"
        );
        // A kept answer serves the next asker; a fresh check asks the registry again.
        registries.check(&found, None).await;
        assert_eq!(heads.load(Ordering::SeqCst), 1, "kept for a minute");
        registries.check_fresh(&found, None).await;
        assert_eq!(heads.load(Ordering::SeqCst), 2, "asked again");
        let missing = ImageRef::parse(&format!("{addr}/lib/app:1.1")).expect("image");
        assert_eq!(
            registries.check(&missing, None).await,
            Answer::Missing {
                closest: vec!["1.0".into(), "0.9".into()]
            }
        );
    }

    /// A registry taken for public (only 127.0.0.2 counts as internal here) whose challenge
    /// names a realm on 127.0.0.2: never asked, and the answer says why.
    #[tokio::test]
    async fn a_public_registry_s_internal_token_realm_is_never_asked() {
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        let asked = Arc::new(AtomicUsize::new(0));
        let internal = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .expect("bind 127.0.0.2");
        let realm = format!(
            "http://{}/internal/creds",
            internal.local_addr().expect("addr")
        );
        let counter = asked.clone();
        let creds = axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { axum::Json(serde_json::json!({"token": "stolen"})) }
        });
        tokio::spawn(async move { axum::serve(internal, creds).await });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let registry =
            axum::Router::new().fallback(move || {
                let challenge = format!("Bearer realm=\"{realm}\"");
                async move {
                    (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response()
                }
            });
        tokio::spawn(async move { axum::serve(listener, registry).await });
        let registries = Registries::classified(|ip| ip == IpAddr::from([127, 0, 0, 2]));
        let image = ImageRef::parse(&format!("{addr}/lib/app:1.0")).expect("image");
        match registries.check(&image, None).await {
            Answer::Unchecked(why) => assert!(why.contains("internal address"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            asked.load(Ordering::SeqCst),
            0,
            "the internal realm was never asked"
        );
    }

    /// A private repository: Basic `ci:s3cret` at the realm gets the token that opens it,
    /// anyone else a token it refuses. What one identity fetched never answers for another,
    /// in either order (the daemon's pre-flight and the simulated kubelet share this client).
    #[tokio::test]
    async fn tokens_and_answers_serve_only_the_credentials_that_fetched_them() {
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let realm = format!("http://{addr}/token");
        let app = axum::Router::new()
            .route(
                "/token",
                axum::routing::get(|headers: HeaderMap| async move {
                    let private = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some(basic(&creds()).as_str());
                    let token = if private { "private" } else { "anonymous" };
                    axum::Json(serde_json::json!({"token": token}))
                }),
            )
            .fallback(move |req: axum::extract::Request| {
                let realm = realm.clone();
                async move {
                    let authed = req
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        == Some("Bearer private");
                    if !authed {
                        let challenge = format!("Bearer realm=\"{realm}\"");
                        return (StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)])
                            .into_response();
                    }
                    (StatusCode::OK, [("docker-content-digest", DIGEST)]).into_response()
                }
            });
        tokio::spawn(async move { axum::serve(listener, app).await });
        fn creds() -> Credentials {
            Credentials {
                username: "ci".into(),
                password: "s3cret".into(),
            }
        }
        let image = ImageRef::parse(&format!("{addr}/team/private:1.0")).expect("image");
        let registries = Registries::new();
        let found = Answer::Found {
            digest: Some(DIGEST.into()),
        };
        assert_eq!(registries.check(&image, Some(&creds())).await, found);
        assert!(
            matches!(
                registries.check(&image, None).await,
                Answer::NeedsCredentials(_)
            ),
            "no credentials: not the private answer"
        );
        let other = Credentials {
            username: "ci".into(),
            password: "wrong".into(),
        };
        assert!(matches!(
            registries.check(&image, Some(&other)).await,
            Answer::Denied(_)
        ));
        // The other order: an anonymous answer first never stands for the credentials.
        let fresh = Registries::new();
        assert!(matches!(
            fresh.check(&image, None).await,
            Answer::NeedsCredentials(_)
        ));
        assert_eq!(fresh.check(&image, Some(&creds())).await, found);
    }
}
