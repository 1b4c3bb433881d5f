//! The record of an upgrade in progress: a file in the cluster's directory that lets a
//! supervisor which died (or was stopped) in the middle of an upgrade leave its successor what
//! it needs to settle the cluster — what was upgraded to what, where the plan was (its
//! [`Checkpoint`]), which engine process runs which version, and the cluster command in
//! flight.
//!
//! The upgrade writes it at every change of its plan, *before* performing the action it
//! announces, and removes it when the upgrade ends. Each write is atomic: a temporary file,
//! fsync, rename over the record, fsync of the directory — a reader sees the old record or the
//! new one, never a mix. Reading trusts nothing: the file must be a JSON object of format
//! [`RECORD_FORMAT`] and version [`RECORD_VERSION`], with exactly the known fields, values in
//! range, for this cluster; otherwise the error says what was expected and what was found.
//!
//! # Examples
//!
//! ```
//! use understudy_supervisor::plan::{UpgradePlan, UpgradeSpec};
//! use understudy_supervisor::record::{self, UpgradeRecord};
//!
//! let dir = std::env::temp_dir().join(format!("understudy-record-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let plan = UpgradePlan::new(UpgradeSpec::new("/opt/v1", "/opt/v2")).unwrap();
//! let written = UpgradeRecord::new("demo", plan.spec(), plan.checkpoint());
//! record::store(&dir, &written).unwrap();
//! assert_eq!(record::load(&dir, "demo").unwrap(), Some(written));
//!
//! std::fs::write(dir.join(record::RECORD_FILE), r#"{"format":"understudy-upgrade","version":9}"#).unwrap();
//! let error = record::load(&dir, "demo").unwrap_err().to_string();
//! assert!(error.contains("expected version 1, found version 9"), "{error}");
//!
//! record::remove(&dir).unwrap();
//! assert_eq!(record::load(&dir, "demo").unwrap(), None);
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use understudy_control::control::realtime_ns;
use understudy_control::liveness::ProcessIdentity;

use crate::config::TimeoutsConfig;
use crate::plan::{
    Checkpoint, Cluster, PlannedEngine, PlannedRole, Slot, UpgradePlan, UpgradeSpec, Version,
};

/// The record's file name inside the cluster directory.
pub const RECORD_FILE: &str = "upgrade.json";
/// Where a record that could not be used is moved, for the operator to read.
pub const REJECTED_FILE: &str = "upgrade.json.rejected";
/// The `format` every record carries.
pub const RECORD_FORMAT: &str = "understudy-upgrade";
/// The layout version of the record this supervisor writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// The largest record read: a record takes a few kilobytes at most.
const RECORD_BYTES_MAX: u64 = 1024 * 1024;

/// An upgrade in progress, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRecord {
    /// Always [`RECORD_FORMAT`].
    pub format: String,
    /// Always [`RECORD_VERSION`].
    pub version: u32,
    /// The cluster's name.
    pub cluster: String,
    /// The supervisor that wrote the record last.
    pub supervisor_pid: u32,
    /// When the upgrade began, ns since the Unix epoch.
    pub started_at_ns: u64,
    /// When the record was written, ns since the Unix epoch.
    pub updated_at_ns: u64,
    /// The slot of the old active when the upgrade began.
    pub active: Slot,
    /// The slot of the old hot standby when the upgrade began.
    pub standby: Slot,
    /// The version running before the upgrade.
    pub old_binary: PathBuf,
    /// The version being rolled out.
    pub new_binary: PathBuf,
    /// A `--keep-standby` upgrade.
    pub keep_standby: bool,
    /// A `--no-enable` upgrade.
    pub no_enable: bool,
    /// The acceptance soak.
    pub accept_for_ms: u64,
    /// Where the plan was.
    pub checkpoint: Checkpoint,
    /// The same, for humans (`step 5/8 (acceptance check): check engine b for 2000 ms`).
    pub progress: String,
    /// The sequence number of the cluster command (switchover, enable) posted for the action
    /// in flight, if any.
    pub command_seq: Option<u64>,
    /// The engine processes the upgrade knows, with the version each runs.
    pub engines: Vec<RecordedEngine>,
    /// Set when the plan has ended, just before the record is removed.
    pub outcome: Option<String>,
}

