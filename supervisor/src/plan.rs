//! The rolling upgrade as a pure state machine: no I/O, no clock, no processes.
//!
//! The supervisor drives an [`UpgradePlan`]: it calls [`UpgradePlan::next_action`], performs
//! the [`Action`] it gets (arming a timer of [`Planned::timeout_ms`]), and feeds the outcome
//! back with [`UpgradePlan::on_event`]. Engine deaths are reported whenever they happen, also
//! between actions. The plan models each slot's engine (version, role, features) and decides
//! from that model alone, so every decision is reproducible in a unit test.
//!
//! # The forward path
//!
//! With the active in slot `x` and the standby in slot `y` (both on the old version):
//!
//! | step | default                       | `keep_standby` (spare slot `z`)     |
//! |------|-------------------------------|-------------------------------------|
//! | 1    | stop `y`                      | start `z` on the new version        |
//! | 2    | start `y` on the new version  | attach `z` to `x`, wait until hot   |
//! | 3    | attach `y` to `x`, until hot  | stop `y`                            |
//! | 4    | switch over `x` → `y`         | switch over `x` → `z`               |
//! | 5    | acceptance on `y`             | acceptance on `z`                   |
//! | 6    | stop `x`                      | start `y` new, attach to `z`        |
//! | 7    | start `x` new, attach to `y`  | stop `x`                            |
//! | 8    | enable features on `y` + `x`  | enable features on `z` + `y`        |
//!
//! New engines always start with their new features disabled; step 8 is left out with
//! `no_enable`. With `keep_standby` a hot standby exists at every moment, and the cluster ends
//! in slots `z` and `y`: the slots rotate, and the freed slot `x` is the spare of the next
//! upgrade. Without it, only slots `x` and `y` are ever used.
//!
//! # Failures
//!
//! An action that fails ([`Event::Failed`]) or times out ([`Event::TimedOut`]) is taken to
//! have had no effect (the supervisor guarantees that, fencing an engine if it must and
//! reporting the death). Any failure ends the forward path; the plan then *recovers* towards
//! a safe topology and ends in a terminal [`Outcome`] whose reason names the step:
//!
//! - Before the acceptance verdict: restore the old version — the old engine active with one
//!   hot old-version standby and nothing else running (switching back first if the new engine
//!   is active). Ends [`Outcome::Aborted`] if the failure came before the switchover
//!   completed, [`Outcome::RolledBack`] if it came after (acceptance rejected, the new active
//!   crashed, ...).
//! - After the verdict: the new version is committed and is not rolled back, unless a crash
//!   of the new active made the old standby step up, in which case the old version is
//!   restored ([`Outcome::RolledBack`]). Otherwise the plan *settles*: it stops every engine
//!   that is neither active nor a hot standby and ends [`Outcome::Aborted`].
//! - A recovery action that fails, or a recovery that would need more than
//!   [`RECOVERY_STARTS_MAX`] engine starts (engines dying while it runs), ends
//!   [`Outcome::RollbackFailed`]: the plan stops acting and the operator takes over.
//! - If an engine death leaves no active (the active died with no hot standby to step up),
//!   the plan ends [`Outcome::Outage`] at once, whatever it was doing.
//!
//! Engine deaths, step by step:
//!
//! - An old-version engine that is not active dies (the old standby, or the old engine that
//!   is the new active's standby): the plan continues; a later stop of that slot is skipped.
//!   It was going to be retired anyway, and its death says nothing about the new version.
//! - The old active dies during the switchover and the new engine (the switchover's target)
//!   is the one that stepped up: the switchover happened, by failover; the plan continues.
//! - Any other death (a new-version engine, or the active outside that case) is a failure.
//!
//! A supervisor that stops in the middle of a plan (killed, or restarted by the operator)
//! records the plan's [`Checkpoint`] as it goes, and the next supervisor takes it up with
//! [`UpgradePlan::resume`] on the cluster as it finds it: the interruption is one more failure
//! of the step in progress, recovered from as above. The forward path is never continued
//! after a restart: an acceptance check that was cut short proves nothing, and an operator
//! who lost the upgrade's progress stream should find the cluster settled, not moving.
//!
//! When the active dies, the supervisor reports which hot standby stepped up (it reads the
//! control block); every other standby lost its stream and is modelled out of service until
//! it is attached again. An action that involves the dead engine is abandoned (the supervisor
//! cancels it; later reports of it are rejected as stale); any other action in flight runs to
//! its end before recovery acts.
//!
//! # Examples
//!
//! ```
//! use understudy_supervisor::plan::{Action, Event, Next, Outcome, UpgradePlan, UpgradeSpec, Verdict};
//!
//! let mut plan = UpgradePlan::new(UpgradeSpec::new("/opt/v1/engine", "/opt/v2/engine")).unwrap();
//! let outcome = loop {
//!     match plan.next_action() {
//!         Next::Perform(planned) => {
//!             println!("{planned}");
//!             let id = planned.id;
//!             let event = match planned.action {
//!                 Action::Accept { .. } => Event::Verdict { id, verdict: Verdict::Accepted },
//!                 _ => Event::Done { id },
//!             };
//!             plan.on_event(event).unwrap();
//!         }
//!         Next::Wait(_) => unreachable!("every action was answered"),
//!         Next::Finished(outcome) => break outcome,
//!     }
//! };
//! assert_eq!(outcome, Outcome::Completed);
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::TimeoutsConfig;

/// The most engines a recovery may start before it gives up with
/// [`Outcome::RollbackFailed`]: restoring the old version from a new active with no
/// old engine left takes two.
pub const RECOVERY_STARTS_MAX: u8 = 2;

/// An engine slot. `A` and `B` are the usual pair; `C` is the extra slot of a
/// `keep_standby` upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// Slot `a`.
    A,
    /// Slot `b`.
    B,
    /// Slot `c`.
    C,
}

impl Slot {
    /// Every slot, in order.
    pub const ALL: [Slot; 3] = [Slot::A, Slot::B, Slot::C];

    fn index(self) -> usize {
        self as usize
    }

