//! callstate: a telecom call-state table, the example application to read first.
//!
//! Each call is a work unit holding a [`Call`] record; a [`Totals`] table record counts what
//! the cluster did. Requests: set up a call (ringing), answer it (active), bill seconds of it,
//! release it, get it. Version 2 adds a per-call limit of billed seconds: a field appended to
//! [`Call`] (layout version 2) and the `call-limit` feature, off until the operator runs
//! `understudy enable-features` after the upgrade; until then a v2 engine writes layout 1,
//! which a v1 engine reads.
//!
//! The engine executables are `src/bin/callstate-v1.rs` and `-v2.rs`, one line each:
//! `understudy_runtime::run(CallState::new(1))`. The client is [`client::CallClient`].
//! In a real deployment v1 and v2 are two builds of this file; here one crate builds both and
//! [`CallState::new`] takes the version.

use understudy_runtime::records::{Record, TemplateInfo};
use understudy_runtime::zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};
use understudy_runtime::{Activation, Application, Feature, Refused, Store, Tx};

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
    /// Calls released.
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

/// The key of the one [`Totals`] record.
pub const TOTALS_KEY: &[u8] = b"totals";

/// Version 2's feature: per-call limits (needs [`Call`] layout 2).
pub const CALL_LIMIT: Feature = Feature {
    id: 0,
    name: "call-limit",
    type_id: Call::TYPE_ID,
    layout_version: 2,
};

/// A request (encoded by [`Request::encode`]; the client sends these bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Set up call `call` from `caller` to `callee`.
    Setup { call: u64, caller: u64, callee: u64 },
    /// Version 2, `call-limit` on: set up a call that may bill at most `max_secs`.
    SetupLimited {
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
    /// Read a call: the answer is `state, billed_secs, max_secs` (u64 each).
    Get { call: u64 },
    /// Read the totals: the answer is the [`Totals`] record's bytes.
    GetTotals,
}

impl Request {
    /// The request's bytes: an op byte, then u64 arguments little-endian.
    pub fn encode(&self) -> Vec<u8> {
        let (op, args): (u8, &[u64]) = match *self {
            Request::Setup {
                call,
                caller,
                callee,
            } => (1, &[call, caller, callee]),
            Request::SetupLimited {
                call,
                caller,
                callee,
                max_secs,
            } => (2, &[call, caller, callee, max_secs]),
            Request::Answer { call } => (3, &[call]),
            Request::Bill { call, secs } => (4, &[call, secs]),
            Request::Release { call } => (5, &[call]),
            Request::Get { call } => (6, &[call]),
            Request::GetTotals => (7, &[]),
        };
        let mut v = vec![op];
        args.iter()
            .for_each(|a| v.extend_from_slice(&a.to_le_bytes()));
        v
    }

    /// Parse a request (untrusted bytes).
    pub fn decode(b: &[u8]) -> Result<Request, Refused> {
        let (&op, rest) = b.split_first().ok_or_else(|| refuse("empty request"))?;
        let arg = |i: usize| -> Result<u64, Refused> {
            rest.get(i * 8..i * 8 + 8)
                .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
                .ok_or_else(|| refuse("request too short"))
        };
        Ok(match op {
            1 => Request::Setup {
                call: arg(0)?,
                caller: arg(1)?,
                callee: arg(2)?,
            },
            2 => Request::SetupLimited {
                call: arg(0)?,
                caller: arg(1)?,
                callee: arg(2)?,
                max_secs: arg(3)?,
            },
            3 => Request::Answer { call: arg(0)? },
            4 => Request::Bill {
                call: arg(0)?,
                secs: arg(1)?,
            },
            5 => Request::Release { call: arg(0)? },
            6 => Request::Get { call: arg(0)? },
            7 => Request::GetTotals,
            _ => return Err(refuse("unknown request")),
        })
    }
}

/// A refusal: `-` and the reason (an accepted request's answer starts with `+`).
fn refuse(why: &str) -> Refused {
    Refused([b"-", why.as_bytes()].concat())
}

/// The application: no in-memory state besides what the store holds.
pub struct CallState {
    version: u32,
}

impl CallState {
    /// Version 1 or 2.
    pub fn new(version: u32) -> CallState {
        CallState { version }
    }

    fn totals(tx: &Tx<'_>) -> Result<Totals, Refused> {
        let t = tx
            .get_record::<Totals>(TOTALS_KEY)
            .map_err(|e| refuse(&e.to_string()))?;
        Ok(t.unwrap_or_default())
    }

    fn call(tx: &Tx<'_>, call: u64) -> Result<Call, Refused> {
        let c = tx
            .unit_record::<Call>(call)
            .map_err(|e| refuse(&e.to_string()))?;
        c.ok_or_else(|| refuse("no such call"))
    }

    fn setup(
        tx: &mut Tx<'_>,
        call: u64,
        caller: u64,
        callee: u64,
        max: u64,
    ) -> Result<(), Refused> {
        if tx.unit(call).is_some() {
            return Err(refuse("call exists"));
        }
        let c = Call {
            caller,
            callee,
            billed_secs: 0,
            state: RINGING,
            _pad: 0,
            max_secs: max,
        };
        tx.register_record(call, &c);
        let mut t = Self::totals(tx)?;
        t.setups += 1;
        tx.put_record(TOTALS_KEY, &t);
        Ok(())
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
        match Request::decode(request)? {
            Request::Setup {
                call,
                caller,
                callee,
            } => Self::setup(tx, call, caller, callee, 0)?,
            Request::SetupLimited {
                call,
                caller,
                callee,
                max_secs,
            } => {
                if self.version < 2 || !tx.feature_enabled(CALL_LIMIT.id) {
                    return Err(refuse("call-limit is not enabled"));
                }
                Self::setup(tx, call, caller, callee, max_secs)?
            }
            Request::Answer { call } => {
                let mut c = Self::call(tx, call)?;
                if c.state != RINGING {
                    return Err(refuse("not ringing"));
                }
                c.state = ACTIVE;
                tx.update_record(call, &c);
                let mut t = Self::totals(tx)?;
                t.answered += 1;
                tx.put_record(TOTALS_KEY, &t);
            }
            Request::Bill { call, secs } => {
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
                let mut t = Self::totals(tx)?;
                t.billed_secs = t.billed_secs.wrapping_add(secs);
                tx.put_record(TOTALS_KEY, &t);
            }
            Request::Release { call } => {
                Self::call(tx, call)?;
                tx.retire(call);
                let mut t = Self::totals(tx)?;
                t.released += 1;
                tx.put_record(TOTALS_KEY, &t);
            }
            Request::Get { call } => {
                let c = Self::call(tx, call)?;
                tx.respond(b"+");
                for w in [c.state as u64, c.billed_secs, c.max_secs] {
                    tx.respond(&w.to_le_bytes());
                }
                return Ok(());
            }
            Request::GetTotals => {
                let t = Self::totals(tx)?;
                tx.respond(b"+");
                tx.respond(t.as_bytes());
                return Ok(());
            }
        }
        tx.respond(b"+");
        Ok(())
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
