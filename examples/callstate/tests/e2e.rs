//! callstate under `understudy up` with client load: a SIGKILL of the active, a planned
//! switchover, a rolling upgrade to v2 with acceptance (features left off), `enable-features`,
//! v2's call limits in use, `down`. Every acknowledged request is reflected exactly once in
//! the final totals; the clients see a typed error after `down`.
//!
//! Also: an engine launched with no slot, or in a slot a live engine holds, refuses to start
//! with an error naming both, and the cluster keeps its active.
//!
//! The supervisor is the workspace's `understudy` executable, found next to this crate's
//! engines in the target directory (`cargo test --workspace` builds it; alone:
//! `cargo build --bin understudy` first).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use callstate::client::CallClient;
use callstate::Request;
use understudy_runtime::client::ClientError;

mod common;
use common::*;

/// What one client had acknowledged.
#[derive(Default, Debug, Clone, Copy)]
struct Acked {
    setups: u64,
    limited_setups: u64,
    answered: u64,
    released: u64,
    billed_secs: u64,
    limit_refusals: u64,
}

/// One client: calls set up, answered, billed and released, 4 requests pipelined per call.
/// With `limited` set it sets calls up with a 5-second limit and bills up to 7 seconds.
fn load(dir: PathBuf, k: u64, stop: Arc<AtomicBool>, limited: Arc<AtomicBool>) -> Acked {
    let mut c = CallClient::connect(&dir, Duration::from_secs(30)).expect("connect");
    let mut acked = Acked::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let call = k << 32 | n;
        let lim = limited.load(Ordering::Relaxed);
        let secs = n % 7 + 1;
        let setup = Request::Setup {
            call,
            caller: k,
            callee: n,
            max_secs: if lim { 5 } else { 0 },
        };
        let reqs = [
            setup,
            Request::Answer { call },
            Request::Bill { call, secs },
            Request::Release { call },
        ];
        let mut seqs = Vec::new();
        for r in &reqs {
            seqs.push(c.send(r).expect("send"));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (i, want) in seqs.iter().enumerate() {
            let (seq, answer) = loop {
                if let Some(a) = c.poll().expect("poll") {
                    break a;
                }
                assert!(
                    Instant::now() < deadline,
                    "client {k}: no answer to request {want}"
                );
                std::thread::sleep(Duration::from_micros(200));
            };
            assert_eq!(seq, *want, "answers come in request order, each once");
            match (i, answer) {
                (0, Ok(_)) => {
                    acked.setups += 1;
                    acked.limited_setups += lim as u64;
                }
                (1, Ok(_)) => acked.answered += 1,
                (2, Ok(_)) => acked.billed_secs += secs,
                (2, Err(why)) if lim && secs > 5 && why == "limit reached" => {
                    acked.limit_refusals += 1
                }
                (3, Ok(_)) => acked.released += 1,
                (i, a) => panic!("client {k}, call {call}, request {i}: unexpected answer {a:?}"),
            }
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    acked
}

#[test]
fn callstate_under_the_supervisor() {
    let cluster = Cluster::up("e2e");
    let dir = cluster.dir();
    let stop = Arc::new(AtomicBool::new(false));
    let limited = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = (1..=2u64)
        .map(|k| {
            let (d, s, l) = (dir.clone(), stop.clone(), limited.clone());
            std::thread::spawn(move || load(d, k, s, l))
        })
        .collect();
    let mut probe = CallClient::connect(&dir, Duration::from_secs(10)).unwrap();
    let t = Duration::from_secs(30);
    let totals = |p: &mut CallClient| p.totals(t).unwrap().expect("totals");
    let progress = |p: &mut CallClient, more: u64| {
        let from = totals(p).released;
        let deadline = Instant::now() + Duration::from_secs(60);
        while totals(p).released < from + more {
            assert!(Instant::now() < deadline, "no progress: {:?}", totals(p));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    progress(&mut probe, 50);

    // 1. SIGKILL the active: the standby takes over, the supervisor restarts the dead one.
    let s = cluster.settled();
    let active = s.active_engine().unwrap().pid;
    // SAFETY: kill has no memory-safety preconditions; the pid is our cluster's active.
    unsafe { libc::kill(active as i32, libc::SIGKILL) };
    cluster.wait("a new active and a hot standby", |s| {
        s.active_engine().is_some_and(|a| a.pid != active) && s.hot_standbys().count() >= 1
    });
    progress(&mut probe, 50);

    // 2. A planned switchover.
    cluster.settled();
    cluster.run(&["switchover"]);
    progress(&mut probe, 50);

    // 3. Rolling upgrade to v2 with an acceptance check, new features left off.
    cluster.settled();
    cluster.run(&[
        "upgrade",
        "--binary",
        V2,
        "--accept-for",
        "1s",
        "--no-enable",
    ]);
    let s = cluster.settled();
    assert!(
        s.engines
            .iter()
            .all(|e| e.app_version == 2 && e.features == 0),
        "{s:#?}"
    );
    let refused = probe
        .call(
            &Request::Setup {
                call: 1,
                caller: 0,
                callee: 0,
                max_secs: 1,
            },
            t,
        )
        .unwrap()
        .unwrap();
    assert_eq!(refused, Err("call-limit is not enabled".to_string()));
    progress(&mut probe, 50);

    // 4. enable-features; the clients use call limits.
    cluster.run(&["enable-features"]);
    let s = cluster.wait("the feature on both engines", |s| {
        s.engines.len() == 2 && s.engines.iter().all(|e| e.features == 1)
    });
    assert_eq!(s.engines.len(), 2);
    limited.store(true, Ordering::Relaxed);
    progress(&mut probe, 100);

    // The role hook ran for each way of becoming active (the engines' stderr is in the log).
    let log = std::fs::read_to_string(cluster.log.clone()).unwrap();
    for how in ["active (Start,", "active (Failover,", "active (Planned,"] {
        assert!(
            log.contains(how),
            "no `{how}` in the log:\n{}",
            cluster.log()
        );
    }

    stop.store(true, Ordering::Relaxed);
    let acked: Vec<Acked> = loads.into_iter().map(|h| h.join().unwrap()).collect();
    let sum = |f: fn(&Acked) -> u64| acked.iter().map(f).sum::<u64>();
    let total = totals(&mut probe);
    assert_eq!(
        (
            total.setups,
            total.answered,
            total.released,
            total.billed_secs
        ),
        (
            sum(|a| a.setups),
            sum(|a| a.answered),
            sum(|a| a.released),
            sum(|a| a.billed_secs)
        ),
        "final totals against the acknowledged requests {acked:?}"
    );
    assert!(
        sum(|a| a.limited_setups) > 0 && sum(|a| a.limit_refusals) > 0,
        "{acked:?}"
    );
    eprintln!("acknowledged: {acked:?}; totals {total:?}");

    // 5. down: the cluster stops, a client learns it with a typed error.
    cluster.run(&["down"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe.call(&Request::GetTotals, Duration::from_millis(200)) {
            Err(ClientError::ClusterDown) => break,
            other => assert!(
                Instant::now() < deadline,
                "after down: {:?}",
                other.map(|_| ())
            ),
        }
    }
}

#[test]
fn misconfigured_engine_refuses_to_start() {
    let cluster = Cluster::up("misconf");
    let dir = cluster.dir();
    let s = cluster.settled();
    let active = s.active_engine().unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(V1);
        c.env_clear().envs(env.iter().copied());
        let t = Instant::now();
        let out = c.output().unwrap();
        assert!(t.elapsed() < Duration::from_secs(20), "fails fast");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let d = dir.to_str().unwrap();
    let (code, err) = run(&[("UNDERSTUDY_DIR", d)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("UNDERSTUDY_SLOT") && err.contains(d), "{err}");

    let (code, err) = run(&[("UNDERSTUDY_DIR", d), ("UNDERSTUDY_SLOT", &active.slot)]);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains(&format!("slot {}", active.slot))
            && err.contains(&format!("pid {}", active.pid)),
        "{err}"
    );
    let after = cluster.settled();
    assert_eq!(
        after.active_engine().map(|a| a.pid),
        Some(active.pid),
        "{after:#?}"
    );
}
