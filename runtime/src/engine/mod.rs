//! The engine: one process of the application, active or standby, and every role change.
//!
//! - **Active**: takes requests from its [`Input`], runs each in a transaction, commits the
//!   transaction's changes to every attached standby's stream as one batch, then answers.
//!   Between requests it services standbys: attaches new ones (handshake, then a base position
//!   or a chunked snapshot interleaved with live transactions), writes heartbeats, and obeys
//!   commands (planned switchover, feature enable, stop).
//! - **Standby**: applies each committed batch to its own store, and watches the active: the
//!   robust mutex's owner-died bit (tens of µs after a SIGKILL), the active's identity (pidfd-
//!   like backstop through /proc), and the active's heartbeat (a hung active is fenced with
//!   SIGKILL). When the active dies it drains every committed batch, claims the next epoch by
//!   compare-and-swap and becomes active.
//! - **Planned switchover**: the active stops taking requests, pre-creates its own standby
//!   stream for the next epoch, sends a step-up frame (position, count, digest) to the target,
//!   releases the mutex and becomes the target's standby; the target verifies the digest, steps
//!   up, and streams back without catch-up.
//!
//! One file per job: `options` (what the supervisor sets), `input` (where
//! requests come from), `transaction` (one request against the store, its commit block),
//! `active` (the active loop and commands), `replicas` (attaching and servicing standbys),
//! `catch_up` (bringing a new standby to live), `standby` (following the active's stream),
//! `apply` (what a standby does with each frame of it),
//! `handover` (switchover, step-up, lock recovery, fencing), `role` (the standby's decisions
//! as pure functions of its observations: when to step up, re-attach, give up, fence),
//! `process` (panic and fault-signal behaviour), `timers` (replicated timers: arming,
//! firing, the exactly-once argument). This file holds the [`Engine`] itself: construction, the role loop, and the
//! helpers every role uses.

use crate::app::{negotiate, write_versions, Agreement, Application, Feature, Refused, Tx};
use crate::control::{
    self, monotonic_ns, realtime_ns, ClusterCommand, Control, Field, Pending, Role, SlotCommand,
    State,
};
use crate::counters::Counter;
use crate::liveness::{self, LockError, LockWord, ProcessIdentity, TryLockOutcome};
use crate::protocol::{self, rt, CommitBlock, FeaturesBlock, HeartbeatBlock, Hello, Position};
use crate::store::{Op, Spare, Store};
use shm_layout::record::{decode, TemplateInfo};
use shm_layout::region::{IdentityWords, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Frame, Producer, PushError};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};
use understudy_control::result::CommandResult;

mod active;
mod apply;
mod catch_up;
mod handover;
mod input;
mod options;
mod process;
mod replicas;
mod role;
mod standby;
pub(crate) mod timers;
mod transaction;

pub use self::input::{Input, InputMeta, SourcePosition, SYS_INPUTS};
pub use self::options::{
    Backpressure, Idle, OnPanic, Options, StreamIntegrity, ENV_INTEGRITY, ENV_STANDBY_POLL_PAUSE_US,
};
pub use self::transaction::{
    commit_block, execute, execute_local, execute_local_ops, push_tx, TxBuffers,
};
use self::{active::*, catch_up::*, handover::*, process::*, replicas::*, standby::*};

