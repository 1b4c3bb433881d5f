//! Bulk transactions: a handler that loads thousands of work units and records in one
//! transaction, reading each back through the transaction (`Tx::unit`, `Tx::get` and the typed
//! readers), sees its own changes and builds exactly the state it wrote; the cost of those
//! reads does not grow with the transaction's size (printed for 500 and 5,000 units: a linear
//! scan of the transaction's own changes made the 5,000-unit load about 100× the 500-unit one
//! instead of about 10×). No wall-clock assert: the figures are printed for the README.
//!
//! An engine alone (no standby) applies the same stream limit as one with a standby.
//!
//! Run with `cargo test --release -p understudy-runtime --test bulk -- --nocapture` for the
//! figures.

use std::time::Instant;
use understudy_runtime::engine::{execute_local, InputMeta};
use understudy_runtime::store::Store;
use understudy_runtime::{Application, Refused, TemplateInfo, Tx};

const TABLE: u16 = 9;

/// `n` (u64 LE): register units 0..n (each only if the transaction does not hold it yet),
/// put a record per unit, then read every unit and record back and update each unit once.
struct Bulk;

impl Application for Bulk {
    fn name(&self) -> &str {
        "bulk"
    }
    fn version(&self) -> u32 {
        1
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        Vec::new()
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        let n = u64::from_le_bytes(req[..8].try_into().expect("8 bytes"));
        for id in 0..n {
            if tx.unit(id).is_none() {
                tx.register(id, 1, 1, &id.to_le_bytes());
            }
            if tx.get(TABLE, &id.to_le_bytes()).is_none() {
                tx.put(TABLE, &id.to_le_bytes(), &(id * 2).to_le_bytes());
            }
        }
        let mut sum = 0u64;
        for id in 0..n {
            let u = tx
                .unit(id)
                .ok_or_else(|| Refused(b"lost a unit".to_vec()))?;
            let v = u64::from_le_bytes(u.state.try_into().expect("8"));
            let r = tx
                .get(TABLE, &id.to_le_bytes())
                .ok_or_else(|| Refused(b"lost a record".to_vec()))?;
            sum += v + u64::from_le_bytes(r.try_into().expect("8"));
            tx.update(id, 1, 1, &(v + 1).to_le_bytes());
        }
        // A unit retired and a record deleted inside the transaction read as gone.
        if n > 0 {
            tx.retire(0);
            tx.delete(TABLE, &0u64.to_le_bytes());
            if tx.unit(0).is_some() || tx.get(TABLE, &0u64.to_le_bytes()).is_some() {
                return Err(Refused(b"retired unit still visible".to_vec()));
            }
        }
        tx.respond(&sum.to_le_bytes());
        Ok(())
    }
}

fn load(n: u64) -> (Store, Vec<u8>, f64) {
    let mut store = Store::new();
    let meta = InputMeta {
        source: 1,
        request_seq: 1,
        next_pos: 1,
        next_seq: 1,
    };
    let t = Instant::now();
    let resp = execute_local(&mut Bulk, &mut store, 0, &meta, &n.to_le_bytes());
    (store, resp, t.elapsed().as_secs_f64() * 1e3)
}

/// A 5,000-unit load sees every one of its own changes and commits exactly them.
#[test]
fn a_bulk_transaction_reads_its_own_changes_and_commits_them() {
    for n in [3u64, 20, 5_000] {
        let (store, resp, _) = load(n);
        let sum: u64 = (0..n).map(|id| id + id * 2).sum();
        assert_eq!(resp, sum.to_le_bytes(), "response of a {n}-unit load");
        assert_eq!(
            store.unit_count() as u64,
            n - 1,
            "units after a {n}-unit load"
        );
        for id in 1..n {
            let u = store.unit(id).expect("unit");
            assert_eq!(u.state, (id + 1).to_le_bytes(), "unit {id}");
            assert_eq!(
                store.get(TABLE, &id.to_le_bytes()),
                Some(&(id * 2).to_le_bytes()[..])
            );
        }
        assert!(store.unit(0).is_none() && store.get(TABLE, &0u64.to_le_bytes()).is_none());
    }
}

/// The figures: the best of 5 runs of a 500- and a 5,000-unit load (printed, not asserted).
#[test]
fn bulk_load_cost_is_printed() {
    let best = |n: u64| (0..5).map(|_| load(n).2).fold(f64::INFINITY, f64::min);
    let (small, big) = (best(500), best(5_000));
    println!(
        "bulk load: 500 units {small:.3} ms, 5000 units {big:.3} ms (ratio {:.1}; linear would be ~10)",
        big / small
    );
}

/// `n` (u64 LE) bytes in 64 KiB records of table 11, in one transaction; with a trailing 1, the
/// handler checks `Tx::check_fits` after each record and refuses itself.
struct Big;

impl Application for Big {
    fn name(&self) -> &str {
        "big"
    }
    fn version(&self) -> u32 {
        1
    }
    fn templates(&self) -> Vec<TemplateInfo> {
        Vec::new()
    }
    fn handle(&mut self, tx: &mut Tx<'_>, req: &[u8]) -> Result<(), Refused> {
        let n = u64::from_le_bytes(req[..8].try_into().expect("8 bytes")) as usize;
        let check = req.get(8) == Some(&1);
        let chunk = vec![1u8; 64 << 10];
        let mut i = 0u64;
        while (i as usize) * chunk.len() < n {
            tx.put(11, &i.to_le_bytes(), &chunk);
            i += 1;
            if check {
                tx.check_fits()?;
            }
        }
        tx.respond(b"ok");
        Ok(())
    }
}

