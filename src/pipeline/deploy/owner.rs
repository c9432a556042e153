//! Workloads another engine owns. A Deployment that Argo CD, Flux or Helm manages gets its
//! image reverted at that engine's next sync, so depwatch's patch would be undone and its
//! verdict would be about nothing. Such a file fails at plan with the owner named, unless
//! `--allow-owned` says to patch anyway. Pure: labels, annotations and field managers in, an
//! owner out.

use std::collections::BTreeMap;
use std::fmt;

/// The engine that owns a workload, and the name of its object there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    ArgoCd { application: String },
    Flux { kind: &'static str, name: String },
    Helm { release: String },
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::ArgoCd { application } => write!(f, "Argo CD application {application}"),
            Owner::Flux { kind, name } => write!(f, "Flux {kind} {name}"),
            Owner::Helm { release } => write!(f, "Helm release {release}"),
        }
    }
}

/// The object being looked at, as Argo CD's tracking id names it: `<group>/<Kind>:<namespace>/<name>`.
pub fn tracked_as(api_version: &str, kind: &str, namespace: &str, name: &str) -> String {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    format!("{group}/{kind}:{namespace}/{name}")
}

/// The engine that owns an object with these labels, annotations and field managers, if one
/// does. Argo CD: its tracking annotation (when it names this very object, `this`, as
/// [`tracked_as`] spells it: Argo CD ignores an id copied onto another object) or label, or its
/// controller as a field manager. Flux: the kustomize- or helm-controller's labels or field
/// managers. Helm: `managed-by: Helm` with its release annotation, or `helm` as a field
/// manager.
pub fn owner_of(
    this: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    managers: &[String],
) -> Option<Owner> {
    let label = |k: &str| labels.get(k).filter(|v| !v.is_empty());
    if let Some((application, object)) = annotations
        .get("argocd.argoproj.io/tracking-id")
        .and_then(|id| id.split_once(':'))
    {
        // `<application>:<group>/<kind>:<namespace>/<name>`
        if object == this {
            return Some(Owner::ArgoCd {
                application: application.to_string(),
            });
        }
    }
    if let Some(app) = label("argocd.argoproj.io/instance") {
        return Some(Owner::ArgoCd {
            application: app.clone(),
        });
    }
    for (prefix, kind) in [
        ("kustomize.toolkit.fluxcd.io", "Kustomization"),
        ("helm.toolkit.fluxcd.io", "HelmRelease"),
    ] {
        if let Some(name) = label(&format!("{prefix}/name")) {
            let name = match label(&format!("{prefix}/namespace")) {
                Some(ns) => format!("{ns}/{name}"),
                None => name.clone(),
            };
            return Some(Owner::Flux { kind, name });
        }
    }
    if labels
        .get("app.kubernetes.io/managed-by")
        .map(String::as_str)
        == Some("Helm")
    {
        if let Some(release) = annotations.get("meta.helm.sh/release-name") {
            return Some(Owner::Helm {
                release: release.clone(),
            });
        }
    }
    let manager = |m: &str| managers.iter().any(|x| x == m);
    if manager("argocd-controller") {
        return Some(Owner::ArgoCd {
            application: "(unnamed)".into(),
        });
    }
    if manager("kustomize-controller") {
        return Some(Owner::Flux {
            kind: "Kustomization",
            name: "(unnamed)".into(),
        });
    }
    if manager("helm-controller") {
        return Some(Owner::Flux {
            kind: "HelmRelease",
            name: "(unnamed)".into(),
        });
    }
    if manager("helm") {
        return Some(Owner::Helm {
            release: "(unnamed)".into(),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Labels, annotations, field managers, and the owner they mean.
    type Case = (
        BTreeMap<String, String>,
        BTreeMap<String, String>,
        Vec<String>,
        Option<&'static str>,
    );

    #[test]
    fn each_engine_is_recognised_by_its_own_marks() {
        let table: Vec<Case> = vec![
            (
                map(&[]),
                map(&[(
                    "argocd.argoproj.io/tracking-id",
                    "shop-prod:apps/Deployment:prod/web",
                )]),
                vec![],
                Some("Argo CD application shop-prod"),
            ),
            (
                map(&[("argocd.argoproj.io/instance", "shop-prod")]),
                map(&[]),
                vec![],
                Some("Argo CD application shop-prod"),
            ),
            (
                map(&[
                    ("kustomize.toolkit.fluxcd.io/name", "apps"),
                    ("kustomize.toolkit.fluxcd.io/namespace", "flux-system"),
                ]),
                map(&[]),
                vec![],
                Some("Flux Kustomization flux-system/apps"),
            ),
            (
                map(&[("helm.toolkit.fluxcd.io/name", "web")]),
                map(&[]),
                vec![],
                Some("Flux HelmRelease web"),
            ),
            (
                map(&[("app.kubernetes.io/managed-by", "Helm")]),
                map(&[("meta.helm.sh/release-name", "web")]),
                vec![],
                Some("Helm release web"),
            ),
            (
                map(&[]),
                map(&[]),
                vec!["argocd-controller".into()],
                Some("Argo CD application (unnamed)"),
            ),
            // kubectl, depwatch itself and plain labels are nobody's engine.
            (
                map(&[("app", "web"), ("app.kubernetes.io/instance", "web")]),
                map(&[("deployment.kubernetes.io/revision", "3")]),
                vec!["kubectl-client-side-apply".into(), "depwatch".into()],
                None,
            ),
            // managed-by Helm without a release annotation is only a label.
            (
                map(&[("app.kubernetes.io/managed-by", "Helm")]),
                map(&[]),
                vec![],
                None,
            ),
            // Helm's own field manager says Helm wrote the object.
            (
                map(&[]),
                map(&[]),
                vec!["helm".into()],
                Some("Helm release (unnamed)"),
            ),
            // A tracking id naming another object (copied with a manifest) is ignored, as
            // Argo CD ignores it.
            (
                map(&[]),
                map(&[(
                    "argocd.argoproj.io/tracking-id",
                    "shop-prod:apps/Deployment:prod/api",
                )]),
                vec![],
                None,
            ),
            (
                map(&[]),
                map(&[(
                    "argocd.argoproj.io/tracking-id",
                    "shop-prod:apps/StatefulSet:prod/web",
                )]),
                vec![],
                None,
            ),
        ];
        let this = tracked_as("apps/v1", "Deployment", "prod", "web");
        assert_eq!(this, "apps/Deployment:prod/web");
        assert_eq!(
            tracked_as("v1", "ConfigMap", "prod", "c"),
            "/ConfigMap:prod/c"
        );
        for (labels, annotations, managers, want) in table {
            assert_eq!(
                owner_of(&this, &labels, &annotations, &managers).map(|o| o.to_string()),
                want.map(String::from),
                "{labels:?} {annotations:?} {managers:?}"
            );
        }
    }
}
