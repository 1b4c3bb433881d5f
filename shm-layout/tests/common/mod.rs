//! Helpers shared by the integration tests: a private scratch directory under /dev/shm that is
//! removed even when the test fails, and a small seeded random number generator whose seed is
//! printed so that a failing run can be repeated.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `/dev/shm/understudy-test-<pid>-<counter>-<tag>/`, created 0700 and removed on drop
/// (also when the test panics: unwinding runs the drop).
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new(tag: &str) -> TestDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/dev/shm/understudy-test-{}-{n}-{tag}",
            std::process::id()
        ));
        // A leftover from a crashed run with a reused pid: start clean.
        let _ = std::fs::remove_dir_all(&path);
        shm_layout::region::ensure_private_dir(&path)
            .unwrap_or_else(|e| panic!("creating test dir {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: could not remove {}: {e}", self.path.display());
            }
        }
    }
}

/// xorshift64*: enough randomness for choosing sizes and sleep times in tests.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `UNDERSTUDY_TEST_SEED` if set, otherwise from the clock; prints the seed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("UNDERSTUDY_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    ^ u64::from(std::process::id()) << 32
            });
        eprintln!("{test}: UNDERSTUDY_TEST_SEED={seed}");
        Rng::new(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi);
        lo + self.next_u64() % (hi - lo)
    }
}
