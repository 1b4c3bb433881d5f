//! The launch contract between the supervisor and an engine: the environment variables a
//! supervisor sets when it starts an engine, how an engine parses them, and the exit codes an
//! engine ends with. Written once, here; the supervisor (`supervisor/src/process.rs`) sets the
//! variables by these names and the runtime's `understudy_runtime::run` reads them.
//!
//! | variable | set by | meaning |
//! |---|---|---|
//! | [`ENV_DIR`] `UNDERSTUDY_DIR` | supervisor | the cluster directory (control file, rings) |
//! | [`ENV_SLOT`] `UNDERSTUDY_SLOT` | supervisor | the engine's slot: `a`, `b` or `c` |
//! | [`ENV_STANDBY`] `UNDERSTUDY_STANDBY` | supervisor | `1`: never start as the first active |
//! | [`ENV_RING`] `UNDERSTUDY_RING` | supervisor | capacity in bytes of the rings it creates |
//! | [`ENV_BACKPRESSURE_US`] | supervisor, `[engine] env` | wait bound for a full standby stream (0 = untether) |
//! | [`ENV_HUNG_MS`] | supervisor, `[engine] env` | heartbeat age that counts as hung |
//! | [`ENV_IDLE`] | `[engine] env` | `spin`, `shared` or `<spin polls>,<sleep µs>` |
//! | [`ENV_CATCHUP_CHUNK`] | `[engine] env` | snapshot items per catch-up chunk |
//! | [`ENV_INTEGRITY`] | supervisor (`ring.integrity`), `[engine] env` | the replication stream's checksums: `batch` or `off` |
//! | [`ENV_STANDBY_POLL_PAUSE_US`] | `[engine] env` | a standby's pause between polls that found nothing, µs |
//!
//! The first four ([`SUPERVISOR_OWNED`]) are the supervisor's alone. An engine given
//! `UNDERSTUDY_DIR` but no `UNDERSTUDY_SLOT` was launched by something that does not speak the
//! contract and refuses to start ([`LaunchError::MissingSlot`]), as does an engine whose slot a
//! live engine already holds (the runtime's `EngineError::SlotTaken`, exit code
//! [`exit::SLOT_TAKEN`]).
//!
//! # Examples
//!
//! ```
//! use understudy_control::launch::{Launch, LaunchError};
//! let env = |k: &str| match k {
//!     "UNDERSTUDY_DIR" => Some("/dev/shm/understudy/prod".to_string()),
//!     "UNDERSTUDY_SLOT" => Some("b".to_string()),
//!     "UNDERSTUDY_STANDBY" => Some("1".to_string()),
//!     _ => None,
//! };
//! let l = Launch::from_lookup(env).unwrap();
//! assert_eq!((l.slot, l.standby_only), (1, true));
//!
//! let no_slot = |k: &str| (k == "UNDERSTUDY_DIR").then(|| "/dev/shm/x".to_string());
//! assert!(matches!(Launch::from_lookup(no_slot), Err(LaunchError::MissingSlot { .. })));
//! ```

use std::fmt;
use std::path::PathBuf;

pub use crate::control::{slot_index, slot_name};

/// The cluster directory.
pub const ENV_DIR: &str = "UNDERSTUDY_DIR";
/// The slot, a letter `a`, `b` or `c`.
pub const ENV_SLOT: &str = "UNDERSTUDY_SLOT";
/// `1`: start as standby even if no active exists.
pub const ENV_STANDBY: &str = "UNDERSTUDY_STANDBY";
/// Ring capacity in bytes of the streams the engine creates as a standby.
pub const ENV_RING: &str = "UNDERSTUDY_RING";
/// Back-pressure wait bound in µs (0 = untether a standby whose stream is full at once).
pub const ENV_BACKPRESSURE_US: &str = "UNDERSTUDY_BACKPRESSURE_US";
/// Back-pressure wait bound in ms (the same, coarser).
pub const ENV_BACKPRESSURE_MS: &str = "UNDERSTUDY_BACKPRESSURE_MS";
/// Heartbeat age in ms that counts as hung.
pub const ENV_HUNG_MS: &str = "UNDERSTUDY_HUNG_MS";
/// Idle strategy: `spin`, `shared` or `<spin polls>,<sleep µs>`.
pub const ENV_IDLE: &str = "UNDERSTUDY_IDLE";
/// Snapshot items per catch-up chunk.
pub const ENV_CATCHUP_CHUNK: &str = "UNDERSTUDY_CATCHUP_CHUNK";
/// The replication stream's checksums: `batch` (one per transaction, the default) or `off`.
pub const ENV_INTEGRITY: &str = "UNDERSTUDY_INTEGRITY";
/// A standby's pause between polls of its stream that found nothing, in µs (0: poll
/// continuously).
pub const ENV_STANDBY_POLL_PAUSE_US: &str = "UNDERSTUDY_STANDBY_POLL_PAUSE_US";
/// The variables only the supervisor may set (the config refuses them in `[engine] env`).
pub const SUPERVISOR_OWNED: [&str; 4] = [ENV_DIR, ENV_SLOT, ENV_STANDBY, ENV_RING];

