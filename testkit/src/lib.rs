//! A small application for tests, benchmarks and examples: a counter work unit whose record
//! gained a field in layout version 2 (the `tagged` feature), a deterministic workload, a
//! side channel a child engine reports progress through, and a model that computes the state
//! after exactly k requests with the same handler.
//!
//! Two executables run it as real engines: `understudy-testapp-v1` and `understudy-testapp-v2`.
#![allow(missing_docs)]

use shm_layout::record::{decode, encoded, Record, TemplateInfo};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use understudy_runtime::engine::{execute_local, InputMeta, SourcePosition};
use understudy_runtime::store::Store;
use understudy_runtime::{Application, Feature, Input, Refused, Tx};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The work unit's state record: `tag` appeared in layout version 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Counter {
    pub k: u64,
    pub sum: u64,
    pub tag: u64,
}

impl Record for Counter {
    const TYPE_ID: u16 = 100;
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
shm_layout::assert_record_layout!(Counter);

/// The v1 build only knows the first version of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CounterV1 {
    pub k: u64,
    pub sum: u64,
}
impl Record for CounterV1 {
    const TYPE_ID: u16 = 100;
    const NAME: &'static str = "counter";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 16)];
    fn defaults() -> Self {
        CounterV1 { k: 0, sum: 0 }
    }
}
shm_layout::assert_record_layout!(CounterV1);

/// Prefix of a ledger request (`LEDGER` + k as u64): the response is how many times k has
/// been applied, which must be 1.
pub const LEDGER: &[u8; 8] = b"LEDGER!!";
/// The request that returns (ledger keys, sum of counts).
pub const STATS: &[u8; 8] = b"STATS!!!";
/// The ledger's table.
pub const LEDGER_TABLE: u16 = 2;
/// Prefix of a counter request (`COUNTER` + tag u64): increments the tag's counter and answers
/// its new value.
pub const COUNTER: &[u8; 8] = b"COUNTER!";
/// Prefix of a counter read (`COUNTER_READ` + tag u64).
pub const COUNTER_READ: &[u8; 8] = b"COUNTRD!";
/// The counters' table.
pub const COUNTER_TABLE: u16 = 3;

/// A bulk write (`BIG_WRITE` + n u64): puts records of [`BIG_RECORD`] bytes into
/// [`BIG_TABLE`] until they hold n bytes, in one transaction; answers `ok` + the transaction's
/// `Tx::encoded_len` and `Tx::limit` (u64 LE each). A transaction over the stream's limit is
/// refused by the engine: the answer is then the `TxTooLarge` message.
pub const BIG_WRITE: &[u8; 8] = b"BIGWRIT!";
/// The bulk writes' table.
pub const BIG_TABLE: u16 = 5;
/// The size of one bulk record.
pub const BIG_RECORD: usize = 16 << 10;

/// Arm timers (`TIMER_ARM` + count u32 + spread_ms u32 + first tag u64): `count` timers with
/// deadlines spread evenly over the next `spread_ms` (the i-th at `(i + 1) · spread / count`),
/// tags `first .. first + count`, each noted in [`TIMER_ARMED`]. Answers the count (u64).
pub const TIMER_ARM: &[u8; 8] = b"TIMERARM";
/// Timer statistics (`TIMER_STATS`): answers 7 u64 — timers armed, timers fired, firings in
/// all, firings before their deadline, timers fired more than once, timers armed whose
/// deadline has passed that have not fired, and the latest first firing after its deadline
/// (ns).
pub const TIMER_STATS: &[u8; 8] = b"TIMERSTA";
/// Timers armed: tag (u64 LE) → deadline ns (u64 LE).
pub const TIMER_ARMED: u16 = 6;
/// Timers fired: tag → (firings u64, first firing's CLOCK_MONOTONIC ns u64).
pub const TIMER_FIRED: u16 = 7;

/// Feature 0, "tagged", needs Counter layout 2.
pub const TAGGED: u16 = 0;

/// Prefix of a fault request (see [`fault_request`]): the test application dies on purpose,
/// once per token file, in the way the request names.
pub const FAULT: &[u8; 8] = b"FAULT!!!";
/// The table a fault for the standby travels in: the active puts the request's kind and token
/// there, and the standby's apply hook fires it.
pub const FAULT_TABLE: u16 = 4;

