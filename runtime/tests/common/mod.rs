//! A test application in two versions, a deterministic workload, and helpers to run engines
//! as real child processes of the test binary.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use understudy_runtime::control::{Control, Field, Role, State};
pub use understudy_testkit::*;

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
        let cmd = self.command(test_bin_filter, slot, version, max, standby_only, extra);
        self.start(slot, cmd);
    }

    /// Like [`Cluster::spawn`], with the child's stderr captured for [`Cluster::wait_exit`].
    pub fn spawn_capturing_stderr(
        &mut self,
        test_bin_filter: &str,
        slot: usize,
        version: u32,
        max: u64,
        standby_only: bool,
        extra: &[(&str, String)],
    ) {
        let mut cmd = self.command(test_bin_filter, slot, version, max, standby_only, extra);
        cmd.stderr(Stdio::piped());
        self.start(slot, cmd);
    }

    fn start(&mut self, slot: usize, mut cmd: Command) {
        let child = cmd.spawn().unwrap();
        self.children.retain(|(s, _)| *s != slot);
        self.children.push((slot, child));
    }

    fn command(
        &self,
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
        die_with_parent(&mut cmd);
        cmd
    }

    /// Wait (bounded) for the engine in `slot` to exit on its own; its exit status and its
    /// stderr (empty unless started with [`Cluster::spawn_capturing_stderr`]).
    pub fn wait_exit(&mut self, slot: usize, timeout: Duration) -> (ExitStatus, String) {
        let i = self
            .children
            .iter()
            .position(|(s, _)| *s == slot)
            .unwrap_or_else(|| panic!("no engine was started in slot {slot}"));
        let t = Instant::now();
        let status = loop {
            if let Some(st) = self.children[i].1.try_wait().unwrap() {
                break st;
            }
            if t.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for the engine in slot {slot} to exit");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let (_, mut child) = self.children.remove(i);
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        (status, err)
    }

    /// Is the engine started in `slot` still running (not exited, not killed)?
    pub fn running(&mut self, slot: usize) -> bool {
        self.children
            .iter_mut()
            .find(|(s, _)| *s == slot)
            .is_some_and(|(_, c)| c.try_wait().unwrap().is_none())
    }

    /// Send `signal` (e.g. `libc::SIGSTOP`) to the engine in `slot`.
    pub fn signal(&self, slot: usize, signal: i32) {
        let pid = self
            .pid(slot)
            .unwrap_or_else(|| panic!("no engine was started in slot {slot}"));
        // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
        let r = unsafe { libc::kill(pid as i32, signal) };
        assert_eq!(r, 0, "kill({pid}, {signal}) failed");
    }

    /// Freeze the engine in `slot` with SIGSTOP and return only once every one of its threads
    /// is in the stopped state (or dead: a fenced engine executes no more either): `kill`
    /// merely queues the signal, and a process running on the other CPU goes on executing
    /// (and committing) until it is interrupted.
    pub fn stop(&self, slot: usize) {
        self.signal(slot, libc::SIGSTOP);
        let pid = self.pid(slot).expect("signalled above");
        wait_until(
            &format!("engine {slot} (pid {pid}) stopped"),
            Duration::from_secs(20),
            || all_tasks_stopped(pid),
        );
    }

    /// The side channel of the engine in `slot` (a file inside the cluster directory, so it
    /// is removed with it); pass [`Cluster::side_env`] to the engine so it reports there.
    pub fn side(&self, slot: usize) -> Side {
        let _ = self.control(); // creates the directory
        Side::open(&self.side_path(slot))
    }

    /// The environment that makes an engine in `slot` report through [`Cluster::side`].
    pub fn side_env(&self, slot: usize) -> (&'static str, String) {
        ("US_SIDE", self.side_path(slot).display().to_string())
    }

    fn side_path(&self, slot: usize) -> PathBuf {
        self.dir.join(format!("side-{slot}"))
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
        // Side-channel files next to the directory (`<dir>.side-N`): removed after the engines
        // are gone, so none can recreate one.
        if let (Some(parent), Some(name)) = (self.dir.parent(), self.dir.file_name()) {
            let prefix = format!("{}.side-", name.to_string_lossy());
            if let Ok(entries) = std::fs::read_dir(parent) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&prefix) {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
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

/// Every slot's record in one line each (for failure messages).
pub fn dump(c: &Control) -> String {
    let mut s = format!("epoch {}, active slot {:?}\n", c.epoch(), c.active_slot());
    for slot in 0..understudy_runtime::control::SLOTS {
        s += &format!(
            "  slot {slot}: pid {} v{} {} {} commits {} digest {:#x} gen {} layout {} features {} step-ups {} error {}\n",
            c.get(slot, Field::Pid),
            c.get(slot, Field::AppVersion),
            role(c, slot).name(),
            state(c, slot).name(),
            c.get(slot, Field::Commits),
            c.get(slot, Field::Digest),
            c.get(slot, Field::AttachGen),
            c.get(slot, Field::Layout),
            c.get(slot, Field::Features),
            c.get(slot, Field::StepUps),
            c.get(slot, Field::Error),
        );
    }
    s
}

/// [`wait_until`] that shows the cluster's control block when it times out.
pub fn wait_cluster(c: &Control, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}; cluster:\n{}",
                dump(c)
            );
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// The child gets SIGKILL when the thread that spawned it ends: a test binary killed by CI
/// (timeout, Ctrl-C) leaves no engine spinning behind it.
pub fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl, which
    // is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
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

/// Post a planned switchover to `to` and wait for its acknowledgement; returns the result
/// code. (A target that already says it is hot is waited for by the active until the
/// target's acknowledgement reaches it: no retry is needed here.)
pub fn post_switchover(c: &Control, to: usize, what: &str) -> u64 {
    let seq = c.post(understudy_runtime::control::cmd::SWITCHOVER, to as u64);
    wait_until(&format!("{what}: acked"), Duration::from_secs(20), || {
        c.acked().0 == seq
    });
    c.acked().1
}

/// Whether every thread of `pid` is in the stopped state ('T' in field 3 of its stat file).
fn all_tasks_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true; // gone
    };
    let mut any = false;
    for t in tasks.flatten() {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Field 3 follows the parenthesised command name, which may itself hold ')'.
        // Stopped, or dead (zombie, or reaped meanwhile): either way it runs no more.
        let stopped = stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 'Z', 'X']));
        if !stopped {
            return false;
        }
        any = true;
    }
    any
}
