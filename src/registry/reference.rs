//! Image references as a registry sees them: which host, which repository, which tag or digest;
//! docker config.json credentials; and the tags worth naming when one is missing. All pure.

use std::collections::HashMap;

use base64::Engine;

/// Where an image lives: `registry.example.com:5000`, `team/web`, a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// The registry as written (`docker.io` for images without one).
    pub registry: String,
    pub repository: String,
    pub reference: Reference,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

impl ImageRef {
    /// Parse `[registry/]repository[:tag][@digest]` as the container runtime does: the first
    /// component is a registry when it has a `.` or `:`, or is `localhost`; otherwise the image
    /// is on Docker Hub (`library/` for one-component names).
    pub fn parse(image: &str) -> Result<ImageRef, String> {
        let (name, digest) = match image.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (image, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest)
            }
            _ => ("docker.io".to_string(), name),
        };
        let last = path.rsplit('/').next().unwrap_or(path);
        let (repository, tag) = match last.rsplit_once(':') {
            Some((_, tag)) => (&path[..path.len() - tag.len() - 1], Some(tag)),
            None => (path, None),
        };
        if repository.is_empty() {
            return Err(format!("{image}: no repository"));
        }
        if registry != "docker.io" {
            valid_host(&registry).map_err(|why| format!("{image}: {why}"))?;
        }
        let repository = match (registry.as_str(), repository.contains('/')) {
            ("docker.io", false) => format!("library/{repository}"),
            _ => repository.to_string(),
        };
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d.to_string()),
            (None, Some(t)) => Reference::Tag(t.to_string()),
            (None, None) => Reference::Tag("latest".into()),
        };
        Ok(ImageRef {
            registry,
            repository,
            reference,
        })
    }

    /// The host the distribution API answers on (Docker Hub's API is not `docker.io`).
    pub fn api_host(&self) -> &str {
        match self.registry.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        }
    }

    /// `https://host`, or `http://host` for a registry on loopback (a local test registry).
    pub fn api_base(&self) -> String {
        let host = self.api_host();
        let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
        let loopback = matches!(name, "localhost" | "127.0.0.1" | "[::1]");
        format!("{}://{host}", if loopback { "http" } else { "https" })
    }

    /// The tag or digest, as the manifest URL takes it.
    pub fn reference(&self) -> &str {
        match &self.reference {
            Reference::Tag(t) | Reference::Digest(t) => t,
        }
    }

    /// `registry/repository`, for messages.
    pub fn repository_shown(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// A registry host a client can ask: DNS labels (letters, digits, inner `-`), an IPv4 address
/// or a bracketed IPv6 one, and an optional port from 1 to 65535.
pub fn valid_host(registry: &str) -> Result<(), String> {
    let (host, port) = match registry.strip_prefix('[') {
        Some(v6) => {
            let (addr, rest) = v6
                .split_once(']')
                .ok_or_else(|| format!("registry host {registry} has no closing ']'"))?;
            addr.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("registry host [{addr}] is not an IPv6 address"))?;
            let port = match rest {
                "" => None,
                r => Some(r.strip_prefix(':').ok_or_else(|| {
                    format!("registry host {registry}: expected ':port' after ']'")
                })?),
            };
            (None, port)
        }
        None => match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        },
    };
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(format!(
                    "registry port {port} is not a port (expected 1 to 65535)"
                ))
            }
        }
    }
    let Some(host) = host else { return Ok(()) };
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    match host.len() <= 253 && host.split('.').all(label) {
        true => Ok(()),
        false => Err(format!(
            "registry host {host:?} is not a host name (letters, digits and '-' in dot-separated labels)"
        )),
    }
}

/// The longest repository name (registry and path) the distribution grammar allows.
const MAX_NAME: usize = 255;

