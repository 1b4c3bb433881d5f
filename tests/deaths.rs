//! Every way an engine process can end is a failover (for the active) or a standby restart
//! (for the standby), with nothing acknowledged lost or duplicated: one end-to-end test per
//! death and role, with real processes, a real supervisor and shared-memory clients under
//! load; and a release that panics once active, rolled back by the upgrade's acceptance check.
//!
//! The deaths that need a cooperating binary come from the test application's fault requests
//! ([`understudy_testkit::Fault`]), fired once per token file: in the request handler
//! of the active, or in the apply hook of the standby. Signals are sent to the engine's pid.
//!
//! The engines are the testkit's test executables `understudy-testapp-v1`/`-v2`, found next
//! to `understudy` in the target directory (`cargo test --workspace` builds them; with
//! `-p understudy` alone run `cargo build --workspace --bins` first).
//!
//! Each test: a cluster with an active and a hot standby, two load clients each counting its
//! own requests (the n-th answer must be n), the death, then: the standby stepped up (if the
//! active died), the supervisor restarted the dead engine and it is a hot standby again, the
//! supervisor's log names the death as the dead process's exit, no outage was reported, and
//! every client's answers — and its counter read back at the end — match its count.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use understudy::torture::{Cluster, Death, Load, Signal, Target};
use understudy_runtime::client::Client;
use understudy_supervisor::proto::Code;
use understudy_testkit::Fault;

const CLI: &str = env!("CARGO_BIN_EXE_understudy");

fn testapp(version: u32) -> PathBuf {
    understudy_test_support::cluster::testapp(Path::new(CLI), version)
}

/// A started cluster with load running; fails with the supervisor's log.
fn cluster(tag: &str) -> (Cluster, Load) {
    testapp(1);
    testapp(2);
    let mut c = Cluster::new(Path::new(CLI), tag, "info").expect("cluster");
    if let Err(e) = c.up() {
        panic!("{e}\nsupervisor log:\n{}", c.log_tail(60));
    }
    let load = Load::start(&c.dir, 2, Duration::from_micros(200)).expect("load clients");
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        panic!("{e}\nsupervisor log:\n{}", c.log_tail(60));
    }
    (c, load)
}

/// What the supervisor must log as the dead process's exit (`None`: a panic, whose exit is the
/// runtime's choice — an abort — and not the test application's).
fn expected_exit(death: Death) -> Option<&'static str> {
    Some(match death {
        Death::Fault(Fault::Panic | Fault::PanicThread | Fault::PanicAfterCommit) => return None,
        Death::Fault(Fault::Exit0 | Fault::ReturnFromMain) => "exit status: 0",
        Death::Fault(Fault::ExitN) => "exit status: 7",
        Death::Fault(Fault::Abort | Fault::StackOverflow | Fault::OutOfMemory) => "SIGABRT",
        Death::Fault(Fault::Segv) => "SIGSEGV",
        Death::Fault(Fault::Bus) => "SIGBUS",
        Death::Signal(s) => s.name(),
    })
}

fn death(death: Death, target: Target) {
    let (mut c, load) = cluster(&format!("death-{}", target.name()));
    let mut faults = Client::connect(&c.dir).expect("fault client");
    let outcome = match c.inflict(death, target, &mut faults) {
        Ok(o) => o,
        Err(e) => panic!("{e}\nsupervisor log:\n{}", c.log_tail(80)),
    };
    assert_eq!(outcome.incident, None, "{}", c.log_tail(80));
    assert_eq!(
        outcome.failover,
        target == Target::Active,
        "a failover must follow the death of the active, and only of the active"
    );
    // The clients go on being answered by the new active.
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        panic!("{e}\nsupervisor log:\n{}", c.log_tail(80));
    }
    drop(faults);
    let totals = load.finish();
    let log = c.log_text();
    let died = log
        .lines()
        .find(|l| l.contains("engine died") && l.contains(&format!("pid={}", outcome.victim_pid)));
    let Some(died) = died else {
        panic!(
            "no `engine died` line for pid {} in the supervisor's log:\n{}",
            outcome.victim_pid,
            c.log_tail(80)
        );
    };
    if let Some(exit) = expected_exit(death) {
        assert!(
            died.contains(exit),
            "expected the death of pid {} as `{exit}`, found: {died}",
            outcome.victim_pid
        );
    }
    assert!(
        !log.contains("outage"),
        "the supervisor reported an outage:\n{}",
        c.log_tail(80)
    );
    assert!(totals.acknowledged > 0, "no request was acknowledged");
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

