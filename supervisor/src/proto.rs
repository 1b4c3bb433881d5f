//! The control socket's wire format: newline-delimited JSON, one request per connection.
//!
//! A client connects to `<cluster dir>/supervisor.sock`, writes one [`Request`] line, and reads
//! [`Reply`] lines: zero or more `"type": "event"` lines (progress of a long operation), then
//! exactly one `"type": "result"` line whose `code` says how it ended. Every line carries the
//! schema version `v`; a request of another version is refused with [`Code::Usage`].
//!
//! The CLI is a thin client of this protocol, so scripts can speak it directly:
//!
//! ```text
//! $ echo '{"v":1,"op":"status"}' | socat - UNIX-CONNECT:/dev/shm/understudy/demo/supervisor.sock
//! {"v":1,"type":"result","code":"ok","message":"…","data":{…}}
//! ```
//!
//! # Examples
//!
//! ```
//! use understudy_supervisor::proto::{Code, Op, Reply, Request};
//!
//! let request: Request = serde_json::from_str(r#"{"v":1,"op":"upgrade","binary":"/opt/v2"}"#).unwrap();
//! assert!(matches!(request.op, Op::Upgrade(ref u) if !u.keep_standby));
//! let reply = Reply::result(Code::RolledBack, "upgrade rolled back");
//! let line = serde_json::to_string(&reply).unwrap();
//! assert!(line.contains(r#""code":"rolled-back""#));
//! assert_eq!(Code::RolledBack.exit_code(), 6);
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The schema version of every line.
pub const SCHEMA_VERSION: u32 = 1;

/// The socket's file name inside the cluster directory.
pub const SOCKET_NAME: &str = "supervisor.sock";

/// One request line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Schema version; must be [`SCHEMA_VERSION`].
    pub v: u32,
    /// What to do.
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    /// A request of the current schema version.
    pub fn new(op: Op) -> Self {
        Self {
            v: SCHEMA_VERSION,
            op,
        }
    }
}

/// The operations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    /// A snapshot of the cluster ([`StatusReport`] in the result's `data`).
    Status,
    /// Planned switchover to the hot standby.
    Switchover,
    /// The rolling upgrade.
    Upgrade(UpgradeRequest),
    /// Abort the upgrade in progress (rolling back), or undo the last completed upgrade.
    Rollback,
    /// Enable every feature both engines support.
    EnableFeatures,
    /// Stop every engine cleanly, remove the shared files, stop the supervisor.
    Down,
}

/// The arguments of an upgrade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The new engine executable.
    pub binary: PathBuf,
    /// The soak period; the config's `acceptance.accept_for_ms` when absent.
    #[serde(default)]
    pub accept_for_ms: Option<u64>,
    /// A shell command that must exit 0 for the upgrade to be accepted; the config's
    /// `acceptance.accept_cmd` when absent.
    #[serde(default)]
    pub accept_cmd: Option<String>,
    /// Start the new version as a third standby first, so a hot standby exists throughout.
    #[serde(default)]
    pub keep_standby: bool,
    /// Leave the new features disabled.
    #[serde(default)]
    pub no_enable: bool,
}

/// How a request ended, and the CLI's exit code for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    /// Done.
    Ok,
    /// Something unexpected failed (I/O, a broken supervisor); the message says what.
    Failed,
    /// A malformed request or bad arguments.
    Usage,
    /// No supervisor answers on the socket.
    NotRunning,
    /// The cluster is not in the role the request needs (no hot standby to switch to ...).
    WrongRole,
    /// An engine did not do what was asked in time.
    Timeout,
    /// The upgrade was not acceptable; the old version is active again.
    RolledBack,
    /// Recovery failed; the operator must take over (the message says where things stand).
    RollbackFailed,
    /// The upgrade stopped in a safe state (see the message).
    Aborted,
    /// No engine is active.
    Outage,
    /// The config or an engine binary cannot be used.
    BadConfig,
    /// Another operation is in progress, or another supervisor runs the cluster.
    Busy,
    /// `doctor` found a problem.
    Unhealthy,
}

