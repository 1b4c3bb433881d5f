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
//! This layer knows nothing of the upgrade plan: it obeys the commands in the control block
//! (switchover, enable features, stop) and publishes its state there. Under the supervisor
//! (`understudy up`) an engine's `main` is one call, [`run`], which reads the
//! [launch contract](launch) the supervisor sets.
//!
//! **Start here**: the example application `examples/callstate` (a telecom call-state table
//! in two versions, with its client) is the one to read first; `matchbook` is the large one.
//!
//! # Writing an engine
//!
//! ```no_run
//! use understudy_runtime::records::{Record, TemplateInfo};
//! use understudy_runtime::zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
//! use understudy_runtime::{Application, Refused, Tx};
//!
//! #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy)]
//! #[repr(C)]
//! struct Counter { value: u64 }
//! impl Record for Counter {
//!     const TYPE_ID: u16 = 1;
//!     const NAME: &'static str = "counter";
//!     const VERSIONS: &'static [(u16, u16)] = &[(1, 8)];
//!     fn defaults() -> Self { Counter { value: 0 } }
//! }
//!
//! struct Counters;
//! impl Application for Counters {
//!     fn name(&self) -> &str { "counters" }
//!     fn version(&self) -> u32 { 1 }
//!     fn templates(&self) -> Vec<TemplateInfo> { vec![TemplateInfo::of::<Counter>()] }
//!     /// A request is a counter id (8 bytes); the answer is its new value.
//!     fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
//!         let id = u64::from_le_bytes(req.try_into().map_err(|_| Refused(b"8 bytes".to_vec()))?);
//!         let mut c = tx.unit_record::<Counter>(id).ok().flatten().unwrap_or(Counter { value: 0 });
//!         c.value += 1;
//!         tx.update_record(id, &c);
//!         tx.respond(&c.value.to_le_bytes());
//!         Ok(())
//!     }
//! }
//!
//! fn main() {
//!     understudy_runtime::run(Counters) // never returns; exit codes in `launch::exit`
//! }
//! ```
//!
//! Without a supervisor (tests, tools) build an [`Engine`] yourself with [`Options`] and a
//! [`client::ClientInput`]; give every engine of a cluster its own slot.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod app;
pub mod client;
/// The control block: the protocol between supervisor and engines (the control crate's).
#[doc(hidden)]
pub use understudy_control::control;
/// Live counters in shared memory (the control crate's).
pub use understudy_control::counters;
pub mod engine;
pub mod launch;
/// Process identity, the robust lock and death detection (the control crate's).
#[doc(hidden)]
pub use understudy_control::liveness;
#[doc(hidden)]
pub mod protocol;
pub mod records;
pub mod store;

pub use app::{
    Activation, Application, Feature, Refused, Takeover, Timer, TimerId, Tx, TxTooLarge,
};
pub use engine::{
    Backpressure, Engine, EngineError, Exit, Idle, Input, InputMeta, OnPanic, Options,
};
pub use records::{Record, RecordError, TemplateInfo};
pub use shm_layout::assert_record_layout;
pub use store::Store;
/// The zerocopy crate the record derives come from (`FromBytes`, `IntoBytes`, `Immutable`,
/// `KnownLayout`); the derives expand to paths of a crate named `zerocopy`, so an application
/// also lists `zerocopy` (same version) among its dependencies.
pub use zerocopy;

/// Protocol and engine internals: used by this workspace's benchmarks and tests, not part of
/// the stable API.
#[doc(hidden)]
pub mod internals {
    pub use crate::control;
    pub use crate::engine::{
        commit_block, execute, execute_local, execute_local_ops, push_tx, SourcePosition,
        TxBuffers, SYS_INPUTS,
    };
    pub use crate::liveness;
    pub use crate::protocol;
}

/// Run `app` as an engine under the supervisor, and exit: what an engine executable's `main`
/// calls.
///
/// Reads the [launch contract](launch) (cluster directory, slot, standby-only, ring size,
/// tuning variables; the standalone form's arguments `--dir D --slot a|b|c [--standby]
/// [--ring N] [--spin]` override it), sets up logging ([`init_logging`]), serves the cluster's shared-memory
/// clients, and exits with a code of [`launch::exit`]: 0 stopped on command, 2 misconfigured
/// (a variable missing or malformed — the message names it), 3 failed, 4 slot held by another
/// live engine. A panic aborts the process (see [`OnPanic`]): a failover.
pub fn run<A: Application>(app: A) -> ! {
    init_logging();
    std::process::exit(run_code(app))
}

fn run_code<A: Application>(app: A) -> i32 {
    let name = app.name().to_string();
    let fail = |code: i32, e: &dyn std::fmt::Display| -> i32 {
        tracing::error!("{name}: {e}");
        eprintln!("{name}: {e}");
        code
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let launch = match launch::Launch::from_env_and_args(&args) {
        Ok(l) => l,
        Err(e) => return fail(launch::exit::MISCONFIGURED, &e),
    };
    let opt = match launch::options(&launch) {
        Ok(o) => o,
        Err(e) => return fail(launch::exit::MISCONFIGURED, &e),
    };
    let input = match client::ClientInput::new(&launch.dir) {
        Ok(i) => i,
        Err(e) => return fail(launch::exit::FAILED, &e),
    };
    let engine = match Engine::new(app, input, opt) {
        Ok(e) => e,
        Err(e @ EngineError::SlotTaken { .. }) => return fail(launch::exit::SLOT_TAKEN, &e),
        Err(e) => return fail(launch::exit::FAILED, &e),
    };
    match engine.run() {
        Ok(Exit::Stopped) => launch::exit::STOPPED,
        Err(e) => fail(launch::exit::FAILED, &e),
    }
}

/// The variable that chooses the log format: `json` (one JSON object per line, for log
/// shippers) or `text` (the default). `understudy --log-format json` sets it, so the engines
/// the supervisor starts log the same way.
pub const LOG_FORMAT_VAR: &str = "UNDERSTUDY_LOG_FORMAT";

/// Log with `tracing` to stderr, filtered by `RUST_LOG` (default `info`): what every engine
/// executable and the supervisor do first. A second call does nothing.
///
/// Text lines carry ANSI colours only when stderr is a terminal (a log file or a journal gets
/// plain text); with [`LOG_FORMAT_VAR`]` = json` every line is a JSON object.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_VAR).is_ok_and(|v| v.trim().eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().with_ansi(false).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
}