/// A way for the test application to die from the inside (the deaths that need a cooperating
/// binary; signals from outside are sent by the test driver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Fault {
    /// `panic!` in the request handler (active) or the apply hook (standby).
    Panic = 1,
    /// `panic!` in a thread the handler or apply hook spawns.
    PanicThread = 2,
    /// `panic!` in the engine's own call path after the transaction is committed, before the
    /// response is delivered (the engine's call of `Input::committed`; active only).
    PanicAfterCommit = 3,
    /// `std::process::exit(0)`.
    Exit0 = 4,
    /// `std::process::exit(7)`.
    ExitN = 5,
    /// `main` returns (status 0) while the engine runs on another thread.
    ReturnFromMain = 6,
    /// `std::process::abort()`.
    Abort = 7,
    /// A real SIGSEGV: a write through a null pointer.
    Segv = 8,
    /// A real SIGBUS: a read of a mapped page past the end of its truncated file.
    Bus = 9,
    /// Unbounded recursion until the stack's guard page.
    StackOverflow = 10,
    /// Allocate and touch memory until the allocator fails (under an address-space limit
    /// set first, so the machine's OOM killer is never involved): the allocation-failure abort.
    OutOfMemory = 11,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 11] = [
        Fault::Panic,
        Fault::PanicThread,
        Fault::PanicAfterCommit,
        Fault::Exit0,
        Fault::ExitN,
        Fault::ReturnFromMain,
        Fault::Abort,
        Fault::Segv,
        Fault::Bus,
        Fault::StackOverflow,
        Fault::OutOfMemory,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Panic => "panic",
            Fault::PanicThread => "panic-thread",
            Fault::PanicAfterCommit => "panic-after-commit",
            Fault::Exit0 => "exit-0",
            Fault::ExitN => "exit-7",
            Fault::ReturnFromMain => "return-from-main",
            Fault::Abort => "abort",
            Fault::Segv => "segv",
            Fault::Bus => "sigbus",
            Fault::StackOverflow => "stack-overflow",
            Fault::OutOfMemory => "out-of-memory",
        }
    }

    /// The fault with code `b`.
    pub fn from_code(b: u8) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| *f as u8 == b)
    }

    /// Can it be fired on a standby (in the apply hook)?
    pub fn on_standby(self) -> bool {
        self != Fault::PanicAfterCommit
    }

    /// Die this way (most variants never return; `PanicThread`, `PanicAfterCommit` and
    /// `ReturnFromMain` arrange the death and return).
    pub fn fire(self, where_: &str) {
        eprintln!(
            "testapp: fault `{}` in the {where_}, on purpose",
            self.name()
        );
        match self {
            Fault::Panic => panic!("testapp: fault `panic` in the {where_}, on purpose"),
            Fault::PanicThread => {
                let _ = std::thread::Builder::new()
                    .name("faulty".into())
                    .spawn(|| panic!("testapp: fault `panic-thread`, on purpose"));
            }
            Fault::PanicAfterCommit => PANIC_AFTER_COMMIT.store(true, Ordering::Release),
            Fault::Exit0 => std::process::exit(0),
            Fault::ExitN => std::process::exit(7),
            Fault::ReturnFromMain => {
                RETURN_FROM_MAIN.store(true, Ordering::Release);
                if let Some(t) = MAIN_THREAD.get() {
                    t.unpark();
                }
            }
            Fault::Abort => std::process::abort(),
            Fault::Segv => {
                let p = std::hint::black_box(std::ptr::null_mut::<u64>());
                // SAFETY: deliberately unsound: a write through a null pointer, so the kernel
                // delivers a real SIGSEGV (the death this fault exists to produce). Page 0 is
                // never mapped, the write cannot corrupt anything, and the process dies on it.
                unsafe { std::ptr::write_volatile(p, 1) };
                unreachable!("a write through a null pointer returned");
            }
            Fault::Bus => sigbus(),
            Fault::StackOverflow => {
                let n = recurse(std::hint::black_box(1));
                unreachable!("unbounded recursion returned {n}");
            }
            Fault::OutOfMemory => out_of_memory(),
        }
    }
}

/// A request asking the test application to die with `fault`, on the active (in its handler)
/// or on its standby (in the apply hook of the change the active's handler writes), once: only
/// the engine that removes the file `token` dies, so the request is answered normally when a
/// new active runs it again (or a new standby applies it again).
pub fn fault_request(fault: Fault, on_standby: bool, token: &Path) -> Vec<u8> {
    let mut r = FAULT.to_vec();
    r.push(fault as u8);
    r.push(on_standby as u8);
    r.extend_from_slice(token.as_os_str().as_encoded_bytes());
    r
}

/// The response to a fault request whose fault fired (the engine that fired it survived:
/// `PanicThread` and others that kill a moment later, or a standby fault).
pub const FAULT_FIRED: &[u8] = b"fired";
/// The response to a fault request whose token was already gone.
pub const FAULT_SPENT: &[u8] = b"spent";

static PANIC_AFTER_COMMIT: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
static RETURN_FROM_MAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static MAIN_THREAD: std::sync::OnceLock<std::thread::Thread> = std::sync::OnceLock::new();

/// Fires the fault named by `kind` if this process removes `token` first.
fn fire_once(kind: u8, token: &[u8], where_: &str) -> bool {
    let Some(fault) = Fault::from_code(kind) else {
        return false;
    };
    // The token is a path the test driver wrote; anything else only makes the removal fail.
    let Ok(token) = std::str::from_utf8(token) else {
        return false;
    };
    if token.is_empty() || std::fs::remove_file(token).is_err() {
        return false;
    }
    fault.fire(where_);
    true
}

