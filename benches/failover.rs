//! Failover benchmarks with real engine processes (`understudy-testapp-v1`): step-up after a
//! SIGKILL of the active, planned switchover pause, and catch-up of a new standby on an active
//! holding a million work units. Each figure has a baseline measured in the same run.
//!
//! The figures are distributions over many role changes, not per-iteration timings, so this
//! bench has its own harness (`harness = false`, no criterion): it prints medians and p99 and
//! writes them to `benches/RESULTS-runtime.md`.
//!
//! Timestamps come from inside the engines wherever possible, so the bench thread never has to
//! spin on a 2-vCPU machine where the active and the standby each spin on one:
//!
//! - the control block's `LastStepUpNs` (CLOCK_REALTIME when the standby became active) and
//!   `LastStepUpDurNs` (the engine's own detection → active);
//! - the test workload's side channel (`--side`): CLOCK_MONOTONIC of every engine's last commit
//!   and of its first commit after it became active, and the longest gap between two of its
//!   consecutive commits.
//!
//! 1. **Step-up** (`kill`): SIGKILL the active at a random moment, with the active holding
//!    1 MiB and 1 GiB of touched memory (`--ballast-mib`); the standby spins (`--spin`).
//!    Measured: kill → the standby's first commit as active (it served a request), kill →
//!    `LastStepUpNs`. Baseline: kill → the dead active's pidfd becomes readable (what a
//!    pidfd-only design would wait for), measured on the same kill by blocking in `poll(2)`.
//!    After each kill a new standby starts in the dead slot and the next kill waits until it
//!    is hot.
//! 2. **Planned switchover** (`switch`): `cmd::SWITCHOVER` under a workload paced at 5 µs.
//!    Measured: the old active's last commit → the new active's first commit (the time no
//!    engine accepts work), and post → `LastStepUpNs`. Baseline: the longest gap between
//!    commits of the same active in a 2 ms window of normal running just before each switch.
//! 3. **Catch-up** (`catchup`): an active that keeps every unit (`--keep`) under a workload
//!    paced at 5 µs until it holds 1 M units; then a standby starts and catches up while the
//!    workload runs. Measured: standby spawn → hot, and the active's longest gap between
//!    commits during the catch-up. Baseline: the longest gap in 1 s windows before the standby
//!    starts and after it is hot.
//!
//! Build the engines first: `cargo build --release -p understudy-runtime --bins`, then
//! `cargo bench --bench failover` (about 4 minutes). Without `--bench` (e.g. `cargo test
//! --benches`) every part runs a few iterations only. Environment: `US_BENCH_KILLS` (kills at
//! 1 MiB, default 100), `US_BENCH_KILLS_LARGE` (kills at 1 GiB, default 30: each restart of a
//! 1 GiB standby takes about 2 s),
//! `US_BENCH_SWITCHES` (default 100), `US_BENCH_UNITS` (default 1000000), `US_BENCH_PARTS`
//! (comma-separated subset of `kill,switch,catchup`).

mod common;

use common::{fmt_ns, median, quantile, row, write_section, TABLE_HEAD};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use understudy_runtime::control::{
    cmd, monotonic_ns, realtime_ns, slot_cmd, Control, Field, Role, State,
};
use understudy_test_support::cluster::{role, state, Engines};
use understudy_test_support::{ChildGuard, Rng};
use understudy_testkit::Side;

const BUILD_HINT: &str = "cargo build --release -p understudy-runtime --bins";

/// The test engine next to this bench's directory (`target/release/understudy-testapp-v1`).
fn engine_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the bench runs from target/<profile>/deps");
    let bin = dir.join("understudy-testapp-v1");
    assert!(
        bin.exists(),
        "expected the test engine at {}, found nothing: build it first with `{BUILD_HINT}`",
        bin.display()
    );
    bin
}

