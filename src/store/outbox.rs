//! The record's outbox: writes the backend refuses (PostgreSQL stopped, a full disk) are kept
//! in memory, in order, and replayed when it answers again. Until then reads see them laid over
//! what the backend returns, so a pin written during an outage still pins, and depwatch never
//! takes its own deploy for drift. The queue is bounded; what does not fit is counted and
//! logged, never silently lost.

use std::collections::{HashMap, VecDeque};

use super::{Backend, DeployRecord, ServiceChange, ServiceRecord, StoreError};
use crate::domain::{DeployOutcome, ServiceKey};

/// Writes kept at most; beyond this a write is dropped (and counted).
pub const CAPACITY: usize = 100_000;

/// Deploy rows whose local id is remembered once written.
const MAPPED: usize = 65_536;

/// One write to the record.
#[derive(Debug, Clone)]
pub enum Write {
    Service {
        key: ServiceKey,
        change: ServiceChange,
        at: String,
    },
    /// A deploy row; `local` is the id handed out while it waits (negative).
    Start {
        local: i64,
        record: DeployRecord,
    },
    Finish {
        id: i64,
        outcome: DeployOutcome,
        message: String,
        at: String,
    },
    Restore {
        id: i64,
        restore: String,
        /// Why the rollout failed: the row's message until it is finished.
        why: String,
    },
    Bake {
        id: i64,
        bake: String,
    },
}

/// The queue and what replaying it learns.
#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<Write>,
    /// Local ids of deploy rows written since, with the backend's ids (the newest
    /// [`MAPPED`], oldest first in `mapped`).
    ids: HashMap<i64, i64>,
    mapped: VecDeque<i64>,
    next_local: i64,
    /// Why the backend refused the last write.
    pub error: Option<String>,
    pub dropped: u64,
    /// Writes ever kept, and ever carried out: a read that saw both unchanged, and nothing
    /// being carried out, saw the backend and the queue at one moment.
    pub kept_total: u64,
    pub written_total: u64,
    /// The oldest write is being carried out (it may be in the backend, and still queued).
    pub carrying: bool,
    /// The number of the last write batch handed to the backend.
    pub batch_seq: u64,
    /// The number of the last batch the backend committed whose writes left the queue.
    pub batch_noted: u64,
    /// The record is known to be away (the writer's last try, or a read, failed): reads do
    /// not wait on it until it answers again.
    pub down: Option<String>,
}

impl Outbox {
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// A local id for a deploy row that waits in the queue.
    pub fn local_id(&mut self) -> i64 {
        self.next_local -= 1;
        self.next_local
    }

    /// Keep `w` for later; `false` (and counted) when the queue is full.
    pub fn keep(&mut self, w: Write) -> bool {
        if self.queue.len() >= CAPACITY {
            self.dropped += 1;
            return false;
        }
        self.queue.push_back(w);
        self.kept_total += 1;
        true
    }

    /// Where the queue stands, for a read to check nothing was carried out meanwhile.
    pub fn mark(&self) -> (u64, bool) {
        (self.written_total, self.carrying)
    }

    /// The backend's id for `id` (a local id once its row is written).
    fn real(&self, id: i64) -> Result<i64, StoreError> {
        if id >= 0 {
            return Ok(id);
        }
        self.ids.get(&id).copied().ok_or(StoreError::RowLost(id))
    }

    /// `w` with its deploy row id made the backend's.
    pub fn resolved(&self, w: &Write) -> Result<Write, StoreError> {
        resolve(w, &self.ids)
    }
}

/// `w` with its deploy row id made the backend's by `ids` (local ids of rows written).
pub fn resolve(w: &Write, ids: &HashMap<i64, i64>) -> Result<Write, StoreError> {
    let real = |id: i64| {
        if id >= 0 {
            Ok(id)
        } else {
            ids.get(&id).copied().ok_or(StoreError::RowLost(id))
        }
    };
    Ok(match w {
        Write::Finish {
            id,
            outcome,
            message,
            at,
        } => Write::Finish {
            id: real(*id)?,
            outcome: *outcome,
            message: message.clone(),
            at: at.clone(),
        },
        Write::Restore { id, restore, why } => Write::Restore {
            id: real(*id)?,
            restore: restore.clone(),
            why: why.clone(),
        },
        Write::Bake { id, bake } => Write::Bake {
            id: real(*id)?,
            bake: bake.clone(),
        },
        other => other.clone(),
    })
}

/// One batch's bookkeeping, apart from its I/O: each write with its deploy row id made the
/// backend's (rows started earlier in the batch included), what each carried out returned,
/// and the writes as carried out.
pub struct Batch {
    pub ids: HashMap<i64, i64>,
    pub done: Vec<Option<i64>>,
    pub resolved: Vec<Write>,
}

