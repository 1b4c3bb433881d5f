//! Versioned record templates, evolved SBE-style.
//!
//! A record is a `#[repr(C)]` zerocopy struct. Its fields are only ever appended; each version
//! of the template is a prefix of the struct, described by `(layout version, block length)`.
//! A frame carries the record's layout version and block length, so:
//!
//! - an old reader given a longer block copies the prefix it knows and skips the rest;
//! - a new reader given a shorter block starts from [`Record::defaults`] and copies the prefix
//!   that was sent, so the fields the older writer did not know keep their defaults;
//! - a writer can be told to write an older version: it sends only that version's prefix (how an
//!   upgraded engine speaks to an older one while its new features are off).
//!
//! # Examples
//!
//! ```
//! use shm_layout::record::{decode, encode, Record};
//! use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
//!
//! #[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq)]
//! #[repr(C)]
//! struct Order { id: u64, qty: u64, expiry_ns: u64 /* since v2 */ }
//!
//! impl Record for Order {
//!     const TYPE_ID: u16 = 10;
//!     const NAME: &'static str = "order";
//!     const VERSIONS: &'static [(u16, u16)] = &[(1, 16), (2, 24)];
//!     fn defaults() -> Self { Order { id: 0, qty: 0, expiry_ns: u64::MAX } }
//! }
//! shm_layout::assert_record_layout!(Order);
//!
//! let o = Order { id: 7, qty: 100, expiry_ns: 5 };
//! let mut buf = [0u8; 64];
//! let v1 = encode(&o, 1, &mut buf).unwrap();            // written as version 1: 16 bytes
//! assert_eq!(v1.len(), 16);
//! let back: Order = decode(&buf[..16], 16).unwrap();    // a v2 reader fills the default
//! assert_eq!(back, Order { id: 7, qty: 100, expiry_ns: u64::MAX });
//! ```

use std::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// A versioned record template.
pub trait Record: FromBytes + IntoBytes + Immutable + KnownLayout + Copy + Sized {
    /// The record type id carried in the frame header.
    const TYPE_ID: u16;
    /// The template's name (part of its fingerprint).
    const NAME: &'static str;
    /// Every layout version with its block length, ascending; the last one is this struct
    /// (its block length equals `size_of::<Self>()`; check with [`assert_record_layout!`](crate::assert_record_layout)).
    const VERSIONS: &'static [(u16, u16)];
    /// The value of every field for a reader whose writer did not send it.
    fn defaults() -> Self;
}

/// Compile-time checks that a template's version table is well formed: versions ascend,
/// block lengths ascend, and the newest block length is the struct's size.
#[macro_export]
macro_rules! assert_record_layout {
    ($t:ty) => {
        const _: () = {
            let v = <$t as $crate::record::Record>::VERSIONS;
            assert!(!v.is_empty(), "a record needs at least one version");
            let mut i = 1;
            while i < v.len() {
                assert!(v[i].0 > v[i - 1].0, "record versions must ascend");
                assert!(v[i].1 >= v[i - 1].1, "fields are only appended");
                i += 1;
            }
            assert!(
                v[v.len() - 1].1 as usize == ::core::mem::size_of::<$t>(),
                "newest block length must equal the struct size"
            );
            assert!(
                ::core::mem::align_of::<$t>() <= 8,
                "records align to at most 8"
            );
        };
    };
}

/// A record that cannot be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The template has no such layout version.
    UnknownVersion {
        /// The template.
        record: &'static str,
        /// The version asked for.
        found: u16,
        /// The versions it has.
        known: Vec<u16>,
    },
    /// The output buffer is too small.
    BufferTooSmall {
        /// Needed.
        expected: usize,
        /// Given.
        found: usize,
    },
    /// The block length in the frame is larger than the bytes that arrived.
    Truncated {
        /// The template.
        record: &'static str,
        /// Block length announced.
        block_length: u16,
        /// Bytes present.
        found: usize,
    },
    /// The block is shorter than the template's first version: not this record.
    TooShort {
        /// The template.
        record: &'static str,
        /// The smallest block length it accepts.
        expected: u16,
        /// Block length found.
        found: u16,
    },
    /// The frame carries another record type.
    WrongType {
        /// The template.
        record: &'static str,
        /// Its type id.
        expected: u16,
        /// Type id found.
        found: u16,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::UnknownVersion {
                record,
                found,
                known,
            } => write!(
                f,
                "record `{record}`: expected one of layout versions {known:?}, found {found}"
            ),
            RecordError::BufferTooSmall { expected, found } => write!(
                f,
                "record buffer: expected at least {expected} bytes, found {found}"
            ),
            RecordError::Truncated {
                record,
                block_length,
                found,
            } => write!(
                f,
                "record `{record}`: expected the block length's {block_length} bytes, found {found} bytes present"
            ),
            RecordError::TooShort {
                record,
                expected,
                found,
            } => write!(
                f,
                "record `{record}`: expected a block of at least {expected} bytes, found {found}"
            ),
            RecordError::WrongType {
                record,
                expected,
                found,
            } => write!(
                f,
                "record `{record}`: expected type id {expected}, found {found}"
            ),
        }
    }
}
impl std::error::Error for RecordError {}

/// The newest layout version of `R`.
pub fn latest_version<R: Record>() -> u16 {
    R::VERSIONS[R::VERSIONS.len() - 1].0
}

/// The oldest layout version of `R`.
pub fn oldest_version<R: Record>() -> u16 {
    R::VERSIONS[0].0
}

