//! Replication overhead on the active, per transaction, in process (no child engine needed).
//!
//! What the active does per request, with the runtime's own public functions:
//!
//! 1. `engine::execute`: the application's handler runs in a transaction and leaves its changes
//!    as ops (here 4 read-modify-write updates of work units, plus the input-position record the
//!    engine adds to every transaction);
//! 2. **replication** (what a standby costs): `understudy_runtime::engine::push_tx`, what the
//!    engine calls: each op's room claimed in the standby's ring and the op encoded in place,
//!    then the commit frame, one commit (one checksum per transaction, as the engine's
//!    stream);
//! 3. `TxBuffers::apply_to`: the ops move into the store, which hands back the buffers it
//!    lets go of for the next transaction (as the engine does).
//!
//! The baseline is steps 1 and 3 alone (an active without a standby); the overhead is the
//! difference, measured in the same run with samples interleaved (per-round differences).
//!
//! The variants, each over a real `/dev/shm` ring of the engine's stream size:
//!
//! - **copy → copy** (before issue 14's runtime work, the reference): each op encoded into a
//!   scratch vector and copied into the ring (`Batch::push`), one checksum per transaction;
//!   the standby copies each batch out (`Consumer::poll`) and decodes its ops.
//! - **in place → copy**: `push_tx` (claimed in place); the standby copies.
//! - **in place → in place**: `push_tx`; the standby validates each batch where it lies
//!   (`Consumer::read_batch`, position released every 1/64 of the ring or when idle, as the
//!   engine's standby) and decodes its ops from the views.
//! - **in place → in place, no checksum**: the same with `Integrity::Off` (`integrity = "off"`).
//! - **same thread, untimed drain**: `push_tx`, the ring drained between timed stretches of
//!   4096 transactions outside the timing: no other core touches the ring lines while the
//!   producer writes, so this is the instruction cost of replication alone, the lower bound.
//!
//! In every consumer-thread variant the standby's side is what a standby does with a batch:
//! every op decoded into reused buffers (`protocol::decode_op_into`, `Spare::recycle`), which
//! reads every payload byte; the store itself is not applied (its cost is the standby's own,
//! not the active's). One consumer thread on the other vCPU serves all the rings, polling them
//! in turn, and spins through all the variants (the baseline included), so a spinning sibling
//! vCPU weighs on every variant alike. The producer then pays for the cache lines the consumer
//! pulled away, which is what a real active pays.
//!
//! The summary runs twice: with the consumer pausing between polls that found nothing, as the
//! engine's standby does (`Options::standby_poll_pause`), and polling continuously, as it did
//! before. A consumer that polls continuously holds the line the producer writes next (the
//! next batch's commit word) and the lines its prefetcher pulled beyond it, so nearly every
//! transaction pays a cross-core transfer; that, not copying or checksums, was the +244 ns.
//!
//! Run: `cargo bench --bench replication` (about 40 s). The summary goes to
//! `benches/RESULTS-runtime.md`.

mod common;

use common::{fmt_ns, median, quantile, row, write_section, TABLE_HEAD};
use criterion::{Criterion, Throughput};
use shm_layout::region::{IdentityWords, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Integrity, Producer};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use understudy_runtime::app::write_versions;
use understudy_runtime::engine::commit_block;
use understudy_runtime::engine::push_tx;
use understudy_runtime::engine::{execute, InputMeta, TxBuffers};
use understudy_runtime::protocol::{self, rt, CommitBlock};
use understudy_runtime::store::{Op, Spare, Store};
use understudy_runtime::{Application, Options};
use understudy_test_support::TestDir;
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

/// Transactions that found their ring full (the consumer thread was descheduled).
static FULL_WAITS: AtomicU64 = AtomicU64::new(0);

/// How the active writes a transaction into the ring.
#[derive(Clone, Copy, PartialEq)]
enum Write {
    /// Encoded into a scratch vector, then copied in (`Batch::push`): the engine before.
    Copy,
    /// `push_tx`: claimed and encoded in place (the engine now).
    InPlace,
}

