//! The load generator as a command: `matchbook-loadgen --dir <cluster dir> [--clients N]
//! [--rate REQ_PER_S_PER_CLIENT (0 = as fast as possible)] [--secs S] [--icebergs]`.
//! Prints sent / acknowledged / lost / duplicated and the latency histogram; exits 1 if
//! anything was lost or duplicated.

use matchbook::loadgen::{LoadConfig, LoadGen};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = LoadConfig::new("");
    let mut secs = 5.0f64;
    let mut icebergs = false;
    let mut it = args.iter();
    let usage = |why: String| -> ! {
        eprintln!("matchbook-loadgen: {why}\nusage: matchbook-loadgen --dir DIR [--clients N] [--rate N] [--secs S] [--icebergs]");
        std::process::exit(2)
    };
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .unwrap_or_else(|| usage(format!("{name}: expected a value")))
        };
        let num = |name: &str, v: String| {
            v.parse::<f64>()
                .unwrap_or_else(|_| usage(format!("{name}: expected a number, found `{v}`")))
        };
        match a.as_str() {
            "--dir" => cfg.dir = val("--dir").into(),
            "--clients" => cfg.clients = num("--clients", val("--clients")) as usize,
            "--rate" => cfg.rate_per_client = num("--rate", val("--rate")) as u64,
            "--secs" => secs = num("--secs", val("--secs")),
            "--icebergs" => icebergs = true,
            other => usage(format!("unknown argument `{other}`")),
        }
    }
    if cfg.dir.as_os_str().is_empty() {
        usage("--dir: expected the cluster directory (e.g. /dev/shm/understudy/demo)".into());
    }
    let load = LoadGen::start(&cfg).unwrap_or_else(|e| {
        eprintln!("matchbook-loadgen: {e}");
        std::process::exit(3)
    });
    load.icebergs
        .store(icebergs, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(secs));
    let report = load.stop().unwrap_or_else(|e| {
        eprintln!("matchbook-loadgen: {e}");
        std::process::exit(3)
    });
    let h = report.histogram(0, u64::MAX);
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "sent {}  acknowledged {}  lost {}  duplicated {}  refused {}",
        report.total(|c| c.sent),
        report.total(|c| c.acked),
        report.total(|c| c.lost),
        report.total(|c| c.duplicated),
        report.total(|c| c.rejected)
    );
    println!(
        "latency µs: p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} requests)",
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0,
        h.len()
    );
    if report.total(|c| c.lost) + report.total(|c| c.duplicated) > 0 {
        std::process::exit(1);
    }
}
