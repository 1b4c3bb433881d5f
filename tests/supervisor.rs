//! End-to-end tests of the supervisor and the `understudy` CLI with real engine processes:
//! failover under random kills, a SIGKILLed supervisor, hung engines fenced, a crash loop
//! given up, rolling upgrades (completed, rejected, crashing, keep-standby, an engine killed
//! at every step) and operator errors.
//!
//! The engines are the testkit's test executables `understudy-testapp-v1`/`-v2`, found next to
//! `understudy` in the target directory: build them first with
//! `cargo build --workspace --bins` (a plain `cargo test --workspace` builds them too, because
//! the runtime crate's own integration tests need them).
//!
//! The invariant in every test: once the self-driving workload has run to its end, every
//! engine's digest equals the model's digest after exactly that many requests — no request
//! was lost or applied twice across the role changes — and after each kill the new active
//! stepped up with at least every request the dead active had acknowledged.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use understudy_runtime::control::{Control, Field, Role};
use understudy_runtime::engine::{execute_local, InputMeta};
use understudy_runtime::liveness::ProcessIdentity;
use understudy_runtime::store::Store;
use understudy_supervisor::proto::{Code, StatusReport};
use understudy_supervisor::record::{self, RECORD_FILE};
use understudy_test_support::child::{self, ChildGuard};
use understudy_test_support::cluster::{self, Supervised};
use understudy_testkit::{Model, TestApp};

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

fn testapp(version: u32) -> PathBuf {
    cluster::testapp(Path::new(CLI), version)
}

/// How long a test waits for the supervisor to answer, or for an active and a hot standby.
const UP_MAX: Duration = Duration::from_secs(20);
/// Log lines shown in a failure message.
const LOG_LINES: usize = 60;

/// One cluster under a private shm directory, with its supervisor, on the workspace harness
/// ([`Supervised`]: everything is killed and removed on drop, and dies with the test runner);
/// its engines run the self-driving workload of `max` requests paced `pace_us` apart.
struct Harness {
    cluster: Supervised,
    max: u64,
    pace_us: u64,
}

understudy_test_support::derefs_to_supervised!(Harness, cluster);

/// How long a frozen engine may take to stop.
const FREEZE_MAX: Duration = Duration::from_secs(20);

/// The restart settings of most tests: quick restarts, no crash-loop cutoff in practice.
const DEFAULT_RESTART: &str = "[restart]
backoff_initial_ms = 20
backoff_max_ms = 200
crash_loop_window_ms = 1000
crash_loop_max = 50
";

impl Harness {
    /// A cluster whose engines run `max` requests paced `pace_us` apart; `extra` is appended
    /// to the config.
    fn new(tag: &str, max: u64, pace_us: u64, extra: &str) -> Harness {
        let h = Harness {
            cluster: Supervised::new(Path::new(CLI), "sup", tag),
            max,
            pace_us,
        };
        h.write_config(&testapp(1), DEFAULT_RESTART, extra);
        h
    }

    /// (Re)writes the config: engines run `binary`, restarted as `restart` (a `[restart]`
    /// table) says; `extra` is appended.
    fn write_config(&self, binary: &Path, restart: &str, extra: &str) {
        let text = format!(
            r#"cluster = "{name}"
shm_dir = "{shm}"
[engine]
binary = "{bin}"
args = ["--max", "{max}", "--pace-us", "{pace_us}", "--side", "{side}"]
# Service times on a shared 2-vCPU machine running tests in parallel say nothing about the
# engine: no acceptance check in these tests may turn on them.
[acceptance]
max_latency_us_p99 = 60000000
{restart}
{extra}
"#,
            name = self.name,
            shm = self.shm_dir.display(),
            bin = binary.display(),
            max = self.max,
            pace_us = self.pace_us,
            side = self.side.display(),
        );
        self.cluster.write_config(&text);
    }

    /// Starts `understudy up` and waits until it answers with an active and a hot standby.
    fn up(&mut self) -> StatusReport {
        self.cluster.up(UP_MAX)
    }

    /// Starts `understudy up` with `env` and waits until it answers.
    fn start_supervisor(&mut self, env: &[(&str, &str)]) -> StatusReport {
        self.start(&[], env);
        self.wait("the supervisor to answer", UP_MAX, |_| true)
    }

    /// Waits for the workload to end on a stable active + hot standby, then checks both
    /// digests against the model (`enabled`: the `tagged` feature was on for the run).
    fn check_invariant(&self, models: &[u64]) -> StatusReport {
        let max = self.max;
        let s = self.wait(
            "the workload to finish on an active and a hot standby",
            Duration::from_secs(60),
            |s| {
                let Some(active) = s.active_engine() else {
                    return false;
                };
                active.commits == max
                    && s.hot_standbys()
                        .any(|e| e.commits == max && e.digest == active.digest)
            },
        );
        let active = s.active_engine().unwrap();
        assert!(
            models.contains(&active.digest),
            "digest after {max} requests: engine {} has {:#x}, the model {:x?}: a request was lost or applied twice\n{s:#?}",
            active.slot,
            active.digest,
            models
        );
        s
    }