#[inline(never)]
fn recurse(n: u64) -> u64 {
    if n == u64::MAX {
        return 0; // never: only so the compiler sees a way out
    }
    let mut frame = [0u8; 1024];
    frame[0] = n as u8;
    std::hint::black_box(&mut frame);
    recurse(std::hint::black_box(n + 1)).wrapping_add(frame[0] as u64)
}

fn sigbus() {
    let path = std::env::temp_dir().join(format!("testapp-sigbus-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("sigbus fault: create its file");
    let _ = std::fs::remove_file(&path);
    f.set_len(4096).expect("sigbus fault: size its file");
    // SAFETY: a private file of this process, mapped shared; nobody else maps it.
    let map = unsafe { memmap2::MmapMut::map_mut(&f).expect("sigbus fault: map its file") };
    f.set_len(0).expect("sigbus fault: truncate its file");
    // SAFETY: deliberately touches the mapped page whose file offset is now past the end of
    // the file: the kernel answers with a real SIGBUS, the death this fault exists to produce.
    let b = unsafe { std::ptr::read_volatile(map.as_ptr()) };
    unreachable!("a read past the end of a truncated mapped file returned {b}");
}

fn out_of_memory() {
    // Limit the address space to what the process has plus 64 MiB, so the allocator fails
    // long before the machine runs short (the kernel's OOM killer, which picks its own victim,
    // is never involved): Rust's allocation-failure handler then aborts the process.
    let vm_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096;
    let limit = libc::rlimit {
        rlim_cur: vm_bytes + (64 << 20),
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid, initialised struct; lowers only the soft limit.
    unsafe { libc::setrlimit(libc::RLIMIT_AS, &limit) };
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // Filled (memset), so every page is touched, as a real leak's would be.
        hoard.push(std::hint::black_box(vec![1u8; 16 << 20]));
    }
}

/// Requests: 8-byte k (a normal transaction) or 9 bytes with a trailing 1: a "tagged" request
/// that needs the v2 feature.
pub struct TestApp {
    pub version: u32,
    pub name: String,
    /// Never retire units (request k registers unit k and it stays): an active that holds as
    /// many units as it handled requests (catch-up benchmarks).
    pub keep: bool,
}

impl TestApp {
    pub fn new(version: u32) -> Self {
        TestApp {
            version,
            name: "testapp".into(),
            keep: false,
        }
    }
}

impl Application for TestApp {
    fn name(&self) -> &str {
        &self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        if self.version >= 2 {
            vec![TemplateInfo::of::<Counter>()]
        } else {
            vec![TemplateInfo::of::<CounterV1>()]
        }
    }
    fn features(&self) -> Vec<Feature> {
        if self.version >= 2 {
            vec![Feature {
                id: TAGGED,
                name: "tagged",
                type_id: 100,
                layout_version: 2,
            }]
        } else {
            vec![]
        }
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        // Each request kind is told apart by its 8-byte prefix (and length); the rest are the
        // numbered requests of the unit workload.
        let prefix = req.get(..8).unwrap_or(&[]);
        if req.len() >= 10 && prefix == FAULT {
            fault(tx, req);
        } else if req.len() == 16 && prefix == LEDGER {
            ledger(tx, &req[8..16]);
        } else if req.len() == 16 && (prefix == COUNTER || prefix == COUNTER_READ) {
            counter(tx, &req[8..16], prefix == COUNTER_READ);
        } else if req.len() == 16 && prefix == BIG_WRITE {
            big_write(
                tx,
                u64::from_le_bytes(req[8..16].try_into().unwrap_or([0; 8])) as usize,
            );
        } else if req.len() == 24 && prefix == TIMER_ARM {
            arm_timers(tx, &req[8..24]);
        } else if req == TIMER_STATS {
            timer_stats(tx);
        } else if req == STATS {
            ledger_stats(tx);
        } else {
            return self.numbered(tx, req);
        }
        Ok(())
    }
    fn on_timer(
        &mut self,
        tx: &mut Tx<'_>,
        timer: &understudy_runtime::Timer,
    ) -> Result<(), Refused> {
        // Count the firing, with the clock of the first one (the check that none fires early).
        let key = timer.tag.to_le_bytes();
        let (n, first) = tx.get(TIMER_FIRED, &key).map_or((0, tx.now_ns()), |v| {
            let w = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            (w(0), w(1))
        });
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&(n + 1).to_le_bytes());
        v[8..].copy_from_slice(&first.to_le_bytes());
        tx.put(TIMER_FIRED, &key, &v);
        Ok(())
    }
    fn on_apply(
        &mut self,
        op: &understudy_runtime::store::Op,
        _before: understudy_runtime::store::Before<'_>,
        _store: &Store,
    ) {
        if let understudy_runtime::store::Op::Put { table, value, .. } = op {
            if *table == FAULT_TABLE && value.len() >= 2 {
                fire_once(value[0], &value[2..], "apply hook");
            }
        }
    }
}

impl TestApp {
    /// Request `k` (8 bytes, then an optional `1` for the v2-only tagged form): registers unit
    /// `k`, updates unit `k - 3`, retires unit `k - 7` (unless `keep`), and touches table 1.
    fn numbered(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        if req.len() < 8 {
            return Err(Refused(b"short request".to_vec()));
        }
        let k = u64::from_le_bytes(req[..8].try_into().unwrap());
        let tagged = req.len() == 9 && req[8] == 1;
        if tagged && (self.version < 2 || !tx.feature_enabled(TAGGED)) {
            return Err(Refused(b"feature `tagged` is disabled".to_vec()));
        }
        let v = if self.version >= 2 {
            tx.write_version(100)
        } else {
            1
        };
        let c = Counter {
            k,
            sum: k * 3,
            tag: if tagged { k } else { 0 },
        };
        tx.register(k, 1, v, encoded(&c, v).unwrap());
        if k >= 3 {
            if let Some(u) = tx.unit(k - 3) {
                let mut old: Counter = decode(u.state, u.state.len() as u16).unwrap();
                old.sum = old.sum.wrapping_add(k);
                tx.update(
                    k - 3,
                    1,
                    u.layout_version,
                    encoded(&old, u.layout_version).unwrap(),
                );
            }
        }
        if k >= 7 && !self.keep {
            tx.retire(k - 7);
        }
        tx.put(1, &(k % 50).to_le_bytes(), &k.to_le_bytes());
        if k % 13 == 0 {
            tx.delete(1, &((k / 13) % 50).to_le_bytes());
        }
        tx.respond(&(k * 2).to_le_bytes());
        Ok(())
    }
}

/// A fault request (`FAULT`, kind, on-standby flag, token): fired here once per token, or left
/// in the store for the standby's apply hook to fire.
fn fault(tx: &mut Tx<'_>, req: &[u8]) {
    let (kind, on_standby, token) = (req[8], req[9] == 1, &req[10..]);
    if on_standby {
        // The standby's apply hook fires it (once: the token).
        tx.put(FAULT_TABLE, b"fault", &req[8..]);
        tx.respond(FAULT_FIRED);
    } else if fire_once(kind, token, "request handler") {
        tx.respond(FAULT_FIRED);
    } else {
        tx.respond(FAULT_SPENT);
    }
}

/// Ledger request: count how many times request `k` was applied (must be once).
fn ledger(tx: &mut Tx<'_>, k: &[u8]) {
    let n = tx.get(LEDGER_TABLE, k).map_or(0, |v| {
        u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]))
    }) + 1;
    tx.put(LEDGER_TABLE, k, &n.to_le_bytes());
    tx.respond(&n.to_le_bytes());
}

