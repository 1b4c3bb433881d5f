//! Engines the supervisor did not start: a live process a slot's control-block record names
//! (pid and start time) that is not the engine the supervisor watches there — one started by
//! hand in a free slot, say. Warned about once, and shown by `status` while it lives; never
//! watched, fenced or restarted.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::{slot_name, Field, Role, SLOTS};
use understudy_control::liveness::ProcessIdentity;

use crate::cluster::Cluster;
use crate::proto::ForeignEngine;

/// How long a slot's record must name a live engine that is not the supervisor's before it is
/// reported: an engine the supervisor is about to adopt (one a previous supervisor started)
/// registers a moment before it is adopted.
const FOREIGN_AFTER: Duration = Duration::from_secs(1);

/// How often the slots' records are compared with the engines the supervisor watches.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// A live engine registered in a slot the supervisor did not start it in.
#[derive(Debug, Clone, Copy)]
struct ForeignSeen {
    identity: ProcessIdentity,
    since: Instant,
    reported: bool,
}

/// Per slot, a live engine its control-block record names that is not the one the
/// supervisor watches there: since when it has been seen, and whether it was reported.
pub(crate) struct ForeignWatch {
    seen: [Option<ForeignSeen>; SLOTS],
    /// When the slots' records were last compared with the engines the supervisor watches.
    checked: Instant,
}

impl ForeignWatch {
    /// Nothing seen yet.
    pub(crate) fn new() -> ForeignWatch {
        ForeignWatch {
            seen: [None; SLOTS],
            checked: Instant::now(),
        }
    }

    /// Every 100 ms: each slot's control-block record compared with the engine the supervisor
    /// watches there. A live process the record names (pid and start time) that is not that
    /// engine — one started by hand in a free slot, say — is warned about once, naming the
    /// slot, the pid found and the pid expected, and shown by `status` while it lives. A word
    /// damaged in both its copies decides nothing (the slot is compared again next time).
    pub(crate) fn watch(&mut self, cluster: &Cluster) {
        if self.checked.elapsed() < CHECK_EVERY {
            return;
        }
        self.checked = Instant::now();
        for slot in 0..SLOTS {
            let (Ok(pid), Ok(start)) = (
                cluster.control.get_checked(slot, Field::Pid),
                cluster.control.get_checked(slot, Field::StartTime),
            ) else {
                continue;
            };
            let expected = cluster.engines[slot].as_ref().map(|p| p.identity);
            let found = u32::try_from(pid)
                .ok()
                .filter(|&pid| pid != 0)
                .map(|pid| ProcessIdentity {
                    pid,
                    start_time_ticks: start,
                })
                .filter(|id| Some(*id) != expected && id.is_alive());
            let Some(identity) = found else {
                if let Some(gone) = self.seen[slot].take().filter(|f| f.reported) {
                    info!(slot = %slot_name(slot), pid = gone.identity.pid, "the engine that registered in slot {} without this supervisor is gone from its record", slot_name(slot));
                }
                continue;
            };
            let seen = match self.seen[slot] {
                Some(f) if f.identity == identity => f,
                _ => ForeignSeen {
                    identity,
                    since: Instant::now(),
                    reported: false,
                },
            };
            let seen = if !seen.reported && seen.since.elapsed() >= FOREIGN_AFTER {
                let expected_pid = expected.map(|e| e.pid);
                warn!(
                    slot = %slot_name(slot),
                    pid = identity.pid,
                    start_time = identity.start_time_ticks,
                    expected_pid = ?expected_pid,
                    "engine pid {} registered in slot {}, which this supervisor did not start it in ({}): it is not watched, fenced or restarted",
                    identity.pid,
                    slot_name(slot),
                    match expected_pid {
                        Some(p) => format!("expected pid {p}"),
                        None => "no engine of this supervisor runs there".to_string(),
                    }
                );
                ForeignSeen {
                    reported: true,
                    ..seen
                }
            } else {
                seen
            };
            self.seen[slot] = Some(seen);
        }
    }

    /// For `status`: the foreign engines reported, while they live.
    pub(crate) fn report(&self, cluster: &Cluster) -> Vec<ForeignEngine> {
        (0..SLOTS)
            .filter_map(|s| {
                let f = self.seen[s].filter(|f| f.reported)?;
                Some(ForeignEngine {
                    slot: slot_name(s).to_string(),
                    pid: f.identity.pid,
                    start_time_ticks: f.identity.start_time_ticks,
                    expected_pid: cluster.engines[s].as_ref().map(|p| p.pid()),
                    role: Role::from_word(cluster.control.get(s, Field::Role))
                        .name()
                        .to_string(),
                })
            })
            .collect()
    }
}
