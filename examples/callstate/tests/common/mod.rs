//! The callstate test harness: a cluster under `understudy up` (the workspace's supervisor
//! executable) on the workspace's one harness, `understudy-test-support`: its engines and
//! supervisor are killed and its files removed when dropped, whatever the test did, and they
//! die with the test runner.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use understudy_supervisor::proto::StatusReport;
use understudy_test_support::cluster::Supervised;

pub const V1: &str = env!("CARGO_BIN_EXE_callstate-v1");
pub const V2: &str = env!("CARGO_BIN_EXE_callstate-v2");

/// How long a test waits for a cluster state (a debug build on two loaded CPUs).
pub const WAIT_MAX: Duration = Duration::from_secs(60);
/// Log lines shown in a failure message.
const LOG_LINES: usize = 40;

pub fn cli_path() -> PathBuf {
    let p = Path::new(V1)
        .parent()
        .expect("target dir")
        .join("understudy");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bin understudy` (or `cargo test --workspace`)",
        p.display()
    );
    p
}

/// A cluster under `understudy up` (see [`Supervised`]).
pub struct Cluster(Supervised);

understudy_test_support::derefs_to_supervised!(Cluster, 0);

impl Cluster {
    pub fn up(tag: &str) -> Cluster {
        Cluster::up_with(tag, "")
    }

    /// `up` with more `[engine]` settings (TOML lines) in the config.
    pub fn up_with(tag: &str, engine_extra: &str) -> Cluster {
        let mut s = Supervised::new(&cli_path(), "cs", tag).json(false);
        // Service times on a loaded 2-core test machine say nothing: acceptance must not
        // turn on them; a starved debug engine must not be fenced as hung.
        s.write_config(&format!(
            "cluster = \"{name}\"\nshm_dir = \"{}\"\n[engine]\nbinary = \"{V1}\"\n\
             env = {{ RUST_LOG = \"warn\", UNDERSTUDY_HUNG_MS = \"5000\" }}\n{engine_extra}\n\
             [acceptance]\nmax_latency_us_p99 = 60000000\n\
             [restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n",
            s.shm_dir.display(),
            name = s.name,
        ));
        s.start(&[], &[]);
        let c = Cluster(s);
        c.wait("an active and a hot standby", |s| {
            s.active.is_some() && s.hot_standbys().count() >= 1
        });
        c
    }

    /// Runs a CLI command to its end; panics with its output and the log unless it exits 0.
    pub fn run(&self, args: &[&str]) {
        let out = self.cli().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "understudy {args:?}: {}\n{}\n{}\nlog:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The last lines of the supervisor's log.
    pub fn log(&self) -> String {
        self.log_tail(LOG_LINES)
    }

    /// Polls status until `done`, up to [`WAIT_MAX`].
    pub fn wait(&self, what: &str, done: impl FnMut(&StatusReport) -> bool) -> StatusReport {
        self.0.wait(what, WAIT_MAX, done)
    }

    pub fn settled(&self) -> StatusReport {
        self.wait("an active and a hot standby", |s| {
            s.operation.is_none() && s.active.is_some() && s.hot_standbys().count() >= 1
        })
    }
}
