//! Memory per work unit, counted, not assumed: a global allocator that keeps this thread's
//! live heap bytes wraps the system one, and the store's growth is measured in those bytes
//! (deterministic: no timing, no resident-set sampling). The target is at most 32 bytes of
//! overhead per unit beyond its state (issue 15: 10 M units of 48 bytes well under 1 GB).
//!
//! This file holds one test, so no other test thread allocates while it counts (the count is
//! per thread anyway).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use understudy_runtime::store::{Op, Store};

struct Counting;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: usize, sign: isize) {
    // A thread being torn down has no counter left: its frees are not ours to count.
    let _ = LIVE_BYTES.try_with(|c| c.set(c.get() + sign * bytes as isize));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is a const-initialised thread-local `Cell`
// (no allocation, no re-entry into the allocator).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size(), 1);
        // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size(), 1);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        add(layout.size(), -1);
        // SAFETY: `ptr` came from `System` with `layout` (every allocation goes through us).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        add(new_size, 1);
        add(layout.size(), -1);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.with(|c| c.get())
}

const UNITS: u64 = 200_000;
/// The overhead allowed per unit beyond its state bytes.
const OVERHEAD_MAX: f64 = 32.0;

/// Spread ids, as clients' call ids are.
fn id_of(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

fn put(store: &mut Store, op: &mut Op, i: u64, len: usize) {
    if let Op::PutUnit { id, state, .. } = op {
        *id = id_of(i);
        state.clear();
        state.extend((0..len).map(|k| (i as usize + k) as u8));
    }
    store.apply(op);
}

/// Heap bytes per unit of `store` beyond `state_bytes` per unit, from a base count.
fn overhead(base: isize, units: u64, state_bytes: f64) -> f64 {
    (live_bytes() - base) as f64 / units as f64 - state_bytes
}

/// 200 k units of 48-byte states cost at most 48 + 32 heap bytes each; so do 200 k of 40–48
/// bytes (mixed lengths); moving every unit to a new length releases the old length's pages
/// (no more than the bound after the move); and retiring every unit gives back all but the
/// empty store's bookkeeping.
#[test]
fn units_cost_at_most_32_bytes_over_their_state() {
    let mut op = Op::PutUnit {
        id: 0,
        kind: 1,
        layout_version: 1,
        state: Vec::with_capacity(64),
    };
    let base = live_bytes();
    let mut store = Store::new();
    for i in 0..UNITS {
        put(&mut store, &mut op, i, 48);
    }
    let over = overhead(base, UNITS, 48.0);
    println!("48-byte states: {over:.1} heap bytes per unit over the state");
    assert!(
        over <= OVERHEAD_MAX,
        "{UNITS} units of 48 bytes: {over:.1} heap bytes per unit over the state, expected at most {OVERHEAD_MAX}"
    );
    assert_eq!(store.unit_count(), UNITS as usize);

    // Every unit replaced by a 40-byte state: the 48-byte pages go as they empty.
    for i in 0..UNITS {
        put(&mut store, &mut op, i, 40);
    }
    let over = overhead(base, UNITS, 40.0);
    println!("after moving to 40-byte states: {over:.1} heap bytes per unit over the state");
    assert!(
        over <= OVERHEAD_MAX,
        "after replacing 48-byte states by 40-byte ones: {over:.1} bytes per unit over the state, expected at most {OVERHEAD_MAX} (are emptied pages released?)"
    );

    for i in 0..UNITS {
        store.apply(&Op::RetireUnit { id: id_of(i) });
    }
    assert_eq!((store.unit_count(), store.digest()), (0, 0));
    let left = live_bytes() - base;
    println!("after retiring every unit: {left} heap bytes");
    // What stays: the index's buckets (5 bytes each, it does not shrink), the page list and
    // the per-length list heads.
    assert!(
        left <= (UNITS as isize) * 12,
        "after retiring every unit {left} heap bytes are still held, expected at most {} (the index and page list)",
        UNITS * 12
    );
    drop(store);

    // Mixed lengths 40..=48: one partly filled page per length at most.
    let base = live_bytes();
    let mut store = Store::new();
    let mut state_bytes = 0u64;
    for i in 0..UNITS {
        let len = 40 + (i % 9) as usize;
        state_bytes += len as u64;
        put(&mut store, &mut op, i, len);
    }
    let over = overhead(base, UNITS, state_bytes as f64 / UNITS as f64);
    println!("40-48-byte states: {over:.1} heap bytes per unit over the state");
    assert!(
        over <= OVERHEAD_MAX,
        "{UNITS} units of 40-48 bytes: {over:.1} heap bytes per unit over the state, expected at most {OVERHEAD_MAX}"
    );
}
