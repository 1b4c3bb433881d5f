//! The standby's role decisions as pure functions of what it observed: when the active is
//! dead, when to step up, when to re-attach, when to give up, when to fence a hung active.
//!
//! The engine gathers the observations (the robust mutex's word and holder, the control
//! block's epoch and heartbeat words, the active's identity, its own stream state) and acts on
//! the answer; nothing here reads shared memory, `/proc` or a clock, so every combination is
//! unit-tested and the invariants are property-tested:
//!
//! - never step up while a live engine thread holds the mutex;
//! - never step up without the committed state: either hot on a stream still open and
//!   drained cleanly, or still holding exactly the state we handed over in a planned
//!   switchover whose target served nothing;
//! - a newer epoch always re-attaches (someone else is active);
//! - a hung active is fenced only when its heartbeat word is old, the stream has been silent
//!   as long, and the mutex's live holder is that very process.
//!
//! Reading who holds the mutex costs `/proc` reads, so the holder is passed lazily
//! (`impl FnOnce() -> Option<u32>`) and read only when the decision needs it.

use std::time::Duration;

/// The standby's stream state once the dead active's committed batches are drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct AfterDrain {
    /// Every committed batch validated and applied (`Drained::Clean`).
    pub(super) drained_cleanly: bool,
    /// We handed the active role to this active in a planned switchover, it served nothing,
    /// the epoch is unchanged and our store is still the state we handed over.
    pub(super) took_nothing_since_handover: bool,
    /// Our store was hot (caught up with live traffic) when the active died.
    pub(super) hot: bool,
    /// The active closed our stream (we may hold a partial state).
    pub(super) stream_closed: bool,
}

/// What a standby does once its active is known dead and the stream drained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OnActiveDead {
    /// Take the role: our store is the committed state.
    StepUp(StepUpBecause),
    /// Attach to whoever is active next: our store is not the committed state.
    Reattach(NoStepUpBecause),
}

/// Why the standby steps up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum StepUpBecause {
    /// The switchover target we handed over to died before serving anything: our store is
    /// still the cluster's state, hot or not.
    TakeBackHandover,
    /// We were hot on an open stream and drained every committed batch.
    Hot,
}

/// Why the standby does not step up after the active's death.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NoStepUpBecause {
    /// A drained frame failed validation or did not apply.
    DrainBroken,
    /// Still catching up, or the stream was closed: a partial state.
    NotHot,
}

/// After the active died (owner-died mutex or identity backstop) and the drain finished.
pub(super) fn on_active_dead(obs: AfterDrain) -> OnActiveDead {
    if !obs.drained_cleanly {
        return OnActiveDead::Reattach(NoStepUpBecause::DrainBroken);
    }
    if obs.took_nothing_since_handover {
        return OnActiveDead::StepUp(StepUpBecause::TakeBackHandover);
    }
    if !obs.hot || obs.stream_closed {
        return OnActiveDead::Reattach(NoStepUpBecause::NotHot);
    }
    OnActiveDead::StepUp(StepUpBecause::Hot)
}

/// What the standby sees at its periodic liveness check (the backstop to the mutex's
/// owner-died bit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LivenessCheck {
    /// The control block's epoch now.
    pub(super) epoch_now: u64,
    /// The epoch we follow (or, after handing over, the one the target should claim).
    pub(super) epoch_ours: u64,
    /// The active's process identity (pid and start time from its slot) is alive.
    pub(super) active_alive: bool,
    /// The active's pid as its slot's words name it.
    pub(super) active_pid: u32,
    /// Our store is hot.
    pub(super) hot: bool,
    /// Age of the active's heartbeat word.
    pub(super) heartbeat_age_ns: u64,
    /// Time since the stream last delivered a batch (live actives send heartbeat frames).
    pub(super) stream_silence_ns: u64,
    /// The hung threshold (`Options::hung_after`).
    pub(super) hung_after_ns: u64,
}

