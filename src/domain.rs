//! The vocabulary every stage shares: what state a service is in, how a deploy ended, what
//! triggered it, the images of a Deployment, and who asked for a change. Each word has exactly
//! one text form, used by the record (SQL), the API (JSON), the page, metrics and
//! notifications alike; nothing else spells a status as a string.

use std::fmt;
use std::path::PathBuf;

use std::time::Duration;

pub mod approval;
pub mod verify;
pub mod window;

/// The extension of dependency files.
pub const EXTENSION: &str = "dep";

/// A managed service: one Deployment in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub name: String,
    pub namespace: String,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl ServiceKey {
    /// The dependency file name for this service.
    pub fn file_name(&self) -> String {
        format!("{}_{}.{EXTENSION}", self.name, self.namespace)
    }

    /// Parse `namespace/name` (the CLI and API form).
    pub fn parse_slash(s: &str) -> Result<ServiceKey, String> {
        let (ns, name) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected NAMESPACE/DEPLOYMENT, e.g. prod/payments"))?;
        ServiceKey::new(name, ns)
    }

    /// Validate both parts as Kubernetes names.
    pub fn new(name: &str, namespace: &str) -> Result<ServiceKey, String> {
        if !valid_subdomain(name) {
            return Err(format!(
                "deployment name {name:?} is not a valid Kubernetes name (lower-case letters, digits, '-' and '.', at most 253 characters, starting and ending alphanumeric)"
            ));
        }
        if !valid_label(namespace) {
            return Err(format!(
                "namespace {namespace:?} is not a valid Kubernetes namespace (lower-case letters, digits and '-', at most 63 characters, starting and ending alphanumeric)"
            ));
        }
        Ok(ServiceKey {
            name: name.to_string(),
            namespace: namespace.to_string(),
        })
    }
}

pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub fn valid_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(valid_label)
}

/// What a dependency file asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A tag or version: the image becomes `<repository>:<tag>`.
    Tag(String),
    /// A digest: the image becomes `<repository>@<digest>`.
    Digest(String),
    /// A full image reference used as written.
    Reference(String),
}

impl fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageSpec::Tag(s) | ImageSpec::Digest(s) | ImageSpec::Reference(s) => f.write_str(s),
        }
    }
}

/// A parsed dependency file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DepSpec {
    /// Images by container; `None` means "the service's main container" (the one named like the
    /// Deployment, or its only container).
    pub images: Vec<(Option<String>, ImageSpec)>,
    /// Repository for tags and digests, overriding the global one.
    pub repository: Option<String>,
    pub rollout_timeout: Option<Duration>,
    /// Roll back automatically on failure (overrides the global policy).
    pub rollback: Option<bool>,
    /// Which workload the file names when more than one kind has its name.
    pub kind: Option<WorkloadKind>,
    /// The checks that must pass after the rollout is healthy, and for how long.
    pub verify: Option<verify::Verification>,
    /// Deploy windows of its own, on top of the policy's (a file can only add them).
    pub windows: Vec<window::Window>,
    /// Approvals of its own, on top of the policy's (a file can only ask for more).
    pub approvals: Option<approval::Needs>,
    /// Set by ingest on an approved save: the digests its approvers approved (container →
    /// digest). The deploy stops before its PATCH when the registry now says otherwise.
    pub approved_digests: Option<Images>,
}

