//! The cluster config: one TOML file that names the cluster, the engine binary, and the
//! timeouts, restart, backpressure, acceptance and ring settings the supervisor works with.
//!
//! Parsing is strict: every table is `deny_unknown_fields`, so a misspelt key is an error
//! that names the key and its line rather than a setting silently ignored. Parsing then
//! validates the values ([`ClusterConfig::validate`]) and reports every bad field at once,
//! each with what was expected and what was found. Whether the engine binary exists and is
//! executable is a separate check ([`ClusterConfig::check_binary`]), because it looks at the
//! file system and a config may be parsed on one host for use on another.
//!
//! Every field has a default that works for a demo, except `cluster` and `engine.binary`.
//! The default `shm_dir` depends on who runs understudy ([`default_shm_dir_for`]):
//! `/dev/shm/understudy` for root, `/dev/shm/understudy-<uid>` for every other user, so a
//! service user works out of the box and never meets root's clusters.
//!
//! # Examples
//!
//! ```
//! use understudy_supervisor::config::{
//!     default_shm_dir, default_shm_dir_for, BackpressurePolicy, ClusterConfig,
//! };
//!
//! let config = ClusterConfig::from_str(
//!     r#"
//!     cluster = "demo"
//!     [engine]
//!     binary = "/usr/bin/matchbook"
//!     [backpressure]
//!     policy = "untether"
//!     "#,
//!     "example.toml",
//! )
//! .unwrap();
//! assert_eq!(config.backpressure.policy, BackpressurePolicy::Untether);
//! assert_eq!(config.ring.capacity_bytes, 8 * 1024 * 1024);
//! assert_eq!(config.cluster_dir(), default_shm_dir().join("demo"));
//! assert_eq!(default_shm_dir_for(0).to_str(), Some("/dev/shm/understudy"));
//! assert_eq!(default_shm_dir_for(1000).to_str(), Some("/dev/shm/understudy-1000"));
//!
//! let typo = ClusterConfig::from_str("cluster = \"demo\"\nclustr = 1\n", "typo.toml");
//! assert!(typo.unwrap_err().to_string().contains("clustr"));
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest cluster name: it becomes a directory name and part of log lines.
pub const CLUSTER_NAME_LEN_MAX: usize = 32;
/// The smallest ring: one page.
pub const RING_CAPACITY_BYTES_MIN: u64 = 4096;
/// The largest ring: 1 GiB, far beyond any sane catch-up backlog.
pub const RING_CAPACITY_BYTES_MAX: u64 = 1 << 30;
/// The longest heartbeat interval: 1 minute. The hung thresholds derived from it (40
/// intervals, in ns) then fit a u64 many times over.
pub const HEARTBEAT_MS_MAX: u64 = 60_000;
/// The longest timeout or restart delay: 1 day, so every deadline derived from one fits.
pub const DURATION_MS_MAX: u64 = 86_400_000;
/// The longest back-pressure wait: 60 s.
pub const WAIT_MAX_US_MAX: u64 = 60_000_000;
/// The loosest latency bound for acceptance: 1 hour.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// The longest soak period a request or the config may ask for: 7 days, so that every
/// deadline derived from it fits.
pub const ACCEPT_FOR_MS_MAX: u64 = 7 * 24 * 3600 * 1000;
/// The most crashes a crash-loop window may allow.
pub const CRASH_LOOP_MAX_MAX: u32 = 10_000;
/// The highest CPU number a slot may be pinned to (the size of the kernel's CPU set type).
pub const CPU_MAX: u32 = 1023;
/// The longest path of the control socket (`sun_path` holds 108 bytes with its NUL).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Engine environment variables the supervisor sets itself, each with what sets it instead;
/// `engine.env` may not name them (every other variable, `UNDERSTUDY_HUNG_MS` and
/// `UNDERSTUDY_BACKPRESSURE_US` included, is passed as given and wins over the supervisor's
/// default).
pub const ENGINE_ENV_RESERVED: [(&str, &str); 4] = [
    ("UNDERSTUDY_DIR", "from shm_dir and cluster"),
    ("UNDERSTUDY_SLOT", "per slot"),
    (
        "UNDERSTUDY_STANDBY",
        "when it starts an engine as a standby",
    ),
    ("UNDERSTUDY_RING", "from ring.capacity_bytes"),
];

/// The whole cluster config, as read from TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The cluster's name, `[a-z0-9_-]{1,32}`; its files live in `<shm_dir>/<cluster>/`.
    pub cluster: String,
    /// The directory holding every cluster's shared files; [`default_shm_dir`] when left out.
    #[serde(default = "default_shm_dir")]
    pub shm_dir: PathBuf,
    /// The engine process to run in each slot.
    pub engine: EngineConfig,
    /// Optional per-slot settings (CPU pinning).
    #[serde(default)]
    pub slots: SlotsConfig,
    /// How long the supervisor waits for each kind of event.
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// How a crashed engine is restarted.
    #[serde(default)]
    pub restart: RestartConfig,
    /// What the active does when the replication ring is full.
    #[serde(default)]
    pub backpressure: BackpressureConfig,
    /// When an upgrade is acceptable.
    #[serde(default)]
    pub acceptance: AcceptanceConfig,
    /// The replication ring.
    #[serde(default)]
    pub ring: RingConfig,
    /// The Prometheus endpoint (off unless `listen` is set).
    #[serde(default)]
    pub metrics: crate::metrics::MetricsConfig,
}

/// Root's default `shm_dir` (and everyone's before the default became per user).
pub const SHM_DIR_ROOT: &str = "/dev/shm/understudy";

/// The default `shm_dir` of the running (effective) user: [`default_shm_dir_for`] its uid.
/// Every place that needs the default (parsing a config, `doctor` without one, the demo)
/// calls this.
pub fn default_shm_dir() -> PathBuf {
    default_shm_dir_for(shm_layout::trust::euid())
}

