//! understudy: keep a latency-critical application alive through crashes and software upgrades.
//!
//! This facade re-exports the layers of the workspace — [`shm_layout`] (the bytes in shared
//! memory and the ring that carries them), [`runtime`] (the engine an application links to),
//! [`supervisor`] (the operator's side) — and holds the `demo` that shows them working together
//! on the [`matchbook`] reference application.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod demo;
pub mod torture;

pub use matchbook;
pub use shm_layout;
pub use understudy_runtime as runtime;
pub use understudy_supervisor as supervisor;

/// If this executable was invoked under an engine's name (`matchbook-v1`, `matchbook-v2`,
/// `understudy-testapp-v1`, `understudy-testapp-v2`), run that engine and never return: the
/// demo and the torture command use symbolic links to this binary as engine executables.
pub fn dispatch_multicall() {
    let arg0 = std::env::args_os().next().unwrap_or_default();
    let name = std::path::Path::new(&arg0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.as_str() {
        "matchbook-v1" => matchbook::app::engine_main(1),
        "matchbook-v2" => matchbook::app::engine_main(2),
        // The torture command's engines when the test executables were not built.
        "understudy-testapp-v1" => understudy_testkit::engine_main(1),
        "understudy-testapp-v2" => understudy_testkit::engine_main(2),
        _ => {}
    }
}
