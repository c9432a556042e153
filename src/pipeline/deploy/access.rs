//! What depwatch's own identity may do in the cluster, asked at start with
//! SelfSubjectAccessReview (no RBAC needed: every authenticated user may ask about itself), so
//! a token that cannot patch a kind in a namespace is said at 9 a.m., not at the first deploy.

use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use kube::api::{Api, PostParams};

use crate::domain::WorkloadKind;

/// Whether patching one kind is allowed in one namespace (`None`: every namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub namespace: Option<String>,
    pub kind: WorkloadKind,
    pub allowed: bool,
}

/// `deployments, statefulsets` for a list of kinds.
fn plural(kinds: &[WorkloadKind]) -> String {
    kinds
        .iter()
        .map(|k| format!("{k}s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line for the start-up log: which kinds may be patched where, and which may not.
pub fn describe(all: &[Access]) -> String {
    let mut places: Vec<Option<String>> = Vec::new();
    for a in all {
        if !places.contains(&a.namespace) {
            places.push(a.namespace.clone());
        }
    }
    let kinds = |place: &Option<String>, allowed: bool| -> Vec<WorkloadKind> {
        all.iter()
            .filter(|a| &a.namespace == place && a.allowed == allowed)
            .map(|a| a.kind)
            .collect()
    };
    let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "every namespace".into());
    // Places with the same answer are said together.
    let mut yes: Vec<(String, Vec<String>)> = Vec::new();
    let mut no: Vec<(String, Vec<String>)> = Vec::new();
    for p in &places {
        for (allowed, out) in [(true, &mut yes), (false, &mut no)] {
            let k = kinds(p, allowed);
            if k.is_empty() {
                continue;
            }
            let k = plural(&k);
            match out.iter_mut().find(|(kinds, _)| *kinds == k) {
                Some((_, ps)) => ps.push(name(p)),
                None => out.push((k, vec![name(p)])),
            }
        }
    }
    let said: Vec<String> = yes
        .iter()
        .map(|(k, ps)| format!("may patch {k} in {}", ps.join(", ")))
        .chain(
            no.iter()
                .map(|(k, ps)| format!("may NOT patch {k} in {}", ps.join(", "))),
        )
        .collect();
    match said.is_empty() {
        true => "nothing asked".to_string(),
        false => said.join("; "),
    }
}

/// Ask the API server whether this identity may patch each workload kind in each of
/// `namespaces` (`None`: cluster-wide). `Err` when the question itself cannot be asked.
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
        for kind in WorkloadKind::ALL.iter().copied() {
            let (group, resource) = super::workload::resource(kind);
            let review: SelfSubjectAccessReview = serde_json::from_value(serde_json::json!({
                "spec": {"resourceAttributes": {
                    "namespace": namespace.clone().unwrap_or_default(),
                    "verb": "patch", "group": group, "resource": resource
                }}
            }))
            .map_err(kube::Error::SerdeError)?;
            let answer = api.create(&PostParams::default(), &review).await?;
            out.push(Access {
                namespace: namespace.clone(),
                kind,
                allowed: answer.status.is_some_and(|s| s.allowed),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_which_kinds_where_and_where_not() {
        use WorkloadKind::*;
        let a = |ns: Option<&str>, kind, allowed| Access {
            namespace: ns.map(String::from),
            kind,
            allowed,
        };
        let everywhere: Vec<Access> = WorkloadKind::ALL
            .iter()
            .map(|k| a(None, *k, true))
            .collect();
        assert_eq!(
            describe(&everywhere),
            "may patch deployments, statefulsets, daemonsets, cronjobs in every namespace"
        );
        assert_eq!(
            describe(&[
                a(Some("prod"), Deployment, true),
                a(Some("prod"), CronJob, false),
                a(Some("qa"), Deployment, true),
                a(Some("qa"), CronJob, false),
                a(Some("dev"), Deployment, false),
                a(Some("dev"), CronJob, false),
            ]),
            "may patch deployments in prod, qa; may NOT patch cronjobs in prod, qa; may NOT patch deployments, cronjobs in dev"
        );
        assert_eq!(describe(&[]), "nothing asked");
    }
}