/// The engine's former `push_tx`: each op encoded into `scratch`, then copied into the batch.
fn push_tx_copied(
    stream: &mut Producer<RegionMemory>,
    ops: &[Op],
    commit: &CommitBlock,
    scratch: &mut Vec<u8>,
) -> Result<(), shm_layout::ring::PushError> {
    let mut b = stream.batch();
    for op in ops {
        let (t, bl) = protocol::encode_op(op, scratch);
        b.push(t, 1, bl, scratch)?;
    }
    b.push(rt::COMMIT, 1, 48, zerocopy::IntoBytes::as_bytes(commit))?;
    b.commit();
    Ok(())
}

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

    /// One request: execute, replicate to `standby` if any (written as `how`), apply.
    #[inline(always)]
    fn transact(&mut self, standby: Option<&mut Producer<RegionMemory>>, how: Write) {
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
            // The consumer keeps up unless it is descheduled (a loaded machine): then wait for
            // room as the engine does, and count it (the figures of such a run are suspect).
            loop {
                match match how {
                    Write::InPlace => push_tx(p, &self.tx.ops, &commit),
                    Write::Copy => push_tx_copied(p, &self.tx.ops, &commit, &mut self.scratch),
                } {
                    Ok(()) => break,
                    Err(shm_layout::ring::PushError::Full { .. }) => {
                        FULL_WAITS.fetch_add(1, Ordering::Relaxed);
                        while !p.can_push(4096) {
                            std::hint::spin_loop();
                        }
                    }
                    Err(e) => panic!("push: {e}"),
                }
            }
        }
        self.tx.apply_to(&mut self.store);
        self.commits += 1;
    }

    /// `n` transactions, timed.
    fn timed(
        &mut self,
        mut standby: Option<&mut Producer<RegionMemory>>,
        how: Write,
        n: u64,
    ) -> Duration {
        let t = Instant::now();
        for _ in 0..n {
            self.transact(standby.as_deref_mut(), how);
        }
        t.elapsed()
    }
}

/// A ring over a /dev/shm region of the engine's default stream capacity.
fn ring(dir: &TestDir, name: &str) -> (Region, Producer<RegionMemory>, Consumer<RegionMemory>) {
    let capacity = Options::new(dir.path(), 0).ring_capacity;
    let me = IdentityWords {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = RegionSpec {
        capacity,
        epoch: 1,
        kind: 1,
    };
    let region = Region::create(&dir.join(name), spec, me).expect("create region");
    let p = region.producer().expect("producer");
    let c = region.consumer().expect("consumer");
    (region, p, c)
}

/// How the standby reads a ring.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// `Consumer::poll`: copied out, released per batch.
    Copy,
    /// `Consumer::read_batch`: validated in place, released in bursts.
    InPlace,
}

/// Decode every op of a batch as a standby's apply does (the payload is read whole); the
/// count of ops, so the work is not optimised away.
#[inline(always)]
fn decode<'f>(frames: impl Iterator<Item = shm_layout::ring::Frame<'f>>, spare: &mut Spare) -> u64 {
    let mut n = 0;
    for f in frames {
        if f.meta.record_type == rt::COMMIT {
            n += protocol::decode_commit(f.payload, f.meta.block_length)
                .expect("valid commit")
                .0
                .index
                & 1;
            continue;
        }
        let op =
            protocol::decode_op_into(f.meta.record_type, f.payload, f.meta.block_length, spare)
                .expect("valid op");
        n += 1;
        spare.recycle(op);
    }
    n
}

/// A consumer thread that drains its rings until `stop`.
struct Drainer {
    stop: Arc<AtomicBool>,
    /// Its pause after polls that found nothing, ns (the engine's `standby_poll_pause`).
    pause_ns: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drainer {
    /// Drain each ring as its mode says, in turn.
    fn start(mut rings: Vec<(Consumer<RegionMemory>, Read)>) -> Drainer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let pause_ns = Arc::new(AtomicU64::new(0));
        let pause = pause_ns.clone();
        let handle = std::thread::spawn(move || {
            let mut buf = BatchBuf::with_capacity(1 << 16);
            let mut spare = Spare::new();
            let mut ops = 0u64;
            while !s.load(Ordering::Relaxed) {
                let mut got = false;
                for (c, how) in rings.iter_mut() {
                    match how {
                        Read::Copy => match c.poll(&mut buf) {
                            Ok(true) => {
                                ops += decode(buf.frames(), &mut spare);
                                got = true;
                            }
                            Ok(false) => {}
                            Err(e) => panic!("consumer: corrupt batch: {e}"),
                        },
                        Read::InPlace => match c.read_batch() {
                            Ok(Some(b)) => {
                                ops += decode(b.frames(), &mut spare);
                                got = true;
                            }
                            Ok(None) => {}
                            Err(e) => panic!("consumer (in place): corrupt batch: {e}"),
                        },
                    }
                }
                if !got {
                    // As the engine's standby: wait the pause (spinning) before polling again.
                    let p = Duration::from_nanos(pause.load(Ordering::Relaxed));
                    let t = Instant::now();
                    loop {
                        for _ in 0..64 {
                            std::hint::spin_loop();
                        }
                        if t.elapsed() >= p {
                            break;
                        }
                    }
                }
            }
            std::hint::black_box(ops);
        });
        Drainer {
            stop,
            pause_ns,
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
        total += a.timed(Some(p), Write::InPlace, m);
        drain(c, buf);
        left -= m;
    }
    total
}

/// One consumer-thread variant: its ring's producer and how it is written.
struct Variant {
    name: &'static str,
    label: &'static str,
    producer: Producer<RegionMemory>,
    write: Write,
    active: Active,
    /// Per phase (see `main`): totals and differences against the baseline, ns.
    samples: [Vec<f64>; 2],
    added: [Vec<f64>; 2],
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let load_start = common::load_note();
    let dir = TestDir::new("bench-replication");
    let capacity = Options::new(dir.path(), 0).ring_capacity;

