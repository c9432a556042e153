//! Slack incoming-webhook messages, colour-coded by outcome.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde_json::json;
use tokio::sync::mpsc;

use crate::domain::{human_duration, DeployOutcome, Images, Shown, Tone, WorkloadKind};

/// Green for success, red for failure, amber for timeouts, rollbacks and drift.
pub fn colour(outcome: DeployOutcome) -> &'static str {
    tone_colour(outcome.tone())
}

fn tone_colour(tone: Tone) -> &'static str {
    match tone {
        Tone::Good => "#2eb886",
        Tone::Bad => "#d40e0d",
        Tone::Warning | Tone::Busy => "#daa038",
        Tone::Neutral => "#a0a0a0",
    }
}

/// How a message's title words an outcome.
fn verb(outcome: DeployOutcome) -> &'static str {
    match outcome {
        DeployOutcome::Succeeded | DeployOutcome::Unchanged => "deployed",
        DeployOutcome::Unverified => "deployed (unverified)",
        DeployOutcome::Applied => "applied for its next schedule",
        DeployOutcome::Missing => "is missing (deleted outside depwatch)",
        DeployOutcome::Failed => "failed to deploy",
        DeployOutcome::TimedOut => "timed out deploying",
        DeployOutcome::RolledBack => "rolled back the deploy of",
        DeployOutcome::RollbackFailed => "could not roll back the deploy of",
        DeployOutcome::Drift => "drifted",
        DeployOutcome::ChangedOutside => "was changed outside depwatch while deploying",
        DeployOutcome::Superseded => "superseded",
        DeployOutcome::Interrupted => "interrupted",
        DeployOutcome::InProgress => "deploying",
        DeployOutcome::Rejected => "rejected a save of",
    }
}

/// What a message is about: a deploy's outcome, or a save a deploy window or a freeze holds
/// or releases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Notice {
    #[default]
    Deploy,
    Held,
    Released,
    /// A save waits for its approvers: the reason names the command and the API call.
    Approval,
}

/// One message about one service.
#[derive(Debug, Clone)]
pub struct Report {
    pub notice: Notice,
    pub outcome: DeployOutcome,
    pub service: String,
    pub namespace: String,
    /// The kind of workload the service is.
    pub kind: WorkloadKind,
    pub from: String,
    pub to: String,
    pub duration: Duration,
    /// The reason and the pod's own message, for failures.
    pub reason: String,
    /// The verification checks' record over the bake, when the file declared checks.
    pub checks: Vec<crate::domain::verify::CheckResult>,
}

impl Report {
    pub fn title(&self) -> String {
        let verb = match self.notice {
            Notice::Deploy => verb(self.outcome),
            Notice::Held => "held a save of",
            Notice::Released => "released the held save of",
            Notice::Approval => "needs approval to deploy",
        };
        format!("{verb} {} ({})", self.workload(), self.namespace)
    }

    /// How the message is coloured: a deploy by its outcome, a hold amber, a release green.
    pub fn tone(&self) -> Tone {
        match self.notice {
            Notice::Deploy => self.outcome.tone(),
            Notice::Held | Notice::Approval => Tone::Warning,
            Notice::Released => Tone::Good,
        }
    }

