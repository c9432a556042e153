//! The policy file, `depwatch-policy.yaml` at the root of the deps directory: rules per
//! namespace glob that every service of those namespaces gets, whatever its own file says.
//! Today a rule sets verification checks; a dependency file's own `verify:` adds to what the
//! rules set and may make it stricter, never looser. Pure: read from bytes, applied to a parsed
//! file; ingest does the I/O.
//!
//! ```yaml
//! rules:
//!   - namespaces: ["prod", "prod-*"]
//!     verify:
//!       bake: 5m
//!       checks:
//!         - http: /healthz
//! ```

use std::fmt;

use serde_json::Value;

use crate::bounds::Glob;
use crate::domain::approval::{Needs, MAX_APPROVALS, MAX_TIMEOUT};
use crate::domain::verify::Verification;
use crate::domain::window::{Kind, Window};
use crate::domain::ServiceKey;

/// The policy file's name, at the root of the deps directory (files of that name in
/// sub-directories are not read).
pub const FILE_NAME: &str = "depwatch-policy.yaml";
/// The largest policy file read.
pub const MAX_SIZE: u64 = 1024 * 1024;
/// The most rules one policy holds.
pub const MAX_RULES: usize = 256;
/// The most namespace globs one rule names.
const MAX_GLOBS: usize = 64;

const TOP_FIELDS: &[&str] = &["rules"];
const RULE_FIELDS: &[&str] = &[
    "namespaces",
    "verify",
    "windows",
    "approvals",
    "approvalTimeout",
];
const WINDOW_FIELDS: &[&str] = &["allow", "deny", "duration", "timeZone"];
/// The most windows one rule holds.
const MAX_WINDOWS: usize = 32;

/// The rules, in the file's order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// `rules[2]`, for messages.
    at: usize,
    namespaces: Vec<Glob>,
    verify: Option<Verification>,
    windows: Vec<Window>,
    approvals: Option<Needs>,
}

impl Rule {
    fn covers(&self, namespace: &str) -> bool {
        self.namespaces.iter().any(|g| g.matches(namespace))
    }

    fn name(&self) -> String {
        let globs: Vec<String> = self.namespaces.iter().map(ToString::to_string).collect();
        format!("rules[{}] (namespaces {})", self.at, globs.join(", "))
    }
}

/// A problem of the policy file: its line when known, and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    /// The problem as said of the policy file at `file` (its path as shown).
    pub fn at(&self, file: &str) -> String {
        match self.line {
            Some(l) => format!("{file}:{l}: {}", self.message),
            None => format!("{file}: {}", self.message),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.at(FILE_NAME))
    }
}

/// Why a service's file cannot be taken under the policy (the message names both files).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

impl Policy {
    /// Whether the policy holds no rule.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// How many rules it holds.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The deploy windows of every rule covering the namespace: all of them hold (a deny of
    /// any rule denies; with allow windows, one must be open).
    pub fn windows(&self, namespace: &str) -> Vec<Window> {
        self.rules
            .iter()
            .filter(|r| r.covers(namespace))
            .flat_map(|r| r.windows.iter().cloned())
            .collect()
    }

    /// The approvals every rule covering the namespace asks, then the file's own (`own`),
    /// the strictest of each: most approvers, shortest wait.
    pub fn approvals(&self, namespace: &str, own: Option<Needs>) -> Option<Needs> {
        self.rules
            .iter()
            .filter(|r| r.covers(namespace))
            .filter_map(|r| r.approvals)
            .chain(own)
            .reduce(Needs::stricter)
    }

