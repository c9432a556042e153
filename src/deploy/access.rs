//! What depwatch's own identity may do in the cluster, asked at start with
//! SelfSubjectAccessReview (no RBAC needed: every authenticated user may ask about itself), so
//! a token that cannot patch a namespace is said at 9 a.m., not at the first deploy.

use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use kube::api::{Api, PostParams};

/// Whether patching Deployments is allowed in one namespace (`None`: every namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub namespace: Option<String>,
    pub allowed: bool,
}

/// One line for the start-up log: where patching is allowed and where it is not.
pub fn describe(all: &[Access]) -> String {
    let place = |a: &Access| match &a.namespace {
        Some(ns) => ns.clone(),
        None => "every namespace".to_string(),
    };
    let yes: Vec<String> = all.iter().filter(|a| a.allowed).map(place).collect();
    let no: Vec<String> = all.iter().filter(|a| !a.allowed).map(place).collect();
    match (yes.is_empty(), no.is_empty()) {
        (false, true) => format!("may patch deployments in {}", yes.join(", ")),
        (true, false) => format!("may NOT patch deployments in {}", no.join(", ")),
        (false, false) => format!(
            "may patch deployments in {}; may NOT in {}",
            yes.join(", "),
            no.join(", ")
        ),
        (true, true) => "nothing asked".to_string(),
    }
}

/// Ask the API server whether this identity may patch Deployments in each of `namespaces`
/// (`None`: cluster-wide). `Err` when the question itself cannot be asked.
pub async fn may_patch(
    client: kube::Client,
    namespaces: Option<Vec<String>>,
) -> Result<Vec<Access>, kube::Error> {
    let api: Api<SelfSubjectAccessReview> = Api::all(client);
    let places: Vec<Option<String>> = match namespaces {
        Some(list) => list.into_iter().map(Some).collect(),
        None => vec![None],
    };
    let mut out = Vec::new();
    for namespace in places {
        let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
            "spec": {"resourceAttributes": {
                "namespace": namespace.clone().unwrap_or_default(),
                "verb": "patch", "group": "apps", "resource": "deployments"
            }}
        }))
        .map_err(kube::Error::SerdeError)?;
        let answer = api.create(&PostParams::default(), &review).await?;
        out.push(Access {
            namespace,
            allowed: answer.status.is_some_and(|s| s.allowed),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_where_and_where_not() {
        let a = |ns: Option<&str>, allowed| Access {
            namespace: ns.map(String::from),
            allowed,
        };
        assert_eq!(
            describe(&[a(None, true)]),
            "may patch deployments in every namespace"
        );
        assert_eq!(
            describe(&[a(Some("prod"), true), a(Some("qa"), false)]),
            "may patch deployments in prod; may NOT in qa"
        );
        assert_eq!(
            describe(&[a(Some("qa"), false)]),
            "may NOT patch deployments in qa"
        );
    }
}
