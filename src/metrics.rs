//! Prometheus metrics (`/metrics`): deploys by outcome, change→healthy and change→patch
//! durations, queue depth, pending and running deploys, services by status, notifications by
//! result, Kubernetes requests by verb and code, ECR pull secret refresh failures and token
//! expiry, verification samples by result and how long bakes ran.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::domain::{DeployOutcome, ServiceStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabel {
    pub registry: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: String,
    pub code: String,
}

/// Every metric, registered once. Cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub deploys: Family<OutcomeLabel, Counter>,
    pub change_to_healthy: Histogram,
    pub change_to_patch: Histogram,
    pub queue_depth: Gauge,
    pub pending: Gauge,
    pub running: Gauge,
    pub record_pending: Gauge,
    pub record_dropped: Gauge,
    pub services: Family<StatusLabel, Gauge>,
    pub notifications: Family<ResultLabel, Counter>,
    pub kube_requests: Family<RequestLabel, Counter>,
    /// `--ecr-pull-secret`: failed token fetches (`token`: `error`, or a token that is
    /// `expired` on arrival) and Secret writes (`secret`: `error`).
    pub ecr_refresh_failures: Family<StepLabel, Counter>,
    /// `--ecr-pull-secret`: seconds until the current ECR token expires, by registry.
    pub ecr_token_expiry: Family<RegistryLabel, Gauge>,
    /// Samples of `verify:` checks by result (`pass`, `fail`, `no_data`).
    pub verify_checks: Family<ResultLabel, Counter>,
    /// How long bakes ran until they passed or failed.
    pub bake: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Register `metric` under `name` and hand it back for the daemon to update.
