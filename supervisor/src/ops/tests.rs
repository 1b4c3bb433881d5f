//! The operations against a fake cluster ([`FakeCluster`]): no process is started. Each
//! operation's happy path, the engine refusing, a timeout and an engine dying in the middle.

use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use understudy_control::control::{ClusterCommand, Field, Pending, Role, SlotCommand, State};
use understudy_control::result::CommandResult;

use super::fake::FakeCluster;
use super::{Operation, Stepped};
use crate::cluster::ClusterOps;
use crate::proto::{Code, Op, PromoteRequest, Reply, ReplyKind, UpgradeRequest};

/// The most turns any operation here may take (each turn waits 1 ms): a bound, not a timing.
const TURNS_MAX: usize = 20_000;
const TURN: Duration = Duration::from_millis(1);

/// How an operation driven to its end ended.
enum End {
    /// Its result went to its watchers.
    Ended,
    /// Its result, to be sent with the status.
    Finished(Reply),
}

/// Plays the engines and steps `op` until it ends; panics (naming the operation) if it
/// does not within [`TURNS_MAX`] turns.
fn drive(fake: &mut FakeCluster, op: &mut Operation) -> End {
    for _ in 0..TURNS_MAX {
        fake.turn();
        match op.step(fake) {
            Stepped::Running => std::thread::sleep(TURN),
            Stepped::Ended => return End::Ended,
            Stepped::Finished(result) => return End::Finished(result.reply),
            Stepped::Became(next) => *op = *next,
        }
    }
    panic!(
        "expected `{}` to end within {TURNS_MAX} turns, found it still running",
        op.describe()
    );
}

/// Begins `op` (it must begin) with a channel for its replies.
fn begin(fake: &mut FakeCluster, op: Op) -> (Operation, Receiver<Reply>) {
    let (tx, rx) = mpsc::channel();
    match Operation::begin(fake, op, tx) {
        Ok(op) => (op, rx),
        Err(reply) => panic!("expected the operation to begin, found {reply:?}"),
    }
}

/// The result line among the replies.
fn result_of(rx: &Receiver<Reply>) -> Reply {
    let replies: Vec<Reply> = rx.try_iter().collect();
    replies
        .iter()
        .rev()
        .find(|r| r.kind == ReplyKind::Result)
        .cloned()
        .unwrap_or_else(|| panic!("expected a result, found only {replies:?}"))
}

/// Drives `op` to an end whose result went to the channel.
fn run_to_result(fake: &mut FakeCluster, op: &mut Operation, rx: &Receiver<Reply>) -> Reply {
    match drive(fake, op) {
        End::Ended => result_of(rx),
        End::Finished(reply) => reply,
    }
}

/// The cluster command still posted, if any (a withdrawn one is none).
fn posted_command(fake: &FakeCluster) -> Option<ClusterCommand> {
    match fake.control().pending_command() {
        Some((_, Pending::Command(c))) => Some(c),
        Some((_, Pending::Bad(bad))) => panic!("a bad command posted: {bad}"),
        Some((_, Pending::Withdrawn)) | None => None,
    }
}

#[test]
fn switchover_hands_the_active_role_to_the_hot_standby() {
    // Proves the happy path: the command is posted and acknowledged, b becomes the active of
    // epoch 2 and a its hot standby, and the result says so.
    let mut fake = FakeCluster::serving();
    let (mut op, rx) = begin(&mut fake, Op::Switchover);
    assert_eq!(
        posted_command(&fake),
        Some(ClusterCommand::Switchover { target: 1 })
    );
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    assert_eq!(reply.data["from"], "a");
    assert_eq!(reply.data["to"], "b");
    assert_eq!(reply.data["epoch"], 2);
    assert!(fake.is_active(1) && fake.is_hot_standby(0));
    assert_eq!(posted_command(&fake), None);
}

#[test]
fn switchover_without_an_active_or_a_hot_standby_does_not_begin() {
    // Proves the refusals before anything is posted: no hot standby (wrong role), no active
    // (outage).
    let mut fake = FakeCluster::serving();
    fake.write(1, Role::Standby, State::Syncing);
    let (tx, _rx) = mpsc::channel();
    let refused = Operation::begin(&mut fake, Op::Switchover, tx.clone()).err();
    assert_eq!(refused.and_then(|r| r.code), Some(Code::WrongRole));
    fake.die(0);
    let refused = Operation::begin(&mut fake, Op::Switchover, tx).err();
    assert_eq!(refused.and_then(|r| r.code), Some(Code::Outage));
    assert_eq!(posted_command(&fake), None);
}

