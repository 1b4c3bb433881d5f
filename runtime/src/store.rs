//! The engine's run state: work units and database tables, with an order-independent digest
//! kept up to date on every change, so two engines can be compared in O(1).

use std::collections::BTreeMap;

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

/// Work units and tables.
#[derive(Debug, Default, Clone)]
pub struct Store {
    units: BTreeMap<u64, Unit>,
    /// Table → key → value: nested so a lookup by borrowed key allocates nothing.
    records: BTreeMap<u16, BTreeMap<Vec<u8>, Vec<u8>>>,
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

fn unit_hash(id: u64, u: &Unit) -> u64 {
    hash_parts(&[
        b"U",
        &id.to_le_bytes(),
        &u.kind.to_le_bytes(),
        &u.layout_version.to_le_bytes(),
        &u.state,
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

    /// A work unit.
    pub fn unit(&self, id: u64) -> Option<&Unit> {
        self.units.get(&id)
    }

    /// A record.
    pub fn get(&self, table: u16, key: &[u8]) -> Option<&[u8]> {
        self.records.get(&table)?.get(key).map(|v| v.as_slice())
    }

    /// All units, ordered by id.
    pub fn units(&self) -> impl Iterator<Item = (u64, &Unit)> {
        self.units.iter().map(|(k, v)| (*k, v))
    }

    /// All records of `table`, ordered by key.
    pub fn table(&self, table: u16) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.records
            .get(&table)
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
    }

    /// Apply one change.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutUnit {
                id,
                kind,
                layout_version,
                state,
            } => self.put_unit(
                *id,
                Unit {
                    kind: *kind,
                    layout_version: *layout_version,
                    state: state.clone(),
                },
            ),
            Op::RetireUnit { id } => self.retire_unit(*id),
            Op::Put { table, key, value } => self.put(*table, key.clone(), value.clone()),
            Op::Delete { table, key } => self.delete(*table, key),
        }
    }

    /// Apply one change, taking its bytes (no copy: what the active does with its own
    /// transaction once it is on every standby's stream).
    pub fn apply_owned(&mut self, op: Op) {
        match op {
            Op::PutUnit {
                id,
                kind,
                layout_version,
                state,
            } => self.put_unit(
                id,
                Unit {
                    kind,
                    layout_version,
                    state,
                },
            ),
            Op::RetireUnit { id } => self.retire_unit(id),
            Op::Put { table, key, value } => self.put(table, key, value),
            Op::Delete { table, key } => self.delete(table, &key),
        }
    }

    /// Register or replace a unit.
    pub fn put_unit(&mut self, id: u64, unit: Unit) {
        self.digest = self.digest.wrapping_add(unit_hash(id, &unit));
        if let Some(old) = self.units.insert(id, unit) {
            self.digest = self.digest.wrapping_sub(unit_hash(id, &old));
        }
    }

    /// Retire a unit (no-op if absent).
    pub fn retire_unit(&mut self, id: u64) {
        if let Some(old) = self.units.remove(&id) {
            self.digest = self.digest.wrapping_sub(unit_hash(id, &old));
        }
    }

    /// Put a record.
    pub fn put(&mut self, table: u16, key: Vec<u8>, value: Vec<u8>) {
        use std::collections::btree_map::Entry;
        self.digest = self.digest.wrapping_add(record_hash(table, &key, &value));
        match self.records.entry(table).or_default().entry(key) {
            Entry::Occupied(mut e) => {
                let old = record_hash(table, e.key(), e.get());
                self.digest = self.digest.wrapping_sub(old);
                e.insert(value);
            }
            Entry::Vacant(e) => {
                e.insert(value);
                self.record_count += 1;
            }
        }
    }

    /// Delete a record (no-op if absent).
    pub fn delete(&mut self, table: u16, key: &[u8]) {
        let Some(t) = self.records.get_mut(&table) else {
            return;
        };
        if let Some(old) = t.remove(key) {
            self.digest = self.digest.wrapping_sub(record_hash(table, key, &old));
            self.record_count -= 1;
            if t.is_empty() {
                self.records.remove(&table);
            }
        }
    }

    /// Drop everything (a standby about to receive a snapshot).
    pub fn clear(&mut self) {
        self.units.clear();
        self.records.clear();
        self.record_count = 0;
        self.digest = 0;
    }

    /// Up to `max` units with id greater than `after` (a snapshot chunk; `None` = from the start).
    pub fn units_after(
        &self,
        after: Option<u64>,
        max: usize,
    ) -> impl Iterator<Item = (u64, &Unit)> {
        use std::ops::Bound;
        let lo = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.units
            .range((lo, Bound::Unbounded))
            .take(max)
            .map(|(k, v)| (*k, v))
    }

    /// Up to `max` records after `(table, key)` (a snapshot chunk; `None` = from the start).
    pub fn records_after<'a>(
        &'a self,
        after: Option<&'a (u16, Vec<u8>)>,
        max: usize,
    ) -> impl Iterator<Item = (u16, &'a [u8], &'a [u8])> + 'a {
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
                    .map(move |(k, v)| (*t, k.as_slice(), v.as_slice()))
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
}
