//! understudy-supervisor: the operator's side.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod config;
pub mod plan;
