//! The raw byte region a ring runs over, seen as an array of 64-bit words.
//!
//! Every access to shared memory goes through [`WordMemory::words`], a slice of atomic words: the other
//! process may write the memory at any time, so a plain load would be a data race. Relaxed
//! atomic loads and stores of aligned `u64`s compile to plain moves on x86-64 and AArch64, so this
//! costs nothing, and under `--cfg loom` the same code runs on loom's atomics so the models see
//! (and check) every access, payload words included.

use crate::sync::AtomicU64;
use std::ptr::NonNull;

/// An array of atomic 64-bit words that a ring lives in.
///
/// # Safety
/// [`WordMemory::words`] must return the same slice (same address, same length) on every call,
/// for the memory's whole life, even after the value implementing this trait has been moved;
/// and the memory must stay mapped while any handle to it exists. The ring relies on this to
/// index the slice with positions it checked against the length once, at construction.
pub unsafe trait WordMemory {
    /// Every word of the memory, as one slice of atomics (the ring slices a frame out of it
    /// once instead of bounds-checking each word).
    fn words(&self) -> &[AtomicU64];
    /// The number of words.
    #[inline]
    fn len_words(&self) -> usize {
        self.words().len()
    }
    /// Word `i`; panics if `i >= len_words()`.
    #[inline]
    fn word(&self, i: usize) -> &AtomicU64 {
        &self.words()[i]
    }
    /// Word `i` without the bounds check.
    ///
    /// # Safety
    /// `i < len_words()`.
    #[inline(always)]
    unsafe fn word_unchecked(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.len_words());
        // SAFETY: the caller guarantees `i < len_words() = words().len()`.
        unsafe { self.words().get_unchecked(i) }
    }
    /// The low 32 bits of word `i` as a futex word, when the memory is real shared memory.
    fn futex_word(&self, _i: usize) -> Option<&std::sync::atomic::AtomicU32> {
        None
    }
}

/// A heap buffer of words: what loom models and unit tests run the ring on.
pub struct HeapMemory {
    words: Box<[AtomicU64]>,
}

impl HeapMemory {
    /// A zeroed buffer of `len_words` words.
    pub fn new(len_words: usize) -> Self {
        Self {
            words: (0..len_words).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

// SAFETY: the boxed slice lives on the heap, so it neither moves (not even when the
// `HeapMemory` value does) nor shrinks while `self` lives; `words` returns all of it.
unsafe impl WordMemory for HeapMemory {
    #[inline]
    fn words(&self) -> &[AtomicU64] {
        &self.words
    }
}

// SAFETY: the same slice as the shared `M`, which the `Arc` keeps in place for every handle.
unsafe impl<M: WordMemory> WordMemory for std::sync::Arc<M> {
    #[inline]
    fn words(&self) -> &[AtomicU64] {
        (**self).words()
    }
    fn futex_word(&self, i: usize) -> Option<&std::sync::atomic::AtomicU32> {
        (**self).futex_word(i)
    }
}

/// A window of words inside a memory-mapped file, kept alive by `owner`.
pub struct MappedWords<O> {
    base: NonNull<AtomicU64>,
    len_words: usize,
    _owner: O,
}

// SAFETY: the words are atomics (Sync); the owner keeps the mapping alive and is Send + Sync.
unsafe impl<O: Send + Sync> Send for MappedWords<O> {}
// SAFETY: see Send: all access is through atomics.
unsafe impl<O: Send + Sync> Sync for MappedWords<O> {}

impl<O> MappedWords<O> {
    /// A window of `len_words` words starting at `base`.
    ///
    /// # Safety
    /// `base` must be 8-byte aligned and point to `len_words * 8` bytes of shared, writable
    /// memory that stays mapped for as long as `owner` lives.
    pub unsafe fn new(base: *mut u8, len_words: usize, owner: O) -> Self {
        assert_eq!(base as usize % 8, 0, "word memory must be 8-byte aligned");
        Self {
            base: NonNull::new(base.cast()).expect("mapping base is not null"),
            len_words,
            _owner: owner,
        }
    }
}

// SAFETY: `base..base+len_words` stays mapped while `_owner` lives (contract of `new`), and
// `words` always returns exactly that range, wherever the `MappedWords` value moves.
unsafe impl<O> WordMemory for MappedWords<O> {
    #[inline]
    fn words(&self) -> &[AtomicU64] {
        // SAFETY: `base` points to `len_words` 8-byte aligned words of mapped memory that stays
        // mapped while `self` (which owns the mapping through `_owner`) lives (contract of
        // `new`); every access to them, by either process, is atomic, so a shared slice of
        // atomics over them is sound even while the peer writes.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len_words) }
    }
    fn futex_word(&self, i: usize) -> Option<&std::sync::atomic::AtomicU32> {
        #[cfg(loom)]
        {
            let _ = i;
            None
        }
        #[cfg(not(loom))]
        {
            assert!(i < self.len_words);
            // SAFETY: in bounds, 8-aligned so 4-aligned; on little-endian targets the first
            // 4 bytes are the low half of the word. Only used as a futex word by both sides.
            Some(unsafe { &*(self.base.as_ptr().add(i) as *const std::sync::atomic::AtomicU32) })
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("shm-layout assumes a little-endian host (x86-64, AArch64)");