#[test]
fn switchover_refused_as_not_hot_is_asked_once_more_then_reported() {
    // Proves the repost rule: "not hot" for a target that reports hot is asked once more
    // (two commands posted), and a second refusal is the answer, named for the operator.
    let mut fake = FakeCluster::serving();
    fake.answer = Some(CommandResult::NotHot);
    let (mut op, rx) = begin(&mut fake, Op::Switchover);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::WrongRole), "{reply:?}");
    assert_eq!(
        reply.message,
        "engine a refused: the target is not a hot standby"
    );
    assert_eq!(
        fake.control().acked_result().0,
        2,
        "expected the command asked twice"
    );
    assert!(fake.is_active(0), "the active stays");
}

#[test]
fn switchover_refused_as_busy_is_reported_at_once() {
    // Proves a refusal other than "not hot" is not asked again.
    let mut fake = FakeCluster::serving();
    fake.answer = Some(CommandResult::Busy);
    let (mut op, rx) = begin(&mut fake, Op::Switchover);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::WrongRole), "{reply:?}");
    assert!(
        reply.message.contains("the active stays active"),
        "{reply:?}"
    );
    assert_eq!(fake.control().acked_result().0, 1);
}

#[test]
fn switchover_not_taken_times_out_and_is_withdrawn() {
    // Proves the deadline: an active that never takes the command gets a timeout result,
    // and the command is withdrawn so that no later active takes it.
    let mut fake = FakeCluster::serving();
    fake.config.timeouts.switchover_ms = 20;
    fake.deaf = true;
    let (mut op, rx) = begin(&mut fake, Op::Switchover);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Timeout), "{reply:?}");
    assert!(reply.message.contains("20 ms"), "{reply:?}");
    assert_eq!(
        posted_command(&fake),
        None,
        "expected the command withdrawn"
    );
}

#[test]
fn switchover_fails_when_its_target_dies_and_is_withdrawn() {
    // Proves an engine dying mid-operation: the result names the dead engine and the
    // active, and the command is withdrawn.
    let mut fake = FakeCluster::serving();
    fake.deaf = true;
    let (mut op, rx) = begin(&mut fake, Op::Switchover);
    let successor = fake.die(1);
    op.on_death(&mut fake, 1, successor);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Failed), "{reply:?}");
    assert_eq!(
        reply.message,
        "engine b died during the switchover; engine a is active"
    );
    assert_eq!(posted_command(&fake), None);
}

/// The serving fake with feature 0x4 enableable on the standby.
fn enableable() -> FakeCluster {
    let fake = FakeCluster::serving();
    fake.control().set(1, Field::Enableable, 0x4);
    fake
}

#[test]
fn enable_features_turns_them_on_in_both_engines() {
    // Proves the happy path: the standby's enableable mask is posted, and the result comes
    // once both engines report it.
    let mut fake = enableable();
    let (mut op, rx) = begin(&mut fake, Op::EnableFeatures);
    assert_eq!(
        posted_command(&fake),
        Some(ClusterCommand::EnableFeatures { mask: 0x4 })
    );
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    assert_eq!(reply.data["enabled"], 4);
    for slot in [0, 1] {
        assert_eq!(fake.control().get(slot, Field::Features), 0x4);
    }
}

#[test]
fn enable_features_with_nothing_to_enable_posts_nothing() {
    // Proves the mask 0 case: answered at once, nothing posted.
    let mut fake = FakeCluster::serving();
    let (tx, _rx) = mpsc::channel();
    let reply = Operation::begin(&mut fake, Op::EnableFeatures, tx).err();
    assert_eq!(reply.and_then(|r| r.code), Some(Code::Ok));
    assert_eq!(posted_command(&fake), None);
}

