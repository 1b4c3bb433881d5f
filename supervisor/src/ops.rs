//! The long operations of the control socket, each a small state machine the supervisor's
//! loop polls once per turn: switchover, enable-features, down, and the rolling upgrade, which
//! performs the actions of an [`UpgradePlan`] against real engines.
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
//! outcome, and removes it at the end. A supervisor that starts with a record on disk runs
//! [`ResumeOp`] first: it lets the action in flight settle, observes the cluster and hands it
//! to the resumed plan, which restores the old version or keeps an accepted new one.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_runtime::control::{cmd, realtime_ns, slot_cmd, slot_name, Field, SLOTS};
use understudy_runtime::engine::result;

use crate::config::{check_binary, AcceptanceConfig, ClusterConfig};
use crate::daemon::Supervisor;
use crate::plan::{
    Action, Cluster, Engine, Event, Next, Outcome, Planned, Recovery, Role as PlanRole, Slot,
    UpgradePlan, UpgradeSpec, Verdict,
};
use crate::proto::{Code, InterruptedUpgrade, Op, Reply, UpgradeEvent, UpgradeRequest};
use crate::record::{self, RecordedEngine, UpgradeRecord};

/// Test hook, only in a build with the `fault-injection` feature (the root package's tests):
/// an upgrade holds before performing the first action of this step number (after recording
/// it as in flight), so that a test can kill the supervisor there. A production build does
/// not read it.
pub const TEST_PAUSE_ENV: &str = "UNDERSTUDY_TEST_UPGRADE_PAUSE_AT_STEP";

/// An upgrade's progress before its first action (its compatibility check).
const UPGRADE_STARTING: &str = "starting";

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

fn plan_slot(slot: usize) -> Slot {
    Slot::ALL[slot]
}

fn slot_index(slot: Slot) -> usize {
    Slot::ALL.iter().position(|s| *s == slot).expect("a slot")
}

fn emit(watchers: &[Sender<Reply>], reply: &Reply) {
    for w in watchers {
        // A client that went away does not stop the operation.
        let _ = w.send(reply.clone());
    }
}

/// The operation in progress.
pub(crate) enum Operation {
    /// `switchover`.
    Switchover(SwitchoverOp),
    /// `enable-features`.
    Enable(EnableOp),
    /// `upgrade` (and `rollback` of a completed upgrade).
    Upgrade(Box<UpgradeRun>),
    /// `down`.
    Down(DownOp),
    /// After a supervisor restart: settling an upgrade a previous supervisor left in the
    /// middle, before a resumed plan takes over.
    Resume(ResumeOp),
}

/// What a turn of an operation came to.
pub(crate) enum Stepped {
    /// It goes on.
    Running,
    /// It has ended (its result sent).
    Ended,
    /// It goes on as another operation.
    Became(Box<Operation>),
}

/// A planned switchover in flight.
pub(crate) struct SwitchExec {
    from: usize,
    to: usize,
    seq: u64,
    acked: bool,
    posted: Instant,
    active_at: Option<Instant>,
    /// Times the command was posted again after a "not hot" refusal of a target that
    /// reports hot.
    reposts: u8,
}

enum SwitchPoll {
    Pending,
    Done { took: Duration },
    Refused(String),
}

impl SwitchExec {
    fn post(sup: &Supervisor, from: usize, to: usize) -> SwitchExec {
        let seq = sup.control.post(cmd::SWITCHOVER, to as u64);
        info!(from = %slot_name(from), to = %slot_name(to), "switchover posted");
        SwitchExec {
            from,
            to,
            seq,
            acked: false,
            posted: Instant::now(),
            active_at: None,
            reposts: 0,
        }
    }

    fn poll(&mut self, sup: &Supervisor) -> SwitchPoll {
        if !self.acked {
            let (ack, code) = sup.control.acked();
            if ack < self.seq {
                return SwitchPoll::Pending;
            }
            self.acked = true;
            // "Not hot" for a target that reports hot: the active judged it on a stale view
            // (a command left over from an operation a failover overtook, or acks still on
            // their way); asked once more before the refusal stands.
            if code == result::NOT_HOT
                && self.reposts == 0
                && sup.is_hot_standby(self.to)
                && sup.is_active(self.from)
            {
                self.reposts += 1;
                self.acked = false;
                self.seq = sup.control.post(cmd::SWITCHOVER, self.to as u64);
                warn!(to = %slot_name(self.to), "switchover refused as not hot although the target reports hot: asked once more");
                return SwitchPoll::Pending;
            }
            if code != result::OK {
                return SwitchPoll::Refused(format!(
                    "engine {} refused: {}",
                    slot_name(self.from),
                    result_name(code)
                ));
            }
        }
        let active_at = match self.active_at {
            Some(t) => t,
            None if sup.is_active(self.to) => *self.active_at.insert(Instant::now()),
            None => return SwitchPoll::Pending,
        };
        // The old active re-attaches to the new one without catch-up; give it the
        // switchover timeout to report hot, then report the switch done regardless.
        if sup.is_hot_standby(self.from) || active_at.elapsed() > sup.config.timeouts.switchover() {
            if !sup.is_hot_standby(self.from) {
                warn!(slot = %slot_name(self.from), "the old active is not a hot standby yet");
            }
            return SwitchPoll::Done {
                took: active_at.duration_since(self.posted),
            };
        }
        SwitchPoll::Pending
    }

    /// Withdraw a command the active never acknowledged: a later command supersedes it.
    fn cancel(&self, sup: &Supervisor) {
        if !self.acked {
            sup.control.post(0, 0);
        }
    }
}

/// SIGKILLs the process group `child` leads (it was spawned with `process_group(0)`), then
/// reaps `child`.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // The group is ours as long as its leader is unreaped: it is reaped only below.
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn result_name(code: u64) -> String {
    match code {
        result::OK => "ok".into(),
        result::NOT_HOT => "the target is not a hot standby".into(),
        result::NOT_ENABLEABLE => "a feature is not supported by every engine".into(),
        result::UNKNOWN => "unknown command".into(),
        other => format!("result code {other}"),
    }
}

/// Enabling features in flight.
pub(crate) struct EnableExec {
    active: usize,
    standby: usize,
    mask: u64,
    seq: u64,
    acked: bool,
}

enum EnablePoll {
    Pending,
    Done,
    Refused(String),
}

impl EnableExec {
    fn post(sup: &Supervisor, active: usize, standby: usize) -> EnableExec {
        let mask = sup.control.get(standby, Field::Enableable);
        let seq = if mask == 0 {
            0
        } else {
            sup.control.post(cmd::ENABLE_FEATURES, mask)
        };
        info!(mask, "enable features posted");
        EnableExec {
            active,
            standby,
            mask,
            seq,
            acked: mask == 0,
        }
    }

