//! One change to a service row, as the fields it owns: each writer (ingest, the recorder, an
//! operator command) names only the fields it sets, and the backends write exactly those in one
//! statement (an upsert). No writer reads the row and writes it back, so two writers of one
//! row never undo each other: a `suspend` and a pin landing together both stay.

use crate::domain::verify::Judgement;
use crate::domain::{Images, ServiceStatus, WorkloadKind};

/// The fields one writer sets on a service row; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceChange {
    pub path: Option<String>,
    /// Set only when the row has no path yet.
    pub path_if_unset: bool,
    pub content_hash: Option<String>,
    pub desired: Option<Images>,
    pub deployed: Option<Images>,
    pub last_good: Option<Images>,
    /// Set only when the row has no last good images yet.
    pub last_good_if_unset: bool,
    pub status: Option<ServiceStatus>,
    /// Leave the status alone while a deploy is under way (its verdict comes later).
    pub status_unless_deploying: bool,
    pub failed_hash: Option<String>,
    /// Lift the pin on this content hash: `failed_hash` is cleared only while it still is
    /// this one (a pin made since stays).
    pub unpin: Option<String>,
    pub message: Option<String>,
    pub suspended: Option<bool>,
    /// The kind of workload the file names, once a plan found it.
    pub kind: Option<WorkloadKind>,
    /// What the file asks in its own words, and the content hash it was read from.
    pub requested: Option<(String, String)>,
    /// An operator's word on a bake.
    pub judged: Option<Judgement>,
    /// When the bake of the version verifying ends.
    pub bake_ends_at: Option<String>,
}

/// A value bound to a statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Text(String),
    Bool(bool),
}

/// The statement for one change, for either backend's placeholder style.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: String,
    pub values: Vec<Value>,
}

impl ServiceChange {
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// The path, unless one is recorded already.
    pub fn path_if_unset(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self.path_if_unset = true;
        self
    }

    pub fn content_hash(mut self, hash: impl Into<String>) -> Self {
        self.content_hash = Some(hash.into());
        self
    }

    pub fn desired(mut self, images: Images) -> Self {
        self.desired = Some(images);
        self
    }

    pub fn deployed(mut self, images: Images) -> Self {
        self.deployed = Some(images);
        self
    }

    pub fn last_good(mut self, images: Images) -> Self {
        self.last_good = Some(images);
        self
    }

    /// The last good images, unless some are recorded already.
    pub fn last_good_if_unset(mut self, images: Images) -> Self {
        self.last_good = Some(images);
        self.last_good_if_unset = true;
        self
    }

