//! Command result codes: what an engine answers to a command in the control block's
//! mailbox (the word the supervisor reads back with the acknowledgement).

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
