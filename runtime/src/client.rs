//! The client path: requests in, responses out, exactly once across every role change.
//!
//! Each client owns two rings in the cluster directory, created by the client and outliving
//! any engine:
//!
//! ```text
//! client-<id>.in    requests   client (producer) → active engine (consumer)
//! client-<id>.out   responses  active engine (producer) → client (consumer)
//! ```
//!
//! and registers itself in the control block's client registry (id, pid, start time), where
//! the active discovers it without a system call.
//!
//! Exactly once, end to end:
//! - The active consumes requests in order per client and releases an ingress slot only after
//!   the transaction that consumed it is committed to every standby's stream. The transaction
//!   records the client's new input position and the response (the `SYS_INPUTS` table), so a
//!   crash can neither lose a request nor apply one twice: the new active seeks the ingress
//!   ring to the replicated position.
//! - A response is written to egress only after its transaction is committed. The egress
//!   region's user word 0 holds the next request sequence whose response is in the ring
//!   (written after each response). A new active compares it with the replicated last
//!   response and re-emits that response if it never reached egress.
//! - The word is written after the response, so a crash between the two can make a new active
//!   re-emit a response that did reach egress; the client drops any response whose request
//!   sequence it has already seen (responses arrive in request order, so one counter suffices).
//!
//! What is copied and what is written in place (the rule, and why):
//! - **Producers write in place.** A request is claimed in the request ring and written
//!   straight into it ([`Client::try_submit_with`]; [`Client::submit`] copies the caller's
//!   slice into the claimed room); the engine writes each response into the claimed room of the
//!   response ring the same way. No staging buffer, no allocation, one Release store per frame.
//! - **The engine copies what a client wrote.** Ingress is read with the copying
//!   `Consumer::poll`: every frame is validated (positions, lengths, types, the per-frame
//!   checksum a client ring keeps) while it is copied into the engine's own buffer, and the
//!   handler runs on that copy. A view into the ring would let a misbehaving client rewrite a
//!   request after it was checked and while the handler decides on it, or between the active
//!   and a standby replaying it; a copy cannot change. The replication stream, written by the
//!   engine's own peer, is the only stream an engine may read in place.
//!
//! A client learns of a role change only through latency: it never reconnects or resubmits.
//! It does learn, within a bounded time, what would otherwise be silence:
//!
//! - [`ClientError::ClusterDown`]: the operator stopped the cluster (`understudy down` marks
//!   the control block before it stops the engines, then removes the cluster's files); seen
//!   at the next poll that finds no response.
//! - [`ClientError::NoActive`]: no live engine has been active for longer than the client's
//!   bound ([`Client::set_no_active_bound`], default 2 s; failovers and switchovers take
//!   milliseconds) — an outage. Not final: once an engine is active again, polls answer again.
//! - [`ClientError::ClientClosed`]: the engine closed this client's rings, with its reason
//!   ([`CloseReason`]): it sent malformed frames, its rings could not be opened, it was taken
//!   for dead, it did not read its responses. Final; seen within 16 polls that find no response.
//! - [`ClientError::ResponseTooLarge`]: the answer to one request did not fit in this client's
//!   response ring; the engine sent this error in its place. The client stays connected.
//!
//! # Examples
//!
//! ```no_run
//! use understudy_runtime::client::{Client, ClientError};
//! use std::time::Duration;
//!
//! // Wait up to 5 s for the cluster to come up.
//! let mut client = Client::connect_timeout("/dev/shm/understudy/demo".as_ref(), Duration::from_secs(5)).unwrap();
//! let seq = client.submit(b"hello").unwrap();
//! match client.wait_response(Duration::from_secs(1)) {
//!     Ok(Some((s, response))) => assert_eq!(s, seq),
//!     Ok(None) => println!("no answer yet"),
//!     Err(ClientError::NoActive { .. }) => println!("outage: no engine is active"),
//!     Err(e) => println!("{e}"),
//! }
//! ```

use crate::control::{ClusterState, Control, Field, Role, MAX_CLIENTS};
use crate::engine::{Input, InputMeta, SourcePosition};
use crate::liveness::{Liveness, ProcessIdentity};
use crate::store::Store;
use shm_layout::region::{IdentityWords, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Producer, PushError};
use shm_layout::Ordering;
use std::collections::VecDeque;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Record type of a request frame.
pub const REQUEST: u16 = 1;
/// Record type of a response frame (payload: request sequence u64, then the response).
pub const RESPONSE: u16 = 2;
/// Record type sent in place of a response too large for the client's ring (payload: request
/// sequence, the response's length, the most bytes a batch may take in the ring; u64 each).
pub const RESPONSE_TOO_LARGE: u16 = 3;
/// Region kind tags.
const KIND_IN: u32 = 10;
const KIND_OUT: u32 = 11;
/// Close reasons (the words the engine writes; see [`CloseReason`]).
const CLOSE_BY_CLIENT: u64 = 1;
const CLOSE_GARBAGE: u64 = 2;
const CLOSE_DEAD: u64 = 3;
const CLOSE_SLOW: u64 = 4;
const CLOSE_UNUSABLE: u64 = 5;
/// Default ring capacity of a client's rings.
pub const DEFAULT_CAPACITY: usize = 1 << 20;
/// Default of [`Client::set_no_active_bound`].
pub const DEFAULT_NO_ACTIVE_BOUND: Duration = Duration::from_secs(2);
/// Empty polls (and submits) between two looks at the rings' close words.
const WORDS_EVERY: u32 = 16;
/// How often an idle client looks at the cluster (a `stat` and a `/proc` read).
const STATUS_EVERY: Duration = Duration::from_millis(20);
/// How often `connect_timeout` tries again while the cluster is not ready.
const CONNECT_RETRY_EVERY: Duration = Duration::from_millis(10);
/// How long the engine waits for a client's regions to be ready: the client made them before
/// it claimed its entry, so they are ready or never will be.
const REGION_READY_WAIT: Duration = Duration::from_millis(1);
/// How long the engine keeps trying to push into a full response ring before it closes the
/// client as too slow (never long enough to stall the engine).
const FULL_RESPONSE_RING_GRACE: Duration = Duration::from_millis(2);

