//! `down`: standbys first (a stopping active would make its standby step up), then the
//! active, then the shared files; each engine told to stop, SIGKILLed at `shutdown_ms`.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use tracing::{info, warn};
use understudy_control::control::{slot_name, ClusterState, SLOTS};

use super::emit;
use crate::cluster::ClusterOps;
use crate::proto::{Code, Reply};

/// How long, after its result, `down` waits for the socket threads to have written it.
const FLUSH_FOR: Duration = Duration::from_secs(2);

/// `down` in progress.
pub(crate) struct DownOp {
    active_stopping: bool,
    deadline: Instant,
    watchers: Vec<Sender<Reply>>,
    /// The result is sent: until when the supervisor waits for the socket threads to have
    /// written it (it exits after `down`, and a result still in a channel would be lost).
    flushing_until: Option<Instant>,
}

impl DownOp {
    /// Marks the cluster down and tells the standbys to stop.
    pub(crate) fn begin(cluster: &mut dyn ClusterOps, reply: Sender<Reply>) -> DownOp {
        // Clients learn it at their next poll (`ClientError::ClusterDown`), not by silence.
        cluster.control().set_cluster_state(ClusterState::Down);
        *cluster.managed_mut() = [false; SLOTS];
        let active = cluster.active();
        for slot in 0..SLOTS {
            if Some(slot) != active {
                cluster.request_stop(slot);
            }
        }
        emit(
            std::slice::from_ref(&reply),
            &Reply::event("stopping the standbys", serde_json::Value::Null),
        );
        DownOp {
            active_stopping: false,
            deadline: Instant::now() + cluster.config().timeouts.shutdown(),
            watchers: vec![reply],
            flushing_until: None,
        }
    }

    /// One turn; `true` once the result is written (the supervisor then exits).
    pub(crate) fn step(&mut self, cluster: &mut dyn ClusterOps) -> bool {
        if let Some(until) = self.flushing_until {
            // A socket thread drops its receiver once it has written the result line: until
            // then a probe is accepted (and never written: the thread stops reading at the
            // result).
            let probe = Reply::event("flushing", serde_json::Value::Null);
            self.watchers.retain(|w| w.send(probe.clone()).is_ok());
            if self.watchers.is_empty() || Instant::now() > until {
                cluster.outcomes().finished = true;
                return true;
            }
            return false;
        }
        let running: Vec<usize> = (0..SLOTS)
            .filter(|&s| {
                cluster.engine(s).is_some() && (self.active_stopping || !cluster.is_active(s))
            })
            .collect();
        if !running.is_empty() {
            if Instant::now() > self.deadline {
                for slot in running {
                    warn!(slot = %slot_name(slot), "engine did not stop in time; SIGKILL");
                    cluster.kill_expected(slot);
                }
                self.deadline = Instant::now() + cluster.config().timeouts.shutdown();
            }
            return false;
        }
        if !self.active_stopping {
            self.active_stopping = true;
            if let Some(active) = cluster.active() {
                emit(
                    &self.watchers,
                    &Reply::event(
                        format!("stopping the active engine {}", slot_name(active)),
                        serde_json::Value::Null,
                    ),
                );
                cluster.request_stop(active);
            }
            self.deadline = Instant::now() + cluster.config().timeouts.shutdown();
            return false;
        }
        let reply = remove_files(cluster);
        info!("{}", reply.message);
        emit(&self.watchers, &reply);
        self.flushing_until = Some(Instant::now() + FLUSH_FOR);
        false
    }
}

/// Every engine has stopped: the cluster's files go.
fn remove_files(cluster: &dyn ClusterOps) -> Reply {
    let name = &cluster.config().cluster;
    let dir = cluster.dir();
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Reply::result(
            Code::Ok,
            format!("cluster {name} stopped; removed {}", dir.display()),
        ),
        Err(e) => Reply::result(
            Code::Failed,
            format!(
                "cluster {name} stopped, but {} could not be removed: {e}",
                dir.display()
            ),
        ),
    }
}
