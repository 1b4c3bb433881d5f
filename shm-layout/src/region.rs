//! The region: one file under /dev/shm holding a self-describing superblock and one ring.
//!
//! ```text
//! offset 0     superblock (128 bytes used of a 4096-byte page), below
//! offset 4096  ring control lines (512 bytes), then the ring's data (capacity bytes)
//! ```
//!
//! Superblock words (little-endian u64s, all accessed atomically):
//!
//! | word | field |
//! |---|---|
//! | 0 | magic `USTDYRG1` |
//! | 1 | layout major u16, layout minor u16, record alignment u32 |
//! | 2 | header bytes u32 (4096), control bytes u32 (512) |
//! | 3 | capacity (data bytes, a power of two) |
//! | 4, 5 | region id (128 random bits) |
//! | 6 | epoch |
//! | 7 | creator uid u32, kind u32 |
//! | 8, 9 | producer pid, producer start time |
//! | 10, 11 | consumer pid, consumer start time |
//! | 12 | READY word, written last with Release |
//! | 13 | closed: 0 open, otherwise a reason code set by either side |
//! | 14, 15 | free for the user of the region |
//!
//! The creator fills the superblock while READY is 0 and publishes it by storing READY last;
//! an opener waits (bounded) for READY, then validates every field before trusting any.

use crate::frame::FRAME_ALIGN;
use crate::memory::{MappedWords, WordMemory};
use crate::ring::{ring_words, Consumer, Producer, RingError, CONTROL_BYTES, MIN_CAPACITY};
use crate::sync::Ordering;
use memmap2::{MmapOptions, MmapRaw};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `USTDYRG1` read as a little-endian u64.
pub const MAGIC: u64 = u64::from_le_bytes(*b"USTDYRG1");
/// The value of the READY word once the superblock is complete.
pub const READY: u64 = u64::from_le_bytes(*b"READY!!1");
/// Layout major version: a reader refuses any other. 2: the frame checksum runs four lanes
/// over 32-byte chunks of the payload area, zero padding included (1 ran two lanes over the
/// payload words only), so a reader of 1 would refuse every frame of 2 as corrupt. 3: the
/// integrity of a batch is the producer's choice, in its head's flags (one checksum per
/// frame, one per batch, or none; see [`crate::frame`]), so a reader of 2 would refuse a
/// batch-sum or unchecked batch of 3 as corrupt. 4: a frame inside a batch no longer stores
/// its sequence number (word 3; the position implies it), so a reader of 3 would refuse such
/// a frame's stale word 3 as out of sequence.
pub const LAYOUT_MAJOR: u16 = 4;
/// Layout minor version: additions a major-1 reader can ignore.
pub const LAYOUT_MINOR: u16 = 0;
/// Bytes before the ring: the superblock page.
pub const HEADER_BYTES: usize = 4096;

const W_MAGIC: usize = 0;
const W_VERSION: usize = 1;
const W_SIZES: usize = 2;
const W_CAPACITY: usize = 3;
const W_ID: usize = 4;
const W_EPOCH: usize = 6;
const W_UID_KIND: usize = 7;
const W_PRODUCER: usize = 8;
const W_CONSUMER: usize = 10;
const W_READY: usize = 12;
const W_CLOSED: usize = 13;
const W_USER: usize = 14;
/// Words of the superblock (the rest of its page is zero and unused).
pub const SUPERBLOCK_WORDS: usize = 16;

/// A process's identity as a region stores it, two words: pid and start time (clock ticks since
/// boot, `/proc/<pid>/stat` field 22), so that a reused pid is never mistaken for the same
/// process.
///
/// (Named `IdentityWords`, not `Identity`: the identity itself, with its 32-bit pid and its
/// liveness checks, is the runtime's `liveness::ProcessIdentity`; this layer only stores it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct IdentityWords {
    /// Process id.
    pub pid: u64,
    /// Start time in clock ticks since boot.
    pub start_time: u64,
}

/// The memory a region's ring runs over.
pub type RegionMemory = MappedWords<Arc<MmapRaw>>;

/// What a region holds, as told at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionSpec {
    /// Data bytes of the ring: a power of two.
    pub capacity: usize,
    /// The epoch it belongs to.
    pub epoch: u64,
    /// What the region is for (a tag of the user's choosing, checked on open if asked).
    pub kind: u32,
}

