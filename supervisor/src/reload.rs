//! `understudy reload`: a new configuration applied to the running supervisor, without
//! restarting it.
//!
//! The client sends the configuration file's text; the supervisor parses and validates it
//! like at `up`, then compares it with the configuration it runs:
//!
//! - what can change at run time is applied at once: `[acceptance]` (the next upgrade's
//!   bounds), `[restart]` (backoff and the crash-loop breaker), `[timeouts]` (the
//!   supervisor's waits and fence threshold; engines started from then on get the new
//!   heartbeat threshold), `[metrics]` (the endpoint moves, starts or stops);
//! - what the running engines were started with cannot: `cluster`, `shm_dir`, `[engine]`
//!   (a new binary is what `upgrade` is for), `[slots]`, `[backpressure]`, `[ring]`. A change
//!   to any of them refuses the whole reload (nothing applied), naming each field with the
//!   running and the new value and what to do instead.
//!
//! A reload is refused while an operation (an upgrade, a switchover, `down`) runs: its plan
//! took the settings it started with.

use serde::Serialize;
use tracing::info;

use crate::config::ClusterConfig;
use crate::proto::{Code, ReloadRequest, Reply};

/// One field that differs: (dotted name, running value, new value).
type Change = (String, String, String);

/// Every leaf of `running` and `new` (serialised) that differs, under `prefix`.
fn diff(prefix: &str, running: &impl Serialize, new: &impl Serialize) -> Vec<Change> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<Change>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    let sub = format!("{path}.{k}");
                    walk(
                        &sub,
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        out,
                    );
                }
            }
            _ if a != b => out.push((path.to_owned(), a.to_string(), b.to_string())),
            _ => {}
        }
    }
    let a = serde_json::to_value(running).unwrap_or_default();
    let b = serde_json::to_value(new).unwrap_or_default();
    let mut out = Vec::new();
    walk(prefix, &a, &b, &mut out);
    out
}

/// The fields of `new` that differ from `running` and cannot change at run time.
pub(crate) fn fixed_changes(running: &ClusterConfig, new: &ClusterConfig) -> Vec<Change> {
    let mut out = Vec::new();
    out.extend(diff("cluster", &running.cluster, &new.cluster));
    out.extend(diff("shm_dir", &running.shm_dir, &new.shm_dir));
    out.extend(diff("engine", &running.engine, &new.engine));
    out.extend(diff("slots", &running.slots, &new.slots));
    out.extend(diff(
        "backpressure",
        &running.backpressure,
        &new.backpressure,
    ));
    out.extend(diff("ring", &running.ring, &new.ring));
    out
}

/// The fields of `new` that differ from `running` and are applied at run time.
pub(crate) fn live_changes(running: &ClusterConfig, new: &ClusterConfig) -> Vec<Change> {
    let mut out = Vec::new();
    out.extend(diff("acceptance", &running.acceptance, &new.acceptance));
    out.extend(diff("restart", &running.restart, &new.restart));
    out.extend(diff("timeouts", &running.timeouts, &new.timeouts));
    out.extend(diff("metrics", &running.metrics, &new.metrics));
    out
}

/// Handle a reload request: the reply (code `bad-config` with every reason when refused).
pub(crate) fn reload(
    config: &mut ClusterConfig,
    dir: &std::path::Path,
    request: &ReloadRequest,
) -> Reply {
    let new = match ClusterConfig::from_str(&request.config_toml, "the reloaded config") {
        Ok(c) => c,
        Err(e) => return Reply::result(Code::BadConfig, format!("reload refused: {e}")),
    };
    let fixed = fixed_changes(config, &new);
    if !fixed.is_empty() {
        let what: Vec<String> = fixed
            .iter()
            .map(|(f, a, b)| format!("`{f}` cannot change at run time (running {a}, new {b})"))
            .collect();
        return Reply::result(
            Code::BadConfig,
            format!(
                "reload refused, nothing applied: {}; the engines were started with these: change them with `understudy down` then `understudy up` (a new engine binary: `understudy upgrade --binary`)",
                what.join("; ")
            ),
        )
        .with_data(serde_json::json!({ "refused": fixed.iter().map(|c| &c.0).collect::<Vec<_>>() }));
    }
    let live = live_changes(config, &new);
    if live.is_empty() {
        return Reply::result(Code::Ok, "reloaded: nothing changed")
            .with_data(serde_json::json!({ "changed": [] }));
    }
    let metrics_moved = config.metrics != new.metrics;
    config.acceptance = new.acceptance;
    config.restart = new.restart;
    config.timeouts = new.timeouts;
    config.metrics = new.metrics;
    let mut notes = Vec::new();
    if metrics_moved {
        if let Err(e) = crate::metrics::configure(&config.metrics, dir, &config.cluster) {
            notes.push(e);
        }
    }
    let shown: Vec<String> = live
        .iter()
        .map(|(f, a, b)| format!("{f}: {a} → {b}"))
        .collect();
    info!(changes = %shown.join(", "), "configuration reloaded");
    let mut message = format!("reloaded: {}", shown.join(", "));
    for n in &notes {
        message.push_str(&format!("; {n}"));
    }
    Reply::result(
        if notes.is_empty() {
            Code::Ok
        } else {
            Code::Failed
        },
        message,
    )
    .with_data(serde_json::json!({ "changed": live.iter().map(|c| &c.0).collect::<Vec<_>>() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live sections are told apart from fixed ones, field by field.
    #[test]
    fn changes_are_sorted_into_live_and_fixed() {
        let running = ClusterConfig::new("demo", "/bin/true");
        let mut new = running.clone();
        new.acceptance.accept_for_ms = 5;
        new.restart.crash_loop_max += 1;
        new.ring.capacity_bytes /= 2;
        new.engine.args.push("--x".into());
        let live: Vec<String> = live_changes(&running, &new)
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(
            live,
            ["acceptance.accept_for_ms", "restart.crash_loop_max"],
            "{live:?}"
        );
        let fixed = fixed_changes(&running, &new);
        let names: Vec<&str> = fixed.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(names, ["engine.args", "ring.capacity_bytes"], "{fixed:?}");
        assert_eq!(fixed[1].1, "8388608");
        assert!(live_changes(&running, &running).is_empty());
        assert!(fixed_changes(&running, &running).is_empty());
    }
}
