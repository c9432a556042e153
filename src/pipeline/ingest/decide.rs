//! Ingest's decision, pure: what to do with a file that is gone or that parsed, from the
//! record and what the queue holds. The driver (`super`) gathers these facts with I/O and
//! carries the outcome out; nothing here reads a file, the record or the clock.

use crate::domain::{Asker, ServiceStatus, Trigger};
use crate::store::ServiceRecord;

/// What the queue holds for the service.
#[derive(Debug, Clone, Default)]
pub struct Queued {
    /// The content hash of the version it wants, if it manages the service.
    pub desired_hash: Option<String>,
    /// It is deploying (or about to deploy) this very content.
    pub busy_with_this: bool,
}

/// A file that parsed and is within the bounds.
#[derive(Debug, Clone)]
pub struct Valid<'a> {
    pub hash: &'a str,
    /// The API request or operator's rollback that wrote it, from its header line.
    pub asker: Option<Asker>,
    /// What started the read: the watch, a resync, the start-up scan.
    pub trigger: Trigger,
    /// A deploy of the service was left in progress by a stop: it must be finished.
    pub unfinished: bool,
}

/// What to do with a file that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The service is suspended: the change waits for `depwatch resume`.
    Suspended,
    /// The version that failed, read again: pinned until the file changes.
    Pinned,
    /// Already acted on (or drifted, which only a change or --self-heal deploys): the queue
    /// learns what is desired, for --self-heal, when it does not know yet.
    Remember,
    /// The queue is on this very content already.
    Busy,

    /// A new desired version, with who asked.
    Submit {
        trigger: Trigger,
        actor: String,
        request_id: String,
    },
}

/// Judge a file that parsed against its record and the queue.
pub fn valid(file: Valid<'_>, record: &ServiceRecord, queued: &Queued) -> Outcome {
    let Valid {
        hash,
        asker,
        trigger,
        unfinished,
    } = file;
    // A deploy left in progress is finished whatever the record says of its version.
    if record.suspended && !unfinished {
        return Outcome::Suspended;
    }
    // `depwatch retry` clears the pin and marks the service; the re-read is the operator's.
    let retry_by = (record.status == ServiceStatus::Retry)
        .then(|| Asker::retry_actor(&record.message))
        .flatten();
    // A save back to the pinned version while another is wanted is a change all the same: the
    // queue records it (and finishes the rollout under way); a re-read of pinned content is
    // nothing.
    let saved_over_another = queued.desired_hash.as_deref().is_some_and(|d| d != hash);
    if record.failed_hash == hash && retry_by.is_none() && !unfinished && !saved_over_another {
        return Outcome::Pinned;
    }
    // Drifted services keep their recorded content: only a file change (or --self-heal)
    // deploys again, never a resync or a restart.
    if record.content_hash == hash && record.status.settled() && !unfinished {
        return Outcome::Remember;
    }
    if queued.busy_with_this && !unfinished {
        return Outcome::Busy;
    }
    // Who asked: an operator's retry, then the API request or operator's rollback that wrote
    // the file, else the file itself.
    let (trigger, actor, request_id) = match (retry_by, asker) {
        (Some(actor), _) => (Trigger::Operator, actor, String::new()),
        (None, Some(Asker::Request { id, actor })) => (Trigger::Api, actor, id),
        (None, Some(Asker::Rollback { actor, .. })) => (Trigger::Operator, actor, String::new()),
        (None, None) => (trigger, trigger.to_string(), String::new()),
    };
    Outcome::Submit {
        trigger,
        actor,
        request_id,
    }
}

/// A file that is gone: whether the service is let go. `was_known`: this path defined it;
/// `still_defined`: another path does; `recorded_refusal`: the record holds this path's
/// refusal (a refused file was never taken in, but its refusal is on the record).
pub fn gone(was_known: bool, still_defined: bool, recorded_refusal: bool) -> bool {
    (was_known && !still_defined) || (!was_known && recorded_refusal)
}

