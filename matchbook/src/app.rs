//! matchbook on the understudy runtime: order books and resting orders are work units (one per
//! symbol, one per resting order: see [`crate::units`]), account positions are records of the
//! `positions` table; requests are new order / cancel (and two read-only queries), responses
//! are acknowledgements with the fills they caused.
//!
//! A request writes only what it changed: the order units it adds, updates (partial fills,
//! iceberg refreshes) or retires (fills, a cancel), its book's small unit, and the positions of
//! the accounts that traded. The matching core reports the orders it touched
//! ([`crate::book::Touched`]); nothing is diffed.
//!
//! Version 2 adds iceberg orders, which need layout version 2 of the order record (it carries
//! an order's hidden quantity and display size). With the feature disabled, version 2 behaves
//! exactly as version 1, writes version-1 layouts, and refuses iceberg orders with a clear
//! reason.
//!
//! The matching engine itself (`crate::book::MatchingEngine`) is the application's in-memory view; on
//! a standby the runtime's apply hook keeps it hot one order at a time (insert, update or
//! remove one order per change), so a step-up rebuilds nothing; after a snapshot it is rebuilt
//! from the units. A record that cannot be read is skipped and counted, never a panic.

use crate::book::{
    AccountId, AccountPosition, Cancel, Features, MatchingEngine, NewOrder, OrderId, OrderKind,
    PlacedOrder, RejectReason, Request, Response, Side, Symbol, Touched,
};
use crate::units::{
    decode_book, decode_order, order_unit_id, BookRecord, OrderRecord, UnitError, ORDER_UNIT_BIT,
};
pub use crate::units::{BOOK_KIND, BOOK_TYPE, ORDER_KIND, ORDER_TYPE};
use std::collections::HashMap;
use understudy_runtime::records::TemplateInfo;
use understudy_runtime::store::{Op, Store};
use understudy_runtime::{Application, Feature, Refused, Tx};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Table of account positions (key: account id u32 LE, value: 16-byte position).
pub const POSITIONS: u16 = 1;
/// Feature id of iceberg orders (version 2).
pub const ICEBERG: u16 = 0;

/// Request operations.
pub mod op {
    /// New order.
    pub const NEW: u8 = 1;
    /// Cancel.
    pub const CANCEL: u8 = 2;
    /// Read a book (response: header, then the book's version-2 encoding).
    pub const QUERY_BOOK: u8 = 3;
    /// Read a position (response: header, then 16 bytes).
    pub const QUERY_POSITION: u8 = 4;
}

/// Response statuses.
pub mod status {
    /// Accepted.
    pub const ACK: u8 = 0;
    /// Refused (reason in `reason`).
    pub const REJECT: u8 = 1;
    /// Cancelled (remaining quantity in `qty`).
    pub const CANCELLED: u8 = 2;
    /// Query answered.
    pub const QUERY: u8 = 3;
    /// Malformed request.
    pub const MALFORMED: u8 = 4;
}

/// A request on the wire (48 bytes, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct WireRequest {
    /// [`op`].
    pub op: u8,
    /// 0 buy, 1 sell.
    pub side: u8,
    /// 0 limit, 1 iceberg (version 2).
    pub kind: u8,
    /// Padding.
    pub _pad: u8,
    /// Account.
    pub account: u32,
    /// Order id.
    pub id: u64,
    /// Symbol.
    pub symbol: u32,
    /// Padding.
    pub _pad2: u32,
    /// Limit price in ticks.
    pub price: i64,
    /// Quantity.
    pub qty: u64,
    /// Iceberg display quantity.
    pub display: u64,
}
const _: () = assert!(core::mem::size_of::<WireRequest>() == 48);

/// A response on the wire (40 bytes; a query appends its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct WireResponse {
    /// [`status`].
    pub status: u8,
    /// Reject reason code ([`reject_code`]).
    pub reason: u8,
    /// Padding.
    pub _pad: u16,
    /// Symbol.
    pub symbol: u32,
    /// Order id.
    pub id: u64,
    /// The book's request sequence after this request (per symbol; orders the model replay).
    pub book_seq: u64,
    /// Quantity filled by this request (new) or remaining (cancelled).
    pub qty: u64,
    /// Fills caused.
    pub fills: u32,
    /// Padding.
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<WireResponse>() == 40);

