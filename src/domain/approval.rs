//! Approvals: whether a save that needs a second pair of eyes may go. A save is *requested*
//! (a row naming who asked and when), then approvers approve or reject it; past its timeout
//! without enough approvals it is rejected. Every word binds to the content it was given for
//! (the file's hash, which names the exact images), and only the words since the latest
//! request of that content count: a newer save, even one going back to older content, starts
//! afresh. Pure: decided from the rows and the time alone.

use std::time::Duration;

use jiff::Timestamp;

use super::{Images, VoteKind};

/// How many distinct approvers a save needs, and for how long it waits for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    pub approvals: u32,
    /// How long a save waits; [`DEFAULT_TIMEOUT`] when no rule or file says.
    pub timeout: Option<Duration>,
}

/// The default time a save waits for its approvals.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The longest wait a policy may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
/// The most approvers a policy may ask for.
pub const MAX_APPROVALS: u32 = 10;

impl Needs {
    /// Both asked together (the policy's rules and the file's own): the stricter of each.
    pub fn stricter(self, other: Needs) -> Needs {
        Needs {
            approvals: self.approvals.max(other.approvals),
            timeout: match (self.timeout, other.timeout) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// How long a save waits for its approvals.
    pub fn wait(self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
}

/// One row of the record's `approvals` table: a request, an approver's word, or the mark
/// that a rejection was recorded in the history.
#[derive(
    Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Vote {
    /// The content hash of the save the word is for.
    pub hash: String,
    /// What that save asks, in its own words (`1.4.2`, `web=…, envoy=…`).
    pub images: String,
    /// The digests the registry named for its images when it was requested (container →
    /// digest), when the pre-flight knew them: what an approver approved.
    #[serde(default)]
    pub digests: String,
    pub kind: VoteKind,
    /// Who: the requester of a request, the approver of a word (an API token's name or a
    /// Unix user), `depwatch` for a mark.
    pub actor: String,
    pub comment: String,
    /// RFC 3339.
    pub at: String,
}

/// Where a save stands with its approvers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// No request of this content is recorded yet: it is requested now.
    Unrequested,
    /// Enough distinct approvers said yes.
    Approved { by: Vec<String> },
    /// Waiting: who approved so far, how many are needed, who asked, and until when.
    Awaiting {
        by: Vec<String>,
        need: u32,
        requester: String,
        until: Timestamp,
    },
    /// An approver said no, or the wait ran out; `recorded` once the history says so.
    Rejected {
        by: String,
        why: String,
        recorded: bool,
    },
}

/// The request and the words given since for `hash`: the latest request of that content and
/// every row after it (`votes` oldest first).
fn since_request<'v>(hash: &str, votes: &'v [Vote]) -> Option<(&'v Vote, &'v [Vote])> {
    let at = votes
        .iter()
        .rposition(|v| v.hash == hash && v.kind == VoteKind::Request)?;
    Some((&votes[at], &votes[at + 1..]))
}

/// The request of the save of `hash` as it stands (who asked, and when), if it was requested.
pub fn request<'v>(hash: &str, votes: &'v [Vote]) -> Option<&'v Vote> {
    since_request(hash, votes).map(|(r, _)| r)
}

/// Who asked for the save of `hash` as it stands, if it was requested.
pub fn requester<'v>(hash: &str, votes: &'v [Vote]) -> Option<&'v str> {
    request(hash, votes).map(|r| r.actor.as_str())
}

/// Whether `actor` already said `kind` of the save of `hash` as it stands.
pub fn said(hash: &str, votes: &[Vote], actor: &str, kind: VoteKind) -> bool {
    since_request(hash, votes).is_some_and(|(_, after)| {
        after
            .iter()
            .any(|v| v.hash == hash && v.kind == kind && v.actor == actor)
    })
}

/// The digests the pre-flight found for the save of `hash` as it stands (a `Resolved` row
/// after its latest request), when it found any.
pub fn resolved<'v>(hash: &str, votes: &'v [Vote]) -> Option<&'v str> {
    let (_, after) = since_request(hash, votes)?;
    after
        .iter()
        .rev()
        .find(|v| v.hash == hash && v.kind == VoteKind::Resolved && !v.digests.is_empty())
        .map(|v| v.digests.as_str())
}

/// A value the registry proved (`sha256:…`), not a note that it could not check.
fn is_digest(s: &str) -> bool {
    s.starts_with("sha256:") || s.starts_with("sha512:")
}

/// Why the images found now are not those approved, if they are not: each container whose
/// digest both sides know and that differs. A container either side could not check (a
/// registry down) is not a difference; the deploy goes as the pre-flight's mode says.
pub fn moved(approved: &Images, found: &Images) -> Option<String> {
    let moved: Vec<String> = approved
        .iter()
        .filter_map(|(container, was)| {
            let now = found.get(container)?;
            (is_digest(was) && is_digest(now) && was != now).then(|| {
                format!("{container} was {was} when approved, the registry now says {now}")
            })
        })
        .collect();
    (!moved.is_empty()).then(|| {
        format!(
            "the images changed since they were approved ({}): nothing patched; change the file (or name the digest) to ask for approval of what it names now",
            moved.join("; ")
        )
    })
}

