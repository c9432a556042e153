//! The JSON API under `/api/v1`, plus `/healthz`, `/readyz` and `/metrics`.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures::{Stream, StreamExt};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::{authorize, ApiError, ErrorBody, HttpState, BODY_LIMIT};
use crate::depfile;
use crate::domain::{
    Asker, DeployOutcome, ImageSpec, Images, ServiceKey, ServiceStatus, WorkloadKind,
};
use crate::operator;
use crate::store::{self, DeployRecord, RequestRecord, ServiceRecord};

type Shared = State<Arc<HttpState>>;

/// A service with its latest deploy and the images it runs now: what `GET /api/v1/services`
/// and `depwatch status -o json|yaml` print.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(default)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    /// The kind of workload its file names (`deployment` until a deploy found it).
    #[serde(default)]
    pub kind: WorkloadKind,
    pub status: ServiceStatus,
    pub desired: Images,
    /// What the file asks now: the images its content resolved to when a plan got that far,
    /// else the file's own words (`1.4.2`), so a refused or waiting version is never shown as
    /// the one running.
    pub asks: String,
    /// Why what the file asks is not running: `waiting: suspended`, `pinned` or `refused`;
    /// empty otherwise.
    pub not_running: String,
    /// What the cluster runs now, from depwatch's shared watch (empty when not watched yet, and
    /// from a local `depwatch status`, which never talks to the cluster).
    pub running: Images,
    pub deployed: Images,
    pub last_good: Images,
    /// The version that failed and is pinned: not deployed again until the file changes or
    /// `depwatch retry` (empty when nothing is pinned).
    pub pinned: Images,
    /// The failure reason or other message of the latest change.
    pub message: String,
    /// What an operator can do about it (empty when healthy or busy).
    pub next_step: String,
    pub suspended: bool,
    pub path: String,
    pub updated_at: String,
    pub last_deploy: Option<DeployRecord>,
    /// While verifying: when the bake ends (RFC 3339), and how many seconds it has left.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bake_ends_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake_left_seconds: Option<u64>,
}

impl ServiceView {
    /// A record as people and programs see it.
    pub fn new(r: ServiceRecord, running: Images, last_deploy: Option<DeployRecord>) -> Self {
        let (asks, why) = r.desired_shown();
        let bake_left_seconds = r.bake_left(jiff::Timestamp::now()).map(|d| d.as_secs());
        ServiceView {
            bake_ends_at: match bake_left_seconds {
                Some(_) => r.bake_ends_at.clone(),
                None => String::new(),
            },
            bake_left_seconds,
            asks,
            not_running: why.map(|w| w.as_str().to_string()).unwrap_or_default(),
            pinned: r.pinned().cloned().unwrap_or_default(),
            next_step: r.next_step().unwrap_or_default(),
            namespace: r.namespace,
            name: r.name,
            kind: r.kind,
            status: r.status,
            desired: r.desired,
            running,
            deployed: r.deployed,
            last_good: r.last_good,
            message: r.message,
            suspended: r.suspended,
            path: r.path,
            updated_at: r.updated_at,
            last_deploy,
        }
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The status as people read it: `verifying (4m 12s left)` during a bake.
    pub fn status_shown(&self) -> String {
        match self.bake_left_seconds {
            Some(left) => format!(
                "{} ({} left)",
                self.status,
                humantime::format_duration(std::time::Duration::from_secs(left))
            ),
            None => self.status.to_string(),
        }
    }

    /// What DESIRED shows (one container's image alone, several as `name=image`) and why it
    /// is not running, if it is not. A view from an older daemon has only `desired`.
    pub fn desired_cell(&self) -> (String, Option<&str>) {
        let text = if self.asks.is_empty() {
            self.desired.to_string()
        } else {
            self.asks.clone()
        };
        // Images read back as images (one alone); the file's own words as written.
        let images = Images::parse(&text);
        let shown = if text.is_empty() || images.to_string() == text {
            images.cell()
        } else {
            text
        };
        let why = (!self.not_running.is_empty()).then_some(self.not_running.as_str());
        (shown, why)
    }

    /// `statefulset/db`.
    pub fn workload(&self) -> String {
        crate::domain::Shown(self.kind, &self.name).to_string()
    }
}

/// One service with its history, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServiceDetail {
    pub service: ServiceView,
    pub history: Vec<DeployRecord>,
}