    /// The colour of [`Self::tone`], as Slack writes it.
    pub fn colour(&self) -> &'static str {
        tone_colour(self.tone())
    }

    /// `web` for a Deployment (what a plain name means), `statefulset/db` for other kinds.
    pub fn workload(&self) -> String {
        match self.kind {
            WorkloadKind::Deployment => self.service.clone(),
            kind => Shown(kind, &self.service).to_string(),
        }
    }

    /// The generic webhook document.
    pub fn to_json(&self) -> serde_json::Value {
        let event = match self.notice {
            Notice::Deploy => "depwatch.deploy",
            Notice::Held => "depwatch.held",
            Notice::Released => "depwatch.released",
            Notice::Approval => "depwatch.approval_needed",
        };
        json!({
            "event": event,
            "outcome": self.outcome,
            "service": self.service,
            "namespace": self.namespace,
            "kind": self.kind,
            "from": self.from,
            "to": self.to,
            "duration_seconds": (self.duration.as_secs_f64() * 1000.0).round() / 1000.0,
            "reason": self.reason,
            "checks": self.checks,
            "time": crate::store::now(),
        })
    }

    /// From and to for people: only the containers whose image changes (a sidecar that
    /// stays is noise), all of them when nothing or everything does.
    pub fn changed(&self) -> (String, String) {
        let (from, to) = (Images::parse(&self.from), Images::parse(&self.to));
        let moved: Vec<&str> = to
            .iter()
            .filter(|(c, img)| from.get(c) != Some(img))
            .map(|(c, _)| c.as_str())
            .collect();
        if moved.is_empty() || from.is_empty() {
            return (self.from.clone(), self.to.clone());
        }
        let only = |images: &Images| -> String {
            let kept: Images = images
                .iter()
                .filter(|(c, _)| moved.contains(&c.as_str()))
                .map(|(c, i)| (c.clone(), i.clone()))
                .collect();
            kept.to_string()
        };
        (only(&from), only(&to))
    }

    pub fn to_slack(&self) -> serde_json::Value {
        let (from, to) = self.changed();
        let mut fields = vec![
            json!({"title": "Service", "value": self.workload(), "short": true}),
            json!({"title": "Namespace", "value": self.namespace, "short": true}),
            json!({"title": "Image", "value": format!("{from} → {to}"), "short": false}),
            json!({"title": "Duration", "value": human_duration(self.duration), "short": true}),
        ];
        if !self.reason.is_empty() {
            fields.push(json!({"title": "Reason", "value": self.reason, "short": false}));
        }
        if !self.checks.is_empty() {
            let summary = crate::domain::verify::summary(&self.checks);
            fields.push(json!({"title": "Checks", "value": summary, "short": false}));
        }
        let text = if self.reason.is_empty() {
            format!("{} from {from} to {to}", self.title())
        } else {
            format!("{} from {from} to {to}: {}", self.title(), self.reason)
        };
        json!({
            "text": text,
            "attachments": [{
                "color": self.colour(),
                "fallback": text,
                "title": self.title(),
                "fields": fields,
            }]
        })
    }
}

/// Counters of what happened to notifications.
#[derive(Debug, Default)]
pub struct NotifyStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// Queues reports for background senders (Slack, a generic JSON webhook). Cloning is cheap.
#[derive(Clone)]
pub struct Notifier {
    sinks: Vec<Sink>,
    pub stats: Arc<NotifyStats>,
    metrics: Option<crate::metrics::Metrics>,
    /// Owns the sender tasks, so shutdown can wait for what is queued.
    tasks: tokio_util::task::TaskTracker,
}

#[derive(Clone)]
struct Sink {
    /// For logs: "Slack" or "webhook" (never the URL, which is a secret).
    name: &'static str,
    tx: mpsc::Sender<Report>,
}

#[derive(Debug, thiserror::Error)]
enum SendError {
    /// Worth retrying, after at least this long if the receiver said so.
    #[error("{1}")]
    Retry(Option<Duration>, String),
    #[error("{0}")]
    Permanent(String),
}

