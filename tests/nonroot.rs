//! A non-root service works out of the box (issue 15, item 7): an unprivileged user, created
//! for the test, runs `up` of the test application with no `shm_dir` in its config, a client
//! round trip, a failover (SIGKILL of the active), a rolling upgrade to v2 and `down`, while a
//! root-run cluster of the same name runs beside it without meeting it; and the setup of the
//! issue (a service user given root's 0700 `/dev/shm/understudy`) fails `doctor` and `up` with
//! the directory, its owner and mode, the user, and the `shm_dir` to set.
//!
//! Needs root, to create the user (`useradd`) and to drop to it in the spawned processes
//! (`Command::uid/gid`); otherwise, or when `useradd` is missing or fails, each test is skipped
//! with a printed reason. A guard kills every process of the user, removes everything the user
//! made under /dev/shm, its work directory and the user itself, even when the test fails.
//!
//! The engines are the testkit's `understudy-testapp-v1`/`-v2` in client mode, found next to
//! `understudy` in the target directory (`cargo build --workspace --bins` first). The client is
//! this test executable re-executed as the service user ([`client_helper`]): the supervisor's
//! socket and the cluster's files admit only their own user, root included.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use understudy_runtime::client::Client;
use understudy_runtime::control::{Control, Field, SLOTS};
use understudy_runtime::liveness::ProcessIdentity;
use understudy_supervisor::config::{default_shm_dir_for, SHM_DIR_ROOT};
use understudy_supervisor::doctor::CLUSTER_DIR_CHECK;
use understudy_supervisor::proto::StatusReport;
use understudy_test_support::cluster::Reaper;
use understudy_test_support::dir::unique_name;
use understudy_test_support::{ChildGuard, TestDir, Wait};
use understudy_testkit::{COUNTER, COUNTER_READ};

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

/// Set (to a cluster directory) when this executable runs as the round-trip client.
const CLIENT_DIR_ENV: &str = "UNDERSTUDY_NONROOT_CLIENT_DIR";
/// How many `COUNTER` requests the client sends.
const CLIENT_COUNT_ENV: &str = "UNDERSTUDY_NONROOT_CLIENT_COUNT";
/// When set (to a path), the client sends requests until that file exists.
const CLIENT_UNTIL_ENV: &str = "UNDERSTUDY_NONROOT_CLIENT_UNTIL";
/// The tag whose counter the client increments (one per test: independent counts).
const CLIENT_TAG: u64 = 7;

/// `useradd`/`userdel` lock /etc/passwd: the tests create their users one at a time.
static USERS: Mutex<()> = Mutex::new(());

/// The executables the service user runs: the ones in the target directory, or copies in its
/// work directory when the user cannot read and execute those (a checkout under a 0700 home).
struct Binaries {
    cli: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    /// This test executable, re-executed as the client.
    helper: PathBuf,
}

/// `userdel`, by its full path when root's PATH lacks /usr/sbin.
fn userdel() -> PathBuf {
    let path = Path::new("/usr/sbin/userdel");
    if path.exists() {
        path.to_owned()
    } else {
        PathBuf::from("userdel")
    }
}

/// The names of the users these tests create: `understudy-nr-<pid of the test>-<tag>`.
const USER_PREFIX: &str = "understudy-nr-";

/// Removes what a run of these tests killed before its guards ran (SIGKILL, a timeout) left:
/// every user named [`USER_PREFIX`]`<pid>-…` whose test process is gone, with its processes,
/// its files under /dev/shm and its work directory.
fn sweep_stale_users() {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        let [name, _, uid, gid, ..] = fields[..] else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(USER_PREFIX)
            .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let (Ok(uid), Ok(gid)) = (uid.parse(), gid.parse()) else {
            continue;
        };
        if uid == 0 {
            continue;
        }
        eprintln!("removing the user {name} a killed run of these tests left");
        drop(ServiceUser {
            name: name.to_owned(),
            uid,
            gid,
            work: std::env::temp_dir().join(name),
        });
    }
}

