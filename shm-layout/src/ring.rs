//! The single-producer, single-consumer ring of variable-length frames.
//!
//! The ring lives in a [`WordMemory`] laid out as four 128-byte control lines and the data area:
//!
//! ```text
//! line 0  producer: head position, head sequence      (written by the producer after a commit)
//! line 1  consumer: tail position, tail sequence      (written by the consumer on release)
//! line 2  consumer may sleep (futex waiting enabled)  (written once by the consumer)
//! line 3  consumer asleep (the futex word)            (consumer sets, producer clears + wakes)
//! data    capacity bytes, a power of two
//! ```
//!
//! Each line is 128 bytes because modern x86 prefetches cache lines in adjacent pairs, so two
//! counters 64 bytes apart still false-share (the same reason as crossbeam's `CachePadded`).
//!
//! Positions are monotonic `u64` byte counters, never wrapped; the offset in the data area is
//! `position & (capacity - 1)`. Every position and sequence number read from the shared memory
//! is untrusted: attach, resume and seek refuse one past [`MAX_POSITION`] / [`MAX_SEQ`] (2^63)
//! by name, and the consumer refuses a batch that would take it past them, so no arithmetic on
//! them overflows (a ring ends after 2^63 bytes: 29 years at 10 GB/s). The consumer does not poll the producer's head: it spins on the
//! commit word of the next frame, so in steady state one cache line moves per record, not two.
//! The producer reads the consumer's tail only when its cached copy says the ring is full.
//!
//! Two ways in and two ways out. A producer copies a payload in with [`Batch::push`] or
//! claims its room and writes the record in place ([`Batch::claim`], [`Batch::push_with`]);
//! either way one Release store (the batch head's commit word) publishes the batch. A consumer
//! copies a batch out with [`Consumer::poll`] (ingress, where a client must not change what
//! was checked; the engine's standby copies too: no dearer for the active, and a copied batch
//! is released before it is applied) or validates
//! it where it lies and gets views ([`Consumer::read_batch`], for a trusted peer whose copy
//! costs more), publishing its position once per burst rather than once per batch.
//!
//! # Examples
//!
//! ```
//! use shm_layout::memory::HeapMemory;
//! use shm_layout::ring::{ring_words, BatchBuf, Consumer, Producer};
//! use std::sync::Arc;
//!
//! let capacity = 4096;
//! let mem = Arc::new(HeapMemory::new(ring_words(capacity)));
//! let mut producer = Producer::create(mem.clone(), capacity).unwrap();
//! let mut consumer = Consumer::attach(mem, capacity).unwrap();
//!
//! let mut batch = producer.batch();
//! batch.push(7, 1, 5, b"hello").unwrap();
//! batch.push(7, 1, 5, b"world").unwrap();
//! batch.commit();
//!
//! let mut buf = BatchBuf::with_capacity(capacity);
//! assert!(consumer.poll(&mut buf).unwrap());
//! let payloads: Vec<&[u8]> = buf.frames().map(|f| f.payload).collect();
//! assert_eq!(payloads, [&b"hello"[..], &b"world"[..]]);
//! ```

use crate::frame::{
    commit_word, frame_bytes, word1, word2, Checksum, BATCH_FLAGS, CHUNK_WORDS, COMMIT_CONT,
    COMMIT_LEN_MASK, FLAG_BATCH_SUM, FLAG_NO_SUM, FLAG_PAD, FRAME_ALIGN, HEADER_BYTES,
    PAD_RECORD_TYPE,
};
use crate::memory::WordMemory;
use crate::sync::{fence, spin_hint, yield_now, AtomicU64, Ordering};
use std::fmt;
use std::time::{Duration, Instant};

/// Words in one control line (128 bytes).
const LINE_WORDS: usize = 16;
const HEAD_POS: usize = 0;
const HEAD_SEQ: usize = 1;
const TAIL_POS: usize = LINE_WORDS;
const TAIL_SEQ: usize = LINE_WORDS + 1;
const MAY_SLEEP: usize = 2 * LINE_WORDS;
const ASLEEP: usize = 3 * LINE_WORDS;
/// First word of the data area.
pub const DATA_WORD: usize = 4 * LINE_WORDS;
/// Bytes of control lines before the data area.
pub const CONTROL_BYTES: usize = DATA_WORD * 8;
/// Smallest data capacity in bytes.
pub const MIN_CAPACITY: usize = 1024;
/// The largest position (byte count) a ring accepts, from shared memory or from a caller. The
/// other process can write any value into the control words and frame headers; one above this
/// is refused with a typed error, so that a position plus a batch length (< 2^31), a header
/// offset or a lap (<= 2^30) never overflows. 2^63 bytes are 29 years of one ring at 10 GB/s
/// (a stream ring lives one epoch).
pub const MAX_POSITION: u64 = 1 << 63;
/// The largest sequence number a ring accepts: a sequence plus the frames of a batch (at most
/// 2^26) never overflows. Every frame takes at least 32 bytes, so a sequence starting at or
/// below this reaches it only after 2^68 bytes.
pub const MAX_SEQ: u64 = 1 << 63;

const _: () = assert!(CONTROL_BYTES == 512);

/// Control word `i` (one of the constants above) of a ring whose memory passed `check()`.
#[inline(always)]
fn control<M: WordMemory>(mem: &M, i: usize) -> &AtomicU64 {
    debug_assert!(i < DATA_WORD);
    let words = mem.words();
    debug_assert!(DATA_WORD <= words.len());
    // SAFETY: `i < DATA_WORD` (callers pass the control-word constants), and `check()` verified
    // `words().len() >= ring_words(capacity) > DATA_WORD`; `WordMemory` guarantees the slice
    // never changes.
    unsafe { words.get_unchecked(i) }
}

/// The data area of a ring of `capacity` bytes whose memory passed `check()`: exactly
/// `capacity / 8` words, a power of two, so a position masked into it needs no bounds check.
#[inline(always)]
fn data_area<M: WordMemory>(mem: &M, capacity: u64) -> &[AtomicU64] {
    let words = mem.words();
    let range = DATA_WORD..DATA_WORD + (capacity >> 3) as usize;
    debug_assert!(range.end <= words.len());
    // SAFETY: both ends' constructors ran `check()`, which verified `words().len() >=
    // ring_words(capacity) = range.end`, and `WordMemory` guarantees the slice never changes.
    unsafe { words.get_unchecked(range) }
}

/// The word of a data area holding byte position `pos` (positions wrap around the area).
#[inline(always)]
fn slot(data: &[AtomicU64], pos: u64) -> &AtomicU64 {
    debug_assert!(data.len().is_power_of_two());
    let i = (pos >> 3) as usize & (data.len() - 1);
    // SAFETY: a data area has `capacity / 8 >= MIN_CAPACITY / 8` words, so `data.len() - 1`
    // does not wrap and `i <= data.len() - 1` (a value masked by `m` is at most `m`).
    unsafe { data.get_unchecked(i) }
}

/// The index in a data area of the word at byte position `pos`.
#[inline(always)]
fn word_index(data: &[AtomicU64], pos: u64) -> usize {
    (pos >> 3) as usize & (data.len() - 1)
}

/// Words of memory a ring with `capacity` data bytes needs.
pub const fn ring_words(capacity: usize) -> usize {
    DATA_WORD + capacity / 8
}

/// The largest batch (all frames, padding included) a ring of `capacity` bytes accepts:
/// one frame slot is always kept free for the zeroed commit word past the last batch.
pub const fn max_batch_bytes(capacity: usize) -> usize {
    capacity - FRAME_ALIGN
}

/// A ring that cannot be set up over the memory given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingError {
    /// Capacity is not a power of two of at least [`MIN_CAPACITY`] bytes.
    BadCapacity {
        /// The capacity given.
        found: usize,
    },
    /// The memory is smaller than the ring needs.
    MemoryTooSmall {
        /// Words needed.
        expected_words: usize,
        /// Words present.
        found_words: usize,
    },
    /// The published positions are inconsistent (more than a lap apart, or a tail past every
    /// committed batch).
    BadPositions {
        /// Producer's head.
        head: u64,
        /// Consumer's tail.
        tail: u64,
    },
    /// A position or sequence number is beyond what a ring ever reaches ([`MAX_POSITION`],
    /// [`MAX_SEQ`]): written by a corrupt or hostile peer.
    OutOfRange {
        /// Which word: "head position", "tail position", "seek position", "sequence" …
        field: &'static str,
        /// The value found.
        found: u64,
        /// The largest value accepted.
        max: u64,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadCapacity { found } => write!(
                f,
                "ring capacity: expected a power of two >= {MIN_CAPACITY} bytes, found {found}"
            ),
            RingError::MemoryTooSmall {
                expected_words,
                found_words,
            } => write!(
                f,
                "ring memory: expected at least {expected_words} words, found {found_words}"
            ),
            RingError::BadPositions { head, tail } => write!(
                f,
                "ring positions: expected head and tail at most one lap (capacity) apart and every released byte committed, found head {head}, tail {tail}"
            ),
            RingError::OutOfRange { field, found, max } => write!(
                f,
                "ring {field}: expected at most {max}, found {found}"
            ),
        }
    }
}
impl std::error::Error for RingError {}

fn check<M: WordMemory>(mem: &M, capacity: usize) -> Result<(), RingError> {
    if !capacity.is_power_of_two() || !(MIN_CAPACITY..=(1 << 30)).contains(&capacity) {
        return Err(RingError::BadCapacity { found: capacity });
    }
    if mem.len_words() < ring_words(capacity) {
        return Err(RingError::MemoryTooSmall {
            expected_words: ring_words(capacity),
            found_words: mem.len_words(),
        });
    }
    Ok(())
}

