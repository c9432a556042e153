//! The PostgreSQL backend (`--database-url`): one record shared by replicas, through a pooled
//! async client (tokio-postgres with a deadpool pool) on the daemon's own runtime: a query
//! waits without holding a worker. Migrations run at connect, each once, in a transaction.

use std::future::Future;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::Row;

use super::change::{ServiceChange, Value};
use super::{
    Backend, DeployRecord, RefusedFile, RequestRecord, ServiceRecord, StoreError, DEPLOY_COLUMNS,
    REQUEST_COLUMNS, SERVICE_COLUMNS,
};
use crate::domain::approval::Vote;
use crate::domain::{DeployOutcome, Images, ServiceKey};

/// Schema versions in order; each runs once.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE services (
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
    suspended BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE deploys (
    id BIGSERIAL PRIMARY KEY,
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
    request_id TEXT NOT NULL DEFAULT ''
);
CREATE INDEX deploys_by_service ON deploys (namespace, name, id);
CREATE INDEX deploys_by_outcome ON deploys (outcome);
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    body_hash TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    content TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at TEXT NOT NULL
);
",
    "
ALTER TABLE deploys ADD COLUMN restore TEXT NOT NULL DEFAULT '';
",
    "
CREATE TABLE refused_files (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
",
    "
ALTER TABLE services ADD COLUMN kind TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE deploys ADD COLUMN digests TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE deploys ADD COLUMN content_hash TEXT NOT NULL DEFAULT '';
ALTER TABLE deploys ADD COLUMN kind TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE services ADD COLUMN requested TEXT NOT NULL DEFAULT '';
ALTER TABLE services ADD COLUMN requested_hash TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE deploys ADD COLUMN bake TEXT NOT NULL DEFAULT '';
",
    "
ALTER TABLE services ADD COLUMN judged TEXT NOT NULL DEFAULT '';
ALTER TABLE services ADD COLUMN bake_ends_at TEXT NOT NULL DEFAULT '';
",
    "
CREATE TABLE approvals (
    id BIGSERIAL PRIMARY KEY,
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
CREATE INDEX approvals_by_service ON approvals (namespace, name, id);
",
];

/// How long one call to the record may take before it counts as a failure.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct Postgres {
    /// How the connections are protected, for the start-up line.
    tls: &'static str,
    pool: Pool,
}

/// An error with its causes (a TLS failure's reason is a cause); never the URL.
fn pg_error(e: impl std::error::Error) -> StoreError {
    StoreError::Postgres(crate::domain::error_chain(&e))
}

impl Postgres {
    /// Connect and bring the schema up to date (the daemon and commands that write).
    pub async fn connect(url: &str) -> Result<Postgres, StoreError> {
        let pg = Postgres::connect_only(url)?;
        pg.migrate().await?;
        Ok(pg)
    }

    /// Connect without touching the schema: commands that only read never migrate a shared
    /// record behind the daemons' backs.
    pub fn connect_only(url: &str) -> Result<Postgres, StoreError> {
        let (url, tls) = super::pgtls::split(url).map_err(StoreError::Postgres)?;
        let connector = super::pgtls::connector(&tls).map_err(StoreError::Postgres)?;
        // The error never repeats the URL: it may hold a password.
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Postgres(format!(
                "--database-url is not a PostgreSQL URL ({e}); expected postgres://user:password@host:5432/database"
            ))
        })?;
        config.ssl_mode(tls.mode);
        // A record that does not answer is an outage (writes are kept, reads wait), not a
        // hang: give up on a connection attempt after a few seconds unless the URL says.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(5));
        }
        let manager = Manager::from_config(
            config,
            connector,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        // Connections are made when first needed, on the runtime of whoever asks.
        let pool = Pool::builder(manager)
            .max_size(8)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(pg_error)?;
        let pg = Postgres {
            pool,
            tls: tls.describe(),
        };
        Ok(pg)
    }

    /// Run `f` with a pooled client. A record cut off mid-conversation (a partition) answers
    /// nothing, ever: each call gives up after a while, like a connection attempt, so the
    /// writer can say the record is away and callers stop waiting on it.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let call = async {
            let client = self.pool.get().await.map_err(pg_error)?;
            f(client).await.map_err(pg_error)
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Postgres(format!(
                    "no answer within {}s",
                    CALL_TIMEOUT.as_secs()
                )))
            })
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        self.run(|mut client| async move {
            let tx = client.transaction().await?;
            // One migrator at a time, whichever replica starts first.
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS depwatch_migrations (version INTEGER PRIMARY KEY);
                 LOCK TABLE depwatch_migrations IN EXCLUSIVE MODE;",
            )
            .await?;
            let done: i32 = tx
                .query_one(
                    "SELECT COALESCE(MAX(version), 0) FROM depwatch_migrations",
                    &[],
                )
                .await?
                .get(0);
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                let version = i as i32 + 1;
                if version > done {
                    tx.batch_execute(sql).await?;
                    tx.execute(
                        "INSERT INTO depwatch_migrations (version) VALUES ($1)",
                        &[&version],
                    )
                    .await?;
                }
            }
            tx.commit().await
        })
        .await
    }
}

