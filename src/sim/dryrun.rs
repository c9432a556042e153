//! Server-side dry runs (`kubectl --dry-run=server`, `dryRun=All`): whether a write is stored or
//! only answered. The decision is made here, once per request; the store enacts it
//! ([`super::store::Store::mutate_as`]): a dry run is admitted, defaulted and validated like any
//! write and answered with the object as it would be, but nothing is stored, no resourceVersion
//! is taken, no watch event is sent and so no controller acts on it.

use axum::http::Method;
use serde_json::{json, Value};

use super::store::ApiError;

/// The one value the API server accepts for `dryRun`.
const ALL: &str = "All";

/// What becomes of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Stored, versioned and announced to watches.
    Store,
    /// Answered as if done; nothing changes.
    DryRun,
}

impl Commit {
    pub fn is_dry_run(self) -> bool {
        self == Commit::DryRun
    }
}

/// Decide what becomes of a request. Reads carry no dry-run option. A DELETE with a body reads
/// `dryRun` from its DeleteOptions (kubectl and the `kube` crate send it there), otherwise from
/// the query, as the API server does. Any value other than `All` is refused as the API server
/// refuses it: 422 Invalid on the request's options kind.
pub fn decide(method: &Method, query: Option<&str>, body: &[u8]) -> Result<Commit, ApiError> {
    let Some(options) = options_kind(method) else {
        return Ok(Commit::Store);
    };
    let from_body = if *method == Method::DELETE {
        body_values(body)
    } else {
        None
    };
    let values = from_body.unwrap_or_else(|| query_values(query.unwrap_or_default()));
    if values.is_empty() {
        Ok(Commit::Store)
    } else if values.iter().all(|v| v == ALL) {
        Ok(Commit::DryRun)
    } else {
        Err(unsupported(options, &values))
    }
}

/// The options object the API server decodes a write's parameters into.
fn options_kind(method: &Method) -> Option<&'static str> {
    match *method {
        Method::POST => Some("CreateOptions"),
        Method::PUT => Some("UpdateOptions"),
        Method::PATCH => Some("PatchOptions"),
        Method::DELETE => Some("DeleteOptions"),
        _ => None,
    }
}

/// Every `dryRun` value of a query string (the parameter may repeat).
fn query_values(query: &str) -> Vec<String> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "dryRun")
        .map(|(_, v)| v.into_owned())
        .collect()
}

/// `dryRun` of a JSON DeleteOptions body; `None` when there is no body to read, so the query
/// decides.
fn body_values(body: &[u8]) -> Option<Vec<String>> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let options: Value = serde_json::from_slice(body).ok()?;
    let values = match &options["dryRun"] {
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_str().map_or_else(|| v.to_string(), String::from))
            .collect(),
        Value::Null => Vec::new(),
        other => vec![other.to_string()],
    };
    Some(values)
}

/// The API server's refusal of an unknown dry-run value (ValidateDryRun, NotSupported).
fn unsupported(options: &str, values: &[String]) -> ApiError {
    let shown = values
        .iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let cause = format!("Unsupported value: []string{{{shown}}}: supported values: \"{ALL}\"");
    let mut e = ApiError::new(
        422,
        "Invalid",
        format!("{options}.meta.k8s.io \"\" is invalid: dryRun: {cause}"),
    );
    e.details = Some(json!({
        "group": "meta.k8s.io",
        "kind": options,
        "causes": [{"reason": "FieldValueNotSupported", "message": cause, "field": "dryRun"}],
    }));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request (method, query, body) and what it decides: a commit or an error code.
    type Case<'a> = (Method, Option<&'a str>, &'a [u8], Result<Commit, u16>);

    #[test]
    fn decides_once_for_every_verb() {
        let delete_all = br#"{"kind":"DeleteOptions","apiVersion":"v1","dryRun":["All"]}"#;
        let delete_none =
            br#"{"kind":"DeleteOptions","apiVersion":"v1","propagationPolicy":"Background"}"#;
        let cases: &[Case] = &[
            (Method::POST, None, b"", Ok(Commit::Store)),
            (Method::POST, Some("dryRun=All"), b"", Ok(Commit::DryRun)),
            (
                Method::POST,
                Some("fieldManager=kubectl-client-side-apply&dryRun=All&fieldValidation=Strict"),
                b"",
                Ok(Commit::DryRun),
            ),
            (Method::PUT, Some("dryRun=All"), b"", Ok(Commit::DryRun)),
            (
                Method::PATCH,
                Some("dryRun=All&dryRun=All"),
                b"",
                Ok(Commit::DryRun),
            ),
            (
                Method::PATCH,
                Some("fieldManager=kubectl-set"),
                b"",
                Ok(Commit::Store),
            ),
            (Method::DELETE, None, delete_all, Ok(Commit::DryRun)),
            (Method::DELETE, None, delete_none, Ok(Commit::Store)),
            (Method::DELETE, Some("dryRun=All"), b"", Ok(Commit::DryRun)),
            (
                Method::DELETE,
                Some("dryRun=All"),
                b" \n",
                Ok(Commit::DryRun),
            ),
            // A body decides alone, as the API server's delete handler reads one or the other.
            (
                Method::DELETE,
                Some("dryRun=All"),
                delete_none,
                Ok(Commit::Store),
            ),
            // Reads have no dry run: the parameter means nothing to them.
            (Method::GET, Some("dryRun=All"), b"", Ok(Commit::Store)),
            (Method::GET, Some("dryRun=Nope"), b"", Ok(Commit::Store)),
            (Method::POST, Some("dryRun=all"), b"", Err(422)),
            (Method::POST, Some("dryRun="), b"", Err(422)),
            (Method::PATCH, Some("dryRun=All&dryRun=true"), b"", Err(422)),
            (Method::PUT, Some("dryRun=server"), b"", Err(422)),
            (Method::DELETE, None, br#"{"dryRun":["server"]}"#, Err(422)),
        ];
        for (method, query, body, want) in cases {
            let got = decide(method, *query, body).map_err(|e| e.code);
            assert_eq!(
                &got,
                want,
                "{method} ?{query:?} {:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn an_unknown_value_is_refused_in_the_api_servers_words() {
        let e = decide(&Method::PATCH, Some("dryRun=server"), b"").expect_err("refused");
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert_eq!(
            e.message,
            r#"PatchOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: []string{"server"}: supported values: "All""#
        );
        let status = e.to_status();
        assert_eq!(status["details"]["kind"], "PatchOptions");
        assert_eq!(status["details"]["causes"][0]["field"], "dryRun");
        let e = decide(&Method::DELETE, None, br#"{"dryRun":["All","x"]}"#).expect_err("refused");
        assert!(
            e.message.starts_with(r#"DeleteOptions.meta.k8s.io "" is invalid: dryRun: Unsupported value: []string{"All", "x"}"#),
            "{}",
            e.message
        );
    }
}