/// The sequence number of the frame at `pos`: `stored`, unless a committed batch head at `pos`
/// says otherwise. A position and its sequence are published by two stores, so a process
/// killed between them leaves a sequence that does not belong to the position (the sequence is
/// stored first). A committed batch head at the position carries its own sequence: its header's
/// sequence word, confirmed by the stamp in its commit word. Nothing is overwritten there while
/// the position is published: the producer never writes past the consumer's released tail.
///
/// `pos` passed `check_positions` (at most [`MAX_POSITION`], so `pos + 24` does not overflow);
/// the result is a word another process wrote: the caller checks it with `check_seq`.
fn seq_at<M: WordMemory>(mem: &M, capacity: usize, pos: u64, stored: u64) -> u64 {
    debug_assert!(pos <= MAX_POSITION);
    let mask = capacity as u64 - 1;
    let word = |p: u64| mem.word(DATA_WORD + ((p & mask) >> 3) as usize);
    // SYNC POINT: frame committed (Acquire side; Release is in `Batch::commit`).
    let w0 = word(pos).load(Ordering::Acquire);
    if w0 == 0 || w0 & COMMIT_CONT != 0 {
        return stored;
    }
    let header_seq = word(pos + 24).load(Ordering::Relaxed);
    if (w0 >> 32) as u32 == header_seq as u32 {
        header_seq
    } else {
        stored
    }
}

/// Why a frame could not be added to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// No room until the consumer releases more; the batch so far is intact.
    Full {
        /// Bytes the batch would need in all.
        needed_bytes: usize,
        /// Bytes free now.
        free_bytes: usize,
    },
    /// The frame (or the batch with it) can never fit in this ring.
    TooLarge {
        /// Bytes the batch would need.
        needed_bytes: usize,
        /// The most a batch may take.
        max_bytes: usize,
    },
    /// `record_type` 0xFFFF is reserved for padding.
    ReservedType,
}

impl fmt::Display for PushError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PushError::Full {
                needed_bytes,
                free_bytes,
            } => write!(
                f,
                "ring full: batch needs {needed_bytes} bytes, {free_bytes} free"
            ),
            PushError::TooLarge {
                needed_bytes,
                max_bytes,
            } => write!(
                f,
                "batch too large: needs {needed_bytes} bytes, a batch may take at most {max_bytes}"
            ),
            PushError::ReservedType => write!(f, "record type 0xFFFF is reserved for padding"),
        }
    }
}
impl std::error::Error for PushError {}

/// How a producer protects its batches against corruption (see [`crate::frame`]). The consumer
/// checks the structure of every frame whatever the choice; checksums add detection of torn,
/// misplaced or corrupted bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Integrity {
    /// One checksum per frame (the default; what client rings use).
    #[default]
    PerFrame,
    /// One checksum per batch (per transaction), in the batch head.
    PerBatch,
    /// No checksum: for a stream between two engines of the same host and user that wants the
    /// last nanoseconds. A consumer refuses such batches unless told to accept them
    /// ([`Consumer::set_require_integrity`]).
    Off,
}

impl Integrity {
    /// The batch-head flags that announce this choice.
    #[inline(always)]
    const fn head_flags(self) -> u16 {
        match self {
            Integrity::PerFrame => 0,
            Integrity::PerBatch => FLAG_BATCH_SUM,
            Integrity::Off => FLAG_NO_SUM,
        }
    }
}

/// The producing end. Exactly one exists per ring (the type is not `Clone`).
pub struct Producer<M: WordMemory> {
    mem: M,
    capacity: u64,
    head: u64,
    seq: u64,
    cached_tail: u64,
    integrity: Integrity,
    /// Under loom the ring's words are loom atomics, not bytes: a claim is written here and
    /// copied into the ring at its commit (same positions, same stores as production).
    #[cfg(loom)]
    scratch: Vec<u64>,
}

impl<M: WordMemory> Producer<M> {
    /// A producer for a fresh (zeroed) ring.
    pub fn create(mem: M, capacity: usize) -> Result<Self, RingError> {
        check(&mem, capacity)?;
        Ok(Self::at(mem, capacity, 0, 0, 0))
    }

    fn at(mem: M, capacity: usize, head: u64, seq: u64, tail: u64) -> Self {
        Producer {
            mem,
            capacity: capacity as u64,
            head,
            seq,
            cached_tail: tail,
            integrity: Integrity::PerFrame,
            #[cfg(loom)]
            scratch: Vec::new(),
        }
    }

    /// A producer that continues a ring another producer (now dead) wrote: starts at the
    /// published head and walks forward over batches committed after the last head publish.
    pub fn resume(mem: M, capacity: usize) -> Result<Self, RingError> {
        check(&mem, capacity)?;
        // SYNC POINT: head published (Acquire side) and slot released (Acquire side).
        let head = control(&mem, HEAD_POS).load(Ordering::Acquire);
        let seq = control(&mem, HEAD_SEQ).load(Ordering::Acquire);
        let tail = control(&mem, TAIL_POS).load(Ordering::Acquire);
        check_positions(head, tail, capacity)?;
        let seq = seq_at(&mem, capacity, head, seq);
        check_range("sequence", seq, MAX_SEQ)?;
        let mut p = Self::at(mem, capacity, head, seq, tail);
        // A batch can be committed while its head publish was lost to a crash: skip over every
        // committed batch head whose stamp is the next sequence. Every word read here is the
        // other process's: the walk stays within one lap past the tail (head and tail are at
        // most MAX_POSITION, a lap at most 2^30), and each batch adds at most len / 32 frames
        // to a sequence that started at most MAX_SEQ; the additions are checked all the same.
        loop {
            let w = p.word_at(p.head).load(Ordering::Acquire);
            let len = w & COMMIT_LEN_MASK;
            if w == 0
                || w & COMMIT_CONT != 0
                || (w >> 32) as u32 != p.seq as u32
                || len == 0
                || len % FRAME_ALIGN as u64 != 0
                || len > max_batch_bytes(capacity) as u64
            {
                break;
            }
            // As in `Consumer::poll`: a batch that would take the head or the sequence past
            // the limits is not one a consumer would read (the head and the sequence are at
            // most MAX_POSITION and MAX_SEQ here: checked above, kept by this test).
            if len > MAX_POSITION - p.head || len >> 5 > MAX_SEQ - p.seq {
                break;
            }
            let end = p.head + len;
            if end.saturating_sub(p.cached_tail) > p.capacity {
                break;
            }
            // Count the frames of the batch to learn the next sequence number: each takes at
            // least one frame slot, so at most len / 32 of them.
            let mut at = p.head;
            while at < end {
                // `at < end <= MAX_POSITION` and `fb < 2^33`: no overflow.
                let w1 = p.word_at(at + 8).load(Ordering::Relaxed);
                let fb = frame_bytes((w1 & 0xFFFF_FFFF) as usize) as u64;
                at += fb.max(FRAME_ALIGN as u64);
                p.seq += 1;
            }
            p.head = end;
        }
        if p.head < p.cached_tail {
            // The consumer released bytes no committed batch accounts for.
            return Err(RingError::BadPositions {
                head: p.head,
                tail: p.cached_tail,
            });
        }
        p.publish_head();
        Ok(p)
    }

    #[inline(always)]
    fn data(&self) -> &[AtomicU64] {
        data_area(&self.mem, self.capacity)
    }

    #[inline(always)]
    fn word_at(&self, pos: u64) -> &AtomicU64 {
        slot(self.data(), pos)
    }

    /// Choose how the next batches are protected (see [`Integrity`]); per frame by default.
    pub fn set_integrity(&mut self, integrity: Integrity) {
        self.integrity = integrity;
    }

    /// How batches are protected.
    pub fn integrity(&self) -> Integrity {
        self.integrity
    }

    /// The position the next batch will start at.
    pub fn position(&self) -> u64 {
        self.head
    }

    /// The sequence number of the next frame.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// The ring's data capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// The consumer's last released position, read fresh.
    pub fn consumer_position(&mut self) -> u64 {
        // SYNC POINT: slot released (Acquire side; Release is in `Consumer::release_to`).
        let tail = control(&self.mem, TAIL_POS).load(Ordering::Acquire);
        // The consumer may be another, untrusted process: a tail ahead of what we wrote, more
        // than a lap behind, or misaligned is ignored (no new room rather than overwriting).
        if tail >= self.cached_tail
            && tail <= self.head
            && self.head - tail <= self.capacity
            && tail % FRAME_ALIGN as u64 == 0
        {
            self.cached_tail = tail;
        }
        self.cached_tail
    }

    /// Bytes the producer can still write before the consumer releases more.
    pub fn free_bytes(&mut self) -> usize {
        let tail = self.consumer_position();
        (self.capacity - (self.head - tail)) as usize
    }

    /// What [`Batch::push`] of one frame with `payload_len` payload bytes would return as the
    /// first frame of a batch started now: `Ok` if it would be accepted, otherwise the same
    /// error. It counts exactly what `push` counts (the same code): the padding frame that
    /// fills the buffer's end when the frame would run past it, the frame, and the zeroed
    /// commit word past it. Like `push`, it reads the consumer's tail only when the cached one
    /// says there is no room. The room stays: only this producer uses it, so a batch started
    /// next whose first frame has this payload length is accepted.
    ///
    /// ```
    /// use shm_layout::memory::HeapMemory;
    /// use shm_layout::ring::{ring_words, BatchBuf, Consumer, Producer};
    /// use std::sync::Arc;
    ///
    /// let mem = Arc::new(HeapMemory::new(ring_words(1024)));
    /// let mut p = Producer::create(mem.clone(), 1024).unwrap();
    /// let mut c = Consumer::attach(mem, 1024).unwrap();
    /// p.try_publish(1, 1, 0, &[1; 64]).unwrap(); // a frame of 96 bytes: 0..96
    /// p.try_publish(1, 1, 0, &[2; 832]).unwrap(); // 864 bytes: 96..960
    /// assert!(c.poll(&mut BatchBuf::default()).unwrap()); // releases 0..96
    /// assert_eq!((p.position(), p.free_bytes()), (960, 160));
    /// // A 56-byte payload is a frame of 96 bytes, too long for the 64 bytes left before the
    /// // end: 64 bytes of padding, the frame and the zeroed word past it need 192.
    /// assert!(!p.can_push(56));
    /// assert!(p.try_publish(1, 1, 56, &[3; 56]).is_err());
    /// assert!(c.poll(&mut BatchBuf::default()).unwrap()); // releases up to 960
    /// assert!(p.can_push(56));
    /// p.try_publish(1, 1, 56, &[3; 56]).unwrap();
    /// ```
    pub fn check_push(&mut self, payload_len: usize) -> Result<(), PushError> {
        if payload_len > u32::MAX as usize {
            // Far larger than any ring (and `frame_bytes` of it could overflow): what `push`
            // says, with the bytes needed counted without the padding.
            return Err(PushError::TooLarge {
                needed_bytes: payload_len.saturating_add(HEADER_BYTES + FRAME_ALIGN),
                max_bytes: max_batch_bytes(self.capacity as usize),
            });
        }
        let fb = frame_bytes(payload_len) as u64;
        let (_, needed_end) = placement(self.capacity, self.head, fb);
        self.reserve(needed_end)
    }

