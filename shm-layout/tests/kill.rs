//! Two processes and a real SIGKILL: a child process (this test binary re-executed, running
//! only `child_writer`) streams numbered batches into a 64 KiB region under /dev/shm as fast as
//! it can while this process reads them concurrently; the child is killed at a random moment,
//! and what the reader got must be exactly a gap-free prefix of whole batches. Then a successor
//! producer resumes the ring where the committed prefix ends.

mod common;

use common::{Rng, TestDir};
use shm_layout::region::{IdentityWords, Region, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, PushError};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use understudy_test_support::ChildGuard;

/// Set for the child: the region file it writes to.
const REGION_ENV: &str = "UNDERSTUDY_KILL_TEST_REGION";
const CAPACITY: usize = 64 * 1024;
const KILLS: usize = 50;
const RECORD_TYPE: u16 = 0x4b;
/// A child never outlives this, even if nobody kills it.
const CHILD_LIFETIME_MAX: Duration = Duration::from_secs(30);
/// Bound on every wait for the child.
const WAIT_MAX: Duration = Duration::from_secs(10);

/// Frames in batch `b`: 1..=6, varying from batch to batch.
fn frames_in(b: u64) -> u32 {
    1 + ((b.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 6) as u32
}

/// Frame `i` of batch `b` (of `k` frames): (b, i, k), then a filler whose length and bytes
/// depend on all three, so that sizes vary (and frames wrap behind padding) and a frame from
/// the wrong place cannot pass for the right one.
fn frame_payload(b: u64, i: u32, k: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(128);
    p.extend_from_slice(&b.to_le_bytes());
    p.extend_from_slice(&i.to_le_bytes());
    p.extend_from_slice(&k.to_le_bytes());
    let filler = (b.wrapping_mul(31) + u64::from(i) * 17) % 97;
    p.extend((0..filler).map(|j| (b ^ u64::from(i) ^ j) as u8));
    p
}

#[test]
fn child_writer() {
    // Not a test on its own: the body of the writer process that `sigkill_*` starts. In a
    // normal test run (no region given) it does nothing.
    let Ok(path) = std::env::var(REGION_ENV) else {
        return;
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let region = Region::open(path.as_ref(), WAIT_MAX).expect("child: open the region");
    region.set_producer_identity(IdentityWords {
        pid: u64::from(std::process::id()),
        start_time: 0,
    });
    let mut producer = region.producer().expect("child: producer");
    let deadline = Instant::now() + CHILD_LIFETIME_MAX;
    for b in 0u64.. {
        let k = frames_in(b);
        let mut batch = producer.batch();
        for i in 0..k {
            let payload = frame_payload(b, i, k);
            loop {
                match batch.push(RECORD_TYPE, 1, 16, &payload) {
                    Ok(()) => break,
                    Err(PushError::Full { .. }) => {
                        assert!(Instant::now() < deadline, "child: never killed");
                        thread::yield_now();
                    }
                    Err(e) => panic!("child: push: {e}"),
                }
            }
        }
        batch
            .commit()
            .expect("child: a batch of at least one frame");
    }
}

/// What the reader has checked so far.
#[derive(Debug, Default)]
struct Checked {
    /// The number of the next batch expected: batches 0..next_batch arrived, whole, once each.
    next_batch: u64,
    frames: u64,
}

impl Checked {
    /// The batch in `buf` must be the next one, complete, each frame where it belongs.
    fn check(&mut self, buf: &BatchBuf) -> Result<(), String> {
        let b = self.next_batch;
        let k = frames_in(b);
        if buf.len() != k as usize {
            let first = buf.frames().next().map(|f| f.payload[..8].to_vec());
            return Err(format!(
                "batch {b}: expected {k} frames, got {} (first frame starts {first:?})",
                buf.len()
            ));
        }
        for (i, f) in buf.frames().enumerate() {
            let want = frame_payload(b, i as u32, k);
            if f.payload != &want[..] {
                let got_b = f
                    .payload
                    .get(..8)
                    .map(|x| u64::from_le_bytes(x.try_into().unwrap()));
                return Err(format!(
                    "batch {b} frame {i}/{k}: wrong payload (it carries batch number {got_b:?})"
                ));
            }
            if f.meta.record_type != RECORD_TYPE || f.meta.block_length != 16 {
                return Err(format!("batch {b} frame {i}: header {:?}", f.meta));
            }
        }
        self.next_batch += 1;
        self.frames += u64::from(k);
        Ok(())
    }
}

fn spawn_writer(path: &std::path::Path) -> ChildGuard {
    let exe = std::env::current_exe().expect("current test binary");
    let mut child = Command::new(exe);
    child
        .args([
            "--exact",
            "child_writer",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(REGION_ENV, path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The workspace's child guard: SIGKILLed with the test runner, and on drop.
    ChildGuard::spawn(&mut child)
}

fn child_stderr(child: &mut Child) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

type Reader =
    thread::JoinHandle<Result<(Consumer<shm_layout::region::RegionMemory>, Checked), String>>;

/// Read and check batches until told to stop; `pause` stops reading (so the writer fills the
/// ring and blocks on Full); `progress` is the consumer's position.
fn spawn_reader(
    mut consumer: Consumer<shm_layout::region::RegionMemory>,
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> Reader {
    thread::spawn(move || {
        let mut checked = Checked::default();
        let mut buf = BatchBuf::with_capacity(CAPACITY);
        while !stop.load(Ordering::Acquire) {
            if pause.load(Ordering::Acquire) {
                thread::sleep(Duration::from_micros(100));
                continue;
            }
            match consumer.poll(&mut buf) {
                Ok(true) => {
                    checked.check(&buf)?;
                    progress.store(consumer.position(), Ordering::Release);
                }
                Ok(false) => thread::yield_now(),
                Err(e) => return Err(format!("poll while the writer lives: {e}")),
            }
        }
        Ok((consumer, checked))
    })
}

#[derive(Debug, Default)]
struct Totals {
    batches: u64,
    frames: u64,
    laps: u64,
    torn_tails_seen: u32,
    paused_kills: u32,
}

#[test]
fn sigkill_leaves_a_gap_free_prefix_of_whole_batches() {
    // Proves that 50 times over, a writer SIGKILLed at a random moment (mid-batch, mid-wrap,
    // or blocked on a full ring) leaves the reader exactly batches 0..n, each whole and once,
    // that `torn_tail` points just past them, and that a successor producer resumes there with
    // the next sequence so the stream goes on without a gap.
    let started = Instant::now();
    let mut rng = Rng::from_env("sigkill_leaves_a_gap_free_prefix_of_whole_batches");
    let dir = TestDir::new("kill");
    let mut totals = Totals::default();
    for round in 0..KILLS {
        let path = dir.join(&format!("ring-{round}"));
        let region = Region::create(
            &path,
            RegionSpec {
                capacity: CAPACITY,
                epoch: round as u64,
                kind: 0x6b69,
            },
            IdentityWords::default(),
        )
        .unwrap();
        let consumer = region.consumer().unwrap();
        let mut child = spawn_writer(&path);
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(AtomicU64::new(0));
        let reader = spawn_reader(consumer, stop.clone(), pause.clone(), progress.clone());

        // Let the writer lap the ring twice while the reader keeps up, so the kill lands in a
        // ring that has wrapped.
        let waiting = Instant::now();
        while progress.load(Ordering::Acquire) < 2 * CAPACITY as u64 {
            if let Some(status) = child.child_mut().try_wait().unwrap() {
                let err = child_stderr(child.child_mut());
                panic!("round {round}: writer exited on its own ({status}):\n{err}");
            }
            if reader.is_finished() {
                panic!(
                    "round {round}: reader stopped: {:?}",
                    reader.join().unwrap().err()
                );
            }
            assert!(
                waiting.elapsed() < WAIT_MAX,
                "round {round}: the writer wrote only {} bytes in {WAIT_MAX:?}",
                progress.load(Ordering::Acquire)
            );
            thread::sleep(Duration::from_micros(200));
        }
        // Every fifth round, stop reading first so the writer is killed blocked on Full.
        if round % 5 == 4 {
            pause.store(true, Ordering::Release);
            thread::sleep(Duration::from_millis(2));
            totals.paused_kills += 1;
        }
        thread::sleep(Duration::from_micros(rng.range(0, 20_000)));
        let pid = child.child_mut().id();
        child.child_mut().kill().unwrap();
        let status = child.child_mut().wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the writer ended otherwise ({status}):\n{}",
            child_stderr(child.child_mut())
        );
        assert_eq!(
            region.producer_identity().map(|i| i.pid),
            Some(u64::from(pid)),
            "round {round}: the writer recorded its identity"
        );

        stop.store(true, Ordering::Release);
        let (mut consumer, mut checked) = reader
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let mut buf = BatchBuf::with_capacity(CAPACITY);
        loop {
            match consumer.poll(&mut buf) {
                Ok(true) => checked
                    .check(&buf)
                    .unwrap_or_else(|e| panic!("round {round}, draining: {e}")),
                Ok(false) => break,
                Err(e) => panic!("round {round}: draining after the kill: {e}"),
            }
        }
        assert!(!consumer.poll(&mut buf).unwrap(), "nothing appears later");
        assert!(checked.next_batch > 0);

        let torn = consumer.torn_tail();
        assert_eq!(torn.committed_end, consumer.position(), "round {round}");
        assert_eq!(torn.next_seq, consumer.next_seq(), "round {round}");
        totals.torn_tails_seen += u32::from(torn.uncommitted_bytes_seen);

        // A successor producer resumes exactly at the torn tail; a fresh consumer attaches at
        // the released position; the next batch number follows without a gap.
        let mut successor = region.resume_producer().unwrap();
        assert_eq!(successor.position(), torn.committed_end, "round {round}");
        assert_eq!(successor.next_seq(), torn.next_seq, "round {round}");
        let b = checked.next_batch;
        let k = frames_in(b);
        let mut batch = successor.batch();
        for i in 0..k {
            batch
                .push(RECORD_TYPE, 1, 16, &frame_payload(b, i, k))
                .unwrap();
        }
        batch.commit().unwrap();
        assert!(
            consumer.poll(&mut buf).unwrap(),
            "round {round}: successor's batch"
        );
        checked
            .check(&buf)
            .unwrap_or_else(|e| panic!("round {round}, successor: {e}"));
        let fresh = region.consumer().unwrap();
        assert_eq!(
            (fresh.position(), fresh.next_seq()),
            (consumer.position(), consumer.next_seq())
        );

        totals.batches += checked.next_batch;
        totals.frames += checked.frames;
        totals.laps += consumer.position() / CAPACITY as u64;
        drop(consumer);
        drop(region);
        Region::remove(&path).unwrap();
    }
    eprintln!("{KILLS} kills in {:?}: {totals:?}", started.elapsed());
    assert!(totals.laps >= 2 * KILLS as u64, "{totals:?}");
}
