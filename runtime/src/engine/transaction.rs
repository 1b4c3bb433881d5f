//! One transaction: the write buffers, running a request against the store, the commit
//! block and pushing a committed batch to a stream.

use super::*;
use crate::app::{Ident, TxTooLarge, INDEX_FROM_OPS};
use shm_layout::frame::{frame_bytes, FRAME_ALIGN};

/// What a transaction is built in, kept from one transaction to the next: with the store
/// handing back the buffers it lets go of ([`Spare`]), a running engine's transactions
/// allocate nothing in steady state.
#[derive(Debug)]
#[doc(hidden)]
pub struct TxBuffers {
    /// The transaction's changes, the input position record last.
    pub ops: Vec<Op>,
    /// Its response.
    pub response: Vec<u8>,
    /// Buffers for the next transactions' changes.
    pub spare: Spare,
    /// The most a transaction may take in the stream (see [`crate::app::TxTooLarge`]); an
    /// engine sets it from its `Options::ring_capacity`.
    pub limit_bytes: usize,
    /// The clock [`Tx::now_ns`] reads: `None` is `CLOCK_MONOTONIC`; a model sets its own.
    pub clock_ns: Option<u64>,
    /// The index of `ops` by what each changes (built past [`INDEX_FROM_OPS`] changes).
    index: OpIndex,
    /// Payload bytes of the changes added through [`TxBuffers::push_op`] (for a quick bound).
    payload_bytes: usize,
    /// Stream frames of `ops[..sized]`: their bytes, and the largest frame (counted when the
    /// size is asked for, so adding a change costs nothing more than the push).
    sized: std::cell::Cell<usize>,
    frames_bytes: std::cell::Cell<usize>,
    frame_max_bytes: std::cell::Cell<usize>,
    /// `Tx::now_ns` of this transaction once read (0: not yet).
    now_ns: std::cell::Cell<u64>,
    /// The timer sequence record of this transaction: its index in `ops` and the next id.
    pub(crate) timer_seq: Option<(usize, u64)>,
    /// The earliest deadline this transaction armed (`u64::MAX`: none).
    pub(crate) armed_min_ns: u64,
}

/// `Options::new`'s `ring_capacity`: the limit of a transaction built outside an engine.
const DEFAULT_RING_CAPACITY: usize = 8 << 20;

impl Default for TxBuffers {
    fn default() -> Self {
        TxBuffers::new()
    }
}

impl TxBuffers {
    /// Empty buffers, with the limit of the default ring.
    pub fn new() -> TxBuffers {
        TxBuffers {
            ops: Vec::with_capacity(64),
            response: Vec::with_capacity(256),
            spare: Spare::new(),
            limit_bytes: shm_layout::ring::max_batch_bytes(DEFAULT_RING_CAPACITY),
            clock_ns: None,
            index: OpIndex::default(),
            payload_bytes: 0,
            sized: std::cell::Cell::new(0),
            frames_bytes: std::cell::Cell::new(0),
            frame_max_bytes: std::cell::Cell::new(0),
            now_ns: std::cell::Cell::new(0),
            timer_seq: None,
            armed_min_ns: u64::MAX,
        }
    }

    /// Drop the changes (keeping their buffers) and the response.
    pub fn clear(&mut self) {
        for op in self.ops.drain(..) {
            self.spare.recycle(op);
        }
        self.response.clear();
        self.index.clear();
        self.payload_bytes = 0;
        self.sized.set(0);
        self.frames_bytes.set(0);
        self.frame_max_bytes.set(0);
        self.now_ns.set(0);
        self.timer_seq = None;
        self.armed_min_ns = u64::MAX;
    }

    /// Move the transaction's changes into `store` (once they are on every standby's
    /// stream); the buffers this frees are kept for the next transactions.
    pub fn apply_to(&mut self, store: &mut Store) {
        for op in self.ops.drain(..) {
            store.apply_owned(op, &mut self.spare);
        }
        self.index.clear();
        self.payload_bytes = 0;
        self.sized.set(0);
        self.frames_bytes.set(0);
        self.frame_max_bytes.set(0);
    }

    /// Add a change, keeping the index up to date once it is built.
    #[inline(always)]
    pub(crate) fn push_op(&mut self, op: Op) {
        // Inlined where the change is built, this is one addition of lengths at hand.
        self.payload_bytes += op_payload_bytes(&op);
        self.ops.push(op);
        if self.ops.len() > INDEX_FROM_OPS {
            self.index_last();
        }
    }

    /// Index the change just added (building the index if this is the first past
    /// [`INDEX_FROM_OPS`]).
    #[inline(never)]
    fn index_last(&mut self) {
        if self.index.is_built() {
            self.index.insert(&self.ops, self.ops.len() - 1);
        } else {
            self.index.build(&self.ops);
        }
    }

