//! Helpers shared by the integration tests, from the workspace's one harness
//! (`understudy-test-support`, its generic parts): a private scratch directory under /dev/shm
//! that is removed even when the test fails, and the seeded random number generator whose seed
//! is printed when a test fails, so that the run can be repeated (`UNDERSTUDY_TEST_SEED`).
#![allow(unused_imports)]

pub use understudy_test_support::{Rng, TestDir};
