//! Large state under full load: a standby killed while the active holds many calls and serves
//! clients at full speed is replaced by one that catches up **without a single untether**,
//! its "hot" is true (the stream it caught up on is open: a SIGKILL of the active right after
//! loses nothing acknowledged), and the figures an operator cares about are printed: time to
//! hot, the longest pause clients saw during the catch-up, resident memory per engine.
//!
//! Sized for CI (`US_LARGE_CALLS`, default 1 000 000 calls: ~40 s in a debug build on 2 quiet
//! cores); the long run of the README is
//! `US_LARGE_CALLS=10000000 cargo test --release -p callstate --test large_state -- --nocapture`.
//! Timings are printed, never asserted (a loaded 2-core machine says nothing about them).

mod common;
use common::*;
use understudy_test_support::child::send_if_alive;

use callstate::client::CallClient;
use callstate::Request;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn calls() -> u64 {
    std::env::var("US_LARGE_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// Send `reqs` with up to `window` in flight; returns how many were answered `Ok`.
fn pipelined(c: &mut CallClient, reqs: impl Iterator<Item = Request>, window: usize) -> u64 {
    let mut in_flight = 0usize;
    let mut ok = 0u64;
    let mut drain = |c: &mut CallClient, in_flight: &mut usize, until: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while *in_flight > until {
            match c.poll().expect("poll") {
                Some((_, a)) => {
                    *in_flight -= 1;
                    ok += a.is_ok() as u64;
                }
                None => {
                    assert!(Instant::now() < deadline, "no answer for 120 s");
                    std::hint::spin_loop();
                }
            }
        }
    };
    for r in reqs {
        c.send(&r).expect("send");
        in_flight += 1;
        drain(c, &mut in_flight, window - 1);
    }
    drain(c, &mut in_flight, 0);
    ok
}

/// The longest time between answers (µs) a client saw, and its count of acknowledged bills.
#[derive(Default)]
struct Seen {
    longest_gap_us: AtomicU64,
    billed: AtomicU64,
}

/// A client billing random calls as fast as the cluster answers (16 in flight); every
/// acknowledged bill is one second billed, exactly once.
fn full_speed(dir: PathBuf, n: u64, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut c = CallClient::connect(&dir, Duration::from_secs(30)).expect("connect");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut in_flight = 0;
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) || in_flight > 0 {
        if !stop.load(Ordering::Relaxed) && in_flight < 16 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            c.send(&Request::Bill {
                call: rng % n,
                secs: 1,
            })
            .expect("send");
            in_flight += 1;
            continue;
        }
        match c.poll().expect("poll") {
            Some((_, a)) => {
                in_flight -= 1;
                assert!(a.is_ok(), "a bill of an answered call was refused: {a:?}");
                seen.billed.fetch_add(1, Ordering::Relaxed);
                let gap = last.elapsed().as_micros() as u64;
                seen.longest_gap_us.fetch_max(gap, Ordering::Relaxed);
                last = Instant::now();
            }
            None => std::hint::spin_loop(),
        }
    }
}

/// A client at a fixed 2,000 requests per second; records its longest round trip (µs).
fn paced(dir: PathBuf, n: u64, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut c = CallClient::connect(&dir, Duration::from_secs(30)).expect("connect");
    let mut k = 0u64;
    let start = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let t = Instant::now();
        let a = c
            .call(
                &Request::Bill {
                    call: (k * 7919) % n,
                    secs: 1,
                },
                Duration::from_secs(60),
            )
            .expect("call")
            .expect("an answer within 60 s");
        assert!(a.is_ok(), "{a:?}");
        seen.billed.fetch_add(1, Ordering::Relaxed);
        seen.longest_gap_us
            .fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        let next = start + Duration::from_micros(500 * k);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
}

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn untethers(cl: &Cluster) -> u64 {
    understudy_runtime::counters::read(&cl.dir())
        .map(|s| s.slots.iter().map(|c| c.untethers_total).sum())
        .unwrap_or(0)
}

