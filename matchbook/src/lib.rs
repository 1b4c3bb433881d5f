//! matchbook: a limit-order matching engine, understudy's reference application.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod book;
pub mod loadgen;
pub mod units;
