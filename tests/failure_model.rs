//! End-to-end tests of the supervisor's failure model with real engine processes, real
//! signals and real files under /dev/shm: the last copy of the state is never killed, a
//! damaged control block never causes a kill or a false outage, bursts of kills do not trip
//! the crash-loop breaker (and the operator can resume restarts it stopped), and the CLI's
//! word is true (`down`, `status`, acceptance, the accept command, rollback wording, an
//! upgrade binary that never registers).
//!
//! The engines are the testkit's test executables `understudy-testapp-v1`/`-v2` (see
//! `tests/supervisor.rs`), running a self-driving workload of `--max` requests; the invariant
//! checked at the end of a test is the same: every engine's digest equals the model's after
//! exactly that many requests.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use understudy_runtime::control::{slot_index, Field, Word};
use understudy_runtime::liveness::ProcessIdentity;
use understudy_supervisor::proto::{Code, StatusReport};
use understudy_test_support::cluster::{self, Supervised};
use understudy_testkit::Model;

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

fn testapp(version: u32) -> PathBuf {
    cluster::testapp(Path::new(CLI), version)
}

/// How long a test waits for an active and a hot standby.
const UP_MAX: Duration = Duration::from_secs(30);
/// How long the supervisor may take to exit after `down`.
const EXIT_MAX: Duration = Duration::from_secs(20);
/// Log lines shown in a failure message.
const LOG_LINES: usize = 60;

/// Quick timeouts: a standby counts as hung after 20 ms × 10 × 4 = 800 ms, an active after
/// 200 ms, and no active for 600 ms is an outage unless a second source says otherwise.
const QUICK: &str = "[timeouts]
heartbeat_ms = 20
switchover_ms = 600
";

/// One cluster under a private shm directory, with its supervisor, on the workspace harness
/// ([`Supervised`]: engines, supervisor and files are killed and removed on drop, also when
/// the test fails, frozen engines thawed first; everything dies with the test runner); its
/// engines run the self-driving workload of `max` requests.
struct Harness {
    cluster: Supervised,
    max: u64,
}

understudy_test_support::derefs_to_supervised!(Harness, cluster);

impl Harness {
    /// Engines run `max` requests paced `pace_us` apart; `args` are extra engine arguments,
    /// `extra` is appended to the config.
    fn new(tag: &str, max: u64, pace_us: u64, args: &str, extra: &str) -> Harness {
        let h = Harness {
            cluster: Supervised::new(Path::new(CLI), "fm", tag),
            max,
        };
        h.write_config(&testapp(1), pace_us, args, extra);
        h
    }

    fn write_config(&self, binary: &Path, pace_us: u64, args: &str, extra: &str) {
        let text = format!(
            r#"cluster = "{name}"
shm_dir = "{shm}"
[engine]
binary = "{bin}"
args = ["--max", "{max}", "--pace-us", "{pace_us}", "--side", "{side}"{args}]
[acceptance]
max_latency_us_p99 = 60000000
{extra}
"#,
            name = self.name,
            shm = self.shm_dir.display(),
            bin = binary.display(),
            max = self.max,
            side = self.side.display(),
        );
        self.cluster.write_config(&text);
    }

    /// Starts `understudy up` and waits for an active and a hot standby.
    fn up(&mut self) -> StatusReport {
        self.cluster.up(UP_MAX)
    }

    /// `understudy <args>`: exit code and the JSON lines it printed.
    fn run(&self, args: &[&str]) -> (i32, Vec<serde_json::Value>) {
        let out = self.cli().args(args).output().unwrap();
        let lines = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (out.status.code().unwrap_or(-1), lines)
    }

    /// Waits for the workload to end on an active and a hot standby with equal digests, and
    /// checks the digest against the model (v1, no feature on).
    fn check_invariant(&self) -> StatusReport {
        let max = self.max;
        let s = self.wait(
            "the workload to finish on an active and a hot standby",
            Duration::from_secs(90),
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
        let model = Model::new(1).advance_to(max);
        assert_eq!(
            active.digest, model,
            "digest after {max} requests: engine {} has {:#x}, the model {model:#x}: a request was lost or applied twice\n{s:#?}",
            active.slot, active.digest
        );
        s
    }
}

/// The log lines a destructive decision writes.
fn kills_and_outages(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| {
            l.contains("fencing it with SIGKILL")
                || l.contains("state is lost")
                || l.contains("outage: no")
        })
        .collect()
}

