//! What an application implements to become an understudy engine, the transaction context
//! its handler runs in, and the version handshake between two engines.

use crate::engine::timers;
pub use crate::engine::timers::{Timer, TimerId};
use crate::engine::TxBuffers;
use crate::protocol::{FeatureDecl, Hello};
use crate::records::{self, Record, RecordError};
pub use crate::store::Before;
use crate::store::{Op, Store, UnitRef};
use shm_layout::record::TemplateInfo;
use std::fmt;
use std::time::Duration;

/// How an engine became active (see [`Application::on_active`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// The first active of a fresh cluster: nothing was served before.
    Start,
    /// The previous active died (or hung and was fenced): this engine applied everything it
    /// had committed and took over.
    Failover,
    /// A planned switchover (`understudy switchover`, an upgrade): the previous active handed
    /// the role over and is becoming this engine's standby.
    Planned,
}

/// Where an engine took the active role over (see [`Application::on_active`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Activation {
    /// How.
    pub takeover: Takeover,
    /// The epoch it is active in (one more per role change of the cluster).
    pub epoch: u64,
    /// Transactions committed in the cluster's history up to this point: the position the
    /// engine's store reflects, every one of them applied.
    pub commits: u64,
}

/// A feature: an application capability that needs a layout version of one template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// Id, 0..64 (bit in the enabled set).
    pub id: u16,
    /// Name (<= 24 bytes).
    pub name: &'static str,
    /// The template whose newer layout it needs.
    pub type_id: u16,
    /// The layout version it needs.
    pub layout_version: u16,
}

impl Feature {
    /// Its declaration in a hello.
    pub fn decl(&self) -> FeatureDecl {
        let mut name = [0u8; 24];
        let n = self.name.len().min(24);
        name[..n].copy_from_slice(&self.name.as_bytes()[..n]);
        FeatureDecl {
            id: self.id,
            type_id: self.type_id,
            layout_version: self.layout_version,
            name_len: n as u16,
            name,
        }
    }
}

/// A request the handler refused: the transaction is rolled back, the response is still sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub Vec<u8>);