#[test]
fn enable_features_refused_by_the_active_is_reported() {
    // Proves the engine refusing: its typed result reaches the operator, nothing enabled.
    let mut fake = enableable();
    fake.answer = Some(CommandResult::NotEnableable);
    let (mut op, rx) = begin(&mut fake, Op::EnableFeatures);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::WrongRole), "{reply:?}");
    assert_eq!(
        reply.message,
        "engine a refused: a feature is not supported by every engine"
    );
    assert_eq!(fake.control().get(0, Field::Features), 0);
}

#[test]
fn enable_features_not_taken_times_out() {
    // Proves the deadline of the same machine for another command.
    let mut fake = enableable();
    fake.config.timeouts.switchover_ms = 20;
    fake.deaf = true;
    let (mut op, rx) = begin(&mut fake, Op::EnableFeatures);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Timeout), "{reply:?}");
    assert_eq!(
        posted_command(&fake),
        None,
        "expected the command withdrawn"
    );
}

#[test]
fn enable_features_fails_when_the_standby_dies() {
    // Proves an engine dying mid-operation fails it, naming the engine.
    let mut fake = enableable();
    fake.deaf = true;
    let (mut op, rx) = begin(&mut fake, Op::EnableFeatures);
    let successor = fake.die(1);
    op.on_death(&mut fake, 1, successor);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Failed), "{reply:?}");
    assert_eq!(reply.message, "engine b died while enabling features");
}

#[test]
fn down_stops_the_standby_before_the_active_then_removes_the_files() {
    // Proves the order of `down` (a stopping active would make its standby step up), the
    // cluster marked down, the files removed, and the loop told to end once the result is
    // written (the watcher gone).
    let mut fake = FakeCluster::serving();
    let (mut op, rx) = begin(&mut fake, Op::Down);
    assert_eq!(
        fake.control().cluster_state(),
        Ok(understudy_control::control::ClusterState::Down)
    );
    assert_eq!(fake.managed, [false; 3]);
    fake.turn();
    assert!(
        fake.engines[1].is_none(),
        "expected the standby stopped first"
    );
    assert!(
        fake.engines[0].is_some(),
        "expected the active still running"
    );
    for _ in 0..TURNS_MAX {
        fake.turn();
        op.step(&mut fake);
        if rx.try_iter().any(|r| r.kind == ReplyKind::Result) {
            break;
        }
        std::thread::sleep(TURN);
    }
    assert!(fake.engines.iter().all(Option::is_none));
    assert!(!fake.dir().exists(), "expected the cluster's files removed");
    drop(rx);
    assert!(matches!(op.step(&mut fake), Stepped::Ended));
    assert!(fake.outcomes.finished);
}

#[test]
fn down_kills_an_engine_that_does_not_stop_in_time() {
    // Proves the shutdown deadline: a standby that ignores STOP is SIGKILLed, and `down`
    // still ends with its result.
    let mut fake = FakeCluster::serving();
    fake.config.timeouts.shutdown_ms = 10;
    fake.stubborn[1] = true;
    let (mut op, rx) = begin(&mut fake, Op::Down);
    let mut result = None;
    for _ in 0..TURNS_MAX {
        fake.turn();
        op.step(&mut fake);
        result = rx.try_iter().find(|r| r.kind == ReplyKind::Result);
        if result.is_some() {
            break;
        }
        std::thread::sleep(TURN);
    }
    assert_eq!(fake.killed, [1]);
    assert_eq!(result.and_then(|r| r.code), Some(Code::Ok));
}

/// An upgrade request to this test binary (an executable file), judged on no traffic.
fn upgrade_to_self() -> UpgradeRequest {
    UpgradeRequest {
        binary: std::env::current_exe().expect("the test binary"),
        accept_for_ms: Some(0),
        ..Default::default()
    }
}

#[test]
fn upgrade_replaces_both_engines_and_keeps_serving() {
    // Proves the upgrade's happy path end to end against the fake: the compatibility check,
    // then every action of the plan; both engines run the new binary, one active and one
    // hot, the record is gone and `rollback` can find the previous binary.
    let mut fake = FakeCluster::serving();
    let request = upgrade_to_self();
    let new = request.binary.clone();
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(request));
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    let active = fake.active().expect("an active");
    let standby = fake.hot_standby().expect("a hot standby");
    for slot in [active, standby] {
        assert_eq!(fake.engines[slot].as_ref().map(|e| &e.binary), Some(&new));
    }
    assert_eq!(
        fake.spawned.first().map(|s| s.0),
        Some(2),
        "the probe first"
    );
    assert!(!fake.dir().join(crate::record::RECORD_FILE).exists());
    assert_eq!(
        fake.outcomes.last_upgrade,
        Some(("/bin/true".into(), new.clone()))
    );
    let events = rx.try_iter().filter(|r| r.kind == ReplyKind::Event).count();
    assert!(events > 8, "expected an event per action, found {events}");
}

