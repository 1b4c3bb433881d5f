//! The `understudy` command line: `up` runs the supervisor in the foreground; every other
//! verb but `doctor` is a thin client of its control socket.
//!
//! To add a verb: add a variant to [`Command`] and an arm in [`main`] that returns an exit
//! [`Code`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

mod stat;
use understudy_supervisor::client::Client;
use understudy_supervisor::config::ClusterConfig;
use understudy_supervisor::doctor::{self, Verdict};
use understudy_supervisor::proto::{
    Code, Op, Reply, Request, StatusReport, UpgradeEvent, UpgradeRequest, SOCKET_NAME,
};

fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:\n");
    for code in Code::ALL {
        text.push_str(&format!("  {:>2}  {}\n", code.exit_code(), code.describe()));
    }
    text
}

#[derive(Parser, Debug)]
#[command(
    name = "understudy",
    version,
    about = "Keep a latency-critical application alive through crashes and upgrades",
    after_help = exit_codes_help()
)]
struct Cli {
    /// The cluster config (TOML).
    #[arg(
        short,
        long,
        global = true,
        env = "UNDERSTUDY_CONFIG",
        default_value = "cluster.toml"
    )]
    config: PathBuf,
    /// The supervisor's socket (default: `<shm_dir>/<cluster>/supervisor.sock` from the config).
    #[arg(long, global = true, env = "UNDERSTUDY_SOCKET")]
    socket: Option<PathBuf>,
    /// Print one JSON object per line, even on a terminal.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the supervisor to accept, then for each line of its answer (a
    /// long operation sends a line at least every second): 5s for `status`, 10s otherwise.
    #[arg(long, global = true, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Log format of `up` and of the engines it starts: `text` (colours only on a terminal)
    /// or `json` (one object per line, for log shippers).
    #[arg(long, global = true, env = "UNDERSTUDY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The main job: a cluster of two matchbook engines under load, a SIGKILL of the active, a
    /// switchover, a rolling upgrade v1 → v2 with acceptance, the new feature enabled; prints
    /// what the clients saw (exit 0 only if nothing was lost or duplicated).
    Demo {
        /// Shorter phases (what the test suite runs).
        #[arg(long)]
        quick: bool,
        /// Requests per second per load client.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
    },
    /// A fault campaign: the test application under client load through every way an engine
    /// can die, stalls, switchovers, upgrades and supervisor restarts; prints a table (exit 0
    /// only if nothing was lost or duplicated and no outage happened).
    Torture {
        /// Events to apply.
        #[arg(long, default_value_t = 1000)]
        events: u64,
        /// Seed of the event sequence.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Load clients.
        #[arg(long, default_value_t = 2)]
        clients: usize,
        /// Leave out the events whose kind contains this (repeatable), e.g. `kill -SIGSEGV`.
        #[arg(long)]
        skip: Vec<String>,
    },
    /// Run the supervisor in the foreground: start (or re-adopt) the engines and keep them so.
    /// An upgrade that a killed supervisor left in the middle is never continued: before its
    /// acceptance verdict the old version is restored, after it the accepted new version is
    /// kept; either way a hot standby is restored (see `status`).
    Up,
    /// Show every engine: role, epoch, versions, features, state, lag, requests/s, step-ups.
    Status,
    /// The engines' live counters from shared memory, refreshed (rates per second); works
    /// without the supervisor. `--json` prints one JSON object per refresh.
    Stat {
        /// One view (rates over one interval), then exit.
        #[arg(long)]
        once: bool,
        /// Time between refreshes (e.g. `1s`, `500ms`).
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
        /// Stop after this many views (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// The cluster directory (default: `<shm_dir>/<cluster>` from the config).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Planned switchover to the hot standby; waits until done and prints the pause.
    Switchover,
    /// The rolling upgrade to a new engine binary, with acceptance and automatic rollback.
    ///
    /// The acceptance bounds are the config's `[acceptance]`; each flag below replaces one of
    /// them for this upgrade only (the config, and the next upgrade, are unchanged). When
    /// `--config` (or `UNDERSTUDY_CONFIG`) is given, that file's `[acceptance]` is the base of
    /// this upgrade's bounds, and the upgrade is refused (exit 10, nothing done) if the file
    /// differs from the running config anywhere else: apply such changes with `reload` first.
    /// Without it, the running config's bounds (as last reloaded) are the base.
    Upgrade(UpgradeArgs),
    /// Roll back the upgrade in progress, or the last completed one (features still off).
    Rollback,
    /// Enable every feature both engines support, at the same point of the update stream.
    EnableFeatures,
    /// Stop every engine cleanly, remove the shared files, stop the supervisor.
    Down,
    /// Start again the restarts the crash-loop breaker stopped (after fixing the engine),
    /// without restarting the supervisor.
    ResumeRestarts,
    /// After an outage (no engine active, none able to step up): make the engine in SLOT
    /// active with the consistent copy it holds (`status` shows it as stale, with its count),
    /// losing what the dead active committed after it. Says what would be lost unless
    /// --accept-loss is given.
    Promote {
        /// The engine's slot: a, b or c.
        slot: String,
        /// Go ahead, accepting the loss.
        #[arg(long)]
        accept_loss: bool,
    },
    /// Apply the config file (`--config`) to the running supervisor: acceptance, restart,
    /// timeouts and metrics change at once; a change to what the engines were started with
    /// (engine, ring, backpressure, slots, cluster, shm_dir) is refused, naming each field.
    Reload,
    /// Check the host: isolation of the pinned CPUs, clock source, trust of the shared
    /// directories, leftover files.
    Doctor {
        /// Remove the shared files of dead clusters.
        #[arg(long)]
        fix: bool,
    },
}

