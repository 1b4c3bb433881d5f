//! The one harness of understudy's tests and benchmarks.
//!
//! Every integration test and benchmark of the workspace takes its scaffolding from here, so
//! that all of them clean up the same way and fail the same way:
//!
//! - [`dir::TestDir`]: a private scratch directory (under /dev/shm or the temp dir) removed on
//!   drop, also when the test panics;
//! - [`child::ChildGuard`]: a child process that dies with the test runner (`PR_SET_PDEATHSIG`
//!   set between fork and exec) and is killed and reaped on drop;
//! - [`wait::wait_until`]: a bounded wait that panics naming what it waited for and the last
//!   value it observed;
//! - [`rng::Rng`]: one seeded generator whose seed is printed when the test fails, and taken
//!   from `UNDERSTUDY_TEST_SEED` to repeat a run;
//! - with the `cluster` feature, [`cluster::Engines`] (engines started directly on one cluster
//!   directory), [`cluster::Supervised`] (a cluster under `understudy up`) and
//!   [`cluster::switchover`].
//!
//! The generic modules depend on no crate of this workspace: `shm-layout`'s tests use them
//! without a dependency cycle. Only `cluster` knows the runtime's control block and the
//! supervisor's status protocol. This crate is never published and never part of a release
//! build.
//!
//! ```
//! use std::time::Duration;
//! use understudy_test_support::{dir::TestDir, wait::wait_until};
//!
//! let dir = TestDir::new("doc");
//! std::fs::write(dir.join("ready"), b"1").unwrap();
//! wait_until("the ready file", Duration::from_secs(1), || dir.join("ready").exists());
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod child;
pub mod dir;
pub mod rng;
pub mod wait;

#[cfg(feature = "cluster")]
pub mod cluster;

pub use child::ChildGuard;
pub use dir::TestDir;
pub use rng::Rng;
pub use wait::{wait_until, Wait};
