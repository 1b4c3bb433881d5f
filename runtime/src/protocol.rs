//! The run-state stream's frames: record types, their fixed blocks (versioned zerocopy
//! records) and the variable bytes that follow them.
//!
//! Stream (active → standby): `Hello`, `Base`, transactions (`PutUnit` / `RetireUnit` / `Put` /
//! `Delete` … then `Commit`, all one batch), `Heartbeat`, `Features`, `StepUp`, catch-up
//! (`SnapBegin`, `PutUnit`/`Put` chunks, `SnapEnd`).
//! Feedback (standby → active): `Hello`, `Ack`.
//!
//! Every decoder takes untrusted bytes and returns an error naming what is wrong.

use crate::store::{Op, Spare};
use shm_layout::record::{decode, Record, RecordError};
use std::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Record type ids of the stream.
pub mod rt {
    /// Engine hello (either direction).
    pub const HELLO: u16 = 1;
    /// The state a stream starts from.
    pub const BASE: u16 = 2;
    /// Register / update a work unit.
    pub const PUT_UNIT: u16 = 3;
    /// Retire a work unit.
    pub const RETIRE_UNIT: u16 = 4;
    /// Put a record.
    pub const PUT: u16 = 5;
    /// Delete a record.
    pub const DELETE: u16 = 6;
    /// Transaction commit (last frame of a transaction's batch).
    pub const COMMIT: u16 = 7;
    /// Heartbeat.
    pub const HEARTBEAT: u16 = 8;
    /// Feature change.
    pub const FEATURES: u16 = 9;
    /// Step-up signal (planned switchover).
    pub const STEP_UP: u16 = 10;
    /// Catch-up begins.
    pub const SNAP_BEGIN: u16 = 11;
    /// Catch-up ends.
    pub const SNAP_END: u16 = 12;
    /// Standby's acknowledgement of what it applied (feedback ring).
    pub const ACK: u16 = 20;
    /// Standby refuses the stream (feedback ring), with a reason.
    pub const REFUSE: u16 = 21;
}

/// A frame that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The fixed block is bad.
    Record(RecordError),
    /// The variable part is shorter than the block says.
    Truncated {
        /// Which frame.
        frame: &'static str,
        /// Bytes the block announces.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// A field holds an impossible value.
    Field {
        /// Which frame.
        frame: &'static str,
        /// Field name.
        field: &'static str,
        /// Value found.
        found: u64,
    },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Record(e) => e.fmt(f),
            DecodeError::Truncated {
                frame,
                expected,
                found,
            } => write!(
                f,
                "`{frame}` frame: expected {expected} bytes of variable data, found {found}"
            ),
            DecodeError::Field {
                frame,
                field,
                found,
            } => write!(
                f,
                "`{frame}` frame: field `{field}` has impossible value {found}"
            ),
        }
    }
}
impl std::error::Error for DecodeError {}

impl From<RecordError> for DecodeError {
    fn from(e: RecordError) -> Self {
        DecodeError::Record(e)
    }
}

macro_rules! record {
    ($t:ident, $id:expr, $name:expr, $size:expr) => {
        impl Record for $t {
            const TYPE_ID: u16 = $id;
            const NAME: &'static str = $name;
            const VERSIONS: &'static [(u16, u16)] = &[(1, $size)];
            fn defaults() -> Self {
                <$t as zerocopy::FromZeros>::new_zeroed()
            }
        }
        shm_layout::assert_record_layout!($t);
    };
}

/// Fixed block of `PutUnit`; followed by `state_len` state bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct PutUnitBlock {
    /// Unit id.
    pub id: u64,
    /// Kind.
    pub kind: u16,
    /// Layout version of the state.
    pub layout_version: u16,
    /// State bytes that follow.
    pub state_len: u32,
}
record!(PutUnitBlock, rt::PUT_UNIT, "put-unit", 16);

