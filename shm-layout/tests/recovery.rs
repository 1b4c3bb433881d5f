//! A producer that dies between committing a batch and publishing its head position: the
//! committed batch is visible to the consumer, but the producer's head word still says where
//! the batch started. A successor producer and a fresh consumer must both accept the ring.
//!
//! The death is simulated on a heap ring by storing the old head back after the commit, which
//! leaves the memory exactly as a SIGKILL between the two stores would.

use shm_layout::memory::{HeapMemory, WordMemory};
use shm_layout::ring::{ring_words, BatchBuf, Consumer, Producer};
use shm_layout::Ordering;
use std::sync::Arc;

const CAP: usize = 4096;
// Control words, as documented in `shm_layout::ring`: line 0 holds the producer's head.
const HEAD_POS: usize = 0;
const HEAD_SEQ: usize = 1;
const TAIL_POS: usize = 16;
const TAIL_SEQ: usize = 17;

fn payload(n: u64) -> Vec<u8> {
    (0..40).map(|i| (n * 7 + i) as u8).collect()
}

/// Commit batches 0..n, the last one with its head publish "lost".
fn ring_with_lost_head_publish(n: u64) -> (Arc<HeapMemory>, Producer<Arc<HeapMemory>>) {
    let mem = Arc::new(HeapMemory::new(ring_words(CAP)));
    let mut p = Producer::create(mem.clone(), CAP).unwrap();
    for b in 0..n - 1 {
        let mut batch = p.batch();
        batch.push(1, 1, 0, &payload(b)).unwrap();
        batch.push(1, 1, 0, &payload(b)).unwrap();
        batch.commit().unwrap();
    }
    let (head, seq) = (p.position(), p.next_seq());
    let mut batch = p.batch();
    batch.push(1, 1, 0, &payload(n - 1)).unwrap();
    batch.push(1, 1, 0, &payload(n - 1)).unwrap();
    batch.commit().unwrap();
    mem.word(HEAD_POS).store(head, Ordering::Release);
    mem.word(HEAD_SEQ).store(seq, Ordering::Release);
    (mem, p)
}

fn read_all(c: &mut Consumer<Arc<HeapMemory>>) -> Vec<Vec<u8>> {
    let mut buf = BatchBuf::default();
    let mut out = Vec::new();
    while c.poll(&mut buf).unwrap() {
        out.extend(buf.frames().map(|f| f.payload.to_vec()));
    }
    out
}

#[test]
fn successor_resumes_after_a_lost_head_publish_the_consumer_already_read() {
    // Proves a successor producer resumes exactly past the last committed batch, and a fresh
    // consumer attaches, when the consumer had already read (and released) the batch whose
    // head publish was lost: the released tail is then ahead of the published head.
    let (mem, dead) = ring_with_lost_head_publish(3);
    let (end, next_seq) = (dead.position(), dead.next_seq());
    drop(dead);
    let mut c = Consumer::attach(mem.clone(), CAP).unwrap();
    assert_eq!(
        read_all(&mut c).len(),
        6,
        "all three committed batches are readable"
    );
    assert_eq!(c.released().0, end);
    assert!(
        mem.word(HEAD_POS).load(Ordering::Relaxed) < end,
        "the setup left the tail ahead of the published head"
    );

    let fresh = Consumer::attach(mem.clone(), CAP).expect("a consumer attaches at the tail");
    assert_eq!((fresh.position(), fresh.next_seq()), (end, next_seq));

    let mut p = Producer::resume(mem.clone(), CAP).expect("the successor resumes");
    assert_eq!((p.position(), p.next_seq()), (end, next_seq));
    p.try_publish(1, 1, 0, &payload(99)).unwrap();
    assert_eq!(read_all(&mut c), vec![payload(99)]);
}

