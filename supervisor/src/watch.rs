//! What the supervisor's loop watches besides deaths and the fence, each with the little
//! it remembers between turns: which engine holds the last copy of the state
//! ([`HotWatch`]), the role changes ([`RoleWatch`]), the actives' request rates ([`Rates`])
//! and the control block's checked words ([`ControlCheck`]).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::{realtime_ns, slot_name, Control, Field, SLOTS};

use crate::cluster::{Cluster, ClusterOps};
use crate::proto::RoleChange;

/// How many role changes `status` remembers.
const ROLE_CHANGES_KEPT: usize = 16;
/// How often the request rates are sampled.
const RATE_SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How often the control block's checked words are verified.
const CONTROL_CHECK_EVERY: Duration = Duration::from_millis(100);

/// The engine (pid) in each slot last seen as a hot standby, and in which epoch: if the
/// active of that epoch dies, it holds every committed transaction.
#[derive(Debug, Default)]
pub(crate) struct HotWatch {
    hot_seen: [Option<(u32, u64)>; SLOTS],
}

impl HotWatch {
    /// Remembers which engines are hot standbys of which epoch (for [`Self::last_copy`]).
    pub(crate) fn watch(&mut self, cluster: &Cluster) {
        for slot in 0..SLOTS {
            if cluster.is_hot_standby(slot) {
                if let Some(p) = cluster.engines[slot].as_ref() {
                    self.hot_seen[slot] = Some((p.pid(), cluster.control.get(slot, Field::Epoch)));
                }
            } else {
                // Gone, or no longer a hot standby of this epoch (it fell back to syncing, was
                // untethered, stepped up): old evidence must not call it the last copy. A
                // stalled standby keeps its words, so it stays marked while it cannot run.
                self.hot_seen[slot] = None;
            }
        }
    }

    /// With no engine active: a live engine that was a hot standby in the current epoch, so
    /// that it holds every transaction the dead active committed — the last copy of the
    /// state, never to be killed; it steps up when it runs again.
    pub(crate) fn last_copy(&self, cluster: &Cluster) -> Option<usize> {
        let epoch = cluster.control.epoch();
        (0..SLOTS).find(|&s| {
            cluster.engines[s].as_ref().is_some_and(|p| {
                !p.fenced
                    && !p.expected_exit
                    && self.hot_seen[s] == Some((p.pid(), epoch))
                    && p.identity.is_alive()
            })
        })
    }
}

/// The epoch and active slot last seen, and the latest role changes.
#[derive(Debug)]
pub(crate) struct RoleWatch {
    seen: (u64, Option<usize>),
    changes: VecDeque<RoleChange>,
}

impl RoleWatch {
    /// Starting from the roles `control` shows now.
    pub(crate) fn new(control: &Control) -> RoleWatch {
        RoleWatch {
            seen: (control.epoch(), control.active_slot()),
            changes: VecDeque::new(),
        }
    }

    /// A new epoch or active slot is logged and kept: `true` if there was one.
    pub(crate) fn watch(&mut self, control: &Control) -> bool {
        // A damaged epoch or active-slot word is no role change (an engine repairs it).
        let (Ok(epoch), Ok(active)) = (control.epoch_checked(), control.active_slot_checked())
        else {
            return false;
        };
        let now = (epoch, active);
        if now == self.seen {
            return false;
        }
        let change = RoleChange {
            at_ns: realtime_ns(),
            epoch,
            active: active.map(|s| slot_name(s).to_string()),
            previous: self.seen.1.map(|s| slot_name(s).to_string()),
            step_up_dur_ns: active.map_or(0, |s| control.get(s, Field::LastStepUpDurNs)),
        };
        info!(
            epoch,
            active = change.active.as_deref().unwrap_or("none"),
            previous = change.previous.as_deref().unwrap_or("none"),
            step_ups = active.map_or(0, |s| control.get(s, Field::StepUps)),
            step_up_us = change.step_up_dur_ns / 1000,
            "role change"
        );
        self.changes.push_back(change);
        while self.changes.len() > ROLE_CHANGES_KEPT {
            self.changes.pop_front();
        }
        self.seen = now;
        true
    }

    /// The latest role changes, oldest first.
    pub(crate) fn changes(&self) -> Vec<RoleChange> {
        self.changes.iter().cloned().collect()
    }
}

/// Each slot's request count at the last sample, when, and the rate since the one before.
#[derive(Debug)]
pub(crate) struct Rates {
    rates: [(u64, Instant, f64); SLOTS],
    last_sample: Instant,
}

impl Rates {
    /// No sample yet.
    pub(crate) fn new() -> Rates {
        Rates {
            rates: [(0, Instant::now(), 0.0); SLOTS],
            last_sample: Instant::now(),
        }
    }

    /// Every 500 ms: each slot's requests per second since the last sample.
    pub(crate) fn sample(&mut self, cluster: &Cluster) {
        let now = Instant::now();
        if now.duration_since(self.last_sample) < RATE_SAMPLE_EVERY {
            return;
        }
        self.last_sample = now;
        for slot in 0..SLOTS {
            let requests = if cluster.ours(slot) {
                cluster.control.get(slot, Field::Requests)
            } else {
                0
            };
            let (last, at, _) = self.rates[slot];
            let dt = now.duration_since(at).as_secs_f64();
            let rate = if requests >= last && dt > 0.0 {
                (requests - last) as f64 / dt
            } else {
                0.0
            };
            self.rates[slot] = (requests, now, rate);
        }
    }

    /// `slot`'s requests per second at the last sample.
    pub(crate) fn per_s(&self, slot: usize) -> f64 {
        self.rates[slot].2
    }
}

/// When the control block's checked words were last verified, and whether damage was being
/// reported.
#[derive(Debug)]
pub(crate) struct ControlCheck {
    checked: (Instant, bool),
}

impl ControlCheck {
    /// Not checked yet.
    pub(crate) fn new() -> ControlCheck {
        ControlCheck {
            checked: (Instant::now(), false),
        }
    }

    /// Every 100 ms: the control block's checked words verified, a copy damaged while the
    /// other is intact rewritten from it (the engines do the same; compare-and-swap, so a
    /// legitimate write wins), and the damage logged with each word named — once per
    /// episode.
    pub(crate) fn check(&mut self, control: &Control) {
        let (at, reporting) = self.checked;
        if at.elapsed() < CONTROL_CHECK_EVERY {
            return;
        }
        let found = control.repair();
        if !found.is_empty() && !reporting {
            for c in &found {
                warn!("{c}; decisions on this word wait for a second source");
            }
        } else if found.is_empty() && reporting {
            info!("the control block's checked words are intact again");
        }
        self.checked = (Instant::now(), !found.is_empty());
    }
}
