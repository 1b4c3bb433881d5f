//! A test application in two versions, a deterministic workload, and helpers to run engines
//! as real child processes of the test binary.
#![allow(dead_code)]

use shm_layout::record::{decode, encoded, Record, TemplateInfo};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use understudy_runtime::control::{Control, Field, Role, State};
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

/// Feature 0, "tagged", needs Counter layout 2.
pub const TAGGED: u16 = 0;

/// Requests: 8-byte k (a normal transaction) or 9 bytes with a trailing 1: a "tagged" request
/// that needs the v2 feature.
pub struct TestApp {
    pub version: u32,
    pub name: String,
}

impl TestApp {
    pub fn new(version: u32) -> Self {
        TestApp {
            version,
            name: "testapp".into(),
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
                let mut old: Counter = decode(&u.state, u.state.len() as u16).unwrap();
                old.sum = old.sum.wrapping_add(k);
                tx.update(
                    k - 3,
                    1,
                    u.layout_version,
                    encoded(&old, u.layout_version).unwrap(),
                );
            }
        }
        if k >= 7 {
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
        let mut map = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        let ptr = map.as_mut_ptr() as *const AtomicU64;
        Side { _map: map, ptr }
    }
    fn word(&self, i: usize) -> &AtomicU64 {
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
}

/// A deterministic workload: request k is k, one source.
pub struct Workload {
    pub next: u64,
    pub max: u64,
    pub side: Option<Side>,
    pub tagged_every: u64,
    pub pace: Duration,
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
            last: Instant::now(),
        }
    }
}

impl Input for Workload {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta> {
        if self.next >= self.max {
            return None;
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
            s.word(1).store(meta.next_pos, Ordering::Release);
        }
    }
    fn resume(&mut self, store: &Store) {
        self.next = SourcePosition::all(store)
            .into_iter()
            .find(|(id, _)| *id == 1)
            .map_or(0, |(_, p)| p.next_pos);
        if let Some(s) = &self.side {
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
}

impl Model {
    pub fn new(version: u32) -> Self {
        Model {
            app: TestApp::new(version),
            store: Store::new(),
            k: 0,
            tagged_every: 0,
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
            execute_local(&mut self.app, &mut self.store, 0, &meta, &req);
            self.k += 1;
        }
        self.store.digest()
    }
}

/// A unique cluster directory under /dev/shm, removed (with every engine killed) on drop.
pub struct Cluster {
    pub dir: PathBuf,
    pub children: Vec<(usize, Child)>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cluster {
    pub fn new(tag: &str) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = PathBuf::from(format!(
            "/dev/shm/understudy-test-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Cluster {
            dir,
            children: Vec::new(),
        }
    }

    pub fn control(&self) -> Control {
        Control::open_or_create(&self.dir).unwrap()
    }

    /// Start an engine child in `slot`: `version`, `max` requests (0 = standby only: it never
    /// starts as active unless it steps up; the workload continues after step-up up to `max`).
    pub fn spawn(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    ) {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            test_bin_filter,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("US_CHILD", "1")
        .env("US_DIR", &self.dir)
        .env("US_SLOT", slot.to_string())
        .env("US_VERSION", version.to_string())
        .env("US_MAX", max.to_string())
        .env("US_STANDBY", if standby_only { "1" } else { "0" })
        .stdout(Stdio::null())
        .stderr(if std::env::var("US_VERBOSE").is_ok() {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        self.children.retain(|(s, _)| *s != slot);
        self.children.push((slot, child));
    }

    pub fn kill(&mut self, slot: usize) {
        if let Some(i) = self.children.iter().position(|(s, _)| *s == slot) {
            let (_, mut c) = self.children.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self, slot: usize) -> Option<u32> {
        self.children
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, c)| c.id())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wait (bounded) until `f` is true; panics naming `what` otherwise.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

pub fn role(c: &Control, slot: usize) -> Role {
    Role::from_word(c.get(slot, Field::Role))
}

pub fn state(c: &Control, slot: usize) -> State {
    State::from_word(c.get(slot, Field::State))
}

/// The body of a child engine process (called from an ignored test when US_CHILD is set).
pub fn child_main() {
    if std::env::var("US_CHILD").is_err() {
        return;
    }
    let _ = tracing_subscriber_init();
    let dir = PathBuf::from(std::env::var("US_DIR").unwrap());
    let slot: usize = std::env::var("US_SLOT").unwrap().parse().unwrap();
    let version: u32 = std::env::var("US_VERSION").unwrap().parse().unwrap();
    let max: u64 = std::env::var("US_MAX").unwrap().parse().unwrap();
    let standby_only = std::env::var("US_STANDBY").unwrap() == "1";
    let side = std::env::var("US_SIDE")
        .ok()
        .map(|p| Side::open(Path::new(&p)));
    let mut input = Workload::new(max, side);
    if let Ok(t) = std::env::var("US_TAGGED_EVERY") {
        input.tagged_every = t.parse().unwrap();
    }
    if let Ok(p) = std::env::var("US_PACE_US") {
        input.pace = Duration::from_micros(p.parse().unwrap());
    }
    let mut opt = understudy_runtime::Options::new(dir, slot);
    opt.standby_only = standby_only;
    opt.ring_capacity = std::env::var("US_RING")
        .ok()
        .map_or(1 << 20, |v| v.parse().unwrap());
    if let Ok(c) = std::env::var("US_CHUNK") {
        opt.catchup_chunk = c.parse().unwrap();
    }
    let engine = understudy_runtime::Engine::new(TestApp::new(version), input, opt).unwrap();
    match engine.run() {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("engine error: {e}");
            std::process::exit(3)
        }
    }
}

fn tracing_subscriber_init() -> Result<(), ()> {
    Ok(())
}
