//! The supervisor process (`understudy up`): starts the engines, keeps them so, and serves the
//! control socket.
//!
//! One thread owns every engine and the control block and runs a loop: wait (at most a couple
//! of milliseconds) on the pidfds of every engine, handle deaths, take requests from the socket
//! threads, fence hung engines, report role changes, advance the long operation in progress
//! (switchover, upgrade, enable, down) and restart dead engines. Operations never block the
//! loop: each one is a small state machine polled once per turn, so a death is seen — and an
//! upgrade told of it — within a turn whatever else is going on.
//!
//! The supervisor is not in the failover path: a standby watches its active itself and steps
//! up without it. The supervisor only restarts the dead engine as the new standby (with
//! crash-loop backoff), and a restarted supervisor re-adopts the engines the control block
//! lists instead of starting new ones. If its predecessor stopped in the middle of an upgrade
//! (the [`crate::record`] in the cluster directory says so), it settles that upgrade
//! before anything else and never continues it: see [`UpgradePlan::resume`](crate::plan::UpgradePlan::resume).
//!
//! Two rules bound every destructive decision (a fence, a "state is lost" outage):
//! - **The last copy is sacred.** A hung active is fenced only if a hot standby can take
//!   over; a hung standby only while another engine verifiably serves. With the active dead,
//!   a stalled standby that was hot in the epoch holds every committed transaction: it is
//!   reported and waited for, and steps up when it runs again.
//! - **The control block is verified, not trusted.** Before acting on it, the supervisor
//!   checks it against what it knows itself (module `verify`): the pidfd and `/proc`
//!   identity of each engine it watches, which of them holds the active's robust mutex, and
//!   the heartbeat word as it saw it change. A flipped word never kills a serving engine or
//!   declares a serving cluster lost.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};
use understudy_control::control::{slot_name, Control, Field, Role, SlotCommand, State, SLOTS};
use understudy_control::liveness::ProcessIdentity;

use crate::cluster::{Cluster, ClusterOps};
use crate::config::ClusterConfig;
use crate::fence::Fence;
use crate::foreign::ForeignWatch;
use crate::ops::{Operation, ResumeOp, Stepped};
use crate::process::{self, EngineProc, ExitInfo};
use crate::proto::{Code, InterruptedUpgrade, Reply, Request, StatusReport};
use crate::record;
use crate::restarts::{killed_by_signal, Restarts};
use crate::socket::Inbound;
pub use crate::status::status_summary;
use crate::status::Bookkeeping;
use crate::verify;
use crate::watch::{ControlCheck, HotWatch, Rates, RoleWatch};

pub use crate::process::HUNG_BEATS;
pub use crate::up_error::UpError;

/// How often a fresh start looks whether engine `a` became active.
const START_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How long a failed start waits for each engine it killed to exit.
const ABANDON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a failed start looks whether a killed engine has exited.
const EXIT_POLL_INTERVAL: Duration = Duration::from_millis(2);
/// The loop's turn while an operation runs: role changes are watched closely.
const OPERATION_TURN: Duration = Duration::from_micros(100);
/// The loop's turn otherwise: the longest it waits for an engine's exit.
const IDLE_TURN: Duration = Duration::from_millis(2);
/// How often the supervisor looks for the engine that stepped up after an active died.
const SUCCESSOR_POLL_INTERVAL: Duration = Duration::from_micros(200);

/// The supervisor's state; see the [module docs](self).
pub struct Supervisor {
    /// The cluster: config, directory, control block, engines and managed slots; lent to
    /// the operation in progress.
    pub(crate) cluster: Cluster,
    /// This supervisor found no live engine and started the cluster itself: only then may a
    /// failed `up` remove the cluster's files (re-adopted engines still run on them).
    pub(crate) fresh: bool,
    restarts: Restarts,
    /// Who is hung or superseded, and what was reported of it.
    fence: Fence,
    /// Which engines hold the last copy of the state if the active dies.
    hot: HotWatch,
    /// "Waiting for the last copy" has been reported (once per episode).
    last_copy_reported: bool,
    pub(crate) op: Option<Operation>,
    /// The role changes seen, for `status`.
    roles: RoleWatch,
    /// The actives' request rates, for `status`.
    rates: Rates,
    /// The control block's checked words, verified every 100 ms.
    control_check: ControlCheck,
    outage_reported: bool,
    /// Since when no engine has been active (an outage once it outlasts the switchover
    /// timeout).
    no_active_since: Option<Instant>,
    /// Live engines registered in slots the supervisor did not start them in.
    foreign: ForeignWatch,
}

