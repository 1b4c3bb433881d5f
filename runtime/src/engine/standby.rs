//! The standby role: attach to the active's stream, follow it (apply each committed batch),
//! and watch the active for death.

use super::result::CommandResult;
use super::role::{self, NoStepUpBecause, OnActiveDead, OnLivenessCheck, StepUpBecause};
use super::*;

/// How a standby reads its replication stream: validated in place, views into the ring, the
/// position published once per burst (`true`), or copied out batch by batch first (`false`).
/// The stream comes from the engine's own peer, so either is allowed by the design rule.
///
/// Copied: side by side in `benches/replication.rs` the two cost the active the same per
/// transaction (126.5 ns copied vs 128.8 ns in place, standby paced; benches/RESULTS-runtime.md),
/// but a batch read in place stays unreleased until it is applied, and a large catch-up chunk
/// applied slowly (a debug build on a loaded host) kept the ring full and unconsumed past the
/// untether bound: `examples/callstate/tests/large_state.rs` saw the standby untethered in 2
/// of 3 runs at load 8-14. A copied batch is released before it is applied.
pub(super) const STANDBY_READS_IN_PLACE: bool = false;

/// Standby regions created but not yet announced (see `Engine::prepare_upstream`).
pub(super) struct Prepared {
    pub(super) epoch: u64,
    pub(super) gen: u64,
    pub(super) stream_region: Region,
    pub(super) feedback_region: Region,
    pub(super) stream: Consumer<RegionMemory>,
    pub(super) feedback: Producer<RegionMemory>,
}

/// Another engine's prepared regions, opened ahead of a planned step-up.
pub(super) struct Preopened {
    pub(super) slot: usize,
    pub(super) epoch: u64,
    pub(super) gen: u64,
    pub(super) stream_region: Region,
    pub(super) feedback_region: Region,
}

/// The consistent copy a standby held when a catch-up began (it had been hot, then its
/// stream was closed: untethered or resynced). It is kept beside the store being rebuilt until
/// the catch-up ends, so that if the active dies meanwhile the cluster's state is not lost
/// with it: the standby goes back to this copy, says exactly how far it reaches, and an
/// operator can make it active (`understudy promote`), accepting the loss of what the
/// active committed after it. Costs a second store for the length of a catch-up.
pub(super) struct Prefix {
    pub(super) store: Store,
    pub(super) commits: u64,
}

/// A standby's end of the stream.
pub(super) struct Upstream {
    pub(super) stream_region: Region,
    pub(super) feedback_region: Region,
    pub(super) stream: Consumer<RegionMemory>,
    pub(super) feedback: Producer<RegionMemory>,
    pub(super) active_slot: usize,
    pub(super) last_ack: Instant,
}

/// Mappings of a role this engine left, kept until the role change is over (see
/// `Engine::leftovers`).
#[derive(Default)]
pub(super) struct Leftovers {
    /// Our old upstream after a step-up; its files are unlinked when it is dropped.
    pub(super) upstream: Vec<Upstream>,
    /// Our replicas after handing the role over (each already closed or handed over).
    pub(super) replicas: Vec<Replica>,
    pub(super) since: Option<Instant>,
}

impl Leftovers {
    pub(super) fn keep_upstream(&mut self, u: Box<Upstream>) {
        self.upstream.push(*u);
        self.since = Some(Instant::now());
    }

    pub(super) fn keep_replicas(&mut self, r: impl IntoIterator<Item = Replica>) {
        self.replicas.extend(r);
        self.since = Some(Instant::now());
    }

    /// Unmap (and unlink) them if the role change is over: `done` (the new role has done
    /// its first work), or 20 ms have passed.
    pub(super) fn reap(&mut self, done: bool) {
        let Some(since) = self.since else {
            return;
        };
        if !done && since.elapsed() < REAP_AFTER {
            return;
        }
        for u in self.upstream.drain(..) {
            let _ = Region::remove(u.stream_region.path());
            let _ = Region::remove(u.feedback_region.path());
        }
        self.replicas.clear();
        self.since = None;
    }
}

impl<A: Application, I: Input> Engine<A, I> {
    /// Create the standby's two regions for `epoch` and announce them in our slot.
    pub(super) fn create_upstream(
        &mut self,
        epoch: u64,
        active_slot: usize,
    ) -> Result<Upstream, EngineError> {
        let p = self.prepare_upstream(epoch)?;
        self.announce_upstream(p, active_slot)
    }