impl DepSpec {
    /// What the file asks, in its own words: `1.4.2`, or `web=1.4.2, envoy=repo/envoy:2`.
    pub fn requested(&self) -> String {
        self.images
            .iter()
            .map(|(c, i)| match c {
                Some(c) => format!("{c}={i}"),
                None => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// An error and its causes, each said once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// What a deploy will change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub key: ServiceKey,
    /// Which workload the file names.
    pub kind: WorkloadKind,
    /// Every container's image before the deploy: what a rollback restores.
    pub before: Images,
    /// The containers whose image changes, with the new image.
    pub changes: Images,
    /// All containers' images after the deploy.
    pub after: Images,
    /// The workload's generation when read: what an interrupted rollout must reach.
    pub generation: i64,
    /// The workload's uid: Kubernetes Events name it so `kubectl describe` lists them.
    pub uid: String,
    /// `spec.paused`: a patch would roll nothing out.
    pub paused: bool,
    /// What the registry reported for the new images (container → digest), when asked.
    pub digests: Images,
    /// The workload's resourceVersion when read: the PATCH this plan decides carries it, so a
    /// write made since (another replica's patch, a controller's status) refuses it.
    pub resource_version: String,
}

impl Plan {
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }
}

/// How the wait for a rollout ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    Healthy,
    /// Applied, but nothing verified (0 replicas or nodes, OnDelete): why.
    Unverified(String),
    /// A CronJob's images written, for its next schedule: what that means.
    Applied(String),
    Failed {
        reason: String,
        message: String,
    },
    TimedOut {
        last: String,
    },
    /// A newer desired version arrived; this wait was abandoned.
    Superseded,
    /// The workload was deleted during the wait: no verdict on the version.
    Disappeared,
    /// Someone else wrote the Deployment's images after depwatch did: the rollout under way is
    /// not depwatch's, and is not judged.
    ChangedOutside {
        running: Images,
    },
}

impl fmt::Display for WaitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitOutcome::Healthy => f.write_str("healthy"),
            WaitOutcome::Unverified(why) => write!(f, "unverified: {why}"),
            WaitOutcome::Applied(why) => f.write_str(why),
            WaitOutcome::Failed { reason, message } => write!(f, "{reason}: {message}"),
            WaitOutcome::TimedOut { last } => write!(f, "timed out ({last})"),
            WaitOutcome::Superseded => f.write_str("superseded by a newer version"),
            WaitOutcome::Disappeared => f.write_str("the workload disappeared"),
            WaitOutcome::ChangedOutside { running } => {
                write!(f, "changed outside depwatch (now {running})")
            }
        }
    }
}

/// A name that is not part of a vocabulary (a record written by something else).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?}")]
pub struct UnknownName {
    pub what: &'static str,
    pub name: String,
}

/// An enum whose variants each have one text form, with everything needed to store, serve
/// and document it.
macro_rules! vocabulary {
    ($(#[$m:meta])* pub enum $name:ident ($what:literal) {
        $($(#[$vm:meta])* $variant:ident = $text:literal,)+
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $variant,)+ }

        impl $name {
            /// Every word, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The one text form (SQL, JSON, metrics labels).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName { what: $what, name: s.to_string() }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                match v.as_str()? {
                    // Rows written before a value was known.
                    "" => Ok(Self::default()),
                    text => text.parse().map_err(|e| rusqlite::types::FromSqlError::Other(Box::new(e))),
                }
            }
        }

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some(Self::ALL.iter().map(|v| v.as_str())))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

