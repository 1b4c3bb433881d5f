//! Property tests of the ring and the record templates on a heap buffer: random batches come
//! out identical and in order across many laps of a small ring; versioned records cross between
//! an old and a new build in both directions; random garbage never panics a decoder; a bit
//! flipped anywhere in a committed frame is reported, never delivered; and a frame forged with
//! a matching checksum but a wrong structure is refused by the check it fails.

mod common;

use proptest::prelude::*;
use proptest::sample::Index;
use shm_layout::frame::{
    checksum, commit_word, frame_bytes, COMMIT_CONT, FLAG_PAD, FRAME_ALIGN, HEADER_BYTES,
    PAD_RECORD_TYPE,
};
use shm_layout::memory::{HeapMemory, WordMemory};
use shm_layout::record::{
    decode, encode, encoded, fingerprint, fingerprint_at, RecordError, TemplateInfo,
};
use shm_layout::ring::{
    max_batch_bytes, ring_words, BatchBuf, Committed, Consumer, Producer, PushError, ReadError,
    DATA_WORD,
};
use shm_layout::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// The ring: random batches round trip
// ---------------------------------------------------------------------------------------------

/// One frame as the test wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    record_type: u16,
    layout_version: u16,
    block_length: u16,
    payload: Vec<u8>,
}

fn frame_strategy(max_payload: usize) -> impl Strategy<Value = Sent> {
    (
        0u16..=0xFFFE,
        any::<u16>(),
        any::<u16>(),
        prop::collection::vec(any::<u8>(), 0..max_payload),
    )
        .prop_map(
            |(record_type, layout_version, block_length, payload)| Sent {
                record_type,
                layout_version,
                block_length,
                payload,
            },
        )
}

fn batch_strategy(max_payload: usize) -> impl Strategy<Value = Vec<Sent>> {
    prop::collection::vec(frame_strategy(max_payload), 1..8)
}

fn capacity_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1024usize), Just(2048), Just(4096), Just(8192)]
}

#[derive(Debug, Default)]
struct Stats {
    /// Pushes refused with `Full` (the writer then drained one batch and retried).
    fulls: usize,
    /// Batches refused as too large for the ring (then sent in two halves).
    too_large: usize,
    /// Batches committed.
    committed: usize,
    /// Frames delivered to the reader.
    frames_read: usize,
    /// Bytes the consumer advanced over (positions never wrap).
    bytes: u64,
}

/// A producer and a consumer over one heap ring, and the batches committed but not yet read.
struct Harness {
    mem: Arc<HeapMemory>,
    capacity: usize,
    producer: Producer<Arc<HeapMemory>>,
    consumer: Consumer<Arc<HeapMemory>>,
    buf: BatchBuf,
    expected: VecDeque<(Committed, Vec<Sent>)>,
    stats: Stats,
}

impl Harness {
    fn new(capacity: usize) -> Harness {
        let mem = Arc::new(HeapMemory::new(ring_words(capacity)));
        Harness {
            producer: Producer::create(mem.clone(), capacity).unwrap(),
            consumer: Consumer::attach(mem.clone(), capacity).unwrap(),
            mem,
            capacity,
            buf: BatchBuf::default(),
            expected: VecDeque::new(),
            stats: Stats::default(),
        }
    }

    /// Send `frames` as one batch; on `Full` the reader takes one batch and the push is
    /// retried; a batch too large for the ring is abandoned and sent as two halves.
    fn send(&mut self, frames: &[Sent]) -> Result<(), TestCaseError> {
        let mut batch = self.producer.batch();
        let mut i = 0;
        while i < frames.len() {
            let f = &frames[i];
            match batch.push(f.record_type, f.layout_version, f.block_length, &f.payload) {
                Ok(()) => i += 1,
                Err(PushError::Full {
                    needed_bytes,
                    free_bytes,
                }) => {
                    self.stats.fulls += 1;
                    prop_assert!(
                        needed_bytes > free_bytes,
                        "Full but {needed_bytes} <= {free_bytes}"
                    );
                    // The ring is full, so something committed is unread.
                    let got = read_one(
                        &mut self.consumer,
                        &mut self.buf,
                        &mut self.expected,
                        &mut self.stats,
                    )?;
                    prop_assert!(got, "ring reported Full with nothing to read");
                }
                Err(PushError::TooLarge {
                    needed_bytes,
                    max_bytes,
                }) => {
                    prop_assert_eq!(max_bytes, max_batch_bytes(self.capacity));
                    prop_assert!(
                        needed_bytes > max_bytes + FRAME_ALIGN,
                        "TooLarge but needs only {} of {}",
                        needed_bytes,
                        max_bytes
                    );
                    prop_assert!(
                        frames.len() > 1,
                        "a single frame of {} bytes is TooLarge",
                        f.payload.len()
                    );
                    // The batch is abandoned (never committed): the ring must be as before.
                    self.stats.too_large += 1;
                    let (a, b) = frames.split_at(frames.len() / 2);
                    self.send(a)?;
                    return self.send(b);
                }
                Err(e) => return Err(TestCaseError::fail(format!("push: {e}"))),
            }
        }
        let committed = batch.commit().expect("a non-empty batch commits");
        prop_assert!(committed.frames as usize >= frames.len());
        prop_assert!(
            committed.frames as usize <= frames.len() + 1,
            "at most one padding frame"
        );
        self.stats.committed += 1;
        self.expected.push_back((committed, frames.to_vec()));
        Ok(())
    }