/// One engine process in an [`UpgradeRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedEngine {
    /// Its slot.
    pub slot: Slot,
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot), which tells a reused pid apart.
    pub start_time_ticks: u64,
    /// The version it runs.
    pub version: Version,
}

/// Why a record could not be read, written or used.
#[derive(Debug)]
pub enum RecordError {
    /// The file exists but could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file could not be written, renamed, synced or removed.
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file's content is not a usable record.
    Invalid {
        /// The file.
        path: PathBuf,
        /// What a record must hold.
        expected: String,
        /// What the file holds.
        found: String,
    },
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Read { path, source } => {
                write!(
                    f,
                    "cannot read the upgrade record {}: {source}",
                    path.display()
                )
            }
            RecordError::Write { path, source } => {
                write!(
                    f,
                    "cannot write the upgrade record {}: {source}",
                    path.display()
                )
            }
            RecordError::Invalid {
                path,
                expected,
                found,
            } => write!(
                f,
                "upgrade record {}: expected {expected}, found {found}",
                path.display()
            ),
        }
    }
}

impl std::error::Error for RecordError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RecordError::Read { source, .. } | RecordError::Write { source, .. } => Some(source),
            RecordError::Invalid { .. } => None,
        }
    }
}

impl UpgradeRecord {
    /// The record of a plan made with `spec` for `cluster`, at `checkpoint`, written by this
    /// process now, with no engines.
    pub fn new(cluster: &str, spec: &UpgradeSpec, checkpoint: Checkpoint) -> Self {
        let now = realtime_ns();
        Self {
            format: RECORD_FORMAT.to_owned(),
            version: RECORD_VERSION,
            cluster: cluster.to_owned(),
            supervisor_pid: std::process::id(),
            started_at_ns: now,
            updated_at_ns: now,
            active: spec.active,
            standby: spec.standby,
            old_binary: spec.old_binary.clone(),
            new_binary: spec.new_binary.clone(),
            keep_standby: spec.keep_standby,
            no_enable: spec.no_enable,
            accept_for_ms: spec.accept_for_ms,
            checkpoint,
            progress: String::new(),
            command_seq: None,
            engines: Vec::new(),
            outcome: None,
        }
    }

    /// The plan's spec, with `timeouts` (the config's, which may have changed since).
    pub fn spec(&self, timeouts: TimeoutsConfig) -> UpgradeSpec {
        UpgradeSpec {
            active: self.active,
            standby: self.standby,
            old_binary: self.old_binary.clone(),
            new_binary: self.new_binary.clone(),
            keep_standby: self.keep_standby,
            no_enable: self.no_enable,
            accept_for_ms: self.accept_for_ms,
            timeouts,
        }
    }

    /// The version the engine `identity` in `slot` runs, if the record knows that process.
    pub fn version_of(&self, slot: Slot, identity: &ProcessIdentity) -> Option<Version> {
        self.engines
            .iter()
            .find(|e| {
                e.slot == slot
                    && e.pid == identity.pid
                    && e.start_time_ticks == identity.start_time_ticks
            })
            .map(|e| e.version)
    }

    /// The binary of `version`.
    pub fn binary(&self, version: Version) -> &Path {
        match version {
            Version::Old => &self.old_binary,
            Version::New => &self.new_binary,
        }
    }