async fn send_once(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<(), SendError> {
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| SendError::Retry(None, e.without_url().to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    if status.as_u16() == 429 {
        let after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(SendError::Retry(after, "429 Too Many Requests".into()));
    }
    if status.is_server_error() {
        return Err(SendError::Retry(None, format!("HTTP {status}")));
    }
    Err(SendError::Permanent(format!("HTTP {status}")))
}

impl Notifier {
    /// A notifier that sends nowhere (no receiver configured).
    pub fn disabled() -> Self {
        Notifier {
            sinks: Vec::new(),
            stats: Arc::default(),
            metrics: None,
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    /// A notifier with no receivers yet; add them with [`Self::with_slack`] and
    /// [`Self::with_webhook`].
    pub fn new(metrics: crate::metrics::Metrics) -> Self {
        Notifier {
            sinks: Vec::new(),
            stats: Arc::default(),
            metrics: Some(metrics),
            tasks: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Sender tasks belong to `tasks` (add receivers after this).
    pub fn tracked(mut self, tasks: tokio_util::task::TaskTracker) -> Self {
        self.tasks = tasks;
        self
    }

    /// Reports queued and not yet taken by a sender.
    pub fn queued(&self) -> usize {
        self.sinks
            .iter()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .sum()
    }

    /// At exit: stop taking reports and give the senders (of `tasks`, once every other clone
    /// of this notifier is gone) up to `grace` to deliver what is queued; what is left is
    /// counted as dropped.
    pub async fn close(self, tasks: tokio_util::task::TaskTracker, grace: Duration) {
        let queued = self.queued();
        let (stats, metrics) = (self.stats.clone(), self.metrics.clone());
        let before = stats.sent.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
        drop(self);
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_ok() {
            return;
        }
        let done = stats.sent.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
        let lost = (queued as u64).saturating_sub(done - before);
        if lost > 0 {
            stats.dropped.fetch_add(lost, Ordering::Relaxed);
            if let Some(m) = &metrics {
                for _ in 0..lost {
                    m.notification("dropped");
                }
            }
            tracing::warn!(
                dropped = lost,
                grace = %humantime::format_duration(grace),
                "notifications still queued at exit were not delivered"
            );
        }
    }

    /// Send to a Slack incoming webhook. The URL is a secret: it is never logged.
    pub fn slack(webhook: String, timeout: Duration, metrics: crate::metrics::Metrics) -> Self {
        Notifier::new(metrics).with_slack(webhook, timeout)
    }

    pub fn with_slack(self, webhook: String, timeout: Duration) -> Self {
        self.with_sink("Slack", webhook, timeout, Report::to_slack)
    }

    /// Send to a Microsoft Teams Workflows webhook (an Adaptive Card). The URL is a secret.
    pub fn with_teams(self, url: String, timeout: Duration) -> Self {
        self.with_sink("Teams", url, timeout, Report::to_teams)
    }

    /// Send to a Google Chat incoming webhook (a card). The URL is a secret.
    pub fn with_google_chat(self, url: String, timeout: Duration) -> Self {
        self.with_sink("Google Chat", url, timeout, Report::to_google_chat)
    }

    /// Send to a Discord webhook (an embed). The URL is a secret.
    pub fn with_discord(self, url: String, timeout: Duration) -> Self {
        self.with_sink("Discord", url, timeout, Report::to_discord)
    }

    /// Send every outcome as a JSON document to a generic webhook.
    pub fn with_webhook(self, url: String, timeout: Duration) -> Self {
        self.with_sink("webhook", url, timeout, Report::to_json)
    }

    fn with_sink(
        mut self,
        name: &'static str,
        url: String,
        timeout: Duration,
        body: fn(&Report) -> serde_json::Value,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Report>(1024);
        let counters = self.stats.clone();
        let metrics = self.metrics.clone();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        self.tasks.spawn(async move {
            while let Some(report) = rx.recv().await {
                let body = body(&report);
                let attempt = || async {
                    match send_once(&client, &url, &body).await {
                        Err(SendError::Retry(Some(after), why)) => {
                            // Honour Retry-After (up to five minutes) before the backoff's own delay.
                            tokio::time::sleep(after.min(Duration::from_secs(300))).await;
                            Err(SendError::Retry(Some(after), why))
                        }
                        other => other,
                    }
                };
                let result = attempt
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(200))
                            .with_max_delay(Duration::from_secs(30))
                            .with_max_times(6)
                            .with_jitter(),
                    )
                    .when(|e| matches!(e, SendError::Retry(..)))
                    .await;
                let outcome = if result.is_ok() { "sent" } else { "failed" };
                match &result {
                    Ok(()) => counters.sent.fetch_add(1, Ordering::Relaxed),
                    Err(_) => counters.failed.fetch_add(1, Ordering::Relaxed),
                };
                if let Some(m) = &metrics {
                    m.notification(outcome);
                }
                if let Err(e) = result {
                    tracing::warn!(sink = name, service = %report.service, namespace = %report.namespace, error = %e, "notification failed");
                }
            }
        });
        self.sinks.push(Sink { name, tx });
        self
    }

    /// Publish every outcome on NATS (see [`super::nats`]). The URL may hold credentials: it is
    /// never logged.
    pub fn with_nats(mut self, url: String) -> Self {
        let counters = self.stats.clone();
        let metrics = self.metrics.clone();
        let tx = super::nats::spawn(&self.tasks, url, 1024, move |outcome| {
            match outcome {
                "sent" => counters.sent.fetch_add(1, Ordering::Relaxed),
                _ => counters.failed.fetch_add(1, Ordering::Relaxed),
            };
            if let Some(m) = &metrics {
                m.notification(outcome);
            }
        });
        self.sinks.push(Sink { name: "NATS", tx });
        self
    }

    /// Queue a report for every receiver without waiting.
    pub fn report(&self, report: Report) {
        for sink in &self.sinks {
            if sink.tx.try_send(report.clone()).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.notification("dropped");
                }
                tracing::warn!(
                    sink = sink.name,
                    "notification queue full; a message was dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_notice_has_its_title_colour_and_webhook_event() {
        let report = |notice, outcome| Report {
            notice,
            outcome,
            service: "web".into(),
            namespace: "prod".into(),
            kind: WorkloadKind::Deployment,
            from: "web=w:1".into(),
            to: "1.2".into(),
            duration: Duration::ZERO,
            reason: "approve with `depwatch approve prod/web`".into(),
            checks: Vec::new(),
        };
        let table = [
            (
                Notice::Approval,
                DeployOutcome::InProgress,
                "needs approval to deploy web (prod)",
                "#daa038",
                "depwatch.approval_needed",
            ),
            (
                Notice::Deploy,
                DeployOutcome::Rejected,
                "rejected a save of web (prod)",
                "#d40e0d",
                "depwatch.deploy",
            ),
            (
                Notice::Held,
                DeployOutcome::InProgress,
                "held a save of web (prod)",
                "#daa038",
                "depwatch.held",
            ),
            (
                Notice::Released,
                DeployOutcome::InProgress,
                "released the held save of web (prod)",
                "#2eb886",
                "depwatch.released",
            ),
        ];
        for (notice, outcome, title, colour, event) in table {
            let r = report(notice, outcome);
            assert_eq!((r.title().as_str(), r.colour()), (title, colour));
            let doc = r.to_json();
            assert_eq!(doc["event"], event);
            assert_eq!(doc["reason"], "approve with `depwatch approve prod/web`");
        }
        assert_eq!(
            report(Notice::Deploy, DeployOutcome::Rejected).to_json()["outcome"],
            "rejected"
        );
    }

    #[test]
    fn messages_name_only_the_containers_that_change() {
        let report = |from: &str, to: &str| Report {
            notice: Notice::Deploy,
            outcome: DeployOutcome::RolledBack,
            service: "web".into(),
            namespace: "prod".into(),
            kind: WorkloadKind::Deployment,
            from: from.into(),
            to: to.into(),
            duration: Duration::ZERO,
            reason: "rolled back to web=w:1, envoy=e:1: CrashLoopBackOff".into(),
            checks: Vec::new(),
        };
        let table = [
            (
                "envoy=e:1, web=w:1",
                "envoy=e:1, web=w:2",
                "web=w:1",
                "web=w:2",
            ),
            (
                "envoy=e:1, web=w:1",
                "envoy=e:2, web=w:2",
                "envoy=e:1, web=w:1",
                "envoy=e:2, web=w:2",
            ),
            ("-", "web=w:2", "-", "web=w:2"),
            ("web=w:1", "web=w:1", "web=w:1", "web=w:1"),
        ];
        for (from, to, want_from, want_to) in table {
            let r = report(from, to);
            assert_eq!(
                r.changed(),
                (want_from.into(), want_to.into()),
                "{from} → {to}"
            );
            assert!(r.to_slack()["text"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("from {want_from} to {want_to}"))));
            // The webhook's from and to are the history row's, whole.
            assert_eq!(
                (r.to_json()["from"].clone(), r.to_json()["to"].clone()),
                (json!(from), json!(to))
            );
        }
    }

    #[test]
    fn messages_are_colour_coded_and_carry_the_reason() {
        let r = Report {
            notice: Notice::Deploy,
            outcome: DeployOutcome::Failed,
            service: "payments".into(),
            namespace: "prod".into(),
            kind: WorkloadKind::Deployment,
            from: "repo:1.0".into(),
            to: "repo:1.1".into(),
            duration: Duration::from_millis(2500),
            reason: "ImagePullBackOff: not found".into(),
            checks: Vec::new(),
        };
        let db = Report {
            kind: WorkloadKind::StatefulSet,
            service: "db".into(),
            ..r.clone()
        };
        assert_eq!(db.title(), "failed to deploy statefulset/db (prod)");
        assert_eq!(db.to_json()["kind"], "statefulset");
        assert_eq!(r.title(), "failed to deploy payments (prod)");
        let v = r.to_slack();
        assert_eq!(v["attachments"][0]["color"], "#d40e0d");
        assert_eq!(r.to_json()["outcome"], "failed");
        assert!(v["text"]
            .as_str()
            .expect("text")
            .contains("ImagePullBackOff"));
        assert_eq!(colour(DeployOutcome::Succeeded), "#2eb886");
        assert_eq!(
            colour(DeployOutcome::TimedOut),
            colour(DeployOutcome::RolledBack)
        );
        assert_eq!(r.to_slack()["attachments"][0]["fields"][3]["value"], "2.5s");
    }
}
