//! Test engine, version 2 (the `tagged` feature, Counter layout 2).
fn main() {
    understudy_runtime::testkit::engine_main(2)
}
