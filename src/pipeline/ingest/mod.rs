//! Stage 3, reading: a path that may have changed is read, hashed and parsed; a new valid
//! version becomes the service's desired state in the scheduler. Unchanged content (a `touch`,
//! our own reads, a restart) never deploys; a pinned failed version is not retried; an invalid
//! file is reported and changes nothing. Also drives the watcher → debouncer loop, the start-up
//! scan, rescans on overflow and the periodic resync (level-triggered: the whole directory is
//! compared with the record).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

mod decide;
mod gates;

use crate::bounds::Bounds;
use crate::depfile;
use crate::domain::verify::Verification;
use crate::domain::window::Gate;
use crate::domain::{Asker, DepSpec, Desired, ServiceKey, ServiceStatus, Trigger};
use crate::pipeline::debounce::{Debouncer, Gated, ReadGate, Signal, Verdict};
use crate::pipeline::deploy::recorder::verdict;
use crate::pipeline::queue::Scheduler;
use crate::pipeline::watch::{Barriers, FileEvent};
use crate::policy::{self, Policy};

/// A file of this name freezes every service whose file is in its directory or below.
pub const FREEZE: &str = "FREEZE";
use crate::safefs::{self, shown};
use crate::store::OrLog;
use crate::store::{ServiceChange, ServiceRecord, Store};

pub fn content_hash(bytes: &[u8]) -> String {
    crate::domain::hex(&Sha256::digest(bytes))
}