/// The limit holds on an engine's transaction path with no standby at all (the model every
/// engine runs): a transaction over `Tx::limit` is refused, its changes rolled back, its
/// answer the `TxTooLarge` message; a handler can find out first with `Tx::check_fits`; one
/// under the limit commits.
#[test]
fn a_transaction_over_the_limit_is_refused_without_a_standby() {
    let meta = InputMeta {
        source: 1,
        request_seq: 1,
        next_pos: 1,
        next_seq: 1,
    };
    let limit = (8 << 20) - 32;
    for check in [false, true] {
        let mut store = Store::new();
        let mut req = (9u64 << 20).to_le_bytes().to_vec();
        if check {
            req.push(1);
        }
        let resp = execute_local(&mut Big, &mut store, 0, &meta, &req);
        let text = String::from_utf8_lossy(&resp).into_owned();
        assert!(
            text.starts_with("transaction too large for the replication stream")
                && text.contains(&format!("expected at most {limit} bytes")),
            "check_fits {check}: {text}"
        );
        assert_eq!(store.table(11).count(), 0, "nothing of it applied");
    }
    let mut store = Store::new();
    let resp = execute_local(&mut Big, &mut store, 0, &meta, &(7u64 << 20).to_le_bytes());
    assert_eq!(resp, b"ok");
    assert_eq!(store.table(11).count(), 7 * 16);
}

/// The cost of a small transaction (4 read-modify-write unit updates and a record, the
/// replication benchmark's shape) through `execute` and `TxBuffers::apply_to`: what the size
/// count and the index's upkeep add to every request (printed, best of 5 runs of 200,000 in a
/// release build).
#[test]
fn small_transaction_cost_is_printed() {
    use understudy_runtime::app::write_versions;
    use understudy_runtime::engine::{execute, TxBuffers};
    let mut app = understudy_testkit::Update4 {
        units: 256,
        table: Some(7),
    };
    let wv = write_versions(&app.templates(), &app.features(), 0);
    let mut store = app.store();
    let mut tx = TxBuffers::new();
    let mut best = f64::INFINITY;
    let mut k = 0u64;
    // A debug build (the CI run) checks it runs; the figure is a release build's.
    let n = if cfg!(debug_assertions) {
        10_000
    } else {
        200_000
    };
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            k += 1;
            let meta = InputMeta {
                source: 1,
                request_seq: k,
                next_pos: k + 1,
                next_seq: k + 1,
            };
            execute(&mut app, &store, &mut tx, 0, &wv, &meta, &k.to_le_bytes());
            tx.apply_to(&mut store);
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    println!("small transaction (4 unit updates + 1 record): {best:.1} ns");
}

/// Not a test: the test engine v1 when [`a_standalone_engine_refuses_an_oversize_transaction`]
/// runs this binary again (an integration test only gets its own package's executables).
#[test]
#[ignore = "the test engine the standalone-engine test starts"]
fn testapp_engine() {
    if let Ok(a) = std::env::var(understudy_testkit::ENGINE_ARGS_VAR) {
        let args: Vec<String> = a.lines().map(String::from).collect();
        std::process::exit(understudy_testkit::engine_process_with(1, &args).into());
    }
}

/// An engine alone (no standby ever attached) refuses a transaction over the stream's limit as
/// an engine with a standby does: the 9 MiB write answered with the `TxTooLarge` refusal, a
/// 2 MiB one committed, then an ordinary request served.
#[test]
fn a_standalone_engine_refuses_an_oversize_transaction() {
    use std::process::{Command, Stdio};
    use std::time::Duration;
    use understudy_runtime::client::Client;
    use understudy_test_support::cluster::Engines;

    // The workspace harness kills the engine and removes the cluster's files, whatever the
    // test did.
    let mut engines = Engines::new("bulk-alone");
    let dir = engines.dir.clone();
    let mut args = engines.engine_args(0, false);
    args.extend([
        "--clients".into(),
        "--ring".into(),
        (8u64 << 20).to_string(),
    ]);
    engines.start(
        0,
        Command::new(std::env::current_exe().expect("current_exe"))
            .args([
                "--exact",
                "testapp_engine",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(understudy_testkit::ENGINE_ARGS_VAR, args.join("\n"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    let mut c = Client::connect_timeout(&dir, Duration::from_secs(30)).expect("client");
    let write = |c: &mut Client, bytes: u64| {
        let mut req = understudy_testkit::BIG_WRITE.to_vec();
        req.extend_from_slice(&bytes.to_le_bytes());
        c.call(&req, Duration::from_secs(60))
            .expect("call")
            .expect("an answer")
    };
    let text = String::from_utf8_lossy(&write(&mut c, 9 << 20)).into_owned();
    assert!(
        text.starts_with("transaction too large for the replication stream")
            && text.contains(&format!("expected at most {} bytes", (8 << 20) - 32)),
        "{text}"
    );
    assert_eq!(&write(&mut c, 2 << 20)[..2], b"ok");
    let mut req = understudy_testkit::COUNTER.to_vec();
    req.extend_from_slice(&7u64.to_le_bytes());
    let a = c.call(&req, Duration::from_secs(30)).expect("call");
    assert_eq!(a, Some(1u64.to_le_bytes().to_vec()), "the next request");
}