/// Per-source counter: how many requests of `tag` were applied. Each client's requests are
/// applied in order, so its n-th answer must say n: a lost or doubly applied request shows at
/// once, with a state that stays small however long the test runs.
fn counter(tx: &mut Tx<'_>, tag: &[u8], read_only: bool) {
    let n = tx.get(COUNTER_TABLE, tag).map_or(0, |v| {
        u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]))
    });
    if read_only {
        tx.respond(&n.to_le_bytes());
    } else {
        tx.put(COUNTER_TABLE, tag, &(n + 1).to_le_bytes());
        tx.respond(&(n + 1).to_le_bytes());
    }
}

/// Writes `n` bytes in records of `BIG_RECORD`; answers "ok", the transaction's encoded
/// length and its limit.
fn big_write(tx: &mut Tx<'_>, n: usize) {
    let chunk = vec![0x5a; BIG_RECORD];
    let mut i = 0u64;
    let mut written = 0usize;
    while written < n {
        let len = BIG_RECORD.min(n - written);
        tx.put(BIG_TABLE, &i.to_le_bytes(), &chunk[..len]);
        written += len;
        i += 1;
    }
    tx.respond(b"ok");
    let (len, limit) = (tx.encoded_len() as u64, tx.limit() as u64);
    tx.respond(&len.to_le_bytes());
    tx.respond(&limit.to_le_bytes());
}

/// Arms `count` timers (u32) spread evenly over `spread` ms (u32), tagged from `first` (u64),
/// each recorded with its deadline in `TIMER_ARMED`.
fn arm_timers(tx: &mut Tx<'_>, args: &[u8]) {
    let count = u32::from_le_bytes(args[0..4].try_into().unwrap_or([0; 4])) as u64;
    let spread_ns = u32::from_le_bytes(args[4..8].try_into().unwrap_or([0; 4])) as u64 * 1_000_000;
    let first = u64::from_le_bytes(args[8..16].try_into().unwrap_or([0; 8]));
    let now = tx.now_ns();
    for i in 0..count {
        let deadline = now + (i + 1) * spread_ns / count.max(1);
        let tag = first + i;
        tx.arm_timer(deadline, tag, tag);
        tx.put(TIMER_ARMED, &tag.to_le_bytes(), &deadline.to_le_bytes());
    }
    tx.respond(&count.to_le_bytes());
}

