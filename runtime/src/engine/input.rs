//! Where requests come from: the [`Input`] trait, the metadata of one request, and the
//! per-source position kept in the system table so a new active resumes each source.

use super::*;

/// The system table holding, per input source: position, sequence, last request sequence and
/// the last response (so a new active can resume input and re-emit an unsent response).
#[doc(hidden)]
pub const SYS_INPUTS: u16 = 0xFFFF;

/// Where requests come from and answers go.
pub trait Input {
    /// The next request, copied into `buf`; `None` if none is waiting.
    fn poll(&mut self, buf: &mut Vec<u8>) -> Option<InputMeta>;
    /// The transaction that consumed the request described by `meta` is committed to every
    /// standby; `response` may now be delivered.
    fn committed(&mut self, meta: &InputMeta, response: &[u8]);
    /// This engine became active: resume every source after its replicated position (the
    /// `SYS_INPUTS` table of `store`), re-emitting committed responses never delivered.
    fn resume(&mut self, store: &Store);
    /// Housekeeping hook called when idle (e.g. discovering new clients).
    fn idle(&mut self) {}
    /// A source that is gone for good (a dead client): the engine deletes its replicated
    /// position in a transaction of its own.
    fn take_retired(&mut self) -> Option<u64> {
        None
    }
}

/// Where a request came from and where the input stands after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InputMeta {
    /// Source (client) id.
    pub source: u64,
    /// The request's sequence number at its source.
    pub request_seq: u64,
    /// Input position after the request.
    pub next_pos: u64,
    /// Input sequence after the request.
    pub next_seq: u64,
}

/// The replicated position of one input source.
#[derive(Debug, Clone, PartialEq, Eq)]
#[doc(hidden)]
pub struct SourcePosition {
    /// Input position after the last consumed request.
    pub next_pos: u64,
    /// Input sequence after it.
    pub next_seq: u64,
    /// The last request sequence consumed.
    pub request_seq: u64,
    /// The committed response to it.
    pub response: Vec<u8>,
}

impl SourcePosition {
    /// Encode as a `SYS_INPUTS` value.
    pub fn encode(meta: &InputMeta, response: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&meta.next_pos.to_le_bytes());
        out.extend_from_slice(&meta.next_seq.to_le_bytes());
        out.extend_from_slice(&meta.request_seq.to_le_bytes());
        out.extend_from_slice(response);
    }

    /// Decode a `SYS_INPUTS` value (`None` if malformed).
    pub fn decode(v: &[u8]) -> Option<SourcePosition> {
        if v.len() < 24 {
            return None;
        }
        let w = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().expect("8"));
        Some(SourcePosition {
            next_pos: w(0),
            next_seq: w(1),
            request_seq: w(2),
            response: v[24..].to_vec(),
        })
    }

    /// Every source's position in `store`.
    pub fn all(store: &Store) -> Vec<(u64, SourcePosition)> {
        store
            .table(SYS_INPUTS)
            .filter_map(|(k, v)| {
                let id = u64::from_le_bytes(k.try_into().ok()?);
                Some((id, SourcePosition::decode(v)?))
            })
            .collect()
    }
}
