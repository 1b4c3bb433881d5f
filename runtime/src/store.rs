//! The engine's run state: work units and database tables, with an order-independent digest
//! kept up to date on every change, so two engines can be compared in O(1).
//!
//! # Memory
//!
//! Work units are packed (see the `units` module): a unit of a 48-byte state costs 12 bytes
//! of header beside its state in a page of records of its length, plus 5.7–11.4 bytes of
//! index, about 20–25 bytes over its state in all, where a B-tree of boxed states cost about
//! 75 bytes of heap (and 92 of resident memory) over it. The digest stays incremental without
//! a stored hash per unit: replacing or retiring a unit hashes its old bytes again.
//!
//! Table records are kept as before, a B-tree per table of `Vec<u8>` key to `Vec<u8>` value
//! with the record's 64-bit hash: about 100 bytes of overhead per record (two heap
//! allocations with their allocator headers, 24+24+8 bytes in a B-tree node about 2/3 full).
//! Applications hold few records beside their units (a per-subscriber table), so these were
//! left as they are.
//!
//! ```
//! use understudy_runtime::store::{Op, Store, UnitCursor};
//!
//! let mut store = Store::new();
//! store.apply(&Op::PutUnit { id: 7, kind: 1, layout_version: 1, state: vec![0; 48] });
//! store.apply(&Op::PutUnit { id: 9, kind: 1, layout_version: 1, state: vec![1; 40] });
//! assert_eq!(store.unit(7).map(|u| u.state.len()), Some(48));
//! // A snapshot walk in chunks: the cursor is opaque, the order the store's own.
//! let first: Vec<_> = store.units_from(UnitCursor::START, 1).collect();
//! let (cursor, _, _) = first[0];
//! assert_eq!(store.units_from(cursor, 10).count(), 1);
//! store.apply(&Op::RetireUnit { id: 7 });
//! store.apply(&Op::RetireUnit { id: 9 });
//! assert_eq!(store.digest(), 0);
//! ```

use std::collections::BTreeMap;

mod units;

/// A work unit: identity, kind, and its state record (bytes in the layout `layout_version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// Application-defined kind.
    pub kind: u16,
    /// Layout version of `state`.
    pub layout_version: u16,
    /// The state record's bytes.
    pub state: Vec<u8>,
}

/// A work unit seen in place (in the store, or in a transaction's changes): no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitRef<'a> {
    /// Application-defined kind.
    pub kind: u16,
    /// Layout version of `state`.
    pub layout_version: u16,
    /// The state record's bytes.
    pub state: &'a [u8],
}

impl UnitRef<'_> {
    /// An owned copy.
    pub fn to_unit(&self) -> Unit {
        Unit {
            kind: self.kind,
            layout_version: self.layout_version,
            state: self.state.to_vec(),
        }
    }
}

impl Unit {
    /// Seen in place.
    pub fn as_ref(&self) -> UnitRef<'_> {
        UnitRef {
            kind: self.kind,
            layout_version: self.layout_version,
            state: &self.state,
        }
    }
}

/// Byte buffers that the store let go of (replaced states and values, keys it already had),
/// kept for the next changes: with units and records replaced by ones of about the same size,
/// as a running engine's are, building, replicating and applying a transaction allocates
/// nothing. Bounded in count and per-buffer size, so a burst of large values is not hoarded.
#[derive(Debug, Default)]
pub struct Spare {
    bufs: Vec<Vec<u8>>,
}

impl Spare {
    /// At most this many buffers are kept.
    pub const MAX_BUFFERS: usize = 1024;
    /// Buffers with a larger capacity are freed, not kept.
    pub const MAX_CAPACITY: usize = 64 << 10;

    /// No buffers yet.
    pub fn new() -> Spare {
        Spare::default()
    }

    /// Buffers kept.
    pub fn len(&self) -> usize {
        self.bufs.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }

    /// A buffer holding a copy of `bytes` (a kept one if any).
    pub fn copy_of(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut v = self.bufs.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(bytes);
        v
    }

