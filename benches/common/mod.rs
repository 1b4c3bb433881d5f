//! Helpers shared by the runtime benchmarks (`replication`, `failover`): order statistics and
//! the results file `benches/RESULTS-runtime.md`, where each bench owns one marked section.
#![allow(dead_code)]

use std::path::PathBuf;

/// The `q`-quantile (0.0..=1.0) of `v` by nearest rank; `v` need not be sorted. 0 if empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = (q * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// The median of `v`.
pub fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// A duration in ns, printed with a unit that keeps three significant figures.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1_000.0 {
        format!("{ns:.1} ns")
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else if ns < 1_000_000_000.0 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.3} s", ns / 1e9)
    }
}

/// `benches/RESULTS-runtime.md` of the root package.
pub fn results_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/RESULTS-runtime.md")
}

const HEADER: &str = "# Runtime benchmarks: measured figures\n\n\
Written by `cargo bench --bench replication --bench failover` (each bench rewrites its own \
section). The machine is a noisy 2-vCPU VM: only medians, quantiles and ratios measured in the \
same run mean anything.\n";

/// Replace (or append) the section `name` of the results file with `body`.
pub fn write_section(name: &str, body: &str) {
    let path = results_path();
    let old = std::fs::read_to_string(&path).unwrap_or_else(|_| HEADER.to_string());
    let begin = format!("<!-- begin {name} -->");
    let end = format!("<!-- end {name} -->");
    let section = format!("{begin}\n{}\n{end}", body.trim_end());
    let new = match (old.find(&begin), old.find(&end)) {
        (Some(b), Some(e)) if e > b => {
            format!("{}{section}{}", &old[..b], &old[e + end.len()..])
        }
        _ => format!("{}\n{section}\n", old.trim_end()),
    };
    if let Err(e) = std::fs::write(&path, new) {
        eprintln!("could not write {}: {e}", path.display());
    }
}

/// A results table row: figure, measured, baseline, target, met?.
pub fn row(
    figure: &str,
    measured: &str,
    baseline: &str,
    target: &str,
    met: Option<bool>,
) -> String {
    let met = match met {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "—",
    };
    format!("| {figure} | {measured} | {baseline} | {target} | {met} |\n")
}

/// The table header for [`row`].
pub const TABLE_HEAD: &str =
    "| figure | measured | baseline (same run) | target | met? |\n|---|---|---|---|---|\n";

/// `/proc/loadavg`'s 1-minute figure and the CPU count, to record how busy the machine was
/// (other processes weigh on every figure here).
pub fn load_note() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("load average (1 min) {load} on {cpus} CPUs")
}
