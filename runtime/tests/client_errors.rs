//! Clients learn the truth, and the control block is verified, not trusted: real engine
//! processes (`understudy-testapp-v1 --clients`), real signals, real files under /dev/shm.
//! A client is told of `down`, of an outage and of rings the engine closed, within bounded
//! time instead of silence; a failover within the bound stays silent; `call` keeps other
//! answers; a response too large for a client's ring is refused with an error and the client
//! stays connected; a flipped bit in any checked control-block word is named and repaired by
//! the live engines, and no engine dies of it.
mod common;
use common::*;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use understudy_runtime::client::{Client, ClientError, ClientInput, CloseReason};
use understudy_runtime::control::{
    monotonic_ns, ClusterState, Control, Damage, Field, Role, State, Word,
};
use understudy_runtime::store::Store;
use understudy_runtime::Input;

/// Not a test: the test engine v1 when [`engine_command`] runs this binary.
#[test]
#[ignore = "the test engine that engine_command starts"]
fn testapp_engine() {
    if let Ok(a) = std::env::var(understudy_testkit::ENGINE_ARGS_VAR) {
        let args: Vec<String> = a.lines().map(String::from).collect();
        std::process::exit(understudy_testkit::engine_process_with(1, &args).into());
    }
}
/// Generous bound for anything that should take milliseconds (2 loaded cores, debug build).
const LONG: Duration = Duration::from_secs(20);

/// Engines of one cluster (the workspace harness: killed, and the cluster's files removed,
/// on drop), started with [`TestEngines::spawn_testapp`].
type Engines = Cluster;

/// Engine a active, b a hot standby.
fn pair(tag: &str) -> (Engines, Control) {
    let mut e = Engines::new(tag);
    let c = e.control();
    e.spawn_testapp(0, false, &[]);
    wait_until("a active", LONG, || role(&c, 0) == Role::Active);
    e.spawn_testapp(1, true, &[]);
    wait_until("b hot", LONG, || {
        state(&c, 1) == State::Hot && role(&c, 1) == Role::Standby
    });
    (e, c)
}

fn ledger(k: u64) -> Vec<u8> {
    let mut req = LEDGER.to_vec();
    req.extend_from_slice(&k.to_le_bytes());
    req
}

