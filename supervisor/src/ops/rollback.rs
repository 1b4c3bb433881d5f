//! `rollback` with no upgrade in progress: an upgrade back to the binary of the last
//! completed upgrade, if its features were left off. (During an upgrade, `rollback` aborts
//! it instead: [`UpgradeRun::request_abort`].)

use std::sync::mpsc::Sender;

use understudy_control::control::Field;

use super::upgrade::UpgradeRun;
use crate::cluster::ClusterOps;
use crate::proto::{Code, Reply, UpgradeRequest};

/// The rollback as an upgrade run, or the reply that refuses it.
pub(crate) fn begin(
    cluster: &mut dyn ClusterOps,
    reply: Sender<Reply>,
) -> Result<UpgradeRun, Reply> {
    let Some((old, _new)) = cluster.outcomes().last_upgrade.clone() else {
        return Err(Reply::result(
            Code::WrongRole,
            "nothing to roll back: no upgrade is in progress and none completed since this supervisor started",
        ));
    };
    let features = cluster
        .active()
        .map_or(0, |a| cluster.control().get(a, Field::Features));
    if features != 0 {
        return Err(Reply::result(
            Code::WrongRole,
            format!(
                "cannot roll back: new features are enabled (mask {features:#x}) and the old version cannot read their records"
            ),
        ));
    }
    let request = UpgradeRequest {
        binary: old,
        accept_for_ms: Some(0),
        accept_cmd: None,
        keep_standby: false,
        no_enable: true,
        ..Default::default()
    };
    UpgradeRun::begin(cluster, request, reply).map(|mut r| {
        r.accept_cmd = None;
        r.rollback = true;
        r
    })
}
