//! Liveness: who is alive, and how the standby learns within microseconds that the active died.
//!
//! Three tools, fastest first:
//!
//! 1. [`RobustLock`]: a process-shared *robust* pthread mutex in shared memory. The active's
//!    writing thread locks it when it becomes active and holds it for its whole life. When that
//!    thread dies (SIGKILL, segfault, anything), the kernel walks the thread's robust list and
//!    sets [`FUTEX_OWNER_DIED`] in the mutex's futex word. That happens in `exit_mm`, *before*
//!    the dying process's address space is torn down, so a standby spinning on the word with
//!    [`DeathWatch`] sees the death tens of microseconds after the signal, with no syscall.
//! 2. [`Pidfd`]: a backstop. It becomes readable only once the process has fully exited, which
//!    is after its memory has been freed: for a process with a large working set that is many
//!    milliseconds later.
//! 3. [`ProcessIdentity`]: a `(pid, start time)` pair that names one process for its whole life
//!    and never a later process that reuses the pid. It is the slow path, read from `/proc`, for
//!    deciding whether the peer recorded in shared memory is still the one running.
//!
//! This layer knows about processes, threads and the kernel. It must never know about the
//! store, frames or the replication protocol: callers decide what a death *means*.
//!
//! # Examples
//!
//! ```
//! use understudy_control::liveness::{current_tid, LockOutcome, LockWord, RobustLock};
//!
//! // In production this is a MAP_SHARED mapping of a file under /dev/shm; any mapping with
//! // 64-byte alignment works for a single process.
//! let mut map = memmap2::MmapMut::map_anon(4096).unwrap();
//! let ptr = map.as_mut_ptr();
//! // SAFETY: `ptr` is page aligned, 4096 >= RobustLock::SIZE bytes, and outlives `lock`.
//! unsafe { RobustLock::init(ptr).unwrap() };
//! // SAFETY: as above; the mutex was just initialised.
//! let lock = unsafe { RobustLock::from_ptr(ptr) };
//!
//! assert_eq!(lock.lock().unwrap(), LockOutcome::Acquired);
//! assert_eq!(lock.word(), LockWord::Held { tid: current_tid(), waiters: false });
//! assert!(!lock.owner_died());
//! lock.unlock().unwrap();
//! assert_eq!(lock.word(), LockWord::Free);
//! ```

use std::fmt;
use std::io;
use std::mem::{align_of, size_of};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Process identity
// ---------------------------------------------------------------------------------------------

/// The fields of `/proc/<pid>/stat` that liveness needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 1: the pid the kernel reports.
    pub pid: u32,
    /// Field 3: the one-letter state (`R`, `S`, `D`, `Z`, `X`, ...).
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_time_ticks: u64,
}

/// Why `/proc/<pid>/stat` could not be read or parsed.
#[derive(Debug)]
pub enum ProcStatError {
    /// `/proc/<pid>/stat` does not exist: the process has been reaped (or never existed).
    NoSuchProcess {
        /// The pid looked up.
        pid: u32,
    },
    /// Reading the file failed for another reason.
    Io {
        /// The pid looked up.
        pid: u32,
        /// The underlying error.
        source: io::Error,
    },
    /// The file did not have the expected shape.
    Malformed {
        /// What the parser expected.
        expected: &'static str,
        /// What it found instead.
        found: String,
    },
}

impl fmt::Display for ProcStatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSuchProcess { pid } => {
                write!(
                    f,
                    "expected /proc/{pid}/stat to exist, found no such process"
                )
            }
            Self::Io { pid, source } => write!(f, "reading /proc/{pid}/stat failed: {source}"),
            Self::Malformed { expected, found } => {
                write!(
                    f,
                    "malformed /proc/<pid>/stat: expected {expected}, found {found:?}"
                )
            }
        }
    }
}

impl std::error::Error for ProcStatError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl ProcStat {
    /// Index of the start time among the fields after the `)` that closes `comm`: the state is
    /// field 3 at index 0, so field 22 is at index 19.
    const START_TIME_INDEX: usize = 22 - 3;

    /// Parses one `/proc/<pid>/stat` line.
    ///
    /// `comm` (field 2) may contain spaces and `)`, so the parser splits at the *last* `)`.
    ///
    /// # Examples
    ///
    /// ```
    /// use understudy_control::liveness::ProcStat;
    /// let line = "42 (a) b (c)) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0 0";
    /// let stat = ProcStat::parse(line).unwrap();
    /// assert_eq!((stat.pid, stat.state, stat.start_time_ticks), (42, 'S', 777));
    /// ```
    pub fn parse(line: &str) -> Result<ProcStat, ProcStatError> {
        let malformed = |expected| ProcStatError::Malformed {
            expected,
            found: line.chars().take(200).collect(),
        };
        let open = line
            .find(" (")
            .ok_or_else(|| malformed("`<pid> (<comm>) ...`"))?;
        let close = line
            .rfind(')')
            .ok_or_else(|| malformed("`)` closing comm"))?;
        if close < open {
            return Err(malformed("`(` before the last `)`"));
        }
        let pid = line[..open]
            .trim()
            .parse::<u32>()
            .map_err(|_| malformed("a decimal pid before ` (`"))?;
        let mut fields = line[close + 1..].split_ascii_whitespace();
        let state_field = fields
            .next()
            .ok_or_else(|| malformed("a state after `)`"))?;
        let mut state_chars = state_field.chars();
        let state = match (state_chars.next(), state_chars.next()) {
            (Some(c), None) => c,
            _ => return Err(malformed("a one-letter state after `)`")),
        };
        let start_time_ticks = fields
            .nth(Self::START_TIME_INDEX - 1)
            .ok_or_else(|| malformed("at least 22 fields"))?
            .parse::<u64>()
            .map_err(|_| malformed("a decimal start time in field 22"))?;
        Ok(ProcStat {
            pid,
            state,
            start_time_ticks,
        })
    }

