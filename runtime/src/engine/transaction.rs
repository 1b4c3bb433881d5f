//! One transaction: the write buffers, running a request against the store, the commit
//! block and pushing a committed batch to a stream.

use super::*;

/// What a transaction is built in, kept from one transaction to the next: with the store
/// handing back the buffers it lets go of ([`Spare`]), a running engine's transactions
/// allocate nothing in steady state.
#[derive(Debug, Default)]
#[doc(hidden)]
pub struct TxBuffers {
    /// The transaction's changes, the input position record last.
    pub ops: Vec<Op>,
    /// Its response.
    pub response: Vec<u8>,
    /// Buffers for the next transactions' changes.
    pub spare: Spare,
}

impl TxBuffers {
    /// Empty buffers.
    pub fn new() -> TxBuffers {
        TxBuffers {
            ops: Vec::with_capacity(64),
            response: Vec::with_capacity(256),
            spare: Spare::new(),
        }
    }

    /// Drop the changes (keeping their buffers) and the response.
    pub fn clear(&mut self) {
        for op in self.ops.drain(..) {
            self.spare.recycle(op);
        }
        self.response.clear();
    }

    /// Move the transaction's changes into `store` (once they are on every standby's
    /// stream); the buffers this frees are kept for the next transactions.
    pub fn apply_to(&mut self, store: &mut Store) {
        for op in self.ops.drain(..) {
            store.apply_owned(op, &mut self.spare);
        }
    }
}

/// Run the application's handler for one request against `store`, leaving the transaction's
/// changes in `tx.ops` (the input position record included) and its response in
/// `tx.response`; true if the handler refused the request. The store is not changed. Engines
/// and test models share this, so both compute the same state.
#[doc(hidden)]
pub fn execute<A: Application>(
    app: &mut A,
    store: &Store,
    tx: &mut TxBuffers,
    enabled: u64,
    write_versions: &[(u16, u16)],
    meta: &InputMeta,
    request: &[u8],
) -> bool {
    tx.clear();
    let TxBuffers {
        ops,
        response,
        spare,
    } = tx;
    let mut t = Tx {
        store,
        ops,
        spare,
        response,
        enabled,
        write_versions,
    };
    let refused = if let Err(Refused(bytes)) = app.handle(&mut t, request) {
        tx.clear();
        tx.response.extend_from_slice(&bytes);
        true
    } else {
        false
    };
    let key = tx.spare.copy_of(&meta.source.to_le_bytes());
    let mut value = tx.spare.copy_of(&[]);
    SourcePosition::encode(meta, &tx.response, &mut value);
    tx.ops.push(Op::Put {
        table: SYS_INPUTS,
        key,
        value,
    });
    refused
}

/// Run one request on a local store and apply it (a model of what an engine does, for tests
/// and benchmarks); returns the response.
#[doc(hidden)]
pub fn execute_local<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> Vec<u8> {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    tx.apply_to(store);
    tx.response
}

/// [`execute_local`], also returning the transaction's changes exactly as an engine streams
/// them to its standbys (the input-position record last): what tests and benchmarks replay
/// on a standby, or inspect to check what a request writes.
#[doc(hidden)]
pub fn execute_local_ops<A: Application>(
    app: &mut A,
    store: &mut Store,
    enabled: u64,
    meta: &InputMeta,
    request: &[u8],
) -> (Vec<u8>, Vec<Op>) {
    let wv = write_versions(&app.templates(), &app.features(), enabled);
    let mut tx = TxBuffers::new();
    execute(app, store, &mut tx, enabled, &wv, meta, request);
    let ops = tx.ops.clone();
    tx.apply_to(store);
    (tx.response, ops)
}

/// The commit record of transaction `index`, which consumed the request `meta` describes.
#[doc(hidden)]
pub fn commit_block(index: u64, meta: &InputMeta) -> CommitBlock {
    CommitBlock {
        index,
        input_pos: meta.next_pos,
        input_seq: meta.next_seq,
        source: meta.source,
        request_seq: meta.request_seq,
        response_len: 0,
        flags: 0,
    }
}

/// Push one transaction (its ops, then the commit) as one batch: what the active writes to
/// each standby's stream per transaction (public for the replication benchmark).
#[doc(hidden)]
pub fn push_tx(
    stream: &mut Producer<RegionMemory>,
    ops: &[Op],
    commit: &CommitBlock,
    scratch: &mut Vec<u8>,
) -> Result<(), PushError> {
    let mut b = stream.batch();
    for op in ops {
        let (t, bl) = protocol::encode_op(op, scratch);
        b.push(t, 1, bl, scratch)?;
    }
    b.push(rt::COMMIT, 1, 48, zerocopy::IntoBytes::as_bytes(commit))?;
    b.commit();
    Ok(())
}
