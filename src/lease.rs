//! The Lease, written only on the version it was read at. Every write (acquire, renew,
//! release) carries the Lease's `resourceVersion`, so the API server refuses it (409
//! Conflict) when anything wrote the Lease since: a renewal held up by a partition and
//! delivered after another replica took over can never put this replica back, nor empty the
//! Lease. Deciding ([`holder`], [`next_step`]) is separate from writing ([`LeaseClient`]).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{json, Value};

/// Who holds the Lease, as this replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// This replica, until `until_ms` (renew time plus duration, Unix milliseconds).
    Us { until_ms: i64 },
    /// Nobody: no Lease, no holder, or one released.
    Nobody,
    /// Another replica; `expired` once its renew time plus duration has passed.
    Other { identity: String, expired: bool },
}

/// What a replica does about the Lease it just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ours: renew it.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Another replica holds it: wait (a leader stops acting).
    Wait,
}

/// The Lease's expiry: its renew time plus its duration, in Unix milliseconds.
pub fn expiry_ms(spec: &LeaseSpec) -> Option<i64> {
    let renewed = spec.renew_time.as_ref()?.0.as_millisecond();
    let duration = i64::from(spec.lease_duration_seconds?) * 1000;
    Some(renewed + duration)
}

/// Who holds `lease` at `now_ms`, for the replica named `identity`.
pub fn holder(lease: Option<&Lease>, identity: &str, now_ms: i64) -> Holder {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Holder::Nobody;
    };
    match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
        None => Holder::Nobody,
        Some(h) if h == identity => Holder::Us {
            until_ms: expiry_ms(spec).unwrap_or(0),
        },
        Some(h) => Holder::Other {
            identity: h.to_string(),
            // Without a renew time or duration nobody can say when it ends: taken, like
            // client-go does with a record it cannot judge.
            expired: expiry_ms(spec).is_none_or(|until| now_ms > until),
        },
    }
}

/// What to do about a Lease held by `holder`.
pub fn next_step(holder: &Holder) -> Step {
    match holder {
        Holder::Us { .. } => Step::Renew,
        Holder::Nobody | Holder::Other { expired: true, .. } => Step::Acquire,
        Holder::Other { expired: false, .. } => Step::Wait,
    }
}

/// A Lease write that did not land.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Someone wrote the Lease since it was read: read it again before deciding.
    #[error("the Lease changed since it was read (409 Conflict)")]
    Conflict,
    #[error("the Lease request took longer than {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// One Lease, read and written as one replica.
#[derive(Clone)]
pub struct LeaseClient {
    api: kube::Api<Lease>,
    pub name: String,
    pub identity: String,
    duration_s: i32,
    /// The longest any one request may take: a request held up by a partition is given up
    /// (it may still land later, and then its version refuses it).
    patience: Duration,
}

fn now_time() -> MicroTime {
    MicroTime(jiff::Timestamp::now())
}

fn version(lease: &Lease) -> Option<&str> {
    lease.metadata.resource_version.as_deref()
}

impl LeaseClient {
    /// A Lease of `duration`; each request given up after `patience`.
    pub fn new(
        api: kube::Api<Lease>,
        name: &str,
        identity: &str,
        duration: Duration,
        patience: Duration,
    ) -> LeaseClient {
        let duration_s = i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX);
        LeaseClient {
            api,
            name: name.to_string(),
            identity: identity.to_string(),
            duration_s,
            patience,
        }
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, LeaseError> {
        match tokio::time::timeout(self.patience, call).await {
            Err(_) => Err(LeaseError::Timeout(self.patience)),
            Ok(Err(kube::Error::Api(s))) if s.code == 409 => Err(LeaseError::Conflict),
            Ok(r) => Ok(r?),
        }
    }

    /// The Lease as it is; `None` when there is none.
    pub async fn get(&self) -> Result<Option<Lease>, LeaseError> {
        self.bounded(self.api.get_opt(&self.name)).await
    }

