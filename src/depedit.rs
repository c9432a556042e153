//! Editing a dependency file in place: give some containers new images while keeping the
//! file's form (a plain version stays a plain version), its comments and its settings. Pure:
//! text in, text out; the caller reads and writes the file.

use crate::depfile;
use crate::domain::{Asker, ImageSpec, Images, ServiceKey};

/// Why a file cannot be edited to ask for the wanted images.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct EditError {
    pub file: String,
    pub message: String,
}

/// What one entry of the file looks like, and where its value is.
struct Entry {
    /// The container it sets.
    container: String,
    spec: ImageSpec,
    /// 0-based line of its value.
    line: usize,
}

/// The image a value resolves to, given the repository tags and digests go to.
fn resolved(spec: &ImageSpec, repository: &str) -> String {
    match spec {
        ImageSpec::Tag(t) => format!("{repository}:{t}"),
        ImageSpec::Digest(d) => format!("{repository}@{d}"),
        ImageSpec::Reference(r) => r.clone(),
    }
}

/// The value to write for `image` in the form of `old`, when the file's repository for the
/// container is `repository`: a tag stays a tag, a digest a digest, as long as the repository
/// is the same; anything else is written in full.
fn value_for(old: &ImageSpec, image: &str, repository: &str) -> String {
    if matches!(old, ImageSpec::Reference(_)) {
        return image.to_string();
    }
    if let Some(digest) = image
        .strip_prefix(repository)
        .and_then(|r| r.strip_prefix('@'))
    {
        return digest.to_string();
    }
    match image
        .strip_prefix(repository)
        .and_then(|r| r.strip_prefix(':'))
    {
        Some(tag) if !tag.contains('@') && !tag.contains('/') => tag.to_string(),
        _ => image.to_string(),
    }
}

/// The line of a YAML key (`version`, `image`, or a container under `images`).
fn key_line(lines: &[&str], key: &str, indented: bool) -> Option<usize> {
    lines.iter().position(|l| {
        let body = depfile::strip_comment(l);
        let starts_indented = l.starts_with(' ') || l.starts_with('\t');
        starts_indented == indented
            && body
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
    })
}

/// The file's entries with their containers and lines. `current` is what the file resolves to
/// now (it names the main container of a plain version).
fn entries(
    file: &str,
    text: &str,
    spec: &crate::domain::DepSpec,
    key: &ServiceKey,
    current: &Images,
) -> Result<Vec<Entry>, EditError> {
    let err = |message: String| EditError {
        file: file.to_string(),
        message,
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (container, image) in &spec.images {
        let name = match container {
            Some(c) => c.clone(),
            None => {
                let main = current
                    .get(&key.name)
                    .map(|_| key.name.clone())
                    .or_else(|| {
                        (current.len() == 1)
                            .then(|| current.keys().next().cloned())
                            .flatten()
                    });
                main.ok_or_else(|| {
                    err("cannot tell which container the file's version sets".into())
                })?
            }
        };
        let line = if let Some((n, _)) = depfile::plain_line(text) {
            Some(n - 1)
        } else if key_line(&lines, "images", false).is_some() {
            key_line(&lines, &name, true)
        } else {
            key_line(&lines, "version", false).or_else(|| key_line(&lines, "image", false))
        };
        let line = line.ok_or_else(|| {
            err(format!(
                "cannot find the line that sets container {name}; edit the file by hand"
            ))
        })?;
        out.push(Entry {
            container: name,
            spec: image.clone(),
            line,
        });
    }
    Ok(out)
}

/// Replace the value on one line, keeping its key, quotes and comment.
fn replace_value(line: &str, plain: bool, value: &str, quote: bool) -> String {
    let body = depfile::strip_comment(line);
    let body_start = line.find(body).unwrap_or(0);
    let value_start = if plain {
        body_start
    } else {
        let colon = body.find(':').map(|i| i + 1).unwrap_or(0);
        let after = &body[colon..];
        body_start + colon + (after.len() - after.trim_start().len())
    };
    let value_end = body_start + body.len();
    let old = &line[value_start..value_end];
    let new = match old.chars().next() {
        Some(q @ ('"' | '\'')) if old.len() >= 2 && old.ends_with(q) => format!("{q}{value}{q}"),
        _ if quote => format!("\"{value}\""),
        _ => value.to_string(),
    };
    format!("{}{new}{}", &line[..value_start], &line[value_end..])
}

/// The file's text asking for `target` in the containers it names (other containers are not
/// the file's to set), with `header` (a depwatch header line) in place of any earlier one.
/// `current` is what the file resolves to now. Errors when the file does not set a container
/// whose image changes, or when the result would not parse to the target.
pub fn set_images(
    file: &str,
    text: &str,
    key: &ServiceKey,
    current: &Images,
    target: &Images,
    header: &str,
) -> Result<String, EditError> {
    let err = |message: String| EditError {
        file: file.to_string(),
        message,
    };
    let spec = depfile::parse(file, text.as_bytes()).map_err(|e| err(e.message))?;
    let found = entries(file, text, &spec, key, current)?;
    for (container, _) in current.changed_in(target).iter() {
        if !found.iter().any(|e| &e.container == container) {
            return Err(err(format!(
                "the file does not set container {container}; add it to the file by hand"
            )));
        }
    }
    let plain = depfile::plain_line(text).is_some();
    for quote in [false, true] {
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| Asker::find(l).is_none())
            .map(String::from)
            .collect();
        // Header lines were dropped: entries' lines are counted again on the kept text.
        let kept = lines.join("\n");
        let entries_now = entries(file, &kept, &spec, key, current)?;
        for e in &entries_now {
            let (Some(now), Some(want)) = (current.get(&e.container), target.get(&e.container))
            else {
                continue;
            };
            if now == want {
                continue;
            }
            let repository = repository_for(&spec, now);
            let value = value_for(&e.spec, want, &repository);
            lines[e.line] = replace_value(&lines[e.line], plain, &value, quote && !plain);
        }
        let mut out = header.to_string();
        for l in &lines {
            out.push_str(l);
            out.push('\n');
        }
        if asks_for(file, &out, &found, current, target) {
            return Ok(out);
        }
    }
    Err(err(
        "the edited file would not ask for the wanted images; edit it by hand".into(),
    ))
}

