//! The work units' compact arena: about 12 bytes of header beside each state, plus about
//! 5–10 bytes of index, instead of a B-tree node entry, a heap allocation and a stored hash.
//!
//! # Layout
//!
//! - **Pages of one record size.** A unit whose state is at most [`SMALL_MAX`] bytes is one
//!   record `[id u64 LE][kind u16 LE][layout u16 LE][state]` of exactly `12 + len` bytes in a
//!   64 KiB page that holds only records of that length, so the length is the page's, not the
//!   record's, and nothing is padded or aligned (fields are read with `from_le_bytes`: no
//!   `unsafe` here). States of 40–48 bytes make records of 52–60 bytes, about 1,100 a page.
//! - **Handles.** A unit is named by a `u32` handle: `page << 13 | slot` (a page holds at
//!   most 65536 / 12 = 5461 < 2^13 records, so up to 2^18 pages = 16 GiB of small records), or
//!   `BIG | i` for a state longer than [`SMALL_MAX`], kept whole in its own buffer (`big[i]`;
//!   its overhead, about 40 bytes and an allocation, is small beside a state of 4 KiB or more).
//! - **Index.** `id → handle` is 1024 `hashbrown::HashTable<u32>`s picked by hash bits: 4
//!   bytes and 1 control byte a bucket, at a load factor between 7/16 and 7/8, i.e. 5.7–11.4
//!   bytes a unit. The id is not stored in the index (it is in the record), so a probe reads
//!   the record to compare, and so does a table that grows, for each of its units: split in
//!   1024, a growing store pauses for 1/1024 of its units at a time, not for all of them.
//!   The id is hashed with foldhash keyed by a seed drawn per store from the OS's randomness
//!   (so it differs between engines and runs): unit ids come from clients, and a keyed hash
//!   keeps a client from choosing ids that pile into one probe sequence (HashDoS). The walk
//!   goes by slot, not through the index, so the seed changes no order the store shows. The
//!   unit's 64-bit content hash is not stored: replacing or retiring a unit hashes its old
//!   bytes again (10–15 ns for 48 bytes, cheaper than 8 bytes a unit).
//! - **Free slots.** A freed slot's first two bytes chain it into its page's free list; a page
//!   with free slots is on its record length's list of partial pages (doubly linked through
//!   the pages, so a page can leave it in O(1)). A page whose last unit goes is released
//!   (its 64 KiB freed, its number reused by the next new page of any length). A bitmap per
//!   page says which slots are live (a walk must skip free ones; a record's bytes cannot).
//!
//! Per 48-byte unit: 12 (header) + 5.7–11.4 (index) + 1 bit (bitmap) + a share of at most one
//! partly filled page per record length in use. Measured: see the README, "Memory per work
//! unit".
//!
//! # Walk order and the snapshot contract
//!
//! A unit never moves unless it is changed: it is written where it is when its state keeps
//! its length, and moved to a slot of its new length's pages (its old slot freed) when it does
//! not. Pages are never reordered (`pages` grows at its end; a released page's number stays
//! put), index growth rehashes only the index. The walk goes by handle, pages in order then
//! slots in order, then the big units in order, and its cursor is the next handle to look at.
//! So a unit that exists, unchanged, from a walk's start to its end keeps its handle and is
//! seen exactly once; a unit put during the walk lands in a free or new slot that may be
//! before or after the cursor (seen at most once per move, always with its value at that
//! time), which the snapshot contract allows: its change travels in the live stream after
//! whatever the walk sent of it. Nothing is compacted, so a store that shrinks keeps partly
//! filled pages until their units go (fragmentation is bounded by one 64 KiB page per record
//! length for a store that only grows, and is reported by `Debug`).

use super::UnitRef;
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// The largest state kept inline in a page (a record of 4096 bytes, 16 a page).
pub(super) const SMALL_MAX: usize = 4096 - HEADER;
/// Bytes of a record before its state: id, kind, layout version.
const HEADER: usize = 12;
/// Bytes of a page.
const PAGE_BYTES: usize = 64 << 10;
/// Bits of a handle that name a slot in its page.
const SLOT_BITS: u32 = 13;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
/// Handles with this bit name a big unit.
const BIG: u32 = 1 << 31;
/// Pages a handle can name.
const MAX_PAGES: usize = (BIG >> SLOT_BITS) as usize;
/// No page / no handle.
const NONE: u32 = u32::MAX;
/// No slot (end of a page's free list).
const NO_SLOT: u16 = u16::MAX;

