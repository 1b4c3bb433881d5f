//! What an engine answers to a command: the active's answer to a cluster command (the
//! mailbox's result word, read back with the acknowledgement) and an engine's refusal of a
//! slot command (its slot's [`Field::CmdRefusal`](crate::control::Field::CmdRefusal) word).
//!
//! The words are the wire form (the constants below, shared with engines of other versions);
//! [`CommandResult`] is the typed form every reader decodes them into. Shared memory is
//! untrusted, so decoding never fails: a code this build does not know is
//! [`CommandResult::UnknownCode`], named as such.
//!
//! ```
//! use understudy_control::result::{self, CommandResult};
//! assert_eq!(CommandResult::from_code(result::NOT_HOT), CommandResult::NotHot);
//! assert_eq!(CommandResult::from_code(77).to_string(), "unknown code 77");
//! assert_eq!(CommandResult::NoConsistentCopy.code(), result::NO_CONSISTENT_COPY);
//! ```

use std::fmt;

/// Done.
pub const OK: u64 = 0;
/// The target is not a hot standby.
pub const NOT_HOT: u64 = 2;
/// A feature cannot be enabled (a peer lacks it).
pub const NOT_ENABLEABLE: u64 = 3;
/// Unknown command.
pub const UNKNOWN: u64 = 4;
/// The switchover could not start (no room for the step-up frame, or a region could not
/// be created); the active stays active.
pub const BUSY: u64 = 5;
/// PROMOTE refused: the engine holds no consistent copy (it was catching up, or has nothing).
pub const NO_CONSISTENT_COPY: u64 = 6;
/// PROMOTE refused: an active serves, or another engine claimed the epoch first.
pub const ACTIVE_SERVES: u64 = 7;

/// A result word, typed. See the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandResult {
    /// Done ([`OK`]).
    Ok,
    /// The switchover's target is not a hot standby ([`NOT_HOT`]).
    NotHot,
    /// A feature is not supported by every engine ([`NOT_ENABLEABLE`]).
    NotEnableable,
    /// The engine does not know the command ([`UNKNOWN`]).
    UnknownCommand,
    /// The switchover could not start; the active stays active ([`BUSY`]).
    Busy,
    /// A promote refused: no consistent copy ([`NO_CONSISTENT_COPY`]).
    NoConsistentCopy,
    /// A promote refused: an active serves ([`ACTIVE_SERVES`]).
    ActiveServes,
    /// A code this build does not know (a newer engine's, or a damaged word).
    UnknownCode(u64),
}

impl CommandResult {
    /// Every code this build knows, with its typed form (for tests and documentation).
    pub const KNOWN: [(u64, CommandResult); 7] = [
        (OK, CommandResult::Ok),
        (NOT_HOT, CommandResult::NotHot),
        (NOT_ENABLEABLE, CommandResult::NotEnableable),
        (UNKNOWN, CommandResult::UnknownCommand),
        (BUSY, CommandResult::Busy),
        (NO_CONSISTENT_COPY, CommandResult::NoConsistentCopy),
        (ACTIVE_SERVES, CommandResult::ActiveServes),
    ];

    /// The typed form of a result word (never fails: see [`UnknownCode`](Self::UnknownCode)).
    pub fn from_code(code: u64) -> CommandResult {
        match code {
            OK => CommandResult::Ok,
            NOT_HOT => CommandResult::NotHot,
            NOT_ENABLEABLE => CommandResult::NotEnableable,
            UNKNOWN => CommandResult::UnknownCommand,
            BUSY => CommandResult::Busy,
            NO_CONSISTENT_COPY => CommandResult::NoConsistentCopy,
            ACTIVE_SERVES => CommandResult::ActiveServes,
            other => CommandResult::UnknownCode(other),
        }
    }

    /// The word an engine writes for this result.
    pub fn code(self) -> u64 {
        match self {
            CommandResult::Ok => OK,
            CommandResult::NotHot => NOT_HOT,
            CommandResult::NotEnableable => NOT_ENABLEABLE,
            CommandResult::UnknownCommand => UNKNOWN,
            CommandResult::Busy => BUSY,
            CommandResult::NoConsistentCopy => NO_CONSISTENT_COPY,
            CommandResult::ActiveServes => ACTIVE_SERVES,
            CommandResult::UnknownCode(code) => code,
        }
    }

    /// Whether the command was done.
    pub fn is_ok(self) -> bool {
        self == CommandResult::Ok
    }
}

impl fmt::Display for CommandResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandResult::Ok => f.write_str("ok"),
            CommandResult::NotHot => f.write_str("the target is not a hot standby"),
            CommandResult::NotEnableable => {
                f.write_str("a feature is not supported by every engine")
            }
            CommandResult::UnknownCommand => f.write_str("the engine does not know the command"),
            CommandResult::Busy => f.write_str(
                "the switchover could not start (no room for the step-up frame, or a region could not be created); the active stays active",
            ),
            CommandResult::NoConsistentCopy => f.write_str(
                "it holds no consistent copy (it was catching up, or has nothing yet)",
            ),
            CommandResult::ActiveServes => {
                f.write_str("an active serves (or another engine claimed the epoch first)")
            }
            CommandResult::UnknownCode(code) => write!(f, "unknown code {code}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every known code decodes to its variant and encodes back to itself, each with a
    /// distinct message; codes are distinct.
    #[test]
    fn every_known_code_round_trips() {
        for (code, typed) in CommandResult::KNOWN {
            assert_eq!(CommandResult::from_code(code), typed, "code {code}");
            assert_eq!(typed.code(), code);
            assert!(!typed.to_string().contains("unknown code"), "{typed}");
        }
        let mut codes: Vec<u64> = CommandResult::KNOWN.iter().map(|(c, _)| *c).collect();
        let mut messages: Vec<String> = CommandResult::KNOWN
            .iter()
            .map(|(_, t)| t.to_string())
            .collect();
        codes.sort_unstable();
        codes.dedup();
        messages.sort();
        messages.dedup();
        assert_eq!(codes.len(), CommandResult::KNOWN.len());
        assert_eq!(messages.len(), CommandResult::KNOWN.len());
    }

    /// Any other word (shared memory is untrusted) is an unknown code, named with its value,
    /// and kept as found.
    #[test]
    fn unknown_codes_are_named() {
        for code in [1, 8, 9, 100, u64::MAX / 2, u64::MAX] {
            let typed = CommandResult::from_code(code);
            assert_eq!(typed, CommandResult::UnknownCode(code));
            assert_eq!(typed.to_string(), format!("unknown code {code}"));
            assert_eq!(typed.code(), code);
            assert!(!typed.is_ok());
        }
    }
}