/// Check `image` against the OCI distribution reference grammar, `[host[:port]/]path[:tag]
/// [@digest]`: lower-case path components joined by `.`, `_`, `__` or dashes, a tag of at
/// most 128 word characters, dots and dashes not starting with either, and a digest
/// `algorithm:hex` of at least 128 bits. The first component is the registry when it has a
/// `.` or a `:`, or is `localhost` (as the container runtime reads it), and must then be a
/// host a client can reach. Written out rather than taken from a crate: the grammar compiled
/// as a Unicode regular expression cost each process 40 ms and 20 MB on its first image.
pub fn check_grammar(image: &str) -> Result<(), String> {
    let (rest, digest) = match image.split_once('@') {
        Some((name, d)) => (name, Some(d)),
        None => (image, None),
    };
    if let Some(d) = digest {
        check_digest(d)?;
    }
    let after_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[after_slash..].rfind(':') {
        Some(i) => (&rest[..after_slash + i], Some(&rest[after_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        check_tag(t)?;
    }
    if name.is_empty() {
        return Err("no repository".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the repository name is longer than {MAX_NAME} characters"
        ));
    }
    let path = match name.split_once('/') {
        Some((first, path))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            // Only text of a host's own characters is named back in the reason.
            if !host_shaped(first) {
                return Err("the registry: expected a host name, an IPv4 address or a bracketed IPv6 one, with an optional :port".into());
            }
            valid_host(first)?;
            path
        }
        _ => name,
    };
    match path.split('/').all(path_component) {
        true => Ok(()),
        false => Err(
            "the repository: expected lower-case letters and digits, in components separated by '/', joined inside by '.', '_', '__' or dashes".into(),
        ),
    }
}

/// Made of what a registry `host[:port]` is made of: letters, digits, `.` and `-` (or a
/// bracketed IPv6 address), then digits after a `:`.
fn host_shaped(registry: &str) -> bool {
    let (host, port) = match registry.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, rest))
                if addr
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') =>
            {
                (
                    None,
                    rest.strip_prefix(':').or(rest.is_empty().then_some("")),
                )
            }
            _ => return false,
        },
        None => match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), Some("")),
        },
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    });
    host_ok && port.is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or one dash or more.
fn path_component(c: &str) -> bool {
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    let mut run = 0; // the alphanumerics since the last separator
    let mut sep = String::new();
    for ch in c.chars() {
        if alnum(ch) {
            if run == 0 && !sep.is_empty() {
                let joined =
                    matches!(sep.as_str(), "." | "_" | "__") || sep.chars().all(|s| s == '-');
                if !joined {
                    return false;
                }
                sep.clear();
            }
            run += 1;
        } else if matches!(ch, '.' | '_' | '-') {
            if run == 0 && sep.is_empty() {
                return false; // a separator first
            }
            run = 0;
            sep.push(ch);
        } else {
            return false;
        }
    }
    run > 0
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(t: &str) -> Result<(), String> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = t.len() <= 128
        && t.chars().next().is_some_and(word)
        && t.chars().all(|c| word(c) || c == '.' || c == '-');
    match ok {
        true => Ok(()),
        false => Err(
            "the tag: expected at most 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'".into(),
        ),
    }
}

/// `algorithm:hex`: components `[A-Za-z][A-Za-z0-9]*` joined by `+`, `.`, `_` or `-`, and at
/// least 32 hex digits.
fn check_digest(d: &str) -> Result<(), String> {
    let (alg, hex) = d.split_once(':').unwrap_or((d, ""));
    let component = |c: &str| {
        c.chars().next().is_some_and(|f| f.is_ascii_alphabetic())
            && c.chars().all(|ch| ch.is_ascii_alphanumeric())
    };
    let alg_ok = alg.split(['+', '.', '_', '-']).all(component);
    let hex_ok = hex.len() >= 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    match alg_ok && hex_ok {
        true => Ok(()),
        false => Err("the digest: expected algorithm:hex, e.g. sha256: and 64 hex digits".into()),
    }
}

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, wherever a value is logged.
        write!(f, "Credentials({}, ***)", self.username)
    }
}

/// The registry a docker config.json key names: `https://index.docker.io/v1/` is Docker Hub,
/// `https://host/path` is `host`.
fn normalise_host(key: &str) -> String {
    let host = key
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".into(),
        _ => host,
    }
}

