//! Stage 5, deciding: one deploy's lifecycle as a state machine with no I/O.
//!
//! ```text
//! start ─▶ plan ─┬─ nothing to change ─▶ check health ─┬─ healthy ─▶ AlreadyRunning
//!                │                                     └─ not yet ─▶ wait ─┐
//!                ├─ changes ─▶ patch ─▶ wait ─┬─ healthy / 0 replicas ─▶ Finished
//!                │                            ├─ superseded ─▶ HandedOver (row stays open)
//!                │                            ├─ workload gone ─▶ Finished (interrupted)
//!                │                            └─ failed / timed out ─▶ RolloutFailed (pin)
//!                │                                   └─▶ roll back: patch ─▶ wait ─▶ Finished
//!                └─ paused / missing / invalid ─▶ NotStarted
//! transient API errors at plan or patch ─▶ ApiUnreachable, retry with backoff until the deadline
//! images changed by someone else during a wait ─▶ Finished (changed outside depwatch; drift)
//! ```
//!
//! A newer desired version may arrive in any phase, and each phase says what it means there:
//! before anything is written it ends the deploy quietly; during a forward rollout it hands
//! the rollout over; during a rollback it changes nothing (a rollback is always finished, and
//! the newer version is deployed after it from what then runs). An answer that does not fit the
//! phase is never an error: the phase's own action is asked again.
//!
//! **A rollout depwatch started is finished by depwatch, whatever comes after it.** Superseding
//! means "a newer version takes over the workload", not "forget the old rollout": the handed
//! over row stays open, and the next deploy closes it `superseded` only once its own patch
//! lands over it. When the next deploy patches nothing (refused at plan, pre-flight or bounds,
//! pinned, its patch failing, the workload now another kind), it adopts the open row: it reads
//! the workload and judges the old rollout on its own images (rolled back and pinned when it
//! fails, as if nothing had superseded it), resumes its rollback, or closes it when its images
//! never reached the workload, were replaced from outside, or the workload is gone.
//!
//! A deploy a stop interrupted is finished from the cluster at the next start (or takeover) the
//! same way: a forward rollout whose images the file still asks for is judged on its own row; a
//! rollback recorded as intended (its restore images on the row) is finished, patched again if
//! the cluster still runs the failed images. A row is only ever judged on its own template.
//!
//! The driver ([`super::attempt`]) carries out each [`Action`] and feeds the result back as an
//! [`Input`]; every [`Event`] goes to the recorder, which is the only place that writes the
//! record, metrics, notifications and Kubernetes Events. Each deploy that does anything emits
//! exactly one of `NotStarted`, `AlreadyRunning` or `Started … Finished`: one history row.

use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

use crate::domain::verify::{summary, Baselines, CheckResult, ResumedBake, VerifyOutcome};
use crate::domain::{
    human_duration, DeployOutcome, Desired, Images, ServiceStatus, Trigger, WorkloadKind,
};
use crate::domain::{Plan, WaitOutcome};

/// What the record knows of the service as the deploy begins.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// The images of the last healthy rollout.
    pub last_good: Images,
    pub suspended: bool,
    /// The desired content is a version whose rollout failed.
    pub pinned: bool,
    /// The content the record last settled (acted on).
    pub settled: String,
    /// The record's newest unfinished deploy, if a stop interrupted one or it handed over
    /// to a newer version.
    pub interrupted: Option<Unfinished>,
    /// Older unfinished deploys (a stop between a newer row and its patch), newest first:
    /// whatever finishes the newest one supersedes them, unless its images never reached
    /// the workload (then the next older one is finished instead).
    pub older: Vec<Unfinished>,
}

/// A deploy left in progress by a stop, or handed over to a newer version: what it was doing,
/// from its row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unfinished {
    pub id: i64,
    /// The images before it.
    pub from: Images,
    /// The images it deployed.
    pub to: Images,
    /// Non-empty when its rollout had failed and a rollback to these images was under way.
    pub restore: Images,
    /// How long ago it started: a resumed rollout's timeout counts from then, not from the
    /// restart.
    pub ran_for: Duration,
    /// Why its rollout failed, when a rollback was under way.
    pub why: String,
    /// The kind of workload it patched, when recorded.
    pub kind: Option<WorkloadKind>,
    /// The file content it deployed: what a failure of its rollout pins. Empty when unknown.
    pub hash: String,
    /// Its rollout was healthy and its checks were baking: for how long, and against what.
    pub bake: Option<ResumedBake>,
}

/// The least a resumed rollout is given to be seen healthy, even past its timeout.
pub const RESUME_GRACE: Duration = Duration::from_secs(10);

/// The service's settings for this deploy.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub rollout_timeout: Duration,
    pub rollback: bool,
}

/// A failed API call, classified by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Connection, timeout, 5xx, 429 or 409: worth retrying.
    pub transient: bool,
    /// Not retried now, but at the next resync: the world may change without the file (an
    /// image pushed after its tag was written).
    pub again_at_resync: bool,
    /// A PATCH met a write made after what it was decided on (409 Conflict): nothing was
    /// written. Planned again from the live object (a rollback: patched again at its newest
    /// version), within the deadline.
    pub conflict: bool,
    pub message: String,
}

/// The health of a rollout right now, without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthNow {
    Healthy,
    /// Complete, but nothing was verified (0 replicas, OnDelete).
    Unverified,
    /// A CronJob's images are written: nothing to judge until its schedule.
    Applied,
    NotHealthy,
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read the Deployment and work out the images (answer: [`Input::Planned`]).
    Plan,
    /// Judge the rollout at `generation` once (answer: [`Input::Health`]).
    CheckHealth {
        generation: i64,
    },
    /// Write these images (answer: [`Input::Patched`]).
    Patch {
        images: Images,
        cause: String,
    },
    /// Wait for the rollout reaching `generation` (answer: [`Input::Waited`]). Only a forward
    /// rollout can be superseded by a newer version; a rollback is always seen through.
    Wait {
        generation: i64,
        /// The images depwatch wrote: a template with other images is someone else's.
        applied: Images,
        /// A rollback's: the failed template it replaces, whose pods may be deleted even
        /// while starting (a StatefulSet's forced rollback).
        replaced: Option<Images>,
        deadline: Instant,
        supersedable: bool,
    },
    /// Sleep before trying the API server again (answer: [`Input::Slept`], or
    /// [`Input::Superseded`] if a newer version arrives meanwhile and `supersedable`).
    Sleep {
        delay: Duration,
        supersedable: bool,
    },
    /// Read the workload as it is, of this kind or of whichever kind has the name, to finish
    /// a rollout another deploy left (answer: [`Input::Observed`]).
    Observe {
        kind: Option<WorkloadKind>,
    },
    /// Measure the verification's baselines before the PATCH (answer: [`Input::Measured`]).
    Measure,
    /// Bake: sample the file's checks until they pass for the bake, fail, or a newer version
    /// or someone else takes the workload (answer: [`Input::Verified`]).
    Verify {
        /// The images the healthy rollout runs: a template with others is someone else's.
        applied: Images,
        baselines: Baselines,
        /// How long it baked before a stop: the bake goes on for the time left.
        baked: Duration,
    },
    Done,
}

/// The result of the last action.
#[derive(Debug, Clone)]
pub enum Input {
    Planned(Result<Plan, Failure>),
    Health(HealthNow),
    Patched(Result<i64, Failure>),
    Waited(WaitOutcome),
    Slept,
    Superseded,
    /// The workload as it is (a plan with nothing to change), or `None` when it is gone.
    Observed(Result<Option<Plan>, Failure>),
    /// Each check's baseline (by position), when it has one.
    Measured(Vec<Option<f64>>),
    Verified(VerifyOutcome),
}

/// What happened, for the recorder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Nothing is done, and why.
    Skipped(&'static str),
    /// An unfinished deploy (a stop interrupted it, or it handed over to this one) is closed
    /// on its own row without a verdict on its version.
    CloseInterrupted {
        id: i64,
        outcome: DeployOutcome,
        message: String,
    },
    /// A newer version arrived during the rollout: the row stays open, and the next deploy
    /// either patches over it (closing it superseded) or, when it patches nothing, finishes
    /// it (judged, and rolled back and pinned if it fails).
    HandedOver,
    /// This deploy takes up an unfinished rollout's row: what follows until `Finished` is
    /// that rollout's. `pin` is the content a failure pins, if any.
    Adopted {
        id: i64,
        from: Images,
        to: Images,
        pin: Option<String>,
    },
    /// The API server did not answer; the call is tried again.
    ApiUnreachable { error: String, retry_in: Duration },
    /// The API server answers again.
    ApiBack,
    /// Nothing was changed in the cluster: one history row, failed.
    NotStarted {
        from: Images,
        requested: String,
        message: String,
        /// The content counts as acted on (a resync does not try it again).
        settled: bool,
        /// The service's status: `failed`, or `paused` for a paused Deployment.
        status: ServiceStatus,
    },
    /// The cluster already runs the desired images.
    AlreadyRunning {
        images: Images,
        /// With 0 replicas nothing proves them healthy: they do not become last good.
        verified: bool,
        /// Worth a history row (not for start-up and resync checks).
        record: bool,
    },
    /// A deploy begins: its history row opens (or, when resumed, is taken over).
    Started {
        from: Images,
        to: Images,
        resumed: Option<i64>,
        /// The images before depwatch's first deploy of the service count as last good.
        baseline: Option<Images>,
        /// The digests the registry reported for the new images (container → digest).
        digests: Images,
    },
    /// Images written; `rollback` tells the rollback's patch from the deploy's.
    Patched { generation: i64, rollback: bool },
    /// The rollout is healthy and its checks are being baked for `bake`: the service is
    /// `verifying`, and the version is not last good yet.
    Verifying {
        bake: Duration,
        checks: usize,
        /// Baked before a stop, when resumed.
        baked: Duration,
        baselines: Baselines,
    },
    /// The checks' record over the bake, for the history row and the notifications.
    Verified { results: Vec<CheckResult> },
    /// The rollout's verdict is failure: the version is pinned and people are told at once.
    RolloutFailed {
        outcome: DeployOutcome,
        reason: String,
    },
    /// A rollback is about to be patched: its restore images and why go on the deploy's row
    /// first, so a stop before it ends is finished at the next start, with the same reason.
    RollingBack { restore: Images, why: String },
    /// An interrupted rollback is finished: the version stays pinned (said again, in case the
    /// stop came before the pin was written), and nobody is told twice.
    Repin,
    /// The deploy is over.
    Finished(Finish),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub outcome: DeployOutcome,
    pub message: String,
    /// What runs now, when known.
    pub running: Option<Images>,
    /// `running` becomes the last good images.
    pub good: bool,
    /// The content counts as acted on.
    pub settled: bool,
    /// Tell people (a failure already announced by `RolloutFailed` is not told twice).
    pub announce: bool,
    /// The row is an adopted rollout's, not this deploy's own: the service keeps its status
    /// unless the cluster was rolled back or failed.
    pub adopted: bool,
}

#[derive(Debug, Clone)]
enum Phase {
    Planning,
    Checking(Plan),
    Patching(Plan),
    Rolling {
        plan: Plan,
        deadline: Instant,
    },
    /// Measuring the baselines of the checks before the PATCH.
    Measuring(Plan),
    /// The rollout is healthy; its checks are baking.
    Verifying(Plan),
    Reverting(Revert),
    RevertWait {
        revert: Revert,
        generation: i64,
        deadline: Instant,
    },
    /// Reading the workload to finish a rollout another deploy left.
    Adopting(Unfinished),
    Done,
}

/// A rollback under way.
#[derive(Debug, Clone)]
struct Revert {
    plan: Plan,
    restore: Images,
    why: String,
}

impl Revert {
    /// What runs once the rollback is written.
    fn running(&self) -> Images {
        self.plan.after.with(&self.restore)
    }

    fn patch(&self) -> Action {
        Action::Patch {
            images: self.restore.clone(),
            cause: format!("depwatch: rollback ({})", self.why),
        }
    }
}

/// The lifecycle of one deploy.
pub struct Lifecycle {
    desired: Desired,
    known: Known,
    settings: Settings,
    phase: Phase,
    /// Transient errors are retried until then.
    deadline: Instant,
    backoff: backon::ExponentialBackoff,
    /// A history row is open.
    started: bool,
    unreachable: bool,
    /// A resumed rollout ran this long before this process (its timeout counts it).
    ran_before: Duration,
    /// The rollout this deploy's patch replaces: closed superseded once the patch lands,
    /// finished by this deploy when it never does.
    replacing: Option<Unfinished>,
    /// The rows being written are an adopted rollout's.
    adopted: bool,
    /// Plan this deploy again once the adopted rollout is finished (its workload changed
    /// kind).
    then_plan: bool,
    /// What the file asks for, when an unfinished rollout is finished before this deploy
    /// plans again: a workload running it replaced that rollout.
    wanted: Option<Images>,
    /// The checks' baselines, measured before this deploy's PATCH.
    baselines: Option<Vec<Option<f64>>>,
    /// The bake a stop interrupted, resumed on this deploy's row.
    resumed_bake: Option<ResumedBake>,
}