impl Batch {
    pub fn new(ids: HashMap<i64, i64>, size: usize) -> Batch {
        Batch {
            ids,
            done: Vec::with_capacity(size),
            resolved: Vec::with_capacity(size),
        }
    }

    /// `w` ready to carry out; `None` when the batch ends before it (it names a row never
    /// written), `RowLost` when that is the batch's first write (so it is dropped).
    pub fn next(&self, w: &Write) -> Result<Option<Write>, StoreError> {
        match resolve(w, &self.ids) {
            Ok(r) => Ok(Some(r)),
            Err(e) if self.done.is_empty() => Err(e),
            Err(_) => Ok(None),
        }
    }

    /// `w`, resolved as `r`, was carried out and answered `id`.
    pub fn carried(&mut self, w: &Write, r: Write, id: Option<i64>) {
        if let (Write::Start { local, .. }, Some(id)) = (w, id) {
            self.ids.insert(*local, id);
        }
        self.done.push(id);
        self.resolved.push(r);
    }
}

/// Carry out one write whose ids are the backend's; a deploy row's id when it starts one.
pub async fn carry_out(backend: &dyn Backend, w: &Write) -> Result<Option<i64>, StoreError> {
    {
        match w {
            Write::Service { key, change, at } => {
                backend.change_service(key, change, at).await?;
                Ok(None)
            }
            Write::Start { record, .. } => Ok(Some(backend.start_deploy(record).await?)),
            Write::Finish {
                id,
                outcome,
                message,
                at,
            } => {
                backend.finish_deploy(*id, *outcome, message, at).await?;
                Ok(None)
            }
            Write::Restore { id, restore, why } => {
                backend.set_restore(*id, restore, why).await?;
                Ok(None)
            }
            Write::Bake { id, bake } => {
                backend.set_bake(*id, bake).await?;
                Ok(None)
            }
        }
    }
}

impl Outbox {
    /// The oldest write names a deploy row that was never written (its start was lost): it
    /// can never be carried out, so it is dropped (and counted) rather than hold up the rest.
    pub fn drop_lost(&mut self) {
        self.queue.pop_front();
        self.written_total += 1;
        self.carrying = false;
        self.dropped += 1;
    }

    /// The oldest `n` waiting writes as kept, with the deploy row ids known so far (so they
    /// can be carried out without holding the queue; see [`resolve`]).
    pub fn front(&self, n: usize) -> (Vec<Write>, HashMap<i64, i64>) {
        let batch: Vec<Write> = self.queue.iter().take(n).cloned().collect();
        let ids = if batch.is_empty() {
            HashMap::new()
        } else {
            self.ids.clone()
        };
        (batch, ids)
    }

    /// The oldest waiting write was carried out (`id`: the row it started).
    pub fn written(&mut self, id: Option<i64>) {
        if let (Some(Write::Start { local, .. }), Some(id)) = (self.queue.pop_front(), id) {
            if local < 0 {
                self.ids.insert(local, id);
                self.mapped.push_back(local);
                // A row is written to for as long as its deploy lasts, and the same row may
                // be finished by a newer deploy: the newest ids are kept, far more than can be
                // under way at once.
                while self.mapped.len() > MAPPED {
                    if let Some(old) = self.mapped.pop_front() {
                        self.ids.remove(&old);
                    }
                }
            }
        }
        self.written_total += 1;
        self.carrying = false;
        if self.queue.is_empty() {
            self.error = None;
        }
    }

    /// The changes to `key` still waiting, oldest first.
    pub fn changes_of(&self, key: &ServiceKey) -> Vec<ServiceChange> {
        self.queue
            .iter()
            .filter_map(|w| match w {
                Write::Service { key: k, change, .. } if k == key => Some(change.clone()),
                _ => None,
            })
            .collect()
    }

    /// `row` (or a new one, when the backend has none) with the waiting changes laid over it;
    /// `None` when neither exists.
    pub fn overlay(&self, key: &ServiceKey, row: Option<ServiceRecord>) -> Option<ServiceRecord> {
        let changes = self.changes_of(key);
        if changes.is_empty() {
            return row;
        }
        let mut row = row.unwrap_or_else(|| ServiceRecord {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            ..ServiceRecord::default()
        });
        for c in &changes {
            c.apply(&mut row);
        }
        Some(row)
    }