/// The application: one instance per engine process.
pub trait Application {
    /// The application's name; two engines of different applications never pair.
    fn name(&self) -> &str;
    /// Its version.
    fn version(&self) -> u32;
    /// The record templates it writes into work units and tables.
    fn templates(&self) -> Vec<TemplateInfo>;
    /// The features it has.
    fn features(&self) -> Vec<Feature> {
        Vec::new()
    }
    /// Process one request inside a transaction; write the response with [`Tx::respond`].
    /// An `Err` rolls back the transaction's changes but still commits the response (so a
    /// refused request is answered exactly once, like any other).
    fn handle(&mut self, tx: &mut Tx<'_>, request: &[u8]) -> Result<(), Refused>;
    /// Called on a standby for every change it applies (not on the active for its own
    /// commits: its handler made them), so derived in-memory indexes stay hot and step-up does
    /// not rebuild them. A handler that returns `Err` must leave its in-memory view unchanged.
    ///
    /// `before` is what the change replaced (the unit's previous state or the record's
    /// previous value, seen in place; `None` if there was none); `store` already holds the
    /// change. An application that keeps counts or indexes by state undoes `before` and adds
    /// the new value, without a shadow copy of its units.
    ///
    /// It is called for the items of a catch-up snapshot too (after
    /// [`Application::on_snapshot_begin`], each with `before` = `None`), so indexes kept here
    /// are complete when the snapshot ends and [`Application::on_reset`] has nothing to
    /// rebuild.
    fn on_apply(&mut self, _op: &Op, _before: Before<'_>, _store: &Store) {}
    /// Called on a standby when a catch-up snapshot begins: its store was just emptied (every
    /// item arrives again through [`Application::on_apply`]). Drop derived indexes here.
    /// It runs on the standby's apply path while the active streams live traffic: a
    /// standby that stalls here for long is untethered, so free large structures off the
    /// thread (e.g. move them into a thread that drops them).
    fn on_snapshot_begin(&mut self, _store: &Store) {}
    /// Called on a standby after a snapshot replaced its whole state (the store holds the
    /// active's state as of the snapshot's end). The same rule on stalls as
    /// [`Application::on_snapshot_begin`] holds: an application that keeps its indexes in
    /// `on_apply` has nothing to do here.
    fn on_reset(&mut self, _store: &Store) {}
    /// Called when this engine becomes active, after its store holds every transaction the
    /// cluster committed and before it takes its first request (and before it re-emits a
    /// committed answer a client never received). Open feeds, start the process's own timers,
    /// announce yourself here. (Timers armed with [`Tx::arm_timer`] are replicated state: they
    /// need no re-arming here; this engine fires the due ones once it is active.)
    ///
    /// It runs inside the pause clients see: keep it short (spawn a thread for slow work).
    /// It may read `store` and change the application's own memory; it cannot change the
    /// replicated state (only a transaction can: a request's or a timer's), and it must not block waiting for
    /// clients. A panic in it is a panic of the engine (by default: abort, a failover).
    fn on_active(&mut self, _activation: &Activation, _store: &Store) {}
    /// Called when this engine becomes a standby — at start, and after it handed the active
    /// role over in a planned switchover — before it applies anything from its active.
    /// Close what only an active may hold (feeds, the process's own timers). The same rules as
    /// [`Application::on_active`] apply.
    fn on_standby(&mut self, _store: &Store) {}
    /// Called on the active when timer `timer` is due (its deadline has passed), in a
    /// transaction of its own that also deletes the timer: once it commits, the timer never
    /// fires again, on this engine or on one that takes over; if the engine dies before the
    /// commit, the next active fires it. Timers fire in deadline order (ties in the order they
    /// were armed), between requests, a few per turn of the engine's loop, never before their
    /// deadline. An `Err` rolls back the handler's changes; the timer is still consumed.
    /// What it writes with [`Tx::respond`] goes nowhere (no client asked). Timers live in
    /// system tables of the store (`0xFFFE`, `0xFFFD`), whose changes a standby's
    /// [`Application::on_apply`] sees like those of the other system tables.
    fn on_timer(&mut self, _tx: &mut Tx<'_>, _timer: &Timer) -> Result<(), Refused> {
        Ok(())
    }
    /// The refusal a request gets when its transaction is too large for the replication
    /// stream (see [`TxTooLarge`]): the transaction is rolled back and this is the answer.
    /// By default the error's message.
    fn on_too_large(&mut self, error: &TxTooLarge) -> Refused {
        Refused::from(*error)
    }
}

/// Changes a transaction holds before reads of its own changes go through the index rather
/// than a scan (a scan of a few changes is as fast as a hash and needs no upkeep).
pub(crate) const INDEX_FROM_OPS: usize = 8;

/// What a change is about: a work unit, or a record of a table (the identity the
/// transaction's index of its own changes is keyed by).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ident<'k> {
    Unit(u64),
    Record(u16, &'k [u8]),
}

impl Ident<'_> {
    /// What `op` changes.
    pub(crate) fn of(op: &Op) -> Ident<'_> {
        match op {
            Op::PutUnit { id, .. } | Op::RetireUnit { id } => Ident::Unit(*id),
            Op::Put { table, key, .. } | Op::Delete { table, key } => Ident::Record(*table, key),
        }
    }
}

/// A transaction too large for the replication stream: it was refused (rolled back, nothing
/// applied or replicated) and the request answered with [`Application::on_too_large`]'s
/// refusal.
///
/// Every transaction travels to each standby as one batch of the stream ring, so its encoded
/// size — its changes, its response (kept in the input-position record) and the commit, plus
/// room for one wrap of the ring — may not exceed the ring's largest batch,
/// `Options::ring_capacity` minus 32 bytes (8 MiB − 32 by default). The limit is the engine's
/// own, applied whether or not a standby is attached. A handler that loads in bulk watches
/// [`Tx::encoded_len`] against [`Tx::limit`] (or calls [`Tx::check_fits`]) and splits its
/// work into several requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxTooLarge {
    /// The bytes the transaction would take in the stream.
    pub found_bytes: usize,
    /// The most a transaction may take (see [`Tx::limit`]).
    pub limit_bytes: usize,
}