    fn poll(&mut self, sup: &Supervisor) -> EnablePoll {
        if !self.acked {
            let (ack, code) = sup.control.acked();
            if ack < self.seq {
                return EnablePoll::Pending;
            }
            self.acked = true;
            if code != result::OK {
                return EnablePoll::Refused(format!(
                    "engine {} refused: {}",
                    slot_name(self.active),
                    result_name(code)
                ));
            }
        }
        let has = |slot| sup.control.get(slot, Field::Features) & self.mask == self.mask;
        if has(self.active) && has(self.standby) {
            EnablePoll::Done
        } else {
            EnablePoll::Pending
        }
    }
}

impl Operation {
    /// Starts `op`; `Err` is the final reply when the operation cannot start (or has
    /// nothing to do).
    pub(crate) fn begin(
        sup: &mut Supervisor,
        op: Op,
        reply: Sender<Reply>,
    ) -> Result<Operation, Reply> {
        match op {
            Op::Switchover => {
                let (from, to) = active_and_standby(sup)?;
                Ok(Operation::Switchover(SwitchoverOp {
                    exec: SwitchExec::post(sup, from, to),
                    deadline: Instant::now() + sup.config.timeouts.switchover(),
                    watchers: vec![reply],
                    failed: None,
                }))
            }
            Op::EnableFeatures => {
                let (active, standby) = active_and_standby(sup)?;
                let exec = EnableExec::post(sup, active, standby);
                if exec.mask == 0 {
                    return Err(Reply::result(
                        Code::Ok,
                        "no feature to enable: the engines share no feature that is off",
                    ));
                }
                Ok(Operation::Enable(EnableOp {
                    exec,
                    deadline: Instant::now() + sup.config.timeouts.switchover(),
                    watchers: vec![reply],
                    failed: None,
                }))
            }
            Op::Upgrade(request) => {
                UpgradeRun::begin(sup, request, reply).map(|r| Operation::Upgrade(Box::new(r)))
            }
            Op::Down => Ok(Operation::Down(DownOp::begin(sup, reply))),
            Op::Status | Op::Rollback | Op::ResumeRestarts | Op::Reload(_) | Op::Promote(_) => Err(Reply::result(
                Code::Failed,
                "internal: status, rollback, resume-restarts and reload are handled by the supervisor loop",
            )),
        }
    }

    /// `rollback` with no upgrade in progress: upgrade back to the binary of the last
    /// completed upgrade, if its features were left off.
    pub(crate) fn rollback(sup: &mut Supervisor, reply: Sender<Reply>) -> Result<Operation, Reply> {
        let Some((old, _new)) = sup.last_upgrade.clone() else {
            return Err(Reply::result(
                Code::WrongRole,
                "nothing to roll back: no upgrade is in progress and none completed since this supervisor started",
            ));
        };
        let features = sup
            .active()
            .map_or(0, |a| sup.control.get(a, Field::Features));
        if features != 0 {
            return Err(Reply::result(
                Code::WrongRole,
                format!(
                    "cannot roll back: new features are enabled (mask {features:#x}) and the old version cannot read their records"
                ),
            ));
        }
        let request = UpgradeRequest {
            binary: old,
            accept_for_ms: Some(0),
            accept_cmd: None,
            keep_standby: false,
            no_enable: true,
            ..Default::default()
        };
        UpgradeRun::begin(sup, request, reply).map(|mut r| {
            r.accept_cmd = None;
            r.rollback = true;
            Operation::Upgrade(Box::new(r))
        })
    }

    /// For `status`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Operation::Switchover(op) => format!(
                "switchover from engine {} to engine {}",
                slot_name(op.exec.from),
                slot_name(op.exec.to)
            ),
            Operation::Enable(_) => "enable features".into(),
            Operation::Upgrade(run) => match &run.resumed_at {
                Some(at) => format!(
                    "upgrade to {} interrupted at {at} by a supervisor restart, settling: {}",
                    run.new_binary.display(),
                    run.current
                ),
                None => format!("upgrade to {}: {}", run.new_binary.display(), run.current),
            },
            Operation::Down(_) => "down".into(),
            Operation::Resume(op) => format!(
                "upgrade to {} interrupted at {} by a supervisor restart: letting the action in flight settle",
                op.record.new_binary.display(),
                op.record.progress
            ),
        }
    }

    /// Advances the operation by one turn.
    pub(crate) fn step(&mut self, sup: &mut Supervisor) -> Stepped {
        let ended = match self {
            Operation::Switchover(op) => op.step(sup),
            Operation::Enable(op) => op.step(sup),
            Operation::Upgrade(run) => run.step(sup),
            Operation::Down(op) => op.step(sup),
            Operation::Resume(op) => return op.step(sup),
        };
        if ended {
            Stepped::Ended
        } else {
            Stepped::Running
        }
    }

    /// An engine died unexpectedly; `successor` is the active after it.
    pub(crate) fn on_death(&mut self, sup: &mut Supervisor, slot: usize, successor: Option<usize>) {
        match self {
            Operation::Switchover(op) => {
                if slot == op.exec.from || slot == op.exec.to {
                    // A failover overtook the command: never leave it posted for the new
                    // active to take (or refuse) in a later operation.
                    op.exec.cancel(sup);
                    op.failed = Some(format!(
                        "engine {} died during the switchover; engine {} is active",
                        slot_name(slot),
                        successor.map_or("none".into(), |s| slot_name(s).to_string())
                    ));
                }
            }
            Operation::Enable(op) => {
                if slot == op.exec.active || slot == op.exec.standby {
                    op.failed = Some(format!(
                        "engine {} died while enabling features",
                        slot_name(slot)
                    ));
                }
            }
            Operation::Upgrade(run) => run.on_death(sup, slot, successor),
            // The cluster is observed once it has settled: deaths before that are in it.
            Operation::Down(_) | Operation::Resume(_) => {}
        }
    }
}

fn active_and_standby(sup: &Supervisor) -> Result<(usize, usize), Reply> {
    let Some(active) = sup.active() else {
        return Err(Reply::result(Code::Outage, "no engine is active"));
    };
    let Some(standby) = sup.hot_standby() else {
        return Err(Reply::result(
            Code::WrongRole,
            format!(
                "engine {} is active but no engine is a hot standby yet; wait until `understudy status` shows one hot",
                slot_name(active)
            ),
        ));
    };
    Ok((active, standby))
}

/// `switchover`.
pub(crate) struct SwitchoverOp {
    exec: SwitchExec,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    failed: Option<String>,
}

