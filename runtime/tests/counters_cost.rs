//! What the live counters cost on the active's hot path: an in-process A/B of the real
//! `Engine` (test application, self-driving workload, no standby, so the transaction is at its
//! cheapest and the counters' share at its largest), runs with `Options::counters` on and off
//! interleaved in the same process, the median time per transaction of each compared.
//!
//! Not a CI test (timings on a shared machine say little): run it by hand, in release:
//!
//! ```sh
//! cargo test --release -p understudy-runtime --test counters_cost -- --ignored --nocapture
//! ```
//!
//! `UNDERSTUDY_COST_TXS` (transactions per run, default 300000) and `UNDERSTUDY_COST_ROUNDS`
//! (on/off pairs, default 7) size it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use understudy_runtime::control::{slot_cmd, Control, Field};
use understudy_runtime::engine::{Input, InputMeta};
use understudy_runtime::store::Store;
use understudy_runtime::{Engine, Idle, OnPanic, Options};
use understudy_test_support::{TestDir, Wait};
use understudy_testkit::{TestApp, Workload};

/// The workload, timed from its first request to the commit of its last.
struct Timed {
    inner: Workload,
    start: Option<Instant>,
    txs: u64,
    elapsed_ns: Arc<AtomicU64>,
}

impl Input for Timed {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta> {
        let m = self.inner.poll(buf);
        if m.is_some() && self.start.is_none() {
            self.start = Some(Instant::now());
        }
        m
    }
    fn committed(&mut self, meta: &InputMeta, response: &[u8]) {
        self.inner.committed(meta, response);
        if meta.next_pos == self.txs {
            let ns = self.start.map_or(0, |s| s.elapsed().as_nanos() as u64);
            self.elapsed_ns.store(ns.max(1), Ordering::Release);
        }
    }
    fn resume(&mut self, store: &Store) {
        self.inner.resume(store);
    }
}

/// Bound on one run (a hang, not a performance limit).
const RUN_MAX: Duration = Duration::from_secs(300);

/// One run of `txs` transactions; ns per transaction.
fn run(txs: u64, counters: bool, round: usize) -> f64 {
    let dir = TestDir::named(&format!("cost-{round}-{counters}"));
    let elapsed = Arc::new(AtomicU64::new(0));
    let (path, flag) = (dir.path().to_path_buf(), elapsed.clone());
    let engine = std::thread::spawn(move || {
        let mut opt = Options::new(&path, 0);
        opt.counters = counters;
        opt.idle = Idle::SPIN;
        opt.on_panic = OnPanic::Unwind;
        let input = Timed {
            inner: Workload::new(txs, None),
            start: None,
            txs,
            elapsed_ns: flag,
        };
        Engine::new(TestApp::new(1), input, opt)
            .expect("engine")
            .run()
            .expect("run");
    });
    Wait::new("the run to finish", RUN_MAX)
        .every(Duration::from_millis(5))
        .until(|| elapsed.load(Ordering::Acquire) != 0);
    Control::open(dir.path())
        .expect("control")
        .set(0, Field::Cmd, slot_cmd::STOP);
    engine.join().expect("engine thread");
    assert_eq!(
        understudy_runtime::counters::read(dir.path()).map_or(0, |k| k.slots[0].requests_total),
        if counters { txs } else { 0 },
        "the counters file counts every request when on, and is not even written when off"
    );
    elapsed.load(Ordering::Acquire) as f64 / txs as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median time per transaction with the counters on vs off, same process, runs interleaved.
#[test]
#[ignore = "a measurement: run by hand in release (see the module docs)"]
fn counters_cost_per_transaction() {
    let txs = env("UNDERSTUDY_COST_TXS", 300_000);
    let rounds = env("UNDERSTUDY_COST_ROUNDS", 7) as usize;
    run(txs / 10, true, 1000); // warm-up
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so a drift in the machine's load weighs on both.
        if round % 2 == 0 {
            off.push(run(txs, false, round));
            on.push(run(txs, true, round));
        } else {
            on.push(run(txs, true, round));
            off.push(run(txs, false, round));
        }
    }
    let (m_on, m_off) = (median(&mut on), median(&mut off));
    println!(
        "counters cost: {rounds} rounds of {txs} transactions; median ns/transaction off {m_off:.1}, on {m_on:.1}; ratio on/off {:.4} ({:+.2} %)",
        m_on / m_off,
        (m_on / m_off - 1.0) * 100.0
    );
    println!("  off: {off:.1?}\n  on:  {on:.1?}");
    // The stores alone, as the engine makes them per transaction (requests, refusals, commits,
    // transaction index, and one service-time bucket in four), on a real counters file: a
    // figure the machine's noise does not swamp.
    let dir = TestDir::named("cost-writer");
    shm_layout::region::ensure_private_dir(dir.path()).unwrap();
    let w = understudy_runtime::counters::Writer::open_or_create(dir.path(), 0).unwrap();
    use understudy_runtime::counters::Counter;
    let n = 50_000_000u64;
    let t0 = Instant::now();
    for i in 0..n {
        let i = std::hint::black_box(i);
        w.add(Counter::COMMITS_TOTAL, 1);
        w.set(Counter::TX_INDEX, i);
        if i % 4 == 0 {
            w.service_time(i & 0xffff);
        }
        w.add(Counter::REQUESTS_TOTAL, 1);
        w.add(Counter::REFUSALS_TOTAL, (i & 1) ^ 1);
    }
    let per_tx = t0.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "counter stores alone: {per_tx:.2} ns per transaction = {:.2} % of the median transaction without counters",
        per_tx / m_off * 100.0
    );
}
