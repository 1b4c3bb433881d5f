//! `enable-features` (and the upgrade's last action): turn on the features both engines
//! support. Posted as the cluster command `EnableFeatures` (the standby's enableable mask); in
//! effect once both engines report every feature of the mask.

use std::time::{Duration, Instant};

use understudy_control::control::{slot_name, ClusterCommand, Field};

use super::command::Command;
use crate::cluster::ClusterOps;
use crate::proto::{Code, Reply};

/// Enabling the features `mask` on the active and its hot standby.
pub(crate) struct Enable {
    pub(crate) active: usize,
    pub(crate) standby: usize,
    pub(crate) mask: u64,
}

impl Enable {
    /// The features the standby can enable (its enableable mask, 0 for none).
    pub(crate) fn new(cluster: &dyn ClusterOps, active: usize, standby: usize) -> Enable {
        Enable {
            active,
            standby,
            mask: cluster.control().get(standby, Field::Enableable),
        }
    }
}

impl Command for Enable {
    fn command(&self) -> Option<ClusterCommand> {
        (self.mask != 0).then_some(ClusterCommand::EnableFeatures { mask: self.mask })
    }

    fn taker(&self) -> usize {
        self.active
    }

    fn involves(&self, slot: usize) -> bool {
        slot == self.active || slot == self.standby
    }

    fn effect(&mut self, cluster: &dyn ClusterOps, posted: Instant) -> Option<Duration> {
        let has = |slot| cluster.control().get(slot, Field::Features) & self.mask == self.mask;
        (has(self.active) && has(self.standby)).then(|| posted.elapsed())
    }

    fn describe(&self) -> String {
        "enable features".into()
    }

    fn done(&self, _cluster: &dyn ClusterOps, _took: Duration) -> Reply {
        Reply::result(
            Code::Ok,
            format!(
                "features {:#x} enabled on engines {} and {}",
                self.mask,
                slot_name(self.active),
                slot_name(self.standby)
            ),
        )
        .with_data(serde_json::json!({ "enabled": self.mask }))
    }

    fn timed_out(&self, cluster: &dyn ClusterOps) -> Reply {
        Reply::result(
            Code::Timeout,
            format!(
                "the features were not enabled within {} ms (timeouts.switchover_ms)",
                cluster.config().timeouts.switchover_ms
            ),
        )
    }

    fn died(&self, slot: usize, _successor: Option<usize>) -> String {
        format!("engine {} died while enabling features", slot_name(slot))
    }
}