    /// Keep `v` for later (or free it if the pool is full or `v` is large).
    pub fn give(&mut self, v: Vec<u8>) {
        if v.capacity() != 0
            && v.capacity() <= Self::MAX_CAPACITY
            && self.bufs.len() < Self::MAX_BUFFERS
        {
            self.bufs.push(v);
        }
    }

    /// Keep the buffers of an op that is no longer needed.
    pub fn recycle(&mut self, op: Op) {
        match op {
            Op::PutUnit { state, .. } => self.give(state),
            Op::RetireUnit { .. } => {}
            Op::Put { key, value, .. } => {
                self.give(key);
                self.give(value);
            }
            Op::Delete { key, .. } => self.give(key),
        }
    }
}

/// What a change replaced, seen in place (see `Application::on_apply`): an application that
/// keeps counts or indexes by a unit's state needs the old state to undo it, and need not keep
/// a shadow copy of every unit for that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before<'a> {
    /// A unit change (`PutUnit`, `RetireUnit`): the unit's previous state, `None` if it did
    /// not exist.
    Unit(Option<UnitRef<'a>>),
    /// A record change (`Put`, `Delete`): the record's previous value, `None` if it did not
    /// exist.
    Record(Option<&'a [u8]>),
}

/// A copy of what a change is about to replace, in a buffer reused from change to change (no
/// allocation once warm): the store overwrites states in place, so the old bytes must be
/// copied out before the change is applied.
#[derive(Debug, Default)]
pub struct BeforeBuf {
    unit: bool,
    present: bool,
    kind: u16,
    layout_version: u16,
    bytes: Vec<u8>,
}

impl BeforeBuf {
    /// An empty buffer.
    pub fn new() -> BeforeBuf {
        BeforeBuf::default()
    }

    /// Copy what `op` would replace in `store`.
    pub fn capture(&mut self, store: &Store, op: &Op) {
        self.bytes.clear();
        match op {
            Op::PutUnit { id, .. } | Op::RetireUnit { id } => {
                self.unit = true;
                let u = store.unit(*id);
                self.present = u.is_some();
                if let Some(u) = u {
                    self.kind = u.kind;
                    self.layout_version = u.layout_version;
                    self.bytes.extend_from_slice(u.state);
                }
            }
            Op::Put { table, key, .. } | Op::Delete { table, key } => {
                self.unit = false;
                let v = store.get(*table, key);
                self.present = v.is_some();
                if let Some(v) = v {
                    self.bytes.extend_from_slice(v);
                }
            }
        }
    }

    /// What was captured.
    pub fn view(&self) -> Before<'_> {
        match (self.unit, self.present) {
            (true, false) => Before::Unit(None),
            (true, true) => Before::Unit(Some(UnitRef {
                kind: self.kind,
                layout_version: self.layout_version,
                state: &self.bytes,
            })),
            (false, false) => Before::Record(None),
            (false, true) => Before::Record(Some(&self.bytes)),
        }
    }
}

/// One change to the store: the body of a run-state update frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Register a work unit, or replace its state (full state, so applying is idempotent).
    PutUnit {
        /// Unit id.
        id: u64,
        /// Kind.
        kind: u16,
        /// Layout version of the state.
        layout_version: u16,
        /// State bytes.
        state: Vec<u8>,
    },
    /// Retire a work unit.
    RetireUnit {
        /// Unit id.
        id: u64,
    },
    /// Put a database record.
    Put {
        /// Table id.
        table: u16,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete a database record.
    Delete {
        /// Table id.
        table: u16,
        /// Key.
        key: Vec<u8>,
    },
}

/// A stored record with its hash, so replacing or removing it does not hash it again.
#[derive(Debug, Clone)]
struct Hashed<T> {
    item: T,
    hash: u64,
}

/// Where a snapshot walk of the units is: [`UnitCursor::START`], then what
/// [`Store::units_from`] hands back. Opaque: its meaning is the store's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnitCursor(u64);