const _: () = assert!(PAGE_BYTES / HEADER <= (1 << SLOT_BITS));
const _: () = assert!(PAGE_BYTES / (HEADER + SMALL_MAX) >= 16);

/// One page of records of one length, or a released page (`bytes` empty).
#[derive(Clone)]
struct Page {
    bytes: Box<[u8]>,
    /// Which slots hold a unit.
    live_bits: Box<[u64]>,
    /// The state length of its records.
    len: u32,
    /// Units in it.
    live: u16,
    /// Slots handed out so far (slots at or past this one were never used).
    used: u16,
    /// Head of the free list of slots below `used`.
    free: u16,
    /// On its length's partial list.
    partial: bool,
    prev: u32,
    next: u32,
}

impl Page {
    fn record(&self) -> usize {
        HEADER + self.len as usize
    }

    fn capacity(&self) -> usize {
        PAGE_BYTES / self.record()
    }

    fn at(&self, slot: usize) -> &[u8] {
        let r = self.record();
        &self.bytes[slot * r..(slot + 1) * r]
    }

    fn at_mut(&mut self, slot: usize) -> &mut [u8] {
        let r = self.record();
        &mut self.bytes[slot * r..(slot + 1) * r]
    }

    fn is_live(&self, slot: usize) -> bool {
        self.live_bits[slot / 64] & (1 << (slot % 64)) != 0
    }
}

/// A unit whose state is longer than [`SMALL_MAX`], or a free big slot.
#[derive(Clone)]
enum Big {
    Live {
        id: u64,
        kind: u16,
        layout_version: u16,
        state: Vec<u8>,
    },
    Free {
        next: u32,
    },
}

/// Where units live; the index is kept beside it (see [`Units`]) so that one can be
/// borrowed mutably while this one is read.
#[derive(Clone, Default)]
struct Slots {
    pages: Vec<Page>,
    /// Released page numbers.
    vacant: Vec<u32>,
    /// By state length: the first page with a free slot, or `NONE`.
    partial_head: Vec<u32>,
    big: Vec<Big>,
    big_free: Option<u32>,
}

fn read_id(rec: &[u8]) -> u64 {
    u64::from_le_bytes(rec[..8].try_into().expect("8 bytes"))
}

fn view(rec: &[u8]) -> UnitRef<'_> {
    UnitRef {
        kind: u16::from_le_bytes([rec[8], rec[9]]),
        layout_version: u16::from_le_bytes([rec[10], rec[11]]),
        state: &rec[HEADER..],
    }
}

fn write(rec: &mut [u8], id: u64, u: UnitRef<'_>) {
    rec[..8].copy_from_slice(&id.to_le_bytes());
    rec[8..10].copy_from_slice(&u.kind.to_le_bytes());
    rec[10..12].copy_from_slice(&u.layout_version.to_le_bytes());
    rec[HEADER..].copy_from_slice(u.state);
}

impl Slots {
    /// The id at `h`: what every index probe compares, so kept small enough to inline.
    #[inline(always)]
    fn id(&self, h: u32) -> u64 {
        if h & BIG != 0 {
            return self.get_big(h).0;
        }
        read_id(self.pages[(h >> SLOT_BITS) as usize].at((h & SLOT_MASK) as usize))
    }

    #[inline]
    fn get(&self, h: u32) -> (u64, UnitRef<'_>) {
        if h & BIG != 0 {
            return self.get_big(h);
        }
        let rec = self.pages[(h >> SLOT_BITS) as usize].at((h & SLOT_MASK) as usize);
        (read_id(rec), view(rec))
    }