/// The flags of `understudy upgrade`.
#[derive(clap::Args, Debug)]
struct UpgradeArgs {
    /// The new engine executable.
    #[arg(long)]
    binary: PathBuf,
    /// The soak period after the switchover (e.g. `30s`, `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration)]
    accept_for: Option<Duration>,
    /// A shell command that must exit 0 for the upgrade to be accepted.
    #[arg(long)]
    accept_cmd: Option<String>,
    /// The highest acceptable fraction of refused requests during the soak, 0 to 1
    /// (`acceptance.max_error_rate`; counted only with refusals counted).
    #[arg(long, value_name = "FRACTION", value_parser = parse_error_rate)]
    max_error_rate: Option<f64>,
    /// Count the handler's refusals as errors against the error rate, `true` or `false`
    /// (`acceptance.count_refusals`).
    #[arg(long, value_name = "BOOL", value_parser = parse_bool_flag)]
    count_refusals: Option<bool>,
    /// The highest acceptable p99 request service time of the new active, in µs, at most
    /// 3600000000 (`acceptance.max_latency_us_p99`).
    #[arg(long, value_name = "MICROSECONDS", value_parser = parse_latency_us)]
    max_latency_us_p99: Option<u64>,
    /// Start the new version as a third standby first: a hot standby at every moment.
    #[arg(long)]
    keep_standby: bool,
    /// Leave the new features disabled.
    #[arg(long)]
    no_enable: bool,
}

/// The longest duration a flag takes: 7 days, the bound of `acceptance.accept_for_ms`, so
/// every deadline derived from one fits.
const FLAG_DURATION_MAX: Duration =
    Duration::from_millis(understudy_supervisor::proto::ACCEPT_FOR_MS_MAX);

fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration_unbounded(text)?;
    if duration > FLAG_DURATION_MAX {
        return Err(format!(
            "expected a duration of at most {}s (7 days), found `{}`",
            FLAG_DURATION_MAX.as_secs(),
            text.trim()
        ));
    }
    Ok(duration)
}

/// `--max-error-rate`: the bound of `acceptance.max_error_rate`.
fn parse_error_rate(text: &str) -> Result<f64, String> {
    let text = text.trim();
    let rate: f64 = text
        .parse()
        .map_err(|_| format!("expected a fraction between 0 and 1, found `{text}`"))?;
    understudy_supervisor::config::check_max_error_rate(rate)
        .map_err(|expected| format!("expected {expected}, found `{text}`"))
}

/// `--max-latency-us-p99`: the bound of `acceptance.max_latency_us_p99`.
fn parse_latency_us(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let bound = understudy_supervisor::config::LATENCY_US_MAX;
    let us: u64 = text.parse().map_err(|_| {
        format!("expected a whole number of µs from 0 to {bound} (1 hour), found `{text}`")
    })?;
    understudy_supervisor::config::check_max_latency_us_p99(us)
        .map_err(|expected| format!("expected {expected}, found `{text}`"))
}

/// `--count-refusals`: `true` or `false`.
fn parse_bool_flag(text: &str) -> Result<bool, String> {
    match text.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("expected `true` or `false`, found `{other}`")),
    }
}

