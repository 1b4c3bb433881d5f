//! The ring's hot path allocates nothing: claim, commit, push, read in place (with its batched
//! release) and the copying poll, in every integrity mode, over many laps, once the consumer's
//! buffers have grown to the largest batch. A counting global allocator checks it.

use shm_layout::memory::HeapMemory;
use shm_layout::ring::{ring_words, BatchBuf, Consumer, Integrity, Producer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Count this thread's allocations only: the test harness's own threads (its main thread
    /// waiting for the test, its output capture) allocate at moments of their own, which made
    /// a process-wide count fail now and then on a loaded machine.
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(|c| c.get()).unwrap_or(false)
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc` is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One round: a batch of `frames` records claimed or pushed, read back in place or copied;
/// returns the bytes of payload seen (so the work is not optimized away).
fn round(
    p: &mut Producer<Arc<HeapMemory>>,
    c: &mut Consumer<Arc<HeapMemory>>,
    buf: &mut BatchBuf,
    k: u64,
    payload: &[u8],
) -> usize {
    let mut b = p.batch();
    for j in 0..(1 + k % 8) {
        if j % 2 == 0 {
            b.push_with(1, 1, 0, payload.len(), |d| d.copy_from_slice(payload))
                .unwrap();
        } else {
            b.push(2, 1, 0, payload).unwrap();
        }
    }
    b.commit().unwrap();
    let mut seen = 0;
    if k % 3 == 0 {
        assert!(c.poll(buf).unwrap());
        seen += buf.frames().map(|f| f.payload.len()).sum::<usize>();
    } else {
        let v = c.read_batch().unwrap().unwrap();
        seen += v.frames().map(|f| f.payload.len()).sum::<usize>();
    }
    // An idle read: publishes the release.
    assert!(c.read_batch().unwrap().is_none());
    seen
}

#[test]
fn the_hot_path_allocates_nothing() {
    // Proves claim/commit/push and both reads make no allocation after warm-up, in each
    // integrity mode, across laps and wraps of a 4 KiB ring.
    let cap = 4096;
    let mem = Arc::new(HeapMemory::new(ring_words(cap)));
    let mut p = Producer::create(mem.clone(), cap).unwrap();
    let mut c = Consumer::attach(mem, cap).unwrap();
    c.set_require_integrity(false);
    let mut buf = BatchBuf::with_capacity(cap);
    let payload = [0x5Au8; 100];
    COUNTING.with(|c| c.set(true));
    for integrity in [Integrity::PerFrame, Integrity::PerBatch, Integrity::Off] {
        p.set_integrity(integrity);
        let mut seen = 0;
        // Warm up: the consumer's frame lists grow to the largest batch.
        for k in 0..64 {
            seen += round(&mut p, &mut c, &mut buf, k, &payload);
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for k in 0..2000 {
            seen += round(&mut p, &mut c, &mut buf, k, &payload);
        }
        let after = ALLOCS.load(Ordering::Relaxed);
        assert_eq!(
            after - before,
            0,
            "allocations in {integrity:?} ({seen} bytes)"
        );
    }
}
