//! Stage 0, parsing: a dependency file's name and bytes become a [`ServiceKey`] and a
//! [`DepSpec`], or a [`DepFileError`] naming the file, the line and what was expected.
//!
//! Pure: no file system, no cluster, no network. The file name alone identifies the service
//! (`payments_prod.dep` is Deployment `payments` in namespace `prod`); sub-directories only
//! organise files.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{valid_label, DepSpec, ImageSpec, ServiceKey, EXTENSION};

/// Whether a file name is a temporary or editor file that must never be read as a
/// dependency file: dotfiles (rsync's `.name.XXXXXX`, emacs `.#` locks, `..data`), swap and
/// backup files, vim's `4913` probe, `*.tmp`, JetBrains `___jb_` files.
pub fn is_ignored_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || name == "4913"
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.ends_with(".swo")
        || name.ends_with(".tmp")
        || name.ends_with(".bak")
        || name.ends_with(".orig")
        || name.contains("___jb_")
        || name.starts_with('#')
}

/// Endings a dependency file gets by mistake (an editor adding its own extension): such a file
/// is refused with the name it should have, never ignored without a word.
const NEAR_MISSES: [&str; 3] = [".txt", ".yaml", ".yml"];

/// A name that is, or was surely meant to be, a dependency file's.
pub fn looks_like_dep(name: &str) -> bool {
    let dep = format!(".{EXTENSION}");
    name.ends_with(&dep)
        || NEAR_MISSES
            .iter()
            .any(|m| name.strip_suffix(m).is_some_and(|n| n.ends_with(&dep)))
}

/// The service a path names, `Ok(None)` if the path is not a dependency file at all (other
/// extension, temporary or editor file), or an error if it looks like one but the name is bad.
pub fn service_for_path(path: &Path) -> Result<Option<ServiceKey>, DepFileError> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(None);
    };
    if is_ignored_name(name) {
        return Ok(None);
    }
    let err = |message: String| DepFileError {
        file: crate::safefs::shown(path),
        line: None,
        message,
    };
    if let Some(meant) = NEAR_MISSES.iter().find_map(|m| {
        name.strip_suffix(m)
            .filter(|n| n.ends_with(&format!(".{EXTENSION}")))
    }) {
        return Err(err(format!(
            "file name {name:?} does not end in .{EXTENSION}, so it is not read; rename it to {meant:?}"
        )));
    }
    let Some(stem) = name.strip_suffix(&format!(".{EXTENSION}")) else {
        return Ok(None);
    };
    let Some((deployment, namespace)) = stem.rsplit_once('_') else {
        // `web-prod.dep`: the usual slip is a '-' where the '_' goes (names may hold '-').
        let guess = stem
            .rsplit_once('-')
            .filter(|(d, n)| ServiceKey::new(d, n).is_ok())
            .map_or(String::new(), |(d, n)| {
                format!("; if {d} is the workload and {n} its namespace, rename it to \"{d}_{n}.{EXTENSION}\"")
            });
        return Err(err(format!(
            "file name {name:?} must be <deployment>_<namespace>.dep, e.g. payments_prod.dep{guess}"
        )));
    };
    if deployment.contains('_') {
        return Err(err(format!(
            "file name {name:?} has more than one '_': deployment names and namespaces cannot contain '_'; expected <deployment>_<namespace>.dep"
        )));
    }
    ServiceKey::new(deployment, namespace)
        .map(Some)
        .map_err(|m| {
            // Upper case is the usual slip: say the name that would work.
            let lower = name.to_ascii_lowercase();
            let fixed = lower
                .strip_suffix(&format!(".{EXTENSION}"))
                .and_then(|s| s.rsplit_once('_'))
                .is_some_and(|(d, n)| ServiceKey::new(d, n).is_ok());
            match fixed {
                true => err(format!("{m}; rename it to {lower:?}")),
                false => err(m),
            }
        })
}

/// A problem with one dependency file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DepFileError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for DepFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{}: {}", self.file, l, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

const EXPECTED: &str = "expected a version (1.42.0), a digest (sha256:…), an image reference (registry/repo:tag), or a YAML mapping such as `images: {api: repo/api:1.2}`";

/// Validate a tag as the registry distribution spec defines it.
/// The OCI tag grammar: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn valid_tag(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// The digest grammar depwatch accepts: sha256, sha384 or sha512 in lower-case hex.
pub fn valid_digest(s: &str) -> Result<(), String> {
    let (alg, hex) = s
        .split_once(':')
        .ok_or_else(|| "the value is not a digest".to_string())?;
    let len = match alg {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        other => {
            let _ = other;
            return Err("unsupported digest algorithm; expected sha256, sha384 or sha512".into());
        }
    };
    if hex.len() != len
        || !hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(format!(
            "the digest must be {alg}: followed by {len} lower-case hex digits"
        ));
    }
    Ok(())
}

/// Validate a full image reference with the OCI distribution grammar.
pub fn validate_reference(s: &str) -> Result<(), String> {
    crate::registry::check_grammar(s).map_err(|e| format!("not a valid image reference ({e})"))
}