pub async fn view(state: &HttpState, r: ServiceRecord) -> ServiceView {
    let key = r.key();
    let last_deploy = state
        .store
        .history(Some(&key), 1)
        .await
        .ok()
        .and_then(|h| h.into_iter().next());
    let running = state.live.of(&key, r.kind).unwrap_or_default();
    ServiceView::new(r, running, last_deploy)
}

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "alive", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready to serve: on the replica that acts, the start-up scan is done, the dependency
/// directory is there, the record takes writes and the Kubernetes API server answers; on a
/// standby (`--leader-elect`), the record answers its reads. Which replica acts is
/// `/leaderz`, a separate signal, so a rolling update of replicas never waits for a standby
/// to lead. A ready answer may carry details after `ok; ` (ECR pull secrets that fail to
/// refresh).
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "ready", body = String),
    (status = 503, description = "not ready, with the reason", body = ErrorBody)))]
pub async fn readyz(State(state): Shared) -> Result<String, ApiError> {
    if state.standby.load(Ordering::SeqCst) {
        return match state.store.history(None, 1).await {
            Ok(_) => Ok("ok: standby, serving reads (another replica holds the Lease and acts; see /leaderz)".into()),
            Err(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("standby: the record cannot be read: {e}"),
            )),
        };
    }
    if !state.scanned.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the start-up scan of the dependency directory is not done",
        ));
    }
    let root_problem = state
        .root_problem
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if let Some(problem) = root_problem {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, problem));
    }
    let record = state.store.health();
    if let Some(why) = &record.error {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the record ({}) refuses writes: {} kept in memory until it answers again ({why})",
                state.store.describe(),
                record.pending,
            ),
        ));
    }
    let (waiting, error) = state.api_waits.now();
    if waiting > 0 {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{waiting} deploy(s) waiting for the Kubernetes API server: {error}"),
        ));
    }
    state
        .api_probe
        .answers(Duration::from_secs(2))
        .await
        .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why))?;
    // ECR pull secrets that fail to refresh are said, but never make the replica unready:
    // deploys go on, and the Secrets keep the current token until it expires.
    match state.ecr.as_ref().and_then(|e| e.detail()) {
        Some(detail) => Ok(format!("ok; {detail}")),
        None => Ok("ok".into()),
    }
}

/// Changes go to the replica that acts: a standby (ready, serving reads) answers 503 saying so.
fn not_a_standby(state: &HttpState) -> Result<(), ApiError> {
    if state.standby.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: this replica serves reads only; send changes to the replica that acts (its /leaderz answers 200), or retry",
        ));
    }
    Ok(())
}

/// Whether this replica acts (holds the Lease, or runs without leader election): 200 on the
/// leader, 503 on a standby.
#[utoipa::path(get, path = "/leaderz", tag = "health", responses(
    (status = 200, description = "this replica acts", body = String),
    (status = 503, description = "a standby", body = ErrorBody)))]
pub async fn leaderz(State(state): Shared) -> Result<&'static str, ApiError> {
    if state.standby.load(Ordering::SeqCst) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "standby: another replica holds the Lease and acts; this one serves reads and takes over if it goes",
        ));
    }
    Ok("ok: this replica acts")
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): Shared) -> impl IntoResponse {
    let statuses: Vec<(ServiceStatus, WorkloadKind)> = state
        .store
        .services()
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|s| (s.status, s.kind))
        .collect();
    let gauges = crate::metrics::QueueGauges {
        depth: state.scheduler.depth(),
        queued: state.queue.queued.load(Ordering::Relaxed),
        running: state.queue.running.load(Ordering::Relaxed),
        record: state.store.health(),
    };
    if let Some(ecr) = &state.ecr {
        state
            .metrics
            .ecr_expiry(ecr.expires_in(jiff::Timestamp::now()));
    }
    let text = state.metrics.encode(gauges, &statuses);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Default and largest page of the list endpoints (`/api/v1/services`,
/// `/api/v1/refused-files`); `/api/v1/deploys` keeps its own default of 50.
pub const REFUSED_PAGE: usize = 100;
pub const REFUSED_PAGE_MAX: usize = 1000;

/// The page length asked for, or the default; out of range is a 400 naming the range.
pub fn page_limit(asked: Option<usize>) -> Result<usize, ApiError> {
    let limit = asked.unwrap_or(REFUSED_PAGE);
    if limit == 0 || limit > REFUSED_PAGE_MAX {
        return Err(ApiError::field(
            StatusCode::BAD_REQUEST,
            "limit",
            format!("limit must be from 1 to {REFUSED_PAGE_MAX}"),
        ));
    }
    Ok(limit)
}

/// The `Link` header to the page after a full one (`None` after a short page: it was the
/// last): `path` with `query` and `after` set to the last key shown.
pub fn next_link(path: &str, query: &[(&str, &str)], after: Option<&str>) -> Option<String> {
    let after = after?;
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query {
        q.append_pair(k, v);
    }
    let q = q.append_pair("after", after).finish();
    Some(format!("<{path}?{q}>; rel=\"next\""))
}

/// A page's headers: `X-Total-Count` when known, `Link` to the next page when there is one.
fn page_headers(total: Option<usize>, next: Option<String>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(total) = total {
        headers.insert("x-total-count", total.into());
    }
    if let Some(v) = next.and_then(|n| n.parse().ok()) {
        headers.insert(axum::http::header::LINK, v);
    }
    headers
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct ServicesPageQuery {
    /// How many (default 100, at most 1000).
    pub limit: Option<usize>,
    /// `namespace/name` of the last service of the previous page (the `Link` header's `next`
    /// names it).
    pub after: Option<String>,
    /// Only services with this status (`failed`), or `suspended`.
    pub status: Option<String>,
}

/// Managed services by namespace and name, one page at a time: `X-Total-Count` says how many
/// there are (with the `status` filter), `Link: <…>; rel="next"` where the next page is.
#[utoipa::path(get, path = "/api/v1/services", tag = "services", params(ServicesPageQuery),
    responses((status = 200, body = Vec<ServiceView>,
        headers(("X-Total-Count" = usize), ("Link" = String))), (status = 400, body = ErrorBody)))]