macro_rules! deaths {
    ($($name:ident: $death:expr, $target:ident;)*) => {
        $(
            #[test]
            fn $name() {
                death($death, Target::$target)
            }
        )*
    };
}

deaths! {
    active_panic_in_handler: Death::Fault(Fault::Panic), Active;
    active_panic_in_another_thread: Death::Fault(Fault::PanicThread), Active;
    active_panic_in_engine_after_commit: Death::Fault(Fault::PanicAfterCommit), Active;
    active_exit_0: Death::Fault(Fault::Exit0), Active;
    active_exit_7: Death::Fault(Fault::ExitN), Active;
    active_return_from_main: Death::Fault(Fault::ReturnFromMain), Active;
    active_abort: Death::Fault(Fault::Abort), Active;
    active_real_sigsegv: Death::Fault(Fault::Segv), Active;
    active_real_sigbus: Death::Fault(Fault::Bus), Active;
    active_stack_overflow: Death::Fault(Fault::StackOverflow), Active;
    active_out_of_memory: Death::Fault(Fault::OutOfMemory), Active;
    active_sigabrt: Death::Signal(Signal::Abrt), Active;
    active_sigsegv_sent: Death::Signal(Signal::Segv), Active;
    active_sigbus_sent: Death::Signal(Signal::Bus), Active;
    active_sigterm: Death::Signal(Signal::Term), Active;
    active_sigkill: Death::Signal(Signal::Kill), Active;

    standby_panic_in_apply_hook: Death::Fault(Fault::Panic), Standby;
    standby_panic_in_another_thread: Death::Fault(Fault::PanicThread), Standby;
    standby_exit_0: Death::Fault(Fault::Exit0), Standby;
    standby_exit_7: Death::Fault(Fault::ExitN), Standby;
    standby_return_from_main: Death::Fault(Fault::ReturnFromMain), Standby;
    standby_abort: Death::Fault(Fault::Abort), Standby;
    standby_real_sigsegv: Death::Fault(Fault::Segv), Standby;
    standby_real_sigbus: Death::Fault(Fault::Bus), Standby;
    standby_stack_overflow: Death::Fault(Fault::StackOverflow), Standby;
    standby_out_of_memory: Death::Fault(Fault::OutOfMemory), Standby;
    standby_sigabrt: Death::Signal(Signal::Abrt), Standby;
    standby_sigsegv_sent: Death::Signal(Signal::Segv), Standby;
    standby_sigbus_sent: Death::Signal(Signal::Bus), Standby;
    standby_sigterm: Death::Signal(Signal::Term), Standby;
    standby_sigkill: Death::Signal(Signal::Kill), Standby;
}

/// An upgrade to a release that panics 300 ms after it becomes active: the acceptance check
/// sees it die, the upgrade rolls back to v1 (exit 6), the clients lose nothing.
#[test]
fn upgrade_to_a_panicking_release_rolls_back() {
    let (c, load) = cluster("panicking-release");
    let script = c.work.join("testapp-v2-panics");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec {} --panic-after-active-ms 300 \"$@\"\n",
            testapp(2).display()
        ),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();

    let out = Command::new(CLI)
        .arg("--config")
        .arg(&c.config)
        .arg("--json")
        .args(["upgrade", "--binary"])
        .arg(&script)
        .args(["--accept-for", "3s"])
        .output()
        .unwrap();
    let code = out.status.code();
    assert_eq!(
        code,
        Some(Code::RolledBack.exit_code()),
        "expected the upgrade to roll back (exit 6); stdout:\n{}\nstderr:\n{}\nsupervisor log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.log_tail(80)
    );
    let s = match c.wait_settled(Duration::from_secs(60)) {
        Ok(s) => s,
        Err(e) => panic!("{e}\nsupervisor log:\n{}", c.log_tail(80)),
    };
    assert!(
        s.engines.iter().all(|e| e.app_version == 1),
        "after the rollback every engine runs v1: {:?}",
        s.engines
    );
    assert!(
        c.log_text().contains("panicking on purpose"),
        "the new release did not panic:\n{}",
        c.log_tail(80)
    );
    if let Err(e) = load.wait_progress(20, Duration::from_secs(30)) {
        panic!("{e}\nsupervisor log:\n{}", c.log_tail(80));
    }
    let totals = load.finish();
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