/// An unprivileged user made for one test, with a work directory (its HOME and config dir)
/// it owns. Dropping it kills every process of the user, removes what it made under
/// /dev/shm, the work directory and the user.
struct ServiceUser {
    name: String,
    uid: u32,
    gid: u32,
    work: PathBuf,
}

impl ServiceUser {
    /// Creates the user, or says why the test must be skipped.
    fn create(tag: &str) -> Result<ServiceUser, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root: cannot create a user to run the cluster as".into());
        }
        static SWEPT: OnceLock<()> = OnceLock::new();
        SWEPT.get_or_init(sweep_stale_users);
        let name = format!("{USER_PREFIX}{}-{tag}", std::process::id());
        // Root's PATH may lack /usr/sbin.
        let tool = |tool: &str| {
            let path = Path::new("/usr/sbin").join(tool);
            if path.exists() {
                path
            } else {
                PathBuf::from(tool)
            }
        };
        let _guard = USERS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new(userdel()).arg(&name).output();
        let out = Command::new(tool("useradd"))
            .args(["--system", "--user-group", "--no-create-home"])
            .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
            .arg(&name)
            .output()
            .map_err(|e| format!("useradd cannot run: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "useradd {name} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        drop(_guard);
        let id = |name: &str, flag: &str| -> Result<u32, String> {
            let out = Command::new("id")
                .arg(flag)
                .arg(name)
                .output()
                .map_err(|e| format!("id cannot run: {e}"))?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|_| format!("id {flag} {name}: expected a number, found {out:?}"))
        };
        // From here on, the guard removes the user even if what follows fails.
        let mut user = ServiceUser {
            name,
            uid: u32::MAX,
            gid: u32::MAX,
            work: PathBuf::new(),
        };
        user.uid = id(&user.name, "-u")?;
        user.gid = id(&user.name, "-g")?;
        assert_ne!(user.uid, 0, "useradd made a root user");
        // Its work directory (HOME, config, logs): under the temp directory if the user can
        // reach it there (TMPDIR may be a private directory of root's), else under /tmp.
        for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
            let dir = base.join(&user.name);
            let _ = std::fs::remove_dir_all(&dir);
            if std::fs::create_dir_all(&dir).is_err() {
                continue;
            }
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
            let reachable = Command::new("/bin/sh")
                .uid(user.uid)
                .gid(user.gid)
                .current_dir("/")
                .args(["-c", "test -w \"$1\" && test -x \"$1\"", "sh"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
            if reachable {
                user.work = dir;
                return Ok(user);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(format!("no temporary directory {} can reach", user.name))
    }

    /// `program` to run as this user: its uid and gid (std drops root's supplementary groups),
    /// its HOME, a clean environment, the work directory as the current directory.
    fn command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.work)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("RUST_LOG", "info")
            .current_dir(&self.work);
        c
    }

    /// Whether this user can read and execute `path`.
    fn can_run(&self, path: &Path) -> bool {
        self.command(Path::new("/bin/sh"))
            .args(["-c", "test -r \"$1\" && test -x \"$1\"", "sh"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The executables, copied into the work directory if the user cannot run them in place.
    fn binaries(&self) -> Binaries {
        let cli = PathBuf::from(CLI);
        let dir = cli.parent().expect("target dir");
        let in_place = Binaries {
            v1: dir.join("understudy-testapp-v1"),
            v2: dir.join("understudy-testapp-v2"),
            helper: std::env::current_exe().expect("this test's executable"),
            cli: cli.clone(),
        };
        for p in [&in_place.v1, &in_place.v2] {
            assert!(
                p.exists(),
                "{} is missing: run `cargo build --workspace --bins` before these tests",
                p.display()
            );
        }
        let all = [&in_place.cli, &in_place.v1, &in_place.v2, &in_place.helper];
        if all.iter().all(|p| self.can_run(p)) {
            return in_place;
        }
        eprintln!(
            "{} cannot run the binaries in {}: copying them to {}",
            self.name,
            dir.display(),
            self.work.display()
        );
        let bin = self.work.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = |p: &PathBuf| {
            let to = bin.join(p.file_name().unwrap());
            std::fs::copy(p, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
            to
        };
        Binaries {
            cli: copy(&in_place.cli),
            v1: copy(&in_place.v1),
            v2: copy(&in_place.v2),
            helper: copy(&in_place.helper),
        }
    }

    /// The pids of this user's processes (all started by this test: the user is new).
    fn pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == self.uid)
            })
            .collect()
    }
}