    /// Create (not yet announce) this engine's standby regions for `epoch`: the file work of
    /// attaching, which an active does ahead of a planned switchover so the switchover's pause
    /// does not include it.
    pub(super) fn prepare_upstream(&mut self, epoch: u64) -> Result<Prepared, EngineError> {
        let s = self.opt.slot;
        let gen = self.control.get(s, Field::AttachGen).wrapping_add(1);
        let sp = Control::stream_path(&self.opt.dir, epoch, s, gen);
        let fp = Control::feedback_path(&self.opt.dir, epoch, s, gen);
        let _ = Region::remove(&sp);
        let _ = Region::remove(&fp);
        let spec = |kind| RegionSpec {
            capacity: self.opt.ring_capacity,
            epoch,
            kind,
        };
        let stream_region = Region::create(&sp, spec(KIND_STREAM), self.me)?;
        let feedback_region = Region::create(&fp, spec(KIND_FEEDBACK), self.me)?;
        stream_region.set_consumer_identity(self.me);
        let mut stream = stream_region.consumer()?;
        // Read in place (`STANDBY_READS_IN_PLACE`), the standby would publish its position
        // once per burst: at most every 1/64 of the ring (and whenever it finds nothing new),
        // so the active's view of the room left lags by little. The copying poll it uses
        // publishes each batch as soon as it is copied, before it is applied.
        stream.set_release_every(self.opt.ring_capacity / 64);
        // Batches without a checksum are accepted only from an active configured like us
        // (`integrity = "off"` for the cluster): otherwise one is a corrupt stream.
        stream.set_require_integrity(self.opt.integrity != StreamIntegrity::Off);
        let feedback = feedback_region.producer()?;
        Ok(Prepared {
            epoch,
            gen,
            stream_region,
            feedback_region,
            stream,
            feedback,
        })
    }

    /// Write our hello into prepared regions and announce them in our slot: from here on the
    /// active of `p.epoch` attaches them.
    pub(super) fn announce_upstream(
        &mut self,
        p: Prepared,
        active_slot: usize,
    ) -> Result<Upstream, EngineError> {
        let s = self.opt.slot;
        let Prepared {
            epoch,
            gen,
            stream_region,
            feedback_region,
            stream,
            mut feedback,
        } = p;
        let mut h = self.hello();
        h.epoch = epoch;
        h.encode(&mut self.scratch);
        feedback
            .try_publish(rt::HELLO, 1, 48, &self.scratch)
            .map_err(|e| {
                EngineError::Other(format!(
                    "writing our hello into {}: {e}",
                    feedback_region.path().display()
                ))
            })?;
        let c = &self.control;
        c.set(s, Field::Epoch, epoch);
        c.set(s, Field::Role, Role::Standby as u64);
        c.set(s, Field::State, State::Syncing as u64);
        c.set(s, Field::AttachGen, gen);
        c.set(s, Field::Served, 0);
        self.served = false;
        Ok(Upstream {
            stream_region,
            feedback_region,
            stream,
            feedback,
            active_slot,
            last_ack: Instant::now(),
        })
    }

    /// As a hot standby: open the regions our active prepared for the next epoch (see
    /// `prepare_upstream`), so that if it hands over to us, stepping up does not include
    /// opening and validating them. Their paths follow from the active's slot and generation.
    pub(super) fn preopen_next(&mut self, active: usize) {
        let epoch = self.epoch + 1;
        let gen = self.control.get(active, Field::AttachGen).wrapping_add(1);
        if self
            .preopened
            .as_ref()
            .is_some_and(|p| p.slot == active && p.epoch == epoch && p.gen == gen)
        {
            return;
        }
        self.preopened = None;
        let sp = Control::stream_path(&self.opt.dir, epoch, active, gen);
        let fp = Control::feedback_path(&self.opt.dir, epoch, active, gen);
        if !sp.exists() || !fp.exists() {
            return;
        }
        if let (Ok(stream_region), Ok(feedback_region)) = (
            Region::open(&sp, Duration::ZERO),
            Region::open(&fp, Duration::ZERO),
        ) {
            self.preopened = Some(Preopened {
                slot: active,
                epoch,
                gen,
                stream_region,
                feedback_region,
            });
        }
    }