fn text_or_default<T: std::str::FromStr + Default>(row: &Row, i: usize) -> T {
    row.get::<_, String>(i).parse().unwrap_or_default()
}

fn service_row(row: &Row) -> ServiceRecord {
    ServiceRecord {
        namespace: row.get(0),
        name: row.get(1),
        path: row.get(2),
        content_hash: row.get(3),
        desired: Images::parse(&row.get::<_, String>(4)),
        deployed: Images::parse(&row.get::<_, String>(5)),
        last_good: Images::parse(&row.get::<_, String>(6)),
        status: text_or_default(row, 7),
        failed_hash: row.get(8),
        message: row.get(9),
        updated_at: row.get(10),
        suspended: row.get(11),
        kind: text_or_default(row, 12),
        requested: row.get(13),
        requested_hash: row.get(14),
        judged: crate::domain::verify::Judgement::from_text(row.get::<_, &str>(15)),
        bake_ends_at: row.get(16),
    }
}

fn deploy_row(row: &Row) -> DeployRecord {
    DeployRecord {
        id: row.get(0),
        namespace: row.get(1),
        name: row.get(2),
        trigger: text_or_default(row, 3),
        actor: row.get(4),
        from_image: row.get(5),
        to_image: row.get(6),
        started_at: row.get(7),
        ended_at: row.get(8),
        outcome: text_or_default(row, 9),
        message: row.get(10),
        request_id: row.get(11),
        restore: row.get(12),
        digests: row.get(13),
        content_hash: row.get(14),
        kind: row.get(15),
        bake: crate::domain::verify::BakeRow::from_text(row.get::<_, &str>(16)),
    }
}

fn request_row(row: &Row) -> RequestRecord {
    RequestRecord {
        id: row.get(0),
        idempotency_key: row.get(1),
        body_hash: row.get(2),
        namespace: row.get(3),
        name: row.get(4),
        content: row.get(5),
        actor: row.get(6),
        created_at: row.get(7),
    }
}

/// Statement values as the driver takes them.
fn pg_values(values: Vec<Value>) -> Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
    values
        .into_iter()
        .map(|v| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
            match v {
                Value::Text(t) => Box::new(t),
                Value::Bool(b) => Box::new(b),
            }
        })
        .collect()
}

fn pg_refs(
    values: &[Box<dyn tokio_postgres::types::ToSql + Sync + Send>],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect()
}

