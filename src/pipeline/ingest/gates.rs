//! What a new desired version passes before it is handed to the queue: its approvers (when
//! the policy or its file asks for them), then its deploy windows and any `FREEZE` above it.
//! The decisions are pure (`domain::approval::standing`, `domain::window::decide`); this is
//! their driver: it reads and writes the record and tells the team.

use std::path::Path;

use super::{break_glass, Ingest, PolicyState};
use crate::alert::Notice;
use crate::domain::approval::{self, Needs, Standing, Vote};
use crate::domain::window::Gate;
use crate::domain::{
    Asker, DepSpec, DeployOutcome, Images, ServiceKey, ServiceStatus, Trigger, VoteKind,
};
use crate::pipeline::deploy::recorder::verdict;
use crate::safefs;
use crate::store::{self, OrLog, ServiceRecord};

/// A save on its way to the queue, as the gates see it.
pub(super) struct Save<'a> {
    pub key: &'a ServiceKey,
    pub path: &'a Path,
    pub record: &'a ServiceRecord,
    pub spec: &'a DepSpec,
    pub hash: &'a str,
    pub asker: Option<&'a Asker>,
    pub trigger: Trigger,
}

/// Whether a save goes on, and the words its deploy's actor gains when it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Passed {
    /// On to the queue; `notes` are added to the actor ("approved by alice, bob"), and an
    /// operator's break-glass release makes it the operator's deploy.
    Go {
        notes: Vec<String>,
        released_by: Option<String>,
        /// The digests its approvers approved, when the pre-flight knew them.
        digests: Option<Images>,
    },
    /// Not now: the row says why, and a timer, an approver or a lifted freeze brings it back.
    Stop,
}

impl Ingest {
    /// The approvals a save needs: the policy's rules for its namespace and its file's own,
    /// the stricter of each; `None` when none are needed.
    fn needs(&self, key: &ServiceKey, spec: &DepSpec) -> Option<Needs> {
        let needs = match &self.policy {
            PolicyState::Valid { policy, .. } => policy.approvals(&key.namespace, spec.approvals),
            _ => spec.approvals,
        };
        needs.filter(|n| n.approvals > 0)
    }

    /// A save passes its approvers, then its windows; an operator's rollback passes both
    /// (it goes back to a version that ran), as do automatic rollbacks, which never come here.
    pub(super) async fn gates(&mut self, save: Save<'_>) -> Passed {
        if matches!(save.asker, Some(Asker::Rollback { .. })) {
            return Passed::Go {
                notes: Vec::new(),
                released_by: None,
                digests: None,
            };
        }
        let (mut approved, digests) = match self.needs(save.key, save.spec) {
            None => (Vec::new(), None),
            Some(needs) => match self.approvals(&save, needs).await {
                Passed::Go { notes, digests, .. } => (notes, digests),
                Passed::Stop => return Passed::Stop,
            },
        };
        match self.windows(&save).await {
            Passed::Go {
                notes, released_by, ..
            } => {
                approved.extend(notes);
                Passed::Go {
                    notes: approved,
                    released_by,
                    digests,
                }
            }
            Passed::Stop => Passed::Stop,
        }
    }

    /// Who asked for a save: the API token of the request that wrote it, else the Unix user
    /// who owns the file.
    fn requester(save: &Save<'_>) -> String {
        match save.asker {
            Some(Asker::Request { actor, .. }) => actor.clone(),
            _ => safefs::owner_name(save.path).unwrap_or_else(|| "unknown".into()),
        }
    }

    /// Ask the registries for the digests of a save just requested, and record them beside
    /// its request (the approvers approve them; its deploy must find them still).
    fn resolve(&mut self, save: &Save<'_>) {
        while self.resolving.try_join_next().is_some() {}
        let Some(deployer) = self.resolver.clone() else {
            return;
        };
        let (store, key, spec) = (self.store.clone(), save.key.clone(), save.spec.clone());
        let hash = save.hash.to_string();
        self.resolving.spawn(async move {
            let digests = deployer.digests_for(&key, &spec).await;
            if digests.is_empty() {
                return;
            }
            let found = Vote {
                hash,
                images: spec.requested(),
                kind: VoteKind::Resolved,
                actor: "depwatch".into(),
                comment: String::new(),
                at: store::now(),
                digests: digests.to_string(),
            };
            store
                .add_vote(&key, &found)
                .await
                .or_log("record approval digests");
        });
    }