    /// Would a batch started now accept a first frame of `payload_len` payload bytes? See
    /// [`Producer::check_push`].
    pub fn can_push(&mut self, payload_len: usize) -> bool {
        self.check_push(payload_len).is_ok()
    }

    /// Start a batch: its frames become visible to the consumer together, at [`Batch::commit`].
    pub fn batch(&mut self) -> Batch<'_, M> {
        let start = self.head;
        let seq = self.seq;
        let integrity = self.integrity;
        Batch {
            producer: self,
            start,
            pos: start,
            start_seq: seq,
            seq,
            frames: 0,
            integrity,
            sum: Checksum::new(0, 0, 0),
            head_w2: 0,
        }
    }

    /// Publish one frame as a batch of its own.
    pub fn try_publish(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        payload: &[u8],
    ) -> Result<(), PushError> {
        let mut b = self.batch();
        b.push(record_type, layout_version, block_length, payload)?;
        b.commit();
        Ok(())
    }

    /// Make room up to `needed_end` (the zeroed word past the batch included). The common case
    /// is one comparison against the cached tail; the consumer's line is read only when that
    /// says the ring is full.
    #[inline(always)]
    fn reserve(&mut self, needed_end: u64) -> Result<(), PushError> {
        // Implies the batch is not too large: `cached_tail <= head`, and a batch may take
        // `max_batch_bytes + FRAME_ALIGN = capacity` bytes with the zeroed word.
        if needed_end - self.cached_tail <= self.capacity {
            return Ok(());
        }
        self.reserve_slow(needed_end)
    }

    #[cold]
    #[inline(never)]
    fn reserve_slow(&mut self, needed_end: u64) -> Result<(), PushError> {
        let needed = needed_end - self.head;
        if needed > max_batch_bytes(self.capacity as usize) as u64 + FRAME_ALIGN as u64 {
            return Err(PushError::TooLarge {
                needed_bytes: needed as usize,
                max_bytes: max_batch_bytes(self.capacity as usize),
            });
        }
        let tail = self.consumer_position();
        if needed_end - tail <= self.capacity {
            return Ok(());
        }
        Err(PushError::Full {
            needed_bytes: needed as usize,
            free_bytes: (self.capacity - (self.head - tail)) as usize,
        })
    }

    fn publish_head(&self) {
        control(&self.mem, HEAD_SEQ).store(self.seq, Ordering::Relaxed);
        // SYNC POINT: head published (Release; Acquire in `Producer::resume`,
        // `Consumer::attach` and `Consumer::producer_position`). Informational: the read path
        // never depends on it (the consumer follows commit words).
        control(&self.mem, HEAD_POS).store(self.head, Ordering::Release);
    }

    /// Wake a consumer sleeping on the futex; costs a load (and a fence) only when the consumer
    /// has enabled sleeping, and a system call only when it is actually asleep.
    #[inline]
    fn wake_consumer(&self) {
        // MAY_SLEEP goes 0 → 1 before the consumer's first sleep, and 1 → 2 here, once: "a
        // producer has seen it", after which every wake takes the handshake below. Until the
        // consumer sees 2 it sleeps in short slices only, since a commit whose wake read 0
        // wakes nobody.
        match control(&self.mem, MAY_SLEEP).load(Ordering::Relaxed) {
            0 => return,
            1 => {
                // SYNC POINT: producer has seen MAY_SLEEP (Release: every commit before this
                // store is visible to a consumer that reads 2 and then fences, in
                // `Consumer::sleep`).
                control(&self.mem, MAY_SLEEP).store(2, Ordering::Release);
            }
            _ => {}
        }
        // SYNC POINT: sleep handshake (producer side). The commit store above and the load of
        // ASLEEP below are ordered by this fence; the consumer stores ASLEEP, fences, then reads
        // the commit word. One of the two sides must see the other's store.
        fence(Ordering::SeqCst);
        if control(&self.mem, ASLEEP).load(Ordering::Relaxed) != 0 {
            control(&self.mem, ASLEEP).store(0, Ordering::Relaxed);
            if let Some(fw) = self.mem.futex_word(ASLEEP) {
                futex_wake(fw);
            }
        }
    }
}

/// Where a frame of `fb` bytes pushed at `pos` goes: the padding frame before it (when the
/// frame would run past the buffer's end; it then starts at the beginning of the buffer), and
/// the end the ring must have room up to: padding, frame and the zeroed commit word of the
/// next batch. [`Batch::push`] and [`Producer::check_push`] both place frames with this.
///
/// `pos` is this producer's own position (it started at 0, or at a published head that
/// `Producer::resume` checked to be at most [`MAX_POSITION`] = 2^63, and only grows by what
/// this producer writes), and `fb` is at most a payload slice's length plus 63: the sum
/// cannot overflow before 2^63 more bytes are written.
#[inline(always)]
fn placement(capacity: u64, pos: u64, fb: u64) -> (u64, u64) {
    let off = pos & (capacity - 1);
    let pad = if off + fb > capacity {
        capacity - off
    } else {
        0
    };
    (pad, pos + pad + fb + FRAME_ALIGN as u64)
}

/// Frames being gathered into one batch; nothing is visible to the consumer until `commit`.
/// Dropping a batch without committing abandons it: the ring is as before.
pub struct Batch<'a, M: WordMemory> {
    producer: &'a mut Producer<M>,
    start: u64,
    pos: u64,
    start_seq: u64,
    seq: u64,
    /// Frames written so far; the first, at `start`, is the batch head (its commit word is
    /// written last, by `commit`).
    frames: u32,
    integrity: Integrity,
    /// The running checksum of the batch so far ([`Integrity::PerBatch`]).
    sum: Checksum,
    /// The head's word 2 without its checksum ([`Integrity::PerBatch`]: the sum is stored by
    /// `commit`).
    head_w2: u64,
}

/// Room for one frame claimed in a batch ([`Batch::claim`]): write the payload in place, then
/// [`Claim::commit`]. The payload area holds whatever an earlier lap left there: write every
/// byte the record needs. Dropping a claim without committing abandons the frame (the batch is
/// as before the claim).
pub struct Claim<'b, 'a, M: WordMemory> {
    batch: &'b mut Batch<'a, M>,
    record_type: u16,
    layout_version: u16,
    block_length: u16,
    len: usize,
    /// Padding before the frame (when the frame would run past the buffer's end).
    pad: u64,
    fb: u64,
}

impl<M: WordMemory> Claim<'_, '_, M> {
    /// The payload bytes, in the ring (`len` bytes as claimed).
    #[inline(always)]
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        #[cfg(loom)]
        {
            let len = self.len;
            let words = &mut self.batch.producer.scratch[..];
            &mut zerocopy::IntoBytes::as_mut_bytes(words)[..len]
        }
        #[cfg(not(loom))]
        {
            let data = self.batch.producer.data();
            let i = word_index(data, self.batch.pos + self.pad) + CHUNK_WORDS;
            debug_assert!(i * 8 + self.len <= data.len() * 8);
            // SAFETY: `claim` placed the frame at `pos + pad` so that it ends at or before the
            // buffer's end, and its payload area (`fb - 32 >= len` bytes from word `i`) lies in
            // room the consumer released and that no committed frame covers: neither end
            // accesses these bytes until this producer commits them (the consumer reads a frame
            // only after the Release store of its batch's commit word). The words are
            // `AtomicU64`s (an `UnsafeCell` each), so writing them through a pointer derived
            // from the shared slice is allowed; the slice lives as long as `&mut self`, which
            // `commit` consumes, so no atomic access of this producer overlaps it. `WordMemory`
            // keeps the memory mapped and in place while the producer lives.
            unsafe {
                std::slice::from_raw_parts_mut((data.as_ptr().add(i) as *mut u8).cast(), self.len)
            }
        }
    }

    /// The payload as a typed record in place, when `R` fits in it (its size at most the
    /// claimed length; the payload area is 32-byte aligned in the ring).
    #[inline(always)]
    pub fn record_mut<R>(&mut self) -> Option<&mut R>
    where
        R: zerocopy::FromBytes + zerocopy::IntoBytes + zerocopy::KnownLayout,
    {
        R::mut_from_prefix(self.bytes_mut()).ok().map(|(r, _)| r)
    }

    /// Add the frame to the batch (visible to the consumer at the batch's commit).
    #[inline(always)]
    pub fn commit(self) {
        let b = self.batch;
        if self.pad > 0 {
            b.write_padding(self.pad);
        }
        b.finish_claimed(
            self.record_type,
            self.layout_version,
            self.block_length,
            self.len,
            self.fb,
        );
    }
}

/// What a committed batch took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Position of the batch's first frame.
    pub start: u64,
    /// Position just past the batch.
    pub end: u64,
    /// Sequence number of its first frame.
    pub first_seq: u64,
    /// Frames in it (padding included).
    pub frames: u32,
}

impl<'a, M: WordMemory> Batch<'a, M> {
    /// Frames pushed so far.
    pub fn len(&self) -> usize {
        self.frames as usize
    }

    /// No frame pushed yet.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Bytes the batch takes so far.
    pub fn bytes(&self) -> usize {
        (self.pos - self.start) as usize
    }

