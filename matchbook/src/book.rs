//! The matching core: order books with price-time priority, a [`MatchingEngine`] that routes requests
//! to one book per symbol and keeps account positions, and a compact byte encoding of both.
//!
//! This layer is pure: no I/O, no clocks, no threads, no randomness that reaches an output, no
//! dependency outside `std`. It must never know about shared memory, processes, replication or
//! upgrades. What it offers the application that wraps it (`crate::app`, which keeps every
//! resting order as a work unit of its own, each book as a small one, and each account's
//! [`AccountPosition`] as a 16-byte table record):
//!
//! - every request reports the orders it changed ([`Touched`], from [`MatchingEngine::process_into`]),
//!   so the cost of saving a request's effects follows what it changed, not the book's depth;
//! - every resting order carries its place in time priority ([`PlacedOrder`]): sequence numbers
//!   from one engine-wide counter, so a book can be rebuilt order by order, in any order of
//!   arrival, with the same FIFO at every price ([`MatchingEngine::place`], [`MatchingEngine::remove`]).
//!
//! [`OrderBook::encode`] is a whole book as bytes (the answer to a book query).
//!
//! Two versions of behaviour live side by side. Version 1 knows plain limit orders only.
//! Version 2 adds iceberg orders, gated per request by [`Features::iceberg`]; with the feature
//! off, an iceberg request is rejected with [`RejectReason::FeatureDisabled`] and changes nothing,
//! so the engine behaves exactly as version 1 (tests/model.rs checks this on random streams).
//!
//! # Rules
//! - Price-time priority: better price first, then earlier arrival at that price. A fill
//!   happens at the resting (maker) order's price.
//! - An incoming order matches with its whole quantity, icebergs included; what is left rests.
//!   A resting iceberg shows at most `display_qty` at a time; when that visible slice is filled
//!   it refreshes from the hidden remainder and goes to the back of its price level.
//! - Consecutive fills of one taker against the same maker at the same price are reported as one
//!   [`Fill`]; this only merges the slices of an iceberg that is alone at its level, and it keeps
//!   the fill list (and the work) bounded by the number of makers rather than slices.
//! - An order id is a duplicate while an order with that id rests in the same book; ids of
//!   orders that were filled or cancelled may be reused.
//! - Self-trades are allowed: an account may trade with itself (its position does not change).
//! - Time priority is a sequence number: an order that rests takes the next number of its
//!   engine's counter (its *entry* number, which never changes afterwards); an iceberg that
//!   refreshes takes the next number again (its *priority* number), which puts it at the back of
//!   its level. Within a price, lower priority numbers go first.
//!
//! # Examples
//! ```
//! use matchbook::book::*;
//!
//! let mut engine = MatchingEngine::new();
//! let v1 = Features::V1;
//! let sell = NewOrder {
//!     id: OrderId(1),
//!     account: AccountId(7),
//!     symbol: Symbol(0),
//!     side: Side::Sell,
//!     price: 100,
//!     qty: 10,
//!     kind: OrderKind::Limit,
//! };
//! let outcome = engine.process(Request::New(sell), v1);
//! assert_eq!(outcome.response, Response::Ack { id: OrderId(1) });
//! assert!(outcome.fills.is_empty());
//!
//! // A buyer willing to pay 101 trades 4 at the maker's price of 100.
//! let buy = NewOrder { id: OrderId(2), account: AccountId(8), side: Side::Buy, price: 101, qty: 4, ..sell };
//! let outcome = engine.process(Request::New(buy), v1);
//! assert_eq!(outcome.fills.len(), 1);
//! assert_eq!((outcome.fills[0].maker, outcome.fills[0].price, outcome.fills[0].qty), (OrderId(1), 100, 4));
//! assert_eq!(engine.position(AccountId(8)), AccountPosition { position_qty: 4, cash: -400 });
//! assert_eq!(engine.position(AccountId(7)), AccountPosition { position_qty: -4, cash: 400 });
//!
//! // The book's state is a deterministic byte string.
//! let book = engine.book(Symbol(0)).unwrap();
//! let mut bytes = Vec::new();
//! book.encode(&mut bytes);
//! assert_eq!(&OrderBook::decode(&bytes).unwrap(), book);
//! ```

use std::collections::{btree_map, BTreeMap, HashMap};
use std::fmt;

/// Highest accepted limit price, in ticks. Prices must be in `1..=PRICE_TICKS_MAX`.
pub const PRICE_TICKS_MAX: i64 = (1 << 31) - 1;

/// Highest accepted order quantity. Quantities must be in `1..=QTY_MAX`.
pub const QTY_MAX: u64 = 1 << 31;

// The notional of one fill (price × quantity) must fit an i64 so it can be booked as cash.
const _: () = assert!((PRICE_TICKS_MAX as i128) * (QTY_MAX as i128) <= i64::MAX as i128);

/// Which way an order trades.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Side {
    /// Buys: matches asks priced at or below its limit.
    Buy,
    /// Sells: matches bids priced at or above its limit.
    Sell,
}

impl Side {
    /// The side this one trades against.
    pub fn opposite(self) -> Side {
        match self {
            Side::Buy => Side::Sell,
            Side::Sell => Side::Buy,
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            Side::Buy => 0,
            Side::Sell => 1,
        }
    }

    fn from_byte(byte: u8) -> Option<Side> {
        match byte {
            0 => Some(Side::Buy),
            1 => Some(Side::Sell),
            _ => None,
        }
    }
}

/// Client-chosen order identifier, unique among the orders resting in one book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OrderId(pub u64);

/// Trading account; positions are kept per account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(pub u32);

/// Instrument; each symbol has its own [`OrderBook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Symbol(pub u32);

/// Optional behaviour, switched per request so a fleet can enable it only once every replica
/// runs a version that understands it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Features {
    /// Accept [`OrderKind::Iceberg`] orders (version 2). Off: behave exactly as version 1.
    pub iceberg: bool,
}

impl Features {
    /// Version 1 behaviour: plain limit orders only.
    pub const V1: Features = Features { iceberg: false };
    /// Version 2 behaviour: limit and iceberg orders.
    pub const V2: Features = Features { iceberg: true };
}

/// How an order shows itself in the book.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderKind {
    /// All of the remaining quantity is visible and matchable (version 1).
    Limit,
    /// Only `display_qty` is visible at a time (version 2); see the module rules.
    Iceberg {
        /// Size of each visible slice, in `1..=qty`.
        display_qty: u64,
    },
}

/// A request to place an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NewOrder {
    /// Identifier, unique among the orders resting in the symbol's book.
    pub id: OrderId,
    /// Account that owns the order and whose position its fills change.
    pub account: AccountId,
    /// Book the order goes to.
    pub symbol: Symbol,
    /// Buy or sell.
    pub side: Side,
    /// Limit price in ticks, in `1..=PRICE_TICKS_MAX`.
    pub price: i64,
    /// Quantity, in `1..=QTY_MAX`.
    pub qty: u64,
    /// Limit or iceberg.
    pub kind: OrderKind,
}

/// A request to cancel the unfilled rest of a resting order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cancel {
    /// The order to cancel.
    pub id: OrderId,
    /// Must be the account that placed the order.
    pub account: AccountId,
    /// Book the order rests in.
    pub symbol: Symbol,
}

