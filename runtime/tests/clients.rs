//! The client path end to end: real engine processes serving shared-memory clients, with the
//! active SIGKILLed or switched over under full load; every acknowledged request must be
//! answered exactly once and be in the final state exactly once.
mod common;
use common::*;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use understudy_runtime::client::{Client, ClientError};
use understudy_runtime::control::{Control, Field, Role, State};
use understudy_test_support::ChildGuard;

static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Not a test: the test engine v1 when [`engine_command`] runs this binary.
#[test]
#[ignore = "the test engine that engine_command starts"]
fn testapp_engine() {
    if let Ok(a) = std::env::var(understudy_testkit::ENGINE_ARGS_VAR) {
        let args: Vec<String> = a.lines().map(String::from).collect();
        std::process::exit(understudy_testkit::engine_process_with(1, &args).into());
    }
}

/// A client process for the "killed mid-request" test (re-executed test binary).
#[test]
#[ignore]
fn child_client() {
    let Ok(dir) = std::env::var("US_CLIENT_DIR") else {
        return;
    };
    let mut c = Client::connect(dir.as_ref()).unwrap();
    let mut k = 1u64 << 50;
    loop {
        let mut req = LEDGER.to_vec();
        req.extend_from_slice(&k.to_le_bytes());
        let _ = c.try_submit(&req);
        let _ = c.poll_response();
        k += 1;
    }
}

/// Engines of one cluster (the workspace harness: killed, and the cluster's files removed,
/// on drop), started with [`TestEngines::spawn_testapp`].
type Engines = Cluster;

/// What one load client saw.
#[derive(Default)]
struct Tally {
    submitted: u64,
    acked: u64,
    /// Answers for requests not in flight (answered twice, or never sent).
    duplicates: u64,
    /// Answers whose counter was not the client's own count: a request lost after commit or
    /// applied twice.
    out_of_step: u64,
}

