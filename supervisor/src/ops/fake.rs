//! A cluster with no processes, for the operations' unit tests.
//!
//! The control block is real (a file in a temporary directory, removed with the fake); the
//! engines are not: each is a record the fake writes into its slot, and [`FakeCluster::turn`]
//! plays what live engines would do between two turns of the supervisor's loop — a spawned
//! engine registers and becomes a hot standby, an engine told to stop exits, the active takes
//! the cluster command (answering as the test says) and performs it, an engine told to
//! promote claims the next epoch (or refuses, or never takes the command, as the test says). A test kills an engine with [`FakeCluster::die`].

use std::path::{Path, PathBuf};

use understudy_control::control::{
    ClusterCommand, Control, Field, Pending, Role, SlotCommand, State, SLOTS,
};
use understudy_control::liveness::ProcessIdentity;
use understudy_control::result::CommandResult;

use crate::cluster::{ClusterOps, EngineView, Outcomes};
use crate::config::ClusterConfig;
use crate::process::SpawnError;

/// The application hash every fake engine registers with.
pub(crate) const APP_HASH: u64 = 0xA11CE;

/// A temporary directory, removed (with everything in it) when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "understudy-ops-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("a temporary directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One fake engine process.
#[derive(Debug, Clone)]
pub(crate) struct FakeEngine {
    pub identity: ProcessIdentity,
    pub binary: PathBuf,
    pub expected_exit: bool,
    pub fenced: bool,
    /// It has written its slot record.
    pub registered: bool,
}

/// See the [module docs](self).
pub(crate) struct FakeCluster {
    pub config: ClusterConfig,
    // Declared before the directory: unmapped before the directory goes.
    control: Control,
    dir: TempDir,
    pub engines: [Option<FakeEngine>; SLOTS],
    pub managed: [bool; SLOTS],
    pub outcomes: Outcomes,
    /// What the active answers every cluster command with; `None`: it performs it (ok).
    pub answer: Option<CommandResult>,
    /// The active never takes cluster commands.
    pub deaf: bool,
    /// A spawned engine never registers.
    pub mute_starts: bool,
    /// Engines that ignore the slot command STOP.
    pub stubborn: [bool; SLOTS],
    /// An engine told to promote never takes the command.
    pub ignore_promote: bool,
    /// An engine told to promote takes the command and refuses it for this reason.
    pub promote_refusal: Option<CommandResult>,
    /// The engine holding the active's lock, as the live cluster would verify it.
    pub lock_holder: Option<usize>,
    /// Every engine spawned: (slot, binary).
    pub spawned: Vec<(usize, PathBuf)>,
    /// Every slot whose engine was SIGKILLed on purpose.
    pub killed: Vec<usize>,
    next_pid: u32,
}

impl FakeCluster {
    /// An empty cluster (no engine yet) with the default config.
    pub(crate) fn new() -> FakeCluster {
        let dir = TempDir::new();
        let control = Control::open_or_create(&dir.0).expect("a control block");
        FakeCluster {
            config: ClusterConfig::new("fake", "/bin/true"),
            control,
            dir,
            engines: [None, None, None],
            managed: [false; SLOTS],
            outcomes: Outcomes::default(),
            answer: None,
            deaf: false,
            mute_starts: false,
            stubborn: [false; SLOTS],
            ignore_promote: false,
            promote_refusal: None,
            lock_holder: None,
            spawned: Vec::new(),
            killed: Vec::new(),
            next_pid: 1000,
        }
    }

    /// Engine `a` active in epoch 1 and engine `b` its hot standby, both running `/bin/true`.
    pub(crate) fn serving() -> FakeCluster {
        let mut fake = FakeCluster::new();
        fake.add(0, "/bin/true");
        fake.add(1, "/bin/true");
        fake.control.claim_epoch(0, 0).expect("epoch 1");
        fake.write(0, Role::Active, State::Serving);
        fake.write(1, Role::Standby, State::Hot);
        fake.managed = [true, true, false];
        fake
    }

    /// A registered engine in `slot`, no role yet.
    pub(crate) fn add(&mut self, slot: usize, binary: &str) {
        self.engines[slot] = Some(self.new_engine(PathBuf::from(binary)));
        self.register(slot);
    }

    fn new_engine(&mut self, binary: PathBuf) -> FakeEngine {
        self.next_pid += 1;
        FakeEngine {
            identity: ProcessIdentity {
                pid: self.next_pid,
                start_time_ticks: u64::from(self.next_pid) * 7,
            },
            binary,
            expected_exit: false,
            fenced: false,
            registered: false,
        }
    }

    /// The engine in `slot` writes its identity into its record.
    fn register(&mut self, slot: usize) {
        let engine = self.engines[slot].as_mut().expect("an engine");
        engine.registered = true;
        let identity = engine.identity;
        self.control.set(slot, Field::Pid, u64::from(identity.pid));
        self.control
            .set(slot, Field::StartTime, identity.start_time_ticks);
        self.control.set(slot, Field::AppHash, APP_HASH);
        self.control.set(slot, Field::Cmd, 0);
    }