    /// A service's verification under the policy: that of every rule covering its namespace,
    /// in the policy's order, then the file's own (`own`), merged the strict way (see
    /// [`merge`]). `file` names the dependency file in messages.
    pub fn verification(
        &self,
        key: &ServiceKey,
        file: &str,
        own: Option<Verification>,
    ) -> Result<Option<Verification>, Conflict> {
        let mut verify: Option<(Verification, String)> = None;
        let sources = self
            .rules
            .iter()
            .filter(|r| r.covers(&key.namespace))
            .filter_map(|r| Some((r.verify.clone()?, format!("{FILE_NAME} {}", r.name()))))
            .chain(own.map(|v| (v, file.to_string())));
        for (add, source) in sources {
            verify = Some(match verify {
                None => (add, source),
                Some((base, from)) => (merge(base, &from, add, &source)?, from),
            });
        }
        Ok(verify.map(|(v, _)| v))
    }
}

/// Two verifications as one, the stricter way: every check of both (a name used by both is a
/// conflict, since neither may replace the other's), the longer bake, the shorter interval,
/// the lower failure limit. `base_from` and `add_from` name where each came from.
pub fn merge(
    base: Verification,
    base_from: &str,
    add: Verification,
    add_from: &str,
) -> Result<Verification, Conflict> {
    if let Some(c) = add
        .checks
        .iter()
        .find(|c| base.checks.iter().any(|b| b.name == c.name))
    {
        return Err(Conflict(format!(
            "{add_from}: the check `{}` is also declared by {base_from}; checks add to the policy's and never replace them, so give it another `name`",
            c.name
        )));
    }
    let total = base.checks.len() + add.checks.len();
    if total > crate::checks::form::MAX_CHECKS {
        return Err(Conflict(format!(
            "{add_from}: with the checks of {base_from} the service would have {total} checks; at most {}",
            crate::checks::form::MAX_CHECKS
        )));
    }
    let mut checks = base.checks;
    checks.extend(add.checks);
    Ok(Verification {
        checks,
        bake: base.bake.max(add.bake),
        interval: base.interval.min(add.interval),
        failure_limit: base.failure_limit.min(add.failure_limit),
    })
}

/// Read a policy file's bytes: the policy, or every problem it has (never an empty list).
/// An empty file (or one of comments only) is an empty policy.
pub fn parse(bytes: &[u8]) -> Result<Policy, Vec<Problem>> {
    let at = |line: Option<usize>, message: String| Problem { line, message };
    let text =
        std::str::from_utf8(bytes).map_err(|e| vec![at(None, format!("not UTF-8 text ({e})"))])?;
    let meaningful = text
        .lines()
        .map(crate::depfile::strip_comment)
        .any(|l| !l.is_empty());
    if !meaningful {
        return Ok(Policy::default());
    }
    let limits = crate::depfile::yaml_limits_of(100_000);
    let doc: Value = serde_saphyr::from_str_with_options(text, limits).map_err(|e| {
        let msg = e.to_string();
        let line = crate::depfile::parser_line(&msg);
        let what = match crate::depfile::beyond_limits(&msg) {
            true => "too large: at most 64 levels of nesting, 100,000 nodes and 256 aliases",
            false => "not valid YAML",
        };
        vec![at(
            line,
            format!("{what}; expected `rules:`, a list of rules"),
        )]
    })?;
    let mut problems = Vec::new();
    let rules = read_rules(&doc, &mut problems);
    let lines = Lines::new(text);
    match problems.is_empty() {
        true => Ok(Policy { rules }),
        false => Err(problems
            .into_iter()
            .map(|(field, message)| at(lines.of(&field), format!("{field}: {message}")))
            .collect()),
    }
}

/// A field path (`rules[1].verify.bake`) and what is wrong with it.
pub type FieldProblem = (String, String);

fn unknown_keys(
    field: &str,
    m: &serde_json::Map<String, Value>,
    known: &[&str],
) -> Vec<FieldProblem> {
    m.keys()
        .filter(|k| !known.contains(&k.as_str()))
        .map(|k| {
            let hint = crate::domain::closest(k, known.iter().copied())
                .map_or(String::new(), |c| format!("did you mean `{c}`? "));
            let name = crate::checks::form::printable(k);
            let at = match field.is_empty() {
                true => name,
                false => format!("{field}.{name}"),
            };
            (
                at,
                format!("unknown field; {hint}expected {}", known.join(", ")),
            )
        })
        .collect()
}

