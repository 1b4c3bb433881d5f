//! Replication overhead on the active, per transaction, in process (no child engine needed).
//!
//! What the active does per request, with the runtime's own public functions:
//!
//! 1. `engine::execute`: the application's handler runs in a transaction and leaves its changes
//!    as ops (here 4 read-modify-write updates of work units, plus the input-position record the
//!    engine adds to every transaction);
//! 2. **replication** (what a standby costs): every op is encoded with `protocol::encode_op`
//!    and pushed into a batch of the standby's ring (`Producer::batch().push()`), then a commit
//!    frame, then `commit()` — the same steps, in the same order, as the engine's private
//!    `understudy_runtime::engine::push_tx` (what the engine calls);
//! 3. `TxBuffers::apply_to`: the ops move into the store, which hands back the buffers it
//!    lets go of for the next transaction (as the engine does).
//!
//! The baseline is steps 1 and 3 alone (an active without a standby); the overhead is the
//! difference of the medians, measured in the same run with samples interleaved.
//!
//! Two ways to drain the ring, both over a real `/dev/shm` region as the engine uses:
//!
//! - **consumer thread** (the headline figure): a thread on the other vCPU polls (copies and
//!   validates) every batch as it is committed, like a standby process does. The producer then
//!   pays for the cache lines the consumer pulled away (each batch is written into lines the
//!   consumer last read), which is what a real active pays.
//! - **same thread, untimed drain**: the ring is drained between timed stretches of 4096
//!   transactions, outside the timing. No other core touches the ring lines while the producer
//!   writes, so this is the instruction cost of replication alone, the lower bound.
//!
//! - **consumer thread, in place** (issue 14): the same with one checksum per transaction
//!   (`Integrity::PerBatch`, as the engine's stream) and the consumer reading each batch in
//!   place (`Consumer::read_batch`, release every 1/16 of the ring or when idle), touching
//!   every payload as an apply would: what an in-place standby would cost the active. (The
//!   engine's standby still copies: this variant measured +40 ns on the active over the
//!   copying one, see the README.)
//!
//! One consumer thread serves both consumer-thread rings, polling them in turn, and spins
//! through all the variants (the baseline included), so a spinning sibling vCPU weighs on
//! every variant alike.
//!
//! Run: `cargo bench --bench replication` (about 30 s). The summary goes to
//! `benches/RESULTS-runtime.md`.

mod common;

