//! The keeper's restarts: each slot's crashes within the crash-loop window, the backoff of
//! its next restart, and the breaker that stops restarting a slot that keeps crashing
//! (`understudy resume-restarts` clears it).
//!
//! Only an engine's own crash counts (an exit, a panic's abort, a fault): a kill from outside
//! — an operator's, the OOM killer's, the supervisor's own fence — says nothing about the
//! engine, and it is restarted at once ([`killed_by_signal`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_control::control::{slot_name, SLOTS};

use crate::config::RestartConfig;
use crate::process::ExitInfo;
use crate::proto::{Code, Reply, SlotRestarts};

/// Restart bookkeeping of one slot.
#[derive(Debug, Default)]
struct Restart {
    /// The engine's own crashes within the crash-loop window (an exit, a panic, a fault —
    /// not a kill by a signal from outside, an operator's or the OOM killer's, nor the
    /// supervisor's own fence): they set the backoff and trip the crash-loop breaker.
    crashes: VecDeque<Instant>,
    next_at: Option<Instant>,
    /// The backoff before the pending restart (`next_at`).
    delay_ms: u64,
    given_up: bool,
}

/// Every slot's restarts.
#[derive(Debug, Default)]
pub(crate) struct Restarts {
    slots: [Restart; SLOTS],
}

/// The delay before restarting a slot whose engine crashed `crashes` times within the
/// crash-loop window: none for the first start, then `backoff_initial_ms` doubling with each
/// crash up to `backoff_max_ms`.
pub(crate) fn restart_delay_ms(restart: &RestartConfig, crashes: u32) -> u64 {
    if crashes == 0 {
        return 0;
    }
    restart
        .backoff_initial_ms
        .saturating_mul(1 << (crashes - 1).min(20))
        .min(restart.backoff_max_ms)
}

/// The engine was killed by a signal that comes from outside it (SIGKILL, SIGTERM, SIGINT,
/// SIGHUP) rather than dying of its own fault (an exit, a panic's abort, a fault).
pub(crate) fn killed_by_signal(exit: &ExitInfo) -> bool {
    use std::os::unix::process::ExitStatusExt;
    match exit {
        ExitInfo::Status(s) => matches!(
            s.signal(),
            Some(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP)
        ),
        // An adopted engine's status went to its old parent: counted as a crash.
        ExitInfo::Unknown => false,
    }
}

impl Restarts {
    /// Counts a crash of the engine in `slot`, for its restarts' backoff and breaker.
    pub(crate) fn count_crash(&mut self, slot: usize, config: &RestartConfig) {
        let now = Instant::now();
        self.slots[slot].crashes.push_back(now);
        self.prune(slot, now, config);
    }