/// The default `shm_dir` of `uid`: [`SHM_DIR_ROOT`] (`/dev/shm/understudy`) for root,
/// `/dev/shm/understudy-<uid>` for any other user.
///
/// - Per user: a cluster directory must be private to the user running it, and a single
///   `/dev/shm/understudy` created 0700 by whoever ran first locks every other user out
///   (`up` failed with "Permission denied"). Each user's own directory is created 0700 by
///   that user at its first `up`; a root cluster and a user's cluster of the same name never
///   share a directory.
/// - The uid, not the user name: every process has one (a container's arbitrary uid has no
///   name), it does not change when the user is renamed, it is what the trust checks compare,
///   and it is short (`<shm_dir>/<cluster>/supervisor.sock` must fit 107 bytes).
/// - Root keeps the old path: clusters root started before the default became per user are
///   found, and their engines re-adopted, by the next `up` with the same config.
pub fn default_shm_dir_for(uid: u32) -> PathBuf {
    if uid == 0 {
        PathBuf::from(SHM_DIR_ROOT)
    } else {
        PathBuf::from(format!("{SHM_DIR_ROOT}-{uid}"))
    }
}

/// What the running user should set when `unusable` (a directory a
/// [`shm_layout::trust::TrustError`] names: its owner or mode keeps this user out) stops it
/// from creating or owning a cluster directory.
pub fn shm_dir_advice(unusable: &Path) -> String {
    let uid = shm_layout::trust::euid();
    let user = shm_layout::trust::user_label(uid);
    let default = default_shm_dir_for(uid);
    if unusable.starts_with(&default) {
        format!(
            "{} is in the default shm_dir of {user} ({}), but someone else made it or changed \
             its mode: check what is in it and remove it, or set `shm_dir = \"<a directory \
             {user} may create>\"` in the config",
            unusable.display(),
            default.display()
        )
    } else {
        format!(
            "set `shm_dir = \"{}\"` in the config (the default for {user}, used when shm_dir is \
             left out), or another directory {user} may create and own",
            default.display()
        )
    }
}

/// `[engine]`: the program each slot runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Path of the engine executable (required).
    pub binary: PathBuf,
    /// Arguments passed to the engine.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables set for the engine, in addition to the supervisor's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl EngineConfig {
    /// An engine running `binary` with no arguments and no extra environment.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
        }
    }
}

/// `[slots.a]`, `[slots.b]`, `[slots.c]`: per-slot settings; slot `c` is the transient third
/// slot of a `--keep-standby` upgrade.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotsConfig {
    /// Slot `a`.
    pub a: Option<SlotConfig>,
    /// Slot `b`.
    pub b: Option<SlotConfig>,
    /// Slot `c`.
    pub c: Option<SlotConfig>,
}

/// The settings of one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlotConfig {
    /// The CPU the engine's hot threads are pinned to; unpinned when absent.
    pub cpu: Option<u32>,
}

/// `[timeouts]`: every wait the supervisor makes is bounded by one of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Interval of the engines' heartbeat frames. An engine whose heartbeat is 10 intervals
    /// old (40 for one that is not active) is hung, and fenced.
    pub heartbeat_ms: u64,
    /// From spawn to the engine reporting ready.
    pub start_ms: u64,
    /// From attach to the standby being hot (caught up).
    pub hot_ms: u64,
    /// For a planned switchover to complete.
    pub switchover_ms: u64,
    /// For a clean stop before the supervisor escalates to SIGKILL.
    pub shutdown_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 50,
            start_ms: 5_000,
            hot_ms: 30_000,
            switchover_ms: 2_000,
            shutdown_ms: 2_000,
        }
    }
}

impl TimeoutsConfig {
    /// [`Self::heartbeat_ms`] as a `Duration`.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    /// [`Self::start_ms`] as a `Duration`.
    pub fn start(&self) -> Duration {
        Duration::from_millis(self.start_ms)
    }
    /// [`Self::hot_ms`] as a `Duration`.
    pub fn hot(&self) -> Duration {
        Duration::from_millis(self.hot_ms)
    }
    /// [`Self::switchover_ms`] as a `Duration`.
    pub fn switchover(&self) -> Duration {
        Duration::from_millis(self.switchover_ms)
    }
    /// [`Self::shutdown_ms`] as a `Duration`.
    pub fn shutdown(&self) -> Duration {
        Duration::from_millis(self.shutdown_ms)
    }
}

/// `[restart]`: exponential backoff for restarting a crashed engine, and the crash-loop
/// breaker that stops restarting it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestartConfig {
    /// The first restart delay.
    pub backoff_initial_ms: u64,
    /// The delay doubles up to this.
    pub backoff_max_ms: u64,
    /// The window over which crashes are counted.
    pub crash_loop_window_ms: u64,
    /// More crashes than this within the window stop the restarts.
    pub crash_loop_max: u32,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            backoff_initial_ms: 100,
            backoff_max_ms: 5_000,
            crash_loop_window_ms: 10_000,
            crash_loop_max: 5,
        }
    }
}

/// What the active does when the replication ring to its standby is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackpressurePolicy {
    /// Wait up to `wait_max_us` for room, then untether.
    #[default]
    Wait,
    /// Drop the standby at once (it must catch up again); the active never waits.
    Untether,
}

/// `[backpressure]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackpressureConfig {
    /// `"wait"` or `"untether"`.
    pub policy: BackpressurePolicy,
    /// Under `wait`, the longest the active waits for room in the ring while the standby
    /// consumes nothing at all (a standby that makes progress is waited for).
    pub wait_max_us: u64,
}

impl Default for BackpressureConfig {
    fn default() -> Self {
        Self {
            policy: BackpressurePolicy::Wait,
            wait_max_us: 20_000,
        }
    }
}

