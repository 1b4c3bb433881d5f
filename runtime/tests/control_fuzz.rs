//! Fuzz-style tests of everything another process writes that the runtime reads: the control
//! block's words and a client's ring files. Real files under /dev/shm, generated inputs
//! (well over 100 000 in the CI-sized form; `US_FUZZ_SCALE=10` for a longer run): no panic,
//! no hang, and every damaged checked word named by a typed error.
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use understudy_runtime::client::{Client, ClientError, ClientInput};
use understudy_runtime::control::{
    ClusterState, Control, ControlError, Damage, Field, Word, CHECKED_MAX, FILE_BYTES, MAX_CLIENTS,
    SLOTS,
};
use understudy_runtime::store::Store;
use understudy_runtime::Input;
use understudy_test_support::wait::Watchdog;
use understudy_test_support::{Rng, TestDir};

fn scale() -> u64 {
    std::env::var("US_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

fn read_word(path: &Path, offset: usize) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, offset as u64).unwrap();
    u64::from_le_bytes(b)
}

fn write_word(path: &Path, offset: usize, v: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&v.to_le_bytes(), offset as u64).unwrap();
}

/// Every checked value as the API reads it (the values decisions are taken on).
fn snapshot(c: &Control) -> Vec<u64> {
    let mut v = vec![
        c.epoch(),
        c.active_slot().map_or(u64::MAX, |s| s as u64),
        c.cluster_state().map_or(0, |s| s as u64),
    ];
    for slot in 0..SLOTS {
        for f in [
            Field::Pid,
            Field::StartTime,
            Field::Role,
            Field::State,
            Field::Epoch,
        ] {
            v.push(c.get(slot, f));
        }
    }
    v
}

/// A control block with values in every checked word.
fn populated(dir: &Path) -> Control {
    let c = Control::open_or_create(dir).unwrap();
    assert_eq!(c.claim_epoch(0, 1), Some(1));
    assert_eq!(c.claim_epoch(1, 0), Some(2));
    for slot in 0..SLOTS {
        c.set(slot, Field::Pid, 1000 + slot as u64);
        c.set(slot, Field::StartTime, 123_456 + slot as u64);
        c.set(slot, Field::Role, 1 + slot as u64);
        c.set(slot, Field::State, 2 + slot as u64);
        c.set(slot, Field::Epoch, 2);
    }
    assert!(c.verify().is_empty());
    c
}