/// The images a rollback restores: every container this deploy changed, and every container
/// not running its last good image, back to the last good image (or, where none is known,
/// the image before this deploy). Empty when nothing is known to restore.
pub fn rollback_images(before: &Images, after: &Images, last_good: &Images) -> Images {
    after
        .iter()
        .filter(|(c, img)| {
            before.get(c) != Some(*img) || last_good.get(c).is_some_and(|g| g != *img)
        })
        .filter_map(|(c, img)| {
            let to = last_good.get(c).or_else(|| before.get(c))?;
            (to != img).then(|| (c.clone(), to.clone()))
        })
        .collect()
}

const DISAPPEARED: &str =
    "the workload disappeared during the rollout: no verdict on the version, nothing pinned (the next save or resync plans afresh)";

const REPLACED: &str = "superseded: a newer rollout of this service replaced it on the workload";

const NEVER_WRITTEN: &str =
    "superseded: a newer version took over before this rollout's images reached the workload";

/// The workload runs every image of `want` (a non-empty set).
fn runs(live: &Images, want: &Images) -> bool {
    !want.is_empty() && want.iter().all(|(c, i)| live.get(c) == Some(i))
}

/// Close an unfinished deploy's row without a verdict on its version.
fn close(u: &Unfinished, outcome: DeployOutcome, why: &str) -> Event {
    let message = if u.restore.is_empty() {
        why.to_string()
    } else {
        format!("{why}; its rollback is abandoned, and the newer version is deployed from what the cluster runs")
    };
    Event::CloseInterrupted {
        id: u.id,
        outcome,
        message,
    }
}

fn backoff() -> backon::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

impl Lifecycle {
    pub fn new(desired: Desired, known: Known, settings: Settings, now: Instant) -> Self {
        Lifecycle {
            deadline: now + settings.rollout_timeout,
            desired,
            known,
            settings,
            phase: Phase::Planning,
            backoff: backoff(),
            started: false,
            unreachable: false,
            ran_before: Duration::ZERO,
            replacing: None,
            adopted: false,
            then_plan: false,
            wanted: None,
            baselines: None,
            resumed_bake: None,
        }
    }

    /// The first step.
    pub fn start(&mut self) -> (Vec<Event>, Action) {
        // An unfinished rollback is finished whatever else holds: the failed images may still
        // be running.
        if self
            .known
            .interrupted
            .as_ref()
            .is_some_and(|u| !u.restore.is_empty())
        {
            return (Vec::new(), Action::Plan);
        }
        let skip = if self.known.suspended {
            Some("the service is suspended; the change is recorded, not deployed")
        } else if self.known.pinned && self.desired.trigger != Trigger::Operator {
            Some("this version failed before; it is not retried until the file changes")
        } else {
            None
        };
        if let Some(why) = skip {
            let mut events = vec![Event::Skipped(why)];
            if self.known.suspended {
                // Hands off: an unfinished rollout is not judged either.
                self.close_unfinished(
                    &mut events,
                    DeployOutcome::Interrupted,
                    "the service was suspended before this rollout was judged: it is not judged",
                );
                return self.done(events);
            }
            if self.desired.trigger == Trigger::File {
                // Saved back to it while another version was desired: one row says so.
                events = vec![Event::NotStarted {
                    from: Images::new(),
                    requested: self.desired.requested(),
                    message: format!(
                        "{why}: nothing was changed (fix the version, or run `depwatch retry`)"
                    ),
                    settled: true,
                    status: ServiceStatus::Failed,
                }];
            }
            // The pinned version is never patched: a rollout it would have replaced is
            // finished here.
            return self.adopt_unfinished(events);
        }
        (Vec::new(), Action::Plan)
    }

    /// The next step, given the result of the last action at `now`.
    pub fn step(&mut self, input: Input, now: Instant) -> (Vec<Event>, Action) {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        match (phase, input) {
            (Phase::Done, _) => self.done(Vec::new()),
            (Phase::Planning, Input::Planned(Ok(plan))) => self.planned(plan, now),
            (Phase::Planning, Input::Planned(Err(f))) => self.plan_failed(f, now),
            (Phase::Checking(plan), Input::Health(h)) => self.checked(plan, h, now),
            (Phase::Patching(plan), Input::Patched(Ok(generation))) => {
                self.patched(plan, generation, now)
            }
            (Phase::Patching(plan), Input::Patched(Err(f))) => self.patch_failed(plan, f, now),
            (Phase::Rolling { plan, .. }, Input::Waited(w)) => self.judged(plan, w, now),
            (Phase::Measuring(plan), Input::Measured(b)) => {
                self.baselines = Some(b);
                self.patch(plan)
            }
            (Phase::Verifying(plan), Input::Verified(v)) => self.verified(plan, v, now),
            (Phase::Reverting(revert), Input::Patched(Ok(generation))) => {
                self.revert_patched(revert, generation, now)
            }
            (Phase::Reverting(revert), Input::Patched(Err(f))) => {
                self.revert_patch_failed(revert, f, now)
            }
            (Phase::RevertWait { revert, .. }, Input::Waited(w)) => self.reverted(revert, w),
            (Phase::Adopting(u), Input::Observed(seen)) => self.observed(u, seen, now),
            // A rollback is seen through whatever arrives meanwhile; the newer version is
            // deployed after it, from what then runs.
            (phase @ (Phase::Reverting(_) | Phase::RevertWait { .. }), Input::Superseded) => {
                self.again(phase)
            }
            // A rollout on the cluster is handed to the newer version's deploy.
            (Phase::Rolling { .. } | Phase::Verifying(_), Input::Superseded) => {
                self.superseded(true)
            }
            (_, Input::Superseded) => self.superseded(false),
            // A retry's sleep is over, or an answer that does not fit the phase: ask again.
            (phase, _) => self.again(phase),
        }
    }

    /// Ask for the phase's own action again.
    fn again(&mut self, phase: Phase) -> (Vec<Event>, Action) {
        let action = match &phase {
            Phase::Planning => Action::Plan,
            Phase::Checking(plan) => Action::CheckHealth {
                generation: plan.generation,
            },
            Phase::Patching(plan) => return self.patch(plan.clone()),
            Phase::Rolling { plan, deadline } => Action::Wait {
                generation: plan.generation,
                applied: plan.after.clone(),
                replaced: None,
                deadline: *deadline,
                supersedable: true,
            },
            Phase::Reverting(revert) => revert.patch(),
            Phase::RevertWait {
                revert,
                generation,
                deadline,
            } => Action::Wait {
                generation: *generation,
                applied: revert.running(),
                replaced: Some(revert.plan.after.clone()),
                deadline: *deadline,
                supersedable: false,
            },
            Phase::Adopting(u) => Action::Observe { kind: u.kind },
            Phase::Measuring(_) => Action::Measure,
            Phase::Verifying(plan) => self.verify_action(plan),
            Phase::Done => Action::Done,
        };
        self.phase = phase;
        (Vec::new(), action)
    }

    /// The deploy is over, unless an adopted rollout was finished first and this deploy's
    /// own plan comes next.
    fn done(&mut self, events: Vec<Event>) -> (Vec<Event>, Action) {
        if std::mem::take(&mut self.then_plan) {
            self.wanted = None;
            self.adopted = false;
            self.started = false;
            self.ran_before = Duration::ZERO;
            self.backoff = backoff();
            self.phase = Phase::Planning;
            return (events, Action::Plan);
        }
        self.phase = Phase::Done;
        (events, Action::Done)
    }

    fn back(&mut self, events: &mut Vec<Event>) {
        if std::mem::take(&mut self.unreachable) {
            events.push(Event::ApiBack);
        }
    }

    /// After a final failure: the API server answered only if the failure was not transient.
    fn answered_if(&mut self, f: &Failure, events: &mut Vec<Event>) {
        if f.transient {
            self.unreachable = false;
        } else {
            self.back(events);
        }
    }

    fn finish(
        &mut self,
        mut events: Vec<Event>,
        outcome: DeployOutcome,
        message: String,
        running: Option<Images>,
    ) -> (Vec<Event>, Action) {
        // A CronJob's last good is what was applied: nothing else can be known of it.
        let good = matches!(outcome, DeployOutcome::Succeeded | DeployOutcome::Applied);
        let fine = matches!(
            outcome,
            DeployOutcome::Succeeded | DeployOutcome::Unverified | DeployOutcome::Applied
        );
        let quiet = matches!(
            outcome,
            DeployOutcome::Superseded | DeployOutcome::InProgress
        );
        // An adopted rollout is told of only when it failed.
        let announce = !(quiet || (self.adopted && fine));
        events.push(Event::Finished(Finish {
            outcome,
            message,
            running,
            good,
            // An adopted rollout's content is not the file's: what the file holds is settled
            // by this deploy's own outcome.
            settled: outcome != DeployOutcome::Superseded && !self.adopted,
            announce,
            adopted: self.adopted,
        }));
        // The row is closed: nothing more is written to it.
        self.started = false;
        self.done(events)
    }

    /// Retry a transient failure after a backoff, unless the deadline has passed.
    fn retry(&mut self, f: &Failure, next: Phase, now: Instant) -> Option<(Vec<Event>, Action)> {
        if !f.transient || now >= self.deadline {
            return None;
        }
        let supersedable = !matches!(next, Phase::Reverting(_));
        let delay = self
            .backoff
            .next()
            .unwrap_or(Duration::from_secs(5))
            .min(self.deadline - now);
        self.unreachable = true;
        self.phase = next;
        Some((
            vec![Event::ApiUnreachable {
                error: f.message.clone(),
                retry_in: delay,
            }],
            Action::Sleep {
                delay,
                supersedable,
            },
        ))
    }

    fn give_up_message(&self, f: &Failure) -> String {
        if f.transient {
            format!(
                "{} (retried for {}; tried again at the next resync, or re-save the file)",
                f.message,
                human_duration(self.settings.rollout_timeout)
            )
        } else {
            // What to do is the advice's, per cause (the page and `status -o wide` show it).
            f.message.clone()
        }
    }

    /// Close the unfinished deploy's row without a verdict on its version.
    fn close_unfinished(&mut self, events: &mut Vec<Event>, outcome: DeployOutcome, why: &str) {
        if let Some(u) = self.known.interrupted.take() {
            events.push(close(&u, outcome, why));
        }
        self.close_older(events, outcome, why);
    }

    /// Older unfinished rows end with the newest one.
    fn close_older(&mut self, events: &mut Vec<Event>, outcome: DeployOutcome, why: &str) {
        for u in std::mem::take(&mut self.known.older) {
            events.push(close(&u, outcome, why));
        }
    }

    /// This deploy's own part is over and it patched nothing: a rollout it took over (or a
    /// stop left) is finished now, as if nothing had superseded it.
    fn adopt_unfinished(&mut self, events: Vec<Event>) -> (Vec<Event>, Action) {
        match self
            .replacing
            .take()
            .or_else(|| self.known.interrupted.take())
        {
            Some(u) => self.adopt(u, events),
            None => self.done(events),
        }
    }

    /// Read the workload an unfinished rollout patched, to finish it.
    fn adopt(&mut self, u: Unfinished, events: Vec<Event>) -> (Vec<Event>, Action) {
        let kind = u.kind;
        self.phase = Phase::Adopting(u);
        (events, Action::Observe { kind })
    }

    /// The rows that follow are `u`'s.
    fn adopted(&mut self, u: &Unfinished) -> Vec<Event> {
        self.adopted = true;
        self.started = true;
        let mut events = Vec::new();
        self.close_older(&mut events, DeployOutcome::Superseded, REPLACED);
        events.push(Event::Adopted {
            id: u.id,
            from: u.from.clone(),
            to: u.to.clone(),
            // The file's own content stays pinned when it is.
            pin: (!self.known.pinned && !u.hash.is_empty()).then(|| u.hash.clone()),
        });
        events
    }