/// Timer statistics: armed, fired, firings, early, fired twice, overdue, and the latest firing
/// after its deadline (ns).
fn timer_stats(tx: &mut Tx<'_>) {
    let now = tx.now_ns();
    let word =
        |v: &[u8], i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let (mut armed, mut fired, mut firings, mut early, mut twice, mut overdue) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut late_max = 0u64;
    for (tag, d) in tx.store().table(TIMER_ARMED) {
        armed += 1;
        let deadline = word(d, 0);
        match tx.store().get(TIMER_FIRED, tag) {
            Some(f) => {
                fired += 1;
                firings += word(f, 0);
                early += (word(f, 1) < deadline) as u64;
                twice += (word(f, 0) > 1) as u64;
                late_max = late_max.max(word(f, 1).saturating_sub(deadline));
            }
            None => overdue += (deadline < now) as u64,
        }
    }
    for w in [armed, fired, firings, early, twice, overdue, late_max] {
        tx.respond(&w.to_le_bytes());
    }
}

/// Ledger statistics: keys and the sum of their counts.
fn ledger_stats(tx: &mut Tx<'_>) {
    let (mut keys, mut sum) = (0u64, 0u64);
    for (_, v) in tx.store().table(LEDGER_TABLE) {
        keys += 1;
        sum += u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8]));
    }
    tx.respond(&keys.to_le_bytes());
    tx.respond(&sum.to_le_bytes());
}

/// The test application's input in client mode: the shared-memory clients, plus the faults
/// that live in the engine's call path rather than in the handler.
pub struct FaultInput<I: Input> {
    /// The real input.
    pub inner: I,
    /// Panic in `poll` this long after becoming active (a bad release, for upgrade tests).
    pub panic_after_active: Option<Duration>,
    panic_at: Option<Instant>,
}

impl<I: Input> FaultInput<I> {
    pub fn new(inner: I) -> Self {
        FaultInput {
            inner,
            panic_after_active: None,
            panic_at: None,
        }
    }
}

impl<I: Input> Input for FaultInput<I> {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta> {
        if self.panic_at.is_some_and(|t| Instant::now() >= t) {
            panic!("testapp: panicking on purpose (panic_after_active)");
        }
        self.inner.poll(buf)
    }
    fn committed(&mut self, meta: &InputMeta, response: &[u8]) {
        if PANIC_AFTER_COMMIT.swap(false, Ordering::AcqRel) {
            panic!("testapp: fault `panic-after-commit`: the engine committed a transaction and panics before delivering its response, on purpose");
        }
        self.inner.committed(meta, response)
    }
    fn resume(&mut self, store: &Store) {
        self.panic_at = self.panic_after_active.map(|d| Instant::now() + d);
        self.inner.resume(store)
    }
    fn idle(&mut self) {
        self.inner.idle()
    }
    fn take_retired(&mut self) -> Option<u64> {
        self.inner.take_retired()
    }
}

/// Shared counters a child engine writes after each request it starts and commits (the side
/// channel of the kill tests).
pub struct Side {
    _map: memmap2::MmapMut,
    ptr: *const AtomicU64,
}

impl Side {
    pub fn open(path: &Path) -> Side {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        f.set_len(4096).unwrap();
        // SAFETY: a private test file; other processes only access it through atomics.
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        let ptr = map.as_mut_ptr() as *const AtomicU64;
        Side { _map: map, ptr }
    }
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < 512);
        // SAFETY: in bounds of the 4096-byte mapping kept alive by `_map`; aligned.
        unsafe { &*self.ptr.add(i) }
    }
    /// Requests started (handler entered) by the current active.
    pub fn started(&self) -> u64 {
        self.word(0).load(Ordering::Acquire)
    }
    /// Requests whose transaction is committed (reported after commit).
    pub fn committed(&self) -> u64 {
        self.word(1).load(Ordering::Acquire)
    }
    /// CLOCK_MONOTONIC ns of the last commit.
    pub fn last_commit_ns(&self) -> u64 {
        self.word(2).load(Ordering::Acquire)
    }
    /// CLOCK_MONOTONIC ns of the first commit after this engine last became active (0 before).
    pub fn first_commit_ns(&self) -> u64 {
        self.word(3).load(Ordering::Acquire)
    }
    /// The longest time between two consecutive commits since the last call (reset to 0).
    pub fn take_longest_gap_ns(&self) -> u64 {
        self.word(4).swap(0, Ordering::AcqRel)
    }
    /// The workload of the engine using this side file generates no request k >= `limit`
    /// (0 = no limit beyond its `max`): lets a test pace or end a running workload.
    pub fn set_limit(&self, limit: u64) {
        self.word(8).store(limit, Ordering::Release)
    }
    /// The limit set by [`Side::set_limit`].
    pub fn limit(&self) -> u64 {
        self.word(8).load(Ordering::Acquire)
    }
}