vocabulary! {
    /// Where a managed service stands, as the record, the API and the page show it.
    pub enum ServiceStatus ("service status") {
        /// Known, nothing acted on yet.
        #[default]
        Pending = "pending",
        Deploying = "deploying",
        /// The rollout is healthy and its checks are baking: not last good yet.
        Verifying = "verifying",
        /// A transient API error (connection, timeout, 5xx, 429, 409): retrying with backoff.
        WaitingForApi = "waiting_for_api",
        Succeeded = "succeeded",
        /// Patched, but nothing proved the images healthy (0 replicas or nodes, OnDelete).
        Unverified = "unverified",
        /// A CronJob's images written: they run at its next schedule (nothing to judge now).
        Applied = "applied",
        /// The workload was deleted outside depwatch; it comes back by itself when the
        /// workload is recreated.
        Missing = "missing",
        Failed = "failed",
        TimedOut = "timed_out",
        RolledBack = "rolled_back",
        RollbackFailed = "rollback_failed",
        /// Its images were changed outside depwatch.
        Drifted = "drifted",
        /// Its file does not parse, or two files define it.
        Invalid = "invalid",
        /// Its file cannot be read (permissions, not a regular file, too large, a symlink
        /// leaving the directory); the last good state stays.
        Unreadable = "unreadable",
        /// The Deployment is paused (`spec.paused`): nothing was patched; it waits for
        /// `kubectl rollout resume` and a retry.
        Paused = "paused",
        /// Its file was removed: no longer managed.
        Unmanaged = "unmanaged",
        /// A save waits for a deploy window to open or a `FREEZE` to be lifted; it is
        /// deployed by itself then.
        Held = "held",
        /// A save waits for its approvers (`depwatch approve`); deployed once enough approve.
        AwaitingApproval = "awaiting_approval",
        /// A save an approver rejected, or that was not approved in time: nothing deployed
        /// until a newer save.
        Rejected = "rejected",
        /// An operator asked for a retry; the file is read again.
        Retry = "retry",
    }
}

vocabulary! {
    /// How one deploy ended (or that it has not).
    pub enum DeployOutcome ("deploy outcome") {
        #[default]
        InProgress = "in_progress",
        /// Healthy rollout of the new images.
        Succeeded = "succeeded",
        /// Patched, but with 0 desired replicas nothing was verified.
        Unverified = "unverified",
        /// A CronJob's images written, for its next schedule.
        Applied = "applied",
        /// The workload was deleted outside depwatch.
        Missing = "missing",
        /// The cluster already ran the desired images, healthy.
        Unchanged = "unchanged",
        Failed = "failed",
        TimedOut = "timed_out",
        RolledBack = "rolled_back",
        RollbackFailed = "rollback_failed",
        /// A newer version arrived during the rollout.
        Superseded = "superseded",
        /// depwatch stopped during the deploy and the file changed since.
        Interrupted = "interrupted",
        /// Images changed outside depwatch.
        Drift = "drift",
        /// Someone else changed the images during depwatch's own rollout: not judged, drift.
        ChangedOutside = "changed_outside",
        /// A save that needed approval was rejected, or not approved in time: nothing was
        /// deployed.
        Rejected = "rejected",
    }
}

vocabulary! {
    /// What a row of the approvals table says of a save.
    pub enum VoteKind ("approval word") {
        /// A save needs approval: who asked, and when its wait began.
        #[default]
        Request = "request",
        Approve = "approve",
        Reject = "reject",
        /// Its rejection is in the history (written once).
        Recorded = "recorded",
        /// The registry pre-flight's digests for its images when it was requested: what its
        /// approvers approve, and what its deploy must still find.
        Resolved = "resolved",
    }
}

vocabulary! {
    /// The kind of workload a dependency file names.
    pub enum WorkloadKind ("workload kind") {
        #[default]
        Deployment = "deployment",
        StatefulSet = "statefulset",
        DaemonSet = "daemonset",
        CronJob = "cronjob",
    }
}

impl WorkloadKind {
    /// The API's own spelling (`StatefulSet`), for messages and Events.
    pub fn api_kind(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::CronJob => "CronJob",
        }
    }

    /// `apps/v1` or `batch/v1`.
    pub fn api_version(self) -> &'static str {
        match self {
            WorkloadKind::CronJob => "batch/v1",
            _ => "apps/v1",
        }
    }

    /// The kinds a file's `kind:` may name, for messages.
    pub fn choices() -> String {
        Self::ALL
            .iter()
            .map(|k| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parse `kind:` as people write it (`StatefulSet`, `statefulset`, `sts`).
    pub fn parse_loose(s: &str) -> Option<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL.iter().copied().find(|k| {
            k.as_str() == lower
                || match k {
                    WorkloadKind::Deployment => lower == "deploy",
                    WorkloadKind::StatefulSet => lower == "sts",
                    WorkloadKind::DaemonSet => lower == "ds",
                    WorkloadKind::CronJob => lower == "cj",
                }
        })
    }
}