/// Fixed block of `RetireUnit`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RetireUnitBlock {
    /// Unit id.
    pub id: u64,
}
record!(RetireUnitBlock, rt::RETIRE_UNIT, "retire-unit", 8);

/// Fixed block of `Put` / `Delete`; followed by key then value bytes.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RecordBlock {
    /// Table id.
    pub table: u16,
    /// Padding.
    pub _pad: u16,
    /// Key bytes.
    pub key_len: u32,
    /// Value bytes (0 for delete).
    pub value_len: u32,
    /// Padding.
    pub _pad2: u32,
}
record!(RecordBlock, rt::PUT, "record", 16);

/// Fixed block of `Commit`; followed by `response_len` response bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct CommitBlock {
    /// Transactions committed before this one (this is transaction number `index + 1`).
    pub index: u64,
    /// Input position after consuming the request (where the next request starts).
    pub input_pos: u64,
    /// Input sequence number after consuming the request.
    pub input_seq: u64,
    /// Which input (client) the request came from.
    pub source: u64,
    /// The request's own sequence number at its source (for deduplication by the client).
    pub request_seq: u64,
    /// Response bytes that follow.
    pub response_len: u32,
    /// Flags (reserved).
    pub flags: u32,
}
record!(CommitBlock, rt::COMMIT, "commit", 48);

/// `Base`, `SnapBegin`, `SnapEnd`, `StepUp`, `Ack`: a position in the history of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Position {
    /// Transactions committed so far.
    pub commits: u64,
    /// Input position.
    pub input_pos: u64,
    /// Input sequence.
    pub input_seq: u64,
    /// State digest.
    pub digest: u64,
    /// Work units.
    pub units: u64,
    /// Epoch.
    pub epoch: u64,
    /// Free argument (step-up: target slot; ack: flags).
    pub arg: u64,
}
record!(Position, rt::BASE, "position", 56);

/// `Heartbeat`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HeartbeatBlock {
    /// Sender's monotonic clock, ns.
    pub now_ns: u64,
    /// Transactions committed.
    pub commits: u64,
}
record!(HeartbeatBlock, rt::HEARTBEAT, "heartbeat", 16);

/// `Features`: the set of enabled features from this point of the stream.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FeaturesBlock {
    /// Bit i = feature id i enabled.
    pub enabled: u64,
    /// Transactions committed before the switch.
    pub commits: u64,
}
record!(FeaturesBlock, rt::FEATURES, "features", 16);

/// Fixed block of `Hello`; followed by the name, then templates, then features.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct HelloBlock {
    /// Application version.
    pub app_version: u32,
    /// Slot of the sender.
    pub slot: u32,
    /// Name bytes.
    pub name_len: u16,
    /// Template declarations (16 bytes each).
    pub templates: u16,
    /// Feature declarations (32 bytes each).
    pub features: u16,
    /// Padding.
    pub _pad: u16,
    /// Sender's enabled feature set.
    pub enabled: u64,
    /// Sender's state position (digest lets an attaching standby skip catch-up).
    pub commits: u64,
    /// Sender's digest.
    pub digest: u64,
    /// Epoch the sender believes current.
    pub epoch: u64,
}
record!(HelloBlock, rt::HELLO, "hello", 48);

/// A feature declaration in a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct FeatureDecl {
    /// Feature id (0..64).
    pub id: u16,
    /// Template the feature needs.
    pub type_id: u16,
    /// Layout version of that template it needs.
    pub layout_version: u16,
    /// Name bytes used (<= 24).
    pub name_len: u16,
    /// Name, zero padded.
    pub name: [u8; 24],
}
const _: () = assert!(core::mem::size_of::<FeatureDecl>() == 32);

