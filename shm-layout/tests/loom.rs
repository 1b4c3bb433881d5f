//! Loom models of the ring protocol on a heap buffer: under `--cfg loom` every word of the ring
//! (payload included) is a loom atomic, so loom explores the interleavings and the weak-memory
//! outcomes of the producer's stores against the consumer's loads.
//!
//! Run: `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p shm-layout --test loom --release`
//!
//! Each model keeps the work inside the threads small (a few frames of a few words): state
//! that only sets the scene (filling the ring, moving its position near the end) is written
//! before the threads start, where it costs no interleavings.
#![cfg(loom)]

use loom::thread;
use shm_layout::memory::HeapMemory;
use shm_layout::ring::{ring_words, BatchBuf, Consumer, Integrity, Producer, PushError};
use std::sync::Arc;

/// loom's smallest ring: 1024 data bytes, 128 + 64 words.
const CAP: usize = 1024;

type Mem = Arc<HeapMemory>;

fn ring() -> (Producer<Mem>, Consumer<Mem>) {
    let mem = Arc::new(HeapMemory::new(ring_words(CAP)));
    (
        Producer::create(mem.clone(), CAP).unwrap(),
        Consumer::attach(mem, CAP).unwrap(),
    )
}

fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_mul(31).wrapping_add(i as u8))
        .collect()
}

/// Poll until a batch arrives (yielding to loom between polls); any read error fails the model.
fn next_batch(c: &mut Consumer<Mem>, buf: &mut BatchBuf) -> Vec<(u16, Vec<u8>)> {
    loop {
        match c.poll(buf) {
            Ok(true) => {
                return buf
                    .frames()
                    .map(|f| (f.meta.record_type, f.payload.to_vec()))
                    .collect()
            }
            Ok(false) => thread::yield_now(),
            Err(e) => panic!("consumer saw a bad frame: {e}"),
        }
    }
}

/// Publish one frame as a batch, retrying (and yielding) while the ring is full; returns how
/// many times it was full.
fn publish_retrying(p: &mut Producer<Mem>, record_type: u16, bytes: &[u8]) -> u32 {
    let mut fulls = 0;
    loop {
        match p.try_publish(record_type, 1, 0, bytes) {
            Ok(()) => return fulls,
            Err(PushError::Full { .. }) => {
                fulls += 1;
                thread::yield_now();
            }
            Err(e) => panic!("publish: {e}"),
        }
    }
}

#[test]
fn publish_then_consume() {
    // Proves that in every interleaving a consumer polling concurrently with a producer that
    // publishes two batches gets both, in order, with their payloads intact.
    loom::model(|| {
        let (mut p, mut c) = ring();
        let producer = thread::spawn(move || {
            p.try_publish(1, 1, 0, &payload(1, 8)).unwrap();
            p.try_publish(2, 1, 0, &payload(2, 12)).unwrap();
        });
        let mut buf = BatchBuf::default();
        assert_eq!(next_batch(&mut c, &mut buf), vec![(1, payload(1, 8))]);
        assert_eq!(next_batch(&mut c, &mut buf), vec![(2, payload(2, 12))]);
        producer.join().unwrap();
        assert!(!c.poll(&mut buf).unwrap(), "nothing else was published");
    });
}

#[test]
fn wrap_around_with_padding() {
    // Proves that frames wrapping at the end of the buffer (behind a padding frame) arrive
    // intact in every interleaving, and that the stale words of the previous lap at the start
    // of the buffer are never mistaken for a frame.
    loom::model(|| {
        let (mut p, mut c) = ring();
        // Set the scene: one lap's worth of frames written and read, the position at 896.
        let mut buf = BatchBuf::default();
        p.try_publish(9, 1, 0, &payload(9, 832)).unwrap();
        assert!(c.poll(&mut buf).unwrap());
        assert_eq!(c.position(), 864);
        p.try_publish(9, 1, 0, &[]).unwrap();
        assert!(c.poll(&mut buf).unwrap());
        assert_eq!(c.position(), 896);

        let producer = thread::spawn(move || {
            // 896 + 160 > 1024: 128 bytes of padding, then the frame at the start (1024).
            p.try_publish(1, 1, 0, &payload(1, 128)).unwrap();
            // Right behind it, over the previous lap's first frame.
            p.try_publish(2, 1, 0, &payload(2, 8)).unwrap();
            p.position()
        });
        assert_eq!(next_batch(&mut c, &mut buf), vec![(1, payload(1, 128))]);
        assert_eq!(buf.start(), 896, "the batch starts with the padding frame");
        assert_eq!(next_batch(&mut c, &mut buf), vec![(2, payload(2, 8))]);
        let end = producer.join().unwrap();
        assert_eq!(c.position(), end);
        assert_eq!(end, 1024 + 160 + 64);
        assert!(!c.poll(&mut buf).unwrap());
    });
}