    /// Reads and parses `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Result<ProcStat, ProcStatError> {
        let path = format!("/proc/{pid}/stat");
        let line = std::fs::read_to_string(&path).map_err(|source| {
            // ESRCH: the process exited between open and read.
            if source.kind() == io::ErrorKind::NotFound
                || source.raw_os_error() == Some(libc::ESRCH)
            {
                ProcStatError::NoSuchProcess { pid }
            } else {
                ProcStatError::Io { pid, source }
            }
        })?;
        let stat = Self::parse(&line)?;
        if stat.pid != pid {
            return Err(ProcStatError::Malformed {
                expected: "the pid of the file's directory in field 1",
                found: format!("{} in {path}", stat.pid),
            });
        }
        Ok(stat)
    }

    /// `true` for the states of a process that has exited but not been reaped (`Z`) or is
    /// being reaped (`X`/`x`). Such a process will never run again.
    pub fn is_exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// One process for its whole life: a pid plus the tick at which that process started.
///
/// A pid alone is not an identity: after a process is reaped its pid can be reused. The start
/// time (field 22 of `/proc/<pid>/stat`, clock ticks after boot) tells the two apart. Two
/// processes share both only if the pid space wraps within one clock tick (10 ms), which the
/// kernel's pid allocator makes impossible in practice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    /// Process id (thread-group id).
    pub pid: u32,
    /// Start time in clock ticks after boot.
    pub start_time_ticks: u64,
}

/// What `/proc` says about a [`ProcessIdentity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// The process is running (or sleeping, or stopped): it may still act.
    Alive,
    /// The process has exited and has not been reaped yet (state `Z`/`X`).
    Exited,
    /// No process has this pid any more: it was reaped.
    Reaped,
    /// The pid now belongs to a different, later process.
    PidReused {
        /// Start time of the process that now holds the pid.
        found_start_time_ticks: u64,
    },
}

/// Why two shared-memory words do not hold a [`ProcessIdentity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityWordsError {
    /// The pid word is not a valid pid.
    PidOutOfRange {
        /// The pid word found.
        found: u64,
    },
}

impl fmt::Display for IdentityWordsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PidOutOfRange { found } => {
                write!(f, "expected a pid word in 1..={}, found {found}", u32::MAX)
            }
        }
    }
}

impl std::error::Error for IdentityWordsError {}

impl ProcessIdentity {
    /// The identity of the calling process.
    pub fn current() -> Result<ProcessIdentity, ProcStatError> {
        Self::of(std::process::id())
    }

    /// The identity of the process that has `pid` now.
    pub fn of(pid: u32) -> Result<ProcessIdentity, ProcStatError> {
        let stat = ProcStat::read(pid)?;
        Ok(ProcessIdentity {
            pid,
            start_time_ticks: stat.start_time_ticks,
        })
    }

    /// What `/proc` says about this process now.
    pub fn check(&self) -> Result<Liveness, ProcStatError> {
        match ProcStat::read(self.pid) {
            Err(ProcStatError::NoSuchProcess { .. }) => Ok(Liveness::Reaped),
            Err(other) => Err(other),
            Ok(stat) if stat.start_time_ticks != self.start_time_ticks => Ok(Liveness::PidReused {
                found_start_time_ticks: stat.start_time_ticks,
            }),
            Ok(stat) if stat.is_exited() => Ok(Liveness::Exited),
            Ok(_) => Ok(Liveness::Alive),
        }
    }

    /// `true` only if `/proc/<pid>/stat` exists, its start time matches, and the process is
    /// not a zombie.
    ///
    /// Any error reading `/proc` counts as "not alive". A caller for whom a false "dead" is
    /// costly (it would trigger a failover) should use [`check`](Self::check) and treat
    /// `Err` as "unknown".
    pub fn is_alive(&self) -> bool {
        matches!(self.check(), Ok(Liveness::Alive))
    }

    /// Two words for a shared-memory slot: `[pid, start_time_ticks]`.
    pub fn to_words(&self) -> [u64; 2] {
        [u64::from(self.pid), self.start_time_ticks]
    }

    /// The inverse of [`to_words`](Self::to_words).
    pub fn from_words(words: [u64; 2]) -> Result<ProcessIdentity, IdentityWordsError> {
        let [pid_word, start_time_ticks] = words;
        match u32::try_from(pid_word) {
            Ok(pid) if pid != 0 => Ok(ProcessIdentity {
                pid,
                start_time_ticks,
            }),
            _ => Err(IdentityWordsError::PidOutOfRange { found: pid_word }),
        }
    }
}

/// The kernel thread id (TID) of the calling thread: what a robust mutex records as owner.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::gettid() };
    u32::try_from(tid).expect("the kernel returns positive thread ids")
}

// ---------------------------------------------------------------------------------------------
// Robust lock
// ---------------------------------------------------------------------------------------------

// The futex word layout is a glibc implementation detail: `pthread_mutex_t` is a union whose
// first member, `__data.__lock` (an `int`), is the futex word on every glibc architecture. For
// a robust mutex glibc stores the owner's TID there, and the kernel's robust-list walk
// (`handle_futex_death`) rewrites it at thread exit. We support the targets where we have
// checked the size; elsewhere the build stops here rather than guess.
#[cfg(not(all(
    target_os = "linux",
    target_env = "gnu",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
compile_error!(
    "liveness::RobustLock reads glibc's pthread_mutex_t futex word; only x86_64 and aarch64 \
     Linux glibc layouts are checked"
);

#[cfg(target_arch = "x86_64")]
const _: () = assert!(size_of::<libc::pthread_mutex_t>() == 40);
#[cfg(target_arch = "aarch64")]
const _: () = assert!(size_of::<libc::pthread_mutex_t>() == 48);
const _: () = assert!(size_of::<libc::pthread_mutex_t>() <= RobustLock::SIZE);
const _: () = assert!(align_of::<libc::pthread_mutex_t>() <= RobustLock::ALIGN);
const _: () = assert!(align_of::<libc::pthread_mutex_t>() >= align_of::<AtomicU32>());

