//! The `verify:` block, as a dependency file (or the policy file) writes it, read into a
//! [`Verification`] with every problem named by its field: `verify.checks[1].prometheus.query:
//! …`. Pure; PromQL is parsed here, so `depwatch check` refuses a query Prometheus would.

use std::time::Duration;

use serde_json::Value;

use crate::domain::verify::{
    Check, Condition, HttpCheck, HttpTarget, NoData, Probe, PromCheck, Verification,
};

/// The most checks one service may declare.
pub const MAX_CHECKS: usize = 16;
/// The longest bake.
pub const MAX_BAKE: Duration = Duration::from_secs(24 * 3600);
const MAX_QUERY: usize = 4096;
const MAX_TEXT: usize = 1024;

/// A problem: the field it names (`verify.bake`) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

struct Reader {
    problems: Vec<Problem>,
}

impl Reader {
    fn add(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_string(),
            message: format!("{field}: {}", message.into()),
        });
    }

    /// The mapping at `field`, naming each key it does not know.
    fn mapping<'v>(
        &mut self,
        field: &str,
        v: &'v Value,
        known: &[&str],
    ) -> Option<&'v serde_json::Map<String, Value>> {
        let Some(m) = v.as_object() else {
            self.add(
                field,
                format!("expected a mapping with {}", known.join(", ")),
            );
            return None;
        };
        for k in m.keys().filter(|k| !known.contains(&k.as_str())) {
            let hint = crate::domain::closest(k, known.iter().copied())
                .map_or(String::new(), |c| format!("did you mean `{c}`? "));
            self.add(
                &format!("{field}.{}", printable(k)),
                format!("unknown field; {hint}expected one of {}", known.join(", ")),
            );
        }
        Some(m)
    }

    fn text(&mut self, field: &str, v: Option<&Value>) -> Option<String> {
        let v = v?;
        match v {
            Value::String(s) if s.len() <= MAX_TEXT => Some(s.clone()),
            Value::String(_) => {
                self.add(field, format!("longer than {MAX_TEXT} bytes"));
                None
            }
            Value::Number(n) => Some(n.to_string()),
            _ => {
                self.add(field, "expected text");
                None
            }
        }
    }

    fn duration(
        &mut self,
        field: &str,
        v: Option<&Value>,
        range: (Duration, Duration),
    ) -> Option<Duration> {
        let t = self.text(field, v)?;
        match humantime::parse_duration(&t) {
            Ok(d) if d >= range.0 && d <= range.1 => Some(d),
            Ok(_) => {
                self.add(
                    field,
                    format!(
                        "out of range; expected from {} to {}",
                        humantime::format_duration(range.0),
                        humantime::format_duration(range.1)
                    ),
                );
                None
            }
            Err(e) => {
                self.add(
                    field,
                    format!("not a duration ({e}); expected e.g. 30s or 5m"),
                );
                None
            }
        }
    }
}

/// A key as it may be quoted back: plain characters only, at most 40.
pub(crate) fn printable(k: &str) -> String {
    let plain = k.len() <= 40
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match plain {
        true => k.to_string(),
        false => "(a key)".to_string(),
    }
}

const VERIFY_FIELDS: &[&str] = &["checks", "bake", "interval", "failureLimit"];
const CHECK_FIELDS: &[&str] = &["name", "http", "prometheus", "noData"];
const HTTP_FIELDS: &[&str] = &[
    "path",
    "url",
    "service",
    "port",
    "expect",
    "bodyContains",
    "versionField",
];
const PROM_FIELDS: &[&str] = &["query", "condition"];

/// Read a `verify:` block. Every problem is returned, each naming its field.
pub fn read(v: &Value) -> Result<Verification, Vec<Problem>> {
    let mut r = Reader {
        problems: Vec::new(),
    };
    let Some(m) = r.mapping("verify", v, VERIFY_FIELDS) else {
        return Err(r.problems);
    };
    let bake = r
        .duration("verify.bake", m.get("bake"), (Duration::ZERO, MAX_BAKE))
        .unwrap_or_default();
    let interval = r
        .duration(
            "verify.interval",
            m.get("interval"),
            (Duration::from_millis(100), Duration::from_secs(3600)),
        )
        .unwrap_or(Verification::DEFAULT_INTERVAL);
    let failure_limit = match m.get("failureLimit") {
        None => 1,
        Some(v) => match v.as_u64().filter(|n| (1..=1000).contains(n)) {
            Some(n) => n as u32,
            None => {
                r.add(
                    "verify.failureLimit",
                    "expected a whole number from 1 to 1000",
                );
                1
            }
        },
    };
    let checks = read_checks(&mut r, m.get("checks"));
    match r.problems.is_empty() {
        true => Ok(Verification {
            checks,
            bake,
            interval,
            failure_limit,
        }),
        false => Err(r.problems),
    }
}

