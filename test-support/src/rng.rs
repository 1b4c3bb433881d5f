//! One small seeded generator for every test and benchmark.

/// The environment variable that fixes a test's seed, to repeat a failed run.
pub const SEED_VAR: &str = "UNDERSTUDY_TEST_SEED";

/// xorshift64*: enough randomness for choosing sizes, offsets and sleep times, reproducible
/// from its seed. A generator made by [`Rng::from_env`] or [`Rng::seeded`] prints its seed
/// (with the variable that repeats the run) when it is dropped during a panic, i.e. when the
/// test that used it fails.
#[derive(Debug)]
pub struct Rng {
    state: u64,
    report: Option<(String, u64)>,
}

impl Rng {
    /// Seeded from `UNDERSTUDY_TEST_SEED` if set, otherwise from the clock and pid.
    pub fn from_env(test: &str) -> Rng {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Rng::seeded(test, clock ^ u64::from(std::process::id()) << 32)
    }

    /// Seeded from `UNDERSTUDY_TEST_SEED` if set, otherwise `seed` (a fixed sequence unless
    /// the person repeating a run says otherwise).
    pub fn seeded(test: &str, seed: u64) -> Rng {
        let seed = std::env::var(SEED_VAR)
            .ok()
            .and_then(|s| parse_seed(&s))
            .unwrap_or(seed);
        let mut rng = Rng::new(seed);
        rng.report = Some((test.to_string(), seed));
        rng
    }

    /// A fixed sequence that reports nothing (benchmarks, helpers inside a reported test).
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed | 1,
            report: None,
        }
    }

    /// The seed that repeats this sequence (`None` for [`Rng::new`]).
    pub fn seed(&self) -> Option<u64> {
        self.report.as_ref().map(|(_, s)| *s)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `0..n` (0 for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Uniform-ish in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo < hi, "an empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// One of `items` (which must not be empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        if let Some((test, seed)) = &self.report {
            if std::thread::panicking() {
                eprintln!("{test} failed: repeat it with {SEED_VAR}={seed}");
            }
        }
    }
}

/// A seed written in decimal or as `0x…` hex.
fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16).ok(),
        None => s.replace('_', "").parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence is the published xorshift64* of the seed (the tests' old generators), so
    /// a seed recorded before this crate existed repeats the same run.
    #[test]
    fn the_sequence_is_xorshift64_star() {
        let mut r = Rng::new(0x5eed_0001);
        let mut x: u64 = 0x5eed_0001;
        for _ in 0..100 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            assert_eq!(r.next_u64(), x.wrapping_mul(0x2545_F491_4F6C_DD1D));
        }
        assert_eq!(parse_seed("0x5eed_0001"), Some(0x5eed_0001));
        assert_eq!(parse_seed("42"), Some(42));
    }
}
