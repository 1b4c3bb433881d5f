//! End-to-end tests of the supervisor's trust boundary and bounds (issue 10), with real
//! supervisors, real engines (the testkit's `understudy-testapp-v1`), real files under
//! /dev/shm and real connections:
//!
//! - a cluster directory (or the directory above it, or a file in it, or a link for it) that
//!   another user could write is refused by `up`, nothing is executed and nothing outside is
//!   touched; a forged `engines.json` never gets its binary run; `doctor` reports such a
//!   directory;
//! - the control socket answers every malformed request (numbers for names, unknown fields,
//!   bytes that are not UTF-8, huge or silent lines) with a JSON result and runs nothing;
//! - 2,000 idle connections while the active is SIGKILLed: `status` still answers, the
//!   cluster fails over, no engine is orphaned;
//! - flags and configs out of bounds exit with their codes, and a failed `up` removes what it
//!   created.
//!
//! Another user is simulated by giving files to uid 65534 (`nobody`) with chown when the tests
//! run as root; the cases that need it are skipped with a printed reason otherwise.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use understudy_runtime::liveness::ProcessIdentity;
use understudy_supervisor::client::Client;
use understudy_supervisor::proto::{Op, Request, StatusReport, SOCKET_NAME};
use understudy_test_support::cluster::{self, Supervised};
use understudy_test_support::{ChildGuard, Wait};

const CLI: &str = env!("CARGO_BIN_EXE_understudy");
const NOBODY: u32 = 65534;

fn testapp() -> PathBuf {
    testapp_version(1)
}

fn testapp_version(version: u32) -> PathBuf {
    cluster::testapp(Path::new(CLI), version)
}

fn is_root() -> bool {
    shm_layout::trust::euid() == 0
}

/// How long a test waits for an active and a hot standby.
const UP_MAX: Duration = Duration::from_secs(30);
/// How long `understudy up` may take to refuse, and engines to be gone after `down`.
const EXIT_MAX: Duration = Duration::from_secs(60);
/// How long the supervisor and its engines may take to leave after `down`.
const DOWN_MAX: Duration = Duration::from_secs(30);
/// Log lines shown in a failure message.
const LOG_LINES: usize = 40;

/// A cluster's files (work directory, shm directory, config) and its supervisor on the
/// workspace harness ([`Supervised`]): every process it started is killed and every file
/// removed on drop, also when the test fails, and everything dies with the test runner.
struct Cluster(Supervised);

understudy_test_support::derefs_to_supervised!(Cluster, 0);

impl Cluster {
    fn new(tag: &str) -> Cluster {
        let c = Cluster(
            Supervised::new(Path::new(CLI), "sec", tag).status_timeout(Duration::from_secs(5)),
        );
        c.write_config(&testapp(), "");
        c
    }

    fn write_config(&self, binary: &Path, extra: &str) {
        self.write_config_with_args(binary, "", extra)
    }

    /// As [`Cluster::write_config`], with `args` (a TOML array's items, `""` for none) as the
    /// engines' arguments.
    fn write_config_with_args(&self, binary: &Path, args: &str, extra: &str) {
        let text = format!(
            "cluster = \"{name}\"\nshm_dir = \"{shm}\"\n[engine]\nbinary = \"{bin}\"\n\
             args = [{args}]\n[restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n\
             crash_loop_window_ms = 1000\ncrash_loop_max = 50\n\
             # No fence for a heartbeat late by CPU starvation on a loaded test machine: these\n\
             # tests kill engines themselves.\n\
             [timeouts]\nheartbeat_ms = 500\n{extra}\n",
            name = self.name,
            shm = self.shm_dir.display(),
            bin = binary.display(),
        );
        self.0.write_config(&text);
    }

