//! What one matchbook request costs the engines, by order-book depth, in process.
//!
//! A request's cost should follow what it changes, not how deep its book is. This bench holds
//! one book at a fixed depth (resting orders spread over 40 price levels per side, each large
//! enough never to be filled away) and sends a steady cycle of four requests that leave the
//! depth unchanged: a new order that rests, the cancel of that order, and a small sell and a
//! small buy that each partially fill the best resting order on the other side. It measures:
//!
//! - **active**: `understudy_runtime::engine::execute_local`, the handler in a transaction plus
//!   the store taking its changes (what the active does per request besides writing the ring);
//! - **standby**: the same transactions' changes applied on a standby: `Store::apply` then the
//!   application's `on_apply` hook for each change, as the engine's applier does. The changes
//!   are each transaction's own, as the engine streams them (`execute_local_ops` on a third
//!   copy, outside the timing);
//! - **bytes**: the state bytes a request hands to replication (unit states, table keys and
//!   values), which the active encodes into its ring and the standby decodes.
//!
//! Depths are measured in the same run, samples interleaved round by round, so the ratio of a
//! deep book's cost to a shallow one's is the figure to read; absolute times on this shared
//! 2-vCPU machine move from run to run. `execute_local` also rebuilds the template list and
//! its transaction buffers per call, a fixed cost every depth pays alike.
//!
//! Run: `cargo bench --bench matchbook` (about 20 s). The table is printed and written to
//! `benches/RESULTS-matchbook.md`.

use matchbook::app::{Matchbook, WireRequest};
use matchbook::book::Side;
use std::time::Instant;
use understudy_runtime::engine::{execute_local, execute_local_ops, InputMeta};
use understudy_runtime::store::{Op, Store};
use understudy_runtime::Application;
use zerocopy::IntoBytes;

/// Book depths measured (resting orders in the one book).
const DEPTHS: [usize; 4] = [10, 100, 300, 1000];
/// Price levels per side the resting orders spread over.
const LEVELS: usize = 40;
/// Requests per timed sample (a multiple of the 4-request cycle).
const BATCH: usize = 200;
/// Interleaved rounds: one sample of each depth and mode per round.
const ROUNDS: usize = 25;
const SYMBOL: u32 = 1;
const ACCOUNT: u32 = 7;

/// The app's iceberg feature off (it writes layout version 1) or on (version 2).
#[derive(Clone, Copy)]
enum Mode {
    FeatureOff,
    FeatureOn,
}

impl Mode {
    fn enabled(self) -> u64 {
        match self {
            Mode::FeatureOff => 0,
            Mode::FeatureOn => 1,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::FeatureOff => "v2, iceberg off (layout 1)",
            Mode::FeatureOn => "v2, iceberg on (layout 2)",
        }
    }
}

/// One engine's application and store.
struct Replica {
    app: Matchbook,
    store: Store,
}

/// Everything measured at one depth in one mode.
struct Case {
    depth: usize,
    mode: Mode,
    /// Timed as the active.
    active: Replica,
    /// Runs the same requests untimed, keeping each request's changes as the engine streams
    /// them.
    recorder: Replica,
    /// Applies the recovered changes, timed.
    standby: Replica,
    next_id: u64,
    requests_sent: u64,
    active_ns: Vec<f64>,
    standby_ns: Vec<f64>,
    bytes: Vec<f64>,
}

fn meta(k: u64) -> InputMeta {
    InputMeta {
        source: 1,
        request_seq: k,
        next_pos: k + 1,
        next_seq: k + 1,
    }
}

fn run(side: &mut Replica, enabled: u64, k: u64, req: &WireRequest) -> Vec<u8> {
    execute_local(
        &mut side.app,
        &mut side.store,
        enabled,
        &meta(k),
        req.as_bytes(),
    )
}

fn op_bytes(op: &Op) -> usize {
    match op {
        Op::PutUnit { state, .. } => state.len(),
        Op::RetireUnit { .. } => 0,
        Op::Put { key, value, .. } => key.len() + value.len(),
        Op::Delete { key, .. } => key.len(),
    }
}

