//! Basic ring round trips on a heap buffer: batches in, the same batches out, across many laps.
use shm_layout::memory::HeapMemory;
use shm_layout::ring::{ring_words, BatchBuf, Consumer, Producer, PushError};
use std::sync::Arc;

#[test]
fn batches_round_trip_across_laps() {
    let cap = 4096;
    let mem = Arc::new(HeapMemory::new(ring_words(cap)));
    let mut p = Producer::create(mem.clone(), cap).unwrap();
    let mut c = Consumer::attach(mem, cap).unwrap();
    let mut buf = BatchBuf::default();
    let mut next = 0u64;
    for round in 0..2000u64 {
        let n = (round % 5) + 1;
        let mut b = p.batch();
        for i in 0..n {
            let len = ((round * 7 + i * 13) % 200) as usize;
            let payload: Vec<u8> = (0..len).map(|k| (k as u64 + round + i) as u8).collect();
            b.push(1 + i as u16, 1, len as u16, &payload).unwrap();
        }
        b.commit().unwrap();
        assert!(c.poll(&mut buf).unwrap());
        assert_eq!(buf.len() as u64, n);
        for (i, f) in buf.frames().enumerate() {
            let i = i as u64;
            let len = ((round * 7 + i * 13) % 200) as usize;
            let payload: Vec<u8> = (0..len).map(|k| (k as u64 + round + i) as u8).collect();
            assert_eq!(f.payload, &payload[..]);
            assert_eq!(f.meta.record_type, 1 + i as u16);
            next += 1;
        }
        assert!(!c.poll(&mut buf).unwrap());
    }
    assert!(next > 0);
}

#[test]
fn full_ring_hands_back_and_recovers() {
    let cap = 1024;
    let mem = Arc::new(HeapMemory::new(ring_words(cap)));
    let mut p = Producer::create(mem.clone(), cap).unwrap();
    let mut c = Consumer::attach(mem, cap).unwrap();
    let mut sent = 0;
    loop {
        match p.try_publish(1, 1, 8, &[7u8; 100]) {
            Ok(()) => sent += 1,
            Err(PushError::Full { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent >= 6, "sent {sent}");
    let mut buf = BatchBuf::default();
    // One frame released is not enough here: the next frame must wrap (padding) and keep
    // one slot free; two are.
    assert!(c.poll(&mut buf).unwrap());
    assert!(matches!(
        p.try_publish(1, 1, 8, &[7u8; 100]),
        Err(PushError::Full { .. })
    ));
    assert!(c.poll(&mut buf).unwrap());
    p.try_publish(1, 1, 8, &[7u8; 100]).unwrap();
    let mut got = 2;
    while c.poll(&mut buf).unwrap() {
        got += 1;
    }
    assert_eq!(got, sent + 1);
}