    /// Append a frame whose payload is `payload`; `block_length` is the fixed-block length of
    /// the record in it (see [`crate::record`]).
    #[inline(always)]
    pub fn push(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        payload: &[u8],
    ) -> Result<(), PushError> {
        if record_type == PAD_RECORD_TYPE {
            return Err(PushError::ReservedType);
        }
        let fb = frame_bytes(payload.len()) as u64;
        let (pad, needed_end) = placement(self.producer.capacity, self.pos, fb);
        self.producer.reserve(needed_end)?;
        if pad > 0 {
            self.write_padding(pad);
        }
        self.write_frame(record_type, layout_version, block_length, payload, fb);
        Ok(())
    }

    /// Append a zerocopy record as one frame.
    #[inline]
    pub fn push_record<R: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        record_type: u16,
        layout_version: u16,
        record: &R,
    ) -> Result<(), PushError> {
        let bytes = record.as_bytes();
        self.push(record_type, layout_version, bytes.len() as u16, bytes)
    }

    /// Move past the frame just written.
    #[inline(always)]
    fn advance(&mut self, fb: u64) {
        self.pos += fb;
        self.seq += 1;
        self.frames += 1;
    }

    /// A padding frame of `fb` bytes that fills the buffer to its end (no payload is written
    /// or checksummed).
    #[cold]
    fn write_padding(&mut self, fb: u64) {
        let w1 = word1((fb as usize - HEADER_BYTES) as u32, PAD_RECORD_TYPE, 0);
        let w2 = word2(self.flags(FLAG_PAD), 0);
        let sum = self.sum_start(w1, w2);
        let w2 = self.sum_end(w2, sum);
        let data = self.producer.data();
        let i = word_index(data, self.pos);
        let header = &data[i..i + CHUNK_WORDS];
        store_header(header, w1, w2, self.seq, fb, self.frames == 0);
        self.advance(fb);
    }

    /// A frame's flags: the batch head also carries the batch's integrity choice.
    #[inline(always)]
    fn flags(&self, flags: u16) -> u16 {
        if self.frames == 0 {
            flags | self.integrity.head_flags()
        } else {
            flags
        }
    }

    /// The checksum state a frame with header words `w1`, `w2` (no checksum) starts from: a
    /// fresh one per frame, or the batch's running one ([`Integrity::PerBatch`]).
    #[inline(always)]
    fn sum_start(&self, w1: u64, w2: u64) -> Checksum {
        if self.integrity == Integrity::PerBatch && self.frames != 0 {
            let mut c = self.sum;
            c.add4([w1, w2, self.seq, 0]);
            c
        } else {
            Checksum::new(w1, w2, self.seq)
        }
    }

    /// Word 2 as stored for a frame whose checksum state after its payload area is `sum`: its
    /// own checksum per frame; per batch, the head's holds the sum of the batch so far (its
    /// own), the other frames' 0 (`commit` stores the whole batch's sum in the head); off, 0.
    #[inline(always)]
    fn sum_end(&mut self, w2: u64, sum: Checksum) -> u64 {
        sum_end(
            self.integrity,
            self.frames == 0,
            (&mut self.sum, &mut self.head_w2),
            w2,
            sum,
        )
    }

    /// Reserve room for a frame of `len` payload bytes and hand out its payload area in the
    /// ring to write the record in place ([`Claim::bytes_mut`], [`Claim::record_mut`]); the
    /// frame joins the batch at [`Claim::commit`] (dropping the claim abandons it). Checks and
    /// errors are those of [`Batch::push`].
    ///
    /// ```
    /// use shm_layout::memory::HeapMemory;
    /// use shm_layout::ring::{ring_words, Consumer, Producer};
    /// use std::sync::Arc;
    ///
    /// let mem = Arc::new(HeapMemory::new(ring_words(1024)));
    /// let mut p = Producer::create(mem.clone(), 1024).unwrap();
    /// let mut c = Consumer::attach(mem, 1024).unwrap();
    /// let mut batch = p.batch();
    /// let mut claim = batch.claim(7, 1, 5, 5).unwrap();
    /// claim.bytes_mut().copy_from_slice(b"hello");
    /// claim.commit();
    /// batch.commit();
    /// let view = c.read_batch().unwrap().unwrap();
    /// assert_eq!(view.frames().next().unwrap().payload, b"hello");
    /// ```
    #[inline(always)]
    pub fn claim(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        len: usize,
    ) -> Result<Claim<'_, 'a, M>, PushError> {
        if record_type == PAD_RECORD_TYPE {
            return Err(PushError::ReservedType);
        }
        if len > u32::MAX as usize {
            return Err(PushError::TooLarge {
                needed_bytes: len.saturating_add(HEADER_BYTES + FRAME_ALIGN),
                max_bytes: max_batch_bytes(self.producer.capacity as usize),
            });
        }
        let fb = frame_bytes(len) as u64;
        let (pad, needed_end) = placement(self.producer.capacity, self.pos, fb);
        self.producer.reserve(needed_end)?;
        if self.frames == 0 && pad == 0 {
            // The batch's end if no frame follows it (as in `write_frame`), zeroed before the
            // caller writes the payload: that word's line (when it is not the head's) is then
            // taken from the consumer before the payload's stores, not between them and the
            // header's, so the head line a caught-up consumer spins on is written in one burst
            // more often. The word lies in the room just reserved (`needed_end` counts it) and
            // no batch is committed there; a dropped claim leaves a zero in free room.
            slot(self.producer.data(), self.pos + fb).store(0, Ordering::Relaxed);
        }
        #[cfg(loom)]
        {
            let s = &mut self.producer.scratch;
            s.clear();
            s.resize(((fb as usize) - HEADER_BYTES) / 8, 0);
        }
        Ok(Claim {
            batch: self,
            record_type,
            layout_version,
            block_length,
            len,
            pad,
            fb,
        })
    }

    /// Claim room for a frame of `len` payload bytes, let `fill` write them in place, and add
    /// the frame to the batch.
    #[inline(always)]
    pub fn push_with(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), PushError> {
        let mut c = self.claim(record_type, layout_version, block_length, len)?;
        fill(c.bytes_mut());
        c.commit();
        Ok(())
    }

    /// The frame of a claim at `self.pos` (its payload already in the ring): zero the bytes
    /// past the payload in its last word, checksum the payload area if the batch's integrity
    /// asks for it, then store the header.
    #[inline(always)]
    fn finish_claimed(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        len: usize,
        fb: u64,
    ) {
        let w1 = word1(len as u32, record_type, layout_version);
        let w2 = word2(self.flags(0), block_length);
        let mut sum = self.sum_start(w1, w2);
        let summing = self.integrity != Integrity::Off;
        #[cfg(loom)]
        let scratch = std::mem::take(&mut self.producer.scratch);
        let data = self.producer.data();
        let i = word_index(data, self.pos);
        // In bounds: `claim` placed the frame so that it ends at or before the buffer's end.
        let area = &data[i + CHUNK_WORDS..i + (fb >> 3) as usize];
        #[cfg(loom)]
        for (d, w) in area.iter().zip(&scratch) {
            d.store(*w, Ordering::Relaxed);
        }
        #[cfg(not(loom))]
        {
            // The words past the payload are checksummed and must hold no stale bytes of an
            // earlier lap: the partial last word keeps only the payload's bytes, the rest is 0.
            let full = len / 8;
            if len % 8 != 0 {
                let keep = (1u64 << (8 * (len % 8))) - 1;
                let w = area[full].load(Ordering::Relaxed);
                area[full].store(w & keep, Ordering::Relaxed);
            }
            for w in &area[len.div_ceil(8)..] {
                w.store(0, Ordering::Relaxed);
            }
        }
        if summing {
            for s in area.chunks_exact(CHUNK_WORDS) {
                sum.add4([
                    s[0].load(Ordering::Relaxed),
                    s[1].load(Ordering::Relaxed),
                    s[2].load(Ordering::Relaxed),
                    s[3].load(Ordering::Relaxed),
                ]);
            }
        }
        // A head frame's batch end was zeroed by `claim` (a frame after padding is not a head:
        // `commit` zeroes its batch's end).
        let w2 = self.sum_end(w2, sum);
        let data = self.producer.data();
        let header = &data[i..i + CHUNK_WORDS];
        store_header(header, w1, w2, self.seq, fb, self.frames == 0);
        #[cfg(loom)]
        {
            self.producer.scratch = scratch;
        }
        self.advance(fb);
    }

    /// The frame at `self.pos`: payload area first, header words last. The payload area is
    /// whole 32-byte chunks; the bytes past the payload in the last chunk are written as zeros
    /// (they are checksummed). The checksum runs over the chunks in order, whatever order
    /// they are stored in.
    #[inline(always)]
    fn write_frame(
        &mut self,
        record_type: u16,
        layout_version: u16,
        block_length: u16,
        payload: &[u8],
        fb: u64,
    ) {
        let w1 = word1(payload.len() as u32, record_type, layout_version);
        let w2 = word2(self.flags(0), block_length);
        let mut sum = self.sum_start(w1, w2);
        let summing = self.integrity != Integrity::Off;
        let data = self.producer.data();
        let i = word_index(data, self.pos);
        // In bounds: `push` placed the frame so that it ends at or before the buffer's end.
        let (header, area) = data[i..i + (fb >> 3) as usize].split_at(CHUNK_WORDS);
        // The batch head's line is the one a caught-up consumer spins on: its stores (the
        // first chunk when the frame starts a line, the header, later the commit word) go
        // last and together, after the chunks of the frame's other lines, so that the
        // producer takes that line from the spinning consumer once rather than once per
        // store burst. Measured (two processes, interleaved A/B): one-way latency -5..-10% at
        // 64 B; doing it for every frame of a batch instead cost ~30% of 64 B batch-of-16
        // throughput (stores out of address order), so frames inside a batch go in order.
        let mut chunks = payload.chunks_exact(FRAME_ALIGN);
        let mut slots = area.chunks_exact(CHUNK_WORDS);
        let first = if self.frames != 0 {
            None
        } else {
            match (chunks.next(), slots.next()) {
                (Some(c), Some(s)) => Some((chunk_words(c), s)),
                (None, Some(s)) => Some((last_chunk_words(chunks.remainder()), s)),
                _ => None,
            }
        };
        if let Some((w, _)) = first {
            if summing {
                sum.add4(w);
            }
        }
        for (c, s) in (&mut chunks).zip(&mut slots) {
            let w = chunk_words(c);
            if summing {
                sum.add4(w);
            }
            store_chunk(s, w);
        }
        if let Some(s) = slots.next() {
            // The last, partial chunk (when it is not the first).
            let w = last_chunk_words(chunks.remainder());
            if summing {
                sum.add4(w);
            }
            store_chunk(s, w);
        }
        if self.frames == 0 {
            // The batch's end if no frame follows it (`commit` zeroes the real end otherwise):
            // zeroed now, before the head line's burst rather than between it and the commit
            // word (256 B one-way latency -12..-20%).
            slot(data, self.pos + fb).store(0, Ordering::Relaxed);
        }
        if let Some((w, s)) = first {
            store_chunk(s, w);
        }
        let w2 = sum_end(
            self.integrity,
            self.frames == 0,
            (&mut self.sum, &mut self.head_w2),
            w2,
            sum,
        );
        store_header(header, w1, w2, self.seq, fb, self.frames == 0);
        self.advance(fb);
    }

    /// Publish the batch: all its frames become visible to the consumer at once.
    /// Returns `None` for an empty batch (nothing is written).
    #[inline]
    pub fn commit(self) -> Option<Committed> {
        if self.frames == 0 {
            return None;
        }
        let p = &mut *self.producer;
        let data = p.data();
        // The next batch's commit word must read 0 until that batch commits; it may hold a
        // word from the previous lap. A batch of one frame had it zeroed by `write_frame` (a
        // padding frame never ends a batch: `push` writes it with the frame that follows).
        // Either way the zero is ordered before the commit below by its Release.
        if self.frames > 1 {
            slot(data, self.pos).store(0, Ordering::Relaxed);
        }
        if self.integrity == Integrity::PerBatch && self.frames > 1 {
            // The batch's one checksum, in its head (same line as the commit word below); a
            // one-frame batch's head already holds it (`sum_end`).
            let w2 = self.head_w2 | (self.sum.finish() as u64) << 32;
            slot(data, self.start + 16).store(w2, Ordering::Relaxed);
        }
        let len = (self.pos - self.start) as usize;
        // SYNC POINT: frame committed (Release side; Acquire is in `Consumer::poll`). Every
        // payload, header and continuation word of the batch was stored before this.
        slot(data, self.start).store(commit_word(self.start_seq, len, false), Ordering::Release);
        p.head = self.pos;
        p.seq = self.seq;
        p.publish_head();
        p.wake_consumer();
        Some(Committed {
            start: self.start,
            end: self.pos,
            first_seq: self.start_seq,
            frames: self.frames,
        })
    }
}

