//! The frame: a 32-byte header followed by the payload, padded to 32 bytes.
//!
//! ```text
//! word 0  commit   seq_lo32 << 32 | len        written LAST (Release) for a batch head:
//!                                              len = the whole batch's bytes;
//!                  seq_lo32 << 32 | CONT | len for a frame inside a batch: len = its own bytes
//! word 1  payload_len u32 | record_type u16 << 32 | layout_version u16 << 48
//! word 2  flags u16 | block_length u16 << 16 | checksum u32 << 32
//! word 3  seq u64
//! ```
//!
//! A frame never starts on a word the producer has not zeroed or written in this lap: when a
//! batch commits, the producer zeroes the commit word just past it (before the Release store
//! that publishes the batch), so the consumer reading the next position sees either 0 (nothing
//! yet) or a commit word of this lap — never a leftover from the previous lap. The sequence
//! number in the commit word is a second guard: the consumer knows the exact sequence it expects.

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

const _: () = assert!(HEADER_BYTES == 4 * 8);
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

const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// Running checksum over 64-bit words: two independent multiply-xor lanes so that the
/// dependency chain is half the word count (a 64-byte payload costs ~10 cycles). It detects
/// corruption and misplaced frames, not adversaries: shared memory is written only by our peer.
#[derive(Clone, Copy)]
pub struct Checksum {
    a: u64,
    b: u64,
    odd: bool,
}

impl Checksum {
    /// A checksum seeded with the three checksummed header words.
    #[inline]
    pub fn new(w1: u64, w2_without_sum: u64, seq: u64) -> Self {
        let mut c = Checksum {
            a: K1 ^ w1,
            b: K2 ^ seq,
            odd: false,
        };
        c.add(w2_without_sum);
        c
    }

    /// Add one payload word.
    #[inline(always)]
    pub fn add(&mut self, w: u64) {
        if self.odd {
            self.b = (self.b ^ w).wrapping_mul(K1).rotate_left(29);
        } else {
            self.a = (self.a ^ w).wrapping_mul(K2).rotate_left(31);
        }
        self.odd = !self.odd;
    }

    /// Add two payload words: the same as `add(w0); add(w1)`, with the two lanes' multiplies
    /// independent of each other (and no lane switch to carry between them).
    #[inline(always)]
    pub fn add2(&mut self, w0: u64, w1: u64) {
        if self.odd {
            self.b = (self.b ^ w0).wrapping_mul(K1).rotate_left(29);
            self.a = (self.a ^ w1).wrapping_mul(K2).rotate_left(31);
        } else {
            self.a = (self.a ^ w0).wrapping_mul(K2).rotate_left(31);
            self.b = (self.b ^ w1).wrapping_mul(K1).rotate_left(29);
        }
    }

    /// The 32-bit result.
    #[inline]
    pub fn finish(self) -> u32 {
        let h = (self.a ^ self.b.rotate_left(17)).wrapping_mul(K1);
        (h >> 32) as u32 ^ h as u32
    }
}
