//! The upgrade plan's unit tests: every step, a failure injected at each, resumed from each.

use super::*;
use proptest::prelude::*;

const OLD: &str = "/opt/v1/engine";
const NEW: &str = "/opt/v2/engine";

fn spec(keep_standby: bool, no_enable: bool) -> UpgradeSpec {
    UpgradeSpec {
        keep_standby,
        no_enable,
        accept_for_ms: 100,
        ..UpgradeSpec::new(OLD, NEW)
    }
}

fn start(slot: Slot, version: Version) -> Action {
    let binary = PathBuf::from(if version == Version::Old { OLD } else { NEW });
    Action::Start {
        slot,
        version,
        binary,
    }
}

/// The event that reports success of `planned`.
fn success(planned: &Planned) -> Event {
    let id = planned.id;
    match planned.action {
        Action::Accept { .. } => Event::Verdict {
            id,
            verdict: Verdict::Accepted,
        },
        _ => Event::Done { id },
    }
}

/// Asserts the invariants that hold after every event.
fn assert_safe(plan: &UpgradePlan) {
    let cluster = plan.cluster();
    assert!(cluster.active_count() <= 1, "two actives: {cluster:?}");
    let outage = matches!(plan.outcome(), Some(Outcome::Outage { .. }));
    assert_eq!(
        cluster.active_count() == 0,
        outage,
        "{cluster:?} {:?}",
        plan.outcome()
    );
}

/// Asserts what each terminal outcome promises about the cluster.
fn assert_terminal(plan: &UpgradePlan, accepted: bool) {
    assert_safe(plan);
    let cluster = plan.cluster();
    let engines: Vec<_> = cluster.engines().map(|(s, e)| (s, *e)).collect();
    let outcome = plan.outcome().expect("finished");
    if let Some(reason) = outcome.reason() {
        assert!(reason.contains("step "), "reason names no step: {reason}");
    }
    let pair_of = |version| {
        engines.len() == 2
            && engines.iter().all(|(_, e)| e.version == version)
            && engines.iter().any(|(_, e)| e.role == PlannedRole::Active)
            && engines.iter().any(|(_, e)| e.role == PlannedRole::Standby)
    };
    match outcome {
        Outcome::Completed => {
            assert!(pair_of(Version::New), "{engines:?}");
            let enabled = !plan.spec().no_enable;
            assert!(engines.iter().all(|(_, e)| e.features_enabled == enabled));
        }
        Outcome::RolledBack { .. } => assert!(pair_of(Version::Old), "{engines:?}"),
        Outcome::Aborted { .. } => {
            assert!(
                engines
                    .iter()
                    .all(|(_, e)| e.role != PlannedRole::OutOfService),
                "{engines:?}"
            );
            if !accepted {
                assert!(pair_of(Version::Old), "{engines:?}");
            }
        }
        Outcome::RollbackFailed { .. } => assert_eq!(cluster.active_count(), 1),
        Outcome::Outage { .. } => assert_eq!(cluster.active_count(), 0),
    }
}

/// Runs the plan answering every action with success; returns the actions.
fn run_to_end(plan: &mut UpgradePlan, accepted: &mut bool) -> Vec<Planned> {
    let mut actions = Vec::new();
    for _ in 0..100 {
        match plan.next_action() {
            Next::Perform(planned) => {
                if matches!(planned.action, Action::Accept { .. }) {
                    *accepted = true;
                }
                plan.on_event(success(&planned)).unwrap();
                assert_safe(plan);
                actions.push(planned);
            }
            Next::Wait(id) => panic!("{id} should not be in flight"),
            Next::Finished(_) => return actions,
        }
    }
    panic!("plan did not finish within 100 actions");
}

fn happy_actions(spec: UpgradeSpec) -> (UpgradePlan, Vec<Planned>) {
    let mut plan = UpgradePlan::new(spec).unwrap();
    let actions = run_to_end(&mut plan, &mut false);
    assert_eq!(plan.outcome(), Some(&Outcome::Completed));
    (plan, actions)
}

