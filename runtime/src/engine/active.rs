//! The active role: take a request, run it in a transaction, commit it to every standby,
//! answer; between requests, obey the supervisor's commands.

use super::*;

/// Housekeeping while busy runs at most this often (ns): it costs tens of µs with standbys.
const HOUSEKEEPING_BUSY_NS: u64 = 200_000;
/// Housekeeping while idle runs at most this often (ns).
const HOUSEKEEPING_IDLE_NS: u64 = 20_000;
/// The service-time p99 is published this often (ns) once its window holds enough samples...
const SERVICE_P99_EVERY_NS: u64 = 100_000_000;
/// ... and at least this often (ns) whatever the window holds.
const SERVICE_P99_AT_LEAST_EVERY_NS: u64 = 1_000_000_000;
/// A switchover's target that already says it is hot gets this long to confirm it to the
/// active (acks come every millisecond, but on a loaded host one can take seconds).
const SWITCHOVER_HOT_TARGET_WAIT: Duration = Duration::from_secs(5);
/// ... and a target still attaching gets this long.
const SWITCHOVER_ATTACHING_TARGET_WAIT: Duration = Duration::from_secs(1);
/// An enable waits this long for a standby mid-handshake to say which features it has.
const ENABLE_HANDSHAKE_WAIT: Duration = Duration::from_secs(1);

/// When the active loop's periodic work last ran (CLOCK_MONOTONIC ns).
#[derive(Default)]
struct Housekeeping {
    last: u64,
    last_heartbeat_frame: u64,
}

impl<A: Application, I: Input> Engine<A, I> {
    pub(super) fn run_active(&mut self) -> Result<Next, EngineError> {
        self.publish_status(Role::Active, State::Serving);
        // The role hook runs before the first request is taken (and before a committed but
        // undelivered response is re-emitted).
        let activation = crate::app::Activation {
            takeover: self.takeover,
            epoch: self.epoch,
            commits: self.commits,
        };
        self.app.on_active(&activation, &self.store);
        // Every transaction is held to what one batch of a standby's stream can carry, with
        // or without a standby attached (see `TxTooLarge`).
        self.tx.limit_bytes = shm_layout::ring::max_batch_bytes(self.opt.ring_capacity);
        self.timers_resume();
        self.input.resume(&self.store);
        let mut idle_polls: u32 = 0;
        let mut house = Housekeeping::default();
        let mut iter: u32 = 0;
        loop {
            iter = iter.wrapping_add(1);
            if let Some((seq, pending)) = self.control.pending_command() {
                if let Some(next) = self.command(seq, pending)? {
                    return Ok(next);
                }
            }
            let busy = if let Some(meta) = self.input.poll(&mut self.request) {
                self.transact(meta);
                idle_polls = 0;
                true
            } else {
                false
            };
            // Due timers, a bounded number per turn, between requests. The clock is read only
            // while a timer is armed, and when busy on one turn in 16.
            if self.next_timer.any() && (!busy || iter % 16 == 0) {
                let now = monotonic_ns();
                if self.next_timer.may_be_due(now) {
                    self.fire_due_timers(now);
                }
            }
            // Idle and spinning, housekeeping (two clock reads, tens of ns each on a VM) runs
            // every 16th poll, so a request arriving is noticed sooner; before every sleep.
            let idle_tick =
                !busy && (idle_polls % 16 == 0 || idle_polls >= self.opt.idle.spin_polls);
            if idle_tick || busy && iter % 64 == 0 {
                let now = monotonic_ns();
                let due = if busy {
                    HOUSEKEEPING_BUSY_NS
                } else {
                    HOUSEKEEPING_IDLE_NS
                };
                if now - house.last > due {
                    if let Some(next) = self.housekeeping(now, &mut house) {
                        return Ok(next);
                    }
                }
                if idle_tick {
                    self.input.idle();
                    while let Some(source) = self.input.take_retired() {
                        self.retire_source(source);
                    }
                }
            }
            if !busy {
                idle_polls = idle_polls.saturating_add(1);
                self.idle_wait(idle_polls);
            }
        }
    }