/// A workload as people name it: `statefulset/db`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown<'a>(pub WorkloadKind, pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

vocabulary! {
    /// What started a deploy.
    pub enum Trigger ("trigger") {
        #[default]
        File = "file",
        Startup = "startup",
        Resync = "resync",
        Rescan = "rescan",
        Api = "api",
        Operator = "operator",
        SelfHeal = "self-heal",
        Drift = "drift",
    }
}

impl ServiceStatus {
    /// A service in this state is settled: drift is looked for, and unchanged content is
    /// not deployed again by a resync or a restart.
    pub fn settled(self) -> bool {
        matches!(
            self,
            ServiceStatus::Succeeded
                | ServiceStatus::Unverified
                | ServiceStatus::Applied
                | ServiceStatus::Drifted
                | ServiceStatus::Missing
        )
    }

    /// A deploy is due or under way: the verdict is still to come.
    pub fn in_flight(self) -> bool {
        matches!(
            self,
            ServiceStatus::Pending
                | ServiceStatus::Deploying
                | ServiceStatus::Verifying
                | ServiceStatus::WaitingForApi
                | ServiceStatus::Retry
        )
    }

    /// Deployed images are recorded, so drift can be told from them.
    pub fn watch_drift(self) -> bool {
        self.settled()
            || matches!(
                self,
                ServiceStatus::Failed | ServiceStatus::TimedOut | ServiceStatus::RolledBack
            )
    }

    /// Words for people.
    pub fn label(self) -> &'static str {
        match self {
            ServiceStatus::Pending => "pending",
            ServiceStatus::Deploying => "deploying",
            ServiceStatus::Verifying => "verifying",
            ServiceStatus::WaitingForApi => "waiting for the API server",
            ServiceStatus::Succeeded => "healthy",
            ServiceStatus::Unverified => "deployed, unverified",
            ServiceStatus::Applied => "applied (runs at its schedule)",
            ServiceStatus::Missing => "workload missing",
            ServiceStatus::Failed => "failed",
            ServiceStatus::TimedOut => "timed out",
            ServiceStatus::RolledBack => "rolled back",
            ServiceStatus::RollbackFailed => "rollback failed",
            ServiceStatus::Drifted => "drifted",
            ServiceStatus::Invalid => "invalid file",
            ServiceStatus::Unreadable => "unreadable file",
            ServiceStatus::Unmanaged => "not managed",
            ServiceStatus::Held => "held (a deploy window or a freeze)",
            ServiceStatus::AwaitingApproval => "awaiting approval",
            ServiceStatus::Rejected => "rejected (not approved)",
            ServiceStatus::Paused => "Deployment paused",
            ServiceStatus::Retry => "retry requested",
        }
    }
}

impl DeployOutcome {
    /// The service's status after a deploy ending this way; `None` leaves it to whatever
    /// superseded the deploy (a newer version, the file's removal).
    pub fn service_status(self) -> Option<ServiceStatus> {
        Some(match self {
            DeployOutcome::InProgress | DeployOutcome::Superseded => return None,
            DeployOutcome::Succeeded | DeployOutcome::Unchanged => ServiceStatus::Succeeded,
            DeployOutcome::Unverified => ServiceStatus::Unverified,
            DeployOutcome::Applied => ServiceStatus::Applied,
            DeployOutcome::Missing => ServiceStatus::Missing,
            DeployOutcome::Failed | DeployOutcome::Interrupted => ServiceStatus::Failed,
            DeployOutcome::TimedOut => ServiceStatus::TimedOut,
            DeployOutcome::RolledBack => ServiceStatus::RolledBack,
            DeployOutcome::RollbackFailed => ServiceStatus::RollbackFailed,
            DeployOutcome::Drift | DeployOutcome::ChangedOutside => ServiceStatus::Drifted,
            DeployOutcome::Rejected => ServiceStatus::Rejected,
        })
    }

