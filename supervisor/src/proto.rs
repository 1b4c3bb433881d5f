//! The control socket's wire format: newline-delimited JSON, one request per connection.
//!
//! A client connects to `<cluster dir>/supervisor.sock`, writes one [`Request`] line, and reads
//! [`Reply`] lines: zero or more `"type": "event"` lines (progress of a long operation), then
//! exactly one `"type": "result"` line whose `code` says how it ended. Every line carries the
//! schema version `v`; a request of another version is refused with [`Code::Usage`].
//!
//! Requests are parsed strictly ([`Request::parse`]): an operation only by its name, no field
//! the operation does not take, every field of its type; whatever arrives — bytes that are not
//! UTF-8, not JSON, a line too long — gets a `result` line with a [`RequestError`] that names
//! what was expected and what was found. A long operation also sends a `keepalive` event
//! ([`Reply::keepalive`]) after each second without other news, so a client can time out
//! between lines without knowing how long the operation takes.
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
//! // Only by name, and only the fields the operation takes.
//! assert!(Request::parse(br#"{"v":1,"op":5}"#).is_err());
//! let unknown = Request::parse(br#"{"v":1,"op":"down","binary":"x"}"#).unwrap_err();
//! assert!(unknown.to_string().contains("\"binary\""), "{unknown}");
//! let reply = Reply::result(Code::RolledBack, "upgrade rolled back");
//! let line = serde_json::to_string(&reply).unwrap();
//! assert!(line.contains(r#""code":"rolled-back""#));
//! assert_eq!(Code::RolledBack.exit_code(), 6);
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The schema version of every line.
pub const SCHEMA_VERSION: u32 = 1;

/// The socket's file name inside the cluster directory.
pub const SOCKET_NAME: &str = "supervisor.sock";

/// The longest request line accepted, newline excluded.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

/// The longest soak period a request or the config may ask for (defined with the config's
/// other bounds).
pub use crate::config::ACCEPT_FOR_MS_MAX;

/// One request line. Deserializing goes through [`Request::parse`]'s rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "serde_json::Value")]
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

/// Why a request line was refused; each names what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The bytes are not UTF-8.
    NotUtf8 {
        /// Where the first bad byte is.
        offset: usize,
    },
    /// The line is longer than [`REQUEST_BYTES_MAX`].
    TooLong {
        /// Bytes received before giving up.
        found_bytes: usize,
    },
    /// The connection ended, or stayed silent, before a whole line.
    Incomplete {
        /// What happened.
        found: String,
    },
    /// The text is not JSON.
    NotJson {
        /// The parser's message.
        found: String,
    },
    /// The JSON is not an object.
    NotAnObject {
        /// The JSON type found.
        found: &'static str,
    },
    /// A required field is missing.
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field has the wrong type or value.
    Field {
        /// The field.
        field: String,
        /// What it must be.
        expected: String,
        /// What it was (shortened).
        found: String,
    },
    /// Another schema version.
    Version {
        /// What was found.
        found: u64,
    },
    /// An operation name nobody knows.
    UnknownOp {
        /// The name found.
        found: String,
    },
    /// A field the operation does not take.
    UnknownField {
        /// The operation.
        op: &'static str,
        /// The field found.
        field: String,
    },
}

/// The operation names, as on the wire.
pub const OP_NAMES: [&str; 9] = [
    "status",
    "switchover",
    "upgrade",
    "rollback",
    "enable-features",
    "down",
    "resume-restarts",
    "reload",
    "promote",
];

const UPGRADE_FIELDS: [&str; 9] = [
    "binary",
    "accept_for_ms",
    "accept_cmd",
    "keep_standby",
    "no_enable",
    "max_error_rate",
    "count_refusals",
    "max_latency_us_p99",
    "config_toml",
];

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `text` cut to 60 characters, quoted, for an error message.
fn shown(text: &str) -> String {
    let mut out: String = text.chars().take(60).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    format!("{out:?}")
}

