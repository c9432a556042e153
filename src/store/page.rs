//! One page of the services the record holds: what the page, the API and the CLI ask for,
//! so that no reader loads every row however many there are. Keyset paging: a page starts
//! after the last key of the one before, in `(namespace, name)` order, and the SQL reads only
//! the page (`LIMIT`), on either backend.

use super::change::Value;
use super::{ServiceRecord, SERVICE_COLUMNS};
use crate::domain::{ServiceKey, ServiceStatus, UnknownName};

/// Which services a page holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServiceFilter {
    #[default]
    All,
    /// Those with this status.
    Status(ServiceStatus),
    /// Those an operator suspended.
    Suspended,
}

impl ServiceFilter {
    /// The filter a `status` word names: none or empty for all, `suspended`, or a status
    /// (`failed`).
    pub fn parse(word: Option<&str>) -> Result<ServiceFilter, UnknownName> {
        match word {
            None | Some("") => Ok(ServiceFilter::All),
            Some("suspended") => Ok(ServiceFilter::Suspended),
            Some(word) => word.parse().map(ServiceFilter::Status),
        }
    }

    /// Whether a row belongs to the filtered list (as the SQL decides it).
    pub fn matches(self, r: &ServiceRecord) -> bool {
        match self {
            ServiceFilter::All => true,
            ServiceFilter::Suspended => r.suspended,
            ServiceFilter::Status(s) => r.status == s,
        }
    }
}

/// A page of services: at most `limit` rows after `after`, of those `filter` keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicesQuery {
    pub after: Option<ServiceKey>,
    pub filter: ServiceFilter,
    pub limit: usize,
}

/// A page's two statements for one backend's placeholder style: the rows, and how many rows
/// the filter keeps in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSql {
    pub rows: String,
    pub rows_values: Vec<Value>,
    pub count: String,
    pub count_values: Vec<Value>,
}

/// The conditions of a query, numbered from 1 with `placeholder` (`?n` or `$n`).
fn conditions(
    q: &ServicesQuery,
    with_after: bool,
    placeholder: &impl Fn(usize) -> String,
) -> (String, Vec<Value>) {
    let mut clauses = Vec::new();
    let mut values = Vec::new();
    let next = |v: Value, values: &mut Vec<Value>| {
        values.push(v);
        placeholder(values.len())
    };
    if let (true, Some(after)) = (with_after, &q.after) {
        let ns = next(Value::Text(after.namespace.clone()), &mut values);
        let name = next(Value::Text(after.name.clone()), &mut values);
        clauses.push(format!("(namespace, name) > ({ns}, {name})"));
    }
    match q.filter {
        ServiceFilter::All => {}
        ServiceFilter::Suspended => clauses.push("suspended".into()),
        ServiceFilter::Status(s) => {
            let p = next(Value::Text(s.as_str().into()), &mut values);
            // A row written before its status was known reads as the default status.
            clauses.push(match s == ServiceStatus::default() {
                true => format!("(status = {p} OR status = '')"),
                false => format!("status = {p}"),
            });
        }
    }
    match clauses.is_empty() {
        true => (String::new(), values),
        false => (format!(" WHERE {}", clauses.join(" AND ")), values),
    }
}

/// The SQL of one page. The limit is a number, written in the statement.
pub fn services_sql(q: &ServicesQuery, placeholder: impl Fn(usize) -> String) -> PageSql {
    let (rows_where, rows_values) = conditions(q, true, &placeholder);
    let (count_where, count_values) = conditions(q, false, &placeholder);
    PageSql {
        rows: format!(
            "SELECT {SERVICE_COLUMNS} FROM services{rows_where} ORDER BY namespace, name LIMIT {}",
            q.limit
        ),
        rows_values,
        count: format!("SELECT COUNT(*) FROM services{count_where}"),
        count_values,
    }
}

/// One page of services: `next` is where the page after it starts (its last key, when the
/// backend filled it), `None` on the last page; `total` is how many the filter keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicesPage {
    pub rows: Vec<ServiceRecord>,
    pub total: usize,
    pub next: Option<ServiceKey>,
}

/// Where the page after `rows` starts: after its last row, when the backend filled it.
pub fn next_after(rows: &[ServiceRecord], limit: usize) -> Option<ServiceKey> {
    match (rows.len() >= limit, rows.last()) {
        (true, Some(last)) if limit > 0 => Some(last.key()),
        _ => None,
    }
}

