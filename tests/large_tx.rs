//! A transaction larger than the replication stream is refused before anything is applied or
//! replicated, and the standby stays hot: a real cluster of the test application under its
//! supervisor (default 8 MiB stream ring), a request whose handler writes 9 MiB in one
//! transaction, answered with the `TxTooLarge` refusal naming the limit and the size found;
//! no standby untethered (control block and supervisor status), nothing of it in the state,
//! and the next requests — a 2 MiB bulk write and the load client's — served as usual.
//!
//! Before this refusal, such a transaction failed its push with `PushError::TooLarge` and the
//! active untethered every standby.
//!
//! The engines are the testkit's `understudy-testapp-v1`/`-v2` (`cargo build --workspace
//! --bins` first with `-p understudy`).

use std::path::Path;
use std::time::Duration;

use understudy::torture::{Cluster, Load};
use understudy_runtime::client::Client;
use understudy_runtime::control::{self, Control, Field, State};
use understudy_testkit::BIG_WRITE;

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

fn big_write(c: &Cluster, client: &mut Client, bytes: u64) -> Vec<u8> {
    let mut req = BIG_WRITE.to_vec();
    req.extend_from_slice(&bytes.to_le_bytes());
    match client.call(&req, Duration::from_secs(60)) {
        Ok(Some(a)) => a,
        other => panic!(
            "a {bytes}-byte write: expected an answer, found {other:?}\nsupervisor log:\n{}",
            c.log_tail(60)
        ),
    }
}

/// A 9 MiB transaction is refused with the limit and its size; the standby stays hot (same
/// pid, state Hot, no untether logged); a 2 MiB one and the load's requests go through.
#[test]
fn a_transaction_larger_than_the_stream_is_refused_and_the_standby_stays_hot() {
    for v in [1, 2] {
        understudy_test_support::cluster::testapp(Path::new(CLI), v);
    }
    let mut c = Cluster::new(Path::new(CLI), "large-tx", "info").expect("cluster");
    let s0 = c
        .up()
        .unwrap_or_else(|e| panic!("{e}\nsupervisor log:\n{}", c.log_tail(60)));
    let load = Load::start(&c.dir, 1, Duration::from_micros(300)).expect("load client");
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        panic!("{e}\nsupervisor log:\n{}", c.log_tail(60));
    }
    let standby = s0.hot_standbys().next().expect("a hot standby").clone();
    let active = s0.active_engine().expect("an active").clone();
    let slot = |name: &str| control::slot_index(name).expect("slot name");
    let ctl = Control::open(&c.dir).expect("control block");
    let refusals0 = ctl.get(slot(&active.slot), Field::Refusals);
    let mut client = Client::connect(&c.dir).expect("client");

    // 9 MiB: more than one batch of the 8 MiB ring can carry.
    let answer = big_write(&c, &mut client, 9 << 20);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let limit = (8 << 20) - 32;
    assert!(
        text.starts_with("transaction too large for the replication stream")
            && text.contains(&format!("expected at most {limit} bytes")),
        "expected the TxTooLarge refusal naming the limit {limit}, found: {text}"
    );
    let found: u64 = text
        .split("found ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size found in: {text}"));
    assert!(
        found > 9 << 20,
        "the size found ({found}) covers the 9 MiB written"
    );
    // The engine publishes its counts between requests: wait for it, bounded.
    let mut refusals = 0;
    for _ in 0..500 {
        refusals = ctl.get(slot(&active.slot), Field::Refusals);
        if refusals > refusals0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(refusals, refusals0 + 1, "counted as one refusal");

    // The standby stays hot: no untether, no re-attach.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        State::from_word(ctl.get(slot(&standby.slot), Field::State)),
        State::Hot,
        "the standby's state in the control block\nsupervisor log:\n{}",
        c.log_tail(40)
    );
    let s1 = c.wait_settled(Duration::from_secs(10)).expect("settled");
    let hot: Vec<_> = s1.hot_standbys().map(|e| e.pid).collect();
    assert_eq!(hot, vec![standby.pid], "the same standby, still hot");
    assert_eq!(s1.active_engine().map(|e| e.pid), Some(active.pid));

    // Nothing of the refused transaction is in the state; a 2 MiB one goes through.
    let answer = big_write(&c, &mut client, 2 << 20);
    assert_eq!(&answer[..2], b"ok", "{}", String::from_utf8_lossy(&answer));
    let len = u64::from_le_bytes(answer[2..10].try_into().expect("8"));
    let lim = u64::from_le_bytes(answer[10..18].try_into().expect("8"));
    assert_eq!(lim, limit as u64, "Tx::limit");
    assert!(
        len > 2 << 20 && len <= lim,
        "Tx::encoded_len {len} of a 2 MiB write"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        State::from_word(ctl.get(slot(&standby.slot), Field::State)),
        State::Hot,
        "the standby after a 2 MiB transaction"
    );
    let totals = load.finish();
    let log = c.log_text();
    assert!(
        !log.contains("untethered"),
        "a standby was untethered:\n{}",
        c.log_tail(60)
    );
    assert!(totals.acknowledged > 0, "no load request was acknowledged");
    assert_eq!(
        (totals.lost, totals.duplicated),
        (0, 0),
        "lost or duplicated requests: {:?}",
        totals.errors
    );
    assert!(
        totals.errors.is_empty(),
        "client errors: {:?}",
        totals.errors
    );
}
