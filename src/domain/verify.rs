//! Verification: the checks that say a version is good once its rollout is healthy, and the
//! bake that samples them. Pure: the samples are taken elsewhere (`checks/`), judged here.

use std::fmt;
use std::time::Duration;

/// What a service declares about its own health after a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    pub checks: Vec<Check>,
    /// How long the checks must keep passing once the rollout is healthy (zero: one round).
    pub bake: Duration,
    /// Time between two rounds of samples.
    pub interval: Duration,
    /// How many failed samples of one check fail the bake.
    pub failure_limit: u32,
}

// Every number in a verification is finite (the reader refuses others), so equality is total.
impl Eq for Verification {}

impl Verification {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

    /// A check compares with the value measured before the PATCH.
    pub fn needs_baseline(&self) -> bool {
        self.checks.iter().any(|c| c.baseline_query().is_some())
    }

    /// How long a bake may run at most: `noData: wait` extends it up to twice the bake
    /// (at least a minute), then the silent check fails.
    pub fn longest(&self) -> Duration {
        self.bake + self.bake.max(Duration::from_secs(60))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// Shown in reasons and results: given, or made from the probe (`GET /healthz`).
    pub name: String,
    pub probe: Probe,
    pub no_data: NoData,
}

impl Check {
    /// The query measured before the PATCH, when the condition compares with it.
    pub fn baseline_query(&self) -> Option<&str> {
        match &self.probe {
            Probe::Prometheus(p) if matches!(p.condition.rhs, Rhs::Baseline(_)) => Some(&p.query),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    Http(HttpCheck),
    Prometheus(PromCheck),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub target: HttpTarget,
    /// The status class expected: 2 for `2xx`.
    pub expect_class: u16,
    /// The body must contain this text.
    pub body_contains: Option<String>,
    /// This JSON field (dotted path) must equal the version being deployed.
    pub version_field: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpTarget {
    /// A path on a Service of the workload's namespace, through the API server's proxy.
    Service {
        /// The Service's name; the workload's name when not given.
        service: Option<String>,
        /// Port name or number; the Service's first port when not given.
        port: Option<String>,
        path: String,
    },
    /// Any URL, asked directly.
    Url(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromCheck {
    pub query: String,
    pub condition: Condition,
}

/// `< 0.01`, `<= baseline * 1.2`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Condition {
    pub op: Cmp,
    pub rhs: Rhs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rhs {
    Value(f64),
    /// The value measured before the PATCH, times this factor.
    Baseline(f64),
}

/// What a check that finds nothing to measure (no series, no answer body) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoData {
    /// A failed sample.
    #[default]
    Fail,
    /// A passed sample.
    Pass,
    /// Not a sample: the bake does not end before the check has had data.
    Wait,
}

impl NoData {
    pub const CHOICES: &'static str = "fail, pass or wait";

    pub fn parse(s: &str) -> Option<NoData> {
        match s {
            "fail" => Some(NoData::Fail),
            "pass" => Some(NoData::Pass),
            "wait" => Some(NoData::Wait),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NoData::Fail => "fail",
            NoData::Pass => "pass",
            NoData::Wait => "wait",
        }
    }
}

impl Cmp {
    pub fn as_str(self) -> &'static str {
        match self {
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
        }
    }

    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Cmp::Lt => a < b,
            Cmp::Le => a <= b,
            Cmp::Gt => a > b,
            Cmp::Ge => a >= b,
            Cmp::Eq => a == b,
            Cmp::Ne => a != b,
        }
    }

    /// The comparison that fails when this one holds, for a failure's reason.
    fn negated(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Ge,
            Cmp::Le => Cmp::Gt,
            Cmp::Gt => Cmp::Le,
            Cmp::Ge => Cmp::Lt,
            Cmp::Eq => Cmp::Ne,
            Cmp::Ne => Cmp::Eq,
        }
    }
}

impl Condition {
    /// Parse `< 0.01`, `>= 99.5`, `<= baseline`, `<= baseline * 1.2`.
    pub fn parse(s: &str) -> Result<Condition, String> {
        const EXPECTED: &str =
            "expected an operator (<, <=, >, >=, ==, !=) and a number or `baseline * N`, e.g. `< 0.01` or `<= baseline * 1.2`";
        let s = s.trim();
        let ops = [
            ("<=", Cmp::Le),
            (">=", Cmp::Ge),
            ("==", Cmp::Eq),
            ("!=", Cmp::Ne),
            ("<", Cmp::Lt),
            (">", Cmp::Gt),
        ];
        let Some((op, rest)) = ops
            .iter()
            .find_map(|(t, op)| s.strip_prefix(t).map(|rest| (*op, rest.trim())))
        else {
            return Err(EXPECTED.into());
        };
        let number = |t: &str| -> Result<f64, String> {
            t.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| format!("`{}` is not a number; {EXPECTED}", t.trim()))
        };
        let rhs = match rest.strip_prefix("baseline") {
            Some("") => Rhs::Baseline(1.0),
            Some(tail) => match tail.trim().strip_prefix('*') {
                Some(f) => Rhs::Baseline(number(f)?),
                None => return Err(EXPECTED.into()),
            },
            None => Rhs::Value(number(rest)?),
        };
        Ok(Condition { op, rhs })
    }

