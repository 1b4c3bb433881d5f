//! The one place atomics come from: `std` normally, `loom` under `--cfg loom`, so the loom
//! models exercise exactly the code that runs in production (crossbeam and iceoryx2 do the same).

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU64};
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU64};

pub use std::sync::atomic::Ordering;

/// Tell the scheduler (or loom) that this thread is waiting for another one.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// Give up the CPU for a moment.
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}