impl Drop for ServiceUser {
    fn drop(&mut self) {
        if self.uid == u32::MAX {
            let _guard = USERS.lock().unwrap_or_else(|e| e.into_inner());
            let _ = Command::new(userdel()).arg(&self.name).output();
            return;
        }
        // Every process of the user, by pid, until none is left.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                if !pids.is_empty() {
                    eprintln!("processes of {} survive SIGKILL: {pids:?}", self.name);
                }
                break;
            }
            for pid in pids {
                // SAFETY: kill has no memory-safety preconditions; the pid is a process of
                // the user this test created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Everything the user made under /dev/shm (its default shm_dir, client rings).
        if let Ok(entries) = std::fs::read_dir("/dev/shm") {
            for entry in entries.flatten() {
                let path = entry.path();
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.uid() != self.uid {
                    continue;
                }
                let removed = if meta.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                if let Err(e) = removed {
                    eprintln!("cannot remove {}: {e}", path.display());
                }
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "(the work directory {} is removed too)",
                self.work.display()
            );
        }
        if !self.work.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.work);
        }
        let _guard = USERS.lock().unwrap_or_else(|e| e.into_inner());
        match Command::new(userdel()).arg(&self.name).output() {
            Ok(out) if out.status.success() => {}
            other => eprintln!("userdel {} failed: {other:?}", self.name),
        }
    }
}

/// Who runs a cluster's commands: the service user, or root (this process's user).
#[derive(Clone, Copy)]
enum Runner<'a> {
    Root,
    User(&'a ServiceUser),
}

/// One cluster of the test application in client mode, with its supervisor; the supervisor
/// and engines are killed and the cluster directory removed on drop, and they die with the
/// test runner (the workspace harness's child guard and reaper: every command is marked).
struct Cluster<'a> {
    runner: Runner<'a>,
    bins: &'a Binaries,
    name: String,
    /// The cluster directory the config's default shm_dir gives its user.
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    supervisor: Option<ChildGuard>,
    reaper: Reaper,
}

/// How long a test waits for a cluster state, or for the supervisor to leave after `down`.
const WAIT_MAX: Duration = Duration::from_secs(60);
const DOWN_MAX: Duration = Duration::from_secs(30);

