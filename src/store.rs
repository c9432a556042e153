//! The record: an embedded SQLite database in the state directory holding each service's
//! desired, deployed and last-good images and every deploy with its outcome. It survives
//! restarts, and the CLI reads it while the daemon is stopped.
//!
//! Calls are synchronous and short (WAL mode, one connection behind a mutex); a handful happen
//! per deploy. A service row is changed only through [`ServiceChange`]: each writer sets the
//! fields it owns in one statement, never a read-modify-write of the whole row. With leader
//! election every write first checks the [`Fence`]: a replica without a valid Lease writes
//! nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::domain::{DeployOutcome, Images, ServiceKey, ServiceStatus, Trigger, WorkloadKind};

mod change;
pub mod outbox;
mod page;
mod pg;
mod pgtls;
mod sqlite;
mod writer;

use crate::fence::Fence;
pub use change::ServiceChange;
pub use page::{ServiceFilter, ServicesPage, ServicesQuery};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create the state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("PostgreSQL record: {0}")]
    Postgres(String),
    /// The record refused writes long enough for the outbox to fill (either backend).
    #[error("the record ({backend}) has refused writes for a while and {waiting} are waiting; this one is lost")]
    OutboxFull { backend: String, waiting: usize },
    /// A write named a deploy row that a lost write was to create.
    #[error("deploy row {0} was never written")]
    RowLost(i64),
    #[error("cannot start a thread for the record: {0}")]
    Thread(std::io::Error),
    /// The SQLite thread is gone (the process is stopping).
    #[error("the record's SQLite thread has stopped")]
    Stopped,
    /// The daemon's record does not answer (found by its writer or a read): reads fail at
    /// once until it does, instead of each waiting for it.
    #[error("the record ({backend}) does not answer: {why}")]
    Away { backend: String, why: String },
    #[error(transparent)]
    Fenced(#[from] crate::fence::Fenced),
    #[error("no database at {}; use --state-dir, --database-url or --api", path.display())]
    Missing { path: PathBuf },
    #[error("cannot read {}: {source}; run the command as the daemon's user (e.g. `sudo -u depwatch depwatch …`) or use --api", path.display())]
    Denied {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} belongs to user {owner}, not to you; run the command as that user (e.g. `sudo -u depwatch depwatch …`) or use --api, so the database's journal files keep their owner", path.display())]
    Owner { path: PathBuf, owner: u32 },
}

/// For the daemon's own writes, whose failure no caller can act on: each failure is said once.
/// A write the backend refused is kept in the outbox and said there; a full outbox and a
/// fenced replica are said where they happen; anything else is said here.
pub trait OrLog {
    fn or_log(self, what: &str);
}

impl<T> OrLog for Result<T, StoreError> {
    fn or_log(self, what: &str) {
        match self {
            Ok(_) => {}
            Err(StoreError::Fenced(_) | StoreError::OutboxFull { .. }) => {
                tracing::debug!(write = what, "not recorded (said where it was refused)")
            }
            Err(e) => tracing::warn!(write = what, error = %e, "not recorded"),
        }
    }
}

/// `depwatch.db` in `state_dir` if it is there: an operator command never creates the record.
fn existing_db(state_dir: &Path) -> Result<(PathBuf, std::fs::Metadata), StoreError> {
    let path = state_dir.join("depwatch.db");
    match std::fs::metadata(&path) {
        Ok(m) if m.is_file() => Ok((path, m)),
        Ok(_) => Err(StoreError::Missing { path }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::Missing { path }),
        Err(source) => Err(StoreError::Denied { path, source }),
    }
}

/// A service as last recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct ServiceRecord {
    pub namespace: String,
    pub name: String,
    /// The dependency file it came from.
    pub path: String,
    /// SHA-256 of the file content last acted on.
    pub content_hash: String,
    /// Images the file asks for, `container=image` joined by `, `.
    pub desired: Images,
    /// Images last seen running after a deploy.
    pub deployed: Images,
    /// Images of the last healthy rollout: what a rollback restores.
    pub last_good: Images,
    pub status: ServiceStatus,
    /// Content hash of a version that failed: not retried until the content changes.
    pub failed_hash: String,
    pub message: String,
    pub updated_at: String,
    /// An operator suspended the service: file changes are recorded but not deployed.
    pub suspended: bool,
    /// The kind of workload its file names, as the last plan found it.
    pub kind: WorkloadKind,
    /// What the file asks in its own words (`1.4.2`, `web=1.4.2, envoy=…`), written when the
    /// file is read, before any plan: empty for a file that was refused.
    pub requested: String,
    /// The content hash `requested` was read from.
    pub requested_hash: String,
    /// An operator's word on the bake of a version (`depwatch promote`, or `depwatch
    /// rollback` during the bake).
    pub judged: Option<crate::domain::verify::Judgement>,
    /// When the bake of the version verifying ends (RFC 3339); meaningful while the status
    /// is `verifying`.
    pub bake_ends_at: String,
}

impl DeployRecord {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

impl ServiceRecord {
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            name: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// How long the bake of the version verifying has left at `now` (none unless verifying).
    pub fn bake_left(&self, now: jiff::Timestamp) -> Option<std::time::Duration> {
        if self.status != ServiceStatus::Verifying {
            return None;
        }
        let ends: jiff::Timestamp = self.bake_ends_at.parse().ok()?;
        let left = now.duration_until(ends);
        Some(std::time::Duration::try_from(left).unwrap_or_default())
    }

    /// The images of a version that failed and stays pinned until the file changes or an
    /// operator retries it.
    pub fn pinned(&self) -> Option<&Images> {
        (!self.failed_hash.is_empty() && self.failed_hash == self.content_hash)
            .then_some(&self.desired)
    }

    /// What DESIRED shows: the images the file's current content resolved to when a plan got
    /// that far, else the file's own words; and why it is not running, when it is not.
    pub fn desired_shown(&self) -> (String, Option<NotRunning>) {
        let deploying = matches!(
            self.status,
            ServiceStatus::Deploying | ServiceStatus::WaitingForApi | ServiceStatus::Verifying
        );
        // The resolved images are this content's (or the deploy under way's).
        let fresh =
            self.requested_hash.is_empty() || self.requested_hash == self.content_hash || deploying;
        let shown = if fresh && !self.desired.is_empty() || self.requested_hash.is_empty() {
            self.desired.to_string()
        } else {
            self.requested.clone()
        };
        let refused = self.status == ServiceStatus::Invalid
            || (self.status == ServiceStatus::Failed && fresh && self.desired.is_empty());
        let why = if self.suspended && !fresh {
            Some(NotRunning::Suspended)
        } else if self.pinned().is_some() {
            Some(NotRunning::Pinned)
        } else if refused && !deploying {
            Some(NotRunning::Refused)
        } else {
            None
        };
        (shown, why)
    }

