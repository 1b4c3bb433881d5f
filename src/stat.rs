//! `understudy stat`: the engines' live counters (`<cluster dir>/counters`), read straight from
//! shared memory — no supervisor needed — as a refreshing terminal view with rates per second
//! (like `top` or Aeron's AeronStat), or as JSON lines for scripts.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use understudy_runtime::control::{monotonic_ns, Role};
use understudy_runtime::counters::{self, ClientView, Reader, SlotCounters, Snapshot};

/// How `stat` runs.
pub struct StatOptions<'a> {
    /// The cluster directory.
    pub dir: &'a Path,
    /// One view and exit (rates over one interval).
    pub once: bool,
    /// JSON lines instead of the table.
    pub json: bool,
    /// Time between refreshes (and the span of the rates).
    pub interval: Duration,
    /// Stop after this many views (0: until interrupted).
    pub count: u64,
}

/// Run `stat`; the process exit code (0, 3 when there is no counters file, 1 when it cannot be
/// believed).
pub fn run(opt: &StatOptions<'_>) -> i32 {
    let reader = match Reader::open(opt.dir) {
        Ok(r) => r,
        Err(e) if e.is_not_found() => {
            eprintln!(
                "understudy stat: no counters in {}: no engine has started in this cluster directory (or `down` removed it)",
                opt.dir.display()
            );
            return 3;
        }
        Err(e) => {
            eprintln!("understudy stat: {e}");
            return 1;
        }
    };
    let live = !opt.json && !opt.once && std::io::stdout().is_terminal();
    let mut prev = reader.snapshot();
    let mut shown = 0u64;
    let mut out = std::io::stdout();
    loop {
        std::thread::sleep(opt.interval);
        let cur = reader.snapshot();
        let text = if opt.json {
            let mut line =
                serde_json::to_string(&to_json(opt.dir, Some(&prev), &cur)).unwrap_or_default();
            line.push('\n');
            line
        } else {
            render(opt.dir, Some(&prev), &cur)
        };
        let written = if live {
            // Home and clear, then the view: a refreshing screen.
            write!(out, "\x1b[H\x1b[2J{text}")
        } else {
            write!(out, "{text}")
        }
        .and_then(|()| out.flush());
        if written.is_err() {
            return 0; // the reader went away (a closed pipe)
        }
        shown += 1;
        if opt.once || (opt.count != 0 && shown >= opt.count) {
            return 0;
        }
        prev = cur;
    }
}

/// Per-second rate of a counter between two snapshots (`None` without a previous one, or when
/// the counter went backwards: a damaged word or a rewritten file).
fn rate(prev: Option<u64>, cur: u64, dt_ns: u64) -> Option<f64> {
    let prev = prev?;
    if dt_ns == 0 || cur < prev {
        return None;
    }
    Some((cur - prev) as f64 * 1e9 / dt_ns as f64)
}

fn role_name(s: &SlotCounters) -> &'static str {
    if !s.alive() {
        return "dead";
    }
    match s.role() {
        Role::None => "starting",
        r => r.name(),
    }
}

fn state_name(s: &SlotCounters) -> String {
    format!("{:?}", s.state()).to_lowercase()
}

/// The rates of one slot: (requests, refusals, commits, applied) per second.
fn rates(prev: Option<&Snapshot>, cur: &Snapshot, i: usize) -> [Option<f64>; 4] {
    let p = prev.and_then(|p| p.slots.get(i));
    let c = &cur.slots[i];
    // The same incarnation or a restarted one: totals continue either way.
    let dt = prev.map_or(0, |p| cur.read_at_ns.saturating_sub(p.read_at_ns));
    [
        rate(p.map(|p| p.requests_total), c.requests_total, dt),
        rate(p.map(|p| p.refusals_total), c.refusals_total, dt),
        rate(p.map(|p| p.commits_total), c.commits_total, dt),
        rate(p.map(|p| p.applied_total), c.applied_total, dt),
    ]
}

/// Responses per second to one client (the same client in the previous view).
fn client_rate(prev: Option<&Snapshot>, cur: &Snapshot, c: &ClientView) -> Option<f64> {
    let p = prev?;
    let before = p.clients.iter().find(|x| x.id == c.id)?;
    rate(
        Some(before.responses_total),
        c.responses_total,
        cur.read_at_ns.saturating_sub(p.read_at_ns),
    )
}

