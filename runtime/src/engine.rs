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

use crate::app::{negotiate, write_versions, Agreement, Application, Feature, Refused, Tx};
use crate::control::{self, cmd, monotonic_ns, realtime_ns, slot_cmd, Control, Field, Role, State};
use crate::counters::Counter;
use crate::liveness::{self, LockError, LockWord, ProcessIdentity, TryLockOutcome};
use crate::protocol::{self, rt, CommitBlock, FeaturesBlock, HeartbeatBlock, Hello, Position};
use crate::store::{Op, Spare, Store};
use shm_layout::record::{decode, TemplateInfo};
use shm_layout::region::{Identity, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Producer, PushError};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// The system table holding, per input source: position, sequence, last request sequence and
/// the last response (so a new active can resume input and re-emit an unsent response).
#[doc(hidden)]
pub const SYS_INPUTS: u16 = 0xFFFF;

/// What to do when a standby's stream is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait up to this long for room, then untether the standby.
    Wait(Duration),
    /// Untether the standby at once (it becomes stale and must catch up again).
    Untether,
}

/// How an idle loop waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle {
    /// Polls with a spin hint before sleeping.
    pub spin_polls: u32,
    /// Sleep per idle poll after that (0 = never sleep: lowest latency, burns a core).
    pub sleep: Duration,
}

impl Idle {
    /// Spin forever (benchmarks, pinned cores).
    pub const SPIN: Idle = Idle {
        spin_polls: u32::MAX,
        sleep: Duration::ZERO,
    };
    /// Spin a little, then sleep 50 µs between polls (shared cores, tests).
    pub const SHARED: Idle = Idle {
        spin_polls: 20_000,
        sleep: Duration::from_micros(50),
    };
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster directory (control file, streams).
    pub dir: PathBuf,
    /// This engine's slot (0 = a, 1 = b, 2 = c).
    pub slot: usize,
    /// Ring capacity of the streams this engine creates (as a standby).
    pub ring_capacity: usize,
    /// Back-pressure policy.
    pub backpressure: Backpressure,
    /// Idle strategy.
    pub idle: Idle,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// A heartbeat older than this means the active is hung: the standby fences it.
    pub hung_after: Duration,
    /// Snapshot items per catch-up chunk (bounds the active's pause).
    pub catchup_chunk: usize,
    /// Start as standby even if no active exists (wait for one).
    pub standby_only: bool,
    /// What a panic anywhere in the engine's process does (default: abort; see [`OnPanic`]).
    pub on_panic: OnPanic,
    /// Publish live counters in `<dir>/counters` ([`crate::counters`]; default on, off only
    /// to measure what they cost).
    pub counters: bool,
}

/// What a panic in an engine process does.
///
/// The default, [`OnPanic::Abort`], makes every panic — in the request handler, in an apply
/// hook, in the runtime, in any thread of the process — end the process with SIGABRT right
/// after the panic message is printed. That is a failover like any other death: the kernel
/// marks the active's robust mutex owner-died, the standby applies every committed transaction
/// and steps up; the request whose handler panicked was never committed, so the new active runs
/// it again (a request that panics every engine it meets ends the last one too: fix the
/// handler, or refuse the request with [`Refused`]). Unwinding instead would run the
/// application's destructors on half-changed state and could leave a process that lost its
/// engine thread but keeps running.
///
/// [`OnPanic::Unwind`] keeps Rust's default (for applications that install their own hook).
/// A panic that unwinds out of [`Engine::run`] still fails over: the engine keeps the control
/// block mapped while its thread holds the mutex, so the kernel marks it at the thread's exit,
/// and a standby recovers a mutex whose holder thread is provably gone in any case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPanic {
    /// Print the panic, then abort the process (a failover).
    Abort,
    /// Leave the process's panic hook alone.
    Unwind,
}

impl Options {
    /// Override settings from the environment (what a supervisor passes to an engine):
    /// `UNDERSTUDY_BACKPRESSURE_US` / `_MS` (wait bound before untethering; 0 = untether at
    /// once),
    /// `UNDERSTUDY_HUNG_MS` (heartbeat age that counts as hung), `UNDERSTUDY_IDLE` (`spin`,
    /// `shared`, or `<spin polls>,<sleep µs>`), `UNDERSTUDY_CATCHUP_CHUNK` (items per chunk).
    /// A malformed value is an error naming the variable, the expected and the found value.
    pub fn apply_env(&mut self) -> Result<(), String> {
        fn num(var: &str) -> Result<Option<u64>, String> {
            match std::env::var(var) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{var}: expected a non-negative integer, found `{v}`")),
                Err(_) => Ok(None),
            }
        }
        if let Some(us) = num(crate::launch::ENV_BACKPRESSURE_US)? {
            self.backpressure = if us == 0 {
                Backpressure::Untether
            } else {
                Backpressure::Wait(Duration::from_micros(us))
            };
        }
        if let Some(ms) = num(crate::launch::ENV_BACKPRESSURE_MS)? {
            self.backpressure = if ms == 0 {
                Backpressure::Untether
            } else {
                Backpressure::Wait(Duration::from_millis(ms))
            };
        }
        if let Some(ms) = num(crate::launch::ENV_HUNG_MS)? {
            self.hung_after = Duration::from_millis(ms.max(1));
        }
        if let Some(n) = num(crate::launch::ENV_CATCHUP_CHUNK)? {
            self.catchup_chunk = (n as usize).max(1);
        }
        if let Ok(v) = std::env::var(crate::launch::ENV_IDLE) {
            self.idle = match v.trim() {
                "spin" => Idle::SPIN,
                "shared" => Idle::SHARED,
                other => {
                    let bad = || {
                        format!("UNDERSTUDY_IDLE: expected `spin`, `shared` or `<spin polls>,<sleep µs>`, found `{other}`")
                    };
                    let (a, b) = other.split_once(',').ok_or_else(bad)?;
                    Idle {
                        spin_polls: a.trim().parse().map_err(|_| bad())?,
                        sleep: Duration::from_micros(b.trim().parse().map_err(|_| bad())?),
                    }
                }
            };
        }
        Ok(())
    }

    /// Defaults for `dir` and `slot`.
    pub fn new(dir: impl Into<PathBuf>, slot: usize) -> Options {
        Options {
            dir: dir.into(),
            slot,
            ring_capacity: 8 << 20,
            backpressure: Backpressure::Wait(Duration::from_millis(20)),
            idle: Idle::SHARED,
            heartbeat: Duration::from_millis(1),
            hung_after: Duration::from_millis(500),
            catchup_chunk: 512,
            standby_only: false,
            on_panic: OnPanic::Abort,
            counters: true,
        }
    }
}

/// Where requests come from and answers go.
pub trait Input {
    /// The next request, copied into `buf`; `None` if none is waiting.
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta>;
    /// The transaction that consumed the request described by `meta` is committed to every
    /// standby; `response` may now be delivered.
    fn committed(&mut self, meta: &InputMeta, response: &[u8]);
    /// This engine became active: resume every source after its replicated position (the
    /// `SYS_INPUTS` table of `store`), re-emitting committed responses never delivered.
    fn resume(&mut self, store: &Store);
    /// Housekeeping hook called when idle (e.g. discovering new clients).
    fn idle(&mut self) {}
    /// A source that is gone for good (a dead client): the engine deletes its replicated
    /// position in a transaction of its own.
    fn take_retired(&mut self) -> Option<u64> {
        None
    }
}

/// Where a request came from and where the input stands after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputMeta {
    /// Source (client) id.
    pub source: u64,
    /// The request's sequence number at its source.
    pub request_seq: u64,
    /// Input position after the request.
    pub next_pos: u64,
    /// Input sequence after the request.
    pub next_seq: u64,
}

/// The replicated position of one input source.
#[derive(Debug, Clone, PartialEq, Eq)]
#[doc(hidden)]
pub struct SourcePosition {
    /// Input position after the last consumed request.
    pub next_pos: u64,
    /// Input sequence after it.
    pub next_seq: u64,
    /// The last request sequence consumed.
    pub request_seq: u64,
    /// The committed response to it.
    pub response: Vec<u8>,
}

impl SourcePosition {
    /// Encode as a `SYS_INPUTS` value.
    pub fn encode(meta: &InputMeta, response: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&meta.next_pos.to_le_bytes());
        out.extend_from_slice(&meta.next_seq.to_le_bytes());
        out.extend_from_slice(&meta.request_seq.to_le_bytes());
        out.extend_from_slice(response);
    }

    /// Decode a `SYS_INPUTS` value (`None` if malformed).
    pub fn decode(v: &[u8]) -> Option<SourcePosition> {
        if v.len() < 24 {
            return None;
        }
        let w = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().expect("8"));
        Some(SourcePosition {
            next_pos: w(0),
            next_seq: w(1),
            request_seq: w(2),
            response: v[24..].to_vec(),
        })
    }

    /// Every source's position in `store`.
    pub fn all(store: &Store) -> Vec<(u64, SourcePosition)> {
        store
            .table(SYS_INPUTS)
            .filter_map(|(k, v)| {
                let id = u64::from_le_bytes(k.try_into().ok()?);
                Some((id, SourcePosition::decode(v)?))
            })
            .collect()
    }
}

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

/// Command result codes.
#[doc(hidden)]
pub mod result {
    /// Done.
    pub const OK: u64 = 0;
    /// The target is not a hot standby.
    pub const NOT_HOT: u64 = 2;
    /// A feature cannot be enabled (a peer lacks it).
    pub const NOT_ENABLEABLE: u64 = 3;
    /// Unknown command.
    pub const UNKNOWN: u64 = 4;
    /// The switchover could not start (no room for the step-up frame, or a region could not
    /// be created); the active stays active.
    pub const BUSY: u64 = 5;
}

enum ReplicaPhase {
    /// Waiting for the standby's hello on the feedback ring.
    AwaitHello,
    /// Streaming; `cursor` is the snapshot progress if a catch-up is under way.
    Streaming(Option<Snapshot>),
}

struct Snapshot {
    units_after: Option<u64>,
    units_done: bool,
    records_after: Option<(u16, Vec<u8>)>,
}

struct Replica {
    slot: usize,
    gen: u64,
    stream_region: Region,
    feedback_region: Region,
    stream: Producer<RegionMemory>,
    feedback: Consumer<RegionMemory>,
    phase: ReplicaPhase,
    agreement: Option<Agreement>,
    hot: bool,
}

/// Standby regions created but not yet announced (see `Engine::prepare_upstream`).
struct Prepared {
    epoch: u64,
    gen: u64,
    stream_region: Region,
    feedback_region: Region,
    stream: Consumer<RegionMemory>,
    feedback: Producer<RegionMemory>,
}