/// `[acceptance]`: when an upgrade is acceptable (plan step 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AcceptanceConfig {
    /// The soak period after the switchover.
    pub accept_for_ms: u64,
    /// The highest acceptable fraction of failed requests during the soak, in `[0, 1]`.
    /// Engine failures (a crash, a panic, a timeout, an error the runtime reports) always
    /// fail the check; a handler's business refusal (`Err(Refused)`) counts only with
    /// [`Self::count_refusals`].
    pub max_error_rate: f64,
    /// Count the handler's refusals as errors against `max_error_rate` (off: an application
    /// that refuses orders is not failing).
    pub count_refusals: bool,
    /// The highest acceptable 99th percentile of the new active's request service time
    /// (handler, commit to the standby, response), as the engine publishes it: measured on
    /// one request in 4, over windows of at least 1000 timed requests or 1 s (power-of-two
    /// resolution). The default is loose; set your service level here.
    pub max_latency_us_p99: u64,
    /// A shell command run at the end of the soak; the upgrade is acceptable only if it
    /// exits 0.
    pub accept_cmd: Option<String>,
}

/// The bound of `acceptance.max_error_rate` (config, upgrade flag and upgrade request alike):
/// `Err(expected)` when `rate` is outside it.
pub fn check_max_error_rate(rate: f64) -> Result<f64, &'static str> {
    if rate.is_finite() && (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err("a fraction between 0 and 1")
    }
}

/// The bound of `acceptance.max_latency_us_p99` (config, upgrade flag and upgrade request
/// alike): `Err(expected)` when `us` is above it.
pub fn check_max_latency_us_p99(us: u64) -> Result<u64, String> {
    if us <= LATENCY_US_MAX {
        Ok(us)
    } else {
        Err(format!("at most {LATENCY_US_MAX} µs (1 hour)"))
    }
}

impl Default for AcceptanceConfig {
    fn default() -> Self {
        Self {
            accept_for_ms: 2_000,
            max_error_rate: 0.01,
            count_refusals: false,
            max_latency_us_p99: 10_000,
            accept_cmd: None,
        }
    }
}

/// `[ring]`: the replication ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RingConfig {
    /// Data capacity, a power of two between 4 KiB and 1 GiB.
    pub capacity_bytes: u64,
    /// Checksums on the replication stream: `"batch"` (one per transaction, the default) or
    /// `"off"` (none: the standby still checks every frame's structure).
    pub integrity: RingIntegrity,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 8 * 1024 * 1024,
            integrity: RingIntegrity::Batch,
        }
    }
}

/// `ring.integrity`: how the active protects each transaction it streams to a standby.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RingIntegrity {
    /// One checksum per transaction (batch).
    #[default]
    Batch,
    /// No checksum.
    Off,
}

impl RingIntegrity {
    /// The value of the engine's `UNDERSTUDY_INTEGRITY`.
    pub fn as_str(self) -> &'static str {
        match self {
            RingIntegrity::Batch => "batch",
            RingIntegrity::Off => "off",
        }
    }
}

