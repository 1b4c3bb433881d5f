//! The upgrade's acceptance: the bounds an upgrade is judged by, and the soak that judges
//! the new active by them (its errors, latency, refusals and the operator's `accept_cmd`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Instant;

use understudy_control::control::{slot_name, Field};

use crate::cluster::ClusterOps;
use crate::config::{AcceptanceConfig, ClusterConfig};
use crate::plan::Verdict;
use crate::proto::UpgradeRequest;

/// The acceptance bounds of one upgrade: the `[acceptance]` of the config file the operator
/// named (`request.config_toml`, refused if it differs from the running config anywhere else)
/// or of the running config, then every bound the request gives in place of the config's.
pub(crate) fn upgrade_acceptance(
    running: &ClusterConfig,
    request: &UpgradeRequest,
) -> Result<AcceptanceConfig, String> {
    let mut a = match &request.config_toml {
        None => running.acceptance.clone(),
        Some(text) => {
            let named = ClusterConfig::from_str(text, "the config file given to `upgrade`")
                .map_err(|e| format!("upgrade refused, nothing done: {e}"))?;
            let mut other = crate::reload::fixed_changes(running, &named);
            other.extend(
                crate::reload::live_changes(running, &named)
                    .into_iter()
                    .filter(|(field, ..)| !field.starts_with("acceptance")),
            );
            if !other.is_empty() {
                let what: Vec<String> = other
                    .iter()
                    .map(|(f, a, b)| format!("`{f}` (running {a}, file {b})"))
                    .collect();
                return Err(format!(
                    "upgrade refused, nothing done: the config file given differs from the running config outside [acceptance]: {}; `upgrade` takes only the file's [acceptance] (apply the rest with `understudy reload`, or name the running config)",
                    what.join(", ")
                ));
            }
            named.acceptance
        }
    };
    if let Some(ms) = request.accept_for_ms {
        a.accept_for_ms = ms;
    }
    if let Some(cmd) = &request.accept_cmd {
        a.accept_cmd = Some(cmd.clone());
    }
    if let Some(rate) = request.max_error_rate {
        a.max_error_rate = rate;
    }
    if let Some(count) = request.count_refusals {
        a.count_refusals = count;
    }
    if let Some(us) = request.max_latency_us_p99 {
        a.max_latency_us_p99 = us;
    }
    Ok(a)
}

/// The soak of the new active: watched until `until`, then judged.
pub(crate) struct Soak {
    pub(crate) slot: usize,
    until: Instant,
    accept_for_ms: u64,
    /// The operator's accept command, once started.
    pub(crate) cmd: Option<Child>,
    /// (requests, refusals) of the new active when the soak began.
    base: (u64, u64),
    /// The worst service-time p99 the engine published during the soak, ns.
    worst_p99_ns: u64,
}

/// What a turn of the soak came to.
pub(crate) enum SoakPoll {
    /// Still watching, or the accept command still runs.
    Pending,
    /// The verdict.
    Verdict(Verdict),
    /// The accept command outlived the action's deadline (it was killed).
    TimedOut,
}

impl Soak {
    /// Begins the soak of the active in `slot` for `accept_for_ms`.
    pub(crate) fn begin(cluster: &dyn ClusterOps, slot: usize, accept_for_ms: u64) -> Soak {
        let control = cluster.control();
        Soak {
            slot,
            until: Instant::now() + std::time::Duration::from_millis(accept_for_ms),
            accept_for_ms,
            cmd: None,
            base: (
                control.get(slot, Field::Requests),
                control.get(slot, Field::Refusals),
            ),
            worst_p99_ns: 0,
        }
    }

    /// One turn: `abort` rejects at once; `late` is past the action's deadline.
    pub(crate) fn poll(
        &mut self,
        cluster: &dyn ClusterOps,
        acceptance: &AcceptanceConfig,
        accept_cmd: Option<&str>,
        abort: Option<&str>,
        late: bool,
    ) -> SoakPoll {
        let slot = self.slot;
        let reject = |reason: String| SoakPoll::Verdict(Verdict::Rejected { reason });
        if let Some(why) = abort {
            self.kill_cmd();
            return reject(why.to_owned());
        }
        // A rejection kills the accept command too, if it runs (with whatever it started).
        if let Err(reason) = self.watch(cluster, acceptance) {
            self.kill_cmd();
            return reject(reason);
        }
        if Instant::now() < self.until {
            return SoakPoll::Pending;
        }
        if let Err(reason) = self.judge_traffic(cluster, acceptance) {
            self.kill_cmd();
            return reject(reason);
        }
        let Some(accept_cmd) = accept_cmd else {
            return SoakPoll::Verdict(Verdict::Accepted);
        };
        if self.cmd.is_none() {
            match Command::new("/bin/sh")
                .arg("-c")
                .arg(accept_cmd)
                .env("UNDERSTUDY_DIR", cluster.dir())
                .env("UNDERSTUDY_ACTIVE_SLOT", slot_name(slot).to_string())
                // Its own process group: on a timeout or an abort the whole command (the
                // shell and whatever it started) is killed, not the shell alone.
                .process_group(0)
                .spawn()
            {
                Ok(child) => self.cmd = Some(child),
                Err(e) => return reject(format!("cannot run accept command `{accept_cmd}`: {e}")),
            }
        }
        let child = self.cmd.as_mut().expect("spawned");
        match child.try_wait() {
            Ok(Some(status)) if status.success() => SoakPoll::Verdict(Verdict::Accepted),
            Ok(Some(status)) => reject(format!("accept command `{accept_cmd}` failed ({status})")),
            Err(e) => reject(format!("accept command `{accept_cmd}`: {e}")),
            Ok(None) if late => {
                kill_group(child);
                SoakPoll::TimedOut
            }
            Ok(None) => SoakPoll::Pending,
        }
    }