/// Set in the futex word by the kernel when the owner died holding the mutex.
pub const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
/// Set in the futex word when other threads sleep in `FUTEX_WAIT` on the mutex.
pub const FUTEX_WAITERS: u32 = 0x8000_0000;
/// The owner-TID bits of the futex word.
pub const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// The futex word of a robust mutex, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockWord {
    /// Word 0: nobody holds the mutex. Either never locked, unlocked cleanly, or made
    /// unrecoverable by an owner that unlocked without calling `pthread_mutex_consistent`.
    Free,
    /// The thread `tid` holds the mutex.
    Held {
        /// Kernel TID of the holder (in the pid namespace of the locking process).
        tid: u32,
        /// Other threads sleep waiting for it.
        waiters: bool,
    },
    /// The holder died holding the mutex; the next `lock` returns `EOWNERDEAD`. The kernel
    /// clears the TID bits when it sets [`FUTEX_OWNER_DIED`]; the next locker clears the bit.
    OwnerDied {
        /// Other threads sleep waiting for it.
        waiters: bool,
    },
}

impl LockWord {
    /// Decodes a raw futex word.
    pub fn decode(raw: u32) -> LockWord {
        let waiters = raw & FUTEX_WAITERS != 0;
        if raw & FUTEX_OWNER_DIED != 0 {
            LockWord::OwnerDied { waiters }
        } else if raw & FUTEX_TID_MASK != 0 {
            LockWord::Held {
                tid: raw & FUTEX_TID_MASK,
                waiters,
            }
        } else {
            // Only FUTEX_WAITERS (or nothing): glibc never leaves a free robust mutex with
            // waiters set for long, and nobody holds it either way.
            LockWord::Free
        }
    }
}

/// What [`RobustLock::lock`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockOutcome {
    /// The caller holds the lock; the previous holder released it cleanly.
    Acquired,
    /// The caller holds the lock; the previous holder *died* holding it (`EOWNERDEAD`). The
    /// lock has been marked consistent again, but the data it protects may be half-written:
    /// the caller must repair or discard it.
    OwnerDied,
}

/// What [`RobustLock::try_lock`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryLockOutcome {
    /// As [`LockOutcome::Acquired`].
    Acquired,
    /// As [`LockOutcome::OwnerDied`].
    OwnerDied,
    /// Another live thread holds the lock; the caller does not.
    WouldBlock,
}

/// Why a [`RobustLock`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockError {
    /// `EDEADLK`: the calling thread already holds the lock.
    AlreadyHeldByCaller {
        /// The calling thread.
        tid: u32,
    },
    /// `EPERM` on unlock: the calling thread does not hold the lock.
    NotOwner {
        /// The calling thread.
        caller_tid: u32,
        /// What the futex word said.
        found: LockWord,
    },
    /// `ENOTRECOVERABLE`: an earlier holder got `EOWNERDEAD` and unlocked without making the
    /// mutex consistent. Re-initialise the lock (with no one using it) to recover.
    NotRecoverable,
    /// Any other error code.
    Os {
        /// The pthread call that failed.
        call: &'static str,
        /// The errno it returned.
        errno: i32,
    },
}

