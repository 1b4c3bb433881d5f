//! The packed work-unit store against a model (a `BTreeMap` of id → unit): random puts,
//! replaces and retires of states of every size (empty, small, across the inline limit),
//! copied (`apply`, a standby) and moved (`apply_owned`, the active), must leave the same
//! contents, counts and digest as a fresh build of the model; and the snapshot walk keeps its
//! contract while the store changes between chunks.

use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use understudy_runtime::store::{Op, Spare, Store, Unit, UnitCursor};

/// One change, drawn small so that ids repeat (replaces, retires of live units).
fn op_strategy(ids: u64) -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        2 => Just(0usize),
        4 => 0..200usize,
        3 => prop::sample::select(vec![40usize, 44, 48]),
        // Around the largest state kept inline (4084 bytes) and past it.
        1 => 4080..4090usize,
    ];
    prop_oneof![
        3 => (0..ids, 0..3u16, 1..3u16, len, any::<u8>()).prop_map(|(id, kind, lv, len, b)| {
            Op::PutUnit {
                id,
                kind,
                layout_version: lv,
                state: (0..len).map(|i| b.wrapping_add(i as u8)).collect(),
            }
        }),
        1 => (0..ids).prop_map(|id| Op::RetireUnit { id }),
    ]
}

fn model_apply(model: &mut BTreeMap<u64, Unit>, op: &Op) {
    match op {
        Op::PutUnit {
            id,
            kind,
            layout_version,
            state,
        } => {
            model.insert(
                *id,
                Unit {
                    kind: *kind,
                    layout_version: *layout_version,
                    state: state.clone(),
                },
            );
        }
        Op::RetireUnit { id } => {
            model.remove(id);
        }
        _ => unreachable!("units only"),
    }
}

/// The store's units by id; fails on a unit seen twice.
fn contents(store: &Store) -> BTreeMap<u64, Unit> {
    let mut seen = BTreeMap::new();
    for (id, u) in store.units() {
        assert!(
            seen.insert(id, u.to_unit()).is_none(),
            "unit {id} listed twice by units()"
        );
    }
    seen
}

fn fresh(model: &BTreeMap<u64, Unit>) -> Store {
    let mut s = Store::new();
    for (id, u) in model {
        s.put_unit(*id, u.clone());
    }
    s
}

fn check_against(model: &BTreeMap<u64, Unit>, store: &Store, ids: u64) {
    let f = fresh(model);
    assert_eq!(store.unit_count(), model.len(), "unit count");
    assert_eq!(store.digest(), f.digest(), "digest vs a fresh build");
    assert_eq!(&contents(store), model, "contents");
    for id in 0..ids {
        assert_eq!(
            store.unit(id).map(|u| u.to_unit()),
            model.get(&id).cloned(),
            "unit({id})"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Copying and owning applies agree with each other and with the model.
    #[test]
    fn store_matches_a_model(ops in prop::collection::vec(op_strategy(48), 1..400)) {
        let (mut copied, mut owned, mut spare) = (Store::new(), Store::new(), Spare::new());
        let mut model = BTreeMap::new();
        for op in ops {
            model_apply(&mut model, &op);
            copied.apply(&op);
            owned.apply_owned(op, &mut spare);
            prop_assert_eq!(copied.digest(), owned.digest());
        }
        check_against(&model, &copied, 48);
        check_against(&model, &owned, 48);
        // A clone is an equal, independent store.
        let mut clone = copied.clone();
        prop_assert_eq!(clone.digest(), copied.digest());
        clone.clear();
        prop_assert_eq!(clone.digest(), 0);
        prop_assert_eq!(clone.units().count(), 0);
        check_against(&model, &copied, 48);
    }

    /// A snapshot walk in random chunks while random changes land between chunks: a standby
    /// that applies the walk's units and every change, in the order a stream would carry them,
    /// ends equal to the store; every unit that was there at the start and never changed is
    /// visited exactly once.
    #[test]
    fn snapshot_walk_keeps_its_contract(
        before in prop::collection::vec(op_strategy(300), 0..600),
        during in prop::collection::vec(
            (1..40usize, prop::collection::vec(op_strategy(300), 0..8)), 1..60),
    ) {
        let mut store = Store::new();
        for op in &before {
            store.apply(op);
        }
        let at_start = contents(&store);
        let mut changed = BTreeSet::new();
        let mut visits: BTreeMap<u64, usize> = BTreeMap::new();
        let mut standby = Store::new();
        let mut cursor = UnitCursor::START;
        let mut rounds = during.iter().cycle();
        loop {
            let (chunk, changes) = rounds.next().expect("cycle");
            let mut n = 0;
            for (next, id, u) in store.units_from(cursor, *chunk) {
                standby.put_unit(id, u.to_unit());
                *visits.entry(id).or_default() += 1;
                cursor = next;
                n += 1;
            }
            if n < *chunk {
                break;
            }
            for op in changes {
                if let Op::PutUnit { id, .. } | Op::RetireUnit { id } = op {
                    changed.insert(*id);
                }
                store.apply(op);
                standby.apply(op);
            }
        }
        prop_assert_eq!(standby.digest(), store.digest());
        prop_assert_eq!(contents(&standby), contents(&store));
        for id in at_start.keys().filter(|id| !changed.contains(id)) {
            prop_assert_eq!(visits.get(id).copied(), Some(1), "unchanged unit {} visits", id);
        }
    }
}

/// Many units of a few lengths, replaced across lengths and retired at random, so pages fill,
/// empty, are released and reused, against the model: the paths a short proptest rarely
/// reaches.
#[test]
fn pages_fill_empty_and_are_reused() {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    const IDS: u64 = 12_000;
    let lens = [0usize, 40, 48, 1000, 5000];
    let (mut store, mut owned, mut spare) = (Store::new(), Store::new(), Spare::new());
    let mut model = BTreeMap::new();
    for round in 0..6u64 {
        // Fill, mostly one length per round (so that pages fill), then thin out.
        for _ in 0..30_000 {
            let id = next(IDS);
            let len = if next(8) == 0 {
                lens[next(lens.len() as u64) as usize]
            } else {
                lens[(round % 3) as usize + 1]
            };
            let op = if next(5) == 0 {
                Op::RetireUnit { id }
            } else {
                Op::PutUnit {
                    id,
                    kind: round as u16,
                    layout_version: 1,
                    state: vec![next(256) as u8; len],
                }
            };
            model_apply(&mut model, &op);
            store.apply(&op);
            owned.apply_owned(op, &mut spare);
        }
        for id in 0..IDS {
            if next(3) != 0 {
                let op = Op::RetireUnit { id };
                model_apply(&mut model, &op);
                store.apply(&op);
                owned.apply_owned(op, &mut spare);
            }
        }
        check_against(&model, &store, IDS);
        check_against(&model, &owned, IDS);
    }
    for id in 0..IDS {
        store.retire_unit(id);
    }
    assert_eq!((store.unit_count(), store.digest()), (0, 0));
    assert_eq!(store.units().count(), 0);
}
