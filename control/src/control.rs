//! The control block: one small file per cluster (`<dir>/control`) that outlives engines and
//! the supervisor. It holds the epoch (bumped by compare-and-swap at every role change, so two
//! engines can never both be active in one epoch), the active slot, the cluster's state (up or
//! down), the robust mutex the active holds, a command mailbox, and one record per engine slot
//! (identity, version, role, state, positions, heartbeat, step-up statistics).
//!
//! Everything in it is read through atomics and treated as untrusted (values are range-checked
//! where they select anything).
//!
//! # Verified, not trusted
//!
//! The words that destructive decisions depend on — the epoch, the active slot, the cluster
//! state and each slot's pid, start time, role, state and epoch ([`Word`]) — are stored twice:
//! a *primary* word holding the value (48 bits) with a CRC-16 of the value and the word's
//! index in its top 16 bits, and a *mirror* word elsewhere in the file holding the bitwise
//! complement of the primary. Each copy is checked on its own (one 64-bit store, so a reader
//! never sees a torn copy); the CRC detects every flip of one or two bits, and a word copied
//! to the wrong place. [`Control::get`], [`Control::epoch`] and [`Control::active_slot`]
//! read the primary and fall back to the mirror when the primary fails its check, so a flipped
//! bit changes no decision; [`Control::verify`] names every damaged copy
//! ([`Corruption`]); [`Control::repair`] rewrites a damaged copy from the intact one, and
//! [`Control::repair_own`] lets a live engine rewrite its own slot (and, while it is active,
//! the epoch and the active slot) from its own view when both copies are lost.
//!
//! ```no_run
//! use understudy_control::control::{Control, Field};
//! let control = Control::open("/dev/shm/understudy/demo".as_ref()).unwrap();
//! for damage in control.verify() {
//!     eprintln!("{damage}"); // e.g. "control block word `slot a pid`: primary copy ..."
//! }
//! // A decision taken on a word that has no intact copy left is refused, with the word named.
//! match control.get_checked(0, Field::Pid) {
//!     Ok(pid) => println!("slot a: pid {pid}"),
//!     Err(damage) => eprintln!("not deciding on slot a: {damage}"),
//! }
//! ```
//!
//! # Who writes what, who reads it, and what the ordering publishes
//!
//! Every word is an atomic: [`Control::set`] stores with Release, [`Control::get`] loads with
//! Acquire. Most fields are a value on their own (a statistic, a state): a reader may see one
//! field newer than another and nothing depends on more than the value. The pairs that
//! *carry data* — a Release store that makes other words visible to the Acquire load that
//! sees it — are named `SYNC POINT: <name>` at both ends, as the ring does.
//!
//! Global words:
//!
//! | word | written by | read by | ordering: what it publishes |
//! |---|---|---|---|
//! | magic, version, ready | the creator ([`Control::open_or_create`]): ready last | every opener ([`Control::open`]) | SYNC POINT *control published*: ready (Release/Acquire) publishes magic, version, every checked word and the robust mutex's initialisation |
//! | epoch, active slot (checked) | the engine that becomes active ([`Control::claim_epoch`], a CAS), then the active slot | engines, supervisor, clients ([`Control::epoch`], [`Control::active_slot`]) | SYNC POINT *epoch claimed*: the CAS (AcqRel) is the decision; two claimers cannot both win |
//! | cluster state (checked) | `understudy down` (down); a claimer of an epoch (up) | clients, engines | value only |
//! | robust mutex (words 8..13) | the active's writing thread (lock, held for its life) | standbys ([`crate::liveness::DeathWatch`]), supervisor | the kernel's futex protocol: owner-died is set by the kernel |
//! | command, argument, sequence | supervisor ([`Control::post_command`]): command and argument (Relaxed), then the sequence (Release) | the active ([`Control::pending_command`]) | SYNC POINT *command posted*: the sequence publishes the command and its argument |
//! | ack, result | the active ([`Control::ack`]): result (Relaxed), then ack (Release) | supervisor ([`Control::acked_result`]) | SYNC POINT *command answered*: the ack publishes the result |
//! | supervisor pid, start time | a supervisor ([`Control::claim_supervisor`]): pid marked claiming (CAS), start time (Relaxed), pid (Release) | supervisors, `doctor` ([`Control::supervisor`]) | SYNC POINT *supervisor claimed*: the pid publishes its start time |
//! | client entry: id, pid, start time, close word | the client ([`Control::claim_client`]): reserve (CAS), pid and start time (Relaxed), id (Release) | the active ([`Control::client`]) | SYNC POINT *client registered*: the id publishes the pid and start time |
//! | client close word | the active ([`Control::refuse_client`]) | the client ([`Control::client_refused`]) | value only |
//!
//! Slot fields ([`Field`]), each written only by the engine in that slot unless named:
//!
//! | field | written by | read by | ordering: what it publishes |
//! |---|---|---|---|
//! | pid (checked) | the engine: 0 first when it starts, its pid last | supervisor (adoption, fencing), engines (peer liveness), clients | SYNC POINT *slot registered*: the pid publishes start time, app version, app hash and the reset fields written before it (`Engine::new`) |
//! | start time (checked), app version, app hash | the engine, before its pid | as pid; the active (version negotiation), supervisor (probe) | published by pid |
//! | role, state, epoch (checked) | the engine at each role change | supervisor, peers, clients | value each; a decision checks all three (a hot standby is `standby` + `hot` in the current epoch) |
//! | layout, features, enableable | the engine (attach, enable, the feature frame applied) | supervisor (`enable-features`, probe, status) | value only |
//! | commits, digest, requests, refusals, lag, service p99, error | the engine | supervisor (status, acceptance) | value only (statistics) |
//! | heartbeat | the engine, every few ms | supervisor (hung, fence), the standby (its active's) | value only |
//! | step-ups, last step-up time and duration, step-up commits and digest | the engine stepping up, before it publishes role and state | supervisor (status, role changes, `promote`), tests | value only; read once the role shows active |
//! | attach generation | a standby at every attach, after creating its regions | the active (opens `stream-<epoch>-<slot>-<gen>`) | value only: the regions are files, whose creation the kernel orders |
//! | peer version | the active (the first standby's version) | no reader in this workspace (for debugging) | value only |
//! | served | the active: 1 before its first commit enters a stream; 0 at step-up and attach | a handed-over old active (`took_nothing_since_handover`) | SYNC POINT *first commit of this role*: seen 0 with the stream empty, the new active has committed nothing |
//! | command ([`SlotCommand`]) | supervisor ([`Control::post_slot_command`]); taken by the engine, or withdrawn by the supervisor ([`Control::take_slot_command`], a CAS: exactly one side gets it) | the engine | SYNC POINT *slot command posted*: the post (Release) publishes the cleared refusal; the take (AcqRel) orders the engine's refusal after it |
//! | command refusal | the engine that took the slot command ([`Control::refuse_slot_command`]) | supervisor ([`Control::slot_refusal`]) | value only |
//!
//! Words 9 and 22 of a slot record are retired (fields no engine ever wrote), left zero.

use crate::liveness::{
    LockError, LockOutcome, LockWord, ProcStat, ProcessIdentity, RobustLock, TryLockOutcome,
};
use crate::result::CommandResult;
use memmap2::{MmapOptions, MmapRaw};
use shm_layout::memory::{MappedWords, WordMemory};
use shm_layout::{AtomicU64, Ordering};
use std::fs::OpenOptions;
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// `USTDYCTL`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"USTDYCTL");
/// Layout version of the control file (2: checked and mirrored decision words, cluster state).
pub const VERSION: u64 = 2;
const READY: u64 = u64::from_le_bytes(*b"CTLREADY");
/// Size of the control file.
pub const FILE_BYTES: usize = 4096;
/// Engine slots: `a`, `b` and the transient `c` of a keep-standby upgrade.
pub const SLOTS: usize = 3;
/// No slot.
pub const NO_SLOT: u64 = u64::MAX;
/// The largest value a checked word ([`Word`]) holds: 48 bits (the top 16 are its check).
pub const CHECKED_MAX: u64 = (1 << 48) - 1;