/// A region that cannot be created or opened; every variant names the field, what was
/// expected and what was found.
#[derive(Debug)]
pub enum RegionError {
    /// A system call failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The path is a symbolic link; regions are never opened through one.
    Symlink {
        /// The file.
        path: PathBuf,
    },
    /// The file is not a regular file.
    NotAFile {
        /// The file.
        path: PathBuf,
    },
    /// The file belongs to another user.
    WrongOwner {
        /// The file.
        path: PathBuf,
        /// Our uid.
        expected_uid: u32,
        /// The file's uid.
        found_uid: u32,
    },
    /// The file can be read or written by group or others.
    InsecureMode {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        found_mode: u32,
    },
    /// The file is shorter or longer than its superblock says.
    FileSize {
        /// The file.
        path: PathBuf,
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        found: u64,
    },
    /// A superblock field holds a value this reader does not accept.
    Field {
        /// The file.
        path: PathBuf,
        /// The field's name.
        field: &'static str,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// The creator has not published the superblock within the wait.
    NotReady {
        /// The file.
        path: PathBuf,
        /// How long we waited.
        waited: Duration,
    },
    /// The ring over the region's memory could not be set up.
    Ring {
        /// The file.
        path: PathBuf,
        /// Why.
        source: RingError,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegionError::Io { path, op, source } => {
                write!(f, "region {}: {op} failed: {source}", path.display())
            }
            RegionError::Symlink { path } => write!(
                f,
                "region {}: expected a regular file, found a symbolic link (refusing to follow it)",
                path.display()
            ),
            RegionError::NotAFile { path } => write!(
                f,
                "region {}: expected a regular file, found something else",
                path.display()
            ),
            RegionError::WrongOwner {
                path,
                expected_uid,
                found_uid,
            } => write!(
                f,
                "region {}: field `owner`: expected uid {expected_uid}, found uid {found_uid}; remove the file or run as its owner",
                path.display()
            ),
            RegionError::InsecureMode { path, found_mode } => write!(
                f,
                "region {}: field `mode`: expected 0600, found {found_mode:04o}",
                path.display()
            ),
            RegionError::FileSize {
                path,
                expected,
                found,
            } => write!(
                f,
                "region {}: field `file size`: expected {expected} bytes, found {found}{}",
                path.display(),
                if found < expected { " (truncated)" } else { "" }
            ),
            RegionError::Field {
                path,
                field,
                expected,
                found,
            } => write!(
                f,
                "region {}: field `{field}`: expected {expected}, found {found}",
                path.display()
            ),
            RegionError::NotReady { path, waited } => write!(
                f,
                "region {}: field `ready`: expected the superblock to be published, found it still being initialised after {waited:?}",
                path.display()
            ),
            RegionError::Ring { path, source } => {
                write!(f, "region {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for RegionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegionError::Io { source, .. } => Some(source),
            RegionError::Ring { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A mapped region file.
pub struct Region {
    path: PathBuf,
    map: Arc<MmapRaw>,
    sb: MappedWords<Arc<MmapRaw>>,
    capacity: usize,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> RegionError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ELOOP) {
            RegionError::Symlink {
                path: path.to_owned(),
            }
        } else {
            RegionError::Io {
                path: path.to_owned(),
                op,
                source,
            }
        }
    }
}

fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    // SAFETY: `b` is a valid writable buffer of 16 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 16 {
        // Fall back to time and pid: unique enough for an id that only tells regions apart.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return t ^ ((std::process::id() as u128) << 64);
    }
    u128::from_le_bytes(b)
}

/// The file size of a region with `capacity` data bytes.
pub const fn file_bytes(capacity: usize) -> usize {
    HEADER_BYTES + CONTROL_BYTES + capacity
}

impl Region {
    /// Create a new region file at `path` (which must not exist; never follows a symlink),
    /// mode 0600, with `producer` as its producer, and publish its superblock.
    pub fn create(
        path: &Path,
        spec: RegionSpec,
        producer: IdentityWords,
    ) -> Result<Region, RegionError> {
        if !spec.capacity.is_power_of_two()
            || spec.capacity < MIN_CAPACITY
            || spec.capacity > 1 << 30
        {
            return Err(RegionError::Field {
                path: path.to_owned(),
                field: "capacity",
                expected: format!("a power of two between {MIN_CAPACITY} and 2^30"),
                found: spec.capacity.to_string(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| {
                // O_CREAT | O_EXCL reports a symlink at `path` (even a dangling one) as EEXIST;
                // name it for what it is so the operator knows what to remove.
                let is_link = e.kind() == io::ErrorKind::AlreadyExists
                    && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
                if is_link {
                    RegionError::Symlink {
                        path: path.to_owned(),
                    }
                } else {
                    io_err(path, "create")(e)
                }
            })?;
        // The umask may have narrowed the mode; make it exactly 0600.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path, "chmod"))?;
        file.set_len(file_bytes(spec.capacity) as u64)
            .map_err(io_err(path, "resize"))?;
        let region = Self::map(path, &file, spec.capacity)?;
        let sb = &region.sb;
        let w = |i: usize, v: u64| sb.word(i).store(v, Ordering::Relaxed);
        w(W_MAGIC, MAGIC);
        w(
            W_VERSION,
            LAYOUT_MAJOR as u64 | (LAYOUT_MINOR as u64) << 16 | (FRAME_ALIGN as u64) << 32,
        );
        w(W_SIZES, HEADER_BYTES as u64 | (CONTROL_BYTES as u64) << 32);
        w(W_CAPACITY, spec.capacity as u64);
        let id = random_u128();
        w(W_ID, id as u64);
        w(W_ID + 1, (id >> 64) as u64);
        w(W_EPOCH, spec.epoch);
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        w(W_UID_KIND, uid as u64 | (spec.kind as u64) << 32);
        w(W_PRODUCER, producer.pid);
        w(W_PRODUCER + 1, producer.start_time);
        // SYNC POINT: superblock published (Release side; Acquire is in `Region::open`).
        sb.word(W_READY).store(READY, Ordering::Release);
        Ok(region)
    }

    fn map(path: &Path, file: &File, capacity: usize) -> Result<Region, RegionError> {
        let map = MmapOptions::new()
            .len(file_bytes(capacity))
            .map_raw(file)
            .map_err(io_err(path, "mmap"))?;
        let map = Arc::new(map);
        // SAFETY: the mapping is page-aligned, HEADER_BYTES long at least, shared and writable,
        // and the Arc owner keeps it mapped.
        let sb = unsafe { MappedWords::new(map.as_mut_ptr(), HEADER_BYTES / 8, map.clone()) };
        Ok(Region {
            path: path.to_owned(),
            map,
            sb,
            capacity,
        })
    }

    /// Open an existing region, waiting up to `wait` for its creator to publish it, and
    /// validate every superblock field.
    pub fn open(path: &Path, wait: Duration) -> Result<Region, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err(path, "open"))?;
        let meta = file.metadata().map_err(io_err(path, "stat"))?;
        if !meta.file_type().is_file() {
            return Err(RegionError::NotAFile {
                path: path.to_owned(),
            });
        }
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        if meta.uid() != uid {
            return Err(RegionError::WrongOwner {
                path: path.to_owned(),
                expected_uid: uid,
                found_uid: meta.uid(),
            });
        }
        if meta.mode() & 0o077 != 0 {
            return Err(RegionError::InsecureMode {
                path: path.to_owned(),
                found_mode: meta.mode() & 0o7777,
            });
        }
        let size = meta.len();
        let min = file_bytes(MIN_CAPACITY) as u64;
        if size < min {
            return Err(RegionError::FileSize {
                path: path.to_owned(),
                expected: min,
                found: size,
            });
        }
        // Map only the superblock until it is validated.
        let head = Self::map_prefix(path, &file)?;
        let sb = &head.sb;
        let started = Instant::now();
        loop {
            // SYNC POINT: superblock published (Acquire side; Release is in `Region::create`).
            if sb.word(W_READY).load(Ordering::Acquire) == READY {
                break;
            }
            if started.elapsed() >= wait {
                let magic = sb.word(W_MAGIC).load(Ordering::Relaxed);
                if magic != MAGIC && magic != 0 {
                    return Err(field(path, "magic", hex(MAGIC), hex(magic)));
                }
                if sb.word(W_READY).load(Ordering::Relaxed) != 0 {
                    let r = sb.word(W_READY).load(Ordering::Relaxed);
                    return Err(field(path, "ready", hex(READY), hex(r)));
                }
                return Err(RegionError::NotReady {
                    path: path.to_owned(),
                    waited: started.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // One snapshot of the superblock: every field is validated and used as read once (the
        // other process may still write the words).
        let words: [u64; SUPERBLOCK_WORDS] =
            std::array::from_fn(|i| sb.word(i).load(Ordering::Relaxed));
        let cap = Self::check_superblock(path, &words, size, uid)?;
        drop(head);
        Self::map(path, &file, cap)
    }

    /// Validate a superblock as read from a region file of `file_size` bytes that `uid` opens:
    /// published (READY), magic, layout major version, record alignment, header and control
    /// sizes, capacity (a power of two in range) and the file size it implies, creator uid.
    /// Returns the capacity. Every field is untrusted; a bad one is an error naming it, what
    /// was expected and what was found. Pure: what [`Region::open`] runs on the words it read.
    pub fn check_superblock(
        path: &Path,
        words: &[u64; SUPERBLOCK_WORDS],
        file_size: u64,
        uid: u32,
    ) -> Result<usize, RegionError> {
        let r = |i: usize| words[i];
        let ready = r(W_READY);
        if ready != READY {
            return Err(field(path, "ready", hex(READY), hex(ready)));
        }
        let size = file_size;
        let magic = r(W_MAGIC);
        if magic != MAGIC {
            return Err(field(path, "magic", hex(MAGIC), hex(magic)));
        }
        let v = r(W_VERSION);
        let major = v as u16;
        if major != LAYOUT_MAJOR {
            return Err(field(
                path,
                "layout major version",
                LAYOUT_MAJOR.to_string(),
                major.to_string(),
            ));
        }
        let align = (v >> 32) as u32;
        if align as usize != FRAME_ALIGN {
            return Err(field(
                path,
                "record alignment",
                FRAME_ALIGN.to_string(),
                align.to_string(),
            ));
        }
        let sizes = r(W_SIZES);
        if sizes as u32 as usize != HEADER_BYTES {
            return Err(field(
                path,
                "header bytes",
                HEADER_BYTES.to_string(),
                (sizes as u32).to_string(),
            ));
        }
        if (sizes >> 32) as usize != CONTROL_BYTES {
            return Err(field(
                path,
                "control bytes",
                CONTROL_BYTES.to_string(),
                (sizes >> 32).to_string(),
            ));
        }
        let cap = r(W_CAPACITY);
        if !cap.is_power_of_two() || cap < MIN_CAPACITY as u64 || cap > 1 << 30 {
            return Err(field(
                path,
                "capacity",
                format!("a power of two between {MIN_CAPACITY} and 2^30"),
                cap.to_string(),
            ));
        }
        let expected = file_bytes(cap as usize) as u64;
        if size != expected {
            return Err(RegionError::FileSize {
                path: path.to_owned(),
                expected,
                found: size,
            });
        }
        let creator = r(W_UID_KIND) as u32;
        if creator != uid {
            return Err(field(
                path,
                "creator uid",
                uid.to_string(),
                creator.to_string(),
            ));
        }
        Ok(cap as usize)
    }

    fn map_prefix(path: &Path, file: &File) -> Result<Region, RegionError> {
        let map = MmapOptions::new()
            .len(HEADER_BYTES)
            .map_raw(file)
            .map_err(io_err(path, "mmap"))?;
        let map = Arc::new(map);
        // SAFETY: as in `map`: page-aligned shared mapping of HEADER_BYTES, kept by the Arc.
        let sb = unsafe { MappedWords::new(map.as_mut_ptr(), HEADER_BYTES / 8, map.clone()) };
        Ok(Region {
            path: path.to_owned(),
            map,
            sb,
            capacity: 0,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data bytes of the ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The region's random id.
    pub fn region_id(&self) -> u128 {
        let lo = self.sb.word(W_ID).load(Ordering::Relaxed) as u128;
        let hi = self.sb.word(W_ID + 1).load(Ordering::Relaxed) as u128;
        lo | hi << 64
    }

    /// The epoch it was created for.
    pub fn epoch(&self) -> u64 {
        self.sb.word(W_EPOCH).load(Ordering::Relaxed)
    }

    /// The kind tag it was created with.
    pub fn kind(&self) -> u32 {
        (self.sb.word(W_UID_KIND).load(Ordering::Relaxed) >> 32) as u32
    }

    /// Layout (major, minor) version of the file.
    pub fn layout_version(&self) -> (u16, u16) {
        let v = self.sb.word(W_VERSION).load(Ordering::Relaxed);
        (v as u16, (v >> 16) as u16)
    }

    fn identity(&self, w: usize) -> Option<IdentityWords> {
        // SYNC POINT: identity published (Acquire side; Release is in `set_identity`).
        let pid = self.sb.word(w).load(Ordering::Acquire);
        if pid == 0 {
            return None;
        }
        Some(IdentityWords {
            pid,
            start_time: self.sb.word(w + 1).load(Ordering::Relaxed),
        })
    }

    fn set_identity(&self, w: usize, id: IdentityWords) {
        self.sb.word(w).store(0, Ordering::Relaxed);
        self.sb.word(w + 1).store(id.start_time, Ordering::Relaxed);
        // SYNC POINT: identity published (Release side).
        self.sb.word(w).store(id.pid, Ordering::Release);
    }

    /// The producer's identity.
    pub fn producer_identity(&self) -> Option<IdentityWords> {
        self.identity(W_PRODUCER)
    }

    /// The consumer's identity, once one attached.
    pub fn consumer_identity(&self) -> Option<IdentityWords> {
        self.identity(W_CONSUMER)
    }

    /// Record a (new) producer.
    pub fn set_producer_identity(&self, id: IdentityWords) {
        self.set_identity(W_PRODUCER, id)
    }

    /// Record a (new) consumer.
    pub fn set_consumer_identity(&self, id: IdentityWords) {
        self.set_identity(W_CONSUMER, id)
    }

    /// Mark the region closed with a reason code (non-zero); either side may do it.
    pub fn close(&self, reason: u64) {
        self.sb
            .word(W_CLOSED)
            .store(reason.max(1), Ordering::Release);
    }

    /// The close reason, if the region was closed.
    pub fn closed(&self) -> Option<u64> {
        match self.sb.word(W_CLOSED).load(Ordering::Acquire) {
            0 => None,
            r => Some(r),
        }
    }

    /// One of the two user words (index 0 or 1).
    pub fn user_word(&self, i: usize) -> &crate::sync::AtomicU64 {
        assert!(i < 2, "a region has two user words");
        self.sb.word(W_USER + i)
    }

    fn ring_memory(&self) -> RegionMemory {
        // SAFETY: the mapping is `file_bytes(capacity)` long; the ring part starts at
        // HEADER_BYTES (page-aligned) and holds `ring_words(capacity)` words; the Arc keeps it.
        unsafe {
            MappedWords::new(
                self.map.as_mut_ptr().add(HEADER_BYTES),
                ring_words(self.capacity),
                self.map.clone(),
            )
        }
    }

    /// The producing end of a fresh ring.
    pub fn producer(&self) -> Result<Producer<RegionMemory>, RegionError> {
        Producer::create(self.ring_memory(), self.capacity).map_err(|source| RegionError::Ring {
            path: self.path.clone(),
            source,
        })
    }

    /// The producing end, continuing after a previous producer.
    pub fn resume_producer(&self) -> Result<Producer<RegionMemory>, RegionError> {
        Producer::resume(self.ring_memory(), self.capacity).map_err(|source| RegionError::Ring {
            path: self.path.clone(),
            source,
        })
    }

    /// The consuming end, at the last released position.
    pub fn consumer(&self) -> Result<Consumer<RegionMemory>, RegionError> {
        Consumer::attach(self.ring_memory(), self.capacity).map_err(|source| RegionError::Ring {
            path: self.path.clone(),
            source,
        })
    }

    /// Remove a region file (mappings stay valid until dropped).
    pub fn remove(path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
}

fn field(path: &Path, field: &'static str, expected: String, found: String) -> RegionError {
    RegionError::Field {
        path: path.to_owned(),
        field,
        expected,
        found,
    }
}

fn hex(v: u64) -> String {
    format!("{v:#018x}")
}

/// Create `dir` (and parents) with mode 0700 if missing; refuse a symlink, another owner, or
/// a directory (or a non-sticky ancestor) writable by group or others: see
/// [`crate::trust::ensure_private_dir`], whose typed error this carries as the message.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    crate::trust::ensure_private_dir(dir)
        .map(|_created| ())
        .map_err(io::Error::from)
}