    /// The model digest after `max` requests, v1 (features off) or v2 with `tagged` on.
    fn model(&self, enabled: bool) -> u64 {
        if !enabled {
            return Model::new(1).advance_to(self.max);
        }
        let mut app = TestApp::new(2);
        let mut store = Store::new();
        for k in 0..self.max {
            let meta = InputMeta {
                source: 1,
                request_seq: k,
                next_pos: k + 1,
                next_seq: k + 1,
            };
            execute_local(&mut app, &mut store, 1, &meta, &k.to_le_bytes());
        }
        store.digest()
    }

    /// Runs `understudy upgrade` to its end; returns the exit code and the JSON lines.
    fn upgrade(&self, args: &[&str]) -> (i32, Vec<serde_json::Value>) {
        let out = self.cli().arg("upgrade").args(args).output().unwrap();
        let lines = parse_lines(&out.stdout);
        (out.status.code().unwrap_or(-1), lines)
    }
}

/// The timestamp that starts a log line (`2026-01-02T03:04:05.678901Z`), as seconds since
/// the Unix epoch.
fn log_time_s(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?;
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min, sec) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + sec)
}

fn parse_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn version_of(s: &StatusReport, slot: &str) -> u64 {
    s.engine(slot).map_or(0, |e| e.app_version)
}

#[test]
fn twenty_random_kills_of_the_active_lose_nothing() {
    // Proves failover with a supervisor: after each SIGKILL of the active the standby steps
    // up with every acknowledged request, the supervisor restarts the dead engine as the new
    // standby, and the final state is the model's.
    let mut h = Harness::new("failover", 30_000, 150, "");
    h.up();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..20 {
        let s = h.wait("a hot standby", Duration::from_secs(20), |s| {
            s.active.is_some() && s.hot_standbys().count() >= 1
        });
        let epoch = s.epoch;
        // Vary the moment of the kill.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 80));
        let s = h.status();
        let Some(active) = s.active_engine().cloned() else {
            continue;
        };
        let acked = h.kill_engine(active.pid);
        let s = h.wait("the standby to step up", Duration::from_secs(10), |s| {
            s.epoch > epoch && s.active.is_some() && s.active.as_deref() != Some(&active.slot)
        });
        let new_active = s.active.clone().unwrap();
        let slot = understudy_runtime::control::slot_index(&new_active).unwrap();
        let step_up_commits = h.control().get(slot, Field::StepUpCommits);
        assert!(
            step_up_commits >= acked,
            "round {round}: engine {new_active} stepped up at {step_up_commits} commits, but {acked} were acknowledged"
        );
    }
    let s = h.check_invariant(&[h.model(false)]);
    assert!(
        s.role_changes.len() >= 10,
        "role changes reported: {:?}",
        s.role_changes
    );
}

