//! The cluster as operations see it: its config and directory, the control block, the engine
//! in each slot and which slots are kept running — and the questions every operation asks of
//! them (is this slot the active of the epoch? a hot standby? is the record there ours?).
//!
//! The supervisor's loop (module `daemon`) owns one [`Cluster`] and lends it to the
//! operation in progress as `&mut dyn` [`ClusterOps`]: operations never see the loop's own
//! bookkeeping (restarts, fencing, role changes), and a fake can stand in for the live
//! cluster in their unit tests. The role questions are written once, as provided methods of
//! the trait, over the two things that differ between the live cluster and a fake: the
//! control block's words and the processes behind them.
//!
//! This module knows processes and the control block's words, not how engines replicate.

use std::path::{Path, PathBuf};

use tracing::{info, warn};
use understudy_control::control::{slot_name, Control, Field, Role, SlotCommand, State, SLOTS};
use understudy_control::liveness::ProcessIdentity;

use crate::config::ClusterConfig;
use crate::process::{self, EngineProc, SpawnError, SpawnSpec};
use crate::proto::InterruptedUpgrade;
use crate::verify;

/// What an operation may know of the engine process in a slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EngineView<'a> {
    /// pid + start time.
    pub identity: ProcessIdentity,
    /// The executable it runs (empty if unknown).
    pub binary: &'a Path,
    /// It was told to stop or killed on purpose: its exit is expected.
    pub expected_exit: bool,
    /// The supervisor fenced it and waits for its exit.
    pub fenced: bool,
}

impl EngineView<'_> {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }
}

impl<'a> From<&'a EngineProc> for EngineView<'a> {
    fn from(p: &'a EngineProc) -> Self {
        EngineView {
            identity: p.identity,
            binary: &p.binary,
            expected_exit: p.expected_exit,
            fenced: p.fenced,
        }
    }
}

/// What operations leave for the supervisor (and for later operations) when they end.
#[derive(Debug, Default)]
pub(crate) struct Outcomes {
    /// The binaries of the last completed upgrade (old, new), for `rollback`.
    pub last_upgrade: Option<(PathBuf, PathBuf)>,
    /// An upgrade a previous supervisor left in the middle, and how it was settled.
    pub interrupted: Option<InterruptedUpgrade>,
    /// Set when `down` has finished: the loop ends.
    pub finished: bool,
}

/// The cluster an operation acts on: the live [`Cluster`], or a fake in tests.
///
/// Required methods are the things that touch processes; the provided ones are the role
/// questions, the same for every implementation.
pub(crate) trait ClusterOps {
    /// The running config.
    fn config(&self) -> &ClusterConfig;
    /// The cluster directory.
    fn dir(&self) -> &Path;
    /// The control block.
    fn control(&self) -> &Control;
    /// The engine the supervisor watches in `slot`.
    fn engine(&self, slot: usize) -> Option<EngineView<'_>>;
    /// Spawns an engine in the free `slot`.
    fn spawn(&mut self, slot: usize, binary: &Path, standby: bool) -> Result<(), SpawnError>;
    /// Marks the engine in `slot` as one whose exit is expected.
    fn expect_exit(&mut self, slot: usize);
    /// SIGKILLs the engine in `slot`; its exit is expected.
    fn kill_expected(&mut self, slot: usize);
    /// Sets the binary the engine in `slot` runs (an adopted engine's, from a record).
    fn set_binary(&mut self, slot: usize, binary: PathBuf);
    /// Records the binary of every engine, for a supervisor that adopts them later.
    fn record_spawned(&self);
    /// Watches the engine that registered itself in the empty `slot`; `true` if there is one.
    fn adopt_registered(&mut self, slot: usize) -> bool;
    /// The slot of our live engine that holds the active's robust mutex (verified through
    /// `/proc`, not the control block's role words).
    fn lock_holder(&self) -> Option<usize>;
    /// The slots the keeper keeps running.
    fn managed_mut(&mut self) -> &mut [bool; SLOTS];
    /// What operations leave behind.
    fn outcomes(&mut self) -> &mut Outcomes;

    /// Stops the engine in `slot` cleanly: it is told to stop; its exit is expected.
    fn request_stop(&mut self, slot: usize) {
        if self.engine(slot).is_some() {
            self.expect_exit(slot);
            self.control().post_slot_command(slot, SlotCommand::Stop);
        }
    }

