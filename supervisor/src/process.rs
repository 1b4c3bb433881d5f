//! Engine processes: spawning one in a slot (environment, arguments, CPU pinning, its own
//! process group), adopting one a previous supervisor started, and learning of its death at
//! once through a pidfd — for children and adopted engines alike, since a supervisor cannot
//! `waitpid` a process it did not start.
//!
//! A supervisor that adopts an engine cannot ask it which executable it was given:
//! `/proc/<pid>/exe` names the file the kernel runs, which is not the configured binary for a
//! wrapper script that `exec`s the engine, or for a multi-call binary behind a symbolic link
//! (the demo's `matchbook-v1`). So the supervisor keeps [`SPAWNED_FILE`] in the cluster
//! directory — each engine it started, by process identity, with its binary — and an adopted
//! engine takes its binary from there ([`spawned_binary`]), `/proc` only as a fallback. The
//! file is believed only if it is this user's, mode 0600, not a link, in the private cluster
//! directory ([`shm_layout::trust`]): otherwise anyone able to write it could name their own
//! program as an engine's binary and have the supervisor run it at the next restart.
//!
//! This module knows processes, not roles: what a death means is the supervisor's business.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use understudy_control::control::{slot_index, slot_name};
use understudy_control::launch;
use understudy_control::liveness::{Pidfd, ProcessIdentity};

use crate::config::ClusterConfig;

/// A heartbeat older than this many configured intervals means the engine is hung (the
/// supervisor fences it; an engine is told the same threshold at its start).
pub const HUNG_BEATS: u64 = 10;

/// The file in the cluster directory that names each started engine's binary.
pub const SPAWNED_FILE: &str = "engines.json";
const SPAWNED_FORMAT: &str = "understudy-engines";
const SPAWNED_VERSION: u32 = 1;
/// The largest engines file read: three engines take well under a kilobyte.
const SPAWNED_BYTES_MAX: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnedList {
    format: String,
    version: u32,
    engines: Vec<Spawned>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spawned {
    slot: String,
    pid: u32,
    start_time_ticks: u64,
    binary: PathBuf,
}

/// Records, replacing the previous list, the binary each of `engines` was given.
pub fn record_spawned<'a>(
    dir: &Path,
    engines: impl IntoIterator<Item = &'a EngineProc>,
) -> io::Result<()> {
    let list = SpawnedList {
        format: SPAWNED_FORMAT.into(),
        version: SPAWNED_VERSION,
        engines: engines
            .into_iter()
            .filter(|p| !p.binary.as_os_str().is_empty())
            .map(|p| Spawned {
                slot: slot_name(p.slot).to_string(),
                pid: p.identity.pid,
                start_time_ticks: p.identity.start_time_ticks,
                // A relative path would mean another file to a supervisor in another directory.
                binary: std::path::absolute(&p.binary).unwrap_or_else(|_| p.binary.clone()),
            })
            .collect(),
    };
    let mut text = serde_json::to_vec_pretty(&list).map_err(io::Error::other)?;
    text.push(b'\n');
    crate::record::write_atomically(dir, SPAWNED_FILE, &text)
}

/// The binary [`record_spawned`] recorded for the engine `identity` in `slot`: `Ok(None)` if
/// it is not listed; `Err` says what is wrong with the file (it is not trusted then).
pub fn spawned_binary(
    dir: &Path,
    slot: usize,
    identity: &ProcessIdentity,
) -> Result<Option<PathBuf>, String> {
    let path = dir.join(SPAWNED_FILE);
    // The file names executables this supervisor will run: believed only if nobody but this
    // user could have written it (ours, mode 0600, not a link, in a private directory).
    let bytes = match shm_layout::trust::read_private_file(&path, SPAWNED_BYTES_MAX) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => return Err(format!("not trusted: {e}")),
    };
    let list: SpawnedList = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: expected a list of started engines, found {e}",
            path.display()
        )
    })?;
    if list.format != SPAWNED_FORMAT || list.version != SPAWNED_VERSION {
        return Err(format!(
            "{}: expected format \"{SPAWNED_FORMAT}\" version {SPAWNED_VERSION}, found format {:?} version {}",
            path.display(),
            list.format,
            list.version
        ));
    }
    let found = list.engines.into_iter().find(|e| {
        slot_index(&e.slot) == Some(slot)
            && e.pid == identity.pid
            && e.start_time_ticks == identity.start_time_ticks
    });
    match found {
        Some(e) if e.binary.is_absolute() => Ok(Some(e.binary)),
        Some(e) => Err(format!(
            "{}: expected an absolute binary path for engine {}, found {:?}",
            path.display(),
            e.slot,
            e.binary.display().to_string()
        )),
        None => Ok(None),
    }
}