    #[cold]
    fn get_big(&self, h: u32) -> (u64, UnitRef<'_>) {
        match &self.big[(h & !BIG) as usize] {
            Big::Live {
                id,
                kind,
                layout_version,
                state,
            } => (
                *id,
                UnitRef {
                    kind: *kind,
                    layout_version: *layout_version,
                    state,
                },
            ),
            Big::Free { .. } => unreachable!("handle {h:#x} names a free big slot"),
        }
    }

    /// Whether a unit of state length `len` can be written at `h`.
    fn fits(&self, h: u32, len: usize) -> bool {
        if h & BIG != 0 {
            len > SMALL_MAX
        } else {
            self.pages[(h >> SLOT_BITS) as usize].len as usize == len
        }
    }

    /// Overwrite the unit at `h` (which [`Slots::fits`] it).
    fn overwrite(&mut self, h: u32, id: u64, u: UnitRef<'_>) {
        if h & BIG != 0 {
            match &mut self.big[(h & !BIG) as usize] {
                Big::Live {
                    kind,
                    layout_version,
                    state,
                    ..
                } => {
                    *kind = u.kind;
                    *layout_version = u.layout_version;
                    state.clear();
                    state.extend_from_slice(u.state);
                }
                Big::Free { .. } => unreachable!("handle {h:#x} names a free big slot"),
            }
        } else {
            let page = &mut self.pages[(h >> SLOT_BITS) as usize];
            write(page.at_mut((h & SLOT_MASK) as usize), id, u);
        }
    }

    /// A new slot holding `u`.
    fn insert(&mut self, id: u64, u: UnitRef<'_>) -> u32 {
        let len = u.state.len();
        if len > SMALL_MAX {
            let unit = Big::Live {
                id,
                kind: u.kind,
                layout_version: u.layout_version,
                state: u.state.to_vec(),
            };
            return match self.big_free {
                Some(i) => {
                    let Big::Free { next } = self.big[i as usize] else {
                        unreachable!("big free list names a live slot {i}")
                    };
                    self.big_free = (next != NONE).then_some(next);
                    self.big[i as usize] = unit;
                    BIG | i
                }
                None => {
                    let i = self.big.len();
                    assert!(i < BIG as usize, "more than 2^31 units of over 4 KiB");
                    self.big.push(unit);
                    BIG | i as u32
                }
            };
        }
        if self.partial_head.len() <= len {
            self.partial_head.resize(len + 1, NONE);
        }
        let mut p = self.partial_head[len];
        if p == NONE {
            p = self.new_page(len);
        }
        let page = &mut self.pages[p as usize];
        let slot = if page.free != NO_SLOT {
            let s = page.free;
            let rec = page.at(s as usize);
            page.free = u16::from_le_bytes([rec[0], rec[1]]);
            s
        } else {
            page.used += 1;
            page.used - 1
        } as usize;
        page.live += 1;
        page.live_bits[slot / 64] |= 1 << (slot % 64);
        write(page.at_mut(slot), id, u);
        if page.free == NO_SLOT && page.used as usize == page.capacity() {
            self.unlink(p);
        }
        (p << SLOT_BITS) | slot as u32
    }

    /// A fresh page for states of `len` bytes, first on its partial list.
    fn new_page(&mut self, len: usize) -> u32 {
        let record = HEADER + len;
        let slots = PAGE_BYTES / record;
        let page = Page {
            bytes: vec![0u8; slots * record].into_boxed_slice(),
            live_bits: vec![0u64; slots.div_ceil(64)].into_boxed_slice(),
            len: len as u32,
            live: 0,
            used: 0,
            free: NO_SLOT,
            partial: false,
            prev: NONE,
            next: NONE,
        };
        let p = match self.vacant.pop() {
            Some(p) => {
                self.pages[p as usize] = page;
                p
            }
            None => {
                assert!(
                    self.pages.len() < MAX_PAGES,
                    "unit store full: {MAX_PAGES} pages of {PAGE_BYTES} bytes"
                );
                self.pages.push(page);
                (self.pages.len() - 1) as u32
            }
        };
        self.link(p);
        p
    }

    /// Put page `p` first on its length's partial list.
    fn link(&mut self, p: u32) {
        let len = self.pages[p as usize].len as usize;
        let head = self.partial_head[len];
        if head != NONE {
            self.pages[head as usize].prev = p;
        }
        let page = &mut self.pages[p as usize];
        page.partial = true;
        page.prev = NONE;
        page.next = head;
        self.partial_head[len] = p;
    }