/// Anything the engine processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// Place an order.
    New(NewOrder),
    /// Cancel a resting order.
    Cancel(Cancel),
}

/// Why a request was refused. A refused request changes no state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Cancel of an id that does not rest in the symbol's book.
    UnknownOrder,
    /// Cancel by an account other than the one that placed the order.
    NotOwner,
    /// New order whose id already rests in the symbol's book.
    DuplicateOrderId,
    /// New order with quantity 0.
    ZeroQty,
    /// New order with quantity above [`QTY_MAX`].
    QtyOutOfRange,
    /// New order with a price outside `1..=PRICE_TICKS_MAX`.
    PriceOutOfRange,
    /// Iceberg whose `display_qty` is 0 or larger than its quantity.
    BadDisplayQty,
    /// Iceberg while [`Features::iceberg`] is off.
    FeatureDisabled,
}

/// The single reply to a request; fills are reported beside it in [`Outcome::fills`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Response {
    /// The new order was accepted (and may have traded and/or now rests).
    Ack {
        /// The accepted order.
        id: OrderId,
    },
    /// The request was refused and changed nothing.
    Reject {
        /// The order the request named.
        id: OrderId,
        /// Why.
        reason: RejectReason,
    },
    /// The order was removed from the book.
    Cancelled {
        /// The cancelled order.
        id: OrderId,
        /// Quantity that was still unfilled, visible and hidden together.
        remaining: u64,
    },
}

/// A trade between an incoming (taker) order and a resting (maker) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fill {
    /// The incoming order.
    pub taker: OrderId,
    /// The resting order.
    pub maker: OrderId,
    /// Account of the taker.
    pub taker_account: AccountId,
    /// Account of the maker.
    pub maker_account: AccountId,
    /// Side of the taker; the maker is on the other side.
    pub taker_side: Side,
    /// Trade price in ticks: always the maker's limit price.
    pub price: i64,
    /// Traded quantity.
    pub qty: u64,
}

/// What one request produced.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Outcome {
    /// The reply: every request gets exactly one.
    pub response: Response,
    /// Trades, in the order they happened.
    pub fills: Vec<Fill>,
}

/// An order resting in a book, as seen from outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RestingOrder {
    /// Identifier.
    pub id: OrderId,
    /// Owner.
    pub account: AccountId,
    /// Buy (bid) or sell (ask).
    pub side: Side,
    /// Limit price in ticks.
    pub price: i64,
    /// Quantity that can match now. For a limit order, all of its remaining quantity.
    pub visible_qty: u64,
    /// Iceberg quantity waiting behind the visible slice; 0 for a limit order.
    pub hidden_qty: u64,
    /// Limit or iceberg (with its slice size).
    pub kind: OrderKind,
}

impl RestingOrder {
    /// Unfilled quantity, visible and hidden together.
    pub fn remaining_qty(&self) -> u64 {
        self.visible_qty + self.hidden_qty
    }

    /// Checks what no resting order can break: the price range and the quantity rules.
    fn check(&self) -> Result<(), OrderProblem> {
        if !(1..=PRICE_TICKS_MAX).contains(&self.price) {
            return Err(OrderProblem::PriceOutOfRange);
        }
        if self.visible_qty == 0 {
            return Err(OrderProblem::Qty("visible qty is 0"));
        }
        match self.visible_qty.checked_add(self.hidden_qty) {
            Some(remaining) if remaining <= QTY_MAX => {}
            _ => return Err(OrderProblem::Qty("visible + hidden qty exceeds QTY_MAX")),
        }
        match self.kind {
            OrderKind::Limit if self.hidden_qty != 0 => Err(OrderProblem::Qty(
                "limit order (display qty 0) has hidden qty",
            )),
            OrderKind::Iceberg { display_qty } if self.visible_qty > display_qty => {
                Err(OrderProblem::Qty("iceberg shows more than its display qty"))
            }
            _ => Ok(()),
        }
    }
}

/// What [`RestingOrder::check`] found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OrderProblem {
    PriceOutOfRange,
    Qty(&'static str),
}

/// A resting order with its place in time priority: everything it takes to put it back into
/// its book exactly where it was (see [`MatchingEngine::place`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlacedOrder {
    /// The order.
    pub order: RestingOrder,
    /// The number the order took from its engine's counter when it came to rest. It never
    /// changes and no other order of the engine ever has it, so it names the order for as long
    /// as it rests (the application builds the order's work-unit id from it).
    pub entry_seq: u64,
    /// Its time priority within its price level, lower first: `entry_seq`, or the number it
    /// took when it last refreshed (icebergs).
    pub priority_seq: u64,
}

impl PlacedOrder {
    /// Checks what every resting order keeps: price and quantity rules, and numbers that
    /// start at 1 with the priority number never below the entry number.
    pub fn check(&self) -> Result<(), InvalidOrder> {
        let invalid = |problem| InvalidOrder {
            id: self.order.id,
            problem,
        };
        self.order.check().map_err(|problem| match problem {
            OrderProblem::PriceOutOfRange => invalid("price outside 1..=PRICE_TICKS_MAX"),
            OrderProblem::Qty(problem) => invalid(problem),
        })?;
        if self.entry_seq == 0 {
            return Err(invalid("entry number 0 (numbers start at 1)"));
        }
        if self.priority_seq < self.entry_seq {
            return Err(invalid("priority number below its entry number"));
        }
        Ok(())
    }
}

/// An order one request changed (see [`MatchingEngine::process_into`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Touched {
    /// The order rests, as it is after the request: it is new, was partially filled, or
    /// refreshed (a new priority).
    Rests(PlacedOrder),
    /// The order left its book: filled or cancelled.
    Gone {
        /// Its id.
        id: OrderId,
        /// Its entry number ([`PlacedOrder::entry_seq`]).
        entry_seq: u64,
    },
}

impl Touched {
    /// The touched order's entry number.
    pub fn entry_seq(&self) -> u64 {
        match self {
            Touched::Rests(placed) => placed.entry_seq,
            Touched::Gone { entry_seq, .. } => *entry_seq,
        }
    }
}

/// An order [`MatchingEngine::place`] refused: it breaks a rule that every resting order keeps, so it
/// cannot have come from a matching engine (corrupt or forged bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InvalidOrder {
    /// The order's id.
    pub id: OrderId,
    /// The rule it breaks.
    pub problem: &'static str,
}

impl fmt::Display for InvalidOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "resting order {}: {}; the record is corrupt, the order was not placed",
            self.id.0, self.problem
        )
    }
}

impl std::error::Error for InvalidOrder {}

/// Net holdings of one account, changed by fills. Fixed 16-byte encoding (see [`AccountPosition::encode`]).
///
/// Arithmetic wraps on overflow, so the sums over all accounts stay exactly 0 (mod 2^64) even
/// then; one fill's notional always fits (see [`PRICE_TICKS_MAX`] and [`QTY_MAX`]).
///
/// (Named `AccountPosition`, not `Position`: the runtime's `protocol::Position` is a point in a
/// replication stream.)
#[doc(alias = "Position")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AccountPosition {
    /// Units held: bought minus sold.
    pub position_qty: i64,
    /// Cash in price ticks × quantity: received minus paid.
    pub cash: i64,
}

impl AccountPosition {
    /// Length of [`AccountPosition::encode`]'s output: `position_qty` then `cash`, each i64 little-endian.
    pub const ENCODED_LEN: usize = 16;