#[test]
fn upgrade_whose_switchover_is_refused_ends_with_the_old_version_serving() {
    // Proves the engine refusing during the upgrade: the plan recovers, and the old version
    // is active again with a hot standby.
    let mut fake = FakeCluster::serving();
    fake.answer = Some(CommandResult::Busy);
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(upgrade_to_self()));
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert!(
        matches!(reply.code, Some(Code::Aborted | Code::RolledBack)),
        "{reply:?}"
    );
    let active = fake.active().expect("an active");
    let standby = fake.hot_standby().expect("a hot standby");
    for slot in [active, standby] {
        let binary = fake.engines[slot].as_ref().map(|e| e.binary.clone());
        assert_eq!(binary, Some("/bin/true".into()), "engine {slot}");
    }
    assert_eq!(fake.outcomes.last_upgrade, None);
}

#[test]
fn upgrade_whose_new_version_never_registers_is_aborted_before_any_change() {
    // Proves the compatibility check's timeout: nothing was taken out of service.
    let mut fake = FakeCluster::serving();
    fake.config.timeouts.start_ms = 10;
    fake.config.timeouts.hot_ms = 10;
    fake.config.timeouts.shutdown_ms = 10;
    fake.mute_starts = true;
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(upgrade_to_self()));
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Aborted), "{reply:?}");
    assert!(reply.message.contains("did not register"), "{reply:?}");
    assert!(fake.is_active(0) && fake.is_hot_standby(1));
    assert!(fake.engines[2].is_none(), "expected the probe gone");
}

#[test]
fn upgrade_whose_new_active_dies_rolls_back_to_the_old_version() {
    // Proves an engine dying mid-upgrade: the new active dies during its acceptance soak,
    // the old one steps up, and the plan rolls back to the old version.
    let mut fake = FakeCluster::serving();
    let mut request = upgrade_to_self();
    // A soak long enough to kill the new active in.
    request.accept_for_ms = Some(60_000);
    let new = request.binary.clone();
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(request));
    let mut killed = false;
    for _ in 0..TURNS_MAX {
        fake.turn();
        if !killed && op.describe().contains("acceptance") {
            let new_active = fake
                .active()
                .filter(|&a| fake.engines[a].as_ref().map(|e| &e.binary) == Some(&new));
            if let Some(a) = new_active {
                let successor = fake.die(a);
                op.on_death(&mut fake, a, successor);
                killed = true;
            }
        }
        match op.step(&mut fake) {
            Stepped::Running => std::thread::sleep(TURN),
            Stepped::Finished(result) => {
                let reply = result.reply;
                assert_eq!(reply.code, Some(Code::RolledBack), "{reply:?}");
                assert!(killed);
                let active = fake.active().expect("an active");
                let binary = fake.engines[active].as_ref().map(|e| e.binary.clone());
                assert_eq!(binary, Some("/bin/true".into()));
                assert!(fake.hot_standby().is_some(), "expected a hot standby again");
                drop(rx);
                return;
            }
            Stepped::Ended | Stepped::Became(_) => panic!("expected the upgrade's result"),
        }
    }
    panic!("expected the upgrade to end");
}

#[test]
fn upgrade_aborts_when_an_engine_dies_during_the_compatibility_check() {
    // Proves a death before the plan's first action ends the upgrade with nothing changed.
    let mut fake = FakeCluster::serving();
    fake.mute_starts = true;
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(upgrade_to_self()));
    fake.turn();
    assert!(matches!(op.step(&mut fake), Stepped::Running));
    let successor = fake.die(1);
    op.on_death(&mut fake, 1, successor);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Aborted), "{reply:?}");
    assert!(
        reply
            .message
            .contains("engine b died during the compatibility check"),
        "{reply:?}"
    );
}