/// One engine process the supervisor watches.
#[derive(Debug)]
pub struct EngineProc {
    /// Its slot (0 = a, 1 = b, 2 = c).
    pub slot: usize,
    /// pid + start time.
    pub identity: ProcessIdentity,
    /// Readable once the process has exited.
    pub pidfd: Pidfd,
    /// `Some` for a process this supervisor spawned (reaped with `try_wait`).
    pub child: Option<Child>,
    /// The executable it runs.
    pub binary: PathBuf,
    /// When this supervisor spawned or adopted it.
    pub since: Instant,
    /// Its death is expected (it was told to stop, or killed on purpose): not a crash.
    pub expected_exit: bool,
    /// The supervisor fenced it (SIGKILL) and waits for its exit.
    pub fenced: bool,
}

/// How a watched engine ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitInfo {
    /// A child: its exit status.
    Status(ExitStatus),
    /// An adopted process: the status went to its old parent.
    Unknown,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitInfo::Status(s) => write!(f, "{s}"),
            ExitInfo::Unknown => f.write_str("exit status unknown (adopted process)"),
        }
    }
}

/// Why an engine could not be spawned or adopted.
#[derive(Debug)]
pub enum SpawnError {
    /// `fork`/`exec` failed.
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The process vanished before it could be watched.
    Watch(String),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Spawn { binary, source } => {
                write!(f, "cannot start engine {}: {source}", binary.display())
            }
            SpawnError::Watch(e) => write!(f, "cannot watch the engine process: {e}"),
        }
    }
}

impl std::error::Error for SpawnError {}

/// What to run in a slot.
#[derive(Debug, Clone)]
pub struct SpawnSpec<'a> {
    /// The cluster config (arguments, environment, pinning).
    pub config: &'a ClusterConfig,
    /// The cluster directory.
    pub dir: &'a Path,
    /// The slot.
    pub slot: usize,
    /// The executable (the config's, or an upgrade's).
    pub binary: &'a Path,
    /// Never start as the first active: `UNDERSTUDY_STANDBY=1`.
    pub standby: bool,
}

