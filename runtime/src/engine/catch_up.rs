//! Catch-up: bring a new standby from a chunked snapshot to live, interleaved with live
//! transactions, so that it always converges.
//!
//! # Why a catch-up converges under any load the active can serve
//!
//! The snapshot is a walk of the active's store (units, then records) by a cursor that
//! visits every item existing from the walk's start to its end and not changed meanwhile
//! exactly once; every change made meanwhile travels in the live stream, after `SNAP_BEGIN`,
//! as a whole (a unit's full state, a record's full value), so applying the walk's items and
//! the live changes in stream order leaves the standby with the active's state at `SNAP_END`.
//!
//! The walk is sent two ways:
//! - **Per transaction** ([`Engine::catch_up_with_live_traffic`]): after every live
//!   transaction, a small piece of the walk (`catchup_chunk / 128`, at least 2 items) is
//!   pushed under the same back-pressure policy as the transaction itself. This is the
//!   progress guarantee: every transaction carries at least one item of the walk (a piece
//!   whose rest does not fit the ring now is cut short, never skipped), so a walk of N items
//!   ends after at most N transactions however fast they come, and after N / piece while the
//!   ring has room. It is also the flow control: when the standby
//!   applies slower than the active commits, every transaction waits for room for itself and
//!   its piece, so the active's admission slows to what the standby takes, instead of the
//!   ring filling until the standby is untethered.
//! - **Opportunistically** ([`catch_up_step`], from housekeeping): bigger chunks, but only
//!   into the half of the ring that no live traffic needs, so an idle or lightly loaded
//!   active finishes the walk at the standby's apply rate while live transactions keep half
//!   the ring as headroom and never wait for snapshot bytes.
//!
//! Untethering stays the last resort: only a standby that consumed nothing for the whole
//! back-pressure bound (default 20 ms) is let go, and the active logs why (its lag, the
//! walk's progress).

use super::*;

/// Snapshot items sent after every live transaction of a catch-up.
pub(super) fn piece_per_transaction(catchup_chunk: usize) -> usize {
    (catchup_chunk / 128).max(2)
}

impl<A: Application, I: Input> Engine<A, I> {
    /// The per-transaction piece of every walk under way (see the module's convergence
    /// argument): pushed with back-pressure, like the transaction it follows.
    pub(super) fn catch_up_with_live_traffic(&mut self) {
        let piece = piece_per_transaction(self.opt.catchup_chunk);
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &mut self.replicas[i];
            let ReplicaPhase::Streaming(Some(snap)) = &mut r.phase else {
                i += 1;
                continue;
            };
            let (store, scratch) = (&self.store, &mut self.scratch);
            let mut result = Ok(false);
            let pushed = push_waiting(&mut r.stream, self.opt.backpressure, |p| {
                match send_chunk(p, store, snap, piece, usize::MAX, scratch) {
                    Ok(sent) => {
                        result = Ok(sent == Sent::Done);
                        Ok(())
                    }
                    Err(e @ PushError::Full { .. }) => Err(e),
                    Err(e) => {
                        result = Err(e.to_string());
                        Ok(())
                    }
                }
            });
            if !pushed {
                let why = self.untether_reason(i);
                self.untether(i, &why);
                continue;
            }
            match result {
                Err(e) => self.detach(i, &format!("catch-up: {e}")),
                Ok(done) => {
                    let r = &mut self.replicas[i];
                    r.catchup_steps += 1;
                    if done {
                        end_snapshot(r, &self.store, self.commits, self.epoch);
                    }
                    if !self.test_untether_at_step(i) {
                        i += 1;
                    }
                }
            }
        }
    }

    /// Test hook (cargo feature `fault-injection` only; a release build has none): untether
    /// replica `i` once its catch-up has taken exactly `UNDERSTUDY_TEST_UNTETHER_AT_STEP`
    /// steps (1 = right after the snapshot's begin), once per process. True if it did.
    pub(super) fn test_untether_at_step(&mut self, i: usize) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            use std::sync::atomic::{AtomicBool, Ordering};
            static FIRED: AtomicBool = AtomicBool::new(false);
            // Read once: this runs after every live transaction of a catch-up.
            static AT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
            let at = *AT.get_or_init(|| {
                std::env::var("UNDERSTUDY_TEST_UNTETHER_AT_STEP")
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
            });
            if at.is_some_and(|at| at == self.replicas[i].catchup_steps)
                && !FIRED.swap(true, Ordering::Relaxed)
            {
                let steps = self.replicas[i].catchup_steps;
                self.untether(i, &format!("test hook: at catch-up step {steps}"));
                return true;
            }
        }
        let _ = i;
        false
    }

    /// Why replica `i` is being untethered, for the operator: how far behind it is and, in a
    /// catch-up, how far its snapshot got.
    pub(super) fn untether_reason(&mut self, i: usize) -> String {
        let r = &mut self.replicas[i];
        let lag = r.stream.position() - r.stream.consumer_position();
        let cap = r.stream.capacity();
        let phase = match &r.phase {
            ReplicaPhase::Streaming(Some(s)) => format!(
                "in catch-up ({} of {} units and {} records sent)",
                s.units_sent,
                self.store.unit_count(),
                s.records_sent
            ),
            _ => "streaming live".to_string(),
        };
        format!(
            "its stream is full and it consumed nothing for {:?} ({lag} of {cap} bytes unread, {phase}); it must catch up again",
            match self.opt.backpressure {
                Backpressure::Wait(d) => d,
                Backpressure::Untether => Duration::ZERO,
            }
        )
    }
}