/// Every flip of one bit and of two bits in either copy of every checked word is detected
/// and named by `verify`, changes no value read through the API, and `repair` undoes it.
#[test]
fn every_one_and_two_bit_flip_of_a_checked_word_is_named_and_repaired() {
    let _w = Watchdog::new("bit flips", Duration::from_secs(600));
    let d = TestDir::named("fuzz-flips");
    let c = populated(d.path());
    let before = snapshot(&c);
    let mut cases = 0u64;
    for word in Word::all() {
        for (offset, damage) in [
            (word.primary_offset(), Damage::Primary),
            (word.mirror_offset(), Damage::Mirror),
        ] {
            for a in 0..64 {
                for b in a..64 {
                    // b == a: one bit; else two.
                    let mask = if a == b { 1u64 << a } else { 1 << a | 1 << b };
                    assert!(c.flip_bits(offset, mask));
                    let found = c.verify();
                    assert_eq!(
                        found.len(),
                        1,
                        "{word} {damage:?} mask {mask:#x}: expected one damaged word, found {found:?}"
                    );
                    assert_eq!(found[0].word, word, "mask {mask:#x}");
                    assert_eq!(found[0].damage, damage, "{word} mask {mask:#x}");
                    assert!(
                        found[0].to_string().contains(&word.to_string()),
                        "the message names the word: {}",
                        found[0]
                    );
                    assert_eq!(snapshot(&c), before, "{word} {damage:?} mask {mask:#x}");
                    let repaired = c.repair();
                    assert_eq!(repaired.len(), 1);
                    assert!(c.verify().is_empty(), "{word} mask {mask:#x}: repaired");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 18 * 2 * (64 * 65 / 2));
    eprintln!("{cases} flips, each named and repaired");
}

/// Random words written anywhere in the control file except the mutex (100 000 in CI):
/// every reader returns without panicking, a damaged checked copy is named, and a word
/// with no intact copy left is a typed error from the checked readers.
#[test]
fn random_control_words_never_panic_and_damage_is_named() {
    let _w = Watchdog::new("random control words", Duration::from_secs(600));
    let d = TestDir::named("fuzz-random");
    let c = populated(d.path());
    let path = d.path().join("control");
    let mut rng = Rng::seeded(
        "random_control_words",
        0x5EED_C0DE_u64 ^ u64::from(std::process::id()),
    );
    let seed = rng.seed().expect("seeded");
    let checked: Vec<(Word, usize, usize)> = Word::all()
        .map(|w| (w, w.primary_offset(), w.mirror_offset()))
        .collect();
    let n = 100_000 * scale();
    let (mut named, mut unnoticed, mut both) = (0u64, 0u64, 0u64);
    for i in 0..n {
        // Half the time a checked word (either copy, sometimes both), else any word but the
        // mutex's (bytes 64..128: pthread calls on garbage may block, as with any futex).
        let mut offsets = Vec::with_capacity(2);
        let target = if rng.below(2) == 0 {
            let (w, p, m) = checked[rng.below(checked.len() as u64) as usize];
            match rng.below(5) {
                0 => offsets.extend([p, m]),
                1 | 2 => offsets.push(p),
                _ => offsets.push(m),
            }
            Some(w)
        } else {
            let mut o = rng.below(FILE_BYTES as u64 / 8) as usize * 8;
            while (64..128).contains(&o) {
                o = rng.below(FILE_BYTES as u64 / 8) as usize * 8;
            }
            offsets.push(o);
            None
        };
        let saved: Vec<u64> = offsets.iter().map(|&o| read_word(&path, o)).collect();
        for &o in &offsets {
            let v = match rng.below(4) {
                0 => rng.next_u64(),
                1 => rng.next_u64() & CHECKED_MAX,
                2 => [0, u64::MAX, 1, 1 << 63][rng.below(4) as usize],
                _ => read_word(&path, o) ^ 1 << rng.below(64),
            };
            write_word(&path, o, v);
        }
        // Every reader, on whatever is there now.
        let found = c.verify();
        let _ = snapshot(&c);
        let _ = (
            c.epoch_checked(),
            c.active_slot_checked(),
            c.cluster_state(),
        );
        for slot in 0..SLOTS {
            for f in [Field::Pid, Field::Role, Field::Epoch, Field::Commits] {
                let _ = c.get_checked(slot, f);
            }
        }
        let _ = (c.pending(), c.acked());
        for e in 0..MAX_CLIENTS {
            let _ = (c.client(e), c.client_refused(e));
        }
        if let Some(w) = target {
            match found.iter().find(|f| f.word == w) {
                Some(f) => {
                    named += 1;
                    if f.damage == Damage::Both {
                        both += 1;
                        let err = c.read(w).expect_err("both copies damaged: a typed error");
                        assert_eq!(err.word, w, "seed {seed:#x} iteration {i}");
                        assert!(err.to_string().contains(&w.to_string()));
                    }
                }
                // A random word that happens to carry a valid check (1 in 65 536), or a
                // write of the value already there.
                None => unnoticed += 1,
            }
        }
        for (&o, &v) in offsets.iter().zip(&saved) {
            write_word(&path, o, v);
        }
    }
    assert!(c.verify().is_empty());
    eprintln!("{n} random words: {named} damaged checked words named ({both} with both copies), {unnoticed} unnoticed");
    assert!(named > n / 3, "seed {seed:#x}: too few detections: {named}");
    assert!(
        unnoticed * 1000 <= named,
        "seed {seed:#x}: {unnoticed} damaged words unnoticed against {named} named"
    );
}

/// A control file that is not one (another magic, another layout version, another size):
/// opening it is an error naming the field with what was expected and found.
#[test]
fn open_names_the_damaged_header_field() {
    let _w = Watchdog::new("control headers", Duration::from_secs(600));
    let d = TestDir::named("fuzz-headers");
    drop(populated(d.path()));
    let path = d.path().join("control");
    let mut rng = Rng::seeded("control_headers", 0xABCD_EF01);
    let n = 5_000 * scale();
    for i in 0..n {
        let (offset, field) = if i % 2 == 0 {
            (0, "magic")
        } else {
            (8, "version")
        };
        let saved = read_word(&path, offset);
        let mut v = rng.next_u64();
        if i % 3 == 0 {
            v = 1; // the previous layout version (or a tiny magic)
        }
        if v == saved {
            continue;
        }
        write_word(&path, offset, v);
        match Control::open(d.path()) {
            Err(ControlError::Field {
                field: f,
                expected,
                found,
                ..
            }) => {
                assert_eq!(f, field);
                assert!(!expected.is_empty() && !found.is_empty());
            }
            Err(e) => panic!("{field} {v:#x}: expected a field error, found {e}"),
            Ok(_) => panic!("{field} {v:#x}: a damaged header was accepted"),
        }
        write_word(&path, offset, saved);
    }
    // The previous layout (version 1) names both versions.
    write_word(&path, 8, 1);
    let e = Control::open(d.path()).err().expect("version 1 refused");
    assert!(e.to_string().contains("expected 2, found 1"), "{e}");
    write_word(&path, 8, understudy_runtime::control::VERSION);
    // Another size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(FILE_BYTES as u64 * 2)
        .unwrap();
    let e = Control::open(d.path()).err().expect("size refused");
    assert!(e.to_string().contains("file size"), "{e}");
}

/// The epoch can still be claimed when its primary word is damaged (from the intact
/// mirror), exactly once; a claim from a stale epoch still fails.
#[test]
fn the_epoch_is_claimed_from_its_mirror_when_the_primary_is_damaged() {
    let d = TestDir::named("fuzz-claim");
    let c = populated(d.path());
    let w = Word::Epoch;
    assert!(c.flip_bits(w.primary_offset(), 1 << 40));
    assert_eq!(c.epoch(), 2, "the mirror answers");
    assert_eq!(c.claim_epoch(1, 1), None, "a stale claim fails");
    assert_eq!(c.claim_epoch(2, 1), Some(3));
    assert_eq!(c.claim_epoch(2, 0), None, "only one claimer wins");
    assert!(c.verify().is_empty(), "the claim rewrote both copies");
    assert_eq!((c.epoch(), c.active_slot()), (3, Some(1)));
    // `down` marks the cluster; a new active marks it up again.
    c.set_cluster_state(ClusterState::Down);
    assert_eq!(c.cluster_state(), Ok(ClusterState::Down));
    assert_eq!(c.claim_epoch(3, 0), Some(4));
    assert_eq!(c.cluster_state(), Ok(ClusterState::Up));
}

/// An engine's own view repairs a word damaged in both copies: its slot's fields, and, as
/// the active, the epoch and the active slot. Another slot's lost word is not guessed.
#[test]
fn an_engine_rewrites_words_lost_in_both_copies_from_its_own_view() {
    let d = TestDir::named("fuzz-own");
    let c = populated(d.path());
    // This process plays the active in slot 0 (it wrote slot 0 last: role active, epoch 2).
    c.set(0, Field::Role, 1);
    for w in [
        Word::Epoch,
        Word::ActiveSlot,
        Word::Slot {
            slot: 0,
            field: Field::Pid,
        },
        Word::Slot {
            slot: 1,
            field: Field::State,
        },
    ] {
        assert!(c.flip_bits(w.primary_offset(), 0b101 << 20));
        assert!(c.flip_bits(w.mirror_offset(), 1 << 50));
        assert!(c.read(w).is_err(), "{w}: both copies damaged");
    }
    let found = c.repair_own(0);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(found.iter().all(|f| f.damage == Damage::Both));
    let left = c.verify();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(
        left[0].word,
        Word::Slot {
            slot: 1,
            field: Field::State
        },
        "slot b's lost state is b's to rewrite"
    );
    assert_eq!((c.epoch(), c.active_slot()), (2, Some(0)));
    assert_eq!(c.get(0, Field::Pid), 1000);
    // A second source (the supervisor's record) restores what no engine can; a stale
    // report or a value out of range writes nothing.
    let lost = left[0].clone();
    assert!(!c.restore(&lost, 99), "state 99 is out of range");
    assert!(c.restore(&lost, 3));
    assert!(!c.restore(&lost, 3), "the word changed since it was found");
    assert!(c.verify().is_empty());
    assert_eq!(c.get(1, Field::State), 3);
}

/// Random words written into a connected client's two ring files (superblock, ring control
/// words, data; 100 000 in CI), with both ends polling: the client and the engine's
/// `ClientInput` return values or typed errors, never panic, never hang; a client whose rings
/// were closed sees `ClientClosed` with a reason.
#[test]
fn random_client_ring_words_give_typed_errors_never_panics() {
    let _w = Watchdog::new("client rings", Duration::from_secs(600));
    let d = TestDir::named("fuzz-rings");
    let _control = Control::open_or_create(d.path()).unwrap();
    let mut input = ClientInput::new(d.path()).unwrap();
    let store = Store::new();
    let mut rng = Rng::seeded(
        "random_client_ring_words",
        0x00C1_1E47_u64 ^ u64::from(std::process::id()),
    );
    let mut client = Client::connect_with(d.path(), 4096).unwrap();
    input.resume(&store);
    let mut buf = Vec::new();
    let n = 100_000 * scale();
    let (mut reconnects, mut typed_errors) = (0u64, 0u64);
    let started = Instant::now();
    for i in 0..n {
        let which = rng.below(2);
        let path = if which == 0 {
            Control::client_in_path(d.path(), client.id())
        } else {
            Control::client_out_path(d.path(), client.id())
        };
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len >= 4096 + 64 {
            // Superblock words, ring control words (after the 4 KiB header), or data.
            let o = match rng.below(3) {
                0 => rng.below(16) * 8,
                1 => 4096 + rng.below(64) * 8,
                _ => rng.below(len / 8) * 8,
            };
            let v = match rng.below(3) {
                0 => rng.next_u64(),
                1 => rng.below(1 << 16),
                _ => read_word(&path, o as usize) ^ 1 << rng.below(64),
            };
            write_word(&path, o as usize, v);
        }
        // Traffic both ways.
        let mut closed = false;
        match client.try_submit(&i.to_le_bytes()) {
            Ok(_) => {}
            Err(ClientError::ClientClosed { .. }) => closed = true,
            Err(_) => typed_errors += 1,
        }
        for _ in 0..4 {
            if let Some(meta) = input.poll(&mut buf) {
                if i % 64 == 0 {
                    input.committed(&meta, &buf);
                }
            }
        }
        match client.poll_response() {
            Ok(_) => {}
            Err(ClientError::ClientClosed { reason }) => {
                assert!(!reason.to_string().is_empty());
                closed = true;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                typed_errors += 1;
                closed = true;
            }
        }
        if closed || i % 997 == 0 {
            // Start over with a fresh client, as an application would.
            client = Client::connect_with(d.path(), 4096).unwrap();
            input.resume(&store);
            reconnects += 1;
        }
    }
    eprintln!(
        "{n} random ring words in {:?}: {typed_errors} typed errors, {reconnects} reconnects",
        started.elapsed()
    );
    assert!(typed_errors > 0 && reconnects > 0);
}