    /// The slot's lower-case name, as in the config and file names.
    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
            Slot::C => "c",
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the two binaries an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The version running before the upgrade (N).
    Old,
    /// The version being rolled out (N+1).
    New,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Version::Old => "old version",
            Version::New => "new version",
        })
    }
}

/// An engine's role in the cluster.
///
/// (Named `PlannedRole`, not `Role`: `understudy_runtime::control::Role` is the word an engine
/// publishes; this is the plan's model of it, without "no engine".)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlannedRole {
    /// Does the work and streams its run state.
    Active,
    /// A hot standby: attached to the active and caught up, able to step up.
    Standby,
    /// Running but not serving: just started, catching up, or cut off from its active by a
    /// role change. Cannot step up.
    OutOfService,
}

impl fmt::Display for PlannedRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PlannedRole::Active => "active",
            PlannedRole::Standby => "standby",
            PlannedRole::OutOfService => "out of service",
        })
    }
}

/// The plan's model of one running engine.
///
/// (Named `PlannedEngine`, not `Engine`: `understudy_runtime::engine::Engine` is the engine
/// process itself.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedEngine {
    /// The binary it runs.
    pub version: Version,
    /// Its role.
    pub role: PlannedRole,
    /// Whether the new version's features are enabled on it.
    pub features_enabled: bool,
}

impl PlannedEngine {
    /// An engine of `version` in `role`, new features disabled.
    pub fn new(version: Version, role: PlannedRole) -> Self {
        Self {
            version,
            role,
            features_enabled: false,
        }
    }
}

/// The plan's model of the cluster: what runs in each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    slots: [Option<PlannedEngine>; 3],
}

impl Cluster {
    /// A cluster of these engines (a slot named twice holds the last one).
    pub fn new(engines: impl IntoIterator<Item = (Slot, PlannedEngine)>) -> Self {
        let mut slots = [None; 3];
        for (slot, engine) in engines {
            slots[slot.index()] = Some(engine);
        }
        Self { slots }
    }

    /// The engine in `slot`, if one runs there.
    pub fn engine(&self, slot: Slot) -> Option<&PlannedEngine> {
        self.slots[slot.index()].as_ref()
    }

    fn engine_mut(&mut self, slot: Slot) -> Option<&mut PlannedEngine> {
        self.slots[slot.index()].as_mut()
    }

    /// Every running engine with its slot.
    pub fn engines(&self) -> impl Iterator<Item = (Slot, &PlannedEngine)> + '_ {
        Slot::ALL
            .into_iter()
            .filter_map(|slot| self.engine(slot).map(|e| (slot, e)))
    }

    /// The slot of the active engine (the first, if a broken model had two).
    pub fn active(&self) -> Option<Slot> {
        self.slots_with(|e| e.role == PlannedRole::Active).next()
    }

    /// How many engines are active; the plan keeps this at one except in an outage.
    pub fn active_count(&self) -> usize {
        self.slots_with(|e| e.role == PlannedRole::Active).count()
    }

    /// The slots of the hot standbys.
    pub fn standbys(&self) -> impl Iterator<Item = Slot> + '_ {
        self.slots_with(|e| e.role == PlannedRole::Standby)
    }

    fn slots_with<'a>(
        &'a self,
        pred: impl Fn(&PlannedEngine) -> bool + 'a,
    ) -> impl Iterator<Item = Slot> + 'a {
        self.engines().filter(move |(_, e)| pred(e)).map(|(s, _)| s)
    }

    fn find(&self, version: Version, role: PlannedRole) -> Option<Slot> {
        self.slots_with(|e| e.version == version && e.role == role)
            .next()
    }

    fn version(&self, slot: Slot) -> Option<Version> {
        self.engine(slot).map(|e| e.version)
    }

    /// Every standby other than `new_active` loses its stream when the active changes.
    fn make_active(&mut self, new_active: Slot) {
        for (slot, engine) in Slot::ALL.into_iter().zip(self.slots.iter_mut()) {
            if let Some(engine) = engine {
                if slot == new_active {
                    engine.role = PlannedRole::Active;
                } else if engine.role == PlannedRole::Standby {
                    engine.role = PlannedRole::OutOfService;
                }
            }
        }
    }
}

/// What the supervisor must do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// Take the engine out of service: stop it cleanly (SIGKILL at the deadline). Never the
    /// active.
    Stop {
        /// The engine's slot.
        slot: Slot,
    },
    /// Spawn an engine on `binary`, with its new features disabled; done once it reports
    /// ready (it is then out of service).
    Start {
        /// The (empty) slot to start it in.
        slot: Slot,
        /// Which version `binary` is.
        version: Version,
        /// The executable.
        binary: PathBuf,
    },
    /// Attach `standby` to `active` (handshake, catch-up); done once it is hot.
    Attach {
        /// The engine becoming a standby.
        standby: Slot,
        /// The active it follows.
        active: Slot,
    },
    /// Planned switchover: `from` quiesces and hands over; `to` becomes active and `from`
    /// its hot standby. Done once both hold their new roles.
    Switchover {
        /// The current active.
        from: Slot,
        /// The hot standby taking over.
        to: Slot,
    },
    /// Watch the new active for `accept_for_ms` (no crash, error rate and latency within
    /// bounds), then run the accept command; answer with [`Event::Verdict`].
    Accept {
        /// The engine under test.
        active: Slot,
        /// The soak period.
        accept_for_ms: u64,
    },
    /// Enable the new features: a feature-change frame from `active`, applied by `standby`
    /// at the same point of the stream.
    EnableFeatures {
        /// The active.
        active: Slot,
        /// Its standby.
        standby: Slot,
    },
}

impl Action {
    /// Whether the action involves the engine in `slot`.
    pub fn involves(&self, slot: Slot) -> bool {
        match *self {
            Action::Stop { slot: s } | Action::Start { slot: s, .. } => s == slot,
            Action::Attach { standby, active } | Action::EnableFeatures { active, standby } => {
                standby == slot || active == slot
            }
            Action::Switchover { from, to } => from == slot || to == slot,
            Action::Accept { active, .. } => active == slot,
        }
    }