    /// The active's periodic work between requests: its heartbeat and published words, the
    /// supervisor's stop command, attaching and serving standbys, preparing the next epoch's
    /// regions, heartbeat frames. `Some` when the engine is to stop.
    fn housekeeping(&mut self, now: u64, house: &mut Housekeeping) -> Option<Next> {
        let s = self.opt.slot;
        if now / REPAIR_EVERY_NS != house.last / REPAIR_EVERY_NS {
            self.control.repair_own(s);
        }
        house.last = now;
        self.control.set(s, Field::HeartbeatNs, now);
        self.control.set(s, Field::Commits, self.commits);
        self.control.set(s, Field::Requests, self.requests);
        self.control.set(s, Field::Refusals, self.refusals);
        self.publish_counters(now);
        self.publish_service_p99(now);
        self.control.set(s, Field::Digest, self.store.digest());
        self.leftovers.reap(self.served);
        if self.control.take_slot_command(s, SlotCommand::Stop) {
            info!(slot = %control::slot_name(s), "stopping on command");
            return Some(Next::Stop);
        }
        self.attach_new_replicas();
        self.service_replicas();
        // With a hot standby, a planned switchover may come: prepare our standby regions of
        // the next epoch now, outside its pause.
        if self.prepared.as_ref().map(|p| p.epoch) != Some(self.epoch + 1)
            && self.replicas.iter().any(|r| r.hot)
        {
            self.discard_prepared();
            match self.prepare_upstream(self.epoch + 1) {
                Ok(p) => self.prepared = Some(p),
                Err(e) => debug!("cannot prepare the next epoch's regions: {e}"),
            }
        }
        if now - house.last_heartbeat_frame > self.opt.heartbeat.as_nanos() as u64 * 10 {
            house.last_heartbeat_frame = now;
            self.heartbeat_frames(now);
        }
        None
    }

    /// A p99 says something over enough requests: publish every 100 ms once the window holds
    /// `MIN_SAMPLES` timed requests, else every second (a window of under 100 requests has its
    /// maximum for its p99: one preemption would be "the p99").
    fn publish_service_p99(&mut self, now: u64) {
        let age = now - self.service_published_ns;
        if age > SERVICE_P99_EVERY_NS && self.service.count >= ServiceTimes::MIN_SAMPLES
            || age > SERVICE_P99_AT_LEAST_EVERY_NS
        {
            self.service_published_ns = now;
            self.control.set(
                self.opt.slot,
                Field::ServiceP99Ns,
                self.service.p99_and_reset(),
            );
        }
    }

    /// Does the idle strategy still spin after `polls` empty polls (rather than sleep)?
    pub(super) fn spinning(&self, polls: u32) -> bool {
        polls < self.opt.idle.spin_polls || self.opt.idle.sleep.is_zero()
    }

    pub(super) fn idle_wait(&self, polls: u32) {
        if polls < self.opt.idle.spin_polls || self.opt.idle.sleep.is_zero() {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(self.opt.idle.sleep);
        }
    }

    /// Run one request as a transaction and commit it.
    pub(super) fn transact(&mut self, meta: InputMeta) {
        // The service time of one request in `SERVICE_SAMPLE_EVERY` is measured: two clock
        // reads cost tens of ns on a VM, a noticeable share of a sub-microsecond round trip,
        // and a p99 over a quarter of the requests is as good a p99.
        let timed = self.requests % ServiceTimes::SAMPLE_EVERY == 0;
        let t0 = if timed { monotonic_ns() } else { 0 };
        let req = std::mem::take(&mut self.request);
        let refused = execute(
            &mut self.app,
            &self.store,
            &mut self.tx,
            self.enabled,
            &self.write_versions,
            &meta,
            &req,
        );
        self.request = req;
        self.timers_armed();
        self.commit_tx(&commit_block(self.commits, &meta));
        self.requests += 1;
        self.input.committed(&meta, &self.tx.response);
        // Every transaction carries a piece of any catch-up under way (see `catch_up`): after
        // the store has it (a snapshot end carries the digest after it) and after the answer
        // is out. Timer and source-retiring transactions do the same after their commit.
        self.catch_up_with_live_traffic();
        self.refusals += refused as u64;
        if timed {
            let ns = monotonic_ns().saturating_sub(t0);
            self.service.record(ns);
            if let Some(k) = &self.counters {
                k.service_time(ns);
            }
        }
        if let Some(k) = &self.counters {
            k.add(Counter::REQUESTS_TOTAL, 1);
            k.add(Counter::REFUSALS_TOTAL, refused as u64);
        }
    }

