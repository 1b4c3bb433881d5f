//! callstate: a telecom call-state table, the example application to read first.
//!
//! Each call is a work unit holding a [`Call`] record; a [`Totals`] table record counts what
//! the cluster did. Requests: set up a call (ringing), answer it (active), bill seconds of it,
//! release it, get it. A call set up with a ring timeout ([`Request::SetupRinging`]) that is
//! not answered in time is released by a timer: replicated state, armed in the setup's
//! transaction, cancelled by the answer or the release, fired by whichever engine is active
//! when it is due — exactly once, across failovers and switchovers. Version 2 adds a per-call limit of billed seconds: a field appended to
//! [`Call`] (layout version 2) and the `call-limit` feature, off until the operator runs
//! `understudy enable-features` after the upgrade; until then a v2 engine writes layout 1,
//! which a v1 engine reads.
//!
//! The engine executables are `src/bin/callstate-v1.rs` and `-v2.rs`, one line each:
//! `understudy_runtime::run(CallState::new(1))`. The client is [`client::CallClient`].
//! In a real deployment v1 and v2 are two builds of this file; here one crate builds both and
//! [`CallState::new`] takes the version.

use understudy_runtime::records::{Record, TemplateInfo};
use understudy_runtime::store::{Before, Op};
use understudy_runtime::zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
use understudy_runtime::{Activation, Application, Feature, Refused, Store, Timer, TimerId, Tx};

pub mod client;

/// A call, the state of one work unit (unit id = call id).
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Call {
    /// Calling party.
    pub caller: u64,
    /// Called party.
    pub callee: u64,
    /// Seconds billed so far.
    pub billed_secs: u64,
    /// [`RINGING`] or [`ACTIVE`].
    pub state: u32,
    /// Zero.
    pub _pad: u32,
    /// Since layout version 2: most seconds that may be billed; 0 = no limit.
    pub max_secs: u64,
}

/// Set up, not answered yet.
pub const RINGING: u32 = 1;
/// Answered.
pub const ACTIVE: u32 = 2;

impl Record for Call {
    const TYPE_ID: u16 = 1;
    const NAME: &'static str = "call";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 32), (2, 40)];
    fn defaults() -> Self {
        Call {
            caller: 0,
            callee: 0,
            billed_secs: 0,
            state: 0,
            _pad: 0,
            max_secs: 0,
        }
    }
}
understudy_runtime::assert_record_layout!(Call);

/// What the cluster did, in table [`Totals::TYPE_ID`] under key [`TOTALS_KEY`].
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct Totals {
    /// Calls set up.
    pub setups: u64,
    /// Calls answered.
    pub answered: u64,
    /// Calls released (by a release request, or by their ring timeout).
    pub released: u64,
    /// Seconds billed over all calls.
    pub billed_secs: u64,
}

impl Record for Totals {
    const TYPE_ID: u16 = 2;
    const NAME: &'static str = "totals";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 32)];
    fn defaults() -> Self {
        Totals::default()
    }
}
understudy_runtime::assert_record_layout!(Totals);

/// The table of ring timers: call id (u64 LE) → the [`TimerId`] that releases it if it is not
/// answered in time (16 bytes).
pub const RING_TIMERS: u16 = 3;

/// The key of the one [`Totals`] record.
pub const TOTALS_KEY: &[u8] = b"totals";

/// Version 2's feature: per-call limits (needs [`Call`] layout 2).
pub const CALL_LIMIT: Feature = Feature {
    id: 0,
    name: "call-limit",
    type_id: Call::TYPE_ID,
    layout_version: 2,
};

/// A request; on the wire an op byte and four u64 arguments, little-endian ([`Request::encode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Set up call `call` from `caller` to `callee`; `max_secs` (v2, `call-limit` enabled):
    /// the most seconds that may be billed, 0 = no limit.
    Setup {
        call: u64,
        caller: u64,
        callee: u64,
        max_secs: u64,
    },
    /// Answer a ringing call.
    Answer { call: u64 },
    /// Bill `secs` more seconds of an active call.
    Bill { call: u64, secs: u64 },
    /// Release a call.
    Release { call: u64 },
    /// Read the totals: the answer is the [`Totals`] record's bytes.
    GetTotals,
    /// Set up call `call` like [`Request::Setup`] (no limit), released by a timer if it is
    /// still ringing `ring_ms` milliseconds later (counted in [`Totals::released`]).
    SetupRinging {
        call: u64,
        caller: u64,
        callee: u64,
        ring_ms: u64,
    },
    /// Read how many calls ring and how many are active, from the engine's in-memory index
    /// (kept by the handler on the active and by `on_apply` on a standby, never rebuilt from
    /// the store): the answer is two u64s.
    GetStateCounts,
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (op, args) = match *self {
            Request::Setup {
                call,
                caller,
                callee,
                max_secs,
            } => (1, [call, caller, callee, max_secs]),
            Request::Answer { call } => (2, [call, 0, 0, 0]),
            Request::Bill { call, secs } => (3, [call, secs, 0, 0]),
            Request::Release { call } => (4, [call, 0, 0, 0]),
            Request::GetTotals => (5, [0; 4]),
            Request::SetupRinging {
                call,
                caller,
                callee,
                ring_ms,
            } => (6, [call, caller, callee, ring_ms]),
            Request::GetStateCounts => (7, [0; 4]),
        };
        [&[op][..], args.as_bytes()].concat()
    }

    /// Parse a request (untrusted bytes).
    pub fn decode(b: &[u8]) -> Result<Request, Refused> {
        let (&op, rest) = b.split_first().ok_or_else(|| refuse("empty request"))?;
        let [call, a, b, c] =
            <[u64; 4]>::read_from_bytes(rest).map_err(|_| refuse("expected 33 bytes"))?;
        Ok(match op {
            1 => Request::Setup {
                call,
                caller: a,
                callee: b,
                max_secs: c,
            },
            2 => Request::Answer { call },
            3 => Request::Bill { call, secs: a },
            4 => Request::Release { call },
            5 => Request::GetTotals,
            6 => Request::SetupRinging {
                call,
                caller: a,
                callee: b,
                ring_ms: c,
            },
            7 => Request::GetStateCounts,
            _ => return Err(refuse("unknown request")),
        })
    }
}