impl Case {
    fn new(depth: usize, mode: Mode) -> Case {
        let mut case = Case {
            depth,
            mode,
            active: Replica {
                app: Matchbook::new(2),
                store: Store::new(),
            },
            recorder: Replica {
                app: Matchbook::new(2),
                store: Store::new(),
            },
            standby: Replica {
                app: Matchbook::new(2),
                store: Store::new(),
            },
            next_id: 1,
            requests_sent: 0,
            active_ns: Vec::new(),
            standby_ns: Vec::new(),
            bytes: Vec::new(),
        };
        // Half the depth bids at 960..1000, half asks at 1010..1050, each order huge.
        for i in 0..depth {
            let level = (i / 2 % LEVELS) as i64;
            let (side, price) = if i % 2 == 0 {
                (Side::Buy, 999 - level)
            } else {
                (Side::Sell, 1010 + level)
            };
            let id = case.fresh_id();
            let req = WireRequest::limit(id, ACCOUNT, SYMBOL, side, price, 1 << 30);
            case.send_untimed(&req);
        }
        case.standby.store = case.recorder.store.clone();
        case.standby.app.on_reset(&case.standby.store);
        case
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send_untimed(&mut self, req: &WireRequest) {
        let (enabled, k) = (self.mode.enabled(), self.requests_sent);
        run(&mut self.active, enabled, k, req);
        run(&mut self.recorder, enabled, k, req);
        self.requests_sent += 1;
    }

    /// The next `BATCH` requests of the depth-keeping cycle.
    fn batch(&mut self) -> Vec<WireRequest> {
        let mut out = Vec::with_capacity(BATCH);
        while out.len() < BATCH {
            let id = self.fresh_id();
            out.push(WireRequest::limit(id, 9, SYMBOL, Side::Buy, 970, 5));
            out.push(WireRequest::cancel(id, 9, SYMBOL));
            let id = self.fresh_id();
            out.push(WireRequest::limit(id, 9, SYMBOL, Side::Sell, 1, 1));
            let id = self.fresh_id();
            out.push(WireRequest::limit(id, 9, SYMBOL, Side::Buy, 1 << 20, 1));
        }
        out
    }

    fn sample(&mut self) {
        let requests = self.batch();
        let enabled = self.mode.enabled();
        let k0 = self.requests_sent;

        let t = Instant::now();
        for (i, req) in requests.iter().enumerate() {
            let response = run(&mut self.active, enabled, k0 + i as u64, req);
            std::hint::black_box(response);
        }
        self.active_ns
            .push(t.elapsed().as_nanos() as f64 / requests.len() as f64);

        let mut changes = Vec::with_capacity(requests.len());
        for (i, req) in requests.iter().enumerate() {
            let r = &mut self.recorder;
            let (_, ops) = execute_local_ops(
                &mut r.app,
                &mut r.store,
                enabled,
                &meta(k0 + i as u64),
                req.as_bytes(),
            );
            changes.push(ops);
        }
        let bytes: usize = changes.iter().flatten().map(op_bytes).sum();
        self.bytes.push(bytes as f64 / requests.len() as f64);

        let standby = &mut self.standby;
        let mut before = understudy_runtime::store::BeforeBuf::new();
        let t = Instant::now();
        for op in changes.iter().flatten() {
            before.capture(&standby.store, op);
            standby.store.apply(op);
            standby.app.on_apply(op, before.view(), &standby.store);
        }
        self.standby_ns
            .push(t.elapsed().as_nanos() as f64 / requests.len() as f64);
        self.requests_sent += requests.len() as u64;
    }

    /// The standby's engine ended equal to the active's: the replay applied what happened.
    fn check(&self) {
        assert_eq!(
            self.standby.store.digest(),
            self.active.store.digest(),
            "depth {}: standby store differs",
            self.depth
        );
        let (a, s) = (self.active.app.engine(), self.standby.app.engine());
        let book = |e: &matchbook::book::MatchingEngine| {
            e.book(matchbook::book::Symbol(SYMBOL))
                .map(|b| b.orders().copied().collect::<Vec<_>>())
        };
        assert_eq!(
            book(a),
            book(s),
            "depth {}: standby book differs",
            self.depth
        );
        let len = a
            .book(matchbook::book::Symbol(SYMBOL))
            .map_or(0, |b| b.len());
        assert_eq!(len, self.depth, "the cycle must keep the depth");
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.0} ns")
    } else {
        format!("{:.2} µs", ns / 1e3)
    }
}

fn main() {
    // `cargo test --benches` runs bench targets with `--bench`-less arguments; keep it short.
    let quick = std::env::args().all(|a| a != "--bench");
    let rounds = if quick { 2 } else { ROUNDS };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut cases: Vec<Case> = [Mode::FeatureOff, Mode::FeatureOn]
        .into_iter()
        .flat_map(|mode| DEPTHS.into_iter().map(move |d| Case::new(d, mode)))
        .collect();
    // Warm-up round, discarded.
    for case in &mut cases {
        case.sample();
        case.active_ns.clear();
        case.standby_ns.clear();
        case.bytes.clear();
    }
    for _ in 0..rounds {
        for case in &mut cases {
            case.sample();
        }
    }
    for case in &cases {
        case.check();
    }
    let mut report = String::new();
    let mut line = |text: String| {
        println!("{text}");
        report.push_str(&text);
        report.push('\n');
    };
    line(format!(
        "| mode | depth | active ns/request | ×depth {} | standby ns/request | ×depth {} | state bytes/request |",
        DEPTHS[0], DEPTHS[0]
    ));
    line("|---|---|---|---|---|---|---|".to_string());
    for mode_cases in cases.chunks(DEPTHS.len()) {
        let base_active = median(&mode_cases[0].active_ns);
        let base_standby = median(&mode_cases[0].standby_ns);
        for case in mode_cases {
            let (a, s) = (median(&case.active_ns), median(&case.standby_ns));
            line(format!(
                "| {} | {} | {} | {:.2} | {} | {:.2} | {:.0} |",
                case.mode.name(),
                case.depth,
                fmt_ns(a),
                a / base_active,
                fmt_ns(s),
                s / base_standby,
                median(&case.bytes)
            ));
        }
    }
    if !quick {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-matchbook.md");
        let text = format!(
            "# matchbook request cost by book depth: measured figures\n\n\
             Written by `cargo bench --bench matchbook` (see the module doc of \
             `benches/matchbook.rs` for what is measured). Median of {rounds} samples of {BATCH} \
             requests per depth, all depths interleaved in one run; load average at the start: \
             {}. The machine is a noisy 2-vCPU VM: read the ratios to depth {}, not the absolute \
             times.\n\n{report}",
            load.trim(),
            DEPTHS[0]
        );
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("could not write {}: {e}", path.display());
        }
    }
}