    fn timeout_ms(&self, timeouts: &TimeoutsConfig) -> u64 {
        match self {
            Action::Stop { .. } => timeouts.shutdown_ms,
            Action::Start { .. } => timeouts.start_ms,
            Action::Attach { .. } => timeouts.hot_ms,
            Action::Switchover { .. } | Action::EnableFeatures { .. } => timeouts.switchover_ms,
            // The soak, plus time for the accept command.
            Action::Accept { accept_for_ms, .. } => accept_for_ms.saturating_add(timeouts.start_ms),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Stop { slot } => write!(f, "stop engine {slot}"),
            Action::Start {
                slot,
                version,
                binary,
            } => {
                write!(
                    f,
                    "start engine {slot} on the {version} ({})",
                    binary.display()
                )?;
                if *version == Version::New {
                    f.write_str(", new features disabled")?;
                }
                Ok(())
            }
            Action::Attach { standby, active } => {
                write!(
                    f,
                    "attach engine {standby} as standby of {active}, wait until hot"
                )
            }
            Action::Switchover { from, to } => {
                write!(f, "switch over from engine {from} to engine {to}")
            }
            Action::Accept {
                active,
                accept_for_ms,
            } => write!(f, "check engine {active} for {accept_for_ms} ms"),
            Action::EnableFeatures { active, standby } => {
                write!(f, "enable new features on engines {active} and {standby}")
            }
        }
    }
}

/// The eight steps of the rolling upgrade, for progress display and failure reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Take the old standby out of service.
    RetireOldStandby,
    /// Start the new version as a standby.
    StartNewStandby,
    /// Attach the new standby and let it catch up.
    CatchUpNewStandby,
    /// Hand the active role to the new version.
    Switchover,
    /// Soak and check the new active.
    Acceptance,
    /// Take the old engine out of service.
    RetireOldActive,
    /// Run a second engine on the new version as hot standby.
    UpgradeSecondEngine,
    /// Enable the new features on both engines.
    EnableFeatures,
}

impl Step {
    /// What the step does, for humans.
    pub fn name(self) -> &'static str {
        match self {
            Step::RetireOldStandby => "take the old standby out of service",
            Step::StartNewStandby => "start the new version as standby, new features disabled",
            Step::CatchUpNewStandby => "attach the new standby to the old active, wait until hot",
            Step::Switchover => "switch over to the new version",
            Step::Acceptance => "acceptance check",
            Step::RetireOldActive => "take the old engine out of service",
            Step::UpgradeSecondEngine => {
                "start a second new-version engine as standby, wait until hot"
            }
            Step::EnableFeatures => "enable the new features on both engines",
        }
    }
}

/// How the plan is recovering from a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recovery {
    /// Undoing an upgrade that never switched over; ends [`Outcome::Aborted`].
    Abort,
    /// Switching back to the old version; ends [`Outcome::RolledBack`].
    Rollback,
    /// Keeping the committed new version, cleaning up; ends [`Outcome::Aborted`].
    Settle,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Recovery::Abort => "abort",
            Recovery::Rollback => "rollback",
            Recovery::Settle => "settle",
        })
    }
}

/// Where the plan is, for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The current step, or the step that failed while recovering.
    pub step: Step,
    /// Its number, from 1.
    pub number: u8,
    /// How many steps the plan has (7 with `no_enable`, else 8).
    pub total: u8,
    /// `Some` while recovering from a failure in `step`.
    pub recovery: Option<Recovery>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (number, total, name) = (self.number, self.total, self.step.name());
        match self.recovery {
            None => write!(f, "step {number}/{total} ({name})"),
            Some(recovery) => write!(f, "{recovery} after step {number}/{total} ({name})"),
        }
    }
}

/// Identifies an action, so a late report of an abandoned action is not mistaken for the
/// current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ActionId(pub u64);

impl fmt::Display for ActionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// An action handed to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// Quote it in the [`Event`] that reports the outcome.
    pub id: ActionId,
    /// What to do.
    pub action: Action,
    /// Where the plan is.
    pub progress: Progress,
    /// The supervisor's deadline for the action, after which it reports
    /// [`Event::TimedOut`].
    pub timeout_ms: u64,
}

impl fmt::Display for Planned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.progress, self.action)
    }
}

/// The answer to [`UpgradePlan::next_action`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Perform this action and report its outcome.
    Perform(Planned),
    /// An action is in flight; report its outcome (or an engine death) first.
    Wait(ActionId),
    /// The plan has ended.
    Finished(Outcome),
}

/// The acceptance verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the new version.
    Accepted,
    /// Roll back.
    Rejected {
        /// Which check failed, with the measured value.
        reason: String,
    },
}

/// What the supervisor reports to the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The action succeeded (for [`Action::Accept`], send a [`Event::Verdict`]).
    Done {
        /// The action.
        id: ActionId,
    },
    /// The action failed and had no effect.
    Failed {
        /// The action.
        id: ActionId,
        /// Why, for the operator.
        error: String,
    },
    /// The action's deadline passed and it had no effect.
    TimedOut {
        /// The action.
        id: ActionId,
    },
    /// The outcome of an [`Action::Accept`].
    Verdict {
        /// The action.
        id: ActionId,
        /// Keep or roll back.
        verdict: Verdict,
    },
    /// The engine in `slot` died (at any time, even with no action in flight).
    EngineDied {
        /// The dead engine's slot.
        slot: Slot,
        /// The active engine after the death, as the control block says: the standby that
        /// stepped up if the dead engine was active, `None` if none could.
        active: Option<Slot>,
    },
}

/// How the plan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both engines run the new version (with the new features enabled unless `no_enable`).
    Completed,
    /// The upgrade was found unacceptable, or the new version failed after the switchover;
    /// the old version is active again with an old-version hot standby.
    RolledBack {
        /// The failed step and what went wrong.
        reason: String,
    },
    /// The upgrade stopped. Before the switchover: the old version is active with an
    /// old-version hot standby, as before. After acceptance: the new version is active and
    /// engines that were not serving were stopped.
    Aborted {
        /// The failed step and what went wrong.
        reason: String,
    },
    /// Recovery failed; one engine is active, the rest is as [`UpgradePlan::cluster`] says.
    RollbackFailed {
        /// What failed first, and what failed in recovery.
        reason: String,
    },
    /// No engine is active: the active died with no hot standby to step up.
    Outage {
        /// The step and the death.
        reason: String,
    },
}

