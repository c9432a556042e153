//! Fencing: a replica writes to the cluster and to the record only while it holds a valid
//! Lease. The leader keeps the Lease's expiry here (its renew time plus its duration, less a
//! margin); every PATCH and every record write checks it against the clock first. A replica
//! frozen past its Lease (SIGSTOP, a long GC-like pause, a suspended VM) therefore refuses its
//! very first write after it wakes, before any task has learned that the Lease is gone.
//! Losing the Lease also cancels [`Fence::lost`], which stops every deploy at once.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Whether writes are allowed. Cheap to clone; the default allows every write (one replica,
/// no Lease).
#[derive(Clone, Default)]
pub struct Fence(Option<Arc<Leased>>);

struct Leased {
    /// Unix milliseconds after which the Lease may be someone else's.
    valid_until_ms: AtomicI64,
    lost: CancellationToken,
    /// A refusal has been logged (once is enough to tell the story).
    said: AtomicBool,
}

/// A write refused because this replica does not hold a valid Lease.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "refused {what}: this replica no longer holds a valid Lease (another replica may be acting)"
)]
pub struct Fenced {
    pub what: String,
}

/// Writes are allowed at `now_ms` when the Lease is not lost and not past its expiry.
pub fn allows(now_ms: i64, valid_until_ms: i64, lost: bool) -> bool {
    !lost && now_ms < valid_until_ms
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

impl Fence {
    /// Every write allowed: a single replica without leader election.
    pub fn open() -> Fence {
        Fence(None)
    }

    /// Writes allowed only while a Lease is held; closed until [`Fence::renewed_until`].
    pub fn leased() -> Fence {
        Fence(Some(Arc::new(Leased {
            valid_until_ms: AtomicI64::new(0),
            lost: CancellationToken::new(),
            said: AtomicBool::new(false),
        })))
    }

    /// The Lease is held until `until_ms` (Unix milliseconds, margin already taken off). Only
    /// ever extends: a read that left before the latest renewal landed must not shorten it.
    pub fn renewed_until(&self, until_ms: i64) {
        if let Some(l) = &self.0 {
            if l.lost.is_cancelled() {
                return;
            }
            l.valid_until_ms.fetch_max(until_ms, Ordering::SeqCst);
        }
    }

    /// The Lease is gone: every write is refused from now on and in-flight work is cancelled.
    pub fn lose(&self) {
        if let Some(l) = &self.0 {
            l.lost.cancel();
            l.valid_until_ms.store(0, Ordering::SeqCst);
        }
    }

    /// Cancelled when the Lease is lost (never, without leader election).
    pub fn lost(&self) -> CancellationToken {
        match &self.0 {
            Some(l) => l.lost.clone(),
            None => CancellationToken::new(),
        }
    }

    /// May this replica write now? `what` names the write for the refusal, which is logged
    /// once per replica (every later refusal at debug level).
    pub fn check(&self, what: &str) -> Result<(), Fenced> {
        let Some(l) = &self.0 else {
            return Ok(());
        };
        let until = l.valid_until_ms.load(Ordering::SeqCst);
        if allows(now_ms(), until, l.lost.is_cancelled()) {
            return Ok(());
        }
        if until == 0 && !l.lost.is_cancelled() {
            // Not leading yet (a standby): refused, and nothing to stop.
            tracing::debug!(write = what, "write refused: this replica does not lead");
            return Err(Fenced {
                what: what.to_string(),
            });
        }
        if !l.said.swap(true, Ordering::SeqCst) {
            tracing::error!(
                write = what,
                "write refused: this replica no longer holds a valid Lease; it writes nothing more to the cluster or the record"
            );
        } else {
            tracing::debug!(write = what, "write refused: no valid Lease");
        }
        // Past the expiry is as good as lost: stop everything, not only this write.
        l.lost.cancel();
        Err(Fenced {
            what: what.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_allowed_only_before_the_expiry_and_never_after_a_loss() {
        let table = [
            (1_000, 2_000, false, true),
            (2_000, 2_000, false, false),
            (3_000, 2_000, false, false),
            (1_000, 2_000, true, false),
            (1_000, 0, false, false),
        ];
        for (now, until, lost, want) in table {
            assert_eq!(allows(now, until, lost), want, "{now} {until} {lost}");
        }
    }

    #[test]
    fn an_open_fence_allows_and_a_lost_one_refuses_and_cancels() {
        assert!(Fence::open().check("a patch").is_ok());
        let f = Fence::leased();
        assert!(f.check("a patch").is_err(), "closed until renewed");
        f.renewed_until(now_ms() + 60_000);
        assert!(f.check("a patch").is_ok());
        assert!(!f.lost().is_cancelled());
        f.renewed_until(now_ms() - 1);
        assert!(f.check("a patch").is_ok(), "a stale read never shortens it");
        let f = Fence::leased();
        f.renewed_until(now_ms() - 1);
        let e = f.check("a patch").expect_err("expired");
        assert!(e.to_string().contains("a patch"), "{e}");
        assert!(f.lost().is_cancelled(), "an expired Lease stops everything");
        let g = Fence::leased();
        g.renewed_until(now_ms() + 60_000);
        g.lose();
        assert!(g.check("a record write").is_err());
    }
}
