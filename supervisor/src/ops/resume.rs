//! After a supervisor restart, an upgrade its record says was in progress.
//!
//! First what the previous supervisor had under way settles: a cluster command no engine
//! took is withdrawn, an engine told to stop exits (SIGKILL at `shutdown_ms`), an engine
//! being started registers (within `start_ms`), a role change lands (an active within
//! `switchover_ms`). Then the cluster is observed — each engine's version from the record's
//! process identities — and handed to the plan, resumed ([`UpgradePlan::resume`]): it never
//! goes forward; before the acceptance verdict it restores the old version, after it it
//! keeps the accepted new one.

use std::time::Instant;

use tracing::{error, info, warn};
use understudy_control::control::{slot_name, Field, Pending, SlotCommand, SLOTS};

use super::upgrade::{UpgradeRun, UPGRADE_STARTING};
use super::{plan_slot, slot_of, Operation, Stepped};
use crate::cluster::ClusterOps;
use crate::plan::{self, Action, PlannedEngine, PlannedRole, Recovery, UpgradePlan};
use crate::proto::{Code, InterruptedUpgrade};
use crate::record::{self, UpgradeRecord};

/// Settling an interrupted upgrade.
pub(crate) struct ResumeOp {
    pub(crate) record: UpgradeRecord,
    began: Instant,
    killed: bool,
}

impl ResumeOp {
    /// Withdraws what no engine took, lets what was under way go on settling.
    pub(crate) fn begin(cluster: &mut dyn ClusterOps, record: UpgradeRecord) -> ResumeOp {
        warn!(
            to = %record.new_binary.display(),
            at = %record.progress,
            previous_supervisor = record.supervisor_pid,
            "an upgrade was left in the middle by a previous supervisor; it does not go on: \
             before its acceptance verdict the old version is restored, after it the new version is kept"
        );
        match cluster.control().pending_command() {
            None | Some((_, Pending::Withdrawn)) => {}
            Some((seq, Pending::Command(command))) => {
                warn!(
                    seq,
                    %command, "withdrawing a cluster command the previous supervisor posted and no engine took"
                );
                cluster.control().withdraw_command();
            }
            Some((seq, Pending::Bad(bad))) => {
                warn!(
                    seq,
                    "withdrawing a cluster command word no engine took: {bad}"
                );
                cluster.control().withdraw_command();
            }
        }
        for slot in 0..SLOTS {
            if cluster.ours(slot)
                && cluster.control().slot_command(slot) == Ok(Some(SlotCommand::Stop))
            {
                if let Some(proc) = cluster.engine(slot) {
                    info!(slot = %slot_name(slot), pid = proc.pid(), "the engine was being stopped; letting it stop");
                    cluster.expect_exit(slot);
                }
            }
        }
        // Stopped before its first action: an engine in the spare slot that the record does
        // not know is the compatibility check's (see `Probe`); it only goes.
        let spare = SLOTS - 1;
        if record.checkpoint.in_flight.is_none() && record.progress == UPGRADE_STARTING {
            if let Some(proc) = cluster.engine(spare) {
                if record
                    .version_of(plan_slot(spare), &proc.identity)
                    .is_none()
                {
                    info!(slot = %slot_name(spare), pid = proc.pid(), "the engine in the spare slot is the interrupted upgrade's compatibility check; stopping it");
                    cluster.request_stop(spare);
                }
            }
        }
        cluster.outcomes().interrupted = Some(InterruptedUpgrade {
            binary: Some(record.new_binary.clone()),
            at: Some(record.progress.clone()),
            decision: "letting the action in flight settle before deciding".into(),
            outcome: None,
            code: None,
        });
        ResumeOp {
            record,
            began: Instant::now(),
            killed: false,
        }
    }

    /// What was under way has settled, or waiting longer would not help.
    fn settled(&mut self, cluster: &mut dyn ClusterOps) -> bool {
        let t = cluster.config().timeouts.clone();
        let elapsed = self.began.elapsed();
        let longest = t.start().max(t.switchover()).max(t.shutdown() * 2);
        if elapsed > longest {
            return true;
        }
        let stopping: Vec<usize> = (0..SLOTS)
            .filter(|&s| cluster.engine(s).is_some_and(|p| p.expected_exit))
            .collect();
        if !stopping.is_empty() {
            if elapsed > t.shutdown() && !self.killed {
                for slot in stopping {
                    warn!(slot = %slot_name(slot), "engine did not stop in time; SIGKILL");
                    cluster.kill_expected(slot);
                }
                self.killed = true;
            }
            return false;
        }
        if let Some(Action::Start { slot, .. }) = &self.record.checkpoint.in_flight {
            let slot = slot_of(*slot);
            if cluster.engine(slot).is_none()
                && !cluster.adopt_registered(slot)
                && elapsed < t.start()
            {
                return false;
            }
        }
        cluster.active().is_some() || elapsed > t.switchover()
    }