/// The `checks:` list, each named once.
fn read_checks(r: &mut Reader, v: Option<&Value>) -> Vec<Check> {
    let mut checks = Vec::new();
    match v {
        None => r.add(
            "verify.checks",
            "missing; name at least one check (http or prometheus)",
        ),
        Some(Value::Array(list)) if list.is_empty() => r.add(
            "verify.checks",
            "empty; name at least one check (http or prometheus)",
        ),
        Some(Value::Array(list)) if list.len() > MAX_CHECKS => r.add(
            "verify.checks",
            format!("{} checks; at most {MAX_CHECKS}", list.len()),
        ),
        Some(Value::Array(list)) => {
            for (i, c) in list.iter().enumerate() {
                if let Some(c) = read_check(r, &format!("verify.checks[{i}]"), c) {
                    checks.push(c);
                }
            }
        }
        Some(_) => r.add("verify.checks", "expected a list of checks"),
    }
    let mut names = std::collections::HashSet::new();
    for c in &checks {
        if !names.insert(c.name.clone()) {
            r.add(
                "verify.checks",
                format!(
                    "two checks are named `{}`; give each its own `name`",
                    c.name
                ),
            );
        }
    }
    checks
}

fn read_check(r: &mut Reader, field: &str, v: &Value) -> Option<Check> {
    let m = r.mapping(field, v, CHECK_FIELDS)?;
    let no_data = match r.text(&format!("{field}.noData"), m.get("noData")) {
        None => NoData::default(),
        Some(t) => NoData::parse(&t).or_else(|| {
            r.add(
                &format!("{field}.noData"),
                format!("expected {}", NoData::CHOICES),
            );
            None
        })?,
    };
    let name = r.text(&format!("{field}.name"), m.get("name"));
    let probe = match (m.get("http"), m.get("prometheus")) {
        (Some(h), None) => Probe::Http(read_http(r, &format!("{field}.http"), h)?),
        (None, Some(p)) => Probe::Prometheus(read_prom(r, &format!("{field}.prometheus"), p)?),
        (Some(_), Some(_)) => {
            r.add(
                field,
                "one check is either `http` or `prometheus`, not both",
            );
            return None;
        }
        (None, None) => {
            r.add(field, "expected `http` or `prometheus`");
            return None;
        }
    };
    let name = name.unwrap_or_else(|| default_name(&probe));
    Some(Check {
        name,
        probe,
        no_data,
    })
}

fn default_name(p: &Probe) -> String {
    match p {
        Probe::Http(h) => match &h.target {
            HttpTarget::Service { path, .. } => format!("GET {path}"),
            HttpTarget::Url(u) => format!("GET {u}"),
        },
        Probe::Prometheus(p) => {
            let q: String = p.query.chars().take(40).collect();
            format!("query {q}")
        }
    }
}

fn read_http(r: &mut Reader, field: &str, v: &Value) -> Option<HttpCheck> {
    if let Value::String(path) = v {
        return Some(HttpCheck {
            target: HttpTarget::Service {
                service: None,
                port: None,
                path: service_path(r, field, path)?,
            },
            expect_class: 2,
            body_contains: None,
            version_field: None,
        });
    }
    let m = r.mapping(field, v, HTTP_FIELDS)?;
    let text = |r: &mut Reader, k: &str| r.text(&format!("{field}.{k}"), m.get(k));
    let target = http_target(r, field, m)?;
    let expect_class = match text(r, "expect") {
        None => 2,
        Some(e) => match e.as_bytes() {
            [c @ b'2'..=b'5', b'x', b'x'] => u16::from(c - b'0'),
            _ => {
                r.add(
                    &format!("{field}.expect"),
                    "expected a status class: 2xx, 3xx, 4xx or 5xx",
                );
                return None;
            }
        },
    };
    Some(HttpCheck {
        target,
        expect_class,
        body_contains: text(r, "bodyContains"),
        version_field: text(r, "versionField"),
    })
}