fn opt_f(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |v| json!((v * 10.0).round() / 10.0))
}

/// One view as JSON (the shape `stat --json` prints, one object per line).
pub fn to_json(dir: &Path, prev: Option<&Snapshot>, cur: &Snapshot) -> Value {
    let now = monotonic_ns();
    let engines: Vec<Value> = cur
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.used())
        .map(|(i, s)| {
            let [rq, rf, cm, ap] = rates(prev, cur, i);
            let streams: Vec<Value> = s
                .streams
                .iter()
                .map(|v| {
                    json!({
                        "standby": v.slot_name(),
                        "hot": v.hot,
                        "position_bytes": v.position_bytes,
                        "consumed_bytes": v.consumed_bytes,
                        "lag_bytes": v.lag_bytes(),
                        "lag_transactions": cur.lag_transactions(i, v.slot),
                    })
                })
                .collect();
            json!({
                "slot": s.name().to_string(),
                "alive": s.alive(),
                "pid": s.pid,
                "role": role_name(s),
                "state": state_name(s),
                "epoch": s.epoch,
                "app_version": s.app_version,
                "heartbeat_age_ms": s.heartbeat_age_ns(now) as f64 / 1e6,
                "tx_index": s.tx_index,
                "requests_total": s.requests_total,
                "refusals_total": s.refusals_total,
                "commits_total": s.commits_total,
                "applied_total": s.applied_total,
                "requests_per_s": opt_f(rq),
                "refusals_per_s": opt_f(rf),
                "commits_per_s": opt_f(cm),
                "applied_per_s": opt_f(ap),
                "backpressure_waits_total": s.backpressure_waits_total,
                "untethers_total": s.untethers_total,
                "catchups_total": s.catchups_total,
                "step_ups_total": s.step_ups_total,
                "last_step_up_us": s.last_step_up_ns / 1000,
                "switchovers_total": s.switchovers_total,
                "last_switchover_us": s.last_switchover_ns / 1000,
                "starts_total": s.starts_total,
                "service_samples": s.service_samples(),
                "service_p50_ns": s.service_quantile_ns(0.50),
                "service_p99_ns": s.service_quantile_ns(0.99),
                "service_p999_ns": s.service_quantile_ns(0.999),
                "streams": streams,
            })
        })
        .collect();
    let clients: Vec<Value> = cur
        .clients
        .iter()
        .map(|c| {
            json!({
                "client": c.id_hex(),
                "entry": c.entry,
                "position_bytes": c.consumed_bytes,
                "published_bytes": c.published_bytes,
                "lag_bytes": c.lag_bytes(),
                "responses_total": c.responses_total,
                "responses_per_s": opt_f(client_rate(prev, cur, c)),
            })
        })
        .collect();
    json!({
        "v": 1,
        "dir": dir.display().to_string(),
        "layout_version": counters::LAYOUT_VERSION,
        "engines": engines,
        "clients": clients,
    })
}