impl SwitchoverOp {
    fn step(&mut self, sup: &mut Supervisor) -> bool {
        let reply = if let Some(why) = self.failed.take() {
            Reply::result(Code::Failed, why)
        } else {
            match self.exec.poll(sup) {
                SwitchPoll::Pending if Instant::now() < self.deadline => return false,
                SwitchPoll::Pending => {
                    self.exec.cancel(sup);
                    Reply::result(
                        Code::Timeout,
                        format!(
                            "the switchover did not complete within {} ms (timeouts.switchover_ms)",
                            sup.config.timeouts.switchover_ms
                        ),
                    )
                }
                SwitchPoll::Refused(why) => Reply::result(Code::WrongRole, why),
                SwitchPoll::Done { took } => {
                    let step_up_ns = sup.control.get(self.exec.to, Field::LastStepUpDurNs);
                    Reply::result(
                        Code::Ok,
                        format!(
                            "switched over from engine {} to engine {}: pause at most {} µs (command to new active seen), step-up {} µs",
                            slot_name(self.exec.from),
                            slot_name(self.exec.to),
                            took.as_micros(),
                            step_up_ns / 1000
                        ),
                    )
                    .with_data(serde_json::json!({
                        "from": slot_name(self.exec.from).to_string(),
                        "to": slot_name(self.exec.to).to_string(),
                        "pause_us_max": took.as_micros() as u64,
                        "step_up_us": step_up_ns / 1000,
                        "epoch": sup.control.epoch(),
                    }))
                }
            }
        };
        emit(&self.watchers, &reply);
        true
    }
}

/// `enable-features`.
pub(crate) struct EnableOp {
    exec: EnableExec,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    failed: Option<String>,
}

impl EnableOp {
    fn step(&mut self, sup: &mut Supervisor) -> bool {
        let reply = if let Some(why) = self.failed.take() {
            Reply::result(Code::Failed, why)
        } else {
            match self.exec.poll(sup) {
                EnablePoll::Pending if Instant::now() < self.deadline => return false,
                EnablePoll::Pending => Reply::result(
                    Code::Timeout,
                    format!(
                        "the features were not enabled within {} ms (timeouts.switchover_ms)",
                        sup.config.timeouts.switchover_ms
                    ),
                ),
                EnablePoll::Refused(why) => Reply::result(Code::WrongRole, why),
                EnablePoll::Done => Reply::result(
                    Code::Ok,
                    format!(
                        "features {:#x} enabled on engines {} and {}",
                        self.exec.mask,
                        slot_name(self.exec.active),
                        slot_name(self.exec.standby)
                    ),
                )
                .with_data(serde_json::json!({ "enabled": self.exec.mask })),
            }
        };
        emit(&self.watchers, &reply);
        true
    }
}

/// `down`: standbys first (a stopping active would make its standby step up), then the
/// active, then the shared files.
pub(crate) struct DownOp {
    active_stopping: bool,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    /// The result is sent: until when the supervisor waits for the socket threads to have
    /// written it (it exits after `down`, and a result still in a channel would be lost).
    flushing_until: Option<Instant>,
}

impl DownOp {
    fn begin(sup: &mut Supervisor, reply: Sender<Reply>) -> DownOp {
        // Clients learn it at their next poll (`ClientError::ClusterDown`), not by silence.
        sup.control
            .set_cluster_state(understudy_runtime::control::ClusterState::Down);
        sup.managed = [false; SLOTS];
        let active = sup.active();
        for slot in 0..SLOTS {
            if Some(slot) != active {
                sup.request_stop(slot);
            }
        }
        emit(
            std::slice::from_ref(&reply),
            &Reply::event("stopping the standbys", serde_json::Value::Null),
        );
        DownOp {
            active_stopping: false,
            deadline: Instant::now() + sup.config.timeouts.shutdown(),
            watchers: vec![reply],
            flushing_until: None,
        }
    }

    fn step(&mut self, sup: &mut Supervisor) -> bool {
        if let Some(until) = self.flushing_until {
            // A socket thread drops its receiver once it has written the result line: until
            // then a probe is accepted (and never written: the thread stops reading at the
            // result).
            let probe = Reply::event("flushing", serde_json::Value::Null);
            self.watchers.retain(|w| w.send(probe.clone()).is_ok());
            if self.watchers.is_empty() || Instant::now() > until {
                sup.finished = true;
                return true;
            }
            return false;
        }
        let running: Vec<usize> = (0..SLOTS)
            .filter(|&s| sup.engines[s].is_some() && (self.active_stopping || !sup.is_active(s)))
            .collect();
        if !running.is_empty() {
            if Instant::now() > self.deadline {
                for slot in running {
                    warn!(slot = %slot_name(slot), "engine did not stop in time; SIGKILL");
                    sup.kill_expected(slot);
                }
                self.deadline = Instant::now() + sup.config.timeouts.shutdown();
            }
            return false;
        }
        if !self.active_stopping {
            self.active_stopping = true;
            if let Some(active) = sup.active() {
                emit(
                    &self.watchers,
                    &Reply::event(
                        format!("stopping the active engine {}", slot_name(active)),
                        serde_json::Value::Null,
                    ),
                );
                sup.request_stop(active);
            }
            self.deadline = Instant::now() + sup.config.timeouts.shutdown();
            return false;
        }
        let reply = match std::fs::remove_dir_all(&sup.dir) {
            Ok(()) => Reply::result(
                Code::Ok,
                format!(
                    "cluster {} stopped; removed {}",
                    sup.config.cluster,
                    sup.dir.display()
                ),
            ),
            Err(e) => Reply::result(
                Code::Failed,
                format!(
                    "cluster {} stopped, but {} could not be removed: {e}",
                    sup.config.cluster,
                    sup.dir.display()
                ),
            ),
        };
        info!("{}", reply.message);
        emit(&self.watchers, &reply);
        self.flushing_until = Some(Instant::now() + Duration::from_secs(2));
        false
    }
}

/// One plan action being performed.
struct Exec {
    planned: Planned,
    started: Instant,
    deadline: Instant,
    phase: Phase,
}

enum Phase {
    Stop {
        slot: usize,
        killed: bool,
    },
    Start {
        slot: usize,
        /// The binary, until it is spawned: the slot's previous engine was still exiting.
        waiting: Option<PathBuf>,
    },
    Attach {
        standby: usize,
        active: usize,
    },
    Switchover(SwitchExec),
    Accept {
        slot: usize,
        until: Instant,
        cmd: Option<Child>,
        /// (requests, refusals) of the new active when the soak began.
        base: (u64, u64),
        /// The worst service-time p99 the engine published during the soak, ns.
        worst_p99_ns: u64,
    },
    Enable(EnableExec),
}

