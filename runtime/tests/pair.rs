//! Two real engine processes of the test application: streaming, catch-up, crash step-up.
mod common;
use common::*;
use std::time::Duration;
use understudy_runtime::control::{Field, Role, State};

#[test]
#[ignore]
fn child_engine() {
    child_main();
}

/// After thousands of transactions the standby's state digest equals the active's, and equals
/// the model's state after the same number of transactions.
#[test]
fn standby_mirrors_active_exactly() {
    let mut cl = Cluster::new("mirror");
    let c = cl.control();
    cl.spawn("child_engine", 0, 1, 5000, false, &[]);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    cl.spawn("child_engine", 1, 1, 5000, true, &[]);
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    wait_until(
        "all 5000 committed and applied",
        Duration::from_secs(20),
        || c.get(0, Field::Commits) == 5000 && c.get(1, Field::Commits) == 5000,
    );
    let mut m = Model::new(1);
    let d = m.advance_to(5000);
    wait_until("digests published", Duration::from_secs(5), || {
        c.get(0, Field::Digest) == d && c.get(1, Field::Digest) == d
    });
}

fn side_path(cl: &Cluster, slot: usize) -> std::path::PathBuf {
    cl.dir.with_extension(format!("side-{slot}"))
}

/// Engine settings for `slot`: its side channel (`<dir>.side-N`, removed with the cluster) and
/// a workload paced at 50 µs.
fn paced_env(cl: &Cluster, slot: usize) -> Vec<(&'static str, String)> {
    vec![
        ("US_SIDE", side_path(cl, slot).display().to_string()),
        ("US_PACE_US", "50".to_string()),
    ]
}

/// The active in `slot` counts its standby hot once the standby's acknowledgement of its
/// catch-up arrives, and then prepares its own standby stream of the next epoch: once that
/// file exists a switchover is not refused as "target not hot" (the test sees the standby's
/// own "hot" a moment earlier).
fn wait_ready_to_hand_over(cl: &Cluster, c: &understudy_runtime::control::Control, slot: usize) {
    wait_until(
        "the active ready to hand over",
        Duration::from_secs(10),
        || {
            understudy_runtime::control::Control::stream_path(
                &cl.dir,
                c.epoch() + 1,
                slot,
                c.get(slot, Field::AttachGen) + 1,
            )
            .exists()
        },
    );
}

/// `a` active and `b` starting as its standby, both paced and reporting through side channels.
fn start_pair(tag: &str) -> (Cluster, understudy_runtime::control::Control) {
    let mut cl = Cluster::new(tag);
    let c = cl.control();
    let e0 = paced_env(&cl, 0);
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    let e1 = paced_env(&cl, 1);
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    (cl, c)
}

/// The core failover invariant over many real SIGKILLs of the active during streaming: the
/// standby steps up with the state after exactly the first k transactions, where k is at least
/// what the dead active reported committed and at most what it had started.
#[test]
fn sigkill_of_active_loses_nothing_commits_nothing_twice() {
    let kills: usize = std::env::var("US_KILLS")
        .ok()
        .map_or(100, |v| v.parse().unwrap());
    let (mut cl, c) = start_pair("kill");
    let mut model = Model::new(1);
    let mut rng = 0x9E3779B97F4A7C15u64;
    let mut active = 0usize;
    for i in 0..kills {
        let standby = 1 - active;
        wait_until(
            &format!("kill {i}: standby hot"),
            Duration::from_secs(20),
            || state(&c, standby) == State::Hot && role(&c, standby) == Role::Standby,
        );
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_micros(rng % 5000));
        let stepups = c.get(standby, Field::StepUps);
        cl.kill(active);
        let side = Side::open(&side_path(&cl, active));
        let (committed, started) = (side.committed(), side.started());
        wait_until(
            &format!("kill {i}: standby steps up"),
            Duration::from_secs(10),
            || c.get(standby, Field::StepUps) > stepups && role(&c, standby) == Role::Active,
        );
        let k = c.get(standby, Field::StepUpCommits);
        let digest = c.get(standby, Field::StepUpDigest);
        assert!(
            committed <= k && k <= started,
            "kill {i}: stepped up at {k} transactions; the dead active had committed {committed} and started {started}"
        );
        assert_eq!(
            model.advance_to(k),
            digest,
            "kill {i}: state after step-up differs from the state after exactly {k} transactions"
        );
        let e = paced_env(&cl, active);
        cl.spawn("child_engine", active, 1, u64::MAX, true, &e);
        active = standby;
    }
}

