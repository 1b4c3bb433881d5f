//! Child processes that never outlive the test that started them.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::wait::Wait;

/// How often a bounded wait on a process looks again.
const PROCESS_POLL: Duration = Duration::from_millis(1);

/// The child gets `signal` when the thread that spawned it ends (the kernel ties
/// `PR_SET_PDEATHSIG` to the spawning thread): a test runner killed by CI (timeout, Ctrl-C),
/// or a test thread that panics past its guards, leaves nothing spinning behind it. A parent
/// that died between fork and the prctl is caught by comparing the parent pid afterwards.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl and
    // getppid, which are async-signal-safe and touch no memory of ours.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("the test runner died before exec"));
            }
            Ok(())
        });
    }
}

/// A child process that is SIGKILLed when the test runner's spawning thread dies, and killed
/// and reaped when the guard drops (also when the test panics).
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `cmd` with [`die_with_parent`] (SIGKILL); panics naming the program if it cannot.
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard::spawn_with_death_signal(cmd, libc::SIGKILL)
    }

    /// As [`ChildGuard::spawn`] with another death signal (a child that must clean up after
    /// itself gets SIGTERM).
    pub fn spawn_with_death_signal(cmd: &mut Command, signal: libc::c_int) -> ChildGuard {
        die_with_parent(cmd, signal);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {:?}: {e}", cmd.get_program()));
        ChildGuard { child: Some(child) }
    }

    /// Guards a child spawned elsewhere (it gets no death signal: prefer [`ChildGuard::spawn`]).
    pub fn adopt(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child().id()
    }

    /// The child, for its pipes and `try_wait`.
    pub fn child(&self) -> &Child {
        self.child.as_ref().expect("a guarded child")
    }

    /// The child, for its pipes and `try_wait`.
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a guarded child")
    }

    /// Its exit status if it has exited (reaped then), `None` while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child_mut()
            .try_wait()
            .expect("waitpid on our own child")
    }

    /// Still running (not exited, not killed)?
    pub fn running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGSTOP`); panics if the kernel refuses.
    pub fn signal(&self, signal: libc::c_int) {
        send(self.id(), signal)
    }

    /// Waits (bounded) for the child to exit on its own: its status and whatever it wrote to
    /// a piped stderr. Panics naming `what` when it does not exit in time (the guard still
    /// kills it).
    pub fn wait_exit(&mut self, what: &str, timeout: Duration) -> (ExitStatus, String) {
        let status = Wait::new(&format!("{what} to exit"), timeout)
            .every(PROCESS_POLL)
            .until(|| self.try_wait().ok_or("still running"));
        let mut err = String::new();
        if let Some(mut e) = self.child_mut().stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }

    /// SIGKILLs and reaps the child now (nothing if it was reaped already).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Gives the child up unkilled: it goes on running (a daemon a test means to leave).
    pub fn into_inner(mut self) -> Child {
        self.child.take().expect("a guarded child")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `kill(pid, signal)`; panics if the kernel refuses (no such process, not ours).
pub fn send(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

/// `kill(pid, signal)`, ignoring a process that is gone already.
pub fn send_if_alive(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Freezes `pid` with SIGSTOP and returns only once every one of its threads is in the
/// stopped state (or dead: it executes no more either): `kill` merely queues the signal, and
/// a process running on another CPU goes on executing (and committing) until interrupted.
pub fn freeze(pid: u32, timeout: Duration) {
    send(pid, libc::SIGSTOP);
    Wait::new(&format!("pid {pid} stopped"), timeout)
        .every(PROCESS_POLL)
        .until(|| all_tasks_stopped(pid));
}

/// Whether every thread of `pid` is stopped, a zombie or gone ('T', 'Z' or 'X' in field 3 of
/// its stat file), i.e. executes no more.
pub fn all_tasks_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone
    };
    let mut any = false;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Field 3 follows the parenthesised command name, which may itself hold ')'. An empty
        // stat is a thread reaped meanwhile.
        let stopped = stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 'Z', 'X']));
        if !stopped {
            return false;
        }
        any = true;
    }
    any
}