impl UnitCursor {
    /// Before the first unit.
    pub const START: UnitCursor = UnitCursor(0);
}

/// Work units and tables.
#[derive(Debug, Default, Clone)]
pub struct Store {
    units: units::Units,
    /// Table → key → value: nested so a lookup by borrowed key allocates nothing.
    records: BTreeMap<u16, BTreeMap<Vec<u8>, Hashed<Vec<u8>>>>,
    record_count: usize,
    digest: u64,
}

/// A 64-bit hash of byte strings (multiply-xor over 8-byte words); deterministic across
/// processes and builds, so digests of two engines compare.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0x243F_6A88_85A3_08D3;
    for p in parts {
        h = mix(h ^ p.len() as u64);
        let mut chunks = p.chunks_exact(8);
        for c in &mut chunks {
            h = mix(h ^ u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let r = chunks.remainder();
        if !r.is_empty() {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(r);
            h = mix(h ^ u64::from_le_bytes(b));
        }
    }
    h ^ (h >> 29)
}

#[inline]
fn mix(x: u64) -> u64 {
    (x ^ (x >> 32))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(27)
}

fn unit_hash(id: u64, u: UnitRef<'_>) -> u64 {
    hash_parts(&[
        b"U",
        &id.to_le_bytes(),
        &u.kind.to_le_bytes(),
        &u.layout_version.to_le_bytes(),
        u.state,
    ])
}

fn record_hash(table: u16, key: &[u8], value: &[u8]) -> u64 {
    hash_parts(&[b"R", &table.to_le_bytes(), key, value])
}

impl Store {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The order-independent digest of every unit and record (wrapping sum of item hashes).
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Number of work units.
    pub fn unit_count(&self) -> usize {
        self.units.len()
    }

    /// Number of table records.
    pub fn record_count(&self) -> usize {
        self.record_count
    }

    /// A work unit, seen in place.
    pub fn unit(&self, id: u64) -> Option<UnitRef<'_>> {
        self.units.get(id)
    }

    /// A record.
    pub fn get(&self, table: u16, key: &[u8]) -> Option<&[u8]> {
        self.records
            .get(&table)?
            .get(key)
            .map(|v| v.item.as_slice())
    }

    /// All units, in the store's own order (not necessarily by id).
    pub fn units(&self) -> impl Iterator<Item = (u64, UnitRef<'_>)> {
        self.units.walk(0).map(|(_, id, u)| (id, u))
    }

    /// All records of `table`, ordered by key.
    pub fn table(&self, table: u16) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.records
            .get(&table)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_slice(), v.item.as_slice()))
    }

    /// Apply one change, copying its bytes (what a standby does with a decoded frame). A unit
    /// or record that exists is overwritten in place: no allocation unless it grew.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutUnit {
                id,
                kind,
                layout_version,
                state,
            } => {
                let new = UnitRef {
                    kind: *kind,
                    layout_version: *layout_version,
                    state,
                };
                self.put_unit_ref(*id, new, |_| {});
            }
            Op::RetireUnit { id } => self.retire_unit(*id),
            Op::Put { table, key, value } => {
                let hash = record_hash(*table, key, value);
                self.digest = self.digest.wrapping_add(hash);
                let t = self.records.entry(*table).or_default();
                match t.get_mut(key.as_slice()) {
                    Some(old) => {
                        self.digest = self.digest.wrapping_sub(old.hash);
                        old.hash = hash;
                        old.item.clear();
                        old.item.extend_from_slice(value);
                    }
                    None => {
                        let item = value.clone();
                        t.insert(key.clone(), Hashed { item, hash });
                        self.record_count += 1;
                    }
                }
            }
            Op::Delete { table, key } => self.delete(*table, key),
        }
    }

    /// Apply one change, taking its bytes (no copy: what the active does with its own
    /// transaction once it is on every standby's stream); the buffers this frees (the
    /// replaced state or value, a key the table already had) go to `spare`.
    pub fn apply_owned(&mut self, op: Op, spare: &mut Spare) {
        match op {
            Op::PutUnit {
                id,
                kind,
                layout_version,
                state,
            } => {
                // The store keeps states packed, not in their own buffers: the state is copied
                // in and its buffer kept for the next transaction.
                let new = UnitRef {
                    kind,
                    layout_version,
                    state: &state,
                };
                self.put_unit_ref(id, new, |_| {});
                spare.give(state);
            }
            Op::RetireUnit { id } => self.retire_unit(id),
            Op::Put { table, key, value } => {
                if let Some((key, old)) = self.replace(table, key, value) {
                    spare.give(key);
                    spare.give(old);
                }
            }
            Op::Delete { table, key } => {
                if let Some((k, v)) = self.remove(table, &key) {
                    spare.give(k);
                    spare.give(v);
                }
                spare.give(key);
            }
        }
    }

    /// Register or replace a unit; returns (a copy of) the unit it replaced.
    pub fn put_unit(&mut self, id: u64, unit: Unit) -> Option<Unit> {
        let mut old = None;
        self.put_unit_ref(id, unit.as_ref(), |u| old = Some(u.to_unit()));
        old
    }

    /// Register or replace a unit, keeping the digest: `old` sees the unit it replaces.
    fn put_unit_ref(&mut self, id: u64, new: UnitRef<'_>, old: impl FnOnce(UnitRef<'_>)) {
        let mut digest = self.digest.wrapping_add(unit_hash(id, new));
        self.units.put(id, new, |u| {
            digest = digest.wrapping_sub(unit_hash(id, u));
            old(u);
        });
        self.digest = digest;
    }

    /// Retire a unit (no-op if absent).
    pub fn retire_unit(&mut self, id: u64) {
        let mut digest = self.digest;
        self.units
            .retire(id, |u| digest = digest.wrapping_sub(unit_hash(id, u)));
        self.digest = digest;
    }

    /// Put a record.
    pub fn put(&mut self, table: u16, key: Vec<u8>, value: Vec<u8>) {
        self.replace(table, key, value);
    }

    /// Put a record; if the key existed, returns the key passed in (the table keeps its own)
    /// and the value it replaced.
    fn replace(&mut self, table: u16, key: Vec<u8>, value: Vec<u8>) -> Option<(Vec<u8>, Vec<u8>)> {
        let hash = record_hash(table, &key, &value);
        self.digest = self.digest.wrapping_add(hash);
        let t = self.records.entry(table).or_default();
        // Look up by borrowed key: on a hit the key passed in is handed back unused.
        match t.get_mut(key.as_slice()) {
            Some(old) => {
                self.digest = self.digest.wrapping_sub(old.hash);
                let old = std::mem::replace(old, Hashed { item: value, hash });
                Some((key, old.item))
            }
            None => {
                t.insert(key, Hashed { item: value, hash });
                self.record_count += 1;
                None
            }
        }
    }

    /// Delete a record (no-op if absent).
    pub fn delete(&mut self, table: u16, key: &[u8]) {
        self.remove(table, key);
    }

    fn remove(&mut self, table: u16, key: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
        let t = self.records.get_mut(&table)?;
        let (k, old) = t.remove_entry(key)?;
        self.digest = self.digest.wrapping_sub(old.hash);
        self.record_count -= 1;
        if t.is_empty() {
            self.records.remove(&table);
        }
        Some((k, old.item))
    }

    /// Drop everything (a standby about to receive a snapshot).
    pub fn clear(&mut self) {
        self.units.clear();
        self.records.clear();
        self.record_count = 0;
        self.digest = 0;
    }

    /// Up to `max` units from `cursor` on (a snapshot chunk), each with the cursor just past
    /// it. A snapshot walks the store with it while live changes go on: every unit that exists
    /// from the walk's start to its end and is not changed meanwhile is visited exactly once
    /// (a unit that is changed travels in the live stream as a whole).
    pub fn units_from(
        &self,
        cursor: UnitCursor,
        max: usize,
    ) -> impl Iterator<Item = (UnitCursor, u64, UnitRef<'_>)> {
        self.units
            .walk(cursor.0)
            .take(max)
            .map(|(next, id, u)| (UnitCursor(next), id, u))
    }

    /// Up to `max` records after `(table, key)` (a snapshot chunk; `None` = from the start).
    /// The items borrow the store only, so the cursor may be updated from them once the walk
    /// is done.
    pub fn records_after<'a, 'b>(
        &'a self,
        after: Option<&'b (u16, Vec<u8>)>,
        max: usize,
    ) -> impl Iterator<Item = (u16, &'a [u8], &'a [u8])> + 'b
    where
        'a: 'b,
    {
        use std::ops::Bound;
        let first_table = after.map_or(0, |(t, _)| *t);
        self.records
            .range(first_table..)
            .flat_map(move |(t, keys)| {
                let lo = match after {
                    Some((at, k)) if at == t => Bound::Excluded(k.as_slice()),
                    _ => Bound::Unbounded,
                };
                keys.range::<[u8], _>((lo, Bound::Unbounded))
                    .map(move |(k, v)| (*t, k.as_slice(), v.item.as_slice()))
            })
            .take(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest depends on content only, not on the order changes were made in.
    #[test]
    fn digest_is_order_independent_and_tracks_removals() {
        let mut a = Store::new();
        let mut b = Store::new();
        let u = |s: &[u8]| Unit {
            kind: 1,
            layout_version: 1,
            state: s.to_vec(),
        };
        a.put_unit(1, u(b"x"));
        a.put_unit(2, u(b"y"));
        a.put(3, b"k".to_vec(), b"v".to_vec());
        b.put(3, b"k".to_vec(), b"old".to_vec());
        b.put_unit(2, u(b"y"));
        b.put_unit(9, u(b"gone"));
        b.put_unit(1, u(b"x"));
        b.put(3, b"k".to_vec(), b"v".to_vec());
        b.retire_unit(9);
        assert_eq!(a.digest(), b.digest());
        b.delete(3, b"k");
        assert_ne!(a.digest(), b.digest());
        a.delete(3, b"k");
        assert_eq!(a.digest(), b.digest());
        assert_eq!(a.get(3, b"k"), None);
    }

    /// Overwriting in place (`apply`, a standby) and moving buffers (`apply_owned`, the
    /// active) give the same contents and digest as building the final state from scratch.
    #[test]
    fn in_place_and_owned_apply_agree_with_a_fresh_build() {
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let (mut a, mut b, mut spare) = (Store::new(), Store::new(), Spare::new());
        for _ in 0..20_000 {
            let id = next(64);
            let bytes = vec![next(256) as u8; next(40) as usize];
            let op = match next(4) {
                0 => Op::PutUnit {
                    id,
                    kind: next(3) as u16,
                    layout_version: 1 + next(2) as u16,
                    state: bytes,
                },
                1 => Op::RetireUnit { id },
                2 => Op::Put {
                    table: next(3) as u16,
                    key: id.to_le_bytes()[..1 + next(3) as usize].to_vec(),
                    value: bytes,
                },
                _ => Op::Delete {
                    table: next(3) as u16,
                    key: id.to_le_bytes()[..1 + next(3) as usize].to_vec(),
                },
            };
            a.apply(&op);
            b.apply_owned(op, &mut spare);
            assert_eq!(a.digest(), b.digest());
        }
        assert!(spare.len() <= Spare::MAX_BUFFERS);
        let mut fresh = Store::new();
        for (id, u) in a.units() {
            fresh.put_unit(id, u.to_unit());
        }
        for t in 0..3 {
            for (k, v) in a.table(t) {
                fresh.put(t, k.to_vec(), v.to_vec());
            }
        }
        assert_eq!(fresh.digest(), a.digest());
        assert_eq!(fresh.unit_count(), b.unit_count());
        assert_eq!(fresh.record_count(), b.record_count());
        assert!(a.units().eq(b.units()));
        for t in 0..3 {
            assert!(a.table(t).eq(b.table(t)));
        }
    }
}