impl Outcome {
    /// The reason, for every outcome but [`Outcome::Completed`].
    pub fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Completed => None,
            Outcome::RolledBack { reason }
            | Outcome::Aborted { reason }
            | Outcome::RollbackFailed { reason }
            | Outcome::Outage { reason } => Some(reason),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Completed => f.write_str("upgrade completed"),
            Outcome::RolledBack { reason } => write!(f, "upgrade rolled back: {reason}"),
            Outcome::Aborted { reason } => write!(f, "upgrade aborted: {reason}"),
            Outcome::RollbackFailed { reason } => write!(f, "recovery failed: {reason}"),
            Outcome::Outage { reason } => write!(f, "outage, no engine active: {reason}"),
        }
    }
}

/// An event the plan cannot accept; the plan's state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The plan has already ended.
    Finished,
    /// The event names an action that is not in flight (stale or unknown).
    NotInFlight {
        /// The id in the event.
        id: ActionId,
        /// The action in flight, if any.
        in_flight: Option<ActionId>,
    },
    /// A verdict for an action other than `Accept`, or `Done` for an `Accept`.
    WrongReport {
        /// The action.
        id: ActionId,
        /// What the action needs.
        expected: &'static str,
    },
    /// A death reported for a slot with no engine.
    NoEngine {
        /// The slot.
        slot: Slot,
    },
    /// The reported active after a death is not possible in the model.
    BadSuccessor {
        /// The dead engine.
        slot: Slot,
        /// The reported active.
        active: Option<Slot>,
        /// What the plan expected.
        expected: String,
    },
}

impl fmt::Display for EventError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EventError::Finished => f.write_str("the upgrade plan has already ended"),
            EventError::NotInFlight { id, in_flight } => match in_flight {
                Some(current) => write!(f, "action {id} is not in flight ({current} is)"),
                None => write!(f, "action {id} is not in flight (none is)"),
            },
            EventError::WrongReport { id, expected } => {
                write!(f, "action {id} must be answered with {expected}")
            }
            EventError::NoEngine { slot } => write!(f, "no engine runs in slot {slot}"),
            EventError::BadSuccessor {
                slot,
                active,
                expected,
            } => write!(
                f,
                "after engine {slot} died the report names {} active; expected {expected}",
                active.map_or("no engine".to_owned(), |s| format!("engine {s}"))
            ),
        }
    }
}

impl std::error::Error for EventError {}

/// What to upgrade and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeSpec {
    /// The slot of the old active.
    pub active: Slot,
    /// The slot of the old hot standby.
    pub standby: Slot,
    /// The binary both run now.
    pub old_binary: PathBuf,
    /// The binary to roll out.
    pub new_binary: PathBuf,
    /// Start the new version in the third slot before retiring a standby, so that a hot
    /// standby exists at every moment.
    pub keep_standby: bool,
    /// Leave the new features disabled (skip step 8).
    pub no_enable: bool,
    /// The acceptance soak period.
    pub accept_for_ms: u64,
    /// Deadlines for each kind of action.
    pub timeouts: TimeoutsConfig,
}

impl UpgradeSpec {
    /// Active in `a`, standby in `b`, no options, the default timeouts and a 2 s soak.
    pub fn new(old_binary: impl Into<PathBuf>, new_binary: impl Into<PathBuf>) -> Self {
        Self {
            active: Slot::A,
            standby: Slot::B,
            old_binary: old_binary.into(),
            new_binary: new_binary.into(),
            keep_standby: false,
            no_enable: false,
            accept_for_ms: 2_000,
            timeouts: TimeoutsConfig::default(),
        }
    }

    /// The slot neither engine uses at the start.
    pub fn spare(&self) -> Slot {
        Slot::ALL
            .into_iter()
            .find(|&s| s != self.active && s != self.standby)
            .expect("three slots, two taken")
    }
}

/// Why a plan cannot be made (or resumed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The active and the standby were given the same slot.
    SameSlot {
        /// The slot.
        slot: Slot,
    },
    /// A checkpoint names a step this plan does not have (step 8 without `no_enable`).
    StepNotInPlan {
        /// The step.
        step: Step,
    },
    /// A checkpoint is recovering but gives no reason.
    RecoveryWithoutReason,
    /// A checkpoint counts more recovery starts than a recovery may make.
    TooManyStarts {
        /// The count in the checkpoint.
        found: u8,
    },
    /// The cluster to resume with has more than one active engine.
    TwoActives {
        /// The slots of the actives.
        slots: Vec<Slot>,
    },
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlanError::SameSlot { slot } => write!(
                f,
                "active and standby must be in different slots, both are in slot {slot}"
            ),
            PlanError::StepNotInPlan { step } => write!(
                f,
                "expected a step of this plan, found `{}` (not in a plan without step 8)",
                step.name()
            ),
            PlanError::RecoveryWithoutReason => {
                f.write_str("expected the reason of the recovery in progress, found none")
            }
            PlanError::TooManyStarts { found } => write!(
                f,
                "expected at most {RECOVERY_STARTS_MAX} recovery starts, found {found}"
            ),
            PlanError::TwoActives { slots } => {
                let names: Vec<&str> = slots.iter().map(|s| s.name()).collect();
                write!(
                    f,
                    "expected at most one active engine, found engines {} active",
                    names.join(" and ")
                )
            }
        }
    }
}

/// Where a plan is, as the supervisor records it to survive its own restart: see
/// [`UpgradePlan::checkpoint`] and [`UpgradePlan::resume`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// The current step (the failed step while recovering).
    pub step: Step,
    /// `Some` while recovering from a failure.
    pub recovery: Option<Recovery>,
    /// Why it is recovering.
    pub reason: Option<String>,
    /// The switchover to the new version happened.
    pub switched: bool,
    /// The acceptance verdict was given: the new version is committed.
    pub accepted: bool,
    /// Engines the recovery has started so far.
    pub recovery_starts: u8,
    /// The action handed out and not yet reported: its effect is unknown after a restart.
    pub in_flight: Option<Action>,
}

