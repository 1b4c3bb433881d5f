//! Client-path benchmarks (issue 4): the request → response round trip through the active
//! engine with a standby attached, next to a bare ring round trip and a Unix socket, and the
//! service interruption a client sees when the active is SIGKILLed. Every baseline is measured
//! in the same run.
//!
//! The bench re-executes itself for every other process it needs (the environment variable
//! [`ROLE_ENV`] selects the role), so it needs no separately built executable:
//!
//! - `engine`: the test engine (`understudy_testkit::engine_main(1)`, exactly what
//!   `understudy-testapp-v1` runs) serving shared-memory clients (`--clients`);
//! - `ring-echo`: the bare ring baseline: consumes the request ring, answers each request on
//!   the response ring with a frame of the size the engine writes (request sequence + 8 bytes);
//! - `uds-handler`: a Unix-socket server that runs the same request handler on a local store
//!   (`engine::execute_local`: the test application's transaction, applied, no replication);
//! - `uds-echo`: a plain Unix-socket echo (no handler work).
//!
//! 1. **Round trip** (criterion, group `client_round_trip`): one client, one request in
//!    flight, an 8-byte request (test workload request `k`) and an 8-byte response. The client
//!    is pinned to CPU 0 and the server (ring echo, socket server, active engine) to CPU 1.
//!    Besides criterion's estimate, every round trip of a separate timed loop is recorded for
//!    medians and p99. Engine configurations: the active alone; the active with a spinning
//!    standby (both `--spin`; the standby shares CPU 0 with the client, so three processes spin
//!    on two CPUs); the active with a standby on a sleeping idle strategy
//!    (`UNDERSTUDY_IDLE=100,20`, also on CPU 0).
//! 2. **Interruption after a SIGKILL of the active**: a client calls in a loop; at a random
//!    moment, with a request in flight, the active is SIGKILLed. Measured: the kill → the
//!    first response received from the new active (the first response received at or after
//!    the new active's `LastStepUpNs`). After each kill the dead slot restarts as a standby
//!    and the next kill waits until it is hot. Two configurations: both engines spinning
//!    (`--spin`), and the standby sleeping when idle (`UNDERSTUDY_IDLE=100,20`; the restarted
//!    standby too, so after the first kill the active is an engine started with that
//!    strategy). Nothing is pinned here.
//!
//! Run: `cargo bench --bench client` (about 2 minutes). It writes `benches/RESULTS-client.md`.
//! Without `--bench` (`cargo test --benches`) every part runs a few iterations only.
//! Environment: `US_BENCH_KILLS` (kills per configuration, default 100), `US_BENCH_PARTS`
//! (comma-separated subset of `rtt,kill`).

mod common;

use common::{fmt_ns, median, quantile, row, TABLE_HEAD};
use criterion::Criterion;
use shm_layout::region::{IdentityWords, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Producer, PushError};
use std::hint::spin_loop;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use understudy_runtime::client::Client;
use understudy_runtime::control::{realtime_ns, Control, Field, Role, State};
use understudy_runtime::engine::execute_local;
use understudy_runtime::liveness::ProcessIdentity;
use understudy_runtime::store::Store;
use understudy_runtime::InputMeta;
use understudy_test_support::cluster::Engines;
use understudy_test_support::dir::SHM_ROOT;
use understudy_test_support::{ChildGuard, Rng, TestDir};
use understudy_testkit::TestApp;

/// Selects a child's role (`engine`, `ring-echo`, `uds-handler`, `uds-echo`).
const ROLE_ENV: &str = "UNDERSTUDY_CLIENT_BENCH_ROLE";
/// The CPU a child pins itself to (empty: any CPU).
const CPU_ENV: &str = "UNDERSTUDY_CLIENT_BENCH_CPU";
/// The directory of a baseline child's shared files.
const DIR_ENV: &str = "UNDERSTUDY_CLIENT_BENCH_DIR";

/// Ring capacity of the baseline rings: the client library's default.
const RING_CAPACITY: usize = understudy_runtime::client::DEFAULT_CAPACITY;
const REQUEST_TYPE: u16 = 1;
/// How long any wait on another process may take before the bench gives up.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