#[test]
fn a_killed_supervisor_is_not_missed_and_readopts_its_engines() {
    // Proves the engines run on undisturbed while the supervisor is dead (same pids, and a
    // failover works without it), and that a restarted supervisor re-adopts them instead of
    // starting new ones, then restarts the missing standby with the binary it was configured
    // with — a wrapper script that `exec`s the engine, which /proc does not name.
    let mut h = Harness::new("readopt", 20_000, 200, "");
    let starts = h.work().join("starts");
    let wrapper = h.script(
        "engine",
        &format!(
            "echo \"$UNDERSTUDY_SLOT\" >> {starts}\nexec {bin} \"$@\"\n",
            starts = starts.display(),
            bin = testapp(1).display()
        ),
    );
    h.write_config(&wrapper, DEFAULT_RESTART, "");
    let before = h.up();
    let pids: Vec<(String, u32)> = before
        .engines
        .iter()
        .map(|e| (e.slot.clone(), e.pid))
        .collect();
    h.kill_supervisor();
    std::thread::sleep(Duration::from_millis(200));
    let after = h.up();
    let pids_after: Vec<(String, u32)> = after
        .engines
        .iter()
        .map(|e| (e.slot.clone(), e.pid))
        .collect();
    assert_eq!(
        pids, pids_after,
        "the engines were replaced instead of re-adopted"
    );

    // Failover while no supervisor runs.
    h.kill_supervisor();
    let active = after.active_engine().unwrap().clone();
    let standby = after.hot_standbys().next().unwrap().clone();
    let epoch = h.control().epoch();
    let acked = h.kill_engine(active.pid);
    let control = h.control();
    let slot = understudy_runtime::control::slot_index(&standby.slot).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(control.epoch() > epoch && control.active_slot() == Some(slot)) {
        assert!(
            Instant::now() < deadline,
            "the standby did not step up without the supervisor"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(control.get(slot, Field::StepUpCommits) >= acked);
    let s = h.up();
    assert_eq!(
        s.engine(&standby.slot).map(|e| e.pid),
        Some(standby.pid),
        "the surviving engine was not re-adopted"
    );
    let s = h.check_invariant(&[h.model(false)]);
    let started = std::fs::read_to_string(&starts).unwrap();
    assert_eq!(
        started.lines().collect::<Vec<_>>(),
        ["a", "b", active.slot.as_str()],
        "engine starts through the wrapper"
    );
    for e in &s.engines {
        assert_eq!(e.binary, wrapper, "{s:#?}");
    }
}

#[test]
fn a_hung_engine_is_fenced_by_the_supervisor_and_replaced() {
    // Proves the supervisor's own fence of a hung engine. A frozen (SIGSTOP) standby is
    // SIGKILLed once its heartbeat is 40 intervals old and comes back as a hot standby while
    // the active serves on undisturbed. A frozen active is SIGKILLed once its heartbeat is 10
    // intervals old — by the supervisor: the standby's own fence is set to 10 minutes here —
    // the standby steps up only after the frozen engine is dead (never two actives) with every
    // acknowledged request, and the killed engine comes back as the hot standby.
    let mut h = Harness::new(
        "hung",
        20_000,
        200,
        "[engine.env]\nUNDERSTUDY_HUNG_MS = \"600000\"\n",
    );
    let s = h.up();
    let active = s.active_engine().unwrap().clone();
    let standby = s.hot_standbys().next().unwrap().clone();

    // The standby hangs: only the supervisor watches it.
    let frozen = ProcessIdentity::of(standby.pid).unwrap();
    child::freeze(standby.pid, FREEZE_MAX);
    h.wait_log(
        &[
            "engine is hung; fencing it with SIGKILL",
            &format!("pid={}", standby.pid),
        ],
        Duration::from_secs(60),
    );
    let s = h.wait(
        "the fenced standby replaced by a hot one",
        Duration::from_secs(60),
        |s| {
            s.engine(&standby.slot)
                .is_some_and(|e| e.pid != standby.pid)
                && s.hot_standbys().any(|e| e.slot == standby.slot)
        },
    );
    assert!(!frozen.is_alive(), "the frozen standby survived its fence");
    assert_eq!(
        (s.active_engine().map(|e| e.pid), s.epoch),
        (Some(active.pid), active.epoch),
        "the active changed while only its standby hung"
    );

    // The active hangs.
    let epoch = s.epoch;
    let frozen = ProcessIdentity::of(active.pid).unwrap();
    child::freeze(active.pid, FREEZE_MAX);
    let acked = h.side().committed();
    let s = h.wait("a new active", Duration::from_secs(60), |s| {
        if s.epoch > epoch && s.active.is_some() {
            assert!(
                !frozen.is_alive(),
                "engine {} is active while the frozen active {} lives",
                s.active.as_deref().unwrap(),
                active.pid
            );
            return true;
        }
        false
    });
    h.wait_log(
        &[
            "engine is hung; fencing it with SIGKILL",
            &format!("pid={}", active.pid),
        ],
        Duration::from_secs(10),
    );
    assert!(
        !h.log_text().contains("active is hung"),
        "the standby fenced the active, not the supervisor"
    );
    let new_active = s.active.clone().unwrap();
    assert_ne!(new_active, active.slot);
    let slot = understudy_runtime::control::slot_index(&new_active).unwrap();
    let step_up_commits = h.control().get(slot, Field::StepUpCommits);
    assert!(
        step_up_commits >= acked,
        "engine {new_active} stepped up at {step_up_commits} commits, but {acked} were acknowledged"
    );
    h.wait(
        "the fenced active back as a hot standby",
        Duration::from_secs(60),
        |s| {
            s.hot_standbys()
                .any(|e| e.slot == active.slot && e.pid != active.pid)
        },
    );
    h.check_invariant(&[h.model(false)]);
}

#[test]
fn a_crash_looping_engine_is_given_up_while_the_active_serves_on() {
    // Proves the restart keeper's backoff and crash-loop cutoff: an engine that exits at once
    // on every start is restarted after 50, 100, 200, 400 ms (each delay honoured, read from
    // the log's timestamps; the SIGKILL that began it is not a crash: restarted at once),
    // then given up on after its fifth crash, which `status` and the log report; the active serves on throughout and is not fenced when it hangs with no
    // standby to take over (that would lose the state); a supervisor restarted once the
    // engine is fixed brings the standby back, and nothing was lost.
    let mut h = Harness::new("crashloop", 20_000, 200, "");
    let broken = h.work().join("break-b");
    let wrapper = h.script(
        "engine",
        &format!(
            "if [ \"$UNDERSTUDY_SLOT\" = b ] && [ -e {broken} ]; then\n  echo \"engine b: broken on purpose\" >&2\n  exit 1\nfi\nexec {bin} \"$@\"\n",
            broken = broken.display(),
            bin = testapp(1).display()
        ),
    );
    h.write_config(
        &wrapper,
        "[restart]\nbackoff_initial_ms = 50\nbackoff_max_ms = 400\ncrash_loop_window_ms = 600000\ncrash_loop_max = 4\n",
        "",
    );
    let s = h.up();
    let active = s.active_engine().unwrap().clone();
    assert_eq!(active.slot, "a");
    let b = s.engine("b").unwrap().pid;
    std::fs::write(&broken, "").unwrap();
    h.kill_engine(b);

    let mut backoffs = Vec::new();
    let s = h.wait("slot b given up", Duration::from_secs(60), |s| {
        if let Some(r) = s.restarts.iter().find(|r| r.slot == "b") {
            if backoffs.last() != Some(&r.backoff_ms) {
                backoffs.push(r.backoff_ms);
            }
        }
        s.crash_looping == ["b"]
    });
    let restarts = s.restarts.iter().find(|r| r.slot == "b").unwrap();
    assert_eq!((restarts.crashes, restarts.given_up), (5, true), "{s:#?}");
    assert!(
        backoffs.windows(2).all(|w| w[0] < w[1])
            && backoffs.iter().all(|b| [50, 100, 200, 400].contains(b)),
        "backoffs seen in status: {backoffs:?}"
    );
    assert_eq!(s.engine("b"), None, "{s:#?}");

    // The log: each restart of b waits its delay after the death that caused it.
    h.wait_log(
        &["crash loop: restarts of this slot stopped", "slot=b"],
        Duration::from_secs(10),
    );
    let log = h.log_text();
    let mut delays = Vec::new();
    let mut pending: Option<(f64, f64)> = None;
    for line in log.lines() {
        if line.contains("restarting the engine after a backoff") && line.contains("slot=b") {
            let delay_ms: f64 = line
                .split("delay_ms=")
                .nth(1)
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no delay in {line}"));
            delays.push(delay_ms as u64);
            pending = Some((log_time_s(line).unwrap(), delay_ms));
        } else if line.contains("engine started") && line.contains("slot=b") {
            if let Some((at, delay_ms)) = pending.take() {
                let waited_ms = (log_time_s(line).unwrap() - at) * 1000.0;
                assert!(
                    waited_ms >= delay_ms - 1.0,
                    "restarted {waited_ms:.1} ms after a {delay_ms} ms backoff: {line}"
                );
            }
        }
    }
    assert_eq!(
        delays,
        [50, 100, 200, 400],
        "restart delays in the log:\n{log}"
    );

    // The active serves on, in the same epoch.
    let before = s.active_engine().map_or(0, |e| e.commits);
    let s = h.wait(
        "the active to go on serving",
        Duration::from_secs(30),
        |s| {
            s.active_engine()
                .is_some_and(|e| e.pid == active.pid && e.commits > before)
        },
    );
    assert_eq!(s.epoch, active.epoch, "{s:#?}");

    // Hung with no standby: reported, not fenced.
    let frozen = ProcessIdentity::of(active.pid).unwrap();
    child::freeze(active.pid, FREEZE_MAX);
    h.wait_log(
        &[
            "no hot standby could take over",
            &format!("pid={}", active.pid),
        ],
        Duration::from_secs(60),
    );
    h.wait(
        "the hang to outlast the fence age three times",
        Duration::from_secs(60),
        |s| {
            s.engine("a")
                .is_some_and(|e| e.heartbeat_age_ms > 3 * 10 * 50)
        },
    );
    assert!(
        frozen.is_alive(),
        "the hung active without a standby was killed"
    );
    child::send_if_alive(active.pid, libc::SIGCONT);
    h.wait_log(&["heartbeat resumed", "slot=a"], Duration::from_secs(60));

    // Fixed: a restarted supervisor starts b again.
    std::fs::remove_file(&broken).unwrap();
    h.kill_supervisor();
    let s = h.up();
    assert_eq!(s.active_engine().map(|e| e.pid), Some(active.pid), "{s:#?}");
    assert!(s.crash_looping.is_empty(), "{s:#?}");
    h.check_invariant(&[h.model(false)]);
}

#[test]
fn a_full_upgrade_ends_with_both_engines_on_v2_with_features_enabled() {
    // Proves the one-command rolling upgrade under load: both engines end on v2 with the new
    // feature enabled on both, and the state is exactly the model's.
    let mut h = Harness::new("upgrade", 25_000, 150, "");
    h.up();
    let (code, lines) = h.upgrade(&[
        "--binary",
        testapp(2).to_str().unwrap(),
        "--accept-for",
        "300ms",
    ]);
    assert_eq!(
        code,
        0,
        "upgrade failed: {lines:#?}\n{}",
        h.log_tail(LOG_LINES)
    );
    let steps: Vec<u64> = lines
        .iter()
        .filter(|l| l["data"]["event"] == "end")
        .map(|l| l["data"]["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps.iter().max(), Some(&8), "{lines:#?}");
    let s = h.check_invariant(&[h.model(true)]);
    for e in &s.engines {
        assert_eq!(e.app_version, 2, "{s:#?}");
        assert_eq!(e.features, 1, "{s:#?}");
        assert_eq!(e.layout_version, 2, "{s:#?}");
    }
}

#[test]
fn an_upgrade_rejected_by_the_accept_command_rolls_back_to_v1() {
    // Proves a failing `--accept-cmd` makes the upgrade switch back: exit code 6, v1 active
    // with a hot v1 standby, nothing lost.
    let mut h = Harness::new("reject", 20_000, 150, "");
    h.up();
    let (code, lines) = h.upgrade(&[
        "--binary",
        testapp(2).to_str().unwrap(),
        "--accept-for",
        "200ms",
        "--accept-cmd",
        "false",
    ]);
    assert_eq!(code, 6, "{lines:#?}\n{}", h.log_tail(LOG_LINES));
    let result = lines.last().unwrap();
    assert!(
        result["message"]
            .as_str()
            .unwrap()
            .contains("accept command"),
        "{result}"
    );
    let s = h.check_invariant(&[h.model(false)]);
    for e in &s.engines {
        assert_eq!(e.app_version, 1, "{s:#?}");
    }
}

#[test]
fn an_upgrade_whose_new_version_crashes_rolls_back_to_v1() {
    // Proves a new version that crashes after becoming active is rolled back: the old engine
    // steps up (failover), an old-version standby is restored, exit code 6, nothing lost.
    let mut h = Harness::new("crash", 20_000, 150, "");
    h.up();
    let wrapper = h.work().join("v2-bad");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nTESTAPP_CRASH_AFTER_ACTIVE_MS=150 exec {} \"$@\"\n",
            testapp(2).display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&wrapper).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&wrapper, perms).unwrap();
    let (code, lines) = h.upgrade(&["--binary", wrapper.to_str().unwrap(), "--accept-for", "1s"]);
    assert_eq!(code, 6, "{lines:#?}\n{}", h.log_tail(LOG_LINES));
    let s = h.check_invariant(&[h.model(false)]);
    for e in &s.engines {
        assert_eq!(e.app_version, 1, "{s:#?}");
    }
}

#[test]
fn keep_standby_keeps_a_hot_standby_throughout_the_upgrade() {
    // Proves `--keep-standby`: sampled all along the upgrade, the cluster always has a hot
    // standby, except at the instant of the switchover itself (the old active re-attaching).
    let mut h = Harness::new("keep", 25_000, 150, "");
    h.up();
    let mut upgrade = h
        .cli()
        .args([
            "upgrade",
            "--keep-standby",
            "--accept-for",
            "300ms",
            "--binary",
        ])
        .arg(testapp(2))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = upgrade.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut samples = 0;
    let mut without = Vec::new();
    while upgrade.try_wait().unwrap().is_none() {
        if let Some(s) = h.try_status() {
            samples += 1;
            let switching = s
                .operation
                .as_deref()
                .is_some_and(|o| o.contains("switch over"));
            if s.hot_standbys().count() == 0 && !switching {
                without.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = upgrade.wait().unwrap().code();
    let lines = reader.join().unwrap();
    assert_eq!(code, Some(0), "{lines:#?}\n{}", h.log_tail(LOG_LINES));
    assert!(samples > 20, "only {samples} samples");
    assert!(without.is_empty(), "no hot standby in: {without:#?}");
    let s = h.check_invariant(&[h.model(true)]);
    assert!(s.engines.iter().all(|e| e.app_version == 2), "{s:#?}");
}

#[test]
fn an_engine_killed_at_each_step_of_the_upgrade_ends_in_a_safe_reported_state() {
    // Proves that whatever step an engine dies at (the active when a hot standby can take
    // over, else the newest engine), the upgrade ends with a reported outcome, the cluster
    // settles on an active and a hot standby, and nothing acknowledged is lost.
    for step in 1..=8u64 {
        let mut h = Harness::new(&format!("step{step}"), 12_000, 150, "");
        h.up();
        let mut upgrade = h
            .cli()
            .args(["upgrade", "--accept-for", "400ms", "--binary"])
            .arg(testapp(2))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(upgrade.stdout.take().unwrap());
        let mut lines = Vec::new();
        let mut killed = None;
        let mut began = false;
        for line in stdout.lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if killed.is_none() && v["data"]["event"] == "begin" && v["data"]["step"] == step {
                let s = h.status();
                let action = v["data"]["action"].as_str().unwrap_or("").to_string();
                // The engine being retired, if the step retires one (killing the active
                // while its only standby is being stopped is an outage, and reported as
                // one); else the active if a hot standby can take over; else the newest.
                // (A stop may already be over: then as if the step retired nothing.)
                let victim = action
                    .strip_prefix("stop engine ")
                    .and_then(|slot| s.engine(slot).cloned())
                    .or_else(|| {
                        if s.hot_standbys().count() > 0 {
                            s.active_engine().cloned()
                        } else {
                            s.engines
                                .iter()
                                .filter(|e| e.role != "active")
                                .max_by_key(|e| e.pid)
                                .cloned()
                        }
                    });
                began = true;
                if let Some(victim) = victim {
                    h.kill_engine(victim.pid);
                    killed = Some(victim.slot);
                }
            }
            lines.push(v);
        }
        let code = upgrade.wait().unwrap().code().unwrap();
        assert!(
            [0, 6, 7, 8].contains(&code),
            "step {step}: exit {code}\n{lines:#?}\n{}",
            h.log_tail(LOG_LINES)
        );
        assert!(began, "step {step} never began: {lines:#?}");
        if killed.is_none() {
            eprintln!("step {step}: only the active ran when the step began; nothing killed");
        }
        let last = lines.last().unwrap();
        assert_eq!(last["type"], "result", "step {step}: {last}");
        let s = h.check_invariant(&[h.model(false), h.model(true)]);
        assert!(s.active.is_some(), "step {step}: {s:#?}");
        let active = s.active_engine().unwrap();
        if code == 6 {
            assert_eq!(version_of(&s, &active.slot), 1, "step {step}: {s:#?}");
        }
    }
}

/// The old active SIGKILLed in the middle of the upgrade's switchover, after it handed over
/// (it already says "standby") and before its target claimed the next epoch (a test hook
/// stalls it there while it holds the mutex): its target steps up (the mutex is owner-died),
/// and the supervisor must see that failover, not declare an outage because no engine said
/// "active" at the moment of the death. (Found by the kill-at-each-step test under load.)
#[test]
fn the_old_active_killed_while_handing_over_is_a_failover_not_an_outage() {
    let extra = "[engine.env]\nUNDERSTUDY_TEST_STALL_BEFORE_UNLOCK_MS = \"3000\"\n";
    let mut h = Harness::new("handover-kill", 12_000, 150, extra);
    let s = h.up();
    let old = s.active_engine().cloned().unwrap();
    let upgrade = h
        .cli()
        .args(["upgrade", "--accept-for", "300ms", "--binary"])
        .arg(testapp(2))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Step 4: the old active has handed over (no engine says "active") and stalls.
    let c = h.control();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let slot = understudy_runtime::control::slot_index(&old.slot).unwrap();
        if Role::from_word(c.get(slot, Field::Role)) == Role::Standby && c.epoch() == s.epoch {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old active never handed over"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    h.kill_engine(old.pid);
    let out = upgrade.wait_with_output().unwrap();
    let lines = parse_lines(&out.stdout);
    let code = out.status.code().unwrap();
    assert!(
        [0, 6].contains(&code),
        "exit {code}: {lines:#?}\n{}",
        h.log_tail(LOG_LINES)
    );
    let log = h.log_text();
    assert!(
        !log.contains("outage"),
        "an outage was declared:\n{}",
        h.log_tail(LOG_LINES)
    );
    let s = h.check_invariant(&[h.model(false), h.model(true)]);
    assert!(s.active.is_some(), "{s:#?}");
}

/// Runs an upgrade to v2 whose supervisor holds before step `step` (the test hook), SIGKILLs
/// the supervisor there, checks that the engines run on and the record is on disk, restarts
/// the supervisor and waits until it has settled the upgrade. Returns the harness and the
/// final status, after checking what every outcome promises: the `upgrade` command failed
/// saying where to look, `status` showed the interrupted upgrade at once and then its outcome,
/// the record is gone, an active and a hot standby run, and no request was lost.
fn interrupt_upgrade_at(step: u64) -> (Harness, StatusReport) {
    let mut h = Harness::new(&format!("resume{step}"), 20_000, 200, "");
    let step_text = step.to_string();
    h.start_supervisor(&[("UNDERSTUDY_TEST_UPGRADE_PAUSE_AT_STEP", &step_text)]);
    h.wait(
        "an active and a hot standby",
        Duration::from_secs(20),
        |s| s.active.is_some() && s.hot_standbys().count() >= 1,
    );
    let upgrade = h
        .cli()
        .args(["upgrade", "--accept-for", "300ms", "--binary"])
        .arg(testapp(2))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let held = h.wait(
        &format!("the upgrade held before step {step}"),
        Duration::from_secs(60),
        |s| {
            s.operation
                .as_deref()
                .is_some_and(|o| o.contains("held by") && o.contains(&format!("step {step}/")))
        },
    );
    let record_path = h.dir().join(RECORD_FILE);
    let recorded = record::load(&h.dir(), &h.name)
        .unwrap()
        .expect("no upgrade record while the upgrade runs");
    assert!(
        recorded.progress.starts_with(&format!("step {step}/")) && recorded.outcome.is_none(),
        "{recorded:#?}"
    );

    h.kill_supervisor();
    let out = upgrade.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("understudy status"), "{stderr}");
    let engines: Vec<ProcessIdentity> = held
        .engines
        .iter()
        .map(|e| ProcessIdentity::of(e.pid).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        engines.iter().all(|e| e.is_alive()),
        "an engine died with its supervisor"
    );
    assert!(record_path.exists());

    let s = h.start_supervisor(&[]);
    let interrupted = s
        .interrupted_upgrade
        .as_ref()
        .unwrap_or_else(|| panic!("status does not show the interrupted upgrade: {s:#?}"));
    assert!(
        interrupted
            .at
            .as_deref()
            .is_some_and(|at| at.starts_with(&format!("step {step}/")))
            && interrupted.binary.as_deref() == Some(testapp(2).as_path()),
        "{interrupted:#?}"
    );
    h.wait(
        "the interrupted upgrade settled, with an active and a hot standby",
        Duration::from_secs(90),
        |s| {
            s.interrupted_upgrade
                .as_ref()
                .is_some_and(|i| i.outcome.is_some())
                && s.operation.is_none()
                && s.active.is_some()
                && s.hot_standbys().count() >= 1
        },
    );
    assert!(!record_path.exists(), "the record outlived the upgrade");
    let s = h.check_invariant(&[h.model(false)]);
    for e in &s.engines {
        assert_eq!(e.features, 0, "{s:#?}");
    }
    (h, s)
}

fn assert_settled(s: &StatusReport, code: Code, version: u64, decision: &str) {
    let interrupted = s.interrupted_upgrade.as_ref().unwrap();
    assert_eq!(interrupted.code, Some(code), "{interrupted:#?}");
    assert!(interrupted.decision.contains(decision), "{interrupted:#?}");
    let outcome = interrupted.outcome.as_deref().unwrap();
    assert!(
        outcome.contains("restarted supervisor does not go on"),
        "{outcome}"
    );
    for e in &s.engines {
        assert_eq!(e.app_version, version, "{s:#?}");
    }
}

#[test]
fn a_supervisor_killed_before_the_switchover_restarts_and_undoes_the_upgrade() {
    // Proves a supervisor SIGKILLed at step 2 (the old standby stopped, the new one about to
    // start): restarted, it shows the interrupted upgrade, keeps the old version active,
    // restores an old-version hot standby and reports `aborted`; nothing is lost.
    let (_h, s) = interrupt_upgrade_at(2);
    assert_settled(&s, Code::Aborted, 1, "undo it");
}

#[test]
fn a_supervisor_killed_during_acceptance_restarts_and_rolls_back() {
    // Proves a supervisor SIGKILLed at step 5 (the new version active, its acceptance check
    // about to run): restarted, it shows the interrupted upgrade and rolls back — the old
    // version active again with an old-version hot standby, `rolled-back` — since no verdict
    // was given; nothing is lost.
    let (_h, s) = interrupt_upgrade_at(5);
    assert_settled(&s, Code::RolledBack, 1, "roll back");
}

#[test]
fn a_supervisor_killed_after_acceptance_restarts_and_keeps_the_new_version() {
    // Proves a supervisor SIGKILLed at step 7 (the new version accepted, the old engine
    // stopped): restarted, it keeps the accepted new version, restores a new-version hot
    // standby, leaves the new features off and reports `aborted`; nothing is lost.
    let (_h, s) = interrupt_upgrade_at(7);
    assert_settled(&s, Code::Aborted, 2, "keep the accepted new version");
}

#[test]
fn an_upgrade_record_that_cannot_be_trusted_is_set_aside_and_the_cluster_left_as_found() {
    // Proves a restarted supervisor that finds an upgrade record of another version does not
    // act on it: status names what was expected and found, the record is moved aside, the
    // engines are the same processes, and the cluster is kept running.
    let mut h = Harness::new("badrecord", 5_000, 200, "");
    let before = h.up();
    h.kill_supervisor();
    std::fs::write(
        h.dir().join(RECORD_FILE),
        r#"{"format":"understudy-upgrade","version":2,"cluster":"x"}"#,
    )
    .unwrap();
    // Ours and private, as the supervisor writes it: what is refused here is its contents.
    std::fs::set_permissions(
        h.dir().join(RECORD_FILE),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let s = h.up();
    let interrupted = s.interrupted_upgrade.clone().unwrap();
    assert_eq!(interrupted.code, Some(Code::Failed), "{interrupted:#?}");
    assert!(
        interrupted.decision.contains("left as found")
            && interrupted
                .decision
                .contains("expected version 1, found version 2"),
        "{interrupted:#?}"
    );
    assert!(!h.dir().join(RECORD_FILE).exists());
    assert!(h.dir().join(record::REJECTED_FILE).exists());
    let pids = |s: &StatusReport| s.engines.iter().map(|e| e.pid).collect::<Vec<_>>();
    assert_eq!(pids(&s), pids(&before), "{s:#?}");
    assert!(h.log_text().contains("expected version 1, found version 2"));
    h.check_invariant(&[h.model(false)]);
}

#[test]
fn operator_errors_are_reported_clearly_with_their_exit_codes() {
    // Proves a misspelt config key, a missing engine binary and a missing supervisor each
    // give an exit code of their own and a message that names the problem.
    let work = std::env::temp_dir().join(format!("understudy-sup-errors-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let bad_key = work.join("bad-key.toml");
    std::fs::write(
        &bad_key,
        "cluster = \"x\"\nshm_dir = \"/dev/shm/understudy-sup-errors\"\n[engine]\nbinary = \"/bin/true\"\nbinarry = 1\n",
    )
    .unwrap();
    let out = Command::new(CLI)
        .args(["up", "--config"])
        .arg(&bad_key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    assert!(stderr.contains("binarry"), "{stderr}");

    let missing = work.join("missing.toml");
    std::fs::write(
        &missing,
        "cluster = \"x\"\nshm_dir = \"/dev/shm/understudy-sup-errors\"\n[engine]\nbinary = \"/nonexistent/engine\"\n",
    )
    .unwrap();
    let out = Command::new(CLI)
        .args(["up", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(10), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/engine") && stderr.contains("no such file"),
        "{stderr}"
    );

    let out = Command::new(CLI)
        .args(["status", "--config"])
        .arg(&missing)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(CLI).args(["frobnicate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
fn an_engine_started_by_hand_in_a_free_slot_is_reported() {
    // Proves the supervisor reports a live engine registered in a slot it did not start it
    // in: a warning naming the slot, the pid found and the pid expected (none here), the
    // `status` field `foreign_engines` (JSON and text), and that the report ends with the
    // engine; the cluster serves on throughout.
    let mut h = Harness::new("foreign", 1_000_000, 200, "");
    let before = h.up();
    assert!(before.foreign_engines.is_empty(), "{before:#?}");
    let dir = h.dir();
    let mut engine = ChildGuard::spawn(
        Command::new(testapp(1))
            // The cluster's ring size (an active refuses a standby with a smaller ring).
            .args(["--dir", dir.to_str().unwrap(), "--slot", "c", "--standby"])
            .args(["--ring", "8388608"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let pid = engine.id();
    let s = h.wait(
        "the hand-started engine in slot c reported",
        Duration::from_secs(30),
        |s| {
            s.foreign_engines
                .iter()
                .any(|f| f.slot == "c" && f.pid == pid)
        },
    );
    let f = s.foreign_engines.iter().find(|f| f.slot == "c").unwrap();
    assert_eq!(f.expected_pid, None, "{s:#?}");
    assert!(
        s.engine("c").is_none(),
        "not one of the supervisor's: {s:#?}"
    );
    assert!(s.active.is_some(), "the cluster serves on: {s:#?}");
    h.wait_log(
        &[
            "slot c",
            &format!("engine pid {pid} registered"),
            "no engine of this supervisor runs there",
        ],
        Duration::from_secs(10),
    );

    // `status --json` carries it; plain `status` prints it.
    let out = h.cli().arg("status").output().unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let foreign = &reply["data"]["foreign_engines"];
    assert_eq!(foreign[0]["slot"], "c", "{reply:#}");
    assert_eq!(foreign[0]["pid"], u64::from(pid), "{reply:#}");
    assert!(foreign[0]["expected_pid"].is_null(), "{reply:#}");
    let out = Command::new(CLI)
        .arg("--config")
        .arg(&h.config)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("engine c: pid {pid}"))
            && text.contains("was not started by the supervisor"),
        "{text}"
    );

    // Gone once the engine is.
    engine.kill();
    let s = h.wait(
        "the report to end with the engine",
        Duration::from_secs(30),
        |s| s.foreign_engines.is_empty(),
    );
    assert!(s.active.is_some(), "{s:#?}");
}

#[test]
fn doctor_finds_and_removes_the_files_of_a_dead_cluster() {
    // Proves `doctor` reports a cluster whose engines are all dead (exit 12) and `--fix`
    // removes its files.
    let shm = PathBuf::from(format!(
        "/dev/shm/understudy-sup-doctor-{}",
        std::process::id()
    ));
    let dead = shm.join("ghost");
    drop(Control::open_or_create(&dead).unwrap());
    let config =
        std::env::temp_dir().join(format!("understudy-doctor-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "cluster = \"ghost\"\nshm_dir = \"{}\"\n[engine]\nbinary = \"/bin/true\"\n",
            shm.display()
        ),
    )
    .unwrap();
    let run = |fix: bool| {
        let mut c = Command::new(CLI);
        c.args(["doctor", "--json", "--config"]).arg(&config);
        if fix {
            c.arg("--fix");
        }
        c.output().unwrap()
    };
    let out = run(false);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(12), "{text}");
    assert!(text.contains("ghost") && text.contains("--fix"), "{text}");
    let out = run(true);
    assert!(!dead.exists(), "{}", String::from_utf8_lossy(&out.stdout));
    let leftovers = parse_lines(&out.stdout)
        .into_iter()
        .find(|c| c["name"] == "leftover shared files")
        .unwrap();
    assert_eq!(leftovers["verdict"], "ok", "{leftovers}");
    let _ = std::fs::remove_dir_all(&shm);
    let _ = std::fs::remove_file(&config);
}