pub async fn list_services(
    State(state): Shared,
    Query(q): Query<ServicesPageQuery>,
) -> Result<(HeaderMap, Json<Vec<ServiceView>>), ApiError> {
    let limit = page_limit(q.limit)?;
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            ServiceKey::parse_slash(a)
                .map_err(|m| ApiError::field(StatusCode::BAD_REQUEST, "after", m))?,
        ),
    };
    let filter = store::ServiceFilter::parse(q.status.as_deref())
        .map_err(|e| ApiError::field(StatusCode::BAD_REQUEST, "status", e.to_string()))?;
    let query = store::ServicesQuery {
        after,
        filter,
        limit,
    };
    let page = state.store.services_page(&query).await?;
    let last = page.next.map(|k| k.to_string());
    let (limit_text, status) = (limit.to_string(), q.status.unwrap_or_default());
    let mut params = vec![("limit", limit_text.as_str())];
    if !status.is_empty() {
        params.push(("status", status.as_str()));
    }
    let next = next_link("/api/v1/services", &params, last.as_deref());
    let mut out = Vec::with_capacity(page.rows.len());
    for r in page.rows {
        out.push(view(&state, r).await);
    }
    Ok((page_headers(Some(page.total), next), Json(out)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct PageQuery {
    /// How many (default 100, at most 1000).
    pub limit: Option<usize>,
    /// The last path of the previous page (the `Link` header's `next` names it).
    pub after: Option<String>,
}

/// Files in the dependency directory refused for their names (`web-prod.dep`,
/// `web_prod.dep.txt`): nothing is read from them until they are renamed or removed. Paged by
/// path: `X-Total-Count` says how many there are, `Link: <…>; rel="next"` where the next page is.
#[utoipa::path(get, path = "/api/v1/refused-files", tag = "services", params(PageQuery),
    responses((status = 200, body = Vec<crate::store::RefusedFile>,
        headers(("X-Total-Count" = usize), ("Link" = String))), (status = 400, body = ErrorBody)))]
pub async fn refused_files(
    State(state): Shared,
    Query(q): Query<PageQuery>,
) -> Result<(HeaderMap, Json<Vec<crate::store::RefusedFile>>), ApiError> {
    let limit = page_limit(q.limit)?;
    let after = q.after.unwrap_or_default();
    let (files, total) = state.store.refused_page(&after, limit).await?;
    let last = files
        .last()
        .filter(|_| files.len() == limit)
        .map(|f| f.path.as_str());
    let next = next_link(
        "/api/v1/refused-files",
        &[("limit", &limit.to_string())],
        last,
    );
    Ok((page_headers(Some(total), next), Json(files)))
}

fn key_from_path(namespace: &str, name: &str) -> Result<ServiceKey, ApiError> {
    ServiceKey::new(name, namespace)
        .map_err(|m| ApiError::field(StatusCode::BAD_REQUEST, "service", m))
}

/// One service with its deploy history.
#[utoipa::path(get, path = "/api/v1/services/{namespace}/{name}", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path, description = "Deployment name")),
    responses((status = 200, body = ServiceDetail), (status = 404, body = ErrorBody)))]
pub async fn get_service(
    State(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<ServiceDetail>, ApiError> {
    let key = key_from_path(&namespace, &name)?;
    let r = state.store.service(&key).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("service {key} is not managed by depwatch"),
        )
    })?;
    let history = state.store.history(Some(&key), 50).await?;
    Ok(Json(ServiceDetail {
        service: view(&state, r).await,
        history,
    }))
}