    /// Books a trade of `qty` at `price` on `side` of this account.
    pub fn apply(&mut self, side: Side, price: i64, qty: u64) {
        let qty = qty as i64;
        let notional = price.wrapping_mul(qty);
        match side {
            Side::Buy => {
                self.position_qty = self.position_qty.wrapping_add(qty);
                self.cash = self.cash.wrapping_sub(notional);
            }
            Side::Sell => {
                self.position_qty = self.position_qty.wrapping_sub(qty);
                self.cash = self.cash.wrapping_add(notional);
            }
        }
    }

    /// The 16-byte record.
    pub fn to_bytes(&self) -> [u8; AccountPosition::ENCODED_LEN] {
        let mut bytes = [0u8; AccountPosition::ENCODED_LEN];
        bytes[..8].copy_from_slice(&self.position_qty.to_le_bytes());
        bytes[8..].copy_from_slice(&self.cash.to_le_bytes());
        bytes
    }

    /// Appends the 16-byte record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_bytes());
    }

    /// Reads a record written by [`AccountPosition::encode`]; `bytes` must be exactly 16 bytes long.
    pub fn decode(bytes: &[u8]) -> Result<AccountPosition, BookDecodeError> {
        let bytes: &[u8; AccountPosition::ENCODED_LEN] =
            bytes.try_into().map_err(|_| BookDecodeError::WrongLength {
                what: "position record",
                expected: AccountPosition::ENCODED_LEN,
                found: bytes.len(),
            })?;
        let (qty, cash) = bytes.split_at(8);
        Ok(AccountPosition {
            position_qty: i64::from_le_bytes(qty.try_into().expect("split at 8 of 16")),
            cash: i64::from_le_bytes(cash.try_into().expect("split at 8 of 16")),
        })
    }
}

/// Book layout version 1: plain limit orders only.
pub const LAYOUT_V1: u16 = 1;
/// Book layout version 2: version 1 plus per-order `hidden_qty` and `display_qty`.
pub const LAYOUT_V2: u16 = 2;

/// Bytes before the order records: u16 layout version, u32 order count.
const HEADER_LEN: usize = 2 + 4;
/// One v1 record: u64 id, u32 account, u8 side, i64 price, u64 visible (= remaining) qty.
const RECORD_V1_LEN: usize = 8 + 4 + 1 + 8 + 8;
/// One v2 record: a v1 record, then u64 hidden qty and u64 display qty (0 = limit order).
const RECORD_V2_LEN: usize = RECORD_V1_LEN + 8 + 8;
const _: () = assert!(RECORD_V1_LEN == 29 && RECORD_V2_LEN == 45);

/// Why [`OrderBook::encode_v1`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EncodeError {
    /// An iceberg rests in the book and layout v1 has no fields for it.
    IcebergInV1 {
        /// The first iceberg found, in priority order.
        id: OrderId,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::IcebergInV1 { id } => write!(
                f,
                "order {} is an iceberg, which book layout v1 cannot represent; \
                 encode with layout v2, or cancel or fill the icebergs first",
                id.0
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// Why bytes could not be decoded. Each variant names the field or order that was wrong.
///
/// (Named `BookDecodeError`, not `DecodeError`: the runtime's `protocol::DecodeError` is about
/// replication frames.)
#[doc(alias = "DecodeError")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BookDecodeError {
    /// The input ended inside `field`.
    Truncated {
        /// What was being read.
        field: &'static str,
        /// Where it starts in the input.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// The input is longer than its header says.
    TrailingBytes {
        /// Length implied by the header.
        expected_len: usize,
        /// Actual length.
        found_len: usize,
    },
    /// A fixed-size record has the wrong length.
    WrongLength {
        /// What was being read.
        what: &'static str,
        /// Its fixed length.
        expected: usize,
        /// The input's length.
        found: usize,
    },
    /// The leading layout version is not one this build reads.
    UnsupportedVersion {
        /// Version in the input.
        found: u16,
        /// Oldest version this build reads.
        oldest_supported: u16,
        /// Newest version this build reads.
        newest_supported: u16,
    },
    /// Side byte other than 0 (buy) or 1 (sell).
    BadSide {
        /// Position of the order in the input, from 0.
        index: u32,
        /// The byte found.
        found: u8,
    },
    /// Price outside `1..=PRICE_TICKS_MAX`.
    PriceOutOfRange {
        /// Position of the order in the input, from 0.
        index: u32,
        /// The order.
        id: OrderId,
        /// The price found.
        found: i64,
    },
    /// Quantities that no resting order can have.
    BadQty {
        /// Position of the order in the input, from 0.
        index: u32,
        /// The order.
        id: OrderId,
        /// Which rule the quantities break.
        problem: &'static str,
    },
    /// The same id rests twice.
    DuplicateOrderId {
        /// Position of the second occurrence in the input, from 0.
        index: u32,
        /// The id.
        id: OrderId,
    },
    /// Orders are not in priority order (all bids best first, then all asks best first).
    OutOfPriorityOrder {
        /// Position of the first misplaced order in the input, from 0.
        index: u32,
        /// The order.
        id: OrderId,
    },
    /// The best bid is at or above the best ask, which matching never leaves behind.
    CrossedBook {
        /// Highest bid price.
        best_bid: i64,
        /// Lowest ask price.
        best_ask: i64,
    },
}

impl fmt::Display for BookDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const CORRUPT: &str =
            "the bytes are corrupt or not an order book; restore them from a good copy";
        match self {
            BookDecodeError::Truncated {
                field,
                offset,
                needed,
                available,
            } => write!(
                f,
                "input ends inside {field} at offset {offset}: needed {needed} bytes, \
                 {available} left; the bytes were cut short, restore them from a good copy"
            ),
            BookDecodeError::TrailingBytes {
                expected_len,
                found_len,
            } => write!(
                f,
                "header implies {expected_len} bytes but the input has {found_len}; {CORRUPT}"
            ),
            BookDecodeError::WrongLength {
                what,
                expected,
                found,
            } => {
                write!(
                    f,
                    "{what} must be {expected} bytes, found {found}; {CORRUPT}"
                )
            }
            BookDecodeError::UnsupportedVersion {
                found,
                oldest_supported,
                newest_supported,
            } => write!(
                f,
                "book layout version {found} is not supported (this build reads \
                 {oldest_supported}..={newest_supported}); run a build that knows version {found}"
            ),
            BookDecodeError::BadSide { index, found } => {
                write!(
                    f,
                    "order #{index}: side byte {found}, expected 0 (buy) or 1 (sell); {CORRUPT}"
                )
            }
            BookDecodeError::PriceOutOfRange { index, id, found } => write!(
                f,
                "order #{index} (id {}): price {found} outside 1..={PRICE_TICKS_MAX}; {CORRUPT}",
                id.0
            ),
            BookDecodeError::BadQty { index, id, problem } => {
                write!(f, "order #{index} (id {}): {problem}; {CORRUPT}", id.0)
            }
            BookDecodeError::DuplicateOrderId { index, id } => {
                write!(f, "order #{index}: id {} already appeared; {CORRUPT}", id.0)
            }
            BookDecodeError::OutOfPriorityOrder { index, id } => write!(
                f,
                "order #{index} (id {}) is out of priority order (bids best first, then asks \
                 best first); {CORRUPT}",
                id.0
            ),
            BookDecodeError::CrossedBook { best_bid, best_ask } => write!(
                f,
                "best bid {best_bid} is not below best ask {best_ask}, which matching never \
                 leaves; {CORRUPT}"
            ),
        }
    }
}