#[test]
fn a_stalled_standby_is_the_last_copy_when_the_active_dies_and_steps_up_when_resumed() {
    // Proves "the last copy is sacred": the standby is stopped (SIGSTOP) and the active
    // SIGKILLed at once; the standby then stays stalled for 3 times its fence threshold. The
    // supervisor does not kill it, says it waits for the last copy, and `status` exits 9
    // (outage) meanwhile; resumed (SIGCONT), the same process steps up with every request the
    // dead active acknowledged, the cluster gets a hot standby back, and nothing was lost.
    let mut h = Harness::new("lastcopy", 30_000, 200, "", QUICK);
    let s = h.up();
    let active = s.active_engine().unwrap().clone();
    let standby = s.hot_standbys().next().unwrap().clone();
    let stalled = ProcessIdentity::of(standby.pid).unwrap();

    h.freeze(standby.pid);
    let acked = h.kill_engine(active.pid);
    h.wait_log(
        &[
            "holds the latest committed state",
            "waiting for it to resume",
        ],
        Duration::from_secs(30),
    );
    // Past the standby fence threshold (800 ms) three times over.
    let stalled_until = Instant::now() + Duration::from_millis(2400);
    while Instant::now() < stalled_until {
        assert!(
            stalled.is_alive(),
            "the stalled last copy was killed; log:\n{}",
            h.log_tail(LOG_LINES)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, lines) = h.run(&["status"]);
    assert_eq!(
        code,
        Code::Outage.exit_code(),
        "status during the stall: {lines:?}"
    );
    assert!(
        lines
            .last()
            .and_then(|l| l["message"].as_str())
            .is_some_and(|m| m.contains("last copy")),
        "status names the last copy: {lines:?}"
    );

    h.thaw(standby.pid);
    let s = h.wait("the resumed standby active", Duration::from_secs(30), |s| {
        s.active_engine().is_some_and(|a| a.pid == standby.pid)
    });
    let slot = slot_index(&standby.slot).unwrap();
    let step_up_commits = h.control().get(slot, Field::StepUpCommits);
    assert!(
        step_up_commits >= acked,
        "engine {} stepped up at {step_up_commits} commits, but {acked} were acknowledged",
        standby.slot
    );
    assert!(s.epoch > active.epoch);
    let log = h.log_text();
    assert!(
        kills_and_outages(&log).is_empty(),
        "a kill or an outage was declared: {:?}",
        kills_and_outages(&log)
    );
    h.check_invariant();
    let (code, _) = h.run(&["status"]);
    assert_eq!(code, 0, "status once an engine is active again");
}

/// Flips `bit` of a control-block word for `hold`, again and again (a live engine repairs
/// what it owns within ~10 ms: this is a stuck bit), then puts the values found back.
/// `both`: flip the mirror copy too, so that no intact copy is left.
fn hold_flipped(dir: &Path, offsets: &[usize], bit: u32, hold: Duration) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("control"))
        .unwrap();
    let read = |off: usize| {
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, off as u64).unwrap();
        u64::from_le_bytes(b)
    };
    let originals: Vec<u64> = offsets.iter().map(|&o| read(o)).collect();
    let until = Instant::now() + hold;
    while Instant::now() < until {
        for (&off, &orig) in offsets.iter().zip(&originals) {
            file.write_all_at(&(orig ^ (1u64 << bit)).to_le_bytes(), off as u64)
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for (&off, &orig) in offsets.iter().zip(&originals) {
        file.write_all_at(&orig.to_le_bytes(), off as u64).unwrap();
    }
}

#[test]
fn a_flipped_bit_in_any_control_block_word_a_decision_reads_kills_nothing_and_declares_no_outage() {
    // Proves "the control block is verified, not trusted": a bit flipped (and kept flipped,
    // in both copies of a checked word, so that no intact copy is left) in each word a
    // supervisor decision reads — the epoch, the active slot, and the active's and the
    // standby's pid, start time, role, state, epoch and heartbeat — for longer than every
    // fence threshold and the outage delay. No engine is killed, no outage or lost state is
    // declared, the same two processes serve throughout, and nothing is lost.
    // Heartbeat 100 ms: the supervisor fences a hung active after 1 s and a hung standby
    // after 4 s (tolerant of a loaded 2-vCPU machine); the engines' own fence of a hung
    // active waits 10 s here, so that only the supervisor's decisions are under test.
    let mut h = Harness::new(
        "bitflip",
        40_000,
        300,
        "",
        "[timeouts]\nheartbeat_ms = 100\nswitchover_ms = 600\n[engine.env]\nUNDERSTUDY_HUNG_MS = \"10000\"\n",
    );
    let s = h.up();
    let active = s.active_engine().unwrap().clone();
    let standby = s.hot_standbys().next().unwrap().clone();
    let a = slot_index(&active.slot).unwrap();
    let b = slot_index(&standby.slot).unwrap();
    // Each flip outlasts the threshold a decision on that word would wait for: the outage
    // delay (600 ms), the active's fence (1 s), the standby's fence (4 s).
    let hold = |what: &str| {
        Duration::from_millis(if what == "standby heartbeat" {
            4500
        } else {
            1500
        })
    };
    let checked = |w: Word| vec![w.primary_offset(), w.mirror_offset()];
    let slot_word = |slot: usize, f: Field| Word::Slot { slot, field: f };
    // (what, word offsets, the bit: one that moves the value to a plausible wrong one)
    let mut cases: Vec<(String, Vec<usize>, u32)> = vec![
        ("epoch".into(), checked(Word::Epoch), 4),
        ("active slot".into(), checked(Word::ActiveSlot), 0),
    ];
    for (slot, who) in [(a, "active"), (b, "standby")] {
        for (f, bit) in [
            (Field::Pid, 2),
            (Field::StartTime, 3),
            (Field::Role, 1),
            (Field::State, 0),
            (Field::Epoch, 0),
        ] {
            cases.push((
                format!("{who} {}", f.name()),
                checked(slot_word(slot, f)),
                bit,
            ));
        }
        // The heartbeat is a plain word: an old-looking value.
        let hb = understudy_runtime::control::Field::HeartbeatNs as usize;
        let offset = (64 + slot * 32 + hb) * 8;
        cases.push((format!("{who} heartbeat"), vec![offset], 40));
    }
    for (what, offsets, bit) in &cases {
        hold_flipped(&h.dir(), offsets, *bit, hold(what));
        let s = h.wait(
            &format!("the cluster serving after a flip in `{what}`"),
            Duration::from_secs(10),
            |s| s.active.is_some(),
        );
        let pids: Vec<u32> = s.engines.iter().map(|e| e.pid).collect();
        assert!(
            pids.contains(&active.pid) && pids.contains(&standby.pid),
            "after a flip in `{what}` the engines are {pids:?}, expected {} and {}; log:\n{}",
            active.pid,
            standby.pid,
            h.log_tail(LOG_LINES)
        );
        let log = h.log_text();
        assert!(
            kills_and_outages(&log).is_empty(),
            "after a flip in `{what}`: {:?}",
            kills_and_outages(&log)
        );
    }
    // (After the last flip, an engine starved for 10 heartbeats on a loaded machine may be
    // fenced for real: only the flips' windows above are this test's business.)
    h.check_invariant();
    let log = h.log_text();
    let noticed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("suspect") || l.contains("damaged"))
        .collect();
    eprintln!(
        "{} log lines name a suspect or damaged control block word, e.g. {:?}",
        noticed.len(),
        noticed.iter().take(3).collect::<Vec<_>>()
    );
}

