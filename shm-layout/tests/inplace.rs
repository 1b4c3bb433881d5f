//! Claim-in-place writes, in-place validated reads, batched release and the integrity choice
//! (issue 14), on heap rings:
//!
//! - a claim writes exactly the bytes `push` writes (the two rings' memories are equal word
//!   for word, padding and laps included), whatever the integrity;
//! - a batch read in place is the batch `poll` copies (same frames, metas, payloads, positions);
//! - per-batch checksums catch a bit flipped in any checksummed word of any frame of a batch;
//! - a batch without checksum is refused by a consumer that requires integrity (the default,
//!   what client rings keep) and read by one that does not;
//! - release is published once per burst (threshold or idle), never past what was read;
//! - the hot path (claim, commit, read in place) allocates nothing.

use proptest::prelude::*;
use shm_layout::frame::HEADER_BYTES;
use shm_layout::memory::{HeapMemory, WordMemory};
use shm_layout::ring::{
    ring_words, BatchBuf, Consumer, Integrity, Producer, PushError, ReadError, DATA_WORD,
};
use shm_layout::Ordering;
use std::sync::Arc;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

type Mem = Arc<HeapMemory>;

fn ring(capacity: usize) -> (Mem, Producer<Mem>, Consumer<Mem>) {
    let mem = Arc::new(HeapMemory::new(ring_words(capacity)));
    let p = Producer::create(mem.clone(), capacity).unwrap();
    let c = Consumer::attach(mem.clone(), capacity).unwrap();
    (mem, p, c)
}

fn words(mem: &Mem) -> Vec<u64> {
    mem.words()
        .iter()
        .map(|w| w.load(Ordering::Relaxed))
        .collect()
}

fn integrity_strategy() -> impl Strategy<Value = Integrity> {
    prop_oneof![
        Just(Integrity::PerFrame),
        Just(Integrity::PerBatch),
        Just(Integrity::Off)
    ]
}

/// (record type, payload) frames of one batch.
fn batch_strategy() -> impl Strategy<Value = Vec<(u16, Vec<u8>)>> {
    prop::collection::vec(
        (0u16..0xFFFE, prop::collection::vec(any::<u8>(), 0..200)),
        1..6,
    )
}

type Read = Vec<(u64, u16, u16, u16, Vec<u8>)>;