/// A page read from the backend with the writes still waiting in memory laid over it: each
/// row changed in place (the backend's order kept, so the next page starts where the
/// backend's ended), those the changes move out of the filter left out, and the services only
/// the waiting writes know (`unknown`, given on the last page) after them.
pub fn lay_over(
    q: &ServicesQuery,
    rows: Vec<ServiceRecord>,
    unknown: &[ServiceKey],
    overlay: impl Fn(&ServiceKey, Option<ServiceRecord>) -> Option<ServiceRecord>,
) -> Vec<ServiceRecord> {
    rows.into_iter()
        .filter_map(|r| overlay(&r.key(), Some(r)))
        .chain(unknown.iter().filter_map(|k| overlay(k, None)))
        .filter(|r| q.filter.matches(r))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> ServiceKey {
        ServiceKey::new(name, ns).expect("key")
    }

    fn text(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn a_page_reads_only_its_rows_after_the_last_key_with_its_filter() {
        let q = |after: Option<ServiceKey>, filter, limit| ServicesQuery {
            after,
            filter,
            limit,
        };
        let sqlite = |n: usize| format!("?{n}");
        let cases = [
            (
                q(None, ServiceFilter::All, 100),
                " ORDER BY namespace, name LIMIT 100",
                vec![],
                "SELECT COUNT(*) FROM services",
                vec![],
            ),
            (
                q(Some(key("prod", "web")), ServiceFilter::All, 2),
                " WHERE (namespace, name) > (?1, ?2) ORDER BY namespace, name LIMIT 2",
                vec![text("prod"), text("web")],
                "SELECT COUNT(*) FROM services",
                vec![],
            ),
            (
                q(
                    Some(key("prod", "web")),
                    ServiceFilter::Status(ServiceStatus::Failed),
                    10,
                ),
                " WHERE (namespace, name) > (?1, ?2) AND status = ?3 ORDER BY namespace, name LIMIT 10",
                vec![text("prod"), text("web"), text("failed")],
                "SELECT COUNT(*) FROM services WHERE status = ?1",
                vec![text("failed")],
            ),
            (
                q(None, ServiceFilter::Suspended, 5),
                " WHERE suspended ORDER BY namespace, name LIMIT 5",
                vec![],
                "SELECT COUNT(*) FROM services WHERE suspended",
                vec![],
            ),
            (
                q(None, ServiceFilter::Status(ServiceStatus::default()), 1),
                " WHERE (status = ?1 OR status = '') ORDER BY namespace, name LIMIT 1",
                vec![text(ServiceStatus::default().as_str())],
                "SELECT COUNT(*) FROM services WHERE (status = ?1 OR status = '')",
                vec![text(ServiceStatus::default().as_str())],
            ),
        ];
        for (query, rows_tail, rows_values, count, count_values) in cases {
            let sql = services_sql(&query, sqlite);
            assert_eq!(
                sql.rows,
                format!("SELECT {SERVICE_COLUMNS} FROM services{rows_tail}"),
                "{query:?}"
            );
            assert_eq!(sql.rows_values, rows_values, "{query:?}");
            assert_eq!(sql.count, count, "{query:?}");
            assert_eq!(sql.count_values, count_values, "{query:?}");
        }
        let pg = services_sql(&q(Some(key("a", "b")), ServiceFilter::All, 3), |n| {
            format!("${n}")
        });
        assert!(
            pg.rows.contains("(namespace, name) > ($1, $2)"),
            "{}",
            pg.rows
        );
    }

    #[test]
    fn filters_are_named_by_status_words() {
        for (word, want) in [
            (None, Some(ServiceFilter::All)),
            (Some(""), Some(ServiceFilter::All)),
            (Some("suspended"), Some(ServiceFilter::Suspended)),
            (
                Some("failed"),
                Some(ServiceFilter::Status(ServiceStatus::Failed)),
            ),
            (Some("nonsense"), None),
        ] {
            assert_eq!(ServiceFilter::parse(word).ok(), want, "{word:?}");
        }
    }

    fn row(ns: &str, name: &str, status: ServiceStatus) -> ServiceRecord {
        ServiceRecord {
            namespace: ns.into(),
            name: name.into(),
            status,
            ..ServiceRecord::default()
        }
    }

    fn names(rows: &[ServiceRecord]) -> Vec<String> {
        rows.iter().map(|r| r.name.clone()).collect()
    }

    #[test]
    fn a_full_page_names_the_next_one_and_the_last_does_not() {
        use ServiceStatus::Succeeded;
        let rows = [row("ns", "a", Succeeded), row("ns", "b", Succeeded)];
        for (limit, want) in [(2, Some(key("ns", "b"))), (3, None), (0, None)] {
            assert_eq!(next_after(&rows, limit), want, "{limit}");
        }
        assert_eq!(next_after(&[], 2), None);
    }

    #[test]
    fn waiting_writes_change_rows_in_place_and_add_unknown_services_last() {
        use ServiceStatus::{Failed, Succeeded};
        let q = ServicesQuery {
            after: None,
            filter: ServiceFilter::Status(Failed),
            limit: 5,
        };
        // The backend's order is kept whatever it is; `b` now succeeds, `z` fails; `new` is
        // known only to the waiting writes.
        let rows = vec![
            row("ns", "z", Succeeded),
            row("ns", "a", Failed),
            row("ns", "b", Failed),
        ];
        let overlay = |k: &ServiceKey, r: Option<ServiceRecord>| {
            let mut r = r.unwrap_or_else(|| row(&k.namespace, &k.name, Succeeded));
            match k.name.as_str() {
                "b" => r.status = Succeeded,
                "z" | "new" => r.status = Failed,
                _ => {}
            }
            Some(r)
        };
        let out = lay_over(&q, rows.clone(), &[key("ns", "new")], overlay);
        assert_eq!(names(&out), ["z", "a", "new"]);
        let all = ServicesQuery {
            filter: ServiceFilter::All,
            ..q
        };
        assert_eq!(names(&lay_over(&all, rows, &[], |_, r| r)), ["z", "a", "b"]);
    }
}
