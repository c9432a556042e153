//! What an operator can do about a service that is not healthy: one short line per state, the
//! same on the status page, in `depwatch status -o wide` and in the API. Pure: decided from the
//! record alone.

use crate::domain::{ServiceKey, ServiceStatus, Shown, WorkloadKind};

/// What the record says about a service, as far as advice needs it.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub key: &'a ServiceKey,
    /// The kind of workload the service is.
    pub kind: WorkloadKind,
    pub status: ServiceStatus,
    pub suspended: bool,
    /// The version the file asks for failed and is pinned.
    pub pinned: bool,
    /// The failure reason or other message.
    pub message: &'a str,
}

/// Whether a message says the API server refused depwatch's identity the right to act.
fn forbidden(message: &str) -> bool {
    // Kubernetes says "… is forbidden: User … cannot patch resource …" (403) and
    // "Unauthorized" (401); a bare number could be part of an image tag.
    let m = message.to_ascii_lowercase();
    m.contains("forbidden") || m.contains("unauthorized")
}

/// Whether a message says the workload or namespace does not exist.
fn missing(message: &str) -> bool {
    let kinds = ["Deployment", "StatefulSet", "DaemonSet", "CronJob"];
    kinds
        .iter()
        .any(|k| message.starts_with(&format!("no {k}")))
        || message.contains("no namespace")
        || namespace_missing(message)
}

/// Whether a message says the namespace does not exist.
fn namespace_missing(message: &str) -> bool {
    message.starts_with("namespace ") && message.contains(" does not exist")
}

/// The name a "did you mean X?" in a message suggests.
fn suggested(message: &str) -> Option<&str> {
    let (_, rest) = message.split_once("(did you mean ")?;
    rest.split_once("?)").map(|(name, _)| name)
}

/// What to do about a file whose name names no workload or no namespace: the file's name is
/// what names them, so the fix is a rename (then `forget` drops the old name from the record),
/// or creating what it names.
fn misnamed(s: &Situation<'_>) -> String {
    let key = s.key;
    let forget = format!("then run `depwatch forget {key}` to drop the old name from the record");
    let renamed = suggested(s.message).and_then(|name| match namespace_missing(s.message) {
        true => ServiceKey::new(&key.name, name).ok(),
        false => ServiceKey::new(name, &key.namespace).ok(),
    });
    match renamed {
        Some(to) => format!(
            "rename the file to {} (a file's name names the workload and its namespace), {forget}",
            to.file_name()
        ),
        None => format!(
            "create the {} {} in namespace {}, or rename the file after the workload it deploys and {forget}",
            s.kind.api_kind(),
            key.name,
            key.namespace
        ),
    }
}

/// What to do about a deploy nothing could verify, by its reason.
fn unverified(s: &Situation<'_>) -> Option<String> {
    let (key, shown) = (s.key, Shown(s.kind, &s.key.name));
    Some(match s.kind {
        WorkloadKind::CronJob => return None,
        _ if s.message.contains("OnDelete") => format!(
            "delete {shown}'s pods in {} (one at a time) to run the new images: its updateStrategy is OnDelete",
            key.namespace
        ),
        WorkloadKind::DaemonSet => format!(
            "no node runs daemonset/{} in {}: check its nodeSelector and tolerations",
            key.name, key.namespace
        ),
        _ => format!(
            "scale {shown} in {} above 0 replicas so a rollout can prove the images",
            key.namespace
        ),
    })
}

/// The commands depwatch's own CLI takes that read or change the record.
const RECORD_COMMANDS: &[&str] = &[
    "retry", "rollback", "suspend", "resume", "forget", "status", "history",
];

/// Advice whose `depwatch …` commands carry `flags` (` --state-dir /tmp/demo/state` for a
/// daemon whose record is not where the CLI looks by default), so they work as printed.
pub fn with_flags(advice: &str, flags: &str) -> String {
    if flags.is_empty() {
        return advice.to_string();
    }
    let mut out = String::with_capacity(advice.len() + flags.len());
    for (i, part) in advice.split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        out.push_str(part);
        let record_command = part
            .strip_prefix("depwatch ")
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|verb| RECORD_COMMANDS.contains(&verb));
        // Odd parts are inside backticks.
        if i % 2 == 1 && record_command {
            out.push_str(flags);
        }
    }
    out
}

