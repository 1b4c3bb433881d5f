//! Role changes: planned switchover (active side), step-up (standby side), lock recovery and
//! fencing a hung active.

use super::role::{self, OnLockBusy};
use super::*;

/// How often a waiting step-up checks, in /proc, whether the mutex's holder thread is gone
/// (never in the first interval: a planned handover's unlock comes then).
const GONE_CHECK_EVERY: Duration = Duration::from_millis(1);

impl<A: Application, I: Input> Engine<A, I> {
    /// Planned switchover to `target`: returns this engine's new upstream (as standby).
    pub(super) fn switchover(&mut self, target: usize) -> Result<Upstream, SwitchoverRefused> {
        let t0 = Instant::now();
        let s = self.opt.slot;
        let next_epoch = self.epoch + 1;
        let idx = self
            .replicas
            .iter()
            .position(|r| r.slot == target)
            .expect("target checked");
        // Room for the step-up frame first (a hot standby's ring may be momentarily full under
        // load): nothing has changed yet if there is none, and we stay active. `check_push`
        // counts what the push below takes, padding before the buffer's end included.
        let room = push_waiting(&mut self.replicas[idx].stream, self.opt.backpressure, |p| {
            p.check_push(56)
        });
        if !room {
            return Err(SwitchoverRefused::NoRoom);
        }
        // Pre-create our standby stream of the next epoch, so the new active streams to us
        // from its first transaction on (no catch-up: our digest equals its digest).
        let prepared = match self.prepared.take() {
            Some(p)
                if p.epoch == next_epoch
                    && p.gen == self.control.get(s, Field::AttachGen).wrapping_add(1) =>
            {
                p
            }
            other => {
                self.prepared = other;
                self.discard_prepared();
                self.prepare_upstream(next_epoch)
                    .map_err(SwitchoverRefused::Failed)?
            }
        };
        let up = self
            .announce_upstream(prepared, target)
            .map_err(SwitchoverRefused::Failed)?;
        self.handed_over = Some((self.epoch, target, self.commits, self.store.digest()));
        let pos = self.position(target as u64);
        {
            let r = &mut self.replicas[idx];
            let mut b = r.stream.batch();
            b.push(rt::STEP_UP, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
                .expect("check_push made room for the step-up frame; nothing wrote since");
            b.commit();
        }
        // Detach every replica; the other standbys re-attach to the new active. Their
        // mappings go once the switchover is over, not inside its pause.
        for rep in &self.replicas {
            if rep.slot != target {
                rep.stream_region.close(CLOSE_DETACHED);
            }
        }
        self.leftovers.keep_replicas(self.replicas.drain(..));
        #[cfg(feature = "fault-injection")]
        if let Some(ms) = std::env::var_os("UNDERSTUDY_TEST_STALL_BEFORE_UNLOCK_MS") {
            // Test hook (cargo feature `fault-injection` only): an old active descheduled
            // between the step-up frame and releasing the mutex (the target must wait for it,
            // not give up).
            let ms = ms.to_str().and_then(|v| v.parse().ok()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(ms));
        }
        if let Err(e) = self.control.lock().unlock() {
            // Cannot happen for the thread that locked it; the target's try_lock would spin
            // and give up, and we would take the role back.
            error!("releasing the robust mutex: {e}");
        }
        // We follow the target in the next epoch: publishing the old one would hide our
        // pre-created stream from the target, and the epoch check in `follow` would make us
        // re-attach with a full catch-up.
        self.epoch = next_epoch;
        self.publish_status(Role::Standby, State::Syncing);
        if let Some(k) = &self.counters {
            k.add(Counter::SWITCHOVERS_TOTAL, 1);
            k.set(Counter::LAST_SWITCHOVER_NS, t0.elapsed().as_nanos() as u64);
        }
        info!(slot = %control::slot_name(s), target = %control::slot_name(target), took_us = t0.elapsed().as_micros() as u64, "switched over; now standby");
        Ok(up)
    }

    /// We handed the active role to `active` in a planned switchover, it claimed the epoch and
    /// died before committing any transaction (it marks its slot before its first commit):
    /// our state is still the cluster's, so we may step up although we never became hot.
    pub(super) fn took_nothing_since_handover(&self, active: usize) -> bool {
        matches!(self.handed_over, Some((_, target, commits, digest))
            if target == active && commits == self.commits && digest == self.store.digest())
            // SYNC POINT: first commit of this role (Acquire; the Release is in `transact`).
            && self.control.get(active, Field::Served) == 0
            && self.control.epoch() == self.epoch
    }

    /// Take over: lock the mutex, claim the next epoch. False if another engine won.
    pub(super) fn step_up(&mut self, planned: bool) -> bool {
        let t0 = Instant::now();
        // Pre-opened regions are the handing-over active's: only a planned step-up uses them.
        // After a crash its slot is restarted and recreates files at the same paths.
        if !planned {
            self.preopened = None;
        }
        let lock = self.control.lock();
        if !self.wait_for_mutex(&lock, planned, t0) {
            return false;
        }
        let e = self.epoch;
        match self.control.claim_epoch(e, self.opt.slot) {
            Some(ne) => {
                self.epoch = ne;
                #[cfg(feature = "fault-injection")]
                if planned && std::env::var_os("UNDERSTUDY_TEST_ABORT_AFTER_STEP_UP").is_some() {
                    // Test hook (cargo feature `fault-injection` only): die in the worst spot of
                    // a switchover (epoch claimed, mutex held, nothing served, the old active
                    // not yet re-attached).
                    eprintln!("test hook: aborting right after a planned step-up");
                    std::process::abort();
                }
                self.mark_step_up(t0, planned);
                true
            }
            None => {
                let _ = lock.unlock();
                false
            }
        }
    }

    /// Take the robust mutex for a step-up begun at `t0` (true), or give up (false) as
    /// [`role::on_lock_busy`] decides.
    fn wait_for_mutex(&self, lock: &control::ControlLock<'_>, planned: bool, t0: Instant) -> bool {
        // A planned switchover: the old active releases the mutex right after the step-up
        // frame; a crash: the mutex is owner-died and try_lock recovers it at once. A holder
        // that died without the kernel marking the word (its memory unmapped before its thread
        // exited) is recovered once its thread is provably gone; that check reads /proc, so it
        // runs once a millisecond, never in the first one (a planned handover's unlock).
        let mut next_gone_check = GONE_CHECK_EVERY;
        loop {
            let outcome = if t0.elapsed() >= next_gone_check {
                next_gone_check = t0.elapsed() + GONE_CHECK_EVERY;
                try_lock_recovering(lock, self.control.path())
            } else {
                lock.try_lock()
            };
            match outcome {
                Ok(TryLockOutcome::Acquired) | Ok(TryLockOutcome::OwnerDied) => return true,
                Ok(TryLockOutcome::WouldBlock) => {
                    let busy = role::LockBusy {
                        planned,
                        elapsed: t0.elapsed(),
                        epoch_now: self.control.epoch(),
                        epoch_ours: self.epoch,
                        hung_after: self.opt.hung_after,
                    };
                    match role::on_lock_busy(busy) {
                        OnLockBusy::EpochTaken => {
                            warn!("another engine claimed the epoch first");
                            return false;
                        }
                        OnLockBusy::LiveHolder => {
                            warn!(
                                holder_tid = lock.holder_tid(),
                                "the mutex stays held by a live thread: another engine holds the active role; not stepping up"
                            );
                            return false;
                        }
                        OnLockBusy::Wait {
                            heartbeat,
                            check_hung,
                        } => {
                            if heartbeat {
                                let now = monotonic_ns();
                                self.control.set(self.opt.slot, Field::HeartbeatNs, now);
                                if check_hung {
                                    self.fence_hung_holder(now);
                                }
                            }
                        }
                    }
                    std::hint::spin_loop();
                }
                Err(e) => {
                    error!("robust mutex: {e}");
                    return false;
                }
            }
        }
    }

    /// Planned step-up, the old active still holding the mutex after our hung threshold: if
    /// its heartbeat is that old too and it is still the process in its slot, fence it.
    pub(super) fn fence_hung_holder(&self, now: u64) {
        let Some(a) = self.control.active_slot().filter(|&a| a != self.opt.slot) else {
            return;
        };
        let hb = self.control.get(a, Field::HeartbeatNs);
        let id = ProcessIdentity {
            pid: self.control.get(a, Field::Pid).min(u32::MAX as u64) as u32,
            start_time_ticks: self.control.get(a, Field::StartTime),
        };
        // Second source: the thread holding the mutex must be that process's.
        let lock = self.control.lock();
        if !role::should_fence_hung_holder(
            now.saturating_sub(hb),
            self.opt.hung_after.as_nanos() as u64,
            || self.slot_alive(a),
            id.pid,
            || live_holder(&lock, self.control.path()),
        ) {
            return;
        }
        warn!(
            pid = id.pid,
            "the old active holds the mutex and is hung (heartbeat {} ms old); fencing it with SIGKILL",
            (now - hb) / 1_000_000
        );
        fence_identity(&id);
    }

    pub(super) fn mark_step_up(&mut self, t0: Instant, planned: bool) {
        // The active's store is the cluster's state: a consistent copy by definition.
        self.consistent = true;
        drop_off_thread(self.prefix.take());
        let s = self.opt.slot;
        let c = &self.control;
        c.set(s, Field::StepUps, c.get(s, Field::StepUps).wrapping_add(1));
        c.set(s, Field::LastStepUpNs, realtime_ns());
        c.set(s, Field::LastStepUpDurNs, t0.elapsed().as_nanos() as u64);
        if let Some(k) = &self.counters {
            k.add(Counter::STEP_UPS_TOTAL, 1);
            k.set(Counter::LAST_STEP_UP_NS, t0.elapsed().as_nanos() as u64);
        }
        c.set(s, Field::StepUpCommits, self.commits);
        c.set(s, Field::Served, 0);
        self.served = false;
        self.handed_over = None;
        c.set(s, Field::StepUpDigest, self.store.digest());
        self.takeover = if planned {
            crate::app::Takeover::Planned
        } else {
            crate::app::Takeover::Failover
        };
        self.publish_status(Role::Active, State::Serving);
        info!(slot = %control::slot_name(s), epoch = self.epoch, planned, took_us = t0.elapsed().as_micros() as u64, "stepped up; now active");
        // Attach the old active at once if it pre-created its stream (planned switchover),
        // before the first transaction, so it needs no catch-up.
        self.attach_new_replicas();
        self.preopened = None;
        for _ in 0..3 {
            self.service_replicas();
        }
    }
}

/// Why a planned switchover did not start (the active stays active).
#[derive(Debug)]
pub(super) enum SwitchoverRefused {
    NoRoom,
    Failed(EngineError),
}

impl fmt::Display for SwitchoverRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchoverRefused::NoRoom => {
                f.write_str("no room in the target's stream for the step-up frame")
            }
            SwitchoverRefused::Failed(e) => write!(f, "cannot create the next epoch's stream: {e}"),
        }
    }
}

