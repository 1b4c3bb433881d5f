//! Liveness across real processes: a child holds the robust lock in shared memory, the parent
//! SIGKILLs it and checks what the standby would see.
//!
//! # Why the child is this test binary re-executed, not a `fork`
//!
//! The libtest harness runs tests on several threads. After `fork` in a multi-threaded process
//! the child may only call async-signal-safe functions until it execs: a `malloc` lock or the
//! stdio lock held by another test thread at fork time would stay locked forever in the child.
//! Our child needs to allocate (a 256 MiB ballast), open and map a file, and hold a pthread
//! mutex, so we `exec` a fresh copy of this binary instead, filtered to the ignored test
//! [`child_entry`] and told what to do through environment variables. The child is a clean,
//! ordinary process, and `std::process::Command` does the fork+exec safely.

use std::fs::OpenOptions;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use memmap2::MmapMut;
use understudy_runtime::liveness::{
    current_tid, DeathWatch, HolderGone, Liveness, LockOutcome, Pidfd, PidfdOpenError, ProcStat,
    ProcessIdentity, RobustLock, SpinPolicy, TryLockOutcome,
};
use understudy_test_support::dir::TestFile;
use understudy_test_support::{ChildGuard, Wait};

/// Path of the shared file; set only in a child process.
const CHILD_SHM_ENV: &str = "UNDERSTUDY_LIVENESS_CHILD_SHM";
/// MiB of memory the child touches before locking, so its teardown is slow.
const CHILD_TOUCH_MIB_ENV: &str = "UNDERSTUDY_LIVENESS_CHILD_TOUCH_MIB";

/// Layout of the shared file: the lock owns the first cache line, the ready word the second.
const LOCK_OFFSET: usize = 0;
/// `AtomicU32`: 0 until the child holds the lock, then the child's locking TID.
const READY_OFFSET: usize = 64;
const MAP_LEN: usize = 4096;
const _: () = assert!(LOCK_OFFSET + RobustLock::SIZE <= READY_OFFSET);
const _: () = assert!(READY_OFFSET + 4 <= MAP_LEN);

/// Bound on every wait in these tests. Never reached when things work; it turns a hang into a
/// failure with a message. It is not a performance assertion.
const PATIENCE: Duration = Duration::from_secs(30);

/// A file under /dev/shm, mapped shared. The creating process removes it on drop, also when a
/// test panics; the child, which only opens it, never does.
struct ShmFile {
    path: PathBuf,
    map: MmapMut,
    /// Declared after `map`, so the file is unmapped before it is removed.
    _remove: Option<TestFile>,
}

impl ShmFile {
    /// Creates and maps a fresh file for the parent.
    fn create() -> ShmFile {
        // Armed before anything can fail, so the file is always removed.
        let remove = TestFile::new("liveness");
        let path = remove.path().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        file.set_len(MAP_LEN as u64).expect("sizing the shm file");
        // SAFETY: the file is ours (create_new) and only this test and its child map it.
        let map = unsafe { MmapMut::map_mut(&file) }.expect("mapping the shm file");
        ShmFile {
            path,
            map,
            _remove: Some(remove),
        }
    }

    /// Maps an existing file (in the child).
    fn open(path: PathBuf) -> ShmFile {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("child: opening {}: {e}", path.display()));
        // SAFETY: the parent created the file for this child; both map it shared.
        let map = unsafe { MmapMut::map_mut(&file) }.expect("child: mapping the shm file");
        ShmFile {
            path,
            map,
            _remove: None,
        }
    }

    fn lock_ptr(&self) -> *mut u8 {
        // A page-aligned mapping, so offset 0 is 64-byte aligned.
        self.map.as_ptr().wrapping_add(LOCK_OFFSET).cast_mut()
    }

    /// Initialises the lock (parent only, before any child exists).
    fn init_lock(&self) -> RobustLock {
        // SAFETY: the mapping is page aligned, MAP_LEN >= SIZE bytes, shared, and nobody else
        // uses it yet; it outlives the returned handle within each test.
        unsafe { RobustLock::init(self.lock_ptr()) }.expect("RobustLock::init");
        self.lock()
    }

    fn lock(&self) -> RobustLock {
        // SAFETY: the lock was initialised by the parent; the mapping outlives the handle.
        unsafe { RobustLock::from_ptr(self.lock_ptr()) }
    }

    fn ready(&self) -> &AtomicU32 {
        // SAFETY: READY_OFFSET is 4-byte aligned inside the mapping (const-asserted bounds), the
        // word is only accessed atomically by both processes, and it lives as long as `self`.
        unsafe { &*self.map.as_ptr().add(READY_OFFSET).cast::<AtomicU32>() }
    }
}

/// The child that holds the lock, on the workspace's child guard: it dies with the test
/// runner, and is SIGKILLed and reaped on drop unless the test reaped it already.
struct LockChild(ChildGuard);