/// A deterministic workload: request k is k, one source.
pub struct Workload {
    pub next: u64,
    pub max: u64,
    pub side: Option<Side>,
    pub tagged_every: u64,
    pub pace: Duration,
    /// Abort the process this long after becoming active (a bad release, for tests).
    pub crash_after: Option<Duration>,
    crash_at: Option<Instant>,
    last: Instant,
}

impl Workload {
    pub fn new(max: u64, side: Option<Side>) -> Self {
        Workload {
            next: 0,
            max,
            side,
            tagged_every: 0,
            pace: Duration::ZERO,
            crash_after: None,
            crash_at: None,
            last: Instant::now(),
        }
    }
}

impl Input for Workload {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta> {
        if self.crash_at.is_some_and(|t| Instant::now() >= t) {
            eprintln!("testapp: crashing on purpose (crash_after)");
            std::process::abort();
        }
        if self.next >= self.max {
            return None;
        }
        if let Some(s) = &self.side {
            let limit = s.limit();
            if limit != 0 && self.next >= limit {
                return None;
            }
        }
        if !self.pace.is_zero() {
            if self.last.elapsed() < self.pace {
                return None;
            }
            self.last = Instant::now();
        }
        let k = self.next;
        buf.clear();
        buf.extend_from_slice(&k.to_le_bytes());
        if self.tagged_every > 0 && k % self.tagged_every == 0 {
            buf.push(1);
        }
        if let Some(s) = &self.side {
            s.word(0).store(k + 1, Ordering::Release);
        }
        self.next += 1;
        Some(InputMeta {
            source: 1,
            request_seq: k,
            next_pos: k + 1,
            next_seq: k + 1,
        })
    }
    fn committed(&mut self, meta: &InputMeta, _response: &[u8]) {
        if let Some(s) = &self.side {
            // Commit times, so benchmarks can measure pauses from inside the engine.
            let now = understudy_runtime::control::monotonic_ns();
            let last = s.word(2).swap(now, Ordering::AcqRel);
            if s.word(3).load(Ordering::Relaxed) == 0 {
                s.word(3).store(now, Ordering::Release);
            } else if now - last > s.word(4).load(Ordering::Relaxed) {
                s.word(4).fetch_max(now - last, Ordering::AcqRel);
            }
            s.word(1).store(meta.next_pos, Ordering::Release);
        }
    }
    fn resume(&mut self, store: &Store) {
        self.crash_at = self.crash_after.map(|d| Instant::now() + d);
        self.next = SourcePosition::all(store)
            .into_iter()
            .find(|(id, _)| *id == 1)
            .map_or(0, |(_, p)| p.next_pos);
        if let Some(s) = &self.side {
            s.word(3).store(0, Ordering::Release);
            s.word(0).store(self.next, Ordering::Release);
            s.word(1).store(self.next, Ordering::Release);
        }
    }
}

/// The digest after exactly the first `k` requests of the workload, computed with the same
/// handler on a local store (memoised incrementally by the caller through `Model`).
pub struct Model {
    pub app: TestApp,
    pub store: Store,
    pub k: u64,
    pub tagged_every: u64,
    /// From request index `.0` on, run the handler with the feature set `.1` enabled (the
    /// point of the stream where an engine's FEATURES frame switched it).
    pub enabled_from: Option<(u64, u64)>,
}

impl Model {
    pub fn new(version: u32) -> Self {
        Model {
            app: TestApp::new(version),
            store: Store::new(),
            k: 0,
            tagged_every: 0,
            enabled_from: None,
        }
    }
    pub fn advance_to(&mut self, k: u64) -> u64 {
        assert!(k >= self.k, "model cannot go back from {} to {k}", self.k);
        while self.k < k {
            let mut req = self.k.to_le_bytes().to_vec();
            if self.tagged_every > 0 && self.k % self.tagged_every == 0 {
                req.push(1);
            }
            let meta = InputMeta {
                source: 1,
                request_seq: self.k,
                next_pos: self.k + 1,
                next_seq: self.k + 1,
            };
            let enabled = match self.enabled_from {
                Some((from, set)) if self.k >= from => set,
                _ => 0,
            };
            execute_local(&mut self.app, &mut self.store, enabled, &meta, &req);
            self.k += 1;
        }
        self.store.digest()
    }
}

/// Settings of a test engine process, from its command line.
#[derive(Debug, Clone)]
pub struct EngineArgs {
    /// Cluster directory.
    pub dir: std::path::PathBuf,
    /// Slot index.
    pub slot: usize,
    /// Never start as the first active.
    pub standby_only: bool,
    /// Ring capacity.
    pub ring: usize,
    /// Requests to generate in all (self-driving workload).
    pub max: u64,
    /// Pace between generated requests.
    pub pace: Duration,
    /// Side-channel file.
    pub side: Option<std::path::PathBuf>,
    /// Every n-th request is tagged (needs the feature).
    pub tagged_every: u64,
    /// Crash (abort) this long after becoming active (acceptance-failure tests).
    pub crash_after_active: Option<Duration>,
    /// Serve shared-memory clients instead of the self-driving workload.
    pub clients: bool,
    /// Spin when idle (lowest latency; burns a core).
    pub spin: bool,
    /// Allocate and touch this many MiB before running (a large process, for step-up benches).
    pub ballast_mib: u64,
    /// Never retire units ([`TestApp::keep`]).
    pub keep: bool,
    /// Client mode: panic this long after becoming active (upgrade-rollback tests).
    pub panic_after_active: Option<Duration>,
}