fn main() {
    match std::env::var(ROLE_ENV).as_deref() {
        Ok("engine") => {
            pin_from_env();
            understudy_testkit::engine_main(1)
        }
        Ok("ring-echo") => ring_echo_main(),
        Ok("uds-handler") => uds_main(true),
        Ok("uds-echo") => uds_main(false),
        _ => parent_main(),
    }
}

// ---------------------------------------------------------------------------------- plumbing

/// Pin the calling thread to `cpu`, or allow every CPU with `None`; failure is ignored (the
/// figures then say less, nothing breaks).
fn set_affinity(cpu: Option<usize>) {
    // SAFETY: cpu_set_t is plain data, zeroed is the empty set; CPU_SET writes inside it (the
    // index is below CPU_SETSIZE) and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        match cpu {
            Some(c) => libc::CPU_SET(c, &mut set),
            None => {
                for c in 0..libc::CPU_SETSIZE as usize {
                    libc::CPU_SET(c, &mut set);
                }
            }
        }
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn pin_from_env() {
    let cpu = std::env::var(CPU_ENV).ok().and_then(|v| v.parse().ok());
    set_affinity(cpu);
}

fn identity() -> IdentityWords {
    let me = ProcessIdentity::current().expect("read /proc/self/stat");
    IdentityWords {
        pid: me.pid as u64,
        start_time: me.start_time_ticks,
    }
}

/// A directory of the bench's under /dev/shm (the workspace harness: removed on drop).
fn bench_dir(tag: &str) -> TestDir {
    TestDir::under(Path::new(SHM_ROOT), "bench", tag)
}

/// A child process of this bench and its directory (the workspace harness: the child dies with
/// the bench, and is killed and reaped on drop, panics included; the directory is removed
/// after it).
struct Peer {
    child: ChildGuard,
    _dir: TestDir,
}

impl Peer {
    fn spawn(role: &str, dir: TestDir, cpu: Option<usize>) -> Peer {
        let child = ChildGuard::spawn(
            Command::new(std::env::current_exe().expect("current_exe"))
                .env(ROLE_ENV, role)
                .env(DIR_ENV, dir.path())
                .env(CPU_ENV, cpu.map_or(String::new(), |c| c.to_string()))
                .stdin(Stdio::null()),
        );
        Peer { child, _dir: dir }
    }
}

/// One way of getting a request answered: `round_trip(k)` sends request `k` and returns the
/// 8-byte answer (the test application answers `2k`).
trait RoundTrip {
    fn round_trip(&mut self, k: u64) -> u64;
}

// ---------------------------------------------------------------------- bare ring baseline

struct RingPair {
    requests: Producer<RegionMemory>,
    responses: Consumer<RegionMemory>,
    buf: BatchBuf,
    // Declared after the ring ends so the mappings outlive them; the peer (and the files) go
    // last.
    _regions: (Region, Region),
    _peer: Peer,
}

