//! `promote SLOT --accept-loss`: after an outage, serve from the consistent copy a standby
//! holds.
//!
//! With no engine active (verified: none holds the active's lock) and the operator accepting
//! the loss, the engine in the slot is told (slot command PROMOTE) to become active with the
//! consistent copy it holds. The engine itself refuses if it holds none, or if an active
//! appeared meanwhile (the mutex and the epoch's compare-and-swap decide).

use std::time::{Duration, Instant};

use tracing::warn;
use understudy_control::control::{slot_index, slot_name, Field, SlotCommand};

use crate::cluster::ClusterOps;
use crate::proto::{Code, PromoteRequest, Reply};

/// How often the wait for the promoted engine looks at its record.
const POLL_EVERY: Duration = Duration::from_millis(1);

/// Promotes the engine `request` names, waiting (at most the switchover timeout) for it to
/// be active; the reply says what was lost.
pub(crate) fn promote(cluster: &mut dyn ClusterOps, request: &PromoteRequest) -> Reply {
    let slot = match refusal(cluster, request) {
        Ok(slot) => slot,
        Err(reply) => return reply,
    };
    let what = cluster.what_was_committed();
    warn!(slot = %slot_name(slot), "promote requested by the operator, accepting the loss: {what}");
    cluster
        .control()
        .post_slot_command(slot, SlotCommand::Promote);
    let deadline = Instant::now() + cluster.config().timeouts.switchover();
    while Instant::now() < deadline {
        if cluster.is_active(slot) {
            return Reply::result(
                Code::Ok,
                format!(
                    "engine {} is active with its copy of {} transactions ({what})",
                    slot_name(slot),
                    cluster.control().get(slot, Field::StepUpCommits)
                ),
            );
        }
        std::thread::sleep(POLL_EVERY);
    }
    // Withdrawn if the engine never took it: a command given up on must not make it active
    // later, on its own, at some other outage.
    let withdrawn = cluster
        .control()
        .take_slot_command(slot, SlotCommand::Promote);
    Reply::result(
        Code::Failed,
        format!(
            "engine {} did not become active within the switchover timeout ({}); see its log",
            slot_name(slot),
            if withdrawn {
                "it never took the command, which is withdrawn"
            } else {
                "it took the command and refused or is still claiming"
            }
        ),
    )
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