impl std::error::Error for BookDecodeError {}

/// Slot index meaning "no order".
const NIL: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Slot {
    placed: PlacedOrder,
    prev: u32,
    next: u32,
}

/// Order storage: slots are reused through a free list, so a book in steady state does not
/// allocate per order. Orders at one price are linked through `prev`/`next` in time order.
#[derive(Clone, Debug, Default)]
struct Slab {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Slab {
    fn with_capacity(capacity: usize) -> Slab {
        Slab {
            slots: Vec::with_capacity(capacity),
            free: Vec::new(),
        }
    }

    fn insert(&mut self, placed: PlacedOrder) -> u32 {
        let slot = Slot {
            placed,
            prev: NIL,
            next: NIL,
        };
        match self.free.pop() {
            Some(idx) => {
                self.slots[idx as usize] = slot;
                idx
            }
            None => {
                // u32 indices keep links small; 4 billion resting orders would need >200 GB.
                let idx = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&idx| idx != NIL)
                    .expect("order book holds fewer than u32::MAX orders");
                self.slots.push(slot);
                idx
            }
        }
    }

    fn release(&mut self, idx: u32) {
        self.free.push(idx);
    }

    fn get(&self, idx: u32) -> &Slot {
        &self.slots[idx as usize]
    }

    fn get_mut(&mut self, idx: u32) -> &mut Slot {
        &mut self.slots[idx as usize]
    }
}

/// The orders at one price, as a FIFO linked through the slab.
#[derive(Clone, Copy, Debug)]
struct Level {
    head: u32,
    tail: u32,
}

impl Level {
    const EMPTY: Level = Level {
        head: NIL,
        tail: NIL,
    };

    fn is_empty(&self) -> bool {
        self.head == NIL
    }

    fn push_back(&mut self, slab: &mut Slab, idx: u32) {
        let tail = self.tail;
        {
            let slot = slab.get_mut(idx);
            slot.prev = tail;
            slot.next = NIL;
        }
        if tail == NIL {
            self.head = idx;
        } else {
            slab.get_mut(tail).next = idx;
        }
        self.tail = idx;
    }

    /// Links `idx` in after every order of the level with a lower priority number (at the back
    /// when it has the highest, as a new or refreshed order does: then no walk at all).
    fn insert_by_priority(&mut self, slab: &mut Slab, idx: u32) {
        let priority_seq = slab.get(idx).placed.priority_seq;
        let mut before = self.tail;
        while before != NIL && slab.get(before).placed.priority_seq > priority_seq {
            before = slab.get(before).prev;
        }
        let after = if before == NIL {
            self.head
        } else {
            slab.get(before).next
        };
        {
            let slot = slab.get_mut(idx);
            slot.prev = before;
            slot.next = after;
        }
        if before == NIL {
            self.head = idx;
        } else {
            slab.get_mut(before).next = idx;
        }
        if after == NIL {
            self.tail = idx;
        } else {
            slab.get_mut(after).prev = idx;
        }
    }

    fn unlink(&mut self, slab: &mut Slab, idx: u32) {
        let (prev, next) = {
            let slot = slab.get(idx);
            (slot.prev, slot.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            slab.get_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            slab.get_mut(next).prev = prev;
        }
    }
}

/// Walks one level in time order.
struct LevelIter<'a> {
    slab: &'a Slab,
    cursor: u32,
}

impl<'a> Iterator for LevelIter<'a> {
    type Item = &'a PlacedOrder;

    fn next(&mut self) -> Option<&'a PlacedOrder> {
        if self.cursor == NIL {
            return None;
        }
        let slot = self.slab.get(self.cursor);
        self.cursor = slot.next;
        Some(&slot.placed)
    }
}

/// Checks a new order on its own, before any book is touched. The order of the checks is part
/// of the contract: a version-1 engine does not know icebergs, so that check comes first.
fn validate_new(order: &NewOrder, features: Features) -> Result<(), RejectReason> {
    if matches!(order.kind, OrderKind::Iceberg { .. }) && !features.iceberg {
        return Err(RejectReason::FeatureDisabled);
    }
    if order.qty == 0 {
        return Err(RejectReason::ZeroQty);
    }
    if order.qty > QTY_MAX {
        return Err(RejectReason::QtyOutOfRange);
    }
    if !(1..=PRICE_TICKS_MAX).contains(&order.price) {
        return Err(RejectReason::PriceOutOfRange);
    }
    if let OrderKind::Iceberg { display_qty } = order.kind {
        if display_qty == 0 || display_qty > order.qty {
            return Err(RejectReason::BadDisplayQty);
        }
    }
    Ok(())
}

/// Visible and hidden quantity of an iceberg after `take` (less than `visible + hidden`) is
/// taken from it in one go, refreshing slice after slice as the rules say.
fn iceberg_after_take(visible: u64, hidden: u64, display_qty: u64, take: u64) -> (u64, u64) {
    debug_assert!(take < visible + hidden && display_qty > 0);
    if take < visible {
        return (visible - take, hidden);
    }
    // The visible slice is gone; `from_hidden` (< hidden) comes out of slices of
    // `display_qty`, the last one possibly shorter.
    let from_hidden = take - visible;
    let slice_index = from_hidden / display_qty;
    let slice_qty = display_qty.min(hidden - slice_index * display_qty);
    let visible_after = slice_qty - from_hidden % display_qty;
    (visible_after, hidden - from_hidden - visible_after)
}

/// Appends a fill, merging it into the previous one if that was the same taker against the same
/// maker at the same price within this submission (`fills[start..]`).
fn push_fill(fills: &mut Vec<Fill>, start: usize, fill: Fill) {
    if fills.len() > start {
        if let Some(last) = fills.last_mut() {
            if last.taker == fill.taker && last.maker == fill.maker && last.price == fill.price {
                last.qty += fill.qty;
                return;
            }
        }
    }
    fills.push(fill);
}

/// What happens to a maker after a match step.
enum After {
    Stays,
    Requeue,
    Remove,
}

/// One symbol's resting orders with price-time priority.
///
/// Equality compares the resting orders in priority order, not the internal storage, so a
/// decoded book equals the book it was encoded from.
///
/// # Examples
/// ```
/// use matchbook::book::*;
///
/// let mut book = OrderBook::new();
/// let (mut last_seq, mut fills, mut touched) = (0, Vec::new(), Vec::new());
/// let order = |id, side, price, qty| NewOrder {
///     id: OrderId(id), account: AccountId(1), symbol: Symbol(0), side, price, qty, kind: OrderKind::Limit,
/// };
/// book.submit(&order(1, Side::Sell, 101, 5), Features::V1, &mut last_seq, &mut fills, &mut touched).unwrap();
/// book.submit(&order(2, Side::Buy, 99, 5), Features::V1, &mut last_seq, &mut fills, &mut touched).unwrap();
/// assert_eq!((book.best_bid(), book.best_ask()), (Some(99), Some(101)));
/// assert!(fills.is_empty());
/// // Each order that came to rest was reported, with its place in time priority.
/// assert_eq!(touched.len(), 2);
/// assert_eq!(book.placed(OrderId(2)).unwrap().entry_seq, 2);
/// assert_eq!(book.cancel(OrderId(1), AccountId(1)).unwrap().order.remaining_qty(), 5);
/// assert_eq!(book.len(), 1);
/// ```
#[derive(Clone, Default)]
pub struct OrderBook {
    slab: Slab,
    index: HashMap<OrderId, u32>,
    bids: BTreeMap<i64, Level>,
    asks: BTreeMap<i64, Level>,
}

