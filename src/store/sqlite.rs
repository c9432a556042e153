//! The embedded SQLite backend: the record in `depwatch.db` in the state directory (WAL
//! mode). One connection, owned by a thread of its own that carries out each call in turn;
//! async callers hand it a call and wait for the answer without blocking a runtime worker.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use super::change::{self, ServiceChange};
use super::outbox;
use super::page::{self, ServicesQuery};
use super::{
    Backend, DeployRecord, RefusedFile, RequestRecord, ServiceRecord, StoreError, DEPLOY_COLUMNS,
    REQUEST_COLUMNS, SERVICE_COLUMNS,
};
use crate::domain::approval::Vote;
use crate::domain::{DeployOutcome, ServiceKey};

/// The tables. Each `services` column has one owner, and only the owner's module builds a
/// [`ServiceChange`] that sets it (`tests/layering.rs` checks it; see ARCHITECTURE.md):
///
/// | column | owner (built in) |
/// |---|---|
/// | `requested`, `requested_hash`, `path` | ingest (`pipeline/ingest/`), when a file is read |
/// | `status`, `message`, `desired`, `deployed`, `last_good`, `kind`, `content_hash`, `failed_hash`, `bake_ends_at` | the recorder (`pipeline/deploy/recorder/`, and `pipeline/deploy/recorder/verdict.rs` for the changes ingest and operator commands send: a refused or removed file, a seed imported, a retry, a note) |
/// | `suspended`, `judged` | operator commands (`operator.rs`) |
///
/// A retry lifts only the pin it saw (`failed_hash` is cleared while it still names that
/// version), so a pin the recorder makes meanwhile stays. `deploys` rows are the recorder's
/// alone; `requests` the API's; `refused_files` ingest's. `approvals` rows are appended, never
/// changed: a request or its rejection's mark by ingest, an approver's word by operator
/// commands (`operator.rs`).
const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS services (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL DEFAULT '',
    content_hash TEXT NOT NULL DEFAULT '',
    desired TEXT NOT NULL DEFAULT '',
    deployed TEXT NOT NULL DEFAULT '',
    last_good TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL DEFAULT '',
    failed_hash TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL DEFAULT '',
    suspended INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS deploys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    trigger TEXT NOT NULL,
    actor TEXT NOT NULL,
    from_image TEXT NOT NULL,
    to_image TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT,
    outcome TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    restore TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS deploys_by_service ON deploys (namespace, name, id);
CREATE TABLE IF NOT EXISTS refused_files (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS approvals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL,
    images TEXT NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT NOT NULL,
    comment TEXT NOT NULL,
    at TEXT NOT NULL,
    digests TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS approvals_by_service ON approvals (namespace, name, id);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    body_hash TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    content TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at TEXT NOT NULL
);
";

fn service_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ServiceRecord> {
    Ok(ServiceRecord {
        namespace: r.get(0)?,
        name: r.get(1)?,
        path: r.get(2)?,
        content_hash: r.get(3)?,
        desired: r.get(4)?,
        deployed: r.get(5)?,
        last_good: r.get(6)?,
        status: r.get(7)?,
        failed_hash: r.get(8)?,
        message: r.get(9)?,
        updated_at: r.get(10)?,
        suspended: r.get::<_, i64>(11)? != 0,
        kind: r.get(12)?,
        requested: r.get(13)?,
        requested_hash: r.get(14)?,
        judged: crate::domain::verify::Judgement::from_text(&r.get::<_, String>(15)?),
        bake_ends_at: r.get(16)?,
    })
}

fn request_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RequestRecord> {
    Ok(RequestRecord {
        id: r.get(0)?,
        idempotency_key: r.get(1)?,
        body_hash: r.get(2)?,
        namespace: r.get(3)?,
        name: r.get(4)?,
        content: r.get(5)?,
        actor: r.get(6)?,
        created_at: r.get(7)?,
    })
}

fn deploy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeployRecord> {
    Ok(DeployRecord {
        id: r.get(0)?,
        namespace: r.get(1)?,
        name: r.get(2)?,
        trigger: r.get(3)?,
        actor: r.get(4)?,
        from_image: r.get(5)?,
        to_image: r.get(6)?,
        started_at: r.get(7)?,
        ended_at: r.get(8)?,
        outcome: r.get(9)?,
        message: r.get(10)?,
        request_id: r.get(11)?,
        restore: r.get(12)?,
        digests: r.get(13)?,
        content_hash: r.get(14)?,
        kind: r.get(15)?,
        bake: crate::domain::verify::BakeRow::from_text(&r.get::<_, String>(16)?),
    })
}

/// Columns added after the first schema, each with its definition: added to an older database
/// when the daemon opens it.
const SQLITE_ADDED: &[(&str, &str, &str)] = &[
    ("deploys", "restore", "TEXT NOT NULL DEFAULT ''"),
    ("services", "kind", "TEXT NOT NULL DEFAULT ''"),
    ("deploys", "digests", "TEXT NOT NULL DEFAULT ''"),
    ("deploys", "content_hash", "TEXT NOT NULL DEFAULT ''"),
    ("deploys", "kind", "TEXT NOT NULL DEFAULT ''"),
    ("services", "requested", "TEXT NOT NULL DEFAULT ''"),
    ("services", "requested_hash", "TEXT NOT NULL DEFAULT ''"),
    ("deploys", "bake", "TEXT NOT NULL DEFAULT ''"),
    ("services", "judged", "TEXT NOT NULL DEFAULT ''"),
    ("services", "bake_ends_at", "TEXT NOT NULL DEFAULT ''"),
];

/// Create the tables, and add the columns an older database lacks.
/// Two processes opening the record at once (a daemon starting while a command or a test
/// reads it) add each column once: the look and the change are one write transaction.
pub(super) fn schema(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let added = add_columns(conn);
    match added {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            // The open fails with the first error; the rollback's own is of no more use.
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn add_columns(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, definition) in SQLITE_ADDED {
        let present: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
            params![column],
            |r| r.get(0),
        )?;
        if present == 0 {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    Ok(())
}

/// The connection, owned by the record's SQLite thread: what each call does there; and the
/// sequence number of the last write batch it committed.
struct Conn(Connection, std::cell::Cell<u64>);

impl Conn {
    fn conn(&self) -> &Connection {
        &self.0
    }

    fn ping(&self) -> Result<(), StoreError> {
        let _: i64 = self.conn().query_row("SELECT 1", [], |r| r.get(0))?;
        Ok(())
    }

    /// The writes of `batch` as one transaction, in one visit to the thread.
    fn write_batch(
        &self,
        batch: &[outbox::Write],
        ids: HashMap<i64, i64>,
    ) -> Result<outbox::Batch, StoreError> {
        let conn = self.conn();
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut run = outbox::Batch::new(ids, batch.len());
        let mut carry = || -> Result<(), StoreError> {
            for w in batch {
                let Some(r) = run.next(w)? else { break };
                let id = self.carry_out(&r)?;
                run.carried(w, r, id);
            }
            Ok(conn.execute_batch("COMMIT")?)
        };
        if let Err(e) = carry() {
            // Nothing to do about a failed rollback: the connection ends the transaction anyway.
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        Ok(run)
    }

    /// One write whose ids are the backend's; a deploy row's id when it starts one.
    fn carry_out(&self, w: &outbox::Write) -> Result<Option<i64>, StoreError> {
        use outbox::Write;
        match w {
            Write::Service { key, change, at } => {
                self.change_service(key, change, at).map(|_| None)
            }
            Write::Start { record, .. } => self.start_deploy(record).map(Some),
            Write::Finish {
                id,
                outcome,
                message,
                at,
            } => self.finish_deploy(*id, *outcome, message, at).map(|_| None),
            Write::Bake { id, bake } => self.set_bake(*id, bake).map(|_| None),
            Write::Restore { id, restore, why } => {
                self.set_restore(*id, restore, why).map(|_| None)
            }
        }
    }

    fn put_request(&self, r: &RequestRecord) -> Result<RequestRecord, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT OR IGNORE INTO requests (id, idempotency_key, body_hash, namespace, name, content, actor, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![r.id, r.idempotency_key, r.body_hash, r.namespace, r.name, r.content, r.actor, r.created_at],
        )?;
        Ok(conn.query_row(
            &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE idempotency_key = ?1"),
            params![r.idempotency_key],
            request_row,
        )?)
    }

    fn request_by_key(&self, idempotency_key: &str) -> Result<Option<RequestRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE idempotency_key = ?1"),
                params![idempotency_key],
                request_row,
            )
            .optional()?)
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?1"),
                params![id],
                request_row,
            )
            .optional()?)
    }

    fn deploy_for_request(&self, id: &str) -> Result<Option<DeployRecord>, StoreError> {
        let sql = format!(
            "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE request_id = ?1 ORDER BY id DESC LIMIT 1"
        );
        Ok(self
            .conn()
            .query_row(&sql, params![id], deploy_row)
            .optional()?)
    }

    fn service(&self, key: &ServiceKey) -> Result<Option<ServiceRecord>, StoreError> {
        let sql =
            format!("SELECT {SERVICE_COLUMNS} FROM services WHERE namespace = ?1 AND name = ?2");
        // Cached: a rescan of 10,000 files asks this 10,000 times.
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        Ok(stmt
            .query_row(params![key.namespace, key.name], service_row)
            .optional()?)
    }

    fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        let sql = format!("SELECT {SERVICE_COLUMNS} FROM services ORDER BY namespace, name");
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([], service_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn services_page(&self, q: &ServicesQuery) -> Result<(Vec<ServiceRecord>, usize), StoreError> {
        let sql = page::services_sql(q, |n| format!("?{n}"));
        let conn = self.conn();
        let total: i64 = conn.query_row(
            &sql.count,
            rusqlite::params_from_iter(sqlite_values(sql.count_values)),
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(&sql.rows)?;
        let rows = stmt.query_map(
            rusqlite::params_from_iter(sqlite_values(sql.rows_values)),
            service_row,
        )?;
        Ok((rows.collect::<Result<_, _>>()?, total as usize))
    }

    fn change_service(
        &self,
        key: &ServiceKey,
        change: &ServiceChange,
        updated_at: &str,
    ) -> Result<(), StoreError> {
        let st = change.statement(&key.namespace, &key.name, updated_at, |n| format!("?{n}"));
        let conn = self.conn();
        conn.prepare_cached(&st.sql)?
            .execute(rusqlite::params_from_iter(sqlite_values(st.values)))?;
        Ok(())
    }

    fn start_deploy(&self, d: &DeployRecord) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO deploys (namespace, name, trigger, actor, from_image, to_image, started_at, ended_at, outcome, message, request_id, digests, content_hash, kind)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![d.namespace, d.name, d.trigger, d.actor, d.from_image, d.to_image, d.started_at, d.outcome, d.message, d.request_id, d.digests, d.content_hash, d.kind],
        )?;
        Ok(conn.last_insert_rowid())
    }

    fn add_vote(&self, key: &ServiceKey, v: &Vote) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO approvals (namespace, name, hash, images, kind, actor, comment, at, digests)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                key.namespace,
                key.name,
                v.hash,
                v.images,
                v.kind,
                v.actor,
                v.comment,
                v.at,
                v.digests
            ],
        )?;
        Ok(())
    }

    fn votes(&self, key: &ServiceKey, limit: usize) -> Result<Vec<Vote>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(
            "SELECT hash, images, kind, actor, comment, at, digests FROM approvals
             WHERE namespace = ?1 AND name = ?2 ORDER BY id DESC LIMIT ?3",
        )?;
        let rows = stmt.query_map(params![key.namespace, key.name, limit as i64], |r| {
            Ok(Vote {
                hash: r.get(0)?,
                images: r.get(1)?,
                kind: r.get(2)?,
                actor: r.get(3)?,
                comment: r.get(4)?,
                at: r.get(5)?,
                digests: r.get(6)?,
            })
        })?;
        let mut votes: Vec<Vote> = rows.collect::<Result<_, _>>()?;
        votes.reverse();
        Ok(votes)
    }

    fn refuse_file(&self, f: &RefusedFile) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO refused_files (path, reason, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (path) DO UPDATE SET reason = excluded.reason",
            params![f.path, f.reason, f.seen_at],
        )?;
        Ok(())
    }

    fn unrefuse_file(&self, path: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM refused_files WHERE path = ?1", params![path])?;
        Ok(())
    }

    fn refused_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<RefusedFile>, usize), StoreError> {
        let conn = self.conn();
        let total: i64 = conn.query_row("SELECT COUNT(*) FROM refused_files", [], |r| r.get(0))?;
        let mut stmt = conn.prepare(
            "SELECT path, reason, seen_at FROM refused_files WHERE path > ?1 ORDER BY path LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![after, limit as i64], |r| {
            Ok(RefusedFile {
                path: r.get(0)?,
                reason: r.get(1)?,
                seen_at: r.get(2)?,
            })
        })?;
        Ok((rows.collect::<Result<_, _>>()?, total as usize))
    }

    fn refused_files(&self) -> Result<Vec<RefusedFile>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT path, reason, seen_at FROM refused_files ORDER BY path")?;
        let rows = stmt.query_map([], |r| {
            Ok(RefusedFile {
                path: r.get(0)?,
                reason: r.get(1)?,
                seen_at: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn forget_service(&self, key: &ServiceKey) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM services WHERE namespace = ?1 AND name = ?2",
            params![key.namespace, key.name],
        )?;
        Ok(n > 0)
    }

    fn set_bake(&self, id: i64, bake: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE deploys SET bake = ?2 WHERE id = ?1",
            params![id, bake],
        )?;
        Ok(())
    }

    fn set_restore(&self, id: i64, restore: &str, why: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE deploys SET restore = ?2, message = ?3 WHERE id = ?1",
            params![id, restore, why],
        )?;
        Ok(())
    }

    fn finish_deploy(
        &self,
        id: i64,
        outcome: DeployOutcome,
        message: &str,
        ended_at: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE deploys SET ended_at = ?2, outcome = ?3, message = ?4 WHERE id = ?1",
            params![id, ended_at, outcome, message],
        )?;
        Ok(())
    }

    fn history(
        &self,
        key: Option<&ServiceKey>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError> {
        let conn = self.conn();
        let before = before.unwrap_or(i64::MAX);
        let rows = match key {
            Some(k) => {
                let sql = format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE namespace = ?1 AND name = ?2 AND id < ?3 ORDER BY id DESC LIMIT ?4");
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt.query_map(
                    params![k.namespace, k.name, before, limit as i64],
                    deploy_row,
                )?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let sql = format!(
                    "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE id < ?1 ORDER BY id DESC LIMIT ?2"
                );
                let mut stmt = conn.prepare_cached(&sql)?;
                let rows = stmt.query_map(params![before, limit as i64], deploy_row)?;
                rows.collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows)
    }

    fn open_deploys(&self, key: &ServiceKey) -> Result<Vec<DeployRecord>, StoreError> {
        let sql = format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE namespace = ?1 AND name = ?2 AND outcome = ?3 ORDER BY id DESC LIMIT 16");
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![key.namespace, key.name, DeployOutcome::InProgress],
            deploy_row,
        )?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    fn prune(&self, keep: usize, cutoff: Option<&str>) -> Result<usize, StoreError> {
        let conn = self.conn();
        let mut removed = conn.execute(
            "DELETE FROM deploys WHERE outcome != ?2 AND id IN (
                SELECT id FROM (
                    SELECT id, ROW_NUMBER() OVER (PARTITION BY namespace, name ORDER BY id DESC) AS n FROM deploys
                ) WHERE n > ?1)",
            params![keep as i64, DeployOutcome::InProgress],
        )?;
        if let Some(cutoff) = cutoff {
            removed += conn.execute(
                "DELETE FROM deploys WHERE outcome != ?2 AND started_at < ?1",
                params![cutoff, DeployOutcome::InProgress],
            )?;
            conn.execute("DELETE FROM approvals WHERE at < ?1", params![cutoff])?;
        }
        Ok(removed)
    }

    fn interrupted(&self) -> Result<Vec<DeployRecord>, StoreError> {
        let sql = format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE outcome = ?1 ORDER BY id");
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![DeployOutcome::InProgress], deploy_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Statement values as SQLite takes them (a boolean is an integer).
fn sqlite_values(values: Vec<change::Value>) -> Vec<rusqlite::types::Value> {
    values
        .into_iter()
        .map(|v| match v {
            change::Value::Text(t) => rusqlite::types::Value::Text(t),
            change::Value::Bool(b) => rusqlite::types::Value::Integer(i64::from(b)),
        })
        .collect()
}

/// A connection to the SQLite database at `path`, waiting up to 5 s when it is busy.
pub(super) fn connection(
    path: &Path,
    flags: rusqlite::OpenFlags,
) -> Result<Connection, StoreError> {
    let open_error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_error)?;
    Ok(conn)
}

/// A call for the SQLite thread.
type Job = Box<dyn FnOnce(&Conn) + Send>;

/// The SQLite backend as callers hold it: a way to the thread that owns the connection. When
/// the last holder lets go, the thread ends and the database is closed before the drop
/// returns (a command that only read leaves the file as it found it).
pub(super) struct Sqlite {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            // A thread that panicked has closed the connection already.
            let _ = t.join();
        }
    }
}