#[test]
fn kills_do_not_trip_the_crash_loop_breaker_and_resume_restarts_restarts_a_stopped_slot() {
    // Proves the breaker's counting and its reset: with a breaker of 1 crash, five SIGKILLs
    // of the standby in a burst are restarted every time (a kill from outside is not a
    // crash); an engine that exits on its own twice stops the slot's restarts; once it is
    // fixed, `understudy resume-restarts` (exit 0) brings the standby back without
    // restarting the supervisor, and nothing was lost.
    let mut h = Harness::new(
        "breaker",
        40_000,
        300,
        "",
        "[restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 100\ncrash_loop_window_ms = 600000\ncrash_loop_max = 1\n",
    );
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
        300,
        "",
        "[restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 100\ncrash_loop_window_ms = 600000\ncrash_loop_max = 1\n",
    );
    let s = h.up();
    assert_eq!(s.active.as_deref(), Some("a"));
    for kill in 0..5 {
        let b = h
            .wait("engine b running", Duration::from_secs(30), |s| {
                s.engine("b").is_some()
            })
            .engine("b")
            .unwrap()
            .pid;
        h.kill_engine(b);
        h.wait(
            &format!("engine b restarted after kill {kill}"),
            Duration::from_secs(30),
            |s| s.engine("b").is_some_and(|e| e.pid != b),
        );
    }
    let s = h.wait(
        "a hot standby after the burst",
        Duration::from_secs(60),
        |s| s.hot_standbys().count() == 1,
    );
    assert!(s.crash_looping.is_empty(), "{s:#?}");

    std::fs::write(&broken, "").unwrap();
    let b = s.engine("b").unwrap().pid;
    h.kill_engine(b);
    let s = h.wait("slot b given up", Duration::from_secs(60), |s| {
        s.crash_looping == ["b"]
    });
    assert_eq!(s.engine("b"), None);
    assert!(s.active.is_some(), "the active serves on: {s:#?}");

    std::fs::remove_file(&broken).unwrap();
    let (code, lines) = h.run(&["resume-restarts"]);
    assert_eq!(code, 0, "resume-restarts: {lines:?}");
    let s = h.wait(
        "a hot standby in slot b again",
        Duration::from_secs(60),
        |s| s.hot_standbys().any(|e| e.slot == "b") && s.crash_looping.is_empty(),
    );
    assert!(s.restarts.iter().all(|r| !r.given_up), "{s:#?}");
    h.check_invariant();
}