    let mut regions = Vec::new();
    let mut consumers = Vec::new();
    let mut variants = Vec::new();
    let specs: [(&str, &str, Write, Read, Integrity); 4] = [
        (
            "copy_to_copy",
            "copied in, standby copies out (the engine before)",
            Write::Copy,
            Read::Copy,
            Integrity::PerBatch,
        ),
        (
            "in_place_to_copy",
            "written in place, standby copies out",
            Write::InPlace,
            Read::Copy,
            Integrity::PerBatch,
        ),
        (
            "in_place_to_in_place",
            "written in place, standby reads in place",
            Write::InPlace,
            Read::InPlace,
            Integrity::PerBatch,
        ),
        (
            "in_place_to_in_place_no_checksum",
            "written in place, standby reads in place, no checksum (`integrity = \"off\"`)",
            Write::InPlace,
            Read::InPlace,
            Integrity::Off,
        ),
    ];
    for (name, label, write, read, integrity) in specs {
        let (r, mut p, mut c) = ring(&dir, name);
        p.set_integrity(integrity);
        c.set_require_integrity(integrity != Integrity::Off);
        // As the engine's standby (`Engine::prepare_upstream`).
        c.set_release_every(capacity / 64);
        regions.push(r);
        consumers.push((c, read));
        variants.push(Variant {
            name,
            label,
            producer: p,
            write,
            active: Active::new(),
            samples: [Vec::new(), Vec::new()],
            added: [Vec::new(), Vec::new()],
        });
    }
    let (_ri, mut prod_i, mut cons_i) = ring(&dir, "inline");
    prod_i.set_integrity(Integrity::PerBatch);
    let drainer = Drainer::start(consumers);
    let pause = Options::new(dir.path(), 0).standby_poll_pause;
    drainer
        .pause_ns
        .store(pause.as_nanos() as u64, Ordering::Relaxed);
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
        g.bench_function("no_standby", |b| {
            b.iter(|| a.transact(None, Write::InPlace))
        });
        for v in variants.iter_mut() {
            let mut a = Active::new();
            let (p, how) = (&mut v.producer, v.write);
            g.bench_function(v.name, |b| b.iter(|| a.transact(Some(&mut *p), how)));
        }
        let mut a = Active::new();
        g.bench_function("in_place_same_thread_untimed_drain", |b| {
            b.iter_custom(|iters| timed_inline(&mut a, &mut prod_i, &mut cons_i, &mut buf, iters))
        });
        g.finish();
    }
    c.final_summary();