/// Why an engine stopped.
#[derive(Debug)]
pub enum EngineError {
    /// The control file.
    Control(control::ControlError),
    /// A region.
    Region(shm_layout::region::RegionError),
    /// The peer cannot pair with us.
    Refused(String),
    /// Another live engine holds the slot this engine was told to take.
    SlotTaken {
        /// The slot (`a`, `b`, `c`).
        slot: char,
        /// The cluster directory.
        dir: PathBuf,
        /// The live engine's pid.
        holder_pid: u64,
        /// Our pid.
        our_pid: u64,
    },
    /// Anything else.
    Other(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::SlotTaken {
                slot,
                dir,
                holder_pid,
                our_pid,
            } => write!(
                f,
                "slot {slot} of the cluster at {}: expected a free slot for this engine (pid {our_pid}), found it held by the live engine pid {holder_pid}; refusing to start",
                dir.display()
            ),
            EngineError::Control(e) => e.fmt(f),
            EngineError::Region(e) => e.fmt(f),
            EngineError::Refused(s) => write!(f, "refused by the active: {s}"),
            EngineError::Other(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for EngineError {}
impl From<control::ControlError> for EngineError {
    fn from(e: control::ControlError) -> Self {
        EngineError::Control(e)
    }
}

impl From<shm_layout::region::RegionError> for EngineError {
    fn from(e: shm_layout::region::RegionError) -> Self {
        EngineError::Region(e)
    }
}

/// How the engine's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on command.
    Stopped,
}

/// Region kind tags.
const KIND_STREAM: u32 = 1;

const KIND_FEEDBACK: u32 = 2;

/// Close reasons.
const CLOSE_UNTETHERED: u64 = 1;

const CLOSE_CORRUPT: u64 = 2;

const CLOSE_REFUSED: u64 = 3;

const CLOSE_DETACHED: u64 = 4;

/// Command result codes (the protocol's, in the control crate).
#[doc(hidden)]
pub use understudy_control::result;

/// One engine process.
pub struct Engine<A: Application, I: Input> {
    app: A,
    input: I,
    opt: Options,
    control: Control,
    store: Store,
    me: IdentityWords,
    hello_base: Hello,
    templates: Vec<TemplateInfo>,
    features: Vec<Feature>,
    enabled: u64,
    write_versions: Vec<(u16, u16)>,
    epoch: u64,
    commits: u64,
    requests: u64,
    // Scratch, reused so the hot path does not allocate once warm.
    tx: TxBuffers,
    request: Vec<u8>,
    scratch: Vec<u8>,
    buf: BatchBuf,
    /// What the change being applied replaces (for `Application::on_apply`).
    before: crate::store::BeforeBuf,
    /// The epoch whose active's death we last reported we could not step up for (a standby
    /// that re-attaches while the dead active's slot still looks alive says it once).
    not_hot_reported_epoch: Option<u64>,
    /// Our slot's lock file, locked (`flock`) while this process lives.
    _slot_claim: std::fs::File,
    /// Our store is a consistent copy of the cluster's state after `commits` transactions
    /// (hot once, then only whole batches applied), not a partial catch-up.
    consistent: bool,
    /// The consistent copy we held when a catch-up began (see `standby::Prefix`).
    prefix: Option<Box<Prefix>>,
    replicas: Vec<Replica>,
    agreed_layout: u16,
    cmd_seen: Option<(u64, Instant)>,
    /// (slot, attach generation) of replicas we detached: never reopened.
    detached: Vec<(usize, u64)>,
    refusals: u64,
    /// (epoch we were active in, target) after a planned switchover, until the target claims
    /// the next epoch.
    handed_over: Option<(u64, usize, u64, u64)>,
    /// This engine committed a transaction since it last became active.
    served: bool,
    /// Our standby regions for the next epoch, created ahead of a planned switchover.
    prepared: Option<Prepared>,
    /// The active's prepared regions, opened ahead of a planned step-up.
    preopened: Option<Preopened>,
    /// Streams of the role we just left, unmapped (and unlinked) once the role change is
    /// over: unmapping a touched stream costs tens to hundreds of microseconds, which must
    /// not fall inside a switchover's pause.
    leftovers: Leftovers,
    service: ServiceTimes,
    service_published_ns: u64,
    /// Our block of the cluster's counters file (`None` if off or not openable).
    counters: Option<crate::counters::Writer>,
    /// The slot's back-pressure total when this engine started.
    counters_bp_base: u64,
    /// How this engine last became active (for [`Application::on_active`]).
    takeover: crate::app::Takeover,
    /// When the active must next look at the timer table (see `timers`).
    next_timer: timers::NextTimer,
}

fn identity_of(p: &ProcessIdentity) -> IdentityWords {
    IdentityWords {
        pid: p.pid as u64,
        start_time: p.start_time_ticks,
    }
}

/// Lock `<dir>/slot-<x>.lock` (created private to the user) for as long as this process
/// lives: the kernel releases an `flock` when its last descriptor closes, so a dead engine
/// never holds its slot. `Err(None)`: another live process holds it.
fn claim_slot(dir: &std::path::Path, slot: usize) -> Result<std::fs::File, Option<EngineError>> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let path = dir.join(format!("slot-{}.lock", control::slot_name(slot)));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| {
            Some(EngineError::Other(format!(
                "{}: expected a lock file this engine can create or open, found: {e}",
                path.display()
            )))
        })?;
    shm_layout::trust::check_private_file(&path, &file)
        .map_err(|e| Some(EngineError::Other(e.to_string())))?;
    // SAFETY: flock has no memory-safety preconditions; the descriptor is open (owned by
    // `file`, which outlives the call).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(None);
        }
        return Err(Some(EngineError::Other(format!(
            "{}: locking the slot: {e}",
            path.display()
        ))));
    }
    Ok(file)
}

