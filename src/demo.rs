//! `understudy demo`: the whole product on the matchbook reference application, in one command.
//!
//! It starts a supervisor (`understudy up`, a real child process) for a cluster of two matchbook
//! v1 engines, drives load through the shared-memory client library, SIGKILLs the active once,
//! does a planned switchover, runs the full rolling upgrade to v2 with acceptance, enables the
//! new feature (iceberg orders), sends iceberg orders, and reports what the clients saw. It
//! exits 0 only if nothing was lost or duplicated and the final books and positions equal the
//! reference model fed the acknowledged orders.
//!
//! The engine executables are this very binary under two names (`matchbook-v1` and
//! `matchbook-v2`, symbolic links in a temporary directory): `understudy` runs the matchbook
//! engine of that version when invoked under such a name, so the demo needs nothing but
//! `cargo run --release -- demo`.

use matchbook::loadgen::{check_against_model, model_of, LoadConfig, LoadGen, LoadReport};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use understudy_supervisor::client::Client as Ctl;
use understudy_supervisor::proto::{Code, Op, Reply, Request, StatusReport, UpgradeRequest};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Print the report as one JSON document.
    pub json: bool,
    /// Shorter phases (the test suite runs this).
    pub quick: bool,
    /// Where cluster directories go.
    pub shm_dir: PathBuf,
    /// The multi-call executable (this binary).
    pub exe: PathBuf,
    /// Requests per second per load client.
    pub rate_per_client: u64,
}

impl DemoOptions {
    /// Defaults, with `exe` the running executable.
    pub fn new(exe: PathBuf) -> Self {
        DemoOptions {
            json: false,
            quick: false,
            shm_dir: understudy_supervisor::config::default_shm_dir(),
            exe,
            rate_per_client: 5_000,
        }
    }
}

/// Latency percentiles, µs.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    /// Requests measured.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Maximum.
    pub max_us: f64,
}

/// One engine at the end.
#[derive(Debug, Clone, Serialize)]
pub struct FinalEngine {
    /// Slot.
    pub slot: String,
    /// Role.
    pub role: String,
    /// Application version.
    pub version: u64,
    /// Enabled features.
    pub features: Vec<String>,
}

