//! The HTTP face of the daemon: health and readiness, Prometheus metrics, the JSON API under
//! `/api/v1` with its OpenAPI document, and the status page. The API changes desired state only
//! by writing dependency files; it never talks to the cluster behind the files' back.

pub mod api;
pub mod page;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::metrics::Metrics;
use crate::pipeline::queue::QueueStats;
use crate::store::Store;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// A named API token from `--api-token-file`.
#[derive(Clone)]
pub struct Token {
    pub name: String,
    secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Token")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot read the API token file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: expected `name:token` (one named token per line, # comments allowed)")]
    TokenLine { path: PathBuf, line: usize },
    #[error("{path}:{line}: the token named {name:?} is shorter than {MIN_TOKEN_LEN} characters; use a long random one (e.g. `openssl rand -hex 32`)")]
    TokenShort {
        path: PathBuf,
        line: usize,
        name: String,
    },
    #[error("cannot listen on {addr} for the HTTP API: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Shortest token accepted: a guessable token is no guard.
pub const MIN_TOKEN_LEN: usize = 8;

/// Read `name:token` lines.
pub fn read_tokens(path: &Path) -> Result<Vec<Token>, HttpError> {
    let text = std::fs::read_to_string(path).map_err(|source| HttpError::TokenFile {
        path: path.to_path_buf(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((name, secret)) if !name.trim().is_empty() && !secret.trim().is_empty() => {
                if secret.trim().chars().count() < MIN_TOKEN_LEN {
                    return Err(HttpError::TokenShort {
                        path: path.to_path_buf(),
                        line: i + 1,
                        name: crate::safefs::escape(name.trim()),
                    });
                }
                tokens.push(Token {
                    name: name.trim().to_string(),
                    secret: secret.trim().to_string(),
                })
            }
            _ => {
                return Err(HttpError::TokenLine {
                    path: path.to_path_buf(),
                    line: i + 1,
                })
            }
        }
    }
    Ok(tokens)
}

/// What the handlers share.
pub struct HttpState {
    pub(crate) store: Store,
    pub(crate) deps_dir: PathBuf,
    pub(crate) tokens: Vec<Token>,
    pub(crate) metrics: Metrics,
    pub(crate) queue: Arc<QueueStats>,
    pub(crate) scheduler: crate::pipeline::queue::Scheduler,
    /// Set once the start-up scan is done.
    pub(crate) scanned: Arc<AtomicBool>,
    /// Set while this replica waits for the Lease (`--leader-elect`).
    pub(crate) standby: Arc<AtomicBool>,
    /// Whether the Kubernetes API server answers (the only question HTTP asks it).
    pub(crate) api_probe: crate::pipeline::deploy::ApiProbe,
    /// What the cluster runs, read-only, from the shared watches.
    pub(crate) live: crate::pipeline::deploy::LiveImages,
    /// Deploys waiting for the API server, for `/readyz`.
    pub(crate) api_waits: Arc<crate::pipeline::deploy::recorder::ApiWaits>,
    pub(crate) shutdown: CancellationToken,
    /// Serialises deploy requests so one idempotency key writes the file once.
    pub(crate) post_lock: tokio::sync::Mutex<()>,
    /// Open event streams, bounded.
    pub(crate) event_streams: Arc<tokio::sync::Semaphore>,
    /// `--namespaces` and `--allowed-images`, checked on requests before any file is written.
    pub(crate) bounds: Arc<crate::bounds::Bounds>,
    /// `--max-file-size`, for reading dependency files.
    pub(crate) max_file_size: u64,
    /// Why the dependency directory is unusable (missing), for `/readyz`.
    pub(crate) root_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// `--ecr-pull-secret`: what fails, for `/readyz`, and the token's expiry, for `/metrics`.
    pub(crate) ecr: Option<crate::registry::ecr::EcrPullSecrets>,
    /// `--http-allowed-hosts`.
    pub(crate) allowed_hosts: Arc<Vec<String>>,
    /// What the page's `depwatch …` advice adds so the commands work as printed
    /// (` --state-dir DIR` when the record is not where the CLI looks by default).
    pub(crate) cli_flags: String,
}

/// A JSON error: what was wrong and, for bad bodies, which field.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }
    pub fn field(status: StatusCode, field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
                field: self.field,
            }),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer realm=\"depwatch\""),
            );
        }
        resp
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        // A replica without the Lease writes nothing: the client should try the leader.
        let status = match e {
            crate::store::StoreError::Fenced(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

/// The name of the token presented as `Authorization: Bearer <token>`, compared in constant time.
pub fn authorize(state: &HttpState, headers: &axum::http::HeaderMap) -> Result<String, ApiError> {
    if state.tokens.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "this API is read-only: start depwatch with --api-token-file to allow changes",
        ));
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme is case-insensitive (RFC 9110); the token is not.
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing `Authorization: Bearer <token>` header",
            )
        })?;
    let mut found = None;
    for t in &state.tokens {
        if bool::from(t.secret.as_bytes().ct_eq(presented.as_bytes())) {
            found = Some(t.name.clone());
        }
    }
    found.ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the bearer token is not valid"))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "depwatch",
        description = "Deploy requests, service state and history of a depwatch daemon. Mutating calls need `Authorization: Bearer <token>`."
    ),
    components(schemas(ErrorBody, crate::store::ServiceRecord, crate::store::DeployRecord))
)]
struct ApiDoc;

