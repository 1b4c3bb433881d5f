//! The fence: SIGKILL for an engine that is hung, or active in an old epoch — never the last
//! copy of the state, and never on the control block's word alone (see [`Fence::fence`]).

use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_control::control::{monotonic_ns, slot_name, Field, Role, State, SLOTS};

use crate::cluster::{Cluster, ClusterOps};
use crate::process::HUNG_BEATS;
use crate::verify::{self, HeartbeatSeen};

/// What the fence remembers between turns.
#[derive(Debug, Default)]
pub(crate) struct Fence {
    /// Slots whose active is hung with no hot standby to take over: reported, not fenced.
    hung_unfenced: [bool; SLOTS],
    /// How long the supervisor itself has seen each slot's heartbeat word unchanged.
    heartbeat_seen: [Option<HeartbeatSeen>; SLOTS],
    /// A control-block record that a second source contradicted has been reported (once).
    suspect_reported: [bool; SLOTS],
    /// Since when each slot's engine (pid) has looked superseded: active in an old epoch
    /// while another engine holds the active's lock.
    superseded_since: [Option<(u32, Instant)>; SLOTS],
}

/// An engine the fence looks at: hung, or active in an old epoch.
struct FenceCase {
    slot: usize,
    pid: u32,
    role: Role,
    /// Its heartbeat's age.
    age_ns: u64,
    /// Active in an old epoch while another engine holds the active's lock, for longer
    /// than the hung threshold.
    superseded: bool,
    /// The engine holding the active's lock, if it was looked up.
    holder: Option<usize>,
}

impl Fence {
    /// The engine in `slot` is gone: a hung one is no longer waited for.
    pub(crate) fn forget_hung(&mut self, slot: usize) {
        self.hung_unfenced[slot] = false;
    }

    /// `true` the first time the control block's record of `slot` is found contradicted
    /// (the caller reports it), `false` after.
    pub(crate) fn first_suspicion(&mut self, slot: usize) -> bool {
        !std::mem::replace(&mut self.suspect_reported[slot], true)
    }

    /// SIGKILL a hung engine (its heartbeat is [`HUNG_BEATS`] intervals old; four times that
    /// for one that is not active, since a busy catch-up may delay it), and any active of an
    /// old epoch: never two actives.
    ///
    /// Never the last copy of the state, and never on the control block's word alone:
    /// - a hung active only if a hot standby with a fresh heartbeat can take over. Without
    ///   one, killing it would turn a stall (a paused VM, a debugger, a swap storm) into the
    ///   loss of the cluster's whole state; it is reported and left to resume;
    /// - a hung standby only if another live engine verifiably serves (it holds the active's
    ///   robust mutex): with the active dead, a stalled standby is the last copy, and it steps
    ///   up when it resumes;
    /// - "hung" means the heartbeat word is old *and* the supervisor has seen it unchanged for
    ///   the whole threshold (a word one flipped bit made old is rewritten within an interval);
    /// - "active in an old epoch" only if another of our live engines holds the active's
    ///   mutex: if this engine holds it, it is the active and the epoch word is what is wrong.
    pub(crate) fn fence(&mut self, cluster: &mut Cluster) {
        let now = monotonic_ns();
        let seen_at = Instant::now();
        let hung_ns = cluster.config.timeouts.heartbeat_ms * HUNG_BEATS * 1_000_000;
        let epoch = cluster.control.epoch();
        // Who holds the active's lock: looked up (in /proc) only when a decision needs it.
        let mut holder_seen: Option<Option<usize>> = None;
        for slot in 0..SLOTS {
            let Some(proc) = cluster.engines[slot].as_ref() else {
                self.heartbeat_seen[slot] = None;
                continue;
            };
            if proc.expected_exit || proc.fenced || !cluster.ours(slot) {
                continue;
            }
            let pid = proc.pid();
            let role = cluster.role(slot);
            let unchanged_ns = self.heartbeat_unchanged_ns(cluster, slot, pid, seen_at);
            let age = cluster.heartbeat_age_ns(slot, now);
            let limit = if role == Role::Active {
                hung_ns
            } else {
                hung_ns * 4
            };
            let claims_stale = role == Role::Active
                && cluster.control.get(slot, Field::Epoch) < epoch
                && cluster.state(slot) == State::Serving
                && cluster.engines[slot]
                    .as_ref()
                    .is_some_and(|p| p.identity.is_alive());
            let hung = age > limit && unchanged_ns > limit;
            let holder = if claims_stale || hung {
                *holder_seen.get_or_insert_with(|| cluster.lock_holder())
            } else {
                None
            };
            // An active killed a moment ago looks superseded until its exit is complete (its
            // lock was taken over at once): only a state that lasts the hung threshold is
            // a second active.
            let looks_superseded = claims_stale && holder.is_some_and(|h| h != slot);
            let superseded = self.superseded_for(slot, pid, looks_superseded, seen_at) > hung_ns;
            if claims_stale && !looks_superseded && !self.suspect_reported[slot] {
                self.suspect_reported[slot] = true;
                warn!(
                    slot = %slot_name(slot),
                    pid,
                    engine_epoch = cluster.control.get(slot, Field::Epoch),
                    control_epoch = epoch,
                    lock_holder = holder.map(slot_name).map(String::from).as_deref().unwrap_or("none"),
                    "the control block says this engine is active in an old epoch, but no other engine holds the active's lock: the control block is suspect; not fencing"
                );
            }
            if !hung && self.hung_unfenced[slot] {
                self.hung_unfenced[slot] = false;
                info!(slot = %slot_name(slot), pid, "the hung engine's heartbeat resumed");
            }
            if !(hung || superseded) {
                continue;
            }
            let case = FenceCase {
                slot,
                pid,
                role,
                age_ns: age,
                superseded,
                holder,
            };
            if !self.may_fence(cluster, &case, now, hung_ns) {
                continue;
            }
            if let Some(proc) = cluster.engines[slot].as_mut() {
                proc.kill();
                proc.fenced = true;
            }
        }
    }