/// The tag of a ring timer.
const RING_TIMEOUT: u64 = 1;

/// A refusal: `-` and the reason (an accepted request's answer starts with `+`).
fn refuse(why: &str) -> Refused {
    Refused([b"-", why.as_bytes()].concat())
}

/// The application. Its one in-memory structure is an index derived from the store: how many
/// calls are in each state. The active's handler keeps it for its own transactions; a
/// standby keeps it in `on_apply` from what each change replaced (no shadow copy of the
/// calls), and empties it when a catch-up begins, so it is whole when the catch-up ends and
/// after a step-up, with nothing rebuilt.
pub struct CallState {
    version: u32,
    /// Calls per state: `[_, ringing, active]`.
    by_state: [u64; 3],
}

/// The state word of a call's record bytes (the same offset in layouts 1 and 2: fields are
/// only appended).
fn state_of(record: &[u8]) -> Option<u32> {
    const AT: usize = std::mem::offset_of!(Call, state);
    let b = record.get(AT..AT + 4)?;
    Some(u32::from_le_bytes(b.try_into().ok()?))
}

impl CallState {
    /// Version 1 or 2.
    pub fn new(version: u32) -> CallState {
        CallState {
            version,
            by_state: [0; 3],
        }
    }

    /// A call left state `from` (if it had one) for `to` (if it still exists).
    fn moved(&mut self, from: Option<u32>, to: Option<u32>) {
        let slot = |s: u32| (s as usize).min(2);
        if let Some(f) = from {
            self.by_state[slot(f)] = self.by_state[slot(f)].saturating_sub(1);
        }
        if let Some(t) = to {
            self.by_state[slot(t)] += 1;
        }
    }

    /// Count something in the totals record.
    fn count(tx: &mut Tx<'_>, f: impl FnOnce(&mut Totals)) -> Result<(), Refused> {
        let t = tx
            .get_record::<Totals>(TOTALS_KEY)
            .map_err(|e| refuse(&e.to_string()))?;
        let mut t = t.unwrap_or_default();
        f(&mut t);
        tx.put_record(TOTALS_KEY, &t);
        Ok(())
    }

    /// Cancel the ring timer of `call`, if it has one.
    fn stop_ringing(tx: &mut Tx<'_>, call: u64) {
        let key = call.to_le_bytes();
        if let Some(id) = tx.get(RING_TIMERS, &key).and_then(|v| v.try_into().ok()) {
            tx.cancel_timer(TimerId::from_bytes(id));
            tx.delete(RING_TIMERS, &key);
        }
    }

    fn setup(
        tx: &mut Tx<'_>,
        call: u64,
        caller: u64,
        callee: u64,
        max_secs: u64,
    ) -> Result<(), Refused> {
        if max_secs != 0 && !tx.feature_enabled(CALL_LIMIT.id) {
            return Err(refuse("call-limit is not enabled"));
        }
        if tx.unit(call).is_some() {
            return Err(refuse("call exists"));
        }
        let c = Call {
            caller,
            callee,
            billed_secs: 0,
            state: RINGING,
            _pad: 0,
            max_secs,
        };
        tx.register_record(call, &c);
        Self::count(tx, |t| t.setups += 1)
    }

    fn call(tx: &Tx<'_>, call: u64) -> Result<Call, Refused> {
        let c = tx
            .unit_record::<Call>(call)
            .map_err(|e| refuse(&e.to_string()))?;
        c.ok_or_else(|| refuse("no such call"))
    }
}

impl Application for CallState {
    fn name(&self) -> &str {
        "callstate"
    }
    fn version(&self) -> u32 {
        self.version
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        let mut call = TemplateInfo::of::<Call>();
        call.max_version = call.max_version.min(self.version as u16); // v1 knows layout 1 only
        vec![call, TemplateInfo::of::<Totals>()]
    }
    fn features(&self) -> Vec<Feature> {
        if self.version >= 2 {
            vec![CALL_LIMIT]
        } else {
            vec![]
        }
    }