#[test]
fn successor_skips_a_committed_batch_whose_head_publish_was_lost() {
    // Proves a successor producer walks over a committed-but-unpublished batch the consumer has
    // not read yet, so the consumer later reads it once and then the successor's batch.
    let (mem, dead) = ring_with_lost_head_publish(3);
    let (end, next_seq) = (dead.position(), dead.next_seq());
    drop(dead);
    let mut p = Producer::resume(mem.clone(), CAP).unwrap();
    assert_eq!((p.position(), p.next_seq()), (end, next_seq));
    assert_eq!(
        mem.word(HEAD_POS).load(Ordering::Relaxed),
        end,
        "resume republished the head"
    );
    p.try_publish(1, 1, 0, &payload(99)).unwrap();
    let mut c = Consumer::attach(mem, CAP).unwrap();
    let got = read_all(&mut c);
    let want: Vec<Vec<u8>> = [0, 0, 1, 1, 2, 2, 99].into_iter().map(payload).collect();
    assert_eq!(got, want);
}

#[test]
fn garbage_positions_are_still_refused() {
    // Proves the tolerance for a tail ahead of the head is bounded: a tail more than a lap
    // away from the head, or a head more than a lap ahead of the tail, is refused by both ends.
    let mem = Arc::new(HeapMemory::new(ring_words(CAP)));
    for (head, tail) in [
        (0u64, 10 * CAP as u64),
        (10 * CAP as u64, 0),
        (u64::MAX - 64, 0),
        (0, u64::MAX - 64),
    ] {
        mem.word(HEAD_POS).store(head, Ordering::Relaxed);
        mem.word(TAIL_POS).store(tail, Ordering::Relaxed);
        assert!(
            Consumer::attach(mem.clone(), CAP).is_err(),
            "consumer accepted head {head} tail {tail}"
        );
        assert!(
            Producer::resume(mem.clone(), CAP).is_err(),
            "producer accepted head {head} tail {tail}"
        );
    }
}

#[test]
fn successor_resumes_after_a_half_published_head() {
    // Proves a producer killed between its two head stores (the sequence already new, the
    // position still old) is resumed at the right sequence: the successor neither overwrites
    // the committed batch nor stamps its own batch with a sequence the consumer rejects.
    let (mem, dead) = ring_with_lost_head_publish(3);
    let (end, next_seq) = (dead.position(), dead.next_seq());
    drop(dead);
    mem.word(HEAD_SEQ).store(next_seq, Ordering::Release);
    let mut p = Producer::resume(mem.clone(), CAP).unwrap();
    assert_eq!((p.position(), p.next_seq()), (end, next_seq));
    p.try_publish(1, 1, 0, &payload(99)).unwrap();
    let mut c = Consumer::attach(mem, CAP).unwrap();
    let want: Vec<Vec<u8>> = [0, 0, 1, 1, 2, 2, 99].into_iter().map(payload).collect();
    assert_eq!(read_all(&mut c), want);
}

#[test]
fn consumer_reattaches_after_a_half_published_release() {
    // Proves a consumer killed between its two release stores (the sequence already new, the
    // position still old) is succeeded by one that re-reads the unreleased batch and goes on,
    // instead of one stuck on a sequence mismatch.
    let mem = Arc::new(HeapMemory::new(ring_words(CAP)));
    let mut p = Producer::create(mem.clone(), CAP).unwrap();
    for b in 0..3 {
        p.try_publish(1, 1, 0, &payload(b)).unwrap();
    }
    let mut c = Consumer::attach(mem.clone(), CAP).unwrap();
    c.set_auto_release(false);
    let mut buf = BatchBuf::default();
    assert!(c.poll(&mut buf).unwrap());
    c.release_to(c.position(), c.next_seq());
    let (pos1, seq1) = c.released();
    assert!(c.poll(&mut buf).unwrap());
    // Killed inside release_to(batch 1): the sequence word was stored, the position was not.
    mem.word(TAIL_SEQ).store(c.next_seq(), Ordering::Relaxed);
    drop(c);
    assert_eq!(mem.word(TAIL_POS).load(Ordering::Relaxed), pos1);

    let mut c = Consumer::attach(mem.clone(), CAP).unwrap();
    assert_eq!((c.position(), c.next_seq()), (pos1, seq1));
    assert_eq!(read_all(&mut c), vec![payload(1), payload(2)]);
}
