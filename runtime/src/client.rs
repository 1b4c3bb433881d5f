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
//! A client learns of a role change only through latency: it never reconnects or resubmits.
//!
//! # Examples
//!
//! ```no_run
//! use understudy_runtime::client::Client;
//! use std::time::Duration;
//!
//! let mut client = Client::connect("/dev/shm/understudy/demo".as_ref()).unwrap();
//! let seq = client.submit(b"hello").unwrap();
//! let response = client.wait_response(Duration::from_secs(1)).unwrap().unwrap();
//! assert_eq!(response.0, seq);
//! ```

use crate::control::{Control, MAX_CLIENTS};
use crate::engine::{Input, InputMeta, SourcePosition};
use crate::liveness::ProcessIdentity;
use crate::store::Store;
use shm_layout::region::{Identity, Region, RegionMemory, RegionSpec};
use shm_layout::ring::{BatchBuf, Consumer, Producer, PushError};
use shm_layout::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Record type of a request frame.
pub const REQUEST: u16 = 1;
/// Record type of a response frame (payload: request sequence u64, then the response).
pub const RESPONSE: u16 = 2;
/// Region kind tags.
const KIND_IN: u32 = 10;
const KIND_OUT: u32 = 11;
/// Close reasons.
const CLOSE_BY_CLIENT: u64 = 1;
const CLOSE_GARBAGE: u64 = 2;
const CLOSE_DEAD: u64 = 3;
const CLOSE_SLOW: u64 = 4;
/// Default ring capacity of a client's rings.
pub const DEFAULT_CAPACITY: usize = 1 << 20;

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
    /// The engine closed this client's rings.
    Closed {
        /// Why (a close reason code).
        reason: u64,
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
            ClientError::Closed { reason } => write!(
                f,
                "the engine closed this client's rings ({})",
                match *reason {
                    CLOSE_GARBAGE => "it sent malformed frames",
                    CLOSE_DEAD => "it was taken for dead",
                    CLOSE_SLOW => "it did not read its responses",
                    _ => "closed",
                }
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
    ready: std::collections::VecDeque<(u64, Vec<u8>)>,
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

    /// Connect to cluster `name` under `shm_dir`.
    pub fn connect_cluster(shm_dir: &Path, name: &str) -> Result<Client, ClientError> {
        Self::connect(&shm_dir.join(name))
    }

    /// Connect with rings of `capacity` bytes.
    pub fn connect_with(dir: &Path, capacity: usize) -> Result<Client, ClientError> {
        let control = Control::open(dir).map_err(ClientError::Control)?;
        let me = ProcessIdentity::current()
            .map_err(|e| ClientError::Setup(format!("cannot read this process's identity: {e}")))?;
        let ident = Identity {
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
            ready: Default::default(),
        })
    }

    /// This client's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Submit a request; returns its sequence number (responses carry it). `Ok(None)` when the
    /// request ring is full (the engine is behind): try again later.
    pub fn try_submit(&mut self, request: &[u8]) -> Result<Option<u64>, ClientError> {
        if let Some(r) = self.in_region.closed() {
            return Err(ClientError::Closed { reason: r });
        }
        // The request's sequence is its frame's: when the frame wraps, a padding frame with a
        // sequence of its own goes first, so read it from what was committed.
        let mut batch = self.requests.batch();
        match batch.push(REQUEST, 1, 0, request) {
            Ok(()) => {
                let c = batch.commit().expect("a batch with one request");
                Ok(Some(c.first_seq + c.frames as u64 - 1))
            }
            Err(PushError::Full { .. }) => Ok(None),
            Err(_) => Err(ClientError::TooLarge {
                found: request.len(),
            }),
        }
    }

    /// Submit, waiting (spinning, then yielding) while the ring is full.
    pub fn submit(&mut self, request: &[u8]) -> Result<u64, ClientError> {
        let mut spins = 0u32;
        loop {
            if let Some(seq) = self.try_submit(request)? {
                return Ok(seq);
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
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

    /// The next response, if one arrived: `(request sequence, response bytes)`. Duplicates (a
    /// response re-emitted by a new active) are dropped here.
    pub fn poll_response(&mut self) -> Result<Option<(u64, Vec<u8>)>, ClientError> {
        if let Some(r) = self.ready.pop_front() {
            return Ok(Some(r));
        }
        loop {
            match self.responses.poll(&mut self.buf) {
                Ok(false) => {
                    if let Some(r) = self.out_region.closed() {
                        return Err(ClientError::Closed { reason: r });
                    }
                    return Ok(None);
                }
                Ok(true) => {
                    for f in self.buf.frames() {
                        if f.meta.record_type != RESPONSE || f.payload.len() < 8 {
                            return Err(ClientError::BadResponse(format!(
                                "expected a response frame of at least 8 bytes, found type {} with {} bytes",
                                f.meta.record_type,
                                f.payload.len()
                            )));
                        }
                        let seq = u64::from_le_bytes(f.payload[..8].try_into().expect("8"));
                        if seq < self.answered {
                            continue; // re-emitted after a role change: already delivered
                        }
                        self.answered = seq + 1;
                        self.ready.push_back((seq, f.payload[8..].to_vec()));
                    }
                    if let Some(r) = self.ready.pop_front() {
                        return Ok(Some(r));
                    }
                }
                Err(e) => return Err(ClientError::BadResponse(e.to_string())),
            }
        }
    }

    /// Wait up to `timeout` for the next response.
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
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Submit and wait for the response.
    pub fn call(
        &mut self,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let seq = self.submit(request)?;
        let t = Instant::now();
        loop {
            let left = timeout.saturating_sub(t.elapsed());
            match self.wait_response(left)? {
                Some((s, r)) if s == seq => return Ok(Some(r)),
                Some(_) => continue,
                None => return Ok(None),
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
    /// Positions replicated before we became active, applied when a client's rings open.
    resume_at: Vec<(u64, SourcePosition)>,
    /// Test hook: abort after this many commits, between commit and egress.
    crash_before_egress_after: Option<u64>,
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
            resume_at: Vec::new(),
            crash_before_egress_after: std::env::var("UNDERSTUDY_TEST_CRASH_BEFORE_EGRESS")
                .ok()
                .and_then(|v| v.parse().ok()),
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
                    self.conns.push(c);
                }
                Err(e) => warn!(
                    client = format!("{id:016x}"),
                    "client rings not usable: {e}"
                ),
            }
        }
    }

    fn open(&mut self, entry: usize, id: u64, pid: u64, st: u64) -> Result<Conn, ClientError> {
        let in_region = Region::open(
            &Control::client_in_path(&self.dir, id),
            Duration::from_millis(1),
        )
        .map_err(ClientError::Region)?;
        let out_region = Region::open(
            &Control::client_out_path(&self.dir, id),
            Duration::from_millis(1),
        )
        .map_err(ClientError::Region)?;
        if let Some(r) = in_region.closed().or(out_region.closed()) {
            return Err(ClientError::Closed { reason: r });
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
        })
    }

    fn drop_conn(&mut self, i: usize, reason: u64, why: &str) {
        let c = self.conns.swap_remove(i);
        warn!(client = format!("{:016x}", c.id), "client dropped: {why}");
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

fn write_response(
    responses: &mut Producer<RegionMemory>,
    out_region: &Region,
    request_seq: u64,
    response: &[u8],
) -> Result<(), ClientError> {
    // One frame: the request sequence, then the response (on the stack when it is small).
    let mut small = [0u8; 256];
    let heap;
    let payload: &[u8] = if response.len() + 8 <= small.len() {
        small[..8].copy_from_slice(&request_seq.to_le_bytes());
        small[8..8 + response.len()].copy_from_slice(response);
        &small[..8 + response.len()]
    } else {
        let mut v = request_seq.to_le_bytes().to_vec();
        v.extend_from_slice(response);
        heap = v;
        &heap
    };
    let mut started = None;
    loop {
        match responses.try_publish(RESPONSE, 1, 8, payload) {
            Ok(()) => {
                // SYNC POINT: response emitted (Release; Acquire in `ClientInput::open`).
                out_region
                    .user_word(0)
                    .store(request_seq + 1, Ordering::Release);
                return Ok(());
            }
            // A full response ring means the client stopped reading (it holds tens of
            // thousands of responses); give it 2 ms, never long enough to stall the engine.
            Err(PushError::Full { .. })
                if started.get_or_insert_with(Instant::now).elapsed()
                    < Duration::from_millis(2) =>
            {
                std::hint::spin_loop();
            }
            Err(PushError::Full { .. }) => return Err(ClientError::Closed { reason: CLOSE_SLOW }),
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
            buf.clear();
            buf.extend_from_slice(f.payload);
            let seq = f.meta.seq;
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
                next_seq: seq + 1,
            });
        }
        None
    }

    fn committed(&mut self, meta: &InputMeta, response: &[u8]) {
        self.commits += 1;
        if self.crash_before_egress_after == Some(self.commits) {
            eprintln!("test hook: crashing between commit and egress");
            std::process::abort();
        }
        let Some(i) = self.conns.iter().position(|c| c.id == meta.source) else {
            return;
        };
        let c = &mut self.conns[i];
        let r = write_response(&mut c.responses, &c.out_region, meta.request_seq, response);
        // The transaction is committed to every standby: the request's slot may be reused.
        c.requests.release_to(meta.next_pos, meta.next_seq);
        if let Err(e) = r {
            let why = e.to_string();
            self.drop_conn(i, CLOSE_SLOW, &why);
        }
    }

    fn resume(&mut self, store: &Store) {
        // Any rings we had open belong to an older role: reopen at replicated positions.
        self.conns.clear();
        self.resume_at = SourcePosition::all(store);
        self.scan();
        self.last_scan_ns = crate::control::monotonic_ns();
    }

    fn idle(&mut self) {
        let now = crate::control::monotonic_ns();
        if now - self.last_scan_ns > 1_000_000 {
            self.last_scan_ns = now;
            self.scan();
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