/// A cluster directory under /dev/shm with its engine processes, on the workspace harness
/// ([`Engines`]): on drop (panics included) every engine is killed and reaped and the
/// directory removed, and every engine dies with the bench process.
struct Cluster {
    engines: Engines,
    bin: PathBuf,
    control: Control,
    spawned: usize,
}

impl Cluster {
    fn new(tag: &str) -> Cluster {
        // The engine executable first: a missing one must not leave a directory behind.
        let bin = engine_bin();
        let engines = Engines::new(&format!("bench-{tag}"));
        let control = engines.control();
        Cluster {
            engines,
            bin,
            control,
            spawned: 0,
        }
    }

    fn side(&self, slot: usize) -> Side {
        self.engines.side(slot)
    }

    /// Start an engine in `slot` with the common arguments and `extra`.
    fn spawn(&mut self, slot: usize, standby: bool, extra: &[&str]) {
        // US_BENCH_LOG_DIR keeps the engines' logs (at US_BENCH_LOG level) after the run.
        let log_dir =
            std::env::var_os("US_BENCH_LOG_DIR").map_or(self.engines.dir.clone(), PathBuf::from);
        let log = log_dir.join(format!("log-{slot}-{}", self.spawned));
        self.spawned += 1;
        let mut c = Command::new(&self.bin);
        c.args(self.engines.engine_args(slot, standby))
            .arg("--side")
            .arg(self.engines.side_path(slot))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("US_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        self.engines.start_logged(slot, &mut c, log);
    }

    /// Take the engine of `slot` out of the watch list (it is about to die on purpose).
    fn take(&mut self, slot: usize) -> ChildGuard {
        self.engines.take(slot)
    }

    /// Wait (bounded, polling every `step`) until `f`; panics naming `what`, or the engine
    /// that exited meanwhile.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        step: Duration,
        f: impl FnMut(&Control) -> bool,
    ) {
        let hint = format!("(if it rejects an argument, rebuild it: `{BUILD_HINT}`)");
        self.engines
            .wait_running(&self.control, what, timeout, step, &hint, f)
    }
}

fn pidfd_open(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags by value and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}) failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Block until `fd` is readable; false on timeout.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
        match r {
            1 => return true,
            0 => return false,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => panic!("poll(pidfd): {}", std::io::Error::last_os_error()),
        }
    }
}

fn env_count(name: &str, bench: u64, quick: u64, bench_mode: bool) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench_mode { bench } else { quick })
}

// ------------------------------------------------------------------ step-up after SIGKILL

struct KillFigures {
    kills: usize,
    first_commit: Vec<f64>,
    stepped_up: Vec<f64>,
    engine_dur: Vec<f64>,
    pidfd: Vec<f64>,
    seconds: f64,
}