/// [`Batch::sum_end`] on the batch's fields (so that it can run while the ring is borrowed).
#[inline(always)]
fn sum_end(
    integrity: Integrity,
    head: bool,
    (batch_sum, head_w2): (&mut Checksum, &mut u64),
    w2: u64,
    sum: Checksum,
) -> u64 {
    match integrity {
        Integrity::PerFrame => w2 | (sum.finish() as u64) << 32,
        Integrity::PerBatch => {
            *batch_sum = sum;
            if head {
                // The batch's sum if it ends with its head (a one-record transaction): stored
                // with the header now, so that `commit` stores nothing more in the head line
                // before the commit word; a batch with more frames stores it again there.
                *head_w2 = w2;
                w2 | (sum.finish() as u64) << 32
            } else {
                w2
            }
        }
        Integrity::Off => w2,
    }
}

/// The header words of a frame of `fb` bytes with sequence `seq` (`w2` with its checksum).
/// A batch head stores its sequence number whole in word 3 (for a successor after a crash;
/// its commit word is stored by `Batch::commit`); a frame inside a batch stores only its
/// continuation stamp (low 32 bits of the sequence), which the head's commit word publishes
/// with it: its sequence is implied by its position.
#[inline(always)]
fn store_header(header: &[AtomicU64], w1: u64, w2: u64, seq: u64, fb: u64, batch_head: bool) {
    header[1].store(w1, Ordering::Relaxed);
    header[2].store(w2, Ordering::Relaxed);
    if batch_head {
        header[3].store(seq, Ordering::Relaxed);
    } else {
        header[0].store(commit_word(seq, fb as usize, true), Ordering::Relaxed);
    }
}

/// The four little-endian words of a 32-byte chunk.
#[inline(always)]
fn chunk_words(c: &[u8]) -> [u64; CHUNK_WORDS] {
    let w = |k: usize| u64::from_le_bytes(c[8 * k..8 * k + 8].try_into().expect("8 bytes"));
    [w(0), w(1), w(2), w(3)]
}

/// The four words of the last, partial chunk of a payload (`0 < rest.len() < 32`), zero
/// padded. Built from word, half, quarter and byte reads rather than a copy into a zeroed
/// buffer, which compiles to a `memcpy` call for a variable length.
#[inline(always)]
fn last_chunk_words(rest: &[u8]) -> [u64; CHUNK_WORDS] {
    debug_assert!(!rest.is_empty() && rest.len() < FRAME_ALIGN);
    let mut w = [0u64; CHUNK_WORDS];
    let mut words = rest.chunks_exact(8);
    for (k, c) in (&mut words).enumerate() {
        w[k] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    let tail = words.remainder();
    let mut last = 0u64;
    let mut at = 0;
    if tail.len() & 4 != 0 {
        last = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
        at = 4;
    }
    if tail.len() & 2 != 0 {
        let h = u16::from_le_bytes(tail[at..at + 2].try_into().expect("2 bytes")) as u64;
        last |= h << (8 * at);
        at += 2;
    }
    if tail.len() & 1 != 0 {
        last |= (tail[at] as u64) << (8 * at);
    }
    if !tail.is_empty() {
        w[(rest.len() / 8) % CHUNK_WORDS] = last;
    }
    w
}

/// Store a chunk's four words into four ring words.
#[inline(always)]
fn store_chunk(s: &[AtomicU64], w: [u64; CHUNK_WORDS]) {
    s[0].store(w[0], Ordering::Relaxed);
    s[1].store(w[1], Ordering::Relaxed);
    s[2].store(w[2], Ordering::Relaxed);
    s[3].store(w[3], Ordering::Relaxed);
}

/// One frame copied out of the ring and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// Its sequence number.
    pub seq: u64,
    /// Position of its header in the ring.
    pub pos: u64,
    /// Record type.
    pub record_type: u16,
    /// Record layout version.
    pub layout_version: u16,
    /// Fixed-block length of the record.
    pub block_length: u16,
    /// Flags.
    pub flags: u16,
    payload_word: u32,
    payload_len: u32,
}

/// A validated frame: its header fields and its payload, in the consumer's own memory.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// The header fields.
    pub meta: FrameMeta,
    /// The payload (exactly the bytes pushed).
    pub payload: &'a [u8],
}

/// A reusable buffer a consumer copies one batch into. Reused across polls, it does not
/// allocate once it has grown to the largest batch.
#[derive(Default)]
pub struct BatchBuf {
    words: Vec<u64>,
    frames: Vec<FrameMeta>,
    start: u64,
    end: u64,
}

impl BatchBuf {
    /// A buffer sized for batches of up to `bytes`.
    pub fn with_capacity(bytes: usize) -> Self {
        BatchBuf {
            words: vec![0; bytes / 8],
            frames: Vec::with_capacity(64),
            start: 0,
            end: 0,
        }
    }

    /// The frames of the last batch read, padding left out.
    pub fn frames(&self) -> impl Iterator<Item = Frame<'_>> + '_ {
        let bytes: &[u8] = zerocopy::IntoBytes::as_bytes(&self.words[..]);
        self.frames.iter().map(move |m| {
            let at = m.payload_word as usize * 8;
            Frame {
                meta: *m,
                payload: &bytes[at..at + m.payload_len as usize],
            }
        })
    }

    /// The number of frames of the last batch read (padding left out).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// No frames.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Position of the batch's first frame.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Position just past the batch.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// A frame that failed validation; the consumer stops at it (its position is unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The commit word at a batch boundary is not a batch head of the expected sequence.
    BadCommit {
        /// Position.
        pos: u64,
        /// Sequence expected there.
        expected_seq: u64,
        /// The commit word found.
        found_word: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A batch head's stored sequence number (word 3) is not the one expected there.
    BadSequence {
        /// Position.
        pos: u64,
        /// Expected.
        expected: u64,
        /// Found.
        found: u64,
    },
    /// A length field is out of bounds.
    BadLength {
        /// Position.
        pos: u64,
        /// Which field.
        field: &'static str,
        /// Value found.
        found: u64,
        /// The bound it broke.
        max: u64,
    },
    /// The batch would take the read position or the sequence numbers past what a ring ever
    /// reaches ([`MAX_POSITION`], [`MAX_SEQ`]).
    OutOfRange {
        /// Position.
        pos: u64,
        /// Which one: "batch end position" or "batch's last sequence" (at most).
        field: &'static str,
        /// Value found.
        found: u64,
        /// The largest value accepted.
        max: u64,
    },
    /// A frame's flags break the batch's rules.
    BadFlags {
        /// Position.
        pos: u64,
        /// The flags found.
        found: u16,
        /// What is wrong with them.
        why: &'static str,
    },
    /// A batch without a checksum ([`Integrity::Off`]) where the consumer requires one
    /// ([`Consumer::set_require_integrity`]).
    Unchecked {
        /// Position of the batch.
        pos: u64,
        /// Sequence of its first frame.
        seq: u64,
    },
    /// The checksum does not match the frame's (or, per batch, the batch's) bytes.
    BadChecksum {
        /// Position.
        pos: u64,
        /// Sequence.
        seq: u64,
        /// Stored.
        stored: u32,
        /// Computed.
        computed: u32,
    },
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::BadCommit {
                pos,
                expected_seq,
                found_word,
                why,
            } => write!(
                f,
                "bad commit word at position {pos}: expected a batch head of sequence {expected_seq}, found {found_word:#018x} ({why})"
            ),
            ReadError::BadSequence {
                pos,
                expected,
                found,
            } => write!(
                f,
                "frame at position {pos}: expected sequence {expected}, found {found}"
            ),
            ReadError::BadLength {
                pos,
                field,
                found,
                max,
            } => write!(
                f,
                "frame at position {pos}: field `{field}` out of bounds: expected at most {max}, found {found}"
            ),
            ReadError::OutOfRange {
                pos,
                field,
                found,
                max,
            } => write!(
                f,
                "batch at position {pos}: `{field}` out of range: expected at most {max}, found {found}"
            ),
            ReadError::BadFlags { pos, found, why } => write!(
                f,
                "frame at position {pos}: flags {found:#06x}: {why}"
            ),
            ReadError::Unchecked { pos, seq } => write!(
                f,
                "batch {seq} at position {pos}: expected a checksum (this consumer requires integrity), found a batch written without one"
            ),
            ReadError::BadChecksum {
                pos,
                seq,
                stored,
                computed,
            } => write!(
                f,
                "frame {seq} at position {pos}: checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ),
        }
    }
}
impl std::error::Error for ReadError {}

