//! One machine for every cluster command: post it in the control block, wait for the
//! active's acknowledgement, then for its effect to show in the engines' records.
//!
//! `switchover` and `enable-features` (and the upgrade's actions of the same names) are this
//! machine with a different [`Command`]: what is posted, what the engines' records must show
//! once it took effect, and what the operator is told.
//!
//! ```text
//!   post ──► wait for the ack ──► result ok? ──► wait for the effect ──► done
//!                  │                  │ no
//!                  │                  └─► refused (the typed result, named)
//!                  └─ deadline / an engine involved died: withdrawn if not taken
//! ```

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::{slot_name, ClusterCommand};
pub(crate) use understudy_control::result::CommandResult;

use super::emit;
use crate::cluster::ClusterOps;
use crate::proto::{Code, Reply};

/// One kind of cluster command: what differs between `switchover` and `enable-features`.
pub(crate) trait Command {
    /// The command; `None` when there is nothing to post (the effect already holds).
    fn command(&self) -> Option<ClusterCommand>;
    /// The active that takes the command and answers it.
    fn taker(&self) -> usize;
    /// The command needs the engine in `slot`: its death fails the command.
    fn involves(&self, slot: usize) -> bool;
    /// A refusal judged on a stale view, to be asked once more (`true`, and says so).
    fn ask_again(&self, _cluster: &dyn ClusterOps, _result: CommandResult) -> bool {
        false
    }
    /// After an `ok`: how long the command took from `posted` once its effect shows.
    fn effect(&mut self, cluster: &dyn ClusterOps, posted: Instant) -> Option<Duration>;
    /// For the log and `status`.
    fn describe(&self) -> String;
    /// The result when the effect showed after `took`.
    fn done(&self, cluster: &dyn ClusterOps, took: Duration) -> Reply;
    /// The result when the deadline passed first.
    fn timed_out(&self, cluster: &dyn ClusterOps) -> Reply;
    /// Why the command failed when the engine in `slot` died (`successor` is active now).
    fn died(&self, slot: usize, successor: Option<usize>) -> String;
}

/// What a poll of a command in flight came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CommandPoll {
    /// Not acknowledged, or not in effect yet.
    Pending,
    /// In effect, `took` after it was posted.
    Done {
        /// From the post to the effect.
        took: Duration,
    },
    /// The active refused it: why, for the operator.
    Refused(String),
}

/// A cluster command in flight.
pub(crate) struct CommandExec<C> {
    pub(crate) command: C,
    seq: u64,
    acked: bool,
    posted: Instant,
    /// Times the command was posted again after a refusal judged on a stale view.
    reposts: u8,
}

impl<C: Command> CommandExec<C> {
    /// Posts `command`.
    pub(crate) fn post(cluster: &dyn ClusterOps, command: C) -> CommandExec<C> {
        let seq = match command.command() {
            Some(c) => cluster.control().post_command(c),
            None => 0,
        };
        info!("{} posted", command.describe());
        CommandExec {
            command,
            seq,
            acked: seq == 0,
            posted: Instant::now(),
            reposts: 0,
        }
    }

    /// The command's sequence number, if one was posted (for the upgrade's record).
    pub(crate) fn seq(&self) -> Option<u64> {
        (self.seq != 0).then_some(self.seq)
    }

    /// Advances the command: its acknowledgement, then its effect.
    pub(crate) fn poll(&mut self, cluster: &dyn ClusterOps) -> CommandPoll {
        if !self.acked {
            let (ack, answer) = cluster.control().acked_result();
            if ack < self.seq {
                return CommandPoll::Pending;
            }
            self.acked = true;
            if !answer.is_ok() && self.reposts == 0 && self.command.ask_again(cluster, answer) {
                if let Some(c) = self.command.command() {
                    self.reposts += 1;
                    self.acked = false;
                    self.seq = cluster.control().post_command(c);
                    return CommandPoll::Pending;
                }
            }
            if !answer.is_ok() {
                return CommandPoll::Refused(format!(
                    "engine {} refused: {answer}",
                    slot_name(self.command.taker())
                ));
            }
        }
        match self.command.effect(cluster, self.posted) {
            Some(took) => CommandPoll::Done { took },
            None => CommandPoll::Pending,
        }
    }

    /// Withdraw a command the active never acknowledged: a later command supersedes it, and
    /// a new active must not take (or refuse) it in a later operation.
    pub(crate) fn cancel(&self, cluster: &dyn ClusterOps) {
        if !self.acked {
            cluster.control().withdraw_command();
        }
    }
}

/// `switchover` or `enable-features`: a command, its deadline and who waits for its result.
pub(crate) struct CommandOp<C> {
    pub(crate) exec: CommandExec<C>,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    failed: Option<String>,
}

impl<C: Command> CommandOp<C> {
    /// Posts `command`; the result goes to `reply` within the switchover timeout.
    pub(crate) fn begin(cluster: &dyn ClusterOps, command: C, reply: Sender<Reply>) -> Self {
        CommandOp {
            exec: CommandExec::post(cluster, command),
            deadline: Instant::now() + cluster.config().timeouts.switchover(),
            watchers: vec![reply],
            failed: None,
        }
    }

    /// For `status`.
    pub(crate) fn describe(&self) -> String {
        self.exec.command.describe()
    }

    /// One turn; `true` once the result is sent.
    pub(crate) fn step(&mut self, cluster: &dyn ClusterOps) -> bool {
        let reply = if let Some(why) = self.failed.take() {
            Reply::result(Code::Failed, why)
        } else {
            match self.exec.poll(cluster) {
                CommandPoll::Pending if Instant::now() < self.deadline => return false,
                CommandPoll::Pending => {
                    self.exec.cancel(cluster);
                    self.exec.command.timed_out(cluster)
                }
                CommandPoll::Refused(why) => Reply::result(Code::WrongRole, why),
                CommandPoll::Done { took } => self.exec.command.done(cluster, took),
            }
        };
        emit(&self.watchers, &reply);
        true
    }

    /// An engine died: if the command needs it, it fails (and is withdrawn if not taken:
    /// a failover overtook it).
    pub(crate) fn on_death(
        &mut self,
        cluster: &dyn ClusterOps,
        slot: usize,
        successor: Option<usize>,
    ) {
        if self.exec.command.involves(slot) {
            self.exec.cancel(cluster);
            self.failed = Some(self.exec.command.died(slot, successor));
        }
    }
}

/// Logs that a refused command is asked once more.
pub(super) fn warn_asked_again(what: &str) {
    warn!("{what}: asked once more");
}