fn read_rules(doc: &Value, problems: &mut Vec<FieldProblem>) -> Vec<Rule> {
    let Some(top) = doc.as_object() else {
        problems.push((
            "rules".into(),
            "expected a mapping with `rules:`, a list of rules".into(),
        ));
        return Vec::new();
    };
    problems.extend(unknown_keys("", top, TOP_FIELDS));
    let list = match top.get("rules") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => {
            problems.push((
                "rules".into(),
                "expected a list of rules, each with `namespaces` and what it sets".into(),
            ));
            return Vec::new();
        }
    };
    if list.len() > MAX_RULES {
        problems.push((
            "rules".into(),
            format!("{} rules; at most {MAX_RULES}", list.len()),
        ));
        return Vec::new();
    }
    list.iter()
        .enumerate()
        .filter_map(|(i, r)| read_rule(i, r, problems))
        .collect()
}

fn read_rule(i: usize, v: &Value, problems: &mut Vec<FieldProblem>) -> Option<Rule> {
    let field = format!("rules[{i}]");
    let before = problems.len();
    let m = mapping(&field, v, RULE_FIELDS, problems)?;
    let namespaces = read_globs(
        &format!("{field}.namespaces"),
        m.get("namespaces"),
        problems,
    );
    let verify = m
        .get("verify")
        .and_then(|v| match crate::checks::form::read(v) {
            Ok(v) => Some(v),
            Err(list) => {
                problems.extend(list.into_iter().map(|p| {
                    let rest = p
                        .message
                        .strip_prefix(&format!("{}: ", p.field))
                        .unwrap_or(&p.message);
                    (format!("{field}.{}", p.field), rest.to_string())
                }));
                None
            }
        });
    let windows = read_windows(&format!("{field}.windows"), m.get("windows"), problems);
    let approvals = read_approvals(&field, m, problems);
    if RULE_FIELDS[1..].iter().all(|f| m.get(*f).is_none()) && problems.len() == before {
        problems.push((
            field,
            format!(
                "sets nothing; expected at least one of {}",
                RULE_FIELDS[1..].join(", ")
            ),
        ));
        return None;
    }
    (problems.len() == before).then_some(Rule {
        at: i,
        namespaces,
        verify,
        windows,
        approvals,
    })
}

/// `approvals: N` (distinct approvers, 0 for none) and `approvalTimeout` (how long a save
/// waits for them, 24h when not given) of a mapping; `prefix` names its fields in problems
/// (empty for a dependency file's top level).
pub fn read_approvals(
    prefix: &str,
    m: &serde_json::Map<String, Value>,
    problems: &mut Vec<FieldProblem>,
) -> Option<Needs> {
    let field = |f: &str| match prefix.is_empty() {
        true => f.to_string(),
        false => format!("{prefix}.{f}"),
    };
    let count = match m.get("approvals") {
        None => None,
        Some(v) => match v.as_u64().filter(|n| *n <= u64::from(MAX_APPROVALS)) {
            Some(n) => Some(n as u32),
            None => {
                problems.push((
                    field("approvals"),
                    format!("expected how many distinct people must approve each save, 0 to {MAX_APPROVALS}"),
                ));
                return None;
            }
        },
    };
    let timeout = match m.get("approvalTimeout") {
        None => None,
        Some(v) => {
            let parsed = v.as_str().map(humantime::parse_duration);
            match parsed {
                Some(Ok(d)) if d >= std::time::Duration::from_secs(1) && d <= MAX_TIMEOUT => {
                    Some(d)
                }
                _ => {
                    problems.push((
                        field("approvalTimeout"),
                        "expected how long a save waits for its approvals, from 1s to 30d, e.g. 24h".into(),
                    ));
                    return None;
                }
            }
        }
    };
    match count {
        Some(approvals) => Some(Needs { approvals, timeout }),
        None if m.contains_key("approvalTimeout") => {
            problems.push((
                field("approvalTimeout"),
                "set without `approvals`: say how many must approve".into(),
            ));
            None
        }
        None => None,
    }
}