    /// The changes to look through for the last change to `what`: all of them while the index
    /// is not built (a scan from the end), else the one the index names, or none.
    #[inline]
    pub(crate) fn candidates(&self, what: Ident<'_>) -> &[Op] {
        if !self.index.is_built() {
            return &self.ops;
        }
        match self.index.find(&self.ops, what) {
            Some(i) => &self.ops[i..=i],
            None => &[],
        }
    }

    /// The bytes the transaction takes in the stream: its changes, the input position record
    /// with the response so far, the commit frame, and the padding one wrap may need.
    pub(crate) fn encoded_len(&self) -> usize {
        let (mut sum, mut max) = (self.frames_bytes.get(), self.frame_max_bytes.get());
        for op in &self.ops[self.sized.get()..] {
            let fb = frame_bytes(op_payload_bytes(op));
            sum += fb;
            max = max.max(fb);
        }
        self.sized.set(self.ops.len());
        self.frames_bytes.set(sum);
        self.frame_max_bytes.set(max);
        // The input-position record: a `Put` of an 8-byte key and a 24-byte position before
        // the response (see `SourcePosition::encode`).
        let input = frame_bytes(16 + 8 + 24 + self.response.len());
        let commit = frame_bytes(48);
        let largest = max.max(input).max(commit);
        // A frame that would cross the ring's end is preceded by a padding frame filling the
        // rest of the lap: less than that frame's own size, so at most the largest frame's
        // size less one alignment unit.
        sum + input + commit + largest - FRAME_ALIGN
    }

    /// The transaction's notion of now (see [`Tx::now_ns`]).
    pub(crate) fn now_ns(&self) -> u64 {
        if let Some(t) = self.clock_ns {
            return t;
        }
        if self.now_ns.get() == 0 {
            self.now_ns.set(monotonic_ns().max(1));
        }
        self.now_ns.get()
    }

    /// The oversize refusal of the transaction as it stands, if it is over the limit.
    fn too_large(&self) -> Option<TxTooLarge> {
        // A quick bound first: a frame takes at most its payload + 63 bytes, the padding is
        // less than the largest frame, so twice the frames' bound is more than the batch. A
        // transaction under half the limit by this bound is not looked at change by change.
        let input = frame_bytes(16 + 8 + 24 + self.response.len());
        let frames_max = self.payload_bytes + 63 * self.ops.len() + input + frame_bytes(48);
        if frames_max.saturating_mul(2) <= self.limit_bytes {
            return None;
        }
        let found_bytes = self.encoded_len();
        (found_bytes > self.limit_bytes).then_some(TxTooLarge {
            found_bytes,
            limit_bytes: self.limit_bytes,
        })
    }
}

/// The payload bytes `protocol::encode_op` writes for `op` (its fixed block and its variable
/// parts); checked against the encoder in this file's tests.
#[inline]
fn op_payload_bytes(op: &Op) -> usize {
    protocol::op_frame(op).2
}

/// A hash index of a transaction's changes by what each changes (open addressing, linear
/// probing, at most half full), holding the position in `ops` of the latest change to each
/// unit and record. Its table is kept from transaction to transaction: only the part in use is
/// cleared, so a transaction of a few changes after a bulk load of thousands clears a few
/// slots, and it allocates only to grow past the largest transaction seen.
#[derive(Debug, Default)]
struct OpIndex {
    slots: Vec<u32>,
    /// Slots in use: a power of two, 0 when not built.
    live: usize,
    entries: usize,
}

const EMPTY: u32 = u32::MAX;

