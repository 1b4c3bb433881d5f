//! A hostile or corrupt peer: every word the other process writes (ring control words, commit
//! words, frame headers, sequence numbers, superblock fields, record blocks) reaches only
//! checked arithmetic and comes back as a typed error naming the field, never a panic, a hang
//! or an out-of-bounds access; the side that refused it keeps its position and keeps serving.
//!
//! Regression tests for the two bugs of issue 10 (positions and sequence numbers near
//! `u64::MAX` passing `check_positions` and overflowing in the consumer; the step-up push at a
//! ring head of capacity − 64, which needs 192 bytes where 160 were reserved), an exact test of
//! `Producer::can_push`, and fuzz-style property tests with at least 100 000 generated inputs
//! per parser. The number of inputs is `UNDERSTUDY_FUZZ_CASES` (default 100 000: ~10 s for
//! the whole file in a debug build on a loaded 2-vCPU machine); the long run, in release with
//! the overflow checks of a debug build kept on (2 million inputs per parser take ~5 s):
//!
//! ```sh
//! CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true UNDERSTUDY_FUZZ_CASES=20000000 \
//!     cargo test -p shm-layout --release --test hostile
//! ```
//!
//! Each fuzz test prints its base seed; `UNDERSTUDY_TEST_SEED=<seed>` repeats a run, and a
//! failing case prints the seed that repeats exactly it.

mod common;

use common::{Rng, TestDir};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use shm_layout::frame::{
    checksum, commit_word, frame_bytes, word1, word2, FLAG_PAD, FRAME_ALIGN, HEADER_BYTES,
    PAD_RECORD_TYPE,
};
use shm_layout::memory::{HeapMemory, WordMemory};
use shm_layout::record::{decode, Record, RecordError};
use shm_layout::region::{
    file_bytes, IdentityWords, Region, RegionError, RegionSpec, LAYOUT_MAJOR, MAGIC, READY,
    SUPERBLOCK_WORDS,
};
use shm_layout::ring::{
    max_batch_bytes, ring_words, BatchBuf, Consumer, Producer, PushError, ReadError, RingError,
    CONTROL_BYTES, DATA_WORD, MAX_POSITION, MAX_SEQ, MIN_CAPACITY,
};
use shm_layout::Ordering;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use understudy_test_support::ChildGuard;

/// Control words of a ring (see the layout in `shm_layout::ring`): line 0 holds the producer's
/// head position and sequence, line 1 the consumer's tail position and sequence.
const HEAD_POS: usize = 0;
const HEAD_SEQ: usize = 1;
const TAIL_POS: usize = 16;
const TAIL_SEQ: usize = 17;