use common::{fmt_ns, median, quantile, row, write_section, TABLE_HEAD};
use criterion::{Criterion, Throughput};
use shm_layout::region::{ensure_private_dir, Identity, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Integrity, Producer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use understudy_runtime::app::write_versions;
use understudy_runtime::engine::commit_block;
use understudy_runtime::engine::push_tx;
use understudy_runtime::engine::{execute, InputMeta, TxBuffers};
use understudy_runtime::store::Store;
use understudy_runtime::{Application, Options};
use understudy_testkit::Update4;

/// Work units in the store; each transaction updates 4 of them.
const UNITS: u64 = 1024;
/// Updates per transaction.
const UPDATES: u64 = Update4::UPDATES;
/// Transactions per timed stretch of the same-thread variant (fits the ring with room).
const STRETCH: u64 = 4096;
/// Transactions per sample of the summary.
const SAMPLE_TXS: u64 = 4096;
/// Interleaved rounds of the summary (one sample of each variant per round).
const ROUNDS: usize = 201;
/// Target: added ns per transaction of 4 updates.
const TARGET_NS: f64 = 100.0;

/// An active engine's per-request state, reduced to what the three steps touch.
struct Active {
    app: Update4,
    store: Store,
    tx: TxBuffers,
    scratch: Vec<u8>,
    write_versions: Vec<(u16, u16)>,
    commits: u64,
}

impl Active {
    fn new() -> Active {
        let app = Update4 {
            units: UNITS,
            table: None,
        };
        let store = app.store();
        let write_versions = write_versions(&app.templates(), &app.features(), 0);
        Active {
            app,
            store,
            tx: TxBuffers::new(),
            scratch: Vec::with_capacity(4096),
            write_versions,
            commits: 0,
        }
    }

    /// One request: execute, replicate to `standby` if any, apply.
    #[inline(always)]
    fn transact(&mut self, standby: Option<&mut Producer<RegionMemory>>) {
        let k = self.commits;
        let meta = InputMeta {
            source: 1,
            request_seq: k,
            next_pos: k + 1,
            next_seq: k + 1,
        };
        execute(
            &mut self.app,
            &self.store,
            &mut self.tx,
            0,
            &self.write_versions,
            &meta,
            &k.to_le_bytes(),
        );
        if let Some(p) = standby {
            let commit = commit_block(self.commits, &meta);
            // The consumer keeps up (or the ring is drained before it can fill): a full ring
            // here is a bug of the bench.
            push_tx(p, &self.tx.ops, &commit, &mut self.scratch).expect("ring has room");
        }
        self.tx.apply_to(&mut self.store);
        self.commits += 1;
    }
}

/// A directory under /dev/shm for the bench's regions, removed on drop (panics included).
struct ShmDir(PathBuf);
impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A ring over a /dev/shm region of the engine's default stream capacity.
fn ring(dir: &ShmDir, name: &str) -> (Region, Producer<RegionMemory>, Consumer<RegionMemory>) {
    let capacity = Options::new(&dir.0, 0).ring_capacity;
    let me = Identity {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = RegionSpec {
        capacity,
        epoch: 1,
        kind: 1,
    };
    let region = Region::create(&dir.0.join(name), spec, me).expect("create region");
    let p = region.producer().expect("producer");
    let c = region.consumer().expect("consumer");
    (region, p, c)
}

/// A consumer thread that drains its ring until `stop`.
struct Drainer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drainer {
    /// Drain `c` by copying polls and `z` in place, in turn.
    fn start(mut c: Consumer<RegionMemory>, mut z: Consumer<RegionMemory>) -> Drainer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = BatchBuf::with_capacity(1 << 16);
            let mut touched = 0u64;
            while !s.load(Ordering::Relaxed) {
                let copied = match c.poll(&mut buf) {
                    Ok(got) => got,
                    Err(e) => panic!("consumer: corrupt batch: {e}"),
                };
                let in_place = match z.read_batch() {
                    Ok(Some(b)) => {
                        for f in b.frames() {
                            touched =
                                touched.wrapping_add(f.payload.iter().map(|&x| x as u64).sum());
                        }
                        true
                    }
                    Ok(None) => false,
                    Err(e) => panic!("consumer (in place): corrupt batch: {e}"),
                };
                if !copied && !in_place {
                    std::hint::spin_loop();
                }
            }
            std::hint::black_box(touched);
        });
        Drainer {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Drain everything committed to `c` (same-thread variant).
fn drain(c: &mut Consumer<RegionMemory>, buf: &mut BatchBuf) {
    while c.poll(buf).expect("valid batch") {}
}

/// Time `n` transactions with the same-thread ring, draining untimed every [`STRETCH`].
fn timed_inline(
    a: &mut Active,
    p: &mut Producer<RegionMemory>,
    c: &mut Consumer<RegionMemory>,
    buf: &mut BatchBuf,
    n: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut left = n;
    while left > 0 {
        let m = left.min(STRETCH);
        let t = Instant::now();
        for _ in 0..m {
            a.transact(Some(p));
        }
        total += t.elapsed();
        drain(c, buf);
        left -= m;
    }
    total
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let load_start = common::load_note();
    let dir = ShmDir(PathBuf::from(format!(
        "/dev/shm/understudy-bench-replication-{}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    ensure_private_dir(&dir.0).expect("create /dev/shm bench directory");

    // Ring T: drained by a consumer thread. Ring I: drained inline, untimed.
    let (_rt, mut prod_t, cons_t) = ring(&dir, "thread");
    let (_ri, mut prod_i, mut cons_i) = ring(&dir, "inline");
    // Ring Z: one checksum per transaction, read in place by the consumer thread.
    let (_rz, mut prod_z, mut cons_z) = ring(&dir, "inplace");
    prod_z.set_integrity(Integrity::PerBatch);
    cons_z.set_release_every(Options::new(&dir.0, 0).ring_capacity / 16);
    let drainer = Drainer::start(cons_t, cons_z);
    let mut buf = BatchBuf::with_capacity(1 << 16);

    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    {
        let mut g = c.benchmark_group("replication/tx_4_updates");
        g.throughput(Throughput::Elements(1));
        let mut a = Active::new();
        g.bench_function("no_standby", |b| b.iter(|| a.transact(None)));
        let mut a = Active::new();
        g.bench_function("standby_consumer_thread", |b| {
            b.iter(|| a.transact(Some(&mut prod_t)))
        });
        let mut a = Active::new();
        g.bench_function("standby_same_thread_untimed_drain", |b| {
            b.iter_custom(|iters| timed_inline(&mut a, &mut prod_i, &mut cons_i, &mut buf, iters))
        });
        g.finish();
    }
    c.final_summary();

    // Summary: interleaved samples of each variant, per-transaction medians.
    let rounds = if bench_mode { ROUNDS } else { 3 };
    let (mut base, mut thread, mut inline) = (Vec::new(), Vec::new(), Vec::new());
    let (mut a_base, mut a_thread, mut a_inline) = (Active::new(), Active::new(), Active::new());
    let (mut zc, mut a_zc) = (Vec::new(), Active::new());
    for round in 0..rounds + 5 {
        let t = Instant::now();
        for _ in 0..SAMPLE_TXS {
            a_base.transact(None);
        }
        let b = t.elapsed().as_nanos() as f64 / SAMPLE_TXS as f64;
        let t = Instant::now();
        for _ in 0..SAMPLE_TXS {
            a_thread.transact(Some(&mut prod_t));
        }
        let th = t.elapsed().as_nanos() as f64 / SAMPLE_TXS as f64;
        let d = timed_inline(
            &mut a_inline,
            &mut prod_i,
            &mut cons_i,
            &mut buf,
            SAMPLE_TXS,
        );
        let inl = d.as_nanos() as f64 / SAMPLE_TXS as f64;
        let t = Instant::now();
        for _ in 0..SAMPLE_TXS {
            a_zc.transact(Some(&mut prod_z));
        }
        let z = t.elapsed().as_nanos() as f64 / SAMPLE_TXS as f64;
        if round >= 5 {
            zc.push(z);
            // The first rounds warm caches and the allocator.
            base.push(b);
            thread.push(th);
            inline.push(inl);
        }
    }
    // Per-round differences (each round's three samples are taken back to back).
    let d_thread: Vec<f64> = thread.iter().zip(&base).map(|(t, b)| t - b).collect();
    let d_inline: Vec<f64> = inline.iter().zip(&base).map(|(t, b)| t - b).collect();
    let d_zc: Vec<f64> = zc.iter().zip(&base).map(|(t, b)| t - b).collect();
    let (mz, oz) = (median(&zc), median(&d_zc));
    let (mb, mt, mi) = (median(&base), median(&thread), median(&inline));
    let (ot, oi) = (median(&d_thread), median(&d_inline));
    let frames = {
        let mut a = Active::new();
        let meta = InputMeta {
            source: 1,
            request_seq: 0,
            next_pos: 1,
            next_seq: 1,
        };
        execute(
            &mut a.app,
            &a.store,
            &mut a.tx,
            0,
            &a.write_versions,
            &meta,
            &0u64.to_le_bytes(),
        );
        a.tx.ops.len() + 1
    };
    drop(drainer);

    println!("\nreplication overhead per transaction of {UPDATES} updates ({frames} frames: {UPDATES} unit updates, the input-position record, the commit)");
    println!(
        "  no standby (execute + apply)       median {}  p90 {}",
        fmt_ns(mb),
        fmt_ns(quantile(&base, 0.9))
    );
    println!(
        "  + ring, consumer thread            median {}  p90 {}  added: median of per-round differences {}",
        fmt_ns(mt),
        fmt_ns(quantile(&thread, 0.9)),
        fmt_ns(ot)
    );
    println!(
        "  + ring, consumer thread, in place  median {}  p90 {}  added: median of per-round differences {}",
        fmt_ns(mz),
        fmt_ns(quantile(&zc, 0.9)),
        fmt_ns(oz)
    );
    println!(
        "  + ring, same thread, untimed drain median {}  p90 {}  added: {}",
        fmt_ns(mi),
        fmt_ns(quantile(&inline, 0.9)),
        fmt_ns(oi)
    );

    let mut md = String::new();
    md.push_str("## Replication overhead on the active (`cargo bench --bench replication`)\n\n");
    md.push_str(&format!(
        "One transaction = {UPDATES} read-modify-write updates of work units (16-byte records) \
         + the input-position record the engine adds = {frames} frames with the commit, pushed \
         as one batch into a {} MiB ring in /dev/shm. Medians of {rounds} interleaved samples of \
         {SAMPLE_TXS} transactions per variant; \"added\" is the median of the per-round \
         differences against the baseline sample taken just before.\n\n",
        Options::new("/", 0).ring_capacity >> 20
    ));
    md.push_str(TABLE_HEAD);
    md.push_str(&row(
        "ns added per transaction, standby drains on the other vCPU",
        &format!("{} (total {})", fmt_ns(ot), fmt_ns(mt)),
        &format!("{} (no standby: execute + apply)", fmt_ns(mb)),
        "< 100 ns",
        Some(ot < TARGET_NS),
    ));
    md.push_str(&row(
        "ns added per transaction, standby drains on the other vCPU reading in place (one checksum per transaction, batched release)",
        &format!("{} (total {})", fmt_ns(oz), fmt_ns(mz)),
        &format!("{} (no standby: execute + apply)", fmt_ns(mb)),
        "< 100 ns",
        Some(oz < TARGET_NS),
    ));
    md.push_str(&row(
        "ns added per transaction, ring drained in the same thread outside the timing",
        &format!("{} (total {})", fmt_ns(oi), fmt_ns(mi)),
        &format!("{} (no standby)", fmt_ns(mb)),
        "< 100 ns",
        Some(oi < TARGET_NS),
    ));
    md.push_str(&format!(
        "\nRatio replicated / unreplicated: {:.2} (consumer thread), {:.2} (same thread).\n",
        mt / mb,
        mi / mb
    ));
    md.push_str(&format!(
        "Machine: {load_start} at the start, {} at the end (other processes included).\n",
        common::load_note()
    ));
    if bench_mode {
        write_section("replication", &md);
    }
}
