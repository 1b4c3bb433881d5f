//! Bounded waits that fail saying what they waited for and what they last saw.
//!
//! ```
//! use std::time::Duration;
//! use understudy_test_support::wait::{wait_until, Wait};
//!
//! let mut n = 0;
//! // A condition: `true` ends the wait.
//! wait_until("n to reach 3", Duration::from_secs(1), || { n += 1; n >= 3 });
//! // A value: `Ok` ends the wait and is returned; the last `Err` is printed on a timeout.
//! let v = Wait::new("n to reach 5", Duration::from_secs(1))
//!     .every(Duration::from_millis(1))
//!     .until(|| { n += 1; if n >= 5 { Ok(n) } else { Err(n) } });
//! assert_eq!(v, 5);
//! ```

use std::fmt::Debug;
use std::time::{Duration, Instant};

/// How often [`wait_until`] looks again unless told otherwise: short, because most conditions
/// are a load from shared memory.
pub const DEFAULT_POLL: Duration = Duration::from_micros(500);

/// What a polled condition returns: done (with a value), or not yet (with what it saw).
pub trait Outcome {
    /// What the wait returns once the condition holds.
    type Done;
    /// What the condition observed while it did not hold (printed on a timeout).
    type Seen: Debug;
    /// `Ok` when the condition holds.
    fn outcome(self) -> Result<Self::Done, Self::Seen>;
}

impl Outcome for bool {
    type Done = ();
    type Seen = bool;
    fn outcome(self) -> Result<(), bool> {
        if self {
            Ok(())
        } else {
            Err(false)
        }
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Done = T;
    type Seen = E;
    fn outcome(self) -> Result<T, E> {
        self
    }
}

/// A bounded wait: what is waited for, for how long, how often to look, and what else to
/// show when it times out (a log, a control block).
pub struct Wait<'a> {
    what: &'a str,
    timeout: Duration,
    every: Duration,
    context: Option<Box<dyn Fn() -> String + 'a>>,
}

impl<'a> Wait<'a> {
    /// Waits up to `timeout` for `what`, looking every [`DEFAULT_POLL`].
    pub fn new(what: &'a str, timeout: Duration) -> Wait<'a> {
        Wait {
            what,
            timeout,
            every: DEFAULT_POLL,
            context: None,
        }
    }

    /// Looks every `every` (a condition that asks a process over a socket wants ms).
    pub fn every(mut self, every: Duration) -> Wait<'a> {
        self.every = every;
        self
    }

    /// Appends `context()` to the failure message (called only on a timeout).
    pub fn context(mut self, context: impl Fn() -> String + 'a) -> Wait<'a> {
        self.context = Some(Box::new(context));
        self
    }

    /// Polls `condition` until it holds and returns its value; panics after the timeout
    /// naming what was waited for, the last value observed and the context.
    pub fn until<O: Outcome>(self, mut condition: impl FnMut() -> O) -> O::Done {
        let start = Instant::now();
        loop {
            let seen = match condition().outcome() {
                Ok(done) => return done,
                Err(seen) => seen,
            };
            if start.elapsed() > self.timeout {
                let context = self
                    .context
                    .as_ref()
                    .map_or_else(String::new, |c| format!("\n{}", c()));
                panic!(
                    "timed out after {:?} waiting for {}; last observed: {seen:?}{context}",
                    self.timeout, self.what
                );
            }
            std::thread::sleep(self.every);
        }
    }
}

/// Waits (bounded) until `condition` holds: `true`, or `Ok(value)` (returned). Panics after
/// `timeout` naming `what` and the last value the condition observed (its `Err`).
pub fn wait_until<O: Outcome>(
    what: &str,
    timeout: Duration,
    condition: impl FnMut() -> O,
) -> O::Done {
    Wait::new(what, timeout).until(condition)
}

/// Aborts the whole test process if it is still alive `limit` after it was armed: for a test
/// that could hang inside code that never returns to a bounded wait (a hang fails CI instead
/// of stalling it). Disarmed on drop.
pub struct Watchdog(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Watchdog {
    /// Arms a watchdog for `what`.
    pub fn new(what: &'static str, limit: Duration) -> Watchdog {
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while !d.load(Ordering::Relaxed) {
                if t.elapsed() > limit {
                    eprintln!("{what}: no progress within {limit:?}: a hang");
                    std::process::abort();
                }
                std::thread::sleep(WATCHDOG_POLL);
            }
        });
        Watchdog(done)
    }
}

/// How often a [`Watchdog`] looks at the clock.
const WATCHDOG_POLL: Duration = Duration::from_millis(50);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait that times out names what it waited for and the last value it saw.
    #[test]
    fn a_timeout_names_what_and_the_last_value() {
        let err = std::panic::catch_unwind(|| {
            let mut n = 0u32;
            Wait::new("n to reach 1000", Duration::from_millis(20))
                .context(|| "the context".to_string())
                .until(|| {
                    n += 1;
                    Err::<(), _>(format!("n = {n}"))
                })
        })
        .unwrap_err();
        let msg = err.downcast_ref::<String>().unwrap();
        assert!(msg.contains("waiting for n to reach 1000"), "{msg}");
        assert!(msg.contains("last observed: \"n = "), "{msg}");
        assert!(msg.ends_with("\nthe context"), "{msg}");
    }
}