    /// Whether `value` meets the condition, given the baseline (None when it was not
    /// measured: a baseline condition then cannot hold and says so).
    pub fn judge(&self, value: f64, baseline: Option<f64>) -> Result<(), String> {
        let (bound, said) = match self.rhs {
            Rhs::Value(v) => (v, fmt_value(v)),
            Rhs::Baseline(f) => match baseline {
                Some(b) if f == 1.0 => (b, format!("baseline {}", fmt_value(b))),
                Some(b) => (
                    b * f,
                    format!("baseline {} × {}", fmt_value(b), fmt_value(f)),
                ),
                None => return Err("no baseline was measured before the deploy".into()),
            },
        };
        match self.op.holds(value, bound) {
            true => Ok(()),
            false => Err(format!(
                "{} {} {said}",
                fmt_value(value),
                self.op.negated().as_str()
            )),
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rhs {
            Rhs::Value(v) => write!(f, "{} {}", self.op.as_str(), fmt_value(v)),
            Rhs::Baseline(1.0) => write!(f, "{} baseline", self.op.as_str()),
            Rhs::Baseline(x) => write!(f, "{} baseline * {}", self.op.as_str(), fmt_value(x)),
        }
    }
}

/// A measured value as people read it: at most four significant decimals.
pub fn fmt_value(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "0" || s == "-0" {
        format!("{v:.3e}")
    } else {
        s.to_string()
    }
}

/// One check's answer in one round.
#[derive(Debug, Clone, PartialEq)]
pub enum Sample {
    Pass {
        value: String,
    },
    Fail {
        value: String,
        why: String,
    },
    /// Nothing to measure (no series; the endpoint gave no body to judge).
    NoData {
        why: String,
    },
}

impl Sample {
    /// The sample's result as metrics label it.
    pub fn result(&self) -> &'static str {
        match self {
            Sample::Pass { .. } => "pass",
            Sample::Fail { .. } => "fail",
            Sample::NoData { .. } => "no_data",
        }
    }
}

/// One check's record over a bake, as shown on the history row and in notifications.
#[derive(
    Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct CheckResult {
    pub name: String,
    /// Samples taken (with data or not).
    pub samples: u32,
    pub passed: u32,
    pub failed: u32,
    pub no_data: u32,
    /// The last value measured, as text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last: String,
    /// The baseline measured before the PATCH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<f64>,
    /// Why the last failed sample failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub why: String,
}

// A baseline is a finite number (NaN is no data), so equality is total.
impl Eq for CheckResult {}

/// How the verification of a healthy rollout ended.
#[derive(Debug, Clone, PartialEq)]
pub enum VerifyOutcome {
    Passed {
        results: Vec<CheckResult>,
    },
    /// An operator cut the bake short (`depwatch promote`): good without the time left.
    Promoted {
        by: String,
        results: Vec<CheckResult>,
    },
    /// A check reached its failure limit (or stayed silent under `noData: wait`).
    Failed {
        reason: String,
        results: Vec<CheckResult>,
    },
    /// A newer version arrived during the bake.
    Superseded,
    /// The workload was deleted during the bake.
    Disappeared,
    /// Someone else wrote the workload's images during the bake.
    ChangedOutside {
        running: super::Images,
    },
}

/// An operator's word on a version, recorded on the service before it is acted on, for the
/// content it was given for: `depwatch promote` ends its bake as passed, `depwatch rollback`
/// during it as failed, `depwatch deploy --now` releases it when a deploy window or a freeze
/// holds it (break-glass). A word for other content (an earlier version's) means nothing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Judgement {
    /// The content hash of the version judged.
    pub hash: String,
    pub ruling: Ruling,
    /// Who: the local user or the API token's name.
    pub by: String,
    pub at: String,
    /// Why, for a break-glass release.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum Ruling {
    /// Good now, without the rest of the bake.
    Promote,
    /// Bad: rolled back and pinned like a failed check.
    Fail,
    /// Deployed now, through a deploy window or a freeze (not through approvals).
    Release,
}