/// The credentials of a docker config.json (`{"auths": {host: {auth | username+password}}}`, or
/// the older `.dockercfg` form without `auths`), by registry host.
pub fn parse_docker_config(text: &str) -> Result<HashMap<String, Credentials>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let auths = v.get("auths").unwrap_or(&v);
    let entries = auths
        .as_object()
        .ok_or("expected an object of registries under \"auths\"")?;
    let mut out = HashMap::new();
    for (host, entry) in entries {
        let text = |f: &str| entry.get(f).and_then(|s| s.as_str()).unwrap_or_default();
        let creds = match (text("auth"), text("username")) {
            (auth, _) if !auth.is_empty() => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth)
                    .map_err(|_| format!("{host}: auth is not base64"))?;
                let pair = String::from_utf8(decoded)
                    .map_err(|_| format!("{host}: auth is not user:password"))?;
                let (u, p) = pair
                    .split_once(':')
                    .ok_or_else(|| format!("{host}: auth is not user:password"))?;
                Credentials {
                    username: u.into(),
                    password: p.into(),
                }
            }
            (_, user) if !user.is_empty() => Credentials {
                username: user.into(),
                password: text("password").into(),
            },
            _ => continue,
        };
        out.insert(normalise_host(host), creds);
    }
    Ok(out)
}