fn parse_duration_unbounded(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((text, "s"), |i| text.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a duration like `30s` or `500ms`, found `{text}`"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "expected a unit ms, s, m or h, found `{other}` in `{text}`"
            ))
        }
    };
    // Checked: a value too large for a Duration (or not finite) is an error, not a panic.
    Duration::try_from_secs_f64(seconds).map_err(|_| {
        format!(
            "expected a duration of at most {}s (7 days), found `{text}`",
            FLAG_DURATION_MAX.as_secs()
        )
    })
}

fn main() {
    // Invoked as `matchbook-v1` / `matchbook-v2` (the demo's engine executables): be that engine.
    understudy::dispatch_multicall();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // `--config` named by the operator (flag or environment), not the default file name.
    let config_given = matches!(
        config_source(&matches),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    );
    // The engines `up` starts inherit the format (still one thread here: no other reader).
    std::env::set_var(understudy_runtime::LOG_FORMAT_VAR, &cli.log_format);
    let code = match &cli.command {
        Command::Demo { quick, rate } => demo(cli.json, *quick, *rate),
        Command::Torture {
            events,
            seed,
            clients,
            skip,
        } => understudy::torture::cli(cli.json, *events, *seed, *clients, skip),
        Command::Up => up(&cli),
        Command::Doctor { fix } => doctor(&cli, *fix),
        Command::Status => status(&cli),
        Command::Stat {
            once,
            interval,
            count,
            dir,
        } => stat_cmd(&cli, *once, *interval, *count, dir.as_deref()),
        Command::Switchover => request(&cli, Op::Switchover),
        Command::Upgrade(args) => upgrade(&cli, args, config_given),
        Command::Rollback => request(&cli, Op::Rollback),
        Command::EnableFeatures => request(&cli, Op::EnableFeatures),
        Command::Down => request(&cli, Op::Down),
        Command::ResumeRestarts => request(&cli, Op::ResumeRestarts),
        Command::Promote { slot, accept_loss } => request(
            &cli,
            Op::Promote(understudy_supervisor::proto::PromoteRequest {
                slot: slot.clone(),
                accept_loss: *accept_loss,
            }),
        ),
        Command::Reload => match std::fs::read_to_string(&cli.config) {
            Ok(config_toml) => request(
                &cli,
                Op::Reload(understudy_supervisor::proto::ReloadRequest { config_toml }),
            ),
            Err(e) => {
                eprintln!("understudy: reading {}: {e}", cli.config.display());
                Code::BadConfig
            }
        },
    };
    std::process::exit(code.exit_code());
}

/// `understudy upgrade`: the request, with the config file's text when the operator named one.
fn upgrade(cli: &Cli, args: &UpgradeArgs, config_given: bool) -> Code {
    // The supervisor runs in another directory: send an absolute path.
    let binary = std::path::absolute(&args.binary).unwrap_or_else(|_| args.binary.clone());
    // A config file the operator named is used (its [acceptance] is this upgrade's
    // base, the rest must match the running config), never ignored.
    let config_toml = if config_given {
        match std::fs::read_to_string(&cli.config) {
            Ok(text) => Some(text),
            Err(e) => {
                eprintln!("understudy: reading {}: {e}", cli.config.display());
                return Code::BadConfig;
            }
        }
    } else {
        None
    };
    request(
        cli,
        Op::Upgrade(UpgradeRequest {
            binary,
            accept_for_ms: args.accept_for.map(|d| d.as_millis() as u64),
            accept_cmd: args.accept_cmd.clone(),
            keep_standby: args.keep_standby,
            no_enable: args.no_enable,
            max_error_rate: args.max_error_rate,
            count_refusals: args.count_refusals,
            max_latency_us_p99: args.max_latency_us_p99,
            config_toml,
        }),
    )
}

fn demo(json: bool, quick: bool, rate: u64) -> Code {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("understudy demo: cannot find its own executable: {e}");
            return Code::Failed;
        }
    };
    let mut opts = understudy::demo::DemoOptions::new(exe);
    opts.json = json;
    opts.quick = quick;
    opts.rate_per_client = rate;
    match understudy::demo::run(&opts) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                let _ = understudy::demo::print_human(&report, &mut std::io::stdout());
            }
            if report.ok {
                Code::Ok
            } else {
                Code::Failed
            }
        }
        Err(e) => {
            eprintln!("understudy demo: {e}");
            Code::Failed
        }
    }
}