impl fmt::Display for LockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyHeldByCaller { tid } => {
                write!(f, "expected the lock to be free or held by another thread, found it held by the caller (tid {tid})")
            }
            Self::NotOwner { caller_tid, found } => {
                write!(
                    f,
                    "expected the lock held by the caller (tid {caller_tid}), found {found:?}"
                )
            }
            Self::NotRecoverable => write!(
                f,
                "expected a usable robust mutex, found it not recoverable (a holder saw \
                 EOWNERDEAD and unlocked without pthread_mutex_consistent); re-initialise it"
            ),
            Self::Os { call, errno } => write!(
                f,
                "{call}: expected success, found {}",
                io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for LockError {}

/// A handle to a process-shared robust pthread mutex that lives in shared memory.
///
/// The mutex is an error-checking, process-shared, robust mutex. Its contract:
///
/// - The thread that locks it is the thread that unlocks it. Unlocking from another thread
///   fails with [`LockError::NotOwner`]. The active's writing thread locks it when it becomes
///   active and keeps it until it dies, so that its death is the lock's death.
/// - When the holding thread dies, the kernel marks the futex word [`FUTEX_OWNER_DIED`]
///   ([`owner_died`](Self::owner_died) turns `true`) and the next [`lock`](Self::lock) returns
///   [`LockOutcome::OwnerDied`].
///
/// The handle is `Copy`: it is a pointer. Every copy is bound by [`from_ptr`](Self::from_ptr)'s
/// contract that the memory stays mapped.
#[derive(Clone, Copy, Debug)]
pub struct RobustLock {
    mutex: NonNull<libc::pthread_mutex_t>,
}

// SAFETY: a process-shared pthread mutex is designed to be used from any thread of any process;
// the pointer is valid for as long as `from_ptr`'s contract says, independent of the thread.
unsafe impl Send for RobustLock {}
// SAFETY: every operation goes through pthread calls or atomic loads, which are thread-safe.
unsafe impl Sync for RobustLock {}

impl RobustLock {
    /// Bytes a caller must reserve: one cache line, so that no other hot data shares the line
    /// the standby spins on (pthread_mutex_t itself is 40 bytes on x86_64).
    pub const SIZE: usize = 64;
    /// Alignment the caller's pointer must have.
    pub const ALIGN: usize = 64;

    fn check_ptr(ptr: *mut u8) -> io::Result<NonNull<libc::pthread_mutex_t>> {
        let Some(nonnull) = NonNull::new(ptr) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "RobustLock: expected a non-null pointer, found null",
            ));
        };
        let misalignment = ptr as usize % Self::ALIGN;
        if misalignment != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "RobustLock: expected a {}-byte aligned pointer, found {ptr:p} ({misalignment} bytes past alignment)",
                    Self::ALIGN
                ),
            ));
        }
        Ok(nonnull.cast())
    }

    /// Initialises a robust, process-shared, error-checking mutex at `ptr`, then checks that
    /// locking it puts the caller's TID in the futex word and unlocking clears it (the glibc
    /// layout assumption, verified at run time).
    ///
    /// # Safety
    ///
    /// - `ptr` points to at least [`SIZE`](Self::SIZE) writable bytes, aligned to
    ///   [`ALIGN`](Self::ALIGN) (checked; misalignment returns an error).
    /// - No process or thread is using a mutex at `ptr` while it is initialised. Re-initialising
    ///   a mutex that someone holds or waits on is undefined behaviour.
    /// - For use across processes the memory is a `MAP_SHARED` mapping.
    pub unsafe fn init(ptr: *mut u8) -> io::Result<()> {
        let mutex = Self::check_ptr(ptr)?.as_ptr();
        // SAFETY: the caller promises SIZE writable bytes at `ptr` that no one else uses.
        unsafe { std::ptr::write_bytes(ptr, 0, Self::SIZE) };

        let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
        let check = |call: &'static str, rc: libc::c_int| -> io::Result<()> {
            if rc == 0 {
                Ok(())
            } else {
                Err(io::Error::other(LockError::Os { call, errno: rc }))
            }
        };
        // SAFETY: `attr` is a valid out-pointer for pthread_mutexattr_init.
        check("pthread_mutexattr_init", unsafe {
            libc::pthread_mutexattr_init(attr.as_mut_ptr())
        })?;
        let configured = (|| {
            // SAFETY: `attr` was initialised above.
            check("pthread_mutexattr_setpshared", unsafe {
                libc::pthread_mutexattr_setpshared(attr.as_mut_ptr(), libc::PTHREAD_PROCESS_SHARED)
            })?;
            // SAFETY: `attr` was initialised above.
            check("pthread_mutexattr_setrobust", unsafe {
                libc::pthread_mutexattr_setrobust(attr.as_mut_ptr(), libc::PTHREAD_MUTEX_ROBUST)
            })?;
            // Error-checking: a relock by the holder returns EDEADLK instead of hanging.
            // SAFETY: `attr` was initialised above.
            check("pthread_mutexattr_settype", unsafe {
                libc::pthread_mutexattr_settype(attr.as_mut_ptr(), libc::PTHREAD_MUTEX_ERRORCHECK)
            })?;
            // SAFETY: `mutex` is valid, aligned, unused memory (caller's contract); `attr` is
            // initialised.
            check("pthread_mutex_init", unsafe {
                libc::pthread_mutex_init(mutex, attr.as_ptr())
            })
        })();
        // SAFETY: `attr` was initialised and is not used after this.
        unsafe { libc::pthread_mutexattr_destroy(attr.as_mut_ptr()) };
        configured?;

        // SAFETY: the mutex was just initialised at a pointer that satisfies from_ptr's contract.
        let lock = unsafe { Self::from_ptr(ptr) };
        lock.self_check().map_err(io::Error::other)
    }

    /// Verifies the futex-word assumption on a freshly initialised mutex.
    fn self_check(&self) -> Result<(), String> {
        let tid = current_tid();
        let found = self.word();
        if found != LockWord::Free {
            return Err(format!(
                "fresh mutex: expected futex word Free, found {found:?}"
            ));
        }
        match self.lock() {
            Ok(LockOutcome::Acquired) => {}
            other => {
                return Err(format!(
                    "fresh mutex: expected lock() Acquired, found {other:?}"
                ))
            }
        }
        let held = self.word();
        self.unlock().map_err(|e| e.to_string())?;
        let expected = LockWord::Held {
            tid,
            waiters: false,
        };
        if held != expected {
            return Err(format!(
                "glibc layout: expected futex word {expected:?} while locked, found {held:?}"
            ));
        }
        let found = self.word();
        if found != LockWord::Free {
            return Err(format!(
                "glibc layout: expected futex word Free after unlock, found {found:?}"
            ));
        }
        Ok(())
    }

    /// A handle to the mutex at `ptr`.
    ///
    /// # Safety
    ///
    /// - `ptr` points to a mutex initialised by [`init`](Self::init) (in this or another
    ///   process) and stays mapped, unmoved, for as long as this handle or any copy is used.
    ///
    /// # Panics
    ///
    /// If `ptr` is null or not aligned to [`ALIGN`](Self::ALIGN): that breaks the contract above.
    pub unsafe fn from_ptr(ptr: *mut u8) -> RobustLock {
        match Self::check_ptr(ptr) {
            Ok(mutex) => RobustLock { mutex },
            Err(e) => panic!("{e}"),
        }
    }

    fn finish_lock(
        &self,
        call: &'static str,
        rc: libc::c_int,
    ) -> Result<TryLockOutcome, LockError> {
        match rc {
            0 => Ok(TryLockOutcome::Acquired),
            libc::EBUSY => Ok(TryLockOutcome::WouldBlock),
            libc::EOWNERDEAD => {
                // The caller holds the mutex now; make it usable again. The protected data
                // is the caller's to repair, as LockOutcome::OwnerDied documents.
                // SAFETY: valid mutex (from_ptr contract), held by this thread after EOWNERDEAD.
                let rc = unsafe { libc::pthread_mutex_consistent(self.mutex.as_ptr()) };
                if rc != 0 {
                    return Err(LockError::Os {
                        call: "pthread_mutex_consistent",
                        errno: rc,
                    });
                }
                Ok(TryLockOutcome::OwnerDied)
            }
            libc::EDEADLK => Err(LockError::AlreadyHeldByCaller { tid: current_tid() }),
            libc::ENOTRECOVERABLE => Err(LockError::NotRecoverable),
            errno => Err(LockError::Os { call, errno }),
        }
    }

    /// Locks, blocking while another live thread holds the lock.
    pub fn lock(&self) -> Result<LockOutcome, LockError> {
        // SAFETY: valid, initialised mutex (from_ptr contract).
        let rc = unsafe { libc::pthread_mutex_lock(self.mutex.as_ptr()) };
        match self.finish_lock("pthread_mutex_lock", rc)? {
            TryLockOutcome::Acquired => Ok(LockOutcome::Acquired),
            TryLockOutcome::OwnerDied => Ok(LockOutcome::OwnerDied),
            TryLockOutcome::WouldBlock => Err(LockError::Os {
                call: "pthread_mutex_lock",
                errno: libc::EBUSY,
            }),
        }
    }

    /// Locks if no live thread holds the lock; never blocks.
    pub fn try_lock(&self) -> Result<TryLockOutcome, LockError> {
        // SAFETY: valid, initialised mutex (from_ptr contract).
        let rc = unsafe { libc::pthread_mutex_trylock(self.mutex.as_ptr()) };
        self.finish_lock("pthread_mutex_trylock", rc)
    }

    /// Unlocks. Only the thread that locked may unlock.
    pub fn unlock(&self) -> Result<(), LockError> {
        // SAFETY: valid, initialised mutex (from_ptr contract). glibc checks the owner for
        // error-checking robust mutexes and returns EPERM otherwise.
        let rc = unsafe { libc::pthread_mutex_unlock(self.mutex.as_ptr()) };
        match rc {
            0 => Ok(()),
            libc::EPERM => Err(LockError::NotOwner {
                caller_tid: current_tid(),
                found: self.word(),
            }),
            errno => Err(LockError::Os {
                call: "pthread_mutex_unlock",
                errno,
            }),
        }
    }

    /// The mutex's futex word (`__data.__lock`, the first 4 bytes of glibc's `pthread_mutex_t`).
    ///
    /// Read it; never write it: glibc and the kernel own it.
    pub fn futex_word(&self) -> &AtomicU32 {
        // SAFETY: the mutex is valid for the handle's use (from_ptr contract); its first 4 bytes
        // are glibc's `int __lock`, aligned for AtomicU32 (const-asserted), and only ever
        // modified atomically (glibc's CAS/exchange and the kernel's futex cmpxchg), so viewing
        // them as an AtomicU32 races with nothing non-atomic.
        unsafe { &*self.mutex.as_ptr().cast::<AtomicU32>() }
    }

    /// The futex word, decoded. No syscall.
    pub fn word(&self) -> LockWord {
        // SYNC POINT: owner death published. The kernel's cmpxchg that sets FUTEX_OWNER_DIED
        // pairs with this Acquire load, so the watcher's later reads of shared state happen
        // after everything the dead holder wrote before it died.
        LockWord::decode(self.futex_word().load(Ordering::Acquire))
    }

    /// `true` while the word says the holder died and no one has locked it since.
    ///
    /// Once a survivor locks (getting [`LockOutcome::OwnerDied`]) the bit is cleared, so a
    /// watcher that must not miss a death should use [`DeathWatch`], which also treats "held by
    /// someone else now" as the watched holder being gone.
    pub fn owner_died(&self) -> bool {
        matches!(self.word(), LockWord::OwnerDied { .. })
    }

    /// The TID of the live holder, if any.
    pub fn holder_tid(&self) -> Option<u32> {
        match self.word() {
            LockWord::Held { tid, .. } => Some(tid),
            LockWord::Free | LockWord::OwnerDied { .. } => None,
        }
    }

    /// Marks the mutex owner-died on behalf of a holder thread that is gone, exactly as the
    /// kernel's robust-list walk (`handle_futex_death`) would have done at its exit. Returns
    /// `true` if the word still named `dead_tid` and now says owner-died (the next
    /// [`try_lock`](Self::try_lock) returns [`TryLockOutcome::OwnerDied`]), `false` if the word
    /// changed in between (someone locked, unlocked or recovered it first: nothing is done).
    ///
    /// Why it is needed: the kernel marks a robust mutex only if the holder's memory still maps
    /// it when the thread exits. A process that unmapped it first (a panic unwinding through the
    /// owner of the mapping, a library's own cleanup) leaves the word naming a dead thread
    /// forever, and `pthread_mutex_trylock` reports `EBUSY` for good.
    ///
    /// The caller must have proved that `dead_tid` can never run again (see
    /// [`thread_is_gone`]): marking a live holder's mutex would hand its lock to a second
    /// owner. The compare-and-swap makes the mark conditional on the exact word the proof was
    /// about, so a concurrent locker or a second recoverer cannot be overwritten.
    pub fn recover_dead_holder(&self, dead_tid: u32) -> bool {
        let word = self.futex_word();
        let old = word.load(Ordering::Acquire);
        if old & FUTEX_OWNER_DIED != 0 || old & FUTEX_TID_MASK != dead_tid || dead_tid == 0 {
            return false;
        }
        let new = (old & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
        // SYNC POINT: dead holder recovered. Pairs with the Acquire load in `word()` and with
        // glibc's acquire CAS in trylock, like the kernel's own cmpxchg in handle_futex_death.
        let swapped = word
            .compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if swapped && old & FUTEX_WAITERS != 0 {
            // Sleepers in FUTEX_WAIT would otherwise sleep on: wake one, as the kernel does.
            // SAFETY: FUTEX_WAKE on a valid, mapped, 4-byte aligned futex word (from_ptr
            // contract); it reads no user memory beyond the word.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    word.as_ptr(),
                    libc::FUTEX_WAKE,
                    1,
                    std::ptr::null::<libc::timespec>(),
                );
            }
        }
        swapped
    }
}