    // Summary: interleaved samples of each variant, per-transaction medians.
    let rounds = if bench_mode { ROUNDS } else { 3 };
    let per = |d: Duration| d.as_nanos() as f64 / SAMPLE_TXS as f64;
    // Two phases: the standby pausing between empty polls as the engine's does, then polling
    // continuously (the engine before `standby_poll_pause`).
    let phases = [
        (
            "standby pauses between empty polls (the engine's default)",
            pause,
        ),
        ("standby polls continuously", Duration::ZERO),
    ];
    let mut figures = Vec::new();
    for (phase, (_, pause)) in phases.iter().enumerate() {
        drainer
            .pause_ns
            .store(pause.as_nanos() as u64, Ordering::Relaxed);
        let (mut base, mut inline, mut d_inline) = (Vec::new(), Vec::new(), Vec::new());
        let (mut a_base, mut a_inline) = (Active::new(), Active::new());
        for round in 0..rounds + 5 {
            let b = per(a_base.timed(None, Write::InPlace, SAMPLE_TXS));
            let mut row = Vec::new();
            for v in variants.iter_mut() {
                row.push(per(v.active.timed(
                    Some(&mut v.producer),
                    v.write,
                    SAMPLE_TXS,
                )));
            }
            let inl = per(timed_inline(
                &mut a_inline,
                &mut prod_i,
                &mut cons_i,
                &mut buf,
                SAMPLE_TXS,
            ));
            // The first rounds warm caches and the allocator.
            if round >= 5 {
                base.push(b);
                for (v, t) in variants.iter_mut().zip(row) {
                    v.samples[phase].push(t);
                    v.added[phase].push(t - b);
                }
                inline.push(inl);
                d_inline.push(inl - b);
            }
        }
        figures.push((base, inline, d_inline));
    }
    drop(drainer);
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

    let mut md = String::new();
    md.push_str("## Replication overhead on the active (`cargo bench --bench replication`)\n\n");
    md.push_str(&format!(
        "One transaction = {UPDATES} read-modify-write updates of work units (16-byte records) \
         + the input-position record the engine adds = {frames} frames with the commit, pushed \
         as one batch into a {} MiB ring in /dev/shm, one checksum per transaction unless said \
         otherwise. The standby (a thread on the other vCPU serving every ring in turn) decodes \
         every op of every batch; it pauses {} between polls that found nothing (the engine's \
         `standby_poll_pause`), or, in the second table, polls continuously. Medians of \
         {rounds} interleaved samples of {SAMPLE_TXS} transactions per variant; \"added\" is \
         the median of the per-round differences against the baseline sample taken just \
         before.\n",
        capacity >> 20,
        fmt_ns(pause.as_nanos() as f64),
    ));
    println!("\nreplication overhead per transaction of {UPDATES} updates ({frames} frames: {UPDATES} unit updates, the input-position record, the commit)");
    for (phase, ((what, _), (base, inline, d_inline))) in phases.iter().zip(&figures).enumerate() {
        let mb = median(base);
        let (mi, oi) = (median(inline), median(d_inline));
        println!("{what}:");
        println!(
            "  no standby (execute + apply)           median {}  p90 {}",
            fmt_ns(mb),
            fmt_ns(quantile(base, 0.9))
        );
        for v in &variants {
            println!(
                "  + {:<36} median {}  p90 {}  added: median of per-round differences {}",
                v.name,
                fmt_ns(median(&v.samples[phase])),
                fmt_ns(quantile(&v.samples[phase], 0.9)),
                fmt_ns(median(&v.added[phase]))
            );
        }
        println!(
            "  + in place, same thread, untimed drain median {}  p90 {}  added: {}",
            fmt_ns(mi),
            fmt_ns(quantile(inline, 0.9)),
            fmt_ns(oi)
        );
        md.push_str(&format!("\n### {what}\n\n"));
        md.push_str(TABLE_HEAD);
        for v in &variants {
            let added = median(&v.added[phase]);
            md.push_str(&row(
                &format!("ns added per transaction, {}", v.label),
                &format!(
                    "{} (total {})",
                    fmt_ns(added),
                    fmt_ns(median(&v.samples[phase]))
                ),
                &format!("{} (no standby: execute + apply)", fmt_ns(mb)),
                "< 100 ns",
                Some(added < TARGET_NS),
            ));
        }
        md.push_str(&row(
            "ns added per transaction, written in place, ring drained in the same thread outside the timing",
            &format!("{} (total {})", fmt_ns(oi), fmt_ns(mi)),
            &format!("{} (no standby)", fmt_ns(mb)),
            "< 100 ns",
            Some(oi < TARGET_NS),
        ));
        md.push_str("\nRatio replicated / unreplicated:");
        for v in &variants {
            md.push_str(&format!(
                " {:.2} ({}),",
                median(&v.samples[phase]) / mb,
                v.name
            ));
        }
        md.push_str(&format!(" {:.2} (same thread).\n", mi / mb));
    }
    md.push_str(&format!(
        "\nMachine: {load_start} at the start, {} at the end (other processes included). \
         Transactions that found the ring full (the standby thread descheduled): {}.\n",
        common::load_note(),
        FULL_WAITS.load(Ordering::Relaxed)
    ));
    if bench_mode {
        write_section("replication", &md);
    }
}