/// The acceptance bounds of one upgrade: the `[acceptance]` of the config file the operator
/// named (`request.config_toml`, refused if it differs from the running config anywhere else)
/// or of the running config, then every bound the request gives in place of the config's.
fn upgrade_acceptance(
    sup: &Supervisor,
    request: &UpgradeRequest,
) -> Result<AcceptanceConfig, String> {
    let mut a = match &request.config_toml {
        None => sup.config.acceptance.clone(),
        Some(text) => {
            let named = ClusterConfig::from_str(text, "the config file given to `upgrade`")
                .map_err(|e| format!("upgrade refused, nothing done: {e}"))?;
            let mut other = crate::reload::fixed_changes(&sup.config, &named);
            other.extend(
                crate::reload::live_changes(&sup.config, &named)
                    .into_iter()
                    .filter(|(field, ..)| !field.starts_with("acceptance")),
            );
            if !other.is_empty() {
                let what: Vec<String> = other
                    .iter()
                    .map(|(f, a, b)| format!("`{f}` (running {a}, file {b})"))
                    .collect();
                return Err(format!(
                    "upgrade refused, nothing done: the config file given differs from the running config outside [acceptance]: {}; `upgrade` takes only the file's [acceptance] (apply the rest with `understudy reload`, or name the running config)",
                    what.join(", ")
                ));
            }
            named.acceptance
        }
    };
    if let Some(ms) = request.accept_for_ms {
        a.accept_for_ms = ms;
    }
    if let Some(cmd) = &request.accept_cmd {
        a.accept_cmd = Some(cmd.clone());
    }
    if let Some(rate) = request.max_error_rate {
        a.max_error_rate = rate;
    }
    if let Some(count) = request.count_refusals {
        a.count_refusals = count;
    }
    if let Some(us) = request.max_latency_us_p99 {
        a.max_latency_us_p99 = us;
    }
    Ok(a)
}

/// A rolling upgrade in progress.
pub(crate) struct UpgradeRun {
    plan: UpgradePlan,
    exec: Option<Exec>,
    /// An answer of `next_action` taken while reconciling after a death.
    pending: Option<Next>,
    abort: Option<String>,
    forced: Option<Outcome>,
    accept_cmd: Option<String>,
    /// The acceptance bounds of this upgrade: the config's, with the request's overrides.
    acceptance: AcceptanceConfig,
    old_binary: PathBuf,
    new_binary: PathBuf,
    current: String,
    started: Instant,
    watchers: Vec<Sender<Reply>>,
    /// What is on disk for a restarted supervisor (rewritten at every change).
    record: UpgradeRecord,
    /// Writing the record failed (reported once).
    record_failed: bool,
    /// Taken up after a supervisor restart: where the previous supervisor stopped.
    resumed_at: Option<String>,
    /// [`TEST_PAUSE_ENV`].
    pause_at: Option<u8>,
    /// Holding there.
    paused: bool,
    /// `rollback` of a completed upgrade: the plan's "new version" is the previous one, and
    /// the events and the result say so.
    rollback: bool,
    /// The compatibility check of the new binary, before the plan takes anything out of
    /// service.
    probe: Option<Probe>,
}

/// The new binary started once in the spare slot before the upgrade's first action: it must
/// register as the same application and become a hot standby of the active (the active
/// accepted its stream: it reads every record the enabled features write), then it is
/// stopped. An incompatible binary (another application, a version that
/// cannot read the records of the enabled features) ends the upgrade `aborted` with the
/// reason, the standby still in service.
struct Probe {
    slot: usize,
    spawned: bool,
    /// The verdict, once reached: the probe is stopped, and the verdict given once it exited.
    verdict: Option<Result<(), String>>,
    deadline: Instant,
}

impl Probe {
    fn new(sup: &Supervisor) -> Probe {
        let t = &sup.config.timeouts;
        Probe {
            slot: SLOTS - 1,
            spawned: false,
            verdict: None,
            deadline: Instant::now() + t.start() + Duration::from_millis(t.hot_ms),
        }
    }

    /// `None` while the check runs; then the verdict, the probe gone.
    fn poll(
        &mut self,
        sup: &mut Supervisor,
        binary: &std::path::Path,
    ) -> Option<Result<(), String>> {
        let slot = self.slot;
        if !self.spawned {
            self.spawned = true;
            if sup.engines[slot].is_some() {
                // The spare slot is taken: no check (the plan's own steps will tell).
                return Some(Ok(()));
            }
            if let Err(e) = sup.spawn(slot, binary, true) {
                return Some(Err(format!("cannot start the new version: {e}")));
            }
            info!(slot = %slot_name(slot), "compatibility check: the new version starts in the spare slot");
            return None;
        }
        if let Some(verdict) = &self.verdict {
            if sup.engines[slot].is_none() {
                return Some(verdict.clone());
            }
            if Instant::now() > self.deadline + sup.config.timeouts.shutdown() {
                sup.kill_expected(slot);
            }
            return None;
        }
        let verdict = if sup.engines[slot].is_none() {
            Some(Err(self.died_reason(sup)))
        } else if sup.ours(slot) {
            let active = sup.active();
            let hash = |s: usize| sup.control.get(s, Field::AppHash);
            let state = sup.state(slot);
            match active {
                Some(a) if hash(a) != hash(slot) => Some(Err(format!(
                    "the new version runs another application than the active (engine {}: application hash {:#x}, engine {}: {:#x}); it is not an upgrade of this application",
                    slot_name(slot),
                    hash(slot),
                    slot_name(a),
                    hash(a)
                ))),
                _ if sup.role(slot) == understudy_runtime::control::Role::Standby
                    && state == understudy_runtime::control::State::Hot =>
                {
                    Some(Ok(()))
                }
                _ if Instant::now() > self.deadline => Some(Err(format!(
                    "the new version did not become a hot standby of the active within {} ms (timeouts.start_ms + hot_ms){}",
                    sup.config.timeouts.start().as_millis() + u128::from(sup.config.timeouts.hot_ms),
                    self.downgrade_hint(sup)
                ))),
                _ => None,
            }
        } else if Instant::now() > self.deadline {
            Some(Err(format!(
                "the new version did not register within {} ms (timeouts.start_ms + hot_ms)",
                sup.config.timeouts.start().as_millis() + u128::from(sup.config.timeouts.hot_ms)
            )))
        } else {
            None
        };
        let verdict = verdict?;
        match &verdict {
            Ok(()) => info!(
                "compatibility check passed: the new version attached to the active; stopping it"
            ),
            Err(e) => warn!("compatibility check failed: {e}"),
        }
        if sup.engines[slot].is_none() {
            return Some(verdict);
        }
        sup.request_stop(slot);
        self.deadline = Instant::now();
        self.verdict = Some(verdict);
        None
    }

    /// Another engine died while the check ran: the verdict is the upgrade's end (nothing
    /// was changed); the probe is stopped first.
    fn fail(&mut self, sup: &mut Supervisor, reason: String) {
        if self.verdict.is_some() {
            return;
        }
        warn!("compatibility check abandoned: {reason}");
        if sup.engines[self.slot].is_some() {
            sup.request_stop(self.slot);
        }
        self.spawned = true;
        self.deadline = Instant::now();
        self.verdict = Some(Err(reason));
    }

    /// The probe died on its own before attaching.
    fn died_reason(&self, sup: &Supervisor) -> String {
        format!(
            "the new version exited during the compatibility check, before it attached to the active (the engine's own log line above, `engine stops: …`, says why: another application, or records it cannot read){}",
            self.downgrade_hint(sup)
        )
    }

