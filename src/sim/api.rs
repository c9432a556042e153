//! The HTTP face of the simulated cluster: URL routing, the verbs (get, list, watch, create,
//! update, patch, delete, each also as a dry run), admission (defaults and validation), fault
//! injection and the audit log.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::apply::{apply, track_update};
use super::discovery;
use super::dryrun::{self, Commit};
use super::meta;
use super::patch;
use super::protobuf;
use super::resources::{self, ResourceType};
use super::selector::Selector;
use super::store::{ApiError, ObjKey, Store, StoredEvent, WatchStart};
use super::table;
use super::workloads;

/// Faults injected into requests, adjustable while the server runs.
#[derive(Debug, Default)]
pub struct Faults {
    latency_ms: AtomicU64,
    error_rate: AtomicU64,
    conflict_rate: AtomicU64,
    watch_timeout_secs: AtomicU64,
    watch_delay_ms: AtomicU64,
}

impl Faults {
    /// Hold every watch event this long before sending it (events queue behind each other):
    /// a client whose view of the cluster lags ever further behind.
    pub fn set_watch_delay(&self, d: Duration) {
        self.watch_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
    fn watch_delay(&self) -> Duration {
        Duration::from_millis(self.watch_delay_ms.load(Ordering::Relaxed))
    }
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
    /// Fraction of requests (0.0–1.0) answered with HTTP 500.
    pub fn set_error_rate(&self, p: f64) {
        self.error_rate.store(p.to_bits(), Ordering::Relaxed);
    }
    /// Fraction of writes answered with HTTP 409 Conflict.
    pub fn set_conflict_rate(&self, p: f64) {
        self.conflict_rate.store(p.to_bits(), Ordering::Relaxed);
    }
    /// End every watch after this long (zero: only the client's `timeoutSeconds`).
    pub fn set_watch_timeout(&self, d: Duration) {
        self.watch_timeout_secs
            .store(d.as_secs(), Ordering::Relaxed);
    }
    fn error_rate(&self) -> f64 {
        f64::from_bits(self.error_rate.load(Ordering::Relaxed))
    }
    fn conflict_rate(&self) -> f64 {
        f64::from_bits(self.conflict_rate.load(Ordering::Relaxed))
    }
}

/// Everything a request handler needs.
pub struct ApiState {
    pub store: Arc<Store>,
    pub faults: Arc<Faults>,
    pub audit: Option<Arc<Mutex<std::fs::File>>>,
    pub server_addr: String,
    /// Cancelled when this server instance stops: open watches end.
    pub shutdown: CancellationToken,
}

type Params = HashMap<String, String>;

fn json_response(code: u16, body: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

fn is_write(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// The one entry point: faults, routing, audit.
pub async fn handle(
    State(state): State<Arc<ApiState>>,
    method: Method,
    uri: Uri,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = state.faults.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let (error_roll, conflict_roll): (f64, f64) = {
        let mut rng = rand::rng();
        (rng.random(), rng.random())
    };
    let commit = dryrun::decide(&method, uri.query(), &body);
    let response = if error_roll < state.faults.error_rate() {
        error_response(&ApiError::new(
            500,
            "InternalError",
            "Internal error occurred: injected by the simulated cluster (--error-rate)",
        ))
    } else if is_write(&method) && conflict_roll < state.faults.conflict_rate() {
        error_response(&ApiError::new(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again (injected by --conflict-rate)",
        ))
    } else {
        match &commit {
            Ok(commit) => route(
                &state,
                &method,
                uri.path(),
                &params,
                &headers,
                &body,
                *commit,
            )
            .await
            .unwrap_or_else(|e| error_response(&e)),
            Err(e) => error_response(e),
        }
    };
    if let Some(audit) = &state.audit {
        let line = json!({
            "time": jiff::Timestamp::now().to_string(),
            "method": method.as_str(),
            "verb": verb(&method, &params),
            "path": uri.path(),
            "query": uri.query().unwrap_or_default(),
            "contentType": headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default(),
            "userAgent": headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or_default(),
            "code": response.status().as_u16(),
            // A dry run changed nothing: counting writes from this log must leave it out.
            "dryRun": commit.is_ok_and(Commit::is_dry_run),
        });
        if let Ok(mut f) = audit.lock() {
            // The audit log is best effort: a full disk must not fail API requests.
            let _ = writeln!(f, "{line}");
        }
    }
    response
}

fn verb(method: &Method, params: &Params) -> &'static str {
    match *method {
        Method::GET if params.get("watch").is_some_and(|w| w == "true" || w == "1") => "watch",
        Method::GET => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "other",
    }
}

/// A request aimed at a resource.
struct Target {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    /// Whether a write is stored or only answered ([`dryrun::decide`]).
    commit: Commit,
}

async fn route(
    state: &Arc<ApiState>,
    method: &Method,
    path: &str,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
    commit: Commit,
) -> Result<Response, ApiError> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let not_found = || {
        ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    };
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["version"] => return Ok(json_response(200, &discovery::version())),
        ["healthz"] | ["readyz"] | ["livez"] => return Ok("ok".into_response()),
        ["sim", "metrics"] => {
            let body = super::services::metrics(&state.store);
            return Ok(
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response(),
            );
        }
        ["api", "v1", "namespaces", ns, "services", service, "proxy", rest @ ..] => {
            if *method != Method::GET {
                return Err(ApiError::new(
                    405,
                    "MethodNotAllowed",
                    "the simulated pods answer GET only",
                ));
            }
            let path = format!("/{}", rest.join("/"));
            let a = super::services::proxy(&state.store, ns, service, &path)?;
            let status = StatusCode::from_u16(a.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Ok((status, [(header::CONTENT_TYPE, a.content_type)], a.body).into_response());
        }
        ["api"] => {
            return Ok(json_response(
                200,
                &discovery::core_versions(&state.server_addr),
            ))
        }
        ["apis"] => return Ok(json_response(200, &discovery::groups())),
        ["apis", g] => {
            return discovery::group(g)
                .map(|v| json_response(200, &v))
                .ok_or_else(not_found)
        }
        ["openapi", "v3"] => return Ok(json_response(200, &discovery::openapi_index())),
        ["openapi", "v3", rest @ ..] => {
            return discovery::openapi_group(&rest.join("/"))
                .map(|v| json_response(200, &v))
                .ok_or_else(not_found)
        }
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(not_found()),
    };
    if rest.is_empty() {
        return discovery::resource_list(group, version)
            .map(|v| json_response(200, &v))
            .ok_or_else(not_found);
    }
    let target = match rest {
        ["namespaces", ns, plural, tail @ ..] if !matches!(*plural, "status" | "finalize") => {
            let rt = resources::lookup(group, version, plural).ok_or_else(not_found)?;
            if !rt.namespaced {
                return Err(not_found());
            }
            Target {
                rt,
                namespace: Some(ns.to_string()),
                name: tail.first().map(|s| s.to_string()),
                sub: tail.get(1).map(|s| s.to_string()),
                commit,
            }
        }
        [plural, tail @ ..] => {
            let rt = resources::lookup(group, version, plural).ok_or_else(not_found)?;
            if rt.namespaced && !tail.is_empty() {
                return Err(not_found());
            }
            Target {
                rt,
                namespace: None,
                name: tail.first().map(|s| s.to_string()),
                sub: tail.get(1).map(|s| s.to_string()),
                commit,
            }
        }
        [] => return Err(not_found()),
    };
    if let Some(sub) = &target.sub {
        let status = sub == "status" && target.rt.status_subresource;
        let scale = sub == "scale" && resources::has_scale(target.rt);
        if !status && !scale {
            return Err(not_found());
        }
        if scale {
            return scale_subresource(state, &target, method, body, headers, params);
        }
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown");
    let manager = params.get("fieldManager").cloned().unwrap_or_else(|| {
        user_agent
            .split('/')
            .next()
            .unwrap_or("unknown")
            .to_string()
    });
    let store = &state.store;
    match (method, &target.name) {
        (&Method::GET, None) => {
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                watch(state, &target, params)
            } else {
                list(store, &target, params, accept)
            }
        }
        (&Method::GET, Some(name)) => {
            let key = ObjKey::new(
                target.rt,
                target.namespace.as_deref().unwrap_or_default(),
                name,
            );
            let obj = store
                .get(&key)
                .ok_or_else(|| ApiError::not_found(target.rt, name))?;
            if table::wants_table(accept) {
                let include = params
                    .get("includeObject")
                    .map(String::as_str)
                    .unwrap_or("Metadata");
                return Ok(json_response(
                    200,
                    &table::render(
                        target.rt,
                        std::slice::from_ref(obj.as_ref()),
                        json!({"resourceVersion": store.current_rv().to_string()}),
                        include,
                    ),
                ));
            }
            Ok(json_response(200, &obj))
        }
        (&Method::POST, None) if target.rt.kind == "SelfSubjectAccessReview" => {
            let mut review = decode_body(body, content_type)?;
            let asked = super::rbac::Attributes::from_review(&review);
            let (allowed, reason) = super::rbac::review(store, &asked);
            review["status"] = json!({"allowed": allowed, "reason": reason});
            review["apiVersion"] = json!("authorization.k8s.io/v1");
            review["kind"] = json!("SelfSubjectAccessReview");
            Ok(json_response(201, &review))
        }
        (&Method::POST, None) => {
            let obj = decode_body(body, content_type)?;
            create(store, &target, obj, &manager).map(|o| json_response(201, &o))
        }
        (&Method::PUT, Some(name)) => {
            let obj = decode_body(body, content_type)?;
            update(store, &target, name, obj, &manager).map(|o| json_response(200, &o))
        }
        (&Method::PATCH, Some(name)) => {
            patch_object(store, &target, name, body, content_type, params, &manager)
                .map(|(code, o)| json_response(code, &o))
        }
        (&Method::DELETE, Some(name)) => {
            delete(store, &target, name).map(|o| json_response(200, &o))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({method} {path})"
            ),
        )),
    }
}

