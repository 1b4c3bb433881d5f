//! Live counters in shared memory: what each engine is doing now and has done, readable by any
//! process of the cluster's user without a debugger, a socket or a log (in the spirit of Aeron's
//! counters file, read by `understudy stat` and the supervisor's Prometheus endpoint).
//!
//! One file per cluster, `<cluster dir>/counters`, created like every other region file
//! (`O_EXCL|O_NOFOLLOW`, mode 0600, in the private cluster directory) by the first engine that
//! starts. Its layout is versioned: a header line (magic, layout version, file size, slot count,
//! words per slot, a READY word published last), then one block of [`SLOT_WORDS`] 64-bit words
//! per slot, 64-byte aligned, **written only by the engine in that slot** with relaxed
//! load-and-store pairs on words no other process writes: no system call, no lock, no
//! allocation, no read-modify-write instruction on the hot path (a single writer needs none).
//!
//! Each block has two parts:
//! - **totals** (requests, refusals, transactions committed and applied, back-pressure waits,
//!   untethers, catch-ups, step-ups, switchovers, starts): kept across restarts of the slot's
//!   engine, which continues them where its predecessor stopped, so a rate or a Prometheus
//!   counter does not drop at a failover;
//! - **incarnation** values (pid, start time, role, epoch, heartbeat, transaction index, last
//!   step-up and switchover durations, the active's view of each standby stream, the sampled
//!   service-time histogram): reset when an engine starts in the slot.
//!
//! After the slot blocks comes the **client area**: [`MAX_CLIENTS`] entries of
//! [`CLIENT_WORDS`] words, one per client registry entry (the control block's), written only by
//! the active engine's client path ([`ClientsWriter`], from `client::ClientInput`) with relaxed
//! stores: the client's id (0: no client), the position its request ring was consumed to, the
//! position the client had published (their difference is the lag in bytes) and the responses
//! written to it. Entries follow the registry; a response count continues across a switchover
//! for a client that stays.
//!
//! A reader ([`read`]) validates the header (magic, layout version, size, geometry) and treats
//! every word as untrusted: the values are reported as found, and everything derived from them
//! (lags, sums) uses saturating arithmetic.
//!
//! # Examples
//!
//! ```
//! use understudy_control::counters::{self, Counter};
//! let dir = std::env::temp_dir().join(format!("counters-doc-{}", std::process::id()));
//! let _ = std::fs::remove_dir_all(&dir);
//! shm_layout::region::ensure_private_dir(&dir).unwrap();
//! let w = counters::Writer::open_or_create(&dir, 0).unwrap();
//! w.add(Counter::REQUESTS_TOTAL, 3);
//! let snap = counters::read(&dir).unwrap();
//! assert_eq!(snap.slots[0].requests_total, 3);
//! std::fs::remove_dir_all(&dir).unwrap();
//! ```

use crate::control::{self, monotonic_ns, realtime_ns, Role, State, MAX_CLIENTS, SLOTS};
use memmap2::{MmapOptions, MmapRaw};
use shm_layout::memory::{MappedWords, WordMemory};
use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The file's name in the cluster directory.
pub const FILE_NAME: &str = "counters";
/// `USCNTRS1` little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"USCNTRS1");
/// The layout version of this file (bumped when a word moves or an area is added). 2: the
/// per-client area after the slot blocks, the file grown to 12 KiB.
pub const LAYOUT_VERSION: u64 = 2;
/// Words in the header line.
const HEADER_WORDS: usize = 8;
/// Words per slot block: 2 KiB, a multiple of the 64-byte line, so no two slots share a line.
pub const SLOT_WORDS: usize = 256;
/// Service-time histogram buckets: bucket `b` counts times in `[2^(b-1), 2^b)` ns.
pub const HIST_BUCKETS: usize = 64;
/// The file's size.
pub const FILE_BYTES: usize = 12288;
/// First word of the client area, line-aligned (after the slot blocks).
const CLIENTS: usize = HEADER_WORDS + SLOTS * SLOT_WORDS;
/// Words per client entry: id, request ring position consumed, request ring position the
/// client published, responses written.
pub const CLIENT_WORDS: usize = 4;
const _: () = assert!((CLIENTS + MAX_CLIENTS * CLIENT_WORDS) * 8 <= FILE_BYTES);
const _: () = assert!(CLIENTS * 8 % 64 == 0);
const _: () = assert!(SLOT_WORDS * 8 % 64 == 0 && HEADER_WORDS * 8 == 64);

const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_FILE_BYTES: usize = 2;
const H_SLOTS: usize = 3;
const H_SLOT_WORDS: usize = 4;
const H_READY: usize = 5;
const H_HIST_BUCKETS: usize = 6;
const H_CLIENTS: usize = 7;
const READY: u64 = 0x5245_4144_5921_0001;