/// Parse `--dir D --slot a|b|c [--standby] [--ring N] [--max N] [--pace-us N] [--side P]
/// [--tagged-every N] [--keep] [--ballast-mib N] [--clients] [--spin]
/// [--panic-after-active-ms N]`; also reads `UNDERSTUDY_DIR` /
/// `UNDERSTUDY_SLOT` / `UNDERSTUDY_STANDBY` (what the supervisor sets).
pub fn parse_engine_args(args: &[String]) -> Result<EngineArgs, String> {
    let mut a = EngineArgs {
        dir: std::env::var("UNDERSTUDY_DIR").unwrap_or_default().into(),
        slot: std::env::var("UNDERSTUDY_SLOT")
            .ok()
            .and_then(|s| understudy_runtime::control::slot_index(&s))
            .unwrap_or(0),
        standby_only: std::env::var("UNDERSTUDY_STANDBY").is_ok_and(|v| v == "1"),
        ring: std::env::var("UNDERSTUDY_RING")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1 << 20),
        max: u64::MAX,
        pace: Duration::ZERO,
        side: None,
        tagged_every: 0,
        crash_after_active: std::env::var("TESTAPP_CRASH_AFTER_ACTIVE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
        clients: std::env::var("UNDERSTUDY_CLIENTS").is_ok_and(|v| v == "1"),
        spin: std::env::var("UNDERSTUDY_SPIN").is_ok_and(|v| v == "1"),
        ballast_mib: 0,
        keep: false,
        panic_after_active: std::env::var("TESTAPP_PANIC_AFTER_ACTIVE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis),
    };
    let mut it = args.iter();
    while let Some(k) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name}: expected a value, found the end of the arguments"))
        };
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name}: expected a number, found `{v}`"))
        };
        match k.as_str() {
            "--dir" => a.dir = val("--dir")?.into(),
            "--slot" => {
                let v = val("--slot")?;
                a.slot = understudy_runtime::control::slot_index(&v)
                    .ok_or_else(|| format!("--slot: expected a, b or c, found `{v}`"))?
            }
            "--standby" => a.standby_only = true,
            "--clients" => a.clients = true,
            "--spin" => a.spin = true,
            "--keep" => a.keep = true,
            "--ballast-mib" => a.ballast_mib = num("--ballast-mib", val("--ballast-mib")?)?,
            "--ring" => a.ring = num("--ring", val("--ring")?)? as usize,
            "--max" => a.max = num("--max", val("--max")?)?,
            "--pace-us" => a.pace = Duration::from_micros(num("--pace-us", val("--pace-us")?)?),
            "--side" => a.side = Some(val("--side")?.into()),
            "--tagged-every" => a.tagged_every = num("--tagged-every", val("--tagged-every")?)?,
            "--panic-after-active-ms" => {
                a.panic_after_active = Some(Duration::from_millis(num(
                    "--panic-after-active-ms",
                    val("--panic-after-active-ms")?,
                )?))
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if a.dir.as_os_str().is_empty() {
        return Err("--dir: expected the cluster directory (or UNDERSTUDY_DIR), found none".into());
    }
    Ok(a)
}

/// The `main` of the test engine executables when `main` cannot return (a multi-call
/// binary): [`engine_process`], then exit with its status.
pub fn engine_main(version: u32) -> ! {
    std::process::exit(engine_process(version) as i32)
}

/// The body of the test engine executables' `main`, which returns what this returns: the
/// engine runs on a thread of its own, and this (the main thread) waits for it to end — or for
/// a [`Fault::ReturnFromMain`], when it returns 0 at once and `main` returns with the engine
/// still running, the way an application's `main` may end while its threads work.
///
/// A panic that ends the engine's thread is resumed here, so it ends `main` as if the engine
/// had run on the main thread.
pub fn engine_process(version: u32) -> u8 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    engine_process_with(version, &args)
}

/// The variable that carries the test engine's arguments, one per line, to a test binary that
/// re-executes itself as a test engine (a package's integration tests only get the executables
/// of their own package, so the runtime's tests run the engine this way).
pub const ENGINE_ARGS_VAR: &str = "UNDERSTUDY_TESTAPP_ARGS";