    /// The engine in `slot` publishes `role` and `state` in the current epoch.
    pub(crate) fn write(&self, slot: usize, role: Role, state: State) {
        self.control.set(slot, Field::Role, role as u64);
        self.control.set(slot, Field::State, state as u64);
        self.control.set(slot, Field::Epoch, self.control.epoch());
    }

    /// The engine in `slot` dies (its record stays, as a killed engine's does); if it was the
    /// active, a hot standby steps up. The new active, if any.
    pub(crate) fn die(&mut self, slot: usize) -> Option<usize> {
        self.engines[slot] = None;
        let was_active = self.control.active_slot() == Some(slot);
        if was_active {
            let heir = (0..SLOTS).find(|&s| s != slot && self.is_hot_standby(s))?;
            self.step_up(heir);
        }
        self.active()
    }

    fn step_up(&self, slot: usize) {
        let epoch = self.control.epoch();
        self.control
            .claim_epoch(epoch, slot)
            .expect("the next epoch");
        self.write(slot, Role::Active, State::Serving);
    }

    /// What the engines do between two turns of the supervisor's loop.
    pub(crate) fn turn(&mut self) {
        for slot in 0..SLOTS {
            let Some(engine) = self.engines[slot].as_ref() else {
                continue;
            };
            if !engine.registered {
                if !self.mute_starts {
                    self.register(slot);
                    self.write(slot, Role::Standby, State::Hot);
                }
                continue;
            }
            match self.control.slot_command(slot) {
                Ok(Some(SlotCommand::Stop)) if !self.stubborn[slot] => {
                    self.engines[slot] = None;
                    self.write(slot, Role::None, State::Stopped);
                    self.control.set(slot, Field::Pid, 0);
                }
                Ok(Some(SlotCommand::Promote))
                    if !self.ignore_promote
                        && self.control.take_slot_command(slot, SlotCommand::Promote) =>
                {
                    match self.promote_refusal {
                        Some(why) => self.control.refuse_slot_command(slot, why),
                        None => self.step_up(slot),
                    }
                }
                _ => {}
            }
        }
        self.take_command();
    }

    /// The active takes the pending cluster command, if any.
    fn take_command(&mut self) {
        let Some(active) = self.active() else { return };
        let Some((seq, pending)) = self.control.pending_command() else {
            return;
        };
        if self.deaf {
            return;
        }
        let command = match pending {
            // A withdrawn command: nothing to do.
            Pending::Withdrawn => return self.control.answer(seq, CommandResult::Ok),
            Pending::Bad(bad) => panic!("the fake was posted a bad command: {bad}"),
            Pending::Command(c) => c,
        };
        if let Some(answer) = self.answer {
            self.control.answer(seq, answer);
            return;
        }
        self.control.answer(seq, CommandResult::Ok);
        match command {
            ClusterCommand::Switchover { target } => {
                self.step_up(target);
                self.write(active, Role::Standby, State::Hot);
            }
            ClusterCommand::EnableFeatures { mask } => {
                for slot in (0..SLOTS).filter(|&s| self.engines[s].is_some()) {
                    let features = self.control.get(slot, Field::Features);
                    self.control.set(slot, Field::Features, features | mask);
                }
            }
        }
    }
}

impl ClusterOps for FakeCluster {
    fn config(&self) -> &ClusterConfig {
        &self.config
    }

    fn dir(&self) -> &Path {
        &self.dir.0
    }

    fn control(&self) -> &Control {
        &self.control
    }

    fn engine(&self, slot: usize) -> Option<EngineView<'_>> {
        self.engines[slot].as_ref().map(|e| EngineView {
            identity: e.identity,
            binary: &e.binary,
            expected_exit: e.expected_exit,
            fenced: e.fenced,
        })
    }

    fn spawn(&mut self, slot: usize, binary: &Path, _standby: bool) -> Result<(), SpawnError> {
        assert!(self.engines[slot].is_none(), "slot {slot} is free");
        let engine = self.new_engine(binary.to_path_buf());
        self.engines[slot] = Some(engine);
        self.spawned.push((slot, binary.to_path_buf()));
        Ok(())
    }

    fn expect_exit(&mut self, slot: usize) {
        if let Some(e) = self.engines[slot].as_mut() {
            e.expected_exit = true;
        }
    }

    fn kill_expected(&mut self, slot: usize) {
        if self.engines[slot].take().is_some() {
            self.killed.push(slot);
        }
    }

    fn set_binary(&mut self, slot: usize, binary: PathBuf) {
        if let Some(e) = self.engines[slot].as_mut() {
            e.binary = binary;
        }
    }

    fn record_spawned(&self) {}

    fn adopt_registered(&mut self, _slot: usize) -> bool {
        false
    }

    fn lock_holder(&self) -> Option<usize> {
        self.lock_holder
    }

    fn managed_mut(&mut self) -> &mut [bool; SLOTS] {
        &mut self.managed
    }

    fn outcomes(&mut self) -> &mut Outcomes {
        &mut self.outcomes
    }
}