/// Classify one version/image value.
pub fn classify(value: &str) -> Result<ImageSpec, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("the value is empty".into());
    }
    if v.chars().any(char::is_whitespace) {
        return Err(format!("the value contains spaces; {EXPECTED}"));
    }
    let looks_like_digest = v
        .split_once(':')
        .is_some_and(|(alg, _)| matches!(alg, "sha256" | "sha384" | "sha512"));
    if looks_like_digest {
        valid_digest(v)?;
        return Ok(ImageSpec::Digest(v.to_string()));
    }
    if v.contains('/') || v.contains('@') || v.contains(':') {
        validate_reference(v)?;
        return Ok(ImageSpec::Reference(v.to_string()));
    }
    if valid_tag(v) {
        Ok(ImageSpec::Tag(v.to_string()))
    } else {
        Err(format!(
            "the value is not a valid tag (letters, digits, '_', '.', '-', at most 128 characters, not starting with '.' or '-'); {EXPECTED}"
        ))
    }
}

/// The repository part of an image reference as written (`example.com/web:1.0` →
/// `example.com/web`).
pub fn repository_of(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// A line without its `#` comment (one at the start, or after a space or tab), trimmed.
pub fn strip_comment(line: &str) -> &str {
    let mut prev_blank = true;
    for (i, c) in line.char_indices() {
        if c == '#' && prev_blank {
            return line[..i].trim();
        }
        prev_blank = c.is_whitespace();
    }
    line.trim()
}

/// Longest rollout timeout a file may ask for.
const MAX_ROLLOUT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct YamlForm {
    images: Option<std::collections::BTreeMap<String, String>>,
    image: Option<String>,
    version: Option<String>,
    container: Option<String>,
    repository: Option<String>,
    rollout_timeout: Option<String>,
    rollback: Option<Switch>,
    kind: Option<String>,
    verify: Option<serde_json::Value>,
    windows: Option<serde_json::Value>,
    approvals: Option<serde_json::Value>,
    approval_timeout: Option<serde_json::Value>,
}

/// `rollback:` as YAML writes it (`true`/`false`) or as the command line does (`on`/`off`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Switch {
    Bool(bool),
    Word(String),
}

impl Switch {
    fn value(&self) -> Option<bool> {
        match self {
            Switch::Bool(b) => Some(*b),
            Switch::Word(w) => match w.to_ascii_lowercase().as_str() {
                "on" | "true" | "yes" => Some(true),
                "off" | "false" | "no" => Some(false),
                _ => None,
            },
        }
    }
}

/// The fields the YAML form knows.
const FIELDS: &[&str] = &[
    "images",
    "image",
    "version",
    "container",
    "repository",
    "rolloutTimeout",
    "rollback",
    "kind",
    "verify",
    "windows",
    "approvals",
    "approvalTimeout",
];

/// The unknown field a parser message names, when it is a plain name (letters, digits, `_`,
/// `-`, at most 40): safe to quote back, as a field name holds no secret.
fn unknown_field(msg: &str) -> Option<&str> {
    let (_, rest) = msg.split_once("unknown field `")?;
    let (name, _) = rest.split_once('`')?;
    let plain = !name.is_empty()
        && name.len() <= 40
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    plain.then_some(name)
}

/// "an unknown field `versoin` (did you mean version? …)": the name is quoted only when it is a
/// typo of a known field (a few edits from it), so a file's other content, a secret pasted in
/// by mistake, is never echoed.
fn unknown_field_problem(msg: &str) -> String {
    let expected = format!("expected {}", FIELDS.join(", "));
    let typo = unknown_field(msg)
        .and_then(|name| Some((name, crate::domain::closest(name, FIELDS.iter().copied())?)));
    match typo {
        Some((name, close)) => {
            format!("an unknown field `{name}` (did you mean {close}? {expected})")
        }
        None => format!("an unknown field ({expected})"),
    }
}

/// What kind of YAML problem a parser message describes, in words that quote nothing from
/// the file but a plain unknown field's name.
/// Whether the parser stopped at one of [`yaml_limits`].
pub(crate) fn beyond_limits(msg: &str) -> bool {
    msg.contains("budget breached") || msg.contains("limit exceeded")
}

fn yaml_problem(msg: &str) -> String {
    if beyond_limits(msg) {
        "too large for a dependency file: at most 64 levels of nesting, 10,000 nodes and 256 aliases".into()
    } else if msg.contains("unknown field") {
        unknown_field_problem(msg)
    } else if msg.contains("duplicate") {
        "a field appears twice".into()
    } else if msg.contains("invalid type") || msg.contains("expected") {
        "a field or the document has the wrong type (expected a mapping of known fields)".into()
    } else {
        "not valid YAML".into()
    }
}

