//! callstate version 2: call limits (the `call-limit` feature, off until enabled).
fn main() {
    understudy_runtime::run(callstate::CallState::new(2))
}