/// The meaningful text of a file, for comparing a seed `.last` with a `.dep`.
fn meaningful(text: &str) -> String {
    text.lines()
        .map(depfile::strip_comment)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What ingest accepts: files up to a size, services and images within the bounds.
#[derive(Debug, Clone)]
pub struct FileRules {
    pub max_file_size: u64,
    pub bounds: Arc<Bounds>,
}

impl Default for FileRules {
    fn default() -> Self {
        FileRules {
            max_file_size: crate::safefs::DEFAULT_MAX_FILE_SIZE,
            bounds: Arc::default(),
        }
    }
}

pub struct Ingest {
    dir: PathBuf,
    rules: FileRules,
    store: Store,
    scheduler: Scheduler,
    /// Which service each seen path defines.
    known: HashMap<PathBuf, ServiceKey>,
    /// The same, by service: which paths define it (two is a conflict).
    paths_of: HashMap<ServiceKey, HashSet<PathBuf>>,
    /// Every record, read once for the start-up scan: 10,000 files cost one query, not
    /// 10,000. Nothing deploys before that scan ends, so the copy cannot go stale.
    startup_records: Option<HashMap<ServiceKey, ServiceRecord>>,
    /// Records read together for a batch of files about to be judged, each taken once: a
    /// burst of saves costs one trip to the record, not one per file.
    batch_records: HashMap<ServiceKey, Option<ServiceRecord>>,
    /// Services with a deploy left in progress by a stop, not yet handed to the scheduler.
    unfinished: HashSet<ServiceKey>,
    /// Files refused for their names, with why: recorded once, cleared when they go.
    refused_names: HashMap<PathBuf, String>,
    /// The policy file as last read.
    policy: PolicyState,
    /// The policy or a `FREEZE` file changed since the last rescan: every file is judged
    /// again.
    policy_changed: bool,
    /// The earliest moment a stopped save is due (a deploy window opens, an approval wait
    /// ends, a deploy it waits behind may have ended): every file is judged again then.
    wake_at: Option<jiff::Timestamp>,
    /// Tells the team when a save is held, and when it is released.
    notifier: Option<crate::alert::Notifier>,
    /// Asks the registries for the digests of a save awaiting approval (the pre-flight's).
    resolver: Option<crate::pipeline::deploy::Deployer>,
    /// Those questions under way, owned here: dropped with ingest.
    resolving: tokio::task::JoinSet<()>,
}

/// The policy file (`depwatch-policy.yaml`) as last read.
#[derive(Debug, Clone, Default, PartialEq)]
enum PolicyState {
    #[default]
    Absent,
    Valid {
        hash: String,
        policy: Arc<Policy>,
    },
    /// Nothing deploys while the policy cannot be read: deploying without its rules could
    /// loosen what the platform team set.
    Invalid {
        hash: String,
        problems: String,
    },
}

impl Ingest {
    pub fn new(dir: PathBuf, store: Store, scheduler: Scheduler, rules: FileRules) -> Self {
        Ingest {
            dir,
            rules,
            store,
            scheduler,
            known: HashMap::new(),
            paths_of: HashMap::new(),
            startup_records: None,
            batch_records: HashMap::new(),
            unfinished: HashSet::new(),
            refused_names: HashMap::new(),
            policy: PolicyState::Absent,
            policy_changed: false,
            wake_at: None,
            notifier: None,
            resolver: None,
            resolving: tokio::task::JoinSet::new(),
        }
    }

    /// Ask the registries (as the pre-flight does) for the digests of each save that needs
    /// approval: its approvers approve them, and its deploy must find them still.
    pub fn resolve_with(&mut self, deployer: crate::pipeline::deploy::Deployer) {
        self.resolver = Some(deployer);
    }

    /// Tell the team (Slack and the other receivers) when a save is held or released.
    pub fn notify(&mut self, notifier: crate::alert::Notifier) {
        self.notifier = Some(notifier);
    }

    /// Why a save may not go now, when it may not: a `FREEZE` file in its directory or one
    /// above it (up to the deps root), or the deploy windows of its namespace and its own.
    fn gate(&self, path: &Path, namespace: &str, own: &[crate::domain::window::Window]) -> Gate {
        if let Some(why) = self.frozen(path) {
            return Gate::Held { until: None, why };
        }
        let mut windows = match &self.policy {
            PolicyState::Valid { policy, .. } => policy.windows(namespace),
            _ => Vec::new(),
        };
        windows.extend(own.iter().cloned());
        match windows.is_empty() {
            true => Gate::Open,
            false => crate::domain::window::decide(&windows, jiff::Timestamp::now()),
        }
    }

    /// The nearest `FREEZE` file at or above the file's directory, with its reason.
    fn frozen(&self, path: &Path) -> Option<String> {
        let start = path.parent()?;
        for dir in start.ancestors() {
            if !dir.starts_with(&self.dir) {
                break;
            }
            let freeze = dir.join(FREEZE);
            if std::fs::symlink_metadata(&freeze).is_err() {
                continue;
            }
            let reason = safefs::read_capped(&self.dir, &freeze, 4096)
                .map(|b| String::from_utf8_lossy(&b).trim().to_string())
                .unwrap_or_default();
            let reason = match reason.is_empty() {
                true => "no reason given".to_string(),
                false => safefs::escape(&reason),
            };
            return Some(format!("frozen by {}: {reason}", shown(&freeze)));
        }
        None
    }

    /// When a held save may go, for the loop's timer (the earliest of them).
    pub fn wake_at(&self) -> Option<jiff::Timestamp> {
        self.wake_at
    }

    fn policy_path(&self) -> PathBuf {
        self.dir.join(policy::FILE_NAME)
    }

    /// Read the policy file again; whether it changed (a rescan then judges every file
    /// under it: files refused while it was invalid are taken).
    async fn reload_policy(&mut self) -> bool {
        let path = self.policy_path();
        let Some(next) = self.read_policy(&path).await else {
            return false;
        };
        if next == self.policy {
            return false;
        }
        announce_policy(&path, &next);
        let shown_path = path.display().to_string();
        let was_invalid = matches!(self.policy, PolicyState::Invalid { .. });
        match &next {
            PolicyState::Invalid { problems, .. } => self
                .store
                .refuse_file(&shown_path, problems)
                .await
                .or_log("refuse file"),
            _ if was_invalid => self
                .store
                .unrefuse_file(&shown_path)
                .await
                .or_log("unrefuse file"),
            _ => {}
        }
        self.policy = next;
        true
    }

    /// The policy file as it reads now, or None when its bytes are those last read.
    async fn read_policy(&self, path: &Path) -> Option<PolicyState> {
        let read =
            safefs::read_capped_async(self.dir.clone(), path.to_path_buf(), policy::MAX_SIZE).await;
        let bytes = match read {
            Err(e) if e.is_missing() => return Some(PolicyState::Absent),
            Err(e) => {
                return Some(PolicyState::Invalid {
                    hash: String::new(),
                    problems: e.to_string(),
                })
            }
            Ok(bytes) => bytes,
        };
        let hash = content_hash(&bytes);
        if let PolicyState::Valid { hash: h, .. } | PolicyState::Invalid { hash: h, .. } =
            &self.policy
        {
            if *h == hash {
                return None;
            }
        }
        Some(match policy::parse(&bytes) {
            Ok(p) => PolicyState::Valid {
                hash,
                policy: Arc::new(p),
            },
            Err(list) => PolicyState::Invalid {
                hash,
                problems: list
                    .iter()
                    .map(|p| p.at(&shown(path)))
                    .collect::<Vec<_>>()
                    .join("; "),
            },
        })
    }

    /// Whether the policy changed since this was last asked (the loop rescans).
    pub fn take_policy_changed(&mut self) -> bool {
        std::mem::take(&mut self.policy_changed)
    }

    /// A file's verification under the policy, or why it cannot be deployed now.
    fn under_policy(
        &self,
        key: &ServiceKey,
        file: &str,
        own: Option<Verification>,
    ) -> Result<Option<Verification>, String> {
        match &self.policy {
            PolicyState::Absent => Ok(own),
            PolicyState::Valid { policy, .. } => {
                policy.verification(key, file, own).map_err(|c| c.0)
            }
            PolicyState::Invalid { problems, .. } => Err(format!(
                "{file}: not deployed while the policy file is invalid ({problems}); it is read again once the policy is fixed"
            )),
        }
    }

    /// `path` no longer defines a service; whether any path still defines `key`.
    fn unknow(&mut self, path: &Path, key: &ServiceKey) -> (bool, bool) {
        let was = self.known.remove(path).is_some();
        let paths = self.paths_of.get_mut(key);
        if let Some(set) = paths {
            set.remove(path);
            if set.is_empty() {
                self.paths_of.remove(key);
            }
        }
        (was, self.paths_of.contains_key(key))
    }

    fn know(&mut self, path: &Path, key: &ServiceKey) {
        self.known.insert(path.to_path_buf(), key.clone());
        self.paths_of
            .entry(key.clone())
            .or_default()
            .insert(path.to_path_buf());
    }

    /// Another existing file that defines `key`, if any.
    fn other_definition(&self, key: &ServiceKey, path: &Path) -> Option<PathBuf> {
        self.paths_of
            .get(key)?
            .iter()
            .find(|p| p.as_path() != path && p.exists())
            .cloned()
    }

    /// A service's record: from the start-up copy during the start-up scan, or the batch
    /// read just before, else the store.
    async fn record(&mut self, key: &ServiceKey) -> Option<ServiceRecord> {
        if let Some(r) = self.startup_records.as_ref().and_then(|m| m.get(key)) {
            return Some(r.clone());
        }
        if let Some(r) = self.batch_records.remove(key) {
            return r;
        }
        self.store.service(key).await.ok().flatten()
    }

    /// The batch is judged: what it did not use is let go.
    pub fn end_batch(&mut self) {
        self.batch_records.clear();
    }

    /// Read the records of a batch of files about to be judged in one trip (none for a
    /// single file, or during the start-up scan, which has every record already).
    pub async fn prefetch(&mut self, keys: Vec<ServiceKey>) {
        self.batch_records.clear();
        if keys.len() < 2 || self.startup_records.is_some() {
            return;
        }
        if let Ok(rows) = self.store.services_of(&keys).await {
            self.batch_records = keys.into_iter().zip(rows).collect();
        }
    }

    /// Import a seed `<name>.last` beside a `.dep` on first sight of the service (no record
    /// yet): if it records the same version the file asks for, that version counts as
    /// deployed. Whether it was imported.
    async fn import_last(&self, path: &Path, key: &ServiceKey, text: &str, hash: &str) -> bool {
        let last = path.with_extension("last");
        // The seed's record is read as carefully as the file itself.
        let read =
            safefs::read_capped_async(self.dir.clone(), last.clone(), self.rules.max_file_size);
        let Ok(previous) = read.await else {
            return false;
        };
        let previous = String::from_utf8_lossy(&previous);
        let same = meaningful(&previous) == meaningful(text);
        if same {
            self.store
                .change_service(
                    key,
                    verdict::imported(hash, &shown(&last)).path(path.display().to_string()),
                )
                .await
                .or_log("change service");
            tracing::info!(service = %key, file = %shown(&last), "imported the seed's last deployed version; no redeploy");
        }
        same
    }

    /// A file that cannot be acted on: say why once, record it, deploy nothing; the last good
    /// state stays.
    async fn refuse(
        &mut self,
        key: &ServiceKey,
        path: &Path,
        status: ServiceStatus,
        message: String,
    ) {
        tracing::error!(service = %key, error = %message, "dependency file refused; nothing deployed, the last good state stays");
        // A deploy under way keeps its status; its verdict comes later.
        self.store
            .change_service(
                key,
                verdict::file_refused(status, message).path_if_unset(path.display().to_string()),
            )
            .await
            .or_log("change service");
    }

    /// A file whose name is not a dependency file's: recorded (once) so status, the page and
    /// the API list it; cleared when it is gone.
    async fn refuse_name(&mut self, path: &Path, reason: String) {
        if std::fs::symlink_metadata(path).is_err() {
            if self.refused_names.remove(path).is_some() {
                self.store
                    .unrefuse_file(&path.display().to_string())
                    .await
                    .or_log("unrefuse file");
            }
            return;
        }
        if self.refused_names.get(path) == Some(&reason) {
            return;
        }
        tracing::error!(error = %reason, "invalid dependency file name; nothing is read from it");
        self.store
            .refuse_file(&path.display().to_string(), &reason)
            .await
            .or_log("refuse file");
        self.refused_names.insert(path.to_path_buf(), reason);
    }

    /// Services with a deploy left in progress: their file is handed to the scheduler at the
    /// next read even when its version is pinned or unchanged, so the deploy is finished.
    pub fn unfinished(&mut self, keys: impl IntoIterator<Item = ServiceKey>) {
        self.unfinished.extend(keys);
    }

    /// Act on one path that may have changed.
    pub async fn path_changed(&mut self, path: &Path, trigger: Trigger) {
        self.paths_changed(vec![path.to_path_buf()], trigger).await
    }

    /// Act on paths that may have changed: read, then judged one by one.
    pub async fn paths_changed(&mut self, paths: Vec<PathBuf>, trigger: Trigger) {
        let reads = self.read(paths).await;
        self.prefetch(reads.iter().map(|(_, (k, _))| k.clone()).collect())
            .await;
        for (path, read) in reads {
            self.judge(&path, read, trigger).await;
        }
        self.end_batch();
    }

    /// Read the dependency files among `paths` in batches on the blocking pool (one trip per
    /// [`READ_BATCH`] files); a path whose name is no service's is refused here.
    pub async fn read(&mut self, paths: Vec<PathBuf>) -> Vec<(PathBuf, Read)> {
        let mut wanted: Vec<(PathBuf, ServiceKey)> = Vec::new();
        let policy_path = self.policy_path();
        let mut policy_touched = false;
        for p in paths {
            if p == policy_path {
                policy_touched = true;
                continue;
            }
            if p.file_name().is_some_and(|n| n == FREEZE) {
                tracing::info!(file = %shown(&p), "a FREEZE file changed; every file is judged again");
                self.policy_changed = true;
                continue;
            }
            match depfile::service_for_path(&p) {
                Ok(Some(k)) => wanted.push((p, k)),
                Ok(None) => {}
                Err(e) => self.refuse_name(&p, e.to_string()).await,
            }
        }
        if policy_touched && self.reload_policy().await {
            self.policy_changed = true;
        }
        let mut out = Vec::with_capacity(wanted.len());
        for chunk in wanted.chunks(READ_BATCH) {
            let paths: Vec<PathBuf> = chunk.iter().map(|(p, _)| p.clone()).collect();
            let reads =
                safefs::read_many_async(self.dir.clone(), paths, self.rules.max_file_size).await;
            for ((path, key), read) in chunk.iter().zip(reads) {
                out.push((path.clone(), (key.clone(), read)));
            }
        }
        out
    }

    /// Judge one file as read.
    pub async fn judge(&mut self, path: &Path, (key, read): Read, trigger: Trigger) {
        self.apply(path, key, read, trigger).await;
    }

    /// Judge one read file: removed, refused, invalid, unchanged, pinned, or a new desired
    /// version for the scheduler.
    async fn apply(
        &mut self,
        path: &Path,
        key: ServiceKey,
        read: Result<Vec<u8>, safefs::ReadError>,
        trigger: Trigger,
    ) {
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.is_missing() => {
                let (was_known, still_defined) = self.unknow(path, &key);
                let shown_path = path.display().to_string();
                let refused = !was_known
                    && self
                        .record(&key)
                        .await
                        .is_some_and(|r| decide::refusal_of(&r, &shown_path));
                if decide::gone(was_known, still_defined, refused) {
                    self.unmanage(&key, path).await;
                }
                return;
            }
            Err(e) => {
                self.refuse(&key, path, ServiceStatus::Unreadable, e.to_string())
                    .await;
                return;
            }
        };
        let hash = content_hash(&bytes);
        let Some(spec) = self.admit(path, &key, &bytes, &hash).await else {
            return;
        };
        self.take(path, key, spec, &bytes, hash, trigger).await;
    }

    /// A file as read: its namespace within `--namespaces`, the only file of its service, a
    /// valid dependency file asking for images within `--allowed-images`; else refused here.
    async fn admit(
        &mut self,
        path: &Path,
        key: &ServiceKey,
        bytes: &[u8],
        hash: &str,
    ) -> Option<DepSpec> {
        if let Err(e) = self.rules.bounds.check_namespace(&key.namespace) {
            self.refuse(
                key,
                path,
                ServiceStatus::Invalid,
                format!("{}: {e}", shown(path)),
            )
            .await;
            return None;
        }
        if let Some(other) = self.other_definition(key, path) {
            let message = format!(
                "service {key} is defined twice, by {} and {}; nothing deployed until one is removed",
                shown(&other),
                shown(path)
            );
            tracing::error!("{message}");
            self.store
                .change_service(key, verdict::defined_twice(message))
                .await
                .or_log("change service");
            return None;
        }
        self.know(path, key);
        let file = shown(path);
        match depfile::parse(&file, bytes).and_then(|s| within_bounds(&self.rules.bounds, &file, s))
        {
            Ok(spec) => Some(spec),
            Err(e) => {
                tracing::error!(error = %e, "invalid dependency file; nothing deployed, the last good state stays");
                self.store
                    .change_service(
                        key,
                        verdict::file_refused(ServiceStatus::Invalid, e.to_string())
                            .path(path.display().to_string())
                            .requested("", hash),
                    )
                    .await
                    .or_log("change service");
                None
            }
        }
    }

    /// A valid file: what it asks is recorded, then the decision carried out.
    async fn take(
        &mut self,
        path: &Path,
        key: ServiceKey,
        spec: DepSpec,
        bytes: &[u8],
        hash: String,
        trigger: Trigger,
    ) {
        let file = shown(path);
        let record = self.row_for(path, &key, bytes, &hash).await;
        // What the file asks, when the record does not have it yet (written at the end).
        let shown_path = path.display().to_string();
        let asks = (record.requested_hash != hash || record.path != shown_path)
            .then(|| (spec.requested(), key.clone(), shown_path, hash.clone()));
        let queued = decide::Queued {
            desired_hash: self.scheduler.wanted(&key).map(|d| d.hash),
            busy_with_this: self.scheduler.busy_with(&key, &hash),
        };
        let unfinished = self.unfinished.remove(&key);
        let asker = Asker::find(&String::from_utf8_lossy(bytes));
        let read = decide::Valid {
            hash: &hash,
            asker: asker.clone(),
            trigger,
            unfinished,
        };
        let mut outcome = decide::valid(read, &record, &queued);
        let mut spec = spec;
        let digests = if self.apply_policy(&key, path, &mut spec, &outcome).await {
            let save = gates::Save {
                key: &key,
                path,
                record: &record,
                spec: &spec,
                hash: &hash,
                asker: asker.as_ref(),
                trigger,
            };
            self.pass_gates(&mut outcome, save).await
        } else {
            None
        };
        let Some(digests) = digests else {
            // Nothing is deployed from this read; a deploy left unfinished is finished once
            // the policy and the gates allow.
            if unfinished {
                self.unfinished.insert(key.clone());
            }
            self.write_asks(asks).await;
            return;
        };
        spec.approved_digests = digests;
        let desired = Desired {
            spec,
            hash,
            path: path.to_path_buf(),
            trigger: Trigger::SelfHeal,
            actor: "depwatch".into(),
            request_id: String::new(),
            seen_at: tokio::time::Instant::now(),
        };
        let queue_knows = queued.desired_hash.is_some();
        self.hand_on(key, &file, outcome, queue_knows, desired)
            .await;
        self.write_asks(asks).await;
    }

    /// The policy's verification laid over the file's own. False when the policy refuses a
    /// save that would be deployed (the refusal is recorded here).
    async fn apply_policy(
        &mut self,
        key: &ServiceKey,
        path: &Path,
        spec: &mut DepSpec,
        outcome: &decide::Outcome,
    ) -> bool {
        match self.under_policy(key, &shown(path), spec.verify.take()) {
            Ok(verify) => {
                spec.verify = verify;
                true
            }
            Err(why) if matches!(outcome, decide::Outcome::Submit { .. }) => {
                self.refuse(key, path, ServiceStatus::Invalid, why).await;
                false
            }
            Err(_) => true,
        }
    }

    /// Carry the decision out: the queue is handed the new version (with who asked), or
    /// learns what is desired when it does not know yet (for --self-heal).
    async fn hand_on(
        &mut self,
        key: ServiceKey,
        file: &str,
        outcome: decide::Outcome,
        queue_knows: bool,
        mut desired: Desired,
    ) {
        match outcome {
            decide::Outcome::Suspended => {
                tracing::info!(service = %key, "service is suspended; the change waits for `depwatch resume`")
            }
            decide::Outcome::Pinned => {
                tracing::debug!(service = %key, "content is a version that failed; pinned until it changes")
            }
            decide::Outcome::Busy => {}
            decide::Outcome::Remember if queue_knows => {}
            decide::Outcome::Remember => self.scheduler.remember(key, desired),
            decide::Outcome::Submit {
                trigger,
                actor,
                request_id,
            } => {
                tracing::info!(service = %key, %file, %trigger, "new desired version");
                (desired.trigger, desired.actor, desired.request_id) = (trigger, actor, request_id);
                self.scheduler.submit(key, desired).await;
            }
        }
    }

    /// The service's row for a file being taken: one read, again only when a seed (`.last`)
    /// was imported into it just now.
    async fn row_for(
        &mut self,
        path: &Path,
        key: &ServiceKey,
        bytes: &[u8],
        hash: &str,
    ) -> ServiceRecord {
        let mut record = self.record(key).await;
        if record.is_none()
            && self
                .import_last(path, key, &String::from_utf8_lossy(bytes), hash)
                .await
        {
            record = self.record(key).await;
        }
        record.unwrap_or_default()
    }

    /// A new desired version passes its approvers, windows and freezes (anything else passes
    /// as it is): `None` when it stops here, else the digests its approvers approved. The
    /// deploy's trigger and actor say who let it through.
    async fn pass_gates(
        &mut self,
        outcome: &mut decide::Outcome,
        save: gates::Save<'_>,
    ) -> Option<Option<crate::domain::Images>> {
        let decide::Outcome::Submit { actor, trigger, .. } = outcome else {
            return Some(None);
        };
        let save = gates::Save {
            trigger: *trigger,
            ..save
        };
        match self.gates(save).await {
            gates::Passed::Go {
                notes,
                released_by,
                digests,
            } => {
                if let Some(by) = released_by {
                    (*trigger, *actor) = (Trigger::Operator, by);
                }
                if !notes.is_empty() {
                    *actor = format!("{actor} ({})", notes.join("; "));
                }
                Some(digests)
            }
            gates::Passed::Stop => None,
        }
    }

    /// A save that may not go now: said on the row, and judged again when its window opens
    /// (or its freeze is lifted: the FREEZE file's removal brings a rescan).
    async fn hold(&mut self, key: &ServiceKey, gate: &Gate) {
        let message = gate.message();
        tracing::info!(service = %key, reason = %message, "save held; deployed by itself when it may go");
        if let Some(until) = gate.until() {
            self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
        }
        self.store
            .change_service(key, verdict::held(message))
            .await
            .or_log("change service");
    }

    /// What the file asks is shown as soon as it is read, whatever happens to it next:
    /// written once the version is handed on, so the write is not on the save → PATCH path.
    async fn write_asks(&self, asks: Option<(String, ServiceKey, String, String)>) {
        if let Some((words, service, path, hash)) = asks {
            let change = ServiceChange::default().requested(words, hash).path(path);
            self.store
                .change_service(&service, change)
                .await
                .or_log("change service");
        }
    }

    /// The file is gone and nothing else defines the service: no longer managed (nothing in
    /// the cluster is deleted).
    async fn unmanage(&mut self, key: &ServiceKey, path: &Path) {
        tracing::info!(service = %key, file = %shown(path), "dependency file removed; no longer managed (nothing is deleted in the cluster)");
        self.scheduler.forget(key);
        self.store
            .change_service(
                key,
                verdict::unmanaged(format!("{} was removed", shown(path))),
            )
            .await
            .or_log("change service");
    }

    /// Compare the whole directory with what is known and recorded, and act on every file.
    pub async fn rescan(&mut self, trigger: Trigger) {
        let present = self.rescan_except(trigger, &Default::default()).await;
        self.paths_changed(present, trigger).await;
        self.startup_records = None;
    }

    /// Compare the whole directory with what is known and recorded: files gone are acted on
    /// here; the files present are returned to be read, less those in `busy` (still open for
    /// writing, whose close will be reported, or read and not yet judged), so a rescan never
    /// reads a half-written file.
    pub async fn rescan_except(
        &mut self,
        trigger: Trigger,
        busy: &std::collections::HashSet<PathBuf>,
    ) -> Vec<PathBuf> {
        // Every file is judged below, so a changed policy needs no rescan of its own, and
        // the holds are found again.
        self.reload_policy().await;
        self.policy_changed = false;
        self.wake_at = None;
        let dir = self.dir.clone();
        let scanned = tokio::task::spawn_blocking(move || crate::pipeline::watch::scan(&dir))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let paths = match scanned {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(dir = %shown(&self.dir), error = %e, "cannot scan the dependency directory");
                return Vec::new();
            }
        };
        let present: HashSet<&PathBuf> = paths.iter().collect();
        let gone: Vec<PathBuf> = self
            .known
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        self.unrefuse_gone(&present, trigger).await;
        drop(present);
        self.paths_changed(gone, trigger).await;
        if trigger == Trigger::Startup {
            self.forget_removed_while_stopped(&paths).await;
            self.startup_records = self
                .store
                .services()
                .await
                .ok()
                .map(|all| all.into_iter().map(|r| (r.key(), r)).collect());
        }
        paths.into_iter().filter(|p| !busy.contains(p)).collect()
    }

    /// Refused names that are gone are refused no longer, including, at start-up, those
    /// recorded before a restart.
    async fn unrefuse_gone(&mut self, present: &HashSet<&PathBuf>, trigger: Trigger) {
        let mut gone: Vec<PathBuf> = self
            .refused_names
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        if trigger == Trigger::Startup {
            match self.store.refused_files().await {
                Ok(files) => gone.extend(
                    files
                        .into_iter()
                        .map(|f| PathBuf::from(f.path))
                        .filter(|p| !present.contains(p)),
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the refused files recorded before the restart; those since removed stay listed until the next rescan")
                }
            }
        }
        for p in gone {
            self.refused_names.remove(&p);
            self.store
                .unrefuse_file(&p.display().to_string())
                .await
                .or_log("unrefuse file");
        }
    }

    /// Services whose file was deleted while depwatch was stopped are no longer managed.
    async fn forget_removed_while_stopped(&self, present: &[PathBuf]) {
        let Ok(records) = self.store.services().await else {
            return;
        };
        let present: HashSet<&Path> = present.iter().map(PathBuf::as_path).collect();
        for r in records {
            let path = PathBuf::from(&r.path);
            let gone = !r.path.is_empty() && !present.contains(path.as_path()) && !path.exists();
            if gone && r.status != ServiceStatus::Unmanaged {
                tracing::info!(service = %r.key(), file = %r.path, "dependency file removed while depwatch was stopped; no longer managed");
                self.store
                    .change_service(
                        &r.key(),
                        verdict::unmanaged(format!("{} was removed", r.path)),
                    )
                    .await
                    .or_log("change service");
            }
        }
    }
}