/// A panic on the active's engine thread is a failover with nothing lost, whether the engine
/// aborts on it (the default) or lets it unwind out of `Engine::run` (the process then ends
/// when the unwinding thread does): the standby steps up with exactly the committed prefix.
fn panic_of_active_is_a_failover(policy: &str) {
    let mut cl = Cluster::new(&format!("panic-{policy}"));
    let c = cl.control();
    let mut e0 = paced_env(&cl, 0);
    e0.push(("US_PANIC_AFTER", "3000".to_string()));
    e0.push(("US_ON_PANIC", policy.to_string()));
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    let e1 = paced_env(&cl, 1);
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    wait_until(
        "b steps up after a's panic",
        Duration::from_secs(60),
        || c.get(1, Field::StepUps) > 0 && role(&c, 1) == Role::Active,
    );
    let side = Side::open(&side_path(&cl, 0));
    let (committed, started) = (side.committed(), side.started());
    let k = c.get(1, Field::StepUpCommits);
    assert!(
        committed <= k && k <= started && k >= 3000 - 1,
        "stepped up at {k} transactions; the panicked active had committed {committed} and started {started}"
    );
    assert_eq!(
        Model::new(1).advance_to(k),
        c.get(1, Field::StepUpDigest),
        "state after step-up differs from the state after exactly {k} transactions"
    );
    let (status, _) = cl.wait_exit(0, Duration::from_secs(20));
    assert!(
        !status.success(),
        "the panicked engine must not exit 0: {status:?}"
    );
}

#[test]
fn panic_of_active_aborting_is_a_failover() {
    panic_of_active_is_a_failover("abort");
}

#[test]
fn panic_of_active_unwinding_is_a_failover() {
    panic_of_active_is_a_failover("unwind");
}

/// Wrong (but well-formed) identity and heartbeat words for the active — as a corrupted control
/// block or a buggy tool could leave them — never make the standby step up beside a live
/// active or fence it: the mutex holder and the stream are the second sources.
#[test]
fn wrong_identity_and_heartbeat_words_never_make_a_second_active() {
    let mut cl = Cluster::new("lying-words");
    let c = cl.control();
    let e0 = paced_env(&cl, 0);
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    // A short hung threshold: the stale heartbeat word alone would fence at once.
    let mut e1 = paced_env(&cl, 1);
    e1.push(("US_HUNG_MS", "150".to_string()));
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    wait_until("b hot", Duration::from_secs(20), || {
        state(&c, 1) == State::Hot
    });
    let a_pid = cl.pid(0).unwrap();
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        // A pid that is certainly not a live process of ours, and a heartbeat from boot.
        c.set(0, Field::Pid, 4_000_000);
        c.set(0, Field::StartTime, 1);
        c.set(0, Field::HeartbeatNs, 1);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(cl.running(0), "the active (pid {a_pid}) was killed");
    assert_eq!(
        c.get(1, Field::StepUps),
        0,
        "the standby stepped up beside a live active"
    );
    assert_eq!(role(&c, 1), Role::Standby);
    // And the cluster still works: a real death is still a failover.
    c.set(0, Field::Pid, a_pid as u64);
    cl.kill(0);
    wait_until(
        "b steps up after the real death",
        Duration::from_secs(20),
        || c.get(1, Field::StepUps) > 0 && role(&c, 1) == Role::Active,
    );
}

/// A new engine in a slot starts its request counts at 0: a previous engine's larger count
/// left in the slot made the supervisor's acceptance check (a difference from when it began)
/// see a new version that served thousands of requests as having served none.
#[test]
fn a_new_engine_does_not_inherit_its_slots_request_counts() {
    let mut cl = Cluster::new("fresh-counts");
    let c = cl.control();
    let e0 = paced_env(&cl, 0);
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    c.set(1, Field::Requests, 1_000_000);
    c.set(1, Field::Refusals, 1_000);
    let e1 = paced_env(&cl, 1);
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    wait_until("b hot", Duration::from_secs(20), || {
        state(&c, 1) == State::Hot
    });
    assert_eq!(c.get(1, Field::Requests), 0);
    assert_eq!(c.get(1, Field::Refusals), 0);
}