    /// Drop prepared regions that were never announced.
    pub(super) fn discard_prepared(&mut self) {
        if let Some(p) = self.prepared.take() {
            let _ = Region::remove(p.stream_region.path());
            let _ = Region::remove(p.feedback_region.path());
        }
    }

    pub(super) fn run_standby(&mut self, up: Option<Box<Upstream>>) -> Result<Next, EngineError> {
        let s = self.opt.slot;
        let mut up = up;
        self.replicas.clear();
        self.app.on_standby(&self.store);
        loop {
            // Find the active and attach to it.
            let mut u = match up.take() {
                Some(u) => u,
                None => match self.attach_upstream()? {
                    Attach::Attached(u) => u,
                    Attach::BecomeActive => return Ok(Next::Active),
                    Attach::Stop => return Ok(Next::Stop),
                },
            };
            match self.follow(&mut u)? {
                Follow::Reattach => {
                    u.feedback_region.close(CLOSE_DETACHED);
                    let _ = Region::remove(u.stream_region.path());
                    let _ = Region::remove(u.feedback_region.path());
                    continue;
                }
                Follow::StepUp { planned } => {
                    // Unmapped and unlinked after the step-up, outside its pause.
                    self.leftovers.keep_upstream(u);
                    if self.step_up(planned) {
                        return Ok(Next::Active);
                    }
                    self.leftovers.reap(true);
                    continue;
                }
                Follow::Stop => {
                    u.feedback_region.close(CLOSE_DETACHED);
                    let _ = Region::remove(u.stream_region.path());
                    let _ = Region::remove(u.feedback_region.path());
                    self.control.set(s, Field::Cmd, 0);
                    return Ok(Next::Stop);
                }
            }
        }
    }

    pub(super) fn attach_upstream(&mut self) -> Result<Attach, EngineError> {
        let s = self.opt.slot;
        let started = Instant::now();
        loop {
            self.control.set(s, Field::HeartbeatNs, monotonic_ns());
            if self.control.slot_command(s) == Ok(Some(SlotCommand::Stop)) {
                return Ok(Attach::Stop);
            }
            if self.control.take_slot_command(s, SlotCommand::Promote) {
                if let Some(next) = self.promote(started)? {
                    return Ok(next);
                }
            }
            let epoch = self.control.epoch();
            // We handed the active role over in a planned switchover and the target died before
            // claiming the next epoch: nobody served since, our state is the cluster's state;
            // take the role back (the mutex and the epoch compare-and-swap keep it single).
            if let Some((from, target, _, _)) = self.handed_over {
                if epoch > from {
                    self.handed_over = None;
                } else if !self.slot_alive(target) || started.elapsed() > HANDOVER_TARGET_TIMEOUT {
                    self.epoch = from;
                    if self.try_claim(Some(from))? {
                        self.handed_over = None;
                        warn!(target = %control::slot_name(target), "the switchover target died before stepping up; active again");
                        self.mark_step_up(started, false);
                        return Ok(Attach::BecomeActive);
                    }
                }
            }
            if let Some(a) = self.control.active_slot() {
                if a != s
                    && self.slot_alive(a)
                    && self.control.get(a, Field::Epoch) == epoch
                    && Role::from_word(self.control.get(a, Field::Role)) == Role::Active
                {
                    self.epoch = epoch;
                    return Ok(Attach::Attached(Box::new(self.create_upstream(epoch, a)?)));
                }
            }
            // No live active: if allowed, take over (the first engine, or after a death
            // nobody else handled).
            // A fresh cluster (epoch 0) has nothing to lose; later, only a hot standby
            // steps up (an empty engine taking over would lose the state).
            if !self.opt.standby_only
                && self.control.epoch() == 0
                && started.elapsed() > FIRST_ACTIVE_AFTER
                && self.try_become_first_active()?
            {
                self.mark_step_up(started, false);
                return Ok(Attach::BecomeActive);
            }
            std::thread::sleep(ATTACH_POLL_INTERVAL);
        }
    }