    /// The services the waiting writes change, each once, in key order.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        let keys: std::collections::BTreeSet<(String, String)> = self
            .queue
            .iter()
            .filter_map(|w| match w {
                Write::Service { key, .. } => Some((key.namespace.clone(), key.name.clone())),
                _ => None,
            })
            .collect();
        keys.into_iter()
            .map(|(namespace, name)| ServiceKey { name, namespace })
            .collect()
    }

    /// Every row with the waiting changes laid over it, new rows included.
    pub fn overlay_all(&self, rows: Vec<ServiceRecord>) -> Vec<ServiceRecord> {
        let mut by_key: std::collections::BTreeMap<(String, String), ServiceRecord> = rows
            .into_iter()
            .map(|r| ((r.namespace.clone(), r.name.clone()), r))
            .collect();
        for w in &self.queue {
            if let Write::Service { key, change, .. } = w {
                let row = by_key
                    .entry((key.namespace.clone(), key.name.clone()))
                    .or_insert_with(|| ServiceRecord {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        ..ServiceRecord::default()
                    });
                change.apply(row);
            }
        }
        by_key.into_values().collect()
    }

    /// A finish of deploy row `id` waits.
    pub fn finishes(&self, id: i64) -> bool {
        self.queue
            .iter()
            .any(|w| matches!(w, Write::Finish { id: i, .. } if self.real(*i).ok() == Some(id)))
    }

    /// A deploy of `key` started while the backend was away and not finished since.
    pub fn unfinished_of(&self, key: &ServiceKey) -> Option<DeployRecord> {
        let mut open: Option<DeployRecord> = None;
        for w in &self.queue {
            match w {
                Write::Start { local, record } if record.key() == *key => {
                    open = Some(DeployRecord {
                        id: *local,
                        ..record.clone()
                    })
                }
                Write::Finish { id, .. } if open.as_ref().is_some_and(|d| d.id == *id) => {
                    open = None
                }
                Write::Restore { id, restore, why } => {
                    if let Some(d) = open.as_mut().filter(|d| d.id == *id) {
                        d.restore = restore.clone();
                        d.message = why.clone();
                    }
                }
                Write::Bake { id, bake } => {
                    if let Some(d) = open.as_mut().filter(|d| d.id == *id) {
                        d.bake = crate::domain::verify::BakeRow::from_text(bake);
                    }
                }
                _ => {}
            }
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Images, ServiceStatus};

    fn key() -> ServiceKey {
        ServiceKey::new("web", "prod").expect("key")
    }

    #[test]
    fn waiting_changes_are_laid_over_reads_in_order() {
        let mut o = Outbox::default();
        let k = key();
        assert_eq!(o.overlay(&k, None), None);
        o.keep(Write::Service {
            key: k.clone(),
            change: ServiceChange::default()
                .status(ServiceStatus::Deploying)
                .desired(Images::parse("web=w:2")),
            at: "t1".into(),
        });
        o.keep(Write::Service {
            key: k.clone(),
            change: ServiceChange::default()
                .content_hash("h2")
                .failed_hash("h2"),
            at: "t2".into(),
        });
        let row = ServiceRecord {
            namespace: "prod".into(),
            name: "web".into(),
            suspended: true,
            status: ServiceStatus::Succeeded,
            ..ServiceRecord::default()
        };
        let seen = o.overlay(&k, Some(row)).expect("row");
        assert_eq!(seen.status, ServiceStatus::Deploying);
        assert!(seen.pinned().is_some(), "a pin kept in memory still pins");
        assert!(seen.suspended, "fields the changes do not name stay");
        let all = o.overlay_all(Vec::new());
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].failed_hash, "h2");
    }

    #[test]
    fn a_deploy_started_while_away_is_unfinished_until_its_finish_is_kept() {
        let mut o = Outbox::default();
        let local = o.local_id();
        assert!(local < 0);
        o.keep(Write::Start {
            local,
            record: DeployRecord {
                namespace: "prod".into(),
                name: "web".into(),
                ..DeployRecord::default()
            },
        });
        o.keep(Write::Restore {
            id: local,
            restore: "web=w:1".into(),
            why: "CrashLoopBackOff".into(),
        });
        let open = o.unfinished_of(&key()).expect("open");
        assert_eq!((open.id, open.restore.as_str()), (local, "web=w:1"));
        o.keep(Write::Finish {
            id: local,
            outcome: DeployOutcome::RolledBack,
            message: String::new(),
            at: "t".into(),
        });
        assert!(o.unfinished_of(&key()).is_none());
    }

    #[test]
    fn a_full_queue_counts_what_it_drops() {
        let mut o = Outbox::default();
        for _ in 0..CAPACITY {
            assert!(o.keep(Write::Restore {
                id: 1,
                restore: String::new(),
                why: String::new(),
            }));
        }
        assert!(!o.keep(Write::Restore {
            id: 1,
            restore: String::new(),
            why: String::new(),
        }));
        assert_eq!((o.len(), o.dropped), (CAPACITY, 1));
    }
}