impl std::error::Error for PlanError {}

#[derive(Debug, Clone)]
struct InFlight {
    planned: Planned,
    /// Issued while recovering (its failure fails the recovery).
    recovery: bool,
    /// Index into the script, for a forward action.
    script_index: usize,
}

#[derive(Debug, Clone)]
enum Mode {
    Forward,
    Recovering {
        kind: Recovery,
        reason: String,
        step: Step,
    },
    Finished(Outcome),
}

enum Decision {
    Act(Action),
    Finish(Outcome),
}

/// The rolling upgrade: see the [module docs](self).
#[derive(Debug, Clone)]
pub struct UpgradePlan {
    spec: UpgradeSpec,
    cluster: Cluster,
    script: Vec<(Step, Action)>,
    cursor: usize,
    mode: Mode,
    switched: bool,
    accepted: bool,
    in_flight: Option<InFlight>,
    next_id: u64,
    recovery_starts: u8,
}

impl UpgradePlan {
    /// A plan for a cluster whose active (`spec.active`) and hot standby (`spec.standby`) run
    /// the old version.
    pub fn new(spec: UpgradeSpec) -> Result<Self, PlanError> {
        if spec.active == spec.standby {
            return Err(PlanError::SameSlot { slot: spec.active });
        }
        let mut slots = [None; 3];
        slots[spec.active.index()] = Some(PlannedEngine::new(Version::Old, PlannedRole::Active));
        slots[spec.standby.index()] = Some(PlannedEngine::new(Version::Old, PlannedRole::Standby));
        let script = Self::script(&spec);
        Ok(Self {
            spec,
            cluster: Cluster { slots },
            script,
            cursor: 0,
            mode: Mode::Forward,
            switched: false,
            accepted: false,
            in_flight: None,
            next_id: 1,
            recovery_starts: 0,
        })
    }

    fn script(spec: &UpgradeSpec) -> Vec<(Step, Action)> {
        let (x, y, z) = (spec.active, spec.standby, spec.spare());
        let start_new = |slot| Action::Start {
            slot,
            version: Version::New,
            binary: spec.new_binary.clone(),
        };
        let accept = |active| Action::Accept {
            active,
            accept_for_ms: spec.accept_for_ms,
        };
        let (new_active, new_standby, mut script) = if spec.keep_standby {
            (
                z,
                y,
                vec![
                    (Step::StartNewStandby, start_new(z)),
                    (
                        Step::CatchUpNewStandby,
                        Action::Attach {
                            standby: z,
                            active: x,
                        },
                    ),
                    (Step::RetireOldStandby, Action::Stop { slot: y }),
                    (Step::Switchover, Action::Switchover { from: x, to: z }),
                    (Step::Acceptance, accept(z)),
                    (Step::UpgradeSecondEngine, start_new(y)),
                    (
                        Step::UpgradeSecondEngine,
                        Action::Attach {
                            standby: y,
                            active: z,
                        },
                    ),
                    (Step::RetireOldActive, Action::Stop { slot: x }),
                ],
            )
        } else {
            (
                y,
                x,
                vec![
                    (Step::RetireOldStandby, Action::Stop { slot: y }),
                    (Step::StartNewStandby, start_new(y)),
                    (
                        Step::CatchUpNewStandby,
                        Action::Attach {
                            standby: y,
                            active: x,
                        },
                    ),
                    (Step::Switchover, Action::Switchover { from: x, to: y }),
                    (Step::Acceptance, accept(y)),
                    (Step::RetireOldActive, Action::Stop { slot: x }),
                    (Step::UpgradeSecondEngine, start_new(x)),
                    (
                        Step::UpgradeSecondEngine,
                        Action::Attach {
                            standby: x,
                            active: y,
                        },
                    ),
                ],
            )
        };
        if !spec.no_enable {
            script.push((
                Step::EnableFeatures,
                Action::EnableFeatures {
                    active: new_active,
                    standby: new_standby,
                },
            ));
        }
        script
    }

    /// The plan's model of the cluster.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// What the plan was made with.
    pub fn spec(&self) -> &UpgradeSpec {
        &self.spec
    }