    /// Words for people.
    pub fn label(self) -> &'static str {
        match self {
            DeployOutcome::InProgress => "in progress",
            DeployOutcome::Succeeded => "deployed",
            DeployOutcome::Unverified => "deployed, unverified",
            DeployOutcome::Applied => "applied",
            DeployOutcome::Missing => "workload missing",
            DeployOutcome::Unchanged => "unchanged",
            DeployOutcome::Failed => "failed",
            DeployOutcome::TimedOut => "timed out",
            DeployOutcome::RolledBack => "rolled back",
            DeployOutcome::RollbackFailed => "rollback failed",
            DeployOutcome::Superseded => "superseded",
            DeployOutcome::Interrupted => "interrupted",
            DeployOutcome::Drift => "drifted",
            DeployOutcome::ChangedOutside => "changed outside depwatch",
            DeployOutcome::Rejected => "rejected (not approved)",
        }
    }

    /// How good the news is, for colours and Event types.
    pub fn tone(self) -> Tone {
        match self {
            DeployOutcome::Succeeded | DeployOutcome::Unchanged => Tone::Good,
            DeployOutcome::Applied => Tone::Neutral,
            DeployOutcome::Failed | DeployOutcome::RollbackFailed | DeployOutcome::Rejected => {
                Tone::Bad
            }
            DeployOutcome::InProgress => Tone::Busy,
            DeployOutcome::Unverified
            | DeployOutcome::TimedOut
            | DeployOutcome::RolledBack
            | DeployOutcome::Superseded
            | DeployOutcome::Interrupted
            | DeployOutcome::Drift
            | DeployOutcome::Missing
            | DeployOutcome::ChangedOutside => Tone::Warning,
        }
    }
}

/// How good the news is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Good,
    /// Done, with nothing to judge (a CronJob's images applied).
    Neutral,
    Warning,
    Bad,
    Busy,
}

/// The candidate closest to a name that was not found (a typo's likely intent), if any is close
/// enough to be worth suggesting: at most a third of the name's length in edits, and at least 1.
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, c)| c)
}

/// Edit distance in characters, counting a swap of two neighbours as one edit (optimal string
/// alignment): `prdo` is one typo away from `prod`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A duration as people read it: `850ms`, `4.2s`, `3m 5s`.
/// Lower-case hexadecimal of some bytes (digests, ids).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn human_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 && ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(std::time::Duration::from_secs(d.as_secs())).to_string()
    }
}

/// Images by container name. Its text form, `web=example.com/web:1.1, sidecar=…`, is what the
/// record stores and people read. Kept as a short vector sorted by container: most Deployments
/// have one or two containers, and a map would cost a whole tree node for each copy held per
/// service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Images(Vec<(String, String)>);

impl Images {
    pub fn new() -> Self {
        Images(Vec::new())
    }

    /// Read the text form back; an empty string is no images.
    pub fn parse(s: &str) -> Images {
        s.split(", ")
            .filter_map(|pair| pair.split_once('='))
            .map(|(c, i)| (c.to_string(), i.to_string()))
            .collect()
    }

    /// The image of one container.
    pub fn get(&self, container: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(c, _)| c.as_str().cmp(container))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Set one container's image.
    pub fn insert(&mut self, container: String, image: String) {
        match self
            .0
            .binary_search_by(|(c, _)| c.as_str().cmp(container.as_str()))
        {
            Ok(i) => self.0[i].1 = image,
            Err(i) => self.0.insert(i, (container, image)),
        }
    }