/// Why the engine closed a client's rings (the word it wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed them itself.
    ByClient,
    /// The client sent malformed frames.
    Malformed,
    /// The client's process was taken for dead.
    Dead,
    /// The client did not read its responses (its response ring stayed full).
    Slow,
    /// The client's rings could not be opened or resumed (damaged headers or positions).
    Unusable,
    /// A reason this version does not know.
    Other(u64),
}

impl CloseReason {
    /// From the word the engine wrote.
    pub fn from_word(w: u64) -> CloseReason {
        match w {
            CLOSE_BY_CLIENT => CloseReason::ByClient,
            CLOSE_GARBAGE => CloseReason::Malformed,
            CLOSE_DEAD => CloseReason::Dead,
            CLOSE_SLOW => CloseReason::Slow,
            CLOSE_UNUSABLE => CloseReason::Unusable,
            other => CloseReason::Other(other),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ByClient => f.write_str("the client closed them"),
            CloseReason::Malformed => f.write_str("it sent malformed frames"),
            CloseReason::Dead => f.write_str("it was taken for dead"),
            CloseReason::Slow => f.write_str("it did not read its responses"),
            CloseReason::Unusable => {
                f.write_str("its rings could not be opened or resumed (damaged)")
            }
            CloseReason::Other(w) => write!(f, "reason code {w}"),
        }
    }
}

/// A client that cannot connect or talk to the cluster.
#[derive(Debug)]
pub enum ClientError {
    /// The cluster's control block.
    Control(crate::control::ControlError),
    /// A ring region.
    Region(shm_layout::region::RegionError),
    /// The registry has no free entry.
    RegistryFull {
        /// Entries in the registry.
        max: usize,
    },
    /// The engine closed this client's rings: final, connect again.
    ClientClosed {
        /// Why.
        reason: CloseReason,
    },
    /// The cluster was stopped (`understudy down`), or its files are gone.
    ClusterDown,
    /// No live engine has been active for longer than the client's bound: an outage. Not
    /// final: the client is served again once an engine is active.
    NoActive {
        /// When this client first saw no active (CLOCK_MONOTONIC ns, as
        /// [`crate::control::monotonic_ns`]).
        since_ns: u64,
    },
    /// The response to one request did not fit in this client's response ring; the engine sent
    /// this in its place. The client stays connected.
    ResponseTooLarge {
        /// The request's sequence number.
        request_seq: u64,
        /// The response's length in bytes.
        found: u64,
        /// The most bytes one batch may take in this client's response ring (frame header
        /// and the 8-byte request sequence included).
        max: u64,
    },
    /// A response frame failed validation.
    BadResponse(String),
    /// A client's rings or identity are not usable (what was expected and found).
    Setup(String),
    /// The request is larger than a ring can carry.
    TooLarge {
        /// Bytes.
        found: usize,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Control(e) => write!(f, "cluster not reachable: {e}"),
            ClientError::Region(e) => e.fmt(f),
            ClientError::RegistryFull { max } => write!(
                f,
                "client registry full: expected a free entry, found all {max} taken"
            ),
            ClientError::ClientClosed { reason } => {
                write!(f, "the engine closed this client's rings: {reason}")
            }
            ClientError::ClusterDown => f.write_str(
                "the cluster is down (stopped by the operator, or its files are gone)",
            ),
            ClientError::NoActive { since_ns } => write!(
                f,
                "no engine has been active for {} ms: an outage",
                crate::control::monotonic_ns().saturating_sub(*since_ns) / 1_000_000
            ),
            ClientError::ResponseTooLarge {
                request_seq,
                found,
                max,
            } => write!(
                f,
                "the response to request {request_seq} ({found} bytes) does not fit in this client's response ring (at most {max} bytes): connect with larger rings"
            ),
            ClientError::BadResponse(s) => write!(f, "bad response frame: {s}"),
            ClientError::Setup(s) => f.write_str(s),
            ClientError::TooLarge { found } => {
                write!(f, "request of {found} bytes does not fit in the ring")
            }
        }
    }
}
impl std::error::Error for ClientError {}

/// An answer read from the response ring.
enum Answer {
    Response(Vec<u8>),
    TooLarge { found: u64, max: u64 },
}