    /// What the workload runs decides how an adopted rollout ends: judged when its images
    /// are there, resumed when it was rolling back, closed when it was never written, was
    /// replaced from outside, or the workload is gone.
    fn observed(
        &mut self,
        u: Unfinished,
        seen: Result<Option<Plan>, Failure>,
        now: Instant,
    ) -> (Vec<Event>, Action) {
        let mut events = Vec::new();
        let plan = match seen {
            // Nothing can be judged now: the rows stay open for the next deploy or start.
            Err(f) if f.transient => return self.done(events),
            Err(f) => {
                let why = format!("this rollout could not be judged: {}", f.message);
                self.known.interrupted = Some(u);
                self.close_unfinished(&mut events, DeployOutcome::Interrupted, &why);
                return self.done(events);
            }
            Ok(None) => {
                self.known.interrupted = Some(u);
                self.close_unfinished(&mut events, DeployOutcome::Interrupted, DISAPPEARED);
                return self.done(events);
            }
            Ok(Some(plan)) => plan,
        };
        if !u.restore.is_empty() {
            let mut events = self.adopted(&u);
            events.extend(self.resume_rollback(plan, u, now));
            let phase = std::mem::replace(&mut self.phase, Phase::Done);
            return (events, self.again(phase).1);
        }
        if runs(&plan.after, &u.to) {
            let events = self.adopted(&u);
            let before = if u.from.is_empty() {
                plan.before.clone()
            } else {
                u.from.clone()
            };
            return (events, self.judge_resumed(Plan { before, ..plan }, &u, now));
        }
        // Its images are not on the workload: never written, or replaced from outside. An
        // older unfinished rollout's may be (a stop came between a newer row and its patch).
        let (outcome, why) = if runs(&plan.after, &u.from) {
            (DeployOutcome::Superseded, NEVER_WRITTEN.to_string())
        } else if self.wanted.as_ref().is_some_and(|w| runs(&plan.after, w)) {
            let why = format!(
                "superseded: the workload runs {}, what the file asks for now",
                plan.after
            );
            (DeployOutcome::Superseded, why)
        } else {
            let why = format!(
                "changed outside depwatch before this rollout was judged: the workload runs {}; not judged",
                plan.after
            );
            (DeployOutcome::ChangedOutside, why)
        };
        let mut events = vec![close(&u, outcome, &why)];
        if self.known.older.is_empty() {
            return self.done(events);
        }
        let next = self.known.older.remove(0);
        let (more, action) = self.observed(next, Ok(Some(plan)), now);
        events.extend(more);
        (events, action)
    }

    /// Wait for a rollout that began before this deploy: its timeout counts from when it
    /// started, with a little time to be seen healthy.
    fn judge_resumed(&mut self, plan: Plan, u: &Unfinished, now: Instant) -> Action {
        self.ran_before = u.ran_for;
        if let Some(b) = &u.bake {
            self.baselines = Some(b.baselines.0.clone());
        }
        self.resumed_bake = u.bake.clone();
        let left = self
            .settings
            .rollout_timeout
            .saturating_sub(u.ran_for)
            .max(RESUME_GRACE);
        self.again(Phase::Rolling {
            plan,
            deadline: now + left,
        })
        .1
    }

    fn plan_failed(&mut self, f: Failure, now: Instant) -> (Vec<Event>, Action) {
        if let Some(next) = self.retry(&f, Phase::Planning, now) {
            return next;
        }
        let mut events = Vec::new();
        self.answered_if(&f, &mut events);
        if self.started {
            // Planning again after a PATCH met a newer write failed: this deploy's row ends so.
            return self.patch_gave_up(events, &f);
        }
        events.push(Event::NotStarted {
            from: Images::new(),
            requested: self.desired.requested(),
            message: self.give_up_message(&f),
            settled: !f.transient && !f.again_at_resync,
            status: ServiceStatus::Failed,
        });
        self.adopt_unfinished(events)
    }

    fn planned(&mut self, plan: Plan, now: Instant) -> (Vec<Event>, Action) {
        let mut events = Vec::new();
        self.back(&mut events);
        if self.started {
            // Planned again after this deploy's PATCH met a newer write: the same row goes
            // on, patched from the live object, or judged when it already runs the images.
            if plan.is_noop() {
                let plan = self.judged_from_last_good(plan);
                return (events, self.wait(plan, now));
            }
            let (more, action) = self.patch(plan);
            events.extend(more);
            return (events, action);
        }
        if plan.paused {
            return self.paused(plan, events);
        }
        if let Some(u) = self
            .known
            .interrupted
            .take_if(|u| !u.restore.is_empty() && u.to == plan.after)
        {
            // The file still asks for the version whose rollback a stop interrupted.
            events.extend(self.resume_rollback(plan, u, now));
            let phase = std::mem::replace(&mut self.phase, Phase::Done);
            let action = self.again(phase).1;
            return (events, action);
        }
        if let Some(u) = self
            .known
            .interrupted
            .take_if(|u| u.kind.is_some_and(|k| k != plan.kind))
        {
            // The name is now another kind of workload: the rollout on the old one is
            // finished first, then this deploy plans again.
            self.then_plan = true;
            return self.adopt(u, events);
        }
        if !plan.is_noop() {
            // A stop between this very deploy's row and its patch: the same row goes on.
            let same = self
                .known
                .interrupted
                .take_if(|u| u.restore.is_empty() && u.to == plan.after)
                .map(|u| u.id);
            // Any other unfinished rollout is superseded once this patch lands.
            self.replacing = self.known.interrupted.take();
            events.push(self.started(&plan, plan.before.clone(), same));
            let (more, action) = self.patch(plan);
            events.extend(more);
            return (events, action);
        }
        self.planned_noop(plan, events, now)
    }

    /// The workload is paused: nothing is patched, and an unfinished rollout is not judged.
    fn paused(&mut self, plan: Plan, mut events: Vec<Event>) -> (Vec<Event>, Action) {
        self.close_unfinished(
            &mut events,
            DeployOutcome::Interrupted,
            "the workload was paused before this rollout was judged: it is not judged",
        );
        events.push(Event::NotStarted {
            from: plan.before.clone(),
            requested: plan.after.to_string(),
            message: format!(
                "Deployment is paused: nothing was changed (run `kubectl rollout resume deployment/{} -n {}`, then `depwatch retry`)",
                plan.key.name, plan.key.namespace
            ),
            settled: true,
            status: ServiceStatus::Paused,
        });
        self.done(events)
    }

    /// The cluster already runs what the file asks for.
    fn planned_noop(
        &mut self,
        plan: Plan,
        mut events: Vec<Event>,
        now: Instant,
    ) -> (Vec<Event>, Action) {
        if let Some(u) = self
            .known
            .interrupted
            .take_if(|u| u.restore.is_empty() && u.to == plan.after)
        {
            // A stop interrupted this very deploy after its patch: judge it now, never patch
            // it again, and finish the same record.
            let plan = self.judged_from_last_good(plan);
            self.close_older(&mut events, DeployOutcome::Superseded, REPLACED);
            events.push(self.started(&plan, plan.before.clone(), Some(u.id)));
            return (events, self.judge_resumed(plan, &u, now));
        }
        if let Some(u) = self.known.interrupted.take() {
            // Another version's rollout, and the plan (from the shared watch, which may lag)
            // says the workload runs what the file asks for: that rollout is never judged on
            // this one's template. It is finished from the live object first, then planned
            // again.
            self.then_plan = true;
            self.wanted = Some(plan.after.clone());
            return self.adopt(u, events);
        }
        let generation = plan.generation;
        self.phase = Phase::Checking(plan);
        (events, Action::CheckHealth { generation })
    }

    /// A plan with nothing to change is judged against the last good images: those are what
    /// a failure restores.
    fn judged_from_last_good(&self, plan: Plan) -> Plan {
        if self.known.last_good.is_empty() {
            return plan;
        }
        Plan {
            before: self.known.last_good.clone(),
            ..plan
        }
    }

    fn started(&mut self, plan: &Plan, from: Images, resumed: Option<i64>) -> Event {
        self.started = true;
        Event::Started {
            from,
            to: plan.after.clone(),
            resumed,
            baseline: self.known.last_good.is_empty().then(|| plan.before.clone()),
            digests: plan.digests.clone(),
        }
    }

    fn checked(&mut self, plan: Plan, health: HealthNow, now: Instant) -> (Vec<Event>, Action) {
        // A save already acted on (another replica's deploy of it finished during a
        // takeover) is not a second row.
        let record = !matches!(
            self.desired.trigger,
            Trigger::Startup | Trigger::Resync | Trigger::Rescan
        ) && self.known.settled != self.desired.hash;
        match health {
            HealthNow::Healthy | HealthNow::Unverified | HealthNow::Applied => {
                self.done(vec![Event::AlreadyRunning {
                    images: plan.after,
                    verified: health != HealthNow::Unverified,
                    record,
                }])
            }
            HealthNow::NotHealthy => {
                // The desired images are there but their rollout is not healthy (yet): judge
                // it like a deploy in flight, and roll back if it fails.
                let plan = self.judged_from_last_good(plan);
                let event = self.started(&plan, plan.before.clone(), None);
                (vec![event], self.wait(plan, now))
            }
        }
    }

    fn patch(&mut self, plan: Plan) -> (Vec<Event>, Action) {
        let measure = self
            .desired
            .spec
            .verify
            .as_ref()
            .is_some_and(|v| v.needs_baseline());
        if measure && self.baselines.is_none() {
            self.phase = Phase::Measuring(plan);
            return (Vec::new(), Action::Measure);
        }
        let cause = format!(
            "depwatch: {} ({}) set {}",
            self.desired.file_name(),
            self.desired.trigger,
            plan.changes
        );
        let images = plan.changes.clone();
        self.phase = Phase::Patching(plan);
        (Vec::new(), Action::Patch { images, cause })
    }

    fn patch_failed(&mut self, plan: Plan, f: Failure, now: Instant) -> (Vec<Event>, Action) {
        if f.conflict {
            // The workload was written since the plan (a status, another replica's patch):
            // plan again from the live object, on this deploy's row.
            if let Some(next) = self.after_conflict(Phase::Planning, now) {
                return next;
            }
        }
        if let Some(next) = self.retry(&f, Phase::Patching(plan), now) {
            return next;
        }
        let mut events = Vec::new();
        self.answered_if(&f, &mut events);
        self.patch_gave_up(events, &f)
    }

    /// This deploy's row ends failed with nothing written; a rollout its patch was to replace
    /// is finished now.
    fn patch_gave_up(&mut self, events: Vec<Event>, f: &Failure) -> (Vec<Event>, Action) {
        let message = self.give_up_message(f);
        let (mut events, _) = self.finish(events, DeployOutcome::Failed, message, None);
        if let Some(Event::Finished(finish)) = events.last_mut() {
            finish.settled = !f.transient;
        }
        self.adopt_unfinished(events)
    }

    fn patched(&mut self, plan: Plan, generation: i64, now: Instant) -> (Vec<Event>, Action) {
        let mut events = Vec::new();
        self.back(&mut events);
        events.push(Event::Patched {
            generation,
            rollback: false,
        });
        let why = format!(
            "superseded: depwatch patched {} over this rollout",
            plan.after
        );
        if let Some(u) = self.replacing.take() {
            events.push(close(&u, DeployOutcome::Superseded, &why));
        }
        self.close_older(&mut events, DeployOutcome::Superseded, &why);
        let plan = Plan { generation, ..plan };
        (events, self.wait(plan, now))
    }

    /// Wait for `plan.generation`; the deadline measures the rollout from now.
    fn wait(&mut self, plan: Plan, now: Instant) -> Action {
        let deadline = now + self.settings.rollout_timeout;
        self.again(Phase::Rolling { plan, deadline }).1
    }

    /// Finish a rollback a stop interrupted: the version is pinned again, and the restore
    /// images are patched unless the cluster runs them already (then only awaited).
    fn resume_rollback(&mut self, plan: Plan, u: Unfinished, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        self.close_older(&mut events, DeployOutcome::Superseded, REPLACED);
        events.push(self.started(&plan, plan.after.clone(), Some(u.id)));
        events.push(Event::Repin);
        let why = match u.why.as_str() {
            "" => "depwatch stopped during the rollback; finished at the next start".to_string(),
            failed => format!(
                "{failed} (depwatch stopped during the rollback; finished at the next start)"
            ),
        };
        self.deadline = now + self.settings.rollout_timeout;
        let revert = Revert {
            restore: u.restore.clone(),
            why,
            plan: Plan {
                after: plan.before.clone(),
                ..plan
            },
        };
        let restore = revert.plan.before.changed_in(&revert.restore);
        self.phase = if restore.is_empty() {
            Phase::RevertWait {
                generation: revert.plan.generation,
                deadline: now + self.settings.rollout_timeout,
                revert,
            }
        } else {
            events.push(Event::RollingBack {
                restore: u.restore,
                why: revert.why.clone(),
            });
            Phase::Reverting(revert)
        };
        events
    }

    /// A newer version arrived. A rollout on the cluster (`rolling`) is handed over: its row
    /// stays open, and the newer version's deploy closes it when it patches over it, or
    /// finishes it when it does not. A deploy that wrote nothing yet just ends.
    fn superseded(&mut self, rolling: bool) -> (Vec<Event>, Action) {
        // Nothing is known of the API server: the next deploy finds out.
        self.unreachable = false;
        self.then_plan = false;
        if !self.started {
            return self.done(Vec::new());
        }
        if rolling {
            return self.done(vec![Event::HandedOver]);
        }
        self.finish(
            Vec::new(),
            DeployOutcome::Superseded,
            "a newer version arrived before this one was written".into(),
            None,
        )
    }