impl RingPair {
    fn start(cpu: Option<usize>) -> RingPair {
        let dir = bench_dir("ring");
        let spec = RegionSpec {
            capacity: RING_CAPACITY,
            epoch: 0,
            kind: 10,
        };
        let me = identity();
        let ping = Region::create(&dir.join("ping"), spec, me).expect("create ping");
        let pong = Region::create(&dir.join("pong"), RegionSpec { kind: 11, ..spec }, me)
            .expect("create pong");
        pong.set_consumer_identity(me);
        let requests = ping.producer().expect("ping producer");
        let peer = Peer::spawn("ring-echo", dir, cpu);
        // The child attaches as the consumer of ping and producer of pong, which resets pong.
        let t = Instant::now();
        while pong.producer_identity().map(|i| i.pid) != Some(peer_pid(&peer)) {
            assert!(
                t.elapsed() < PEER_TIMEOUT,
                "the ring echo child did not attach"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let responses = pong.consumer().expect("pong consumer");
        RingPair {
            requests,
            responses,
            buf: BatchBuf::with_capacity(4096),
            _regions: (ping, pong),
            _peer: peer,
        }
    }
}

fn peer_pid(p: &Peer) -> u64 {
    u64::from(p.child.id())
}

impl RoundTrip for RingPair {
    fn round_trip(&mut self, k: u64) -> u64 {
        let req = k.to_le_bytes();
        while let Err(e) = self.requests.try_publish(REQUEST_TYPE, 1, 0, &req) {
            assert!(matches!(e, PushError::Full { .. }), "request publish: {e}");
            spin_loop();
        }
        let t = Instant::now();
        let mut n = 0u32;
        while !self
            .responses
            .poll(&mut self.buf)
            .expect("a valid response frame")
        {
            spin_loop();
            n = n.wrapping_add(1);
            if n % 65536 == 0 {
                assert!(
                    t.elapsed() < PEER_TIMEOUT,
                    "the ring echo child stopped answering"
                );
            }
        }
        let f = self.buf.frames().next().expect("one response frame");
        u64::from_le_bytes(f.payload[8..16].try_into().expect("16-byte response"))
    }
}

fn ring_echo_main() {
    pin_from_env();
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("dir in the environment"));
    let me = identity();
    let ping = Region::open(&dir.join("ping"), PEER_TIMEOUT).expect("open ping");
    ping.set_consumer_identity(me);
    let pong = Region::open(&dir.join("pong"), PEER_TIMEOUT).expect("open pong");
    let mut requests = ping.consumer().expect("ping consumer");
    let mut responses = pong.producer().expect("pong producer");
    // The parent attaches its consumer once it sees this (after `producer()` reset the ring).
    pong.set_producer_identity(me);
    let mut buf = BatchBuf::with_capacity(4096);
    let parent = std::os::unix::process::parent_id();
    let mut idle = 0u64;
    loop {
        if !requests.poll(&mut buf).expect("a valid request frame") {
            spin_loop();
            idle += 1;
            if idle % (1 << 22) == 0 && std::os::unix::process::parent_id() != parent {
                return;
            }
            continue;
        }
        for f in buf.frames() {
            // The payload the engine writes: request sequence, then the 8-byte answer.
            let k = u64::from_le_bytes(f.payload[..8].try_into().expect("8-byte request"));
            let mut out = [0u8; 16];
            out[..8].copy_from_slice(&f.meta.seq.to_le_bytes());
            out[8..].copy_from_slice(&(k * 2).to_le_bytes());
            while let Err(e) = responses.try_publish(2, 1, 8, &out) {
                assert!(matches!(e, PushError::Full { .. }), "response publish: {e}");
                spin_loop();
            }
        }
    }
}

// ---------------------------------------------------------------------- Unix socket baseline

struct UdsPair {
    stream: UnixStream,
    _peer: Peer,
}

impl UdsPair {
    fn start(handler: bool, cpu: Option<usize>) -> UdsPair {
        let dir = bench_dir(if handler { "uds-handler" } else { "uds-echo" });
        let listener = UnixListener::bind(dir.join("uds.sock")).expect("bind the socket");
        listener.set_nonblocking(true).expect("nonblocking");
        let peer = Peer::spawn(if handler { "uds-handler" } else { "uds-echo" }, dir, cpu);
        let t = Instant::now();
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        t.elapsed() < PEER_TIMEOUT,
                        "the socket child did not connect"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        stream.set_nonblocking(false).expect("blocking");
        UdsPair {
            stream,
            _peer: peer,
        }
    }
}

impl RoundTrip for UdsPair {
    fn round_trip(&mut self, k: u64) -> u64 {
        self.stream
            .write_all(&k.to_le_bytes())
            .expect("socket write");
        let mut out = [0u8; 16];
        self.stream.read_exact(&mut out).expect("socket read");
        u64::from_le_bytes(out[8..].try_into().expect("8"))
    }
}

/// The socket server: blocking reads, one request at a time, the same 16-byte answer frame as
/// the engine's (sequence, answer); with `handler`, the answer comes from the test
/// application's transaction run and applied on a local store.
fn uds_main(handler: bool) {
    pin_from_env();
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("dir in the environment"));
    let mut s = UnixStream::connect(dir.join("uds.sock")).expect("connect to the bench");
    let mut app = TestApp::new(1);
    let mut store = Store::new();
    let mut seq = 0u64;
    let mut req = [0u8; 8];
    while s.read_exact(&mut req).is_ok() {
        let answer = if handler {
            let meta = InputMeta {
                source: 1,
                request_seq: seq,
                next_pos: seq + 1,
                next_seq: seq + 1,
            };
            let r = execute_local(&mut app, &mut store, 0, &meta, &req);
            u64::from_le_bytes(r[..8].try_into().expect("8-byte answer"))
        } else {
            u64::from_le_bytes(req) * 2
        };
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&seq.to_le_bytes());
        out[8..].copy_from_slice(&answer.to_le_bytes());
        if s.write_all(&out).is_err() {
            break;
        }
        seq += 1;
    }
}