#[test]
fn down_always_answers_with_its_result() {
    // Proves that `down` reports the result it reached: in 4 clusters brought up and down,
    // the CLI exits 0 with a result line every time (the supervisor used to exit before its
    // socket thread had written the result), and the cluster directory is gone.
    for round in 0..4 {
        let mut h = Harness::new("down", 1_000_000, 500, "", "");
        h.up();
        let (code, lines) = h.run(&["down"]);
        let result = lines.iter().find(|l| l["type"] == "result");
        assert_eq!(
            (code, result.map(|r| r["code"].clone())),
            (0, Some(serde_json::json!("ok"))),
            "round {round}: {lines:?}\n{}",
            h.log_tail(LOG_LINES)
        );
        assert!(!h.dir().exists(), "round {round}: the cluster files remain");
        if let Some(mut child) = h.take_supervisor() {
            child.wait_exit("the supervisor", EXIT_MAX);
        }
    }
}

/// The result line of a CLI run.
fn result_of(lines: &[serde_json::Value]) -> serde_json::Value {
    lines
        .iter()
        .find(|l| l["type"] == "result")
        .cloned()
        .unwrap_or_default()
}

#[test]
fn refusals_count_against_acceptance_only_when_configured() {
    // Proves that a handler's business refusals are not engine failures: with one request in
    // 5 refused (a tagged request while the feature is off), the upgrade to v2 is accepted
    // and completes by default (the error rate limit is 1 %), and rolls back (exit 6) with
    // `count_refusals = true`, naming the refusals.
    for (count, expected) in [(false, 0), (true, 6)] {
        let mut h = Harness::new(
            "refusals",
            1_000_000,
            300,
            ", \"--tagged-every\", \"5\"",
            &format!("accept_for_ms = 800\ncount_refusals = {count}\n"),
        );
        h.up();
        let v2 = testapp(2);
        let (code, lines) = h.run(&["upgrade", "--binary", v2.to_str().unwrap(), "--no-enable"]);
        let result = result_of(&lines);
        eprintln!(
            "count_refusals = {count}: exit {code}: {}",
            result["message"]
        );
        assert_eq!(
            code,
            expected,
            "count_refusals = {count}: {result}\n{}",
            h.log_tail(LOG_LINES)
        );
        if count {
            assert!(
                result["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("refused")),
                "{result}"
            );
        }
    }
}

#[test]
fn an_acceptance_window_without_requests_is_not_enough_evidence() {
    // Proves that a soak with no traffic does not accept a new version: the workload has
    // ended before the upgrade, and the upgrade rolls back (exit 6) saying why.
    let mut h = Harness::new("noevidence", 500, 100, "", "");
    h.up();
    h.check_invariant();
    let v2 = testapp(2);
    let (code, lines) = h.run(&[
        "upgrade",
        "--binary",
        v2.to_str().unwrap(),
        "--accept-for",
        "300ms",
    ]);
    let result = result_of(&lines);
    assert_eq!(code, 6, "{result}\n{}", h.log_tail(LOG_LINES));
    assert!(
        result["message"]
            .as_str()
            .is_some_and(|m| m.contains("not enough evidence")),
        "{result}"
    );
}

#[test]
fn an_accept_command_that_times_out_is_killed_with_its_children() {
    // Proves that the acceptance command runs in its own process group, killed as a whole
    // when it outlives the acceptance timeout: a `sleep` it started in the background is
    // dead after the upgrade rolled back (exit 6), not left behind.
    let mut h = Harness::new(
        "acceptcmd",
        1_000_000,
        300,
        "",
        "[timeouts]\nstart_ms = 2000\n",
    );
    h.up();
    let pidfile = h.work().join("child.pid");
    let cmd = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
    let v2 = testapp(2);
    let (code, lines) = h.run(&[
        "upgrade",
        "--binary",
        v2.to_str().unwrap(),
        "--accept-for",
        "300ms",
        "--accept-cmd",
        &cmd,
    ]);
    assert_eq!(code, 6, "{}\n{}", result_of(&lines), h.log_tail(LOG_LINES));
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.contains(") Z") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the accept command's child {pid} survived its timeout"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_rollback_of_a_completed_upgrade_says_rollback() {
    // Proves the rollback's words: after a completed upgrade to v2 (features off), `rollback`
    // runs v1 again and its events and result speak of a rollback to the previous version,
    // never of "the new version" or an "upgrade completed".
    let mut h = Harness::new("rollback", 1_000_000, 300, "", "");
    h.up();
    let v2 = testapp(2);
    let (code, lines) = h.run(&[
        "upgrade",
        "--binary",
        v2.to_str().unwrap(),
        "--accept-for",
        "300ms",
        "--no-enable",
    ]);
    assert_eq!(code, 0, "{}\n{}", result_of(&lines), h.log_tail(LOG_LINES));
    let (code, lines) = h.run(&["rollback"]);
    assert_eq!(code, 0, "{}\n{}", result_of(&lines), h.log_tail(LOG_LINES));
    let text: Vec<String> = lines
        .iter()
        .filter_map(|l| l["message"].as_str().map(String::from))
        .collect();
    assert!(
        text.iter()
            .all(|m| !m.contains("new version") && !m.contains("upgrade completed")),
        "{text:#?}"
    );
    assert!(
        result_of(&lines)["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("rollback completed")),
        "{text:#?}"
    );
    let s = h.wait("both engines on v1", Duration::from_secs(30), |s| {
        s.engines.len() == 2 && s.engines.iter().all(|e| e.app_version == 1)
    });
    assert!(s.active.is_some());
}

#[test]
fn an_upgrade_binary_that_never_registers_is_aborted_and_the_old_standby_restored() {
    // Proves that an upgrade whose new binary never registers when the plan starts it (it
    // passes the compatibility check, then hangs before opening the cluster) ends `aborted`
    // (exit 8) with the old version's hot standby back — not "recovery failed: slot b is
    // still taken" (exit 7) while the hung process is still being killed.
    let mut h = Harness::new(
        "noregister",
        1_000_000,
        300,
        "",
        "[timeouts]\nstart_ms = 1500\n",
    );
    h.up();
    let once = h.work().join("registered-once");
    let hang = h.script(
        "hang",
        &format!(
            "if [ -e {once} ]; then exec sleep 600; fi\ntouch {once}\nexec {v2} \"$@\"\n",
            once = once.display(),
            v2 = testapp(2).display()
        ),
    );
    let (code, lines) = h.run(&["upgrade", "--binary", hang.to_str().unwrap()]);
    let result = result_of(&lines);
    assert_eq!(code, 8, "{result}\n{}", h.log_tail(LOG_LINES));
    let s = h.wait(
        "an old-version active and hot standby",
        Duration::from_secs(30),
        |s| s.active.is_some() && s.hot_standbys().count() == 1,
    );
    assert!(s.engines.iter().all(|e| e.app_version == 1), "{s:#?}");
}

#[test]
fn a_burst_of_kills_of_the_active_is_not_a_crash_loop_and_loses_nothing() {
    // Proves that kills from outside are not crashes: with the default breaker (5 crashes in
    // 10 s) and backoff, the active is SIGKILLed 8 times, each as soon as the restarted
    // engine is a hot standby again (a copy survives every kill; killing the only copy before
    // its standby is hot is an outage by nature, and on a loaded host the restart can take
    // longer than any fixed delay). Each killed engine is restarted at once (no backoff: until
    // it is hot the cluster has a single copy), the breaker never stops the restarts, no
    // outage is declared, and nothing acknowledged was lost.
    let mut h = Harness::new("burst", 30_000, 300, "", "");
    h.up();
    for kill in 0..8 {
        let s = h.wait(
            &format!("a hot standby before kill {kill}"),
            Duration::from_secs(30),
            |s| s.active.is_some() && s.hot_standbys().count() == 1,
        );
        let active = s.active_engine().unwrap().clone();
        let acked = h.kill_engine(active.pid);
        let s = h.wait(
            &format!("a new active after kill {kill}"),
            Duration::from_secs(30),
            |s| s.active_engine().is_some_and(|a| a.pid != active.pid),
        );
        let slot = slot_index(s.active.as_deref().unwrap()).unwrap();
        let step_up_commits = h.control().get(slot, Field::StepUpCommits);
        assert!(
            step_up_commits >= acked,
            "kill {kill}: stepped up at {step_up_commits} commits, {acked} were acknowledged"
        );
        assert!(s.crash_looping.is_empty(), "kill {kill}: {s:#?}");
    }
    let log = h.log_text();
    assert!(
        kills_and_outages(&log).is_empty(),
        "{:?}",
        kills_and_outages(&log)
    );
    assert!(!log.contains("restarting the engine after a backoff"));
    h.check_invariant();
}

#[test]
fn an_incompatible_binary_is_refused_before_anything_is_taken_out_of_service() {
    // Proves the compatibility check before the plan's first action: upgrading the test
    // application to another application (matchbook, the same engine runtime) ends
    // `aborted` (exit 8) with the reason, and the standby was never stopped (same processes,
    // still hot); then, after a completed upgrade to v2 with its feature enabled, a downgrade
    // to v1 is refused the same way.
    let mut h = Harness::new("incompatible", 1_000_000, 300, "", "accept_for_ms = 300\n");
    let before = h.up();
    let pids = |s: &StatusReport| {
        let mut p: Vec<u32> = s.engines.iter().map(|e| e.pid).collect();
        p.sort();
        p
    };
    let other = h.work().join("matchbook-v1");
    std::os::unix::fs::symlink(CLI, &other).unwrap();
    let (code, lines) = h.run(&["upgrade", "--binary", other.to_str().unwrap()]);
    let result = result_of(&lines);
    assert_eq!(code, 8, "{result}\n{}", h.log_tail(LOG_LINES));
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("nothing was changed")
            && (message.contains("another application") || message.contains("exited during")),
        "{result}"
    );
    let s = h.wait(
        "the same active and hot standby",
        Duration::from_secs(30),
        |s| s.active.is_some() && s.hot_standbys().count() == 1 && s.engines.len() == 2,
    );
    assert_eq!(pids(&s), pids(&before), "{s:#?}");

    let v2 = testapp(2);
    let (code, lines) = h.run(&["upgrade", "--binary", v2.to_str().unwrap()]);
    assert_eq!(code, 0, "{}\n{}", result_of(&lines), h.log_tail(LOG_LINES));
    let upgraded = h.wait("v2 with its feature on", Duration::from_secs(30), |s| {
        s.hot_standbys().count() == 1
            && s.engines.len() == 2
            && s.engines
                .iter()
                .all(|e| e.app_version == 2 && e.features != 0)
    });
    let v1 = testapp(1);
    let (code, lines) = h.run(&["upgrade", "--binary", v1.to_str().unwrap()]);
    let result = result_of(&lines);
    assert_eq!(code, 8, "{result}\n{}", h.log_tail(LOG_LINES));
    assert!(
        result["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was changed")),
        "{result}"
    );
    let s = h.wait("the same v2 engines", Duration::from_secs(30), |s| {
        s.active.is_some() && s.hot_standbys().count() == 1 && s.engines.len() == 2
    });
    assert_eq!(pids(&s), pids(&upgraded), "{s:#?}");
}