/// Code of a reject reason on the wire.
pub fn reject_code(r: RejectReason) -> u8 {
    match r {
        RejectReason::UnknownOrder => 1,
        RejectReason::NotOwner => 2,
        RejectReason::DuplicateOrderId => 3,
        RejectReason::ZeroQty => 4,
        RejectReason::QtyOutOfRange => 5,
        RejectReason::PriceOutOfRange => 6,
        RejectReason::BadDisplayQty => 7,
        RejectReason::FeatureDisabled => 8,
    }
}

impl WireRequest {
    /// A new limit order.
    pub fn limit(id: u64, account: u32, symbol: u32, side: Side, price: i64, qty: u64) -> Self {
        WireRequest {
            op: op::NEW,
            side: (side == Side::Sell) as u8,
            kind: 0,
            _pad: 0,
            account,
            id,
            symbol,
            _pad2: 0,
            price,
            qty,
            display: 0,
        }
    }

    /// A new iceberg order (needs the version-2 feature).
    pub fn iceberg(
        id: u64,
        account: u32,
        symbol: u32,
        side: Side,
        price: i64,
        qty: u64,
        display: u64,
    ) -> Self {
        WireRequest {
            kind: 1,
            display,
            ..Self::limit(id, account, symbol, side, price, qty)
        }
    }

    /// A cancel.
    pub fn cancel(id: u64, account: u32, symbol: u32) -> Self {
        WireRequest {
            op: op::CANCEL,
            ..Self::limit(id, account, symbol, Side::Buy, 0, 0)
        }
    }

    /// A book query.
    pub fn query_book(symbol: u32) -> Self {
        WireRequest {
            op: op::QUERY_BOOK,
            ..Self::limit(0, 0, symbol, Side::Buy, 0, 0)
        }
    }

    /// A position query.
    pub fn query_position(account: u32) -> Self {
        WireRequest {
            op: op::QUERY_POSITION,
            ..Self::limit(0, account, 0, Side::Buy, 0, 0)
        }
    }

    /// The matching engine's request, if this is a new order or a cancel.
    pub fn to_request(&self) -> Option<Request> {
        let side = if self.side == 0 {
            Side::Buy
        } else {
            Side::Sell
        };
        match self.op {
            op::NEW => Some(Request::New(NewOrder {
                id: OrderId(self.id),
                account: AccountId(self.account),
                symbol: Symbol(self.symbol),
                side,
                price: self.price,
                qty: self.qty,
                kind: if self.kind == 1 {
                    OrderKind::Iceberg {
                        display_qty: self.display,
                    }
                } else {
                    OrderKind::Limit
                },
            })),
            op::CANCEL => Some(Request::Cancel(Cancel {
                id: OrderId(self.id),
                account: AccountId(self.account),
                symbol: Symbol(self.symbol),
            })),
            _ => None,
        }
    }
}

/// The application.
pub struct Matchbook {
    version: u32,
    engine: MatchingEngine,
    /// Per symbol: requests that changed the book (the `book_seq` of responses).
    seqs: HashMap<u32, u64>,
    fills: Vec<crate::book::Fill>,
    touched: Vec<Touched>,
    accounts: Vec<AccountId>,
    scratch: Vec<u8>,
    bad_records: u64,
}

impl Matchbook {
    /// matchbook at `version` (1 or 2).
    pub fn new(version: u32) -> Self {
        Matchbook {
            version,
            engine: MatchingEngine::new(),
            seqs: HashMap::new(),
            fills: Vec::new(),
            touched: Vec::new(),
            accounts: Vec::new(),
            scratch: Vec::with_capacity(4096),
            bad_records: 0,
        }
    }

    /// The in-memory matching engine.
    pub fn engine(&self) -> &MatchingEngine {
        &self.engine
    }

    /// Per symbol, the requests that changed its book so far (what the next response's
    /// `book_seq` follows).
    pub fn book_seqs(&self) -> &HashMap<u32, u64> {
        &self.seqs
    }

    /// Unit states this engine could not read (wrong length, layout version, id or contents)
    /// and skipped, since it started or was last reset.
    pub fn bad_records(&self) -> u64 {
        self.bad_records
    }

    fn respond(tx: &mut Tx<'_>, r: WireResponse, extra: &[u8]) {
        tx.respond(r.as_bytes());
        tx.respond(extra);
    }