/// The process (thread group) thread `tid` belongs to, from `/proc/<tid>/status`; `None` if the
/// thread is gone or the file cannot be read.
pub fn thread_group_of(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether process `pid` has the file at `path` mapped: a line of `/proc/<pid>/maps` names its
/// device and inode; `None` if the maps or the file cannot be read (the process is gone or
/// belongs to another user, the file is gone).
///
/// Compared by device and inode, never by the path's text: the kernel writes the canonical
/// path, which differs from the one we were given for a relative directory, a `//`, a symlinked
/// ancestor (`/dev/shm -> /run/shm`) or an unlinked file (` (deleted)`), and a live engine must
/// never read as "not mapping it" (its lock would be taken from it).
///
/// An engine keeps its cluster's control block mapped for as long as it may hold the robust
/// mutex, so "the holder's process maps our control file" tells a live engine from an
/// unrelated thread that was given a dead holder's thread id.
///
/// "Not mapped" is answered only after [`MAPS_READS`] reads all said so: the kernel writes
/// `/proc/<pid>/maps` a page at a time and resumes by address, so a read that races with the
/// process mapping or unmapping other files (an active does, for its rings) can miss a line,
/// and one missed line would make a live engine's lock look free.
pub fn process_maps_file(pid: u32, path: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    for _ in 0..MAPS_READS {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
        if maps_name_file(&maps, meta.dev(), meta.ino()) {
            return Some(true);
        }
    }
    Some(false)
}

/// Reads of `/proc/<pid>/maps` that must all miss a file before [`process_maps_file`] says
/// the process does not map it.
pub const MAPS_READS: usize = 3;

/// Whether a `/proc/<pid>/maps` text has a line for device `dev` (as `st_dev`) and inode `ino`.
fn maps_name_file(maps: &str, dev: u64, ino: u64) -> bool {
    let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
    maps.lines().any(|l| {
        let mut f = l.split_ascii_whitespace().skip(3);
        let (Some(d), Some(i)) = (f.next(), f.next()) else {
            return false;
        };
        let Some((ma, mi)) = d.split_once(':') else {
            return false;
        };
        u64::from_str_radix(ma, 16) == Ok(major)
            && u64::from_str_radix(mi, 16) == Ok(minor)
            && i.parse::<u64>() == Ok(ino)
    })
}

/// `true` if thread `tid` can never run again: no thread has that id (`/proc/<tid>` is gone), or
/// it is an exited, unreaped process leader (state `Z`/`X`).
///
/// A tid reused by an unrelated live thread reads as alive: the answer errs on the side that
/// never takes a live holder's lock. An I/O error other than "no such process" also reads as
/// alive.
pub fn thread_is_gone(tid: u32) -> bool {
    if tid == 0 || tid > FUTEX_TID_MASK {
        return false;
    }
    match ProcStat::read(tid) {
        Err(ProcStatError::NoSuchProcess { .. }) => true,
        Ok(stat) => stat.is_exited(),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Death watch
// ---------------------------------------------------------------------------------------------

/// How [`DeathWatch::spin_until_dead`] waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinPolicy {
    /// Reads of the word with only `spin_loop` between them before the watcher starts calling
    /// `yield_now` between reads. `u64::MAX` never yields (a dedicated core).
    pub spins_before_yield: u64,
    /// Give up after this long; `None` waits forever.
    pub timeout: Option<Duration>,
}

impl SpinPolicy {
    /// Reads of the word between two clock reads: `Instant::now` costs ~20 ns, a read of a
    /// cached word ~1 ns, so the deadline check stays under 10% of the loop.
    const READS_PER_CLOCK_CHECK: u64 = 256;

    /// Pure spinning on a dedicated core, never yielding, until `timeout`.
    pub fn busy_for(timeout: Duration) -> SpinPolicy {
        SpinPolicy {
            spins_before_yield: u64::MAX,
            timeout: Some(timeout),
        }
    }

    /// Spin for ~100k reads (tens of microseconds), then yield between reads, until `timeout`.
    pub fn polite_for(timeout: Duration) -> SpinPolicy {
        SpinPolicy {
            spins_before_yield: 100_000,
            timeout: Some(timeout),
        }
    }
}

/// How the watched holder stopped holding the lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HolderGone {
    /// The holder died holding it: the kernel set [`FUTEX_OWNER_DIED`].
    OwnerDied,
    /// The holder unlocked it cleanly (a deliberate resignation, not a death).
    Released,
    /// Another thread holds it now. The watched holder either unlocked or died and a survivor
    /// locked before this watcher looked; either way it no longer holds the lock.
    Replaced {
        /// The new holder.
        by_tid: u32,
    },
}

/// Why a [`DeathWatch`] could not be armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArmError {
    /// Nobody live holds the lock, so there is no holder to watch.
    NotHeld {
        /// What the futex word said.
        found: LockWord,
    },
}