const W_MAGIC: usize = 0;
const W_VERSION: usize = 1;
const W_EPOCH: usize = 2;
const W_ACTIVE: usize = 3;
const W_READY: usize = 4;
const W_EPOCH_MIRROR: usize = 5;
const W_ACTIVE_MIRROR: usize = 6;
/// The robust mutex: bytes 64..104 (words 8..13).
const LOCK_OFFSET: usize = 64;
const W_CMD: usize = 16;
const W_CMD_ARG: usize = 17;
const W_CMD_SEQ: usize = 18;
const W_CMD_ACK: usize = 19;
const W_CMD_RESULT: usize = 20;
const W_CLUSTER: usize = 22;
const W_CLUSTER_MIRROR: usize = 23;
/// The supervisor's pid (bit 63: a claim in progress) and start time
/// ([`Control::claim_supervisor`]).
const W_SUPERVISOR: usize = 24;
const W_SUPERVISOR_START: usize = 25;
/// Bit 63 of the supervisor's pid word: claimed, start time not written yet.
const SUPERVISOR_CLAIMING: u64 = 1 << 63;
const SLOT_BASE: usize = 64;
const SLOT_WORDS: usize = 32;
/// Mirrors of the checked slot fields: 8 words per slot after the slot records.
const MIRROR_BASE: usize = SLOT_BASE + SLOTS * SLOT_WORDS;
const MIRROR_WORDS: usize = 8;
/// The client registry: `MAX_CLIENTS` entries of 4 words (id, pid, start time, flags).
const CLIENT_BASE: usize = 256;
const CLIENT_WORDS: usize = 4;
/// Clients a cluster accepts at once.
pub const MAX_CLIENTS: usize = 64;
const _: () = assert!(CLIENT_BASE * 8 + MAX_CLIENTS * CLIENT_WORDS * 8 <= FILE_BYTES);
const _: () = assert!(MIRROR_BASE + SLOTS * MIRROR_WORDS <= CLIENT_BASE);
const _: () = assert!(CHECKED_FIELDS.len() <= MIRROR_WORDS);
// The mutex (40 bytes on x86_64 and aarch64 glibc) ends before the command mailbox.
const _: () = assert!(LOCK_OFFSET + RobustLock::SIZE <= W_CMD * 8);
const _: () = assert!(LOCK_OFFSET >= (W_ACTIVE_MIRROR + 1) * 8);

/// Fields of a slot record (word index within the record). Who writes and reads each, and
/// what its ordering publishes: the table in the [module docs](self).
///
/// Words 9 and 22 held fields no engine ever wrote (an input position, a switchover pause):
/// retired, left zero, never reused, so that every other field keeps its offset for engines
/// of older versions sharing the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Field {
    /// Process id (0 = empty slot).
    Pid = 0,
    /// Process start time (ticks).
    StartTime = 1,
    /// Application version.
    AppVersion = 2,
    /// [`Role`].
    Role = 3,
    /// [`State`].
    State = 4,
    /// Epoch the engine is in.
    Epoch = 5,
    /// Agreed layout version.
    Layout = 6,
    /// Enabled feature set.
    Features = 7,
    /// Transactions committed (active) or applied (standby).
    Commits = 8,
    /// Last heartbeat, CLOCK_MONOTONIC ns.
    HeartbeatNs = 10,
    /// Times this engine stepped up.
    StepUps = 11,
    /// CLOCK_REALTIME ns of the last step-up.
    LastStepUpNs = 12,
    /// Duration of the last step-up (detection → active), ns.
    LastStepUpDurNs = 13,
    /// Attach generation (bumped by a standby at every attach).
    AttachGen = 14,
    /// State digest.
    Digest = 15,
    /// Requests handled in total.
    Requests = 16,
    /// Replication lag in bytes (standby).
    LagBytes = 17,
    /// Peer's application version (0 = none) as seen by this engine.
    PeerVersion = 18,
    /// Per-slot command to the engine ([`SlotCommand`]; 0: none).
    Cmd = 19,
    /// Features both engines can enable.
    Enableable = 20,
    /// Last error code (0 = none).
    Error = 21,
    /// The application's name hash.
    AppHash = 23,
    /// Transactions committed when this engine last stepped up.
    StepUpCommits = 24,
    /// Digest when this engine last stepped up.
    StepUpDigest = 25,
    /// Requests the application refused (its handler returned an error), in total.
    Refusals = 26,
    /// 99th percentile of the active's request service time (handler + commit to every
    /// standby + response), ns, over one request in 4, in windows of at least 1000 timed
    /// requests or 1 s (a power-of-two bucket's upper bound).
    ServiceP99Ns = 27,
    /// 1 once the active committed a transaction since it became active (set before the
    /// first commit is replicated; 0 while a standby).
    Served = 28,
    /// Why the engine refused the slot command it took ([`CommandResult`] code; 0: no
    /// refusal). Cleared by [`Control::post_slot_command`].
    CmdRefusal = 29,
}

/// Slot fields are only appended (engines of two versions share the control block).
const _: () = assert!((Field::CmdRefusal as usize) < SLOT_WORDS);

impl Field {
    /// Lower-case name, as errors and reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Field::Pid => "pid",
            Field::StartTime => "start time",
            Field::AppVersion => "app version",
            Field::Role => "role",
            Field::State => "state",
            Field::Epoch => "epoch",
            Field::Layout => "layout",
            Field::Features => "features",
            Field::Commits => "commits",
            Field::HeartbeatNs => "heartbeat",
            Field::StepUps => "step-ups",
            Field::LastStepUpNs => "last step-up time",
            Field::LastStepUpDurNs => "last step-up duration",
            Field::AttachGen => "attach generation",
            Field::Digest => "digest",
            Field::Requests => "requests",
            Field::LagBytes => "lag",
            Field::PeerVersion => "peer version",
            Field::Cmd => "command",
            Field::Enableable => "enableable features",
            Field::Error => "error",
            Field::AppHash => "app hash",
            Field::StepUpCommits => "step-up commits",
            Field::StepUpDigest => "step-up digest",
            Field::Refusals => "refusals",
            Field::ServiceP99Ns => "service p99",
            Field::Served => "served",
            Field::CmdRefusal => "command refusal",
        }
    }

    /// Whether the field is a checked, mirrored word ([`Word::Slot`]).
    pub fn is_checked(self) -> bool {
        checked_index(self).is_some()
    }
}

/// The slot fields that are checked and mirrored, in the order of their mirror words.
const CHECKED_FIELDS: [Field; 5] = [
    Field::Pid,
    Field::StartTime,
    Field::Role,
    Field::State,
    Field::Epoch,
];

fn checked_index(f: Field) -> Option<usize> {
    CHECKED_FIELDS.iter().position(|&c| c == f)
}

/// An engine's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No engine / unknown.
    None = 0,
    /// Active.
    Active = 1,
    /// Standby.
    Standby = 2,
    /// Out of service.
    OutOfService = 3,
}

impl Role {
    /// From a word (anything unknown is `None`).
    pub fn from_word(w: u64) -> Role {
        match w {
            1 => Role::Active,
            2 => Role::Standby,
            3 => Role::OutOfService,
            _ => Role::None,
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Active => "active",
            Role::Standby => "standby",
            Role::OutOfService => "out-of-service",
        }
    }
}

/// A standby's (or any engine's) state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Starting.
    Starting = 0,
    /// Receiving a snapshot.
    Syncing = 1,
    /// Mirrors the active.
    Hot = 2,
    /// Untethered: must catch up again.
    Stale = 3,
    /// Stopped.
    Stopped = 4,
    /// Serving (active).
    Serving = 5,
}

impl State {
    /// From a word.
    pub fn from_word(w: u64) -> State {
        match w {
            1 => State::Syncing,
            2 => State::Hot,
            3 => State::Stale,
            4 => State::Stopped,
            5 => State::Serving,
            _ => State::Starting,
        }
    }
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Syncing => "syncing",
            State::Hot => "hot",
            State::Stale => "stale",
            State::Stopped => "out-of-service",
            State::Serving => "serving",
        }
    }
}

/// Commands in the cluster mailbox (to the active).
pub mod cmd {
    /// Planned switchover to the slot in the argument.
    pub const SWITCHOVER: u64 = 1;
    /// Enable the features in the argument (bit set) on both engines.
    pub const ENABLE_FEATURES: u64 = 2;
}

/// Per-slot commands.
pub mod slot_cmd {
    /// Stop cleanly (out of service).
    pub const STOP: u64 = 1;
    /// With no live active: become active with the consistent copy this engine holds
    /// (`understudy promote --accept-loss`), losing what the dead active committed after it.
    /// Refused by an engine that holds no consistent copy, or while an active serves (the
    /// reason in its [`Field::CmdRefusal`](super::Field::CmdRefusal)).
    pub const PROMOTE: u64 = 2;
}

/// A command to the active, in the cluster mailbox ([`Control::post_command`]); its wire
/// form is a code of [`cmd`] and an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterCommand {
    /// Hand the active role to the hot standby in slot `target` (a planned switchover).
    Switchover {
        /// The slot that becomes active (`< SLOTS`).
        target: usize,
    },
    /// Enable the features `mask` (bit `i`: feature `i`) on every engine, at one point of the
    /// replication stream.
    EnableFeatures {
        /// The features.
        mask: u64,
    },
}

impl ClusterCommand {
    /// The mailbox's command word and argument.
    pub fn words(self) -> (u64, u64) {
        match self {
            ClusterCommand::Switchover { target } => (cmd::SWITCHOVER, target as u64),
            ClusterCommand::EnableFeatures { mask } => (cmd::ENABLE_FEATURES, mask),
        }
    }

    /// The command the words hold (untrusted: a code or target out of range is named).
    pub fn decode(word: u64, arg: u64) -> Result<ClusterCommand, BadCommand> {
        match word {
            cmd::SWITCHOVER if arg < SLOTS as u64 => Ok(ClusterCommand::Switchover {
                target: arg as usize,
            }),
            cmd::SWITCHOVER => Err(BadCommand::NoSuchSlot { found: arg }),
            cmd::ENABLE_FEATURES => Ok(ClusterCommand::EnableFeatures { mask: arg }),
            other => Err(BadCommand::UnknownCode { found: other }),
        }
    }
}

impl std::fmt::Display for ClusterCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterCommand::Switchover { target } => {
                write!(f, "switchover to engine {}", slot_name(*target))
            }
            ClusterCommand::EnableFeatures { mask } => write!(f, "enable features {mask:#x}"),
        }
    }
}