#[test]
fn rollback_after_an_upgrade_returns_to_the_previous_binary() {
    // Proves `rollback`: refused with no completed upgrade, then an upgrade back to the
    // previous binary after one.
    let mut fake = FakeCluster::serving();
    let (tx, _rx) = mpsc::channel();
    let refused = Operation::rollback(&mut fake, tx).err();
    assert_eq!(refused.and_then(|r| r.code), Some(Code::WrongRole));
    let (mut op, rx) = begin(&mut fake, Op::Upgrade(upgrade_to_self()));
    assert_eq!(run_to_result(&mut fake, &mut op, &rx).code, Some(Code::Ok));
    let (tx, rx) = mpsc::channel();
    let mut op = match Operation::rollback(&mut fake, tx) {
        Ok(op) => op,
        Err(reply) => panic!("expected the rollback to begin, found {reply:?}"),
    };
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    assert!(reply.message.contains("rollback completed"), "{reply:?}");
    let active = fake.active().expect("an active");
    let binary = fake.engines[active].as_ref().map(|e| e.binary.clone());
    assert_eq!(binary, Some("/bin/true".into()));
}

/// The serving fake after its active died, engine b holding a stale (consistent) copy.
fn outage() -> FakeCluster {
    let mut fake = FakeCluster::serving();
    fake.die(0);
    fake.write(1, Role::Standby, State::Stale);
    fake
}

/// `promote b --accept-loss`.
fn promote_b() -> Op {
    Op::Promote(PromoteRequest {
        slot: "b".into(),
        accept_loss: true,
    })
}

#[test]
fn a_promote_the_engine_never_takes_is_withdrawn_at_its_timeout() {
    // Proves a promote given up on cannot fire later: the engine never takes the command,
    // the result is a timeout that says so, and the slot's command word is empty again.
    let mut fake = outage();
    fake.config.timeouts.switchover_ms = 20;
    fake.ignore_promote = true;
    let (mut op, rx) = begin(&mut fake, promote_b());
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Timeout), "{reply:?}");
    assert!(reply.message.contains("withdrawn"), "{reply:?}");
    assert_eq!(fake.control().slot_command(1), Ok(None), "withdrawn");
    assert!(!fake.is_active(1));
}

#[test]
fn promote_is_polled_and_does_not_block_the_loop() {
    // Proves promote is an operation like the others: it begins by posting the slot command
    // and returns; a turn before the engine acted is still running; once the engine takes
    // the command and claims the epoch, the next turn reports it active.
    let mut fake = outage();
    let (mut op, rx) = begin(&mut fake, promote_b());
    assert_eq!(
        fake.control().slot_command(1),
        Ok(Some(SlotCommand::Promote))
    );
    for _ in 0..3 {
        assert!(matches!(op.step(&mut fake), Stepped::Running));
    }
    assert!(
        op.describe().contains("promote engine b"),
        "{}",
        op.describe()
    );
    assert!(rx.try_recv().is_err(), "no result before the engine acted");
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Ok), "{reply:?}");
    assert!(reply.message.contains("engine b is active"), "{reply:?}");
    assert!(fake.is_active(1));
    assert_eq!(fake.control().epoch(), 3, "b claimed the next epoch");
}

#[test]
fn promote_refused_by_the_engine_reports_its_reason() {
    // Proves the engine's refusal reaches the operator, typed and named, for each reason an
    // engine gives; the engine stays a standby.
    for why in [CommandResult::NoConsistentCopy, CommandResult::ActiveServes] {
        let mut fake = outage();
        fake.promote_refusal = Some(why);
        let (mut op, rx) = begin(&mut fake, promote_b());
        let reply = run_to_result(&mut fake, &mut op, &rx);
        assert_eq!(reply.code, Some(Code::WrongRole), "{reply:?}");
        assert_eq!(reply.message, format!("the engine refused: {why}"));
        assert!(!fake.is_active(1));
    }
}

#[test]
fn promote_fails_when_its_engine_dies() {
    // Proves an engine dying mid-promote: the result names it, the command is withdrawn.
    let mut fake = outage();
    fake.ignore_promote = true;
    let (mut op, rx) = begin(&mut fake, promote_b());
    let successor = fake.die(1);
    op.on_death(&mut fake, 1, successor);
    let reply = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(reply.code, Some(Code::Failed), "{reply:?}");
    assert_eq!(reply.message, "engine b died while being promoted");
    assert_eq!(fake.control().slot_command(1), Ok(None));
}