/// A `windows:` list (the policy's rules and a dependency file's own), each problem named
/// by its field.
pub fn read_windows(
    field: &str,
    v: Option<&Value>,
    problems: &mut Vec<FieldProblem>,
) -> Vec<Window> {
    let list = match v {
        None => return Vec::new(),
        Some(Value::Array(list)) if list.len() > MAX_WINDOWS => {
            problems.push((
                field.into(),
                format!("{} windows; at most {MAX_WINDOWS}", list.len()),
            ));
            return Vec::new();
        }
        Some(Value::Array(list)) => list,
        Some(_) => {
            problems.push((
                field.into(),
                "expected a list of windows, e.g. [{deny: \"0 18 * * Fri\", duration: 63h, timeZone: Europe/Berlin}]".into(),
            ));
            return Vec::new();
        }
    };
    list.iter()
        .enumerate()
        .filter_map(|(i, w)| read_window(format!("{field}[{i}]"), w, problems))
        .collect()
}

/// The mapping at `at`, each key it does not know named; None when it is no mapping (said
/// in `problems`).
fn mapping<'v>(
    at: &str,
    v: &'v Value,
    known: &[&str],
    problems: &mut Vec<FieldProblem>,
) -> Option<&'v serde_json::Map<String, Value>> {
    let Some(m) = v.as_object() else {
        problems.push((
            at.into(),
            format!("expected a mapping with {}", known.join(", ")),
        ));
        return None;
    };
    problems.extend(unknown_keys(at, m, known));
    Some(m)
}

/// One window of a `windows:` list, at `at`; None when it has a problem (said in `problems`).
fn read_window(at: String, w: &Value, problems: &mut Vec<FieldProblem>) -> Option<Window> {
    let before = problems.len();
    let m = mapping(&at, w, WINDOW_FIELDS, problems)?;
    let (kind, cron) = match (m.get("allow"), m.get("deny")) {
        (Some(c), None) => (Kind::Allow, c),
        (None, Some(c)) => (Kind::Deny, c),
        _ => {
            problems.push((
                at,
                "expected one of `allow` or `deny`, a cron schedule of the window's starts".into(),
            ));
            return None;
        }
    };
    let key = kind.as_str();
    let Some(cron) = cron.as_str() else {
        problems.push((
            format!("{at}.{key}"),
            "expected a cron schedule as text, e.g. \"0 18 * * Fri\"".into(),
        ));
        return None;
    };
    let duration = match m
        .get("duration")
        .and_then(Value::as_str)
        .map(humantime::parse_duration)
    {
        Some(Ok(d)) => d,
        Some(Err(_)) | None => {
            problems.push((
                format!("{at}.duration"),
                "expected how long each window lasts, e.g. 8h or 2d 15h".into(),
            ));
            return None;
        }
    };
    let zone = match m.get("timeZone") {
        None => "UTC",
        Some(Value::String(z)) if z.len() <= 64 => z.as_str(),
        Some(_) => {
            problems.push((
                format!("{at}.timeZone"),
                "expected an IANA time zone name such as Europe/Berlin".into(),
            ));
            return None;
        }
    };
    if problems.len() > before {
        return None;
    }
    match Window::new(kind, cron, duration, zone) {
        Ok(w) => Some(w),
        Err((part, why)) => {
            let part = if part == "cron" { key } else { part };
            problems.push((format!("{at}.{part}"), why));
            None
        }
    }
}