/// What the mailbox holds past the last acknowledgement ([`Control::pending_command`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// A command.
    Command(ClusterCommand),
    /// A command withdrawn by the supervisor ([`Control::withdraw_command`]): acknowledge it,
    /// do nothing.
    Withdrawn,
    /// Words that are not a command this build knows.
    Bad(BadCommand),
}

/// A per-slot command to one engine ([`Control::post_slot_command`]); its wire form is a code
/// of [`slot_cmd`] in the slot's [`Field::Cmd`] (0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotCommand {
    /// Stop cleanly (out of service).
    Stop,
    /// With no live active: become active with the consistent copy this engine holds (see
    /// [`slot_cmd::PROMOTE`]); a refusal is written to [`Field::CmdRefusal`].
    Promote,
}

impl SlotCommand {
    /// The command word.
    pub fn code(self) -> u64 {
        match self {
            SlotCommand::Stop => slot_cmd::STOP,
            SlotCommand::Promote => slot_cmd::PROMOTE,
        }
    }

    /// The command a slot's command word holds (`None`: no command).
    pub fn decode(word: u64) -> Result<Option<SlotCommand>, BadCommand> {
        match word {
            0 => Ok(None),
            slot_cmd::STOP => Ok(Some(SlotCommand::Stop)),
            slot_cmd::PROMOTE => Ok(Some(SlotCommand::Promote)),
            other => Err(BadCommand::UnknownCode { found: other }),
        }
    }

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SlotCommand::Stop => "stop",
            SlotCommand::Promote => "promote",
        }
    }
}

/// Command words that decode to no command this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadCommand {
    /// The command code.
    UnknownCode {
        /// The word found.
        found: u64,
    },
    /// A switchover to a slot that does not exist.
    NoSuchSlot {
        /// The argument found.
        found: u64,
    },
}

impl std::fmt::Display for BadCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadCommand::UnknownCode { found } => write!(f, "unknown command code {found}"),
            BadCommand::NoSuchSlot { found } => write!(
                f,
                "switchover target: expected a slot below {SLOTS}, found {found}"
            ),
        }
    }
}
impl std::error::Error for BadCommand {}

/// The supervisor the control block records ([`Control::supervisor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorHolder {
    /// None recorded (or released).
    None,
    /// A supervisor between its claim and its start time (or one that died there).
    Claiming {
        /// Its pid.
        pid: u32,
    },
    /// A supervisor, by identity.
    Held(ProcessIdentity),
    /// A pid word no claim writes (damage): holds nothing.
    Damaged {
        /// The word found.
        found: u64,
    },
}

impl SupervisorHolder {
    fn from_words(raw: u64, start_time_ticks: u64) -> SupervisorHolder {
        let claiming = raw & SUPERVISOR_CLAIMING != 0;
        match (u32::try_from(raw & !SUPERVISOR_CLAIMING), claiming) {
            _ if raw == 0 => SupervisorHolder::None,
            (Ok(pid), true) if pid != 0 => SupervisorHolder::Claiming { pid },
            (Ok(pid), false) => SupervisorHolder::Held(ProcessIdentity {
                pid,
                start_time_ticks,
            }),
            _ => SupervisorHolder::Damaged { found: raw },
        }
    }

    /// The holder's pid, if any.
    pub fn pid(&self) -> Option<u32> {
        match self {
            SupervisorHolder::Claiming { pid } => Some(*pid),
            SupervisorHolder::Held(id) => Some(id.pid),
            SupervisorHolder::None | SupervisorHolder::Damaged { .. } => None,
        }
    }

    /// Whether the holder is a live process: the identity checked against `/proc` (a pid
    /// reused by a later process is not it); a claim in progress by its pid alone.
    pub fn is_alive(&self) -> bool {
        match self {
            SupervisorHolder::Held(id) => id.is_alive(),
            SupervisorHolder::Claiming { pid } => {
                ProcStat::read(*pid).is_ok_and(|stat| !stat.is_exited())
            }
            SupervisorHolder::None | SupervisorHolder::Damaged { .. } => false,
        }
    }
}

impl std::fmt::Display for SupervisorHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SupervisorHolder::None => f.write_str("no supervisor"),
            SupervisorHolder::Claiming { pid } => {
                write!(f, "the supervisor with pid {pid} (claiming)")
            }
            SupervisorHolder::Held(id) => write!(
                f,
                "the supervisor with pid {} (started at tick {})",
                id.pid, id.start_time_ticks
            ),
            SupervisorHolder::Damaged { found } => {
                write!(f, "a damaged supervisor word ({found:#018x})")
            }
        }
    }
}

/// The cluster's supervisor words are held by another live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisorTaken {
    /// Who holds them.
    pub holder: SupervisorHolder,
}

impl std::fmt::Display for SupervisorTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the cluster is supervised by {}, which is alive: expected no live supervisor (one per cluster); use that one, or stop it first",
            self.holder
        )
    }
}
impl std::error::Error for SupervisorTaken {}

/// Whether the cluster is meant to run: `down` marks it before stopping the engines, so clients
/// learn it at once (the runtime's `ClientError::ClusterDown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Running (or starting).
    Up = 1,
    /// Being stopped by the operator (`understudy down`).
    Down = 2,
}

impl ClusterState {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            ClusterState::Up => "up",
            ClusterState::Down => "down",
        }
    }
}

/// A word of the control block that decisions depend on, stored checked and mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Word {
    /// The cluster's epoch.
    Epoch,
    /// The active slot.
    ActiveSlot,
    /// [`ClusterState`].
    ClusterState,
    /// A checked field of a slot record (pid, start time, role, state, epoch).
    Slot {
        /// The slot.
        slot: usize,
        /// The field ([`Field::is_checked`]).
        field: Field,
    },
}

impl Word {
    /// Every checked word, globals first.
    pub fn all() -> impl Iterator<Item = Word> {
        [Word::Epoch, Word::ActiveSlot, Word::ClusterState]
            .into_iter()
            .chain((0..SLOTS).flat_map(|slot| {
                CHECKED_FIELDS
                    .iter()
                    .map(move |&field| Word::Slot { slot, field })
            }))
    }

    /// Word index of the primary copy.
    fn primary(self) -> usize {
        match self {
            Word::Epoch => W_EPOCH,
            Word::ActiveSlot => W_ACTIVE,
            Word::ClusterState => W_CLUSTER,
            Word::Slot { slot, field } => SLOT_BASE + slot * SLOT_WORDS + field as usize,
        }
    }

    /// Word index of the mirror copy.
    fn mirror(self) -> usize {
        match self {
            Word::Epoch => W_EPOCH_MIRROR,
            Word::ActiveSlot => W_ACTIVE_MIRROR,
            Word::ClusterState => W_CLUSTER_MIRROR,
            Word::Slot { slot, field } => {
                MIRROR_BASE
                    + slot * MIRROR_WORDS
                    + checked_index(field).expect("Word::Slot holds a checked field")
            }
        }
    }

    /// Byte offset of the primary copy in the control file.
    pub fn primary_offset(self) -> usize {
        self.primary() * 8
    }

    /// Byte offset of the mirror copy in the control file.
    pub fn mirror_offset(self) -> usize {
        self.mirror() * 8
    }

    /// Whether `v` is a value this word may hold (a copy that passes its check with a value
    /// out of range is as damaged as one that fails it).
    fn in_range(self, v: u64) -> bool {
        match self {
            Word::Epoch => true,
            Word::ActiveSlot => v < SLOTS as u64 || v == CHECKED_MAX,
            Word::ClusterState => v == ClusterState::Up as u64 || v == ClusterState::Down as u64,
            Word::Slot { field, .. } => match field {
                Field::Pid => v <= i32::MAX as u64,
                Field::Role => v <= Role::OutOfService as u64,
                Field::State => v <= State::Serving as u64,
                _ => true,
            },
        }
    }
}

impl std::fmt::Display for Word {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Word::Epoch => f.write_str("epoch"),
            Word::ActiveSlot => f.write_str("active slot"),
            Word::ClusterState => f.write_str("cluster state"),
            Word::Slot { slot, field } => {
                write!(f, "slot {} {}", slot_name(*slot), field.name())
            }
        }
    }
}

/// Which copies of a [`Word`] are damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// The primary fails its check (or holds a value out of range); the mirror is intact.
    Primary,
    /// The mirror fails its check (or holds a value out of range); the primary is intact.
    Mirror,
    /// Both copies are damaged: the value is lost until an engine rewrites it from its view.
    Both,
}

/// A damaged checked word, as [`Control::verify`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The word.
    pub word: Word,
    /// Which copies.
    pub damage: Damage,
    /// The primary word as found.
    pub primary_raw: u64,
    /// The mirror word as found.
    pub mirror_raw: u64,
    /// The value of the intact copy (`None` when both are damaged).
    pub intact: Option<u64>,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (p, m) = (self.primary_raw, self.mirror_raw);
        match (self.damage, self.intact) {
            (Damage::Primary, Some(v)) => write!(
                f,
                "control block word `{}`: primary copy damaged (expected a checked value, found {p:#018x}); the mirror holds {v}",
                self.word
            ),
            (Damage::Mirror, Some(v)) => write!(
                f,
                "control block word `{}`: mirror copy damaged (expected the complement of the primary, found {m:#018x}); the primary holds {v}",
                self.word
            ),
            _ => write!(
                f,
                "control block word `{}`: both copies damaged (expected checked values, found primary {p:#018x}, mirror {m:#018x}); the value is lost until an engine rewrites it",
                self.word
            ),
        }
    }
}
impl std::error::Error for Corruption {}