    /// Keep command `seq` pending (true) for up to `bound`, while a standby finishes
    /// attaching: the supervisor posts right after it saw the standby hot.
    pub(super) fn defer_command(&mut self, seq: u64, bound: Duration) -> bool {
        defer_decision(&mut self.cmd_seen, seq, bound, Instant::now())
    }

    /// Forget a source's replicated position, in a transaction of its own.
    pub(super) fn retire_source(&mut self, source: u64) {
        self.tx.clear();
        let key = self.tx.spare.copy_of(&source.to_le_bytes());
        self.tx.ops.push(Op::Delete {
            table: SYS_INPUTS,
            key,
        });
        let commit = CommitBlock {
            index: self.commits,
            input_pos: 0,
            input_seq: 0,
            source,
            request_seq: u64::MAX,
            response_len: 0,
            flags: 1,
        };
        self.commit_tx(&commit);
        self.catch_up_with_live_traffic();
        info!(source, "input source retired");
    }

    /// Commit the transaction in `self.tx`: on every standby's stream first, then into our
    /// store (the handler already updated the application's own in-memory view: `on_apply`
    /// is for changes a standby receives).
    pub(super) fn commit_tx(&mut self, commit: &CommitBlock) {
        if !self.served {
            // SYNC POINT: first commit of this role (Release before the commit is replicated;
            // read by a handed-over old active deciding whether it may take the role back).
            self.served = true;
            self.control.set(self.opt.slot, Field::Served, 1);
        }
        self.replicate_tx(commit);
        self.tx.apply_to(&mut self.store);
        self.commits += 1;
        if let Some(k) = &self.counters {
            k.add(Counter::COMMITS_TOTAL, 1);
            k.set(Counter::TX_INDEX, self.commits);
        }
    }

    /// Push the transaction's ops and commit to every streaming replica as one batch each.
    pub(super) fn replicate_tx(&mut self, commit: &CommitBlock) {
        let mut i = 0;
        while i < self.replicas.len() {
            if !matches!(self.replicas[i].phase, ReplicaPhase::Streaming(_)) {
                i += 1;
                continue;
            }
            let ops = &self.tx.ops;
            let ok = push_waiting(&mut self.replicas[i].stream, self.opt.backpressure, |p| {
                push_tx(p, ops, commit)
            });
            if ok {
                i += 1;
            } else {
                let why = self.untether_reason(i);
                self.untether(i, &why);
            }
        }
    }

    pub(super) fn heartbeat_frames(&mut self, now: u64) {
        let hb = HeartbeatBlock {
            now_ns: now,
            commits: self.commits,
        };
        for r in &mut self.replicas {
            if matches!(r.phase, ReplicaPhase::Streaming(_)) {
                let _ =
                    r.stream
                        .try_publish(rt::HEARTBEAT, 1, 16, zerocopy::IntoBytes::as_bytes(&hb));
            }
        }
    }

    /// Handle a cluster command; `Some(next)` if the role changes.
    /// Obey the supervisor's command `seq`. `Some` when the engine leaves the active role.
    pub(super) fn command(
        &mut self,
        seq: u64,
        pending: Pending,
    ) -> Result<Option<Next>, EngineError> {
        match pending {
            Pending::Command(ClusterCommand::Switchover { target }) => {
                Ok(self.switchover_command(seq, target))
            }
            Pending::Command(ClusterCommand::EnableFeatures { mask }) => {
                self.enable_command(seq, mask);
                Ok(None)
            }
            Pending::Withdrawn => {
                self.cmd_seen = None;
                self.control.answer(seq, CommandResult::Ok);
                Ok(None)
            }
            Pending::Bad(bad) => {
                warn!("command refused: {bad}");
                self.cmd_seen = None;
                self.control.answer(seq, CommandResult::UnknownCommand);
                Ok(None)
            }
        }
    }

