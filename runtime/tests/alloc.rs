//! DESIGN: "the hot path allocates nothing". Counted, not assumed: a global allocator that
//! counts calls wraps the system one, and a steady stream of transactions — read-modify-write
//! of work units, a table record replaced, a response — goes through the same public steps the
//! engines take: on the active `execute`, `push_tx` (each record claimed and written in place)
//! into a real /dev/shm ring and `TxBuffers::apply_to` (the stream with one checksum per batch,
//! as the engine sets it, and with none); on the standby `Consumer::read_batch` (in place) or
//! `Consumer::poll` (copied), `decode_op_into`, `Store::apply` and `Spare::recycle`. The client
//! path too: a request claimed in place (`Client::try_submit_with`), the engine's ingress read
//! (copied), its response claimed in place (`Input::committed`). After a warm-up, not one
//! allocation may happen on this thread.
//!
//! The count is per thread: another test thread allocating does not disturb it.

use shm_layout::region::{IdentityWords, Region, RegionSpec};
use shm_layout::ring::{BatchBuf, Frame, Integrity};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use understudy_runtime::app::write_versions;
use understudy_runtime::client::{Client, ClientInput};
use understudy_runtime::engine::{commit_block, execute, push_tx, Input, InputMeta, TxBuffers};
use understudy_runtime::protocol::{self, rt};
use understudy_runtime::store::Store;
use understudy_runtime::Application;
use understudy_test_support::TestDir;
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

/// How the standby reads in one run of the transaction test.
#[derive(Clone, Copy, Debug)]
enum Read {
    InPlace,
    Copied,
}

#[test]
fn steady_state_transactions_allocate_nothing_on_either_engine() {
    for (read, integrity) in [
        (Read::InPlace, Integrity::PerBatch),
        (Read::InPlace, Integrity::Off),
        (Read::Copied, Integrity::PerBatch),
    ] {
        transactions_allocate_nothing(read, integrity);
    }
}

fn transactions_allocate_nothing(read: Read, integrity: Integrity) {
    let dir = TestDir::new(&format!("alloc-{read:?}-{integrity:?}"));
    let me = IdentityWords {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = RegionSpec {
        capacity: 1 << 20,
        epoch: 1,
        kind: 1,
    };
    let region = Region::create(&dir.join("stream"), spec, me).expect("create region");
    let mut producer = region.producer().expect("producer");
    producer.set_integrity(integrity);
    let mut consumer = region.consumer().expect("consumer");
    consumer.set_require_integrity(integrity != Integrity::Off);
    consumer.set_release_every((1 << 20) / 64);

    // Updates 4 units and replaces one table record per request; answers 8 bytes.
    let mut app = Update4 {
        units: UNITS,
        table: Some(TABLE),
    };
    let wv = write_versions(&app.templates(), &app.features(), 0);
    let mut active = app.store();
    let mut standby = active.clone();
    let mut tx = TxBuffers::new();
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
        push_tx(&mut producer, &tx.ops, &commit).expect("room");
        tx.apply_to(&mut active);
        // The standby.
        let mut apply = |f: Frame<'_>| {
            let t = f.meta.record_type;
            if t == rt::COMMIT {
                return;
            }
            let spare = &mut standby_tx.spare;
            let op = protocol::decode_op_into(t, f.payload, f.meta.block_length, spare)
                .expect("valid op");
            standby.apply(&op);
            standby_tx.spare.recycle(op);
        };
        match read {
            Read::InPlace => {
                let view = consumer
                    .read_batch()
                    .expect("valid batch")
                    .expect("a batch");
                view.frames().for_each(&mut apply);
            }
            Read::Copied => {
                assert!(consumer.poll(&mut buf).expect("valid batch"), "a batch");
                buf.frames().for_each(&mut apply);
            }
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
        "10 000 steady-state transactions ({read:?} standby, {integrity:?}) allocated {during} times"
    );
    assert_eq!(active.digest(), standby.digest());
}

/// The client path allocates nothing per request on either side of the rings: the client's
/// request claimed and written in place, the engine's ingress read (copied, validated), its
/// response claimed and written in place. (Receiving a response hands the caller a `Vec`:
/// that is the client API's allocation, outside this count.)
#[test]
fn steady_state_requests_and_responses_allocate_nothing() {
    let dir = TestDir::new("alloc-client");
    let mut input = ClientInput::new(dir.path()).expect("engine side");
    let mut client = Client::connect_with(dir.path(), 1 << 16).expect("client");
    input.resume(&Store::new());
    let mut request = Vec::with_capacity(64);
    let mut response = [0u8; 40];
    let mut counted = 0u64;
    let mut run = |k: u64, count: bool| {
        let before = allocations();
        let seq = client
            .try_submit_with(24, |out| {
                out[..8].copy_from_slice(&k.to_le_bytes());
                out[8..].fill(7);
            })
            .expect("open")
            .expect("room");
        let meta = input.poll(&mut request).expect("the request");
        assert_eq!(
            (meta.request_seq, &request[..8]),
            (seq, &k.to_le_bytes()[..])
        );
        response[..8].copy_from_slice(&k.to_le_bytes());
        input.committed(&meta, &response);
        if count {
            counted += allocations() - before;
        }
        let (got_seq, got) = client.poll_response().expect("open").expect("the response");
        assert_eq!((got_seq, &got[..]), (seq, &response[..]));
    };
    for k in 0..5_000 {
        run(k, false);
    }
    for k in 5_000..15_000 {
        run(k, true);
    }
    assert_eq!(
        counted, 0,
        "10 000 steady-state requests and responses allocated {counted} times"
    );
}