impl Sqlite {
    /// Hand `conn` to a thread of its own.
    pub(super) fn start(conn: Connection) -> Result<Sqlite, StoreError> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let conn = Conn(conn, std::cell::Cell::new(0));
        let thread = std::thread::Builder::new()
            .name("depwatch-sqlite".into())
            .spawn(move || {
                for job in queue {
                    job(&conn);
                }
            })
            .map_err(StoreError::Thread)?;
        Ok(Sqlite {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Run `f` on the thread and wait for its answer.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Conn) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |c| {
            // What this call saw: every batch up to the last one committed (calls run one
            // at a time, in order).
            let seen = c.1.get();
            // The caller may have stopped waiting; the answer then goes nowhere.
            let _ = tx.send((f(c), seen));
        });
        let jobs = self.jobs.as_ref().ok_or(StoreError::Stopped)?;
        jobs.send(job).map_err(|_| StoreError::Stopped)?;
        let (answer, seen) = rx.await.map_err(|_| StoreError::Stopped)?;
        super::saw_batch(seen);
        answer
    }
}

#[async_trait::async_trait]
impl Backend for Sqlite {
    fn describe(&self) -> String {
        "sqlite".into()
    }

    fn ordered(&self) -> bool {
        true
    }

    fn local(&self) -> bool {
        true
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(|c| c.ping()).await
    }