    /// The approvals step: the save is requested (once per save: a newer save, even back to
    /// older content, asks afresh), then goes once enough distinct approvers said yes; an
    /// approver's no, or the end of its wait, rejects it with one history row.
    async fn approvals(&mut self, save: &Save<'_>, needs: Needs) -> Passed {
        let key = save.key;
        let mut votes = match self.store.votes(key).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(service = %key, error = %e, "approvals cannot be read; the save waits until they can");
                return Passed::Stop;
            }
        };
        let now = jiff::Timestamp::now();
        let new_save = save.record.requested_hash != save.hash;
        let unrequested =
            approval::standing(needs, save.hash, &votes, now) == Standing::Unrequested;
        let asked = new_save || unrequested;
        if asked {
            let Some(request) = self.request(save, now).await else {
                return Passed::Stop;
            };
            votes.push(request);
        }
        match approval::standing(needs, save.hash, &votes, now) {
            Standing::Approved { by } => {
                tracing::info!(service = %key, approvers = %by.join(", "), "approved; deploying");
                Passed::Go {
                    notes: vec![format!("approved by {}", by.join(", "))],
                    released_by: None,
                    digests: approval::resolved(save.hash, &votes).map(Images::parse),
                }
            }
            Standing::Awaiting {
                by,
                need,
                requester,
                until,
            } => {
                let message = awaiting_message(key, &by, need, &requester, until);
                self.await_approvers(save, until, message, asked.then_some(&requester))
                    .await;
                Passed::Stop
            }
            Standing::Rejected { why, recorded, .. } => {
                if !recorded {
                    self.record_rejection(save, &votes, &why).await;
                }
                let message = format!("{why}; nothing deployed (a newer save asks again)");
                if save.record.status != ServiceStatus::Rejected || save.record.message != message {
                    self.store
                        .change_service(key, verdict::rejected(message))
                        .await
                        .or_log("change service");
                }
                Passed::Stop
            }
            Standing::Unrequested => Passed::Stop,
        }
    }

    /// Record that a save needs approval (who asks, from now), and ask the registries for its
    /// digests; `None` when the record cannot take it (the save then waits).
    async fn request(&mut self, save: &Save<'_>, now: jiff::Timestamp) -> Option<Vote> {
        let request = Vote {
            hash: save.hash.to_string(),
            images: save.spec.requested(),
            kind: VoteKind::Request,
            actor: Self::requester(save),
            comment: String::new(),
            at: store::timestamp(now),
            digests: String::new(),
        };
        if let Err(e) = self.store.add_vote(save.key, &request).await {
            tracing::warn!(service = %save.key, error = %e, "the approval request cannot be recorded; the save waits until it can");
            return None;
        }
        self.resolve(save);
        Some(request)
    }

    /// A save waits for its approvers: judged again at its deadline, the team told when it
    /// was just asked (`asked_by`), the row saying so.
    async fn await_approvers(
        &mut self,
        save: &Save<'_>,
        until: jiff::Timestamp,
        message: String,
        asked_by: Option<&String>,
    ) {
        let key = save.key;
        self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
        if let Some(requester) = asked_by {
            tracing::info!(service = %key, %requester, "save needs approval before it deploys");
            let how = format!("asked by {requester}; {}", how_to_approve(key));
            self.tell(Notice::Approval, DeployOutcome::InProgress, key, save, how);
        }
        self.recheck_after_deploy(save);
        if save.record.status != ServiceStatus::AwaitingApproval || save.record.message != message {
            self.store
                .change_service(key, verdict::awaiting_approval(message))
                .await
                .or_log("change service");
        }
    }

    /// A rejection goes in the history once: the mark first (so a crash between the two
    /// leaves no second row), then the row, then the message to the team.
    async fn record_rejection(&mut self, save: &Save<'_>, votes: &[Vote], why: &str) {
        let key = save.key;
        let mark = Vote {
            hash: save.hash.to_string(),
            images: save.spec.requested(),
            kind: VoteKind::Recorded,
            actor: "depwatch".into(),
            comment: why.to_string(),
            at: store::now(),
            digests: String::new(),
        };
        if let Err(e) = self.store.add_vote(key, &mark).await {
            tracing::warn!(service = %key, error = %e, "the rejection cannot be recorded yet; tried again at the next rescan");
            return;
        }
        let request = approval::request(save.hash, votes);
        let requester = request.map_or("unknown", |r| r.actor.as_str());
        let asked = request.map_or_else(store::now, |r| r.at.clone());
        let row = verdict::RejectedRow {
            key,
            trigger: save.trigger,
            requester,
            from: &save.record.deployed.to_string(),
            asks: &save.spec.requested(),
            hash: save.hash,
            kind: save.record.kind,
            asked: &asked,
        }
        .record();
        tracing::warn!(service = %key, reason = %why, "save rejected; nothing deployed");
        match self.store.start_deploy(&row).await {
            Ok(id) => self
                .store
                .finish_deploy(id, DeployOutcome::Rejected, why)
                .await
                .or_log("finish deploy"),
            Err(e) => {
                tracing::error!(service = %key, error = %e, "the rejection's history row was not written")
            }
        }
        self.tell(
            Notice::Deploy,
            DeployOutcome::Rejected,
            key,
            save,
            why.to_string(),
        );
    }

    /// Deploy windows and `FREEZE` files: a save that may not go now is held (the newest
    /// wins) and judged again when its window opens or its freeze is lifted. A break-glass
    /// release of this very content passes them.
    async fn windows(&mut self, save: &Save<'_>) -> Passed {
        let (key, record) = (save.key, save.record);
        let released = break_glass(record, save.hash);
        let gate = match released {
            Some(_) => Gate::Open,
            None => self.gate(save.path, &key.namespace, &save.spec.windows),
        };
        if gate != Gate::Open {
            let message = gate.message();
            // Told once per hold (a resync finds the same hold again).
            if record.status != ServiceStatus::Held || record.message != message {
                self.tell(Notice::Held, DeployOutcome::InProgress, key, save, message);
            }
            self.hold(key, &gate).await;
            self.recheck_after_deploy(save);
            return Passed::Stop;
        }
        if record.status == ServiceStatus::Held {
            let why = match released {
                Some(j) => format!("break-glass by {}: {}", j.by, j.reason),
                None => "its window opened, or its freeze was lifted".to_string(),
            };
            self.tell(Notice::Released, DeployOutcome::InProgress, key, save, why);
        }
        if let Some(j) = released {
            tracing::warn!(service = %key, actor = %j.by, reason = %j.reason, "break-glass: deployed past its window or freeze");
        }
        Passed::Go {
            notes: released
                .map(|j| format!("break-glass: {}", j.reason))
                .into_iter()
                .collect(),
            released_by: released.map(|j| j.by.clone()),
            digests: None,
        }
    }

    /// A save stopped here while an older version's deploy is under way keeps the row's
    /// status until that deploy's verdict: the files are judged again shortly, until the
    /// row can say the save waits.
    fn recheck_after_deploy(&mut self, save: &Save<'_>) {
        if save.record.status.in_flight() {
            let soon = jiff::Timestamp::now() + RECHECK;
            self.wake_at = Some(self.wake_at.map_or(soon, |w| w.min(soon)));
        }
    }

    /// A message about a save of `key` (held, released, awaiting approval, rejected).
    fn tell(
        &self,
        notice: Notice,
        outcome: DeployOutcome,
        key: &ServiceKey,
        save: &Save<'_>,
        why: String,
    ) {
        let Some(n) = &self.notifier else {
            return;
        };
        n.report(crate::alert::Report {
            notice,
            outcome,
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            kind: save.record.kind,
            from: save.record.deployed.to_string(),
            to: save.spec.requested(),
            duration: std::time::Duration::ZERO,
            reason: why,
            checks: Vec::new(),
        });
    }
}

/// How soon the files are judged again while a stopped save waits behind a deploy under way.
const RECHECK: jiff::SignedDuration = jiff::SignedDuration::from_secs(2);

/// How to approve a save of `key`, locally and through the API.
pub fn how_to_approve(key: &ServiceKey) -> String {
    format!(
        "approve with `depwatch approve {key}` or POST /api/v1/services/{}/{}/approve (`depwatch reject {key}` refuses it)",
        key.namespace, key.name
    )
}

/// The row's message while a save waits for its approvers.
fn awaiting_message(
    key: &ServiceKey,
    by: &[String],
    need: u32,
    requester: &str,
    until: jiff::Timestamp,
) -> String {
    let so_far = match by.is_empty() {
        true => String::new(),
        false => format!(": {}", by.join(", ")),
    };
    format!(
        "awaiting approval ({} of {need}{so_far}), asked by {requester}, rejected if not approved by {}; {}",
        by.len(),
        until.strftime("%Y-%m-%d %H:%M:%S UTC"),
        how_to_approve(key)
    )
}
