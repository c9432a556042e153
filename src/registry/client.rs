//! Asking a registry whether a tag exists, with the OCI distribution API: one HEAD of the
//! manifest (after the token dance a registry asks for), the repository's tags when it does
//! not, and nothing else. Answers are cached briefly and shared by every deploy asking at the
//! same time, so a burst of one repository costs one request; each registry gets a few requests
//! at once and is left alone for as long as its `Retry-After` says.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::StatusCode;
use tokio::sync::{OnceCell, Semaphore};
use tokio::time::Instant;

use super::reference::{closest_tags, Credentials, ImageRef};

/// What the manifest HEAD accepts: indexes and manifests, OCI and Docker.
const MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Requests one registry gets at once.
const PER_REGISTRY: usize = 4;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a registry said about one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// It exists; the digest the registry reports, when it does.
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
}

impl Answer {
    /// How long the answer may be reused.
    fn lifetime(&self) -> Duration {
        match self {
            Answer::Found { .. } => Duration::from_secs(60),
            Answer::Missing { .. } | Answer::Denied(_) => Duration::from_secs(5),
            Answer::Unavailable { .. } => Duration::ZERO,
        }
    }
}

/// One registry's share of requests, when it asked to be left alone until, and until when it is
/// taken for down (it gave no answer for a whole bounded wait).
#[derive(Default)]
struct Host {
    permits: Option<Semaphore>,
    quiet_until: std::sync::Mutex<Option<Instant>>,
    down_until: std::sync::Mutex<Option<Instant>>,
}

type Cached = (Instant, Arc<OnceCell<Answer>>);

/// The registries depwatch asks. Cheap to clone.
#[derive(Clone)]
pub struct Registries {
    http: reqwest::Client,
    /// Bearer tokens by `(host, repository)`, with their expiry.
    tokens: Arc<DashMap<(String, String), (String, Instant)>>,
    hosts: Arc<DashMap<String, Arc<Host>>>,
    answers: Arc<DashMap<String, Cached>>,
    requests: Arc<AtomicU64>,
}

impl Default for Registries {
    fn default() -> Self {
        Self::new()
    }
}

impl Registries {
    pub fn new() -> Self {
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("depwatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Registries {
            http,
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

    /// Whether `image` exists, asked at most once per answer's lifetime (callers asking at the
    /// same time share one request).
    pub async fn check(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        let key = format!(
            "{}/{}:{}#{}",
            image.registry,
            image.repository,
            image.reference(),
            creds.map(|c| c.username.as_str()).unwrap_or_default()
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
            if stale {
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

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        req.send().await.map_err(|e| {
            let mut out = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                out = format!("{out}: {s}");
                source = s.source();
            }
            out
        })
    }

    /// HEAD the manifest, answering the registry's challenge once.
    async fn head(&self, image: &ImageRef, creds: Option<&Credentials>) -> Answer {
        let url = format!(
            "{}/v2/{}/manifests/{}",
            image.api_base(),
            image.repository,
            image.reference()
        );
        let mut auth = self.cached_token(image);
        for attempt in 0..2 {
            let mut req = self.http.head(&url).header(ACCEPT, MANIFESTS);
            if let Some(a) = &auth {
                req = req.header(AUTHORIZATION, a);
            }
            let res = match self.send(req).await {
                Ok(r) => r,
                Err(why) => return unreachable(image, why),
            };
            match res.status() {
                s if s.is_success() => {
                    let digest = res
                        .headers()
                        .get("docker-content-digest")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    return Answer::Found { digest };
                }
                StatusCode::NOT_FOUND => return self.missing(image, auth.as_deref()).await,
                StatusCode::UNAUTHORIZED if attempt == 0 => {
                    match self.answer_challenge(image, res.headers(), creds).await {
                        Ok(a) => auth = Some(a),
                        Err(answer) => return answer,
                    }
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

    fn cached_token(&self, image: &ImageRef) -> Option<String> {
        let key = (image.api_host().to_string(), image.repository.clone());
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
        headers: &HeaderMap,
        creds: Option<&Credentials>,
    ) -> Result<String, Answer> {
        let challenge = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let need = || {
            Answer::Denied(format!(
                "unauthorized: {} needs credentials for {} and none were found (imagePullSecrets, the ServiceAccount's, --registry-credentials)",
                image.registry, image.repository
            ))
        };
        match super::challenge::parse(challenge) {
            Some(super::challenge::Challenge::Basic) => creds.map(basic).ok_or_else(need),
            Some(super::challenge::Challenge::Bearer { realm, service }) => {
                self.token(image, &realm, service.as_deref(), creds).await
            }
            None => Err(need()),
        }
    }

    /// A pull token for the repository from the registry's token realm.
    async fn token(
        &self,
        image: &ImageRef,
        realm: &str,
        service: Option<&str>,
        creds: Option<&Credentials>,
    ) -> Result<String, Answer> {
        let scope = format!("repository:{}:pull", image.repository);
        let mut query = vec![("scope", scope.as_str())];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let mut req = self.http.get(realm).query(&query);
        if let Some(c) = creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let res = self
            .send(req)
            .await
            .map_err(|why| unreachable(image, why))?;
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
        let body: serde_json::Value = res.json().await.map_err(|e| Answer::Unavailable {
            why: format!("{}: the token answer is not JSON ({e})", image.registry),
            retry_after: None,
        })?;
        let token = body["token"]
            .as_str()
            .or(body["access_token"].as_str())
            .unwrap_or_default()
            .to_string();
        let lifetime = body["expires_in"].as_u64().unwrap_or(60).clamp(10, 3600);
        let value = format!("Bearer {token}");
        let key = (image.api_host().to_string(), image.repository.clone());
        let expiry = Instant::now() + Duration::from_secs(lifetime.saturating_sub(5));
        self.tokens.insert(key, (value.clone(), expiry));
        Ok(value)
    }

    /// The tag is missing: name the closest ones the registry lists (none when it will not).
    async fn missing(&self, image: &ImageRef, auth: Option<&str>) -> Answer {
        let wanted = match &image.reference {
            super::reference::Reference::Tag(t) => t.clone(),
            super::reference::Reference::Digest(_) => {
                return Answer::Missing {
                    closest: Vec::new(),
                }
            }
        };
        let url = format!(
            "{}/v2/{}/tags/list?n=1000",
            image.api_base(),
            image.repository
        );
        let mut req = self.http.get(url);
        if let Some(a) = auth {
            req = req.header(AUTHORIZATION, a);
        }
        let tags: Vec<String> = match self.send(req).await {
            Ok(r) if r.status().is_success() => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| serde_json::from_value(v["tags"].clone()).ok())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        Answer::Missing {
            closest: closest_tags(&wanted, &tags, 3),
        }
    }
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
                        true => (StatusCode::OK, [("docker-content-digest", "sha256:ab")], "")
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
                    digest: Some("sha256:ab".into())
                }),
            "{answers:?}"
        );
        assert_eq!(
            heads.load(Ordering::SeqCst),
            1,
            "twenty askers, one authorised HEAD"
        );
        let missing = ImageRef::parse(&format!("{addr}/lib/app:1.1")).expect("image");
        assert_eq!(
            registries.check(&missing, None).await,
            Answer::Missing {
                closest: vec!["1.0".into(), "0.9".into()]
            }
        );
    }
}
