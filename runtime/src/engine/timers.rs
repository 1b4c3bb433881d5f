//! Timers as replicated state: an application arms and cancels timers inside a transaction
//! ([`Tx::arm_timer`], [`Tx::cancel_timer`]); the active fires each due timer through
//! [`Application::on_timer`] in a transaction of its own.
//!
//! # Where timers live
//! In the system table [`SYS_TIMERS`] of the store, keyed `deadline_ns (big-endian) ‖ id
//! (big-endian)`: the table's order is deadline order (ties in the order armed), so the next
//! timer due is the table's first entry. The value is `unit_id ‖ tag` (little-endian). Ids come
//! from a counter in the system table [`SYS_TIMER_SEQ`], bumped by the arming transaction. A
//! timer is armed by a `Put` and cancelled or consumed by a `Delete`, ordinary changes of an
//! ordinary transaction: the standby receives them in its stream like any other and needs
//! nothing else. Deadlines are on `CLOCK_MONOTONIC`, which both engines of a cluster share (they
//! run on one host).
//!
//! # Firing
//! Between requests the active looks at the first entry (only when a timer may be due: it keeps
//! the earliest deadline it knows of, lowered by every transaction that arms one), and while
//! its deadline has passed — at most [`FIRE_PER_TURN`] per turn of its loop, so a burst of
//! timers never starves the requests waiting — runs one transaction per timer: the `Delete`
//! of the timer's entry first, then the application's `on_timer`. The transaction commits like
//! a request's: on every standby's stream first, then into the store.
//!
//! # Exactly once across failovers and switchovers
//! - *At most once.* A timer fires only from its entry in the committed store of the active,
//!   and the firing transaction deletes that entry. The active runs one transaction at a time
//!   and applies each to its store before looking for the next due timer, so it never fires an
//!   entry twice. A new active (failover or switchover) holds every transaction the old one
//!   committed — a standby steps up only after draining its stream, a switchover only when its
//!   digest equals the active's — so an entry whose firing committed is gone from its store
//!   too, and it cannot fire it again.
//! - *At least once.* An entry whose firing did not commit (the active died while running
//!   `on_timer`, or before the batch reached the stream) was never applied anywhere: the new
//!   active's store still holds it, the new active reads the table when it becomes active, and
//!   fires it as soon as its deadline has passed (which it already has). A firing and the
//!   application's changes in `on_timer` are one transaction, so its effects are applied
//!   exactly when the timer is consumed.
//! - *Never early.* An entry fires only when `CLOCK_MONOTONIC` has passed its deadline on the
//!   engine that fires it; both engines read the same clock.
//!
//! A transaction rolled back (a refused request) arms and cancels nothing; cancelling a timer
//! that is not armed (fired, cancelled, never armed) changes nothing.

use super::*;

/// The system table of armed timers (key `deadline_be ‖ id_be`, value `unit_id ‖ tag`).
#[doc(hidden)]
pub const SYS_TIMERS: u16 = 0xFFFE;
/// The system table holding the next timer id (key [`SEQ_KEY`]).
#[doc(hidden)]
pub const SYS_TIMER_SEQ: u16 = 0xFFFD;
/// The key of the next timer id in [`SYS_TIMER_SEQ`].
const SEQ_KEY: &[u8] = b"next";

/// Due timers fired per turn of the active's loop at most (each is a transaction; a request
/// waiting is taken between turns).
pub const FIRE_PER_TURN: usize = 4;

/// The commit flag of a timer's transaction (no input source consumed).
const COMMIT_TIMER: u32 = 2;

/// A timer's identity: its deadline and its sequence number. Store it (16 bytes,
/// [`TimerId::to_bytes`]) to cancel the timer later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimerId {
    deadline_ns: u64,
    seq: u64,
}

impl TimerId {
    /// Its deadline on `CLOCK_MONOTONIC`, ns.
    pub fn deadline_ns(&self) -> u64 {
        self.deadline_ns
    }

    /// 16 bytes to keep in a work unit or record.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&self.deadline_ns.to_be_bytes());
        k[8..].copy_from_slice(&self.seq.to_be_bytes());
        k
    }

    /// Back from [`TimerId::to_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> TimerId {
        TimerId {
            deadline_ns: u64::from_be_bytes(b[..8].try_into().expect("8")),
            seq: u64::from_be_bytes(b[8..].try_into().expect("8")),
        }
    }
}

/// An armed timer (what [`Application::on_timer`] receives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// Its identity.
    pub id: TimerId,
    /// Its deadline on `CLOCK_MONOTONIC`, ns.
    pub deadline_ns: u64,
    /// The work unit it is about.
    pub unit_id: u64,
    /// The application's tag.
    pub tag: u64,
}