impl fmt::Display for TxTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "transaction too large for the replication stream: expected at most {} bytes (the stream ring's capacity, Options::ring_capacity, less one frame), found {} bytes; split the work into smaller transactions or raise ring_capacity",
            self.limit_bytes, self.found_bytes
        )
    }
}
impl std::error::Error for TxTooLarge {}

impl From<TxTooLarge> for Refused {
    /// The refusal a handler returns with `tx.check_fits()?`: the error's message.
    fn from(e: TxTooLarge) -> Refused {
        Refused(e.to_string().into_bytes())
    }
}

/// The transaction context: reads see the store plus this transaction's own changes.
///
/// Reads of the transaction's own changes ([`Tx::unit`], [`Tx::get`] and the typed readers)
/// cost O(1) however many changes it holds: past a handful of changes they go through a hash
/// index of the changes, kept from transaction to transaction (no allocation in steady state).
pub struct Tx<'a> {
    pub(crate) store: &'a Store,
    pub(crate) bufs: &'a mut TxBuffers,
    pub(crate) enabled: u64,
    pub(crate) write_versions: &'a [(u16, u16)],
}

impl Tx<'_> {
    /// Register a new work unit.
    pub fn register(&mut self, id: u64, kind: u16, layout_version: u16, state: &[u8]) {
        self.put_unit(id, kind, layout_version, state)
    }

    /// Replace a work unit's state.
    pub fn update(&mut self, id: u64, kind: u16, layout_version: u16, state: &[u8]) {
        self.put_unit(id, kind, layout_version, state)
    }

    fn put_unit(&mut self, id: u64, kind: u16, layout_version: u16, state: &[u8]) {
        let state = self.bufs.spare.copy_of(state);
        self.bufs.push_op(Op::PutUnit {
            id,
            kind,
            layout_version,
            state,
        });
    }

    /// Register a new work unit holding a typed record: its kind is `R::TYPE_ID`, its layout
    /// the version of `R` the engines write now ([`Tx::write_version`]).
    pub fn register_record<R: Record>(&mut self, id: u64, record: &R) {
        self.put_unit_record(id, record)
    }

    /// Replace a work unit's state with a typed record (see [`Tx::register_record`]).
    pub fn update_record<R: Record>(&mut self, id: u64, record: &R) {
        self.put_unit_record(id, record)
    }

    fn put_unit_record<R: Record>(&mut self, id: u64, record: &R) {
        let v = records::write_version_of::<R>(self.write_version(R::TYPE_ID));
        let bytes = records::encoded(record, v).expect("write_version_of names a version of R");
        self.put_unit(id, R::TYPE_ID, v, bytes)
    }

    /// A work unit's typed record as this transaction sees it, whichever layout version wrote
    /// it (fields newer than the stored layout read as [`Record::defaults`]). `Ok(None)`: no
    /// such unit; `Err`: the unit holds another kind, or a block too short for `R`.
    pub fn unit_record<R: Record>(&self, id: u64) -> Result<Option<R>, RecordError> {
        self.unit(id).map(records::decode_unit::<R>).transpose()
    }

    /// Put a typed record into table `R::TYPE_ID`, in the layout version the engines write
    /// now, with a header naming its type and version.
    pub fn put_record<R: Record>(&mut self, key: &[u8], record: &R) {
        let v = records::write_version_of::<R>(self.write_version(R::TYPE_ID));
        // A pooled buffer (no allocation in steady state), filled by the one encoder of the
        // typed table value's layout.
        let mut value = self.bufs.spare.copy_of(&[]);
        records::encode_table_value(record, v, &mut value)
            .expect("write_version_of names a version of R");
        let key = self.bufs.spare.copy_of(key);
        self.bufs.push_op(Op::Put {
            table: R::TYPE_ID,
            key,
            value,
        });
    }

    /// A typed record of table `R::TYPE_ID` as this transaction sees it (any layout version).
    pub fn get_record<R: Record>(&self, key: &[u8]) -> Result<Option<R>, RecordError> {
        self.get(R::TYPE_ID, key)
            .map(records::decode_table_value::<R>)
            .transpose()
    }

    /// Delete a typed record of table `R::TYPE_ID`.
    pub fn delete_record<R: Record>(&mut self, key: &[u8]) {
        self.delete(R::TYPE_ID, key)
    }

    /// Retire a work unit.
    pub fn retire(&mut self, id: u64) {
        self.bufs.push_op(Op::RetireUnit { id });
    }

    /// Put a record into table `table`.
    pub fn put(&mut self, table: u16, key: &[u8], value: &[u8]) {
        let (key, value) = (self.bufs.spare.copy_of(key), self.bufs.spare.copy_of(value));
        self.bufs.push_op(Op::Put { table, key, value });
    }

    /// Delete a record.
    pub fn delete(&mut self, table: u16, key: &[u8]) {
        let key = self.bufs.spare.copy_of(key);
        self.bufs.push_op(Op::Delete { table, key });
    }

    /// A work unit as this transaction sees it, in place (no copy).
    #[inline]
    pub fn unit(&self, id: u64) -> Option<UnitRef<'_>> {
        // A short transaction is scanned here (a leaf: no call but the store's lookup); a
        // long one goes through the index, out of line.
        if self.bufs.ops.len() > INDEX_FROM_OPS {
            return self.unit_indexed(id);
        }
        self.unit_in(&self.bufs.ops, id)
    }

    #[inline(never)]
    fn unit_indexed(&self, id: u64) -> Option<UnitRef<'_>> {
        self.unit_in(self.bufs.candidates(Ident::Unit(id)), id)
    }

    #[inline(always)]
    fn unit_in<'s>(&'s self, ops: &'s [Op], id: u64) -> Option<UnitRef<'s>> {
        for op in ops.iter().rev() {
            match op {
                Op::PutUnit {
                    id: i,
                    kind,
                    layout_version,
                    state,
                } if *i == id => {
                    return Some(UnitRef {
                        kind: *kind,
                        layout_version: *layout_version,
                        state,
                    })
                }
                Op::RetireUnit { id: i } if *i == id => return None,
                _ => {}
            }
        }
        self.store.unit(id)
    }

    /// A record as this transaction sees it, in place (no copy).
    #[inline]
    pub fn get(&self, table: u16, key: &[u8]) -> Option<&[u8]> {
        if self.bufs.ops.len() > INDEX_FROM_OPS {
            return self.get_indexed(table, key);
        }
        self.get_in(&self.bufs.ops, table, key)
    }

    #[inline(never)]
    fn get_indexed(&self, table: u16, key: &[u8]) -> Option<&[u8]> {
        self.get_in(self.bufs.candidates(Ident::Record(table, key)), table, key)
    }

    #[inline(always)]
    fn get_in<'s>(&'s self, ops: &'s [Op], table: u16, key: &[u8]) -> Option<&'s [u8]> {
        for op in ops.iter().rev() {
            match op {
                Op::Put {
                    table: t,
                    key: k,
                    value,
                } if *t == table && k == key => return Some(value),
                Op::Delete { table: t, key: k } if *t == table && k == key => return None,
                _ => {}
            }
        }
        self.store.get(table, key)
    }

    /// The committed store (without this transaction's changes).
    pub fn store(&self) -> &Store {
        self.store
    }

    /// Append to the response.
    pub fn respond(&mut self, bytes: &[u8]) {
        self.bufs.response.extend_from_slice(bytes);
    }

    /// The bytes this transaction takes in the replication stream so far: its changes, its
    /// response (replicated with the request's input position), the commit, and room for one
    /// wrap of the ring. Compare with [`Tx::limit`].
    pub fn encoded_len(&self) -> usize {
        self.bufs.encoded_len()
    }

    /// The most a transaction may take in the replication stream: the stream ring's largest
    /// batch, `Options::ring_capacity` − 32 bytes. A transaction over it is refused (see
    /// [`TxTooLarge`]).
    pub fn limit(&self) -> usize {
        self.bufs.limit_bytes
    }

    /// `Err` if the transaction as it stands is over [`Tx::limit`]: a handler may return it
    /// (`tx.check_fits()?` refuses the request with the error's message) or roll back part of
    /// its work itself. A handler that returns `Ok` with a transaction over the limit is
    /// refused by the engine the same way (see [`Application::on_too_large`]).
    pub fn check_fits(&self) -> Result<(), TxTooLarge> {
        let found_bytes = self.encoded_len();
        if found_bytes > self.limit() {
            return Err(TxTooLarge {
                found_bytes,
                limit_bytes: self.limit(),
            });
        }
        Ok(())
    }

    /// Now on `CLOCK_MONOTONIC`, in ns: the clock timer deadlines are on. Read once per
    /// transaction (every call in one transaction answers the same).
    pub fn now_ns(&self) -> u64 {
        self.bufs.now_ns()
    }

    /// Arm a timer for `deadline_ns` (on `CLOCK_MONOTONIC`, see [`Tx::now_ns`]) about work unit
    /// `unit_id` with the application's `tag`: once this transaction commits, the timer is
    /// replicated state, and the active fires it through [`Application::on_timer`] once its
    /// deadline has passed — exactly once across failovers and switchovers (see
    /// `engine/timers.rs`). A transaction that is rolled back arms nothing.
    ///
    /// Both engines of a cluster run on one host and share `CLOCK_MONOTONIC`, so a deadline
    /// armed on one engine means the same instant on the other.
    pub fn arm_timer(&mut self, deadline_ns: u64, unit_id: u64, tag: u64) -> TimerId {
        timers::arm(self, deadline_ns, unit_id, tag)
    }

    /// [`Tx::arm_timer`] for `after` from [`Tx::now_ns`].
    pub fn arm_timer_after(&mut self, after: Duration, unit_id: u64, tag: u64) -> TimerId {
        let deadline = self
            .now_ns()
            .saturating_add(after.as_nanos().min(u64::MAX as u128) as u64);
        self.arm_timer(deadline, unit_id, tag)
    }

    /// Cancel a timer. A timer that is not armed (never armed, already fired or cancelled) is
    /// left alone: cancelling it changes nothing.
    pub fn cancel_timer(&mut self, id: TimerId) {
        timers::cancel(self, id)
    }

    /// An armed timer as this transaction sees it (`None`: fired, cancelled or never armed).
    pub fn timer(&self, id: TimerId) -> Option<Timer> {
        timers::get(self, id)
    }

    /// Is feature `id` enabled (on both engines, from this point of the stream)?
    pub fn feature_enabled(&self, id: u16) -> bool {
        id < 64 && self.enabled & (1 << id) != 0
    }

    /// The layout version to write template `type_id` in: the oldest one, unless an enabled
    /// feature needs a newer one (which both engines then support).
    pub fn write_version(&self, type_id: u16) -> u16 {
        self.write_versions
            .iter()
            .find(|(t, _)| *t == type_id)
            .map_or(1, |(_, v)| *v)
    }
}