/// Where the committed prefix of a dead producer's ring ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// Position just past the last committed batch (the consumer's position once drained).
    pub committed_end: u64,
    /// Sequence number expected there.
    pub next_seq: u64,
    /// The producer had started writing a batch there that it never committed.
    pub uncommitted_bytes_seen: bool,
}

/// How a consumer waits for the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Spin on the commit word: lowest latency, burns a core.
    Spin,
    /// Spin `spins` times, then yield the CPU between polls.
    Backoff {
        /// Polls before yielding.
        spins: u32,
    },
    /// Spin `spins` times, then sleep on a futex the producer wakes (a producer system call
    /// only when the consumer is actually asleep). Falls back to `Backoff` on heap memory.
    Futex {
        /// Polls before sleeping.
        spins: u32,
    },
}

/// The consuming end. Exactly one exists per ring.
pub struct Consumer<M: WordMemory> {
    mem: M,
    capacity: u64,
    pos: u64,
    seq: u64,
    released: u64,
    released_seq: u64,
    auto_release: bool,
    require_integrity: bool,
    /// Read in place and unreleased bytes that make `read_batch` publish the position.
    release_bytes: u64,
    /// The frames of the batch last read in place (grown once, reused).
    views: Vec<FrameMeta>,
    /// Under loom the ring's words are loom atomics, not bytes: a batch read "in place" is
    /// copied here (the protocol checked is the same).
    #[cfg(loom)]
    scratch: Vec<u64>,
}

/// Published positions read from shared memory, validated: both frame-aligned, at most a lap
/// apart. The tail may be ahead of the published head: a producer that died between committing
/// a batch and publishing its head leaves the head behind what the consumer read.
fn check_positions(head: u64, tail: u64, capacity: usize) -> Result<(), RingError> {
    check_range("head position", head, MAX_POSITION)?;
    check_range("tail position", tail, MAX_POSITION)?;
    if head.abs_diff(tail) > capacity as u64
        || head % FRAME_ALIGN as u64 != 0
        || tail % FRAME_ALIGN as u64 != 0
    {
        return Err(RingError::BadPositions { head, tail });
    }
    Ok(())
}

/// `found` (a word another process wrote, or a caller's argument) is at most `max`.
fn check_range(field: &'static str, found: u64, max: u64) -> Result<(), RingError> {
    if found > max {
        return Err(RingError::OutOfRange { field, found, max });
    }
    Ok(())
}

impl<M: WordMemory> Consumer<M> {
    /// A consumer that starts at the last released position (0 for a fresh ring) and releases
    /// each batch as soon as it is copied out.
    pub fn attach(mem: M, capacity: usize) -> Result<Self, RingError> {
        check(&mem, capacity)?;
        let tail = control(&mem, TAIL_POS).load(Ordering::Acquire);
        let seq = control(&mem, TAIL_SEQ).load(Ordering::Acquire);
        let head = control(&mem, HEAD_POS).load(Ordering::Acquire);
        check_positions(head, tail, capacity)?;
        let seq = seq_at(&mem, capacity, tail, seq);
        check_range("sequence", seq, MAX_SEQ)?;
        Ok(Consumer {
            mem,
            capacity: capacity as u64,
            pos: tail,
            seq,
            released: tail,
            released_seq: seq,
            auto_release: true,
            require_integrity: true,
            release_bytes: capacity as u64 / 4,
            // Grows on the first `read_batch`: most consumers (client rings) never call it.
            views: Vec::new(),
            #[cfg(loom)]
            scratch: Vec::new(),
        })
    }

    /// Keep read batches unreleased until [`Consumer::release_to`]: the producer cannot
    /// overwrite them, so a successor can read them again (how ingress survives a crash).
    pub fn set_auto_release(&mut self, on: bool) {
        self.auto_release = on;
    }

    /// Continue reading at `pos` / `seq` (must lie between the released tail and the head),
    /// e.g. at a position replicated from a dead consumer.
    pub fn seek(&mut self, pos: u64, seq: u64) -> Result<(), RingError> {
        check_range("seek position", pos, MAX_POSITION)?;
        check_range("seek sequence", seq, MAX_SEQ)?;
        if pos < self.released || pos - self.released > self.capacity || pos % 32 != 0 {
            return Err(RingError::BadPositions {
                head: pos,
                tail: self.released,
            });
        }
        self.pos = pos;
        self.seq = seq;
        Ok(())
    }

    #[inline(always)]
    fn data(&self) -> &[AtomicU64] {
        data_area(&self.mem, self.capacity)
    }

    #[inline(always)]
    fn word_at(&self, pos: u64) -> &AtomicU64 {
        slot(self.data(), pos)
    }

    /// The position of the next batch to read.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The sequence number of the next frame to read.
    pub fn next_seq(&self) -> u64 {
        self.seq
    }

    /// The producer's published head (for lag reporting; the read path never needs it).
    pub fn producer_position(&self) -> u64 {
        control(&self.mem, HEAD_POS).load(Ordering::Acquire)
    }

    /// Is a batch committed at the read position? (One load; does not validate it.)
    #[inline]
    pub fn has_next(&self) -> bool {
        self.word_at(self.pos).load(Ordering::Relaxed) != 0
    }

    /// Copy the next committed batch into `buf` and validate every frame of it.
    /// `Ok(false)`: nothing committed yet. On error the position does not move.
    ///
    /// This is the read for ingress (client rings): the handler sees the consumer's own copy,
    /// so a misbehaving client cannot change what was checked. The engine's standby reads the
    /// replication stream with it too: reading in place cost the active ~40 ns more per
    /// transaction in the replication bench (a standby that polls sooner pulls the active's
    /// lines sooner).
    #[inline]
    pub fn poll(&mut self, buf: &mut BatchBuf) -> Result<bool, ReadError> {
        let data = data_area(&self.mem, self.capacity);
        let pos = self.pos;
        let Some((end, seq)) = scan_batch::<true>(
            data,
            self.capacity,
            pos,
            self.seq,
            self.require_integrity,
            &mut buf.words,
            &mut buf.frames,
        )?
        else {
            return Ok(false);
        };
        buf.start = pos;
        buf.end = end;
        self.pos = end;
        self.seq = seq;
        if self.auto_release {
            self.release_to(end, seq);
        }
        Ok(true)
    }