#[test]
fn batch_is_seen_whole_or_not_at_all() {
    // Proves the consumer never sees part of a batch: in every interleaving, a poll either
    // finds nothing or all three frames of the batch, intact.
    loom::model(|| {
        let (mut p, mut c) = ring();
        let producer = thread::spawn(move || {
            let mut b = p.batch();
            b.push(1, 1, 0, &payload(1, 8)).unwrap();
            b.push(2, 1, 0, &payload(2, 16)).unwrap();
            b.push(3, 1, 0, &[]).unwrap();
            b.commit().unwrap();
        });
        let mut buf = BatchBuf::default();
        assert_eq!(
            next_batch(&mut c, &mut buf),
            vec![(1, payload(1, 8)), (2, payload(2, 16)), (3, vec![])]
        );
        producer.join().unwrap();
    });
}

#[test]
fn full_ring_waits_for_the_release() {
    // Proves a producer that finds the ring full succeeds once the consumer releases, and in
    // no interleaving overwrites bytes the consumer has not released: the unreleased frames
    // and the new one all arrive intact.
    loom::model(|| {
        let (mut p, mut c) = ring();
        let mut buf = BatchBuf::default();
        // Set the scene: a 928-byte frame read but kept (not released), a 32-byte frame not
        // yet read; the 64-byte frame after them does not fit.
        c.set_auto_release(false);
        p.try_publish(1, 1, 0, &payload(1, 896)).unwrap();
        p.try_publish(2, 1, 0, &[]).unwrap();
        assert!(matches!(
            p.try_publish(3, 1, 0, &payload(3, 8)),
            Err(PushError::Full { .. })
        ));
        assert!(c.poll(&mut buf).unwrap());
        let (kept_end, kept_seq) = (c.position(), c.next_seq());

        let producer = thread::spawn(move || publish_retrying(&mut p, 3, &payload(3, 8)));
        c.release_to(kept_end, kept_seq);
        assert_eq!(next_batch(&mut c, &mut buf), vec![(2, vec![])]);
        c.release_to(c.position(), c.next_seq());
        assert_eq!(next_batch(&mut c, &mut buf), vec![(3, payload(3, 8))]);
        producer.join().unwrap();
        assert_eq!(c.position(), 1024);
    });
}

#[test]
fn full_ring_with_an_auto_releasing_consumer() {
    // Proves the same hand-over when the consumer releases as it reads, with the producer's
    // second frame wrapping behind padding into the bytes the first release freed.
    loom::model(|| {
        let (mut p, mut c) = ring();
        let mut buf = BatchBuf::default();
        p.try_publish(1, 1, 0, &payload(1, 896)).unwrap(); // 0..928
        let producer = thread::spawn(move || {
            // 928 + 64 + 32 fits; then 992 + 64 > 1024 wraps: 32 bytes of padding, the frame at
            // 1024..1088, which is only free once frame 1 is released.
            let a = publish_retrying(&mut p, 2, &payload(2, 8));
            let b = publish_retrying(&mut p, 3, &payload(3, 8));
            (a, b)
        });
        assert_eq!(next_batch(&mut c, &mut buf), vec![(1, payload(1, 896))]);
        assert_eq!(next_batch(&mut c, &mut buf), vec![(2, payload(2, 8))]);
        assert_eq!(next_batch(&mut c, &mut buf), vec![(3, payload(3, 8))]);
        let (fulls_a, _) = producer.join().unwrap();
        assert_eq!(fulls_a, 0, "the second frame always fits");
        assert_eq!(c.position(), 1088);
    });
}

/// Read in place until a batch arrives (yielding to loom between reads); any read error fails
/// the model. Returns the frames and the released position seen right after the read.
fn next_view(c: &mut Consumer<Mem>) -> (Vec<(u16, Vec<u8>)>, u64) {
    loop {
        match c.read_batch() {
            Ok(Some(v)) => {
                let frames = v
                    .frames()
                    .map(|f| (f.meta.record_type, f.payload.to_vec()))
                    .collect();
                return (frames, c.released().0);
            }
            Ok(None) => thread::yield_now(),
            Err(e) => panic!("consumer saw a bad frame: {e}"),
        }
    }
}

#[test]
fn claimed_frames_are_seen_whole_in_place() {
    // Proves claim-in-place with one checksum per batch: a batch of two claimed frames (the
    // payload written into the ring before the header, the head's checksum and commit word
    // last) is seen by a concurrent in-place reader whole or not at all, intact, in every
    // interleaving.
    loom::model(|| {
        let (mut p, mut c) = ring();
        p.set_integrity(Integrity::PerBatch);
        let producer = thread::spawn(move || {
            let mut b = p.batch();
            let mut k = b.claim(1, 1, 0, 8).unwrap();
            k.bytes_mut().copy_from_slice(&payload(1, 8));
            k.commit();
            b.push_with(2, 1, 0, 12, |d| d.copy_from_slice(&payload(2, 12)))
                .unwrap();
            b.commit().unwrap();
        });
        let (frames, _) = next_view(&mut c);
        assert_eq!(frames, vec![(1, payload(1, 8)), (2, payload(2, 12))]);
        producer.join().unwrap();
    });
}