/// Take `opt.slot` for this process: refused while a live engine holds it (its words), and
/// between two engines started at once (the slot's lock file). The lock is held while the
/// returned file is open.
fn claim_free_slot(
    control: &Control,
    opt: &Options,
    me: &ProcessIdentity,
) -> Result<std::fs::File, EngineError> {
    let taken = |holder_pid: u64| EngineError::SlotTaken {
        slot: control::slot_name(opt.slot),
        dir: opt.dir.clone(),
        holder_pid,
        our_pid: me.pid as u64,
    };
    // Two engines in one slot would overwrite each other's words: the cluster would look like
    // it had one engine, with no standby and no active the supervisor can see.
    let holder = control.get(opt.slot, Field::Pid);
    if holder != 0 && holder != me.pid as u64 && holder <= u32::MAX as u64 {
        let id = ProcessIdentity {
            pid: holder as u32,
            start_time_ticks: control.get(opt.slot, Field::StartTime),
        };
        if id.is_alive() {
            return Err(taken(holder));
        }
    }
    // The words above are read, then written later: two engines started at once in one slot
    // would both pass. The slot's lock file decides between them.
    claim_slot(&opt.dir, opt.slot).map_err(|e| match e {
        Some(e) => e,
        None => taken(control.get(opt.slot, Field::Pid)),
    })
}

fn app_hash(name: &str) -> u64 {
    crate::store::hash_parts(&[name.as_bytes()])
}

impl<A: Application, I: Input> Engine<A, I> {
    /// Set up an engine in `opt.slot` of the cluster at `opt.dir` (creating the control file
    /// if this is the first engine).
    pub fn new(app: A, input: I, opt: Options) -> Result<Self, EngineError> {
        if opt.slot >= control::SLOTS {
            return Err(EngineError::Other(format!(
                "slot: expected 0..{} (a, b or c), found {}",
                control::SLOTS,
                opt.slot
            )));
        }
        let control = Control::open_or_create(&opt.dir)?;
        let me = ProcessIdentity::current()
            .map_err(|e| EngineError::Other(format!("reading own identity: {e}")))?;
        let slot_claim = claim_free_slot(&control, &opt, &me)?;
        let templates = app.templates();
        let features = app.features();
        let hello_base = Hello {
            name: app.name().to_string(),
            app_version: app.version(),
            slot: opt.slot as u32,
            templates: templates.clone(),
            features: features.iter().map(Feature::decl).collect(),
            enabled: 0,
            commits: 0,
            digest: 0,
            epoch: 0,
        };
        let wv = write_versions(&templates, &features, 0);
        let counters = opt
            .counters
            .then(|| crate::counters::Writer::open_or_create(&opt.dir, opt.slot))
            .and_then(|r| r.map_err(|e| warn!("live counters off: {e}")).ok());
        let counters_bp_base = counters
            .as_ref()
            .map_or(0, |k| k.get(Counter::BACKPRESSURE_WAITS_TOTAL));
        if let Some(k) = &counters {
            k.set(Counter::APP_VERSION, app.version() as u64);
        }
        let e = Engine {
            app,
            input,
            control,
            store: Store::new(),
            me: identity_of(&me),
            hello_base,
            templates,
            features,
            enabled: 0,
            write_versions: wv,
            epoch: 0,
            commits: 0,
            requests: 0,
            tx: TxBuffers::new(),
            request: Vec::with_capacity(256),
            scratch: Vec::with_capacity(4096),
            buf: BatchBuf::with_capacity(1 << 16),
            before: crate::store::BeforeBuf::new(),
            not_hot_reported_epoch: None,
            _slot_claim: slot_claim,
            consistent: false,
            prefix: None,
            replicas: Vec::new(),
            agreed_layout: 1,
            cmd_seen: None,
            detached: Vec::new(),
            refusals: 0,
            handed_over: None,
            served: false,
            prepared: None,
            preopened: None,
            leftovers: Leftovers::default(),
            service: ServiceTimes::default(),
            service_published_ns: 0,
            counters,
            counters_bp_base,
            takeover: crate::app::Takeover::Start,
            next_timer: timers::NextTimer::NONE,
            opt,
        };
        e.publish_start();
        Ok(e)
    }