    /// Parses and checks the text of a record for `cluster`; `Err` holds what was expected
    /// and what was found.
    pub fn parse(text: &str, cluster: &str) -> Result<Self, (String, String)> {
        let what = format!("a JSON object of format \"{RECORD_FORMAT}\"");
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| (what.clone(), format!("invalid JSON ({e})")))?;
        let Some(object) = value.as_object() else {
            return Err((what, format!("`{}`", shorten(&value.to_string()))));
        };
        match object.get("format") {
            Some(serde_json::Value::String(f)) if f == RECORD_FORMAT => {}
            Some(other) => {
                return Err((
                    format!("format \"{RECORD_FORMAT}\""),
                    format!("format {}", shorten(&other.to_string())),
                ))
            }
            None => return Err((format!("format \"{RECORD_FORMAT}\""), "no format".into())),
        }
        match object.get("version") {
            Some(v) if v.as_u64() == Some(u64::from(RECORD_VERSION)) => {}
            Some(v) => {
                return Err((
                    format!("version {RECORD_VERSION}"),
                    format!(
                        "version {} (written by another release of the supervisor)",
                        shorten(&v.to_string())
                    ),
                ))
            }
            None => return Err((format!("version {RECORD_VERSION}"), "no version".into())),
        }
        let record: UpgradeRecord = serde_json::from_value(value).map_err(|e| {
            (
                format!("the fields of an upgrade record version {RECORD_VERSION}"),
                e.to_string(),
            )
        })?;
        record.check(cluster)?;
        Ok(record)
    }

    /// The checks beyond the schema: the values fit together and fit the cluster.
    fn check(&self, cluster: &str) -> Result<(), (String, String)> {
        if self.cluster != cluster {
            return Err((
                format!("cluster \"{cluster}\""),
                format!("cluster \"{}\"", self.cluster),
            ));
        }
        if self.active == self.standby {
            return Err((
                "different slots in `active` and `standby`".into(),
                format!("slot {} in both", self.active),
            ));
        }
        for (field, path) in [
            ("old_binary", &self.old_binary),
            ("new_binary", &self.new_binary),
        ] {
            if !path.is_absolute() {
                return Err((
                    format!("an absolute path in `{field}`"),
                    format!("{:?}", path.display().to_string()),
                ));
            }
        }
        for (i, e) in self.engines.iter().enumerate() {
            if e.pid < 2 {
                return Err((
                    "engine pids of 2 or more".into(),
                    format!("pid {} for engine {}", e.pid, e.slot),
                ));
            }
            if self.engines[..i].iter().any(|other| other.slot == e.slot) {
                return Err((
                    "one engine per slot".into(),
                    format!("two engines in slot {}", e.slot),
                ));
            }
        }
        // The checkpoint must fit a plan of this shape: resume one on a minimal cluster.
        let cluster = Cluster::new([(
            self.active,
            PlannedEngine::new(Version::Old, PlannedRole::Active),
        )]);
        UpgradePlan::resume(
            self.spec(TimeoutsConfig::default()),
            &self.checkpoint,
            cluster,
            "",
        )
        .map(|_| ())
        .map_err(|e| {
            let text = e.to_string();
            match text.split_once(", found ") {
                Some((expected, found)) => (
                    expected.trim_start_matches("expected ").to_owned(),
                    found.to_owned(),
                ),
                None => ("a checkpoint of this plan".to_owned(), text),
            }
        })
    }
}

fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The record of `dir`'s cluster `cluster`, `None` if there is none.
pub fn load(dir: &Path, cluster: &str) -> Result<Option<UpgradeRecord>, RecordError> {
    let path = dir.join(RECORD_FILE);
    // The record names executables the supervisor will run: believed only if nobody but this
    // user could have written it (ours, mode 0600, not a link).
    let bytes = match shm_layout::trust::read_private_file(&path, RECORD_BYTES_MAX) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(e) => {
            return Err(RecordError::Read {
                path,
                source: e.into(),
            })
        }
    };
    let text = String::from_utf8(bytes).map_err(|e| RecordError::Invalid {
        path: path.clone(),
        expected: "UTF-8 text".into(),
        found: format!(
            "a byte that is not UTF-8 at offset {}",
            e.utf8_error().valid_up_to()
        ),
    })?;
    UpgradeRecord::parse(&text, cluster)
        .map(Some)
        .map_err(|(expected, found)| RecordError::Invalid {
            path,
            expected,
            found,
        })
}

/// Writes `record` atomically: a temporary file, fsync, rename, fsync of `dir`.
pub fn store(dir: &Path, record: &UpgradeRecord) -> Result<(), RecordError> {
    let path = dir.join(RECORD_FILE);
    let mut text = serde_json::to_vec_pretty(record)
        .map_err(io::Error::other)
        .map_err(|source| RecordError::Write {
            path: path.clone(),
            source,
        })?;
    text.push(b'\n');
    write_atomically(dir, RECORD_FILE, &text).map_err(|source| RecordError::Write { path, source })
}

