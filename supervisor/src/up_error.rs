//! Why `understudy up` could not run the cluster, and the exit code each reason gets.

use understudy_control::control::ControlError;

use crate::config::ConfigError;
use crate::process::SpawnError;
use crate::proto::Code;

/// Why `up` could not run the cluster.
#[derive(Debug)]
pub enum UpError {
    /// The config or the engine binary.
    Config(ConfigError),
    /// The control block.
    Control(ControlError),
    /// Another supervisor runs this cluster.
    AlreadyRunning {
        /// Its pid.
        pid: u32,
    },
    /// An engine could not be started.
    Spawn(SpawnError),
    /// Engine `a` did not become active in time.
    NoActive {
        /// The start timeout.
        timeout_ms: u64,
    },
    /// The shared-memory or cluster directory is not private to this user.
    Trust(shm_layout::trust::TrustError),
    /// Anything else (socket, files).
    Io(String),
}

impl UpError {
    /// The exit code for this failure.
    pub fn code(&self) -> Code {
        match self {
            UpError::Config(_) | UpError::Trust(_) => Code::BadConfig,
            UpError::AlreadyRunning { .. } => Code::Busy,
            UpError::NoActive { .. } => Code::Timeout,
            UpError::Control(_) | UpError::Spawn(_) | UpError::Io(_) => Code::Failed,
        }
    }
}

impl std::fmt::Display for UpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpError::Config(e) => e.fmt(f),
            UpError::Control(e) => e.fmt(f),
            UpError::AlreadyRunning { pid } => write!(
                f,
                "a supervisor (pid {pid}) already runs this cluster; talk to it with \
                 `understudy status`, or stop it first"
            ),
            UpError::Spawn(e) => e.fmt(f),
            UpError::NoActive { timeout_ms } => write!(
                f,
                "engine a did not become active within {timeout_ms} ms (timeouts.start_ms); \
                 check its log above"
            ),
            UpError::Trust(e) => {
                write!(
                    f,
                    "refusing to use the cluster's files: {e} (shm_dir must be private to the \
                     user running understudy; nothing was started)"
                )?;
                // Another user's directory, or one whose mode keeps this user out: say what
                // to set in the config.
                match e.unusable_dir() {
                    Some(dir) => write!(f, "; {}", crate::config::shm_dir_advice(dir)),
                    None => Ok(()),
                }
            }
            UpError::Io(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for UpError {}
