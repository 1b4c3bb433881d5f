//! Test engine, version 1.
//!
//! `main` returns what the engine's run ended with (and returns early on the
//! `return-from-main` fault, see `understudy_testkit::Fault`).
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(understudy_testkit::engine_process(1))
}