/// `try_lock`, recovering a mutex whose holder thread is provably gone although the word was
/// never marked owner-died (see [`RobustLock::recover_dead_holder`]).
///
/// Never two actives: an engine is active only while its engine thread holds this mutex and
/// its epoch is the control block's (claimed by compare-and-swap after locking). The mutex
/// changes hands only (a) by the holder's unlock (a planned handover, after its step-up frame),
/// (b) by the kernel marking it owner-died when the holder thread exits, or (c) here, when
/// `/proc` proves that the thread named in the word no longer exists (or is an exited
/// process leader). The active's serving loop runs on the thread that locked, so in all three
/// cases the previous holder can no longer serve; a live holder — whatever the control
/// block's other words say about its process — is never taken over. The compare-and-swap in
/// the recovery acts only on the exact word that named the dead thread, and the epoch CAS
/// after locking lets one engine win even if two recover at once.
pub(super) fn try_lock_recovering(
    lock: &control::ControlLock<'_>,
    control_path: &std::path::Path,
) -> Result<TryLockOutcome, LockError> {
    match lock.try_lock()? {
        TryLockOutcome::WouldBlock => {
            let Some(tid) = lock.holder_tid() else {
                return Ok(TryLockOutcome::WouldBlock);
            };
            if holder_is_gone(tid, control_path) && lock.recover_dead_holder(tid) {
                warn!(
                    tid,
                    "the robust mutex named a thread that is gone, never marked owner-died (its \
                     process unmapped the control block before exiting); recovered it"
                );
            }
            lock.try_lock()
        }
        o => Ok(o),
    }
}