    /// A downgrade while features are enabled: what the operator most likely hit.
    fn downgrade_hint(&self, sup: &Supervisor) -> String {
        let Some(a) = sup.active() else {
            return String::new();
        };
        let features = sup.control.get(a, Field::Features);
        let ours = sup.control.get(a, Field::AppVersion);
        let theirs = sup.control.get(self.slot, Field::AppVersion);
        if features != 0 && theirs != 0 && theirs < ours {
            format!(
                "; this is a downgrade (version {theirs} < {ours}) while features {features:#x} are enabled, whose records an older version may not read"
            )
        } else {
            String::new()
        }
    }
}

impl UpgradeRun {
    fn begin(
        sup: &mut Supervisor,
        request: UpgradeRequest,
        reply: Sender<Reply>,
    ) -> Result<UpgradeRun, Reply> {
        check_binary(&request.binary).map_err(|e| Reply::result(Code::BadConfig, e.to_string()))?;
        let acceptance =
            upgrade_acceptance(sup, &request).map_err(|e| Reply::result(Code::BadConfig, e))?;
        let (active, standby) = active_and_standby(sup)?;
        if let Some(extra) =
            (0..SLOTS).find(|&s| s != active && s != standby && sup.engines[s].is_some())
        {
            return Err(Reply::result(
                Code::WrongRole,
                format!(
                    "an upgrade starts from one active and one hot standby; engine {} runs too (wait for it to be hot, or `understudy status`)",
                    slot_name(extra)
                ),
            ));
        }
        let old_binary = sup.engines[active]
            .as_ref()
            .map(|p| p.binary.clone())
            .filter(|b| !b.as_os_str().is_empty())
            .unwrap_or_else(|| sup.config.engine.binary.clone());
        let spec = UpgradeSpec {
            active: plan_slot(active),
            standby: plan_slot(standby),
            old_binary: old_binary.clone(),
            new_binary: request.binary.clone(),
            keep_standby: request.keep_standby,
            no_enable: request.no_enable,
            accept_for_ms: acceptance.accept_for_ms,
            timeouts: sup.config.timeouts.clone(),
        };
        let plan = UpgradePlan::new(spec).map_err(|e| Reply::result(Code::Usage, e.to_string()))?;
        let record = UpgradeRecord::new(&sup.config.cluster, plan.spec(), plan.checkpoint());
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
            probe: (!request.keep_standby).then(|| Probe::new(sup)),
        };
        run.write_record(sup).map_err(|e| {
            Reply::result(
                Code::Failed,
                format!(
                    "{e}; the upgrade did not begin (a supervisor restart could not settle it)"
                ),
            )
        })?;
        sup.interrupted = None;
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
    fn resumed(sup: &mut Supervisor, record: UpgradeRecord, plan: UpgradePlan) -> UpgradeRun {
        let mut run = UpgradeRun {
            plan,
            exec: None,
            pending: None,
            abort: None,
            forced: None,
            accept_cmd: None,
            acceptance: sup.config.acceptance.clone(),
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
        };
        run.persist(sup);
        run
    }