    fn read_one(&mut self) -> Result<bool, TestCaseError> {
        read_one(
            &mut self.consumer,
            &mut self.buf,
            &mut self.expected,
            &mut self.stats,
        )
    }

    /// Read everything committed and check the ring is then empty.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        while self.read_one()? {}
        prop_assert!(
            self.expected.is_empty(),
            "{} committed batches never arrived",
            self.expected.len()
        );
        prop_assert_eq!(self.consumer.position(), self.producer.position());
        prop_assert_eq!(self.consumer.next_seq(), self.producer.next_seq());
        self.stats.bytes = self.consumer.position();
        Ok(())
    }
}

/// Poll once; a batch that arrives must be the oldest committed one, frame for frame.
fn read_one(
    consumer: &mut Consumer<Arc<HeapMemory>>,
    buf: &mut BatchBuf,
    expected: &mut VecDeque<(Committed, Vec<Sent>)>,
    stats: &mut Stats,
) -> Result<bool, TestCaseError> {
    let before = consumer.next_seq();
    let got = consumer
        .poll(buf)
        .map_err(|e| TestCaseError::fail(format!("poll of a healthy ring failed: {e}")))?;
    if !got {
        prop_assert!(expected.is_empty(), "a committed batch is not visible");
        return Ok(false);
    }
    let Some((committed, frames)) = expected.pop_front() else {
        return Err(TestCaseError::fail("read a batch that was never committed"));
    };
    prop_assert_eq!(before, committed.first_seq);
    prop_assert_eq!(buf.start(), committed.start);
    prop_assert_eq!(buf.end(), committed.end);
    prop_assert_eq!(consumer.position(), committed.end);
    prop_assert_eq!(
        consumer.next_seq(),
        committed.first_seq + committed.frames as u64
    );
    prop_assert_eq!(buf.len(), frames.len());
    let mut last_seq = None;
    for (got, sent) in buf.frames().zip(&frames) {
        prop_assert_eq!(got.meta.record_type, sent.record_type);
        prop_assert_eq!(got.meta.layout_version, sent.layout_version);
        prop_assert_eq!(got.meta.block_length, sent.block_length);
        prop_assert_eq!(got.meta.flags & FLAG_PAD, 0);
        prop_assert_eq!(got.payload, &sent.payload[..]);
        prop_assert!(got.meta.seq >= committed.first_seq);
        if let Some(l) = last_seq {
            prop_assert!(got.meta.seq > l, "sequence went backwards");
        }
        last_seq = Some(got.meta.seq);
        stats.frames_read += 1;
    }
    Ok(true)
}

/// Write `batches`, reading `reads[i]` batches after the i-th (0 lets the ring fill up), then
/// drain, checking every batch as it arrives.
fn run_ring(capacity: usize, batches: &[Vec<Sent>], reads: &[u8]) -> Result<Stats, TestCaseError> {
    let mut h = Harness::new(capacity);
    for (i, batch) in batches.iter().enumerate() {
        h.send(batch)?;
        for _ in 0..reads[i % reads.len()] {
            if !h.read_one()? {
                break;
            }
        }
    }
    h.drain()?;
    let sent: usize = batches.iter().map(Vec::len).sum();
    prop_assert_eq!(h.stats.frames_read, sent, "frames lost or duplicated");
    Ok(h.stats)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_batches_round_trip_in_order(
        capacity in capacity_strategy(),
        batches in prop::collection::vec(batch_strategy(300), 1..120),
        reads in prop::collection::vec(0u8..4, 1..32),
    ) {
        // Proves any sequence of batches is read back identical, whole and in order, whatever
        // the reader's pace (Full and the retry included) and wherever the ring wraps.
        run_ring(capacity, &batches, &reads)?;
    }
}