// ---------------------------------------------------------------------------- engine cluster

/// How an engine waits when idle.
#[derive(Clone, Copy, PartialEq)]
enum IdleMode {
    /// `--spin`.
    Spin,
    /// `UNDERSTUDY_IDLE=100,20`: 100 polls, then 20 µs sleeps.
    Sleep,
}

/// A cluster directory with engine processes (this bench re-executed as the test engine), on
/// the workspace harness ([`Engines`]): on drop (panics included) every engine is killed and
/// reaped and the directory removed, and every engine dies with the bench.
struct Cluster {
    engines: Engines,
    dir: PathBuf,
    control: Control,
    spawned: usize,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let engines = Engines::new(&format!("bench-{tag}"));
        let control = engines.control();
        Cluster {
            dir: engines.dir.clone(),
            engines,
            control,
            spawned: 0,
        }
    }

    fn spawn(&mut self, slot: usize, standby: bool, idle: IdleMode, cpu: Option<usize>) {
        let log = self.dir.join(format!("log-{slot}-{}", self.spawned));
        self.spawned += 1;
        let mut c = Command::new(std::env::current_exe().expect("current_exe"));
        c.env(ROLE_ENV, "engine")
            .env(CPU_ENV, cpu.map_or(String::new(), |c| c.to_string()))
            .args(self.engines.engine_args(slot, standby))
            .arg("--clients")
            .env(
                "RUST_LOG",
                std::env::var("US_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match idle {
            IdleMode::Spin => c.arg("--spin"),
            IdleMode::Sleep => c.env("UNDERSTUDY_IDLE", "100,20"),
        };
        self.engines.start_logged(slot, &mut c, log);
    }

    /// Take the engine of `slot` out of the watch list (it is about to die on purpose).
    fn take(&mut self, slot: usize) -> ChildGuard {
        self.engines.take(slot)
    }

    /// Panic, with the engine's log, if an engine exited.
    fn check(&mut self) {
        self.engines.check_running("");
    }

    /// Wait (bounded, polling every millisecond) until `f`; panics naming `what`, or the
    /// engine that exited meanwhile.
    fn wait(&mut self, what: &str, timeout: Duration, f: impl FnMut(&Control) -> bool) {
        self.engines.wait_running(
            &self.control,
            what,
            timeout,
            Duration::from_millis(1),
            "",
            f,
        )
    }

    fn wait_hot(&mut self, slot: usize, what: &str) {
        self.wait(what, Duration::from_secs(30), |c| {
            State::from_word(c.get(slot, Field::State)) == State::Hot
                && Role::from_word(c.get(slot, Field::Role)) == Role::Standby
        });
    }
}

struct EnginePath {
    // The client goes first: its drop unregisters while the engines still run.
    client: Client,
    _cluster: Cluster,
}