/// A connection to a cluster's active engine, whichever engine that is.
pub struct Client {
    id: u64,
    entry: usize,
    control: Control,
    in_region: Region,
    out_region: Region,
    requests: Producer<RegionMemory>,
    responses: Consumer<RegionMemory>,
    buf: BatchBuf,
    /// Responses already returned: requests with a smaller sequence are answered.
    answered: u64,
    /// Answers read from the ring, not yet returned (in request order).
    ready: VecDeque<(u64, Answer)>,
    no_active_bound: Duration,
    /// When this client first saw no live active (CLOCK_MONOTONIC ns).
    no_active_since: Option<u64>,
    /// Empty polls since the last status check; the clock is read every 64.
    empty_polls: u32,
    /// Requests submitted (the close words are read every `WORDS_EVERY`).
    submits: u32,
    last_status: Option<Instant>,
}

fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 8, 0) };
    let r = u64::from_le_bytes(b);
    if n == 8 && r != 0 && r != u64::MAX {
        r
    } else {
        (std::process::id() as u64) << 32 | crate::control::monotonic_ns() & 0xFFFF_FFFF
    }
}

impl Client {
    /// Connect to the cluster whose directory is `dir` (`<shm_dir>/<cluster name>`).
    pub fn connect(dir: &Path) -> Result<Client, ClientError> {
        Self::connect_with(dir, DEFAULT_CAPACITY)
    }

    /// Connect, retrying every 10 ms while the cluster is not there yet (no control file, one
    /// still being initialised, one being stopped, a full registry) for up to `timeout`; the
    /// last error after.
    pub fn connect_timeout(dir: &Path, timeout: Duration) -> Result<Client, ClientError> {
        Self::connect_with_timeout(dir, DEFAULT_CAPACITY, timeout)
    }

