//! Rolling-upgrade benchmark (issue 6): a whole rolling upgrade of matchbook v1 → v2 under
//! load, measuring what the load generator sees, against the same load without an upgrade in
//! the same run.
//!
//! Each run starts a supervisor (`understudy up`, a real child process) for a cluster of two
//! matchbook v1 engines, exactly as `understudy demo` does: the engine executables are this
//! package's `understudy` binary under the names `matchbook-v1` and `matchbook-v2` (symbolic
//! links in a temporary directory). The load generator (`matchbook::loadgen`, 2 clients at a
//! fixed rate through the shared-memory client library) runs throughout. After a warm-up, the
//! bench lets the load run for a while, then asks the supervisor for the full rolling upgrade
//! to v2 (acceptance soak, then the new feature enabled) and records the time of every
//! upgrade step from the progress events on the control socket.
//!
//! Measured per run:
//! - the longest pause seen by the load generator during the upgrade: the longest time any
//!   request waited for its answer, over requests whose wait overlaps the upgrade;
//! - the p99 latency of requests sent during the upgrade.
//!
//! Baseline (same run, same load, no upgrade): the window of equal length just before the
//! upgrade began. The added p99 is the upgrade's p99 minus the baseline's.
//!
//! It also draws request latency over time across the first run's upgrade
//! (`benches/upgrade-latency.svg`: per-10 ms maximum and median, the baseline and upgrade
//! windows shaded, each upgrade step's start marked) and writes `benches/RESULTS-upgrade.md`.
//!
//! Run: `cargo bench --bench upgrade` (about a minute). Without `--bench` (`cargo test
//! --benches`) one short run and nothing written. Environment: `US_BENCH_RUNS` (default 5),
//! `US_BENCH_RATE` (requests/s per client, default 2500), `US_BENCH_ACCEPT_MS` (acceptance
//! soak, default 1000), `US_BENCH_ENGINE_IDLE` (the engines' `UNDERSTUDY_IDLE`; default: the
//! engine default, spin a little then sleep 50 µs).

mod common;

use common::{fmt_ns, row, TABLE_HEAD};
use matchbook::loadgen::{LoadConfig, LoadGen, LoadReport};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use understudy_supervisor::proto::{Code, Op, Request, UpgradeEvent, UpgradeRequest};
use understudy_test_support::cluster::Supervised;
use understudy_test_support::Wait;

/// The multi-call `understudy` executable of this package (built by cargo for the bench).
const EXE: &str = env!("CARGO_BIN_EXE_understudy");

/// A supervised cluster on the workspace harness ([`Supervised`]): the supervisor child, its
/// engines, the temporary directory with the config and the engine links, and the cluster's
/// shared-memory directory. On drop (panics included): a clean `down` if the supervisor
/// answers within 5 s, then the harness SIGKILLs every engine and the supervisor and removes
/// both directories (the temporary one is kept with `US_BENCH_KEEP`). Everything dies with
/// the bench process too.
struct Stage {
    cluster: Supervised,
    cluster_dir: PathBuf,
    v2: PathBuf,
}

/// How long a stage waits for an active engine and a hot standby.
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// How long a stage's drop waits for a clean `down`.
const DOWN_MAX: Duration = Duration::from_secs(5);

impl Stage {
    fn start(run: usize, accept_ms: u64) -> Stage {
        let mut cluster = Supervised::new(Path::new(EXE), "bench-upgrade", &format!("r{run}"));
        if std::env::var_os("US_BENCH_KEEP").is_some() {
            cluster.keep_work();
        }
        let v1 = cluster.work().join("matchbook-v1");
        let v2 = cluster.work().join("matchbook-v2");
        for link in [&v1, &v2] {
            std::os::unix::fs::symlink(EXE, link).expect("link the engine executable");
        }
        let mut env = format!(
            "RUST_LOG = \"{}\"",
            std::env::var("US_BENCH_LOG").unwrap_or_else(|_| "warn".into())
        );
        if let Ok(idle) = std::env::var("US_BENCH_ENGINE_IDLE") {
            let _ = write!(env, ", UNDERSTUDY_IDLE = \"{idle}\"");
        }
        cluster.write_config(&format!(
            "cluster = \"{}\"\nshm_dir = \"{}\"\n\n[engine]\nbinary = \"{}\"\nenv = {{ {env} }}\n\n[acceptance]\naccept_for_ms = {accept_ms}\n",
            cluster.name,
            cluster.shm_dir.display(),
            v1.display(),
        ));
        let log_level = std::env::var("US_BENCH_SUPERVISOR_LOG").unwrap_or_else(|_| "info".into());
        cluster.start(&[], &[("RUST_LOG", &log_level)]);
        let mut stage = Stage {
            cluster_dir: cluster.dir(),
            cluster,
            v2,
        };
        stage.wait_settled("the cluster: an active engine and a hot standby");
        stage
    }