/// How long a break-glass release stands for the content it names.
const RELEASE_FOR: jiff::SignedDuration = jiff::SignedDuration::from_hours(1);

/// An operator's break-glass release of this very content (`depwatch deploy --now`), given
/// within the last hour: a release is for the save held then, not for the same content saved
/// again in a later window.
fn break_glass<'r>(
    record: &'r ServiceRecord,
    hash: &str,
) -> Option<&'r crate::domain::verify::Judgement> {
    let j = record.judged.as_ref()?;
    let at: jiff::Timestamp = j.at.parse().ok()?;
    let fresh = jiff::Timestamp::now().duration_since(at) < RELEASE_FOR;
    (j.ruling == crate::domain::verify::Ruling::Release && j.hash == hash && fresh).then_some(j)
}

/// Images the file names in full must be within `--allowed-images` (plain versions are checked
/// when their repository is known, before the patch). Shared with `depwatch check`, so it
/// refuses what the daemon would.
pub fn within_bounds(
    bounds: &Bounds,
    file: &str,
    spec: crate::domain::DepSpec,
) -> Result<crate::domain::DepSpec, depfile::DepFileError> {
    let named = spec.images.iter().filter_map(|(_, image)| match image {
        crate::domain::ImageSpec::Reference(r) => Some(r.clone()),
        crate::domain::ImageSpec::Tag(t) => spec.repository.as_ref().map(|r| format!("{r}:{t}")),
        crate::domain::ImageSpec::Digest(d) => spec.repository.as_ref().map(|r| format!("{r}@{d}")),
    });
    for image in named {
        if let Err(e) = bounds.check_image(&image) {
            return Err(depfile::DepFileError {
                file: file.to_string(),
                line: None,
                message: e.to_string(),
            });
        }
    }
    Ok(spec)
}