    /// The operator's `promote`: with no live active, become active with our consistent copy
    /// (the mutex and the epoch's compare-and-swap keep the role single, as for any claim).
    /// Refused, with the reason logged, when we hold no consistent copy or an active serves.
    pub(super) fn promote(&mut self, started: Instant) -> Result<Option<Attach>, EngineError> {
        if !self.consistent {
            warn!("promote refused: this engine holds no consistent copy (it was catching up, or has nothing yet)");
            self.control
                .refuse_slot_command(self.opt.slot, CommandResult::NoConsistentCopy);
            return Ok(None);
        }
        if self.try_claim(None)? {
            warn!(
                commits = self.commits,
                digest = format_args!("{:#x}", self.store.digest()),
                epoch = self.epoch,
                "promoted by the operator: active with the consistent copy of {} transactions; whatever the dead active committed after it is lost",
                self.commits
            );
            self.mark_step_up(started, false);
            return Ok(Some(Attach::BecomeActive));
        }
        warn!("promote refused: an active serves (or another engine claimed the epoch first)");
        self.control
            .refuse_slot_command(self.opt.slot, CommandResult::ActiveServes);
        Ok(None)
    }

    /// Apply the stream and watch the active until something happens.
    pub(super) fn follow(&mut self, u: &mut Upstream) -> Result<Follow, EngineError> {
        let s = self.opt.slot;
        // The lock borrows the mapping: hold our own handle on it while `self` changes.
        let control = self.control.clone();
        let lock = control.lock();
        let mut w = Watch::new(&self.control, u.active_slot);
        let mut state = State::Syncing;
        loop {
            // Fast path: the active's mutex word. The kernel sets OWNER_DIED in it while the
            // dying process exits, before its memory is torn down.
            let died = matches!(lock.word(), LockWord::OwnerDied { .. });
            let mut got = false;
            match self.read_and_apply(u, &mut state) {
                Ok(Some(applied)) => {
                    w.idle_polls = 0;
                    got = true;
                    w.batches = w.batches.wrapping_add(1);
                    match applied {
                        Ok(Some(f)) => return Ok(f),
                        Ok(None) => {}
                        Err(e) => {
                            // Part of the batch may be applied: not a consistent copy.
                            self.consistent = false;
                            warn!(slot = %control::slot_name(s), "stream rejected: {e}; resyncing");
                            if let EngineError::Refused(_) = e {
                                return Err(e);
                            }
                            self.control.set(s, Field::State, State::Stale as u64);
                            u.stream_region.close(CLOSE_CORRUPT);
                            return Ok(Follow::Reattach);
                        }
                    }
                    // Under sustained load the ring never runs empty: still do the
                    // housekeeping (acks, heartbeat, commands) every 64 batches.
                    if w.batches % 64 != 0 {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(slot = %control::slot_name(s), "corrupt frame in the stream: {e}; resyncing");
                    self.control.set(s, Field::State, State::Stale as u64);
                    u.stream_region.close(CLOSE_CORRUPT);
                    return Ok(Follow::Reattach);
                }
            }
            if died && !got {
                return Ok(self.on_active_dead(u, &mut state, w.active, Death::OwnerDied));
            }
            let now = monotonic_ns();
            if now - w.last_house > FOLLOW_HOUSEKEEPING_NS {
                match self.follow_housekeeping(u, &mut w, &mut state, now) {
                    Step::Go => {}
                    Step::Again => continue,
                    Step::Exit(f) => return Ok(f),
                }
                if now - w.last_alive_check > LIVENESS_CHECK_NS {
                    match self.check_liveness(u, &mut w, &mut state, now, &lock, &control) {
                        Step::Go => {}
                        Step::Again => continue,
                        Step::Exit(f) => return Ok(f),
                    }
                }
            }
            if !got {
                w.idle_polls = w.idle_polls.saturating_add(1);
                let pause = self.opt.standby_poll_pause;
                if pause.is_zero() || !self.spinning(w.idle_polls) {
                    self.idle_wait(w.idle_polls);
                } else {
                    let spins =
                        paced_pause(pause, || matches!(lock.word(), LockWord::OwnerDied { .. }));
                    w.idle_polls = w.idle_polls.saturating_add(spins);
                }
            }
        }
    }

    /// Every `FOLLOW_HOUSEKEEPING_NS`: publish what we hold, obey a stop, notice a closed
    /// stream (never hot from then on), acknowledge our position.
    fn follow_housekeeping(
        &mut self,
        u: &mut Upstream,
        w: &mut Watch,
        state: &mut State,
        now: u64,
    ) -> Step {
        let s = self.opt.slot;
        if now / REPAIR_EVERY_NS != w.last_house / REPAIR_EVERY_NS {
            self.control.repair_own(s); // checked words
        }
        w.last_house = now;
        self.control.set(s, Field::HeartbeatNs, now);
        self.control.set(s, Field::Commits, self.commits);
        self.control.set(s, Field::Digest, self.store.digest());
        self.leftovers.reap(false);
        let lag = u
            .stream
            .producer_position()
            .saturating_sub(u.stream.position());
        self.control.set(s, Field::LagBytes, lag);
        if let Some(k) = &self.counters {
            k.housekeeping(now, self.counters_bp_base);
            k.set(Counter::STATE, *state as u64);
            k.set(Counter::ROLE, self.control.get(s, Field::Role));
            k.set(Counter::EPOCH, self.epoch);
        }
        if *state == State::Hot && self.control.epoch() == self.epoch {
            self.preopen_next(w.active);
        }
        if self.control.slot_command(s) == Ok(Some(SlotCommand::Stop)) {
            return Step::Exit(Follow::Stop);
        }
        if let Some(why) = u.stream_region.closed() {
            // A closed stream is never hot, from the moment the close is seen (the frames
            // still in it are applied, but nothing after them comes).
            if *state == State::Hot || *state == State::Syncing {
                *state = self.not_hot_after_close(why);
            }
            if u.stream.has_next() {
                // Apply what was committed before the close first: a refusal is published
                // right before the close, and its message must not be lost.
                return Step::Again;
            }
            info!(slot = %control::slot_name(s), reason = close_reason(why), "stream closed by the active; re-attaching");
            return Step::Exit(Follow::Reattach);
        }
        if u.last_ack.elapsed() > ACK_EVERY {
            u.last_ack = Instant::now();
            let p = self.position((*state == State::Hot) as u64);
            let _ = u
                .feedback
                .try_publish(rt::ACK, 1, 56, zerocopy::IntoBytes::as_bytes(&p));
        }
        Step::Go
    }

    /// The backstop to the mutex word, every `LIVENESS_CHECK_NS`: is the active's process gone
    /// (or its pid reused), or hung? The decision is [`role::on_liveness_check`]'s.
    fn check_liveness(
        &mut self,
        u: &mut Upstream,
        w: &mut Watch,
        state: &mut State,
        now: u64,
        lock: &control::ControlLock<'_>,
        control: &Control,
    ) -> Step {
        w.last_alive_check = now;
        if w.batches != w.batches_at_check {
            w.batches_at_check = w.batches;
            w.last_frame_ns = now;
        }
        let obs = role::LivenessCheck {
            epoch_now: self.control.epoch(),
            epoch_ours: self.epoch,
            active_alive: w.active_id.is_alive(),
            active_pid: w.active_id.pid,
            hot: *state == State::Hot,
            heartbeat_age_ns: now.saturating_sub(self.control.get(w.active, Field::HeartbeatNs)),
            stream_silence_ns: now.saturating_sub(w.last_frame_ns),
            hung_after_ns: self.opt.hung_after.as_nanos() as u64,
        };
        match role::on_liveness_check(obs, || live_holder(lock, control.path())) {
            // A newer epoch: someone else is active now. An older one: we handed over
            // (planned switchover) and the target died before claiming the epoch;
            // re-attaching lets us take the state back.
            OnLivenessCheck::Reattach => Step::Exit(Follow::Reattach),
            // The target of our handover, alive, has not claimed the epoch yet.
            OnLivenessCheck::WaitForClaim => Step::Again,
            OnLivenessCheck::LiveHolder { pid } => {
                if !w.lying_identity_warned {
                    w.lying_identity_warned = true;
                    warn!(
                        slot = %control::slot_name(w.active),
                        words_pid = w.active_id.pid,
                        holder_pid = pid,
                        "the control block says the active's process is gone, but a live engine thread holds the mutex: not stepping up (the slot's identity words are wrong)"
                    );
                }
                Step::Again
            }
            OnLivenessCheck::ActiveDead => {
                Step::Exit(self.on_active_dead(u, state, w.active, Death::Identity))
            }
            OnLivenessCheck::FenceHung => {
                warn!(
                    pid = w.active_id.pid,
                    "active is hung (heartbeat {} ms old, stream silent {} ms); fencing it with SIGKILL",
                    obs.heartbeat_age_ns / 1_000_000,
                    obs.stream_silence_ns / 1_000_000
                );
                fence_identity(&w.active_id);
                Step::Go
            }
            OnLivenessCheck::Healthy => Step::Go,
        }
    }

    /// The active is dead (its mutex owner-died, or its identity gone with no live holder of
    /// the mutex): drain what it committed, then step up or re-attach ([`role::on_active_dead`]).
    pub(super) fn on_active_dead(
        &mut self,
        u: &mut Upstream,
        state: &mut State,
        active: usize,
        death: Death,
    ) -> Follow {
        // Drain what the active committed before it died.
        let drained_cleanly = match self.drain(u, state) {
            Drained::Clean => true,
            Drained::RoleChange(f) => return f,
            Drained::Broken => false,
        };
        if drained_cleanly {
            match death {
                Death::OwnerDied => {
                    let tail = u.stream.torn_tail();
                    info!(slot = %control::slot_name(self.opt.slot), committed_end = tail.committed_end, torn = tail.uncommitted_bytes_seen, "active died (owner-died); stepping up");
                }
                Death::Identity => info!("active process is gone (identity check); stepping up"),
            }
        }
        let obs = role::AfterDrain {
            drained_cleanly,
            took_nothing_since_handover: drained_cleanly
                && self.took_nothing_since_handover(active),
            hot: *state == State::Hot,
            stream_closed: u.stream_region.closed().is_some(),
        };
        let loud = death == Death::OwnerDied;
        match role::on_active_dead(obs) {
            OnActiveDead::StepUp(why) => {
                if loud && why == StepUpBecause::TakeBackHandover {
                    warn!(
                        "the switchover target died before serving anything; taking the role back"
                    );
                }
                Follow::StepUp { planned: false }
            }
            OnActiveDead::Reattach(why) => {
                // A broken drain leaves a partial store too: the copy kept aside is still good.
                self.back_to_prefix();
                // What we hold now, for the supervisor's report (and `promote`): a consistent
                // copy is `Stale` (also one that no catch-up had touched yet: the active died
                // between our attach and its snapshot's begin).
                self.publish_holding();
                if loud
                    && why == NoStepUpBecause::NotHot
                    && self.not_hot_reported_epoch != Some(self.epoch)
                {
                    self.not_hot_reported_epoch = Some(self.epoch);
                    let st = State::from_word(self.control.get(self.opt.slot, Field::State));
                    warn!(
                        applied = self.commits,
                        state = st.name(),
                        "the active died before this standby was hot: it cannot step up ({}); it waits for an active",
                        if st == State::Stale {
                            "its copy stopped when its stream was closed: the transactions the active committed after that are on no standby"
                        } else {
                            "it was catching up: a partial state"
                        }
                    );
                }
                Follow::Reattach
            }
        }
    }

    /// The active died during our catch-up: go back to the consistent copy we held when it
    /// began, if any (the partial store is of no use without the active). We publish it as
    /// `Stale` with its transaction count, so the supervisor can say exactly what it holds.
    pub(super) fn back_to_prefix(&mut self) {
        if self.consistent {
            return;
        }
        let Some(p) = self.prefix.take() else {
            return;
        };
        let partial = std::mem::replace(&mut self.store, p.store);
        drop_off_thread(partial);
        self.set_commits(p.commits);
        self.consistent = true;
        self.app.on_snapshot_begin(&self.store);
        self.app.on_reset(&self.store);
        self.publish_holding();
        warn!(
            commits = self.commits,
            digest = format_args!("{:#x}", self.store.digest()),
            "back to the consistent copy held before the catch-up: {} transactions; `understudy promote` makes it active, losing what the dead active committed after it",
            self.commits
        );
    }

    /// After the active died: apply every batch it committed. A frame that fails validation
    /// or does not apply means our copy is not the committed state: never step up on it.
    pub(super) fn drain(&mut self, u: &mut Upstream, state: &mut State) -> Drained {
        loop {
            match self.read_and_apply(u, state) {
                Ok(None) => return Drained::Clean,
                Ok(Some(applied)) => match applied {
                    Ok(None) => {}
                    Ok(Some(f)) => return Drained::RoleChange(f),
                    Err(e) => {
                        self.consistent = false;
                        error!("a batch the dead active committed does not apply: {e}; not stepping up");
                        *state = State::Stale;
                        return Drained::Broken;
                    }
                },
                Err(e) => {
                    error!("a frame the dead active left is corrupt: {e}; not stepping up");
                    *state = State::Stale;
                    return Drained::Broken;
                }
            }
        }
    }

    /// Publish `Hot` after a base position or a complete catch-up, unless `stream` is closed:
    /// a standby is hot only while its stream is open. The active closes the stream, then
    /// writes `Stale` into our slot (see `Engine::untether`); we write `Hot`, then look at the
    /// close word again, so whichever order the two engines run in, a closed stream never
    /// leaves `Hot` in the slot.
    pub(super) fn become_hot(&mut self, stream: &Region) -> State {
        let s = self.opt.slot;
        if let Some(why) = stream.closed() {
            warn!(slot = %control::slot_name(s), reason = close_reason(why), "caught up, but the active closed the stream meanwhile: not hot");
            return self.not_hot_after_close(why);
        }
        self.control.set(s, Field::State, State::Hot as u64);
        // SYNC POINT (store → load): our `Hot` store is ordered before the re-read of the
        // close word; pairs with the active's close-then-`Stale` in `Engine::untether`.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        if let Some(why) = stream.closed() {
            warn!(slot = %control::slot_name(s), reason = close_reason(why), "the active closed the stream as this standby became hot: not hot");
            return self.not_hot_after_close(why);
        }
        State::Hot
    }