    /// What an operator can do about this service, if anything.
    pub fn next_step(&self) -> Option<String> {
        crate::advice::next_step(crate::advice::Situation {
            key: &self.key(),
            kind: self.kind,
            status: self.status,
            suspended: self.suspended,
            pinned: self.pinned().is_some(),
            message: &self.message,
        })
    }
}

/// Why what the file asks is not what runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRunning {
    /// The service is suspended and the change waits for `depwatch resume`.
    Suspended,
    /// The version failed and is not deployed again until the file changes.
    Pinned,
    /// The file, or what it asks, was refused before anything was patched.
    Refused,
}

impl NotRunning {
    pub fn as_str(self) -> &'static str {
        match self {
            NotRunning::Suspended => "waiting: suspended",
            NotRunning::Pinned => "pinned",
            NotRunning::Refused => "refused",
        }
    }
}

/// One deploy attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct DeployRecord {
    pub id: i64,
    pub namespace: String,
    pub name: String,
    pub trigger: Trigger,
    pub actor: String,
    pub from_image: String,
    pub to_image: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub outcome: DeployOutcome,
    pub message: String,
    /// The API request that asked for this deploy, if any.
    pub request_id: String,
    /// Set before a rollback's patch: the images it restores. An unfinished deploy with restore
    /// images is a rollback a stop interrupted; the next start finishes it.
    pub restore: String,
    /// The digests the registry reported for the new images (`container=sha256:…`): what
    /// ran, exactly.
    pub digests: String,
    /// The SHA-256 of the file content deployed: what a failure of this rollout pins, even
    /// when a newer version finishes it.
    pub content_hash: String,
    /// The kind of workload patched (`deployment`, …), when known.
    pub kind: String,
    /// Set when the rollout was healthy and its checks began to bake: when, and the
    /// baselines, so a stop during the bake is resumed with the time it had left; the checks'
    /// results once it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bake: Option<crate::domain::verify::BakeRow>,
}

/// A file in the dependency directory that looks like a dependency file but whose name is not
/// one (`web-prod.dep`, `Web_prod.dep`, `web_prod.dep.txt`): nothing is deployed from it, and
/// status, the page and the API say so until it is renamed or removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RefusedFile {
    pub path: String,
    /// Why, and what name it should have.
    pub reason: String,
    pub seen_at: String,
}

/// A deploy request received through the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    pub id: String,
    pub idempotency_key: String,
    /// SHA-256 of the request body, to tell a retry from a different request.
    pub body_hash: String,
    pub namespace: String,
    pub name: String,
    /// The dependency file content written for it.
    pub content: String,
    pub actor: String,
    pub created_at: String,
}

/// The record, whichever backend holds it. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// Moves on every write, so the status page can refresh live.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Writes are refused without a valid Lease (open without leader election).
    fence: Fence,
    /// Writes the backend refused, kept in order until it answers again; in the daemon,
    /// every write, until the writer carries it out.
    outbox: Arc<Mutex<outbox::Outbox>>,
    /// One replay at a time: each takes the oldest write, then removes it.
    replaying: Arc<tokio::sync::Mutex<()>>,
    /// Held by a read that must see no batch under way ([`Store::read_alone`]); a batch
    /// starts only when it is free.
    pause: Arc<tokio::sync::Mutex<()>>,
    /// The daemon's record: writes are queued and carried out by the writer's task.
    writer: Arc<std::sync::OnceLock<Arc<writer::Writer>>>,
    /// With the writer: each service's row as last read, so a read while the record is away
    /// still sees the pins and the suspensions it held (with the queued writes over them).
    known: Arc<Mutex<std::collections::HashMap<ServiceKey, ServiceRecord>>>,
}

/// The record's own health: writes kept in memory while the backend refuses them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordHealth {
    pub pending: usize,
    /// Why the backend refused the last write, or does not answer: `None` while it is well.
    pub error: Option<String>,
    /// Writes lost because the outbox was full.
    pub dropped: u64,
}

/// Writes carried out in one transaction at most.
const BATCH: usize = 256;

/// Fixed-width UTC timestamps (`2026-01-02T03:04:05.123456Z`), so text order is time order.
pub fn now() -> String {
    timestamp(jiff::Timestamp::now())
}

pub fn timestamp(t: jiff::Timestamp) -> String {
    format!(
        "{}.{:06}Z",
        t.strftime("%Y-%m-%dT%H:%M:%S"),
        t.subsec_microsecond()
    )
}

const REQUEST_COLUMNS: &str =
    "id, idempotency_key, body_hash, namespace, name, content, actor, created_at";
const SERVICE_COLUMNS: &str = "namespace, name, path, content_hash, desired, deployed, last_good, status, failed_hash, message, updated_at, suspended, kind, requested, requested_hash, judged, bake_ends_at";
const DEPLOY_COLUMNS: &str = "id, namespace, name, trigger, actor, from_image, to_image, started_at, ended_at, outcome, message, request_id, restore, digests, content_hash, kind, bake";