    /// The cluster as the plan models it; `Err` names an engine the record does not explain.
    fn observe(&self, cluster: &dyn ClusterOps) -> Result<plan::Cluster, String> {
        let starting = match &self.record.checkpoint.in_flight {
            Some(Action::Start { slot, version, .. }) => Some((*slot, *version)),
            _ => None,
        };
        let mut engines = Vec::new();
        for slot in 0..SLOTS {
            let Some(proc) = cluster.engine(slot) else {
                continue;
            };
            if proc.expected_exit {
                continue;
            }
            let at = plan_slot(slot);
            let version = self
                .record
                .version_of(at, &proc.identity)
                .or_else(|| starting.filter(|(s, _)| *s == at).map(|(_, v)| v))
                .ok_or_else(|| {
                    format!(
                        "engine {} (pid {}) is not one the interrupted upgrade knew",
                        slot_name(slot),
                        proc.pid()
                    )
                })?;
            let role = if cluster.is_active(slot) {
                PlannedRole::Active
            } else if cluster.is_hot_standby(slot) {
                PlannedRole::Standby
            } else {
                PlannedRole::OutOfService
            };
            engines.push((
                at,
                PlannedEngine {
                    version,
                    role,
                    features_enabled: cluster.ours(slot)
                        && cluster.control().get(slot, Field::Features) != 0,
                },
            ));
        }
        Ok(plan::Cluster::new(engines))
    }

    /// One turn: once settled, the resumed plan takes over as an upgrade (or the cluster is
    /// left as found when the record does not fit it).
    pub(crate) fn step(&mut self, cluster: &mut dyn ClusterOps) -> Stepped {
        if !self.settled(cluster) {
            return Stepped::Running;
        }
        let cause = format!(
            "the supervisor (pid {}) stopped during this step, and a restarted supervisor does not go on with an upgrade",
            self.record.supervisor_pid
        );
        let resumed = self.observe(cluster).and_then(|observed| {
            let spec = self.record.spec(cluster.config().timeouts.clone());
            UpgradePlan::resume(spec, &self.record.checkpoint, observed.clone(), &cause)
                .map(|plan| (observed, plan))
                .map_err(|e| format!("the record does not fit the cluster: {e}"))
        });
        match resumed {
            Ok((observed, plan)) => {
                // Adopted engines show the executable they run, which for a wrapper script is
                // not the binary the upgrade started: use the record's.
                for (slot, engine) in observed.engines() {
                    let binary = self.record.binary(engine.version).to_path_buf();
                    cluster.set_binary(slot_of(slot), binary);
                }
                cluster.record_spawned();
                let decision = match plan.checkpoint().recovery {
                    Some(Recovery::Abort) => "undo it: it had not switched over, so the old version stays active, with an old-version hot standby",
                    Some(Recovery::Rollback) => "roll back: the old version becomes active again, with an old-version hot standby (the new version had no acceptance verdict, or lost the active role)",
                    Some(Recovery::Settle) => "keep the accepted new version: stop the engines that do not serve, then restore a hot standby",
                    None => "nothing can be done: no engine is active",
                };
                info!(at = %self.record.progress, "interrupted upgrade: {decision}");
                if let Some(interrupted) = cluster.outcomes().interrupted.as_mut() {
                    interrupted.decision = decision.to_owned();
                }
                let run = UpgradeRun::resumed(cluster, self.record.clone(), plan);
                Stepped::Became(Box::new(Operation::Upgrade(Box::new(run))))
            }
            Err(why) => {
                let aside = match record::set_aside(cluster.dir()) {
                    Ok(path) => format!("its record is in {}", path.display()),
                    Err(e) => e.to_string(),
                };
                error!("interrupted upgrade: {why}; the cluster is left as found ({aside}); check `understudy status` and finish by hand");
                if let Some(interrupted) = cluster.outcomes().interrupted.as_mut() {
                    interrupted.decision = format!("left as found: {why}; {aside}");
                    interrupted.outcome = Some("not settled: the operator takes over".into());
                    interrupted.code = Some(Code::Failed);
                }
                cluster.manage_running();
                Stepped::Ended
            }
        }
    }
}