fn fmt_rate(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

fn fmt_ns(ns: Option<u64>) -> String {
    match ns {
        None => "-".into(),
        Some(n) if n >= 1_000_000 => format!("{:.1}ms", n as f64 / 1e6),
        Some(n) if n >= 1_000 => format!("{:.1}µs", n as f64 / 1e3),
        Some(n) => format!("{n}ns"),
    }
}

fn fmt_dur(ns: u64) -> String {
    if ns == 0 {
        "-".into()
    } else {
        fmt_ns(Some(ns))
    }
}

/// One view as a table.
pub fn render(dir: &Path, prev: Option<&Snapshot>, cur: &Snapshot) -> String {
    let mut o = String::new();
    o.push_str(&format!(
        "understudy stat — {}   (rates per second; service times sampled 1 in 4, bucket upper bounds)\n\n",
        dir.display()
    ));
    let used: Vec<&SlotCounters> = cur.slots.iter().filter(|s| s.used()).collect();
    render_engines(&mut o, prev, cur, &used);
    render_events(&mut o, &used);
    render_streams(&mut o, cur, &used);
    render_clients(&mut o, prev, cur);
    o
}

/// The engines' table: role, state, rates, transaction index, service times, heartbeat age.
fn render_engines(o: &mut String, prev: Option<&Snapshot>, cur: &Snapshot, used: &[&SlotCounters]) {
    let now = monotonic_ns();
    o.push_str(&format!(
        "{:<4} {:<8} {:<8} {:>7} {:>5} {:>10} {:>8} {:>8} {:>8} {:>12} {:>8} {:>8} {:>6}\n",
        "slot",
        "role",
        "state",
        "pid",
        "epoch",
        "requests",
        "req/s",
        "refuse/s",
        "apply/s",
        "tx index",
        "p50",
        "p99",
        "hb age"
    ));
    if used.is_empty() {
        o.push_str("  (no engine has written its counters yet)\n");
    }
    for s in used {
        let [rq, rf, _, ap] = rates(prev, cur, s.slot);
        o.push_str(&format!(
            "{:<4} {:<8} {:<8} {:>7} {:>5} {:>10} {:>8} {:>8} {:>8} {:>12} {:>8} {:>8} {:>6}\n",
            s.name(),
            role_name(s),
            state_name(s),
            s.pid,
            s.epoch,
            s.requests_total,
            fmt_rate(rq),
            fmt_rate(rf),
            fmt_rate(ap),
            s.tx_index,
            fmt_ns(s.service_quantile_ns(0.50)),
            fmt_ns(s.service_quantile_ns(0.99)),
            if s.alive() {
                format!("{}ms", s.heartbeat_age_ns(now) / 1_000_000)
            } else {
                "-".into()
            },
        ));
    }
}

/// The engines' event counters: waits, untethers, catch-ups, starts, step-ups, switchovers,
/// refusals.
fn render_events(o: &mut String, used: &[&SlotCounters]) {
    o.push_str(&format!(
        "\n{:<4} {:>9} {:>9} {:>9} {:>8} {:>18} {:>18} {:>7}\n",
        "slot",
        "bp waits",
        "untether",
        "catch-up",
        "starts",
        "step-ups (last)",
        "switchovers (last)",
        "refused"
    ));
    for s in used {
        o.push_str(&format!(
            "{:<4} {:>9} {:>9} {:>9} {:>8} {:>18} {:>18} {:>7}\n",
            s.name(),
            s.backpressure_waits_total,
            s.untethers_total,
            s.catchups_total,
            s.starts_total,
            format!("{} ({})", s.step_ups_total, fmt_dur(s.last_step_up_ns)),
            format!(
                "{} ({})",
                s.switchovers_total,
                fmt_dur(s.last_switchover_ns)
            ),
            s.refusals_total,
        ));
    }
}

/// The live active's replication streams: position and lag of each standby.
fn render_streams(o: &mut String, cur: &Snapshot, used: &[&SlotCounters]) {
    let streams: Vec<(&SlotCounters, _)> = used
        .iter()
        .filter(|s| s.alive() && s.role() == Role::Active)
        .flat_map(|s| s.streams.iter().map(move |v| (*s, v)))
        .collect();
    if !streams.is_empty() {
        o.push_str("\nstreams (active → standby)\n");
        for (s, v) in streams {
            o.push_str(&format!(
                "  {} → {}  {:<7} position {:>12} B  lag {:>9} B  {:>7} tx\n",
                s.name(),
                v.slot_name(),
                if v.hot { "hot" } else { "syncing" },
                v.position_bytes,
                v.lag_bytes(),
                cur.lag_transactions(s.slot, v.slot)
                    .map_or_else(|| "-".into(), |n| n.to_string()),
            ));
        }
    }
}

/// The clients' request rings, as the active serves them.
fn render_clients(o: &mut String, prev: Option<&Snapshot>, cur: &Snapshot) {
    if !cur.clients.is_empty() {
        o.push_str(&format!(
            "\nclients (request rings, as the active serves them)\n  {:<16} {:>14} {:>10} {:>12} {:>8}\n",
            "client", "position B", "lag B", "responses", "resp/s"
        ));
        for c in &cur.clients {
            o.push_str(&format!(
                "  {:<16} {:>14} {:>10} {:>12} {:>8}\n",
                c.id_hex(),
                c.consumed_bytes,
                c.lag_bytes(),
                c.responses_total,
                fmt_rate(client_rate(prev, cur, c)),
            ));
        }
    }
}