    /// `(container, image)` in container order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(c, i)| (c, i))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(c, _)| c)
    }

    pub fn values(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(_, i)| i)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// For a table cell: the image alone for one container, `-` for none, else every
    /// `container=image`.
    pub fn cell(&self) -> String {
        match self.0.as_slice() {
            [] => "-".into(),
            [(_, image)] => image.clone(),
            _ => self.to_string(),
        }
    }

    /// The images of `other` laid over these.
    pub fn with(&self, other: &Images) -> Images {
        let mut out = self.clone();
        for (c, i) in other.iter() {
            out.insert(c.clone(), i.clone());
        }
        out
    }

    /// The containers whose image differs in `other` (with `other`'s image).
    pub fn changed_in(&self, other: &Images) -> Images {
        other
            .iter()
            .filter(|(c, i)| self.get(c) != Some(*i))
            .map(|(c, i)| (c.clone(), i.clone()))
            .collect()
    }
}

impl FromIterator<(String, String)> for Images {
    /// Later entries for the same container win, as they would in a map.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut out = Images::new();
        for (c, i) in iter {
            out.insert(c, i);
        }
        out.0.shrink_to_fit();
        out
    }
}

impl IntoIterator for Images {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl fmt::Display for Images {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (c, i)) in self.iter().enumerate() {
            if n > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}={i}")?;
        }
        Ok(())
    }
}

impl serde::Serialize for Images {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Images {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Images::parse(&String::deserialize(d)?))
    }
}

impl rusqlite::types::ToSql for Images {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.to_string().into())
    }
}

impl rusqlite::types::FromSql for Images {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(Images::parse(v.as_str()?))
    }
}