#[test]
fn round_trip_harness_really_fills_and_wraps_a_small_ring() {
    // Proves the round-trip harness exercises what it claims: on a 1 KiB ring with a slow
    // reader it meets Full and TooLarge and wraps many times, and still loses nothing.
    let mut rng = common::Rng::new(0x5eed);
    let batches: Vec<Vec<Sent>> = (0..400)
        .map(|_| {
            (0..rng.range(1, 8))
                .map(|_| Sent {
                    record_type: rng.range(0, 0xFFFF) as u16,
                    layout_version: rng.next_u64() as u16,
                    block_length: rng.next_u64() as u16,
                    payload: (0..rng.range(0, 300))
                        .map(|_| rng.next_u64() as u8)
                        .collect(),
                })
                .collect()
        })
        .collect();
    let stats = run_ring(1024, &batches, &[0, 0, 1, 0, 2]).unwrap();
    assert!(stats.fulls > 10, "{stats:?}");
    assert!(stats.too_large > 10, "{stats:?}");
    assert!(
        stats.bytes > 100 * 1024,
        "only {} laps: {stats:?}",
        stats.bytes / 1024
    );
}

// ---------------------------------------------------------------------------------------------
// Records: an old and a new build of the same template
// ---------------------------------------------------------------------------------------------

/// Two builds of one record template: the old build knows version 1 only.
mod v1 {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(C)]
    pub struct Order {
        pub id: u64,
        pub qty: u32,
        pub side: u32,
    }

    impl shm_layout::record::Record for Order {
        const TYPE_ID: u16 = 21;
        const NAME: &'static str = "order";
        const VERSIONS: &'static [(u16, u16)] = &[(1, 16)];
        fn defaults() -> Self {
            Order {
                id: 0,
                qty: 0,
                side: 0,
            }
        }
    }
    shm_layout::assert_record_layout!(Order);
}

/// The new build appends `expiry_ns`, which defaults to "never" for a v1 writer.
mod v2 {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
    #[repr(C)]
    pub struct Order {
        pub id: u64,
        pub qty: u32,
        pub side: u32,
        pub expiry_ns: u64,
    }

    pub const NEVER: u64 = u64::MAX;

    impl shm_layout::record::Record for Order {
        const TYPE_ID: u16 = 21;
        const NAME: &'static str = "order";
        const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
        fn defaults() -> Self {
            Order {
                id: 0,
                qty: 0,
                side: 0,
                expiry_ns: NEVER,
            }
        }
    }
    shm_layout::assert_record_layout!(Order);
}

/// Send one encoded record through a real ring and decode it as the reader's template, the
/// way a peer does: block length from the frame header.
fn through_ring<R: shm_layout::record::Record>(
    type_id: u16,
    version: u16,
    bytes: &[u8],
) -> Result<R, RecordError> {
    let cap = 1024;
    let mem = Arc::new(HeapMemory::new(ring_words(cap)));
    let mut p = Producer::create(mem.clone(), cap).unwrap();
    let mut c = Consumer::attach(mem, cap).unwrap();
    p.try_publish(type_id, version, bytes.len() as u16, bytes)
        .unwrap();
    let mut buf = BatchBuf::default();
    assert!(c.poll(&mut buf).unwrap());
    let f = buf.frames().next().unwrap();
    assert_eq!(f.meta.record_type, type_id);
    assert_eq!(f.meta.layout_version, version);
    decode::<R>(f.payload, f.meta.block_length)
}

fn order_v1() -> impl Strategy<Value = v1::Order> {
    (any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(id, qty, side)| v1::Order {
        id,
        qty,
        side,
    })
}

