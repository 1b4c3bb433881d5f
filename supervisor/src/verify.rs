//! Second sources for the supervisor's destructive decisions.
//!
//! The control block is shared memory that any engine (or a stray write, or a flipped bit) can
//! change: the supervisor reads it to decide, but before it kills an engine or declares the
//! cluster's state lost it checks what the control block says against what it knows itself:
//!
//! - the processes it watches: each engine's pidfd (held since it spawned or adopted the
//!   engine) and its `/proc/<pid>/stat` identity (pid + start time, state);
//! - who holds the robust mutex only the active's writing thread holds, mapped to one of those
//!   processes through `/proc/<pid>/task/<tid>`;
//! - the heartbeat word as the supervisor itself saw it change: a word that one flipped bit
//!   made old is rewritten by a live engine within an interval, so an engine counts as hung
//!   only if its word has not changed for the whole threshold on the supervisor's own clock.
//!
//! Nothing here decides; [`crate::daemon`] does, and says in its log which source disagreed.

use std::time::{Duration, Instant};

use understudy_control::liveness::ProcStat;

/// `tid` is a thread of the process `pid` (the robust mutex names a thread, not a process).
pub(crate) fn tid_belongs_to(pid: u32, tid: u32) -> bool {
    pid != 0 && tid != 0 && std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// The process `pid` is stopped (SIGSTOP, a debugger) according to `/proc`: it holds whatever
/// it held and resumes where it was. `None` if `/proc` cannot tell.
pub(crate) fn is_stopped(pid: u32) -> Option<bool> {
    ProcStat::read(pid)
        .ok()
        .map(|s| matches!(s.state, 'T' | 't'))
}

/// How long the supervisor itself has seen one engine's heartbeat word unchanged.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeartbeatSeen {
    pid: u32,
    value: u64,
    since: Instant,
}

impl HeartbeatSeen {
    /// A first sight of `value` for the engine `pid`.
    pub(crate) fn new(pid: u32, value: u64, now: Instant) -> HeartbeatSeen {
        HeartbeatSeen {
            pid,
            value,
            since: now,
        }
    }

    /// Records the word read at `now`; returns for how long it has been unchanged (zero on a
    /// change, or for another engine in the slot).
    pub(crate) fn observe(&mut self, pid: u32, value: u64, now: Instant) -> Duration {
        if pid != self.pid || value != self.value {
            *self = HeartbeatSeen::new(pid, value, now);
        }
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_counts_as_unchanged_only_while_the_same_engine_shows_the_same_word() {
        // Proves that one odd value (a flipped bit) restarts the count as soon as the live
        // engine rewrites its word, and that another engine in the slot starts afresh.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut seen = HeartbeatSeen::new(7, 100, t0);
        assert_eq!(seen.observe(7, 100, t0 + ms(30)), ms(30));
        assert_eq!(seen.observe(7, 100, t0 + ms(90)), ms(90));
        assert_eq!(seen.observe(7, 1 << 40, t0 + ms(100)), ms(0));
        assert_eq!(seen.observe(7, 1 << 40, t0 + ms(150)), ms(50));
        assert_eq!(seen.observe(8, 1 << 40, t0 + ms(160)), ms(0));
    }

    #[test]
    fn this_process_is_running_and_its_own_thread_belongs_to_it() {
        // Proves the /proc checks on a known process: ourselves.
        let pid = std::process::id();
        assert_eq!(is_stopped(pid), Some(false));
        assert!(tid_belongs_to(
            pid,
            understudy_control::liveness::current_tid()
        ));
        assert!(!tid_belongs_to(pid, 0));
        assert!(!tid_belongs_to(pid, u32::MAX));
    }
}