    /// Our state once the stream is seen closed: `Stale` if our consistent copy fell behind
    /// for good (untethered, corrupt), `Syncing` if we were merely detached (we re-attach at
    /// once, and a copy that still matches needs no catch-up) or hold a partial store.
    pub(super) fn not_hot_after_close(&mut self, why: u64) -> State {
        let st = if (why == CLOSE_UNTETHERED || why == CLOSE_CORRUPT) && self.consistent {
            State::Stale
        } else {
            State::Syncing
        };
        self.control.set(self.opt.slot, Field::State, st as u64);
        st
    }

    /// Publish what this standby holds when it is not hot: its count and digest first, then
    /// its state (the word readers decide on, stored last): `Stale` for a consistent copy,
    /// `Syncing` for a partial one.
    pub(super) fn publish_holding(&mut self) {
        let s = self.opt.slot;
        self.control.set(s, Field::Commits, self.commits);
        self.control.set(s, Field::Digest, self.store.digest());
        let st = if self.consistent {
            State::Stale
        } else {
            State::Syncing
        };
        self.control.set(s, Field::State, st as u64);
    }
}

/// The close word's reason, for logs.
pub(super) fn close_reason(why: u64) -> &'static str {
    match why {
        CLOSE_UNTETHERED => "untethered (it fell behind)",
        CLOSE_CORRUPT => "corrupt stream",
        CLOSE_REFUSED => "refused",
        CLOSE_DETACHED => "detached",
        _ => "unknown",
    }
}

