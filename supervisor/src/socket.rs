//! The control socket's server side: binding it safely and serving it within bounds.
//!
//! - **Binding**: the socket lives in the cluster directory, which is private (verified by
//!   [`shm_layout::trust`]: ours, not writable by anyone else, not a link), and is created
//!   with mode 0600 by binding under a umask of 0177, so it is never reachable with a wider
//!   mode, and nothing is changed by path after the bind.
//! - **Serving**: one thread polls the listener and every connection still sending its
//!   request line; no thread waits on an idle client. A connection must send its line (at most
//!   [`REQUEST_BYTES_MAX`] bytes) within [`REQUEST_WAIT`]; at most [`PENDING_MAX`] connections
//!   (and never more than a quarter of the descriptor limit, so the supervisor keeps the rest)
//!   may be waiting at once (the oldest is refused to make room for a new one, so idle
//!   connections can never lock out an operator), and at most [`IN_FLIGHT_MAX`] requests run
//!   at once (the excess is refused with `busy`). Every refusal is a JSON `result` line. A
//!   client that sent its line with its connect is answered as soon as it is accepted. An
//!   accept error (out of descriptors) closes the oldest idle connection to make room or, with
//!   none to close, pauses accepting 10 → 50 ms instead of spinning.
//! - **Replying**: a thread per request relays the supervisor's replies, with a
//!   [`Reply::keepalive`] event after each second without news, and gives up on a client that
//!   does not read within [`WRITE_WAIT`] (the operation goes on).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::proto::{Code, Reply, ReplyKind, Request, RequestError, REQUEST_BYTES_MAX, SOCKET_NAME};

/// A request from a socket thread, with where to send the replies.
pub(crate) type Inbound = (Request, Sender<Reply>);

/// How long a connection may take to send its request line.
pub const REQUEST_WAIT: Duration = Duration::from_secs(5);
/// Connections waiting for their request line at once (see [`pending_max`]).
pub const PENDING_MAX: usize = 256;

/// The connections that may wait at once under the current descriptor limit: a quarter of
/// it, at least 8, at most [`PENDING_MAX`].
fn pending_max() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 4)
        .unwrap_or(PENDING_MAX)
        .clamp(8, PENDING_MAX)
}
/// Requests being answered at once.
pub const IN_FLIGHT_MAX: usize = 64;
/// How long a client may leave a reply unread before it is dropped.
pub const WRITE_WAIT: Duration = Duration::from_secs(10);
/// A keepalive event after this long without other news.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);
/// The first and the longest pause after an accept error.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// A rate-limited warning is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(1);
/// The longest the socket thread sleeps in `poll` with nothing due.
const POLL_WAKE_MAX: Duration = Duration::from_secs(1);

