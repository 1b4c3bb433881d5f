//! matchbook's work units through the runtime's transaction path (`execute_local`, no
//! processes): what a request writes, a standby kept hot change by change, an engine rebuilt
//! from the store, the record layouts, and bad records that must not panic the engine.

use matchbook::app::{parse_response, status, Matchbook, WireRequest, POSITIONS};
use matchbook::book::{MatchingEngine, PlacedOrder, Side, Symbol};
use matchbook::units::*;
use proptest::prelude::*;
use understudy_runtime::engine::{execute_local_ops, InputMeta};
use understudy_runtime::store::{Op, Store};
use understudy_runtime::Application;
use zerocopy::IntoBytes;

const SYMBOLS: [u32; 2] = [1, 2];

/// One engine: the application and its store.
struct Node {
    app: Matchbook,
    store: Store,
    before: understudy_runtime::store::BeforeBuf,
}

impl Node {
    fn new(version: u32) -> Node {
        Node {
            app: Matchbook::new(version),
            store: Store::new(),
            before: Default::default(),
        }
    }

    /// Runs one request as the active does; returns the response and the transaction's
    /// changes, exactly as the engine streams them to a standby.
    fn run(&mut self, k: u64, enabled: u64, request: &WireRequest) -> (Vec<u8>, Vec<Op>) {
        let meta = InputMeta {
            source: 1,
            request_seq: k,
            next_pos: k + 1,
            next_seq: k + 1,
        };
        execute_local_ops(
            &mut self.app,
            &mut self.store,
            enabled,
            &meta,
            request.as_bytes(),
        )
    }

    /// Applies one change as a standby does.
    fn apply(&mut self, op: &Op) {
        self.before.capture(&self.store, op);
        self.store.apply(op);
        self.app.on_apply(op, self.before.view(), &self.store);
    }
}

fn placed(engine: &MatchingEngine, symbol: u32) -> Vec<PlacedOrder> {
    engine
        .book(Symbol(symbol))
        .map(|b| b.placed_orders().copied().collect())
        .unwrap_or_default()
}

/// The two applications hold the same state: books (time priority included), positions, the
/// sequence counter and every book's request count.
fn same_state(a: &Matchbook, b: &Matchbook) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.engine(), b.engine());
    for s in SYMBOLS {
        prop_assert_eq!(placed(a.engine(), s), placed(b.engine(), s), "symbol {}", s);
    }
    prop_assert_eq!(a.book_seqs(), b.book_seqs());
    Ok(())
}