    /// The control block's record of `slot` is our engine's.
    ///
    /// A word damaged in both its copies (the control block names it) does not make the
    /// supervisor lose track of an engine it watches: its own record of the process (the
    /// pidfd it holds) stands until the live engine rewrites the word from its own view.
    fn ours(&self, slot: usize) -> bool {
        self.engine(slot).is_some_and(|p| {
            let matches = |f: Field, ours: u64| {
                self.control()
                    .get_checked(slot, f)
                    .map_or(true, |found| found == ours)
            };
            matches(Field::Pid, u64::from(p.pid()))
                && matches(Field::StartTime, p.identity.start_time_ticks)
        })
    }

    /// The role `slot`'s record gives, if the record is our engine's.
    fn role(&self, slot: usize) -> Role {
        if self.ours(slot) {
            Role::from_word(self.control().get(slot, Field::Role))
        } else {
            Role::None
        }
    }

    /// The state `slot`'s record gives.
    fn state(&self, slot: usize) -> State {
        State::from_word(self.control().get(slot, Field::State))
    }

    /// `slot` is the active of the current epoch.
    fn is_active(&self, slot: usize) -> bool {
        let control = self.control();
        self.role(slot) == Role::Active
            && control.active_slot() == Some(slot)
            && control.get(slot, Field::Epoch) == control.epoch()
    }

    /// `slot` is a hot standby of the current epoch.
    fn is_hot_standby(&self, slot: usize) -> bool {
        self.role(slot) == Role::Standby
            && self.state(slot) == State::Hot
            && self.control().get(slot, Field::Epoch) == self.control().epoch()
    }

    /// How old `slot`'s heartbeat is at `now` (CLOCK_MONOTONIC ns).
    fn heartbeat_age_ns(&self, slot: usize, now: u64) -> u64 {
        now.saturating_sub(self.control().get(slot, Field::HeartbeatNs))
    }

    /// The active slot, if it is one of our engines.
    fn active(&self) -> Option<usize> {
        (0..SLOTS).find(|&s| self.is_active(s))
    }

    /// The first hot standby.
    fn hot_standby(&self) -> Option<usize> {
        (0..SLOTS).find(|&s| self.is_hot_standby(s))
    }

    /// Keep at least two slots managed (an active and a standby).
    fn ensure_two_managed(&mut self) {
        let managed = self.managed_mut();
        for slot in 0..SLOTS {
            if managed.iter().filter(|m| **m).count() >= 2 {
                break;
            }
            managed[slot] = true;
        }
    }

    /// Every slot with an engine is managed, and at least two are.
    fn manage_running(&mut self) {
        for slot in 0..SLOTS {
            let running = self.engine(slot).is_some();
            self.managed_mut()[slot] = running;
        }
        self.ensure_two_managed();
    }

    /// Whether `promote` could make the engine in `slot` active: one of ours, not being stopped
    /// or fenced, holding a consistent copy (`Stale`: a hot standby steps up by itself). The
    /// outage report suggests only such a slot, and `promote` refuses any other with this
    /// reason.
    fn promotable(&self, slot: usize) -> Result<(), String> {
        let name = understudy_control::control::slot_name(slot);
        let Some(view) = self.engine(slot) else {
            return Err(format!("no engine of this supervisor runs in slot {name}"));
        };
        if !self.ours(slot) {
            return Err(format!(
                "the record of slot {name} is not this supervisor's engine's"
            ));
        }
        if view.expected_exit || view.fenced {
            return Err(format!("engine {name} is being stopped"));
        }
        match self.state(slot) {
            State::Stale => Ok(()),
            State::Hot => Err(format!(
                "engine {name} is a hot standby: it steps up by itself when it runs (stalled?)"
            )),
            other => Err(format!(
                "engine {name} holds no consistent copy (state {}): nothing to promote",
                other.name()
            )),
        }
    }

    /// For an outage report: how far the last active got and what each other engine holds,
    /// so the operator knows exactly which transactions are on no engine. The active's own
    /// transaction index (counters file, written at every commit, before the answer goes
    /// out) bounds what clients were acknowledged; the control block's count is its fallback.
    fn what_was_committed(&self) -> String {
        let control = self.control();
        let counters = understudy_control::counters::read(self.dir()).ok();
        let committed = |slot: usize| {
            let published = control.get(slot, Field::Commits);
            counters
                .as_ref()
                .and_then(|c| c.slots.get(slot))
                .map_or(published, |c| c.tx_index.max(published))
        };
        let last = control.active_slot();
        let mut parts = Vec::new();
        if let Some(a) = last {
            parts.push(format!(
                "the last active (engine {}) committed {} transactions",
                slot_name(a),
                committed(a)
            ));
        }
        for s in (0..SLOTS).filter(|&s| Some(s) != last && control.get(s, Field::Pid) != 0) {
            let applied = control.get(s, Field::Commits);
            let what = match self.state(s) {
                State::Stale => format!(
                    "a copy that stopped at {applied} transactions (its stream was closed)"
                ),
                State::Syncing => format!(
                    "a partial copy (it was catching up; {applied} transactions of live traffic applied)"
                ),
                other => format!("{applied} transactions ({})", other.name()),
            };
            let gap = last
                .map(|a| committed(a).saturating_sub(applied))
                .unwrap_or(0);
            parts.push(format!(
                "engine {} holds {what}{}",
                slot_name(s),
                if gap > 0 && self.state(s) != State::Syncing {
                    format!("; the last {gap} committed transactions are on no engine")
                } else {
                    String::new()
                }
            ));
        }
        parts.join("; ")
    }
}