    /// Validate the next committed batch in place (the same checks as [`Consumer::poll`]: every
    /// header word read once into locals, positions and lengths checked, the checksum the
    /// batch carries verified) and hand out a view of its frames, payloads in the ring. The
    /// view lives until the next call on this consumer; the bytes it shows stay unreleased
    /// until then, so the producer cannot write them.
    ///
    /// Release is batched: with auto-release on, the consumer publishes its position when
    /// what it has read and not released reaches [`Consumer::set_release_every`] bytes, and
    /// whenever it finds nothing new (so a waiting producer is never kept waiting by an idle
    /// consumer) — once per burst of batches rather than once per batch. `Ok(None)`: nothing
    /// committed yet. On error the position does not move.
    ///
    /// For a peer that is trusted not to change committed frames; ingress is copied with
    /// [`Consumer::poll`] (and so, measured cheaper for the active, is the replication stream).
    #[inline]
    pub fn read_batch(&mut self) -> Result<Option<BatchView<'_>>, ReadError> {
        if self.auto_release && self.pos - self.released >= self.release_bytes {
            self.release_to(self.pos, self.seq);
        }
        let data = data_area(&self.mem, self.capacity);
        let pos = self.pos;
        #[cfg(not(loom))]
        let found = scan_batch::<false>(
            data,
            self.capacity,
            pos,
            self.seq,
            self.require_integrity,
            &mut Vec::new(),
            &mut self.views,
        )?;
        #[cfg(loom)]
        let found = scan_batch::<true>(
            data,
            self.capacity,
            pos,
            self.seq,
            self.require_integrity,
            &mut self.scratch,
            &mut self.views,
        )?;
        let Some((end, seq)) = found else {
            if self.auto_release {
                self.release_to(self.pos, self.seq);
            }
            return Ok(None);
        };
        self.pos = end;
        self.seq = seq;
        #[cfg(not(loom))]
        let base = data_area(&self.mem, self.capacity).as_ptr().cast::<u8>();
        #[cfg(loom)]
        let base = zerocopy::IntoBytes::as_bytes(&self.scratch[..]);
        Ok(Some(BatchView {
            base,
            frames: &self.views,
            start: pos,
            end,
            _ring: std::marker::PhantomData,
        }))
    }

    /// Publish the position once the unreleased bytes read in place reach `bytes` (at least
    /// one frame slot, at most the capacity); the default is a quarter of the capacity.
    pub fn set_release_every(&mut self, bytes: usize) {
        self.release_bytes = (bytes as u64).clamp(FRAME_ALIGN as u64, self.capacity);
    }

    /// Release everything read so far (batches read in place included).
    pub fn release(&mut self) {
        self.release_to(self.pos, self.seq);
    }

    /// Accept batches without a checksum ([`Integrity::Off`])? Refused by default: a client
    /// ring keeps its checksums; a standby that follows an engine configured without them
    /// turns this off.
    pub fn set_require_integrity(&mut self, on: bool) {
        self.require_integrity = on;
    }

    /// Let the producer reuse everything before `pos` (the start of the frame with `seq`).
    pub fn release_to(&mut self, pos: u64, seq: u64) {
        if pos <= self.released {
            return;
        }
        debug_assert!(pos <= self.pos);
        self.released = pos;
        self.released_seq = seq;
        control(&self.mem, TAIL_SEQ).store(seq, Ordering::Relaxed);
        // SYNC POINT: slot released (Release side; Acquire is in `Producer::consumer_position`).
        // Every copy out of the released bytes happened before this store.
        control(&self.mem, TAIL_POS).store(pos, Ordering::Release);
    }

    /// The last released position and sequence.
    pub fn released(&self) -> (u64, u64) {
        (self.released, self.released_seq)
    }

    /// Poll until a batch arrives, waiting as `wait` says, for at most `timeout` (`None`:
    /// forever). `Ok(false)` on timeout.
    pub fn poll_wait(
        &mut self,
        buf: &mut BatchBuf,
        wait: Wait,
        timeout: Option<Duration>,
    ) -> Result<bool, ReadError> {
        let started = Instant::now();
        let mut polls: u32 = 0;
        loop {
            if self.poll(buf)? {
                return Ok(true);
            }
            polls = polls.saturating_add(1);
            if polls % 1024 == 0 {
                if let Some(t) = timeout {
                    if started.elapsed() >= t {
                        return Ok(false);
                    }
                }
            }
            match wait {
                Wait::Spin => spin_hint(),
                Wait::Backoff { spins } => {
                    if polls < spins {
                        spin_hint()
                    } else {
                        yield_now()
                    }
                }
                Wait::Futex { spins } => {
                    if polls < spins {
                        spin_hint();
                    } else if !self.sleep(timeout.map(|t| t.saturating_sub(started.elapsed()))) {
                        yield_now();
                    }
                }
            }
        }
    }

    /// Sleep on the futex until the producer commits; false if futexes are unavailable.
    fn sleep(&self, timeout: Option<Duration>) -> bool {
        let Some(fw) = self.mem.futex_word(ASLEEP) else {
            return false;
        };
        let armed = match control(&self.mem, MAY_SLEEP).load(Ordering::Relaxed) {
            0 => {
                control(&self.mem, MAY_SLEEP).store(1, Ordering::Relaxed);
                false
            }
            m => m >= 2,
        };
        control(&self.mem, ASLEEP).store(1, Ordering::Relaxed);
        // SYNC POINT: sleep handshake (consumer side), pairs with `Producer::wake_consumer`.
        // Also the acquire side of "producer has seen MAY_SLEEP": having read 2 above, the
        // commits made before that store are visible to `has_next` below.
        fence(Ordering::SeqCst);
        if self.has_next() {
            control(&self.mem, ASLEEP).store(0, Ordering::Relaxed);
            return true;
        }
        // No producer has acknowledged MAY_SLEEP yet: a commit may come without a wake, so
        // sleep a short slice (the first sleeps after attaching, or with an idle producer).
        let max = if armed {
            Duration::from_millis(100)
        } else {
            Duration::from_micros(50)
        };
        let slice = timeout.unwrap_or(max).min(max);
        futex_wait(fw, 1, slice);
        control(&self.mem, ASLEEP).store(0, Ordering::Relaxed);
        true
    }

    /// After the producer died: drain what is committed first ([`Consumer::poll`] until it
    /// returns `false`), then ask where the committed prefix ends and whether a torn batch
    /// follows it.
    pub fn torn_tail(&self) -> TornTail {
        // A torn batch leaves its head frame's header written (sequence word = the next
        // sequence, a non-zero length word) while its commit word stays 0.
        // `p <= MAX_POSITION` (attach, seek and `poll` keep it so): no offset below overflows.
        let p = self.pos;
        let seen = self.word_at(p).load(Ordering::Relaxed) == 0
            && self.word_at(p + 24).load(Ordering::Relaxed) == self.seq
            && self.word_at(p + 8).load(Ordering::Relaxed) != 0;
        TornTail {
            committed_end: self.pos,
            next_seq: self.seq,
            uncommitted_bytes_seen: seen,
        }
    }
}

/// What is wrong with the commit word `w0` of the batch head at `pos`.
#[cold]
#[inline(never)]
fn batch_head_error(capacity: u64, pos: u64, seq: u64, w0: u64) -> ReadError {
    let bad = |why| ReadError::BadCommit {
        pos,
        expected_seq: seq,
        found_word: w0,
        why,
    };
    let len = w0 & COMMIT_LEN_MASK;
    if w0 & COMMIT_CONT == 0 && len > MAX_POSITION - pos {
        return ReadError::OutOfRange {
            pos,
            field: "batch end position",
            found: pos.saturating_add(len),
            max: MAX_POSITION,
        };
    }
    if w0 & COMMIT_CONT == 0 && len >> 5 > MAX_SEQ - seq {
        return ReadError::OutOfRange {
            pos,
            field: "batch's last sequence",
            found: seq.saturating_add(len >> 5),
            max: MAX_SEQ,
        };
    }
    if w0 & COMMIT_CONT != 0 {
        return bad("a continuation frame where a batch must start");
    }
    if (w0 >> 32) as u32 != seq as u32 {
        return bad("sequence stamp is not the next sequence");
    }
    let max = max_batch_bytes(capacity as usize) as u64;
    ReadError::BadLength {
        pos,
        field: "batch length",
        found: w0 & COMMIT_LEN_MASK,
        max,
    }
}