/// Another engine's prepared regions, opened ahead of a planned step-up.
struct Preopened {
    slot: usize,
    epoch: u64,
    gen: u64,
    stream_region: Region,
    feedback_region: Region,
}

/// A standby's end of the stream.
struct Upstream {
    stream_region: Region,
    feedback_region: Region,
    stream: Consumer<RegionMemory>,
    feedback: Producer<RegionMemory>,
    active_slot: usize,
    last_ack: Instant,
}

/// Mappings of a role this engine left, kept until the role change is over (see
/// `Engine::leftovers`).
#[derive(Default)]
struct Leftovers {
    /// Our old upstream after a step-up; its files are unlinked when it is dropped.
    upstream: Vec<Upstream>,
    /// Our replicas after handing the role over (each already closed or handed over).
    replicas: Vec<Replica>,
    since: Option<Instant>,
}

impl Leftovers {
    fn keep_upstream(&mut self, u: Box<Upstream>) {
        self.upstream.push(*u);
        self.since = Some(Instant::now());
    }

    fn keep_replicas(&mut self, r: impl IntoIterator<Item = Replica>) {
        self.replicas.extend(r);
        self.since = Some(Instant::now());
    }

    /// Unmap (and unlink) them if the role change is over: `done` (the new role has done
    /// its first work), or 20 ms have passed.
    fn reap(&mut self, done: bool) {
        let Some(since) = self.since else {
            return;
        };
        if !done && since.elapsed() < Duration::from_millis(20) {
            return;
        }
        for u in self.upstream.drain(..) {
            let _ = Region::remove(u.stream_region.path());
            let _ = Region::remove(u.feedback_region.path());
        }
        self.replicas.clear();
        self.since = None;
    }
}

/// One engine process.
pub struct Engine<A: Application, I: Input> {
    app: A,
    input: I,
    opt: Options,
    control: Control,
    store: Store,
    me: Identity,
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
}