fn bench_kill(ballast_mib: u64, kills: usize) -> KillFigures {
    let started = Instant::now();
    let mut cl = Cluster::new(&format!("kill-{ballast_mib}"));
    let mib = ballast_mib.to_string();
    // A light workload (one request per ms) so that the standby streams and the first request
    // after a step-up comes at once; every engine spins when idle.
    let spin = std::env::var("US_BENCH_SPIN").map_or(true, |v| v != "0");
    let mut args = vec!["--pace-us", "1000", "--ballast-mib", &mib];
    if spin {
        args.push("--spin");
    }
    let long = Duration::from_secs(60);
    let step = Duration::from_micros(200);
    cl.spawn(0, false, &args);
    cl.wait("a active", long, step, |c| role(c, 0) == Role::Active);
    cl.spawn(1, true, &args);
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ ballast_mib);
    let mut active = 0usize;
    let warmup = 2;
    let mut f = KillFigures {
        kills,
        first_commit: Vec::new(),
        stepped_up: Vec::new(),
        engine_dur: Vec::new(),
        pidfd: Vec::new(),
        seconds: 0.0,
    };
    for i in 0..kills + warmup {
        let standby = 1 - active;
        cl.wait(&format!("kill {i}: standby hot"), long, step, |c| {
            state(c, standby) == State::Hot && role(c, standby) == Role::Standby
        });
        // Past one pace interval, at a random phase of the workload.
        std::thread::sleep(Duration::from_micros(2000 + rng.next_u64() % 4000));
        let stepups = cl.control.get(standby, Field::StepUps);
        let mut victim = cl.take(active);
        let pidfd = pidfd_open(victim.id());
        let side = cl.side(standby);
        let (t_rt, t_mono) = (realtime_ns(), monotonic_ns());
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        let r = unsafe { libc::kill(victim.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        assert!(
            wait_readable(&pidfd, Duration::from_secs(30)),
            "kill {i}: the killed engine's pidfd never became readable"
        );
        let pidfd_ns = monotonic_ns() - t_mono;
        cl.wait(
            &format!("kill {i}: standby steps up"),
            Duration::from_secs(10),
            Duration::from_micros(50),
            |c| c.get(standby, Field::StepUps) > stepups && role(c, standby) == Role::Active,
        );
        cl.wait(
            &format!("kill {i}: first commit of the new active"),
            Duration::from_secs(10),
            Duration::from_micros(50),
            |_| side.first_commit_ns() > t_mono,
        );
        let first = side.first_commit_ns() - t_mono;
        let stepped = cl
            .control
            .get(standby, Field::LastStepUpNs)
            .saturating_sub(t_rt);
        let dur = cl.control.get(standby, Field::LastStepUpDurNs);
        let _ = victim.child_mut().wait();
        if i >= warmup {
            f.first_commit.push(first as f64);
            f.stepped_up.push(stepped as f64);
            f.engine_dur.push(dur as f64);
            f.pidfd.push(pidfd_ns as f64);
        }
        cl.spawn(active, true, &args);
        active = standby;
    }
    f.seconds = started.elapsed().as_secs_f64();
    f
}

// ------------------------------------------------------------------ planned switchover

struct SwitchFigures {
    switches: usize,
    pause: Vec<f64>,
    post_to_active: Vec<f64>,
    engine_dur: Vec<f64>,
    steady_gap: Vec<f64>,
    seconds: f64,
}

fn bench_switch(switches: usize) -> SwitchFigures {
    let started = Instant::now();
    let mut cl = Cluster::new("switch");
    let args = ["--spin", "--pace-us", "5"];
    let long = Duration::from_secs(30);
    let step = Duration::from_micros(200);
    cl.spawn(0, false, &args);
    cl.wait("a active", long, step, |c| role(c, 0) == Role::Active);
    cl.spawn(1, true, &args);
    let sides = [cl.side(0), cl.side(1)];
    let mut active = 0usize;
    let warmup = 3;
    let mut f = SwitchFigures {
        switches,
        pause: Vec::new(),
        post_to_active: Vec::new(),
        engine_dur: Vec::new(),
        steady_gap: Vec::new(),
        seconds: 0.0,
    };
    for i in 0..switches + warmup {
        let standby = 1 - active;
        cl.wait(&format!("switch {i}: standby hot"), long, step, |c| {
            state(c, standby) == State::Hot && role(c, standby) == Role::Standby
        });
        // Baseline: the longest gap between commits over 2 ms of normal running.
        std::thread::sleep(Duration::from_millis(1));
        sides[active].take_longest_gap_ns();
        std::thread::sleep(Duration::from_millis(2));
        let steady = sides[active].take_longest_gap_ns();
        let stepups = cl.control.get(standby, Field::StepUps);
        let (t_rt, t_mono) = (realtime_ns(), monotonic_ns());
        let seq = cl.control.post(cmd::SWITCHOVER, standby as u64);
        cl.wait(
            &format!("switch {i}: new active serving"),
            Duration::from_secs(10),
            Duration::from_micros(50),
            |c| {
                c.acked().0 == seq
                    && c.get(standby, Field::StepUps) > stepups
                    && role(c, standby) == Role::Active
                    && sides[standby].first_commit_ns() > t_mono
            },
        );
        assert_eq!(
            cl.control.acked().1,
            0,
            "switch {i}: the active refused the switchover"
        );
        let pause = sides[standby].first_commit_ns() as f64 - sides[active].last_commit_ns() as f64;
        let post = cl
            .control
            .get(standby, Field::LastStepUpNs)
            .saturating_sub(t_rt);
        let dur = cl.control.get(standby, Field::LastStepUpDurNs);
        if i >= warmup {
            f.pause.push(pause);
            f.post_to_active.push(post as f64);
            f.engine_dur.push(dur as f64);
            f.steady_gap.push(steady as f64);
        }
        active = standby;
    }
    f.seconds = started.elapsed().as_secs_f64();
    f
}

// ------------------------------------------------------------------ catch-up

struct CatchupFigures {
    units_target: u64,
    runs: Vec<CatchupRun>,
    gap_before: f64,
    fill_seconds: f64,
    seconds: f64,
}

struct CatchupRun {
    units_at_start: u64,
    to_hot_ns: f64,
    gap_during: f64,
    gap_after: f64,
}

fn bench_catchup(units: u64, runs: usize) -> CatchupFigures {
    let started = Instant::now();
    let mut cl = Cluster::new("catchup");
    // A 64 MiB stream: the snapshot (about 64 B a unit) and the live workload share it.
    let args = ["--spin", "--keep", "--pace-us", "5", "--ring", "67108864"];
    let long = Duration::from_secs(30);
    let step = Duration::from_micros(200);
    cl.spawn(0, false, &args);
    cl.wait("a active", long, step, |c| role(c, 0) == Role::Active);
    let fill = Instant::now();
    cl.wait(
        &format!("the active holds {units} units"),
        Duration::from_secs(180),
        Duration::from_millis(5),
        |c| c.get(0, Field::Commits) >= units,
    );
    let fill_seconds = fill.elapsed().as_secs_f64();
    let side = cl.side(0);
    side.take_longest_gap_ns();
    std::thread::sleep(Duration::from_secs(1));
    let gap_before = side.take_longest_gap_ns() as f64;
    let mut f = CatchupFigures {
        units_target: units,
        runs: Vec::new(),
        gap_before,
        fill_seconds,
        seconds: 0.0,
    };
    for i in 0..runs {
        let units_at_start = cl.control.get(0, Field::Commits);
        side.take_longest_gap_ns();
        let t = Instant::now();
        cl.spawn(1, true, &args);
        cl.wait(
            &format!("catch-up {i}: standby hot"),
            Duration::from_secs(60),
            Duration::from_micros(200),
            |c| state(c, 1) == State::Hot && role(c, 1) == Role::Standby,
        );
        let to_hot_ns = t.elapsed().as_nanos() as f64;
        let gap_during = side.take_longest_gap_ns() as f64;
        std::thread::sleep(Duration::from_secs(1));
        let gap_after = side.take_longest_gap_ns() as f64;
        f.runs.push(CatchupRun {
            units_at_start,
            to_hot_ns,
            gap_during,
            gap_after,
        });
        // Stop the standby cleanly (a killed one would make the active wait on a full ring
        // before it untethers it).
        cl.control.set(1, Field::Cmd, slot_cmd::STOP);
        let mut child = cl.take(1);
        child.wait_exit(
            &format!("catch-up {i}: the standby to stop on command"),
            Duration::from_secs(10),
        );
        cl.control.set(1, Field::Cmd, 0);
        std::thread::sleep(Duration::from_millis(200));
    }
    f.seconds = started.elapsed().as_secs_f64();
    f
}

// ------------------------------------------------------------------ report

fn dist(v: &[f64]) -> String {
    format!(
        "median {} · p99 {}",
        fmt_ns(median(v)),
        fmt_ns(quantile(v, 0.99))
    )
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let parts = std::env::var("US_BENCH_PARTS").unwrap_or_else(|_| "kill,switch,catchup".into());
    let want = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let load_start = common::load_note();
    let mut md = String::new();
    md.push_str("## Failover (`cargo bench --bench failover`)\n\n");
    md.push_str(TABLE_HEAD);
    let mut notes = String::new();

    if want("kill") {
        let small = env_count("US_BENCH_KILLS", 100, 3, bench_mode) as usize;
        let large = env_count("US_BENCH_KILLS_LARGE", 30, 2, bench_mode) as usize;
        for (mib, kills) in [(1u64, small), (1024, large)] {
            let f = bench_kill(mib, kills);
            let size = if mib >= 1024 { "1 GiB" } else { "1 MiB" };
            println!(
                "step-up after SIGKILL, active holding {size} ({} kills, {:.0} s)",
                f.kills, f.seconds
            );
            println!(
                "  kill → first request served by the new active  {}",
                dist(&f.first_commit)
            );
            println!(
                "  kill → stepped up (LastStepUpNs)                {}",
                dist(&f.stepped_up)
            );
            println!(
                "  engine detection → active (LastStepUpDurNs)    {}",
                dist(&f.engine_dur)
            );
            println!(
                "  baseline: kill → pidfd readable                 {}",
                dist(&f.pidfd)
            );
            let (m, p) = (median(&f.first_commit), quantile(&f.first_commit, 0.99));
            md.push_str(&row(
                &format!("step-up, active holding {size}: SIGKILL → new active served its first request ({} kills)", f.kills),
                &dist(&f.first_commit),
                &format!("pidfd readable: {} ({:.2}× the median)", dist(&f.pidfd), median(&f.pidfd) / m),
                "median < 100 µs, p99 < 1 ms",
                Some(m < 100e3 && p < 1e6),
            ));
            md.push_str(&row(
                &format!(
                    "step-up, {size}: SIGKILL → `LastStepUpNs` (epoch claimed, role published)"
                ),
                &dist(&f.stepped_up),
                "—",
                "—",
                None,
            ));
            md.push_str(&row(
                &format!("step-up, {size}: engine's own detection → active (`LastStepUpDurNs`)"),
                &dist(&f.engine_dur),
                "—",
                "—",
                None,
            ));
        }
        notes.push_str("- Step-up: every engine runs `--spin` (the standby never sleeps) and a workload paced at 1 request/ms; the kill lands 2–6 ms after the standby is hot, at a random phase. \"First request served\" is the new active's first commit (CLOCK_MONOTONIC, stamped inside the engine) minus the time taken just before `kill(2)`; it includes detection (owner-died robust mutex), draining the ring, claiming the epoch, resuming input and one transaction. The pidfd baseline is the same kill, the bench blocking in `poll(2)` on a pidfd opened before the kill: it includes the bench thread's wake-up, as a pidfd-only standby's would. `LastStepUpNs` is CLOCK_REALTIME, compared with CLOCK_REALTIME at the kill.\n");
    }

    if want("switch") {
        let n = env_count("US_BENCH_SWITCHES", 100, 3, bench_mode) as usize;
        let f = bench_switch(n);
        println!(
            "planned switchover ({} switchovers, {:.0} s)",
            f.switches, f.seconds
        );
        println!(
            "  old active's last commit → new active's first   {}",
            dist(&f.pause)
        );
        println!(
            "  post → stepped up (LastStepUpNs)                {}",
            dist(&f.post_to_active)
        );
        println!(
            "  engine lock → active (LastStepUpDurNs)         {}",
            dist(&f.engine_dur)
        );
        println!(
            "  baseline: longest commit gap in 2 ms, steady    {}",
            dist(&f.steady_gap)
        );
        md.push_str(&row(
            &format!("planned switchover pause: old active's last commit → new active's first commit ({} switchovers)", f.switches),
            &dist(&f.pause),
            &format!("longest gap between commits in 2 ms of normal running: {}", dist(&f.steady_gap)),
            "p99 < 200 µs",
            Some(quantile(&f.pause, 0.99) < 200e3),
        ));
        md.push_str(&row(
            "switchover: command posted → new active stepped up (`LastStepUpNs`)",
            &dist(&f.post_to_active),
            "—",
            "—",
            None,
        ));
        md.push_str(&row(
            "switchover: new active's lock → active (`LastStepUpDurNs`)",
            &dist(&f.engine_dur),
            "—",
            "—",
            None,
        ));
        notes.push_str("- Switchover: a workload paced at 5 µs (so the pause includes up to one pace interval before the old active sees the command); both engines `--spin`. The pause is measured between commit timestamps taken inside the two engines (CLOCK_MONOTONIC).\n");
    }

    if want("catchup") {
        let units = env_count("US_BENCH_UNITS", 1_000_000, 20_000, bench_mode);
        let runs = if bench_mode { 3 } else { 1 };
        let f = bench_catchup(units, runs);
        let hot: Vec<f64> = f.runs.iter().map(|r| r.to_hot_ns).collect();
        let during: Vec<f64> = f.runs.iter().map(|r| r.gap_during).collect();
        let after: Vec<f64> = f.runs.iter().map(|r| r.gap_after).collect();
        println!(
            "catch-up ({} runs, active filled to {} units in {:.1} s; {:.0} s in all)",
            f.runs.len(),
            f.units_target,
            f.fill_seconds,
            f.seconds
        );
        for (i, r) in f.runs.iter().enumerate() {
            println!(
                "  run {i}: {} units, spawn → hot {}, longest commit gap during {} / 1 s after {}",
                r.units_at_start,
                fmt_ns(r.to_hot_ns),
                fmt_ns(r.gap_during),
                fmt_ns(r.gap_after)
            );
        }
        println!(
            "  baseline: longest commit gap in 1 s before any standby {}",
            fmt_ns(f.gap_before)
        );
        let max_during = during.iter().cloned().fold(0.0, f64::max);
        let units_str = f
            .runs
            .iter()
            .map(|r| r.units_at_start.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        md.push_str(&row(
            &format!("catch-up: new standby spawn → hot, active holding {units_str} units (median of {})", f.runs.len()),
            &format!("{} (max {})", fmt_ns(median(&hot)), fmt_ns(hot.iter().cloned().fold(0.0, f64::max))),
            "—",
            "< 1 s",
            Some(median(&hot) < 1e9),
        ));
        md.push_str(&row(
            "catch-up: the active's longest gap between commits during catch-up (max over runs)",
            &fmt_ns(max_during),
            &format!(
                "longest gap in 1 s without a standby: {}; in 1 s with the hot standby after: {}",
                fmt_ns(f.gap_before),
                fmt_ns(after.iter().cloned().fold(0.0, f64::max))
            ),
            "< 1 ms",
            Some(max_during < 1e6),
        ));
        notes.push_str(&format!("- Catch-up: the active keeps every unit (`--keep`) under a workload paced at 5 µs, so the units keep growing while the standby catches up (units counted when the standby is spawned); catch-up chunk = the engine default (`Options::catchup_chunk`); 64 MiB stream. \"spawn → hot\" includes starting the process. The gaps are measured inside the active (the longest time between two consecutive commits, from the side channel), so they include any scheduler preemption: the machine has 2 vCPUs, with the active and the standby each spinning on one. Filling the active to {} units took {:.1} s.\n", f.units_target, f.fill_seconds));
    }

    md.push_str("\nNotes:\n\n");
    md.push_str(&format!(
        "- Machine: {load_start} at the start, {} at the end (other processes included).\n",
        common::load_note()
    ));
    md.push_str(&notes);
    print!("\n{md}");
    if bench_mode {
        write_section("failover", &md);
    }
}