fn request_strategy() -> impl Strategy<Value = WireRequest> {
    let side = prop_oneof![Just(Side::Buy), Just(Side::Sell)];
    let price = prop_oneof![20 => 98i64..=102, 1 => Just(0i64)];
    let new = (
        0u64..24,
        1u32..4,
        1u32..=2,
        side,
        price,
        1u64..=12,
        0u64..=4,
    )
        .prop_map(|(id, account, symbol, side, price, qty, display)| {
            if display == 0 {
                WireRequest::limit(id, account, symbol, side, price, qty)
            } else {
                WireRequest::iceberg(id, account, symbol, side, price, qty, display)
            }
        });
    let cancel = (0u64..24, 1u32..4, 1u32..=2)
        .prop_map(|(id, account, symbol)| WireRequest::cancel(id, account, symbol));
    prop_oneof![4 => new, 1 => cancel]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// On random streams (icebergs and refreshes included, the feature switched per request,
    /// application version 1 or 2), through the runtime's transaction path:
    /// - a request changes at most one order unit per fill plus one (the order that rests or
    ///   the one cancelled), and no unit of another book: its cost follows what it changed;
    /// - order records are written in layout 1 unless the feature is on or the order is an
    ///   iceberg;
    /// - a standby that applies each request's changes one by one (in either order) through
    ///   `on_apply` holds the active's exact state after every request;
    /// - an engine rebuilt from the store by `on_reset` holds it too, and the store holds one
    ///   order unit per resting order and one book unit per book.
    #[test]
    fn standby_and_rebuild_match_the_active(
        version in 1u32..=2,
        stream in prop::collection::vec((request_strategy(), any::<bool>()), 1..120),
    ) {
        let mut active = Node::new(version);
        let mut standby = Node::new(version);
        for (k, (request, on)) in stream.iter().enumerate() {
            let enabled = (version >= 2 && *on) as u64;
            let (response, mut ops) = active.run(k as u64, enabled, request);
            let (header, _) = parse_response(&response).expect("a response header");

            let order_ops = ops.iter().filter(|op| match op {
                Op::PutUnit { id, .. } | Op::RetireUnit { id } => id & ORDER_UNIT_BIT != 0,
                _ => false,
            }).count();
            prop_assert!(order_ops <= header.fills as usize + 1,
                "step {}: {} order units changed by a request with {} fills", k, order_ops, header.fills);
            for op in &ops {
                if let Op::PutUnit { id, kind, layout_version, state } = op {
                    if *kind == BOOK_KIND {
                        prop_assert_eq!(*id, u64::from(request.symbol), "step {}: another book written", k);
                        continue;
                    }
                    let (symbol, placed) = decode_order(*id, *layout_version, state).unwrap();
                    prop_assert_eq!(symbol.0, request.symbol, "step {}: an order of another book written", k);
                    let iceberg = placed.order.hidden_qty > 0
                        || matches!(placed.order.kind, matchbook::book::OrderKind::Iceberg { .. });
                    let want = if enabled == 1 || iceberg { 2 } else { 1 };
                    prop_assert_eq!(*layout_version, want, "step {}", k);
                }
            }
            if header.status == status::REJECT {
                prop_assert!(order_ops == 0, "step {}: a refusal changed orders", k);
            }

            if k % 2 == 1 {
                ops.reverse();
            }
            for op in &ops {
                standby.apply(op);
            }
            same_state(&standby.app, &active.app)?;
        }
        prop_assert_eq!(standby.store.digest(), active.store.digest());
        let mut rebuilt = Matchbook::new(version);
        rebuilt.on_reset(&active.store);
        same_state(&rebuilt, &active.app)?;
        prop_assert_eq!((standby.app.bad_records(), rebuilt.bad_records()), (0, 0));

        let engine = active.app.engine();
        let resting: usize = engine.books().map(|(_, b)| b.len()).sum();
        let kinds = |kind| active.store.units().filter(|(_, u)| u.kind == kind).count();
        prop_assert_eq!(kinds(ORDER_KIND), resting);
        prop_assert_eq!(kinds(BOOK_KIND), engine.books().count());
    }
}