/// A service's approval rows, oldest first: each save that needed approval (who asked, when),
/// and each approver's word on it, with the comment; the marks of recorded rejections too.
#[utoipa::path(get, path = "/api/v1/services/{namespace}/{name}/approvals", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = Vec<crate::domain::approval::Vote>), (status = 400, body = ErrorBody)))]
pub async fn list_approvals(
    State(state): Shared,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<Json<Vec<crate::domain::approval::Vote>>, ApiError> {
    let key = key_from_path(&namespace, &name)?;
    Ok(Json(state.store.votes(&key).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeploysQuery {
    /// `namespace/deployment`; all services when absent.
    pub service: Option<String>,
    /// How many, newest first (default 50, at most 1000).
    pub limit: Option<usize>,
    /// The `id` of the last deploy of the previous page: older ones follow (the `Link`
    /// header's `next` names it).
    pub after: Option<i64>,
}

/// Deploys, newest first, optionally of one service, one page at a time: `Link: <…>;
/// rel="next"` where the next (older) page is.
#[utoipa::path(get, path = "/api/v1/deploys", tag = "deploys", params(DeploysQuery),
    responses((status = 200, body = Vec<DeployRecord>, headers(("Link" = String))),
        (status = 400, body = ErrorBody)))]
pub async fn list_deploys(
    State(state): Shared,
    Query(q): Query<DeploysQuery>,
) -> Result<(HeaderMap, Json<Vec<DeployRecord>>), ApiError> {
    let key = match &q.service {
        Some(s) => Some(
            ServiceKey::parse_slash(s)
                .map_err(|m| ApiError::field(StatusCode::BAD_REQUEST, "service", m))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let rows = state
        .store
        .history_page(key.as_ref(), q.after, limit)
        .await?;
    let last = (rows.len() == limit)
        .then(|| rows.last().map(|d| d.id.to_string()))
        .flatten();
    let limit = limit.to_string();
    let mut params = vec![("limit", limit.as_str())];
    if let Some(s) = &q.service {
        params.push(("service", s.as_str()));
    }
    let next = next_link("/api/v1/deploys", &params, last.as_deref());
    Ok((page_headers(None, next), Json(rows)))
}

/// A deploy request: one of `version` (a tag or digest) or `image` (a full reference).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    /// The Deployment's name.
    pub service: String,
    pub namespace: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
}

/// Where a deploy request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Pending,
    Succeeded,
    Failed,
    RolledBack,
    Superseded,
    /// It needed approval and was rejected, or not approved in time: nothing deployed.
    Rejected,
}

impl From<DeployOutcome> for RequestStatus {
    fn from(outcome: DeployOutcome) -> Self {
        match outcome {
            DeployOutcome::InProgress => RequestStatus::Pending,
            DeployOutcome::Succeeded
            | DeployOutcome::Unchanged
            | DeployOutcome::Unverified
            | DeployOutcome::Applied => RequestStatus::Succeeded,
            DeployOutcome::RolledBack => RequestStatus::RolledBack,
            // Someone else's change took its place: not running, and not judged.
            DeployOutcome::Superseded | DeployOutcome::ChangedOutside => RequestStatus::Superseded,
            DeployOutcome::Failed
            | DeployOutcome::TimedOut
            | DeployOutcome::RollbackFailed
            | DeployOutcome::Interrupted
            | DeployOutcome::Missing
            | DeployOutcome::Drift => RequestStatus::Failed,
            DeployOutcome::Rejected => RequestStatus::Rejected,
        }
    }
}

/// Where a request stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestView {
    pub id: String,
    pub service: String,
    pub namespace: String,
    pub status: RequestStatus,
    pub actor: String,
    pub created_at: String,
    /// The dependency file written for the request.
    pub file: String,
    pub deploy: Option<DeployRecord>,
}

async fn dep_path(state: &HttpState, key: &ServiceKey) -> std::path::PathBuf {
    state
        .store
        .service(key)
        .await
        .ok()
        .flatten()
        .map(|r| std::path::PathBuf::from(r.path))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| state.deps_dir.join(key.file_name()))
}

async fn request_view(state: &HttpState, r: &RequestRecord) -> Result<RequestView, ApiError> {
    let key = ServiceKey {
        name: r.name.clone(),
        namespace: r.namespace.clone(),
    };
    let path = dep_path(state, &key).await;
    let deploy = state.store.deploy_for_request(&r.id).await?;
    let status = match &deploy {
        Some(d) => RequestStatus::from(d.outcome),
        None => {
            // Another save replaced the file before this one was deployed: superseded.
            // Read like any dependency file: a FIFO or a huge file planted at the path cannot
            // stall this unauthenticated call.
            let still_there = crate::safefs::read_capped_async(
                state.deps_dir.clone(),
                path.clone(),
                state.max_file_size,
            )
            .await
            .map(|t| String::from_utf8_lossy(&t).contains(&r.id))
            .unwrap_or(false);
            if still_there {
                RequestStatus::Pending
            } else {
                RequestStatus::Superseded
            }
        }
    };
    Ok(RequestView {
        id: r.id.clone(),
        service: r.name.clone(),
        namespace: r.namespace.clone(),
        status,
        actor: r.actor.clone(),
        created_at: r.created_at.clone(),
        file: path.display().to_string(),
        deploy,
    })
}