impl OrderBook {
    /// An empty book.
    pub fn new() -> OrderBook {
        OrderBook::default()
    }

    fn with_capacity(orders: usize) -> OrderBook {
        OrderBook {
            slab: Slab::with_capacity(orders),
            index: HashMap::with_capacity(orders),
            bids: BTreeMap::new(),
            asks: BTreeMap::new(),
        }
    }

    /// Number of resting orders.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when nothing rests.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Highest bid price.
    pub fn best_bid(&self) -> Option<i64> {
        self.bids.last_key_value().map(|(&price, _)| price)
    }

    /// Lowest ask price.
    pub fn best_ask(&self) -> Option<i64> {
        self.asks.first_key_value().map(|(&price, _)| price)
    }

    /// The resting order with this id.
    pub fn get(&self, id: OrderId) -> Option<&RestingOrder> {
        self.placed(id).map(|placed| &placed.order)
    }

    /// The resting order with this id, with its place in time priority.
    pub fn placed(&self, id: OrderId) -> Option<&PlacedOrder> {
        self.index.get(&id).map(|&idx| &self.slab.get(idx).placed)
    }

    /// All resting orders in priority order: bids best price first, then asks best price
    /// first; within a price, earliest first. This is also the encoding's order.
    pub fn orders(&self) -> impl Iterator<Item = &RestingOrder> + '_ {
        self.placed_orders().map(|placed| &placed.order)
    }

    /// [`OrderBook::orders`] with their places in time priority: within a price level the
    /// priority numbers ascend.
    pub fn placed_orders(&self) -> impl Iterator<Item = &PlacedOrder> + '_ {
        self.bids
            .values()
            .rev()
            .chain(self.asks.values())
            .flat_map(move |level| LevelIter {
                slab: &self.slab,
                cursor: level.head,
            })
    }

    /// Validates `order`, matches it against the opposite side, appends the trades to `fills`
    /// and rests what is left. Appends to `touched` every resting order it changed, once, as it
    /// ended up: makers it filled (gone) or partially filled or refreshed, and the order itself
    /// if it rests. Sequence numbers come from `last_seq` (the last number taken; see
    /// [`PlacedOrder`]), which one engine shares between all its books. On `Err` nothing
    /// changed.
    ///
    /// `order.symbol` is not looked at: the caller picked this book for it.
    pub fn submit(
        &mut self,
        order: &NewOrder,
        features: Features,
        last_seq: &mut u64,
        fills: &mut Vec<Fill>,
        touched: &mut Vec<Touched>,
    ) -> Result<(), RejectReason> {
        validate_new(order, features)?;
        if self.index.contains_key(&order.id) {
            return Err(RejectReason::DuplicateOrderId);
        }
        let mut effects = Effects::new(fills, touched, last_seq);
        let mut remaining_qty = order.qty;
        while remaining_qty > 0 {
            let entry = match order.side {
                Side::Buy => self.asks.first_entry(),
                Side::Sell => self.bids.last_entry(),
            };
            let Some(mut entry) = entry else { break };
            let price = *entry.key();
            let crosses = match order.side {
                Side::Buy => price <= order.price,
                Side::Sell => price >= order.price,
            };
            if !crosses {
                break;
            }
            remaining_qty = match_level(
                &mut self.slab,
                &mut self.index,
                entry.get_mut(),
                order,
                price,
                remaining_qty,
                &mut effects,
            );
            if entry.get().is_empty() {
                entry.remove();
            }
        }
        if remaining_qty > 0 {
            let (visible_qty, hidden_qty) = match order.kind {
                OrderKind::Limit => (remaining_qty, 0),
                OrderKind::Iceberg { display_qty } => {
                    let visible_qty = display_qty.min(remaining_qty);
                    (visible_qty, remaining_qty - visible_qty)
                }
            };
            let seq = effects.next_seq();
            let placed = PlacedOrder {
                order: RestingOrder {
                    id: order.id,
                    account: order.account,
                    side: order.side,
                    price: order.price,
                    visible_qty,
                    hidden_qty,
                    kind: order.kind,
                },
                entry_seq: seq,
                priority_seq: seq,
            };
            self.insert(placed);
            // New to the book: it cannot be in the list yet.
            effects.touched.push(Touched::Rests(placed));
        }
        Ok(())
    }

    /// Removes the order and returns it as it was (its unfilled quantity is
    /// [`RestingOrder::remaining_qty`]).
    pub fn cancel(&mut self, id: OrderId, account: AccountId) -> Result<PlacedOrder, RejectReason> {
        let &idx = self.index.get(&id).ok_or(RejectReason::UnknownOrder)?;
        if self.slab.get(idx).placed.order.account != account {
            return Err(RejectReason::NotOwner);
        }
        Ok(self.remove_slot(idx))
    }

    fn placed_mut(&mut self, id: OrderId) -> Option<&mut PlacedOrder> {
        let &idx = self.index.get(&id)?;
        Some(&mut self.slab.get_mut(idx).placed)
    }

    /// Removes the order with this id, whoever owns it.
    fn remove(&mut self, id: OrderId) -> Option<PlacedOrder> {
        let &idx = self.index.get(&id)?;
        Some(self.remove_slot(idx))
    }

    fn remove_slot(&mut self, idx: u32) -> PlacedOrder {
        let placed = self.slab.get(idx).placed;
        let order = placed.order;
        let levels = match order.side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        let btree_map::Entry::Occupied(mut level) = levels.entry(order.price) else {
            panic!(
                "resting order {} has no level at its price {}",
                order.id.0, order.price
            );
        };
        level.get_mut().unlink(&mut self.slab, idx);
        if level.get().is_empty() {
            level.remove();
        }
        self.slab.release(idx);
        self.index.remove(&order.id);
        placed
    }

    /// Puts `placed` into its price level after every order with a lower priority number: at
    /// the back for a new order. The caller guarantees the id does not rest yet.
    fn insert(&mut self, placed: PlacedOrder) {
        let order = placed.order;
        let idx = self.slab.insert(placed);
        let levels = match order.side {
            Side::Buy => &mut self.bids,
            Side::Sell => &mut self.asks,
        };
        levels
            .entry(order.price)
            .or_insert(Level::EMPTY)
            .insert_by_priority(&mut self.slab, idx);
        let previous = self.index.insert(order.id, idx);
        debug_assert!(previous.is_none(), "order id {} rested twice", order.id.0);
    }

    /// Appends the book in the current layout ([`LAYOUT_V2`]) to `out`.
    ///
    /// Layout (all little-endian): u16 layout version, u32 order count, then one record per
    /// order in [`OrderBook::orders`] order: u64 id, u32 account, u8 side (0 buy, 1 sell),
    /// i64 price, u64 visible qty, and in v2 only: u64 hidden qty, u64 display qty (0 for a
    /// limit order). Equal books give equal bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.write(out, LAYOUT_V2);
    }

    /// Appends the book in [`LAYOUT_V1`], which a version-1 build can read. Refuses, leaving
    /// `out` unchanged, if an iceberg rests.
    pub fn encode_v1(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        if let Some(iceberg) = self
            .orders()
            .find(|o| matches!(o.kind, OrderKind::Iceberg { .. }))
        {
            return Err(EncodeError::IcebergInV1 { id: iceberg.id });
        }
        self.write(out, LAYOUT_V1);
        Ok(())
    }

    fn write(&self, out: &mut Vec<u8>, version: u16) {
        let record_len = if version == LAYOUT_V1 {
            RECORD_V1_LEN
        } else {
            RECORD_V2_LEN
        };
        let count = u32::try_from(self.len()).expect("slab indices keep the count below u32::MAX");
        let start = out.len();
        out.reserve(HEADER_LEN + self.len() * record_len);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&count.to_le_bytes());
        for order in self.orders() {
            out.extend_from_slice(&order.id.0.to_le_bytes());
            out.extend_from_slice(&order.account.0.to_le_bytes());
            out.push(order.side.to_byte());
            out.extend_from_slice(&order.price.to_le_bytes());
            out.extend_from_slice(&order.visible_qty.to_le_bytes());
            if version == LAYOUT_V2 {
                let display_qty = match order.kind {
                    OrderKind::Limit => 0,
                    OrderKind::Iceberg { display_qty } => display_qty,
                };
                out.extend_from_slice(&order.hidden_qty.to_le_bytes());
                out.extend_from_slice(&display_qty.to_le_bytes());
            }
        }
        assert_eq!(out.len() - start, HEADER_LEN + self.len() * record_len);
    }

    /// Reads bytes written by [`OrderBook::encode`] or [`OrderBook::encode_v1`]. Never panics:
    /// anything but a well-formed, canonical book of a supported layout is an error naming the
    /// first thing found wrong. Whatever decodes re-encodes (in its layout) to the same bytes.
    /// The encoding carries no sequence numbers: the decoded orders are numbered 1, 2, … in
    /// priority order.
    pub fn decode(bytes: &[u8]) -> Result<OrderBook, BookDecodeError> {
        let mut reader = Reader { bytes, offset: 0 };
        let (version, count) = Self::decode_header(&mut reader)?;
        let mut book = OrderBook::with_capacity(count as usize);
        let mut previous: Option<(Side, i64)> = None;
        for index in 0..count {
            let order = Self::decode_order(&mut reader, version, index)?;
            let (id, side, price) = (order.id, order.side, order.price);
            let in_order = match (previous, side) {
                (None, _) | (Some((Side::Buy, _)), Side::Sell) => true,
                (Some((Side::Buy, previous_price)), Side::Buy) => price <= previous_price,
                (Some((Side::Sell, previous_price)), Side::Sell) => price >= previous_price,
                (Some((Side::Sell, _)), Side::Buy) => false,
            };
            if !in_order {
                return Err(BookDecodeError::OutOfPriorityOrder { index, id });
            }
            if book.index.contains_key(&id) {
                return Err(BookDecodeError::DuplicateOrderId { index, id });
            }
            previous = Some((side, price));
            // Numbered in priority order, so each goes to the back of its level.
            let seq = u64::from(index) + 1;
            book.insert(PlacedOrder {
                order,
                entry_seq: seq,
                priority_seq: seq,
            });
        }
        if let (Some(best_bid), Some(best_ask)) = (book.best_bid(), book.best_ask()) {
            if best_bid >= best_ask {
                return Err(BookDecodeError::CrossedBook { best_bid, best_ask });
            }
        }
        debug_assert_eq!(reader.offset, bytes.len());
        Ok(book)
    }

    /// The layout version and the order count, once the input's length is exactly what they
    /// announce.
    fn decode_header(reader: &mut Reader<'_>) -> Result<(u16, u32), BookDecodeError> {
        let bytes = reader.bytes;
        let version = reader.u16("layout version")?;
        let record_len = match version {
            LAYOUT_V1 => RECORD_V1_LEN,
            LAYOUT_V2 => RECORD_V2_LEN,
            found => {
                return Err(BookDecodeError::UnsupportedVersion {
                    found,
                    oldest_supported: LAYOUT_V1,
                    newest_supported: LAYOUT_V2,
                })
            }
        };
        let count = reader.u32("order count")?;
        // Check the length before allocating anything sized by `count`.
        let records_len = (count as usize).saturating_mul(record_len);
        let available = bytes.len() - reader.offset;
        if available < records_len {
            return Err(BookDecodeError::Truncated {
                field: "order records",
                offset: reader.offset,
                needed: records_len,
                available,
            });
        }
        if available > records_len {
            return Err(BookDecodeError::TrailingBytes {
                expected_len: reader.offset + records_len,
                found_len: bytes.len(),
            });
        }
        Ok((version, count))
    }

    /// Order `index` of a book of layout `version`, checked on its own (price, quantities).
    fn decode_order(
        reader: &mut Reader<'_>,
        version: u16,
        index: u32,
    ) -> Result<RestingOrder, BookDecodeError> {
        let id = OrderId(reader.u64("order id")?);
        let account = AccountId(reader.u32("account")?);
        let side_byte = reader.u8("side")?;
        let side = Side::from_byte(side_byte).ok_or(BookDecodeError::BadSide {
            index,
            found: side_byte,
        })?;
        let price = reader.i64("price")?;
        let visible_qty = reader.u64("visible qty")?;
        let (hidden_qty, kind) = if version == LAYOUT_V2 {
            let hidden_qty = reader.u64("hidden qty")?;
            let display_qty = reader.u64("display qty")?;
            let kind = match display_qty {
                0 => OrderKind::Limit,
                display_qty => OrderKind::Iceberg { display_qty },
            };
            (hidden_qty, kind)
        } else {
            (0, OrderKind::Limit)
        };

        let order = RestingOrder {
            id,
            account,
            side,
            price,
            visible_qty,
            hidden_qty,
            kind,
        };
        order.check().map_err(|problem| match problem {
            OrderProblem::PriceOutOfRange => BookDecodeError::PriceOutOfRange {
                index,
                id,
                found: price,
            },
            OrderProblem::Qty(problem) => BookDecodeError::BadQty { index, id, problem },
        })?;
        Ok(order)
    }
}