impl EnginePath {
    /// An active on `cpu_active` and, if `standby` is given, a standby with that idle mode on
    /// `cpu_standby`; waits until the standby is hot and the client is served.
    fn start(
        standby: Option<IdleMode>,
        cpu_active: Option<usize>,
        cpu_standby: Option<usize>,
    ) -> (EnginePath, u64) {
        let mut cl = Cluster::new("rtt");
        cl.spawn(0, false, IdleMode::Spin, cpu_active);
        cl.wait("the first engine to become active", PEER_TIMEOUT, |c| {
            Role::from_word(c.get(0, Field::Role)) == Role::Active
        });
        if let Some(idle) = standby {
            cl.spawn(1, true, idle, cpu_standby);
            cl.wait_hot(1, "the standby to become hot");
        }
        let mut client = Client::connect(&cl.dir).expect("connect a client");
        let r = client
            .call(&0u64.to_le_bytes(), PEER_TIMEOUT)
            .expect("first call")
            .expect("the first request answered");
        assert_eq!(r, 0u64.to_le_bytes(), "the answer to request 0");
        (
            EnginePath {
                client,
                _cluster: cl,
            },
            1,
        )
    }
}

impl RoundTrip for EnginePath {
    fn round_trip(&mut self, k: u64) -> u64 {
        let r = self
            .client
            .call(&k.to_le_bytes(), PEER_TIMEOUT)
            .expect("call")
            .unwrap_or_else(|| panic!("request {k} unanswered after {PEER_TIMEOUT:?}"));
        u64::from_le_bytes(r[..8].try_into().expect("8-byte answer"))
    }
}

// ------------------------------------------------------------------------------ round trip

struct RttFigures {
    name: &'static str,
    what: &'static str,
    samples_ns: Vec<f64>,
}

/// Round trips for `dur` (at most `max`), each timed on its own.
fn sample(rt: &mut dyn RoundTrip, k: &mut u64, dur: Duration, max: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(max);
    let end = Instant::now() + dur;
    while v.len() < max {
        let t = Instant::now();
        let r = rt.round_trip(*k);
        v.push(t.elapsed().as_nanos() as f64);
        assert_eq!(r, *k * 2, "the answer to request {k}");
        *k += 1;
        if v.len() % 256 == 0 && Instant::now() >= end {
            break;
        }
    }
    v
}

