//! The frame: a 32-byte header followed by the payload area, padded to 32 bytes.
//!
//! ```text
//! word 0  commit   seq_lo32 << 32 | len        written LAST (Release) for a batch head:
//!                                              len = the whole batch's bytes;
//!                  seq_lo32 << 32 | CONT | len for a frame inside a batch: len = its own bytes
//! word 1  payload_len u32 | record_type u16 << 32 | layout_version u16 << 48
//! word 2  flags u16 | block_length u16 << 16 | checksum u32 << 32
//! word 3  batch head: the batch's first sequence number (u64); inside a batch: not written
//! then    the payload area: the payload, then zero bytes up to the next 32-byte boundary
//! ```
//!
//! A frame's sequence number is implied by its position: the batch head's is the one the
//! consumer expects next, and each frame after it in the batch adds one. Only the batch head
//! stores it whole (word 3: what a successor reads back after a crash, see
//! `Producer::resume` and `Consumer::torn_tail`); a frame inside a batch stores nothing in
//! word 3 and the consumer does not read it there. The low 32 bits of every frame's sequence
//! stay in its word 0 (the commit word of a head, the continuation stamp of the others): the
//! lap and misplacement guard below.
//!
//! Integrity is chosen per batch by the producer ([`crate::ring::Integrity`]) and written in
//! the flags of the batch head:
//!
//! - per frame (flags without [`FLAG_BATCH_SUM`] / [`FLAG_NO_SUM`], the default): each frame's
//!   checksum covers its words 1, 2 (without the checksum), its sequence number (the implied
//!   one: stored or not, a frame read at another position or sequence fails) and its whole
//!   payload area, zero padding included (a padding frame has no payload area to check);
//! - per batch ([`FLAG_BATCH_SUM`] on the head): one checksum in the head covers the header
//!   words, sequence numbers and payload areas of every frame of the batch in order; the other
//!   frames' checksum fields are 0 (one checksum per transaction instead of one per record);
//! - off ([`FLAG_NO_SUM`] on the head): every checksum field of the batch is 0; the consumer
//!   still checks the structure. A consumer that requires integrity (client rings) refuses it.
//!
//! Layout major 3 added the two batch flags; major 4 (this format) stopped writing word 3 in
//! frames inside a batch. A major-3 reader would take such a frame's stale word 3 for a bad
//! sequence, so the region's major version tells them apart.
//!
//! A frame never starts on a word the producer has not zeroed or written in this lap: the
//! producer zeroes the commit word just past each batch before the Release store that
//! publishes the batch (a one-frame batch while its frame is written, before the head line's
//! last stores), so the consumer reading the next position sees either 0 (nothing yet) or a
//! commit word of this lap — never a leftover from the previous lap. The sequence stamp in the
//! commit word is a second guard, kept although the zeroing suffices for a producer that
//! follows the protocol: the consumer knows the exact sequence it expects, so a word left by a
//! crashed or misbehaving producer (a previous lap's, or one a hostile peer copied from
//! elsewhere in the ring) is refused by name rather than read, at no cost on the hot path (the
//! stamp is part of the one word stored and compared anyway).

/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 32;
/// Frames start on multiples of this; a padding frame always fits in what is left of the buffer.
pub const FRAME_ALIGN: usize = 32;
/// Bit 31 of the commit word's length: this frame continues a batch (it is not a batch head).
pub const COMMIT_CONT: u64 = 1 << 31;
/// Mask of the length in a commit word.
pub const COMMIT_LEN_MASK: u64 = COMMIT_CONT - 1;
/// Record type of a padding frame that fills the buffer's end before a wrap.
pub const PAD_RECORD_TYPE: u16 = 0xFFFF;
/// Frame flag: padding (no payload to read).
pub const FLAG_PAD: u16 = 1;
/// Batch-head flag: the head's checksum covers every frame of the batch; the other frames'
/// checksum fields are 0.
pub const FLAG_BATCH_SUM: u16 = 2;
/// Batch-head flag: no checksum in this batch (every checksum field is 0).
pub const FLAG_NO_SUM: u16 = 4;
/// Flags that only a batch head may carry.
pub const BATCH_FLAGS: u16 = FLAG_BATCH_SUM | FLAG_NO_SUM;

const _: () = assert!(HEADER_BYTES == 4 * 8);
// A payload length read from a frame header is a u32: `frame_bytes` of any of them (at most
// 2^32 + 63) fits in a 64-bit usize, and so does any sum of it with a ring position offset
// within a lap.
const _: () = assert!(usize::BITS == 64, "shm-layout needs a 64-bit target");
const _: () = assert!(FRAME_ALIGN.is_power_of_two() && FRAME_ALIGN >= HEADER_BYTES);