    /// Writes what an accepted request changed: its orders (retired, updated, registered, in
    /// the order the matching touched them), its book, the positions of the accounts that
    /// traded.
    fn write_changes(
        &mut self,
        tx: &mut Tx<'_>,
        symbol: Symbol,
        request_seq: u64,
        seq_before: u64,
    ) {
        let write_version = tx.write_version(ORDER_TYPE);
        for touched in &self.touched {
            match touched {
                Touched::Rests(placed) => {
                    let record = OrderRecord::new(symbol, placed);
                    let layout = record.layout_version(write_version);
                    let unit = order_unit_id(placed.entry_seq);
                    if placed.entry_seq > seq_before {
                        tx.register(unit, ORDER_KIND, layout, record.encoded(layout));
                    } else {
                        tx.update(unit, ORDER_KIND, layout, record.encoded(layout));
                    }
                }
                Touched::Gone { entry_seq, .. } => tx.retire(order_unit_id(*entry_seq)),
            }
        }
        let book = BookRecord {
            symbol: symbol.0,
            _pad: 0,
            request_seq,
            last_seq: self.engine.last_seq(),
        };
        tx.update(u64::from(symbol.0), BOOK_KIND, 1, book.encoded());
        self.accounts.clear();
        for fill in &self.fills {
            self.accounts.push(fill.taker_account);
            self.accounts.push(fill.maker_account);
        }
        self.accounts.sort_unstable();
        self.accounts.dedup();
        for account in &self.accounts {
            let position = self.engine.position(*account);
            tx.put(POSITIONS, &account.0.to_le_bytes(), &position.to_bytes());
        }
    }

    /// Applies one unit state to the in-memory engine.
    fn apply_unit(&mut self, id: u64, kind: u16, layout_version: u16, state: &[u8]) {
        let applied = match kind {
            BOOK_KIND => decode_book(id, layout_version, state).map(|book| {
                self.engine.restore_book(Symbol(book.symbol), book.last_seq);
                self.seqs.insert(book.symbol, book.request_seq);
            }),
            ORDER_KIND => decode_order(id, layout_version, state).and_then(|(symbol, placed)| {
                self.engine
                    .place(symbol, placed)
                    .map_err(|why| UnitError::Invalid { unit: id, why })
            }),
            // Not ours: another kind is no part of this version's state.
            _ => Ok(()),
        };
        if let Err(e) = applied {
            self.skip(&e);
        }
    }

    fn skip(&mut self, e: &UnitError) {
        self.bad_records += 1;
        tracing::warn!(bad_records = self.bad_records, "{e}");
    }
}

fn blank(w: &WireRequest, status: u8) -> WireResponse {
    WireResponse {
        status,
        reason: 0,
        _pad: 0,
        symbol: w.symbol,
        id: w.id,
        book_seq: 0,
        qty: 0,
        fills: 0,
        _pad2: 0,
    }
}

impl Application for Matchbook {
    fn name(&self) -> &str {
        "matchbook"
    }

    fn version(&self) -> u32 {
        self.version
    }

    fn templates(&self) -> Vec<TemplateInfo> {
        crate::units::templates(self.version)
    }

    fn features(&self) -> Vec<Feature> {
        if self.version >= 2 {
            vec![Feature {
                id: ICEBERG,
                name: "iceberg",
                type_id: ORDER_TYPE,
                layout_version: 2,
            }]
        } else {
            Vec::new()
        }
    }

    fn handle(&mut self, tx: &mut Tx<'_>, request: &[u8]) -> Result<(), Refused> {
        let Ok(w) = WireRequest::read_from_bytes(request) else {
            let mut r = WireResponse::new_zeroed_response();
            r.status = status::MALFORMED;
            return Err(Refused(r.as_bytes().to_vec()));
        };
        match w.op {
            op::QUERY_BOOK => {
                self.scratch.clear();
                if let Some(b) = self.engine.book(Symbol(w.symbol)) {
                    b.encode(&mut self.scratch);
                }
                let mut r = blank(&w, status::QUERY);
                r.book_seq = self.seqs.get(&w.symbol).copied().unwrap_or(0);
                let data = std::mem::take(&mut self.scratch);
                Self::respond(tx, r, &data);
                self.scratch = data;
                Ok(())
            }
            op::QUERY_POSITION => {
                let p = self.engine.position(AccountId(w.account));
                Self::respond(tx, blank(&w, status::QUERY), &p.to_bytes());
                Ok(())
            }
            op::NEW | op::CANCEL => {
                let iceberg_on = self.version >= 2 && tx.feature_enabled(ICEBERG);
                if w.op == op::NEW && w.kind == 1 && !iceberg_on {
                    let mut r = blank(&w, status::REJECT);
                    r.reason = reject_code(RejectReason::FeatureDisabled);
                    let why: &[u8] = if self.version < 2 {
                        b"iceberg orders need matchbook version 2"
                    } else {
                        b"iceberg orders are disabled until both engines run version 2 and the feature is enabled"
                    };
                    return Err(Refused([r.as_bytes(), why].concat()));
                }
                let req = w.to_request().expect("new or cancel");
                self.fills.clear();
                self.touched.clear();
                let features = Features {
                    iceberg: iceberg_on,
                };
                let seq_before = self.engine.last_seq();
                let response =
                    self.engine
                        .process_into(req, features, &mut self.fills, &mut self.touched);
                let mut r = blank(&w, status::ACK);
                match response {
                    Response::Ack { .. } => {
                        r.qty = self.fills.iter().map(|f| f.qty).sum();
                        r.fills = self.fills.len() as u32;
                    }
                    Response::Reject { reason, .. } => {
                        r.status = status::REJECT;
                        r.reason = reject_code(reason);
                    }
                    Response::Cancelled { remaining, .. } => {
                        r.status = status::CANCELLED;
                        r.qty = remaining;
                    }
                }
                if !matches!(response, Response::Reject { .. }) {
                    let seq = self.seqs.entry(w.symbol).or_insert(0);
                    *seq += 1;
                    r.book_seq = *seq;
                    self.write_changes(tx, Symbol(w.symbol), r.book_seq, seq_before);
                }
                Self::respond(tx, r, &[]);
                Ok(())
            }
            other => {
                let mut r = blank(&w, status::MALFORMED);
                r.reason = other;
                Err(Refused(r.as_bytes().to_vec()))
            }
        }
    }

