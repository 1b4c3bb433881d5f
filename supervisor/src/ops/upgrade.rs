//! The rolling upgrade: performs the actions of an [`UpgradePlan`] against the cluster.
//!
//! How each plan action is performed:
//!
//! | action          | what the supervisor does                              | done when                         |
//! |-----------------|-------------------------------------------------------|-----------------------------------|
//! | stop            | slot command STOP; SIGKILL at `shutdown_ms`            | the process has exited            |
//! | start           | spawn the binary in the slot as a standby              | the engine wrote its slot record  |
//! | attach          | (the engine attaches by itself)                        | it is a hot standby of the epoch  |
//! | switchover      | post SWITCHOVER(target), wait for the ack              | target active, old active hot     |
//! | accept          | watch the new active for the soak, run `accept_cmd`    | verdict                           |
//! | enable features | post ENABLE_FEATURES(standby's enableable mask)        | both engines report the features  |
//!
//! The upgrade writes its [`UpgradeRecord`] before performing each action and after each
//! outcome, and removes it at the end. Before the first action a compatibility check
//! ([`Probe`]) starts the new binary once in the spare slot.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_control::control::{realtime_ns, slot_name, SLOTS};

use super::accept::upgrade_acceptance;
use super::action::{Exec, Judged, Polled};
use super::probe::Probe;
use super::{active_and_standby, emit, plan_slot, Final};
use crate::cluster::ClusterOps;
use crate::config::{check_binary, AcceptanceConfig};
use crate::plan::{Action, Event, Next, Outcome, Planned, UpgradePlan, UpgradeSpec, Verdict};
use crate::proto::{Code, Reply, UpgradeEvent, UpgradeRequest};
use crate::record::{self, RecordedEngine, UpgradeRecord};

/// Test hook, only in a build with the `fault-injection` feature (the root package's tests):
/// an upgrade holds before performing the first action of this step number (after recording
/// it as in flight), so that a test can kill the supervisor there. A production build does
/// not read it.
pub const TEST_PAUSE_ENV: &str = "UNDERSTUDY_TEST_UPGRADE_PAUSE_AT_STEP";

/// An upgrade's progress before its first action (its compatibility check).
pub(crate) const UPGRADE_STARTING: &str = "starting";