#[test]
fn a_standby_replaced_under_full_load_catches_up_without_untether_and_is_truly_hot() {
    let n = calls();
    let cl = Cluster::up("large");
    let dir = cl.dir();

    // The calls: set up and answered, 64 requests in flight.
    let t = Instant::now();
    let mut c = CallClient::connect(&dir, Duration::from_secs(30)).expect("connect");
    let ok = pipelined(
        &mut c,
        (0..n).flat_map(|call| {
            [
                Request::Setup {
                    call,
                    caller: call,
                    callee: call + 1,
                    max_secs: 0,
                },
                Request::Answer { call },
            ]
        }),
        64,
    );
    assert_eq!(ok, 2 * n, "every setup and answer acknowledged");
    let load_s = t.elapsed().as_secs_f64();
    let s = cl.settled();
    let active_pid = s.engines.iter().find(|e| e.role == "active").unwrap().pid;
    let standby_pid = s.hot_standbys().next().unwrap().pid;

    // Full load: one client as fast as it goes, one at 2,000/s.
    let stop = Arc::new(AtomicBool::new(false));
    let (fast, slow) = (Arc::new(Seen::default()), Arc::new(Seen::default()));
    let threads = [
        {
            let (d, s, st) = (dir.clone(), fast.clone(), stop.clone());
            std::thread::spawn(move || full_speed(d, n, s, st))
        },
        {
            let (d, s, st) = (dir.clone(), slow.clone(), stop.clone());
            std::thread::spawn(move || paced(d, n, s, st))
        },
    ];
    std::thread::sleep(Duration::from_secs(1));
    let steady_gap = fast.longest_gap_us.swap(0, Ordering::Relaxed);
    let steady_rtt = slow.longest_gap_us.swap(0, Ordering::Relaxed);
    let billed_before = fast.billed.load(Ordering::Relaxed);
    let untethers_before = untethers(&cl);

    // Kill the standby; the supervisor starts a new one, which catches up under the load.
    let killed = Instant::now();
    send_if_alive(standby_pid, libc::SIGKILL);
    let s = cl.wait("a new hot standby", |s| {
        s.hot_standbys().any(|e| e.pid != standby_pid)
    });
    let to_hot = killed.elapsed();
    let rate = (fast.billed.load(Ordering::Relaxed) - billed_before) as f64 / to_hot.as_secs_f64();
    let catchup_gap = fast.longest_gap_us.swap(0, Ordering::Relaxed);
    let catchup_rtt = slow.longest_gap_us.swap(0, Ordering::Relaxed);
    let new_standby = s.hot_standbys().next().unwrap().pid;
    let (rss_active, rss_standby) = (rss_mib(active_pid), rss_mib(new_standby));
    let untethered = untethers(&cl) - untethers_before;

    // The "hot" is true: SIGKILL the active right away; nothing acknowledged may be lost.
    send_if_alive(active_pid, libc::SIGKILL);
    cl.wait("the new standby active", |s| {
        s.engines
            .iter()
            .any(|e| e.pid == new_standby && e.role == "active")
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("client thread");
    }
    let billed = fast.billed.load(Ordering::Relaxed) + slow.billed.load(Ordering::Relaxed);
    let totals = c
        .totals(Duration::from_secs(60))
        .expect("totals")
        .expect("a totals answer");

    // The new active's in-memory index of calls by state was kept by `on_apply` while it was
    // a standby (from the catch-up's snapshot on, with what each change replaced), never
    // rebuilt: it must count every call as active.
    let by_state = c
        .state_counts(Duration::from_secs(60))
        .expect("state counts")
        .expect("a state-counts answer");
    assert_eq!(
        by_state,
        (0, n),
        "(ringing, active) calls by the index the standby kept in on_apply"
    );
    eprintln!(
        "large state: {n} calls loaded in {load_s:.1} s; standby killed → new standby hot in {:.2} s \
         ({untethered} untethers) while one client billed {rate:.0} requests/s; longest pause: \
         full-speed client {:.2} ms between answers (steady state before: {:.2} ms), \
         2,000/s client {:.2} ms round trip (before: {:.2} ms); resident memory: active \
         {rss_active:.0} MiB, standby {rss_standby:.0} MiB ({:.0} bytes per call on the standby)",
        to_hot.as_secs_f64(),
        catchup_gap as f64 / 1000.0,
        steady_gap as f64 / 1000.0,
        catchup_rtt as f64 / 1000.0,
        steady_rtt as f64 / 1000.0,
        rss_standby * 1048576.0 / n as f64,
    );
    assert_eq!(
        untethered,
        0,
        "the new standby was untethered during its catch-up\nlog:\n{}",
        cl.log()
    );
    assert_eq!(totals.setups, n, "setups");
    assert_eq!(totals.answered, n, "answers");
    assert_eq!(
        totals.billed_secs, billed,
        "every acknowledged bill is in the totals exactly once, across the failover"
    );
}