fn order_v2() -> impl Strategy<Value = v2::Order> {
    (any::<u64>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(
        |(id, qty, side, expiry_ns)| v2::Order {
            id,
            qty,
            side,
            expiry_ns,
        },
    )
}

proptest! {
    #[test]
    fn v1_writer_to_v2_reader_fills_defaults(o in order_v1()) {
        // Proves a new reader given an old writer's record gets every field sent and the
        // default (not zero) for the field the old writer did not know.
        let mut out = [0u8; 64];
        let bytes = encode(&o, 1, &mut out).unwrap();
        prop_assert_eq!(bytes.len(), 16);
        let back: v2::Order = through_ring::<v2::Order>(21, 1, bytes).unwrap();
        prop_assert_eq!(back, v2::Order { id: o.id, qty: o.qty, side: o.side, expiry_ns: v2::NEVER });
    }

    #[test]
    fn v2_writer_in_v1_mode_to_v1_reader(o in order_v2()) {
        // Proves a new writer told to speak version 1 sends exactly the v1 prefix, which an
        // old reader takes whole and a new reader completes with the default.
        let mut out = [0u8; 64];
        let bytes = encode(&o, 1, &mut out).unwrap().to_vec();
        prop_assert_eq!(bytes.len(), 16);
        prop_assert_eq!(&bytes[..], encoded(&o, 1).unwrap());
        let old: v1::Order = through_ring::<v1::Order>(21, 1, &bytes).unwrap();
        prop_assert_eq!(old, v1::Order { id: o.id, qty: o.qty, side: o.side });
        let new: v2::Order = decode(&bytes, 16).unwrap();
        prop_assert_eq!(new, v2::Order { expiry_ns: v2::NEVER, ..o });
    }

    #[test]
    fn v2_writer_to_v1_reader_skips_the_tail(o in order_v2()) {
        // Proves an old reader given a newer, longer block takes its own fields and skips the
        // trailing bytes it does not know.
        let mut out = [0u8; 64];
        let bytes = encode(&o, 2, &mut out).unwrap().to_vec();
        prop_assert_eq!(bytes.len(), 24);
        let old: v1::Order = through_ring::<v1::Order>(21, 2, &bytes).unwrap();
        prop_assert_eq!(old, v1::Order { id: o.id, qty: o.qty, side: o.side });
        let same: v2::Order = decode(&bytes, 24).unwrap();
        prop_assert_eq!(same, o);
    }

    #[test]
    fn decode_of_garbage_never_panics(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        block_length in prop_oneof![0u16..64, any::<u16>()],
    ) {
        // Proves decoding any bytes with any announced block length returns a value exactly
        // when the block is present and long enough, an error naming why otherwise, and never
        // panics; a returned value holds exactly the bytes of the block it covers.
        let bl = block_length as usize;
        let r1 = decode::<v1::Order>(&bytes, block_length);
        let r2 = decode::<v2::Order>(&bytes, block_length);
        if bl > bytes.len() {
            prop_assert!(matches!(r1, Err(RecordError::Truncated { .. })), "{:?}", r1);
            prop_assert!(matches!(r2, Err(RecordError::Truncated { .. })), "{:?}", r2);
        } else if bl < 16 {
            prop_assert!(matches!(r1, Err(RecordError::TooShort { expected: 16, .. })), "{:?}", r1);
            prop_assert!(matches!(r2, Err(RecordError::TooShort { expected: 16, .. })), "{:?}", r2);
        } else {
            let o1 = r1.unwrap();
            prop_assert_eq!(zerocopy::IntoBytes::as_bytes(&o1), &bytes[..16]);
            let o2 = r2.unwrap();
            let n = bl.min(24);
            prop_assert_eq!(&zerocopy::IntoBytes::as_bytes(&o2)[..n], &bytes[..n]);
            // Past the block, the defaults.
            let d = <v2::Order as shm_layout::record::Record>::defaults();
            prop_assert_eq!(
                &zerocopy::IntoBytes::as_bytes(&o2)[n..],
                &zerocopy::IntoBytes::as_bytes(&d)[n..]
            );
            return Ok(());
        }
        let e = r2.unwrap_err();
        prop_assert!(e.to_string().contains("record `order`"), "{}", e);
    }
}

#[test]
fn encode_refuses_unknown_versions_and_small_buffers() {
    // Proves encode names the unknown version and the versions it knows, and refuses a buffer
    // shorter than the block instead of writing part of it.
    let o = v2::Order {
        id: 1,
        qty: 2,
        side: 3,
        expiry_ns: 4,
    };
    let mut out = [0u8; 64];
    let err = encode(&o, 3, &mut out).unwrap_err();
    assert_eq!(
        err,
        RecordError::UnknownVersion {
            record: "order",
            found: 3,
            known: vec![1, 2]
        }
    );
    assert!(err.to_string().contains("[1, 2]") && err.to_string().contains("found 3"));
    let mut small = [0u8; 20];
    assert_eq!(
        encode(&o, 2, &mut small).unwrap_err(),
        RecordError::BufferTooSmall {
            expected: 24,
            found: 20
        }
    );
    assert_eq!(small, [0u8; 20], "nothing written on error");
    assert!(encoded(&o, 0).is_err());
}

#[test]
fn old_and_new_builds_agree_on_the_common_fingerprint() {
    // Proves the v1 and v2 builds of a template agree on their common prefix fingerprint (what
    // peers compare at attach), while the full fingerprints and v2's own level tell them apart.
    assert_eq!(
        fingerprint_at::<v1::Order>(1),
        fingerprint_at::<v2::Order>(1)
    );
    assert_ne!(
        fingerprint_at::<v2::Order>(1),
        fingerprint_at::<v2::Order>(2)
    );
    assert_ne!(fingerprint::<v1::Order>(), fingerprint::<v2::Order>());
    let (a, b) = (
        TemplateInfo::of::<v1::Order>(),
        TemplateInfo::of::<v2::Order>(),
    );
    assert_eq!(a.base_fingerprint, b.base_fingerprint);
    assert_eq!((a.type_id, a.min_version, a.max_version), (21, 1, 1));
    assert_eq!((b.type_id, b.min_version, b.max_version), (21, 1, 2));

    // The same layout under another type id is another template.
    #[derive(
        zerocopy::FromBytes,
        zerocopy::IntoBytes,
        zerocopy::Immutable,
        zerocopy::KnownLayout,
        Clone,
        Copy,
    )]
    #[repr(C)]
    struct Other {
        id: u64,
        qty: u32,
        side: u32,
    }
    impl shm_layout::record::Record for Other {
        const TYPE_ID: u16 = 22;
        const NAME: &'static str = "order";
        const VERSIONS: &'static [(u16, u16)] = &[(1, 16)];
        fn defaults() -> Self {
            Other {
                id: 0,
                qty: 0,
                side: 0,
            }
        }
    }
    shm_layout::assert_record_layout!(Other);
    assert_ne!(fingerprint_at::<Other>(1), fingerprint_at::<v1::Order>(1));
}

