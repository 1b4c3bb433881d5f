//! `switchover` (and the upgrade's switchover action): the active hands its role to a hot
//! standby. Posted as the cluster command `Switchover { target }`; in effect once the target is
//! the active of the new epoch and the old active re-attached to it as a hot standby (given
//! the switchover timeout to do so, then reported done regardless).

use std::time::{Duration, Instant};

use tracing::warn;
use understudy_control::control::{slot_name, ClusterCommand, Field};

use super::command::{warn_asked_again, Command, CommandResult};
use crate::cluster::ClusterOps;
use crate::proto::{Code, Reply};

/// A switchover from the active `from` to the hot standby `to`.
pub(crate) struct Switchover {
    pub(crate) from: usize,
    pub(crate) to: usize,
    /// When `to` was first seen active.
    active_at: Option<Instant>,
}

impl Switchover {
    /// From the active `from` to the hot standby `to`.
    pub(crate) fn new(from: usize, to: usize) -> Switchover {
        Switchover {
            from,
            to,
            active_at: None,
        }
    }
}

impl Command for Switchover {
    fn command(&self) -> Option<ClusterCommand> {
        Some(ClusterCommand::Switchover { target: self.to })
    }

    fn taker(&self) -> usize {
        self.from
    }

    fn involves(&self, slot: usize) -> bool {
        slot == self.from || slot == self.to
    }

    /// "Not hot" for a target that reports hot: the active judged it on a stale view (a
    /// command left over from an operation a failover overtook, or acks still on their way).
    fn ask_again(&self, cluster: &dyn ClusterOps, result: CommandResult) -> bool {
        let again = result == CommandResult::NotHot
            && cluster.is_hot_standby(self.to)
            && cluster.is_active(self.from);
        if again {
            warn_asked_again(&format!(
                "switchover to engine {} refused as not hot although the target reports hot",
                slot_name(self.to)
            ));
        }
        again
    }

    fn effect(&mut self, cluster: &dyn ClusterOps, posted: Instant) -> Option<Duration> {
        let active_at = match self.active_at {
            Some(t) => t,
            None if cluster.is_active(self.to) => *self.active_at.insert(Instant::now()),
            None => return None,
        };
        // The old active re-attaches to the new one without catch-up; give it the
        // switchover timeout to report hot, then report the switch done regardless.
        let hot = cluster.is_hot_standby(self.from);
        if hot || active_at.elapsed() > cluster.config().timeouts.switchover() {
            if !hot {
                warn!(slot = %slot_name(self.from), "the old active is not a hot standby yet");
            }
            return Some(active_at.duration_since(posted));
        }
        None
    }

    fn describe(&self) -> String {
        format!(
            "switchover from engine {} to engine {}",
            slot_name(self.from),
            slot_name(self.to)
        )
    }

    fn done(&self, cluster: &dyn ClusterOps, took: Duration) -> Reply {
        let step_up_ns = cluster.control().get(self.to, Field::LastStepUpDurNs);
        Reply::result(
            Code::Ok,
            format!(
                "switched over from engine {} to engine {}: pause at most {} µs (command to new active seen), step-up {} µs",
                slot_name(self.from),
                slot_name(self.to),
                took.as_micros(),
                step_up_ns / 1000
            ),
        )
        .with_data(serde_json::json!({
            "from": slot_name(self.from).to_string(),
            "to": slot_name(self.to).to_string(),
            "pause_us_max": took.as_micros() as u64,
            "step_up_us": step_up_ns / 1000,
            "epoch": cluster.control().epoch(),
        }))
    }

    fn timed_out(&self, cluster: &dyn ClusterOps) -> Reply {
        Reply::result(
            Code::Timeout,
            format!(
                "the switchover did not complete within {} ms (timeouts.switchover_ms)",
                cluster.config().timeouts.switchover_ms
            ),
        )
    }

    fn died(&self, slot: usize, successor: Option<usize>) -> String {
        format!(
            "engine {} died during the switchover; engine {} is active",
            slot_name(slot),
            successor.map_or("none".into(), |s| slot_name(s).to_string())
        )
    }
}