/// Bytes a frame with `payload_len` bytes of payload occupies in the ring.
#[inline]
pub const fn frame_bytes(payload_len: usize) -> usize {
    (HEADER_BYTES + payload_len + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// The commit word of a batch head (`cont == false`) or a continuation frame.
#[inline]
pub const fn commit_word(seq: u64, len: usize, cont: bool) -> u64 {
    ((seq as u32 as u64) << 32) | (len as u64) | if cont { COMMIT_CONT } else { 0 }
}

/// Word 1 of the header.
#[inline]
pub const fn word1(payload_len: u32, record_type: u16, layout_version: u16) -> u64 {
    payload_len as u64 | (record_type as u64) << 32 | (layout_version as u64) << 48
}

/// Word 2 of the header without the checksum.
#[inline]
pub const fn word2(flags: u16, block_length: u16) -> u64 {
    flags as u64 | (block_length as u64) << 16
}

/// Words of a checksum step: a frame's payload area (between its header and the next frame)
/// is a whole number of these, because frames are 32-byte aligned.
pub const CHUNK_WORDS: usize = FRAME_ALIGN / 8;

const _: () = assert!(CHUNK_WORDS == 4 && HEADER_BYTES == CHUNK_WORDS * 8);

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const K3: u64 = 0x1656_67B1_9E37_79F9;
const K4: u64 = 0x27D4_EB2F_1656_67C5;

/// One step of a lane: xor a word in, multiply by an odd constant, rotate. Each of the three is
/// a bijection of the lane state for a given word, and of the word for a given state, so two
/// inputs that differ in one word leave that lane in different states, whatever follows.
#[inline(always)]
const fn step(lane: u64, w: u64, k: u64, r: u32) -> u64 {
    (lane ^ w).wrapping_mul(k).rotate_left(r)
}

/// The frame checksum: four independent multiply-xor-rotate lanes, each fed every fourth word
/// of the sequence (header words 1, 2 without the checksum, the sequence number, a zero word;
/// then the frame's payload area, 32 bytes at a time, zero padding included). Four lanes keep the dependency
/// chain at one step (~5 cycles) per 32 bytes, so a 64-byte payload costs ~15 cycles of latency
/// on each side instead of ~30 with two lanes, and no more instructions per word. It detects
/// corruption, torn and misplaced frames, not adversaries: a peer that wants to forge a frame
/// can compute this as well as we can.
///
/// A difference confined to one word always reaches `finish` (every step is a bijection, and
/// the lanes are combined with xor after rotations that keep a one-lane difference non-zero);
/// `finish` then folds 64 bits to the 32 stored, so a corrupted frame passes with probability
/// about 2^-32.
#[derive(Clone, Copy)]
pub struct Checksum {
    a: u64,
    b: u64,
    c: u64,
    d: u64,
}

impl Checksum {
    /// A checksum seeded with the two checksummed header words and the frame's sequence number
    /// (implied by its position; stored only in a batch head).
    #[inline(always)]
    pub fn new(w1: u64, w2_without_sum: u64, seq: u64) -> Self {
        let mut c = Checksum {
            a: K1,
            b: K2,
            c: K3,
            d: K4,
        };
        c.add4([w1, w2_without_sum, seq, 0]);
        c
    }

    /// Add the next four words of the payload area.
    #[inline(always)]
    pub fn add4(&mut self, w: [u64; CHUNK_WORDS]) {
        // One multiplier for all four lanes: it stays in a register (x86 has no 64-bit
        // immediate multiply); the lanes differ by their seeds and rotations.
        self.a = step(self.a, w[0], K2, 31);
        self.b = step(self.b, w[1], K2, 29);
        self.c = step(self.c, w[2], K2, 27);
        self.d = step(self.d, w[3], K2, 33);
    }

    /// The 32-bit result.
    #[inline(always)]
    pub fn finish(self) -> u32 {
        let h = self.a ^ self.b.rotate_left(16) ^ self.c.rotate_left(32) ^ self.d.rotate_left(48);
        let h = (h ^ (h >> 29)).wrapping_mul(K1);
        (h >> 32) as u32 ^ h as u32
    }
}

/// The checksum of a frame with these header words and payload area (whole chunks), as the
/// producer computes it; for tests that forge or check frames.
pub fn checksum(w1: u64, w2_without_sum: u64, seq: u64, payload_area: &[u64]) -> u32 {
    assert_eq!(payload_area.len() % CHUNK_WORDS, 0, "whole chunks");
    let mut c = Checksum::new(w1, w2_without_sum, seq);
    for w in payload_area.chunks_exact(CHUNK_WORDS) {
        c.add4([w[0], w[1], w[2], w[3]]);
    }
    c.finish()
}