/// What one call of [`send_chunk`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sent {
    /// No item fitted (or none was allowed): nothing was committed.
    Nothing,
    /// Some items; the walk goes on.
    Some,
    /// The walk is complete (`SNAP_END` is next).
    Done,
}

/// One opportunistic catch-up step for replica `r` (housekeeping): a chunk of the walk into
/// the half of the ring that live traffic does not need, then `SNAP_END` once complete.
pub(super) fn catch_up_step(
    r: &mut Replica,
    store: &Store,
    commits: u64,
    epoch: u64,
    chunk: usize,
    scratch: &mut Vec<u8>,
) -> Result<(), String> {
    let ReplicaPhase::Streaming(Some(snap)) = &mut r.phase else {
        return Ok(());
    };
    if !snap.is_done() {
        let headroom = r.stream.capacity() / 2;
        let budget = r.stream.free_bytes().saturating_sub(headroom);
        if budget == 0 {
            return Ok(());
        }
        match send_chunk(&mut r.stream, store, snap, chunk, budget, scratch) {
            Ok(Sent::Nothing) | Err(PushError::Full { .. }) => {}
            Ok(_) => r.catchup_steps += 1,
            Err(e) => return Err(format!("catch-up: {e}")),
        }
    }
    if snap.is_done() {
        end_snapshot(r, store, commits, epoch);
    }
    Ok(())
}

/// Publish `SNAP_END` (the active's position after the last transaction) once the walk is
/// complete; if the ring is full now, the next step tries again.
fn end_snapshot(r: &mut Replica, store: &Store, commits: u64, epoch: u64) {
    let pos = position_of(store, commits, epoch, 0);
    if r.stream
        .try_publish(rt::SNAP_END, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
        .is_ok()
    {
        r.phase = ReplicaPhase::Streaming(None);
        r.catchup_steps += 1;
        debug!(slot = %control::slot_name(r.slot), steps = r.catchup_steps, "catch-up sent in full");
    }
}

/// Send up to `max` items of the walk, and no more than `budget` bytes, as one batch. Items
/// that do not fit the ring now stay for the next call (`PushError::Full` only if not even
/// the first fitted).
pub(super) fn send_chunk(
    stream: &mut Producer<RegionMemory>,
    store: &Store,
    snap: &mut Snapshot,
    max: usize,
    budget: usize,
    scratch: &mut Vec<u8>,
) -> Result<Sent, PushError> {
    let mut b = stream.batch();
    let mut n = 0;
    let mut stop: Option<PushError> = None;
    if !snap.units_done {
        let mut last = snap.units_after;
        for (next, id, u) in store.units_from(snap.units_after, max) {
            if b.bytes() >= budget {
                break;
            }
            let (t, bl) = protocol::encode_put_unit(id, u.kind, u.layout_version, u.state, scratch);
            if let Err(e) = b.push(t, 1, bl, scratch) {
                stop = Some(e);
                break;
            }
            last = next;
            n += 1;
        }
        // Fewer than asked for, and not for want of room: the walk of the units is complete.
        if stop.is_none() && n < max && b.bytes() < budget {
            snap.units_done = true;
        }
        snap.units_after = last;
        snap.units_sent += n as u64;
    } else {
        // The last record sent, seen in place; copied into the cursor once, after the loop.
        let mut last: Option<(u16, &[u8])> = None;
        for (table, key, value) in store.records_after(snap.records_after.as_ref(), max) {
            if b.bytes() >= budget {
                break;
            }
            let (t, bl) = protocol::encode_put(table, key, value, scratch);
            if let Err(e) = b.push(t, 1, bl, scratch) {
                stop = Some(e);
                break;
            }
            last = Some((table, key));
            n += 1;
        }
        if let Some((table, key)) = last {
            match &mut snap.records_after {
                Some((t, k)) => {
                    *t = table;
                    k.clear();
                    k.extend_from_slice(key);
                }
                none => *none = Some((table, key.to_vec())),
            }
        }
        if stop.is_none() && n < max && b.bytes() < budget {
            snap.records_done = true;
        }
        snap.records_sent += n as u64;
    }
    if n > 0 {
        b.commit();
    }
    match stop {
        // The chunk so far plus this item would not fit: what we have is committed, the item
        // goes first next time. An item that fits no empty ring is an error.
        Some(PushError::Full { .. }) | Some(PushError::TooLarge { .. }) if n > 0 => Ok(Sent::Some),
        Some(e) => Err(e),
        None if snap.is_done() => Ok(Sent::Done),
        None if n > 0 => Ok(Sent::Some),
        None => Ok(Sent::Nothing),
    }
}