/// Generated inputs per parser (see the module doc).
fn cases() -> u32 {
    std::env::var("UNDERSTUDY_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000)
}

fn fuzz_config() -> ProptestConfig {
    ProptestConfig {
        // Generated inputs, not shrinking, are the point; a failure still shrinks.
        failure_persistence: None,
        ..ProptestConfig::with_cases(cases())
    }
}

type Mem = Arc<HeapMemory>;

/// Raw access to a heap ring, as a peer writing the shared memory itself.
struct Raw {
    mem: Mem,
    mask: u64,
}

impl Raw {
    fn new(mem: &Mem, capacity: usize) -> Raw {
        Raw {
            mem: mem.clone(),
            mask: capacity as u64 - 1,
        }
    }
    fn control(&self, i: usize, v: u64) {
        self.mem.word(i).store(v, Ordering::Relaxed);
    }
    /// The word at `pos` (positions wrap around the buffer).
    fn word(&self, pos: u64) -> &shm_layout::AtomicU64 {
        self.mem.word(DATA_WORD + ((pos & self.mask) / 8) as usize)
    }
    fn get(&self, pos: u64) -> u64 {
        self.word(pos).load(Ordering::Relaxed)
    }
    fn set(&self, pos: u64, v: u64) {
        self.word(pos).store(v, Ordering::Relaxed);
    }
    /// Write a complete, correctly checksummed one-frame batch at `pos` with sequence `seq`,
    /// as a producer would (a forger can compute the checksum as well as the producer).
    fn forge_frame(&self, pos: u64, seq: u64, payload_words: &[u64]) {
        let pos = pos & self.mask; // the same word, with room for offsets below u64::MAX
        let payload_len = payload_words.len() * 8;
        let fb = frame_bytes(payload_len);
        let mut area = payload_words.to_vec();
        area.resize((fb - HEADER_BYTES) / 8, 0);
        let w1 = word1(payload_len as u32, 7, 1);
        let w2 = word2(0, 0);
        let sum = checksum(w1, w2, seq, &area);
        self.set(pos + 8, w1);
        self.set(pos + 16, w2 | (sum as u64) << 32);
        self.set(pos + 24, seq);
        for (k, w) in area.iter().enumerate() {
            self.set(pos + HEADER_BYTES as u64 + 8 * k as u64, *w);
        }
        self.set(pos + fb as u64, 0);
        self.set(pos, commit_word(seq, fb, false));
    }
    /// Store the checksum the frame at `pos` with sequence `seq` has with its words as they are
    /// now.
    fn reseal(&self, pos: u64, seq: u64) {
        let pos = pos & self.mask;
        let (w1, w2) = (self.get(pos + 8), self.get(pos + 16));
        let area: Vec<u64> = if w2 as u16 & FLAG_PAD != 0 {
            Vec::new()
        } else {
            // A forged length may be anything: checksum at most what fits in the buffer.
            let n = ((frame_bytes((w1 & 0xFFFF_FFFF) as usize) - HEADER_BYTES) / 8)
                .min((self.mask as usize + 1) / 8);
            (0..n as u64)
                .map(|k| self.get(pos + HEADER_BYTES as u64 + 8 * k))
                .collect()
        };
        let sum = checksum(w1, w2 & 0xFFFF_FFFF, seq, &area);
        self.set(pos + 16, (w2 & 0xFFFF_FFFF) | (sum as u64) << 32);
    }
}

/// The position a read error names: the batch's or the frame's inside it.
fn read_error_pos(e: &ReadError) -> u64 {
    match e {
        ReadError::BadCommit { pos, .. }
        | ReadError::BadSequence { pos, .. }
        | ReadError::BadLength { pos, .. }
        | ReadError::OutOfRange { pos, .. }
        | ReadError::BadFlags { pos, .. }
        | ReadError::Unchecked { pos, .. }
        | ReadError::BadChecksum { pos, .. } => *pos,
    }
}

/// A fresh heap ring of `capacity` bytes.
fn ring(capacity: usize) -> (Mem, Raw) {
    let mem = Arc::new(HeapMemory::new(ring_words(capacity)));
    let raw = Raw::new(&mem, capacity);
    (mem, raw)
}

// ---------------------------------------------------------------------------------------------
// Regressions: positions and sequence numbers near u64::MAX
// ---------------------------------------------------------------------------------------------

#[test]
fn positions_near_u64_max_are_refused_by_name_not_overflowed() {
    // Proves published head and tail positions past MAX_POSITION (up to the last aligned
    // position below u64::MAX) are refused at attach and resume with an error naming the word,
    // even when a well-formed committed batch sits there. Before the fix they passed the check
    // (aligned, equal, so "at most a lap apart") and `poll` overflowed `pos + len` (a panic in
    // a debug build, a wrapped end in release).
    let cap = MIN_CAPACITY;
    let top = !(FRAME_ALIGN as u64 - 1); // the last frame-aligned position below u64::MAX
    for p in [
        top,
        top - 32,
        top - cap as u64,
        MAX_POSITION + 32,
        MAX_POSITION + (1 << 62),
    ] {
        let (mem, raw) = ring(cap);
        for (i, v) in [(HEAD_POS, p), (TAIL_POS, p), (HEAD_SEQ, 5), (TAIL_SEQ, 5)] {
            raw.control(i, v);
        }
        raw.forge_frame(p, 5, &[1, 2, 3, 4]);

        let e = Consumer::attach(mem.clone(), cap)
            .err()
            .expect("attach refuses");
        assert_eq!(
            e,
            RingError::OutOfRange {
                field: "head position",
                found: p,
                max: MAX_POSITION
            }
        );
        assert!(
            e.to_string().contains(&format!(
                "head position: expected at most {MAX_POSITION}, found {p}"
            )),
            "{e}"
        );
        let e = Producer::resume(mem.clone(), cap)
            .err()
            .expect("resume refuses");
        assert!(
            matches!(e, RingError::OutOfRange { field: "head position", found, .. } if found == p)
        );

        // Only the tail out of range (the producer's head is fine): named as the tail.
        raw.control(HEAD_POS, MAX_POSITION - cap as u64);
        let e = Consumer::attach(mem.clone(), cap)
            .err()
            .expect("attach refuses");
        assert!(
            matches!(e, RingError::OutOfRange { field: "tail position", found, .. } if found == p),
            "{e:?}"
        );
    }

    // A ring reaches MAX_POSITION and ends there: a batch that ends at it is read (and the
    // ends re-attach there), the next one is refused by name, without moving the consumer.
    let (mem, raw) = ring(cap);
    let p = MAX_POSITION - 64;
    for (i, v) in [(HEAD_POS, p), (TAIL_POS, p), (HEAD_SEQ, 9), (TAIL_SEQ, 9)] {
        raw.control(i, v);
    }
    raw.forge_frame(p, 9, &[1, 2]);
    let mut c = Consumer::attach(mem.clone(), cap).unwrap();
    let mut buf = BatchBuf::default();
    assert!(c.poll(&mut buf).unwrap());
    assert_eq!((c.position(), c.next_seq()), (MAX_POSITION, 10));
    let mut prod = Producer::resume(mem.clone(), cap).unwrap();
    assert_eq!((prod.position(), prod.next_seq()), (MAX_POSITION, 10));
    let c2 = Consumer::attach(mem, cap).unwrap();
    assert_eq!((c2.position(), c2.next_seq()), (MAX_POSITION, 10));
    prod.try_publish(1, 1, 0, b"past the end").unwrap();
    let e = c.poll(&mut buf).unwrap_err();
    assert_eq!(
        e,
        ReadError::OutOfRange {
            pos: MAX_POSITION,
            field: "batch end position",
            found: MAX_POSITION + 64,
            max: MAX_POSITION
        }
    );
    assert!(e.to_string().contains("expected at most"), "{e}");
    assert_eq!(c.position(), MAX_POSITION);
}

#[test]
fn sequence_numbers_near_u64_max_are_refused_by_name_not_overflowed() {
    // Proves a sequence number past MAX_SEQ, published in a tail or head sequence word or in a
    // committed frame's header, or given to `seek`, is refused with an error naming it. Before
    // the fix a well-formed frame with sequence u64::MAX was accepted and the consumer's (and a
    // resuming producer's) `seq += 1` overflowed.
    let cap = MIN_CAPACITY;
    for s in [u64::MAX, u64::MAX - 1, MAX_SEQ + 1, MAX_SEQ + (1 << 62)] {
        let (mem, raw) = ring(cap);
        raw.control(TAIL_SEQ, s);
        raw.control(HEAD_SEQ, s);
        raw.forge_frame(0, s, &[42]);
        let e = Consumer::attach(mem.clone(), cap)
            .err()
            .expect("attach refuses");
        assert_eq!(
            e,
            RingError::OutOfRange {
                field: "sequence",
                found: s,
                max: MAX_SEQ
            }
        );
        let e = Producer::resume(mem.clone(), cap)
            .err()
            .expect("resume refuses");
        assert!(matches!(e, RingError::OutOfRange { field: "sequence", found, .. } if found == s));

        // A consumer attached at a sane sequence cannot be sought to it either.
        raw.control(TAIL_SEQ, 0);
        raw.set(0, 0);
        let mut c = Consumer::attach(mem.clone(), cap).unwrap();
        let e = c.seek(0, s).unwrap_err();
        assert!(
            matches!(e, RingError::OutOfRange { field: "seek sequence", found, .. } if found == s)
        );
        let e = c.seek(!31, 0).unwrap_err();
        assert!(matches!(
            e,
            RingError::OutOfRange {
                field: "seek position",
                ..
            }
        ));
        assert_eq!(
            (c.position(), c.next_seq()),
            (0, 0),
            "a refused seek moves nothing"
        );
    }

    // Sequences up to MAX_SEQ work; a batch that could take them past it is refused.
    let (mem, raw) = ring(cap);
    let s = MAX_SEQ - 2; // a 64-byte batch: at most 2 frames
    raw.control(TAIL_SEQ, s);
    raw.control(HEAD_SEQ, s);
    raw.forge_frame(0, s, &[42]);
    let mut c = Consumer::attach(mem.clone(), cap).unwrap();
    assert!(c.poll(&mut BatchBuf::default()).unwrap());
    assert_eq!(c.next_seq(), s + 1);
    let mut p = Producer::resume(mem, cap).unwrap();
    assert_eq!(p.next_seq(), s + 1);
    p.try_publish(1, 1, 0, &[0; 32]).unwrap();
    let e = c.poll(&mut BatchBuf::default()).unwrap_err();
    assert!(
        matches!(
            e,
            ReadError::OutOfRange {
                field: "batch's last sequence",
                max: MAX_SEQ,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(c.next_seq(), s + 1);
}

// ---------------------------------------------------------------------------------------------
// Regressions: `can_push` is exact; the step-up push at capacity − 64
// ---------------------------------------------------------------------------------------------

/// A producer and consumer whose head is at absolute position `head` (consumed up to
/// `head - used`, so `used` bytes are committed and unread).
fn positioned(capacity: usize, head: u64, used: u64) -> (Producer<Mem>, Consumer<Mem>) {
    assert!(used <= head && used as usize <= max_batch_bytes(capacity));
    let mem = Arc::new(HeapMemory::new(ring_words(capacity)));
    let mut p = Producer::create(mem.clone(), capacity).unwrap();
    let mut c = Consumer::attach(mem, capacity).unwrap();
    let mut buf = BatchBuf::default();
    // Whole frames that never cross the buffer's end, so no padding moves the positions.
    let mut fill = |p: &mut Producer<Mem>, to: u64, consume: bool| {
        while p.position() < to {
            let off = p.position() % capacity as u64;
            let n = (to - p.position())
                .min(capacity as u64 - off)
                .min(max_batch_bytes(capacity) as u64 / 2);
            p.try_publish(1, 1, 0, &vec![0xA5; n as usize - HEADER_BYTES])
                .unwrap();
            if consume {
                assert!(c.poll(&mut buf).unwrap());
            }
        }
    };
    fill(&mut p, head - used, true);
    fill(&mut p, head, false);
    assert_eq!(p.position(), head);
    assert_eq!(p.free_bytes() as u64, capacity as u64 - used);
    (p, c)
}

#[test]
fn can_push_says_exactly_whether_push_succeeds_at_every_offset_near_the_end() {
    // Proves `check_push` / `can_push` return what `push` of that frame then returns, at every
    // 32-byte head offset of the last 512 bytes of the buffer and the first 64, for payloads
    // around the frame and padding boundaries and for free space from none to all, and that a
    // frame `can_push` accepted is then read back intact (padding included).
    let cap = 1024usize;
    let lens = [
        0usize, 1, 24, 31, 32, 56, 64, 100, 200, 450, 900, 960, 991, 992, 1024, 5000,
    ];
    let mut checked = 0;
    let mut accepted = 0;
    for off in (cap as u64 - 512..cap as u64 + 64).step_by(32) {
        let head = cap as u64 + off; // second lap: the previous lap's words are behind
        for used in [0u64, 32, 96, 448, 800, 832, 864, 896, 928, 960, 992] {
            for &len in &lens {
                let (mut p, mut c) = positioned(cap, head, used);
                let predicted = p.check_push(len);
                assert_eq!(p.can_push(len), predicted.is_ok());
                let payload = vec![0x3C; len];
                let mut b = p.batch();
                let got = b.push(2, 1, 0, &payload);
                assert_eq!(
                    got,
                    predicted,
                    "head {head} (offset {}), {used} bytes unread, payload {len}",
                    head % cap as u64
                );
                checked += 1;
                if got.is_ok() {
                    accepted += 1;
                    b.commit().unwrap();
                    let mut buf = BatchBuf::default();
                    while c.position() < head {
                        assert!(c.poll(&mut buf).unwrap());
                    }
                    assert!(c.poll(&mut buf).unwrap());
                    let f = buf.frames().next().unwrap();
                    assert_eq!(f.payload, &payload[..]);
                }
            }
        }
    }
    assert!(
        checked > 3000 && accepted > 500,
        "{checked} checked, {accepted} accepted"
    );
}

#[test]
fn the_step_up_push_at_capacity_minus_64_needs_192_bytes() {
    // Proves the switchover's room check must count padding: at a head of capacity − 64 a
    // step-up frame (a 56-byte position, a 96-byte frame) does not fit before the buffer's end,
    // so its push writes 64 bytes of padding, the frame and the zeroed word past it: 192 bytes.
    // The engine reserved `frame_bytes(56) + 2 * FRAME_ALIGN` = 160 and then pushed with
    // `.expect("room was made for the step-up frame")`, which panicked the active. With 160
    // free, that check passes while `can_push` (what the engine now waits for) says no, as the
    // push does; from 192 free both agree the frame fits.
    let cap = 8192usize;
    let head = 3 * cap as u64 - 64;
    let old_need = frame_bytes(56) + 2 * FRAME_ALIGN;
    assert_eq!(old_need, 160);
    for free in [160u64, 192] {
        let (mut p, _c) = positioned(cap, head, cap as u64 - free);
        assert_eq!(p.free_bytes() as u64, free);
        assert!(p.free_bytes() >= old_need, "the old check passes");
        let fits = free >= 192;
        assert_eq!(p.can_push(56), fits, "{free} free");
        let mut b = p.batch();
        assert_eq!(b.push(10, 1, 56, &[7; 56]).is_ok(), fits, "{free} free");
        if !fits {
            assert_eq!(
                b.push(10, 1, 56, &[7; 56]),
                Err(PushError::Full {
                    needed_bytes: 192,
                    free_bytes: 160
                })
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz: ring control words
// ---------------------------------------------------------------------------------------------

/// Run `case` on `cases()` generated inputs, each from its own seed (the base seed,
/// `UNDERSTUDY_TEST_SEED` or else the clock, plus the case's index), without proptest's
/// machinery: these inputs are cheap to generate, and 100 000 of them run in seconds in a
/// debug build. A failing case names its seed: `UNDERSTUDY_TEST_SEED=<seed>
/// UNDERSTUDY_FUZZ_CASES=1` repeats exactly it.
fn fuzz(name: &str, mut case: impl FnMut(&mut Rng)) {
    let base = std::env::var("UNDERSTUDY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    /// Names the failing case's seed when its test panics.
    struct Report<'a>(&'a str, u64);
    impl Drop for Report<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                eprintln!(
                    "{}: failing case: UNDERSTUDY_TEST_SEED={} UNDERSTUDY_FUZZ_CASES=1",
                    self.0, self.1
                );
            }
        }
    }
    let n = cases();
    for i in 0..n {
        let seed = base.wrapping_add(i as u64);
        let _report = Report(name, seed);
        // Spread neighbouring seeds (the generator ignores the lowest bit).
        case(&mut Rng::new(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17),
        ));
    }
    eprintln!("{name}: {n} generated inputs from UNDERSTUDY_TEST_SEED={base}");
}

fn coin(r: &mut Rng) -> bool {
    r.next_u64() & 1 == 0
}

/// A word a hostile peer might write: small, near a lap or capacity boundary, near the limits
/// (MAX_POSITION, u64::MAX, 2^31, 2^32), a power of two, or anything; half of them
/// frame-aligned.
fn hostile_word(r: &mut Rng) -> u64 {
    let near = |r: &mut Rng, base: u64| base.wrapping_add(r.range(0, 96)).wrapping_sub(48);
    let w = match r.range(0, 7) {
        0 => r.range(0, 4096),
        1 => near(r, u64::MAX),
        2 => near(r, MAX_POSITION),
        3 => near(r, 1 << 32),
        4 => near(r, 1 << 31),
        5 => 1u64 << r.range(1, 64),
        _ => r.next_u64(),
    };
    if coin(r) {
        w & !31
    } else {
        w
    }
}

/// A commit word a hostile peer might write at a batch boundary: the right shape with a
/// length near the limits, a stamp of a nearby sequence, the continuation bit; or anything.
fn hostile_commit(r: &mut Rng, seq: u64, capacity: u64) -> u64 {
    if coin(r) {
        return r.next_u64();
    }
    let len = match r.range(0, 3) {
        0 => r.range(0, 97),
        1 => r.range(capacity - 64, capacity + 33),
        _ => 0x7FFF_FFFF,
    };
    let seq = seq.wrapping_add(r.range(0, 3)).wrapping_sub(1);
    commit_word(seq, len as usize, coin(r))
}

#[test]
fn fuzz_attach_and_resume_over_hostile_control_words() {
    // Proves a ring whose control words (head, tail, both sequences) and whose first frame
    // (commit word, length word, sequence word) a peer wrote at random — near u64::MAX,
    // MAX_POSITION, the lap and the 2^31/2^32 boundaries — is refused by name at attach or
    // resume, or works: polls either deliver a validated batch or refuse without moving, a
    // resumed producer never counts more free bytes than the ring has and its pushes either
    // land where they should or are refused as Full. No panic, no hang.
    let cap = 1024usize;
    let mut buf = BatchBuf::default();
    // How often each outcome came up: attach refused / accepted, a batch delivered / refused,
    // resume refused / accepted.
    let mut seen = [0u64; 6];
    fuzz("fuzz_attach_and_resume_over_hostile_control_words", |r| {
        let (mem, raw) = ring(cap);
        // Positions and sequences that agree with each other (near 0, or near the limits) as
        // often as ones that do not.
        let tail = match r.range(0, 3) {
            0 => r.range(0, 4096) & !31,
            1 => (MAX_POSITION - r.range(0, 4096)) & !31,
            _ => hostile_word(r),
        };
        let head = match r.range(0, 4) {
            0 => tail,
            1 => tail.wrapping_add(32 * r.range(0, 40)),
            2 => tail.wrapping_sub(32 * r.range(0, 40)),
            _ => hostile_word(r),
        };
        let tail_seq = match r.range(0, 3) {
            0 => r.range(0, 100),
            1 => MAX_SEQ - r.range(0, 100),
            _ => hostile_word(r),
        };
        let head_seq = if coin(r) {
            tail_seq.wrapping_add(r.range(0, 3))
        } else {
            hostile_word(r)
        };
        for (i, v) in [
            (HEAD_POS, head),
            (TAIL_POS, tail),
            (HEAD_SEQ, head_seq),
            (TAIL_SEQ, tail_seq),
        ] {
            raw.control(i, v);
        }
        // The first frame, at the tail or the head: a well-formed frame with one header word
        // rewritten (or none), or a commit word, a length word and a sequence word at random.
        let stamp_tail = coin(r);
        let (at, seq) = if stamp_tail {
            (tail, tail_seq)
        } else {
            (head, head_seq)
        };
        let at = at & (cap as u64 - 1);
        if coin(r) {
            let words: Vec<u64> = (0..r.range(0, 9)).map(|_| r.next_u64()).collect();
            raw.forge_frame(at, seq, &words);
            if coin(r) {
                let k = r.range(0, 4);
                let fb = frame_bytes(8 * words.len()) as u64;
                raw.set(at + 8 * k, hostile_header_word(r, k, seq, fb, cap as u64));
            }
        } else {
            raw.set(at, hostile_commit(r, seq, cap as u64));
            raw.set(at + 8, hostile_word(r));
            raw.set(at + 24, hostile_word(r));
        }
        match Consumer::attach(mem.clone(), cap) {
            Err(e) => {
                seen[0] += 1;
                assert!(e.to_string().contains("expected"), "{e}");
                assert!(
                    matches!(
                        e,
                        RingError::OutOfRange { .. } | RingError::BadPositions { .. }
                    ),
                    "{e:?}"
                );
            }
            Ok(mut c) => {
                seen[1] += 1;
                assert!(c.position() <= MAX_POSITION && c.next_seq() <= MAX_SEQ);
                for _ in 0..3 {
                    let (pos, seq) = (c.position(), c.next_seq());
                    match c.poll(&mut buf) {
                        Ok(true) => {
                            seen[2] += 1;
                            assert!(c.position() > pos && c.position() - pos < cap as u64)
                        }
                        Ok(false) => break,
                        Err(e) => {
                            seen[3] += 1;
                            assert_eq!((c.position(), c.next_seq()), (pos, seq));
                            let at = read_error_pos(&e);
                            assert!(at >= pos && at - pos < cap as u64, "{e}");
                            assert!(e.to_string().contains(&format!("position {at}")), "{e}");
                            break;
                        }
                    }
                }
                let _ = c.torn_tail();
            }
        }
        match Producer::resume(mem, cap) {
            Err(e) => {
                seen[4] += 1;
                assert!(e.to_string().contains("expected"), "{e}")
            }
            Ok(mut p) => {
                seen[5] += 1;
                assert!(p.position() <= MAX_POSITION && p.next_seq() <= MAX_SEQ);
                assert!(p.free_bytes() <= cap);
                let before = p.position();
                let off = before % cap as u64;
                let pad = if off + 96 > cap as u64 {
                    cap as u64 - off
                } else {
                    0
                };
                match p.try_publish(3, 1, 0, &[9; 40]) {
                    Ok(()) => assert_eq!(p.position(), before + pad + 96),
                    Err(e) => assert!(matches!(e, PushError::Full { .. }), "{e:?}"),
                }
            }
        }
    });
    eprintln!(
        "attach refused/accepted, batch delivered/refused, resume refused/accepted: {seen:?}"
    );
    assert!(
        seen.iter().all(|&n| n > 0),
        "every outcome comes up: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz: frames of a committed batch
// ---------------------------------------------------------------------------------------------

/// A header word a hostile peer might put in place of word `k` (0..4) of a frame with sequence
/// `seq` and `fb` bytes: the right shape with one field off by a little or at a limit; or
/// anything.
fn hostile_header_word(r: &mut Rng, k: u64, seq: u64, fb: u64, cap: u64) -> u64 {
    let d = r.range(0, 5);
    let near = |v: u64| v.wrapping_add(d).wrapping_sub(2);
    match (k, r.range(0, 6)) {
        (0, 0) => commit_word(seq, near(fb) as usize & 0x7FFF_FFFF, true),
        (0, 1) => commit_word(near(seq), fb as usize, true),
        (0, 2) => commit_word(seq, fb as usize, false),
        (0, 3) => commit_word(seq, near(cap) as usize, true),
        (1, 0) => word1(near(fb - 32) as u32, 2, 1),
        (1, 1) => word1(u32::MAX - d as u32, 2, 1),
        (1, 2) => word1((fb - 32) as u32, PAD_RECORD_TYPE, 1),
        (1, 3) => word1(near(cap) as u32, 2, 1),
        (2, 0) => word2(FLAG_PAD, 0),
        (2, 1) => word2(r.next_u64() as u16, r.next_u64() as u16),
        (3, 0) => near(seq),
        (3, 1) => u64::MAX - d,
        (3, 2) => MAX_SEQ + d,
        _ => hostile_word(r),
    }
}

#[test]
fn fuzz_frames_of_a_committed_batch() {
    // Proves a committed batch (at any 32-byte offset, wrapping behind a padding frame when it
    // reaches the buffer's end) whose frame headers a peer rewrote — commit and continuation
    // words, lengths near a frame's and the buffer's bounds and u32::MAX, padding type and
    // flag, sequences off by one and near u64::MAX, with the checksum recomputed or not — is
    // delivered only while it is still valid, otherwise refused with the frame's position
    // named and the consumer unmoved, the same way when polled again; and that once the peer
    // writes the batch back, the consumer reads it: it keeps serving.
    let cap = 1024usize;
    let mut buf = BatchBuf::default();
    let mut payload = Vec::with_capacity(cap);
    let (mut refused, mut delivered) = (0u64, 0u64);
    fuzz("fuzz_frames_of_a_committed_batch", |r| {
        let (mem, raw) = ring(cap);
        let mut p = Producer::create(mem.clone(), cap).unwrap();
        // Start at a random offset of the second lap: filler frames that never cross the
        // buffer's end, released as they are written (as a consumer would).
        let start = cap as u64 + 32 * r.range(0, 32);
        while p.position() < start {
            let off = p.position() % cap as u64;
            let n = (start - p.position()).min(cap as u64 - off).min(480) as usize;
            payload.clear();
            payload.resize(n - 32, 1);
            p.try_publish(1, 1, 0, &payload).unwrap();
            raw.control(TAIL_POS, p.position());
        }
        // The consumer takes over the ring at the start: attach there (what a standby does).
        raw.control(TAIL_POS, p.position());
        raw.control(TAIL_SEQ, p.next_seq());
        raw.set(p.position(), 0);
        let mut c = Consumer::attach(mem.clone(), cap).unwrap();
        let mut b = p.batch();
        for k in 0..r.range(1, 5) {
            let n = if coin(r) {
                r.range(0, 40)
            } else {
                r.range(40, 300)
            } as usize;
            payload.clear();
            payload.resize(n, k as u8 + 1);
            if b.push(5, 1, n as u16, &payload).is_err() {
                break;
            }
        }
        let Some(committed) = b.commit() else {
            return;
        };
        // The frames' start positions, as written.
        let mut frames = Vec::new();
        let mut at = committed.start;
        while at < committed.end {
            frames.push(at);
            at += frame_bytes((raw.get(at + 8) & 0xFFFF_FFFF) as usize) as u64;
        }
        let saved: Vec<(u64, u64)> = (committed.start..committed.end + 32)
            .step_by(8)
            .map(|q| (q, raw.get(q)))
            .collect();
        for _ in 0..r.range(1, 4) {
            let i = r.range(0, frames.len() as u64) as usize;
            let (f, seq) = (frames[i], committed.first_seq + i as u64);
            let fb = frame_bytes((raw.get(f + 8) & 0xFFFF_FFFF) as usize) as u64;
            let k = r.range(0, 4);
            if k == 0 && i == 0 {
                // The batch head's commit word: a batch length or stamp a peer might write.
                let len = committed.end - committed.start;
                let d = r.range(0, 5);
                let w = match r.range(0, 5) {
                    0 => commit_word(
                        seq,
                        (len + 32 * d).wrapping_sub(64) as usize & 0x7FFF_FFFF,
                        false,
                    ),
                    1 => commit_word(seq.wrapping_add(d).wrapping_sub(2), len as usize, false),
                    2 => commit_word(seq, 0x7FFF_FFE0 + 8 * d as usize, false),
                    3 => commit_word(seq, len as usize, true),
                    _ => r.next_u64() | 1,
                };
                raw.set(f, w);
            } else {
                raw.set(f + 8 * k, hostile_header_word(r, k, seq, fb, cap as u64));
            }
            if coin(r) {
                raw.reseal(f, seq);
            }
        }
        if coin(r) {
            let f = *frames.last().unwrap();
            raw.set(f + 32, raw.get(f + 32) ^ 1);
        }
        let (pos, seq) = (c.position(), c.next_seq());
        match c.poll(&mut buf) {
            Ok(true) => {
                // Still a valid batch (a word rewritten with its own value, or resealed
                // consistently): what was delivered lies inside the ring.
                delivered += 1;
                assert!(buf.end() > pos && buf.end() - pos <= max_batch_bytes(cap) as u64);
                assert!(buf.frames().all(|f| f.payload.len() < cap));
            }
            Ok(false) => assert_eq!(c.position(), pos),
            Err(e) => {
                refused += 1;
                assert_eq!((c.position(), c.next_seq()), (pos, seq));
                assert!(e.to_string().contains("position"), "{e}");
                assert_eq!(c.poll(&mut buf), Err(e), "a refusal is not a one-off");
                for &(q, w) in &saved {
                    raw.set(q, w);
                }
                assert!(
                    c.poll(&mut buf).unwrap(),
                    "the batch, written back, is read"
                );
                assert_eq!(buf.end(), committed.end);
            }
        }
    });
    assert!(
        refused > delivered,
        "{refused} refused, {delivered} delivered"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz: a client ring whose peer writes anything, anywhere, at any time
// ---------------------------------------------------------------------------------------------

#[test]
fn fuzz_a_client_ring_with_a_hostile_client() {
    // Proves the engine's side of a client's ring (a consumer that releases only what it
    // committed, seeks to replicated positions and re-attaches after a restart) survives a
    // client that writes any word of the ring (control lines included) at any time, restarts
    // and publishes: every call returns a value or a typed error, a refused poll or seek
    // leaves the consumer where it was, and the producer never counts more free space than
    // the ring has.
    let cap = 1024usize;
    let words = ring_words(cap) as u64;
    let mut buf = BatchBuf::default();
    let payload = vec![0x11; 300];
    // Batches delivered, polls refused, seeks refused, attaches refused, resumes refused.
    let mut seen = [0u64; 5];
    fuzz("fuzz_a_client_ring_with_a_hostile_client", |r| {
        let (mem, _raw) = ring(cap);
        let mut p = Some(Producer::create(mem.clone(), cap).unwrap());
        let mut c = Some(Consumer::attach(mem.clone(), cap).unwrap());
        if let Some(c) = c.as_mut() {
            c.set_auto_release(false);
        }
        for _ in 0..r.range(1, 12) {
            match r.range(0, 16) {
                // The client publishes.
                0..=3 => {
                    if let Some(p) = p.as_mut() {
                        let n = r.range(0, 300) as usize;
                        match p.try_publish(4, 1, 0, &payload[..n]) {
                            Ok(()) => {}
                            Err(PushError::Full {
                                needed_bytes,
                                free_bytes,
                            }) => assert!(needed_bytes > free_bytes),
                            Err(e) => panic!("{e}"),
                        }
                        assert!(p.free_bytes() <= cap);
                    }
                }
                // The engine polls.
                4..=7 => {
                    if let Some(c) = c.as_mut() {
                        let (pos, seq) = (c.position(), c.next_seq());
                        match c.poll(&mut buf) {
                            Ok(true) => {
                                seen[0] += 1;
                                assert!(c.position() - pos < cap as u64)
                            }
                            Ok(false) => {}
                            Err(e) => {
                                seen[1] += 1;
                                assert_eq!((c.position(), c.next_seq()), (pos, seq));
                                assert!(e.to_string().contains("position"), "{e}");
                            }
                        }
                    }
                }
                // The engine releases what it committed.
                8 | 9 => {
                    if let Some(c) = c.as_mut() {
                        let (pos, seq) = (c.position(), c.next_seq());
                        c.release_to(pos, seq);
                    }
                }
                // The client writes a word: a control word mostly, or anywhere.
                10..=12 => {
                    let i = match r.range(0, 3) {
                        0 => r.range(0, 2),
                        1 => r.range(16, 18),
                        _ => r.range(0, words),
                    };
                    mem.word(i as usize)
                        .store(hostile_word(r), Ordering::Relaxed);
                }
                // The engine seeks to a (replicated) position and sequence.
                13 => {
                    if let Some(c) = c.as_mut() {
                        let before = (c.position(), c.next_seq());
                        if let Err(e) = c.seek(hostile_word(r), hostile_word(r)) {
                            seen[2] += 1;
                            assert_eq!((c.position(), c.next_seq()), before);
                            assert!(e.to_string().contains("expected"), "{e}");
                        }
                    }
                }
                // The engine restarts.
                14 => {
                    c = match Consumer::attach(mem.clone(), cap) {
                        Ok(mut c) => {
                            c.set_auto_release(false);
                            Some(c)
                        }
                        Err(e) => {
                            seen[3] += 1;
                            assert!(e.to_string().contains("expected"), "{e}");
                            None
                        }
                    };
                }
                // The client restarts.
                _ => {
                    p = match Producer::resume(mem.clone(), cap) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            seen[4] += 1;
                            assert!(e.to_string().contains("expected"), "{e}");
                            None
                        }
                    };
                }
            }
        }
    });
    eprintln!("delivered, polls/seeks/attaches/resumes refused: {seen:?}");
    assert!(
        seen.iter().all(|&n| n > 0),
        "every outcome comes up: {seen:?}"
    );
}

#[test]
fn fuzz_an_egress_ring_with_a_hostile_client() {
    // Proves the engine's side of a client's response ring (the producer) survives a client
    // that, as its consumer, writes any value into its tail words, the sleep words and the
    // data, reads, and makes the engine restart (resume): the producer's view of the
    // consumer's tail only moves forward to a position it could have released (frame-aligned,
    // at most a lap behind the head, not ahead of it), its free space never exceeds the ring,
    // and every push lands or is refused as Full, never elsewhere.
    let cap = 1024usize;
    let words = ring_words(cap) as u64;
    let mut buf = BatchBuf::default();
    let payload = vec![0x22; 300];
    // Pushes that landed, pushes refused as full, resumes refused.
    let mut seen = [0u64; 3];
    fuzz("fuzz_an_egress_ring_with_a_hostile_client", |r| {
        let (mem, _raw) = ring(cap);
        let mut p = Some(Producer::create(mem.clone(), cap).unwrap());
        let mut c = Consumer::attach(mem.clone(), cap).unwrap();
        let mut last_tail = 0;
        for _ in 0..r.range(1, 12) {
            match r.range(0, 10) {
                0..=3 => {
                    if let Some(p) = p.as_mut() {
                        let before = p.position();
                        let n = r.range(0, 300) as usize;
                        match p.try_publish(4, 1, 0, &payload[..n]) {
                            Ok(()) => {
                                seen[0] += 1;
                                let fb = frame_bytes(n) as u64;
                                let off = before % cap as u64;
                                let pad = if off + fb > cap as u64 {
                                    cap as u64 - off
                                } else {
                                    0
                                };
                                assert_eq!(p.position(), before + pad + fb);
                            }
                            Err(PushError::Full { .. }) => seen[1] += 1,
                            Err(e) => panic!("{e}"),
                        }
                        let head = p.position();
                        let tail = p.consumer_position();
                        assert!(tail <= head && head - tail <= cap as u64 && tail % 32 == 0);
                        assert!(tail >= last_tail, "the tail never moves back");
                        last_tail = tail;
                        assert!(p.free_bytes() <= cap);
                    }
                }
                // The client reads (it may refuse what it reads: its own problem).
                4 | 5 => {
                    let _ = c.poll(&mut buf);
                }
                // The client writes a word: its tail words, the sleep words, or anywhere.
                6..=8 => {
                    let i = match r.range(0, 3) {
                        0 => r.range(16, 18),
                        1 => [32, 48][r.range(0, 2) as usize],
                        _ => r.range(0, words),
                    };
                    mem.word(i as usize)
                        .store(hostile_word(r), Ordering::Relaxed);
                }
                // The engine restarts and resumes the ring.
                _ => {
                    p = match Producer::resume(mem.clone(), cap) {
                        Ok(p) => {
                            last_tail = 0;
                            Some(p)
                        }
                        Err(e) => {
                            seen[2] += 1;
                            assert!(e.to_string().contains("expected"), "{e}");
                            None
                        }
                    };
                }
            }
        }
    });
    eprintln!("pushes landed, full, resumes refused: {seen:?}");
    assert!(
        seen.iter().all(|&n| n > 0),
        "every outcome comes up: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz: record blocks
// ---------------------------------------------------------------------------------------------

#[derive(
    zerocopy::FromBytes,
    zerocopy::IntoBytes,
    zerocopy::Immutable,
    zerocopy::KnownLayout,
    Clone,
    Copy,
    Debug,
    PartialEq,
)]
#[repr(C)]
struct Order {
    id: u64,
    qty: u32,
    side: u32,
    expiry_ns: u64,
}

impl Record for Order {
    const TYPE_ID: u16 = 40;
    const NAME: &'static str = "order";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
    fn defaults() -> Self {
        Order {
            id: 0,
            qty: 0,
            side: 0,
            expiry_ns: u64::MAX,
        }
    }
}
shm_layout::assert_record_layout!(Order);

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn fuzz_record_blocks(
        bytes in prop::collection::vec(any::<u8>(), 0..48),
        block_length in prop_oneof![0u16..48, Just(u16::MAX), any::<u16>()],
    ) {
        // Proves a record decodes from any bytes and any announced block length to a value
        // exactly when the block is present and at least the oldest version long, otherwise
        // to an error naming the record and what it expected.
        let r = decode::<Order>(&bytes, block_length);
        let bl = block_length as usize;
        match r {
            Ok(o) => {
                prop_assert!(bl <= bytes.len() && bl >= 16);
                prop_assert_eq!(&zerocopy::IntoBytes::as_bytes(&o)[..16], &bytes[..16]);
            }
            Err(e) => {
                prop_assert!(bl > bytes.len() || bl < 16);
                prop_assert!(matches!(e, RecordError::Truncated { .. } | RecordError::TooShort { .. }), "{:?}", e);
                prop_assert!(e.to_string().contains("record `order`"), "{}", e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz: region superblocks
// ---------------------------------------------------------------------------------------------

fn uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The superblock `Region::create` writes for `capacity`.
fn valid_superblock(capacity: u64, uid: u32) -> [u64; SUPERBLOCK_WORDS] {
    let mut w = [0u64; SUPERBLOCK_WORDS];
    w[0] = MAGIC;
    w[1] = LAYOUT_MAJOR as u64 | (FRAME_ALIGN as u64) << 32;
    w[2] = 4096 | (CONTROL_BYTES as u64) << 32;
    w[3] = capacity;
    w[4] = 0x1234;
    w[5] = 0x5678;
    w[6] = 3;
    w[7] = uid as u64 | 7 << 32;
    w[8] = 100;
    w[12] = READY;
    w
}

/// What `check_superblock` must say about `w` in a file of `size` bytes: `Ok(capacity)` or the
/// name of the first field that is wrong.
fn expected_verdict(
    w: &[u64; SUPERBLOCK_WORDS],
    size: u64,
    uid: u32,
) -> Result<usize, &'static str> {
    if w[12] != READY {
        return Err("ready");
    }
    if w[0] != MAGIC {
        return Err("magic");
    }
    if w[1] as u16 != LAYOUT_MAJOR {
        return Err("layout major version");
    }
    if (w[1] >> 32) as u32 != FRAME_ALIGN as u32 {
        return Err("record alignment");
    }
    if w[2] as u32 != 4096 {
        return Err("header bytes");
    }
    if (w[2] >> 32) != CONTROL_BYTES as u64 {
        return Err("control bytes");
    }
    let cap = w[3];
    if !cap.is_power_of_two() || cap < MIN_CAPACITY as u64 || cap > 1 << 30 {
        return Err("capacity");
    }
    if size != file_bytes(cap as usize) as u64 {
        return Err("file size");
    }
    if w[7] as u32 != uid {
        return Err("creator uid");
    }
    Ok(cap as usize)
}

fn verdict_of(r: &Result<usize, RegionError>) -> Result<usize, &'static str> {
    match r {
        Ok(c) => Ok(*c),
        Err(RegionError::Field { field, .. }) => Err(field),
        Err(RegionError::FileSize { .. }) => Err("file size"),
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

#[test]
fn fuzz_superblocks() {
    // Proves a superblock whose words a peer rewrote (whole words, or one 16/32-bit field
    // inside one, with values near the limits) is accepted exactly when every field is valid,
    // otherwise refused with the first wrong field named and what was expected and found; the
    // file size must be the one the capacity implies.
    let uid = uid();
    let path = Path::new("/dev/shm/fuzz");
    let (mut opened, mut refused) = (0u64, 0u64);
    fuzz("fuzz_superblocks", |r| {
        let cap = 1u64 << r.range(10, 31);
        let mut w = valid_superblock(cap, uid);
        for _ in 0..r.range(0, 4) {
            let i = r.range(0, SUPERBLOCK_WORDS as u64) as usize;
            let v = hostile_word(r);
            w[i] = match r.range(0, 4) {
                0 => v,
                1 => (w[i] & !0xFFFF) | (v & 0xFFFF),
                2 => (w[i] & 0xFFFF_FFFF) | v << 32,
                _ => (w[i] & !0xFFFF_FFFF) | (v & 0xFFFF_FFFF),
            };
        }
        let size = file_bytes(cap as usize) as u64;
        let size = match r.range(0, 4) {
            0 => size.wrapping_add(r.range(0, 128)).wrapping_sub(64),
            1 => hostile_word(r),
            _ => size,
        };
        let got = Region::check_superblock(path, &w, size, uid);
        assert_eq!(verdict_of(&got), expected_verdict(&w, size, uid), "{w:x?}");
        match got {
            Ok(_) => opened += 1,
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("expected") && msg.contains("found"), "{msg}");
                refused += 1;
            }
        }
    });
    assert!(
        opened > 0 && refused > 0,
        "{opened} accepted, {refused} refused"
    );
}

#[test]
fn hostile_region_files_are_refused_by_name() {
    // Proves `Region::open` of real files under /dev/shm whose superblock words a peer
    // rewrote (the same hostile values as above, through the file) or whose size it changed
    // refuses each with the field named, and opens the untouched ones; each file is removed
    // (the directory guard removes the rest even if an assertion fails).
    use std::os::unix::fs::FileExt;
    let dir = TestDir::new("hostile-regions");
    let mut rng = common::Rng::from_env("hostile_region_files_are_refused_by_name");
    let uid = uid();
    let values = [
        0u64,
        1,
        u64::MAX,
        MAX_POSITION,
        1 << 31,
        1 << 40,
        MAGIC,
        READY,
        4096 | 512 << 32,
    ];
    let n = (cases() / 500).max(50);
    let (mut opened, mut refused) = (0, 0);
    for i in 0..n {
        let path = dir.join(&format!("r{i}"));
        let spec = RegionSpec {
            capacity: 1 << rng.range(10, 14),
            epoch: i as u64,
            kind: 1,
        };
        let created = Region::create(&path, spec, IdentityWords::default()).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut w = valid_superblock(spec.capacity as u64, uid);
        w[4] = created.region_id() as u64;
        w[5] = (created.region_id() >> 64) as u64;
        w[6] = i as u64;
        w[7] = uid as u64 | 1 << 32;
        w[8] = 0;
        drop(created);
        let mut size = file_bytes(spec.capacity) as u64;
        match rng.range(0, 4) {
            0 => {}
            1 => {
                size = size.saturating_sub(rng.range(1, 8192));
                file.set_len(size).unwrap();
            }
            _ => {
                let k = rng.range(0, SUPERBLOCK_WORDS as u64) as usize;
                let v = values[rng.range(0, values.len() as u64) as usize];
                if k != 12 {
                    w[k] = v;
                    file.write_at(&v.to_le_bytes(), 8 * k as u64).unwrap();
                }
            }
        }
        let r = Region::open(&path, Duration::from_millis(1));
        let expected = expected_verdict(&w, size, uid);
        match (&r, expected) {
            (Ok(reg), Ok(cap)) => {
                assert_eq!(reg.capacity(), cap);
                opened += 1;
            }
            (Err(RegionError::Field { field, .. }), Err(f)) => {
                assert_eq!(*field, f);
                refused += 1;
            }
            (Err(RegionError::FileSize { .. }), Err("file size" | "capacity")) => refused += 1,
            (r, e) => panic!(
                "file {i}: open gave {:?}, expected {e:?}",
                r.as_ref().map(|r| r.capacity())
            ),
        }
        drop(r);
        Region::remove(&path).unwrap();
    }
    assert!(
        opened > 0 && refused > 0,
        "{opened} opened, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// A hostile client process
// ---------------------------------------------------------------------------------------------

/// Set for the child: the region file of the ring it writes to.
const HOSTILE_CHILD_ENV: &str = "UNDERSTUDY_HOSTILE_CLIENT_REGION";
/// Batches the hostile child sends (or tries to).
const HOSTILE_BATCHES: u64 = 3000;

#[test]
fn hostile_client_process() {
    // Not a test on its own: the body of the client process that
    // `a_hostile_client_process_stops_only_its_own_ring` starts. In a normal test run (no
    // region given) it does nothing.
    use std::os::unix::fs::FileExt;
    let Ok(path) = std::env::var(HOSTILE_CHILD_ENV) else {
        return;
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let region = Region::open(path.as_ref(), Duration::from_secs(10)).expect("child: open");
    let cap = region.capacity() as u64;
    let mut p = region.producer().expect("child: producer");
    // The client maps the whole file: it can write any word of it, the engine's included.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("child: open for writing");
    let ring_at = shm_layout::region::HEADER_BYTES as u64;
    let mut rng = Rng::new(std::process::id() as u64);
    for b in 0..HOSTILE_BATCHES {
        let payload = b.to_le_bytes();
        match p.try_publish(9, 1, 8, &payload) {
            Ok(()) => {}
            // The engine stopped reading (it refused something): give it a moment.
            Err(PushError::Full { .. }) => std::thread::sleep(Duration::from_micros(50)),
            Err(e) => panic!("child: {e}"),
        }
        if rng.range(0, 64) == 0 {
            // One hostile word: a control word (head, tail, either sequence), the commit word
            // of the next batch (a stamp of the next sequence with a huge length, or
            // anything), or a header word of the batch just written.
            let pos = p.position();
            let data = |q: u64| ring_at + CONTROL_BYTES as u64 + (q & (cap - 1));
            let (at, v) = match rng.range(0, 6) {
                0 => (ring_at + 8 * HEAD_POS as u64, hostile_word(&mut rng)),
                1 => (ring_at + 8 * TAIL_POS as u64, hostile_word(&mut rng)),
                2 => (ring_at + 8 * TAIL_SEQ as u64, hostile_word(&mut rng)),
                3 => (ring_at + 8 * HEAD_SEQ as u64, hostile_word(&mut rng)),
                4 => (data(pos), hostile_commit(&mut rng, p.next_seq(), cap)),
                _ => (
                    data(pos.wrapping_sub(32) + 8 * rng.range(0, 4)),
                    hostile_word(&mut rng),
                ),
            };
            file.write_at(&v.to_le_bytes(), at)
                .expect("child: write a word");
        }
        if b % 16 == 0 {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
}

#[test]
fn a_hostile_client_process_stops_only_its_own_ring() {
    // Proves, across two real processes and real /dev/shm files, that a client process writing
    // hostile words (positions and sequences near u64::MAX and MAX_POSITION, forged commit
    // words, torn headers) into its ring while it publishes, at any moment, reaches the
    // engine's side only as typed errors: the consumer of that ring refuses without moving,
    // re-attaches (or is refused by name), and another client's ring served by the same
    // thread keeps delivering every batch in order.
    use std::process::{Command, Stdio};
    use std::time::Instant;
    let dir = TestDir::new("hostile-client");
    let me = IdentityWords {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = |epoch| RegionSpec {
        capacity: 16 * 1024,
        epoch,
        kind: 1,
    };
    let (a_path, b_path) = (dir.join("client-a.in"), dir.join("client-b.in"));
    let a = Region::create(&a_path, spec(1), me).unwrap();
    let b = Region::create(&b_path, spec(2), me).unwrap();
    let (mut b_prod, mut b_cons) = (b.producer().unwrap(), b.consumer().unwrap());
    let mut a_cons = Some(a.consumer().unwrap());
    // The workspace's child guard: SIGKILLed with the test runner, and on drop.
    let mut guard = ChildGuard::spawn(
        Command::new(std::env::current_exe().expect("current test binary"))
            .args([
                "--exact",
                "hostile_client_process",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(HOSTILE_CHILD_ENV, &a_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit()),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut a_batches, mut a_refusals, mut a_attach_refusals) = (0u64, 0u64, 0u64);
    let (mut b_sent, mut b_read) = (0u64, 0u64);
    let mut buf = BatchBuf::default();
    let status = loop {
        assert!(
            Instant::now() < deadline,
            "the hostile client did not finish"
        );
        // The healthy client's ring: one batch out, every batch back in order.
        if b_prod.try_publish(3, 1, 8, &b_sent.to_le_bytes()).is_ok() {
            b_sent += 1;
        }
        while b_cons.poll(&mut buf).expect("the healthy ring never fails") {
            for f in buf.frames() {
                assert_eq!(f.payload, b_read.to_le_bytes(), "healthy ring, in order");
                b_read += 1;
            }
        }
        // The hostile client's ring.
        match a_cons.as_mut() {
            Some(c) => {
                let (pos, seq) = (c.position(), c.next_seq());
                match c.poll(&mut buf) {
                    Ok(true) => a_batches += 1,
                    Ok(false) => {}
                    Err(e) => {
                        assert_eq!((c.position(), c.next_seq()), (pos, seq));
                        assert!(e.to_string().contains("position"), "{e}");
                        a_refusals += 1;
                        // What an engine does with a peer it cannot read: drop it and (here,
                        // to keep testing) attach again.
                        a_cons = None;
                    }
                }
            }
            None => match a.consumer() {
                Ok(c) => a_cons = Some(c),
                Err(e) => {
                    assert!(e.to_string().contains("expected"), "{e}");
                    a_attach_refusals += 1;
                }
            },
        }
        if let Some(status) = guard.try_wait() {
            break status;
        }
        std::thread::yield_now();
    };
    assert!(status.success(), "the hostile client exited with {status}");
    while b_cons.poll(&mut buf).unwrap() {
        b_read += buf.len() as u64;
    }
    assert_eq!(b_read, b_sent, "every batch of the healthy ring arrived");
    assert!(b_sent > 0);
    eprintln!(
        "hostile ring: {a_batches} batches read, {a_refusals} refused, {a_attach_refusals} \
         attaches refused; healthy ring: {b_read} batches"
    );
    assert!(
        a_refusals + a_attach_refusals > 0,
        "the hostile client's words were noticed"
    );
    drop((a, b));
    Region::remove(&a_path).unwrap();
    Region::remove(&b_path).unwrap();
}