fn identity_of(p: &ProcessIdentity) -> Identity {
    Identity {
        pid: p.pid as u64,
        start_time: p.start_time_ticks,
    }
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
        // Two engines in one slot would overwrite each other's words: the cluster would look
        // like it had one engine, with no standby and no active the supervisor can see.
        let holder = control.get(opt.slot, Field::Pid);
        if holder != 0 && holder != me.pid as u64 && holder <= u32::MAX as u64 {
            let id = ProcessIdentity {
                pid: holder as u32,
                start_time_ticks: control.get(opt.slot, Field::StartTime),
            };
            if id.is_alive() {
                return Err(EngineError::SlotTaken {
                    slot: control::slot_name(opt.slot),
                    dir: opt.dir.clone(),
                    holder_pid: holder,
                    our_pid: me.pid as u64,
                });
            }
        }
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
            opt,
        };
        let s = e.opt.slot;
        let c = &e.control;
        c.set(s, Field::Pid, 0);
        c.set(s, Field::StartTime, e.me.start_time);
        c.set(s, Field::AppVersion, e.app.version() as u64);
        c.set(s, Field::AppHash, app_hash(e.app.name()));
        c.set(s, Field::Role, Role::None as u64);
        c.set(s, Field::State, State::Starting as u64);
        c.set(s, Field::Cmd, 0);
        c.set(s, Field::Error, 0);
        c.set(s, Field::HeartbeatNs, monotonic_ns());
        c.set(s, Field::Pid, e.me.pid);
        Ok(e)
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
        if let Some(a) = self.control.active_slot() {
            if a != self.opt.slot && self.slot_alive(a) {
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

    // ------------------------------------------------------------------ active

    fn run_active(&mut self) -> Result<Next, EngineError> {
        let s = self.opt.slot;
        self.publish_status(Role::Active, State::Serving);
        // The role hook runs before the first request is taken (and before a committed but
        // undelivered response is re-emitted).
        let activation = crate::app::Activation {
            takeover: self.takeover,
            epoch: self.epoch,
            commits: self.commits,
        };
        self.app.on_active(&activation, &self.store);
        self.input.resume(&self.store);
        let mut idle_polls: u32 = 0;
        let mut last_house = 0u64;
        let mut last_hb_frame = 0u64;
        let mut iter: u32 = 0;
        loop {
            iter = iter.wrapping_add(1);
            if let Some((seq, c, a)) = self.control.pending() {
                if let Some(next) = self.command(seq, c, a)? {
                    return Ok(next);
                }
            }
            let busy = if let Some(meta) = self.input.poll(&mut self.request) {
                self.transact(meta);
                idle_polls = 0;
                true
            } else {
                false
            };
            // Idle and spinning, housekeeping (two clock reads, tens of ns each on a VM) runs
            // every 16th poll, so a request arriving is noticed sooner; before every sleep.
            let idle_tick =
                !busy && (idle_polls % 16 == 0 || idle_polls >= self.opt.idle.spin_polls);
            if idle_tick || busy && iter % 64 == 0 {
                let now = monotonic_ns();
                if now - last_house > 200_000 || !busy && now - last_house > 20_000 {
                    if now / 10_000_000 != last_house / 10_000_000 {
                        self.control.repair_own(s); // checked words, every ~10 ms
                    }
                    last_house = now;
                    self.control.set(s, Field::HeartbeatNs, now);
                    self.control.set(s, Field::Commits, self.commits);
                    self.control.set(s, Field::Requests, self.requests);
                    self.control.set(s, Field::Refusals, self.refusals);
                    self.publish_counters(now);
                    // A p99 says something over enough requests: publish every 100 ms once
                    // the window holds `MIN_SAMPLES` timed requests, else every second (a window of under 100
                    // requests has its maximum for its p99: one preemption would be "the p99").
                    let age = now - self.service_published_ns;
                    if age > 100_000_000 && self.service.count >= ServiceTimes::MIN_SAMPLES
                        || age > 1_000_000_000
                    {
                        self.service_published_ns = now;
                        self.control
                            .set(s, Field::ServiceP99Ns, self.service.p99_and_reset());
                    }
                    self.control.set(s, Field::Digest, self.store.digest());
                    self.leftovers.reap(self.served);
                    if self.control.get(s, Field::Cmd) == slot_cmd::STOP {
                        self.control.set(s, Field::Cmd, 0);
                        info!(slot = %control::slot_name(s), "stopping on command");
                        return Ok(Next::Stop);
                    }
                    self.attach_new_replicas();
                    self.service_replicas();
                    // With a hot standby, a planned switchover may come: prepare our standby
                    // regions of the next epoch now, outside its pause.
                    if self.prepared.as_ref().map(|p| p.epoch) != Some(self.epoch + 1)
                        && self.replicas.iter().any(|r| r.hot)
                    {
                        self.discard_prepared();
                        match self.prepare_upstream(self.epoch + 1) {
                            Ok(p) => self.prepared = Some(p),
                            Err(e) => debug!("cannot prepare the next epoch's regions: {e}"),
                        }
                    }
                    if now - last_hb_frame > self.opt.heartbeat.as_nanos() as u64 * 10 {
                        last_hb_frame = now;
                        self.heartbeat_frames(now);
                    }
                }
                if idle_tick {
                    self.input.idle();
                    while let Some(source) = self.input.take_retired() {
                        self.retire_source(source);
                    }
                }
            }
            if !busy {
                idle_polls = idle_polls.saturating_add(1);
                self.idle_wait(idle_polls);
            }
        }
    }

    fn idle_wait(&self, polls: u32) {
        if polls < self.opt.idle.spin_polls || self.opt.idle.sleep.is_zero() {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(self.opt.idle.sleep);
        }
    }

    /// Run one request as a transaction and commit it.
    fn transact(&mut self, meta: InputMeta) {
        // The service time of one request in `SERVICE_SAMPLE_EVERY` is measured: two clock
        // reads cost tens of ns on a VM, a noticeable share of a sub-microsecond round trip,
        // and a p99 over a quarter of the requests is as good a p99.
        let timed = self.requests % ServiceTimes::SAMPLE_EVERY == 0;
        let t0 = if timed { monotonic_ns() } else { 0 };
        let req = std::mem::take(&mut self.request);
        let refused = execute(
            &mut self.app,
            &self.store,
            &mut self.tx,
            self.enabled,
            &self.write_versions,
            &meta,
            &req,
        );
        self.request = req;
        self.commit_tx(&commit_block(self.commits, &meta));
        self.requests += 1;
        self.input.committed(&meta, &self.tx.response);
        self.refusals += refused as u64;
        if timed {
            let ns = monotonic_ns().saturating_sub(t0);
            self.service.record(ns);
            if let Some(k) = &self.counters {
                k.service_time(ns);
            }
        }
        if let Some(k) = &self.counters {
            k.add(Counter::REQUESTS_TOTAL, 1);
            k.add(Counter::REFUSALS_TOTAL, refused as u64);
        }
        // After the store has this transaction (a snapshot end carries the digest after it),
        // and after the response is out.
        self.catch_up_with_live_traffic();
    }

    /// Under sustained load the ring is mostly full of live transactions; a syncing standby
    /// also gets a small snapshot chunk after every transaction, so catch-up always progresses
    /// (the active is paced by back-pressure to what the standby can take).
    fn catch_up_with_live_traffic(&mut self) {
        let chunk = (self.opt.catchup_chunk / 16).max(4);
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &mut self.replicas[i];
            if !matches!(r.phase, ReplicaPhase::Streaming(Some(_))) {
                i += 1;
                continue;
            }
            match catch_up_step(
                r,
                &self.store,
                self.commits,
                self.epoch,
                chunk,
                &mut self.scratch,
            ) {
                Ok(()) => i += 1,
                Err(why) => self.detach(i, &why),
            }
        }
    }

    /// Drop replica `i` for good (this attach generation is never reopened); keep the first
    /// close reason (the standby's own, e.g. a corrupt stream).
    fn detach(&mut self, i: usize, why: &str) {
        let rep = self.replicas.remove(i);
        self.detached.push((rep.slot, rep.gen));
        warn!(slot = %control::slot_name(rep.slot), "standby detached: {why}");
        if rep.stream_region.closed().is_none() {
            rep.stream_region.close(CLOSE_DETACHED);
        }
    }

    /// Drop replica `i` that cannot keep up: it is marked stale and must catch up again.
    fn untether(&mut self, i: usize, why: &str) {
        let rep = self.replicas.remove(i);
        self.detached.push((rep.slot, rep.gen));
        warn!(slot = %control::slot_name(rep.slot), "standby untethered: {why}");
        if let Some(k) = &self.counters {
            k.add(Counter::UNTETHERS_TOTAL, 1);
        }
        rep.stream_region.close(CLOSE_UNTETHERED);
        self.control
            .set(rep.slot, Field::State, State::Stale as u64);
    }

    /// Keep command `seq` pending (true) for up to `bound`, while a standby finishes
    /// attaching: the supervisor posts right after it saw the standby hot.
    fn defer_command(&mut self, seq: u64, bound: Duration) -> bool {
        defer_decision(&mut self.cmd_seen, seq, bound, Instant::now())
    }

    /// Forget a source's replicated position, in a transaction of its own.
    fn retire_source(&mut self, source: u64) {
        self.tx.clear();
        let key = self.tx.spare.copy_of(&source.to_le_bytes());
        self.tx.ops.push(Op::Delete {
            table: SYS_INPUTS,
            key,
        });
        let commit = CommitBlock {
            index: self.commits,
            input_pos: 0,
            input_seq: 0,
            source,
            request_seq: u64::MAX,
            response_len: 0,
            flags: 1,
        };
        self.commit_tx(&commit);
        info!(source, "input source retired");
    }

    /// Commit the transaction in `self.tx`: on every standby's stream first, then into our
    /// store (the handler already updated the application's own in-memory view: `on_apply`
    /// is for changes a standby receives).
    fn commit_tx(&mut self, commit: &CommitBlock) {
        if !self.served {
            // SYNC POINT: first commit of this role (Release before the commit is replicated;
            // read by a handed-over old active deciding whether it may take the role back).
            self.served = true;
            self.control.set(self.opt.slot, Field::Served, 1);
        }
        self.replicate_tx(commit);
        self.tx.apply_to(&mut self.store);
        self.commits += 1;
        if let Some(k) = &self.counters {
            k.add(Counter::COMMITS_TOTAL, 1);
            k.set(Counter::TX_INDEX, self.commits);
        }
    }

    /// Push the transaction's ops and commit to every streaming replica as one batch each.
    fn replicate_tx(&mut self, commit: &CommitBlock) {
        let mut i = 0;
        while i < self.replicas.len() {
            if !matches!(self.replicas[i].phase, ReplicaPhase::Streaming(_)) {
                i += 1;
                continue;
            }
            let (ops, scratch) = (&self.tx.ops, &mut self.scratch);
            let ok = push_waiting(&mut self.replicas[i].stream, self.opt.backpressure, |p| {
                push_tx(p, ops, commit, scratch)
            });
            if ok {
                i += 1;
            } else {
                self.untether(i, "its stream is full");
            }
        }
    }

    fn heartbeat_frames(&mut self, now: u64) {
        let hb = HeartbeatBlock {
            now_ns: now,
            commits: self.commits,
        };
        for r in &mut self.replicas {
            if matches!(r.phase, ReplicaPhase::Streaming(_)) {
                let _ =
                    r.stream
                        .try_publish(rt::HEARTBEAT, 1, 16, zerocopy::IntoBytes::as_bytes(&hb));
            }
        }
    }

    /// Handle a cluster command; `Some(next)` if the role changes.
    fn command(&mut self, seq: u64, c: u64, arg: u64) -> Result<Option<Next>, EngineError> {
        match c {
            cmd::SWITCHOVER => {
                let target = arg as usize;
                let ok = self.replicas.iter().any(|r| {
                    r.slot == target && r.hot && matches!(r.phase, ReplicaPhase::Streaming(None))
                });
                // The target may be attached without having confirmed it is hot yet (acks
                // come every millisecond). A target that already says it is hot (what an
                // operator or the supervisor saw before asking) gets seconds: on a loaded
                // host its acknowledgement can take that long to arrive; one still attaching
                // gets one second.
                let says_hot = target < control::SLOTS
                    && State::from_word(self.control.get(target, Field::State)) == State::Hot;
                let bound = Duration::from_secs(if says_hot { 5 } else { 1 });
                if !ok && target < control::SLOTS && self.defer_command(seq, bound) {
                    return Ok(None);
                }
                self.cmd_seen = None;
                if !ok {
                    warn!(target = %control::slot_name(target.min(2)), "switchover refused: target is not a hot standby");
                    self.control.ack(seq, result::NOT_HOT);
                    return Ok(None);
                }
                match self.switchover(target) {
                    Ok(up) => {
                        self.control.ack(seq, result::OK);
                        Ok(Some(Next::Standby(Some(Box::new(up)))))
                    }
                    Err(e) => {
                        warn!("switchover refused: {e}; still active");
                        self.control.ack(seq, result::BUSY);
                        Ok(None)
                    }
                }
            }
            cmd::ENABLE_FEATURES => {
                let want = arg;
                // Drop standbys that stopped or died since the last housekeeping: a retired
                // old-version engine must not veto the features.
                self.service_replicas();
                let alive: Vec<bool> = self
                    .replicas
                    .iter()
                    .map(|r| self.slot_alive(r.slot))
                    .collect();
                let attaching = self
                    .replicas
                    .iter()
                    .zip(&alive)
                    .any(|(r, a)| *a && r.agreement.is_none());
                // A standby mid-handshake: decide once it has said which features it has.
                if attaching && self.defer_command(seq, Duration::from_secs(1)) {
                    return Ok(None);
                }
                self.cmd_seen = None;
                let mut can = self
                    .features
                    .iter()
                    .filter(|f| f.id < 64)
                    .fold(0u64, |m, f| m | 1 << f.id);
                for (r, a) in self.replicas.iter().zip(&alive) {
                    if !*a {
                        continue;
                    }
                    match &r.agreement {
                        Some(a) => can &= a.enableable,
                        None => can = 0,
                    }
                }
                if want & !can != 0 {
                    warn!(
                        want,
                        can, "enable refused: not every engine supports these features"
                    );
                    self.control.ack(seq, result::NOT_ENABLEABLE);
                    return Ok(None);
                }
                self.set_features(self.enabled | want);
                self.control.ack(seq, result::OK);
                Ok(None)
            }
            _ => {
                self.control.ack(seq, result::UNKNOWN);
                Ok(None)
            }
        }
    }

    fn set_features(&mut self, enabled: u64) {
        let fb = FeaturesBlock {
            enabled,
            commits: self.commits,
        };
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &mut self.replicas[i];
            // Under load the ring may be momentarily full: wait as for a transaction.
            let sent = !matches!(r.phase, ReplicaPhase::Streaming(_))
                || push_waiting(&mut r.stream, self.opt.backpressure, |p| {
                    p.try_publish(rt::FEATURES, 1, 16, zerocopy::IntoBytes::as_bytes(&fb))
                });
            if sent {
                i += 1;
                continue;
            }
            // A standby that missed the switch would write the old layouts after a step-up:
            // untether it; it catches up and learns the enabled set from the hello.
            self.untether(i, "no room for the feature switch");
        }
        self.enabled = enabled;
        self.write_versions = write_versions(&self.templates, &self.features, enabled);
        self.control.set(self.opt.slot, Field::Features, enabled);
        info!(enabled, "features enabled");
    }

    /// Planned switchover to `target`: returns this engine's new upstream (as standby).
    fn switchover(&mut self, target: usize) -> Result<Upstream, SwitchoverRefused> {
        let t0 = Instant::now();
        let s = self.opt.slot;
        let next_epoch = self.epoch + 1;
        let idx = self
            .replicas
            .iter()
            .position(|r| r.slot == target)
            .expect("target checked");
        // Room for the step-up frame first (a hot standby's ring may be momentarily full under
        // load): nothing has changed yet if there is none, and we stay active. `check_push`
        // counts what the push below takes, padding before the buffer's end included.
        let room = push_waiting(&mut self.replicas[idx].stream, self.opt.backpressure, |p| {
            p.check_push(56)
        });
        if !room {
            return Err(SwitchoverRefused::NoRoom);
        }
        // Pre-create our standby stream of the next epoch, so the new active streams to us
        // from its first transaction on (no catch-up: our digest equals its digest).
        let prepared = match self.prepared.take() {
            Some(p)
                if p.epoch == next_epoch
                    && p.gen == self.control.get(s, Field::AttachGen).wrapping_add(1) =>
            {
                p
            }
            other => {
                self.prepared = other;
                self.discard_prepared();
                self.prepare_upstream(next_epoch)
                    .map_err(SwitchoverRefused::Failed)?
            }
        };
        let up = self
            .announce_upstream(prepared, target)
            .map_err(SwitchoverRefused::Failed)?;
        self.handed_over = Some((self.epoch, target, self.commits, self.store.digest()));
        let pos = self.position(target as u64);
        {
            let r = &mut self.replicas[idx];
            let mut b = r.stream.batch();
            b.push(rt::STEP_UP, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
                .expect("check_push made room for the step-up frame; nothing wrote since");
            b.commit();
        }
        // Detach every replica; the other standbys re-attach to the new active. Their
        // mappings go once the switchover is over, not inside its pause.
        for rep in &self.replicas {
            if rep.slot != target {
                rep.stream_region.close(CLOSE_DETACHED);
            }
        }
        self.leftovers.keep_replicas(self.replicas.drain(..));
        #[cfg(feature = "fault-injection")]
        if let Some(ms) = std::env::var_os("UNDERSTUDY_TEST_STALL_BEFORE_UNLOCK_MS") {
            // Test hook (cargo feature `fault-injection` only): an old active descheduled
            // between the step-up frame and releasing the mutex (the target must wait for it,
            // not give up).
            let ms = ms.to_str().and_then(|v| v.parse().ok()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Err(e) = self.control.lock().unlock() {
            // Cannot happen for the thread that locked it; the target's try_lock would spin
            // and give up, and we would take the role back.
            error!("releasing the robust mutex: {e}");
        }
        // We follow the target in the next epoch: publishing the old one would hide our
        // pre-created stream from the target, and the epoch check in `follow` would make us
        // re-attach with a full catch-up.
        self.epoch = next_epoch;
        self.publish_status(Role::Standby, State::Syncing);
        if let Some(k) = &self.counters {
            k.add(Counter::SWITCHOVERS_TOTAL, 1);
            k.set(Counter::LAST_SWITCHOVER_NS, t0.elapsed().as_nanos() as u64);
        }
        info!(slot = %control::slot_name(s), target = %control::slot_name(target), took_us = t0.elapsed().as_micros() as u64, "switched over; now standby");
        Ok(up)
    }

    /// Find standbys that announced a new attach generation in our epoch and open them.
    fn attach_new_replicas(&mut self) {
        for slot in 0..control::SLOTS {
            if slot == self.opt.slot {
                continue;
            }
            let c = &self.control;
            if Role::from_word(c.get(slot, Field::Role)) != Role::Standby
                || c.get(slot, Field::Epoch) != self.epoch
            {
                continue;
            }
            let gen = c.get(slot, Field::AttachGen);
            if self.replicas.iter().any(|r| r.slot == slot && r.gen == gen)
                || self.detached.contains(&(slot, gen))
            {
                continue;
            }
            self.replicas.retain(|r| r.slot != slot);
            let sp = Control::stream_path(&self.opt.dir, self.epoch, slot, gen);
            let fp = Control::feedback_path(&self.opt.dir, self.epoch, slot, gen);
            // Regions opened ahead of a planned step-up (see `preopen_next`) skip the file work.
            let pre = match self.preopened.take() {
                Some(p) if p.slot == slot && p.epoch == self.epoch && p.gen == gen => {
                    Some((p.stream_region, p.feedback_region))
                }
                _ => None,
            };
            let open = || -> Result<Replica, EngineError> {
                let (stream_region, feedback_region) = match pre {
                    Some(p) => p,
                    None => (
                        Region::open(&sp, Duration::from_millis(1))?,
                        Region::open(&fp, Duration::from_millis(1))?,
                    ),
                };
                // Untrusted: the files must be this epoch's stream and feedback rings.
                for (r, kind) in [
                    (&stream_region, KIND_STREAM),
                    (&feedback_region, KIND_FEEDBACK),
                ] {
                    if r.kind() != kind || r.epoch() != self.epoch {
                        return Err(EngineError::Other(format!(
                            "{}: expected a ring of kind {kind} for epoch {}, found kind {} epoch {}",
                            r.path().display(),
                            self.epoch,
                            r.kind(),
                            r.epoch()
                        )));
                    }
                }
                stream_region.set_producer_identity(self.me);
                feedback_region.set_consumer_identity(self.me);
                let stream = stream_region.producer()?;
                let feedback = feedback_region.consumer()?;
                Ok(Replica {
                    slot,
                    gen,
                    stream_region,
                    feedback_region,
                    stream,
                    feedback,
                    phase: ReplicaPhase::AwaitHello,
                    agreement: None,
                    hot: false,
                })
            };
            match open() {
                Ok(r) => {
                    debug!(slot = %control::slot_name(slot), gen, "standby attaching");
                    self.replicas.push(r);
                }
                Err(e) => {
                    debug!(slot = %control::slot_name(slot), "standby not ready to attach: {e}")
                }
            }
        }
    }

    /// Handshakes, catch-up chunks, acks, detaches.
    fn service_replicas(&mut self) {
        let mut i = 0;
        while i < self.replicas.len() {
            match self.service_replica(i) {
                Ok(()) => i += 1,
                Err(why) => self.detach(i, &why),
            }
        }
        let peers: Vec<u64> = self
            .replicas
            .iter()
            .filter_map(|r| {
                r.agreement
                    .as_ref()
                    .map(|_| self.control.get(r.slot, Field::AppVersion))
            })
            .collect();
        self.control.set(
            self.opt.slot,
            Field::PeerVersion,
            peers.first().copied().unwrap_or(0),
        );
        // The layout every attached standby can read (a departed older peer no longer limits it).
        if let Some(l) = self
            .replicas
            .iter()
            .filter_map(|r| r.agreement.as_ref().map(Agreement::layout_version))
            .min()
        {
            if l != self.agreed_layout {
                self.agreed_layout = l;
                self.control.set(self.opt.slot, Field::Layout, l as u64);
            }
        }
    }

    fn service_replica(&mut self, i: usize) -> Result<(), String> {
        let hello_now = self.hello();
        let r = &mut self.replicas[i];
        if r.feedback_region.closed().is_some() || r.stream_region.closed().is_some() {
            return Err("its regions were closed".into());
        }
        // Feedback: hello, acks, refusals.
        loop {
            match r.feedback.poll(&mut self.buf) {
                Ok(false) => break,
                Ok(true) => {
                    for f in self.buf.frames() {
                        match f.meta.record_type {
                            rt::HELLO if matches!(r.phase, ReplicaPhase::AwaitHello) => {
                                let theirs = Hello::decode(f.payload, f.meta.block_length)
                                    .map_err(|e| format!("bad hello: {e}"))?;
                                match negotiate(&hello_now, &theirs, self.enabled) {
                                    Ok(a) => {
                                        if a.versions_differ {
                                            info!(ours = hello_now.app_version, theirs = theirs.app_version, layout = a.layout_version(), "standby runs another version; streaming the agreed layout");
                                        }
                                        r.agreement = Some(a);
                                        let mut b = r.stream.batch();
                                        hello_now.encode(&mut self.scratch);
                                        b.push(rt::HELLO, 1, 48, &self.scratch)
                                            .map_err(|e| e.to_string())?;
                                        let same = theirs.digest == hello_now.digest
                                            && theirs.commits == hello_now.commits;
                                        let pos =
                                            position_of(&self.store, self.commits, self.epoch, 0);
                                        if same {
                                            b.push(
                                                rt::BASE,
                                                1,
                                                56,
                                                zerocopy::IntoBytes::as_bytes(&pos),
                                            )
                                            .map_err(|e| e.to_string())?;
                                            r.phase = ReplicaPhase::Streaming(None);
                                            r.hot = true;
                                        } else {
                                            b.push(
                                                rt::SNAP_BEGIN,
                                                1,
                                                56,
                                                zerocopy::IntoBytes::as_bytes(&pos),
                                            )
                                            .map_err(|e| e.to_string())?;
                                            r.phase = ReplicaPhase::Streaming(Some(Snapshot {
                                                units_after: None,
                                                units_done: false,
                                                records_after: None,
                                            }));
                                        }
                                        b.commit();
                                    }
                                    Err(e) => {
                                        let msg = format!(
                                            "{e} (active: {} v{}, standby: {} v{})",
                                            hello_now.name,
                                            hello_now.app_version,
                                            theirs.name,
                                            theirs.app_version
                                        );
                                        let _ =
                                            r.stream.try_publish(rt::REFUSE, 1, 0, msg.as_bytes());
                                        r.stream_region.close(CLOSE_REFUSED);
                                        return Err(format!("refused: {msg}"));
                                    }
                                }
                            }
                            rt::ACK => {
                                if let Ok(p) = decode::<Position>(f.payload, f.meta.block_length) {
                                    if p.arg == 1 {
                                        r.hot = true;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => return Err(format!("corrupt feedback: {e}")),
            }
        }
        // Catch-up chunk.
        let chunk = self.opt.catchup_chunk;
        catch_up_step(
            r,
            &self.store,
            self.commits,
            self.epoch,
            chunk,
            &mut self.scratch,
        )?;
        Ok(())
    }

    // ------------------------------------------------------------------ standby

    /// Create the standby's two regions for `epoch` and announce them in our slot.
    fn create_upstream(&mut self, epoch: u64, active_slot: usize) -> Result<Upstream, EngineError> {
        let p = self.prepare_upstream(epoch)?;
        self.announce_upstream(p, active_slot)
    }

    /// Create (not yet announce) this engine's standby regions for `epoch`: the file work of
    /// attaching, which an active does ahead of a planned switchover so the switchover's pause
    /// does not include it.
    fn prepare_upstream(&mut self, epoch: u64) -> Result<Prepared, EngineError> {
        let s = self.opt.slot;
        let gen = self.control.get(s, Field::AttachGen).wrapping_add(1);
        let sp = Control::stream_path(&self.opt.dir, epoch, s, gen);
        let fp = Control::feedback_path(&self.opt.dir, epoch, s, gen);
        let _ = Region::remove(&sp);
        let _ = Region::remove(&fp);
        let spec = |kind| RegionSpec {
            capacity: self.opt.ring_capacity,
            epoch,
            kind,
        };
        let stream_region = Region::create(&sp, spec(KIND_STREAM), self.me)?;
        let feedback_region = Region::create(&fp, spec(KIND_FEEDBACK), self.me)?;
        stream_region.set_consumer_identity(self.me);
        let stream = stream_region.consumer()?;
        let feedback = feedback_region.producer()?;
        Ok(Prepared {
            epoch,
            gen,
            stream_region,
            feedback_region,
            stream,
            feedback,
        })
    }

    /// Write our hello into prepared regions and announce them in our slot: from here on the
    /// active of `p.epoch` attaches them.
    fn announce_upstream(
        &mut self,
        p: Prepared,
        active_slot: usize,
    ) -> Result<Upstream, EngineError> {
        let s = self.opt.slot;
        let Prepared {
            epoch,
            gen,
            stream_region,
            feedback_region,
            stream,
            mut feedback,
        } = p;
        let mut h = self.hello();
        h.epoch = epoch;
        h.encode(&mut self.scratch);
        feedback
            .try_publish(rt::HELLO, 1, 48, &self.scratch)
            .map_err(|e| {
                EngineError::Other(format!(
                    "writing our hello into {}: {e}",
                    feedback_region.path().display()
                ))
            })?;
        let c = &self.control;
        c.set(s, Field::Epoch, epoch);
        c.set(s, Field::Role, Role::Standby as u64);
        c.set(s, Field::State, State::Syncing as u64);
        c.set(s, Field::AttachGen, gen);
        c.set(s, Field::Served, 0);
        self.served = false;
        Ok(Upstream {
            stream_region,
            feedback_region,
            stream,
            feedback,
            active_slot,
            last_ack: Instant::now(),
        })
    }

    /// As a hot standby: open the regions our active prepared for the next epoch (see
    /// `prepare_upstream`), so that if it hands over to us, stepping up does not include
    /// opening and validating them. Their paths follow from the active's slot and generation.
    fn preopen_next(&mut self, active: usize) {
        let epoch = self.epoch + 1;
        let gen = self.control.get(active, Field::AttachGen).wrapping_add(1);
        if self
            .preopened
            .as_ref()
            .is_some_and(|p| p.slot == active && p.epoch == epoch && p.gen == gen)
        {
            return;
        }
        self.preopened = None;
        let sp = Control::stream_path(&self.opt.dir, epoch, active, gen);
        let fp = Control::feedback_path(&self.opt.dir, epoch, active, gen);
        if !sp.exists() || !fp.exists() {
            return;
        }
        if let (Ok(stream_region), Ok(feedback_region)) = (
            Region::open(&sp, Duration::ZERO),
            Region::open(&fp, Duration::ZERO),
        ) {
            self.preopened = Some(Preopened {
                slot: active,
                epoch,
                gen,
                stream_region,
                feedback_region,
            });
        }
    }

    /// Drop prepared regions that were never announced.
    fn discard_prepared(&mut self) {
        if let Some(p) = self.prepared.take() {
            let _ = Region::remove(p.stream_region.path());
            let _ = Region::remove(p.feedback_region.path());
        }
    }

    fn run_standby(&mut self, up: Option<Box<Upstream>>) -> Result<Next, EngineError> {
        let s = self.opt.slot;
        let mut up = up;
        self.replicas.clear();
        self.app.on_standby(&self.store);
        loop {
            // Find the active and attach to it.
            let mut u = match up.take() {
                Some(u) => u,
                None => match self.attach_upstream()? {
                    Attach::Attached(u) => u,
                    Attach::BecomeActive => return Ok(Next::Active),
                    Attach::Stop => return Ok(Next::Stop),
                },
            };
            match self.follow(&mut u)? {
                Follow::Reattach => {
                    u.feedback_region.close(CLOSE_DETACHED);
                    let _ = Region::remove(u.stream_region.path());
                    let _ = Region::remove(u.feedback_region.path());
                    continue;
                }
                Follow::StepUp { planned } => {
                    // Unmapped and unlinked after the step-up, outside its pause.
                    self.leftovers.keep_upstream(u);
                    if self.step_up(planned) {
                        return Ok(Next::Active);
                    }
                    self.leftovers.reap(true);
                    continue;
                }
                Follow::Stop => {
                    u.feedback_region.close(CLOSE_DETACHED);
                    let _ = Region::remove(u.stream_region.path());
                    let _ = Region::remove(u.feedback_region.path());
                    self.control.set(s, Field::Cmd, 0);
                    return Ok(Next::Stop);
                }
            }
        }
    }

    fn attach_upstream(&mut self) -> Result<Attach, EngineError> {
        let s = self.opt.slot;
        let started = Instant::now();
        loop {
            self.control.set(s, Field::HeartbeatNs, monotonic_ns());
            if self.control.get(s, Field::Cmd) == slot_cmd::STOP {
                return Ok(Attach::Stop);
            }
            let epoch = self.control.epoch();
            // We handed the active role over in a planned switchover and the target died before
            // claiming the next epoch: nobody served since, our state is the cluster's state;
            // take the role back (the mutex and the epoch compare-and-swap keep it single).
            if let Some((from, target, _, _)) = self.handed_over {
                if epoch > from {
                    self.handed_over = None;
                } else if !self.slot_alive(target) || started.elapsed() > Duration::from_secs(5) {
                    self.epoch = from;
                    if self.try_claim(Some(from))? {
                        self.handed_over = None;
                        warn!(target = %control::slot_name(target), "the switchover target died before stepping up; active again");
                        self.mark_step_up(started, false);
                        return Ok(Attach::BecomeActive);
                    }
                }
            }
            if let Some(a) = self.control.active_slot() {
                if a != s
                    && self.slot_alive(a)
                    && self.control.get(a, Field::Epoch) == epoch
                    && Role::from_word(self.control.get(a, Field::Role)) == Role::Active
                {
                    self.epoch = epoch;
                    return Ok(Attach::Attached(Box::new(self.create_upstream(epoch, a)?)));
                }
            }
            // No live active: if allowed, take over (the first engine, or after a death
            // nobody else handled).
            // A fresh cluster (epoch 0) has nothing to lose; later, only a hot standby
            // steps up (an empty engine taking over would lose the state).
            if !self.opt.standby_only
                && self.control.epoch() == 0
                && started.elapsed() > Duration::from_millis(20)
                && self.try_become_first_active()?
            {
                self.mark_step_up(started, false);
                return Ok(Attach::BecomeActive);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Apply the stream and watch the active until something happens.
    fn follow(&mut self, u: &mut Upstream) -> Result<Follow, EngineError> {
        let s = self.opt.slot;
        // The lock borrows the mapping: hold our own handle on it while `self` changes.
        let control = self.control.clone();
        let lock = control.lock();
        let active = u.active_slot;
        let apid = self.control.get(active, Field::Pid);
        let active_id = ProcessIdentity {
            pid: apid.min(u32::MAX as u64) as u32,
            start_time_ticks: self.control.get(active, Field::StartTime),
        };
        let mut idle_polls = 0u32;
        let mut last_house = 0u64;
        let mut last_alive_check = monotonic_ns();
        // When the stream last delivered a batch: a live active sends a heartbeat frame at
        // least every 10 heartbeat intervals, so this is the second source before a fence.
        // (Sampled at each liveness check from the batch count: no clock read per batch.)
        let mut last_frame_ns = monotonic_ns();
        let mut batches_at_check: u32 = 0;
        let mut lying_identity_warned = false;
        let mut state = State::Syncing;
        let mut batches: u32 = 0;
        loop {
            // Fast path: the active's mutex word. The kernel sets OWNER_DIED in it while the
            // dying process exits, before its memory is torn down.
            let died = matches!(lock.word(), LockWord::OwnerDied { .. });
            let mut got = false;
            match u.stream.poll(&mut self.buf) {
                Ok(true) => {
                    idle_polls = 0;
                    got = true;
                    batches = batches.wrapping_add(1);
                    match self.apply_batch(&mut state) {
                        Ok(Some(f)) => return Ok(f),
                        Ok(None) => {}
                        Err(e) => {
                            warn!(slot = %control::slot_name(s), "stream rejected: {e}; resyncing");
                            if let EngineError::Refused(_) = e {
                                return Err(e);
                            }
                            self.control.set(s, Field::State, State::Stale as u64);
                            u.stream_region.close(CLOSE_CORRUPT);
                            return Ok(Follow::Reattach);
                        }
                    }
                    // Under sustained load the ring never runs empty: still do the
                    // housekeeping (acks, heartbeat, commands) every 64 batches.
                    if batches % 64 != 0 {
                        continue;
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    warn!(slot = %control::slot_name(s), "corrupt frame in the stream: {e}; resyncing");
                    self.control.set(s, Field::State, State::Stale as u64);
                    u.stream_region.close(CLOSE_CORRUPT);
                    return Ok(Follow::Reattach);
                }
            }
            if died && !got {
                // Drain what the active committed before it died.
                match self.drain(u, &mut state) {
                    Drained::Clean => {}
                    Drained::RoleChange(f) => return Ok(f),
                    Drained::Broken => return Ok(Follow::Reattach),
                }
                let tail = u.stream.torn_tail();
                info!(slot = %control::slot_name(s), committed_end = tail.committed_end, torn = tail.uncommitted_bytes_seen, "active died (owner-died); stepping up");
                if self.took_nothing_since_handover(active) {
                    warn!(
                        "the switchover target died before serving anything; taking the role back"
                    );
                    return Ok(Follow::StepUp { planned: false });
                }
                if state != State::Hot || u.stream_region.closed().is_some() {
                    warn!("the active died before this standby was hot; it cannot step up with a partial state");
                    return Ok(Follow::Reattach);
                }
                return Ok(Follow::StepUp { planned: false });
            }
            let now = monotonic_ns();
            if now - last_house > 500_000 {
                if now / 10_000_000 != last_house / 10_000_000 {
                    self.control.repair_own(s); // checked words, every ~10 ms
                }
                last_house = now;
                self.control.set(s, Field::HeartbeatNs, now);
                self.control.set(s, Field::Commits, self.commits);
                self.control.set(s, Field::Digest, self.store.digest());
                self.leftovers.reap(false);
                let lag = u
                    .stream
                    .producer_position()
                    .saturating_sub(u.stream.position());
                self.control.set(s, Field::LagBytes, lag);
                if let Some(k) = &self.counters {
                    k.housekeeping(now, self.counters_bp_base);
                    k.set(Counter::STATE, state as u64);
                    k.set(Counter::ROLE, self.control.get(s, Field::Role));
                    k.set(Counter::EPOCH, self.epoch);
                }
                if state == State::Hot && self.control.epoch() == self.epoch {
                    self.preopen_next(active);
                }
                if self.control.get(s, Field::Cmd) == slot_cmd::STOP {
                    return Ok(Follow::Stop);
                }
                if u.stream_region.closed().is_some() && u.stream.has_next() {
                    // Apply what was committed before the close first: a refusal is
                    // published right before the close, and its message must not be lost.
                    continue;
                }
                if u.stream_region.closed().is_some() {
                    info!(slot = %control::slot_name(s), "stream closed by the active; re-attaching");
                    if self.control.epoch() != self.epoch
                        || u.stream_region.closed() == Some(CLOSE_DETACHED)
                    {
                        // Planned switchover elsewhere or detach: attach to whoever is active.
                    } else {
                        self.control.set(s, Field::State, State::Stale as u64);
                    }
                    return Ok(Follow::Reattach);
                }
                if u.last_ack.elapsed() > Duration::from_millis(1) {
                    u.last_ack = Instant::now();
                    let p = self.position((state == State::Hot) as u64);
                    let _ =
                        u.feedback
                            .try_publish(rt::ACK, 1, 56, zerocopy::IntoBytes::as_bytes(&p));
                }
                // Backstop: the active's process is gone (or its pid reused), or it hangs.
                if now - last_alive_check > 5_000_000 {
                    last_alive_check = now;
                    if batches != batches_at_check {
                        batches_at_check = batches;
                        last_frame_ns = now;
                    }
                    let ce = self.control.epoch();
                    // A newer epoch: someone else is active now. An older one: we handed over
                    // (planned switchover) and the target has not claimed the epoch yet; if it
                    // died doing so, re-attaching lets us take the state back.
                    if ce > self.epoch || (ce < self.epoch && !active_id.is_alive()) {
                        return Ok(Follow::Reattach);
                    }
                    if ce < self.epoch {
                        continue;
                    }

                    if !active_id.is_alive() {
                        // Second source: the mutex. A live engine thread still holding it is
                        // the active, whatever the slot's pid and start-time words say (a
                        // corrupted word must never make two actives). A dead holder the
                        // kernel did not mark is recovered by the step-up.
                        if let Some(pid) = live_holder(&lock, control.path()) {
                            if !lying_identity_warned {
                                lying_identity_warned = true;
                                warn!(
                                    slot = %control::slot_name(active),
                                    words_pid = active_id.pid,
                                    holder_pid = pid,
                                    "the control block says the active's process is gone, but a live engine thread holds the mutex: not stepping up (the slot's identity words are wrong)"
                                );
                            }
                            continue;
                        }
                        match self.drain(u, &mut state) {
                            Drained::Clean => {}
                            Drained::RoleChange(f) => return Ok(f),
                            Drained::Broken => return Ok(Follow::Reattach),
                        }
                        info!("active process is gone (identity check); stepping up");
                        if self.took_nothing_since_handover(active) {
                            return Ok(Follow::StepUp { planned: false });
                        }
                        if state != State::Hot || u.stream_region.closed().is_some() {
                            return Ok(Follow::Reattach);
                        }
                        return Ok(Follow::StepUp { planned: false });
                    }
                    // Hung: its heartbeat word is old AND the stream has been silent as long (a
                    // live active sends heartbeat frames), AND the thread holding the mutex is
                    // that process's. One stale or flipped word never fences a healthy active.
                    let hb = self.control.get(active, Field::HeartbeatNs);
                    let hung_ns = self.opt.hung_after.as_nanos() as u64;
                    if state == State::Hot
                        && now.saturating_sub(hb) > hung_ns
                        && now.saturating_sub(last_frame_ns) > hung_ns
                        && live_holder(&lock, control.path()) == Some(active_id.pid)
                    {
                        warn!(
                            pid = active_id.pid,
                            "active is hung (heartbeat {} ms old, stream silent {} ms); fencing it with SIGKILL",
                            (now - hb) / 1_000_000,
                            (now - last_frame_ns) / 1_000_000
                        );
                        fence_identity(&active_id);
                    }
                }
            }
            if !got {
                idle_polls = idle_polls.saturating_add(1);
                self.idle_wait(idle_polls);
            }
        }
    }

    /// After the active died: apply every batch it committed. A frame that fails validation
    /// or does not apply means our copy is not the committed state: never step up on it.
    fn drain(&mut self, u: &mut Upstream, state: &mut State) -> Drained {
        loop {
            match u.stream.poll(&mut self.buf) {
                Ok(false) => return Drained::Clean,
                Ok(true) => match self.apply_batch(state) {
                    Ok(None) => {}
                    Ok(Some(f)) => return Drained::RoleChange(f),
                    Err(e) => {
                        error!("a batch the dead active committed does not apply: {e}; not stepping up");
                        *state = State::Stale;
                        return Drained::Broken;
                    }
                },
                Err(e) => {
                    error!("a frame the dead active left is corrupt: {e}; not stepping up");
                    *state = State::Stale;
                    return Drained::Broken;
                }
            }
        }
    }

    /// Apply the batch in `self.buf`. `Ok(Some)` when the batch changes the role.
    fn apply_batch(&mut self, state: &mut State) -> Result<Option<Follow>, EngineError> {
        let s = self.opt.slot;
        let mut frames = std::mem::take(&mut self.buf);
        let r = (|| {
            for f in frames.frames() {
                let bl = f.meta.block_length;
                match f.meta.record_type {
                    rt::PUT_UNIT | rt::RETIRE_UNIT | rt::PUT | rt::DELETE => {
                        let spare = &mut self.tx.spare;
                        let op = protocol::decode_op_into(f.meta.record_type, f.payload, bl, spare)
                            .map_err(|e| EngineError::Other(e.to_string()))?;
                        self.store.apply(&op);
                        self.app.on_apply(&op, &self.store);
                        self.tx.spare.recycle(op);
                    }
                    rt::COMMIT => {
                        let (c, _) = protocol::decode_commit(f.payload, bl)
                            .map_err(|e| EngineError::Other(e.to_string()))?;
                        if *state == State::Hot && c.index != self.commits {
                            return Err(EngineError::Other(format!(
                                "commit out of order: expected transaction {}, found {}",
                                self.commits, c.index
                            )));
                        }
                        self.commits = c.index + 1;
                        if let Some(k) = &self.counters {
                            k.add(Counter::APPLIED_TOTAL, 1);
                            k.set(Counter::TX_INDEX, self.commits);
                        }
                    }
                    rt::HELLO => {
                        let theirs = Hello::decode(f.payload, bl)
                            .map_err(|e| EngineError::Other(e.to_string()))?;
                        let ours = self.hello();
                        let a = negotiate(&ours, &theirs, 0)
                            .map_err(|e| EngineError::Refused(e.to_string()))?;
                        if a.versions_differ {
                            info!(
                                ours = ours.app_version,
                                theirs = theirs.app_version,
                                layout = a.layout_version(),
                                "active runs another version"
                            );
                        }
                        self.agreed_layout = a.layout_version();
                        self.enabled = theirs.enabled;
                        self.write_versions =
                            write_versions(&self.templates, &self.features, self.enabled);
                        self.control
                            .set(s, Field::PeerVersion, theirs.app_version as u64);
                        self.control
                            .set(s, Field::Layout, self.agreed_layout as u64);
                        self.control.set(s, Field::Features, self.enabled);
                        self.control.set(s, Field::Enableable, a.enableable);
                    }
                    rt::BASE => {
                        let p: Position =
                            decode(f.payload, bl).map_err(|e| EngineError::Other(e.to_string()))?;
                        if p.digest != self.store.digest() || p.commits != self.commits {
                            return Err(EngineError::Other(format!(
                                "base position differs: active at {} commits digest {:#x}, standby at {} digest {:#x}",
                                p.commits, p.digest, self.commits, self.store.digest()
                            )));
                        }
                        *state = State::Hot;
                        self.control.set(s, Field::State, State::Hot as u64);
                        info!(slot = %control::slot_name(s), commits = p.commits, "hot (no catch-up needed)");
                    }
                    rt::SNAP_BEGIN => {
                        let p: Position =
                            decode(f.payload, bl).map_err(|e| EngineError::Other(e.to_string()))?;
                        self.store.clear();
                        self.commits = p.commits;
                        *state = State::Syncing;
                        self.control.set(s, Field::State, State::Syncing as u64);
                        info!(slot = %control::slot_name(s), units = p.units, "catch-up begins");
                    }
                    rt::SNAP_END => {
                        let p: Position =
                            decode(f.payload, bl).map_err(|e| EngineError::Other(e.to_string()))?;
                        if p.digest != self.store.digest() || p.commits != self.commits {
                            return Err(EngineError::Other(format!(
                                "catch-up ended with a different state: active {} commits digest {:#x}, standby {} digest {:#x}",
                                p.commits, p.digest, self.commits, self.store.digest()
                            )));
                        }
                        self.app.on_reset(&self.store);
                        *state = State::Hot;
                        self.control.set(s, Field::State, State::Hot as u64);
                        info!(slot = %control::slot_name(s), units = p.units, "hot (caught up)");
                        if let Some(k) = &self.counters {
                            k.add(Counter::CATCHUPS_TOTAL, 1);
                        }
                    }
                    rt::FEATURES => {
                        let fb: FeaturesBlock =
                            decode(f.payload, bl).map_err(|e| EngineError::Other(e.to_string()))?;
                        self.enabled = fb.enabled;
                        self.write_versions =
                            write_versions(&self.templates, &self.features, self.enabled);
                        self.control.set(s, Field::Features, self.enabled);
                        info!(enabled = fb.enabled, "features switched");
                    }
                    rt::HEARTBEAT => {}
                    rt::STEP_UP => {
                        let p: Position =
                            decode(f.payload, bl).map_err(|e| EngineError::Other(e.to_string()))?;
                        if p.digest != self.store.digest() || p.commits != self.commits {
                            warn!("step-up description differs: active {} commits digest {:#x}, standby {} digest {:#x}; stepping up, the old active will catch up", p.commits, p.digest, self.commits, self.store.digest());
                        }
                        return Ok(Some(Follow::StepUp { planned: true }));
                    }
                    t if t == rt::REFUSE => {
                        return Err(EngineError::Refused(
                            String::from_utf8_lossy(f.payload).into_owned(),
                        ));
                    }
                    other => {
                        return Err(EngineError::Other(format!(
                            "unknown record type {other} in the stream"
                        )));
                    }
                }
            }
            Ok(None)
        })();
        self.buf = std::mem::take(&mut frames);
        r
    }

    /// We handed the active role to `active` in a planned switchover, it claimed the epoch and
    /// died before committing any transaction (it marks its slot before its first commit):
    /// our state is still the cluster's, so we may step up although we never became hot.
    fn took_nothing_since_handover(&self, active: usize) -> bool {
        matches!(self.handed_over, Some((_, target, commits, digest))
            if target == active && commits == self.commits && digest == self.store.digest())
            && self.control.get(active, Field::Served) == 0
            && self.control.epoch() == self.epoch
    }

    /// Take over: lock the mutex, claim the next epoch. False if another engine won.
    fn step_up(&mut self, planned: bool) -> bool {
        let t0 = Instant::now();
        // Pre-opened regions are the handing-over active's: only a planned step-up uses them.
        // After a crash its slot is restarted and recreates files at the same paths.
        if !planned {
            self.preopened = None;
        }
        let lock = self.control.lock();
        // A planned switchover: the old active releases the mutex right after the step-up
        // frame; a crash: the mutex is owner-died and try_lock recovers it at once. A holder
        // that died without the kernel marking the word (its memory unmapped before its thread
        // exited) is recovered once its thread is provably gone; that check reads /proc, so it
        // runs once a millisecond, never in the first one (a planned handover's unlock).
        let mut next_gone_check = Duration::from_millis(1);
        loop {
            let outcome = if t0.elapsed() >= next_gone_check {
                next_gone_check = t0.elapsed() + Duration::from_millis(1);
                try_lock_recovering(&lock, self.control.path())
            } else {
                lock.try_lock()
            };
            match outcome {
                Ok(TryLockOutcome::Acquired) | Ok(TryLockOutcome::OwnerDied) => break,
                Ok(TryLockOutcome::WouldBlock) => {
                    if self.control.epoch() != self.epoch {
                        warn!("another engine claimed the epoch first");
                        return false;
                    }
                    // After a crash the mutex is owner-died at once (or recovered above once
                    // its holder thread is gone), so a mutex that stays held by a live thread
                    // means a live engine holds it: another engine stepping up, or the active
                    // itself, alive although its slot's words said otherwise (a corrupted pid
                    // or start time). Either way we must not step up. In a planned switchover
                    // the old active releases it right after the step-up frame, but it may be
                    // descheduled for a while in between: giving up then would leave both
                    // engines standby. Wait while nobody else claims the epoch; a hung old
                    // active is fenced (SIGKILL) and its mutex becomes owner-died.
                    if !planned && t0.elapsed() > Duration::from_millis(500) {
                        warn!(
                            holder_tid = lock.holder_tid(),
                            "the mutex stays held by a live thread: another engine holds the active role; not stepping up"
                        );
                        return false;
                    }
                    if planned && t0.elapsed() > Duration::from_millis(1) {
                        let now = monotonic_ns();
                        self.control.set(self.opt.slot, Field::HeartbeatNs, now);
                        if t0.elapsed() > self.opt.hung_after {
                            self.fence_hung_holder(now);
                        }
                    }
                    std::hint::spin_loop();
                }
                Err(e) => {
                    error!("robust mutex: {e}");
                    return false;
                }
            }
        }
        let e = self.epoch;
        match self.control.claim_epoch(e, self.opt.slot) {
            Some(ne) => {
                self.epoch = ne;
                #[cfg(feature = "fault-injection")]
                if planned && std::env::var_os("UNDERSTUDY_TEST_ABORT_AFTER_STEP_UP").is_some() {
                    // Test hook (cargo feature `fault-injection` only): die in the worst spot of
                    // a switchover (epoch claimed, mutex held, nothing served, the old active
                    // not yet re-attached).
                    eprintln!("test hook: aborting right after a planned step-up");
                    std::process::abort();
                }
                self.mark_step_up(t0, planned);
                true
            }
            None => {
                let _ = lock.unlock();
                false
            }
        }
    }

    /// Planned step-up, the old active still holding the mutex after our hung threshold: if
    /// its heartbeat is that old too and it is still the process in its slot, fence it.
    fn fence_hung_holder(&self, now: u64) {
        let Some(a) = self.control.active_slot().filter(|&a| a != self.opt.slot) else {
            return;
        };
        let hb = self.control.get(a, Field::HeartbeatNs);
        if now.saturating_sub(hb) <= self.opt.hung_after.as_nanos() as u64 || !self.slot_alive(a) {
            return;
        }
        let id = ProcessIdentity {
            pid: self.control.get(a, Field::Pid).min(u32::MAX as u64) as u32,
            start_time_ticks: self.control.get(a, Field::StartTime),
        };
        // Second source: the thread holding the mutex must be that process's.
        let lock = self.control.lock();
        if live_holder(&lock, self.control.path()) != Some(id.pid) {
            return;
        }
        warn!(
            pid = id.pid,
            "the old active holds the mutex and is hung (heartbeat {} ms old); fencing it with SIGKILL",
            (now - hb) / 1_000_000
        );
        fence_identity(&id);
    }

    fn mark_step_up(&mut self, t0: Instant, planned: bool) {
        let s = self.opt.slot;
        let c = &self.control;
        c.set(s, Field::StepUps, c.get(s, Field::StepUps).wrapping_add(1));
        c.set(s, Field::LastStepUpNs, realtime_ns());
        c.set(s, Field::LastStepUpDurNs, t0.elapsed().as_nanos() as u64);
        if let Some(k) = &self.counters {
            k.add(Counter::STEP_UPS_TOTAL, 1);
            k.set(Counter::LAST_STEP_UP_NS, t0.elapsed().as_nanos() as u64);
        }
        c.set(s, Field::StepUpCommits, self.commits);
        c.set(s, Field::Served, 0);
        self.served = false;
        self.handed_over = None;
        c.set(s, Field::StepUpDigest, self.store.digest());
        self.takeover = if planned {
            crate::app::Takeover::Planned
        } else {
            crate::app::Takeover::Failover
        };
        self.publish_status(Role::Active, State::Serving);
        info!(slot = %control::slot_name(s), epoch = self.epoch, planned, took_us = t0.elapsed().as_micros() as u64, "stepped up; now active");
        // Attach the old active at once if it pre-created its stream (planned switchover),
        // before the first transaction, so it needs no catch-up.
        self.attach_new_replicas();
        self.preopened = None;
        for _ in 0..3 {
            self.service_replicas();
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

impl<A: Application, I: Input> Engine<A, I> {
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

/// Request service times in power-of-two buckets (no allocation, a few ns per request).
struct ServiceTimes {
    buckets: [u32; 64],
    count: u32,
}

impl Default for ServiceTimes {
    fn default() -> Self {
        ServiceTimes {
            buckets: [0; 64],
            count: 0,
        }
    }
}

impl ServiceTimes {
    /// Requests a window needs before its p99 is published early.
    const MIN_SAMPLES: u32 = 1000;
    /// One request in this many is timed.
    const SAMPLE_EVERY: u64 = 4;

    fn record(&mut self, ns: u64) {
        let b = 64 - ns.max(1).leading_zeros() as usize;
        self.buckets[b.min(63)] = self.buckets[b.min(63)].saturating_add(1);
        self.count = self.count.saturating_add(1);
    }

    /// The upper bound of the bucket holding the 99th percentile; 0 with no samples.
    fn p99_and_reset(&mut self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = self.count - self.count / 100;
        let mut seen = 0u32;
        let mut p99 = 0u64;
        for (b, n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= target {
                p99 = if b >= 63 { u64::MAX } else { 1u64 << b };
                break;
            }
        }
        *self = ServiceTimes::default();
        p99
    }
}

/// Why a planned switchover did not start (the active stays active).
#[derive(Debug)]
enum SwitchoverRefused {
    NoRoom,
    Failed(EngineError),
}

impl fmt::Display for SwitchoverRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverRefused::NoRoom => {
                f.write_str("no room in the target's stream for the step-up frame")
            }
            SwitchoverRefused::Failed(e) => write!(f, "cannot create the next epoch's stream: {e}"),
        }
    }
}

enum Next {
    Stop,
    Active,
    Standby(Option<Box<Upstream>>),
}

enum Drained {
    Clean,
    RoleChange(Follow),
    Broken,
}

enum Attach {
    Attached(Box<Upstream>),
    BecomeActive,
    Stop,
}

enum Follow {
    Reattach,
    StepUp { planned: bool },
    Stop,
}

/// What a transaction is built in, kept from one transaction to the next: with the store
/// handing back the buffers it lets go of ([`Spare`]), a running engine's transactions
/// allocate nothing in steady state.
#[derive(Debug, Default)]
#[doc(hidden)]
pub struct TxBuffers {
    /// The transaction's changes, the input position record last.
    pub ops: Vec<Op>,
    /// Its response.
    pub response: Vec<u8>,
    /// Buffers for the next transactions' changes.
    pub spare: Spare,
}

impl TxBuffers {
    /// Empty buffers.
    pub fn new() -> TxBuffers {
        TxBuffers {
            ops: Vec::with_capacity(64),
            response: Vec::with_capacity(256),
            spare: Spare::new(),
        }
    }

    /// Drop the changes (keeping their buffers) and the response.
    pub fn clear(&mut self) {
        for op in self.ops.drain(..) {
            self.spare.recycle(op);
        }
        self.response.clear();
    }

    /// Move the transaction's changes into `store` (once they are on every standby's
    /// stream); the buffers this frees are kept for the next transactions.
    pub fn apply_to(&mut self, store: &mut Store) {
        for op in self.ops.drain(..) {
            store.apply_owned(op, &mut self.spare);
        }
    }
}

/// Run the application's handler for one request against `store`, leaving the transaction's
/// changes in `tx.ops` (the input position record included) and its response in
/// `tx.response`; true if the handler refused the request. The store is not changed. Engines
/// and test models share this, so both compute the same state.
#[doc(hidden)]
pub fn execute<A: Application>(
    app: &mut A,
    store: &Store,
    tx: &mut TxBuffers,
    enabled: u64,
    write_versions: &[(u16, u16)],
    meta: &InputMeta,
    request: &[u8],
) -> bool {
    tx.clear();
    let TxBuffers {
        ops,
        response,
        spare,
    } = tx;
    let mut t = Tx {
        store,
        ops,
        spare,
        response,
        enabled,
        write_versions,
    };
    let refused = if let Err(Refused(bytes)) = app.handle(&mut t, request) {
        tx.clear();
        tx.response.extend_from_slice(&bytes);
        true
    } else {
        false
    };
    let key = tx.spare.copy_of(&meta.source.to_le_bytes());
    let mut value = tx.spare.copy_of(&[]);
    SourcePosition::encode(meta, &tx.response, &mut value);
    tx.ops.push(Op::Put {
        table: SYS_INPUTS,
        key,
        value,
    });
    refused
}

/// Run one request on a local store and apply it (a model of what an engine does, for tests
/// and benchmarks); returns the response.
#[doc(hidden)]
pub fn execute_local<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> Vec<u8> {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    tx.apply_to(store);
    tx.response
}

/// [`execute_local`], also returning the transaction's changes exactly as an engine streams
/// them to its standbys (the input-position record last): what tests and benchmarks replay
/// on a standby, or inspect to check what a request writes.
#[doc(hidden)]
pub fn execute_local_ops<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> (Vec<u8>, Vec<Op>) {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    let ops = tx.ops.clone();
    tx.apply_to(store);
    (tx.response, ops)
}

/// The commit record of transaction `index`, which consumed the request `meta` describes.
#[doc(hidden)]
pub fn commit_block(index: u64, meta: &InputMeta) -> CommitBlock {
    CommitBlock {
        index,
        input_pos: meta.next_pos,
        input_seq: meta.next_seq,
        source: meta.source,
        request_seq: meta.request_seq,
        response_len: 0,
        flags: 0,
    }
}

/// Push one transaction (its ops, then the commit) as one batch: what the active writes to
/// each standby's stream per transaction (public for the replication benchmark).
#[doc(hidden)]
pub fn push_tx(
    stream: &mut Producer<RegionMemory>,
    ops: &[Op],
    commit: &CommitBlock,
    scratch: &mut Vec<u8>,
) -> Result<(), PushError> {
    let mut b = stream.batch();
    for op in ops {
        let (t, bl) = protocol::encode_op(op, scratch);
        b.push(t, 1, bl, scratch)?;
    }
    b.push(rt::COMMIT, 1, 48, zerocopy::IntoBytes::as_bytes(commit))?;
    b.commit();
    Ok(())
}

/// SIGKILL a hung engine: its robust mutex becomes owner-died and its standby steps up. The
/// caller checked its identity (pid + start time, so a reused pid is very unlikely).
/// Whether to put off deciding command `seq` (its target may still be confirming it is hot):
/// yes until `bound` has passed since this command was first seen. A command first seen under
/// another sequence number (a command that a failover or a newer request superseded, left
/// over in `seen`) starts its own clock: it must never inherit an older command's, which
/// refused a new switchover as "not hot" at once.
fn defer_decision(
    seen: &mut Option<(u64, Instant)>,
    seq: u64,
    bound: Duration,
    now: Instant,
) -> bool {
    match *seen {
        Some((s, first)) if s == seq => {
            if now.saturating_duration_since(first) < bound {
                return true;
            }
            *seen = None;
            false
        }
        _ => {
            *seen = Some((seq, now));
            true
        }
    }
}

/// `try_lock`, recovering a mutex whose holder thread is provably gone although the word was
/// never marked owner-died (see [`RobustLock::recover_dead_holder`]).
///
/// Never two actives: an engine is active only while its engine thread holds this mutex and
/// its epoch is the control block's (claimed by compare-and-swap after locking). The mutex
/// changes hands only (a) by the holder's unlock (a planned handover, after its step-up frame),
/// (b) by the kernel marking it owner-died when the holder thread exits, or (c) here, when
/// `/proc` proves that the thread named in the word no longer exists (or is an exited
/// process leader). The active's serving loop runs on the thread that locked, so in all three
/// cases the previous holder can no longer serve; a live holder — whatever the control
/// block's other words say about its process — is never taken over. The compare-and-swap in
/// the recovery acts only on the exact word that named the dead thread, and the epoch CAS
/// after locking lets one engine win even if two recover at once.
fn try_lock_recovering(
    lock: &control::ControlLock<'_>,
    control_path: &std::path::Path,
) -> Result<TryLockOutcome, LockError> {
    match lock.try_lock()? {
        TryLockOutcome::WouldBlock => {
            let Some(tid) = lock.holder_tid() else {
                return Ok(TryLockOutcome::WouldBlock);
            };
            if holder_is_gone(tid, control_path) && lock.recover_dead_holder(tid) {
                warn!(
                    tid,
                    "the robust mutex named a thread that is gone, never marked owner-died (its \
                     process unmapped the control block before exiting); recovered it"
                );
            }
            lock.try_lock()
        }
        o => Ok(o),
    }
}

/// The thread `tid` named in the robust mutex can no longer hold the active role: it does not
/// exist (or is an exited process leader), or its id now belongs to a process that does not
/// map this cluster's control block (every engine keeps it mapped while it may hold the
/// mutex), i.e. the dead holder's id was reused by an unrelated thread.
fn holder_is_gone(tid: u32, control_path: &std::path::Path) -> bool {
    if liveness::thread_is_gone(tid) {
        return true;
    }
    match liveness::thread_group_of(tid) {
        Some(pid) => liveness::process_maps_file(pid, control_path) == Some(false),
        None => liveness::thread_is_gone(tid),
    }
}

/// The live process whose thread holds the robust mutex, if the word names one that maps
/// this cluster's control block: the active as the kernel and glibc see it, whatever the
/// control block's pid and start-time words say.
fn live_holder(lock: &control::ControlLock<'_>, control_path: &std::path::Path) -> Option<u32> {
    let tid = lock.holder_tid()?;
    let pid = liveness::thread_group_of(tid)?;
    (liveness::process_maps_file(pid, control_path) == Some(true)).then_some(pid)
}

/// SIGKILL exactly the process `id` names (through a pidfd, so a pid reused since cannot be
/// hit), never this process. False if it is not that process any more, or not ours to signal.
fn fence_identity(id: &ProcessIdentity) -> bool {
    if id.pid == std::process::id() || id.pid < 2 {
        return false;
    }
    match liveness::Pidfd::open_identity(id) {
        Ok(fd) => fd.send_signal(libc::SIGKILL).is_ok(),
        Err(_) => false,
    }
}

/// Installs (once per process) a panic hook that prints the panic as Rust's default hook does,
/// then aborts: see [`OnPanic::Abort`].
fn install_abort_on_panic() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            error!(
                "panic: {info}; aborting the engine process (a failover: the standby takes over)"
            );
            std::process::abort();
        }));
    });
}

/// The handlers [`install_fatal_sent_fault_signals`] replaced: SIGSEGV's, then SIGBUS's.
static REPLACED_FAULT_HANDLERS: [std::sync::atomic::AtomicPtr<libc::sigaction>; 2] = [
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
];

/// Makes a SIGSEGV or SIGBUS sent with kill(2) end the process, as it ends any C program.
///
/// Rust's runtime handles both signals itself, to report a stack overflow: for any other
/// fault its handler restores the default action and returns, so a real fault re-executes
/// and kills the process — but a signal sent from outside is then swallowed once, and the
/// first `kill -SEGV` of an engine did nothing (`tests/deaths.rs` `*_sigsegv_sent`). This
/// installs (once per process) a handler that kills the process with the default action for
/// a sent signal (`si_code <= 0`: `SI_USER`, `SI_QUEUE`, `SI_TKILL`) and passes a real fault
/// to the handler it replaced (Rust's guard-page check), or to the default action.
fn install_fatal_sent_fault_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (i, sig) in [libc::SIGSEGV, libc::SIGBUS].into_iter().enumerate() {
            // SAFETY: sigaction with valid, initialised structs (all-zero is a valid
            // `sigaction`: no flags, empty mask); the handler is async-signal-safe (it reads
            // the siginfo, an atomic pointer, and calls sigaction/raise or the replaced
            // handler, which the runtime installed for exactly this signal).
            unsafe {
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_fault_signal as *const () as libc::sighandler_t;
                new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut new.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &new, &mut old) == 0 {
                    REPLACED_FAULT_HANDLERS[i].store(
                        Box::into_raw(Box::new(old)),
                        std::sync::atomic::Ordering::Release,
                    );
                }
            }
        }
    });
}

extern "C" fn on_fault_signal(
    sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    let i = usize::from(sig != libc::SIGSEGV);
    let replaced = REPLACED_FAULT_HANDLERS[i].load(std::sync::atomic::Ordering::Acquire);
    let code = if info.is_null() {
        0
    } else {
        // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
        unsafe { (*info).si_code }
    };
    if code > 0 && !replaced.is_null() {
        // SAFETY: set once before this handler could run, never freed.
        let old = unsafe { &*replaced };
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature; we pass what we got.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    // Sent from outside (or nothing to pass a fault to): the default action, now. A real
    // fault re-executes on return and dies of it; a sent one is raised again, pending while
    // this handler runs (the signal is blocked in it) and fatal once it returns.
    // SAFETY: sigaction and raise are async-signal-safe; the struct is valid (all-zero is
    // SIG_DFL with no flags and an empty mask).
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        if code <= 0 {
            libc::raise(sig);
        }
    }
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

/// Push with the back-pressure policy: while `push` finds the ring full, wait as long as the
/// standby keeps consuming; give up (false) when it consumed nothing for the policy's bound,
/// at once under `Untether`, or on any other error.
fn push_waiting(
    stream: &mut Producer<RegionMemory>,
    policy: Backpressure,
    mut push: impl FnMut(&mut Producer<RegionMemory>) -> Result<(), PushError>,
) -> bool {
    let max = match policy {
        Backpressure::Wait(d) => d,
        Backpressure::Untether => Duration::ZERO,
    };
    let mut started = Instant::now();
    let mut seen_tail = stream.consumer_position();
    let mut waited = false;
    loop {
        match push(stream) {
            Ok(()) => return true,
            Err(PushError::Full { .. }) => {
                if !waited {
                    waited = true;
                    crate::counters::note_backpressure_wait();
                }
                let tail = stream.consumer_position();
                if tail != seen_tail {
                    seen_tail = tail;
                    started = Instant::now();
                } else if started.elapsed() >= max {
                    return false;
                }
                std::hint::spin_loop();
            }
            Err(e) => {
                error!("cannot write to a standby's stream: {e}");
                return false;
            }
        }
    }
}

/// One catch-up step for replica `r`: a chunk of the snapshot, then `SnapEnd` once complete.
fn catch_up_step(
    r: &mut Replica,
    store: &Store,
    commits: u64,
    epoch: u64,
    chunk: usize,
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let ReplicaPhase::Streaming(Some(snap)) = &mut r.phase else {
        return Ok(());
    };
    let done = send_chunk(&mut r.stream, store, snap, chunk, scratch)
        .map_err(|e| format!("catch-up: {e}"))?;
    if done {
        let pos = position_of(store, commits, epoch, 0);
        match r
            .stream
            .try_publish(rt::SNAP_END, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
        {
            Ok(()) => r.phase = ReplicaPhase::Streaming(None),
            Err(PushError::Full { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Send one catch-up chunk; true when the snapshot is complete.
fn send_chunk(
    stream: &mut Producer<RegionMemory>,
    store: &Store,
    snap: &mut Snapshot,
    chunk: usize,
    scratch: &mut Vec<u8>,
) -> Result<bool, PushError> {
    let mut b = stream.batch();
    let mut n = 0;
    if !snap.units_done {
        let mut last = snap.units_after;
        let mut full = false;
        for (id, u) in store.units_after(snap.units_after, chunk) {
            let (t, bl) =
                protocol::encode_put_unit(id, u.kind, u.layout_version, &u.state, scratch);
            match b.push(t, 1, bl, scratch) {
                Ok(()) => {}
                Err(PushError::Full { .. }) => {
                    full = true;
                    break;
                }
                // The chunk so far plus this item would not fit even an empty ring: commit what
                // we have, the item goes first in the next chunk.
                Err(PushError::TooLarge { .. }) if n > 0 => {
                    full = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            last = Some(id);
            n += 1;
        }
        if !full && n < chunk {
            snap.units_done = true;
        }
        snap.units_after = last;
        if n > 0 {
            b.commit();
        }
        return Ok(false);
    }
    let mut last = snap.records_after.clone();
    let mut done = true;
    for (table, key, value) in store.records_after(snap.records_after.as_ref(), chunk) {
        let (t, bl) = protocol::encode_put(table, key, value, scratch);
        match b.push(t, 1, bl, scratch) {
            Ok(()) => {}
            Err(PushError::Full { .. }) => {
                done = false;
                break;
            }
            Err(PushError::TooLarge { .. }) if n > 0 => {
                done = false;
                break;
            }
            Err(e) => return Err(e),
        }
        last = Some((table, key.to_vec()));
        n += 1;
    }
    if n == chunk {
        done = false;
    }
    snap.records_after = last;
    if n > 0 {
        b.commit();
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::{defer_decision, ServiceTimes};
    use std::time::{Duration, Instant};

    /// A switchover left over from a superseded command does not make the next one refused at
    /// once as "not hot": each sequence number is deferred on its own clock.
    #[test]
    fn a_command_left_over_from_a_superseded_one_gets_its_own_deferral() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(1);
        let mut seen = None;
        // Command 7 is deferred, then decided once its bound has passed.
        assert!(defer_decision(&mut seen, 7, bound, t0));
        assert!(defer_decision(
            &mut seen,
            7,
            bound,
            t0 + Duration::from_millis(500)
        ));
        assert!(!defer_decision(
            &mut seen,
            7,
            bound,
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(seen, None);
        // Command 8 was seen, then superseded (a failover) before being decided: command 9,
        // much later, is deferred on its own clock, not refused on 8's.
        assert!(defer_decision(&mut seen, 8, bound, t0));
        let later = t0 + Duration::from_secs(30);
        assert!(defer_decision(&mut seen, 9, bound, later));
        assert!(defer_decision(
            &mut seen,
            9,
            bound,
            later + Duration::from_millis(900)
        ));
        assert!(!defer_decision(
            &mut seen,
            9,
            bound,
            later + Duration::from_secs(1)
        ));
    }

    /// One long preemption among a full window does not move the p99; the window resets.
    #[test]
    fn service_p99_of_a_full_window_ignores_one_outlier() {
        let mut t = ServiceTimes::default();
        for _ in 0..ServiceTimes::MIN_SAMPLES - 1 {
            t.record(900);
        }
        t.record(16_000_000);
        assert_eq!(t.p99_and_reset(), 1024);
        assert_eq!(t.p99_and_reset(), 0, "reset");
        t.record(900);
        t.record(16_000_000);
        assert!(
            t.p99_and_reset() >= 16_000_000,
            "two samples: the p99 is the maximum"
        );
    }
}
