//! matchbook's work units and their state records: what a request writes, so that what it
//! costs follows what it changed.
//!
//! - Every **order book** is a work unit of kind [`BOOK_KIND`] whose id is its symbol (below
//!   2^32). Its state is small and fixed ([`BookRecord`], 24 bytes): the symbol, how many
//!   requests changed the book (the `book_seq` of the last response), and the engine's last
//!   time-priority sequence number when the book was last written.
//! - Every **resting order** is a work unit of its own, kind [`ORDER_KIND`], whose id is
//!   [`ORDER_UNIT_BIT`] (bit 63) plus the order's entry number ([`PlacedOrder::entry_seq`],
//!   unique in the engine for ever). Book and order ids therefore never collide, and the
//!   ids clients choose for their orders (any u64, the same one in several books) play no part.
//!   Its state ([`OrderRecord`]) is what it takes to put the order back exactly where it
//!   rested: id, account, symbol, side, price, visible quantity and its priority number; layout
//!   version 2 appends the iceberg fields (hidden quantity, display size).
//!
//! A request writes the order units it adds, changes or retires, its book's unit, and the
//! positions it changes; nothing else. Every engine's in-memory books can be rebuilt from these
//! units alone ([`crate::book::MatchingEngine::place`] puts each order back at its priority), in any
//! order, with the same time priority at every price.
//!
//! Records are read as untrusted bytes: a wrong length, layout version, side or id is an error
//! ([`UnitError`]), never a panic.
//!
//! # Examples
//! ```
//! use matchbook::book::*;
//! use matchbook::units::*;
//!
//! let order = RestingOrder {
//!     id: OrderId(77), account: AccountId(3), side: Side::Sell, price: 1001,
//!     visible_qty: 5, hidden_qty: 0, kind: OrderKind::Limit,
//! };
//! let placed = PlacedOrder { order, entry_seq: 12, priority_seq: 12 };
//! let record = OrderRecord::new(Symbol(4), &placed);
//! // Without the iceberg feature, version 1 (48 bytes) is written: an older engine reads it.
//! let layout = record.layout_version(1);
//! let bytes = record.encoded(layout);
//! assert_eq!((layout, bytes.len()), (1, 48));
//! let unit = order_unit_id(placed.entry_seq);
//! assert_eq!(decode_order(unit, layout, bytes), Ok((Symbol(4), placed)));
//! assert!(decode_order(unit, 2, bytes).is_err(), "48 bytes are not layout 2");
//! ```

use crate::book::{AccountId, InvalidOrder, OrderId, OrderKind, PlacedOrder, RestingOrder};
use crate::book::{Side, Symbol};
use std::fmt;
use understudy_runtime::records::{
    block_length, decode, encoded, latest_version, Record, TemplateInfo,
};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Record type id of a book unit's state ([`BookRecord`]).
pub const BOOK_TYPE: u16 = 200;
/// Record type id of an order unit's state ([`OrderRecord`]).
pub const ORDER_TYPE: u16 = 201;
/// Work-unit kind of an order book.
pub const BOOK_KIND: u16 = 1;
/// Work-unit kind of a resting order.
pub const ORDER_KIND: u16 = 2;
/// Set in the id of every order unit, never in a book unit's (a symbol, below 2^32).
pub const ORDER_UNIT_BIT: u64 = 1 << 63;
/// The highest sequence number (time priority, requests of a book) a record may carry: beyond
/// any real engine (a billion a second for 146 years), and far enough below [`ORDER_UNIT_BIT`]
/// that an engine restored from a corrupt record carrying it still has 2^62 numbers left.
pub const SEQ_MAX: u64 = 1 << 62;

/// The state of a book unit. Layout version 1, 24 bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct BookRecord {
    /// The book's symbol (also its unit id).
    pub symbol: u32,
    /// Zero.
    pub _pad: u32,
    /// Requests that changed this book so far: the `book_seq` of its last response.
    pub request_seq: u64,
    /// The engine's last time-priority sequence number when this book was last written. Every
    /// request that takes numbers writes its book, so the highest over all books is the
    /// engine's counter.
    pub last_seq: u64,
}

impl Record for BookRecord {
    const TYPE_ID: u16 = BOOK_TYPE;
    const NAME: &'static str = "matchbook.book";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 24)];
    fn defaults() -> Self {
        BookRecord {
            symbol: 0,
            _pad: 0,
            request_seq: 0,
            last_seq: 0,
        }
    }
}
understudy_runtime::assert_record_layout!(BookRecord);
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(BookRecord, symbol) == 0);
    assert!(offset_of!(BookRecord, request_seq) == 8);
    assert!(offset_of!(BookRecord, last_seq) == 16);
};