/// The next step for a service, or `None` when it is healthy or a deploy is under way.
pub fn next_step(s: Situation<'_>) -> Option<String> {
    let key = s.key;
    if s.suspended {
        return Some(format!(
            "file changes are not deployed: run `depwatch resume {key}` to deploy them again"
        ));
    }
    if forbidden(s.message) {
        return Some(format!(
            "check depwatch's RBAC in namespace {} (get, list, watch, patch {}s), then run `depwatch retry {key}`",
            key.namespace, s.kind
        ));
    }
    let retry = format!("`depwatch retry {key}`");
    Some(match s.status {
        ServiceStatus::Pending
        | ServiceStatus::Deploying
        | ServiceStatus::Verifying
        | ServiceStatus::Retry
        | ServiceStatus::Succeeded
        | ServiceStatus::Applied
        | ServiceStatus::Unmanaged => return None,
        ServiceStatus::AwaitingApproval => format!(
            "an approver runs `depwatch approve {key}` (or POST /api/v1/services/{}/{}/approve); `depwatch reject {key}` refuses it",
            key.namespace, key.name
        ),
        ServiceStatus::Rejected => {
            "nothing was deployed; save a newer version to ask for approval again".into()
        }
        ServiceStatus::Held => format!(
            "it is deployed by itself when the window opens or the FREEZE file is removed; `depwatch deploy {key} --now --reason \"…\"` deploys it now (break-glass)"
        ),
        ServiceStatus::Missing => format!(
            "the {} was deleted outside depwatch: recreate it and depwatch deploys the file's version to it by itself, or delete the file to stop managing it",
            s.kind.api_kind()
        ),
        ServiceStatus::WaitingForApi => {
            "depwatch keeps retrying on its own: check that the Kubernetes API server is up and reachable (see /readyz)".into()
        }
        ServiceStatus::Unverified => return unverified(&s),
        ServiceStatus::Failed if missing(s.message) => misnamed(&s),
        ServiceStatus::Failed if !s.pinned => {
            format!("fix the cause above, then re-save the file or run {retry}")
        }
        ServiceStatus::Failed | ServiceStatus::TimedOut | ServiceStatus::RolledBack => format!(
            "the version is pinned: write a fixed version into the file, or run {retry} to try it again"
        ),
        ServiceStatus::RollbackFailed => format!(
            "the {} is not healthy: check `kubectl rollout status {} -n {}`, then run `depwatch rollback {key}`",
            s.kind.api_kind(), Shown(s.kind, &key.name), key.namespace
        ),
        ServiceStatus::Drifted => format!(
            "someone changed the images outside depwatch: run {retry} to deploy the file's images again, or write the running image into the file to keep it"
        ),
        ServiceStatus::Invalid => {
            "fix the file (`depwatch check` lists every problem with its line)".into()
        }
        ServiceStatus::Unreadable => {
            "make the file a regular, readable file inside the directory, within --max-file-size".into()
        }
        ServiceStatus::Paused => format!(
            "run `kubectl rollout resume deployment/{} -n {}`, then {retry}",
            key.name, key.namespace
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advice(status: ServiceStatus, suspended: bool, pinned: bool, message: &str) -> String {
        let key = ServiceKey::new("web", "prod").expect("key");
        next_step(Situation {
            key: &key,
            kind: WorkloadKind::Deployment,
            status,
            suspended,
            pinned,
            message,
        })
        .unwrap_or_default()
    }

    #[test]
    fn commands_carry_the_flags_that_make_them_work_as_printed() {
        let flags = " --state-dir /tmp/demo/state";
        let table = [
            (
                "run `depwatch retry demo/api` to try it again",
                "run `depwatch retry demo/api --state-dir /tmp/demo/state` to try it again",
            ),
            (
                "`kubectl rollout resume deployment/web -n prod`, then `depwatch retry prod/web`",
                "`kubectl rollout resume deployment/web -n prod`, then `depwatch retry prod/web --state-dir /tmp/demo/state`",
            ),
            ("fix the file (`depwatch check` lists every problem)", "fix the file (`depwatch check` lists every problem)"),
            ("no command here", "no command here"),
        ];
        for (advice, want) in table {
            assert_eq!(with_flags(advice, flags), want, "{advice}");
            assert_eq!(with_flags(advice, ""), advice);
        }
    }

    #[test]
    fn every_unhealthy_state_says_what_to_do_and_healthy_ones_say_nothing() {
        use ServiceStatus as S;
        let table: &[(ServiceStatus, bool, bool, &str, &str)] = &[
            (S::Succeeded, false, false, "", ""),
            (S::Deploying, false, false, "", ""),
            (S::Verifying, false, false, "rollout healthy; verifying 1 check for 5m", ""),
            (S::Pending, false, false, "", ""),
            (S::Retry, false, false, "", ""),
            (S::Unmanaged, false, false, "", ""),
            (S::Held, false, false, "held: frozen by deps/FREEZE: sale", "when the window opens or the FREEZE file is removed"),
            (S::AwaitingApproval, false, false, "awaiting approval (0 of 2), asked by ci", "`depwatch approve prod/web` (or POST /api/v1/services/prod/web/approve)"),
            (S::Rejected, false, false, "rejected by alice: not today", "save a newer version to ask for approval again"),
            (S::Applied, false, false, "", ""),
            (S::Missing, false, false, "", "recreate it"),
            (S::Succeeded, true, false, "", "depwatch resume prod/web"),
            (
                S::WaitingForApi,
                false,
                false,
                "connection refused",
                "/readyz",
            ),
            (S::Unverified, false, false, "", "above 0 replicas"),
            (
                S::Failed,
                false,
                false,
                "no Deployment web in namespace prod",
                "create the Deployment web in namespace prod, or rename the file",
            ),
            (
                S::Failed,
                false,
                false,
                "no Deployment, StatefulSet, DaemonSet or CronJob named web in namespace prod (did you mean wbe?)",
                "rename the file to wbe_prod.dep (a file's name names the workload and its namespace), then run `depwatch forget prod/web`",
            ),
            (
                S::Failed,
                false,
                false,
                "namespace prod does not exist (did you mean prd?); depwatch never creates namespaces",
                "rename the file to web_prd.dep",
            ),
            (
                S::Failed,
                false,
                false,
                "deployments.apps \"web\" is forbidden",
                "RBAC",
            ),
            (S::Failed, false, true, "ImagePullBackOff", "pinned"),
            (
                S::RolledBack,
                false,
                true,
                "ImagePullBackOff: example.com/web:1.403",
                "pinned",
            ),
            (S::WaitingForApi, false, false, "Unauthorized", "RBAC"),
            (
                S::Failed,
                false,
                false,
                "resolving containers",
                "depwatch retry prod/web",
            ),
            (S::TimedOut, false, true, "", "pinned"),
            (S::RolledBack, false, true, "", "depwatch retry prod/web"),
            (
                S::RollbackFailed,
                false,
                false,
                "",
                "depwatch rollback prod/web",
            ),
            (
                S::Drifted,
                false,
                false,
                "",
                "to deploy the file's images again",
            ),
            (S::Invalid, false, false, "", "depwatch check"),
            (S::Unreadable, false, false, "", "readable"),
            (
                S::Paused,
                false,
                false,
                "Deployment is paused",
                "kubectl rollout resume deployment/web -n prod",
            ),
        ];
        let db = ServiceKey::new("db", "prod").expect("key");
        let of_kind = |kind, message| {
            next_step(Situation {
                key: &db,
                kind,
                status: ServiceStatus::Unverified,
                suspended: false,
                pinned: false,
                message,
            })
        };
        let on_delete = of_kind(
            WorkloadKind::StatefulSet,
            "patched; pods update when deleted (updateStrategy OnDelete)",
        );
        assert!(on_delete.is_some_and(|a| a.contains("delete statefulset/db's pods")));
        let no_nodes = of_kind(WorkloadKind::DaemonSet, "0 nodes scheduled");
        assert!(no_nodes.is_some_and(|a| a.contains("nodeSelector")));
        assert_eq!(of_kind(WorkloadKind::CronJob, "applied"), None);
        for (status, suspended, pinned, message, want) in table {
            let got = advice(*status, *suspended, *pinned, message);
            if want.is_empty() {
                assert!(got.is_empty(), "{status}: {got}");
            } else {
                assert!(got.contains(want), "{status} {message:?}: {got}");
            }
        }
        // Every status is covered by the table.
        for status in ServiceStatus::ALL {
            assert!(
                table.iter().any(|(s, ..)| s == status),
                "{status} has no row"
            );
        }
    }
}