    /// How the plan ended, once it has.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.mode {
            Mode::Finished(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Where the plan is, to record; [`UpgradePlan::resume`] takes it up again.
    pub fn checkpoint(&self) -> Checkpoint {
        let (recovery, reason) = match &self.mode {
            Mode::Recovering { kind, reason, .. } => (Some(*kind), Some(reason.clone())),
            _ => (None, None),
        };
        Checkpoint {
            step: self.current_step(),
            recovery,
            reason,
            switched: self.switched,
            accepted: self.accepted,
            recovery_starts: self.recovery_starts,
            in_flight: self.in_flight.as_ref().map(|f| f.planned.action.clone()),
        }
    }

    /// Takes up a plan whose supervisor stopped in the middle of it (`checkpoint` is where it
    /// was), on the cluster as it is now: `cluster`, observed after the action that was in
    /// flight has settled. The forward path is never continued: the interruption is a failure
    /// of the current step (`cause` says what happened), and the plan recovers exactly as it
    /// does from any other failure there — before the acceptance verdict it restores the old
    /// version ([`Outcome::Aborted`] before the switchover, [`Outcome::RolledBack`] after);
    /// after the verdict it keeps the committed new version and settles
    /// ([`Outcome::Aborted`]), unless the old version is active again. A plan that was
    /// already recovering goes on with the same recovery. With no active engine it has ended
    /// ([`Outcome::Outage`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use understudy_supervisor::plan::*;
    ///
    /// // The supervisor died during the acceptance check: the new version (b) is active.
    /// let mut plan = UpgradePlan::new(UpgradeSpec::new("/opt/v1", "/opt/v2")).unwrap();
    /// let checkpoint = loop {
    ///     let Next::Perform(planned) = plan.next_action() else { unreachable!() };
    ///     if matches!(planned.action, Action::Accept { .. }) {
    ///         break plan.checkpoint();
    ///     }
    ///     plan.on_event(Event::Done { id: planned.id }).unwrap();
    /// };
    /// let now = Cluster::new([
    ///     (Slot::A, PlannedEngine::new(Version::Old, PlannedRole::Standby)),
    ///     (Slot::B, PlannedEngine::new(Version::New, PlannedRole::Active)),
    /// ]);
    /// let spec = UpgradeSpec::new("/opt/v1", "/opt/v2");
    /// let mut resumed = UpgradePlan::resume(spec, &checkpoint, now, "the supervisor restarted").unwrap();
    /// let Next::Perform(first) = resumed.next_action() else { unreachable!() };
    /// assert_eq!(first.action, Action::Switchover { from: Slot::B, to: Slot::A });
    /// assert_eq!(first.progress.recovery, Some(Recovery::Rollback));
    /// ```
    pub fn resume(
        spec: UpgradeSpec,
        checkpoint: &Checkpoint,
        cluster: Cluster,
        cause: &str,
    ) -> Result<Self, PlanError> {
        let mut plan = Self::new(spec)?;
        let step = checkpoint.step;
        let cursor = plan
            .script
            .iter()
            .position(|(s, _)| *s == step)
            .ok_or(PlanError::StepNotInPlan { step })?;
        if checkpoint.recovery_starts > RECOVERY_STARTS_MAX {
            return Err(PlanError::TooManyStarts {
                found: checkpoint.recovery_starts,
            });
        }
        if cluster.active_count() > 1 {
            return Err(PlanError::TwoActives {
                slots: cluster
                    .slots_with(|e| e.role == PlannedRole::Active)
                    .collect(),
            });
        }
        let active_new = cluster.active().and_then(|s| cluster.version(s)) == Some(Version::New);
        plan.cluster = cluster;
        plan.cursor = cursor;
        // A switchover in flight may have completed while no supervisor watched.
        plan.switched = checkpoint.switched || active_new;
        plan.accepted = checkpoint.accepted;
        plan.recovery_starts = checkpoint.recovery_starts;
        if plan.cluster.active().is_none() {
            let number = plan.step_number(step);
            plan.mode = Mode::Finished(Outcome::Outage {
                reason: format!(
                    "step {number} ({}): {cause}, and no engine is active",
                    step.name()
                ),
            });
            return Ok(plan);
        }
        match checkpoint.recovery {
            Some(kind) => {
                let reason = checkpoint
                    .reason
                    .clone()
                    .ok_or(PlanError::RecoveryWithoutReason)?;
                plan.mode = Mode::Recovering { kind, reason, step };
            }
            None => plan.start_recovery(cause.to_owned()),
        }
        Ok(plan)
    }

    /// The forward path's actions in order, each with its step: what a fault-free run does.
    pub fn forward_actions(&self) -> impl Iterator<Item = (Step, &Action)> + '_ {
        self.script.iter().map(|(step, action)| (*step, action))
    }

    /// The next action to perform, or why there is none. Hands out each action once: it is
    /// then in flight until its outcome is reported.
    pub fn next_action(&mut self) -> Next {
        if let Mode::Finished(outcome) = &self.mode {
            return Next::Finished(outcome.clone());
        }
        if let Some(in_flight) = &self.in_flight {
            return Next::Wait(in_flight.planned.id);
        }
        let decision = match &self.mode {
            Mode::Forward => self.decide_forward(),
            Mode::Recovering { kind, .. } => self.decide_recovery(*kind),
            Mode::Finished(_) => unreachable!("handled above"),
        };
        match decision {
            Decision::Finish(outcome) => {
                self.mode = Mode::Finished(outcome.clone());
                Next::Finished(outcome)
            }
            Decision::Act(action) => {
                let (recovery, step) = match &self.mode {
                    Mode::Recovering { kind, step, .. } => (Some(*kind), *step),
                    _ => (None, self.script[self.cursor].0),
                };
                if recovery.is_some() && matches!(action, Action::Start { .. }) {
                    self.recovery_starts += 1;
                }
                let planned = Planned {
                    id: ActionId(self.next_id),
                    timeout_ms: action.timeout_ms(&self.spec.timeouts),
                    action,
                    progress: self.progress(step, recovery),
                };
                self.next_id += 1;
                self.in_flight = Some(InFlight {
                    planned: planned.clone(),
                    recovery: recovery.is_some(),
                    script_index: self.cursor,
                });
                Next::Perform(planned)
            }
        }
    }

    fn progress(&self, step: Step, recovery: Option<Recovery>) -> Progress {
        let number = self.step_number(step);
        let total = self.step_number(self.script.last().expect("non-empty script").0);
        Progress {
            step,
            number,
            total,
            recovery,
        }
    }

    fn step_number(&self, step: Step) -> u8 {
        let mut number = 0;
        let mut previous = None;
        for (s, _) in &self.script {
            if previous != Some(*s) {
                number += 1;
                previous = Some(*s);
            }
            if *s == step {
                return number;
            }
        }
        unreachable!("every step is in the script")
    }

    fn current_step(&self) -> Step {
        match (&self.in_flight, &self.mode) {
            (_, Mode::Recovering { step, .. }) => *step,
            (Some(in_flight), _) if !in_flight.recovery => self.script[in_flight.script_index].0,
            _ => self.script[self.cursor.min(self.script.len() - 1)].0,
        }
    }

    fn decide_forward(&mut self) -> Decision {
        while let Some((_, action)) = self.script.get(self.cursor) {
            // A stop of an old engine that already died is done.
            if let Action::Stop { slot } = action {
                if self.cluster.engine(*slot).is_none() {
                    self.cursor += 1;
                    continue;
                }
            }
            return Decision::Act(action.clone());
        }
        Decision::Finish(Outcome::Completed)
    }