impl<'a> Cluster<'a> {
    /// A cluster `name` whose config, written in `work`, leaves `shm_dir` out (or sets the
    /// one given).
    fn new(
        runner: Runner<'a>,
        bins: &'a Binaries,
        name: &str,
        work: &Path,
        shm_dir: Option<&str>,
    ) -> Cluster<'a> {
        let uid = match runner {
            Runner::Root => 0,
            Runner::User(u) => u.uid,
        };
        let shm_line = shm_dir.map_or(String::new(), |d| format!("shm_dir = \"{d}\"\n"));
        let config = work.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"cluster = "{name}"
{shm_line}[engine]
binary = "{bin}"
args = ["--clients"]
env = {{ UNDERSTUDY_HUNG_MS = "5000" }}
[timeouts]
heartbeat_ms = 500
[acceptance]
max_latency_us_p99 = 60000000
"#,
                bin = bins.v1.display(),
            ),
        )
        .unwrap();
        let log = work.join(format!("{name}.log"));
        if let Runner::User(u) = runner {
            std::os::unix::fs::chown(&config, Some(u.uid), Some(u.gid)).unwrap();
        }
        let dir = shm_dir.map_or_else(|| default_shm_dir_for(uid), PathBuf::from);
        Cluster {
            runner,
            bins,
            name: name.to_owned(),
            dir: dir.join(name),
            config,
            log,
            supervisor: None,
            reaper: Reaper::new(&unique_name("nonroot", name)),
        }
    }

    fn command(&self, program: &Path) -> Command {
        let mut c = match self.runner {
            Runner::Root => {
                let mut c = Command::new(program);
                c.env("RUST_LOG", "info")
                    .env_remove("UNDERSTUDY_CONFIG")
                    .env_remove("UNDERSTUDY_SOCKET");
                c
            }
            Runner::User(u) => u.command(program),
        };
        self.reaper.mark(&mut c);
        c
    }

    /// `understudy --config <config> --json <args>`, as the cluster's user.
    fn cli(&self, args: &[&str]) -> Output {
        self.command(&self.bins.cli)
            .arg("--config")
            .arg(&self.config)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts `understudy up` as the cluster's user, stderr into the log.
    fn start(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        let child = ChildGuard::spawn(
            self.command(&self.bins.cli)
                .arg("--config")
                .arg(&self.config)
                .arg("up")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.supervisor = Some(child);
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn try_status(&self) -> Option<StatusReport> {
        let out = self.cli(&["status"]);
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        serde_json::from_value(reply.get("data")?.clone()).ok()
    }

    /// Polls `status` until `done`; fails with the last status and the log after
    /// [`WAIT_MAX`].
    fn wait(&self, what: &str, mut done: impl FnMut(&StatusReport) -> bool) -> StatusReport {
        let last = std::cell::RefCell::new(None);
        Wait::new(&format!("{what} in {}", self.name), WAIT_MAX)
            .every(Duration::from_millis(100))
            .context(|| {
                format!(
                    "last status: {:#?}\nlog:\n{}",
                    last.borrow(),
                    self.log_text()
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

    fn wait_serving(&self, what: &str) -> StatusReport {
        self.wait(what, |s| {
            s.active.is_some() && s.hot_standbys().count() >= 1 && s.operation.is_none()
        })
    }

    /// The shared-memory client, run as the cluster's user: `count` `COUNTER` requests, or
    /// (with `until`) requests 1 ms apart until that file exists.
    fn client(&self, count: u64, until: Option<&Path>) -> Command {
        let mut c = self.command(&self.bins.helper);
        c.args([
            "--exact",
            "client_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_DIR_ENV, &self.dir)
        .env(CLIENT_COUNT_ENV, count.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        if let Some(until) = until {
            c.env(CLIENT_UNTIL_ENV, until);
        }
        c
    }

    /// The counter the client's last answer gave (each answer was one more than the last).
    fn client_count(&self, out: Output) -> u64 {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the client in {} failed ({}):\n{stdout}\n{stderr}\nlog:\n{}",
            self.name,
            out.status,
            self.log_text()
        );
        stdout
            .split("COUNT ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("the client printed no COUNT line:\n{stdout}\n{stderr}"))
    }

    /// Sends `count` `COUNTER` requests through a shared-memory client run as the cluster's
    /// user; returns the counter the last answer gave.
    fn round_trip(&self, count: u64) -> u64 {
        let out = self.client(count, None).output().unwrap();
        self.client_count(out)
    }

    /// `understudy down`, then waits for the supervisor to exit.
    fn down(&mut self) {
        let out = self.cli(&["down"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "down of {}: {}\n{}\nlog:\n{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        if let Some(mut child) = self.supervisor.take() {
            child.wait_exit("the supervisor after down", DOWN_MAX);
        }
    }
}

impl Drop for Cluster<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            child.kill();
        }
        // Root's engines by their control file; the service user's are killed by its guard
        // (root cannot open the user's control file: it trusts only its own).
        if let Ok(control) = Control::open(&self.dir) {
            for slot in 0..SLOTS {
                let pid = control.get(slot, Field::Pid);
                let identity = ProcessIdentity {
                    pid: pid as u32,
                    start_time_ticks: control.get(slot, Field::StartTime),
                };
                if pid != 0 && identity.is_alive() {
                    // SAFETY: kill has no memory-safety preconditions; the pid is an engine
                    // of this test's cluster, matched by its start time.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if matches!(self.runner, Runner::Root) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if std::thread::panicking() {
            eprintln!("log of {}:\n{}", self.name, self.log_text());
        }
    }
}

/// Whether root's shm directory was absent before the first test of this executable needed
/// it (the tests run in parallel: the first to look decides).
static ROOT_SHM_ABSENT: OnceLock<bool> = OnceLock::new();

/// Root's default shm_dir for one test: created (0700, as `up` would) if missing, and on drop
/// removed if no test found it before and nothing is left in it (the last test out removes it).
struct RootShmDir;

impl RootShmDir {
    fn ensure() -> RootShmDir {
        ROOT_SHM_ABSENT.get_or_init(|| std::fs::symlink_metadata(SHM_DIR_ROOT).is_err());
        shm_layout::trust::ensure_private_dir(Path::new(SHM_DIR_ROOT)).unwrap();
        RootShmDir
    }
}

impl Drop for RootShmDir {
    fn drop(&mut self) {
        if ROOT_SHM_ABSENT.get() == Some(&true) {
            let _ = std::fs::remove_dir(SHM_DIR_ROOT);
        }
    }
}

fn skip(reason: &str) {
    eprintln!("skipped: {reason}");
}

/// Not a test of its own: the shared-memory client, when [`Cluster::round_trip`] runs this
/// executable as the service user (`CLIENT_DIR_ENV` set). It reads its tag's counter, sends
/// `count` increments, checks every answer is one more than the last (none lost, none applied
/// twice), reads the counter back, and prints `COUNT <n>`. Without the variable it returns.
#[test]
fn client_helper() {
    let Some(dir) = std::env::var_os(CLIENT_DIR_ENV) else {
        return;
    };
    let count: u64 = std::env::var(CLIENT_COUNT_ENV)
        .expect("the count")
        .parse()
        .expect("a number");
    let timeout = Duration::from_secs(30);
    let mut client = Client::connect_timeout(Path::new(&dir), timeout)
        .unwrap_or_else(|e| panic!("connect to {dir:?}: {e}"));
    let call = |client: &mut Client, prefix: &[u8; 8]| -> u64 {
        let mut req = prefix.to_vec();
        req.extend_from_slice(&CLIENT_TAG.to_le_bytes());
        let answer = client
            .call(&req, timeout)
            .unwrap_or_else(|e| panic!("request failed: {e}"))
            .unwrap_or_else(|| panic!("no answer within {timeout:?}"));
        u64::from_le_bytes(answer[..8].try_into().expect("an 8-byte count"))
    };
    let until = std::env::var_os(CLIENT_UNTIL_ENV).map(PathBuf::from);
    let start = call(&mut client, COUNTER_READ);
    let mut sent = 0;
    while match &until {
        Some(file) => !file.exists(),
        None => sent < count,
    } {
        sent += 1;
        let n = call(&mut client, COUNTER);
        assert_eq!(
            n,
            start + sent,
            "request {sent} after {start}: lost or applied twice"
        );
        if until.is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let end = call(&mut client, COUNTER_READ);
    assert_eq!(end, start + sent, "the counter read back");
    println!("COUNT {end}");
}

/// As an unprivileged user with no `shm_dir` in its config: `doctor` passes the cluster
/// directory check and leaves nothing behind; `up` creates the per-user default
/// `/dev/shm/understudy-<uid>/<cluster>`, owned by the user, 0700; a client round trip, a
/// SIGKILL of the active (the new active has every acknowledged increment), an upgrade to v2
/// (both engines on v2, the counter intact) and `down` (the cluster directory gone) all work.
/// Meanwhile root runs a cluster of the same name with its own default: the two have
/// different directories and supervisors and independent state.
#[test]
fn a_service_user_runs_up_failover_upgrade_and_down_beside_root() {
    let user = match ServiceUser::create("svc") {
        Ok(u) => u,
        Err(reason) => return skip(&reason),
    };
    let bins = user.binaries();
    let name = format!("nr-{}", std::process::id());
    let root_work = TestDir::temp("nonroot-root", &name);
    let root_shm = RootShmDir::ensure();

    let mut mine = Cluster::new(Runner::User(&user), &bins, &name, &user.work, None);
    let user_shm = default_shm_dir_for(user.uid);
    assert_eq!(mine.dir, user_shm.join(&name));

    // doctor, before anything exists: the user can create and own the cluster directory.
    let out = mine.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let check = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|c| c["name"] == CLUSTER_DIR_CHECK)
        .unwrap_or_else(|| panic!("no cluster directory check in {text}"));
    assert_eq!(check["verdict"], "ok", "{check}");
    assert!(
        check["found"]
            .as_str()
            .unwrap_or_default()
            .contains(&user_shm.display().to_string()),
        "{check}"
    );
    assert!(
        !user_shm.exists(),
        "doctor's probe left {}",
        user_shm.display()
    );

    mine.start();
    let s = mine.wait_serving("the user's cluster: an active and a hot standby");
    assert_eq!(s.dir, mine.dir, "{s:#?}");
    let meta = std::fs::metadata(&mine.dir).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (user.uid, 0o700),
        "{}",
        mine.dir.display()
    );
    let meta = std::fs::metadata(&user_shm).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o700));
    for e in &s.engines {
        let owner = std::fs::metadata(format!("/proc/{}", e.pid)).unwrap().uid();
        assert_eq!(owner, user.uid, "engine {} runs as uid {owner}", e.slot);
    }

    // Root, given the user's config, looks under root's default and says whom to ask.
    let out = Command::new(&bins.cli)
        .arg("--config")
        .arg(&mine.config)
        .arg("status")
        .env_remove("UNDERSTUDY_SOCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("as the user that runs the supervisor"),
        "{stderr}"
    );

    // Root's cluster of the same name, on root's default: no collision.
    let mut theirs = Cluster::new(Runner::Root, &bins, &name, &root_work, None);
    assert_eq!(theirs.dir, Path::new(SHM_DIR_ROOT).join(&name));
    theirs.start();
    let r = theirs.wait_serving("root's cluster: an active and a hot standby");
    assert_ne!(r.dir, s.dir);
    assert_ne!(r.supervisor_pid, s.supervisor_pid);
    assert_eq!(theirs.round_trip(5), 5, "root's cluster starts from 0");

    assert_eq!(
        mine.round_trip(20),
        20,
        "the user's cluster has its own state"
    );
    assert_eq!(theirs.round_trip(1), 6, "root's cluster has its own state");

    // Failover: SIGKILL the user's active engine (root may signal it).
    let active = s.active_engine().expect("an active").clone();
    let identity = ProcessIdentity::of(active.pid).ok();
    // SAFETY: kill has no memory-safety preconditions; the pid is the cluster's active.
    unsafe { libc::kill(active.pid as i32, libc::SIGKILL) };
    if let Some(identity) = identity {
        let deadline = Instant::now() + Duration::from_secs(10);
        while identity.is_alive() {
            assert!(
                Instant::now() < deadline,
                "pid {} survives SIGKILL",
                active.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let after = mine.wait("a new active and a hot standby after the kill", |x| {
        x.active_engine().is_some_and(|a| a.pid != active.pid)
            && x.epoch > s.epoch
            && x.hot_standbys().count() >= 1
    });
    assert_eq!(
        mine.round_trip(20),
        40,
        "every acknowledged increment survives the failover\n{after:#?}"
    );

    // Rolling upgrade to v2, as the user, under a client's load (acceptance needs traffic).
    let stop = user.work.join("stop-client");
    struct StopClient<'a>(&'a Path, Option<ChildGuard>);
    impl Drop for StopClient<'_> {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0, b"");
        }
    }
    let mut load = StopClient(
        &stop,
        Some(ChildGuard::spawn(&mut mine.client(0, Some(&stop)))),
    );
    let out = mine.cli(&[
        "upgrade",
        "--binary",
        &bins.v2.display().to_string(),
        "--accept-for",
        "500ms",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "upgrade: {}\n{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        mine.log_text()
    );
    std::fs::write(&stop, b"").unwrap();
    let loaded = mine.client_count(
        load.1
            .take()
            .unwrap()
            .into_inner()
            .wait_with_output()
            .unwrap(),
    );
    drop(load);
    assert!(loaded > 40, "the load client sent nothing: {loaded}");
    let upgraded = mine.wait_serving("both engines on v2 after the upgrade");
    assert!(
        upgraded.engines.iter().all(|e| e.app_version == 2),
        "{upgraded:#?}"
    );
    assert_eq!(
        mine.round_trip(20),
        loaded + 20,
        "the counter survives the upgrade"
    );

    // down, as the user: its cluster directory is gone; root's cluster still serves.
    mine.down();
    assert!(!mine.dir.exists(), "down left {}", mine.dir.display());
    assert_eq!(theirs.round_trip(1), 7, "root's cluster served on");
    theirs.down();
    assert!(!theirs.dir.exists(), "down left {}", theirs.dir.display());
    drop(root_shm);
}

/// The setup of issue 15: a service user whose config names root's `/dev/shm/understudy`
/// (created 0700 by root). `doctor` fails the cluster directory check and `up` exits 10, each
/// naming the directory, its owner (root) and mode, the user, and `shm_dir = "<the user's
/// default>"` to set; nothing is created. And the user's own default directory, made first by
/// another user, is refused the same way, saying someone else made it.
#[test]
fn root_s_shm_dir_is_refused_naming_owner_mode_user_and_what_to_set() {
    let user = match ServiceUser::create("deny") {
        Ok(u) => u,
        Err(reason) => return skip(&reason),
    };
    let bins = user.binaries();
    let root_shm = RootShmDir::ensure();
    let meta = std::fs::metadata(SHM_DIR_ROOT).unwrap();
    let mode = format!("mode {:04o}", meta.mode() & 0o7777);
    let name = format!("nrdeny-{}", std::process::id());
    let c = Cluster::new(
        Runner::User(&user),
        &bins,
        &name,
        &user.work,
        Some(SHM_DIR_ROOT),
    );
    let user_label = format!("uid {} ({})", user.uid, user.name);
    let default = default_shm_dir_for(user.uid);
    let to_set = format!("shm_dir = \"{}\"", default.display());
    let expected = [SHM_DIR_ROOT, "uid 0 (root)", &mode, &user_label, &to_set];

    let out = c.cli(&["doctor"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(12), "{text}");
    let check = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|c| c["name"] == CLUSTER_DIR_CHECK)
        .unwrap_or_else(|| panic!("no cluster directory check in {text}"));
    assert_eq!(check["verdict"], "fail", "{check}");
    let said = format!(
        "{} {}",
        check["found"].as_str().unwrap_or_default(),
        check["fix"].as_str().unwrap_or_default()
    );
    for part in expected {
        assert!(said.contains(part), "doctor does not say {part:?}: {check}");
    }

    let out = c.cli(&["up"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    for part in expected {
        assert!(stderr.contains(part), "up does not say {part:?}: {stderr}");
    }
    assert!(
        !default.exists() && std::fs::symlink_metadata(&c.dir).is_err(),
        "the refused up created something"
    );
    drop(c);
    drop(root_shm);

    // The user's own default, made first by someone else (uid 65534, 0700): with no shm_dir
    // in the config, `up` names that directory and its owner, and says someone else made it.
    struct Squatted(PathBuf);
    impl Drop for Squatted {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let squatted = Squatted(default.clone());
    shm_layout::trust::ensure_private_dir(&squatted.0).unwrap();
    std::os::unix::fs::chown(&squatted.0, Some(65534), Some(65534)).unwrap();
    let c = Cluster::new(Runner::User(&user), &bins, &name, &user.work, None);
    let out = c.cli(&["up"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    let dir = default.display().to_string();
    for part in [
        &dir,
        "uid 65534",
        "mode 0700",
        &user_label,
        "someone else made it",
    ] {
        assert!(stderr.contains(part), "up does not say {part:?}: {stderr}");
    }
    assert!(
        std::fs::symlink_metadata(&c.dir).is_err(),
        "the refused up created {}",
        c.dir.display()
    );
}