/// The state directory 0700 and the database 0600 (SQLite gives its -wal and -shm files the
/// database's mode), whatever the umask: history, pins and request records are nobody else's.
fn private(state_dir: &Path, db: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o700))?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(db)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let f = state_dir.join(format!("depwatch.db{suffix}"));
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// A backend's answer to come.
type Answer<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What a record backend stores and answers. SQLite (the default, in the state directory) and
/// PostgreSQL (`--database-url`, shared by replicas) implement it; the same test suite runs on
/// both. Calls are async: SQLite answers from a thread of its own, PostgreSQL through the async
/// client on the daemon's runtime.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// What kind of record this is, for the start-up line (never a URL).
    fn describe(&self) -> String;
    /// A file on this machine: it answers reads even while it refuses writes.
    fn local(&self) -> bool {
        false
    }
    /// Every call runs in one order, a read never beside a write (SQLite's one thread).
    fn ordered(&self) -> bool {
        false
    }
    /// Whether the record answers at all (the writer's check while it is away, or idle).
    async fn ping(&self) -> Result<(), StoreError>;
    /// Carry out `batch` (the oldest waiting writes), in order, as one transaction where the
    /// backend has them: all or none (see [`outbox::Batch`]). `seq` numbers the batch: a
    /// backend that runs one call at a time (SQLite's thread) says with every later call
    /// that it saw it ([`saw_batch`]).
    async fn write_batch(
        &self,
        batch: Vec<outbox::Write>,
        ids: std::collections::HashMap<i64, i64>,
        seq: u64,
    ) -> Result<outbox::Batch, StoreError>;
    /// Record an API request, or return the one already under its idempotency key.
    async fn put_request(&self, r: &RequestRecord) -> Result<RequestRecord, StoreError>;
    async fn request_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<RequestRecord>, StoreError>;
    async fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError>;
    async fn deploy_for_request(&self, id: &str) -> Result<Option<DeployRecord>, StoreError>;
    async fn service(&self, key: &ServiceKey) -> Result<Option<ServiceRecord>, StoreError>;
    async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError>;
    /// One page of services (`LIMIT` in the SQL) and how many the filter keeps in all.
    async fn services_page(
        &self,
        q: &ServicesQuery,
    ) -> Result<(Vec<ServiceRecord>, usize), StoreError>;
    /// Set the fields `change` names (creating the row if missing), stamping `updated_at`, in
    /// one statement.
    async fn change_service(
        &self,
        key: &ServiceKey,
        change: &ServiceChange,
        updated_at: &str,
    ) -> Result<(), StoreError>;
    async fn start_deploy(&self, d: &DeployRecord) -> Result<i64, StoreError>;
    /// Record the images a rollback is about to restore on its deploy row.
    async fn set_restore(&self, id: i64, restore: &str, why: &str) -> Result<(), StoreError>;
    /// Record on the deploy row that its checks began to bake (JSON).
    async fn set_bake(&self, id: i64, bake: &str) -> Result<(), StoreError>;
    /// Remove a service's row (its history stays); `false` when there was none.
    async fn forget_service(&self, key: &ServiceKey) -> Result<bool, StoreError>;
    /// Append a row to the approvals table.
    async fn add_vote(
        &self,
        key: &ServiceKey,
        v: &crate::domain::approval::Vote,
    ) -> Result<(), StoreError>;
    /// The service's latest `limit` approval rows, oldest first.
    async fn votes(
        &self,
        key: &ServiceKey,
        limit: usize,
    ) -> Result<Vec<crate::domain::approval::Vote>, StoreError>;
    /// Note a refused file name (or update its reason).
    async fn refuse_file(&self, f: &RefusedFile) -> Result<(), StoreError>;
    /// The file is gone or renamed.
    async fn unrefuse_file(&self, path: &str) -> Result<(), StoreError>;
    /// Every refused file name, by path.
    async fn refused_files(&self) -> Result<Vec<RefusedFile>, StoreError>;
    /// At most `limit` refused file names after the path `after`, by path; and how many there
    /// are in all.
    async fn refused_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<RefusedFile>, usize), StoreError>;
    async fn finish_deploy(
        &self,
        id: i64,
        outcome: DeployOutcome,
        message: &str,
        ended_at: &str,
    ) -> Result<(), StoreError>;
    /// Newest first, older than the row `before` when given; all services when `key` is
    /// `None`.
    async fn history(
        &self,
        key: Option<&ServiceKey>,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError>;
    /// The service's deploys still in progress, newest first (at most a few).
    async fn open_deploys(&self, key: &ServiceKey) -> Result<Vec<DeployRecord>, StoreError>;
    /// [`Self::service`] for each of `keys`, in order, in one visit where the backend can
    /// (SQLite's thread).
    async fn services_of(
        &self,
        keys: &[ServiceKey],
    ) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        let mut rows = Vec::with_capacity(keys.len());
        for k in keys {
            rows.push(self.service(k).await?);
        }
        Ok(rows)
    }
    /// [`Self::service`] and [`Self::open_deploys`] together: what a deploy starts from, in
    /// one visit where the backend can (SQLite's thread).
    async fn deploy_basis(
        &self,
        key: &ServiceKey,
    ) -> Result<(Option<ServiceRecord>, Vec<DeployRecord>), StoreError> {
        Ok((self.service(key).await?, self.open_deploys(key).await?))
    }
    /// Remove finished deploys beyond `keep` per service and, with a cutoff, older than it.
    async fn prune(&self, keep: usize, cutoff: Option<&str>) -> Result<usize, StoreError>;
    /// Every deploy still in progress, oldest first.
    async fn interrupted(&self) -> Result<Vec<DeployRecord>, StoreError>;
}

tokio::task_local! {
    /// Inside [`Store::in_order`]: the last write batch the backend had committed when this
    /// task's read ran (set by the backend as it answers).
    static SEEN_BATCH: std::cell::Cell<Option<u64>>;
}

/// Said by a backend that runs one call at a time, as it answers a call: the call saw every
/// write batch up to `seq`. Only a read inside [`Store::in_order`] listens.
fn saw_batch(seq: u64) {
    let _ = SEEN_BATCH.try_with(|s| s.set(Some(seq)));
}

/// How many times a read is tried before it goes the rare way ([`Store::read_alone`]).
const TRIES: usize = 20;

/// The most approval rows read for a service: far more than one save's request and words.
const MAX_VOTES: usize = 200;