/// [`engine_process`] with these arguments instead of the process's own.
pub fn engine_process_with(version: u32, args: &[String]) -> u8 {
    understudy_runtime::init_logging();
    let a = match parse_engine_args(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("testapp-v{version}: {e}");
            return 2;
        }
    };
    let _ = MAIN_THREAD.set(std::thread::current());
    let engine = std::thread::Builder::new()
        .name("engine".into())
        .stack_size(8 << 20)
        .spawn(move || {
            let code = run_engine(version, a);
            if let Some(t) = MAIN_THREAD.get() {
                t.unpark();
            }
            code
        });
    let engine = match engine {
        Ok(h) => h,
        Err(e) => {
            eprintln!("testapp-v{version}: cannot start the engine thread: {e}");
            return 3;
        }
    };
    loop {
        if RETURN_FROM_MAIN.load(Ordering::Acquire) {
            eprintln!("testapp-v{version}: main returns on purpose, the engine still running");
            return 0;
        }
        if engine.is_finished() {
            return match engine.join() {
                Ok(code) => code,
                Err(panic) => std::panic::resume_unwind(panic),
            };
        }
        std::thread::park_timeout(Duration::from_millis(50));
    }
}

fn run_engine(version: u32, a: EngineArgs) -> u8 {
    // Touch every page so the memory is resident (the kernel tears it all down at exit).
    let mut ballast = vec![0u8; (a.ballast_mib as usize) << 20];
    for b in ballast.iter_mut().step_by(4096) {
        *b = 1;
    }
    std::hint::black_box(&mut ballast);
    let mut opt = understudy_runtime::Options::new(a.dir.clone(), a.slot);
    opt.standby_only = a.standby_only;
    opt.ring_capacity = a.ring;
    if a.spin {
        opt.idle = understudy_runtime::Idle::SPIN;
    }
    let fail = |e: &dyn std::fmt::Display| -> u8 {
        eprintln!("testapp-v{version}: {e}");
        3
    };
    if let Err(e) = opt.apply_env() {
        return fail(&e);
    }

    let result = if a.clients {
        let input = match understudy_runtime::client::ClientInput::new(&a.dir) {
            Ok(i) => i,
            Err(e) => return fail(&e),
        };
        let mut input = FaultInput::new(input);
        input.panic_after_active = a.panic_after_active;
        match understudy_runtime::Engine::new(TestApp::new(version), input, opt) {
            Ok(engine) => engine.run(),
            Err(e) => return fail(&e),
        }
    } else {
        let mut input = Workload::new(a.max, a.side.as_deref().map(Side::open));
        input.pace = a.pace;
        input.tagged_every = a.tagged_every;
        input.crash_after = a.crash_after_active;
        let mut app = TestApp::new(version);
        app.keep = a.keep;
        match understudy_runtime::Engine::new(app, input, opt) {
            Ok(engine) => engine.run(),
            Err(e) => return fail(&e),
        }
    };
    match result {
        Ok(_) => 0,
        Err(e) => fail(&e),
    }
}

/// A handler that reads, changes and writes back 4 work units (ids `4k .. 4k+3` modulo
/// `units`, each holding a [`CounterV1`]) per request `k` (8 bytes LE), optionally also
/// replacing one of 8 records of table `table`, and answers `k`: the shape of a matching
/// engine filling an order against resting ones. Used by the replication benchmark and the
/// allocation test.
pub struct Update4 {
    /// Work units the store holds (see [`Update4::store`]).
    pub units: u64,
    /// Also put a record into this table.
    pub table: Option<u16>,
}

impl Update4 {
    /// Updates per request.
    pub const UPDATES: u64 = 4;

    /// A store holding the units this handler updates.
    pub fn store(&self) -> Store {
        let mut store = Store::new();
        for id in 0..self.units {
            let c = CounterV1 { k: 0, sum: id };
            let state = encoded(&c, 1).expect("v1").to_vec();
            let unit = understudy_runtime::store::Unit {
                kind: 1,
                layout_version: 1,
                state,
            };
            store.put_unit(id, unit);
        }
        store
    }
}

impl Application for Update4 {
    fn name(&self) -> &str {
        "update4"
    }
    fn version(&self) -> u32 {
        1
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        vec![TemplateInfo::of::<CounterV1>()]
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        let k = req
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Refused(b"expected an 8-byte request".to_vec()))?;
        for i in 0..Self::UPDATES {
            let id = (k * Self::UPDATES + i) % self.units;
            let u = tx
                .unit(id)
                .ok_or_else(|| Refused(b"no such unit".to_vec()))?;
            let (kind, layout) = (u.kind, u.layout_version);
            let mut c: CounterV1 = decode(u.state, u.state.len() as u16)
                .map_err(|_| Refused(b"bad state".to_vec()))?;
            c.k = k;
            c.sum = c.sum.wrapping_add(k);
            tx.update(id, kind, layout, encoded(&c, 1).expect("v1"));
        }
        if let Some(t) = self.table {
            tx.put(t, &(k % 8).to_le_bytes(), &k.to_le_bytes());
        }
        tx.respond(&k.to_le_bytes());
        Ok(())
    }
}