    /// Our slot's words at start: identity and version, no role yet, per-incarnation counts
    /// zeroed; the pid last (it says the slot is taken).
    fn publish_start(&self) {
        let s = self.opt.slot;
        let c = &self.control;
        c.set(s, Field::Pid, 0);
        c.set(s, Field::StartTime, self.me.start_time);
        c.set(s, Field::AppVersion, self.app.version() as u64);
        c.set(s, Field::AppHash, app_hash(self.app.name()));
        c.set(s, Field::Role, Role::None as u64);
        c.set(s, Field::State, State::Starting as u64);
        c.set(s, Field::Cmd, 0);
        c.set(s, Field::Error, 0);
        // Per-incarnation counts start at 0: an acceptance check reads this slot's requests as
        // a difference from when it began, and a previous engine's larger count left here made
        // a new version that served thousands of requests look as if it had served none.
        c.set(s, Field::Requests, 0);
        c.set(s, Field::Refusals, 0);
        c.set(s, Field::HeartbeatNs, monotonic_ns());
        c.set(s, Field::Pid, self.me.pid);
    }

    /// The engine's store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The application.
    pub fn app(&self) -> &A {
        &self.app
    }

    /// Run until stopped.
    ///
    /// Installs the panic policy of [`Options::on_panic`] first (by default a panic anywhere in
    /// the process aborts it: a failover).
    pub fn run(mut self) -> Result<Exit, EngineError> {
        if self.opt.on_panic == OnPanic::Abort {
            install_abort_on_panic();
        }
        install_fatal_sent_fault_signals();
        let r = self.run_inner();
        let s = self.opt.slot;
        if let Err(e) = &r {
            error!(slot = %control::slot_name(s), "engine stops: {e}");
            self.control.set(s, Field::Error, 1);
        }
        self.discard_prepared();
        self.control.set(s, Field::Role, Role::OutOfService as u64);
        self.control.set(s, Field::State, State::Stopped as u64);
        // A clean stop detaches the standbys. After an error the streams stay open: they hold
        // every committed transaction, and the standby steps up when our mutex dies with us.
        if r.is_ok() {
            for rep in self.replicas.drain(..) {
                rep.stream_region.close(CLOSE_DETACHED);
            }
        }
        r
    }

    fn run_inner(&mut self) -> Result<Exit, EngineError> {
        let fresh = self.control.epoch() == 0;
        let mut next = if !self.opt.standby_only && fresh && self.try_become_first_active()? {
            Next::Active
        } else {
            Next::Standby(None)
        };
        loop {
            next = match next {
                Next::Active => self.run_active()?,
                Next::Standby(up) => self.run_standby(up)?,
                Next::Stop => return Ok(Exit::Stopped),
            };
        }
    }

    /// No active holds the mutex and no live engine is active: take epoch 1 (or the next).
    fn try_become_first_active(&mut self) -> Result<bool, EngineError> {
        self.try_claim(None)
    }

    /// Lock the mutex and claim the epoch after `expected` (the current one if `None`).
    fn try_claim(&mut self, expected: Option<u64>) -> Result<bool, EngineError> {
        let lock = self.control.lock();
        // Fast path only (the mutex below decides): a live engine that is the active of the
        // current epoch. A slot restarted after its active died holds a live process that is
        // not the active.
        if let Some(a) = self.control.active_slot() {
            if a != self.opt.slot
                && self.slot_alive(a)
                && Role::from_word(self.control.get(a, Field::Role)) == Role::Active
                && self.control.get(a, Field::Epoch) == self.control.epoch()
            {
                return Ok(false);
            }
        }
        match try_lock_recovering(&lock, self.control.path()) {
            Ok(TryLockOutcome::Acquired) | Ok(TryLockOutcome::OwnerDied) => {}
            Ok(TryLockOutcome::WouldBlock) => return Ok(false),
            Err(e) => return Err(EngineError::Other(format!("robust mutex: {e}"))),
        }
        let e = expected.unwrap_or_else(|| self.control.epoch());
        match self.control.claim_epoch(e, self.opt.slot) {
            Some(ne) => {
                // Invariant: the cluster's epoch only rises (claimed by compare-and-swap).
                debug_assert!(ne > e, "epoch {e} claimed as {ne}");
                self.epoch = ne;
                info!(slot = %control::slot_name(self.opt.slot), epoch = ne, "starting as active");
                Ok(true)
            }
            None => {
                let _ = lock.unlock();
                Ok(false)
            }
        }
    }