    fn handle(&mut self, tx: &mut Tx<'_>, request: &[u8]) -> Result<(), Refused> {
        // The index changes only once the handler has succeeded (a refusal rolls back).
        let (from, to) = self.run(tx, request)?;
        if from.is_some() || to.is_some() {
            self.moved(from, to);
        }
        Ok(())
    }

    /// A ring timeout: the call is still ringing (its answer or release would have cancelled
    /// the timer), so it is released.
    fn on_timer(&mut self, tx: &mut Tx<'_>, timer: &Timer) -> Result<(), Refused> {
        if timer.tag != RING_TIMEOUT {
            return Ok(());
        }
        let call = timer.unit_id;
        tx.delete(RING_TIMERS, &call.to_le_bytes());
        if Self::call(tx, call)?.state == RINGING {
            tx.retire(call);
            Self::count(tx, |t| t.released += 1)?;
            self.moved(Some(RINGING), None);
        }
        Ok(())
    }

    /// On a standby, for every change it applies: move the call between states, from what
    /// the change replaced to what it wrote.
    fn on_apply(&mut self, op: &Op, before: Before<'_>, _store: &Store) {
        let from = match before {
            Before::Unit(Some(u)) => state_of(u.state),
            _ => None,
        };
        match op {
            Op::PutUnit { state, .. } => self.moved(from, state_of(state)),
            Op::RetireUnit { .. } => self.moved(from, None),
            _ => {}
        }
    }

    /// A catch-up begins with an empty store: so does the index (every call arrives again
    /// through `on_apply`).
    fn on_snapshot_begin(&mut self, _store: &Store) {
        self.by_state = [0; 3];
    }

    /// Where a real switch would open its signalling links; here: one line on stderr.
    fn on_active(&mut self, a: &Activation, store: &Store) {
        let calls = store.unit_count();
        eprintln!(
            "callstate-v{}: active ({:?}, epoch {}, {} commits, {calls} calls)",
            self.version, a.takeover, a.epoch, a.commits
        );
    }
}

impl CallState {
    /// Run one request; the state move of the call it changed, for the index.
    fn run(
        &mut self,
        tx: &mut Tx<'_>,
        request: &[u8],
    ) -> Result<(Option<u32>, Option<u32>), Refused> {
        let mut moved = (None, None);
        match Request::decode(request)? {
            Request::Setup {
                call,
                caller,
                callee,
                max_secs,
            } => {
                Self::setup(tx, call, caller, callee, max_secs)?;
                moved = (None, Some(RINGING));
            }
            Request::SetupRinging {
                call,
                caller,
                callee,
                ring_ms,
            } => {
                Self::setup(tx, call, caller, callee, 0)?;
                moved = (None, Some(RINGING));
                let id = tx.arm_timer_after(
                    std::time::Duration::from_millis(ring_ms),
                    call,
                    RING_TIMEOUT,
                );
                tx.put(RING_TIMERS, &call.to_le_bytes(), &id.to_bytes());
            }
            Request::Answer { call } => {
                Self::answer(tx, call)?;
                moved = (Some(RINGING), Some(ACTIVE));
            }
            Request::Bill { call, secs } => Self::bill(tx, call, secs)?,
            Request::Release { call } => {
                let c = Self::call(tx, call)?;
                Self::stop_ringing(tx, call);
                tx.retire(call);
                Self::count(tx, |t| t.released += 1)?;
                moved = (Some(c.state), None);
            }
            Request::GetTotals => {
                let t = tx
                    .get_record::<Totals>(TOTALS_KEY)
                    .map_err(|e| refuse(&e.to_string()))?;
                tx.respond(b"+");
                tx.respond(t.unwrap_or_default().as_bytes());
                return Ok(moved);
            }
            Request::GetStateCounts => {
                tx.respond(b"+");
                tx.respond(self.by_state[1].as_bytes());
                tx.respond(self.by_state[2].as_bytes());
                return Ok(moved);
            }
        }
        tx.respond(b"+");
        Ok(moved)
    }

    /// A ringing call is answered: it becomes active and stops ringing.
    fn answer(tx: &mut Tx<'_>, call: u64) -> Result<(), Refused> {
        let mut c = Self::call(tx, call)?;
        if c.state != RINGING {
            return Err(refuse("not ringing"));
        }
        c.state = ACTIVE;
        tx.update_record(call, &c);
        Self::stop_ringing(tx, call);
        Self::count(tx, |t| t.answered += 1)
    }

    /// `secs` more of an active call are billed, within its limit.
    fn bill(tx: &mut Tx<'_>, call: u64, secs: u64) -> Result<(), Refused> {
        let mut c = Self::call(tx, call)?;
        if c.state != ACTIVE {
            return Err(refuse("not active"));
        }
        c.billed_secs = c
            .billed_secs
            .checked_add(secs)
            .ok_or_else(|| refuse("overflow"))?;
        if c.max_secs != 0 && c.billed_secs > c.max_secs {
            return Err(refuse("limit reached"));
        }
        tx.update_record(call, &c);
        Self::count(tx, |t| t.billed_secs = t.billed_secs.wrapping_add(secs))
    }
}