/// A client that submits counter requests as fast as it can until `stop`, then drains.
fn load_client(
    dir: std::path::PathBuf,
    id: u64,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> Tally {
    let mut c = Client::connect(&dir).unwrap();
    let mut t = Tally::default();
    let mut inflight = std::collections::HashSet::new();
    let mut req = understudy_testkit::COUNTER.to_vec();
    req.extend_from_slice(&id.to_le_bytes());
    let handle = |c: &mut Client, t: &mut Tally, inflight: &mut std::collections::HashSet<u64>| {
        while let Some((seq, resp)) = c.poll_response().unwrap() {
            if !inflight.remove(&seq) {
                t.duplicates += 1;
                continue;
            }
            t.acked += 1;
            if resp.len() != 8 || u64::from_le_bytes(resp[..8].try_into().unwrap()) != t.acked {
                t.out_of_step += 1;
            }
            acks.fetch_add(1, Ordering::Relaxed);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        if inflight.len() < 256 {
            if let Some(seq) = c.try_submit(&req).unwrap() {
                inflight.insert(seq);
                t.submitted += 1;
            }
        }
        handle(&mut c, &mut t, &mut inflight);
        if inflight.len() >= 256 {
            std::thread::yield_now();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !inflight.is_empty() && Instant::now() < deadline {
        handle(&mut c, &mut t, &mut inflight);
        std::thread::yield_now();
    }
    assert!(
        inflight.is_empty(),
        "client {id}: {} submitted requests never answered",
        inflight.len()
    );
    t
}

/// The counter of client `id` in the engines' final state.
fn counter(dir: &std::path::Path, id: u64) -> u64 {
    let mut c = Client::connect(dir).unwrap();
    let mut req = COUNTER_READ.to_vec();
    req.extend_from_slice(&id.to_le_bytes());
    let r = c
        .call(&req, Duration::from_secs(10))
        .unwrap()
        .expect("counter read answered");
    u64::from_le_bytes(r[..8].try_into().unwrap())
}

fn stats(dir: &std::path::Path) -> (u64, u64) {
    let mut c = Client::connect(dir).unwrap();
    let r = c
        .call(STATS, Duration::from_secs(10))
        .unwrap()
        .expect("stats answered");
    (
        u64::from_le_bytes(r[..8].try_into().unwrap()),
        u64::from_le_bytes(r[8..16].try_into().unwrap()),
    )
}

/// Drive 2 full-speed clients while `disrupt` runs `rounds` role changes; then check the
/// invariant: every acknowledged request answered once, applied once, none lost.
fn run_under_disruption(
    tag: &str,
    rounds: usize,
    mut disrupt: impl FnMut(&mut Engines, &Control, usize, usize) -> usize,
) {
    // Two engines and two full-speed clients fill both cores: one such test at a time.
    let _one = HEAVY.lock().unwrap_or_else(|p| p.into_inner());
    let mut e = Engines::new(tag);
    let c = e.control();
    e.spawn_testapp(0, false, &[]);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    e.spawn_testapp(1, true, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (1..=2)
        .map(|id| {
            let (d, s, a) = (e.dir.clone(), stop.clone(), acks.clone());
            std::thread::spawn(move || load_client(d, id, s, a))
        })
        .collect();
    let mut active = 0;
    for i in 0..rounds {
        let standby = 1 - active;
        wait_until(
            &format!("round {i}: standby hot"),
            Duration::from_secs(60),
            || state(&c, standby) == State::Hot && role(&c, standby) == Role::Standby,
        );
        let before = acks.load(Ordering::Relaxed);
        wait_until(
            &format!("round {i}: load flowing"),
            Duration::from_secs(10),
            || acks.load(Ordering::Relaxed) > before + 50,
        );
        active = disrupt(&mut e, &c, active, i);
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0u64;
    for (i, h) in clients.into_iter().enumerate() {
        let id = i as u64 + 1;
        let t = h.join().expect("client thread");
        assert_eq!(t.duplicates, 0, "client {id}: duplicated responses");
        assert_eq!(
            t.out_of_step, 0,
            "client {id}: answers out of step with the client's count (lost or applied twice)"
        );
        assert_eq!(t.acked, t.submitted, "client {id}: lost requests");
        assert_eq!(
            counter(&e.dir, id),
            t.acked,
            "client {id}: the final state applied its requests a different number of times than it acknowledged"
        );
        total += t.acked;
    }
    assert!(total > rounds as u64 * 50, "too little load: {total}");
}

/// SIGKILL of the active while 2 clients submit as fast as they can, many times.
#[test]
fn kills_under_client_load_lose_and_duplicate_nothing() {
    let n = std::env::var("US_KILLS")
        .ok()
        .map_or(100, |v| v.parse().unwrap());
    run_under_disruption("kills", n, |e, c, active, i| {
        let standby = 1 - active;
        let ups = c.get(standby, Field::StepUps);
        e.kill(active);
        wait_until(
            &format!("kill {i}: step-up"),
            Duration::from_secs(10),
            || c.get(standby, Field::StepUps) > ups && role(c, standby) == Role::Active,
        );
        e.spawn_testapp(active, true, &[]);
        standby
    });
}

/// Planned switchovers under the same load and invariant.
#[test]
fn switchovers_under_client_load_lose_and_duplicate_nothing() {
    let n = std::env::var("US_SWITCHES")
        .ok()
        .map_or(100, |v| v.parse().unwrap());
    run_under_disruption("switches", n, |_e, c, active, i| {
        let standby = 1 - active;
        let r = switchover::post(c, standby, &format!("switch {i}"));
        assert_eq!(r, 0, "switch {i}: refused");
        wait_until(
            &format!("switch {i}: role change"),
            Duration::from_secs(10),
            || role(c, standby) == Role::Active,
        );
        standby
    });
}

/// A crash between commit and egress (test hook): the new active re-emits the committed
/// response exactly once; the client sees one answer.
#[test]
fn crash_between_commit_and_egress_gives_exactly_one_response() {
    let mut e = Engines::new("egress");
    let c = e.control();
    e.spawn_testapp(0, false, &[("UNDERSTUDY_TEST_CRASH_BEFORE_EGRESS", "5")]);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    e.spawn_testapp(1, true, &[]);
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    let mut cl = Client::connect(&e.dir).unwrap();
    for k in 0..10u64 {
        let mut req = LEDGER.to_vec();
        req.extend_from_slice(&k.to_le_bytes());
        let r = cl.call(&req, Duration::from_secs(10)).unwrap();
        assert_eq!(
            r,
            Some(1u64.to_le_bytes().to_vec()),
            "request {k}: exactly one application"
        );
    }
    assert_eq!(
        role(&c, 1),
        Role::Active,
        "the hook must have killed a; b took over"
    );
    // No stray duplicate arrives later.
    assert_eq!(cl.wait_response(Duration::from_millis(100)).unwrap(), None);
    drop(cl);
    assert_eq!(stats(&e.dir), (10, 10));
}

/// A client writing garbage is cut off with an error; a client killed mid-request is
/// reclaimed; the engines and the other client carry on unaffected.
#[test]
fn bad_and_dead_clients_leave_others_unaffected() {
    let mut e = Engines::new("bad");
    let c = e.control();
    e.spawn_testapp(0, false, &[]);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    e.spawn_testapp(1, true, &[]);
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    let pid_a = c.get(0, Field::Pid);
    let mut good = Client::connect(&e.dir).unwrap();
    let mut bad = Client::connect(&e.dir).unwrap();
    assert!(bad.submit_raw(99, b"\xff\xfe garbage"));
    let mut closed = false;
    for _ in 0..2000 {
        match bad.poll_response() {
            Err(ClientError::ClientClosed { .. }) => {
                closed = true;
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    assert!(closed, "the garbage-writing client's rings must be closed");
    // A client process killed mid-request.
    // Guarded: it spins until killed, also when the test fails before the kill below.
    let mut child = ChildGuard::spawn(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_client", "--ignored", "--nocapture"])
            .env("US_CLIENT_DIR", &e.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let files = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|f| {
                f.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("client-")
            })
            .count()
    };
    wait_until("child client connected", Duration::from_secs(10), || {
        files(&e.dir) >= 6
    });
    std::thread::sleep(Duration::from_millis(30));
    child.kill();
    for k in 0..100u64 {
        let mut req = LEDGER.to_vec();
        req.extend_from_slice(&k.to_le_bytes());
        assert_eq!(
            good.call(&req, Duration::from_secs(10)).unwrap(),
            Some(1u64.to_le_bytes().to_vec())
        );
    }
    // The dead client's rings are reclaimed (the bad client's stay until it drops them).
    wait_until("dead client reclaimed", Duration::from_secs(10), || {
        files(&e.dir) == 4
    });
    assert_eq!(c.get(0, Field::Pid), pid_a, "the active never restarted");
    assert_eq!(role(&c, 0), Role::Active);
    assert_eq!(state(&c, 1), State::Hot);
}