/// The router and the OpenAPI document generated from the same route list.
pub fn router(state: Arc<HttpState>) -> (axum::Router, utoipa::openapi::OpenApi) {
    let hosts = state.allowed_hosts.clone();
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(page::status_page))
        .routes(routes!(api::healthz))
        .routes(routes!(api::readyz))
        .routes(routes!(api::leaderz))
        .routes(routes!(api::metrics))
        .routes(routes!(api::list_services))
        .routes(routes!(api::refused_files))
        .routes(routes!(api::get_service))
        .routes(routes!(api::list_deploys, api::create_deploy))
        .routes(routes!(api::get_request))
        .routes(routes!(api::retry_service))
        .routes(routes!(api::rollback_service))
        .routes(routes!(api::promote_service))
        .routes(routes!(api::deploy_now_service))
        .routes(routes!(api::approve_service))
        .routes(routes!(api::reject_service))
        .routes(routes!(api::list_approvals))
        .routes(routes!(api::suspend_service))
        .routes(routes!(api::resume_service))
        .routes(routes!(api::forget_service))
        .routes(routes!(api::events))
        .routes(routes!(api::openapi_json))
        .with_state(state)
        .split_for_parts();
    let doc_json = Arc::new(doc.clone());
    let router = router
        .layer(axum::Extension(doc_json))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(hosts, check_host));
    (router, doc)
}

/// Whether a request's `Host` may be answered: absent (HTTP/1.0), an IP address (what
/// probes and scrapers use; DNS rebinding needs a name), `localhost`, or a name of
/// `--http-allowed-hosts`. Any other name is a page on another origin reaching this server
/// through a name it rebound to it.
pub fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok() || name == "localhost" || allowed.contains(&name)
}

async fn check_host(
    axum::extract::State(allowed): axum::extract::State<Arc<Vec<String>>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let host = req
        .headers()
        .get(axum::http::header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if host_allowed(host.as_deref(), &allowed) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        format!(
            "this server does not answer to the host {:?}: use its address, localhost, or a name given with --http-allowed-hosts",
            crate::safefs::escape(host.as_deref().unwrap_or_default())
        ),
    )
    .into_response()
}

