//! The ring's software cost, one thread, no peer (every line in L1): `push` + copying `poll`
//! against `claim` + `read_batch` in place, in each integrity mode, interleaved. Ns per record.
//! Run: `cargo run -p shm-layout --release --example ring_paths`.

use shm_layout::memory::HeapMemory;
use shm_layout::ring::{ring_words, BatchBuf, Consumer, Integrity, Producer};
use std::sync::Arc;
use std::time::Instant;

fn run(mode: u8, integ: Integrity, len: usize, batch: usize, n: u64) -> f64 {
    let cap = 1 << 18;
    let mem = Arc::new(HeapMemory::new(ring_words(cap)));
    let mut p = Producer::create(mem.clone(), cap).unwrap();
    let mut c = Consumer::attach(mem, cap).unwrap();
    c.set_require_integrity(false);
    p.set_integrity(integ);
    let mut buf = BatchBuf::with_capacity(cap);
    let payload = vec![0x5Au8; len];
    let t = Instant::now();
    let mut i = 0;
    let mut sum = 0usize;
    while i < n {
        let mut b = p.batch();
        for _ in 0..batch {
            if mode == 0 {
                b.push(1, 1, 0, &payload).unwrap();
            } else {
                b.push_with(1, 1, 0, len, |d| d.copy_from_slice(&payload))
                    .unwrap();
            }
        }
        b.commit();
        i += batch as u64;
        if mode == 0 {
            assert!(c.poll(&mut buf).unwrap());
            sum += buf.frames().map(|f| f.payload[3] as usize).sum::<usize>();
        } else {
            let v = c.read_batch().unwrap().unwrap();
            sum += v.frames().map(|f| f.payload[3] as usize).sum::<usize>();
        }
    }
    std::hint::black_box(sum);
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    // (24 B, 6 per batch): a transaction of the replication bench (4 updates, the input
    // position, the commit).
    for (len, batch) in [(24, 6), (64, 1), (64, 16), (256, 1), (256, 16)] {
        {
            let modes = [
                ("push+poll, sum per frame (before)", 0, Integrity::PerFrame),
                ("claim+read in place, sum per frame", 1, Integrity::PerFrame),
                ("claim+read in place, sum per batch", 1, Integrity::PerBatch),
                ("claim+read in place, no sum", 1, Integrity::Off),
                ("push+poll, no sum", 0, Integrity::Off),
            ];
            // Interleaved rounds, so that a noisy moment of the machine hits every mode.
            let mut times = vec![Vec::new(); modes.len()];
            for _ in 0..7 {
                for (k, (_, mode, integ)) in modes.iter().enumerate() {
                    times[k].push(run(*mode, *integ, len, batch, 1_000_000));
                }
            }
            println!("{len} B, {batch} per batch (ns per record, median of 7):");
            for (k, (name, _, _)) in modes.iter().enumerate() {
                let v = &mut times[k];
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                println!("  {name:<36} {:6.1}", v[3]);
            }
        }
    }
}
