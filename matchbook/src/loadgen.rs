//! The load generator: clients that send orders through the shared-memory client library at a
//! configurable rate (or as fast as possible) and count what they sent, what was acknowledged,
//! lost and duplicated, with every request's latency kept for histograms and timelines.

use crate::app::{parse_response, status, WireRequest, WireResponse};
use crate::book::{AccountId, AccountPosition, Features, MatchingEngine, OrderBook, Symbol};
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use understudy_runtime::client::Client;
use zerocopy::IntoBytes;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The cluster directory.
    pub dir: PathBuf,
    /// Client processes' worth of connections (threads here).
    pub clients: usize,
    /// Requests per second per client (0: as fast as possible).
    pub rate_per_client: u64,
    /// Symbols traded.
    pub symbols: u32,
    /// Accounts trading.
    pub accounts: u32,
    /// Requests in flight per client at most.
    pub inflight_max: usize,
    /// Random seed.
    pub seed: u64,
}

impl LoadConfig {
    /// Defaults for the cluster at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LoadConfig {
            dir: dir.into(),
            clients: 2,
            rate_per_client: 10_000,
            symbols: 4,
            accounts: 16,
            inflight_max: 64,
            seed: 42,
        }
    }
}

/// One answered request.
#[derive(Debug, Clone, Copy)]
pub struct Answered {
    /// When it was sent, µs since the load started.
    pub sent_us: u64,
    /// Round-trip latency, ns.
    pub latency_ns: u64,
    /// The request.
    pub request: WireRequest,
    /// Its response header.
    pub response: WireResponse,
}

/// What one client saw.
#[derive(Debug, Default)]
pub struct ClientReport {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered.
    pub acked: u64,
    /// Requests never answered.
    pub lost: u64,
    /// Answers to requests already answered (or never sent).
    pub duplicated: u64,
    /// Answers that were refusals (including feature-disabled icebergs).
    pub rejected: u64,
    /// Every answered request.
    pub answered: Vec<Answered>,
    /// (request sequence, µs sent) of requests never answered.
    pub lost_requests: Vec<(u64, u64)>,
    /// (request sequence, µs received) of unexpected answers.
    pub duplicate_answers: Vec<(u64, u64)>,
}

/// The whole load's report.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Per client.
    pub clients: Vec<ClientReport>,
}

impl LoadReport {
    /// Sum of `f` over clients.
    pub fn total(&self, f: impl Fn(&ClientReport) -> u64) -> u64 {
        self.clients.iter().map(f).sum()
    }

    /// Latency histogram (ns) of requests sent in `[from_us, to_us)`.
    pub fn histogram(&self, from_us: u64, to_us: u64) -> Histogram<u64> {
        let mut h =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
        for c in &self.clients {
            for a in &c.answered {
                if a.sent_us >= from_us && a.sent_us < to_us {
                    h.saturating_record(a.latency_ns.max(1));
                }
            }
        }
        h
    }

    /// The longest time a client waited for an answer to a request sent in the window: the
    /// longest pause it saw.
    pub fn longest_wait_ns(&self, from_us: u64, to_us: u64) -> u64 {
        self.clients
            .iter()
            .flat_map(|c| c.answered.iter())
            .filter(|a| a.sent_us + a.latency_ns / 1000 >= from_us && a.sent_us < to_us)
            .map(|a| a.latency_ns)
            .max()
            .unwrap_or(0)
    }
}

/// A running load.
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    /// Send iceberg orders from now on (every 10th new order).
    pub icebergs: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    started: Instant,
    handles: Vec<JoinHandle<Result<ClientReport, String>>>,
}

impl LoadGen {
    /// Connect the clients and start sending.
    pub fn start(cfg: &LoadConfig) -> Result<LoadGen, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let icebergs = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut handles = Vec::new();
        for i in 0..cfg.clients {
            let client = Client::connect(&cfg.dir).map_err(|e| e.to_string())?;
            let (cfg, stop, ice, s, a) = (
                cfg.clone(),
                stop.clone(),
                icebergs.clone(),
                sent.clone(),
                acked.clone(),
            );
            handles.push(std::thread::spawn(move || {
                run_client(client, i as u64, &cfg, started, &stop, &ice, &s, &a)
            }));
        }
        Ok(LoadGen {
            stop,
            icebergs,
            sent,
            acked,
            started,
            handles,
        })
    }

    /// µs since the load started.
    pub fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }

    /// Requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Requests answered so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stop sending, wait for the outstanding answers, and report.
    pub fn stop(self) -> Result<LoadReport, String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut r = LoadReport::default();
        for h in self.handles {
            r.clients
                .push(h.join().map_err(|_| "load client panicked".to_string())??);
        }
        Ok(r)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// How long a stopped client waits for the answers to the requests it still has in flight;