impl Judgement {
    /// The record's text for it (JSON).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Read back from the record's text; nothing for empty or unreadable text.
    pub fn from_text(text: &str) -> Option<Judgement> {
        serde_json::from_str(text).ok()
    }

    /// How the bake ends under this word, for the version with content `hash`: nothing when
    /// the word is for other content.
    pub fn outcome(&self, hash: &str, results: Vec<CheckResult>) -> Option<VerifyOutcome> {
        // A release is no word on a bake.
        if self.hash != hash {
            return None;
        }
        Some(match self.ruling {
            Ruling::Release => return None,
            Ruling::Promote => VerifyOutcome::Promoted {
                by: self.by.clone(),
                results,
            },
            Ruling::Fail => VerifyOutcome::Failed {
                reason: format!("failed by {} during the bake (depwatch rollback)", self.by),
                results,
            },
        })
    }
}

/// The checks' baselines by position (None: the check has none, or none was measured).
#[derive(
    Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Baselines(pub Vec<Option<f64>>);

// Baselines are finite numbers (NaN is no data), so equality is total.
impl Eq for Baselines {}

/// A bake a stop interrupted, as its deploy row recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResumedBake {
    /// How long it had baked.
    pub baked: Duration,
    pub baselines: Baselines,
}

/// What a deploy row keeps of its bake (JSON in the record, an object in the API): written
/// when it begins (a stop resumes it from here), and again with the checks' results when it
/// ends.
#[derive(
    Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct BakeRow {
    /// RFC 3339: when the checks began to bake.
    pub started_at: String,
    /// The value each check's query gave just before the PATCH, by position (null: the check
    /// compares with none).
    pub baselines: Baselines,
    /// Each check's record over the bake, once it has ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub results: Vec<CheckResult>,
}

// Baselines and results hold finite numbers only, so equality is total.
impl Eq for BakeRow {}

impl BakeRow {
    /// The record's text for it (JSON).
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Read back from the record's text; nothing for empty or unreadable text.
    pub fn from_text(text: &str) -> Option<BakeRow> {
        serde_json::from_str(text).ok()
    }
}

/// How a bake stands after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum BakeVerdict {
    /// Sample again after the interval.
    Continue,
    Passed,
    /// The reason, naming the check, its values and the baseline.
    Failed(String),
}

/// The bake's running tally: fed each round's samples and the time baked so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Bake {
    pub results: Vec<CheckResult>,
    no_data: Vec<NoData>,
    bake: Duration,
    longest: Duration,
    failure_limit: u32,
}

impl Bake {
    pub fn new(v: &Verification, baselines: &[Option<f64>]) -> Bake {
        Bake {
            results: v
                .checks
                .iter()
                .enumerate()
                .map(|(i, c)| CheckResult {
                    name: c.name.clone(),
                    baseline: baselines.get(i).copied().flatten(),
                    ..CheckResult::default()
                })
                .collect(),
            no_data: v.checks.iter().map(|c| c.no_data).collect(),
            bake: v.bake,
            longest: v.longest(),
            failure_limit: v.failure_limit.max(1),
        }
    }

    /// Take up a bake a stop interrupted, with the results it had recorded.
    pub fn resume(mut self, results: Vec<CheckResult>) -> Bake {
        for (mine, old) in self.results.iter_mut().zip(results) {
            if mine.name == old.name {
                *mine = CheckResult {
                    baseline: mine.baseline.or(old.baseline),
                    ..old
                };
            }
        }
        self
    }

    /// Add one round (one sample per check, in order), taken `baked` after the rollout was
    /// healthy, and judge.
    pub fn round(&mut self, samples: Vec<Sample>, baked: Duration) -> BakeVerdict {
        for ((r, s), nd) in self.results.iter_mut().zip(samples).zip(&self.no_data) {
            r.samples += 1;
            let s = match (s, nd) {
                (Sample::NoData { why }, NoData::Fail) => {
                    r.no_data += 1;
                    Sample::Fail {
                        value: "no data".into(),
                        why,
                    }
                }
                (Sample::NoData { .. }, NoData::Pass) => {
                    r.no_data += 1;
                    Sample::Pass {
                        value: "no data".into(),
                    }
                }
                (s, _) => s,
            };
            match s {
                Sample::Pass { value } => {
                    r.passed += 1;
                    r.last = value;
                }
                Sample::Fail { value, why } => {
                    r.failed += 1;
                    r.last = value;
                    r.why = why;
                }
                Sample::NoData { .. } => r.no_data += 1,
            }
        }
        if let Some(r) = self.results.iter().find(|r| r.failed >= self.failure_limit) {
            return BakeVerdict::Failed(format!(
                "{}: {} for {} of {} samples",
                r.name, r.why, r.failed, r.samples
            ));
        }
        let silent = self
            .results
            .iter()
            .zip(&self.no_data)
            .find(|(r, nd)| **nd == NoData::Wait && r.samples == r.no_data);
        match silent {
            _ if baked < self.bake => BakeVerdict::Continue,
            None => BakeVerdict::Passed,
            Some(_) if baked < self.longest => BakeVerdict::Continue,
            Some((r, _)) => BakeVerdict::Failed(format!(
                "{}: no data in {} samples over {} (noData: wait)",
                r.name,
                r.samples,
                super::human_duration(baked)
            )),
        }
    }