/// Replaces `dir/name` with `bytes` so that a reader sees the old file or the new one, never a
/// mix, even across a crash: a temporary file (mode 0600, never through a symbolic link),
/// fsync, rename over `name`, fsync of `dir`.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let temp = dir.join(format!("{name}.tmp"));
    // A temporary file left by a crash is replaced, never written through: created anew
    // (`O_EXCL`), so it is ours with mode 0600 whatever stood at its name.
    match std::fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temp, dir.join(name))?;
    sync_dir(dir)
}

/// Removes the record (the upgrade has ended); no record is not an error.
pub fn remove(dir: &Path) -> Result<(), RecordError> {
    let path = dir.join(RECORD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map_err(|source| RecordError::Write { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RecordError::Write { path, source }),
    }
}

/// Moves a record that cannot be used to [`REJECTED_FILE`], for the operator; returns the
/// new path.
pub fn set_aside(dir: &Path) -> Result<PathBuf, RecordError> {
    let path = dir.join(RECORD_FILE);
    let rejected = dir.join(REJECTED_FILE);
    std::fs::rename(&path, &rejected)
        .and_then(|()| sync_dir(dir))
        .map_err(|source| RecordError::Write { path, source })?;
    Ok(rejected)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Action, Next};

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("understudy-record-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A record in the middle of a plan: the switchover in flight, two engines known.
    fn sample() -> UpgradeRecord {
        let mut plan = UpgradePlan::new(UpgradeSpec::new("/opt/v1", "/opt/v2")).unwrap();
        let planned = loop {
            let Next::Perform(planned) = plan.next_action() else {
                panic!("the plan ended")
            };
            if matches!(planned.action, Action::Switchover { .. }) {
                break planned;
            }
            plan.on_event(crate::plan::Event::Done { id: planned.id })
                .unwrap();
        };
        let mut record = UpgradeRecord::new("demo", plan.spec(), plan.checkpoint());
        record.progress = planned.to_string();
        record.command_seq = Some(7);
        record.engines = vec![
            RecordedEngine {
                slot: Slot::A,
                pid: 4242,
                start_time_ticks: 99,
                version: Version::Old,
            },
            RecordedEngine {
                slot: Slot::B,
                pid: 4343,
                start_time_ticks: 100,
                version: Version::New,
            },
        ];
        record
    }

    #[test]
    fn a_stored_record_loads_back_equal_and_leaves_no_temporary_file() {
        // Proves the round trip of every field and the atomic write's clean-up.
        let dir = temp_dir("roundtrip");
        let record = sample();
        store(&dir, &record).unwrap();
        assert_eq!(load(&dir, "demo").unwrap(), Some(record.clone()));
        assert!(!dir.join(format!("{RECORD_FILE}.tmp")).exists());
        let identity = ProcessIdentity {
            pid: 4343,
            start_time_ticks: 100,
        };
        assert_eq!(record.version_of(Slot::B, &identity), Some(Version::New));
        assert_eq!(record.version_of(Slot::A, &identity), None);
        let reused = ProcessIdentity {
            pid: 4343,
            start_time_ticks: 101,
        };
        assert_eq!(record.version_of(Slot::B, &reused), None);
        remove(&dir).unwrap();
        remove(&dir).unwrap();
        assert_eq!(load(&dir, "demo").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The error for `text` as the record of cluster `demo`.
    fn error(text: &str) -> (String, String) {
        UpgradeRecord::parse(text, "demo").expect_err("the record should be refused")
    }

    fn edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut value = serde_json::to_value(sample()).unwrap();
        edit(&mut value);
        value.to_string()
    }

    #[test]
    fn a_bad_record_is_refused_saying_what_was_expected_and_found() {
        // Proves each way a record can be unusable — not JSON, truncated, another format or
        // version, an unknown or missing field, a bad value, another cluster, values that do
        // not fit together — is refused with what was expected and what was found.
        let good = serde_json::to_string(&sample()).unwrap();
        let cases: Vec<(String, &str, &str)> = vec![
            ("garbage".into(), "a JSON object", "invalid JSON"),
            (
                good[..good.len() / 2].into(),
                "a JSON object",
                "invalid JSON",
            ),
            ("[1, 2]".into(), "a JSON object", "`[1,2]`"),
            (
                edited(|v| v["format"] = "something-else".into()),
                "format \"understudy-upgrade\"",
                "format \"something-else\"",
            ),
            (
                edited(|v| {
                    v.as_object_mut().unwrap().remove("format");
                }),
                "format",
                "no format",
            ),
            (
                edited(|v| v["version"] = 2.into()),
                "version 1",
                "version 2 (written by another release",
            ),
            (
                edited(|v| v["colour"] = "blue".into()),
                "the fields of an upgrade record",
                "unknown field `colour`",
            ),
            (
                edited(|v| {
                    v.as_object_mut().unwrap().remove("checkpoint");
                }),
                "the fields",
                "missing field `checkpoint`",
            ),
            (
                edited(|v| v["active"] = "d".into()),
                "the fields",
                "unknown variant `d`",
            ),
            (
                edited(|v| v["checkpoint"]["step"] = "dance".into()),
                "the fields",
                "unknown variant `dance`",
            ),
            (
                edited(|v| v["checkpoint"]["in_flight"]["kind"] = "reboot".into()),
                "the fields",
                "unknown variant `reboot`",
            ),
            (
                edited(|v| v["cluster"] = "prod".into()),
                "cluster \"demo\"",
                "cluster \"prod\"",
            ),
            (
                edited(|v| v["new_binary"] = "engine-v2".into()),
                "an absolute path in `new_binary`",
                "\"engine-v2\"",
            ),
            (
                edited(|v| v["engines"][1]["slot"] = "a".into()),
                "one engine per slot",
                "two engines in slot a",
            ),
            (
                edited(|v| v["engines"][0]["pid"] = 1.into()),
                "engine pids of 2 or more",
                "pid 1",
            ),
            (
                edited(|v| v["standby"] = "a".into()),
                "different slots in `active` and `standby`",
                "slot a in both",
            ),
            (
                edited(|v| {
                    v["no_enable"] = true.into();
                    v["checkpoint"]["step"] = "enable-features".into();
                }),
                "a step of this plan",
                "`enable the new features on both engines`",
            ),
            (
                edited(|v| v["checkpoint"]["recovery_starts"] = 9.into()),
                "at most 2 recovery starts",
                "9",
            ),
        ];
        for (text, expected, found) in cases {
            let (e, f) = error(&text);
            let both = format!("expected {e}, found {f}");
            assert!(
                both.contains(expected) && both.contains(found),
                "want expected `{expected}` and found `{found}`, got: {both}"
            );
        }
    }

    #[test]
    fn a_record_set_aside_is_no_longer_loaded_and_its_error_names_the_file() {
        // Proves set_aside moves the file away, and load's error names the record's path.
        let dir = temp_dir("aside");
        std::fs::write(dir.join(RECORD_FILE), "{").unwrap();
        let message = load(&dir, "demo").unwrap_err().to_string();
        assert!(
            message.contains(&dir.join(RECORD_FILE).display().to_string()),
            "{message}"
        );
        let moved = set_aside(&dir).unwrap();
        assert_eq!(moved, dir.join(REJECTED_FILE));
        assert!(moved.exists());
        assert_eq!(load(&dir, "demo").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_record_others_could_write_or_a_link_is_not_believed() {
        // Proves a record with access for others, or a symbolic link in its place, is refused
        // before its contents are read (they name executables the supervisor would run), and a
        // link left at the temporary file's name is replaced, not written through.
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("trust");
        store(&dir, &sample()).unwrap();
        let path = dir.join(RECORD_FILE);
        assert!(load(&dir, "demo").unwrap().is_some());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let message = load(&dir, "demo").unwrap_err().to_string();
        assert!(
            message.contains("mode") && message.contains("0644"),
            "{message}"
        );
        std::fs::remove_file(&path).unwrap();
        let elsewhere = dir.join("elsewhere.json");
        std::fs::write(&elsewhere, b"{}").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        let message = load(&dir, "demo").unwrap_err().to_string();
        assert!(message.contains("symbolic link"), "{message}");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join(format!("{RECORD_FILE}.tmp"))).unwrap();
        store(&dir, &sample()).unwrap();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"{}");
        assert!(load(&dir, "demo").unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