fn decode_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    if content_type.starts_with("application/vnd.kubernetes.protobuf") {
        return protobuf::decode(body).map_err(|e| ApiError::new(415, "UnsupportedMediaType", e));
    }
    if content_type.contains("yaml") {
        return serde_saphyr::from_slice::<Value>(body).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid YAML: {e}"))
        });
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn selectors(params: &Params) -> Result<(Selector, Selector), ApiError> {
    let labels = Selector::parse(
        params
            .get("labelSelector")
            .map(String::as_str)
            .unwrap_or(""),
    )?;
    let fields = Selector::parse(
        params
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or(""),
    )?;
    Ok((labels, fields))
}

fn list(
    store: &Store,
    target: &Target,
    params: &Params,
    accept: &str,
) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let resource = target.rt.qualified();
    // Paged like the API server: `limit`, and a `continue` token naming the last key served.
    let limit = params
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let after = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => Some(continue_key(token, &resource)?),
        None => None,
    };
    let (page, current_rv, more) = store.list_page(
        &resource,
        target.namespace.as_deref(),
        after.as_ref().map(|(k, _)| k),
        limit,
        |o| labels.matches_labels(o) && fields.matches_fields(o),
    );
    // Every page of one list reports the revision of its first page.
    let rv = after.as_ref().map(|(_, rv)| *rv).unwrap_or(current_rv);
    let next = match (more, page.last()) {
        (true, Some((k, _))) => continue_token(k, rv),
        _ => String::new(),
    };
    let mut items: Vec<Value> = page.into_iter().map(|(_, v)| v).collect();
    if resource == "events" && next.is_empty() {
        // One store behind both Event APIs, as on a real cluster: `kubectl describe` reads
        // core/v1, recorders write events.k8s.io/v1.
        let (newer, _) = store.list("events.events.k8s.io", target.namespace.as_deref());
        items.extend(
            newer
                .iter()
                .map(core_event)
                .filter(|o| labels.matches_labels(o) && fields.matches_fields(o)),
        );
    }
    let metadata = if next.is_empty() {
        json!({"resourceVersion": rv.to_string()})
    } else {
        json!({"resourceVersion": rv.to_string(), "continue": next})
    };
    if table::wants_table(accept) {
        let include = params
            .get("includeObject")
            .map(String::as_str)
            .unwrap_or("Metadata");
        return Ok(json_response(
            200,
            &table::render(target.rt, &items, metadata, include),
        ));
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", target.rt.kind),
            "apiVersion": target.rt.api_version(),
            "metadata": metadata,
            "items": items,
        }),
    ))
}

