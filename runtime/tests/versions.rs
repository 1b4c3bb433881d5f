//! Engines of two application versions side by side, as in a rolling upgrade: streaming in the
//! layout both can read, features refused until every engine has them, the enable switching
//! both engines at one point of the stream, and an old engine refused a stream it cannot read.
mod common;
use common::*;
use std::time::Duration;
use understudy_runtime::control::{cmd, Control, Field, Role, State};
use understudy_runtime::engine::result;

#[test]
#[ignore]
fn child_engine() {
    child_main();
}

const T: Duration = Duration::from_secs(20);
/// Every fifth request is tagged: it needs feature `tagged` (Counter layout 2).
const TAGGED_EVERY: u64 = 5;
const TAGGED_BIT: u64 = 1 << TAGGED;
/// Requests the version-1 active handles before the switchover.
const FIRST: u64 = 1_000;

fn env(extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
    let mut v = vec![
        ("US_TAGGED_EVERY", TAGGED_EVERY.to_string()),
        ("US_KEEP", "1".to_string()),
        ("US_PACE_US", "300".to_string()),
        // Not a test of hung-active detection: a descheduled active on a loaded host must not
        // be fenced by its standby (the default threshold is 200 ms).
        ("US_HUNG_MS", "10000".to_string()),
    ];
    v.extend_from_slice(extra);
    v
}

/// The model of the workload every engine runs: version 2 handler, units kept (so every unit
/// records the layout it was written in), feature `tagged` enabled from request `enabled_from`.
fn model(enabled_from: Option<u64>) -> Model {
    let mut m = Model::new(2);
    m.app.keep = true;
    m.tagged_every = TAGGED_EVERY;
    m.enabled_from = enabled_from.map(|k| (k, TAGGED_BIT));
    m
}

/// Post a cluster command and wait (bounded) for its result.
fn command(c: &Control, command: u64, arg: u64) -> u64 {
    let seq = c.post(command, arg);
    wait_cluster(c, &format!("command {command} acknowledged"), T, || {
        c.acked().0 == seq
    });
    c.acked().1
}

/// Wait until `slot` publishes a (commits, digest) pair that equals the model's state after
/// that many requests (the engine may be streaming meanwhile).
fn wait_matches_model(c: &Control, slot: usize, m: &mut Model, what: &str) {
    wait_cluster(c, what, T, || {
        let k = c.get(slot, Field::Commits);
        let d = c.get(slot, Field::Digest);
        k == c.get(slot, Field::Commits) && k > 0 && k >= m.k && m.advance_to(k) == d
    });
}

