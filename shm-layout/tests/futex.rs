//! The futex wait between two threads over a real /dev/shm region (the only memory with a
//! futex word): a consumer in `Wait::Futex` falls asleep whenever the producer pauses, and
//! still receives every record, in order, whatever the moment of each commit relative to its
//! sleeps — the first ones included, made before any producer has acknowledged `MAY_SLEEP`.
use shm_layout::region::{IdentityWords, Region, RegionSpec};
use shm_layout::ring::{BatchBuf, Wait};
use std::time::Duration;
use understudy_test_support::{Rng, TestDir};

#[test]
fn futex_waiting_consumer_receives_every_record_across_producer_pauses() {
    let dir = TestDir::new("futex");
    let me = IdentityWords {
        pid: std::process::id() as u64,
        start_time: 0,
    };
    let spec = RegionSpec {
        capacity: 1 << 16,
        epoch: 1,
        kind: 1,
    };
    let region = Region::create(&dir.join("ring"), spec, me).unwrap();
    let mut producer = region.producer().unwrap();
    let mut consumer = region.consumer().unwrap();
    const N: u64 = 3000;
    let reader = std::thread::spawn(move || {
        let mut buf = BatchBuf::default();
        let mut next = 0u64;
        while next < N {
            // No timeout: a lost wake-up would cost one sleep slice, never a record.
            let got = consumer
                .poll_wait(&mut buf, Wait::Futex { spins: 32 }, None)
                .unwrap();
            assert!(got);
            for f in buf.frames() {
                let k = u64::from_le_bytes(f.payload[..8].try_into().unwrap());
                assert_eq!(k, next, "records in order, none lost or repeated");
                next += 1;
            }
        }
        next
    });
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15);
    for k in 0..N {
        loop {
            match producer.try_publish(1, 1, 8, &k.to_le_bytes()) {
                Ok(()) => break,
                Err(shm_layout::ring::PushError::Full { .. }) => std::thread::yield_now(),
                Err(e) => panic!("publish: {e}"),
            }
        }
        let r = rng.next_u64();
        // Pauses of every length around the consumer's spin budget and its first sleeps.
        match r % 16 {
            0 => std::thread::sleep(Duration::from_micros(r % 500)),
            1 => std::thread::yield_now(),
            _ => {}
        }
    }
    assert_eq!(reader.join().unwrap(), N);
}