/// The live cluster; see the [module docs](self).
pub struct Cluster {
    pub(crate) config: ClusterConfig,
    pub(crate) dir: PathBuf,
    pub(crate) control: Control,
    pub(crate) engines: [Option<EngineProc>; SLOTS],
    /// Slots the keeper keeps running.
    pub(crate) managed: [bool; SLOTS],
    pub(crate) outcomes: Outcomes,
}

impl Cluster {
    /// A cluster with no engine watched yet.
    pub(crate) fn new(config: ClusterConfig, dir: PathBuf, control: Control) -> Cluster {
        Cluster {
            config,
            dir,
            control,
            engines: [None, None, None],
            managed: [false; SLOTS],
            outcomes: Outcomes::default(),
        }
    }
}

impl ClusterOps for Cluster {
    fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn control(&self) -> &Control {
        &self.control
    }

    fn engine(&self, slot: usize) -> Option<EngineView<'_>> {
        self.engines[slot].as_ref().map(EngineView::from)
    }

    fn spawn(&mut self, slot: usize, binary: &Path, standby: bool) -> Result<(), SpawnError> {
        assert!(self.engines[slot].is_none(), "slot {slot} is free");
        let proc = EngineProc::spawn(&SpawnSpec {
            config: &self.config,
            dir: &self.dir,
            slot,
            binary,
            standby,
        })?;
        info!(slot = %slot_name(slot), pid = proc.pid(), binary = %binary.display(), standby, "engine started");
        self.engines[slot] = Some(proc);
        self.record_spawned();
        Ok(())
    }

    fn expect_exit(&mut self, slot: usize) {
        if let Some(proc) = self.engines[slot].as_mut() {
            proc.expected_exit = true;
        }
    }

    fn kill_expected(&mut self, slot: usize) {
        if let Some(proc) = self.engines[slot].as_mut() {
            proc.expected_exit = true;
            proc.kill();
        }
    }

    fn set_binary(&mut self, slot: usize, binary: PathBuf) {
        if let Some(proc) = self.engines[slot].as_mut() {
            proc.binary = binary;
        }
    }

    fn record_spawned(&self) {
        if let Err(e) = process::record_spawned(&self.dir, self.engines.iter().flatten()) {
            warn!(
                file = %self.dir.join(process::SPAWNED_FILE).display(),
                "cannot record the engines' binaries: {e}; a restarted supervisor takes them from /proc, which misses a wrapper script"
            );
        }
    }

    fn adopt_registered(&mut self, slot: usize) -> bool {
        if self.engines[slot].is_some() {
            return false;
        }
        let Some(identity) = self.control.registered(slot).filter(|id| id.is_alive()) else {
            return false;
        };
        match EngineProc::adopt(slot, identity) {
            Ok(mut proc) => {
                if let Ok(Some(binary)) = process::spawned_binary(&self.dir, slot, &identity) {
                    proc.binary = binary;
                }
                info!(slot = %slot_name(slot), pid = identity.pid, "adopted an engine that registered after this supervisor started");
                self.engines[slot] = Some(proc);
                true
            }
            Err(e) => {
                warn!(slot = %slot_name(slot), "cannot adopt engine: {e}");
                false
            }
        }
    }

    fn lock_holder(&self) -> Option<usize> {
        let tid = self.control.lock().holder_tid()?;
        (0..SLOTS).find(|&s| {
            self.engines[s].as_ref().is_some_and(|p| {
                !p.fenced && verify::tid_belongs_to(p.pid(), tid) && p.identity.is_alive()
            })
        })
    }

    fn managed_mut(&mut self) -> &mut [bool; SLOTS] {
        &mut self.managed
    }

    fn outcomes(&mut self) -> &mut Outcomes {
        &mut self.outcomes
    }
}