fn read_globs(field: &str, v: Option<&Value>, problems: &mut Vec<FieldProblem>) -> Vec<Glob> {
    let expected = "expected a namespace or a glob (prod, team-*), or a list of them";
    let items: Vec<&Value> = match v {
        None => {
            problems.push((field.into(), format!("missing; {expected}")));
            return Vec::new();
        }
        Some(Value::Array(list)) if list.is_empty() => {
            problems.push((field.into(), format!("empty; {expected}")));
            return Vec::new();
        }
        Some(Value::Array(list)) if list.len() > MAX_GLOBS => {
            problems.push((
                field.into(),
                format!("{} globs; at most {MAX_GLOBS}", list.len()),
            ));
            return Vec::new();
        }
        Some(Value::Array(list)) => list.iter().collect(),
        Some(one) => vec![one],
    };
    let mut globs = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = match v {
            Some(Value::Array(_)) => format!("{field}[{i}]"),
            _ => field.to_string(),
        };
        let glob = item
            .as_str()
            .filter(|s| s.len() <= 253)
            .map(|s| (s, Glob::new(s)));
        match glob {
            Some((s, Ok(g))) if namespace_glob(s) => globs.push(g),
            _ => problems.push((
                at,
                format!("{expected}; a namespace is lower-case letters, digits and '-'"),
            )),
        }
    }
    globs
}

/// A namespace glob: what a namespace holds, plus `*` and `?`.
fn namespace_glob(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '*' | '?'))
}