/// CRC-16/CCITT-FALSE (polynomial 0x1021): detects every error of one or two bits in a
/// 64-bit codeword, and every burst of up to 16 bits.
const CRC16_TABLE: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = (i as u16) << 8;
        let mut k = 0;
        while k < 8 {
            c = if c & 0x8000 != 0 {
                (c << 1) ^ 0x1021
            } else {
                c << 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The check of value `v` (48 bits) in word `index`.
const fn check16(index: usize, v: u64) -> u16 {
    let idx = (index as u16).to_le_bytes();
    let val = v.to_le_bytes();
    let bytes = [
        idx[0], idx[1], val[0], val[1], val[2], val[3], val[4], val[5],
    ];
    let mut crc = 0xFFFFu16;
    let mut i = 0;
    while i < bytes.len() {
        crc = (crc << 8) ^ CRC16_TABLE[((crc >> 8) as u8 ^ bytes[i]) as usize];
        i += 1;
    }
    crc
}

/// The primary codeword of `v` in word `index` (`v` is cut to 48 bits).
const fn encode(index: usize, v: u64) -> u64 {
    let v = v & CHECKED_MAX;
    v | (check16(index, v) as u64) << 48
}

/// The cluster-state primary word of an intact, up cluster (the clients' fast path).
const CLUSTER_UP_CODE: u64 = encode(W_CLUSTER, ClusterState::Up as u64);

/// The value of a primary codeword, if it passes its check.
fn decode(index: usize, raw: u64) -> Option<u64> {
    let v = raw & CHECKED_MAX;
    ((raw >> 48) as u16 == check16(index, v)).then_some(v)
}

/// A copy's value: decoded, checked and in range.
fn copy_value(word: Word, raw: u64) -> Option<u64> {
    decode(word.primary(), raw).filter(|&v| word.in_range(v))
}

/// The robust mutex of a [`Control`], borrowed from it: the handle cannot outlive the mapping.
/// It never hands out the [`RobustLock`] inside (that handle is `Copy` and unbounded), only
/// its operations.
///
/// ```no_run
/// # use understudy_control::control::Control;
/// let control = Control::open("/dev/shm/understudy/demo".as_ref()).unwrap();
/// let lock = control.lock();
/// println!("owner died: {}", lock.owner_died());
/// ```
///
/// Using the lock after the control block (its mapping) is gone does not compile:
///
/// ```compile_fail
/// # use understudy_control::control::Control;
/// let lock = {
///     let control = Control::open("/dev/shm/understudy/demo".as_ref()).unwrap();
///     control.lock() // error: `control` does not live long enough
/// };
/// println!("owner died: {}", lock.owner_died());
/// ```
///
/// nor does taking the unbounded handle out of it:
///
/// ```compile_fail
/// # use understudy_control::control::Control;
/// # use understudy_control::liveness::RobustLock;
/// let control = Control::open("/dev/shm/understudy/demo".as_ref()).unwrap();
/// let escaped: RobustLock = *control.lock(); // error: cannot be dereferenced
/// drop(control);
/// ```
pub struct ControlLock<'a> {
    lock: RobustLock,
    _mapping: PhantomData<&'a Control>,
}

impl ControlLock<'_> {
    /// [`RobustLock::lock`].
    pub fn lock(&self) -> Result<LockOutcome, LockError> {
        self.lock.lock()
    }
    /// [`RobustLock::try_lock`].
    pub fn try_lock(&self) -> Result<TryLockOutcome, LockError> {
        self.lock.try_lock()
    }
    /// [`RobustLock::unlock`].
    pub fn unlock(&self) -> Result<(), LockError> {
        self.lock.unlock()
    }
    /// [`RobustLock::word`].
    pub fn word(&self) -> LockWord {
        self.lock.word()
    }
    /// [`RobustLock::owner_died`].
    pub fn owner_died(&self) -> bool {
        self.lock.owner_died()
    }
    /// [`RobustLock::holder_tid`].
    pub fn holder_tid(&self) -> Option<u32> {
        self.lock.holder_tid()
    }
    /// [`RobustLock::recover_dead_holder`].
    pub fn recover_dead_holder(&self, dead_tid: u32) -> bool {
        self.lock.recover_dead_holder(dead_tid)
    }
    /// [`RobustLock::futex_word`] (borrowed from the mapping like the handle).
    pub fn futex_word(&self) -> &std::sync::atomic::AtomicU32 {
        self.lock.futex_word()
    }
}

/// What this process last wrote to each checked slot field: the engine's own view, from
/// which [`Control::repair_own`] rewrites its slot when both copies are lost.
#[derive(Default)]
struct Shadow {
    values: [[std::sync::atomic::AtomicU64; CHECKED_FIELDS.len()]; SLOTS],
    /// Bit `slot * 8 + i`: `values[slot][i]` was written by this process.
    written: std::sync::atomic::AtomicU64,
    /// Fingerprint of what `repair_own` last reported.
    reported: std::sync::atomic::AtomicU64,
}

/// A control file that cannot be created or opened.
#[derive(Debug)]
pub enum ControlError {
    /// I/O.
    Io {
        /// File.
        path: PathBuf,
        /// Operation.
        op: &'static str,
        /// Error.
        source: io::Error,
    },
    /// A field does not hold what it must.
    Field {
        /// File.
        path: PathBuf,
        /// Field.
        field: &'static str,
        /// Expected.
        expected: String,
        /// Found.
        found: String,
    },
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlError::Io { path, op, source } => {
                write!(f, "control file {}: {op} failed: {source}", path.display())
            }
            ControlError::Field {
                path,
                field,
                expected,
                found,
            } => write!(
                f,
                "control file {}: field `{field}`: expected {expected}, found {found}",
                path.display()
            ),
        }
    }
}
impl std::error::Error for ControlError {}

/// A mapped control file.
#[derive(Clone)]
pub struct Control {
    words: Arc<MappedWords<Arc<MmapRaw>>>,
    map: Arc<MmapRaw>,
    path: PathBuf,
    shadow: Arc<Shadow>,
    /// (device, inode) of the mapped file.
    file_id: (u64, u64),
}

