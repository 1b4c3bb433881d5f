//! One action of the upgrade plan being performed against the cluster: begun, polled once
//! per turn until it ends in an [`Event`] for the plan, or abandoned.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::slot_name;

use super::accept::{Soak, SoakPoll};
use super::command::{CommandExec, CommandPoll};
use super::enable::Enable;
use super::slot_of;
use super::switchover::Switchover;
use crate::cluster::ClusterOps;
use crate::config::{check_binary, AcceptanceConfig};
use crate::plan::{Action, Event, Planned};

/// One plan action being performed.
pub(super) struct Exec {
    pub(super) planned: Planned,
    pub(super) started: Instant,
    deadline: Instant,
    phase: Phase,
}

pub(super) enum Phase {
    Stop {
        slot: usize,
        killed: bool,
    },
    Start {
        slot: usize,
        /// The binary, until it is spawned: the slot's previous engine was still exiting.
        waiting: Option<PathBuf>,
    },
    Attach {
        standby: usize,
        active: usize,
    },
    Switchover(CommandExec<Switchover>),
    Accept(Soak),
    Enable(CommandExec<Enable>),
}

/// What the acceptance soak is judged by: the upgrade's bounds, its accept command, and an
/// operator's abort.
pub(super) struct Judged<'a> {
    pub(super) acceptance: &'a AcceptanceConfig,
    pub(super) accept_cmd: Option<&'a str>,
    pub(super) abort: Option<&'a str>,
}

/// What a turn of an action came to.
pub(super) enum Polled {
    /// It goes on.
    Pending,
    /// It goes on, with the engine it was waiting to start now started (to be recorded).
    Spawned,
    /// It ended.
    Ended(Event),
}

impl From<Option<Event>> for Polled {
    fn from(event: Option<Event>) -> Polled {
        event.map_or(Polled::Pending, Polled::Ended)
    }
}

impl Exec {
    /// `planned`, begun as `phase`, with its deadline.
    pub(super) fn new(planned: Planned, phase: Phase) -> Exec {
        Exec {
            deadline: Instant::now() + Duration::from_millis(planned.timeout_ms),
            started: Instant::now(),
            planned,
            phase,
        }
    }

    /// The sequence number of the cluster command it posted, if any (for the record).
    pub(super) fn command_seq(&self) -> Option<u64> {
        match &self.phase {
            Phase::Switchover(sw) => sw.seq(),
            Phase::Enable(en) => en.seq(),
            _ => None,
        }
    }

    /// Begins `planned`: its phase, or why it cannot begin.
    pub(super) fn start(cluster: &mut dyn ClusterOps, planned: &Planned) -> Result<Phase, String> {
        Ok(match &planned.action {
            Action::Stop { slot } => {
                let slot = slot_of(*slot);
                if cluster.is_active(slot) {
                    return Err(format!(
                        "engine {} is active; it is not stopped",
                        slot_name(slot)
                    ));
                }
                cluster.request_stop(slot);
                Phase::Stop {
                    slot,
                    killed: false,
                }
            }
            Action::Start { slot, binary, .. } => {
                let slot = slot_of(*slot);
                check_binary(binary).map_err(|e| e.to_string())?;
                match cluster.engine(slot) {
                    // Told to stop or killed (an engine that never registered, timed out a
                    // moment ago): the slot is free once it has exited, within the action's
                    // timeout.
                    Some(p) if p.expected_exit || p.fenced => {
                        info!(slot = %slot_name(slot), pid = p.pid(), "waiting for the slot's previous engine to exit before starting");
                        return Ok(Phase::Start {
                            slot,
                            waiting: Some(binary.clone()),
                        });
                    }
                    Some(p) => {
                        return Err(format!(
                            "slot {} is still taken by pid {}, which was not told to stop",
                            slot_name(slot),
                            p.pid()
                        ))
                    }
                    None => {}
                }
                cluster
                    .spawn(slot, binary, true)
                    .map_err(|e| e.to_string())?;
                Phase::Start {
                    slot,
                    waiting: None,
                }
            }
            Action::Attach { standby, active } => Phase::Attach {
                standby: slot_of(*standby),
                active: slot_of(*active),
            },
            Action::Switchover { from, to } => Phase::Switchover(CommandExec::post(
                cluster,
                Switchover::new(slot_of(*from), slot_of(*to)),
            )),
            Action::Accept {
                active,
                accept_for_ms,
            } => Phase::Accept(Soak::begin(cluster, slot_of(*active), *accept_for_ms)),
            Action::EnableFeatures { active, standby } => {
                let enable = Enable::new(cluster, slot_of(*active), slot_of(*standby));
                Phase::Enable(CommandExec::post(cluster, enable))
            }
        })
    }