    fn allowed_slots(&self) -> Vec<Slot> {
        if self.spec.keep_standby {
            vec![self.spec.standby, self.spec.active, self.spec.spare()]
        } else {
            vec![self.spec.standby, self.spec.active]
        }
    }

    fn decide_recovery(&self, kind: Recovery) -> Decision {
        let Mode::Recovering { reason, .. } = &self.mode else {
            unreachable!("called while recovering")
        };
        let finish = || match kind {
            Recovery::Rollback => Outcome::RolledBack {
                reason: reason.clone(),
            },
            Recovery::Abort | Recovery::Settle => Outcome::Aborted {
                reason: reason.clone(),
            },
        };
        let cluster = &self.cluster;
        let active = cluster.active().expect("an outage ends the plan at once");
        let out_of_service = cluster
            .slots_with(|e| e.role == PlannedRole::OutOfService)
            .next();
        if kind == Recovery::Settle {
            return match out_of_service {
                Some(slot) => Decision::Act(Action::Stop { slot }),
                None => Decision::Finish(finish()),
            };
        }

        // Restore the old version: an old active, one old hot standby, nothing else.
        let old_standby = cluster.find(Version::Old, PlannedRole::Standby);
        let old_idle = cluster.find(Version::Old, PlannedRole::OutOfService);
        let free = self
            .allowed_slots()
            .into_iter()
            .find(|&s| cluster.engine(s).is_none());
        // Make room by stopping an engine that cannot serve, else a new-version standby.
        let victim = out_of_service.or_else(|| cluster.find(Version::New, PlannedRole::Standby));
        let start_old = |slot| {
            if self.recovery_starts >= RECOVERY_STARTS_MAX {
                Decision::Finish(Outcome::RollbackFailed {
                    reason: format!(
                        "{kind} would need more than {RECOVERY_STARTS_MAX} engine starts; \
                         it began because {reason}"
                    ),
                })
            } else {
                Decision::Act(Action::Start {
                    slot,
                    version: Version::Old,
                    binary: self.spec.old_binary.clone(),
                })
            }
        };
        let active_old = cluster.version(active) == Some(Version::Old);
        match (active_old, old_standby) {
            (false, Some(to)) => Decision::Act(Action::Switchover { from: active, to }),
            (true, Some(standby)) => {
                match cluster
                    .engines()
                    .map(|(s, _)| s)
                    .find(|&s| s != active && s != standby)
                {
                    Some(slot) => Decision::Act(Action::Stop { slot }),
                    None => Decision::Finish(finish()),
                }
            }
            (_, None) => {
                if let Some(standby) = old_idle {
                    Decision::Act(Action::Attach { standby, active })
                } else if let Some(slot) = free {
                    start_old(slot)
                } else if let Some(slot) = victim {
                    Decision::Act(Action::Stop { slot })
                } else {
                    Decision::Finish(Outcome::RollbackFailed {
                        reason: format!(
                            "{kind} found no slot for an old engine; it began because {reason}"
                        ),
                    })
                }
            }
        }
    }

    /// Reports what happened. An event that does not fit the plan's state is rejected and
    /// changes nothing.
    pub fn on_event(&mut self, event: Event) -> Result<(), EventError> {
        if matches!(self.mode, Mode::Finished(_)) {
            return Err(EventError::Finished);
        }
        match event {
            Event::Done { id } => {
                let action = &self.check_in_flight(id)?.planned.action;
                if matches!(action, Action::Accept { .. }) {
                    return Err(EventError::WrongReport {
                        id,
                        expected: "a verdict",
                    });
                }
                let in_flight = self.in_flight.take().expect("checked");
                self.apply(&in_flight.planned.action);
                if matches!(self.mode, Mode::Forward) {
                    if matches!(in_flight.planned.action, Action::Switchover { .. }) {
                        self.switched = true;
                    }
                    self.cursor = in_flight.script_index + 1;
                }
            }
            Event::Verdict { id, verdict } => {
                let action = &self.check_in_flight(id)?.planned.action;
                if !matches!(action, Action::Accept { .. }) {
                    return Err(EventError::WrongReport {
                        id,
                        expected: "done, failed or timed out",
                    });
                }
                let in_flight = self.in_flight.take().expect("checked");
                match verdict {
                    Verdict::Accepted => {
                        if matches!(self.mode, Mode::Forward) {
                            self.accepted = true;
                            self.cursor = in_flight.script_index + 1;
                        }
                    }
                    Verdict::Rejected { reason } => {
                        self.fail(&in_flight, format!("not acceptable: {reason}"));
                    }
                }
            }
            Event::Failed { id, error } => {
                self.check_in_flight(id)?;
                let in_flight = self.in_flight.take().expect("checked");
                let cause = format!("{} failed: {error}", in_flight.planned.action);
                self.fail(&in_flight, cause);
            }
            Event::TimedOut { id } => {
                self.check_in_flight(id)?;
                let in_flight = self.in_flight.take().expect("checked");
                let cause = format!(
                    "{} timed out after {} ms",
                    in_flight.planned.action, in_flight.planned.timeout_ms
                );
                self.fail(&in_flight, cause);
            }
            Event::EngineDied { slot, active } => self.on_death(slot, active)?,
        }
        Ok(())
    }

    fn check_in_flight(&self, id: ActionId) -> Result<&InFlight, EventError> {
        match &self.in_flight {
            Some(in_flight) if in_flight.planned.id == id => Ok(in_flight),
            other => Err(EventError::NotInFlight {
                id,
                in_flight: other.as_ref().map(|f| f.planned.id),
            }),
        }
    }

