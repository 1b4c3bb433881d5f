//! matchbook on real engine processes under load from the load generator: a failover, a
//! switchover and a rolling upgrade from v1 to v2 done step by step through the control block;
//! the final books and positions must equal the reference model fed the acknowledged orders.

use matchbook::loadgen::{check_against_model, model_of, LoadConfig, LoadGen};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use understudy_runtime::control::{cmd, Control, Field, Role, State};

const V1: &str = env!("CARGO_BIN_EXE_matchbook-v1");
const V2: &str = env!("CARGO_BIN_EXE_matchbook-v2");

struct Cluster {
    dir: PathBuf,
    kids: Vec<(usize, Child)>,
}

impl Cluster {
    fn spawn(&mut self, bin: &str, slot: usize) {
        let mut c = Command::new(bin);
        c.args([
            "--dir",
            self.dir.to_str().unwrap(),
            "--slot",
            ["a", "b", "c"][slot],
        ])
        .env("RUST_LOG", "warn")
        .env("UNDERSTUDY_BACKPRESSURE_MS", "500")
        // Hang detection is not under test: a starved debug engine must not be fenced.
        .env("UNDERSTUDY_HUNG_MS", "10000")
        .stdout(Stdio::null());
        if std::env::var("US_VERBOSE").is_err() {
            c.stderr(Stdio::null());
        }
        self.kids.retain(|(s, _)| *s != slot);
        self.kids.push((slot, c.spawn().unwrap()));
    }
    fn kill(&mut self, slot: usize) {
        if let Some(i) = self.kids.iter().position(|(s, _)| *s == slot) {
            let (_, mut k) = self.kids.remove(i);
            let _ = k.kill();
            let _ = k.wait();
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, k) in &mut self.kids {
            let _ = k.kill();
            let _ = k.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn switchover(c: &Control, to: usize) {
    let seq = c.post(cmd::SWITCHOVER, to as u64);
    wait("switchover acked", || c.acked().0 == seq);
    assert_eq!(c.acked().1, 0, "switchover to {to} refused");
    wait("target active", || {
        Role::from_word(c.get(to, Field::Role)) == Role::Active
    });
}

/// The v1 → v2 rolling upgrade under load ends with books and positions equal to the model,
/// with nothing lost or duplicated; icebergs are refused until the feature is enabled.
#[test]
fn rolling_upgrade_under_load_matches_the_model() {
    let dir = PathBuf::from(format!(
        "/dev/shm/understudy-test-{}-matchbook",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cl = Cluster {
        dir: dir.clone(),
        kids: vec![],
    };
    let c = Control::open_or_create(&dir).unwrap();
    let hot = |c: &Control, s: usize| State::from_word(c.get(s, Field::State)) == State::Hot;
    cl.spawn(V1, 0);
    wait("a active", || {
        Role::from_word(c.get(0, Field::Role)) == Role::Active
    });
    cl.spawn(V1, 1);
    wait("b hot", || hot(&c, 1));
    let mut cfg = LoadConfig::new(&dir);
    cfg.rate_per_client = 5_000;
    let load = LoadGen::start(&cfg).unwrap();
    let settle = |load: &LoadGen| {
        let a = load.acked();
        wait("load flowing", || load.acked() > a + 500);
    };
    settle(&load);
    // Failover.
    cl.kill(0);
    wait("b steps up", || {
        Role::from_word(c.get(1, Field::Role)) == Role::Active
    });
    cl.spawn(V1, 0);
    wait("a hot", || hot(&c, 0));
    settle(&load);
    // Switchover back.
    switchover(&c, 0);
    wait("b hot", || hot(&c, 1));
    settle(&load);
    // Rolling upgrade: b out of service, v2 in b, attach (catch-up), switch over, then a.
    c.set(1, Field::Cmd, understudy_runtime::control::slot_cmd::STOP);
    wait("b stopped", || {
        State::from_word(c.get(1, Field::State)) == State::Stopped
    });
    cl.kill(1);
    cl.spawn(V2, 1);
    wait("b (v2) hot", || hot(&c, 1));
    // While one engine is v1 the feature cannot be enabled.
    let seq = c.post(cmd::ENABLE_FEATURES, 1);
    wait("enable answered", || c.acked().0 == seq);
    assert_ne!(
        c.acked().1,
        0,
        "iceberg must not be enabled while a v1 engine runs"
    );
    settle(&load);
    switchover(&c, 1);
    settle(&load);
    c.set(0, Field::Cmd, understudy_runtime::control::slot_cmd::STOP);
    wait("a stopped", || {
        State::from_word(c.get(0, Field::State)) == State::Stopped
    });
    cl.kill(0);
    cl.spawn(V2, 0);
    wait("a (v2) hot", || hot(&c, 0));
    settle(&load);
    let seq = c.post(cmd::ENABLE_FEATURES, 1);
    wait("enable answered", || c.acked().0 == seq);
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