impl fmt::Display for ArmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotHeld { found } => {
                write!(
                    f,
                    "expected the lock held by a live thread, found {found:?}"
                )
            }
        }
    }
}

impl std::error::Error for ArmError {}

/// The watched holder was still holding the lock when the timeout ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchTimedOut {
    /// The holder being watched.
    pub holder_tid: u32,
    /// How long the watcher waited.
    pub waited: Duration,
}

impl fmt::Display for WatchTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "expected holder tid {} to die or release within {:?}, found it still holding",
            self.holder_tid, self.waited
        )
    }
}

impl std::error::Error for WatchTimedOut {}

/// Watches one holder of a [`RobustLock`] by reading its futex word: no syscall on the hot path.
#[derive(Clone, Copy, Debug)]
pub struct DeathWatch {
    lock: RobustLock,
    holder_tid: u32,
}

impl DeathWatch {
    /// Starts watching whoever holds `lock` now.
    pub fn arm(lock: RobustLock) -> Result<DeathWatch, ArmError> {
        match lock.word() {
            LockWord::Held { tid, .. } => Ok(DeathWatch {
                lock,
                holder_tid: tid,
            }),
            found => Err(ArmError::NotHeld { found }),
        }
    }

    /// The TID being watched.
    pub fn holder_tid(&self) -> u32 {
        self.holder_tid
    }

    /// One read of the word: `None` while the watched holder still holds the lock.
    pub fn poll(&self) -> Option<HolderGone> {
        match self.lock.word() {
            LockWord::Held { tid, .. } if tid == self.holder_tid => None,
            LockWord::Held { tid, .. } => Some(HolderGone::Replaced { by_tid: tid }),
            LockWord::OwnerDied { .. } => Some(HolderGone::OwnerDied),
            LockWord::Free => Some(HolderGone::Released),
        }
    }