impl Code {
    /// The process exit code.
    pub fn exit_code(self) -> i32 {
        match self {
            Code::Ok => 0,
            Code::Failed => 1,
            Code::Usage => 2,
            Code::NotRunning => 3,
            Code::WrongRole => 4,
            Code::Timeout => 5,
            Code::RolledBack => 6,
            Code::RollbackFailed => 7,
            Code::Aborted => 8,
            Code::Outage => 9,
            Code::BadConfig => 10,
            Code::Busy => 11,
            Code::Unhealthy => 12,
        }
    }

    /// Every code, for the `--help` table.
    pub const ALL: [Code; 13] = [
        Code::Ok,
        Code::Failed,
        Code::Usage,
        Code::NotRunning,
        Code::WrongRole,
        Code::Timeout,
        Code::RolledBack,
        Code::RollbackFailed,
        Code::Aborted,
        Code::Outage,
        Code::BadConfig,
        Code::Busy,
        Code::Unhealthy,
    ];

    /// A line for the `--help` table.
    pub fn describe(self) -> &'static str {
        match self {
            Code::Ok => "success",
            Code::Failed => "unexpected failure (I/O, internal error)",
            Code::Usage => "usage: bad arguments or request",
            Code::NotRunning => "not running: no supervisor answers for this cluster",
            Code::WrongRole => "wrong role: e.g. no hot standby to switch over to",
            Code::Timeout => "timeout: an engine did not act in time",
            Code::RolledBack => {
                "acceptance failed (or a restarted supervisor found no verdict): rolled back, the old version is active"
            }
            Code::RollbackFailed => "rollback failed: operator action needed",
            Code::Aborted => {
                "upgrade aborted in a safe state (a restarted supervisor never continues one)"
            }
            Code::Outage => "outage: no engine is active",
            Code::BadConfig => "bad config or engine binary",
            Code::Busy => "busy: another operation or supervisor is running",
            Code::Unhealthy => "doctor found problems",
        }
    }
}

/// `event` or `result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplyKind {
    /// Progress of a long operation.
    Event,
    /// The final line.
    Result,
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Schema version.
    pub v: u32,
    /// Event or result.
    #[serde(rename = "type")]
    pub kind: ReplyKind,
    /// For a result: how the request ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
    /// For humans.
    pub message: String,
    /// Details for scripts (a [`StatusReport`], an [`UpgradeEvent`], timings ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Reply {
    /// A final result line.
    pub fn result(code: Code, message: impl Into<String>) -> Self {
        Self {
            v: SCHEMA_VERSION,
            kind: ReplyKind::Result,
            code: Some(code),
            message: message.into(),
            data: serde_json::Value::Null,
        }
    }

    /// A progress line.
    pub fn event(message: impl Into<String>, data: serde_json::Value) -> Self {
        Self {
            v: SCHEMA_VERSION,
            kind: ReplyKind::Event,
            code: None,
            message: message.into(),
            data,
        }
    }

    /// With `data` attached.
    pub fn with_data(mut self, data: impl Serialize) -> Self {
        self.data = serde_json::to_value(data).unwrap_or(serde_json::Value::Null);
        self
    }
}

/// One upgrade progress event (the `data` of its event lines).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeEvent {
    /// `begin` (an action starts), `end` (it ended) or `engine-died`.
    pub event: String,
    /// The step number, from 1.
    pub step: u8,
    /// How many steps the plan has.
    pub total: u8,
    /// The step's name.
    pub name: String,
    /// `abort`, `rollback` or `settle` while recovering from a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<String>,
    /// The action, for humans.
    pub action: String,
    /// For `end`: `done`, `accepted`, `rejected: …`, `failed: …`, `timed out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// For `end`: how long the action took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
}