fn add<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("depwatch");
        Metrics {
            deploys: add(&mut r, "deploys", "Deploys by outcome", Family::default()),
            change_to_healthy: add(
                &mut r,
                "change_to_healthy_seconds",
                "Time from seeing a file change to a healthy rollout",
                Histogram::new(exponential_buckets(0.25, 2.0, 12)),
            ),
            change_to_patch: add(
                &mut r,
                "change_to_patch_seconds",
                "Time from seeing a file change to the API server accepting the patch",
                Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            queue_depth: add(&mut r, "queue_depth", "Services queued for a worker", Gauge::default()),
            pending: add(
                &mut r,
                "pending_deploys",
                "Deploys waiting for their service's running deploy",
                Gauge::default(),
            ),
            running: add(&mut r, "running_deploys", "Deploys in progress", Gauge::default()),
            record_pending: add(
                &mut r,
                "record_pending_writes",
                "Record writes kept in memory while the record refuses them",
                Gauge::default(),
            ),
            record_dropped: add(
                &mut r,
                "record_dropped_writes",
                "Record writes lost because too many were waiting",
                Gauge::default(),
            ),
            services: add(
                &mut r,
                "services",
                "Managed services by status and workload kind",
                Family::default(),
            ),
            notifications: add(&mut r, "notifications", "Notifications by result", Family::default()),
            kube_requests: add(
                &mut r,
                "kubernetes_requests",
                "Requests to the Kubernetes API server by verb and response code",
                Family::default(),
            ),
            ecr_refresh_failures: add(
                &mut r,
                "ecr_refresh_failures",
                "ECR pull secrets: failed token fetches (step=token; reason=error, or expired for a token stale on arrival) and Secret writes (step=secret)",
                Family::default(),
            ),
            ecr_token_expiry: add(
                &mut r,
                "ecr_token_expiry_seconds",
                "ECR pull secrets: seconds until the current token expires",
                Family::default(),
            ),
            verify_checks: add(
                &mut r,
                "verify_checks",
                "Samples of verification checks by result (pass, fail, no_data)",
                Family::default(),
            ),
            bake: add(
                &mut r,
                "verify_bake_seconds",
                "How long a healthy rollout's checks were baked until they passed or failed",
                Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            ),
            registry: Arc::new(r),
        }
    }

    pub fn deploy(&self, outcome: DeployOutcome) {
        self.deploys
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().to_string(),
            })
            .inc();
    }

    /// Every ECR failure series, at 0, once `--ecr-pull-secret` is on (a rate needs a start).
    pub fn ecr_failures_start(&self) {
        for (step, reason) in [
            ("token", "error"),
            ("token", "expired"),
            ("secret", "error"),
        ] {
            self.ecr_refresh_failures
                .get_or_create(&StepLabel {
                    step: step.to_string(),
                    reason: reason.to_string(),
                })
                .inc_by(0);
        }
    }

    pub fn ecr_failure(&self, step: &str, reason: &str) {
        self.ecr_refresh_failures
            .get_or_create(&StepLabel {
                step: step.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The current ECR token's registry and seconds left (read at each scrape).
    pub fn ecr_expiry(&self, expires_in: Option<(String, i64)>) {
        self.ecr_token_expiry.clear();
        if let Some((registry, seconds)) = expires_in {
            self.ecr_token_expiry
                .get_or_create(&RegistryLabel { registry })
                .set(seconds);
        }
    }

    pub fn notification(&self, result: &str) {
        self.notifications
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Refresh the gauges that are read from elsewhere, then encode everything.
    /// `statuses` holds each service's status and workload kind.
    pub fn encode(
        &self,
        queue: QueueGauges,
        statuses: &[(ServiceStatus, crate::domain::WorkloadKind)],
    ) -> String {
        self.queue_depth.set(queue.depth as i64);
        // Queued or waiting for their service's running deploy to finish.
        self.pending.set(queue.queued as i64);
        self.running.set(queue.running as i64);
        self.record_pending.set(queue.record.pending as i64);
        self.record_dropped
            .set(i64::try_from(queue.record.dropped).unwrap_or(i64::MAX));
        self.services.clear();
        for (s, kind) in statuses {
            self.services
                .get_or_create(&StatusLabel {
                    status: s.as_str().to_string(),
                    kind: kind.as_str().to_string(),
                })
                .inc();
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The scheduler's gauges at one moment.
#[derive(Debug, Clone, Default)]
pub struct QueueGauges {
    /// Services in the bounded queue.
    pub depth: usize,
    /// Queued or waiting for their service's running deploy.
    pub queued: usize,
    pub running: usize,
    /// Writes the record has not taken yet.
    pub record: crate::store::RecordHealth,
}

/// A tower layer counting Kubernetes API requests by verb and response code.
#[derive(Clone)]
pub struct KubeRequestsLayer(pub Metrics);

impl<S> tower::Layer<S> for KubeRequestsLayer {
    type Service = KubeRequests<S>;
    fn layer(&self, inner: S) -> Self::Service {
        KubeRequests {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct KubeRequests<S> {
    inner: S,
    metrics: Metrics,
}

fn verb<B>(req: &http::Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    match *req.method() {
        http::Method::GET if watch => "watch",
        http::Method::GET => "get",
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "other",
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for KubeRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let verb = verb(&req).to_string();
        let metrics = self.metrics.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "error".to_string(),
            };
            metrics
                .kube_requests
                .get_or_create(&RequestLabel { verb, code })
                .inc();
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let m = Metrics::new();
        m.deploy(DeployOutcome::Succeeded);
        m.notification("sent");
        m.change_to_patch.observe(0.004);
        let text = m.encode(
            QueueGauges::default(),
            &[(
                ServiceStatus::Drifted,
                crate::domain::WorkloadKind::StatefulSet,
            )],
        );
        assert!(
            text.contains("depwatch_deploys_total{outcome=\"succeeded\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("depwatch_notifications_total{result=\"sent\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("depwatch_change_to_patch_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("depwatch_queue_depth 0"), "{text}");
        assert!(
            text.contains("depwatch_services{status=\"drifted\",kind=\"statefulset\"} 1"),
            "{text}"
        );
    }
}