/// Append `block`'s bytes then each of `parts` to `out` (cleared first).
pub fn encode_into<R: Record>(out: &mut Vec<u8>, block: &R, parts: &[&[u8]]) {
    out.clear();
    out.extend_from_slice(block.as_bytes());
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// The sum of lengths a block announces, checked: each comes from the peer's bytes.
fn total(frame: &'static str, field: &'static str, parts: &[usize]) -> Result<usize, DecodeError> {
    parts
        .iter()
        .try_fold(0usize, |acc, &n| acc.checked_add(n))
        .ok_or(DecodeError::Field {
            frame,
            field,
            found: parts.iter().map(|&n| n as u64).fold(0, u64::saturating_add),
        })
}

fn var<'a>(
    payload: &'a [u8],
    block_length: u16,
    frame: &'static str,
    len: usize,
) -> Result<&'a [u8], DecodeError> {
    let start = block_length as usize;
    let rest = payload.get(start..).unwrap_or(&[]);
    if rest.len() < len {
        return Err(DecodeError::Truncated {
            frame,
            expected: len,
            found: rest.len(),
        });
    }
    Ok(&rest[..len])
}

/// Decode a store change from a frame of type `record_type`.
pub fn decode_op(record_type: u16, payload: &[u8], block_length: u16) -> Result<Op, DecodeError> {
    decode_op_into(record_type, payload, block_length, &mut Spare::new())
}

/// [`decode_op`] into buffers taken from `spare` (a standby applying the stream allocates
/// nothing in steady state: it gives each op's buffers back once applied).
pub fn decode_op_into(
    record_type: u16,
    payload: &[u8],
    block_length: u16,
    spare: &mut Spare,
) -> Result<Op, DecodeError> {
    match record_type {
        rt::PUT_UNIT => {
            let b: PutUnitBlock = decode(payload, block_length)?;
            let state = var(payload, block_length, "put-unit", b.state_len as usize)?;
            Ok(Op::PutUnit {
                id: b.id,
                kind: b.kind,
                layout_version: b.layout_version,
                state: spare.copy_of(state),
            })
        }
        rt::RETIRE_UNIT => {
            let b: RetireUnitBlock = decode(payload, block_length)?;
            Ok(Op::RetireUnit { id: b.id })
        }
        rt::PUT | rt::DELETE => {
            let b: RecordBlock = decode(payload, block_length)?;
            let kv_len = total(
                "record",
                "key_len + value_len",
                &[b.key_len as usize, b.value_len as usize],
            )?;
            let kv = var(payload, block_length, "record", kv_len)?;
            let (k, v) = kv.split_at(b.key_len as usize);
            if record_type == rt::PUT {
                Ok(Op::Put {
                    table: b.table,
                    key: spare.copy_of(k),
                    value: spare.copy_of(v),
                })
            } else {
                Ok(Op::Delete {
                    table: b.table,
                    key: spare.copy_of(k),
                })
            }
        }
        other => Err(DecodeError::Field {
            frame: "op",
            field: "record type",
            found: other as u64,
        }),
    }
}

/// Encode a store change as `(record type, block length, payload)` into `out` (replacing
/// what it held): the bytes [`write_op`] writes in place, into a vector.
pub fn encode_op(op: &Op, out: &mut Vec<u8>) -> (u16, u16) {
    let (t, bl, len) = op_frame(op);
    out.clear();
    out.resize(len, 0);
    write_op(op, out);
    (t, bl)
}

/// Where a store change goes in a frame: its record type, block length and payload length (the
/// fixed block and its variable parts), for a producer that claims the room and writes the
/// change in place with [`write_op`].
#[inline]
pub fn op_frame(op: &Op) -> (u16, u16, usize) {
    match op {
        Op::PutUnit { state, .. } => (rt::PUT_UNIT, 16, 16 + state.len()),
        Op::RetireUnit { .. } => (rt::RETIRE_UNIT, 8, 8),
        Op::Put { key, value, .. } => (rt::PUT, 16, 16 + key.len() + value.len()),
        Op::Delete { key, .. } => (rt::DELETE, 16, 16 + key.len()),
    }
}