/// Exit codes of an engine run by `understudy_runtime::run`.
pub mod exit {
    /// Stopped on command (`understudy down`, a stop command in the control block).
    pub const STOPPED: i32 = 0;
    /// The launch contract is broken: a variable missing or malformed (the message names it,
    /// what was expected and what was found). Restarting will not help.
    pub const MISCONFIGURED: i32 = 2;
    /// The engine failed: it could not set up (control file, client rings) or its run ended
    /// with an error (refused by the active, a damaged stream).
    pub const FAILED: i32 = 3;
    /// Its slot is held by another live engine. Restarting will not help.
    pub const SLOT_TAKEN: i32 = 4;
}

/// What the supervisor told an engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The cluster directory.
    pub dir: PathBuf,
    /// The slot index (0 = a, 1 = b, 2 = c).
    pub slot: usize,
    /// Never start as the first active.
    pub standby_only: bool,
    /// Ring capacity, if the supervisor set one.
    pub ring: Option<usize>,
    /// Spin when idle (`--spin`; the same as `UNDERSTUDY_IDLE=spin`).
    pub spin: bool,
}

/// A launch contract that cannot be followed; names the variable, what was expected and found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// No `UNDERSTUDY_DIR`: not launched by a supervisor.
    MissingDir,
    /// `UNDERSTUDY_DIR` but no `UNDERSTUDY_SLOT`.
    MissingSlot {
        /// The directory it was given.
        dir: PathBuf,
    },
    /// A variable with a value it cannot use.
    Malformed {
        /// The variable.
        var: &'static str,
        /// What it accepts.
        expected: &'static str,
        /// What it holds.
        found: String,
    },
    /// A tuning variable (the runtime's `Options::apply_env` reads them) is malformed.
    Tuning(String),
    /// A command-line argument it does not know, or one missing its value.
    Argument(String),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::MissingDir => write!(
                f,
                "{ENV_DIR}: expected the cluster directory (set by `understudy up`), found none; \
                 run this engine under the supervisor, or build an Engine with Options yourself"
            ),
            LaunchError::MissingSlot { dir } => write!(
                f,
                "{ENV_SLOT}: expected a slot `a`, `b` or `c` for the cluster at {}, found none \
                 (an engine with no slot would take slot a, which another engine may hold)",
                dir.display()
            ),
            LaunchError::Malformed {
                var,
                expected,
                found,
            } => write!(f, "{var}: expected {expected}, found `{found}`"),
            LaunchError::Tuning(s) => f.write_str(s),
            LaunchError::Argument(s) => f.write_str(s),
        }
    }
}
impl std::error::Error for LaunchError {}

impl Launch {
    /// Read the contract from the process environment.
    pub fn from_env() -> Result<Launch, LaunchError> {
        Launch::from_lookup(|k| std::env::var(k).ok())
    }

    /// Read the contract from the environment, then let the standalone form's command-line
    /// arguments override it: `--dir D --slot a|b|c [--standby] [--ring N] [--spin]` (how tests
    /// and tools start an engine without a supervisor).
    pub fn from_env_and_args(args: &[String]) -> Result<Launch, LaunchError> {
        let mut set: Vec<(&'static str, String)> = Vec::new();
        let mut spin = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let var = match a.as_str() {
                "--dir" => ENV_DIR,
                "--slot" => ENV_SLOT,
                "--ring" => ENV_RING,
                "--standby" => {
                    set.push((ENV_STANDBY, "1".into()));
                    continue;
                }
                "--spin" => {
                    spin = true;
                    continue;
                }
                other => {
                    return Err(LaunchError::Argument(format!(
                        "expected --dir, --slot, --ring, --standby or --spin, found `{other}`"
                    )))
                }
            };
            let v = it.next().ok_or_else(|| {
                LaunchError::Argument(format!("{a}: expected a value, found the end"))
            })?;
            set.push((var, v.clone()));
        }
        let mut l = Launch::from_lookup(|k| {
            set.iter()
                .rev()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
                .or_else(|| std::env::var(k).ok())
        })?;
        l.spin = spin;
        Ok(l)
    }