    /// [`connect_timeout`](Self::connect_timeout) with rings of `capacity` bytes.
    pub fn connect_with_timeout(
        dir: &Path,
        capacity: usize,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let started = Instant::now();
        loop {
            match Self::connect_with(dir, capacity) {
                Ok(c) => return Ok(c),
                Err(
                    e @ (ClientError::Control(_)
                    | ClientError::RegistryFull { .. }
                    | ClientError::ClusterDown
                    | ClientError::Region(_)),
                ) => {
                    if started.elapsed() >= timeout {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
            std::thread::sleep(CONNECT_RETRY_EVERY);
        }
    }

    /// Connect to cluster `name` under `shm_dir`.
    pub fn connect_cluster(shm_dir: &Path, name: &str) -> Result<Client, ClientError> {
        Self::connect(&shm_dir.join(name))
    }

    /// Connect with rings of `capacity` bytes. `Err(ClusterDown)` if the cluster is being
    /// stopped.
    pub fn connect_with(dir: &Path, capacity: usize) -> Result<Client, ClientError> {
        let control = Control::open(dir).map_err(ClientError::Control)?;
        if control.cluster_state() == Ok(ClusterState::Down) {
            return Err(ClientError::ClusterDown);
        }
        let me = ProcessIdentity::current()
            .map_err(|e| ClientError::Setup(format!("cannot read this process's identity: {e}")))?;
        let ident = IdentityWords {
            pid: me.pid as u64,
            start_time: me.start_time_ticks,
        };
        let id = random_id();
        let spec = |kind| RegionSpec {
            capacity,
            epoch: 0,
            kind,
        };
        let in_path = Control::client_in_path(dir, id);
        let out_path = Control::client_out_path(dir, id);
        let in_region =
            Region::create(&in_path, spec(KIND_IN), ident).map_err(ClientError::Region)?;
        let out_region = match Region::create(&out_path, spec(KIND_OUT), ident) {
            Ok(r) => r,
            Err(e) => {
                let _ = Region::remove(&in_path);
                return Err(ClientError::Region(e));
            }
        };
        out_region.set_consumer_identity(ident);
        let requests = in_region.producer().map_err(ClientError::Region)?;
        let responses = out_region.consumer().map_err(ClientError::Region)?;
        // Register last: the engine only looks at complete clients.
        let Some(entry) = control.claim_client(id, ident.pid, ident.start_time) else {
            let _ = Region::remove(&in_path);
            let _ = Region::remove(&out_path);
            return Err(ClientError::RegistryFull { max: MAX_CLIENTS });
        };
        Ok(Client {
            id,
            entry,
            control,
            in_region,
            out_region,
            requests,
            responses,
            buf: BatchBuf::with_capacity(4096),
            answered: 0,
            ready: VecDeque::new(),
            no_active_bound: DEFAULT_NO_ACTIVE_BOUND,
            no_active_since: None,
            empty_polls: 0,
            submits: 0,
            last_status: None,
        })
    }

    /// This client's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How long no live active may last before polls report [`ClientError::NoActive`]
    /// (default [`DEFAULT_NO_ACTIVE_BOUND`]).
    pub fn set_no_active_bound(&mut self, bound: Duration) {
        self.no_active_bound = bound;
    }

    /// Submit a request; returns its sequence number (responses carry it). `Ok(None)` when the
    /// request ring is full (the engine is behind): try again later.
    pub fn try_submit(&mut self, request: &[u8]) -> Result<Option<u64>, ClientError> {
        self.try_submit_with(request.len(), |out| out.copy_from_slice(request))
    }

    /// [`try_submit`](Self::try_submit) of a request of `len` bytes that `fill` writes in
    /// place, straight into the request ring (claimed, filled, committed: no staging copy).
    /// `fill` must write all `len` bytes (the room holds whatever an earlier lap left); it
    /// runs only when there is room.
    pub fn try_submit_with(
        &mut self,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<Option<u64>, ClientError> {
        // The close words every `WORDS_EVERY` submits and on a full ring, not on every one
        // (see `status`); a request submitted into rings the engine closed meanwhile is
        // answered by `ClientClosed` at the next polls.
        self.submits = self.submits.wrapping_add(1);
        if self.submits % WORDS_EVERY == 0 {
            self.check_closed()?;
        }
        // The request's sequence is its frame's: when the frame wraps, a padding frame with a
        // sequence of its own goes first, so read it from what was committed.
        let mut batch = self.requests.batch();
        match batch.push_with(REQUEST, 1, 0, len, fill) {
            Ok(()) => {
                let c = batch.commit().expect("a batch with one request");
                Ok(Some(c.first_seq + c.frames as u64 - 1))
            }
            Err(PushError::Full { .. }) => {
                self.check_closed()?;
                Ok(None)
            }
            Err(_) => Err(ClientError::TooLarge { found: len }),
        }
    }

    /// Submit, waiting (spinning, then yielding) while the ring is full; while it stays full
    /// the cluster's status is checked as in [`poll_response`](Self::poll_response).
    pub fn submit(&mut self, request: &[u8]) -> Result<u64, ClientError> {
        let mut spins = 0u32;
        loop {
            if let Some(seq) = self.try_submit(request)? {
                return Ok(seq);
            }
            spins = spins.saturating_add(1);
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                self.status(true)?;
                std::thread::yield_now();
            }
        }
    }

    /// Submit raw bytes as a frame of any record type (for tests of malformed input).
    #[doc(hidden)]
    pub fn submit_raw(&mut self, record_type: u16, payload: &[u8]) -> bool {
        self.requests
            .try_publish(record_type, 1, 0, payload)
            .is_ok()
    }

    /// The engine closed our rings: its reason (ring close words first, then the registry's
    /// refusal word for rings it could not open).
    fn check_closed(&self) -> Result<(), ClientError> {
        let word = self
            .out_region
            .closed()
            .or_else(|| self.in_region.closed())
            .or_else(|| match self.control.client_refused(self.entry) {
                0 => None,
                r => Some(r),
            });
        match word {
            Some(w) => Err(ClientError::ClientClosed {
                reason: CloseReason::from_word(w),
            }),
            None => Ok(()),
        }
    }

    /// Read one batch of answers from the ring into `ready`. Duplicates (a response
    /// re-emitted by a new active) are dropped here.
    fn fill(&mut self) -> Result<bool, ClientError> {
        match self.responses.poll(&mut self.buf) {
            Ok(false) => Ok(false),
            Ok(true) => {
                for f in self.buf.frames() {
                    let p = f.payload;
                    let word = |i: usize| {
                        p.get(i * 8..i * 8 + 8)
                            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    };
                    let (seq, answer) = match (f.meta.record_type, word(0)) {
                        (RESPONSE, Some(seq)) => (seq, Answer::Response(p[8..].to_vec())),
                        (RESPONSE_TOO_LARGE, Some(seq)) if p.len() == 24 => (
                            seq,
                            Answer::TooLarge {
                                found: word(1).unwrap_or(0),
                                max: word(2).unwrap_or(0),
                            },
                        ),
                        (t, _) => {
                            return Err(ClientError::BadResponse(format!(
                                "expected a response frame (type {RESPONSE}, at least 8 bytes, or type {RESPONSE_TOO_LARGE}, 24 bytes), found type {t} with {} bytes",
                                p.len()
                            )))
                        }
                    };
                    if seq < self.answered {
                        continue; // re-emitted after a role change: already delivered
                    }
                    self.answered = seq.checked_add(1).ok_or_else(|| {
                        ClientError::BadResponse(format!(
                            "expected a request sequence below {}, found {seq}",
                            u64::MAX
                        ))
                    })?;
                    self.ready.push_back((seq, answer));
                }
                // An answer is proof that an engine is active: a later outage is timed from
                // its own start, not from a failover seen before.
                self.no_active_since = None;
                Ok(true)
            }
            Err(e) => Err(ClientError::BadResponse(e.to_string())),
        }
    }

    fn deliver(seq: u64, answer: Answer) -> Result<Option<(u64, Vec<u8>)>, ClientError> {
        match answer {
            Answer::Response(r) => Ok(Some((seq, r))),
            Answer::TooLarge { found, max } => Err(ClientError::ResponseTooLarge {
                request_seq: seq,
                found,
                max,
            }),
        }
    }

    /// The next response, if one arrived: `(request sequence, response bytes)`. Duplicates (a
    /// response re-emitted by a new active) are dropped here. When none is waiting, the
    /// cluster's status is checked (the down mark at every such poll, the close words every 16; files and the active's
    /// liveness every 20 ms): `Err(ClusterDown)`, `Err(NoActive { .. })` once there has been
    /// no live active for longer than the bound, `Err(ClientClosed { .. })`; see the module
    /// documentation. `Err(ResponseTooLarge { .. })` answers one request and leaves the
    /// client usable.
    pub fn poll_response(&mut self) -> Result<Option<(u64, Vec<u8>)>, ClientError> {
        if self.ready.is_empty() {
            self.fill()?;
        }
        if let Some((seq, a)) = self.ready.pop_front() {
            self.empty_polls = 0;
            return Self::deliver(seq, a);
        }
        self.status(false)?;
        Ok(None)
    }

    /// Check the cluster's status while nothing arrives: closed rings and the down mark each
    /// time; every [`STATUS_EVERY`] (or when `now`), the control file's link and the active.
    fn status(&mut self, now: bool) -> Result<(), ClientError> {
        self.empty_polls = self.empty_polls.wrapping_add(1);
        // The close words are looked at every `WORDS_EVERY` empty polls (tens of ns apart),
        // not at every one: the response ring's close word shares its cache line with the
        // word the engine writes after every response (the egress position), so reading it
        // while waiting would pull that line across cores once per round trip, on the
        // client's critical path. The down mark's line changes only with commands.
        if now || self.empty_polls % WORDS_EVERY == 0 {
            self.check_closed()?;
        }
        if self.control.cluster_state() == Ok(ClusterState::Down) {
            return Err(ClientError::ClusterDown);
        }
        if !now && self.empty_polls % 64 != 0 {
            return Ok(());
        }
        if self.last_status.is_some_and(|t| t.elapsed() < STATUS_EVERY) {
            return Ok(());
        }
        self.last_status = Some(Instant::now());
        if !self.control.still_linked() {
            return Err(ClientError::ClusterDown);
        }
        if self.active_alive() {
            self.no_active_since = None;
            return Ok(());
        }
        let now_ns = crate::control::monotonic_ns();
        let since = *self.no_active_since.get_or_insert(now_ns);
        if now_ns.saturating_sub(since) >= self.no_active_bound.as_nanos() as u64 {
            return Err(ClientError::NoActive { since_ns: since });
        }
        Ok(())
    }

    /// A live engine is active: the control block names an active slot whose record says
    /// active in the current epoch, and its process (pid + start time) is alive. A damaged
    /// word with no intact copy counts as no evidence of an active (a live engine repairs
    /// its words within milliseconds).
    fn active_alive(&self) -> bool {
        let c = &self.control;
        let (Ok(epoch), Ok(Some(a))) = (c.epoch_checked(), c.active_slot_checked()) else {
            return false;
        };
        let (Ok(pid), Ok(st), Ok(role), Ok(e)) = (
            c.get_checked(a, Field::Pid),
            c.get_checked(a, Field::StartTime),
            c.get_checked(a, Field::Role),
            c.get_checked(a, Field::Epoch),
        ) else {
            return false;
        };
        if Role::from_word(role) != Role::Active || e != epoch || pid == 0 {
            return false;
        }
        let Ok(pid) = u32::try_from(pid) else {
            return false;
        };
        let id = ProcessIdentity {
            pid,
            start_time_ticks: st,
        };
        // A /proc read error is not proof of death.
        !matches!(
            id.check(),
            Ok(Liveness::Exited | Liveness::Reaped | Liveness::PidReused { .. })
        )
    }

    /// Wait up to `timeout` for the next response (errors as [`poll_response`](Self::poll_response)).
    pub fn wait_response(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<(u64, Vec<u8>)>, ClientError> {
        let t = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(r) = self.poll_response()? {
                return Ok(Some(r));
            }
            // Reading the clock costs tens of ns on a VM (a spin between two polls): check
            // the timeout every 64 polls, so a response is noticed sooner.
            if timeout.is_zero() || spins % 64 == 63 && t.elapsed() >= timeout {
                return Ok(None);
            }
            spins = spins.wrapping_add(1);
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Submit and wait up to `timeout` for this request's response. Answers to other requests
    /// in flight that arrive meanwhile are kept, in order, for
    /// [`poll_response`](Self::poll_response). Errors as `poll_response`;
    /// `Err(ResponseTooLarge)` only for this request.
    pub fn call(
        &mut self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let seq = self.submit(request)?;
        let t = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(i) = self.ready.iter().position(|(s, _)| *s == seq) {
                let (s, a) = self.ready.remove(i).expect("index in range");
                return Self::deliver(s, a).map(|r| r.map(|(_, bytes)| bytes));
            }
            if !self.fill()? {
                self.status(false)?;
                if spins % 64 == 63 && t.elapsed() >= timeout {
                    return Ok(None);
                }
                spins = spins.wrapping_add(1);
                if spins < 2000 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.in_region.close(CLOSE_BY_CLIENT);
        self.out_region.close(CLOSE_BY_CLIENT);
        self.control.release_client(self.entry, self.id);
        let _ = Region::remove(self.in_region.path());
        let _ = Region::remove(self.out_region.path());
    }
}

/// The engine's side of one client.
struct Conn {
    id: u64,
    entry: usize,
    owner: ProcessIdentity,
    in_region: Region,
    out_region: Region,
    requests: Consumer<RegionMemory>,
    responses: Producer<RegionMemory>,
    /// Frames of the last batch read, served one at a time.
    batch: BatchBuf,
    next_frame: usize,
    /// Responses since the client's published position was last sampled for the counters.
    unsampled: u32,
}

/// The active engine's [`Input`]: every registered client's rings, served round-robin.
pub struct ClientInput {
    dir: PathBuf,
    control: Control,
    conns: Vec<Conn>,
    rr: usize,
    last_scan_ns: u64,
    last_liveness_ns: u64,
    retired: Vec<u64>,
    /// Clients we closed: not reopened.
    closed: Vec<u64>,
    /// Clients whose rings failed to open with an I/O error, already reported.
    io_warned: Vec<u64>,
    /// Positions replicated before we became active, applied when a client's rings open.
    resume_at: Vec<(u64, SourcePosition)>,
    /// The client area of the live counters (`crate::counters`), mapped when we first become
    /// active (the engine created the file at its start); `None` if counters are off.
    counters: Option<crate::counters::ClientsWriter>,
    /// Mapping it was tried (once: a failure is not retried on the serving path).
    counters_tried: bool,
    /// Test hook: abort after this many commits, between commit and egress.
    #[cfg(feature = "fault-injection")]
    crash_before_egress_after: Option<u64>,
    #[cfg(feature = "fault-injection")]
    commits: u64,
}

impl ClientInput {
    /// Serve the clients of the cluster in `dir`.
    pub fn new(dir: &Path) -> Result<ClientInput, ClientError> {
        let control = Control::open_or_create(dir).map_err(ClientError::Control)?;
        Ok(ClientInput {
            dir: dir.to_owned(),
            control,
            conns: Vec::new(),
            rr: 0,
            last_scan_ns: 0,
            last_liveness_ns: 0,
            retired: Vec::new(),
            closed: Vec::new(),
            io_warned: Vec::new(),
            resume_at: Vec::new(),
            counters: None,
            counters_tried: false,
            // Test hook (cargo feature `fault-injection` only; a release build has none).
            #[cfg(feature = "fault-injection")]
            crash_before_egress_after: std::env::var("UNDERSTUDY_TEST_CRASH_BEFORE_EGRESS")
                .ok()
                .and_then(|v| v.parse().ok()),
            #[cfg(feature = "fault-injection")]
            commits: 0,
        })
    }

    /// Connected clients.
    pub fn clients(&self) -> usize {
        self.conns.len()
    }

    fn scan(&mut self) {
        for entry in 0..MAX_CLIENTS {
            let Some((id, pid, st)) = self.control.client(entry) else {
                continue;
            };
            if self.conns.iter().any(|c| c.id == id) || self.closed.contains(&id) {
                continue;
            }
            match self.open(entry, id, pid, st) {
                Ok(c) => {
                    info!(client = format!("{id:016x}"), "client connected");
                    if let Some(k) = &self.counters {
                        k.connect(
                            c.entry,
                            c.id,
                            c.requests.position(),
                            c.requests.producer_position(),
                        );
                    }
                    self.conns.push(c);
                }
                // Files gone: the client is going away and releases its entry.
                Err(ClientError::Region(shm_layout::region::RegionError::Io {
                    source, ..
                })) if source.kind() == std::io::ErrorKind::NotFound => {}
                // A failed system call (out of file descriptors, of memory) says nothing
                // about the client: retried at the next scan, reported once.
                Err(e @ ClientError::Region(shm_layout::region::RegionError::Io { .. })) => {
                    if !self.io_warned.contains(&id) {
                        self.io_warned.push(id);
                        warn!(
                            client = format!("{id:016x}"),
                            "client rings not opened yet: {e}"
                        );
                    }
                }
                Err(e) => {
                    // Never retried (a damaged ring stays damaged): the client is told
                    // through its registry entry, since its rings may not even open.
                    warn!(
                        client = format!("{id:016x}"),
                        "client refused, its rings are not usable: {e}"
                    );
                    self.closed.push(id);
                    if !matches!(e, ClientError::ClientClosed { .. }) {
                        self.control.refuse_client(entry, id, CLOSE_UNUSABLE);
                    }
                }
            }
        }
    }

    fn open(&mut self, entry: usize, id: u64, pid: u64, st: u64) -> Result<Conn, ClientError> {
        let in_region = Region::open(&Control::client_in_path(&self.dir, id), REGION_READY_WAIT)
            .map_err(ClientError::Region)?;
        let out_region = Region::open(&Control::client_out_path(&self.dir, id), REGION_READY_WAIT)
            .map_err(ClientError::Region)?;
        if let Some(r) = in_region.closed().or(out_region.closed()) {
            return Err(ClientError::ClientClosed {
                reason: CloseReason::from_word(r),
            });
        }
        if in_region.kind() != KIND_IN || out_region.kind() != KIND_OUT {
            return Err(ClientError::Setup(format!(
                "client rings: expected kinds {KIND_IN}/{KIND_OUT}, found {}/{}",
                in_region.kind(),
                out_region.kind()
            )));
        }
        let mut requests = in_region.consumer().map_err(ClientError::Region)?;
        requests.set_auto_release(false);
        let mut responses = out_region.resume_producer().map_err(ClientError::Region)?;
        if let Some(i) = self.resume_at.iter().position(|(s, _)| *s == id) {
            let (_, p) = self.resume_at.swap_remove(i);
            if p.next_pos != requests.position() {
                requests
                    .seek(p.next_pos, p.next_seq)
                    .map_err(|e| ClientError::Setup(format!("ingress position: {e}")))?;
            }
            // Re-emit the last committed response if it never reached egress.
            let emitted = out_region.user_word(0).load(Ordering::Acquire);
            if emitted <= p.request_seq {
                info!(
                    client = format!("{id:016x}"),
                    request = p.request_seq,
                    "re-emitting a committed response that never reached the client"
                );
                write_response(&mut responses, &out_region, p.request_seq, &p.response)?;
            }
        }
        Ok(Conn {
            id,
            entry,
            owner: ProcessIdentity {
                pid: pid.min(u32::MAX as u64) as u32,
                start_time_ticks: st,
            },
            in_region,
            out_region,
            requests,
            responses,
            batch: BatchBuf::with_capacity(4096),
            next_frame: 0,
            unsampled: 0,
        })
    }

    fn drop_conn(&mut self, i: usize, reason: u64, why: &str) {
        let c = self.conns.swap_remove(i);
        warn!(client = format!("{:016x}", c.id), "client dropped: {why}");
        if let Some(k) = &self.counters {
            k.disconnect(c.entry);
        }
        // Never reopen it (a closed client keeps its registry entry until it goes away).
        self.closed.push(c.id);
        c.in_region.close(reason);
        c.out_region.close(reason);
        if reason != CLOSE_GARBAGE && reason != CLOSE_SLOW {
            self.control.release_client(c.entry, c.id);
            let _ = Region::remove(c.in_region.path());
            let _ = Region::remove(c.out_region.path());
        }
        self.retired.push(c.id);
        if self.rr >= self.conns.len() {
            self.rr = 0;
        }
    }
}

/// A client process is gone for sure (a /proc read error is not proof of death).
fn gone(owner: &ProcessIdentity) -> bool {
    matches!(
        owner.check(),
        Ok(crate::liveness::Liveness::Exited
            | crate::liveness::Liveness::Reaped
            | crate::liveness::Liveness::PidReused { .. })
    )
}

/// Write the response to `request_seq` into the client's ring: one frame, the request sequence
/// then the response, claimed and written in place (no staging copy, no allocation whatever
/// its size).
fn write_response(
    responses: &mut Producer<RegionMemory>,
    out_region: &Region,
    request_seq: u64,
    response: &[u8],
) -> Result<(), ClientError> {
    let mut too_large: Option<usize> = None;
    let mut started = None;
    loop {
        let mut b = responses.batch();
        let pushed = match too_large {
            None => b.push_with(RESPONSE, 1, 8, 8 + response.len(), |out| {
                let (head, rest) = out.split_at_mut(8);
                head.copy_from_slice(&request_seq.to_le_bytes());
                rest.copy_from_slice(response);
            }),
            Some(max_bytes) => b.push_with(RESPONSE_TOO_LARGE, 1, 8, 24, |out| {
                out[..8].copy_from_slice(&request_seq.to_le_bytes());
                out[8..16].copy_from_slice(&(response.len() as u64).to_le_bytes());
                out[16..].copy_from_slice(&(max_bytes as u64).to_le_bytes());
            }),
        };
        match pushed {
            Ok(()) => {
                b.commit();
                // SYNC POINT: response emitted (Release; Acquire in `ClientInput::open`).
                out_region
                    .user_word(0)
                    .store(request_seq.saturating_add(1), Ordering::Release);
                return Ok(());
            }
            // A full response ring means the client stopped reading (it holds tens of
            // thousands of responses); give it 2 ms, never long enough to stall the engine.
            Err(PushError::Full { .. })
                if started.get_or_insert_with(Instant::now).elapsed()
                    < FULL_RESPONSE_RING_GRACE =>
            {
                std::hint::spin_loop();
            }
            Err(PushError::Full { .. }) => {
                return Err(ClientError::ClientClosed {
                    reason: CloseReason::Slow,
                })
            }
            // A response the ring can never carry: refused here, at the source, with an error
            // in its place that the client decodes; the client stays connected.
            Err(PushError::TooLarge { max_bytes, .. }) if too_large.is_none() => {
                warn!(
                    request = request_seq,
                    bytes = response.len(),
                    max_bytes,
                    "response too large for the client's ring; sending an error in its place"
                );
                too_large = Some(max_bytes);
            }
            Err(_) => {
                return Err(ClientError::TooLarge {
                    found: response.len(),
                })
            }
        }
    }
}

impl Input for ClientInput {
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta> {
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            let c = &mut self.conns[i];
            if c.next_frame >= c.batch.len() {
                match c.requests.poll(&mut c.batch) {
                    // One request per batch: a release inside a batch would leave a successor
                    // reading from a continuation frame.
                    Ok(true) if c.batch.len() != 1 => {
                        let why = format!(
                            "expected one request per batch, found a batch of {} frames",
                            c.batch.len()
                        );
                        self.drop_conn(i, CLOSE_GARBAGE, &why);
                        return None;
                    }
                    Ok(true) => c.next_frame = 0,
                    Ok(false) => continue,
                    Err(e) => {
                        let why = format!("malformed request frame: {e}");
                        self.drop_conn(i, CLOSE_GARBAGE, &why);
                        return None;
                    }
                }
            }
            let idx = c.next_frame;
            let f = c.batch.frames().nth(idx).expect("frame index in range");
            if f.meta.record_type != REQUEST {
                let why = format!(
                    "expected a request frame (type {REQUEST}), found type {}",
                    f.meta.record_type
                );
                self.drop_conn(i, CLOSE_GARBAGE, &why);
                return None;
            }
            let seq = f.meta.seq;
            // The sequence is the client's word: checked, never wrapped.
            let Some(next_seq) = seq.checked_add(1) else {
                let why = format!(
                    "expected a request sequence below {}, found {seq}",
                    u64::MAX
                );
                self.drop_conn(i, CLOSE_GARBAGE, &why);
                return None;
            };
            buf.clear();
            buf.extend_from_slice(f.payload);
            let next_pos = c
                .batch
                .frames()
                .nth(idx + 1)
                .map_or(c.batch.end(), |g| g.meta.pos);
            c.next_frame += 1;
            self.rr = (i + 1) % n;
            return Some(InputMeta {
                source: c.id,
                request_seq: seq,
                next_pos,
                next_seq,
            });
        }
        None
    }

    fn committed(&mut self, meta: &InputMeta, response: &[u8]) {
        #[cfg(feature = "fault-injection")]
        {
            self.commits += 1;
            if self.crash_before_egress_after == Some(self.commits) {
                eprintln!("test hook: crashing between commit and egress");
                std::process::abort();
            }
        }
        let Some(i) = self.conns.iter().position(|c| c.id == meta.source) else {
            return;
        };
        let c = &mut self.conns[i];
        let r = write_response(&mut c.responses, &c.out_region, meta.request_seq, response);
        // The transaction is committed to every standby: the request's slot may be reused.
        c.requests.release_to(meta.next_pos, meta.next_seq);
        // Live counters: relaxed stores to words only we write (no call, lock or allocation).
        // The client's published position (for its lag) lives on a line the client writes on
        // every request: sample it every 64 responses here and at each idle scan, not per request.
        if let Some(k) = &self.counters {
            k.consumed(c.entry, meta.next_pos);
            c.unsampled += 1;
            if c.unsampled >= 64 {
                c.unsampled = 0;
                k.published(c.entry, c.requests.producer_position());
            }
            if r.is_ok() {
                k.response(c.entry);
            }
        }
        if let Err(e) = r {
            let why = e.to_string();
            self.drop_conn(i, CLOSE_SLOW, &why);
        }
    }

    fn resume(&mut self, store: &Store) {
        // Any rings we had open belong to an older role: reopen at replicated positions.
        self.conns.clear();
        self.resume_at = SourcePosition::all(store);
        if !self.counters_tried {
            self.counters_tried = true;
            self.counters = match crate::counters::ClientsWriter::open(&self.dir) {
                Ok(k) => Some(k),
                // Counters off for this cluster: no file, nothing to say.
                Err(e) if e.is_not_found() => None,
                Err(e) => {
                    warn!("live client counters off: {e}");
                    None
                }
            };
        }
        self.scan();
        // Entries a previous active left for clients that are gone.
        if let Some(k) = &self.counters {
            for entry in 0..MAX_CLIENTS {
                if !self.conns.iter().any(|c| c.entry == entry) {
                    k.disconnect(entry);
                }
            }
        }
        self.last_scan_ns = crate::control::monotonic_ns();
    }

    fn idle(&mut self) {
        let now = crate::control::monotonic_ns();
        if now - self.last_scan_ns > 1_000_000 {
            self.last_scan_ns = now;
            self.scan();
            if let Some(k) = &self.counters {
                for c in &mut self.conns {
                    c.unsampled = 0;
                    k.published(c.entry, c.requests.producer_position());
                }
            }
        }
        if now - self.last_liveness_ns > 50_000_000 {
            self.last_liveness_ns = now;
            let mut i = 0;
            while i < self.conns.len() {
                let c = &self.conns[i];
                if c.in_region.closed() == Some(CLOSE_BY_CLIENT) {
                    self.drop_conn(i, CLOSE_BY_CLIENT, "disconnected");
                } else if gone(&c.owner) {
                    self.drop_conn(i, CLOSE_DEAD, "its process is gone");
                } else {
                    i += 1;
                }
            }
            // Garbage-closed or dead clients whose registry entries linger: reclaim them too.
            for entry in 0..MAX_CLIENTS {
                if let Some((id, pid, st)) = self.control.client(entry) {
                    let owner = ProcessIdentity {
                        pid: pid.min(u32::MAX as u64) as u32,
                        start_time_ticks: st,
                    };
                    if gone(&owner) && !self.conns.iter().any(|c| c.id == id) {
                        self.control.release_client(entry, id);
                        let _ = Region::remove(&Control::client_in_path(&self.dir, id));
                        let _ = Region::remove(&Control::client_out_path(&self.dir, id));
                    }
                }
            }
        }
    }

    fn take_retired(&mut self) -> Option<u64> {
        self.retired.pop()
    }
}