/// Write `op` into `out` (exactly `op_frame(op).2` bytes: a claimed payload in the ring), the
/// bytes [`decode_op`] reads back. Every byte of `out` is written.
#[inline]
pub fn write_op(op: &Op, out: &mut [u8]) {
    #[inline(always)]
    fn put(out: &mut [u8], block: &[u8], parts: &[&[u8]]) {
        let (head, mut rest) = out.split_at_mut(block.len());
        head.copy_from_slice(block);
        for p in parts {
            let (dst, tail) = rest.split_at_mut(p.len());
            dst.copy_from_slice(p);
            rest = tail;
        }
        debug_assert!(
            rest.is_empty(),
            "the payload claimed for an op is its encoded length"
        );
    }
    match op {
        Op::PutUnit {
            id,
            kind,
            layout_version,
            state,
        } => {
            let b = PutUnitBlock {
                id: *id,
                kind: *kind,
                layout_version: *layout_version,
                state_len: state.len() as u32,
            };
            put(out, b.as_bytes(), &[state]);
        }
        Op::RetireUnit { id } => put(out, RetireUnitBlock { id: *id }.as_bytes(), &[]),
        Op::Put { table, key, value } => {
            let b = RecordBlock {
                table: *table,
                _pad: 0,
                key_len: key.len() as u32,
                value_len: value.len() as u32,
                _pad2: 0,
            };
            put(out, b.as_bytes(), &[key, value]);
        }
        Op::Delete { table, key } => {
            let b = RecordBlock {
                table: *table,
                _pad: 0,
                key_len: key.len() as u32,
                value_len: 0,
                _pad2: 0,
            };
            put(out, b.as_bytes(), &[key]);
        }
    }
}

/// Encode a `PutUnit` from borrowed parts (a snapshot chunk encodes the store's units without
/// building an [`Op`]).
pub fn encode_put_unit(
    id: u64,
    kind: u16,
    layout_version: u16,
    state: &[u8],
    out: &mut Vec<u8>,
) -> (u16, u16) {
    let b = PutUnitBlock {
        id,
        kind,
        layout_version,
        state_len: state.len() as u32,
    };
    encode_into(out, &b, &[state]);
    (rt::PUT_UNIT, 16)
}

/// Encode a `Put` from borrowed parts.
pub fn encode_put(table: u16, key: &[u8], value: &[u8], out: &mut Vec<u8>) -> (u16, u16) {
    let b = RecordBlock {
        table,
        _pad: 0,
        key_len: key.len() as u32,
        value_len: value.len() as u32,
        _pad2: 0,
    };
    encode_into(out, &b, &[key, value]);
    (rt::PUT, 16)
}

/// Decode a commit: its block and response bytes.
pub fn decode_commit(
    payload: &[u8],
    block_length: u16,
) -> Result<(CommitBlock, &[u8]), DecodeError> {
    let b: CommitBlock = decode(payload, block_length)?;
    let resp = var(payload, block_length, "commit", b.response_len as usize)?;
    Ok((b, resp))
}

/// A decoded hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Application name.
    pub name: String,
    /// Application version.
    pub app_version: u32,
    /// Sender's slot.
    pub slot: u32,
    /// Templates it reads and writes.
    pub templates: Vec<shm_layout::record::TemplateInfo>,
    /// Features it has.
    pub features: Vec<FeatureDecl>,
    /// Features it has enabled.
    pub enabled: u64,
    /// Its state position.
    pub commits: u64,
    /// Its digest.
    pub digest: u64,
    /// The epoch it believes current.
    pub epoch: u64,
}