fn shown_value(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => shown(s),
        other => {
            let text = other.to_string();
            if text.chars().count() > 60 {
                format!("{} {}", json_type(other), shown(&text))
            } else {
                text
            }
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LIKE: &str = r#"one JSON line like {"v":1,"op":"status"}"#;
        match self {
            RequestError::NotUtf8 { offset } => write!(
                f,
                "bad request: expected {LIKE} in UTF-8, found a byte that is not UTF-8 at offset {offset}"
            ),
            RequestError::TooLong { found_bytes } => write!(
                f,
                "bad request: expected a line of at most {REQUEST_BYTES_MAX} bytes, found {found_bytes} bytes without a newline"
            ),
            RequestError::Incomplete { found } => {
                write!(f, "bad request: expected {LIKE}, found {found}")
            }
            RequestError::NotJson { found } => {
                write!(f, "bad request: expected {LIKE}, found text that is not JSON ({found})")
            }
            RequestError::NotAnObject { found } => {
                write!(f, "bad request: expected a JSON object like {{\"v\":1,\"op\":\"status\"}}, found {found}")
            }
            RequestError::Missing { field } => {
                write!(f, "bad request: field `{field}`: expected it, found it missing")
            }
            RequestError::Field {
                field,
                expected,
                found,
            } => write!(f, "bad request: field `{field}`: expected {expected}, found {found}"),
            RequestError::Version { found } => write!(
                f,
                "bad request: field `v` (schema version): expected {SCHEMA_VERSION}, found {found}"
            ),
            RequestError::UnknownOp { found } => write!(
                f,
                "bad request: field `op`: expected one of {}, found {found}",
                OP_NAMES.join(", ")
            ),
            RequestError::UnknownField { op, field } => write!(
                f,
                "bad request: unknown field {} for op `{op}`: expected {}",
                shown(field),
                if *op == "upgrade" {
                    format!("only `v`, `op`, {}", UPGRADE_FIELDS.map(|f| format!("`{f}`")).join(", "))
                } else if *op == "reload" {
                    "only `v`, `op` and `config_toml`".to_string()
                } else if *op == "promote" {
                    "only `v`, `op`, `slot` and `accept_loss`".to_string()
                } else {
                    "only `v` and `op`".to_string()
                }
            ),
        }
    }
}

impl std::error::Error for RequestError {}

impl Request {
    /// Parses one request line (without its newline) strictly: UTF-8, a JSON object, `v` equal
    /// to [`SCHEMA_VERSION`], `op` one of [`OP_NAMES`] as a string, and only the fields that
    /// operation takes, each of its type. Never panics, whatever the bytes.
    pub fn parse(line: &[u8]) -> Result<Request, RequestError> {
        if line.len() > REQUEST_BYTES_MAX {
            return Err(RequestError::TooLong {
                found_bytes: line.len(),
            });
        }
        let text = std::str::from_utf8(line).map_err(|e| RequestError::NotUtf8 {
            offset: e.valid_up_to(),
        })?;
        let value: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| RequestError::NotJson {
                found: e.to_string(),
            })?;
        Request::try_from(value)
    }
}

impl TryFrom<serde_json::Value> for Request {
    type Error = RequestError;

    fn try_from(value: serde_json::Value) -> Result<Request, RequestError> {
        let serde_json::Value::Object(mut fields) = value else {
            return Err(RequestError::NotAnObject {
                found: json_type(&value),
            });
        };
        let v = fields
            .remove("v")
            .ok_or(RequestError::Missing { field: "v" })?;
        let v = v.as_u64().ok_or_else(|| RequestError::Field {
            field: "v".into(),
            expected: format!("the schema version {SCHEMA_VERSION} as a number"),
            found: shown_value(&v),
        })?;
        if v != u64::from(SCHEMA_VERSION) {
            return Err(RequestError::Version { found: v });
        }
        let op = fields
            .remove("op")
            .ok_or(RequestError::Missing { field: "op" })?;
        let serde_json::Value::String(name) = &op else {
            return Err(RequestError::Field {
                field: "op".into(),
                expected: format!(
                    "an operation name (one of {}) as a string",
                    OP_NAMES.join(", ")
                ),
                found: shown_value(&op),
            });
        };
        let (name, op) = match name.as_str() {
            "status" => ("status", Op::Status),
            "switchover" => ("switchover", Op::Switchover),
            "rollback" => ("rollback", Op::Rollback),
            "enable-features" => ("enable-features", Op::EnableFeatures),
            "down" => ("down", Op::Down),
            "resume-restarts" => ("resume-restarts", Op::ResumeRestarts),
            "upgrade" => (
                "upgrade",
                Op::Upgrade(UpgradeRequest::from_fields(&mut fields)?),
            ),
            "reload" => (
                "reload",
                Op::Reload(ReloadRequest::from_fields(&mut fields)?),
            ),
            "promote" => (
                "promote",
                Op::Promote(PromoteRequest::from_fields(&mut fields)?),
            ),
            _ => return Err(RequestError::UnknownOp { found: shown(name) }),
        };
        if let Some(field) = fields.keys().next() {
            return Err(RequestError::UnknownField {
                op: name,
                field: field.clone(),
            });
        }
        Ok(Request {
            v: SCHEMA_VERSION,
            op,
        })
    }
}