/// A plain file (one version or digest on one line) asking for `value` instead, given as a
/// version or a digest too: the value replaces that line; the requester's header replaces
/// the old one; every other line (comments) stays. Decided from the file alone, so a save
/// made a moment ago and not yet recorded is edited as it stands. `None` when the file is not
/// such a file, or `value` a full image reference (then its form is the record's to say).
pub fn set_plain(text: &str, value: &str, header: &str) -> Option<String> {
    let relative =
        |v: &str| depfile::classify(v).is_ok_and(|s| !matches!(s, ImageSpec::Reference(_)));
    let (line, old) = depfile::plain_line(text)?;
    if !relative(old) || !relative(value) {
        return None;
    }
    let mut out = header.to_string();
    for (i, l) in text.lines().enumerate() {
        if Asker::find(l).is_some() {
            continue;
        }
        out.push_str(if i + 1 == line { value } else { l });
        out.push('\n');
    }
    Some(out)
}

/// The file's text asking for `value` (a version, a digest or a full image) in the service's
/// main container: the one named like the Deployment, or its only one. Everything else stays:
/// the form of the value, other containers, settings and comments. `current` is what the file
/// resolves to now.
pub fn set_main(
    file: &str,
    text: &str,
    key: &ServiceKey,
    current: &Images,
    value: &ImageSpec,
    header: &str,
) -> Result<String, EditError> {
    let err = |message: String| EditError {
        file: file.to_string(),
        message,
    };
    let main = if current.get(&key.name).is_some() {
        key.name.clone()
    } else if current.len() == 1 {
        current.keys().next().cloned().unwrap_or_default()
    } else {
        return Err(err(format!(
            "the file sets several containers and none is named {}: say which in the file by hand",
            key.name
        )));
    };
    let spec = depfile::parse(file, text.as_bytes()).map_err(|e| err(e.message))?;
    let now = current.get(&main).cloned().unwrap_or_default();
    let image = resolved(value, &repository_for(&spec, &now));
    let target = current.with(&std::iter::once((main, image)).collect());
    set_images(file, text, key, current, &target, header)
}

/// The repository a tag or digest of this file goes to for a container running `now`.
fn repository_for(spec: &crate::domain::DepSpec, now: &str) -> String {
    spec.repository
        .clone()
        .unwrap_or_else(|| depfile::repository_of(now).to_string())
}