// ---------------------------------------------------------------------------------------------
// Corrupted frames
// ---------------------------------------------------------------------------------------------

/// The byte positions (ring positions, not wrapped) of every word in the batch that carries
/// meaning: the batch head's four header words, the three of every other frame (word 3 of a
/// frame inside a batch is not written since layout major 4: its sequence is implied by its
/// position) and, for a real frame, its whole payload area (the payload words and the zero
/// words that pad it to the next frame, which are checksummed too).
fn meaningful_words(mem: &HeapMemory, capacity: usize, c: &Committed) -> Vec<u64> {
    let mask = capacity as u64 - 1;
    let word = |pos: u64| mem.word(DATA_WORD + ((pos & mask) / 8) as usize);
    let mut out = Vec::new();
    let mut at = c.start;
    while at < c.end {
        let w1 = word(at + 8).load(Ordering::Relaxed);
        let w2 = word(at + 16).load(Ordering::Relaxed);
        let payload_len = (w1 & 0xFFFF_FFFF) as usize;
        let pad = w2 as u16 & FLAG_PAD != 0;
        let header_words = if at == c.start { 4 } else { 3 };
        out.extend((0..header_words).map(|k| at + 8 * k));
        if !pad {
            let area_words = (frame_bytes(payload_len) - HEADER_BYTES) as u64 / 8;
            out.extend((0..area_words).map(|k| at + HEADER_BYTES as u64 + 8 * k));
        }
        at += frame_bytes(payload_len) as u64;
    }
    assert_eq!(at, c.end, "frames tile the batch");
    out
}

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

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_flipped_bit_is_reported_never_delivered(
        capacity in prop_oneof![Just(4096usize), Just(8192)],
        before in prop::collection::vec(batch_strategy(300), 0..40),
        target in prop::collection::vec(frame_strategy(300), 1..5),
        which_word in any::<Index>(),
        bit in 0u32..64,
    ) {
        // Proves a single bit flipped in any header or payload word of a committed batch makes
        // `poll` fail with an error pointing into that batch, without panicking, without
        // delivering the batch and without moving the consumer; flipping it back delivers the
        // batch intact (the failed poll changed nothing).
        let mut h = Harness::new(capacity);
        for b in &before {
            h.send(b)?;
            h.drain()?;
        }
        h.send(&target)?;
        let (committed, _) = h.expected.back().cloned().unwrap();
        let words = meaningful_words(&h.mem, capacity, &committed);
        let victim = words[which_word.index(words.len())];
        let mask = capacity as u64 - 1;
        let w = h.mem.word(DATA_WORD + ((victim & mask) / 8) as usize);
        w.fetch_xor(1 << bit, Ordering::Relaxed);

        let (pos, seq, released) = (h.consumer.position(), h.consumer.next_seq(), h.consumer.released());
        let r = h.consumer.poll(&mut h.buf);
        match &r {
            Err(e) => {
                let at = read_error_pos(e);
                prop_assert!(
                    (committed.start..=committed.end).contains(&at),
                    "error at {} outside the batch {}..{}: {}", at, committed.start, committed.end, e
                );
                prop_assert!(e.to_string().contains(&format!("position {at}")), "{}", e);
            }
            Ok(got) => {
                return Err(TestCaseError::fail(format!(
                    "flipped bit {bit} of the word at {victim} (batch {}..{}), poll returned Ok({got})",
                    committed.start, committed.end
                )));
            }
        }
        prop_assert_eq!(h.consumer.position(), pos);
        prop_assert_eq!(h.consumer.next_seq(), seq);
        prop_assert_eq!(h.consumer.released(), released);
        // The same error again: polling a corrupt batch is repeatable, not a one-off.
        prop_assert_eq!(h.consumer.poll(&mut h.buf), r);

        w.fetch_xor(1 << bit, Ordering::Relaxed);
        h.drain()?;
    }
}