/// What [`drop_off_thread`] may drop: a store, or a kept copy of one.
pub(super) trait Droppable: Send + 'static {
    /// Items in it (small ones are dropped in place).
    fn items(&self) -> usize;
}

impl Droppable for Store {
    fn items(&self) -> usize {
        self.unit_count() + self.record_count()
    }
}

impl Droppable for Option<Box<Prefix>> {
    fn items(&self) -> usize {
        self.as_ref().map_or(0, |p| p.store.items())
    }
}

/// Drop `store` on a thread of its own (at once if it is small, or if no thread can be made).
pub(super) fn drop_off_thread(store: impl Droppable) {
    if store.items() < 10_000 {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("understudy-drop".into())
        .spawn(move || drop(store));
}

/// A standby's housekeeping period while following.
const FOLLOW_HOUSEKEEPING_NS: u64 = 500_000;
/// How often the backstop liveness check runs.
const LIVENESS_CHECK_NS: u64 = 5_000_000;
/// How often an engine repairs its own checked words in the control block.
pub(super) const REPAIR_EVERY_NS: u64 = 10_000_000;
/// How often a standby acknowledges its position.
const ACK_EVERY: Duration = Duration::from_millis(1);
/// How long the old upstreams of a standby are kept before they are dropped, unless the new
/// one has done its first work sooner (see `reap`).
const REAP_AFTER: Duration = Duration::from_millis(20);
/// How long an old active that handed over waits for the switchover target to step up before
/// it takes the role back.
const HANDOVER_TARGET_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an engine of a fresh cluster (epoch 0) looks for an active before it becomes the
/// first one itself.
const FIRST_ACTIVE_AFTER: Duration = Duration::from_millis(20);
/// How often an engine looking for its active (to attach, or to step up) looks again.
const ATTACH_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Spin hints between two looks at `died` and the clock in [`paced_pause`] (one hint is
/// 10–140 cycles by CPU: a look every ~0.1–1 µs).
const PACE_CHUNK_SPINS: u32 = 64;

/// Wait `pause` between two polls of a stream that had nothing new, spinning (no system call,
/// the core stays ours), and end early when `died` says the active's process is gone, so that
/// death detection never waits for a pause. Returns the spin hints spent, which count as idle
/// polls toward the idle strategy's sleep.
///
/// Why a standby paces its polls: a standby that polls its stream continuously keeps the line
/// the active writes next (the next batch's commit word, and the lines its prefetcher pulls
/// beyond it) in its own cache, so the active pays a cross-core transfer for nearly every
/// transaction (+230–290 ns per 4-update transaction in `benches/replication.rs`, against +70
/// ns for the replication's own instructions). Polling once per pause instead lets the active
/// write a burst of transactions into lines no other core holds; the standby then reads the
/// burst in one go. What it costs: the standby applies up to one pause later (its copy is the
/// committed stream all the same; after the active's death it drains what is committed
/// before stepping up).
fn paced_pause(pause: Duration, mut died: impl FnMut() -> bool) -> u32 {
    let started = Instant::now();
    let mut spins = 0u32;
    loop {
        for _ in 0..PACE_CHUNK_SPINS {
            std::hint::spin_loop();
        }
        spins = spins.saturating_add(PACE_CHUNK_SPINS);
        if died() || started.elapsed() >= pause {
            return spins;
        }
    }
}

/// What a standby following its active keeps between polls.
pub(super) struct Watch {
    pub(super) active: usize,
    pub(super) active_id: ProcessIdentity,
    pub(super) idle_polls: u32,
    pub(super) last_house: u64,
    pub(super) last_alive_check: u64,
    /// When the stream last delivered a batch: a live active sends a heartbeat frame at least
    /// every 10 heartbeat intervals, so this is the second source before a fence. (Sampled at
    /// each liveness check from the batch count: no clock read per batch.)
    pub(super) last_frame_ns: u64,
    pub(super) batches: u32,
    pub(super) batches_at_check: u32,
    pub(super) lying_identity_warned: bool,
}

impl Watch {
    fn new(control: &Control, active: usize) -> Watch {
        let now = monotonic_ns();
        Watch {
            active,
            active_id: ProcessIdentity {
                pid: control.get(active, Field::Pid).min(u32::MAX as u64) as u32,
                start_time_ticks: control.get(active, Field::StartTime),
            },
            idle_polls: 0,
            last_house: 0,
            last_alive_check: now,
            last_frame_ns: now,
            batches: 0,
            batches_at_check: 0,
            lying_identity_warned: false,
        }
    }
}

/// What a step of `follow` says to do next.
pub(super) enum Step {
    /// Go on with this turn of the loop.
    Go,
    /// Start the next turn at once (no idle wait).
    Again,
    /// Leave `follow`.
    Exit(Follow),
}

/// How the standby learned that its active died.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Death {
    /// The kernel marked the robust mutex owner-died (the fast path).
    OwnerDied,
    /// The active's process identity is gone and no live thread holds the mutex (backstop).
    Identity,
}

pub(super) enum Drained {
    Clean,
    RoleChange(Follow),
    Broken,
}

pub(super) enum Attach {
    Attached(Box<Upstream>),
    BecomeActive,
    Stop,
}

pub(super) enum Follow {
    Reattach,
    StepUp { planned: bool },
    Stop,
}
