//! The raw byte region a ring runs over, seen as an array of 64-bit words.
//!
//! Every access to shared memory goes through [`WordMemory::word`], an atomic word: the other
//! process may write the memory at any time, so a plain load would be a data race. Relaxed
//! atomic loads and stores of aligned `u64`s compile to plain moves on x86-64 and AArch64, so this
//! costs nothing, and under `--cfg loom` the same code runs on loom's atomics so the models see
//! (and check) every access, payload words included.

use crate::sync::AtomicU64;
use std::ptr::NonNull;

/// An array of atomic 64-bit words that a ring lives in.
///
/// # Safety
/// `word(i)` must return the same atomic for the same `i` for the memory's whole life, for every
/// `i < len_words()`, and the memory must stay mapped while any handle to it exists.
pub unsafe trait WordMemory {
    /// The number of words.
    fn len_words(&self) -> usize;
    /// Word `i`; panics if `i >= len_words()`.
    fn word(&self, i: usize) -> &AtomicU64;
    /// Word `i` without the bounds check (the ring's hot path, whose indexes are masked into
    /// a range checked once at construction).
    ///
    /// # Safety
    /// `i < len_words()`.
    #[inline(always)]
    unsafe fn word_unchecked(&self, i: usize) -> &AtomicU64 {
        self.word(i)
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

// SAFETY: the boxed slice never moves or shrinks while `self` lives; `word` indexes it.
unsafe impl WordMemory for HeapMemory {
    fn len_words(&self) -> usize {
        self.words.len()
    }
    #[inline]
    fn word(&self, i: usize) -> &AtomicU64 {
        &self.words[i]
    }
}

// SAFETY: the same as for `HeapMemory`; `Arc` keeps the buffer alive for every handle.
unsafe impl<M: WordMemory> WordMemory for std::sync::Arc<M> {
    fn len_words(&self) -> usize {
        (**self).len_words()
    }
    #[inline]
    fn word(&self, i: usize) -> &AtomicU64 {
        (**self).word(i)
    }
    #[inline(always)]
    unsafe fn word_unchecked(&self, i: usize) -> &AtomicU64 {
        // SAFETY: forwarded; the caller guarantees `i < len_words()`.
        unsafe { (**self).word_unchecked(i) }
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

// SAFETY: `base..base+len_words` stays mapped while `_owner` lives (contract of `new`).
unsafe impl<O> WordMemory for MappedWords<O> {
    fn len_words(&self) -> usize {
        self.len_words
    }
    #[inline]
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(
            i < self.len_words,
            "word {i} outside a region of {} words",
            self.len_words
        );
        // SAFETY: `i` is in bounds (checked above), the memory is mapped, 8-byte aligned and
        // only ever accessed atomically, so a shared reference to an atomic is sound.
        unsafe { &*self.base.as_ptr().add(i) }
    }
    #[inline(always)]
    unsafe fn word_unchecked(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.len_words);
        // SAFETY: the caller guarantees `i < len_words`; the memory is mapped, 8-byte aligned
        // and only accessed atomically (see `word`).
        unsafe { &*self.base.as_ptr().add(i) }
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