/// What the demo measured.
#[derive(Debug, Clone, Serialize, Default)]
pub struct DemoReport {
    /// Requests sent by the load clients.
    pub sent: u64,
    /// Requests answered.
    pub acknowledged: u64,
    /// Requests never answered.
    pub lost: u64,
    /// Requests answered twice.
    pub duplicated: u64,
    /// Answers that were refusals (icebergs before the feature, cancels of filled orders …).
    pub rejected: u64,
    /// SIGKILL of the active → the standby active (its role published), µs.
    pub step_up_us: f64,
    /// The same, from the standby's own detection of the death (owner-died seen → active), µs.
    pub step_up_after_detection_us: f64,
    /// Longest time a client waited for an answer across the failover, ms.
    pub failover_pause_ms: f64,
    /// … across the planned switchover, ms.
    pub switchover_pause_ms: f64,
    /// … across the whole rolling upgrade, ms.
    pub upgrade_pause_ms: f64,
    /// How long the rolling upgrade took, s.
    pub upgrade_s: f64,
    /// Latency before the upgrade (v1, steady).
    pub latency_before: Latency,
    /// Latency after the upgrade (v2, feature on).
    pub latency_after: Latency,
    /// Iceberg (version-2-only) orders sent before the feature was enabled, and refused.
    pub icebergs_refused_before: u64,
    /// Iceberg orders acknowledged after the feature was enabled.
    pub icebergs_accepted_after: u64,
    /// The final books and positions equal the reference model's.
    pub model_check: String,
    /// The engines at the end.
    pub engines: Vec<FinalEngine>,
    /// Wall time, s.
    pub elapsed_s: f64,
    /// Nothing lost, nothing duplicated, model equal.
    pub ok: bool,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Everything the demo started, torn down on drop (also on error and Ctrl-C).
struct Stage {
    tmp: PathBuf,
    cluster_dir: PathBuf,
    supervisor: Option<Child>,
    ctl: Ctl,
}

impl Drop for Stage {
    fn drop(&mut self) {
        // Ask for a clean stop first, then make sure: no engine, no supervisor, no file left.
        if self.supervisor.is_some() {
            let ctl = self.ctl.clone();
            let h = std::thread::spawn(move || ctl.request(&Request::new(Op::Down), |_| {}));
            let t = Instant::now();
            while !h.is_finished() && t.elapsed() < DOWN_TIMEOUT {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        if let Ok(c) = understudy_runtime::control::Control::open(&self.cluster_dir) {
            for slot in 0..understudy_runtime::control::SLOTS {
                let pid = c.get(slot, understudy_runtime::control::Field::Pid);
                let st = c.get(slot, understudy_runtime::control::Field::StartTime);
                let id = understudy_runtime::liveness::ProcessIdentity {
                    pid: pid.min(u32::MAX as u64) as u32,
                    start_time_ticks: st,
                };
                if pid > 1 && id.is_alive() {
                    // SAFETY: plain kill(2) of a process whose identity (pid + start time) we
                    // just checked is our cluster's engine.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        if let Some(mut s) = self.supervisor.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.cluster_dir);
        if std::env::var_os("UNDERSTUDY_DEMO_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

struct Progress {
    json: bool,
    t0: Instant,
    step: usize,
    total: usize,
}

impl Progress {
    fn new(json: bool, t0: Instant, total: usize) -> Self {
        Progress {
            json,
            t0,
            step: 0,
            total,
        }
    }
    fn step(&mut self, what: &str) {
        self.step += 1;
        let t = self.t0.elapsed().as_secs_f64();
        if self.json {
            eprintln!(
                "{}",
                serde_json::json!({"event": "step", "step": self.step, "total": self.total, "what": what, "t_s": t})
            );
        } else {
            eprintln!("[{t:5.1}s] {}/{}: {what}", self.step, self.total);
        }
    }
    fn note(&self, what: &str) {
        let t = self.t0.elapsed().as_secs_f64();
        if self.json {
            eprintln!(
                "{}",
                serde_json::json!({"event": "note", "what": what, "t_s": t})
            );
        } else {
            eprintln!("[{t:5.1}s]      {what}");
        }
    }
}

fn status(ctl: &Ctl) -> Result<StatusReport, String> {
    let r = ctl
        .request(&Request::new(Op::Status), |_| {})
        .map_err(|e| e.to_string())?;
    serde_json::from_value(r.data.clone()).map_err(|e| format!("status: {e}"))
}

fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool, String>,
) -> Result<(), String> {
    let t = Instant::now();
    loop {
        check_interrupt()?;
        if f()? {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(STATUS_POLL_INTERVAL);
    }
}

fn cluster_settled(s: &StatusReport) -> bool {
    s.active_engine().is_some() && s.hot_standbys().count() >= 1 && s.operation.is_none()
}

fn latency(h: &hdrhistogram::Histogram<u64>) -> Latency {
    let us = |v: u64| v as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.5)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
    }
}

fn expect_ok(r: Reply, what: &str) -> Result<Reply, String> {
    if r.code == Some(Code::Ok) {
        Ok(r)
    } else {
        Err(format!("{what} failed: {}", r.message))
    }
}

/// How long the cluster may take to settle (an active and a hot standby): at start, and after
/// each failover, switchover and restart.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the standby may take to step up after the active is SIGKILLed.
const STEP_UP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `understudy down` may take before the supervisor is killed.
const DOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a wait for the supervisor (or the cluster) looks again.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often `wait_for` asks the supervisor for its status.
const STATUS_POLL_INTERVAL: Duration = Duration::from_millis(5);
/// How long one iceberg probe may wait for its refusal.
const PROBE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failover or switchover is done, how much later (µs of load time) its window still
/// counts for the longest pause: answers already on their way when it finished.
const PAUSE_WINDOW_TAIL_US: u64 = 50_000;

/// Run the demo.
pub fn run(opts: &DemoOptions) -> Result<DemoReport, String> {
    let t0 = Instant::now();
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut p = Progress::new(opts.json, t0, 8);
    let (mut stage, setup) = set_up(opts)?;
    let cluster_dir = stage.cluster_dir.clone();

    p.step("start a cluster of two matchbook v1 engines under a supervisor");
    start_supervisor(opts, &mut stage, &setup.config_path)?;
    let ctl = stage.ctl.clone();

    p.step("drive load: 2 clients through their shared-memory rings");
    let mut cfg = LoadConfig::new(&cluster_dir);
    cfg.rate_per_client = opts.rate_per_client;
    let load = LoadGen::start(&cfg)?;
    let phase = |secs_quick: f64, secs: f64| {
        Duration::from_secs_f64(if opts.quick { secs_quick } else { secs })
    };
    // Iceberg orders before the feature exists: must be refused, not lost.
    let refused_probe = probe_icebergs(&cluster_dir, 5)?;
    let steady = load_for(&load, phase(1.0, 3.0))?;
    p.note(&format!("{} requests acknowledged so far", load.acked()));

    p.step("SIGKILL the active engine");
    let failover = kill_active(&ctl, &load)?;
    p.note(&format!("the standby was active {:.0} µs after the SIGKILL; the supervisor restarts the dead engine as standby", failover.step_up_us));
    wait_settled_again(&ctl)?;
    std::thread::sleep(phase(0.3, 1.0));

    p.step("planned switchover");
    let switch_window = switch_over(&ctl, &load)?;
    std::thread::sleep(phase(0.3, 1.0));

    p.step("rolling upgrade to matchbook v2 (acceptance, then enable the new feature)");
    let up_t = Instant::now();
    let upgrade_window = rolling_upgrade(&ctl, &load, &setup, opts.json, t0)?;
    let upgrade_s = up_t.elapsed().as_secs_f64();

    p.step("send version-2-only orders (icebergs)");
    load.icebergs.store(true, Ordering::Relaxed);
    let after = load_for(&load, phase(1.0, 3.0))?;

    p.step("stop the load and check every answer against the reference model");
    let report: LoadReport = load.stop()?;
    let model = model_of(&report)
        .and_then(|m| check_against_model(&cluster_dir, &m, cfg.symbols, cfg.accounts));
    let fin = status(&ctl)?;

    p.step("stop the cluster (understudy down)");
    stop_cluster(&ctl, stage);

    let phases = Phases {
        steady,
        failover,
        switch_window,
        upgrade_window,
        upgrade_s,
        after,
    };
    if std::env::var_os("UNDERSTUDY_DEMO_DEBUG").is_some() {
        print_debug(&phases, &report);
    }
    Ok(demo_report(
        &report,
        refused_probe,
        &phases,
        model,
        &fin,
        t0,
    ))
}

/// `UNDERSTUDY_DEMO_DEBUG`: the phases' windows and each client's lost and duplicated requests.
fn print_debug(phases: &Phases, report: &LoadReport) {
    eprintln!(
        "phases (µs): steady {}..{} kill {}..{} switch {}..{} upgrade {}..{}",
        phases.steady.0,
        phases.steady.1,
        phases.failover.window.0,
        phases.failover.window.1,
        phases.switch_window.0,
        phases.switch_window.1,
        phases.upgrade_window.0,
        phases.upgrade_window.1
    );
    for (i, c) in report.clients.iter().enumerate() {
        eprintln!(
            "client {i}: lost {:?} duplicates {:?}",
            c.lost_requests, c.duplicate_answers
        );
    }
}

/// Lets the load run for `len`; returns its load-time window (µs).
fn load_for(load: &LoadGen, len: Duration) -> Result<(u64, u64), String> {
    let from = load.now_us();
    std::thread::sleep(len);
    check_interrupt()?;
    Ok((from, load.now_us()))
}

/// Waits until the cluster has an active and a hot standby again.
fn wait_settled_again(ctl: &Ctl) -> Result<(), String> {
    wait_for("a hot standby again", SETTLE_TIMEOUT, || {
        Ok(cluster_settled(&status(ctl)?))
    })
}

/// What `set_up` prepared besides the stage.
struct Setup {
    /// The cluster config the supervisor runs.
    config_path: PathBuf,
    /// The version-2 engine (a link to this binary).
    v2: PathBuf,
    /// `acceptance.accept_for_ms` of the upgrade.
    accept_ms: u64,
}

/// Makes the temporary directory, the two engine links and the config; the stage returned
/// tears them down when dropped.
fn set_up(opts: &DemoOptions) -> Result<(Stage, Setup), String> {
    let pid = std::process::id();
    let name = format!("demo-{pid}");
    let tmp = std::env::temp_dir().join(format!("understudy-demo-{pid}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let cluster_dir = opts.shm_dir.join(&name);
    let stage = Stage {
        tmp: tmp.clone(),
        cluster_dir: cluster_dir.clone(),
        supervisor: None,
        ctl: Ctl::new(cluster_dir.join(understudy_supervisor::proto::SOCKET_NAME)),
    };
    let v1 = tmp.join("matchbook-v1");
    let v2 = tmp.join("matchbook-v2");
    for link in [&v1, &v2] {
        std::os::unix::fs::symlink(&opts.exe, link)
            .map_err(|e| format!("{}: {e}", link.display()))?;
    }
    let accept_ms = if opts.quick { 500 } else { 2000 };
    let config = format!(
        "cluster = \"{name}\"\nshm_dir = \"{}\"\n\n[engine]\nbinary = \"{}\"\nenv = {{ RUST_LOG = \"{}\", UNDERSTUDY_IDLE = \"{}\" }}\n\n[timeouts]\nheartbeat_ms = 100\n\n[acceptance]\naccept_for_ms = {accept_ms}\nmax_latency_us_p99 = 50000\n",
        opts.shm_dir.display(),
        v1.display(),
        std::env::var("UNDERSTUDY_DEMO_ENGINE_LOG").unwrap_or_else(|_| "warn".into()),
        // Two engines and the load clients share this host's CPUs: spin briefly, then sleep
        // between polls, so the clients get CPU time (a production host pins spinning engines
        // on isolated cores instead).
        std::env::var("UNDERSTUDY_DEMO_IDLE").unwrap_or_else(|_| "2000,20".into())
    );
    // [timeouts] and [acceptance]: the demo shares 2 CPUs with everything else on a laptop or
    // a CI runner, where a healthy engine can be descheduled for hundreds of ms; fence after
    // 1 s (10 heartbeats), and accept a service-time p99 up to 50 ms. A production config
    // sets both to its service level.
    let config_path = tmp.join("demo.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let setup = Setup {
        config_path,
        v2,
        accept_ms,
    };
    Ok((stage, setup))
}

/// `understudy up` as a child process; returns once the cluster has settled.
fn start_supervisor(
    opts: &DemoOptions,
    stage: &mut Stage,
    config_path: &Path,
) -> Result<(), String> {
    let log = std::fs::File::create(stage.tmp.join("supervisor.log")).map_err(|e| e.to_string())?;
    let child = Command::new(&opts.exe)
        .arg("up")
        .arg("--config")
        .arg(config_path)
        .env(
            "RUST_LOG",
            std::env::var("UNDERSTUDY_DEMO_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("starting the supervisor ({}): {e}", opts.exe.display()))?;
    stage.supervisor = Some(child);
    let ctl = stage.ctl.clone();
    wait_for(
        "the cluster: an active engine and a hot standby",
        SETTLE_TIMEOUT,
        || Ok(status(&ctl).map(|s| cluster_settled(&s)).unwrap_or(false)),
    )
}

/// What the failover phase measured.
struct Failover {
    /// SIGKILL → the new active published its role, µs.
    step_up_us: f64,
    /// The new active's own detection → active, µs.
    step_up_internal_us: f64,
    /// Load time (µs) from the SIGKILL to shortly after the step-up.
    window: (u64, u64),
}

/// SIGKILLs the active engine and waits for the standby to step up.
fn kill_active(ctl: &Ctl, load: &LoadGen) -> Result<Failover, String> {
    let s = status(ctl)?;
    let active = s.active_engine().ok_or("no active engine")?.clone();
    let kill_us = load.now_us();
    let kill_ns = understudy_runtime::control::realtime_ns();
    if active.pid < 2 {
        return Err(format!(
            "the supervisor reports an impossible pid {} for the active",
            active.pid
        ));
    }
    // SAFETY: kill(2) of the active engine's pid, just read from the supervisor.
    unsafe { libc::kill(active.pid as i32, libc::SIGKILL) };
    let mut step_up_us = 0.0;
    let mut step_up_internal_us = 0.0;
    wait_for("the standby to step up", STEP_UP_TIMEOUT, || {
        let s = status(ctl)?;
        Ok(match s.active_engine() {
            Some(e) if e.slot != active.slot => {
                // SIGKILL → the new active published its role (both CLOCK_REALTIME).
                step_up_us = e.last_step_up_ns.saturating_sub(kill_ns) as f64 / 1000.0;
                step_up_internal_us = e.last_step_up_dur_ns as f64 / 1000.0;
                true
            }
            _ => false,
        })
    })?;
    let stepped_us = load.now_us();
    Ok(Failover {
        step_up_us,
        step_up_internal_us,
        window: (kill_us, stepped_us + PAUSE_WINDOW_TAIL_US),
    })
}

/// A planned switchover, waited for until the cluster has settled; returns its load-time
/// window (µs).
fn switch_over(ctl: &Ctl, load: &LoadGen) -> Result<(u64, u64), String> {
    let sw_from = load.now_us();
    expect_ok(
        ctl.request(&Request::new(Op::Switchover), |_| {})
            .map_err(|e| e.to_string())?,
        "switchover",
    )?;
    let sw_to = load.now_us();
    wait_settled_again(ctl)?;
    Ok((sw_from, sw_to + PAUSE_WINDOW_TAIL_US))
}

/// The rolling upgrade to v2 with acceptance and the feature enabled, its events printed as
/// they come; returns its load-time window (µs).
fn rolling_upgrade(
    ctl: &Ctl,
    load: &LoadGen,
    setup: &Setup,
    json: bool,
    t0: Instant,
) -> Result<(u64, u64), String> {
    let up_from = load.now_us();
    let r = ctl
        .request(
            &Request::new(Op::Upgrade(UpgradeRequest {
                binary: setup.v2.clone(),
                accept_for_ms: Some(setup.accept_ms),
                accept_cmd: None,
                keep_standby: false,
                no_enable: false,
                ..Default::default()
            })),
            |ev| {
                let t = t0.elapsed().as_secs_f64();
                if json {
                    eprintln!(
                        "{}",
                        serde_json::json!({"event": "upgrade", "t_s": t, "detail": ev.message})
                    );
                } else {
                    eprintln!("[{t:5.1}s]      {}", ev.message);
                }
            },
        )
        .map_err(|e| e.to_string())?;
    expect_ok(r, "the rolling upgrade")?;
    Ok((up_from, load.now_us()))
}

/// `understudy down`, then the stage's teardown (which kills whatever is left).
fn stop_cluster(ctl: &Ctl, mut stage: Stage) {
    let _ = ctl.request(&Request::new(Op::Down), |_| {});
    if let Some(mut s) = stage.supervisor.take() {
        let t = Instant::now();
        while t.elapsed() < DOWN_TIMEOUT {
            if let Ok(Some(_)) = s.try_wait() {
                break;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        let _ = s.kill();
        let _ = s.wait();
    }
    drop(stage);
}

/// The load-time windows (µs) of each phase, and what the phases measured.
struct Phases {
    steady: (u64, u64),
    failover: Failover,
    switch_window: (u64, u64),
    upgrade_window: (u64, u64),
    upgrade_s: f64,
    after: (u64, u64),
}

/// The report from what the clients saw in each phase, the model check and the final status.
fn demo_report(
    report: &LoadReport,
    refused_probe: u64,
    phases: &Phases,
    model: Result<(), String>,
    fin: &StatusReport,
    t0: Instant,
) -> DemoReport {
    let icebergs_after = report
        .clients
        .iter()
        .flat_map(|c| c.answered.iter())
        .filter(|a| a.request.kind == 1 && a.response.status == matchbook::app::status::ACK)
        .count() as u64;
    let pause_ms = |(from, to): (u64, u64)| report.longest_wait_ns(from, to) as f64 / 1e6;
    let mut out = DemoReport {
        sent: report.total(|c| c.sent) + refused_probe,
        acknowledged: report.total(|c| c.acked) + refused_probe,
        lost: report.total(|c| c.lost),
        duplicated: report.total(|c| c.duplicated),
        rejected: report.total(|c| c.rejected) + refused_probe,
        step_up_us: phases.failover.step_up_us,
        step_up_after_detection_us: phases.failover.step_up_internal_us,
        failover_pause_ms: pause_ms(phases.failover.window),
        switchover_pause_ms: pause_ms(phases.switch_window),
        upgrade_pause_ms: pause_ms(phases.upgrade_window),
        upgrade_s: phases.upgrade_s,
        latency_before: latency(&report.histogram(phases.steady.0, phases.steady.1)),
        latency_after: latency(&report.histogram(phases.after.0, phases.after.1)),
        icebergs_refused_before: refused_probe,
        icebergs_accepted_after: icebergs_after,
        model_check: match &model {
            Ok(()) => "equal".into(),
            Err(e) => e.clone(),
        },
        engines: fin
            .engines
            .iter()
            .map(|e| FinalEngine {
                slot: e.slot.clone(),
                role: e.role.clone(),
                version: e.app_version,
                features: if e.features & 1 != 0 {
                    vec!["iceberg".into()]
                } else {
                    vec![]
                },
            })
            .collect(),
        elapsed_s: t0.elapsed().as_secs_f64(),
        ok: false,
    };
    out.ok = out.lost == 0 && out.duplicated == 0 && model.is_ok() && icebergs_after > 0;
    out
}

/// Send `n` iceberg orders while the feature is off: each must be answered with a refusal.
fn probe_icebergs(dir: &Path, n: u64) -> Result<u64, String> {
    use zerocopy::IntoBytes;
    let mut c = understudy_runtime::client::Client::connect(dir).map_err(|e| e.to_string())?;
    let mut refused = 0;
    for i in 0..n {
        let req = matchbook::app::WireRequest::iceberg(
            1 << 60 | i,
            1,
            1,
            matchbook::book::Side::Buy,
            990,
            100,
            10,
        );
        let r = c
            .call(req.as_bytes(), PROBE_ANSWER_TIMEOUT)
            .map_err(|e| e.to_string())?
            .ok_or("iceberg probe unanswered")?;
        let (h, _) = matchbook::app::parse_response(&r).ok_or("bad response")?;
        if h.status != matchbook::app::status::REJECT {
            return Err(format!(
                "an iceberg order was accepted before the feature was enabled: {h:?}"
            ));
        }
        refused += 1;
    }
    Ok(refused)
}

/// Print the report for people.
pub fn print_human(r: &DemoReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(out, "understudy demo — matchbook v1 → v2 under load")?;
    writeln!(
        out,
        "  requests   sent {}  acknowledged {}  lost {}  duplicated {}  (refusals {})",
        r.sent, r.acknowledged, r.lost, r.duplicated, r.rejected
    )?;
    writeln!(
        out,
        "  step-up    {:.0} µs from SIGKILL to the standby active ({:.0} µs of it after it saw the death)",
        r.step_up_us, r.step_up_after_detection_us
    )?;
    writeln!(out, "  longest pause seen by clients")?;
    writeln!(out, "    failover   {:8.3} ms", r.failover_pause_ms)?;
    writeln!(out, "    switchover {:8.3} ms", r.switchover_pause_ms)?;
    writeln!(
        out,
        "    upgrade    {:8.3} ms  (whole rolling upgrade took {:.1} s)",
        r.upgrade_pause_ms, r.upgrade_s
    )?;
    for (name, l) in [
        ("before (v1)", &r.latency_before),
        ("after (v2) ", &r.latency_after),
    ] {
        writeln!(
            out,
            "  latency {name}  p50 {:7.1} µs  p99 {:7.1} µs  p99.9 {:7.1} µs  max {:8.1} µs  ({} requests)",
            l.p50_us, l.p99_us, l.p999_us, l.max_us, l.count
        )?;
    }
    writeln!(
        out,
        "  iceberg orders: {} refused while v1 ran, {} accepted after the feature was enabled",
        r.icebergs_refused_before, r.icebergs_accepted_after
    )?;
    writeln!(
        out,
        "  books and positions vs the reference model: {}",
        r.model_check
    )?;
    for e in &r.engines {
        writeln!(
            out,
            "  engine {}: {} matchbook v{} features {:?}",
            e.slot, e.role, e.version, e.features
        )?;
    }
    writeln!(
        out,
        "  {} in {:.1} s",
        if r.ok {
            "OK: nothing lost, nothing duplicated"
        } else {
            "FAILED"
        },
        r.elapsed_s
    )?;
    Ok(())
}