    pub fn status(mut self, status: ServiceStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// The status, unless a deploy is under way.
    pub fn status_unless_deploying(mut self, status: ServiceStatus) -> Self {
        self.status = Some(status);
        self.status_unless_deploying = true;
        self
    }

    pub fn failed_hash(mut self, hash: impl Into<String>) -> Self {
        self.failed_hash = Some(hash.into());
        self
    }

    /// Lift the pin on `hash`, unless the row is pinned on another version by now.
    pub fn unpin(mut self, hash: impl Into<String>) -> Self {
        self.failed_hash = None;
        self.unpin = Some(hash.into());
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    pub fn suspended(mut self, suspended: bool) -> Self {
        self.suspended = Some(suspended);
        self
    }

    pub fn kind(mut self, kind: WorkloadKind) -> Self {
        self.kind = Some(kind);
        self
    }

    /// What the file with content `hash` asks, in its own words (empty for a refused file).
    pub fn requested(mut self, words: impl Into<String>, hash: impl Into<String>) -> Self {
        self.requested = Some((words.into(), hash.into()));
        self
    }

    /// An operator's word on the bake of the version it names.
    pub fn judged(mut self, judgement: Judgement) -> Self {
        self.judged = Some(judgement);
        self
    }

    /// When the bake now beginning (or resumed) ends.
    pub fn bake_ends_at(mut self, at: impl Into<String>) -> Self {
        self.bake_ends_at = Some(at.into());
        self
    }

    /// Apply to a row in memory, exactly as the statement does in the database.
    pub fn apply(&self, row: &mut super::ServiceRecord) {
        if let Some(p) = &self.path {
            if !self.path_if_unset || row.path.is_empty() {
                row.path = p.clone();
            }
        }
        if let Some(h) = &self.content_hash {
            row.content_hash = h.clone();
        }
        if let Some(d) = &self.desired {
            row.desired = d.clone();
        }
        if let Some(d) = &self.deployed {
            row.deployed = d.clone();
        }
        if let Some(g) = &self.last_good {
            if !self.last_good_if_unset || row.last_good.is_empty() {
                row.last_good = g.clone();
            }
        }
        if let Some(s) = self.status {
            if !self.status_unless_deploying || !deploying(row.status) {
                row.status = s;
            }
        }
        if let Some(h) = &self.failed_hash {
            row.failed_hash = h.clone();
        }
        if let Some(was) = self.unpinned() {
            if row.failed_hash == was {
                row.failed_hash.clear();
            }
        }
        if let Some(m) = &self.message {
            row.message = m.clone();
        }
        if let Some(s) = self.suspended {
            row.suspended = s;
        }
        if let Some(k) = self.kind {
            row.kind = k;
        }
        if let Some((words, hash)) = &self.requested {
            row.requested = words.clone();
            row.requested_hash = hash.clone();
        }
        if let Some(j) = &self.judged {
            row.judged = Some(j.clone());
        }
        if let Some(at) = &self.bake_ends_at {
            row.bake_ends_at = at.clone();
        }
    }

    /// `INSERT … ON CONFLICT (namespace, name) DO UPDATE SET` only the named fields (and
    /// `updated_at`). `placeholder(n)` spells the n-th parameter (`?n` or `$n`).
    pub fn statement(
        &self,
        namespace: &str,
        name: &str,
        updated_at: &str,
        placeholder: impl Fn(usize) -> String,
    ) -> Statement {
        let mut columns = vec!["namespace", "name", "updated_at"];
        let mut values = vec![
            Value::Text(namespace.into()),
            Value::Text(name.into()),
            Value::Text(updated_at.into()),
        ];
        let mut sets = vec!["updated_at = excluded.updated_at".to_string()];
        for (column, value, guard) in self.text_columns() {
            columns.push(column);
            values.push(Value::Text(value));
            sets.push(match guard {
                None => format!("{column} = excluded.{column}"),
                Some(keep_when) => format!(
                    "{column} = CASE WHEN {keep_when} THEN services.{column} ELSE excluded.{column} END"
                ),
            });
        }
        if let Some(s) = self.suspended {
            columns.push("suspended");
            values.push(Value::Bool(s));
            sets.push("suspended = excluded.suspended".into());
        }
        let holes: Vec<String> = (1..=values.len()).map(placeholder).collect();
        Statement {
            sql: format!(
                "INSERT INTO services ({}) VALUES ({}) ON CONFLICT (namespace, name) DO UPDATE SET {}",
                columns.join(", "),
                holes.join(", "),
                sets.join(", ")
            ),
            values,
        }
    }
}

impl ServiceChange {
    /// Each text column the change sets, with its value and the SQL condition under which
    /// the row keeps its own value instead.
    fn text_columns(&self) -> Vec<(&'static str, String, Option<String>)> {
        let busy = format!(
            "services.status IN ('{}', '{}', '{}')",
            ServiceStatus::Deploying.as_str(),
            ServiceStatus::WaitingForApi.as_str(),
            ServiceStatus::Verifying.as_str()
        );
        let unless = |keep: bool, when: &str| keep.then(|| when.to_string());
        let (words, hash) = self.requested.clone().unzip();
        let columns = [
            (
                "path",
                self.path.clone(),
                unless(self.path_if_unset, "services.path <> ''"),
            ),
            ("content_hash", self.content_hash.clone(), None),
            (
                "desired",
                self.desired.as_ref().map(|i| i.to_string()),
                None,
            ),
            (
                "deployed",
                self.deployed.as_ref().map(|i| i.to_string()),
                None,
            ),
            (
                "last_good",
                self.last_good.as_ref().map(|i| i.to_string()),
                unless(self.last_good_if_unset, "services.last_good <> ''"),
            ),
            (
                "status",
                self.status.map(|s| s.as_str().to_string()),
                unless(self.status_unless_deploying, &busy),
            ),
            ("failed_hash", self.failed_hash.clone(), None),
            (
                "failed_hash",
                self.unpinned().map(|_| String::new()),
                self.unpinned()
                    .map(|was| format!("services.failed_hash <> '{was}'")),
            ),
            ("message", self.message.clone(), None),
            ("kind", self.kind.map(|k| k.as_str().to_string()), None),
            ("requested", words, None),
            ("requested_hash", hash, None),
            ("judged", self.judged.as_ref().map(Judgement::to_text), None),
            ("bake_ends_at", self.bake_ends_at.clone(), None),
        ];
        columns
            .into_iter()
            .filter_map(|(column, value, guard)| value.map(|v| (column, v, guard)))
            .collect()
    }

    /// The content hash whose pin to lift, when it is one (hex digits only: it is written into
    /// the statement).
    fn unpinned(&self) -> Option<&str> {
        self.unpin
            .as_deref()
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()))
    }
}