    /// Hand the role to the hot standby in `target` (`target < SLOTS`: decoded so).
    fn switchover_command(&mut self, seq: u64, target: usize) -> Option<Next> {
        let ok = self
            .replicas
            .iter()
            .any(|r| r.slot == target && r.hot && matches!(r.phase, ReplicaPhase::Streaming(None)));
        // The target may be attached without having confirmed it is hot yet (acks come every
        // millisecond). A target that already says it is hot (what an operator or the
        // supervisor saw before asking) gets seconds; one still attaching gets one second.
        let says_hot = State::from_word(self.control.get(target, Field::State)) == State::Hot;
        let bound = if says_hot {
            SWITCHOVER_HOT_TARGET_WAIT
        } else {
            SWITCHOVER_ATTACHING_TARGET_WAIT
        };
        if !ok && self.defer_command(seq, bound) {
            return None;
        }
        self.cmd_seen = None;
        if !ok {
            warn!(target = %control::slot_name(target), "switchover refused: target is not a hot standby");
            self.control.answer(seq, CommandResult::NotHot);
            return None;
        }
        match self.switchover(target) {
            Ok(up) => {
                self.control.answer(seq, CommandResult::Ok);
                Some(Next::Standby(Some(Box::new(up))))
            }
            Err(e) => {
                warn!("switchover refused: {e}; still active");
                self.control.answer(seq, CommandResult::Busy);
                None
            }
        }
    }

    /// Enable the features `want` on every engine, if every live one supports them.
    fn enable_command(&mut self, seq: u64, want: u64) {
        // Drop standbys that stopped or died since the last housekeeping: a retired
        // old-version engine must not veto the features.
        self.service_replicas();
        let alive: Vec<bool> = self
            .replicas
            .iter()
            .map(|r| self.slot_alive(r.slot))
            .collect();
        let attaching = self
            .replicas
            .iter()
            .zip(&alive)
            .any(|(r, a)| *a && r.agreement.is_none());
        // A standby mid-handshake: decide once it has said which features it has.
        if attaching && self.defer_command(seq, ENABLE_HANDSHAKE_WAIT) {
            return;
        }
        self.cmd_seen = None;
        let mut can = self
            .features
            .iter()
            .filter(|f| f.id < 64)
            .fold(0u64, |m, f| m | 1 << f.id);
        for (r, a) in self.replicas.iter().zip(&alive) {
            if !*a {
                continue;
            }
            match &r.agreement {
                Some(a) => can &= a.enableable,
                None => can = 0,
            }
        }
        if want & !can != 0 {
            warn!(
                want,
                can, "enable refused: not every engine supports these features"
            );
            self.control.answer(seq, CommandResult::NotEnableable);
            return;
        }
        self.set_features(self.enabled | want);
        self.control.answer(seq, CommandResult::Ok);
    }

    pub(super) fn set_features(&mut self, enabled: u64) {
        let fb = FeaturesBlock {
            enabled,
            commits: self.commits,
        };
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &mut self.replicas[i];
            // Under load the ring may be momentarily full: wait as for a transaction.
            let sent = !matches!(r.phase, ReplicaPhase::Streaming(_))
                || push_waiting(&mut r.stream, self.opt.backpressure, |p| {
                    p.try_publish(rt::FEATURES, 1, 16, zerocopy::IntoBytes::as_bytes(&fb))
                });
            if sent {
                i += 1;
                continue;
            }
            // A standby that missed the switch would write the old layouts after a step-up:
            // untether it; it catches up and learns the enabled set from the hello.
            self.untether(i, "no room for the feature switch");
        }
        self.enabled = enabled;
        self.write_versions = write_versions(&self.templates, &self.features, enabled);
        self.control.set(self.opt.slot, Field::Features, enabled);
        info!(enabled, "features enabled");
    }
}

/// Request service times in power-of-two buckets (no allocation, a few ns per request).
pub(super) struct ServiceTimes {
    pub(super) buckets: [u32; 64],
    pub(super) count: u32,
}