/// An events.k8s.io/v1 Event as core/v1 shows it (the API server's own field mapping).
fn core_event(e: &Value) -> Value {
    let series = &e["series"];
    let count = series["count"]
        .as_i64()
        .or_else(|| e["deprecatedCount"].as_i64())
        .unwrap_or(1);
    let last = series["lastObservedTime"]
        .as_str()
        .or_else(|| e["deprecatedLastTimestamp"].as_str())
        .or_else(|| e["eventTime"].as_str());
    let first = e["deprecatedFirstTimestamp"]
        .as_str()
        .or_else(|| e["eventTime"].as_str());
    let second = |t: Option<&str>| {
        t.map(|t| {
            Value::String(format!(
                "{}Z",
                t.trim_end_matches('Z').split('.').next().unwrap_or(t)
            ))
        })
        .unwrap_or(Value::Null)
    };
    json!({
        "kind": "Event",
        "apiVersion": "v1",
        "metadata": e["metadata"],
        "involvedObject": e["regarding"],
        "related": e["related"],
        "reason": e["reason"],
        "message": e["note"],
        "type": e["type"],
        "action": e["action"],
        "source": {"component": e["reportingController"]},
        "reportingComponent": e["reportingController"],
        "reportingInstance": e["reportingInstance"],
        "eventTime": e["eventTime"],
        "firstTimestamp": second(first),
        "lastTimestamp": second(last),
        "count": count,
    })
}

