//! understudy-runtime: the engine.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod control;
pub mod engine;
pub mod liveness;
pub mod protocol;
pub mod store;

pub use app::{Application, Feature, Refused, Tx};
pub use engine::{Backpressure, Engine, Idle, Input, InputMeta, Options};
pub mod client;
pub mod testkit;