/// The liveness check's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OnLivenessCheck {
    /// Attach to whoever is active: a newer epoch (someone else is active), or an older one
    /// whose claimant is gone (a handover's target died before claiming).
    Reattach,
    /// We handed over and the target, alive, has not claimed the epoch yet: wait.
    WaitForClaim,
    /// The slot's identity words say the active is gone, but a live engine thread holds the
    /// mutex: the words are wrong, never step up on them.
    LiveHolder {
        /// The process holding the mutex.
        pid: u32,
    },
    /// The active is gone and no live thread holds the mutex: drain, then [`on_active_dead`].
    ActiveDead,
    /// The active is alive but hung (heartbeat old, stream silent, and the mutex's live
    /// holder is that process): fence it (SIGKILL) and keep following.
    FenceHung,
    /// The active is alive and well.
    Healthy,
}

/// The periodic liveness check. `holder` is the live process holding the mutex, read only
/// when needed.
pub(super) fn on_liveness_check(
    obs: LivenessCheck,
    holder: impl FnOnce() -> Option<u32>,
) -> OnLivenessCheck {
    if obs.epoch_now > obs.epoch_ours || (obs.epoch_now < obs.epoch_ours && !obs.active_alive) {
        return OnLivenessCheck::Reattach;
    }
    if obs.epoch_now < obs.epoch_ours {
        return OnLivenessCheck::WaitForClaim;
    }
    if !obs.active_alive {
        // Second source: the mutex. A live engine thread still holding it is the active,
        // whatever the slot's pid and start-time words say (a corrupted word must never make
        // two actives). A dead holder the kernel did not mark is recovered by the step-up.
        return match holder() {
            Some(pid) => OnLivenessCheck::LiveHolder { pid },
            None => OnLivenessCheck::ActiveDead,
        };
    }
    // Hung: its heartbeat word is old AND the stream has been silent as long, AND the thread
    // holding the mutex is that process's. One stale or flipped word never fences a healthy
    // active.
    if obs.hot
        && obs.heartbeat_age_ns > obs.hung_after_ns
        && obs.stream_silence_ns > obs.hung_after_ns
        && holder() == Some(obs.active_pid)
    {
        return OnLivenessCheck::FenceHung;
    }
    OnLivenessCheck::Healthy
}

/// A planned step-up waits this long before keeping its heartbeat fresh and watching for a
/// hung old active (the old active releases the mutex right after the step-up frame).
pub(super) const PLANNED_GRACE: Duration = Duration::from_millis(1);

/// An unplanned step-up gives up after the mutex stayed held by a live thread this long.
pub(super) const UNPLANNED_LIVE_HOLDER_LIMIT: Duration = Duration::from_millis(500);

/// A step-up found the mutex held (`WouldBlock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LockBusy {
    /// A planned switchover (the old active releases the mutex after the step-up frame).
    pub(super) planned: bool,
    /// Time since the step-up began.
    pub(super) elapsed: Duration,
    /// The control block's epoch now.
    pub(super) epoch_now: u64,
    /// The epoch we mean to claim from.
    pub(super) epoch_ours: u64,
    /// The hung threshold (`Options::hung_after`).
    pub(super) hung_after: Duration,
}

/// What a step-up does while the mutex is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OnLockBusy {
    /// Another engine claimed the epoch first: give up.
    EpochTaken,
    /// Unplanned, and a live thread kept the mutex: another engine holds the active role.
    LiveHolder,
    /// Keep trying.
    Wait {
        /// Refresh our heartbeat word (a planned step-up waiting on the old active).
        heartbeat: bool,
        /// Check whether the old active is hung, and fence it if so.
        check_hung: bool,
    },
}