fn parse_body(bytes: &[u8]) -> Result<DeployBody, ApiError> {
    let body: DeployBody = serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not valid JSON: {e}"))
            }
            Category::Data => {
                let msg = e.to_string();
                let field = msg.split('`').nth(1).map(String::from);
                ApiError { status: StatusCode::UNPROCESSABLE_ENTITY, message: format!("invalid deploy request: {msg}; expected {{\"service\", \"namespace\", \"version\" or \"image\"}}"), field }
            }
        }
    })?;
    let bad = |field: &str, m: String| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, field, m);
    ServiceKey::new(&body.service, "default").map_err(|m| bad("service", m))?;
    ServiceKey::new("x", &body.namespace).map_err(|m| bad("namespace", m))?;
    match (&body.version, &body.image) {
        (Some(v), None) => match depfile::classify(v) {
            Ok(ImageSpec::Tag(_)) | Ok(ImageSpec::Digest(_)) => {}
            Ok(ImageSpec::Reference(_)) => {
                let m = format!("{v:?} is a full image reference; send it as \"image\"");
                return Err(bad("version", m));
            }
            Err(m) => return Err(bad("version", m)),
        },
        (None, Some(i)) => {
            depfile::validate_reference(i).map_err(|m| bad("image", m))?;
            if i.chars().any(char::is_whitespace) {
                return Err(bad("image", "the image reference contains spaces".into()));
            }
        }
        _ => {
            let m =
                "give exactly one of \"version\" (a tag or digest) or \"image\" (a full reference)";
            return Err(bad("version", m.into()));
        }
    }
    Ok(body)
}

/// Ask for a deploy: the dependency file is written atomically and the request tracked. The
/// same `Idempotency-Key` with the same body returns the same request; with a different body it
/// is a 409.
#[utoipa::path(post, path = "/api/v1/deploys", tag = "deploys", request_body = DeployBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries of the same request safe")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "accepted; the file is written", body = RequestView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "no workload of that name: the closest named, nothing written", body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn create_deploy(
    State(state): Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<RequestView>), ApiError> {
    let actor = authorize(&state, &headers)?;
    not_a_standby(&state)?;
    // Checked before the body is read: a bad key costs the client, not the daemon.
    let idempotency_key = idempotency_key(&headers)?;
    let body = parse_body(&read_body(body).await?)?;
    let key = allowed_key(&state, &body)?;
    let body_hash = crate::domain::hex(&Sha256::digest(
        serde_json::to_vec(&body).unwrap_or_default(),
    ));
    let id = crate::domain::hex(&rand::rng().random::<[u8; 12]>());
    // Keys are scoped to the token: one holder's key never answers for another's request.
    let idempotency_key = match idempotency_key {
        Some(k) => format!("{actor}\n{k}"),
        None => format!("auto-{id}"),
    };

    let _guard = state.post_lock.lock().await;
    let value = body
        .version
        .clone()
        .or(body.image.clone())
        .unwrap_or_default();
    let asker = Asker::Request {
        id: id.clone(),
        actor: actor.clone(),
    };
    // An earlier request under this key: the same one again, or a conflicting reuse.
    if let Some(r) = state.store.request_by_key(&idempotency_key).await? {
        return replayed(&state, &r, &body_hash).await;
    }
    if let Err(closest) = state.live.exists(&key).await {
        return Err(no_such_workload(&key, closest));
    }
    let path = dep_path(&state, &key).await;
    let spec = match &body.version {
        Some(v) => depfile::classify(v).unwrap_or_else(|_| ImageSpec::Tag(v.clone())),
        None => ImageSpec::Reference(value.clone()),
    };
    let content = edited_file(&state, &key, &path, &value, &spec, &asker.header()).await?;
    let candidate = RequestRecord {
        id: id.clone(),
        idempotency_key: idempotency_key.clone(),
        body_hash: body_hash.clone(),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        content: content.clone(),
        actor: actor.clone(),
        created_at: store::now(),
    };
    write_file(&state, path, content).await?;
    let recorded = state.store.put_request(&candidate).await?;
    tracing::info!(service = %key, request = %id, %actor, "deploy requested through the API");
    Ok((
        StatusCode::ACCEPTED,
        Json(request_view(&state, &recorded).await?),
    ))
}

/// A request under an Idempotency-Key already used: the same answer for the same body,
/// 409 for another.
async fn replayed(
    state: &HttpState,
    earlier: &RequestRecord,
    body_hash: &str,
) -> Result<(StatusCode, Json<RequestView>), ApiError> {
    if earlier.body_hash != body_hash {
        return Err(ApiError::field(
            StatusCode::CONFLICT,
            "Idempotency-Key",
            "this Idempotency-Key was used for a different request",
        ));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(request_view(state, earlier).await?),
    ))
}