#[test]
fn promote_serves_from_a_stale_copy_only_with_the_loss_accepted() {
    // Proves `promote`: refused while an active serves, without --accept-loss, while an
    // engine holds the active's lock and for an engine with no consistent copy (nothing
    // posted); done for a stale standby once the loss is accepted.
    let mut fake = FakeCluster::serving();
    let ask = |slot: &str, accept_loss| {
        Op::Promote(PromoteRequest {
            slot: slot.into(),
            accept_loss,
        })
    };
    let refused = |fake: &mut FakeCluster, op: Op| {
        let (tx, _rx) = mpsc::channel();
        match Operation::begin(fake, op, tx) {
            Err(reply) => reply,
            Ok(op) => panic!("expected a refusal, found `{}` begun", op.describe()),
        }
    };
    let reply = refused(&mut fake, ask("b", true));
    assert_eq!(reply.code, Some(Code::WrongRole));
    assert!(reply.message.contains("engine a is active"), "{reply:?}");
    fake.die(0);
    fake.write(1, Role::Standby, State::Stale);
    let reply = refused(&mut fake, ask("b", false));
    assert!(reply.message.contains("--accept-loss"), "{reply:?}");
    fake.lock_holder = Some(1);
    let reply = refused(&mut fake, ask("b", true));
    assert!(
        reply.message.contains("holds the active's lock"),
        "{reply:?}"
    );
    fake.lock_holder = None;
    fake.write(1, Role::Standby, State::Syncing);
    let reply = refused(&mut fake, ask("b", true));
    assert!(reply.message.contains("no consistent copy"), "{reply:?}");
    assert_eq!(fake.control().slot_command(1), Ok(None), "nothing posted");
    fake.write(1, Role::Standby, State::Stale);
    let (mut op, rx) = begin(&mut fake, ask("b", true));
    let done = run_to_result(&mut fake, &mut op, &rx);
    assert_eq!(done.code, Some(Code::Ok), "{done:?}");
    assert!(fake.is_active(1));
}

#[test]
fn an_upgrade_interrupted_before_its_verdict_is_undone_by_the_next_supervisor() {
    // Proves the resume path: an upgrade whose supervisor stopped (the operation dropped)
    // after the switchover leaves its record; the next supervisor's ResumeOp lets the
    // cluster settle, then the resumed plan restores the old version (no acceptance verdict
    // was given), and the interrupted upgrade's outcome is kept for `status`.
    let mut fake = FakeCluster::serving();
    let mut request = upgrade_to_self();
    request.accept_for_ms = Some(60_000);
    let (mut op, _rx) = begin(&mut fake, Op::Upgrade(request));
    for _ in 0..TURNS_MAX {
        fake.turn();
        assert!(matches!(op.step(&mut fake), Stepped::Running));
        if op.describe().contains("acceptance") {
            break;
        }
        std::thread::sleep(TURN);
    }
    assert!(op.describe().contains("acceptance"), "{}", op.describe());
    drop(op);
    let found = crate::record::load(fake.dir(), &fake.config.cluster)
        .expect("a readable record")
        .expect("the upgrade's record");
    let mut op = Operation::Resume(super::ResumeOp::begin(&mut fake, found));
    let reply = match drive(&mut fake, &mut op) {
        End::Finished(reply) => reply,
        End::Ended => panic!("expected the resumed upgrade's result"),
    };
    assert_eq!(reply.code, Some(Code::RolledBack), "{reply:?}");
    let active = fake.active().expect("an active");
    let binary = fake.engines[active].as_ref().map(|e| e.binary.clone());
    assert_eq!(binary, Some("/bin/true".into()));
    assert!(fake.hot_standby().is_some(), "expected a hot standby again");
    let interrupted = fake
        .outcomes
        .interrupted
        .clone()
        .expect("the interrupted upgrade");
    assert_eq!(interrupted.code, Some(Code::RolledBack));
    assert!(!fake.dir().join(crate::record::RECORD_FILE).exists());
}