/// Decide where the save of `hash` stands under `needs` at `now`.
pub fn standing(needs: Needs, hash: &str, votes: &[Vote], now: Timestamp) -> Standing {
    let Some((request, after)) = since_request(hash, votes) else {
        return Standing::Unrequested;
    };
    let after: Vec<&Vote> = after.iter().filter(|v| v.hash == hash).collect();
    let recorded = after.iter().any(|v| v.kind == VoteKind::Recorded);
    // Anyone may say no, the requester too (a withdrawal); the requester's own yes never
    // counts (the commands refuse it; a row written by another hand is not trusted either).
    if let Some(no) = after.iter().find(|v| v.kind == VoteKind::Reject) {
        let why = match no.comment.is_empty() {
            true => format!("rejected by {}", no.actor),
            false => format!("rejected by {}: {}", no.actor, no.comment),
        };
        return Standing::Rejected {
            by: no.actor.clone(),
            why,
            recorded,
        };
    }
    let mut by: Vec<String> = Vec::new();
    let others = after.iter().filter(|v| v.actor != request.actor);
    for v in others.filter(|v| v.kind == VoteKind::Approve) {
        if !by.contains(&v.actor) {
            by.push(v.actor.clone());
        }
    }
    if by.len() as u32 >= needs.approvals {
        return Standing::Approved { by };
    }
    let asked: Timestamp = request.at.parse().unwrap_or(now);
    let until = asked
        .checked_add(
            jiff::SignedDuration::try_from(needs.wait()).unwrap_or(jiff::SignedDuration::MAX),
        )
        .unwrap_or(Timestamp::MAX);
    if now >= until || recorded {
        let so_far = match by.is_empty() {
            true => "none".to_string(),
            false => by.join(", "),
        };
        return Standing::Rejected {
            by: "depwatch".into(),
            why: format!(
                "not approved within {} ({} of {} approvals: {so_far})",
                humantime::format_duration(needs.wait()),
                by.len(),
                needs.approvals
            ),
            recorded,
        };
    }
    Standing::Awaiting {
        by,
        need: needs.approvals,
        requester: request.actor.clone(),
        until,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-12-06T10:00:00Z";

    fn vote(hash: &str, kind: VoteKind, actor: &str, at: &str) -> Vote {
        Vote {
            hash: hash.into(),
            kind,
            actor: actor.into(),
            at: at.into(),
            ..Vote::default()
        }
    }

    fn needs(n: u32) -> Needs {
        Needs {
            approvals: n,
            timeout: Some(Duration::from_secs(3600)),
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn a_save_is_requested_approved_by_distinct_others_rejected_or_timed_out() {
        use VoteKind::*;
        let req = |h| vote(h, Request, "ci", T0);
        let yes = |h, who| vote(h, Approve, who, "2026-12-06T10:05:00Z");
        let no = |h, who| vote(h, Reject, who, "2026-12-06T10:05:00Z");
        let soon = at("2026-12-06T10:10:00Z");
        let late = at("2026-12-06T11:00:00Z");
        let until = at("2026-12-06T11:00:00Z");
        let awaiting = |by: &[&str]| Standing::Awaiting {
            by: by.iter().map(|s| s.to_string()).collect(),
            need: 2,
            requester: "ci".into(),
            until,
        };
        let approved = |by: &[&str]| Standing::Approved {
            by: by.iter().map(|s| s.to_string()).collect(),
        };
        let cases: Vec<(&str, Vec<Vote>, Timestamp, Standing)> = vec![
            ("nothing recorded", vec![], soon, Standing::Unrequested),
            (
                "another content's request",
                vec![req("b")],
                soon,
                Standing::Unrequested,
            ),
            ("requested", vec![req("a")], soon, awaiting(&[])),
            (
                "one of two",
                vec![req("a"), yes("a", "alice")],
                soon,
                awaiting(&["alice"]),
            ),
            (
                "the same approver twice counts once",
                vec![req("a"), yes("a", "alice"), yes("a", "alice")],
                soon,
                awaiting(&["alice"]),
            ),
            (
                "the requester's own word never counts",
                vec![req("a"), yes("a", "ci"), yes("a", "alice")],
                soon,
                awaiting(&["alice"]),
            ),
            (
                "two distinct approvers",
                vec![req("a"), yes("a", "alice"), yes("a", "bob")],
                soon,
                approved(&["alice", "bob"]),
            ),
            (
                "approvals of another content do not count",
                vec![req("a"), yes("b", "alice"), yes("a", "bob")],
                soon,
                awaiting(&["bob"]),
            ),
            (
                "a newer request of the same content voids the words before it",
                vec![
                    req("a"),
                    yes("a", "alice"),
                    yes("a", "bob"),
                    req("b"),
                    req("a"),
                ],
                soon,
                awaiting(&[]),
            ),
            (
                "approved in time stays approved after the timeout",
                vec![req("a"), yes("a", "alice"), yes("a", "bob")],
                late,
                approved(&["alice", "bob"]),
            ),
            (
                "rejected",
                vec![
                    req("a"),
                    yes("a", "alice"),
                    Vote {
                        comment: "not on a Friday".into(),
                        ..no("a", "bob")
                    },
                ],
                soon,
                Standing::Rejected {
                    by: "bob".into(),
                    why: "rejected by bob: not on a Friday".into(),
                    recorded: false,
                },
            ),
            (
                "a rejection outweighs approvals",
                vec![
                    req("a"),
                    no("a", "carol"),
                    yes("a", "alice"),
                    yes("a", "bob"),
                ],
                soon,
                Standing::Rejected {
                    by: "carol".into(),
                    why: "rejected by carol".into(),
                    recorded: false,
                },
            ),
            (
                "the requester may withdraw it",
                vec![req("a"), no("a", "ci")],
                soon,
                Standing::Rejected {
                    by: "ci".into(),
                    why: "rejected by ci".into(),
                    recorded: false,
                },
            ),
            (
                "timed out",
                vec![req("a"), yes("a", "alice")],
                late,
                Standing::Rejected {
                    by: "depwatch".into(),
                    why: "not approved within 1h (1 of 2 approvals: alice)".into(),
                    recorded: false,
                },
            ),
            (
                "timed out and recorded",
                vec![
                    req("a"),
                    vote("a", Recorded, "depwatch", "2026-12-06T11:00:00Z"),
                ],
                late,
                Standing::Rejected {
                    by: "depwatch".into(),
                    why: "not approved within 1h (0 of 2 approvals: none)".into(),
                    recorded: true,
                },
            ),
        ];
        for (name, votes, now, want) in cases {
            assert_eq!(standing(needs(2), "a", &votes, now), want, "{name}");
        }
    }

    #[test]
    fn approved_digests_must_still_be_found_where_both_sides_know_them() {
        let images = |s: &str| Images::parse(s);
        let approved = images("web=sha256:aaa, envoy=sha256:eee");
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("same", "web=sha256:aaa, envoy=sha256:eee", None),
            (
                "a container moved",
                "web=sha256:bbb, envoy=sha256:eee",
                Some("web was sha256:aaa when approved, the registry now says sha256:bbb"),
            ),
            ("not checked now", "web=not checked, envoy=sha256:eee", None),
            ("no longer changed", "envoy=sha256:eee", None),
        ];
        for (name, found, want) in cases {
            let got = moved(&approved, &images(found));
            match want {
                None => assert_eq!(got, None, "{name}"),
                Some(w) => assert!(
                    got.as_deref()
                        .is_some_and(|g| g.contains(w) && g.contains("nothing patched")),
                    "{name}: {got:?}"
                ),
            }
        }
        assert_eq!(
            moved(&images("web=not checked"), &images("web=sha256:bbb")),
            None
        );
        // The digests of the save as it stands: after its latest request only.
        let mut r = vote("a", VoteKind::Resolved, "depwatch", T0);
        r.digests = "web=sha256:aaa".into();
        let req = vote("a", VoteKind::Request, "ci", T0);
        assert_eq!(
            resolved("a", &[req.clone(), r.clone()]),
            Some("web=sha256:aaa")
        );
        assert_eq!(resolved("a", &[r.clone(), req.clone()]), None);
        assert_eq!(
            resolved("a", &[req, vote("a", VoteKind::Resolved, "depwatch", T0)]),
            None
        );
    }

    #[test]
    fn the_requester_is_that_of_the_latest_request_and_needs_merge_the_strict_way() {
        let votes = vec![
            vote("a", VoteKind::Request, "ci", T0),
            vote("a", VoteKind::Request, "bob", T0),
        ];
        assert_eq!(requester("a", &votes), Some("bob"));
        assert_eq!(requester("b", &votes), None);
        let mut words = votes.clone();
        words.push(vote("a", VoteKind::Approve, "alice", T0));
        assert!(said("a", &words, "alice", VoteKind::Approve));
        assert!(!said("a", &words, "alice", VoteKind::Reject));
        words.push(vote("a", VoteKind::Request, "ci", T0));
        assert!(
            !said("a", &words, "alice", VoteKind::Approve),
            "a newer request voids it"
        );
        let needs = |approvals, hours: Option<u64>| Needs {
            approvals,
            timeout: hours.map(|h| Duration::from_secs(h * 3600)),
        };
        assert_eq!(
            needs(1, Some(1)).stricter(needs(2, Some(2))),
            needs(2, Some(1))
        );
        // A file that names no wait keeps the policy's (the default does not shorten it).
        assert_eq!(
            needs(1, Some(72)).stricter(needs(2, None)),
            needs(2, Some(72))
        );
        assert_eq!(
            needs(0, None).stricter(needs(1, None)).wait(),
            DEFAULT_TIMEOUT
        );
    }
}