/// CLOCK_MONOTONIC in ns (comparable across processes on the host).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME in ns.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Control {
    /// Open `<dir>/control`, creating and initialising it if it does not exist.
    pub fn open_or_create(dir: &Path) -> Result<Control, ControlError> {
        let path = dir.join("control");
        let io = |op| {
            let path = path.clone();
            move |source| ControlError::Io { path, op, source }
        };
        shm_layout::region::ensure_private_dir(dir).map_err(io("create directory"))?;
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => {
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod"))?;
                file.set_len(FILE_BYTES as u64).map_err(io("resize"))?;
                let c = Self::map(&path, &file)?;
                let w = |i: usize, v: u64| c.words.word(i).store(v, Ordering::Relaxed);
                w(W_MAGIC, MAGIC);
                w(W_VERSION, VERSION);
                for word in Word::all() {
                    let v = match word {
                        Word::ActiveSlot => CHECKED_MAX,
                        Word::ClusterState => ClusterState::Up as u64,
                        _ => 0,
                    };
                    c.store_checked(word, v);
                }
                // SAFETY: the lock area is inside the mapping, 64-byte aligned, and no other
                // process uses it before READY is published below.
                unsafe { RobustLock::init(c.map.as_mut_ptr().add(LOCK_OFFSET)) }
                    .map_err(io("init robust mutex"))?;
                // SYNC POINT: control published (Release; Acquire is in `open`).
                c.words.word(W_READY).store(READY, Ordering::Release);
                Ok(c)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::open(dir),
            Err(e) => Err(io("create")(e)),
        }
    }

    /// Open an existing control file and validate it.
    pub fn open(dir: &Path) -> Result<Control, ControlError> {
        let path = dir.join("control");
        let io = |op| {
            let path = path.clone();
            move |source| ControlError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("open"))?;
        let mut meta = file.metadata().map_err(io("stat"))?;
        // A creator racing with us may not have sized the file yet: wait for it, bounded.
        let sizing = Instant::now();
        while meta.len() == 0 && sizing.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
            meta = file.metadata().map_err(io("stat"))?;
        }
        if meta.len() != FILE_BYTES as u64 {
            return Err(ControlError::Field {
                path,
                field: "file size",
                expected: FILE_BYTES.to_string(),
                found: meta.len().to_string(),
            });
        }
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid {
            return Err(ControlError::Field {
                path,
                field: "owner",
                expected: format!("uid {uid}"),
                found: format!("uid {}", meta.uid()),
            });
        }
        // The rest of the trust boundary (a regular file, no access for group or others):
        // a control block others could write decides nothing.
        if let Err(e) = shm_layout::trust::check_private_file(&path, &file) {
            return Err(ControlError::Io {
                path,
                op: "trust check",
                source: e.into(),
            });
        }
        let c = Self::map(&path, &file)?;
        let started = Instant::now();
        // SYNC POINT: control published (Acquire side).
        while c.words.word(W_READY).load(Ordering::Acquire) != READY {
            if started.elapsed() > Duration::from_secs(2) {
                return Err(ControlError::Field {
                    path,
                    field: "ready",
                    expected: "a published control block".into(),
                    found: "one still being initialised after 2 s".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let magic = c.words.word(W_MAGIC).load(Ordering::Relaxed);
        if magic != MAGIC {
            return Err(ControlError::Field {
                path,
                field: "magic",
                expected: format!("{MAGIC:#018x}"),
                found: format!("{magic:#018x}"),
            });
        }
        let v = c.words.word(W_VERSION).load(Ordering::Relaxed);
        if v != VERSION {
            return Err(ControlError::Field {
                path,
                field: "version",
                expected: VERSION.to_string(),
                found: v.to_string(),
            });
        }
        Ok(c)
    }

    fn map(path: &Path, file: &std::fs::File) -> Result<Control, ControlError> {
        let meta = file.metadata().map_err(|source| ControlError::Io {
            path: path.to_owned(),
            op: "stat",
            source,
        })?;
        let file_id = (meta.dev(), meta.ino());
        let map = MmapOptions::new()
            .len(FILE_BYTES)
            .map_raw(file)
            .map_err(|source| ControlError::Io {
                path: path.to_owned(),
                op: "mmap",
                source,
            })?;
        let map = Arc::new(map);
        // SAFETY: a page-aligned shared mapping of FILE_BYTES, kept alive by the Arc.
        let words = unsafe { MappedWords::new(map.as_mut_ptr(), FILE_BYTES / 8, map.clone()) };
        Ok(Control {
            words: Arc::new(words),
            map,
            path: path.to_owned(),
            shadow: Arc::default(),
            file_id,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file this mapping came from is still the cluster's control file (`down`
    /// removes the cluster directory; a new cluster creates a new file). One `stat`: call it
    /// now and then, not in a hot loop. An error other than "not found" counts as linked (it
    /// proves nothing).
    pub fn still_linked(&self) -> bool {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) => (m.dev(), m.ino()) == self.file_id,
            Err(e) => e.kind() != io::ErrorKind::NotFound,
        }
    }

    /// The robust mutex the active's writing thread holds, borrowed from this mapping.
    pub fn lock(&self) -> ControlLock<'_> {
        ControlLock {
            // SAFETY: initialised before READY was published (`open` waits for READY); inside
            // the mapping (const-asserted: LOCK_OFFSET + SIZE <= FILE_BYTES), 64-byte aligned
            // (page-aligned mapping + 64), and the mapping lives as long as `self.map`, which
            // the returned handle borrows through `&self`: it cannot outlive the mapping.
            lock: unsafe { RobustLock::from_ptr(self.map.as_mut_ptr().add(LOCK_OFFSET)) },
            _mapping: PhantomData,
        }
    }

    fn raw(&self, index: usize) -> &AtomicU64 {
        self.words.word(index)
    }

    /// Write both copies of a checked word: the primary (one store, so never torn), then the
    /// mirror. Readers trust an intact primary, so the mirror lagging behind is harmless.
    fn store_checked(&self, word: Word, v: u64) {
        let code = encode(word.primary(), v);
        self.raw(word.primary()).store(code, Ordering::Release);
        self.raw(word.mirror()).store(!code, Ordering::Release);
    }

    /// Read a checked word: the primary if intact, else the mirror if intact, else the
    /// damage, named.
    pub fn read(&self, word: Word) -> Result<u64, Corruption> {
        let p = self.raw(word.primary()).load(Ordering::Acquire);
        if let Some(v) = copy_value(word, p) {
            return Ok(v);
        }
        let m = self.raw(word.mirror()).load(Ordering::Acquire);
        match copy_value(word, !m) {
            Some(v) => Ok(v),
            None => Err(Corruption {
                word,
                damage: Damage::Both,
                primary_raw: p,
                mirror_raw: m,
                intact: None,
            }),
        }
    }

    /// Both copies of `word`, each checked: the damage if either is damaged.
    fn inspect(&self, word: Word) -> Option<Corruption> {
        let p = self.raw(word.primary()).load(Ordering::Acquire);
        let m = self.raw(word.mirror()).load(Ordering::Acquire);
        let (pv, mv) = (copy_value(word, p), copy_value(word, !m));
        let (damage, intact) = match (pv, mv) {
            (Some(_), Some(_)) => return None,
            (None, Some(v)) => (Damage::Primary, Some(v)),
            (Some(v), None) => (Damage::Mirror, Some(v)),
            (None, None) => (Damage::Both, None),
        };
        Some(Corruption {
            word,
            damage,
            primary_raw: p,
            mirror_raw: m,
            intact,
        })
    }

    /// Every damaged copy of a checked word, named. Empty when the block is intact. A mirror
    /// that is intact but holds an older value than its primary (a writer between its two
    /// stores, or one that died there) is not damage: readers trust the primary.
    pub fn verify(&self) -> Vec<Corruption> {
        Word::all().filter_map(|w| self.inspect(w)).collect()
    }

    /// Rewrite each damaged copy from the intact one (compare-and-swap on the damaged word,
    /// so a concurrent legitimate write wins). Returns what was found; words damaged in both
    /// copies are left for [`repair_own`](Self::repair_own).
    pub fn repair(&self) -> Vec<Corruption> {
        let found = self.verify();
        for c in &found {
            let Some(v) = c.intact else { continue };
            let code = encode(c.word.primary(), v);
            let (index, from, to) = match c.damage {
                Damage::Primary => (c.word.primary(), c.primary_raw, code),
                Damage::Mirror => (c.word.mirror(), c.mirror_raw, !code),
                Damage::Both => continue,
            };
            let _ = self
                .raw(index)
                .compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed);
        }
        found
    }

    /// What a live engine in `slot` calls now and then: [`repair`](Self::repair), then, for
    /// a word damaged in both copies, rewrite it from this process's own view — each checked
    /// field of `slot` from the value this process last wrote there, and, while this process
    /// wrote `slot` as the active, the epoch and the active slot from that record. Every
    /// rewrite is a compare-and-swap from the damaged word. Returns what was found (each also
    /// logged, with the word named).
    pub fn repair_own(&self, slot: usize) -> Vec<Corruption> {
        if slot >= SLOTS {
            return Vec::new();
        }
        let found = self.repair();
        // Log what was found once, not every call while it lasts (a word no live engine can
        // rewrite stays damaged).
        let fingerprint = found.iter().fold(found.len() as u64, |h, c| {
            (h ^ c.word.primary() as u64 ^ c.primary_raw.rotate_left(17) ^ c.mirror_raw)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let report = self
            .shadow
            .reported
            .swap(fingerprint, std::sync::atomic::Ordering::Relaxed)
            != fingerprint;
        for c in &found {
            if report {
                warn!("{c}; repairing");
            }
            if c.damage != Damage::Both {
                continue;
            }
            let mine = |f: Field| self.shadow_value(slot, f);
            let v = match c.word {
                Word::Slot { slot: s, field } if s == slot => mine(field),
                Word::Epoch if mine(Field::Role) == Some(Role::Active as u64) => mine(Field::Epoch),
                Word::ActiveSlot if mine(Field::Role) == Some(Role::Active as u64) => {
                    Some(slot as u64)
                }
                _ => None,
            };
            if let Some(v) = v {
                if self.restore(c, v) {
                    warn!(word = %c.word, value = v, "rewrote both copies from this engine's own view");
                }
            }
        }
        found
    }

    /// Rewrite both copies of a word found damaged (`found`, from [`verify`](Self::verify))
    /// with `value`, taken from a second source (an engine's own view, the supervisor's record
    /// of the processes it started). Compare-and-swap from the words as found: false, and
    /// nothing written, if the primary changed since (someone else wrote or repaired it).
    pub fn restore(&self, found: &Corruption, value: u64) -> bool {
        let w = found.word;
        if value > CHECKED_MAX || !w.in_range(value) {
            return false;
        }
        let code = encode(w.primary(), value);
        if self
            .raw(w.primary())
            .compare_exchange(found.primary_raw, code, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let _ = self.raw(w.mirror()).compare_exchange(
            found.mirror_raw,
            !code,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
        true
    }

    fn shadow_value(&self, slot: usize, f: Field) -> Option<u64> {
        let i = checked_index(f)?;
        let bit = 1u64 << (slot * 8 + i);
        (self
            .shadow
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
            & bit
            != 0)
            .then(|| self.shadow.values[slot][i].load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The current epoch (the mirror's if the primary is damaged; if both are, the primary's
    /// low 48 bits: a decision must use [`epoch_checked`](Self::epoch_checked)).
    pub fn epoch(&self) -> u64 {
        self.epoch_checked()
            .unwrap_or_else(|c| c.primary_raw & CHECKED_MAX)
    }

    /// The current epoch, or the damage.
    pub fn epoch_checked(&self) -> Result<u64, Corruption> {
        self.read(Word::Epoch)
    }

    /// The active slot, if any (`None` also when both copies are damaged).
    pub fn active_slot(&self) -> Option<usize> {
        self.active_slot_checked().ok().flatten()
    }

    /// The active slot (`None`: no active), or the damage.
    pub fn active_slot_checked(&self) -> Result<Option<usize>, Corruption> {
        let s = self.read(Word::ActiveSlot)?;
        Ok((s < SLOTS as u64).then_some(s as usize))
    }

    /// The cluster's state, or the damage.
    pub fn cluster_state(&self) -> Result<ClusterState, Corruption> {
        if self.raw(W_CLUSTER).load(Ordering::Acquire) == CLUSTER_UP_CODE {
            return Ok(ClusterState::Up);
        }
        Ok(match self.read(Word::ClusterState)? {
            2 => ClusterState::Down,
            _ => ClusterState::Up,
        })
    }

    /// Set the cluster's state (`understudy down` sets [`ClusterState::Down`] before it
    /// stops the engines; an engine claiming an epoch sets [`ClusterState::Up`]).
    pub fn set_cluster_state(&self, state: ClusterState) {
        self.store_checked(Word::ClusterState, state as u64);
    }

    /// Become active: bump the epoch from `from` to `from + 1` and record `slot` as active,
    /// only if nobody else bumped it first. Returns the new epoch. A primary epoch word that
    /// fails its check is claimed from its intact mirror (the compare-and-swap acts on the
    /// damaged word as found, so two claimers still cannot both win).
    pub fn claim_epoch(&self, from: u64, slot: usize) -> Option<u64> {
        let next = from.checked_add(1).filter(|&n| n <= CHECKED_MAX)?;
        if slot >= SLOTS {
            return None;
        }
        let w = Word::Epoch;
        let raw = self.raw(w.primary()).load(Ordering::Acquire);
        let current = match copy_value(w, raw) {
            Some(v) => v,
            None => copy_value(w, !self.raw(w.mirror()).load(Ordering::Acquire))?,
        };
        if current != from {
            return None;
        }
        let code = encode(w.primary(), next);
        // SYNC POINT: epoch claimed (AcqRel CAS; every engine reads the epoch with Acquire in
        // `read`).
        self.raw(w.primary())
            .compare_exchange(raw, code, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.raw(w.mirror()).store(!code, Ordering::Release);
        self.store_checked(Word::ActiveSlot, slot as u64);
        if self.cluster_state() != Ok(ClusterState::Up) {
            self.set_cluster_state(ClusterState::Up);
        }
        Some(next)
    }

    /// A non-checked slot word.
    fn slot_word(&self, slot: usize, f: Field) -> &AtomicU64 {
        assert!(
            slot < SLOTS,
            "slot {slot} out of range (our own caller's bug)"
        );
        self.words.word(SLOT_BASE + slot * SLOT_WORDS + f as usize)
    }

    /// Read a slot field. A checked field ([`Field::is_checked`]) reads the intact copy; if
    /// both are damaged, the primary's low 48 bits (a decision must use
    /// [`get_checked`](Self::get_checked)).
    pub fn get(&self, slot: usize, f: Field) -> u64 {
        if f.is_checked() {
            return self
                .get_checked(slot, f)
                .unwrap_or_else(|c| c.primary_raw & CHECKED_MAX);
        }
        self.slot_word(slot, f).load(Ordering::Acquire)
    }

    /// Read a slot field, or the damage if it is a checked field with no intact copy.
    pub fn get_checked(&self, slot: usize, f: Field) -> Result<u64, Corruption> {
        assert!(
            slot < SLOTS,
            "slot {slot} out of range (our own caller's bug)"
        );
        if f.is_checked() {
            return self.read(Word::Slot { slot, field: f });
        }
        Ok(self.slot_word(slot, f).load(Ordering::Acquire))
    }

    /// The process registered in `slot` (`None`: empty, or a pid word that is no pid): its pid,
    /// then the start time it published (liveness is not checked).
    pub fn registered(&self, slot: usize) -> Option<ProcessIdentity> {
        // SYNC POINT: slot registered (Acquire; the Release is the engine's pid store, last
        // of its registration in `Engine::new`, after its start time).
        let pid = self.get(slot, Field::Pid);
        let pid = u32::try_from(pid).ok().filter(|&p| p != 0)?;
        Some(ProcessIdentity {
            pid,
            start_time_ticks: self.get(slot, Field::StartTime),
        })
    }

    /// Write a slot field (both copies of a checked field; its value is cut to 48 bits).
    pub fn set(&self, slot: usize, f: Field, v: u64) {
        assert!(
            slot < SLOTS,
            "slot {slot} out of range (our own caller's bug)"
        );
        match checked_index(f) {
            Some(i) => {
                let v = v & CHECKED_MAX;
                self.shadow.values[slot][i].store(v, std::sync::atomic::Ordering::Relaxed);
                self.shadow
                    .written
                    .fetch_or(1 << (slot * 8 + i), std::sync::atomic::Ordering::Relaxed);
                self.store_checked(Word::Slot { slot, field: f }, v);
            }
            None => self.slot_word(slot, f).store(v, Ordering::Release),
        }
    }

    /// Take (an engine) or withdraw (the supervisor) the slot command `cmd` if it is still
    /// posted in `slot`: a compare-and-swap to 0, so exactly one side gets a command — a
    /// command the supervisor gave up on is never acted on later.
    pub fn take_slot_cmd(&self, slot: usize, cmd: u64) -> bool {
        debug_assert!(!Field::Cmd.is_checked());
        assert!(
            slot < SLOTS,
            "slot {slot} out of range (our own caller's bug)"
        );
        // SYNC POINT: slot command posted (AcqRel take; the post is the Release in
        // `post_slot_command`): a refusal this engine writes next comes after the post's
        // clearing of the last one.
        self.slot_word(slot, Field::Cmd)
            .compare_exchange(cmd, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// XOR `mask` into the control file's word at `byte_offset` (8-aligned): a bit flip, for
    /// tests of the checks. False if the offset is not an aligned word of the file.
    #[cfg(feature = "fault-injection")]
    pub fn flip_bits(&self, byte_offset: usize, mask: u64) -> bool {
        if byte_offset % 8 != 0 || byte_offset >= FILE_BYTES {
            return false;
        }
        self.raw(byte_offset / 8).fetch_xor(mask, Ordering::AcqRel);
        true
    }

    /// Post a command to the active; returns its sequence number.
    pub fn post(&self, command: u64, arg: u64) -> u64 {
        // Another process writes the word: wrap rather than overflow.
        let seq = self
            .words
            .word(W_CMD_SEQ)
            .load(Ordering::Acquire)
            .wrapping_add(1);
        self.words.word(W_CMD).store(command, Ordering::Relaxed);
        self.words.word(W_CMD_ARG).store(arg, Ordering::Relaxed);
        // SYNC POINT: command posted (Release; Acquire in `pending`).
        self.words.word(W_CMD_SEQ).store(seq, Ordering::Release);
        seq
    }

    /// The command pending for the active, if its sequence is newer than the last acked.
    pub fn pending(&self) -> Option<(u64, u64, u64)> {
        // SYNC POINT: command posted (Acquire; the Release is the sequence store in `post`).
        let seq = self.words.word(W_CMD_SEQ).load(Ordering::Acquire);
        let ack = self.words.word(W_CMD_ACK).load(Ordering::Relaxed);
        if seq == ack {
            return None;
        }
        let c = self.words.word(W_CMD).load(Ordering::Relaxed);
        let a = self.words.word(W_CMD_ARG).load(Ordering::Relaxed);
        Some((seq, c, a))
    }

    /// Acknowledge command `seq` with `result` (0 = done, else an error code).
    pub fn ack(&self, seq: u64, result: u64) {
        self.words
            .word(W_CMD_RESULT)
            .store(result, Ordering::Relaxed);
        // SYNC POINT: command answered (Release; Acquire in `acked`).
        self.words.word(W_CMD_ACK).store(seq, Ordering::Release);
    }

    /// The acked sequence and result.
    pub fn acked(&self) -> (u64, u64) {
        // SYNC POINT: command answered (Acquire; the Release is the ack store in `ack`).
        let a = self.words.word(W_CMD_ACK).load(Ordering::Acquire);
        (a, self.words.word(W_CMD_RESULT).load(Ordering::Relaxed))
    }

    /// Post `command` to the active; returns its sequence number.
    pub fn post_command(&self, command: ClusterCommand) -> u64 {
        let (word, arg) = command.words();
        self.post(word, arg)
    }

    /// Withdraw the command posted last, if the active has not taken it: post "no command"
    /// over it (an active acknowledges it and does nothing). Its sequence number.
    pub fn withdraw_command(&self) -> u64 {
        self.post(0, 0)
    }

    /// The command pending for the active, typed, with its sequence number.
    pub fn pending_command(&self) -> Option<(u64, Pending)> {
        let (seq, word, arg) = self.pending()?;
        let pending = match word {
            0 => Pending::Withdrawn,
            _ => match ClusterCommand::decode(word, arg) {
                Ok(c) => Pending::Command(c),
                Err(bad) => Pending::Bad(bad),
            },
        };
        Some((seq, pending))
    }

    /// Acknowledge command `seq` with `result`.
    pub fn answer(&self, seq: u64, result: CommandResult) {
        self.ack(seq, result.code());
    }

    /// The acknowledged sequence and its result, typed.
    pub fn acked_result(&self) -> (u64, CommandResult) {
        let (seq, code) = self.acked();
        (seq, CommandResult::from_code(code))
    }

    /// Post the slot command `command` to the engine in `slot`, clearing its last refusal.
    pub fn post_slot_command(&self, slot: usize, command: SlotCommand) {
        self.set(slot, Field::CmdRefusal, 0);
        // SYNC POINT: slot command posted (Release; the AcqRel take in `take_slot_cmd`).
        self.set(slot, Field::Cmd, command.code());
    }

    /// The slot command posted in `slot` and not taken yet (`None`: none).
    pub fn slot_command(&self, slot: usize) -> Result<Option<SlotCommand>, BadCommand> {
        SlotCommand::decode(self.get(slot, Field::Cmd))
    }

    /// [`take_slot_cmd`](Self::take_slot_cmd), typed.
    pub fn take_slot_command(&self, slot: usize, command: SlotCommand) -> bool {
        self.take_slot_cmd(slot, command.code())
    }

    /// An engine refuses the slot command it took, for `why` (read by
    /// [`slot_refusal`](Self::slot_refusal)).
    pub fn refuse_slot_command(&self, slot: usize, why: CommandResult) {
        self.set(slot, Field::CmdRefusal, why.code());
    }

    /// Why the engine in `slot` refused the slot command it took last (`None`: no refusal).
    pub fn slot_refusal(&self, slot: usize) -> Option<CommandResult> {
        match self.get(slot, Field::CmdRefusal) {
            0 => None,
            code => Some(CommandResult::from_code(code)),
        }
    }

    /// The supervisor recorded in the control block (its liveness is not checked: see
    /// [`SupervisorHolder::is_alive`]).
    pub fn supervisor(&self) -> SupervisorHolder {
        // SYNC POINT: supervisor claimed (Acquire; the Release is the pid store at the end of
        // `claim_supervisor`, which publishes the start time stored before it).
        let raw = self.raw(W_SUPERVISOR).load(Ordering::Acquire);
        let start_time_ticks = self.raw(W_SUPERVISOR_START).load(Ordering::Relaxed);
        SupervisorHolder::from_words(raw, start_time_ticks)
    }

    /// Claim the cluster's supervisor words for the process (`pid`, `start_time_ticks`): one
    /// supervisor per cluster, decided by compare-and-swap, so of two supervisors started at
    /// once exactly one wins. The words are free when empty, held by a process that is not
    /// alive (its identity names a process that is gone), or already this process's.
    ///
    /// The pid word is taken first, marked "claiming" (bit 63), then the start time is
    /// stored, then the pid word without the mark is published: a reader never pairs the new
    /// pid with the previous start time, and a claimer that died half-way leaves a mark whose
    /// pid is gone, which the next claimer takes over.
    pub fn claim_supervisor(&self, pid: u32, start_time_ticks: u64) -> Result<(), SupervisorTaken> {
        let word = self.raw(W_SUPERVISOR);
        // Each failed compare-and-swap means another claimer wrote in between: look again
        // (a live winner is then reported); a bound, so a word that keeps changing under us
        // is reported rather than spun on.
        for _ in 0..8 {
            let raw = word.load(Ordering::Acquire);
            let holder = SupervisorHolder::from_words(
                raw,
                self.raw(W_SUPERVISOR_START).load(Ordering::Relaxed),
            );
            if holder.pid() != Some(pid) && holder.is_alive() {
                return Err(SupervisorTaken { holder });
            }
            let claiming = u64::from(pid) | SUPERVISOR_CLAIMING;
            if word
                .compare_exchange(raw, claiming, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue;
            }
            self.raw(W_SUPERVISOR_START)
                .store(start_time_ticks, Ordering::Relaxed);
            // SYNC POINT: supervisor claimed (Release; Acquire in `supervisor`).
            word.store(u64::from(pid), Ordering::Release);
            return Ok(());
        }
        Err(SupervisorTaken {
            holder: self.supervisor(),
        })
    }

    /// Give up the supervisor words if `pid` still holds them (a compare-and-swap: a
    /// successor's claim is never undone). Whether they were ours.
    pub fn release_supervisor(&self, pid: u32) -> bool {
        self.raw(W_SUPERVISOR)
            .compare_exchange(u64::from(pid), 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Claim a client registry entry for `id` (non-zero); the entry index, or `None` if the
    /// registry is full.
    pub fn claim_client(&self, id: u64, pid: u64, start_time: u64) -> Option<usize> {
        for i in 0..MAX_CLIENTS {
            let w = self.words.word(CLIENT_BASE + i * CLIENT_WORDS);
            if w.load(Ordering::Relaxed) != 0 {
                continue;
            }
            // Reserve the entry with a marker, fill it, then publish the id.
            if w.compare_exchange(0, u64::MAX, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.words
                    .word(CLIENT_BASE + i * CLIENT_WORDS + 1)
                    .store(pid, Ordering::Relaxed);
                self.words
                    .word(CLIENT_BASE + i * CLIENT_WORDS + 2)
                    .store(start_time, Ordering::Relaxed);
                self.words
                    .word(CLIENT_BASE + i * CLIENT_WORDS + 3)
                    .store(0, Ordering::Relaxed);
                // SYNC POINT: client registered (Release; Acquire in `client`).
                w.store(id, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    /// Registry entry `i`: (id, pid, start time) if in use.
    pub fn client(&self, i: usize) -> Option<(u64, u64, u64)> {
        assert!(i < MAX_CLIENTS);
        // SYNC POINT: client registered (Acquire; the Release is the id store in
        // `claim_client`).
        let id = self
            .words
            .word(CLIENT_BASE + i * CLIENT_WORDS)
            .load(Ordering::Acquire);
        if id == 0 || id == u64::MAX {
            return None;
        }
        let pid = self
            .words
            .word(CLIENT_BASE + i * CLIENT_WORDS + 1)
            .load(Ordering::Relaxed);
        let st = self
            .words
            .word(CLIENT_BASE + i * CLIENT_WORDS + 2)
            .load(Ordering::Relaxed);
        Some((id, pid, st))
    }

    /// Registry entry `i`'s close word: 0, or the reason the active refused the client
    /// (written when it cannot even open the client's rings to close them).
    pub fn client_refused(&self, i: usize) -> u64 {
        assert!(i < MAX_CLIENTS);
        self.words
            .word(CLIENT_BASE + i * CLIENT_WORDS + 3)
            .load(Ordering::Acquire)
    }

    /// Record that the active refused the client in registry entry `i` (if it still holds
    /// `id`) for `reason`.
    pub fn refuse_client(&self, i: usize, id: u64, reason: u64) {
        assert!(i < MAX_CLIENTS);
        let base = CLIENT_BASE + i * CLIENT_WORDS;
        if self.words.word(base).load(Ordering::Acquire) == id {
            self.words.word(base + 3).store(reason, Ordering::Release);
        }
    }

    /// Free registry entry `i` if it still holds `id`.
    pub fn release_client(&self, i: usize, id: u64) {
        assert!(i < MAX_CLIENTS);
        let _ = self
            .words
            .word(CLIENT_BASE + i * CLIENT_WORDS)
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// Path of a client's request ring (client → active).
    pub fn client_in_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("client-{id:016x}.in"))
    }

    /// Path of a client's response ring (active → client).
    pub fn client_out_path(dir: &Path, id: u64) -> PathBuf {
        dir.join(format!("client-{id:016x}.out"))
    }

    /// Path of the stream region `active → standby` for `slot` in `epoch`, generation `gen`.
    pub fn stream_path(dir: &Path, epoch: u64, slot: usize, gen: u64) -> PathBuf {
        dir.join(format!("stream-{epoch}-{}-{gen}", slot_name(slot)))
    }

    /// Path of the feedback region `standby → active`.
    pub fn feedback_path(dir: &Path, epoch: u64, slot: usize, gen: u64) -> PathBuf {
        dir.join(format!("feedback-{epoch}-{}-{gen}", slot_name(slot)))
    }
}

/// `a`, `b`, `c`.
pub fn slot_name(slot: usize) -> char {
    (b'a' + slot as u8) as char
}

/// Slot index from a name.
pub fn slot_index(name: &str) -> Option<usize> {
    match name {
        "a" => Some(0),
        "b" => Some(1),
        "c" => Some(2),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cluster directory under /dev/shm, removed on drop even when the test fails.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = PathBuf::from(format!(
                "/dev/shm/understudy-control-test-{}-{tag}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&d);
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Every cluster command encodes to words that decode back to it; every slot is a
    /// switchover target.
    #[test]
    fn cluster_commands_round_trip() {
        let mut all: Vec<ClusterCommand> = (0..SLOTS)
            .map(|target| ClusterCommand::Switchover { target })
            .collect();
        all.extend([0, 1, 0x4, u64::MAX].map(|mask| ClusterCommand::EnableFeatures { mask }));
        for c in all {
            let (word, arg) = c.words();
            assert_eq!(ClusterCommand::decode(word, arg), Ok(c), "{c}");
        }
        assert_eq!(
            ClusterCommand::Switchover { target: 1 }.words(),
            (cmd::SWITCHOVER, 1)
        );
        assert_eq!(
            ClusterCommand::EnableFeatures { mask: 6 }.words(),
            (cmd::ENABLE_FEATURES, 6)
        );
    }

    /// Words no command has (untrusted memory) decode to a named error, never a command: an
    /// unknown code, a switchover to a slot that does not exist.
    #[test]
    fn bad_cluster_commands_are_named() {
        for word in [0, 3, 4, 99, u64::MAX] {
            let bad = ClusterCommand::decode(word, 1);
            assert_eq!(bad, Err(BadCommand::UnknownCode { found: word }));
            assert_eq!(
                bad.unwrap_err().to_string(),
                format!("unknown command code {word}")
            );
        }
        for target in [SLOTS as u64, 7, u64::MAX] {
            let bad = ClusterCommand::decode(cmd::SWITCHOVER, target);
            assert_eq!(bad, Err(BadCommand::NoSuchSlot { found: target }));
            assert!(bad.unwrap_err().to_string().contains(&target.to_string()));
        }
    }

    /// Every slot command round-trips; 0 is no command; anything else is named.
    #[test]
    fn slot_commands_decode_and_unknown_codes_are_named() {
        for c in [SlotCommand::Stop, SlotCommand::Promote] {
            assert_eq!(SlotCommand::decode(c.code()), Ok(Some(c)), "{}", c.name());
        }
        assert_eq!(SlotCommand::decode(0), Ok(None));
        for word in [3, 1000, u64::MAX] {
            let bad = SlotCommand::decode(word);
            assert_eq!(bad, Err(BadCommand::UnknownCode { found: word }));
            assert_eq!(
                bad.unwrap_err().to_string(),
                format!("unknown command code {word}")
            );
        }
    }

    /// The mailbox through the typed API: a posted command is pending (typed) until it is
    /// answered, its result reads back typed; a withdrawn one reads as withdrawn; raw words
    /// another process wrote read as `Bad` or an unknown result code.
    #[test]
    fn mailbox_round_trip_typed() {
        let dir = Dir::new("mailbox");
        let c = Control::open_or_create(&dir.0).expect("control");
        assert_eq!(c.pending_command(), None);
        let command = ClusterCommand::Switchover { target: 2 };
        let seq = c.post_command(command);
        assert_eq!(c.pending_command(), Some((seq, Pending::Command(command))));
        c.answer(seq, CommandResult::NotHot);
        assert_eq!(c.pending_command(), None);
        assert_eq!(c.acked_result(), (seq, CommandResult::NotHot));
        let seq = c.withdraw_command();
        assert_eq!(c.pending_command(), Some((seq, Pending::Withdrawn)));
        c.ack(seq, 4242);
        assert_eq!(c.acked_result(), (seq, CommandResult::UnknownCode(4242)));
        let seq = c.post(77, 0);
        assert_eq!(
            c.pending_command(),
            Some((seq, Pending::Bad(BadCommand::UnknownCode { found: 77 })))
        );
    }

    /// Slot commands: posted, taken exactly once, and a refusal is read back typed; a new
    /// post clears the last refusal.
    #[test]
    fn slot_command_taken_once_and_refusal_read_back() {
        let dir = Dir::new("slotcmd");
        let c = Control::open_or_create(&dir.0).expect("control");
        assert_eq!(c.slot_command(1), Ok(None));
        c.post_slot_command(1, SlotCommand::Promote);
        assert_eq!(c.slot_command(1), Ok(Some(SlotCommand::Promote)));
        assert!(
            !c.take_slot_command(1, SlotCommand::Stop),
            "not that command"
        );
        assert!(c.take_slot_command(1, SlotCommand::Promote));
        assert!(!c.take_slot_command(1, SlotCommand::Promote), "taken once");
        assert_eq!(c.slot_refusal(1), None);
        c.refuse_slot_command(1, CommandResult::NoConsistentCopy);
        assert_eq!(c.slot_refusal(1), Some(CommandResult::NoConsistentCopy));
        c.post_slot_command(1, SlotCommand::Promote);
        assert_eq!(c.slot_refusal(1), None, "a new post clears the refusal");
        c.set(1, Field::Cmd, 9);
        assert_eq!(c.slot_command(1), Err(BadCommand::UnknownCode { found: 9 }));
    }

    /// A child process (`sleep`), killed and reaped on drop even when the test fails.
    struct Child(std::process::Child);

    impl Child {
        fn spawn() -> Child {
            Child(
                std::process::Command::new("sleep")
                    .arg("60")
                    .spawn()
                    .expect("spawn sleep"),
            )
        }

        fn identity(&self) -> ProcessIdentity {
            ProcessIdentity::of(self.0.id()).expect("the child's identity")
        }

        /// Kill and reap it: its identity then names no live process.
        fn end(mut self) -> ProcessIdentity {
            let id = self.identity();
            let _ = self.0.kill();
            let _ = self.0.wait();
            id
        }
    }

    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// One supervisor per cluster: a second live claimer is refused, naming the holder; the
    /// holder claims again (idempotent); after a release the other claims.
    #[test]
    fn supervisor_claim_refuses_a_second_live_claimer() {
        let dir = Dir::new("sup-two");
        let c = Control::open_or_create(&dir.0).expect("control");
        assert_eq!(c.supervisor(), SupervisorHolder::None);
        let me = ProcessIdentity::current().expect("our identity");
        let other = Child::spawn();
        let them = other.identity();
        c.claim_supervisor(me.pid, me.start_time_ticks)
            .expect("the first claim");
        assert_eq!(c.supervisor(), SupervisorHolder::Held(me));
        c.claim_supervisor(me.pid, me.start_time_ticks)
            .expect("the holder claims again");
        let taken = c
            .claim_supervisor(them.pid, them.start_time_ticks)
            .expect_err("a second live claimer");
        assert_eq!(taken.holder, SupervisorHolder::Held(me));
        assert!(
            taken.to_string().contains(&format!("pid {}", me.pid)),
            "{taken}"
        );
        assert!(!c.release_supervisor(them.pid), "not theirs to release");
        assert!(c.release_supervisor(me.pid));
        assert_eq!(c.supervisor(), SupervisorHolder::None);
        c.claim_supervisor(them.pid, them.start_time_ticks)
            .expect("free again");
        assert_eq!(c.supervisor(), SupervisorHolder::Held(them));
    }

    /// Two claimers at once, each through its own mapping: exactly one wins, every round; the
    /// loser names the winner.
    #[test]
    fn supervisor_claim_race_has_one_winner() {
        let dir = Dir::new("sup-race");
        let c = Control::open_or_create(&dir.0).expect("control");
        let me = ProcessIdentity::current().expect("our identity");
        let other = Child::spawn();
        let them = other.identity();
        for round in 0..200 {
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let claim = |who: ProcessIdentity| {
                let mapping = Control::open(&dir.0).expect("control");
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    mapping.claim_supervisor(who.pid, who.start_time_ticks)
                })
            };
            let (a, b) = (claim(me), claim(them));
            let (a, b) = (a.join().expect("claimer a"), b.join().expect("claimer b"));
            let (winner, loser) = match (a, b) {
                (Ok(()), Err(lost)) => (me, lost),
                (Err(lost), Ok(())) => (them, lost),
                other => panic!("round {round}: expected exactly one winner, found {other:?}"),
            };
            assert_eq!(
                c.supervisor(),
                SupervisorHolder::Held(winner),
                "round {round}"
            );
            assert_eq!(loser.holder.pid(), Some(winner.pid), "round {round}");
            assert!(c.release_supervisor(winner.pid));
        }
    }

    /// A holder that died (a supervisor killed, or one that died half-way through its claim)
    /// holds nothing: the next claimer takes the words over.
    #[test]
    fn supervisor_claim_takes_over_from_a_dead_holder() {
        let dir = Dir::new("sup-dead");
        let c = Control::open_or_create(&dir.0).expect("control");
        let me = ProcessIdentity::current().expect("our identity");
        let gone = Child::spawn();
        let dead = gone.identity();
        c.claim_supervisor(dead.pid, dead.start_time_ticks)
            .expect("the first claim");
        let dead = gone.end();
        assert!(!c.supervisor().is_alive());
        c.claim_supervisor(me.pid, me.start_time_ticks)
            .expect("a dead holder's words are free");
        assert_eq!(c.supervisor(), SupervisorHolder::Held(me));
        // Died half-way: the claiming mark with a pid that is gone.
        c.raw(W_SUPERVISOR)
            .store(u64::from(dead.pid) | SUPERVISOR_CLAIMING, Ordering::Release);
        assert_eq!(c.supervisor(), SupervisorHolder::Claiming { pid: dead.pid });
        c.claim_supervisor(me.pid, me.start_time_ticks)
            .expect("a dead claimer's mark is free");
        assert_eq!(c.supervisor(), SupervisorHolder::Held(me));
        // A live claimer half-way holds the words.
        let live = Child::spawn();
        let them = live.identity();
        c.raw(W_SUPERVISOR)
            .store(u64::from(them.pid) | SUPERVISOR_CLAIMING, Ordering::Release);
        let taken = c
            .claim_supervisor(me.pid, me.start_time_ticks)
            .expect_err("a live claimer holds it");
        assert_eq!(taken.holder, SupervisorHolder::Claiming { pid: them.pid });
    }
}