impl Timer {
    fn decode(key: &[u8], value: &[u8]) -> Option<Timer> {
        let id = TimerId::from_bytes(key.try_into().ok()?);
        let w = |i: usize| {
            value
                .get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8")))
        };
        Some(Timer {
            id,
            deadline_ns: id.deadline_ns,
            unit_id: w(0)?,
            tag: w(8)?,
        })
    }
}

/// Arm a timer in `tx` (see [`Tx::arm_timer`]).
pub(crate) fn arm(tx: &mut Tx<'_>, deadline_ns: u64, unit_id: u64, tag: u64) -> TimerId {
    // The id counter is one record per transaction, updated in place for each timer armed.
    let (at, seq) = match tx.bufs.timer_seq {
        Some(s) => s,
        None => {
            let next = tx
                .get(SYS_TIMER_SEQ, SEQ_KEY)
                .and_then(|v| v.try_into().ok())
                .map_or(1, u64::from_le_bytes);
            tx.put(SYS_TIMER_SEQ, SEQ_KEY, &next.to_le_bytes());
            (tx.bufs.ops.len() - 1, next)
        }
    };
    if let Op::Put { value, .. } = &mut tx.bufs.ops[at] {
        value.clear();
        value.extend_from_slice(&(seq + 1).to_le_bytes());
    }
    tx.bufs.timer_seq = Some((at, seq + 1));
    let id = TimerId { deadline_ns, seq };
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&unit_id.to_le_bytes());
    value[8..].copy_from_slice(&tag.to_le_bytes());
    tx.put(SYS_TIMERS, &id.to_bytes(), &value);
    tx.bufs.armed_min_ns = tx.bufs.armed_min_ns.min(deadline_ns);
    id
}

/// Cancel a timer in `tx` if it is armed (see [`Tx::cancel_timer`]).
pub(crate) fn cancel(tx: &mut Tx<'_>, id: TimerId) {
    let key = id.to_bytes();
    if tx.get(SYS_TIMERS, &key).is_some() {
        tx.delete(SYS_TIMERS, &key);
    }
}

/// A timer as `tx` sees it.
pub(crate) fn get(tx: &Tx<'_>, id: TimerId) -> Option<Timer> {
    let key = id.to_bytes();
    tx.get(SYS_TIMERS, &key)
        .and_then(|v| Timer::decode(&key, v))
}

/// The first timer of `store` if it is due at `now_ns`; otherwise `Err` with the earliest
/// deadline (`u64::MAX`: no timer armed).
#[doc(hidden)]
pub fn due(store: &Store, now_ns: u64) -> Result<Timer, u64> {
    for (k, v) in store.table(SYS_TIMERS) {
        let Some(t) = Timer::decode(k, v) else {
            // Not ours to write (a malformed entry would be a bug of this file): skip it
            // rather than fire garbage or stop every timer behind it.
            continue;
        };
        return if t.deadline_ns <= now_ns {
            Ok(t)
        } else {
            Err(t.deadline_ns)
        };
    }
    Err(u64::MAX)
}

/// The earliest deadline armed in `store` (`u64::MAX`: none).
#[doc(hidden)]
pub fn earliest(store: &Store) -> u64 {
    due(store, 0).map_or_else(|d| d, |t| t.deadline_ns)
}

/// Build the transaction that fires `timer` in `tx`: the `Delete` of its entry, then the
/// application's `on_timer` (rolled back, the `Delete` kept, if it refuses or its changes are
/// too large for the stream); true if the handler's changes were rolled back. The store is not
/// changed. Engines and test models share this.
#[doc(hidden)]
pub fn fire<A: Application>(
    app: &mut A,
    store: &Store,
    tx: &mut TxBuffers,
    enabled: u64,
    write_versions: &[(u16, u16)],
    timer: &Timer,
) -> bool {
    tx.clear();
    let key = timer.id.to_bytes();
    let consume = |tx: &mut TxBuffers| {
        let k = tx.spare.copy_of(&key);
        tx.push_op(Op::Delete {
            table: SYS_TIMERS,
            key: k,
        });
    };
    consume(tx);
    let mut t = Tx {
        store,
        bufs: tx,
        enabled,
        write_versions,
    };
    let refused = app.on_timer(&mut t, timer).is_err();
    let too_large = tx.encoded_len() > tx.limit_bytes;
    if refused || too_large {
        if too_large {
            warn!(
                unit_id = timer.unit_id,
                tag = timer.tag,
                found_bytes = tx.encoded_len(),
                limit_bytes = tx.limit_bytes,
                "a timer's transaction is too large for the stream: its changes are rolled back, the timer is consumed"
            );
        }
        tx.clear();
        consume(tx);
    }
    tx.response.clear();
    refused || too_large
}