impl Store {
    /// Open (creating if needed) `depwatch.db` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir_error = |source| StoreError::Dir {
            path: state_dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(state_dir).map_err(dir_error)?;
        let path = state_dir.join("depwatch.db");
        private(state_dir, &path).map_err(dir_error)?;
        let conn = sqlite::connection(&path, rusqlite::OpenFlags::default())?;
        sqlite::schema(&conn).map_err(|source| StoreError::Open { path, source })?;
        Store::sqlite(conn)
    }

    /// `depwatch.db` in `state_dir`, read-only, for commands that only look: a missing
    /// database is an error with a hint, never an empty one created on the spot.
    pub fn open_read_only(state_dir: &Path) -> Result<Store, StoreError> {
        let (path, _) = existing_db(state_dir)?;
        if let Err(source) = std::fs::File::open(&path) {
            return Err(StoreError::Denied { path, source });
        }
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI;
        Store::sqlite(sqlite::connection(&path, flags)?)
    }

    /// `depwatch.db` in `state_dir` for an operator command that changes it: never created
    /// here (only the daemon creates the record), and only by the user who owns it, so the
    /// journal files SQLite creates beside it keep the daemon's owner.
    pub fn open_existing(state_dir: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let (path, meta) = existing_db(state_dir)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(StoreError::Owner {
                path,
                owner: meta.uid(),
            });
        }
        let conn = sqlite::connection(&path, rusqlite::OpenFlags::default())?;
        sqlite::schema(&conn).map_err(|source| StoreError::Open { path, source })?;
        Store::sqlite(conn)
    }

    /// The record at `--database-url` when given, else [`Self::open_existing`].
    pub async fn open_for_writing(
        state_dir: &Path,
        database_url: Option<&str>,
    ) -> Result<Store, StoreError> {
        match database_url.filter(|u| !u.is_empty()) {
            Some(url) => Store::connect(url).await,
            None => Store::open_existing(state_dir),
        }
    }

    /// The record at `--database-url` when given (its schema untouched), else
    /// [`Self::open_read_only`].
    pub fn open_for_reading(
        state_dir: &Path,
        database_url: Option<&str>,
    ) -> Result<Store, StoreError> {
        match database_url.filter(|u| !u.is_empty()) {
            Some(url) => Ok(Store::with_backend(Arc::new(pg::Postgres::connect_only(
                url,
            )?))),
            None => Store::open_read_only(state_dir),
        }
    }

    /// The record in PostgreSQL at `url` (`postgres://user:pass@host/db`), migrated to the
    /// current schema. The URL may hold a password: it is never logged.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Ok(Store::with_backend(Arc::new(
            pg::Postgres::connect(url).await?,
        )))
    }

    /// `--database-url` when given, else SQLite in `state_dir`.
    pub async fn open_or_connect(
        state_dir: &Path,
        database_url: Option<&str>,
    ) -> Result<Store, StoreError> {
        match database_url.filter(|u| !u.is_empty()) {
            Some(url) => Store::connect(url).await,
            None => Store::open(state_dir),
        }
    }

    fn sqlite(conn: rusqlite::Connection) -> Result<Store, StoreError> {
        Ok(Store::with_backend(Arc::new(sqlite::Sqlite::start(conn)?)))
    }

    /// What kind of record this is: `sqlite`, or `postgresql` with how it is protected.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    fn with_backend(backend: Arc<dyn Backend>) -> Store {
        Store {
            backend,
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            fence: Fence::open(),
            outbox: Arc::default(),
            replaying: Arc::default(),
            pause: Arc::default(),
            writer: Arc::default(),
            known: Arc::default(),
        }
    }

    /// This record with a writer of its own (the daemon's): writes are queued and carried out
    /// in order by one task, never by the caller; reads never wait on a record known to be
    /// away. Call [`Store::close`] at the end, so what waits is written.
    pub fn with_writer(self) -> Result<Store, StoreError> {
        if self.writer().is_some() {
            return Ok(self);
        }
        let store = self.clone();
        let writer = writer::Writer::start(move |idle| {
            let store = store.clone();
            async move { store.round(idle).await }
        });
        let _ = self.writer.set(writer);
        Ok(self)
    }

    fn writer(&self) -> Option<&Arc<writer::Writer>> {
        self.writer.get()
    }

    /// One round of the writer: carry out what waits; with nothing waiting after an idle
    /// wait, check that the record answers. Whether it answers.
    async fn round(&self, idle: bool) -> bool {
        let left = self.replay().await;
        let away = self.outbox().down.is_some();
        if !(idle || away || left > 0) {
            return true;
        }
        // Writes refused by a record that still answers reads (a full disk) leave reads alone.
        let answer = self.backend.ping().await;
        let mut o = self.outbox();
        match answer {
            Ok(()) => {
                if o.down.take().is_some() {
                    tracing::info!(record = %self.backend.describe(), "the record answers again");
                }
                left == 0
            }
            Err(e) => {
                if o.down.is_none() {
                    tracing::error!(record = %self.backend.describe(), error = %e, "the record does not answer; writes are kept in memory, in order, and reads use what was last read");
                }
                o.down = Some(e.to_string());
                false
            }
        }
    }

    /// Write what waits and end the writer (at shutdown); what still waits is said in the
    /// log (the next start finishes the unfinished deploys from the cluster).
    pub async fn close(&self) {
        if let Some(w) = self.writer() {
            w.stop().await;
        }
        let left = self.outbox().len();
        if left > 0 {
            tracing::error!(
                pending = left,
                record = %self.backend.describe(),
                "stopping with record writes that could not be written; the next start finishes the unfinished deploys from the cluster"
            );
        }
    }

    /// Wait until every write queued so far is carried out, or the record is found away (a
    /// deploy's intent is written before its PATCH; during an outage it is kept in memory,
    /// as every write is). At once without a writer.
    pub async fn settled(&self) {
        let Some(w) = self.writer() else {
            return;
        };
        let target = self.outbox().kept_total;
        let mut progress = w.progress.subscribe();
        loop {
            {
                let o = self.outbox();
                // Refused (kept in memory) counts as settled: the deploy goes on without it.
                if o.written_total >= target || o.down.is_some() || o.error.is_some() {
                    return;
                }
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    }

    /// Fails at once, in the daemon, while the record is known to be away: no read waits on
    /// a record that does not answer.
    fn reachable(&self) -> Result<(), StoreError> {
        if self.writer().is_none() {
            return Ok(());
        }
        match &self.outbox().down {
            None => Ok(()),
            Some(why) => Err(StoreError::Away {
                backend: self.backend.describe(),
                why: why.clone(),
            }),
        }
    }

    /// A read of the backend, noting (in the daemon) a record that does not answer.
    async fn ask<T>(&self, read: Answer<'_, T>) -> Result<T, StoreError> {
        self.reachable()?;
        let got = read.await;
        // A record server that did not answer is taken for away at once (the writer checks
        // it right after, and takes it back as soon as it answers); a local database's error
        // is the read's own.
        if let (Err(e @ StoreError::Postgres(_)), Some(w)) = (&got, self.writer()) {
            self.outbox().down.get_or_insert_with(|| e.to_string());
            w.wake();
        }
        got
    }

    /// A read of the backend with the queued writes laid over it by `lay`: a write is seen in
    /// the backend or in the queue, never in both or neither. On SQLite (one call at a time)
    /// the read says which write batch it saw last, and is laid over the queue once the queue
    /// holds exactly the writes after it: at once, after the writer notes the batch it saw,
    /// or read again when it missed one the writer has noted since. On PostgreSQL (reads run
    /// beside writes) it is taken when the writer carried out nothing meanwhile, else read
    /// again, a few times.
    async fn consistent<'a, T>(
        &'a self,
        read: impl Fn() -> Answer<'a, T>,
        lay: impl Fn(&outbox::Outbox, Result<T, StoreError>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if self.backend.ordered() {
            return self.in_order(read, lay).await;
        }
        for _ in 0..TRIES {
            let before = self.outbox().mark();
            let got = self.ask(read()).await;
            let laid = {
                let o = self.outbox();
                let still = before.0 == o.written_total && !before.1 && !o.carrying;
                still.then(|| lay(&o, got))
            };
            if let Some(laid) = laid {
                return laid;
            }
            tokio::task::yield_now().await;
        }
        self.read_alone(read, lay).await
    }

    /// The rare way, for a read that kept meeting batches: no batch is under way when it
    /// reads, and none starts until it is laid (the writer waits a moment).
    async fn read_alone<'a, T>(
        &'a self,
        read: impl Fn() -> Answer<'a, T>,
        lay: impl Fn(&outbox::Outbox, Result<T, StoreError>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _paused = self.pause.lock().await;
        // A batch under way ends within the record's own timeouts; this waits longer than
        // those, never for ever.
        for _ in 0..500 {
            let progress = self.writer().map(|w| w.progress.subscribe());
            if !self.outbox().carrying {
                break;
            }
            let wait = std::time::Duration::from_millis(20);
            match progress {
                Some(mut p) => drop(tokio::time::timeout(wait, p.changed()).await),
                None => tokio::time::sleep(wait).await,
            }
        }
        let got = self.ask(read()).await;
        lay(&self.outbox(), got)
    }

    fn outbox(&self) -> MutexGuard<'_, outbox::Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write now, or keep the write in order behind those already waiting; a deploy row's id
    /// (local and negative while it waits) when it starts one. With a writer, always kept:
    /// the writer's task carries it out.
    async fn write(&self, what: &str, mut w: outbox::Write) -> Result<Option<i64>, StoreError> {
        self.allowed(what)?;
        if self.writer().is_none() {
            if let Some(done) = self.write_now(&w).await {
                return done;
            }
        }
        let mut o = self.outbox();
        if let outbox::Write::Start { local, .. } = &mut w {
            *local = o.local_id();
        }
        let id = match &w {
            outbox::Write::Start { local, .. } => Some(*local),
            _ => None,
        };
        if !o.keep(w) {
            tracing::error!(
                capacity = outbox::CAPACITY,
                "the record's outbox is full: a write is lost"
            );
            return Err(StoreError::OutboxFull {
                backend: self.backend.describe(),
                waiting: outbox::CAPACITY,
            });
        }
        drop(o);
        if let Some(writer) = self.writer() {
            writer.wake();
        }
        self.changed();
        Ok(id)
    }

    /// Without a writer (a command, a test): carry `w` out here when nothing waits before
    /// it, in order with other writers, holding the queue only to look at it. `None` when
    /// it is to be kept (something waits, or the backend refused it).
    async fn write_now(&self, w: &outbox::Write) -> Option<Result<Option<i64>, StoreError>> {
        let _order = self.replaying.lock().await;
        let resolved = {
            let o = self.outbox();
            if !o.is_empty() {
                return None;
            }
            o.resolved(w)
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => return Some(Err(e)),
        };
        match outbox::carry_out(&*self.backend, &resolved).await {
            Ok(id) => {
                self.changed();
                Some(Ok(id))
            }
            Err(e) => {
                tracing::error!(error = %e, "the record refuses writes: they are kept in memory, in order, and written when it answers again");
                self.outbox().error = Some(e.to_string());
                None
            }
        }
    }

    /// [`Self::consistent`] on a backend that runs one call at a time.
    async fn in_order<'a, T>(
        &'a self,
        read: impl Fn() -> Answer<'a, T>,
        lay: impl Fn(&outbox::Outbox, Result<T, StoreError>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        for _ in 0..TRIES {
            let (got, seen) = SEEN_BATCH
                .scope(std::cell::Cell::new(None), async {
                    let got = self.ask(read()).await;
                    (got, SEEN_BATCH.with(std::cell::Cell::get))
                })
                .await;
            for _ in 0..TRIES {
                let progress = self.writer().map(|w| w.progress.subscribe());
                let noted = {
                    let o = self.outbox();
                    // Not from the backend (the record is away), or as the queue stands.
                    if seen.is_none_or(|s| s == o.batch_noted) {
                        return lay(&o, got);
                    }
                    o.batch_noted
                };
                if seen.is_some_and(|s| s < noted) {
                    break; // It missed a batch no longer queued: read again.
                }
                // The writer notes a committed batch a moment later (a writer stopped between
                // the two never does: the read goes the rare way).
                let wait = std::time::Duration::from_millis(100);
                match progress {
                    Some(mut p) => {
                        if tokio::time::timeout(wait, p.changed()).await.is_err() {
                            break;
                        }
                    }
                    None => tokio::task::yield_now().await,
                }
            }
        }
        self.read_alone(read, lay).await
    }

    /// Write what waits, in order, if the backend answers now (blocking). Returns how many
    /// still wait.
    /// The queue is not held while the backend is asked, so writers go on queueing meanwhile.
    pub async fn replay(&self) -> usize {
        let _one = self.replaying.lock().await;
        let mut written = 0;
        let mut refused = false;
        loop {
            let paused = self.pause.lock().await;
            let (batch, ids, seq) = {
                let mut o = self.outbox();
                let taken = o.front(BATCH);
                o.carrying = !taken.0.is_empty();
                o.batch_seq += 1;
                (taken.0, taken.1, o.batch_seq)
            };
            drop(paused);
            if batch.is_empty() {
                break;
            }
            match self.carry_out_batch(batch, ids, seq).await {
                Ok(done) => {
                    let mut o = self.outbox();
                    refused = refused || o.error.is_some();
                    written += done.len();
                    for id in done {
                        o.written(id);
                    }
                    o.batch_noted = seq;
                    o.carrying = false;
                    drop(o);
                    if let Some(w) = self.writer() {
                        w.progress.send_modify(|n| *n += 1);
                    }
                }
                Err(StoreError::RowLost(id)) => {
                    tracing::error!(
                        deploy = id,
                        "a write names a deploy row that was never written; it is dropped"
                    );
                    self.outbox().drop_lost();
                }
                Err(e) => {
                    let mut o = self.outbox();
                    o.carrying = false;
                    if o.error.is_none() && self.writer().is_some() {
                        tracing::error!(record = %self.backend.describe(), error = %e, "the record refuses writes: they are kept in memory, in order, and written when it answers again");
                    }
                    tracing::debug!(error = %e, pending = o.len(), "the record still refuses writes");
                    o.error = Some(e.to_string());
                    return o.len();
                }
            }
        }
        if written > 0 {
            if refused || self.writer().is_none() {
                tracing::info!(
                    written,
                    "the record answers again: every kept write is written"
                );
            }
            self.changed();
        }
        0
    }

    /// Carry out `batch` (the oldest waiting writes) as one transaction, each deploy row id
    /// made the backend's as the rows are written (`ids`); the ids of the rows started. A
    /// write naming a row never written ends the batch before it (`RowLost` when it is the
    /// first, so it is dropped).
    async fn carry_out_batch(
        &self,
        batch: Vec<outbox::Write>,
        ids: std::collections::HashMap<i64, i64>,
        seq: u64,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let done = self.backend.write_batch(batch, ids, seq).await?;
        for r in &done.resolved {
            self.remember_written(r);
        }
        Ok(done.done)
    }

    /// Writes waiting for the backend, and why.
    pub fn health(&self) -> RecordHealth {
        let o = self.outbox();
        RecordHealth {
            pending: o.len(),
            // Writes merely queued for the writer are not a problem; refused ones are.
            error: o
                .down
                .clone()
                .or_else(|| o.error.clone().filter(|_| !o.is_empty())),
            dropped: o.dropped,
        }
    }

    /// This record, writing only while `fence` allows (a leader's valid Lease).
    pub fn fenced(&self, fence: Fence) -> Store {
        Store {
            fence,
            ..self.clone()
        }
    }

    fn allowed(&self, what: &str) -> Result<(), StoreError> {
        Ok(self.fence.check(what)?)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Notified after every write.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Record an API deploy request, or return the one already recorded under the same
    /// idempotency key (the caller compares body hashes).
    pub async fn put_request(&self, r: &RequestRecord) -> Result<RequestRecord, StoreError> {
        self.allowed("a record write (request)")?;
        self.ask(self.backend.put_request(r)).await
    }

    pub async fn request_by_key(
        &self,
        idempotency_key: &str,
    ) -> Result<Option<RequestRecord>, StoreError> {
        self.ask(self.backend.request_by_key(idempotency_key)).await
    }

    pub async fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.ask(self.backend.request(id)).await
    }

    /// The deploy a request led to, if it has started.
    pub async fn deploy_for_request(&self, id: &str) -> Result<Option<DeployRecord>, StoreError> {
        self.ask(self.backend.deploy_for_request(id)).await
    }

    /// A service's row, with any writes still waiting laid over it: a pin kept in memory
    /// during an outage still pins. In the daemon, while the record is away, the row as last
    /// read (with the waiting writes over it).
    pub async fn service(&self, key: &ServiceKey) -> Result<Option<ServiceRecord>, StoreError> {
        self.consistent(
            || self.backend.service(key),
            |o, row| self.lay_service(o, key, row),
        )
        .await
    }

    /// Several services' rows at once ([`Self::service`] for each, in order): one trip to the
    /// record for a batch of files read together.
    pub async fn services_of(
        &self,
        keys: &[ServiceKey],
    ) -> Result<Vec<Option<ServiceRecord>>, StoreError> {
        self.consistent(
            || self.backend.services_of(keys),
            |o, got| {
                keys.iter()
                    .zip(got?)
                    .map(|(k, row)| self.lay_service(o, k, Ok(row)))
                    .collect()
            },
        )
        .await
    }

    fn lay_service(
        &self,
        o: &outbox::Outbox,
        key: &ServiceKey,
        row: Result<Option<ServiceRecord>, StoreError>,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        let row = self.remembered(key, row);
        if o.is_empty() {
            return row;
        }
        match row {
            Ok(r) => Ok(o.overlay(key, r)),
            Err(e) => o.overlay(key, None).map(Some).ok_or(e),
        }
    }

    /// What a deploy starts from: the service's row ([`Self::service`]) and its unfinished
    /// deploys ([`Self::open_deploys`]), read at once.
    pub async fn deploy_basis(
        &self,
        key: &ServiceKey,
    ) -> Result<(Option<ServiceRecord>, Vec<DeployRecord>), StoreError> {
        self.consistent(
            || self.backend.deploy_basis(key),
            |o, got| match got {
                Ok((row, open)) => {
                    let open = lay_open(o, key, Ok::<_, StoreError>(open))?;
                    Ok((self.lay_service(o, key, Ok(row))?, open))
                }
                Err(e) => {
                    // Both from the queued writes (and the row last read), or the error.
                    let Ok(open) = lay_open(o, key, Err(())) else {
                        return Err(e);
                    };
                    Ok((self.lay_service(o, key, Err(e))?, open))
                }
            },
        )
        .await
    }

    /// A service change now in the backend is made to the row as last read too, so that row
    /// stays what the backend holds.
    fn remember_written(&self, w: &outbox::Write) {
        if let outbox::Write::Service { key, change, .. } = w {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(row) = known.get_mut(key) {
                change.apply(row);
            }
        }
    }

    /// With a writer on a record server: the backend's answer for `key` kept, or, when it
    /// gave none (away), the row as last read instead. A local SQLite file keeps answering
    /// reads while it refuses writes (a full disk), so no copy is kept for it: at 10,000
    /// services the copies cost 8 MiB of resident memory.
    fn remembered(
        &self,
        key: &ServiceKey,
        row: Result<Option<ServiceRecord>, StoreError>,
    ) -> Result<Option<ServiceRecord>, StoreError> {
        if self.writer().is_none() || self.backend.local() {
            return row;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        match row {
            Ok(Some(r)) => {
                known.insert(key.clone(), r.clone());
                Ok(Some(r))
            }
            Ok(None) => {
                known.remove(key);
                Ok(None)
            }
            Err(e) => known.get(key).cloned().map(Some).ok_or(e),
        }
    }

    pub async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.consistent(
            || self.backend.services(),
            |o, rows| {
                let rows = rows?;
                Ok(if o.is_empty() {
                    rows
                } else {
                    o.overlay_all(rows)
                })
            },
        )
        .await
    }

    /// One page of services, in `(namespace, name)` order, with the writes still waiting in
    /// memory laid over it; how many services the filter keeps in all (as the backend holds
    /// them); and where the next page starts. Only the page is read, however many services
    /// there are. Services only the waiting writes know yet follow the last page.
    pub async fn services_page(&self, q: &ServicesQuery) -> Result<ServicesPage, StoreError> {
        let (rows, total) = self.ask(self.backend.services_page(q)).await?;
        let next = page::next_after(&rows, q.limit);
        let waiting = {
            let o = self.outbox();
            (!o.is_empty()).then(|| o.service_keys())
        };
        let Some(waiting) = waiting else {
            return Ok(ServicesPage { rows, total, next });
        };
        let mut unknown = Vec::new();
        if next.is_none() {
            let shown: std::collections::HashSet<ServiceKey> =
                rows.iter().map(ServiceRecord::key).collect();
            for key in waiting.into_iter().filter(|k| !shown.contains(k)) {
                if self.ask(self.backend.service(&key)).await?.is_none() {
                    unknown.push(key);
                }
            }
        }
        let o = self.outbox();
        let rows = page::lay_over(q, rows, &unknown, |k, r| o.overlay(k, r));
        Ok(ServicesPage { rows, total, next })
    }

    /// Set the fields `change` names on the service's row (creating it if missing). Kept in
    /// memory and written later when the backend refuses it.
    pub async fn change_service(
        &self,
        key: &ServiceKey,
        change: ServiceChange,
    ) -> Result<(), StoreError> {
        let w = outbox::Write::Service {
            key: key.clone(),
            change,
            at: now(),
        };
        self.write("a record write (service)", w).await.map(|_| ())
    }

    /// Record a deploy as started; returns its id.
    pub async fn start_deploy(&self, d: &DeployRecord) -> Result<i64, StoreError> {
        let w = outbox::Write::Start {
            local: 0,
            record: d.clone(),
        };
        Ok(self
            .write("a record write (deploy)", w)
            .await?
            .unwrap_or_default())
    }

    pub async fn finish_deploy(
        &self,
        id: i64,
        outcome: DeployOutcome,
        message: &str,
    ) -> Result<(), StoreError> {
        let w = outbox::Write::Finish {
            id,
            outcome,
            message: message.to_string(),
            at: now(),
        };
        self.write("a record write (deploy)", w).await.map(|_| ())
    }

    /// Note a file whose name is refused (written only when it changes, so a resync costs
    /// nothing).
    pub async fn refuse_file(&self, path: &str, reason: &str) -> Result<(), StoreError> {
        self.allowed("a record write (refused file)")?;
        let file = RefusedFile {
            path: path.to_string(),
            reason: reason.to_string(),
            seen_at: now(),
        };
        self.ask(self.backend.refuse_file(&file)).await?;
        self.changed();
        Ok(())
    }

    /// Append a request, an approver's word or a rejection's mark to the approvals table
    /// (written at once: the word must be there when the file is read again).
    pub async fn add_vote(
        &self,
        key: &ServiceKey,
        v: &crate::domain::approval::Vote,
    ) -> Result<(), StoreError> {
        self.allowed("a record write (approval)")?;
        self.ask(self.backend.add_vote(key, v)).await?;
        self.changed();
        Ok(())
    }

    /// The service's latest approval rows, oldest first (enough for any save's words).
    pub async fn votes(
        &self,
        key: &ServiceKey,
    ) -> Result<Vec<crate::domain::approval::Vote>, StoreError> {
        self.ask(self.backend.votes(key, MAX_VOTES)).await
    }

    /// A refused file is gone or renamed.
    pub async fn unrefuse_file(&self, path: &str) -> Result<(), StoreError> {
        self.allowed("a record write (refused file)")?;
        self.ask(self.backend.unrefuse_file(path)).await?;
        self.changed();
        Ok(())
    }

    /// Files refused for their names, by path.
    pub async fn refused_files(&self) -> Result<Vec<RefusedFile>, StoreError> {
        self.ask(self.backend.refused_files()).await
    }

    /// One page of the files refused for their names: at most `limit` after the path
    /// `after` (empty: from the first), and how many there are in all. What the page and the
    /// API show, whatever the number of files.
    pub async fn refused_page(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<RefusedFile>, usize), StoreError> {
        self.ask(self.backend.refused_page(after, limit)).await
    }

    /// Remove a service's row, its history kept (`depwatch forget`); `false` when unknown.
    pub async fn forget_service(&self, key: &ServiceKey) -> Result<bool, StoreError> {
        self.allowed("a record write (forget)")?;
        let gone = self.ask(self.backend.forget_service(key)).await?;
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        self.changed();
        Ok(gone)
    }

    /// Before a rollback's patch: the images it restores, on the deploy's row.
    /// Before a rollback's patch: the images it restores and why, on the deploy's row (a
    /// stop before the rollback ends is finished at the next start, with the same reason).
    pub async fn set_restore(
        &self,
        id: i64,
        restore: &Images,
        why: &str,
    ) -> Result<(), StoreError> {
        let w = outbox::Write::Restore {
            id,
            restore: restore.to_string(),
            why: why.to_string(),
        };
        self.write("a record write (deploy)", w).await.map(|_| ())
    }

    /// The rollout is healthy and its checks bake: when they began and their baselines, on
    /// the deploy's row (a stop during the bake resumes it with the time left).
    pub async fn set_bake(
        &self,
        id: i64,
        bake: &crate::domain::verify::BakeRow,
    ) -> Result<(), StoreError> {
        let w = outbox::Write::Bake {
            id,
            bake: bake.to_text(),
        };
        self.write("a record write (deploy)", w).await.map(|_| ())
    }

    /// Newest first.
    pub async fn history(
        &self,
        key: Option<&ServiceKey>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError> {
        self.ask(self.backend.history(key, None, limit)).await
    }

    /// One page of [`Store::history`]: at most `limit` rows older than the row `after` (the
    /// last of the previous page), newest first.
    pub async fn history_page(
        &self,
        key: Option<&ServiceKey>,
        after: Option<i64>,
        limit: usize,
    ) -> Result<Vec<DeployRecord>, StoreError> {
        self.ask(self.backend.history(key, after, limit)).await
    }

    /// The newest unfinished deploy of a service, if any.
    pub async fn in_progress(&self, key: &ServiceKey) -> Result<Option<DeployRecord>, StoreError> {
        Ok(self.open_deploys(key).await?.into_iter().next())
    }

    /// The service's unfinished deploys (a stop interrupted them, or they were handed over to
    /// a newer version), newest first, with those written only to the outbox so far.
    pub async fn open_deploys(&self, key: &ServiceKey) -> Result<Vec<DeployRecord>, StoreError> {
        self.consistent(
            || self.backend.open_deploys(key),
            |o, rows| lay_open(o, key, rows),
        )
        .await
    }

    /// Apply the retention policy: keep at most `keep` deploys per service, and none older
    /// than `max_age`. Unfinished deploys are always kept. Returns how many were removed.
    pub async fn prune(
        &self,
        keep: usize,
        max_age: Option<std::time::Duration>,
    ) -> Result<usize, StoreError> {
        self.allowed("a record write (retention)")?;
        let cutoff = max_age.map(|age| {
            timestamp(
                jiff::Timestamp::now()
                    .checked_sub(
                        jiff::SignedDuration::try_from(age).unwrap_or(jiff::SignedDuration::MAX),
                    )
                    .unwrap_or(jiff::Timestamp::MIN),
            )
        });
        self.ask(self.backend.prune(keep, cutoff.as_deref())).await
    }

    /// Every deploy still in progress (a stop or a dead leader left it), oldest first: the next
    /// start finishes each from the cluster's state.
    pub async fn interrupted(&self) -> Result<Vec<DeployRecord>, StoreError> {
        self.ask(self.backend.interrupted()).await
    }
}

/// A service's unfinished deploys as read, with the queued writes laid over them: rows the
/// queue finishes are left out, and one started while the backend was away comes first.
fn lay_open<E>(
    o: &outbox::Outbox,
    key: &ServiceKey,
    rows: Result<Vec<DeployRecord>, E>,
) -> Result<Vec<DeployRecord>, E> {
    if o.is_empty() {
        return rows;
    }
    let mut rows = match rows {
        Ok(rows) => rows,
        Err(e) => return o.unfinished_of(key).map(|d| vec![d]).ok_or(e),
    };
    rows.retain(|d| !o.finishes(d.id));
    if let Some(d) = o.unfinished_of(key) {
        rows.insert(0, d);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_is_what_the_file_asks_and_says_why_it_is_not_running() {
        use NotRunning::*;
        use ServiceStatus as S;
        let running = "web=r.example/web:1.0";
        let row = |status, content: &str, desired: &str, asked: (&str, &str)| ServiceRecord {
            status,
            content_hash: content.into(),
            desired: Images::parse(desired),
            requested: asked.0.into(),
            requested_hash: asked.1.into(),
            ..ServiceRecord::default()
        };
        let mut suspended = row(S::Succeeded, "h1", running, ("1.1", "h2"));
        suspended.suspended = true;
        let mut pinned = row(S::Failed, "h2", "web=r.example/web:1.1", ("1.1", "h2"));
        pinned.failed_hash = "h2".into();
        let mut suspended_same = row(S::Succeeded, "h1", running, ("1.0", "h1"));
        suspended_same.suspended = true;
        let cases: Vec<(&str, ServiceRecord, &str, Option<NotRunning>)> = vec![
            (
                "running what it asks",
                row(S::Succeeded, "h1", running, ("1.0", "h1")),
                running,
                None,
            ),
            (
                "a record from before requests were kept",
                row(S::Succeeded, "h1", running, ("", "")),
                running,
                None,
            ),
            (
                "a change waiting for resume",
                suspended,
                "1.1",
                Some(Suspended),
            ),
            ("suspended, nothing waiting", suspended_same, running, None),
            (
                "a failed version, pinned",
                pinned,
                "web=r.example/web:1.1",
                Some(Pinned),
            ),
            (
                "a tag the registry refused",
                row(S::Failed, "h2", "", ("1.1-typo", "h2")),
                "1.1-typo",
                Some(Refused),
            ),
            (
                "a file that does not parse",
                row(S::Invalid, "h1", running, ("", "h2")),
                "",
                Some(Refused),
            ),
            (
                "read, not yet planned",
                row(S::Succeeded, "h1", running, ("1.1", "h2")),
                "1.1",
                None,
            ),
            (
                "being deployed",
                row(S::Deploying, "h1", "web=r.example/web:1.1", ("1.1", "h2")),
                "web=r.example/web:1.1",
                None,
            ),
            (
                "a paused workload",
                row(S::Paused, "h2", "web=r.example/web:1.1", ("1.1", "h2")),
                "web=r.example/web:1.1",
                None,
            ),
        ];
        for (case, record, shown, why) in cases {
            assert_eq!(record.desired_shown(), (shown.to_string(), why), "{case}");
        }
    }

    #[tokio::test]
    async fn records_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ServiceKey::new("web", "demo").expect("key");
        {
            let s = Store::open(dir.path()).expect("open");
            s.change_service(
                &key,
                ServiceChange::default()
                    .desired(Images::parse("web=example.com/web:1.1"))
                    .status(ServiceStatus::Deploying),
            )
            .await
            .expect("put");
            let id = s
                .start_deploy(&DeployRecord {
                    namespace: "demo".into(),
                    name: "web".into(),
                    trigger: Trigger::File,
                    actor: "file".into(),
                    from_image: "web=example.com/web:1.0".into(),
                    to_image: "web=example.com/web:1.1".into(),
                    started_at: now(),
                    outcome: DeployOutcome::InProgress,
                    ..DeployRecord::default()
                })
                .await
                .expect("start");
            assert_eq!(s.interrupted().await.expect("q").len(), 1);
            s.finish_deploy(id, DeployOutcome::Succeeded, "healthy")
                .await
                .expect("finish");
        }
        let s = Store::open(dir.path()).expect("reopen");
        let r = s.service(&key).await.expect("q").expect("exists");
        assert_eq!(r.desired.to_string(), "web=example.com/web:1.1");
        let h = s.history(Some(&key), 10).await.expect("history");
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
        assert_eq!(h[0].to_image, "web=example.com/web:1.1");
        assert!(h[0].ended_at.is_some());
        assert!(s.interrupted().await.expect("q").is_empty());
    }

    #[tokio::test]
    async fn retention_keeps_the_newest_per_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        for svc in ["a", "b"] {
            for _ in 0..5 {
                let id = s
                    .start_deploy(&DeployRecord {
                        namespace: "ns".into(),
                        name: svc.into(),
                        started_at: now(),
                        outcome: DeployOutcome::InProgress,
                        ..DeployRecord::default()
                    })
                    .await
                    .expect("start");
                s.finish_deploy(id, DeployOutcome::Succeeded, "")
                    .await
                    .expect("finish");
            }
        }
        assert_eq!(s.prune(3, None).await.expect("prune"), 4);
        let a = ServiceKey::new("a", "ns").expect("key");
        assert_eq!(s.history(Some(&a), 10).await.expect("h").len(), 3);
        assert_eq!(
            s.prune(3, Some(std::time::Duration::ZERO))
                .await
                .expect("prune"),
            6
        );
        assert!(s.history(None, 10).await.expect("h").is_empty());
    }

    /// With a writer, a write is seen at once by reads (from the queue), then is in the
    /// database once settled; a write naming a deploy row that was never written is dropped
    /// and counted, and the writes behind it still land.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_carries_out_writes_in_order_and_drops_what_never_can_be() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path())
            .expect("open")
            .with_writer()
            .expect("writer");
        let key = ServiceKey::new("web", "demo").expect("key");
        s.finish_deploy(-99, DeployOutcome::Succeeded, "never started")
            .await
            .expect("queued");
        s.change_service(
            &key,
            ServiceChange::default().status(ServiceStatus::Deploying),
        )
        .await
        .expect("queued");
        let seen = s.service(&key).await.expect("read").expect("row");
        assert_eq!(seen.status, ServiceStatus::Deploying, "read from the queue");
        let id = s
            .start_deploy(&DeployRecord {
                namespace: "demo".into(),
                name: "web".into(),
                outcome: DeployOutcome::InProgress,
                ..DeployRecord::default()
            })
            .await
            .expect("queued");
        assert!(id < 0, "a local id while it waits: {id}");
        s.finish_deploy(id, DeployOutcome::Succeeded, "healthy")
            .await
            .expect("queued");
        s.settled().await;
        let other = Store::open_read_only(dir.path()).expect("read-only");
        let row = other.service(&key).await.expect("q").expect("written");
        assert_eq!(row.status, ServiceStatus::Deploying);
        let h = other.history(Some(&key), 10).await.expect("history");
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h[0].outcome, DeployOutcome::Succeeded);
        let health = s.health();
        assert_eq!((health.pending, health.dropped, health.error), (0, 1, None));
        s.close().await;
    }

    #[test]
    fn an_unwritable_state_dir_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let e = Store::open(&file.join("sub")).err().expect("fails");
        assert!(e.to_string().contains("not-a-dir"), "{e}");
    }
}