/// Where the value of the global `--config` came from (it may be given after the subcommand).
fn config_source(matches: &clap::ArgMatches) -> Option<clap::parser::ValueSource> {
    let mut source = matches.value_source("config");
    let mut m = matches;
    while let Some((_, sub)) = m.subcommand() {
        if let Some(s) = sub.value_source("config") {
            if !matches!(source, Some(t) if t >= s) {
                source = Some(s);
            }
        }
        m = sub;
    }
    source
}

fn load_config(path: &Path) -> Result<ClusterConfig, Code> {
    ClusterConfig::from_path(path).map_err(|e| {
        eprintln!("understudy: {e}");
        Code::BadConfig
    })
}

fn up(cli: &Cli) -> Code {
    understudy_runtime::init_logging();
    let config = match load_config(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match understudy_supervisor::daemon::up(config) {
        Ok(()) => Code::Ok,
        Err(e) => {
            eprintln!("understudy: {e}");
            e.code()
        }
    }
}

fn client(cli: &Cli, default_timeout: Duration) -> Result<Client, Code> {
    let client = match &cli.socket {
        Some(socket) => Client::new(socket),
        None => Client::new(load_config(&cli.config)?.cluster_dir().join(SOCKET_NAME)),
    };
    Ok(client.with_timeout(cli.timeout.unwrap_or(default_timeout)))
}

fn human(cli: &Cli) -> bool {
    !cli.json && std::io::stdout().is_terminal()
}

/// Sends `op`, shows its progress, prints the result; the result's code.
fn request(cli: &Cli, op: Op) -> Code {
    let client = match client(cli, understudy_supervisor::client::DEFAULT_TIMEOUT) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let human = human(cli);
    let result = client.request(&Request::new(op), |event| show_event(event, human));
    match result {
        Ok(reply) => {
            let code = reply.code.unwrap_or(Code::Failed);
            if human {
                if code == Code::Ok {
                    println!("{}", reply.message);
                } else {
                    eprintln!("understudy: {}", reply.message);
                }
            } else {
                println!("{}", serde_json::to_string(&reply).unwrap_or_default());
            }
            code
        }
        Err(e) => {
            eprintln!("understudy: {e}");
            e.code()
        }
    }
}

fn show_event(event: &Reply, human: bool) {
    if !human {
        println!("{}", serde_json::to_string(event).unwrap_or_default());
        return;
    }
    match serde_json::from_value::<UpgradeEvent>(event.data.clone()) {
        Ok(e) if e.event == "begin" => {
            let recovery = e.recovery.map(|r| format!(" [{r}]")).unwrap_or_default();
            println!(
                "[{}/{}]{recovery} {}: {}",
                e.step, e.total, e.name, e.action
            );
        }
        Ok(e) if e.event == "end" => {
            let result = e.result.unwrap_or_default();
            let mark = if result == "done" || result == "accepted" {
                "ok"
            } else {
                "!!"
            };
            match e.elapsed_ms {
                Some(ms) => println!("      {mark} {result} ({ms} ms)"),
                None => println!("      {mark} {result}"),
            }
        }
        _ => println!("  * {}", event.message),
    }
}

fn stat_cmd(cli: &Cli, once: bool, interval: Duration, count: u64, dir: Option<&Path>) -> Code {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => match load_config(&cli.config) {
            Ok(c) => c.cluster_dir(),
            Err(code) => return code,
        },
    };
    let opt = stat::StatOptions {
        dir: &dir,
        once,
        json: cli.json,
        interval,
        count,
    };
    match stat::run(&opt) {
        0 => Code::Ok,
        3 => Code::NotRunning,
        _ => Code::Failed,
    }
}

/// `status`'s default timeout.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

fn status(cli: &Cli) -> Code {
    let client = match client(cli, STATUS_TIMEOUT) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let reply = match client.request(&Request::new(Op::Status), |_| {}) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("understudy: {e}");
            return e.code();
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string(&reply).unwrap_or_default());
        return reply.code.unwrap_or(Code::Failed);
    }
    match serde_json::from_value::<StatusReport>(reply.data.clone()) {
        Ok(report) => print_status(&report),
        Err(_) => println!("{}", reply.message),
    }
    reply.code.unwrap_or(Code::Failed)
}

fn print_status(r: &StatusReport) {
    println!(
        "cluster {} (epoch {}, supervisor pid {}, {})",
        r.cluster,
        r.epoch,
        r.supervisor_pid,
        r.dir.display()
    );
    match &r.active {
        Some(a) => println!("active: engine {a}"),
        None => println!("active: NONE (outage)"),
    }
    print_engine_table(&r.engines);
    print_status_notes(r);
}

