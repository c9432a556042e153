//! Deploy outcomes on NATS: every outcome's JSON document (the generic webhook's) is published
//! on `depwatch.deploys.<namespace>.<name>`. When a JetStream stream captures the subject, the
//! message goes through JetStream and is acknowledged; otherwise it is a core publish. A dead or
//! slow NATS never delays a deploy: reports wait in the notifier's bounded queue (full means
//! dropped and counted), the client reconnects on its own, and a failed publish is counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Report;

/// The subject of one service's outcomes.
pub fn subject(namespace: &str, name: &str) -> String {
    format!("depwatch.deploys.{namespace}.{name}")
}

/// The servers of a comma-separated `--nats-url`. The error never repeats the URL (it may hold
/// credentials).
pub fn servers(url: &str) -> Result<Vec<async_nats::ServerAddr>, String> {
    let servers: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, s)| {
            s.parse().map_err(|e| {
                format!(
                    "server {} is not a NATS URL ({e}); expected e.g. nats://host:4222",
                    i + 1
                )
            })
        })
        .collect::<Result<_, _>>()?;
    if servers.is_empty() {
        return Err("no server given; expected e.g. nats://host:4222".into());
    }
    Ok(servers)
}

/// How long a "does a stream capture this subject" answer is trusted.
const STREAM_CHECK_TTL: Duration = Duration::from_secs(60);
/// Longest wait for a JetStream acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The connection, and which subjects a JetStream stream captures (asked at most once a
/// minute per subject).
struct Publisher {
    client: async_nats::Client,
    jetstream: async_nats::jetstream::Context,
    captured: HashMap<String, (bool, Instant)>,
}

impl Publisher {
    /// Whether a stream captures `subject`: its reports are then acknowledged by JetStream.
    async fn captured(&mut self, subject: &str) -> bool {
        let known = self
            .captured
            .get(subject)
            .filter(|(_, at)| at.elapsed() < STREAM_CHECK_TTL)
            .map(|(yes, _)| *yes);
        if let Some(yes) = known {
            return yes;
        }
        let yes = tokio::time::timeout(
            ACK_TIMEOUT,
            self.jetstream.stream_by_subject(subject.to_string()),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        self.captured
            .insert(subject.to_string(), (yes, Instant::now()));
        yes
    }

    /// Publish one report: through JetStream, acknowledged, when a stream captures its
    /// subject; as a plain message otherwise.
    async fn publish(&mut self, subject: &str, report: &Report) -> Result<(), String> {
        let payload: bytes::Bytes = report.to_json().to_string().into();
        if !self.captured(subject).await {
            return self
                .client
                .publish(subject.to_string(), payload)
                .await
                .map_err(|e| e.to_string());
        }
        let ack = self
            .jetstream
            .publish(subject.to_string(), payload)
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(ACK_TIMEOUT, ack).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no JetStream acknowledgement in time".to_string()),
        }
    }
}

/// Spawn the publisher; reports sent to the returned queue are published in order. The URL may
/// carry credentials: it is never logged.
pub fn spawn(
    tasks: &tokio_util::task::TaskTracker,
    url: String,
    queue: usize,
    outcome: impl Fn(&'static str) + Send + 'static,
) -> mpsc::Sender<Report> {
    let (tx, mut rx) = mpsc::channel::<Report>(queue);
    tasks.spawn(async move {
        let client = match async_nats::ConnectOptions::new()
            .name("depwatch")
            .retry_on_initial_connect()
            .connect(servers(&url).unwrap_or_default())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the NATS connection; outcomes are not published");
                while rx.recv().await.is_some() {
                    outcome("failed");
                }
                return;
            }
        };
        let mut publisher = Publisher {
            jetstream: async_nats::jetstream::new(client.clone()),
            client,
            captured: HashMap::new(),
        };
        while let Some(report) = rx.recv().await {
            let subject = subject(&report.namespace, &report.service);
            match publisher.publish(&subject, &report).await {
                Ok(()) => outcome("sent"),
                Err(e) => {
                    outcome("failed");
                    // Ask again next time: the stream may have been created or removed.
                    publisher.captured.remove(&subject);
                    tracing::warn!(%subject, error = %e, "cannot publish a deploy outcome on NATS");
                }
            }
        }
    });
    tx
}