    /// The engines the plan knows, with their processes: for the record.
    fn recorded_engines(&self, sup: &Supervisor) -> Vec<RecordedEngine> {
        let starting = match self.plan.checkpoint().in_flight {
            Some(Action::Start { slot, version, .. }) => Some((slot, version)),
            _ => None,
        };
        (0..SLOTS)
            .filter_map(|slot| {
                let proc = sup.engines[slot].as_ref()?;
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
    fn write_record(&mut self, sup: &Supervisor) -> Result<(), record::RecordError> {
        self.record.checkpoint = self.plan.checkpoint();
        self.record.progress = self.current.clone();
        self.record.supervisor_pid = std::process::id();
        self.record.updated_at_ns = realtime_ns();
        self.record.command_seq = match self.exec.as_ref().map(|e| &e.phase) {
            Some(Phase::Switchover(sw)) => Some(sw.seq),
            Some(Phase::Enable(en)) if en.seq != 0 => Some(en.seq),
            _ => None,
        };
        self.record.engines = self.recorded_engines(sup);
        record::store(&sup.dir, &self.record)
    }

    /// [`Self::write_record`]; a failure on the forward path aborts the upgrade, since a
    /// supervisor restart could no longer settle it.
    fn persist(&mut self, sup: &Supervisor) {
        if let Err(e) = self.write_record(sup) {
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

    fn report(&mut self, sup: &Supervisor, event: Event) {
        if let Err(e) = self.plan.on_event(event) {
            self.forced = Some(Outcome::RollbackFailed {
                reason: format!(
                    "the supervisor's report does not fit the upgrade plan ({e}); the cluster is as `understudy status` shows"
                ),
            });
        }
        self.persist(sup);
    }

    fn step(&mut self, sup: &mut Supervisor) -> bool {
        if self.paused {
            return false;
        }
        if let Some(probe) = self.probe.as_mut() {
            let binary = self.new_binary.clone();
            let began = probe.spawned;
            let verdict = probe.poll(sup, &binary);
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
            if let Some(verdict) = &verdict {
                let text = match verdict {
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
            }
            match verdict {
                None => return false,
                Some(Ok(())) => {
                    self.probe = None;
                    // The plan starts from the roles it was made for, or not at all.
                    let spec = self.plan.spec();
                    let now = active_and_standby(sup).map(|(a, b)| (plan_slot(a), plan_slot(b)));
                    if now.as_ref().ok() != Some(&(spec.active, spec.standby)) {
                        let found = match now {
                            Ok((a, b)) => format!("engine {a} active, engine {b} hot standby"),
                            Err(reply) => reply.message,
                        };
                        self.finish(
                            sup,
                            Outcome::Aborted {
                                reason: format!(
                                    "nothing was changed: the cluster changed during the compatibility check (expected engine {} active and engine {} hot standby, found: {found}); run the upgrade again",
                                    spec.active, spec.standby
                                ),
                            },
                        );
                        return true;
                    }
                }
                Some(Err(reason)) => {
                    self.probe = None;
                    self.finish(
                        sup,
                        Outcome::Aborted {
                            reason: format!(
                                "nothing was changed: {reason}; the engines run the old version as before"
                            ),
                        },
                    );
                    return true;
                }
            }
        }
        loop {
            if let Some(outcome) = self.forced.take() {
                self.cleanup(sup);
                self.finish(sup, outcome);
                return true;
            }
            if let Some(mut exec) = self.exec.take() {
                match self.poll(sup, &mut exec) {
                    None => {
                        self.exec = Some(exec);
                        return false;
                    }
                    Some(event) => {
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
                        self.report(sup, event);
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
                    self.current = planned.to_string();
                    if let Some(why) = self.abort.clone() {
                        if planned.progress.recovery.is_none() {
                            self.event("end", &planned, Some(format!("failed: {why}")), None);
                            self.report(
                                sup,
                                Event::Failed {
                                    id: planned.id,
                                    error: why,
                                },
                            );
                            continue;
                        }
                        self.abort = None;
                    }
                    // Recorded before it is performed: a restarted supervisor knows what may
                    // have been under way.
                    self.persist(sup);
                    if planned.progress.recovery.is_none()
                        && self.pause_at == Some(planned.progress.number)
                    {
                        warn!(action = %planned, "{TEST_PAUSE_ENV}: the upgrade holds here");
                        self.current = format!("{planned} (held by {TEST_PAUSE_ENV})");
                        self.paused = true;
                        return false;
                    }
                    info!(action = %planned, "upgrade action");
                    self.event("begin", &planned, None, None);
                    match self.start_action(sup, &planned) {
                        Ok(phase) => {
                            self.exec = Some(Exec {
                                deadline: Instant::now()
                                    + Duration::from_millis(planned.timeout_ms),
                                started: Instant::now(),
                                planned,
                                phase,
                            });
                            // With the process it started or the command it posted.
                            self.persist(sup);
                        }
                        Err(error) => {
                            self.event("end", &planned, Some(format!("failed: {error}")), None);
                            self.report(
                                sup,
                                Event::Failed {
                                    id: planned.id,
                                    error,
                                },
                            );
                        }
                    }
                }
                Next::Wait(id) => {
                    self.forced = Some(Outcome::RollbackFailed {
                        reason: format!("internal: the plan waits for action {id}, which the supervisor is not performing"),
                    });
                }
                Next::Finished(outcome) => {
                    self.finish(sup, outcome);
                    return true;
                }
            }
        }
    }

    fn start_action(&mut self, sup: &mut Supervisor, planned: &Planned) -> Result<Phase, String> {
        Ok(match &planned.action {
            Action::Stop { slot } => {
                let slot = slot_index(*slot);
                if sup.is_active(slot) {
                    return Err(format!(
                        "engine {} is active; it is not stopped",
                        slot_name(slot)
                    ));
                }
                sup.request_stop(slot);
                Phase::Stop {
                    slot,
                    killed: false,
                }
            }
            Action::Start { slot, binary, .. } => {
                let slot = slot_index(*slot);
                check_binary(binary).map_err(|e| e.to_string())?;
                match &sup.engines[slot] {
                    // Told to stop or killed (an engine that never registered, timed out a
                    // moment ago): the slot is free once it has exited, within the action's
                    // timeout.
                    Some(p) if p.expected_exit || p.fenced => {
                        info!(slot = %slot_name(slot), pid = p.pid(), "waiting for the slot's previous engine to exit before starting");
                        return Ok(Phase::Start {
                            slot,
                            waiting: Some(binary.clone()),
                        });
                    }
                    Some(p) => {
                        return Err(format!(
                            "slot {} is still taken by pid {}, which was not told to stop",
                            slot_name(slot),
                            p.pid()
                        ))
                    }
                    None => {}
                }
                sup.spawn(slot, binary, true).map_err(|e| e.to_string())?;
                Phase::Start {
                    slot,
                    waiting: None,
                }
            }
            Action::Attach { standby, active } => Phase::Attach {
                standby: slot_index(*standby),
                active: slot_index(*active),
            },
            Action::Switchover { from, to } => {
                Phase::Switchover(SwitchExec::post(sup, slot_index(*from), slot_index(*to)))
            }
            Action::Accept {
                active,
                accept_for_ms,
            } => {
                let slot = slot_index(*active);
                Phase::Accept {
                    slot,
                    until: Instant::now() + Duration::from_millis(*accept_for_ms),
                    cmd: None,
                    base: (
                        sup.control.get(slot, Field::Requests),
                        sup.control.get(slot, Field::Refusals),
                    ),
                    worst_p99_ns: 0,
                }
            }
            Action::EnableFeatures { active, standby } => Phase::Enable(EnableExec::post(
                sup,
                slot_index(*active),
                slot_index(*standby),
            )),
        })
    }

    fn poll(&mut self, sup: &mut Supervisor, exec: &mut Exec) -> Option<Event> {
        let id = exec.planned.id;
        let now = Instant::now();
        let late = now > exec.deadline;
        match &mut exec.phase {
            Phase::Stop { slot, killed } => {
                if sup.engines[*slot].is_none() {
                    return Some(Event::Done { id });
                }
                if late && !*killed {
                    warn!(slot = %slot_name(*slot), "engine did not stop in time; SIGKILL");
                    sup.kill_expected(*slot);
                    *killed = true;
                }
                None
            }
            Phase::Start { slot, waiting } => {
                if let Some(binary) = waiting.as_ref() {
                    if sup.engines[*slot].is_some() {
                        return late.then_some(Event::TimedOut { id });
                    }
                    if let Err(e) = sup.spawn(*slot, binary, true) {
                        return Some(Event::Failed {
                            id,
                            error: e.to_string(),
                        });
                    }
                    *waiting = None;
                    // With the process it started, for a restarted supervisor.
                    self.persist(sup);
                    return None;
                }
                if sup.ours(*slot) {
                    return Some(Event::Done { id });
                }
                if late {
                    sup.kill_expected(*slot);
                    return Some(Event::TimedOut { id });
                }
                None
            }
            Phase::Attach { standby, active } => {
                if sup.is_hot_standby(*standby) && sup.is_active(*active) {
                    return Some(Event::Done { id });
                }
                late.then_some(Event::TimedOut { id })
            }
            Phase::Switchover(sw) => match sw.poll(sup) {
                SwitchPoll::Done { took } => {
                    info!(pause_us_max = took.as_micros() as u64, "switched over");
                    Some(Event::Done { id })
                }
                SwitchPoll::Refused(error) => Some(Event::Failed { id, error }),
                SwitchPoll::Pending if late => {
                    sw.cancel(sup);
                    Some(Event::TimedOut { id })
                }
                SwitchPoll::Pending => None,
            },
            Phase::Accept {
                slot,
                until,
                cmd,
                base,
                worst_p99_ns,
            } => {
                let reject = |reason: String| {
                    Some(Event::Verdict {
                        id,
                        verdict: Verdict::Rejected { reason },
                    })
                };
                if let Some(why) = &self.abort {
                    if let Some(mut c) = cmd.take() {
                        kill_group(&mut c);
                    }
                    return reject(why.clone());
                }
                let error = sup.control.get(*slot, Field::Error);
                if error != 0 {
                    return reject(format!(
                        "engine {} reported error {error}",
                        slot_name(*slot)
                    ));
                }
                if !sup.is_active(*slot) {
                    return reject(format!("engine {} is no longer active", slot_name(*slot)));
                }
                let acceptance = &self.acceptance;
                *worst_p99_ns = (*worst_p99_ns).max(sup.control.get(*slot, Field::ServiceP99Ns));
                if *worst_p99_ns > acceptance.max_latency_us_p99 * 1000 {
                    return reject(format!(
                        "engine {}: request service time p99 {} µs, expected at most {} µs (acceptance.max_latency_us_p99)",
                        slot_name(*slot),
                        *worst_p99_ns / 1000,
                        acceptance.max_latency_us_p99
                    ));
                }
                if now < *until {
                    return None;
                }
                let requests = sup
                    .control
                    .get(*slot, Field::Requests)
                    .saturating_sub(base.0);
                let refusals = sup
                    .control
                    .get(*slot, Field::Refusals)
                    .saturating_sub(base.1);
                let soak_ms = match &exec.planned.action {
                    Action::Accept { accept_for_ms, .. } => *accept_for_ms,
                    _ => 0,
                };
                if requests == 0 && soak_ms > 0 {
                    // No request served is no evidence that the new version works.
                    return reject(format!(
                        "not enough evidence: engine {} served no request during the {soak_ms} ms acceptance window (acceptance.accept_for_ms); an upgrade is accepted only on traffic",
                        slot_name(*slot)
                    ));
                }
                // A handler's business refusal is the application working, not failing:
                // it counts only if the config says so (engine failures reject above).
                if requests > 0 && acceptance.count_refusals {
                    let rate = refusals as f64 / requests as f64;
                    if rate > acceptance.max_error_rate {
                        return reject(format!(
                            "engine {}: {refusals} of {requests} requests refused ({:.2}%), expected at most {:.2}% (acceptance.max_error_rate)",
                            slot_name(*slot),
                            rate * 100.0,
                            acceptance.max_error_rate * 100.0
                        ));
                    }
                }
                let Some(accept_cmd) = self.accept_cmd.clone() else {
                    return Some(Event::Verdict {
                        id,
                        verdict: Verdict::Accepted,
                    });
                };
                if cmd.is_none() {
                    match Command::new("/bin/sh")
                        .arg("-c")
                        .arg(&accept_cmd)
                        .env("UNDERSTUDY_DIR", &sup.dir)
                        .env("UNDERSTUDY_ACTIVE_SLOT", slot_name(*slot).to_string())
                        // Its own process group: on a timeout or an abort the whole command
                        // (the shell and whatever it started) is killed, not the shell alone.
                        .process_group(0)
                        .spawn()
                    {
                        Ok(child) => *cmd = Some(child),
                        Err(e) => {
                            return reject(format!("cannot run accept command `{accept_cmd}`: {e}"))
                        }
                    }
                }
                let child = cmd.as_mut().expect("spawned");
                match child.try_wait() {
                    Ok(Some(status)) if status.success() => Some(Event::Verdict {
                        id,
                        verdict: Verdict::Accepted,
                    }),
                    Ok(Some(status)) => {
                        reject(format!("accept command `{accept_cmd}` failed ({status})"))
                    }
                    Err(e) => reject(format!("accept command `{accept_cmd}`: {e}")),
                    Ok(None) if late => {
                        kill_group(child);
                        Some(Event::TimedOut { id })
                    }
                    Ok(None) => None,
                }
            }
            Phase::Enable(en) => match en.poll(sup) {
                EnablePoll::Done => Some(Event::Done { id }),
                EnablePoll::Refused(error) => Some(Event::Failed { id, error }),
                EnablePoll::Pending => late.then_some(Event::TimedOut { id }),
            },
        }
    }

    fn cleanup(&mut self, sup: &mut Supervisor) {
        if let Some(exec) = self.exec.take() {
            match exec.phase {
                Phase::Accept {
                    cmd: Some(mut c), ..
                } => kill_group(&mut c),
                Phase::Switchover(sw) => sw.cancel(sup),
                _ => {}
            }
        }
    }

    fn on_death(&mut self, sup: &mut Supervisor, slot: usize, successor: Option<usize>) {
        if let Some(probe) = self.probe.as_mut() {
            if probe.slot != slot {
                // Before the plan's first action: nothing was changed; the upgrade ends here
                // and the keeper restores the cluster.
                probe.fail(
                    sup,
                    format!(
                        "engine {} died during the compatibility check (active now: {})",
                        slot_name(slot),
                        successor.map_or("none".into(), |s| slot_name(s).to_string())
                    ),
                );
            }
            // The check's own engine: its death is the check's answer.
            return;
        }
        emit(
            &self.watchers,
            &Reply::event(
                format!(
                    "engine {} died; active: {}",
                    slot_name(slot),
                    successor.map_or("none".into(), |s| slot_name(s).to_string())
                ),
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
            sup,
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
                self.cleanup(sup);
                self.pending = Some(next);
            }
        }
    }

    fn finish(&mut self, sup: &mut Supervisor, outcome: Outcome) {
        let code = match &outcome {
            Outcome::Completed => Code::Ok,
            Outcome::RolledBack { .. } => Code::RolledBack,
            Outcome::Aborted { .. } => Code::Aborted,
            Outcome::RollbackFailed { .. } => Code::RollbackFailed,
            Outcome::Outage { .. } => Code::Outage,
        };
        if outcome == Outcome::Completed {
            sup.last_upgrade = Some((self.old_binary.clone(), self.new_binary.clone()));
        }
        sup.managed = [false; SLOTS];
        for slot in 0..SLOTS {
            sup.managed[slot] = sup.engines[slot].is_some();
        }
        sup.ensure_two_managed();
        // The upgrade has ended: its record goes. Marked first, in case this supervisor dies
        // before the removal: its successor then only reports the outcome.
        self.record.outcome = Some(outcome.to_string());
        if let Err(e) = self
            .write_record(sup)
            .and_then(|()| record::remove(&sup.dir))
        {
            error!("{e}; remove it by hand (the upgrade has ended: {outcome})");
        }
        if self.resumed_at.is_some() {
            if let Some(interrupted) = sup.interrupted.as_mut() {
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
            "status": sup.status(),
        }));
        emit(&self.watchers, &reply);
    }
}

/// After a supervisor restart, an upgrade its record says was in progress. First what the
/// previous supervisor had under way settles: a cluster command no engine took is withdrawn,
/// an engine told to stop exits (SIGKILL at `shutdown_ms`), an engine being started
/// registers (within `start_ms`), a role change lands (an active within `switchover_ms`).
/// Then the cluster is observed — each engine's version from the record's process
/// identities — and handed to the plan, resumed ([`UpgradePlan::resume`]): it never goes
/// forward; before the acceptance verdict it restores the old version, after it it keeps the
/// accepted new one.
pub(crate) struct ResumeOp {
    record: UpgradeRecord,
    began: Instant,
    killed: bool,
}

impl ResumeOp {
    pub(crate) fn begin(sup: &mut Supervisor, record: UpgradeRecord) -> ResumeOp {
        warn!(
            to = %record.new_binary.display(),
            at = %record.progress,
            previous_supervisor = record.supervisor_pid,
            "an upgrade was left in the middle by a previous supervisor; it does not go on: \
             before its acceptance verdict the old version is restored, after it the new version is kept"
        );
        if let Some((seq, command, _)) = sup.control.pending() {
            if command != 0 {
                warn!(
                    seq,
                    command, "withdrawing a cluster command the previous supervisor posted and no engine took"
                );
                sup.control.post(0, 0);
            }
        }
        for slot in 0..SLOTS {
            if sup.ours(slot) && sup.control.get(slot, Field::Cmd) == slot_cmd::STOP {
                if let Some(proc) = sup.engines[slot].as_mut() {
                    info!(slot = %slot_name(slot), pid = proc.pid(), "the engine was being stopped; letting it stop");
                    proc.expected_exit = true;
                }
            }
        }
        // Stopped before its first action: an engine in the spare slot that the record does
        // not know is the compatibility check's (see [`Probe`]); it only goes.
        let spare = SLOTS - 1;
        if record.checkpoint.in_flight.is_none() && record.progress == UPGRADE_STARTING {
            if let Some(proc) = sup.engines[spare].as_ref() {
                if record
                    .version_of(plan_slot(spare), &proc.identity)
                    .is_none()
                {
                    info!(slot = %slot_name(spare), pid = proc.pid(), "the engine in the spare slot is the interrupted upgrade's compatibility check; stopping it");
                    sup.request_stop(spare);
                }
            }
        }
        sup.interrupted = Some(InterruptedUpgrade {
            binary: Some(record.new_binary.clone()),
            at: Some(record.progress.clone()),
            decision: "letting the action in flight settle before deciding".into(),
            outcome: None,
            code: None,
        });
        ResumeOp {
            record,
            began: Instant::now(),
            killed: false,
        }
    }

    /// What was under way has settled, or waiting longer would not help.
    fn settled(&mut self, sup: &mut Supervisor) -> bool {
        let t = sup.config.timeouts.clone();
        let elapsed = self.began.elapsed();
        let longest = t.start().max(t.switchover()).max(t.shutdown() * 2);
        if elapsed > longest {
            return true;
        }
        let stopping: Vec<usize> = (0..SLOTS)
            .filter(|&s| sup.engines[s].as_ref().is_some_and(|p| p.expected_exit))
            .collect();
        if !stopping.is_empty() {
            if elapsed > t.shutdown() && !self.killed {
                for slot in stopping {
                    warn!(slot = %slot_name(slot), "engine did not stop in time; SIGKILL");
                    sup.kill_expected(slot);
                }
                self.killed = true;
            }
            return false;
        }
        if let Some(Action::Start { slot, .. }) = &self.record.checkpoint.in_flight {
            let slot = slot_index(*slot);
            if sup.engines[slot].is_none() && !sup.adopt_registered(slot) && elapsed < t.start() {
                return false;
            }
        }
        sup.active().is_some() || elapsed > t.switchover()
    }

    /// The cluster as the plan models it; `Err` names an engine the record does not explain.
    fn observe(&self, sup: &Supervisor) -> Result<Cluster, String> {
        let starting = match &self.record.checkpoint.in_flight {
            Some(Action::Start { slot, version, .. }) => Some((*slot, *version)),
            _ => None,
        };
        let mut engines = Vec::new();
        for slot in 0..SLOTS {
            let Some(proc) = sup.engines[slot].as_ref() else {
                continue;
            };
            if proc.expected_exit {
                continue;
            }
            let at = plan_slot(slot);
            let version = self
                .record
                .version_of(at, &proc.identity)
                .or_else(|| starting.filter(|(s, _)| *s == at).map(|(_, v)| v))
                .ok_or_else(|| {
                    format!(
                        "engine {} (pid {}) is not one the interrupted upgrade knew",
                        slot_name(slot),
                        proc.pid()
                    )
                })?;
            let role = if sup.is_active(slot) {
                PlanRole::Active
            } else if sup.is_hot_standby(slot) {
                PlanRole::Standby
            } else {
                PlanRole::OutOfService
            };
            engines.push((
                at,
                Engine {
                    version,
                    role,
                    features_enabled: sup.ours(slot) && sup.control.get(slot, Field::Features) != 0,
                },
            ));
        }
        Ok(Cluster::new(engines))
    }

    fn step(&mut self, sup: &mut Supervisor) -> Stepped {
        if !self.settled(sup) {
            return Stepped::Running;
        }
        let cause = format!(
            "the supervisor (pid {}) stopped during this step, and a restarted supervisor does not go on with an upgrade",
            self.record.supervisor_pid
        );
        let resumed = self.observe(sup).and_then(|cluster| {
            let spec = self.record.spec(sup.config.timeouts.clone());
            UpgradePlan::resume(spec, &self.record.checkpoint, cluster.clone(), &cause)
                .map(|plan| (cluster, plan))
                .map_err(|e| format!("the record does not fit the cluster: {e}"))
        });
        match resumed {
            Ok((cluster, plan)) => {
                // Adopted engines show the executable they run, which for a wrapper script is
                // not the binary the upgrade started: use the record's.
                for (slot, engine) in cluster.engines() {
                    if let Some(proc) = sup.engines[slot_index(slot)].as_mut() {
                        proc.binary = self.record.binary(engine.version).to_path_buf();
                    }
                }
                sup.record_spawned();
                let decision = match plan.checkpoint().recovery {
                    Some(Recovery::Abort) => "undo it: it had not switched over, so the old version stays active, with an old-version hot standby",
                    Some(Recovery::Rollback) => "roll back: the old version becomes active again, with an old-version hot standby (the new version had no acceptance verdict, or lost the active role)",
                    Some(Recovery::Settle) => "keep the accepted new version: stop the engines that do not serve, then restore a hot standby",
                    None => "nothing can be done: no engine is active",
                };
                info!(at = %self.record.progress, "interrupted upgrade: {decision}");
                if let Some(interrupted) = sup.interrupted.as_mut() {
                    interrupted.decision = decision.to_owned();
                }
                let run = UpgradeRun::resumed(sup, self.record.clone(), plan);
                Stepped::Became(Box::new(Operation::Upgrade(Box::new(run))))
            }
            Err(why) => {
                let aside = match record::set_aside(&sup.dir) {
                    Ok(path) => format!("its record is in {}", path.display()),
                    Err(e) => e.to_string(),
                };
                error!("interrupted upgrade: {why}; the cluster is left as found ({aside}); check `understudy status` and finish by hand");
                if let Some(interrupted) = sup.interrupted.as_mut() {
                    interrupted.decision = format!("left as found: {why}; {aside}");
                    interrupted.outcome = Some("not settled: the operator takes over".into());
                    interrupted.code = Some(Code::Failed);
                }
                for slot in 0..SLOTS {
                    sup.managed[slot] = sup.engines[slot].is_some();
                }
                sup.ensure_two_managed();
                Stepped::Ended
            }
        }
    }
}