    /// One line for people: `GET /healthz 5/5 passed; error ratio 0.004 (baseline 0.003)`.
    pub fn summary(&self) -> String {
        summary(&self.results)
    }
}

/// [`Bake::summary`] of recorded results.
pub fn summary(results: &[CheckResult]) -> String {
    results
        .iter()
        .map(|r| {
            let mut s = format!("{} {}/{} passed", r.name, r.passed, r.samples);
            if !r.last.is_empty() {
                s.push_str(&format!(", last {}", r.last));
            }
            if let Some(b) = r.baseline {
                s.push_str(&format!(" (baseline {})", fmt_value(b)));
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operator_s_word_ends_only_the_bake_of_the_version_it_names() {
        let word = |ruling| Judgement {
            hash: "aa".into(),
            ruling,
            by: "alice".into(),
            at: "2026-12-06T10:00:00Z".into(),
            reason: String::new(),
        };
        let results = vec![CheckResult {
            name: "GET /healthz".into(),
            samples: 1,
            passed: 1,
            ..CheckResult::default()
        }];
        assert_eq!(word(Ruling::Promote).outcome("bb", results.clone()), None);
        assert_eq!(
            word(Ruling::Promote).outcome("aa", results.clone()),
            Some(VerifyOutcome::Promoted {
                by: "alice".into(),
                results: results.clone()
            })
        );
        assert_eq!(
            word(Ruling::Fail).outcome("aa", results.clone()),
            Some(VerifyOutcome::Failed {
                reason: "failed by alice during the bake (depwatch rollback)".into(),
                results
            })
        );
        // A release is about a held save, not a bake.
        assert_eq!(word(Ruling::Release).outcome("aa", Vec::new()), None);
        // The record's text reads back; anything else is no word at all.
        let w = word(Ruling::Fail);
        assert_eq!(Judgement::from_text(&w.to_text()), Some(w));
        assert_eq!(Judgement::from_text(""), None);
        assert_eq!(Judgement::from_text("{\"hash\": 1}"), None);
    }

    fn v(checks: Vec<NoData>, bake: u64, limit: u32) -> Verification {
        Verification {
            checks: checks
                .into_iter()
                .enumerate()
                .map(|(i, no_data)| Check {
                    name: format!("c{i}"),
                    probe: Probe::Prometheus(PromCheck {
                        query: "up".into(),
                        condition: Condition::parse("< 1").expect("condition"),
                    }),
                    no_data,
                })
                .collect(),
            bake: Duration::from_secs(bake),
            interval: Duration::from_secs(10),
            failure_limit: limit,
        }
    }

    fn pass() -> Sample {
        Sample::Pass { value: "1".into() }
    }
    fn fail() -> Sample {
        Sample::Fail {
            value: "0.042".into(),
            why: "0.042 > baseline 0.01 × 1.2".into(),
        }
    }
    fn none() -> Sample {
        Sample::NoData {
            why: "no series".into(),
        }
    }
    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn conditions_parse_and_judge() {
        type Row = (&'static str, f64, Option<f64>, Result<(), &'static str>);
        let table: &[Row] = &[
            ("< 0.01", 0.005, None, Ok(())),
            ("< 0.01", 0.02, None, Err("0.02 >= 0.01")),
            ("<= baseline * 1.2", 0.011, Some(0.01), Ok(())),
            (
                "<= baseline * 1.2",
                0.042,
                Some(0.01),
                Err("0.042 > baseline 0.01 × 1.2"),
            ),
            ("<= baseline", 3.0, Some(2.0), Err("3 > baseline 2")),
            (
                "<= baseline * 2",
                1.0,
                None,
                Err("no baseline was measured before the deploy"),
            ),
            (">= 99.5", 99.9, None, Ok(())),
            ("== 1", 0.0, None, Err("0 != 1")),
            ("!=0", 0.0, None, Err("0 == 0")),
        ];
        for (text, value, baseline, want) in table {
            let c = Condition::parse(text).expect(text);
            let got = c.judge(*value, *baseline);
            assert_eq!(got, want.map_err(String::from), "{text} on {value}");
        }
    }

    #[test]
    fn bad_conditions_say_what_is_expected() {
        for bad in ["0.01", "< x", "<= baseline / 2", "=< 1", "< inf", ""] {
            let e = Condition::parse(bad).expect_err(bad);
            assert!(e.contains("expected an operator"), "{bad}: {e}");
        }
        assert_eq!(
            Condition::parse("<=baseline*1.5")
                .expect("parses")
                .to_string(),
            "<= baseline * 1.5"
        );
    }

    #[test]
    fn a_bake_passes_only_after_its_time_with_no_check_at_its_limit() {
        let mut b = Bake::new(&v(vec![NoData::Fail, NoData::Fail], 30, 2), &[]);
        assert_eq!(b.round(vec![pass(), pass()], s(0)), BakeVerdict::Continue);
        assert_eq!(b.round(vec![pass(), fail()], s(10)), BakeVerdict::Continue);
        assert_eq!(b.round(vec![pass(), pass()], s(20)), BakeVerdict::Continue);
        assert_eq!(b.round(vec![pass(), pass()], s(30)), BakeVerdict::Passed);
        assert_eq!(b.results[1].failed, 1);
        assert_eq!(b.results[1].samples, 4);
    }

    #[test]
    fn a_check_at_its_failure_limit_fails_the_bake_with_its_values() {
        let mut b = Bake::new(&v(vec![NoData::Fail, NoData::Fail], 300, 2), &[]);
        b.round(vec![pass(), fail()], s(0));
        let got = b.round(vec![pass(), fail()], s(10));
        assert_eq!(
            got,
            BakeVerdict::Failed("c1: 0.042 > baseline 0.01 × 1.2 for 2 of 2 samples".into())
        );
    }

    #[test]
    fn zero_bake_is_one_round() {
        let mut b = Bake::new(&v(vec![NoData::Fail], 0, 1), &[]);
        assert_eq!(b.round(vec![pass()], s(0)), BakeVerdict::Passed);
        let mut b = Bake::new(&v(vec![NoData::Fail], 0, 1), &[]);
        assert!(matches!(
            b.round(vec![fail()], s(0)),
            BakeVerdict::Failed(_)
        ));
    }

    #[test]
    fn no_data_follows_each_checks_policy() {
        // fail: a failed sample.
        let mut b = Bake::new(&v(vec![NoData::Fail], 0, 1), &[]);
        let BakeVerdict::Failed(why) = b.round(vec![none()], s(0)) else {
            panic!("no data under fail must fail");
        };
        assert!(why.contains("no series"), "{why}");
        // pass: a passed sample.
        let mut b = Bake::new(&v(vec![NoData::Pass], 0, 1), &[]);
        assert_eq!(b.round(vec![none()], s(0)), BakeVerdict::Passed);
        // wait: the bake goes on past its time until data comes ...
        let mut b = Bake::new(&v(vec![NoData::Wait], 60, 1), &[]);
        assert_eq!(b.round(vec![none()], s(60)), BakeVerdict::Continue);
        assert_eq!(b.round(vec![pass()], s(70)), BakeVerdict::Passed);
        // ... and fails when none came by its longest.
        let mut b = Bake::new(&v(vec![NoData::Wait], 60, 1), &[]);
        assert_eq!(b.round(vec![none()], s(110)), BakeVerdict::Continue);
        let BakeVerdict::Failed(why) = b.round(vec![none()], s(120)) else {
            panic!("a silent wait check fails at its longest");
        };
        assert_eq!(why, "c0: no data in 2 samples over 2m (noData: wait)");
    }

    #[test]
    fn a_resumed_bake_keeps_its_counts() {
        let ver = v(vec![NoData::Fail], 300, 2);
        let mut first = Bake::new(&ver, &[Some(0.01)]);
        first.round(vec![fail()], s(0));
        let mut again = Bake::new(&ver, &[None]).resume(first.results.clone());
        assert_eq!(again.results[0].baseline, Some(0.01));
        assert!(matches!(
            again.round(vec![fail()], s(100)),
            BakeVerdict::Failed(_)
        ));
    }

    #[test]
    fn values_print_short() {
        assert_eq!(fmt_value(0.042), "0.042");
        assert_eq!(fmt_value(3.0), "3");
        assert_eq!(fmt_value(0.123456), "0.1235");
        assert_eq!(fmt_value(0.00001), "1.000e-5");
    }
}