/// Two engines that cannot pair; names both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// Different applications.
    OtherApplication {
        /// Ours.
        ours: String,
        /// Theirs.
        theirs: String,
    },
    /// A template both use has no layout version both can read.
    NoCommonLayout {
        /// Type id.
        type_id: u16,
        /// Our range.
        ours: (u16, u16),
        /// Their range.
        theirs: (u16, u16),
    },
    /// A template both use is laid out differently.
    Fingerprint {
        /// Type id.
        type_id: u16,
        /// Ours.
        ours: u64,
        /// Theirs.
        theirs: u64,
    },
    /// The active has a feature enabled that the standby cannot follow.
    FeatureUnsupported {
        /// Feature name.
        feature: String,
        /// Layout version it needs.
        needs: u16,
        /// The peer's application version.
        peer_version: u32,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::OtherApplication { ours, theirs } => write!(
                f,
                "peer runs another application: ours is `{ours}`, theirs is `{theirs}`"
            ),
            HandshakeError::NoCommonLayout {
                type_id,
                ours,
                theirs,
            } => write!(
                f,
                "template {type_id}: no layout version both can read: ours {}..={}, theirs {}..={}",
                ours.0, ours.1, theirs.0, theirs.1
            ),
            HandshakeError::Fingerprint {
                type_id,
                ours,
                theirs,
            } => write!(
                f,
                "template {type_id}: layout fingerprint differs: ours {ours:#018x}, theirs {theirs:#018x}"
            ),
            HandshakeError::FeatureUnsupported {
                feature,
                needs,
                peer_version,
            } => write!(
                f,
                "feature `{feature}` is enabled and needs layout version {needs}, which the peer (application version {peer_version}) cannot read; it is refused this stream"
            ),
        }
    }
}
impl std::error::Error for HandshakeError {}