/// Write a dependency file atomically, off the async workers.
async fn write_file(
    state: &HttpState,
    path: std::path::PathBuf,
    content: String,
) -> Result<(), ApiError> {
    let root = state.deps_dir.clone();
    tokio::task::spawn_blocking(move || {
        crate::safefs::write_atomic(&root, &path, content.as_bytes())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    .map_err(write_error)
}

/// A deploy request's body, bounded in size and in the time it may take to arrive.
async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    tokio::time::timeout(
        crate::http::BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, BODY_LIMIT),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the body took longer than {} to arrive",
                crate::domain::human_duration(crate::http::BODY_READ_TIMEOUT)
            ),
        )
    })?
    .map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {BODY_LIMIT} bytes"),
        )
    })
}

/// The service a deploy request names, when its file name can be written and the daemon's
/// bounds allow its namespace and image.
fn allowed_key(state: &HttpState, body: &DeployBody) -> Result<ServiceKey, ApiError> {
    let key = ServiceKey::new(&body.service, &body.namespace)
        .map_err(|m| ApiError::field(StatusCode::UNPROCESSABLE_ENTITY, "service", m))?;
    let file = key.file_name();
    if file.len() > crate::safefs::MAX_WRITABLE_NAME {
        return Err(ApiError::field(
            StatusCode::UNPROCESSABLE_ENTITY,
            "service",
            format!(
                "the service and namespace are too long together for a dependency file name: {} bytes, at most {} (shorten the Deployment's name)",
                file.len(),
                crate::safefs::MAX_WRITABLE_NAME
            ),
        ));
    }
    state
        .bounds
        .check_namespace(&key.namespace)
        .map_err(|e| ApiError::field(StatusCode::FORBIDDEN, "namespace", e.to_string()))?;
    if let Some(image) = &body.image {
        state
            .bounds
            .check_image(image)
            .map_err(|e| ApiError::field(StatusCode::FORBIDDEN, "image", e.to_string()))?;
    }
    Ok(key)
}

/// 404 for a deploy to a workload the cluster does not have, naming the closest one.
fn no_such_workload(key: &ServiceKey, closest: Option<String>) -> ApiError {
    let hint = closest.map_or(String::new(), |c| format!("; did you mean {c}?"));
    ApiError::field(
        StatusCode::NOT_FOUND,
        "service",
        format!(
            "no Deployment, StatefulSet, DaemonSet or CronJob named {} in namespace {}{hint}; nothing was written",
            key.name, key.namespace
        ),
    )
}

/// What an API deploy writes: the service's file edited in its own form (only the main
/// container's value changes; other containers, settings and comments stay), or, for a new
/// or plain file, the header and the value.
async fn edited_file(
    state: &HttpState,
    key: &ServiceKey,
    path: &std::path::Path,
    value: &str,
    spec: &ImageSpec,
    header: &str,
) -> Result<String, ApiError> {
    let fresh = format!("{header}{value}\n");
    let (root, file, cap) = (
        state.deps_dir.clone(),
        path.to_path_buf(),
        state.max_file_size,
    );
    let read = tokio::task::spawn_blocking(move || crate::safefs::read_capped(&root, &file, cap))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let Ok(bytes) = read else {
        // No file yet (or one that cannot be read, which the write replaces).
        return Ok(fresh);
    };
    let shown = crate::safefs::shown(path);
    let conflict = |message: String| ApiError::new(StatusCode::CONFLICT, message);
    let text = String::from_utf8(bytes)
        .map_err(|_| conflict(format!("{shown}: not UTF-8 text; edit it by hand")))?;
    // A file that does not parse is replaced, as a save would replace it.
    if depfile::parse(&shown, text.as_bytes()).is_err() {
        return Ok(fresh);
    }
    if let Some(edited) = crate::depedit::set_plain(&text, value, header) {
        return Ok(edited);
    }
    let record = state.store.service(key).await.ok().flatten();
    let kind = record.as_ref().map(|r| r.kind).unwrap_or_default();
    let recorded = record.map(|r| r.desired).filter(|d| !d.is_empty());
    let current = recorded
        .or_else(|| state.live.of(key, kind))
        .unwrap_or_default();
    if current.is_empty() {
        if depfile::plain_line(&text).is_some() {
            return Ok(fresh);
        }
        return Err(conflict(format!(
            "{shown}: depwatch does not know yet which containers this file sets (its workload is not watched); edit it by hand"
        )));
    }
    crate::depedit::set_main(&shown, &text, key, &current, spec, header)
        .map_err(|e| conflict(e.to_string()))
}

