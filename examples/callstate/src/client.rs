//! The callstate client: typed requests over `understudy_runtime::client::Client`.
//!
//! Pipelining: [`CallClient::send`] submits and returns the request's sequence number;
//! [`CallClient::poll`] returns the next answer with the sequence it answers. Answers arrive in
//! request order, exactly once, across failovers, switchovers and upgrades.

use crate::{Request, Totals};
use std::path::Path;
use std::time::Duration;
use understudy_runtime::client::{Client, ClientError};
use understudy_runtime::zerocopy::FromBytes;

/// An answer: `Ok(payload)` (after the `+`) or `Err(reason)` (a refusal).
pub type Answer = Result<Vec<u8>, String>;

/// A connection to a callstate cluster.
pub struct CallClient {
    client: Client,
}

impl CallClient {
    /// Connect to the cluster at `dir` (`<shm_dir>/<cluster>`), waiting up to `timeout` for it.
    pub fn connect(dir: &Path, timeout: Duration) -> Result<CallClient, ClientError> {
        Ok(CallClient {
            client: Client::connect_timeout(dir, timeout)?,
        })
    }

    /// Send a request; returns its sequence number (waits while the request ring is full).
    pub fn send(&mut self, request: &Request) -> Result<u64, ClientError> {
        self.client.submit(&request.encode())
    }

    /// The next answer, if one arrived: `(sequence, answer)`.
    pub fn poll(&mut self) -> Result<Option<(u64, Answer)>, ClientError> {
        Ok(self
            .client
            .poll_response()?
            .map(|(seq, bytes)| (seq, parse(bytes))))
    }

    /// Send and wait for this request's answer (`None` after `timeout`).
    pub fn call(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Option<Answer>, ClientError> {
        Ok(self.client.call(&request.encode(), timeout)?.map(parse))
    }

    /// Calls ringing and calls active, from the active engine's in-memory index.
    pub fn state_counts(&mut self, timeout: Duration) -> Result<Option<(u64, u64)>, ClientError> {
        let a = self.call(&Request::GetStateCounts, timeout)?;
        Ok(a.and_then(|a| a.ok()).and_then(|b| {
            let b = b.get(..16)?;
            let n = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
            Some((n(0), n(8)))
        }))
    }

    /// The cluster's totals.
    pub fn totals(&mut self, timeout: Duration) -> Result<Option<Totals>, ClientError> {
        let a = self.call(&Request::GetTotals, timeout)?;
        Ok(a.and_then(|a| a.ok())
            .and_then(|b| Totals::read_from_bytes(&b).ok()))
    }
}

fn parse(bytes: Vec<u8>) -> Answer {
    match bytes.split_first() {
        Some((b'+', rest)) => Ok(rest.to_vec()),
        Some((b'-', why)) => Err(String::from_utf8_lossy(why).into_owned()),
        _ => Err(format!("malformed answer {bytes:?}")),
    }
}