    async fn write_batch(
        &self,
        batch: Vec<outbox::Write>,
        ids: HashMap<i64, i64>,
        seq: u64,
    ) -> Result<outbox::Batch, StoreError> {
        self.call(move |c| {
            let done = c.write_batch(&batch, ids)?;
            c.1.set(seq);
            Ok(done)
        })
        .await
    }

    async fn put_request(&self, r: &RequestRecord) -> Result<RequestRecord, StoreError> {
        let r = r.clone();
        self.call(move |c| c.put_request(&r)).await
    }

    async fn request_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let k = idempotency_key.to_string();
        self.call(move |c| c.request_by_key(&k)).await
    }

    async fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |c| c.request(&id)).await
    }

    async fn deploy_for_request(&self, id: &str) -> Result<Option<DeployRecord>, StoreError> {
        let id = id.to_string();
        self.call(move |c| c.deploy_for_request(&id)).await
    }

    async fn service(&self, key: &ServiceKey) -> Result<Option<ServiceRecord>, StoreError> {
        let key = key.clone();
        self.call(move |c| c.service(&key)).await
    }

    async fn services_of(
        &self,
        keys: &[ServiceKey],
    ) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        let keys = keys.to_vec();
        self.call(move |c| keys.iter().map(|k| c.service(k)).collect())
            .await
    }

    async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.call(|c| c.services()).await
    }

    async fn services_page(
        &self,
        q: &ServicesQuery,
    ) -> Result<(Vec<ServiceRecord>, usize), StoreError> {
        let q = q.clone();
        self.call(move |c| c.services_page(&q)).await
    }

    async fn change_service(
        &self,
        key: &ServiceKey,
        change: &ServiceChange,
        updated_at: &str,
    ) -> Result<(), StoreError> {
        let (key, change, at) = (key.clone(), change.clone(), updated_at.to_string());
        self.call(move |c| c.change_service(&key, &change, &at))
            .await
    }

    async fn start_deploy(&self, d: &DeployRecord) -> Result<i64, StoreError> {
        let d = d.clone();
        self.call(move |c| c.start_deploy(&d)).await
    }

    async fn set_bake(&self, id: i64, bake: &str) -> Result<(), StoreError> {
        let bake = bake.to_string();
        self.call(move |c| c.set_bake(id, &bake)).await
    }

    async fn set_restore(&self, id: i64, restore: &str, why: &str) -> Result<(), StoreError> {
        let (restore, why) = (restore.to_string(), why.to_string());
        self.call(move |c| c.set_restore(id, &restore, &why)).await
    }

    async fn forget_service(&self, key: &ServiceKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.call(move |c| c.forget_service(&key)).await
    }

    async fn add_vote(&self, key: &ServiceKey, v: &Vote) -> Result<(), StoreError> {
        let (key, v) = (key.clone(), v.clone());
        self.call(move |c| c.add_vote(&key, &v)).await
    }

    async fn votes(&self, key: &ServiceKey, limit: usize) -> Result<Vec<Vote>, StoreError> {
        let key = key.clone();
        self.call(move |c| c.votes(&key, limit)).await
    }

    async fn refuse_file(&self, f: &RefusedFile) -> Result<(), StoreError> {
        let f = f.clone();
        self.call(move |c| c.refuse_file(&f)).await
    }

    async fn unrefuse_file(&self, path: &str) -> Result<(), StoreError> {
        let path = path.to_string();
        self.call(move |c| c.unrefuse_file(&path)).await
    }

    async fn refused_files(&self) -> Result<Vec<RefusedFile>, StoreError> {
        self.call(|c| c.refused_files()).await
    }

    async fn refused_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<RefusedFile>, usize), StoreError> {
        let after = after.to_string();
        self.call(move |c| c.refused_page(&after, limit)).await
    }

    async fn finish_deploy(
        &self,
        id: i64,
        outcome: DeployOutcome,
        message: &str,
        ended_at: &str,
    ) -> Result<(), StoreError> {
        let (message, ended_at) = (message.to_string(), ended_at.to_string());
        self.call(move |c| c.finish_deploy(id, outcome, &message, &ended_at))
            .await
    }

    async fn history(
        &self,
        key: Option<&ServiceKey>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError> {
        let key = key.cloned();
        self.call(move |c| c.history(key.as_ref(), before, limit))
            .await
    }

    async fn open_deploys(&self, key: &ServiceKey) -> Result<Vec<DeployRecord>, StoreError> {
        let key = key.clone();
        self.call(move |c| c.open_deploys(&key)).await
    }

    async fn deploy_basis(
        &self,
        key: &ServiceKey,
    ) -> Result<(Option<ServiceRecord>, Vec<DeployRecord>), StoreError> {
        let key = key.clone();
        self.call(move |c| Ok((c.service(&key)?, c.open_deploys(&key)?)))
            .await
    }

    async fn prune(&self, keep: usize, cutoff: Option<&str>) -> Result<usize, StoreError> {
        let cutoff = cutoff.map(str::to_string);
        self.call(move |c| c.prune(keep, cutoff.as_deref())).await
    }

    async fn interrupted(&self) -> Result<Vec<DeployRecord>, StoreError> {
        self.call(|c| c.interrupted()).await
    }
}
