//! A test application in two versions, a deterministic workload, and helpers to run engines
//! as real child processes of the test binary, on the workspace's one harness
//! (`understudy-test-support`).
// Each test binary uses a part of this module.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
pub use understudy_test_support::cluster::{
    dump, role, state, switchover, wait_cluster, Engines as Cluster,
};
pub use understudy_test_support::wait_until;
pub use understudy_testkit::*;

/// Engines of this test binary: the binary re-executes itself as an ignored test that runs
/// [`child_main`].
pub trait TestEngines {
    /// Start an engine child in `slot`: `version`, `max` requests (0 = standby only: it never
    /// starts as active unless it steps up; the workload continues after step-up up to `max`).
    fn spawn(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    );

    /// Like [`TestEngines::spawn`], with the child's stderr captured for `wait_exit`.
    fn spawn_capturing_stderr(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    );

    /// Start the test engine v1 serving clients (`understudy-testapp-v1 --clients`) in `slot`,
    /// with `env`; the test binary must have a `testapp_engine` test (see [`engine_command`]).
    fn spawn_testapp(&mut self, slot: usize, standby: bool, env: &[(&str, &str)]);
}

impl TestEngines for Cluster {
    fn spawn(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    ) {
        let mut cmd = command(
            &self.dir,
            test_bin_filter,
            slot,
            version,
            max,
            standby_only,
            extra,
        );
        self.start(slot, &mut cmd);
    }

    fn spawn_capturing_stderr(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    ) {
        let mut cmd = command(
            &self.dir,
            test_bin_filter,
            slot,
            version,
            max,
            standby_only,
            extra,
        );
        cmd.stderr(Stdio::piped());
        self.start(slot, &mut cmd);
    }

    fn spawn_testapp(&mut self, slot: usize, standby: bool, env: &[(&str, &str)]) {
        let mut args = self.engine_args(slot, standby);
        args.push("--clients".to_string());
        let mut c = engine_command(&args);
        // Debug builds on 2 shared cores: a standby can be descheduled for tens of ms.
        c.env("RUST_LOG", std::env::var("US_LOG").unwrap_or("warn".into()))
            .env("UNDERSTUDY_BACKPRESSURE_MS", "500")
            // Hang detection is not under test here: a starved debug engine must not be fenced.
            .env("UNDERSTUDY_HUNG_MS", "10000")
            .stdout(Stdio::null());
        if std::env::var("US_VERBOSE").is_err() {
            c.stderr(Stdio::null());
        }
        for (k, v) in env {
            c.env(k, v);
        }
        self.start(slot, &mut c);
    }
}

/// The test engine v1 (`understudy-testapp-v1 <args>`), run by this test binary re-executing
/// itself as its `testapp_engine` test: an integration test only gets its own package's
/// executables, and the test engines live in the testkit crate.
pub fn engine_command(args: &[String]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("current_exe"));
    c.args([
        "--exact",
        "testapp_engine",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(understudy_testkit::ENGINE_ARGS_VAR, args.join("\n"));
    c
}

fn command(
    dir: &Path,
    test_bin_filter: &str,
    slot: usize,
    version: u32,
    max: u64,
    standby_only: bool,
    extra: &[(&str, String)],
) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        test_bin_filter,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("US_CHILD", "1")
    .env("US_DIR", dir)
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
    cmd
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
    // Hang detection is not what these tests exercise; on a loaded 2-CPU host a healthy debug
    // build can be descheduled for hundreds of ms, so only fence after seconds by default.
    opt.hung_after =
        Duration::from_millis(std::env::var("US_HUNG_MS").map_or(5000, |ms| ms.parse().unwrap()));
    // A standby of a debug build on 2 shared CPUs can be descheduled for tens of ms: wait
    // half a second for it before untethering, unless a test asks otherwise.
    opt.backpressure = understudy_runtime::Backpressure::Wait(Duration::from_millis(
        std::env::var("US_BACKPRESSURE_MS").map_or(500, |ms| ms.parse().unwrap()),
    ));
    let mut app = TestApp::new(version);
    app.keep = std::env::var("US_KEEP").is_ok_and(|v| v == "1");
    if std::env::var("US_ON_PANIC").is_ok_and(|v| v == "unwind") {
        opt.on_panic = understudy_runtime::OnPanic::Unwind;
    }
    if let Ok(n) = std::env::var("US_PANIC_AFTER") {
        // A panic on the engine thread after `n` requests taken as active.
        let input = PanicAfter {
            inner: input,
            left: n.parse().unwrap(),
        };
        let engine = understudy_runtime::Engine::new(app, input, opt).unwrap();
        let _ = engine.run();
        unreachable!("the engine panics before it stops");
    }
    let engine = understudy_runtime::Engine::new(app, input, opt).unwrap();
    match engine.run() {
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("engine error: {e}");
            std::process::exit(3)
        }
    }
}

/// An input that panics on the engine thread once it has handed out `left` requests.
struct PanicAfter<I> {
    inner: I,
    left: u64,
}

impl<I: understudy_runtime::Input> understudy_runtime::Input for PanicAfter<I> {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<understudy_runtime::InputMeta> {
        let meta = self.inner.poll(buf)?;
        if self.left == 0 {
            panic!("test: a panic on the engine thread while active");
        }
        self.left -= 1;
        Some(meta)
    }
    fn committed(&mut self, meta: &understudy_runtime::InputMeta, response: &[u8]) {
        self.inner.committed(meta, response)
    }
    fn resume(&mut self, store: &understudy_runtime::store::Store) {
        self.inner.resume(store)
    }
    fn idle(&mut self) {
        self.inner.idle()
    }
    fn take_retired(&mut self) -> Option<u64> {
        self.inner.take_retired()
    }
}

/// Engine logs on stderr when `US_VERBOSE` is set (children inherit stderr then).
fn tracing_subscriber_init() -> Result<(), ()> {
    if std::env::var("US_VERBOSE").is_err() {
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|_| ())
}

/// Stop the workload behind `side` where it is, then let it run `more` requests past what it
/// started; returns the total it will have started. Reading `started` and setting a limit
/// past it while the workload runs is a race: a test thread preempted in between lets the
/// workload run past the limit it then sets.
pub fn extend_workload(side: &Side, more: u64) -> u64 {
    side.set_limit(1);
    // At most the request in flight when the limit was set still starts.
    wait_until("the workload pauses", Duration::from_secs(20), || {
        let s = side.started();
        std::thread::sleep(Duration::from_millis(2));
        side.committed() == s && side.started() == s
    });
    let end = side.started() + more;
    side.set_limit(end);
    end
}