    /// Spins on the word until the watched holder is gone or `policy.timeout` runs out.
    pub fn spin_until_dead(&self, policy: SpinPolicy) -> Result<HolderGone, WatchTimedOut> {
        let start = Instant::now();
        let mut reads: u64 = 0;
        loop {
            if let Some(gone) = self.poll() {
                return Ok(gone);
            }
            reads = reads.wrapping_add(1);
            if reads >= policy.spins_before_yield {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
            if reads % SpinPolicy::READS_PER_CLOCK_CHECK == 0 {
                if let Some(timeout) = policy.timeout {
                    let waited = start.elapsed();
                    if waited >= timeout {
                        // One last look, so a death right at the deadline is not lost.
                        return self.poll().ok_or(WatchTimedOut {
                            holder_tid: self.holder_tid,
                            waited,
                        });
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pidfd backstop
// ---------------------------------------------------------------------------------------------

/// Why [`Pidfd::open_identity`] failed.
#[derive(Debug)]
pub enum PidfdOpenError {
    /// `pidfd_open` failed (`ESRCH`: no such pid).
    Open(io::Error),
    /// The pid now names a different process (or `/proc` said it is gone).
    NotThatProcess {
        /// The identity asked for.
        expected: ProcessIdentity,
        /// What `/proc` said after the pidfd was opened.
        found: Liveness,
    },
    /// `/proc` could not be read to confirm the identity.
    Check(ProcStatError),
}

impl fmt::Display for PidfdOpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(e) => write!(f, "pidfd_open failed: {e}"),
            Self::NotThatProcess { expected, found } => {
                write!(
                    f,
                    "expected {expected:?} alive after pidfd_open, found {found:?}"
                )
            }
            Self::Check(e) => write!(f, "confirming identity after pidfd_open: {e}"),
        }
    }
}

impl std::error::Error for PidfdOpenError {}

/// A pidfd: a file descriptor that becomes readable when its process has exited.
///
/// Slow but sure: it fires after the exiting process's memory has been freed, so use it as a
/// backstop to [`DeathWatch`], not instead of it.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// Opens a pidfd for `pid` (`pidfd_open(2)`, Linux 5.3+).
    ///
    /// The pid is only a number: if the process may already have been reaped, use
    /// [`open_identity`](Self::open_identity).
    pub fn open(pid: u32) -> io::Result<Pidfd> {
        let pid_t = libc::pid_t::try_from(pid).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "pidfd_open: expected a pid <= {}, found {pid}",
                    libc::pid_t::MAX
                ),
            )
        })?;
        // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
        let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid_t, 0 as libc::c_uint) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = libc::c_int::try_from(rc).expect("the kernel returns fds that fit in c_int");
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Pidfd { fd, pid })
    }

    /// Opens a pidfd for exactly the process `identity`, never for a later user of its pid.
    ///
    /// Race-free: the identity's start time is in the past, so if `/proc` still shows that
    /// start time *after* the pidfd was opened, the process was alive across the open and the
    /// pidfd refers to it.
    pub fn open_identity(identity: &ProcessIdentity) -> Result<Pidfd, PidfdOpenError> {
        let pidfd = Self::open(identity.pid).map_err(PidfdOpenError::Open)?;
        match identity.check().map_err(PidfdOpenError::Check)? {
            // Exited-but-unreaped still holds the pid, so the pidfd is that process too.
            Liveness::Alive | Liveness::Exited => Ok(pidfd),
            found => Err(PidfdOpenError::NotThatProcess {
                expected: *identity,
                found,
            }),
        }
    }

    /// The pid this pidfd was opened for.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to exactly the process this pidfd refers to (`pidfd_send_signal(2)`):
    /// unlike `kill(pid)`, a pid reused since the pidfd was opened is never signalled.
    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on an owned, open pidfd with a null siginfo (the kernel
        // fills in a kill-like one); it reads no user memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.as_fd().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Waits up to `timeout` (`None`: forever) for the process to exit. `Ok(true)` once it has.
    pub fn poll_exited(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let timeout_ms: libc::c_int = match deadline {
                None => -1,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Round up so we never return before the deadline.
                    let ms = left.as_nanos().div_ceil(1_000_000);
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            match rc {
                0 => return Ok(false),
                n if n > 0 => return Ok(pfd.revents & libc::POLLIN != 0),
                _ => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C, align(64))]
    struct Slot([u8; RobustLock::SIZE]);

    fn fresh_lock() -> (Box<Slot>, RobustLock) {
        let mut slot = Box::new(Slot([0xAA; RobustLock::SIZE]));
        let ptr = slot.0.as_mut_ptr();
        // SAFETY: a private, 64-byte aligned, 64-byte slot used by nobody else.
        unsafe { RobustLock::init(ptr).expect("init") };
        // SAFETY: initialised above; the Box outlives the handle in every test.
        let lock = unsafe { RobustLock::from_ptr(ptr) };
        (slot, lock)
    }

    /// A comm with spaces and `)` must not shift the fields; the last `)` closes it.
    #[test]
    fn parse_takes_the_last_paren() {
        let line =
            "1234 (evil) Z 1 2 3 (x)) R 1 1 1 0 -1 4194560 5 0 0 0 7 8 0 0 20 0 3 0 987654 1 2\n";
        let stat = ProcStat::parse(line).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                pid: 1234,
                state: 'R',
                start_time_ticks: 987654
            }
        );
    }

    /// Truncated or garbled lines are errors naming what was expected, not panics.
    #[test]
    fn parse_rejects_malformed_lines() {
        for line in [
            "",
            "12 (x",
            "12 (x) S 1 2",
            "x (y) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5",
            "1 (y) SS 1",
        ] {
            let err = ProcStat::parse(line).unwrap_err();
            assert!(
                matches!(err, ProcStatError::Malformed { .. }),
                "{line:?}: {err}"
            );
        }
    }

    /// Our own identity is alive; the same pid with another start time is not; words round-trip.
    #[test]
    fn identity_of_self() {
        let me = ProcessIdentity::current().unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.is_alive());
        let impostor = ProcessIdentity {
            start_time_ticks: me.start_time_ticks + 1,
            ..me
        };
        assert_eq!(
            impostor.check().unwrap(),
            Liveness::PidReused {
                found_start_time_ticks: me.start_time_ticks
            }
        );
        assert_eq!(ProcessIdentity::from_words(me.to_words()).unwrap(), me);
        assert_eq!(
            ProcessIdentity::from_words([1 << 40, 5]),
            Err(IdentityWordsError::PidOutOfRange { found: 1 << 40 })
        );
        assert!(ProcessIdentity::from_words([0, 5]).is_err());
    }

    /// Relocking is an error (not a hang), and only the holder may unlock.
    #[test]
    fn error_checking_and_ownership() {
        let (_slot, lock) = fresh_lock();
        assert_eq!(lock.lock(), Ok(LockOutcome::Acquired));
        assert_eq!(
            lock.lock(),
            Err(LockError::AlreadyHeldByCaller { tid: current_tid() })
        );
        let me = current_tid();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(lock.try_lock(), Ok(TryLockOutcome::WouldBlock));
                let err = lock.unlock().unwrap_err();
                assert_eq!(
                    err,
                    LockError::NotOwner {
                        caller_tid: current_tid(),
                        found: LockWord::Held {
                            tid: me,
                            waiters: false
                        }
                    }
                );
            });
        });
        lock.unlock().unwrap();
        assert_eq!(lock.word(), LockWord::Free);
    }

    /// A thread that exits holding the lock is a dead owner: the word shows it, a watcher sees
    /// it, and the next locker gets OwnerDied and a usable lock.
    #[test]
    fn thread_death_marks_owner_died() {
        let (_slot, lock) = fresh_lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            assert_eq!(lock.lock(), Ok(LockOutcome::Acquired));
            tx.send(current_tid()).unwrap();
            // Exit without unlocking once told to.
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let watch = DeathWatch::arm(lock).unwrap();
        assert_eq!(watch.holder_tid(), tid);
        assert_eq!(watch.poll(), None);
        done_tx.send(()).unwrap();
        holder.join().unwrap();
        assert_eq!(
            watch.spin_until_dead(SpinPolicy::polite_for(Duration::from_secs(10))),
            Ok(HolderGone::OwnerDied)
        );
        assert!(lock.owner_died());
        assert_eq!(lock.lock(), Ok(LockOutcome::OwnerDied));
        assert_eq!(lock.holder_tid(), Some(current_tid()));
        lock.unlock().unwrap();
        assert_eq!(lock.try_lock(), Ok(TryLockOutcome::Acquired));
        lock.unlock().unwrap();
    }

    /// A holder thread that exits without the kernel marking the word (here: its robust list
    /// emptied first, as if the mutex had been unmapped) leaves a word naming a dead thread:
    /// `try_lock` says busy forever, `thread_is_gone` proves the death, and the recovery makes
    /// the next `try_lock` an owner-died acquisition. A live holder is never recovered.
    #[test]
    fn a_dead_holder_the_kernel_did_not_mark_is_recovered() {
        #[repr(C)]
        struct RobustListHead {
            next: *mut libc::c_void,
            futex_offset: libc::c_long,
            list_op_pending: *mut libc::c_void,
        }
        let (_slot, lock) = fresh_lock();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            assert_eq!(lock.lock(), Ok(LockOutcome::Acquired));
            tx.send(current_tid()).unwrap();
            go_rx.recv().unwrap();
            // An empty robust list for this thread: the kernel's exit-time walk finds nothing.
            let head = Box::leak(Box::new(RobustListHead {
                next: std::ptr::null_mut(),
                futex_offset: 0,
                list_op_pending: std::ptr::null_mut(),
            }));
            head.next = (head as *mut RobustListHead).cast();
            // SAFETY: set_robust_list with a valid, leaked (so never freed) list head of the
            // size the kernel expects; the list is empty (it points to itself).
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_set_robust_list,
                    head as *mut RobustListHead,
                    size_of::<RobustListHead>(),
                )
            };
            assert_eq!(rc, 0, "set_robust_list");
        });
        let tid = rx.recv().unwrap();
        // Alive: not recovered, even if asked.
        assert!(!thread_is_gone(tid));
        assert_eq!(lock.try_lock(), Ok(TryLockOutcome::WouldBlock));
        go_tx.send(()).unwrap();
        holder.join().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !thread_is_gone(tid) {
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} still in /proc"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            lock.word(),
            LockWord::Held {
                tid,
                waiters: false
            }
        );
        assert_eq!(lock.try_lock(), Ok(TryLockOutcome::WouldBlock));
        assert!(
            !lock.recover_dead_holder(tid + 1),
            "only the exact word is recovered"
        );
        assert!(lock.recover_dead_holder(tid));
        assert!(
            !lock.recover_dead_holder(tid),
            "a second recoverer finds nothing to do"
        );
        assert!(lock.owner_died());
        assert_eq!(lock.try_lock(), Ok(TryLockOutcome::OwnerDied));
        assert_eq!(lock.holder_tid(), Some(current_tid()));
        lock.unlock().unwrap();
    }

    /// A mapped file is found by device and inode whatever path names it (a symlinked
    /// directory, `//`, a relative path), and our own mapping of a file is seen.
    #[test]
    fn a_mapped_file_is_found_by_device_and_inode_not_by_its_path_text() {
        let maps = "7f00-7f01 rw-s 00000000 00:1a 4242 /run/shm/x/control\n\
                    7f02-7f03 r--p 00000000 fd:01 17 /usr/lib/libc.so.6\n";
        let dev = libc::makedev(0, 0x1a);
        assert!(maps_name_file(maps, dev, 4242));
        assert!(!maps_name_file(maps, dev, 4243));
        assert!(!maps_name_file(maps, libc::makedev(0, 0x1b), 4242));
        assert!(maps_name_file(maps, libc::makedev(0xfd, 1), 17));
        // Our own mapping of a file under /dev/shm, named through a `//` and a `.` component.
        let path =
            std::path::PathBuf::from(format!("/dev/shm/liveness-maps-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // A raw shared mapping of a file only this test uses, dropped before it is removed.
        let map = memmap2::MmapOptions::new()
            .len(4096)
            .map_raw(&file)
            .unwrap();
        let odd =
            std::path::PathBuf::from(format!("/dev//shm/./liveness-maps-{}", std::process::id()));
        let found = process_maps_file(std::process::id(), &odd);
        drop(map);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(found, Some(true));
    }

    /// A watch that times out says so, with the holder it was watching.
    #[test]
    fn watch_times_out_while_held() {
        let (_slot, lock) = fresh_lock();
        lock.lock().unwrap();
        let watch = DeathWatch::arm(lock).unwrap();
        let err = watch
            .spin_until_dead(SpinPolicy::busy_for(Duration::from_millis(5)))
            .unwrap_err();
        assert_eq!(err.holder_tid, current_tid());
        lock.unlock().unwrap();
        assert_eq!(watch.poll(), Some(HolderGone::Released));
        assert_eq!(
            DeathWatch::arm(lock).unwrap_err(),
            ArmError::NotHeld {
                found: LockWord::Free
            }
        );
    }

    /// Misaligned pointers are refused with both sides named.
    #[test]
    fn init_rejects_misalignment() {
        let mut slot = Box::new([Slot([0; RobustLock::SIZE]), Slot([0; RobustLock::SIZE])]);
        // SAFETY: the pointer is 8 bytes into a 128-byte buffer; init checks alignment first.
        let err = unsafe { RobustLock::init(slot[0].0.as_mut_ptr().add(8)) }.unwrap_err();
        assert!(
            err.to_string()
                .contains("expected a 64-byte aligned pointer"),
            "{err}"
        );
    }
}