/// One word of a slot block. The constants are the only values, each below [`SLOT_WORDS`]
/// (asserted at compile time), which is what lets [`Writer`] index without a bounds check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter(usize);

/// First word of the per-standby stream entries (the active's view): `STREAM_WORDS` each.
const STREAMS: usize = 32;
/// Words per stream entry: attached (1/0), hot (1/0), producer position, consumer position.
const STREAM_WORDS: usize = 4;
/// First word of the service-time histogram.
const HIST: usize = 64;
const _: () = assert!(STREAMS + SLOTS * STREAM_WORDS <= HIST);
const _: () = assert!(HIST + HIST_BUCKETS <= SLOT_WORDS);

impl Counter {
    // Totals: continued by a restarted engine.
    /// Requests served (committed as transactions) while active.
    pub const REQUESTS_TOTAL: Counter = Counter(0);
    /// Requests the application refused.
    pub const REFUSALS_TOTAL: Counter = Counter(1);
    /// Transactions committed while active (requests and the engine's own).
    pub const COMMITS_TOTAL: Counter = Counter(2);
    /// Transactions applied from the stream while standby.
    pub const APPLIED_TOTAL: Counter = Counter(3);
    /// Times a full standby stream made the active wait (back-pressure).
    pub const BACKPRESSURE_WAITS_TOTAL: Counter = Counter(4);
    /// Standbys this engine untethered (could not keep up).
    pub const UNTETHERS_TOTAL: Counter = Counter(5);
    /// Catch-ups from a snapshot this engine completed as standby.
    pub const CATCHUPS_TOTAL: Counter = Counter(6);
    /// Times this engine stepped up (after a death or in a planned switchover).
    pub const STEP_UPS_TOTAL: Counter = Counter(7);
    /// Planned switchovers this engine handed over as active.
    pub const SWITCHOVERS_TOTAL: Counter = Counter(8);
    /// Engine processes started in this slot.
    pub const STARTS_TOTAL: Counter = Counter(9);
    /// Words 10..16: reserved totals.
    const TOTALS_END: usize = 16;

    // Incarnation: reset at every start.
    /// The engine's pid.
    pub const PID: Counter = Counter(16);
    /// When it started (CLOCK_REALTIME ns).
    pub const STARTED_REALTIME_NS: Counter = Counter(17);
    /// Its role (`control::Role` word).
    pub const ROLE: Counter = Counter(18);
    /// Its state (`control::State` word).
    pub const STATE: Counter = Counter(19);
    /// Its epoch.
    pub const EPOCH: Counter = Counter(20);
    /// Its last heartbeat (CLOCK_MONOTONIC ns, comparable across processes on the host).
    pub const HEARTBEAT_NS: Counter = Counter(21);
    /// Its transaction index (transactions in its store): the active's minus a standby's is
    /// the standby's lag in transactions.
    pub const TX_INDEX: Counter = Counter(22);
    /// How long its last step-up took (ns).
    pub const LAST_STEP_UP_NS: Counter = Counter(23);
    /// How long its last planned switchover took, as the handing-over active (ns).
    pub const LAST_SWITCHOVER_NS: Counter = Counter(24);
    /// The application version it runs.
    pub const APP_VERSION: Counter = Counter(25);
    /// The counters layout version the writer knows (a reader may be older).
    pub const WRITER_LAYOUT: Counter = Counter(26);
}

/// Why the counters file cannot be created, opened or believed.
#[derive(Debug)]
pub enum CountersError {
    /// A system call failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What we were doing.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
    /// A header word or a property of the file is not what this reader expects.
    Field {
        /// The file.
        path: PathBuf,
        /// The word or property.
        field: &'static str,
        /// What we expected.
        expected: String,
        /// What we found.
        found: String,
    },
}