    /// Take page `p` off its length's partial list.
    fn unlink(&mut self, p: u32) {
        let page = &mut self.pages[p as usize];
        let (prev, next, len) = (page.prev, page.next, page.len as usize);
        page.partial = false;
        page.prev = NONE;
        page.next = NONE;
        if prev == NONE {
            self.partial_head[len] = next;
        } else {
            self.pages[prev as usize].next = next;
        }
        if next != NONE {
            self.pages[next as usize].prev = prev;
        }
    }

    /// Free the slot `h`; returns the big unit's buffer (for a `Spare`).
    fn remove(&mut self, h: u32) -> Option<Vec<u8>> {
        if h & BIG != 0 {
            let i = h & !BIG;
            let next = self.big_free.unwrap_or(NONE);
            let old = std::mem::replace(&mut self.big[i as usize], Big::Free { next });
            self.big_free = Some(i);
            return match old {
                Big::Live { state, .. } => Some(state),
                Big::Free { .. } => unreachable!("handle {h:#x} names a free big slot"),
            };
        }
        let p = h >> SLOT_BITS;
        let slot = (h & SLOT_MASK) as usize;
        let page = &mut self.pages[p as usize];
        debug_assert!(page.is_live(slot), "handle {h:#x} names a free slot");
        page.live -= 1;
        page.live_bits[slot / 64] &= !(1 << (slot % 64));
        if page.live == 0 {
            if page.partial {
                self.unlink(p);
            }
            let page = &mut self.pages[p as usize];
            page.bytes = Box::default();
            page.live_bits = Box::default();
            page.used = 0;
            page.free = NO_SLOT;
            self.vacant.push(p);
            return None;
        }
        let free = page.free;
        page.at_mut(slot)[..2].copy_from_slice(&free.to_le_bytes());
        page.free = slot as u16;
        if !page.partial {
            self.link(p);
        }
        None
    }
}

/// Shards of the index: `2^SHARD_BITS` tables, so that a table that grows rehashes
/// 1/1024 of the units at once (at 10 M units about 10 k, a millisecond or so), not all of
/// them (one table: every id read back from its record, seconds at 10 M units, stalling the
/// engine that grows its store).
const SHARD_BITS: u32 = 10;
const SHARDS: usize = 1 << SHARD_BITS;
/// Which hash bits pick a shard: above the bucket bits (the low ones) of any table of up to
/// 2^47 buckets and below hashbrown's 7-bit control tag (the top ones), so that the units of
/// a shard still differ in both.
const SHARD_SHIFT: u32 = 47;

/// The units: an arena of records and an index by id (see the module doc).
#[derive(Clone, Default)]
pub(super) struct Units {
    slots: Slots,
    /// `SHARDS` tables once the first unit is put (none before: an empty store allocates
    /// nothing).
    index: Vec<HashTable<u32>>,
    count: usize,
    seed: IdHasher,
}

fn shard(hash: u64) -> usize {
    (hash >> SHARD_SHIFT) as usize & (SHARDS - 1)
}

/// The index's hasher: foldhash (a few ns for a `u64`) with a per-store seed drawn from the
/// OS's randomness through std's `RandomState` (foldhash's own default seed comes from address
/// space layout and the clock, which it does not claim resists HashDoS).
#[derive(Clone)]
struct IdHasher(foldhash::quality::SeedableRandomState);

impl Default for IdHasher {
    fn default() -> Self {
        let seed = std::collections::hash_map::RandomState::new().hash_one(0x5EED_u64);
        let shared = foldhash::SharedSeed::global_random();
        IdHasher(foldhash::quality::SeedableRandomState::with_seed(
            seed, shared,
        ))
    }
}

impl IdHasher {
    fn hash_one(&self, id: u64) -> u64 {
        self.0.hash_one(id)
    }
}