impl utoipa::PartialSchema for Images {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .description(Some(
                "images by container: `web=example.com/web:1.1, sidecar=…`",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Images {}

/// Who asked for the content of a dependency file, when it was not simply saved: written as
/// the file's first line by the API and by `depwatch rollback`, read back by the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asker {
    /// An API deploy request.
    Request { id: String, actor: String },
    /// An operator's rollback.
    Rollback { actor: String, at: String },
}

const REQUEST_HEADER: &str = "# depwatch request ";
const ROLLBACK_HEADER: &str = "# rolled back by ";
const RETRY_BY: &str = "retry requested by ";

/// A name safe on one line of a file or log: control characters and spaces become `_`.
fn one_word(s: &str) -> String {
    let w: String = s
        .chars()
        .take(100)
        .map(|c| if c.is_control() || c == ' ' { '_' } else { c })
        .collect();
    if w.is_empty() {
        "unknown".into()
    } else {
        w
    }
}

impl Asker {
    /// The header line (with its newline).
    pub fn header(&self) -> String {
        match self {
            Asker::Request { id, actor } => {
                format!("{REQUEST_HEADER}{} by {}\n", one_word(id), one_word(actor))
            }
            Asker::Rollback { actor, at } => {
                format!("{ROLLBACK_HEADER}{} at {}\n", one_word(actor), one_word(at))
            }
        }
    }

    /// The header of a file's text, if it has one.
    pub fn find(text: &str) -> Option<Asker> {
        text.lines().find_map(|line| {
            if let Some(rest) = line.strip_prefix(REQUEST_HEADER) {
                let (id, actor) = rest.split_once(" by ")?;
                return Some(Asker::Request {
                    id: id.trim().to_string(),
                    actor: actor.trim().to_string(),
                });
            }
            let rest = line.strip_prefix(ROLLBACK_HEADER)?;
            let (actor, at) = rest.split_once(" at ").unwrap_or((rest, ""));
            Some(Asker::Rollback {
                actor: actor.trim().to_string(),
                at: at.split_whitespace().next().unwrap_or_default().to_string(),
            })
        })
    }

    /// The record's note that `actor` asked for a retry.
    pub fn retry_note(actor: &str) -> String {
        format!("{RETRY_BY}{}", one_word(actor))
    }

    /// Who asked for a retry, from the record's note.
    pub fn retry_actor(note: &str) -> Option<String> {
        note.strip_prefix(RETRY_BY).map(String::from)
    }
}

/// What a service's file asks for now.
#[derive(Debug, Clone)]
pub struct Desired {
    pub spec: DepSpec,
    /// SHA-256 of the file content.
    pub hash: String,
    pub path: PathBuf,
    pub trigger: Trigger,
    pub actor: String,
    /// The API request that wrote this content, if any.
    pub request_id: String,
    /// When the change was seen, for the change→patch and change→healthy metrics.
    pub seen_at: tokio::time::Instant,
}

impl Desired {
    /// The file's name, for change-cause annotations.
    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string()
    }

    /// The images the file names, as written (before resolving against the cluster).
    pub fn requested(&self) -> String {
        self.spec.requested()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn closest_suggests_a_likely_typo_and_nothing_far() {
        let names = ["prod", "production", "staging", "kube-system"];
        for (name, want) in [
            ("prd", Some("prod")),
            ("prdo", Some("prod")),
            ("stagign", Some("staging")),
            ("productoin", Some("production")),
            ("payments", None),
            ("prod", None),
            ("x", None),
        ] {
            assert_eq!(closest(name, names), want, "{name}");
        }
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    use super::*;

    #[test]
    fn every_word_round_trips_through_its_one_text_form() {
        for s in ServiceStatus::ALL {
            assert_eq!(s.as_str().parse::<ServiceStatus>(), Ok(*s));
            assert_eq!(serde_json::to_value(s).ok(), Some(s.as_str().into()));
        }
        for o in DeployOutcome::ALL {
            assert_eq!(o.as_str().parse::<DeployOutcome>(), Ok(*o));
        }
        for t in Trigger::ALL {
            assert_eq!(t.as_str().parse::<Trigger>(), Ok(*t));
        }
        let e = "bogus".parse::<DeployOutcome>().expect_err("unknown");
        assert_eq!(e.to_string(), "unknown deploy outcome \"bogus\"");
    }

    #[test]
    fn images_own_their_text_form() {
        let i = Images::parse("web=example.com/web:1.1, side=s@sha256:00");
        assert_eq!(i.len(), 2);
        assert_eq!(i.to_string(), "side=s@sha256:00, web=example.com/web:1.1");
        assert_eq!(Images::parse(""), Images::new());
        assert_eq!(Images::new().to_string(), "");
        assert_eq!(
            i.get("web").map(String::as_str),
            Some("example.com/web:1.1")
        );
        assert_eq!(i.get("nope"), None);
        let newer = Images::parse("web=example.com/web:1.2");
        assert_eq!(i.changed_in(&newer), newer);
        assert_eq!(
            i.with(&newer).to_string(),
            "side=s@sha256:00, web=example.com/web:1.2"
        );
    }

    #[test]
    fn the_asker_header_is_written_and_read_in_one_place() {
        let r = Asker::Request {
            id: "abc".into(),
            actor: "ci bot\nforged".into(),
        };
        let text = format!("{}1.2.0\n", r.header());
        assert_eq!(text.lines().count(), 2, "a name never breaks the line");
        assert_eq!(
            Asker::find(&text),
            Some(Asker::Request {
                id: "abc".into(),
                actor: "ci_bot_forged".into()
            })
        );
        let rb = Asker::Rollback {
            actor: "alice".into(),
            at: "2026-01-01T00:00:00Z".into(),
        };
        assert_eq!(Asker::find(&rb.header()), Some(rb));
        assert_eq!(Asker::find("1.2.0\n"), None);
        assert_eq!(
            Asker::retry_actor(&Asker::retry_note("bob")).as_deref(),
            Some("bob")
        );
    }

    #[test]
    fn durations_are_rounded_for_people() {
        use std::time::Duration;
        assert_eq!(human_duration(Duration::from_micros(1_809_275)), "1.8s");
        assert_eq!(human_duration(Duration::from_millis(42)), "42ms");
        assert_eq!(human_duration(Duration::from_secs(2)), "2s");
        assert_eq!(human_duration(Duration::from_millis(185_400)), "3m 5s");
    }
}