/// Poll until `f` accepts an error (bounded); panics with what was seen otherwise.
fn poll_until_err(
    c: &mut Client,
    what: &str,
    mut f: impl FnMut(&ClientError) -> bool,
) -> ClientError {
    let t = Instant::now();
    loop {
        match c.poll_response() {
            Err(e) if f(&e) => return e,
            Err(e) => panic!("{what}: unexpected error {e:?}"),
            Ok(_) => {}
        }
        assert!(t.elapsed() < LONG, "{what}: no error within {LONG:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// `down` marks the control block: a client's next poll says `ClusterDown`, also inside
/// `call`, and `connect` refuses; once the cluster's files are removed, a client learns it
/// from the files as well.
#[test]
fn a_client_is_told_the_cluster_is_down() {
    let (mut e, c) = pair("down");
    let mut cl = Client::connect(&e.dir).unwrap();
    assert_eq!(
        cl.call(&ledger(1), LONG).unwrap(),
        Some(1u64.to_le_bytes().to_vec())
    );
    let mut other = Client::connect(&e.dir).unwrap();
    c.set_cluster_state(ClusterState::Down);
    assert!(
        matches!(cl.poll_response(), Err(ClientError::ClusterDown)),
        "told at the next poll"
    );
    assert!(matches!(
        cl.call(&ledger(2), LONG),
        Err(ClientError::ClusterDown)
    ));
    assert!(
        matches!(Client::connect(&e.dir), Err(ClientError::ClusterDown)),
        "no new connection to a cluster being stopped"
    );
    // The operator's down goes on: engines stopped, files removed.
    c.set_cluster_state(ClusterState::Up);
    assert!(matches!(other.poll_response(), Ok(None)));
    e.kill(1);
    e.kill(0);
    std::fs::remove_dir_all(&e.dir).unwrap();
    let err = poll_until_err(&mut other, "files removed", |e| {
        matches!(e, ClientError::ClusterDown)
    });
    assert!(err.to_string().contains("down"), "{err}");
}

/// Both engines SIGKILLed: a client with a request in flight is told `NoActive` once its
/// bound has passed (not before), by `poll_response` and by `call`, instead of waiting
/// forever. A failover before that, within the bound, stays silent.
#[test]
fn a_client_is_told_of_an_outage_after_its_bound_and_not_of_a_failover() {
    let (mut e, c) = pair("outage");
    let mut cl = Client::connect(&e.dir).unwrap();
    let bound = Duration::from_millis(500);
    cl.set_no_active_bound(bound);
    assert!(cl.call(&ledger(1), LONG).unwrap().is_some());
    // A failover: silent, the call is answered by the new active.
    let ups = c.get(1, Field::StepUps);
    e.kill(0);
    assert_eq!(
        cl.call(&ledger(2), LONG).unwrap(),
        Some(1u64.to_le_bytes().to_vec()),
        "answered across the failover"
    );
    assert!(c.get(1, Field::StepUps) > ups);
    // The outage: the new active dies too, with no standby.
    e.kill(1);
    let killed_ns = monotonic_ns();
    cl.submit(&ledger(3)).unwrap();
    let err = poll_until_err(&mut cl, "outage", |e| {
        matches!(e, ClientError::NoActive { .. })
    });
    let ClientError::NoActive { since_ns } = err else {
        unreachable!()
    };
    let now = monotonic_ns();
    assert!(
        since_ns >= killed_ns.saturating_sub(50_000_000),
        "since is when the client saw no active"
    );
    assert!(
        now - since_ns >= bound.as_nanos() as u64,
        "not reported before the bound"
    );
    assert!(
        err.to_string().contains("no engine has been active"),
        "{err}"
    );
    // `call` reports it too, rather than timing out in silence.
    assert!(matches!(
        cl.call(&ledger(4), LONG),
        Err(ClientError::NoActive { .. })
    ));
}

/// A client whose ring header is damaged is dropped by the new active at a failover (it
/// cannot open the rings): the client is told `ClientClosed { Unusable }` instead of hearing
/// nothing, and another client is served on. A client sending garbage is told `Malformed`.
#[test]
fn a_client_is_told_why_its_rings_were_closed() {
    let (mut e, c) = pair("closed");
    let mut good = Client::connect(&e.dir).unwrap();
    let mut damaged = Client::connect(&e.dir).unwrap();
    let mut garbage = Client::connect(&e.dir).unwrap();
    for cl in [&mut good, &mut damaged, &mut garbage] {
        assert!(cl.call(&ledger(cl.id()), LONG).unwrap().is_some());
    }
    assert!(garbage.submit_raw(99, b"not a request"));
    let err = poll_until_err(&mut garbage, "garbage", |e| {
        matches!(e, ClientError::ClientClosed { .. })
    });
    assert!(
        matches!(
            err,
            ClientError::ClientClosed {
                reason: CloseReason::Malformed
            }
        ),
        "{err:?}"
    );
    // Damage the magic of the damaged client's request ring, then fail over.
    let path = Control::client_in_path(&e.dir, damaged.id());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&0xBAD_BAD_BADu64.to_le_bytes(), 0).unwrap();
    let ups = c.get(1, Field::StepUps);
    e.kill(0);
    wait_until("b active", LONG, || {
        c.get(1, Field::StepUps) > ups && role(&c, 1) == Role::Active
    });
    let err = poll_until_err(&mut damaged, "damaged ring", |e| {
        matches!(e, ClientError::ClientClosed { .. })
    });
    assert!(
        matches!(
            err,
            ClientError::ClientClosed {
                reason: CloseReason::Unusable
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("could not be opened"), "{err}");
    for k in 0..20 {
        assert_eq!(
            good.call(&ledger(1000 + k), LONG).unwrap(),
            Some(1u64.to_le_bytes().to_vec()),
            "the good client is served on"
        );
    }
}

/// `call` keeps the answers to other requests in flight and `poll_response` returns them
/// afterwards, in order.
#[test]
fn call_keeps_the_answers_to_other_requests() {
    let (_e, _c) = pair("call");
    let mut cl = Client::connect(&_e.dir).unwrap();
    let s1 = cl.submit(&ledger(11)).unwrap();
    let s2 = cl.submit(&ledger(11)).unwrap();
    assert_eq!(
        cl.call(&ledger(11), LONG).unwrap(),
        Some(3u64.to_le_bytes().to_vec()),
        "the call's own answer: the third application of key 11"
    );
    assert_eq!(
        cl.wait_response(LONG).unwrap(),
        Some((s1, 1u64.to_le_bytes().to_vec()))
    );
    assert_eq!(
        cl.wait_response(LONG).unwrap(),
        Some((s2, 2u64.to_le_bytes().to_vec()))
    );
    assert_eq!(cl.poll_response().unwrap(), None);
}

/// A response larger than the client's response ring is refused at the source: the engine's
/// client path sends `ResponseTooLarge` in its place, the client decodes it, stays connected
/// and gets the next response. (In one process: the testkit's handlers answer a few bytes.)
#[test]
fn a_response_too_large_for_the_ring_is_refused_and_the_client_stays() {
    let e = Engines::new("toolarge");
    let _control = Control::open_or_create(&e.dir).unwrap();
    let mut input = ClientInput::new(&e.dir).unwrap();
    let mut cl = Client::connect_with(&e.dir, 4096).unwrap();
    input.resume(&Store::new());
    let mut buf = Vec::new();
    let mut serve = |input: &mut ClientInput, response: &[u8]| {
        let t = Instant::now();
        loop {
            if let Some(meta) = input.poll(&mut buf) {
                input.committed(&meta, response);
                return meta.request_seq;
            }
            assert!(t.elapsed() < LONG, "request not seen");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let s1 = cl.submit(b"big").unwrap();
    assert_eq!(serve(&mut input, &vec![7u8; 64 * 1024]), s1);
    match cl.poll_response() {
        Err(ClientError::ResponseTooLarge {
            request_seq,
            found,
            max,
        }) => {
            assert_eq!((request_seq, found), (s1, 64 * 1024));
            assert!(max > 0 && max < 64 * 1024);
        }
        other => panic!("expected ResponseTooLarge, found {other:?}"),
    }
    let s2 = cl.submit(b"small").unwrap();
    assert_eq!(serve(&mut input, b"ok"), s2);
    assert_eq!(cl.poll_response().unwrap(), Some((s2, b"ok".to_vec())));
    assert_eq!(input.clients(), 1, "the client is still connected");
}

/// `connect_timeout` waits for a cluster that is not there yet, and gives up with the last
/// error after its timeout.
#[test]
fn connect_timeout_waits_for_the_cluster() {
    let mut e = Engines::new("connect");
    let nowhere = e.dir.join("nowhere");
    assert!(matches!(
        Client::connect_timeout(&nowhere, Duration::from_millis(50)),
        Err(ClientError::Control(_))
    ));
    let dir = e.dir.clone();
    let waiter = std::thread::spawn(move || Client::connect_timeout(&dir, LONG).map(|c| c.id()));
    std::thread::sleep(Duration::from_millis(200));
    e.spawn_testapp(0, false, &[]);
    assert!(
        waiter.join().unwrap().is_ok(),
        "connected once the cluster came up"
    );
}

/// One flipped bit in either copy of every checked control-block word, with engine a active
/// and b a hot standby: `verify` names the word, the engines repair it within milliseconds,
/// no decision changes (no engine dies, no role changes, the epoch stays) and requests are
/// served throughout. Then a word lost in both copies (a's role, the epoch) is rewritten by
/// the live active from its own view.
#[test]
fn flipped_control_words_are_named_and_repaired_by_live_engines() {
    let (mut e, c) = pair("flips");
    let mut cl = Client::connect(&e.dir).unwrap();
    let before = (
        c.epoch(),
        c.active_slot(),
        c.get(0, Field::Pid),
        c.get(1, Field::Pid),
    );
    let (mut flips, mut named) = (0u32, 0u32);
    for word in Word::all() {
        for (offset, damage) in [
            (word.primary_offset(), Damage::Primary),
            (word.mirror_offset(), Damage::Mirror),
        ] {
            for bit in [0u32, 17, 47, 55, 63] {
                assert!(c.flip_bits(offset, 1 << bit));
                flips += 1;
                // An engine may repair it before we look (every ~10 ms): usually named.
                if c.verify()
                    .iter()
                    .any(|f| f.word == word && f.damage == damage)
                {
                    named += 1;
                }
                assert_eq!(
                    (c.epoch(), c.active_slot()),
                    (before.0, before.1),
                    "{word}: reads unchanged"
                );
                wait_until(&format!("{word} bit {bit}: repaired"), LONG, || {
                    c.verify().is_empty()
                });
            }
        }
        assert!(
            cl.call(&ledger(7), LONG).unwrap().is_some(),
            "{word}: served"
        );
    }
    eprintln!("{flips} flips, {named} seen named before the engines repaired them");
    assert!(
        named * 2 > flips,
        "most flips are named: {named} of {flips}"
    );
    // Both copies lost: the live engines rewrite them from their own view.
    for word in [
        Word::Slot {
            slot: 0,
            field: Field::Role,
        },
        Word::Slot {
            slot: 1,
            field: Field::State,
        },
        Word::Epoch,
        Word::ActiveSlot,
    ] {
        assert!(c.flip_bits(word.primary_offset(), 1 << 5));
        assert!(c.flip_bits(word.mirror_offset(), 1 << 33));
        wait_until(&format!("{word}: both copies rewritten"), LONG, || {
            c.verify().is_empty()
        });
    }
    assert!(e.all_running(), "no engine died");
    assert_eq!(
        (
            c.epoch(),
            c.active_slot(),
            c.get(0, Field::Pid),
            c.get(1, Field::Pid)
        ),
        before,
        "same engines, same roles, same epoch"
    );
    assert_eq!(role(&c, 0), Role::Active);
    wait_until("b hot", LONG, || state(&c, 1) == State::Hot);
    assert!(cl.call(&ledger(8), LONG).unwrap().is_some());
}