/// The `Idempotency-Key` header, if any: printable ASCII, at most 200 characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let bad = |m: &str| ApiError::field(StatusCode::BAD_REQUEST, "Idempotency-Key", m);
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = std::str::from_utf8(v.as_bytes())
        .ok()
        .filter(|k| k.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .ok_or_else(|| bad("the Idempotency-Key header must be printable ASCII"))?
        .trim();
    if k.is_empty() {
        return Err(bad("the Idempotency-Key header is empty"));
    }
    if k.len() > 200 {
        return Err(bad(
            "the Idempotency-Key header is longer than 200 characters",
        ));
    }
    Ok(Some(k.to_string()))
}

/// A file the API could not write: a read-only source (a ConfigMap volume, a read-only mount)
/// is a conflict with a hint, not a server fault.
fn write_error(e: crate::safefs::WriteError) -> ApiError {
    if e.is_read_only() {
        ApiError::new(
            StatusCode::CONFLICT,
            format!("{e}; the dependency directory is read-only here (a ConfigMap volume or read-only mount?): change the files at their source, such as the ConfigMap or the git repository"),
        )
    } else {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

/// Where a deploy request stands.
#[utoipa::path(get, path = "/api/v1/requests/{id}", tag = "deploys", params(("id" = String, Path)),
    responses((status = 200, body = RequestView), (status = 404, body = ErrorBody)))]
pub async fn get_request(
    State(state): Shared,
    Path(id): Path<String>,
) -> Result<Json<RequestView>, ApiError> {
    let r = state.store.request(&id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no deploy request {}", crate::safefs::escape(&id)),
        )
    })?;
    Ok(Json(request_view(&state, &r).await?))
}

/// The outcome of an operator call.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub message: String,
}

fn operator_error(e: operator::OperatorError) -> ApiError {
    match e {
        operator::OperatorError::Unknown(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        operator::OperatorError::Refused(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        operator::OperatorError::Write(w) => write_error(w),
        other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

/// An operator command the API runs for a token's owner.
enum Command {
    Retry,
    Rollback(Option<i64>),
    Promote,
    DeployNow(String),
    Vote(crate::domain::VoteKind, String),
    Suspend(bool),
    Forget,
}

/// Run an operator command for the token's owner.
async fn operator_call(
    state: &HttpState,
    headers: &HeaderMap,
    (namespace, name): (String, String),
    what: &str,
    command: Command,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let actor = authorize(state, headers)?;
    not_a_standby(state)?;
    let key = key_from_path(&namespace, &name)?;
    let caller = operator::Caller {
        actor: &actor,
        root: Some(&state.deps_dir),
    };
    let store = &state.store;
    let message = match command {
        Command::Retry => operator::retry(store, &key, caller).await,
        Command::Rollback(to) => operator::rollback(store, &key, to, caller).await,
        Command::Promote => operator::promote(store, &key, caller).await,
        Command::DeployNow(reason) => operator::deploy_now(store, &key, &reason, caller).await,
        Command::Vote(kind, comment) => operator::vote(store, &key, kind, &comment, caller).await,
        Command::Suspend(on) => operator::suspend(store, &key, on, caller).await,
        Command::Forget => operator::forget(store, &key, caller).await,
    }
    .map_err(operator_error)?;
    tracing::info!(service = %key, %actor, "{what} requested through the API");
    Ok((StatusCode::ACCEPTED, Json(Accepted { message })))
}

/// Deploy a failed or pinned version again (`depwatch retry`). 409 when nothing failed.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/retry", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "nothing to retry", body = ErrorBody)))]
pub async fn retry_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(&state, &headers, service, "retry", Command::Retry).await
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct RollbackQuery {
    /// Restore the images of this deploy (an id from the history) instead of the previous
    /// healthy deploy's.
    pub to: Option<i64>,
}

/// Undo (`depwatch rollback`): write the previous healthy deploy's images (or deploy `to`'s)
/// into the service's file, changing only the containers that differ. 409 when nothing would
/// change or there is nothing to go back to.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/rollback", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path), RollbackQuery), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn rollback_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
    Query(q): Query<RollbackQuery>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(
        &state,
        &headers,
        service,
        "rollback",
        Command::Rollback(q.to),
    )
    .await
}

/// Cut the bake of the version verifying now short (`depwatch promote`): it becomes last good
/// without the time left, recorded with the token's name. 409 unless a version is verifying.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/promote", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "nothing verifying", body = ErrorBody)))]
pub async fn promote_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(&state, &headers, service, "promote", Command::Promote).await
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct DeployNowQuery {
    /// Why the window or freeze is passed; recorded with the token's name.
    pub reason: String,
}

/// Break-glass (`depwatch deploy --now`): deploy the save a deploy window or a FREEZE holds,
/// now, recorded with the token's name and the reason. 409 unless a save is held.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/deploy-now", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path), DeployNowQuery), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "nothing held", body = ErrorBody)))]
pub async fn deploy_now_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
    Query(q): Query<DeployNowQuery>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(
        &state,
        &headers,
        service,
        "deploy-now",
        Command::DeployNow(q.reason),
    )
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct VoteQuery {
    /// Why, recorded with the word and the token's name.
    #[serde(default)]
    pub comment: String,
}

/// Approve the save awaiting approval (`depwatch approve`), as the token's name: it deploys
/// once enough distinct approvers have. 409 when nothing awaits approval, when the token
/// asked for the save itself, or when it already approved.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/approve", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path), VoteQuery), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "nothing to approve, or the requester's own save", body = ErrorBody)))]
pub async fn approve_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
    Query(q): Query<VoteQuery>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let command = Command::Vote(crate::domain::VoteKind::Approve, q.comment);
    operator_call(&state, &headers, service, "approve", command).await
}

/// Reject the save awaiting approval (`depwatch reject`), as the token's name: nothing of it
/// deploys, with one history row. 409 when nothing awaits approval.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/reject", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path), VoteQuery), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, description = "nothing to reject", body = ErrorBody)))]
pub async fn reject_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
    Query(q): Query<VoteQuery>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let command = Command::Vote(crate::domain::VoteKind::Reject, q.comment);
    operator_call(&state, &headers, service, "reject", command).await
}

/// Stop deploying the service's file changes (`depwatch suspend`). 409 when already suspended.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/suspend", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn suspend_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(&state, &headers, service, "suspend", Command::Suspend(true)).await
}