/// Validate the batch committed at `pos` whose first frame has sequence `seq0`: `Ok(None)` if
/// nothing is committed there, otherwise the position and sequence just past it, with the
/// metadata of its record frames in `frames`. With `COPY`, each payload area is copied into
/// `words` as it is read (`payload_word` indexes `words`); without, nothing is copied and
/// `payload_word` indexes the ring's data area. Every word of the batch is read once, into
/// locals, and checked before anything is recorded about it.
///
/// One long function on purpose (the only one over 80 lines outside tests): it is the
/// consumer's hot path and its whole argument of safety, every check beside the load it
/// guards, in the order the words are read; split into helpers, the reader would have to
/// follow locals across calls to see that no word from shared memory is read twice.
#[inline(always)]
fn scan_batch<const COPY: bool>(
    data: &[AtomicU64],
    capacity: u64,
    pos: u64,
    seq0: u64,
    require_integrity: bool,
    words: &mut Vec<u64>,
    frames: &mut Vec<FrameMeta>,
) -> Result<Option<(u64, u64)>, ReadError> {
    // SYNC POINT: frame committed (Acquire side; Release is in `Batch::commit`).
    let w0 = slot(data, pos).load(Ordering::Acquire);
    if w0 == 0 {
        return Ok(None);
    }
    let len = w0 & COMMIT_LEN_MASK;
    let max = max_batch_bytes(capacity as usize) as u64;
    // The read position and sequence never pass MAX_POSITION and MAX_SEQ (attach and
    // seek check them, and a batch that would take them past is refused here), so the
    // subtractions do not wrap; a batch has at most `len / 32` frames. Then `pos + len`,
    // every frame position and sequence number in the batch stay within the limits (2^63)
    // and none of the additions below overflows.
    if (w0 & COMMIT_CONT != 0)
        | ((w0 >> 32) as u32 != seq0 as u32)
        | (len == 0)
        | (len % FRAME_ALIGN as u64 != 0)
        | (len > max)
        | (len > MAX_POSITION - pos)
        | (len >> 5 > MAX_SEQ - seq0)
    {
        return Err(batch_head_error(capacity, pos, seq0, w0));
    }
    if COPY {
        // Every frame's payload area fits in the batch's words (grown once, never shrunk).
        let batch_words = (len >> 3) as usize;
        if words.len() < batch_words {
            words.resize(batch_words, 0);
        }
    }
    frames.clear();
    let end = pos + len;
    let mut at = pos;
    let mut seq = seq0;
    let mut out = 0;
    // The batch's integrity, from its head's flags (read once, with the head's header).
    let mut mode = 0u16;
    let mut batch_sum = Checksum::new(0, 0, 0);
    let mut head_stored = 0u32;
    loop {
        // `at` is 32-byte aligned (`pos` is, and every frame length is), so the header's
        // four words never wrap.
        let i = word_index(data, at);
        let header = &data[i..i + CHUNK_WORDS];
        let head = at == pos;
        // The continuation stamp of a frame inside the batch (the commit word for its head).
        let wc = if head {
            w0
        } else {
            header[0].load(Ordering::Relaxed)
        };
        let w1 = header[1].load(Ordering::Relaxed);
        let w2 = header[2].load(Ordering::Relaxed);
        // Only a batch head stores its sequence (word 3); inside a batch the position implies
        // it and the continuation stamp (checked below) carries its low 32 bits.
        let fseq = if head {
            header[3].load(Ordering::Relaxed)
        } else {
            seq
        };
        let payload_len = w1 & 0xFFFF_FFFF;
        let record_type = (w1 >> 32) as u16;
        let flags = w2 as u16;
        let stored = (w2 >> 32) as u32;
        let fb = frame_bytes(payload_len as usize) as u64;
        let room = end - at;
        let to_end = capacity - (at & (capacity - 1));
        if head {
            mode = flags & BATCH_FLAGS;
            if mode == BATCH_FLAGS {
                return Err(ReadError::BadFlags {
                    pos,
                    found: flags,
                    why: "a batch head says both one checksum per batch and none",
                });
            }
            if mode == FLAG_NO_SUM && require_integrity {
                return Err(ReadError::Unchecked { pos, seq: seq0 });
            }
        }
        // Batch flags only on the head; a checksum field only where the batch's integrity
        // puts one (every frame per frame, the head per batch, nowhere when off).
        let flags_ok = head | (flags & BATCH_FLAGS == 0);
        let sum_field_ok = (mode == 0) | (head & (mode == FLAG_BATCH_SUM)) | (stored == 0);
        // One branch for all the checks of a record frame; a padding frame (once a lap)
        // and a frame that fails take the slow path, which names the first check that
        // failed. A continuation stamp must be exactly the word the producer writes: its
        // flag, this frame's sequence and length (`fb <= room < 2^31` keeps the length in
        // its field).
        let valid = (fseq == seq)
            & (head | (wc == commit_word(seq, fb as usize, true)))
            & (fb <= room.min(to_end))
            & (flags & FLAG_PAD == 0)
            & (record_type != PAD_RECORD_TYPE)
            & flags_ok
            & sum_field_ok;
        let is_record = if valid {
            true
        } else {
            if !flags_ok {
                return Err(ReadError::BadFlags {
                    pos: at,
                    found: flags,
                    why: "a batch flag on a frame that is not the batch head",
                });
            }
            if !sum_field_ok {
                return Err(ReadError::BadChecksum {
                    pos: at,
                    seq,
                    stored,
                    computed: 0,
                });
            }
            padding_frame(&FrameWords {
                pos: at,
                batch_head: head,
                seq,
                wc,
                w1,
                w2,
                fseq,
                room,
                to_end,
            })?;
            false
        };
        // The frame's checksum: its own (per frame) or the batch's running one. A padding
        // frame's is its header's alone (its payload area is not written).
        let summing = mode != FLAG_NO_SUM;
        let mut sum = if mode == FLAG_BATCH_SUM && !head {
            let mut c = batch_sum;
            c.add4([w1, w2 & 0xFFFF_FFFF, seq, 0]);
            c
        } else {
            Checksum::new(w1, w2 & 0xFFFF_FFFF, seq)
        };
        if is_record {
            let area = &data[i + CHUNK_WORDS..i + (fb >> 3) as usize];
            if summing || COPY {
                // 32-byte chunks, checksummed (and copied) as they pass; the caller sees only
                // `payload_len` bytes of the area.
                for (k, s) in area.chunks_exact(CHUNK_WORDS).enumerate() {
                    let w = [
                        s[0].load(Ordering::Relaxed),
                        s[1].load(Ordering::Relaxed),
                        s[2].load(Ordering::Relaxed),
                        s[3].load(Ordering::Relaxed),
                    ];
                    if summing {
                        sum.add4(w);
                    }
                    if COPY {
                        let d = out + k * CHUNK_WORDS;
                        words[d..d + CHUNK_WORDS].copy_from_slice(&w);
                    }
                }
            }
            frames.push(FrameMeta {
                seq,
                pos: at,
                record_type,
                layout_version: (w1 >> 48) as u16,
                block_length: (w2 >> 16) as u16,
                flags,
                payload_word: if COPY { out } else { i + CHUNK_WORDS } as u32,
                payload_len: payload_len as u32,
            });
            if COPY {
                out += area.len();
            }
        }
        if mode == 0 {
            let computed = sum.finish();
            if computed != stored {
                return Err(ReadError::BadChecksum {
                    pos: at,
                    seq,
                    stored,
                    computed,
                });
            }
        } else if mode == FLAG_BATCH_SUM {
            batch_sum = sum;
            if head {
                head_stored = stored;
            }
        }
        at += fb;
        seq += 1;
        if at == end {
            break;
        }
    }
    if mode == FLAG_BATCH_SUM {
        let computed = batch_sum.finish();
        if computed != head_stored {
            return Err(ReadError::BadChecksum {
                pos,
                seq: seq0,
                stored: head_stored,
                computed,
            });
        }
    }
    // A batch length cut short at a frame boundary passes every check above. The word just
    // past the batch is 0 or the next batch's head (the producer zeroed it before the
    // commit we acquired and cannot write there again before we release), never a frame
    // stamped as continuing this batch.
    let next = slot(data, end).load(Ordering::Relaxed);
    if (next & COMMIT_CONT != 0) & ((next >> 32) as u32 == seq as u32) {
        return Err(ReadError::BadCommit {
            pos,
            expected_seq: seq0,
            found_word: w0,
            why: "batch length ends inside the batch: the frame past it continues it",
        });
    }
    Ok(Some((end, seq)))
}

/// A batch validated in place ([`Consumer::read_batch`]): its frames' payloads are views into
/// the ring, valid until the next call on the consumer (which may release them).
pub struct BatchView<'a> {
    #[cfg(not(loom))]
    base: *const u8,
    #[cfg(loom)]
    base: &'a [u8],
    frames: &'a [FrameMeta],
    start: u64,
    end: u64,
    _ring: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> BatchView<'a> {
    /// The frames of the batch, padding left out.
    #[inline]
    pub fn frames(&self) -> impl Iterator<Item = Frame<'a>> + '_ {
        self.frames.iter().map(move |m| Frame {
            meta: *m,
            payload: self.payload(m),
        })
    }

    #[inline(always)]
    fn payload(&self, m: &FrameMeta) -> &'a [u8] {
        let at = m.payload_word as usize * 8;
        #[cfg(loom)]
        {
            &self.base[at..at + m.payload_len as usize]
        }
        #[cfg(not(loom))]
        // SAFETY: `scan_batch` checked that the frame's payload area (`payload_len` bytes from
        // data word `payload_word`) lies inside the data area and inside a committed batch that
        // this consumer has not released: the producer writes none of these bytes until the
        // consumer publishes a position past them, which takes `&mut` of the consumer this
        // view borrows for `'a`. The words are atomics (`UnsafeCell`s), read here as plain
        // bytes while no one writes them; `WordMemory` keeps the memory mapped while the
        // consumer lives.
        unsafe {
            std::slice::from_raw_parts(self.base.add(at), m.payload_len as usize)
        }
    }

    /// The number of record frames.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// No record frames (a batch of padding only).
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Position of the batch's first frame.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Position just past the batch.
    pub fn end(&self) -> u64 {
        self.end
    }
}

/// The words of a frame header that failed the consumer's combined check, as it read them.
struct FrameWords {
    pos: u64,
    batch_head: bool,
    seq: u64,
    wc: u64,
    w1: u64,
    w2: u64,
    fseq: u64,
    room: u64,
    to_end: u64,
}

/// The first check a frame header failed, named (off the fast path: `Consumer::poll` makes one
/// combined test and calls this only when it fails; the checks here are the same, in order).
#[cold]
#[inline(never)]
fn frame_error(f: &FrameWords) -> ReadError {
    let &FrameWords {
        pos,
        batch_head,
        seq,
        wc,
        w1,
        w2,
        fseq,
        room,
        to_end,
    } = f;
    let bad_commit = |why| ReadError::BadCommit {
        pos,
        expected_seq: seq,
        found_word: wc,
        why,
    };
    if !batch_head && (wc & COMMIT_CONT == 0 || (wc >> 32) as u32 != seq as u32) {
        return bad_commit("frame inside a batch is not stamped as its continuation");
    }
    if fseq != seq {
        return ReadError::BadSequence {
            pos,
            expected: seq,
            found: fseq,
        };
    }
    let payload_len = w1 & 0xFFFF_FFFF;
    let is_pad = w2 as u16 & FLAG_PAD != 0;
    let fb = frame_bytes(payload_len as usize) as u64;
    if fb > room || (is_pad && fb != to_end) || (!is_pad && fb > to_end) {
        return ReadError::BadLength {
            pos,
            field: "payload length",
            found: payload_len,
            max: room.min(to_end) - HEADER_BYTES as u64,
        };
    }
    if !batch_head && wc & COMMIT_LEN_MASK != fb {
        return bad_commit("continuation stamp's length is not the frame's length");
    }
    if is_pad != ((w1 >> 32) as u16 == PAD_RECORD_TYPE) {
        return ReadError::BadLength {
            pos,
            field: "padding flag",
            found: w2 as u16 as u64,
            max: FLAG_PAD as u64,
        };
    }
    // The combined check failed, so one of the above did; named here only in case they ever
    // drift apart (a frame is still refused, never delivered).
    bad_commit("frame header fails validation")
}

/// The slow path of `Consumer::poll` for a frame that is not a valid record frame: `Ok` if it
/// is a valid padding frame (header checked, nothing to copy), otherwise the error for the
/// first check it fails.
#[cold]
#[inline(never)]
fn padding_frame(f: &FrameWords) -> Result<(), ReadError> {
    let is_pad = f.w2 as u16 & FLAG_PAD != 0;
    let fb = frame_bytes((f.w1 & 0xFFFF_FFFF) as usize) as u64;
    let valid = f.fseq == f.seq
        && (f.batch_head || f.wc == commit_word(f.seq, fb as usize, true))
        && fb <= f.room
        && fb == f.to_end
        && is_pad
        && (f.w1 >> 32) as u16 == PAD_RECORD_TYPE;
    if !valid {
        return Err(frame_error(f));
    }
    // Its checksum is checked by the caller, as the batch's integrity says.
    Ok(())
}

#[cfg(all(target_os = "linux", not(loom)))]
fn futex_wait(word: &std::sync::atomic::AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 in shared memory for the duration of the call;
    // FUTEX_WAIT (not PRIVATE) because the producer is another process.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

#[cfg(all(target_os = "linux", not(loom)))]
fn futex_wake(word: &std::sync::atomic::AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32 in shared memory; waking has no memory effects.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
    }
}

#[cfg(any(not(target_os = "linux"), loom))]
fn futex_wait(_: &std::sync::atomic::AtomicU32, _: u32, _: Duration) {}
#[cfg(any(not(target_os = "linux"), loom))]
fn futex_wake(_: &std::sync::atomic::AtomicU32) {}