#[test]
fn padding_frame_fills_the_end_of_the_buffer() {
    // Proves a batch may end exactly at the end of the buffer, the next frame then wraps behind
    // one padding frame, and the word walk used above sees both frames of that batch.
    let cap = 1024;
    let mut h = Harness::new(cap);
    // 992 - 32 = 960 bytes of frames: 30 frames of 32 bytes, one batch of 3 x 320.
    let f = Sent {
        record_type: 1,
        layout_version: 1,
        block_length: 0,
        payload: vec![9; 320 - HEADER_BYTES],
    };
    h.send(&[f.clone(), f.clone(), f.clone()]).unwrap();
    h.drain().unwrap();
    h.send(std::slice::from_ref(&f)).unwrap(); // 960..1344: 64 bytes of padding, then the frame at 1024
    let (c, _) = h.expected.back().cloned().unwrap();
    assert_eq!(c.frames, 2, "padding + frame");
    assert_eq!(meaningful_words(&h.mem, cap, &c).len(), 4 + 3 + 36);
    h.drain().unwrap();
}

#[test]
fn every_single_bit_flip_in_a_small_batch_is_reported() {
    // Proves, exhaustively for small batches (one of them wrapping behind a padding frame),
    // that each of the 64 bits of every header and payload-area word (commit words and the
    // zero padding of a short payload included) is guarded: flipped, `poll` fails and leaves
    // the consumer where it was. This covers the rare flips a random search misses, such as a
    // batch length cut short at a frame boundary.
    let cap = 1024;
    let mut h = Harness::new(cap);
    let f = |n: usize| Sent {
        record_type: 3,
        layout_version: 2,
        block_length: n as u16,
        payload: (0..n as u8).collect(),
    };
    let shapes: [Vec<Sent>; 3] = [
        vec![f(0), f(0), f(0)],
        vec![f(8), f(40), f(0), f(1)],
        vec![f(200), f(200), f(200)],
    ];
    let mut checked = 0;
    for round in 0..6 {
        let shape = &shapes[round % shapes.len()];
        h.send(shape).unwrap();
        let (committed, _) = h.expected.back().cloned().unwrap();
        let mask = cap as u64 - 1;
        for victim in meaningful_words(&h.mem, cap, &committed) {
            let w = h.mem.word(DATA_WORD + ((victim & mask) / 8) as usize);
            for bit in 0..64 {
                w.fetch_xor(1 << bit, Ordering::Relaxed);
                let pos = h.consumer.position();
                let r = h.consumer.poll(&mut h.buf);
                assert!(
                    r.is_err(),
                    "round {round}: bit {bit} of the word at {victim} (batch {}..{}) flipped, \
                     poll returned {r:?}",
                    committed.start,
                    committed.end
                );
                assert_eq!(h.consumer.position(), pos);
                w.fetch_xor(1 << bit, Ordering::Relaxed);
                checked += 1;
            }
        }
        h.drain().unwrap();
    }
    assert!(h.stats.bytes > cap as u64, "the batches wrapped the ring");
    assert!(checked > 1000, "{checked}");
}

// ---------------------------------------------------------------------------------------------
// Forged frames: right checksum, wrong structure
// ---------------------------------------------------------------------------------------------

/// Raw access to a heap ring's data words, as a peer that writes the shared memory itself.
struct Raw<'a> {
    mem: &'a HeapMemory,
    mask: u64,
}

impl Raw<'_> {
    fn word(&self, pos: u64) -> &shm_layout::AtomicU64 {
        self.mem.word(DATA_WORD + ((pos & self.mask) / 8) as usize)
    }
    fn get(&self, pos: u64) -> u64 {
        self.word(pos).load(Ordering::Relaxed)
    }
    fn set(&self, pos: u64, v: u64) {
        self.word(pos).store(v, Ordering::Relaxed);
    }
    /// Store the checksum the frame at `pos` with sequence `seq` has with its words as they
    /// are now, as a peer forging the frame would: the consumer's structural checks, not the
    /// checksum, must then catch what is wrong with it.
    fn reseal(&self, pos: u64, seq: u64) {
        let (w1, w2) = (self.get(pos + 8), self.get(pos + 16));
        let area: Vec<u64> = if w2 as u16 & FLAG_PAD != 0 {
            Vec::new()
        } else {
            let n = (frame_bytes((w1 & 0xFFFF_FFFF) as usize) - HEADER_BYTES) / 8;
            (0..n as u64)
                .map(|k| self.get(pos + HEADER_BYTES as u64 + 8 * k))
                .collect()
        };
        let sum = checksum(w1, w2 & 0xFFFF_FFFF, seq, &area);
        self.set(pos + 16, (w2 & 0xFFFF_FFFF) | (sum as u64) << 32);
    }
}

