//! Memory and speed of the work-unit store at scale: builds N units (default 1,000,000) of
//! S-byte states (default 48, the size of a telecom call state), then times random replaces,
//! a snapshot walk and retiring every unit, and prints the resident memory and live heap bytes
//! per unit.
//!
//! ```text
//! cargo run --release -p understudy-runtime --example store_memory -- 10000000 [48]
//! ```
//!
//! Resident memory comes from /proc/self/statm (what the kernel charges the process); live
//! heap bytes from a global allocator that counts what is allocated and not yet freed. Both
//! are taken with the store full, relative to just before the first unit was put.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;
use understudy_runtime::store::{Op, Spare, Store, UnitCursor};

struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is a static atomic (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` came from `System` with `layout` (every allocation goes through us).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Relaxed);
        // SAFETY: as for `dealloc`, and the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Resident bytes of this process (/proc/self/statm, second field, in pages).
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm's second field: resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    pages * page
}

/// Unit ids spread like a client's call ids (not dense, not sorted).
fn id_of(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn ns_per(op: &str, n: u64, t: Instant) {
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{op:<28} {ns:>8.1} ns/op");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("unit count"));
    let len: usize = args.next().map_or(48, |a| a.parse().expect("state bytes"));
    println!("{n} units of {len}-byte states");

    let mut store = Store::new();
    insert(&mut store, n, len);
    random_replaces_and_lookups(&mut store, n, len);
    snapshot_walk(&store, n);

    let digest = store.digest();
    let t = Instant::now();
    for i in 0..n {
        store.apply(&Op::RetireUnit { id: id_of(i) });
    }
    ns_per("retire (apply)", n, t);
    assert_eq!(store.unit_count(), 0);
    assert_eq!(store.digest(), 0);
    println!("digest when full: {digest:#018x}");
}

/// Inserts `n` units of `len` bytes; prints the time per insert, the longest one, and the
/// memory the units take.
fn insert(store: &mut Store, n: u64, len: usize) {
    let rss0 = resident_bytes();
    let heap0 = LIVE_BYTES.load(Relaxed);
    let mut o = Op::PutUnit {
        id: 0,
        kind: 1,
        layout_version: 1,
        state: vec![0u8; len],
    };
    let t = Instant::now();
    // The longest single insert: a store that grows in steps (an index that rehashes all at
    // once) stalls the engine that much at once.
    let mut longest_ns = 0u128;
    for i in 0..n {
        if let Op::PutUnit { id, state, .. } = &mut o {
            *id = id_of(i);
            state[..len.min(8)].copy_from_slice(&i.to_le_bytes()[..len.min(8)]);
        }
        let t1 = Instant::now();
        store.apply(&o);
        longest_ns = longest_ns.max(t1.elapsed().as_nanos());
    }
    drop(o);
    ns_per("insert (apply)", n, t);
    println!(
        "longest single insert        {:>8.3} ms",
        longest_ns as f64 / 1e6
    );
    let rss = resident_bytes().saturating_sub(rss0);
    let heap = LIVE_BYTES.load(Relaxed).saturating_sub(heap0);
    println!(
        "resident {:.1} MB = {:.1} bytes/unit; live heap {:.1} MB = {:.1} bytes/unit ({:.1} over the state)",
        rss as f64 / 1e6,
        rss as f64 / n as f64,
        heap as f64 / 1e6,
        heap as f64 / n as f64,
        heap as f64 / n as f64 - len as f64
    );
}

/// Random replaces, as a standby applies them (copying) and as the active does (owning), then
/// random lookups of the same units.
fn random_replaces_and_lookups(store: &mut Store, n: u64, len: usize) {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let ops = 2_000_000;
    let picks: Vec<u64> = (0..ops).map(|_| id_of(next() % n)).collect();
    let op = |id: u64| Op::PutUnit {
        id,
        kind: 1,
        layout_version: 2,
        state: vec![7u8; len],
    };
    let mut prepared: Vec<Op> = picks.iter().map(|&id| op(id)).collect();
    let t = Instant::now();
    for o in &prepared {
        store.apply(o);
    }
    ns_per("random replace (apply)", ops, t);
    let mut spare = Spare::new();
    let t = Instant::now();
    for o in prepared.drain(..) {
        store.apply_owned(o, &mut spare);
    }
    ns_per("random replace (owned)", ops, t);
    drop(spare);
    // glibc defers merging freed small chunks until something of 64 KiB or more is freed; the
    // 2 M op buffers dropped above would otherwise be merged inside whatever is timed next
    // (here: the first page the retires release), which is the benchmark's cost, not the
    // store's.
    // SAFETY: malloc_trim has no preconditions.
    unsafe { libc::malloc_trim(0) };
    let t = Instant::now();
    let mut found = 0usize;
    for &id in &picks {
        found += black_box(store.unit(id)).map_or(0, |u| u.state.len());
    }
    ns_per("random lookup", ops, t);
    assert_eq!(found, ops as usize * len);
}

/// A snapshot walk in chunks of 256, as a catch-up does.
fn snapshot_walk(store: &Store, n: u64) {
    let t = Instant::now();
    let mut cursor = UnitCursor::START;
    let mut walked = 0u64;
    loop {
        let mut k = 0;
        for (c, id, u) in store.units_from(cursor, 256) {
            black_box((id, u));
            cursor = c;
            k += 1;
        }
        walked += k;
        if k < 256 {
            break;
        }
    }
    ns_per("snapshot walk", walked, t);
    assert_eq!(walked, n);
}