    fn slot_alive(&self, slot: usize) -> bool {
        let pid = self.control.get(slot, Field::Pid);
        let st = self.control.get(slot, Field::StartTime);
        if pid == 0 || pid > u32::MAX as u64 {
            return false;
        }
        ProcessIdentity {
            pid: pid as u32,
            start_time_ticks: st,
        }
        .is_alive()
    }

    fn hello(&self) -> Hello {
        let mut h = self.hello_base.clone();
        h.enabled = self.enabled;
        h.commits = self.commits;
        h.digest = self.store.digest();
        h.epoch = self.epoch;
        h
    }

    fn position(&self, arg: u64) -> Position {
        position_of(&self.store, self.commits, self.epoch, arg)
    }

    fn publish_status(&self, role: Role, state: State) {
        let s = self.opt.slot;
        let c = &self.control;
        // A fresh heartbeat with every role: a watcher (the supervisor, a standby) judges an
        // active by the active's threshold, and must not take the last heartbeat this engine
        // wrote in its previous role for a hung new active.
        c.set(s, Field::HeartbeatNs, monotonic_ns());
        c.set(s, Field::Role, role as u64);
        c.set(s, Field::State, state as u64);
        c.set(s, Field::Epoch, self.epoch);
        c.set(s, Field::Features, self.enabled);
        c.set(s, Field::Layout, self.agreed_layout as u64);
        if let Some(k) = &self.counters {
            k.set(Counter::ROLE, role as u64);
            k.set(Counter::STATE, state as u64);
            k.set(Counter::EPOCH, self.epoch);
            k.set(Counter::TX_INDEX, self.commits);
        }
    }

    /// Housekeeping of the live counters (active): heartbeat, state, the standby streams.
    fn publish_counters(&mut self, now: u64) {
        let Some(k) = &self.counters else { return };
        k.housekeeping(now, self.counters_bp_base);
        k.set(
            Counter::STATE,
            self.control.get(self.opt.slot, Field::State),
        );
        for slot in 0..control::SLOTS {
            let view = self
                .replicas
                .iter_mut()
                .find(|r| r.slot == slot)
                .map(|r| (r.hot, r.stream.position(), r.stream.consumer_position()));
            k.stream(slot, view);
        }
    }
}

impl<A: Application, I: Input> Drop for Engine<A, I> {
    fn drop(&mut self) {
        // Never unmap the control block while this thread holds the robust mutex: the kernel
        // marks the mutex owner-died at the thread's exit only if the memory is still mapped
        // then, and that mark is how the standby learns of the death within microseconds. An
        // engine dropped while active (an error, or a panic unwinding out of `run`) leaks one
        // reference to the mapping for the rest of the process's life.
        if self.control.lock().holder_tid() == Some(liveness::current_tid()) {
            std::mem::forget(self.control.clone());
        }
    }
}

enum Next {
    Stop,
    Active,
    Standby(Option<Box<Upstream>>),
}

/// A position in the history of the state (what `Base`, `SnapBegin`/`SnapEnd`, `StepUp` and
/// `Ack` carry). Input positions live in the `SYS_INPUTS` table, so those fields stay 0.
fn position_of(store: &Store, commits: u64, epoch: u64, arg: u64) -> Position {
    Position {
        commits,
        input_pos: 0,
        input_seq: 0,
        digest: store.digest(),
        units: store.unit_count() as u64,
        epoch,
        arg,
    }
}

#[cfg(test)]
mod tests {
    /// One live claim per slot: a second claim of a held slot fails, a released one succeeds
    /// (the lock is per open file, so one process stands in for two).
    #[test]
    fn a_slot_is_claimed_by_one_engine_at_a_time() {
        let dir = std::env::temp_dir().join(format!("understudy-claim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let first = super::claim_slot(&dir, 1).expect("a free slot");
        assert!(matches!(super::claim_slot(&dir, 1), Err(None)), "held");
        assert!(super::claim_slot(&dir, 0).is_ok(), "another slot");
        drop(first);
        assert!(super::claim_slot(&dir, 1).is_ok(), "released with its file");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