/// The state of an order unit. Layout version 1 is the first 48 bytes (plain limit orders);
/// version 2 appends the iceberg fields (64 bytes). Little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct OrderRecord {
    /// The client's order id.
    pub id: u64,
    /// Limit price in ticks.
    pub price: i64,
    /// Quantity that can match now (an iceberg's visible slice).
    pub visible_qty: u64,
    /// Time priority within its price level, lower first ([`PlacedOrder::priority_seq`]).
    pub priority_seq: u64,
    /// The book it rests in.
    pub symbol: u32,
    /// Owner.
    pub account: u32,
    /// 0 buy, 1 sell.
    pub side: u8,
    /// Zero.
    pub _pad: [u8; 7],
    /// Since layout 2: iceberg quantity behind the visible slice (0 for a limit order).
    pub hidden_qty: u64,
    /// Since layout 2: iceberg slice size; 0 for a limit order.
    pub display_qty: u64,
}

impl Record for OrderRecord {
    const TYPE_ID: u16 = ORDER_TYPE;
    const NAME: &'static str = "matchbook.order";
    const VERSIONS: &'static [(u16, u16)] = &[(1, 48), (2, 64)];
    /// What a layout-1 writer did not send: a limit order.
    fn defaults() -> Self {
        OrderRecord {
            id: 0,
            price: 0,
            visible_qty: 0,
            priority_seq: 0,
            symbol: 0,
            account: 0,
            side: 0,
            _pad: [0; 7],
            hidden_qty: 0,
            display_qty: 0,
        }
    }
}
understudy_runtime::assert_record_layout!(OrderRecord);
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(OrderRecord, id) == 0);
    assert!(offset_of!(OrderRecord, price) == 8);
    assert!(offset_of!(OrderRecord, visible_qty) == 16);
    assert!(offset_of!(OrderRecord, priority_seq) == 24);
    assert!(offset_of!(OrderRecord, symbol) == 32);
    assert!(offset_of!(OrderRecord, account) == 36);
    assert!(offset_of!(OrderRecord, side) == 40);
    assert!(offset_of!(OrderRecord, hidden_qty) == 48);
    assert!(offset_of!(OrderRecord, display_qty) == 56);
};

/// The template declarations of an engine of application version `app_version`: version 1
/// reads and writes order layout 1 only; version 2 also layout 2.
pub fn templates(app_version: u32) -> Vec<TemplateInfo> {
    let order = TemplateInfo::of::<OrderRecord>();
    let order = if app_version >= 2 {
        order
    } else {
        TemplateInfo {
            max_version: 1,
            ..order
        }
    };
    vec![TemplateInfo::of::<BookRecord>(), order]
}

/// The unit id of the order with this entry number.
pub fn order_unit_id(entry_seq: u64) -> u64 {
    // One number per resting order: 2^63 of them at a billion a second is 290 years.
    assert!(
        entry_seq < ORDER_UNIT_BIT,
        "entry number {entry_seq} overflows the order unit ids"
    );
    ORDER_UNIT_BIT | entry_seq
}

impl OrderRecord {
    /// The record of `placed`, resting in `symbol`'s book.
    pub fn new(symbol: Symbol, placed: &PlacedOrder) -> OrderRecord {
        let order = &placed.order;
        OrderRecord {
            id: order.id.0,
            price: order.price,
            visible_qty: order.visible_qty,
            priority_seq: placed.priority_seq,
            symbol: symbol.0,
            account: order.account.0,
            side: match order.side {
                Side::Buy => 0,
                Side::Sell => 1,
            },
            _pad: [0; 7],
            hidden_qty: order.hidden_qty,
            display_qty: match order.kind {
                OrderKind::Limit => 0,
                OrderKind::Iceberg { display_qty } => display_qty,
            },
        }
    }

    /// The layout to write this record in when the engines agreed on `write_version`: that
    /// one, except that an iceberg needs layout 2. (An iceberg rests only while the feature is
    /// on, and then the write version is 2; this keeps an iceberg's state whole regardless.)
    pub fn layout_version(&self, write_version: u16) -> u16 {
        if self.display_qty != 0 {
            write_version.max(2)
        } else {
            write_version.clamp(1, latest_version::<OrderRecord>())
        }
    }

    /// The record's bytes in `layout_version` (a prefix of the struct: no copy).
    pub fn encoded(&self, layout_version: u16) -> &[u8] {
        encoded(self, layout_version).expect("a layout version of OrderRecord::VERSIONS")
    }
}

