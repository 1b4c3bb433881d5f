//! The engine checked against a deliberately naive reference model, plus unit tests of the
//! rules and of the byte encodings.
//!
//! The model keeps every resting order of every symbol in one `Vec`, finds the best maker by a
//! linear scan (best price, then lowest arrival sequence), fills icebergs one visible slice at a
//! time, and gives a refreshed slice a new sequence number. It shares no code with the engine.

use std::collections::BTreeMap;

use matchbook::book::*;
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ModelOrder {
    seq: u64,
    id: OrderId,
    account: AccountId,
    symbol: Symbol,
    side: Side,
    price: i64,
    visible_qty: u64,
    hidden_qty: u64,
    kind: OrderKind,
}

#[derive(Clone, Debug, Default)]
struct Model {
    orders: Vec<ModelOrder>,
    next_seq: u64,
    positions: BTreeMap<AccountId, AccountPosition>,
}

impl Model {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn book(&self, symbol: Symbol) -> Vec<RestingOrder> {
        let mut orders: Vec<&ModelOrder> =
            self.orders.iter().filter(|o| o.symbol == symbol).collect();
        orders.sort_by_key(|o| {
            let price_rank = if o.side == Side::Buy {
                -o.price
            } else {
                o.price
            };
            (o.side == Side::Sell, price_rank, o.seq)
        });
        orders
            .into_iter()
            .map(|o| RestingOrder {
                id: o.id,
                account: o.account,
                side: o.side,
                price: o.price,
                visible_qty: o.visible_qty,
                hidden_qty: o.hidden_qty,
                kind: o.kind,
            })
            .collect()
    }

    fn book_position(&mut self, account: AccountId, side: Side, price: i64, qty: u64) {
        let position = self.positions.entry(account).or_default();
        let (qty, notional) = (qty as i64, price * qty as i64);
        match side {
            Side::Buy => {
                position.position_qty += qty;
                position.cash -= notional;
            }
            Side::Sell => {
                position.position_qty -= qty;
                position.cash += notional;
            }
        }
    }

