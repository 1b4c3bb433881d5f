//! `promote SLOT --accept-loss`: after an outage, serve from the consistent copy a standby
//! holds.
//!
//! With no engine active (verified: none holds the active's lock) and the operator accepting
//! the loss, the engine in the slot is told (slot command `Promote`) to become active with the
//! consistent copy it holds. The engine itself refuses if it holds none, or if an active
//! appeared meanwhile (the mutex and the epoch's compare-and-swap decide), and says why in its
//! slot ([`Control::slot_refusal`](understudy_control::control::Control::slot_refusal)).
//!
//! Polled like every operation, never blocking the supervisor's loop:
//!
//! ```text
//!   post ──► each turn: active? ──► done (what the copy holds, what was lost)
//!                       refused? ──► "the engine refused: <reason>"
//!                       deadline? ─► withdrawn if not taken; timeout
//!                       the engine died ─► failed
//! ```

use std::sync::mpsc::Sender;
use std::time::Instant;

use tracing::warn;
use understudy_control::control::{slot_index, slot_name, Field, SlotCommand};

use super::emit;
use crate::cluster::ClusterOps;
use crate::proto::{Code, PromoteRequest, Reply};

/// A promote in flight: the slot command posted, its effect (or refusal) awaited.
pub(crate) struct PromoteOp {
    slot: usize,
    /// What the dead active had committed, as the operator was told at the post.
    what: String,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    /// Set when the engine died: the result of the next turn.
    failed: Option<String>,
}

impl PromoteOp {
    /// Posts the promote `request` names, or the reply that refuses it.
    pub(crate) fn begin(
        cluster: &mut dyn ClusterOps,
        request: &PromoteRequest,
        reply: Sender<Reply>,
    ) -> Result<PromoteOp, Reply> {
        let slot = refusal(cluster, request)?;
        let what = cluster.what_was_committed();
        warn!(slot = %slot_name(slot), "promote requested by the operator, accepting the loss: {what}");
        cluster
            .control()
            .post_slot_command(slot, SlotCommand::Promote);
        Ok(PromoteOp {
            slot,
            what,
            deadline: Instant::now() + cluster.config().timeouts.switchover(),
            watchers: vec![reply],
            failed: None,
        })
    }

    /// For `status`.
    pub(crate) fn describe(&self) -> String {
        format!("promote engine {}", slot_name(self.slot))
    }

    /// One turn; `true` once the result is sent.
    pub(crate) fn step(&mut self, cluster: &dyn ClusterOps) -> bool {
        let slot = self.slot;
        let control = cluster.control();
        let reply = if let Some(why) = self.failed.take() {
            Reply::result(Code::Failed, why)
        } else if cluster.is_active(slot) {
            Reply::result(
                Code::Ok,
                format!(
                    "engine {} is active with its copy of {} transactions ({})",
                    slot_name(slot),
                    control.get(slot, Field::StepUpCommits),
                    self.what
                ),
            )
        } else if let Some(why) = control.slot_refusal(slot) {
            Reply::result(Code::WrongRole, format!("the engine refused: {why}"))
        } else if Instant::now() >= self.deadline {
            // Withdrawn if the engine never took it: a command given up on must not make it
            // active later, on its own, at some other outage.
            let withdrawn = control.take_slot_command(slot, SlotCommand::Promote);
            Reply::result(
                Code::Timeout,
                format!(
                    "engine {} did not become active within {} ms (timeouts.switchover_ms; {}); see its log",
                    slot_name(slot),
                    cluster.config().timeouts.switchover_ms,
                    if withdrawn {
                        "it never took the command, which is withdrawn"
                    } else {
                        "it took the command and is still claiming the epoch"
                    }
                ),
            )
        } else {
            return false;
        };
        emit(&self.watchers, &reply);
        true
    }

    /// An engine died: the promote fails if it is the one being promoted.
    pub(crate) fn on_death(&mut self, cluster: &dyn ClusterOps, slot: usize) {
        if slot == self.slot {
            cluster
                .control()
                .take_slot_command(slot, SlotCommand::Promote);
            self.failed = Some(format!(
                "engine {} died while being promoted",
                slot_name(slot)
            ));
        }
    }
}

/// The slot to promote, or why not.
fn refusal(cluster: &dyn ClusterOps, request: &PromoteRequest) -> Result<usize, Reply> {
    let refuse = |why: String| Err(Reply::result(Code::WrongRole, why));
    let Some(slot) = slot_index(&request.slot) else {
        return Err(Reply::result(
            Code::Failed,
            format!("no slot {:?}", request.slot),
        ));
    };
    if let Some(a) = cluster.active() {
        return refuse(format!(
            "engine {} is active: nothing to promote",
            slot_name(a)
        ));
    }
    if let Some(h) = cluster.lock_holder() {
        return refuse(format!(
            "engine {} holds the active's lock: it serves",
            slot_name(h)
        ));
    }
    cluster
        .promotable(slot)
        .map_err(|why| Reply::result(Code::WrongRole, why))?;
    if !request.accept_loss {
        return refuse(format!(
            "promote loses what the dead active committed after the copy: {}; run again with --accept-loss to go ahead",
            cluster.what_was_committed()
        ));
    }
    Ok(slot)
}