/// A `continue` token: the revision of the list and the last key served, opaque to clients.
fn continue_token(key: &ObjKey, rv: u64) -> String {
    use base64::Engine;
    let text = json!({"rv": rv, "ns": key.namespace, "name": key.name}).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn continue_key(token: &str, resource: &str) -> Result<(ObjKey, u64), ApiError> {
    use base64::Engine;
    let bad = || ApiError::bad_request("the continue token is not valid");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let key = ObjKey {
        resource: resource.to_string(),
        namespace: v["ns"].as_str().ok_or_else(bad)?.to_string(),
        name: v["name"].as_str().ok_or_else(bad)?.to_string(),
    };
    Ok((key, v["rv"].as_u64().ok_or_else(bad)?))
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn expired_line(rv: &str) -> Bytes {
    let status =
        ApiError::new(410, "Expired", format!("too old resource version: {rv}")).to_status();
    watch_line("ERROR", &status)
}

fn watch(state: &Arc<ApiState>, target: &Target, params: &Params) -> Result<Response, ApiError> {
    let (labels, fields) = selectors(params)?;
    let rt = target.rt;
    let resource = rt.qualified();
    let namespace = target.namespace.clone();
    let requested_rv = params.get("resourceVersion").cloned().unwrap_or_default();
    let initial_events = params.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let mut timeout = params
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let forced = state.faults.watch_timeout_secs.load(Ordering::Relaxed);
    if forced > 0 {
        let f = Duration::from_secs(forced);
        timeout = Some(timeout.map_or(f, |t| t.min(f)));
    }
    let matches = move |ev: &StoredEvent| {
        ev.key.resource == resource
            && namespace.as_deref().is_none_or(|ns| ev.key.namespace == ns)
            && labels.matches_labels(&ev.object)
            && fields.matches_fields(&ev.object)
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let bookmark = move |rv: u64, end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        watch_line(
            "BOOKMARK",
            &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
        )
    };

    let mut first: Vec<Bytes> = Vec::new();
    let (mut last_rv, mut live) =
        if initial_events || requested_rv.is_empty() || requested_rv == "0" {
            let (items, rv, live) = state
                .store
                .list_and_watch(&rt.qualified(), target.namespace.as_deref());
            for obj in items {
                let probe = StoredEvent {
                    rv,
                    kind: super::store::EventType::Added,
                    key: ObjKey::new(rt, meta::namespace(&obj), meta::name(&obj)),
                    object: Arc::new(obj),
                };
                if matches(&probe) {
                    first.push(watch_line("ADDED", &probe.object));
                }
            }
            if initial_events {
                first.push(bookmark(rv, true));
            }
            (rv, live)
        } else {
            let from: u64 = requested_rv.parse().map_err(|_| {
                ApiError::bad_request(format!("invalid resourceVersion {requested_rv:?}"))
            })?;
            match state.store.watch_from(from) {
                WatchStart::Expired => {
                    let body = Body::from(expired_line(&requested_rv));
                    return Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response());
                }
                WatchStart::Replay(events, live) => {
                    let mut last = from;
                    for ev in events {
                        last = ev.rv;
                        if matches(&ev) {
                            first.push(watch_line(ev.kind.as_str(), &ev.object));
                        }
                    }
                    (last, live)
                }
            }
        };

    let shutdown = state.shutdown.clone();
    let store = state.store.clone();
    let faults = state.faults.clone();
    let mut compactions = store.compactions();
    tokio::spawn(async move {
        for line in first {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        loop {
            let sleep_until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let line = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sleep_until => return,
                _ = compactions.changed() => {
                    let _ = tx.send(Ok(expired_line(&last_rv.to_string()))).await;
                    return;
                }
                _ = ticker.tick(), if bookmarks => {
                    // Everything up to the store's revision has been sent or filtered out only
                    // once the receiver is drained; the bookmark waits for that.
                    // Read the revision first: every event at or below it is already in the
                    // channel, so an empty channel means all of them were handled.
                    let current = store.current_rv();
                    if !live.is_empty() {
                        continue;
                    }
                    last_rv = last_rv.max(current);
                    bookmark(last_rv, false)
                }
                ev = live.recv() => match ev {
                    Ok(ev) => {
                        if ev.rv <= last_rv {
                            continue;
                        }
                        last_rv = ev.rv;
                        if !matches(&ev) {
                            continue;
                        }
                        let delay = faults.watch_delay();
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        watch_line(ev.kind.as_str(), &ev.object)
                    }
                    Err(RecvError::Lagged(_)) => {
                        // A slow reader fell behind the live channel: catch up from the event
                        // history, as the API server's watch cache does; 410 only when even the
                        // history no longer reaches back.
                        match store.watch_from(last_rv) {
                            WatchStart::Replay(missed, rx) => {
                                live = rx;
                                for ev in missed {
                                    if ev.rv <= last_rv {
                                        continue;
                                    }
                                    last_rv = ev.rv;
                                    if matches(&ev)
                                        && tx.send(Ok(watch_line(ev.kind.as_str(), &ev.object))).await.is_err()
                                    {
                                        return;
                                    }
                                }
                                continue;
                            }
                            WatchStart::Expired => {
                                let _ = tx.send(Ok(expired_line(&last_rv.to_string()))).await;
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Drop `null` fields, as decoding into the API's typed structs does (kubectl sends
/// `creationTimestamp: null` inside pod templates).
fn prune_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(prune_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(prune_nulls),
        _ => {}
    }
}

/// Fill in what the API server's defaulting (and, for a DaemonSet's template generation, its
/// registry strategy) would; `old` is the stored object an update replaces.
fn apply_defaults(rt: &ResourceType, obj: &mut Value, old: Option<&Value>) {
    prune_nulls(obj);
    match (rt.group, rt.plural) {
        ("apps", "statefulsets") => statefulset_defaults(&mut obj["spec"]),
        ("apps", "daemonsets") => {
            daemonset_defaults(&mut obj["spec"]);
            // The template generation moves with the template (`spec.templateGeneration`,
            // kept in this annotation in apps/v1).
            let stored = old.map(|o| {
                let g = o["metadata"]["annotations"][workloads::TEMPLATE_GENERATION]
                    .as_str()
                    .and_then(|g| g.parse::<i64>().ok())
                    .unwrap_or(1);
                g + i64::from(o["spec"]["template"] != obj["spec"]["template"])
            });
            obj["metadata"]["annotations"][workloads::TEMPLATE_GENERATION] =
                json!(stored.unwrap_or(1).to_string());
        }
        ("apps", "deployments") => {
            let spec = &mut obj["spec"];
            if spec["replicas"].is_null() {
                spec["replicas"] = json!(1);
            }
            if spec["strategy"].is_null() {
                spec["strategy"] = json!({"type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}});
            }
            if spec["revisionHistoryLimit"].is_null() {
                spec["revisionHistoryLimit"] = json!(10);
            }
            if spec["progressDeadlineSeconds"].is_null() {
                spec["progressDeadlineSeconds"] = json!(600);
            }
            pod_spec_defaults(&mut spec["template"]["spec"]);
        }
        ("", "pods") => pod_spec_defaults(&mut obj["spec"]),
        ("", "namespaces") => {
            if obj["spec"]["finalizers"].is_null() {
                obj["spec"] = json!({"finalizers": ["kubernetes"]});
            }
            if obj["status"]["phase"].is_null() {
                obj["status"] = json!({"phase": "Active"});
            }
            let name = meta::name(obj).to_string();
            obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = json!(name);
        }
        _ => {}
    }
}

/// SetDefaults_StatefulSet: OrderedReady, RollingUpdate with partition 0 (only when the
/// strategy type was left out or `rollingUpdate` given), 1 replica, 10 revisions, claims retained.
fn statefulset_defaults(spec: &mut Value) {
    if spec["podManagementPolicy"].is_null() {
        spec["podManagementPolicy"] = json!("OrderedReady");
    }
    let strategy = &mut spec["updateStrategy"];
    if strategy["type"].is_null() {
        strategy["type"] = json!("RollingUpdate");
        if strategy["rollingUpdate"].is_null() {
            strategy["rollingUpdate"] = json!({});
        }
    }
    if strategy["type"] == "RollingUpdate"
        && strategy["rollingUpdate"].is_object()
        && strategy["rollingUpdate"]["partition"].is_null()
    {
        strategy["rollingUpdate"]["partition"] = json!(0);
    }
    for (k, v) in [("replicas", json!(1)), ("revisionHistoryLimit", json!(10))] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    let retention = &mut spec["persistentVolumeClaimRetentionPolicy"];
    for k in ["whenDeleted", "whenScaled"] {
        if retention[k].is_null() {
            retention[k] = json!("Retain");
        }
    }
    pod_spec_defaults(&mut spec["template"]["spec"]);
}

/// SetDefaults_DaemonSet: RollingUpdate with maxUnavailable 1 and maxSurge 0, 10 revisions.
fn daemonset_defaults(spec: &mut Value) {
    let strategy = &mut spec["updateStrategy"];
    if strategy["type"].is_null() {
        strategy["type"] = json!("RollingUpdate");
    }
    if strategy["type"] == "RollingUpdate" {
        let ru = &mut strategy["rollingUpdate"];
        if ru["maxUnavailable"].is_null() {
            ru["maxUnavailable"] = json!(1);
        }
        if ru["maxSurge"].is_null() {
            ru["maxSurge"] = json!(0);
        }
    }
    if spec["revisionHistoryLimit"].is_null() {
        spec["revisionHistoryLimit"] = json!(10);
    }
    pod_spec_defaults(&mut spec["template"]["spec"]);
}

fn pod_spec_defaults(spec: &mut Value) {
    if !spec.is_object() {
        return;
    }
    for (k, v) in [
        ("restartPolicy", json!("Always")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("dnsPolicy", json!("ClusterFirst")),
        ("securityContext", json!({})),
        ("schedulerName", json!("default-scheduler")),
    ] {
        if spec[k].is_null() {
            spec[k] = v;
        }
    }
    if let Some(cs) = spec["containers"].as_array_mut() {
        for c in cs {
            if c["terminationMessagePath"].is_null() {
                c["terminationMessagePath"] = json!("/dev/termination-log");
            }
            if c["terminationMessagePolicy"].is_null() {
                c["terminationMessagePolicy"] = json!("File");
            }
            if c["imagePullPolicy"].is_null() {
                let image = c["image"].as_str().unwrap_or_default();
                let latest = !image.contains('@')
                    && (image.ends_with(":latest")
                        || !image.rsplit('/').next().unwrap_or("").contains(':'));
                c["imagePullPolicy"] = json!(if latest { "Always" } else { "IfNotPresent" });
            }
            if c["resources"].is_null() {
                c["resources"] = json!({});
            }
        }
    }
}

/// Validation as the API server does it for the fields depwatch and kubectl touch.
fn validate(rt: &ResourceType, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
    let name = meta::name(obj);
    let mut causes = Vec::new();
    let name_ok = if rt.plural == "namespaces" {
        meta::valid_label(name)
    } else {
        meta::valid_subdomain(name)
    };
    if !name_ok {
        causes.push((
            "metadata.name".to_string(),
            format!("Invalid value: \"{name}\": a lowercase RFC 1123 {} must consist of lower case alphanumeric characters or '-'", if rt.plural == "namespaces" { "label" } else { "subdomain" }),
        ));
    }
    let pod_spec = match (rt.group, rt.plural) {
        ("apps", "deployments")
        | ("apps", "replicasets")
        | ("apps", "statefulsets")
        | ("apps", "daemonsets") => {
            if let (Some(old), "statefulsets") = (old, rt.plural) {
                if statefulset_fixed(old) != statefulset_fixed(obj) {
                    causes.push(("spec".into(), "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'revisionHistoryLimit', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden".into()));
                }
            }
            let sel = &obj["spec"]["selector"];
            let labels = &obj["spec"]["template"]["metadata"]["labels"];
            if sel.is_null() || sel.as_object().is_some_and(|m| m.is_empty()) {
                causes.push(("spec.selector".into(), "Required value".into()));
            } else if !Selector::from_label_selector(sel)
                .matches_labels(&json!({"metadata": {"labels": labels}}))
            {
                causes.push((
                    "spec.template.metadata.labels".into(),
                    format!("Invalid value: {labels}: `selector` does not match template `labels`"),
                ));
            }
            if let Some(old) = old {
                if old["spec"]["selector"] != *sel {
                    causes.push((
                        "spec.selector".into(),
                        format!("Invalid value: {sel}: field is immutable"),
                    ));
                }
            }
            if obj["spec"]["replicas"].as_i64().is_some_and(|r| r < 0) {
                causes.push((
                    "spec.replicas".into(),
                    "Invalid value: must be greater than or equal to 0".into(),
                ));
            }
            Some(("spec.template.spec", &obj["spec"]["template"]["spec"]))
        }
        ("", "pods") => Some(("spec", &obj["spec"])),
        _ => None,
    };
    if let Some((prefix, spec)) = pod_spec {
        match spec["containers"].as_array() {
            Some(cs) if !cs.is_empty() => {
                for (i, c) in cs.iter().enumerate() {
                    let cname = c["name"].as_str().unwrap_or_default();
                    if !meta::valid_label(cname) {
                        causes.push((
                            format!("{prefix}.containers[{i}].name"),
                            format!(
                                "Invalid value: \"{cname}\": must be a lowercase RFC 1123 label"
                            ),
                        ));
                    }
                    if c["image"].as_str().is_none_or(|s| s.trim().is_empty()) {
                        causes.push((
                            format!("{prefix}.containers[{i}].image"),
                            "Required value".into(),
                        ));
                    }
                }
            }
            _ => causes.push((format!("{prefix}.containers"), "Required value".into())),
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(rt, name, causes))
    }
}

/// The part of a StatefulSet's spec that may not change.
fn statefulset_fixed(obj: &Value) -> Value {
    let mut spec = obj["spec"].clone();
    if let Some(m) = spec.as_object_mut() {
        for k in [
            "replicas",
            "ordinals",
            "template",
            "updateStrategy",
            "revisionHistoryLimit",
            "persistentVolumeClaimRetentionPolicy",
            "minReadySeconds",
        ] {
            m.remove(k);
        }
    }
    spec
}

fn check_namespace(store: &Store, rt: &ResourceType, ns: Option<&str>) -> Result<(), ApiError> {
    if !rt.namespaced {
        return Ok(());
    }
    let ns = ns.unwrap_or_default();
    if store
        .get(&ObjKey::new(resources::namespaces(), "", ns))
        .is_none()
    {
        return Err(ApiError::not_found(resources::namespaces(), ns));
    }
    Ok(())
}

fn create(
    store: &Store,
    target: &Target,
    mut obj: Value,
    manager: &str,
) -> Result<Value, ApiError> {
    let rt = target.rt;
    if !obj.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    if let Some(kind) = obj["kind"].as_str() {
        if kind != rt.kind {
            return Err(ApiError::bad_request(format!(
                "the kind {kind:?} of the object does not match the resource {}",
                rt.qualified()
            )));
        }
    }
    obj["apiVersion"] = json!(rt.api_version());
    obj["kind"] = json!(rt.kind);
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    if rt.namespaced {
        let path_ns = target.namespace.clone().unwrap_or_default();
        match obj["metadata"]["namespace"].as_str() {
            Some(ns) if !ns.is_empty() && ns != path_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            _ => obj["metadata"]["namespace"] = json!(path_ns),
        }
    } else if let Some(m) = obj["metadata"].as_object_mut() {
        m.remove("namespace");
    }
    check_namespace(store, rt, target.namespace.as_deref())?;
    if meta::name(&obj).is_empty() {
        match obj["metadata"]["generateName"].as_str() {
            Some(g) if !g.is_empty() => {
                let n = format!("{g}{}", meta::suffix(5));
                obj["metadata"]["name"] = json!(n);
            }
            _ => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    vec![(
                        "metadata.name".into(),
                        "Required value: name or generateName is required".into(),
                    )],
                ))
            }
        }
    }
    let now = meta::now();
    if let Some(m) = obj["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "managedFields",
            "generation",
        ] {
            m.remove(k);
        }
    }
    obj["metadata"]["uid"] = json!(meta::uid());
    obj["metadata"]["creationTimestamp"] = json!(now);
    if rt.tracks_generation {
        obj["metadata"]["generation"] = json!(1);
    }
    apply_defaults(rt, &mut obj, None);
    validate(rt, &obj, None)?;
    track_update(None, &mut obj, manager, &rt.api_version(), &now);
    let name = meta::name(&obj).to_string();
    let key = ObjKey::new(rt, meta::namespace(&obj), &name);
    let created = store.mutate_as(&key, target.commit, |cur| match cur {
        Some(_) => Err(ApiError::already_exists(rt, &name)),
        None => Ok(Some(obj)),
    })?;
    created
        .ok_or_else(|| ApiError::new(500, "InternalError", "object vanished while being created"))
}

/// Turn a client's desired object into what is stored, given the stored one: identity and
/// server fields are kept, status or spec is ignored according to the subresource, preconditions
/// are checked, the generation moves with the spec.
fn finish_write(
    rt: &ResourceType,
    old: &Value,
    mut new: Value,
    sub: Option<&str>,
    manager: Option<&str>,
) -> Result<Value, ApiError> {
    let name = meta::name(old).to_string();
    if !new.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    if let Some(rv) = new["metadata"]["resourceVersion"].as_str() {
        if !rv.is_empty() && Some(rv) != old["metadata"]["resourceVersion"].as_str() {
            return Err(ApiError::conflict(rt, &name));
        }
    }
    if let Some(n) = new["metadata"]["name"].as_str() {
        if n != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
    }
    new["apiVersion"] = json!(rt.api_version());
    new["kind"] = json!(rt.kind);
    if !new["metadata"].is_object() {
        new["metadata"] = json!({});
    }
    for k in [
        "uid",
        "creationTimestamp",
        "name",
        "namespace",
        "generation",
        "deletionTimestamp",
        "resourceVersion",
    ] {
        match old["metadata"].get(k) {
            Some(v) => new["metadata"][k] = v.clone(),
            None => {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(k);
                }
            }
        }
    }
    if sub == Some("status") {
        let status = new["status"].clone();
        new = old.clone();
        new["status"] = status;
    } else if rt.status_subresource {
        match old.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                if let Some(m) = new.as_object_mut() {
                    m.remove("status");
                }
            }
        }
    }
    apply_defaults(rt, &mut new, Some(old));
    validate(rt, &new, Some(old))?;
    if rt.tracks_generation && new.get("spec") != old.get("spec") {
        let g = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        new["metadata"]["generation"] = json!(g);
    }
    if let Some(manager) = manager {
        if new["metadata"]["managedFields"].is_null() {
            if let Some(mf) = old["metadata"].get("managedFields") {
                new["metadata"]["managedFields"] = mf.clone();
            }
        }
        track_update(
            Some(old),
            &mut new,
            manager,
            &rt.api_version(),
            &meta::now(),
        );
    }
    Ok(new)
}

fn update(
    store: &Store,
    target: &Target,
    name: &str,
    obj: Value,
    manager: &str,
) -> Result<Value, ApiError> {
    let rt = target.rt;
    let key = ObjKey::new(rt, target.namespace.as_deref().unwrap_or_default(), name);
    let sub = target.sub.as_deref();
    let out = store.mutate_as(&key, target.commit, |cur| {
        let cur = cur.ok_or_else(|| ApiError::not_found(rt, name))?;
        finish_write(rt, cur, obj, sub, Some(manager)).map(Some)
    })?;
    out.ok_or_else(|| ApiError::not_found(rt, name))
}

/// Delete one object at once (the sim has no finalizers or graceful termination); the answer is
/// the object with its deletion time, as the API server's is.
fn delete(store: &Store, target: &Target, name: &str) -> Result<Value, ApiError> {
    let rt = target.rt;
    let key = ObjKey::new(rt, target.namespace.as_deref().unwrap_or_default(), name);
    let deleted = store.mutate_as(&key, target.commit, |cur| match cur {
        Some(_) => Ok(None),
        None => Err(ApiError::not_found(rt, name)),
    })?;
    let mut obj = deleted.unwrap_or_default();
    obj["metadata"]["deletionTimestamp"] = json!(meta::now());
    Ok(obj)
}

/// The `scale` subresource (`kubectl scale`, autoscalers): an `autoscaling/v1` Scale view of
/// `spec.replicas`, read with GET and written with PATCH or PUT, which change the object's
/// `spec.replicas` like any spec write (a new generation).
fn scale_subresource(
    state: &Arc<ApiState>,
    target: &Target,
    method: &Method,
    body: &Bytes,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, ApiError> {
    let store = &state.store;
    let name = target
        .name
        .clone()
        .ok_or_else(|| ApiError::new(404, "NotFound", "scale needs an object name"))?;
    let ns = target.namespace.clone().unwrap_or_default();
    let key = ObjKey::new(target.rt, &ns, &name);
    let current = store
        .get(&key)
        .ok_or_else(|| ApiError::not_found(target.rt, &name))?;
    let view = |obj: &Value| {
        let selector = obj["spec"]["selector"]["matchLabels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"]["namespace"],
                "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "creationTimestamp": obj["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
            "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector},
        })
    };
    let before = view(&current);
    let wanted = match *method {
        Method::GET => return Ok(json_response(200, &before)),
        Method::PUT => decode_body(body, "application/json")?,
        Method::PATCH => {
            let media = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/merge-patch+json");
            match media.split(';').next().unwrap_or_default().trim() {
                "application/json-patch+json" => patch::json_patch(&before, body)?,
                "application/strategic-merge-patch+json" => {
                    patch::strategic_merge_patch(&before, body)?
                }
                _ => patch::merge_patch(&before, body)?,
            }
        }
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "the scale subresource takes GET, PUT and PATCH",
            ))
        }
    };
    let replicas = wanted["spec"]["replicas"]
        .as_i64()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::bad_request("spec.replicas: a non-negative integer is required")
        })?;
    let parent = Target {
        rt: target.rt,
        namespace: target.namespace.clone(),
        name: Some(name.clone()),
        sub: None,
        commit: target.commit,
    };
    let manager = params
        .get("fieldManager")
        .cloned()
        .unwrap_or_else(|| "kubectl-scale".into());
    let patch_body = serde_json::to_vec(&json!({"spec": {"replicas": replicas}}))
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (_, after) = patch_object(
        store,
        &parent,
        &name,
        &patch_body,
        "application/merge-patch+json",
        &Params::new(),
        &manager,
    )?;
    Ok(json_response(200, &view(&after)))
}