#[test]
fn happy_path_runs_the_eight_steps_in_order() {
    // Proves the default plan's exact action sequence, step numbers and final topology.
    use Slot::*;
    let (plan, planned) = happy_actions(spec(false, false));
    let actions: Vec<_> = planned.iter().map(|p| p.action.clone()).collect();
    assert_eq!(
        actions,
        [
            Action::Stop { slot: B },
            start(B, Version::New),
            Action::Attach {
                standby: B,
                active: A
            },
            Action::Switchover { from: A, to: B },
            Action::Accept {
                active: B,
                accept_for_ms: 100
            },
            Action::Stop { slot: A },
            start(A, Version::New),
            Action::Attach {
                standby: A,
                active: B
            },
            Action::EnableFeatures {
                active: B,
                standby: A
            },
        ]
    );
    let numbers: Vec<_> = planned.iter().map(|p| p.progress.number).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6, 7, 7, 8]);
    assert!(planned
        .iter()
        .all(|p| p.progress.total == 8 && p.progress.recovery.is_none()));
    assert_eq!(
        planned[2].to_string(),
        "step 3/8 (attach the new standby to the old active, wait until hot): \
         attach engine b as standby of a, wait until hot"
    );
    let t = TimeoutsConfig::default();
    let timeouts: Vec<_> = planned.iter().map(|p| p.timeout_ms).collect();
    assert_eq!(
        timeouts,
        [
            t.shutdown_ms,
            t.start_ms,
            t.hot_ms,
            t.switchover_ms,
            100 + t.start_ms,
            t.shutdown_ms,
            t.start_ms,
            t.hot_ms,
            t.switchover_ms
        ]
    );
    let ids: Vec<_> = planned.iter().map(|p| p.id.0).collect();
    assert_eq!(ids, (1..=9).collect::<Vec<_>>());
    assert_eq!(plan.cluster().active(), Some(B));
    assert_eq!(plan.cluster().standbys().collect::<Vec<_>>(), [A]);
    let forward: Vec<_> = plan.forward_actions().map(|(_, a)| a.clone()).collect();
    assert_eq!(forward, actions);
}

#[test]
fn keep_standby_starts_the_third_slot_first_and_rotates_slots() {
    // Proves the keep_standby sequence, that a hot standby exists after every event, and
    // that it ends with two new-version engines in slots c and b.
    use Slot::*;
    let mut plan = UpgradePlan::new(spec(true, false)).unwrap();
    let mut actions = Vec::new();
    while let Next::Perform(planned) = plan.next_action() {
        assert!(
            plan.cluster().standbys().count() >= 1,
            "{:?}",
            plan.cluster()
        );
        plan.on_event(success(&planned)).unwrap();
        assert!(plan.cluster().standbys().count() >= 1, "after {planned}");
        assert!(plan.cluster().engines().count() <= 3);
        actions.push(planned.action);
    }
    assert_eq!(plan.outcome(), Some(&Outcome::Completed));
    assert_eq!(
        actions,
        [
            start(C, Version::New),
            Action::Attach {
                standby: C,
                active: A
            },
            Action::Stop { slot: B },
            Action::Switchover { from: A, to: C },
            Action::Accept {
                active: C,
                accept_for_ms: 100
            },
            start(B, Version::New),
            Action::Attach {
                standby: B,
                active: C
            },
            Action::Stop { slot: A },
            Action::EnableFeatures {
                active: C,
                standby: B
            },
        ]
    );
    assert_eq!(plan.cluster().active(), Some(C));
    assert_eq!(plan.cluster().standbys().collect::<Vec<_>>(), [B]);
    assert!(plan.cluster().engine(A).is_none());
    assert_terminal(&plan, true);
}

#[test]
fn no_enable_skips_step_eight() {
    // Proves no_enable leaves out the feature enable and leaves features off.
    for keep in [false, true] {
        let (plan, planned) = happy_actions(spec(keep, true));
        assert_eq!(planned.len(), 8);
        assert!(planned
            .iter()
            .all(|p| !matches!(p.action, Action::EnableFeatures { .. })));
        assert!(planned.iter().all(|p| p.progress.total == 7));
        assert!(plan.cluster().engines().all(|(_, e)| !e.features_enabled));
        assert_terminal(&plan, true);
    }
}

