//! The typed-record API (`Tx::unit_record`, `update_record`, `put_record`) on the hot path:
//! steady-state transactions allocate nothing (counted by a global allocator, as in
//! `alloc.rs`), and a short in-process comparison with the raw-bytes API on the same
//! transaction shape (read-modify-write of 4 work units and one table record per request),
//! printed, never asserted (`US_TYPED_TX` sets the transactions per round; run with
//! `--release --nocapture` for figures that mean something).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};
use understudy_runtime::app::write_versions;
use understudy_runtime::internals::{execute, TxBuffers};
use understudy_runtime::records::{encoded, Record, TemplateInfo};
use understudy_runtime::zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
use understudy_runtime::{Application, InputMeta, Refused, Store, Tx};

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

/// Version 2 appends `tag`; both apps write version 1 (no feature enabled).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Counter {
    k: u64,
    sum: u64,
    tag: u64,
}

impl Record for Counter {
    const TYPE_ID: u16 = 3;
    const NAME: &'static str = "counter";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
    fn defaults() -> Self {
        Counter {
            k: 0,
            sum: 0,
            tag: 0,
        }
    }
}
understudy_runtime::assert_record_layout!(Counter);

const UNITS: u64 = 256;

fn request(req: &[u8]) -> Result<u64, Refused> {
    req.try_into()
        .map(u64::from_le_bytes)
        .map_err(|_| Refused(b"8 bytes".to_vec()))
}

/// The typed API.
struct Typed;
impl Application for Typed {
    fn name(&self) -> &str {
        "typed"
    }
    fn version(&self) -> u32 {
        1
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        vec![TemplateInfo::of::<Counter>()]
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        let k = request(req)?;
        for i in 0..4 {
            let id = (k * 4 + i) % UNITS;
            let mut c = tx
                .unit_record::<Counter>(id)
                .map_err(|_| Refused(b"bad state".to_vec()))?
                .unwrap_or(Counter::defaults());
            c.k = k;
            c.sum = c.sum.wrapping_add(k);
            tx.update_record(id, &c);
        }
        tx.put_record(&(k % 8).to_le_bytes(), &Counter::defaults());
        tx.respond(&k.to_le_bytes());
        Ok(())
    }
}

/// The raw-bytes API, versions handled by hand (what an application wrote before).
struct Raw;
impl Application for Raw {
    fn name(&self) -> &str {
        "raw"
    }
    fn version(&self) -> u32 {
        1
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        vec![TemplateInfo::of::<Counter>()]
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        let k = request(req)?;
        let v = tx.write_version(Counter::TYPE_ID);
        for i in 0..4 {
            let id = (k * 4 + i) % UNITS;
            let mut c = match tx.unit(id) {
                Some(u) => shm_layout::record::decode::<Counter>(u.state, u.state.len() as u16)
                    .map_err(|_| Refused(b"bad state".to_vec()))?,
                None => Counter::defaults(),
            };
            c.k = k;
            c.sum = c.sum.wrapping_add(k);
            tx.update(id, Counter::TYPE_ID, v, encoded(&c, v).expect("v"));
        }
        let d = Counter::defaults();
        tx.put(
            Counter::TYPE_ID,
            &(k % 8).to_le_bytes(),
            encoded(&d, v).expect("v"),
        );
        tx.respond(&k.to_le_bytes());
        Ok(())
    }
}

/// Runs requests `from..to` through `app` on `store` as the active does (execute, then
/// apply); `wv` are the write versions.
fn run<A: Application>(
    app: &mut A,
    wv: &[(u16, u16)],
    store: &mut Store,
    tx: &mut TxBuffers,
    from: u64,
    to: u64,
) {
    for k in from..to {
        let meta = InputMeta {
            source: 1,
            request_seq: k,
            next_pos: k + 1,
            next_seq: k + 1,
        };
        let refused = execute(app, store, tx, 0, wv, &meta, &k.to_le_bytes());
        assert!(!refused, "request {k} refused");
        tx.apply_to(store);
    }
}

/// The write versions of `app` with no feature enabled (version 1 of `Counter`).
fn wv<A: Application>(app: &A) -> Vec<(u16, u16)> {
    write_versions(&app.templates(), &app.features(), 0)
}

/// Allocations of requests `2_000..12_000` after a warm-up of 2 000.
fn steady_allocations<A: Application>(app: &mut A) -> (u64, Store) {
    let (mut store, mut tx, wv) = (Store::new(), TxBuffers::new(), wv(app));
    run(app, &wv, &mut store, &mut tx, 0, 2_000);
    let before = allocations();
    run(app, &wv, &mut store, &mut tx, 2_000, 12_000);
    (allocations() - before, store)
}

#[test]
fn typed_records_allocate_nothing_in_steady_state() {
    let (raw, _) = steady_allocations(&mut Raw);
    let (typed, store) = steady_allocations(&mut Typed);
    eprintln!("allocations in 10 000 steady transactions: typed {typed}, raw {raw}");
    assert_eq!(
        typed, 0,
        "10 000 typed transactions allocated {typed} times (raw: {raw})"
    );
    // Written in the layout both engines read (v1: 16 bytes, `tag` left out).
    let u = store.unit(5).expect("unit 5");
    assert_eq!((u.kind, u.layout_version, u.state.len()), (3, 1, 16));
}

#[test]
fn typed_and_raw_round_trip_compared() {
    let n: u64 = std::env::var("US_TYPED_TX")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let (mut ts, mut tt) = (Store::new(), TxBuffers::new());
    let (mut rs, mut rt) = (Store::new(), TxBuffers::new());
    let (twv, rwv) = (wv(&Typed), wv(&Raw));
    run(&mut Typed, &twv, &mut ts, &mut tt, 0, 2_000);
    run(&mut Raw, &rwv, &mut rs, &mut rt, 0, 2_000);
    let (mut typed, mut raw) = (Duration::MAX, Duration::MAX);
    // Interleaved rounds, the best of each: the machine's noise hits both alike.
    for round in 0..5u64 {
        let from = 2_000 + round * n;
        let t = Instant::now();
        run(&mut Typed, &twv, &mut ts, &mut tt, from, from + n);
        typed = typed.min(t.elapsed());
        let t = Instant::now();
        run(&mut Raw, &rwv, &mut rs, &mut rt, from, from + n);
        raw = raw.min(t.elapsed());
    }
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    eprintln!(
        "per transaction (4 unit updates + 1 table record), best of 5 rounds of {n}: typed {:.0} ns, raw {:.0} ns, typed/raw {:.3}",
        per(typed),
        per(raw),
        per(typed) / per(raw)
    );
    // Same state, except the typed table records' 4-byte header.
    for id in 0..UNITS {
        assert_eq!(
            ts.unit(id).map(|u| u.state.to_vec()),
            rs.unit(id).map(|u| u.state.to_vec())
        );
    }
}