/// Runs the supervisor in the foreground until `down` or SIGINT/SIGTERM (which leave the
/// engines running, for a later `up` to re-adopt).
///
/// The shared-memory directory and the cluster directory are created private or verified so
/// ([`shm_layout::trust`]) before anything is read from them or run; an `up` that fails
/// before it serves stops the engines it started and removes what it created.
pub fn up(config: ClusterConfig) -> Result<(), UpError> {
    config.check_binary().map_err(UpError::Config)?;
    config.check_host().map_err(UpError::Config)?;
    // The shm directory may be shared (`/dev/shm` itself: sticky, owned by root); the
    // cluster directory below it must be private.
    let created_shm_dir = std::fs::symlink_metadata(&config.shm_dir).is_err();
    let dir = config.cluster_dir();
    let created_dir = shm_layout::trust::ensure_private_dir(&dir).map_err(UpError::Trust)?;
    let remove_created = || {
        if created_dir {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if created_shm_dir {
            // Only if nothing else was made in it meanwhile.
            let _ = std::fs::remove_dir(dir.parent().unwrap_or(&dir));
        }
    };
    crate::signals::install();
    let mut sup = match Supervisor::start(config) {
        Ok(sup) => sup,
        Err(e) => {
            remove_created();
            return Err(e);
        }
    };
    let (listener, socket) = match crate::socket::bind(&sup.cluster.dir) {
        Ok(bound) => bound,
        Err(e) => {
            if sup.started_fresh() {
                sup.abandon_fresh();
                remove_created();
            }
            return Err(UpError::Io(e));
        }
    };
    let (tx, rx) = mpsc::channel::<Inbound>();
    std::thread::Builder::new()
        .name("control-socket".into())
        .spawn(move || crate::socket::serve(listener, tx))
        .map_err(|e| UpError::Io(format!("cannot start the socket thread: {e}")))?;
    info!(socket = %socket.display(), "control socket ready");
    // Operations: the Prometheus endpoint and systemd notifications, each off unless asked.
    let _ = crate::metrics::configure(
        &sup.cluster.config.metrics,
        &sup.cluster.dir,
        &sup.cluster.config.cluster,
    );
    let _systemd = crate::systemd::Notifier::start(sup.cluster.control.clone());
    sup.run(&rx);
    if !sup.cluster.outcomes.finished {
        let _ = std::fs::remove_file(&socket);
        sup.cluster.control.release_supervisor(std::process::id());
        info!("supervisor exits; the engines keep running (`understudy up` re-adopts them, `understudy down` stops them)");
    }
    Ok(())
}

impl Supervisor {
    /// Opens (or creates) the cluster, adopts its live engines or starts `a` then `b`.
    pub fn start(config: ClusterConfig) -> Result<Supervisor, UpError> {
        let dir = config.cluster_dir();
        shm_layout::trust::ensure_private_dir(&dir).map_err(UpError::Trust)?;
        let mut control = Control::open_or_create(&dir).map_err(UpError::Control)?;
        let me = ProcessIdentity::current().map_err(|e| UpError::Io(e.to_string()))?;
        // Before anything is touched (a leftover cluster's files are removed below): the
        // authoritative claim is the compare-and-swap further down.
        let other = control.supervisor();
        if let Some(pid) = other.pid().filter(|&p| p != me.pid && other.is_alive()) {
            return Err(UpError::AlreadyRunning { pid });
        }
        let mut live = Vec::new();
        for slot in 0..SLOTS {
            let Some(identity) = control.registered(slot) else {
                continue;
            };
            if identity.is_alive() {
                live.push((slot, identity));
            }
        }
        if live.is_empty() && dir.join(record::RECORD_FILE).exists() {
            warn!("an upgrade record was left by a supervisor whose engines have all died since: there is nothing to settle; removing it");
            if let Err(e) = record::remove(&dir) {
                return Err(UpError::Io(e.to_string()));
            }
        }
        if live.is_empty() && control.epoch() > 0 {
            warn!(dir = %dir.display(), epoch = control.epoch(), "the cluster's files are left from engines that all died; removing them and starting afresh");
            drop(control);
            std::fs::remove_dir_all(&dir)
                .map_err(|e| UpError::Io(format!("cannot remove {}: {e}", dir.display())))?;
            control = Control::open_or_create(&dir).map_err(UpError::Control)?;
        }
        control
            .claim_supervisor(me.pid, me.start_time_ticks)
            .map_err(|taken| UpError::AlreadyRunning {
                pid: taken.holder.pid().unwrap_or(0),
            })?;
        let roles = RoleWatch::new(&control);
        let mut sup = Supervisor {
            cluster: Cluster::new(config, dir, control),
            fresh: live.is_empty(),
            restarts: Default::default(),
            fence: Fence::default(),
            hot: HotWatch::default(),
            last_copy_reported: false,
            op: None,
            roles,
            rates: Rates::new(),
            control_check: ControlCheck::new(),
            outage_reported: false,
            no_active_since: None,
            foreign: ForeignWatch::new(),
        };
        if live.is_empty() {
            if let Err(e) = sup.start_fresh() {
                sup.abandon_fresh();
                return Err(e);
            }
        } else {
            sup.adopt_live(live);
        }
        Ok(sup)
    }

    /// Watches the live engines a previous supervisor left (`live`) and settles what it had
    /// under way: a `down` it began, an upgrade it recorded.
    fn adopt_live(&mut self, live: Vec<(usize, ProcessIdentity)>) {
        for (slot, identity) in live {
            match EngineProc::adopt(slot, identity) {
                Ok(mut proc) => {
                    match process::spawned_binary(&self.cluster.dir, slot, &identity) {
                        Ok(Some(binary)) => proc.binary = binary,
                        Ok(None) => {}
                        Err(e) => {
                            warn!(slot = %slot_name(slot), "{e}; the engine's binary is taken from /proc, which misses a wrapper script")
                        }
                    }
                    info!(slot = %slot_name(slot), pid = identity.pid, binary = %proc.binary.display(), "re-adopted a running engine");
                    self.cluster.engines[slot] = Some(proc);
                    self.cluster.managed[slot] = true;
                }
                Err(e) => warn!(slot = %slot_name(slot), "cannot adopt engine: {e}"),
            }
        }
        // A `down` that a previous supervisor began and did not finish left the cluster
        // marked down: clients would be told `ClusterDown` by a cluster we now serve.
        if self.cluster.control.cluster_state() != Ok(understudy_control::control::ClusterState::Up)
        {
            self.cluster
                .control
                .set_cluster_state(understudy_control::control::ClusterState::Up);
        }
        self.cluster.ensure_two_managed();
        self.cluster.record_spawned();
        self.take_up_interrupted_upgrade();
    }

    /// An upgrade recorded as in progress by a previous supervisor is settled (never
    /// continued); a record that cannot be trusted is set aside and the cluster left as found.
    fn take_up_interrupted_upgrade(&mut self) {
        match record::load(&self.cluster.dir, &self.cluster.config.cluster) {
            Ok(None) => {}
            Ok(Some(found)) if found.outcome.is_some() => {
                let outcome = found.outcome.clone().unwrap_or_default();
                info!(
                    "the previous supervisor's upgrade had ended ({outcome}); removing its record"
                );
                if let Err(e) = record::remove(&self.cluster.dir) {
                    error!("{e}; remove it by hand");
                }
                self.cluster.outcomes.interrupted = Some(InterruptedUpgrade {
                    binary: Some(found.new_binary),
                    at: Some(found.progress),
                    decision: "none: it had ended before its supervisor stopped".into(),
                    outcome: Some(outcome),
                    code: None,
                });
            }
            Ok(Some(found)) => {
                let op = ResumeOp::begin(&mut self.cluster, found);
                self.op = Some(Operation::Resume(op));
            }
            Err(e) => {
                let aside = match record::set_aside(&self.cluster.dir) {
                    Ok(path) => format!("it was moved to {}", path.display()),
                    Err(e) => e.to_string(),
                };
                error!("{e}; an upgrade may have been left in the middle, and the cluster is left as found ({aside}); check `understudy status` and finish by hand");
                self.cluster.outcomes.interrupted = Some(InterruptedUpgrade {
                    binary: None,
                    at: None,
                    decision: format!("left as found: {e}; {aside}"),
                    outcome: Some("not settled: the operator takes over".into()),
                    code: Some(Code::Failed),
                });
            }
        }
    }

    fn start_fresh(&mut self) -> Result<(), UpError> {
        let binary = self.cluster.config.engine.binary.clone();
        self.cluster
            .spawn(0, &binary, false)
            .map_err(UpError::Spawn)?;
        let deadline = Instant::now() + self.cluster.config.timeouts.start();
        while !self.cluster.is_active(0) {
            if let Some(proc) = self.cluster.engines[0].as_mut() {
                if let Some(exit) = proc.exited() {
                    self.cluster.engines[0] = None;
                    return Err(UpError::Io(format!(
                        "engine a exited while starting ({exit}); check its log above"
                    )));
                }
            }
            if Instant::now() > deadline {
                // Killed here, reaped by `abandon_fresh`.
                if let Some(proc) = self.cluster.engines[0].as_ref() {
                    proc.kill();
                }
                return Err(UpError::NoActive {
                    timeout_ms: self.cluster.config.timeouts.start_ms,
                });
            }
            std::thread::sleep(START_POLL_INTERVAL);
        }
        info!(
            slot = "a",
            epoch = self.cluster.control.epoch(),
            "engine a is active"
        );
        self.roles = RoleWatch::new(&self.cluster.control);
        self.cluster
            .spawn(1, &binary, true)
            .map_err(UpError::Spawn)?;
        self.cluster.managed = [true, true, false];
        Ok(())
    }

    /// Every engine was started by this supervisor (none adopted): a fresh start.
    pub(crate) fn started_fresh(&self) -> bool {
        // Recorded, not inferred from the engines we hold: when every adoption failed we hold
        // none, and "all of none are our children" would remove the files of a live cluster.
        self.fresh
    }

    /// Undoes a fresh start that failed: kills the engines it started, waits for them (bounded)
    /// and removes the cluster's files (no engine of the cluster is alive, so they belong to
    /// nobody); the directory itself stays for the caller, who knows whether it made it.
    pub(crate) fn abandon_fresh(&mut self) {
        for slot in 0..SLOTS {
            if let Some(mut proc) = self.cluster.engines[slot].take() {
                proc.kill();
                let deadline = Instant::now() + ABANDON_EXIT_TIMEOUT;
                while proc.exited().is_none() && Instant::now() < deadline {
                    std::thread::sleep(EXIT_POLL_INTERVAL);
                }
            }
        }
        self.cluster.control.release_supervisor(std::process::id());
        match std::fs::read_dir(&self.cluster.dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let path = entry.path();
                    let removed = match entry.file_type() {
                        Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                        _ => std::fs::remove_file(&path),
                    };
                    if let Err(e) = removed {
                        warn!(file = %path.display(), "cannot remove a file of the failed start: {e}");
                    }
                }
            }
            Err(e) => {
                warn!(dir = %self.cluster.dir.display(), "cannot clean up after the failed start: {e}")
            }
        }
    }

    /// The loop; returns after `down` or a signal.
    pub fn run(&mut self, requests: &Receiver<Inbound>) {
        while !self.cluster.outcomes.finished && !crate::signals::received() {
            crate::systemd::loop_tick();
            if self.op.is_some() {
                // Role changes are watched closely while an operation runs.
                self.wait_for_exits(Duration::ZERO);
                std::thread::sleep(OPERATION_TURN);
            } else {
                self.wait_for_exits(IDLE_TURN);
            }
            for slot in 0..SLOTS {
                let exit = self.cluster.engines[slot].as_mut().and_then(|p| p.exited());
                if let Some(exit) = exit {
                    self.on_exit(slot, exit);
                }
            }
            while let Ok((request, reply)) = requests.try_recv() {
                self.on_request(request, reply);
            }
            self.resend_stops();
            self.hot.watch(&self.cluster);
            self.fence.fence(&mut self.cluster);
            self.control_check.check(&self.cluster.control);
            if self.roles.watch(&self.cluster.control) {
                self.outage_reported = false;
            }
            self.step_op();
            self.keep();
            self.rates.sample(&self.cluster);
            self.foreign.watch(&self.cluster);
        }
    }

    fn wait_for_exits(&self, timeout: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .cluster
            .engines
            .iter()
            .flatten()
            .map(|p| libc::pollfd {
                fd: std::os::fd::AsFd::as_fd(&p.pidfd).as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(timeout);
            return;
        }
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
    }

    fn on_exit(&mut self, slot: usize, exit: ExitInfo) {
        let was_active = self.cluster.role(slot) == Role::Active;
        let proc = self.cluster.engines[slot].take().expect("exited engine");
        self.fence.forget_hung(slot);
        if proc.expected_exit {
            info!(slot = %slot_name(slot), pid = proc.pid(), "engine exited ({exit})");
            return;
        }
        // The epoch the dead engine was active in: a standby may already have claimed the next
        // one by now (it steps up on its own, often before this pidfd fires).
        let epoch = self
            .cluster
            .control
            .get(slot, Field::Epoch)
            .min(self.cluster.control.epoch());
        // A death is a warning: an ordinary failover follows it; an outage is an error below.
        warn!(slot = %slot_name(slot), pid = proc.pid(), was_active, "engine died ({exit})");
        // With no active left, the dead engine may have been the active in the middle of a
        // planned switchover (it publishes "standby" as it hands over, before its target
        // claims the next epoch): wait for the target as for any successor.
        let handing_over = !was_active && self.cluster.active().filter(|&a| a != slot).is_none();
        let successor = if was_active || handing_over {
            self.await_successor(slot, epoch)
        } else {
            self.cluster.active()
        };
        if was_active || handing_over {
            match successor {
                Some(s) => {
                    info!(dead = %slot_name(slot), active = %slot_name(s), "failover: the standby stepped up")
                }
                None => match (
                    self.cluster.lock_holder(),
                    self.hot.last_copy(&self.cluster),
                ) {
                    (Some(h), _) => warn!(
                        dead = %slot_name(slot),
                        serving = %slot_name(h),
                        "the control block shows no active engine, but engine {} holds the active's lock: it serves; not an outage",
                        slot_name(h)
                    ),
                    (None, Some(s)) => {
                        self.last_copy_reported = true;
                        error!(
                            dead = %slot_name(slot),
                            holder = %slot_name(s),
                            stopped = ?self.cluster.engines[s].as_ref().and_then(|p| verify::is_stopped(p.pid())),
                            "the active died and engine {} holds the latest committed state but has not stepped up (stalled?); it is the last copy: not fencing or replacing it, waiting for it to resume",
                            slot_name(s)
                        )
                    }
                    (None, None) => {
                        error!(dead = %slot_name(slot), "outage: no hot standby could step up")
                    }
                },
            }
        }
        let upgrading = matches!(self.op, Some(Operation::Upgrade(_) | Operation::Resume(_)));
        if let Some(mut op) = self.op.take() {
            op.on_death(&mut self.cluster, slot, successor);
            self.op = Some(op);
        }
        if !upgrading && self.cluster.managed[slot] {
            // Only a crash of the engine's own backs off and counts toward giving up. A kill
            // from outside (an operator's burst of kills) or the supervisor's own fence says
            // nothing about the engine: it is restarted at once, since until its replacement
            // is hot the cluster has a single copy of its state.
            if proc.fenced || killed_by_signal(&exit) {
                info!(slot = %slot_name(slot), "killed from outside or fenced, not a crash: restarting at once");
            } else {
                self.restarts
                    .count_crash(slot, &self.cluster.config.restart);
            }
        }
    }

    /// After the active in `dead` died: the engine that stepped up, if any does within the
    /// switchover timeout.
    fn await_successor(&mut self, dead: usize, epoch: u64) -> Option<usize> {
        let deadline = Instant::now() + self.cluster.config.timeouts.switchover();
        loop {
            if let Some(a) = self.cluster.active().filter(|&a| a != dead) {
                return Some(a);
            }
            let candidates = (0..SLOTS).any(|s| {
                s != dead
                    && self.cluster.role(s) == Role::Standby
                    && self.cluster.control.get(s, Field::Epoch) >= epoch
                    && self.cluster.engines[s]
                        .as_ref()
                        .is_some_and(|p| p.identity.is_alive())
            }) || self.cluster.control.epoch() > epoch;
            if !candidates || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(SUCCESSOR_POLL_INTERVAL);
        }
    }

    /// An engine clears its command word when it starts: repeat a pending stop.
    fn resend_stops(&self) {
        for (slot, proc) in self.cluster.engines.iter().enumerate() {
            if let Some(proc) = proc {
                if proc.expected_exit && self.cluster.ours(slot) {
                    let state = self.cluster.state(slot);
                    if state != State::Stopped
                        && self.cluster.control.slot_command(slot) == Ok(None)
                    {
                        self.cluster
                            .control
                            .post_slot_command(slot, SlotCommand::Stop);
                    }
                }
            }
        }
    }

    /// Restart dead engines in managed slots as standbys, with backoff; not during an
    /// upgrade or `down`, whose plans decide what runs.
    fn keep(&mut self) {
        if self.cluster.outcomes.finished
            || matches!(
                self.op,
                Some(Operation::Upgrade(_) | Operation::Down(_) | Operation::Resume(_))
            )
        {
            return;
        }
        let active = self.cluster.active();
        self.watch_outage(active);
        self.restart_dead(active);
    }

    /// With no engine active for longer than the switchover timeout: says so once, verified
    /// — an engine holding the active's lock serves whatever the control block says, and a
    /// stalled last copy is waited for — before it calls it an outage.
    fn watch_outage(&mut self, active: Option<usize>) {
        // A role change takes a moment (the old active hands over, the new one claims the
        // epoch): only an absence of any active that outlasts the switchover timeout is an
        // outage.
        let no_active = active.is_none()
            && self.cluster.control.epoch() > 0
            && (0..SLOTS).all(|s| self.cluster.role(s) != Role::Active);
        if !no_active {
            self.no_active_since = None;
        }
        if !no_active {
            self.last_copy_reported = false;
        }
        if no_active
            && !self.outage_reported
            && self
                .no_active_since
                .get_or_insert_with(Instant::now)
                .elapsed()
                > self.cluster.config.timeouts.switchover()
        {
            // Verified before it is said: the control block alone never declares the state
            // lost.
            if let Some(h) = self.cluster.lock_holder() {
                if self.fence.first_suspicion(h) {
                    warn!(
                        serving = %slot_name(h),
                        pid = self.cluster.engines[h].as_ref().map_or(0, |p| p.pid()),
                        control_epoch = self.cluster.control.epoch(),
                        control_active = ?self.cluster.control.active_slot(),
                        record_pid = self.cluster.control.get(h, Field::Pid),
                        record_start_time = self.cluster.control.get(h, Field::StartTime),
                        "the control block shows no active engine, but engine {} holds the active's lock: it serves, this is not an outage; the control block is suspect",
                        slot_name(h)
                    );
                }
            } else if let Some(s) = self.hot.last_copy(&self.cluster) {
                if !self.last_copy_reported {
                    self.last_copy_reported = true;
                    error!(
                        holder = %slot_name(s),
                        stopped = ?self.cluster.engines[s].as_ref().and_then(|p| verify::is_stopped(p.pid())),
                        "no engine is active; engine {} holds the latest committed state (the last copy) and has not stepped up: waiting for it to resume; it is not fenced or replaced",
                        slot_name(s)
                    );
                }
            } else {
                self.outage_reported = true;
                let stale = (0..SLOTS).find(|&s| self.cluster.promotable(s).is_ok());
                match stale {
                    Some(s) => error!(
                        "outage: no engine is active and none can step up; {}; `understudy promote {} --accept-loss` serves from that copy (or `understudy down` then `understudy up`)",
                        self.cluster.what_was_committed(),
                        slot_name(s)
                    ),
                    None => error!(
                        "outage: no engine is active and none can step up; {}; the state is lost, run `understudy down` then `understudy up`",
                        self.cluster.what_was_committed()
                    ),
                }
            }
        }
    }

    /// Restarts the dead engines of managed slots as standbys (of the active's binary), each
    /// once its backoff has passed.
    fn restart_dead(&mut self, active: Option<usize>) {
        let binary = active
            .and_then(|a| self.cluster.engines[a].as_ref())
            .map(|p| p.binary.clone())
            .filter(|b| !b.as_os_str().is_empty())
            .unwrap_or_else(|| self.cluster.config.engine.binary.clone());
        let now = Instant::now();
        for slot in 0..SLOTS {
            if !self.cluster.managed[slot] || self.cluster.engines[slot].is_some() {
                continue;
            }
            if !self.restarts.due(slot, now, &self.cluster.config.restart) {
                continue;
            }
            match self.cluster.spawn(slot, &binary, true) {
                Ok(()) => info!(slot = %slot_name(slot), "restarted as the new standby"),
                Err(e) => {
                    error!(slot = %slot_name(slot), "restart failed: {e}");
                    self.restarts
                        .count_crash(slot, &self.cluster.config.restart);
                }
            }
        }
    }

    /// The answer to `status`: the report, and exit code 9 (outage) when no engine is
    /// verifiably active.
    fn status_reply(&self) -> Reply {
        let report = self.status();
        let mut message = status_summary(&report);
        // An outage is exit 9, as `--help` says: no engine is active, verified (an
        // engine holding the active's lock serves whatever the control block says),
        // for longer than the switchover timeout — the same grace the loop gives before
        // it says "outage": an ordinary failover's window is not one.
        let code = if report.active.is_none()
            && self.cluster.lock_holder().is_none()
            && self
                .no_active_since
                .is_some_and(|t| t.elapsed() > self.cluster.config.timeouts.switchover())
        {
            if let Some(s) = self.hot.last_copy(&self.cluster) {
                message.push_str(&format!(
                    "; engine {} holds the last copy of the state and has not stepped up (stalled?)",
                    slot_name(s)
                ));
            }
            Code::Outage
        } else {
            Code::Ok
        };
        Reply::result(code, message).with_data(report)
    }

    fn on_request(&mut self, request: Request, reply: Sender<Reply>) {
        use crate::proto::Op;
        match request.op {
            Op::Status => {
                let _ = reply.send(self.status_reply());
            }
            Op::ResumeRestarts => {
                let _ = reply.send(self.restarts.resume());
            }
            Op::Reload(request) => {
                let answer = match self.op {
                    Some(_) => self.busy(),
                    None => {
                        crate::reload::reload(&mut self.cluster.config, &self.cluster.dir, &request)
                    }
                };
                let _ = reply.send(answer);
            }
            Op::Rollback => {
                if let Some(Operation::Upgrade(run)) = self.op.as_mut() {
                    run.request_abort(reply);
                    return;
                }
                if self.op.is_some() {
                    let _ = reply.send(self.busy());
                    return;
                }
                match Operation::rollback(&mut self.cluster, reply.clone()) {
                    Ok(op) => self.op = Some(op),
                    Err(r) => {
                        let _ = reply.send(r);
                    }
                }
            }
            op => {
                if self.op.is_some() {
                    let _ = reply.send(self.busy());
                    return;
                }
                match Operation::begin(&mut self.cluster, op, reply.clone()) {
                    Ok(op) => self.op = Some(op),
                    Err(r) => {
                        let _ = reply.send(r);
                    }
                }
            }
        }
    }

    fn busy(&self) -> Reply {
        let what = self.op.as_ref().map(|o| o.describe()).unwrap_or_default();
        Reply::result(
            Code::Busy,
            format!("another operation is in progress ({what}); wait for it to end"),
        )
    }

    fn step_op(&mut self) {
        if let Some(mut op) = self.op.take() {
            match op.step(&mut self.cluster) {
                Stepped::Running => self.op = Some(op),
                Stepped::Ended => {}
                Stepped::Finished(result) => result.send(self.status()),
                Stepped::Became(next) => self.op = Some(*next),
            }
        }
    }

    /// A snapshot for `status`.
    pub fn status(&self) -> StatusReport {
        crate::status::report(
            &self.cluster,
            &Bookkeeping {
                operation: self.op.as_ref().map(|o| o.describe()),
                restarts: &self.restarts,
                roles: &self.roles,
                rates: &self.rates,
                foreign: &self.foreign,
            },
        )
    }
}