/// When the active must next look at the timer table: never later than the earliest deadline
/// armed, so no due timer waits for a look (it may be earlier — a cancelled timer leaves it
/// early — and a look moves it on). It spares the active a table lookup, and while no timer is
/// armed a clock read, on every turn of its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NextTimer(u64);

impl NextTimer {
    /// No timer armed.
    pub(crate) const NONE: NextTimer = NextTimer(u64::MAX);

    /// The earliest deadline in `store`: what an engine becoming active starts from (timers
    /// armed by earlier actives included).
    pub(crate) fn of(store: &Store) -> NextTimer {
        NextTimer(earliest(store))
    }

    /// The transaction in `tx` (about to commit) armed timers: one may be the next due.
    pub(crate) fn armed(&mut self, tx: &TxBuffers) {
        self.0 = self.0.min(tx.armed_min_ns);
    }

    /// Whether a timer is armed at all, as far as is known (else the clock need not be read).
    pub(crate) fn any(&self) -> bool {
        self.0 != u64::MAX
    }

    /// Whether a timer may be due at `now_ns`.
    pub(crate) fn may_be_due(&self, now_ns: u64) -> bool {
        now_ns >= self.0
    }

    /// The table's first timer was looked at and is due at `next_ns` (`u64::MAX`: none).
    pub(crate) fn looked(&mut self, next_ns: u64) {
        self.0 = next_ns;
    }
}

impl<A: Application, I: Input> Engine<A, I> {
    /// On becoming active: start from the timers in the store.
    pub(super) fn timers_resume(&mut self) {
        self.next_timer = NextTimer::of(&self.store);
    }

    /// The transaction about to commit may have armed timers.
    pub(super) fn timers_armed(&mut self) {
        self.next_timer.armed(&self.tx);
    }

