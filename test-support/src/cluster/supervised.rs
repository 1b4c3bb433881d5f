//! A cluster under `understudy up`: its config, work and shared-memory directories, its
//! supervisor, and a reaper that takes its engines down with the test runner.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use understudy_runtime::control::{Control, Field, SLOTS};
use understudy_runtime::liveness::ProcessIdentity;
use understudy_supervisor::client::Client;
use understudy_supervisor::proto::{Op, Request, StatusReport, SOCKET_NAME};
use understudy_testkit::Side;

use crate::child::{self, ChildGuard};
use crate::dir::{unique_name, TestDir, SHM_ROOT};
use crate::wait::Wait;

/// Set on every process a [`Supervised`] starts, and inherited by every engine its supervisor
/// starts: the reaper kills whatever carries its cluster's value.
pub const CLUSTER_MARK_VAR: &str = "UNDERSTUDY_TEST_CLUSTER";

/// How often a status or log wait asks again (the supervisor answers over a socket).
const STATUS_POLL: Duration = Duration::from_millis(10);
/// How long a SIGKILLed engine may take to be gone.
const KILL_GONE_MAX: Duration = Duration::from_secs(10);
/// How long the reaper may take to sweep on drop.
const REAPER_EXIT_MAX: Duration = Duration::from_secs(10);
/// How long [`Supervised::freeze`] waits for every thread to stop.
const FREEZE_MAX: Duration = Duration::from_secs(20);
/// Log lines shown in a failure message.
const LOG_TAIL_LINES: usize = 60;

