//! The client side of the control socket: send one request, receive its events and result.
//!
//! # Examples
//!
//! ```no_run
//! use understudy_supervisor::client::Client;
//! use understudy_supervisor::proto::{Op, Request};
//!
//! let client = Client::new("/dev/shm/understudy/demo/supervisor.sock");
//! let result = client.request(&Request::new(Op::Status), |event| println!("{}", event.message));
//! println!("{:?}", result.map(|r| r.message));
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::proto::{Code, Reply, ReplyKind, Request};

/// A client of one supervisor's socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
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
}

impl ClientError {
    /// The exit code.
    pub fn code(&self) -> Code {
        match self {
            ClientError::NotRunning { .. } => Code::NotRunning,
            ClientError::Protocol(_) => Code::Failed,
        }
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::NotRunning { socket, source } => write!(
                f,
                "no supervisor answers on {} ({source}); start one with `understudy up --config <cluster.toml>`",
                socket.display()
            ),
            ClientError::Protocol(e) => write!(f, "control socket: {e}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl Client {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
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
        let mut stream =
            UnixStream::connect(&self.socket).map_err(|source| ClientError::NotRunning {
                socket: self.socket.clone(),
                source,
            })?;
        let mut line =
            serde_json::to_string(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|e| ClientError::Protocol(format!("sending the request: {e}")))?;
        for line in BufReader::new(stream).lines() {
            let line = line.map_err(|e| ClientError::Protocol(format!("reading: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let reply: Reply = serde_json::from_str(&line).map_err(|e| {
                ClientError::Protocol(format!("expected a reply line, found `{line}`: {e}"))
            })?;
            match reply.kind {
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