impl BookRecord {
    /// The record's bytes (layout 1).
    pub fn encoded(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A unit state that cannot be read. Names the unit, what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitError {
    /// Layout version 0, which no writer uses.
    UnknownVersion {
        /// The unit.
        unit: u64,
        /// Version found.
        found: u16,
    },
    /// The state's length does not fit its layout version.
    WrongLength {
        /// The unit.
        unit: u64,
        /// Its layout version.
        layout_version: u16,
        /// Bytes that version has (at least, for a version newer than this build knows).
        expected: usize,
        /// Bytes found.
        found: usize,
    },
    /// A book unit whose id is not a symbol, or whose record names another symbol.
    BookId {
        /// The unit.
        unit: u64,
        /// The symbol in the record.
        symbol: u32,
    },
    /// An order unit id without [`ORDER_UNIT_BIT`].
    OrderId {
        /// The unit.
        unit: u64,
    },
    /// A sequence number above [`SEQ_MAX`].
    SeqOutOfRange {
        /// The unit.
        unit: u64,
        /// Which number.
        field: &'static str,
        /// Its value.
        found: u64,
    },
    /// A side byte other than 0 (buy) or 1 (sell).
    BadSide {
        /// The unit.
        unit: u64,
        /// The byte found.
        found: u8,
    },
    /// The order breaks a rule every resting order keeps.
    Invalid {
        /// The unit.
        unit: u64,
        /// What is wrong.
        why: InvalidOrder,
    },
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SKIPPED: &str = "the record is corrupt and was not applied";
        match self {
            UnitError::UnknownVersion { unit, found } => write!(
                f,
                "unit {unit:#x}: layout version {found}, expected 1 or higher; {SKIPPED}"
            ),
            UnitError::WrongLength {
                unit,
                layout_version,
                expected,
                found,
            } => write!(
                f,
                "unit {unit:#x}: layout version {layout_version} has {expected} bytes, found \
                 {found}; {SKIPPED}"
            ),
            UnitError::BookId { unit, symbol } => write!(
                f,
                "book unit {unit:#x}: expected the id to be the record's symbol, found symbol \
                 {symbol}; {SKIPPED}"
            ),
            UnitError::OrderId { unit } => write!(
                f,
                "order unit {unit:#x}: expected bit 63 set in the id; {SKIPPED}"
            ),
            UnitError::SeqOutOfRange { unit, field, found } => write!(
                f,
                "unit {unit:#x}: {field} {found}, expected at most {SEQ_MAX}; {SKIPPED}"
            ),
            UnitError::BadSide { unit, found } => write!(
                f,
                "order unit {unit:#x}: side byte {found}, expected 0 (buy) or 1 (sell); {SKIPPED}"
            ),
            UnitError::Invalid { unit, why } => write!(f, "order unit {unit:#x}: {why}"),
        }
    }
}

impl std::error::Error for UnitError {}

/// Checks that `state` is a whole block of `R` in `layout_version` and reads it: the exact
/// length for a version this build knows, at least the newest known length for a newer one
/// (whose extra fields are skipped).
fn read<R: Record>(unit: u64, layout_version: u16, state: &[u8]) -> Result<R, UnitError> {
    if layout_version == 0 {
        return Err(UnitError::UnknownVersion {
            unit,
            found: layout_version,
        });
    }
    let newest = latest_version::<R>();
    let expected = block_length::<R>(layout_version.min(newest))
        .expect("every version up to the newest is in VERSIONS") as usize;
    let fits = if layout_version > newest {
        state.len() >= expected
    } else {
        state.len() == expected
    };
    if !fits {
        return Err(UnitError::WrongLength {
            unit,
            layout_version,
            expected,
            found: state.len(),
        });
    }
    // The length is a known block length (≤ u16::MAX) or we read only the newest block.
    let block = &state[..expected];
    Ok(decode::<R>(block, expected as u16).expect("length checked above"))
}

/// Reads a book unit's state.
pub fn decode_book(unit: u64, layout_version: u16, state: &[u8]) -> Result<BookRecord, UnitError> {
    let record: BookRecord = read(unit, layout_version, state)?;
    if unit != u64::from(record.symbol) {
        return Err(UnitError::BookId {
            unit,
            symbol: record.symbol,
        });
    }
    for (field, found) in [
        ("request sequence", record.request_seq),
        ("last sequence number", record.last_seq),
    ] {
        if found > SEQ_MAX {
            return Err(UnitError::SeqOutOfRange { unit, field, found });
        }
    }
    Ok(record)
}

/// Reads an order unit's state: the book it rests in and the order with its place in time
/// priority. The quantity and priority rules are checked too, as [`crate::book::MatchingEngine::place`]
/// would.
pub fn decode_order(
    unit: u64,
    layout_version: u16,
    state: &[u8],
) -> Result<(Symbol, PlacedOrder), UnitError> {
    if unit & ORDER_UNIT_BIT == 0 {
        return Err(UnitError::OrderId { unit });
    }
    let record: OrderRecord = read(unit, layout_version, state)?;
    for (field, found) in [
        ("entry number", unit & !ORDER_UNIT_BIT),
        ("priority number", record.priority_seq),
    ] {
        if found > SEQ_MAX {
            return Err(UnitError::SeqOutOfRange { unit, field, found });
        }
    }
    let side = match record.side {
        0 => Side::Buy,
        1 => Side::Sell,
        found => return Err(UnitError::BadSide { unit, found }),
    };
    let kind = match record.display_qty {
        0 => OrderKind::Limit,
        display_qty => OrderKind::Iceberg { display_qty },
    };
    let placed = PlacedOrder {
        order: RestingOrder {
            id: OrderId(record.id),
            account: AccountId(record.account),
            side,
            price: record.price,
            visible_qty: record.visible_qty,
            hidden_qty: record.hidden_qty,
            kind,
        },
        entry_seq: unit & !ORDER_UNIT_BIT,
        priority_seq: record.priority_seq,
    };
    placed
        .check()
        .map_err(|why| UnitError::Invalid { unit, why })?;
    Ok((Symbol(record.symbol), placed))
}
