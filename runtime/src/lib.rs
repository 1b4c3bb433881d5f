//! understudy-runtime: the library an application links to become an understudy engine.
//!
//! An application implements [`Application`]: its name and version, the record templates it
//! writes with their layout versions, its features, and a handler that processes one request
//! inside a transaction context ([`Tx`]) where it registers, updates and retires work units and
//! puts and deletes table records. An [`Engine`] runs it in one of two roles:
//!
//! - **active**: takes requests from an [`Input`] (the shared-memory [`client::ClientInput`] in
//!   production), commits each transaction to every standby's stream as one batch, then answers;
//! - **standby**: applies every committed batch to its own copy (an apply hook keeps the
//!   application's derived indexes hot), watches the active through a robust mutex, and steps
//!   up the moment the active dies; planned switchovers hand the role over without catch-up.
//!
//! The engines agree on record layouts across versions at attach time ([`app::negotiate`]),
//! and a new standby catches up from a chunked snapshot interleaved with live traffic.
//! Everything the engines share lives in files under the cluster directory: the control block
//! ([`control`]), one replication ring pair per standby, one ring pair per client.
//!
//! This layer knows nothing of the supervisor or of the upgrade plan: it obeys the commands in
//! the control block (switchover, enable features, stop) and publishes its state there.
//!
//! ```no_run
//! use understudy_runtime::{client::ClientInput, Engine, Options};
//! # fn app() -> understudy_runtime::testkit::TestApp { understudy_runtime::testkit::TestApp::new(1) }
//! let dir = std::path::Path::new("/dev/shm/understudy/demo");
//! let input = ClientInput::new(dir).unwrap();
//! let engine = Engine::new(app(), input, Options::new(dir, 0)).unwrap();
//! engine.run().unwrap();
//! ```

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod client;
pub mod control;
pub mod counters;
pub mod engine;
pub mod liveness;
pub mod protocol;
pub mod store;
pub mod testkit;

pub use app::{Application, Feature, Refused, Tx};
pub use engine::{Backpressure, Engine, Idle, Input, InputMeta, OnPanic, Options};

/// Log with `tracing` to stderr, filtered by `RUST_LOG` (default `info`): what every engine
/// executable and the supervisor do first. A second call does nothing.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init();
}