/// Whether a file's text resolves to `target` in every container it sets.
fn asks_for(file: &str, text: &str, found: &[Entry], current: &Images, target: &Images) -> bool {
    let Ok(spec) = depfile::parse(file, text.as_bytes()) else {
        return false;
    };
    if spec.images.len() != found.len() {
        return false;
    }
    spec.images.iter().zip(found).all(|((_, image), e)| {
        let Some(now) = current.get(&e.container) else {
            return false;
        };
        let want = target.get(&e.container).unwrap_or(now);
        resolved(image, &repository_for(&spec, now)) == *want
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_file_is_edited_from_its_own_text() {
        let text = "# keep me\n3.0.0-hang\n";
        assert_eq!(
            set_plain(text, "1.1.0", "# by bot\n").as_deref(),
            Some("# by bot\n# keep me\n1.1.0\n")
        );
        // A full image reference keeps its form through the record's knowledge instead.
        assert_eq!(set_plain("r.example/web:1.0\n", "1.1.0", ""), None);
        assert_eq!(set_plain("1.0\n", "r.example/web:1.1", ""), None);
        assert_eq!(set_plain("images:\n  web: 1.0\n", "1.1", ""), None);
    }

    const HEADER: &str = "# rolled back by alice at 2026-01-01T00:00:00Z\n";

    fn key() -> ServiceKey {
        ServiceKey::new("web", "prod").expect("key")
    }

    fn edit(text: &str, current: &str, target: &str) -> Result<String, EditError> {
        set_images(
            "web_prod.dep",
            text,
            &key(),
            &Images::parse(current),
            &Images::parse(target),
            HEADER,
        )
    }

    #[test]
    fn a_requested_version_goes_to_the_main_container_in_the_files_own_form() {
        let yaml = "# payments, owned by team-pay\nimages:\n  payments: r.example/payments:1.42.0  # CI\n  envoy: r.example/envoy:1.30\nrolloutTimeout: 45s\nrollback: false\n";
        let current =
            Images::parse("payments=r.example/payments:1.42.0, envoy=r.example/envoy:1.30");
        let k = ServiceKey::new("payments", "prod").expect("key");
        let out = set_main(
            "payments_prod.dep",
            yaml,
            &k,
            &current,
            &ImageSpec::Tag("1.43.0".into()),
            HEADER,
        )
        .expect("edits");
        assert_eq!(
            out,
            format!("{HEADER}# payments, owned by team-pay\nimages:\n  payments: r.example/payments:1.43.0  # CI\n  envoy: r.example/envoy:1.30\nrolloutTimeout: 45s\nrollback: false\n")
        );
        // A plain file stays plain; a full image of another repository is written in full.
        let out = set_main(
            "web_prod.dep",
            "1.2.0  # pipeline 88\n",
            &key(),
            &Images::parse("web=r.example/web:1.2.0"),
            &ImageSpec::Reference("mirror.example/web:1.3.0".into()),
            HEADER,
        )
        .expect("edits");
        assert_eq!(
            out,
            format!("{HEADER}mirror.example/web:1.3.0  # pipeline 88\n")
        );
        // Several containers, none named like the Deployment: not guessed.
        let e = set_main(
            "web_prod.dep",
            "images:\n  a: r/a:1\n  b: r/b:1\n",
            &key(),
            &Images::parse("a=r/a:1, b=r/b:1"),
            &ImageSpec::Tag("2".into()),
            HEADER,
        )
        .expect_err("ambiguous");
        assert!(e.to_string().contains("several containers"), "{e}");
    }

    #[test]
    fn each_form_keeps_its_shape_and_comments() {
        let cases: &[(&str, &str, &str, &str)] = &[
            // A plain version stays a plain version, its comment kept.
            (
                "# CI writes this\n1.2.0  # from pipeline 88\n",
                "web=r.example/web:1.2.0",
                "web=r.example/web:1.1.0",
                "# CI writes this\n1.1.0  # from pipeline 88\n",
            ),
            // A digest stays a digest.
            (
                "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\n",
                "web=r.example/web@sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                "web=r.example/web@sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n",
            ),
            // A full reference stays a full reference.
            (
                "r.example/web:2.0\n",
                "web=r.example/web:2.0",
                "web=r.example/web:1.9",
                "r.example/web:1.9\n",
            ),
            // A version going to another repository is written in full.
            (
                "2.0\n",
                "web=r.example/web:2.0",
                "web=other.example/web:1.0",
                "other.example/web:1.0\n",
            ),
            // YAML keeps its settings, quotes and comments.
            (
                "version: \"2.0\" # bad one\nrolloutTimeout: 90s\nrollback: off\n",
                "web=r.example/web:2.0",
                "web=r.example/web:1.0",
                "version: \"1.0\" # bad one\nrolloutTimeout: 90s\nrollback: off\n",
            ),
            // Only the container that changes is touched.
            (
                "images:\n  # the API\n  api: r.example/api:2.0\n  envoy: r.example/envoy:1.30 # pinned by SRE\n",
                "api=r.example/api:2.0, envoy=r.example/envoy:1.30",
                "api=r.example/api:1.0, envoy=r.example/envoy:1.30",
                "images:\n  # the API\n  api: r.example/api:1.0\n  envoy: r.example/envoy:1.30 # pinned by SRE\n",
            ),
            // A version YAML reads as a string stays unquoted ...
            (
                "container: web\nversion: 2.0-rc\n",
                "web=r.example/web:2.0-rc",
                "web=r.example/web:1.10",
                "container: web\nversion: 1.10\n",
            ),
            // ... and one it would read as nothing is quoted.
            (
                "container: web\nversion: 2.0-rc\n",
                "web=r.example/web:2.0-rc",
                "web=r.example/web:null",
                "container: web\nversion: \"null\"\n",
            ),
            // An earlier depwatch header is replaced, not stacked.
            (
                "# depwatch request r-1 by ci\n2.0\n",
                "web=r.example/web:2.0",
                "web=r.example/web:1.0",
                "1.0\n",
            ),
        ];
        for (text, current, target, want) in cases {
            let got = edit(text, current, target).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(got, format!("{HEADER}{want}"), "from {text:?}");
        }
    }

    #[test]
    fn a_container_the_file_does_not_set_is_refused() {
        let e = edit(
            "version: 2.0\ncontainer: web\n",
            "web=r.example/web:2.0, envoy=r.example/envoy:2",
            "web=r.example/web:2.0, envoy=r.example/envoy:1",
        )
        .expect_err("envoy is not the file's");
        assert!(e.message.contains("container envoy"), "{e}");
    }
}