/// Where an `http:` check asks: a path on the workload's Service, or a URL as written.
fn http_target(
    r: &mut Reader,
    field: &str,
    m: &serde_json::Map<String, Value>,
) -> Option<HttpTarget> {
    let text = |r: &mut Reader, k: &str| r.text(&format!("{field}.{k}"), m.get(k));
    let (path, url) = (text(r, "path"), text(r, "url"));
    let (service, port) = (text(r, "service"), text(r, "port"));
    Some(match (path, url) {
        (Some(p), None) => {
            HttpTarget::Service {
                path: service_path(r, &format!("{field}.path"), &p)?,
                service: match service {
                    Some(s) if !crate::domain::valid_label(&s) => {
                        r.add(&format!("{field}.service"), "expected a Service name (lower-case letters, digits and '-', at most 63)");
                        return None;
                    }
                    s => s,
                },
                port,
            }
        }
        (None, Some(u)) => {
            if service.is_some() || port.is_some() {
                r.add(
                    field,
                    "`service` and `port` go with `path`; a `url` is asked as written",
                );
                return None;
            }
            match reqwest::Url::parse(&u) {
                Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
                _ => {
                    r.add(
                        &format!("{field}.url"),
                        "expected an http:// or https:// URL",
                    );
                    return None;
                }
            }
            HttpTarget::Url(u)
        }
        (Some(_), Some(_)) => {
            r.add(
                field,
                "use either `path` (on the workload's Service) or `url`, not both",
            );
            return None;
        }
        (None, None) => {
            r.add(
                field,
                "expected `path` (on the workload's Service) or `url`",
            );
            return None;
        }
    })
}

fn service_path(r: &mut Reader, field: &str, p: &str) -> Option<String> {
    let fine = p.starts_with('/')
        && !p.split(['/', '?']).any(|seg| seg == "..")
        && p.chars().all(|c| c.is_ascii_graphic());
    if !fine {
        r.add(
            field,
            "expected a path starting with / (no spaces, no `..`), e.g. /healthz",
        );
        return None;
    }
    Some(p.to_string())
}