/// A step-up's decision while the mutex is held. After a crash the mutex is owner-died at
/// once (or recovered once its holder thread is provably gone), so a mutex that stays held by
/// a live thread means a live engine holds it: never step up then. A planned switchover
/// waits (the old active may be descheduled between the step-up frame and its unlock) while
/// nobody else claims the epoch; a hung old active is fenced.
pub(super) fn on_lock_busy(obs: LockBusy) -> OnLockBusy {
    if obs.epoch_now != obs.epoch_ours {
        return OnLockBusy::EpochTaken;
    }
    if !obs.planned && obs.elapsed > UNPLANNED_LIVE_HOLDER_LIMIT {
        return OnLockBusy::LiveHolder;
    }
    let heartbeat = obs.planned && obs.elapsed > PLANNED_GRACE;
    OnLockBusy::Wait {
        heartbeat,
        check_hung: heartbeat && obs.elapsed > obs.hung_after,
    }
}

/// A planned step-up's check of the old active still holding the mutex: fence it only if its
/// heartbeat word is older than the hung threshold, its slot's process is alive, and the
/// mutex's live holder is that process. `slot_alive` and `holder` read `/proc`: each is read
/// only when the checks before it hold (this runs on every spin of a waiting step-up).
pub(super) fn should_fence_hung_holder(
    heartbeat_age_ns: u64,
    hung_after_ns: u64,
    slot_alive: impl FnOnce() -> bool,
    active_pid: u32,
    holder: impl FnOnce() -> Option<u32>,
) -> bool {
    heartbeat_age_ns > hung_after_ns && slot_alive() && holder() == Some(active_pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const B: [bool; 2] = [false, true];

    #[test]
    fn on_active_dead_over_every_combination() {
        for drained_cleanly in B {
            for took_nothing_since_handover in B {
                for hot in B {
                    for stream_closed in B {
                        let obs = AfterDrain {
                            drained_cleanly,
                            took_nothing_since_handover,
                            hot,
                            stream_closed,
                        };
                        let want = if !drained_cleanly {
                            OnActiveDead::Reattach(NoStepUpBecause::DrainBroken)
                        } else if took_nothing_since_handover {
                            OnActiveDead::StepUp(StepUpBecause::TakeBackHandover)
                        } else if hot && !stream_closed {
                            OnActiveDead::StepUp(StepUpBecause::Hot)
                        } else {
                            OnActiveDead::Reattach(NoStepUpBecause::NotHot)
                        };
                        assert_eq!(on_active_dead(obs), want, "{obs:?}");
                    }
                }
            }
        }
    }

    fn check(
        epoch_now: u64,
        active_alive: bool,
        hot: bool,
        age: u64,
        silence: u64,
    ) -> LivenessCheck {
        LivenessCheck {
            epoch_now,
            epoch_ours: 5,
            active_alive,
            active_pid: 100,
            hot,
            heartbeat_age_ns: age,
            stream_silence_ns: silence,
            hung_after_ns: 1_000,
        }
    }

    #[test]
    fn on_liveness_check_over_every_combination() {
        use OnLivenessCheck::*;
        let holders = [None, Some(100), Some(200)];
        for epoch_now in [4, 5, 6] {
            for alive in B {
                for hot in B {
                    for age in [0, 1_000, 1_001] {
                        for silence in [0, 1_000, 1_001] {
                            for holder in holders {
                                let obs = check(epoch_now, alive, hot, age, silence);
                                let got = on_liveness_check(obs, || holder);
                                let want = match (epoch_now, alive) {
                                    (6, _) | (4, false) => Reattach,
                                    (4, true) => WaitForClaim,
                                    (_, false) => match holder {
                                        Some(pid) => LiveHolder { pid },
                                        None => ActiveDead,
                                    },
                                    (_, true)
                                        if hot
                                            && age > 1_000
                                            && silence > 1_000
                                            && holder == Some(100) =>
                                    {
                                        FenceHung
                                    }
                                    _ => Healthy,
                                };
                                assert_eq!(got, want, "{obs:?} holder {holder:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_holder_is_read_only_when_the_decision_needs_it() {
        // Epoch moved or handover pending: no /proc read.
        for (epoch_now, alive) in [(6, true), (6, false), (4, true), (4, false)] {
            let obs = check(epoch_now, alive, true, 2_000, 2_000);
            on_liveness_check(obs, || panic!("holder read for {obs:?}"));
        }
        // Alive and not suspected of hanging: no /proc read.
        for (hot, age, silence) in [(false, 2_000, 2_000), (true, 0, 2_000), (true, 2_000, 0)] {
            let obs = check(5, true, hot, age, silence);
            assert_eq!(
                on_liveness_check(obs, || panic!("holder read for {obs:?}")),
                OnLivenessCheck::Healthy
            );
        }
        assert!(!should_fence_hung_holder(
            0,
            1_000,
            || panic!("read"),
            100,
            || panic!("read")
        ));
        assert!(!should_fence_hung_holder(
            2_000,
            1_000,
            || false,
            100,
            || panic!("read")
        ));
    }

    #[test]
    fn on_lock_busy_over_every_combination() {
        let hung_after = Duration::from_millis(100);
        let times = [0, 1, 2, 99, 100, 101, 500, 501].map(Duration::from_millis);
        for planned in B {
            for epoch_now in [4, 5, 6] {
                for elapsed in times {
                    let obs = LockBusy {
                        planned,
                        elapsed,
                        epoch_now,
                        epoch_ours: 5,
                        hung_after,
                    };
                    let want = if epoch_now != 5 {
                        OnLockBusy::EpochTaken
                    } else if !planned && elapsed > Duration::from_millis(500) {
                        OnLockBusy::LiveHolder
                    } else {
                        OnLockBusy::Wait {
                            heartbeat: planned && elapsed > Duration::from_millis(1),
                            check_hung: planned && elapsed > hung_after,
                        }
                    };
                    assert_eq!(on_lock_busy(obs), want, "{obs:?}");
                }
            }
        }
    }

    #[test]
    fn fence_hung_holder_over_every_combination() {
        for age in [0, 1_000, 1_001] {
            for alive in B {
                for holder in [None, Some(100), Some(200)] {
                    let want = age > 1_000 && alive && holder == Some(100);
                    let got = should_fence_hung_holder(age, 1_000, || alive, 100, || holder);
                    assert_eq!(got, want, "age {age} alive {alive} holder {holder:?}");
                }
            }
        }
    }

    /// Everything one follow loop may observe about a dead or living active, as plain values.
    #[derive(Clone, Copy, Debug)]
    struct Observations {
        owner_died: bool,
        check: LivenessCheck,
        live_holder: Option<u32>,
        after: AfterDrain,
    }

    /// What `follow` decides, composed from the same functions the engine calls: the
    /// owner-died fast path, else the liveness backstop, then the decision after the drain.
    enum Outcome {
        StepUp,
        Reattach,
        /// Keep following (wait, fence a hung active, or healthy).
        KeepFollowing,
    }

    fn follow(obs: Observations) -> Outcome {
        let dead = if obs.owner_died {
            true
        } else {
            match on_liveness_check(obs.check, || obs.live_holder) {
                OnLivenessCheck::ActiveDead => true,
                OnLivenessCheck::Reattach => return Outcome::Reattach,
                _ => return Outcome::KeepFollowing,
            }
        };
        assert!(dead);
        match on_active_dead(obs.after) {
            OnActiveDead::StepUp(_) => Outcome::StepUp,
            OnActiveDead::Reattach(_) => Outcome::Reattach,
        }
    }

    fn observations() -> impl Strategy<Value = Observations> {
        (
            (
                any::<bool>(),
                0u64..4,
                0u64..4,
                any::<bool>(),
                any::<bool>(),
            ),
            (
                0u64..3_000,
                0u64..3_000,
                prop::option::of(prop_oneof![Just(100u32), Just(200u32)]),
            ),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                |(
                    (owner_died, epoch_now, epoch_ours, active_alive, hot),
                    (age, silence, live_holder),
                    (drained_cleanly, took_nothing_since_handover, hot_after, stream_closed),
                )| Observations {
                    owner_died,
                    check: LivenessCheck {
                        epoch_now,
                        epoch_ours,
                        active_alive,
                        active_pid: 100,
                        hot,
                        heartbeat_age_ns: age,
                        stream_silence_ns: silence,
                        hung_after_ns: 1_000,
                    },
                    live_holder,
                    after: AfterDrain {
                        drained_cleanly,
                        took_nothing_since_handover,
                        hot: hot_after,
                        stream_closed,
                    },
                },
            )
    }

    proptest! {
        /// Never step up while a live thread holds the mutex: either the kernel marked it
        /// owner-died, or no live engine thread holds it.
        #[test]
        fn never_steps_up_while_a_live_thread_holds_the_mutex(obs in observations()) {
            if let Outcome::StepUp = follow(obs) {
                prop_assert!(obs.owner_died || obs.live_holder.is_none());
            }
        }

        /// Never step up with a partial state: hot on an open stream drained cleanly, or the
        /// state we handed over, untouched.
        #[test]
        fn never_steps_up_without_the_committed_state(obs in observations()) {
            if let Outcome::StepUp = follow(obs) {
                let a = obs.after;
                prop_assert!(a.drained_cleanly);
                prop_assert!((a.hot && !a.stream_closed) || a.took_nothing_since_handover);
            }
        }

        /// A newer epoch always re-attaches at the liveness check, and always makes a
        /// step-up waiting on the mutex give up.
        #[test]
        fn a_newer_epoch_always_reattaches(
            obs in observations(),
            planned in any::<bool>(),
            elapsed_ms in 0u64..1_000,
        ) {
            let c = obs.check;
            if c.epoch_now > c.epoch_ours {
                prop_assert_eq!(on_liveness_check(c, || obs.live_holder), OnLivenessCheck::Reattach);
                let busy = LockBusy {
                    planned,
                    elapsed: Duration::from_millis(elapsed_ms),
                    epoch_now: c.epoch_now,
                    epoch_ours: c.epoch_ours,
                    hung_after: Duration::from_millis(100),
                };
                prop_assert_eq!(on_lock_busy(busy), OnLockBusy::EpochTaken);
            }
        }

        /// A hung active is fenced only on three agreeing sources: heartbeat word, stream
        /// silence, and the mutex's live holder being that process.
        #[test]
        fn fencing_needs_three_sources(obs in observations()) {
            let c = obs.check;
            if on_liveness_check(c, || obs.live_holder) == OnLivenessCheck::FenceHung {
                prop_assert!(c.active_alive && c.hot && c.epoch_now == c.epoch_ours);
                prop_assert!(c.heartbeat_age_ns > c.hung_after_ns);
                prop_assert!(c.stream_silence_ns > c.hung_after_ns);
                prop_assert_eq!(obs.live_holder, Some(c.active_pid));
            }
        }

        /// An unplanned step-up never waits on a held mutex past the limit; a planned one
        /// waits (while the epoch is ours) and watches the old active for a hang.
        #[test]
        fn a_step_up_gives_up_or_waits(planned in any::<bool>(), elapsed_ms in 0u64..2_000) {
            let elapsed = Duration::from_millis(elapsed_ms);
            let d = on_lock_busy(LockBusy {
                planned,
                elapsed,
                epoch_now: 3,
                epoch_ours: 3,
                hung_after: Duration::from_millis(100),
            });
            if planned {
                let waits = matches!(d, OnLockBusy::Wait { .. });
                prop_assert!(waits, "planned step-up gave up: {:?}", d);
            } else {
                prop_assert_eq!(d == OnLockBusy::LiveHolder, elapsed > UNPLANNED_LIVE_HOLDER_LIMIT);
                let beats = matches!(d, OnLockBusy::Wait { heartbeat: true, .. });
                prop_assert!(!beats, "unplanned step-up refreshing its heartbeat: {:?}", d);
            }
        }
    }
}
