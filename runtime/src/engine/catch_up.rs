//! Catch-up: bring a new standby from a base position or a chunked snapshot to live,
//! interleaved with live transactions.

use super::*;

impl<A: Application, I: Input> Engine<A, I> {
    /// Under sustained load the ring is mostly full of live transactions; a syncing standby
    /// also gets a small snapshot chunk after every transaction, so catch-up always progresses
    /// (the active is paced by back-pressure to what the standby can take).
    pub(super) fn catch_up_with_live_traffic(&mut self) {
        let chunk = (self.opt.catchup_chunk / 16).max(4);
        let mut i = 0;
        while i < self.replicas.len() {
            let r = &mut self.replicas[i];
            if !matches!(r.phase, ReplicaPhase::Streaming(Some(_))) {
                i += 1;
                continue;
            }
            match catch_up_step(
                r,
                &self.store,
                self.commits,
                self.epoch,
                chunk,
                &mut self.scratch,
            ) {
                Ok(()) => i += 1,
                Err(why) => self.detach(i, &why),
            }
        }
    }
}

/// One catch-up step for replica `r`: a chunk of the snapshot, then `SnapEnd` once complete.
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
    let done = send_chunk(&mut r.stream, store, snap, chunk, scratch)
        .map_err(|e| format!("catch-up: {e}"))?;
    if done {
        let pos = position_of(store, commits, epoch, 0);
        match r
            .stream
            .try_publish(rt::SNAP_END, 1, 56, zerocopy::IntoBytes::as_bytes(&pos))
        {
            Ok(()) => r.phase = ReplicaPhase::Streaming(None),
            Err(PushError::Full { .. }) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(())
}

/// Send one catch-up chunk; true when the snapshot is complete.
pub(super) fn send_chunk(
    stream: &mut Producer<RegionMemory>,
    store: &Store,
    snap: &mut Snapshot,
    chunk: usize,
    scratch: &mut Vec<u8>,
) -> Result<bool, PushError> {
    let mut b = stream.batch();
    let mut n = 0;
    if !snap.units_done {
        let mut last = snap.units_after;
        let mut full = false;
        for (next, id, u) in store.units_from(snap.units_after, chunk) {
            let (t, bl) = protocol::encode_put_unit(id, u.kind, u.layout_version, u.state, scratch);
            match b.push(t, 1, bl, scratch) {
                Ok(()) => {}
                Err(PushError::Full { .. }) => {
                    full = true;
                    break;
                }
                // The chunk so far plus this item would not fit even an empty ring: commit what
                // we have, the item goes first in the next chunk.
                Err(PushError::TooLarge { .. }) if n > 0 => {
                    full = true;
                    break;
                }
                Err(e) => return Err(e),
            }
            last = next;
            n += 1;
        }
        if !full && n < chunk {
            snap.units_done = true;
        }
        snap.units_after = last;
        if n > 0 {
            b.commit();
        }
        return Ok(false);
    }
    let mut last = snap.records_after.clone();
    let mut done = true;
    for (table, key, value) in store.records_after(snap.records_after.as_ref(), chunk) {
        let (t, bl) = protocol::encode_put(table, key, value, scratch);
        match b.push(t, 1, bl, scratch) {
            Ok(()) => {}
            Err(PushError::Full { .. }) => {
                done = false;
                break;
            }
            Err(PushError::TooLarge { .. }) if n > 0 => {
                done = false;
                break;
            }
            Err(e) => return Err(e),
        }
        last = Some((table, key.to_vec()));
        n += 1;
    }
    if n == chunk {
        done = false;
    }
    snap.records_after = last;
    if n > 0 {
        b.commit();
    }
    Ok(done)
}