fn read_prom(r: &mut Reader, field: &str, v: &Value) -> Option<PromCheck> {
    let m = r.mapping(field, v, PROM_FIELDS)?;
    let query = match m.get("query") {
        Some(Value::String(q)) if q.len() > MAX_QUERY => {
            r.add(
                &format!("{field}.query"),
                format!("longer than {MAX_QUERY} bytes"),
            );
            None
        }
        Some(Value::String(q)) => match promql_parser::parser::parse(q) {
            Ok(_) => Some(q.clone()),
            Err(e) => {
                let e: String = e.chars().filter(|c| !c.is_control()).take(200).collect();
                r.add(&format!("{field}.query"), format!("not valid PromQL: {e}"));
                None
            }
        },
        Some(_) => {
            r.add(&format!("{field}.query"), "expected a PromQL query as text");
            None
        }
        None => {
            r.add(
                &format!("{field}.query"),
                "missing; expected a PromQL query",
            );
            None
        }
    };
    let condition = match r.text(&format!("{field}.condition"), m.get("condition")) {
        Some(c) => match Condition::parse(&c) {
            Ok(c) => Some(c),
            Err(e) => {
                r.add(&format!("{field}.condition"), e);
                None
            }
        },
        None => {
            r.add(
                &format!("{field}.condition"),
                "missing; e.g. `< 0.01` or `<= baseline * 1.2`",
            );
            None
        }
    };
    Some(PromCheck {
        query: query?,
        condition: condition?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::verify::{Cmp, Rhs};
    use serde_json::json;

    #[test]
    fn a_full_block_reads() {
        let v = read(&json!({
            "bake": "5m",
            "interval": "15s",
            "failureLimit": 3,
            "checks": [
                {"http": "/healthz"},
                {"http": {"path": "/version", "port": "http", "versionField": "version"}},
                {"http": {"url": "https://example.com/ok", "expect": "2xx", "bodyContains": "ok"}},
                {"name": "error ratio", "noData": "wait", "prometheus": {
                    "query": "sum(rate(requests_total{code=~\"5..\"}[1m])) / sum(rate(requests_total[1m]))",
                    "condition": "<= baseline * 1.2"}},
            ]
        }))
        .expect("valid");
        assert_eq!(v.bake, Duration::from_secs(300));
        assert_eq!(v.interval, Duration::from_secs(15));
        assert_eq!(v.failure_limit, 3);
        assert_eq!(v.checks.len(), 4);
        assert_eq!(v.checks[0].name, "GET /healthz");
        assert_eq!(v.checks[3].name, "error ratio");
        assert_eq!(v.checks[3].no_data, NoData::Wait);
        let Probe::Prometheus(p) = &v.checks[3].probe else {
            panic!("prometheus");
        };
        assert_eq!(p.condition.op, Cmp::Le);
        assert_eq!(p.condition.rhs, Rhs::Baseline(1.2));
        assert!(v.needs_baseline());
        let Probe::Http(h) = &v.checks[1].probe else {
            panic!("http");
        };
        assert_eq!(h.version_field.as_deref(), Some("version"));
        assert_eq!(
            h.target,
            HttpTarget::Service {
                service: None,
                port: Some("http".into()),
                path: "/version".into()
            }
        );
    }

    #[test]
    fn each_problem_names_its_field() {
        let table: &[(Value, &str)] = &[
            (json!({"checks": []}), "verify.checks: empty"),
            (
                json!({"bake": "forever", "checks": [{"http": "/"}]}),
                "verify.bake: not a duration",
            ),
            (
                json!({"bake": "48h", "checks": [{"http": "/"}]}),
                "verify.bake: out of range",
            ),
            (
                json!({"failureLimit": 0, "checks": [{"http": "/"}]}),
                "verify.failureLimit: expected a whole number",
            ),
            (
                json!({"checks": [{"http": "healthz"}]}),
                "verify.checks[0].http: expected a path",
            ),
            (
                json!({"checks": [{"http": "/../secret"}]}),
                "verify.checks[0].http: expected a path",
            ),
            (
                json!({"checks": [{"htp": "/"}]}),
                "verify.checks[0].htp: unknown field; did you mean `http`?",
            ),
            (
                json!({"checks": [{"http": {"url": "file:///etc/passwd"}}]}),
                "verify.checks[0].http.url: expected an http://",
            ),
            (
                json!({"checks": [{"http": {"path": "/", "expect": "200"}}]}),
                "verify.checks[0].http.expect: expected a status class",
            ),
            (
                json!({"checks": [{"prometheus": {"query": "sum(rate(x[1m]", "condition": "< 1"}}]}),
                "verify.checks[0].prometheus.query: not valid PromQL",
            ),
            (
                json!({"checks": [{"prometheus": {"query": "up", "condition": "small"}}]}),
                "verify.checks[0].prometheus.condition: expected an operator",
            ),
            (
                json!({"checks": [{"prometheus": {"query": "up"}}]}),
                "verify.checks[0].prometheus.condition: missing",
            ),
            (
                json!({"checks": [{"http": "/", "noData": "maybe"}]}),
                "verify.checks[0].noData: expected fail, pass or wait",
            ),
            (
                json!({"checks": [{"http": "/"}, {"http": "/"}]}),
                "two checks are named `GET /`",
            ),
            (
                json!({"checks": [{"http": "/", "prometheus": {"query": "up", "condition": "<1"}}]}),
                "not both",
            ),
            (json!("yes"), "verify: expected a mapping"),
        ];
        for (v, want) in table {
            let problems = read(v).expect_err(want);
            assert!(
                problems.iter().any(|p| p.message.contains(want)),
                "{v}: {problems:?} should say {want}"
            );
        }
    }

    #[test]
    fn too_many_checks_are_refused() {
        let list: Vec<Value> = (0..17).map(|i| json!({"http": format!("/c{i}")})).collect();
        let problems = read(&json!({"checks": list})).expect_err("17 checks");
        assert!(problems[0].message.contains("at most 16"), "{problems:?}");
    }
}
