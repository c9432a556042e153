//! The verdict fields of a service row (`status`, `message`, `desired`, `deployed`,
//! `last_good`, `kind`, `content_hash`, `failed_hash`) belong to the recorder. Every change
//! that sets one of them is built in the recorder or here, and only here for another stage:
//! ingest refusing a file, an operator asking for a retry. `tests/ownership.rs` fails when
//! another module sets them itself.

use crate::domain::ServiceStatus;
use crate::store::ServiceChange;

/// A file ingest cannot act on (invalid, unreadable): said on the row, unless a deploy is
/// under way (its verdict comes later).
pub fn file_refused(status: ServiceStatus, message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status_unless_deploying(status)
        .message(message)
}

/// A service two files define: nothing is deployed until one is removed.
pub fn defined_twice(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status(ServiceStatus::Invalid)
        .message(message)
}

/// The service's file is gone: no longer managed (nothing in the cluster is deleted).
pub fn unmanaged(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status(ServiceStatus::Unmanaged)
        .message(message)
}

/// A seed's `.last` file says what already runs: recorded as deployed from `content_hash`,
/// so it is not deployed again.
pub fn imported(content_hash: impl Into<String>, from: &str) -> ServiceChange {
    ServiceChange::default()
        .content_hash(content_hash)
        .status(ServiceStatus::Succeeded)
        .message(format!("imported from {from}"))
}

/// `depwatch retry`: the pin on `pinned` (the content hash the operator saw pinned) is lifted,
/// and the version will be deployed again. A pin the recorder made on another version since
/// stays.
pub fn retry_requested(pinned: &str, note: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .unpin(pinned)
        .status(ServiceStatus::Retry)
        .message(note)
}

/// A save waits for a deploy window or a freeze (`message` says until when and why); a
/// deploy under way keeps its status.
pub fn held(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status_unless_deploying(ServiceStatus::Held)
        .message(message)
}

/// A save waits for its approvers (`message` says who approved so far, until when, and how
/// to approve); a deploy under way keeps its status.
pub fn awaiting_approval(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status_unless_deploying(ServiceStatus::AwaitingApproval)
        .message(message)
}

/// A save an approver rejected, or that was not approved in time: nothing deployed.
pub fn rejected(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default()
        .status_unless_deploying(ServiceStatus::Rejected)
        .message(message)
}

/// The one history row of a rejected save: asked at `asked` by `requester`, for `asks` (the
/// save's own words) over `from`, rejected for `why`. Written started and finished at once.
pub struct RejectedRow<'a> {
    pub key: &'a crate::domain::ServiceKey,
    pub trigger: crate::domain::Trigger,
    pub requester: &'a str,
    pub from: &'a str,
    pub asks: &'a str,
    pub hash: &'a str,
    pub kind: crate::domain::WorkloadKind,
    pub asked: &'a str,
}

impl RejectedRow<'_> {
    pub fn record(&self) -> crate::store::DeployRecord {
        crate::store::DeployRecord {
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            trigger: self.trigger,
            actor: self.requester.to_string(),
            from_image: self.from.to_string(),
            to_image: self.asks.to_string(),
            started_at: self.asked.to_string(),
            content_hash: self.hash.to_string(),
            kind: self.kind.to_string(),
            ..crate::store::DeployRecord::default()
        }
    }
}

/// A note on the row from an operator command (suspend, resume): its message only.
pub fn noted(message: impl Into<String>) -> ServiceChange {
    ServiceChange::default().message(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ServiceRecord;

    #[test]
    fn a_retry_lifts_only_the_pin_it_saw() {
        let pinned = |hash: &str| ServiceRecord {
            failed_hash: hash.into(),
            status: ServiceStatus::Failed,
            ..ServiceRecord::default()
        };
        let mut row = pinned("aa11");
        retry_requested("aa11", "retry").apply(&mut row);
        assert_eq!(
            (row.failed_hash.as_str(), row.status),
            ("", ServiceStatus::Retry)
        );
        // Pinned on another version by the time the retry lands: that pin stays.
        let mut row = pinned("bb22");
        retry_requested("aa11", "retry").apply(&mut row);
        assert_eq!(row.failed_hash, "bb22");
    }
}