    fn process(&mut self, request: Request, features: Features) -> Outcome {
        match request {
            Request::Cancel(c) => {
                let found = self
                    .orders
                    .iter()
                    .position(|o| o.symbol == c.symbol && o.id == c.id);
                let response = match found {
                    None => Response::Reject {
                        id: c.id,
                        reason: RejectReason::UnknownOrder,
                    },
                    Some(i) if self.orders[i].account != c.account => Response::Reject {
                        id: c.id,
                        reason: RejectReason::NotOwner,
                    },
                    Some(i) => {
                        let o = self.orders.remove(i);
                        Response::Cancelled {
                            id: c.id,
                            remaining: o.visible_qty + o.hidden_qty,
                        }
                    }
                };
                Outcome {
                    response,
                    fills: Vec::new(),
                }
            }
            Request::New(n) => {
                let reject = |reason| Outcome {
                    response: Response::Reject { id: n.id, reason },
                    fills: Vec::new(),
                };
                let display_qty = match n.kind {
                    OrderKind::Limit => None,
                    OrderKind::Iceberg { display_qty } => Some(display_qty),
                };
                if display_qty.is_some() && !features.iceberg {
                    return reject(RejectReason::FeatureDisabled);
                }
                if n.qty == 0 {
                    return reject(RejectReason::ZeroQty);
                }
                if n.qty > QTY_MAX {
                    return reject(RejectReason::QtyOutOfRange);
                }
                if n.price < 1 || n.price > PRICE_TICKS_MAX {
                    return reject(RejectReason::PriceOutOfRange);
                }
                if matches!(display_qty, Some(d) if d == 0 || d > n.qty) {
                    return reject(RejectReason::BadDisplayQty);
                }
                if self
                    .orders
                    .iter()
                    .any(|o| o.symbol == n.symbol && o.id == n.id)
                {
                    return reject(RejectReason::DuplicateOrderId);
                }

                let mut fills: Vec<Fill> = Vec::new();
                let mut remaining = n.qty;
                while remaining > 0 {
                    let mut best: Option<usize> = None;
                    for (i, o) in self.orders.iter().enumerate() {
                        let crosses = match n.side {
                            Side::Buy => o.price <= n.price,
                            Side::Sell => o.price >= n.price,
                        };
                        if o.symbol != n.symbol || o.side == n.side || !crosses {
                            continue;
                        }
                        let better = match best {
                            None => true,
                            Some(b) => {
                                let b = &self.orders[b];
                                let better_price = match n.side {
                                    Side::Buy => o.price < b.price,
                                    Side::Sell => o.price > b.price,
                                };
                                better_price || (o.price == b.price && o.seq < b.seq)
                            }
                        };
                        if better {
                            best = Some(i);
                        }
                    }
                    let Some(i) = best else { break };
                    let (maker_account, price) = (self.orders[i].account, self.orders[i].price);
                    let qty = remaining.min(self.orders[i].visible_qty);
                    remaining -= qty;
                    self.orders[i].visible_qty -= qty;
                    let maker = self.orders[i].id;
                    // One slice at a time; consecutive slices of the same maker merge.
                    match fills.last_mut() {
                        Some(last) if last.maker == maker && last.price == price => last.qty += qty,
                        _ => fills.push(Fill {
                            taker: n.id,
                            maker,
                            taker_account: n.account,
                            maker_account,
                            taker_side: n.side,
                            price,
                            qty,
                        }),
                    }
                    self.book_position(n.account, n.side, price, qty);
                    self.book_position(maker_account, n.side.opposite(), price, qty);
                    if self.orders[i].visible_qty == 0 {
                        if self.orders[i].hidden_qty > 0 {
                            let seq = self.seq();
                            let o = &mut self.orders[i];
                            let OrderKind::Iceberg { display_qty } = o.kind else {
                                unreachable!()
                            };
                            o.visible_qty = o.hidden_qty.min(display_qty);
                            o.hidden_qty -= o.visible_qty;
                            o.seq = seq;
                        } else {
                            self.orders.remove(i);
                        }
                    }
                }
                if remaining > 0 {
                    let visible_qty = display_qty.map_or(remaining, |d| d.min(remaining));
                    let seq = self.seq();
                    self.orders.push(ModelOrder {
                        seq,
                        id: n.id,
                        account: n.account,
                        symbol: n.symbol,
                        side: n.side,
                        price: n.price,
                        visible_qty,
                        hidden_qty: remaining - visible_qty,
                        kind: n.kind,
                    });
                }
                Outcome {
                    response: Response::Ack { id: n.id },
                    fills,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers and strategies
// ---------------------------------------------------------------------------------------------

const SYMBOLS: [Symbol; 2] = [Symbol(0), Symbol(1)];

fn order(id: u64, account: u32, side: Side, price: i64, qty: u64) -> NewOrder {
    NewOrder {
        id: OrderId(id),
        account: AccountId(account),
        symbol: Symbol(0),
        side,
        price,
        qty,
        kind: OrderKind::Limit,
    }
}

fn iceberg(id: u64, account: u32, side: Side, price: i64, qty: u64, display_qty: u64) -> NewOrder {
    NewOrder {
        kind: OrderKind::Iceberg { display_qty },
        ..order(id, account, side, price, qty)
    }
}

fn cancel(id: u64, account: u32) -> Request {
    Request::Cancel(Cancel {
        id: OrderId(id),
        account: AccountId(account),
        symbol: Symbol(0),
    })
}

fn fill(taker: u64, maker: u64, price: i64, qty: u64) -> (OrderId, OrderId, i64, u64) {
    (OrderId(taker), OrderId(maker), price, qty)
}

fn fills_of(outcome: &Outcome) -> Vec<(OrderId, OrderId, i64, u64)> {
    outcome
        .fills
        .iter()
        .map(|f| (f.taker, f.maker, f.price, f.qty))
        .collect()
}

fn ids(book: &OrderBook) -> Vec<u64> {
    book.orders().map(|o| o.id.0).collect()
}

fn resting(engine: &MatchingEngine, symbol: Symbol) -> Vec<RestingOrder> {
    engine
        .book(symbol)
        .map(|b| b.orders().copied().collect())
        .unwrap_or_default()
}

fn new_order_strategy() -> impl Strategy<Value = NewOrder> {
    let price = prop_oneof![30 => 98i64..=102, 1 => Just(0i64), 1 => Just(PRICE_TICKS_MAX + 1)];
    let qty = prop_oneof![30 => 1u64..=12, 1 => Just(0u64), 1 => Just(QTY_MAX + 1)];
    let kind = prop_oneof![
        3 => Just(OrderKind::Limit),
        2 => (0u64..=5).prop_map(|display_qty| OrderKind::Iceberg { display_qty }),
    ];
    (0u64..24, 0u32..4, 0u32..2, any::<bool>(), price, qty, kind).prop_map(
        |(id, account, symbol, buy, price, qty, kind)| NewOrder {
            id: OrderId(id),
            account: AccountId(account),
            symbol: Symbol(symbol),
            side: if buy { Side::Buy } else { Side::Sell },
            price,
            qty,
            kind,
        },
    )
}

fn request_strategy() -> impl Strategy<Value = Request> {
    let cancel = (0u64..24, 0u32..4, 0u32..2).prop_map(|(id, account, symbol)| {
        Request::Cancel(Cancel {
            id: OrderId(id),
            account: AccountId(account),
            symbol: Symbol(symbol),
        })
    });
    prop_oneof![4 => new_order_strategy().prop_map(Request::New), 1 => cancel]
}

/// Random requests, each with its own feature switch (biased towards on), so streams also
/// cover turning the feature on and off mid-stream.
fn stream_strategy() -> impl Strategy<Value = Vec<(Request, Features)>> {
    let features = prop_oneof![3 => Just(Features::V2), 1 => Just(Features::V1)];
    prop::collection::vec((request_strategy(), features), 1..160)
}

/// Sum of positions and of cash over all accounts (wrapping, as the engine books them).
fn totals(engine: &MatchingEngine) -> (i64, i64) {
    engine
        .positions()
        .fold((0i64, 0i64), |(qty, cash), (_, p)| {
            (qty.wrapping_add(p.position_qty), cash.wrapping_add(p.cash))
        })
}

fn placed(engine: &MatchingEngine, symbol: Symbol) -> Vec<PlacedOrder> {
    engine
        .book(symbol)
        .map(|b| b.placed_orders().copied().collect())
        .unwrap_or_default()
}

/// Within every price level, priority numbers ascend (the FIFO a rebuild reproduces).
fn priorities_ascend(book: &OrderBook) -> bool {
    let orders: Vec<&PlacedOrder> = book.placed_orders().collect();
    orders.windows(2).all(|w| {
        let same_level = w[0].order.side == w[1].order.side && w[0].order.price == w[1].order.price;
        !same_level || w[0].priority_seq < w[1].priority_seq
    })
}

/// An engine rebuilt from `engine`'s books, orders put back in the sequence `arrange` leaves
/// them in, and its positions: what a standby builds from the work units.
fn rebuilt(
    engine: &MatchingEngine,
    arrange: impl Fn(&mut Vec<(Symbol, PlacedOrder)>),
) -> MatchingEngine {
    let mut copy = MatchingEngine::new();
    let mut orders: Vec<(Symbol, PlacedOrder)> = engine
        .books()
        .flat_map(|(symbol, book)| book.placed_orders().map(move |p| (symbol, *p)))
        .collect();
    arrange(&mut orders);
    for (symbol, placed) in orders {
        copy.place(symbol, placed).expect("a live order is valid");
    }
    for (symbol, _) in engine.books() {
        copy.restore_book(symbol, engine.last_seq());
    }
    for (account, position) in engine.positions() {
        copy.set_position(account, position);
    }
    copy
}

fn encoded(book: &OrderBook) -> Vec<u8> {
    let mut bytes = Vec::new();
    book.encode(&mut bytes);
    bytes
}

fn has_iceberg(book: &OrderBook) -> bool {
    book.orders()
        .any(|o| matches!(o.kind, OrderKind::Iceberg { .. }))
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    // The model comparison is the main check and gets the most cases; the encoding properties
    // below get fewer because each case already covers every book of a whole stream.
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// On random streams of new orders and cancels over 2 symbols, 4 accounts and a few price
    /// levels, with and without icebergs, the engine and the naive model agree after every
    /// request on the response, the fills, both resting books and all positions; positions and
    /// cash always sum to zero and no book is ever left crossed.
    #[test]
    fn engine_matches_reference_model(stream in stream_strategy()) {
        let mut engine = MatchingEngine::new();
        let mut model = Model::default();
        for (step, &(request, features)) in stream.iter().enumerate() {
            let got = engine.process(request, features);
            let want = model.process(request, features);
            prop_assert_eq!(&got, &want, "step {}: {:?} with {:?}", step, request, features);
            for symbol in SYMBOLS {
                prop_assert_eq!(resting(&engine, symbol), model.book(symbol), "step {} symbol {:?}", step, symbol);
                if let Some(book) = engine.book(symbol) {
                    if let (Some(bid), Some(ask)) = (book.best_bid(), book.best_ask()) {
                        prop_assert!(bid < ask, "step {}: crossed book {} >= {}", step, bid, ask);
                    }
                }
            }
            let positions: BTreeMap<AccountId, AccountPosition> = engine.positions().collect();
            prop_assert_eq!(&positions, &model.positions, "step {}", step);
            prop_assert_eq!(totals(&engine), (0, 0), "step {}: positions or cash not conserved", step);
        }
    }

}

proptest! {
    // Each case checks every request of its stream against a mirror: fewer cases suffice.
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Every request reports each resting order it changed exactly once, as it ended up: a
    /// mirror engine that sees nothing but those reports (place what rests, remove what is
    /// gone) has the same books as the live one after every request, time priority included,
    /// on random streams with icebergs and their refreshes; a refused request reports nothing.
    /// At the end the books rebuilt from their placed orders, put back in reverse priority
    /// order or by entry number, equal the live ones with the same FIFO at every price.
    #[test]
    fn touched_orders_rebuild_the_books(stream in stream_strategy()) {
        let mut engine = MatchingEngine::new();
        let mut mirror = MatchingEngine::new();
        let (mut fills, mut touched) = (Vec::new(), Vec::new());
        for (step, &(request, features)) in stream.iter().enumerate() {
            fills.clear();
            touched.clear();
            let before = engine.clone();
            let response = engine.process_into(request, features, &mut fills, &mut touched);
            if matches!(response, Response::Reject { .. }) {
                prop_assert!(touched.is_empty(), "step {}: a refusal reported {:?}", step, touched);
                prop_assert_eq!(&engine, &before);
                continue;
            }
            let symbol = match request {
                Request::New(n) => n.symbol,
                Request::Cancel(c) => c.symbol,
            };
            let mut entries: Vec<u64> = touched.iter().map(Touched::entry_seq).collect();
            entries.sort_unstable();
            entries.dedup();
            prop_assert_eq!(entries.len(), touched.len(), "step {}: an order reported twice: {:?}", step, touched);
            mirror.restore_book(symbol, engine.last_seq());
            for t in &touched {
                match *t {
                    Touched::Rests(placed) => mirror.place(symbol, placed).unwrap(),
                    Touched::Gone { id, entry_seq } => {
                        let (at, gone) = mirror.remove(entry_seq).expect("a reported order rests in the mirror");
                        prop_assert_eq!((at, gone.order.id), (symbol, id));
                    }
                }
            }
            for s in SYMBOLS {
                prop_assert_eq!(placed(&mirror, s), placed(&engine, s), "step {} symbol {:?}", step, s);
                if let Some(book) = engine.book(s) {
                    prop_assert!(priorities_ascend(book), "step {}: priorities out of order", step);
                }
            }
            prop_assert_eq!(mirror.last_seq(), engine.last_seq());
        }
        let reversed = rebuilt(&engine, |orders| orders.reverse());
        let by_entry = rebuilt(&engine, |orders| orders.sort_by_key(|(_, p)| p.entry_seq));
        for copy in [reversed, by_entry] {
            prop_assert_eq!(&copy, &engine);
            for s in SYMBOLS {
                prop_assert_eq!(placed(&copy, s), placed(&engine, s));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// With the iceberg feature off throughout, the engine is version 1: every iceberg request
    /// is refused with FeatureDisabled and leaves the state untouched, every other request gets
    /// the same outcome as in a run where the icebergs were never sent, the final states are
    /// equal, and every book is representable (and round-trips) in layout v1.
    #[test]
    fn feature_off_behaves_as_version_1(requests in prop::collection::vec(request_strategy(), 1..160)) {
        let mut with_icebergs = MatchingEngine::new();
        let mut without_icebergs = MatchingEngine::new();
        for request in &requests {
            let is_iceberg = matches!(request, Request::New(NewOrder { kind: OrderKind::Iceberg { .. }, .. }));
            let before = with_icebergs.clone();
            let got = with_icebergs.process(*request, Features::V1);
            if is_iceberg {
                let Request::New(n) = request else { unreachable!() };
                prop_assert_eq!(got.response, Response::Reject { id: n.id, reason: RejectReason::FeatureDisabled });
                prop_assert!(got.fills.is_empty());
                prop_assert_eq!(&with_icebergs, &before, "a refused iceberg changed the state");
            } else {
                let want = without_icebergs.process(*request, Features::V1);
                prop_assert_eq!(got, want);
            }
        }
        prop_assert_eq!(&with_icebergs, &without_icebergs);
        for (_, book) in with_icebergs.books() {
            let mut v1 = Vec::new();
            prop_assert_eq!(book.encode_v1(&mut v1), Ok(()));
            prop_assert_eq!(&v1[..2], &LAYOUT_V1.to_le_bytes()[..]);
            prop_assert_eq!(&OrderBook::decode(&v1).unwrap(), book);
        }
    }

    /// Every book the engine builds round-trips through the v2 encoding to an equal book and
    /// the same bytes; books without icebergs also round-trip through v1, and books with one
    /// make encode_v1 refuse without writing anything.
    #[test]
    fn encode_decode_round_trip(stream in stream_strategy()) {
        let mut engine = MatchingEngine::new();
        for &(request, features) in &stream {
            engine.process(request, features);
        }
        for (symbol, book) in engine.books() {
            let bytes = encoded(book);
            let decoded = OrderBook::decode(&bytes).unwrap();
            prop_assert_eq!(&decoded, book, "symbol {:?}", symbol);
            prop_assert_eq!(encoded(&decoded), bytes);

            let mut v1 = vec![0xAA];
            if has_iceberg(book) {
                let refused = book.encode_v1(&mut v1);
                let is_iceberg_error = matches!(refused, Err(EncodeError::IcebergInV1 { .. }));
                prop_assert!(is_iceberg_error, "encode_v1 gave {:?}", refused);
                prop_assert_eq!(v1, vec![0xAA], "a refused encode_v1 wrote bytes");
            } else {
                prop_assert_eq!(book.encode_v1(&mut v1), Ok(()));
                let decoded = OrderBook::decode(&v1[1..]).unwrap();
                prop_assert_eq!(&decoded, book);
                let mut again = vec![0xAA];
                decoded.encode_v1(&mut again).unwrap();
                prop_assert_eq!(again, v1);
            }
        }
    }

    /// Arbitrary bytes never make decode panic, and whatever it accepts re-encodes in its own
    /// layout to exactly the input (the encoding is canonical).
    #[test]
    fn decode_of_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200), version in 0u16..4) {
        let mut bytes = bytes;
        // Half the time give it a plausible header so the record checks are reached.
        if bytes.len() >= 6 && version != 0 {
            bytes[..2].copy_from_slice(&version.to_le_bytes());
            let record_len = if version == 1 { 29 } else { 45 };
            let count = ((bytes.len() - 6) / record_len) as u32;
            bytes[2..6].copy_from_slice(&count.to_le_bytes());
            bytes.truncate(6 + count as usize * record_len);
        }
        assert_canonical_or_error(&bytes)?;
    }

    /// Valid encodings with one byte changed, or cut short anywhere, are either refused with
    /// an error or decode to a book that re-encodes to exactly those bytes; a strict prefix is
    /// always refused.
    #[test]
    fn decode_of_corrupted_encoding_never_panics(
        stream in stream_strategy(),
        position in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let mut engine = MatchingEngine::new();
        for &(request, features) in &stream {
            engine.process(request, features);
        }
        for (_, book) in engine.books() {
            let bytes = encoded(book);
            let mut corrupted = bytes.clone();
            corrupted[position.index(bytes.len())] = byte;
            assert_canonical_or_error(&corrupted)?;
            let cut = position.index(bytes.len());
            prop_assert!(OrderBook::decode(&bytes[..cut]).is_err(), "prefix of {} bytes accepted", cut);
        }
    }

    /// A position round-trips through its fixed 16-byte record, and any other length is refused.
    #[test]
    fn position_round_trip(position_qty in any::<i64>(), cash in any::<i64>(), wrong_len in 0usize..40) {
        let position = AccountPosition { position_qty, cash };
        let mut bytes = Vec::new();
        position.encode(&mut bytes);
        prop_assert_eq!(bytes.len(), AccountPosition::ENCODED_LEN);
        prop_assert_eq!(&bytes[..], &position.to_bytes()[..]);
        prop_assert_eq!(AccountPosition::decode(&bytes), Ok(position));
        if wrong_len != AccountPosition::ENCODED_LEN {
            let other = vec![0u8; wrong_len];
            prop_assert_eq!(
                AccountPosition::decode(&other),
                Err(BookDecodeError::WrongLength { what: "position record", expected: 16, found: wrong_len })
            );
        }
    }
}

fn assert_canonical_or_error(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(book) = OrderBook::decode(bytes) {
        let mut again = Vec::new();
        if bytes[..2] == LAYOUT_V1.to_le_bytes() {
            book.encode_v1(&mut again).unwrap();
        } else {
            book.encode(&mut again);
        }
        prop_assert_eq!(again, bytes.to_vec(), "accepted bytes are not canonical");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Unit tests
// ---------------------------------------------------------------------------------------------

/// A taker smaller than the resting order trades its whole quantity and leaves the rest of
/// the maker at the front of the book.
#[test]
fn partial_fill_leaves_remainder_resting() {
    let mut engine = MatchingEngine::new();
    engine.process(Request::New(order(1, 1, Side::Sell, 100, 10)), Features::V1);
    let outcome = engine.process(Request::New(order(2, 2, Side::Buy, 100, 4)), Features::V1);
    assert_eq!(outcome.response, Response::Ack { id: OrderId(2) });
    assert_eq!(fills_of(&outcome), vec![fill(2, 1, 100, 4)]);
    let book = engine.book(Symbol(0)).unwrap();
    assert_eq!(ids(book), vec![1]);
    assert_eq!(book.get(OrderId(1)).unwrap().visible_qty, 6);
    assert_eq!(
        engine.position(AccountId(2)),
        AccountPosition {
            position_qty: 4,
            cash: -400
        }
    );
    assert_eq!(
        engine.position(AccountId(1)),
        AccountPosition {
            position_qty: -4,
            cash: 400
        }
    );
}

/// A large taker sweeps several levels best price first and in time order within a level,
/// each fill at the maker's price, then rests its remainder at its own limit.
#[test]
fn full_fill_across_levels() {
    let mut engine = MatchingEngine::new();
    for (id, price, qty) in [(1, 102, 5), (2, 101, 3), (3, 101, 2), (4, 103, 9)] {
        engine.process(
            Request::New(order(id, 1, Side::Sell, price, qty)),
            Features::V1,
        );
    }
    let outcome = engine.process(Request::New(order(9, 2, Side::Buy, 102, 12)), Features::V1);
    assert_eq!(
        fills_of(&outcome),
        vec![fill(9, 2, 101, 3), fill(9, 3, 101, 2), fill(9, 1, 102, 5)]
    );
    let book = engine.book(Symbol(0)).unwrap();
    assert_eq!(
        ids(book),
        vec![9, 4],
        "taker rests 2 at 102 as the bid; only the 103 ask is left"
    );
    assert_eq!(book.get(OrderId(9)).unwrap().visible_qty, 2);
    assert_eq!((book.best_bid(), book.best_ask()), (Some(102), Some(103)));
    assert_eq!(
        engine.position(AccountId(2)),
        AccountPosition {
            position_qty: 10,
            cash: -(5 * 101 + 5 * 102)
        }
    );
    assert_eq!(totals(&engine), (0, 0));
}

/// Cancelling a partially filled order reports only its unfilled quantity and removes it.
#[test]
fn cancel_of_partially_filled_order() {
    let mut engine = MatchingEngine::new();
    engine.process(Request::New(order(1, 1, Side::Buy, 100, 10)), Features::V1);
    engine.process(Request::New(order(2, 2, Side::Sell, 99, 7)), Features::V1);
    let outcome = engine.process(cancel(1, 1), Features::V1);
    assert_eq!(
        outcome.response,
        Response::Cancelled {
            id: OrderId(1),
            remaining: 3
        }
    );
    assert!(engine.book(Symbol(0)).unwrap().is_empty());
    let again = engine.process(cancel(1, 1), Features::V1);
    assert_eq!(
        again.response,
        Response::Reject {
            id: OrderId(1),
            reason: RejectReason::UnknownOrder
        }
    );
}

/// Cancels of unknown ids, of another account's order, and on a symbol that never traded are
/// refused and leave the order in place.
#[test]
fn cancel_rejections() {
    let mut engine = MatchingEngine::new();
    engine.process(Request::New(order(1, 1, Side::Buy, 100, 10)), Features::V1);
    let not_owner = engine.process(cancel(1, 2), Features::V1);
    assert_eq!(
        not_owner.response,
        Response::Reject {
            id: OrderId(1),
            reason: RejectReason::NotOwner
        }
    );
    let other_symbol = Request::Cancel(Cancel {
        id: OrderId(1),
        account: AccountId(1),
        symbol: Symbol(5),
    });
    assert_eq!(
        engine.process(other_symbol, Features::V1).response,
        Response::Reject {
            id: OrderId(1),
            reason: RejectReason::UnknownOrder
        }
    );
    assert_eq!(ids(engine.book(Symbol(0)).unwrap()), vec![1]);
}

/// A second order with a resting order's id is refused and changes nothing; once the first is
/// gone the id may be used again, and the same id may rest in another symbol's book.
#[test]
fn duplicate_order_id_rejected() {
    let mut engine = MatchingEngine::new();
    engine.process(Request::New(order(1, 1, Side::Buy, 100, 10)), Features::V1);
    let before = engine.clone();
    let duplicate = engine.process(Request::New(order(1, 2, Side::Sell, 100, 5)), Features::V1);
    assert_eq!(
        duplicate.response,
        Response::Reject {
            id: OrderId(1),
            reason: RejectReason::DuplicateOrderId
        }
    );
    assert!(duplicate.fills.is_empty());
    assert_eq!(engine, before);

    let elsewhere = NewOrder {
        symbol: Symbol(1),
        ..order(1, 2, Side::Sell, 100, 5)
    };
    assert_eq!(
        engine
            .process(Request::New(elsewhere), Features::V1)
            .response,
        Response::Ack { id: OrderId(1) }
    );

    engine.process(cancel(1, 1), Features::V1);
    let reused = engine.process(Request::New(order(1, 2, Side::Sell, 100, 5)), Features::V1);
    assert_eq!(reused.response, Response::Ack { id: OrderId(1) });
}

/// Each validation rule refuses its case, in the documented order of checks.
#[test]
fn invalid_new_orders_rejected() {
    let mut engine = MatchingEngine::new();
    let cases = [
        (order(1, 1, Side::Buy, 100, 0), RejectReason::ZeroQty),
        (
            order(1, 1, Side::Buy, 100, QTY_MAX + 1),
            RejectReason::QtyOutOfRange,
        ),
        (order(1, 1, Side::Buy, 0, 5), RejectReason::PriceOutOfRange),
        (
            order(1, 1, Side::Buy, PRICE_TICKS_MAX + 1, 5),
            RejectReason::PriceOutOfRange,
        ),
        (
            iceberg(1, 1, Side::Buy, 100, 5, 0),
            RejectReason::BadDisplayQty,
        ),
        (
            iceberg(1, 1, Side::Buy, 100, 5, 6),
            RejectReason::BadDisplayQty,
        ),
        (iceberg(1, 1, Side::Buy, 0, 0, 0), RejectReason::ZeroQty),
    ];
    for (new, reason) in cases {
        let outcome = engine.process(Request::New(new), Features::V2);
        assert_eq!(
            outcome.response,
            Response::Reject {
                id: OrderId(1),
                reason
            },
            "{new:?}"
        );
    }
    assert!(
        engine.book(Symbol(0)).is_none(),
        "a refused order must not create its book"
    );
}

/// When an iceberg's visible slice is filled, it refreshes from the hidden quantity and goes
/// behind orders that arrived after it at the same price.
#[test]
fn iceberg_refresh_loses_priority() {
    let mut engine = MatchingEngine::new();
    engine.process(
        Request::New(iceberg(1, 1, Side::Sell, 100, 10, 3)),
        Features::V2,
    );
    engine.process(Request::New(order(2, 2, Side::Sell, 100, 5)), Features::V2);
    let book = engine.book(Symbol(0)).unwrap();
    assert_eq!(ids(book), vec![1, 2]);
    let ice = book.get(OrderId(1)).unwrap();
    assert_eq!((ice.visible_qty, ice.hidden_qty), (3, 7));

    // Exactly the visible slice: the iceberg refreshes and moves behind order 2.
    let outcome = engine.process(Request::New(order(3, 3, Side::Buy, 100, 3)), Features::V2);
    assert_eq!(fills_of(&outcome), vec![fill(3, 1, 100, 3)]);
    let book = engine.book(Symbol(0)).unwrap();
    assert_eq!(ids(book), vec![2, 1]);
    let ice = book.get(OrderId(1)).unwrap();
    assert_eq!((ice.visible_qty, ice.hidden_qty), (3, 4));

    // Its refresh took a new priority number, so a book rebuilt from the orders keeps it behind.
    let (first, second) = (
        book.placed(OrderId(2)).unwrap(),
        book.placed(OrderId(1)).unwrap(),
    );
    assert!(second.priority_seq > first.priority_seq);
    assert_eq!(second.entry_seq, 1, "the entry number never changes");
    let copy = rebuilt(&engine, |orders| orders.sort_by_key(|(_, p)| p.entry_seq));
    assert_eq!(ids(copy.book(Symbol(0)).unwrap()), vec![2, 1]);

    // The next buyer meets order 2 first, then the refreshed slice.
    let outcome = engine.process(Request::New(order(4, 3, Side::Buy, 100, 6)), Features::V2);
    assert_eq!(
        fills_of(&outcome),
        vec![fill(4, 2, 100, 5), fill(4, 1, 100, 1)]
    );
    assert_eq!(ids(engine.book(Symbol(0)).unwrap()), vec![1]);
}

/// An iceberg alone at its level gives all its slices to one large taker as a single fill, and
/// keeps the right visible/hidden split when the taker runs out mid-slice.
#[test]
fn lone_iceberg_slices_merge_into_one_fill() {
    let mut engine = MatchingEngine::new();
    engine.process(
        Request::New(iceberg(1, 1, Side::Buy, 100, 1_000_000_000, 1)),
        Features::V2,
    );
    let outcome = engine.process(
        Request::New(order(2, 2, Side::Sell, 100, 999_999_998)),
        Features::V2,
    );
    assert_eq!(fills_of(&outcome), vec![fill(2, 1, 100, 999_999_998)]);
    let ice = *engine.book(Symbol(0)).unwrap().get(OrderId(1)).unwrap();
    assert_eq!((ice.visible_qty, ice.hidden_qty), (1, 1));

    engine.process(
        Request::New(iceberg(5, 1, Side::Buy, 90, 10, 4)),
        Features::V2,
    );
    let outcome = engine.process(
        Request::New(order(6, 2, Side::Sell, 90, 2 + 5)),
        Features::V2,
    );
    assert_eq!(
        fills_of(&outcome),
        vec![fill(6, 1, 100, 2), fill(6, 5, 90, 5)]
    );
    let ice = *engine.book(Symbol(0)).unwrap().get(OrderId(5)).unwrap();
    assert_eq!(
        (ice.visible_qty, ice.hidden_qty),
        (3, 2),
        "slices 4,4,2: 4 and 1 of the next taken"
    );
}

/// An incoming iceberg trades with its whole quantity, then rests showing one slice.
#[test]
fn incoming_iceberg_matches_in_full_then_rests_a_slice() {
    let mut engine = MatchingEngine::new();
    engine.process(Request::New(order(1, 1, Side::Sell, 100, 7)), Features::V2);
    let outcome = engine.process(
        Request::New(iceberg(2, 2, Side::Buy, 100, 20, 5)),
        Features::V2,
    );
    assert_eq!(fills_of(&outcome), vec![fill(2, 1, 100, 7)]);
    let ice = *engine.book(Symbol(0)).unwrap().get(OrderId(2)).unwrap();
    assert_eq!((ice.visible_qty, ice.hidden_qty), (5, 8));
    let outcome = engine.process(cancel(2, 2), Features::V2);
    assert_eq!(
        outcome.response,
        Response::Cancelled {
            id: OrderId(2),
            remaining: 13
        }
    );
}

/// With the feature off an iceberg is refused with FeatureDisabled even if it is otherwise
/// invalid, and the same order is accepted with the feature on.
#[test]
fn feature_disabled_rejection() {
    let mut engine = MatchingEngine::new();
    for new in [
        iceberg(1, 1, Side::Buy, 100, 10, 2),
        iceberg(1, 1, Side::Buy, 0, 0, 0),
    ] {
        let outcome = engine.process(Request::New(new), Features::V1);
        assert_eq!(
            outcome.response,
            Response::Reject {
                id: OrderId(1),
                reason: RejectReason::FeatureDisabled
            }
        );
    }
    assert_eq!(engine, MatchingEngine::new());
    let outcome = engine.process(
        Request::New(iceberg(1, 1, Side::Buy, 100, 10, 2)),
        Features::V2,
    );
    assert_eq!(outcome.response, Response::Ack { id: OrderId(1) });
}

/// The encoding is the documented little-endian layout, byte for byte.
#[test]
fn encoding_layout_is_as_documented() {
    let mut book = OrderBook::new();
    book.submit(
        &order(0x0102, 7, Side::Sell, 100, 5),
        Features::V1,
        &mut 0,
        &mut Vec::new(),
        &mut Vec::new(),
    )
    .unwrap();
    let mut v1 = Vec::new();
    book.encode_v1(&mut v1).unwrap();
    let mut want = vec![1, 0, 1, 0, 0, 0];
    want.extend_from_slice(&0x0102u64.to_le_bytes());
    want.extend_from_slice(&7u32.to_le_bytes());
    want.push(1);
    want.extend_from_slice(&100i64.to_le_bytes());
    want.extend_from_slice(&5u64.to_le_bytes());
    assert_eq!(v1, want);

    let v2 = encoded(&book);
    want[0] = 2;
    want.extend_from_slice(&[0; 16]);
    assert_eq!(v2, want);
}

/// Truncated, padded, wrong-version and inconsistent inputs are refused with an error that
/// names what was wrong.
#[test]
fn decode_of_bad_bytes_names_the_problem() {
    assert!(matches!(
        OrderBook::decode(&[]),
        Err(BookDecodeError::Truncated {
            field: "layout version",
            ..
        })
    ));
    assert!(matches!(
        OrderBook::decode(&[2, 0, 1]),
        Err(BookDecodeError::Truncated {
            field: "order count",
            ..
        })
    ));
    assert_eq!(
        OrderBook::decode(&[3, 0, 0, 0, 0, 0]),
        Err(BookDecodeError::UnsupportedVersion {
            found: 3,
            oldest_supported: 1,
            newest_supported: 2
        })
    );
    // A huge count over a short input is refused before anything is allocated.
    assert!(matches!(
        OrderBook::decode(&[2, 0, 0xff, 0xff, 0xff, 0xff, 0]),
        Err(BookDecodeError::Truncated { field: "order records", needed, available: 1, .. }) if needed == 45 * u32::MAX as usize
    ));

    let mut book = OrderBook::new();
    let (mut last_seq, mut fills, mut touched) = (0, Vec::new(), Vec::new());
    for new in [
        iceberg(1, 1, Side::Buy, 99, 10, 4),
        order(2, 1, Side::Sell, 101, 3),
    ] {
        book.submit(&new, Features::V2, &mut last_seq, &mut fills, &mut touched)
            .unwrap();
    }
    let good = encoded(&book);
    assert_eq!(good.len(), 6 + 2 * 45);

    let mut padded = good.clone();
    padded.push(0);
    assert_eq!(
        OrderBook::decode(&padded),
        Err(BookDecodeError::TrailingBytes {
            expected_len: 96,
            found_len: 97
        })
    );

    let patched = |offset: usize, value: &[u8]| {
        let mut bytes = good.clone();
        bytes[offset..offset + value.len()].copy_from_slice(value);
        OrderBook::decode(&bytes)
    };
    let record = |i: usize, field: usize| 6 + i * 45 + field;
    let (side, price, visible, hidden, display) = (12, 13, 21, 29, 37);
    assert_eq!(
        patched(record(0, side), &[2]),
        Err(BookDecodeError::BadSide { index: 0, found: 2 })
    );
    assert_eq!(
        patched(record(1, price), &0i64.to_le_bytes()),
        Err(BookDecodeError::PriceOutOfRange {
            index: 1,
            id: OrderId(2),
            found: 0
        })
    );
    assert!(matches!(
        patched(record(0, visible), &[0; 8]),
        Err(BookDecodeError::BadQty { index: 0, .. })
    ));
    assert!(matches!(
        patched(record(1, hidden), &[1]),
        Err(BookDecodeError::BadQty { index: 1, .. })
    ));
    assert!(matches!(
        patched(record(0, display), &[3]),
        Err(BookDecodeError::BadQty { index: 0, .. })
    ));
    assert_eq!(
        patched(record(1, 0), &1u64.to_le_bytes()),
        Err(BookDecodeError::DuplicateOrderId {
            index: 1,
            id: OrderId(1)
        })
    );
    assert_eq!(
        patched(record(1, price), &99i64.to_le_bytes()),
        Err(BookDecodeError::CrossedBook {
            best_bid: 99,
            best_ask: 99
        })
    );
    // Asks before bids.
    let mut swapped = good[..6].to_vec();
    swapped.extend_from_slice(&good[record(1, 0)..]);
    swapped.extend_from_slice(&good[record(0, 0)..record(1, 0)]);
    assert_eq!(
        OrderBook::decode(&swapped),
        Err(BookDecodeError::OutOfPriorityOrder {
            index: 1,
            id: OrderId(1)
        })
    );

    for cut in 0..good.len() {
        let error = OrderBook::decode(&good[..cut]).unwrap_err();
        assert!(!error.to_string().is_empty());
    }
    assert_eq!(OrderBook::decode(&good).unwrap(), book);
}

/// Over a long random stream on one engine, every fill moves equal and opposite quantity and
/// cash, so the sums over all accounts stay zero.
#[test]
fn positions_are_conserved() {
    let mut engine = MatchingEngine::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    let mut traded = 0;
    for id in 0..20_000 {
        let side = if next(2) == 0 { Side::Buy } else { Side::Sell };
        let mut new = order(id, next(5) as u32, side, 95 + next(11) as i64, 1 + next(50));
        if next(3) == 0 {
            new.kind = OrderKind::Iceberg {
                display_qty: 1 + next(new.qty),
            };
        }
        traded += engine.process(Request::New(new), Features::V2).fills.len();
        if next(4) == 0 {
            engine.process(cancel(next(id + 1), next(5) as u32), Features::V2);
        }
    }
    assert!(
        traded > 1000,
        "the stream should trade a lot, traded {traded}"
    );
    assert_eq!(totals(&engine), (0, 0));
    let bought: i64 = engine.positions().map(|(_, p)| p.position_qty.max(0)).sum();
    assert!(bought > 0);
}

/// `process_into` appends to a caller's buffer without merging a new request's fills into an
/// earlier request's, even when a reused taker id meets the same maker at the same price.
#[test]
fn process_into_reuses_buffer_without_merging_across_requests() {
    let mut engine = MatchingEngine::new();
    let (mut fills, mut touched) = (Vec::new(), Vec::new());
    engine.process_into(
        Request::New(order(1, 1, Side::Sell, 100, 10)),
        Features::V1,
        &mut fills,
        &mut touched,
    );
    for _ in 0..2 {
        let response = engine.process_into(
            Request::New(order(2, 2, Side::Buy, 100, 3)),
            Features::V1,
            &mut fills,
            &mut touched,
        );
        assert_eq!(response, Response::Ack { id: OrderId(2) });
    }
    let got: Vec<_> = fills
        .iter()
        .map(|f| (f.taker, f.maker, f.price, f.qty))
        .collect();
    assert_eq!(got, vec![fill(2, 1, 100, 3), fill(2, 1, 100, 3)]);
    assert_eq!(
        engine.position(AccountId(2)),
        AccountPosition {
            position_qty: 6,
            cash: -600
        }
    );
}
