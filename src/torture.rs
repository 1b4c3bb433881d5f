//! `understudy torture`: a fault campaign against a supervised cluster of the test application
//! under client load, and the harness the end-to-end death tests (`tests/deaths.rs`) share.
//!
//! The cluster is two test-application engines (`understudy-testapp-v1`/`-v2`, which serve
//! shared-memory clients with `--clients`) under a real supervisor (`understudy up`, a child
//! process). Load clients each send `COUNTER` requests for a tag of their own, one at a time:
//! the handler answers the tag's new count, so the n-th acknowledged request of a client must
//! be answered n. An answer below that means an acknowledged effect went missing (lost), above
//! it that a request was applied twice (duplicated); at the end each client reads its counter
//! back, which must equal the number of requests it had acknowledged.
//!
//! Deaths that need a cooperating binary (a panic, `exit`, a return from `main`, a real
//! SIGSEGV or SIGBUS, a stack overflow, an allocation failure) are fault requests that the test
//! application recognises ([`understudy_testkit::Fault`]): the active dies in its
//! handler, or the standby in its apply hook, once per token file. Signals (SIGABRT, SIGSEGV,
//! SIGBUS, SIGTERM, SIGKILL) are sent to the engine's pid from the supervisor's status; stalls
//! are SIGSTOP … SIGCONT. Nothing here needs a hook in production code.
//!
//! The engine executables are the runtime's test binaries next to this executable when they
//! exist (`cargo build --release --workspace --bins`), otherwise this very binary under their
//! names (symbolic links in a temporary directory, [`crate::dispatch_multicall`]), so
//! `cargo run --release -- torture` needs nothing else. (Under the multi-call binary a
//! `return-from-main` fault ends the process with `exit(0)` from the main thread after the same
//! path, since `understudy`'s own `main` cannot return on its behalf.)

use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use understudy_runtime::client::Client;
use understudy_supervisor::client::Client as Ctl;
use understudy_supervisor::proto::{
    Code, Op, Reply, Request, StatusReport, UpgradeRequest, SOCKET_NAME,
};
use understudy_testkit::{fault_request, Fault, COUNTER, COUNTER_READ};

/// The two engine executables (application versions 1 and 2).
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Version 1.
    pub v1: PathBuf,
    /// Version 2.
    pub v2: PathBuf,
}

impl Binaries {
    /// The test executables next to `exe` if both exist, otherwise symbolic links to `exe`
    /// named like them in `tmp` (the multi-call binary).
    pub fn find(exe: &Path, tmp: &Path) -> Result<Binaries, String> {
        let dir = exe
            .parent()
            .ok_or_else(|| format!("{}: expected a file in a directory", exe.display()))?;
        let (v1, v2) = (
            dir.join("understudy-testapp-v1"),
            dir.join("understudy-testapp-v2"),
        );
        if v1.is_file() && v2.is_file() {
            return Ok(Binaries { v1, v2 });
        }
        let b = Binaries {
            v1: tmp.join("understudy-testapp-v1"),
            v2: tmp.join("understudy-testapp-v2"),
        };
        for link in [&b.v1, &b.v2] {
            let _ = std::fs::remove_file(link);
            std::os::unix::fs::symlink(exe, link)
                .map_err(|e| format!("{}: {e}", link.display()))?;
        }
        Ok(b)
    }

    /// The executable of application version `v` (1 or 2).
    pub fn version(&self, v: u32) -> &Path {
        if v >= 2 {
            &self.v2
        } else {
            &self.v1
        }
    }
}

/// A signal the driver sends to an engine from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    /// SIGABRT.
    Abrt,
    /// SIGSEGV (sent, not a fault).
    Segv,
    /// SIGBUS (sent).
    Bus,
    /// SIGTERM.
    Term,
    /// SIGKILL (also what the kernel's OOM killer sends).
    Kill,
}

impl Signal {
    /// Every signal.
    pub const ALL: [Signal; 5] = [
        Signal::Abrt,
        Signal::Segv,
        Signal::Bus,
        Signal::Term,
        Signal::Kill,
    ];
    /// The signal number.
    pub fn number(self) -> libc::c_int {
        match self {
            Signal::Abrt => libc::SIGABRT,
            Signal::Segv => libc::SIGSEGV,
            Signal::Bus => libc::SIGBUS,
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Signal::Abrt => "SIGABRT",
            Signal::Segv => "SIGSEGV",
            Signal::Bus => "SIGBUS",
            Signal::Term => "SIGTERM",
            Signal::Kill => "SIGKILL",
        }
    }
}

/// A way for an engine to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Death {
    /// From the inside: a fault request to the test application.
    Fault(Fault),
    /// From the outside: a signal to the engine's pid.
    Signal(Signal),
}

impl Death {
    /// Its name in reports.
    pub fn name(self) -> String {
        match self {
            Death::Fault(f) => f.name().to_string(),
            Death::Signal(s) => format!("kill -{}", s.name()),
        }
    }
}

/// Which engine dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The active (a failover follows).
    Active,
    /// The hot standby.
    Standby,
}