/// The whole rolling upgrade of the test application with real processes: a version-1 active
/// streams to a version-2 standby in layout 1, tagged requests are refused while the feature is
/// off, and enabling it is refused while a version-1 engine takes part (in either role, before
/// and after a planned switchover); once both engines run version 2 the enable is accepted,
/// both engines switch at one commit index (their state equals the model's with the feature on
/// from exactly that index, and no other), and a version-1 engine that then tries to attach is
/// refused with an error naming both versions and the feature, without disturbing the active.
#[test]
fn rolling_upgrade_streams_old_layout_and_enables_features_at_one_point() {
    let mut cl = Cluster::new("versions");
    let c = cl.control();
    let side_a = cl.side(0);
    let side_b = cl.side(1);

    // 1. Version-1 active (a), version-2 standby (b).
    side_a.set_limit(FIRST);
    cl.spawn(
        "child_engine",
        0,
        1,
        u64::MAX,
        false,
        &env(&[cl.side_env(0)]),
    );
    wait_cluster(&c, "a active", T, || role(&c, 0) == Role::Active);
    cl.spawn(
        "child_engine",
        1,
        2,
        u64::MAX,
        true,
        &env(&[cl.side_env(1)]),
    );
    wait_cluster(&c, "b hot", T, || state(&c, 1) == State::Hot);
    wait_cluster(&c, &format!("both at {FIRST} transactions"), T, || {
        c.get(0, Field::Commits) == FIRST && c.get(1, Field::Commits) == FIRST
    });
    let mut base = model(None);
    let d = base.advance_to(FIRST);
    let mut v1 = Model::new(1);
    v1.app.keep = true;
    v1.tagged_every = TAGGED_EVERY;
    assert_eq!(
        v1.advance_to(FIRST),
        d,
        "the version-1 and version-2 handlers agree while the feature is off"
    );
    let mut untagged = Model::new(1);
    untagged.app.keep = true;
    assert_ne!(
        untagged.advance_to(FIRST),
        d,
        "tagged requests must leave a different state than untagged ones"
    );
    wait_cluster(
        &c,
        "both digests equal the model (tagged refused, layout 1)",
        T,
        || c.get(0, Field::Digest) == d && c.get(1, Field::Digest) == d,
    );
    assert_eq!(c.get(1, Field::Layout), 1, "b agreed on layout 1");
    assert_eq!(c.get(1, Field::PeerVersion), 1, "b sees a version-1 peer");
    assert_eq!(c.get(0, Field::PeerVersion), 2, "a sees a version-2 peer");
    assert_eq!(c.get(1, Field::Enableable), 0, "nothing is enableable");
    assert_eq!(
        command(&c, cmd::ENABLE_FEATURES, TAGGED_BIT),
        result::NOT_ENABLEABLE,
        "enable refused with a version-1 active"
    );
    assert_eq!(c.get(0, Field::Features) | c.get(1, Field::Features), 0);

    // 2. Planned switchover: version-2 active (b), version-1 standby (a); still layout 1.
    let a_gen = c.get(0, Field::AttachGen);
    assert_eq!(
        switchover::post(&c, 1, "switchover"),
        result::OK,
        "switchover"
    );
    wait_cluster(&c, "b active", T, || {
        role(&c, 1) == Role::Active && c.get(1, Field::StepUps) == 1
    });
    assert_eq!(c.get(1, Field::StepUpCommits), FIRST);
    assert_eq!(c.get(1, Field::StepUpDigest), d);
    wait_cluster(&c, "a hot standby of b", T, || {
        role(&c, 0) == Role::Standby && state(&c, 0) == State::Hot
    });
    assert_eq!(
        c.get(0, Field::AttachGen),
        a_gen + 1,
        "a follows b on the stream it pre-created at the switchover (no re-attach, no catch-up)"
    );
    assert_eq!(c.get(0, Field::Layout), 1, "a agreed on layout 1");
    assert_eq!(
        command(&c, cmd::ENABLE_FEATURES, TAGGED_BIT),
        result::NOT_ENABLEABLE,
        "enable refused with a version-1 standby"
    );
    wait_matches_model(
        &c,
        0,
        &mut base,
        "a (version 1) mirrors b in layout 1 with tagged requests refused",
    );
    assert_eq!(c.get(0, Field::Features) | c.get(1, Field::Features), 0);

    // 3. Replace the version-1 standby with a version-2 engine, then enable.
    let b_pid = c.get(1, Field::Pid);
    let gen = c.get(0, Field::AttachGen);
    cl.kill(0);
    cl.spawn("child_engine", 0, 2, u64::MAX, true, &env(&[]));
    wait_cluster(&c, "the version-2 a hot", T, || {
        state(&c, 0) == State::Hot && c.get(0, Field::AttachGen) > gen
    });
    assert_eq!(c.get(0, Field::Layout), 2, "a agreed on layout 2");
    wait_cluster(&c, "b publishes layout 2", T, || {
        c.get(1, Field::Layout) == 2
    });
    assert_eq!(c.get(0, Field::Enableable), TAGGED_BIT);
    let lo = side_b.committed();
    assert_eq!(
        command(&c, cmd::ENABLE_FEATURES, TAGGED_BIT),
        result::OK,
        "enable accepted once both engines run version 2"
    );
    let hi = side_b.committed();
    wait_cluster(&c, "both engines show the feature enabled", T, || {
        c.get(0, Field::Features) == TAGGED_BIT && c.get(1, Field::Features) == TAGGED_BIT
    });

    // 4. A version-1 engine is refused the stream that now needs layout 2.
    cl.spawn_capturing_stderr("child_engine", 2, 1, u64::MAX, true, &env(&[]));
    let (status, stderr) = cl.wait_exit(2, T);
    assert!(
        !status.success(),
        "the version-1 engine must fail; it exited with {status}"
    );
    for needle in [
        "feature `tagged`",
        "application version 1",
        "active: testapp v2",
        "standby: testapp v1",
    ] {
        assert!(
            stderr.contains(needle),
            "the refusal should mention `{needle}`; the engine printed: {stderr}"
        );
    }
    let k = c.get(1, Field::Commits);
    wait_cluster(&c, "b keeps committing after the refusal", T, || {
        c.get(1, Field::Commits) > k + 50
    });
    assert!(cl.running(1), "b exited");
    assert_eq!(c.get(1, Field::Pid), b_pid, "b restarted");
    assert_eq!(c.get(1, Field::StepUps), 1, "a role change happened");
    assert_eq!(role(&c, 1), Role::Active);
    assert_eq!(state(&c, 0), State::Hot, "a is still a hot standby");

    // Both engines end with the same state, which is the model's with the feature on from
    // exactly one commit index between the two reads around the enable.
    let end = extend_workload(&side_b, 300);
    wait_cluster(&c, &format!("both at {end} transactions"), T, || {
        c.get(0, Field::Commits) == end && c.get(1, Field::Commits) == end
    });
    wait_cluster(&c, "equal digests", T, || {
        c.get(0, Field::Digest) == c.get(1, Field::Digest) && c.get(1, Field::Digest) != 0
    });
    let d = c.get(1, Field::Digest);
    base.advance_to(lo);
    let matches: Vec<u64> = (lo..=hi)
        .filter(|&k0| {
            let mut m = model(Some(k0));
            m.store = base.store.clone();
            m.k = base.k;
            m.advance_to(end) == d
        })
        .collect();
    assert_eq!(
        matches.len(),
        1,
        "the state equals the model's with the feature enabled from exactly one index in {lo}..={hi}; matching: {matches:?}"
    );
    assert_ne!(
        base.advance_to(end),
        d,
        "tagged requests after the enable must commit"
    );
}