#[async_trait::async_trait]
impl Backend for Postgres {
    /// Each write in turn, not as one transaction: a write the record took stays taken, so a
    /// failure ends the batch there and only the writes after it wait for the next round (a
    /// deploy row is never inserted twice).
    async fn write_batch(
        &self,
        batch: Vec<super::outbox::Write>,
        ids: std::collections::HashMap<i64, i64>,
        _seq: u64,
    ) -> Result<super::outbox::Batch, StoreError> {
        let mut run = super::outbox::Batch::new(ids, batch.len());
        for w in &batch {
            let Some(r) = run.next(w)? else { break };
            match super::outbox::carry_out(self, &r).await {
                Ok(id) => run.carried(w, r, id),
                Err(e) if run.done.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(run)
    }

    fn describe(&self) -> String {
        format!("postgresql ({})", self.tls)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run(|client| async move { client.batch_execute("SELECT 1").await })
            .await
    }

    async fn put_request(&self, r: &RequestRecord) -> Result<RequestRecord, StoreError> {
        let r = r.clone();
        self.run(move |client| async move {
            client
                .execute(
                    "INSERT INTO requests (id, idempotency_key, body_hash, namespace, name, content, actor, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                    &[&r.id, &r.idempotency_key, &r.body_hash, &r.namespace, &r.name, &r.content, &r.actor, &r.created_at],
                )
                .await?;
            let row = client
                .query_one(
                    &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE idempotency_key = $1"),
                    &[&r.idempotency_key],
                )
                .await?;
            Ok(request_row(&row))
        })
        .await
    }

    async fn request_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let key = idempotency_key.to_string();
        self.run(move |client| async move {
            let sql = format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE idempotency_key = $1");
            Ok(client
                .query_opt(&sql, &[&key])
                .await?
                .map(|r| request_row(&r)))
        })
        .await
    }

    async fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |client| async move {
            let sql = format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = $1");
            Ok(client
                .query_opt(&sql, &[&id])
                .await?
                .map(|r| request_row(&r)))
        })
        .await
    }

    async fn deploy_for_request(&self, id: &str) -> Result<Option<DeployRecord>, StoreError> {
        let id = id.to_string();
        self.run(move |client| async move {
            let sql = format!(
                "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE request_id = $1 ORDER BY id DESC LIMIT 1"
            );
            Ok(client.query_opt(&sql, &[&id]).await?.map(|r| deploy_row(&r)))
        })
        .await
    }

    async fn service(&self, key: &ServiceKey) -> Result<Option<ServiceRecord>, StoreError> {
        let key = key.clone();
        self.run(move |client| async move {
            let sql = format!(
                "SELECT {SERVICE_COLUMNS} FROM services WHERE namespace = $1 AND name = $2"
            );
            let stmt = client.prepare_cached(&sql).await?;
            Ok(client
                .query_opt(&stmt, &[&key.namespace, &key.name])
                .await?
                .map(|r| service_row(&r)))
        })
        .await
    }

    async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.run(move |client| async move {
            let sql = format!("SELECT {SERVICE_COLUMNS} FROM services ORDER BY namespace, name");
            Ok(client
                .query(&sql, &[])
                .await?
                .iter()
                .map(service_row)
                .collect())
        })
        .await
    }

    async fn services_page(
        &self,
        q: &super::ServicesQuery,
    ) -> Result<(Vec<ServiceRecord>, usize), StoreError> {
        let sql = super::page::services_sql(q, |n| format!("${n}"));
        self.run(move |client| async move {
            let count_values = pg_values(sql.count_values);
            let total: i64 = client
                .query_one(&sql.count, &pg_refs(&count_values))
                .await?
                .get(0);
            let rows_values = pg_values(sql.rows_values);
            let rows = client.query(&sql.rows, &pg_refs(&rows_values)).await?;
            Ok((rows.iter().map(service_row).collect(), total as usize))
        })
        .await
    }

    async fn change_service(
        &self,
        key: &ServiceKey,
        change: &ServiceChange,
        updated_at: &str,
    ) -> Result<(), StoreError> {
        let st = change.statement(&key.namespace, &key.name, updated_at, |n| format!("${n}"));
        self.run(move |client| async move {
            let stmt = client.prepare_cached(&st.sql).await?;
            let values = pg_values(st.values);
            client.execute(&stmt, &pg_refs(&values)).await?;
            Ok(())
        })
        .await
    }

    async fn add_vote(&self, key: &ServiceKey, v: &Vote) -> Result<(), StoreError> {
        let (key, v) = (key.clone(), v.clone());
        self.run(move |client| async move {
            client
                .execute(
                    "INSERT INTO approvals (namespace, name, hash, images, kind, actor, comment, at, digests)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &key.namespace,
                        &key.name,
                        &v.hash,
                        &v.images,
                        &v.kind.as_str(),
                        &v.actor,
                        &v.comment,
                        &v.at,
                        &v.digests,
                    ],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn votes(&self, key: &ServiceKey, limit: usize) -> Result<Vec<Vote>, StoreError> {
        let key = key.clone();
        let limit = limit as i64;
        self.run(move |client| async move {
            let rows = client
                .query(
                    "SELECT hash, images, kind, actor, comment, at, digests FROM approvals
                     WHERE namespace = $1 AND name = $2 ORDER BY id DESC LIMIT $3",
                    &[&key.namespace, &key.name, &limit],
                )
                .await?;
            let mut votes = Vec::with_capacity(rows.len());
            for r in rows.iter().rev() {
                let Ok(kind) = r.get::<_, String>(2).parse() else {
                    continue; // a word this version does not know
                };
                votes.push(Vote {
                    hash: r.get(0),
                    images: r.get(1),
                    kind,
                    actor: r.get(3),
                    comment: r.get(4),
                    at: r.get(5),
                    digests: r.get(6),
                });
            }
            Ok(votes)
        })
        .await
    }

    async fn refuse_file(&self, f: &RefusedFile) -> Result<(), StoreError> {
        let f = f.clone();
        self.run(move |client| async move {
            client
                .execute(
                    "INSERT INTO refused_files (path, reason, seen_at) VALUES ($1, $2, $3)
                     ON CONFLICT (path) DO UPDATE SET reason = EXCLUDED.reason",
                    &[&f.path, &f.reason, &f.seen_at],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn unrefuse_file(&self, path: &str) -> Result<(), StoreError> {
        let path = path.to_string();
        self.run(move |client| async move {
            client
                .execute("DELETE FROM refused_files WHERE path = $1", &[&path])
                .await?;
            Ok(())
        })
        .await
    }

    async fn refused_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<RefusedFile>, usize), StoreError> {
        let after = after.to_string();
        let limit = limit as i64;
        self.run(move |client| async move {
            let total: i64 = client
                .query_one("SELECT COUNT(*) FROM refused_files", &[])
                .await?
                .get(0);
            let files = client
                .query(
                    "SELECT path, reason, seen_at FROM refused_files WHERE path > $1 ORDER BY path LIMIT $2",
                    &[&after, &limit],
                )
                .await?
                .iter()
                .map(|r| RefusedFile {
                    path: r.get(0),
                    reason: r.get(1),
                    seen_at: r.get(2),
                })
                .collect();
            Ok((files, total as usize))
        })
        .await
    }

    async fn refused_files(&self) -> Result<Vec<RefusedFile>, StoreError> {
        self.run(move |client| async move {
            Ok(client
                .query(
                    "SELECT path, reason, seen_at FROM refused_files ORDER BY path",
                    &[],
                )
                .await?
                .iter()
                .map(|r| RefusedFile {
                    path: r.get(0),
                    reason: r.get(1),
                    seen_at: r.get(2),
                })
                .collect())
        })
        .await
    }

    async fn forget_service(&self, key: &ServiceKey) -> Result<bool, StoreError> {
        let key = key.clone();
        self.run(move |client| async move {
            let n = client
                .execute(
                    "DELETE FROM services WHERE namespace = $1 AND name = $2",
                    &[&key.namespace, &key.name],
                )
                .await?;
            Ok(n > 0)
        })
        .await
    }

    async fn set_bake(&self, id: i64, bake: &str) -> Result<(), StoreError> {
        let bake = bake.to_string();
        self.run(move |client| async move {
            client
                .execute("UPDATE deploys SET bake = $2 WHERE id = $1", &[&id, &bake])
                .await?;
            Ok(())
        })
        .await
    }

    async fn set_restore(&self, id: i64, restore: &str, why: &str) -> Result<(), StoreError> {
        let (restore, why) = (restore.to_string(), why.to_string());
        self.run(move |client| async move {
            client
                .execute(
                    "UPDATE deploys SET restore = $2, message = $3 WHERE id = $1",
                    &[&id, &restore, &why],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn start_deploy(&self, d: &DeployRecord) -> Result<i64, StoreError> {
        let d = d.clone();
        self.run(move |client| async move {
            let row = client
                .query_one(
                    "INSERT INTO deploys (namespace, name, trigger, actor, from_image, to_image, started_at, ended_at, outcome, message, request_id, digests, content_hash, kind)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, NULL, $8, $9, $10, $11, $12, $13) RETURNING id",
                    &[
                        &d.namespace,
                        &d.name,
                        &d.trigger.as_str(),
                        &d.actor,
                        &d.from_image,
                        &d.to_image,
                        &d.started_at,
                        &d.outcome.as_str(),
                        &d.message,
                        &d.request_id,
                        &d.digests,
                        &d.content_hash,
                        &d.kind,
                    ],
                )
                .await?;
            Ok(row.get(0))
        })
        .await
    }

    async fn finish_deploy(
        &self,
        id: i64,
        outcome: DeployOutcome,
        message: &str,
        ended_at: &str,
    ) -> Result<(), StoreError> {
        let (message, ended_at) = (message.to_string(), ended_at.to_string());
        self.run(move |client| async move {
            client
                .execute(
                    "UPDATE deploys SET ended_at = $2, outcome = $3, message = $4 WHERE id = $1",
                    &[&id, &ended_at, &outcome.as_str(), &message],
                )
                .await?;
            Ok(())
        })
        .await
    }

    async fn history(
        &self,
        key: Option<&ServiceKey>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError> {
        let key = key.cloned();
        let limit = limit as i64;
        let before = before.unwrap_or(i64::MAX);
        self.run(move |client| async move {
            let rows = match key {
                Some(k) => {
                    let sql = format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE namespace = $1 AND name = $2 AND id < $3 ORDER BY id DESC LIMIT $4");
                    client
                        .query(&sql, &[&k.namespace, &k.name, &before, &limit])
                        .await?
                }
                None => {
                    let sql = format!(
                        "SELECT {DEPLOY_COLUMNS} FROM deploys WHERE id < $1 ORDER BY id DESC LIMIT $2"
                    );
                    client.query(&sql, &[&before, &limit]).await?
                }
            };
            Ok(rows.iter().map(deploy_row).collect())
        })
        .await
    }

    async fn open_deploys(&self, key: &ServiceKey) -> Result<Vec<DeployRecord>, StoreError> {
        let key = key.clone();
        self.run(move |client| async move {
            let sql = format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE namespace = $1 AND name = $2 AND outcome = $3 ORDER BY id DESC LIMIT 16");
            let rows = client
                .query(
                    &sql,
                    &[&key.namespace, &key.name, &DeployOutcome::InProgress.as_str()],
                )
                .await?;
            Ok(rows.iter().map(deploy_row).collect())
        })
        .await
    }

    async fn prune(&self, keep: usize, cutoff: Option<&str>) -> Result<usize, StoreError> {
        let keep = keep as i64;
        let cutoff = cutoff.map(String::from);
        self.run(move |client| async move {
            let in_progress = DeployOutcome::InProgress.as_str();
            let mut removed = client
                .execute(
                    "DELETE FROM deploys WHERE outcome != $2 AND id IN (
                        SELECT id FROM (
                            SELECT id, ROW_NUMBER() OVER (PARTITION BY namespace, name ORDER BY id DESC) AS n FROM deploys
                        ) ranked WHERE n > $1)",
                    &[&keep, &in_progress],
                )
                .await?;
            if let Some(cutoff) = cutoff {
                removed += client
                    .execute(
                        "DELETE FROM deploys WHERE outcome != $2 AND started_at < $1",
                        &[&cutoff, &in_progress],
                    )
                    .await?;
                client
                    .execute("DELETE FROM approvals WHERE at < $1", &[&cutoff])
                    .await?;
            }
            Ok(removed as usize)
        })
        .await
    }

    async fn interrupted(&self) -> Result<Vec<DeployRecord>, StoreError> {
        self.run(move |client| async move {
            let sql =
                format!("SELECT {DEPLOY_COLUMNS} FROM deploys WHERE outcome = $1 ORDER BY id");
            Ok(client
                .query(&sql, &[&DeployOutcome::InProgress.as_str()])
                .await?
                .iter()
                .map(deploy_row)
                .collect())
        })
        .await
    }
}