/// The thread `tid` named in the robust mutex can no longer hold the active role: it does not
/// exist (or is an exited process leader), or its id now belongs to a process that does not
/// map this cluster's control block (every engine keeps it mapped while it may hold the
/// mutex), i.e. the dead holder's id was reused by an unrelated thread.
pub(super) fn holder_is_gone(tid: u32, control_path: &std::path::Path) -> bool {
    if liveness::thread_is_gone(tid) {
        return true;
    }
    match liveness::thread_group_of(tid) {
        Some(pid) => liveness::process_maps_file(pid, control_path) == Some(false),
        None => liveness::thread_is_gone(tid),
    }
}

/// The live process whose thread holds the robust mutex, if the word names one that maps
/// this cluster's control block: the active as the kernel and glibc see it, whatever the
/// control block's pid and start-time words say.
pub(super) fn live_holder(
    lock: &control::ControlLock<'_>,
    control_path: &std::path::Path,
) -> Option<u32> {
    let tid = lock.holder_tid()?;
    // Errs on the side of a live holder, as `holder_is_gone` does: a `/proc` read that fails
    // or races must never make a live active's mutex look free (a second active).
    if holder_is_gone(tid, control_path) {
        return None;
    }
    Some(liveness::thread_group_of(tid).unwrap_or(tid))
}