impl LockChild {
    /// Starts a child that touches `touch_mib` MiB, locks the lock in `shm`, publishes its TID
    /// in the ready word and sleeps until killed.
    fn spawn(shm: &ShmFile, touch_mib: usize) -> LockChild {
        let exe = std::env::current_exe().expect("current_exe");
        LockChild(ChildGuard::spawn(
            Command::new(exe)
                .args([
                    "--exact",
                    "child_entry",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_SHM_ENV, &shm.path)
                .env(CHILD_TOUCH_MIB_ENV, touch_mib.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        ))
    }

    /// Waits (bounded) for the child to hold the lock; returns the TID it locked from.
    fn wait_ready(&mut self, shm: &ShmFile) -> u32 {
        let child = &mut self.0;
        Wait::new("the child to hold the lock", PATIENCE)
            .every(Duration::from_millis(1))
            .until(|| {
                // SYNC POINT: child holds the lock (Release store in child_entry).
                let tid = shm.ready().load(Ordering::Acquire);
                if tid != 0 {
                    return Ok(tid);
                }
                if let Some(status) = child.try_wait() {
                    panic!(
                        "expected the child to hold the lock and sleep, found it exited: {status}"
                    );
                }
                Err("ready word still 0")
            })
    }

    fn kill(&self) {
        self.0.signal(libc::SIGKILL);
    }

    /// Reaps the child and checks it died of SIGKILL.
    fn reap(&mut self) {
        let status = self.0.child_mut().wait().expect("waitpid");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "expected the child killed by SIGKILL, found {status}"
        );
    }
}

/// Not a test: the body of the child process (see the module docs). It is `#[ignore]`d so an
/// ordinary run does not list it as passing; run without the environment variable it returns.
#[test]
#[ignore = "child-process entry point, run by the other tests through re-exec"]
fn child_entry() {
    let Some(path) = std::env::var_os(CHILD_SHM_ENV) else {
        return;
    };
    let touch_mib: usize = std::env::var(CHILD_TOUCH_MIB_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // Touch every page so the kernel has real memory to free at exit.
    let mut ballast = vec![0u8; touch_mib << 20];
    for i in (0..ballast.len()).step_by(4096) {
        ballast[i] = 1;
    }
    std::hint::black_box(&mut ballast);

    let shm = ShmFile::open(PathBuf::from(path));
    let lock = shm.lock();
    assert_eq!(lock.lock(), Ok(LockOutcome::Acquired), "child: locking");
    // SYNC POINT: child holds the lock (Acquire load in wait_ready).
    shm.ready().store(current_tid(), Ordering::Release);
    // This thread holds the lock until SIGKILL; it must be the thread that dies with it.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// SIGKILL of the holder sets OWNER_DIED in the futex word (seen without a syscall), the next
/// lock() reports OwnerDied and leaves a usable lock, and the dead child's identity reads as
/// dead after reaping while a same-pid identity with another start time never reads as alive.
#[test]
fn sigkill_of_holder_marks_owner_died_and_lock_recovers() {
    let shm = ShmFile::create();
    let lock = shm.init_lock();
    let mut child = LockChild::spawn(&shm, 0);
    let child_tid = child.wait_ready(&shm);

    // The holder is the child's thread, seen across processes.
    assert_ne!(child_tid, current_tid());
    assert_eq!(lock.holder_tid(), Some(child_tid));
    assert!(!lock.owner_died());
    assert_eq!(lock.try_lock(), Ok(TryLockOutcome::WouldBlock));

    let identity = ProcessIdentity::of(child.0.id()).expect("child identity");
    assert!(
        identity.is_alive(),
        "expected the live child {identity:?} alive"
    );
    let impostor = ProcessIdentity {
        start_time_ticks: identity.start_time_ticks + 1,
        ..identity
    };
    assert!(
        !impostor.is_alive(),
        "a same-pid identity with another start time read as alive"
    );
    assert_eq!(
        impostor.check().expect("check impostor"),
        Liveness::PidReused {
            found_start_time_ticks: identity.start_time_ticks
        }
    );

    let watch = DeathWatch::arm(lock).expect("arm on a held lock");
    assert_eq!(watch.holder_tid(), child_tid);
    assert_eq!(watch.poll(), None);

    child.kill();
    // (a) the futex word flips.
    let gone = watch.spin_until_dead(SpinPolicy::polite_for(PATIENCE));
    assert_eq!(
        gone,
        Ok(HolderGone::OwnerDied),
        "expected OwnerDied after SIGKILL"
    );
    assert!(lock.owner_died());
    assert_eq!(lock.holder_tid(), None);

    // (b) the survivor takes over and the lock works normally afterwards.
    assert_eq!(lock.lock(), Ok(LockOutcome::OwnerDied));
    assert!(!lock.owner_died(), "locking must clear the owner-died bit");
    assert_eq!(lock.holder_tid(), Some(current_tid()));
    lock.unlock().expect("unlock after OwnerDied");
    assert_eq!(lock.lock(), Ok(LockOutcome::Acquired));
    lock.unlock().expect("unlock");
    assert_eq!(lock.try_lock(), Ok(TryLockOutcome::Acquired));
    lock.unlock().expect("unlock");

    // (c) after reaping, the identity is dead; the impostor still is too.
    child.reap();
    assert!(
        !identity.is_alive(),
        "expected reaped child {identity:?} dead"
    );
    let after = identity.check().expect("check reaped");
    assert!(
        matches!(after, Liveness::Reaped | Liveness::PidReused { .. }),
        "expected Reaped (or the pid already reused), found {after:?}"
    );
    assert!(!impostor.is_alive());
}

/// A zombie (exited, not reaped) is dead although /proc/<pid>/stat still exists; the pidfd
/// backstop fires on exit; and a pidfd is never opened for an identity whose pid is taken by
/// another process.
#[test]
fn zombie_is_dead_and_pidfd_checks_identity() {
    let shm = ShmFile::create();
    shm.init_lock();
    let mut child = LockChild::spawn(&shm, 0);
    child.wait_ready(&shm);
    let identity = ProcessIdentity::of(child.0.id()).expect("child identity");

    let impostor = ProcessIdentity {
        start_time_ticks: identity.start_time_ticks + 1,
        ..identity
    };
    match Pidfd::open_identity(&impostor) {
        Err(PidfdOpenError::NotThatProcess { expected, found }) => {
            assert_eq!(expected, impostor);
            assert_eq!(
                found,
                Liveness::PidReused {
                    found_start_time_ticks: identity.start_time_ticks
                }
            );
        }
        other => panic!("expected NotThatProcess for {impostor:?}, found {other:?}"),
    }

    let pidfd = Pidfd::open_identity(&identity).expect("pidfd for the live child");
    assert_eq!(pidfd.pid(), child.0.id());
    assert!(
        !pidfd.poll_exited(Some(Duration::ZERO)).expect("poll"),
        "live child read as exited"
    );

    child.kill();
    assert!(
        pidfd.poll_exited(Some(PATIENCE)).expect("poll"),
        "expected the pidfd readable within {PATIENCE:?} of SIGKILL"
    );
    // Exited but not reaped: the stat file is there and says Z.
    let stat = ProcStat::read(child.0.id()).expect("zombie still has /proc/<pid>/stat");
    assert_eq!(stat.state, 'Z', "expected zombie state, found {stat:?}");
    assert_eq!(stat.start_time_ticks, identity.start_time_ticks);
    assert_eq!(identity.check().expect("check zombie"), Liveness::Exited);
    assert!(!identity.is_alive(), "a zombie read as alive");

    child.reap();
    assert!(!identity.is_alive());
}

/// Prints, for children with 0 and 256 MiB touched, how long after SIGKILL the futex word
/// showed OWNER_DIED and how long until the pidfd was readable. Asserts only that both
/// happened: timings are for reading, not for asserting.
#[test]
fn owner_died_precedes_pidfd_timing() {
    for touch_mib in [0usize, 256] {
        for run in 0..3 {
            let shm = ShmFile::create();
            let lock = shm.init_lock();
            let mut child = LockChild::spawn(&shm, touch_mib);
            child.wait_ready(&shm);
            let identity = ProcessIdentity::of(child.0.id()).expect("child identity");
            let pidfd = Pidfd::open_identity(&identity).expect("pidfd");
            let watch = DeathWatch::arm(lock).expect("arm");

            let barrier = Arc::new(Barrier::new(2));
            let poller = {
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    let exited = pidfd.poll_exited(Some(PATIENCE)).expect("poll pidfd");
                    (exited, Instant::now())
                })
            };
            barrier.wait();
            // Give the poller time to block in poll(2), so it is not still starting up when the
            // pidfd fires. This only makes the printed pidfd number fairer.
            std::thread::sleep(Duration::from_millis(20));

            let killed_at = Instant::now();
            child.kill();
            let gone = watch.spin_until_dead(SpinPolicy::busy_for(PATIENCE));
            let owner_died_at = Instant::now();
            assert_eq!(gone, Ok(HolderGone::OwnerDied));
            let (exited, pidfd_at) = poller.join().expect("poller thread");
            assert!(exited, "expected the pidfd readable within {PATIENCE:?}");
            child.reap();

            println!(
                "liveness timing: touched {touch_mib:>3} MiB, run {run}: kill->owner_died {:>9.1} us, kill->pidfd {:>9.1} us",
                owner_died_at.duration_since(killed_at).as_secs_f64() * 1e6,
                pidfd_at.duration_since(killed_at).as_secs_f64() * 1e6,
            );
        }
    }
}
