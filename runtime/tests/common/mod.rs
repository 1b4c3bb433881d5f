//! A test application in two versions, a deterministic workload, and helpers to run engines
//! as real child processes of the test binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use understudy_runtime::control::{Control, Field, Role, State};
pub use understudy_runtime::testkit::*;

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