/// Garbage for the apply hook: unit states of every kind, layout version and length (some of
/// them valid records with one byte changed), retires of any id, position records of any size.
fn garbage_op() -> impl Strategy<Value = Op> {
    let id = prop_oneof![
        0u64..4,
        (0u64..8).prop_map(|n| ORDER_UNIT_BIT | n),
        any::<u64>()
    ];
    let valid_order =
        (1u64..5, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(seq, at, byte)| {
            let record = OrderRecord {
                id: 7,
                price: 100,
                visible_qty: 3,
                priority_seq: seq,
                symbol: 1,
                account: 2,
                side: 1,
                _pad: [0; 7],
                hidden_qty: 6,
                display_qty: 3,
            };
            let mut bytes = record.as_bytes().to_vec();
            let at = at.index(bytes.len());
            bytes[at] = byte;
            bytes
        });
    let state = prop_oneof![prop::collection::vec(any::<u8>(), 0..80), valid_order];
    prop_oneof![
        4 => (id.clone(), 0u16..4, 0u16..4, state).prop_map(|(id, kind, layout_version, state)| Op::PutUnit { id, kind, layout_version, state }),
        1 => id.prop_map(|id| Op::RetireUnit { id }),
        1 => (prop::collection::vec(any::<u8>(), 0..6), prop::collection::vec(any::<u8>(), 0..20))
            .prop_map(|(key, value)| Op::Put { table: POSITIONS, key, value }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Whatever the store hands the application — wrong lengths, layout versions, sides, ids,
    /// numbers — neither the apply hook, nor a rebuild from that store, nor the requests that
    /// follow on the engine (as if it had stepped up) panic; unreadable records are counted.
    #[test]
    fn bad_records_never_panic(
        ops in prop::collection::vec(garbage_op(), 1..40),
        requests in prop::collection::vec(request_strategy(), 0..30),
    ) {
        let mut active = Node::new(2);
        for (k, request) in [
            WireRequest::iceberg(1, 1, 1, Side::Buy, 99, 10, 3),
            WireRequest::limit(2, 2, 1, Side::Sell, 101, 4),
        ].iter().enumerate() {
            active.run(k as u64, 1, request);
        }
        let mut standby = Node::new(2);
        standby.store = active.store.clone();
        standby.app.on_reset(&standby.store);
        for op in &ops {
            standby.apply(op);
        }
        let mut rebuilt = Matchbook::new(2);
        rebuilt.on_reset(&standby.store);
        for (k, request) in requests.iter().enumerate() {
            let (response, _) = standby.run(100 + k as u64, 1, request);
            prop_assert!(parse_response(&response).is_some());
        }
    }
}

/// The records are the documented little-endian layouts, byte for byte: a book in 24 bytes,
/// an order in 48 bytes (layout 1) or 64 (layout 2, the iceberg fields appended).
#[test]
fn record_layouts_are_as_documented() {
    let book = BookRecord {
        symbol: 3,
        _pad: 0,
        request_seq: 0x0102,
        last_seq: 9,
    };
    let mut want = vec![3, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0];
    want.extend_from_slice(&9u64.to_le_bytes());
    assert_eq!(book.encoded(), &want[..]);
    assert_eq!(decode_book(3, 1, &want), Ok(book));

    let record = OrderRecord {
        id: 0x0a0b,
        price: 100,
        visible_qty: 5,
        priority_seq: 12,
        symbol: 3,
        account: 7,
        side: 1,
        _pad: [0; 7],
        hidden_qty: 20,
        display_qty: 5,
    };
    let mut want = Vec::new();
    want.extend_from_slice(&0x0a0bu64.to_le_bytes());
    want.extend_from_slice(&100i64.to_le_bytes());
    want.extend_from_slice(&5u64.to_le_bytes());
    want.extend_from_slice(&12u64.to_le_bytes());
    want.extend_from_slice(&3u32.to_le_bytes());
    want.extend_from_slice(&7u32.to_le_bytes());
    want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(record.encoded(1), &want[..]);
    want.extend_from_slice(&20u64.to_le_bytes());
    want.extend_from_slice(&5u64.to_le_bytes());
    assert_eq!(record.encoded(2), &want[..]);
    // An iceberg is written in layout 2 whatever the agreed write version.
    assert_eq!(record.layout_version(1), 2);
    let (symbol, placed) = decode_order(ORDER_UNIT_BIT | 4, 2, &want).unwrap();
    assert_eq!(
        (symbol, placed.entry_seq, placed.priority_seq),
        (Symbol(3), 4, 12)
    );
    assert_eq!((placed.order.visible_qty, placed.order.hidden_qty), (5, 20));
}

/// Layout 1 (an older writer) reads as a limit order; a newer layout's longer block is read by
/// its known prefix; wrong lengths, version 0, a bad side, ids that do not fit the kind and
/// numbers out of range are refused with an error that names them.
#[test]
fn unit_decoding_refuses_what_does_not_fit() {
    let limit = OrderRecord {
        id: 1,
        price: 100,
        visible_qty: 5,
        priority_seq: 3,
        symbol: 2,
        account: 1,
        side: 0,
        _pad: [0; 7],
        hidden_qty: 0,
        display_qty: 0,
    };
    let unit = ORDER_UNIT_BIT | 3;
    let v1 = limit.encoded(1).to_vec();
    let v2 = limit.encoded(2).to_vec();
    assert_eq!(
        decode_order(unit, 1, &v1).unwrap(),
        decode_order(unit, 2, &v2).unwrap()
    );
    let mut v3 = v2.clone();
    v3.extend_from_slice(&[0xEE; 8]);
    assert_eq!(
        decode_order(unit, 3, &v3).unwrap(),
        decode_order(unit, 2, &v2).unwrap()
    );

    fn wrong_length<T>(r: Result<T, UnitError>) -> bool {
        matches!(r, Err(UnitError::WrongLength { .. }))
    }
    assert!(wrong_length(decode_order(unit, 2, &v1)));
    assert!(wrong_length(decode_order(unit, 1, &v2)));
    assert!(wrong_length(decode_order(unit, 3, &v1)));
    assert!(wrong_length(decode_order(unit, 1, &v1[..47])));
    assert_eq!(
        decode_order(unit, 0, &v1),
        Err(UnitError::UnknownVersion { unit, found: 0 })
    );
    assert_eq!(decode_order(3, 1, &v1), Err(UnitError::OrderId { unit: 3 }));
    let mut bad_side = v1.clone();
    bad_side[40] = 2;
    assert_eq!(
        decode_order(unit, 1, &bad_side),
        Err(UnitError::BadSide { unit, found: 2 })
    );
    let mut zero_qty = v1.clone();
    zero_qty[16..24].copy_from_slice(&0u64.to_le_bytes());
    assert!(matches!(
        decode_order(unit, 1, &zero_qty),
        Err(UnitError::Invalid { .. })
    ));
    let early = OrderRecord {
        priority_seq: 2,
        ..limit
    };
    assert!(matches!(
        decode_order(unit, 1, early.encoded(1)),
        Err(UnitError::Invalid { .. })
    ));
    assert!(matches!(
        decode_order(ORDER_UNIT_BIT | (SEQ_MAX + 1), 1, &v1),
        Err(UnitError::SeqOutOfRange { .. })
    ));

    let book = BookRecord {
        symbol: 2,
        _pad: 0,
        request_seq: 1,
        last_seq: 3,
    };
    assert_eq!(
        decode_book(5, 1, book.encoded()),
        Err(UnitError::BookId { unit: 5, symbol: 2 })
    );
    assert!(wrong_length(decode_book(2, 1, &book.encoded()[..23])));
    let huge = BookRecord {
        last_seq: u64::MAX,
        ..book
    };
    assert!(matches!(
        decode_book(2, 1, huge.encoded()),
        Err(UnitError::SeqOutOfRange { .. })
    ));
    for e in [
        decode_order(unit, 0, &v1).unwrap_err(),
        decode_book(2, 1, huge.encoded()).unwrap_err(),
    ] {
        assert!(e.to_string().contains("expected"), "{e}");
    }
}

/// Version 1 declares order layout 1 only, version 2 layouts 1 and 2 with the same base
/// fingerprint (so they pair and agree on layout 1); the iceberg feature needs order layout 2.
#[test]
fn templates_and_feature_declare_the_order_layouts() {
    let (v1, v2) = (Matchbook::new(1), Matchbook::new(2));
    let order = |app: &Matchbook| {
        app.templates()
            .into_iter()
            .find(|t| t.type_id == ORDER_TYPE)
            .expect("the order template")
    };
    assert_eq!((order(&v1).min_version, order(&v1).max_version), (1, 1));
    assert_eq!((order(&v2).min_version, order(&v2).max_version), (1, 2));
    assert_eq!(order(&v1).base_fingerprint, order(&v2).base_fingerprint);
    assert!(v1.features().is_empty());
    let iceberg = v2.features()[0];
    assert_eq!((iceberg.type_id, iceberg.layout_version), (ORDER_TYPE, 2));
}

/// With 200 orders resting, a cancel writes exactly three things: the retired order, its book,
/// the input position; a sell that fills one bid and part of the next writes the retired and the
/// updated order, the book, two positions and the input position; an order that rests writes
/// itself, the book and the input position. Nothing of the other 198 orders.
#[test]
fn a_request_writes_what_it_changed() {
    let mut node = Node::new(2);
    let mut k = 0;
    let mut send = |node: &mut Node, request: WireRequest| {
        let (_, ops) = node.run(k, 0, &request);
        k += 1;
        ops
    };
    for i in 0..200 {
        send(
            &mut node,
            WireRequest::limit(1000 + i, 1, 1, Side::Buy, 90 + (i % 5) as i64, 10),
        );
    }
    send(&mut node, WireRequest::limit(1, 1, 1, Side::Sell, 120, 10));
    let kinds = |ops: &[Op]| -> Vec<&'static str> {
        let mut names: Vec<&'static str> = ops
            .iter()
            .map(|op| match op {
                Op::PutUnit { id, .. } if id & ORDER_UNIT_BIT != 0 => "order",
                Op::PutUnit { .. } => "book",
                Op::RetireUnit { .. } => "retire",
                Op::Put { table, .. } if *table == POSITIONS => "position",
                Op::Put { .. } => "input",
                Op::Delete { .. } => "delete",
            })
            .collect();
        names.sort_unstable();
        names
    };
    let cancel = send(&mut node, WireRequest::cancel(1, 1, 1));
    assert_eq!(kinds(&cancel), ["book", "input", "retire"]);
    let fill = send(&mut node, WireRequest::limit(2, 2, 1, Side::Sell, 94, 15));
    assert_eq!(
        kinds(&fill),
        ["book", "input", "order", "position", "position", "retire"]
    );
    let rest = send(&mut node, WireRequest::limit(3, 2, 1, Side::Buy, 80, 7));
    assert_eq!(kinds(&rest), ["book", "input", "order"]);
    assert_eq!(node.app.engine().book(Symbol(1)).unwrap().len(), 200);
}