#[test]
fn rejected_acceptance_switches_back_and_restores_an_old_standby() {
    // Proves the rollback sequence after a rejected verdict, in both modes.
    use Slot::*;
    for (keep, expected) in [
        (
            false,
            vec![
                Action::Switchover { from: B, to: A },
                Action::Stop { slot: B },
                start(B, Version::Old),
                Action::Attach {
                    standby: B,
                    active: A,
                },
            ],
        ),
        (
            true,
            vec![
                Action::Switchover { from: C, to: A },
                start(B, Version::Old),
                Action::Attach {
                    standby: B,
                    active: A,
                },
                Action::Stop { slot: C },
            ],
        ),
    ] {
        let mut plan = UpgradePlan::new(spec(keep, false)).unwrap();
        loop {
            let Next::Perform(planned) = plan.next_action() else {
                panic!("ended early")
            };
            if matches!(planned.action, Action::Accept { .. }) {
                let verdict = Verdict::Rejected {
                    reason: "p99 latency 4000 us > 1000 us".into(),
                };
                plan.on_event(Event::Verdict {
                    id: planned.id,
                    verdict,
                })
                .unwrap();
                break;
            }
            plan.on_event(success(&planned)).unwrap();
        }
        let mut actions = Vec::new();
        while let Next::Perform(planned) = plan.next_action() {
            assert_eq!(planned.progress.recovery, Some(Recovery::Rollback));
            if keep {
                assert!(plan.cluster().standbys().count() >= 1);
            }
            plan.on_event(success(&planned)).unwrap();
            actions.push(planned.action);
        }
        assert_eq!(actions, expected, "keep_standby={keep}");
        let reason = plan.outcome().and_then(Outcome::reason).unwrap();
        assert!(matches!(plan.outcome(), Some(Outcome::RolledBack { .. })));
        assert!(
            reason.starts_with("step 5 (acceptance check): not acceptable: p99"),
            "{reason}"
        );
        assert_eq!(plan.cluster().active(), Some(A));
        assert_terminal(&plan, false);
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Fails,
    TimesOut,
    NewDies,
    OldDies,
}

/// Kills an engine of `version` (the active if it runs that version, else a standby,
/// else the one being started); returns the event, or None if none runs that version.
fn death(plan: &UpgradePlan, in_flight: &Planned, version: Version) -> Option<Event> {
    let cluster = plan.cluster();
    let active = cluster.active().unwrap();
    let slot = if cluster.version(active) == Some(version) {
        active
    } else if let Some((slot, _)) = cluster
        .engines()
        .find(|(s, e)| e.version == version && in_flight.action.involves(*s))
        .or_else(|| cluster.engines().find(|(_, e)| e.version == version))
    {
        slot
    } else if let Action::Start {
        slot, version: v, ..
    } = in_flight.action
    {
        if v != version {
            return None;
        }
        slot
    } else {
        return None;
    };
    let successor = if slot == active {
        // Prefer the switchover target, as the runtime would hand over to it.
        match in_flight.action {
            Action::Switchover { to, .. }
                if cluster.engine(to).unwrap().role == PlannedRole::Standby =>
            {
                Some(to)
            }
            _ => cluster.standbys().next(),
        }
    } else {
        Some(active)
    };
    Some(Event::EngineDied {
        slot,
        active: successor,
    })
}

#[test]
fn a_fault_at_every_step_ends_safe_and_names_the_step() {
    // Proves that each fault kind injected at each forward action ends the plan in a
    // terminal state that is safe for that outcome, with a reason naming the step, and
    // that with keep_standby action faults never leave the cluster without a hot standby.
    for keep in [false, true] {
        for no_enable in [false, true] {
            let length = happy_actions(spec(keep, no_enable)).1.len();
            for index in 0..length {
                for fault in [
                    Fault::Fails,
                    Fault::TimesOut,
                    Fault::NewDies,
                    Fault::OldDies,
                ] {
                    let label =
                        format!("keep={keep} no_enable={no_enable} action {index} {fault:?}");
                    let mut plan = UpgradePlan::new(spec(keep, no_enable)).unwrap();
                    let mut accepted = false;
                    for _ in 0..index {
                        let Next::Perform(planned) = plan.next_action() else {
                            panic!()
                        };
                        accepted |= matches!(planned.action, Action::Accept { .. });
                        plan.on_event(success(&planned)).unwrap();
                    }
                    let Next::Perform(planned) = plan.next_action() else {
                        panic!()
                    };
                    let step = planned.progress;
                    let id = planned.id;
                    let had_hot_standby = plan.cluster().standbys().count() > 0;
                    let event = match fault {
                        Fault::Fails => Event::Failed {
                            id,
                            error: "injected".into(),
                        },
                        Fault::TimesOut => Event::TimedOut { id },
                        Fault::NewDies => match death(&plan, &planned, Version::New) {
                            Some(event) => event,
                            None => continue,
                        },
                        Fault::OldDies => match death(&plan, &planned, Version::Old) {
                            Some(event) => event,
                            None => continue,
                        },
                    };
                    let killed_active = matches!(event, Event::EngineDied { slot, .. }
                        if Some(slot) == plan.cluster().active());
                    plan.on_event(event.clone())
                        .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_safe(&plan);
                    let check_hot = keep && matches!(fault, Fault::Fails | Fault::TimesOut);
                    // Finish the run with every action succeeding.
                    for _ in 0..50 {
                        match plan.next_action() {
                            Next::Perform(next) => {
                                accepted |= matches!(next.action, Action::Accept { .. });
                                plan.on_event(success(&next)).unwrap();
                                assert_safe(&plan);
                            }
                            Next::Wait(_) => {
                                // The faulty action is still in flight (death of a bystander).
                                plan.on_event(success(&planned)).unwrap();
                            }
                            Next::Finished(_) => break,
                        }
                        if check_hot {
                            assert!(
                                plan.cluster().standbys().count() >= 1,
                                "{label}: {:?}",
                                plan.cluster()
                            );
                        }
                    }
                    let outcome = plan
                        .outcome()
                        .unwrap_or_else(|| panic!("{label}: not finished"))
                        .clone();
                    assert_terminal(&plan, accepted);
                    match &outcome {
                        Outcome::Completed => assert_eq!(fault, Fault::OldDies, "{label}"),
                        Outcome::Outage { .. } => {
                            assert!(killed_active && !had_hot_standby, "{label}: {outcome}")
                        }
                        other => {
                            let named = format!("step {} ({})", step.number, step.step.name());
                            let reason = other.reason().unwrap();
                            assert!(reason.contains(&named), "{label}: {reason}");
                        }
                    }
                    if matches!(fault, Fault::Fails | Fault::TimesOut) {
                        let expected = if step.step == Step::Acceptance {
                            "RolledBack"
                        } else {
                            "Aborted"
                        };
                        assert!(
                            format!("{outcome:?}").starts_with(expected),
                            "{label}: {outcome:?}"
                        );
                        if !accepted {
                            assert_eq!(
                                plan.cluster().version(plan.cluster().active().unwrap()),
                                Some(Version::Old)
                            );
                        }
                    }
                    if fault == Fault::NewDies
                        && !matches!(outcome, Outcome::Outage { .. })
                        && !accepted
                    {
                        assert!(
                            matches!(
                                outcome,
                                Outcome::Aborted { .. } | Outcome::RolledBack { .. }
                            ),
                            "{label}: {outcome}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn events_that_do_not_fit_are_rejected_without_effect() {
    // Proves stale ids, wrong report kinds and impossible deaths are refused and leave
    // the plan where it was.
    let mut plan = UpgradePlan::new(spec(false, false)).unwrap();
    let Next::Perform(first) = plan.next_action() else {
        panic!()
    };
    assert_eq!(plan.next_action(), Next::Wait(first.id));
    let before = plan.cluster().clone();
    let stale = ActionId(first.id.0 + 7);
    assert_eq!(
        plan.on_event(Event::Done { id: stale }),
        Err(EventError::NotInFlight {
            id: stale,
            in_flight: Some(first.id)
        })
    );
    assert!(matches!(
        plan.on_event(Event::Verdict {
            id: first.id,
            verdict: Verdict::Accepted
        }),
        Err(EventError::WrongReport { .. })
    ));
    assert_eq!(
        plan.on_event(Event::EngineDied {
            slot: Slot::C,
            active: Some(Slot::A)
        }),
        Err(EventError::NoEngine { slot: Slot::C })
    );
    assert!(matches!(
        plan.on_event(Event::EngineDied {
            slot: Slot::A,
            active: Some(Slot::C)
        }),
        Err(EventError::BadSuccessor { .. })
    ));
    assert!(matches!(
        plan.on_event(Event::EngineDied {
            slot: Slot::B,
            active: Some(Slot::B)
        }),
        Err(EventError::BadSuccessor { .. })
    ));
    assert_eq!(plan.cluster(), &before);
    assert_eq!(plan.next_action(), Next::Wait(first.id));
    plan.on_event(Event::Done { id: first.id }).unwrap();
    assert_eq!(
        UpgradePlan::new(UpgradeSpec {
            standby: Slot::A,
            ..spec(false, false)
        })
        .unwrap_err(),
        PlanError::SameSlot { slot: Slot::A }
    );
}

#[test]
fn active_death_without_standby_is_an_outage() {
    // Proves the plan stops at once, reporting an outage, when the active dies while the
    // standby is out of service.
    let mut plan = UpgradePlan::new(spec(false, false)).unwrap();
    let Next::Perform(stop) = plan.next_action() else {
        panic!()
    };
    plan.on_event(success(&stop)).unwrap();
    let Next::Perform(_start) = plan.next_action() else {
        panic!()
    };
    plan.on_event(Event::EngineDied {
        slot: Slot::A,
        active: None,
    })
    .unwrap();
    let Some(Outcome::Outage { reason }) = plan.outcome() else {
        panic!("{:?}", plan.outcome())
    };
    assert!(reason.starts_with("step 2 ("), "{reason}");
    assert!(
        reason.contains("engine a (old version, active) died"),
        "{reason}"
    );
    assert_eq!(
        plan.on_event(Event::Done { id: ActionId(2) }),
        Err(EventError::Finished)
    );
}

/// Every checkpoint of a fault-free run, each with the action handed out, the cluster
/// before that action and the cluster after it: a supervisor may die before or after the
/// action in flight took effect.
fn checkpoints(spec: UpgradeSpec) -> Vec<(Checkpoint, Planned, Cluster, Cluster)> {
    let mut plan = UpgradePlan::new(spec).unwrap();
    let mut out = Vec::new();
    while let Next::Perform(planned) = plan.next_action() {
        let before = plan.cluster().clone();
        let checkpoint = plan.checkpoint();
        assert_eq!(checkpoint.in_flight.as_ref(), Some(&planned.action));
        plan.on_event(success(&planned)).unwrap();
        out.push((checkpoint, planned, before, plan.cluster().clone()));
    }
    out
}

const RESTARTED: &str = "the supervisor restarted";

#[test]
fn a_resumed_plan_never_goes_forward_and_ends_safe_at_every_action() {
    // Proves the restart policy at every action of every plan shape, whether the action in
    // flight took effect or not: the resumed plan never accepts, enables or switches to
    // the new version; before the acceptance verdict it restores the old version (aborted
    // before the switchover, rolled back after it), after the verdict it keeps the new
    // version; the reason names the step and the restart.
    for keep in [false, true] {
        for no_enable in [false, true] {
            for (checkpoint, planned, before, after) in checkpoints(spec(keep, no_enable)) {
                for (when, cluster) in [("before", before), ("after", after)] {
                    let label = format!(
                        "keep={keep} no_enable={no_enable} {planned} ({when} it took effect)"
                    );
                    let switched = checkpoint.switched
                        || cluster.version(cluster.active().unwrap()) == Some(Version::New);
                    let mut plan =
                        UpgradePlan::resume(spec(keep, no_enable), &checkpoint, cluster, RESTARTED)
                            .unwrap_or_else(|e| panic!("{label}: {e}"));
                    assert_safe(&plan);
                    let actions = run_to_end(&mut plan, &mut false);
                    for a in &actions {
                        assert!(
                            !matches!(
                                a.action,
                                Action::Accept { .. }
                                    | Action::EnableFeatures { .. }
                                    | Action::Start {
                                        version: Version::New,
                                        ..
                                    }
                            ),
                            "{label}: went forward with {a}"
                        );
                        assert!(a.progress.recovery.is_some(), "{label}: {a}");
                    }
                    assert_terminal(&plan, checkpoint.accepted);
                    let outcome = plan.outcome().unwrap();
                    let reason = outcome.reason().unwrap_or_else(|| panic!("{label}"));
                    let step = format!("step {} ", planned.progress.number);
                    assert!(
                        reason.contains(&step) && reason.contains(RESTARTED),
                        "{label}: {reason}"
                    );
                    let active = plan.cluster().active().unwrap();
                    let version = plan.cluster().version(active).unwrap();
                    let kind = format!("{outcome:?}");
                    if checkpoint.accepted {
                        assert_eq!(version, Version::New, "{label}: {outcome}");
                        assert!(kind.starts_with("Aborted"), "{label}: {outcome}");
                    } else {
                        assert_eq!(version, Version::Old, "{label}: {outcome}");
                        let expected = if switched { "RolledBack" } else { "Aborted" };
                        assert!(kind.starts_with(expected), "{label}: {outcome}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_plan_resumed_while_recovering_goes_on_with_the_same_recovery() {
    // Proves a checkpoint taken during a rollback resumes that rollback, with its reason.
    let mut plan = UpgradePlan::new(spec(false, false)).unwrap();
    let verdict = loop {
        let Next::Perform(planned) = plan.next_action() else {
            panic!()
        };
        if matches!(planned.action, Action::Accept { .. }) {
            break planned;
        }
        plan.on_event(success(&planned)).unwrap();
    };
    plan.on_event(Event::Verdict {
        id: verdict.id,
        verdict: Verdict::Rejected {
            reason: "error rate".into(),
        },
    })
    .unwrap();
    let Next::Perform(back) = plan.next_action() else {
        panic!()
    };
    let checkpoint = plan.checkpoint();
    assert_eq!(checkpoint.recovery, Some(Recovery::Rollback));
    let mut resumed = UpgradePlan::resume(
        spec(false, false),
        &checkpoint,
        plan.cluster().clone(),
        RESTARTED,
    )
    .unwrap();
    let Next::Perform(again) = resumed.next_action() else {
        panic!()
    };
    assert_eq!(
        (&again.action, again.progress),
        (&back.action, back.progress)
    );
    resumed.on_event(success(&again)).unwrap();
    run_to_end(&mut resumed, &mut false);
    let reason = resumed.outcome().unwrap().reason().unwrap();
    assert!(
        matches!(resumed.outcome(), Some(Outcome::RolledBack { .. }))
            && reason.contains("error rate"),
        "{reason}"
    );
}

#[test]
fn a_resume_that_does_not_fit_is_refused_and_one_without_active_is_an_outage() {
    // Proves resume refuses a checkpoint of another plan shape, an impossible start count,
    // a recovery without reason and two actives, and ends at once with no active.
    let (checkpoint, _, before, _) = checkpoints(spec(false, false)).pop().unwrap();
    assert_eq!(checkpoint.step, Step::EnableFeatures);
    let resume = |spec, checkpoint: &Checkpoint, cluster| {
        UpgradePlan::resume(spec, checkpoint, cluster, RESTARTED)
    };
    assert_eq!(
        resume(spec(false, true), &checkpoint, before.clone()).unwrap_err(),
        PlanError::StepNotInPlan {
            step: Step::EnableFeatures
        }
    );
    let too_many = Checkpoint {
        recovery_starts: RECOVERY_STARTS_MAX + 1,
        ..checkpoint.clone()
    };
    assert!(resume(spec(false, false), &too_many, before.clone())
        .unwrap_err()
        .to_string()
        .contains("expected at most 2 recovery starts, found 3"));
    let no_reason = Checkpoint {
        recovery: Some(Recovery::Abort),
        ..checkpoint.clone()
    };
    assert_eq!(
        resume(spec(false, false), &no_reason, before).unwrap_err(),
        PlanError::RecoveryWithoutReason
    );
    let two = Cluster::new([
        (
            Slot::A,
            PlannedEngine::new(Version::Old, PlannedRole::Active),
        ),
        (
            Slot::B,
            PlannedEngine::new(Version::New, PlannedRole::Active),
        ),
    ]);
    assert!(resume(spec(false, false), &checkpoint, two)
        .unwrap_err()
        .to_string()
        .contains("found engines a and b active"));
    let none = Cluster::new([(
        Slot::A,
        PlannedEngine::new(Version::New, PlannedRole::Standby),
    )]);
    let mut plan = resume(spec(false, false), &checkpoint, none).unwrap();
    assert!(
        matches!(plan.next_action(), Next::Finished(Outcome::Outage { ref reason }) if reason.contains(RESTARTED)),
        "{:?}",
        plan.outcome()
    );
}

#[test]
fn failed_rollback_ends_in_rollback_failed() {
    // Proves a failing recovery action ends the plan with both reasons.
    let mut plan = UpgradePlan::new(spec(false, false)).unwrap();
    loop {
        let Next::Perform(planned) = plan.next_action() else {
            panic!()
        };
        if matches!(planned.action, Action::Accept { .. }) {
            plan.on_event(Event::TimedOut { id: planned.id }).unwrap();
            break;
        }
        plan.on_event(success(&planned)).unwrap();
    }
    let Next::Perform(switch_back) = plan.next_action() else {
        panic!()
    };
    assert_eq!(
        switch_back.action,
        Action::Switchover {
            from: Slot::B,
            to: Slot::A
        }
    );
    plan.on_event(Event::Failed {
        id: switch_back.id,
        error: "engine a refused".into(),
    })
    .unwrap();
    let Some(Outcome::RollbackFailed { reason }) = plan.outcome() else {
        panic!()
    };
    assert!(
        reason.contains(
            "rollback failed: switch over from engine b to engine a failed: engine a refused"
        ),
        "{reason}"
    );
    assert!(reason.contains("step 5 (acceptance check)"), "{reason}");
    assert_eq!(plan.cluster().active(), Some(Slot::B));
}

/// One scripted reaction to the plan's current action: `kind` picks success, failure,
/// timeout, rejection or a death; `pick` chooses among victims and successors.
fn react(plan: &UpgradePlan, in_flight: Option<&Planned>, kind: u8, pick: u8) -> Option<Event> {
    let cluster = plan.cluster();
    match (kind % 10, in_flight) {
        (0..=5, Some(planned)) => Some(success(planned)),
        (6, Some(planned)) => Some(Event::Failed {
            id: planned.id,
            error: "random".into(),
        }),
        (7, Some(planned)) => Some(Event::TimedOut { id: planned.id }),
        (8, Some(planned)) if matches!(planned.action, Action::Accept { .. }) => {
            Some(Event::Verdict {
                id: planned.id,
                verdict: Verdict::Rejected {
                    reason: "random".into(),
                },
            })
        }
        (8, Some(planned)) => Some(success(planned)),
        (_, _) => {
            let mut victims: Vec<Slot> = cluster.engines().map(|(s, _)| s).collect();
            if let Some(Action::Start { slot, .. }) = in_flight.map(|p| &p.action) {
                victims.push(*slot);
            }
            let slot = victims[pick as usize % victims.len()];
            let active = cluster.active().unwrap();
            let successor = if slot == active {
                let standbys: Vec<_> = cluster.standbys().collect();
                // Mostly a standby steps up; sometimes it fails to.
                if standbys.is_empty() || pick % 7 == 6 {
                    None
                } else {
                    Some(standbys[pick as usize / 3 % standbys.len()])
                }
            } else {
                Some(active)
            };
            Some(Event::EngineDied {
                slot,
                active: successor,
            })
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_event_sequences_keep_the_invariants(
        keep in any::<bool>(),
        no_enable in any::<bool>(),
        script in proptest::collection::vec((any::<u8>(), any::<u8>()), 0..40),
    ) {
        // Proves that whatever the supervisor reports (successes, failures, timeouts,
        // rejections, deaths of any engine with any valid successor) the plan accepts
        // it, never models two actives, keeps one active except in a reported outage,
        // finishes, and ends in a state its outcome promises.
        let mut plan = UpgradePlan::new(spec(keep, no_enable)).unwrap();
        let mut accepted = false;
        let mut deaths = false;
        let mut reactions = script.into_iter().chain(std::iter::repeat((0, 0)));
        let mut current: Option<Planned> = None;
        for _ in 0..200 {
            match plan.next_action() {
                Next::Finished(_) => break,
                Next::Perform(planned) => current = Some(planned),
                // A death of a bystander leaves the action in flight.
                Next::Wait(id) => prop_assert_eq!(Some(id), current.as_ref().map(|p| p.id)),
            }
            let (kind, pick) = reactions.next().unwrap();
            let event = react(&plan, current.as_ref(), kind, pick).unwrap();
            if let Event::Verdict { verdict: Verdict::Accepted, .. } = event {
                accepted = true;
            }
            deaths |= matches!(event, Event::EngineDied { .. });
            plan.on_event(event.clone()).unwrap();
            assert_safe(&plan);
            if keep && !deaths && plan.outcome().is_none() {
                prop_assert!(plan.cluster().standbys().count() >= 1, "{:?}", plan.cluster());
            }
        }
        prop_assert!(plan.outcome().is_some(), "plan did not finish: {:?}", plan);
        assert_terminal(&plan, accepted);
    }
}