/// The reaper: a shell that sleeps until it gets SIGTERM — from [`Supervised`]'s drop, or from
/// the kernel when the test runner's thread that started it dies (`PR_SET_PDEATHSIG`) — then
/// SIGKILLs every process whose environment carries the cluster's mark. The supervisor dies
/// with the test runner by its own death signal, but its engines are not its children by the
/// time it is killed (they run in their own process groups and outlive a supervisor on
/// purpose), so only their inherited mark finds them.
const REAPER: &str = r#"
sweep() {
  for f in $(grep -lsxzaF "$UNDERSTUDY_REAPER_MARK" /proc/[0-9]*/environ); do
    p=${f#/proc/}; p=${p%/environ}
    kill -CONT "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null
  done
}
trap 'kill $s 2>/dev/null; sweep; exit 0' TERM
while :; do sleep 1 & s=$!; wait $s; done
"#;

/// Kills, when dropped or when the test runner's thread that made it dies, every process
/// that carries its mark in its environment (see [`Reaper::mark`]): the way to take down
/// engines a supervisor started, which are not the test's children.
pub struct Reaper {
    mark: String,
    shell: ChildGuard,
}

impl Reaper {
    /// Starts the reaper of processes marked `<CLUSTER_MARK_VAR>=<mark>` (`mark` unique to
    /// this test run).
    pub fn new(mark: &str) -> Reaper {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(REAPER)
            .env(
                "UNDERSTUDY_REAPER_MARK",
                format!("{CLUSTER_MARK_VAR}={mark}"),
            )
            .env_remove(CLUSTER_MARK_VAR)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Reaper {
            mark: mark.to_string(),
            shell: ChildGuard::spawn_with_death_signal(&mut cmd, libc::SIGTERM),
        }
    }

    /// Marks `cmd` (and so every process it starts that keeps its environment) as one to
    /// kill. Call it after anything that clears the environment.
    pub fn mark<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        cmd.env(CLUSTER_MARK_VAR, &self.mark)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        child::send_if_alive(self.shell.id(), libc::SIGTERM);
        // Not a panicking wait: a drop may run while the test unwinds.
        let start = std::time::Instant::now();
        while self.shell.running() && start.elapsed() < REAPER_EXIT_MAX {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.shell.running() {
            eprintln!(
                "warning: the reaper of {} did not finish its sweep",
                self.mark
            );
        }
    }
}

/// `understudy-testapp-v<version>`, the testkit's engine, next to the `cli` executable.
pub fn testapp(cli: &Path, version: u32) -> PathBuf {
    let path = cli
        .parent()
        .expect("target dir")
        .join(format!("understudy-testapp-v{version}"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before these tests",
        path.display()
    );
    path
}

/// One cluster under a private shm directory with its supervisor. On drop (also when the test
/// fails) frozen engines are thawed, the supervisor and every engine it ran are killed, the
/// shm directory is removed, and the work directory too unless the test failed (then its path
/// is printed: the log is worth reading).
pub struct Supervised {
    /// The cluster's name in its config.
    pub name: String,
    /// The config's `shm_dir` (the cluster directory is [`Supervised::dir`]).
    pub shm_dir: PathBuf,
    /// The config file, written by [`Supervised::write_config`].
    pub config: PathBuf,
    /// The supervisor's stderr (its engines' logs too).
    pub log: PathBuf,
    /// The side channel file for engines started with `--side`.
    pub side: PathBuf,
    work: TestDir,
    cli: PathBuf,
    json: bool,
    status_timeout: Option<Duration>,
    mark: String,
    supervisor: Option<ChildGuard>,
    reaper: Option<Reaper>,
    frozen: Vec<u32>,
    engines_seen: RefCell<Vec<ProcessIdentity>>,
}

impl Supervised {
    /// A cluster `<tag>-<n>` run by the `cli` executable (`understudy`), its work directory
    /// under the temp dir and its shm directory `/dev/shm/understudy-<prefix>-<pid>-<n>-x`
    /// (short: the control socket's path must fit in 108 bytes). No config is written yet.
    pub fn new(cli: &Path, prefix: &str, tag: &str) -> Supervised {
        let work = TestDir::temp(prefix, tag).keep_on_panic();
        let unique = unique_name(prefix, "x");
        let n = unique.rsplit('-').nth(1).expect("a counter").to_string();
        let shm_dir = Path::new(SHM_ROOT).join(&unique);
        let _ = std::fs::remove_dir_all(&shm_dir);
        Supervised {
            name: format!("{tag}-{n}"),
            config: work.join("cluster.toml"),
            log: work.join("supervisor.log"),
            side: work.join("side"),
            mark: unique,
            shm_dir,
            work,
            cli: cli.to_path_buf(),
            json: true,
            status_timeout: None,
            supervisor: None,
            reaper: None,
            frozen: Vec::new(),
            engines_seen: RefCell::new(Vec::new()),
        }
    }

    /// Whether [`Supervised::cli`] passes `--json` (the default).
    pub fn json(mut self, json: bool) -> Supervised {
        self.json = json;
        self
    }

    /// A bound on every status request (the client's default otherwise).
    pub fn status_timeout(mut self, timeout: Duration) -> Supervised {
        self.status_timeout = Some(timeout);
        self
    }

    /// Keeps the work directory after the test (it is removed otherwise unless the test
    /// failed).
    pub fn keep_work(&mut self) {
        self.work.keep();
    }

    /// The work directory (config, log, scripts).
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// The cluster directory: control block, rings, the control socket.
    pub fn dir(&self) -> PathBuf {
        self.shm_dir.join(&self.name)
    }

    /// (Re)writes the config file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text)
            .unwrap_or_else(|e| panic!("writing {}: {e}", self.config.display()));
    }

    /// An executable shell script `name` in the work directory.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.work.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// `understudy --config <config> [--json]`, marked as this cluster's.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.cli);
        c.arg("--config").arg(&self.config);
        if self.json {
            c.arg("--json");
        }
        c.env(CLUSTER_MARK_VAR, &self.mark);
        c
    }

    /// Starts `understudy <args> up` with `env`, its stderr appended to the log; the
    /// supervisor dies with the test runner, its engines with the reaper. Returns at once.
    pub fn start(&mut self, args: &[&str], env: &[(&str, &str)]) {
        self.start_reaper();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = self.cli();
        cmd.args(args)
            .arg("up")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.supervisor = Some(ChildGuard::spawn(&mut cmd));
    }

    fn start_reaper(&mut self) {
        if self.reaper.is_none() {
            self.reaper = Some(Reaper::new(&self.mark));
        }
    }

    /// Starts the supervisor and waits (up to `timeout`) for an active and a hot standby.
    pub fn up(&mut self, timeout: Duration) -> StatusReport {
        self.start(&[], &[]);
        self.wait("an active and a hot standby", timeout, |s| {
            s.active.is_some() && s.hot_standbys().count() >= 1
        })
    }

    /// The supervisor started last, if it runs.
    pub fn supervisor(&mut self) -> Option<&mut ChildGuard> {
        self.supervisor.as_mut()
    }

    /// Takes the supervisor out of the harness (to wait for its exit); still guarded.
    pub fn take_supervisor(&mut self) -> Option<ChildGuard> {
        self.supervisor.take()
    }

    /// SIGKILLs and reaps the supervisor (its engines go on running).
    pub fn kill_supervisor(&mut self) {
        if let Some(mut s) = self.supervisor.take() {
            s.kill();
        }
    }

    /// Sends `signal` to the supervisor, if one runs.
    pub fn signal_supervisor(&self, signal: libc::c_int) {
        if let Some(s) = &self.supervisor {
            child::send_if_alive(s.id(), signal);
        }
    }

    /// A client of the control socket.
    pub fn client(&self) -> Client {
        let c = Client::new(self.dir().join(SOCKET_NAME));
        match self.status_timeout {
            Some(t) => c.with_timeout(t),
            None => c,
        }
    }

    /// The status, if the supervisor answers; every engine it names is remembered (to prove
    /// at the end that none is left behind, see [`Supervised::engines_seen`]).
    pub fn try_status(&self) -> Option<StatusReport> {
        let reply = self
            .client()
            .request(&Request::new(Op::Status), |_| {})
            .ok()?;
        let report: StatusReport = serde_json::from_value(reply.data).ok()?;
        self.note_engines(
            report
                .engines
                .iter()
                .filter_map(|e| ProcessIdentity::of(e.pid).ok()),
        );
        Some(report)
    }

    /// Remembers engines the test learnt of by itself (killed on drop if alive, listed by
    /// [`Supervised::engines_seen`]).
    pub fn note_engines(&self, identities: impl IntoIterator<Item = ProcessIdentity>) {
        let mut seen = self.engines_seen.borrow_mut();
        for identity in identities {
            if !seen.contains(&identity) {
                seen.push(identity);
            }
        }
    }

    /// The status; panics with the log if the supervisor does not answer.
    pub fn status(&self) -> StatusReport {
        self.try_status().unwrap_or_else(|| {
            panic!(
                "the supervisor does not answer; its log:\n{}",
                self.log_tail(LOG_TAIL_LINES)
            )
        })
    }

    /// Every engine any status named.
    pub fn engines_seen(&self) -> Vec<ProcessIdentity> {
        self.engines_seen.borrow().clone()
    }

    /// Polls status until `done` holds; panics with the last status and the log tail after
    /// `timeout`.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&StatusReport) -> bool,
    ) -> StatusReport {
        let last = RefCell::new(None);
        Wait::new(what, timeout)
            .every(STATUS_POLL)
            .context(|| {
                format!(
                    "last status: {:#?}\nsupervisor log:\n{}",
                    last.borrow(),
                    self.log_tail(LOG_TAIL_LINES)
                )
            })
            .until(|| match self.try_status() {
                Some(s) if done(&s) => Ok(s),
                Some(s) => {
                    *last.borrow_mut() = Some(s);
                    Err("a status that does not hold")
                }
                None => Err("no answer"),
            })
    }

    /// The log as written (terminal colours included, if any).
    pub fn log_raw(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log without terminal colours.
    pub fn log_text(&self) -> String {
        strip_ansi(&self.log_raw())
    }

    /// The last `lines` lines of the log, without colours.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until a line of the log contains every one of `parts`; returns that line.
    pub fn wait_log(&self, parts: &[&str], timeout: Duration) -> String {
        Wait::new(&format!("a log line with {parts:?}"), timeout)
            .every(STATUS_POLL)
            .context(|| format!("log:\n{}", self.log_tail(LOG_TAIL_LINES)))
            .until(|| {
                let text = self.log_text();
                match text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                    Some(line) => Ok(line.to_string()),
                    None => Err(text.lines().count()),
                }
            })
    }

    /// The cluster's control block (it must exist).
    pub fn control(&self) -> Control {
        Control::open(&self.dir())
            .unwrap_or_else(|e| panic!("opening the control block of {}: {e}", self.name))
    }

    /// The engines the control block names that are alive (pid and start time checked).
    pub fn engine_identities(&self) -> Vec<ProcessIdentity> {
        let Ok(control) = Control::open(&self.dir()) else {
            return Vec::new();
        };
        (0..SLOTS)
            .filter_map(|slot| {
                let pid = control.get(slot, Field::Pid);
                let identity = ProcessIdentity {
                    pid: u32::try_from(pid).ok()?,
                    start_time_ticks: control.get(slot, Field::StartTime),
                };
                (pid != 0 && identity.is_alive()).then_some(identity)
            })
            .collect()
    }

    /// The pids of [`Supervised::engine_identities`].
    pub fn engine_pids(&self) -> Vec<u32> {
        self.engine_identities().iter().map(|i| i.pid).collect()
    }

    /// The side channel engines started with `--side <side>` write.
    pub fn side(&self) -> Side {
        Side::open(&self.side)
    }

    /// SIGKILLs the engine `pid` and waits until it is gone; returns the requests the side
    /// channel saw acknowledged just before the kill (0 without a side channel): a lower
    /// bound of what the dead engine acknowledged.
    pub fn kill_engine(&self, pid: u32) -> u64 {
        let identity = ProcessIdentity::of(pid).ok();
        let acked = if self.side.exists() {
            self.side().committed()
        } else {
            0
        };
        child::send_if_alive(pid, libc::SIGKILL);
        if let Some(identity) = identity {
            Wait::new(&format!("pid {pid} gone after SIGKILL"), KILL_GONE_MAX)
                .every(Duration::from_millis(1))
                .until(|| !identity.is_alive());
        }
        acked
    }

    /// SIGSTOPs `pid` and returns once all its threads are stopped; thawed on drop.
    pub fn freeze(&mut self, pid: u32) {
        self.frozen.push(pid);
        child::freeze(pid, FREEZE_MAX);
    }

    /// SIGCONTs a frozen `pid`.
    pub fn thaw(&mut self, pid: u32) {
        child::send_if_alive(pid, libc::SIGCONT);
        self.frozen.retain(|p| *p != pid);
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        for pid in std::mem::take(&mut self.frozen) {
            child::send_if_alive(pid, libc::SIGCONT);
        }
        self.kill_supervisor();
        let mut engines = self.engine_identities();
        engines.extend(self.engines_seen.borrow().iter().copied());
        // The control block's words are untrusted (a hostile or fault-injected engine in a
        // test can name any process): only a live process carrying this cluster's mark is ours.
        for identity in engines {
            if identity.is_alive() && carries_mark(identity.pid, &self.mark) {
                child::send_if_alive(identity.pid, libc::SIGCONT);
                child::send_if_alive(identity.pid, libc::SIGKILL);
            }
        }
        // Whatever else carries the mark (an engine no status named yet).
        drop(self.reaper.take());
        let _ = std::fs::remove_dir_all(&self.shm_dir);
    }
}

/// Whether process `pid`'s environment holds `<CLUSTER_MARK_VAR>=<mark>` (every process a
/// supervised cluster starts inherits it).
fn carries_mark(pid: u32, mark: &str) -> bool {
    let want = format!("{CLUSTER_MARK_VAR}={mark}");
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|env| env.split(|&b| b == 0).any(|v| v == want.as_bytes()))
        .unwrap_or(false)
}

/// `text` without ANSI escape sequences (`ESC [ … letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