fn ident_hash(what: Ident<'_>) -> u64 {
    let h = match what {
        Ident::Unit(id) => id ^ 0x5555_5555_5555_5555,
        Ident::Record(table, key) => crate::store::hash_parts(&[&table.to_le_bytes(), key]),
    };
    // A finaliser (murmur3's): the slot is taken from the low bits.
    let h = (h ^ (h >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    let h = (h ^ (h >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl OpIndex {
    #[inline]
    fn is_built(&self) -> bool {
        self.live != 0
    }

    #[inline]
    fn clear(&mut self) {
        if self.live != 0 {
            let live = self.live;
            self.slots[..live].fill(EMPTY);
            self.live = 0;
            self.entries = 0;
        }
    }

    /// Index every change of `ops`, later ones over earlier ones.
    fn build(&mut self, ops: &[Op]) {
        let mut live = 32;
        while live < ops.len() * 2 {
            live *= 2;
        }
        self.rebuild(ops, live);
    }

    fn rebuild(&mut self, ops: &[Op], live: usize) {
        if self.slots.len() < live {
            self.slots.resize(live, EMPTY);
        }
        self.slots[..live.max(self.live)].fill(EMPTY);
        self.live = live;
        self.entries = 0;
        for i in 0..ops.len() {
            self.put(ops, i);
        }
    }

    /// `ops[i]` was just added.
    fn insert(&mut self, ops: &[Op], i: usize) {
        if (self.entries + 1) * 2 > self.live {
            self.rebuild(ops, self.live * 2);
        } else {
            self.put(ops, i);
        }
    }

    fn put(&mut self, ops: &[Op], i: usize) {
        let what = Ident::of(&ops[i]);
        let mask = self.live - 1;
        let mut s = ident_hash(what) as usize & mask;
        loop {
            match self.slots[s] {
                EMPTY => {
                    self.slots[s] = i as u32;
                    self.entries += 1;
                    return;
                }
                j if Ident::of(&ops[j as usize]) == what => {
                    self.slots[s] = i as u32;
                    return;
                }
                _ => s = (s + 1) & mask,
            }
        }
    }

    fn find(&self, ops: &[Op], what: Ident<'_>) -> Option<usize> {
        let mask = self.live - 1;
        let mut s = ident_hash(what) as usize & mask;
        loop {
            match self.slots[s] {
                EMPTY => return None,
                j if Ident::of(&ops[j as usize]) == what => return Some(j as usize),
                _ => s = (s + 1) & mask,
            }
        }
    }
}

/// Run the application's handler for one request against `store`, leaving the transaction's
/// changes in `tx.ops` (the input position record included) and its response in
/// `tx.response`; true if the handler refused the request, or the engine did because the
/// transaction is larger than `tx.limit_bytes` (see [`TxTooLarge`]). The store is not changed.
/// Engines and test models share this, so both compute the same state.
#[doc(hidden)]
pub fn execute<A: Application>(
    app: &mut A,
    store: &Store,
    tx: &mut TxBuffers,
    enabled: u64,
    write_versions: &[(u16, u16)],
    meta: &InputMeta,
    request: &[u8],
) -> bool {
    tx.clear();
    let mut t = Tx {
        store,
        bufs: tx,
        enabled,
        write_versions,
    };
    let mut refused = if let Err(Refused(bytes)) = app.handle(&mut t, request) {
        tx.clear();
        tx.response.extend_from_slice(&bytes);
        true
    } else {
        false
    };
    if let Some(e) = tx.too_large() {
        // Refused before anything is applied or replicated: the same on an engine with or
        // without a standby, and the stream never sees a batch it cannot carry.
        let Refused(bytes) = app.on_too_large(&e);
        tx.clear();
        tx.response.extend_from_slice(&bytes);
        if tx.too_large().is_some() {
            // A refusal as large as the stream: answered empty rather than not at all.
            tx.response.clear();
        }
        debug!(
            found_bytes = e.found_bytes,
            limit_bytes = e.limit_bytes,
            "transaction refused: too large for the stream"
        );
        refused = true;
    }
    let key = tx.spare.copy_of(&meta.source.to_le_bytes());
    let mut value = tx.spare.copy_of(&[]);
    SourcePosition::encode(meta, &tx.response, &mut value);
    tx.push_op(Op::Put {
        table: SYS_INPUTS,
        key,
        value,
    });
    refused
}

/// Run one request on a local store and apply it (a model of what an engine does, for tests
/// and benchmarks); returns the response.
#[doc(hidden)]
pub fn execute_local<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> Vec<u8> {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    tx.apply_to(store);
    tx.response
}

/// [`execute_local`], also returning the transaction's changes exactly as an engine streams
/// them to its standbys (the input-position record last): what tests and benchmarks replay
/// on a standby, or inspect to check what a request writes.
#[doc(hidden)]
pub fn execute_local_ops<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> (Vec<u8>, Vec<Op>) {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    let ops = tx.ops.clone();
    tx.apply_to(store);
    (tx.response, ops)
}

/// The commit record of transaction `index`, which consumed the request `meta` describes.
#[doc(hidden)]
pub fn commit_block(index: u64, meta: &InputMeta) -> CommitBlock {
    CommitBlock {
        index,
        input_pos: meta.next_pos,
        input_seq: meta.next_seq,
        source: meta.source,
        request_seq: meta.request_seq,
        response_len: 0,
        flags: 0,
    }
}

/// Push one transaction (its ops, then the commit) as one batch: what the active writes to
/// each standby's stream per transaction (public for the replication benchmark).
///
/// Each record is written in place: its room is claimed in the ring and the change encoded
/// straight into it ([`shm_layout::ring::Batch::push_with`]), with no staging copy; the
/// batch is published by one Release store at its commit, with the one checksum the
/// producer's [`shm_layout::ring::Integrity`] asks for (per transaction on an engine's stream,
/// or none).
#[doc(hidden)]
#[inline]
pub fn push_tx<M: shm_layout::memory::WordMemory>(
    stream: &mut Producer<M>,
    ops: &[Op],
    commit: &CommitBlock,
) -> Result<(), PushError> {
    let mut b = stream.batch();
    for op in ops {
        let (t, bl, len) = protocol::op_frame(op);
        b.push_with(t, 1, bl, len, |out| protocol::write_op(op, out))?;
    }
    let commit = zerocopy::IntoBytes::as_bytes(commit);
    b.push_with(rt::COMMIT, 1, 48, commit.len(), |out| {
        out.copy_from_slice(commit)
    })?;
    b.commit();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shm_layout::memory::HeapMemory;

    /// The size a transaction counts for itself is what the stream takes: for every kind of
    /// change, and for a batch pushed at any offset of the ring (a wrap's padding included),
    /// the batch never exceeds `encoded_len`; a transaction at the limit fits an empty ring.
    #[test]
    fn encoded_len_bounds_the_batch_pushed() {
        let mut tx = TxBuffers::new();
        let mut ops = vec![
            Op::PutUnit {
                id: 1,
                kind: 2,
                layout_version: 1,
                state: vec![7; 100],
            },
            Op::RetireUnit { id: 3 },
            Op::Put {
                table: 4,
                key: vec![1; 9],
                value: vec![2; 3000],
            },
            Op::Delete {
                table: 4,
                key: vec![1; 40],
            },
        ];
        let mut scratch = Vec::new();
        for op in &ops {
            let (_, bl) = protocol::encode_op(op, &mut scratch);
            assert_eq!(op_payload_bytes(op), scratch.len(), "{op:?} (block {bl})");
        }
        tx.response.extend_from_slice(b"answer");
        for op in ops.drain(..) {
            tx.push_op(op);
        }
        let meta = InputMeta::default();
        let predicted = tx.encoded_len();
        let mut value = Vec::new();
        SourcePosition::encode(&meta, &tx.response, &mut value);
        tx.ops.push(Op::Put {
            table: SYS_INPUTS,
            key: meta.source.to_le_bytes().to_vec(),
            value,
        });
        let capacity = 1 << 14;
        let mem = std::sync::Arc::new(HeapMemory::new(shm_layout::ring::ring_words(capacity)));
        let mut p = Producer::create(mem.clone(), capacity).expect("ring");
        let mut c = Consumer::attach(mem, capacity).expect("consumer");
        let mut buf = BatchBuf::with_capacity(capacity);
        let mut largest = 0;
        // Push the same transaction at every offset of the ring (two laps).
        for _ in 0..2 * capacity / FRAME_ALIGN {
            let start = p.position();
            push_tx(&mut p, &tx.ops, &commit_block(0, &meta)).expect("fits");
            largest = largest.max((p.position() - start) as usize);
            assert!(c.poll(&mut buf).expect("read"));
            // Shift the next start by one frame.
            p.try_publish(1, 1, 0, &[]).expect("room");
            assert!(c.poll(&mut buf).expect("read"));
        }
        assert!(
            largest <= predicted,
            "a batch took {largest} bytes, more than the {predicted} counted"
        );
        // Some offset made it wrap (padding), and the count is not wildly above the batch.
        assert!(largest > predicted - 3200, "{largest} vs {predicted}");
    }

    proptest::proptest! {
        /// The index answers what a scan of the changes from the end answers, for every unit
        /// and record after every change (keys colliding in a small space, tables sharing
        /// keys, units and records sharing numbers, the index growing past its first size),
        /// and again after the buffers are cleared and reused.
        #[test]
        fn the_index_agrees_with_a_scan(
            rounds in proptest::collection::vec(
                proptest::collection::vec((0u8..4, 0u64..24, 0u16..3), 0..200),
                1..4,
            )
        ) {
            let mut tx = TxBuffers::new();
            for changes in rounds {
                tx.clear();
                for (kind, n, table) in changes {
                    let key = n.to_le_bytes()[..(n % 3 + 1) as usize].to_vec();
                    tx.push_op(match kind {
                        0 => Op::PutUnit { id: n, kind: 1, layout_version: 1, state: vec![n as u8] },
                        1 => Op::RetireUnit { id: n },
                        2 => Op::Put { table, key, value: vec![n as u8] },
                        _ => Op::Delete { table, key },
                    });
                    for m in 0..24u64 {
                        let key = m.to_le_bytes()[..(m % 3 + 1) as usize].to_vec();
                        let whats = [Ident::Unit(m), Ident::Record(0, &key), Ident::Record(2, &key)];
                        for what in whats {
                            let scanned = tx.ops.iter().rposition(|op| Ident::of(op) == what);
                            let looked = tx
                                .candidates(what)
                                .iter()
                                .rev()
                                .find(|op| Ident::of(op) == what)
                                .map(|op| op as *const Op);
                            proptest::prop_assert_eq!(looked, scanned.map(|i| &tx.ops[i] as *const Op));
                        }
                    }
                }
            }
        }
    }
}
