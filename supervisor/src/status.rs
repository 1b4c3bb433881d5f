//! The `status` report: each engine's line (as the control block gives it, for an engine that
//! is the supervisor's own) and the supervisor's bookkeeping (the operation in progress,
//! restarts, role changes, foreign engines).

use understudy_control::control::{monotonic_ns, slot_name, Field, Role, State, SLOTS};

use crate::cluster::{Cluster, ClusterOps};
use crate::foreign::ForeignWatch;
use crate::process::EngineProc;
use crate::proto::{EngineStatus, StatusReport};
use crate::restarts::Restarts;
use crate::watch::{Rates, RoleWatch};

/// What the supervisor's loop reports beside the cluster.
pub(crate) struct Bookkeeping<'a> {
    /// The operation in progress, described.
    pub(crate) operation: Option<String>,
    pub(crate) restarts: &'a Restarts,
    pub(crate) roles: &'a RoleWatch,
    pub(crate) rates: &'a Rates,
    pub(crate) foreign: &'a ForeignWatch,
}

/// A snapshot for `status`: the cluster, and the loop's own bookkeeping.
pub(crate) fn report(cluster: &Cluster, books: &Bookkeeping<'_>) -> StatusReport {
    let engines = (0..SLOTS)
        .filter_map(|slot| {
            let proc = cluster.engines[slot].as_ref()?;
            Some(engine_status(cluster, books.rates, slot, proc))
        })
        .collect();
    StatusReport {
        cluster: cluster.config.cluster.clone(),
        dir: cluster.dir.clone(),
        supervisor_pid: std::process::id(),
        epoch: cluster.control.epoch(),
        active: cluster.active().map(|s| slot_name(s).to_string()),
        engines,
        operation: books.operation.clone(),
        crash_looping: books.restarts.given_up(),
        restarts: books.restarts.report(&cluster.config.restart),
        role_changes: books.roles.changes(),
        interrupted_upgrade: cluster.outcomes.interrupted.clone(),
        foreign_engines: books.foreign.report(cluster),
    }
}

/// The `status` line of the engine `proc` in `slot`.
fn engine_status(cluster: &Cluster, rates: &Rates, slot: usize, proc: &EngineProc) -> EngineStatus {
    let ours = cluster.ours(slot);
    let get = |f| {
        if ours {
            cluster.control.get(slot, f)
        } else {
            0
        }
    };
    EngineStatus {
        slot: slot_name(slot).to_string(),
        pid: proc.pid(),
        role: cluster.role(slot).name().to_string(),
        epoch: get(Field::Epoch),
        app_version: get(Field::AppVersion),
        layout_version: get(Field::Layout),
        features: get(Field::Features),
        enableable: get(Field::Enableable),
        state: if ours {
            cluster.state(slot).name().to_string()
        } else {
            State::Starting.name().to_string()
        },
        // Only a standby's lag and only an active's rate mean anything; the slot's
        // fields keep what an earlier role left there.
        lag_bytes: if cluster.role(slot) == Role::Standby {
            get(Field::LagBytes)
        } else {
            0
        },
        commits: get(Field::Commits),
        requests_per_s: if cluster.role(slot) == Role::Active {
            rates.per_s(slot)
        } else {
            0.0
        },
        requests: get(Field::Requests),
        step_ups: get(Field::StepUps),
        last_step_up_ns: get(Field::LastStepUpNs),
        last_step_up_dur_ns: get(Field::LastStepUpDurNs),
        digest: get(Field::Digest),
        binary: proc.binary.clone(),
        heartbeat_age_ms: if ours {
            cluster.heartbeat_age_ns(slot, monotonic_ns()) / 1_000_000
        } else {
            0
        },
    }
}

/// One line summing up a status report.
pub fn status_summary(report: &StatusReport) -> String {
    let standbys = report.hot_standbys().count();
    match &report.active {
        Some(a) => format!(
            "cluster {}: engine {a} active in epoch {}, {standbys} hot standby(s)",
            report.cluster, report.epoch
        ),
        None => format!(
            "cluster {}: no engine is active (epoch {})",
            report.cluster, report.epoch
        ),
    }
}