    fn on_apply(
        &mut self,
        op: &Op,
        _before: understudy_runtime::store::Before<'_>,
        _store: &Store,
    ) {
        match op {
            Op::PutUnit {
                id,
                kind,
                layout_version,
                state,
            } => self.apply_unit(*id, *kind, *layout_version, state),
            Op::RetireUnit { id } if id & ORDER_UNIT_BIT != 0 => {
                // Gone from its book (filled or cancelled); the index finds which book.
                self.engine.remove(id & !ORDER_UNIT_BIT);
            }
            Op::Put { table, key, value } if *table == POSITIONS => {
                if let (Ok(k), Ok(p)) = (
                    <[u8; 4]>::try_from(&key[..]),
                    AccountPosition::decode(value),
                ) {
                    self.engine
                        .set_position(AccountId(u32::from_le_bytes(k)), p);
                }
            }
            _ => {}
        }
    }

    fn on_reset(&mut self, store: &Store) {
        self.engine = MatchingEngine::new();
        self.seqs.clear();
        self.bad_records = 0;
        // Books first, then every order in priority order, so each goes to the back of its
        // level (placing them in any order gives the same books, with more walking).
        let mut orders: Vec<(u64, Symbol, PlacedOrder)> = Vec::new();
        let mut errors = Vec::new();
        for (id, unit) in store.units() {
            match unit.kind {
                ORDER_KIND => match decode_order(id, unit.layout_version, unit.state) {
                    Ok((symbol, placed)) => orders.push((id, symbol, placed)),
                    Err(e) => errors.push(e),
                },
                kind => self.apply_unit(id, kind, unit.layout_version, unit.state),
            }
        }
        orders.sort_unstable_by_key(|(_, _, placed)| placed.priority_seq);
        for (id, symbol, placed) in orders {
            if let Err(why) = self.engine.place(symbol, placed) {
                errors.push(UnitError::Invalid { unit: id, why });
            }
        }
        for e in &errors {
            self.skip(e);
        }
        for (k, v) in store.table(POSITIONS) {
            if let (Ok(k), Ok(p)) = (<[u8; 4]>::try_from(k), AccountPosition::decode(v)) {
                self.engine
                    .set_position(AccountId(u32::from_le_bytes(k)), p);
            }
        }
    }
}

impl WireResponse {
    fn new_zeroed_response() -> WireResponse {
        <WireResponse as zerocopy::FromZeros>::new_zeroed()
    }
}

/// Decode a response (header and trailing data).
pub fn parse_response(bytes: &[u8]) -> Option<(WireResponse, &[u8])> {
    let (r, rest) = WireResponse::read_from_prefix(bytes).ok()?;
    Some((r, rest))
}

/// The `main` of the matchbook engine executables (`matchbook-v1`, `matchbook-v2`): the
/// supervisor's launch contract, or `--dir D --slot a|b|c [--standby] [--ring N] [--spin]`
/// (see [`understudy_runtime::run`]).
pub fn engine_main(version: u32) -> ! {
    understudy_runtime::run(Matchbook::new(version))
}