/// The block length of `R` at `version`, if `R` has that version.
pub fn block_length<R: Record>(version: u16) -> Option<u16> {
    R::VERSIONS
        .iter()
        .find(|(v, _)| *v == version)
        .map(|(_, b)| *b)
}

/// The newest version of `R` that is not newer than `max_version` (what a writer uses when the
/// peers agreed on `max_version`).
pub fn version_at_most<R: Record>(max_version: u16) -> Option<u16> {
    R::VERSIONS
        .iter()
        .rev()
        .find(|(v, _)| *v <= max_version)
        .map(|(v, _)| *v)
}

/// Write `rec` as layout `version` into `out`; returns the bytes written (the block).
pub fn encode<'a, R: Record>(
    rec: &R,
    version: u16,
    out: &'a mut [u8],
) -> Result<&'a [u8], RecordError> {
    let bl = block_length::<R>(version).ok_or_else(|| RecordError::UnknownVersion {
        record: R::NAME,
        found: version,
        known: R::VERSIONS.iter().map(|(v, _)| *v).collect(),
    })? as usize;
    if out.len() < bl {
        return Err(RecordError::BufferTooSmall {
            expected: bl,
            found: out.len(),
        });
    }
    out[..bl].copy_from_slice(&rec.as_bytes()[..bl]);
    Ok(&out[..bl])
}

/// The bytes of `rec` as layout `version` (a prefix of its bytes: no copy).
pub fn encoded<R: Record>(rec: &R, version: u16) -> Result<&[u8], RecordError> {
    let bl = block_length::<R>(version).ok_or_else(|| RecordError::UnknownVersion {
        record: R::NAME,
        found: version,
        known: R::VERSIONS.iter().map(|(v, _)| *v).collect(),
    })? as usize;
    Ok(&rec.as_bytes()[..bl])
}

/// Read an `R` from `bytes` whose block is `block_length` long: a longer block's unknown
/// trailing bytes are skipped, a shorter block's missing fields keep [`Record::defaults`].
/// Validates lengths; never panics on any input.
pub fn decode<R: Record>(bytes: &[u8], block_length: u16) -> Result<R, RecordError> {
    let bl = block_length as usize;
    if bl > bytes.len() {
        return Err(RecordError::Truncated {
            record: R::NAME,
            block_length,
            found: bytes.len(),
        });
    }
    let min = R::VERSIONS[0].1;
    if block_length < min {
        return Err(RecordError::TooShort {
            record: R::NAME,
            expected: min,
            found: block_length,
        });
    }
    let size = core::mem::size_of::<R>();
    if bl >= size {
        return R::read_from_bytes(&bytes[..size]).map_err(|_| RecordError::Truncated {
            record: R::NAME,
            block_length,
            found: bytes.len(),
        });
    }
    let mut rec = R::defaults();
    rec.as_mut_bytes()[..bl].copy_from_slice(&bytes[..bl]);
    Ok(rec)
}

/// A template's fingerprint: FNV-1a over its name, type id, size, alignment and version table.
/// Two peers compare fingerprints per (type, version) at attach time; a mismatch means the same
/// record was laid out differently by the two builds.
pub fn fingerprint<R: Record>() -> u64 {
    let mut h = Fnv::new();
    h.bytes(R::NAME.as_bytes());
    h.bytes(&R::TYPE_ID.to_le_bytes());
    h.bytes(&(core::mem::size_of::<R>() as u64).to_le_bytes());
    h.bytes(&(core::mem::align_of::<R>() as u64).to_le_bytes());
    for (v, b) in R::VERSIONS {
        h.bytes(&v.to_le_bytes());
        h.bytes(&b.to_le_bytes());
    }
    h.finish()
}

/// The fingerprint of `R` as seen by a peer that only knows layouts up to `version`: covers the
/// versions up to it, so an old and a new build of a template agree on their common prefix.
pub fn fingerprint_at<R: Record>(version: u16) -> u64 {
    let mut h = Fnv::new();
    h.bytes(R::NAME.as_bytes());
    h.bytes(&R::TYPE_ID.to_le_bytes());
    for (v, b) in R::VERSIONS.iter().filter(|(v, _)| *v <= version) {
        h.bytes(&v.to_le_bytes());
        h.bytes(&b.to_le_bytes());
    }
    h.finish()
}

/// FNV-1a, 64-bit.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Fnv {
    /// A fresh hasher.
    pub const fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    /// Hash more bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    /// The hash.
    pub fn finish(self) -> u64 {
        self.0
    }
}

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

/// What a peer declares about one template at attach time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, IntoBytes, FromBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct TemplateInfo {
    /// Record type id.
    pub type_id: u16,
    /// Oldest layout version it reads and writes.
    pub min_version: u16,
    /// Newest layout version it reads and writes.
    pub max_version: u16,
    /// Padding, zero.
    pub _pad: u16,
    /// `fingerprint_at(min_version)`: the common prefix every peer must agree on.
    pub base_fingerprint: u64,
}

const _: () = assert!(core::mem::size_of::<TemplateInfo>() == 16);

impl TemplateInfo {
    /// The declaration of `R`.
    pub fn of<R: Record>() -> Self {
        TemplateInfo {
            type_id: R::TYPE_ID,
            min_version: oldest_version::<R>(),
            max_version: latest_version::<R>(),
            _pad: 0,
            base_fingerprint: fingerprint_at::<R>(oldest_version::<R>()),
        }
    }
}
