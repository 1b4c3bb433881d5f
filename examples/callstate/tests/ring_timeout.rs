//! Ring timeouts through replicated timers: calls set up with a ring timeout and never
//! answered are released by the cluster — also when a planned switchover and a SIGKILL of the
//! active fall between the setup and the timeout — while calls answered or released in time
//! are left alone (the answer and the release cancel their timers), and each timed-out call is
//! counted once in the totals.

mod common;
use common::*;

use callstate::client::CallClient;
use callstate::Request;
use std::time::{Duration, Instant};

#[test]
fn unanswered_calls_are_released_once_by_their_ring_timer_across_role_changes() {
    let cl = Cluster::up("ring");
    cl.settled();
    let t = Duration::from_secs(30);
    let mut c = CallClient::connect(&cl.dir(), t).expect("connect");
    let ok = |c: &mut CallClient, r: Request| {
        let a = c.call(&r, t).expect("call").expect("an answer in time");
        assert!(a.is_ok(), "{r:?}: {a:?}");
    };
    let ringing = |call, ring_ms| Request::SetupRinging {
        call,
        caller: call,
        callee: call + 100,
        ring_ms,
    };
    // 1: never answered. 2: answered in time. 3: released in time.
    ok(&mut c, ringing(1, 300));
    ok(&mut c, ringing(2, 300));
    ok(&mut c, Request::Answer { call: 2 });
    ok(&mut c, ringing(3, 300));
    ok(&mut c, Request::Release { call: 3 });
    // 4 and 5: never answered, their timeouts after a switchover and a SIGKILL of the active.
    ok(&mut c, ringing(4, 1_500));
    ok(&mut c, ringing(5, 3_000));
    cl.run(&["switchover"]);
    let s = cl.settled();
    let active = s
        .engines
        .iter()
        .find(|e| e.role == "active")
        .expect("active");
    // SAFETY: kill(2) of the cluster's active engine, whose pid the supervisor just reported.
    unsafe { libc::kill(active.pid as i32, libc::SIGKILL) };
    let killed = active.pid;
    cl.wait("a new active and a hot standby", |s| {
        s.operation.is_none()
            && s.engines
                .iter()
                .any(|e| e.role == "active" && e.pid != killed)
            && s.hot_standbys().count() >= 1
    });

    // Every timeout has passed: 1, 4 and 5 are gone, 2 is still up.
    let deadline = Instant::now() + Duration::from_secs(30);
    let totals = loop {
        let totals = c.totals(t).expect("totals").expect("totals answered");
        if totals.released >= 4 || Instant::now() > deadline {
            break totals;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(3_500));
    let again = c.totals(t).expect("totals").expect("totals answered");
    assert_eq!(totals, again, "nothing more released later");
    assert_eq!(
        (totals.setups, totals.answered, totals.released),
        (5, 1, 4),
        "3 released by their ring timers, 1 by a request\nlog:\n{}",
        cl.log()
    );
    for call in [1, 4, 5] {
        let a = c.call(&Request::Answer { call }, t).unwrap().unwrap();
        assert_eq!(a, Err("no such call".to_string()), "call {call}");
    }
    ok(&mut c, Request::Bill { call: 2, secs: 3 });
}