    /// How long the supervisor has seen `slot`'s heartbeat word unchanged (by the engine
    /// `pid`), as of `seen_at`.
    fn heartbeat_unchanged_ns(
        &mut self,
        cluster: &Cluster,
        slot: usize,
        pid: u32,
        seen_at: Instant,
    ) -> u64 {
        let word = cluster.control.get(slot, Field::HeartbeatNs);
        match self.heartbeat_seen[slot].as_mut() {
            Some(seen) => seen.observe(pid, word, seen_at),
            None => {
                self.heartbeat_seen[slot] = Some(HeartbeatSeen::new(pid, word, seen_at));
                Duration::ZERO
            }
        }
        .as_nanos() as u64
    }

    /// How long the engine `pid` in `slot` has looked superseded (0 when it does not now).
    fn superseded_for(&mut self, slot: usize, pid: u32, looks: bool, seen_at: Instant) -> u64 {
        match (looks, self.superseded_since[slot]) {
            (false, _) => {
                self.superseded_since[slot] = None;
                0
            }
            (true, Some((p, since))) if p == pid => since.elapsed().as_nanos() as u64,
            (true, _) => {
                self.superseded_since[slot] = Some((pid, seen_at));
                0
            }
        }
    }

    /// The verdict on an engine that is hung or superseded: fence it (`true`), or report why
    /// not — the last copy of the state is never fenced (see [`Fence::fence`]).
    fn may_fence(&mut self, cluster: &Cluster, case: &FenceCase, now: u64, hung_ns: u64) -> bool {
        if case.superseded {
            error!(slot = %slot_name(case.slot), pid = case.pid, active = %case.holder.map_or('-', slot_name), "engine is active in an old epoch while another engine holds the active's lock; fencing it with SIGKILL");
        } else if case.role == Role::Active && !can_take_over(cluster, case.slot, now, hung_ns) {
            if !self.hung_unfenced[case.slot] {
                self.hung_unfenced[case.slot] = true;
                error!(slot = %slot_name(case.slot), pid = case.pid, heartbeat_age_ms = case.age_ns / 1_000_000, "the active engine is hung, but no hot standby could take over: not fencing it (that would lose the cluster's state); waiting for it to resume");
            }
            return false;
        } else if case.role != Role::Active
            && !case
                .holder
                .is_some_and(|h| h != case.slot && cluster.heartbeat_age_ns(h, now) <= hung_ns)
        {
            if !self.hung_unfenced[case.slot] {
                self.hung_unfenced[case.slot] = true;
                error!(
                    slot = %slot_name(case.slot),
                    pid = case.pid,
                    heartbeat_age_ms = case.age_ns / 1_000_000,
                    stopped = ?verify::is_stopped(case.pid),
                    "the standby is hung, but no other engine verifiably serves: it may hold the last copy of the state; not fencing it, waiting for it to resume"
                );
            }
            return false;
        } else {
            error!(slot = %slot_name(case.slot), pid = case.pid, heartbeat_age_ms = case.age_ns / 1_000_000, "engine is hung; fencing it with SIGKILL");
        }
        true
    }
}

/// Some engine other than `active` is a hot standby of the epoch, alive, with a heartbeat
/// younger than `hung_ns`: it steps up if `active` dies.
fn can_take_over(cluster: &Cluster, active: usize, now: u64, hung_ns: u64) -> bool {
    (0..SLOTS).any(|s| {
        s != active
            && cluster.is_hot_standby(s)
            && cluster.heartbeat_age_ns(s, now) <= hung_ns
            && cluster.engines[s]
                .as_ref()
                // A standby being stopped (an upgrade's step 1, `down`) will not take over.
                .is_some_and(|p| !p.fenced && !p.expected_exit && p.identity.is_alive())
    })
}