    /// Fire up to [`FIRE_PER_TURN`] timers due at `now_ns`, each in a committed transaction of
    /// its own, in deadline order.
    pub(super) fn fire_due_timers(&mut self, now_ns: u64) {
        for _ in 0..FIRE_PER_TURN {
            let timer = match due(&self.store, now_ns) {
                Ok(t) => t,
                Err(next) => {
                    self.next_timer.looked(next);
                    return;
                }
            };
            fire(
                &mut self.app,
                &self.store,
                &mut self.tx,
                self.enabled,
                &self.write_versions,
                &timer,
            );
            self.timers_armed();
            let commit = CommitBlock {
                index: self.commits,
                input_pos: 0,
                input_seq: 0,
                source: 0,
                request_seq: u64::MAX,
                response_len: 0,
                flags: COMMIT_TIMER,
            };
            self.commit_tx(&commit);
            self.catch_up_with_live_traffic();
        }
        // More may be due: the next turn looks again.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::TimerId;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const FIRED: u16 = 10;

    /// Requests: `A` + delay u64 + tag u64: arm a timer `delay` ns from now for tag, answer
    /// its id; `C` + id (16): cancel; `R` + id (16): arm then roll back (refused).
    /// `on_timer` counts the firing of each tag in table `FIRED` with the clock it fired at.
    struct App {
        refuse_timers: bool,
    }

    impl Application for App {
        fn name(&self) -> &str {
            "timers"
        }
        fn version(&self) -> u32 {
            1
        }
        fn templates(&self) -> Vec<TemplateInfo> {
            Vec::new()
        }
        fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
            let w = |i: usize| u64::from_le_bytes(req[i..i + 8].try_into().unwrap());
            match req[0] {
                b'A' => {
                    let id = tx.arm_timer(tx.now_ns() + w(1), 7, w(9));
                    assert_eq!(tx.timer(id).map(|t| t.tag), Some(w(9)));
                    tx.respond(&id.to_bytes());
                    Ok(())
                }
                b'C' => {
                    tx.cancel_timer(TimerId::from_bytes(req[1..17].try_into().unwrap()));
                    Ok(())
                }
                _ => {
                    tx.arm_timer(tx.now_ns(), 7, u64::MAX);
                    Err(Refused(b"no".to_vec()))
                }
            }
        }
        fn on_timer(&mut self, tx: &mut Tx<'_>, t: &Timer) -> Result<(), Refused> {
            assert!(tx.timer(t.id).is_none(), "the firing consumed the timer");
            let n = tx
                .get(FIRED, &t.tag.to_le_bytes())
                .map_or(0, |v| u64::from_le_bytes(v[..8].try_into().unwrap()));
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&(n + 1).to_le_bytes());
            v[8..].copy_from_slice(&tx.now_ns().to_le_bytes());
            tx.put(FIRED, &t.tag.to_le_bytes(), &v);
            if self.refuse_timers {
                return Err(Refused(Vec::new()));
            }
            Ok(())
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Arm { delay: u64 },
        Cancel { which: usize },
        ArmRolledBack,
        ArmCrashed { delay: u64 },
        Advance { by: u64 },
        Fire { crash_at: Option<usize> },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u64..1_000).prop_map(|delay| Step::Arm { delay }),
            2 => any::<usize>().prop_map(|which| Step::Cancel { which }),
            1 => Just(Step::ArmRolledBack),
            1 => (0u64..1_000).prop_map(|delay| Step::ArmCrashed { delay }),
            3 => (0u64..400).prop_map(|by| Step::Advance { by }),
            3 => proptest::option::weighted(0.3, 0usize..FIRE_PER_TURN)
                .prop_map(|crash_at| Step::Fire { crash_at }),
        ]
    }

    fn request(
        app: &mut App,
        store: &mut Store,
        tx: &mut TxBuffers,
        n: &mut u64,
        req: &[u8],
        next: &mut NextTimer,
    ) {
        *n += 1;
        let meta = InputMeta {
            source: 1,
            request_seq: *n,
            next_pos: *n,
            next_seq: *n,
        };
        execute(app, store, tx, 0, &[], &meta, req);
        next.armed(tx);
        tx.apply_to(store);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The timer table against a model (the set of armed timers, the clock): a timer fires
        /// exactly once unless cancelled before it fired, never before its deadline, in
        /// deadline order; a cancel of a fired or unknown timer and a rolled-back arm change
        /// nothing; a "crash" (a firing built and dropped before its commit, the work
        /// continuing from the committed store, as a new active does) loses no timer and fires
        /// none twice.
        #[test]
        fn timers_fire_once_in_order_never_early(steps in proptest::collection::vec(step(), 1..80)) {
            let mut app = App { refuse_timers: false };
            let mut store = Store::new();
            let mut tx = TxBuffers::new();
            let mut clock = 1_000u64;
            let mut n = 0u64;
            // Model: armed (id → tag), every id ever handed out, firings in order.
            let mut armed: BTreeMap<TimerId, u64> = BTreeMap::new();
            let mut ids: Vec<TimerId> = Vec::new();
            let mut fired: Vec<(TimerId, u64)> = Vec::new();
            let mut next_tag = 0u64;
            // What the active knows of the next deadline, kept as the engine keeps it.
            let mut next = NextTimer::NONE;
            // One turn of the active's loop: up to FIRE_PER_TURN firings, if the active looks at
            // all. A crash drops the firing before its commit; the next active starts from the
            // committed store. Returns whether a turn fired FIRE_PER_TURN (more may be due).
            let fire_turn = |app: &mut App, store: &mut Store, tx: &mut TxBuffers, clock: u64,
                             crash_at: Option<usize>, armed: &mut BTreeMap<TimerId, u64>,
                             fired: &mut Vec<(TimerId, u64)>, next: &mut NextTimer|
             -> Result<bool, TestCaseError> {
                if !next.any() || !next.may_be_due(clock) {
                    return Ok(false);
                }
                for i in 0..FIRE_PER_TURN {
                    let t = match due(store, clock) {
                        Ok(t) => t,
                        Err(n) => {
                            next.looked(n);
                            return Ok(false);
                        }
                    };
                    prop_assert!(t.deadline_ns <= clock);
                    // The model's next due timer is the table's first.
                    let (&first, &tag) = armed.iter().next().expect("model has it");
                    prop_assert_eq!((first, tag), (t.id, t.tag));
                    tx.clock_ns = Some(clock);
                    fire(app, store, tx, 0, &[], &t);
                    next.armed(tx);
                    if crash_at == Some(i) {
                        tx.clear();
                        *next = NextTimer::of(store);
                        return Ok(false);
                    }
                    tx.apply_to(store);
                    armed.remove(&t.id);
                    fired.push((t.id, clock));
                }
                Ok(true)
            };
            for s in steps {
                tx.clock_ns = Some(clock);
                match s {
                    Step::Arm { delay } => {
                        let mut req = vec![b'A'];
                        req.extend_from_slice(&delay.to_le_bytes());
                        req.extend_from_slice(&next_tag.to_le_bytes());
                        request(&mut app, &mut store, &mut tx, &mut n, &req, &mut next);
                        let id = TimerId::from_bytes(tx.response[..16].try_into().unwrap());
                        prop_assert_eq!(id.deadline_ns(), clock + delay);
                        prop_assert!(!ids.contains(&id), "ids are unique");
                        armed.insert(id, next_tag);
                        ids.push(id);
                        next_tag += 1;
                    }
                    Step::Cancel { which } => {
                        let id = if ids.is_empty() {
                            TimerId { deadline_ns: 5, seq: 999 }
                        } else {
                            ids[which % ids.len()]
                        };
                        let mut req = vec![b'C'];
                        req.extend_from_slice(&id.to_bytes());
                        request(&mut app, &mut store, &mut tx, &mut n, &req, &mut next);
                        armed.remove(&id);
                    }
                    Step::ArmRolledBack => {
                        request(&mut app, &mut store, &mut tx, &mut n, b"R", &mut next);
                    }
                    Step::ArmCrashed { delay } => {
                        // Built, never committed: the active died; the next starts from the
                        // committed store.
                        let mut req = vec![b'A'];
                        req.extend_from_slice(&delay.to_le_bytes());
                        req.extend_from_slice(&u64::MAX.to_le_bytes());
                        n += 1;
                        let meta = InputMeta { source: 1, request_seq: n, next_pos: n, next_seq: n };
                        execute(&mut app, &store, &mut tx, 0, &[], &meta, &req);
                        tx.clear();
                        next = NextTimer::of(&store);
                    }
                    Step::Advance { by } => clock += by,
                    Step::Fire { crash_at } => {
                        // Turns until the active finds nothing more due (or crashes).
                        let mut more = true;
                        let mut turn = 0;
                        while more {
                            let crash = if turn == 0 { crash_at } else { None };
                            more = fire_turn(&mut app, &mut store, &mut tx, clock, crash, &mut armed, &mut fired, &mut next)?;
                            turn += 1;
                            if crash.is_some() {
                                break;
                            }
                        }
                        if crash_at.is_none() {
                            prop_assert!(due(&store, clock).is_err(), "a due timer was not fired: the active's next deadline hid it");
                        }
                    }
                }
                let in_store: Vec<TimerId> = store
                    .table(SYS_TIMERS)
                    .map(|(k, _)| TimerId::from_bytes(k.try_into().unwrap()))
                    .collect();
                let in_model: Vec<TimerId> = armed.keys().copied().collect();
                prop_assert_eq!(in_store, in_model);
            }
            // Everything still armed fires once the clock passes every deadline.
            clock += 10_000;
            while fire_turn(&mut app, &mut store, &mut tx, clock, None, &mut armed, &mut fired, &mut next)? {}
            prop_assert!(due(&store, clock).is_err(), "a due timer was not fired");
            prop_assert!(armed.is_empty());
            // In order, never early, each once; the application's record agrees.
            for w in fired.windows(2) {
                prop_assert!(w[0].0 < w[1].0, "deadline order: {:?} then {:?}", w[0], w[1]);
            }
            for (id, at) in &fired {
                prop_assert!(id.deadline_ns() <= *at, "fired early");
            }
            let mut seen = std::collections::BTreeSet::new();
            for (id, _) in &fired {
                prop_assert!(seen.insert(*id), "fired twice");
            }
            for (k, v) in store.table(FIRED) {
                prop_assert_eq!(u64::from_le_bytes(v[..8].try_into().unwrap()), 1, "tag {:?} fired more than once", k);
            }
            prop_assert_eq!(store.table(FIRED).count(), fired.len());
        }
    }

    /// A handler that refuses in `on_timer` has its changes rolled back; the timer is still
    /// consumed (it does not fire again).
    #[test]
    fn a_refused_firing_consumes_the_timer_without_its_changes() {
        let mut app = App {
            refuse_timers: true,
        };
        let (mut store, mut tx, mut n) = (Store::new(), TxBuffers::new(), 0);
        let mut next = NextTimer::NONE;
        tx.clock_ns = Some(100);
        let mut req = vec![b'A'];
        req.extend_from_slice(&5u64.to_le_bytes());
        req.extend_from_slice(&1u64.to_le_bytes());
        request(&mut app, &mut store, &mut tx, &mut n, &req, &mut next);
        let t = due(&store, 105).expect("due");
        assert!(fire(&mut app, &store, &mut tx, 0, &[], &t));
        tx.apply_to(&mut store);
        assert_eq!(due(&store, u64::MAX), Err(u64::MAX));
        assert_eq!(store.table(FIRED).count(), 0);
    }
}
