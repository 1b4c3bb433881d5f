//! Test engine, version 1.
fn main() {
    understudy_runtime::testkit::engine_main(1)
}