/// Takes an optional field out of `fields`: absent or null is `None`; anything else is what
/// `parse` makes of it, or a [`RequestError::Field`] naming what `parse` expected.
fn take_optional<T>(
    fields: &mut serde_json::Map<String, serde_json::Value>,
    field: &str,
    parse: impl FnOnce(&serde_json::Value) -> Result<T, String>,
) -> Result<Option<T>, RequestError> {
    match fields.remove(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(value) => parse(&value)
            .map(Some)
            .map_err(|expected| RequestError::Field {
                field: field.into(),
                expected,
                found: shown_value(&value),
            }),
    }
}

impl UpgradeRequest {
    /// Takes the upgrade's fields out of `fields`, checking each one's type and bounds.
    fn from_fields(
        fields: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<UpgradeRequest, RequestError> {
        let bad = |field: &str, expected: &str, value: &serde_json::Value| RequestError::Field {
            field: field.into(),
            expected: expected.into(),
            found: shown_value(value),
        };
        let binary = match fields.remove("binary") {
            None => return Err(RequestError::Missing { field: "binary" }),
            Some(serde_json::Value::String(s)) if !s.is_empty() && !s.contains('\0') => {
                PathBuf::from(s)
            }
            Some(other) => {
                return Err(bad(
                    "binary",
                    "the path of the new engine executable, a non-empty string without NUL",
                    &other,
                ))
            }
        };
        let accept_for_ms = take_optional(fields, "accept_for_ms", |value| {
            value
                .as_u64()
                .filter(|&ms| ms <= ACCEPT_FOR_MS_MAX)
                .ok_or_else(|| {
                    format!("a whole number of milliseconds from 0 to {ACCEPT_FOR_MS_MAX} (7 days), or null")
                })
        })?;
        let accept_cmd = take_optional(fields, "accept_cmd", |value| match value.as_str() {
            Some(s) if !s.trim().is_empty() && !s.contains('\0') => Ok(s.to_owned()),
            _ => Err("a shell command (a non-empty string without NUL), or null".into()),
        })?;
        // The acceptance bounds this upgrade overrides: the config's bounds, exactly.
        let max_error_rate = take_optional(fields, "max_error_rate", |value| {
            match value.as_f64().map(crate::config::check_max_error_rate) {
                Some(Ok(rate)) => Ok(rate),
                Some(Err(expected)) => Err(format!("{expected}, or null")),
                None => Err("a fraction between 0 and 1 as a number, or null".into()),
            }
        })?;
        let max_latency_us_p99 = take_optional(fields, "max_latency_us_p99", |value| match value
            .as_u64()
            .map(crate::config::check_max_latency_us_p99)
        {
            Some(Ok(us)) => Ok(us),
            _ => Err(format!(
                "a whole number of µs from 0 to {} (1 hour), or null",
                crate::config::LATENCY_US_MAX
            )),
        })?;
        let count_refusals = take_optional(fields, "count_refusals", |value| {
            value.as_bool().ok_or_else(|| "true, false or null".into())
        })?;
        let config_toml = take_optional(fields, "config_toml", |value| {
            value
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| "the configuration file's TOML text as a string, or null".into())
        })?;
        let mut flag = |field: &'static str| match fields.remove(field) {
            None => Ok(false),
            Some(serde_json::Value::Bool(b)) => Ok(b),
            Some(other) => Err(bad(field, "true or false", &other)),
        };
        let keep_standby = flag("keep_standby")?;
        let no_enable = flag("no_enable")?;
        Ok(UpgradeRequest {
            binary,
            accept_for_ms,
            accept_cmd,
            keep_standby,
            no_enable,
            max_error_rate,
            count_refusals,
            max_latency_us_p99,
            config_toml,
        })
    }
}

