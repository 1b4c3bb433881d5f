//! Engine options: the slot, cluster directory, idle and backpressure policies, and what a
//! panic does; read from the environment the supervisor sets.

use super::*;

/// How long the active waits by default for room in a standby's full stream before it
/// untethers the standby.
const BACKPRESSURE_WAIT_DEFAULT: Duration = Duration::from_millis(20);
/// The default heartbeat interval.
const HEARTBEAT_DEFAULT: Duration = Duration::from_millis(1);
/// By default, a heartbeat older than this means the active is hung.
const HUNG_AFTER_DEFAULT: Duration = Duration::from_millis(500);
/// By default, how long a standby pauses between two polls of an empty stream, so that it
/// does not hold the cache line the active writes next.
const STANDBY_POLL_PAUSE_DEFAULT: Duration = Duration::from_micros(20);

/// What to do when a standby's stream is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backpressure {
    /// Wait up to this long for room, then untether the standby.
    Wait(Duration),
    /// Untether the standby at once (it becomes stale and must catch up again).
    Untether,
}

/// How the active protects each transaction it writes to a standby's stream (the consumer
/// checks every frame's structure either way: positions, lengths, types, layout versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamIntegrity {
    /// One checksum per transaction (batch), verified by the standby before it applies any of
    /// it: detects torn, misplaced or corrupted bytes. The default.
    #[default]
    Batch,
    /// No checksum: for two engines of one host and user that want the last nanoseconds. A
    /// standby accepts unsummed batches only when it is configured `Off` too.
    Off,
}

impl StreamIntegrity {
    /// The ring's setting for it.
    pub fn ring(self) -> shm_layout::ring::Integrity {
        match self {
            StreamIntegrity::Batch => shm_layout::ring::Integrity::PerBatch,
            StreamIntegrity::Off => shm_layout::ring::Integrity::Off,
        }
    }

    /// `batch` or `off` (what the cluster config's `ring.integrity` and [`ENV_INTEGRITY`] hold).
    pub fn parse(s: &str) -> Result<StreamIntegrity, String> {
        match s.trim() {
            "batch" => Ok(StreamIntegrity::Batch),
            "off" => Ok(StreamIntegrity::Off),
            other => Err(format!(
                "{ENV_INTEGRITY}: expected `batch` or `off`, found `{other}`"
            )),
        }
    }
}

pub use crate::launch::{ENV_INTEGRITY, ENV_STANDBY_POLL_PAUSE_US};

/// The longest [`Options::standby_poll_pause`] the environment may set: the standby's
/// heartbeat, acks and stop command are served between pauses.
pub const MAX_STANDBY_POLL_PAUSE: Duration = Duration::from_millis(1);

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
    /// Checksums on the replication stream: one per transaction (default) or none.
    pub integrity: StreamIntegrity,
    /// How long a standby waits, spinning, before polling its stream again after a poll that
    /// found nothing new (default 20 µs; zero: poll continuously). A standby that polls
    /// continuously costs the active a cache-line transfer per transaction; see
    /// `benches/RESULTS-runtime.md`. Death detection does not wait for it.
    pub standby_poll_pause: Duration,
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
    /// `shared`, or `<spin polls>,<sleep µs>`), `UNDERSTUDY_CATCHUP_CHUNK` (items per chunk),
    /// `UNDERSTUDY_INTEGRITY` (`batch` or `off`, see [`StreamIntegrity`]),
    /// `UNDERSTUDY_STANDBY_POLL_PAUSE_US` (see [`Options::standby_poll_pause`]).
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
        if let Some(us) = num(ENV_STANDBY_POLL_PAUSE_US)? {
            let max = MAX_STANDBY_POLL_PAUSE.as_micros();
            if u128::from(us) > max {
                return Err(format!(
                    "{ENV_STANDBY_POLL_PAUSE_US}: expected at most {max} (µs; a longer pause delays the standby's heartbeat, acks and a switchover, and lets a busy active untether it), found {us}"
                ));
            }
            self.standby_poll_pause = Duration::from_micros(us);
        }
        if let Ok(v) = std::env::var(ENV_INTEGRITY) {
            self.integrity = StreamIntegrity::parse(&v)?;
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
            backpressure: Backpressure::Wait(BACKPRESSURE_WAIT_DEFAULT),
            idle: Idle::SHARED,
            heartbeat: HEARTBEAT_DEFAULT,
            hung_after: HUNG_AFTER_DEFAULT,
            catchup_chunk: 512,
            standby_only: false,
            on_panic: OnPanic::Abort,
            counters: true,
            integrity: StreamIntegrity::Batch,
            standby_poll_pause: STANDBY_POLL_PAUSE_DEFAULT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pause typed in ms instead of µs is refused, naming the variable and the bound; the
    /// bound itself is accepted. (No other test reads this variable.)
    #[test]
    fn a_standby_poll_pause_over_the_bound_is_refused() {
        let mut o = Options::new(std::path::PathBuf::from("/nonexistent"), 0);
        std::env::set_var(ENV_STANDBY_POLL_PAUSE_US, "1000000");
        let err = o.apply_env().unwrap_err();
        std::env::set_var(ENV_STANDBY_POLL_PAUSE_US, "1000");
        let ok = o.apply_env();
        std::env::remove_var(ENV_STANDBY_POLL_PAUSE_US);
        assert!(
            err.contains(ENV_STANDBY_POLL_PAUSE_US) && err.contains("at most 1000"),
            "{err}"
        );
        assert_eq!(ok, Ok(()));
        assert_eq!(o.standby_poll_pause, MAX_STANDBY_POLL_PAUSE);
    }
}