    /// One turn of the action.
    pub(super) fn poll(&mut self, cluster: &mut dyn ClusterOps, judged: &Judged<'_>) -> Polled {
        let id = self.planned.id;
        let late = Instant::now() > self.deadline;
        let event = match &mut self.phase {
            Phase::Stop { slot, killed } => {
                if cluster.engine(*slot).is_none() {
                    return Polled::Ended(Event::Done { id });
                }
                if late && !*killed {
                    warn!(slot = %slot_name(*slot), "engine did not stop in time; SIGKILL");
                    cluster.kill_expected(*slot);
                    *killed = true;
                }
                None
            }
            Phase::Start { slot, waiting } => {
                if let Some(binary) = waiting.as_ref() {
                    if cluster.engine(*slot).is_some() {
                        return Polled::from(late.then_some(Event::TimedOut { id }));
                    }
                    if let Err(e) = cluster.spawn(*slot, binary, true) {
                        return Polled::Ended(Event::Failed {
                            id,
                            error: e.to_string(),
                        });
                    }
                    *waiting = None;
                    return Polled::Spawned;
                }
                if cluster.ours(*slot) {
                    return Polled::Ended(Event::Done { id });
                }
                if late {
                    cluster.kill_expected(*slot);
                    return Polled::Ended(Event::TimedOut { id });
                }
                None
            }
            Phase::Attach { standby, active } => {
                if cluster.is_hot_standby(*standby) && cluster.is_active(*active) {
                    return Polled::Ended(Event::Done { id });
                }
                late.then_some(Event::TimedOut { id })
            }
            Phase::Switchover(sw) => match sw.poll(cluster) {
                CommandPoll::Done { took } => {
                    info!(pause_us_max = took.as_micros() as u64, "switched over");
                    Some(Event::Done { id })
                }
                CommandPoll::Refused(error) => Some(Event::Failed { id, error }),
                CommandPoll::Pending if late => {
                    sw.cancel(cluster);
                    Some(Event::TimedOut { id })
                }
                CommandPoll::Pending => None,
            },
            Phase::Accept(soak) => match soak.poll(
                cluster,
                judged.acceptance,
                judged.accept_cmd,
                judged.abort,
                late,
            ) {
                SoakPoll::Pending => None,
                SoakPoll::Verdict(verdict) => Some(Event::Verdict { id, verdict }),
                SoakPoll::TimedOut => Some(Event::TimedOut { id }),
            },
            Phase::Enable(en) => match en.poll(cluster) {
                CommandPoll::Done { .. } => Some(Event::Done { id }),
                CommandPoll::Refused(error) => Some(Event::Failed { id, error }),
                CommandPoll::Pending => late.then_some(Event::TimedOut { id }),
            },
        };
        Polled::from(event)
    }

    /// Abandons the action: an accept command is killed, a command not taken withdrawn.
    pub(super) fn cancel(self, cluster: &dyn ClusterOps) {
        match self.phase {
            Phase::Accept(mut soak) => soak.kill_cmd(),
            Phase::Switchover(sw) => sw.cancel(cluster),
            _ => {}
        }
    }
}