impl EngineProc {
    /// Spawns an engine: `UNDERSTUDY_DIR`, `UNDERSTUDY_SLOT`, `UNDERSTUDY_STANDBY`,
    /// `UNDERSTUDY_RING` and the config's environment are set; the config's arguments are
    /// passed; the process runs in its own process group (a Ctrl-C to the supervisor's
    /// terminal does not reach the engines) and is pinned to the slot's CPU if one is set.
    pub fn spawn(spec: &SpawnSpec<'_>) -> Result<EngineProc, SpawnError> {
        let mut command = Self::command(spec)?;
        let child = command.spawn().map_err(|source| SpawnError::Spawn {
            binary: spec.binary.to_path_buf(),
            source,
        })?;
        let pid = child.id();
        // An engine that cannot be watched is not left running untracked (out of descriptors
        // for its pidfd, say): it is killed and reaped before the error is returned.
        let watched = ProcessIdentity::of(pid)
            .map_err(|e| e.to_string())
            .and_then(|identity| {
                Pidfd::open(pid)
                    .map(|pidfd| (identity, pidfd))
                    .map_err(|e| e.to_string())
            });
        let (identity, pidfd) = match watched {
            Ok(w) => w,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(SpawnError::Watch(format!(
                    "pid {pid}: {e}; the engine was killed"
                )));
            }
        };
        Ok(EngineProc {
            slot: spec.slot,
            identity,
            pidfd,
            child: Some(child),
            binary: spec.binary.to_path_buf(),
            since: Instant::now(),
            expected_exit: false,
            fenced: false,
        })
    }

    /// The command that starts the engine `spec` describes: its environment, arguments,
    /// process group and CPU pinning.
    fn command(spec: &SpawnSpec<'_>) -> Result<Command, SpawnError> {
        let config = spec.config;
        let mut command = Command::new(spec.binary);
        command
            .args(&config.engine.args)
            .env(
                launch::ENV_BACKPRESSURE_US,
                match config.backpressure.policy {
                    crate::config::BackpressurePolicy::Wait => {
                        config.backpressure.wait_max_us.max(1).to_string()
                    }
                    crate::config::BackpressurePolicy::Untether => "0".to_string(),
                },
            )
            // A standby fences a hung active at the same age the supervisor does.
            .env(
                launch::ENV_HUNG_MS,
                (config.timeouts.heartbeat_ms * HUNG_BEATS).to_string(),
            )
            // Every engine of the cluster protects its stream alike: a standby accepts
            // unsummed batches only when it is configured `off` too.
            .env(launch::ENV_INTEGRITY, config.ring.integrity.as_str())
            // The operator's `[engine] env` overrides the tuning above; the identity below
            // is the supervisor's alone (the config refuses those names in `engine.env`).
            .envs(&config.engine.env)
            .env(launch::ENV_DIR, spec.dir)
            .env(launch::ENV_SLOT, slot_name(spec.slot).to_string())
            .env(launch::ENV_RING, config.ring.capacity_bytes.to_string())
            .process_group(0);
        if spec.standby {
            command.env(launch::ENV_STANDBY, "1");
        } else {
            command.env_remove(launch::ENV_STANDBY);
        }
        let cpu = match spec.slot {
            0 => config.slots.a.as_ref(),
            1 => config.slots.b.as_ref(),
            _ => config.slots.c.as_ref(),
        }
        .and_then(|s| s.cpu);
        if let Some(cpu) = cpu {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu as usize).map_err(|e| SpawnError::Spawn {
                binary: spec.binary.to_path_buf(),
                source: io::Error::other(format!("CPU {cpu} out of range: {e}")),
            })?;
            // SAFETY: the closure runs between fork and exec and only makes one
            // async-signal-safe system call (sched_setaffinity) on a set built before the fork.
            unsafe {
                command.pre_exec(move || {
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .map_err(io::Error::from)
                });
            }
        }
        Ok(command)
    }

    /// Watches an engine another supervisor started, if `identity` is still alive.
    pub fn adopt(slot: usize, identity: ProcessIdentity) -> Result<EngineProc, SpawnError> {
        let pidfd =
            Pidfd::open_identity(&identity).map_err(|e| SpawnError::Watch(e.to_string()))?;
        let binary = std::fs::read_link(format!("/proc/{}/exe", identity.pid))
            .map(|p| {
                // A replaced executable reads as "<path> (deleted)".
                let s = p.to_string_lossy();
                PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned())
            })
            .unwrap_or_default();
        Ok(EngineProc {
            slot,
            identity,
            pidfd,
            child: None,
            binary,
            since: Instant::now(),
            expected_exit: false,
            fenced: false,
        })
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.identity.pid
    }

    /// `Some` once the process has exited (a child is reaped here).
    pub fn exited(&mut self) -> Option<ExitInfo> {
        match self.pidfd.poll_exited(Some(std::time::Duration::ZERO)) {
            Ok(false) => return None,
            Ok(true) => {}
            // Cannot poll: fall back on /proc.
            Err(_) if self.identity.is_alive() => return None,
            Err(_) => {}
        }
        match self.child.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(Some(status)) => Some(ExitInfo::Status(status)),
                Ok(None) => child.wait().ok().map(ExitInfo::Status),
                Err(_) => Some(ExitInfo::Unknown),
            },
            None => Some(ExitInfo::Unknown),
        }
    }

    /// SIGKILL (the fence). Harmless if the process already exited.
    pub fn kill(&self) {
        if self.identity.is_alive() {
            // Signal through the pidfd, so a reused pid can never be hit.
            // SAFETY: pidfd_send_signal takes an fd we own, a signal number and null info.
            unsafe {
                libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(&self.pidfd)),
                    libc::SIGKILL,
                    std::ptr::null::<libc::siginfo_t>(),
                    0u32,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn engine_env_overrides_the_tuning_but_not_the_identity() {
        // Proves what an engine gets in its environment: the config's `[engine] env` wins over
        // the supervisor's tuning defaults (hung threshold, back-pressure), while the
        // cluster identity (directory, slot, standby, ring) is always the supervisor's.
        let dir = std::env::temp_dir().join(format!("understudy-spawn-env-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("env");
        let script = dir.join("engine");
        std::fs::write(
            &script,
            format!("#!/bin/sh\nenv > {}.tmp\nmv {0}.tmp {0}\n", out.display()),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut config = ClusterConfig::new("demo", &script);
        config
            .engine
            .env
            .insert("UNDERSTUDY_HUNG_MS".into(), "900".into());
        config.engine.env.insert("APP_SETTING".into(), "on".into());
        let mut proc = EngineProc::spawn(&SpawnSpec {
            config: &config,
            dir: &dir,
            slot: 1,
            binary: &script,
            standby: true,
        })
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while proc.exited().is_none() {
            assert!(Instant::now() < deadline, "the script did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        let env = std::fs::read_to_string(&out).unwrap();
        let has = |line: &str| env.lines().any(|l| l == line);
        assert!(has("UNDERSTUDY_HUNG_MS=900"), "{env}");
        assert!(has("APP_SETTING=on"), "{env}");
        assert!(has("UNDERSTUDY_BACKPRESSURE_US=20000"), "{env}");
        assert!(has("UNDERSTUDY_SLOT=b"), "{env}");
        assert!(has("UNDERSTUDY_STANDBY=1"), "{env}");
        assert!(has(&format!("UNDERSTUDY_DIR={}", dir.display())), "{env}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_binary_each_engine_was_given_is_found_again_by_identity() {
        // Proves a started engine's binary (a wrapper script here, which /proc would not
        // name) is found again by slot and process identity, a relative path comes back
        // absolute, another identity is not matched, and a file of another format is refused.
        let dir = std::env::temp_dir().join(format!("understudy-spawned-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("wrapper");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config = ClusterConfig::new("demo", &script);
        let mut proc = EngineProc::spawn(&SpawnSpec {
            config: &config,
            dir: &dir,
            slot: 2,
            binary: &script,
            standby: true,
        })
        .unwrap();
        assert_eq!(spawned_binary(&dir, 2, &proc.identity), Ok(None));
        record_spawned(&dir, [&proc]).unwrap();
        assert_eq!(
            spawned_binary(&dir, 2, &proc.identity),
            Ok(Some(script.clone()))
        );
        assert_eq!(spawned_binary(&dir, 1, &proc.identity), Ok(None));
        let other = ProcessIdentity {
            start_time_ticks: proc.identity.start_time_ticks + 1,
            ..proc.identity
        };
        assert_eq!(spawned_binary(&dir, 2, &other), Ok(None));

        proc.binary = PathBuf::from("relative/engine");
        record_spawned(&dir, [&proc]).unwrap();
        let found = spawned_binary(&dir, 2, &proc.identity).unwrap().unwrap();
        assert!(
            found.is_absolute() && found.ends_with("relative/engine"),
            "{found:?}"
        );

        std::fs::write(
            dir.join(SPAWNED_FILE),
            r#"{"format":"understudy-engines","version":7,"engines":[]}"#,
        )
        .unwrap();
        let error = spawned_binary(&dir, 2, &proc.identity).unwrap_err();
        assert!(
            error.contains("expected format") && error.contains("version 7"),
            "{error}"
        );
        proc.kill();
        while proc.exited().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