/// What two engines agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    /// Per template: the highest layout version both can read.
    pub layouts: Vec<(u16, u16)>,
    /// Features both have and whose layout both can read: the ones that may be enabled.
    pub enableable: u64,
    /// The peers run different application versions.
    pub versions_differ: bool,
}

impl Agreement {
    /// The lowest agreed layout version over all templates (what status shows).
    pub fn layout_version(&self) -> u16 {
        self.layouts.iter().map(|(_, v)| *v).min().unwrap_or(1)
    }
}

/// Negotiate between our hello and theirs; `ours_enabled` is the active's enabled feature set
/// (the check that a standby can follow it).
pub fn negotiate(
    ours: &Hello,
    theirs: &Hello,
    ours_enabled: u64,
) -> Result<Agreement, HandshakeError> {
    if ours.name != theirs.name {
        return Err(HandshakeError::OtherApplication {
            ours: ours.name.clone(),
            theirs: theirs.name.clone(),
        });
    }
    let mut layouts = Vec::new();
    for t in &ours.templates {
        let Some(p) = theirs.templates.iter().find(|p| p.type_id == t.type_id) else {
            layouts.push((t.type_id, t.min_version));
            continue;
        };
        if t.base_fingerprint != p.base_fingerprint {
            return Err(HandshakeError::Fingerprint {
                type_id: t.type_id,
                ours: t.base_fingerprint,
                theirs: p.base_fingerprint,
            });
        }
        let lo = t.min_version.max(p.min_version);
        let hi = t.max_version.min(p.max_version);
        if lo > hi {
            return Err(HandshakeError::NoCommonLayout {
                type_id: t.type_id,
                ours: (t.min_version, t.max_version),
                theirs: (p.min_version, p.max_version),
            });
        }
        layouts.push((t.type_id, hi));
    }
    let agreed = |type_id: u16| layouts.iter().find(|(t, _)| *t == type_id).map(|(_, v)| *v);
    let mut enableable = 0u64;
    for f in &ours.features {
        let theirs_has = theirs.features.iter().any(|g| g.id == f.id);
        let ok = theirs_has && agreed(f.type_id).is_some_and(|v| v >= f.layout_version);
        if ok && f.id < 64 {
            enableable |= 1 << f.id;
        }
        if ours_enabled & (1u64 << (f.id % 64)) != 0 && !ok {
            return Err(HandshakeError::FeatureUnsupported {
                feature: String::from_utf8_lossy(&f.name[..(f.name_len as usize).min(24)])
                    .into_owned(),
                needs: f.layout_version,
                peer_version: theirs.app_version,
            });
        }
    }
    Ok(Agreement {
        layouts,
        enableable,
        versions_differ: ours.app_version != theirs.app_version,
    })
}

/// The write version of each template given the enabled features: the oldest layout unless an
/// enabled feature needs a newer one.
pub fn write_versions(
    templates: &[TemplateInfo],
    features: &[Feature],
    enabled: u64,
) -> Vec<(u16, u16)> {
    templates
        .iter()
        .map(|t| {
            let v = features
                .iter()
                .filter(|f| f.type_id == t.type_id && f.id < 64 && enabled & (1 << f.id) != 0)
                .map(|f| f.layout_version)
                .max()
                .unwrap_or(t.min_version)
                .clamp(t.min_version, t.max_version);
            (t.type_id, v)
        })
        .collect()
}