/// Whether the record holds a refusal of the file at `path`.
pub fn refusal_of(record: &ServiceRecord, path: &str) -> bool {
    record.path == path
        && matches!(
            record.status,
            ServiceStatus::Invalid | ServiceStatus::Unreadable
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: ServiceStatus, content: &str, failed: &str) -> ServiceRecord {
        ServiceRecord {
            status,
            content_hash: content.into(),
            failed_hash: failed.into(),
            ..ServiceRecord::default()
        }
    }

    fn file(hash: &str) -> Valid<'_> {
        Valid {
            hash,
            asker: None,
            trigger: Trigger::File,
            unfinished: false,
        }
    }

    fn submit(trigger: Trigger, actor: &str, request_id: &str) -> Outcome {
        Outcome::Submit {
            trigger,
            actor: actor.into(),
            request_id: request_id.into(),
        }
    }

    #[test]
    fn a_valid_file_is_waited_pinned_remembered_skipped_or_submitted() {
        use ServiceStatus as S;
        let idle = Queued::default();
        let wanting = |h: &str| Queued {
            desired_hash: Some(h.into()),
            busy_with_this: false,
        };
        let busy = Queued {
            desired_hash: Some("h2".into()),
            busy_with_this: true,
        };
        let mut suspended = record(S::Succeeded, "h1", "");
        suspended.suspended = true;
        let mut retried = record(S::Retry, "h2", "");
        retried.message = "retry requested by alice".into();
        let unfinished = |hash| Valid {
            unfinished: true,
            ..file(hash)
        };
        let api = Valid {
            asker: Some(Asker::Request {
                id: "r1".into(),
                actor: "ci".into(),
            }),
            ..file("h2")
        };
        let rollback = Valid {
            asker: Some(Asker::Rollback {
                actor: "bob".into(),
                at: "t".into(),
            }),
            ..file("h2")
        };
        let cases: Vec<(&str, Valid, ServiceRecord, Queued, Outcome)> = vec![
            (
                "a new version",
                file("h2"),
                record(S::Succeeded, "h1", ""),
                idle.clone(),
                submit(Trigger::File, "file", ""),
            ),
            (
                "a first file",
                file("h1"),
                ServiceRecord::default(),
                idle.clone(),
                submit(Trigger::File, "file", ""),
            ),
            (
                "suspended",
                file("h2"),
                suspended.clone(),
                idle.clone(),
                Outcome::Suspended,
            ),
            (
                "suspended, a deploy left in progress",
                unfinished("h2"),
                suspended,
                idle.clone(),
                submit(Trigger::File, "file", ""),
            ),
            (
                "the pinned version read again",
                file("h2"),
                record(S::RolledBack, "h2", "h2"),
                idle.clone(),
                Outcome::Pinned,
            ),
            (
                "the pinned version saved over another",
                file("h2"),
                record(S::RolledBack, "h2", "h2"),
                wanting("h3"),
                submit(Trigger::File, "file", ""),
            ),
            (
                "the pinned version, left in progress",
                unfinished("h2"),
                record(S::RolledBack, "h2", "h2"),
                idle.clone(),
                submit(Trigger::File, "file", ""),
            ),
            (
                "a retry of the pinned version",
                file("h2"),
                retried,
                idle.clone(),
                submit(Trigger::Operator, "alice", ""),
            ),
            (
                "already running",
                file("h1"),
                record(S::Succeeded, "h1", ""),
                idle.clone(),
                Outcome::Remember,
            ),
            (
                "drifted: only a change deploys",
                file("h1"),
                record(S::Drifted, "h1", ""),
                idle.clone(),
                Outcome::Remember,
            ),
            (
                "settled, left in progress",
                unfinished("h1"),
                record(S::Succeeded, "h1", ""),
                idle.clone(),
                submit(Trigger::File, "file", ""),
            ),
            (
                "the content being deployed",
                file("h2"),
                record(S::Deploying, "h1", ""),
                busy.clone(),
                Outcome::Busy,
            ),
            (
                "being deployed, left in progress",
                unfinished("h2"),
                record(S::Deploying, "h1", ""),
                busy,
                submit(Trigger::File, "file", ""),
            ),
            (
                "an API request",
                api,
                record(S::Succeeded, "h1", ""),
                idle.clone(),
                submit(Trigger::Api, "ci", "r1"),
            ),
            (
                "an operator's rollback",
                rollback,
                record(S::Succeeded, "h1", ""),
                idle.clone(),
                submit(Trigger::Operator, "bob", ""),
            ),
            (
                "a resync",
                Valid {
                    trigger: Trigger::Resync,
                    ..file("h2")
                },
                record(S::Failed, "h1", ""),
                idle,
                submit(Trigger::Resync, "resync", ""),
            ),
        ];
        for (case, f, r, q, want) in cases {
            assert_eq!(valid(f, &r, &q), want, "{case}");
        }
    }

    #[test]
    fn a_file_that_is_gone_lets_the_service_go_only_when_nothing_else_defines_it() {
        for (was_known, still_defined, refused, want) in [
            (true, false, false, true),
            (true, true, false, false),
            (false, false, true, true),
            (false, false, false, false),
            (false, true, true, true),
        ] {
            assert_eq!(
                gone(was_known, still_defined, refused),
                want,
                "known {was_known}, still defined {still_defined}, refused {refused}"
            );
        }
        let r = record(ServiceStatus::Invalid, "", "");
        let at = |p: &str| ServiceRecord {
            path: p.into(),
            ..r.clone()
        };
        assert!(refusal_of(&at("/d/web_prod.dep"), "/d/web_prod.dep"));
        assert!(!refusal_of(&at("/d/other/web_prod.dep"), "/d/web_prod.dep"));
        let ok = ServiceRecord {
            path: "/d/web_prod.dep".into(),
            ..record(ServiceStatus::Succeeded, "", "")
        };
        assert!(!refusal_of(&ok, "/d/web_prod.dep"));
    }
}