    /// During the soak: the engine reports no error, stays active, and serves within the
    /// latency bound.
    fn watch(
        &mut self,
        cluster: &dyn ClusterOps,
        acceptance: &AcceptanceConfig,
    ) -> Result<(), String> {
        let slot = self.slot;
        let control = cluster.control();
        let error = control.get(slot, Field::Error);
        if error != 0 {
            return Err(format!("engine {} reported error {error}", slot_name(slot)));
        }
        if !cluster.is_active(slot) {
            return Err(format!("engine {} is no longer active", slot_name(slot)));
        }
        self.worst_p99_ns = self
            .worst_p99_ns
            .max(control.get(slot, Field::ServiceP99Ns));
        if self.worst_p99_ns > acceptance.max_latency_us_p99 * 1000 {
            return Err(format!(
                "engine {}: request service time p99 {} µs, expected at most {} µs (acceptance.max_latency_us_p99)",
                slot_name(slot),
                self.worst_p99_ns / 1000,
                acceptance.max_latency_us_p99
            ));
        }
        Ok(())
    }

    /// At the end of the soak: the engine served traffic, and refused no more of it than
    /// the bound (when refusals count).
    fn judge_traffic(
        &self,
        cluster: &dyn ClusterOps,
        acceptance: &AcceptanceConfig,
    ) -> Result<(), String> {
        let slot = self.slot;
        let control = cluster.control();
        let requests = control
            .get(slot, Field::Requests)
            .saturating_sub(self.base.0);
        let refusals = control
            .get(slot, Field::Refusals)
            .saturating_sub(self.base.1);
        let soak_ms = self.accept_for_ms;
        if requests == 0 && soak_ms > 0 {
            // No request served is no evidence that the new version works.
            return Err(format!(
                "not enough evidence: engine {} served no request during the {soak_ms} ms acceptance window (acceptance.accept_for_ms); an upgrade is accepted only on traffic",
                slot_name(slot)
            ));
        }
        // A handler's business refusal is the application working, not failing: it counts
        // only if the config says so (engine failures reject during the soak).
        if requests > 0 && acceptance.count_refusals {
            let rate = refusals as f64 / requests as f64;
            if rate > acceptance.max_error_rate {
                return Err(format!(
                    "engine {}: {refusals} of {requests} requests refused ({:.2}%), expected at most {:.2}% (acceptance.max_error_rate)",
                    slot_name(slot),
                    rate * 100.0,
                    acceptance.max_error_rate * 100.0
                ));
            }
        }
        Ok(())
    }

    /// Kills the accept command, if it runs.
    pub(crate) fn kill_cmd(&mut self) {
        if let Some(mut c) = self.cmd.take() {
            kill_group(&mut c);
        }
    }
}

/// SIGKILLs the process group `child` leads (it was spawned with `process_group(0)`), then
/// reaps `child`.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        // The group is ours as long as its leader is unreaped: it is reaped only below.
        // SAFETY: killpg has no memory-safety preconditions.
        unsafe { libc::killpg(pgid, libc::SIGKILL) };
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::fake::FakeCluster;
    use std::time::Duration;
    use understudy_control::control::{Role, State};

    /// A bound on each wait below, failing with a message: not a timing.
    const WAIT_MAX: Duration = Duration::from_secs(10);

    #[test]
    fn a_rejection_during_the_accept_command_kills_it_and_what_it_started() {
        // Proves that when the soak rejects the new active (here: it lost its role) while the
        // accept command runs, the command's process group is killed, so a process it started
        // in the background is not left behind (before, only a timeout or an abort killed it).
        let fake = FakeCluster::serving();
        let acceptance = AcceptanceConfig::default();
        let pidfile = fake.dir().join("child.pid");
        let cmd = format!("sleep 600 & echo $! > {}; wait", pidfile.display());
        let mut soak = Soak::begin(&fake, 0, 0);
        let started = Instant::now();
        let pid: u32 = loop {
            let turn = soak.poll(&fake, &acceptance, Some(&cmd), None, false);
            assert!(
                matches!(turn, SoakPoll::Pending),
                "expected the command running"
            );
            let written = std::fs::read_to_string(&pidfile).unwrap_or_default();
            if let Ok(pid) = written.trim().parse() {
                break pid;
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "the accept command never started"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        fake.write(0, Role::Standby, State::Hot);
        let turn = soak.poll(&fake, &acceptance, Some(&cmd), None, false);
        assert!(
            matches!(turn, SoakPoll::Verdict(Verdict::Rejected { .. })),
            "expected a rejection once engine a is no longer active"
        );
        assert!(soak.cmd.is_none(), "expected the accept command reaped");
        let killed = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                break;
            }
            if killed.elapsed() > WAIT_MAX {
                // Do not leave it behind either way.
                // SAFETY: kill(2) of the sleep this test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                panic!("expected the command's background sleep {pid} dead, found: {stat}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
