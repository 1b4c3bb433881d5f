//! callstate version 1: the engine executable `understudy up` starts.
fn main() {
    understudy_runtime::run(callstate::CallState::new(1))
}
