//! The upgrade's compatibility check: the new binary started once in the spare slot before
//! the upgrade's first action.
//!
//! It must register as the same application and become a hot standby of the active (the
//! active accepted its stream: it reads every record the enabled features write), then it is
//! stopped. An incompatible binary (another application, a version that cannot read the
//! records of the enabled features) ends the upgrade `aborted` with the reason, the standby
//! still in service.

use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::{slot_name, Field, Role, State, SLOTS};

use crate::cluster::ClusterOps;

/// The check in progress.
pub(crate) struct Probe {
    pub(crate) slot: usize,
    pub(crate) spawned: bool,
    /// The verdict, once reached: the probe is stopped, and the verdict given once it exited.
    verdict: Option<Result<(), String>>,
    deadline: Instant,
}

impl Probe {
    /// A check in the spare slot, given `start_ms + hot_ms` to become hot.
    pub(crate) fn new(cluster: &dyn ClusterOps) -> Probe {
        let t = &cluster.config().timeouts;
        Probe {
            slot: SLOTS - 1,
            spawned: false,
            verdict: None,
            deadline: Instant::now() + t.start() + Duration::from_millis(t.hot_ms),
        }
    }

    /// `None` while the check runs; then the verdict, the probe gone.
    pub(crate) fn poll(
        &mut self,
        cluster: &mut dyn ClusterOps,
        binary: &Path,
    ) -> Option<Result<(), String>> {
        let slot = self.slot;
        if !self.spawned {
            self.spawned = true;
            if cluster.engine(slot).is_some() {
                // The spare slot is taken: no check (the plan's own steps will tell).
                return Some(Ok(()));
            }
            if let Err(e) = cluster.spawn(slot, binary, true) {
                return Some(Err(format!("cannot start the new version: {e}")));
            }
            info!(slot = %slot_name(slot), "compatibility check: the new version starts in the spare slot");
            return None;
        }
        if let Some(verdict) = &self.verdict {
            if cluster.engine(slot).is_none() {
                return Some(verdict.clone());
            }
            if Instant::now() > self.deadline + cluster.config().timeouts.shutdown() {
                cluster.kill_expected(slot);
            }
            return None;
        }
        let verdict = self.judge(cluster)?;
        match &verdict {
            Ok(()) => info!(
                "compatibility check passed: the new version attached to the active; stopping it"
            ),
            Err(e) => warn!("compatibility check failed: {e}"),
        }
        if cluster.engine(slot).is_none() {
            return Some(verdict);
        }
        cluster.request_stop(slot);
        self.deadline = Instant::now();
        self.verdict = Some(verdict);
        None
    }

    /// The verdict on the running probe, once there is one.
    fn judge(&self, cluster: &dyn ClusterOps) -> Option<Result<(), String>> {
        let slot = self.slot;
        let t = &cluster.config().timeouts;
        let waited_ms = t.start().as_millis() + u128::from(t.hot_ms);
        if cluster.engine(slot).is_none() {
            return Some(Err(self.died_reason(cluster)));
        }
        if !cluster.ours(slot) {
            return (Instant::now() > self.deadline).then(|| {
                Err(format!(
                    "the new version did not register within {waited_ms} ms (timeouts.start_ms + hot_ms)"
                ))
            });
        }
        let hash = |s: usize| cluster.control().get(s, Field::AppHash);
        match cluster.active() {
            Some(a) if hash(a) != hash(slot) => Some(Err(format!(
                "the new version runs another application than the active (engine {}: application hash {:#x}, engine {}: {:#x}); it is not an upgrade of this application",
                slot_name(slot),
                hash(slot),
                slot_name(a),
                hash(a)
            ))),
            _ if cluster.role(slot) == Role::Standby && cluster.state(slot) == State::Hot => {
                Some(Ok(()))
            }
            _ if Instant::now() > self.deadline => Some(Err(format!(
                "the new version did not become a hot standby of the active within {waited_ms} ms (timeouts.start_ms + hot_ms){}",
                self.downgrade_hint(cluster)
            ))),
            _ => None,
        }
    }

    /// Another engine died while the check ran: the verdict is the upgrade's end (nothing
    /// was changed); the probe is stopped first.
    pub(crate) fn fail(&mut self, cluster: &mut dyn ClusterOps, reason: String) {
        if self.verdict.is_some() {
            return;
        }
        warn!("compatibility check abandoned: {reason}");
        if cluster.engine(self.slot).is_some() {
            cluster.request_stop(self.slot);
        }
        self.spawned = true;
        self.deadline = Instant::now();
        self.verdict = Some(Err(reason));
    }

    /// The probe died on its own before attaching.
    fn died_reason(&self, cluster: &dyn ClusterOps) -> String {
        format!(
            "the new version exited during the compatibility check, before it attached to the active (the engine's own log line above, `engine stops: …`, says why: another application, or records it cannot read){}",
            self.downgrade_hint(cluster)
        )
    }

    /// A downgrade while features are enabled: what the operator most likely hit.
    fn downgrade_hint(&self, cluster: &dyn ClusterOps) -> String {
        let Some(a) = cluster.active() else {
            return String::new();
        };
        let control = cluster.control();
        let features = control.get(a, Field::Features);
        let ours = control.get(a, Field::AppVersion);
        let theirs = control.get(self.slot, Field::AppVersion);
        if features != 0 && theirs != 0 && theirs < ours {
            format!(
                "; this is a downgrade (version {theirs} < {ours}) while features {features:#x} are enabled, whose records an older version may not read"
            )
        } else {
            String::new()
        }
    }
}