impl Hello {
    /// Encode into `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let b = HelloBlock {
            app_version: self.app_version,
            slot: self.slot,
            name_len: self.name.len() as u16,
            templates: self.templates.len() as u16,
            features: self.features.len() as u16,
            _pad: 0,
            enabled: self.enabled,
            commits: self.commits,
            digest: self.digest,
            epoch: self.epoch,
        };
        encode_into(out, &b, &[self.name.as_bytes()]);
        for t in &self.templates {
            out.extend_from_slice(t.as_bytes());
        }
        for f in &self.features {
            out.extend_from_slice(f.as_bytes());
        }
    }

    /// Decode untrusted bytes.
    pub fn decode(payload: &[u8], block_length: u16) -> Result<Hello, DecodeError> {
        let b: HelloBlock = decode(payload, block_length)?;
        // u16 counts times 16 or 32 bytes: at most 2^21 each, the sum checked all the same.
        let nt = b.templates as usize * 16;
        let nf = b.features as usize * 32;
        let var_len = total(
            "hello",
            "name_len + templates + features",
            &[b.name_len as usize, nt, nf],
        )?;
        let all = var(payload, block_length, "hello", var_len)?;
        let (name, rest) = all.split_at(b.name_len as usize);
        let (ts, fs) = rest.split_at(nt);
        let name = String::from_utf8_lossy(name).into_owned();
        let templates = ts
            .chunks_exact(16)
            .map(|c| shm_layout::record::TemplateInfo::read_from_bytes(c).expect("16 bytes"))
            .collect();
        let features = fs
            .chunks_exact(32)
            .map(|c| FeatureDecl::read_from_bytes(c).expect("32 bytes"))
            .collect();
        Ok(Hello {
            name,
            app_version: b.app_version,
            slot: b.slot,
            templates,
            features,
            enabled: b.enabled,
            commits: b.commits,
            digest: b.digest,
            epoch: b.epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every op survives an encode/decode round trip, and truncated payloads are errors.
    #[test]
    fn ops_round_trip_and_truncation_is_an_error() {
        let ops = [
            Op::PutUnit {
                id: 5,
                kind: 2,
                layout_version: 1,
                state: b"state!".to_vec(),
            },
            Op::RetireUnit { id: 9 },
            Op::Put {
                table: 3,
                key: b"key".to_vec(),
                value: b"value".to_vec(),
            },
            Op::Delete {
                table: 3,
                key: b"key".to_vec(),
            },
        ];
        let mut buf = Vec::new();
        for op in &ops {
            let (t, bl) = encode_op(op, &mut buf);
            assert_eq!(&decode_op(t, &buf, bl).unwrap(), op);
            // Written in place, the same frame: type, block length, length and bytes.
            let (t2, bl2, len) = op_frame(op);
            let mut in_place = vec![0xAAu8; len];
            write_op(op, &mut in_place);
            assert_eq!((t2, bl2, &in_place[..]), (t, bl, &buf[..]), "{op:?}");
            // The snapshot's encoders from borrowed parts write the same frames.
            let mut parts = Vec::new();
            let from_parts = match op {
                Op::PutUnit {
                    id,
                    kind,
                    layout_version,
                    state,
                } => Some(encode_put_unit(
                    *id,
                    *kind,
                    *layout_version,
                    state,
                    &mut parts,
                )),
                Op::Put { table, key, value } => Some(encode_put(*table, key, value, &mut parts)),
                _ => None,
            };
            if let Some(tb) = from_parts {
                assert_eq!((tb, &parts[..]), ((t, bl), &buf[..]), "{op:?}");
            }
            for cut in 0..buf.len() {
                let _ = decode_op(t, &buf[..cut], bl); // never panics
            }
            if buf.len() > bl as usize {
                assert!(decode_op(t, &buf[..buf.len() - 1], bl).is_err());
            }
        }
    }

    /// Generated inputs per decoder: `UNDERSTUDY_FUZZ_CASES` (default 100 000; the long run
    /// sets millions).
    fn fuzz_cases() -> u64 {
        std::env::var("UNDERSTUDY_FUZZ_CASES")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000)
    }

    /// A length field a hostile peer might write: near the bytes present, near a boundary of
    /// its type, or anything.
    fn hostile_len(x: u64, present: usize) -> u32 {
        match x % 6 {
            0 => (present as u32)
                .wrapping_add((x >> 8) as u32 % 5)
                .wrapping_sub(2),
            1 => u32::MAX - (x >> 8) as u32 % 4,
            2 => (x >> 8) as u32 % 64,
            3 => 1 << ((x >> 8) % 32),
            _ => (x >> 16) as u32,
        }
    }

    #[test]
    fn every_decoder_refuses_hostile_payloads_by_name_without_panicking() {
        // Proves the stream's decoders (ops, commit, hello, positions) take any bytes a peer
        // writes, with length fields near the bytes present and near u32/u16 limits, and
        // return a value or a typed error: no panic, no out-of-bounds read, and a value only
        // when every length it announces is present.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ std::process::id() as u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let types = [
            rt::PUT_UNIT,
            rt::RETIRE_UNIT,
            rt::PUT,
            rt::DELETE,
            rt::COMMIT,
            rt::HELLO,
            rt::BASE,
            0,
            0xFFFF,
        ];
        let (mut ok, mut refused) = (0u64, 0u64);
        let mut payload = Vec::with_capacity(256);
        // `fuzz_cases()` inputs for each decoder (and for two record types no decoder takes).
        for i in 0..fuzz_cases() * types.len() as u64 {
            let record_type = types[(i % types.len() as u64) as usize];
            payload.clear();
            let n = (next() % 160) as usize;
            payload.extend((0..n).map(|_| next() as u8));
            // Block length: the real one mostly, sometimes anything.
            let real = match record_type {
                rt::PUT_UNIT | rt::PUT | rt::DELETE | rt::HEARTBEAT => 16,
                rt::RETIRE_UNIT => 8,
                rt::COMMIT | rt::HELLO => 48,
                _ => 56,
            };
            let block_length = match next() % 4 {
                0 => next() as u16,
                1 => real + (next() % 3) as u16,
                _ => real,
            };
            // Lengths inside the block near what is present.
            let present = n.saturating_sub(block_length as usize);
            let mut put32 = |at: usize, v: u32| {
                if at + 4 <= payload.len() {
                    payload[at..at + 4].copy_from_slice(&v.to_le_bytes());
                }
            };
            match record_type {
                rt::PUT_UNIT => put32(12, hostile_len(next(), present)),
                rt::PUT | rt::DELETE => {
                    let k = hostile_len(next(), present);
                    put32(4, k);
                    put32(8, hostile_len(next(), present.saturating_sub(k as usize)));
                }
                rt::COMMIT => put32(40, hostile_len(next(), present)),
                rt::HELLO => {
                    let v = next();
                    put32(8, (v as u16 as u32) | ((v >> 16) as u16 as u32) << 16);
                    put32(12, (v >> 32) as u16 as u32 % 8);
                }
                _ => {}
            }
            let var_bytes = payload.len().saturating_sub(block_length as usize);
            let r = match record_type {
                rt::COMMIT => decode_commit(&payload, block_length).map(|(b, resp)| {
                    assert_eq!(resp.len(), b.response_len as usize);
                    assert!(resp.len() <= var_bytes);
                }),
                rt::HELLO => Hello::decode(&payload, block_length).map(|h| {
                    assert!(h.name.len() <= 3 * var_bytes);
                    assert!(16 * h.templates.len() + 32 * h.features.len() <= var_bytes);
                }),
                rt::BASE => decode::<Position>(&payload, block_length)
                    .map(|_| ())
                    .map_err(DecodeError::from),
                t => decode_op(t, &payload, block_length).map(|op| match op {
                    Op::PutUnit { state, .. } => assert!(state.len() <= var_bytes),
                    Op::Put { key, value, .. } => assert!(key.len() + value.len() <= var_bytes),
                    Op::Delete { key, .. } => assert!(key.len() <= var_bytes),
                    Op::RetireUnit { .. } => {}
                }),
            };
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains("expected") || msg.contains("impossible value"),
                        "an error names what it expected: {msg}"
                    );
                    refused += 1;
                }
            }
        }
        assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    }
}
