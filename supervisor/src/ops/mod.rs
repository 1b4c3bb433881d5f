//! The long operations of the control socket, each a small state machine the supervisor's
//! loop polls once per turn, against the cluster it lends them ([`ClusterOps`]):
//!
//! | file           | operation                                                             |
//! |----------------|-----------------------------------------------------------------------|
//! | `command`      | the machine every cluster command is: post, wait for the ack, then the effect |
//! | `switchover`   | `switchover`: SWITCHOVER(target) through that machine                  |
//! | `enable`       | `enable-features`: ENABLE_FEATURES(mask) through that machine          |
//! | `upgrade`      | `upgrade`: the actions of an [`UpgradePlan`](crate::plan::UpgradePlan) performed |
//! | `action`       | one action of the plan: begun, polled, abandoned                       |
//! | `probe`        | the upgrade's compatibility check of the new binary                   |
//! | `accept`       | the upgrade's acceptance bounds and soak                              |
//! | `resume`       | an upgrade a previous supervisor left in the middle, settled          |
//! | `rollback`     | `rollback` of the last completed upgrade                              |
//! | `down`         | `down`: standbys, then the active, then the files                     |
//! | `promote`      | `promote SLOT --accept-loss` after an outage: post, poll for active or refusal |
//!
//! Operations see the cluster only through [`ClusterOps`]; they never see the supervisor's
//! own bookkeeping, and what they leave for it goes in [`Outcomes`](crate::cluster::Outcomes).

use std::sync::mpsc::Sender;

use understudy_control::control::slot_name;

use crate::cluster::ClusterOps;
use crate::plan::Slot;
use crate::proto::{Code, Op, Reply, StatusReport};

mod accept;
mod action;
mod command;
mod down;
mod enable;
mod probe;
mod promote;
mod resume;
mod rollback;
mod switchover;
mod upgrade;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub(crate) use command::CommandOp;
pub(crate) use down::DownOp;
pub(crate) use enable::Enable;
pub(crate) use promote::PromoteOp;
pub(crate) use resume::ResumeOp;
pub(crate) use switchover::Switchover;
pub(crate) use upgrade::UpgradeRun;

fn plan_slot(slot: usize) -> Slot {
    Slot::ALL[slot]
}

fn slot_of(slot: Slot) -> usize {
    Slot::ALL.iter().position(|s| *s == slot).expect("a slot")
}

fn emit(watchers: &[Sender<Reply>], reply: &Reply) {
    for w in watchers {
        // A client that went away does not stop the operation.
        let _ = w.send(reply.clone());
    }
}

/// The operation in progress.
pub(crate) enum Operation {
    /// `switchover`.
    Switchover(CommandOp<Switchover>),
    /// `enable-features`.
    Enable(CommandOp<Enable>),
    /// `upgrade` (and `rollback` of a completed upgrade).
    Upgrade(Box<UpgradeRun>),
    /// `down`.
    Down(DownOp),
    /// `promote SLOT --accept-loss`.
    Promote(PromoteOp),
    /// After a supervisor restart: settling an upgrade a previous supervisor left in the
    /// middle, before a resumed plan takes over.
    Resume(ResumeOp),
}

/// What a turn of an operation came to.
pub(crate) enum Stepped {
    /// It goes on.
    Running,
    /// It has ended (its result sent).
    Ended,
    /// It has ended; its result goes out with the supervisor's status ([`Final::send`]).
    Finished(Box<Final>),
    /// It goes on as another operation.
    Became(Box<Operation>),
}

/// The result of an operation that ends with the cluster's status (the upgrade's).
pub(crate) struct Final {
    pub(crate) reply: Reply,
    pub(crate) watchers: Vec<Sender<Reply>>,
}

impl Final {
    /// Sends the result, `status` added to its data.
    pub(crate) fn send(mut self, status: StatusReport) {
        if let Some(data) = self.reply.data.as_object_mut() {
            data.insert(
                "status".into(),
                serde_json::to_value(status).unwrap_or_default(),
            );
        }
        emit(&self.watchers, &self.reply);
    }
}