/// The step [`TEST_PAUSE_ENV`] names, in a `fault-injection` build.
#[cfg(feature = "fault-injection")]
fn test_pause_at() -> Option<u8> {
    std::env::var(TEST_PAUSE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
}

/// A production build never holds an upgrade.
#[cfg(not(feature = "fault-injection"))]
fn test_pause_at() -> Option<u8> {
    None
}

/// A rolling upgrade in progress.
pub(crate) struct UpgradeRun {
    plan: UpgradePlan,
    exec: Option<Exec>,
    /// An answer of `next_action` taken while reconciling after a death.
    pending: Option<Next>,
    abort: Option<String>,
    forced: Option<Outcome>,
    pub(crate) accept_cmd: Option<String>,
    /// The acceptance bounds of this upgrade: the config's, with the request's overrides.
    acceptance: AcceptanceConfig,
    old_binary: PathBuf,
    pub(crate) new_binary: PathBuf,
    pub(crate) current: String,
    started: Instant,
    watchers: Vec<Sender<Reply>>,
    /// What is on disk for a restarted supervisor (rewritten at every change).
    record: UpgradeRecord,
    /// Writing the record failed (reported once).
    record_failed: bool,
    /// Taken up after a supervisor restart: where the previous supervisor stopped.
    pub(crate) resumed_at: Option<String>,
    /// [`TEST_PAUSE_ENV`].
    pause_at: Option<u8>,
    /// Holding there.
    paused: bool,
    /// `rollback` of a completed upgrade: the plan's "new version" is the previous one, and
    /// the events and the result say so.
    pub(crate) rollback: bool,
    /// The compatibility check of the new binary, before the plan takes anything out of
    /// service.
    probe: Option<Probe>,
    /// The result, once the upgrade has ended: the supervisor adds its status and sends it.
    result: Option<Final>,
}

impl UpgradeRun {
    /// Checks the request and the cluster, writes the record: the upgrade begins.
    pub(crate) fn begin(
        cluster: &mut dyn ClusterOps,
        request: UpgradeRequest,
        reply: Sender<Reply>,
    ) -> Result<UpgradeRun, Reply> {
        check_binary(&request.binary).map_err(|e| Reply::result(Code::BadConfig, e.to_string()))?;
        let acceptance = upgrade_acceptance(cluster.config(), &request)
            .map_err(|e| Reply::result(Code::BadConfig, e))?;
        let (active, standby, old_binary) = starting_point(cluster)?;
        let spec = UpgradeSpec {
            active: plan_slot(active),
            standby: plan_slot(standby),
            old_binary: old_binary.clone(),
            new_binary: request.binary.clone(),
            keep_standby: request.keep_standby,
            no_enable: request.no_enable,
            accept_for_ms: acceptance.accept_for_ms,
            timeouts: cluster.config().timeouts.clone(),
        };
        let plan = UpgradePlan::new(spec).map_err(|e| Reply::result(Code::Usage, e.to_string()))?;
        let record = UpgradeRecord::new(&cluster.config().cluster, plan.spec(), plan.checkpoint());
        let mut run = UpgradeRun {
            plan,
            exec: None,
            pending: None,
            abort: None,
            forced: None,
            accept_cmd: acceptance.accept_cmd.clone(),
            acceptance,
            old_binary,
            new_binary: request.binary,
            current: UPGRADE_STARTING.into(),
            started: Instant::now(),
            watchers: vec![reply],
            record,
            record_failed: false,
            resumed_at: None,
            pause_at: test_pause_at(),
            paused: false,
            rollback: false,
            // With `keep_standby` the plan's first action starts the new version in the
            // spare slot anyway, before anything is taken out of service.
            probe: (!request.keep_standby).then(|| Probe::new(cluster)),
            result: None,
        };
        run.write_record(cluster).map_err(|e| {
            Reply::result(
                Code::Failed,
                format!(
                    "{e}; the upgrade did not begin (a supervisor restart could not settle it)"
                ),
            )
        })?;
        cluster.outcomes().interrupted = None;
        let a = &run.acceptance;
        info!(
            from = %run.old_binary.display(),
            to = %run.new_binary.display(),
            keep_standby = run.plan.spec().keep_standby,
            accept_for_ms = a.accept_for_ms,
            max_error_rate = a.max_error_rate,
            count_refusals = a.count_refusals,
            max_latency_us_p99 = a.max_latency_us_p99,
            accept_cmd = a.accept_cmd.as_deref().unwrap_or(""),
            "upgrade begins"
        );
        Ok(run)
    }

    /// A plan resumed after a supervisor restart, from its record.
    pub(crate) fn resumed(
        cluster: &mut dyn ClusterOps,
        record: UpgradeRecord,
        plan: UpgradePlan,
    ) -> UpgradeRun {
        let mut run = UpgradeRun {
            plan,
            exec: None,
            pending: None,
            abort: None,
            forced: None,
            accept_cmd: None,
            acceptance: cluster.config().acceptance.clone(),
            old_binary: record.old_binary.clone(),
            new_binary: record.new_binary.clone(),
            current: "resuming".into(),
            started: Instant::now(),
            watchers: Vec::new(),
            resumed_at: Some(record.progress.clone()),
            record,
            record_failed: false,
            pause_at: None,
            paused: false,
            rollback: false,
            probe: None,
            result: None,
        };
        run.persist(cluster);
        run
    }

    /// The result, once the upgrade has ended.
    pub(crate) fn take_result(&mut self) -> Option<Final> {
        self.result.take()
    }

    /// The engines the plan knows, with their processes: for the record.
    fn recorded_engines(&self, cluster: &dyn ClusterOps) -> Vec<RecordedEngine> {
        let starting = match self.plan.checkpoint().in_flight {
            Some(Action::Start { slot, version, .. }) => Some((slot, version)),
            _ => None,
        };
        (0..SLOTS)
            .filter_map(|slot| {
                let proc = cluster.engine(slot)?;
                let version = self
                    .plan
                    .cluster()
                    .engine(plan_slot(slot))
                    .map(|e| e.version)
                    .or_else(|| {
                        starting
                            .filter(|(s, _)| *s == plan_slot(slot))
                            .map(|(_, v)| v)
                    })?;
                Some(RecordedEngine {
                    slot: plan_slot(slot),
                    pid: proc.identity.pid,
                    start_time_ticks: proc.identity.start_time_ticks,
                    version,
                })
            })
            .collect()
    }

    /// Writes the record as the plan stands now.
    fn write_record(&mut self, cluster: &dyn ClusterOps) -> Result<(), record::RecordError> {
        self.record.checkpoint = self.plan.checkpoint();
        self.record.progress = self.current.clone();
        self.record.supervisor_pid = std::process::id();
        self.record.updated_at_ns = realtime_ns();
        self.record.command_seq = self.exec.as_ref().and_then(Exec::command_seq);
        self.record.engines = self.recorded_engines(cluster);
        record::store(cluster.dir(), &self.record)
    }

    /// [`Self::write_record`]; a failure on the forward path aborts the upgrade, since a
    /// supervisor restart could no longer settle it.
    fn persist(&mut self, cluster: &dyn ClusterOps) {
        if let Err(e) = self.write_record(cluster) {
            if !self.record_failed {
                self.record_failed = true;
                error!("{e}; the upgrade is aborted: a supervisor restart could not settle it");
            }
            if self.abort.is_none() && self.plan.checkpoint().recovery.is_none() {
                self.abort = Some(format!("{e}; a supervisor restart could not settle it"));
            }
        }
    }

    /// `rollback` during the upgrade: the next forward action fails (an acceptance check
    /// in progress is rejected), so the plan recovers to the old version.
    pub(crate) fn request_abort(&mut self, reply: Sender<Reply>) {
        info!("rollback requested during the upgrade");
        self.abort = Some("rollback requested by the operator".into());
        self.watchers.push(reply);
    }

    fn event(
        &self,
        event: &str,
        planned: &Planned,
        result: Option<String>,
        elapsed: Option<Duration>,
    ) {
        let p = planned.progress;
        let data = UpgradeEvent {
            event: event.into(),
            step: p.number,
            total: p.total,
            name: self.words(p.step.name()),
            recovery: p.recovery.map(|r| r.to_string()),
            action: self.words(&planned.action.to_string()),
            result: result.clone(),
            elapsed_ms: elapsed.map(|d| d.as_millis() as u64),
        };
        let message = self.words(&match &result {
            None => format!("{planned}"),
            Some(r) => format!("{planned}: {r}"),
        });
        emit(
            &self.watchers,
            &Reply::event(message, serde_json::to_value(data).unwrap_or_default()),
        );
    }

    /// The plan's words for an upgrade, or for a rollback of a completed upgrade, whose
    /// target is the version that ran before it.
    fn words(&self, text: &str) -> String {
        if !self.rollback {
            return text.to_owned();
        }
        text.replace("upgrade completed", "rollback completed")
            .replace("upgrade rolled back", "rollback undone")
            .replace("upgrade aborted", "rollback aborted")
            .replace("new standby", "previous-version standby")
            .replace("old standby", "current standby")
            .replace("old active", "current active")
            .replace("old engine", "current engine")
            .replace("the new version", "the previous version")
            .replace("new-version", "previous-version")
            .replace("new version", "previous version")
            .replace("new features", "features")
            .replace("the old version", "the version being rolled back")
            .replace("old version", "version being rolled back")
    }

    fn report(&mut self, cluster: &dyn ClusterOps, event: Event) {
        if let Err(e) = self.plan.on_event(event) {
            self.forced = Some(Outcome::RollbackFailed {
                reason: format!(
                    "the supervisor's report does not fit the upgrade plan ({e}); the cluster is as `understudy status` shows"
                ),
            });
        }
        self.persist(cluster);
    }

    /// One turn; `true` once the upgrade has ended.
    pub(crate) fn step(&mut self, cluster: &mut dyn ClusterOps) -> bool {
        if self.paused {
            return false;
        }
        if let Some(ended) = self.step_probe(cluster) {
            return ended;
        }
        loop {
            if let Some(outcome) = self.forced.take() {
                self.cancel_exec(cluster);
                self.finish(cluster, outcome);
                return true;
            }
            if let Some(mut exec) = self.exec.take() {
                let soak = Judged {
                    acceptance: &self.acceptance,
                    accept_cmd: self.accept_cmd.as_deref(),
                    abort: self.abort.as_deref(),
                };
                match exec.poll(cluster, &soak) {
                    Polled::Pending => {
                        self.exec = Some(exec);
                        return false;
                    }
                    Polled::Spawned => {
                        self.exec = Some(exec);
                        // With the process it started, for a restarted supervisor.
                        self.persist(cluster);
                        return false;
                    }
                    Polled::Ended(event) => {
                        self.ended(cluster, &exec, event);
                        continue;
                    }
                }
            }
            let next = self
                .pending
                .take()
                .unwrap_or_else(|| self.plan.next_action());
            match next {
                Next::Perform(planned) => {
                    if let Some(going_on) = self.perform(cluster, planned) {
                        return going_on;
                    }
                }
                Next::Wait(id) => {
                    self.forced = Some(Outcome::RollbackFailed {
                        reason: format!("internal: the plan waits for action {id}, which the supervisor is not performing"),
                    });
                }
                Next::Finished(outcome) => {
                    self.finish(cluster, outcome);
                    return true;
                }
            }
        }
    }

    /// The compatibility check's turn: `None` once it passed (the plan goes on this turn),
    /// else what [`Self::step`] returns.
    fn step_probe(&mut self, cluster: &mut dyn ClusterOps) -> Option<bool> {
        let probe = self.probe.as_mut()?;
        let binary = self.new_binary.clone();
        let began = probe.spawned;
        let verdict = probe.poll(cluster, &binary);
        if !began && verdict.is_none() {
            emit(
                &self.watchers,
                &Reply::event(
                    format!(
                        "compatibility check: {} starts as a standby in the spare slot",
                        binary.display()
                    ),
                    serde_json::json!({ "event": "compatibility-check" }),
                ),
            );
        }
        let verdict = match verdict {
            None => return Some(false),
            Some(verdict) => verdict,
        };
        let text = match &verdict {
            Ok(()) => "compatibility check passed".to_string(),
            Err(e) => format!("compatibility check failed: {e}"),
        };
        emit(
            &self.watchers,
            &Reply::event(
                text,
                serde_json::json!({ "event": "compatibility-check", "passed": verdict.is_ok() }),
            ),
        );
        self.probe = None;
        let reason = match verdict {
            Ok(()) => {
                // The plan starts from the roles it was made for, or not at all.
                let spec = self.plan.spec();
                let now = active_and_standby(cluster).map(|(a, b)| (plan_slot(a), plan_slot(b)));
                if now.as_ref().ok() == Some(&(spec.active, spec.standby)) {
                    return None;
                }
                let found = match now {
                    Ok((a, b)) => format!("engine {a} active, engine {b} hot standby"),
                    Err(reply) => reply.message,
                };
                format!(
                    "nothing was changed: the cluster changed during the compatibility check (expected engine {} active and engine {} hot standby, found: {found}); run the upgrade again",
                    spec.active, spec.standby
                )
            }
            Err(reason) => {
                format!("nothing was changed: {reason}; the engines run the old version as before")
            }
        };
        self.finish(cluster, Outcome::Aborted { reason });
        Some(true)
    }

    /// The action in `exec` came to `event`: said, and reported to the plan.
    fn ended(&mut self, cluster: &dyn ClusterOps, exec: &Exec, event: Event) {
        let text = match &event {
            Event::Done { .. } => "done".to_string(),
            Event::Verdict {
                verdict: Verdict::Accepted,
                ..
            } => "accepted".into(),
            Event::Verdict {
                verdict: Verdict::Rejected { reason },
                ..
            } => format!("rejected: {reason}"),
            Event::Failed { error, .. } => format!("failed: {error}"),
            Event::TimedOut { .. } => {
                format!("timed out after {} ms", exec.planned.timeout_ms)
            }
            Event::EngineDied { .. } => "engine died".into(),
        };
        info!(action = %exec.planned, "{text}");
        self.event(
            "end",
            &exec.planned,
            Some(text),
            Some(exec.started.elapsed()),
        );
        self.report(cluster, event);
    }

    /// The plan's next action: begun (`None`: the loop of [`Self::step`] goes on), or held
    /// by the test hook (`Some(false)`).
    fn perform(&mut self, cluster: &mut dyn ClusterOps, planned: Planned) -> Option<bool> {
        self.current = planned.to_string();
        if let Some(why) = self.abort.clone() {
            if planned.progress.recovery.is_none() {
                self.event("end", &planned, Some(format!("failed: {why}")), None);
                self.report(
                    cluster,
                    Event::Failed {
                        id: planned.id,
                        error: why,
                    },
                );
                return None;
            }
            self.abort = None;
        }
        // Recorded before it is performed: a restarted supervisor knows what may have been
        // under way.
        self.persist(cluster);
        if planned.progress.recovery.is_none() && self.pause_at == Some(planned.progress.number) {
            warn!(action = %planned, "{TEST_PAUSE_ENV}: the upgrade holds here");
            self.current = format!("{planned} (held by {TEST_PAUSE_ENV})");
            self.paused = true;
            return Some(false);
        }
        info!(action = %planned, "upgrade action");
        self.event("begin", &planned, None, None);
        match Exec::start(cluster, &planned) {
            Ok(phase) => {
                self.exec = Some(Exec::new(planned, phase));
                // With the process it started or the command it posted.
                self.persist(cluster);
            }
            Err(error) => {
                self.event("end", &planned, Some(format!("failed: {error}")), None);
                self.report(
                    cluster,
                    Event::Failed {
                        id: planned.id,
                        error,
                    },
                );
            }
        }
        None
    }

    /// Abandons the action in flight (its accept command killed, its command withdrawn).
    fn cancel_exec(&mut self, cluster: &dyn ClusterOps) {
        if let Some(exec) = self.exec.take() {
            exec.cancel(cluster);
        }
    }

    /// An engine died unexpectedly; `successor` is the active after it.
    pub(crate) fn on_death(
        &mut self,
        cluster: &mut dyn ClusterOps,
        slot: usize,
        successor: Option<usize>,
    ) {
        let active_now = successor.map_or("none".into(), |s| slot_name(s).to_string());
        if let Some(probe) = self.probe.as_mut() {
            if probe.slot != slot {
                // Before the plan's first action: nothing was changed; the upgrade ends here
                // and the keeper restores the cluster.
                probe.fail(
                    cluster,
                    format!(
                        "engine {} died during the compatibility check (active now: {active_now})",
                        slot_name(slot),
                    ),
                );
            }
            // The check's own engine: its death is the check's answer.
            return;
        }
        emit(
            &self.watchers,
            &Reply::event(
                format!("engine {} died; active: {active_now}", slot_name(slot)),
                serde_json::json!({
                    "event": "engine-died",
                    "slot": slot_name(slot).to_string(),
                    "active": successor.map(|s| slot_name(s).to_string()),
                }),
            ),
        );
        if self.forced.is_some() {
            return;
        }
        self.report(
            cluster,
            Event::EngineDied {
                slot: plan_slot(slot),
                active: successor.map(plan_slot),
            },
        );
        if self.forced.is_some() {
            return;
        }
        if let Some(exec) = &self.exec {
            let next = self.plan.next_action();
            if next != Next::Wait(exec.planned.id) {
                // The plan abandoned the action that needed the dead engine.
                self.cancel_exec(cluster);
                self.pending = Some(next);
            }
        }
    }

    fn finish(&mut self, cluster: &mut dyn ClusterOps, outcome: Outcome) {
        let code = match &outcome {
            Outcome::Completed => Code::Ok,
            Outcome::RolledBack { .. } => Code::RolledBack,
            Outcome::Aborted { .. } => Code::Aborted,
            Outcome::RollbackFailed { .. } => Code::RollbackFailed,
            Outcome::Outage { .. } => Code::Outage,
        };
        if outcome == Outcome::Completed {
            cluster.outcomes().last_upgrade =
                Some((self.old_binary.clone(), self.new_binary.clone()));
        }
        cluster.manage_running();
        // The upgrade has ended: its record goes. Marked first, in case this supervisor dies
        // before the removal: its successor then only reports the outcome.
        self.record.outcome = Some(outcome.to_string());
        if let Err(e) = self
            .write_record(cluster)
            .and_then(|()| record::remove(cluster.dir()))
        {
            error!("{e}; remove it by hand (the upgrade has ended: {outcome})");
        }
        if self.resumed_at.is_some() {
            if let Some(interrupted) = cluster.outcomes().interrupted.as_mut() {
                interrupted.outcome = Some(outcome.to_string());
                interrupted.code = Some(code);
            }
        }
        let took = self.started.elapsed();
        let said = self.words(&outcome.to_string());
        info!(took_ms = took.as_millis() as u64, "{said}");
        let reply = Reply::result(code, said).with_data(serde_json::json!({
            "outcome": format!("{outcome:?}").split_whitespace().next().unwrap_or("").trim_end_matches('{').to_string(),
            "reason": outcome.reason(),
            "took_ms": took.as_millis() as u64,
        }));
        self.result = Some(Final {
            reply,
            watchers: std::mem::take(&mut self.watchers),
        });
    }
}

/// An upgrade starts from one active and one hot standby, nothing else running: those two,
/// and the binary the active runs.
fn starting_point(cluster: &dyn ClusterOps) -> Result<(usize, usize, PathBuf), Reply> {
    let (active, standby) = active_and_standby(cluster)?;
    if let Some(extra) =
        (0..SLOTS).find(|&s| s != active && s != standby && cluster.engine(s).is_some())
    {
        return Err(Reply::result(
            Code::WrongRole,
            format!(
                "an upgrade starts from one active and one hot standby; engine {} runs too (wait for it to be hot, or `understudy status`)",
                slot_name(extra)
            ),
        ));
    }
    let old_binary = cluster
        .engine(active)
        .map(|p| p.binary.to_path_buf())
        .filter(|b| !b.as_os_str().is_empty())
        .unwrap_or_else(|| cluster.config().engine.binary.clone());
    Ok((active, standby, old_binary))
}