    /// The workload is gone: no verdict on the version, nothing pinned, and the next save or
    /// resync plans afresh.
    fn disappeared(&mut self) -> (Vec<Event>, Action) {
        let (mut events, action) = self.finish(
            Vec::new(),
            DeployOutcome::Interrupted,
            DISAPPEARED.into(),
            None,
        );
        if let Some(Event::Finished(f)) = events.last_mut() {
            f.settled = false;
        }
        (events, action)
    }

    fn judged(&mut self, plan: Plan, waited: WaitOutcome, now: Instant) -> (Vec<Event>, Action) {
        let (outcome, why) = match waited {
            WaitOutcome::Healthy if self.desired.spec.verify.is_some() && !self.adopted => {
                return self.verifying(plan);
            }
            WaitOutcome::Healthy => {
                let running = Some(plan.after);
                return self.finish(
                    Vec::new(),
                    DeployOutcome::Succeeded,
                    "rollout healthy".into(),
                    running,
                );
            }
            WaitOutcome::Unverified(why) => {
                let running = Some(plan.after);
                return self.finish(
                    Vec::new(),
                    DeployOutcome::Unverified,
                    format!("deployed, unverified: {why}; nothing proved these images healthy"),
                    running,
                );
            }
            WaitOutcome::Applied(what) => {
                let running = Some(plan.after);
                return self.finish(Vec::new(), DeployOutcome::Applied, what, running);
            }
            WaitOutcome::Superseded => return self.superseded(true),
            WaitOutcome::Disappeared => return self.disappeared(),
            WaitOutcome::ChangedOutside { running } => {
                return self.changed_outside(plan.after, &running)
            }
            WaitOutcome::Failed { reason, message } => {
                (DeployOutcome::Failed, format!("{reason}: {message}"))
            }
            WaitOutcome::TimedOut { last } => (
                DeployOutcome::TimedOut,
                format!(
                    "rollout not healthy after {}: {last}",
                    human_duration(self.timed_out_after())
                ),
            ),
        };
        let failed = Event::RolloutFailed {
            outcome,
            reason: why.clone(),
        };
        let (mut events, action) = self.after_failure(plan, outcome, why, now);
        // The rollback's intent is on the row before the pin and the patch: a stop anywhere
        // after this leaves a row the next start finishes.
        let at = usize::from(matches!(events.first(), Some(Event::RollingBack { .. })));
        events.insert(at, failed);
        (events, action)
    }

    /// The rollout is healthy: bake its checks before it counts as good.
    fn verifying(&mut self, plan: Plan) -> (Vec<Event>, Action) {
        let (bake, checks) = self
            .desired
            .spec
            .verify
            .as_ref()
            .map_or((Duration::ZERO, 0), |v| (v.bake, v.checks.len()));
        let action = self.verify_action(&plan);
        self.phase = Phase::Verifying(plan);
        let event = Event::Verifying {
            bake,
            checks,
            baked: self.baked(),
            baselines: Baselines(self.baselines.clone().unwrap_or_default()),
        };
        (vec![event], action)
    }

    /// How long a resumed bake had baked.
    fn baked(&self) -> Duration {
        self.resumed_bake
            .as_ref()
            .map_or(Duration::ZERO, |b| b.baked)
    }

    fn verify_action(&self, plan: &Plan) -> Action {
        Action::Verify {
            applied: plan.after.clone(),
            baselines: Baselines(self.baselines.clone().unwrap_or_default()),
            baked: self.baked(),
        }
    }

    /// The bake is over: the version is good only when its checks passed; a failed check is
    /// a failed rollout (rolled back and pinned, the check and its values in the reason).
    fn verified(&mut self, plan: Plan, v: VerifyOutcome, now: Instant) -> (Vec<Event>, Action) {
        match v {
            VerifyOutcome::Passed { results } => {
                let message = format!("rollout healthy and verified: {}", summary(&results));
                let running = Some(plan.after);
                let events = vec![Event::Verified { results }];
                self.finish(events, DeployOutcome::Succeeded, message, running)
            }
            VerifyOutcome::Promoted { by, results } => {
                let so_far = match results.is_empty() {
                    true => "no sample taken yet".to_string(),
                    false => summary(&results),
                };
                let message =
                    format!("rollout healthy; promoted by {by} before its bake ended ({so_far})");
                let running = Some(plan.after);
                let events = vec![Event::Verified { results }];
                self.finish(events, DeployOutcome::Succeeded, message, running)
            }
            VerifyOutcome::Failed { reason, results } => {
                let failed = WaitOutcome::Failed {
                    reason: "verification failed".into(),
                    message: reason,
                };
                let (mut events, action) = self.judged(plan, failed, now);
                events.insert(0, Event::Verified { results });
                (events, action)
            }
            VerifyOutcome::Superseded => self.superseded(true),
            VerifyOutcome::Disappeared => self.disappeared(),
            VerifyOutcome::ChangedOutside { running } => self.changed_outside(plan.after, &running),
        }
    }

    /// How long the rollout ran when it timed out: its timeout, or for one resumed after a
    /// stop, the time before the stop and the grace after it, whichever is longer.
    fn timed_out_after(&self) -> Duration {
        if self.ran_before.is_zero() {
            return self.settings.rollout_timeout;
        }
        let whole = Duration::from_secs((self.ran_before + RESUME_GRACE).as_secs());
        self.settings.rollout_timeout.max(whole)
    }

    /// Someone else wrote the template during the wait: its pods are not depwatch's to judge.
    /// The row ends as changed outside; the service keeps what depwatch applied as deployed,
    /// so drift (recorded and healed by the drift watch) is told from it.
    fn changed_outside(&mut self, applied: Images, running: &Images) -> (Vec<Event>, Action) {
        let message = format!(
            "changed outside depwatch during the rollout: the Deployment now runs {running}; not judged"
        );
        let (events, action) = self.finish(
            Vec::new(),
            DeployOutcome::ChangedOutside,
            message,
            Some(applied),
        );
        (Self::quiet(events), action)
    }

    fn after_failure(
        &mut self,
        plan: Plan,
        outcome: DeployOutcome,
        why: String,
        now: Instant,
    ) -> (Vec<Event>, Action) {
        let running = Some(plan.after.clone());
        if !self.desired.spec.rollback.unwrap_or(self.settings.rollback) {
            let (events, action) = self.finish(Vec::new(), outcome, why, running);
            return (Self::quiet(events), action);
        }
        let restore = rollback_images(&plan.before, &plan.after, &self.known.last_good);
        if restore.is_empty() {
            let message = format!("{why}; no earlier images are known to restore");
            let (events, action) =
                self.finish(Vec::new(), DeployOutcome::RollbackFailed, message, running);
            return (events, action);
        }
        // The rollback's own API errors are retried for as long as a rollout may take.
        self.deadline = now + self.settings.rollout_timeout;
        self.backoff = backoff();
        let revert = Revert {
            plan,
            restore,
            why: why.clone(),
        };
        let action = Action::Patch {
            images: revert.restore.clone(),
            cause: format!("depwatch: rollback after {outcome} ({why})"),
        };
        let events = vec![Event::RollingBack {
            restore: revert.restore.clone(),
            why: revert.why.clone(),
        }];
        self.phase = Phase::Reverting(revert);
        (events, action)
    }

    /// The failure was announced by `RolloutFailed`.
    fn quiet(mut events: Vec<Event>) -> Vec<Event> {
        if let Some(Event::Finished(f)) = events.last_mut() {
            f.announce = false;
        }
        events
    }

    fn revert_patched(
        &mut self,
        revert: Revert,
        generation: i64,
        now: Instant,
    ) -> (Vec<Event>, Action) {
        let mut events = Vec::new();
        self.back(&mut events);
        events.push(Event::Patched {
            generation,
            rollback: true,
        });
        let phase = Phase::RevertWait {
            revert,
            generation,
            deadline: now + self.settings.rollout_timeout,
        };
        let (_, action) = self.again(phase);
        (events, action)
    }

    fn revert_patch_failed(
        &mut self,
        revert: Revert,
        f: Failure,
        now: Instant,
    ) -> (Vec<Event>, Action) {
        if f.conflict {
            // Written since (a status write): the rollback is sent again at the newest
            // version of a template that still runs what depwatch wrote.
            if let Some(next) = self.after_conflict(Phase::Reverting(revert.clone()), now) {
                return next;
            }
        }
        if let Some(retry) = self.retry(&f, Phase::Reverting(revert.clone()), now) {
            return retry;
        }
        let mut events = Vec::new();
        self.answered_if(&f, &mut events);
        let message = format!("{}; the rollback patch failed: {}", revert.why, f.message);
        let running = Some(revert.plan.after);
        self.finish(events, DeployOutcome::RollbackFailed, message, running)
    }

    /// After a PATCH refused with 409: `next` after a backoff, unless the deadline has
    /// passed. The API server answered: no `ApiUnreachable`.
    fn after_conflict(&mut self, next: Phase, now: Instant) -> Option<(Vec<Event>, Action)> {
        if now >= self.deadline {
            return None;
        }
        let supersedable = !matches!(next, Phase::Reverting(_));
        let delay = self
            .backoff
            .next()
            .unwrap_or(Duration::from_secs(5))
            .min(self.deadline - now);
        self.phase = next;
        Some((
            Vec::new(),
            Action::Sleep {
                delay,
                supersedable,
            },
        ))
    }