/// One file as read: its service, and its bytes or why they could not be read.
pub type Read = (ServiceKey, Result<Vec<u8>, safefs::ReadError>);

/// Files read per trip to the blocking pool.
const READ_BATCH: usize = 256;

/// How often the dependency root's identity is checked besides its events.
const ROOT_CHECK: Duration = Duration::from_secs(1);

/// Settings of the watch → debounce → read loop.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub quiet: Duration,
    pub max_wait: Duration,
    pub resync: Duration,
}

/// Whether a read found the file empty (nothing but white space): just truncated for a
/// rewrite, most likely.
fn read_empty(read: &Read) -> bool {
    matches!(&read.1, Ok(b) if b.iter().all(u8::is_ascii_whitespace))
}

/// The file side of the loop: events coalesced by the debouncer, reads held at the gate until
/// their barrier shows the writer was done.
struct Files {
    debouncer: Debouncer,
    /// Reads, with what made them, waiting for their barrier.
    gate: ReadGate<(Read, Trigger)>,
    barriers: Barriers,
}

impl Files {
    fn new(config: &IngestConfig, barriers: Barriers) -> Files {
        Files {
            debouncer: Debouncer::new(config.quiet, config.max_wait),
            gate: ReadGate::new(config.max_wait),
            barriers,
        }
    }