fn bench_round_trips(c: &mut Criterion, bench_mode: bool, cpus: usize) -> Vec<RttFigures> {
    let (cpu_client, cpu_server) = if cpus >= 2 {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    let dur = Duration::from_millis(if bench_mode { 2000 } else { 50 });
    let max = if bench_mode { 2_000_000 } else { 2_000 };
    type Start = Box<dyn Fn() -> (Box<dyn RoundTrip>, u64)>;
    let configs: Vec<(&'static str, &'static str, Start)> = vec![
        (
            "bare_ring",
            "bare ring round trip (two shm-layout rings, echo process spinning)",
            Box::new(move || (Box::new(RingPair::start(cpu_server)) as _, 0)),
        ),
        (
            "uds_echo",
            "Unix socket, plain echo (blocking reads)",
            Box::new(move || (Box::new(UdsPair::start(false, cpu_server)) as _, 0)),
        ),
        (
            "uds_handler",
            "Unix socket, server runs the same handler on a local store (blocking reads)",
            Box::new(move || (Box::new(UdsPair::start(true, cpu_server)) as _, 0)),
        ),
        (
            "engine_alone",
            "through the active engine, no standby",
            Box::new(move || {
                let (e, k) = EnginePath::start(None, cpu_server, cpu_client);
                (Box::new(e) as _, k)
            }),
        ),
        (
            "engine_standby_spin",
            "through the active, standby attached, both engines spinning",
            Box::new(move || {
                let (e, k) = EnginePath::start(Some(IdleMode::Spin), cpu_server, cpu_client);
                (Box::new(e) as _, k)
            }),
        ),
        (
            "engine_standby_sleep",
            "through the active (spinning), standby attached sleeping when idle (100,20)",
            Box::new(move || {
                let (e, k) = EnginePath::start(Some(IdleMode::Sleep), cpu_server, cpu_client);
                (Box::new(e) as _, k)
            }),
        ),
    ];
    let mut out = Vec::new();
    let mut group = c.benchmark_group("client_round_trip");
    for (name, what, start) in configs {
        // Children inherit the affinity they set themselves; the client thread is pinned only
        // while it measures.
        let (mut rt, mut k) = start();
        set_affinity(cpu_client);
        group.bench_function(name, |b| {
            b.iter(|| {
                let r = rt.round_trip(k);
                k += 1;
                r
            })
        });
        let samples_ns = sample(rt.as_mut(), &mut k, dur, max);
        set_affinity(None);
        drop(rt);
        println!(
            "{name}: {} round trips, median {}, p99 {}",
            samples_ns.len(),
            fmt_ns(median(&samples_ns)),
            fmt_ns(quantile(&samples_ns, 0.99))
        );
        out.push(RttFigures {
            name,
            what,
            samples_ns,
        });
    }
    group.finish();
    out
}

// ------------------------------------------------------------------------- kill interruption

struct KillFigures {
    kills: usize,
    /// The kill → the first response from the new active, ns.
    interruption: Vec<f64>,
    /// The kill → the new active's `LastStepUpNs`, ns.
    to_step_up: Vec<f64>,
    /// The new active's own detection → active (`LastStepUpDurNs`), ns.
    engine_dur: Vec<f64>,
    /// Restart of the dead slot → hot, ns.
    restart_to_hot: Vec<f64>,
    seconds: f64,
}

fn bench_kills(standby_idle: IdleMode, kills: usize) -> KillFigures {
    let started = Instant::now();
    let mut cl = Cluster::new(match standby_idle {
        IdleMode::Spin => "kill-spin",
        IdleMode::Sleep => "kill-sleep",
    });
    cl.spawn(0, false, IdleMode::Spin, None);
    cl.wait("the first engine to become active", PEER_TIMEOUT, |c| {
        Role::from_word(c.get(0, Field::Role)) == Role::Active
    });
    cl.spawn(1, true, standby_idle, None);
    let mut client = Client::connect(&cl.dir).expect("connect a client");
    let mut k = 0u64;
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ standby_idle as u64);
    let mut active = 0usize;
    let warmup = 2;
    let mut f = KillFigures {
        kills,
        interruption: Vec::new(),
        to_step_up: Vec::new(),
        engine_dur: Vec::new(),
        restart_to_hot: Vec::new(),
        seconds: 0.0,
    };
    let mut restarted_at: Option<Instant> = None;
    for i in 0..kills + warmup {
        let standby = 1 - active;
        cl.wait_hot(standby, &format!("kill {i}: the standby to become hot"));
        if let Some(t) = restarted_at.take() {
            if i > warmup {
                f.restart_to_hot.push(t.elapsed().as_nanos() as f64);
            }
        }
        // Calls back to back for 2..10 ms, so the kill lands in a steady flow.
        let flow = Duration::from_micros(2000 + rng.next_u64() % 8000);
        let t = Instant::now();
        while t.elapsed() < flow {
            let r = client
                .call(&k.to_le_bytes(), PEER_TIMEOUT)
                .expect("call")
                .unwrap_or_else(|| panic!("kill {i}: request {k} unanswered"));
            assert_eq!(r, (k * 2).to_le_bytes(), "the answer to request {k}");
            k += 1;
        }
        let stepups = cl.control.get(standby, Field::StepUps);
        let mut victim = cl.take(active);
        // A request in flight at the kill.
        client.submit(&k.to_le_bytes()).expect("submit");
        k += 1;
        let t_kill = realtime_ns();
        // Not reaped here: the measurement starts at the kill.
        victim.signal(libc::SIGKILL);
        // Responses until one is received at or after the new active's step-up.
        let mut step_up_ns = None;
        let deadline = Instant::now() + PEER_TIMEOUT;
        let first_ns = loop {
            let got = client
                .wait_response(Duration::from_millis(100))
                .expect("wait for a response");
            let now = realtime_ns();
            if step_up_ns.is_none()
                && cl.control.get(standby, Field::StepUps) > stepups
                && Role::from_word(cl.control.get(standby, Field::Role)) == Role::Active
            {
                step_up_ns = Some(cl.control.get(standby, Field::LastStepUpNs));
            }
            match (got, step_up_ns) {
                (Some(_), Some(s)) if now >= s => break now,
                (Some(_), _) => {
                    // Answered by the old active before it died: ask again.
                    client.submit(&k.to_le_bytes()).expect("submit");
                    k += 1;
                }
                (None, _) => {
                    cl.check();
                    assert!(
                        Instant::now() < deadline,
                        "kill {i}: no response from a new active within {PEER_TIMEOUT:?}"
                    );
                }
            }
        };
        let step_up = step_up_ns.expect("stepped up");
        if i >= warmup {
            f.interruption.push(first_ns.saturating_sub(t_kill) as f64);
            f.to_step_up.push(step_up.saturating_sub(t_kill) as f64);
            f.engine_dur
                .push(cl.control.get(standby, Field::LastStepUpDurNs) as f64);
        }
        let _ = victim.child_mut().wait();
        cl.spawn(active, true, standby_idle, None);
        restarted_at = Some(Instant::now());
        active = standby;
    }
    f.seconds = started.elapsed().as_secs_f64();
    drop(client);
    f
}