    fn reverted(&mut self, revert: Revert, waited: WaitOutcome) -> (Vec<Event>, Action) {
        let running = revert.running();
        let why = &revert.why;
        let (outcome, message) = match waited {
            WaitOutcome::Healthy => (
                DeployOutcome::RolledBack,
                format!("rolled back to {running}: {why}"),
            ),
            WaitOutcome::Unverified(unverified) | WaitOutcome::Applied(unverified) => (
                DeployOutcome::RolledBack,
                format!("rolled back to {running} (unverified: {unverified}): {why}"),
            ),
            WaitOutcome::ChangedOutside { running: now } => {
                return self.changed_outside(running, &now)
            }
            WaitOutcome::Disappeared => return self.disappeared(),
            other => (
                DeployOutcome::RollbackFailed,
                format!("{why}; the rollback did not become healthy: {other}"),
            ),
        };
        self.finish(Vec::new(), outcome, message, Some(running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::depfile;
    use crate::domain::ServiceKey;

    fn images(s: &str) -> Images {
        Images::parse(s)
    }

    #[test]
    fn rollback_images_restore_what_changed_to_the_last_good() {
        // (before, after, last good) → restored
        let table = [
            // The usual case: the deploy changed web; last good is what ran before.
            ("web=w:1", "web=w:2", "web=w:1", "web=w:1"),
            // First deploy ever: nothing recorded as good; the image before is restored.
            ("web=w:1", "web=w:2", "", "web=w:1"),
            // The image before was an unfinished (superseded) rollout: last good wins.
            ("web=w:1.5", "web=w:2", "web=w:1", "web=w:1"),
            // A sidecar the deploy did not touch stays, unless it is not its last good.
            (
                "web=w:1, side=s:1",
                "web=w:2, side=s:1",
                "web=w:1, side=s:1",
                "web=w:1",
            ),
            (
                "web=w:1, side=s:9",
                "web=w:2, side=s:9",
                "web=w:1, side=s:1",
                "side=s:1, web=w:1",
            ),
            // Nothing changed and nothing better known: nothing to restore.
            ("web=w:2", "web=w:2", "", ""),
            ("web=w:2", "web=w:2", "web=w:2", ""),
            // A judged no-op (already patched) restores the last good.
            ("web=w:1", "web=w:2", "web=w:1", "web=w:1"),
            // A container new in this deploy, with no earlier image, cannot be restored.
            ("web=w:1", "web=w:2, new=n:1", "web=w:1", "web=w:1"),
        ];
        for (before, after, good, want) in table {
            assert_eq!(
                rollback_images(&images(before), &images(after), &images(good)),
                images(want),
                "before {before:?}, after {after:?}, last good {good:?}"
            );
        }
    }

    fn desired(trigger: Trigger) -> Desired {
        Desired {
            spec: depfile::parse("web_prod.dep", b"2.0\n").expect("parses"),
            hash: "h2".into(),
            path: "/deps/web_prod.dep".into(),
            trigger,
            actor: "file".into(),
            request_id: String::new(),
            seen_at: Instant::now(),
        }
    }

    fn plan(before: &str, after: &str) -> Plan {
        let before = images(before);
        let after = images(after);
        Plan {
            key: ServiceKey::new("web", "prod").expect("key"),
            kind: crate::domain::WorkloadKind::Deployment,
            digests: Images::new(),
            changes: before.changed_in(&after),
            before,
            after,
            generation: 4,
            uid: "u1".into(),
            paused: false,
            resource_version: "41".into(),
        }
    }

    const SETTINGS: Settings = Settings {
        rollout_timeout: Duration::from_secs(60),
        rollback: true,
    };

    /// Run the machine against scripted answers; returns every event and the actions taken.
    fn run(desired: Desired, known: Known, answers: Vec<Input>) -> (Vec<Event>, Vec<Action>) {
        let t0 = Instant::now();
        let mut m = Lifecycle::new(desired, known, SETTINGS, t0);
        let (mut events, mut action) = m.start();
        let mut actions = vec![action.clone()];
        let mut answers = answers.into_iter();
        let mut now = t0;
        while action != Action::Done {
            if let Action::Sleep { delay: d, .. } = action {
                now += d;
            }
            let input = answers
                .next()
                .unwrap_or_else(|| panic!("no answer for {action:?}; events {events:?}"));
            let (more, next) = m.step(input, now);
            events.extend(more);
            action = next;
            actions.push(action.clone());
        }
        assert!(answers.next().is_none(), "unused answers");
        (events, actions)
    }

    fn finish(events: &[Event]) -> &Finish {
        let finishes: Vec<&Finish> = events
            .iter()
            .filter_map(|e| match e {
                Event::Finished(f) if !f.adopted => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(
            finishes.len(),
            1,
            "exactly one Finished of its own: {events:?}"
        );
        finishes[0]
    }

    /// Every run writes at most one history row (a resumed or adopted row is not new).
    fn rows(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Started { resumed: None, .. } | Event::NotStarted { .. }
                ) || matches!(e, Event::AlreadyRunning { record: true, .. })
            })
            .count()
    }

    /// The usual opening: web planned from w:1 to w:2 and patched to generation 5; then `rest`.
    fn patched_then(rest: Vec<Input>) -> Vec<Input> {
        let mut script = vec![
            Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
            Input::Patched(Ok(5)),
        ];
        script.extend(rest);
        script
    }

    fn failed(transient: bool) -> Failure {
        Failure {
            transient,
            again_at_resync: false,
            conflict: false,
            message: "boom".into(),
        }
    }

    /// A file with checks: `/healthz` baked for 5m, and with `baseline` an error ratio
    /// compared with the value before the PATCH.
    fn verified_desired(baseline: bool) -> Desired {
        let mut text = String::from(
            "version: \"2.0\"\nverify:\n  bake: 5m\n  checks:\n    - http: /healthz\n",
        );
        if baseline {
            text.push_str("    - name: errors\n      prometheus:\n        query: sum(rate(errors_total[1m]))\n        condition: \"<= baseline * 1.2\"\n");
        }
        Desired {
            spec: depfile::parse("web_prod.dep", text.as_bytes()).expect("parses"),
            ..desired(Trigger::File)
        }
    }

    fn passed() -> Input {
        Input::Verified(VerifyOutcome::Passed {
            results: vec![CheckResult {
                name: "GET /healthz".into(),
                samples: 31,
                passed: 31,
                ..CheckResult::default()
            }],
        })
    }

    #[test]
    fn a_verified_deploy_becomes_last_good_only_after_its_bake() {
        let (events, actions) = run(
            verified_desired(false),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Healthy), passed()]),
        );
        // No baseline to measure: plan, patch, wait, then the bake.
        assert!(matches!(&actions[1], Action::Patch { .. }));
        assert!(
            matches!(&actions[3], Action::Verify { applied, .. } if *applied == images("web=w:2"))
        );
        let at = |pred: &dyn Fn(&Event) -> bool| events.iter().position(pred);
        let verifying = at(&|e| matches!(e, Event::Verifying { checks: 1, .. }));
        let finished = at(&|e| matches!(e, Event::Finished(_)));
        assert!(verifying.is_some() && verifying < finished, "{events:?}");
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Succeeded);
        assert!(f.good);
        assert!(
            f.message.contains("verified: GET /healthz 31/31 passed"),
            "{}",
            f.message
        );
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn a_failed_check_rolls_back_and_pins_with_its_values() {
        let reason = "errors: 0.042 > baseline 0.01 × 1.2 for 3 of 5 samples";
        let (events, actions) = run(
            verified_desired(true),
            Known {
                last_good: images("web=w:1"),
                ..Known::default()
            },
            vec![
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Measured(vec![None, Some(0.01)]),
                Input::Patched(Ok(5)),
                Input::Waited(WaitOutcome::Healthy),
                Input::Verified(VerifyOutcome::Failed {
                    reason: reason.into(),
                    results: Vec::new(),
                }),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        // The baseline is measured before the PATCH and handed to the bake.
        assert_eq!(actions[1], Action::Measure);
        assert!(matches!(&actions[2], Action::Patch { .. }));
        assert!(matches!(
            &actions[4],
            Action::Verify { baselines, .. } if baselines.0 == vec![None, Some(0.01)]
        ));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::RolloutFailed { reason: r, .. } if r == &format!("verification failed: {reason}")
        )));
        assert!(matches!(&actions[5], Action::Patch { images: i, .. } if *i == images("web=w:1")));
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RolledBack);
        assert!(!f.good || f.running == Some(images("web=w:1")));
        assert!(
            f.message.contains("0.042 > baseline 0.01 × 1.2"),
            "{}",
            f.message
        );
    }

    #[test]
    fn a_bake_a_stop_interrupted_goes_on_for_the_time_it_had_left() {
        let bake = ResumedBake {
            baked: Duration::from_secs(120),
            baselines: Baselines(vec![None, Some(0.01)]),
        };
        let known = Known {
            last_good: images("web=w:1"),
            interrupted: Some(Unfinished {
                id: 7,
                to: images("web=w:2"),
                bake: Some(bake.clone()),
                ..Unfinished::default()
            }),
            ..Known::default()
        };
        let (events, actions) = run(
            verified_desired(true),
            known,
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Waited(WaitOutcome::Healthy),
                passed(),
            ],
        );
        // Judged on its own row; neither measured nor patched again; baked for the time left
        // against the baselines it measured before its PATCH.
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::Patch { .. } | Action::Measure)));
        assert!(actions.contains(&Action::Verify {
            applied: images("web=w:2"),
            baselines: bake.baselines.clone(),
            baked: bake.baked,
        }));
        assert!(events.iter().any(|e| matches!(
            e,
            Event::Verifying { baked, .. } if *baked == Duration::from_secs(120)
        )));
        assert!(matches!(
            &events[0],
            Event::Started {
                resumed: Some(7),
                ..
            }
        ));
        assert!(finish(&events).good);
    }

    #[test]
    fn a_bake_ends_without_a_verdict_when_superseded_changed_or_gone() {
        // A newer version: the rollout is handed over, never last good.
        let (events, _) = run(
            verified_desired(false),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::Healthy),
                Input::Verified(VerifyOutcome::Superseded),
            ]),
        );
        assert!(events.contains(&Event::HandedOver), "{events:?}");
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::Finished(f) if f.good)));
        // The same when the newer version arrives between two rounds.
        let (events, _) = run(
            verified_desired(false),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Healthy), Input::Superseded]),
        );
        assert!(events.contains(&Event::HandedOver), "{events:?}");
        // Someone else's images: changed outside, not judged.
        let (events, _) = run(
            verified_desired(false),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::Healthy),
                Input::Verified(VerifyOutcome::ChangedOutside {
                    running: images("web=w:9"),
                }),
            ]),
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::ChangedOutside);
        assert!(!f.good);
        // Gone: interrupted, nothing pinned.
        let (events, _) = run(
            verified_desired(false),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::Healthy),
                Input::Verified(VerifyOutcome::Disappeared),
            ]),
        );
        assert_eq!(finish(&events).outcome, DeployOutcome::Interrupted);
    }

    #[test]
    fn a_healthy_deploy_patches_waits_and_becomes_last_good() {
        let (events, actions) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Healthy)]),
        );
        assert!(matches!(&actions[1], Action::Patch { images: i, .. } if *i == images("web=w:2")));
        assert!(matches!(
            actions[2],
            Action::Wait {
                generation: 5,
                supersedable: true,
                ..
            }
        ));
        assert!(
            matches!(&events[0], Event::Started { baseline: Some(b), .. } if *b == images("web=w:1"))
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Succeeded);
        assert!(f.good && f.settled && f.announce);
        assert_eq!(f.running, Some(images("web=w:2")));
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn a_failed_rollout_pins_rolls_back_and_judges_the_rollback() {
        let known = Known {
            last_good: images("web=w:1"),
            ..Known::default()
        };
        let (events, actions) = run(
            desired(Trigger::File),
            known,
            patched_then(vec![
                Input::Waited(WaitOutcome::Failed {
                    reason: "ImagePullBackOff".into(),
                    message: "pod web-1: back-off".into(),
                }),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ]),
        );
        assert!(matches!(&actions[3], Action::Patch { images: i, .. } if *i == images("web=w:1")));
        assert!(matches!(
            actions[4],
            Action::Wait {
                generation: 6,
                supersedable: false,
                ..
            }
        ));
        assert!(events.iter().any(|e| matches!(e, Event::RolloutFailed { outcome: DeployOutcome::Failed, reason } if reason.starts_with("ImagePullBackOff: pod web-1"))));
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RolledBack);
        assert_eq!(f.running, Some(images("web=w:1")));
        assert!(
            !f.good,
            "a rollback restores the last good; it makes nothing new good"
        );
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn a_rollback_that_fails_says_why_in_words() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::TimedOut {
                    last: "0 of 2 updated replicas available".into(),
                }),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Failed {
                    reason: "CrashLoopBackOff".into(),
                    message: "pod web-2 container web: back-off".into(),
                }),
            ]),
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RollbackFailed);
        assert_eq!(
            f.message,
            "rollout not healthy after 1m: 0 of 2 updated replicas available; the rollback did not become healthy: CrashLoopBackOff: pod web-2 container web: back-off"
        );
        assert!(!f.message.contains('{'), "no debug text");
    }

    #[test]
    fn without_rollback_the_failure_is_final_and_announced_once() {
        let mut d = desired(Trigger::File);
        d.spec.rollback = Some(false);
        let (events, actions) = run(
            d,
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Failed {
                reason: "ImagePullBackOff".into(),
                message: "m".into(),
            })]),
        );
        assert_eq!(
            actions
                .iter()
                .filter(|a| matches!(a, Action::Patch { .. }))
                .count(),
            1
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Failed);
        assert!(!f.announce, "RolloutFailed announced it");
        assert_eq!(f.running, Some(images("web=w:2")));
    }

    #[test]
    fn zero_replicas_is_deployed_but_unverified_and_never_last_good() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Unverified(
                "the Deployment has 0 replicas".into(),
            ))]),
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Unverified);
        assert!(!f.good);
        assert!(f.message.contains("0 replicas"), "{}", f.message);
        // Already running at 0 replicas: no row at start-up, and not verified.
        let (events, _) = run(
            desired(Trigger::Startup),
            Known::default(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Health(HealthNow::Unverified),
            ],
        );
        assert_eq!(
            events,
            vec![Event::AlreadyRunning {
                images: images("web=w:2"),
                verified: false,
                record: false
            }]
        );
    }

    #[test]
    fn a_paused_deployment_fails_at_once_without_a_patch_or_a_pin() {
        let mut p = plan("web=w:1", "web=w:2");
        p.paused = true;
        let (events, actions) = run(
            desired(Trigger::File),
            Known::default(),
            vec![Input::Planned(Ok(p))],
        );
        assert!(!actions
            .iter()
            .any(|a| matches!(a, Action::Patch { .. } | Action::Wait { .. })));
        match events.as_slice() {
            [Event::NotStarted {
                message,
                settled: true,
                status: ServiceStatus::Paused,
                ..
            }] => {
                assert!(message.starts_with("Deployment is paused"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::RolloutFailed { .. })));
    }

    #[test]
    fn transient_errors_retry_with_backoff_until_they_succeed() {
        let (events, actions) = run(
            desired(Trigger::File),
            Known::default(),
            vec![
                Input::Planned(Err(failed(true))),
                Input::Slept,
                Input::Planned(Err(failed(true))),
                Input::Slept,
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Patched(Err(failed(true))),
                Input::Slept,
                Input::Patched(Ok(5)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        let sleeps: Vec<Duration> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Sleep { delay: d, .. } => Some(*d),
                _ => None,
            })
            .collect();
        assert_eq!(sleeps.len(), 3);
        assert!(sleeps
            .iter()
            .all(|d| *d >= Duration::from_millis(200) && *d <= Duration::from_secs(10)));
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::ApiUnreachable { .. }))
                .count(),
            3
        );
        assert_eq!(events.iter().filter(|e| **e == Event::ApiBack).count(), 2);
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::RolloutFailed { .. })),
            "never pinned"
        );
        assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded);
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn transient_errors_give_up_at_the_deadline_unpinned_and_unsettled() {
        let mut answers = Vec::new();
        // More than enough failures to pass a 60 s deadline at ≤ 5 s per retry.
        for _ in 0..40 {
            answers.push(Input::Planned(Err(failed(true))));
            answers.push(Input::Slept);
        }
        let t0 = Instant::now();
        let mut m = Lifecycle::new(desired(Trigger::File), Known::default(), SETTINGS, t0);
        let (_, mut action) = m.start();
        let mut now = t0;
        let mut events = Vec::new();
        for input in answers {
            if let Action::Sleep { delay: d, .. } = action {
                now += d;
            }
            let (more, next) = m.step(input, now);
            events.extend(more);
            action = next;
            if action == Action::Done {
                break;
            }
        }
        assert_eq!(action, Action::Done);
        assert!(
            !events.contains(&Event::ApiBack),
            "giving up never says the API server answers"
        );
        assert!(now <= t0 + SETTINGS.rollout_timeout + Duration::from_secs(1));
        match events.last() {
            Some(Event::NotStarted {
                settled: false,
                message,
                ..
            }) => {
                assert!(message.contains("next resync"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn a_permanent_patch_failure_is_one_row() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            vec![
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Patched(Err(failed(false))),
            ],
        );
        assert_eq!(rows(&events), 1);
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Failed);
        assert!(f.settled && f.announce && f.running.is_none());
    }

    #[test]
    fn supersession_ends_the_wait_and_the_retries() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Superseded)]),
        );
        // The rollout is on the cluster: its row stays open for the newer version's deploy.
        assert_eq!(events.last(), Some(&Event::HandedOver));
        assert!(!events.iter().any(|e| matches!(e, Event::Finished(_))));
        // Superseded while its patch is retried: nothing written, the row ends superseded.
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            vec![
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Patched(Err(failed(true))),
                Input::Superseded,
            ],
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Superseded);
        assert!(!f.settled && !f.announce);
        // Superseded while the plan is retried: nothing started, nothing recorded.
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            vec![Input::Planned(Err(failed(true))), Input::Superseded],
        );
        assert_eq!(rows(&events), 0);
        assert!(
            !events.contains(&Event::ApiBack),
            "superseding says nothing of the API server"
        );
    }

    #[test]
    fn suspended_and_pinned_services_are_skipped_unless_an_operator_retries() {
        let pinned = Known {
            pinned: true,
            ..Known::default()
        };
        let (events, actions) = run(desired(Trigger::Resync), pinned.clone(), vec![]);
        assert!(matches!(events.as_slice(), [Event::Skipped(_)]));
        assert_eq!(actions, vec![Action::Done]);
        let (_, actions) = run(
            desired(Trigger::Operator),
            pinned,
            patched_then(vec![Input::Waited(WaitOutcome::Healthy)]),
        );
        assert!(actions.iter().any(|a| matches!(a, Action::Patch { .. })));
        let suspended = Known {
            suspended: true,
            ..Known::default()
        };
        let (events, _) = run(desired(Trigger::Operator), suspended, vec![]);
        assert!(matches!(events.as_slice(), [Event::Skipped(_)]));
    }

    #[test]
    fn an_interrupted_deploy_is_resumed_on_its_own_row_or_closed() {
        let known = Known {
            last_good: images("web=w:1"),
            interrupted: Some(Unfinished {
                id: 7,
                to: images("web=w:2"),
                restore: Images::new(),
                ran_for: Duration::ZERO,
                ..Unfinished::default()
            }),
            ..Known::default()
        };
        // Same content, already patched: judged on row 7, never patched again.
        let (events, actions) = run(
            desired(Trigger::Startup),
            known.clone(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Patch { .. })));
        assert!(
            matches!(&events[0], Event::Started { resumed: Some(7), from, .. } if *from == images("web=w:1"))
        );
        assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded);
        // The file changed since: row 7 is closed, a new deploy starts.
        let (events, _) = run(
            desired(Trigger::Startup),
            known,
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:3"))),
                Input::Patched(Ok(9)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        // The file changed since: a new deploy starts, and row 7 is closed superseded once
        // its patch lands.
        assert!(matches!(&events[0], Event::Started { resumed: None, .. }));
        assert!(matches!(&events[1], Event::Patched { .. }));
        assert!(matches!(
            &events[2],
            Event::CloseInterrupted {
                id: 7,
                outcome: DeployOutcome::Superseded,
                ..
            }
        ));
    }

    #[test]
    fn an_unhealthy_noop_is_judged_and_rolled_back_to_the_last_good() {
        let known = Known {
            last_good: images("web=w:1"),
            ..Known::default()
        };
        let (events, actions) = run(
            desired(Trigger::File),
            known,
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Health(HealthNow::NotHealthy),
                Input::Waited(WaitOutcome::Failed {
                    reason: "CrashLoopBackOff".into(),
                    message: "m".into(),
                }),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(matches!(&actions[3], Action::Patch { images: i, .. } if *i == images("web=w:1")));
        assert_eq!(finish(&events).outcome, DeployOutcome::RolledBack);
        // Healthy already: one "unchanged" row for a file save, none for a resync.
        for (trigger, record) in [(Trigger::File, true), (Trigger::Resync, false)] {
            let (events, _) = run(
                desired(trigger),
                Known::default(),
                vec![
                    Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                    Input::Health(HealthNow::Healthy),
                ],
            );
            assert!(
                matches!(events.as_slice(), [Event::AlreadyRunning { verified: true, record: r, .. }] if *r == record)
            );
        }
    }

    #[test]
    fn rollback_patch_errors_are_retried_then_reported() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::Failed {
                    reason: "ErrImagePull".into(),
                    message: "m".into(),
                }),
                Input::Patched(Err(failed(true))),
                Input::Slept,
                Input::Patched(Err(failed(false))),
            ]),
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RollbackFailed);
        assert!(
            f.message.contains("the rollback patch failed: boom"),
            "{}",
            f.message
        );
        assert_eq!(rows(&events), 1);
    }

    fn unfinished_rollback() -> Known {
        Known {
            last_good: images("web=w:1"),
            pinned: true,
            interrupted: Some(Unfinished {
                id: 8,
                to: images("web=w:2"),
                restore: images("web=w:1"),
                why: "CrashLoopBackOff: m".into(),
                ran_for: Duration::ZERO,
                ..Unfinished::default()
            }),
            ..Known::default()
        }
    }

    #[test]
    fn a_rollback_a_stop_interrupted_is_finished_at_the_next_start_even_when_pinned() {
        // The cluster still runs the failed w:2: the rollback is patched again, on row 8.
        let (events, actions) = run(
            desired(Trigger::Startup),
            unfinished_rollback(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(matches!(
            &events[0],
            Event::Started {
                resumed: Some(8),
                ..
            }
        ));
        assert!(events.contains(&Event::Repin), "{events:?}");
        assert!(events.iter().any(|e| matches!(
            e,
            Event::RollingBack { restore, why }
                if *restore == images("web=w:1") && why.starts_with("CrashLoopBackOff: m")
        )));
        assert!(
            matches!(&actions[1], Action::Patch { images: i, .. } if *i == images("web=w:1")),
            "{actions:?}"
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RolledBack);
        assert!(
            f.message
                .contains("CrashLoopBackOff: m (depwatch stopped during the rollback"),
            "the failure's own reason survives the stop: {}",
            f.message
        );
        assert_eq!(f.running, Some(images("web=w:1")));
        assert_eq!(rows(&events), 0, "no new row: the rollback's own goes on");
        // The rollback's patch had landed before the stop: only awaited, never patched again.
        let (events, actions) = run(
            desired(Trigger::Startup),
            unfinished_rollback(),
            vec![
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(!actions.iter().any(|a| matches!(a, Action::Patch { .. })));
        assert_eq!(finish(&events).outcome, DeployOutcome::RolledBack);
        // The file asks for a newer version since: the rollback is abandoned and row 8 closed;
        // the newer version is deployed from what runs.
        let mut newer = desired(Trigger::Startup);
        newer.hash = "h3".into();
        let known = Known {
            pinned: false,
            ..unfinished_rollback()
        };
        let (events, actions) = run(
            newer,
            known,
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:3"))),
                Input::Patched(Ok(7)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        // Closed once the newer version's patch lands over it.
        assert!(matches!(&events[0], Event::Started { resumed: None, .. }));
        assert!(matches!(
            &events[2],
            Event::CloseInterrupted { id: 8, outcome: DeployOutcome::Superseded, message }
                if message.contains("rollback is abandoned")
        ));
        assert!(matches!(&actions[1], Action::Patch { images: i, .. } if *i == images("web=w:3")));
        assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded);
    }

    #[test]
    fn a_newer_version_during_a_rollback_lets_the_rollback_finish() {
        let (events, actions) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::Failed {
                    reason: "ErrImagePull".into(),
                    message: "m".into(),
                }),
                Input::Patched(Err(failed(true))),
                Input::Superseded,
                Input::Patched(Ok(7)),
                Input::Superseded,
                Input::Waited(WaitOutcome::Healthy),
            ]),
        );
        assert!(
            actions.iter().any(|a| matches!(
                a,
                Action::Sleep {
                    supersedable: false,
                    ..
                }
            )),
            "a rollback's retry is not cut short: {actions:?}"
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::RolledBack, "{}", f.message);
        assert_eq!(rows(&events), 1);
    }

    #[test]
    fn an_outside_change_during_the_rollout_is_not_judged() {
        let (events, actions) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::ChangedOutside {
                running: images("web=evil:1"),
            })]),
        );
        assert!(
            matches!(&actions[2], Action::Wait { applied, .. } if *applied == images("web=w:2"))
        );
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::RolloutFailed { .. })));
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::ChangedOutside);
        assert!(f.message.contains("web=evil:1"), "{}", f.message);
        assert_eq!(f.running, Some(images("web=w:2")), "what depwatch applied");
        assert!(!f.good && f.settled && !f.announce);
    }

    #[test]
    fn a_stop_between_the_row_and_the_patch_goes_on_with_the_same_row() {
        let known = Known {
            interrupted: Some(Unfinished {
                id: 5,
                to: images("web=w:2"),
                restore: Images::new(),
                ran_for: Duration::ZERO,
                ..Unfinished::default()
            }),
            ..Known::default()
        };
        let (events, actions) = run(
            desired(Trigger::Startup),
            known,
            patched_then(vec![Input::Waited(WaitOutcome::Healthy)]),
        );
        assert!(
            matches!(
                &events[0],
                Event::Started {
                    resumed: Some(5),
                    ..
                }
            ),
            "{events:?}"
        );
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::CloseInterrupted { .. })));
        assert!(actions.iter().any(|a| matches!(a, Action::Patch { .. })));
        assert_eq!(rows(&events), 0, "no new row: the same one goes on");
    }

    #[test]
    fn a_resumed_rollouts_timeout_counts_from_its_start() {
        // Started 50s before the stop, with a 30s timeout: judged for the grace only, and the
        // report says how long it really ran.
        let known = Known {
            interrupted: Some(Unfinished {
                id: 7,
                to: images("web=w:2"),
                restore: Images::new(),
                ran_for: Duration::from_secs(50),
                ..Unfinished::default()
            }),
            ..Known::default()
        };
        let t0 = Instant::now();
        let settings = Settings {
            rollout_timeout: Duration::from_secs(30),
            rollback: false,
        };
        let mut m = Lifecycle::new(desired(Trigger::Startup), known, settings, t0);
        let (_, action) = m.start();
        assert_eq!(action, Action::Plan);
        let (_, action) = m.step(Input::Planned(Ok(plan("web=w:2", "web=w:2"))), t0);
        assert!(
            matches!(action, Action::Wait { deadline, .. } if deadline == t0 + RESUME_GRACE),
            "{action:?}"
        );
        let (events, _) = m.step(
            Input::Waited(WaitOutcome::TimedOut {
                last: "0 of 1".into(),
            }),
            t0 + RESUME_GRACE,
        );
        let f = finish(&events);
        assert!(f.message.contains("not healthy after 1m"), "{}", f.message);
        // A fresh rollout still says its own timeout.
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![
                Input::Waited(WaitOutcome::TimedOut { last: "l".into() }),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ]),
        );
        assert!(
            events.iter().any(
                |e| matches!(e, Event::RolloutFailed { reason, .. } if reason.contains("after 1m"))
            ),
            "{events:?}"
        );
    }

    /// A small xorshift generator: the same runs every time.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<T: Clone>(&mut self, from: &[T]) -> T {
            from[(self.next() % from.len() as u64) as usize].clone()
        }
    }

    #[test]
    fn no_sequence_of_answers_reaches_an_internal_error_or_a_second_row() {
        let answers = [
            Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
            Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
            Input::Planned(Err(failed(true))),
            Input::Planned(Err(failed(false))),
            Input::Health(HealthNow::Healthy),
            Input::Health(HealthNow::NotHealthy),
            Input::Patched(Ok(5)),
            Input::Patched(Err(failed(true))),
            Input::Patched(Err(failed(false))),
            Input::Waited(WaitOutcome::Healthy),
            Input::Waited(WaitOutcome::Unverified(
                "the Deployment has 0 replicas".into(),
            )),
            Input::Waited(WaitOutcome::Superseded),
            Input::Waited(WaitOutcome::TimedOut { last: "l".into() }),
            Input::Waited(WaitOutcome::Failed {
                reason: "CrashLoopBackOff".into(),
                message: "m".into(),
            }),
            Input::Waited(WaitOutcome::ChangedOutside {
                running: images("web=x:1"),
            }),
            Input::Slept,
            Input::Superseded,
            Input::Waited(WaitOutcome::Disappeared),
            Input::Observed(Ok(None)),
            Input::Observed(Ok(Some(plan("web=w:2", "web=w:2")))),
            Input::Observed(Ok(Some(plan("web=w:1", "web=w:1")))),
            Input::Observed(Err(failed(true))),
            Input::Planned(Ok(Plan {
                kind: WorkloadKind::StatefulSet,
                ..plan("web=w:1", "web=w:3")
            })),
        ];
        let knowns = [
            Known::default(),
            Known {
                last_good: images("web=w:1"),
                ..Known::default()
            },
            unfinished_rollback(),
            Known {
                interrupted: Some(Unfinished {
                    id: 3,
                    to: images("web=w:2"),
                    restore: Images::new(),
                    ran_for: Duration::ZERO,
                    ..Unfinished::default()
                }),
                pinned: true,
                ..Known::default()
            },
            handed_over(),
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for run in 0..20_000 {
            let known = rng.pick(&knowns);
            let trigger = rng.pick(&[Trigger::File, Trigger::Startup, Trigger::Operator]);
            let t0 = Instant::now();
            let mut m = Lifecycle::new(desired(trigger), known, SETTINGS, t0);
            let (mut events, mut action) = m.start();
            let mut now = t0;
            for _ in 0..40 {
                if action == Action::Done {
                    break;
                }
                now += Duration::from_secs(rng.next() % 20);
                let (more, next) = m.step(rng.pick(&answers), now);
                events.extend(more);
                action = next;
            }
            let text = format!("{events:?}");
            assert!(rows(&events) <= 1, "run {run}: {text}");
            // At most one Finished for this deploy's own row, and one for an adopted row.
            for adopted in [false, true] {
                let finishes = events
                    .iter()
                    .filter(|e| matches!(e, Event::Finished(f) if f.adopted == adopted))
                    .count();
                assert!(finishes <= 1, "run {run}: {text}");
            }
        }
    }

    /// A crash rollout (row 5, content `hc`) handed over to a newer version.
    fn handed_over() -> Known {
        Known {
            last_good: images("web=w:1"),
            interrupted: Some(Unfinished {
                id: 5,
                from: images("web=w:1"),
                to: images("web=w:2"),
                hash: "hc".into(),
                kind: Some(WorkloadKind::Deployment),
                ..Unfinished::default()
            }),
            ..Known::default()
        }
    }

    fn crash() -> Input {
        Input::Waited(WaitOutcome::Failed {
            reason: "CrashLoopBackOff".into(),
            message: "back-off restarting".into(),
        })
    }

    fn adopted_finish(events: &[Event]) -> &Finish {
        events
            .iter()
            .find_map(|e| match e {
                Event::Finished(f) if f.adopted => Some(f),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no adopted Finished in {events:?}"))
    }

    #[test]
    fn a_handed_over_rollout_is_finished_when_the_newer_version_is_never_patched() {
        let observed = || Input::Observed(Ok(Some(plan("web=w:2", "web=w:2"))));
        // Refused at plan (a missing tag), pinned, or its patch refused: the crash rollout is
        // judged on its own row, rolled back and pinned by its own content.
        let refused_at_plan = vec![Input::Planned(Err(failed(false)))];
        let patch_refused = vec![
            Input::Planned(Ok(plan("web=w:2", "web=w:3"))),
            Input::Patched(Err(failed(false))),
        ];
        for (case, known, opening) in [
            ("refused at plan", handed_over(), refused_at_plan),
            ("patch refused", handed_over(), patch_refused),
            (
                "pinned",
                Known {
                    pinned: true,
                    ..handed_over()
                },
                vec![],
            ),
        ] {
            let pinned = known.pinned;
            let mut answers = opening;
            answers.extend([
                observed(),
                crash(),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ]);
            let (events, actions) = run(desired(Trigger::File), known, answers);
            assert!(
                actions.contains(&Action::Observe {
                    kind: Some(WorkloadKind::Deployment)
                }),
                "{case}: {actions:?}"
            );
            let pin = (!pinned).then(|| "hc".to_string());
            assert!(
                events.contains(&Event::Adopted {
                    id: 5,
                    from: images("web=w:1"),
                    to: images("web=w:2"),
                    pin,
                }),
                "{case}: {events:?}"
            );
            assert!(
                actions.contains(&Action::Patch {
                    images: images("web=w:1"),
                    cause:
                        "depwatch: rollback after failed (CrashLoopBackOff: back-off restarting)"
                            .into(),
                }),
                "{case}: rolled back to the last good: {actions:?}"
            );
            let f = adopted_finish(&events);
            assert_eq!(f.outcome, DeployOutcome::RolledBack, "{case}");
            assert!(
                !f.settled,
                "{case}: the file's own content is settled by its own row"
            );
            assert_eq!(f.running, Some(images("web=w:1")), "{case}");
        }
    }

    #[test]
    fn a_handed_over_rollout_is_closed_superseded_only_once_the_newer_patch_lands() {
        let (events, _) = run(
            desired(Trigger::File),
            handed_over(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:3"))),
                Input::Patched(Ok(6)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        let closed = events
            .iter()
            .position(|e| {
                matches!(
                    e,
                    Event::CloseInterrupted {
                        id: 5,
                        outcome: DeployOutcome::Superseded,
                        ..
                    }
                )
            })
            .expect("closed");
        let patched = events
            .iter()
            .position(|e| matches!(e, Event::Patched { .. }))
            .expect("patched");
        assert!(patched < closed, "{events:?}");
        assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded);
        // Superseded again before its own patch landed: row 5 stays open for the next one.
        let (events, _) = run(
            desired(Trigger::File),
            handed_over(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:3"))),
                Input::Patched(Err(failed(true))),
                Input::Superseded,
            ],
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::CloseInterrupted { .. })),
            "{events:?}"
        );
    }

    #[test]
    fn what_the_workload_runs_decides_how_an_adopted_rollout_ends() {
        let plan_of = |live: &str| Input::Observed(Ok(Some(plan(live, live))));
        // (what is observed, outcome of row 5's close)
        let table = [
            (plan_of("web=w:1"), Some(DeployOutcome::Superseded)),
            (plan_of("web=x:9"), Some(DeployOutcome::ChangedOutside)),
            (Input::Observed(Ok(None)), Some(DeployOutcome::Interrupted)),
            (
                Input::Observed(Err(failed(false))),
                Some(DeployOutcome::Interrupted),
            ),
            // Not answered: the row stays open for the next deploy or start.
            (Input::Observed(Err(failed(true))), None),
        ];
        for (seen, want) in table {
            let text = format!("{seen:?}");
            let (events, actions) = run(
                desired(Trigger::File),
                handed_over(),
                vec![Input::Planned(Err(failed(false))), seen],
            );
            let closed = events.iter().find_map(|e| match e {
                Event::CloseInterrupted { id: 5, outcome, .. } => Some(*outcome),
                _ => None,
            });
            assert_eq!(closed, want, "{text}: {events:?}");
            assert!(
                !actions.iter().any(|a| matches!(a, Action::Patch { .. })),
                "{text}"
            );
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::RolloutFailed { .. } | Event::Adopted { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn a_workload_now_of_another_kind_finishes_the_old_rollout_then_plans_again() {
        let sts = |before: &str, after: &str| Plan {
            kind: WorkloadKind::StatefulSet,
            ..plan(before, after)
        };
        let (events, actions) = run(
            desired(Trigger::File),
            handed_over(),
            vec![
                Input::Planned(Ok(sts("web=w:1", "web=w:3"))),
                Input::Observed(Ok(Some(plan("web=w:2", "web=w:2")))),
                Input::Waited(WaitOutcome::Healthy),
                Input::Planned(Ok(sts("web=w:1", "web=w:3"))),
                Input::Patched(Ok(2)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert_eq!(
            actions[1],
            Action::Observe {
                kind: Some(WorkloadKind::Deployment)
            }
        );
        let f = adopted_finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Succeeded);
        assert!(!f.announce && !f.settled);
        assert!(matches!(&actions[3], Action::Plan));
        assert!(matches!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Started { resumed: None, .. }))
                .count(),
            1
        ));
        assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded);
    }

    #[test]
    fn a_resumed_row_is_never_judged_on_another_versions_template() {
        // Row 5 deployed w:2; the cluster runs what the file asks for now (w:3): row 5 is
        // closed, and w:3 is judged on a row of its own.
        let (events, actions) = run(
            desired(Trigger::Startup),
            handed_over(),
            vec![
                Input::Planned(Ok(plan("web=w:3", "web=w:3"))),
                // Read from the live object, not the plan's (perhaps lagging) watch.
                Input::Observed(Ok(Some(plan("web=w:3", "web=w:3")))),
                Input::Planned(Ok(plan("web=w:3", "web=w:3"))),
                Input::Health(HealthNow::NotHealthy),
                crash(),
                Input::Patched(Ok(7)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(matches!(&actions[1], Action::Observe { .. }));
        assert!(matches!(
            &events[0],
            Event::CloseInterrupted {
                id: 5,
                outcome: DeployOutcome::Superseded,
                ..
            }
        ));
        assert!(matches!(&events[1], Event::Started { resumed: None, .. }));
        assert!(matches!(&actions[3], Action::CheckHealth { .. }));
        assert_eq!(finish(&events).outcome, DeployOutcome::RolledBack);
    }

    #[test]
    fn a_workload_that_disappears_is_no_verdict_on_the_version() {
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            patched_then(vec![Input::Waited(WaitOutcome::Disappeared)]),
        );
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Interrupted);
        assert!(!f.settled, "the next resync plans afresh");
        assert!(f.message.contains("disappeared"));
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::RolloutFailed { .. } | Event::Repin)));
    }

    #[test]
    fn an_older_open_row_is_finished_when_the_newest_never_reached_the_workload() {
        // Row 5 (the crash) was handed over; row 6 started for w:3 and a stop came before its
        // patch. The file now names a missing tag: row 6 is closed, row 5 judged.
        let known = Known {
            interrupted: Some(Unfinished {
                id: 6,
                from: images("web=w:2"),
                to: images("web=w:3"),
                kind: Some(WorkloadKind::Deployment),
                ..Unfinished::default()
            }),
            older: handed_over().interrupted.into_iter().collect(),
            ..handed_over()
        };
        let (events, _) = run(
            desired(Trigger::Startup),
            known,
            vec![
                Input::Planned(Err(failed(false))),
                Input::Observed(Ok(Some(plan("web=w:2", "web=w:2")))),
                crash(),
                Input::Patched(Ok(8)),
                Input::Waited(WaitOutcome::Healthy),
            ],
        );
        assert!(events.iter().any(|e| matches!(
            e,
            Event::CloseInterrupted {
                id: 6,
                outcome: DeployOutcome::Superseded,
                ..
            }
        )));
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Adopted { id: 5, .. })));
        assert_eq!(adopted_finish(&events).outcome, DeployOutcome::RolledBack);
    }

    /// The cluster and the record of one service, as the invariant test models them.
    #[derive(Debug)]
    struct World {
        template: Images,
        generation: i64,
        /// Open rows, oldest first.
        open: Vec<Unfinished>,
        next_id: i64,
        last_good: Images,
        failed_hash: String,
    }

    /// One deploy of `version`, as the driver and the recorder would carry it out; `None`
    /// when the process was killed part way.
    struct Run<'a> {
        world: &'a mut World,
        rng: &'a mut Rng,
        desired: Desired,
        /// A newer version may arrive, and the process may be killed.
        chaos: bool,
        current: Option<i64>,
        pin: Option<String>,
        adopted: bool,
        new_rows: usize,
        superseded: bool,
    }

    fn behaviour(images: &Images) -> &'static str {
        let image = images.get("web").map(String::as_str).unwrap_or_default();
        ["crash", "hang"]
            .into_iter()
            .find(|b| image.contains(b))
            .unwrap_or("good")
    }

    impl Run<'_> {
        fn apply(&mut self, events: &[Event]) {
            for e in events {
                self.apply_one(e);
            }
        }

        fn row(&mut self) -> Option<&mut Unfinished> {
            let id = self.current?;
            self.world.open.iter_mut().find(|u| u.id == id)
        }

        fn pin(&mut self) {
            if !self.adopted {
                self.world.failed_hash = self.desired.hash.clone();
            } else if let Some(p) = &self.pin {
                self.world.failed_hash = p.clone();
            }
        }

        fn apply_one(&mut self, e: &Event) {
            let w = &mut *self.world;
            match e {
                Event::Started {
                    resumed: None,
                    from,
                    to,
                    ..
                } => {
                    w.next_id += 1;
                    w.open.push(Unfinished {
                        id: w.next_id,
                        from: from.clone(),
                        to: to.clone(),
                        kind: Some(WorkloadKind::Deployment),
                        hash: self.desired.hash.clone(),
                        ..Unfinished::default()
                    });
                    self.current = Some(w.next_id);
                    self.new_rows += 1;
                }
                Event::Started { resumed, .. } => self.current = *resumed,
                Event::NotStarted { .. } => self.new_rows += 1,
                Event::AlreadyRunning { record: true, .. } => self.new_rows += 1,
                Event::Adopted { id, pin, .. } => {
                    (self.current, self.pin, self.adopted) = (Some(*id), pin.clone(), true);
                }
                Event::CloseInterrupted { id, .. } => w.open.retain(|u| u.id != *id),
                Event::RollingBack { restore, .. } => {
                    if let Some(row) = self.row() {
                        row.restore = restore.clone();
                    }
                }
                Event::RolloutFailed { .. } | Event::Repin => self.pin(),
                Event::Finished(f) => {
                    let id = self.current.take();
                    w.open.retain(|u| Some(u.id) != id);
                    if let (true, Some(running)) = (f.good, &f.running) {
                        w.last_good = running.clone();
                    }
                    if !f.adopted
                        && matches!(
                            f.outcome,
                            DeployOutcome::Succeeded | DeployOutcome::Unverified
                        )
                    {
                        w.failed_hash.clear();
                    }
                }
                _ => {}
            }
        }

        fn answer(&mut self, action: &Action) -> Input {
            let w = &mut *self.world;
            let as_is = || Plan {
                generation: w.generation,
                ..plan(&w.template.to_string(), &w.template.to_string())
            };
            match action {
                Action::Plan => {
                    let version = self.desired.requested();
                    if version.contains("missing") {
                        return Input::Planned(Err(Failure {
                            transient: false,
                            again_at_resync: true,
                            conflict: false,
                            message: "not in the registry".into(),
                        }));
                    }
                    let after = w.template.with(&images(&format!("web=w:{version}")));
                    Input::Planned(Ok(Plan {
                        generation: w.generation,
                        ..plan(&w.template.to_string(), &after.to_string())
                    }))
                }
                Action::Observe { .. } => Input::Observed(Ok(Some(as_is()))),
                // The world's files declare no checks.
                Action::Measure => Input::Measured(Vec::new()),
                Action::Verify { .. } => Input::Verified(VerifyOutcome::Passed {
                    results: Vec::new(),
                }),
                Action::CheckHealth { .. } => Input::Health(match behaviour(&w.template) {
                    "good" => HealthNow::Healthy,
                    _ => HealthNow::NotHealthy,
                }),
                Action::Patch { images, .. } => {
                    w.template = w.template.with(images);
                    w.generation += 1;
                    Input::Patched(Ok(w.generation))
                }
                Action::Wait {
                    supersedable: true, ..
                } if self.chaos && self.rng.next().is_multiple_of(3) => {
                    self.superseded = true;
                    Input::Waited(WaitOutcome::Superseded)
                }
                Action::Wait { applied, .. } if *applied != w.template => {
                    Input::Waited(WaitOutcome::ChangedOutside {
                        running: w.template.clone(),
                    })
                }
                Action::Wait { .. } => Input::Waited(match behaviour(&w.template) {
                    "good" => WaitOutcome::Healthy,
                    "crash" => WaitOutcome::Failed {
                        reason: "CrashLoopBackOff".into(),
                        message: "m".into(),
                    },
                    _ => WaitOutcome::TimedOut {
                        last: "0 of 1 ready".into(),
                    },
                }),
                Action::Sleep { .. } | Action::Done => Input::Slept,
            }
        }

        /// Drive the deploy to its end; `false` when it was killed part way.
        fn go(&mut self) -> bool {
            let w = &*self.world;
            let mut open = w.open.iter().rev().cloned();
            let known = Known {
                last_good: w.last_good.clone(),
                pinned: w.failed_hash == self.desired.hash,
                interrupted: open.next(),
                older: open.collect(),
                ..Known::default()
            };
            let now = Instant::now();
            let mut m = Lifecycle::new(self.desired.clone(), known, SETTINGS, now);
            let (events, mut action) = m.start();
            self.apply(&events);
            while action != Action::Done {
                if self.chaos && self.rng.next().is_multiple_of(12) {
                    return false;
                }
                let input = self.answer(&action);
                let (events, next) = m.step(input, now);
                self.apply(&events);
                action = next;
            }
            true
        }
    }

    fn desired_version(version: &str, trigger: Trigger) -> Desired {
        Desired {
            spec: depfile::parse("web_prod.dep", format!("{version}\n").as_bytes())
                .expect("parses"),
            hash: format!("h-{version}"),
            ..desired(trigger)
        }
    }

    /// The rule of this module, as an invariant: after any sequence of versions (good, crash,
    /// hang, missing), newer versions arriving mid-rollout and kills at any step, once the
    /// last deploy is over the workload never runs a template depwatch wrote whose verdict
    /// failed or was never made, every row is closed, and each deploy wrote one row at most.
    #[test]
    fn no_sequence_of_versions_supersedes_and_kills_leaves_a_failing_rollout_running() {
        let versions = [
            "2",
            "3-crash",
            "4-missing",
            "5-hang",
            "6",
            "7-crash",
            "8-missing",
        ];
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..5_000 {
            let mut world = World {
                template: images("web=w:1"),
                generation: 1,
                open: Vec::new(),
                next_id: 0,
                last_good: images("web=w:1"),
                failed_hash: String::new(),
            };
            let steps = 1 + rng.next() % 7;
            let mut version = rng.pick(&versions);
            let mut trigger = Trigger::File;
            let mut log = Vec::new();
            for step in 0..=steps {
                let last = step == steps;
                let mut run = Run {
                    world: &mut world,
                    rng: &mut rng,
                    desired: desired_version(version, trigger),
                    chaos: !last,
                    current: None,
                    pin: None,
                    adopted: false,
                    new_rows: 0,
                    superseded: false,
                };
                let finished = run.go();
                let (rows, superseded) = (run.new_rows, run.superseded);
                log.push(format!(
                    "{version} ({trigger}): finished {finished}, superseded {superseded}"
                ));
                assert!(rows <= 1, "case {case}: {log:?} {world:?}");
                // A kill may come back to the same file; a supersede is always a newer one.
                trigger = if finished {
                    Trigger::File
                } else {
                    Trigger::Startup
                };
                if superseded || rng.next().is_multiple_of(2) {
                    version = rng.pick(&versions);
                }
            }
            assert_eq!(
                behaviour(&world.template),
                "good",
                "case {case}: the workload is left on a failing template: {log:?} {world:?}"
            );
            assert!(
                world.open.is_empty(),
                "case {case}: rows left open: {log:?} {world:?}"
            );
        }
    }

    #[test]
    fn a_save_another_replica_already_acted_on_is_not_a_second_row() {
        let already = Known {
            settled: "h2".into(),
            ..Known::default()
        };
        let (events, _) = run(
            desired(Trigger::File),
            already,
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Health(HealthNow::Healthy),
            ],
        );
        assert_eq!(rows(&events), 0, "{events:?}");
        let (events, _) = run(
            desired(Trigger::File),
            Known::default(),
            vec![
                Input::Planned(Ok(plan("web=w:2", "web=w:2"))),
                Input::Health(HealthNow::Healthy),
            ],
        );
        assert_eq!(
            rows(&events),
            1,
            "a new save of what runs is one unchanged row"
        );
    }

    fn conflict() -> Failure {
        Failure {
            transient: true,
            again_at_resync: false,
            conflict: true,
            message: "Deployment web was written after depwatch read it (409 Conflict)".into(),
        }
    }

    #[test]
    fn a_forward_patch_met_by_a_newer_write_plans_again_on_the_same_row() {
        // (case, the plan made again, what follows it, the images patched the second time)
        let table = [
            (
                "a status write moved the version: the same images are patched again",
                plan("web=w:1", "web=w:2"),
                vec![Input::Patched(Ok(6)), Input::Waited(WaitOutcome::Healthy)],
                Some(images("web=w:2")),
            ),
            (
                "another replica already wrote them: judged, not patched",
                plan("web=w:2", "web=w:2"),
                vec![Input::Waited(WaitOutcome::Healthy)],
                None,
            ),
        ];
        for (case, again, rest, repatched) in table {
            let mut script = vec![
                Input::Planned(Ok(plan("web=w:1", "web=w:2"))),
                Input::Patched(Err(conflict())),
                Input::Slept,
                Input::Planned(Ok(again)),
            ];
            script.extend(rest);
            let (events, actions) = run(desired(Trigger::File), Known::default(), script);
            assert_eq!(rows(&events), 1, "{case}: one row: {events:?}");
            assert!(
                matches!(
                    actions[2],
                    Action::Sleep {
                        supersedable: true,
                        ..
                    }
                ),
                "{case}: backs off: {actions:?}"
            );
            assert_eq!(actions[3], Action::Plan, "{case}: plans again");
            assert!(
                !events
                    .iter()
                    .any(|e| matches!(e, Event::ApiUnreachable { .. })),
                "{case}: the API server answered: {events:?}"
            );
            let patches: Vec<&Images> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Patch { images, .. } => Some(images),
                    _ => None,
                })
                .collect();
            assert_eq!(
                patches.len(),
                1 + usize::from(repatched.is_some()),
                "{case}"
            );
            if let Some(want) = repatched {
                assert_eq!(patches[1], &want, "{case}");
            }
            assert_eq!(finish(&events).outcome, DeployOutcome::Succeeded, "{case}");
        }
    }

    #[test]
    fn conflicts_until_the_deadline_fail_the_row_unsettled_and_nothing_is_written() {
        let mut script = vec![Input::Planned(Ok(plan("web=w:1", "web=w:2")))];
        // More than enough to pass a 60 s deadline at ≤ 5 s per backoff.
        for _ in 0..40 {
            script.push(Input::Patched(Err(conflict())));
            script.push(Input::Slept);
            script.push(Input::Planned(Ok(plan("web=w:1", "web=w:2"))));
        }
        let t0 = Instant::now();
        let mut m = Lifecycle::new(desired(Trigger::File), Known::default(), SETTINGS, t0);
        let (mut events, mut action) = m.start();
        let mut now = t0;
        let mut script = script.into_iter();
        while action != Action::Done {
            if let Action::Sleep { delay, .. } = action {
                now += delay;
            }
            let input = script.next().expect("enough answers");
            let (more, next) = m.step(input, now);
            events.extend(more);
            action = next;
        }
        assert_eq!(rows(&events), 1, "{events:?}");
        let f = finish(&events);
        assert_eq!(f.outcome, DeployOutcome::Failed);
        assert!(!f.settled, "tried again at the next resync");
        assert!(f.message.contains("409 Conflict"), "{}", f.message);
        assert!(now <= t0 + SETTINGS.rollout_timeout + Duration::from_secs(5));
    }

    #[test]
    fn a_rollback_met_by_a_newer_write_is_sent_again_and_finishes() {
        let (events, actions) = run(
            desired(Trigger::File),
            Known {
                last_good: images("web=w:1"),
                ..Known::default()
            },
            patched_then(vec![
                crash(),
                Input::Patched(Err(conflict())),
                Input::Slept,
                Input::Patched(Ok(7)),
                Input::Waited(WaitOutcome::Healthy),
            ]),
        );
        let rollbacks: Vec<&Images> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Patch { images, cause } if cause.contains("rollback") => Some(images),
                _ => None,
            })
            .collect();
        assert_eq!(
            rollbacks,
            [&images("web=w:1"); 2],
            "sent again: {actions:?}"
        );
        assert!(
            matches!(
                actions[4],
                Action::Sleep {
                    supersedable: false,
                    ..
                }
            ),
            "a rollback is seen through: {actions:?}"
        );
        assert_eq!(finish(&events).outcome, DeployOutcome::RolledBack);
        assert_eq!(rows(&events), 1);
    }
}