    fn wait_settled(&mut self, what: &str) {
        let log = self.cluster.log.clone();
        let cluster = &mut self.cluster;
        Wait::new(what, SETTLE_MAX)
            .every(Duration::from_millis(10))
            .until(|| {
                let ok = cluster.try_status().is_some_and(|s| {
                    s.active_engine().is_some()
                        && s.hot_standbys().count() >= 1
                        && s.operation.is_none()
                });
                if let Some(status) = cluster.supervisor().and_then(|s| s.try_wait()) {
                    panic!(
                        "the supervisor exited ({status}) while waiting for {what}; its log: {}",
                        log.display()
                    );
                }
                ok
            })
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if self.cluster.supervisor().is_some() {
            let ctl = self.cluster.client();
            let h = std::thread::spawn(move || ctl.request(&Request::new(Op::Down), |_| {}));
            let t = Instant::now();
            while !h.is_finished() && t.elapsed() < DOWN_MAX {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The harness kills what is left and removes the files.
    }
}

/// One upgrade step's start, µs on the load generator's clock.
struct StepMark {
    t_us: u64,
    step: u8,
    name: String,
}

struct Run {
    report: LoadReport,
    baseline: (u64, u64),
    upgrade: (u64, u64),
    steps: Vec<StepMark>,
    pause_upgrade_ns: u64,
    pause_baseline_ns: u64,
    p99_upgrade_ns: u64,
    p99_baseline_ns: u64,
    p50_upgrade_ns: u64,
    p50_baseline_ns: u64,
    count_upgrade: u64,
    count_baseline: u64,
    lost: u64,
    duplicated: u64,
    upgrade_s: f64,
}

fn one_run(run: usize, rate: u64, accept_ms: u64, pre: Duration, warm: Duration) -> Run {
    let stage = Stage::start(run, accept_ms);
    let mut cfg = LoadConfig::new(&stage.cluster_dir);
    cfg.clients = 2;
    cfg.rate_per_client = rate;
    cfg.seed = 42 + run as u64;
    let load = LoadGen::start(&cfg).expect("start the load generator");
    std::thread::sleep(warm);
    let warm_to_us = load.now_us();
    std::thread::sleep(pre);
    let mut steps = Vec::new();
    let up_from = load.now_us();
    let up_t = Instant::now();
    let reply = stage
        .cluster
        .client()
        .request(
            &Request::new(Op::Upgrade(UpgradeRequest {
                binary: stage.v2.clone(),
                accept_for_ms: Some(accept_ms),
                accept_cmd: None,
                keep_standby: false,
                no_enable: false,
                ..Default::default()
            })),
            |r| {
                let t_us = load.now_us();
                if let Ok(ev) = serde_json::from_value::<UpgradeEvent>(r.data.clone()) {
                    if ev.event == "begin" {
                        steps.push(StepMark {
                            t_us,
                            step: ev.step,
                            name: ev.name.clone(),
                        });
                    }
                }
            },
        )
        .expect("the upgrade request");
    let upgrade_s = up_t.elapsed().as_secs_f64();
    let up_to = load.now_us();
    let outcome = if reply.code == Some(Code::Ok) {
        "ok".to_string()
    } else {
        format!("failed: {}", reply.message)
    };
    // A little running after the upgrade, so the plot shows the new version serving.
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop().expect("stop the load generator");
    drop(stage);
    assert!(
        outcome == "ok",
        "run {run}: the rolling upgrade {outcome}; expected it to succeed"
    );
    let len = up_to - up_from;
    let base_from = up_from.saturating_sub(len).max(warm_to_us);
    let baseline = (base_from, up_from);
    let upgrade = (up_from, up_to);
    let hb = report.histogram(baseline.0, baseline.1);
    let hu = report.histogram(upgrade.0, upgrade.1);
    Run {
        pause_upgrade_ns: report.longest_wait_ns(upgrade.0, upgrade.1),
        pause_baseline_ns: report.longest_wait_ns(baseline.0, baseline.1),
        p99_upgrade_ns: hu.value_at_quantile(0.99),
        p99_baseline_ns: hb.value_at_quantile(0.99),
        p50_upgrade_ns: hu.value_at_quantile(0.5),
        p50_baseline_ns: hb.value_at_quantile(0.5),
        count_upgrade: hu.len(),
        count_baseline: hb.len(),
        lost: report.total(|c| c.lost),
        duplicated: report.total(|c| c.duplicated),
        report,
        baseline,
        upgrade,
        steps,
        upgrade_s,
    }
}

// ------------------------------------------------------------------------------------ plot

/// The plot of `run`: per-10 ms maximum and median latency of requests by send time, log
/// scale, from a little before the baseline window to a little after the upgrade.
fn svg(run: &Run, rate: u64) -> String {
    const W: f64 = 1000.0;
    const H: f64 = 520.0;
    const L: f64 = 70.0; // left margin
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 150.0; // room for the x axis and the step legend
    const BIN_US: u64 = 10_000;
    let from_us = run.baseline.0.saturating_sub(200_000);
    let to_us = run.upgrade.1 + 300_000;
    let bins = ((to_us - from_us) / BIN_US + 1) as usize;
    let mut per_bin: Vec<Vec<u64>> = vec![Vec::new(); bins];
    for a in run.report.clients.iter().flat_map(|c| c.answered.iter()) {
        if a.sent_us >= from_us && a.sent_us < to_us {
            per_bin[((a.sent_us - from_us) / BIN_US) as usize].push(a.latency_ns);
        }
    }
    let mut maxes = Vec::new();
    let mut medians = Vec::new();
    for (i, b) in per_bin.iter_mut().enumerate() {
        if b.is_empty() {
            continue;
        }
        b.sort_unstable();
        let t = from_us + i as u64 * BIN_US + BIN_US / 2;
        maxes.push((t, *b.last().expect("non-empty")));
        medians.push((t, b[b.len() / 2]));
    }
    let lo_us = medians
        .iter()
        .map(|p| p.1 as f64 / 1e3)
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi_us = maxes
        .iter()
        .map(|p| p.1 as f64 / 1e3)
        .fold(1000.0, f64::max);
    let (y_lo, y_hi) = (lo_us.log10().floor(), hi_us.log10().ceil());
    let x = |t_us: u64| L + (t_us - from_us) as f64 / (to_us - from_us) as f64 * (W - L - R);
    let y = |lat_ns: u64| {
        let v = (lat_ns as f64 / 1e3).max(10f64.powf(y_lo)).log10();
        T + (y_hi - v) / (y_hi - y_lo) * (H - T - B)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{L}" y="22" font-size="15">matchbook rolling upgrade v1 → v2 under load ({} req/s): request latency by send time</text>"#,
        2 * rate
    );
    // Windows.
    for ((a, b), fill, label) in [
        (run.baseline, "#e8f0ff", "baseline (no upgrade)"),
        (run.upgrade, "#fff0e0", "upgrade"),
    ] {
        let _ = writeln!(
            s,
            r##"<rect x="{:.1}" y="{T}" width="{:.1}" height="{:.1}" fill="{fill}"/><text x="{:.1}" y="{:.1}" fill="#666">{label}</text>"##,
            x(a),
            x(b) - x(a),
            H - T - B,
            x(a) + 4.0,
            T + 14.0
        );
    }
    // Y axis: decades.
    let mut d = y_lo as i32;
    while d as f64 <= y_hi {
        let ns = 10f64.powi(d) * 1e3;
        let yy = y(ns as u64);
        let label = if d >= 3 {
            format!("{} ms", 10f64.powi(d - 3))
        } else {
            format!("{} µs", 10f64.powi(d))
        };
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{label}</text>"##,
            W - R,
            L - 6.0,
            yy + 4.0
        );
        d += 1;
    }
    // The target: no pause over 1 ms.
    let y1ms = y(1_000_000);
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{y1ms:.1}" x2="{:.1}" y2="{y1ms:.1}" stroke="#c00" stroke-dasharray="6 4"/><text x="{:.1}" y="{:.1}" fill="#c00" text-anchor="end">target: 1 ms</text>"##,
        W - R,
        W - R - 4.0,
        y1ms - 4.0
    );
    // X axis: seconds since the load started.
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#333"/><line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="#333"/>"##,
        H - B,
        W - R,
        H - B,
        H - B
    );
    let mut sec = from_us.div_ceil(1_000_000);
    while sec * 1_000_000 <= to_us {
        let xx = x(sec * 1_000_000);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{sec}</text>"##,
            H - B,
            H - B + 5.0,
            H - B + 18.0
        );
        sec += 1;
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the load started (s)</text>"#,
        (L + W - R) / 2.0,
        H - B + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">latency (log scale)</text>"#,
        (T + H - B) / 2.0
    );
    // Step marks.
    for (i, m) in run.steps.iter().enumerate() {
        let xx = x(m.t_us);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{T}" x2="{xx:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="2 3"/><text x="{:.1}" y="{:.1}" fill="#444" font-size="11">{}</text>"##,
            H - B,
            xx + 2.0,
            T + 28.0 + (i % 4) as f64 * 12.0,
            m.step
        );
    }
    // Lines.
    for (pts, color, width) in [(&medians, "#6a9fd8", 1.0), (&maxes, "#b03030", 1.2)] {
        let mut p = String::new();
        for &(t, v) in pts.iter() {
            let _ = write!(p, "{:.1},{:.1} ", x(t), y(v));
        }
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}"/>"#,
            p.trim_end()
        );
    }
    // Legend.
    let ly = H - B + 52.0;
    let _ = writeln!(
        s,
        r##"<line x1="{L}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="#b03030" stroke-width="2"/><text x="{:.1}" y="{:.1}">max latency per 10 ms</text><line x1="{:.1}" y1="{ly}" x2="{:.1}" y2="{ly}" stroke="#6a9fd8" stroke-width="2"/><text x="{:.1}" y="{:.1}">median latency per 10 ms</text>"##,
        L + 24.0,
        L + 30.0,
        ly + 4.0,
        L + 200.0,
        L + 224.0,
        L + 230.0,
        ly + 4.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">longest wait: {} during the upgrade, {} in the baseline window</text>"#,
        L + 430.0,
        ly + 4.0,
        fmt_ns(run.pause_upgrade_ns as f64),
        fmt_ns(run.pause_baseline_ns as f64)
    );
    for (i, m) in run.steps.iter().enumerate() {
        let col = (i % 2) as f64;
        let rowy = ly + 22.0 + (i / 2) as f64 * 15.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{rowy:.1}" font-size="11">step {} at {:.3} s: {}</text>"#,
            L + col * 440.0,
            m.step,
            m.t_us as f64 / 1e6,
            xml_escape(&m.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

// ------------------------------------------------------------------------------------ main

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let runs = env_num("US_BENCH_RUNS", if bench_mode { 5 } else { 1 }) as usize;
    let rate = env_num("US_BENCH_RATE", 2500);
    let accept_ms = env_num("US_BENCH_ACCEPT_MS", if bench_mode { 1000 } else { 300 });
    let warm = Duration::from_millis(if bench_mode { 1000 } else { 300 });
    // Long enough that the baseline window (as long as the upgrade) fits before the upgrade.
    let pre = Duration::from_millis(accept_ms + if bench_mode { 3000 } else { 1500 });
    let load_start = common::load_note();
    let started = Instant::now();
    let mut all = Vec::new();
    for i in 0..runs {
        let r = one_run(i, rate, accept_ms, pre, warm);
        println!(
            "run {i}: upgrade {:.2} s ({} steps), longest wait {} (baseline {}), p99 {} (baseline {}), p50 {} (baseline {}), lost {}, duplicated {}",
            r.upgrade_s,
            r.steps.len(),
            fmt_ns(r.pause_upgrade_ns as f64),
            fmt_ns(r.pause_baseline_ns as f64),
            fmt_ns(r.p99_upgrade_ns as f64),
            fmt_ns(r.p99_baseline_ns as f64),
            fmt_ns(r.p50_upgrade_ns as f64),
            fmt_ns(r.p50_baseline_ns as f64),
            r.lost,
            r.duplicated
        );
        if r.baseline.1 - r.baseline.0 < r.upgrade.1 - r.upgrade.0 {
            println!(
                "  (the baseline window is shorter than the upgrade: raise US_BENCH_ACCEPT_MS' pre-run)"
            );
        }
        all.push(r);
    }
    let seconds = started.elapsed().as_secs_f64();
    let max = |f: &dyn Fn(&Run) -> u64| all.iter().map(f).max().unwrap_or(0) as f64;
    let worst_pause = max(&|r| r.pause_upgrade_ns);
    let worst_pause_base = max(&|r| r.pause_baseline_ns);
    let per_run = |f: &dyn Fn(&Run) -> String| all.iter().map(f).collect::<Vec<_>>().join(", ");
    let lost: u64 = all.iter().map(|r| r.lost).sum();
    let dup: u64 = all.iter().map(|r| r.duplicated).sum();

    let mut md = String::new();
    md.push_str(
        "# Rolling-upgrade benchmark: measured figures\n\n\
         Written by `cargo bench --bench upgrade` (issue 6). The machine is a noisy 2-vCPU VM: \
         only figures measured in the same run mean anything.\n\n\
         ![request latency across the upgrade](upgrade-latency.svg)\n\n",
    );
    md.push_str(TABLE_HEAD);
    md.push_str(&row(
        &format!("longest pause seen by the load generator during the whole rolling upgrade (worst of {runs} runs)"),
        &format!(
            "{} (per run: {})",
            fmt_ns(worst_pause),
            per_run(&|r| fmt_ns(r.pause_upgrade_ns as f64))
        ),
        &format!(
            "longest wait in the baseline window: {} (per run: {})",
            fmt_ns(worst_pause_base),
            per_run(&|r| fmt_ns(r.pause_baseline_ns as f64))
        ),
        "no pause > 1 ms",
        Some(worst_pause <= 1e6),
    ));
    md.push_str(&row(
        "added p99 latency during the upgrade (upgrade p99 − baseline p99, per run)",
        &per_run(&|r| {
            format!(
                "{}{}",
                if r.p99_upgrade_ns >= r.p99_baseline_ns {
                    "+"
                } else {
                    "−"
                },
                fmt_ns((r.p99_upgrade_ns as f64 - r.p99_baseline_ns as f64).abs())
            )
        }),
        &format!(
            "p99 upgrade / baseline per run: {}",
            per_run(&|r| format!(
                "{} / {}",
                fmt_ns(r.p99_upgrade_ns as f64),
                fmt_ns(r.p99_baseline_ns as f64)
            ))
        ),
        "—",
        None,
    ));
    md.push_str(&row(
        "median latency during the upgrade (per run)",
        &per_run(&|r| fmt_ns(r.p50_upgrade_ns as f64)),
        &format!(
            "baseline median per run: {}",
            per_run(&|r| fmt_ns(r.p50_baseline_ns as f64))
        ),
        "—",
        None,
    ));
    md.push_str(&row(
        "requests lost / duplicated (all runs)",
        &format!("{lost} / {dup}"),
        "—",
        "0 / 0",
        Some(lost == 0 && dup == 0),
    ));
    md.push_str(&row(
        "whole rolling upgrade, request → result (per run)",
        &per_run(&|r| format!("{:.2} s", r.upgrade_s)),
        "—",
        "—",
        None,
    ));
    md.push_str("\nNotes:\n\n");
    md.push_str(&format!(
        "- Machine: {load_start} at the start, {} at the end (other processes included); {runs} runs in {seconds:.0} s.\n",
        common::load_note()
    ));
    let idle = std::env::var("US_BENCH_ENGINE_IDLE")
        .map(|v| format!("`UNDERSTUDY_IDLE={v}`"))
        .unwrap_or_else(|_| {
            "the engine default (spin 20 000 polls, then sleep 50 µs per poll)".into()
        });
    md.push_str(&format!(
        "- Each run: a supervisor (`understudy up`) with two matchbook v1 engines, idle strategy {idle}; the load generator's 2 clients at {rate} requests/s each ({} requests/s), in this process; {:.1} s of warm-up, then {:.1} s of load before the upgrade; the upgrade with a {accept_ms} ms acceptance soak and the feature enabled at the end. Requests measured: {} in the upgrade windows, {} in the baseline windows.\n",
        2 * rate,
        warm.as_secs_f64(),
        pre.as_secs_f64(),
        per_run(&|r| r.count_upgrade.to_string()),
        per_run(&|r| r.count_baseline.to_string()),
    ));
    md.push_str("- Pause: the longest time any request waited for its answer, over the requests whose wait overlaps the window (`LoadReport::longest_wait_ns`); the load generator sends at a fixed rate with up to 64 requests in flight per client, so a stall of the engines shows up as the wait of the request sent just before it. Latency is measured in the load generator's threads (send → response polled), so it includes their own scheduling on the 2 CPUs shared with the engines and the supervisor.\n");
    md.push_str("- Baseline: the window of the same length as the upgrade just before it began (same run, same load, no upgrade).\n");
    if let Some(r) = all.first() {
        md.push_str(&format!(
            "- The plot is of run 0; its upgrade steps began at: {}.\n",
            r.steps
                .iter()
                .map(|m| format!("{} `{}` {:.3} s", m.step, m.name, m.t_us as f64 / 1e6))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    print!("\n{md}");
    if bench_mode {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches");
        if let Some(r) = all.first() {
            let p = dir.join("upgrade-latency.svg");
            if let Err(e) = std::fs::write(&p, svg(r, rate)) {
                eprintln!("could not write {}: {e}", p.display());
            }
        }
        let p = dir.join("RESULTS-upgrade.md");
        if let Err(e) = std::fs::write(&p, &md) {
            eprintln!("could not write {}: {e}", p.display());
        }
    }
}