/// One line per engine: pid, role, epoch, versions, state, lag, rate, step-ups.
fn print_engine_table(engines: &[understudy_supervisor::proto::EngineStatus]) {
    println!(
        "{:<4} {:>7} {:<14} {:>5} {:>3} {:>6} {:>8} {:<14} {:>10} {:>10} {:>8}  last step-up",
        "slot",
        "pid",
        "role",
        "epoch",
        "ver",
        "layout",
        "features",
        "state",
        "lag B",
        "req/s",
        "step-ups"
    );
    for e in engines {
        let last = if e.step_ups == 0 {
            "never".to_string()
        } else {
            let ago = understudy_runtime::control::realtime_ns().saturating_sub(e.last_step_up_ns);
            format!(
                "{:.1} s ago, took {} µs",
                ago as f64 / 1e9,
                e.last_step_up_dur_ns / 1000
            )
        };
        println!(
            "{:<4} {:>7} {:<14} {:>5} {:>3} {:>6} {:>#8x} {:<14} {:>10} {:>10.0} {:>8}  {last}",
            e.slot,
            e.pid,
            e.role,
            e.epoch,
            e.app_version,
            e.layout_version,
            e.features,
            e.state,
            e.lag_bytes,
            e.requests_per_s,
            e.step_ups
        );
    }
}

/// What the status says besides the engines: the operation in progress, stopped restarts,
/// foreign engines, an interrupted upgrade, the last role change.
fn print_status_notes(r: &StatusReport) {
    if let Some(op) = &r.operation {
        println!("in progress: {op}");
    }
    if !r.crash_looping.is_empty() {
        println!(
            "crash loop, restarts stopped: slots {} (fix the engine, then run `understudy resume-restarts`)",
            r.crash_looping.join(", ")
        );
    }
    for rs in &r.restarts {
        println!(
            "engine {}: {} crash(es) recently, backoff {} ms{}",
            rs.slot,
            rs.crashes,
            rs.backoff_ms,
            if rs.given_up {
                ", restarts stopped"
            } else {
                ""
            }
        );
    }
    for f in &r.foreign_engines {
        println!(
            "engine {}: pid {} ({}) registered in this slot but was not started by the supervisor ({}); it is not watched, fenced or restarted",
            f.slot,
            f.pid,
            f.role,
            match f.expected_pid {
                Some(p) => format!("expected pid {p}"),
                None => "the supervisor runs no engine there".to_string(),
            }
        );
    }
    if let Some(u) = &r.interrupted_upgrade {
        println!(
            "interrupted upgrade{}{}: {}",
            u.binary
                .as_ref()
                .map(|b| format!(" to {}", b.display()))
                .unwrap_or_default(),
            u.at.as_ref()
                .map(|a| format!(" at {a}"))
                .unwrap_or_default(),
            u.decision
        );
        match &u.outcome {
            Some(o) => println!("  outcome: {o}"),
            None => println!("  outcome: settling…"),
        }
    }
    if let Some(change) = r.role_changes.last() {
        println!(
            "last role change: epoch {}, {} -> {} (step-up {} µs)",
            change.epoch,
            change.previous.as_deref().unwrap_or("none"),
            change.active.as_deref().unwrap_or("none"),
            change.step_up_dur_ns / 1000
        );
    }
}

fn doctor(cli: &Cli, fix: bool) -> Code {
    // The config is optional here: without it, the defaults are checked.
    let config = if cli.config.exists() {
        match load_config(&cli.config) {
            Ok(c) => Some(c),
            Err(code) => return code,
        }
    } else {
        None
    };
    let shm_dir = config
        .as_ref()
        .map_or_else(understudy_supervisor::config::default_shm_dir, |c| {
            c.shm_dir.clone()
        });
    let checks = doctor::run(config.as_ref(), &shm_dir, fix);
    for check in &checks {
        if cli.json {
            println!("{}", serde_json::to_string(check).unwrap_or_default());
            continue;
        }
        let mark = match check.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("[{mark}] {}: {}", check.name, check.found);
        if let Some(fix) = &check.fix {
            println!("       fix: {fix}");
        }
    }
    if checks.iter().any(|c| c.verdict == Verdict::Fail) {
        Code::Unhealthy
    } else {
        Code::Ok
    }
}