/// Why a YAML line the parser stopped at is out of place, when its indentation tells: a key
/// at a depth no earlier line uses (indented under a value, or between two levels), or a
/// top-level key right under a parent that has nothing indented yet. Quotes nothing.
fn indentation_hint(text: &str, line: usize, unknown_field: bool) -> Option<&'static str> {
    let lines: Vec<&str> = text.lines().collect();
    let at = *lines.get(line.checked_sub(1)?)?;
    let indent = |l: &str| l.len() - l.trim_start().len();
    let earlier: Vec<&str> = lines[..line - 1]
        .iter()
        .copied()
        .filter(|l| !strip_comment(l).is_empty())
        .collect();
    if unknown_field {
        let parent = earlier.last()?;
        let opens = strip_comment(parent).ends_with(':');
        return (opens && indent(at) <= indent(parent)).then_some(
            "the line after a key that opens a mapping (such as images:) is not indented under it: indent each container by two spaces",
        );
    }
    let seen = earlier.iter().any(|l| indent(l) == indent(at));
    (!seen).then_some(
        "this line's indentation matches no line above it: keys at the same level start in the same column (each container under images: indented by two spaces; version:, rollback: and the other settings not indented)",
    )
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Parse a dependency file's content. `file` is used in error messages only. The first
/// problem is the error; [`parse_all`] gives every one.
pub fn parse(file: &str, bytes: &[u8]) -> Result<DepSpec, DepFileError> {
    parse_all(file, bytes).map_err(|mut all| all.swap_remove(0))
}

/// Parse a dependency file's content, or every problem it has (never an empty list).
pub fn parse_all(file: &str, bytes: &[u8]) -> Result<DepSpec, Vec<DepFileError>> {
    let err = |line: Option<usize>, message: String| DepFileError {
        file: file.to_string(),
        line,
        message,
    };
    let text = std::str::from_utf8(bytes)
        .map_err(|e| vec![err(None, format!("not UTF-8 text ({e}); {EXPECTED}"))])?;
    if meaningful_lines(text).next().is_none() {
        return Err(vec![err(None, format!("the file is empty; {EXPECTED}"))]);
    }
    match plain_line(text) {
        Some((line, value)) => {
            let spec = classify(value).map_err(|m| vec![err(Some(line), m)])?;
            Ok(DepSpec {
                images: vec![(None, spec)],
                ..DepSpec::default()
            })
        }
        None => parse_yaml(file, text),
    }
}

/// Lines with something besides comments, as `(1-based number, content)`.
fn meaningful_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, strip_comment(l)))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

/// The one line of a plain file (a version, digest or reference alone) with its 1-based
/// number; `None` for YAML or an empty file.
pub fn plain_line(text: &str) -> Option<(usize, &str)> {
    let mut lines = meaningful_lines(text);
    match (lines.next(), lines.next()) {
        (Some((n, value)), None)
            if !value.contains(": ") && !value.ends_with(':') && !value.starts_with('{') =>
        {
            Some((n, value))
        }
        _ => None,
    }
}

/// Problems found in one YAML file, each with the line of the field it names.
struct Problems<'a> {
    file: &'a str,
    text: &'a str,
    list: Vec<DepFileError>,
}

impl Problems<'_> {
    fn add(&mut self, needle: Option<&str>, message: String) {
        self.list.push(DepFileError {
            file: self.file.to_string(),
            line: needle.and_then(|n| line_of(self.text, n)),
            message,
        });
    }
}

/// Limits fitted to a dependency file, a few dozen nodes: the parser's own defaults (a million
/// events) let a 500-byte alias bomb cost half a second of CPU at every read and rescan.
fn yaml_limits() -> serde_saphyr::Options {
    yaml_limits_of(10_000)
}

/// The parser's limits for a document of at most `nodes` nodes: twice as many events, as many
/// replayed through aliases, 256 aliases, 64 levels (the policy file allows more nodes).
pub(crate) fn yaml_limits_of(nodes: usize) -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_events: 2 * nodes,
            max_nodes: nodes,
            max_aliases: 256,
            max_depth: 64,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: nodes,
        },
    }
}