/// A tag's numbers (`v1.4.2-rc1` → [1, 4, 2, 1]), for ordering versions.
fn numbers(tag: &str) -> Vec<u64> {
    tag.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The tags worth naming when `wanted` is missing, at most `n`: those shaped like it (same
/// non-digit prefix), the ones sharing most of its leading numbers first (`1.4.2` before
/// `1.10.0` for `1.4.3`), newest first among equals.
pub fn closest_tags(wanted: &str, tags: &[String], n: usize) -> Vec<String> {
    let prefix = |t: &str| -> String { t.chars().take_while(|c| !c.is_ascii_digit()).collect() };
    let (want, want_numbers) = (prefix(wanted), numbers(wanted));
    let shared = |t: &str| {
        numbers(t)
            .iter()
            .zip(&want_numbers)
            .take_while(|(a, b)| a == b)
            .count()
    };
    let mut like: Vec<&String> = tags
        .iter()
        .filter(|t| prefix(t) == want && !numbers(t).is_empty())
        .collect();
    if like.is_empty() {
        like = tags.iter().collect();
    }
    like.sort_by(|a, b| {
        shared(b)
            .cmp(&shared(a))
            .then_with(|| numbers(b).cmp(&numbers(a)))
            .then_with(|| b.cmp(a))
    });
    like.into_iter().take(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_follow_the_distribution_grammar() {
        let hex = "a".repeat(64);
        let valid = [
            "nginx".to_string(),
            "nginx:1.24".into(),
            "library/nginx:latest".into(),
            "registry.example.com:5000/team/web:2.0".into(),
            "localhost/web".into(),
            "localhost:5000/a/b_c/d__e/f-g--h:Tag_1.x-y".into(),
            "127.0.0.1:5000/web".into(),
            "[::1]:5000/web:1".into(),
            "Registry.Example.com/web".into(),
            format!("web@sha256:{hex}"),
            format!("web:1.0@sha256:{hex}"),
            format!("r.example/web@sha512+b64.x:{}", "0".repeat(32)),
            "localhost:5000".into(),
            format!("web:{}", "t".repeat(128)),
        ];
        for v in &valid {
            assert_eq!(check_grammar(v), Ok(()), "{v}");
        }
        let invalid = [
            "Web/App:1".to_string(),
            "UPPER".into(),
            "repo:tag:extra".into(),
            "web:".into(),
            "web:-rc1".into(),
            "web:.rc1".into(),
            ":1".into(),
            "/web".into(),
            "web/".into(),
            "web//x".into(),
            "web_/x".into(),
            "_web".into(),
            "we___b".into(),
            "we.-b".into(),
            "a..b/web".into(),
            "registry:99999/web".into(),
            "web@sha256:abc".into(),
            format!("web@1sha:{hex}"),
            format!("web@sha256:{}", "g".repeat(64)),
            format!("web:{}", "t".repeat(129)),
            format!("{}/web", "a".repeat(252)),
            "wéb".into(),
        ];
        for v in &invalid {
            assert!(check_grammar(v).is_err(), "{v} accepted");
        }
    }

    #[test]
    fn references_are_read_as_the_runtime_reads_them() {
        let table = [
            ("nginx", "docker.io", "library/nginx", "latest"),
            ("nginx:1.27", "docker.io", "library/nginx", "1.27"),
            ("team/web:2", "docker.io", "team/web", "2"),
            (
                "registry.example.com/team/web:1.4.2",
                "registry.example.com",
                "team/web",
                "1.4.2",
            ),
            ("127.0.0.1:5000/web:1.0", "127.0.0.1:5000", "web", "1.0"),
            ("localhost/web", "localhost", "web", "latest"),
            ("ghcr.io/o/r@sha256:abc", "ghcr.io", "o/r", "sha256:abc"),
        ];
        for (image, registry, repo, reference) in table {
            let r = ImageRef::parse(image).expect(image);
            assert_eq!(
                (r.registry.as_str(), r.repository.as_str(), r.reference()),
                (registry, repo, reference),
                "{image}"
            );
        }
        let hub = ImageRef::parse("nginx").expect("hub");
        assert_eq!(hub.api_base(), "https://registry-1.docker.io");
        let local = ImageRef::parse("127.0.0.1:5000/web:1").expect("local");
        assert_eq!(local.api_base(), "http://127.0.0.1:5000");
        assert!(ImageRef::parse(":1.0").is_err());
    }

    #[test]
    fn a_registry_that_cannot_be_asked_is_not_a_reference() {
        for good in [
            "r.example:5000/web:1",
            "[::1]:5000/web:1",
            "[fd00::1]/web:1",
            "127.0.0.1:65535/web",
            "localhost:1/web",
            "my-registry.local/team/web",
        ] {
            assert!(ImageRef::parse(good).is_ok(), "{good}");
        }
        let table = [
            ("r.example:99999/web:1", "port 99999"),
            ("r.example:0/web:1", "port 0"),
            ("r.example:http/web:1", "port http"),
            ("[::1/web:1", "no closing"),
            ("[zz::1]:5000/web:1", "not an IPv6"),
            ("-bad.example/web:1", "not a host name"),
            ("bad..example/web:1", "not a host name"),
            ("bad_host.example/web:1", "not a host name"),
        ];
        for (image, why) in table {
            match ImageRef::parse(image) {
                Err(e) => assert!(e.contains(why), "{image}: {e}"),
                Ok(r) => panic!("{image} parsed as {r:?}"),
            }
        }
    }

    #[test]
    fn docker_config_credentials_by_host_and_never_shown() {
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:s3cret");
        let text = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                "registry.example.com": {{"username": "bot", "password": "pw"}},
                "empty.example.com": {{}}}}}}"#
        );
        let creds = parse_docker_config(&text).expect("parses");
        assert_eq!(creds["docker.io"].username, "ci");
        assert_eq!(creds["docker.io"].password, "s3cret");
        assert_eq!(creds["registry.example.com"].password, "pw");
        assert!(!creds.contains_key("empty.example.com"));
        assert!(!format!("{:?}", creds["docker.io"]).contains("s3cret"));
        assert!(parse_docker_config("{").is_err());
        assert!(parse_docker_config(r#"{"auths": {"h": {"auth": "%%%"}}}"#).is_err());
    }

    #[test]
    fn the_closest_tags_shaped_like_the_missing_one_are_named() {
        let tags: Vec<String> = ["1.4.1", "1.4.2", "1.3.9", "latest", "v2.0.0", "1.10.0"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            closest_tags("1.4.3", &tags, 3),
            ["1.4.2", "1.4.1", "1.10.0"]
        );
        assert_eq!(closest_tags("v2.1.0", &tags, 2), ["v2.0.0"]);
        assert_eq!(
            closest_tags("edge", &tags, 1),
            ["v2.0.0"],
            "else the newest"
        );
    }
}