impl fmt::Display for CountersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountersError::Io { path, op, source } => {
                write!(f, "counters file {}: {op}: {source}", path.display())
            }
            CountersError::Field {
                path,
                field,
                expected,
                found,
            } => write!(
                f,
                "counters file {}: {field}: expected {expected}, found {found}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CountersError {}

impl CountersError {
    /// True when the file does not exist (no engine ever started in this cluster directory).
    pub fn is_not_found(&self) -> bool {
        matches!(self, CountersError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

type Words = MappedWords<Arc<MmapRaw>>;

struct Mapped {
    words: Arc<Words>,
    path: PathBuf,
}

fn map_file(path: &Path, file: &std::fs::File) -> Result<Mapped, CountersError> {
    let map = MmapOptions::new()
        .len(FILE_BYTES)
        .map_raw(file)
        .map_err(|source| CountersError::Io {
            path: path.to_owned(),
            op: "mmap",
            source,
        })?;
    let map = Arc::new(map);
    // SAFETY: a page-aligned shared writable mapping of FILE_BYTES bytes (the file's size was
    // set or checked before), kept alive by the Arc the window owns.
    let words = unsafe { MappedWords::new(map.as_mut_ptr(), FILE_BYTES / 8, map.clone()) };
    Ok(Mapped {
        words: Arc::new(words),
        path: path.to_owned(),
    })
}

/// A header word to check: (name, index, expected value, how to show a value).
type HeaderCheck = (&'static str, usize, u64, fn(u64) -> String);

/// How long an opener waits for a racing creator to size the file, and then to publish it.
const CREATION_WAIT: Duration = Duration::from_secs(2);
/// How often an opener looks again whether the file has been sized.
const SIZE_POLL_INTERVAL: Duration = Duration::from_millis(1);
/// How often an opener looks again whether the file has been published.
const READY_POLL_INTERVAL: Duration = Duration::from_micros(200);

/// Open the file for reading or writing, validating everything in the header.
fn open_existing(dir: &Path) -> Result<Mapped, CountersError> {
    let path = dir.join(FILE_NAME);
    let file = shm_layout::trust::open_private_file(&path, libc::O_RDWR).map_err(|e| {
        CountersError::Io {
            path: path.clone(),
            op: "open",
            source: e.into(),
        }
    })?;
    check_size(&path, &file)?;
    let m = map_file(&path, &file)?;
    wait_ready(&path, &m)?;
    check_header(&path, &m)?;
    Ok(m)
}

/// The file has this layout's size, once a racing creator has sized it (bounded); a file of
/// another layout version is named by its version, not its size.
fn check_size(path: &Path, file: &std::fs::File) -> Result<(), CountersError> {
    let io = |op| {
        let path = path.to_path_buf();
        move |source| CountersError::Io { path, op, source }
    };
    let mut meta = file.metadata().map_err(io("stat"))?;
    let sizing = Instant::now();
    while meta.len() == 0 && sizing.elapsed() < CREATION_WAIT {
        std::thread::sleep(SIZE_POLL_INTERVAL);
        meta = file.metadata().map_err(io("stat"))?;
    }
    if meta.len() == FILE_BYTES as u64 {
        return Ok(());
    }
    let mut head = [0u8; 16];
    if std::os::unix::fs::FileExt::read_exact_at(file, &mut head, 0).is_ok() {
        let word =
            |i: usize| u64::from_le_bytes(head[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        if word(H_MAGIC) == MAGIC && word(H_VERSION) != LAYOUT_VERSION {
            return Err(CountersError::Field {
                path: path.to_path_buf(),
                field: "layout version",
                expected: LAYOUT_VERSION.to_string(),
                found: word(H_VERSION).to_string(),
            });
        }
    }
    Err(CountersError::Field {
        path: path.to_path_buf(),
        field: "file size",
        expected: FILE_BYTES.to_string(),
        found: meta.len().to_string(),
    })
}

/// Waits (bounded) until the creator has published the file.
fn wait_ready(path: &Path, m: &Mapped) -> Result<(), CountersError> {
    let started = Instant::now();
    // SYNC POINT: counters published (Acquire side; Release is in `Writer::open_or_create`).
    while m.words.word(H_READY).load(Ordering::Acquire) != READY {
        if started.elapsed() > CREATION_WAIT {
            return Err(CountersError::Field {
                path: path.to_path_buf(),
                field: "ready",
                expected: "a published counters file".into(),
                found: format!("one still being initialised after {CREATION_WAIT:?}"),
            });
        }
        std::thread::sleep(READY_POLL_INTERVAL);
    }
    Ok(())
}

/// Every header word holds what this layout says: the first wrong one is named.
fn check_header(path: &Path, m: &Mapped) -> Result<(), CountersError> {
    let checks: [HeaderCheck; 7] = [
        ("magic", H_MAGIC, MAGIC, |v| format!("{v:#018x}")),
        ("layout version", H_VERSION, LAYOUT_VERSION, |v| {
            v.to_string()
        }),
        ("file size word", H_FILE_BYTES, FILE_BYTES as u64, |v| {
            v.to_string()
        }),
        ("slot count", H_SLOTS, SLOTS as u64, |v| v.to_string()),
        ("words per slot", H_SLOT_WORDS, SLOT_WORDS as u64, |v| {
            v.to_string()
        }),
        ("client entries", H_CLIENTS, MAX_CLIENTS as u64, |v| {
            v.to_string()
        }),
        (
            "histogram buckets",
            H_HIST_BUCKETS,
            HIST_BUCKETS as u64,
            |v| v.to_string(),
        ),
    ];
    for (field, i, want, show) in checks {
        let found = m.words.word(i).load(Ordering::Relaxed);
        if found != want {
            return Err(CountersError::Field {
                path: path.to_path_buf(),
                field,
                expected: show(want),
                found: show(found),
            });
        }
    }
    Ok(())
}

/// The engine's handle on its own slot block: the only writer of those words.
pub struct Writer {
    words: Arc<Words>,
    base: usize,
    path: PathBuf,
}

/// Back-pressure waits of this process (the engine's stream pushes are on one thread; the
/// counter is read into the shared block at housekeeping, off the hot path).
static BACKPRESSURE_WAITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Note that a push found a standby's stream full and waits (slow path only).
pub fn note_backpressure_wait() {
    BACKPRESSURE_WAITS.fetch_add(1, Ordering::Relaxed);
}

impl Writer {
    /// Open `<dir>/counters` (creating it if no engine did yet) and take slot `slot`: the
    /// incarnation words are reset, the totals kept, `STARTS_TOTAL` counted.
    pub fn open_or_create(dir: &Path, slot: usize) -> Result<Writer, CountersError> {
        let path = dir.join(FILE_NAME);
        if slot >= SLOTS {
            return Err(CountersError::Field {
                path,
                field: "slot",
                expected: format!("below {SLOTS}"),
                found: slot.to_string(),
            });
        }
        let io = |op| {
            let path = path.clone();
            move |source| CountersError::Io { path, op, source }
        };
        let m = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => {
                // The umask may have narrowed the mode; never widened: set it exactly.
                file.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod"))?;
                file.set_len(FILE_BYTES as u64).map_err(io("resize"))?;
                let meta = file.metadata().map_err(io("stat"))?;
                // SAFETY: geteuid has no preconditions.
                let uid = unsafe { libc::geteuid() };
                if meta.uid() != uid {
                    return Err(CountersError::Field {
                        path,
                        field: "owner",
                        expected: format!("uid {uid}"),
                        found: format!("uid {}", meta.uid()),
                    });
                }
                let m = map_file(&path, &file)?;
                let set = |i: usize, v: u64| m.words.word(i).store(v, Ordering::Relaxed);
                set(H_MAGIC, MAGIC);
                set(H_VERSION, LAYOUT_VERSION);
                set(H_FILE_BYTES, FILE_BYTES as u64);
                set(H_SLOTS, SLOTS as u64);
                set(H_SLOT_WORDS, SLOT_WORDS as u64);
                set(H_HIST_BUCKETS, HIST_BUCKETS as u64);
                set(H_CLIENTS, MAX_CLIENTS as u64);
                // SYNC POINT: counters published (Release; Acquire is in `open_existing`).
                m.words.word(H_READY).store(READY, Ordering::Release);
                m
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open_existing(dir)?,
            Err(e) => return Err(io("create")(e)),
        };
        let base = HEADER_WORDS + slot * SLOT_WORDS;
        // Checked once here; every index used below is `base + i` with `i < SLOT_WORDS`.
        assert!(base + SLOT_WORDS <= m.words.len_words());
        let w = Writer {
            words: m.words,
            base,
            path: m.path,
        };
        for i in Counter::TOTALS_END..SLOT_WORDS {
            w.word(i).store(0, Ordering::Relaxed);
        }
        w.add(Counter::STARTS_TOTAL, 1);
        w.set(Counter::PID, std::process::id() as u64);
        w.set(Counter::STARTED_REALTIME_NS, realtime_ns());
        w.set(Counter::HEARTBEAT_NS, monotonic_ns());
        w.set(Counter::WRITER_LAYOUT, LAYOUT_VERSION);
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    #[inline(always)]
    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < SLOT_WORDS);
        // SAFETY: every caller passes `i < SLOT_WORDS` (a `Counter` constant, `HIST + b` with
        // `b < HIST_BUCKETS`, or a stream word of a slot below `SLOTS`, all asserted at compile
        // time to lie inside the block), and `base + SLOT_WORDS <= len_words` was asserted
        // when the writer was made.
        unsafe { self.words.word_unchecked(self.base + i) }
    }

    /// Add `n` to a counter. We are the only writer of the word: a relaxed load and store (two
    /// plain moves), no locked instruction.
    #[inline(always)]
    pub fn add(&self, c: Counter, n: u64) {
        let w = self.word(c.0);
        w.store(w.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// Set a value.
    #[inline(always)]
    pub fn set(&self, c: Counter, v: u64) {
        self.word(c.0).store(v, Ordering::Relaxed);
    }

    /// Count one sampled service time of `ns` in its power-of-two bucket (the same buckets as
    /// the engine's p99 window).
    #[inline(always)]
    pub fn service_time(&self, ns: u64) {
        let b = (64 - ns.max(1).leading_zeros() as usize).min(HIST_BUCKETS - 1);
        let w = self.word(HIST + b);
        w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// Publish the active's view of the standby stream of `slot` (housekeeping, not per
    /// transaction). `None`: no stream to that slot.
    pub fn stream(&self, slot: usize, view: Option<(bool, u64, u64)>) {
        if slot >= SLOTS {
            return;
        }
        let at = STREAMS + slot * STREAM_WORDS;
        let (attached, hot, head, tail) = match view {
            Some((hot, head, tail)) => (1, hot as u64, head, tail),
            None => (0, 0, 0, 0),
        };
        self.word(at + 1).store(hot, Ordering::Relaxed);
        self.word(at + 2).store(head, Ordering::Relaxed);
        self.word(at + 3).store(tail, Ordering::Relaxed);
        self.word(at).store(attached, Ordering::Relaxed);
    }

    /// Housekeeping: heartbeat and the process's back-pressure waits (`base` is the total the
    /// slot had when this engine started).
    pub fn housekeeping(&self, now_ns: u64, backpressure_base: u64) {
        self.set(Counter::HEARTBEAT_NS, now_ns);
        self.set(
            Counter::BACKPRESSURE_WAITS_TOTAL,
            backpressure_base.wrapping_add(BACKPRESSURE_WAITS.load(Ordering::Relaxed)),
        );
    }

    /// A counter's current value (our own word).
    pub fn get(&self, c: Counter) -> u64 {
        self.word(c.0).load(Ordering::Relaxed)
    }
}

/// The active engine's handle on the client area (see the module's documentation): one
/// writer at a time, the engine serving the clients.
pub struct ClientsWriter {
    words: Arc<Words>,
}

impl ClientsWriter {
    /// Map `<dir>/counters`, which the engine created at its start (the slot's [`Writer`]).
    pub fn open(dir: &Path) -> Result<ClientsWriter, CountersError> {
        let m = open_existing(dir)?;
        // Checked once here; every index used below is `CLIENTS + e * CLIENT_WORDS + k` with
        // `e < MAX_CLIENTS` and `k < CLIENT_WORDS`.
        assert!(CLIENTS + MAX_CLIENTS * CLIENT_WORDS <= m.words.len_words());
        Ok(ClientsWriter { words: m.words })
    }

    /// Word `k` of entry `entry`, or `None` for an entry beyond the registry.
    #[inline(always)]
    fn word(&self, entry: usize, k: usize) -> Option<&AtomicU64> {
        if entry >= MAX_CLIENTS || k >= CLIENT_WORDS {
            return None;
        }
        // SAFETY: `entry < MAX_CLIENTS` and `k < CLIENT_WORDS` (checked above), and
        // `CLIENTS + MAX_CLIENTS * CLIENT_WORDS <= len_words` was asserted in `open`.
        Some(unsafe {
            self.words
                .word_unchecked(CLIENTS + entry * CLIENT_WORDS + k)
        })
    }

    /// Client `id` is served from registry entry `entry`, its request ring at `consumed` of
    /// `published` bytes. Its response count continues if the entry already names it (the
    /// same client, served by the previous active), else starts at 0.
    pub fn connect(&self, entry: usize, id: u64, consumed: u64, published: u64) {
        let Some(id_word) = self.word(entry, 0) else {
            return;
        };
        if id_word.load(Ordering::Relaxed) != id {
            id_word.store(0, Ordering::Relaxed);
            if let Some(w) = self.word(entry, 3) {
                w.store(0, Ordering::Relaxed);
            }
        }
        self.progress(entry, consumed, published);
        id_word.store(id, Ordering::Relaxed);
    }

    /// The client's request ring is consumed to `consumed`; it had published `published`.
    /// Two relaxed stores.
    #[inline(always)]
    pub fn progress(&self, entry: usize, consumed: u64, published: u64) {
        if let (Some(c), Some(p)) = (self.word(entry, 1), self.word(entry, 2)) {
            c.store(consumed, Ordering::Relaxed);
            p.store(published, Ordering::Relaxed);
        }
    }

    /// The client's request ring is consumed to `consumed`. One relaxed store: the active's
    /// per-request path, which must not read the line the client writes (see
    /// [`published`](Self::published)).
    #[inline(always)]
    pub fn consumed(&self, entry: usize, consumed: u64) {
        if let Some(c) = self.word(entry, 1) {
            c.store(consumed, Ordering::Relaxed);
        }
    }

    /// The client had published its request ring to `published` (for the lag). Sampled by the
    /// caller off the per-request path: reading the client's head pulls a line the client
    /// writes on every request.
    #[inline(always)]
    pub fn published(&self, entry: usize, published: u64) {
        if let Some(p) = self.word(entry, 2) {
            p.store(published, Ordering::Relaxed);
        }
    }

    /// One response written to the client (we are the only writer: a relaxed load and store).
    #[inline(always)]
    pub fn response(&self, entry: usize) {
        if let Some(w) = self.word(entry, 3) {
            w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        }
    }

    /// No client is served from `entry` any more.
    pub fn disconnect(&self, entry: usize) {
        for k in 0..CLIENT_WORDS {
            if let Some(w) = self.word(entry, k) {
                w.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// One client's request ring and responses, as the active engine last wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientView {
    /// The client's registry entry.
    pub entry: usize,
    /// The client's id.
    pub id: u64,
    /// Bytes of its request ring the engine consumed.
    pub consumed_bytes: u64,
    /// Bytes the client had published into it when the engine last looked.
    pub published_bytes: u64,
    /// Responses written to the client.
    pub responses_total: u64,
}

impl ClientView {
    /// Bytes published and not yet consumed (0 if the words make no sense).
    pub fn lag_bytes(&self) -> u64 {
        self.published_bytes.saturating_sub(self.consumed_bytes)
    }

    /// The id as `stat` and the metrics show it (16 hex digits, like the logs).
    pub fn id_hex(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// The active's view of one standby stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamView {
    /// The standby's slot.
    pub slot: usize,
    /// The standby has caught up (mirrors the active).
    pub hot: bool,
    /// Bytes the active wrote into the stream.
    pub position_bytes: u64,
    /// Bytes the standby consumed.
    pub consumed_bytes: u64,
}

impl StreamView {
    /// The standby's slot letter.
    pub fn slot_name(&self) -> char {
        control::slot_name(self.slot)
    }

    /// Bytes written and not yet consumed (0 if the words make no sense).
    pub fn lag_bytes(&self) -> u64 {
        self.position_bytes.saturating_sub(self.consumed_bytes)
    }
}

/// One slot's counters as read (every value untrusted: reported as found).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotCounters {
    /// The slot.
    pub slot: usize,
    /// Requests served, over every engine this slot ran.
    pub requests_total: u64,
    /// Requests refused by the application.
    pub refusals_total: u64,
    /// Transactions committed as active.
    pub commits_total: u64,
    /// Transactions applied as standby.
    pub applied_total: u64,
    /// Back-pressure waits.
    pub backpressure_waits_total: u64,
    /// Standbys untethered.
    pub untethers_total: u64,
    /// Catch-ups completed as standby.
    pub catchups_total: u64,
    /// Step-ups.
    pub step_ups_total: u64,
    /// Planned switchovers handed over.
    pub switchovers_total: u64,
    /// Engine starts in this slot.
    pub starts_total: u64,
    /// The pid of the engine that last wrote the block (0: never).
    pub pid: u64,
    /// When it started (CLOCK_REALTIME ns).
    pub started_realtime_ns: u64,
    /// Its role.
    pub role: u64,
    /// Its state.
    pub state: u64,
    /// Its epoch.
    pub epoch: u64,
    /// Its last heartbeat (CLOCK_MONOTONIC ns).
    pub heartbeat_ns: u64,
    /// Transactions in its store.
    pub tx_index: u64,
    /// Last step-up duration (ns).
    pub last_step_up_ns: u64,
    /// Last switchover duration (ns).
    pub last_switchover_ns: u64,
    /// The application version.
    pub app_version: u64,
    /// The active's standby streams (attached ones only).
    pub streams: Vec<StreamView>,
    /// Sampled service-time histogram (one request in four), power-of-two buckets: entry `b`
    /// counts times in `[2^(b-1), 2^b)` ns.
    pub service_hist: Vec<u64>,
}

impl SlotCounters {
    /// Whether an engine ever wrote this block.
    pub fn used(&self) -> bool {
        self.starts_total != 0 || self.pid != 0
    }

    /// The role, decoded (an unknown word is `Role::None`).
    pub fn role(&self) -> Role {
        Role::from_word(self.role)
    }

    /// The state, decoded.
    pub fn state(&self) -> State {
        State::from_word(self.state)
    }

    /// The slot's letter.
    pub fn name(&self) -> char {
        control::slot_name(self.slot)
    }

    /// Whether the process that wrote the block still runs (pid present in `/proc`; a reader
    /// that needs certainty uses the control block's identity).
    pub fn alive(&self) -> bool {
        self.pid != 0
            && self.pid <= i32::MAX as u64
            && Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// Heartbeat age at `now_ns` (CLOCK_MONOTONIC).
    pub fn heartbeat_age_ns(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.heartbeat_ns)
    }

    /// Sampled service times counted.
    pub fn service_samples(&self) -> u64 {
        self.service_hist
            .iter()
            .fold(0u64, |a, n| a.saturating_add(*n))
    }

    /// Upper bound (ns) of the bucket holding quantile `q` of the sampled service times.
    pub fn service_quantile_ns(&self, q: f64) -> Option<u64> {
        let total = self.service_samples();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (b, n) in self.service_hist.iter().enumerate() {
            seen = seen.saturating_add(*n);
            if seen >= target {
                return Some(if b >= 63 { u64::MAX } else { 1u64 << b });
            }
        }
        None
    }
}

/// The whole file as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// One entry per slot.
    pub slots: Vec<SlotCounters>,
    /// The clients the active engine serves (entries with an id).
    pub clients: Vec<ClientView>,
    /// CLOCK_MONOTONIC when read.
    pub read_at_ns: u64,
}

impl Snapshot {
    /// The standby's lag in transactions behind the active that streams to it, from the two
    /// engines' transaction indexes (`None` if either is missing).
    pub fn lag_transactions(&self, active: usize, standby: usize) -> Option<u64> {
        let a = self.slots.get(active)?;
        let s = self.slots.get(standby)?;
        Some(a.tx_index.saturating_sub(s.tx_index))
    }
}

/// A reader of one cluster's counters file, mapped once.
pub struct Reader {
    words: Arc<Words>,
}

impl Reader {
    /// Open and validate `<dir>/counters`.
    pub fn open(dir: &Path) -> Result<Reader, CountersError> {
        Ok(Reader {
            words: open_existing(dir)?.words,
        })
    }

    /// Read every slot.
    pub fn snapshot(&self) -> Snapshot {
        let w = |i: usize| self.words.word(i).load(Ordering::Relaxed);
        let slots = (0..SLOTS)
            .map(|slot| {
                let b = HEADER_WORDS + slot * SLOT_WORDS;
                let c = |c: Counter| w(b + c.0);
                let streams = (0..SLOTS)
                    .filter_map(|s| {
                        let at = b + STREAMS + s * STREAM_WORDS;
                        (w(at) == 1).then(|| StreamView {
                            slot: s,
                            hot: w(at + 1) == 1,
                            position_bytes: w(at + 2),
                            consumed_bytes: w(at + 3),
                        })
                    })
                    .collect();
                SlotCounters {
                    slot,
                    requests_total: c(Counter::REQUESTS_TOTAL),
                    refusals_total: c(Counter::REFUSALS_TOTAL),
                    commits_total: c(Counter::COMMITS_TOTAL),
                    applied_total: c(Counter::APPLIED_TOTAL),
                    backpressure_waits_total: c(Counter::BACKPRESSURE_WAITS_TOTAL),
                    untethers_total: c(Counter::UNTETHERS_TOTAL),
                    catchups_total: c(Counter::CATCHUPS_TOTAL),
                    step_ups_total: c(Counter::STEP_UPS_TOTAL),
                    switchovers_total: c(Counter::SWITCHOVERS_TOTAL),
                    starts_total: c(Counter::STARTS_TOTAL),
                    pid: c(Counter::PID),
                    started_realtime_ns: c(Counter::STARTED_REALTIME_NS),
                    role: c(Counter::ROLE),
                    state: c(Counter::STATE),
                    epoch: c(Counter::EPOCH),
                    heartbeat_ns: c(Counter::HEARTBEAT_NS),
                    tx_index: c(Counter::TX_INDEX),
                    last_step_up_ns: c(Counter::LAST_STEP_UP_NS),
                    last_switchover_ns: c(Counter::LAST_SWITCHOVER_NS),
                    app_version: c(Counter::APP_VERSION),
                    streams,
                    service_hist: (0..HIST_BUCKETS).map(|i| w(b + HIST + i)).collect(),
                }
            })
            .collect();
        let clients = (0..MAX_CLIENTS)
            .filter_map(|entry| {
                let at = CLIENTS + entry * CLIENT_WORDS;
                let id = w(at);
                (id != 0).then(|| ClientView {
                    entry,
                    id,
                    consumed_bytes: w(at + 1),
                    published_bytes: w(at + 2),
                    responses_total: w(at + 3),
                })
            })
            .collect();
        Snapshot {
            slots,
            clients,
            read_at_ns: monotonic_ns(),
        }
    }
}

/// Open, validate and read `<dir>/counters` once.
pub fn read(dir: &Path) -> Result<Snapshot, CountersError> {
    Ok(Reader::open(dir)?.snapshot())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(name: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("counters-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        shm_layout::region::ensure_private_dir(&d).unwrap();
        Dir(d)
    }

    /// Totals survive a new writer in the same slot; incarnation values are reset; slots are
    /// independent.
    #[test]
    fn totals_continue_and_incarnation_resets() {
        let d = dir("restart");
        let w = Writer::open_or_create(&d.0, 1).unwrap();
        w.add(Counter::REQUESTS_TOTAL, 5);
        w.set(Counter::EPOCH, 7);
        w.service_time(1500);
        w.stream(0, Some((true, 100, 60)));
        let s = read(&d.0).unwrap();
        assert_eq!(s.slots[1].requests_total, 5);
        assert_eq!(s.slots[1].service_hist[11], 1, "1500 ns is in [1024, 2048)");
        assert_eq!(s.slots[1].streams[0].lag_bytes(), 40);
        assert_eq!(
            s.slots[0],
            SlotCounters {
                slot: 0,
                service_hist: vec![0; HIST_BUCKETS],
                ..Default::default()
            }
        );
        drop(w);
        let w = Writer::open_or_create(&d.0, 1).unwrap();
        w.add(Counter::REQUESTS_TOTAL, 1);
        let s = read(&d.0).unwrap();
        assert_eq!(s.slots[1].requests_total, 6);
        assert_eq!(s.slots[1].starts_total, 2);
        assert_eq!(s.slots[1].epoch, 0);
        assert!(s.slots[1].streams.is_empty());
        assert_eq!(s.slots[1].service_samples(), 0);
    }

    /// A file with another magic, version or size is refused with what was expected and found.
    #[test]
    fn damaged_header_is_refused() {
        let d = dir("damaged");
        drop(Writer::open_or_create(&d.0, 0).unwrap());
        let path = d.0.join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[8] = 9; // layout version
        std::fs::write(&path, &bytes).unwrap();
        let e = read(&d.0).unwrap_err().to_string();
        assert!(e.contains("layout version: expected 2, found 9"), "{e}");
        bytes[8] = 2;
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = read(&d.0).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        std::fs::write(&path, &bytes[..4096]).unwrap();
        let e = read(&d.0).unwrap_err().to_string();
        assert!(e.contains("file size: expected 12288, found 4096"), "{e}");
        // A version-1 file (8 KiB): refused by its version, not just its size.
        let mut v1 = bytes[..8192].to_vec();
        v1[0] ^= 1; // the magic, put back
        v1[8] = 1;
        std::fs::write(&path, &v1).unwrap();
        let e = read(&d.0).unwrap_err().to_string();
        assert!(e.contains("layout version: expected 2, found 1"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(read(&d.0).unwrap_err().is_not_found());
    }

    /// A counters file others could read or write is not believed.
    #[test]
    fn file_open_to_others_is_refused() {
        let d = dir("mode");
        drop(Writer::open_or_create(&d.0, 0).unwrap());
        let path = d.0.join(FILE_NAME);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(&d.0).unwrap_err().to_string();
        assert!(e.contains("0600"), "{e}");
    }

    /// The client area: an entry appears with its id, its lag is published minus consumed, its
    /// responses count; a reconnect of the same id keeps the count, another id resets it;
    /// a disconnect removes the entry; out-of-range entries are ignored.
    #[test]
    fn client_entries_follow_connect_progress_and_disconnect() {
        let d = dir("clients");
        let _slot = Writer::open_or_create(&d.0, 0).unwrap();
        let k = ClientsWriter::open(&d.0).unwrap();
        assert!(read(&d.0).unwrap().clients.is_empty());
        k.connect(3, 0xabc, 0, 64);
        k.progress(3, 48, 128);
        k.response(3);
        k.response(3);
        k.connect(MAX_CLIENTS, 1, 0, 0);
        k.response(MAX_CLIENTS);
        let s = read(&d.0).unwrap();
        assert_eq!(s.clients.len(), 1);
        let c = s.clients[0];
        assert_eq!(
            (c.entry, c.id, c.lag_bytes(), c.responses_total),
            (3, 0xabc, 80, 2)
        );
        assert_eq!(c.id_hex(), "0000000000000abc");
        k.connect(3, 0xabc, 128, 128);
        assert_eq!(read(&d.0).unwrap().clients[0].responses_total, 2);
        k.connect(3, 0xdef, 0, 0);
        assert_eq!(read(&d.0).unwrap().clients[0].responses_total, 0);
        k.disconnect(3);
        assert!(read(&d.0).unwrap().clients.is_empty());
    }

    /// Quantiles come from bucket upper bounds.
    #[test]
    fn service_quantiles() {
        let mut s = SlotCounters {
            service_hist: vec![0; HIST_BUCKETS],
            ..Default::default()
        };
        s.service_hist[10] = 99; // < 1024 ns
        s.service_hist[20] = 1; // < 1 Mi ns
        assert_eq!(s.service_quantile_ns(0.5), Some(1024));
        assert_eq!(s.service_quantile_ns(0.99), Some(1024));
        assert_eq!(s.service_quantile_ns(1.0), Some(1 << 20));
    }
}