/// The operations (parsed by name only, see [`Request::parse`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// Start restarting the slots the crash-loop breaker stopped (their crash counts are
    /// cleared).
    ResumeRestarts,
    /// Apply a new configuration to the running supervisor (what can change at run time).
    Reload(ReloadRequest),
    /// With no engine active and none able to step up: make the engine in `slot` active with
    /// the consistent copy it holds, accepting the loss of what the dead active committed
    /// after it.
    Promote(PromoteRequest),
}

/// The arguments of `promote`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The engine's slot: `a`, `b` or `c`.
    pub slot: String,
    /// The operator accepts losing the transactions the copy does not hold (required).
    pub accept_loss: bool,
}

impl PromoteRequest {
    fn from_fields(
        fields: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<PromoteRequest, RequestError> {
        let slot = match fields.remove("slot") {
            None => return Err(RequestError::Missing { field: "slot" }),
            Some(serde_json::Value::String(s)) if matches!(s.as_str(), "a" | "b" | "c") => s,
            Some(other) => {
                return Err(RequestError::Field {
                    field: "slot".into(),
                    expected: "the engine's slot, \"a\", \"b\" or \"c\"".into(),
                    found: shown_value(&other),
                })
            }
        };
        let accept_loss = match fields.remove("accept_loss") {
            None => false,
            Some(serde_json::Value::Bool(b)) => b,
            Some(other) => {
                return Err(RequestError::Field {
                    field: "accept_loss".into(),
                    expected: "true or false".into(),
                    found: shown_value(&other),
                })
            }
        };
        Ok(PromoteRequest { slot, accept_loss })
    }
}

/// The arguments of a reload: the whole configuration file's text, which the supervisor
/// parses and validates again (the client's `--config` is what is applied, never ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadRequest {
    /// The TOML text of the configuration.
    pub config_toml: String,
}

impl ReloadRequest {
    fn from_fields(
        fields: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<ReloadRequest, RequestError> {
        match fields.remove("config_toml") {
            None => Err(RequestError::Missing {
                field: "config_toml",
            }),
            Some(serde_json::Value::String(config_toml)) => Ok(ReloadRequest { config_toml }),
            Some(other) => Err(RequestError::Field {
                field: "config_toml".into(),
                expected: "the configuration file's TOML text, as a string".into(),
                found: shown_value(&other),
            }),
        }
    }
}

/// The arguments of an upgrade. Every acceptance bound left out (`None`) is taken from the
/// config (from `config_toml` when given, else from the running config); a bound given
/// applies to this upgrade only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// `acceptance.max_error_rate` for this upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_error_rate: Option<f64>,
    /// `acceptance.count_refusals` for this upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count_refusals: Option<bool>,
    /// `acceptance.max_latency_us_p99` for this upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_latency_us_p99: Option<u64>,
    /// The text of the config file the operator named (`understudy --config F upgrade`): its
    /// `[acceptance]` is the base of this upgrade's bounds; refused if it differs from the
    /// running config anywhere else (apply that with `understudy reload` first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_toml: Option<String>,
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

    /// The event a long operation sends after a second without other news:
    /// `{"event":"keepalive"}` in `data`. Clients skip it; it lets them time out between
    /// lines.
    pub fn keepalive() -> Self {
        Self::event("working", serde_json::json!({ "event": "keepalive" }))
    }

    /// This is a [`Reply::keepalive`] event.
    pub fn is_keepalive(&self) -> bool {
        self.kind == ReplyKind::Event
            && self.data.get("event").and_then(|e| e.as_str()) == Some("keepalive")
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

/// A live engine registered in a slot's control-block record that is not the engine the
/// supervisor started or adopted for that slot (started by hand, or by another tool): it is
/// not watched, fenced or restarted, and it may replicate from the active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForeignEngine {
    /// `a`, `b` or `c`.
    pub slot: String,
    /// The process the slot's record names.
    pub pid: u32,
    /// Its start time (clock ticks after boot), which with the pid identifies it.
    pub start_time_ticks: u64,
    /// The engine the supervisor watches in that slot, if any.
    pub expected_pid: Option<u32>,
    /// The role its record shows (`active`, `standby`, `out-of-service`, `none`).
    pub role: String,
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
    /// Live engines registered in a slot that the supervisor did not start there (see
    /// [`ForeignEngine`]).
    #[serde(default)]
    pub foreign_engines: Vec<ForeignEngine>,
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