/// Planned switchovers back and forth under load: each time the new active starts from exactly
/// the old active's committed state, and the old active becomes a hot standby without catch-up.
#[test]
fn planned_switchovers_lose_nothing() {
    let n: usize = std::env::var("US_SWITCHES")
        .ok()
        .map_or(100, |v| v.parse().unwrap());
    let (cl, c) = start_pair("switch");
    let mut model = Model::new(1);
    let mut active = 0usize;
    for i in 0..n {
        let standby = 1 - active;
        wait_until(
            &format!("switch {i}: standby hot"),
            Duration::from_secs(20),
            || state(&c, standby) == State::Hot && role(&c, standby) == Role::Standby,
        );
        std::thread::sleep(Duration::from_millis(2));
        let stepups = c.get(standby, Field::StepUps);
        let r = switchover::post(&c, standby, &format!("switch {i}"));
        assert_eq!(r, 0, "switch {i}: refused with code {r}");
        wait_until(
            &format!("switch {i}: target active"),
            Duration::from_secs(10),
            || c.get(standby, Field::StepUps) > stepups && role(&c, standby) == Role::Active,
        );
        let side = Side::open(&side_path(&cl, active));
        let committed = side.committed();
        let k = c.get(standby, Field::StepUpCommits);
        assert_eq!(
            k, committed,
            "switch {i}: new active starts at {k}, old active committed {committed}"
        );
        assert_eq!(
            model.advance_to(k),
            c.get(standby, Field::StepUpDigest),
            "switch {i}: state differs"
        );
        active = standby;
    }
    // The last old active is a hot standby mirroring the new active.
    let standby = 1 - active;
    wait_until("final standby hot", Duration::from_secs(10), || {
        state(&c, standby) == State::Hot
    });
}

/// The target of a planned switchover dies before it steps up: the old active, which already
/// handed over, takes the active role back with exactly its committed state; nothing is lost
/// and the cluster is not left without an active.
#[test]
fn switchover_target_dying_before_step_up_leaves_the_old_active_in_charge() {
    let (mut cl, c) = start_pair("handback");
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    wait_ready_to_hand_over(&cl, &c, 0);
    // Freeze b so it cannot step up, hand over to it, then kill it.
    cl.stop(1);
    assert_eq!(
        switchover::post(&c, 1, "switchover"),
        0,
        "switchover refused"
    );
    wait_until("a handed over", Duration::from_secs(10), || {
        role(&c, 0) == Role::Standby
    });
    let ups = c.get(0, Field::StepUps);
    cl.kill(1);
    wait_until("a active again", Duration::from_secs(20), || {
        role(&c, 0) == Role::Active && c.get(0, Field::StepUps) > ups
    });
    let k = c.get(0, Field::StepUpCommits);
    let side = Side::open(&side_path(&cl, 0));
    let mut model = Model::new(1);
    assert_eq!(
        model.advance_to(k),
        c.get(0, Field::StepUpDigest),
        "state differs after taking back"
    );
    assert!(
        side.committed() >= k,
        "a committed {} but took back at {k}",
        side.committed()
    );
    // The cluster heals: a new standby attaches and the active keeps committing.
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &[]);
    wait_until("b hot again", Duration::from_secs(20), || {
        state(&c, 1) == State::Hot
    });
    let before = c.get(0, Field::Commits);
    wait_until("a commits", Duration::from_secs(10), || {
        c.get(0, Field::Commits) > before
    });
}