    /// Read the contract through `var` (the environment, or a map in tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Launch, LaunchError> {
        let dir = match var(ENV_DIR) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => return Err(LaunchError::MissingDir),
        };
        let slot = match var(ENV_SLOT) {
            None => return Err(LaunchError::MissingSlot { dir }),
            Some(s) => slot_index(s.trim()).ok_or(LaunchError::Malformed {
                var: ENV_SLOT,
                expected: "a slot letter `a`, `b` or `c`",
                found: s,
            })?,
        };
        let standby_only = match var(ENV_STANDBY).as_deref().map(str::trim) {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(other) => {
                return Err(LaunchError::Malformed {
                    var: ENV_STANDBY,
                    expected: "`1`, `0` or nothing",
                    found: other.to_string(),
                })
            }
        };
        let ring = match var(ENV_RING) {
            None => None,
            Some(v) => Some(
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|n| *n >= 4096)
                    .ok_or(LaunchError::Malformed {
                        var: ENV_RING,
                        expected: "a ring capacity in bytes, at least 4096",
                        found: v,
                    })?,
            ),
        };
        Ok(Launch {
            dir,
            slot,
            standby_only,
            ring,
            spin: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn parses_what_the_supervisor_sets() {
        let l = Launch::from_lookup(lookup(&[
            (ENV_DIR, "/dev/shm/x/y"),
            (ENV_SLOT, "c"),
            (ENV_RING, "65536"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            Launch {
                dir: "/dev/shm/x/y".into(),
                slot: 2,
                standby_only: false,
                ring: Some(65536),
                spin: false,
            }
        );
    }

    proptest::proptest! {
        /// Any values: a launch or a typed error naming the variable, never a panic; a slot is
        /// accepted only as `a`, `b` or `c`.
        #[test]
        fn any_values(dir in ".{0,12}", slot in ".{0,3}", standby in ".{0,2}", ring in ".{0,8}") {
            let env = [(ENV_DIR, dir.as_str()), (ENV_SLOT, slot.as_str()),
                (ENV_STANDBY, standby.as_str()), (ENV_RING, ring.as_str())];
            match Launch::from_lookup(lookup(&env)) {
                Ok(l) => proptest::prop_assert!(["a", "b", "c"].contains(&slot.trim())
                    && l.slot == slot_index(slot.trim()).unwrap()),
                Err(e) => proptest::prop_assert!(!e.to_string().is_empty()),
            }
        }
    }

    #[test]
    fn arguments_of_the_standalone_form() {
        let args: Vec<String> = ["--dir", "/d", "--slot", "b", "--standby", "--spin"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let l = Launch::from_env_and_args(&args).unwrap();
        assert_eq!((l.slot, l.standby_only, l.spin), (1, true, true));
        assert_eq!(l.dir, PathBuf::from("/d"));
        let e = Launch::from_env_and_args(&["--max".to_string()]).unwrap_err();
        assert!(e.to_string().contains("`--max`"), "{e}");
    }

    #[test]
    fn refuses_what_it_cannot_follow() {
        assert_eq!(
            Launch::from_lookup(lookup(&[])),
            Err(LaunchError::MissingDir)
        );
        let e = Launch::from_lookup(lookup(&[(ENV_DIR, "/d")])).unwrap_err();
        assert!(e.to_string().contains("UNDERSTUDY_SLOT"), "{e}");
        assert!(e.to_string().contains("/d"), "{e}");
        let e = Launch::from_lookup(lookup(&[(ENV_DIR, "/d"), (ENV_SLOT, "0")])).unwrap_err();
        assert!(
            e.to_string().contains("`a`, `b` or `c`") && e.to_string().contains("`0`"),
            "{e}"
        );
        let e = Launch::from_lookup(lookup(&[(ENV_DIR, "/d"), (ENV_SLOT, "a"), (ENV_RING, "x")]))
            .unwrap_err();
        assert!(e.to_string().contains("UNDERSTUDY_RING"), "{e}");
        let e = Launch::from_lookup(lookup(&[
            (ENV_DIR, "/d"),
            (ENV_SLOT, "a"),
            (ENV_STANDBY, "yes"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("UNDERSTUDY_STANDBY"), "{e}");
    }
}
