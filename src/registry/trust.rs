//! How far a registry's answers are trusted, decided before any of them is acted on: how many
//! bytes each answer may be, where a token realm may point, which redirects are followed and
//! whether the credentials go with them, and which tags and digests are kept. A registry is
//! chosen by whoever writes a file, so each rule assumes it may be hostile. Pure.

use std::net::IpAddr;

use reqwest::Url;

/// The most a token service's JSON answer may be.
pub const TOKEN_CAP: usize = 64 * 1024;
/// The most one page of `tags/list` may be.
pub const TAGS_PAGE_CAP: usize = 1024 * 1024;
/// Pages of `tags/list` read at most (the closest tags are a courtesy, not a need).
pub const TAGS_PAGES: usize = 4;
/// Redirects followed at most for one request.
pub const MAX_REDIRECTS: usize = 5;
/// Tags kept from one listing at most.
pub const TAGS_KEPT: usize = 10_000;

/// An address only the host's neighbours should ask: loopback, private, link-local (where cloud
/// metadata services answer), carrier-grade NAT, unique-local, unspecified or broadcast.
pub fn internal_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => internal_ip(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                v6.is_loopback()
                    || v6.is_unspecified()
                    || (first & 0xfe00) == 0xfc00
                    || (first & 0xffc0) == 0xfe80
            }
        },
    }
}

/// Whether a URL names an internal host by itself: `localhost` (and `*.localhost`) or an
/// internal address literal. Names that resolve to one are caught when they are resolved.
pub fn internal_host(url: &Url, internal: fn(IpAddr) -> bool) -> bool {
    let Some(host) = url.host_str() else {
        return true;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return internal(ip);
    }
    let d = bare.trim_end_matches('.').to_ascii_lowercase();
    d == "localhost" || d.ends_with(".localhost")
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The token realm a registry's challenge names, when it may be asked: trusted only as far as
/// the registry itself. `registry_internal` says whether the registry's own host is internal
/// (by name, literal or resolved address): only then may the realm be internal too.
/// `with_credentials`: Basic credentials would be sent to it.
pub fn judge_realm(
    registry: &Url,
    registry_internal: bool,
    realm: &str,
    with_credentials: bool,
    internal: fn(IpAddr) -> bool,
) -> Result<Url, String> {
    let url = Url::parse(realm)
        .map_err(|_| format!("its token realm {:?} is not a URL", shorten(realm)))?;
    let shown = shorten(url.as_str());
    match url.scheme() {
        "https" => {}
        "http" if registry.scheme() == "http" => {}
        "http" => {
            return Err(format!(
                "its token realm {shown} is plain HTTP for an HTTPS registry; not asked"
            ))
        }
        other => return Err(format!("its token realm {shown} is {other}:, not HTTPS")),
    }
    if internal_host(&url, internal) && !registry_internal {
        return Err(format!(
            "its token realm {shown} is an internal address and the registry is not; not asked"
        ));
    }
    let other_host = url.host_str() != registry.host_str();
    if with_credentials && url.scheme() == "http" && other_host {
        return Err(format!(
            "its token realm {shown} is plain HTTP on another host than the registry; the credentials were not sent"
        ));
    }
    Ok(url)
}

/// What to do with a redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Go on to `to`; with the `Authorization` header only when it is the same origin.
    Follow {
        to: Url,
        keep_auth: bool,
    },
    Refuse(String),
}

/// A redirect from `from` to `location`: never to another scheme downwards (HTTPS to HTTP),
/// never to another host for a token request (`same_host_only`), and the `Authorization`
/// header only to the same scheme, host and port.
pub fn judge_redirect(from: &Url, location: &str, same_host_only: bool) -> Hop {
    let Ok(to) = from.join(location) else {
        return Hop::Refuse(format!(
            "redirected to {:?}, which is not a URL",
            shorten(location)
        ));
    };
    let shown = shorten(to.as_str());
    if !matches!(to.scheme(), "http" | "https")
        || (from.scheme() == "https" && to.scheme() == "http")
    {
        return Hop::Refuse(format!("redirected from HTTPS to {shown}; not followed"));
    }
    if same_host_only && to.host_str() != from.host_str() {
        return Hop::Refuse(format!(
            "the token service redirected to another host ({shown}); not followed"
        ));
    }
    Hop::Follow {
        keep_auth: same_origin(from, &to),
        to,
    }
}