/// One bad value: which field, what it must be, what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    /// Dotted path of the field, e.g. `ring.capacity_bytes`.
    pub field: String,
    /// What the field must be.
    pub expected: String,
    /// What the config holds.
    pub found: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}`: expected {}, found {}",
            self.field, self.expected, self.found
        )
    }
}

/// The lower end of a numeric field's range (see `Problems::bounded`).
#[derive(Clone, Copy)]
enum Bound {
    /// 0 is meaningless for this field (a zero timeout, a zero crash budget).
    AboveZero,
    /// 0 is allowed (it means "none" or "off").
    AnyFrom0,
}

/// Every bad field of a config, collected so that `validate` reports them all in one go.
#[derive(Default)]
struct Problems(Vec<FieldProblem>);

impl Problems {
    fn bad(&mut self, field: &str, expected: &str, found: String) {
        self.0.push(FieldProblem {
            field: field.to_owned(),
            expected: expected.to_owned(),
            found,
        });
    }

    /// The one checked-field rule for durations and counts: above 0 when `low` says so, and at
    /// most `max` (`unit` follows it in the message, e.g. "ms (1 day)").
    fn bounded(&mut self, field: &str, value: u64, low: Bound, max: u64, unit: &str) {
        if value == 0 && matches!(low, Bound::AboveZero) {
            self.bad(field, "a value above 0", "0".into());
        } else if value > max {
            self.bad(field, &format!("at most {max} {unit}"), value.to_string());
        }
    }
}

/// What is wrong with the engine binary.
#[derive(Debug)]
pub enum BinaryProblem {
    /// Nothing exists at the path.
    Missing,
    /// The path exists but is a directory or another non-file.
    NotAFile,
    /// The file has no execute permission bit set.
    NotExecutable {
        /// The file's permission bits.
        mode: u32,
    },
    /// The path could not be inspected.
    Inaccessible(io::Error),
}

impl fmt::Display for BinaryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => write!(f, "no such file; check the path or build the engine"),
            Self::NotAFile => write!(f, "not a regular file; point it at the executable"),
            Self::NotExecutable { mode } => write!(
                f,
                "not executable (mode {:o}); run `chmod +x` on it",
                mode & 0o7777
            ),
            Self::Inaccessible(e) => write!(f, "cannot be inspected: {e}"),
        }
    }
}

/// Why a config could not be used.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The config file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The text is not valid TOML or does not match the schema (unknown key, wrong type,
    /// missing required key). The message names the key, its line and column.
    Parse {
        /// Where the text came from (a file path or a description).
        origin: String,
        /// The TOML parser's message.
        message: String,
    },
    /// The text parsed but some values are out of range.
    Invalid {
        /// Where the text came from.
        origin: String,
        /// Every bad field.
        problems: Vec<FieldProblem>,
    },
    /// The engine binary cannot be run.
    Binary {
        /// The binary's path.
        path: PathBuf,
        /// What is wrong with it.
        problem: BinaryProblem,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            Self::Parse { origin, message } => {
                write!(f, "{origin}: invalid config: {}", message.trim_end())
            }
            Self::Invalid { origin, problems } => {
                write!(f, "{origin}: invalid config:")?;
                for problem in problems {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
            Self::Binary { path, problem } => {
                write!(f, "engine binary {}: {problem}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Read { source, .. } => Some(source),
            Self::Binary {
                problem: BinaryProblem::Inaccessible(e),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

impl ClusterConfig {
    /// A valid config with every default, for tests and programmatic use; change fields
    /// with struct update syntax.
    ///
    /// # Examples
    ///
    /// ```
    /// use understudy_supervisor::config::{ClusterConfig, RingConfig};
    ///
    /// let config = ClusterConfig {
    ///     ring: RingConfig { capacity_bytes: 1 << 16, ..RingConfig::default() },
    ///     ..ClusterConfig::new("demo", "/bin/true")
    /// };
    /// assert!(config.validate().is_ok());
    /// ```
    pub fn new(cluster: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        Self {
            cluster: cluster.into(),
            shm_dir: default_shm_dir(),
            engine: EngineConfig::new(binary),
            slots: SlotsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            restart: RestartConfig::default(),
            backpressure: BackpressureConfig::default(),
            acceptance: AcceptanceConfig::default(),
            ring: RingConfig::default(),
            metrics: crate::metrics::MetricsConfig::default(),
        }
    }

    /// Reads, parses and validates the config file at `path`. Does not check the binary.
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_str(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names its source in errors.
    #[allow(clippy::should_implement_trait)] // takes an origin, unlike `FromStr`
    pub fn from_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|problems| ConfigError::Invalid {
            origin: origin.to_owned(),
            problems,
        })?;
        Ok(config)
    }

    /// Checks every value against its range; returns all the bad fields, not just the first.
    pub fn validate(&self) -> Result<(), Vec<FieldProblem>> {
        let mut problems = Problems::default();
        self.check_names(&mut problems);
        self.check_engine(&mut problems);
        self.check_pinned_cpus(&mut problems);
        self.check_ranges(&mut problems);
        self.check_relations(&mut problems);
        self.check_acceptance_ring_metrics(&mut problems);
        if problems.0.is_empty() {
            Ok(())
        } else {
            Err(problems.0)
        }
    }

    /// The cluster name and the shared-memory directory (which also holds the socket).
    fn check_names(&self, problems: &mut Problems) {
        let name_ok = !self.cluster.is_empty()
            && self.cluster.len() <= CLUSTER_NAME_LEN_MAX
            && self
                .cluster
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !name_ok {
            problems.bad(
                "cluster",
                "1 to 32 characters from [a-z0-9_-]",
                format!("{:?}", self.cluster),
            );
        }
        let parent_dir = self
            .shm_dir
            .components()
            .any(|c| c == std::path::Component::ParentDir);
        if !self.shm_dir.is_absolute() || parent_dir {
            problems.bad(
                "shm_dir",
                "an absolute path without `..`",
                format!("{:?}", self.shm_dir.display().to_string()),
            );
        }
        let socket_bytes =
            self.shm_dir.as_os_str().len() + self.cluster.len() + "//supervisor.sock".len();
        if socket_bytes > SOCKET_PATH_BYTES_MAX {
            problems.bad(
                "shm_dir",
                &format!(
                    "a path short enough that <shm_dir>/<cluster>/supervisor.sock fits a Unix socket address ({SOCKET_PATH_BYTES_MAX} bytes)"
                ),
                format!(
                    "{:?} ({socket_bytes} bytes with the socket)",
                    self.shm_dir.display().to_string()
                ),
            );
        }
    }

    /// `[engine]`: the binary, its arguments and its environment.
    fn check_engine(&self, problems: &mut Problems) {
        if self.engine.binary.as_os_str().is_empty() {
            problems.bad(
                "engine.binary",
                "a path to the engine executable",
                "\"\"".into(),
            );
        }
        for (i, arg) in self.engine.args.iter().enumerate() {
            if arg.contains('\0') {
                problems.bad(
                    &format!("engine.args[{i}]"),
                    "no NUL byte",
                    format!("{arg:?}"),
                );
            }
        }
        for (key, value) in &self.engine.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                problems.bad(
                    "engine.env",
                    "variable names that are non-empty, without '=' or NUL",
                    format!("{key:?}"),
                );
            }
            if let Some((_, instead)) = ENGINE_ENV_RESERVED.iter().find(|(k, _)| k == key) {
                problems.bad(
                    &format!("engine.env.{key}"),
                    &format!("a variable the supervisor does not set (it sets this one {instead})"),
                    format!("{value:?}"),
                );
            }
            if value.contains('\0') {
                problems.bad(
                    &format!("engine.env.{key}"),
                    "no NUL byte",
                    format!("{value:?}"),
                );
            }
            if let Some(expected) = engine_tuning_problem(key, value) {
                problems.bad(
                    &format!("engine.env.{key}"),
                    &expected,
                    format!("{value:?}"),
                );
            }
        }
    }

    /// `slots.*.cpu`: in range, and no two engines pinned to one CPU.
    fn check_pinned_cpus(&self, problems: &mut Problems) {
        let pinned = [
            ("slots.a.cpu", &self.slots.a),
            ("slots.b.cpu", &self.slots.b),
            ("slots.c.cpu", &self.slots.c),
        ];
        for (i, (field, slot)) in pinned.iter().enumerate() {
            let Some(cpu) = slot.as_ref().and_then(|s| s.cpu) else {
                continue;
            };
            if cpu > CPU_MAX {
                problems.bad(
                    field,
                    &format!("a CPU number from 0 to {CPU_MAX}"),
                    cpu.to_string(),
                );
                continue;
            }
            let shared = pinned[..i]
                .iter()
                .find(|(_, other)| other.as_ref().and_then(|s| s.cpu) == Some(cpu));
            if let Some((other_field, _)) = shared {
                // Two spinning engines on one CPU would starve each other.
                problems.bad(
                    field,
                    &format!("a CPU other than `{other_field}`'s"),
                    cpu.to_string(),
                );
            }
        }
    }

    /// Every duration and count, each against its own range (one rule: `Problems::bounded`).
    fn check_ranges(&self, problems: &mut Problems) {
        const DAY_MS: &str = "ms (1 day)";
        let (t, r) = (&self.timeouts, &self.restart);
        let (b, a) = (&self.backpressure, &self.acceptance);
        let above_0 = Bound::AboveZero;
        let any = Bound::AnyFrom0;
        #[rustfmt::skip] // one field per line reads as the table it is
        let fields = [
            ("timeouts.heartbeat_ms", t.heartbeat_ms, above_0, HEARTBEAT_MS_MAX, "ms (1 minute)"),
            ("timeouts.start_ms", t.start_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("timeouts.hot_ms", t.hot_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("timeouts.switchover_ms", t.switchover_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("timeouts.shutdown_ms", t.shutdown_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("restart.backoff_initial_ms", r.backoff_initial_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("restart.backoff_max_ms", r.backoff_max_ms, any, DURATION_MS_MAX, DAY_MS),
            ("restart.crash_loop_window_ms", r.crash_loop_window_ms, above_0, DURATION_MS_MAX, DAY_MS),
            ("restart.crash_loop_max", u64::from(r.crash_loop_max), above_0, u64::from(CRASH_LOOP_MAX_MAX), "crashes"),
            ("backpressure.wait_max_us", b.wait_max_us, any, WAIT_MAX_US_MAX, "µs (60 s)"),
            ("acceptance.accept_for_ms", a.accept_for_ms, any, ACCEPT_FOR_MS_MAX, "ms (7 days)"),
            ("acceptance.max_latency_us_p99", a.max_latency_us_p99, above_0, LATENCY_US_MAX, "µs (1 hour)"),
        ];
        for (field, value, low, max, unit) in fields {
            problems.bounded(field, value, low, max, unit);
        }
    }

    /// Rules between fields: heartbeats faster than a switchover, a backoff that can grow,
    /// a wait budget when the policy waits.
    fn check_relations(&self, problems: &mut Problems) {
        let t = &self.timeouts;
        if t.heartbeat_ms >= t.switchover_ms {
            problems.bad(
                "timeouts.heartbeat_ms",
                &format!(
                    "less than timeouts.switchover_ms ({}) so a switchover sees heartbeats",
                    t.switchover_ms
                ),
                t.heartbeat_ms.to_string(),
            );
        }
        let r = &self.restart;
        if r.backoff_max_ms < r.backoff_initial_ms {
            problems.bad(
                "restart.backoff_max_ms",
                &format!(
                    "at least restart.backoff_initial_ms ({})",
                    r.backoff_initial_ms
                ),
                r.backoff_max_ms.to_string(),
            );
        }
        if self.backpressure.policy == BackpressurePolicy::Wait
            && self.backpressure.wait_max_us == 0
        {
            problems.bad(
                "backpressure.wait_max_us",
                "a value above 0 under policy \"wait\" (or policy \"untether\")",
                "0".into(),
            );
        }
    }

    /// `[acceptance]`'s non-numeric rules, `[ring]` and `[metrics]`.
    fn check_acceptance_ring_metrics(&self, problems: &mut Problems) {
        let a = &self.acceptance;
        if let Err(expected) = check_max_error_rate(a.max_error_rate) {
            problems.bad(
                "acceptance.max_error_rate",
                expected,
                a.max_error_rate.to_string(),
            );
        }
        if a.accept_cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
            problems.bad(
                "acceptance.accept_cmd",
                "a command, or the key left out",
                "an empty string".into(),
            );
        }
        let capacity = self.ring.capacity_bytes;
        if !capacity.is_power_of_two()
            || !(RING_CAPACITY_BYTES_MIN..=RING_CAPACITY_BYTES_MAX).contains(&capacity)
        {
            problems.bad(
                "ring.capacity_bytes",
                "a power of two between 4096 and 1073741824",
                capacity.to_string(),
            );
        }
        if let Err((expected, found)) = self.metrics.listen_addr() {
            problems.bad("metrics.listen", &expected, found);
        }
    }

    /// Checks that `engine.binary` exists, is a file and is executable.
    pub fn check_binary(&self) -> Result<(), ConfigError> {
        check_binary(&self.engine.binary)
    }

    /// Checks the config against this host: every pinned CPU is one this process may run on
    /// (online and in its affinity set), so that pinning an engine cannot fail at spawn.
    pub fn check_host(&self) -> Result<(), ConfigError> {
        let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok();
        let mut problems = Vec::new();
        for (field, slot) in [
            ("slots.a.cpu", &self.slots.a),
            ("slots.b.cpu", &self.slots.b),
            ("slots.c.cpu", &self.slots.c),
        ] {
            let Some(cpu) = slot.as_ref().and_then(|s| s.cpu) else {
                continue;
            };
            let usable = allowed
                .as_ref()
                .is_some_and(|set| set.is_set(cpu as usize).unwrap_or(false));
            if !usable {
                let list = allowed
                    .as_ref()
                    .map(|set| {
                        (0..nix::sched::CpuSet::count())
                            .filter(|&i| set.is_set(i).unwrap_or(false))
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|| "unknown".into());
                problems.push(FieldProblem {
                    field: field.into(),
                    expected: format!("a CPU of this machine that understudy may use ({list})"),
                    found: cpu.to_string(),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                origin: "this host".into(),
                problems,
            })
        }
    }

    /// The directory holding this cluster's shared files: `<shm_dir>/<cluster>`.
    pub fn cluster_dir(&self) -> PathBuf {
        self.shm_dir.join(&self.cluster)
    }
}

/// The engine tuning variables `[engine] env` may set, with bounds that keep the engine's
/// arithmetic on them in range: `Some(what is expected)` if `value` is outside them.
fn engine_tuning_problem(key: &str, value: &str) -> Option<String> {
    let number = |max: u64, min: u64| -> Option<String> {
        match value.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => None,
            _ => Some(format!("a whole number from {min} to {max}")),
        }
    };
    match key {
        // 40 heartbeats of the longest interval: a standby's fence threshold.
        "UNDERSTUDY_HUNG_MS" => number(HEARTBEAT_MS_MAX * 40, 1),
        "UNDERSTUDY_BACKPRESSURE_US" => number(WAIT_MAX_US_MAX, 0),
        "UNDERSTUDY_BACKPRESSURE_MS" => number(WAIT_MAX_US_MAX / 1000, 0),
        "UNDERSTUDY_CATCHUP_CHUNK" => number(1 << 20, 1),
        "UNDERSTUDY_IDLE" => {
            let text = value.trim();
            let ok = text == "spin"
                || text == "shared"
                || text.split_once(',').is_some_and(|(polls, sleep_us)| {
                    polls.trim().parse::<u32>().is_ok()
                        && sleep_us
                            .trim()
                            .parse::<u64>()
                            .is_ok_and(|us| us <= 1_000_000)
                });
            (!ok).then(|| {
                "`spin`, `shared` or `<spin polls>,<sleep µs>` (polls a u32, sleep at most 1000000 µs)"
                    .to_string()
            })
        }
        _ => None,
    }
}

/// Checks that `path` exists, is a regular file (after following symlinks) and has an
/// execute bit; use it for the new binary of an upgrade too.
pub fn check_binary(path: &Path) -> Result<(), ConfigError> {
    let fail = |problem| ConfigError::Binary {
        path: path.to_path_buf(),
        problem,
    };
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(fail(BinaryProblem::Missing)),
        Err(e) => return Err(fail(BinaryProblem::Inaccessible(e))),
    };
    if !metadata.is_file() {
        return Err(fail(BinaryProblem::NotAFile));
    }
    let mode = metadata.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(fail(BinaryProblem::NotExecutable { mode }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster = "demo-1"
shm_dir = "/dev/shm/understudy-test"

[engine]
binary = "/bin/sh"
args = ["--size", "10"]
env = { RUST_LOG = "info" }

[slots.a]
cpu = 2
[slots.b]
cpu = 3

[timeouts]
heartbeat_ms = 20
start_ms = 1000
hot_ms = 10000
switchover_ms = 500
shutdown_ms = 700

[restart]
backoff_initial_ms = 50
backoff_max_ms = 800
crash_loop_window_ms = 5000
crash_loop_max = 3

[backpressure]
policy = "untether"
wait_max_us = 10

[acceptance]
accept_for_ms = 100
max_error_rate = 0.5
max_latency_us_p99 = 200
accept_cmd = "true"

[ring]
capacity_bytes = 65536
integrity = "off"
"#;

    fn parse_err(text: &str) -> String {
        ClusterConfig::from_str(text, "test.toml")
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn every_key_of_a_full_config_is_read() {
        // Proves each key lands in its field (none silently defaulted).
        let c = ClusterConfig::from_str(GOOD, "good.toml").unwrap();
        assert_eq!(c.cluster, "demo-1");
        assert_eq!(
            c.cluster_dir(),
            Path::new("/dev/shm/understudy-test/demo-1")
        );
        assert_eq!(c.engine.binary, Path::new("/bin/sh"));
        assert_eq!(c.engine.args, ["--size", "10"]);
        assert_eq!(c.engine.env["RUST_LOG"], "info");
        assert_eq!(c.slots.a, Some(SlotConfig { cpu: Some(2) }));
        assert_eq!(c.slots.b, Some(SlotConfig { cpu: Some(3) }));
        assert_eq!(c.slots.c, None);
        assert_eq!(
            c.timeouts,
            TimeoutsConfig {
                heartbeat_ms: 20,
                start_ms: 1000,
                hot_ms: 10000,
                switchover_ms: 500,
                shutdown_ms: 700
            }
        );
        assert_eq!(
            c.restart,
            RestartConfig {
                backoff_initial_ms: 50,
                backoff_max_ms: 800,
                crash_loop_window_ms: 5000,
                crash_loop_max: 3
            }
        );
        assert_eq!(c.backpressure.policy, BackpressurePolicy::Untether);
        assert_eq!(c.backpressure.wait_max_us, 10);
        assert_eq!(c.acceptance.accept_for_ms, 100);
        assert_eq!(c.acceptance.max_error_rate, 0.5);
        assert_eq!(c.acceptance.max_latency_us_p99, 200);
        assert_eq!(c.acceptance.accept_cmd.as_deref(), Some("true"));
        assert_eq!(c.ring.capacity_bytes, 65536);
        assert_eq!(c.ring.integrity, RingIntegrity::Off);
    }

    #[test]
    fn a_minimal_config_gets_the_demo_defaults() {
        // Proves only `cluster` and `engine.binary` are required, and the defaults match
        // `ClusterConfig::new`.
        let c = ClusterConfig::from_str(
            "cluster = \"demo\"\n[engine]\nbinary = \"/bin/true\"\n",
            "min.toml",
        )
        .unwrap();
        assert_eq!(c, ClusterConfig::new("demo", "/bin/true"));
        assert_eq!(c.timeouts.heartbeat(), Duration::from_millis(50));
        assert_eq!(c.shm_dir, default_shm_dir());
    }

    #[test]
    fn the_default_shm_dir_is_per_user_and_root_keeps_the_old_one() {
        // Proves root's default is the historical /dev/shm/understudy, every other uid gets a
        // directory of its own, the running user's default is its uid's, and the advice for
        // an unusable directory names the default to set (or, for the default itself, says
        // someone else made it).
        assert_eq!(default_shm_dir_for(0), Path::new("/dev/shm/understudy"));
        assert_eq!(
            default_shm_dir_for(1000),
            Path::new("/dev/shm/understudy-1000")
        );
        assert_ne!(default_shm_dir_for(1000), default_shm_dir_for(1001));
        let me = shm_layout::trust::euid();
        assert_eq!(default_shm_dir(), default_shm_dir_for(me));
        let mine = default_shm_dir_for(me);
        let other = if me == 0 {
            default_shm_dir_for(1000)
        } else {
            PathBuf::from(SHM_DIR_ROOT)
        };
        let advice = shm_dir_advice(&other);
        assert!(
            advice.contains(&format!("shm_dir = \"{}\"", mine.display())),
            "{advice}"
        );
        let advice = shm_dir_advice(&mine.join("demo"));
        assert!(advice.contains("someone else made it"), "{advice}");
        // The socket path of the longest cluster name fits with the longest uid.
        let mut c = ClusterConfig::new("a".repeat(CLUSTER_NAME_LEN_MAX), "/bin/true");
        c.shm_dir = default_shm_dir_for(u32::MAX);
        assert!(c.validate().is_ok(), "{:?}", c.validate());
    }

    #[test]
    fn required_keys_are_named_when_missing() {
        // Proves a missing `cluster` or `engine.binary` is reported by name.
        assert!(parse_err("[engine]\nbinary = \"/bin/true\"\n").contains("`cluster`"));
        assert!(parse_err("cluster = \"x\"\n[engine]\nargs = []\n").contains("`binary`"));
        assert!(parse_err("cluster = \"x\"\n").contains("`engine`"));
    }

    #[test]
    fn unknown_keys_are_rejected_with_name_line_and_origin() {
        // Proves a misspelt key anywhere (top level, each table, a slot table, an unknown
        // slot) is an error that names the key, its line and the file.
        let cases = [
            ("clustr = \"x\"", "clustr"),
            ("[engine]\nbinary = \"/bin/true\"\nargv = []", "argv"),
            ("[slots.a]\ncpus = 1", "cpus"),
            ("[slots.d]\ncpu = 1", "d"),
            ("[timeouts]\nheartbeat_us = 1", "heartbeat_us"),
            ("[restart]\nbackoff_ms = 1", "backoff_ms"),
            ("[backpressure]\nwait_us = 1", "wait_us"),
            ("[acceptance]\naccept_for = 1", "accept_for"),
            ("[ring]\ncapacity = 4096", "capacity"),
            ("[rings]\ncapacity_bytes = 4096", "rings"),
        ];
        for (snippet, key) in cases {
            let engine = if snippet.starts_with("[engine]") {
                ""
            } else {
                "[engine]\nbinary = \"/bin/true\"\n"
            };
            // The bad key sits on line 3 or later; find its line for the assertion.
            let text = format!("cluster = \"demo\"\n{engine}{snippet}\n");
            let line = text
                .lines()
                .position(|l| l.contains(key) && !l.contains("cluster ="))
                .unwrap()
                + 1;
            let message = parse_err(&text);
            assert!(message.contains("test.toml"), "{message}");
            assert!(message.contains(&format!("`{key}`")), "{key}: {message}");
            assert!(message.contains("unknown field"), "{key}: {message}");
            assert!(
                message.contains(&format!("line {line}")),
                "{key} on line {line}: {message}"
            );
        }
    }

    #[test]
    fn bad_policy_is_rejected_naming_the_choices() {
        // Proves an unknown backpressure policy lists the accepted values.
        let message = parse_err(
            "cluster = \"demo\"\n[engine]\nbinary = \"/bin/true\"\n[backpressure]\npolicy = \"drop\"\n",
        );
        assert!(message.contains("drop"), "{message}");
        assert!(message.contains("`wait`"), "{message}");
        assert!(message.contains("`untether`"), "{message}");
        assert!(message.contains("line 5"), "{message}");
    }

    #[test]
    fn bad_values_are_all_reported_with_field_expected_and_found() {
        // Proves validation names each bad field with what it expected and what it found,
        // and reports every problem in one go.
        let text = r#"
cluster = "Demo!"
[engine]
binary = "/bin/true"
[ring]
capacity_bytes = 1000
[acceptance]
max_error_rate = 1.5
[restart]
backoff_initial_ms = 10
backoff_max_ms = 5
[slots.a]
cpu = 1
[slots.c]
cpu = 1
"#;
        let err = ClusterConfig::from_str(text, "bad.toml").unwrap_err();
        let ConfigError::Invalid { origin, problems } = &err else {
            panic!("expected Invalid, got {err}");
        };
        assert_eq!(origin, "bad.toml");
        let find = |field: &str| {
            problems
                .iter()
                .find(|p| p.field == field)
                .unwrap_or_else(|| panic!("no problem for {field} in {problems:?}"))
        };
        assert_eq!(find("cluster").found, "\"Demo!\"");
        assert!(find("cluster").expected.contains("[a-z0-9_-]"));
        assert_eq!(find("ring.capacity_bytes").found, "1000");
        assert!(find("ring.capacity_bytes")
            .expected
            .contains("power of two"));
        assert_eq!(find("acceptance.max_error_rate").found, "1.5");
        assert_eq!(find("restart.backoff_max_ms").found, "5");
        assert!(find("slots.c.cpu").expected.contains("slots.a.cpu"));
        assert_eq!(problems.len(), 5, "{problems:?}");
        let message = err.to_string();
        assert!(
            message.starts_with("bad.toml: invalid config:"),
            "{message}"
        );
        assert!(
            message.contains("`ring.capacity_bytes`: expected a power of two"),
            "{message}"
        );
    }

    #[test]
    fn engine_env_may_not_name_what_the_supervisor_sets() {
        // Proves `engine.env` is refused for the variables that make an engine part of the
        // cluster (each named with what sets it), and accepted for the tuning variables that
        // it overrides.
        let mut config = ClusterConfig::new("demo", "/bin/true");
        for (key, _) in ENGINE_ENV_RESERVED {
            config.engine.env.insert(key.to_owned(), "x".to_owned());
        }
        config
            .engine
            .env
            .insert("UNDERSTUDY_HUNG_MS".into(), "900".into());
        let problems = config.validate().unwrap_err();
        let fields: Vec<_> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "engine.env.UNDERSTUDY_DIR",
                "engine.env.UNDERSTUDY_RING",
                "engine.env.UNDERSTUDY_SLOT",
                "engine.env.UNDERSTUDY_STANDBY"
            ]
        );
        assert!(
            problems[1].expected.contains("ring.capacity_bytes"),
            "{problems:?}"
        );
        for (key, _) in ENGINE_ENV_RESERVED {
            config.engine.env.remove(key);
        }
        assert!(config.validate().is_ok());
    }

    #[test]
    fn cluster_names_follow_the_pattern() {
        // Proves the name rule: [a-z0-9_-], 1 to 32 characters.
        for good in ["a", "demo_1-x", &"z".repeat(32)] {
            assert!(
                ClusterConfig::new(good, "/bin/true").validate().is_ok(),
                "{good}"
            );
        }
        for bad in ["", "Demo", "a.b", "a/b", "a b", &"z".repeat(33)] {
            let problems = ClusterConfig::new(bad, "/bin/true").validate().unwrap_err();
            assert_eq!(problems[0].field, "cluster", "{bad}");
        }
    }

    #[test]
    fn ring_capacity_must_be_a_power_of_two_in_range() {
        // Proves capacity bounds and the power-of-two rule.
        let with = |capacity_bytes| ClusterConfig {
            ring: RingConfig {
                capacity_bytes,
                ..RingConfig::default()
            },
            ..ClusterConfig::new("demo", "/bin/true")
        };
        for good in [4096, 1 << 20, 1 << 30] {
            assert!(with(good).validate().is_ok(), "{good}");
        }
        for bad in [0, 1, 2048, 4095, 3 << 20, 1 << 31] {
            let problems = with(bad).validate().unwrap_err();
            assert_eq!(problems[0].field, "ring.capacity_bytes", "{bad}");
            assert_eq!(problems[0].found, bad.to_string());
        }
    }

    #[test]
    fn zero_timeouts_and_wait_without_budget_are_rejected() {
        // Proves a zero timeout and `wait` with no wait budget are caught.
        let mut config = ClusterConfig::new("demo", "/bin/true");
        config.timeouts.hot_ms = 0;
        config.backpressure.wait_max_us = 0;
        let fields: Vec<_> = config
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, ["timeouts.hot_ms", "backpressure.wait_max_us"]);
        config.timeouts.hot_ms = 1;
        config.backpressure.policy = BackpressurePolicy::Untether;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn each_ranged_field_is_checked_at_both_ends() {
        // Proves the one range rule (`Problems::bounded`): a zero where 0 is meaningless and a
        // value above the maximum are each reported once, naming the bound and the unit.
        let mut config = ClusterConfig::new("demo", "/bin/true");
        config.restart.crash_loop_max = 0;
        config.restart.backoff_max_ms = DURATION_MS_MAX + 1;
        config.backpressure.wait_max_us = WAIT_MAX_US_MAX + 1;
        let problems = config.validate().unwrap_err();
        let summary: Vec<_> = problems
            .iter()
            .map(|p| (p.field.as_str(), p.expected.as_str()))
            .collect();
        assert_eq!(
            summary,
            [
                ("restart.backoff_max_ms", "at most 86400000 ms (1 day)"),
                ("restart.crash_loop_max", "a value above 0"),
                ("backpressure.wait_max_us", "at most 60000000 µs (60 s)"),
            ]
        );
        config.restart.crash_loop_max = 1;
        config.restart.backoff_max_ms = DURATION_MS_MAX;
        config.backpressure.wait_max_us = 0;
        config.backpressure.policy = BackpressurePolicy::Untether;
        assert!(config.validate().is_ok(), "0 is allowed for wait_max_us");
    }

    #[test]
    fn unreadable_file_error_names_the_path() {
        // Proves from_path reports the path it could not read.
        let err = ClusterConfig::from_path(Path::new("/nonexistent/understudy.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/understudy.toml"));
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("understudy-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn from_path_reads_a_file_and_names_it_in_errors() {
        // Proves the file path appears in parse errors from from_path.
        let dir = temp_dir("from-path");
        let path = dir.join("cluster.toml");
        std::fs::write(&path, GOOD).unwrap();
        assert_eq!(ClusterConfig::from_path(&path).unwrap().cluster, "demo-1");
        std::fs::write(&path, format!("{GOOD}\nbogus = 1\n")).unwrap();
        let message = ClusterConfig::from_path(&path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("bogus"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binary_check_names_the_path_and_the_problem() {
        // Proves each way a binary can be unusable gives its own message with the path.
        let dir = temp_dir("binary");
        let missing = dir.join("missing");
        let plain = dir.join("plain");
        let runnable = dir.join("runnable");
        std::fs::write(&plain, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&runnable, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&runnable, std::fs::Permissions::from_mode(0o755)).unwrap();

        let check = |path: &Path| ClusterConfig::new("demo", path).check_binary();
        let message = |path: &Path| check(path).unwrap_err().to_string();

        assert!(matches!(
            check(&missing),
            Err(ConfigError::Binary {
                problem: BinaryProblem::Missing,
                ..
            })
        ));
        assert!(message(&missing).contains(&missing.display().to_string()));
        assert!(message(&missing).contains("no such file"));

        assert!(matches!(
            check(&dir),
            Err(ConfigError::Binary {
                problem: BinaryProblem::NotAFile,
                ..
            })
        ));
        assert!(message(&dir).contains("not a regular file"));

        assert!(matches!(
            check(&plain),
            Err(ConfigError::Binary {
                problem: BinaryProblem::NotExecutable { .. },
                ..
            })
        ));
        assert!(message(&plain).contains("not executable (mode 644)"));
        assert!(message(&plain).contains(&plain.display().to_string()));

        check(&runnable).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