impl Default for ServiceTimes {
    fn default() -> Self {
        ServiceTimes {
            buckets: [0; 64],
            count: 0,
        }
    }
}

impl ServiceTimes {
    /// Requests a window needs before its p99 is published early.
    pub(super) const MIN_SAMPLES: u32 = 1000;
    /// One request in this many is timed.
    pub(super) const SAMPLE_EVERY: u64 = 4;

    pub(super) fn record(&mut self, ns: u64) {
        let b = 64 - ns.max(1).leading_zeros() as usize;
        self.buckets[b.min(63)] = self.buckets[b.min(63)].saturating_add(1);
        self.count = self.count.saturating_add(1);
    }

    /// The upper bound of the bucket holding the 99th percentile; 0 with no samples.
    pub(super) fn p99_and_reset(&mut self) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = self.count - self.count / 100;
        let mut seen = 0u32;
        let mut p99 = 0u64;
        for (b, n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= target {
                p99 = if b >= 63 { u64::MAX } else { 1u64 << b };
                break;
            }
        }
        *self = ServiceTimes::default();
        p99
    }
}

/// SIGKILL a hung engine: its robust mutex becomes owner-died and its standby steps up. The
/// caller checked its identity (pid + start time, so a reused pid is very unlikely).
/// Whether to put off deciding command `seq` (its target may still be confirming it is hot):
/// yes until `bound` has passed since this command was first seen. A command first seen under
/// another sequence number (a command that a failover or a newer request superseded, left
/// over in `seen`) starts its own clock: it must never inherit an older command's, which
/// refused a new switchover as "not hot" at once.
pub(super) fn defer_decision(
    seen: &mut Option<(u64, Instant)>,
    seq: u64,
    bound: Duration,
    now: Instant,
) -> bool {
    match *seen {
        Some((s, first)) if s == seq => {
            if now.saturating_duration_since(first) < bound {
                return true;
            }
            *seen = None;
            false
        }
        _ => {
            *seen = Some((seq, now));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{defer_decision, ServiceTimes};
    use std::time::{Duration, Instant};

    /// A switchover left over from a superseded command does not make the next one refused at
    /// once as "not hot": each sequence number is deferred on its own clock.
    #[test]
    fn a_command_left_over_from_a_superseded_one_gets_its_own_deferral() {
        let t0 = Instant::now();
        let bound = Duration::from_secs(1);
        let mut seen = None;
        // Command 7 is deferred, then decided once its bound has passed.
        assert!(defer_decision(&mut seen, 7, bound, t0));
        assert!(defer_decision(
            &mut seen,
            7,
            bound,
            t0 + Duration::from_millis(500)
        ));
        assert!(!defer_decision(
            &mut seen,
            7,
            bound,
            t0 + Duration::from_secs(2)
        ));
        assert_eq!(seen, None);
        // Command 8 was seen, then superseded (a failover) before being decided: command 9,
        // much later, is deferred on its own clock, not refused on 8's.
        assert!(defer_decision(&mut seen, 8, bound, t0));
        let later = t0 + Duration::from_secs(30);
        assert!(defer_decision(&mut seen, 9, bound, later));
        assert!(defer_decision(
            &mut seen,
            9,
            bound,
            later + Duration::from_millis(900)
        ));
        assert!(!defer_decision(
            &mut seen,
            9,
            bound,
            later + Duration::from_secs(1)
        ));
    }

    /// One long preemption among a full window does not move the p99; the window resets.
    #[test]
    fn service_p99_of_a_full_window_ignores_one_outlier() {
        let mut t = ServiceTimes::default();
        for _ in 0..ServiceTimes::MIN_SAMPLES - 1 {
            t.record(900);
        }
        t.record(16_000_000);
        assert_eq!(t.p99_and_reset(), 1024);
        assert_eq!(t.p99_and_reset(), 0, "reset");
        t.record(900);
        t.record(16_000_000);
        assert!(
            t.p99_and_reset() >= 16_000_000,
            "two samples: the p99 is the maximum"
        );
    }
}
