//! matchbook on real engine processes under load from the load generator: a failover, a
//! switchover and a rolling upgrade from v1 to v2 done step by step through the control block;
//! the final books and positions must equal the reference model fed the acknowledged orders.

use matchbook::loadgen::{check_against_model, model_of, LoadConfig, LoadGen};
use std::process::{Command, Stdio};
use understudy_runtime::control::{cmd, Control, Field, Role, State};
use understudy_test_support::cluster::{switchover, Engines, LONG};
use understudy_test_support::wait_until;

const V1: &str = env!("CARGO_BIN_EXE_matchbook-v1");
const V2: &str = env!("CARGO_BIN_EXE_matchbook-v2");

/// Starts engine `bin` in `slot` of `cl` (a previous one there is killed first).
fn spawn(cl: &mut Engines, bin: &str, slot: usize) {
    let mut c = Command::new(bin);
    c.args(cl.engine_args(slot, false))
        .env("RUST_LOG", "warn")
        .env("UNDERSTUDY_BACKPRESSURE_MS", "500")
        // Hang detection is not under test: a starved debug engine must not be fenced.
        .env("UNDERSTUDY_HUNG_MS", "10000")
        .stdout(Stdio::null());
    if std::env::var("US_VERBOSE").is_err() {
        c.stderr(Stdio::null());
    }
    cl.start(slot, &mut c);
}

/// The v1 → v2 rolling upgrade under load ends with books and positions equal to the model,
/// with nothing lost or duplicated; icebergs are refused until the feature is enabled.
#[test]
fn rolling_upgrade_under_load_matches_the_model() {
    let mut cl = Engines::new("matchbook");
    let dir = cl.dir.clone();
    let c = Control::open_or_create(&dir).unwrap();
    let hot = |c: &Control, s: usize| State::from_word(c.get(s, Field::State)) == State::Hot;
    spawn(&mut cl, V1, 0);
    wait_until("a active", LONG, || {
        Role::from_word(c.get(0, Field::Role)) == Role::Active
    });
    spawn(&mut cl, V1, 1);
    wait_until("b hot", LONG, || hot(&c, 1));
    let mut cfg = LoadConfig::new(&dir);
    cfg.rate_per_client = 5_000;
    let load = LoadGen::start(&cfg).unwrap();
    let settle = |load: &LoadGen| {
        let a = load.acked();
        wait_until("load flowing", LONG, || load.acked() > a + 500);
    };
    settle(&load);
    // Failover.
    cl.kill(0);
    wait_until("b steps up", LONG, || {
        Role::from_word(c.get(1, Field::Role)) == Role::Active
    });
    spawn(&mut cl, V1, 0);
    wait_until("a hot", LONG, || hot(&c, 0));
    settle(&load);
    // Switchover back.
    switchover::to(&c, 0);
    wait_until("b hot", LONG, || hot(&c, 1));
    settle(&load);
    // Rolling upgrade: b out of service, v2 in b, attach (catch-up), switch over, then a.
    c.set(1, Field::Cmd, understudy_runtime::control::slot_cmd::STOP);
    wait_until("b stopped", LONG, || {
        State::from_word(c.get(1, Field::State)) == State::Stopped
    });
    cl.kill(1);
    spawn(&mut cl, V2, 1);
    wait_until("b (v2) hot", LONG, || hot(&c, 1));
    // While one engine is v1 the feature cannot be enabled.
    let seq = c.post(cmd::ENABLE_FEATURES, 1);
    wait_until("enable answered", LONG, || c.acked().0 == seq);
    assert_ne!(
        c.acked().1,
        0,
        "iceberg must not be enabled while a v1 engine runs"
    );
    settle(&load);
    switchover::to(&c, 1);
    settle(&load);
    c.set(0, Field::Cmd, understudy_runtime::control::slot_cmd::STOP);
    wait_until("a stopped", LONG, || {
        State::from_word(c.get(0, Field::State)) == State::Stopped
    });
    cl.kill(0);
    spawn(&mut cl, V2, 0);
    wait_until("a (v2) hot", LONG, || hot(&c, 0));
    settle(&load);
    let seq = c.post(cmd::ENABLE_FEATURES, 1);
    wait_until("enable answered", LONG, || c.acked().0 == seq);
    assert_eq!(c.acked().1, 0, "enable refused with both engines on v2");
    load.icebergs
        .store(true, std::sync::atomic::Ordering::Relaxed);
    settle(&load);
    let report = load.stop().unwrap();
    assert_eq!(report.total(|c| c.lost), 0, "lost requests");
    assert_eq!(report.total(|c| c.duplicated), 0, "duplicated responses");
    let icebergs_acked = report
        .clients
        .iter()
        .flat_map(|c| c.answered.iter())
        .filter(|a| a.request.kind == 1 && a.response.status == matchbook::app::status::ACK)
        .count();
    assert!(
        icebergs_acked > 0,
        "icebergs must be accepted once the feature is on"
    );
    let model = model_of(&report).unwrap();
    check_against_model(&dir, &model, cfg.symbols, cfg.accounts).unwrap();
}