#[test]
fn a_stale_copy_is_not_declared_lost_and_promote_with_accept_loss_serves_from_it() {
    // The standby is frozen until the active untethers it (its copy stops at a closed
    // stream), then the active is SIGKILLed and the standby thawed: it holds a consistent but
    // stale copy and must not step up on its own. The supervisor's outage report says how far
    // the dead active got and what the standby holds; `promote` refuses without
    // `--accept-loss` (naming the loss) and with it makes the standby active from its copy;
    // the restarted engine then catches up from it and the workload finishes on a hot pair.
    // A small ring, so the frozen standby is untethered long before it would be fenced.
    let extra = format!("{QUICK}[ring]\ncapacity_bytes = 65536\n");
    let mut h = Harness::new("promote", 20_000, 200, "", &extra);
    let s = h.up();
    let active = s.active_engine().unwrap().clone();
    let standby = s.hot_standbys().next().unwrap().clone();
    h.freeze(standby.pid);
    h.wait(
        "the frozen standby untethered",
        Duration::from_secs(30),
        |s| {
            s.engines
                .iter()
                .any(|e| e.pid == standby.pid && e.state == "stale")
        },
    );
    h.kill_engine(active.pid);
    h.thaw(standby.pid);
    let line = h.wait_log(
        &["outage", "holds a copy that stopped at"],
        Duration::from_secs(30),
    );
    assert!(
        line.contains("the last active") && line.contains("committed"),
        "the outage says how far the dead active got: {line}"
    );
    let (code, lines) = h.run(&["promote", &standby.slot]);
    let message = lines
        .last()
        .and_then(|l| l["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert_ne!(code, 0, "promote without --accept-loss: {lines:?}");
    assert!(
        message.contains("--accept-loss") && message.contains("transactions"),
        "the refusal names the loss: {message}"
    );
    // What the stale standby holds, as `status` shows it before the promote.
    let held = h
        .wait("the stale copy in status", Duration::from_secs(10), |s| {
            s.engines
                .iter()
                .any(|e| e.pid == standby.pid && e.state == "stale")
        })
        .engines
        .iter()
        .find(|e| e.pid == standby.pid)
        .map(|e| e.commits)
        .unwrap();
    let (code, lines) = h.run(&["promote", &standby.slot, "--accept-loss"]);
    assert_eq!(
        code,
        0,
        "promote --accept-loss: {lines:?}\n{}",
        h.log_tail(LOG_LINES)
    );
    let done = lines
        .last()
        .and_then(|l| l["message"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        done.contains(&format!("its copy of {held} transactions")),
        "the promoted engine served from the copy status showed ({held} transactions): {done}"
    );
    let s = h.wait(
        "the promoted standby active",
        Duration::from_secs(30),
        |s| s.active_engine().is_some_and(|a| a.pid == standby.pid),
    );
    assert!(s.epoch > active.epoch);
    h.check_invariant();
}