/// those still unanswered then count as lost.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The orders one client sends: new orders and cancels of its own resting ones.
struct OrderGen {
    rng: Rng,
    /// Orders that may still rest: (id, account, symbol), the latest 256.
    resting: Vec<(u64, u32, u32)>,
    next_id: u64,
    new_orders: u64,
}

impl OrderGen {
    fn new(index: u64, seed: u64) -> Self {
        OrderGen {
            rng: Rng(seed ^ (index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            resting: Vec::new(),
            next_id: (index + 1) << 40,
            new_orders: 0,
        }
    }

    /// The next request; every 10th new order is an iceberg when `icebergs` is set.
    fn next(&mut self, cfg: &LoadConfig, icebergs: bool) -> WireRequest {
        // A third of the requests cancel an earlier order, and prices lean towards crossing
        // the other side: books stay a few hundred orders deep, as a live market's do
        // (each resting order is a work unit of its own: a request writes the orders it
        // changed, not its book, so its cost does not grow with that depth).
        let rng = &mut self.rng;
        if !self.resting.is_empty() && rng.below(3) == 0 {
            let i = rng.below(self.resting.len() as u64) as usize;
            let (id, account, symbol) = self.resting.swap_remove(i);
            return WireRequest::cancel(id, account, symbol);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.new_orders += 1;
        let account = rng.below(cfg.accounts as u64) as u32 + 1;
        let symbol = rng.below(cfg.symbols as u64) as u32 + 1;
        let side = if rng.below(2) == 0 {
            crate::book::Side::Buy
        } else {
            crate::book::Side::Sell
        };
        let lean = rng.below(6) as i64;
        let price = match side {
            crate::book::Side::Buy => 998 + lean,
            crate::book::Side::Sell => 1003 - lean,
        };
        let qty = rng.below(100) + 1;
        if rng.below(2) == 0 {
            self.resting.push((id, account, symbol));
            if self.resting.len() > 256 {
                self.resting.swap_remove(0);
            }
        }
        if icebergs && self.new_orders % 10 == 0 {
            WireRequest::iceberg(id, account, symbol, side, price, qty * 3, qty.div_ceil(2))
        } else {
            WireRequest::limit(id, account, symbol, side, price, qty)
        }
    }
}

/// One client's requests in flight: sequence number → (sent at, ns since the load started;
/// the request).
type Inflight = HashMap<u64, (u64, WireRequest)>;

/// Takes every answer the client has, matching each to its request in `inflight`; an answer
/// to no request in flight counts as a duplicate.
fn poll_answers(
    c: &mut Client,
    report: &mut ClientReport,
    inflight: &mut Inflight,
    started: Instant,
    acked_total: &AtomicU64,
) -> Result<(), String> {
    while let Some((seq, bytes)) = c.poll_response().map_err(|e| e.to_string())? {
        let now_ns = started.elapsed().as_nanos() as u64;
        let Some((sent_ns, req)) = inflight.remove(&seq) else {
            report.duplicated += 1;
            report.duplicate_answers.push((seq, now_ns / 1000));
            continue;
        };
        let Some((resp, _)) = parse_response(&bytes) else {
            return Err(format!("malformed response to request {seq}"));
        };
        if resp.status == status::REJECT || resp.status == status::MALFORMED {
            report.rejected += 1;
        }
        report.acked += 1;
        acked_total.fetch_add(1, Ordering::Relaxed);
        report.answered.push(Answered {
            sent_us: sent_ns / 1000,
            latency_ns: now_ns - sent_ns,
            request: req,
            response: resp,
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_client(
    mut c: Client,
    index: u64,
    cfg: &LoadConfig,
    started: Instant,
    stop: &AtomicBool,
    icebergs: &AtomicBool,
    sent_total: &AtomicU64,
    acked_total: &AtomicU64,
) -> Result<ClientReport, String> {
    let mut orders = OrderGen::new(index, cfg.seed);
    let mut report = ClientReport::default();
    let mut inflight = Inflight::new();
    let interval_ns = 1_000_000_000u64
        .checked_div(cfg.rate_per_client)
        .unwrap_or(0);
    let mut next_send_ns = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now_ns = started.elapsed().as_nanos() as u64;
        if inflight.len() < cfg.inflight_max && now_ns >= next_send_ns {
            next_send_ns = if interval_ns == 0 {
                now_ns
            } else {
                next_send_ns.max(now_ns.saturating_sub(interval_ns * 10)) + interval_ns
            };
            let req = orders.next(cfg, icebergs.load(Ordering::Relaxed));
            let t = started.elapsed().as_nanos() as u64;
            match c.try_submit(req.as_bytes()).map_err(|e| e.to_string())? {
                Some(seq) => {
                    inflight.insert(seq, (t, req));
                    report.sent += 1;
                    sent_total.fetch_add(1, Ordering::Relaxed);
                }
                None => std::thread::yield_now(),
            }
        }
        poll_answers(&mut c, &mut report, &mut inflight, started, acked_total)?;
        // Leave the CPUs to the engines while there is nothing to do: sleep until shortly
        // before the next send when nothing is in flight; otherwise poll, yielding.
        let now_ns = started.elapsed().as_nanos() as u64;
        if inflight.is_empty() && next_send_ns > now_ns + 100_000 {
            std::thread::sleep(Duration::from_nanos(next_send_ns - now_ns - 60_000));
        } else if inflight.len() >= cfg.inflight_max || interval_ns > 20_000 {
            std::thread::yield_now();
        }
    }
    // Drain: every request sent must be answered.
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while !inflight.is_empty() && Instant::now() < deadline {
        poll_answers(&mut c, &mut report, &mut inflight, started, acked_total)?;
        std::thread::yield_now();
    }
    report.lost = inflight.len() as u64;
    report.lost_requests = inflight.iter().map(|(s, (t, _))| (*s, t / 1000)).collect();
    report.answered.sort_by_key(|a| a.sent_us);
    Ok(report)
}

/// The reference model: replay every acknowledged order that changed a book, per symbol in
/// the engine's order (`book_seq`), on a fresh matching engine.
pub fn model_of(report: &LoadReport) -> Result<MatchingEngine, String> {
    let mut per_symbol: HashMap<u32, Vec<&Answered>> = HashMap::new();
    for a in report.clients.iter().flat_map(|c| c.answered.iter()) {
        if a.response.book_seq > 0 {
            per_symbol.entry(a.request.symbol).or_default().push(a);
        }
    }
    let mut engine = MatchingEngine::new();
    for (symbol, mut list) in per_symbol {
        list.sort_by_key(|a| a.response.book_seq);
        for (i, a) in list.iter().enumerate() {
            if a.response.book_seq != i as u64 + 1 {
                return Err(format!(
                    "symbol {symbol}: book sequence {} where {} was expected (a request was lost or applied twice)",
                    a.response.book_seq,
                    i + 1
                ));
            }
            let req = a.request.to_request().ok_or("not an order")?;
            let out = engine.process(req, Features { iceberg: true });
            let filled: u64 = out.fills.iter().map(|f| f.qty).sum();
            let ok = match out.response {
                crate::book::Response::Ack { .. } => {
                    a.response.status == status::ACK && a.response.qty == filled
                }
                crate::book::Response::Cancelled { remaining, .. } => {
                    a.response.status == status::CANCELLED && a.response.qty == remaining
                }
                crate::book::Response::Reject { .. } => false,
            };
            if !ok {
                return Err(format!(
                    "symbol {symbol}: order {} answered {:?} by the engine but {:?} by the model",
                    a.request.id, a.response, out.response
                ));
            }
        }
    }
    Ok(engine)
}

/// Compare the cluster's books and positions (read through queries) with the model's.
pub fn check_against_model(
    dir: &std::path::Path,
    model: &MatchingEngine,
    symbols: u32,
    accounts: u32,
) -> Result<(), String> {
    let mut c = Client::connect(dir).map_err(|e| e.to_string())?;
    for s in 1..=symbols {
        let r = c
            .call(
                WireRequest::query_book(s).as_bytes(),
                Duration::from_secs(10),
            )
            .map_err(|e| e.to_string())?
            .ok_or("book query unanswered")?;
        let (_, data) = parse_response(&r).ok_or("bad query response")?;
        let mut expect = Vec::new();
        if let Some(b) = model.book(Symbol(s)) {
            b.encode(&mut expect);
        }
        if data != &expect[..] {
            let got = OrderBook::decode(data)
                .map(|b| b.len())
                .unwrap_or(usize::MAX);
            let want = model.book(Symbol(s)).map_or(0, |b| b.len());
            return Err(format!(
                "symbol {s}: the engine's book ({got} orders) differs from the model's ({want} orders)"
            ));
        }
    }
    for a in 1..=accounts {
        let r = c
            .call(
                WireRequest::query_position(a).as_bytes(),
                Duration::from_secs(10),
            )
            .map_err(|e| e.to_string())?
            .ok_or("position query unanswered")?;
        let (_, data) = parse_response(&r).ok_or("bad query response")?;
        let got = AccountPosition::decode(data).map_err(|e| e.to_string())?;
        let want = model.position(AccountId(a));
        if got != want {
            return Err(format!(
                "account {a}: engine position {got:?}, model {want:?}"
            ));
        }
    }
    Ok(())
}