/// A deploy is under way: a refusal or a parse error does not hide it.
fn deploying(status: ServiceStatus) -> bool {
    matches!(
        status,
        ServiceStatus::Deploying | ServiceStatus::WaitingForApi | ServiceStatus::Verifying
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ServiceRecord;

    #[test]
    fn only_the_named_fields_are_written() {
        let s = ServiceChange::default()
            .suspended(true)
            .statement("prod", "web", "t", |n| format!("?{n}"));
        assert_eq!(
            s.sql,
            "INSERT INTO services (namespace, name, updated_at, suspended) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (namespace, name) DO UPDATE SET updated_at = excluded.updated_at, suspended = excluded.suspended"
        );
        assert_eq!(s.values.last(), Some(&Value::Bool(true)));
        let s = ServiceChange::default()
            .content_hash("h")
            .failed_hash("h")
            .statement("prod", "web", "t", |n| format!("${n}"));
        assert!(s.sql.contains("($1, $2, $3, $4, $5)"), "{}", s.sql);
        assert!(!s.sql.contains("status"), "{}", s.sql);
        assert!(!s.sql.contains("suspended"), "{}", s.sql);
    }

    #[test]
    fn guarded_fields_keep_what_is_there() {
        let table: &[(ServiceChange, ServiceRecord, ServiceRecord)] = &[
            (
                ServiceChange::default().path_if_unset("/d/web_prod.dep"),
                ServiceRecord {
                    path: "/d/a/web_prod.dep".into(),
                    ..Default::default()
                },
                ServiceRecord {
                    path: "/d/a/web_prod.dep".into(),
                    ..Default::default()
                },
            ),
            (
                ServiceChange::default().path_if_unset("/d/web_prod.dep"),
                ServiceRecord::default(),
                ServiceRecord {
                    path: "/d/web_prod.dep".into(),
                    ..Default::default()
                },
            ),
            (
                ServiceChange::default()
                    .status_unless_deploying(ServiceStatus::Invalid)
                    .message("bad"),
                ServiceRecord {
                    status: ServiceStatus::Deploying,
                    ..Default::default()
                },
                ServiceRecord {
                    status: ServiceStatus::Deploying,
                    message: "bad".into(),
                    ..Default::default()
                },
            ),
            (
                ServiceChange::default().status_unless_deploying(ServiceStatus::Invalid),
                ServiceRecord {
                    status: ServiceStatus::Succeeded,
                    ..Default::default()
                },
                ServiceRecord {
                    status: ServiceStatus::Invalid,
                    ..Default::default()
                },
            ),
            (
                ServiceChange::default().last_good_if_unset(Images::parse("web=w:1")),
                ServiceRecord {
                    last_good: Images::parse("web=w:0"),
                    ..Default::default()
                },
                ServiceRecord {
                    last_good: Images::parse("web=w:0"),
                    ..Default::default()
                },
            ),
        ];
        for (change, before, want) in table {
            let mut row = before.clone();
            change.apply(&mut row);
            assert_eq!(&row, want, "{change:?}");
            let sql = change.statement("n", "s", "t", |n| format!("?{n}")).sql;
            assert!(sql.contains("CASE WHEN services."), "{sql}");
        }
    }
}
