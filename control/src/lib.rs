//! understudy-control: the protocol between the supervisor and the engines, and nothing else.
//!
//! Everything the two sides share is here, so that "the supervisor never knows how engines
//! replicate" is a compile-time fact: the supervisor depends on this crate, never on the
//! runtime.
//!
//! - [`control`]: the control block (`<cluster dir>/control`): epoch, active slot, cluster
//!   state, the robust mutex the active holds, the command mailbox and one record per engine
//!   slot; every word is untrusted, the ones decisions depend on are checked and mirrored.
//! - [`liveness`]: process identity (pid + start time), the robust lock and death detection.
//! - [`counters`]: the shared counters file each engine writes and the supervisor reads.
//! - [`launch`]: the launch contract (environment variables and exit codes).
//! - [`result`]: what an engine answers to a command.
//!
//! This layer knows processes, files and words in shared memory. It must never know about the
//! store, frames, replication or the upgrade plan: the runtime decides what an engine does with
//! a command, the supervisor decides when to post one.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod control;
pub mod counters;
pub mod launch;
pub mod liveness;
pub mod result;
