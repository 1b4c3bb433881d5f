//! DESIGN: "the hot path allocates nothing". Counted, not assumed: a global allocator that
//! counts calls wraps the system one, and a steady stream of transactions — read-modify-write
//! of work units, a table record replaced, a response — goes through the same public steps the
//! engines take: on the active `execute`, `push_tx` into a real /dev/shm ring and
//! `TxBuffers::apply_to` (the stream with one checksum per batch, as the engine sets it); on
//! the standby `Consumer::poll`, `decode_op_into`, `Store::apply`
//! and `Spare::recycle`. After a warm-up, not one allocation may happen on this thread.
//!
//! This file holds one test, so no other test thread allocates while it counts (the count is
//! per thread anyway).

use shm_layout::region::{ensure_private_dir, Identity, Region, RegionSpec};
use shm_layout::ring::{BatchBuf, Integrity};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::PathBuf;
use understudy_runtime::app::write_versions;
use understudy_runtime::engine::{commit_block, execute, push_tx, InputMeta, TxBuffers};
use understudy_runtime::protocol::{self, rt};
use understudy_runtime::Application;
use understudy_testkit::Update4;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is a const-initialised thread-local `Cell`
// (no allocation, no re-entry into the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (every allocation goes through us).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

const UNITS: u64 = 256;
const TABLE: u16 = 7;

struct ShmDir(PathBuf);
impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn steady_state_transactions_allocate_nothing_on_either_engine() {
    let dir = ShmDir(PathBuf::from(format!(
        "/dev/shm/understudy-test-alloc-{}",
        std::process::id()
    )));
    ensure_private_dir(&dir.0).expect("shm dir");
    let me = Identity {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = RegionSpec {
        capacity: 1 << 20,
        epoch: 1,
        kind: 1,
    };
    let region = Region::create(&dir.0.join("stream"), spec, me).expect("create region");
    let mut producer = region.producer().expect("producer");
    producer.set_integrity(Integrity::PerBatch);
    let mut consumer = region.consumer().expect("consumer");

    // Updates 4 units and replaces one table record per request; answers 8 bytes.
    let mut app = Update4 {
        units: UNITS,
        table: Some(TABLE),
    };
    let wv = write_versions(&app.templates(), &app.features(), 0);
    let mut active = app.store();
    let mut standby = active.clone();
    let mut tx = TxBuffers::new();
    let mut scratch = Vec::with_capacity(4096);
    let mut buf = BatchBuf::with_capacity(1 << 16);
    let mut standby_tx = TxBuffers::new();

    let mut run = |k: u64| {
        let meta = InputMeta {
            source: 1,
            request_seq: k,
            next_pos: k + 1,
            next_seq: k + 1,
        };
        // The active.
        let refused = execute(&mut app, &active, &mut tx, 0, &wv, &meta, &k.to_le_bytes());
        assert!(!refused);
        let commit = commit_block(k, &meta);
        push_tx(&mut producer, &tx.ops, &commit, &mut scratch).expect("room");
        tx.apply_to(&mut active);
        // The standby.
        assert!(consumer.poll(&mut buf).expect("valid batch"), "a batch");
        for f in buf.frames() {
            let t = f.meta.record_type;
            if t == rt::COMMIT {
                continue;
            }
            let spare = &mut standby_tx.spare;
            let op = protocol::decode_op_into(t, f.payload, f.meta.block_length, spare)
                .expect("valid op");
            standby.apply(&op);
            standby_tx.spare.recycle(op);
        }
    };
    // Warm-up: the ring's first lap, the table's keys, the pools' buffers.
    for k in 0..2_000 {
        run(k);
    }
    let before = allocations();
    for k in 2_000..12_000 {
        run(k);
    }
    let during = allocations() - before;
    assert_eq!(
        during, 0,
        "10 000 steady-state transactions allocated {during} times"
    );
    assert_eq!(active.digest(), standby.digest());
}
