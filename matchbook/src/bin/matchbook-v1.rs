//! matchbook version 1 engine.
fn main() {
    matchbook::app::engine_main(1)
}