/// A 1 KiB ring holding one committed, unread batch of three frames (payloads of 40, 8 and
/// 100 bytes: frames of 96, 64 and 160 bytes at 0, 96 and 160).
fn forged_batch() -> Harness {
    let mut h = Harness::new(1024);
    let f = |n: usize| Sent {
        record_type: 5,
        layout_version: 1,
        block_length: n as u16,
        payload: (0..n).map(|i| i as u8 ^ 0x5a).collect(),
    };
    h.send(&[f(40), f(8), f(100)]).unwrap();
    h
}

/// Forge the batch with `forge`, poll, and return the error (the consumer must not move).
fn poll_forged(forge: impl FnOnce(&Raw)) -> ReadError {
    let mut h = forged_batch();
    forge(&Raw {
        mem: &h.mem,
        mask: 1023,
    });
    let r = h.consumer.poll(&mut h.buf);
    assert_eq!(h.consumer.position(), 0, "a refused batch moves nothing");
    r.expect_err("a forged batch is refused")
}

#[test]
fn forged_frames_with_right_checksums_are_refused_by_name() {
    // Proves every structural check stands on its own: a peer that writes a frame with a
    // checksum matching its (wrong) words is still refused, with the check that failed named
    // and the frame's position given, whether the frame takes the fast path or the slow one.
    // A batch head that stores another sequence than the one expected at its position, its
    // checksum sealed for either.
    for sealed in [0, 2] {
        let e = poll_forged(|r| {
            r.set(24, 2);
            r.reseal(0, sealed);
        });
        assert_eq!(
            e,
            ReadError::BadSequence {
                pos: 0,
                expected: 0,
                found: 2
            }
        );
    }
    // A frame inside the batch stamped with another sequence (since layout major 4 its
    // sequence is implied by its position; the stamp carries its low 32 bits), resealed for
    // the sequence it claims.
    let e = poll_forged(|r| {
        r.set(96, commit_word(2, 64, true));
        r.reseal(96, 2);
    });
    assert!(
        matches!(e, ReadError::BadCommit { pos: 96, why, .. } if why.contains("continuation")),
        "{e:?}"
    );

    let e = poll_forged(|r| {
        r.set(160 + 8, (r.get(160 + 8) & !0xFFFF_FFFF) | 200);
        r.reseal(160, 2);
    });
    assert!(
        matches!(
            e,
            ReadError::BadLength {
                pos: 160,
                field: "payload length",
                found: 200,
                ..
            }
        ),
        "{e:?}"
    );

    let e = poll_forged(|r| {
        r.set(96 + 8, (r.get(96 + 8) & !0xFFFF_FFFF) | 40);
        r.reseal(96, 1);
    });
    assert!(
        matches!(e, ReadError::BadCommit { pos: 96, why, .. } if why.contains("length")),
        "{e:?}"
    );

    let e = poll_forged(|r| r.set(96, r.get(96) & !COMMIT_CONT));
    assert!(
        matches!(e, ReadError::BadCommit { pos: 96, why, .. } if why.contains("continuation")),
        "{e:?}"
    );

    // A record frame flagged as padding (a padding frame must run to the buffer's end), and a
    // record frame of the padding type without the flag.
    let e = poll_forged(|r| {
        r.set(96 + 16, r.get(96 + 16) | FLAG_PAD as u64);
        r.reseal(96, 1);
    });
    assert!(
        matches!(
            e,
            ReadError::BadLength {
                pos: 96,
                field: "payload length",
                ..
            }
        ),
        "{e:?}"
    );
    let e = poll_forged(|r| {
        r.set(96 + 8, r.get(96 + 8) | (PAD_RECORD_TYPE as u64) << 32);
        r.reseal(96, 1);
    });
    assert!(
        matches!(
            e,
            ReadError::BadLength {
                pos: 96,
                field: "padding flag",
                ..
            }
        ),
        "{e:?}"
    );

    // A checksum that does not match is named as such (no forging).
    let e = poll_forged(|r| r.set(160 + 40, r.get(160 + 40) ^ 1));
    assert!(
        matches!(
            e,
            ReadError::BadChecksum {
                pos: 160,
                seq: 2,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn word_3_of_a_frame_inside_a_batch_is_not_read() {
    // Proves the layout-major-4 rule both ways: a frame inside a batch has no sequence word
    // (its sequence is implied by its position), so whatever its word 3 holds — a previous
    // lap's bytes, anything — the batch is delivered with the implied sequences; while the
    // batch head's word 3 (the batch's first sequence, for recovery) is checked.
    for junk in [0, 1, 2, u64::MAX, 0x5a5a_5a5a_5a5a_5a5a] {
        let mut h = forged_batch();
        let raw = Raw {
            mem: &h.mem,
            mask: 1023,
        };
        raw.set(96 + 24, junk);
        raw.set(160 + 24, junk);
        assert!(h.consumer.poll(&mut h.buf).expect("delivered"));
        let seqs: Vec<u64> = h.buf.frames().map(|f| f.meta.seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }
    let mut h = forged_batch();
    let raw = Raw {
        mem: &h.mem,
        mask: 1023,
    };
    raw.set(24, 1);
    assert!(matches!(
        h.consumer.poll(&mut h.buf),
        Err(ReadError::BadSequence {
            pos: 0,
            expected: 0,
            found: 1
        })
    ));
}

#[test]
fn a_forged_padding_frame_must_reach_the_end_of_the_buffer() {
    // Proves the padding frame's own checks (its slow path): a padding frame that stops short
    // of the buffer's end, or runs past it, is refused even with a matching checksum.
    let mut h = Harness::new(1024);
    let f = Sent {
        record_type: 1,
        layout_version: 1,
        block_length: 0,
        payload: vec![7; 864],
    };
    h.send(std::slice::from_ref(&f)).unwrap(); // 0..896
    h.drain().unwrap();
    let small = Sent {
        payload: vec![3; 128],
        ..f
    };
    h.send(std::slice::from_ref(&small)).unwrap(); // padding 896..1024, the frame at 1024
    let mem = h.mem.clone();
    let raw = Raw {
        mem: &mem,
        mask: 1023,
    };
    let (c, _) = h.expected.back().cloned().unwrap();
    assert_eq!((c.start, c.frames), (896, 2), "padding, then the frame");
    for pad_len in [64u64, 128] {
        let w1 = raw.get(896 + 8);
        raw.set(896 + 8, (w1 & !0xFFFF_FFFF) | pad_len);
        raw.reseal(896, c.first_seq);
        let e = h
            .consumer
            .poll(&mut h.buf)
            .expect_err("a short or long padding frame");
        assert!(
            matches!(
                e,
                ReadError::BadLength {
                    pos: 896,
                    field: "payload length",
                    ..
                }
            ),
            "padding payload {pad_len}: {e:?}"
        );
        raw.set(896 + 8, w1);
        raw.reseal(896, c.first_seq);
    }
    h.drain().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn garbage_in_a_committed_batch_is_reported_never_delivered(
        garbage in prop::collection::vec(any::<u64>(), 40),
        keep_commit in any::<bool>(),
    ) {
        // Proves a batch whose words a corrupt peer overwrote with garbage (its commit word
        // kept or garbled too) is refused without a panic and without moving the consumer.
        let mut h = forged_batch();
        let raw = Raw { mem: &h.mem, mask: 1023 };
        for (k, g) in garbage.iter().enumerate() {
            if k == 0 && (keep_commit || *g == 0) {
                continue;
            }
            raw.set(8 * k as u64, *g);
        }
        let r = h.consumer.poll(&mut h.buf);
        prop_assert!(r.is_err(), "garbage delivered: {:?}", r);
        prop_assert_eq!(h.consumer.position(), 0);
    }
}

#[test]
fn short_payloads_are_padded_with_zeros_in_the_ring() {
    // Proves the bytes between a payload's end and its frame's end are written as zeros (they
    // are checksummed, and no stale bytes of an earlier lap stay beside a payload): every
    // payload length from 0 to 100 round trips over a ring first filled with 0xFF words.
    let cap = 4096;
    let mut h = Harness::new(cap);
    for w in h.mem.words() {
        w.store(u64::MAX, Ordering::Relaxed);
    }
    // The fresh ring's words were all 0xFF: zero the first commit word, as a fresh file is.
    h.mem.word(DATA_WORD).store(0, Ordering::Relaxed);
    let mem = h.mem.clone();
    let raw = Raw {
        mem: &mem,
        mask: cap as u64 - 1,
    };
    for n in 0..=100usize {
        let sent = Sent {
            record_type: 2,
            layout_version: 1,
            block_length: 0,
            payload: vec![0xAB; n],
        };
        h.send(std::slice::from_ref(&sent)).unwrap();
        let (c, _) = h.expected.back().cloned().unwrap();
        // The frame ends the batch (which starts with a padding frame when it wrapped).
        let (start, end) = (c.end - frame_bytes(n) as u64, c.end);
        for pos in (start + HEADER_BYTES as u64..end).step_by(8) {
            let w = raw.get(pos);
            let valid = (n as u64)
                .saturating_sub(pos - start - HEADER_BYTES as u64)
                .min(8);
            let expected = if valid == 8 {
                u64::from_le_bytes([0xAB; 8])
            } else {
                u64::from_le_bytes([0xAB; 8]) & ((1u64 << (8 * valid)) - 1)
            };
            assert_eq!(w, expected, "payload of {n} bytes, word at {pos}");
        }
        assert_eq!(raw.get(end), 0, "the word past the frame is zeroed");
        h.drain().unwrap();
    }
}