impl Target {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Active => "active",
            Target::Standby => "standby",
        }
    }
}

static COUNTER_ID: AtomicU64 = AtomicU64::new(0);

/// The config of a torture or death-test cluster running `binary`.
fn config_text(name: &str, shm_dir: &Path, binary: &Path, engine_log: &str) -> String {
    format!(
        r#"cluster = "{name}"
shm_dir = "{shm}"
[engine]
binary = "{bin}"
args = ["--clients"]
# Two engines, the load clients and the supervisor share the host's CPUs: spin briefly, then
# sleep between polls.
env = {{ RUST_LOG = "{engine_log}", UNDERSTUDY_IDLE = "2000,20", RUST_BACKTRACE = "0" }}
[timeouts]
heartbeat_ms = 100
[restart]
backoff_initial_ms = 20
backoff_max_ms = 200
crash_loop_window_ms = 1000
crash_loop_max = 50
# Service times on a loaded 2-vCPU machine say nothing about the engine.
[acceptance]
accept_for_ms = 300
max_latency_us_p99 = 60000000
"#,
        shm = shm_dir.display(),
        bin = binary.display(),
    )
}

/// A cluster of two test-application engines under a supervisor (a child process), all of it
/// — engines, supervisor, files — killed and removed on drop.
pub struct Cluster {
    /// Cluster name.
    pub name: String,
    /// Private work directory (config, supervisor log, fault tokens).
    pub work: PathBuf,
    /// The `shm_dir` of the config.
    pub shm_dir: PathBuf,
    /// The cluster directory (`shm_dir/name`).
    pub dir: PathBuf,
    /// The config file.
    pub config: PathBuf,
    /// The supervisor's log (and its engines').
    pub log: PathBuf,
    /// The `understudy` executable.
    pub exe: PathBuf,
    /// The engine executables.
    pub binaries: Binaries,
    supervisor: Option<Child>,
    ctl: Ctl,
    tokens: u64,
}