/// Where the fields of a policy file are: each rule's first line, so a problem's field is
/// looked for inside its own rule.
struct Lines<'a> {
    text: &'a str,
    rule_starts: Vec<usize>,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str) -> Lines<'a> {
        let indent = |l: &str| l.len() - l.trim_start().len();
        let mut rule_starts = Vec::new();
        let mut item_indent = None;
        let mut in_rules = false;
        for (i, line) in text.lines().enumerate() {
            let body = crate::depfile::strip_comment(line);
            if body.is_empty() {
                continue;
            }
            if indent(line) == 0 && !body.starts_with('-') {
                in_rules = body.starts_with("rules:");
                continue;
            }
            if !in_rules || !body.starts_with('-') {
                continue;
            }
            let n = indent(line);
            if *item_indent.get_or_insert(n) == n {
                rule_starts.push(i);
            }
        }
        Lines { text, rule_starts }
    }

    /// The 1-based line of `field`: the rule's own lines are searched for its last named key.
    fn of(&self, field: &str) -> Option<usize> {
        let rule: Option<usize> = field
            .strip_prefix("rules[")
            .and_then(|r| r.split(']').next())
            .and_then(|n| n.parse().ok());
        let key = field
            .rsplit('.')
            .map(|s| s.split('[').next().unwrap_or(s))
            .find(|s| !s.is_empty() && !s.starts_with("rules"));
        let Some(rule) = rule else {
            return self
                .text
                .lines()
                .position(|l| l.trim_start().starts_with("rules:"))
                .map(|i| i + 1);
        };
        let start = *self.rule_starts.get(rule)?;
        let end = self
            .rule_starts
            .get(rule + 1)
            .copied()
            .unwrap_or(usize::MAX);
        let lines = self
            .text
            .lines()
            .enumerate()
            .skip(start)
            .take_while(|(i, _)| *i < end);
        let found = match key {
            Some(k) => {
                let needle = format!("{k}:");
                lines.clone().find(|(_, l)| l.contains(&needle))
            }
            None => None,
        };
        Some(found.map_or(start, |(i, _)| i) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(ns: &str) -> ServiceKey {
        ServiceKey::new("web", ns).expect("key")
    }

    fn verify(yaml: &str) -> Verification {
        let v: Value = serde_saphyr::from_str(yaml).expect("yaml");
        crate::checks::form::read(&v).expect("verify")
    }

    fn spec(verify: Option<Verification>) -> Option<Verification> {
        verify
    }

    const POLICY: &str = "\
# checks every production service gets
rules:
  - namespaces: [prod, \"prod-*\"]
    verify:
      bake: 5m
      interval: 30s
      failureLimit: 3
      checks:
        - name: healthz
          http: /healthz
  - namespaces: prod-eu
    verify:
      bake: 1m
      checks:
        - http: /ready
";

    #[test]
    fn rules_apply_by_namespace_glob_in_order_and_merge_the_strict_way() {
        let p = parse(POLICY.as_bytes()).expect("valid policy");
        assert_eq!(p.len(), 2);
        // No rule covers staging: the file's own block alone.
        let own = verify("checks: [{http: /own}]\nbake: 10s\n");
        let s = p
            .verification(&key("staging"), "web_staging.dep", spec(Some(own.clone())))
            .expect("apply");
        assert_eq!(s, Some(own.clone()));
        // No block anywhere: none.
        let s = p
            .verification(&key("staging"), "f", spec(None))
            .expect("apply");
        assert_eq!(s, None);
        // One rule, no block of its own: the rule's.
        let s = p
            .verification(&key("prod"), "f", spec(None))
            .expect("apply");
        let v = s.expect("the rule's");
        assert_eq!(v.checks.len(), 1);
        assert_eq!(
            (v.bake, v.interval, v.failure_limit),
            (Duration::from_secs(300), Duration::from_secs(30), 3)
        );
        // Two rules and the file: every check, longest bake, shortest interval, lowest limit.
        let s = p
            .verification(&key("prod-eu"), "f", spec(Some(own)))
            .expect("apply");
        let v = s.expect("merged");
        let names: Vec<&str> = v.checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["healthz", "GET /ready", "GET /own"]);
        assert_eq!(
            v.bake,
            Duration::from_secs(300),
            "a file's shorter bake never shortens the policy's"
        );
        assert_eq!(v.interval, Duration::from_secs(10));
        assert_eq!(v.failure_limit, 1);
        // A file can lengthen the bake.
        let long = verify("checks: [{http: /own}]\nbake: 20m\n");
        let v = p
            .verification(&key("prod"), "f", spec(Some(long)))
            .expect("apply")
            .expect("merged");
        assert_eq!(v.bake, Duration::from_secs(1200));
    }

    #[test]
    fn a_file_cannot_replace_a_policy_check_by_reusing_its_name() {
        let p = parse(POLICY.as_bytes()).expect("valid policy");
        let same = verify("checks: [{name: healthz, http: /always-ok}]\n");
        let e = p
            .verification(&key("prod"), "web_prod.dep", spec(Some(same)))
            .expect_err("conflict");
        assert!(
            e.0.starts_with("web_prod.dep: the check `healthz` is also declared by depwatch-policy.yaml rules[0] (namespaces prod, prod-*)"),
            "{e}"
        );
    }

    #[test]
    fn more_than_sixteen_checks_together_are_refused() {
        let many: String = (0..10).map(|i| format!("      - http: /p{i}\n")).collect();
        let policy = format!("rules:\n- namespaces: '*'\n  verify:\n    checks:\n{many}");
        let p = parse(policy.as_bytes()).expect("valid");
        let file: String = (0..7).map(|i| format!("  - http: /f{i}\n")).collect();
        let e = p
            .verification(
                &key("x"),
                "f.dep",
                spec(Some(verify(&format!("checks:\n{file}")))),
            )
            .expect_err("too many");
        assert!(e.0.contains("17 checks; at most 16"), "{e}");
    }

    #[test]
    fn windows_are_read_per_rule_and_their_problems_named() {
        let text = "rules:\n  - namespaces: \"prod*\"\n    windows:\n      - deny: \"0 18 * * Fri\"\n        duration: 63h\n        timeZone: Europe/Berlin\n  - namespaces: '*'\n    windows:\n      - allow: \"0 8 * * Mon-Fri\"\n        duration: 10h\n";
        let p = parse(text.as_bytes()).expect("valid");
        let prod: Vec<String> = p
            .windows("prod-eu")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            prod,
            [
                "deny \"0 18 * * Fri\" for 2days 15h (Europe/Berlin)",
                "allow \"0 8 * * Mon-Fri\" for 10h (UTC)"
            ]
        );
        assert_eq!(p.windows("dev").len(), 1);
        let cases: &[(&str, &str)] = &[
            ("rules:\n  - namespaces: a\n    windows: {deny: x}\n", "rules[0].windows: expected a list of windows"),
            ("rules:\n  - namespaces: a\n    windows:\n      - duration: 1h\n", "rules[0].windows[0]: expected one of `allow` or `deny`"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 18 * *\"\n        duration: 1h\n", "depwatch-policy.yaml:4: rules[0].windows[0].deny: 4 fields; expected five"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 99 * * *\"\n        duration: 1h\n", "rules[0].windows[0].deny: not a cron schedule"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 18 * * *\"\n        duration: forever\n", "depwatch-policy.yaml:5: rules[0].windows[0].duration: expected how long"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 18 * * *\"\n        duration: 9d\n", "rules[0].windows[0].duration: expected from 1m to 7d"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 18 * * *\"\n        duration: 1h\n        timeZone: Mars/Base\n", "depwatch-policy.yaml:6: rules[0].windows[0].timeZone: not a time zone"),
            ("rules:\n  - namespaces: a\n    windows:\n      - deny: \"0 18 * * *\"\n        duration: 1h\n        tz: UTC\n", "rules[0].windows[0].tz: unknown field"),
        ];
        for (text, want) in cases {
            let got = parse(text.as_bytes()).expect_err(text);
            let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
            assert!(
                shown.iter().any(|s| s.contains(want)),
                "{text:?}: {shown:?}"
            );
        }
    }

    #[test]
    fn approvals_apply_by_namespace_and_merge_the_strict_way() {
        use crate::domain::approval::Needs;
        let p = parse(
            b"rules:\n  - namespaces: [\"prod*\"]\n    approvals: 1\n    approvalTimeout: 8h\n  - namespaces: [prod]\n    approvals: 2\n",
        )
        .expect("valid");
        let needs = |approvals, hours: Option<u64>| Needs {
            approvals,
            timeout: hours.map(|h| Duration::from_secs(h * 3600)),
        };
        assert_eq!(p.approvals("prod", None), Some(needs(2, Some(8))));
        assert_eq!(p.approvals("prod-eu", None), Some(needs(1, Some(8))));
        assert_eq!(p.approvals("staging", None), None);
        // A file asks for more, never fewer; its shorter wait applies, its longer one not.
        assert_eq!(
            p.approvals("prod-eu", Some(needs(0, Some(48)))),
            Some(needs(1, Some(8)))
        );
        assert_eq!(
            p.approvals("prod-eu", Some(needs(3, Some(1)))),
            Some(needs(3, Some(1)))
        );
        assert_eq!(
            p.approvals("staging", Some(needs(1, None))),
            Some(needs(1, None))
        );
    }

    #[test]
    fn empty_and_comment_only_policies_hold_no_rule() {
        for text in ["", "\n\n", "# nothing yet\n", "rules:\n", "rules: []\n"] {
            let p = parse(text.as_bytes()).expect(text);
            assert!(p.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn every_problem_names_its_field_and_line() {
        let cases: &[(&str, &str)] = &[
            ("rules: 3\n", "depwatch-policy.yaml:1: rules: expected a list of rules"),
            ("rule:\n  - namespaces: x\n", "depwatch-policy.yaml: rule: unknown field; did you mean `rules`? expected rules"),
            ("rules:\n  - verify:\n      checks: [{http: /h}]\n", "depwatch-policy.yaml:2: rules[0].namespaces: missing; expected a namespace or a glob"),
            ("rules:\n  - namespaces: Prod\n    verify: {checks: [{http: /h}]}\n", "depwatch-policy.yaml:2: rules[0].namespaces: expected a namespace or a glob"),
            ("rules:\n  - namespaces: [a, 'b c']\n    verify: {checks: [{http: /h}]}\n", "depwatch-policy.yaml:2: rules[0].namespaces[1]: expected"),
            ("rules:\n  - namespaces: []\n", "rules[0].namespaces: empty;"),
            ("rules:\n  - namespaces: prod\n", "depwatch-policy.yaml:2: rules[0]: sets nothing; expected at least one of verify"),
            (
                "rules:\n  - namespaces: a\n    verify: {checks: [{http: /h}]}\n  - namespaces: b\n    approvls: 2\n    verify:\n      checks: [{http: /h}]\n",
                "depwatch-policy.yaml:5: rules[1].approvls: unknown field; did you mean `approvals`?",
            ),
            ("rules:\n  - namespaces: b\n    approvals: -1\n", "depwatch-policy.yaml:3: rules[0].approvals: expected how many distinct people must approve each save, 0 to 10"),
            ("rules:\n  - namespaces: b\n    approvals: 11\n", "rules[0].approvals: expected how many"),
            ("rules:\n  - namespaces: b\n    approvals: two\n", "rules[0].approvals: expected how many"),
            ("rules:\n  - namespaces: b\n    approvals: 1\n    approvalTimeout: soon\n", "depwatch-policy.yaml:4: rules[0].approvalTimeout: expected how long a save waits"),
            ("rules:\n  - namespaces: b\n    approvals: 1\n    approvalTimeout: 90d\n", "rules[0].approvalTimeout: expected how long a save waits for its approvals, from 1s to 30d"),
            ("rules:\n  - namespaces: b\n    approvalTimeout: 1h\n", "depwatch-policy.yaml:3: rules[0].approvalTimeout: set without `approvals`"),
            (
                "rules:\n  - namespaces: a\n    verify: {checks: [{http: /h}]}\n  - namespaces: b\n    verify:\n      bake: soon\n      checks: [{http: /h}]\n",
                "depwatch-policy.yaml:6: rules[1].verify.bake: not a duration",
            ),
            (
                "rules:\n  - namespaces: b\n    verify:\n      checks:\n        - prometheus:\n            query: rate(x[5m]\n            condition: '< 1'\n",
                "depwatch-policy.yaml:6: rules[0].verify.checks[0].prometheus.query: not valid PromQL",
            ),
            ("rules: [\n", "depwatch-policy.yaml:"),
            ("\u{1b}[31m: 1\n", "not valid YAML"),
            ("\"\\e[31m\": 1\n", "depwatch-policy.yaml: (a key): unknown field"),
        ];
        for (text, want) in cases {
            let got = parse(text.as_bytes()).expect_err(text);
            let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
            assert!(
                shown
                    .iter()
                    .any(|s| s.starts_with(want) || s.contains(want)),
                "{text:?}: {shown:?}"
            );
            assert!(
                shown.iter().all(|s| !s.contains('\u{1b}')),
                "nothing hostile quoted: {shown:?}"
            );
        }
    }

    #[test]
    fn an_unknown_field_is_named_once_and_does_not_hide_the_others() {
        let text = "rules:\n  - namespaces: a\n    verfy: {}\n    verify:\n      bake: x\n      checks: [{http: /h}]\n";
        let got = parse(text.as_bytes()).expect_err("two problems");
        let shown: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert!(
            shown[0].contains("rules[0].verfy: unknown field; did you mean `verify`?"),
            "{shown:?}"
        );
        assert!(
            shown[1].contains("rules[0].verify.bake: not a duration"),
            "{shown:?}"
        );
    }

    #[test]
    fn bytes_that_are_not_text_or_too_deep_are_refused() {
        let e = parse(b"\xff\xfe").expect_err("binary");
        assert!(e[0].message.contains("not UTF-8"), "{e:?}");
        let deep = format!("rules: {}{}\n", "[".repeat(200), "]".repeat(200));
        let e = parse(deep.as_bytes()).expect_err("deep");
        assert!(e[0].message.contains("too large"), "{e:?}");
    }
}