    /// One conditional write of `spec` over the Lease at `lease`'s version.
    async fn write(&self, lease: &Lease, spec: Value) -> Result<Lease, LeaseError> {
        let Some(rv) = version(lease) else {
            // A Lease without a version cannot be written conditionally: read it again.
            return Err(LeaseError::Conflict);
        };
        let body = json!({"metadata": {"resourceVersion": rv}, "spec": spec});
        let pp = PatchParams {
            field_manager: Some(crate::pipeline::deploy::FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        self.bounded(self.api.patch(&self.name, &pp, &Patch::Merge(&body)))
            .await
    }

    /// Take the Lease read as `lease` (free or expired), or create it held when there is
    /// none. A Lease written meanwhile refuses it.
    pub async fn acquire(&self, lease: Option<&Lease>) -> Result<Lease, LeaseError> {
        let now = now_time();
        let Some(lease) = lease else {
            let fresh: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": self.duration_s,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                }
            }))
            .map_err(|e| LeaseError::Kube(kube::Error::SerdeError(e)))?;
            return match self
                .bounded(self.api.create(&PostParams::default(), &fresh))
                .await
            {
                // Created by another replica first (AlreadyExists is a 409 too).
                Err(LeaseError::Conflict) => Err(LeaseError::Conflict),
                other => other,
            };
        };
        let transitions = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_transitions)
            .unwrap_or(0);
        let spec = json!({
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions.saturating_add(1),
        });
        self.write(lease, spec).await
    }

    /// Renew the Lease this replica holds, read (or last written) as `lease`.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let spec = json!({
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.duration_s,
            "renewTime": now_time(),
        });
        self.write(lease, spec).await
    }

    /// Give the Lease up, only if this replica holds it now: read, then a write conditional
    /// on that read. Returns whether it was released.
    pub async fn release_if_held(&self) -> Result<bool, LeaseError> {
        let lease = self.get().await?;
        let now = jiff::Timestamp::now().as_millisecond();
        let Some(lease) =
            lease.filter(|l| matches!(holder(Some(l), &self.identity, now), Holder::Us { .. }))
        else {
            return Ok(false);
        };
        let spec = json!({"holderIdentity": null, "renewTime": null, "acquireTime": null});
        self.write(&lease, spec).await.map(|_| true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed_ms: i64, seconds: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "depwatch", "resourceVersion": "7"},
            "spec": {
                "holderIdentity": holder,
                "leaseDurationSeconds": seconds,
                "renewTime": jiff::Timestamp::from_millisecond(renewed_ms)
                    .expect("time")
                    .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
                    .to_string(),
            }
        }))
        .expect("lease")
    }

    #[test]
    fn the_holder_is_us_nobody_or_another_replica_expired_or_not() {
        let at = 1_700_000_000_000;
        let table = [
            (
                Some("a-1"),
                at + 1_000,
                Holder::Us {
                    until_ms: at + 15_000,
                },
            ),
            // Ours even past its expiry: renewing says whether it still is.
            (
                Some("a-1"),
                at + 20_000,
                Holder::Us {
                    until_ms: at + 15_000,
                },
            ),
            (None, at, Holder::Nobody),
            (Some(""), at, Holder::Nobody),
            (
                Some("b-2"),
                at + 15_000,
                Holder::Other {
                    identity: "b-2".into(),
                    expired: false,
                },
            ),
            (
                Some("b-2"),
                at + 15_001,
                Holder::Other {
                    identity: "b-2".into(),
                    expired: true,
                },
            ),
        ];
        for (name, now, want) in table {
            assert_eq!(
                holder(Some(&lease(name, at, 15)), "a-1", now),
                want,
                "{name:?} at {now}"
            );
        }
        assert_eq!(holder(None, "a-1", at), Holder::Nobody, "no Lease at all");
        assert_eq!(
            holder(Some(&Lease::default()), "a-1", at),
            Holder::Nobody,
            "no spec"
        );
    }

    #[test]
    fn nobody_or_an_expired_holder_is_taken_a_live_one_waited_for_ours_renewed() {
        let other = |expired| Holder::Other {
            identity: "b".into(),
            expired,
        };
        let table = [
            (Holder::Us { until_ms: 1 }, Step::Renew),
            (Holder::Nobody, Step::Acquire),
            (other(true), Step::Acquire),
            (other(false), Step::Wait),
        ];
        for (h, want) in table {
            assert_eq!(next_step(&h), want, "{h:?}");
        }
    }
}