impl Cluster {
    /// A new cluster `tag-N` running `binaries.v1`, not started yet.
    pub fn new(exe: &Path, tag: &str, engine_log: &str) -> Result<Cluster, String> {
        let n = COUNTER_ID.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("{tag}-{pid}-{n}");
        let work = std::env::temp_dir().join(format!("understudy-{name}"));
        let shm_dir = PathBuf::from(format!("/dev/shm/understudy-{name}"));
        let _ = std::fs::remove_dir_all(&work);
        let _ = std::fs::remove_dir_all(&shm_dir);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let binaries = Binaries::find(exe, &work)?;
        let dir = shm_dir.join(&name);
        let config = work.join("cluster.toml");
        std::fs::write(
            &config,
            config_text(&name, &shm_dir, &binaries.v1, engine_log),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        Ok(Cluster {
            log: work.join("supervisor.log"),
            ctl: Ctl::new(dir.join(SOCKET_NAME)),
            name,
            work,
            shm_dir,
            dir,
            config,
            exe: exe.to_path_buf(),
            binaries,
            supervisor: None,
            tokens: 0,
        })
    }

    /// Starts `understudy up` (appending to the log) and waits until it answers.
    pub fn start_supervisor(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let child = Command::new(&self.exe)
            .arg("up")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting the supervisor ({}): {e}", self.exe.display()))?;
        self.supervisor = Some(child);
        self.wait("the supervisor to answer", START_TIMEOUT, |_| true)?;
        Ok(())
    }

    /// Starts the supervisor and waits for an active engine with a hot standby.
    pub fn up(&mut self) -> Result<StatusReport, String> {
        self.start_supervisor()?;
        self.wait_settled(START_TIMEOUT)
    }

    /// SIGKILLs the supervisor (the engines keep running).
    pub fn kill_supervisor(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The supervisor's status, if it answers.
    pub fn try_status(&self) -> Option<StatusReport> {
        let reply = self.ctl.request(&Request::new(Op::Status), |_| {}).ok()?;
        serde_json::from_value(reply.data).ok()
    }

    /// Sends `op` to the supervisor; its result.
    pub fn request(&self, op: Op) -> Result<Reply, String> {
        self.ctl
            .request(&Request::new(op), |_| {})
            .map_err(|e| e.to_string())
    }

    /// The last `n` lines of the supervisor's log, without terminal colours.
    pub fn log_tail(&self, n: usize) -> String {
        let text = strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default());
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The supervisor's whole log, without terminal colours.
    pub fn log_text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// Polls the status until `done` holds; an error with the last status after `timeout`.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&StatusReport) -> bool,
    ) -> Result<StatusReport, String> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            if let Some(s) = self.try_status() {
                if done(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "waited {timeout:?} for {what}; last status: {}",
                    last.map(|s| brief(&s))
                        .unwrap_or_else(|| "the supervisor did not answer".into())
                ));
            }
            std::thread::sleep(STATUS_POLL_INTERVAL);
        }
    }

    /// Waits for an active engine, a hot standby of its epoch and no operation in progress.
    pub fn wait_settled(&self, timeout: Duration) -> Result<StatusReport, String> {
        self.wait("an active engine and a hot standby", timeout, settled)
    }

    /// A fresh token file for a one-shot fault.
    pub fn token(&mut self) -> Result<PathBuf, String> {
        self.tokens += 1;
        let p = self.work.join(format!("fault-token-{}", self.tokens));
        std::fs::write(&p, b"").map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }

    /// Sends fault `f` for the `target` engine and waits until it has fired (its token file
    /// removed): at once for the active, when the standby applies it for the standby.
    fn fire_fault(&mut self, f: Fault, target: Target, faults: &mut Client) -> Result<(), String> {
        let token = self.token()?;
        let req = fault_request(f, target == Target::Standby, &token);
        let answer = faults
            .call(&req, ANSWER_TIMEOUT)
            .map_err(|e| format!("fault request `{}`: {e}", f.name()))?;
        if answer.is_none() {
            return Err(format!(
                "fault request `{}` to the {} got no answer in {ANSWER_TIMEOUT:?}",
                f.name(),
                target.name()
            ));
        }
        // A standby fires it when it applies the change, a moment after the answer.
        let deadline = Instant::now() + FAULT_FIRE_TIMEOUT;
        while token.exists() && Instant::now() < deadline {
            std::thread::sleep(FAULT_TOKEN_POLL_INTERVAL);
        }
        if token.exists() {
            let _ = std::fs::remove_file(&token);
            return Err(format!(
                "fault `{}` did not fire in {FAULT_FIRE_TIMEOUT:?}: its token is still there",
                f.name()
            ));
        }
        Ok(())
    }

    /// The incident of an active that changed (from `was` to `now`) after a standby's death,
    /// saying whether the log shows it was fenced as hung.
    fn active_changed(&self, death: Death, was: u32, now: u32) -> String {
        format!(
            "after {} of the standby the active changed from pid {} to pid {} ({})",
            death.name(),
            was,
            now,
            if self.log_text().lines().any(|l| {
                l.contains("fencing") && l.split_whitespace().any(|w| w == format!("pid={was}"))
            }) {
                "fenced as hung"
            } else {
                "not fenced: unexplained"
            }
        )
    }

    /// Kills `death` into the `target` engine of a settled cluster and waits for the cluster
    /// to settle again (a failover if the active died; the dead engine restarted as a hot
    /// standby in either case). `faults` is the client that sends fault requests.
    pub fn inflict(
        &mut self,
        death: Death,
        target: Target,
        faults: &mut Client,
    ) -> Result<DeathOutcome, String> {
        let s0 = self.wait_settled(SETTLE_TIMEOUT)?;
        let active = s0.active_engine().ok_or("no active engine")?.clone();
        let standby = s0.hot_standbys().next().ok_or("no hot standby")?.clone();
        let (victim, survivor) = match target {
            Target::Active => (active, standby),
            Target::Standby => (standby, active),
        };
        if victim.pid < 2 {
            return Err(format!(
                "the supervisor reports an impossible pid {} for the {}",
                victim.pid,
                target.name()
            ));
        }
        let t0 = Instant::now();
        match death {
            Death::Fault(f) => self.fire_fault(f, target, faults)?,
            Death::Signal(sig) => {
                let fd = engine_pidfd(victim.pid)?;
                let _ = fd.send_signal(sig.number());
            }
        }
        let s = self.wait(
            &format!(
                "the {} (engine {}, pid {}) to be replaced after {}",
                target.name(),
                victim.slot,
                victim.pid,
                death.name()
            ),
            SETTLE_TIMEOUT,
            |s| settled(s) && s.engines.iter().all(|e| e.pid != victim.pid),
        )?;
        let new_active = s.active_engine().ok_or("no active engine")?;
        let failover = new_active.slot != victim.slot && target == Target::Active;
        if target == Target::Active && new_active.slot != survivor.slot {
            return Err(format!(
                "after {} of the active (engine {}) the new active is engine {}, not the standby {}",
                death.name(),
                victim.slot,
                new_active.slot,
                survivor.slot
            ));
        }
        // After a standby's death the active must stay; if it changed, its standby or the
        // supervisor fenced it as hung meanwhile (on a loaded host) — reported, not hidden.
        let incident = (target == Target::Standby && new_active.pid != survivor.pid)
            .then(|| self.active_changed(death, survivor.pid, new_active.pid));
        Ok(DeathOutcome {
            victim_pid: victim.pid,
            failover: failover || incident.is_some(),
            incident,
            settled_after: t0.elapsed(),
        })
    }

    /// Every engine's pid in the control block (alive or not).
    fn engine_pids(&self) -> Vec<u32> {
        let Ok(c) = understudy_runtime::control::Control::open(&self.dir) else {
            return Vec::new();
        };
        (0..understudy_runtime::control::SLOTS)
            .filter_map(|slot| {
                let pid = c.get(slot, understudy_runtime::control::Field::Pid);
                let st = c.get(slot, understudy_runtime::control::Field::StartTime);
                let id = understudy_runtime::liveness::ProcessIdentity {
                    pid: pid.min(u32::MAX as u64) as u32,
                    start_time_ticks: st,
                };
                (pid > 1 && id.is_alive()).then_some(id.pid)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A stopped engine would never see SIGKILL's effect on the others: continue all first.
        let pids = self.engine_pids();
        for &pid in &pids {
            // SAFETY: kill(2) of this cluster's engines (identity checked above).
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
        if self.supervisor.is_some() {
            let ctl = self.ctl.clone();
            let h = std::thread::spawn(move || ctl.request(&Request::new(Op::Down), |_| {}));
            let t = Instant::now();
            while !h.is_finished() && t.elapsed() < DOWN_TIMEOUT {
                std::thread::sleep(DOWN_POLL_INTERVAL);
            }
        }
        for pid in self.engine_pids() {
            // SAFETY: as above.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        self.kill_supervisor();
        let _ = std::fs::remove_dir_all(&self.shm_dir);
        if std::env::var_os("UNDERSTUDY_TORTURE_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
    }
}

/// What followed a death.
#[derive(Debug, Clone)]
pub struct DeathOutcome {
    /// The pid of the engine that died.
    pub victim_pid: u32,
    /// The standby stepped up.
    pub failover: bool,
    /// Something that should not follow this death did: the active changed after the death
    /// of the standby.
    pub incident: Option<String>,
    /// From the death's start to a settled cluster.
    pub settled_after: Duration,
}

/// An active engine, a hot standby of its epoch, and no operation in progress.
pub fn settled(s: &StatusReport) -> bool {
    s.active_engine().is_some() && s.hot_standbys().count() >= 1 && s.operation.is_none()
}

fn brief(s: &StatusReport) -> String {
    let engines: Vec<String> = s
        .engines
        .iter()
        .map(|e| {
            format!(
                "{}: pid {} {} {} epoch {} v{}",
                e.slot, e.pid, e.role, e.state, e.epoch, e.app_version
            )
        })
        .collect();
    format!(
        "epoch {}, active {:?}, operation {:?}, crash-looping {:?}, engines [{}]",
        s.epoch,
        s.active,
        s.operation,
        s.crash_looping,
        engines.join("; ")
    )
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

// ------------------------------------------------------------------------------------ load

/// What the load clients saw, shared with the driver.
#[derive(Debug, Default)]
struct LoadShared {
    acked: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    /// The longest wait since the driver last took it, ns.
    window_wait_ns: AtomicU64,
    longest_wait_ns: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl LoadShared {
    /// Records a client's error for the report.
    fn error(&self, e: String) {
        self.errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e)
    }
}

/// Load clients: each sends `COUNTER` requests for its own tag, one at a time, and checks
/// every answer against its own count.
pub struct Load {
    stop: Arc<AtomicBool>,
    shared: Arc<LoadShared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The load's totals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadTotals {
    /// Requests acknowledged.
    pub acknowledged: u64,
    /// Acknowledged effects missing (an answer lower than the client's count, or a final
    /// counter below what was acknowledged).
    pub lost: u64,
    /// Requests applied twice (an answer above the count, or a final counter above it).
    pub duplicated: u64,
    /// The longest time a client waited for an answer, ms.
    pub longest_wait_ms: f64,
    /// Errors the clients met (connection, a request unanswered for 60 s).
    pub errors: Vec<String>,
}

impl Load {
    /// Starts `clients` load clients on the cluster directory `dir`, each pausing `pace`
    /// between requests.
    pub fn start(dir: &Path, clients: usize, pace: Duration) -> Result<Load, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(LoadShared::default());
        let mut threads = Vec::new();
        for i in 0..clients {
            let client =
                Client::connect(dir).map_err(|e| format!("load client {i}: connect: {e}"))?;
            let (stop, shared) = (stop.clone(), shared.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("load-{i}"))
                    .spawn(move || load_client(client, &stop, &shared, pace))
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(Load {
            stop,
            shared,
            threads,
        })
    }

    /// Requests acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Acquire)
    }

    /// Lost and duplicated so far.
    pub fn anomalies(&self) -> (u64, u64) {
        (
            self.shared.lost.load(Ordering::Acquire),
            self.shared.duplicated.load(Ordering::Acquire),
        )
    }

    /// The longest wait since the last call, ms.
    pub fn take_window_wait_ms(&self) -> f64 {
        self.shared.window_wait_ns.swap(0, Ordering::AcqRel) as f64 / 1e6
    }

    /// Waits until every client has had `n` more requests acknowledged (progress after an
    /// event), up to `timeout`.
    pub fn wait_progress(&self, n: u64, timeout: Duration) -> Result<(), String> {
        let from = self.acked();
        let deadline = Instant::now() + timeout;
        while self.acked() < from + n * self.threads.len() as u64 {
            if Instant::now() >= deadline {
                return Err(format!(
                    "the load clients had {} requests acknowledged in {timeout:?}, expected {}",
                    self.acked() - from,
                    n * self.threads.len() as u64
                ));
            }
            std::thread::sleep(PROGRESS_POLL_INTERVAL);
        }
        Ok(())
    }

    /// Stops the clients (each reads its counter back first) and returns the totals.
    pub fn finish(self) -> LoadTotals {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            if t.join().is_err() {
                self.shared
                    .errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push("a load client panicked".into());
            }
        }
        let s = &self.shared;
        LoadTotals {
            acknowledged: s.acked.load(Ordering::Acquire),
            lost: s.lost.load(Ordering::Acquire),
            duplicated: s.duplicated.load(Ordering::Acquire),
            longest_wait_ms: s.longest_wait_ns.load(Ordering::Acquire) as f64 / 1e6,
            errors: s.errors.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// How long the supervisor may take to answer after it starts, a new cluster to settle, and
/// the load to show its first progress.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a cluster may take to settle again after an event (a death, a restart, an
/// upgrade step) on a loaded 2-core host, and the load to show progress after it.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fault's token file may stay after its request was answered (a standby fires
/// the fault when it applies the change) before the fault counts as not fired.
const FAULT_FIRE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the token file of a fault is looked at.
const FAULT_TOKEN_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How often a wait asks the supervisor for its status.
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How often a wait for the load's progress looks again.
const PROGRESS_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// How long `understudy down` may take at teardown before everything is killed.
const DOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the teardown looks whether `understudy down` has returned.
const DOWN_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// The default pause of each load client between two requests.
const PACE_DEFAULT: Duration = Duration::from_micros(200);

/// How long a client waits for one answer before it counts the request as unanswered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

fn load_client(mut client: Client, stop: &AtomicBool, shared: &LoadShared, pace: Duration) {
    let tag = client.id().to_le_bytes();
    let mut req = COUNTER.to_vec();
    req.extend_from_slice(&tag);
    let mut count = 0u64;
    while !stop.load(Ordering::Acquire) {
        let t = Instant::now();
        let n = match client.call(&req, ANSWER_TIMEOUT) {
            Ok(Some(r)) => match count_in(r) {
                Ok(n) => n,
                Err(e) => return shared.error(format!("client {:x}: {e}", client.id())),
            },
            Ok(None) => {
                return shared.error(format!(
                    "client {:x}: request {} unanswered after {ANSWER_TIMEOUT:?}",
                    client.id(),
                    count + 1
                ))
            }
            Err(e) => return shared.error(format!("client {:x}: {e}", client.id())),
        };
        let waited = t.elapsed().as_nanos() as u64;
        shared.window_wait_ns.fetch_max(waited, Ordering::AcqRel);
        shared.longest_wait_ns.fetch_max(waited, Ordering::AcqRel);
        check_count(shared, client.id(), count + 1, n);
        count = n;
        shared.acked.fetch_add(1, Ordering::AcqRel);
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
    }
    final_read(&mut client, shared, count);
}

/// The count an answer of the test application's counter holds.
fn count_in(r: Vec<u8>) -> Result<u64, String> {
    r.get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or_else(|| format!("expected an 8-byte count, found {} bytes", r.len()))
}

/// Request `expected` of client `id` was answered `n`: fewer is lost effects, more is
/// duplicated ones; either is counted and reported.
fn check_count(shared: &LoadShared, id: u64, expected: u64, n: u64) {
    if n < expected {
        shared.lost.fetch_add(expected - n, Ordering::AcqRel);
        shared.error(format!(
            "client {id:x}: request {expected} answered {n}: {} acknowledged effects missing",
            expected - n
        ));
    } else if n > expected {
        shared.duplicated.fetch_add(n - expected, Ordering::AcqRel);
        shared.error(format!(
            "client {id:x}: request {expected} answered {n}: applied {} times too many",
            n - expected
        ));
    }
}

/// The counter read back must equal the `count` every answer confirmed.
fn final_read(client: &mut Client, shared: &LoadShared, count: u64) {
    let mut read = COUNTER_READ.to_vec();
    read.extend_from_slice(&client.id().to_le_bytes());
    match client.call(&read, ANSWER_TIMEOUT) {
        Ok(Some(r)) => match count_in(r) {
            Ok(n) if n < count => {
                shared.lost.fetch_add(count - n, Ordering::AcqRel);
                shared.error(format!(
                    "client {:x}: final counter {n}, {count} acknowledged",
                    client.id()
                ))
            }
            Ok(n) if n > count => {
                shared.duplicated.fetch_add(n - count, Ordering::AcqRel);
                shared.error(format!(
                    "client {:x}: final counter {n}, {count} acknowledged",
                    client.id()
                ))
            }
            Ok(_) => {}
            Err(e) => shared.error(format!("client {:x}: final read: {e}", client.id())),
        },
        Ok(None) => shared.error(format!(
            "client {:x}: final read unanswered after {ANSWER_TIMEOUT:?}",
            client.id()
        )),
        Err(e) => shared.error(format!("client {:x}: final read: {e}", client.id())),
    }
}

// ------------------------------------------------------------------------------- campaign

/// Settings of a torture run.
#[derive(Debug, Clone)]
pub struct TortureOptions {
    /// Events to apply.
    pub events: u64,
    /// Seed of the event sequence.
    pub seed: u64,
    /// Load clients.
    pub clients: usize,
    /// Pause of each load client between requests.
    pub pace: Duration,
    /// The `understudy` executable (it starts the supervisor).
    pub exe: PathBuf,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Leave out the events whose kind (as the table names it) contains one of these.
    pub skip: Vec<String>,
}

impl TortureOptions {
    /// Defaults, with `exe` the `understudy` executable.
    pub fn new(exe: PathBuf, events: u64) -> Self {
        TortureOptions {
            events,
            seed: 1,
            clients: 2,
            pace: PACE_DEFAULT,
            exe,
            progress: false,
            skip: Vec::new(),
        }
    }
}

/// Per kind of event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindStats {
    /// Events of this kind.
    pub count: u64,
    /// Failovers they caused (the standby stepped up).
    pub failovers: u64,
    /// Operations the supervisor declined, undid or failed, after which the cluster served
    /// again with a hot standby (an upgrade aborted or rolled back, a switchover refused, or
    /// one whose old active was fenced as hung in the middle).
    pub refused: u64,
    /// Deaths followed by something that should not follow them (the active changed after
    /// the standby's death: fenced as hung meanwhile).
    pub incidents: u64,
    /// The longest time a client waited for an answer around one of them, ms.
    pub longest_wait_ms: f64,
}

/// What a torture run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TortureReport {
    /// Seed.
    pub seed: u64,
    /// Event kinds left out (`--skip`).
    pub skipped: Vec<String>,
    /// Events applied.
    pub events: u64,
    /// Events by kind.
    pub kinds: BTreeMap<String, KindStats>,
    /// What the load clients saw.
    pub load: LoadTotals,
    /// Events after which no engine served within 60 s although a copy of the state survived
    /// (every event starts from a hot standby, so any outage is one).
    pub outages: u64,
    /// Why operations were declined or undone (the first 20).
    pub refusals: Vec<String>,
    /// What the incidents were (the first 20).
    pub incidents: Vec<String>,
    /// Stopped early by SIGINT or SIGTERM.
    pub interrupted: bool,
    /// Lines of the supervisor's log that report an outage.
    pub outage_log_lines: u64,
    /// The first error that stopped the campaign, if one did.
    pub error: Option<String>,
    /// Wall time, s.
    pub wall_s: f64,
    /// Nothing lost or duplicated, no outage, no error.
    pub ok: bool,
}

/// splitmix64: a small, seedable generator (no dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One event of the campaign.
#[derive(Debug, Clone, Copy)]
enum Event {
    Death(Death, Target),
    Stall(Target, Duration),
    Switchover,
    Upgrade,
    SupervisorRestart,
}

impl Event {
    fn kind(&self) -> String {
        match self {
            Event::Death(d, t) => format!("{} {}", t.name(), d.name()),
            Event::Stall(t, _) => format!("{} stall", t.name()),
            Event::Switchover => "switchover".into(),
            Event::Upgrade => "upgrade".into(),
            Event::SupervisorRestart => "supervisor restart".into(),
        }
    }

    fn random(rng: &mut Rng) -> Event {
        let target = |rng: &mut Rng| {
            if rng.below(2) == 0 {
                Target::Active
            } else {
                Target::Standby
            }
        };
        match rng.below(100) {
            0..=39 => {
                let t = target(rng);
                let faults: Vec<Fault> = Fault::ALL
                    .into_iter()
                    .filter(|f| t == Target::Active || f.on_standby())
                    .collect();
                let f = faults[rng.below(faults.len() as u64) as usize];
                Event::Death(Death::Fault(f), t)
            }
            40..=64 => {
                let s = Signal::ALL[rng.below(Signal::ALL.len() as u64) as usize];
                Event::Death(Death::Signal(s), target(rng))
            }
            65..=79 => Event::Stall(target(rng), Duration::from_millis(5 + rng.below(1200))),
            80..=89 => Event::Switchover,
            90..=94 => Event::Upgrade,
            _ => Event::SupervisorRestart,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Runs the campaign. With `opts.progress` (the command), SIGINT and SIGTERM end it after the
/// event in flight, with the report of what ran.
pub fn run(opts: &TortureOptions) -> TortureReport {
    if opts.progress {
        // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
        unsafe {
            libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
            libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        }
    }
    let t0 = Instant::now();
    let mut report = TortureReport {
        seed: opts.seed,
        skipped: opts.skip.clone(),
        ..Default::default()
    };
    let mut cluster = match Cluster::new(&opts.exe, "torture", "info") {
        Ok(c) => c,
        Err(e) => {
            report.error = Some(e);
            return report;
        }
    };
    let mut load = None;
    let result = campaign(opts, &mut cluster, &mut report, &mut load);
    if let Err(e) = result {
        report.error = Some(format!("{e}\nlast lines of the supervisor's log:\n{}", {
            cluster.log_tail(40)
        }));
    }
    if let Some(load) = load {
        report.load = load.finish();
    }
    report.outage_log_lines = cluster
        .log_text()
        .lines()
        .filter(|l| l.contains("outage"))
        .count() as u64;
    report.wall_s = t0.elapsed().as_secs_f64();
    report.ok = report.error.is_none()
        && report.load.lost == 0
        && report.load.duplicated == 0
        && report.load.errors.is_empty()
        && report.outages == 0
        && report.outage_log_lines == 0;
    report
}

fn campaign(
    opts: &TortureOptions,
    cluster: &mut Cluster,
    report: &mut TortureReport,
    load_slot: &mut Option<Load>,
) -> Result<(), String> {
    cluster.up()?;
    let mut faults = Client::connect(&cluster.dir).map_err(|e| format!("fault client: {e}"))?;
    let load = load_slot.insert(Load::start(&cluster.dir, opts.clients, opts.pace)?);
    load.wait_progress(10, START_TIMEOUT)?;
    let mut rng = Rng(opts.seed);
    let mut version = 1u32;
    let t0 = Instant::now();
    for i in 0..opts.events {
        if INTERRUPTED.load(Ordering::SeqCst) {
            report.interrupted = true;
            break;
        }
        let (event, kind) = loop {
            let event = Event::random(&mut rng);
            let kind = event.kind();
            if !opts.skip.iter().any(|s| kind.contains(s.as_str())) {
                break (event, kind);
            }
        };
        load.take_window_wait_ms();
        let applied = match apply(cluster, event, &mut faults, &mut version) {
            Ok(a) => a,
            Err(e) => {
                if cluster.wait_settled(SETTLE_TIMEOUT).is_err() {
                    report.outages += 1;
                }
                return Err(format!("event {i} ({kind}): {e}"));
            }
        };
        // Every client answered again after the event.
        load.wait_progress(2, SETTLE_TIMEOUT)
            .map_err(|e| format!("event {i} ({kind}): {e}"))?;
        let wait = load.take_window_wait_ms();
        let k = report.kinds.entry(kind.clone()).or_default();
        k.count += 1;
        k.failovers += applied.failover as u64;
        if let Some(why) = applied.refused {
            k.refused += 1;
            if report.refusals.len() < 20 {
                report.refusals.push(format!("event {i}: {why}"));
            }
        }
        if let Some(what) = applied.incident {
            k.incidents += 1;
            if report.incidents.len() < 20 {
                report.incidents.push(format!("event {i}: {what}"));
            }
        }
        k.longest_wait_ms = k.longest_wait_ms.max(wait);
        report.events += 1;
        let (lost, dup) = load.anomalies();
        if opts.progress && (i + 1) % 50 == 0 || lost + dup > 0 {
            eprintln!(
                "[{:7.1}s] {} events, {} requests acknowledged, lost {lost}, duplicated {dup} (last: {kind})",
                t0.elapsed().as_secs_f64(),
                i + 1,
                load.acked()
            );
        }
    }
    Ok(())
}

/// What one event did.
struct Applied {
    /// The standby stepped up.
    failover: bool,
    /// The supervisor declined or undid the operation (why), leaving a served cluster.
    refused: Option<String>,
    /// See [`DeathOutcome::incident`].
    incident: Option<String>,
}

impl From<bool> for Applied {
    fn from(failover: bool) -> Self {
        Applied {
            failover,
            refused: None,
            incident: None,
        }
    }
}

/// An operation's result: `Ok(None)` done, `Ok(Some(why))` declined, undone or failed (the
/// caller then requires a served cluster with a hot standby, as after any event), `Err` an
/// outage or a failed rollback.
fn outcome(what: &str, r: &Reply) -> Result<Option<String>, String> {
    match r.code {
        Some(Code::Ok) => Ok(None),
        Some(Code::Outage | Code::RollbackFailed) | None => {
            Err(format!("{what}: {:?}: {}", r.code, r.message))
        }
        Some(_) => Ok(Some(format!("{what}: {:?}: {}", r.code, r.message))),
    }
}

/// Applies one event and waits for a settled cluster.
fn apply(
    cluster: &mut Cluster,
    event: Event,
    faults: &mut Client,
    version: &mut u32,
) -> Result<Applied, String> {
    let s0 = cluster.wait_settled(SETTLE_TIMEOUT)?;
    let active0 = s0.active_engine().ok_or("no active")?.slot.clone();
    let stepped = |s: &StatusReport| s.active_engine().is_some_and(|a| a.slot != active0);
    match event {
        Event::Death(d, t) => {
            let o = cluster.inflict(d, t, faults)?;
            Ok(Applied {
                failover: o.failover,
                refused: None,
                incident: o.incident,
            })
        }
        Event::Stall(t, d) => {
            let victim = match t {
                Target::Active => s0.active_engine(),
                Target::Standby => s0.hot_standbys().next(),
            }
            .ok_or("no engine to stall")?
            .pid;
            // One pidfd for both signals: if the stalled engine is fenced meanwhile, SIGCONT
            // reaches nobody, never a process that reused its pid.
            let fd = engine_pidfd(victim)?;
            let _ = fd.send_signal(libc::SIGSTOP);
            std::thread::sleep(d);
            let _ = fd.send_signal(libc::SIGCONT);
            let s = cluster.wait_settled(SETTLE_TIMEOUT)?;
            Ok(stepped(&s).into())
        }
        Event::Switchover => {
            let refused = outcome("switchover", &cluster.request(Op::Switchover)?)?;
            let s = cluster.wait_settled(SETTLE_TIMEOUT)?;
            Ok(Applied {
                failover: stepped(&s),
                refused,
                incident: None,
            })
        }
        Event::Upgrade => {
            let to = if *version == 1 { 2 } else { 1 };
            let r = cluster.request(Op::Upgrade(UpgradeRequest {
                binary: cluster.binaries.version(to).to_path_buf(),
                accept_for_ms: Some(500),
                accept_cmd: None,
                keep_standby: false,
                no_enable: true,
                ..Default::default()
            }))?;
            let refused = outcome(&format!("upgrade to v{to}"), &r)?;
            let s = cluster.wait_settled(SETTLE_TIMEOUT)?;
            let now = if refused.is_none() { to } else { *version };
            if s.engines.iter().any(|e| e.app_version != now as u64) {
                return Err(format!(
                    "after the upgrade to v{to} ({}), expected every engine on v{now}: {}",
                    refused.as_deref().unwrap_or("done"),
                    brief(&s)
                ));
            }
            *version = now;
            Ok(Applied {
                failover: stepped(&s),
                refused,
                incident: None,
            })
        }
        Event::SupervisorRestart => {
            cluster.kill_supervisor();
            cluster.start_supervisor()?;
            let s = cluster.wait_settled(SETTLE_TIMEOUT)?;
            Ok(stepped(&s).into())
        }
    }
}

/// The report as a table.
pub fn print_human(r: &TortureReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "understudy torture — {} events (seed {}) in {:.1} s",
        r.events, r.seed, r.wall_s
    )?;
    if !r.skipped.is_empty() {
        writeln!(out, "  left out: {}", r.skipped.join(", "))?;
    }
    writeln!(
        out,
        "  {:<30} {:>7} {:>10} {:>8} {:>10} {:>18}",
        "event", "count", "failovers", "refused", "incidents", "longest wait (ms)"
    )?;
    for (kind, k) in &r.kinds {
        writeln!(
            out,
            "  {:<30} {:>7} {:>10} {:>8} {:>10} {:>18.1}",
            kind, k.count, k.failovers, k.refused, k.incidents, k.longest_wait_ms
        )?;
    }
    let failovers: u64 = r.kinds.values().map(|k| k.failovers).sum();
    let refused: u64 = r.kinds.values().map(|k| k.refused).sum();
    let incidents: u64 = r.kinds.values().map(|k| k.incidents).sum();
    writeln!(
        out,
        "  {:<30} {:>7} {:>10} {:>8} {:>10} {:>18.1}",
        "all", r.events, failovers, refused, incidents, r.load.longest_wait_ms
    )?;
    writeln!(
        out,
        "  requests acknowledged {}  lost {}  duplicated {}  outages {} (log lines {})",
        r.load.acknowledged, r.load.lost, r.load.duplicated, r.outages, r.outage_log_lines
    )?;
    for e in &r.refusals {
        writeln!(out, "  refused: {e}")?;
    }
    for e in &r.incidents {
        writeln!(out, "  incident: {e}")?;
    }
    if r.interrupted {
        writeln!(out, "  interrupted: stopped early by a signal")?;
    }
    for e in &r.load.errors {
        writeln!(out, "  client error: {e}")?;
    }
    if let Some(e) = &r.error {
        writeln!(out, "  stopped: {e}")?;
    }
    writeln!(
        out,
        "  {}",
        if r.ok {
            "OK: nothing lost, nothing duplicated, no outage"
        } else {
            "FAILED"
        }
    )
}

/// `understudy torture`: runs the campaign with this executable, prints the table (or the
/// report as JSON), and returns the exit code.
pub fn cli(json: bool, events: u64, seed: u64, clients: usize, skip: &[String]) -> Code {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("understudy torture: cannot find its own executable: {e}");
            return Code::Failed;
        }
    };
    let mut opts = TortureOptions::new(exe, events);
    opts.seed = seed;
    opts.clients = clients.max(1);
    opts.progress = true;
    opts.skip = skip.to_vec();
    let mut rng = Rng(opts.seed);
    if (0..1000).all(|_| {
        let kind = Event::random(&mut rng).kind();
        skip.iter().any(|s| kind.contains(s.as_str()))
    }) {
        eprintln!("understudy torture: --skip leaves no event");
        return Code::Usage;
    }
    let report = run(&opts);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        let _ = print_human(&report, &mut std::io::stdout());
    }
    if report.ok {
        Code::Ok
    } else {
        Code::Failed
    }
}

/// A pidfd for an engine pid the supervisor reported: signals sent through it reach that process
/// or nobody (never a process that reused the pid, never a process group for pid 0).
fn engine_pidfd(pid: u32) -> Result<understudy_runtime::liveness::Pidfd, String> {
    if pid < 2 {
        return Err(format!("refusing to signal pid {pid}"));
    }
    understudy_runtime::liveness::Pidfd::open(pid).map_err(|e| format!("pidfd of pid {pid}: {e}"))
}