/// Only the probes, for the connections kept beyond the cap: a flood of clients never makes a
/// healthy daemon look dead to its supervisor.
fn probe_router(state: Arc<HttpState>) -> axum::Router {
    let hosts = state.allowed_hosts.clone();
    axum::Router::new()
        .route("/healthz", axum::routing::get(api::healthz))
        .route("/readyz", axum::routing::get(api::readyz))
        .route("/leaderz", axum::routing::get(api::leaderz))
        .fallback(|| async {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many HTTP connections: the connections kept for probes serve only /healthz, /readyz and /leaderz; try again",
            )
        })
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(hosts, check_host))
}

/// Connections kept beyond `--http-max-connections` for `/healthz` and `/readyz`.
pub const PROBE_RESERVE: usize = 4;

/// How long a client may take to send a request's headers (a slow-loris guard).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a client may take to send a request's body.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Default `--http-max-connections`: open connections served at once; more are closed at
/// accept.
pub const MAX_CONNECTIONS: usize = 512;
/// Event streams (`/api/v1/events`) open at once; more get 503.
pub const MAX_EVENT_STREAMS: usize = 64;

/// Serve on a bound listener until `cancel`: HTTP/1.1 with a header-read timeout and a cap on
/// open connections, so a slow or greedy client cannot exhaust the daemon; [`PROBE_RESERVE`]
/// more connections serve only the probes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<HttpState>,
    max_connections: usize,
    cancel: CancellationToken,
) {
    let probes_only = probe_router(state.clone());
    let (router, _) = router(state);
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let probes = Arc::new(tokio::sync::Semaphore::new(PROBE_RESERVE));
    let tracker = tokio_util::task::TaskTracker::new();
    let (mut refused, mut last_said) = (0u64, None);
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let serving = match connections.clone().try_acquire_owned() {
            Ok(permit) => Ok((permit, router.clone())),
            Err(_) => probes
                .clone()
                .try_acquire_owned()
                .map(|permit| (permit, probes_only.clone())),
        };
        let Ok((permit, serves)) = serving else {
            // Said once a minute at most: a flood must not flood the log too.
            refused += 1;
            if last_said.is_none_or(|t: std::time::Instant| t.elapsed().as_secs() >= 60) {
                tracing::warn!(
                    limit = max_connections,
                    refused,
                    "too many HTTP connections (--http-max-connections); refusing the excess"
                );
                last_said = Some(std::time::Instant::now());
            }
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(serves);
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tracker.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn only_addresses_localhost_and_allowed_names_are_answered() {
        let allowed = vec![
            "depwatch.depwatch.svc".to_string(),
            "deploys.example.com".to_string(),
        ];
        let table = [
            (None, true),
            (Some("127.0.0.1:8080"), true),
            (Some("10.1.2.3:8080"), true),
            (Some("[::1]:8080"), true),
            (Some("[fd00::5]"), true),
            (Some("localhost:8080"), true),
            (Some("LOCALHOST"), true),
            (Some("depwatch.depwatch.svc:8080"), true),
            (Some("deploys.example.com."), true),
            (Some("attacker.example:8080"), false),
            (Some("depwatch.depwatch.svc.evil.example"), false),
            (Some("[not-an-ip]:80"), false),
            (Some("127.0.0.1.nip.io"), false),
            (Some(""), false),
        ];
        for (host, want) in table {
            assert_eq!(host_allowed(host, &allowed), want, "{host:?}");
        }
    }

    use super::*;

    #[test]
    fn token_files_are_validated_and_secrets_never_printed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("tokens");
        std::fs::write(
            &p,
            "# release managers\nrelease-bot: s3cr3t-t0ken-1\nalice:another-long-token\n",
        )
        .expect("write");
        let t = read_tokens(&p).expect("valid");
        assert_eq!(t.len(), 2);
        assert!(!format!("{t:?}").contains("s3cr3t"));
        std::fs::write(&p, "release-bot s3cr3t\n").expect("write");
        let e = read_tokens(&p).expect_err("bad line");
        assert!(e.to_string().contains("tokens:1"), "{e}");
    }
}