#[test]
fn a_claim_waits_for_the_batched_release() {
    // Proves the batched release hands room back safely: the consumer reads in place and
    // holds its release until it finds nothing new; a producer whose claim finds the ring
    // full retries and gets room only after that release, and in no interleaving overwrites
    // bytes the consumer was still viewing (every payload arrives intact, unchecked batches
    // included: integrity off leaves only the protocol to keep them whole).
    loom::model(|| {
        let (mut p, mut c) = ring();
        p.set_integrity(Integrity::Off);
        c.set_require_integrity(false);
        c.set_release_every(1024);
        // Set the scene: 960 bytes committed; the next 64-byte frame (with the zeroed word
        // past it) does not fit until they are released.
        p.try_publish(1, 1, 0, &payload(1, 928)).unwrap();
        let producer = thread::spawn(move || {
            let mut fulls = 0u32;
            loop {
                let mut b = p.batch();
                match b.claim(2, 1, 0, 16) {
                    Ok(mut k) => {
                        k.bytes_mut().copy_from_slice(&payload(2, 16));
                        k.commit();
                        b.commit().unwrap();
                        return fulls;
                    }
                    Err(PushError::Full { .. }) => {
                        fulls += 1;
                        thread::yield_now();
                    }
                    Err(e) => panic!("claim: {e}"),
                }
            }
        });
        let (first, released) = next_view(&mut c);
        assert_eq!(first, vec![(1, payload(1, 928))]);
        assert_eq!(released, 0, "not released while below the threshold");
        let (second, _) = next_view(&mut c);
        assert_eq!(second, vec![(2, payload(2, 16))]);
        producer.join().unwrap();
        assert_eq!(c.position(), 1024);
        assert_eq!(c.released().0, 960, "released when it found nothing new");
    });
}

#[test]
fn batches_over_a_previous_lap_carry_their_sequences_by_position() {
    // Proves the layout-major-4 frame in every interleaving: a one-frame per-batch-sum batch
    // (its sum stored with its header, the batch end zeroed at the claim, before the payload)
    // and then a three-frame batch whose frames inside the batch store no sequence word, both
    // written over the previous lap's frames (whose stale words, sequences included, lie where
    // the new frames' headers and payloads go), are read whole or not at all by a concurrent
    // in-place reader, with the sequences their positions imply.
    loom::model(|| {
        let (mut p, mut c) = ring();
        // Set the scene: a lap of three-frame batches written and read (stale headers with
        // their sequence words all over the buffer), the position back at 1024.
        let mut buf = BatchBuf::default();
        for _ in 0..4 {
            let mut b = p.batch();
            for k in 0..3 {
                b.push(9, 1, 0, &payload(9 + k, 32)).unwrap();
            }
            b.commit().unwrap();
            assert!(c.poll(&mut buf).unwrap());
        }
        p.try_publish(9, 1, 0, &payload(9, 224)).unwrap();
        assert!(c.poll(&mut buf).unwrap());
        assert_eq!(c.position(), 1024);
        let seq0 = c.next_seq();
        p.set_integrity(Integrity::PerBatch);
        let producer = thread::spawn(move || {
            let mut b = p.batch();
            b.push_with(1, 1, 0, 24, |d| d.copy_from_slice(&payload(1, 24)))
                .unwrap();
            b.commit().unwrap();
            let mut b = p.batch();
            b.push(2, 1, 0, &payload(2, 8)).unwrap();
            b.push_with(3, 1, 0, 40, |d| d.copy_from_slice(&payload(3, 40)))
                .unwrap();
            b.push(4, 1, 0, &[]).unwrap();
            b.commit().unwrap();
        });
        let seqs = |c: &mut Consumer<Mem>| loop {
            match c.read_batch() {
                Ok(Some(v)) => {
                    return v
                        .frames()
                        .map(|f| (f.meta.seq, f.meta.record_type, f.payload.to_vec()))
                        .collect::<Vec<_>>()
                }
                Ok(None) => thread::yield_now(),
                Err(e) => panic!("consumer saw a bad frame: {e}"),
            }
        };
        assert_eq!(seqs(&mut c), vec![(seq0, 1, payload(1, 24))]);
        assert_eq!(
            seqs(&mut c),
            vec![
                (seq0 + 1, 2, payload(2, 8)),
                (seq0 + 2, 3, payload(3, 40)),
                (seq0 + 3, 4, vec![]),
            ]
        );
        producer.join().unwrap();
    });
}
