//! shm-layout: the bytes understudy keeps in shared memory.
//!
//! This layer knows the layout of a region file (a superblock and a ring), the frame format,
//! the versioned record templates, and the single-producer/single-consumer ring that moves
//! frames from the active engine to the standby. It knows nothing of engines, roles, clusters
//! or policy: no processes, no I/O beyond mapping a file.
//!
//! - [`region`]: create, open and validate a region file under /dev/shm.
//! - [`ring`]: the SPSC ring of variable-length frames with batch publish.
//! - [`frame`]: the 32-byte frame header and its checksum.
//! - [`record`]: versioned zerocopy record templates and their fingerprints.
//! - [`memory`]: the raw word region the ring runs over (a heap buffer in loom models).
//! - [`trust`]: the trust boundary: private directories and files (owner, mode, no links).
//!
//! Everything read from shared memory is untrusted: each header word is read once into a local
//! and sequence, lengths, flags and the checksum the batch carries are checked before any view
//! is made. Then the rule is by peer: the replication stream comes from the engine's own peer
//! and is read in place ([`ring::Consumer::read_batch`]: views valid until the next release);
//! what crosses from a client (ingress) is copied out first ([`ring::Consumer::poll`]), since a
//! view would let a misbehaving client change bytes the handler already decided on. Integrity
//! checksums are per frame, per batch or off ([`ring::Integrity`]); a consumer requires them by
//! default, and client rings keep them.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod frame;
pub mod memory;
pub mod record;
pub mod region;
pub mod ring;
mod sync;
pub mod trust;

pub use sync::{AtomicU64, Ordering};
