//! matchbook version 2 engine (iceberg orders, order-book layout 2).
fn main() {
    matchbook::app::engine_main(2)
}