/// One engine in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    /// `a`, `b` or `c`.
    pub slot: String,
    /// Process id.
    pub pid: u32,
    /// `active`, `standby`, `out-of-service`, `none` (starting).
    pub role: String,
    /// The epoch the engine is in.
    pub epoch: u64,
    /// The application version it runs.
    pub app_version: u64,
    /// The record layout version it agreed with its peer.
    pub layout_version: u64,
    /// The enabled features (bit set).
    pub features: u64,
    /// The features both engines could enable (bit set, as the standby sees it).
    pub enableable: u64,
    /// `starting`, `syncing`, `hot`, `stale`, `out-of-service`, `serving`.
    pub state: String,
    /// Bytes the standby still has to apply.
    pub lag_bytes: u64,
    /// Transactions committed (active) or applied (standby).
    pub commits: u64,
    /// Requests per second over the last sampling interval (active only).
    pub requests_per_s: f64,
    /// Requests handled in total.
    pub requests: u64,
    /// Times the engine stepped up.
    pub step_ups: u64,
    /// Wall-clock time of the last step-up, ns since the Unix epoch (0 = never).
    pub last_step_up_ns: u64,
    /// How long the last step-up took, ns.
    pub last_step_up_dur_ns: u64,
    /// The state digest.
    pub digest: u64,
    /// The executable.
    pub binary: PathBuf,
    /// How old its heartbeat is, ms (the supervisor fences an engine whose heartbeat is older
    /// than 10 intervals, 40 for one that is not active).
    #[serde(default)]
    pub heartbeat_age_ms: u64,
}

/// The restart keeper's view of a slot whose engine crashed recently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRestarts {
    /// `a`, `b` or `c`.
    pub slot: String,
    /// Crashes within the crash-loop window (`restart.crash_loop_window_ms`).
    pub crashes: u32,
    /// The backoff before the restart that is pending or was last made, ms.
    pub backoff_ms: u64,
    /// Restarts stopped: more than `restart.crash_loop_max` crashes within the window.
    pub given_up: bool,
}

/// An upgrade found in the middle when the supervisor started (its record in the cluster
/// directory), and how the supervisor settled it. The policy: the forward path is never
/// continued; before the acceptance verdict the old version is restored, after it the accepted
/// new version is kept; either way, a hot standby is restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterruptedUpgrade {
    /// The version the upgrade rolled out, if its record could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// Where it was when its supervisor stopped (`step 5/8 (acceptance check): …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// What this supervisor does about it, and why.
    pub decision: String,
    /// How that ended; `None` while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The outcome as a code: `rolled-back`, `aborted` (old version restored before the
    /// switchover, or the accepted new version kept), `rollback-failed`, `outage`, or `failed`
    /// when the record could not be used and the cluster was left as found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Code>,
}

/// A role change the supervisor saw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleChange {
    /// Wall-clock time, ns since the Unix epoch.
    pub at_ns: u64,
    /// The new epoch.
    pub epoch: u64,
    /// The new active slot, if any.
    pub active: Option<String>,
    /// The previous active slot, if any.
    pub previous: Option<String>,
    /// How long the new active's step-up took (ns), from the control block.
    pub step_up_dur_ns: u64,
}

/// The answer to [`Op::Status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The cluster's name.
    pub cluster: String,
    /// Its shared-memory directory.
    pub dir: PathBuf,
    /// The supervisor's pid.
    pub supervisor_pid: u32,
    /// The cluster epoch.
    pub epoch: u64,
    /// The active slot, if any engine is active.
    pub active: Option<String>,
    /// The running engines.
    pub engines: Vec<EngineStatus>,
    /// The operation in progress, if any (`upgrade: step 3/8 (…)`).
    pub operation: Option<String>,
    /// Slots whose restarts stopped because they crash in a loop.
    pub crash_looping: Vec<String>,
    /// Slots whose engine crashed within the crash-loop window, with their backoff.
    #[serde(default)]
    pub restarts: Vec<SlotRestarts>,
    /// An upgrade that a previous supervisor left in the middle, and what this one did about
    /// it (shown until the next upgrade begins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted_upgrade: Option<InterruptedUpgrade>,
    /// The most recent role changes, oldest first.
    pub role_changes: Vec<RoleChange>,
}

impl StatusReport {
    /// The engine in `slot`, if one runs.
    pub fn engine(&self, slot: &str) -> Option<&EngineStatus> {
        self.engines.iter().find(|e| e.slot == slot)
    }

    /// The active engine, if any.
    pub fn active_engine(&self) -> Option<&EngineStatus> {
        self.engines.iter().find(|e| e.role == "active")
    }

    /// The engines that are hot standbys of the current epoch.
    pub fn hot_standbys(&self) -> impl Iterator<Item = &EngineStatus> + '_ {
        self.engines
            .iter()
            .filter(move |e| e.role == "standby" && e.state == "hot" && e.epoch == self.epoch)
    }
}
