//! understudy: keep a latency-critical application alive through crashes and software upgrades.
//!
//! This facade re-exports the layers of the workspace: [`shm_layout`] (the bytes in shared
//! memory and the ring that carries them).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub use shm_layout;
