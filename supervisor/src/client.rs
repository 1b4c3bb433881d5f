//! The client side of the control socket: send one request, receive its events and result.
//!
//! Every wait is bounded by the client's timeout ([`DEFAULT_TIMEOUT`] unless set): the
//! connection (a supervisor whose queue of connections is full is waited for, not blocked on),
//! the request's write, and each line of the answer. A long operation's supervisor sends a
//! keepalive event every second, so the timeout runs between lines, not over the whole
//! operation; keepalives are not passed to the caller.
//!
//! # Examples
//!
//! ```no_run
//! use understudy_supervisor::client::Client;
//! use understudy_supervisor::proto::{Op, Request};
//!
//! use std::time::Duration;
//!
//! let client = Client::new("/dev/shm/understudy/demo/supervisor.sock")
//!     .with_timeout(Duration::from_secs(5));
//! let result = client.request(&Request::new(Op::Status), |event| println!("{}", event.message));
//! println!("{:?}", result.map(|r| r.message));
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::proto::{Code, Reply, ReplyKind, Request};

/// How long a client waits to connect, and then for each line, unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest timeout a client takes (a zero one could never connect).
const TIMEOUT_MIN: Duration = Duration::from_millis(1);
/// How often a connect in progress looks whether the supervisor accepted it.
const CONNECT_POLL_INTERVAL: Duration = Duration::from_millis(2);

/// A client of one supervisor's socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

/// Why a request got no result.
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens on the socket.
    NotRunning {
        /// The socket.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The connection broke or a line was not a reply.
    Protocol(String),
    /// The supervisor did not accept the connection, or send the next line, in time.
    Timeout {
        /// The socket.
        socket: PathBuf,
        /// What was waited for.
        waiting_for: &'static str,
        /// How long.
        waited: Duration,
    },
}

impl ClientError {
    /// The exit code.
    pub fn code(&self) -> Code {
        match self {
            ClientError::NotRunning { .. } => Code::NotRunning,
            ClientError::Protocol(_) => Code::Failed,
            ClientError::Timeout { .. } => Code::Timeout,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning { socket, source } => {
                write!(
                    f,
                    "no supervisor answers on {} ({source}); start one with `understudy up --config <cluster.toml>`",
                    socket.display()
                )?;
                if source.kind() == std::io::ErrorKind::NotFound {
                    // The default shm_dir is per user: the likely mistake is another user.
                    write!(
                        f,
                        ", or run this command as the user that runs the supervisor (the \
                         default shm_dir is per user: {} for this one)",
                        crate::config::default_shm_dir().display()
                    )?;
                }
                Ok(())
            }
            ClientError::Protocol(e) => write!(f, "control socket: {e}"),
            ClientError::Timeout {
                socket,
                waiting_for,
                waited,
            } => write!(
                f,
                "control socket {}: expected {waiting_for} within {} ms, found nothing; the \
                 supervisor is busy or hung (its log says which); try again, or give more time \
                 with --timeout",
                socket.display(),
                waited.as_millis()
            ),
        }
    }
}

impl std::error::Error for ClientError {}

impl Client {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another timeout (to connect, then per line; at least 1 ms).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(TIMEOUT_MIN);
        self
    }

    /// Connects within the timeout: a non-blocking connect, retried while the supervisor's
    /// queue of connections is full (`EAGAIN`), so a flooded supervisor is waited for with a
    /// bound instead of blocked on.
    fn connect(&self) -> Result<UnixStream, ClientError> {
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let not_running = |source: std::io::Error| ClientError::NotRunning {
            socket: self.socket.clone(),
            source,
        };
        let address = UnixAddr::new(&self.socket).map_err(|e| not_running(e.into()))?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| ClientError::Protocol(format!("cannot create a socket: {e}")))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &address) {
                Ok(()) => break,
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => {
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout {
                            socket: self.socket.clone(),
                            waiting_for: "the supervisor to accept the connection",
                            waited: self.timeout,
                        });
                    }
                    std::thread::sleep(CONNECT_POLL_INTERVAL);
                }
                Err(e) => return Err(not_running(e.into())),
            }
        }
        let stream = UnixStream::from(fd);
        let io = |e: std::io::Error| ClientError::Protocol(format!("socket setup: {e}"));
        stream.set_nonblocking(false).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        Ok(stream)
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request`, calls `on_event` for each progress line, returns the result line.
    pub fn request(
        &self,
        request: &Request,
        mut on_event: impl FnMut(&Reply),
    ) -> Result<Reply, ClientError> {
        let mut stream = self.connect()?;
        let timed_out = |e: &std::io::Error| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        };
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        stream.write_all(line.as_bytes()).map_err(|e| {
            if timed_out(&e) {
                ClientError::Timeout {
                    socket: self.socket.clone(),
                    waiting_for: "the supervisor to take the request",
                    waited: self.timeout,
                }
            } else {
                ClientError::Protocol(format!("sending the request: {e}"))
            }
        })?;
        for line in BufReader::new(stream).lines() {
            let line = line.map_err(|e| {
                if timed_out(&e) {
                    ClientError::Timeout {
                        socket: self.socket.clone(),
                        waiting_for: "the next reply line",
                        waited: self.timeout,
                    }
                } else {
                    ClientError::Protocol(format!("reading: {e}"))
                }
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let reply: Reply = serde_json::from_str(&line).map_err(|e| {
                ClientError::Protocol(format!("expected a reply line, found `{line}`: {e}"))
            })?;
            match reply.kind {
                ReplyKind::Event if reply.is_keepalive() => {}
                ReplyKind::Event => on_event(&reply),
                ReplyKind::Result => return Ok(reply),
            }
        }
        Err(ClientError::Protocol(
            "the supervisor closed the connection before the result (did it exit?); a restarted \
             supervisor settles an upgrade left in the middle: `understudy status` shows how"
                .into(),
        ))
    }
}