/// The switchover target steps up (claims the epoch, holds the mutex) and dies before it
/// serves anything or re-attaches the old active: the old active, never hot in the new epoch,
/// may and does take the role back, because the target marks its slot before its first commit.
#[test]
fn switchover_target_dying_right_after_step_up_hands_back() {
    let mut cl = Cluster::new("handback2");
    let c = cl.control();
    cl.spawn(
        "child_engine",
        0,
        1,
        u64::MAX,
        false,
        &[("US_PACE_US", "50".to_string())],
    );
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    cl.spawn(
        "child_engine",
        1,
        1,
        u64::MAX,
        true,
        &[("UNDERSTUDY_TEST_ABORT_AFTER_STEP_UP", "1".to_string())],
    );
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    std::thread::sleep(Duration::from_millis(20));
    let ups = c.get(0, Field::StepUps);
    switchover::post(&c, 1, "switchover");
    wait_until("a active again", Duration::from_secs(20), || {
        role(&c, 0) == Role::Active && c.get(0, Field::StepUps) > ups
    });
    assert!(
        c.epoch() >= 3,
        "b claimed epoch 2, a must have claimed a later one"
    );
    let k = c.get(0, Field::StepUpCommits);
    assert_eq!(Model::new(1).advance_to(k), c.get(0, Field::StepUpDigest));
    let before = c.get(0, Field::Commits);
    wait_until("a commits again", Duration::from_secs(10), || {
        c.get(0, Field::Commits) > before
    });
}

/// A hung (not dead) active is fenced by its standby: with the active frozen (SIGSTOP), its
/// heartbeat ages past the threshold, the standby SIGKILLs it and steps up with exactly the
/// state the active had committed — never two actives.
#[test]
fn hung_active_is_fenced_and_the_standby_steps_up() {
    let mut cl = Cluster::new("hung");
    let c = cl.control();
    let e0 = paced_env(&cl, 0);
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    let mut e1 = paced_env(&cl, 1);
    e1.push(("US_HUNG_MS", "150".to_string()));
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    std::thread::sleep(Duration::from_millis(20));
    cl.stop(0);
    let side = Side::open(&side_path(&cl, 0));
    let (committed, started) = (side.committed(), side.started());
    wait_until("b fences a and steps up", Duration::from_secs(10), || {
        role(&c, 1) == Role::Active && c.get(1, Field::StepUps) > 0
    });
    wait_until("a killed", Duration::from_secs(5), || !cl.running(0));
    let k = c.get(1, Field::StepUpCommits);
    assert!(
        committed <= k && k <= started,
        "stepped up at {k}; the hung active had committed {committed}, started {started}"
    );
    assert_eq!(Model::new(1).advance_to(k), c.get(1, Field::StepUpDigest));
}

/// An old active descheduled between its step-up frame and releasing the mutex (a test hook
/// stalls it for 1.5 s, three times the crash path's give-up bound): the target waits for the
/// mutex instead of giving up, which would leave both engines standby, and steps up with
/// exactly the handed-over state.
#[test]
fn switchover_waits_for_an_old_active_stalled_before_releasing_the_mutex() {
    let mut cl = Cluster::new("stall");
    let c = cl.control();
    let mut e0 = paced_env(&cl, 0);
    e0.push(("UNDERSTUDY_TEST_STALL_BEFORE_UNLOCK_MS", "1500".to_string()));
    cl.spawn("child_engine", 0, 1, u64::MAX, false, &e0);
    wait_until("a active", Duration::from_secs(10), || {
        role(&c, 0) == Role::Active
    });
    let e1 = paced_env(&cl, 1);
    cl.spawn("child_engine", 1, 1, u64::MAX, true, &e1);
    wait_until("b hot", Duration::from_secs(10), || {
        state(&c, 1) == State::Hot
    });
    wait_ready_to_hand_over(&cl, &c, 0);
    assert_eq!(
        switchover::post(&c, 1, "switchover"),
        0,
        "switchover refused"
    );
    wait_until("b active", Duration::from_secs(20), || {
        role(&c, 1) == Role::Active && c.get(1, Field::StepUps) > 0
    });
    assert!(
        cl.running(0) && cl.running(1),
        "no engine was fenced or died"
    );
    let k = c.get(1, Field::StepUpCommits);
    assert_eq!(Model::new(1).advance_to(k), c.get(1, Field::StepUpDigest));
    let before = c.get(1, Field::Commits);
    wait_until("b commits", Duration::from_secs(10), || {
        c.get(1, Field::Commits) > before
    });
    wait_until("a follows b, hot", Duration::from_secs(10), || {
        role(&c, 0) == Role::Standby && state(&c, 0) == State::Hot
    });
}