/// Binds `<dir>/supervisor.sock` with mode 0600 in the private cluster directory `dir`.
///
/// The umask is process-wide: this is called before the socket thread starts, from the one
/// thread that creates files in the supervisor at that point.
pub fn bind(dir: &Path) -> Result<(UnixListener, PathBuf), String> {
    shm_layout::trust::check_private_dir(dir).map_err(|e| e.to_string())?;
    let socket = dir.join(SOCKET_NAME);
    match std::fs::symlink_metadata(&socket) {
        // A previous supervisor's socket (or a link someone could only have made while the
        // directory was not private): removed, never followed.
        Ok(m) if m.file_type().is_socket() || m.file_type().is_symlink() => {
            std::fs::remove_file(&socket)
                .map_err(|e| format!("cannot remove the old {}: {e}", socket.display()))?
        }
        Ok(_) => {
            return Err(format!(
                "{}: expected a socket or nothing, found another kind of file; remove it",
                socket.display()
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {}: {e}", socket.display())),
    }
    // SAFETY: umask only changes this process's file-creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(&socket);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| format!("cannot bind {}: {e}", socket.display()))?;
    let meta = std::fs::symlink_metadata(&socket)
        .map_err(|e| format!("cannot inspect {}: {e}", socket.display()))?;
    let mode = meta.mode() & 0o777;
    if !meta.file_type().is_socket() || meta.uid() != shm_layout::trust::euid() || mode != 0o600 {
        let _ = std::fs::remove_file(&socket);
        return Err(format!(
            "{}: expected a socket of uid {} with mode 0600, found uid {} mode {mode:04o}",
            socket.display(),
            shm_layout::trust::euid(),
            meta.uid()
        ));
    }
    Ok((listener, socket))
}

/// A connection still sending its request line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Writes `reply` once, without blocking, and closes: for refusals from the polling thread
/// (the socket's buffer is empty, so one short line fits).
fn refuse(mut stream: UnixStream, reply: &Reply) {
    let _ = stream.set_nonblocking(true);
    if let Ok(mut line) = serde_json::to_string(reply) {
        line.push('\n');
        let _ = stream.write(line.as_bytes());
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// A warning at most once a second.
struct RateLimitedWarn {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedWarn {
    fn warn(&mut self, message: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        let suppressed = std::mem::take(&mut self.suppressed);
        warn!(suppressed, "control socket: {message}");
        self.last = Some(now);
    }
}

/// Serves the socket until the supervisor exits (this thread never returns on its own).
pub fn serve(listener: UnixListener, tx: Sender<Inbound>) {
    if let Err(e) = listener.set_nonblocking(true) {
        warn!("control socket: cannot make the listener non-blocking: {e}");
    }
    let mut server = Server {
        listener,
        tx,
        uid: shm_layout::trust::euid(),
        in_flight: Arc::new(AtomicUsize::new(0)),
        pending: VecDeque::new(),
        backoff: ACCEPT_BACKOFF_MIN,
        accept_paused_until: None,
        warned: RateLimitedWarn {
            last: None,
            suppressed: 0,
        },
    };
    loop {
        server.turn();
    }
}

/// The socket thread's state.
struct Server {
    listener: UnixListener,
    tx: Sender<Inbound>,
    /// Our user: the only peer admitted.
    uid: u32,
    /// Requests relayed to the supervisor and not answered yet.
    in_flight: Arc<AtomicUsize>,
    /// Connections accepted that have not sent their whole line, oldest first.
    pending: VecDeque<Pending>,
    /// The pause after the next failed accept.
    backoff: Duration,
    accept_paused_until: Option<Instant>,
    warned: RateLimitedWarn,
}

impl Server {
    /// Waits (at most a second) for the listener or a waiting connection, then serves what
    /// is ready.
    fn turn(&mut self) {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
        let listening = self.accept_paused_until.is_none();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.pending.len() + 1);
        if listening {
            fds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for p in &self.pending {
            fds.push(libc::pollfd {
                fd: p.stream.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut wake = now + POLL_WAKE_MAX;
        if let Some(t) = self.accept_paused_until {
            wake = wake.min(t);
        }
        if let Some(p) = self.pending.front() {
            wake = wake.min(p.deadline);
        }
        let timeout_ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                self.warned.warn(format_args!("poll failed: {e}"));
                std::thread::sleep(ACCEPT_BACKOFF_MIN);
            }
            return;
        }
        let (listener_fd, pending_fds) = if listening {
            (Some(fds[0]), &fds[1..])
        } else {
            (None, &fds[..])
        };
        self.read_pending(pending_fds);
        self.expire();
        if listener_fd.is_some_and(|fd| fd.revents != 0) {
            self.accept_queued();
        }
    }

    /// Reads what the waiting connections sent (`fds`, in their order); a complete line is
    /// dispatched.
    fn read_pending(&mut self, fds: &[libc::pollfd]) {
        let mut kept = VecDeque::with_capacity(self.pending.len());
        for (mut p, fd) in self.pending.drain(..).zip(fds.iter()) {
            if fd.revents == 0 {
                kept.push_back(p);
                continue;
            }
            match read_some(&mut p) {
                ReadState::More => kept.push_back(p),
                ReadState::Line(end) => {
                    let line: Vec<u8> = p.line[..end].to_vec();
                    dispatch(p.stream, &line, &self.tx, &self.in_flight);
                }
                ReadState::Failed(e) => {
                    refuse(p.stream, &Reply::result(Code::Usage, e.to_string()))
                }
                ReadState::Gone => {}
            }
        }
        self.pending = kept;
    }

    /// Refuses the connections that did not send a line in time.
    fn expire(&mut self) {
        let now = Instant::now();
        while self.pending.front().is_some_and(|p| p.deadline <= now) {
            if let Some(p) = self.pending.pop_front() {
                let e = RequestError::Incomplete {
                    found: format!(
                        "no complete line within {} s ({} bytes received)",
                        REQUEST_WAIT.as_secs(),
                        p.line.len()
                    ),
                };
                refuse(p.stream, &Reply::result(Code::Usage, e.to_string()));
            }
        }
    }

    /// Accepts what is queued, a bounded number per turn.
    fn accept_queued(&mut self) {
        let pending_max = pending_max();
        for _ in 0..PENDING_MAX {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    self.backoff = ACCEPT_BACKOFF_MIN;
                    if let Some(stream) = admit(stream, self.uid, &mut self.warned) {
                        self.take(stream, pending_max);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if !self.accept_failed(&e) {
                        break;
                    }
                }
            }
        }
    }

    /// An admitted connection: answered at once if its line came with the connect, else it
    /// waits (the oldest waiting one refused to make room when `pending_max` wait).
    fn take(&mut self, stream: UnixStream, pending_max: usize) {
        let mut fresh = Pending {
            stream,
            line: Vec::new(),
            deadline: Instant::now() + REQUEST_WAIT,
        };
        // A client that wrote its line with the connect is answered at once, whatever crowd
        // of idle connections surrounds it.
        match read_some(&mut fresh) {
            ReadState::More => {}
            ReadState::Line(end) => {
                let line: Vec<u8> = fresh.line[..end].to_vec();
                dispatch(fresh.stream, &line, &self.tx, &self.in_flight);
                return;
            }
            ReadState::Failed(e) => {
                refuse(fresh.stream, &Reply::result(Code::Usage, e.to_string()));
                return;
            }
            ReadState::Gone => return,
        }
        while self.pending.len() >= pending_max {
            if let Some(oldest) = self.pending.pop_front() {
                refuse(
                    oldest.stream,
                    &Reply::result(
                        Code::Busy,
                        format!(
                            "refused: {pending_max} connections were waiting to send a request; the oldest (this one) made room"
                        ),
                    ),
                );
            }
        }
        self.pending.push_back(fresh);
    }

    /// An accept failed with `e`: `true` to try again at once.
    ///
    /// Out of descriptors (EMFILE/ENFILE) or memory. While connections wait idle, the oldest
    /// makes room and the accept is retried (the queue drains; a client that sent its line
    /// is answered on accept); with none to free, accepting pauses instead of spinning.
    fn accept_failed(&mut self, e: &io::Error) -> bool {
        if let Some(oldest) = self.pending.pop_front() {
            self.warned.warn(format_args!(
                "accept failed: {e}; the oldest of {} idle connections was closed to make room",
                self.pending.len() + 1
            ));
            refuse(
                oldest.stream,
                &Reply::result(
                    Code::Busy,
                    "refused: the supervisor is out of file descriptors; the oldest waiting connection (this one) made room",
                ),
            );
            return true;
        }
        self.warned.warn(format_args!(
            "accept failed: {e}; pausing {} ms ({} requests running)",
            self.backoff.as_millis(),
            self.in_flight.load(Ordering::Relaxed)
        ));
        self.accept_paused_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
        false
    }
}

/// Checks the peer's uid; a stream of our user, non-blocking, or `None` (refused).
fn admit(stream: UnixStream, uid: u32, warned: &mut RateLimitedWarn) -> Option<UnixStream> {
    match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(peer) if peer.uid() == uid => {}
        Ok(peer) => {
            warned.warn(format_args!(
                "refused a client of another user (uid {}, pid {})",
                peer.uid(),
                peer.pid()
            ));
            refuse(
                stream,
                &Reply::result(
                    Code::Usage,
                    format!(
                        "refused: expected a client of uid {uid}, found uid {}",
                        peer.uid()
                    ),
                ),
            );
            return None;
        }
        Err(e) => {
            warned.warn(format_args!("cannot read a client's credentials: {e}"));
            return None;
        }
    }
    stream.set_nonblocking(true).ok()?;
    Some(stream)
}

enum ReadState {
    /// No complete line yet.
    More,
    /// A line ends before this index (an EOF also ends one).
    Line(usize),
    /// Too long or unreadable.
    Failed(RequestError),
    /// Closed before sending anything.
    Gone,
}

fn read_some(p: &mut Pending) -> ReadState {
    let mut chunk = [0u8; 8192];
    loop {
        match p.stream.read(&mut chunk) {
            Ok(0) if p.line.is_empty() => return ReadState::Gone,
            // A client that shut down its side without a newline sent its line.
            Ok(0) => return ReadState::Line(p.line.len()),
            Ok(n) => {
                let start = p.line.len();
                p.line.extend_from_slice(&chunk[..n]);
                if let Some(i) = p.line[start..].iter().position(|&b| b == b'\n') {
                    return ReadState::Line(start + i);
                }
                if p.line.len() > REQUEST_BYTES_MAX {
                    return ReadState::Failed(RequestError::TooLong {
                        found_bytes: p.line.len(),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadState::More,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return ReadState::Failed(RequestError::Incomplete {
                    found: format!("a read error ({e})"),
                })
            }
        }
    }
}

/// Decreases the in-flight count when a request's thread ends.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn dispatch(stream: UnixStream, line: &[u8], tx: &Sender<Inbound>, in_flight: &Arc<AtomicUsize>) {
    let request = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return refuse(stream, &Reply::result(Code::Usage, e.to_string())),
    };
    let running = in_flight.fetch_add(1, Ordering::AcqRel);
    let guard = InFlight(in_flight.clone());
    if running >= IN_FLIGHT_MAX {
        drop(guard);
        return refuse(
            stream,
            &Reply::result(
                Code::Busy,
                format!("refused: {IN_FLIGHT_MAX} requests are being answered; try again"),
            ),
        );
    }
    let tx = tx.clone();
    // Kept to answer on if no thread can be started (the closure takes the stream with it).
    let fallback = stream.try_clone().ok();
    let spawned = std::thread::Builder::new()
        .name("control-client".into())
        .spawn(move || {
            let _guard = guard;
            if let Err(e) = relay(stream, request, &tx) {
                warn!("control client: {e}");
            }
        });
    if let Err(e) = spawned {
        warn!("control socket: cannot start a client thread: {e}");
        if let Some(stream) = fallback {
            refuse(
                stream,
                &Reply::result(
                    Code::Busy,
                    format!("refused: the supervisor cannot start a thread for the request ({e}); try again"),
                ),
            );
        }
    }
}

/// Sends `request` to the supervisor and relays its replies to the client.
fn relay(mut stream: UnixStream, request: Request, tx: &Sender<Inbound>) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(WRITE_WAIT))?;
    let write = |out: &mut UnixStream, reply: &Reply| -> io::Result<()> {
        let mut line = serde_json::to_string(reply).map_err(io::Error::other)?;
        line.push('\n');
        out.write_all(line.as_bytes())
    };
    let (reply_tx, reply_rx) = mpsc::channel();
    if tx.send((request, reply_tx)).is_err() {
        return write(
            &mut stream,
            &Reply::result(Code::NotRunning, "the supervisor is shutting down"),
        );
    }
    loop {
        match reply_rx.recv_timeout(KEEPALIVE_EVERY) {
            Ok(reply) => {
                let last = reply.kind == ReplyKind::Result;
                // A client that went away does not stop the operation.
                if write(&mut stream, &reply).is_err() || last {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if write(&mut stream, &Reply::keepalive()).is_err() {
                    return Ok(());
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return write(
                    &mut stream,
                    &Reply::result(
                        Code::Failed,
                        "the supervisor dropped the request without a result (is it stopping?)",
                    ),
                );
            }
        }
    }
}
