//! What the simulated pods serve, so verification can be tried without a cluster: each
//! workload has a Service of its own name, reached through the API server's service proxy
//! (`/api/v1/namespaces/NS/services/NAME[:PORT]/proxy/PATH`), and every pod's request counters
//! are one Prometheus scrape target (`/sim/metrics`). What a pod answers follows its main
//! image's tag:
//!
//! - `GET /healthz`: 200 `ok`; 500 when the tag contains `unhealthy`;
//! - `GET /version`: `{"version": "<tag>"}`;
//! - `GET /metrics`: the pod's own counters;
//! - requests: 10 per second from the pod's start, `errors-N` in the tag makes N% of them 500s
//!   (`sim_http_requests_total{namespace, workload, pod, version, code}`).
//!
//! A Service's port is accepted and ignored; a request is answered by one ready pod of the
//! workload, picked at random, or 503 when none is ready.

use std::fmt::Write;

use rand::seq::IndexedRandom;
use serde_json::{json, Value};

use super::controller::Controller;
use super::meta;
use super::resources;
use super::store::{ApiError, Store};

/// Simulated requests per second per ready pod.
const RATE: f64 = 10.0;

/// The tag of an image (`unknown` for a digest or none).
pub fn tag_of(image: &str) -> &str {
    if image.contains('@') {
        return "unknown";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map_or("latest", |(_, t)| t)
}

/// `errors-N` in a tag: N% of requests fail.
fn error_percent(tag: &str) -> f64 {
    tag.split("errors-")
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_digit())
                .collect::<String>()
        })
        .and_then(|n| n.parse::<f64>().ok())
        .map_or(0.0, |n| n.min(100.0))
}

/// The workload a pod belongs to: its controller, or for a ReplicaSet the Deployment named
/// in the ReplicaSet's name.
fn workload_of(pod: &Value) -> Option<String> {
    let owner = pod["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["controller"] == true)?;
    let name = owner["name"].as_str()?;
    match owner["kind"].as_str()? {
        "ReplicaSet" => name.rsplit_once('-').map(|(d, _)| d.to_string()),
        _ => Some(name.to_string()),
    }
}

fn main_image(pod: &Value) -> &str {
    pod["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default()
}

fn seconds_up(pod: &Value) -> f64 {
    let Some(started) = pod["status"]["startTime"]
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
    else {
        return 0.0;
    };
    let d = jiff::Timestamp::now().duration_since(started);
    d.as_secs_f64().max(0.0)
}

/// One pod's counters: (ok, errors).
fn counters(pod: &Value) -> (u64, u64) {
    if !Controller::pod_ready(pod) {
        return (0, 0);
    }
    let total = (seconds_up(pod) * RATE).floor();
    let errors = (total * error_percent(tag_of(main_image(pod))) / 100.0).floor();
    (total as u64 - errors as u64, errors as u64)
}

fn exposition(out: &mut String, pod: &Value) {
    let Some(workload) = workload_of(pod) else {
        return;
    };
    let (ok, errors) = counters(pod);
    let labels = format!(
        "namespace=\"{}\",workload=\"{}\",pod=\"{}\",version=\"{}\"",
        meta::namespace(pod),
        workload,
        meta::name(pod),
        tag_of(main_image(pod)).replace(['"', '\\', '\n'], "_"),
    );
    let _ = writeln!(out, "sim_http_requests_total{{{labels},code=\"200\"}} {ok}");
    let _ = writeln!(
        out,
        "sim_http_requests_total{{{labels},code=\"500\"}} {errors}"
    );
}

const HEADER: &str = "# HELP sim_http_requests_total Requests a simulated pod served, by status code.\n# TYPE sim_http_requests_total counter\n";

/// Every pod's counters, in Prometheus' text format.
pub fn metrics(store: &Store) -> String {
    let (pods, _) = store.list("pods", None);
    let mut out = HEADER.to_string();
    for pod in &pods {
        exposition(&mut out, pod);
    }
    out
}

/// A plain answer: status, content type and body.
pub struct Answer {
    pub code: u16,
    pub content_type: &'static str,
    pub body: String,
}

/// The service proxy: `service` is `NAME`, `NAME:PORT` or `SCHEME:NAME:PORT`.
pub fn proxy(
    store: &Store,
    namespace: &str,
    service: &str,
    path: &str,
) -> Result<Answer, ApiError> {
    let name = match service.split(':').collect::<Vec<_>>().as_slice() {
        [n] | [n, _] => *n,
        [_, n, _] => *n,
        _ => service,
    };
    let exists = [
        resources::deployments(),
        resources::statefulsets(),
        resources::daemonsets(),
    ]
    .iter()
    .any(|rt| {
        store
            .get(&super::store::ObjKey::new(rt, namespace, name))
            .is_some()
    });
    if !exists {
        return Err(ApiError::new(
            404,
            "NotFound",
            format!("services \"{name}\" not found"),
        ));
    }
    let (pods, _) = store.list("pods", Some(namespace));
    let ready: Vec<&Value> = pods
        .iter()
        .filter(|p| workload_of(p).as_deref() == Some(name) && Controller::pod_ready(p))
        .collect();
    let Some(pod) = ready.choose(&mut rand::rng()) else {
        return Err(ApiError::new(
            503,
            "ServiceUnavailable",
            format!("no endpoints available for service \"{name}\""),
        ));
    };
    let tag = tag_of(main_image(pod));
    let text = |code, body: &str| Answer {
        code,
        content_type: "text/plain; charset=utf-8",
        body: body.to_string(),
    };
    Ok(match path.split('?').next().unwrap_or_default() {
        "/healthz" if tag.contains("unhealthy") => text(500, "unhealthy"),
        "/healthz" => text(200, "ok"),
        "/version" => Answer {
            code: 200,
            content_type: "application/json",
            body: json!({ "version": tag }).to_string(),
        },
        "/metrics" => {
            let mut out = HEADER.to_string();
            exposition(&mut out, pod);
            Answer {
                code: 200,
                content_type: "text/plain; version=0.0.4",
                body: out,
            }
        }
        _ => text(404, "404 page not found"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_error_rates_come_from_the_image() {
        assert_eq!(tag_of("example.com:5000/team/web:1.4.2"), "1.4.2");
        assert_eq!(tag_of("web"), "latest");
        assert_eq!(tag_of("web@sha256:abc"), "unknown");
        assert_eq!(error_percent("1.2-errors-5"), 5.0);
        assert_eq!(error_percent("errors-250"), 100.0);
        assert_eq!(error_percent("1.2"), 0.0);
    }

    #[test]
    fn a_pod_belongs_to_its_controllers_workload() {
        let pod = json!({"metadata": {"ownerReferences": [
            {"kind": "ReplicaSet", "name": "web-5d8f9c", "controller": true}]}});
        assert_eq!(workload_of(&pod).as_deref(), Some("web"));
        let pod = json!({"metadata": {"ownerReferences": [
            {"kind": "StatefulSet", "name": "db", "controller": true}]}});
        assert_eq!(workload_of(&pod).as_deref(), Some("db"));
        assert_eq!(workload_of(&json!({"metadata": {}})), None);
    }
}