    /// Forgets the crashes older than the crash-loop window.
    fn prune(&mut self, slot: usize, now: Instant, config: &RestartConfig) {
        let window = Duration::from_millis(config.crash_loop_window_ms);
        let crashes = &mut self.slots[slot].crashes;
        while crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            crashes.pop_front();
        }
    }

    /// The dead engine of `slot` is to be restarted now: its backoff has passed (a backoff
    /// begins at the first call after its death), and the breaker has not tripped (it trips
    /// here, and says so).
    pub(crate) fn due(&mut self, slot: usize, now: Instant, config: &RestartConfig) -> bool {
        if self.slots[slot].next_at.is_none() {
            self.prune(slot, now, config);
        }
        let r = &mut self.slots[slot];
        if r.given_up {
            return false;
        }
        let next_at = match r.next_at {
            Some(t) => t,
            None => {
                let crashes = r.crashes.len() as u32;
                if crashes > config.crash_loop_max {
                    r.given_up = true;
                    error!(slot = %slot_name(slot), crashes, window_ms = config.crash_loop_window_ms, "crash loop: restarts of this slot stopped; fix the engine, then run `understudy resume-restarts`");
                    return false;
                }
                let delay_ms = restart_delay_ms(config, crashes);
                if crashes > 0 {
                    warn!(slot = %slot_name(slot), crashes, window_ms = config.crash_loop_window_ms, delay_ms, "restarting the engine after a backoff");
                }
                r.delay_ms = delay_ms;
                let t = now + Duration::from_millis(delay_ms);
                r.next_at = Some(t);
                t
            }
        };
        if now < next_at {
            return false;
        }
        r.next_at = None;
        true
    }

    /// The slots whose restarts the breaker stopped.
    pub(crate) fn given_up(&self) -> Vec<String> {
        (0..SLOTS)
            .filter(|&s| self.slots[s].given_up)
            .map(|s| slot_name(s).to_string())
            .collect()
    }

    /// For `status`: each slot with crashes in the window or restarts stopped.
    pub(crate) fn report(&self, config: &RestartConfig) -> Vec<SlotRestarts> {
        let window = Duration::from_millis(config.crash_loop_window_ms);
        (0..SLOTS)
            .filter_map(|s| {
                let r = &self.slots[s];
                let crashes = r.crashes.iter().filter(|t| t.elapsed() <= window).count() as u32;
                (crashes > 0 || r.given_up).then(|| SlotRestarts {
                    slot: slot_name(s).to_string(),
                    crashes,
                    // The backoff of the restart pending, or of the next one.
                    backoff_ms: if r.next_at.is_some() {
                        r.delay_ms
                    } else {
                        restart_delay_ms(config, crashes)
                    },
                    given_up: r.given_up,
                })
            })
            .collect()
    }

    /// `understudy resume-restarts`: forget every slot's crashes, so that restarts stopped by
    /// the crash-loop breaker start again (with no backoff).
    pub(crate) fn resume(&mut self) -> Reply {
        let stopped = self.given_up();
        *self = Restarts::default();
        if stopped.is_empty() {
            return Reply::result(
                Code::Ok,
                "no slot's restarts were stopped; crash counts cleared",
            );
        }
        info!(slots = ?stopped, "restarts resumed by the operator");
        Reply::result(
            Code::Ok,
            format!(
                "restarts resumed for engine(s) {}; crash counts cleared",
                stopped.join(", ")
            ),
        )
        .with_data(serde_json::json!({ "resumed": stopped }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RestartConfig {
        RestartConfig {
            backoff_initial_ms: 30,
            backoff_max_ms: 200,
            crash_loop_window_ms: 10_000,
            crash_loop_max: 2,
        }
    }

    #[test]
    fn restart_backoff_doubles_from_the_initial_delay_up_to_the_maximum() {
        // Proves the restart delays: none for a first start, then initial, 2×, 4× … capped.
        let restart = RestartConfig {
            crash_loop_max: 9,
            ..config()
        };
        let delays: Vec<u64> = (0..7).map(|n| restart_delay_ms(&restart, n)).collect();
        assert_eq!(delays, [0, 30, 60, 120, 200, 200, 200]);
        assert_eq!(restart_delay_ms(&restart, u32::MAX), 200);
    }

    #[test]
    fn only_an_engine_dying_of_its_own_fault_counts_as_a_crash() {
        // Proves the breaker's classification of exits: an exit code, a panic's abort and a
        // fault are crashes; SIGKILL, SIGTERM, SIGINT and SIGHUP come from outside; an adopted
        // engine's unknown status counts as a crash.
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        let killed = |raw| killed_by_signal(&ExitInfo::Status(ExitStatus::from_raw(raw)));
        for signal in [libc::SIGKILL, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            assert!(killed(signal), "signal {signal}");
        }
        for signal in [libc::SIGSEGV, libc::SIGABRT, libc::SIGBUS, libc::SIGILL] {
            assert!(!killed(signal), "signal {signal}");
        }
        assert!(!killed(1 << 8), "exit 1");
        assert!(!killed(0), "exit 0");
        assert!(!killed_by_signal(&ExitInfo::Unknown));
    }

    #[test]
    fn a_slot_crashing_more_than_the_maximum_is_given_up_until_resumed() {
        // Proves the breaker: a first start is due at once, each crash defers the restart by
        // its backoff, one crash more than crash_loop_max stops the slot's restarts, and
        // `resume` clears it.
        let config = config();
        let mut restarts = Restarts::default();
        let now = Instant::now();
        assert!(
            restarts.due(0, now, &config),
            "a first start has no backoff"
        );
        restarts.count_crash(0, &config);
        assert!(!restarts.due(0, now, &config), "a crash backs off");
        assert!(restarts.due(0, now + Duration::from_millis(30), &config));
        for _ in 0..2 {
            restarts.count_crash(0, &config);
        }
        assert!(!restarts.due(0, now + Duration::from_secs(1), &config));
        assert_eq!(restarts.given_up(), ["a"]);
        assert_eq!(restarts.report(&config)[0].crashes, 3);
        let reply = restarts.resume();
        assert_eq!(reply.code, Some(Code::Ok));
        assert!(restarts.given_up().is_empty());
        assert!(restarts.due(0, Instant::now(), &config));
    }
}