impl std::fmt::Debug for Units {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pages = self.slots.pages.len() - self.slots.vacant.len();
        f.debug_struct("Units")
            .field("units", &self.count)
            .field("pages_of_64k", &pages)
            .field("big", &(self.slots.big.len()))
            .field(
                "index_buckets",
                &self.index.iter().map(|t| t.capacity()).sum::<usize>(),
            )
            .finish()
    }
}

impl Units {
    pub(super) fn len(&self) -> usize {
        self.count
    }

    fn hash(&self, id: u64) -> u64 {
        self.seed.hash_one(id)
    }

    pub(super) fn get(&self, id: u64) -> Option<UnitRef<'_>> {
        let hash = self.hash(id);
        let h = *self
            .index
            .get(shard(hash))?
            .find(hash, |&h| self.slots.id(h) == id)?;
        Some(self.slots.get(h).1)
    }

    /// Register or replace unit `id`; `old` sees the unit it replaces before it is
    /// overwritten.
    pub(super) fn put(&mut self, id: u64, u: UnitRef<'_>, old: impl FnOnce(UnitRef<'_>)) {
        let hash = self.hash(id);
        if self.index.is_empty() {
            self.index.resize_with(SHARDS, HashTable::new);
        }
        let Units {
            slots,
            index,
            count,
            seed,
        } = self;
        let index = &mut index[shard(hash)];
        match index.find_entry(hash, |&h| slots.id(h) == id) {
            Ok(mut e) => {
                let h = *e.get();
                old(slots.get(h).1);
                if slots.fits(h, u.state.len()) {
                    slots.overwrite(h, id, u);
                } else {
                    // A new slot first, so the unit's own slot is not reused at once.
                    *e.get_mut() = slots.insert(id, u);
                    slots.remove(h);
                }
            }
            Err(_) => {
                let h = slots.insert(id, u);
                index.insert_unique(hash, h, |&h| seed.hash_one(slots.id(h)));
                *count += 1;
            }
        }
    }

    /// Retire unit `id`; `old` sees it before it goes. False if there was none.
    pub(super) fn retire(&mut self, id: u64, old: impl FnOnce(UnitRef<'_>)) -> bool {
        let hash = self.hash(id);
        let Units {
            slots,
            index,
            count,
            ..
        } = self;
        let Some(index) = index.get_mut(shard(hash)) else {
            return false;
        };
        match index.find_entry(hash, |&h| slots.id(h) == id) {
            Ok(e) => {
                let (h, _) = e.remove();
                old(slots.get(h).1);
                slots.remove(h);
                *count -= 1;
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn clear(&mut self) {
        self.index = Vec::new();
        self.slots = Slots::default();
        self.count = 0;
    }

    /// Units from walk position `from` on, each with the position just past it.
    pub(super) fn walk(&self, from: u64) -> Walk<'_> {
        Walk {
            slots: &self.slots,
            pos: from,
        }
    }
}

/// A walk over the units in handle order (see the module doc); positions are handles widened
/// to `u64`, so a position past every small page is `BIG` and past every unit is beyond it.
pub(super) struct Walk<'a> {
    slots: &'a Slots,
    pos: u64,
}

impl<'a> Iterator for Walk<'a> {
    type Item = (u64, u64, UnitRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let big = u64::from(BIG);
        while self.pos < big {
            let p = (self.pos >> SLOT_BITS) as usize;
            let Some(page) = self.slots.pages.get(p) else {
                self.pos = big;
                break;
            };
            let mut slot = (self.pos & u64::from(SLOT_MASK)) as usize;
            while slot < page.used as usize {
                // Skip free slots a bitmap word at a time.
                let word = page.live_bits[slot / 64] >> (slot % 64);
                if word == 0 {
                    slot = (slot / 64 + 1) * 64;
                    continue;
                }
                slot += word.trailing_zeros() as usize;
                if slot >= page.used as usize {
                    break;
                }
                let rec = page.at(slot);
                let h = ((p as u64) << SLOT_BITS) | slot as u64;
                self.pos = h + 1;
                return Some((self.pos, read_id(rec), view(rec)));
            }
            self.pos = ((p as u64) + 1) << SLOT_BITS;
        }
        let slots = self.slots;
        while let Some(b) = slots.big.get((self.pos - big) as usize) {
            self.pos += 1;
            if let Big::Live {
                id,
                kind,
                layout_version,
                state,
            } = b
            {
                let u = UnitRef {
                    kind: *kind,
                    layout_version: *layout_version,
                    state,
                };
                return Some((self.pos, *id, u));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Units {
        /// The arena's bookkeeping agrees with itself: every page with a free slot (and only
        /// those) is on its length's partial list, free lists and bitmaps count alike, every
        /// indexed handle names a live unit with its id, and nothing live is unindexed.
        fn check(&self) {
            let s = &self.slots;
            let mut on_list = vec![false; s.pages.len()];
            for (len, &head) in s.partial_head.iter().enumerate() {
                let (mut p, mut prev) = (head, NONE);
                while p != NONE {
                    let page = &s.pages[p as usize];
                    assert_eq!(page.len as usize, len, "page {p} on another length's list");
                    assert_eq!(page.prev, prev, "page {p}'s back link");
                    assert!(!on_list[p as usize], "page {p} twice on a partial list");
                    on_list[p as usize] = true;
                    (prev, p) = (p, page.next);
                }
            }
            let vacant: std::collections::BTreeSet<u32> = s.vacant.iter().copied().collect();
            let mut live_total = 0;
            for (p, page) in s.pages.iter().enumerate() {
                if vacant.contains(&(p as u32)) {
                    assert!(
                        page.bytes.is_empty() && !on_list[p],
                        "vacant page {p} in use"
                    );
                    continue;
                }
                let bits: u32 = page.live_bits.iter().map(|w| w.count_ones()).sum();
                assert_eq!(bits, u32::from(page.live), "page {p}: bitmap vs live count");
                assert!(page.live > 0, "page {p} is empty but not released");
                let mut free = 0;
                let mut f = page.free;
                while f != NO_SLOT {
                    assert!(
                        !page.is_live(f as usize),
                        "page {p}: live slot {f} on free list"
                    );
                    let rec = page.at(f as usize);
                    f = u16::from_le_bytes([rec[0], rec[1]]);
                    free += 1;
                }
                assert_eq!(free + page.live, page.used, "page {p}: free + live vs used");
                let has_room = free > 0 || (page.used as usize) < page.capacity();
                assert_eq!(has_room, on_list[p], "page {p}: room vs partial list");
                assert_eq!(page.partial, on_list[p], "page {p}: partial flag");
                live_total += page.live as usize;
            }
            live_total += s
                .big
                .iter()
                .filter(|b| matches!(b, Big::Live { .. }))
                .count();
            assert_eq!(live_total, self.count, "live units vs count");
            let mut indexed = 0;
            for (i, t) in self.index.iter().enumerate() {
                for &h in t.iter() {
                    let id = s.id(h);
                    assert_eq!(shard(self.hash(id)), i, "unit {id} in the wrong shard");
                    if h & BIG == 0 {
                        let page = &s.pages[(h >> SLOT_BITS) as usize];
                        assert!(page.is_live((h & SLOT_MASK) as usize), "{h:#x} not live");
                    }
                    indexed += 1;
                }
            }
            assert_eq!(indexed, self.count, "indexed units vs count");
        }
    }

    /// Random puts (lengths that fill pages, move units between lengths, cross the inline
    /// limit) and retires keep the bookkeeping consistent after every step.
    #[test]
    fn bookkeeping_stays_consistent() {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut units = Units::default();
        let lens = [0usize, 1, 48, 2000, SMALL_MAX, SMALL_MAX + 1];
        let state = vec![0xA5u8; SMALL_MAX + 1];
        for step in 0..40_000 {
            let id = next(3000);
            if next(3) == 0 {
                units.retire(id, |_| {});
            } else {
                let len = lens[next(lens.len() as u64) as usize];
                let u = UnitRef {
                    kind: 1,
                    layout_version: 1,
                    state: &state[..len],
                };
                units.put(id, u, |_| {});
            }
            if step % 997 == 0 {
                units.check();
            }
        }
        units.check();
        for id in 0..3000 {
            units.retire(id, |_| {});
        }
        units.check();
        assert!(units.slots.pages.iter().all(|p| p.bytes.is_empty()));
    }
}