    /// The earliest moment something is due.
    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        match (self.debouncer.next_deadline(), self.gate.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Paths not to be read by a rescan now: open for writing, or read and not yet judged.
    fn busy(&self) -> HashSet<PathBuf> {
        let mut busy = self.debouncer.writing();
        busy.extend(self.gate.holding().cloned());
        busy
    }

    fn event(&mut self, path: PathBuf, signal: Signal) {
        self.gate.saw(&path);
        self.debouncer
            .add(path, signal, tokio::time::Instant::now());
    }

    /// Read the paths whose wait is over.
    async fn read_due(&mut self, ingest: &mut Ingest) {
        let due = self.debouncer.take_due(tokio::time::Instant::now());
        self.read(ingest, due, Trigger::File).await;
    }

    /// Compare the whole directory with the record; the files present are read like any other
    /// (files still open, or held at the gate, are left to their own events).
    async fn rescan(&mut self, ingest: &mut Ingest, trigger: Trigger) {
        let present = ingest.rescan_except(trigger, &self.busy()).await;
        self.read(ingest, present, trigger).await;
    }

    /// Read `paths`, and hold the reads until their barrier comes out (or decide them at once
    /// when no barrier can be raised).
    async fn read(&mut self, ingest: &mut Ingest, paths: Vec<PathBuf>, trigger: Trigger) {
        if paths.is_empty() {
            return;
        }
        let now = tokio::time::Instant::now();
        let reads = ingest.read(paths).await;
        let barrier = self.barriers.raise();
        let mut decided = Vec::new();
        for (path, read) in reads {
            let empty = read_empty(&read);
            match barrier {
                Some(n) => self.gate.hold(n, path, (read, trigger), empty, now),
                None => decided.push(self.gate.unguarded(path, (read, trigger), empty, now)),
            }
        }
        self.decided(ingest, decided).await;
    }

    /// Barrier `n` came out: the reads it held are decided.
    async fn barrier(&mut self, ingest: &mut Ingest, n: u64) {
        let decided = self.gate.passed(n);
        self.decided(ingest, decided).await;
    }

    /// Reads whose barrier is overdue are decided, then the paths whose wait is over are read.
    async fn due(&mut self, ingest: &mut Ingest) {
        let overdue = self.gate.overdue(tokio::time::Instant::now());
        self.decided(ingest, overdue).await;
        self.read_due(ingest).await;
    }

    /// Act on the gate's verdicts.
    async fn decided(&mut self, ingest: &mut Ingest, decided: Vec<Gated<(Read, Trigger)>>) {
        let acting = decided.iter().filter(|g| g.verdict == Verdict::Act);
        ingest
            .prefetch(acting.map(|g| g.read.0 .0.clone()).collect())
            .await;
        for Gated {
            path,
            read: (read, trigger),
            verdict,
        } in decided
        {
            match verdict {
                Verdict::Act => ingest.judge(&path, read, trigger).await,
                // The event that made it stale brought the path back through the debouncer.
                Verdict::Stale => {
                    tracing::debug!(file = %shown(&path), "written again since it was read; read again once the writer is done")
                }
                Verdict::InProgress => {
                    tracing::debug!(file = %shown(&path), "read empty: a save in progress; read again once the writer is done");
                    self.debouncer
                        .add(path, Signal::Writing, tokio::time::Instant::now());
                }
            }
        }
        ingest.end_batch();
    }
}

/// Run the loop until cancelled. The start-up scan has already happened.
pub async fn run(
    config: IngestConfig,
    mut ingest: Ingest,
    mut root: crate::pipeline::watch::RootWatch,
    barriers: Barriers,
    mut events: mpsc::Receiver<FileEvent>,
    overflow: Arc<AtomicBool>,
    cancel: CancellationToken,
) {
    let mut files = Files::new(&config, barriers);
    let mut resync = tokio::time::interval(config.resync);
    resync.tick().await;
    // The root's own events say at once when it is replaced; this check catches what they
    // cannot (a directory above the parent swapped).
    let mut root_check = tokio::time::interval(ROOT_CHECK);
    root_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut root_ok = true;
    // The second look at a new directory, once notify surely watches it.
    let mut look_again: Option<tokio::time::Instant> = None;
    loop {
        // While the root is away nothing is read, so nothing is due: waking for the paths it
        // took with it would spin (the root check brings it back).
        let sleep = until(files.next_deadline().filter(|_| root_ok));
        let released = until(ingest.wake_at().map(instant_of));
        let again = until(look_again);
        let mut root_event = false;
        tokio::select! {
            // While the root is away these wait (the root's return rescans anyway).
            _ = released, if root_ok => {
                tracing::debug!("a held or awaiting save is due (a window opens, a wait ends, a deploy it waited behind ended); the files are judged again");
                files.rescan(&mut ingest, Trigger::Resync).await;
            }
            _ = again, if root_ok => {
                look_again = None;
                files.rescan(&mut ingest, Trigger::Rescan).await;
            }
            _ = cancel.cancelled() => return,
            _ = resync.tick(), if root_ok => files.rescan(&mut ingest, Trigger::Resync).await,
            _ = root_check.tick() => root_event = true,
            _ = sleep => {}
            ev = events.recv() => match ev {
                None => return,
                Some(FileEvent::Root) => root_event = true,
                Some(FileEvent::Rescan) => {
                    overflow.store(false, Ordering::SeqCst);
                    tracing::info!("rescanning the dependency directory");
                    files.rescan(&mut ingest, Trigger::Rescan).await;
                }
                Some(FileEvent::NewFolder) => {
                    files.rescan(&mut ingest, Trigger::Rescan).await;
                    look_again = Some(tokio::time::Instant::now() + NEW_FOLDER_SETTLE);
                }
                Some(FileEvent::Path(p, signal)) => files.event(p, signal),
                Some(FileEvent::Barrier(n)) => files.barrier(&mut ingest, n).await,
            },
        }
        if root_event {
            root_ok = refresh_root(&mut root, &mut files, &mut ingest).await;
        }
        if !root_ok {
            overflow.store(false, Ordering::SeqCst);
            continue;
        }
        catch_up(&mut files, &mut ingest, &overflow).await;
    }
}

/// After each wake with the root in place: the files due are read, and an overflow of
/// events or a changed policy rescans.
async fn catch_up(files: &mut Files, ingest: &mut Ingest, overflow: &AtomicBool) {
    if overflow.swap(false, Ordering::SeqCst) {
        tracing::warn!("file events overflowed; rescanning");
        files.rescan(ingest, Trigger::Rescan).await;
    }
    files.due(ingest).await;
    if ingest.take_policy_changed() {
        tracing::info!("the policy changed; every file is judged again under it");
        files.rescan(ingest, Trigger::Rescan).await;
    }
}

/// Sleeps until `t`, or for ever when there is none.
async fn until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// The runtime's instant for a wall-clock time (now, when it has passed).
fn instant_of(at: jiff::Timestamp) -> tokio::time::Instant {
    let wait = std::time::Duration::try_from(jiff::Timestamp::now().duration_until(at))
        .unwrap_or_default();
    tokio::time::Instant::now() + wait
}

/// How long after a new directory's event it is compared once more: notify starts watching
/// it only after handing the event over (and reading what else waits), so files written into
/// it meanwhile are found by this second look.
const NEW_FOLDER_SETTLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Look at the dependency root again; `false` while it is missing.
async fn refresh_root(
    root: &mut crate::pipeline::watch::RootWatch,
    files: &mut Files,
    ingest: &mut Ingest,
) -> bool {
    match root.refresh() {
        crate::pipeline::watch::RootState::Same => true,
        crate::pipeline::watch::RootState::Rewatched => {
            files.rescan(ingest, Trigger::Rescan).await;
            true
        }
        // Nothing is forgotten while the directory is away: a rescan now would take every
        // service for removed.
        crate::pipeline::watch::RootState::Missing => false,
    }
}

/// One log line for the policy the daemon now runs under.
fn announce_policy(path: &Path, next: &PolicyState) {
    match next {
        PolicyState::Absent => {
            tracing::info!(file = %shown(path), "no policy file; services get only their own files' settings")
        }
        PolicyState::Valid { policy, .. } => {
            tracing::info!(file = %shown(path), rules = policy.len(), "policy read; it applies to every deploy from now on")
        }
        PolicyState::Invalid { problems, .. } => {
            tracing::error!(file = %shown(path), error = %problems, "the policy file is invalid; nothing is deployed until it is fixed")
        }
    }
}