    /// The model after `action` succeeded.
    fn apply(&mut self, action: &Action) {
        let cluster = &mut self.cluster;
        match *action {
            Action::Stop { slot } => {
                assert_ne!(
                    cluster.active(),
                    Some(slot),
                    "the plan never stops the active"
                );
                cluster.slots[slot.index()] = None;
            }
            Action::Start { slot, version, .. } => {
                assert!(cluster.engine(slot).is_none(), "start in a free slot");
                cluster.slots[slot.index()] =
                    Some(PlannedEngine::new(version, PlannedRole::OutOfService));
            }
            Action::Attach { standby, .. } => {
                cluster
                    .engine_mut(standby)
                    .expect("attach a running engine")
                    .role = PlannedRole::Standby;
            }
            Action::Switchover { from, to } => {
                cluster.make_active(to);
                cluster
                    .engine_mut(from)
                    .expect("switch from a running engine")
                    .role = PlannedRole::Standby;
            }
            Action::Accept { .. } => {}
            Action::EnableFeatures { active, standby } => {
                for slot in [active, standby] {
                    cluster
                        .engine_mut(slot)
                        .expect("running engine")
                        .features_enabled = true;
                }
            }
        }
    }

    /// A failure: of a forward action or a death (starts recovery), or of a recovery action
    /// (ends the plan).
    fn fail(&mut self, in_flight: &InFlight, cause: String) {
        match &self.mode {
            Mode::Forward => self.start_recovery(cause),
            Mode::Recovering { .. } if !in_flight.recovery => {
                // A forward action that was still running when recovery began: it had no
                // effect, and recovery goes on from the model.
            }
            Mode::Recovering { kind, reason, .. } => {
                self.mode = Mode::Finished(Outcome::RollbackFailed {
                    reason: format!("{kind} failed: {cause}; it began because {reason}"),
                });
            }
            Mode::Finished(_) => {}
        }
    }

    fn start_recovery(&mut self, cause: String) {
        let step = self.current_step();
        let number = self.step_number(step);
        let active_old =
            self.cluster.active().and_then(|s| self.cluster.version(s)) == Some(Version::Old);
        let kind = if self.accepted {
            if active_old {
                Recovery::Rollback
            } else {
                Recovery::Settle
            }
        } else if self.switched {
            Recovery::Rollback
        } else {
            Recovery::Abort
        };
        self.mode = Mode::Recovering {
            kind,
            reason: format!("step {number} ({}): {cause}", step.name()),
            step,
        };
    }

    /// The successor the supervisor reports after the death of the engine in `slot` (which
    /// had `role`) fits the model: a hot standby or none after an active's death, the
    /// same active after another engine's.
    fn check_successor(
        &self,
        slot: Slot,
        role: PlannedRole,
        reported: Option<Slot>,
    ) -> Result<(), EventError> {
        let bad = |expected: String| EventError::BadSuccessor {
            slot,
            active: reported,
            expected,
        };
        if role == PlannedRole::Active {
            if let Some(successor) = reported {
                if successor == slot
                    || self.cluster.engine(successor).map(|e| e.role) != Some(PlannedRole::Standby)
                {
                    return Err(bad("a hot standby, or none".to_owned()));
                }
            }
        } else if reported != self.cluster.active() {
            let active = self.cluster.active().expect("an active outside an outage");
            return Err(bad(format!("engine {active}, which was active")));
        }
        Ok(())
    }

    /// A death (`what`) left no engine active: the plan ends in an outage.
    fn end_in_outage(&mut self, what: &str) {
        let step = self.current_step();
        let number = self.step_number(step);
        let recovering = match &self.mode {
            Mode::Recovering { kind, .. } => format!(" during {kind}"),
            _ => String::new(),
        };
        self.in_flight = None;
        self.mode = Mode::Finished(Outcome::Outage {
            reason: format!(
                "step {number} ({}){recovering}: {what} and no hot standby could step up",
                step.name()
            ),
        });
    }

    fn on_death(&mut self, slot: Slot, reported: Option<Slot>) -> Result<(), EventError> {
        let starting = matches!(
            &self.in_flight,
            Some(f) if matches!(f.planned.action, Action::Start { slot: s, .. } if s == slot)
        );
        let Some(dead) = self.cluster.engine(slot).copied() else {
            if !starting {
                return Err(EventError::NoEngine { slot });
            }
            // The engine being started died: the start failed.
            let in_flight = self.in_flight.take().expect("starting");
            let cause = format!("engine {slot} died while starting");
            self.fail(&in_flight, cause);
            return Ok(());
        };
        self.check_successor(slot, dead.role, reported)?;

        // Apply the death to the model.
        self.cluster.slots[slot.index()] = None;
        if let (PlannedRole::Active, Some(successor)) = (dead.role, reported) {
            self.cluster.make_active(successor);
        }
        let what = format!("engine {slot} ({}, {}) died", dead.version, dead.role);
        if self.cluster.active().is_none() {
            self.end_in_outage(&what);
            return Ok(());
        }

        // The supervisor cancels an action that involves the dead engine, or the engine that
        // just stepped up (it may not be stopped, attached or switched as a standby now).
        let successor = reported.filter(|_| dead.role == PlannedRole::Active);
        let involved = self.in_flight.as_ref().is_some_and(|f| {
            f.planned.action.involves(slot)
                || successor.is_some_and(|s| f.planned.action.involves(s))
        });
        if !matches!(self.mode, Mode::Forward) {
            // Recovering: drop the action that needed the dead engine; recovery re-plans
            // from the model.
            if involved {
                self.in_flight = None;
            }
            return Ok(());
        }

        let in_flight_action = self.in_flight.as_ref().map(|f| f.planned.action.clone());
        match in_flight_action {
            // The engine being retired died: retired.
            Some(Action::Stop { slot: s }) if s == slot => {
                let in_flight = self.in_flight.take().expect("in flight");
                self.cursor = in_flight.script_index + 1;
                return Ok(());
            }
            // The old active died mid-switchover and its target stepped up: switched over.
            Some(Action::Switchover { from, to }) if from == slot && reported == Some(to) => {
                let in_flight = self.in_flight.take().expect("in flight");
                self.switched = true;
                self.cursor = in_flight.script_index + 1;
                return Ok(());
            }
            _ => {}
        }
        if dead.version == Version::Old && dead.role != PlannedRole::Active && !involved {
            // An old engine that was going to be retired: carry on.
            return Ok(());
        }
        let in_flight = if involved {
            self.in_flight.take()
        } else {
            None
        };
        match in_flight {
            Some(in_flight) => self.fail(&in_flight, what),
            None => self.start_recovery(what),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