    /// An executable script in the work directory that leaves `marker` when it runs.
    fn marker_script(&self, name: &str) -> (PathBuf, PathBuf) {
        let marker = self.work().join(format!("{name}.ran"));
        let path = self.work().join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\ntouch {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        (path, marker)
    }

    /// Runs `understudy up` expecting it to fail: its exit code and stderr (killed, and the
    /// test failed, if it is still running after a generous bound).
    fn up_fails(&self) -> (i32, String) {
        let mut up = self.cli();
        up.arg("up").stdout(Stdio::null()).stderr(Stdio::piped());
        let (status, err) =
            ChildGuard::spawn(&mut up).wait_exit("`understudy up` (which should refuse)", EXIT_MAX);
        (status.code().unwrap_or(-1), err)
    }

    /// Starts `understudy up` and waits for an active and a hot standby.
    fn up(&mut self) -> StatusReport {
        self.0.up(UP_MAX)
    }

    /// Sends raw bytes on a new connection (then shuts the writing side) and returns the
    /// first line of the answer, parsed as JSON.
    fn raw(&self, bytes: &[u8]) -> serde_json::Value {
        let mut stream = UnixStream::connect(self.dir().join(SOCKET_NAME)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // A refusal may close the connection before everything is written.
        let _ = stream.write_all(bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "expected a JSON reply to {:?}, found {line:?}: {e}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            )
        })
    }

    /// Stops the cluster with `down` and proves every engine ever seen is gone.
    fn down_and_check_no_orphan(&mut self) {
        let reply = self
            .client()
            .with_timeout(DOWN_MAX)
            .request(&Request::new(Op::Down), |_| {})
            .unwrap();
        assert_eq!(
            reply.code,
            Some(understudy_supervisor::proto::Code::Ok),
            "{reply:?}"
        );
        if let Some(mut supervisor) = self.take_supervisor() {
            supervisor.wait_exit("the supervisor after down", DOWN_MAX);
        }
        for identity in self.engines_seen() {
            Wait::new(
                &format!("engine pid {} gone after `down`", identity.pid),
                DOWN_MAX,
            )
            .every(Duration::from_millis(20))
            .until(|| !identity.is_alive());
        }
    }
}

/// Runs `script` with `sh -c` as uid/gid 65534 (a real unprivileged process; needs root).
fn as_nobody(script: &str) {
    use std::os::unix::process::CommandExt;
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as uid {NOBODY}: `{script}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How a case prepares the attacker's files.
type Prepare = Box<dyn Fn(&Cluster)>;

fn give_to_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_cluster_directory_another_user_could_write_is_refused_and_nothing_runs() {
    // Proves `up` refuses a cluster directory made by someone else (0777, or another owner),
    // a shm directory made by someone else, a symbolic link in place of the cluster
    // directory, and a control file of another user; the engine binary (a script leaving a
    // marker) never runs, and what the attacker prepared is left exactly as it was.
    let mut cases: Vec<(&str, Prepare)> = vec![
        (
            "cluster directory 0777",
            Box::new(|c: &Cluster| {
                std::fs::create_dir_all(c.dir()).unwrap();
                std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
            }),
        ),
        (
            "symbolic link for the cluster directory",
            Box::new(|c: &Cluster| {
                std::fs::create_dir_all(&c.shm_dir).unwrap();
                let target = c.work().join("elsewhere");
                std::fs::create_dir_all(&target).unwrap();
                std::os::unix::fs::symlink(&target, c.dir()).unwrap();
            }),
        ),
    ];
    if is_root() {
        cases.push((
            "cluster directory made by uid 65534 (`mkdir -p -m 0777`, as that user)",
            Box::new(|c: &Cluster| {
                as_nobody(&format!("mkdir -p -m 0777 {}", c.dir().display()));
            }),
        ));
        cases.push((
            "shm directory made by uid 65534 (as that user), a forged engines file in it",
            Box::new(|c: &Cluster| {
                as_nobody(&format!(
                    "mkdir -m 0755 {shm} && mkdir -m 0755 {dir} && echo '{{}}' > {dir}/engines.json",
                    shm = c.shm_dir.display(),
                    dir = c.dir().display()
                ));
            }),
        ));
        cases.push((
            "control file of uid 65534",
            Box::new(|c: &Cluster| {
                std::fs::create_dir_all(c.dir()).unwrap();
                std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
                let control = c.dir().join("control");
                std::fs::write(&control, vec![0u8; 4096]).unwrap();
                std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o666)).unwrap();
                give_to_nobody(&control);
            }),
        ));
    } else {
        eprintln!("skipped the other-owner cases: they need root to give files to uid 65534");
    }
    for (what, prepare) in cases {
        let c = Cluster::new("precreated");
        let (script, marker) = c.marker_script("engine");
        c.write_config(&script, "");
        prepare(&c);
        let before_dir = entries(&c.dir());
        let before_target = entries(&c.work().join("elsewhere"));
        let (code, err) = c.up_fails();
        assert_ne!(code, 0, "{what}: up accepted it: {err}");
        assert!(
            err.contains("owner") || err.contains("mode") || err.contains("symbolic link"),
            "{what}: the error does not say what is wrong: {err}"
        );
        assert!(
            err.contains(&c.shm_dir.display().to_string()),
            "{what}: the error does not name the path: {err}"
        );
        assert!(!marker.exists(), "{what}: the engine binary ran");
        assert_eq!(
            entries(&c.dir()),
            before_dir,
            "{what}: the directory was changed"
        );
        assert_eq!(
            entries(&c.work().join("elsewhere")),
            before_target,
            "{what}: the link's target was written"
        );
    }
}

#[test]
fn a_forged_engines_file_is_not_believed_and_its_binary_never_runs() {
    // Proves a replaced `engines.json` naming another program as every engine's binary (the
    // attack of issue 10: rename a forged file over the supervisor's, wait for a restart and a
    // death) is refused as untrusted by a restarted supervisor, which restarts a killed
    // engine with the binary it knows instead; the forged program never runs.
    let mut c = Cluster::new("forged");
    let (script, marker) = c.marker_script("evil");
    let s = c.up();
    c.kill_supervisor();
    let engines: Vec<serde_json::Value> = s
        .engines
        .iter()
        .map(|e| {
            let identity = ProcessIdentity::of(e.pid).unwrap();
            serde_json::json!({
                "slot": e.slot,
                "pid": e.pid,
                "start_time_ticks": identity.start_time_ticks,
                "binary": script,
            })
        })
        .collect();
    let forged = serde_json::json!({
        "format": "understudy-engines",
        "version": 1,
        "engines": engines,
    });
    let temp = c.dir().join("forged.tmp");
    std::fs::write(&temp, serde_json::to_vec(&forged).unwrap()).unwrap();
    if is_root() {
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600)).unwrap();
        give_to_nobody(&temp);
    } else {
        eprintln!(
            "not root: the forged file is ours but mode 0666 (the other-owner case needs root)"
        );
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    std::fs::rename(&temp, c.dir().join("engines.json")).unwrap();

    let s = c.up();
    let log = std::fs::read_to_string(&c.log).unwrap_or_default();
    assert!(
        log.contains("not trusted"),
        "the restarted supervisor did not report the forged file:\n{}",
        c.log_tail(LOG_LINES)
    );
    assert!(s.engines.iter().all(|e| e.binary != script), "{s:#?}");
    // Kill the standby: the supervisor restarts it with a binary of its own choosing.
    let standby = s.hot_standbys().next().unwrap().clone();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(standby.pid as i32, libc::SIGKILL) };
    let s = c.wait(
        "the killed standby restarted and hot",
        Duration::from_secs(30),
        |s| {
            s.engine(&standby.slot)
                .is_some_and(|e| e.pid != standby.pid && e.state == "hot")
        },
    );
    assert!(!marker.exists(), "the forged binary ran");
    assert_eq!(s.engine(&standby.slot).unwrap().binary, testapp(), "{s:#?}");
    c.down_and_check_no_orphan();
}

#[test]
fn malformed_requests_get_a_json_result_and_run_nothing() {
    // Proves numeric ops, unknown fields, bytes that are not UTF-8, a line over 64 KiB, a
    // silent connection and 2,000 generated bad lines each get one JSON `result` line with
    // code `usage`, and none of them changes the cluster (no `down`, no switchover).
    let mut c = Cluster::new("proto");
    let before = c.up();
    let usage = |reply: &serde_json::Value, what: &str| {
        assert_eq!(reply["type"], "result", "{what}: {reply}");
        assert_eq!(reply["code"], "usage", "{what}: {reply}");
        assert_eq!(reply["v"], 1, "{what}: {reply}");
        reply["message"].as_str().unwrap_or_default().to_string()
    };
    let m = usage(&c.raw(b"{\"v\":1,\"op\":5}\n"), "op 5 (was down)");
    assert!(m.contains("`op`") && m.contains("found 5"), "{m}");
    usage(&c.raw(b"{\"v\":1,\"op\":1}\n"), "op 1 (was switchover)");
    let m = usage(
        &c.raw(b"{\"v\":1,\"op\":\"down\",\"binary\":\"x\"}\n"),
        "down with an unknown field",
    );
    assert!(m.contains("\"binary\""), "{m}");
    let m = usage(
        &c.raw(b"{\"v\":1,\"op\":\"st\xff\xfeatus\"}\n"),
        "not UTF-8",
    );
    assert!(m.contains("not UTF-8"), "{m}");
    let m = usage(&c.raw(b"\x00\x01\x02\n"), "binary junk");
    assert!(m.contains("not JSON"), "{m}");
    let mut huge = b"{\"v\":1,\"op\":\"status\",\"x\":\"".to_vec();
    huge.resize(100 * 1024, b'a');
    let m = usage(&c.raw(&huge), "a line over 64 KiB");
    assert!(m.contains("65536"), "{m}");
    // A silent connection is answered (and closed) after the request wait.
    let mut silent = UnixStream::connect(c.dir().join(SOCKET_NAME)).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut line = String::new();
    BufReader::new(&mut silent).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap();
    let m = usage(&reply, "silence");
    assert!(m.contains("within 5 s"), "{m}");

    // Generated bad lines: every one answered with a JSON result naming the problem.
    let mut seed = 0x5eed_0003u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let shapes: [&dyn Fn(u64) -> Vec<u8>; 6] = [
        &|n| format!("{{\"v\":1,\"op\":{}}}\n", n % 100).into_bytes(),
        &|n| format!("{{\"v\":{},\"op\":\"status\"}}\n", n % 5 + 2).into_bytes(),
        &|n| format!("{{\"v\":1,\"op\":\"status\",\"f{n}\":1}}\n").into_bytes(),
        &|n| format!("{{\"v\":1,\"op\":\"op{n}\"}}\n").into_bytes(),
        &|n| {
            let mut b = n.to_le_bytes().to_vec();
            b.push(0xff);
            b.push(b'\n');
            b
        },
        &|n| format!("[{n}, \"status\"]\n").into_bytes(),
    ];
    for i in 0..2000u64 {
        let n = next();
        let bytes = shapes[(i % shapes.len() as u64) as usize](n);
        assert!(
            Request::parse(bytes.strip_suffix(b"\n").unwrap_or(&bytes)).is_err(),
            "the generator made a valid request: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        usage(&c.raw(&bytes), &String::from_utf8_lossy(&bytes));
    }
    let after = c.try_status().expect("the supervisor still answers");
    assert_eq!(
        after.epoch, before.epoch,
        "a role change happened: {after:#?}"
    );
    assert_eq!(after.active, before.active);
    let pids = |s: &StatusReport| s.engines.iter().map(|e| e.pid).collect::<Vec<_>>();
    assert_eq!(pids(&after), pids(&before), "engines changed");
    c.down_and_check_no_orphan();
}

/// Raises this process's descriptor limit to at least `want` (the supervisor started after
/// it inherits the new limit too); `false` if it cannot.
fn raise_nofile(want: u64) -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return false;
    }
    if limit.rlim_cur >= want {
        return true;
    }
    limit.rlim_cur = want.min(limit.rlim_max.max(want));
    limit.rlim_max = limit.rlim_max.max(want);
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 }
}

/// Connects without blocking on a full accept queue: retried until `deadline`.
fn connect_bounded(path: &Path, deadline: Instant) -> Option<UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let address = UnixAddr::new(path).ok()?;
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .ok()?;
    loop {
        match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
            Ok(()) => return Some(UnixStream::from(fd)),
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR)
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => return None,
        }
    }
}

/// `status` with a 1 s timeout (a generous bound), its report, the engines it names noted in
/// `seen`; the error if it did not answer `Ok` in time.
fn status_within_1s(
    socket: &Path,
    seen: &mut Vec<ProcessIdentity>,
) -> Result<StatusReport, String> {
    let reply = Client::new(socket)
        .with_timeout(Duration::from_secs(1))
        .request(&Request::new(Op::Status), |_| {})
        .map_err(|e| e.to_string())?;
    if reply.code != Some(understudy_supervisor::proto::Code::Ok) {
        return Err(format!("expected an Ok result, found {reply:?}"));
    }
    let report: StatusReport =
        serde_json::from_value(reply.data).map_err(|e| format!("expected a status report: {e}"))?;
    for e in &report.engines {
        if let Ok(identity) = ProcessIdentity::of(e.pid) {
            if !seen.contains(&identity) {
                seen.push(identity);
            }
        }
    }
    Ok(report)
}

#[test]
fn two_thousand_idle_connections_neither_block_status_nor_orphan_an_engine_in_a_failover_and_an_upgrade(
) {
    // Proves a flood of 2,000 idle connections held open while the active is SIGKILLed and
    // then while the cluster is upgraded to v2 with `understudy upgrade` does not stop
    // `status` (each call bounded by a 1 s timeout, a generous bound), the failover and
    // restart, or the upgrade (exit 0, both engines on v2), and that no engine is left running
    // untracked: after `down`, every engine ever seen (v1 and v2) is gone. During the upgrade
    // the flood is renewed (the supervisor refuses idle connections after 5 s, or the oldest
    // beyond its pending bound), so it stays at its bound the whole time.
    let want = 4096;
    if !raise_nofile(want) {
        eprintln!("skipped: cannot raise RLIMIT_NOFILE to {want}");
        return;
    }
    let mut c = Cluster::new("flood");
    // A paced self-driving workload, so the upgrade's acceptance window sees requests (a
    // window without any is rolled back by design); no latency bound, which on a loaded
    // 2-core machine would say nothing about the engine.
    c.write_config_with_args(
        &testapp(),
        "\"--pace-us\", \"200\"",
        "[acceptance]\nmax_latency_us_p99 = 60000000\n",
    );
    let before = c.up();
    let socket = c.dir().join(SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut idle = std::collections::VecDeque::with_capacity(2000);
    while idle.len() < 2000 {
        assert!(
            Instant::now() < deadline,
            "only {} connections made in 120 s",
            idle.len()
        );
        if let Some(s) = connect_bounded(&socket, deadline) {
            idle.push_back(s);
        }
    }
    let status_1s = |c: &mut Cluster| -> StatusReport {
        let mut seen = Vec::new();
        let result = status_within_1s(&socket, &mut seen);
        c.note_engines(seen);
        result.unwrap_or_else(|e| panic!("status under the flood: {e}\n{}", c.log_tail(LOG_LINES)))
    };
    let s = status_1s(&mut c);
    assert_eq!(s.active, before.active);
    let active = s.active_engine().unwrap().clone();
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(active.pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status_1s(&mut c);
        let failed_over = s.active.is_some() && s.active != before.active;
        let restarted = s
            .engine(&active.slot)
            .is_some_and(|e| e.pid != active.pid && e.state == "hot");
        if failed_over && restarted {
            assert_eq!(s.engines.len(), 2, "{s:#?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failover and restart under the flood in 60 s: {s:#?}\n{}",
            c.log_tail(LOG_LINES)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The upgrade, with the flood renewed by one thread and `status` polled by another.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooder = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut renewed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // 10 every 50 ms: 1,000 in the supervisor's 5 s request wait, well above its
                // bound of 256 waiting connections, slowly enough that a `status` connection
                // is read long before 256 newer ones push it out.
                for _ in 0..10 {
                    let bound = Instant::now() + Duration::from_secs(1);
                    if let Some(s) = connect_bounded(&socket, bound) {
                        idle.pop_front();
                        idle.push_back(s);
                        renewed += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (idle, renewed)
        })
    };
    let poller = {
        let stop = stop.clone();
        let socket = socket.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let (mut answered, mut failures) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match status_within_1s(&socket, &mut seen) {
                    Ok(_) => answered += 1,
                    Err(e) => failures.push(e),
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (answered, failures, seen)
        })
    };
    let out_path = c.work().join("upgrade.out");
    let err_path = c.work().join("upgrade.err");
    let mut upgrade = c
        .cli()
        .args(["upgrade", "--binary"])
        .arg(testapp_version(2))
        .args(["--accept-for", "500ms"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let code = loop {
        if let Some(status) = upgrade.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = upgrade.kill();
            let _ = upgrade.wait();
            stop.store(true, Ordering::Relaxed);
            panic!(
                "`understudy upgrade` still runs after 120 s under the flood\n{}",
                c.log_tail(LOG_LINES)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop.store(true, Ordering::Relaxed);
    let (answered, failures, seen) = poller.join().expect("the status poller panicked");
    let (idle, renewed) = flooder.join().expect("the flooder panicked");
    c.note_engines(seen);
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(
        code,
        Some(0),
        "upgrade under the flood failed:\n{out}\n{err}\n{}",
        c.log_tail(LOG_LINES)
    );
    let last_step = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["data"]["event"] == "end")
        .filter_map(|l| l["data"]["step"].as_u64())
        .max();
    assert_eq!(
        last_step,
        Some(8),
        "the upgrade did not end its 8 steps:\n{out}"
    );
    eprintln!(
        "during the upgrade: {answered} status answers within 1 s, {} not; \
         {renewed} flood connections renewed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} status calls failed during the upgrade, the first: {}\n{}",
        failures.len(),
        answered + failures.len() as u64,
        failures[0],
        c.log_tail(LOG_LINES)
    );
    assert!(answered >= 1, "no status answered during the upgrade");
    assert!(renewed >= 1, "the flood was not renewed during the upgrade");
    let s = c.wait("both engines on v2", Duration::from_secs(30), |s| {
        s.active.is_some() && s.engines.len() == 2 && s.engines.iter().all(|e| e.app_version == 2)
    });
    assert!(s.hot_standbys().count() >= 1, "{s:#?}");
    drop(idle);
    c.down_and_check_no_orphan();
}

#[test]
fn a_supervisor_out_of_descriptors_still_answers_and_says_so_at_a_bounded_rate() {
    // Proves a supervisor at its descriptor limit (lowered with prlimit to 4 above what it
    // uses) under a flood of 500 idle connections still answers `status` (its accept errors
    // close idle connections to make room instead of spinning), and logs the accept errors
    // at most about once a second. It used to spin on accept() and leave `status` hanging.
    let mut c = Cluster::new("emfile");
    c.up();
    let sup_pid = c.supervisor().unwrap().id();
    let used = std::fs::read_dir(format!("/proc/{sup_pid}/fd"))
        .unwrap()
        .count() as u64;
    // Room for a few connections only: fewer than the 8 the socket lets wait at the least.
    let limit = libc::rlimit {
        rlim_cur: used + 4,
        rlim_max: used + 4,
    };
    // SAFETY: prlimit reads `limit` and writes nothing (null old-limit pointer).
    let set = unsafe {
        libc::prlimit(
            sup_pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    if set != 0 {
        eprintln!(
            "skipped: cannot lower the supervisor's RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if !raise_nofile(2048) {
        eprintln!("skipped: cannot raise this test's RLIMIT_NOFILE");
        return;
    }
    let socket = c.dir().join(SOCKET_NAME);
    let deadline = Instant::now() + Duration::from_secs(60);
    let idle: Vec<UnixStream> = (0..500)
        .filter_map(|_| connect_bounded(&socket, deadline))
        .collect();
    assert!(idle.len() >= 100, "only {} connections made", idle.len());
    let started = Instant::now();
    for _ in 0..3 {
        let reply = Client::new(&socket)
            .with_timeout(Duration::from_secs(5))
            .request(&Request::new(Op::Status), |_| {})
            .unwrap_or_else(|e| {
                panic!(
                    "status at the descriptor limit: {e}\n{}",
                    c.log_tail(LOG_LINES)
                )
            });
        assert_eq!(
            reply.code,
            Some(understudy_supervisor::proto::Code::Ok),
            "{reply:?}"
        );
    }
    // Keep the flood on for a while, then count the accept-error lines.
    std::thread::sleep(Duration::from_secs(2));
    let seconds = started.elapsed().as_secs() + 2;
    let log = std::fs::read_to_string(&c.log).unwrap_or_default();
    let warnings = log.lines().filter(|l| l.contains("accept failed")).count() as u64;
    assert!(
        warnings >= 1,
        "the descriptor limit was never reached (raise the flood?):\n{}",
        c.log_tail(LOG_LINES)
    );
    assert!(
        warnings <= seconds + 2,
        "{warnings} accept-error lines in ~{seconds} s: not rate-limited\n{}",
        c.log_tail(LOG_LINES)
    );
    drop(idle);
    // With the flood gone, the supervisor recovers fully.
    let limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: as above.
    unsafe {
        libc::prlimit(
            sup_pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    c.wait("status after the flood", Duration::from_secs(30), |s| {
        s.active.is_some()
    });
    c.down_and_check_no_orphan();
}

#[test]
fn flags_and_configs_out_of_bounds_exit_with_their_codes_and_a_failed_up_cleans_up() {
    // Proves `--accept-for` beyond its bound is a usage error (it panicked with exit 101), a
    // pinned CPU this machine does not have is a bad config (exit 10, it was 1 with "Invalid
    // argument") with nothing created, and an `up` whose engine dies while starting removes
    // the directories and files it created.
    let c = Cluster::new("bounds");
    let out = c
        .cli()
        .args([
            "upgrade",
            "--binary",
            "/bin/true",
            "--accept-for",
            "99999999999999999999s",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("at most") && err.contains("accept-for"),
        "{err}"
    );

    let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let absent = (0..1024)
        .find(|&i| !cpus.is_set(i).unwrap_or(true))
        .unwrap();
    c.write_config(&testapp(), &format!("[slots.a]\ncpu = {absent}\n"));
    let (code, err) = c.up_fails();
    assert_eq!(code, 10, "{err}");
    assert!(
        err.contains("slots.a.cpu") && err.contains(&absent.to_string()),
        "{err}"
    );
    assert!(
        !c.shm_dir.exists(),
        "a refused config created {}",
        c.shm_dir.display()
    );

    let (script, marker) = c.marker_script("dies");
    c.write_config(&script, "");
    let (code, err) = c.up_fails();
    assert_ne!(code, 0, "{err}");
    assert!(
        marker.exists(),
        "the engine should have been started once: {err}"
    );
    assert!(
        !c.dir().exists(),
        "the failed up left {:?} in {}: {err}",
        entries(&c.dir()),
        c.dir().display()
    );
    assert!(
        !c.shm_dir.exists(),
        "the failed up left {}",
        c.shm_dir.display()
    );
}

#[test]
fn doctor_reports_a_cluster_directory_others_could_write() {
    // Proves `doctor` fails (exit 12) on a cluster directory writable by others, naming it.
    let c = Cluster::new("doctor");
    std::fs::create_dir_all(c.dir()).unwrap();
    std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = c.cli().arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(12), "{text}");
    let check = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|c| c["name"] == "private cluster directories")
        .unwrap_or_else(|| panic!("no trust check in {text}"));
    assert_eq!(check["verdict"], "fail", "{check}");
    let found = check["found"].as_str().unwrap_or_default();
    assert!(
        found.contains(&c.dir().display().to_string()) && found.contains("0777"),
        "{check}"
    );
}
