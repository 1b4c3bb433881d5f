//! The control block: one small file per cluster (`<dir>/control`) that outlives engines and
//! the supervisor. It holds the epoch (bumped by compare-and-swap at every role change, so two
//! engines can never both be active in one epoch), the active slot, the robust mutex the active
//! holds, a command mailbox, and one record per engine slot (identity, version, role, state,
//! positions, heartbeat, step-up statistics).
//!
//! Everything in it is read through atomics and treated as untrusted (values are range-checked
//! where they select anything).

use crate::liveness::RobustLock;
use memmap2::{MmapOptions, MmapRaw};
use shm_layout::memory::{MappedWords, WordMemory};
use shm_layout::{AtomicU64, Ordering};
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `USTDYCTL`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"USTDYCTL");
/// Layout version of the control file.
pub const VERSION: u64 = 1;
const READY: u64 = u64::from_le_bytes(*b"CTLREADY");
/// Size of the control file.
pub const FILE_BYTES: usize = 4096;
/// Engine slots: `a`, `b` and the transient `c` of a keep-standby upgrade.
pub const SLOTS: usize = 3;
/// No slot.
pub const NO_SLOT: u64 = u64::MAX;

const W_MAGIC: usize = 0;
const W_VERSION: usize = 1;
const W_EPOCH: usize = 2;
const W_ACTIVE: usize = 3;
const W_READY: usize = 4;
const LOCK_OFFSET: usize = 64;
const W_CMD: usize = 16;
const W_CMD_ARG: usize = 17;
const W_CMD_SEQ: usize = 18;
const W_CMD_ACK: usize = 19;
const W_CMD_RESULT: usize = 20;
const W_SUPERVISOR: usize = 24;
const SLOT_BASE: usize = 64;
const SLOT_WORDS: usize = 32;
/// The client registry: `MAX_CLIENTS` entries of 4 words (id, pid, start time, flags).
const CLIENT_BASE: usize = 256;
const CLIENT_WORDS: usize = 4;
/// Clients a cluster accepts at once.
pub const MAX_CLIENTS: usize = 64;
const _: () = assert!(CLIENT_BASE * 8 + MAX_CLIENTS * CLIENT_WORDS * 8 <= FILE_BYTES);
const _: () = assert!(SLOT_BASE + SLOTS * SLOT_WORDS <= CLIENT_BASE);

/// Fields of a slot record (word index within the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Field {
    /// Process id (0 = empty slot).
    Pid = 0,
    /// Process start time (ticks).
    StartTime,
    /// Application version.
    AppVersion,
    /// [`Role`].
    Role,
    /// [`State`].
    State,
    /// Epoch the engine is in.
    Epoch,
    /// Agreed layout version.
    Layout,
    /// Enabled feature set.
    Features,
    /// Transactions committed (active) or applied (standby).
    Commits,
    /// Input position.
    InputPos,
    /// Last heartbeat, CLOCK_MONOTONIC ns.
    HeartbeatNs,
    /// Times this engine stepped up.
    StepUps,
    /// CLOCK_REALTIME ns of the last step-up.
    LastStepUpNs,
    /// Duration of the last step-up (detection → active), ns.
    LastStepUpDurNs,
    /// Attach generation (bumped by a standby at every attach).
    AttachGen,
    /// State digest.
    Digest,
    /// Requests handled in total.
    Requests,
    /// Replication lag in bytes (standby).
    LagBytes,
    /// Peer's application version (0 = none) as seen by this engine.
    PeerVersion,
    /// Per-slot command to the engine ([`SlotCmd`]).
    Cmd,
    /// Features both engines can enable.
    Enableable,
    /// Last error code (0 = none).
    Error,
    /// Pause of the last planned switchover, ns (active side: last request before → first after).
    SwitchPauseNs,
    /// The application's name hash.
    AppHash,
    /// Transactions committed when this engine last stepped up.
    StepUpCommits,
    /// Digest when this engine last stepped up.
    StepUpDigest,
    /// Requests the application refused (its handler returned an error), in total.
    Refusals,
    /// 99th percentile of the active's request service time (handler + commit to every
    /// standby + response), ns, over one request in 4, in windows of at least 1000 timed
    /// requests or 1 s (a power-of-two bucket's upper bound).
    ServiceP99Ns,
    /// 1 once the active committed a transaction since it became active (set before the
    /// first commit is replicated; 0 while a standby).
    Served,
}

/// Slot fields are only appended (engines of two versions share the control block).
const _: () = assert!((Field::Served as usize) < SLOT_WORDS);

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
                w(W_EPOCH, 0);
                w(W_ACTIVE, NO_SLOT);
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
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The robust mutex the active's writing thread holds.
    pub fn lock(&self) -> RobustLock {
        // SAFETY: initialised before READY was published; inside the mapping, which lives as
        // long as `self.map` (the caller keeps the Control alive while using the lock).
        unsafe { RobustLock::from_ptr(self.map.as_mut_ptr().add(LOCK_OFFSET)) }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.words.word(W_EPOCH).load(Ordering::Acquire)
    }

    /// The active slot, if any.
    pub fn active_slot(&self) -> Option<usize> {
        let s = self.words.word(W_ACTIVE).load(Ordering::Acquire);
        (s < SLOTS as u64).then_some(s as usize)
    }

    /// Become active: bump the epoch from `from` to `from + 1` and record `slot` as active,
    /// only if nobody else bumped it first. Returns the new epoch.
    pub fn claim_epoch(&self, from: u64, slot: usize) -> Option<u64> {
        // SYNC POINT: epoch claimed (AcqRel CAS; every engine reads the epoch with Acquire).
        self.words
            .word(W_EPOCH)
            .compare_exchange(from, from + 1, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        self.words
            .word(W_ACTIVE)
            .store(slot as u64, Ordering::Release);
        Some(from + 1)
    }

    /// A slot field.
    pub fn slot_word(&self, slot: usize, f: Field) -> &AtomicU64 {
        assert!(slot < SLOTS);
        self.words.word(SLOT_BASE + slot * SLOT_WORDS + f as usize)
    }

    /// Read a slot field.
    pub fn get(&self, slot: usize, f: Field) -> u64 {
        self.slot_word(slot, f).load(Ordering::Acquire)
    }

    /// Write a slot field.
    pub fn set(&self, slot: usize, f: Field, v: u64) {
        self.slot_word(slot, f).store(v, Ordering::Release)
    }

    /// Post a command to the active; returns its sequence number.
    pub fn post(&self, command: u64, arg: u64) -> u64 {
        let seq = self.words.word(W_CMD_SEQ).load(Ordering::Acquire) + 1;
        self.words.word(W_CMD).store(command, Ordering::Relaxed);
        self.words.word(W_CMD_ARG).store(arg, Ordering::Relaxed);
        // SYNC POINT: command posted (Release; Acquire in `pending`).
        self.words.word(W_CMD_SEQ).store(seq, Ordering::Release);
        seq
    }

    /// The command pending for the active, if its sequence is newer than the last acked.
    pub fn pending(&self) -> Option<(u64, u64, u64)> {
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
        self.words.word(W_CMD_ACK).store(seq, Ordering::Release);
    }

    /// The acked sequence and result.
    pub fn acked(&self) -> (u64, u64) {
        let a = self.words.word(W_CMD_ACK).load(Ordering::Acquire);
        (a, self.words.word(W_CMD_RESULT).load(Ordering::Relaxed))
    }

    /// Supervisor identity words (pid, start time).
    pub fn supervisor_word(&self, i: usize) -> &AtomicU64 {
        assert!(i < 2);
        self.words.word(W_SUPERVISOR + i)
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