fn copied(buf: &BatchBuf) -> Read {
    buf.frames()
        .map(|f| {
            (
                f.meta.seq,
                f.meta.record_type,
                f.meta.layout_version,
                f.meta.block_length,
                f.payload.to_vec(),
            )
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn a_claim_writes_the_bytes_push_writes(
        batches in prop::collection::vec((batch_strategy(), integrity_strategy()), 1..60),
    ) {
        // Proves claim-in-place is push without the copy: two rings fed the same batches, one
        // by `push`, one by `claim` with the payload written into the ring, hold the same
        // words (headers, checksums, zeroed padding, the zeroed word past each batch) after
        // every batch, across wraps (padding frames) and laps of a 1 KiB ring, in all three
        // integrity modes; and both read back the same frames.
        let cap = 1024;
        let (mem_a, mut pa, mut ca) = ring(cap);
        let (mem_b, mut pb, mut cb) = ring(cap);
        ca.set_require_integrity(false);
        cb.set_require_integrity(false);
        let (mut bufa, mut bufb) = (BatchBuf::default(), BatchBuf::default());
        for (frames, integrity) in &batches {
            pa.set_integrity(*integrity);
            pb.set_integrity(*integrity);
            let mut a = pa.batch();
            let mut b = pb.batch();
            let mut full = false;
            for (rt, payload) in frames {
                let ra = a.push(*rt, 3, payload.len() as u16, payload);
                let rb = b
                    .claim(*rt, 3, payload.len() as u16, payload.len())
                    .map(|mut c| {
                        c.bytes_mut().copy_from_slice(payload);
                        c.commit();
                    });
                prop_assert_eq!(ra, rb);
                if ra.is_err() {
                    full = true;
                    break;
                }
            }
            // A refused frame abandons both batches (dropped uncommitted).
            if !full {
                prop_assert_eq!(a.commit(), b.commit());
            }
            prop_assert_eq!(words(&mem_a), words(&mem_b));
            loop {
                let ga = ca.poll(&mut bufa).unwrap();
                let gb = cb.poll(&mut bufb).unwrap();
                prop_assert_eq!(ga, gb);
                if !ga {
                    break;
                }
                prop_assert_eq!(copied(&bufa), copied(&bufb));
            }
        }
    }

    #[test]
    fn a_batch_read_in_place_is_the_batch_poll_copies(
        batches in prop::collection::vec((batch_strategy(), integrity_strategy()), 1..60),
        reads in prop::collection::vec(0usize..3, 60),
        release_every in prop::sample::select(vec![32usize, 256, 1024, 4096]),
    ) {
        // Proves `read_batch` validates and delivers what `poll` does: two rings fed the same
        // batches, one read by copying, one in place with a random release threshold, give
        // the same frames (sequence, type, version, block length, payload) at the same
        // positions; the in-place consumer never releases past what it read, and a producer
        // that finds its ring full gets room once the consumer has read everything.
        let cap = 4096;
        let (_ma, mut pa, mut ca) = ring(cap);
        let (_mb, mut pb, mut cb) = ring(cap);
        ca.set_require_integrity(false);
        cb.set_require_integrity(false);
        cb.set_release_every(release_every);
        let mut bufa = BatchBuf::default();
        let drain = |ca: &mut Consumer<Mem>, cb: &mut Consumer<Mem>, bufa: &mut BatchBuf, n: usize|
            -> Result<(), TestCaseError> {
            for _ in 0..n {
                let ga = ca.poll(bufa).unwrap();
                let vb = cb.read_batch().unwrap();
                prop_assert_eq!(ga, vb.is_some());
                let Some(v) = vb else { break };
                prop_assert_eq!((bufa.start(), bufa.end()), (v.start(), v.end()));
                let read_b: Read = v
                    .frames()
                    .map(|f| (f.meta.seq, f.meta.record_type, f.meta.layout_version,
                              f.meta.block_length, f.payload.to_vec()))
                    .collect();
                prop_assert_eq!(copied(bufa), read_b);
                prop_assert!(cb.released().0 <= cb.position());
            }
            Ok(())
        };
        for (k, (frames, integrity)) in batches.iter().enumerate() {
            pa.set_integrity(*integrity);
            pb.set_integrity(*integrity);
            for attempt in 0..2 {
                let mut a = pa.batch();
                let mut b = pb.batch();
                let mut ok = true;
                for (rt, payload) in frames {
                    let ra = a.push(*rt, 1, 0, payload);
                    let rb = b.push_with(*rt, 1, 0, payload.len(), |d| d.copy_from_slice(payload));
                    // The in-place consumer may hold back its release: its producer may be
                    // full where the other is not, never the other way round.
                    if ra.is_err() || rb.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    prop_assert_eq!(a.commit().map(|c| c.end), b.commit().map(|c| c.end));
                    break;
                }
                // Both batches are abandoned (not committed).
                prop_assert_eq!(attempt, 0, "room after draining both consumers");
                // Read everything (and once more: the idle read releases).
                drain(&mut ca, &mut cb, &mut bufa, usize::MAX)?;
            }
            drain(&mut ca, &mut cb, &mut bufa, reads[k % reads.len()])?;
        }
        drain(&mut ca, &mut cb, &mut bufa, usize::MAX)?;
        prop_assert_eq!(cb.released().0, cb.position(), "an idle read releases everything");
    }

    #[test]
    fn a_bit_flipped_in_any_frame_of_a_batch_sum_batch_is_caught(
        frames in batch_strategy(),
        pick in any::<prop::sample::Index>(),
        bit in 0u32..64,
    ) {
        // Proves one checksum per batch still covers every frame: a bit flipped in any
        // checksummed word (header words 1-2, the head's word 3, payload area) of any frame of
        // a committed per-batch batch is refused by both reads, never delivered. (Word 3 of a
        // frame inside a batch is not written since layout major 4: the position implies its
        // sequence, which the checksum covers all the same.)
        let (mem, mut p, mut c) = ring(4096);
        p.set_integrity(Integrity::PerBatch);
        let mut b = p.batch();
        for (rt, payload) in &frames {
            b.push(*rt, 1, 0, payload).unwrap();
        }
        let done = b.commit().unwrap();
        // Checksummed words: every word of the batch but the commit words at frame starts and
        // word 3 of the frames after the head.
        let mut starts = vec![];
        let mut at = 0u64;
        while at < done.end {
            starts.push(at);
            let w1 = mem.word(DATA_WORD + (at as usize >> 3) + 1).load(Ordering::Relaxed);
            at += shm_layout::frame::frame_bytes((w1 & 0xFFFF_FFFF) as usize) as u64;
        }
        let candidates: Vec<u64> = (0..done.end / 8)
            .map(|w| w * 8)
            .filter(|p| !starts.contains(p) && (p % 32 != 24 || !starts[1..].contains(&(p - 24))))
            .collect();
        let target = candidates[pick.index(candidates.len())];
        let word = mem.word(DATA_WORD + (target as usize >> 3));
        word.store(word.load(Ordering::Relaxed) ^ (1 << bit), Ordering::Relaxed);
        let copied = c.poll(&mut BatchBuf::default());
        prop_assert!(copied.is_err(), "flipped bit {} of byte {} delivered", bit, target);
        prop_assert_eq!(c.position(), 0);
        prop_assert!(c.read_batch().is_err());
        prop_assert_eq!(c.position(), 0);
    }
}

#[test]
fn an_unchecked_batch_is_refused_unless_the_consumer_accepts_it() {
    // Proves integrity stays on where it is required: a consumer left at its default (a
    // client ring's) refuses a batch written with `Integrity::Off`, naming the batch, and
    // reads it once told to accept unchecked batches (a standby of an engine configured so).
    let (_m, mut p, mut c) = ring(1024);
    p.set_integrity(Integrity::Off);
    p.try_publish(5, 1, 0, b"no checksum").unwrap();
    let e = c.poll(&mut BatchBuf::default()).unwrap_err();
    assert_eq!(e, ReadError::Unchecked { pos: 0, seq: 0 });
    assert!(e.to_string().contains("requires integrity"), "{e}");
    assert!(matches!(c.read_batch(), Err(ReadError::Unchecked { .. })));
    c.set_require_integrity(false);
    let v = c.read_batch().unwrap().unwrap();
    let got: Vec<&[u8]> = v.frames().map(|f| f.payload).collect();
    assert_eq!(got, [&b"no checksum"[..]]);
}

#[test]
fn a_checksum_field_where_the_batch_says_none_is_refused() {
    // Proves a frame cannot smuggle its own checksum past a batch's choice: in a per-batch
    // batch, a continuation frame with a non-zero checksum field is refused, as is a batch
    // flag on a frame that is not the head.
    let (mem, mut p, mut c) = ring(1024);
    p.set_integrity(Integrity::PerBatch);
    let mut b = p.batch();
    b.push(1, 1, 0, &[1; 8]).unwrap();
    b.push(2, 1, 0, &[2; 8]).unwrap();
    b.commit().unwrap();
    let w2 = mem.word(DATA_WORD + 64 / 8 + 2);
    let orig = w2.load(Ordering::Relaxed);
    w2.store(orig | 1 << 40, Ordering::Relaxed);
    assert!(matches!(
        c.poll(&mut BatchBuf::default()),
        Err(ReadError::BadChecksum { pos: 64, .. })
    ));
    w2.store(
        orig | shm_layout::frame::FLAG_NO_SUM as u64,
        Ordering::Relaxed,
    );
    assert!(matches!(
        c.poll(&mut BatchBuf::default()),
        Err(ReadError::BadFlags { pos: 64, .. })
    ));
    w2.store(orig, Ordering::Relaxed);
    assert!(c.poll(&mut BatchBuf::default()).unwrap());
}

#[test]
fn release_is_published_once_per_burst() {
    // Proves the batched release: reading in place publishes the position only when the
    // unreleased bytes reach the threshold or when nothing new is committed, so a burst of
    // batches costs one store to the consumer's line, not one per batch.
    let (_m, mut p, mut c) = ring(4096);
    c.set_release_every(1024);
    for k in 0..20u8 {
        p.try_publish(1, 1, 0, &[k; 32]).unwrap(); // 64 bytes each
    }
    let mut published = vec![];
    for _ in 0..20 {
        assert!(c.read_batch().unwrap().is_some());
        published.push(c.released().0);
    }
    // Released before reading batch 17 (16 read, 1024 bytes), not before.
    assert_eq!(published[15], 0);
    assert_eq!(published[16], 1024);
    assert_eq!(published[19], 1024);
    assert!(c.read_batch().unwrap().is_none());
    assert_eq!(
        c.released().0,
        20 * 64,
        "an idle read releases what was read"
    );
}

#[test]
fn a_dropped_claim_leaves_nothing_behind() {
    // Proves a claim that is never committed (the caller bailed out half way) publishes
    // nothing and leaves the ring as before: the batch commits only its other frames.
    let (_m, mut p, mut c) = ring(1024);
    let mut b = p.batch();
    b.push(1, 1, 0, b"kept").unwrap();
    {
        let mut claim = b.claim(2, 1, 0, 40).unwrap();
        claim.bytes_mut().fill(0xAB);
    }
    b.push(3, 1, 0, b"also kept").unwrap();
    b.commit().unwrap();
    let v = c.read_batch().unwrap().unwrap();
    let got: Vec<(u16, &[u8])> = v
        .frames()
        .map(|f| (f.meta.record_type, f.payload))
        .collect();
    assert_eq!(got, [(1, &b"kept"[..]), (3, &b"also kept"[..])]);
}

#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Debug, PartialEq, Clone, Copy)]
#[repr(C)]
struct Update {
    unit: u64,
    qty: u64,
    price: u64,
}

#[test]
fn a_typed_record_is_written_and_read_in_place() {
    // Proves the typed views: a zerocopy record filled in the ring through `record_mut` reads
    // back through `ref_from_bytes` on the in-place payload, with no copy on either side.
    let (mem, mut p, mut c) = ring(1024);
    c.set_require_integrity(false);
    p.set_integrity(Integrity::Off);
    let mut b = p.batch();
    let mut claim = b.claim(9, 1, 24, 24).unwrap();
    *claim.record_mut::<Update>().unwrap() = Update {
        unit: 7,
        qty: 100,
        price: 12_345,
    };
    claim.commit();
    b.commit().unwrap();
    let v = c.read_batch().unwrap().unwrap();
    let f = v.frames().next().unwrap();
    let u = Update::ref_from_bytes(f.payload).unwrap();
    assert_eq!(
        *u,
        Update {
            unit: 7,
            qty: 100,
            price: 12_345
        }
    );
    // The payload is the ring's own bytes: right after the frame's header at position 0.
    let ring_start = mem.words()[DATA_WORD..].as_ptr() as usize;
    assert_eq!(
        f.payload.as_ptr() as usize,
        ring_start + HEADER_BYTES,
        "in the ring"
    );
}

#[test]
fn a_claim_too_large_or_reserved_is_refused_like_push() {
    // Proves claim's refusals are push's: the reserved padding type and a frame larger than
    // any batch, each with the same error.
    let (_m, mut p, _c) = ring(1024);
    let mut b = p.batch();
    assert_eq!(
        b.claim(0xFFFF, 1, 0, 8).err(),
        Some(PushError::ReservedType)
    );
    let big = b.claim(1, 1, 0, 2000).err();
    assert_eq!(big, b.push(1, 1, 0, &[0; 2000]).err());
    assert!(matches!(big, Some(PushError::TooLarge { .. })));
}