/// The line a parser message names, if it names one.
pub(crate) fn parser_line(msg: &str) -> Option<usize> {
    msg.split("line ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
}

/// The form and the top-level keys it does not know. The keys are read first on their own,
/// so every unknown one is named rather than the read ending at the first.
fn read_form(file: &str, text: &str) -> Result<(YamlForm, Vec<String>), DepFileError> {
    let keys: std::collections::BTreeMap<String, serde::de::IgnoredAny> =
        serde_saphyr::from_str_with_options(text, yaml_limits())
            .map_err(|e| yaml_error(file, text, e))?;
    let form = serde_saphyr::from_str_with_options(text, yaml_limits())
        .map_err(|e| yaml_error(file, text, e))?;
    let unknown = keys
        .into_keys()
        .filter(|k| !FIELDS.contains(&k.as_str()))
        .collect();
    Ok((form, unknown))
}

fn yaml_error(file: &str, text: &str, e: impl fmt::Display) -> DepFileError {
    // The parser's message may quote the file; only its position and kind are kept.
    let msg = e.to_string();
    let line = parser_line(&msg);
    let hint = line
        .filter(|_| !beyond_limits(&msg))
        .and_then(|n| indentation_hint(text, n, msg.contains("unknown field")));
    let problem = hint.map_or_else(|| yaml_problem(&msg), String::from);
    DepFileError {
        file: file.to_string(),
        line,
        message: format!("not a valid dependency file: {problem}; {EXPECTED}"),
    }
}

/// Every problem of a file in the YAML form, in the order its fields are checked.
fn parse_yaml(file: &str, text: &str) -> Result<DepSpec, Vec<DepFileError>> {
    let (form, unknown) = read_form(file, text).map_err(|e| vec![e])?;
    let mut problems = Problems {
        file,
        text,
        list: Vec::new(),
    };
    for name in &unknown {
        let needle = format!("{name}:");
        let line = line_of(text, &needle);
        let hint = line.and_then(|n| indentation_hint(text, n, true));
        let message = hint.map_or_else(
            || unknown_field_problem(&format!("unknown field `{name}`")),
            String::from,
        );
        problems.add(
            Some(&needle),
            format!("not a valid dependency file: {message}"),
        );
    }
    let spec = DepSpec {
        repository: form.repository.clone(),
        rollback: read_rollback(&form, &mut problems),
        kind: read_kind(&form, &mut problems),
        rollout_timeout: read_timeout(&form, &mut problems),
        verify: read_verify(&form, &mut problems),
        windows: read_windows(&form, &mut problems),
        approvals: read_approvals(&form, &mut problems),
        approved_digests: None,
        images: Vec::new(),
    };
    check_repository(&form, &mut problems);
    let spec = DepSpec {
        images: read_images(&form, &mut problems),
        ..spec
    };
    if spec.images.is_empty() && problems.list.is_empty() {
        problems.add(None, format!("no image to deploy; {EXPECTED}"));
    }
    match problems.list.is_empty() {
        true => Ok(spec),
        false => Err(problems.list),
    }
}

fn read_verify(
    form: &YamlForm,
    problems: &mut Problems,
) -> Option<crate::domain::verify::Verification> {
    let v = form.verify.as_ref()?;
    match crate::checks::form::read(v) {
        Ok(v) => Some(v),
        Err(list) => {
            for p in list {
                let needle = p.field.rsplit(['.', '[']).next().map(|f| format!("{f}:"));
                let needle = needle.filter(|n| !n.starts_with(|c: char| c.is_ascii_digit()));
                problems.add(needle.as_deref().or(Some("verify:")), p.message);
            }
            None
        }
    }
}

/// The file's own deploy windows: they add to the policy's, so they can only hold more.
fn read_windows(form: &YamlForm, problems: &mut Problems) -> Vec<crate::domain::window::Window> {
    let mut found = Vec::new();
    let windows = crate::policy::read_windows("windows", form.windows.as_ref(), &mut found);
    for (field, message) in found {
        let key = field.rsplit('.').next().unwrap_or("windows").to_string();
        let needle = match key.starts_with("windows") {
            true => "windows:".to_string(),
            false => format!("{key}:"),
        };
        problems.add(Some(&needle), format!("{field}: {message}"));
    }
    windows
}

/// The file's own approvals: more approvers or a shorter wait than the policy's, never fewer.
fn read_approvals(
    form: &YamlForm,
    problems: &mut Problems,
) -> Option<crate::domain::approval::Needs> {
    let mut m = serde_json::Map::new();
    if let Some(v) = &form.approvals {
        m.insert("approvals".into(), v.clone());
    }
    if let Some(v) = &form.approval_timeout {
        m.insert("approvalTimeout".into(), v.clone());
    }
    let mut found = Vec::new();
    let needs = crate::policy::read_approvals("", &m, &mut found);
    for (field, message) in found {
        problems.add(Some(&format!("{field}:")), format!("{field}: {message}"));
    }
    needs
}

fn read_rollback(form: &YamlForm, problems: &mut Problems) -> Option<bool> {
    let value = form.rollback.as_ref()?.value();
    if value.is_none() {
        problems.add(
            Some("rollback"),
            "rollback: expected on, off, true or false".into(),
        );
    }
    value
}

fn read_kind(form: &YamlForm, problems: &mut Problems) -> Option<crate::domain::WorkloadKind> {
    let k = form.kind.as_ref()?;
    let kind = crate::domain::WorkloadKind::parse_loose(k);
    if kind.is_none() {
        let kinds = crate::domain::WorkloadKind::ALL.iter().map(|k| k.as_str());
        let close = crate::domain::closest(&k.to_ascii_lowercase(), kinds)
            .map_or(String::new(), |c| format!("did you mean {c}? "));
        problems.add(
            Some("kind"),
            format!(
                "kind: {close}expected one of {}",
                crate::domain::WorkloadKind::choices()
            ),
        );
    }
    kind
}

fn read_timeout(form: &YamlForm, problems: &mut Problems) -> Option<Duration> {
    let t = form.rollout_timeout.as_ref()?;
    match humantime::parse_duration(t) {
        Err(e) => problems.add(
            Some("rolloutTimeout"),
            format!("rolloutTimeout: not a duration ({e}); expected e.g. 90s or 5m"),
        ),
        Ok(d) if d.is_zero() || d > MAX_ROLLOUT_TIMEOUT => problems.add(
            Some("rolloutTimeout"),
            "rolloutTimeout: out of range; expected more than 0 and at most 24h".into(),
        ),
        Ok(d) => return Some(d),
    }
    None
}

fn check_repository(form: &YamlForm, problems: &mut Problems) {
    let Some(repo) = &form.repository else {
        return;
    };
    if let Err(m) = validate_reference(repo) {
        problems.add(Some("repository"), format!("repository: {m}"));
    } else if repo.contains('@') || repository_of(repo) != repo {
        problems.add(
            Some("repository"),
            "repository: must be a repository without a tag or digest, e.g. example.com/team/web"
                .into(),
        );
    }
}

fn read_images(form: &YamlForm, problems: &mut Problems) -> Vec<(Option<String>, ImageSpec)> {
    let mut images = Vec::new();
    let single = match (&form.version, &form.image) {
        (Some(_), Some(_)) => {
            problems.add(
                Some("image"),
                "use either `version` or `image`, not both".into(),
            );
            None
        }
        (Some(v), None) => Some(("version", v)),
        (None, Some(i)) => Some(("image", i)),
        (None, None) => None,
    };
    match single {
        Some((field, value)) => match classify(value) {
            Ok(s) => images.push((form.container.clone(), s)),
            Err(m) => problems.add(Some(field), format!("{field}: {m}")),
        },
        None if form.container.is_some() && form.version.is_none() => problems.add(
            Some("container"),
            "`container` needs a `version` or `image` to set".into(),
        ),
        None => {}
    }
    let Some(map) = &form.images else {
        return images;
    };
    if form.version.is_some() || form.image.is_some() {
        problems.add(
            Some("images"),
            "use either `images` or `version`/`image`, not both".into(),
        );
    } else if map.is_empty() {
        problems.add(
            Some("images"),
            "`images` is empty; name at least one container".into(),
        );
    }
    for (container, value) in map {
        if !valid_label(container) {
            problems.add(
                Some(container),
                "images: a key is not a valid container name (lower-case letters, digits and '-', at most 63)".into(),
            );
            continue;
        }
        match classify(value) {
            Ok(s) => images.push((Some(container.clone()), s)),
            Err(m) => problems.add(
                Some(&format!("{container}:")),
                format!("images.{container}: {m}"),
            ),
        }
    }
    images
}

/// Why the wanted images cannot be applied to a Deployment's containers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResolveError(pub String);

/// Work out each container's new image from a spec and the containers the Deployment has now
/// (`(name, image)` in order). `global_repository` is `--image-repo` / `ECR_REPO`.
pub fn resolve(
    spec: &DepSpec,
    key: &ServiceKey,
    current: &[(String, String)],
    global_repository: Option<&str>,
) -> Result<Vec<(String, String)>, ResolveError> {
    let names: Vec<&str> = current.iter().map(|(n, _)| n.as_str()).collect();
    let mut out = Vec::new();
    for (container, image) in &spec.images {
        let (name, now) = match container {
            Some(c) => current
                .iter()
                .find(|(n, _)| n == c)
                .ok_or_else(|| {
                    ResolveError(format!(
                        "Deployment {} in {} has no container {c:?} (it has: {})",
                        key.name,
                        key.namespace,
                        names.join(", ")
                    ))
                })?,
            None => match current.iter().find(|(n, _)| *n == key.name) {
                Some(found) => found,
                None if current.len() == 1 => &current[0],
                None => {
                    return Err(ResolveError(format!(
                        "Deployment {} in {} has {} containers ({}) and none is named {}; name the container in the file, e.g. `container: {}` with `version: …`",
                        key.name,
                        key.namespace,
                        current.len(),
                        names.join(", "),
                        key.name,
                        names.first().copied().unwrap_or("app")
                    )))
                }
            },
        };
        let repo = spec
            .repository
            .as_deref()
            .or(global_repository)
            .unwrap_or_else(|| repository_of(now));
        let new = match image {
            ImageSpec::Tag(t) => format!("{repo}:{t}"),
            ImageSpec::Digest(d) => format!("{repo}@{d}"),
            ImageSpec::Reference(r) => r.clone(),
        };
        // With the running repository (or --image-repo) the image is only whole now.
        validate_reference(&new)
            .map_err(|why| ResolveError(format!("container {name} would run {new}, {why}")))?;
        out.push((name.clone(), new));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn key() -> ServiceKey {
        ServiceKey::new("payments", "prod").expect("valid")
    }

    /// An alias bomb and a deep nest are refused at the file's own limits, saying so: the
    /// parser's defaults would expand the bomb to a million events at every read.
    #[test]
    fn yaml_beyond_a_dependency_file_s_limits_is_refused_as_too_large() {
        let level = |name: char, of: &str| format!("{name}: &{name} [{}]\n", [of; 9].join(","));
        let mut bomb = level('a', "x");
        for (name, of) in [
            ('b', "*a"),
            ('c', "*b"),
            ('d', "*c"),
            ('e', "*d"),
            ('f', "*e"),
        ] {
            bomb.push_str(&level(name, of));
        }
        let deep = format!("images: {}{}\n", "[".repeat(480), "]".repeat(480));
        for text in [bomb, deep] {
            let e = parse("f_prod.dep", text.as_bytes()).expect_err("refused");
            assert!(
                e.message.contains("too large for a dependency file"),
                "{}",
                e.message
            );
            assert!(!e.message.contains("indentation"), "{}", e.message);
        }
        // A few anchors, as people write them, still read.
        let anchors = "images:\n  api: &v reg.example/api:1.2\n  worker: *v\n";
        let spec = parse("f_prod.dep", anchors.as_bytes()).expect("anchors within limits");
        assert_eq!(spec.images.len(), 2);
    }

    #[test]
    fn file_names_split_into_deployment_and_namespace() {
        let k = service_for_path(&PathBuf::from("/deps/team/payments_prod.dep"))
            .expect("ok")
            .expect("a dep file");
        assert_eq!(k, key());
        assert_eq!(k.file_name(), "payments_prod.dep");
        for ignored in [
            ".payments_prod.dep.swp",
            "payments_prod.dep~",
            "4913",
            ".#payments_prod.dep",
            "payments_prod.dep.tmp",
            "payments_prod.dep___jb_tmp___",
            ".payments_prod.dep.Xa81kq",
            "..data",
            "README.md",
            "payments_prod.last",
        ] {
            assert_eq!(
                service_for_path(&PathBuf::from(ignored)),
                Ok(None),
                "{ignored}"
            );
        }
        for bad in [
            "payments.dep",
            "Payments_prod.dep",
            "pay_ments_prod.dep",
            "payments_Prod.dep",
            "_prod.dep",
            "payments_.dep",
        ] {
            let e = service_for_path(&PathBuf::from(bad)).expect_err(bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = service_for_path(&PathBuf::from("web-prod.dep")).expect_err("a '-'");
        assert!(
            e.to_string().contains("rename it to \"web_prod.dep\""),
            "the likely name is suggested: {e}"
        );
    }

    #[test]
    fn scalar_forms() {
        let one = |s: &str| parse("f.dep", s.as_bytes()).map(|d| d.images[0].1.clone());
        assert_eq!(one("1.42.0\n"), Ok(ImageSpec::Tag("1.42.0".into())));
        assert_eq!(
            one("# deployed by CI\n\nnginx-1.24.0  # pinned\n"),
            Ok(ImageSpec::Tag("nginx-1.24.0".into()))
        );
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(one(&digest), Ok(ImageSpec::Digest(digest.clone())));
        assert_eq!(
            one("registry.example.com:5000/team/web:2.0"),
            Ok(ImageSpec::Reference(
                "registry.example.com:5000/team/web:2.0".into()
            ))
        );
        assert_eq!(
            one(&format!("web@{digest}")),
            Ok(ImageSpec::Reference(format!("web@{digest}")))
        );
        for bad in [
            "",
            "  \n# only a comment\n",
            "1.0 2.0",
            "sha256:abc",
            "Web/App:1",
            "-rc1",
            "repo:tag:extra",
        ] {
            let e = parse("svc_ns.dep", bad.as_bytes()).expect_err(bad);
            assert!(e.to_string().starts_with("svc_ns.dep"), "{e}");
        }
        let e = parse("svc_ns.dep", b"# header\n\n1.0 2.0\n").expect_err("spaces");
        assert_eq!(e.line, Some(3));
        assert!(parse("f.dep", &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn misplaced_indentation_is_named_as_such_with_its_line() {
        for (text, line) in [
            ("images:\n  api: r/api:1\n envoy: r/envoy:2\n", 3),
            ("version: 1.0\n  rollback: off\n", 2),
            ("images:\n  api: r/api:1\n    envoy: r/e:2\n", 3),
            ("images:\napi: r/api:1\n", 2),
        ] {
            let e = parse("web_prod.dep", text.as_bytes()).expect_err(text);
            assert_eq!(e.line, Some(line), "{text:?}: {e}");
            assert!(e.message.contains("indent"), "{text:?}: {e}");
        }
        // Not every error is about indentation.
        let e =
            parse("web_prod.dep", b"images:\n  api: r/api:1\ncolour: blue\n").expect_err("unknown");
        assert!(e.message.contains("unknown field"), "{e}");
    }

    #[test]
    fn rollback_is_on_off_or_true_false() {
        for (text, want) in [
            ("on", true),
            ("off", false),
            ("true", true),
            ("false", false),
            ("On", true),
            ("\"off\"", false),
            ("yes", true),
            ("no", false),
        ] {
            let d = parse(
                "f.dep",
                format!("version: 1.0\nrollback: {text}\n").as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(d.rollback, Some(want), "{text}");
        }
        let e = parse("f.dep", b"version: 1.0\nrollback: maybe\n").expect_err("maybe");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("expected on, off, true or false"), "{e}");
        assert!(
            !e.message.contains("maybe"),
            "the file is never quoted: {e}"
        );
    }

    #[test]
    fn kind_names_the_workload_and_a_wrong_one_is_refused() {
        use crate::domain::WorkloadKind;
        let d = parse("db_prod.dep", b"kind: StatefulSet\nversion: 16.2\n").expect("kind");
        assert_eq!(d.kind, Some(WorkloadKind::StatefulSet));
        let d = parse("db_prod.dep", b"kind: ds\nversion: 16.2\n").expect("short name");
        assert_eq!(d.kind, Some(WorkloadKind::DaemonSet));
        assert_eq!(parse("db_prod.dep", b"16.2\n").expect("plain").kind, None);
        let e = parse("db_prod.dep", b"version: 16.2\nkind: Pod\n").expect_err("pod");
        assert_eq!(e.line, Some(2));
        assert!(
            e.message
                .contains("kind: expected one of deployment, statefulset, daemonset, cronjob"),
            "{e}"
        );
    }

    #[test]
    fn a_file_adds_deploy_windows_of_its_own_and_their_problems_name_their_lines() {
        let text = b"version: 1.4.2\nwindows:\n  - deny: \"0 18 * * Fri\"\n    duration: 63h\n    timeZone: Europe/Berlin\n";
        let d = parse("web_prod.dep", text).expect("valid windows");
        assert_eq!(d.windows.len(), 1);
        assert_eq!(
            d.windows[0].to_string(),
            "deny \"0 18 * * Fri\" for 2days 15h (Europe/Berlin)"
        );
        let bad = b"version: 1.4.2\nwindows:\n  - deny: \"0 18 * * Fri\"\n    duration: 63h\n    timeZone: Nowhere/Land\n";
        let e = parse("web_prod.dep", bad).expect_err("bad zone");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(
            e.message.contains("windows[0].timeZone: not a time zone"),
            "{e}"
        );
    }

    #[test]
    fn a_file_asks_for_approvers_of_its_own_and_their_problems_name_their_lines() {
        use crate::domain::approval::Needs;
        let d = parse(
            "web_prod.dep",
            b"version: 1.4.2\napprovals: 2\napprovalTimeout: 4h\n",
        )
        .expect("valid approvals");
        assert_eq!(
            d.approvals,
            Some(Needs {
                approvals: 2,
                timeout: Some(Duration::from_secs(4 * 3600))
            })
        );
        assert_eq!(
            parse("web_prod.dep", b"1.4.2\n").expect("plain").approvals,
            None
        );
        for (text, line, words) in [
            (
                &b"version: 1.4.2\napprovals: many\n"[..],
                2,
                "approvals: expected how many distinct people",
            ),
            (
                b"version: 1.4.2\napprovals: 1\napprovalTimeout: later\n",
                3,
                "approvalTimeout: expected how long",
            ),
            (
                b"version: 1.4.2\napprovalTimeout: 1h\n",
                2,
                "approvalTimeout: set without `approvals`",
            ),
        ] {
            let e = parse("web_prod.dep", text).expect_err("bad approvals");
            assert_eq!(e.line, Some(line), "{e}");
            assert!(e.message.contains(words), "{e}");
        }
    }

    #[test]
    fn a_verify_block_is_read_and_its_problems_name_their_lines() {
        let text = b"version: 1.4.2\nverify:\n  bake: 5m\n  checks:\n    - http: /healthz\n    - name: errors\n      noData: wait\n      prometheus:\n        query: sum(rate(http_requests_total{code=~\"5..\"}[1m]))\n        condition: \"<= baseline * 1.2\"\n";
        let d = parse("web_prod.dep", text).expect("valid verify");
        let v = d.verify.expect("verify");
        assert_eq!(v.bake, Duration::from_secs(300));
        assert_eq!(v.checks.len(), 2);
        assert_eq!(v.checks[1].name, "errors");

        let bad = b"version: 1.4.2\nverify:\n  checks:\n    - prometheus:\n        query: rate(x[5m]\n        condition: \"< 1\"\n";
        let e = parse("web_prod.dep", bad).expect_err("bad promql");
        assert_eq!(e.file, "web_prod.dep");
        assert_eq!(e.line, Some(5), "{e}");
        assert!(
            e.message
                .contains("verify.checks[0].prometheus.query: not valid PromQL"),
            "{e}"
        );
    }

    #[test]
    fn yaml_forms() {
        let d = parse("f.dep", b"images:\n  api: repo/api:1.2\n  sidecar: repo/s:3\nrolloutTimeout: 90s\nrollback: false\n").expect("yaml");
        assert_eq!(d.images.len(), 2);
        assert_eq!(d.rollout_timeout, Some(Duration::from_secs(90)));
        assert_eq!(d.rollback, Some(false));
        let d = parse(
            "f.dep",
            b"version: 2.0.1\ncontainer: api\nrepository: example.com/api\n",
        )
        .expect("yaml");
        assert_eq!(
            d.images,
            vec![(Some("api".into()), ImageSpec::Tag("2.0.1".into()))]
        );
        let e = parse(
            "f.dep",
            b"images:\n  api: repo/api:1.2\n  side: Not Valid\n",
        )
        .expect_err("bad image");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("images.side"), "{e}");
        let e = parse("f.dep", b"versoin: 1.0\n").expect_err("a typo'd field");
        assert!(
            e.message
                .contains("an unknown field `versoin` (did you mean version?"),
            "{e}"
        );
        let e = parse("f.dep", b"version: 1.0\nkind: deploymnet\n").expect_err("a typo'd kind");
        assert!(e.message.contains("kind: did you mean deployment?"), "{e}");
        let e = parse("f.dep", b"version: 1.0\ncolour: blue\n").expect_err("unknown field");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("an unknown field"), "{e}");
        assert!(
            !e.message.contains("colour"),
            "the content is not echoed: {e}"
        );
        let e = parse("f.dep", b"rolloutTimeout: soon\nversion: 1\n").expect_err("duration");
        assert_eq!(e.line, Some(1));
        let e = parse("f.dep", b"version: 1\nrolloutTimeout: 500000000000y\n").expect_err("huge");
        assert_eq!(e.line, Some(2), "{e}");
        assert_eq!(strip_comment("1.2.0\t# pinned"), "1.2.0");
        assert_eq!(strip_comment("# all comment"), "");
        assert_eq!(strip_comment("a#b"), "a#b");
    }

    #[test]
    fn resolving_images_against_containers() {
        let current = vec![
            (
                "payments".to_string(),
                "example.com/payments:1.0".to_string(),
            ),
            ("sidecar".to_string(), "example.com/envoy:1.29".to_string()),
        ];
        let spec = parse("f", b"1.1").expect("tag");
        assert_eq!(
            resolve(&spec, &key(), &current, None),
            Ok(vec![("payments".into(), "example.com/payments:1.1".into())])
        );
        assert_eq!(
            resolve(&spec, &key(), &current, Some("ecr.example/pay")),
            Ok(vec![("payments".into(), "ecr.example/pay:1.1".into())])
        );
        let spec =
            parse("f", b"version: 1.2\nrepository: mirror.example/payments\n").expect("yaml");
        assert_eq!(
            resolve(&spec, &key(), &current, Some("ecr.example/pay")),
            Ok(vec![(
                "payments".into(),
                "mirror.example/payments:1.2".into()
            )]),
            "a per-service repository wins over the global one"
        );
        let e = parse(
            "f",
            b"version: 1.2\nrepository: mirror.example/payments:1.0\n",
        )
        .expect_err("tagged repo");
        assert!(e.message.contains("repository"), "{e}");
        let spec = parse("f", b"images:\n  sidecar: example.com/envoy:1.30\n").expect("yaml");
        assert_eq!(
            resolve(&spec, &key(), &current, None),
            Ok(vec![("sidecar".into(), "example.com/envoy:1.30".into())])
        );
        let spec = parse("f", b"images:\n  nope: a/b:1\n").expect("yaml");
        let e = resolve(&spec, &key(), &current, None).expect_err("unknown container");
        assert!(e.0.contains("no container \"nope\""), "{e}");
        let two = vec![
            ("a".to_string(), "x:1".to_string()),
            ("b".to_string(), "y:1".to_string()),
        ];
        let e =
            resolve(&parse("f", b"2").expect("tag"), &key(), &two, None).expect_err("ambiguous");
        assert!(e.0.contains("container"), "{e}");
        assert_eq!(
            repository_of("example.com:5000/web:1.0"),
            "example.com:5000/web"
        );
        assert_eq!(
            repository_of("example.com:5000/web"),
            "example.com:5000/web"
        );
        assert_eq!(repository_of("web@sha256:00"), "web");
    }

    /// Property: for any input, built from fragments of valid files, YAML, kubeconfigs and
    /// junk with a secret marker mixed in, parsing never panics, an accepted file has images
    /// that are valid, and an error never quotes the content (the marker never appears).
    #[test]
    fn parse_never_panics_and_never_echoes_content() {
        use rand::{Rng, SeedableRng};
        const MARKER: &str = "Zq9SECRETq9Z";
        let fragments: &[&str] = &[
            "1.42.0",
            "images:",
            "  api: repo/api:1.2",
            "version: ",
            "image: ",
            "container: web",
            "repository: example.com/web",
            "rolloutTimeout: 90s",
            "rollback: false",
            "kind: statefulset",
            "# comment",
            "{",
            "}",
            "[",
            "]",
            ":",
            ": ",
            "- ",
            "\t",
            "sha256:",
            "@",
            "/",
            "apiVersion: v1",
            "token: ",
            "root:x:0:0:root:/root:/bin/bash",
            "\u{0}",
            "\u{feff}",
            "&a",
            "*a",
            "!!str",
            "---",
            "...",
            "'",
            "\"",
            "é",
            "\r",
            " ",
            "\n",
            MARKER,
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for round in 0..20_000 {
            let mut text = String::new();
            for _ in 0..rng.random_range(1..12) {
                text.push_str(fragments[rng.random_range(0..fragments.len())]);
                if rng.random_bool(0.4) {
                    text.push('\n');
                }
            }
            let mut bytes = text.into_bytes();
            if round % 7 == 0 && !bytes.is_empty() {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            match parse("p.dep", &bytes) {
                Ok(spec) => {
                    assert!(!spec.images.is_empty(), "{bytes:?}");
                    for (_, image) in &spec.images {
                        let (ImageSpec::Tag(v) | ImageSpec::Digest(v) | ImageSpec::Reference(v)) =
                            image;
                        assert!(!v.chars().any(char::is_whitespace), "{bytes:?}");
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    assert!(
                        !text.contains(MARKER),
                        "content echoed: {text} for {bytes:?}"
                    );
                    assert!(!text.contains("root:x:0"), "content echoed: {text}");
                    assert!(text.starts_with("p.dep"), "names the file: {text}");
                }
            }
        }
    }
}