fn patch_object(
    store: &Store,
    target: &Target,
    name: &str,
    body: &[u8],
    content_type: &str,
    params: &Params,
    manager: &str,
) -> Result<(u16, Value), ApiError> {
    let rt = target.rt;
    let ns = target.namespace.clone().unwrap_or_default();
    let key = ObjKey::new(rt, &ns, name);
    let sub = target.sub.as_deref();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media == "application/apply-patch+yaml" || media == "application/apply-patch+json" {
        let Some(manager) = params.get("fieldManager").filter(|m| !m.is_empty()) else {
            return Err(ApiError::bad_request(
                "fieldManager is required for apply requests",
            ));
        };
        let force = params.get("force").is_some_and(|f| f == "true");
        let mut config: Value = serde_saphyr::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the apply configuration is not valid YAML or JSON: {e}"
            ))
        })?;
        if config["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n != name)
        {
            return Err(ApiError::bad_request(
                "the name in the apply configuration does not match the URL",
            ));
        }
        config["metadata"]["name"] = json!(name);
        if rt.namespaced {
            config["metadata"]["namespace"] = json!(ns);
            check_namespace(store, rt, Some(&ns))?;
        }
        if config["apiVersion"].as_str() != Some(&rt.api_version())
            || config["kind"].as_str() != Some(rt.kind)
        {
            return Err(ApiError::bad_request(format!(
                "the apply configuration must have apiVersion {:?} and kind {:?}",
                rt.api_version(),
                rt.kind
            )));
        }
        let mut created = false;
        // A resourceVersion in the configuration is a precondition, as for any write.
        let expected = config["metadata"]["resourceVersion"]
            .as_str()
            .filter(|v| !v.is_empty())
            .map(String::from);
        let out = store.mutate_as(&key, target.commit, |cur| {
            if let Some(rv) = &expected {
                if cur.and_then(|c| c["metadata"]["resourceVersion"].as_str()) != Some(rv) {
                    return Err(ApiError::conflict(rt, name));
                }
            }
            let now = meta::now();
            let applied = apply(cur, &config, manager, force, &rt.api_version(), &now)?;
            match cur {
                Some(cur) => finish_write(rt, cur, applied, sub, None).map(Some),
                None => {
                    created = true;
                    let mut obj = applied;
                    obj["metadata"]["uid"] = json!(meta::uid());
                    obj["metadata"]["creationTimestamp"] = json!(now);
                    if rt.tracks_generation {
                        obj["metadata"]["generation"] = json!(1);
                    }
                    apply_defaults(rt, &mut obj, None);
                    validate(rt, &obj, None)?;
                    Ok(Some(obj))
                }
            }
        })?;
        let obj = out.ok_or_else(|| ApiError::not_found(rt, name))?;
        return Ok((if created { 201 } else { 200 }, obj));
    }
    let out = store.mutate_as(&key, target.commit, |cur| {
        let cur = cur.ok_or_else(|| ApiError::not_found(rt, name))?;
        let patched = match media {
            "application/json-patch+json" => patch::json_patch(cur, body)?,
            "application/merge-patch+json" => patch::merge_patch(cur, body)?,
            "application/strategic-merge-patch+json" => patch::strategic_merge_patch(cur, body)?,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"),
                ))
            }
        };
        finish_write(rt, cur, patched, sub, Some(manager)).map(Some)
    })?;
    let obj = out.ok_or_else(|| ApiError::not_found(rt, name))?;
    Ok((200, obj))
}