/// Where one submission reports what it did: its fills (merged as the rules say), the orders
/// it touched (each once, as it ended up), and the sequence numbers it takes.
struct Effects<'a> {
    fills: &'a mut Vec<Fill>,
    fills_start: usize,
    touched: &'a mut Vec<Touched>,
    touched_start: usize,
    last_seq: &'a mut u64,
    /// The first number this submission takes. Only an order whose priority number is at
    /// least this one (it refreshed during this submission) can be touched twice, so only
    /// then is the list searched.
    first_seq: u64,
}

impl Effects<'_> {
    fn new<'a>(
        fills: &'a mut Vec<Fill>,
        touched: &'a mut Vec<Touched>,
        last_seq: &'a mut u64,
    ) -> Effects<'a> {
        Effects {
            fills_start: fills.len(),
            fills,
            touched_start: touched.len(),
            touched,
            first_seq: *last_seq + 1,
            last_seq,
        }
    }

    fn next_seq(&mut self) -> u64 {
        *self.last_seq += 1;
        *self.last_seq
    }

    /// Records that an order changed; `priority_before` is its priority number before the
    /// change.
    fn touch(&mut self, touched: Touched, priority_before: u64) {
        if priority_before >= self.first_seq {
            let entry_seq = touched.entry_seq();
            if let Some(seen) = self.touched[self.touched_start..]
                .iter_mut()
                .find(|seen| seen.entry_seq() == entry_seq)
            {
                *seen = touched;
                return;
            }
        }
        self.touched.push(touched);
    }
}

