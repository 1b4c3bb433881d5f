//! The callstate test harness: a cluster under `understudy up` (the workspace's supervisor
//! executable) that kills its engines and removes its files when dropped, whatever the test
//! did.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use understudy_supervisor::client::Client as SupervisorClient;
use understudy_supervisor::proto::{Op, Request as SupRequest, StatusReport, SOCKET_NAME};

pub const V1: &str = env!("CARGO_BIN_EXE_callstate-v1");
pub const V2: &str = env!("CARGO_BIN_EXE_callstate-v2");

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

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A cluster under `understudy up`; on drop its engines and supervisor are killed and its
/// files removed, whatever the test did.
pub struct Cluster {
    pub name: String,
    pub work: PathBuf,
    pub shm_dir: PathBuf,
    pub config: PathBuf,
    pub supervisor: Option<Child>,
}

impl Cluster {
    pub fn up(tag: &str) -> Cluster {
        Cluster::up_with(tag, "")
    }

    /// `up` with more `[engine]` settings (TOML lines) in the config.
    pub fn up_with(tag: &str, engine_extra: &str) -> Cluster {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("cs-{tag}-{}-{n}", std::process::id());
        let work = std::env::temp_dir().join(format!("understudy-{name}"));
        let shm_dir = PathBuf::from(format!("/dev/shm/understudy-{name}"));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).unwrap();
        let config = work.join("cluster.toml");
        // Service times on a loaded 2-core test machine say nothing: acceptance must not
        // turn on them; a starved debug engine must not be fenced as hung.
        let text = format!(
            "cluster = \"{name}\"\nshm_dir = \"{}\"\n[engine]\nbinary = \"{V1}\"\n\
             env = {{ RUST_LOG = \"warn\", UNDERSTUDY_HUNG_MS = \"5000\" }}\n{engine_extra}\n\
             [acceptance]\nmax_latency_us_p99 = 60000000\n\
             [restart]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n",
            shm_dir.display()
        );
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(work.join("supervisor.log")).unwrap();
        let mut c = Cluster {
            name,
            work,
            shm_dir,
            config,
            supervisor: None,
        };
        c.supervisor = Some(
            c.cli()
                .arg("up")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        c.wait("an active and a hot standby", |s| {
            s.active.is_some() && s.hot_standbys().count() >= 1
        });
        c
    }

    pub fn dir(&self) -> PathBuf {
        self.shm_dir.join(&self.name)
    }

    pub fn cli(&self) -> Command {
        let mut c = Command::new(cli_path());
        c.arg("--config").arg(&self.config);
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

    pub fn log(&self) -> String {
        let t = std::fs::read_to_string(self.work.join("supervisor.log")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn status(&self) -> Option<StatusReport> {
        let reply = SupervisorClient::new(self.dir().join(SOCKET_NAME))
            .request(&SupRequest::new(Op::Status), |_| {})
            .ok()?;
        serde_json::from_value(reply.data).ok()
    }

    pub fn wait(&self, what: &str, mut done: impl FnMut(&StatusReport) -> bool) -> StatusReport {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status() {
                if done(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "waited for {what}; last status {last:#?}\nlog:\n{}",
            self.log()
        );
    }

    pub fn settled(&self) -> StatusReport {
        self.wait("an active and a hot standby", |s| {
            s.operation.is_none() && s.active.is_some() && s.hot_standbys().count() >= 1
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let engines: Vec<u32> = self
            .status()
            .map(|s| s.engines.iter().map(|e| e.pid).collect())
            .unwrap_or_default();
        if let Some(mut s) = self.supervisor.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        for pid in engines {
            // SAFETY: kill has no memory-safety preconditions; these are our engines' pids.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&self.shm_dir);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