impl Operation {
    /// Starts `op`; `Err` is the final reply when the operation cannot start (or has
    /// nothing to do).
    pub(crate) fn begin(
        cluster: &mut dyn ClusterOps,
        op: Op,
        reply: Sender<Reply>,
    ) -> Result<Operation, Reply> {
        match op {
            Op::Switchover => {
                let (from, to) = active_and_standby(cluster)?;
                let command = Switchover::new(from, to);
                Ok(Operation::Switchover(CommandOp::begin(cluster, command, reply)))
            }
            Op::EnableFeatures => {
                let (active, standby) = active_and_standby(cluster)?;
                let command = Enable::new(cluster, active, standby);
                if command.mask == 0 {
                    return Err(Reply::result(
                        Code::Ok,
                        "no feature to enable: the engines share no feature that is off",
                    ));
                }
                Ok(Operation::Enable(CommandOp::begin(cluster, command, reply)))
            }
            Op::Upgrade(request) => UpgradeRun::begin(cluster, request, reply)
                .map(|r| Operation::Upgrade(Box::new(r))),
            Op::Down => Ok(Operation::Down(DownOp::begin(cluster, reply))),
            Op::Promote(request) => {
                PromoteOp::begin(cluster, &request, reply).map(Operation::Promote)
            }
            Op::Status | Op::Rollback | Op::ResumeRestarts | Op::Reload(_) => Err(Reply::result(
                Code::Failed,
                "internal: status, rollback, resume-restarts and reload are handled by the supervisor loop",
            )),
        }
    }

    /// `rollback` with no upgrade in progress: upgrade back to the binary of the last
    /// completed upgrade, if its features were left off.
    pub(crate) fn rollback(
        cluster: &mut dyn ClusterOps,
        reply: Sender<Reply>,
    ) -> Result<Operation, Reply> {
        rollback::begin(cluster, reply).map(|r| Operation::Upgrade(Box::new(r)))
    }

    /// For `status`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Operation::Switchover(op) => op.describe(),
            Operation::Enable(op) => op.describe(),
            Operation::Upgrade(run) => match &run.resumed_at {
                Some(at) => format!(
                    "upgrade to {} interrupted at {at} by a supervisor restart, settling: {}",
                    run.new_binary.display(),
                    run.current
                ),
                None => format!("upgrade to {}: {}", run.new_binary.display(), run.current),
            },
            Operation::Down(_) => "down".into(),
            Operation::Promote(op) => op.describe(),
            Operation::Resume(op) => format!(
                "upgrade to {} interrupted at {} by a supervisor restart: letting the action in flight settle",
                op.record.new_binary.display(),
                op.record.progress
            ),
        }
    }

    /// Advances the operation by one turn.
    pub(crate) fn step(&mut self, cluster: &mut dyn ClusterOps) -> Stepped {
        let ended = match self {
            Operation::Switchover(op) => op.step(cluster),
            Operation::Enable(op) => op.step(cluster),
            Operation::Upgrade(run) => {
                if !run.step(cluster) {
                    return Stepped::Running;
                }
                return match run.take_result() {
                    Some(result) => Stepped::Finished(Box::new(result)),
                    None => Stepped::Ended,
                };
            }
            Operation::Down(op) => op.step(cluster),
            Operation::Promote(op) => op.step(cluster),
            Operation::Resume(op) => return op.step(cluster),
        };
        if ended {
            Stepped::Ended
        } else {
            Stepped::Running
        }
    }

    /// An engine died unexpectedly; `successor` is the active after it.
    pub(crate) fn on_death(
        &mut self,
        cluster: &mut dyn ClusterOps,
        slot: usize,
        successor: Option<usize>,
    ) {
        match self {
            Operation::Switchover(op) => op.on_death(cluster, slot, successor),
            Operation::Enable(op) => op.on_death(cluster, slot, successor),
            Operation::Upgrade(run) => run.on_death(cluster, slot, successor),
            Operation::Promote(op) => op.on_death(cluster, slot),
            // The cluster is observed once it has settled: deaths before that are in it.
            Operation::Down(_) | Operation::Resume(_) => {}
        }
    }
}

/// The active and a hot standby, or the reply that says which is missing.
fn active_and_standby(cluster: &dyn ClusterOps) -> Result<(usize, usize), Reply> {
    let Some(active) = cluster.active() else {
        return Err(Reply::result(Code::Outage, "no engine is active"));
    };
    let Some(standby) = cluster.hot_standby() else {
        return Err(Reply::result(
            Code::WrongRole,
            format!(
                "engine {} is active but no engine is a hot standby yet; wait until `understudy status` shows one hot",
                slot_name(active)
            ),
        ));
    };
    Ok((active, standby))
}