// ------------------------------------------------------------------------------------ main

fn dist(v: &[f64]) -> String {
    format!(
        "median {}, p99 {}, max {}",
        fmt_ns(median(v)),
        fmt_ns(quantile(v, 0.99)),
        fmt_ns(v.iter().cloned().fold(0.0, f64::max))
    )
}

fn parent_main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let parts = std::env::var("US_BENCH_PARTS").unwrap_or_else(|_| "rtt,kill".into());
    let want = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_start = common::load_note();
    let mut md = String::new();
    let mut notes = String::new();
    md.push_str(
        "# Client-path benchmarks: measured figures\n\n\
         Written by `cargo bench --bench client` (issue 4). The machine is a noisy 2-vCPU VM: \
         only medians, quantiles and ratios measured in the same run mean anything.\n\n",
    );
    md.push_str(TABLE_HEAD);

    if want("rtt") {
        let mut c = Criterion::default()
            .sample_size(20)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_millis(1500))
            .configure_from_args();
        let figs = bench_round_trips(&mut c, bench_mode, cpus);
        c.final_summary();
        let by = |n: &str| figs.iter().find(|f| f.name == n).expect("measured");
        let ring = by("bare_ring");
        let ring_med = median(&ring.samples_ns);
        let ring_p99 = quantile(&ring.samples_ns, 0.99);
        println!("\nround trip, 8-byte request, 8-byte answer (client CPU 0, server CPU 1)");
        for f in &figs {
            let (m, p) = (median(&f.samples_ns), quantile(&f.samples_ns, 0.99));
            println!(
                "  {:<22} median {:>9}  p99 {:>9}  p99.9 {:>9}  ({:.2}x / {:.2}x the bare ring)  {} round trips",
                f.name,
                fmt_ns(m),
                fmt_ns(p),
                fmt_ns(quantile(&f.samples_ns, 0.999)),
                m / ring_med,
                p / ring_p99,
                f.samples_ns.len()
            );
        }
        let spin = by("engine_standby_spin");
        let (m, p) = (median(&spin.samples_ns), quantile(&spin.samples_ns, 0.99));
        md.push_str(&row(
            "round trip through the active, standby attached, both engines spinning: median (p99)",
            &format!("{} ({})", fmt_ns(m), fmt_ns(p)),
            &format!(
                "bare ring: {} ({}); ratio {:.2}x median, {:.2}x p99",
                fmt_ns(ring_med),
                fmt_ns(ring_p99),
                m / ring_med,
                p / ring_p99
            ),
            "median < 3x the bare ring",
            Some(m < 3.0 * ring_med),
        ));
        for f in figs.iter().filter(|f| f.name != "engine_standby_spin") {
            let (m, p) = (median(&f.samples_ns), quantile(&f.samples_ns, 0.99));
            md.push_str(&row(
                &format!("round trip: {}", f.what),
                &format!(
                    "{} ({}); p99.9 {}",
                    fmt_ns(m),
                    fmt_ns(p),
                    fmt_ns(quantile(&f.samples_ns, 0.999))
                ),
                &format!("{:.2}x / {:.2}x the bare ring", m / ring_med, p / ring_p99),
                "—",
                None,
            ));
        }
        notes.push_str(&format!(
            "- Round trip: one client, one request in flight, an 8-byte request (the test \
             application's request `k`: register a unit, update one, retire one, a table put) and \
             an 8-byte answer (16-byte response frame with the request sequence). Client pinned \
             to CPU 0, the server (echo, socket server or active engine) to CPU 1, a standby to \
             CPU 0 beside the client: with both engines spinning, three processes spin on two \
             CPUs. Medians and quantiles are of {} individually timed round trips per \
             configuration (a separate loop after criterion's; criterion's own estimates are \
             printed by the bench). The Unix-socket servers block in `read(2)`; the \
             handler server runs `engine::execute_local`, which also recomputes the write \
             versions per request, so its handler work is slightly more than the engine's.\n",
            figs.iter()
                .map(|f| f.samples_ns.len().to_string())
                .collect::<Vec<_>>()
                .join(" / ")
        ));
    }

    if want("kill") {
        let kills = std::env::var("US_BENCH_KILLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if bench_mode { 100 } else { 3 });
        for (idle, label) in [
            (IdleMode::Spin, "both engines spinning"),
            (
                IdleMode::Sleep,
                "standbys sleeping when idle (UNDERSTUDY_IDLE=100,20)",
            ),
        ] {
            let f = bench_kills(idle, kills);
            println!(
                "\nSIGKILL of the active, {label}: {} kills in {:.0} s",
                f.kills, f.seconds
            );
            println!(
                "  kill → first response from the new active  {}",
                dist(&f.interruption)
            );
            println!(
                "  kill → LastStepUpNs                        {}",
                dist(&f.to_step_up)
            );
            println!(
                "  detection → active (LastStepUpDurNs)       {}",
                dist(&f.engine_dur)
            );
            println!(
                "  restart of the dead slot → hot             {}",
                dist(&f.restart_to_hot)
            );
            let p99 = quantile(&f.interruption, 0.99);
            md.push_str(&row(
                &format!(
                    "interruption seen by a client, SIGKILL of the active → first response from the new active, {label} ({} kills)",
                    f.kills
                ),
                &dist(&f.interruption),
                &format!(
                    "kill → new active's `LastStepUpNs`: {}; its own detection → active: {}",
                    dist(&f.to_step_up),
                    dist(&f.engine_dur)
                ),
                "p99 < 1 ms",
                Some(p99 < 1e6),
            ));
        }
        notes.push_str(
            "- Interruption: a client calls back to back for 2..10 ms (random), submits one more \
             request and the bench SIGKILLs the active with it in flight. The interruption is \
             CLOCK_REALTIME from just before `kill(2)` to the receipt of the first response at or \
             after the new active's `LastStepUpNs` (the old active may still answer a request \
             in the microseconds before it dies; such answers are not counted). Nothing is \
             pinned: with both engines spinning, the two engines and the client spin on two CPUs, \
             so the client or the standby is often descheduled. In the sleeping configuration \
             every restarted engine uses `UNDERSTUDY_IDLE=100,20`, so after the first kill the \
             active also sleeps when idle (an engine keeps the idle strategy it started with).\n",
        );
    }

    md.push_str("\nNotes:\n\n");
    md.push_str(&format!(
        "- Machine: {load_start} at the start, {} at the end (other processes included).\n",
        common::load_note()
    ));
    md.push_str(&notes);
    print!("\n{md}");
    if bench_mode && parts == "rtt,kill" {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-client.md");
        if let Err(e) = std::fs::write(&path, &md) {
            eprintln!("could not write {}: {e}", path.display());
        }
    }
}