/// Tags a listing may name: the OCI tag grammar, at most [`TAGS_KEPT`]; the count dropped.
pub fn keep_tags(tags: Vec<String>) -> (Vec<String>, usize) {
    let total = tags.len();
    let kept: Vec<String> = tags
        .into_iter()
        .filter(|t| crate::depfile::valid_tag(t))
        .take(TAGS_KEPT)
        .collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

/// A `Docker-Content-Digest` worth storing: the digest grammar, else nothing.
pub fn keep_digest(value: &str) -> Option<String> {
    crate::depfile::valid_digest(value)
        .ok()
        .map(|()| value.to_string())
}

/// The `next` page a `Link` header names (`</v2/web/tags/list?last=x&n=1000>; rel="next"`),
/// on the same origin as `from` only.
pub fn next_page(from: &Url, link: &str) -> Option<Url> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            p.trim()
                .replace(' ', "")
                .eq_ignore_ascii_case("rel=\"next\"")
        });
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let to = from.join(target).ok()?;
        (is_next && same_origin(from, &to)).then_some(to)
    })
}

/// A URL or value from a registry, short enough to show.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    crate::safefs::escape(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).expect("url")
    }

    #[test]
    fn internal_addresses_are_known_by_their_ranges() {
        let table = [
            ("127.0.0.2", true),
            ("10.1.2.3", true),
            ("172.16.0.1", true),
            ("192.168.1.1", true),
            ("169.254.169.254", true),
            ("100.64.0.1", true),
            ("0.0.0.0", true),
            ("::1", true),
            ("fd00::1", true),
            ("fe80::1", true),
            ("::ffff:127.0.0.1", true),
            ("8.8.8.8", false),
            ("100.128.0.1", false),
            ("2001:db8::1", false),
            ("::ffff:8.8.8.8", false),
        ];
        for (ip, internal) in table {
            let parsed: IpAddr = ip.parse().expect("ip");
            assert_eq!(internal_ip(parsed), internal, "{ip}");
        }
        assert!(internal_host(&url("http://localhost:5000/"), internal_ip));
        assert!(internal_host(&url("http://a.localhost/"), internal_ip));
        assert!(internal_host(&url("http://[::1]:5000/"), internal_ip));
        assert!(!internal_host(
            &url("https://auth.example.com/"),
            internal_ip
        ));
    }

    #[test]
    fn the_token_realm_is_trusted_only_as_far_as_the_registry() {
        let public = url("https://registry.example.com/");
        let local = url("http://127.0.0.1:5000/");
        // (registry, registry internal, realm, with credentials, allowed or the refusal)
        type Row<'a> = (&'a Url, bool, &'a str, bool, Result<(), &'a str>);
        let table: &[Row] = &[
            (
                &public,
                false,
                "https://auth.example.com/token",
                true,
                Ok(()),
            ),
            (
                &public,
                false,
                "http://auth.example.com/token",
                false,
                Err("plain HTTP for an HTTPS"),
            ),
            (
                &public,
                false,
                "https://127.0.0.2/internal/creds",
                false,
                Err("internal address"),
            ),
            (
                &public,
                false,
                "https://169.254.169.254/latest",
                false,
                Err("internal address"),
            ),
            (
                &public,
                false,
                "https://localhost/token",
                false,
                Err("internal address"),
            ),
            (
                &public,
                false,
                "file:///etc/passwd",
                false,
                Err("not HTTPS"),
            ),
            (&public, false, "not a url", false, Err("not a URL")),
            // A registry on an internal network may have its token service there too.
            (&public, true, "https://10.0.0.5/token", true, Ok(())),
            (&local, true, "http://127.0.0.1:5000/token", true, Ok(())),
            (&local, true, "http://127.0.0.2/token", false, Ok(())),
            (
                &local,
                true,
                "http://127.0.0.2/token",
                true,
                Err("credentials were not sent"),
            ),
            (&local, true, "https://127.0.0.2/token", true, Ok(())),
        ];
        for (registry, internal, realm, creds, expected) in table {
            let got = judge_realm(registry, *internal, realm, *creds, internal_ip);
            match (expected, &got) {
                (Ok(()), Ok(_)) => {}
                (Err(why), Err(e)) => assert!(e.contains(why), "{realm}: {e}"),
                _ => panic!("{realm} (creds {creds}): expected {expected:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn redirects_keep_credentials_on_the_same_origin_only() {
        let from = url("https://r.example/v2/web/manifests/1");
        let follow = |to: &str, keep_auth: bool| Hop::Follow {
            to: url(to),
            keep_auth,
        };
        let table = [
            (
                "/v2/web/manifests/2",
                false,
                follow("https://r.example/v2/web/manifests/2", true),
            ),
            (
                "https://cdn.example/x",
                false,
                follow("https://cdn.example/x", false),
            ),
            (
                "https://r.example:8443/x",
                false,
                follow("https://r.example:8443/x", false),
            ),
        ];
        for (location, same_host, hop) in table {
            assert_eq!(
                judge_redirect(&from, location, same_host),
                hop,
                "{location}"
            );
        }
        let plain = url("http://r.example:5000/token");
        assert_eq!(
            judge_redirect(&plain, "https://r.example:5000/token", true),
            follow("https://r.example:5000/token", false),
            "a scheme-only redirect drops Authorization"
        );
        for (location, same_host, why) in [
            ("http://r.example/x", false, "from HTTPS"),
            ("https://other.example/token", true, "another host"),
            ("ftp://r.example/x", false, "not followed"),
        ] {
            match judge_redirect(&from, location, same_host) {
                Hop::Refuse(e) => assert!(e.contains(why), "{location}: {e}"),
                other => panic!("{location}: {other:?}"),
            }
        }
    }

    #[test]
    fn only_tags_and_digests_of_their_grammar_are_kept() {
        let tags = vec![
            "1.0".to_string(),
            "1.1\u{1b}[1A\u{1b}[2K".into(),
            "\u{1b}]0;title\u{7}".into(),
            ".hidden".into(),
            "x".repeat(129),
            "v2_rc-1".into(),
        ];
        assert_eq!(keep_tags(tags), (vec!["1.0".into(), "v2_rc-1".into()], 4));
        let many: Vec<String> = (0..TAGS_KEPT + 5).map(|i| format!("t{i}")).collect();
        assert_eq!(keep_tags(many).0.len(), TAGS_KEPT);
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(keep_digest(&good), Some(good.clone()));
        for bad in [
            format!("sha256:{}", "a".repeat(100_000)),
            "sha256:zz".into(),
            format!("md5:{}", "a".repeat(32)),
            format!("sha256:{}\u{1b}[2K", "a".repeat(64)),
        ] {
            assert_eq!(keep_digest(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_next_page_is_read_from_link_on_the_same_origin() {
        let from = url("http://127.0.0.1:5000/v2/web/tags/list?n=1000");
        assert_eq!(
            next_page(&from, "</v2/web/tags/list?last=b&n=1000>; rel=\"next\""),
            Some(url("http://127.0.0.1:5000/v2/web/tags/list?last=b&n=1000"))
        );
        assert_eq!(
            next_page(
                &from,
                "<http://127.0.0.2/v2/web/tags/list?last=b>; rel=\"next\""
            ),
            None,
            "another host"
        );
        assert_eq!(
            next_page(&from, "</v2/web/tags/list?last=b>; rel=\"prev\""),
            None
        );
        assert_eq!(next_page(&from, "garbage"), None);
    }
}