/// Deploy a suspended service's file changes again (`depwatch resume`). 409 when not
/// suspended.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/resume", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn resume_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(&state, &headers, service, "resume", Command::Suspend(false)).await
}

/// Remove a service whose file is gone from the record, its history kept (`depwatch forget`).
/// 409 while its file exists.
#[utoipa::path(post, path = "/api/v1/services/{namespace}/{name}/forget", tag = "services",
    params(("namespace" = String, Path), ("name" = String, Path)), security(("bearer" = [])),
    responses((status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn forget_service(
    State(state): Shared,
    headers: HeaderMap,
    Path(service): Path<(String, String)>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    operator_call(&state, &headers, service, "forget", Command::Forget).await
}

/// Server-sent events: a `change` event whenever the record changes. At most
/// [`crate::http::MAX_EVENT_STREAMS`] at once.
#[utoipa::path(get, path = "/api/v1/events", tag = "services", responses(
    (status = 200, description = "text/event-stream of `change` events", content_type = "text/event-stream"),
    (status = 503, description = "too many event streams are open", body = ErrorBody)))]
pub async fn events(
    State(state): Shared,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let permit = state
        .event_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many event streams are open (at most {}); poll /api/v1/services instead",
                    crate::http::MAX_EVENT_STREAMS
                ),
            )
        })?;
    let rx = state.store.subscribe();
    let stream = tokio_stream::wrappers::WatchStream::new(rx)
        .map(move |n| {
            // The permit lives as long as the stream.
            let _ = &permit;
            Ok(Event::default().event("change").data(n.to_string()))
        })
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "health", responses((status = 200, description = "the OpenAPI document")))]
pub async fn openapi_json(
    axum::Extension(doc): axum::Extension<Arc<utoipa::openapi::OpenApi>>,
) -> impl IntoResponse {
    Json(doc.as_ref().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_from_1_to_1000_long_and_100_by_default() {
        for (asked, want) in [
            (None, Some(100)),
            (Some(1), Some(1)),
            (Some(1000), Some(1000)),
            (Some(0), None),
            (Some(1001), None),
        ] {
            assert_eq!(page_limit(asked).ok(), want, "{asked:?}");
        }
    }

    #[test]
    fn the_next_link_carries_the_query_and_the_last_key() {
        for (query, after, want) in [
            (
                vec![("limit", "2")],
                Some("prod/web"),
                Some("</api/v1/services?limit=2&after=prod%2Fweb>; rel=\"next\""),
            ),
            (
                vec![("limit", "5"), ("status", "failed")],
                Some("a/b"),
                Some("</api/v1/services?limit=5&status=failed&after=a%2Fb>; rel=\"next\""),
            ),
            (
                vec![("limit", "1")],
                Some("/deps/a&b c.dep"),
                Some("</api/v1/services?limit=1&after=%2Fdeps%2Fa%26b+c.dep>; rel=\"next\""),
            ),
            (vec![("limit", "2")], None, None),
        ] {
            assert_eq!(
                next_link("/api/v1/services", &query, after).as_deref(),
                want,
                "{query:?} {after:?}"
            );
        }
    }
}
