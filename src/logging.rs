//! What the log filter never lets through by default: the AWS SDK's and the HTTP and TLS
//! stack's debug and trace events. They carry whole requests and answers (GetAuthorizationToken's
//! answer is the ECR token itself), so they stay at `info` whatever `RUST_LOG` asks, unless
//! `DEPWATCH_LOG_AWS_WIRE=1` lets them through for a person debugging the SDK.

use std::ffi::OsStr;

use tracing_subscriber::filter::{LevelFilter, Targets};

/// The variable that lets the wire logs through.
pub const AWS_WIRE_VAR: &str = "DEPWATCH_LOG_AWS_WIRE";

/// Target prefixes of the wire logs (a prefix holds every module and crate that starts with it:
/// `aws_sdk_` is `aws_sdk_ecr`, `hyper` is `hyper_util` too).
pub const WIRE_TARGETS: [&str; 11] = [
    "aws_config",
    "aws_credential_types",
    "aws_runtime",
    "aws_sdk_",
    "aws_sigv4",
    "aws_smithy_",
    "aws_types",
    "h2",
    "hyper",
    "rustls",
    "tokio_rustls",
];

/// The most the wire targets log unless asked for.
const WIRE_CAP: LevelFilter = LevelFilter::INFO;

/// Whether the variable's value asks for the wire logs: `1` or `true`, nothing else.
pub fn aws_wire_wanted(value: Option<&OsStr>) -> bool {
    value
        .and_then(OsStr::to_str)
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// The filter that caps the wire targets, to stack on top of `RUST_LOG`'s (both must let an
/// event through); `None` when the wire logs are wanted.
pub fn wire_cap(wanted: bool) -> Option<Targets> {
    let all = Targets::new().with_default(LevelFilter::TRACE);
    (!wanted).then(|| {
        WIRE_TARGETS
            .iter()
            .fold(all, |t, target| t.with_target(*target, WIRE_CAP))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn only_1_or_true_lets_the_wire_logs_through() {
        for (value, wanted) in [
            (None, false),
            (Some(""), false),
            (Some("0"), false),
            (Some("yes"), false),
            (Some("1"), true),
            (Some("true"), true),
            (Some("TRUE"), true),
        ] {
            assert_eq!(aws_wire_wanted(value.map(OsStr::new)), wanted, "{value:?}");
        }
    }

    #[test]
    fn the_wire_targets_stay_at_info_unless_wanted() {
        let capped = wire_cap(false).expect("a cap");
        for (target, level, through) in [
            (
                "aws_smithy_runtime::client::orchestrator",
                Level::TRACE,
                false,
            ),
            (
                "aws_smithy_runtime::client::orchestrator",
                Level::DEBUG,
                false,
            ),
            (
                "aws_smithy_runtime::client::orchestrator",
                Level::INFO,
                true,
            ),
            ("aws_smithy_http_client::hyper_legacy", Level::TRACE, false),
            ("aws_sdk_ecr::operation", Level::DEBUG, false),
            ("aws_config::imds", Level::DEBUG, false),
            ("aws_sigv4::http_request", Level::TRACE, false),
            ("hyper_util::client::legacy", Level::TRACE, false),
            ("h2::codec", Level::TRACE, false),
            ("rustls::client::hs", Level::DEBUG, false),
            ("rustls::client::hs", Level::WARN, true),
            ("depwatch::registry::ecr::keeper", Level::TRACE, true),
            ("kube_client::client", Level::TRACE, true),
            ("reqwest::connect", Level::TRACE, true),
        ] {
            assert_eq!(
                capped.would_enable(target, &level),
                through,
                "{target} at {level}"
            );
        }
        assert!(wire_cap(true).is_none());
    }
}
