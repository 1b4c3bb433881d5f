//! The fault campaign as CI runs it: `understudy torture` (the real command, `--json`) with a
//! few hundred events — every way an engine can die, on the active and on the standby, stalls,
//! switchovers, upgrades and supervisor restarts — under client load, with nothing lost or
//! duplicated and no outage.
//!
//! `UNDERSTUDY_TORTURE_EVENTS` (default 250) and `UNDERSTUDY_TORTURE_SEED` (default 2026) set
//! the run; the long version is `cargo run --release -- torture --events 10000`.
//!
//! Needs the testkit's test executables next to `understudy` (`cargo test --workspace` builds
//! them; with `-p understudy` alone run `cargo build --workspace --bins` first).

use std::path::Path;
use std::process::Command;

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}: expected a number, found `{v}`")),
        Err(_) => default,
    }
}

#[test]
fn torture_campaign() {
    for v in [1, 2] {
        understudy_test_support::cluster::testapp(Path::new(CLI), v);
    }
    let events = env_u64("UNDERSTUDY_TORTURE_EVENTS", 250);
    let seed = env_u64("UNDERSTUDY_TORTURE_SEED", 2026);
    let out = Command::new(CLI)
        .args(["--json", "torture", "--events"])
        .arg(events.to_string())
        .arg("--seed")
        .arg(seed.to_string())
        .output()
        .expect("run understudy torture");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("expected the report as JSON: {e}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    let load = |k: &str| report["load"][k].as_u64().unwrap_or(u64::MAX);
    assert!(
        out.status.success() && report["ok"] == true,
        "the campaign failed (exit {:?}): {}\nstderr:\n{stderr}",
        out.status.code(),
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    assert_eq!(n("events"), events, "every event was applied");
    assert_eq!((load("lost"), load("duplicated")), (0, 0));
    assert_eq!(n("outages"), 0);
    assert!(load("acknowledged") > events, "the clients made progress");
    // The mix reached both roles and the operations (a few hundred events make each likely).
    let kinds = report["kinds"].as_object().expect("kinds");
    for want in ["active ", "standby ", "switchover", "stall"] {
        assert!(
            kinds.keys().any(|k| k.contains(want)),
            "no `{want}` event in {:?}",
            kinds.keys().collect::<Vec<_>>()
        );
    }
}