/// Matches `taker` against one price level until the level is empty or `remaining_qty` is 0;
/// returns what is left of `remaining_qty`.
fn match_level(
    slab: &mut Slab,
    index: &mut HashMap<OrderId, u32>,
    level: &mut Level,
    taker: &NewOrder,
    price: i64,
    mut remaining_qty: u64,
    effects: &mut Effects<'_>,
) -> u64 {
    while remaining_qty > 0 && !level.is_empty() {
        let idx = level.head;
        let alone = level.head == level.tail;
        let placed = &mut slab.get_mut(idx).placed;
        let priority_before = placed.priority_seq;
        let (take, after) = take_from_maker(placed, alone, remaining_qty, effects);
        let placed = *placed;
        let maker = placed.order;
        remaining_qty -= take;
        push_fill(
            effects.fills,
            effects.fills_start,
            Fill {
                taker: taker.id,
                maker: maker.id,
                taker_account: taker.account,
                maker_account: maker.account,
                taker_side: taker.side,
                price,
                qty: take,
            },
        );
        match after {
            After::Stays => effects.touch(Touched::Rests(placed), priority_before),
            After::Requeue => {
                level.unlink(slab, idx);
                level.push_back(slab, idx);
                effects.touch(Touched::Rests(placed), priority_before);
            }
            After::Remove => {
                level.unlink(slab, idx);
                slab.release(idx);
                index.remove(&maker.id);
                let gone = Touched::Gone {
                    id: maker.id,
                    entry_seq: placed.entry_seq,
                };
                effects.touch(gone, priority_before);
            }
        }
    }
    remaining_qty
}

/// Takes up to `remaining_qty` from the maker `placed` (alone at its level or not), refreshing
/// an iceberg's slice as the rules say; returns the quantity taken and where the maker goes.
fn take_from_maker(
    placed: &mut PlacedOrder,
    alone: bool,
    remaining_qty: u64,
    effects: &mut Effects<'_>,
) -> (u64, After) {
    let maker = &mut placed.order;
    match maker.kind {
        // Alone at its level, an iceberg's slices would all go to this taker one after the
        // other, so take them in one step instead of one loop turn per slice.
        OrderKind::Iceberg { display_qty } if alone => {
            let total = maker.remaining_qty();
            let take = remaining_qty.min(total);
            if take == total {
                (take, After::Remove)
            } else {
                let refreshed = take >= maker.visible_qty;
                (maker.visible_qty, maker.hidden_qty) =
                    iceberg_after_take(maker.visible_qty, maker.hidden_qty, display_qty, take);
                if refreshed {
                    // Back of its level, where it is alone: a new priority, same place.
                    placed.priority_seq = effects.next_seq();
                }
                (take, After::Stays)
            }
        }
        _ => {
            let take = remaining_qty.min(maker.visible_qty);
            maker.visible_qty -= take;
            if maker.visible_qty > 0 {
                (take, After::Stays)
            } else if maker.hidden_qty > 0 {
                let OrderKind::Iceberg { display_qty } = maker.kind else {
                    panic!("limit order {} has hidden qty", maker.id.0);
                };
                maker.visible_qty = display_qty.min(maker.hidden_qty);
                maker.hidden_qty -= maker.visible_qty;
                placed.priority_seq = effects.next_seq();
                (take, After::Requeue)
            } else {
                (take, After::Remove)
            }
        }
    }
}

impl PartialEq for OrderBook {
    fn eq(&self, other: &OrderBook) -> bool {
        self.len() == other.len() && self.orders().eq(other.orders())
    }
}

impl Eq for OrderBook {}

impl fmt::Debug for OrderBook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.orders()).finish()
    }
}

/// Bounds-checked little-endian reads.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], BookDecodeError> {
        let available = self.bytes.len() - self.offset;
        let truncated = BookDecodeError::Truncated {
            field,
            offset: self.offset,
            needed: N,
            available,
        };
        let chunk = self
            .bytes
            .get(self.offset..self.offset + N)
            .ok_or(truncated)?;
        self.offset += N;
        Ok(chunk.try_into().expect("slice of length N"))
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, BookDecodeError> {
        Ok(self.take::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, BookDecodeError> {
        self.take(field).map(u16::from_le_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, BookDecodeError> {
        self.take(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, BookDecodeError> {
        self.take(field).map(u64::from_le_bytes)
    }

    fn i64(&mut self, field: &'static str) -> Result<i64, BookDecodeError> {
        self.take(field).map(i64::from_le_bytes)
    }
}

/// Books per symbol plus positions per account: everything the exchange knows.
///
/// One counter numbers the resting orders of all books ([`PlacedOrder`]); an index from entry
/// number to book finds an order named by its entry number alone ([`MatchingEngine::remove`]).
///
/// # Examples
/// ```
/// use matchbook::book::*;
///
/// let mut engine = MatchingEngine::new();
/// let iceberg = NewOrder {
///     id: OrderId(1), account: AccountId(1), symbol: Symbol(3), side: Side::Buy,
///     price: 50, qty: 100, kind: OrderKind::Iceberg { display_qty: 10 },
/// };
/// let refused = engine.process(Request::New(iceberg), Features::V1);
/// assert_eq!(refused.response, Response::Reject { id: OrderId(1), reason: RejectReason::FeatureDisabled });
/// assert!(engine.book(Symbol(3)).is_none());
///
/// engine.process(Request::New(iceberg), Features::V2);
/// let resting = engine.book(Symbol(3)).unwrap().get(OrderId(1)).unwrap();
/// assert_eq!((resting.visible_qty, resting.hidden_qty), (10, 90));
///
/// // A copy rebuilt order by order from what the requests reported equals the original.
/// let mut copy = MatchingEngine::new();
/// copy.restore_book(Symbol(3), engine.last_seq());
/// for placed in engine.book(Symbol(3)).unwrap().placed_orders() {
///     copy.place(Symbol(3), *placed).unwrap();
/// }
/// assert_eq!(copy, engine);
///
/// let cancel = Cancel { id: OrderId(1), account: AccountId(1), symbol: Symbol(3) };
/// let (mut fills, mut touched) = (Vec::new(), Vec::new());
/// let response = engine.process_into(Request::Cancel(cancel), Features::V2, &mut fills, &mut touched);
/// assert_eq!(response, Response::Cancelled { id: OrderId(1), remaining: 100 });
/// assert_eq!(touched, vec![Touched::Gone { id: OrderId(1), entry_seq: 1 }]);
/// assert!(copy.remove(1).is_some());
/// assert_eq!(copy, engine);
/// ```
///
/// (Named `MatchingEngine`, not `Engine`: `understudy_runtime::engine::Engine` is the replicated
/// process that hosts this application.)
#[doc(alias = "Engine")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MatchingEngine {
    books: BTreeMap<Symbol, OrderBook>,
    positions: BTreeMap<AccountId, AccountPosition>,
    /// The last sequence number taken, by any book.
    last_seq: u64,
    /// Entry number → where the order rests, for every resting order.
    entries: HashMap<u64, (Symbol, OrderId)>,
}

impl MatchingEngine {
    /// No books, no positions.
    pub fn new() -> MatchingEngine {
        MatchingEngine::default()
    }

    /// Processes one request; see [`MatchingEngine::process_into`] to reuse buffers and learn which
    /// resting orders changed.
    pub fn process(&mut self, request: Request, features: Features) -> Outcome {
        let (mut fills, mut touched) = (Vec::new(), Vec::new());
        let response = self.process_into(request, features, &mut fills, &mut touched);
        Outcome { response, fills }
    }

    /// Processes one request, appending its fills to `fills` and the resting orders it changed
    /// to `touched` (neither is cleared; see [`OrderBook::submit`]), and booking the fills on
    /// both accounts' positions. A book is created by the first order accepted for its symbol
    /// and kept, even when it empties. A refused request appends nothing.
    pub fn process_into(
        &mut self,
        request: Request,
        features: Features,
        fills: &mut Vec<Fill>,
        touched: &mut Vec<Touched>,
    ) -> Response {
        match request {
            Request::New(order) => {
                let reject = |reason| Response::Reject {
                    id: order.id,
                    reason,
                };
                // Validate before creating the symbol's book, so a refusal changes nothing.
                if let Err(reason) = validate_new(&order, features) {
                    return reject(reason);
                }
                let (fills_start, touched_start) = (fills.len(), touched.len());
                let seq_before = self.last_seq;
                let book = self.books.entry(order.symbol).or_default();
                if let Err(reason) =
                    book.submit(&order, features, &mut self.last_seq, fills, touched)
                {
                    return reject(reason);
                }
                for fill in &fills[fills_start..] {
                    let taker = self.positions.entry(fill.taker_account).or_default();
                    taker.apply(fill.taker_side, fill.price, fill.qty);
                    let maker = self.positions.entry(fill.maker_account).or_default();
                    maker.apply(fill.taker_side.opposite(), fill.price, fill.qty);
                }
                for touched in &touched[touched_start..] {
                    match touched {
                        Touched::Rests(placed) if placed.entry_seq > seq_before => {
                            self.entries
                                .insert(placed.entry_seq, (order.symbol, placed.order.id));
                        }
                        Touched::Rests(_) => {}
                        Touched::Gone { entry_seq, .. } => {
                            self.entries.remove(entry_seq);
                        }
                    }
                }
                Response::Ack { id: order.id }
            }
            Request::Cancel(cancel) => {
                let result = match self.books.get_mut(&cancel.symbol) {
                    Some(book) => book.cancel(cancel.id, cancel.account),
                    None => Err(RejectReason::UnknownOrder),
                };
                match result {
                    Ok(placed) => {
                        self.entries.remove(&placed.entry_seq);
                        touched.push(Touched::Gone {
                            id: cancel.id,
                            entry_seq: placed.entry_seq,
                        });
                        Response::Cancelled {
                            id: cancel.id,
                            remaining: placed.order.remaining_qty(),
                        }
                    }
                    Err(reason) => Response::Reject {
                        id: cancel.id,
                        reason,
                    },
                }
            }
        }
    }

    /// The book for `symbol`, if an order was ever accepted for it.
    pub fn book(&self, symbol: Symbol) -> Option<&OrderBook> {
        self.books.get(&symbol)
    }

    /// All books, by ascending symbol.
    pub fn books(&self) -> impl Iterator<Item = (Symbol, &OrderBook)> + '_ {
        self.books.iter().map(|(&symbol, book)| (symbol, book))
    }

    /// The last sequence number any book took (0 before the first order rested).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Where the order with this entry number rests, if it does.
    pub fn entry(&self, entry_seq: u64) -> Option<(Symbol, &PlacedOrder)> {
        let &(symbol, id) = self.entries.get(&entry_seq)?;
        let placed = self.books.get(&symbol)?.placed(id)?;
        (placed.entry_seq == entry_seq).then_some((symbol, placed))
    }

    /// Restores a book's existence and the counter: creates the (empty) book for `symbol` if
    /// there is none, and makes sure the next number taken is above `last_seq`.
    pub fn restore_book(&mut self, symbol: Symbol, last_seq: u64) {
        self.books.entry(symbol).or_default();
        self.last_seq = self.last_seq.max(last_seq);
    }

    /// Puts a resting order back into `symbol`'s book, at the place its priority number gives
    /// it within its level: the state of one order, as a request reported it
    /// ([`Touched::Rests`]). It replaces the order with the same entry number wherever that
    /// rests (updated in place when it kept its side, price and priority), and any other order
    /// with the same id in that book. Orders may be placed in any sequence: the book ends up
    /// with the same time priority at every price. Creates the book if needed; the counter
    /// moves past the order's numbers.
    ///
    /// Refuses, changing nothing, an order no matching engine could have left resting.
    pub fn place(&mut self, symbol: Symbol, placed: PlacedOrder) -> Result<(), InvalidOrder> {
        placed.check()?;
        if let Some(&(at, id)) = self.entries.get(&placed.entry_seq) {
            let same_place = |current: &PlacedOrder| {
                current.entry_seq == placed.entry_seq
                    && current.priority_seq == placed.priority_seq
                    && current.order.side == placed.order.side
                    && current.order.price == placed.order.price
            };
            if at == symbol && id == placed.order.id {
                let book = self.books.get_mut(&at);
                if let Some(current) = book.and_then(|book| book.placed_mut(id)) {
                    if same_place(current) {
                        *current = placed;
                        return Ok(());
                    }
                }
            }
            self.remove(placed.entry_seq);
        }
        let book = self.books.entry(symbol).or_default();
        if let Some(other) = book.remove(placed.order.id) {
            self.entries.remove(&other.entry_seq);
        }
        book.insert(placed);
        self.entries
            .insert(placed.entry_seq, (symbol, placed.order.id));
        self.last_seq = self.last_seq.max(placed.priority_seq);
        Ok(())
    }

    /// Removes the order with this entry number, wherever it rests (an order that was filled
    /// or cancelled: [`Touched::Gone`]).
    pub fn remove(&mut self, entry_seq: u64) -> Option<(Symbol, PlacedOrder)> {
        let (symbol, id) = self.entries.remove(&entry_seq)?;
        let book = self.books.get_mut(&symbol)?;
        if book.placed(id)?.entry_seq != entry_seq {
            return None;
        }
        book.remove(id).map(|placed| (symbol, placed))
    }

    /// The account's position; zero if it never traded.
    pub fn position(&self, account: AccountId) -> AccountPosition {
        self.positions.get(&account).copied().unwrap_or_default()
    }

    /// Positions of every account that ever traded (or was set), by ascending account.
    pub fn positions(&self) -> impl Iterator<Item = (AccountId, AccountPosition)> + '_ {
        self.positions
            .iter()
            .map(|(&account, &position)| (account, position))
    }

    /// Installs a position (for example one just decoded).
    pub fn set_position(&mut self, account: AccountId, position: AccountPosition) {
        self.positions.insert(account, position);
    }
}
